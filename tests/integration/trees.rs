//! Gradient-boosted trees across three hospitals over real QUIC with secure aggregation:
//! the Wisconsin breast cancer rows split in three (tests/fixtures/breast_cancer, made by
//! scripts/trees_reference.py). The model's held-out ROC AUC, by `medfed model evaluate` on
//! the raw held-out file, is within 0.01 of scikit-learn's HistGradientBoostingClassifier
//! trained on the pooled rows with the same trees, depth, bins and learning rate; the model
//! file is in the aggregator's compliance log, and `medfed model predict` scores with it.

use std::path::Path;
use std::time::Duration;

use crate::common::{all_succeed, audit_report, fixture_federation, ok};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/breast_cancer")
        .join(name)
}

fn node_config(site: &str, port: u16, columns: &[String]) -> String {
    format!(
        "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         [tls]\nca = \"pki/sites/{site}/ca.pem\"\ncert = \"pki/sites/{site}/cert.pem\"\nkey = \"pki/sites/{site}/key.pem\"\n\
         [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
         [policy.rules]\ndatasets = [\"wdbc\"]\ncolumns = {columns:?}\n\
         [reconnect]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\
         [[dataset]]\nname = \"wdbc\"\npath = \"{site}.csv\"\nexact_releases = [\"statistics\"]\n"
    )
}

/// The features' `{ name, low, high }` as a TOML array's items.
fn bounds(features: &[&serde_json::Value]) -> String {
    let items: Vec<String> = features
        .iter()
        .map(|f| {
            format!(
                "{{ name = {:?}, low = {}, high = {} }}",
                f["name"].as_str().unwrap(),
                f["low"],
                f["high"]
            )
        })
        .collect();
    items.join(", ")
}

#[test]
fn federated_boosted_trees_match_a_centralized_histogram_gbdt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let features: Vec<&serde_json::Value> =
        reference["features"].as_array().unwrap().iter().collect();
    let mut columns: Vec<String> = features
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    columns.push("diagnosis".into());
    let s = &reference["settings"];
    let bounds = bounds(&features);
    let study = format!(
        "[[statistics]]\nid = \"wdbc-trees\"\ndataset = \"wdbc\"\nexact = true\nmin_sites = 3\nwait_for_sites_secs = 60\n\
         [statistics.boosted_trees]\ntarget = \"diagnosis\"\npositive_class = \"malignant\"\n\
         trees = {}\ndepth = {}\nlearning_rate = {}\nmax_bins = {}\nl2 = {}\nmin_child_samples = {}\n\
         features = [{}]\n",
        s["trees"],
        s["depth"],
        s["learning_rate"],
        s["max_bins"],
        s["l2"],
        s["min_child_samples"],
        bounds
    );
    let mut procs = fixture_federation(
        d,
        &SITES,
        "breast_cancer",
        |site, port| node_config(site, port, &columns),
        &study,
    );
    all_succeed(d, &mut procs, Duration::from_secs(300));

    let model = d.join("out/models/wdbc-trees/final.json");
    let holdout = fixture("holdout.csv");
    let out = ok(&[
        "model",
        "evaluate",
        "--model",
        model.to_str().unwrap(),
        "--data",
        holdout.to_str().unwrap(),
        "--target",
        "diagnosis",
        "--json",
    ]);
    let metrics: serde_json::Value = serde_json::from_str(&out).unwrap();
    let auc = metrics["roc_auc"]
        .as_f64()
        .unwrap_or_else(|| panic!("{metrics}"));
    let want = reference["holdout_auc"].as_f64().unwrap();
    assert!(
        (auc - want).abs() <= 0.01,
        "federated AUC {auc}, scikit-learn {want}"
    );
    eprintln!("held-out AUC: federated {auc:.4}, scikit-learn {want:.4}");

    // The release: the model file and the statistics file, both in the compliance log.
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/statistics/wdbc-trees.json")).unwrap(),
    )
    .unwrap();
    let trees = &stats["release"]["trees"];
    assert_eq!(trees["trees"], s["trees"]);
    let per_site = trees["entries_per_site"].as_u64().unwrap();
    eprintln!(
        "each site sent {per_site} numbers in {} steps: {} bytes per tree as 64-bit fixed point",
        trees["steps"],
        per_site * 8 / s["trees"].as_u64().unwrap()
    );
    let report = audit_report(
        &d.join("audit/compliance.log"),
        &d.join("audit/signing.key.pub"),
    );
    assert_eq!(report["studies"]["wdbc-trees"]["released"], 2, "{report}");
    // Each site logged every step as an exact release.
    let site = audit_report(&d.join("site-a-audit.log"), &d.join("site-a-audit.key.pub"));
    assert!(site["studies"]["wdbc-trees"].is_object(), "{site}");

    // And it scores the raw file, row by row.
    let scores = d.join("scores.csv");
    ok(&[
        "model",
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--data",
        holdout.to_str().unwrap(),
        "--out",
        scores.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&scores).unwrap();
    assert_eq!(
        text.lines().count(),
        173,
        "{}",
        &text[..text.len().min(300)]
    );
}

