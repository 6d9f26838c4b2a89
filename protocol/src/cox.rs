//! Cox proportional-hazards models fitted across sites by Newton–Raphson, each site a
//! stratum of its own.
//!
//! Each site's patients have their own baseline hazard (and, with a strata column, each
//! level within a site too), so the partial log-likelihood is a sum over sites, and so are
//! its gradient and Hessian. At each iteration the aggregator sends the coefficients `β`;
//! every site answers, over its own risk sets,
//!
//! ```text
//! [ n | events | log L(β) | ∂ log L (p) | ∂² log L (upper triangle, p(p+1)/2) |
//!   comparable pairs | concordant | tied ]
//! ```
//!
//! summed by secure aggregation, and the aggregator takes the Newton step
//! `β ← β − H⁻¹ g` (halving it where the likelihood falls) until the step is below
//! [`TOLERANCE`] or the Newton decrement below [`DECREMENT_TOLERANCE`]. Nothing per patient or per event time leaves a site: only these sums, at
//! most [`Cox::max_iterations`] times. The fit equals the pooled data's Cox model
//! stratified by site (lifelines' `CoxPHFitter(strata=["site"])`, R's
//! `coxph(... + strata(site))`), with Breslow's or Efron's handling of tied times.
//!
//! The concordance index counts pairs within a stratum (as R and lifelines do for a
//! stratified model): a pair is comparable when the earlier time is an event (a censoring at
//! the same time counts as later); it is concordant when the earlier one has the higher
//! risk score `βᵀx`, and tied scores count one half.

use serde::{Deserialize, Serialize};

/// The Newton step, in every coefficient, below which the fit has converged.
pub const TOLERANCE: f64 = 1e-9;

/// The Newton decrement below which the fit has converged (the log-likelihood could gain
/// less than half of it): far above the fixed-point rounding of secure aggregation's sums,
/// far below any difference in the fit that a report shows.
pub const DECREMENT_TOLERANCE: f64 = 1e-12;

/// The most iterations a query may ask for: each is one exact release of every site's sums.
pub const MAX_ITERATIONS: u32 = 50;

/// How tied event times enter the partial likelihood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ties {
    /// Breslow's approximation: every tied event sees the whole risk set.
    Breslow,
    /// Efron's approximation (lifelines' and R's default).
    #[default]
    Efron,
}

/// The Cox part of a statistics query (with its survival part: time, event, strata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cox {
    /// The covariates, numeric columns, in the coefficients' order.
    pub covariates: Vec<String>,
    /// How tied event times are handled.
    pub ties: Ties,
    /// The most iterations the sites answer (each is a release of their sums).
    pub max_iterations: u32,
}

/// One iteration's request: the coefficients to evaluate the sites' sums at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoxStep {
    /// The iteration, from 0; each is its own secure-aggregation round.
    pub iteration: u32,
    /// The coefficients, in the covariates' order.
    pub beta: Vec<f64>,
}

impl Cox {
    /// Checks the covariates (1 to 32, distinct, not empty) and the iteration limit.
    pub fn validate(&self) -> Result<(), String> {
        let p = self.covariates.len();
        if p == 0 || p > 32 {
            return Err(format!("cox: give 1 to 32 covariates (got {p})"));
        }
        for (i, c) in self.covariates.iter().enumerate() {
            if c.is_empty() || self.covariates[..i].contains(c) {
                return Err(format!("cox: covariate {c:?} is empty or listed twice"));
            }
        }
        if self.max_iterations == 0 || self.max_iterations > MAX_ITERATIONS {
            return Err(format!(
                "cox: max_iterations must be 1 to {MAX_ITERATIONS} (got {})",
                self.max_iterations
            ));
        }
        Ok(())
    }

    fn p(&self) -> usize {
        self.covariates.len()
    }

    /// Entries of the Hessian's upper triangle.
    fn q(&self) -> usize {
        self.p() * (self.p() + 1) / 2
    }

    /// Length of a site's Cox section.
    pub fn dimension(&self) -> usize {
        3 + self.p() + self.q() + 3
    }

