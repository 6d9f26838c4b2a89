//! Generalized linear models, local training and FedAvg.
//!
//! Parameters are one flat vector `[w_1, ..., w_d, bias]` over standardized features, so
//! that aggregation (and later secure aggregation) treats every model as a plain vector.
//! Training minimises the mean loss plus `l2 / 2 * ||w||^2` (the bias is not penalised) by
//! mini-batch gradient descent; the shuffle is seeded so runs are reproducible.

use ndarray::{Array1, ArrayView1, ArrayView2, Axis, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::stats::Standardization;

/// The model family a study trains (`"logistic"` or `"linear"` in configuration files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Binary logistic regression (log loss); the target is 0 or 1.
    Logistic,
    /// Linear regression (squared error).
    Linear,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Logistic => "logistic",
            ModelKind::Linear => "linear",
        })
    }
}

/// Hyper-parameters of one round of local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    /// Passes over the site's training rows per round (at least 1).
    pub local_epochs: u32,
    /// Rows per mini-batch (at least 1).
    pub batch_size: u32,
    /// The gradient step's size (positive).
    pub learning_rate: f64,
    /// Weight of the L2 penalty `l2/2 ||w||²` (the bias is not penalised; 0 for none).
    pub l2: f64,
    /// Seed of the mini-batch shuffle; the node mixes in the round number.
    pub seed: u64,
    /// FedProx (Li et al. 2020): weight of the proximal term `mu/2 ||w - w_global||²` that
    /// keeps local training near the round's global model (0: plain local SGD).
    pub prox_mu: f64,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            local_epochs: 5,
            batch_size: 16,
            learning_rate: 0.1,
            l2: 0.01,
            seed: 0,
            prox_mu: 0.0,
        }
    }
}

/// Why local training produced no update.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The data's feature count is not the model's.
    #[error("the model has {model} features but the data has {data}")]
    WidthMismatch {
        /// The model's features.
        model: usize,
        /// The data's columns.
        data: usize,
    },
    /// Features and targets have different row counts.
    #[error("{rows} rows of features but {targets} targets")]
    LengthMismatch {
        /// Rows of features.
        rows: usize,
        /// Targets.
        targets: usize,
    },
    /// There is nothing to train on.
    #[error("no training rows")]
    NoRows,
    /// A hyper-parameter is out of range ([`TrainParams::validate`]).
    #[error("invalid training parameter {name}: {why}")]
    InvalidParam {
        /// The parameter's name, as in a study's configuration.
        name: &'static str,
        /// What it must be.
        why: String,
    },
    /// A parameter became NaN or infinite.
    #[error("training diverged (non-finite parameters); lower the learning rate")]
    Diverged,
    /// The round's deadline passed between epochs.
    #[error("training stopped after {epochs} of {of} epochs: the round's deadline passed")]
    Stopped {
        /// Epochs completed.
        epochs: u32,
        /// Epochs asked for.
        of: u32,
    },
    /// The round's deadline passed between DP-SGD steps.
    #[error("training stopped after {step} of {of} steps: the round's deadline passed")]
    StoppedAtStep {
        /// Steps completed.
        step: u32,
        /// Steps asked for.
        of: u32,
    },
}

impl TrainParams {
    /// Checks the ranges: at least one epoch and one row per batch, a positive learning rate,
    /// and non-negative `l2` and `prox_mu`.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |name, why: &str| {
            Err(TrainError::InvalidParam {
                name,
                why: why.to_string(),
            })
        };
        if self.local_epochs == 0 {
            return bad("local_epochs", "must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", "must be a positive number");
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad("l2", "must be zero or positive");
        }
        if !(self.prox_mu.is_finite() && self.prox_mu >= 0.0) {
            return bad("prox_mu", "must be zero or positive");
        }
        Ok(())
    }
}

/// A global model: what a round starts from and what the aggregator exports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalModel {
    /// Logistic or linear.
    pub kind: ModelKind,
    /// The input columns, in the order of `weights`.
    pub features: Vec<String>,
    /// The federation's per-feature mean and standard deviation: the model's inputs are
    /// `(x - mean) / std`.
    pub standardization: Standardization,
    /// `[w_1, ..., w_d, bias]`.
    pub weights: Vec<f64>,
}

impl GlobalModel {
    /// All-zero parameters over `features`.
    pub fn zeros(
        kind: ModelKind,
        features: Vec<String>,
        standardization: Standardization,
    ) -> GlobalModel {
        let d = features.len();
        GlobalModel {
            kind,
            features,
            standardization,
            weights: vec![0.0; d + 1],
        }
    }

