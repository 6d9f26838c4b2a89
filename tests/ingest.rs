//! `medfed node ingest` and `medfed node status` on declared pipelines: a directory of CSV
//! extracts (one partition per file, with a bad row) and the Pima FHIR export.

use std::path::Path;
use std::process::Command;

const MEDFED: &str = env!("CARGO_BIN_EXE_medfed");

fn ok(args: &[&str]) -> String {
    let out = Command::new(MEDFED).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "medfed {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ingest_pipelines_resume_and_report_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("pki");
    ok(&["pki", "init", "--dir", p.to_str().unwrap()]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        p.to_str().unwrap(),
        "--site",
        "alpha",
    ]);
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