    /// Whether a step fits this model (an iteration below the limit, finite coefficients).
    pub fn check_step(&self, step: &CoxStep) -> Result<(), String> {
        if step.iteration >= self.max_iterations {
            return Err(format!(
                "iteration {} is past the query's max_iterations ({})",
                step.iteration, self.max_iterations
            ));
        }
        if step.beta.len() != self.p() || step.beta.iter().any(|b| !b.is_finite() || b.abs() > 1e3)
        {
            return Err(format!(
                "the step's coefficients must be {} finite numbers of at most 1000 in size",
                self.p()
            ));
        }
        Ok(())
    }

    /// A site's section at `beta`, over its rows.
    pub fn encode(&self, rows: &[CoxRow], beta: &[f64]) -> Vec<f64> {
        let t = site_terms(rows, beta, self.ties);
        let mut v = Vec::with_capacity(self.dimension());
        v.extend([rows.len() as f64, t.events, t.loglik]);
        v.extend(&t.gradient);
        let p = self.p();
        for i in 0..p {
            for j in i..p {
                v.push(t.hessian[i * p + j]);
            }
        }
        v.extend([t.comparable, t.concordant, t.tied]);
        v
    }

    fn decode(&self, v: &[f64]) -> Sums {
        let p = self.p();
        let mut hessian = vec![0.0; p * p];
        let mut at = 3 + p;
        for i in 0..p {
            for j in i..p {
                hessian[i * p + j] = v[at];
                hessian[j * p + i] = v[at];
                at += 1;
            }
        }
        Sums {
            n: v[0],
            events: v[1],
            loglik: v[2],
            gradient: v[3..3 + p].to_vec(),
            hessian,
            comparable: v[at],
            concordant: v[at + 1],
            tied: v[at + 2],
        }
    }
}

/// One patient in a Cox fit.
#[derive(Debug, Clone, PartialEq)]
pub struct CoxRow {
    /// Follow-up time.
    pub time: f64,
    /// Whether it ended with the event.
    pub event: bool,
    /// The stratum within the site (0 without a strata column).
    pub stratum: usize,
    /// The covariates, in the model's order.
    pub x: Vec<f64>,
}

/// A site's (or a sum of sites') terms at some `β`.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    /// Events.
    pub events: f64,
    /// The partial log-likelihood.
    pub loglik: f64,
    /// Its gradient.
    pub gradient: Vec<f64>,
    /// Its Hessian, `p × p` row-major (negative semi-definite).
    pub hessian: Vec<f64>,
    /// Comparable pairs for the concordance index.
    pub comparable: f64,
    /// Concordant pairs among them.
    pub concordant: f64,
    /// Pairs among them with tied risk scores.
    pub tied: f64,
}

/// The partial log-likelihood, its derivatives and the concordance counts of `rows` at
/// `beta`, each stratum with its own risk sets. Covariates are centred on each stratum's
/// mean first (this changes no term, and keeps `exp(βᵀx)` in range).
pub fn site_terms(rows: &[CoxRow], beta: &[f64], ties: Ties) -> Terms {
    let p = beta.len();
    let mut out = Terms {
        events: 0.0,
        loglik: 0.0,
        gradient: vec![0.0; p],
        hessian: vec![0.0; p * p],
        comparable: 0.0,
        concordant: 0.0,
        tied: 0.0,
    };
    let strata = rows.iter().map(|r| r.stratum + 1).max().unwrap_or(0);
    for s in 0..strata {
        let mut group: Vec<&CoxRow> = rows.iter().filter(|r| r.stratum == s).collect();
        if group.is_empty() {
            continue;
        }
        let n = group.len() as f64;
        let mean: Vec<f64> = (0..p)
            .map(|k| group.iter().map(|r| r.x[k]).sum::<f64>() / n)
            .collect();
        // Latest first: the risk set at a time is everyone seen so far.
        group.sort_by(|a, b| b.time.total_cmp(&a.time));
        let xs: Vec<Vec<f64>> = group
            .iter()
            .map(|r| r.x.iter().zip(&mean).map(|(x, m)| x - m).collect())
            .collect();
        let eta: Vec<f64> = xs
            .iter()
            .map(|x| x.iter().zip(beta).map(|(x, b)| x * b).sum())
            .collect();
        stratum_terms(&group, &xs, &eta, ties, &mut out);
        concordance(&group, &eta, &mut out);
    }
    out
}

