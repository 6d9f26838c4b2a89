//! Gradient-boosted decision trees, horizontal and histogram-based, grown level by level
//! from secure sums of the sites' gradient histograms.
//!
//! 1. **Bins.** Step 0 asks each site for `[n, Σy]` and, per feature, the counts of its
//!    values on a fine grid of [`FINE_BINS`] equal bins between the feature's declared
//!    bounds. From the sums the aggregator takes the base score (the log-odds, or the mean,
//!    of the target) and up to `max_bins` bins per feature at the federation's quantiles.
//! 2. **Trees.** For each level of each tree the aggregator sends the ensemble so far (the
//!    finished trees, and the splits of the tree being grown); each site computes every
//!    row's gradient and Hessian of the loss at the finished trees' prediction, routes the
//!    row down the growing tree, and adds `[g, h, 1]` to the bin of each feature of the node
//!    it reaches at this level:
//!
//!    ```text
//!    [ rows | Σ loss | per open node, per feature, per bin: Σg Σh count ]
//!    ```
//!
//!    The aggregator picks each node's split with the largest gain
//!    `G_L²/(H_L+λ) + G_R²/(H_R+λ) − G²/(H+λ)` whose children keep at least
//!    `min_child_weight` of Hessian and `min_child_samples` rows, or makes it a leaf of
//!    value `−G/(H+λ)`; the last level's children are leaves.
//!
//! What leaves a site is only these sums: histograms over its rows, never a row. Because
//! the histograms add up, the federated ensemble is the one a single site holding every row
//! would grow (up to the order of floating-point sums).

use serde::{Deserialize, Serialize};

/// Equal bins per feature on which step 0 counts values, for the quantiles.
pub const FINE_BINS: usize = 256;
/// The deepest trees a query may ask for.
pub const MAX_DEPTH: u8 = 8;
/// The most trees a query may ask for.
pub const MAX_TREES: u32 = 1000;
/// The most bins per feature.
pub const MAX_BINS: u16 = 255;
/// The largest leaf value grown from noisy sums (in log-odds, before the learning rate).
pub const MAX_NOISY_LEAF: f64 = 5.0;

/// The most numbers one step may ask of a site.
pub const MAX_STEP_ENTRIES: u64 = 4_000_000;

/// The index `k` (1 to [`FINE_BINS`] − 1) of the fine grid's edge `c` of `range`, computed
/// as step 0's quantiles compute it; `None` when `c` is not one.
fn fine_edge(range: &FeatureRange, c: f64) -> Option<usize> {
    let width = (range.high - range.low) / FINE_BINS as f64;
    let k = ((c - range.low) / width).round();
    (k >= 1.0 && k < FINE_BINS as f64 && range.low + width * k == c).then_some(k as usize)
}

/// The loss the trees are fitted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Log loss of a binary target (1 for the positive class); predictions are
    /// probabilities.
    Logistic,
    /// Squared error of a numeric target.
    Squared,
}

/// A feature and its bounds: values are clipped to them for the bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureRange {
    /// The column.
    pub name: String,
    /// The lowest value binned apart.
    pub low: f64,
    /// The highest value binned apart.
    pub high: f64,
}

/// A boosted-trees model to fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boosting {
    /// The target column.
    pub target: String,
    /// For the logistic loss: the target value that is the positive class.
    pub positive_class: Option<String>,
    /// The loss.
    pub loss: Loss,
    /// The features, in the model's order.
    pub features: Vec<FeatureRange>,
    /// How many trees.
    pub trees: u32,
    /// How deep each tree (levels of splits).
    pub depth: u8,
    /// The shrinkage applied to each tree's leaves.
    pub learning_rate: f64,
    /// The most bins per feature.
    pub max_bins: u16,
    /// The L2 penalty λ on leaf values.
    pub l2: f64,
    /// The least Hessian a child may have.
    pub min_child_weight: f64,
    /// The fewest rows a child may have.
    pub min_child_samples: u32,
}

/// One step of a fit: which tree and level, and the ensemble so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeStep {
    /// The step, from 0 (the bins); each is its own secure-aggregation round.
    pub step: u32,
    /// For steps after 0: the tree being grown (its index in `model.trees`) and the level.
    pub level: Option<(u32, u8)>,
    /// The ensemble: after step 0, its bins and base score; the finished trees; and the tree
    /// being grown, last.
    pub model: Ensemble,
}

/// A node of a tree (stored as a complete binary tree: node `i` has children `2i + 1` and
/// `2i + 2`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Node {
    /// `x[feature] <= threshold` goes left.
    Split {
        /// The feature's index.
        feature: u16,
        /// The bin boundary.
        threshold: f64,
    },
    /// A leaf and its value (before the learning rate).
    Leaf {
        /// `−G/(H+λ)`.
        value: f64,
    },
    /// Not grown yet (or below a leaf).
    Open,
}

/// One tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    /// The nodes, `2^(depth+1) − 1` of them.
    pub nodes: Vec<Node>,
}

impl Tree {
    fn open(depth: u8) -> Tree {
        Tree {
            nodes: vec![Node::Open; (1usize << (depth + 1)) - 1],
        }
    }

