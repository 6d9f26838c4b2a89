//! A site's privacy budget, enforced by the site, over real QUIC.
//!
//! - A site whose budget cannot pay for every round of a study refuses it when it is
//!   announced, and says why: it is charged nothing, and the study runs with the others
//!   (it used to accept, then refuse from round 3, after the others had paid for rounds).
//! - A study that ends early (stopped by the operator, or a site gone) exports its last
//!   released model as `final.json`, marked with why it stopped; each site was charged for
//!   the rounds released (a round that failed before the sites' masked inputs were sent
//!   costs nothing), and the error says what happened.

use std::path::Path;
use std::time::Duration;

use medfed_protocol::dp::ledger::Ledger;

use crate::common::{
    Federation, Processes, RECONNECT_FAST, SERVE_PIMA, all_succeed, model_export, ok, pima_study,
    spent, until, wait,
};

const SITES: [&str; 4] = ["site-a", "site-b", "site-c", "site-d"];
const RANGES: &str =
    "feature_ranges = [[0, 17], [0, 200], [0, 122], [0, 99], [0, 67], [0, 2.5], [21, 81]]";

/// Writes the PKI, each site's share of the Pima rows and its config with `budget(site)`,
/// and the aggregator's config with `studies`; starts the nodes, then the aggregator.
fn start(
    d: &Path,
    sites: &[&str],
    studies: &str,
    budget: impl Fn(&str) -> String + 'static,
) -> Processes {
    Federation::new(d)
        .sites(sites)
        .node_extra(move |site| format!("{SERVE_PIMA}{}{RECONNECT_FAST}", budget(site)))
        .aggregator(studies)
        .write()
        .start()
}

#[test]
fn a_site_refuses_a_study_its_budget_cannot_see_through() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // z = 2, δ = 1e-6: site-d's limit lies between the ε of 2 and of 3 rounds.
    let (z, delta) = (2.0, 1e-6);
    let eps = |k: usize| {
        let mut l = Ledger::default();
        (0..k).for_each(|_| l.record("s", z));
        l.epsilon(Some("s"), delta)
    };
    let limit = (eps(2) + eps(3)) / 2.0;
    let mut procs = start(
        d,
        &SITES,
        &pima_study(
            "pima-dp",
            &format!(
                "rounds = 4\nmin_sites = 3\nwait_for_sites_secs = 60\nround_timeout_secs = 30\n\
                 [study.privacy]\nclip_norm = 1.0\nnoise_multiplier = {z}\n{RANGES}\n"
            ),
        ),
        move |site| {
            if site == "site-d" {
                format!(
                    "[policy.privacy]\nepsilon = {limit}\ntotal_epsilon = {limit}\ndelta = {delta}\n"
                )
            } else {
                // The others allow the whole study.
                format!("[policy.privacy]\nepsilon = 20\ntotal_epsilon = 20\ndelta = {delta}\n")
            }
        },
    );
    // The study completes without site-d, and says so: exit status 2.
    let status = wait(&mut procs.0[4].1, Duration::from_secs(120));
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{agg_log}");
    assert!(
        agg_log.contains("study 'pima-dp' complete after 4 rounds"),
        "{agg_log}"
    );
    assert!(
        agg_log.contains("WITHOUT site 'site-d': refused the study: privacy budget"),
        "{agg_log}"
    );
    procs.0.truncate(4);
    all_succeed(d, &mut procs, Duration::from_secs(30));
    // site-d refused the study when it was announced, and the aggregator was told why.
    let refusal = agg_log
        .lines()
        .find(|l| l.contains("site-d") && l.contains("refused the study"))
        .unwrap_or_else(|| panic!("{agg_log}"));
    assert!(
        refusal.contains("privacy budget") && refusal.contains("4 rounds"),
        "{refusal}"
    );
    // It was charged nothing; the others paid for the 4 rounds released, once each.
    let d_spent = spent(d, "site-d", "pima-dp");
    assert!(
        d_spent.is_null() || d_spent["releases"] == 0,
        "site-d paid for a study it refused: {d_spent}"
    );
    for site in ["site-a", "site-b", "site-c"] {
        assert_eq!(spent(d, site, "pima-dp")["releases"], 4, "{site}");
    }
    // Its compliance log has the refusal and the reason, for the auditor.
    let report = ok(&[
        "audit",
        "report",
        "--log",
        d.join("site-d-audit.log").to_str().unwrap(),
        "--key",
        d.join("site-d-audit.key.pub").to_str().unwrap(),
    ]);
    assert!(report.contains("privacy budget"), "{report}");
    // The rounds were aggregated from the other three sites, and the model says which
    // site is missing, and why.
    let model = released(d, "pima-dp");
    assert_eq!(
        model["sites"],
        serde_json::json!(["site-a", "site-b", "site-c"])
    );
    assert_eq!(model["missing_sites"][0]["site"], "site-d", "{model}");
    assert!(
        model["missing_sites"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("privacy budget"),
        "{model}"
    );
}