/// Adds one stratum's likelihood terms; `group` is sorted by time, latest first.
/// The weights are `exp(η − top)`, `top` the largest `η` in the risk set so far (the
/// sums are rescaled when it grows), so that none overflows and the largest is 1: every
/// term is a ratio of weights but the log of the risk set's sum, which adds `top` back.
fn stratum_terms(group: &[&CoxRow], xs: &[Vec<f64>], eta: &[f64], ties: Ties, out: &mut Terms) {
    let p = out.gradient.len();
    let (mut s0, mut s1, mut s2) = (0.0, vec![0.0; p], vec![0.0; p * p]);
    let mut top = f64::NEG_INFINITY;
    let mut i = 0;
    while i < group.len() {
        let t = group[i].time;
        let end = i + group[i..].iter().take_while(|r| r.time == t).count();
        let here = eta[i..end]
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        if here > top {
            let scale = if top.is_finite() {
                (top - here).exp()
            } else {
                0.0
            };
            s0 *= scale;
            s1.iter_mut().for_each(|x| *x *= scale);
            s2.iter_mut().for_each(|x| *x *= scale);
            top = here;
        }
        let mut j = i;
        // Events at this time: their count and sums.
        let (mut d, mut e0, mut e1, mut e2, mut xsum) =
            (0.0, 0.0, vec![0.0; p], vec![0.0; p * p], vec![0.0; p]);
        while j < group.len() && group[j].time == t {
            let w = (eta[j] - top).exp();
            let x = &xs[j];
            s0 += w;
            for a in 0..p {
                s1[a] += w * x[a];
                for b in 0..p {
                    s2[a * p + b] += w * x[a] * x[b];
                }
            }
            if group[j].event {
                d += 1.0;
                e0 += w;
                for a in 0..p {
                    e1[a] += w * x[a];
                    xsum[a] += x[a];
                    for b in 0..p {
                        e2[a * p + b] += w * x[a] * x[b];
                    }
                }
                out.loglik += eta[j];
            }
            j += 1;
        }
        if d > 0.0 {
            out.events += d;
            for (g, x) in out.gradient.iter_mut().zip(&xsum) {
                *g += x;
            }
            // Breslow: each of the d events sees the whole risk set; Efron: the l-th sees it
            // less l/d of the tied events' weight.
            let shares = match ties {
                Ties::Breslow => 1,
                Ties::Efron => d as usize,
            };
            for l in 0..shares {
                let (phi, times) = match ties {
                    Ties::Breslow => (0.0, d),
                    Ties::Efron => (l as f64 / d, 1.0),
                };
                let a0 = s0 - phi * e0;
                let a1: Vec<f64> = (0..p).map(|a| s1[a] - phi * e1[a]).collect();
                out.loglik -= times * (a0.ln() + top);
                for a in 0..p {
                    out.gradient[a] -= times * a1[a] / a0;
                    for b in 0..p {
                        let a2 = s2[a * p + b] - phi * e2[a * p + b];
                        out.hessian[a * p + b] -= times * (a2 / a0 - a1[a] * a1[b] / (a0 * a0));
                    }
                }
            }
        }
        i = j;
    }
}

/// Adds one stratum's concordance counts (Harrell's, with lifelines' and R's handling of
/// ties); `group` is sorted by time, latest first. A Fenwick tree over the ranks of the
/// scores holds everyone later than the time at hand.
fn concordance(group: &[&CoxRow], eta: &[f64], out: &mut Terms) {
    let mut sorted: Vec<f64> = eta.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.dedup();
    let rank = |x: f64| sorted.partition_point(|s| *s < x);
    let mut tree = vec![0.0f64; sorted.len() + 1];
    let add = |tree: &mut Vec<f64>, r: usize| {
        let mut i = r + 1;
        while i < tree.len() {
            tree[i] += 1.0;
            i += i & i.wrapping_neg();
        }
    };
    // How many in the tree have a rank below `r`.
    let below = |tree: &Vec<f64>, r: usize| {
        let mut i = r;
        let mut s = 0.0;
        while i > 0 {
            s += tree[i];
            i -= i & i.wrapping_neg();
        }
        s
    };
    let mut in_tree = 0.0;
    let mut i = 0;
    while i < group.len() {
        let t = group[i].time;
        let mut j = i;
        while j < group.len() && group[j].time == t {
            j += 1;
        }
        // Censored at this time count as later than the events at it.
        for k in i..j {
            if !group[k].event {
                add(&mut tree, rank(eta[k]));
                in_tree += 1.0;
            }
        }
        for k in i..j {
            if group[k].event {
                let r = rank(eta[k]);
                let lower = below(&tree, r);
                let tied = below(&tree, r + 1) - lower;
                out.comparable += in_tree;
                out.concordant += lower;
                out.tied += tied;
            }
        }
        for k in i..j {
            if group[k].event {
                add(&mut tree, rank(eta[k]));
                in_tree += 1.0;
            }
        }
        i = j;
    }
}

