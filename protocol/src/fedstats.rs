//! Federated descriptive statistics: a query (cohort filter, columns with bounds and
//! histogram edges), the vector each site contributes, and the released result with
//! differential-privacy noise, stated errors and small-cell suppression.
//!
//! A site's vector, for `p` columns, with every value clipped to its column's bounds:
//!
//! ```text
//! [ n | per column j: Σx_j, Σx_j², histogram counts | per pair j<k: Σx_j·x_k ]
//! ```
//!
//! followed by the rows of the cohort left out for a missing value: how many, and how many
//! lack each column of [`StatsQuery::missing_columns`] (`[ left out | per column ]`).
//!
//! Each entry is divided by its *unit*, the most one patient can change it (1 for counts,
//! `max|x_j|` for sums, `max x_j²` for sums of squares, `max|x_j|·max|x_k|` for
//! cross-products). In units, adding or removing one patient changes the vector by at most
//! `√(1 + 3p + p(p−1)/2)` in L2 norm (one histogram bin per column); a patient left out
//! for missing values changes only the left-out entries, by at most `√(1 + m)` for `m`
//! missing columns. The larger of the two is the sensitivity the Gaussian noise is
//! calibrated to (the first, unless the cohort filter names many other columns).

use serde::{Deserialize, Serialize};

/// A comparison in a cohort filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmpOp {
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
    /// `==` (numbers or text)
    #[serde(rename = "==")]
    Eq,
    /// `!=` (numbers or text)
    #[serde(rename = "!=")]
    Ne,
}

/// `column op value`; a row is in the cohort when every condition holds. Text columns
/// compare as equal or not to `text`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The column compared.
    pub column: String,
    /// The comparison.
    pub op: CmpOp,
    /// The number to compare with (exactly one of `value` and `text` is set).
    #[serde(default)]
    pub value: Option<f64>,
    /// The text to compare with, for `==` and `!=` only (the cell is trimmed first).
    #[serde(default)]
    pub text: Option<String>,
}

impl Condition {
    /// Whether a cell holds: numbers compare with `value`, text with `text` (== and !=).
    pub fn holds(&self, cell: &str) -> bool {
        let cell = cell.trim();
        if let Some(t) = &self.text {
            return match self.op {
                CmpOp::Eq => cell == t,
                CmpOp::Ne => cell != t,
                _ => false,
            };
        }
        let (Some(v), Ok(x)) = (self.value, cell.parse::<f64>()) else {
            return false;
        };
        match self.op {
            CmpOp::Lt => x < v,
            CmpOp::Le => x <= v,
            CmpOp::Gt => x > v,
            CmpOp::Ge => x >= v,
            CmpOp::Eq => x == v,
            CmpOp::Ne => x != v,
        }
    }
}

/// A column to describe: values are clipped to `[low, high]`; the histogram has the bins
/// between consecutive `edges` (from `low` to `high`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatColumn {
    /// The column's name in the dataset.
    pub name: String,
    /// The lowest value counted: lower values are clipped to it. Part of the sensitivity.
    pub low: f64,
    /// The highest value counted: higher values are clipped to it. Part of the sensitivity.
    pub high: f64,
    /// The histogram's bin edges, strictly rising from `low` to `high` (the last bin includes
    /// `high`).
    pub edges: Vec<f64>,
}

impl StatColumn {
    fn bins(&self) -> usize {
        self.edges.len() - 1
    }

    fn bin(&self, x: f64) -> usize {
        // The last bin includes `high`.
        let i = self.edges.partition_point(|e| *e <= x);
        i.clamp(1, self.bins()) - 1
    }

    fn max_abs(&self) -> f64 {
        self.low.abs().max(self.high.abs()).max(f64::MIN_POSITIVE)
    }
}

/// One statistics query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsQuery {
    /// The query's id, unique in the consortium (it plays the part of a study id).
    pub query_id: String,
    /// The name of the sites' dataset to query.
    pub dataset: String,
    /// The rows described: those for which every condition holds (all rows when empty).
    pub cohort: Vec<Condition>,
    /// The columns to describe, in the release's order.
    pub columns: Vec<StatColumn>,
    /// Whether to release the Pearson correlations of every pair of columns.
    pub correlations: bool,
    /// Gaussian noise multiplier over the sensitivity (in units); absent: no DP.
    pub noise_multiplier: Option<f64>,
    /// Cells (counts) below this are not released (CMS: 11).
    pub suppress_below: u64,
    /// Kaplan–Meier curves of the cohort (and a log-rank test across strata); with `cox`,
    /// the time, event and strata of the Cox model instead.
    pub survival: Option<Box<crate::survival::Survival>>,
    /// A Cox model of the survival part's time and event, fitted over several iterations
    /// (each a [`crate::messages::StatisticsQuery`] with its step), exact only.
    pub cox: Option<crate::cox::Cox>,
    /// Gradient-boosted trees predicting a target from features, grown over many steps
    /// (each a [`crate::messages::StatisticsQuery`] with its step), exact only.
    pub trees: Option<Box<crate::trees::Boosting>>,
}

/// [`StatsQuery`] as protocol 4 had it, for [`StatsQuery::approval_hash`].
#[derive(Serialize)]
struct StatsQueryV4<'a> {
    query_id: &'a str,
    dataset: &'a str,
    cohort: &'a [Condition],
    columns: &'a [StatColumn],
    correlations: bool,
    noise_multiplier: Option<f64>,
    suppress_below: u64,
}

impl StatsQuery {
    /// The SHA-256 (hex) that a site's operator approves an exact query by, over its wire
    /// encoding. A query without a survival part is hashed in protocol 4's layout, so that
    /// a query approved before survival queries existed keeps its hash.
    pub fn approval_hash(&self) -> String {
        let bytes = if self.survival.is_none() && self.cox.is_none() && self.trees.is_none() {
            postcard::to_allocvec(&StatsQueryV4 {
                query_id: &self.query_id,
                dataset: &self.dataset,
                cohort: &self.cohort,
                columns: &self.columns,
                correlations: self.correlations,
                noise_multiplier: self.noise_multiplier,
                suppress_below: self.suppress_below,
            })
        } else {
            postcard::to_allocvec(self)
        };
        crate::audit::sha256_hex(&bytes.unwrap_or_default())
    }

