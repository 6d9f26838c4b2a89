//! A three-class model across three sites: Reaven & Miller's diabetes groups (normal,
//! chemical, overt; examples/data/reaven_miller_diabetes.csv), split by
//! `scripts/multinomial_reference.py` into three sites and a held-out file
//! (tests/fixtures/reaven_miller/). The federated multinomial model, evaluated by
//! `medfed model evaluate` on the raw held-out rows, is compared with two centralized
//! references trained on the three sites' rows pooled: scikit-learn's multinomial
//! `LogisticRegression` (its figures committed in `reference.json`, see the script), and
//! medfed's own trainer on the pooled rows (`medfed::local::centralized_baseline`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use medfed_node::data::{StudyData, Table};
use medfed_protocol::metrics::exact_metrics;

use crate::common::{
    Processes, all_succeed, free_udp_port, log, medfed, ok, pki, spawn_aggregator, spawn_node,
};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const FEATURES: &str = r#"["relwt", "glufast", "glutest", "instest", "sspg"]"#;
const CLASSES: &str = r#"["Normal", "Chemical_Diabetic", "Overt_Diabetic"]"#;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reaven_miller")
}

/// A node config of `site`, serving its rows as dataset "diabetes" (exact training; sites
/// of ~34 rows name the classes at least 5 of their patients have).
fn node_config(site: &str, port: u16) -> String {
    format!(
        "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         [tls]\nca = \"pki/sites/{site}/ca.pem\"\ncert = \"pki/sites/{site}/cert.pem\"\nkey = \"pki/sites/{site}/key.pem\"\n\
         [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
         [[dataset]]\nname = \"diabetes\"\npath = \"{site}.csv\"\nexact_releases = [\"training\"]\n\
         [policy]\nmin_cell = 5\n[policy.rules]\ndatasets = [\"diabetes\"]\nmodels = [\"multinomial\"]\n\
         columns = [\"relwt\", \"glufast\", \"glutest\", \"instest\", \"sspg\", \"group\"]\n\
         [reconnect]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n"
    )
}

fn study(id: &str, more: &str) -> String {
    format!(
        "[[study]]\nid = \"{id}\"\ndataset = \"diabetes\"\nmodel = \"multinomial\"\n\
         features = {FEATURES}\ntarget = \"group\"\nclasses = {CLASSES}\n\
         rounds = 30\nmin_sites = 3\nwait_for_sites_secs = 60\n{more}"
    )
}

fn aggregator_config(port: u16, studies: &str) -> String {
    crate::common::aggregator_config(port, Some("out"), &SITES, studies)
}

/// Writes the PKI, the sites' extracts and configs; runs the aggregator and the nodes to
/// the end.
fn federate(d: &Path, studies: &str) {
    pki(d, &SITES);
    let port = free_udp_port();
    for site in SITES {
        std::fs::copy(fixtures().join(format!("{site}.csv")), d.join(format!("{site}.csv")))
            .unwrap();
        std::fs::write(d.join(format!("{site}.toml")), node_config(site, port)).unwrap();
    }
    std::fs::write(d.join("aggregator.toml"), aggregator_config(port, studies)).unwrap();
    let mut procs = Processes(
        SITES
            .iter()
            .map(|s| spawn_node(d, s, &d.join(format!("{s}.toml"))))
            .collect(),
    );
    procs
        .0
        .push(spawn_aggregator(d, "aggregator", &d.join("aggregator.toml")));
    all_succeed(d, &mut procs, Duration::from_secs(180));
}

fn evaluate_json(model: &Path, data: &Path) -> serde_json::Value {
    let json = ok(&[
        "model",
        "evaluate",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--target",
        "group",
        "--json",
    ]);
    serde_json::from_str(&json).unwrap()
}

