//! The cleaning and de-identification tasks.

use std::collections::BTreeMap;

use super::pseudonym::Pseudonymizer;
use super::safe_harbor::{Date, RestrictedZip3, generalise_age, generalise_birth_date};
use super::{
    DatePolicy, DeidentifyConfig, FieldClass, FieldSpec, FieldType, MissingPolicy, PATIENT,
    RangePolicy, Record, Value,
};
use crate::runtime::{
    Envelope, KvState, MessageCollector, NEXT, StreamTask, TaskCoordinator, TaskError,
};

/// `value × scale + offset` converts `from` into `to`, where medfed knows the conversion.
pub fn convert_unit(analyte: Option<&str>, from: &str, to: &str) -> Option<(f64, f64)> {
    let norm = |u: &str| u.trim().to_ascii_lowercase().replace(['µ', 'μ'], "u");
    let (from, to) = (norm(from), norm(to));
    if from == to {
        return Some((1.0, 0.0));
    }
    let analyte = analyte.map(|a| a.trim().to_ascii_lowercase());
    // mg/dL per mmol/L is the molar mass / 10.
    let per_mmol = match analyte.as_deref() {
        Some("glucose") => Some(18.016),
        Some("cholesterol") => Some(38.67),
        Some("triglycerides") => Some(88.57),
        _ => None,
    };
    match (from.as_str(), to.as_str()) {
        ("mmol/l", "mg/dl") => per_mmol.map(|f| (f, 0.0)),
        ("mg/dl", "mmol/l") => per_mmol.map(|f| (1.0 / f, 0.0)),
        ("umol/l", "mg/dl") if analyte.as_deref() == Some("creatinine") => Some((1.0 / 88.42, 0.0)),
        ("mg/dl", "umol/l") if analyte.as_deref() == Some("creatinine") => Some((88.42, 0.0)),
        ("lb", "kg") => Some((0.453_592_37, 0.0)),
        ("kg", "lb") => Some((1.0 / 0.453_592_37, 0.0)),
        ("in", "cm") => Some((2.54, 0.0)),
        ("cm", "in") => Some((1.0 / 2.54, 0.0)),
        ("m", "cm") => Some((100.0, 0.0)),
        ("cm", "m") => Some((0.01, 0.0)),
        ("degf", "degc") | ("°f", "°c") => Some((5.0 / 9.0, -32.0 * 5.0 / 9.0)),
        ("degc", "degf") | ("°c", "°f") => Some((9.0 / 5.0, 32.0)),
        _ => None,
    }
}

fn is_missing(raw: &str) -> bool {
    raw.is_empty()
        || raw.eq_ignore_ascii_case("na")
        || raw.eq_ignore_ascii_case("nan")
        || raw.eq_ignore_ascii_case("null")
}

/// A running mean or median of a column's values, for imputation; kept in the task's
/// state so a restarted node imputes exactly as an uninterrupted one.
#[derive(Debug, Default, Clone)]
struct Running {
    count: u64,
    sum: f64,
    /// Value counts, by value rounded to 0.01 (medians only).
    counts: BTreeMap<i64, u64>,
}

