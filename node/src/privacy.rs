//! The node's differential-privacy duties: its budget ledger (durable, in the state
//! directory), the charge before each release, and the clipped, noised contribution.

use std::path::{Path, PathBuf};

use medfed_infra::json_state::{Contents, JsonFile};
use medfed_protocol::ErrorCode;
use medfed_protocol::dp::discrete::noisy_on_grid;
use medfed_protocol::dp::ledger::Ledger;
use medfed_protocol::dp::{Charge, DpTraining, clip_l2};
use rand::SeedableRng;
use ring::rand::SecureRandom;
use tracing::{info, warn};

use crate::client::Node;

/// The ledger file in the node's state directory.
pub fn ledger_path(state_dir: &Path) -> PathBuf {
    state_dir.join("privacy-ledger.json")
}

/// What the ledger file holds, for its errors.
const LEDGER: Contents = Contents {
    label: "privacy ledger",
    a: "a ledger",
    the: "the privacy ledger",
    pretty: true,
};

/// Reads a ledger file; a missing file is an empty ledger.
pub fn load_ledger(path: &Path) -> Result<Ledger, String> {
    JsonFile::read(path, LEDGER).map_err(|e| e.to_string())
}

/// The ledger, kept in memory and written through (atomically, synced) on every change.
pub type LedgerFile = JsonFile<Ledger>;

/// The ledger in `path` (empty if there is none yet), for charging.
pub fn open_ledger(path: PathBuf) -> Result<LedgerFile, String> {
    JsonFile::open(path, LEDGER).map_err(|e| e.to_string())
}

type Refusal = (ErrorCode, String);

impl Node {
    /// Charges one release of `study` round `round` to the budget, durably, before anything
    /// is sent; or refuses, logs the refusal and says why.
    pub(crate) fn spend_budget(
        &self,
        study: &str,
        round: u32,
        charge: Charge,
    ) -> Result<(), Refusal> {
        let policy = &self.config.policy.privacy;
        let budget = policy.budget();
        let mut ledger = self.ledger.lock();
        let checked = ledger.check_charge(study, &charge, &budget);
        let (epsilon, total, refused) = match &checked {
            Ok((s, t)) => (*s, *t, false),
            Err(e) => (e.epsilon_after, ledger.epsilon(None, budget.delta), true),
        };
        if refused {
            ledger.record_refusal(study);
        } else {
            ledger.record_charge(study, &charge);
        }
        self.ledger
            .save(&ledger)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        let event = medfed_protocol::audit::Event::PrivacySpent {
            study: study.to_string(),
            round,
            epsilon,
            total_epsilon: total,
            delta: budget.delta,
            refused,
        };
        // Fails closed: a charge the compliance log does not show is not released (the
        // ledger keeps it: the budget errs on the safe side).
        self.audit.record(event).map_err(|e| {
            warn!("cannot write the compliance log: {e}");
            (
                ErrorCode::Internal,
                "this site cannot write its compliance log, so it releases nothing".to_string(),
            )
        })?;
        match checked {
            Ok(_) => {
                info!(%study, round, epsilon, total_epsilon = total, delta = budget.delta, "privacy budget charged");
                Ok(())
            }
            Err(over) => {
                let why = format!(
                    "privacy budget: round {round} of study '{study}' refused: {over} (δ = {}); this site sends no more updates for it",
                    budget.delta
                );
                warn!(%study, round, "{why}");
                Err((ErrorCode::CannotServe, why))
            }
        }
    }

    /// Whether this site's budget can pay for every round of `study` (`rounds` at
    /// `per_round` each, the rounds it paid for already counted): what it checks before it
    /// accepts a study, so that a study does not stop midway for this site's budget after
    /// the other sites paid for rounds that lead nowhere. The budget depends on earlier
    /// releases only, never on the data, so the reason may be told.
    pub(crate) fn check_study_budget(
        &self,
        study: &str,
        per_round: &Charge,
        rounds: u32,
    ) -> Result<(), String> {
        let budget = self.config.policy.privacy.budget();
        let ledger = self.ledger.lock();
        ledger
            .check_study(study, per_round, rounds, &budget)
            .map(|_| ())
            .map_err(|over| {
                format!(
                    "privacy budget: {over} (δ = {:e}) with its {rounds} rounds ({} already paid); \
                        this site has spent ε = {:.3} of its total {}. fix: the study's operator can \
                        ask for fewer rounds or a larger noise_multiplier; this site's operator \
                        decides its budget ([policy.privacy] in node.toml)",
                    budget.delta,
                    ledger.rounds_paid(study, per_round).min(u64::from(rounds)),
                    ledger.epsilon(None, budget.delta),
                    budget.total_epsilon,
                )
            })
    }

