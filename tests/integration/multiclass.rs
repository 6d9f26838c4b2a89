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
    node_config_with(site, port, "exact_releases = [\"training\"]\n", "")
}

/// [`node_config`] with the dataset's own keys `dataset` and `[policy]` keys `policy`.
fn node_config_with(site: &str, port: u16, dataset: &str, policy: &str) -> String {
    format!(
        "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         [tls]\nca = \"pki/sites/{site}/ca.pem\"\ncert = \"pki/sites/{site}/cert.pem\"\nkey = \"pki/sites/{site}/key.pem\"\n\
         [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
         [[dataset]]\nname = \"diabetes\"\npath = \"{site}.csv\"\n{dataset}\
         [policy]\nmin_cell = 5\n{policy}[policy.rules]\ndatasets = [\"diabetes\"]\nmodels = [\"multinomial\"]\n\
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
    federate_with(d, studies, node_config);
}

/// [`federate`] with the node configs `config(site, port)` makes.
fn federate_with(d: &Path, studies: &str, config: impl Fn(&str, u16) -> String) {
    pki(d, &SITES);
    let port = free_udp_port();
    for site in SITES {
        std::fs::copy(
            fixtures().join(format!("{site}.csv")),
            d.join(format!("{site}.csv")),
        )
        .unwrap();
        std::fs::write(d.join(format!("{site}.toml")), config(site, port)).unwrap();
    }
    std::fs::write(d.join("aggregator.toml"), aggregator_config(port, studies)).unwrap();
    let mut procs = Processes(
        SITES
            .iter()
            .map(|s| spawn_node(d, s, &d.join(format!("{s}.toml"))))
            .collect(),
    );
    procs.0.push(spawn_aggregator(
        d,
        "aggregator",
        &d.join("aggregator.toml"),
    ));
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
    assert_eq!(
        exported["classes"],
        serde_json::json!(["Normal", "Chemical_Diabetic", "Overt_Diabetic"])
    );
    assert_eq!(
        exported["model"]["weights"].as_array().unwrap().len(),
        3 * 6
    );
    // The federation's own validation figures are per class too.
    assert_eq!(exported["validation"]["task"], "multiclass");
    // Its provenance: the hash the sites approved, and the secure aggregation of 3 sites.
    let config =
        medfed_aggregator::config::AggregatorConfig::load(&d.join("aggregator.toml")).unwrap();
    assert_eq!(
        exported["provenance"]["study_sha256"],
        medfed_node::policy::study_hash(&config.studies[0].announcement())
    );
    assert_eq!(exported["provenance"]["secure_aggregation"]["threshold"], 3);
    assert!(exported["provenance"]["privacy"].is_null());

    let holdout = fixtures().join("holdout.csv");
    let federated = evaluate_json(&final_model, &holdout);
    assert_eq!(federated["task"], "multiclass");
    assert_eq!(federated["rows"], 44);
    let fed_auc = federated["macro_auc"].as_f64().unwrap();

    // scikit-learn's multinomial logistic regression on the same rows pooled.
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap())
            .unwrap();
    let sklearn_auc = reference["macro_auc"].as_f64().unwrap();
    assert!(
        (fed_auc - sklearn_auc).abs() <= 0.02,
        "federated macro AUC {fed_auc} vs scikit-learn's {sklearn_auc}"
    );

    // medfed's trainer on the pooled rows: the same objective, in one place.
    let cfg = &config.studies[0];
    let announcement = cfg.announcement();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for site in SITES {
        let table = Table::load(&fixtures().join(format!("{site}.csv"))).unwrap();
        let data = StudyData::prepare(&table, &announcement).unwrap();
        xs.push(ndarray::concatenate![
            ndarray::Axis(0),
            data.x_train,
            data.x_val
        ]);
        ys.push(ndarray::concatenate![
            ndarray::Axis(0),
            data.y_train,
            data.y_val
        ]);
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
    assert_eq!(
        x.nrows(),
        reference["training_rows"].as_u64().unwrap() as usize
    );
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
    let plots = d.join("plots");
    let said = ok(&[
        "model",
        "evaluate",
        "--model",
        final_model.to_str().unwrap(),
        "--data",
        holdout.to_str().unwrap(),
        "--target",
        "group",
        "--plots",
        plots.to_str().unwrap(),
    ]);
    assert!(said.contains("confusion.svg"), "{said}");
    let roc = std::fs::read_to_string(plots.join("roc.svg")).unwrap();
    let confusion = std::fs::read_to_string(plots.join("confusion.svg")).unwrap();
    for class in ["Normal", "Chemical_Diabetic", "Overt_Diabetic"] {
        assert!(roc.contains(class) && confusion.contains(class), "{class}");
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

/// Under differential privacy (DP-SGD, the sites' default policy: nothing exact) and secure
/// aggregation, a multinomial study trains like a binary one: each site charges every round
/// to its budget, the model carries its classes, no federated evaluation is released, and
/// the noisy model still tells the groups apart on the held-out rows.
#[test]
fn a_three_class_model_trains_under_differential_privacy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rounds = 8;
    federate_with(
        d,
        &study(
            "groups-dp",
            "[study.privacy]\nmechanism = \"dp-sgd\"\nclip_norm = 1.0\nnoise_multiplier = 1.0\n\
             sampling_rate = 0.3\nlocal_steps = 10\nlot_size = 8\n\
             feature_ranges = [[0.6, 1.3], [60, 400], [200, 1600], [0, 800], [0, 500]]\n",
        )
        .replace("rounds = 30", &format!("rounds = {rounds}")),
        |site, port| {
            node_config_with(
                site,
                port,
                "",
                "[policy.privacy]\nepsilon = 100\ntotal_epsilon = 100\n",
            )
        },
    );
    let agg_log = log(d, "aggregator");
    assert!(
        agg_log.contains(&format!("study 'groups-dp' complete after {rounds} rounds")),
        "{agg_log}"
    );
    let final_model = d.join("out/models/groups-dp/final.json");
    let exported: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&final_model).unwrap()).unwrap();
    assert_eq!(exported["classes"].as_array().unwrap().len(), 3);
    assert!(exported["validation"].is_null(), "{exported}");
    assert_eq!(exported["provenance"]["privacy"]["mechanism"], "dp-sgd");
    assert_eq!(exported["provenance"]["privacy"]["rounds"], rounds);
    for site in SITES {
        let spent = crate::common::spent(d, site, "groups-dp");
        // DP-SGD charges each noisy local step; the model's provenance states the same ε
        // (the sites' default δ).
        assert_eq!(spent["dp_sgd_steps"], rounds * 10, "{site}: {spent}");
        let stated = exported["provenance"]["privacy"]["epsilon"]
            .as_f64()
            .unwrap();
        let charged = spent["epsilon"].as_f64().unwrap();
        assert!((stated - charged).abs() < 1e-9, "{stated} vs {charged}");
    }
    let metrics = evaluate_json(&final_model, &fixtures().join("holdout.csv"));
    let auc = metrics["macro_auc"].as_f64().unwrap();
    eprintln!("differentially private three-class model: held-out macro AUC {auc:.4}");
    assert!(auc > 0.75, "{metrics}");
}
