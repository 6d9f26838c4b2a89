//! A site's privacy budget ledger: every release it took part in, and what it costs per
//! study and in total, by the RDP [`accountant`](super::accountant).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Charge;
use super::accountant::RdpAccountant;

/// A site's limits, from its policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Most ε one study may spend.
    pub study_epsilon: f64,
    /// Most ε all studies together may spend.
    pub total_epsilon: f64,
    /// The δ every ε is stated at.
    pub delta: f64,
}

/// The releases of one study: Gaussian mechanisms by noise multiplier, and how many;
/// sampled Gaussian mechanisms (DP-SGD steps) by rate and noise multiplier, and how many.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StudySpend {
    /// (noise multiplier, releases)
    pub releases: Vec<(f64, u64)>,
    /// (sampling rate, noise multiplier, steps): DP-SGD inside the site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sampled: Vec<(f64, f64, u64)>,
    /// Rounds refused for the budget.
    pub refused: u64,
    /// Releases made WITHOUT differential privacy (a dataset's `exact_releases`): not in
    /// ε, which does not cover them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub exact: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Every study's spending.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Each study's spending, by study id.
    pub studies: BTreeMap<String, StudySpend>,
}

/// Why a release is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct OverBudget {
    /// The limit that would be broken: `"this study"` or `"all studies together"`.
    pub what: &'static str,
    /// The ε that limit would reach with the release.
    pub epsilon_after: f64,
    /// The limit (the budget's `study_epsilon` or `total_epsilon`).
    pub limit: f64,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} would reach ε = {:.3}, above the limit {}",
            self.what, self.epsilon_after, self.limit
        )
    }
}