impl Running {
    fn add(&mut self, x: f64, median: bool) {
        self.count += 1;
        self.sum += x;
        if median {
            *self.counts.entry((x * 100.0).round() as i64).or_default() += 1;
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The median of the values seen (the mean of the two middle ones for an even count).
    fn median(&self) -> Option<f64> {
        let n: u64 = self.counts.values().sum();
        if n == 0 {
            return None;
        }
        let nth = |rank: u64| {
            let mut seen = 0;
            for (v, c) in &self.counts {
                seen += c;
                if seen > rank {
                    return *v as f64 / 100.0;
                }
            }
            unreachable!("rank below the total")
        };
        Some(if n % 2 == 1 {
            nth(n / 2)
        } else {
            (nth(n / 2 - 1) + nth(n / 2)) / 2.0
        })
    }

    fn key(name: &str) -> Vec<u8> {
        format!("clean/{name}").into_bytes()
    }

    fn save(&self, name: &str, state: &mut KvState) {
        let entries: Vec<(i64, u64)> = self.counts.iter().map(|(k, v)| (*k, *v)).collect();
        let bytes = postcard::to_allocvec(&(self.count, self.sum, entries)).expect("serializes");
        state.put(&Running::key(name), bytes);
    }

    fn load(name: &str, state: &KvState) -> Result<Running, String> {
        let Some(bytes) = state.get(&Running::key(name)) else {
            return Ok(Running::default());
        };
        let (count, sum, entries): (u64, f64, Vec<(i64, u64)>) = postcard::from_bytes(bytes)
            .map_err(|e| {
                format!("the saved imputation state of column '{name}' is corrupt: {e}")
            })?;
        Ok(Running {
            count,
            sum,
            counts: entries.into_iter().collect(),
        })
    }
}

/// A declared column, resolved against the input's header.
struct Column {
    spec: FieldSpec,
    index: usize,
    convert: (f64, f64),
    running: Running,
}

/// Validates and cleans CSV rows against the declared fields (`[[ingest.field]]`): types,
/// units, ranges, categories and missing values, each by its declared policy. Only declared
/// columns go on (an undeclared column might hold an identifier nobody classified). A record
/// it cannot use goes to the dead-letter stream with the column and the reason.
pub struct ValidateClean {
    columns: Vec<Column>,
}

const TASK: &str = "validate-clean";

fn config_error(detail: String) -> TaskError {
    TaskError {
        task: TASK.into(),
        detail,
    }
}

impl ValidateClean {
    pub fn new(header: &[String], fields: &[FieldSpec]) -> Result<ValidateClean, TaskError> {
        let mut columns = Vec::new();
        for spec in fields {
            let index = header.iter().position(|h| h == &spec.name).ok_or_else(|| {
                config_error(format!(
                    "field '{}' is not a column of the input (columns: {})",
                    spec.name,
                    header.join(", ")
                ))
            })?;
            check_spec(spec)
                .map_err(|why| config_error(format!("field '{}': {why}", spec.name)))?;
            let convert = match (&spec.unit, &spec.to_unit) {
                (Some(from), Some(to)) => convert_unit(spec.analyte.as_deref(), from, to)
                    .ok_or_else(|| {
                        config_error(format!(
                            "field '{}': no known conversion from {from} to {to}{}",
                            spec.name,
                            spec.analyte.as_ref().map_or(
                                " (set `analyte` for mmol/L conversions)".into(),
                                |a| format!(" for {a}")
                            )
                        ))
                    })?,
                _ => (1.0, 0.0),
            };
            columns.push(Column {
                spec: spec.clone(),
                index,
                convert,
                running: Running::default(),
            });
        }
        Ok(ValidateClean { columns })
    }

    /// Cleans one row; `Err` is the reason it is quarantined.
    fn clean(&mut self, cells: &csv::StringRecord) -> Result<Record, String> {
        let mut record = Record::default();
        let mut observed = Vec::new();
        for (slot, col) in self.columns.iter().enumerate() {
            let spec = &col.spec;
            let name = &spec.name;
            let raw = cells.get(col.index).unwrap_or("").trim();
            if is_missing(raw) {
                if spec.required {
                    return Err(format!("column '{name}': missing (required)"));
                }
                let filled = match spec.missing {
                    MissingPolicy::Keep => Value::Missing,
                    MissingPolicy::Drop => {
                        return Err(format!("column '{name}': missing (policy: drop)"));
                    }
                    MissingPolicy::Mean => Value::Number(col.running.mean().ok_or_else(|| {
                        format!("column '{name}': missing, and no value seen yet to impute the mean from")
                    })?),
                    MissingPolicy::Median => Value::Number(col.running.median().ok_or_else(|| {
                        format!("column '{name}': missing, and no value seen yet to impute the median from")
                    })?),
                    MissingPolicy::Indicator => {
                        record.set(&format!("{name}_missing"), Value::Number(1.0));
                        Value::Number(0.0)
                    }
                };
                record.set(name, filled);
                continue;
            }
            let value = match spec.kind() {
                FieldType::Text => {
                    if let Some(cats) = &spec.categories
                        && !cats.iter().any(|c| c == raw)
                    {
                        return Err(format!(
                            "column '{name}': {raw:?} is not one of {}",
                            cats.join(", ")
                        ));
                    }
                    Value::Text(raw.to_string())
                }
                FieldType::Number => {
                    let x = raw
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| format!("column '{name}': not a number (value {raw:?})"))?;
                    let x = x * col.convert.0 + col.convert.1;
                    let (lo, hi) = (
                        spec.min.unwrap_or(f64::NEG_INFINITY),
                        spec.max.unwrap_or(f64::INFINITY),
                    );
                    let x = if x < lo || x > hi {
                        match spec.out_of_range {
                            RangePolicy::Quarantine => {
                                return Err(format!(
                                    "column '{name}': {x} is outside {}..={}",
                                    fmt_bound(spec.min),
                                    fmt_bound(spec.max)
                                ));
                            }
                            RangePolicy::Clip => x.clamp(lo, hi),
                        }
                    } else {
                        x
                    };
                    if matches!(spec.missing, MissingPolicy::Mean | MissingPolicy::Median) {
                        observed.push((slot, x));
                    }
                    Value::Number(x)
                }
            };
            if spec.missing == MissingPolicy::Indicator {
                record.set(&format!("{name}_missing"), Value::Number(0.0));
            }
            record.set(name, value);
        }
        // Only a record that is kept counts towards the running statistics.
        for (slot, x) in observed {
            let median = self.columns[slot].spec.missing == MissingPolicy::Median;
            self.columns[slot].running.add(x, median);
        }
        Ok(record)
    }
}

fn fmt_bound(b: Option<f64>) -> String {
    b.map_or(String::new(), |x| x.to_string())
}

fn check_spec(spec: &FieldSpec) -> Result<(), String> {
    if let (Some(lo), Some(hi)) = (spec.min, spec.max)
        && (lo.is_nan() || hi.is_nan() || lo > hi)
    {
        return Err(format!("min {lo} is above max {hi}"));
    }
    let number = spec.kind() == FieldType::Number;
    if !number && (spec.min.is_some() || spec.max.is_some() || spec.unit.is_some()) {
        return Err("min, max and unit apply to numbers only (set type = \"number\")".into());
    }
    if !number
        && matches!(
            spec.missing,
            MissingPolicy::Mean | MissingPolicy::Median | MissingPolicy::Indicator
        )
    {
        return Err("mean, median and indicator imputation apply to numbers only".into());
    }
    if number && spec.categories.is_some() {
        return Err("categories apply to text only".into());
    }
    if spec.unit.is_some() != spec.to_unit.is_some() {
        return Err("declare both unit and to_unit, or neither".into());
    }
    if matches!(spec.class, FieldClass::PatientId | FieldClass::Identifier)
        && spec.missing != MissingPolicy::Keep
        && spec.missing != MissingPolicy::Drop
    {
        return Err("an identifier cannot be imputed".into());
    }
    Ok(())
}

impl StreamTask for ValidateClean {
    fn init(&mut self, state: &mut KvState) -> Result<(), TaskError> {
        for col in &mut self.columns {
            col.running = Running::load(&col.spec.name, state).map_err(config_error)?;
        }
        Ok(())
    }