    /// Checks the query before it is sent or answered: at least one column, `low < high` and
    /// rising edges from `low` to `high` for each, conditions with a number or a text (text with
    /// `==`/`!=` only), a noise multiplier of at least 0.3 if any, and `suppress_below` ≥ 1.
    pub fn validate(&self) -> Result<(), String> {
        if self.columns.is_empty() && self.survival.is_none() && self.trees.is_none() {
            return Err("names no column (and asks for no survival curve or model)".into());
        }
        if let Some(s) = &self.survival {
            s.validate()?;
        }
        if let Some(t) = &self.trees {
            t.validate()?;
            if self.noise_multiplier.is_some() && t.loss != crate::trees::Loss::Logistic {
                return Err(
                    "differential privacy for boosted trees needs the logistic loss (the \
                     squared loss's gradients are not bounded): make the query exact"
                        .into(),
                );
            }
            if self.survival.is_some()
                || self.cox.is_some()
                || !self.columns.is_empty()
                || self.correlations
            {
                return Err(
                    "a boosted-trees query asks for nothing else: make those a query of their own"
                        .into(),
                );
            }
        }
        if let Some(c) = &self.cox {
            c.validate()?;
            if self.survival.is_none() {
                return Err("a Cox model needs a survival part (time, event, grid)".into());
            }
            if self.noise_multiplier.is_some() {
                return Err(
                    "a Cox model is fitted from exact sums only (differential privacy for Cox \
                     models is not built): make the query exact"
                        .into(),
                );
            }
            if !self.columns.is_empty() || self.correlations {
                return Err(
                    "a Cox query describes no columns: make those a query of their own".into(),
                );
            }
        }
        for c in &self.columns {
            if !(c.low.is_finite() && c.high.is_finite() && c.low < c.high) {
                return Err(format!("column '{}': needs low < high", c.name));
            }
            if c.edges.len() < 2
                || c.edges
                    .windows(2)
                    .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
                || c.edges[0] != c.low
                || c.edges[c.edges.len() - 1] != c.high
            {
                return Err(format!(
                    "column '{}': histogram edges must rise from low ({}) to high ({})",
                    c.name, c.low, c.high
                ));
            }
        }
        for cond in &self.cohort {
            if cond.value.is_some() == cond.text.is_some() {
                return Err(format!(
                    "cohort condition on '{}': give value (a number) or text, not both",
                    cond.column
                ));
            }
            if cond.text.is_some() && !matches!(cond.op, CmpOp::Eq | CmpOp::Ne) {
                return Err(format!(
                    "cohort condition on '{}': text compares with == or != only",
                    cond.column
                ));
            }
        }
        if let Some(z) = self.noise_multiplier
            && !(z.is_finite() && z >= 0.3)
        {
            return Err(format!("noise_multiplier {z} must be at least 0.3"));
        }
        if self.suppress_below == 0 {
            return Err("suppress_below must be at least 1".into());
        }
        Ok(())
    }

    fn pairs(&self) -> usize {
        let p = self.columns.len();
        if self.correlations {
            p * (p - 1) / 2
        } else {
            0
        }
    }

    /// The columns whose missing values leave a row out, in the vector's order: the
    /// described columns, then the cohort filter's other columns.
    pub fn missing_columns(&self) -> Vec<String> {
        let mut names: Vec<String> = self.columns.iter().map(|c| c.name.clone()).collect();
        let covariates = self
            .cox
            .iter()
            .flat_map(|c| c.covariates.iter().map(String::as_str))
            .chain(self.trees.iter().flat_map(|t| {
                t.features
                    .iter()
                    .map(|f| f.name.as_str())
                    .chain(std::iter::once(t.target.as_str()))
            }));
        for c in self
            .survival
            .iter()
            .flat_map(|s| s.columns())
            .chain(covariates)
        {
            if !names.iter().any(|n| n == c) {
                names.push(c.to_string());
            }
        }
        for c in &self.cohort {
            if !names.contains(&c.column) {
                names.push(c.column.clone());
            }
        }
        names
    }

    /// Length of a site's vector: for a Cox query, its Cox section and the rows left out.
    pub fn dimension(&self) -> usize {
        if let Some(c) = &self.cox {
            return c.dimension() + 1 + self.missing_columns().len();
        }
        if self.trees.is_some() {
            return 1 + self.missing_columns().len();
        }
        1 + self.columns.iter().map(|c| 2 + c.bins()).sum::<usize>()
            + self.pairs()
            + self.survival_dimension()
            + 1
            + self.missing_columns().len()
    }

    fn survival_dimension(&self) -> usize {
        self.survival.as_ref().map_or(0, |s| s.dimension())
    }

    /// Where the survival section starts in a site's vector.
    fn survival_at(&self) -> usize {
        1 + self.columns.iter().map(|c| 2 + c.bins()).sum::<usize>() + self.pairs()
    }

    /// The most steps the query takes (1 for a one-shot query).
    pub fn max_steps(&self) -> u32 {
        match (&self.cox, &self.trees) {
            (Some(c), _) => c.max_iterations,
            (_, Some(t)) => t.max_steps(),
            _ => 1,
        }
    }

    /// Whether `step` is one this query takes: none for a one-shot query, a Cox step for a
    /// Cox query, a trees step for boosted trees, each within its model's limits.
    pub fn check_step(&self, step: Option<&crate::messages::QueryStep>) -> Result<(), String> {
        use crate::messages::QueryStep;
        match (&self.cox, &self.trees, step) {
            (None, None, None) => Ok(()),
            (Some(c), _, Some(QueryStep::Cox(s))) => c.check_step(s),
            (_, Some(t), Some(QueryStep::Trees(s))) => t.check_step(s),
            _ => Err(
                "the step does not fit the query (a Cox query comes with its iteration, \
                      boosted trees with their tree and level, and no other query with either)"
                    .into(),
            ),
        }
    }

    /// Length of a site's vector for `step` (see [`StatsQuery::dimension`]).
    pub fn step_dimension(&self, step: Option<&crate::messages::QueryStep>) -> usize {
        match (&self.trees, step) {
            (Some(t), Some(crate::messages::QueryStep::Trees(s))) => {
                t.dimension(s) + 1 + self.missing_columns().len()
            }
            _ => self.dimension(),
        }
    }

    /// A site's vector for one step of a boosted-trees query: the step's sums over `rows`,
    /// then the rows it left out (counts).
    pub fn encode_trees(
        &self,
        step: &crate::trees::TreeStep,
        rows: &[crate::trees::TreeRow],
        left_out: &LeftOut,
    ) -> Vec<f64> {
        let Some(t) = &self.trees else {
            return Vec::new();
        };
        let private = self.noise_multiplier.is_some();
        let mut v = t.encode_with(step, rows, private);
        if private && step.level.is_some() {
            // Under noise the rows left out are counted once, at step 0: zeros here cost
            // nothing and leave the level's sensitivity to its histograms.
            v.extend(std::iter::repeat_n(0.0, 1 + left_out.per_column.len()));
        } else {
            v.push(left_out.rows as f64);
            v.extend(left_out.per_column.iter().map(|n| *n as f64));
        }
        v
    }