impl Ledger {
    fn accountant<'a>(spends: impl Iterator<Item = &'a StudySpend>) -> RdpAccountant {
        let mut acc = RdpAccountant::default();
        for s in spends {
            for (z, n) in &s.releases {
                acc.compose_gaussian(1.0, *z, *n);
            }
            for (q, z, n) in &s.sampled {
                acc.compose_gaussian(*q, *z, *n);
            }
        }
        acc
    }

    /// ε spent by `study` (or all studies, for `None`) at `delta`.
    pub fn epsilon(&self, study: Option<&str>, delta: f64) -> f64 {
        let acc = match study {
            Some(s) => Ledger::accountant(self.studies.get(s).into_iter()),
            None => Ledger::accountant(self.studies.values()),
        };
        acc.epsilon(delta).0
    }

    /// ε of `study` and in total after one more release with noise multiplier `z`, or why
    /// it would break the budget.
    pub fn check(&self, study: &str, z: f64, budget: &Budget) -> Result<(f64, f64), OverBudget> {
        self.check_charge(study, &Charge::Gaussian { z }, budget)
    }

    /// ε of `study` and in total after `charge`, or why it would break the budget.
    pub fn check_charge(
        &self,
        study: &str,
        charge: &Charge,
        budget: &Budget,
    ) -> Result<(f64, f64), OverBudget> {
        let mut after = self.clone();
        after.record_charge(study, charge);
        let (s, t) = (
            after.epsilon(Some(study), budget.delta),
            after.epsilon(None, budget.delta),
        );
        if s > budget.study_epsilon {
            return Err(OverBudget {
                what: "this study",
                epsilon_after: s,
                limit: budget.study_epsilon,
            });
        }
        if t > budget.total_epsilon {
            return Err(OverBudget {
                what: "all studies together",
                epsilon_after: t,
                limit: budget.total_epsilon,
            });
        }
        Ok((s, t))
    }

    /// ε of `study` and in total once every round of a `rounds`-round study is charged
    /// (the rounds it paid for already counted), or why the study would break the budget.
    /// What a site checks before it accepts a study: a study it cannot see through would
    /// stop midway, after its other sites paid for rounds that lead nowhere.
    pub fn check_study(
        &self,
        study: &str,
        per_round: &Charge,
        rounds: u32,
        budget: &Budget,
    ) -> Result<(f64, f64), OverBudget> {
        let paid = self.rounds_paid(study, per_round);
        let mut after = self.clone();
        for _ in paid..u64::from(rounds) {
            after.record_charge(study, per_round);
        }
        let (s, t) = (
            after.epsilon(Some(study), budget.delta),
            after.epsilon(None, budget.delta),
        );
        if s > budget.study_epsilon {
            return Err(OverBudget {
                what: "the whole study",
                epsilon_after: s,
                limit: budget.study_epsilon,
            });
        }
        if t > budget.total_epsilon {
            return Err(OverBudget {
                what: "the whole study with all other studies",
                epsilon_after: t,
                limit: budget.total_epsilon,
            });
        }
        Ok((s, t))
    }

    /// Rounds of `study` already charged at `per_round` each.
    pub fn rounds_paid(&self, study: &str, per_round: &Charge) -> u64 {
        let Some(spend) = self.studies.get(study) else {
            return 0;
        };
        match *per_round {
            Charge::Gaussian { z } => spend
                .releases
                .iter()
                .filter(|(m, _)| *m == z)
                .map(|(_, n)| n)
                .sum(),
            Charge::Sampled { q, z, steps } => spend
                .sampled
                .iter()
                .filter(|(r, m, _)| *r == q && *m == z)
                .map(|(_, _, n)| n / steps.max(1))
                .sum(),
        }
    }

    /// Records `charge` against `study`.
    pub fn record_charge(&mut self, study: &str, charge: &Charge) {
        match *charge {
            Charge::Gaussian { z } => self.record(study, z),
            Charge::Sampled { q, z, steps } => {
                let spend = self.studies.entry(study.to_string()).or_default();
                match spend
                    .sampled
                    .iter_mut()
                    .find(|(r, m, _)| *r == q && *m == z)
                {
                    Some((_, _, n)) => *n += steps,
                    None => spend.sampled.push((q, z, steps)),
                }
            }
        }
    }

    /// Records one release of `study` with noise multiplier `z`.
    pub fn record(&mut self, study: &str, z: f64) {
        let spend = self.studies.entry(study.to_string()).or_default();
        match spend.releases.iter_mut().find(|(m, _)| *m == z) {
            Some((_, n)) => *n += 1,
            None => spend.releases.push((z, 1)),
        }
    }

    /// Records an exact (not differentially private) release of `study`.
    pub fn record_exact(&mut self, study: &str) {
        self.studies.entry(study.to_string()).or_default().exact += 1;
    }

    /// Records that `study` asked for a release this budget refused (counted, costs nothing).
    pub fn record_refusal(&mut self, study: &str) {
        self.studies.entry(study.to_string()).or_default().refused += 1;
    }

    /// Releases recorded for `study` (DP-SGD steps not counted).
    pub fn releases(&self, study: &str) -> u64 {
        self.studies
            .get(study)
            .map_or(0, |s| s.releases.iter().map(|(_, n)| n).sum())
    }

    /// DP-SGD steps recorded for `study`.
    pub fn steps(&self, study: &str) -> u64 {
        self.studies
            .get(study)
            .map_or(0, |s| s.sampled.iter().map(|(_, _, n)| n).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_stops_a_study_at_the_right_release() {
        let budget = Budget {
            study_epsilon: 3.0,
            total_epsilon: 100.0,
            delta: 1e-5,
        };
        let mut l = Ledger::default();
        // z = 2: one release costs 2.17 (REFERENCES: dp-accounting 0.4.4 prints 2.1680).
        let mut accepted = 0;
        while l.check("a", 2.0, &budget).is_ok() {
            l.record("a", 2.0);
            accepted += 1;
        }
        // Plain Gaussian RDP composes to k·α/(2z²): ε(k) = min_α k·α/8 + conversion.
        assert!((1..10).contains(&accepted), "{accepted}");
        assert!(l.epsilon(Some("a"), 1e-5) <= 3.0);
        let err = l.check("a", 2.0, &budget).unwrap_err();
        assert_eq!(err.what, "this study");
        assert!(err.epsilon_after > 3.0);
        // Another study has its own limit, but all studies share the total.
        let spent = l.epsilon(None, 1e-5);
        let tight = Budget {
            study_epsilon: 100.0,
            total_epsilon: spent + 0.5,
            delta: 1e-5,
        };
        let err = l.check("b", 2.0, &tight).unwrap_err();
        assert_eq!(err.what, "all studies together");
        assert!(
            l.check("b", 2.0, &budget).is_ok(),
            "{:?}",
            l.check("b", 2.0, &budget)
        );
        assert_eq!(l.releases("a"), accepted);
    }

    /// A study is checked whole before it is accepted: the rounds already paid count, the
    /// rest are added, and a study the budget cannot see through is refused.
    #[test]
    fn a_whole_study_is_checked_before_it_starts() {
        let budget = Budget {
            study_epsilon: 3.0,
            total_epsilon: 100.0,
            delta: 1e-5,
        };
        let round = Charge::Gaussian { z: 5.0 };
        let l = Ledger::default();
        let fits = (1..20)
            .take_while(|&r| l.check_study("a", &round, r, &budget).is_ok())
            .last()
            .unwrap();
        // The same number of rounds as charging one at a time allows.
        let mut one_by_one = Ledger::default();
        let mut accepted = 0;
        while one_by_one.check("a", 5.0, &budget).is_ok() {
            one_by_one.record("a", 5.0);
            accepted += 1;
        }
        assert_eq!(u64::from(fits), accepted);
        assert!(fits > 2, "{fits}");
        let err = l.check_study("a", &round, fits + 1, &budget).unwrap_err();
        assert_eq!(err.what, "the whole study");
        // Resumed after two paid rounds: only the rest are added.
        let mut resumed = Ledger::default();
        resumed.record_charge("a", &round);
        resumed.record_charge("a", &round);
        assert_eq!(resumed.rounds_paid("a", &round), 2);
        let (s, _) = resumed.check_study("a", &round, fits, &budget).unwrap();
        assert!((s - l.check_study("a", &round, fits, &budget).unwrap().0).abs() < 1e-12);
        // DP-SGD rounds are counted by their steps.
        let sgd = Charge::Sampled {
            q: 0.04,
            z: 1.5,
            steps: 50,
        };
        resumed.record_charge("s", &sgd);
        resumed.record_charge("s", &sgd);
        assert_eq!(resumed.rounds_paid("s", &sgd), 2);
    }

    /// DP-SGD rounds are accounted as the sampled Gaussian: the third published reference
    /// (q = 0.04, σ = 1.5, 2,250 steps, δ = 1e-5) gives ε = 7.3291, here as 45 rounds of 50
    /// steps.
    #[test]
    fn dp_sgd_rounds_compose_to_the_published_value() {
        let mut l = Ledger::default();
        let round = Charge::Sampled {
            q: 0.04,
            z: 1.5,
            steps: 50,
        };
        for _ in 0..45 {
            l.record_charge("s", &round);
        }
        assert_eq!(l.steps("s"), 2250);
        let eps = l.epsilon(Some("s"), 1e-5);
        assert!((eps - 7.3291).abs() / 7.3291 < 2e-3, "{eps}");
        // A ledger written before DP-SGD (no `sampled`) still reads.
        let old: Ledger =
            serde_json::from_str(r#"{"studies":{"a":{"releases":[[2.0,1]],"refused":0}}}"#)
                .unwrap();
        assert_eq!(old.releases("a"), 1);
    }

    #[test]
    fn one_release_matches_the_published_value() {
        let mut l = Ledger::default();
        l.record("s", 2.0);
        let eps = l.epsilon(Some("s"), 1e-5);
        assert!((eps - 2.1680).abs() / 2.1680 < 2e-2, "{eps}");
        l.record("s", 1.0);
        // Composition of z = 2 and z = 1: more than either alone.
        assert!(l.epsilon(Some("s"), 1e-5) > 4.7527 * 0.98);
    }
}
