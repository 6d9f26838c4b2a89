//! Scoring inside the stream: an approved global model gives every new record its risk
//! score, and a record scoring above the threshold goes to the alerts stream
//! (`[[ingest.score]]`). The model reads the record's raw fields with its own preprocessing
//! (categories, imputed values, standardization); scores are kept with the records, in the
//! hospital, exactly once like the rest of the pipeline, and no study or query may read them.

use std::path::{Path, PathBuf};

use medfed_protocol::export::ExportedModel;
use medfed_protocol::model::ModelKind;
use medfed_protocol::preprocess::{Input, Recipe};
use serde::{Deserialize, Serialize};

use super::{Record, Value};
use crate::runtime::record::FieldName;
use crate::runtime::{
    Envelope, KvState, MessageCollector, NEXT, StreamTask, TaskCoordinator, TaskError,
};

/// `[[ingest.score]]`: a model that scores every record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    /// An exported model file (`final.json` of a study), relative to `node.toml`.
    pub model: PathBuf,
    /// The SHA-256 of the model file as approved (`sha256sum final.json`): a file that
    /// changed since is refused, and the pipeline does not start.
    pub sha256: String,
    /// The field the score is written to: the probability of the model's positive class
    /// (logistic), of `class` (multinomial), or the prediction (linear).
    pub output: String,
    /// For a multinomial model: the class whose probability is the score.
    #[serde(default)]
    pub class: Option<String>,
    /// A record whose score is above this goes to the `alerts` stream too.
    #[serde(default)]
    pub alert_above: Option<f64>,
}

impl ScoreSpec {
    /// Makes the model's path relative to the configuration file's directory.
    pub fn resolve(&mut self, config_path: &Path) {
        self.model = medfed_infra::config::resolve(config_path, &self.model);
    }
}

/// One loaded model.
struct Scorer {
    model: ExportedModel,
    recipe: Recipe,
    /// Which output is the score.
    output_index: usize,
    output: FieldName,
    alert_above: Option<f64>,
    /// `study round N`, for the alerts.
    label: String,
    /// Per recipe input: where the record holds it (its own field, or, for a categorical
    /// column a pipeline one-hot encoded, the fields `{column}_{category}`).
    one_hot: Vec<Option<Vec<FieldName>>>,
    columns: Vec<FieldName>,
    /// Per categorical input, its categories as numbers (a number field's value is
    /// compared with them), `None` where a category is not a number.
    numeric_categories: Vec<Vec<Option<f64>>>,
    /// The model folded with its standardization: per output, `a` over the inputs and the
    /// intercept `c`, so that output k's linear part is `a_k · x + c_k` on raw inputs.
    folded: Vec<(Vec<f64>, f64)>,
    /// The record's inputs, reused.
    x: Vec<f64>,
}

/// Scores each record with each declared model; every record goes on, with its scores.
pub struct Score {
    scorers: Vec<Scorer>,
}

fn err(detail: String) -> TaskError {
    TaskError {
        task: "score".into(),
        detail,
    }
}

/// Reads and checks a model file against its approved hash.
pub fn load_model(spec: &ScoreSpec) -> Result<ExportedModel, TaskError> {
    let path = &spec.model;
    let bytes = std::fs::read(path)
        .map_err(|e| err(format!("cannot read model file {}: {e}", path.display())))?;
    let digest = medfed_protocol::audit::sha256_hex(&bytes);
    if !digest.eq_ignore_ascii_case(spec.sha256.trim()) {
        return Err(err(format!(
            "model file {} has SHA-256 {digest}, not the approved {}: the file changed since it \
             was approved (set sha256 to the new hash once the new model is approved)",
            path.display(),
            spec.sha256
        )));
    }
    let model: ExportedModel = serde_json::from_slice(&bytes).map_err(|e| {
        err(format!(
            "{} is not a medfed model file: {e}",
            path.display()
        ))
    })?;
    model
        .validate()
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    Ok(model)
}

