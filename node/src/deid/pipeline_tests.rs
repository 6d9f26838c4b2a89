//! The cleaning and de-identification pipeline (`[[ingest]]` with declared fields) run end
//! to end over CSV extracts: what is kept, what is quarantined, and that a dead letter
//! names the field, the reason and the patient's pseudonym but never a value.

use std::sync::Arc;

use medfed_infra::store::{self, Backend, Store};

use super::pseudonym::Pseudonymizer;
use super::safe_harbor::Date;
use super::{PATIENT, Record, Value, convert_unit};
use crate::ingest::{IngestConfig, build_task, kept_records};
use crate::runtime::{Rejection, RunOptions, csv_source, run_partition};

const PIMA_MISSING: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/data/pima_tr2_missing.csv"
);

/// The key the test pipelines pseudonymize with.
fn key() -> Pseudonymizer {
    Pseudonymizer::from_key(1, &[5; 32])
}

/// Runs the pipeline declared by `fields` (TOML) over `csv`; returns the kept records
/// and the dead letters.
fn pipeline(csv: &str, fields: &str) -> (Vec<Record>, Vec<Rejection>) {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("stream = \"extract\"\ncsv = \"{csv}\"\ncolumns = []\n{fields}");
    let cfg: IngestConfig = toml::from_str(&toml).unwrap();
    cfg.validate().unwrap();
    let store: Arc<dyn Store> =
        Arc::from(store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap());
    let (header, rx) = csv_source::read(std::path::Path::new(csv), "extract", 0, 0).unwrap();
    let task = build_task(&cfg, &header, Some(&key())).unwrap();
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
        .map(|(_, v)| {
            assert!(Rejection::is_current(&v), "{}", String::from_utf8_lossy(&v));
            Rejection::decode(&v)
        })
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

fn count(dead: &[Rejection], what: &str) -> usize {
    dead.iter().filter(|r| r.to_string() == what).count()
}

#[test]
fn dropping_rows_with_missing_values_keeps_200_of_300_and_says_why() {
    let (kept, dead) = pipeline(PIMA_MISSING, &pima_fields("drop", ""));
    assert_eq!((kept.len(), dead.len()), (200, 100));
    // The first missing column of each row, in declaration order.
    assert_eq!(count(&dead, "field 'bp': missing (policy: drop)"), 13);
    assert_eq!(count(&dead, "field 'skin': missing (policy: drop)"), 86);
    assert_eq!(count(&dead, "field 'bmi': missing (policy: drop)"), 1);
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
    // The field and the bound, never the value (Pima's largest bmi, 52.9, among them).
    assert_eq!(
        count(&dead, "field 'bmi': above the declared maximum 45"),
        8,
        "{dead:?}"
    );
    let text = format!("{dead:?}");
    assert!(!text.contains("52.9") && !text.contains("46."), "{text}");
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
    // The field, the reason and the patient's pseudonym (the one deidentify gives),
    // never the value: "abc" and "X" are not kept.
    assert_eq!(
        dead,
        vec![
            Rejection::in_field("glucose", "not a number")
                .with_patient(Some(key().pseudonym("A2"))),
            Rejection::in_field("sex", "not one of the categories F, M")
                .with_patient(Some(key().pseudonym("A3"))),
            Rejection::in_field("mrn", "no patient identifier"),
        ]
    );
    let text = format!("{dead:?}");
    assert!(!text.contains("abc") && !text.contains("\"X\""), "{text}");
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

#[test]
fn an_unquoted_comma_in_an_address_quarantines_the_row_instead_of_shifting_it() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("addresses.csv");
    // Row 2's street has an unquoted comma: read as it stands, "Milton Keynes" would land
    // in `glu` and 99 in nothing.
    std::fs::write(
        &csv,
        "mrn,street,city,glu\n\
         MRN-1,\"12 High St, Flat 3\",Leeds,140\n\
         MRN-2,7 Bletchley Park, Unit 4,Milton Keynes,99\n\
         MRN-3,1 Main St,York,101\n",
    )
    .unwrap();
    let fields = r#"
[[field]]
name = "mrn"
class = "patient-id"
[[field]]
name = "street"
class = "identifier"
[[field]]
name = "city"
class = "identifier"
[[field]]
name = "glu"
"#;
    let (kept, dead) = pipeline(csv.to_str().unwrap(), fields);
    assert_eq!(
        kept.iter().map(|r| r.number("glu")).collect::<Vec<_>>(),
        [Some(140.0), Some(101.0)],
        "the quoted comma stays in its field"
    );
    assert_eq!(
        dead,
        [Rejection::new(
            "the row has 5 fields; the header has 4 (a comma outside double quotes?)"
        )]
    );
    let text = format!("{dead:?}");
    for value in ["Bletchley", "Unit 4", "Milton", "MRN-2", "99"] {
        assert!(!text.contains(value), "{value} in {text}");
    }
}

#[test]
fn de_identification_errors_name_the_field_and_the_patient_not_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("dates.csv");
    std::fs::write(
        &csv,
        "mrn,birth_date,zip,glu\n\
         MRN-7,1961-02-30,02139,99\n\
         MRN-8,1961-04-01,ZIP-0213,99\n\
         MRN-9,1961-04-01,02139,abc\n",
    )
    .unwrap();
    let fields = r#"
[deidentify]
reference_date = "2026-01-01"
[[field]]
name = "mrn"
class = "patient-id"
[[field]]
name = "birth_date"
class = "birth-date"
[[field]]
name = "zip"
class = "zip"
[[field]]
name = "glu"
"#;
    let (kept, dead) = pipeline(csv.to_str().unwrap(), fields);
    assert!(kept.is_empty());
    assert_eq!(
        dead,
        [
            Rejection::in_field("birth_date", "not a day of the calendar")
                .with_patient(Some(key().pseudonym("MRN-7"))),
            Rejection::in_field("zip", "not a 5- or 9-digit US ZIP code")
                .with_patient(Some(key().pseudonym("MRN-8"))),
            Rejection::in_field("glu", "not a number").with_patient(Some(key().pseudonym("MRN-9"))),
        ]
    );
    let text = format!("{dead:?}");
    for value in ["1961", "ZIP-0213", "abc", "MRN-"] {
        assert!(!text.contains(value), "{value} in {text}");
    }
}

