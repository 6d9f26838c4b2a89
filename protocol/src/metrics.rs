//! Model metrics: exact ones on rows held in one place ([`classification_metrics`],
//! [`regression_metrics`]) and a combinable [`Evaluation`] summary that each site computes on
//! its validation rows and the aggregator merges.
//!
//! A combined classification summary holds confusion counts at 0.5 and histograms of the
//! predicted probabilities of positives and negatives in [`SCORE_BINS`] equal bins; the
//! federated ROC AUC is computed from the histograms (pairs within one bin count one half),
//! so it differs from the exact AUC by at most the share of positive/negative pairs that
//! share a bin.
//!
//! A multinomial model's summary holds the K×K confusion matrix of the most probable class,
//! and per class the histograms of that class's predicted probability among the rows of the
//! class and among the other rows: each class's one-vs-rest ROC AUC follows as in the binary
//! case, and the macro AUC is their unweighted mean (scikit-learn's
//! `roc_auc_score(multi_class="ovr", average="macro")`).

use serde::{Deserialize, Serialize};

/// Bins of the score histograms in a classification [`Evaluation`].
pub const SCORE_BINS: usize = 100;

const EPS: f64 = 1e-15;

/// One row's log loss for probability `p` and label `y` in {0, 1}.
pub fn log_loss_term(p: f64, y: f64) -> f64 {
    let p = p.clamp(EPS, 1.0 - EPS);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

/// One row's cross-entropy for class probabilities `p` and the row's class index `y`
/// (the probability clamped to at least 1e-15).
pub fn cross_entropy_term(p: &[f64], y: f64) -> f64 {
    let c = y as usize;
    -p.get(c).copied().unwrap_or(0.0).clamp(EPS, 1.0).ln()
}

/// The index of the largest of `p` (the first of equal ones): the predicted class.
pub fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}

/// Undefined metrics (NaN, e.g. a sensitivity without positive rows) are written as JSON
/// `null` and read back as NaN.
pub(crate) mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Metrics of a classifier (logistic model) at the 0.5 threshold. Each is NaN (JSON `null`)
/// where undefined, e.g. a sensitivity without positive rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    /// The rows evaluated.
    pub rows: u64,
    /// Mean log loss (natural log; probabilities clamped to [1e-15, 1 − 1e-15]).
    #[serde(with = "nan_as_null")]
    pub log_loss: f64,
    /// Share of rows classified right.
    #[serde(with = "nan_as_null")]
    pub accuracy: f64,
    /// Area under the ROC curve (federated: from the score histograms, see the module docs).
    #[serde(with = "nan_as_null")]
    pub roc_auc: f64,
    /// True positive rate, `tp / (tp + fn)`.
    #[serde(with = "nan_as_null")]
    pub sensitivity: f64,
    /// True negative rate, `tn / (tn + fp)`.
    #[serde(with = "nan_as_null")]
    pub specificity: f64,
}

/// Metrics of a regression (linear model). NaN (JSON `null`) where undefined, e.g. without
/// rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RegressionMetrics {
    /// The rows evaluated.
    pub rows: u64,
    /// Root mean squared error, in the target's units.
    #[serde(with = "nan_as_null")]
    pub rmse: f64,
    /// Coefficient of determination, `1 − SSE / SST` (can be negative).
    #[serde(with = "nan_as_null")]
    pub r2: f64,
}

/// One class's figures in a multinomial model's metrics. NaN (JSON `null`) where
/// undefined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Rows of this class.
    pub support: u64,
    /// One-vs-rest ROC AUC of this class's predicted probability.
    #[serde(with = "nan_as_null")]
    pub roc_auc: f64,
    /// Share of this class's rows predicted as this class (its sensitivity).
    #[serde(with = "nan_as_null")]
    pub recall: f64,
    /// Share of the rows predicted as this class that are of it.
    #[serde(with = "nan_as_null")]
    pub precision: f64,
}

/// Metrics of a multinomial model; the predicted class is the most probable one. NaN (JSON
/// `null`) where undefined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MulticlassMetrics {
    /// The rows evaluated.
    pub rows: u64,
    /// Mean cross-entropy (natural log; probabilities clamped to at least 1e-15).
    #[serde(with = "nan_as_null")]
    pub log_loss: f64,
    /// Share of rows classified right.
    #[serde(with = "nan_as_null")]
    pub accuracy: f64,
    /// The unweighted mean of the classes' one-vs-rest ROC AUCs (over the classes where it
    /// is defined).
    #[serde(with = "nan_as_null")]
    pub macro_auc: f64,
    /// Per class, in the study's class order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[actual][predicted]`: rows of each class by the class predicted.
    pub confusion: Vec<Vec<u64>>,
}

