//! Stragglers, as processes: five hospitals, two of them far slower than the round deadline
//! (one holds 1,500 times the rows of the others, one 3,000 times, so their local training
//! outlasts it). Every round still completes with the quorum, and the latency-aware
//! scheduler learns from the missed deadlines to leave the two out of later rounds.

use std::time::Duration;

use crate::common::{ALLOW_PLAIN, Federation, Rows, SERVE_PIMA, pima_study, wait};

const SITES: [(&str, usize); 5] = [
    ("site-a", 1),
    ("site-b", 1),
    ("site-c", 1500),
    ("site-d", 3000),
    ("site-e", 1),
];

#[test]
fn slow_sites_miss_deadlines_and_the_scheduler_leaves_them_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Each site holds a third of the rows, the slow ones many times over.
    let fed = Federation::new(d)
        .sites(&SITES.map(|(s, _)| s))
        .rows(Rows::Every(3))
        .copies(|i| SITES[i].1)
        .node_extra(|_| format!("{SERVE_PIMA}{ALLOW_PLAIN}"))
        .out_dir(None)
        .aggregator(&pima_study(
            "pima",
            "rounds = 14\nmin_sites = 2\nwait_for_sites_secs = 60\nround_timeout_secs = 2\n\
             [study.training]\nlocal_epochs = 40\nbatch_size = 16\n\
             [study.secure_aggregation]\nenabled = false\n\
             [study.scheduling]\nselection = \"latency\"\nmin_coverage = 0.0\n",
        ))
        .write();
    let mut procs = fed.start();
    let status =
        wait(&mut procs.0[5].1, Duration::from_secs(300)).expect("the study did not finish");
    let log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    // The slow sites' updates are in no round: the study completes, and says it is without
    // them (exit status 2).
    assert_eq!(status.code(), Some(2), "{log}");
    for s in ["site-c", "site-d"] {
        assert!(
            log.contains(&format!(
                "WITHOUT site '{s}': accepted the study, but its update is in no round"
            )),
            "{log}"
        );
    }
    let sites_of = |round: u32| -> Vec<String> {
        let text = std::fs::read_to_string(
            d.join(format!("aggregator-out/models/pima/round-{round:04}.json")),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let slow = ["site-c", "site-d"];
    // Round 1 invited everyone; the two slow sites missed the deadline, and the round went
    // on with the quorum (a fast site may miss it too on a loaded machine).
    for round in [1, 14] {
        let sites = sites_of(round);
        assert!(
            sites.len() >= 2 && sites.iter().all(|s| !slow.contains(&s.as_str())),
            "round {round}: {sites:?}\n{log}"
        );
    }
    // The slow sites stopped training at the deadline instead of finishing for nobody.
    for s in slow {
        let node_log = std::fs::read_to_string(d.join(format!("{s}.log"))).unwrap();
        assert!(
            node_log.contains("local training stopped")
                && node_log.contains("the round's deadline passed"),
            "{s}:\n{node_log}"
        );
    }
    // Later rounds do not invite them at all.
    assert!(
        log.contains("invited 3 of 5 sites (left out: site-c, site-d)"),
        "{log}"
    );
}
