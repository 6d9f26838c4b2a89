//! Statistics studies over real QUIC, as processes: a released query's file, and the
//! differencing protection of each site that opts in to exact statistics: a second exact
//! query whose cohort differs from the first by one patient is declined by the site holding
//! that patient, so it cannot be answered.
//! Also runs the `federated_statistics` example, whose released values must lie within
//! their stated error of the exact ones.

use std::process::Command;
use std::time::Duration;

use crate::common::{Federation, example, wait};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

const COLUMN: &str =
    "[[statistics.column]]\nname = \"glu\"\nlow = 40\nhigh = 200\nedges = [40, 100, 140, 200]\n";

#[test]
fn a_query_one_patient_away_from_an_answered_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The second cohort leaves out the one patient with glucose 195 (at one site).
    let fed = Federation::new(d)
        .sites(&SITES)
        // These sites opt in to exact statistics: differencing protection is for them.
        .dataset("exact_releases = [\"statistics\"]\n")
        .aggregator(&format!(
            r#"[[statistics]]
id = "all"
dataset = "pima"
exact = true
min_sites = 3
{COLUMN}
[[statistics]]
id = "all-but-one"
dataset = "pima"
exact = true
cohort = [{{ column = "glu", op = "!=", value = 195 }}]
min_sites = 3
timeout_secs = 10
{COLUMN}"#
        ))
        .write();
    // Exact queries are served only once each site's operator approved each one.
    fed.approve_exact_queries();
    let mut procs = fed.start_aggregator_first();
    let status = wait(&mut procs.0[0].1, Duration::from_secs(120));
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second query must fail:\n{agg_log}"
    );

    // The first query was released, with the pooled count.
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/statistics/all.json")).unwrap())
            .unwrap();
    assert_eq!(all["release"]["count"]["value"], 200.0, "{all}");
    assert_eq!(all["sites"].as_array().unwrap().len(), 3);
    // The second was not. The site holding the patient declined in words that do not
    // depend on its data; the reason is in its own log only.
    assert!(!d.join("out/statistics/all-but-one.json").exists());
    assert!(
        agg_log.contains("this site's policy does not serve this query"),
        "{agg_log}"
    );
    assert!(!agg_log.contains("differencing"), "{agg_log}");
    let holder = SITES
        .iter()
        .find(|s| {
            std::fs::read_to_string(d.join(format!("{s}.csv")))
                .unwrap()
                .lines()
                .any(|l| medfed::csv_text::fields(l).get(1).map(String::as_str) == Some("195"))
        })
        .unwrap();
    let log = std::fs::read_to_string(d.join(format!("{holder}.log"))).unwrap();
    assert!(
        log.contains(
            "differencing protection: its cohort differs from that of query 'all' by 1 patient(s)"
        ),
        "{log}"
    );
}

#[test]
fn the_statistics_example_releases_values_within_their_stated_error() {
    let path = example("federated_statistics");
    let out = Command::new(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every released value lies within its stated error"),
        "{stdout}"
    );
    assert!(
        stdout.contains("suppressed"),
        "small cells are suppressed: {stdout}"
    );
}