/// A model's metrics, by task (JSON: tagged with `"task"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Metrics {
    /// For a logistic model.
    Classification(ClassificationMetrics),
    /// For a linear model.
    Regression(RegressionMetrics),
    /// For a multinomial model.
    Multiclass(MulticlassMetrics),
}

impl Metrics {
    /// The rows evaluated.
    pub fn rows(&self) -> u64 {
        match self {
            Metrics::Classification(m) => m.rows,
            Metrics::Regression(m) => m.rows,
            Metrics::Multiclass(m) => m.rows,
        }
    }

    /// The headline figure: ROC AUC for classification, R² for regression, the macro
    /// one-vs-rest AUC for a multinomial model.
    pub fn headline(&self) -> (&'static str, f64) {
        match self {
            Metrics::Classification(m) => ("AUC", m.roc_auc),
            Metrics::Regression(m) => ("R2", m.r2),
            Metrics::Multiclass(m) => ("macro AUC", m.macro_auc),
        }
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        f64::NAN
    } else {
        num as f64 / den as f64
    }
}

/// Exact ROC AUC (Mann–Whitney U, ties count one half). NaN if a class is absent.
pub fn roc_auc(scores: &[f64], labels: &[f64]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum_pos, mut n_pos) = (0.0, 0u64);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] > 0.5 {
                rank_sum_pos += avg_rank;
                n_pos += 1;
            }
        }
        i = j + 1;
    }
    let n_neg = scores.len() as u64 - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    let np = n_pos as f64;
    (rank_sum_pos - np * (np + 1.0) / 2.0) / (np * n_neg as f64)
}

/// The ROC curve's points (false positive rate, true positive rate), from (0, 0) to (1, 1),
/// one step per distinct score.
pub fn roc_points(scores: &[f64], labels: &[f64]) -> Vec<(f64, f64)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let pos = labels.iter().filter(|y| **y > 0.5).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return Vec::new();
    }
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut points = vec![(0.0, 0.0)];
    for (k, &i) in idx.iter().enumerate() {
        if labels[i] > 0.5 {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_tie = idx.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            points.push((fp / neg, tp / pos));
        }
    }
    points
}

/// Exact classification metrics for probabilities `p` and labels `y` in {0, 1}.
pub fn classification_metrics(p: &[f64], y: &[f64]) -> ClassificationMetrics {
    let (mut tp, mut tn, mut fp, mut fn_) = (0u64, 0u64, 0u64, 0u64);
    let mut loss = 0.0;
    for (p, y) in p.iter().zip(y) {
        loss += log_loss_term(*p, *y);
        match (*p >= 0.5, *y > 0.5) {
            (true, true) => tp += 1,
            (false, false) => tn += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
        }
    }
    let n = p.len() as u64;
    ClassificationMetrics {
        rows: n,
        log_loss: if n == 0 { f64::NAN } else { loss / n as f64 },
        accuracy: ratio(tp + tn, n),
        roc_auc: roc_auc(p, y),
        sensitivity: ratio(tp, tp + fn_),
        specificity: ratio(tn, tn + fp),
    }
}

/// Exact regression metrics for predictions `p` and targets `y`.
pub fn regression_metrics(p: &[f64], y: &[f64]) -> RegressionMetrics {
    let mut e = Evaluation::empty(crate::model::ModelKind::Linear);
    e.add_rows(p, y);
    match e.metrics() {
        Metrics::Regression(m) => m,
        _ => unreachable!("a linear evaluation yields regression metrics"),
    }
}

/// Exact metrics of a model of `kind` from its predictions `p` (as [`crate::model::predict`]
/// gives them) and the targets `y`.
pub fn exact_metrics(kind: crate::model::ModelKind, p: &[f64], y: &[f64]) -> Metrics {
    match kind {
        crate::model::ModelKind::Logistic => Metrics::Classification(classification_metrics(p, y)),
        crate::model::ModelKind::Linear => Metrics::Regression(regression_metrics(p, y)),
        crate::model::ModelKind::Multinomial { .. } => {
            Metrics::Multiclass(multiclass_metrics(p, y, kind.outputs()))
        }
    }
}