    /// A site's vector for one iteration of a Cox query: its Cox section at `beta` over
    /// `rows`, then the rows it left out (counts).
    pub fn encode_cox(
        &self,
        rows: &[crate::cox::CoxRow],
        beta: &[f64],
        left_out: &LeftOut,
    ) -> Vec<f64> {
        let Some(cox) = &self.cox else {
            return Vec::new();
        };
        let mut v = cox.encode(rows, beta);
        v.push(left_out.rows as f64);
        v.extend(left_out.per_column.iter().map(|n| *n as f64));
        v
    }

    /// The released fit of a Cox query: its count, the rows left out (from the first
    /// iteration's sum, `first`, rounded where `rounding < 0.5`), and `fit`.
    pub fn release_cox(
        &self,
        first: &[f64],
        fit: crate::cox::CoxFit,
        rounding: f64,
    ) -> Result<StatsRelease, String> {
        let Some(cox) = &self.cox else {
            return Err("not a Cox query".into());
        };
        if first.len() != self.dimension() {
            return Err(format!(
                "the sum has {} entries, the query {}",
                first.len(),
                self.dimension()
            ));
        }
        let threshold = self.suppress_below as f64;
        let whole = |x: f64| if rounding < 0.5 { x.round() } else { x };
        let n = whole(first[0]);
        if n < threshold || fit.events < threshold {
            return Err(format!(
                "the fit rests on fewer than {} patients or events, so it is not released",
                self.suppress_below
            ));
        }
        let cells: Vec<f64> = first[cox.dimension()..].iter().map(|x| whole(*x)).collect();
        let err = if rounding < 0.5 { 0.0 } else { rounding };
        Ok(StatsRelease {
            query_id: self.query_id.clone(),
            count: Released::new(n, err, true),
            columns: Vec::new(),
            correlations: None,
            left_out: Some(self.left_out_release(&cells, None, err)),
            noise_sd_units: None,
            privacy: None,
            survival: None,
            cox: Some(fit),
            trees: None,
        })
    }

    /// The release of a boosted-trees query: its count and rows left out (from step 0's
    /// sum, `first`) and `summary` (the model is its own file).
    pub fn release_trees(
        &self,
        first: &[f64],
        noise_sd: Option<f64>,
        summary: crate::trees::TreesSummary,
    ) -> Result<StatsRelease, String> {
        let Some(t) = &self.trees else {
            return Err("not a boosted-trees query".into());
        };
        let step0 = t.dimension(&crate::trees::Booster::new(t).current());
        if first.len() != step0 + 1 + self.missing_columns().len() {
            return Err(format!("step 0's sum has {} entries", first.len()));
        }
        let cells: Vec<f64> = first[step0..].iter().map(|x| x.round()).collect();
        let radius = noise_sd.map_or(0.0, |s| Z * s);
        Ok(StatsRelease {
            query_id: self.query_id.clone(),
            count: Released::new(first[0].round(), radius, true),
            columns: Vec::new(),
            correlations: None,
            left_out: Some(self.left_out_release(&cells, noise_sd, radius)),
            noise_sd_units: noise_sd,
            privacy: None,
            survival: None,
            cox: None,
            trees: Some(summary),
        })
    }

    /// The released counts of rows left out (`cells`: in all, then per missing column):
    /// noisy ones below the threshold hidden; exact small ones hidden, and the total with
    /// them (it would bound the hidden ones).
    fn left_out_release(&self, cells: &[f64], sigma: Option<f64>, radius: f64) -> LeftOutRelease {
        let threshold = self.suppress_below as f64;
        let shown: Vec<bool> = match sigma {
            Some(_) => cells.iter().map(|c| *c >= threshold).collect(),
            None => {
                let mut shown: Vec<bool> =
                    cells.iter().map(|c| *c == 0.0 || *c >= threshold).collect();
                if shown.iter().any(|s| !s) {
                    shown[0] = false;
                }
                shown
            }
        };
        LeftOutRelease {
            rows: Released::new(cells[0], radius, shown[0]),
            columns: self
                .missing_columns()
                .into_iter()
                .enumerate()
                .map(|(j, name)| (name, Released::new(cells[1 + j], radius, shown[1 + j])))
                .collect(),
        }
    }

    /// Each entry's unit: the most one patient changes it.
    pub fn units(&self) -> Vec<f64> {
        let mut u = vec![1.0];
        for c in &self.columns {
            u.push(c.max_abs());
            u.push(c.max_abs().powi(2));
            u.extend(std::iter::repeat_n(1.0, c.bins()));
        }
        if self.correlations {
            for j in 0..self.columns.len() {
                for k in j + 1..self.columns.len() {
                    u.push(self.columns[j].max_abs() * self.columns[k].max_abs());
                }
            }
        }
        u.extend(std::iter::repeat_n(1.0, self.survival_dimension()));
        u.extend(std::iter::repeat_n(1.0, 1 + self.missing_columns().len()));
        u
    }

    /// L2 sensitivity of the vector in units to adding or removing one patient: one in the
    /// cohort, or one left out for missing values (never both).
    pub fn sensitivity(&self) -> f64 {
        let p = self.columns.len();
        // A survival part: the stratum's size and one bin's count.
        let kept = 1 + 3 * p + self.pairs() + 2 * usize::from(self.survival.is_some());
        let left_out = 1 + self.missing_columns().len();
        (kept.max(left_out) as f64).sqrt()
    }

    /// The standard deviation of the noise on each entry of the released sum, in units.
    pub fn sigma(&self) -> Option<f64> {
        self.noise_multiplier.map(|z| z * self.sensitivity())
    }

    /// [`StatsQuery::sigma`] for a vector put on a grid of `2^-bits` units before the noise
    /// ([`crate::dp::grid_sigma`]).
    pub fn sigma_on_grid(&self, bits: u8, stochastic: bool) -> Option<f64> {
        self.noise_multiplier.map(|z| {
            crate::dp::grid_sigma(z, self.sensitivity(), bits, self.dimension(), stochastic)
        })
    }

    /// [`StatsQuery::sensitivity`] of a site's vector at `step` (a boosted-trees step's
    /// own; the query's otherwise).
    pub fn step_sensitivity(&self, step: Option<&crate::messages::QueryStep>) -> f64 {
        match (&self.trees, step) {
            (Some(t), Some(crate::messages::QueryStep::Trees(s))) => {
                // The rows left out are counted at step 0 only under noise (see
                // `encode_trees`); exact steps carry them every time.
                let left_out = if s.level.is_none() || self.noise_multiplier.is_none() {
                    (1 + self.missing_columns().len()) as f64
                } else {
                    0.0
                };
                t.sensitivity(s).max(left_out.sqrt())
            }
            _ => self.sensitivity(),
        }
    }

