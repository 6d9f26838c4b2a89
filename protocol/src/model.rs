//! Generalized linear models, local training and FedAvg.
//!
//! Parameters are one flat vector `[w_1, ..., w_d, bias]` over standardized features, so
//! that aggregation (and later secure aggregation) treats every model as a plain vector; a
//! multinomial model of K classes has K such blocks, one per class, in the study's class
//! order. Training minimises the mean loss plus `l2 / 2 * ||w||^2` (the biases are not
//! penalised) by mini-batch gradient descent; the shuffle is seeded so runs are
//! reproducible.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::stats::Standardization;

/// The model a study trains, with what its parameters' layout depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Binary logistic regression (log loss); the target is 0 or 1.
    Logistic,
    /// Linear regression (squared error).
    Linear,
    /// Multinomial logistic regression (softmax, cross-entropy) over `classes` classes; the
    /// target is the class's index, 0 to `classes - 1`, in the study's class order.
    Multinomial {
        /// The number of classes, [`MIN_CLASSES`] to [`MAX_CLASSES`].
        classes: u8,
    },
}

/// The fewest classes of a multinomial model (two classes are a logistic model).
pub const MIN_CLASSES: usize = 3;
/// The most classes of a multinomial model: its parameters, evaluation and noise grow with
/// the classes.
pub const MAX_CLASSES: usize = 32;

/// A model's family, as configuration files name it: `"logistic"`, `"linear"` or
/// `"multinomial"` (whose classes a study lists beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// Binary logistic regression.
    Logistic,
    /// Linear regression.
    Linear,
    /// Multinomial logistic regression.
    Multinomial,
}

impl std::fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelFamily::Logistic => "logistic",
            ModelFamily::Linear => "linear",
            ModelFamily::Multinomial => "multinomial",
        })
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.family().fmt(f)
    }
}

impl ModelKind {
    /// The model's family.
    pub fn family(self) -> ModelFamily {
        match self {
            ModelKind::Logistic => ModelFamily::Logistic,
            ModelKind::Linear => ModelFamily::Linear,
            ModelKind::Multinomial { .. } => ModelFamily::Multinomial,
        }
    }

    /// Values the model predicts per row: 1, or a probability per class.
    pub fn outputs(self) -> usize {
        match self {
            ModelKind::Logistic | ModelKind::Linear => 1,
            ModelKind::Multinomial { classes } => usize::from(classes),
        }
    }

    /// Whether the model predicts a class (logistic or multinomial).
    pub fn is_classifier(self) -> bool {
        !matches!(self, ModelKind::Linear)
    }

    /// The number of parameters over `features` features: `outputs · (features + 1)`.
    pub fn width(self, features: usize) -> usize {
        self.outputs() * (features + 1)
    }

    /// The features behind `width` parameters, if `width` is a whole number of blocks.
    pub fn features_of(self, width: usize) -> Option<usize> {
        let k = self.outputs();
        (width >= k && width.is_multiple_of(k)).then(|| width / k - 1)
    }

    /// Checks the class count of a multinomial model (from a file or the network).
    pub fn validate(self) -> Result<(), String> {
        match self {
            ModelKind::Multinomial { classes }
                if !(MIN_CLASSES..=MAX_CLASSES).contains(&usize::from(classes)) =>
            {
                Err(format!(
                    "a multinomial model has {MIN_CLASSES} to {MAX_CLASSES} classes, not {classes}"
                ))
            }
            _ => Ok(()),
        }
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
    /// Logistic, linear or multinomial.
    pub kind: ModelKind,
    /// The input columns, in the order of `weights`.
    pub features: Vec<String>,
    /// The federation's per-feature mean and standard deviation: the model's inputs are
    /// `(x - mean) / std`.
    pub standardization: Standardization,
    /// `[w_1, ..., w_d, bias]`; for a multinomial model one such block per class, in the
    /// study's class order.
    pub weights: Vec<f64>,
    /// How a record's raw columns become `features` (categories, imputed values); empty
    /// for a model whose features are the raw columns themselves, none imputed.
    #[serde(default)]
    pub recipe: crate::preprocess::Recipe,
}

impl GlobalModel {
    /// All-zero parameters over `features`.
    pub fn zeros(
        kind: ModelKind,
        features: Vec<String>,
        standardization: Standardization,
    ) -> GlobalModel {
        let width = kind.width(features.len());
        GlobalModel {
            kind,
            features,
            standardization,
            weights: vec![0.0; width],
            recipe: crate::preprocess::Recipe::default(),
        }
    }