/// Exact metrics of a multinomial model: `p` holds each row's K class probabilities, row
/// after row, and `y` each row's class index. Each class's AUC is [`roc_auc`] of its
/// probability, one class against the rest.
pub fn multiclass_metrics(p: &[f64], y: &[f64], classes: usize) -> MulticlassMetrics {
    let k = classes.max(1);
    let mut e = Evaluation::empty(crate::model::ModelKind::Multinomial {
        classes: u8::try_from(k).unwrap_or(u8::MAX),
    });
    e.add_rows(p, y);
    let Metrics::Multiclass(mut m) = e.metrics() else {
        // A multinomial evaluation always yields multiclass metrics.
        return MulticlassMetrics {
            rows: 0,
            log_loss: f64::NAN,
            accuracy: f64::NAN,
            macro_auc: f64::NAN,
            per_class: Vec::new(),
            confusion: Vec::new(),
        };
    };
    let mut aucs = Vec::with_capacity(k);
    for (c, class) in m.per_class.iter_mut().enumerate() {
        let scores: Vec<f64> = p.chunks_exact(k).map(|row| row[c]).collect();
        let labels: Vec<f64> = y
            .iter()
            .map(|v| f64::from(u8::from(*v as usize == c)))
            .collect();
        class.roc_auc = roc_auc(&scores, &labels);
        aucs.push(class.roc_auc);
    }
    m.macro_auc = mean_defined(&aucs);
    m
}

/// The mean of the finite values (NaN if none).
fn mean_defined(v: &[f64]) -> f64 {
    let defined: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if defined.is_empty() {
        f64::NAN
    } else {
        defined.iter().sum::<f64>() / defined.len() as f64
    }
}

/// ROC AUC from the score histograms of positives and negatives: P(score_pos > score_neg)
/// + 0.5 P(same bin). NaN if either is empty.
fn histogram_auc(positive_scores: &[u64], negative_scores: &[u64]) -> f64 {
    let (n_pos, n_neg) = (
        positive_scores
            .iter()
            .fold(0u64, |a, b| a.saturating_add(*b)),
        negative_scores
            .iter()
            .fold(0u64, |a, b| a.saturating_add(*b)),
    );
    let mut neg_below = 0u64;
    let mut wins = 0.0;
    for (p, n) in positive_scores.iter().zip(negative_scores) {
        wins += *p as f64 * (neg_below as f64 + 0.5 * *n as f64);
        neg_below = neg_below.saturating_add(*n);
    }
    if n_pos == 0 || n_neg == 0 {
        f64::NAN
    } else {
        wins / (n_pos as f64 * n_neg as f64)
    }
}

/// A site's evaluation of one model on its validation rows, in a form that sums across sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Evaluation {
    /// For a logistic model: counts at the 0.5 threshold and score histograms.
    Classification {
        /// Rows evaluated.
        rows: u64,
        /// Sum of the rows' log losses.
        log_loss_sum: f64,
        /// Positive rows predicted positive.
        tp: u64,
        /// Negative rows predicted negative.
        tn: u64,
        /// Negative rows predicted positive.
        fp: u64,
        /// Positive rows predicted negative.
        fn_: u64,
        /// Histogram of predicted probabilities of positive rows ([`SCORE_BINS`] bins).
        positive_scores: Vec<u64>,
        /// Histogram of predicted probabilities of negative rows ([`SCORE_BINS`] bins).
        negative_scores: Vec<u64>,
    },
    /// For a multinomial model of K classes: the confusion matrix of the most probable
    /// class and, per class, histograms of its probability.
    Multiclass {
        /// Rows evaluated.
        rows: u64,
        /// Sum of the rows' cross-entropies.
        log_loss_sum: f64,
        /// K×K counts, row after row: `confusion[actual · K + predicted]`.
        confusion: Vec<u64>,
        /// Per class c, in order: the histogram ([`SCORE_BINS`] bins) of the probability of
        /// c among the rows of class c, then among the other rows (`2 · K · SCORE_BINS`).
        class_scores: Vec<u64>,
    },
    /// For a linear model: sums from which RMSE and R² follow.
    Regression {
        /// Rows evaluated.
        rows: u64,
        /// Sum of squared prediction errors.
        sum_sq_error: f64,
        /// Sum of the targets.
        sum_y: f64,
        /// Sum of the targets' squares.
        sum_y_sq: f64,
    },
}