/// Differential privacy on the histograms, for hospitals that release nothing exact (the
/// default policy): every step is charged to each hospital's budget before it leaves, the
/// model states what it cost, and that equals each hospital's own ledger.
#[test]
fn boosted_trees_with_differential_privacy_charge_every_level() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap();
    let chosen = [
        "worst_radius",
        "worst_concave_points",
        "mean_texture",
        "worst_smoothness",
    ];
    let features: Vec<&serde_json::Value> = reference["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| chosen.contains(&f["name"].as_str().unwrap()))
        .collect();
    let mut columns: Vec<String> = chosen.iter().map(|c| c.to_string()).collect();
    columns.push("diagnosis".into());
    let bounds = bounds(&features);
    // 1 + 3 trees × 2 levels = 7 Gaussian releases at z = 4: ε ≈ 3.7 at δ = 10⁻⁶, within a
    // hospital's default 5 per study.
    let study = format!(
        "[[statistics]]\nid = \"wdbc-dp-trees\"\ndataset = \"wdbc\"\nnoise_multiplier = 4\nmin_sites = 3\n\
         wait_for_sites_secs = 60\n[statistics.boosted_trees]\ntarget = \"diagnosis\"\npositive_class = \"malignant\"\n\
         trees = 3\ndepth = 2\nlearning_rate = 0.3\nmax_bins = 8\nfeatures = [{bounds}]\n"
    );
    // The default policy: no exact releases.
    let default_policy = |site: &str, port| {
        node_config(site, port, &columns).replace("exact_releases = [\"statistics\"]\n", "")
    };
    let mut procs = fixture_federation(d, &SITES, "breast_cancer", default_policy, &study);
    all_succeed(d, &mut procs, Duration::from_secs(300));

    let model: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/models/wdbc-dp-trees/final.json")).unwrap(),
    )
    .unwrap();
    let privacy = &model["provenance"]["privacy"];
    assert_eq!(privacy["mechanism"], "gaussian-histograms", "{model}");
    assert_eq!(privacy["rounds"], 7);
    let epsilon = privacy["epsilon"].as_f64().unwrap();
    assert!(epsilon > 1.0 && epsilon < 5.0, "{epsilon}");
    // No training loss leaves under differential privacy.
    assert!(model["train_loss"].is_null(), "{model}");
    for site in SITES {
        let spent = crate::common::spent(d, site, "wdbc-dp-trees");
        let charged = spent["epsilon"]
            .as_f64()
            .unwrap_or_else(|| panic!("{site}: {spent}"));
        assert!(
            (charged - epsilon).abs() < 1e-6,
            "{site}: ledger {charged}, model {epsilon}"
        );
    }
    // The model reads the raw held-out file like any other.
    let holdout = fixture("holdout.csv");
    let out = ok(&[
        "model",
        "evaluate",
        "--model",
        d.join("out/models/wdbc-dp-trees/final.json")
            .to_str()
            .unwrap(),
        "--data",
        holdout.to_str().unwrap(),
        "--target",
        "diagnosis",
        "--json",
    ]);
    let metrics: serde_json::Value = serde_json::from_str(&out).unwrap();
    let auc = metrics["roc_auc"].as_f64().unwrap();
    eprintln!("held-out AUC of the DP boosted trees (ε = {epsilon:.2}): {auc:.4}");
    assert!(auc.is_finite());
}
