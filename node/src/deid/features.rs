//! Streaming feature engineering and real-time alerts, inside the hospital.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::safe_harbor::Date;
use super::{PATIENT, Record, Value};
use crate::runtime::record::FieldSlot;
use crate::runtime::{
    Envelope, KvState, MessageCollector, NEXT, Rejection, StreamTask, TaskCoordinator, TaskError,
};

/// `[[ingest.derive]]`: a value computed from others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeriveSpec {
    /// The new field.
    pub name: String,
    /// How it is computed from `inputs`.
    pub formula: Formula,
    /// The formula's inputs, in its order (bmi: weight in kg, height in cm; ratio:
    /// numerator, denominator).
    pub inputs: Vec<String>,
}

/// A derived value's formula (`"bmi"` or `"ratio"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Formula {
    /// Body-mass index: weight (kg) / height (m)².
    Bmi,
    /// numerator / denominator.
    Ratio,
}

/// `[[ingest.one_hot]]`: one 0/1 field `{column}_{category}` per declared category.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OneHotSpec {
    /// The text column to expand.
    pub column: String,
    /// Its categories: one 0/1 output field each (missing where the column is); the text
    /// column itself is removed.
    pub categories: Vec<String>,
}

/// `[ingest.standardize.COLUMN]`: (x − mean) / sd, from statistics the federation combined
/// (`medfed aggregator` reports them per study; never raw values from other sites).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Standardization {
    /// The federation's mean of the column.
    pub mean: f64,
    /// The federation's standard deviation of the column (positive).
    pub sd: f64,
}

/// `[[ingest.window]]`: per-patient aggregates of `column` over the last `days` days of
/// each patient's events (by the event time `time`, a date or a number of days).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// Prefix of the output fields: `{name}_count`, `{name}_mean`, `{name}_last`.
    pub name: String,
    /// The numeric column aggregated.
    pub column: String,
    /// The column holding each event's time.
    pub time: String,
    /// The window's length, in days.
    pub days: u32,
}

/// `[[ingest.alert]]`: fires when `column` is strictly above `above` or strictly below
/// `below`. Alerts go to the node's `alerts` stream and stay inside the hospital.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// The numeric column watched.
    pub column: String,
    /// Fires when the value is strictly above this.
    #[serde(default)]
    pub above: Option<f64>,
    /// Fires when the value is strictly below this.
    #[serde(default)]
    pub below: Option<f64>,
}

/// The output stream of per-patient window aggregates.
pub const FEATURES_STREAM: &str = "features";
/// The output stream of alerts.
pub const ALERTS_STREAM: &str = "alerts";

fn event_time(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(x) if x.is_finite() => Some(x.floor() as i64),
        Value::Text(s) => Date::parse(s).ok().map(Date::to_days),
        _ => None,
    }
}

/// A patient's events in one window, oldest first.
type Events = Vec<(i64, f64)>;

/// Derived values, one-hot categories, standardization, and windowed per-patient
/// aggregates. Per-record features are added to the record, which goes on; window
/// aggregates of the patients whose windows changed go to the `features` stream at every
/// window interval and at the end of a bounded input.
pub struct Features {
    derive: Vec<DeriveSpec>,
    one_hot: Vec<OneHotSpec>,
    standardize: BTreeMap<String, Standardization>,
    windows: Vec<WindowSpec>,
    /// (window, patient) → events in the window.
    open: BTreeMap<(usize, String), Events>,
    changed: BTreeSet<(usize, String)>,
    /// The names per-record features are set under, made once: each derivation's, each
    /// one-hot category's, each standardized column's.
    derived_names: Vec<FieldSlot>,
    one_hot_names: Vec<Vec<FieldSlot>>,
    standardized_names: Vec<FieldSlot>,
    /// Each derivation's two inputs; each one-hot column.
    derived_inputs: Vec<[FieldSlot; 2]>,
    one_hot_columns: Vec<FieldSlot>,
}