/// Why a peer's [`Evaluation`] cannot be merged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EvaluationError {
    /// The two summaries are of different tasks, or of different class counts.
    #[error("cannot combine evaluations of different kinds of model")]
    KindMismatch,
    /// A score histogram does not have [`SCORE_BINS`] bins.
    #[error("score histogram has {got} bins, expected {SCORE_BINS}")]
    WrongBins {
        /// The histogram's bins.
        got: usize,
    },
    /// A sum is NaN or infinite.
    #[error("evaluation holds a non-finite value")]
    NotFinite,
    /// The confusion counts or the histograms do not add up to the row count (or overflow).
    #[error("evaluation counts do not add up to its row count")]
    Inconsistent,
}

fn bin(p: f64) -> usize {
    ((p.clamp(0.0, 1.0) * SCORE_BINS as f64) as usize).min(SCORE_BINS - 1)
}

impl Evaluation {
    /// An evaluation of no rows, for a model of `kind`.
    pub fn empty(kind: crate::model::ModelKind) -> Evaluation {
        match kind {
            crate::model::ModelKind::Logistic => Evaluation::Classification {
                rows: 0,
                log_loss_sum: 0.0,
                tp: 0,
                tn: 0,
                fp: 0,
                fn_: 0,
                positive_scores: vec![0; SCORE_BINS],
                negative_scores: vec![0; SCORE_BINS],
            },
            crate::model::ModelKind::Linear => Evaluation::Regression {
                rows: 0,
                sum_sq_error: 0.0,
                sum_y: 0.0,
                sum_y_sq: 0.0,
            },
            crate::model::ModelKind::Multinomial { classes } => {
                let k = usize::from(classes);
                Evaluation::Multiclass {
                    rows: 0,
                    log_loss_sum: 0.0,
                    confusion: vec![0; k * k],
                    class_scores: vec![0; 2 * k * SCORE_BINS],
                }
            }
        }
    }

    /// The classes of a multiclass summary (0 for the others, or an inconsistent one).
    fn classes(&self) -> usize {
        match self {
            Evaluation::Multiclass { confusion, .. } => {
                let k = confusion.len().isqrt();
                if k * k == confusion.len() { k } else { 0 }
            }
            _ => 0,
        }
    }

    /// Adds rows with predictions `p` and targets `y`: for a multiclass summary of K classes
    /// `p` holds K probabilities per row, row after row (as [`crate::model::predict`] gives
    /// them), and `y` the class indices; a row whose class index is out of range is not
    /// counted.
    pub fn add_rows(&mut self, p: &[f64], y: &[f64]) {
        let k = self.classes();
        match self {
            Evaluation::Multiclass {
                rows,
                log_loss_sum,
                confusion,
                class_scores,
            } => {
                if k == 0 {
                    return;
                }
                for (p, y) in p.chunks_exact(k).zip(y) {
                    let actual = *y as usize;
                    if actual >= k || y.fract() != 0.0 || *y < 0.0 {
                        continue;
                    }
                    *rows += 1;
                    *log_loss_sum += cross_entropy_term(p, *y);
                    confusion[actual * k + argmax(p)] += 1;
                    for (c, pc) in p.iter().enumerate() {
                        let offset = (2 * c + usize::from(c != actual)) * SCORE_BINS;
                        class_scores[offset + bin(*pc)] += 1;
                    }
                }
            }
            Evaluation::Classification {
                rows,
                log_loss_sum,
                tp,
                tn,
                fp,
                fn_,
                positive_scores,
                negative_scores,
            } => {
                for (p, y) in p.iter().zip(y) {
                    *rows += 1;
                    *log_loss_sum += log_loss_term(*p, *y);
                    let positive = *y > 0.5;
                    match (*p >= 0.5, positive) {
                        (true, true) => *tp += 1,
                        (false, false) => *tn += 1,
                        (true, false) => *fp += 1,
                        (false, true) => *fn_ += 1,
                    }
                    let hist = if positive {
                        &mut *positive_scores
                    } else {
                        &mut *negative_scores
                    };
                    hist[bin(*p)] += 1;
                }
            }
            Evaluation::Regression {
                rows,
                sum_sq_error,
                sum_y,
                sum_y_sq,
            } => {
                for (p, y) in p.iter().zip(y) {
                    *rows += 1;
                    *sum_sq_error += (p - y).powi(2);
                    *sum_y += y;
                    *sum_y_sq += y * y;
                }
            }
        }
    }

