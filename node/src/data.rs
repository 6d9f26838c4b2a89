//! The node's local data: CSV tables, and the numeric training/validation rows a study
//! asks for. Nothing in here leaves the node; only [`FeatureStats`], model updates and
//! evaluation summaries computed from it do.

use std::path::{Path, PathBuf};

use medfed_protocol::messages::StudyAnnouncement;
use medfed_protocol::model::ModelKind;
use medfed_protocol::preprocess::{Input, Recipe, RecipeError};
use medfed_protocol::stats::FeatureStats;
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// Why a dataset could not be loaded or prepared for a study. The messages hold paths, lines
/// and values for the site's own log; [`DataError::public_reason`] is what the aggregator
/// may be told.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The dataset's file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not valid CSV.
    #[error("{path}: {source}")]
    Csv {
        /// The dataset's file.
        path: PathBuf,
        /// The CSV reader's error.
        source: csv::Error,
    },
    /// A column a study names is not in the table.
    #[error("{path}: no column named '{column}' (columns: {available})")]
    MissingColumn {
        /// The dataset's file.
        path: PathBuf,
        /// The column asked for.
        column: String,
        /// The table's columns, comma-separated.
        available: String,
    },
    /// A cell that cannot be used (e.g. not a number in a feature column).
    #[error("{path}, line {line}, column '{column}': {why} (value {value:?})")]
    BadValue {
        /// The dataset's file.
        path: PathBuf,
        /// The cell's line in the file (the header is line 1).
        line: u64,
        /// The cell's column.
        column: String,
        /// The cell's text (never sent to the aggregator).
        value: String,
        /// What is wrong with it, e.g. "not a number".
        why: &'static str,
    },
    /// Fewer than 2 rows: nothing to both train and validate on.
    #[error("{path}: {rows} rows; a study needs at least 2 (one to train, one to validate)")]
    TooFewRows {
        /// The dataset's file.
        path: PathBuf,
        /// Its data rows.
        rows: usize,
    },
    /// `why` is sent to the aggregator: it never holds a data value.
    #[error("{path}: {why}")]
    Invalid {
        /// The dataset's file.
        path: PathBuf,
        /// What is wrong, without any data value.
        why: String,
    },
}

impl DataError {
    /// What the aggregator may be told: the kind of problem and the column, never a value,
    /// a line number or a local path (those are in the site's own log).
    pub fn public_reason(&self) -> String {
        match self {
            DataError::Io { .. } | DataError::Csv { .. } => {
                "this site's dataset cannot be read (details in the site's log)".into()
            }
            DataError::MissingColumn { column, .. } => {
                format!("this site's dataset has no column named '{column}'")
            }
            DataError::BadValue { column, why, .. } => format!(
                "this site's dataset has a value in column '{column}' that is {why} (details in the site's log)"
            ),
            DataError::TooFewRows { .. } => {
                "this site's dataset has too few rows for a study".into()
            }
            DataError::Invalid { why, .. } => why.clone(),
        }
    }
}

/// A reader that notes the byte offset of every '\n' it reads through.
struct Newlines<R> {
    inner: R,
    read: u64,
    at: Vec<u64>,
}

impl<R> Newlines<R> {
    fn new(inner: R) -> Newlines<R> {
        Newlines {
            inner,
            read: 0,
            at: Vec::new(),
        }
    }
}

impl<R: std::io::Read> std::io::Read for Newlines<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let base = self.read;
        self.at.extend(
            buf[..n]
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| base + i as u64),
        );
        self.read += n as u64;
        Ok(n)
    }
}

/// A CSV table held in memory: header and raw string records.
#[derive(Debug, Clone)]
pub struct Table {
    /// Where the table was read from (named in errors).
    pub path: PathBuf,
    /// The header's column names, in file order.
    pub columns: Vec<String>,
    rows: Vec<csv::StringRecord>,
    /// Stable row ids where the source has them (ingested records); else the row's index.
    ids: Option<Vec<u32>>,
}

impl Table {
    /// Reads a CSV file with a header row (cells trimmed).
    pub fn load(path: &Path) -> Result<Table, DataError> {
        let file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Table::from_reader(path, file)
    }