    /// [`StatsQuery::site_share_sigma`] for the vector at `step`.
    pub fn step_share_sigma(
        &self,
        step: Option<&crate::messages::QueryStep>,
        bits: u8,
        threshold: u32,
        colluders: u32,
    ) -> Option<f64> {
        let honest = threshold.saturating_sub(colluders).max(1);
        self.noise_multiplier.map(|z| {
            crate::dp::grid_sigma(
                z,
                self.step_sensitivity(step),
                bits,
                self.step_dimension(step),
                true,
            ) / f64::from(honest).sqrt()
        })
    }

    /// The standard deviation (units) of the noise one site adds under secure aggregation:
    /// its share `σ²/(t − c)` of the query's σ on a grid of `2^-bits` with stochastic
    /// rounding, so that the honest sites of any decodable sum (at least `t − c`) carry σ
    /// together. `None` for an exact query.
    pub fn site_share_sigma(&self, bits: u8, threshold: u32, colluders: u32) -> Option<f64> {
        let honest = threshold.saturating_sub(colluders).max(1);
        self.sigma_on_grid(bits, true)
            .map(|s| s / f64::from(honest).sqrt())
    }

    /// [`StatsQuery::encode_with`] for a cohort without rows left out.
    pub fn encode(&self, rows: &[Vec<f64>]) -> Vec<f64> {
        self.encode_with(rows, &LeftOut::none(self))
    }

    /// A site's vector, in units, over its cohort's rows (each row: the columns' values in
    /// order, clipped here to their bounds) and the rows it left out for missing values.
    pub fn encode_with(&self, rows: &[Vec<f64>], left_out: &LeftOut) -> Vec<f64> {
        self.encode_all(rows, &[], left_out)
    }

    /// [`StatsQuery::encode_with`] with each row's survival part (`survival[i]` is
    /// `rows[i]`'s; empty without a survival part).
    pub fn encode_all(
        &self,
        rows: &[Vec<f64>],
        survival: &[crate::survival::SurvivalRow],
        left_out: &LeftOut,
    ) -> Vec<f64> {
        let p = self.columns.len();
        let mut v = vec![0.0; self.dimension()];
        v[0] = rows.len() as f64;
        for row in rows {
            let x: Vec<f64> = row
                .iter()
                .zip(&self.columns)
                .map(|(x, c)| x.clamp(c.low, c.high))
                .collect();
            let mut at = 1;
            for (j, c) in self.columns.iter().enumerate() {
                v[at] += x[j];
                v[at + 1] += x[j] * x[j];
                v[at + 2 + c.bin(x[j])] += 1.0;
                at += 2 + c.bins();
            }
            if self.correlations {
                for j in 0..p {
                    for k in j + 1..p {
                        v[at] += x[j] * x[k];
                        at += 1;
                    }
                }
            }
        }
        if let Some(s) = &self.survival {
            let at = self.survival_at();
            s.encode_into(&mut v[at..at + s.dimension()], survival);
        }
        let at = self.dimension() - 1 - self.missing_columns().len();
        v[at] = left_out.rows as f64;
        for (j, n) in left_out.per_column.iter().enumerate() {
            if let Some(e) = v.get_mut(at + 1 + j) {
                *e = *n as f64;
            }
        }
        let units = self.units();
        v.iter_mut().zip(&units).for_each(|(x, u)| *x /= u);
        v
    }

    /// The released statistics from the sum over sites (in units). `sigma` is the noise
    /// standard deviation per entry in units (None: exact); `rounding` bounds the
    /// fixed-point error per entry in units (secure aggregation's quantization).
    pub fn release(
        &self,
        sum: &[f64],
        sigma: Option<f64>,
        rounding: f64,
    ) -> Result<StatsRelease, String> {
        if sum.len() != self.dimension() {
            return Err(format!(
                "the sum has {} entries, the query {}",
                sum.len(),
                self.dimension()
            ));
        }
        let units = self.units();
        let v: Vec<f64> = sum.iter().zip(&units).map(|(x, u)| x * u).collect();
        // How far each entry may lie from the exact one: `Z` standard deviations of the
        // noise plus the fixed-point rounding. Every stated error below is the widest a
        // statistic can move while each entry it depends on stays within its radius.
        let radius = |j: usize| (Z * sigma.map_or(0.0, |s| s) + rounding) * units[j];
        let threshold = self.suppress_below as f64;
        let n = v[0];
        let n_ok = n >= threshold;
        let count = Released::new(n, radius(0), n_ok);
        let counts = Interval::around(n, radius(0));
        let mut columns = Vec::new();
        let mut at = 1;
        let mut means = Vec::new();
        for c in &self.columns {
            let (s, sq) = (v[at], v[at + 1]);
            let sums = Interval::around(s, radius(at));
            let squares = Interval::around(sq, radius(at + 1));
            // The exact mean lies in [low, high] and the exact variance in
            // [0, (high − low)²/4] (Popoviciu), whatever the noise.
            let mean = (s / n).clamp(c.low, c.high);
            // Floating-point slack: Σx²/n − (Σx/n)² cancels, so even an exact sum (no
            // noise, no rounding) has a rounding error of its own.
            let fp = 64.0 * f64::EPSILON * ((sq / n).abs() + (s / n).powi(2) + (s / n).abs());
            let mean_range = mean_range(counts, sums)
                .widen(fp)
                .intersect(Interval::new(c.low, c.high));
            let var = (sq / n - (s / n).powi(2)).clamp(0.0, (c.high - c.low).powi(2) / 4.0);
            let var_range = variance_range(counts, sums, squares)
                .widen(fp)
                .intersect(Interval::new(0.0, (c.high - c.low).powi(2) / 4.0));
            let hist: Vec<f64> = v[at + 2..at + 2 + c.bins()].to_vec();
            let bin_err = radius(at + 2);
            let shown = match sigma {
                // Noisy bins: suppressing the small ones is post-processing.
                Some(_) => hist.iter().map(|h| *h >= threshold).collect(),
                // Exact bins: the small ones, and enough others that what is hidden cannot
                // be recomputed from the count and the bins shown.
                None => complementary_suppression(&hist, threshold),
            };
            let histogram = hist
                .iter()
                .zip(&shown)
                .map(|(h, shown)| Released::new(*h, bin_err, *shown))
                .collect();
            // Exact quartiles interpolate within exact bins, so they would give a hidden
            // bin's count back: released only where no bin is hidden.
            let quartiles_ok = n_ok && (sigma.is_some() || shown.iter().all(|s| *s));
            let quantiles = [0.25, 0.5, 0.75]
                .iter()
                .map(|q| {
                    let x = quantile(c, &hist, *q);
                    let err = quantile_range(c, &hist, *q, bin_err).distance_from(x);
                    (*q, Released::new(x, err, quartiles_ok))
                })
                .collect();
            // A correlation is released only where both variances are told apart from 0.
            means.push((s / n, sq / n - (s / n).powi(2), var_range.low > 0.0));
            columns.push(ColumnRelease {
                name: c.name.clone(),
                sum: Released::new(s, radius(at), n_ok),
                mean: Released::new(mean, mean_range.distance_from(mean), n_ok),
                variance: Released::new(var, var_range.distance_from(var), n_ok),
                histogram,
                quantiles,
            });
            at += 2 + c.bins();
        }
        let correlations = self.correlations.then(|| {
            let p = self.columns.len();
            let mut m = vec![vec![None; p]; p];
            for (j, row) in m.iter_mut().enumerate() {
                row[j] = n_ok.then_some(1.0);
            }
            for j in 0..p {
                for k in j + 1..p {
                    let cov = v[at] / n - means[j].0 * means[k].0;
                    let r = (cov / (means[j].1 * means[k].1).sqrt()).clamp(-1.0, 1.0);
                    let told_apart = means[j].2 && means[k].2;
                    let r = (n_ok && told_apart && r.is_finite()).then_some(r);
                    m[j][k] = r;
                    m[k][j] = r;
                    at += 1;
                }
            }
            m
        });
        let at = self.dimension() - 1 - self.missing_columns().len();
        let left_out = self.left_out_release(&v[at..], sigma, radius(at));
        let survival = match &self.survival {
            Some(s) => {
                let at = self.survival_at();
                Some(s.release(&v[at..at + s.dimension()], sigma, rounding, threshold)?)
            }
            None => None,
        };
        Ok(StatsRelease {
            query_id: self.query_id.clone(),
            count,
            survival,
            cox: None,
            trees: None,
            columns,
            correlations,
            left_out: Some(left_out),
            noise_sd_units: sigma,
            privacy: None,
        })
    }
}

