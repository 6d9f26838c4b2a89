//! A study's preprocessing: how a record's raw columns become the model's input vector.
//!
//! A study names raw columns as its features. `[study.preprocess]` says which of them are
//! categorical (one 0/1 input `{column}_{category}` per declared category, the encoding of
//! a node's `[[ingest.one_hot]]`) and how missing values are imputed (`"mean"`: the
//! federation's mean of the column over the sites' training rows, summed like every other
//! statistic; or a fixed value). The aggregator resolves that into a [`Recipe`], which the
//! exported model carries: `medfed model evaluate` and `medfed model predict` apply the
//! model to raw records with the study's original columns, and every site applies the same
//! recipe to its own rows. Nothing here depends on one site's data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a missing value of a numeric feature is replaced (`impute = { col = "mean" }` or
/// `impute = { col = { value = 72 } }`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImputeRule {
    /// The federation's mean of the column over the sites' training rows (from the
    /// feature-statistics exchange; not available under differential privacy, which has
    /// none).
    Mean,
    /// A fixed value, e.g. a clinically normal one.
    Value(f64),
}

/// `[study.preprocess]`: which features are categorical, and how missing values are
/// imputed. Empty by default: every feature numeric, and a missing value an error. (A wire
/// type too, in study announcements: no field is ever skipped.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocess {
    /// Categorical features and their categories: `{ sex = ["f", "m"] }`. Each becomes one
    /// 0/1 input `{column}_{category}` per category; a missing value (empty or `NA`) sets
    /// none of them, a value not listed is an error.
    #[serde(default)]
    pub categorical: BTreeMap<String, Vec<String>>,
    /// Numeric features whose missing values (empty or `NA`) are imputed, and how.
    #[serde(default)]
    pub impute: BTreeMap<String, ImputeRule>,
}

impl Preprocess {
    /// Whether there is nothing to do (every feature numeric, nothing imputed).
    pub fn is_empty(&self) -> bool {
        self.categorical.is_empty() && self.impute.is_empty()
    }

    /// The recipe over `features` (raw columns, in the study's order), with imputed values
    /// still unknown for `"mean"` (NaN until the federation's statistics give them).
    pub fn recipe(&self, features: &[String]) -> Recipe {
        Recipe {
            inputs: features
                .iter()
                .map(|f| match self.categorical.get(f) {
                    Some(categories) => Input::Categorical {
                        column: f.clone(),
                        categories: categories.clone(),
                    },
                    None => Input::Numeric {
                        column: f.clone(),
                        impute: self.impute.get(f).map(|rule| match rule {
                            ImputeRule::Mean => f64::NAN,
                            ImputeRule::Value(v) => *v,
                        }),
                    },
                })
                .collect(),
        }
    }

    /// Checks the declarations against the study's `features`: every categorical or imputed
    /// column is a feature, a categorical one has distinct, non-empty categories (at least
    /// one) and is not imputed, and a fixed imputed value is finite. The error names the key.
    pub fn validate(&self, features: &[String]) -> Result<(), (String, String)> {
        for (column, categories) in &self.categorical {
            let key = format!("preprocess.categorical.{column}");
            if !features.contains(column) {
                return Err((key, "is not one of the study's features".into()));
            }
            if categories.is_empty() {
                return Err((key, "lists no category".into()));
            }
            let distinct: std::collections::BTreeSet<&String> = categories.iter().collect();
            if distinct.len() != categories.len() {
                return Err((key, "names a category twice".into()));
            }
            if categories.iter().any(|c| missing(c)) {
                return Err((
                    key,
                    "names an empty or NA category (a missing value sets no category)".into(),
                ));
            }
            if self.impute.contains_key(column) {
                return Err((
                    format!("preprocess.impute.{column}"),
                    "is a categorical feature: a missing category sets none of its inputs".into(),
                ));
            }
        }
        for (column, rule) in &self.impute {
            let key = format!("preprocess.impute.{column}");
            if !features.contains(column) {
                return Err((key, "is not one of the study's features".into()));
            }
            if let ImputeRule::Value(v) = rule
                && !v.is_finite()
            {
                return Err((key, "must be a finite number".into()));
            }
        }
        Ok(())
    }