    /// Parses CSV from `reader`; `path` names the source in errors.
    pub fn from_reader(path: &Path, reader: impl std::io::Read) -> Result<Table, DataError> {
        let csv_err = |source| DataError::Csv {
            path: path.to_path_buf(),
            source,
        };
        let mut r = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_reader(Newlines::new(reader));
        let columns = r
            .headers()
            .map_err(csv_err)?
            .iter()
            .map(str::to_string)
            .collect();
        let mut rows = r
            .records()
            .collect::<Result<Vec<_>, _>>()
            .map_err(csv_err)?;
        // The csv crate counts a record after a "\r\n" as starting on the line before (its
        // position is that of the '\n'): number the lines from where each '\n' is instead,
        // so that an error names the right line of a file with Windows line endings.
        let newlines = r.into_inner().at;
        for rec in &mut rows {
            if let Some(mut p) = rec.position().cloned() {
                p.set_line(1 + newlines.partition_point(|&o| o <= p.byte()) as u64);
                rec.set_position(Some(p));
            }
        }
        Ok(Table {
            path: path.to_path_buf(),
            columns,
            rows,
            ids: None,
        })
    }

    /// A table of de-identified records (an `[[ingest]]` pipeline's output, with their
    /// stable ids): one column per field any record has, in name order; numbers as text,
    /// missing values empty. `source` names it in errors.
    pub fn from_records(source: &Path, records: &[(u32, crate::deid::Record)]) -> Table {
        let mut table = TableBuilder::new(source);
        for (id, r) in records {
            table.push(*id, r);
        }
        table.finish()
    }

    /// What kind of source the rows come from, for comparing row ids: "a CSV file" (ids
    /// are row numbers, whichever file), or the ingestion pipeline.
    pub fn source(&self) -> String {
        match self.ids {
            Some(_) => self.path.display().to_string(),
            None => "a CSV file".to_string(),
        }
    }

    /// A row's id, stable while the source only grows: what differencing protection
    /// remembers of an answered cohort.
    pub fn row_id(&self, row: usize) -> u32 {
        self.ids
            .as_ref()
            .and_then(|ids| ids.get(row).copied())
            .unwrap_or(row as u32)
    }

    /// Data rows (the header not counted).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no data row.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The text of one cell ("" beyond the row's end).
    pub fn cell(&self, row: usize, column: usize) -> &str {
        self.rows[row].get(column).unwrap_or("")
    }