impl Score {
    /// Loads every declared model (its hash checked); refuses a multinomial model without
    /// `class`, a class the model does not have, and a `class` on another model.
    pub fn new(specs: &[ScoreSpec]) -> Result<Score, TaskError> {
        let mut scorers = Vec::new();
        for spec in specs {
            let model = load_model(spec)?;
            if model.trees.is_some() {
                return Err(err(format!(
                    "score '{}': {} is a boosted-trees model, which cannot score records in a \
                     pipeline yet (score its extract with `medfed model predict`)",
                    spec.output,
                    spec.model.display()
                )));
            }
            let output_index = match (model.model.kind, &spec.class) {
                (ModelKind::Multinomial { .. }, Some(class)) => model
                    .classes
                    .iter()
                    .position(|c| c == class)
                    .ok_or_else(|| {
                        err(format!(
                            "score '{}': the model has no class {class:?} (its classes: {})",
                            spec.output,
                            model.classes.join(", ")
                        ))
                    })?,
                (ModelKind::Multinomial { .. }, None) => {
                    return Err(err(format!(
                        "score '{}': the model is multinomial: set class to the class whose \
                         probability is the score (one of {})",
                        spec.output,
                        model.classes.join(", ")
                    )));
                }
                (_, Some(_)) => {
                    return Err(err(format!(
                        "score '{}': class is for a multinomial model; this one is {}",
                        spec.output, model.model.kind
                    )));
                }
                (_, None) => 0,
            };
            let recipe = model.model.preprocessing();
            let columns = recipe.columns().into_iter().map(FieldName::new).collect();
            let one_hot = recipe
                .inputs
                .iter()
                .map(|i| match i {
                    Input::Categorical { column, categories } => Some(
                        categories
                            .iter()
                            .map(|c| FieldName::new(&format!("{column}_{c}")))
                            .collect(),
                    ),
                    Input::Numeric { .. } => None,
                })
                .collect();
            let numeric_categories = recipe
                .inputs
                .iter()
                .map(|i| match i {
                    Input::Categorical { categories, .. } => {
                        categories.iter().map(|c| c.trim().parse().ok()).collect()
                    }
                    Input::Numeric { .. } => Vec::new(),
                })
                .collect();
            let d = model.model.features.len();
            let std = &model.model.standardization;
            let folded = model
                .model
                .weights
                .chunks_exact(d + 1)
                .map(|block| {
                    let a: Vec<f64> = (0..d).map(|j| block[j] / std.std[j]).collect();
                    let c = block[d] - (0..d).map(|j| a[j] * std.mean[j]).sum::<f64>();
                    (a, c)
                })
                .collect();
            scorers.push(Scorer {
                label: format!("study '{}' round {}", model.study_id, model.round),
                numeric_categories,
                folded,
                x: Vec::with_capacity(d),
                recipe,
                output_index,
                output: FieldName::new(&spec.output),
                alert_above: spec.alert_above,
                one_hot,
                columns,
                model,
            });
        }
        Ok(Score { scorers })
    }

    /// The score of one record by one model, or `None` if the model cannot read it (a
    /// value missing that the model does not impute, a category it does not know): the
    /// model's inputs made from the record's fields as [`Recipe::apply`] makes them from
    /// text, then the model's output.
    fn score(s: &mut Scorer, record: &Record) -> Option<f64> {
        s.x.clear();
        for (k, input) in s.recipe.inputs.iter().enumerate() {
            let value = record.get(s.columns[k].as_str());
            match input {
                Input::Numeric { impute, .. } => {
                    let v = match value? {
                        Value::Number(v) => *v,
                        Value::Text(t) if !medfed_protocol::preprocess::missing(t) => {
                            t.trim().parse().ok().filter(|v: &f64| v.is_finite())?
                        }
                        _ => impute.filter(|v| v.is_finite())?,
                    };
                    s.x.push(v);
                }
                Input::Categorical { categories, .. } => {
                    let start = s.x.len();
                    s.x.extend(std::iter::repeat_n(0.0, categories.len()));
                    let at = match value {
                        Some(Value::Text(t)) if !medfed_protocol::preprocess::missing(t) => {
                            Some(categories.iter().position(|c| c == t.trim())?)
                        }
                        Some(Value::Number(v)) => Some(
                            s.numeric_categories[k]
                                .iter()
                                .position(|c| *c == Some(*v))?,
                        ),
                        Some(_) => None,
                        // The pipeline one-hot encoded this column; a record with neither
                        // the column nor its one-hot fields cannot be read.
                        None => {
                            let fields = s.one_hot[k].as_ref()?;
                            if fields.iter().all(|f| record.get(f.as_str()).is_none()) {
                                return None;
                            }
                            fields
                                .iter()
                                .position(|f| record.number(f.as_str()) == Some(1.0))
                        }
                    };
                    if let Some(at) = at {
                        s.x[start + at] = 1.0;
                    }
                }
            }
        }
        let linear =
            |(a, c): &(Vec<f64>, f64)| a.iter().zip(&s.x).map(|(a, x)| a * x).sum::<f64>() + c;
        let p = match s.model.model.kind {
            ModelKind::Logistic => 1.0 / (1.0 + (-linear(&s.folded[0])).exp()),
            ModelKind::Linear => linear(&s.folded[0]),
            ModelKind::Multinomial { .. } => {
                let z: Vec<f64> = s.folded.iter().map(linear).collect();
                let max = z.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
                let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                (z[s.output_index] - max).exp() / sum
            }
        };
        p.is_finite().then_some(p)
    }
}

impl StreamTask for Score {
    fn process(
        &mut self,
        env: &Envelope,
        state: &mut KvState,
        out: &mut MessageCollector,
        coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        crate::runtime::process_or_pass_on(self, env, state, out, coord)
    }

    fn process_record(
        &mut self,
        _env: &Envelope,
        mut record: Record,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        for s in &mut self.scorers {
            let score = Score::score(s, &record);
            record.set_named(&s.output, score.map_or(Value::Missing, Value::Number));
            if let (Some(p), Some(limit)) = (score, s.alert_above)
                && p > limit
            {
                let why = format!(
                    "{} = {p:.3} is above {limit} ({})",
                    s.output.as_str(),
                    s.label
                );
                super::features::send_alert(&record, &why, out);
            }
        }
        out.send_record(NEXT, record);
        Ok(())
    }
}
