//! Studies added to, listed on and stopped at a running aggregator, as processes:
//! `medfed aggregator study create | list | show | stop`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    Federation, RECONNECT_FAST, SERVE_PIMA, model_export, ok, pima_study_keys, run, until,
};

const SITES: [&str; 2] = ["site-a", "site-b"];

fn spec(id: &str, rounds: u32) -> String {
    format!("{}rounds = {rounds}\nmin_sites = 2\n", pima_study_keys(id))
}

#[test]
fn studies_are_created_listed_and_stopped_while_the_aggregator_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fed = Federation::new(d)
        .sites(&SITES)
        .node_extra(|_| SERVE_PIMA.to_string())
        .out_dir(None)
        .ops()
        .aggregator("[studies]\nkeep_serving = true\n")
        .write();
    let ops = fed.ops.clone().unwrap();
    let a = fed.aggregator.to_str().unwrap();
    let mut procs = fed.start_aggregator_first();

    // A short study, added while the aggregator runs, runs to the end.
    std::fs::write(d.join("short.toml"), spec("short", 3)).unwrap();
    let said = ok(&[
        "aggregator",
        "study",
        "create",
        "--config",
        a,
        "--spec",
        d.join("short.toml").to_str().unwrap(),
    ]);
    assert!(
        said.contains("study 'short' added") && said.contains("medfed node approve"),
        "{said}"
    );
    let (dup, said) = run(&[
        "aggregator",
        "study",
        "create",
        "--config",
        a,
        "--spec",
        d.join("short.toml").to_str().unwrap(),
    ]);
    assert!(!dup && said.contains("already exists"), "{said}");
    until("the short study", Duration::from_secs(60), || {
        d.join("aggregator-out/models/short/final.json").is_file()
    });
    until("its state", Duration::from_secs(10), || {
        ok(&["aggregator", "study", "list", "--config", a]).contains("complete")
    });
    let show = ok(&[
        "aggregator",
        "study",
        "show",
        "--config",
        a,
        "--study",
        "short",
    ]);
    assert!(
        show.contains("hash: ") && show.contains("rounds = 3"),
        "{show}"
    );

    // A long one is stopped by the operator after it started.
    std::fs::write(d.join("long.toml"), spec("long", 10_000)).unwrap();
    ok(&[
        "aggregator",
        "study",
        "create",
        "--config",
        a,
        "--spec",
        d.join("long.toml").to_str().unwrap(),
    ]);
    until(
        "the long study's first round",
        Duration::from_secs(60),
        || {
            d.join("aggregator-out/models/long/round-0001.json")
                .is_file()
        },
    );
    let said = ok(&[
        "aggregator",
        "study",
        "stop",
        "--config",
        a,
        "--study",
        "long",
    ]);
    assert!(said.contains("stops at its next round"), "{said}");
    until("the stop", Duration::from_secs(30), || {
        let list = ok(&["aggregator", "study", "list", "--config", a]);
        list.lines()
            .any(|l| l.starts_with("long") && l.contains("stopped"))
    });
    // The aggregator keeps serving, and stops cleanly on SIGTERM.
    let status = ok(&["aggregator", "status", "--address", &ops]);
    assert!(status.contains("site-a, site-b"), "{status}");
    let pid = procs.0[0].1.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = procs.0[0].1.try_wait().unwrap() {
            assert!(s.success(), "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no clean stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An aggregator that keeps serving outlives a failed statistics study, announces a study
/// again after the hospitals approve it (as the refusal tells them to), and exports the
/// model of a study added with `study create`.
#[test]
fn a_serving_aggregator_outlives_failures_and_takes_up_approvals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A statistics study no site serves (they approve nothing yet).
    let fed = Federation::new(d)
        .sites(&SITES)
        // No rules: each study is served once its hash is approved.
        .node_extra(|_| RECONNECT_FAST.to_string())
        .out_dir(None)
        .ops()
        .aggregator(
            "[studies]\nkeep_serving = true\nretry_failed_secs = 1\n\
             [[statistics]]\nid = \"glucose\"\ndataset = \"pima\"\nmin_sites = 2\ntimeout_secs = 10\n\
             wait_for_sites_secs = 30\n\
             [[statistics.column]]\nname = \"glu\"\nlow = 40\nhigh = 200\nedges = [40, 120, 200]\n",
        )
        .write();
    let a = fed.aggregator.to_str().unwrap();
    let mut procs = fed.start_aggregator_first();
    let node_cfgs = fed.nodes();
    let agg_log = || fed.log("aggregator");
    let wait = |what: &str, within: Duration, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + within;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                agg_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait(
        "the statistics study to fail",
        Duration::from_secs(60),
        &|| {
            let log = agg_log();
            log.contains("study 'glucose': secure aggregation failed")
                && log.contains("site-a refused: query 'glucose'")
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        procs.0[0].1.try_wait().unwrap().is_none(),
        "the aggregator must keep serving after a failed statistics study:\n{}",
        agg_log()
    );

    // A study added while it runs is refused (not approved yet), then approved by both
    // hospitals with the hash the refusal gives: it is announced again and runs.
    std::fs::write(d.join("later.toml"), spec("later", 2)).unwrap();
    let said = ok(&[
        "aggregator",
        "study",
        "create",
        "--config",
        a,
        "--spec",
        d.join("later.toml").to_str().unwrap(),
    ]);
    let hash = said
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no hash in: {said}"))
        .to_string();
    wait("the refusal", Duration::from_secs(60), &|| {
        agg_log().contains("study 'later': only 0 of the 2 sites")
    });
    // The node shows what was announced, and what approving it means.
    let listed = ok(&[
        "node",
        "studies",
        "--config",
        node_cfgs[0].to_str().unwrap(),
    ]);
    assert!(
        listed.contains(&format!("study 'later' (hash {hash})"))
            && listed.contains("columns:  npreg, glu, bp, skin, bmi, ped, age")
            && listed.contains("EXACT")
            && listed.contains("decision: refused"),
        "{listed}"
    );
    // A hash never announced is not approved unseen, unless forced.
    let (approved, said) = run(&[
        "node",
        "approve",
        "--config",
        node_cfgs[0].to_str().unwrap(),
        "--study",
        &"ab".repeat(32),
    ]);
    assert!(!approved && said.contains("--force"), "{said}");
    for cfg in &node_cfgs {
        let said = ok(&[
            "node",
            "approve",
            "--config",
            cfg.to_str().unwrap(),
            "--study",
            &hash,
        ]);
        assert!(
            said.contains("approving, as announced to this site") && said.contains("rounds"),
            "{said}"
        );
    }
    wait(
        "the approved study to run",
        Duration::from_secs(90),
        &|| d.join("aggregator-out/models/later/final.json").is_file(),
    );
    // Its model is exported like a configured study's.
    let out = d.join("later.json");
    let said = ok(&model_export(
        &fed.aggregator,
        "later",
        &["--out", out.to_str().unwrap()],
    ));
    assert!(said.contains("study 'later' round 2"), "{said}");
    assert!(out.is_file());
}
