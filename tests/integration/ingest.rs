//! `medfed node ingest` and `medfed node status` on declared pipelines: a directory of CSV
//! extracts (one partition per file, with a bad row), the Pima FHIR export, and one
//! extract partitioned by its patient column.

use std::path::Path;
use std::process::Command;

use crate::common::{MEDFED, ok, pki};

#[test]
fn ingest_pipelines_resume_and_report_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    std::fs::create_dir_all(d.join("extracts")).unwrap();
    std::fs::copy(root.join("pima_tr.csv"), d.join("extracts/2025.csv")).unwrap();
    std::fs::copy(
        root.join("pima_tr2_missing.csv"),
        d.join("extracts/2026.csv"),
    )
    .unwrap();
    let fhir = root.join("pima_fhir");
    std::fs::write(
        d.join("node.toml"),
        format!(
            r#"site = "alpha"
[aggregator]
address = "127.0.0.1:4433"
[tls]
ca = "pki/sites/alpha/ca.pem"
cert = "pki/sites/alpha/cert.pem"
key = "pki/sites/alpha/key.pem"
[[dataset]]
name = "pima"
path = "extracts/2025.csv"
[[ingest]]
stream = "extracts"
csv = "extracts"
columns = ["glu", "skin"]
commit_every = 50
[[ingest]]
stream = "fhir"
fhir = {fhir:?}
columns = ["glu", "bmi"]
[ingest.fhir_mapping]
features = [
  {{ column = "glu", system = "http://loinc.org", code = "2345-7" }},
  {{ column = "bmi", system = "http://loinc.org", code = "39156-5" }},
]
"#
        ),
    )
    .unwrap();
    let cfg = d.join("node.toml");
    let cfg = cfg.to_str().unwrap();
    let out = ok(&["node", "ingest", "--config", cfg]);
    assert!(
        out.contains("extracts partition 0: offset 200, processed 200, quarantined 0"),
        "{out}"
    );
    // pima_tr2_missing has 98 rows without a skinfold: quarantined, not lost.
    assert!(
        out.contains("extracts partition 1: offset 300, processed 300, quarantined 98"),
        "{out}"
    );
    assert!(
        out.contains("fhir partition 0: offset 200, processed 200, quarantined 0"),
        "{out}"
    );
    // A second run finds nothing new.
    let again = ok(&["node", "ingest", "--config", cfg]);
    assert!(
        again.contains("extracts partition 1: offset 300, processed 300, quarantined 98"),
        "{again}"
    );
    let table = ok(&["node", "status", "--config", cfg]);
    assert!(
        table.contains("last checkpoint") && table.contains("extracts"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["node", "status", "--config", cfg, "--json"])).unwrap();
    let rows = json["partitions"].as_array().unwrap();
    assert_eq!(json["privacy"]["spent_total"], 0.0);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1]["lag"], 0);
    assert_eq!(rows[1]["quarantined"], 98);
    assert!(rows[0]["last_checkpoint_ms"].as_u64().unwrap() > 0);

    // A pipeline with two sources is a config error naming it.
    let text = std::fs::read_to_string(d.join("node.toml"))
        .unwrap()
        .replacen("csv = \"extracts\"", "csv = \"extracts\"\nfhir = \"x\"", 1);
    std::fs::write(d.join("bad.toml"), text).unwrap();
    let out = Command::new(MEDFED)
        .args([
            "node",
            "status",
            "--config",
            d.join("bad.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`ingest[0]` needs exactly one source"));
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_bytes(&path));
        } else {
            out.extend(std::fs::read(&path).unwrap());
        }
    }
    out
}

