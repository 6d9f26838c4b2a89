//! The cleaning task: types, units, ranges, categories and missing values.

use std::collections::BTreeMap;

use super::deidentify::identifier_text;
use super::pseudonym::Pseudonymizer;
use super::{FieldClass, FieldSpec, FieldType, MissingPolicy, RangePolicy, Record, Value};
use crate::runtime::csv_row::{Row, Splitter};
use crate::runtime::record::FieldName;
use crate::runtime::{
    Envelope, KvState, MessageCollector, NEXT, Rejection, StreamTask, TaskCoordinator, TaskError,
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

/// `s.trim()`, at once where `s` begins and ends with a visible ASCII character (none of
/// them is whitespace): most cells.
#[inline]
fn trimmed(s: &str) -> &str {
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(a), Some(b)) if a.is_ascii_graphic() && b.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

/// `raw.parse::<f64>()`, with plain decimals of at most 15 digits ("-12.345", most
/// clinical values) read directly: the digits as an integer divided by a power of ten,
/// both exact in an f64, so the quotient is the correctly rounded value, which is what the
/// standard parser returns. Anything else goes to the standard parser.
fn parse_number(raw: &str) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    let bytes = raw.as_bytes();
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    let (mut mantissa, mut count, mut places, mut point) = (0u64, 0usize, 0usize, false);
    for &c in digits {
        match c {
            b'0'..=b'9' if count < 15 => {
                mantissa = mantissa * 10 + u64::from(c - b'0');
                count += 1;
                places += usize::from(point);
            }
            b'.' if !point => point = true,
            _ => return raw.parse().ok(),
        }
    }
    if count == 0 {
        return raw.parse().ok();
    }
    let x = mantissa as f64 / POW10[places];
    Some(if negative { -x } else { x })
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
    /// The field's name, shared by every record.
    name: FieldName,
    /// `{name}_missing`, for indicator imputation.
    indicator: FieldName,
    index: usize,
    convert: (f64, f64),
    running: Running,
    /// Where `name` and `indicator` are in [`ValidateClean::template`]'s records.
    slot: usize,
    indicator_slot: usize,
}

/// Validates and cleans CSV rows against the declared fields (`[[ingest.field]]`): types,
/// units, ranges, categories and missing values, each by its declared policy. Only declared
/// columns go on (an undeclared column might hold an identifier nobody classified). A record
/// it cannot use goes to the dead-letter stream with the field and the reason (never the
/// value) and, given the site's key, the patient's pseudonym.
pub struct ValidateClean {
    columns: Vec<Column>,
    /// The header's number of columns: a row with more is refused.
    width: usize,
    splitter: Splitter,
    /// The patient-id column (its index in `columns`) and the key that pseudonymizes it,
    /// to name the patient of a quarantined row.
    patient: Option<(usize, Pseudonymizer)>,
    /// The values of a row that feed the running means and medians (reused).
    observed: Vec<(usize, f64)>,
    /// A kept record's fields, each missing (`None` if two declared names coincide, such
    /// as `bp_missing` declared beside `bp`'s indicator: fields are then set by name).
    template: Option<Record>,
}

const TASK: &str = "validate-clean";

/// Fields a kept record has room for beyond its cleaned ones when it is made.
const ROOM: usize = 8;

fn config_error(detail: String) -> TaskError {
    TaskError {
        task: TASK.into(),
        detail,
    }
}