    fn process(
        &mut self,
        env: &Envelope,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(env.payload.as_slice());
        let mut cells = csv::StringRecord::new();
        match reader.read_record(&mut cells) {
            Ok(true) => {}
            Ok(false) => {
                out.dead_letter(env, "an empty line");
                return Ok(());
            }
            Err(e) => {
                out.dead_letter(env, format!("not a CSV row: {e}"));
                return Ok(());
            }
        }
        match self.clean(&cells) {
            Ok(record) => out.send(NEXT, record.encode()),
            Err(reason) => out.dead_letter(env, reason),
        }
        Ok(())
    }

    fn flush(&mut self, state: &mut KvState) {
        for col in &self.columns {
            if matches!(
                col.spec.missing,
                MissingPolicy::Mean | MissingPolicy::Median
            ) {
                col.running.save(&col.spec.name, state);
            }
        }
    }
}

/// Pseudonymizes the patient identifier and applies Safe Harbor to every declared field by
/// its class: identifiers removed, ages over 89 aggregated, birth dates to the year, other
/// dates to the year or shifted per patient, ZIP codes to three digits.
pub struct Deidentify {
    fields: Vec<FieldSpec>,
    patient_id: Option<String>,
    pseudonymizer: Option<Pseudonymizer>,
    restricted: RestrictedZip3,
    dates: DatePolicy,
    reference: Date,
}

impl Deidentify {
    pub fn new(
        fields: &[FieldSpec],
        config: &DeidentifyConfig,
        pseudonymizer: Option<Pseudonymizer>,
        today: Date,
    ) -> Result<Deidentify, TaskError> {
        let err = |detail: String| TaskError {
            task: "deidentify".into(),
            detail,
        };
        let ids: Vec<&FieldSpec> = fields
            .iter()
            .filter(|f| f.class == FieldClass::PatientId)
            .collect();
        if ids.len() > 1 {
            return Err(err(format!(
                "fields '{}' and '{}' are both patient-id; declare one",
                ids[0].name, ids[1].name
            )));
        }
        if !ids.is_empty() && pseudonymizer.is_none() {
            return Err(err(format!(
                "field '{}' is a patient-id, but no pseudonym key was given",
                ids[0].name
            )));
        }
        if config.dates == DatePolicy::Shift && ids.is_empty() {
            return Err(err(
                "dates = \"shift\" needs a field of class patient-id to derive each patient's shift from".into(),
            ));
        }
        if fields.iter().any(|f| f.name == PATIENT) {
            return Err(err(format!(
                "a field may not be named '{PATIENT}': the pseudonym goes there"
            )));
        }
        let restricted = match &config.restricted_zip3 {
            Some(path) => RestrictedZip3::load(path).map_err(err)?,
            None => RestrictedZip3::shipped(),
        };
        let reference = match &config.reference_date {
            Some(d) => Date::parse(d).map_err(|e| err(format!("reference_date: {e}")))?,
            None => today,
        };
        Ok(Deidentify {
            fields: fields.to_vec(),
            patient_id: ids.first().map(|f| f.name.clone()),
            pseudonymizer,
            restricted,
            dates: config.dates,
            reference,
        })
    }