    /// Checks a peer's evaluation before it is merged.
    pub fn validate(&self) -> Result<(), EvaluationError> {
        let k = self.classes();
        match self {
            Evaluation::Multiclass {
                rows,
                log_loss_sum,
                confusion,
                class_scores,
            } => {
                if !(crate::model::MIN_CLASSES..=crate::model::MAX_CLASSES).contains(&k) {
                    return Err(EvaluationError::Inconsistent);
                }
                if class_scores.len() != 2 * k * SCORE_BINS {
                    return Err(EvaluationError::WrongBins {
                        got: class_scores.len() / (2 * k),
                    });
                }
                if !log_loss_sum.is_finite() {
                    return Err(EvaluationError::NotFinite);
                }
                let total = |v: &[u64]| v.iter().try_fold(0u64, |a, b| a.checked_add(*b));
                if total(confusion) != Some(*rows) {
                    return Err(EvaluationError::Inconsistent);
                }
                // Each class's two histograms hold every row once.
                for c in class_scores.chunks_exact(2 * SCORE_BINS) {
                    if total(c) != Some(*rows) {
                        return Err(EvaluationError::Inconsistent);
                    }
                }
                Ok(())
            }
            Evaluation::Classification {
                rows,
                log_loss_sum,
                tp,
                tn,
                fp,
                fn_,
                positive_scores,
                negative_scores,
            } => {
                for h in [positive_scores, negative_scores] {
                    if h.len() != SCORE_BINS {
                        return Err(EvaluationError::WrongBins { got: h.len() });
                    }
                }
                if !log_loss_sum.is_finite() {
                    return Err(EvaluationError::NotFinite);
                }
                let confusion = [tp, tn, fp, fn_]
                    .iter()
                    .try_fold(0u64, |a, b| a.checked_add(**b));
                let hist = positive_scores
                    .iter()
                    .chain(negative_scores)
                    .try_fold(0u64, |a, b| a.checked_add(*b));
                if confusion != Some(*rows) || hist != Some(*rows) {
                    return Err(EvaluationError::Inconsistent);
                }
                Ok(())
            }
            Evaluation::Regression {
                sum_sq_error,
                sum_y,
                sum_y_sq,
                ..
            } => {
                if [sum_sq_error, sum_y, sum_y_sq]
                    .iter()
                    .all(|v| v.is_finite())
                {
                    Ok(())
                } else {
                    Err(EvaluationError::NotFinite)
                }
            }
        }
    }

    /// Adds another site's evaluation of the same model.
    pub fn merge(&mut self, other: &Evaluation) -> Result<(), EvaluationError> {
        other.validate()?;
        match (self, other) {
            (
                Evaluation::Classification {
                    rows,
                    log_loss_sum,
                    tp,
                    tn,
                    fp,
                    fn_,
                    positive_scores,
                    negative_scores,
                },
                Evaluation::Classification {
                    rows: r2,
                    log_loss_sum: l2,
                    tp: tp2,
                    tn: tn2,
                    fp: fp2,
                    fn_: fn2,
                    positive_scores: ps2,
                    negative_scores: ns2,
                },
            ) => {
                *rows = rows.saturating_add(*r2);
                *log_loss_sum += l2;
                *tp = tp.saturating_add(*tp2);
                *tn = tn.saturating_add(*tn2);
                *fp = fp.saturating_add(*fp2);
                *fn_ = fn_.saturating_add(*fn2);
                for (a, b) in positive_scores.iter_mut().zip(ps2) {
                    *a = a.saturating_add(*b);
                }
                for (a, b) in negative_scores.iter_mut().zip(ns2) {
                    *a = a.saturating_add(*b);
                }
                Ok(())
            }
            (
                Evaluation::Regression {
                    rows,
                    sum_sq_error,
                    sum_y,
                    sum_y_sq,
                },
                Evaluation::Regression {
                    rows: r2,
                    sum_sq_error: e2,
                    sum_y: y2,
                    sum_y_sq: q2,
                },
            ) => {
                *rows = rows.saturating_add(*r2);
                *sum_sq_error += e2;
                *sum_y += y2;
                *sum_y_sq += q2;
                Ok(())
            }
            (
                Evaluation::Multiclass {
                    rows,
                    log_loss_sum,
                    confusion,
                    class_scores,
                },
                Evaluation::Multiclass {
                    rows: r2,
                    log_loss_sum: l2,
                    confusion: c2,
                    class_scores: s2,
                },
            ) if confusion.len() == c2.len() && class_scores.len() == s2.len() => {
                *rows = rows.saturating_add(*r2);
                *log_loss_sum += l2;
                for (a, b) in confusion
                    .iter_mut()
                    .zip(c2)
                    .chain(class_scores.iter_mut().zip(s2))
                {
                    *a = a.saturating_add(*b);
                }
                Ok(())
            }
            _ => Err(EvaluationError::KindMismatch),
        }
    }