/// Which exact histogram bins may be shown: none of 1 to `threshold − 1` patients (CMS),
/// and, where any is hidden, enough of the smallest others hidden with it that the hidden
/// bins together hold at least `threshold` patients, since the count minus the bins shown
/// is their total. Empty bins are shown (0 is not a small cell).
pub fn complementary_suppression(hist: &[f64], threshold: f64) -> Vec<bool> {
    let small = |h: f64| h > 0.0 && h < threshold;
    let mut shown: Vec<bool> = hist.iter().map(|h| !small(*h)).collect();
    if shown.iter().all(|s| *s) {
        return shown;
    }
    let mut hidden: f64 = hist
        .iter()
        .zip(&shown)
        .filter(|(_, s)| !**s)
        .map(|(h, _)| h)
        .sum();
    while hidden < threshold {
        // The smallest bin still shown (an empty one hides nothing, so it is skipped).
        let next = (0..hist.len())
            .filter(|&i| shown[i] && hist[i] > 0.0)
            .min_by(|&a, &b| hist[a].total_cmp(&hist[b]));
        match next {
            Some(i) => {
                shown[i] = false;
                hidden += hist[i];
            }
            None => break,
        }
    }
    shown
}

/// A release's privacy cost: each participating site's patients are protected by one
/// Gaussian mechanism with this noise multiplier (`epsilon` at `delta`, by the RDP
/// accountant). Absent from exact releases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleasePrivacy {
    /// The noise's standard deviation over the sensitivity.
    pub noise_multiplier: f64,
    /// ε of the release for each site's patients, at `delta`.
    pub epsilon: f64,
    /// The δ that `epsilon` is stated at.
    pub delta: f64,
}

impl ReleasePrivacy {
    /// The cost of one release with noise multiplier `z`, at `delta`.
    pub fn of(z: f64, delta: f64) -> ReleasePrivacy {
        let mut acc = crate::dp::accountant::RdpAccountant::default();
        acc.compose_gaussian(1.0, z, 1);
        ReleasePrivacy {
            noise_multiplier: z,
            epsilon: acc.epsilon(delta).0,
            delta,
        }
    }
}

/// The value at quantile `q` by linear interpolation within the histogram's bins (negative
/// noisy counts taken as 0; the middle of the range when noise leaves no count at all).
fn quantile(c: &StatColumn, hist: &[f64], q: f64) -> f64 {
    let total: f64 = hist.iter().map(|h| h.max(0.0)).sum();
    if total <= 0.0 {
        return (c.low + c.high) / 2.0;
    }
    let target = q * total;
    let mut cum = 0.0;
    for (i, h) in hist.iter().enumerate() {
        let h = h.max(0.0);
        if cum + h >= target && h > 0.0 {
            let (a, b) = (c.edges[i], c.edges[i + 1]);
            return a + (b - a) * ((target - cum) / h).clamp(0.0, 1.0);
        }
        cum += h;
    }
    c.high
}

/// Where the exact quantile `q` of the cohort can lie when each of the `B` released bins is
/// within `err` of its exact count. The exact cumulative count at every edge is then within
/// `B·err` of the released one, and so is the cohort's size; the bin holding the patient at
/// rank `⌈qN⌉` is one whose released cumulative counts straddle `qN ± (1 + q)·B·err`. The
/// range runs from the lowest such bin's lower edge to the highest one's upper edge.
fn quantile_range(c: &StatColumn, hist: &[f64], q: f64, err: f64) -> Interval {
    let clamped: Vec<f64> = hist.iter().map(|h| h.max(0.0)).collect();
    let total: f64 = clamped.iter().sum();
    let slack = (1.0 + q) * c.bins() as f64 * err;
    let (lo_target, hi_target) = (q * total - slack, q * total + slack);
    let mut cum = vec![0.0];
    for h in &clamped {
        cum.push(cum[cum.len() - 1] + h);
    }
    let possible: Vec<usize> = (0..c.bins())
        .filter(|&i| cum[i] < hi_target && cum[i + 1] >= lo_target)
        .collect();
    match (possible.first(), possible.last()) {
        (Some(&a), Some(&b)) => Interval::new(c.edges[a], c.edges[b + 1]),
        _ => Interval::new(c.low, c.high),
    }
}

/// A closed range of values.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Interval {
    low: f64,
    high: f64,
}

impl Interval {
    fn new(low: f64, high: f64) -> Interval {
        Interval { low, high }
    }

    fn around(x: f64, radius: f64) -> Interval {
        Interval::new(x - radius, x + radius)
    }

    /// The common part; `other` alone where they do not meet (`other` being the range the
    /// exact value lies in whatever the noise).
    fn intersect(self, other: Interval) -> Interval {
        let (low, high) = (self.low.max(other.low), self.high.min(other.high));
        if low <= high {
            Interval::new(low, high)
        } else {
            other
        }
    }

    /// The range grown by `slack` on each side (NaN slack leaves it unchanged).
    fn widen(self, slack: f64) -> Interval {
        if slack.is_finite() {
            Interval::new(self.low - slack, self.high + slack)
        } else {
            self
        }
    }