    /// Whether one more `charge` of `study` fits the budget, without charging it: what a
    /// secure round checks when it joins (its input is charged when it leaves, masked).
    pub(crate) fn check_budget(&self, study: &str, charge: &Charge) -> Result<(), Refusal> {
        let budget = self.config.policy.privacy.budget();
        self.ledger
            .lock()
            .check_charge(study, charge, &budget)
            .map(|_| ())
            .map_err(|over| {
                (
                    ErrorCode::CannotServe,
                    format!(
                        "privacy budget: study '{study}' refused: {over} (δ = {:e})",
                        budget.delta
                    ),
                )
            })
    }

    /// Records an exact release of `study` in the ledger (shown by `node status`), durably.
    pub(crate) fn ledger_exact(&self, study: &str) -> Result<(), Refusal> {
        let mut ledger = self.ledger.lock();
        ledger.record_exact(study);
        self.ledger
            .save(&ledger)
            .map_err(|e| (ErrorCode::Internal, e.to_string()))
    }

    /// `v` on a grid of `2^-bits` plus discrete Gaussian noise of standard deviation at
    /// least `sigma` on the same grid ([`medfed_protocol::dp::discrete`]), from a generator
    /// seeded by the system's.
    pub(crate) fn noisy(v: Vec<f64>, sigma: f64, bits: u8) -> Result<Vec<f64>, Refusal> {
        if sigma == 0.0 {
            return Ok(v);
        }
        let mut rng = Node::secret_rng()?;
        noisy_on_grid(&v, sigma, bits, &mut rng).map_err(|e| {
            (
                ErrorCode::InvalidContent,
                format!("differential-privacy noise: {e}"),
            )
        })
    }

    /// A generator for secrets (noise, sampling), seeded by the system's.
    pub(crate) fn secret_rng() -> Result<rand_chacha::ChaCha20Rng, Refusal> {
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| {
                (
                    ErrorCode::Internal,
                    "the system's random generator failed".to_string(),
                )
            })?;
        Ok(rand_chacha::ChaCha20Rng::from_seed(seed))
    }

    /// The site's DP-FedAvg contribution: its model delta clipped to `C`, plus discrete
    /// Gaussian noise of standard deviation `noise_sigma` on a grid of `2^-bits` (without
    /// secure aggregation: all of σ; under it the noise is added to the masked words
    /// instead, and this is called with 0).
    pub(crate) fn dp_contribution(
        global: &[f64],
        local: &[f64],
        dp: &DpTraining,
        noise_sigma: f64,
        bits: u8,
    ) -> Result<Vec<f64>, Refusal> {
        let mut delta: Vec<f64> = local.iter().zip(global).map(|(w, g)| w - g).collect();
        clip_l2(&mut delta, dp.clip_norm);
        Node::noisy(delta, noise_sigma, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_survives_a_restart_and_a_broken_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = ledger_path(dir.path());
        let file = open_ledger(path.clone()).unwrap();
        {
            let mut l = file.lock();
            l.record("pima", 1.0);
            file.save(&l).unwrap();
        }
        let again = open_ledger(path.clone()).unwrap();
        assert_eq!(again.lock().releases("pima"), 1);
        std::fs::write(&path, b"{not json").unwrap();
        let err = open_ledger(path).err().unwrap();
        assert!(
            err.contains("privacy-ledger.json") && err.contains("not a ledger"),
            "{err}"
        );
    }

    #[test]
    fn the_contribution_is_clipped_and_noised() {
        let dp = DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 1.0,
            sgd: None,
        };
        let clipped = Node::dp_contribution(&[0.0, 0.0], &[30.0, 40.0], &dp, 0.0, 30).unwrap();
        assert!((clipped[0] - 0.6).abs() < 1e-12 && (clipped[1] - 0.8).abs() < 1e-12);
        let noisy = Node::dp_contribution(&[0.0, 0.0], &[30.0, 40.0], &dp, 1.0, 30).unwrap();
        assert_ne!(noisy, clipped);
        // On the grid: exact multiples of 2^-30.
        assert!(noisy.iter().all(|x| (x * 2f64.powi(30)).fract() == 0.0));
        let again = Node::dp_contribution(&[0.0, 0.0], &[30.0, 40.0], &dp, 1.0, 30).unwrap();
        assert_ne!(noisy, again, "fresh noise every time");
    }
}