#[test]
fn quarantined_records_are_listed_without_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `node init` makes the site's pseudonym key (keystore/pseudonym-keys.toml).
    ok(&[
        "node",
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--site",
        "alpha",
    ]);
    pki(d, &["alpha"]);
    std::fs::write(
        d.join("extract.csv"),
        "mrn,street,birth_date,glu\n\
         MRN-1,1 Main St,1961-04-01,140\n\
         MRN-2,7 Bletchley Park, Unit 4,1954-06-23,99\n\
         MRN-3,2 Low Rd,1961-02-30,101\n\
         MRN-4,3 High St,1970-01-01,glu-unreadable\n\
         MRN-5,4 Mill Ln,1980-05-05,150\n",
    )
    .unwrap();
    let config = |state: &str, extra: &str| {
        format!(
            r#"site = "alpha"
[aggregator]
address = "127.0.0.1:4433"
[tls]
ca = "pki/sites/alpha/ca.pem"
cert = "pki/sites/alpha/cert.pem"
key = "pki/sites/alpha/key.pem"
[state]
dir = "{state}"
[[dataset]]
name = "labs"
ingest = "labs"
[[ingest]]
stream = "labs"
csv = "extract.csv"
columns = ["glu"]
{extra}
[[ingest.field]]
name = "mrn"
class = "patient-id"
[[ingest.field]]
name = "street"
class = "identifier"
[[ingest.field]]
name = "birth_date"
class = "birth-date"
[[ingest.field]]
name = "glu"
"#
        )
    };
    std::fs::write(d.join("node.toml"), config("state", "")).unwrap();
    let cfg = d.join("node.toml");
    let cfg = cfg.to_str().unwrap();
    let out = ok(&["node", "ingest", "--config", cfg]);
    assert!(out.contains("processed 5, quarantined 3"), "{out}");

    let table = ok(&["node", "quarantine", "--config", cfg]);
    for row in [
        "the row has 5 fields; the header has 4",
        "birth_date",
        "not a day of the calendar",
        "glu",
        "not a number",
        "3 quarantined record(s)",
    ] {
        assert!(table.contains(row), "{row:?} not in:\n{table}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["node", "quarantine", "--config", cfg, "--json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (&rows[0]["offset"], &rows[0]["field"], &rows[0]["patient"]),
        (
            &serde_json::json!(1),
            &serde_json::Value::Null,
            &serde_json::Value::Null
        ),
        "the shifted row names no field and no patient"
    );
    assert_eq!(
        (&rows[1]["offset"], &rows[1]["field"]),
        (&serde_json::json!(2), &serde_json::json!("birth_date"))
    );
    let (p3, p4) = (
        rows[1]["patient"].as_str().unwrap(),
        rows[2]["patient"].as_str().unwrap(),
    );
    assert!(
        p3.starts_with("p1-") && p4.starts_with("p1-") && p3 != p4,
        "{json}"
    );

    // Nothing of the rejected values is kept, in the listing or anywhere in the state.
    let state = all_bytes(&d.join("state"));
    let shown = format!("{table}{json}");
    for value in [
        "Bletchley",
        "Unit 4",
        "1961-02-30",
        "glu-unreadable",
        "MRN-",
    ] {
        assert!(!shown.contains(value), "{value} shown");
        assert!(
            !state.windows(value.len()).any(|w| w == value.as_bytes()),
            "{value} kept in the state"
        );
    }

    // raw_rejects, for the site's data stewards, keeps the raw lines in an owner-only file.
    std::fs::write(
        d.join("stewards.toml"),
        config("state-stewards", "raw_rejects = \"stewards/rejects.csv\""),
    )
    .unwrap();
    let stewards = d.join("stewards.toml");
    ok(&["node", "ingest", "--config", stewards.to_str().unwrap()]);
    let raw = std::fs::read_to_string(d.join("stewards/rejects.csv")).unwrap();
    assert!(
        raw.starts_with("stream,partition,offset,line\n")
            && raw.contains("labs,0,1,\"MRN-2,7 Bletchley Park, Unit 4,1954-06-23,99\"")
            && raw.contains("labs,0,3,\"MRN-4,3 High St,1970-01-01,glu-unreadable\""),
        "{raw}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("stewards/rejects.csv"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn a_csv_partitioned_by_key_reports_each_partitions_lag_and_reads_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "node",
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--site",
        "alpha",
    ]);
    pki(d, &["alpha"]);
    // 1,000 rows of 37 patients, an address in quotes, and an Excel "CSV UTF-8" byte order
    // mark before the header.
    let mut text = String::from("\u{feff}mrn,address,glu\n");
    for i in 0..1000 {
        text.push_str(&format!(
            "MRN-{},\"{} Main St, Unit {}\",{}\n",
            i % 37,
            i,
            i % 9,
            80 + i % 90
        ));
    }
    std::fs::write(d.join("extract.csv"), text).unwrap();
    std::fs::write(
        d.join("node.toml"),
        r#"site = "alpha"
[aggregator]
address = "127.0.0.1:4433"
[tls]
ca = "pki/sites/alpha/ca.pem"
cert = "pki/sites/alpha/cert.pem"
key = "pki/sites/alpha/key.pem"
[[dataset]]
name = "labs"
ingest = "labs"
[[ingest]]
stream = "labs"
csv = "extract.csv"
columns = ["glu"]
partition_by = "mrn"
partitions = 3
commit_every = 100
[[ingest.field]]
name = "mrn"
class = "patient-id"
required = true
[[ingest.field]]
name = "address"
class = "identifier"
[[ingest.field]]
name = "glu"
min = 0
max = 1000
"#,
    )
    .unwrap();
    let cfg = d.join("node.toml");
    let cfg = cfg.to_str().unwrap();
    let status = |cfg: &str| -> Vec<serde_json::Value> {
        let json: serde_json::Value =
            serde_json::from_str(&ok(&["node", "status", "--config", cfg, "--json"])).unwrap();
        json["partitions"].as_array().unwrap().clone()
    };
    // Before: every row is some partition's lag, and each partition has some.
    let before = status(cfg);
    assert_eq!(before.len(), 3);
    let lags: Vec<u64> = before.iter().map(|r| r["lag"].as_u64().unwrap()).collect();
    assert_eq!(lags.iter().sum::<u64>(), 1000, "{before:?}");
    assert!(lags.iter().all(|l| *l > 0), "{lags:?}");
    let out = ok(&["node", "ingest", "--config", cfg]);
    // After: each partition processed what its lag said, nothing quarantined, no lag.
    let after = status(cfg);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a["processed"], b["lag"], "{out}");
        assert_eq!(
            (&a["lag"], &a["quarantined"]),
            (&serde_json::json!(0), &serde_json::json!(0))
        );
    }
}
