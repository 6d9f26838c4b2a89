//! Stragglers, as processes: five hospitals, two of them far slower than the round deadline
//! (one holds 1,500 times the rows of the others, one 3,000 times, so their local training
//! outlasts it). Every round still completes with the quorum, and the latency-aware
//! scheduler learns from the missed deadlines to leave the two out of later rounds.

mod procs;
use procs::{Children, MEDFED, ok};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let pki = d.join("pki");
    let p = pki.to_str().unwrap();
    ok(&["pki", "init", "--dir", p]);
    ok(&["pki", "issue", "--dir", p, "--aggregator", "localhost"]);
    let (header, rows) = procs::pima();
    let port = procs::free_udp_port();
    let mut procs = Children(Vec::new());
    for (i, (s, copies)) in SITES.iter().enumerate() {
        ok(&["pki", "issue", "--dir", p, "--site", s]);
        let mut out = format!("{header}\n");
        for _ in 0..*copies {
            for row in rows.iter().skip(i % 3).step_by(3) {
                out.push_str(row);
                out.push('\n');
            }
        }
        std::fs::write(d.join(format!("{s}.csv")), out).unwrap();
        let cfg = d.join(format!("{s}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "site = \"{s}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
                 [tls]\nca = \"pki/sites/{s}/ca.pem\"\ncert = \"pki/sites/{s}/cert.pem\"\nkey = \"pki/sites/{s}/key.pem\"\n\
                 [audit]\nlog = \"{s}-audit.log\"\nkey = \"{s}-audit.key\"\n[state]\ndir = \"{s}-state\"\n\
                 [policy.rules]\ndatasets = [\"pima\"]\ncolumns = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\", \"type\"]\nallow_without_secure_aggregation = true\n\
                 [[dataset]]\nname = \"pima\"\npath = \"{s}.csv\"\nexact_releases = [\"training\"]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join(format!("{s}.log"))).unwrap();
        procs.0.push(
            Command::new(MEDFED)
                .args(["node", "run", "--config", cfg.to_str().unwrap()])
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        );
    }
    let agg = d.join("aggregator.toml");
    std::fs::write(
        &agg,
        procs::aggregator_config(
            port,
            None,
            &["site-a", "site-b", "site-c", "site-d", "site-e"],
            r#"[[study]]
id = "pima"
dataset = "pima"
model = "logistic"
features = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
target = "type"
positive_class = "Yes"
rounds = 14
min_sites = 2
wait_for_sites_secs = 60
round_timeout_secs = 2
[study.training]
local_epochs = 40
batch_size = 16
[study.secure_aggregation]
enabled = false
[study.scheduling]
selection = "latency"
min_coverage = 0.0
"#,
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("aggregator.log")).unwrap();
    let mut aggregator = Command::new(MEDFED)
        .args(["aggregator", "run", "--config", agg.to_str().unwrap()])
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = aggregator.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the study did not finish");
        std::thread::sleep(Duration::from_millis(100));
    };
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