    /// Whether an imputation needs the federation's statistics (a `"mean"`).
    pub fn needs_statistics(&self) -> bool {
        self.impute.values().any(|r| *r == ImputeRule::Mean)
    }
}

/// One raw column's part of the input vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// A number; a missing one is replaced by `impute` (an error without it).
    Numeric {
        /// The raw column.
        column: String,
        /// The value a missing entry takes (the federation's mean, or the study's value).
        #[serde(default)]
        impute: Option<f64>,
    },
    /// A category: one 0/1 input `{column}_{category}` per category.
    Categorical {
        /// The raw column.
        column: String,
        /// Its categories, in the inputs' order.
        categories: Vec<String>,
    },
}

/// The model's feature pipeline: raw columns in, the input vector out (before the
/// standardization the model carries).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The raw columns, in the input vector's order.
    pub inputs: Vec<Input>,
}

/// Why a record cannot be turned into an input vector.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecipeError {
    /// A column the recipe reads is not in the record.
    #[error("no column '{column}'")]
    MissingColumn {
        /// The column.
        column: String,
    },
    /// A value is missing and the recipe imputes none for its column.
    #[error("'{column}' is missing and the model imputes no value for it")]
    Missing {
        /// The column.
        column: String,
    },
    /// A numeric column's value is not a finite number.
    #[error("'{column}' = {value:?} is not a finite number")]
    NotANumber {
        /// The column.
        column: String,
        /// The value.
        value: String,
    },
    /// A categorical column's value is not one of its categories.
    #[error("'{column}' = {value:?} is not one of its categories ({categories})")]
    UnknownCategory {
        /// The column.
        column: String,
        /// The value.
        value: String,
        /// The categories, listed.
        categories: String,
    },
}

/// Whether a raw value is missing: empty or `NA` (any case).
pub fn missing(raw: &str) -> bool {
    let t = raw.trim();
    t.is_empty() || t.eq_ignore_ascii_case("na")
}

impl Recipe {
    /// Every input numeric and nothing imputed: what a model without a recipe (format 1)
    /// reads.
    pub fn identity(features: &[String]) -> Recipe {
        Recipe {
            inputs: features
                .iter()
                .map(|f| Input::Numeric {
                    column: f.clone(),
                    impute: None,
                })
                .collect(),
        }
    }

    /// The input vector's names: a numeric column's own, and `{column}_{category}` for
    /// each category of a categorical one.
    pub fn features(&self) -> Vec<String> {
        self.inputs
            .iter()
            .flat_map(|i| match i {
                Input::Numeric { column, .. } => vec![column.clone()],
                Input::Categorical { column, categories } => {
                    categories.iter().map(|c| format!("{column}_{c}")).collect()
                }
            })
            .collect()
    }

    /// The raw columns read.
    pub fn columns(&self) -> Vec<&str> {
        self.inputs
            .iter()
            .map(|i| match i {
                Input::Numeric { column, .. } | Input::Categorical { column, .. } => {
                    column.as_str()
                }
            })
            .collect()
    }

    /// Checks a recipe read from a file or the network against the model's feature names.
    pub fn validate(&self, features: &[String]) -> Result<(), String> {
        if self.features() != features {
            return Err(format!(
                "the preprocessing makes the inputs {:?} but the model's features are {:?}",
                self.features(),
                features
            ));
        }
        for i in &self.inputs {
            if let Input::Numeric {
                column,
                impute: Some(v),
            } = i
                && !v.is_finite()
            {
                return Err(format!("the imputed value of '{column}' is not a number"));
            }
        }
        Ok(())
    }