    /// The farthest a value in the range lies from `x`.
    fn distance_from(self, x: f64) -> f64 {
        (x - self.low).max(self.high - x).max(0.0)
    }
}

const EVERYWHERE: Interval = Interval {
    low: f64::NEG_INFINITY,
    high: f64::INFINITY,
};

/// The range of `s / n` over the box: at its corners, since it is monotone in each for
/// `n > 0`. Unbounded when the count's range reaches 0.
fn mean_range(n: Interval, s: Interval) -> Interval {
    if n.low <= 0.0 {
        return EVERYWHERE;
    }
    let corners = [
        s.low / n.low,
        s.low / n.high,
        s.high / n.low,
        s.high / n.high,
    ];
    Interval::new(
        corners.iter().copied().fold(f64::INFINITY, f64::min),
        corners.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// The range of `sq/n − (s/n)²` over the box. With `u = 1/n` it is `sq·u − s²u²`: linear
/// in `sq` and concave in `s` and in `u`, so its minimum is at a corner, and its maximum at
/// the largest `sq`, the `s` nearest 0 and the `u` maximising the quadratic.
fn variance_range(n: Interval, s: Interval, sq: Interval) -> Interval {
    if n.low <= 0.0 {
        return EVERYWHERE;
    }
    let g = |u: f64, s: f64, sq: f64| sq * u - (s * u).powi(2);
    let (u_low, u_high) = (1.0 / n.high, 1.0 / n.low);
    let mut low = f64::INFINITY;
    for u in [u_low, u_high] {
        for s in [s.low, s.high] {
            for sq in [sq.low, sq.high] {
                low = low.min(g(u, s, sq));
            }
        }
    }
    let s_near = if s.low <= 0.0 && s.high >= 0.0 {
        0.0
    } else {
        s.low.abs().min(s.high.abs())
    };
    let mut candidates = vec![u_low, u_high];
    if s_near > 0.0 {
        candidates.push((sq.high / (2.0 * s_near * s_near)).clamp(u_low, u_high));
    }
    let high = candidates
        .into_iter()
        .map(|u| g(u, s_near, sq.high))
        .fold(f64::NEG_INFINITY, f64::max);
    Interval::new(low, high)
}

/// Standard deviations of noise per entry of the sum that the stated errors allow for. Each
/// entry lies that close to its exact value with probability 1 − 5.7·10⁻⁷, so every
/// stated error of a release with `D` entries holds at once with probability at least
/// `1 − D·5.7·10⁻⁷` (0.99998 for 30 entries).
pub const Z: f64 = 5.0;

/// A released number, or `None` where it is suppressed (a count below the threshold, or a
/// statistic of a cohort below it). `error` bounds the distance to the exact value while the
/// noise on each entry of the sum stays within [`Z`] standard deviations: the widest the
/// statistic moves over that range (and, for quantiles, the bins they may fall in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Released {
    /// The (noisy) value; `None` where suppressed.
    pub value: Option<f64>,
    /// How far the exact value may lie from `value` (in the value's units): see [`Z`].
    pub error: f64,
}

impl Released {
    pub(crate) fn new(value: f64, error: f64, released: bool) -> Released {
        Released {
            value: released.then_some(value),
            error,
        }
    }
}

/// What a statistics query releases about one column of its cohort (values clipped to the
/// column's bounds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnRelease {
    /// The column's name.
    pub name: String,
    /// The sum of the column's values over the cohort.
    pub sum: Released,
    /// The mean over the cohort, within `[low, high]`.
    pub mean: Released,
    /// The (population) variance over the cohort, within `[0, (high − low)²/4]`.
    pub variance: Released,
    /// The count in each bin between consecutive edges.
    pub histogram: Vec<Released>,
    /// (quantile, value)
    pub quantiles: Vec<(f64, Released)>,
}

/// The rows of a site's cohort left out for missing values: how many, and how many lack
/// each of [`StatsQuery::missing_columns`] (a row may lack several).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeftOut {
    /// Rows of the cohort left out.
    pub rows: u64,
    /// Of those, how many lack each of [`StatsQuery::missing_columns`], in that order.
    pub per_column: Vec<u64>,
}

impl LeftOut {
    /// None left out, for `q`'s columns.
    pub fn none(q: &StatsQuery) -> LeftOut {
        LeftOut {
            rows: 0,
            per_column: vec![0; q.missing_columns().len()],
        }
    }
}

/// The released [`LeftOut`] summed over sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeftOutRelease {
    /// The cohort's rows left out, in all.
    pub rows: Released,
    /// (column, rows without a usable value in it)
    pub columns: Vec<(String, Released)>,
}

