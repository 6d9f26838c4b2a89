//! A site's privacy budget, enforced by the site, over real QUIC: a differentially private
//! study of 4 rounds, where one of four hospitals allows only 2 rounds' worth of ε. That
//! site's updates stop at round 3; the refusal shows at the aggregator, in `medfed node
//! status`, in the site's log and in its compliance log; the study completes with the
//! other three, and its rounds carry the noise of secure aggregation's honest minimum.

mod procs;
use procs::{Processes, all_succeed, ok, spawn};

use std::time::Duration;

use medfed_protocol::dp::ledger::Ledger;

const SITES: [&str; 4] = ["site-a", "site-b", "site-c", "site-d"];

#[test]
fn a_site_stops_at_its_privacy_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    procs::pki(d, &SITES);
    let (header, rows) = procs::pima();
    for (i, site) in SITES.iter().enumerate() {
        let part: Vec<String> = rows.iter().skip(i).step_by(4).cloned().collect();
        std::fs::write(
            d.join(format!("{site}.csv")),
            format!("{header}\n{}\n", part.join("\n")),
        )
        .unwrap();
    }
    // z = 2, δ = 1e-6: site-d's limit lies between the ε of 2 and of 3 rounds.
    let (z, delta) = (2.0, 1e-6);
    let eps = |k: usize| {
        let mut l = Ledger::default();
        (0..k).for_each(|_| l.record("s", z));
        l.epsilon(Some("s"), delta)
    };
    let limit = (eps(2) + eps(3)) / 2.0;
    let port = procs::free_udp_port();
    std::fs::write(
        d.join("aggregator.toml"),
        procs::aggregator_config(
            port,
            Some("out"),
            &["site-a", "site-b", "site-c", "site-d"],
            &format!(
                r#"[[study]]
id = "pima-dp"
dataset = "pima"
model = "logistic"
features = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
target = "type"
positive_class = "Yes"
rounds = 4
min_sites = 3
wait_for_sites_secs = 60
round_timeout_secs = 30
[study.privacy]
clip_norm = 1.0
noise_multiplier = {z}
feature_ranges = [[0, 17], [0, 200], [0, 122], [0, 99], [0, 67], [0, 2.5], [21, 81]]
"#
            ),
        ),
    )
    .unwrap();
    for site in SITES {
        let budget = if site == "site-d" {
            format!(
                "[policy.privacy]\nepsilon = {limit}\ntotal_epsilon = {limit}\ndelta = {delta}\n"
            )
        } else {
            // The others allow the whole study (4 rounds at z = 2 pass the default 5).
            format!("[policy.privacy]\nepsilon = 20\ntotal_epsilon = 20\ndelta = {delta}\n")
        };
        std::fs::write(
            d.join(format!("{site}.toml")),
            procs::node_config(
                site,
                port,
                &format!("{site}.csv"),
                &format!("{}{budget}{}", procs::SERVE_PIMA, procs::RECONNECT_FAST),
            ),
        )
        .unwrap();
    }
    let mut procs = Processes(Vec::new());
    for site in SITES {
        let cfg = d.join(format!("{site}.toml"));
        procs.0.push(spawn(
            d,
            site,
            &["node", "run", "--config", cfg.to_str().unwrap()],
        ));
    }
    let agg = d.join("aggregator.toml");
    procs.0.push(spawn(
        d,
        "aggregator",
        &["aggregator", "run", "--config", agg.to_str().unwrap()],
    ));
    all_succeed(d, &mut procs, Duration::from_secs(120));
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert!(
        agg_log.contains("study 'pima-dp' complete after 4 rounds"),
        "{agg_log}"
    );
    // The aggregator saw site-d refuse rounds 3 and 4, and why; never rounds 1 and 2.
    let refusals: Vec<&str> = agg_log
        .lines()
        .filter(|l| l.contains("site-d") && l.contains("privacy budget"))
        .collect();
    assert!(refusals.iter().any(|l| l.contains("round 3")), "{agg_log}");
    assert!(
        !refusals
            .iter()
            .any(|l| l.contains("round 1 ") || l.contains("round 2 ")),
        "{refusals:?}"
    );
    // The node's log and status say the same.
    let node_log = std::fs::read_to_string(d.join("site-d.log")).unwrap();
    assert!(
        node_log.contains("privacy budget: round 3 of study 'pima-dp' refused"),
        "{node_log}"
    );
    let cfg_d = d.join("site-d.toml");
    let status: serde_json::Value = serde_json::from_str(&ok(&[
        "node",
        "status",
        "--config",
        cfg_d.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let study = &status["privacy"]["studies"][0];
    assert_eq!(study["study"], "pima-dp");
    assert_eq!(study["releases"], 2, "{status}");
    assert_eq!(study["refused"], 2, "{status}");
    assert!(study["epsilon"].as_f64().unwrap() <= limit);
    let table = ok(&["node", "status", "--config", cfg_d.to_str().unwrap()]);
    assert!(
        table.contains("privacy budget") && table.contains("pima-dp"),
        "{table}"
    );
    // The others spent 4 rounds, within their default budget.
    let cfg_a = d.join("site-a.toml");
    let status: serde_json::Value = serde_json::from_str(&ok(&[
        "node",
        "status",
        "--config",
        cfg_a.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(status["privacy"]["studies"][0]["releases"], 4, "{status}");
    // The compliance log records each charge and the refusals, for the auditor.
    let report = ok(&[
        "audit",
        "report",
        "--log",
        d.join("site-d-audit.log").to_str().unwrap(),
        "--key",
        d.join("site-d-audit.key.pub").to_str().unwrap(),
    ]);
    assert!(
        report.contains("refused for the privacy budget"),
        "{report}"
    );
    // Rounds 3 and 4 were aggregated from the other three sites.
    let round4: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/models/pima-dp/round-0004.json")).unwrap(),
    )
    .unwrap();
    let sites = round4.to_string();
    assert!(
        sites.contains("site-a") && !sites.contains("site-d"),
        "{sites}"
    );
}