/// The sums of a Cox section.
#[derive(Debug, Clone)]
struct Sums {
    n: f64,
    events: f64,
    loglik: f64,
    gradient: Vec<f64>,
    hessian: Vec<f64>,
    comparable: f64,
    concordant: f64,
    tied: f64,
}

/// The aggregator's side of a fit: which `β` to ask for next, from the sums of the last.
#[derive(Debug, Clone)]
pub struct CoxFitter {
    cox: Cox,
    beta: Vec<f64>,
    iteration: u32,
    /// The last accepted point: its `β` and sums.
    accepted: Option<(Vec<f64>, Sums)>,
}

/// What the fitter wants next.
#[derive(Debug, Clone, PartialEq)]
pub enum CoxNext {
    /// The sites' sums at this step.
    Evaluate(CoxStep),
    /// The fit.
    Done(CoxFit),
    /// No fit: why.
    Failed(String),
}

impl CoxFitter {
    /// A fit starting from `β = 0`.
    pub fn new(cox: &Cox) -> CoxFitter {
        CoxFitter {
            cox: cox.clone(),
            beta: vec![0.0; cox.p()],
            iteration: 0,
            accepted: None,
        }
    }

    /// The first step.
    pub fn first(&self) -> CoxStep {
        CoxStep {
            iteration: 0,
            beta: self.beta.clone(),
        }
    }