    /// Checks internal consistency (of a model read from a file or the network).
    pub fn validate(&self) -> Result<(), String> {
        self.kind.validate()?;
        let d = self.features.len();
        if self.weights.len() != self.kind.width(d) {
            return Err(format!(
                "{} weights for {d} features (expected {})",
                self.weights.len(),
                self.kind.width(d)
            ));
        }
        if self.standardization.mean.len() != d || self.standardization.std.len() != d {
            return Err(format!("standardization does not cover the {d} features"));
        }
        if self.weights.iter().any(|w| !w.is_finite()) {
            return Err("non-finite weight".into());
        }
        if !self.recipe.inputs.is_empty() {
            self.recipe.validate(&self.features)?;
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

    /// The recipe that makes this model's inputs from raw columns: its own, or for a model
    /// without one, each feature read as a number, nothing imputed.
    pub fn preprocessing(&self) -> crate::preprocess::Recipe {
        if self.recipe.inputs.is_empty() {
            crate::preprocess::Recipe::identity(&self.features)
        } else {
            self.recipe.clone()
        }
    }

    /// Predictions on raw (unstandardized) rows, as [`predict`]: probabilities for logistic,
    /// values for linear, `classes` probabilities per row for multinomial.
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

/// Class probabilities (rows × K) of a multinomial model with `weights` of K blocks
/// `[w, b]`: a softmax of the K linear parts, shifted by their maximum so that no `exp`
/// overflows.
fn softmax_rows(weights: &[f64], x: ArrayView2<'_, f64>, k: usize) -> Array2<f64> {
    let (n, d) = x.dim();
    let mut z = Array2::zeros((n, k));
    for (c, block) in weights.chunks_exact(d + 1).enumerate().take(k) {
        z.column_mut(c).assign(&linear_part(block, x));
    }
    for mut row in z.rows_mut() {
        let max = row.fold(f64::NEG_INFINITY, |a, b| a.max(*b));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    z
}

fn check_width(kind: ModelKind, weights: &[f64], d: usize) -> Result<(), TrainError> {
    if weights.len() != kind.width(d) {
        return Err(TrainError::WidthMismatch {
            model: kind.features_of(weights.len()).unwrap_or(weights.len()),
            data: d,
        });
    }
    Ok(())
}

/// Predictions on standardized rows: one value per row (a probability for logistic, a value
/// for linear), or for a multinomial model of K classes the K class probabilities of each
/// row, row after row (`n · K` values; [`predict_proba`] gives them as a matrix).
pub fn predict(
    kind: ModelKind,
    weights: &[f64],
    x: ArrayView2<'_, f64>,
) -> Result<Array1<f64>, TrainError> {
    check_width(kind, weights, x.ncols())?;
    Ok(match kind {
        ModelKind::Logistic => linear_part(weights, x).mapv(sigmoid),
        ModelKind::Linear => linear_part(weights, x),
        ModelKind::Multinomial { .. } => {
            let p = softmax_rows(weights, x, kind.outputs());
            Array1::from(p.into_raw_vec_and_offset().0)
        }
    })
}

/// Predictions on standardized rows as a matrix, rows × [`ModelKind::outputs`].
pub fn predict_proba(
    kind: ModelKind,
    weights: &[f64],
    x: ArrayView2<'_, f64>,
) -> Result<Array2<f64>, TrainError> {
    let n = x.nrows();
    let p = predict(kind, weights, x)?;
    let k = kind.outputs();
    Ok(Array2::from_shape_vec((n, k), p.to_vec()).unwrap_or_else(|_| Array2::zeros((n, k))))
}

/// Mean loss (log loss, half squared error, or cross-entropy) on standardized rows, without
/// the penalty.
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
        ModelKind::Multinomial { .. } => p
            .as_slice()
            .unwrap_or(&[])
            .chunks_exact(kind.outputs())
            .zip(y)
            .map(|(p, y)| crate::metrics::cross_entropy_term(p, *y))
            .sum(),
    };
    Ok(total / y.len() as f64)
}

/// The gradient of the mean loss over rows `x` (standardized) with targets `y`, without the
/// penalty, in the layout of `weights`. All three losses have gradient `(P − Y)ᵀ [X, 1] / m`
/// with their link functions, where for a multinomial model `Y` is one-hot.
fn loss_gradient(
    kind: ModelKind,
    weights: &[f64],
    x: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
) -> Result<Array1<f64>, TrainError> {
    let (m, d) = x.dim();
    let k = kind.outputs();
    let mut resid = predict_proba(kind, weights, x)?;
    for (mut row, y) in resid.rows_mut().into_iter().zip(y) {
        match kind {
            ModelKind::Multinomial { .. } => {
                let c = *y as usize;
                if c < k {
                    row[c] -= 1.0;
                }
            }
            _ => row[0] -= y,
        }
    }
    let mut grad = Array1::zeros(k * (d + 1));
    let m = m.max(1) as f64;
    for c in 0..k {
        let r = resid.column(c);
        let mut block = grad.slice_mut(s![c * (d + 1)..(c + 1) * (d + 1)]);
        block.slice_mut(s![..d]).assign(&(x.t().dot(&r) / m));
        block[d] = r.sum() / m;
    }
    Ok(grad)
}

/// Whether every target suits `kind`: a class index below the class count for a
/// multinomial model (a logistic target is read as `y > 0.5`, a linear one as it is).
fn check_targets(kind: ModelKind, y: ArrayView1<'_, f64>) -> Result<(), TrainError> {
    if let ModelKind::Multinomial { classes } = kind
        && let Some(bad) = y
            .iter()
            .find(|v| !(v.fract() == 0.0 && **v >= 0.0 && **v < f64::from(classes)))
    {
        return Err(TrainError::InvalidParam {
            name: "target",
            why: format!("{bad} is not a class index below {classes}"),
        });
    }
    Ok(())
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
    check_width(kind, start, d)?;
    if y.len() != n {
        return Err(TrainError::LengthMismatch {
            rows: n,
            targets: y.len(),
        });
    }
    if n == 0 {
        return Err(TrainError::NoRows);
    }
    check_targets(kind, y)?;
    let mut w = Array1::from(start.to_vec());
    let start_w = w.clone();
    // 1 on weights, 0 on biases: the penalty leaves the biases alone.
    let penalised =
        Array1::from_iter((0..w.len()).map(|i| f64::from(u8::from((i + 1) % (d + 1) != 0))));
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
            let mut grad = loss_gradient(kind, w.as_slice().unwrap_or(&[]), xb.view(), yb.view())?;
            grad.scaled_add(params.l2, &(&w * &penalised));
            if params.prox_mu > 0.0 {
                grad.scaled_add(params.prox_mu, &(&w - &start_w));
            }
            w.scaled_add(-params.learning_rate, &grad);
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

    fn three_classes() -> (Array2<f64>, Array1<f64>) {
        let x = array![
            [-2.0, 0.1],
            [-1.5, -0.3],
            [-1.8, 0.2],
            [2.0, -0.1],
            [1.5, 0.4],
            [1.9, 0.0],
            [0.1, 2.0],
            [-0.2, 1.7],
            [0.3, 2.2]
        ];
        let y = array![0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0];
        (x, y)
    }

    /// The multinomial gradient is the derivative of the cross-entropy: checked against
    /// central finite differences at a point where every class has some probability.
    #[test]
    fn multinomial_gradient_matches_finite_differences() {
        let (x, y) = three_classes();
        let kind = ModelKind::Multinomial { classes: 3 };
        let w: Vec<f64> = (0..9).map(|i| (i as f64 * 0.37).sin()).collect();
        let g = loss_gradient(kind, &w, x.view(), y.view()).unwrap();
        let h = 1e-6;
        for i in 0..w.len() {
            let (mut up, mut down) = (w.clone(), w.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (mean_loss(kind, &up, x.view(), y.view()).unwrap()
                - mean_loss(kind, &down, x.view(), y.view()).unwrap())
                / (2.0 * h);
            assert!(
                (numeric - g[i]).abs() < 1e-6,
                "weight {i}: {numeric} vs {}",
                g[i]
            );
        }
        // The probabilities of each row sum to 1.
        let p = predict_proba(kind, &w, x.view()).unwrap();
        for row in p.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn multinomial_training_lowers_the_loss_and_separates_three_classes() {
        let (x, y) = three_classes();
        let kind = ModelKind::Multinomial { classes: 3 };
        let start = vec![0.0; kind.width(2)];
        let before = mean_loss(kind, &start, x.view(), y.view()).unwrap();
        assert!(
            (before - 3f64.ln()).abs() < 1e-12,
            "uniform at zero: {before}"
        );
        let params = TrainParams {
            local_epochs: 100,
            batch_size: 3,
            learning_rate: 0.5,
            l2: 0.0,
            ..TrainParams::default()
        };
        let w = train_local(kind, &start, x.view(), y.view(), &params).unwrap();
        let after = mean_loss(kind, &w, x.view(), y.view()).unwrap();
        assert!(after < 0.1 * before, "{before} -> {after}");
        let p = predict_proba(kind, &w, x.view()).unwrap();
        for (row, y) in p.rows().into_iter().zip(&y) {
            assert_eq!(crate::metrics::argmax(row.as_slice().unwrap()), *y as usize);
        }
    }

    /// With two classes the softmax is the logistic model: class 1's probability under
    /// blocks (0, w) is sigmoid(w·x + b), and the gradients agree on w's block.
    #[test]
    fn a_softmax_over_a_zero_block_is_the_logistic_model() {
        let (x, y) = separable();
        let w = [0.7, -0.4, 0.2];
        let logistic = predict(ModelKind::Logistic, &w, x.view()).unwrap();
        let mut blocks = vec![0.0; 3];
        blocks.extend(w);
        let p = softmax_rows(&blocks, x.view(), 2);
        for (a, b) in logistic.iter().zip(p.column(1)) {
            assert!((a - b).abs() < 1e-12);
        }
        let g1 = loss_gradient(ModelKind::Logistic, &w, x.view(), y.view()).unwrap();
        // Cross-entropy of softmax over (0, z) with class y: the same loss as the log loss.
        let two = ModelKind::Multinomial { classes: 2 };
        let g2 = loss_gradient(two, &blocks, x.view(), y.view()).unwrap();
        for i in 0..3 {
            assert!((g1[i] - g2[3 + i]).abs() < 1e-12);
            assert!(
                (g1[i] + g2[i]).abs() < 1e-12,
                "class 0's block moves the other way"
            );
        }
    }

    #[test]
    fn multinomial_inputs_are_checked() {
        let (x, mut y) = three_classes();
        let kind = ModelKind::Multinomial { classes: 3 };
        let p = TrainParams::default();
        assert!(matches!(
            train_local(kind, &[0.0; 3], x.view(), y.view(), &p),
            Err(TrainError::WidthMismatch { .. })
        ));
        y[4] = 3.0;
        assert!(matches!(
            train_local(kind, &[0.0; 9], x.view(), y.view(), &p),
            Err(TrainError::InvalidParam { name: "target", .. })
        ));
        y[4] = 1.5;
        assert!(train_local(kind, &[0.0; 9], x.view(), y.view(), &p).is_err());
        assert!(ModelKind::Multinomial { classes: 2 }.validate().is_err());
        assert!(ModelKind::Multinomial { classes: 33 }.validate().is_err());
        assert!(kind.validate().is_ok());
        // Huge logits do not overflow the softmax.
        let w = [1e6, 0.0, 0.0, -1e6, 0.0, 0.0, 0.0, 0.0, 0.0];
        let probs = predict_proba(kind, &w, x.view()).unwrap();
        assert!(probs.iter().all(|v| v.is_finite()));
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