/// `missing = "mean"` (or `"median"`) fills a missing value with the running mean of the
/// patients seen before, so one patient's value is copied into every later record with
/// that value missing (found by the red team): removing one patient moves the glucose sum
/// by 8.5 times the most one record can (`max|x|` = 200), far beyond the sensitivity the
/// noise is calibrated to. So a column imputed from other patients is never read by a
/// differentially private study or query (exact ones, by opt-in, may).
#[test]
fn a_column_imputed_from_other_patients_is_not_released_with_noise_that_cannot_cover_it() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, rows: &[&str]| {
        let path = dir.path().join(name);
        let mut text = String::from("glu\n");
        for r in rows {
            text += r;
            text += "\n";
        }
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let missing: Vec<&str> = std::iter::repeat_n("NA", 30).collect();
    let with: Vec<&str> = ["100", "200"].into_iter().chain(missing.clone()).collect();
    let without: Vec<&str> = ["100"].into_iter().chain(missing).collect();
    let fields = "[[field]]\nname = \"glu\"\nmissing = \"mean\"\n";
    let glu = |records: &[Record]| -> Vec<Vec<f64>> {
        records
            .iter()
            .filter_map(|r| match r.get("glu") {
                Some(Value::Number(x)) => Some(vec![*x]),
                _ => None,
            })
            .collect()
    };
    let (a, _) = pipeline(&write("with.csv", &with), fields);
    let (b, _) = pipeline(&write("without.csv", &without), fields);
    let q = medfed_protocol::fedstats::StatsQuery {
        query_id: "q".into(),
        dataset: "d".into(),
        cohort: vec![],
        columns: vec![medfed_protocol::fedstats::StatColumn {
            name: "glu".into(),
            low: 0.0,
            high: 200.0,
            edges: vec![0.0, 200.0],
        }],
        correlations: false,
        noise_multiplier: Some(1.5),
        suppress_below: 11,
        survival: None,
        cox: None,
        trees: None,
    };
    let (va, vb) = (q.encode(&glu(&a)), q.encode(&glu(&b)));
    let dist = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    println!(
        "one patient moves the vector by {dist:.2} units; the noise is for {:.2}",
        q.sensitivity()
    );
    assert!(
        dist > 5.0 * q.sensitivity(),
        "one patient moves the vector by {dist}; the sensitivity is {}",
        q.sensitivity()
    );
    // Hence: refused for differential privacy, by the pipeline's declaration (not by data).
    let specs: Vec<crate::deid::FieldSpec> = toml::from_str::<FieldList>(fields).unwrap().field;
    let table = crate::data::Table::from_records(
        std::path::Path::new("ingest"),
        &a.iter()
            .enumerate()
            .map(|(i, r)| (i as u32, r.clone()))
            .collect::<Vec<_>>(),
    );
    let classes =
        crate::columns::ColumnClasses::for_pipeline(&table.columns, &specs, &Default::default());
    let err = classes.check_private("d", ["glu"]).unwrap_err();
    assert!(
        err.contains("missing = \"mean\"") && err.contains("indicator"),
        "{err}"
    );
    // An indicator (a constant fill) is fine.
    let indicator: Vec<crate::deid::FieldSpec> =
        toml::from_str::<FieldList>("[[field]]\nname = \"glu\"\nmissing = \"indicator\"\n")
            .unwrap()
            .field;
    let classes = crate::columns::ColumnClasses::for_pipeline(
        &table.columns,
        &indicator,
        &Default::default(),
    );
    assert!(classes.check_private("d", ["glu"]).is_ok());
}