    /// Where a row ends: `Ok(leaf value)` or `Err(open node)`.
    fn route(&self, x: &[f64]) -> Result<f64, usize> {
        let mut i = 0;
        loop {
            match self.nodes.get(i) {
                Some(Node::Split { feature, threshold }) => {
                    let v = x.get(usize::from(*feature)).copied().unwrap_or(f64::NAN);
                    i = if v <= *threshold {
                        2 * i + 1
                    } else {
                        2 * i + 2
                    };
                }
                Some(Node::Leaf { value }) => return Ok(*value),
                Some(Node::Open) => return Err(i),
                None => return Ok(0.0),
            }
        }
    }
}

/// A fitted (or growing) ensemble: everything needed to predict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ensemble {
    /// The loss (and so the link: sigmoid for logistic).
    pub loss: Loss,
    /// The features, in the order rows give them.
    pub features: Vec<String>,
    /// Each feature's bin boundaries (empty before the bins are known).
    pub cuts: Vec<Vec<f64>>,
    /// The prediction before any tree (log-odds or mean).
    pub base_score: f64,
    /// The shrinkage of every tree.
    pub learning_rate: f64,
    /// The trees.
    pub trees: Vec<Tree>,
}

impl Ensemble {
    /// The raw score (log-odds, or the prediction) of one row from the first `trees`
    /// trees; `None` when a tree cannot place the row (it is still growing).
    pub fn margin(&self, x: &[f64], trees: usize) -> Option<f64> {
        let mut f = self.base_score;
        for t in self.trees.iter().take(trees) {
            f += self.learning_rate * t.route(x).ok()?;
        }
        Some(f)
    }

    /// The prediction of one row: a probability (logistic) or a value (squared).
    pub fn predict(&self, x: &[f64]) -> Option<f64> {
        let m = self.margin(x, self.trees.len())?;
        Some(match self.loss {
            Loss::Logistic => sigmoid(m),
            Loss::Squared => m,
        })
    }