    /// De-identifies one record; `Err` is the reason it is quarantined.
    pub fn apply(&self, mut record: Record) -> Result<Record, String> {
        let mut shift = None;
        if let (Some(id_field), Some(pseudonymizer)) = (&self.patient_id, &self.pseudonymizer) {
            let id = match record.remove(id_field) {
                Some(Value::Text(s)) if !s.trim().is_empty() => s,
                Some(Value::Number(x)) => x.to_string(),
                _ => return Err(format!("column '{id_field}': no patient identifier")),
            };
            record.set(PATIENT, Value::Text(pseudonymizer.pseudonym(&id)));
            if self.dates == DatePolicy::Shift {
                shift = Some(pseudonymizer.date_shift_days(&id));
            }
        }
        for f in &self.fields {
            let name = f.name.as_str();
            let value = match record.get(name) {
                None | Some(Value::Missing) => continue,
                Some(v) => v.clone(),
            };
            let text = || {
                value
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| match &value {
                        Value::Number(x) => x.to_string(),
                        _ => String::new(),
                    })
            };
            let generalised = match f.class {
                FieldClass::Value => continue,
                FieldClass::PatientId | FieldClass::Identifier => {
                    record.remove(name);
                    continue;
                }
                FieldClass::Age => match value.as_f64() {
                    Some(age) if age >= 0.0 => Value::Number(generalise_age(age)),
                    _ => return Err(format!("column '{name}': not an age in years")),
                },
                FieldClass::BirthDate => {
                    let birth =
                        Date::parse(&text()).map_err(|e| format!("column '{name}': {e}"))?;
                    if birth > self.reference {
                        return Err(format!(
                            "column '{name}': a birth date after {}",
                            self.reference
                        ));
                    }
                    Value::Number(f64::from(generalise_birth_date(birth, self.reference)))
                }
                FieldClass::Date => {
                    let date = Date::parse(&text()).map_err(|e| format!("column '{name}': {e}"))?;
                    match shift {
                        Some(days) => Value::Text(date.shifted(days).to_string()),
                        None => Value::Number(f64::from(date.year)),
                    }
                }
                FieldClass::Zip => Value::Text(
                    self.restricted
                        .generalise(&text())
                        .map_err(|e| format!("column '{name}': {e}"))?,
                ),
            };
            record.set(name, generalised);
        }
        Ok(record)
    }
}

