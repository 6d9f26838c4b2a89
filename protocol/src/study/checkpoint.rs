//! What a study keeps between rounds, so that a restarted aggregator goes on with the next
//! round: the round, the global model, the server optimizer's state, the round whose
//! validation figures are still to come, and the scheduler's statistics. The
//! [`Coordinator`](super::Coordinator) emits it after every round; the aggregator stores it
//! (one atomic, synced transaction) and hands it back on restart. A crash in the middle of
//! a round repeats that round: the sites' inputs are the same (seeded local training from
//! the same model), and a site reveals one round's shares for one set of sites only.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::model::{GlobalModel, ServerState};
use crate::schedule::SiteStats;

use super::StudyConfig;

/// The round whose model waits for its validation figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRound {
    /// The round.
    pub round: u32,
    /// Sites whose updates are in its model.
    pub sites: Vec<String>,
    /// Training rows behind it (0 under differential privacy: none is declared).
    pub training_rows: u64,
    /// None where it is not released (differential privacy).
    pub train_loss: Option<f64>,
}

/// A study's state after a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyCheckpoint {
    /// SHA-256 of the study's configuration: a changed study starts again.
    pub config_sha256: String,
    /// The last completed round (0: none yet).
    pub round: u32,
    /// The model after that round.
    pub model: GlobalModel,
    /// The server optimizer's state.
    pub server_state: ServerState,
    /// The round whose model waits for its validation figures.
    pub pending: Option<PendingRound>,
    /// Set once the study is complete: its final model and validation.
    pub complete: Option<(PathBuf, Option<Metrics>)>,
    /// The scheduler's statistics of each site.
    #[serde(default)]
    pub scheduler: Vec<SiteStats>,
}

/// The hash a checkpoint is tied to.
pub fn config_hash(cfg: &StudyConfig) -> String {
    // A config of plain data always encodes; an empty encoding would match no checkpoint.
    crate::audit::sha256_hex(&serde_json::to_vec(cfg).unwrap_or_default())
}
