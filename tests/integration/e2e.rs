//! End to end, across processes: the real `medfed` binary as one aggregator and three
//! hospital nodes, with a PKI and configs made by the binary's own commands.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    Federation, Processes, Rows, all_succeed, log, medfed, model_evaluate, model_export, ok,
    pima_csv, pima_study, spawn_node, wait,
};

const SITES: [&str; 3] = ["hospital-a", "hospital-b", "hospital-c"];

/// A logistic study "pima" of the Pima rows on at least 3 sites; `more` is appended.
fn study(rounds: u32, round_timeout_secs: u32, more: &str) -> String {
    pima_study(
        "pima",
        &format!(
            "rounds = {rounds}\nmin_sites = 3\nwait_for_sites_secs = 60\n\
             round_timeout_secs = {round_timeout_secs}\n{more}"
        ),
    )
}

#[test]
fn aggregator_and_three_nodes_as_processes_train_and_export_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Each hospital holds a block of consecutive rows.
    let fed = Federation::new(d)
        .sites(&SITES)
        .rows(Rows::Blocks)
        .aggregator(&study(5, 30, ""))
        .write();

    // Nodes first: they retry until the aggregator is up.
    let mut procs = fed.start();
    all_succeed(d, &mut procs, Duration::from_secs(120));
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert!(
        agg_log.contains("study 'pima' complete after 5 rounds"),
        "{agg_log}"
    );
    let node_log = std::fs::read_to_string(d.join("hospital-a.log")).unwrap();
    assert!(
        node_log.contains("the aggregator completed all studies"),
        "{node_log}"
    );

    // Every round's model is exported, and the final one evaluates on the full data.
    let models = d.join("out/models/pima");
    for round in 1..=5 {
        assert!(
            models.join(format!("round-{round:04}.json")).is_file(),
            "round {round} not exported"
        );
    }
    let final_model = models.join("final.json");
    // Any round's model can be exported; a round that does not exist is named.
    let agg = &fed.aggregator;
    let exported = d.join("round3.json");
    let said = ok(&model_export(
        agg,
        "pima",
        &["--round", "3", "--out", exported.to_str().unwrap()],
    ));
    assert!(said.contains("study 'pima' round 3 (3 sites"), "{said}");
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        std::fs::read(models.join("round-0003.json")).unwrap()
    );
    let missing = medfed(&model_export(agg, "pima", &["--round", "9"]));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("round-0009.json does not exist"));
    let all = pima_csv();
    let json = ok(&model_evaluate(&final_model, &all, &["--json"]));
    let metrics: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(metrics["task"], "classification");
    assert_eq!(metrics["rows"], 200);
    let auc = metrics["roc_auc"].as_f64().unwrap();
    assert!(auc > 0.8, "AUC {auc}");
    let table = ok(&model_evaluate(&final_model, &all, &[]));
    assert!(
        table.contains("AUC") && table.contains("sensitivity"),
        "{table}"
    );
}

#[test]
fn demo_runs_and_keeps_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let stdout = ok(&["demo", "--out", out.to_str().unwrap(), "--rounds", "4"]);
    assert!(stdout.contains("round  sites  train loss"), "{stdout}");
    assert!(
        stdout.contains("federated") && stdout.contains("centralized"),
        "{stdout}"
    );
    let final_model = out.join("aggregator/models/pima-diabetes/final.json");
    assert!(
        stdout.contains(&format!("final global model: {}", final_model.display())),
        "{stdout}"
    );
    for kept in [
        "pki/ca/ca.pem",
        "aggregator.toml",
        "nodes/riverside.toml",
        "plots/training.svg",
        "plots/roc.svg",
        "audit/riverside.log",
        "data/validation.csv",
        "logs/medfed.log",
    ] {
        assert!(out.join(kept).is_file(), "{kept} not kept");
    }
    // A second run into the same directory refuses rather than mixing runs.
    let again = medfed(&["demo", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));
}