impl StreamTask for Deidentify {
    fn process(
        &mut self,
        env: &Envelope,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        let result = Record::decode(&env.payload).and_then(|r| self.apply(r));
        match result {
            Ok(record) => out.send(NEXT, record.encode()),
            Err(reason) => out.dead_letter(env, reason),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use medfed_infra::store::{self, Backend, Store};

    use super::*;
    use crate::ingest::{IngestConfig, build_task, kept_records};
    use crate::runtime::{RunOptions, csv_source, run_partition};

    const PIMA_MISSING: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/data/pima_tr2_missing.csv"
    );

    /// Runs the pipeline declared by `fields` (TOML) over `csv`; returns the kept records
    /// and the dead letters' reasons.
    fn pipeline(csv: &str, fields: &str) -> (Vec<Record>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!("stream = \"extract\"\ncsv = \"{csv}\"\ncolumns = []\n{fields}");
        let cfg: IngestConfig = toml::from_str(&toml).unwrap();
        cfg.validate().unwrap();
        let store: Arc<dyn Store> =
            Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
        let (header, rx) = csv_source::read(std::path::Path::new(csv), "extract", 0, 0).unwrap();
        let key = Pseudonymizer::from_key(1, &[5; 32]);
        let task = build_task(&cfg, &header, Some(&key)).unwrap();
        run_partition(
            task,
            store.clone(),
            "extract",
            0,
            rx,
            &RunOptions::default(),
        )
        .unwrap();
        let dead = store
            .scan("dead-letter/extract/0")
            .unwrap()
            .into_iter()
            .map(|(_, v)| String::from_utf8(v).unwrap())
            .collect();
        (kept_records(&cfg, &*store).unwrap(), dead)
    }

    /// Pima's columns; `bmi_extra` adds keys to the `bmi` field.
    fn pima_fields(policy: &str, bmi_extra: &str) -> String {
        let mut s = String::new();
        for c in ["npreg", "glu", "ped", "age"] {
            s += &format!("[[field]]\nname = \"{c}\"\nrequired = true\n");
        }
        for c in ["bp", "skin", "bmi"] {
            let extra = if c == "bmi" { bmi_extra } else { "" };
            s += &format!("[[field]]\nname = \"{c}\"\nmissing = \"{policy}\"\n{extra}");
        }
        s + "[[field]]\nname = \"type\"\ncategories = [\"Yes\", \"No\"]\n"
    }

    fn count(reasons: &[String], what: &str) -> usize {
        reasons.iter().filter(|r| r.as_str() == what).count()
    }

    #[test]
    fn dropping_rows_with_missing_values_keeps_200_of_300_and_says_why() {
        let (kept, dead) = pipeline(PIMA_MISSING, &pima_fields("drop", ""));
        assert_eq!((kept.len(), dead.len()), (200, 100));
        // The first missing column of each row, in declaration order.
        assert_eq!(count(&dead, "column 'bp': missing (policy: drop)"), 13);
        assert_eq!(count(&dead, "column 'skin': missing (policy: drop)"), 86);
        assert_eq!(count(&dead, "column 'bmi': missing (policy: drop)"), 1);
    }

    #[test]
    fn imputation_keeps_every_row_with_the_running_statistic() {
        for policy in ["mean", "median"] {
            let (kept, dead) = pipeline(PIMA_MISSING, &pima_fields(policy, ""));
            assert_eq!((kept.len(), dead.len()), (300, 0), "{policy}");
            assert!(kept.iter().all(|r| r.number("skin").is_some()));
            // Rows 0..200 are complete; row 200 is the first without skin: it gets the
            // statistic of the 200 values before it (29.215 and 29, computed offline).
            let want = if policy == "mean" { 29.215 } else { 29.0 };
            assert!(
                (kept[200].number("skin").unwrap() - want).abs() < 1e-9,
                "{policy}"
            );
        }
    }

    #[test]
    fn indicator_and_keep_policies() {
        let (kept, _) = pipeline(PIMA_MISSING, &pima_fields("indicator", ""));
        assert_eq!(kept.len(), 300);
        let flagged: f64 = kept.iter().map(|r| r.number("skin_missing").unwrap()).sum();
        assert_eq!(flagged, 98.0);
        assert_eq!(kept[200].number("skin"), Some(0.0));
        let (kept, dead) = pipeline(PIMA_MISSING, &pima_fields("keep", ""));
        assert_eq!((kept.len(), dead.len()), (300, 0));
        let missing = kept
            .iter()
            .filter(|r| r.get("skin") == Some(&Value::Missing))
            .count();
        assert_eq!(missing, 98);
    }

    #[test]
    fn out_of_range_values_are_quarantined_or_clipped() {
        let range = "min = 0\nmax = 45\n";
        let fields = |how: &str| pima_fields("keep", &format!("{range}out_of_range = \"{how}\"\n"));
        let (kept, dead) = pipeline(PIMA_MISSING, &fields("quarantine"));
        assert_eq!((kept.len(), dead.len()), (292, 8));
        assert!(
            dead.contains(&"column 'bmi': 52.9 is outside 0..=45".to_string()),
            "{dead:?}"
        );
        let (kept, dead) = pipeline(PIMA_MISSING, &fields("clip"));
        assert_eq!((kept.len(), dead.len()), (300, 0));
        let top = kept
            .iter()
            .filter_map(|r| r.number("bmi"))
            .fold(0.0, f64::max);
        assert_eq!(top, 45.0);
    }

    #[test]
    fn units_are_converted_and_bad_values_named() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("labs.csv");
        std::fs::write(
            &csv,
            "mrn,glucose,sex\nA1,5.5,F\nA2,abc,M\nA3,11.1,X\n,6.0,F\n",
        )
        .unwrap();
        let fields = r#"
[[field]]
name = "mrn"
class = "patient-id"
[[field]]
name = "glucose"
unit = "mmol/L"
to_unit = "mg/dL"
analyte = "glucose"
[[field]]
name = "sex"
categories = ["F", "M"]
"#;
        let (kept, dead) = pipeline(csv.to_str().unwrap(), fields);
        assert_eq!(kept.len(), 1);
        assert!((kept[0].number("glucose").unwrap() - 99.088).abs() < 1e-9);
        assert!(kept[0].get("mrn").is_none());
        assert!(
            kept[0]
                .get(PATIENT)
                .and_then(Value::as_str)
                .unwrap()
                .starts_with("p1-")
        );
        assert_eq!(
            dead,
            vec![
                "column 'glucose': not a number (value \"abc\")",
                "column 'sex': \"X\" is not one of F, M",
                "column 'mrn': no patient identifier",
            ]
        );
        assert_eq!(
            convert_unit(Some("glucose"), "mg/dL", "mmol/L").unwrap().0,
            1.0 / 18.016
        );
        assert!(
            convert_unit(None, "mmol/L", "mg/dL").is_none(),
            "depends on the analyte"
        );
        let (f, o) = convert_unit(None, "degF", "degC").unwrap();
        assert!((98.6 * f + o - 37.0).abs() < 1e-9);
    }

