//! The exported global model: the file the aggregator writes after each round and that
//! `medfed model evaluate` reads. JSON; `format` names the version of this layout.

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::model::GlobalModel;

/// The value of [`ExportedModel::format`] this build writes and reads.
pub const MODEL_FORMAT: &str = "medfed-model/1";

/// A global model as exported after a round: the model with its provenance (study, round,
/// sites, rows), its federated validation metrics, and what is missing from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportedModel {
    /// The layout's version, [`MODEL_FORMAT`]; [`ExportedModel::validate`] refuses others.
    pub format: String,
    /// The study that trained the model.
    pub study_id: String,
    /// The round that produced this model.
    pub round: u32,
    /// The column the model predicts.
    pub target: String,
    /// For binary classification: the target value predicted as probability 1.
    pub positive_class: Option<String>,
    /// For a multinomial model: the target's values, in the order of the model's class
    /// blocks and of its predicted probabilities (absent for other models).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Kind, feature names, the federation's standardization, and the weights
    /// (`weights[i]` multiplies standardized `features[i]`; the last weight is the bias).
    pub model: GlobalModel,
    /// Sites whose updates were averaged into this model.
    pub sites: Vec<String>,
    /// Training rows behind the average.
    pub training_rows: u64,
    /// Sample-weighted mean training loss reported by the sites.
    /// Not released under differential privacy: `null`.
    #[serde(with = "crate::metrics::nan_as_null")]
    pub train_loss: f64,
    /// Federated evaluation of this model on the sites' validation rows, when known.
    pub validation: Option<Metrics>,
    /// Sites the study was run for (the aggregator's allow list) whose data is in no round
    /// of this model, and why: it refused the study, was not connected, or left it. A model
    /// of fewer sites than asked says so here (and `aggregator run` exits with status 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_sites: Vec<MissingSite>,
    /// Why the study stopped after this round, when this is not the round the study asked
    /// for (the operator stopped it, too few sites, a round that kept failing): the last
    /// model released, not a finished study's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Seconds since the Unix epoch when the model was written.
    pub created_unix: u64,
}

/// A site missing from a study's model, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingSite {
    /// The site's name.
    pub site: String,
    /// Why its data is not in the model, in words.
    pub reason: String,
}

impl ExportedModel {
    /// Checks that a model read from a file is one this build understands and is
    /// self-consistent.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MODEL_FORMAT {
            return Err(format!(
                "model format {:?} is not supported (this build reads {MODEL_FORMAT:?})",
                self.format
            ));
        }
        self.model.validate()?;
        let k = match self.model.kind {
            crate::model::ModelKind::Multinomial { classes } => usize::from(classes),
            _ => 0,
        };
        if self.classes.len() != k {
            return Err(format!(
                "the model has {k} class outputs but {} class names",
                self.classes.len()
            ));
        }
        let distinct: std::collections::BTreeSet<&String> = self.classes.iter().collect();
        if distinct.len() != self.classes.len() {
            return Err("a class is named twice".into());
        }
        Ok(())
    }
}
