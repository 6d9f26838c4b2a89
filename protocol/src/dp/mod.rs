//! Differential privacy: Rényi-DP accounting (more to come: clipping and noise for training
//! rounds, budgets).

pub mod accountant;
