//! Latency-aware round scheduling (the model is derived in `docs/scheduling.md`).
//!
//! Each site's history gives an exponentially weighted mean and variance of its response
//! time and an exponentially weighted dropout rate. Modelling site i's response time as
//! Normal(μ_i, σ_i²) and its answering at all as Bernoulli(1 − d_i), the chance that it has
//! answered by a deadline D is p_i(D) = (1 − d_i)·Φ((D − μ_i)/σ_i). For a candidate set S
//! the number of answers by D is a sum of independent Bernoullis; with the normal
//! approximation, the quorum holds with confidence 1 − β when
//! Σ p_i − z_β·sqrt(Σ p_i(1 − p_i)) ≥ t, and likewise for the records covered.
//!
//! A round lasts until every selected site has answered or the deadline passes, so adding a
//! slow site can only lengthen it. [`plan`] therefore tries deadlines in increasing order
//! and, for each, selects the sites likely to answer by then; the first deadline whose
//! selection meets the quorum and coverage constraints wins.

use serde::{Deserialize, Serialize};

/// What the scheduler remembers about one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStats {
    /// The site's name.
    pub name: String,
    /// Training rows (the coverage weight).
    pub records: u64,
    /// Exponentially weighted mean and variance of response time, ms.
    pub mean_ms: f64,
    /// Exponentially weighted variance of the response time, ms².
    pub var_ms: f64,
    /// Exponentially weighted share of rounds the site did not answer.
    pub dropout: f64,
    /// Rounds observed (saturating).
    pub observations: u32,
}

/// Weight of the newest observation in the moving averages.
pub const SMOOTHING: f64 = 0.2;

impl SiteStats {
    /// A site with no history yet: assumed as fast as the prior, and reliable.
    pub fn new(name: impl Into<String>, records: u64, prior_ms: f64) -> SiteStats {
        SiteStats {
            name: name.into(),
            records,
            mean_ms: prior_ms,
            var_ms: (prior_ms / 2.0).powi(2),
            dropout: 0.0,
            observations: 0,
        }
    }

    /// Records one round: the response time, or `None` if the site never answered.
    pub fn observe(&mut self, latency_ms: Option<f64>) {
        let a = SMOOTHING;
        match latency_ms {
            Some(x) => {
                let diff = x - self.mean_ms;
                self.mean_ms += a * diff;
                self.var_ms = (1.0 - a) * (self.var_ms + a * diff * diff);
                self.dropout *= 1.0 - a;
            }
            None => self.dropout = (1.0 - a) * self.dropout + a,
        }
        self.observations = self.observations.saturating_add(1);
    }

    /// Probability that the site has answered by `deadline_ms`.
    pub fn p_by(&self, deadline_ms: f64) -> f64 {
        let sd = self.var_ms.sqrt().max(1.0);
        (1.0 - self.dropout) * normal_cdf((deadline_ms - self.mean_ms) / sd)
    }
}

fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Constraints a round must meet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Requirements {
    /// Fewest answers (the quorum).
    pub quorum: usize,
    /// Least share of all sites' records the answers must cover.
    pub min_coverage: f64,
    /// z of the one-sided confidence (1.645 for 95%).
    pub confidence_z: f64,
    /// Longest deadline allowed, ms.
    pub max_deadline_ms: f64,
}

/// The scheduler's choice for one round.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Indices into the candidates.
    pub participants: Vec<usize>,
    /// The round's deadline, ms after it opens.
    pub deadline_ms: f64,
}

fn lower_bound(p: &[f64], w: &[f64], z: f64) -> f64 {
    let mean: f64 = p.iter().zip(w).map(|(p, w)| p * w).sum();
    let var: f64 = p.iter().zip(w).map(|(p, w)| p * (1.0 - p) * w * w).sum();
    mean - z * var.sqrt()
}

/// Chooses participants and the deadline that minimise the round's expected duration subject
/// to `req`; `None` if no deadline up to `req.max_deadline_ms` meets the constraints (the
/// caller then invites every site and waits the longest allowed).
pub fn plan(sites: &[SiteStats], req: &Requirements) -> Option<Plan> {
    let total: f64 = sites.iter().map(|s| s.records as f64).sum::<f64>().max(1.0);
    // Candidate deadlines: each site's mean plus 0..3 standard deviations, then the cap.
    let mut deadlines: Vec<f64> = sites
        .iter()
        .flat_map(|s| (0..=6).map(move |k| s.mean_ms + f64::from(k) * 0.5 * s.var_ms.sqrt()))
        .filter(|d| d.is_finite() && *d > 0.0 && *d <= req.max_deadline_ms)
        .collect();
    deadlines.push(req.max_deadline_ms);
    deadlines.sort_by(f64::total_cmp);
    deadlines.dedup();
    for d in deadlines {
        // Sites more likely than not to answer by d; adding the others would only make the
        // round wait for them.
        let chosen: Vec<usize> = (0..sites.len())
            .filter(|&i| sites[i].p_by(d) >= 0.5)
            .collect();
        if chosen.len() < req.quorum {
            continue;
        }
        let p: Vec<f64> = chosen.iter().map(|&i| sites[i].p_by(d)).collect();
        let ones = vec![1.0; p.len()];
        let records: Vec<f64> = chosen
            .iter()
            .map(|&i| sites[i].records as f64 / total)
            .collect();
        if lower_bound(&p, &ones, req.confidence_z) >= req.quorum as f64
            && lower_bound(&p, &records, req.confidence_z) >= req.min_coverage
        {
            return Some(Plan {
                participants: chosen,
                deadline_ms: d,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_averages_follow_the_observations() {
        let mut s = SiteStats::new("a", 100, 1000.0);
        for _ in 0..50 {
            s.observe(Some(200.0));
        }
        assert!((s.mean_ms - 200.0).abs() < 1.0, "{}", s.mean_ms);
        assert!(s.var_ms < 100.0);
        for _ in 0..50 {
            s.observe(None);
        }
        assert!(s.dropout > 0.99);
        assert!(s.p_by(1e9) < 0.01);
    }

    #[test]
    fn slow_and_unreliable_sites_are_left_out_when_the_quorum_allows() {
        let mut sites: Vec<SiteStats> = (0..10)
            .map(|i| SiteStats::new(format!("s{i}"), 100, 100.0))
            .collect();
        for s in &mut sites[..8] {
            for _ in 0..20 {
                s.observe(Some(100.0));
            }
        }
        for _ in 0..20 {
            sites[8].observe(Some(5_000.0)); // slow
            sites[9].observe(None); // never answers
        }
        let req = Requirements {
            quorum: 5,
            min_coverage: 0.4,
            confidence_z: 1.645,
            max_deadline_ms: 60_000.0,
        };
        let p = plan(&sites, &req).expect("a plan");
        assert_eq!(p.participants, (0..8).collect::<Vec<_>>());
        assert!(p.deadline_ms < 1_000.0, "{}", p.deadline_ms);
        // Needing 9 answers forces waiting for the slow site.
        let p = plan(&sites, &Requirements { quorum: 9, ..req }).expect("a plan");
        assert!(p.participants.contains(&8) && p.deadline_ms >= 5_000.0);
        // Ten answers cannot be had with confidence.
        assert_eq!(plan(&sites, &Requirements { quorum: 10, ..req }), None);
    }
}