    #[test]
    fn identifiers_are_removed_and_quasi_identifiers_generalised() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("ids.csv");
        std::fs::write(
            &csv,
            "mrn,name,ssn,email,birth_date,visit,zip,age,glu\n\
             MRN-1,Ada Lovelace,123-45-6789,ada@example.org,1932-02-29,2024-02-28,03601,95,140\n\
             MRN-1,Ada Lovelace,123-45-6789,ada@example.org,1932-02-29,2024-03-01,03601,95,150\n\
             MRN-2,Alan Turing,987-65-4321,alan@example.org,1980-06-23,2024-01-10,02139-4307,44,99\n",
        )
        .unwrap();
        let fields = r#"
[deidentify]
dates = "shift"
reference_date = "2026-01-01"
[[field]]
name = "mrn"
class = "patient-id"
[[field]]
name = "name"
class = "identifier"
[[field]]
name = "ssn"
class = "identifier"
[[field]]
name = "email"
class = "identifier"
[[field]]
name = "birth_date"
class = "birth-date"
[[field]]
name = "visit"
class = "date"
[[field]]
name = "zip"
class = "zip"
[[field]]
name = "age"
class = "age"
[[field]]
name = "glu"
"#;
        let (kept, dead) = pipeline(csv.to_str().unwrap(), fields);
        assert!(dead.is_empty(), "{dead:?}");
        let text = |r: &Record, f: &str| r.get(f).and_then(Value::as_str).unwrap().to_string();
        for r in &kept {
            for gone in ["mrn", "name", "ssn", "email"] {
                assert!(r.get(gone).is_none(), "{gone}");
            }
        }
        assert_eq!(text(&kept[0], PATIENT), text(&kept[1], PATIENT));
        assert_ne!(text(&kept[0], PATIENT), text(&kept[2], PATIENT));
        assert_eq!(kept[0].number("age"), Some(90.0));
        assert_eq!(kept[2].number("age"), Some(44.0));
        // Born 1932: over 89 on the reference date, so the "90 or older" year.
        assert_eq!(kept[0].number("birth_date"), Some(1936.0));
        assert_eq!(kept[2].number("birth_date"), Some(1980.0));
        assert_eq!(text(&kept[0], "zip"), "000", "036 is a restricted area");
        assert_eq!(text(&kept[2], "zip"), "021");
        // Same patient, same shift: the two days between visits (across 29 February) stay.
        let day = |r: &Record| Date::parse(&text(r, "visit")).unwrap().to_days();
        assert_eq!(day(&kept[1]) - day(&kept[0]), 2);
        assert_ne!(text(&kept[0], "visit"), "2024-02-28");
        let all: String = kept
            .iter()
            .map(|r| String::from_utf8(r.encode()).unwrap())
            .collect();
        for canary in [
            "Ada",
            "Lovelace",
            "123-45-6789",
            "ada@example.org",
            "MRN-1",
            "1932-02-29",
            "03601",
            "2139",
        ] {
            assert!(!all.contains(canary), "{canary} in {all}");
        }
    }
}