    /// Checks internal consistency (of a model read from a file or the network).
    pub fn validate(&self) -> Result<(), String> {
        let d = self.features.len();
        if self.weights.len() != d + 1 {
            return Err(format!(
                "{} weights for {d} features (expected {})",
                self.weights.len(),
                d + 1
            ));
        }
        if self.standardization.mean.len() != d || self.standardization.std.len() != d {
            return Err(format!("standardization does not cover the {d} features"));
        }
        if self.weights.iter().any(|w| !w.is_finite()) {
            return Err("non-finite weight".into());
        }
        if self
            .standardization
            .std
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0))
            || self.standardization.mean.iter().any(|m| !m.is_finite())
        {
            return Err("standardization has a non-positive or non-finite value".into());
        }
        Ok(())
    }

    /// Predictions on raw (unstandardized) rows: probabilities for logistic, values for
    /// linear.
    pub fn predict_raw(&self, x: ArrayView2<'_, f64>) -> Result<Array1<f64>, TrainError> {
        let mut z = x.to_owned();
        if z.ncols() != self.features.len() {
            return Err(TrainError::WidthMismatch {
                model: self.features.len(),
                data: z.ncols(),
            });
        }
        self.standardization.apply(&mut z);
        predict(self.kind, &self.weights, z.view())
    }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

fn linear_part(weights: &[f64], x: ArrayView2<'_, f64>) -> Array1<f64> {
    let d = x.ncols();
    let w = ArrayView1::from(&weights[..d]);
    x.dot(&w) + weights[d]
}

/// Predictions on standardized rows.
pub fn predict(
    kind: ModelKind,
    weights: &[f64],
    x: ArrayView2<'_, f64>,
) -> Result<Array1<f64>, TrainError> {
    if weights.len() != x.ncols() + 1 {
        return Err(TrainError::WidthMismatch {
            model: weights.len().saturating_sub(1),
            data: x.ncols(),
        });
    }
    let z = linear_part(weights, x);
    Ok(match kind {
        ModelKind::Logistic => z.mapv(sigmoid),
        ModelKind::Linear => z,
    })
}

/// Mean loss (log loss or half squared error) on standardized rows, without the penalty.
pub fn mean_loss(
    kind: ModelKind,
    weights: &[f64],
    x: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
) -> Result<f64, TrainError> {
    let p = predict(kind, weights, x)?;
    if y.is_empty() {
        return Ok(0.0);
    }
    let total: f64 = match kind {
        ModelKind::Logistic => p
            .iter()
            .zip(y)
            .map(|(p, y)| crate::metrics::log_loss_term(*p, *y))
            .sum(),
        ModelKind::Linear => p.iter().zip(y).map(|(p, y)| 0.5 * (p - y).powi(2)).sum(),
    };
    Ok(total / y.len() as f64)
}

/// Trains from `start` on standardized rows `x` with targets `y` and returns the new
/// parameters. Deterministic for a given `params.seed`.
pub fn train_local(
    kind: ModelKind,
    start: &[f64],
    x: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
    params: &TrainParams,
) -> Result<Vec<f64>, TrainError> {
    train_local_until(kind, start, x, y, params, &|| false)
}

/// [`train_local`], giving up with [`TrainError::Stopped`] as soon as `stop` says so
/// (asked after every batch): a node past its round's deadline frees its CPU instead of
/// finishing an update nobody waits for.
pub fn train_local_until(
    kind: ModelKind,
    start: &[f64],
    x: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
    params: &TrainParams,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<f64>, TrainError> {
    params.validate()?;
    let (n, d) = x.dim();
    if start.len() != d + 1 {
        return Err(TrainError::WidthMismatch {
            model: start.len().saturating_sub(1),
            data: d,
        });
    }
    if y.len() != n {
        return Err(TrainError::LengthMismatch {
            rows: n,
            targets: y.len(),
        });
    }
    if n == 0 {
        return Err(TrainError::NoRows);
    }
    let mut w = Array1::from(start.to_vec());
    let start_w = w.clone();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed);
    let batch = params.batch_size as usize;
    for epoch in 0..params.local_epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(batch) {
            if stop() {
                return Err(TrainError::Stopped {
                    epochs: epoch,
                    of: params.local_epochs,
                });
            }
            let xb = x.select(Axis(0), chunk);
            let yb = y.select(Axis(0), chunk);
            let pred = predict(kind, w.as_slice().unwrap_or(&[]), xb.view())?;
            // Both losses have gradient X^T (pred - y) / m with these link functions.
            let resid = pred - &yb;
            let m = chunk.len() as f64;
            let mut grad_w = xb.t().dot(&resid) / m;
            grad_w.scaled_add(params.l2, &w.slice(s![..d]));
            let mut grad_b = resid.sum() / m;
            if params.prox_mu > 0.0 {
                let drift = &w - &start_w;
                grad_w.scaled_add(params.prox_mu, &drift.slice(s![..d]));
                grad_b += params.prox_mu * drift[d];
            }
            w.slice_mut(s![..d])
                .scaled_add(-params.learning_rate, &grad_w);
            w[d] -= params.learning_rate * grad_b;
        }
        if w.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Diverged);
        }
    }
    Ok(w.to_vec())
}