impl Features {
    /// The task for these declarations; refuses a derivation without exactly two inputs, a
    /// standardization whose `sd` is not above 0, and a window of 0 days.
    pub fn new(
        derive: Vec<DeriveSpec>,
        one_hot: Vec<OneHotSpec>,
        standardize: BTreeMap<String, Standardization>,
        windows: Vec<WindowSpec>,
    ) -> Result<Features, TaskError> {
        let err = |detail: String| TaskError {
            task: "features".into(),
            detail,
        };
        for d in &derive {
            let want = 2;
            if d.inputs.len() != want {
                return Err(err(format!(
                    "derive '{}': formula = \"{}\" takes {want} inputs, not {}",
                    d.name,
                    match d.formula {
                        Formula::Bmi => "bmi",
                        Formula::Ratio => "ratio",
                    },
                    d.inputs.len()
                )));
            }
        }
        for (col, s) in &standardize {
            if !(s.sd.is_finite() && s.sd > 0.0 && s.mean.is_finite()) {
                return Err(err(format!("standardize '{col}': sd must be above 0")));
            }
        }
        for w in &windows {
            if w.days == 0 {
                return Err(err(format!("window '{}': days must be at least 1", w.name)));
            }
        }
        let derived_names = derive.iter().map(|d| FieldSlot::new(&d.name)).collect();
        let derived_inputs = derive
            .iter()
            .map(|d| [FieldSlot::new(&d.inputs[0]), FieldSlot::new(&d.inputs[1])])
            .collect();
        let one_hot_columns = one_hot.iter().map(|h| FieldSlot::new(&h.column)).collect();
        let one_hot_names = one_hot
            .iter()
            .map(|h| {
                h.categories
                    .iter()
                    .map(|c| FieldSlot::new(&format!("{}_{c}", h.column)))
                    .collect()
            })
            .collect();
        let standardized_names = standardize.keys().map(|c| FieldSlot::new(c)).collect();
        Ok(Features {
            derive,
            one_hot,
            standardize,
            windows,
            open: BTreeMap::new(),
            changed: BTreeSet::new(),
            derived_names,
            one_hot_names,
            standardized_names,
            derived_inputs,
            one_hot_columns,
        })
    }

    fn state_key(window: &str, patient: &str) -> Vec<u8> {
        format!("window/{window}/{patient}").into_bytes()
    }

    /// Adds one event; events that fell out of the window (older than the patient's latest
    /// event minus `days`) are forgotten, since the window only moves forward.
    fn add_event(&mut self, w: usize, patient: &str, time: i64, value: f64) {
        let days = i64::from(self.windows[w].days);
        let events = self.open.entry((w, patient.to_string())).or_default();
        let latest = events.last().map_or(time, |e| e.0.max(time));
        if time <= latest - days {
            return; // late, and already outside the window
        }
        // Stable among equal times: a later arrival counts as later.
        let at = events.partition_point(|e| e.0 <= time);
        events.insert(at, (time, value));
        let start = events.partition_point(|e| e.0 <= latest - days);
        events.drain(..start);
        self.changed.insert((w, patient.to_string()));
    }

    /// count, mean and last value of the events in a window.
    pub fn aggregate(events: &[(i64, f64)]) -> (u64, f64, f64) {
        let n = events.len() as u64;
        let mean = events.iter().map(|e| e.1).sum::<f64>() / n.max(1) as f64;
        (n, mean, events.last().map_or(f64::NAN, |e| e.1))
    }

    fn emit_changed(&mut self, out: &mut MessageCollector) {
        for (w, patient) in std::mem::take(&mut self.changed) {
            let Some(events) = self.open.get(&(w, patient.clone())) else {
                continue;
            };
            let name = &self.windows[w].name;
            let (n, mean, last) = Features::aggregate(events);
            let mut r = Record::default();
            r.set(PATIENT, Value::Text(patient.as_str().into()));
            r.set(
                &format!("{name}_end"),
                Value::Number(events.last().map_or(0, |e| e.0) as f64),
            );
            r.set(&format!("{name}_count"), Value::Number(n as f64));
            r.set(&format!("{name}_mean"), Value::Number(mean));
            r.set(&format!("{name}_last"), Value::Number(last));
            out.send(FEATURES_STREAM, r.encode());
        }
    }

    fn per_record(&self, r: &mut Record) -> Result<(), Rejection> {
        for ((d, name), [a, b]) in self
            .derive
            .iter()
            .zip(&self.derived_names)
            .zip(&self.derived_inputs)
        {
            let (a, b) = (r.number_slot(a), r.number_slot(b));
            let v = match (a, b) {
                (Some(a), Some(b)) => {
                    let v = match d.formula {
                        Formula::Bmi => a / (b / 100.0).powi(2),
                        Formula::Ratio => a / b,
                    };
                    if !v.is_finite() {
                        return Err(Rejection::in_field(
                            &d.name,
                            format!(
                                "the {} of '{}' and '{}' is not a finite number",
                                match d.formula {
                                    Formula::Bmi => "BMI",
                                    Formula::Ratio => "ratio",
                                },
                                d.inputs[0],
                                d.inputs[1]
                            ),
                        ));
                    }
                    Value::Number(v)
                }
                _ => Value::Missing,
            };
            r.set_slot(name, v);
        }
        for ((h, names), column) in self
            .one_hot
            .iter()
            .zip(&self.one_hot_names)
            .zip(&self.one_hot_columns)
        {
            let v = r.remove_slot(column);
            let v = v.as_ref().and_then(Value::as_str);
            for (c, name) in h.categories.iter().zip(names) {
                let hot = match v {
                    Some(v) => Value::Number(f64::from(u8::from(v == c))),
                    None => Value::Missing,
                };
                r.set_slot(name, hot);
            }
        }
        for (s, name) in self.standardize.values().zip(&self.standardized_names) {
            if let Some(x) = r.number_slot(name) {
                r.set_slot(name, Value::Number((x - s.mean) / s.sd));
            }
        }
        Ok(())
    }
}