fn released(d: &Path, study: &str) -> serde_json::Value {
    let path = d.join(format!("out/models/{study}/final.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_study_that_ends_early_exports_its_last_released_model_and_charges_only_what_was_released() {
    const THREE: [&str; 3] = ["site-a", "site-b", "site-c"];
    let study = |id: &str| {
        pima_study(
            id,
            &format!(
                "rounds = 60\nmin_sites = 3\nround_attempts = 2\nwait_for_sites_secs = 60\n\
                 round_timeout_secs = 5\n\
                 [study.privacy]\nclip_norm = 1.0\nnoise_multiplier = 8\n{RANGES}\n"
            ),
        )
    };
    let budget = |_: &str| "[policy.privacy]\nepsilon = 50\ntotal_epsilon = 50\n".to_string();

    // 1. The operator stops the study after its first rounds.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut procs = start(d, &THREE, &study("stopped"), budget);
    until("round 1's model", Duration::from_secs(90), || {
        d.join("out/models/stopped/round-0001.json").is_file()
    });
    let agg = d.join("aggregator.toml");
    ok(&[
        "aggregator",
        "study",
        "stop",
        "--config",
        agg.to_str().unwrap(),
        "--study",
        "stopped",
    ]);
    let status = wait(&mut procs.0[3].1, Duration::from_secs(60));
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert!(status.is_some(), "the aggregator did not stop:\n{agg_log}");
    let model = released(d, "stopped");
    let round = model["round"].as_u64().unwrap();
    assert!((2..60).contains(&round), "{model}");
    let why = model["stopped"]
        .as_str()
        .unwrap_or_else(|| panic!("{model}"));
    assert!(why.contains("stopped by the operator"), "{why}");
    // The same model as the round's own file, and every site paid for exactly the rounds
    // released.
    let round_file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join(format!("out/models/stopped/round-{round:04}.json")))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(round_file["model"], model["model"]);
    drop(procs);
    for site in THREE {
        assert_eq!(
            spent(d, site, "stopped")["releases"],
            round,
            "{site} for {round} released rounds"
        );
    }
    // model export says so too.
    let exported = d.join("exported.json");
    let said = ok(&model_export(
        &agg,
        "stopped",
        &["--out", exported.to_str().unwrap()],
    ));
    assert!(said.contains("stopped early"), "{said}");

    // 2. A site goes away mid-study: the rounds fail, the study stops with the reason, and
    // the last released model is exported.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut procs = start(d, &THREE, &study("lost"), budget);
    until("round 1's model", Duration::from_secs(90), || {
        d.join("out/models/lost/round-0001.json").is_file()
    });
    procs.0[2].1.kill().unwrap();
    let status = wait(&mut procs.0[3].1, Duration::from_secs(90));
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the aggregator must fail the study ({status:?}):\n{agg_log}"
    );
    let model = released(d, "lost");
    let round = model["round"].as_u64().unwrap();
    let why = model["stopped"]
        .as_str()
        .unwrap_or_else(|| panic!("{model}"));
    let error = agg_log
        .lines()
        .find(|l| l.contains("stopped early"))
        .unwrap_or_else(|| panic!("{agg_log}"));
    assert!(error.contains("final.json"), "{error}");
    // The message is true: whatever count it gives is below the quorum.
    for (i, _) in why.match_indices("only ") {
        let words: Vec<&str> = why[i..].split_whitespace().collect();
        if let (Some(got), Some(need)) = (
            words.get(1).and_then(|w| w.parse::<u32>().ok()),
            words.get(4).and_then(|w| w.parse::<u32>().ok()),
        ) {
            assert!(got < need, "{why}");
        }
    }
    drop(procs);
    for site in ["site-a", "site-b"] {
        // The rounds released; at most one more if the site went away after the others'
        // masked inputs had left in the round that then failed (a site cannot tell a
        // failed sum from a withheld one, so it pays).
        let paid = spent(d, site, "lost")["releases"].as_u64().unwrap();
        assert!(
            paid == round || paid == round + 1,
            "{site} paid {paid} for {round} released rounds"
        );
    }
}