    /// Takes the summed section at the last step asked for; says what next.
    pub fn observe(&mut self, section: &[f64]) -> CoxNext {
        if section.len() != self.cox.dimension() || section.iter().any(|x| !x.is_finite()) {
            return CoxNext::Failed(format!(
                "the sites' sums are not {} finite numbers",
                self.cox.dimension()
            ));
        }
        let sums = self.cox.decode(section);
        if sums.events < 1.0 {
            return CoxNext::Failed("no events: a Cox model cannot be fitted".into());
        }
        // A step that lowered the likelihood is halved, back towards the last good point
        // (a fall within the sums' fixed-point rounding is not one).
        if let Some((prev_beta, prev)) = &self.accepted
            && sums.loglik < prev.loglik - (1e-8 * prev.loglik.abs()).max(1e-6)
        {
            let halved: Vec<f64> = prev_beta
                .iter()
                .zip(&self.beta)
                .map(|(a, b)| (a + b) / 2.0)
                .collect();
            return self.ask(halved);
        }
        let p = self.cox.p();
        let neg: Vec<f64> = sums.hessian.iter().map(|h| -h).collect();
        let Some(cov) = crate::linalg::inverse(&neg, p) else {
            return CoxNext::Failed(
                "the information matrix is singular: a covariate is constant within every \
                 stratum, or covariates are collinear"
                    .into(),
            );
        };
        let step = crate::linalg::mul_vec(&cov, &sums.gradient);
        let beta = self.beta.clone();
        self.accepted = Some((beta.clone(), sums.clone()));
        let largest = step.iter().fold(0.0f64, |m, s| m.max(s.abs()));
        // Converged when the step is tiny, or small with a Newton decrement gᵀ(−H)⁻¹g (twice
        // what the step could still gain) below what the sums' fixed-point rounding leaves:
        // the step then only follows the rounding. (A separating covariate has a vanishing
        // decrement too, but steps that stay large.)
        let decrement: f64 = step.iter().zip(&sums.gradient).map(|(s, g)| s * g).sum();
        if largest < TOLERANCE || (largest < 1e-6 && decrement.abs() < DECREMENT_TOLERANCE) {
            let fitted: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b + s).collect();
            return CoxNext::Done(self.fit(fitted, &cov, &sums));
        }
        let next: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b + s).collect();
        self.ask(next)
    }

    fn ask(&mut self, beta: Vec<f64>) -> CoxNext {
        self.iteration += 1;
        if self.iteration >= self.cox.max_iterations {
            return CoxNext::Failed(format!(
                "did not converge in {} iterations (the largest Newton step was still above \
                 {TOLERANCE}): a covariate may separate the events completely, or the query \
                 needs a larger max_iterations",
                self.cox.max_iterations
            ));
        }
        if beta.iter().any(|b| !b.is_finite() || b.abs() > 1e3) {
            return CoxNext::Failed(
                "the coefficients diverge (a covariate may separate the events completely)".into(),
            );
        }
        self.beta = beta;
        CoxNext::Evaluate(CoxStep {
            iteration: self.iteration,
            beta: self.beta.clone(),
        })
    }

    fn fit(&self, beta: Vec<f64>, cov: &[f64], sums: &Sums) -> CoxFit {
        let p = self.cox.p();
        let coefficients = self
            .cox
            .covariates
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let se = cov[k * p + k].max(0.0).sqrt();
                let z = beta[k] / se;
                let half = Z95 * se;
                Coefficient {
                    covariate: name.clone(),
                    coef: beta[k],
                    hazard_ratio: beta[k].exp(),
                    se,
                    z,
                    p_value: libm::erfc(z.abs() / std::f64::consts::SQRT_2),
                    ci: (beta[k] - half, beta[k] + half),
                    hazard_ratio_ci: ((beta[k] - half).exp(), (beta[k] + half).exp()),
                }
            })
            .collect();
        CoxFit {
            coefficients,
            ties: self.cox.ties,
            log_likelihood: sums.loglik,
            patients: sums.n,
            events: sums.events,
            iterations: self.iteration + 1,
            concordance: (sums.comparable > 0.0)
                .then(|| (sums.concordant + 0.5 * sums.tied) / sums.comparable),
            covariance: cov.to_vec(),
        }
    }
}

/// The normal quantile of a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// One coefficient of a fitted model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coefficient {
    /// The covariate.
    pub covariate: String,
    /// `β`: the log hazard ratio per unit of the covariate.
    pub coef: f64,
    /// `exp(β)`.
    pub hazard_ratio: f64,
    /// The standard error of `β` (from the information matrix).
    pub se: f64,
    /// The Wald statistic `β / se`.
    pub z: f64,
    /// The two-sided p-value of `β = 0`.
    pub p_value: f64,
    /// The 95% interval of `β`.
    pub ci: (f64, f64),
    /// The 95% interval of the hazard ratio.
    pub hazard_ratio_ci: (f64, f64),
}

