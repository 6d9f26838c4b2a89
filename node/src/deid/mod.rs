//! Making records safe to learn from, inside the hospital: cleaning ([`ValidateClean`]),
//! pseudonymization and Safe Harbor generalisation ([`Deidentify`]), feature engineering
//! ([`Features`]), real-time alerts ([`Alerts`]), and the re-identification risk report.
//!
//! Each is a [`StreamTask`](crate::runtime::StreamTask) declared per `[[ingest]]` pipeline in
//! `node.toml` (`[[ingest.field]]`, `[[ingest.derive]]`, `[[ingest.window]]`,
//! `[[ingest.alert]]`). Records travel between them as [`Record`]s; none of these ever
//! leaves the node: a [`Record`] has no place in any protocol message, and the only
//! outbound values are aggregates (see `docs/privacy.md`, "Egress").

mod clean;
mod deidentify;
mod features;
#[cfg(test)]
mod pipeline_tests;
pub mod pseudonym;
pub mod report;
pub mod safe_harbor;
mod score;

use serde::{Deserialize, Serialize};

pub use crate::runtime::record::{Record, Value};

pub use clean::{ValidateClean, convert_unit};
pub use deidentify::Deidentify;
pub use features::{
    ALERTS_STREAM, AlertRule, Alerts, DeriveSpec, FEATURES_STREAM, Features, Formula, OneHotSpec,
    Standardization, WindowSpec,
};
pub use score::{Score, ScoreSpec};

/// The field a [`Deidentify`] task puts a patient's pseudonym in.
pub const PATIENT: &str = "patient";

/// What a column is, for de-identification (HIPAA §164.514(b)(2); `docs/privacy.md` maps
/// the 18 identifier kinds onto these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FieldClass {
    /// A clinical value: kept, after cleaning.
    #[default]
    Value,
    /// The patient's identifier (medical record number): replaced by its keyed pseudonym in
    /// the field `patient`, then removed.
    PatientId,
    /// Any other direct identifier (name, address, phone, fax, e-mail, SSN, plan, account
    /// or licence number, vehicle or device identifier, URL, IP address, biometric, photo,
    /// any other unique code): removed.
    Identifier,
    /// An age in years: ages over 89 become 90.
    Age,
    /// A birth date: only the year is kept; years implying an age over 89 are aggregated.
    BirthDate,
    /// Any other date about the patient: the year, or shifted by the patient's keyed offset
    /// (`deidentify.dates`).
    Date,
    /// A US ZIP code: its first three digits; restricted areas become 000.
    Zip,
}

/// How a value's type is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FieldType {
    /// A number: text that does not parse as a finite number is quarantined.
    Number,
    /// Text, checked against `categories` if declared.
    Text,
}

/// What to do with a missing value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingPolicy {
    /// Keep the record with the value missing.
    #[default]
    Keep,
    /// Drop the record (it goes to the dead-letter stream with the field and reason).
    Drop,
    /// Fill in the mean of the values seen so far.
    Mean,
    /// Fill in the median of the values seen so far (to 0.01).
    Median,
    /// Fill in 0 and add a field `{name}_missing` that is 1 where the value was missing.
    Indicator,
}

/// What to do with a value outside `min..=max`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangePolicy {
    /// Quarantine the record (dead-letter stream, with the field and the bound it passed;
    /// never the value).
    #[default]
    Quarantine,
    /// Replace the value with the nearest bound.
    Clip,
}

/// `[[ingest.field]]`: one input column.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// The column's name in the input.
    pub name: String,
    /// What the column is for de-identification (default: a clinical value).
    #[serde(default)]
    pub class: FieldClass,
    /// Default: `number` for values and ages without `categories`, `text` for everything
    /// else.
    #[serde(default, rename = "type")]
    pub kind: Option<FieldType>,
    /// A record without this column's value is quarantined, whatever `missing` says.
    #[serde(default)]
    pub required: bool,
    /// What to do with a record whose value is missing (default: keep it).
    #[serde(default)]
    pub missing: MissingPolicy,
    /// The smallest plausible value, after unit conversion (numbers only).
    #[serde(default)]
    pub min: Option<f64>,
    /// The largest plausible value, after unit conversion (numbers only).
    #[serde(default)]
    pub max: Option<f64>,
    /// What to do with a value outside `min..=max` (default: quarantine the record).
    #[serde(default)]
    pub out_of_range: RangePolicy,
    /// The unit the extract uses, converted to `to_unit` (e.g. glucose "mmol/L" → "mg/dL").
    #[serde(default)]
    pub unit: Option<String>,
    /// The unit values are converted to (set with `unit`).
    #[serde(default)]
    pub to_unit: Option<String>,
    /// The analyte, where a conversion depends on it (mmol/L → mg/dL: "glucose",
    /// "cholesterol", "triglycerides").
    #[serde(default)]
    pub analyte: Option<String>,
    /// The allowed values of a text column; anything else is quarantined.
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    /// A quasi-identifier, counted by `medfed node privacy-report` (e.g. ZIP3, birth year,
    /// sex).
    #[serde(default)]
    pub quasi_identifier: bool,
}

impl FieldSpec {
    /// The type checked: `type` if set, else number for values and ages without `categories`,
    /// text for everything else.
    pub fn kind(&self) -> FieldType {
        self.kind.unwrap_or(match self.class {
            FieldClass::Value | FieldClass::Age if self.categories.is_none() => FieldType::Number,
            _ => FieldType::Text,
        })
    }
}

/// How dates other than birth dates are generalised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatePolicy {
    /// Keep the year only (Safe Harbor).
    #[default]
    Year,
    /// Shift every date of a patient by the same keyed offset of up to a year, keeping
    /// intervals (not Safe Harbor: a limited data set; see `docs/privacy.md`).
    Shift,
}

/// `[ingest.deidentify]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeidentifyConfig {
    /// How dates other than birth dates are generalised (default: to the year).
    #[serde(default)]
    pub dates: DatePolicy,
    /// The date ages are computed on for birth dates (default: today).
    #[serde(default)]
    pub reference_date: Option<String>,
    /// A newer list of restricted three-digit ZIP areas (default: the one shipped, from the
    /// 2000 Census).
    #[serde(default)]
    pub restricted_zip3: Option<std::path::PathBuf>,
}