#[test]
fn a_federated_three_class_model_matches_centralized_ones_on_held_out_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    federate(d, &study("groups", ""));
    let agg_log = log(d, "aggregator");
    assert!(
        agg_log.contains("study 'groups' complete after 30 rounds"),
        "{agg_log}"
    );
    let final_model = d.join("out/models/groups/final.json");
    let exported: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&final_model).unwrap()).unwrap();
    assert_eq!(exported["classes"], serde_json::json!(["Normal", "Chemical_Diabetic", "Overt_Diabetic"]));
    assert_eq!(exported["model"]["weights"].as_array().unwrap().len(), 3 * 6);
    // The federation's own validation figures are per class too.
    assert_eq!(exported["validation"]["task"], "multiclass");

    let holdout = fixtures().join("holdout.csv");
    let federated = evaluate_json(&final_model, &holdout);
    assert_eq!(federated["task"], "multiclass");
    assert_eq!(federated["rows"], 44);
    let fed_auc = federated["macro_auc"].as_f64().unwrap();

    // scikit-learn's multinomial logistic regression on the same rows pooled.
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference.json")).unwrap(),
    )
    .unwrap();
    let sklearn_auc = reference["macro_auc"].as_f64().unwrap();
    assert!(
        (fed_auc - sklearn_auc).abs() <= 0.02,
        "federated macro AUC {fed_auc} vs scikit-learn's {sklearn_auc}"
    );

    // medfed's trainer on the pooled rows: the same objective, in one place.
    let config =
        medfed_aggregator::config::AggregatorConfig::load(&d.join("aggregator.toml")).unwrap();
    let cfg = &config.studies[0];
    let announcement = cfg.announcement();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for site in SITES {
        let table = Table::load(&fixtures().join(format!("{site}.csv"))).unwrap();
        let data = StudyData::prepare(&table, &announcement).unwrap();
        xs.push(ndarray::concatenate![ndarray::Axis(0), data.x_train, data.x_val]);
        ys.push(ndarray::concatenate![ndarray::Axis(0), data.y_train, data.y_val]);
    }
    let x = ndarray::concatenate(
        ndarray::Axis(0),
        &xs.iter().map(|a| a.view()).collect::<Vec<_>>(),
    )
    .unwrap();
    let y = ndarray::concatenate(
        ndarray::Axis(0),
        &ys.iter().map(|a| a.view()).collect::<Vec<_>>(),
    )
    .unwrap();
    assert_eq!(x.nrows(), reference["training_rows"].as_u64().unwrap() as usize);
    let central = medfed::local::centralized_baseline(cfg, x.view(), y.view()).unwrap();
    let held = Table::load(&holdout).unwrap();
    let xh = held.features(&central.features).unwrap();
    let yh = held
        .target("group", central.kind, None, &cfg.classes)
        .unwrap();
    let p = central.predict_raw(xh.view()).unwrap();
    let ours = exact_metrics(central.kind, &p.to_vec(), &yh.to_vec());
    let (_, central_auc) = ours.headline();
    eprintln!(
        "macro one-vs-rest AUC on the held-out rows: federated {fed_auc:.4}, medfed centralized \
         {central_auc:.4}, scikit-learn {sklearn_auc:.4}"
    );
    assert!(
        (fed_auc - central_auc).abs() <= 0.02,
        "federated macro AUC {fed_auc} vs medfed's centralized {central_auc}"
    );
    assert!(
        (central_auc - sklearn_auc).abs() <= 0.02,
        "medfed's centralized macro AUC {central_auc} vs scikit-learn's {sklearn_auc}"
    );

    // The table a person reads: per class and the confusion matrix, by class name.
    let table = ok(&[
        "model",
        "evaluate",
        "--model",
        final_model.to_str().unwrap(),
        "--data",
        holdout.to_str().unwrap(),
        "--target",
        "group",
    ]);
    for needle in ["macro AUC", "Chemical_Diabetic", "confusion", "precision"] {
        assert!(table.contains(needle), "{needle}: {table}");
    }
    // A binary option on a multinomial model is an error, not a silently different figure.
    let wrong = medfed(&[
        "model",
        "evaluate",
        "--model",
        final_model.to_str().unwrap(),
        "--data",
        holdout.to_str().unwrap(),
        "--target",
        "group",
        "--positive-class",
        "Normal",
    ]);
    assert!(!wrong.status.success());
}
