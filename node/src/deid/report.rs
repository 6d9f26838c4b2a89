//! The re-identification risk report (`medfed node privacy-report`): k-anonymity of the
//! records the node holds over its declared quasi-identifiers.

use std::collections::BTreeMap;

use super::{Record, Value};

/// How identifiable the node's records are by their quasi-identifiers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrivacyReport {
    /// The fields counted as quasi-identifiers.
    pub quasi_identifiers: Vec<String>,
    /// The records examined.
    pub records: u64,
    /// Distinct combinations of quasi-identifier values (equivalence classes).
    pub classes: u64,
    /// The smallest class: the records are `k`-anonymous for this k (0 without records).
    pub k: u64,
    /// The class size below which classes are reported (`--threshold`).
    pub threshold: u64,
    /// Classes with fewer than `threshold` records, and the records in them.
    pub classes_below: u64,
    /// Records in those classes.
    pub records_below: u64,
}

fn key_part(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(x)) => x.to_string(),
        Some(Value::Text(s)) => format!("{s:?}"),
        Some(Value::Missing) | None => "missing".into(),
    }
}

/// Groups `records` by their values of `quasi` (a missing value is a value of its own).
pub fn k_anonymity(
    records: impl IntoIterator<Item = Record>,
    quasi: &[String],
    threshold: u64,
) -> PrivacyReport {
    let mut counter = ClassCounter::new(quasi);
    for r in records {
        counter.add(&r);
    }
    counter.report(threshold)
}

/// [`k_anonymity`] one record at a time, for records read from the store a segment at a
/// time: only the equivalence classes are held.
#[derive(Debug)]
pub struct ClassCounter {
    quasi: Vec<String>,
    classes: BTreeMap<Vec<String>, u64>,
    records: u64,
}

impl ClassCounter {
    /// Counts the classes of the quasi-identifiers `quasi`.
    pub fn new(quasi: &[String]) -> ClassCounter {
        ClassCounter {
            quasi: quasi.to_vec(),
            classes: BTreeMap::new(),
            records: 0,
        }
    }

    /// Counts `record` in its class.
    pub fn add(&mut self, record: &Record) {
        self.records += 1;
        let key = self.quasi.iter().map(|q| key_part(record.get(q))).collect();
        *self.classes.entry(key).or_default() += 1;
    }

    /// The report, classes under `threshold` records counted as below it.
    pub fn report(self, threshold: u64) -> PrivacyReport {
        let below: Vec<u64> = self
            .classes
            .values()
            .copied()
            .filter(|c| *c < threshold)
            .collect();
        PrivacyReport {
            classes: self.classes.len() as u64,
            k: self.classes.values().copied().min().unwrap_or(0),
            quasi_identifiers: self.quasi,
            records: self.records,
            threshold,
            classes_below: below.len() as u64,
            records_below: below.iter().sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_class_and_the_records_below_the_threshold() {
        let mk = |zip: &str, year: f64| {
            let mut r = Record::default();
            r.set("zip", Value::Text(zip.into()));
            r.set("birth_year", Value::Number(year));
            r
        };
        let mut records = Vec::new();
        records.extend((0..6).map(|_| mk("021", 1970.0)));
        records.extend((0..3).map(|_| mk("021", 1971.0)));
        records.push(mk("000", 1971.0));
        let q = vec!["zip".to_string(), "birth_year".to_string()];
        let r = k_anonymity(records.clone(), &q, 5);
        assert_eq!((r.records, r.classes, r.k), (10, 3, 1));
        assert_eq!((r.classes_below, r.records_below), (2, 4));
        // Over ZIP3 alone the classes are 9 and 1.
        let r = k_anonymity(records, &q[..1], 2);
        assert_eq!(
            (r.classes, r.k, r.classes_below, r.records_below),
            (2, 1, 1, 1)
        );
        assert_eq!(k_anonymity(vec![], &q, 5).k, 0);
    }
}
