//! The exported global model: the file the aggregator writes after each round and that
//! `medfed model evaluate` and `medfed model predict` read. JSON; `format` names the version
//! of this layout (docs/model-format.md).
//!
//! Format 2 adds the model's preprocessing (`model.recipe`: categories, imputed values) and
//! a multinomial model's `classes`; a format 1 file (no recipe: every feature a raw numeric
//! column, nothing imputed) is still read. Format 3 is a boosted-trees model: `trees` holds
//! the ensemble, and `model` only its kind (logistic or linear) and features; builds that
//! read only formats 1 and 2 refuse it rather than mispredict.

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::model::GlobalModel;

/// The value of [`ExportedModel::format`] this build writes.
pub const MODEL_FORMAT: &str = "medfed-model/2";

/// The value of [`ExportedModel::format`] for a boosted-trees model.
pub const TREES_MODEL_FORMAT: &str = "medfed-model/3";

/// The formats this build reads: format 1 (before preprocessing), [`MODEL_FORMAT`], and
/// [`TREES_MODEL_FORMAT`].
pub const MODEL_FORMATS_READ: [&str; 3] = ["medfed-model/1", MODEL_FORMAT, TREES_MODEL_FORMAT];

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
    /// What the sites approved and how the model was protected, for the auditor (absent in
    /// files written before format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// A boosted-trees model's ensemble (format 3 only): its predictions replace `model`'s
    /// weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trees: Option<crate::trees::Ensemble>,
}

/// Where a model came from: the study its sites approved, and the protections its rounds
/// ran under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The study's approval hash, as each site's `medfed node approve` and compliance log
    /// name it ([`crate::messages::StudyAnnouncement::approval_hash`]).
    pub study_sha256: String,
    /// Secure aggregation: the threshold of the last secure round (the fewest sites whose
    /// shares reveal a dropped site's mask) and the study's tolerated colluders; absent
    /// when the study ran without it.
    pub secure_aggregation: Option<SecureAggregationUsed>,
    /// Differential privacy: the mechanism and what the rounds behind this model cost each
    /// site's patients; absent for an exact model.
    pub privacy: Option<PrivacyCost>,
}

/// How a model's rounds were securely aggregated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationUsed {
    /// The last secure round's threshold (`None` if no secure round ran yet).
    pub threshold: Option<u32>,
    /// The study's `secure_aggregation.tolerated_colluders`.
    pub tolerated_colluders: u32,
}