/// What a statistics query releases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsRelease {
    /// The query released.
    pub query_id: String,
    /// The cohort's rows, over all the sites that took part.
    pub count: Released,
    /// Each column's statistics, in the query's order.
    pub columns: Vec<ColumnRelease>,
    /// Pearson correlations (None where suppressed).
    pub correlations: Option<Vec<Vec<Option<f64>>>>,
    /// The cohort's rows left out for a missing (empty, `NA`, non-numeric) value, in all and
    /// per column, as noisy (or, for an exact release, suppressed) counts. Absent from
    /// releases made before it was reported.
    #[serde(default)]
    pub left_out: Option<LeftOutRelease>,
    /// The noise's standard deviation per entry of the sum, in units (None: exact).
    pub noise_sd_units: Option<f64>,
    /// What the release costs each site's patients (None: exact).
    #[serde(default)]
    pub privacy: Option<ReleasePrivacy>,
    /// The Kaplan–Meier curves and log-rank test, for a query with a survival part.
    #[serde(default)]
    pub survival: Option<crate::survival::SurvivalRelease>,
    /// The fitted Cox model, for a Cox query.
    #[serde(default)]
    pub cox: Option<crate::cox::CoxFit>,
    /// What a boosted-trees query grew (the model itself is its own file).
    #[serde(default)]
    pub trees: Option<crate::trees::TreesSummary>,
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};

    use super::*;

    fn query() -> StatsQuery {
        StatsQuery {
            query_id: "q".into(),
            dataset: "pima".into(),
            cohort: vec![],
            columns: vec![
                StatColumn {
                    name: "glu".into(),
                    low: 0.0,
                    high: 200.0,
                    edges: vec![0.0, 100.0, 140.0, 200.0],
                },
                StatColumn {
                    name: "bmi".into(),
                    low: 10.0,
                    high: 70.0,
                    edges: vec![10.0, 30.0, 70.0],
                },
            ],
            correlations: true,
            noise_multiplier: None,
            suppress_below: 11,
            survival: None,
            cox: None,
            trees: None,
        }
    }

    #[test]
    fn a_query_without_survival_keeps_its_protocol_4_approval_hash() {
        // Protocol 4's encoding is protocol 5's without the trailing `None`s of survival,
        // cox and trees (a 0 byte each).
        let q = query();
        let bytes = postcard::to_allocvec(&q).unwrap();
        assert_eq!(bytes[bytes.len() - 3..], [0, 0, 0]);
        assert_eq!(
            q.approval_hash(),
            crate::audit::sha256_hex(&bytes[..bytes.len() - 3])
        );
        let with = StatsQuery {
            survival: Some(Box::new(crate::survival::Survival {
                time: "t".into(),
                event: "e".into(),
                event_codes: vec!["1".into()],
                censored_codes: vec!["0".into()],
                grid: vec![0.0, 1.0],
                strata: None,
            })),
            ..query()
        };
        assert_eq!(
            with.approval_hash(),
            crate::audit::sha256_hex(&postcard::to_allocvec(&with).unwrap())
        );
    }

    #[test]
    fn exact_statistics_from_the_sum_of_site_vectors() {
        let q = query();
        q.validate().unwrap();
        assert_eq!(q.dimension(), 1 + (2 + 3) + (2 + 2) + 1 + (1 + 2));
        let rows: Vec<Vec<f64>> = (0..40)
            .map(|i| vec![80.0 + 2.0 * i as f64, 20.0 + i as f64 * 0.5])
            .collect();
        // Two sites: their vectors add up.
        let (a, b) = rows.split_at(15);
        let sum: Vec<f64> = q
            .encode(a)
            .iter()
            .zip(q.encode(b))
            .map(|(x, y)| x + y)
            .collect();
        let r = q.release(&sum, None, 0.0).unwrap();
        assert_eq!(r.count.value, Some(40.0));
        let mean: f64 = rows.iter().map(|r| r[0]).sum::<f64>() / 40.0;
        assert!((r.columns[0].mean.value.unwrap() - mean).abs() < 1e-9);
        let var = rows.iter().map(|r| (r[0] - mean).powi(2)).sum::<f64>() / 40.0;
        assert!((r.columns[0].variance.value.unwrap() - var).abs() < 1e-6);
        // glu 80..158 step 2: 10 below 100, 20 in [100, 140), 10 in [140, 200].
        let hist: Vec<Option<f64>> = r.columns[0].histogram.iter().map(|h| h.value).collect();
        assert_eq!(
            hist,
            vec![None, Some(20.0), None],
            "cells of 10 are suppressed"
        );
        // The two columns rise together: correlation 1.
        let c = r.correlations.unwrap();
        assert!((c[0][1].unwrap() - 1.0).abs() < 1e-9);
        // Exact quartiles interpolate within exact bins, so with a bin hidden they would
        // give it back: not released.
        assert!(
            r.columns[0]
                .quantiles
                .iter()
                .all(|(_, q)| q.value.is_none())
        );
        // With no bin hidden, the median lies within a bin width of the exact one.
        let q = StatsQuery {
            suppress_below: 5,
            ..q
        };
        let r = q.release(&sum, None, 0.0).unwrap();
        let (_, med) = &r.columns[0].quantiles[1];
        assert!((med.value.unwrap() - 119.0).abs() <= med.error, "{med:?}");
    }

    /// A count of 446 beside the histogram [60, 100, 143, 142, ·] would give the hidden bin
    /// back; so would any single hidden bin. The hidden bins together always hold at least
    /// the threshold, whatever the histogram.
    #[test]
    fn a_hidden_bin_cannot_be_recomputed_from_the_count_and_the_others() {
        let shown = complementary_suppression(&[60.0, 100.0, 143.0, 142.0, 1.0], 11.0);
        assert_eq!(shown, vec![false, true, true, true, false]);
        // Two small bins that together reach the threshold need nothing more.
        assert_eq!(
            complementary_suppression(&[6.0, 100.0, 5.0], 11.0),
            vec![false, true, false]
        );
        // Empty bins are shown and hide nothing.
        assert_eq!(
            complementary_suppression(&[0.0, 3.0, 0.0, 40.0, 50.0], 11.0),
            vec![true, false, true, false, true]
        );
        // Nothing small: everything shown.
        assert_eq!(
            complementary_suppression(&[11.0, 12.0], 11.0),
            vec![true, true]
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..2000 {
            let bins = rng.random_range(1..8);
            let hist: Vec<f64> = (0..bins)
                .map(|_| f64::from(rng.random_range(0u32..40)))
                .collect();
            let shown = complementary_suppression(&hist, 11.0);
            let hidden: Vec<f64> = hist
                .iter()
                .zip(&shown)
                .filter(|(_, s)| !**s)
                .map(|(h, _)| *h)
                .collect();
            // No small cell shown; the hidden total is 0 (nothing hidden), at least the
            // threshold, or everything (all that can be done).
            assert!(
                hist.iter()
                    .zip(&shown)
                    .all(|(h, s)| !*s || *h == 0.0 || *h >= 11.0)
            );
            let total: f64 = hidden.iter().sum();
            let nonzero_shown = hist.iter().zip(&shown).any(|(h, s)| *s && *h > 0.0);
            assert!(
                hidden.is_empty() || total >= 11.0 || !nonzero_shown,
                "{hist:?} -> {shown:?}"
            );
        }
    }

    #[test]
    fn an_exact_sum_still_allows_for_floating_point_cancellation() {
        // A constant column: its exact variance is 0, but Σx²/n − (Σx/n)² need not be.
        let q = StatsQuery {
            suppress_below: 0,
            ..query()
        };
        let rows: Vec<Vec<f64>> = (0..37).map(|i| vec![199.7, 20.0 + i as f64]).collect();
        let r = q.release(&q.encode(&rows), None, 0.0).unwrap();
        let var = &r.columns[0].variance;
        assert!(var.value.unwrap().abs() <= var.error, "{var:?}");
        // Nor is a correlation with a column that does not vary released.
        assert_eq!(r.correlations.unwrap()[0][1], None);
    }

    #[test]
    fn a_histogram_bin_of_7_patients_is_not_released() {
        let q = query();
        let mut rows: Vec<Vec<f64>> = (0..7).map(|_| vec![50.0, 25.0]).collect();
        rows.extend((0..30).map(|_| vec![120.0, 40.0]));
        let r = q.release(&q.encode(&rows), None, 0.0).unwrap();
        assert_eq!(
            r.columns[0].histogram[0].value, None,
            "7 patients below 100"
        );
        // The count (37) minus that bin would give the 7 back: the next bin is hidden too.
        assert_eq!(r.columns[0].histogram[1].value, None);
        assert_eq!(r.count.value, Some(37.0));
        // A cohort of 7 releases nothing at all.
        let small = q.release(&q.encode(&rows[..7]), None, 0.0).unwrap();
        assert_eq!(small.count.value, None);
        assert_eq!(small.columns[0].mean.value, None);
        assert!(
            small
                .correlations
                .unwrap()
                .iter()
                .flatten()
                .all(Option::is_none)
        );
    }

    /// Rows left out for a missing value are released as counts, in all and per column,
    /// within the sensitivity the noise is for; exact small ones are hidden.
    #[test]
    fn rows_left_out_for_missing_values_are_reported() {
        let q = query();
        assert_eq!(q.missing_columns(), ["glu", "bmi"]);
        let rows: Vec<Vec<f64>> = (0..30).map(|i| vec![100.0 + i as f64, 30.0]).collect();
        let left = LeftOut {
            rows: 14,
            per_column: vec![12, 3],
        };
        let r = q.release(&q.encode_with(&rows, &left), None, 0.0).unwrap();
        let out = r.left_out.unwrap();
        // 3 is a small cell: hidden, and the total with it.
        assert_eq!(out.rows.value, None);
        assert_eq!(
            out.columns[0],
            ("glu".to_string(), Released::new(12.0, 0.0, true))
        );
        assert_eq!(out.columns[1].1.value, None);
        let none = q
            .release(&q.encode(&rows), None, 0.0)
            .unwrap()
            .left_out
            .unwrap();
        assert_eq!(none.rows.value, Some(0.0), "0 is not a small cell");
        // One patient left out, lacking every column, moves the vector within Δ; so does
        // a patient in the cohort.
        let one = LeftOut {
            rows: 1,
            per_column: vec![1, 1],
        };
        let dist = |a: Vec<f64>, b: Vec<f64>| {
            a.iter()
                .zip(&b)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let base = q.encode(&rows);
        assert!(dist(base.clone(), q.encode_with(&rows, &one)) <= q.sensitivity() + 1e-9);
        // A cohort filter on many other columns: the left-out entries set Δ.
        let mut wide = q.clone();
        wide.correlations = false;
        wide.cohort = (0..12)
            .map(|i| Condition {
                column: format!("c{i}"),
                op: CmpOp::Ge,
                value: Some(0.0),
                text: None,
            })
            .collect();
        let all = LeftOut {
            rows: 1,
            per_column: vec![1; wide.missing_columns().len()],
        };
        let moved = dist(wide.encode(&[]), wide.encode_with(&[], &all));
        assert!(
            (moved - wide.sensitivity()).abs() < 1e-9,
            "{moved} vs {}",
            wide.sensitivity()
        );
    }

    #[test]
    fn values_are_clipped_and_the_sensitivity_holds() {
        let q = query();
        let base: Vec<Vec<f64>> = (0..20).map(|i| vec![100.0 + i as f64, 30.0]).collect();
        let mut more = base.clone();
        // The most extreme patient possible (clipped to the bounds).
        more.push(vec![1e9, -1e9]);
        let (a, b) = (q.encode(&base), q.encode(&more));
        let dist = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            dist <= q.sensitivity() + 1e-9,
            "{dist} > {}",
            q.sensitivity()
        );
        assert!(dist > 0.5 * q.sensitivity());
    }

    #[test]
    fn cohort_conditions_and_bad_queries() {
        let c = Condition {
            column: "age".into(),
            op: CmpOp::Ge,
            value: Some(30.0),
            text: None,
        };
        assert!(c.holds("30") && c.holds(" 31 ") && !c.holds("29.9") && !c.holds("NA"));
        let t = Condition {
            column: "type".into(),
            op: CmpOp::Eq,
            value: None,
            text: Some("Yes".into()),
        };
        assert!(t.holds("Yes") && !t.holds("No"));
        let mut bad = query();
        bad.columns[0].edges = vec![0.0, 150.0, 100.0, 200.0];
        assert!(bad.validate().unwrap_err().contains("edges must rise"));
        let mut bad = query();
        bad.cohort.push(Condition {
            text: Some("x".into()),
            ..c.clone()
        });
        assert!(bad.validate().unwrap_err().contains("not both"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

        /// Whatever the data, and with the noise on every entry anywhere within `Z`
        /// standard deviations (its corners included), each exact statistic lies within
        /// its stated error of the released one.
        #[test]
        fn every_stated_error_holds_while_the_noise_is_within_z_deviations(
            rows in proptest::collection::vec((0.0f64..200.0, 10.0f64..70.0), 1..300),
            sigma in proptest::prop_oneof![proptest::strategy::Just(0.0), 0.0f64..4.0],
            rounding in proptest::prop_oneof![proptest::strategy::Just(0.0), 0.0f64..0.01],
            noise in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(-1.0),
                    proptest::strategy::Just(1.0),
                    -1.0f64..1.0,
                ],
                14,
            ),
        ) {
            let q = StatsQuery { suppress_below: 0, ..query() };
            let rows: Vec<Vec<f64>> = rows.iter().map(|(a, b)| vec![*a, *b]).collect();
            let exact = q.encode(&rows);
            proptest::prop_assert_eq!(exact.len(), noise.len());
            let noisy: Vec<f64> = exact
                .iter()
                .zip(&noise)
                .map(|(x, e)| x + e * (Z * sigma + rounding))
                .collect();
            let r = q.release(&noisy, Some(sigma), rounding).unwrap();
            let n = rows.len() as f64;
            let within = |what: &str, released: &Released, exact: f64| {
                // Suppressed (noise took the count below 0, or the bin below 0).
                let Some(v) = released.value else { return Ok(()) };
                let slack = 1e-9 * (1.0 + exact.abs());
                proptest::prop_assert!(
                    (v - exact).abs() <= released.error + slack,
                    "{}: released {} ± {}, exact {}", what, v, released.error, exact
                );
                Ok(())
            };
            within("count", &r.count, n)?;
            for (j, (c, col)) in q.columns.iter().zip(&r.columns).enumerate() {
                let xs: Vec<f64> = rows.iter().map(|row| row[j]).collect();
                let mean = xs.iter().sum::<f64>() / n;
                let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
                within("mean", &col.mean, mean)?;
                within("variance", &col.variance, var)?;
                for (b, h) in col.histogram.iter().enumerate() {
                    let exact = xs.iter().filter(|x| c.bin(**x) == b).count() as f64;
                    within("bin", h, exact)?;
                }
                let mut sorted = xs.clone();
                sorted.sort_by(f64::total_cmp);
                for (p, v) in &col.quantiles {
                    let rank = ((p * n).ceil() as usize).clamp(1, sorted.len());
                    within("quantile", v, sorted[rank - 1])?;
                }
            }
            let out = r.left_out.unwrap();
            within("left out", &out.rows, 0.0)?;
            for (_, c) in &out.columns {
                within("left out of a column", c, 0.0)?;
            }
        }
    }
}