    /// The input vector of one record; `get(column)` gives a raw value (`None` if the
    /// record has no such column). A missing numeric value is imputed or an error; when
    /// `keep_missing` it is NaN instead, for the sites' training rows before the
    /// federation's means are known.
    pub fn apply<'a>(
        &self,
        get: &dyn Fn(&str) -> Option<&'a str>,
        keep_missing: bool,
    ) -> Result<Vec<f64>, RecipeError> {
        let raw: Vec<Option<&str>> = self.columns().into_iter().map(get).collect();
        self.apply_values(&raw, keep_missing)
    }

    /// [`Recipe::apply`] on the raw values of [`Recipe::columns`], in order (`None`: the
    /// record has no such column).
    pub fn apply_values(
        &self,
        raw: &[Option<&str>],
        keep_missing: bool,
    ) -> Result<Vec<f64>, RecipeError> {
        let mut out = Vec::with_capacity(self.inputs.len());
        for (input, raw) in self.inputs.iter().zip(raw) {
            match input {
                Input::Numeric { column, impute } => {
                    let raw = raw.ok_or_else(|| RecipeError::MissingColumn {
                        column: column.clone(),
                    })?;
                    if missing(raw) {
                        match impute {
                            Some(v) if v.is_finite() => out.push(*v),
                            Some(_) if keep_missing => out.push(f64::NAN),
                            _ => {
                                return Err(RecipeError::Missing {
                                    column: column.clone(),
                                });
                            }
                        }
                        continue;
                    }
                    let v: f64 = raw
                        .trim()
                        .parse()
                        .ok()
                        .filter(|v: &f64| v.is_finite())
                        .ok_or_else(|| RecipeError::NotANumber {
                            column: column.clone(),
                            value: raw.to_string(),
                        })?;
                    out.push(v);
                }
                Input::Categorical { column, categories } => {
                    let raw = raw.ok_or_else(|| RecipeError::MissingColumn {
                        column: column.clone(),
                    })?;
                    let start = out.len();
                    out.extend(std::iter::repeat_n(0.0, categories.len()));
                    if missing(raw) {
                        continue;
                    }
                    let at = categories
                        .iter()
                        .position(|c| c == raw.trim())
                        .ok_or_else(|| RecipeError::UnknownCategory {
                            column: column.clone(),
                            value: raw.to_string(),
                            categories: categories
                                .iter()
                                .map(|c| format!("{c:?}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                        })?;
                    out[start + at] = 1.0;
                }
            }
        }
        if raw.len() < self.inputs.len() {
            return Err(RecipeError::MissingColumn {
                column: self.columns()[raw.len()].to_string(),
            });
        }
        Ok(out)
    }

    /// Fills the imputed values still unknown (NaN) from the federation's per-feature means
    /// (over the input vector), e.g. after the statistics exchange.
    pub fn resolve_means(&mut self, means: &[f64]) {
        let mut j = 0;
        for input in &mut self.inputs {
            match input {
                Input::Numeric { impute, .. } => {
                    if let Some(v) = impute
                        && v.is_nan()
                    {
                        *v = means.get(j).copied().unwrap_or(f64::NAN);
                    }
                    j += 1;
                }
                Input::Categorical { categories, .. } => j += categories.len(),
            }
        }
    }

    /// The imputed value of each input (NaN where none), in the input vector's order.
    pub fn imputed(&self) -> Vec<f64> {
        self.inputs
            .iter()
            .flat_map(|i| match i {
                Input::Numeric { impute, .. } => vec![impute.unwrap_or(f64::NAN)],
                Input::Categorical { categories, .. } => vec![f64::NAN; categories.len()],
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre() -> Preprocess {
        Preprocess {
            categorical: [("sex".to_string(), vec!["f".to_string(), "m".to_string()])].into(),
            impute: [
                ("chol".to_string(), ImputeRule::Mean),
                ("bp".to_string(), ImputeRule::Value(72.0)),
            ]
            .into(),
        }
    }

    fn features() -> Vec<String> {
        ["age", "sex", "chol", "bp"].map(String::from).to_vec()
    }

    #[test]
    fn a_record_becomes_the_input_vector() {
        let mut r = pre().recipe(&features());
        assert_eq!(r.features(), ["age", "sex_f", "sex_m", "chol", "bp"]);
        let row: BTreeMap<&str, &str> =
            [("age", "61"), ("sex", "m"), ("chol", "NA"), ("bp", "")].into();
        let get = |c: &str| row.get(c).copied();
        // Before the means are known a site keeps the gap (NaN); a model never does.
        let x = r.apply(&get, true).unwrap();
        assert_eq!(x[..3], [61.0, 0.0, 1.0]);
        assert!(x[3].is_nan());
        assert_eq!(x[4], 72.0);
        assert_eq!(
            r.apply(&get, false),
            Err(RecipeError::Missing {
                column: "chol".into()
            })
        );
        r.resolve_means(&[60.0, 0.5, 0.5, 210.0, 80.0]);
        assert_eq!(r.apply(&get, false).unwrap(), [61.0, 0.0, 1.0, 210.0, 72.0]);
        assert!(r.validate(&r.features()).is_ok());
        // A missing category sets none; an unknown one is an error naming it.
        let row2: BTreeMap<&str, &str> =
            [("age", "61"), ("sex", "NA"), ("chol", "200"), ("bp", "80")].into();
        assert_eq!(
            r.apply(&|c| row2.get(c).copied(), false).unwrap(),
            [61.0, 0.0, 0.0, 200.0, 80.0]
        );
        let row3: BTreeMap<&str, &str> =
            [("age", "61"), ("sex", "F"), ("chol", "200"), ("bp", "80")].into();
        let err = r.apply(&|c| row3.get(c).copied(), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"F\" is not one of its categories (\"f\", \"m\")"),
            "{err}"
        );
        let err = r
            .apply(&|c| row2.get(c).copied().filter(|_| c != "bp"), false)
            .unwrap_err();
        assert_eq!(
            err,
            RecipeError::MissingColumn {
                column: "bp".into()
            }
        );
    }

    #[test]
    fn declarations_are_checked_against_the_features() {
        assert!(pre().validate(&features()).is_ok());
        let mut p = pre();
        p.categorical.insert("eye".into(), vec!["l".into()]);
        assert_eq!(
            p.validate(&features()).unwrap_err().0,
            "preprocess.categorical.eye"
        );
        let mut p = pre();
        p.impute.insert("sex".into(), ImputeRule::Value(0.0));
        assert_eq!(
            p.validate(&features()).unwrap_err().0,
            "preprocess.impute.sex"
        );
        let mut p = pre();
        p.categorical
            .insert("age".into(), vec!["x".into(), "x".into()]);
        assert!(p.validate(&features()).unwrap_err().1.contains("twice"));
        let mut p = pre();
        p.impute
            .insert("bp".into(), ImputeRule::Value(f64::INFINITY));
        assert!(p.validate(&features()).is_err());
        assert!(pre().needs_statistics());
    }

    #[test]
    fn toml_and_json_spell_the_rules_plainly() {
        let p: Preprocess = toml::from_str(
            "categorical = { sex = [\"f\", \"m\"] }\nimpute = { chol = \"mean\", bp = { value = 72 } }\n",
        )
        .unwrap();
        assert_eq!(p, pre());
        let r = pre().recipe(&features());
        let json = serde_json::to_string(&r).unwrap();
        let back: Recipe = serde_json::from_str(&json).unwrap();
        assert_eq!(back.features(), r.features());
        let bytes = postcard::to_allocvec(&pre()).unwrap();
        assert_eq!(postcard::from_bytes::<Preprocess>(&bytes).unwrap(), pre());
    }
}
