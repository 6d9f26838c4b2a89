//! The auditor's view of a real run: every party's compliance log verifies with its public
//! key, tampering is caught at the right line, and the FHIR export has AuditEvent's required
//! elements.

use std::path::Path;
use std::process::{Command, Output};

const MEDFED: &str = env!("CARGO_BIN_EXE_medfed");

fn medfed(args: &[&str]) -> Output {
    Command::new(MEDFED)
        .args(args)
        .output()
        .expect("run medfed")
}

fn stdout(args: &[&str]) -> String {
    let out = medfed(args);
    assert!(
        out.status.success(),
        "medfed {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn demo(dir: &Path) {
    stdout(&["demo", "--out", dir.to_str().unwrap(), "--rounds", "3"]);
}

fn log_and_key(dir: &Path, party: &str) -> (String, String) {
    let a = dir.join("audit");
    (
        a.join(format!("{party}.log"))
            .to_string_lossy()
            .into_owned(),
        a.join(format!("{party}.key.pub"))
            .to_string_lossy()
            .into_owned(),
    )
}

#[test]
fn every_party_of_the_demo_leaves_a_log_that_verifies() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    for party in ["aggregator", "riverside", "st-marys", "northgate"] {
        let (log, key) = log_and_key(dir.path(), party);
        let out = stdout(&["audit", "verify", "--log", &log, "--key", &key]);
        assert!(out.contains(": OK"), "{out}");
        assert!(
            !out.contains("note:"),
            "a cleanly stopped party left an unsigned tail: {out}"
        );
    }
    // What left a hospital, per study: 3 rounds, the decision, byte counts.
    let (log, key) = log_and_key(dir.path(), "riverside");
    let table = stdout(&["audit", "report", "--log", &log, "--key", &key]);
    assert!(
        table.contains("pima-diabetes") && table.contains("accepted"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&[
        "audit", "report", "--log", &log, "--key", &key, "--format", "json",
    ]))
    .unwrap();
    let study = &json["studies"]["pima-diabetes"];
    assert_eq!(study["rounds"].as_array().unwrap().len(), 3);
    assert!(study["bytes_sent"].as_u64().unwrap() > 0);
    // The aggregator released one model per round.
    let (alog, akey) = log_and_key(dir.path(), "aggregator");
    let json: serde_json::Value = serde_json::from_str(&stdout(&[
        "audit", "report", "--log", &alog, "--key", &akey, "--format", "json",
    ]))
    .unwrap();
    assert_eq!(json["studies"]["pima-diabetes"]["released"], 3);
}

#[test]
fn tampering_and_a_wrong_key_are_named_by_line() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let (log, key) = log_and_key(dir.path(), "st-marys");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let check = |edited: Vec<String>| -> String {
        std::fs::write(&log, edited.join("\n") + "\n").unwrap();
        let out = medfed(&["audit", "verify", "--log", &log, "--key", &key]);
        assert!(!out.status.success(), "tampering not detected");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let own: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    // Change the size of a message that left the site (line 6).
    let mut edited = own.clone();
    let i = edited
        .iter()
        .position(|l| l.contains("\"kind\":\"sent\""))
        .unwrap();
    edited[i] = edited[i].replacen("\"bytes\":", "\"bytes\":9", 1);
    let err = check(edited);
    assert!(
        err.contains(&format!("line {}: the hash of line {}", i + 2, i + 1)),
        "{err}"
    );
    // Delete a record.
    let mut edited = own.clone();
    edited.remove(3);
    assert!(check(edited).contains("line 4: sequence number"));
    // Duplicate a record.
    let mut edited = own.clone();
    edited.insert(3, own[2].clone());
    assert!(check(edited).contains("line 4: sequence number"));
    // Reorder two records.
    let mut edited = own.clone();
    edited.swap(3, 4);
    assert!(check(edited).contains("line 4: sequence number"));
    // Another party's key.
    std::fs::write(&log, &text).unwrap();
    let (_, other) = log_and_key(dir.path(), "riverside");
    let out = medfed(&["audit", "verify", "--log", &log, "--key", &other]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature does not verify"));
}

#[test]
fn the_fhir_export_has_the_required_audit_event_elements() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let (log, key) = log_and_key(dir.path(), "northgate");
    let bundle: serde_json::Value = serde_json::from_str(&stdout(&[
        "audit", "report", "--log", &log, "--key", &key, "--format", "fhir",
    ]))
    .unwrap();
    assert_eq!(bundle["resourceType"], "Bundle");
    let entries = bundle["entry"].as_array().unwrap();
    assert!(entries.len() > 10);
    for e in entries {
        let r = &e["resource"];
        assert_eq!(r["resourceType"], "AuditEvent");
        // R4 AuditEvent: type 1..1, recorded 1..1, agent 1..* with requestor 1..1, source 1..1
        // with observer 1..1.
        assert!(
            r["type"]["code"].is_string() && r["type"]["system"].is_string(),
            "{r}"
        );
        assert!(r["recorded"].as_str().unwrap().ends_with('Z'), "{r}");
        let agents = r["agent"].as_array().unwrap();
        assert!(
            !agents.is_empty() && agents.iter().all(|a| a["requestor"].is_boolean()),
            "{r}"
        );
        assert!(r["source"]["observer"]["display"].is_string(), "{r}");
    }
    let exports = entries
        .iter()
        .filter(|e| e["resource"]["type"]["code"] == "110106")
        .count();
    assert!(exports > 0, "no Export events");
}