    /// Checks a model read from a file: finite numbers, rising cuts, whole trees whose
    /// splits name existing features.
    pub fn validate(&self) -> Result<(), String> {
        if self.cuts.len() != self.features.len() {
            return Err("the trees' bins do not cover their features".into());
        }
        if !(self.base_score.is_finite() && self.learning_rate.is_finite()) {
            return Err("the trees' base score or learning rate is not finite".into());
        }
        for c in &self.cuts {
            if c.iter().any(|x| !x.is_finite()) || c.windows(2).any(|w| w[0] >= w[1]) {
                return Err("a feature's bin boundaries do not rise".into());
            }
        }
        for (k, t) in self.trees.iter().enumerate() {
            for n in &t.nodes {
                match n {
                    Node::Split { feature, threshold }
                        if usize::from(*feature) >= self.features.len()
                            || !threshold.is_finite() =>
                    {
                        return Err(format!("tree {k} splits on a feature it does not have"));
                    }
                    Node::Leaf { value } if !value.is_finite() => {
                        return Err(format!("tree {k} has a non-finite leaf"));
                    }
                    _ => {}
                }
            }
            if t.route(&vec![f64::NEG_INFINITY; self.features.len()])
                .is_err()
                || t.route(&vec![f64::INFINITY; self.features.len()]).is_err()
                || t.nodes.iter().enumerate().any(|(i, n)| {
                    matches!(n, Node::Split { .. })
                        && (2 * i + 2 >= t.nodes.len()
                            || matches!(t.nodes[2 * i + 1], Node::Open)
                            || matches!(t.nodes[2 * i + 2], Node::Open))
                })
            {
                return Err(format!(
                    "tree {k} is not whole (a split without two children)"
                ));
            }
        }
        Ok(())
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

/// A row of a fit: its features (in the model's order) and target (0/1 for logistic).
#[derive(Debug, Clone, PartialEq)]
pub struct TreeRow {
    /// Features.
    pub x: Vec<f64>,
    /// Target.
    pub y: f64,
}

impl Boosting {
    /// Checks the model's settings.
    pub fn validate(&self) -> Result<(), String> {
        let f = self.features.len();
        if f == 0 || f > 1024 {
            return Err(format!("boosted trees: give 1 to 1024 features (got {f})"));
        }
        for (i, c) in self.features.iter().enumerate() {
            if c.name.is_empty() || self.features[..i].iter().any(|d| d.name == c.name) {
                return Err(format!(
                    "boosted trees: feature {:?} is empty or listed twice",
                    c.name
                ));
            }
            if c.name == self.target {
                return Err(format!(
                    "boosted trees: the target {:?} is also a feature",
                    c.name
                ));
            }
            if !(c.low.is_finite() && c.high.is_finite() && c.low < c.high) {
                return Err(format!(
                    "boosted trees: feature '{}' needs low < high",
                    c.name
                ));
            }
        }
        if self.target.is_empty() {
            return Err("boosted trees: name the target".into());
        }
        match (self.loss, &self.positive_class) {
            (Loss::Logistic, None) => {
                return Err("boosted trees: the logistic loss needs positive_class".into());
            }
            (Loss::Squared, Some(_)) => {
                return Err("boosted trees: positive_class is for the logistic loss".into());
            }
            _ => {}
        }
        if self.trees == 0 || self.trees > MAX_TREES {
            return Err(format!("boosted trees: trees must be 1 to {MAX_TREES}"));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return Err(format!("boosted trees: depth must be 1 to {MAX_DEPTH}"));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return Err("boosted trees: learning_rate must be in (0, 1]".into());
        }
        if self.max_bins < 2 || self.max_bins > MAX_BINS {
            return Err(format!("boosted trees: max_bins must be 2 to {MAX_BINS}"));
        }
        // The deepest level's histograms: 2^(depth−1) nodes × features × bins × 3 numbers.
        let largest = (1u64 << (self.depth - 1)) * f as u64 * u64::from(self.max_bins) * 3;
        if largest > MAX_STEP_ENTRIES {
            return Err(format!(
                "boosted trees: the deepest level would send {largest} numbers from each site \
                 (at most {MAX_STEP_ENTRIES}): fewer features, bins or levels"
            ));
        }
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !non_negative(self.l2) || !non_negative(self.min_child_weight) {
            return Err("boosted trees: l2 and min_child_weight must be at least 0".into());
        }
        Ok(())
    }

    /// The most steps a fit takes: the bins, then each level of each tree.
    pub fn max_steps(&self) -> u32 {
        1 + self.trees * u32::from(self.depth)
    }

    /// Whether `step` is one this model asks for: a level of the last tree of an ensemble
    /// of this model's features, with at most `trees` trees.
    pub fn check_step(&self, step: &TreeStep) -> Result<(), String> {
        if step.step >= self.max_steps() {
            return Err(format!(
                "step {} is past the model's {} steps",
                step.step,
                self.max_steps()
            ));
        }
        let m = &step.model;
        let names: Vec<&str> = self.features.iter().map(|f| f.name.as_str()).collect();
        if m.features
            .iter()
            .map(String::as_str)
            .ne(names.iter().copied())
            || m.loss != self.loss
        {
            return Err("the step's ensemble is not of this model's features and loss".into());
        }
        match step.level {
            None if step.step == 0 && m.trees.is_empty() => Ok(()),
            None => Err("only step 0 has no level".into()),
            Some((tree, level)) => {
                let tree = tree as usize;
                if step.step == 0
                    || level >= self.depth
                    || tree + 1 != m.trees.len()
                    || tree as u32 >= self.trees
                    || m.cuts.len() != self.features.len()
                    || m.cuts.iter().any(|c| c.len() >= usize::from(self.max_bins))
                    || m.trees
                        .iter()
                        .any(|t| t.nodes.len() != (1usize << (self.depth + 1)) - 1)
                {
                    return Err("the step's tree, level or bins do not fit the model".into());
                }
                if m.learning_rate != self.learning_rate || !m.base_score.is_finite() {
                    return Err("the step's learning rate is not the model's".into());
                }
                // Bins only at the fine grid's edges, splits only at bins: the aggregator
                // cannot ask about a value at a precision of its choosing.
                for (cuts, range) in m.cuts.iter().zip(&self.features) {
                    if cuts.iter().any(|c| fine_edge(range, *c).is_none()) {
                        return Err(format!(
                            "the bins of feature '{}' are not on its fine grid",
                            range.name
                        ));
                    }
                }
                for t in &m.trees {
                    for n in &t.nodes {
                        if let Node::Split { feature, threshold } = n
                            && !m
                                .cuts
                                .get(usize::from(*feature))
                                .is_some_and(|c| c.contains(threshold))
                        {
                            return Err("a split is not at one of its feature's bins".into());
                        }
                    }
                }
                m.validate_growing()
            }
        }
    }

    /// Whether `next` follows `prev`, the step this site answered before: the next step
    /// number, the same bins, base score and learning rate, the finished trees unchanged,
    /// and the growing tree grown by one level (or finished, and a new one begun). An
    /// aggregator cannot go back and ask about the same rows with other splits.
    pub fn check_follows(&self, prev: &TreeStep, next: &TreeStep) -> Result<(), String> {
        let refuse = |why: &str| {
            Err(format!(
                "step {} does not follow step {}: {why}",
                next.step, prev.step
            ))
        };
        if next.step != prev.step + 1 {
            return refuse("steps come one after the other");
        }
        let (p, n) = (&prev.model, &next.model);
        let Some((pt, pl)) = prev.level else {
            // After the bins: the first level of the first tree, nothing grown.
            return if next.level == Some((0, 0)) && n.trees == [Tree::open(self.depth)] {
                Ok(())
            } else {
                refuse("the first tree starts at its root")
            };
        };
        if n.cuts != p.cuts || n.base_score != p.base_score || n.learning_rate != p.learning_rate {
            return refuse("the bins, base score and learning rate stay as they were");
        }
        let Some((nt, nl)) = next.level else {
            return refuse("a level is named");
        };
        let (pt, nt) = (pt as usize, nt as usize);
        if n.trees.len() < pt + 1 || p.trees.len() != pt + 1 || n.trees[..pt] != p.trees[..pt] {
            return refuse("the finished trees stay as they were");
        }
        let level_of = |i: usize| (usize::BITS - 1 - (i + 1).leading_zeros()) as u8;
        // The tree grown at `prev`: what was decided stays; only the next level is new
        // (and, where the tree is finished, the leaves below its last splits).
        let deepest = if nt == pt { pl } else { pl + 1 };
        let kept = p.trees[pt]
            .nodes
            .iter()
            .zip(&n.trees[pt].nodes)
            .enumerate()
            .all(|(i, (a, b))| {
                (matches!(a, Node::Open) || a == b)
                    && (level_of(i) <= deepest || matches!(b, Node::Open))
            });
        if !kept {
            return refuse("the growing tree keeps its splits and grows one level");
        }
        let same_tree = nt == pt && nl == pl + 1 && n.trees.len() == pt + 1;
        let next_tree = nt == pt + 1
            && nl == 0
            && n.trees.len() == pt + 2
            && n.trees[nt] == Tree::open(self.depth);
        if same_tree || next_tree {
            Ok(())
        } else {
            refuse("the same tree's next level, or the next tree's root")
        }
    }

    /// Length of a site's vector at `step`.
    pub fn dimension(&self, step: &TreeStep) -> usize {
        match step.level {
            None => 2 + self.features.len() * FINE_BINS,
            Some((_, level)) => {
                let per_node: usize = step.model.cuts.iter().map(|c| c.len() + 1).sum();
                2 + (1usize << level) * per_node * 3
            }
        }
    }

    /// The L2 norm by which one row can change a site's vector at `step`, in the units of
    /// [`Boosting::encode_with`]'s private vector: at step 0 the row count, the target (a
    /// 0 or a 1) and one fine bin per feature; at a level, per feature one bin's gradient
    /// (within ±1), Hessian (within 0 and ¼, counted in quarters) and count. The logistic
    /// loss only: the squared loss's gradients are not bounded.
    pub fn sensitivity(&self, step: &TreeStep) -> f64 {
        let f = self.features.len() as f64;
        match step.level {
            None => (2.0 + f).sqrt(),
            Some(_) => (3.0 * f).sqrt(),
        }
    }

    /// A site's vector at `step` over `rows`.
    pub fn encode(&self, step: &TreeStep, rows: &[TreeRow]) -> Vec<f64> {
        self.encode_with(step, rows, false)
    }

    /// [`Boosting::encode`]; `private`: the vector differential privacy's noise is added to,
    /// in units of at most one per row and entry: at a level, no row count or loss (their
    /// entries 0) and Hessians in quarters (×4).
    pub fn encode_with(&self, step: &TreeStep, rows: &[TreeRow], private: bool) -> Vec<f64> {
        let mut v = vec![0.0; self.dimension(step)];
        v[0] = rows.len() as f64;
        let Some((tree, level)) = step.level else {
            for r in rows {
                v[1] += r.y;
                for (f, (x, range)) in r.x.iter().zip(&self.features).enumerate() {
                    let u = ((x - range.low) / (range.high - range.low)).clamp(0.0, 1.0);
                    let b = ((u * FINE_BINS as f64) as usize).min(FINE_BINS - 1);
                    v[2 + f * FINE_BINS + b] += 1.0;
                }
            }
            return v;
        };
        let m = &step.model;
        let offsets: Vec<usize> = m
            .cuts
            .iter()
            .scan(0, |at, c| {
                let here = *at;
                *at += c.len() + 1;
                Some(here)
            })
            .collect();
        let per_node: usize = m.cuts.iter().map(|c| c.len() + 1).sum();
        let first = (1usize << level) - 1;
        let growing = &m.trees[tree as usize];
        if private {
            v[0] = 0.0;
        }
        for r in rows {
            let Some(f) = m.margin(&r.x, tree as usize) else {
                continue;
            };
            let (loss, g, h) = self.loss_terms(f, r.y);
            let (g, h) = if private {
                (g.clamp(-1.0, 1.0), (4.0 * h).clamp(0.0, 1.0))
            } else {
                (g, h)
            };
            if !private {
                v[1] += loss;
            }
            let Err(node) = growing.route(&r.x) else {
                continue;
            };
            if node < first || node > 2 * first {
                continue;
            }
            let base = 2 + (node - first) * per_node * 3;
            for (k, x) in r.x.iter().enumerate() {
                let b = m.cuts[k].partition_point(|c| c < x);
                let at = base + (offsets[k] + b) * 3;
                v[at] += g;
                v[at + 1] += h;
                v[at + 2] += 1.0;
            }
        }
        v
    }

    /// The loss, its gradient and its Hessian at raw score `f` for target `y`.
    fn loss_terms(&self, f: f64, y: f64) -> (f64, f64, f64) {
        match self.loss {
            Loss::Logistic => {
                let p = sigmoid(f);
                let loss = -(y * p.max(1e-15).ln() + (1.0 - y) * (1.0 - p).max(1e-15).ln());
                (loss, p - y, (p * (1.0 - p)).max(1e-16))
            }
            Loss::Squared => (0.5 * (f - y) * (f - y), f - y, 1.0),
        }
    }
}

impl Ensemble {
    /// Like [`Ensemble::validate`], for an ensemble whose last tree is still growing.
    fn validate_growing(&self) -> Result<(), String> {
        let finished = Ensemble {
            trees: self.trees[..self.trees.len().saturating_sub(1)].to_vec(),
            ..self.clone()
        };
        finished.validate()
    }
}

/// What a boosted-trees query releases beside its model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreesSummary {
    /// Trees grown.
    pub trees: u32,
    /// Steps the sites answered (secure sums).
    pub steps: u32,
    /// The mean training loss over the sites' rows before each tree.
    pub train_loss: Vec<f64>,
    /// The entries each site sent at every step, in all (each a 64-bit fixed-point number
    /// under secure aggregation).
    pub entries_per_site: u64,
    /// Where the model was written.
    pub model: String,
}

/// The aggregator's side of a fit.
#[derive(Debug, Clone)]
pub struct Booster {
    spec: Boosting,
    /// The sums carry differential privacy's noise (see [`Boosting::encode_with`]).
    private: bool,
    step: u32,
    level: Option<(u32, u8)>,
    model: Ensemble,
    /// The mean training loss before each tree.
    losses: Vec<f64>,
}

/// What the booster wants next.
#[derive(Debug, Clone, PartialEq)]
pub enum BoostNext {
    /// The sites' sums at this step.
    Evaluate(TreeStep),
    /// The fitted ensemble, and the mean training loss before each tree.
    Done(Ensemble, Vec<f64>),
    /// No fit: why.
    Failed(String),
}

impl Booster {
    /// A fit of `spec`.
    pub fn new(spec: &Boosting) -> Booster {
        Booster::with_noise(spec, false)
    }