    /// The index of column `name`; [`DataError::MissingColumn`] if there is none.
    pub fn column(&self, name: &str) -> Result<usize, DataError> {
        self.columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| DataError::MissingColumn {
                path: self.path.clone(),
                column: name.to_string(),
                available: self.columns.join(", "),
            })
    }

    fn line(&self, row: usize) -> u64 {
        self.rows[row]
            .position()
            .map_or(row as u64 + 2, |p| p.line())
    }

    fn bad(&self, row: usize, column: &str, value: &str, why: &'static str) -> DataError {
        DataError::BadValue {
            path: self.path.clone(),
            line: self.line(row),
            column: column.to_string(),
            value: value.to_string(),
            why,
        }
    }

    /// Where each of a recipe's raw columns is read: a column of the table, or for a
    /// categorical column the table lacks, the 0/1 columns `{column}_{category}` of every
    /// category (an ingest pipeline's `[[ingest.one_hot]]` of the same categories made them).
    fn recipe_sources(&self, recipe: &Recipe) -> Result<Vec<RawSource>, DataError> {
        recipe
            .inputs
            .iter()
            .map(|input| match input {
                Input::Numeric { column, .. } => self.column(column).map(RawSource::Column),
                Input::Categorical { column, categories } => match self.column(column) {
                    Ok(c) => Ok(RawSource::Column(c)),
                    Err(missing) => categories
                        .iter()
                        .map(|cat| self.column(&format!("{column}_{cat}")).ok())
                        .collect::<Option<Vec<usize>>>()
                        .map(RawSource::OneHot)
                        .ok_or(missing),
                },
            })
            .collect()
    }

    /// The raw values of row `i` for a recipe's columns, from [`Table::recipe_sources`].
    fn recipe_values<'a>(
        &'a self,
        i: usize,
        recipe: &'a Recipe,
        sources: &[RawSource],
    ) -> Vec<Option<&'a str>> {
        sources
            .iter()
            .zip(&recipe.inputs)
            .map(|(source, input)| match (source, input) {
                (RawSource::Column(c), _) => Some(self.cell(i, *c)),
                (RawSource::OneHot(cols), Input::Categorical { categories, .. }) => Some(
                    cols.iter()
                        .position(|c| self.cell(i, *c).trim().parse::<f64>() == Ok(1.0))
                        .and_then(|k| categories.get(k))
                        .map_or("", String::as_str),
                ),
                (RawSource::OneHot(_), Input::Numeric { .. }) => None,
            })
            .collect()
    }

    /// Each row's inputs, or why the recipe cannot use that row (its line and column):
    /// numbers parsed, categories expanded, missing values imputed (NaN where the value is
    /// still to come, when `keep_missing`). A column the recipe reads and the table lacks is
    /// an error for the whole table.
    pub fn rows_inputs(
        &self,
        recipe: &Recipe,
        keep_missing: bool,
    ) -> Result<Vec<Result<Vec<f64>, DataError>>, DataError> {
        let sources = self.recipe_sources(recipe)?;
        Ok((0..self.rows.len())
            .map(|i| {
                let raw = self.recipe_values(i, recipe, &sources);
                recipe
                    .apply_values(&raw, keep_missing)
                    .map_err(|e| self.recipe_error(i, e, &raw, recipe))
            })
            .collect())
    }

    /// The model's input matrix (rows × the recipe's inputs) of every row, as
    /// [`Table::rows_inputs`]; the first row the recipe cannot use is the error.
    pub fn inputs(&self, recipe: &Recipe, keep_missing: bool) -> Result<Array2<f64>, DataError> {
        let width = recipe.features().len();
        let mut x = Array2::zeros((self.rows.len(), width));
        for (i, row) in self
            .rows_inputs(recipe, keep_missing)?
            .into_iter()
            .enumerate()
        {
            x.row_mut(i).assign(&ndarray::ArrayView1::from(&row?));
        }
        Ok(x)
    }

    /// The table of rows `keep` (in that order), with their ids.
    fn select(&self, keep: &[usize]) -> Table {
        Table {
            path: self.path.clone(),
            columns: self.columns.clone(),
            rows: keep.iter().map(|&i| self.rows[i].clone()).collect(),
            ids: self
                .ids
                .as_ref()
                .map(|ids| keep.iter().map(|&i| ids[i]).collect()),
        }
    }

    /// The rows whose `column` has a value (not empty, not `NA`; one of `allowed` if
    /// given), and how many did not: what a model can be trained or evaluated on.
    pub fn with_value_in(
        &self,
        column: &str,
        allowed: Option<&[String]>,
    ) -> Result<(Table, usize), DataError> {
        let c = self.column(column)?;
        let keep: Vec<usize> = (0..self.len())
            .filter(|&i| {
                let v = self.cell(i, c);
                !medfed_protocol::preprocess::missing(v)
                    && allowed.is_none_or(|a| a.iter().any(|k| k == v))
            })
            .collect();
        Ok((self.select(&keep), self.len() - keep.len()))
    }

    /// The line of row `i` in its file (the header is line 1).
    pub fn line_of(&self, i: usize) -> u64 {
        self.line(i)
    }

    fn recipe_error(
        &self,
        i: usize,
        e: RecipeError,
        raw: &[Option<&str>],
        recipe: &Recipe,
    ) -> DataError {
        let value_of = |column: &str| {
            recipe
                .columns()
                .iter()
                .position(|c| *c == column)
                .and_then(|k| raw.get(k).copied().flatten())
                .unwrap_or("")
                .to_string()
        };
        match e {
            RecipeError::MissingColumn { column } => DataError::MissingColumn {
                path: self.path.clone(),
                column,
                available: self.columns.join(", "),
            },
            RecipeError::Missing { column } => {
                let v = value_of(&column);
                self.bad(i, &column, &v, "missing, and no value is imputed for it")
            }
            RecipeError::NotANumber { column, value } => {
                self.bad(i, &column, &value, "not a number")
            }
            RecipeError::UnknownCategory { column, value, .. } => {
                self.bad(i, &column, &value, "not one of the study's categories")
            }
        }
    }

    /// The numeric matrix of `features` (rows × features).
    pub fn features(&self, features: &[String]) -> Result<Array2<f64>, DataError> {
        let idx = features
            .iter()
            .map(|f| self.column(f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut x = Array2::zeros((self.rows.len(), features.len()));
        for (i, rec) in self.rows.iter().enumerate() {
            for (j, (&c, name)) in idx.iter().zip(features).enumerate() {
                let raw = rec.get(c).unwrap_or("");
                let v: f64 = raw
                    .parse()
                    .map_err(|_| self.bad(i, name, raw, "not a number"))?;
                if !v.is_finite() {
                    return Err(self.bad(i, name, raw, "not a finite number"));
                }
                x[[i, j]] = v;
            }
        }
        Ok(x)
    }

    /// The values of a class column and how many rows have each (a missing label, empty
    /// or `NA`, not counted).
    pub fn classes(
        &self,
        column: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, DataError> {
        let c = self.column(column)?;
        let mut counts = std::collections::BTreeMap::new();
        for rec in &self.rows {
            let raw = rec.get(c).unwrap_or("");
            if !raw.is_empty() && !raw.eq_ignore_ascii_case("na") {
                *counts.entry(raw.to_string()).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// The target vector: 1/0 for `positive_class` (binary classification), the index of
    /// the row's class in `classes` (multinomial), or numeric values (linear).
    pub fn target(
        &self,
        column: &str,
        kind: ModelKind,
        positive_class: Option<&str>,
        classes: &[String],
    ) -> Result<Array1<f64>, DataError> {
        let c = self.column(column)?;
        self.rows
            .iter()
            .enumerate()
            .map(|(i, rec)| {
                let raw = rec.get(c).unwrap_or("");
                match kind {
                    ModelKind::Multinomial { .. } => {
                        if raw.is_empty() || raw.eq_ignore_ascii_case("na") {
                            return Err(self.bad(i, column, raw, "missing class label"));
                        }
                        classes
                            .iter()
                            .position(|k| k == raw)
                            .map(|k| k as f64)
                            .ok_or_else(|| {
                                self.bad(
                                    i,
                                    column,
                                    raw,
                                    "not one of the study's classes (compared exactly, case included)",
                                )
                            })
                    }
                    ModelKind::Logistic => {
                        if raw.is_empty() || raw.eq_ignore_ascii_case("na") {
                            Err(self.bad(i, column, raw, "missing class label"))
                        } else {
                            Ok(if Some(raw) == positive_class {
                                1.0
                            } else {
                                0.0
                            })
                        }
                    }
                    ModelKind::Linear => raw
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| self.bad(i, column, raw, "not a finite number")),
                }
            })
            .collect()
    }
}

/// Checks that a study's model and target description agree: a logistic study names its
/// positive class, a multinomial one lists as many distinct classes as its model has.
fn check_target_spec(table: &Table, study: &StudyAnnouncement) -> Result<(), DataError> {
    let invalid = |why: String| {
        Err(DataError::Invalid {
            path: table.path.clone(),
            why,
        })
    };
    if let Err(why) = study.model.validate() {
        return invalid(why);
    }
    if let Err((key, why)) = study.preprocess.validate(&study.features) {
        return invalid(format!("the study's {key} {why}"));
    }
    match study.model {
        ModelKind::Logistic if study.positive_class.is_none() => {
            invalid("a logistic study must name its positive class".into())
        }
        ModelKind::Multinomial { classes } => {
            let distinct: std::collections::BTreeSet<&String> = study.classes.iter().collect();
            if study.classes.len() != usize::from(classes) || distinct.len() != study.classes.len()
            {
                invalid(format!(
                    "the study's multinomial model has {classes} classes but lists {} distinct class names",
                    distinct.len()
                ))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// Where a recipe's raw column is read in a table.
enum RawSource {
    /// A column.
    Column(usize),
    /// The 0/1 columns of a categorical column's categories, in order.
    OneHot(Vec<usize>),
}

/// Splits `n` rows into training and validation rows, deterministically for a study (every
/// run and every party that knows the study id gets the same split). At least one row goes
/// each way when `n >= 2`.
pub fn split_rows(n: usize, validation_fraction: f64, study_id: &str) -> (Vec<usize>, Vec<usize>) {
    // FNV-1a: a stable, dependency-free seed; nothing secret depends on it.
    let seed = study_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n_val = ((n as f64 * validation_fraction).round() as usize)
        .clamp(usize::from(n >= 2), n.saturating_sub(1));
    let (val, train) = order.split_at(n_val);
    let (mut train, mut val) = (train.to_vec(), val.to_vec());
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Splits a table's rows into training and validation rows as [`split_rows`] does, but by
/// patient when `patient_key` names one of its columns: the patients (in order of their
/// first row; a row without a key is a patient of its own) are split with the study's
/// seed, and every row goes where its patient went. No patient has rows on both sides (two
/// eyes, or many visits, of one patient would otherwise let validation see training's
/// patients), and the validation fraction is of patients.
pub fn split_table(
    table: &Table,
    validation_fraction: f64,
    study_id: &str,
    patient_key: Option<&str>,
) -> (Vec<usize>, Vec<usize>) {
    let Some(patient_of) = patients_of(table, patient_key) else {
        return split_rows(table.len(), validation_fraction, study_id);
    };
    let next = patient_of.iter().max().map_or(0, |m| m + 1);
    let (_, val_patients) = split_rows(next, validation_fraction, study_id);
    let mut validation = vec![false; next];
    for p in val_patients {
        validation[p] = true;
    }
    (0..table.len()).partition(|&i| !validation[patient_of[i]])
}

/// Each row's patient, numbered 0, 1, ... in order of their first row (a row without a key
/// is a patient of its own), when `patient_key` names a column of the table.
pub fn patients_of(table: &Table, patient_key: Option<&str>) -> Option<Vec<usize>> {
    let k = patient_key.and_then(|k| table.column(k).ok())?;
    let mut patients: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut next = 0usize;
    Some(
        (0..table.len())
            .map(|i| {
                let key = table.cell(i, k).trim();
                let fresh = next;
                let p = if key.is_empty() {
                    fresh
                } else {
                    *patients.entry(key).or_insert(fresh)
                };
                if p == fresh {
                    next += 1;
                }
                p
            })
            .collect(),
    )
}

/// A study's rows at this node, raw (unstandardized).
#[derive(Debug, Clone)]
pub struct StudyData {
    /// The study's model kind.
    pub kind: ModelKind,
    /// The study's feature columns, in the model's order.
    pub features: Vec<String>,
    /// Training rows × features.
    pub x_train: Array2<f64>,
    /// Training targets (0 or 1 for a logistic study).
    pub y_train: Array1<f64>,
    /// Validation rows × features.
    pub x_val: Array2<f64>,
    /// Validation targets.
    pub y_val: Array1<f64>,
    /// The study's DP-FedAvg parameters, if it is differentially private.
    pub privacy: Option<medfed_protocol::dp::DpTraining>,
    /// Each training row's patient (empty: each row its own), the unit DP-SGD samples and
    /// clips: a patient's rows together.
    pub train_patients: Vec<usize>,
    /// A classification study's target values and how many of the study's rows have each
    /// (kept at the site: only the names of the common ones leave, see
    /// [`StudyData::common_classes`]).
    pub classes: std::collections::BTreeMap<String, u64>,
}

impl StudyData {
    /// The study's rows from `table`: features and target parsed (a bad value is an error),
    /// split into training and validation rows by the study's validation fraction, the same way
    /// every time for a study id.
    pub fn prepare(table: &Table, study: &StudyAnnouncement) -> Result<StudyData, DataError> {
        StudyData::prepare_keyed(table, study, None)
    }

    /// [`StudyData::prepare`] for a table whose rows belong to patients (`patient_key`, a
    /// column classed `patient-id`): training and validation rows are split by patient
    /// ([`split_table`]).
    pub fn prepare_keyed(
        table: &Table,
        study: &StudyAnnouncement,
        patient_key: Option<&str>,
    ) -> Result<StudyData, DataError> {
        if table.len() < 2 {
            return Err(DataError::TooFewRows {
                path: table.path.clone(),
                rows: table.len(),
            });
        }
        check_target_spec(table, study)?;
        let recipe = study.preprocess.recipe(&study.features);
        let x = table.inputs(&recipe, true)?;
        let y = table.target(
            &study.target,
            study.model,
            study.positive_class.as_deref(),
            &study.classes,
        )?;
        let classes = if study.model.is_classifier() {
            table.classes(&study.target)?
        } else {
            Default::default()
        };
        let (train, val) = split_table(
            table,
            study.validation_fraction,
            &study.study_id,
            patient_key,
        );
        let axis = ndarray::Axis(0);
        Ok(StudyData {
            kind: study.model,
            features: recipe.features(),
            x_train: x.select(axis, &train),
            y_train: y.select(axis, &train),
            x_val: x.select(axis, &val),
            y_val: y.select(axis, &val),
            privacy: study.privacy,
            train_patients: Vec::new(),
            classes,
        })
    }

    /// [`StudyData::prepare`] for a differentially private study: a row whose feature or
    /// target is not a usable value is left out instead of failing the study, and there is
    /// no least number of rows, so that only the schema (a missing column, a logistic study
    /// without a positive class), never a patient's value, can make the site decline.
    /// Returns the rows left out too (for the site's own log).
    pub fn prepare_private(
        table: &Table,
        study: &StudyAnnouncement,
        patient_key: Option<&str>,
    ) -> Result<(StudyData, usize), DataError> {
        check_target_spec(table, study)?;
        // Under differential privacy only declared values are imputed (a mean would need
        // statistics nobody releases): a row missing any other value is left out.
        let recipe = study.preprocess.recipe(&study.features);
        let usable: Vec<bool> = table
            .rows_inputs(&recipe, false)?
            .iter()
            .map(Result::is_ok)
            .collect();
        let target = table.column(&study.target)?;
        let number = |raw: &str| raw.parse::<f64>().is_ok_and(f64::is_finite);
        let keep: Vec<usize> = (0..table.len())
            .filter(|&i| {
                usable[i]
                    && match study.model {
                        ModelKind::Logistic => {
                            let raw = table.cell(i, target);
                            !raw.is_empty() && !raw.eq_ignore_ascii_case("na")
                        }
                        // A row of a class the study does not list fits none of the model's
                        // classes: left out, like a missing label.
                        ModelKind::Multinomial { .. } => {
                            study.classes.iter().any(|k| k == table.cell(i, target))
                        }
                        ModelKind::Linear => number(table.cell(i, target)),
                    }
            })
            .collect();
        let kept = table.select(&keep);
        let x = kept.inputs(&recipe, false)?;
        let y = kept.target(
            &study.target,
            study.model,
            study.positive_class.as_deref(),
            &study.classes,
        )?;
        let classes = if study.model.is_classifier() {
            kept.classes(&study.target)?
        } else {
            Default::default()
        };
        let (train, val) = split_table(
            &kept,
            study.validation_fraction,
            &study.study_id,
            patient_key,
        );
        let axis = ndarray::Axis(0);
        Ok((
            StudyData {
                kind: study.model,
                features: recipe.features(),
                x_train: x.select(axis, &train),
                y_train: y.select(axis, &train),
                x_val: x.select(axis, &val),
                y_val: y.select(axis, &val),
                privacy: study.privacy,
                train_patients: patients_of(&kept, patient_key)
                    .map(|p| train.iter().map(|&i| p[i]).collect())
                    .unwrap_or_default(),
                classes,
            },
            table.len() - kept.len(),
        ))
    }

    /// The target classes at least `min_cell` of the study's rows have (the names only;
    /// a rarer class is not named), at most [`MAX_TARGET_CLASSES`]: what the site tells
    /// the aggregator so that a study whose positive class no site has, or whose target
    /// has one class, stops before it trains.
    ///
    /// [`MAX_TARGET_CLASSES`]: medfed_protocol::messages::MAX_TARGET_CLASSES
    pub fn common_classes(&self, min_cell: u64) -> Vec<String> {
        self.classes
            .iter()
            .filter(|(_, n)| **n >= min_cell.max(1))
            .map(|(c, _)| c.clone())
            .take(medfed_protocol::messages::MAX_TARGET_CLASSES)
            .collect()
    }

    /// Count, sums and sums of squares of the training rows' features.
    pub fn feature_stats(&self) -> FeatureStats {
        FeatureStats::from_rows(self.x_train.view())
    }
}

/// Builds a [`Table`] of de-identified records one record at a time, so that a dataset
/// read from the store never holds its records and its table at once ([`Table::from_records`]
/// for records already in memory).
#[derive(Debug)]
pub struct TableBuilder {
    source: PathBuf,
    /// Column names in the order first seen, and where each is.
    columns: Vec<String>,
    index: std::collections::HashMap<String, usize>,
    rows: Vec<csv::StringRecord>,
    ids: Vec<u32>,
    /// A row's values by column (reused).
    values: Vec<Option<crate::deid::Value>>,
    /// A number's text (reused).
    number: String,
}

impl TableBuilder {
    /// An empty table; `source` names it in errors.
    pub fn new(source: &Path) -> TableBuilder {
        TableBuilder {
            source: source.to_path_buf(),
            columns: Vec::new(),
            index: std::collections::HashMap::new(),
            rows: Vec::new(),
            ids: Vec::new(),
            values: Vec::new(),
            number: String::new(),
        }
    }

    /// Rows so far.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row was added.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds `record` as a row with id `id` (a field no earlier record had is a new column,
    /// empty in the earlier rows).
    pub fn push(&mut self, id: u32, record: &crate::deid::Record) {
        use crate::deid::Value;
        use std::fmt::Write as _;
        self.values.clear();
        self.values.resize(self.columns.len(), None);
        for (name, value) in record.iter() {
            let at = match self.index.get(name) {
                Some(&at) => at,
                None => {
                    self.index.insert(name.to_string(), self.columns.len());
                    self.columns.push(name.to_string());
                    self.values.push(None);
                    self.columns.len() - 1
                }
            };
            self.values[at] = Some(value.clone());
        }
        let bytes: usize = self
            .values
            .iter()
            .map(|v| match v {
                Some(Value::Text(t)) => t.len(),
                Some(Value::Number(_)) => 24,
                _ => 0,
            })
            .sum();
        let mut row = csv::StringRecord::with_capacity(bytes, self.values.len());
        for v in &self.values {
            match v {
                Some(Value::Number(x)) => {
                    self.number.clear();
                    // Writing to a String cannot fail.
                    write!(self.number, "{x}").unwrap_or_default();
                    row.push_field(&self.number);
                }
                Some(Value::Text(t)) => row.push_field(t),
                Some(Value::Missing) | None => row.push_field(""),
            }
        }
        self.rows.push(row);
        self.ids.push(id);
    }

    /// The table: its columns in name order, every row as wide as the header.
    pub fn finish(self) -> Table {
        let TableBuilder {
            source,
            columns,
            mut rows,
            ids,
            ..
        } = self;
        let mut order: Vec<usize> = (0..columns.len()).collect();
        order.sort_by(|&a, &b| columns[a].cmp(&columns[b]));
        let in_order = order.iter().enumerate().all(|(i, &c)| i == c);
        if !in_order || rows.iter().any(|r| r.len() < columns.len()) {
            for row in &mut rows {
                let mut sorted =
                    csv::StringRecord::with_capacity(row.as_slice().len(), order.len());
                for &c in &order {
                    sorted.push_field(row.get(c).unwrap_or(""));
                }
                *row = sorted;
            }
        }
        Table {
            path: source,
            columns: order.iter().map(|&c| columns[c].clone()).collect(),
            rows,
            ids: Some(ids),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        Table::from_reader(Path::new("site.csv"), text.as_bytes()).unwrap()
    }

    fn study() -> StudyAnnouncement {
        StudyAnnouncement {
            study_id: "s1".into(),
            description: String::new(),
            dataset: "d".into(),
            features: vec!["a".into(), "b".into()],
            target: "y".into(),
            model: ModelKind::Logistic,
            positive_class: Some("Yes".into()),
            classes: Vec::new(),
            preprocess: Default::default(),
            validation_fraction: 0.25,
            rounds: 1,
            secure_aggregation: true,
            privacy: None,
        }
    }

    /// Rows without a target value, or of a class not listed, are left out and counted.
    #[test]
    fn rows_without_a_usable_target_are_counted_out() {
        let t = table("a,b,y\n1,2,Yes\n3,4,NA\n5,6,\n7,8,Maybe\n9,10,No\n");
        let (kept, out) = t.with_value_in("y", None).unwrap();
        assert_eq!((kept.len(), out), (3, 2));
        let listed = ["Yes".to_string(), "No".to_string()];
        let (kept, out) = t.with_value_in("y", Some(&listed)).unwrap();
        assert_eq!((kept.len(), out), (2, 3));
        assert!(t.with_value_in("z", None).is_err());
    }

    /// Two eyes per patient, and one patient of 40 visits: whatever the study, no patient
    /// has rows in both training and validation, every row is used once, and without a
    /// key the split is by row as before.
    #[test]
    fn a_keyed_table_is_split_by_patient() {
        let mut csv = String::from("patient,eye,x,y\n");
        for p in 0..30 {
            for eye in ["l", "r"] {
                csv.push_str(&format!("p{p},{eye},{p},{}\n", p % 2));
            }
        }
        for v in 0..40 {
            csv.push_str(&format!("many,l,{v},1\n"));
        }
        csv.push_str(",l,1,0\n,r,2,1\n");
        let t = Table::from_reader(Path::new("eyes.csv"), csv.as_bytes()).unwrap();
        let key_of = |i: usize| {
            let k = t.cell(i, 0);
            if k.is_empty() {
                format!("row{i}")
            } else {
                k.to_string()
            }
        };
        for study in ["a", "b", "c", "pima", "eyes-2"] {
            let (train, val) = split_table(&t, 0.25, study, Some("patient"));
            let mut all: Vec<usize> = train.iter().chain(&val).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..t.len()).collect::<Vec<_>>());
            let train_patients: std::collections::BTreeSet<String> =
                train.iter().map(|&i| key_of(i)).collect();
            let val_patients: std::collections::BTreeSet<String> =
                val.iter().map(|&i| key_of(i)).collect();
            assert!(train_patients.is_disjoint(&val_patients), "{study}");
            // A quarter of the 33 patients (30 with two eyes, the one of 40 visits, two
            // rows without a key), not of the 102 rows.
            assert_eq!(val_patients.len(), 8, "{study}");
            assert_eq!(split_table(&t, 0.25, study, Some("patient")), (train, val));
        }
        assert_eq!(
            split_table(&t, 0.25, "a", None),
            split_rows(t.len(), 0.25, "a")
        );
        // A key column the table lacks splits by row, as a table without one.
        assert_eq!(
            split_table(&t, 0.25, "a", Some("mrn")),
            split_rows(t.len(), 0.25, "a")
        );
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let (t1, v1) = split_rows(68, 0.25, "pima");
        let (t2, v2) = split_rows(68, 0.25, "pima");
        assert_eq!((t1.clone(), v1.clone()), (t2, v2));
        assert_eq!(v1.len(), 17);
        let mut all: Vec<_> = t1.iter().chain(&v1).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..68).collect::<Vec<_>>());
        assert_ne!(split_rows(68, 0.25, "other").1, v1);
        assert_eq!(split_rows(2, 0.01, "x").1.len(), 1);
        assert_eq!(split_rows(2, 0.99, "x").0.len(), 1);
    }

    #[test]
    fn prepares_rows_and_labels() {
        let t = table("a,b,y\n1,2,Yes\n3,4,No\n5,6,Yes\n7,8,No\n");
        let d = StudyData::prepare(&t, &study()).unwrap();
        assert_eq!(d.x_train.nrows() + d.x_val.nrows(), 4);
        assert_eq!(d.y_train.sum() + d.y_val.sum(), 2.0);
        assert_eq!(d.feature_stats().count, d.x_train.nrows() as u64);
    }

    #[test]
    fn bad_data_names_file_line_and_column() {
        let t = table("a,b,y\n1,2,Yes\n3,NA,No\n");
        let err = StudyData::prepare(&t, &study()).unwrap_err().to_string();
        assert!(err.contains("site.csv, line 3, column 'b'"), "{err}");
        let t = table("a,c,y\n1,2,Yes\n3,4,No\n");
        let err = StudyData::prepare(&t, &study()).unwrap_err().to_string();
        assert!(err.contains("no column named 'b'"), "{err}");
        let t = table("a,b,y\n1,2,Yes\n3,4,\n");
        let err = StudyData::prepare(&t, &study()).unwrap_err().to_string();
        assert!(err.contains("missing class label"), "{err}");
        let t = table("a,b,y\n1,2,Yes\n");
        assert!(matches!(
            StudyData::prepare(&t, &study()),
            Err(DataError::TooFewRows { .. })
        ));
        assert!(matches!(
            Table::from_reader(Path::new("x.csv"), "a,b\n1,2,3\n".as_bytes()),
            Err(DataError::Csv { .. })
        ));
    }

    /// Found by the csv_reader fuzz target: with Windows line endings ("\r\n", as
    /// spreadsheets export) every error named the line before the bad one (the first data
    /// row was "line 1", the header's).
    #[test]
    fn bad_values_are_named_by_their_line_whatever_the_line_endings() {
        for (text, line) in [
            ("a,b,y\n1,2,Yes\n3,NA,No\n", 3),
            ("a,b,y\r\n1,2,Yes\r\n3,NA,No\r\n", 3),
            ("a,b,y\r\n1,NA,Yes\r\n3,4,No\r\n", 2),
            ("a,b,y\n1,\"x\ny\",Yes\n3,4,No\n", 2),
            ("a,b,y\r\n1,\"2\r\n\",Yes\r\n3,x,No\r\n", 4),
            ("a,b,y\r\n\r\n1,2,Yes\n\n3,x,No", 5),
        ] {
            let t = table(text);
            let err = StudyData::prepare(&t, &study()).unwrap_err();
            assert!(
                matches!(err, DataError::BadValue { line: l, .. } if l == line),
                "{text:?}: {err}"
            );
        }
    }

    /// Under differential privacy a bad value leaves its row out; only the schema fails.
    #[test]
    fn a_private_study_leaves_bad_rows_out_instead_of_failing() {
        let t = table("a,b,y\n1,2,Yes\n3,NA,No\n5,6,\n7,8,No\n");
        let (d, left_out) = StudyData::prepare_private(&t, &study(), None).unwrap();
        assert_eq!(left_out, 2);
        assert_eq!(d.x_train.nrows() + d.x_val.nrows(), 2);
        // No usable row at all is no refusal either.
        let t = table("a,b,y\nNA,2,Yes\n");
        let (d, left_out) = StudyData::prepare_private(&t, &study(), None).unwrap();
        assert_eq!((left_out, d.x_train.nrows() + d.x_val.nrows()), (1, 0));
        // A missing column is the schema: still an error.
        let t = table("a,c,y\n1,2,Yes\n3,4,No\n");
        assert!(matches!(
            StudyData::prepare_private(&t, &study(), None),
            Err(DataError::MissingColumn { .. })
        ));
        // With a patient key, a patient of many rows is one unit: all their rows train, as
        // one patient (DP-SGD clips their gradients' sum), on one side of the split.
        let t = table("patient,a,b,y\np1,1,2,Yes\np1,3,4,No\np1,5,6,No\np2,7,8,No\n");
        let (d, _) = StudyData::prepare_private(&t, &study(), Some("patient")).unwrap();
        assert_eq!(d.x_train.nrows() + d.x_val.nrows(), 4);
        assert_eq!(d.train_patients.len(), d.x_train.nrows());
        let p1_in_training = d.train_patients.iter().filter(|p| **p == 0).count();
        assert!(
            p1_in_training == 0 || p1_in_training == 3,
            "{:?}",
            d.train_patients
        );
    }
}