/// A fitted Cox model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoxFit {
    /// The coefficients, in the covariates' order.
    pub coefficients: Vec<Coefficient>,
    /// How tied times were handled.
    pub ties: Ties,
    /// The partial log-likelihood at the last evaluated point.
    pub log_likelihood: f64,
    /// Patients in the fit.
    pub patients: f64,
    /// Events in the fit.
    pub events: f64,
    /// Iterations the sites answered.
    pub iterations: u32,
    /// Harrell's concordance index within strata.
    pub concordance: Option<f64>,
    /// The coefficients' covariance (inverse information), `p × p` row-major.
    pub covariance: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time: f64, event: bool, x: &[f64]) -> CoxRow {
        CoxRow {
            time,
            event,
            stratum: 0,
            x: x.to_vec(),
        }
    }

    fn fit(cox: &Cox, sites: &[Vec<CoxRow>]) -> CoxFit {
        let mut f = CoxFitter::new(cox);
        let mut step = f.first();
        loop {
            let mut sum = vec![0.0; cox.dimension()];
            for rows in sites {
                for (s, v) in sum.iter_mut().zip(cox.encode(rows, &step.beta)) {
                    *s += v;
                }
            }
            match f.observe(&sum) {
                CoxNext::Evaluate(s) => step = s,
                CoxNext::Done(fit) => return fit,
                CoxNext::Failed(why) => panic!("{why}"),
            }
        }
    }

    /// One binary covariate, no ties: the partial likelihood by hand, maximised in closed
    /// form. Times 1..4; x = 1, 0, 1, 0; all events. Risk sets: {1,2,3,4}, {2,3,4}, {3,4},
    /// {4}. log L(β) = β − log(2e^β + 2) + 0 − log(e^β + 2) + β − log(e^β + 1).
    #[test]
    fn a_fit_maximises_the_partial_likelihood() {
        let cox = Cox {
            covariates: vec!["x".into()],
            ties: Ties::Breslow,
            max_iterations: 30,
        };
        let rows: Vec<CoxRow> = [(1.0, 1.0), (2.0, 0.0), (3.0, 1.0), (4.0, 0.0)]
            .iter()
            .map(|(t, x)| row(*t, true, &[*x]))
            .collect();
        let f = fit(&cox, &[rows]);
        let ll = |b: f64| {
            let e = b.exp();
            2.0 * b - (2.0 * e + 2.0).ln() - (e + 2.0).ln() - (e + 1.0).ln()
        };
        let b = f.coefficients[0].coef;
        // The derivative vanishes at the fit, and the likelihood is what the sites said.
        let h = 1e-6;
        assert!(((ll(b + h) - ll(b - h)) / (2.0 * h)).abs() < 1e-6);
        assert!((f.log_likelihood - ll(b)).abs() < 1e-9);
        // Its information: minus the second derivative.
        let info = -(ll(b + 1e-4) - 2.0 * ll(b) + ll(b - 1e-4)) / 1e-8;
        assert!((f.coefficients[0].se - (1.0 / info).sqrt()).abs() < 1e-4);
        assert_eq!(f.events, 4.0);
        // Concordance: pairs (i earlier, j later) = 6; x=1 earlier than x=0 is concordant
        // when β > 0: (1,2), (1,4), (3,4) concordant; (2,3) discordant; (1,3), (2,4) tied.
        assert!(b > 0.0);
        assert!((f.concordance.unwrap() - (3.0 + 1.0) / 6.0).abs() < 1e-12);
    }

    /// Without tied times Efron's and Breslow's likelihoods are the same; with ties they are
    /// not, and Efron's is the larger.
    #[test]
    fn efron_and_breslow_differ_only_with_ties() {
        let rows: Vec<CoxRow> = (0..37)
            .map(|i| {
                let x = [f64::from(i % 7) - 3.0, f64::from(i % 2)];
                row(f64::from(1 + (i * 13) % 37), i % 4 != 0, &x)
            })
            .collect();
        let beta = [0.2, -0.4];
        let b = site_terms(&rows, &beta, Ties::Breslow);
        let e = site_terms(&rows, &beta, Ties::Efron);
        assert!((b.loglik - e.loglik).abs() < 1e-12, "no ties");
        let tied: Vec<CoxRow> = rows
            .iter()
            .map(|r| CoxRow {
                time: (r.time / 5.0).floor(),
                ..r.clone()
            })
            .collect();
        let b = site_terms(&tied, &beta, Ties::Breslow);
        let e = site_terms(&tied, &beta, Ties::Efron);
        assert!(e.loglik > b.loglik);
        // The gradient and Hessian are the log-likelihood's derivatives (finite differences).
        for ties in [Ties::Breslow, Ties::Efron] {
            let t = site_terms(&tied, &beta, ties);
            for k in 0..2 {
                let mut up = beta;
                up[k] += 1e-6;
                let mut down = beta;
                down[k] -= 1e-6;
                let (lu, ld) = (site_terms(&tied, &up, ties), site_terms(&tied, &down, ties));
                assert!(((lu.loglik - ld.loglik) / 2e-6 - t.gradient[k]).abs() < 1e-5);
                for j in 0..2 {
                    let d = (lu.gradient[j] - ld.gradient[j]) / 2e-6;
                    assert!((d - t.hessian[k * 2 + j]).abs() < 1e-4, "{ties:?} {k} {j}");
                }
            }
        }
    }

    /// Sites are strata: the sum of two sites' terms is not the pooled data's, and a fit
    /// from the sums equals the fit of one site holding both with a strata column.
    #[test]
    fn sites_are_strata() {
        let cox = Cox {
            covariates: vec!["a".into(), "b".into()],
            ties: Ties::Efron,
            max_iterations: 30,
        };
        let make = |k: u32| -> Vec<CoxRow> {
            (0..60)
                .map(|i| {
                    let x = [f64::from((i * 7 + k) % 11) - 5.0, f64::from((i + k) % 3)];
                    let time = f64::from(1 + (i * 17 + k * 5) % 29) + 0.1 * x[0];
                    row(time, !(i + k).is_multiple_of(5), &x)
                })
                .collect()
        };
        let (a, b) = (make(1), make(2));
        let federated = fit(&cox, &[a.clone(), b.clone()]);
        let mut both = a;
        both.extend(b.into_iter().map(|r| CoxRow { stratum: 1, ..r }));
        let one_site = fit(&cox, &[both]);
        for (x, y) in federated.coefficients.iter().zip(&one_site.coefficients) {
            assert!((x.coef - y.coef).abs() < 1e-9 && (x.se - y.se).abs() < 1e-9);
        }
        assert_eq!(federated.concordance, one_site.concordance);
    }

    /// Large covariates at large coefficients: the weights are taken relative to the
    /// largest, so nothing overflows.
    #[test]
    fn large_linear_predictors_stay_finite() {
        let rows: Vec<CoxRow> = (0..50)
            .map(|i| row(f64::from(i % 17), i % 3 != 0, &[f64::from(i) * 2000.0]))
            .collect();
        let t = site_terms(&rows, &[0.05], Ties::Efron);
        assert!(t.loglik.is_finite() && t.gradient[0].is_finite() && t.hessian[0].is_finite());
        assert!(t.loglik < 0.0);
    }

    /// The sums carry secure aggregation's fixed-point rounding (about 6e-8 per entry per
    /// site): the fit still converges, to within far less than its standard errors.
    #[test]
    fn a_fit_converges_through_the_sums_rounding() {
        use rand::{RngExt, SeedableRng};
        let cox = Cox {
            covariates: vec!["a".into(), "b".into()],
            ties: Ties::Efron,
            max_iterations: 30,
        };
        let rows: Vec<CoxRow> = (0..200)
            .map(|i| {
                let x = [f64::from((i * 7) % 11) - 5.0, f64::from(i % 3)];
                row(f64::from(1 + (i * 17) % 61), i % 5 != 0, &x)
            })
            .collect();
        let exact = fit(&cox, std::slice::from_ref(&rows));
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let mut f = CoxFitter::new(&cox);
        let mut step = f.first();
        let noisy = loop {
            let sum: Vec<f64> = cox
                .encode(&rows, &step.beta)
                .iter()
                .map(|x| x + (rng.random::<f64>() - 0.5) * 2e-7)
                .collect();
            match f.observe(&sum) {
                CoxNext::Evaluate(s) => step = s,
                CoxNext::Done(fit) => break fit,
                CoxNext::Failed(why) => panic!("{why}"),
            }
        };
        for (a, b) in noisy.coefficients.iter().zip(&exact.coefficients) {
            assert!((a.coef - b.coef).abs() < 1e-5 * b.se, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn a_separating_covariate_fails_loudly() {
        let cox = Cox {
            covariates: vec!["x".into()],
            ties: Ties::Efron,
            max_iterations: 30,
        };
        // Everyone with x = 1 dies before everyone with x = 0: β runs off to infinity.
        let rows: Vec<CoxRow> = (0..20)
            .map(|i| row(f64::from(i), true, &[f64::from(u8::from(i < 10))]))
            .collect();
        let mut f = CoxFitter::new(&cox);
        let mut step = f.first();
        let why = loop {
            match f.observe(&cox.encode(&rows, &step.beta)) {
                CoxNext::Evaluate(s) => step = s,
                CoxNext::Done(fit) => panic!("fitted {fit:?}"),
                CoxNext::Failed(why) => break why,
            }
        };
        assert!(
            why.contains("separate") || why.contains("converge"),
            "{why}"
        );
        assert!(
            cox.check_step(&CoxStep {
                iteration: 30,
                beta: vec![0.0]
            })
            .is_err()
        );
    }
}