    /// A fit of `spec` from noisy sums when `private`: Hessians are read back from
    /// quarters, negative Hessians and counts taken as 0, and no loss is reported.
    pub fn with_noise(spec: &Boosting, private: bool) -> Booster {
        Booster {
            private,
            spec: spec.clone(),
            step: 0,
            level: None,
            model: Ensemble {
                loss: spec.loss,
                features: spec.features.iter().map(|f| f.name.clone()).collect(),
                cuts: Vec::new(),
                base_score: 0.0,
                learning_rate: spec.learning_rate,
                trees: Vec::new(),
            },
            losses: Vec::new(),
        }
    }

    /// The step to ask for now.
    pub fn current(&self) -> TreeStep {
        TreeStep {
            step: self.step,
            level: self.level,
            model: self.model.clone(),
        }
    }

    /// Takes the summed vector of the current step; says what next.
    pub fn observe(&mut self, sum: &[f64]) -> BoostNext {
        let step = self.current();
        if sum.len() != self.spec.dimension(&step) || sum.iter().any(|x| !x.is_finite()) {
            return BoostNext::Failed(format!(
                "the sites' sums are not {} finite numbers",
                self.spec.dimension(&step)
            ));
        }
        let n = sum[0];
        if n < 1.0 && !(self.private && self.level.is_some()) {
            return BoostNext::Failed("no rows to fit".into());
        }
        match self.level {
            None => {
                self.model.base_score = match self.spec.loss {
                    Loss::Logistic => {
                        let p = (sum[1] / n).clamp(1e-6, 1.0 - 1e-6);
                        (p / (1.0 - p)).ln()
                    }
                    Loss::Squared => sum[1] / n,
                };
                self.model.cuts = self
                    .spec
                    .features
                    .iter()
                    .enumerate()
                    .map(|(f, range)| {
                        quantile_cuts(
                            &sum[2 + f * FINE_BINS..2 + (f + 1) * FINE_BINS],
                            range,
                            self.spec.max_bins,
                        )
                    })
                    .collect();
                self.model.trees.push(Tree::open(self.spec.depth));
                self.level = Some((0, 0));
            }
            Some((tree, level)) => {
                if level == 0 && !self.private {
                    self.losses.push(sum[1] / n);
                }
                // Hessians back from quarters; negative noisy values are handled where bins
                // are added up, not bin by bin (which would bias the sums upwards).
                let hist: Vec<f64> = if self.private {
                    sum[2..]
                        .chunks(3)
                        .flat_map(|e| [e[0], e[1] / 4.0, e[2]])
                        .collect()
                } else {
                    sum[2..].to_vec()
                };
                let open_left = self.grow(tree as usize, level, &hist);
                let last_level = level + 1 == self.spec.depth;
                if last_level || !open_left {
                    if tree + 1 == self.spec.trees {
                        return BoostNext::Done(self.model.clone(), self.losses.clone());
                    }
                    self.model.trees.push(Tree::open(self.spec.depth));
                    self.level = Some((tree + 1, 0));
                } else {
                    self.level = Some((tree, level + 1));
                }
            }
        }
        self.step += 1;
        BoostNext::Evaluate(self.current())
    }