impl StreamTask for Features {
    fn init(&mut self, state: &mut KvState) -> Result<(), TaskError> {
        self.open.clear();
        for (w, spec) in self.windows.iter().enumerate() {
            let prefix = format!("window/{}/", spec.name);
            for (k, v) in state.scan_prefix(prefix.as_bytes()) {
                let patient = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let events: Events = postcard::from_bytes(v).map_err(|e| TaskError {
                    task: "features".into(),
                    detail: format!(
                        "the saved window '{}' of a patient is corrupt: {e}",
                        spec.name
                    ),
                })?;
                self.open.insert((w, patient), events);
            }
        }
        Ok(())
    }

    fn process(
        &mut self,
        env: &Envelope,
        state: &mut KvState,
        out: &mut MessageCollector,
        coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        crate::runtime::process_as_record(self, env, state, out, coord)
    }

    fn process_record(
        &mut self,
        env: &Envelope,
        mut record: Record,
        state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        for w in 0..self.windows.len() {
            let spec = &self.windows[w];
            let (Some(value), Some(time), Some(patient)) = (
                record.number(&spec.column),
                event_time(record.get(&spec.time)),
                record
                    .get(PATIENT)
                    .and_then(Value::as_str)
                    .map(str::to_string),
            ) else {
                continue;
            };
            self.add_event(w, &patient, time, value);
            // Written to the state at once: windows are keyed per patient, so only the
            // touched ones are written at the checkpoint.
            let events = &self.open[&(w, patient.clone())];
            state.put(
                &Features::state_key(&self.windows[w].name, &patient),
                postcard::to_allocvec(events).expect("serializes"),
            );
        }
        match self.per_record(&mut record) {
            Ok(()) => out.send_record(NEXT, record),
            Err(why) => {
                let patient = record
                    .get(PATIENT)
                    .and_then(Value::as_str)
                    .map(str::to_string);
                out.dead_letter(env, why.with_patient(patient));
            }
        }
        Ok(())
    }

    fn window(
        &mut self,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        self.emit_changed(out);
        Ok(())
    }

    fn on_end_of_stream(
        &mut self,
        _state: &mut KvState,
        out: &mut MessageCollector,
    ) -> Result<(), TaskError> {
        self.emit_changed(out);
        Ok(())
    }
}

/// Applies the alert rules to each record: a record that breaks one is sent to the
/// `alerts` stream (with its patient pseudonym, the rule and the value); every record goes
/// on unchanged.
pub struct Alerts {
    rules: Vec<AlertRule>,
    /// Each rule's column.
    columns: Vec<FieldSlot>,
}

impl Alerts {
    /// The task for `rules`; each rule needs `above`, `below` or both.
    pub fn new(rules: Vec<AlertRule>) -> Result<Alerts, TaskError> {
        for r in &rules {
            if r.above.is_none() && r.below.is_none() {
                return Err(TaskError {
                    task: "alerts".into(),
                    detail: format!("alert on '{}': set above, below or both", r.column),
                });
            }
        }
        let columns = rules.iter().map(|r| FieldSlot::new(&r.column)).collect();
        Ok(Alerts { rules, columns })
    }

    /// The rules `record` breaks, described.
    pub fn fired(&self, record: &Record) -> Vec<String> {
        let mut fired = Vec::new();
        for (r, column) in self.rules.iter().zip(&self.columns) {
            let Some(x) = record.number_slot(column) else {
                continue;
            };
            if let Some(hi) = r.above
                && x > hi
            {
                fired.push(format!("{} = {x} is above {hi}", r.column));
            }
            if let Some(lo) = r.below
                && x < lo
            {
                fired.push(format!("{} = {x} is below {lo}", r.column));
            }
        }
        fired
    }
}

/// Sends an alert about `record` to the alerts stream: the patient's pseudonym (if the
/// record has one) and `why`.
pub(super) fn send_alert(record: &Record, why: &str, out: &mut MessageCollector) {
    let mut alert = Record::default();
    if let Some(p) = record.get(PATIENT) {
        alert.set(PATIENT, p.clone());
    }
    alert.set("alert", Value::Text(why.into()));
    out.send(ALERTS_STREAM, alert.encode());
}