impl ValidateClean {
    /// The task for an input whose header is `header`, checking each declared field: every field
    /// must be a column, its settings consistent, its unit conversion known.
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
                name: FieldName::new(&spec.name),
                indicator: FieldName::new(&format!("{}_missing", spec.name)),
                index,
                convert,
                running: Running::default(),
                slot: 0,
                indicator_slot: 0,
            });
        }
        // Every kept record has the same fields: a template places them once.
        // Identifier columns are checked but never put into a record: de-identification
        // would remove them at once, and what is never copied cannot leak or cost.
        let names: Vec<FieldName> = columns
            .iter()
            .flat_map(|c| {
                let indicator = (c.spec.missing == MissingPolicy::Indicator).then_some(c.indicator);
                let value = (c.spec.class != FieldClass::Identifier).then_some(c.name);
                value.into_iter().chain(indicator)
            })
            .collect();
        let template = Record::template(&names);
        if let Some(t) = &template {
            for c in &mut columns {
                c.slot = t.position(&c.name).unwrap_or(usize::MAX);
                c.indicator_slot = t.position(&c.indicator).unwrap_or(usize::MAX);
            }
        }
        Ok(ValidateClean {
            template,
            columns,
            width: header.len(),
            splitter: Splitter::new(),
            patient: None,
            observed: Vec::new(),
        })
    }

    /// Names the patient of each quarantined row by the pseudonym `pseudonymizer` gives
    /// the row's patient-id field (the one the deidentify task would give it).
    pub fn with_pseudonyms(mut self, pseudonymizer: Option<Pseudonymizer>) -> ValidateClean {
        let slot = self
            .columns
            .iter()
            .position(|c| c.spec.class == FieldClass::PatientId);
        self.patient = slot.zip(pseudonymizer);
        self
    }

    /// Why the pipeline would quarantine one input row, each declared column judged on its
    /// own (a row with two bad columns counts under both); a row the reader cannot split is
    /// one problem with no field. For `medfed node check`'s sample of an extract: like every
    /// rejection, the reasons never quote a value.
    pub fn problems(&mut self, line: &[u8]) -> Vec<Rejection> {
        let cells = match self.splitter.row(line, self.width) {
            Ok(cells) => cells,
            Err(why) => return vec![why],
        };
        self.columns
            .iter_mut()
            .filter_map(|col| {
                ValidateClean::clean(std::slice::from_mut(col), None, &cells, &mut Vec::new()).err()
            })
            .collect()
    }

    /// The pseudonym of a row's patient, if the pipeline has a patient-id field and the
    /// row's identifier reads as that field would be cleaned.
    fn patient_of(
        columns: &[Column],
        patient: Option<&(usize, Pseudonymizer)>,
        cells: &Row<'_>,
    ) -> Option<String> {
        let (slot, pseudonymizer) = patient?;
        let col = columns.get(*slot)?;
        let raw = trimmed(cells.get(col.index)?);
        if is_missing(raw) {
            return None;
        }
        let value = match col.spec.kind() {
            FieldType::Text => Value::Text(raw.into()),
            FieldType::Number => Value::Number(
                parse_number(raw).filter(|x| x.is_finite())? * col.convert.0 + col.convert.1,
            ),
        };
        identifier_text(&value).map(|id| pseudonymizer.pseudonym(&id))
    }

    /// Cleans one row; `Err` is why it is quarantined.
    fn clean(
        columns: &mut [Column],
        template: Option<&Record>,
        cells: &Row<'_>,
        observed: &mut Vec<(usize, f64)>,
    ) -> Result<Record, Rejection> {
        let mut record = match template {
            // Room for what the tasks after this one add (the pseudonym, derived features).
            Some(t) => t.blank_with_room(ROOM),
            None => Record::with_capacity(columns.len() + 4),
        };
        let put = |record: &mut Record, name: &FieldName, slot: usize, value: Value| match template
        {
            Some(_) => record.set_at(slot, value),
            None => record.set_named(name, value),
        };
        observed.clear();
        for (slot, col) in columns.iter().enumerate() {
            let spec = &col.spec;
            let name = &spec.name;
            let raw = trimmed(cells.get(col.index).unwrap_or(""));
            if is_missing(raw) {
                if spec.required {
                    return Err(Rejection::in_field(name, "missing (required)"));
                }
                let filled = match spec.missing {
                    MissingPolicy::Keep => Value::Missing,
                    MissingPolicy::Drop => {
                        return Err(Rejection::in_field(name, "missing (policy: drop)"));
                    }
                    MissingPolicy::Mean => Value::Number(col.running.mean().ok_or_else(|| {
                        Rejection::in_field(
                            name,
                            "missing, and no value seen yet to impute the mean from",
                        )
                    })?),
                    MissingPolicy::Median => {
                        Value::Number(col.running.median().ok_or_else(|| {
                            Rejection::in_field(
                                name,
                                "missing, and no value seen yet to impute the median from",
                            )
                        })?)
                    }
                    MissingPolicy::Indicator => {
                        put(
                            &mut record,
                            &col.indicator,
                            col.indicator_slot,
                            Value::Number(1.0),
                        );
                        Value::Number(0.0)
                    }
                };
                if spec.class != FieldClass::Identifier {
                    put(&mut record, &col.name, col.slot, filled);
                }
                continue;
            }
            let value = match spec.kind() {
                FieldType::Text => {
                    if let Some(cats) = &spec.categories
                        && !cats.iter().any(|c| c == raw)
                    {
                        return Err(Rejection::in_field(
                            name,
                            format!("not one of the categories {}", cats.join(", ")),
                        ));
                    }
                    if spec.class == FieldClass::Identifier {
                        // Checked, never copied (an address may take an allocation).
                        continue;
                    }
                    Value::Text(raw.into())
                }
                FieldType::Number => {
                    let x = parse_number(raw)
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| Rejection::in_field(name, "not a number"))?;
                    let x = x * col.convert.0 + col.convert.1;
                    let (lo, hi) = (
                        spec.min.unwrap_or(f64::NEG_INFINITY),
                        spec.max.unwrap_or(f64::INFINITY),
                    );
                    let x = if x < lo || x > hi {
                        match spec.out_of_range {
                            RangePolicy::Quarantine if x < lo => {
                                return Err(Rejection::in_field(
                                    name,
                                    format!("below the declared minimum {lo}"),
                                ));
                            }
                            RangePolicy::Quarantine => {
                                return Err(Rejection::in_field(
                                    name,
                                    format!("above the declared maximum {hi}"),
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
            if spec.class == FieldClass::Identifier {
                continue;
            }
            if spec.missing == MissingPolicy::Indicator {
                put(
                    &mut record,
                    &col.indicator,
                    col.indicator_slot,
                    Value::Number(0.0),
                );
            }
            put(&mut record, &col.name, col.slot, value);
        }
        // Only a record that is kept counts towards the running statistics.
        for &(slot, x) in observed.iter() {
            let median = columns[slot].spec.missing == MissingPolicy::Median;
            columns[slot].running.add(x, median);
        }
        Ok(record)
    }
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
        // A row the reader cannot split into the header's columns names no patient: its
        // identifier cell cannot be trusted.
        let cells = match self.splitter.row(&env.payload, self.width) {
            Ok(cells) => cells,
            Err(why) => {
                out.dead_letter(env, why);
                return Ok(());
            }
        };
        match ValidateClean::clean(
            &mut self.columns,
            self.template.as_ref(),
            &cells,
            &mut self.observed,
        ) {
            Ok(record) => out.send_record(NEXT, record),
            Err(why) => {
                let patient =
                    ValidateClean::patient_of(&self.columns, self.patient.as_ref(), &cells);
                out.dead_letter(env, why.with_patient(patient));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_directly_are_the_standard_parsers_to_the_bit() {
        let mut cases: Vec<String> = [
            "",
            "-",
            ".",
            "-.",
            "1.",
            ".5",
            "-.5",
            "+1",
            "1e3",
            "1.5E-2",
            " 1",
            "1 ",
            "0",
            "-0",
            "-0.0",
            "007",
            "1.2.3",
            "1,5",
            "inf",
            "-inf",
            "NaN",
            "0.1",
            "0.3",
            "2.675",
            "123456789012345",
            "1234567890123456",
            "12345678901234567890",
            "9007199254740993",
            "0.000000000000001",
            "0.0000000000000001",
            "99999999999999.9",
            "-1.7976931348623157",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let digits = (state >> 60) as usize + 1; // 1 to 16
            let mantissa = (state >> 4) % 10u64.pow(digits.min(19) as u32);
            let text = format!("{mantissa:0digits$}");
            let point = (state >> 32) as usize % (digits + 1);
            let sign = if state & 1 == 1 { "-" } else { "" };
            cases.push(format!("{sign}{}.{}", &text[..point], &text[point..]));
            cases.push(format!("{sign}{text}"));
        }
        for case in &cases {
            let want = case.parse::<f64>().ok();
            let got = parse_number(case);
            assert_eq!(
                got.map(f64::to_bits),
                want.map(f64::to_bits),
                "{case:?}: {got:?} against {want:?}"
            );
            assert_eq!(trimmed(case), case.trim(), "{case:?}");
        }
        for case in ["\u{a0}1\u{a0}", "\t2", "3\n", "é", " "] {
            assert_eq!(trimmed(case), case.trim(), "{case:?}");
        }
    }

    /// Cleans each row of `rows` (CSV, after `header`) with the declared `fields` (TOML
    /// `[[field]]` tables): the records passed on, and the reasons of those quarantined.
    fn clean(header: &str, fields: &str, rows: &[&str]) -> (Vec<Record>, Vec<String>) {
        #[derive(serde::Deserialize)]
        struct Fields {
            field: Vec<FieldSpec>,
        }
        let fields: Fields = toml::from_str(fields).unwrap();
        let header = crate::runtime::csv_row::header(header.as_bytes());
        let mut task = ValidateClean::new(&header, &fields.field).unwrap();
        let (mut state, mut out) = (KvState::default(), MessageCollector::default());
        for (i, row) in rows.iter().enumerate() {
            let env = Envelope {
                stream: "s".into(),
                partition: 0,
                offset: i as u64,
                key: None,
                payload: row.as_bytes().to_vec(),
            };
            task.process(&env, &mut state, &mut out, &mut TaskCoordinator::default())
                .unwrap();
        }
        let dead = out.dead.iter().map(|d| d.rejection.to_string()).collect();
        (out.next, dead)
    }

    #[test]
    fn identifier_columns_are_checked_but_never_put_into_a_record() {
        let fields = r#"
[[field]]
name = "mrn"
class = "patient-id"
[[field]]
name = "name"
class = "identifier"
required = true
[[field]]
name = "ssn"
class = "identifier"
type = "number"
[[field]]
name = "kind"
class = "identifier"
categories = ["inpatient", "outpatient"]
[[field]]
name = "glu"
"#;
        let (kept, dead) = clean(
            "mrn,name,ssn,kind,glu",
            fields,
            &[
                "M1,Ada Lovelace,123456789,inpatient,140",
                "M2,,123456789,inpatient,99",
                "M3,Alan Turing,12-34-56,inpatient,120",
                "M4,Grace Hopper,987654321,visitor,110",
                "M5,Mary Somerville,,,130",
            ],
        );
        // Identifiers are checked as declared: required, a number, one of the categories;
        // the reasons never quote the value.
        assert_eq!(
            dead,
            [
                "field 'name': missing (required)",
                "field 'ssn': not a number",
                "field 'kind': not one of the categories inpatient, outpatient",
            ]
        );
        // A kept record holds the patient id (de-identification pseudonymizes it) and the
        // values, never an identifier column.
        let names: Vec<Vec<&str>> = kept.iter().map(|r| r.names().collect()).collect();
        assert_eq!(names, [["glu", "mrn"], ["glu", "mrn"]]);
        assert_eq!(kept[1].number("glu"), Some(130.0));
    }
}
