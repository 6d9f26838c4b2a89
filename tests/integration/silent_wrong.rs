//! Results that used to be silently wrong (issue 14), over real QUIC with real processes:
//! a study whose positive class no site has, or whose target has a single class, stops
//! before round 1 and names the classes the sites have; `model evaluate` refuses a
//! positive class the data does not have; a statistics query reports the rows it left out
//! for missing values.

use std::path::Path;
use std::time::Duration;

use medfed::csv_text;

use crate::common::{
    ALLOW_PLAIN, Federation, MEDFED, Processes, RECONNECT_FAST, SERVE_PIMA, WrittenFederation,
    medfed, model_evaluate, ok, wait,
};

const SITES: [&str; 2] = ["site-a", "site-b"];

/// The PKI, each site's half of the Pima rows (`edit` applied to each row, with its index)
/// and its config.
fn federation(d: &Path, edit: impl Fn(usize, &str) -> String + 'static) -> Federation {
    Federation::new(d).sites(&SITES).edit_rows(edit)
}

/// Runs the aggregator with `studies` against both sites; its exit status and log.
fn run(fed: &WrittenFederation, studies: &str) -> (bool, String) {
    fed.write_aggregator(studies);
    let mut procs = fed.start();
    let status = wait(&mut procs.0[2].1, Duration::from_secs(90));
    let log = fed.log("aggregator");
    assert!(status.is_some(), "the aggregator did not finish:\n{log}");
    (status.unwrap().success(), log)
}

fn study(id: &str, positive: &str, privacy: bool) -> String {
    let dp = if privacy {
        "[study.privacy]\nclip_norm = 1.0\nnoise_multiplier = 4.0\n\
         feature_ranges = [[0, 17], [0, 200], [0, 122], [0, 99], [0, 67], [0, 2.5], [21, 81]]\n"
    } else {
        ""
    };
    format!(
        "[[study]]\nid = \"{id}\"\ndataset = \"pima\"\nmodel = \"logistic\"\n\
         features = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\"]\n\
         target = \"type\"\npositive_class = \"{positive}\"\nrounds = 3\nmin_sites = 2\n\
         wait_for_sites_secs = 60\nround_timeout_secs = 30\n{dp}"
    )
}