impl StreamTask for Alerts {
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
        record: Record,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        for why in self.fired(&record) {
            send_alert(&record, &why, out);
        }
        out.send_record(NEXT, record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(fields: &[(&str, Value)]) -> Record {
        let mut r = Record::default();
        for (k, v) in fields {
            r.set(k, v.clone());
        }
        r
    }

    #[test]
    fn alerts_fire_exactly_past_the_boundary() {
        let alerts = Alerts::new(vec![AlertRule {
            column: "glu".into(),
            above: Some(200.0),
            below: Some(54.0),
        }])
        .unwrap();
        let fires = |x: f64| !alerts.fired(&rec(&[("glu", Value::Number(x))])).is_empty();
        assert!(!fires(200.0), "200 mg/dL is not above 200");
        assert!(fires(200.000_001));
        assert!(
            fires(f64::from_bits(200f64.to_bits() + 1)),
            "the next double above 200"
        );
        assert!(!fires(54.0));
        assert!(fires(53.999));
        assert!(!fires(120.0));
        assert!(alerts.fired(&rec(&[("glu", Value::Missing)])).is_empty());
        assert_eq!(
            alerts.fired(&rec(&[("glu", Value::Number(250.0))])),
            vec!["glu = 250 is above 200".to_string()]
        );
        assert!(
            Alerts::new(vec![AlertRule {
                column: "x".into(),
                above: None,
                below: None
            }])
            .is_err()
        );
    }

    #[test]
    fn derived_and_one_hot_values() {
        let f = Features::new(
            vec![DeriveSpec {
                name: "bmi".into(),
                formula: Formula::Bmi,
                inputs: vec!["weight".into(), "height".into()],
            }],
            vec![OneHotSpec {
                column: "sex".into(),
                categories: vec!["F".into(), "M".into()],
            }],
            BTreeMap::from([(
                "glu".into(),
                Standardization {
                    mean: 100.0,
                    sd: 20.0,
                },
            )]),
            vec![],
        )
        .unwrap();
        let mut r = rec(&[
            ("weight", Value::Number(80.0)),
            ("height", Value::Number(180.0)),
            ("sex", Value::Text("M".into())),
            ("glu", Value::Number(130.0)),
        ]);
        f.per_record(&mut r).unwrap();
        assert!((r.number("bmi").unwrap() - 24.691_358).abs() < 1e-5);
        assert_eq!(
            (r.number("sex_F"), r.number("sex_M")),
            (Some(0.0), Some(1.0))
        );
        assert!(r.get("sex").is_none());
        assert_eq!(r.number("glu"), Some(1.5));
        let mut zero = rec(&[
            ("weight", Value::Number(80.0)),
            ("height", Value::Number(0.0)),
        ]);
        let why = f.per_record(&mut zero).unwrap_err();
        assert_eq!(
            (why.field.as_deref(), why.reason.as_str()),
            (
                Some("bmi"),
                "the BMI of 'weight' and 'height' is not a finite number"
            )
        );
    }

    /// The offline value: the patient's events within `days` of their latest event.
    fn offline(events: &[(i64, f64)], days: i64) -> (u64, f64, f64) {
        let latest = events.iter().map(|e| e.0).max().unwrap();
        let mut inside: Vec<(i64, f64)> = events
            .iter()
            .copied()
            .filter(|e| e.0 > latest - days)
            .collect();
        inside.sort_by_key(|e| e.0);
        Features::aggregate(&inside)
    }

    #[test]
    fn windows_over_out_of_order_events_equal_the_offline_values() {
        use rand::{RngExt, SeedableRng, seq::SliceRandom};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let days = 30;
        let mut f = Features::new(
            vec![],
            vec![],
            BTreeMap::new(),
            vec![WindowSpec {
                name: "glu30".into(),
                column: "glu".into(),
                time: "day".into(),
                days,
            }],
        )
        .unwrap();
        // 50 patients, 40 events each at distinct days over a year, arriving shuffled.
        let mut all: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
        let mut stream = Vec::new();
        for p in 0..50 {
            let mut ds: Vec<i64> = (0..365).collect();
            ds.shuffle(&mut rng);
            for &d in &ds[..40] {
                let v = rng.random_range(60.0..300.0);
                all.entry(format!("p{p}")).or_default().push((d, v));
                stream.push((format!("p{p}"), d, v));
            }
        }
        stream.shuffle(&mut rng);
        for (p, d, v) in &stream {
            f.add_event(0, p, *d, *v);
        }
        for (p, events) in &all {
            let got = Features::aggregate(&f.open[&(0, p.clone())]);
            let want = offline(events, i64::from(days));
            assert_eq!(got.0, want.0, "{p}");
            assert!(
                (got.1 - want.1).abs() < 1e-9 && got.2 == want.2,
                "{p}: {got:?} vs {want:?}"
            );
        }
    }
}