/// Secure aggregation survives a hospital dying mid-round: four nodes as processes, one
/// killed with SIGKILL while a round is in progress; that round and the rest of the study
/// complete with the other three, and the aggregator never needs the dead node's update.
#[cfg(unix)]
#[test]
fn a_node_killed_mid_round_does_not_stop_secure_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Larger extracts (each site's rows repeated) so that local training takes a moment and
    // the kill lands inside a round.
    let fed = Federation::new(d)
        .sites(&["site-a", "site-b", "site-c", "site-d"])
        .copies(|_| 100)
        .aggregator(&study(
            6,
            15,
            "[study.training]\nlocal_epochs = 3\nbatch_size = 16\n",
        ))
        .write();
    let mut procs = Processes(fed.spawn_nodes());
    procs
        .0
        .push(fed.spawn_aggregator_as("aggregator", &["--log-format", "json"]));

    // Wait until round 2's secure aggregation has started, then kill site-d at once.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = fed.log("aggregator");
        if log
            .lines()
            .any(|l| l.contains("secure aggregation starts") && l.contains("\"round\":2"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "round 2 never started:\n{log}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let victim = &mut procs.0[3].1;
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();

    let (name, agg) = procs.0.last_mut().unwrap();
    let status = wait(agg, Duration::from_secs(180));
    let log = log(d, name);
    // It completes, on fewer sites than allowed: exit status 2, site-d named missing.
    assert!(
        status.is_some_and(|s| s.code() == Some(2)),
        "aggregator: {status:?}\n{log}"
    );
    assert!(
        log.contains("study 'pima' complete after 6 rounds"),
        "{log}"
    );
    let last: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/models/pima/final.json")).unwrap(),
    )
    .unwrap();
    assert!(
        last["missing_sites"]
            .as_array()
            .is_some_and(|m| m.iter().any(|s| s["site"] == "site-d")),
        "{last}"
    );
    let sites_of = |round: u32| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join(format!("out/models/pima/round-{round:04}.json")))
                .unwrap(),
        )
        .unwrap();
        v["sites"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    // Round 2 went on without a retry: its sum holds the other three, and site-d's input
    // too only if it was sent before the kill landed. Round 3 averages the other three.
    let round2 = sites_of(2);
    assert!(
        round2.starts_with(&["site-a".into(), "site-b".into(), "site-c".into()]),
        "{round2:?}\n{log}"
    );
    assert_eq!(sites_of(3), ["site-a", "site-b", "site-c"], "{log}");
    assert!(
        !log.contains("round failed"),
        "round 2 had to be retried:\n{log}"
    );
    for (name, child) in procs.0.iter_mut().take(3) {
        let status = wait(child, Duration::from_secs(30));
        assert!(status.is_some_and(|s| s.success()), "{name}: {status:?}");
    }

    // The killed node's compliance log verifies up to its last complete record...
    let log = d.join("site-d-audit.log");
    let key = d.join("site-d-audit.key.pub");
    let verify = || {
        medfed(&[
            "audit",
            "verify",
            "--log",
            log.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ])
    };
    let out = verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and a restarted node carries on with the same log, recording the recovery.
    let (_, mut again) = spawn_node(d, "site-d-again", &fed.node("site-d"));
    // Stop it once it has recorded its start and the recovery.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|c| {
        c.matches("\"kind\":\"start\"").count() == 2 && c.contains("\"kind\":\"recovered\"")
    }) {
        assert!(
            Instant::now() < deadline,
            "the restarted node wrote no start record"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let term = Command::new("kill")
        .args(["-TERM", &again.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = wait(&mut again, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "restarted node: {status:?}"
    );
    let out = verify();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("note:"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        content.matches("\"kind\":\"start\"").count(),
        2,
        "one log, two starts"
    );
    assert!(
        content.contains("\"kind\":\"recovered\""),
        "the crash is recorded"
    );
}

/// Secure aggregation changes nothing but the rounding: the demo's model with it is the
/// model without it, to within the fixed-point error.
#[test]
fn secure_aggregation_reaches_the_same_model_as_plain_fedavg() {
    let dir = tempfile::tempdir().unwrap();
    let (secure, plain) = (dir.path().join("secure"), dir.path().join("plain"));
    let out = ok(&["demo", "--out", secure.to_str().unwrap(), "--rounds", "5"]);
    assert!(out.contains("secure aggregation on"), "{out}");
    let out = ok(&[
        "demo",
        "--out",
        plain.to_str().unwrap(),
        "--rounds",
        "5",
        "--no-secure-aggregation",
    ]);
    assert!(out.contains("secure aggregation OFF"), "{out}");
    let weights = |d: &Path| -> Vec<f64> {
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("aggregator/models/pima-diabetes/final.json")).unwrap(),
        )
        .unwrap();
        m["model"]["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap())
            .collect()
    };
    let (a, b) = (weights(&secure), weights(&plain));
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        // 3 sites at 2^-24 per entry, compounded over 5 rounds: far below 1e-5.
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    assert_ne!(
        a, b,
        "identical to the last bit: was secure aggregation really used?"
    );
}