/// What a differentially private model cost each site's patients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyCost {
    /// `"dp-sgd"` (record level, inside each site) or `"dp-fedavg"` (site level).
    pub mechanism: String,
    /// The clip norm `C`.
    pub clip_norm: f64,
    /// The noise multiplier `z`.
    pub noise_multiplier: f64,
    /// The rounds released up to this model.
    pub rounds: u32,
    /// ε of those rounds at `delta` (RDP accounting; each site's own δ may differ, and
    /// its ledger holds its own figure).
    pub epsilon: f64,
    /// The δ of `epsilon`.
    pub delta: f64,
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
    /// The model's predictions for raw-feature rows (the columns of `model.features`, after
    /// the recipe): probabilities of the positive class, predicted values, or for a
    /// multinomial model each row's class probabilities in turn.
    pub fn predict_raw(
        &self,
        x: ndarray::ArrayView2<'_, f64>,
    ) -> Result<ndarray::Array1<f64>, crate::model::TrainError> {
        let Some(trees) = &self.trees else {
            return self.model.predict_raw(x);
        };
        if x.ncols() != trees.features.len() {
            return Err(crate::model::TrainError::WidthMismatch {
                model: trees.features.len(),
                data: x.ncols(),
            });
        }
        Ok(x.rows()
            .into_iter()
            .map(|row| trees.predict(&row.to_vec()).unwrap_or(f64::NAN))
            .collect())
    }

    /// Checks that a model read from a file is one this build understands and is
    /// self-consistent.
    pub fn validate(&self) -> Result<(), String> {
        if !MODEL_FORMATS_READ.contains(&self.format.as_str()) {
            return Err(format!(
                "model format {:?} is not supported (this build reads {})",
                self.format,
                MODEL_FORMATS_READ.join(", ")
            ));
        }
        if self.format == MODEL_FORMATS_READ[0] && !self.model.recipe.inputs.is_empty() {
            return Err("a format 1 model has no preprocessing (model.recipe)".into());
        }
        self.model.validate()?;
        match (&self.trees, self.format == TREES_MODEL_FORMAT) {
            (Some(t), true) => {
                t.validate()?;
                if t.features != self.model.features {
                    return Err("the trees' features are not the model's".into());
                }
                let kind = match t.loss {
                    crate::trees::Loss::Logistic => crate::model::ModelKind::Logistic,
                    crate::trees::Loss::Squared => crate::model::ModelKind::Linear,
                };
                if kind != self.model.kind {
                    return Err("the trees' loss is not the model's kind".into());
                }
            }
            (None, false) => {}
            (Some(_), false) => return Err("only a format 3 model has trees".into()),
            (None, true) => return Err("a format 3 model has trees".into()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A model file as format 1 wrote it (no recipe, no classes).
    const V1: &str = r#"{
        "format": "medfed-model/1", "study_id": "pima", "round": 3, "target": "type",
        "positive_class": "Yes",
        "model": {"kind": "logistic", "features": ["glu", "bmi"],
                  "standardization": {"mean": [120.0, 32.0], "std": [30.0, 6.0]},
                  "weights": [1.0, 0.5, -0.2]},
        "sites": ["a", "b"], "training_rows": 150, "train_loss": 0.5, "validation": null,
        "created_unix": 0
    }"#;

    #[test]
    fn format_1_files_are_still_read_as_raw_numeric_columns() {
        let m: ExportedModel = serde_json::from_str(V1).unwrap();
        m.validate().unwrap();
        let recipe = m.model.preprocessing();
        assert_eq!(recipe.features(), ["glu", "bmi"]);
        let row = |c: &str| match c {
            "glu" => Some("150"),
            "bmi" => Some("NA"),
            _ => None,
        };
        // Nothing is imputed in a format 1 model: a gap is an error, never a guess.
        assert!(recipe.apply(&row, false).is_err());
        // A recipe in a file that says format 1 is refused, as is an unknown format.
        let mut with_recipe = m.clone();
        with_recipe.model.recipe = crate::preprocess::Recipe::identity(&m.model.features);
        assert!(with_recipe.validate().unwrap_err().contains("format 1"));
        let mut future = m.clone();
        future.format = "medfed-model/4".into();
        assert!(
            future
                .validate()
                .unwrap_err()
                .contains("medfed-model/1, medfed-model/2, medfed-model/3")
        );
        // Format 3 is a trees model: one without trees is refused.
        let mut trees = m.clone();
        trees.format = TREES_MODEL_FORMAT.into();
        assert!(trees.validate().unwrap_err().contains("has trees"));
    }

    #[test]
    fn a_recipe_must_make_the_models_features() {
        let mut m: ExportedModel = serde_json::from_str(V1).unwrap();
        m.format = MODEL_FORMAT.into();
        let pre = crate::preprocess::Preprocess {
            categorical: [("sex".to_string(), vec!["f".to_string(), "m".to_string()])].into(),
            impute: Default::default(),
        };
        m.model.recipe = pre.recipe(&["glu".to_string(), "sex".to_string()]);
        let err = m.validate().unwrap_err();
        assert!(err.contains("sex_f"), "{err}");
        m.model.features = m.model.recipe.features();
        m.model.standardization.mean.push(0.5);
        m.model.standardization.std.push(0.5);
        m.model.weights.insert(2, 0.1);
        m.validate().unwrap();
        let json = serde_json::to_string(&m).unwrap();
        let back: ExportedModel = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
