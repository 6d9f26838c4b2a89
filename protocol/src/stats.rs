//! Feature statistics that combine across sites: counts, sums and sums of squares.
//!
//! A node reports [`FeatureStats`] over its training rows; the aggregator merges them and
//! derives the federation-wide [`Standardization`]. No single value ever leaves a node.

use serde::{Deserialize, Serialize};

/// Per-feature count, sum and sum of squares over one or more sites' training rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    /// Rows counted.
    pub count: u64,
    /// Per feature: the sum of its values.
    pub sum: Vec<f64>,
    /// Per feature: the sum of its values' squares.
    pub sum_sq: Vec<f64>,
    /// Per feature: the rows where it is present (not missing, before imputation); empty
    /// when every row has every feature.
    #[serde(default)]
    pub present: Vec<u64>,
}

/// Why feature statistics cannot be merged or standardized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum StatsError {
    /// A peer's statistics have another number of features.
    #[error("feature statistics have {got} features, expected {expected}")]
    WrongWidth {
        /// The peer's feature count.
        got: usize,
        /// The study's.
        expected: usize,
    },
    /// A sum is NaN or infinite.
    #[error("feature statistics contain a non-finite value")]
    NotFinite,
    /// No row was counted.
    #[error("no rows: cannot standardize")]
    Empty,
    /// A feature is present in more rows than were counted.
    #[error("feature statistics count a feature in more rows than they hold")]
    Inconsistent,
}

impl FeatureStats {
    /// Statistics of no rows over `features` features.
    pub fn empty(features: usize) -> Self {
        FeatureStats {
            count: 0,
            sum: vec![0.0; features],
            sum_sq: vec![0.0; features],
            present: vec![0; features],
        }
    }

    /// Statistics of the rows of `x` (rows × features); a NaN is a missing value, left out
    /// of its feature's sums and present count.
    pub fn from_rows(x: ndarray::ArrayView2<'_, f64>) -> Self {
        let mut s = FeatureStats::empty(x.ncols());
        for row in x.rows() {
            for (j, v) in row.iter().enumerate() {
                if v.is_nan() {
                    continue;
                }
                s.sum[j] += v;
                s.sum_sq[j] += v * v;
                s.present[j] += 1;
            }
        }
        s.count = x.nrows() as u64;
        s
    }

    /// Checks a peer's statistics before they are merged.
    pub fn validate(&self, features: usize) -> Result<(), StatsError> {
        if self.sum.len() != features || self.sum_sq.len() != features {
            return Err(StatsError::WrongWidth {
                got: self.sum.len().max(self.sum_sq.len()),
                expected: features,
            });
        }
        if self.sum.iter().chain(&self.sum_sq).any(|v| !v.is_finite()) {
            return Err(StatsError::NotFinite);
        }
        if !self.present.is_empty() && self.present.len() != features {
            return Err(StatsError::WrongWidth {
                got: self.present.len(),
                expected: features,
            });
        }
        if self.present.iter().any(|p| *p > self.count) {
            return Err(StatsError::Inconsistent);
        }
        Ok(())
    }

    /// Rows where feature `j` is present.
    pub fn present(&self, j: usize) -> u64 {
        self.present.get(j).copied().unwrap_or(self.count)
    }

    /// Adds a peer's statistics to these, after [`FeatureStats::validate`].
    pub fn merge(&mut self, other: &FeatureStats) -> Result<(), StatsError> {
        other.validate(self.sum.len())?;
        if !(self.present.is_empty() && other.present.is_empty()) {
            self.present = (0..self.sum.len())
                .map(|j| self.present(j).saturating_add(other.present(j)))
                .collect();
        }
        self.count = self.count.saturating_add(other.count);
        for j in 0..self.sum.len() {
            self.sum[j] += other.sum[j];
            self.sum_sq[j] += other.sum_sq[j];
        }
        Ok(())
    }

    /// Mean and (population) standard deviation per feature, over the rows where it is
    /// present. A constant feature (or one present nowhere: mean 0) gets a standard
    /// deviation of 1 so that standardizing it is the identity shift.
    pub fn standardization(&self) -> Result<Standardization, StatsError> {
        if self.count == 0 {
            return Err(StatsError::Empty);
        }
        let n = |j: usize| (self.present(j) as f64).max(1.0);
        let mean: Vec<f64> = self.sum.iter().enumerate().map(|(j, s)| s / n(j)).collect();
        let std = self
            .sum_sq
            .iter()
            .zip(&mean)
            .enumerate()
            .map(|(j, (sq, m))| {
                let var = (sq / n(j) - m * m).max(0.0);
                let sd = var.sqrt();
                if sd > 1e-12 { sd } else { 1.0 }
            })
            .collect();
        Ok(Standardization { mean, std })
    }
}

/// Feature-wise affine standardization `(x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardization {
    /// Per feature: the mean subtracted.
    pub mean: Vec<f64>,
    /// Per feature: the standard deviation divided by (1 for a constant feature).
    pub std: Vec<f64>,
}

impl Standardization {
    /// The standardization that changes nothing, for `features` features.
    pub fn identity(features: usize) -> Self {
        Standardization {
            mean: vec![0.0; features],
            std: vec![1.0; features],
        }
    }

    /// Standardizes `x` in place. The caller guarantees `x.ncols() == self.mean.len()`.
    pub fn apply(&self, x: &mut ndarray::Array2<f64>) {
        for mut row in x.rows_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - self.mean[j]) / self.std[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn merged_stats_equal_pooled_stats() {
        let a = array![[1.0, 10.0], [2.0, 20.0]];
        let b = array![[3.0, 30.0], [4.0, 40.0], [5.0, 50.0]];
        let mut merged = FeatureStats::from_rows(a.view());
        merged.merge(&FeatureStats::from_rows(b.view())).unwrap();
        let pooled = FeatureStats::from_rows(
            ndarray::concatenate(ndarray::Axis(0), &[a.view(), b.view()])
                .unwrap()
                .view(),
        );
        assert_eq!(merged, pooled);
        let s = merged.standardization().unwrap();
        assert!((s.mean[0] - 3.0).abs() < 1e-12);
        assert!((s.std[0] - 2f64.sqrt()).abs() < 1e-12);
        assert!((s.std[1] - 10.0 * 2f64.sqrt()).abs() < 1e-9);
    }

    #[test]
    fn hostile_stats_are_refused() {
        let mut s = FeatureStats::empty(2);
        let wrong = FeatureStats::empty(3);
        assert!(matches!(
            s.merge(&wrong),
            Err(StatsError::WrongWidth { .. })
        ));
        let mut nan = FeatureStats::empty(2);
        nan.sum[1] = f64::NAN;
        assert_eq!(s.merge(&nan), Err(StatsError::NotFinite));
        assert_eq!(s.standardization(), Err(StatsError::Empty));
    }

    #[test]
    fn constant_feature_keeps_unit_scale() {
        let s = FeatureStats::from_rows(array![[7.0], [7.0]].view())
            .standardization()
            .unwrap();
        assert_eq!(s.std, vec![1.0]);
    }
}