    /// Splits (or closes) each open node at `level` of tree `tree` from its histograms;
    /// whether any node below is still open.
    fn grow(&mut self, tree: usize, level: u8, hist: &[f64]) -> bool {
        let cuts = self.model.cuts.clone();
        let per_node: usize = cuts.iter().map(|c| c.len() + 1).sum();
        let first = (1usize << level) - 1;
        let last_level = level + 1 == self.spec.depth;
        let (lambda, min_h, min_n) = (
            self.spec.l2,
            self.spec.min_child_weight,
            f64::from(self.spec.min_child_samples),
        );
        // Noisy sums: a Hessian below 0 is taken as 0, and a leaf is kept within
        // ±MAX_NOISY_LEAF (a tiny noisy Hessian would otherwise make it huge).
        let private = self.private;
        let leaf = |g: f64, h: f64| {
            let h = h.max(0.0);
            let w = if h + lambda > 0.0 {
                -g / (h + lambda)
            } else {
                0.0
            };
            if private {
                w.clamp(-MAX_NOISY_LEAF, MAX_NOISY_LEAF)
            } else {
                w
            }
        };
        let score = |g: f64, h: f64| {
            let h = h.max(0.0);
            if h + lambda > 0.0 {
                g * g / (h + lambda)
            } else {
                0.0
            }
        };
        let mut any_open = false;
        for slot in 0..=first {
            let node = first + slot;
            if !matches!(self.model.trees[tree].nodes[node], Node::Open) {
                continue;
            }
            let bins = &hist[slot * per_node * 3..(slot + 1) * per_node * 3];
            // Each feature's bins add up to the node's totals: exact sums give the same
            // totals for every feature; noisy ones give independent estimates, whose mean is
            // the node's (and each feature's split uses its own, so that left and right
            // add up).
            let mut totals = Vec::with_capacity(cuts.len());
            let mut offset = 0;
            for c in &cuts {
                let (mut g, mut h, mut n) = (0.0, 0.0, 0.0);
                for b in 0..=c.len() {
                    let at = (offset + b) * 3;
                    g += bins[at];
                    h += bins[at + 1];
                    n += bins[at + 2];
                }
                totals.push((g, h, n));
                offset += c.len() + 1;
            }
            let count = totals.len().max(1) as f64;
            let (g, h, n) = if private {
                totals.iter().fold((0.0, 0.0, 0.0), |a, t| {
                    (a.0 + t.0 / count, a.1 + t.1 / count, a.2 + t.2 / count)
                })
            } else {
                totals.first().copied().unwrap_or((0.0, 0.0, 0.0))
            };
            let mut best: Option<Candidate> = None;
            let mut offset = 0;
            for (f, c) in cuts.iter().enumerate() {
                let (g, h, n) = totals[f];
                let (mut gl, mut hl, mut nl) = (0.0, 0.0, 0.0);
                for (b, threshold) in c.iter().enumerate() {
                    let at = (offset + b) * 3;
                    gl += bins[at];
                    hl += bins[at + 1];
                    nl += bins[at + 2];
                    let (gr, hr, nr) = (g - gl, h - hl, n - nl);
                    if hl < min_h || hr < min_h || nl < min_n || nr < min_n {
                        continue;
                    }
                    let gain = score(gl, hl) + score(gr, hr) - score(g, h);
                    if gain > 1e-12 && best.is_none_or(|b| gain > b.0) {
                        best = Some((gain, f as u16, *threshold, (gl, hl), (gr, hr)));
                    }
                }
                offset += c.len() + 1;
            }
            let nodes = &mut self.model.trees[tree].nodes;
            match best {
                Some((_, feature, threshold, (gl, hl), (gr, hr))) if n > 0.0 => {
                    nodes[node] = Node::Split { feature, threshold };
                    if last_level {
                        nodes[2 * node + 1] = Node::Leaf {
                            value: leaf(gl, hl),
                        };
                        nodes[2 * node + 2] = Node::Leaf {
                            value: leaf(gr, hr),
                        };
                    } else {
                        any_open = true;
                    }
                }
                _ => nodes[node] = Node::Leaf { value: leaf(g, h) },
            }
        }
        any_open
    }
}

/// A split considered: its gain, feature, threshold, and the left and right children's
/// gradient and Hessian sums.
type Candidate = (f64, u16, f64, (f64, f64), (f64, f64));

/// Up to `max_bins − 1` boundaries at the quantiles of a feature's fine histogram: each the
/// upper edge of the fine bin where the cumulative count first reaches `k/max_bins` of the
/// total. Boundaries at the top of the range or above every value, and repeats, are
/// dropped.
fn quantile_cuts(fine: &[f64], range: &FeatureRange, max_bins: u16) -> Vec<f64> {
    let total: f64 = fine.iter().map(|c| c.max(0.0)).sum();
    if total <= 0.0 {
        return Vec::new();
    }
    let width = (range.high - range.low) / FINE_BINS as f64;
    let mut cuts: Vec<f64> = Vec::new();
    let mut cum = 0.0;
    let mut k = 1;
    for (b, c) in fine.iter().enumerate() {
        cum += c.max(0.0);
        while k < max_bins && cum >= total * f64::from(k) / f64::from(max_bins) {
            // As `fine_edge` recognises it.
            let edge = range.low + width * ((b + 1) as f64);
            // A boundary with nothing above it separates nothing.
            if edge < range.high && cum < total && cuts.last().is_none_or(|l| *l < edge) {
                cuts.push(edge);
            }
            k += 1;
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Boosting {
        Boosting {
            target: "y".into(),
            positive_class: Some("1".into()),
            loss: Loss::Logistic,
            features: vec![
                FeatureRange {
                    name: "a".into(),
                    low: 0.0,
                    high: 10.0,
                },
                FeatureRange {
                    name: "b".into(),
                    low: -5.0,
                    high: 5.0,
                },
            ],
            trees: 8,
            depth: 3,
            learning_rate: 0.3,
            max_bins: 16,
            l2: 1.0,
            min_child_weight: 1e-3,
            min_child_samples: 5,
        }
    }

    /// Rows whose class depends on both features, not linearly.
    fn rows(seed: u32, n: u32) -> Vec<TreeRow> {
        (0..n)
            .map(|i| {
                let a = f64::from((i * 37 + seed * 11) % 100) / 10.0;
                let b = f64::from((i * 53 + seed * 7) % 100) / 10.0 - 5.0;
                let y = f64::from(u8::from(
                    (a > 5.0) != (b > 1.0) || (i + seed).is_multiple_of(17),
                ));
                TreeRow { x: vec![a, b], y }
            })
            .collect()
    }

    fn fit(spec: &Boosting, sites: &[Vec<TreeRow>]) -> (Ensemble, Vec<f64>, u32) {
        let mut booster = Booster::new(spec);
        let mut step = booster.current();
        let mut steps = 1;
        loop {
            spec.check_step(&step).unwrap();
            let mut sum = vec![0.0; spec.dimension(&step)];
            for rows in sites {
                for (s, v) in sum.iter_mut().zip(spec.encode(&step, rows)) {
                    *s += v;
                }
            }
            match booster.observe(&sum) {
                BoostNext::Evaluate(s) => {
                    spec.check_follows(&step, &s).unwrap();
                    step = s;
                    steps += 1;
                }
                BoostNext::Done(model, losses) => return (model, losses, steps),
                BoostNext::Failed(why) => panic!("{why}"),
            }
        }
    }

    #[test]
    fn the_federated_ensemble_is_the_pooled_one() {
        let s = spec();
        s.validate().unwrap();
        let sites = [rows(1, 120), rows(2, 90), rows(3, 150)];
        let (federated, losses, steps) = fit(&s, &sites);
        let pooled: Vec<TreeRow> = sites.iter().flatten().cloned().collect();
        let (one, _, _) = fit(&s, std::slice::from_ref(&pooled));
        federated.validate().unwrap();
        assert_eq!(federated.trees.len(), 8);
        assert!(steps <= s.max_steps());
        for (a, b) in federated.trees.iter().zip(&one.trees) {
            for (x, y) in a.nodes.iter().zip(&b.nodes) {
                match (x, y) {
                    (Node::Leaf { value: u }, Node::Leaf { value: v }) => {
                        assert!((u - v).abs() < 1e-9);
                    }
                    _ => assert_eq!(x, y),
                }
            }
        }
        // Training loss falls tree by tree, and the model separates the classes.
        assert!(
            losses.windows(2).all(|w| w[1] <= w[0] + 1e-12),
            "{losses:?}"
        );
        let right = pooled
            .iter()
            .filter(|r| (federated.predict(&r.x).unwrap() > 0.5) == (r.y == 1.0))
            .count();
        assert!(
            right as f64 > 0.85 * pooled.len() as f64,
            "{right} of {}",
            pooled.len()
        );
    }

    #[test]
    fn the_squared_loss_fits_a_numeric_target() {
        let s = Boosting {
            target: "y".into(),
            positive_class: None,
            loss: Loss::Squared,
            trees: 30,
            ..spec()
        };
        s.validate().unwrap();
        // y = a step in a plus a slope in b: trees of depth 3 follow it closely.
        let rows: Vec<TreeRow> = rows(4, 300)
            .into_iter()
            .map(|r| TreeRow {
                y: 10.0 * f64::from(u8::from(r.x[0] > 4.0)) + r.x[1],
                x: r.x,
            })
            .collect();
        let (model, losses, _) = fit(&s, std::slice::from_ref(&rows));
        let mean = rows.iter().map(|r| r.y).sum::<f64>() / rows.len() as f64;
        assert!((model.base_score - mean).abs() < 1e-9);
        let mse = rows
            .iter()
            .map(|r| (model.predict(&r.x).unwrap() - r.y).powi(2))
            .sum::<f64>()
            / rows.len() as f64;
        let var = rows.iter().map(|r| (r.y - mean).powi(2)).sum::<f64>() / rows.len() as f64;
        assert!(mse < 0.05 * var, "mse {mse}, variance {var}");
        assert!(losses.windows(2).all(|w| w[1] <= w[0] + 1e-12));
    }

    /// One row more or less moves a site's private vector by at most the stated
    /// sensitivity, at step 0 and at every level (the noise is calibrated to it).
    #[test]
    fn one_row_moves_the_private_vector_by_at_most_the_sensitivity() {
        let s = spec();
        let all = rows(5, 200);
        let mut booster = Booster::new(&s);
        let mut step = booster.current();
        for _ in 0..6 {
            let with = s.encode_with(&step, &all, true);
            for i in (0..all.len()).step_by(17) {
                let mut fewer = all.clone();
                fewer.remove(i);
                let without = s.encode_with(&step, &fewer, true);
                let d: f64 = with
                    .iter()
                    .zip(&without)
                    .map(|(a, b)| (a - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(d <= s.sensitivity(&step) + 1e-9, "step {}: {d}", step.step);
            }
            match booster.observe(&s.encode(&step, &all)) {
                BoostNext::Evaluate(next) => step = next,
                other => panic!("{other:?}"),
            }
        }
    }

    /// With noise of the sensitivity's scale on every sum, a large enough federation still
    /// grows a model that separates the classes.
    #[test]
    fn noisy_histograms_still_grow_a_model_on_many_rows() {
        use rand::{RngExt, SeedableRng};
        let s = Boosting {
            trees: 5,
            depth: 2,
            ..spec()
        };
        let sites = [rows(1, 6000), rows(2, 6000), rows(3, 6000)];
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let mut gauss = || {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let z = 2.0;
        let mut booster = Booster::with_noise(&s, true);
        let mut step = booster.current();
        let model = loop {
            let sigma = z * s.sensitivity(&step);
            let mut sum = vec![0.0; s.dimension(&step)];
            for rows in &sites {
                for (t, v) in sum.iter_mut().zip(s.encode_with(&step, rows, true)) {
                    *t += v;
                }
            }
            sum.iter_mut().for_each(|x| *x += sigma * gauss());
            match booster.observe(&sum) {
                BoostNext::Evaluate(next) => step = next,
                BoostNext::Done(model, losses) => {
                    assert!(losses.is_empty(), "no loss is reported from noisy sums");
                    break model;
                }
                BoostNext::Failed(why) => panic!("{why}"),
            }
        };
        model.validate().unwrap();
        let pooled: Vec<TreeRow> = sites.iter().flatten().cloned().collect();
        let right = pooled
            .iter()
            .filter(|r| (model.predict(&r.x).unwrap() > 0.5) == (r.y == 1.0))
            .count();
        assert!(
            right as f64 > 0.8 * pooled.len() as f64,
            "{right} of {}",
            pooled.len()
        );
    }

    #[test]
    fn quantile_cuts_follow_the_data() {
        let range = FeatureRange {
            name: "a".into(),
            low: 0.0,
            high: 256.0,
        };
        // All mass in fine bins 10 and 200: one boundary between them.
        let mut fine = vec![0.0; FINE_BINS];
        fine[10] = 50.0;
        fine[200] = 50.0;
        assert_eq!(quantile_cuts(&fine, &range, 4), vec![11.0]);
        let uniform = vec![1.0; FINE_BINS];
        let cuts = quantile_cuts(&uniform, &range, 4);
        assert_eq!(cuts, vec![64.0, 128.0, 192.0]);
    }

    /// A hostile aggregator cannot split where it likes, move the bins, or go back to ask
    /// about the same rows with other splits.
    #[test]
    fn a_step_must_follow_the_last_one_within_the_models_bins() {
        let s = spec();
        let mut booster = Booster::new(&s);
        let step0 = booster.current();
        let sum: Vec<f64> = s.encode(&step0, &rows(1, 300));
        let BoostNext::Evaluate(step1) = booster.observe(&sum) else {
            panic!("no step 1")
        };
        s.check_step(&step1).unwrap();
        s.check_follows(&step0, &step1).unwrap();
        let BoostNext::Evaluate(step2) = booster.observe(&s.encode(&step1, &rows(1, 300))) else {
            panic!("no step 2")
        };
        s.check_follows(&step1, &step2).unwrap();
        // A split at a threshold of the aggregator's choosing.
        let mut bad = step2.clone();
        bad.model.trees[0].nodes[0] = Node::Split {
            feature: 0,
            threshold: 4.321,
        };
        assert!(s.check_step(&bad).unwrap_err().contains("bins"));
        // Bins off the fine grid.
        let mut bad = step2.clone();
        bad.model.cuts[0][0] += 1e-3;
        assert!(s.check_step(&bad).is_err());
        // The same level asked again with another split at the root.
        let mut again = step2.clone();
        again.step = step2.step + 1;
        let other = s.features.len() as u16 - 1;
        again.model.trees[0].nodes[0] = Node::Split {
            feature: other,
            threshold: step2.model.cuts[usize::from(other)][0],
        };
        assert!(s.check_follows(&step2, &again).is_err());
        // Skipping a step, or a changed learning rate.
        let mut skip = step2.clone();
        skip.step += 5;
        assert!(s.check_follows(&step1, &skip).is_err());
        let mut lr = step2.clone();
        lr.model.learning_rate = 0.9;
        assert!(s.check_step(&lr).is_err());
    }

    #[test]
    fn steps_outside_the_model_are_refused_and_broken_models_named() {
        let s = spec();
        let booster = Booster::new(&s);
        let mut step = booster.current();
        step.step = s.max_steps();
        assert!(s.check_step(&step).is_err());
        let mut step = booster.current();
        step.model.features.swap(0, 1);
        assert!(s.check_step(&step).is_err());
        let (mut model, _, _) = fit(&s, &[rows(1, 200)]);
        model.trees[0].nodes[0] = Node::Split {
            feature: 9,
            threshold: 1.0,
        };
        assert!(model.validate().is_err());
    }
}
