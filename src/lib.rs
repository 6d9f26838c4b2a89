//! The parts of the `medfed` binary that its examples share: plots and a federation on one
//! machine.

pub mod local;
pub mod plots;