#[derive(serde::Deserialize)]
struct FieldList {
    field: Vec<crate::deid::FieldSpec>,
}

#[test]
fn a_dataset_read_a_segment_at_a_time_is_the_table_of_all_its_records() {
    use crate::data::Table;
    use crate::ingest::{
        RECORDS_STREAM, kept_columns, kept_count, kept_records_with_ids, kept_table,
    };
    use crate::runtime::record::{chunk_value, encode_segment, segment_chunks};
    let dir = tempfile::tempdir().unwrap();
    let store = store::open(Backend::DEFAULT, &dir.path().join("state")).unwrap();
    let cfg: IngestConfig = toml::from_str(
        "stream = \"adm\"\ncsv = \"adm.csv\"\ncolumns = []\npartition_by = \"mrn\"\npartitions = 2\n",
    )
    .unwrap();
    let record = |i: usize, extra: bool| {
        let mut r = Record::default();
        r.set("glu", Value::Number(90.0 + i as f64 / 8.0));
        r.set(PATIENT, Value::Text(format!("p-{i:032x}").into()));
        if i.is_multiple_of(7) {
            r.set("bmi", Value::Missing);
        }
        // A field the later records have and the earlier ones lack (a pipeline whose
        // configuration grew): a new column, empty in the earlier rows.
        if extra {
            r.set("aaa", Value::Text("new".into()));
        }
        r
    };
    // Partition 0: a small segment, then one large enough to be stored in chunks; partition
    // 1: a segment whose records have one more field.
    let segments: [(u32, Vec<Record>); 3] = [
        (0, (0..10).map(|i| record(i, false)).collect()),
        (0, (10..4000).map(|i| record(i, false)).collect()),
        (1, (0..25).map(|i| record(i, true)).collect()),
    ];
    let mut batch = store::Batch::default();
    for (k, (p, records)) in segments.iter().enumerate() {
        let ns = format!("output/{RECORDS_STREAM}/adm/{p}");
        let bytes = encode_segment(records);
        let chunks = segment_chunks(&bytes);
        for (c, chunk) in chunks.iter().enumerate() {
            let mut key = (k as u64).to_be_bytes().to_vec();
            if c > 0 {
                key.extend_from_slice(&(c as u32).to_be_bytes());
            }
            batch.put(&ns, &key, &chunk_value(c, chunk)).unwrap();
        }
        if k == 1 {
            assert!(chunks.len() > 1, "the large segment is chunked");
        }
    }
    store.commit(batch).unwrap();

    let all = kept_records_with_ids(&cfg, &*store).unwrap();
    assert_eq!(all.len(), 4025);
    assert_eq!(kept_count(&cfg, &*store).unwrap(), 4025);
    assert_eq!(all[3999].0, 3999);
    assert_eq!(all[4000].0, 1 << 24, "partition 1's first record");
    let source = std::path::Path::new("adm");
    let streamed = kept_table(&cfg, &*store, source).unwrap();
    // The table of all the records at once, as the dataset was built before it was read a
    // segment at a time: every field any record has, in name order; numbers as text.
    let columns: Vec<String> = all
        .iter()
        .flat_map(|(_, r)| r.names())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(str::to_string)
        .collect();
    let cell = |r: &Record, c: &str| match r.get(c) {
        Some(Value::Number(x)) => x.to_string(),
        Some(Value::Text(t)) => t.to_string(),
        Some(Value::Missing) | None => String::new(),
    };
    assert_eq!(columns, ["aaa", "bmi", "glu", PATIENT]);
    assert_eq!(streamed.columns, columns);
    // What the node tells the aggregator it can serve, read without building the table.
    assert_eq!(kept_columns(&cfg, &*store).unwrap(), columns);
    assert_eq!(streamed.len(), all.len());
    for (row, (id, r)) in all.iter().enumerate() {
        assert_eq!(streamed.row_id(row), *id);
        for (c, name) in columns.iter().enumerate() {
            assert_eq!(
                streamed.cell(row, c),
                cell(r, name),
                "row {row}, column {name}"
            );
        }
    }
    assert_eq!(Table::from_records(source, &all).columns, columns);
    assert_eq!(
        streamed.cell(0, 0),
        "",
        "an earlier row lacks the later column"
    );
    assert_eq!(streamed.cell(4000, 0), "new");
    assert_eq!(streamed.cell(1, 2), "90.125");

    // A lost chunk is an error that names the partition, not a shorter table.
    let ns = format!("output/{RECORDS_STREAM}/adm/0");
    let mut lose = store::Batch::default();
    let mut key = 1u64.to_be_bytes().to_vec();
    key.extend_from_slice(&1u32.to_be_bytes());
    lose.delete(&ns, &key).unwrap();
    store.commit(lose).unwrap();
    let e = kept_table(&cfg, &*store, source).unwrap_err().to_string();
    assert!(e.contains("partition 0's kept records"), "{e}");
    let e = kept_columns(&cfg, &*store).unwrap_err().to_string();
    assert!(e.contains("partition 0's kept records"), "{e}");
    // A segment whose record count cannot be read cannot be counted either.
    let mut broken = store::Batch::default();
    let mut value = b"MFS1".to_vec();
    value.extend_from_slice(&[0xff; 11]);
    broken
        .put(
            &format!("output/{RECORDS_STREAM}/adm/1"),
            &9u64.to_be_bytes(),
            &value,
        )
        .unwrap();
    store.commit(broken).unwrap();
    let e = kept_count(&cfg, &*store).unwrap_err().to_string();
    assert!(e.contains("partition 1's kept records"), "{e}");
}