    /// The rows evaluated.
    pub fn rows(&self) -> u64 {
        match self {
            Evaluation::Classification { rows, .. }
            | Evaluation::Regression { rows, .. }
            | Evaluation::Multiclass { rows, .. } => *rows,
        }
    }

    /// The metrics these counts and sums give (NaN where undefined).
    pub fn metrics(&self) -> Metrics {
        match self {
            Evaluation::Classification {
                rows,
                log_loss_sum,
                tp,
                tn,
                fp,
                fn_,
                positive_scores,
                negative_scores,
            } => {
                let auc = histogram_auc(positive_scores, negative_scores);
                Metrics::Classification(ClassificationMetrics {
                    rows: *rows,
                    log_loss: if *rows == 0 {
                        f64::NAN
                    } else {
                        log_loss_sum / *rows as f64
                    },
                    accuracy: ratio(tp.saturating_add(*tn), *rows),
                    roc_auc: auc,
                    sensitivity: ratio(*tp, tp.saturating_add(*fn_)),
                    specificity: ratio(*tn, tn.saturating_add(*fp)),
                })
            }
            Evaluation::Regression {
                rows,
                sum_sq_error,
                sum_y,
                sum_y_sq,
            } => {
                let n = *rows as f64;
                let (rmse, r2) = if *rows == 0 {
                    (f64::NAN, f64::NAN)
                } else {
                    let total = sum_y_sq - sum_y * sum_y / n;
                    (
                        (sum_sq_error / n).sqrt(),
                        if total > 0.0 {
                            1.0 - sum_sq_error / total
                        } else {
                            f64::NAN
                        },
                    )
                };
                Metrics::Regression(RegressionMetrics {
                    rows: *rows,
                    rmse,
                    r2,
                })
            }
            Evaluation::Multiclass {
                rows,
                log_loss_sum,
                confusion,
                class_scores,
            } => {
                let k = self.classes();
                let matrix: Vec<Vec<u64>> =
                    confusion.chunks(k.max(1)).map(<[u64]>::to_vec).collect();
                let sum = |v: &mut dyn Iterator<Item = u64>| v.fold(0u64, u64::saturating_add);
                let per_class: Vec<ClassMetrics> = (0..k)
                    .map(|c| {
                        let hist = &class_scores[2 * c * SCORE_BINS..2 * (c + 1) * SCORE_BINS];
                        let right = confusion[c * k + c];
                        let support = sum(&mut matrix[c].iter().copied());
                        let predicted = sum(&mut (0..k).map(|a| confusion[a * k + c]));
                        ClassMetrics {
                            support,
                            roc_auc: histogram_auc(&hist[..SCORE_BINS], &hist[SCORE_BINS..]),
                            recall: ratio(right, support),
                            precision: ratio(right, predicted),
                        }
                    })
                    .collect();
                let right = sum(&mut (0..k).map(|c| confusion[c * k + c]));
                let aucs: Vec<f64> = per_class.iter().map(|c| c.roc_auc).collect();
                Metrics::Multiclass(MulticlassMetrics {
                    rows: *rows,
                    log_loss: if *rows == 0 {
                        f64::NAN
                    } else {
                        log_loss_sum / *rows as f64
                    },
                    accuracy: ratio(right, *rows),
                    macro_auc: mean_defined(&aucs),
                    per_class,
                    confusion: matrix,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;

    #[test]
    fn undefined_metrics_survive_a_json_round_trip() {
        let m = Metrics::Classification(classification_metrics(&[0.2, 0.4], &[0.0, 0.0]));
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"sensitivity\":null"), "{json}");
        let Metrics::Classification(back) = serde_json::from_str::<Metrics>(&json).unwrap() else {
            panic!()
        };
        assert!(back.sensitivity.is_nan() && back.roc_auc.is_nan());
        assert_eq!(back.accuracy, 1.0);
    }

    /// Five rows of three classes (0, 2, 1, 2, 0), by hand. Class 0's scores: positives
    /// 0.2, 0.5 against negatives 0.2, 0.1, 0.3: (1.5 + 3) / 6 = 3/4. Class 1's: positive
    /// 0.6 against 0.7, 0.3, 0.2, 0.3: 3/4. Class 2's: positives 0.5, 0.5 against 0.1, 0.3,
    /// 0.2: 1. Macro: 5/6. Row 0 is predicted as class 1, the others right.
    #[test]
    fn multiclass_metrics_by_hand() {
        let p = [
            0.2, 0.7, 0.1, //
            0.2, 0.3, 0.5, //
            0.1, 0.6, 0.3, //
            0.3, 0.2, 0.5, //
            0.5, 0.3, 0.2,
        ];
        let y = [0.0, 2.0, 1.0, 2.0, 0.0];
        let m = multiclass_metrics(&p, &y, 3);
        assert_eq!(m.rows, 5);
        assert_eq!(
            m.confusion,
            vec![vec![1, 1, 0], vec![0, 1, 0], vec![0, 0, 2]]
        );
        assert!((m.accuracy - 0.8).abs() < 1e-12);
        let aucs: Vec<f64> = m.per_class.iter().map(|c| c.roc_auc).collect();
        assert_eq!(aucs, vec![0.75, 0.75, 1.0]);
        assert!((m.macro_auc - 5.0 / 6.0).abs() < 1e-12);
        let loss = -(0.2f64.ln() + 0.5f64.ln() + 0.6f64.ln() + 0.5f64.ln() + 0.5f64.ln()) / 5.0;
        assert!((m.log_loss - loss).abs() < 1e-12);
        assert_eq!(m.per_class[1].support, 1);
        assert_eq!(m.per_class[1].recall, 1.0);
        assert_eq!(m.per_class[1].precision, 0.5);
        assert_eq!(m.per_class[0].recall, 0.5);
        // The federated figures (score histograms) agree here: no positive and negative of
        // a class share a bin.
        let mut e = Evaluation::empty(ModelKind::Multinomial { classes: 3 });
        e.add_rows(&p, &y);
        let Metrics::Multiclass(f) = e.metrics() else {
            panic!()
        };
        assert!((f.macro_auc - m.macro_auc).abs() < 1e-12, "{f:?}");
        assert_eq!(f.confusion, m.confusion);
    }

    /// Sites' multiclass evaluations sum to the evaluation of their rows together, and a
    /// summary that does not add up, or of another class count, is refused.
    #[test]
    fn multiclass_evaluations_merge_and_are_checked() {
        let kind = ModelKind::Multinomial { classes: 3 };
        let p: Vec<f64> = (0..30)
            .flat_map(|i| {
                let a = (i as f64 * 0.13).sin().abs() + 0.1;
                let b = (i as f64 * 0.29).cos().abs() + 0.1;
                let s = a + b + 0.3;
                [a / s, b / s, 0.3 / s]
            })
            .collect();
        let y: Vec<f64> = (0..30).map(|i| f64::from(i % 3)).collect();
        let mut all = Evaluation::empty(kind);
        all.add_rows(&p, &y);
        let mut a = Evaluation::empty(kind);
        a.add_rows(&p[..36], &y[..12]);
        let mut b = Evaluation::empty(kind);
        b.add_rows(&p[36..], &y[12..]);
        a.merge(&b).unwrap();
        let loss = |e: &Evaluation| match e {
            Evaluation::Multiclass { log_loss_sum, .. } => *log_loss_sum,
            _ => f64::NAN,
        };
        assert!((loss(&a) - loss(&all)).abs() < 1e-9);
        if let Evaluation::Multiclass { log_loss_sum, .. } = &mut a {
            *log_loss_sum = loss(&all);
        }
        assert_eq!(a, all);
        assert!(all.validate().is_ok());
        // A row whose class is out of range is not counted.
        let mut c = Evaluation::empty(kind);
        c.add_rows(&p[..6], &[0.0, 5.0]);
        assert_eq!(c.rows(), 1);
        let Evaluation::Multiclass { confusion, .. } = &mut c else {
            panic!()
        };
        confusion[0] += 1;
        assert_eq!(c.validate(), Err(EvaluationError::Inconsistent));
        let other = Evaluation::empty(ModelKind::Multinomial { classes: 4 });
        assert_eq!(
            all.clone().merge(&other),
            Err(EvaluationError::KindMismatch)
        );
        assert_eq!(
            all.clone().merge(&Evaluation::empty(ModelKind::Logistic)),
            Err(EvaluationError::KindMismatch)
        );
    }

    #[test]
    fn exact_auc_matches_hand_computation() {
        // Pairs (pos, neg): (0.9 > 0.3), (0.9 > 0.5), (0.4 > 0.3), (0.4 < 0.5) → 3/4.
        assert_eq!(roc_auc(&[0.9, 0.4, 0.3, 0.5], &[1.0, 1.0, 0.0, 0.0]), 0.75);
        // A tie counts one half.
        assert_eq!(roc_auc(&[0.5, 0.5], &[1.0, 0.0]), 0.5);
        assert!(roc_auc(&[0.5, 0.6], &[1.0, 1.0]).is_nan());
    }

    #[test]
    fn roc_points_by_hand() {
        let pts = roc_points(&[0.9, 0.4, 0.3, 0.5], &[1.0, 1.0, 0.0, 0.0]);
        assert_eq!(
            pts,
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        // The area under the points is the AUC.
        let area: f64 = pts
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
            .sum();
        assert_eq!(area, roc_auc(&[0.9, 0.4, 0.3, 0.5], &[1.0, 1.0, 0.0, 0.0]));
    }

    #[test]
    fn classification_metrics_by_hand() {
        let p = [0.9, 0.2, 0.6, 0.1];
        let y = [1.0, 1.0, 0.0, 0.0];
        let m = classification_metrics(&p, &y);
        assert_eq!(m.accuracy, 0.5);
        assert_eq!(m.sensitivity, 0.5);
        assert_eq!(m.specificity, 0.5);
        assert_eq!(m.roc_auc, 0.75);
        let want = -(0.9f64.ln() + 0.2f64.ln() + 0.4f64.ln() + 0.9f64.ln()) / 4.0;
        assert!((m.log_loss - want).abs() < 1e-12);
    }

    #[test]
    fn merged_site_evaluations_match_pooled_metrics() {
        let p = [0.91, 0.22, 0.63, 0.14, 0.75, 0.48, 0.33, 0.86];
        let y = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let mut a = Evaluation::empty(ModelKind::Logistic);
        a.add_rows(&p[..3], &y[..3]);
        let mut b = Evaluation::empty(ModelKind::Logistic);
        b.add_rows(&p[3..], &y[3..]);
        a.merge(&b).unwrap();
        let (Metrics::Classification(fed), exact) = (a.metrics(), classification_metrics(&p, &y))
        else {
            panic!("classification expected")
        };
        assert_eq!(fed.accuracy, exact.accuracy);
        assert!((fed.log_loss - exact.log_loss).abs() < 1e-12);
        // Scores are in distinct bins here, so the histogram AUC is exact.
        assert!((fed.roc_auc - exact.roc_auc).abs() < 1e-12);
    }

    #[test]
    fn regression_metrics_by_hand() {
        let m = regression_metrics(&[1.0, 2.0, 3.0], &[1.0, 2.0, 4.0]);
        assert!((m.rmse - (1.0f64 / 3.0).sqrt()).abs() < 1e-12);
        // total SS of y = 14/3 ... r2 = 1 - 1 / (4.6667)
        assert!((m.r2 - (1.0 - 1.0 / (14.0 / 3.0))).abs() < 1e-12);
    }

    #[test]
    fn hostile_evaluations_are_refused() {
        let mut a = Evaluation::empty(ModelKind::Logistic);
        let mut wrong_bins = Evaluation::empty(ModelKind::Logistic);
        if let Evaluation::Classification {
            positive_scores, ..
        } = &mut wrong_bins
        {
            positive_scores.push(0);
        }
        assert_eq!(
            a.merge(&wrong_bins),
            Err(EvaluationError::WrongBins {
                got: SCORE_BINS + 1
            })
        );
        let mut liar = Evaluation::empty(ModelKind::Logistic);
        if let Evaluation::Classification { rows, .. } = &mut liar {
            *rows = 5;
        }
        assert_eq!(a.merge(&liar), Err(EvaluationError::Inconsistent));
        assert_eq!(
            a.merge(&Evaluation::empty(ModelKind::Linear)),
            Err(EvaluationError::KindMismatch)
        );
    }
}