/// The server's optimizer: how the round's average becomes the next global model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerOptimizer {
    /// The average is the next model (FedAvg).
    FedAvg,
    /// FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the
    /// pseudo-gradient `average - model`.
    FedAdam {
        /// The server's step size `η`.
        learning_rate: f64,
        /// Decay of the first moment (Adam's `β₁`, e.g. 0.9).
        beta1: f64,
        /// Decay of the second moment (Adam's `β₂`, e.g. 0.99).
        beta2: f64,
        /// The adaptivity `τ` added to the second moment's square root (Adam's ε, e.g. 1e-3).
        tau: f64,
    },
}

/// The server optimizer's state across rounds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    m: Vec<f64>,
    v: Vec<f64>,
}

impl ServerOptimizer {
    /// The next global model from the current one and the round's average.
    pub fn step(&self, state: &mut ServerState, model: &[f64], average: &[f64]) -> Vec<f64> {
        match *self {
            ServerOptimizer::FedAvg => average.to_vec(),
            ServerOptimizer::FedAdam {
                learning_rate,
                beta1,
                beta2,
                tau,
            } => {
                if state.m.len() != model.len() {
                    state.m = vec![0.0; model.len()];
                    state.v = vec![0.0; model.len()];
                }
                model
                    .iter()
                    .zip(average)
                    .enumerate()
                    .map(|(i, (w, a))| {
                        let delta = a - w;
                        state.m[i] = beta1 * state.m[i] + (1.0 - beta1) * delta;
                        state.v[i] = beta2 * state.v[i] + (1.0 - beta2) * delta * delta;
                        w + learning_rate * state.m[i] / (state.v[i].sqrt() + tau)
                    })
                    .collect()
            }
        }
    }
}

