//! The auditor's view of a real run: every party's compliance log verifies with its public
//! key, tampering is caught at the right line, and the FHIR export has AuditEvent's required
//! elements.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{MEDFED, free_udp_port, medfed, ok as stdout, pima_csv, pki};

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
    // What left a hospital, per study: its rounds, the decision, byte counts.
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
    // Three training rounds, and under secure aggregation a fourth: the final model's
    // evaluation.
    assert_eq!(study["rounds"].as_array().unwrap().len(), 4);
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

/// Waits up to `secs` for `child` to exit; kills it if it does not.
fn wait(child: &mut std::process::Child, secs: u64) -> Option<std::process::ExitStatus> {
    let status = crate::common::wait(child, Duration::from_secs(secs));
    if status.is_none() {
        let _ = child.kill();
    }
    status
}

/// A site serves only studies its operator approved: an unapproved one is refused with a
/// reason the aggregator receives, both logs record it, and after `medfed node approve` the
/// same study runs.
#[cfg(unix)]
#[test]
fn an_unapproved_study_is_refused_and_logged_on_both_sides_until_approved() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha"]);
    std::fs::copy(pima_csv(), d.join("pima.csv")).unwrap();
    let port = free_udp_port();
    std::fs::write(
        d.join("aggregator.toml"),
        format!(
            "listen = \"127.0.0.1:{port}\"\n[tls]\nca = \"pki/aggregator/localhost/ca.pem\"\ncert = \"pki/aggregator/localhost/cert.pem\"\nkey = \"pki/aggregator/localhost/key.pem\"\n[audit]\nlog = \"agg.log\"\nkey = \"agg.key\"\n[sites]\nallow = [\"alpha\"]\n[[study]]\nid = \"pima\"\ndataset = \"pima\"\nmodel = \"logistic\"\nfeatures = [\"glu\", \"bmi\"]\ntarget = \"type\"\npositive_class = \"Yes\"\nrounds = 2\nmin_sites = 1\nround_attempts = 1\nwait_for_sites_secs = 30\n[study.secure_aggregation]\nenabled = false\n"
        ),
    )
    .unwrap();
    // No [policy]: nothing is approved.
    std::fs::write(
        d.join("node.toml"),
        format!(
            "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n[tls]\nca = \"pki/sites/alpha/ca.pem\"\ncert = \"pki/sites/alpha/cert.pem\"\nkey = \"pki/sites/alpha/key.pem\"\n[audit]\nlog = \"alpha.log\"\nkey = \"alpha.key\"\n[[dataset]]\nname = \"pima\"\npath = \"pima.csv\"\nexact_releases = [\"training\"]\n[reconnect]\ninitial_backoff_ms = 100\nmax_backoff_ms = 500\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(MEDFED)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn medfed")
    };
    let (node_cfg, agg_cfg) = (d.join("node.toml"), d.join("aggregator.toml"));
    let mut node = run(&["node", "run", "--config", node_cfg.to_str().unwrap()]);
    let mut agg = run(&["aggregator", "run", "--config", agg_cfg.to_str().unwrap()]);
    let status = wait(&mut agg, 60).expect("the aggregator stops");
    let agg_out = agg.wait_with_output().unwrap();
    assert!(!status.success());
    let agg_err = String::from_utf8_lossy(&agg_out.stderr);
    assert!(
        agg_err.contains("too few sites accepted the study"),
        "{agg_err}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status();
    assert!(wait(&mut node, 20).is_some_and(|s| s.success()));

    let (alog, akey) = (d.join("agg.log"), d.join("agg.key.pub"));
    let (nlog, nkey) = (d.join("alpha.log"), d.join("alpha.key.pub"));
    let report = |log: &Path, key: &Path| {
        stdout(&[
            "audit",
            "report",
            "--log",
            log.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
    };
    let node_report = report(&nlog, &nkey);
    assert!(
        node_report.contains("refused: study 'pima' (hash ")
            && node_report.contains("is not approved at this site"),
        "{node_report}"
    );
    let agg_report = report(&alog, &akey);
    assert!(
        agg_report.contains("refused: site 'alpha' refused: study 'pima'"),
        "{agg_report}"
    );

    // The operator approves the study by the hash the refusal gave.
    let text = std::fs::read_to_string(&nlog).unwrap();
    let at = text.find("(hash ").expect("hash in the refusal") + 6;
    let hash = &text[at..at + 64];
    let approved = stdout(&[
        "node",
        "approve",
        "--config",
        node_cfg.to_str().unwrap(),
        "--study",
        hash,
    ]);
    assert!(approved.contains("approved for site 'alpha'"), "{approved}");
    let mut node = run(&["node", "run", "--config", node_cfg.to_str().unwrap()]);
    let mut agg = run(&["aggregator", "run", "--config", agg_cfg.to_str().unwrap()]);
    assert!(
        wait(&mut agg, 60).is_some_and(|s| s.success()),
        "{}",
        String::from_utf8_lossy(&agg.wait_with_output().unwrap().stderr)
    );
    assert!(wait(&mut node, 20).is_some_and(|s| s.success()));
    let node_report = report(&nlog, &nkey);
    assert!(
        node_report.contains("accepted: approved by the site's operator"),
        "{node_report}"
    );
}

#[test]
fn reconcile_agrees_on_a_real_run_and_catches_one_sided_and_altered_messages() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let (nlog, nkey) = log_and_key(dir.path(), "st-marys");
    let (alog, akey) = log_and_key(dir.path(), "aggregator");
    let out = stdout(&[
        "audit",
        "reconcile",
        "--node-log",
        &nlog,
        "--node-key",
        &nkey,
        "--aggregator-log",
        &alog,
        "--aggregator-key",
        &akey,
    ]);
    assert!(
        out.contains("OK: the logs of 'st-marys'") && out.contains("messages between them"),
        "{out}"
    );

    // Two correctly signed logs that disagree: the node logged a message the aggregator
    // never received, and one whose bytes differ.
    use medfed_infra::auditlog::AuditLog;
    use medfed_protocol::audit::{Event, MessageEntry};
    let d = dir.path();
    let entry = |peer: &str, round: u32, sha: &str| MessageEntry {
        peer: peer.into(),
        message: "masked-input".into(),
        study: Some("s".into()),
        round: Some(round),
        bytes: 10,
        sha256: sha.repeat(64 / sha.len()),
    };
    let node = AuditLog::open(
        &d.join("n.log"),
        &d.join("n.key"),
        "alpha",
        "node",
        "test",
        "cfg",
    )
    .unwrap();
    let agg = AuditLog::open(
        &d.join("a.log"),
        &d.join("a.key"),
        "centre",
        "aggregator",
        "test",
        "cfg",
    )
    .unwrap();
    node.record(Event::Sent(entry("aggregator", 1, "aa")))
        .unwrap();
    agg.record(Event::Received(entry("alpha", 1, "aa")))
        .unwrap();
    node.record(Event::Sent(entry("aggregator", 2, "bb")))
        .unwrap();
    node.record(Event::Sent(entry("aggregator", 3, "cc")))
        .unwrap();
    agg.record(Event::Received(entry("alpha", 3, "dd")))
        .unwrap();
    node.close("done").unwrap();
    agg.close("done").unwrap();
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let out = medfed(&[
        "audit",
        "reconcile",
        "--node-log",
        &p("n.log"),
        "--node-key",
        &p("n.key.pub"),
        "--aggregator-log",
        &p("a.log"),
        "--aggregator-key",
        &p("a.key.pub"),
    ]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sent but never received") && text.contains("round 2"),
        "{text}"
    );
    assert!(
        text.contains("hash mismatch") && text.contains("round 3"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 discrepancies"));
}

/// Reconcile checks what it compares: a node's log and the log of the aggregator it talked
/// to, each in its place. Swapped logs, two node logs, or an aggregator that never talked to
/// the node are refused with which log is which; agreement states how many messages.
#[test]
fn reconcile_refuses_logs_that_are_not_a_node_and_its_aggregator() {
    use medfed_infra::auditlog::AuditLog;
    use medfed_protocol::audit::{Event, MessageEntry};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let entry = |peer: &str, sha: &str| MessageEntry {
        peer: peer.into(),
        message: "hello".into(),
        study: None,
        round: None,
        bytes: 10,
        sha256: sha.repeat(64 / sha.len()),
    };
    let open = |name: &str, party: &str, role: &str| {
        AuditLog::open(
            &d.join(format!("{name}.log")),
            &d.join(format!("{name}.key")),
            party,
            role,
            "test",
            "cfg",
        )
        .unwrap()
    };
    let (alpha, beta) = (open("alpha", "alpha", "node"), open("beta", "beta", "node"));
    let (centre, other) = (
        open("centre", "centre", "aggregator"),
        open("other", "other-centre", "aggregator"),
    );
    alpha
        .record(Event::Sent(entry("aggregator", "aa")))
        .unwrap();
    centre
        .record(Event::Received(entry("alpha", "aa")))
        .unwrap();
    centre.record(Event::Sent(entry("alpha", "bb"))).unwrap();
    alpha
        .record(Event::Received(entry("aggregator", "bb")))
        .unwrap();
    beta.record(Event::Sent(entry("aggregator", "cc"))).unwrap();
    other.record(Event::Received(entry("beta", "cc"))).unwrap();
    for log in [alpha, beta, centre, other] {
        log.close("done").unwrap();
    }
    let p = |f: &str| d.join(f).to_string_lossy().into_owned();
    let reconcile = |node: &str, node_key: &str, agg: &str, agg_key: &str| {
        let out = medfed(&[
            "audit",
            "reconcile",
            "--node-log",
            &p(&format!("{node}.log")),
            "--node-key",
            &p(&format!("{node_key}.key.pub")),
            "--aggregator-log",
            &p(&format!("{agg}.log")),
            "--aggregator-key",
            &p(&format!("{agg_key}.key.pub")),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };

    let (good, out, err) = reconcile("alpha", "alpha", "centre", "centre");
    assert!(good, "{out}{err}");
    assert!(
        out.contains("OK: the logs of 'alpha' and 'centre' agree on all 2 messages"),
        "{out}"
    );

    // Swapped, with their keys and without: which log is which, and how to call it.
    for (node_key, agg_key) in [("centre", "alpha"), ("alpha", "centre")] {
        let (good, out, err) = reconcile("centre", node_key, "alpha", agg_key);
        assert!(!good && !out.contains("OK"), "{out}{err}");
        assert!(
            err.contains("the logs are swapped")
                && err.contains(&format!(
                    "--node-log {} is the log of the aggregator 'centre'",
                    p("centre.log")
                ))
                && err.contains("is the log of the node 'alpha'")
                && err.contains("usage: medfed audit reconcile --node-log"),
            "{err}"
        );
    }

    // Two node logs.
    let (good, out, err) = reconcile("alpha", "alpha", "beta", "beta");
    assert!(!good && !out.contains("OK"), "{out}{err}");
    assert!(
        err.contains("is the log of the node 'beta', not of the aggregator")
            && !err.contains("discrepancies"),
        "{err}"
    );

    // An aggregator's log that never names the node's site.
    let (good, out, err) = reconcile("alpha", "alpha", "other", "other");
    assert!(!good && !out.contains("OK"), "{out}{err}");
    assert!(
        err.contains("has no message to or from site 'alpha'")
            && err.contains("names the sites beta"),
        "{err}"
    );
}

#[test]
fn a_log_cut_after_a_known_tree_head_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    demo(dir.path());
    let (log, key) = log_and_key(dir.path(), "riverside");
    let out = stdout(&["audit", "verify", "--log", &log, "--key", &key]);
    // "keep SIZE:ROOT to check later copies"
    let head = out
        .split("keep ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    stdout(&[
        "audit",
        "verify",
        "--log",
        &log,
        "--key",
        &key,
        "--known-head",
        &head,
    ]);
    // Cut the log back to its first signed head: it still verifies on its own...
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let first_head = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"tree_head\""))
        .unwrap();
    std::fs::write(&log, lines[..=first_head].join("\n") + "\n").unwrap();
    stdout(&["audit", "verify", "--log", &log, "--key", &key]);
    // ...but not against the head the auditor kept.
    let out = medfed(&[
        "audit",
        "verify",
        "--log",
        &log,
        "--key",
        &key,
        "--known-head",
        &head,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("records were cut after line"), "{err}");
}

/// The auditor's console shows a verified log's facts (those of `audit report`), per study
/// and per round; a log tampered with after it started shows only that it fails; it serves
/// loopback only.
#[test]
fn the_auditor_console_shows_a_verified_log_and_nothing_of_a_tampered_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    demo(d);
    let (log, key) = log_and_key(d, "st-marys");
    let report: serde_json::Value = serde_json::from_str(&stdout(&[
        "audit", "report", "--log", &log, "--key", &key, "--format", "json",
    ]))
    .unwrap();
    let (study, facts) = report["studies"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(s, _)| !s.starts_with('('))
        .map(|(s, f)| (s.clone(), f.clone()))
        .expect("a study in the demo's log");

    let (refused, out) = crate::common::run(&[
        "audit",
        "console",
        "--log",
        &log,
        "--key",
        &key,
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!refused && out.contains("not a loopback address"), "{out}");

    // A copy the test can tamper with.
    let copy = d.join("copy.log");
    std::fs::copy(&log, &copy).unwrap();
    let port = crate::common::free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let _console = crate::common::Processes(vec![crate::common::spawn(
        d,
        "console",
        &[
            "audit",
            "console",
            "--log",
            copy.to_str().unwrap(),
            "--key",
            &key,
            "--listen",
            &addr,
        ],
    )]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let page = |path: &str| crate::ops::get(&addr, path);
    while page("/").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the console did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let summary = page("/").unwrap();
    assert!(summary.starts_with("HTTP/1.1 200"), "{summary}");
    for seen in [
        "Verified".to_string(),
        "Compliance log of st-marys".into(),
        format!(">{study}</a>"),
        format!("<td class=\"n\">{}</td>", facts["messages_sent"]),
        format!("<td class=\"n\">{}</td>", facts["released"]),
    ] {
        assert!(
            summary.contains(&seen),
            "the summary lacks {seen:?}:\n{summary}"
        );
    }
    let per_round = page(&format!("/studies/{study}")).unwrap();
    assert!(per_round.starts_with("HTTP/1.1 200"), "{per_round}");
    let rows = per_round.matches("<tr><th scope=\"row\">").count();
    assert!(
        rows >= 3,
        "one row per round of the 3-round demo:\n{per_round}"
    );
    assert!(
        per_round.contains("aggregator"),
        "the peer is named:\n{per_round}"
    );

    // Tamper with one record in the middle: the console shows nothing but the failure.
    let text = std::fs::read_to_string(&copy).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mid = (lines.len() / 2..lines.len())
        .find(|&i| lines[i].contains("\"bytes\":"))
        .expect("a message record in the second half");
    let tampered: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if i == mid {
                l.replacen("\"bytes\":", "\"bytes\":1", 1)
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_ne!(
        tampered[mid], lines[mid],
        "the middle record has no field to alter"
    );
    std::fs::write(&copy, tampered.join("\n") + "\n").unwrap();
    for path in ["/".to_string(), format!("/studies/{study}")] {
        let r = page(&path).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 500") && r.contains("Verification FAILED"),
            "{path}: {r}"
        );
        assert!(
            !r.contains(&format!(">{study}</a>")),
            "a tampered log's studies are not shown"
        );
    }
}