#[test]
fn a_positive_class_no_site_has_stops_the_study_before_round_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fed = federation(d, |_, r| r.to_string()).write();
    // The data says "Yes"; the study asks for "yes". Under differential privacy (the
    // default) and without.
    for (id, private) in [("dp-yes", true), ("exact-yes", false)] {
        let (ok, log) = run(&fed, &study(id, "yes", private));
        assert!(!ok, "the study must fail:\n{log}");
        assert!(
            log.contains(r#"positive_class = "yes" is not a class of target 'type'"#),
            "{log}"
        );
        assert!(
            log.contains(r#"the classes they name: "No", "Yes""#),
            "{log}"
        );
        assert!(log.contains(r#"fix: positive_class = "Yes""#), "{log}");
        // Before round 1: no model, and no site trained.
        assert!(!d.join(format!("out/models/{id}/round-0001.json")).exists());
        for site in SITES {
            let node = std::fs::read_to_string(d.join(format!("{site}.log"))).unwrap();
            assert!(!node.contains("local update ready"), "{site}:\n{node}");
        }
    }

    // `model evaluate` on the same mistake: an error naming the classes, not accuracy 1.000.
    let (ok, log) = run(&fed, &study("right", "Yes", false));
    assert!(ok, "{log}");
    let model = d.join("out/models/right/final.json");
    let site_a = d.join("site-a.csv");
    let out = medfed(&model_evaluate(
        &model,
        &site_a,
        &["--positive-class", "yes"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains(r#"the positive class "yes" is not a value of column 'type'"#)
            && err.contains(r#"did you mean "Yes"?"#),
        "{err}"
    );
}

#[test]
fn a_single_class_target_stops_the_study_before_round_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every row's outcome is "Yes".
    let fed = federation(d, |_, r| {
        let mut f = csv_text::fields(r);
        *f.last_mut().unwrap() = "Yes".into();
        csv_text::line(&f)
    })
    .write();
    let (ok, log) = run(&fed, &study("one-class", "Yes", true));
    assert!(!ok, "{log}");
    assert!(
        log.contains("target 'type' has a single class at the 2 accepting sites"),
        "{log}"
    );
    assert!(!d.join("out/models/one-class/round-0001.json").exists());
}

#[test]
fn a_statistics_query_reports_the_rows_it_left_out_for_missing_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // glu empty in every 4th row (50 of 200), bmi "NA" in every 5th from the 2nd (40);
    // 10 rows lack both: 80 left out.
    let fed = federation(d, |i, r| {
        let mut f = csv_text::fields(r);
        if i % 4 == 0 {
            f[1] = String::new();
        }
        if i % 5 == 1 {
            f[4] = "NA".into();
        }
        csv_text::line(&f)
    })
    .write();
    let query = "[[statistics]]\nid = \"gaps\"\ndataset = \"pima\"\nmin_sites = 2\n\
                 wait_for_sites_secs = 60\ntimeout_secs = 20\n\
                 [[statistics.column]]\nname = \"glu\"\nlow = 40\nhigh = 200\nedges = [40, 100, 140, 200]\n\
                 [[statistics.column]]\nname = \"bmi\"\nlow = 15\nhigh = 70\nedges = [15, 25, 30, 35, 40, 70]\n";
    let (ok, log) = run(&fed, query);
    assert!(ok, "{log}");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/statistics/gaps.json")).unwrap())
            .unwrap();
    let release = &file["release"];
    // Differentially private (the default): noisy counts, each within its stated error.
    assert!(
        release["privacy"]["epsilon"].as_f64().is_some(),
        "{release}"
    );
    let within = |r: &serde_json::Value, exact: f64| {
        let (v, e) = (r["value"].as_f64().unwrap(), r["error"].as_f64().unwrap());
        assert!((v - exact).abs() <= e, "{v} ± {e}, exact {exact}");
    };
    within(&release["count"], 120.0);
    let out = &release["left_out"];
    within(&out["rows"], 80.0);
    assert_eq!(out["columns"][0][0], "glu");
    within(&out["columns"][0][1], 50.0);
    assert_eq!(out["columns"][1][0], "bmi");
    within(&out["columns"][1][1], 40.0);
    // The operator is told; each site's own log has its exact counts (the even rows are
    // site-a's: all 50 without glu, 20 without bmi, 10 of them without both).
    assert!(
        log.contains("rows left out of the statistics for a missing or non-numeric value"),
        "{log}"
    );
    let site_a = std::fs::read_to_string(d.join("site-a.log")).unwrap();
    assert!(
        site_a.contains(
            "60 of the cohort's rows are left out for a missing or non-numeric value (glu: 50, bmi: 20)"
        ),
        "{site_a}"
    );
}

/// A training study one site cannot serve (its extract has empty cells, and the study is
/// exact, so the site refuses it) completes on the other site, and says so: the model
/// names the missing site and why, and `aggregator run` exits with status 2.
#[test]
fn a_study_that_lost_a_site_says_so_in_its_result_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // One site left: no secure aggregation (a sum of one is that site's update), which the
    // sites allow for this test.
    let studies = study("exact", "Yes", false).replace("min_sites = 2", "min_sites = 1")
        + "[study.secure_aggregation]\nenabled = false\n";
    // site-b's rows (the odd ones) lack glu every 7th row.
    let fed = federation(d, |i, r| {
        if i % 2 == 1 && i % 7 == 0 {
            csv_text::with_field(r, 1, "")
        } else {
            r.to_string()
        }
    })
    .node_extra(|_| format!("{SERVE_PIMA}{ALLOW_PLAIN}{RECONNECT_FAST}"))
    .aggregator(&studies)
    .write();
    let _nodes = Processes(fed.spawn_nodes());
    // The aggregator waits for both allowed sites before it announces the study.
    let out = std::process::Command::new(MEDFED)
        .args([
            "aggregator",
            "run",
            "--config",
            fed.aggregator.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("WITHOUT site 'site-b': refused the study:"),
        "{stdout}"
    );
    assert!(
        stderr.contains("completed on fewer sites than allowed"),
        "{stderr}"
    );
    let model: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/models/exact/final.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(model["sites"], serde_json::json!(["site-a"]));
    let missing = &model["missing_sites"][0];
    assert_eq!(missing["site"], "site-b", "{model}");
    assert!(
        missing["reason"].as_str().unwrap().contains("glu"),
        "the reason names the column: {missing}"
    );
    // `model evaluate` says so too.
    let said = ok(&model_evaluate(
        &d.join("out/models/exact/final.json"),
        &d.join("site-a.csv"),
        &[],
    ));
    assert!(
        said.contains("the model is without site 'site-b'"),
        "{said}"
    );
}