/// FedAvg: the average of the updates weighted by their sample counts. The caller has
/// checked that every update has the same length and finite values.
pub fn federated_average<'a>(
    updates: impl IntoIterator<Item = (&'a [f64], u64)>,
) -> Option<Vec<f64>> {
    let mut sum: Option<Vec<f64>> = None;
    let mut total = 0u64;
    for (w, n) in updates {
        let acc = sum.get_or_insert_with(|| vec![0.0; w.len()]);
        for (a, v) in acc.iter_mut().zip(w) {
            *a += v * n as f64;
        }
        total = total.saturating_add(n);
    }
    let mut sum = sum?;
    if total == 0 {
        return None;
    }
    for a in &mut sum {
        *a /= total as f64;
    }
    Some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, array};

    fn separable() -> (Array2<f64>, Array1<f64>) {
        let x = array![
            [-2.0, 0.1],
            [-1.5, -0.3],
            [-1.0, 0.2],
            [1.0, -0.1],
            [1.5, 0.4],
            [2.0, 0.0]
        ];
        let y = array![0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        (x, y)
    }

    #[test]
    fn logistic_training_lowers_the_loss_and_separates() {
        let (x, y) = separable();
        let start = vec![0.0; 3];
        let before = mean_loss(ModelKind::Logistic, &start, x.view(), y.view()).unwrap();
        let params = TrainParams {
            local_epochs: 50,
            batch_size: 2,
            ..Default::default()
        };
        let w = train_local(ModelKind::Logistic, &start, x.view(), y.view(), &params).unwrap();
        let after = mean_loss(ModelKind::Logistic, &w, x.view(), y.view()).unwrap();
        assert!(after < before * 0.5, "{after} vs {before}");
        let p = predict(ModelKind::Logistic, &w, x.view()).unwrap();
        for (p, y) in p.iter().zip(&y) {
            assert_eq!(*p > 0.5, *y > 0.5);
        }
    }

    #[test]
    fn linear_training_recovers_coefficients() {
        // y = 3 x1 - 2 x2 + 1, no noise; with l2 = 0 gradient descent converges to it.
        let x = array![
            [0.0, 1.0],
            [1.0, 0.0],
            [1.0, 1.0],
            [-1.0, 0.5],
            [0.5, -1.0],
            [2.0, 2.0]
        ];
        let y = x
            .rows()
            .into_iter()
            .map(|r| 3.0 * r[0] - 2.0 * r[1] + 1.0)
            .collect::<Array1<_>>();
        let params = TrainParams {
            local_epochs: 2000,
            batch_size: 6,
            learning_rate: 0.1,
            l2: 0.0,
            seed: 1,
            prox_mu: 0.0,
        };
        let w = train_local(ModelKind::Linear, &[0.0; 3], x.view(), y.view(), &params).unwrap();
        for (got, want) in w.iter().zip([3.0, -2.0, 1.0]) {
            assert!((got - want).abs() < 1e-6, "{w:?}");
        }
    }

    #[test]
    fn training_is_deterministic_per_seed() {
        let (x, y) = separable();
        let p = TrainParams {
            batch_size: 2,
            ..Default::default()
        };
        let a = train_local(ModelKind::Logistic, &[0.0; 3], x.view(), y.view(), &p).unwrap();
        let b = train_local(ModelKind::Logistic, &[0.0; 3], x.view(), y.view(), &p).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn training_stops_when_asked_between_batches() {
        let (x, y) = separable();
        let p = TrainParams {
            local_epochs: 10,
            batch_size: 2,
            ..Default::default()
        };
        // Three batches per epoch: stopping at the 8th check is in the third epoch.
        let asked = std::cell::Cell::new(0);
        let stop = || {
            asked.set(asked.get() + 1);
            asked.get() > 7
        };
        assert_eq!(
            train_local_until(
                ModelKind::Logistic,
                &[0.0; 3],
                x.view(),
                y.view(),
                &p,
                &stop
            ),
            Err(TrainError::Stopped { epochs: 2, of: 10 })
        );
        let never = train_local_until(
            ModelKind::Logistic,
            &[0.0; 3],
            x.view(),
            y.view(),
            &p,
            &|| false,
        );
        assert_eq!(
            never.unwrap(),
            train_local(ModelKind::Logistic, &[0.0; 3], x.view(), y.view(), &p).unwrap()
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (x, y) = separable();
        let p = TrainParams::default();
        assert!(matches!(
            train_local(ModelKind::Logistic, &[0.0; 2], x.view(), y.view(), &p),
            Err(TrainError::WidthMismatch { .. })
        ));
        assert!(matches!(
            train_local(
                ModelKind::Logistic,
                &[0.0; 3],
                x.view(),
                y.slice(s![..3]),
                &p
            ),
            Err(TrainError::LengthMismatch { .. })
        ));
        let zero_lr = TrainParams {
            learning_rate: 0.0,
            ..p.clone()
        };
        assert!(matches!(
            train_local(ModelKind::Logistic, &[0.0; 3], x.view(), y.view(), &zero_lr),
            Err(TrainError::InvalidParam {
                name: "learning_rate",
                ..
            })
        ));
        let huge = TrainParams {
            learning_rate: 1e300,
            local_epochs: 3,
            ..p
        };
        let big_x = x.mapv(|v| v * 1e10);
        assert_eq!(
            train_local(ModelKind::Linear, &[0.0; 3], big_x.view(), y.view(), &huge),
            Err(TrainError::Diverged)
        );
    }

    #[test]
    fn fedprox_keeps_local_training_near_the_global_model() {
        let (x, y) = separable();
        let start = vec![0.5, -0.5, 0.0];
        let free = TrainParams {
            local_epochs: 20,
            batch_size: 2,
            ..Default::default()
        };
        let prox = TrainParams {
            prox_mu: 5.0,
            ..free.clone()
        };
        let dist = |w: &[f64]| {
            w.iter()
                .zip(&start)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let w_free = train_local(ModelKind::Logistic, &start, x.view(), y.view(), &free).unwrap();
        let w_prox = train_local(ModelKind::Logistic, &start, x.view(), y.view(), &prox).unwrap();
        assert!(
            dist(&w_prox) < dist(&w_free) / 2.0,
            "{} vs {}",
            dist(&w_prox),
            dist(&w_free)
        );
        assert!(
            TrainParams {
                prox_mu: -1.0,
                ..free
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn fedadam_moves_toward_the_average_and_fedavg_takes_it() {
        let model = [0.0, 1.0];
        let avg = [1.0, 0.0];
        let mut state = ServerState::default();
        assert_eq!(
            ServerOptimizer::FedAvg.step(&mut state, &model, &avg),
            avg.to_vec()
        );
        let adam = ServerOptimizer::FedAdam {
            learning_rate: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        };
        let next = adam.step(&mut state, &model, &avg);
        assert!(next[0] > 0.0 && next[1] < 1.0, "{next:?}");
        // Repeated steps toward a fixed target converge to it.
        let mut w = model.to_vec();
        let mut state = ServerState::default();
        for _ in 0..500 {
            w = adam.step(&mut state, &w, &avg);
        }
        assert!((w[0] - 1.0).abs() < 0.05 && w[1].abs() < 0.05, "{w:?}");
    }

    #[test]
    fn fedavg_weights_by_samples() {
        let a = [1.0, 2.0];
        let b = [3.0, 6.0];
        let avg = federated_average([(&a[..], 1), (&b[..], 3)]).unwrap();
        assert_eq!(avg, vec![2.5, 5.0]);
        assert_eq!(federated_average(std::iter::empty()), None);
        assert_eq!(federated_average([(&a[..], 0)]), None);
    }
}
