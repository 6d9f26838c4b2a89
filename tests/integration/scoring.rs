//! `[[ingest.score]]`: an approved model scores every record inside the hospital's
//! pipeline. Scores are kept with the records and alerts go to the alerts stream, exactly
//! once across SIGKILLs like everything else the pipeline commits; a changed model file is
//! refused; no study reads a score (and `canary.rs` searches everything a node sent for
//! them).

use std::path::{Path, PathBuf};
use std::process::Command;

use medfed_node::config::NodeConfig;
use medfed_node::data::Table;
use medfed_node::deid::{Record, Value};
use medfed_protocol::export::{ExportedModel, MODEL_FORMAT};
use medfed_protocol::model::{GlobalModel, ModelKind, TrainParams, train_local};
use medfed_protocol::preprocess::{ImputeRule, Preprocess};
use medfed_protocol::stats::FeatureStats;

use crate::common::{MEDFED, ok, pima, pima_csv, pki};

/// The Pima features a scoring model reads.
pub const FEATURES: [&str; 7] = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"];

/// Trains a logistic model of Pima's `type` on `pima_tr.csv` (as one site would: the
/// recipe imputes a missing skinfold with the mean), writes it as an exported model to
/// `dir/model.json`, and returns its path and SHA-256.
pub fn pima_model(dir: &Path) -> (PathBuf, String) {
    let table = Table::load(&pima_csv()).unwrap();
    let features: Vec<String> = FEATURES.iter().map(|f| f.to_string()).collect();
    let pre = Preprocess {
        categorical: Default::default(),
        impute: [("skin".to_string(), ImputeRule::Mean)].into(),
    };
    let mut recipe = pre.recipe(&features);
    let x = table.inputs(&recipe, true).unwrap();
    let y = table
        .target("type", ModelKind::Logistic, Some("Yes"), &[])
        .unwrap();
    let stats = FeatureStats::from_rows(x.view());
    let standardization = stats.standardization().unwrap();
    recipe.resolve_means(&standardization.mean);
    let mut z = x.clone();
    standardization.apply(&mut z);
    let params = TrainParams {
        local_epochs: 50,
        ..TrainParams::default()
    };
    let mut model = GlobalModel::zeros(ModelKind::Logistic, recipe.features(), standardization);
    model.weights = train_local(
        ModelKind::Logistic,
        &model.weights,
        z.view(),
        y.view(),
        &params,
    )
    .unwrap();
    model.recipe = recipe;
    let exported = ExportedModel {
        format: MODEL_FORMAT.into(),
        study_id: "pima-risk".into(),
        round: 20,
        target: "type".into(),
        positive_class: Some("Yes".into()),
        classes: Vec::new(),
        model,
        sites: vec!["a".into(), "b".into()],
        training_rows: 200,
        train_loss: f64::NAN,
        validation: None,
        missing_sites: Vec::new(),
        stopped: None,
        created_unix: 0,
        provenance: None,
        trees: None,
    };
    exported.validate().unwrap();
    let path = dir.join("model.json");
    let bytes = serde_json::to_vec_pretty(&exported).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    (path, medfed_protocol::audit::sha256_hex(&bytes))
}

/// The `[[ingest.field]]`s and `[[ingest.score]]` of a pipeline over Pima rows.
pub fn score_tables(model: &Path, sha256: &str) -> String {
    let fields: String = FEATURES
        .iter()
        .map(|f| format!("[[ingest.field]]\nname = \"{f}\"\n"))
        .collect();
    format!(
        "{fields}[[ingest.field]]\nname = \"type\"\ncategories = [\"Yes\", \"No\"]\n\
         [[ingest.score]]\nmodel = {model:?}\nsha256 = \"{sha256}\"\noutput = \"risk\"\nalert_above = 0.7\n"
    )
}

fn node_toml(d: &Path, rows: &Path, model: &Path, sha256: &str) -> PathBuf {
    let cfg = d.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:4433\"\n\
             [tls]\nca = \"pki/sites/alpha/ca.pem\"\ncert = \"pki/sites/alpha/cert.pem\"\nkey = \"pki/sites/alpha/key.pem\"\n\
             [[dataset]]\nname = \"pima\"\ningest = \"extract\"\n\
             [[ingest]]\nstream = \"extract\"\ncsv = {rows:?}\ncolumns = [\"glu\"]\ncommit_every = 500\n{}",
            score_tables(model, sha256)
        ),
    )
    .unwrap();
    cfg
}

/// The pipeline's kept records and its alerts, read from the node's store.
fn kept_and_alerts(cfg: &Path) -> (Vec<Record>, Vec<Record>) {
    let cfg = NodeConfig::load(cfg).unwrap();
    let store = medfed_node::ingest::open_store(&cfg.state).unwrap();
    let ing = &cfg.ingests[0];
    let kept = medfed_node::ingest::kept_records(ing, &*store).unwrap();
    let alerts = medfed_node::ingest::alerts(ing, &*store).unwrap();
    (kept, alerts)
}

#[test]
fn scores_and_alerts_are_kept_exactly_once_across_kills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha"]);
    let (model, sha) = pima_model(d);
    // 300 copies of the 200 Pima rows, one with its skinfold missing (imputed by the model).
    let (header, rows) = pima();
    let copies = 300;
    let mut csv = format!("{header}\n");
    for c in 0..copies {
        for (i, r) in rows.iter().enumerate() {
            if c == 0 && i == 0 {
                csv.push_str(&medfed::csv_text::with_field(r, 3, "NA"));
            } else {
                csv.push_str(r);
            }
            csv.push('\n');
        }
    }
    let rows_path = d.join("rows.csv");
    std::fs::write(&rows_path, &csv).unwrap();
    let cfg = node_toml(d, &rows_path, &model, &sha);
    let ingest = || {
        let mut c = Command::new(MEDFED);
        c.args(["node", "ingest", "--config", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // After each kill: every kept record has its one score, and the alerts are exactly the
    // kept records scoring above 0.7, once each.
    let check = || {
        let (kept, alerts) = kept_and_alerts(&cfg);
        let above = kept
            .iter()
            .filter(|r| r.number("risk").is_some_and(|p| p > 0.7))
            .count();
        assert!(
            kept.iter().all(|r| r.number("risk").is_some()),
            "a record without its score"
        );
        assert_eq!(alerts.len(), above, "alerts do not match the kept scores");
        kept.len() as u64
    };
    let counts = crate::common::kill_50_times(ingest, 7, 20..150, check);
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert!(ingest().status().unwrap().success());
    let (kept, alerts) = kept_and_alerts(&cfg);
    assert_eq!(kept.len(), rows.len() * copies);

    // Each score is the model's own prediction on the raw row (the missing skinfold imputed).
    let exported: ExportedModel =
        serde_json::from_str(&std::fs::read_to_string(&model).unwrap()).unwrap();
    let table = Table::load(&rows_path).unwrap();
    let x = table
        .inputs(&exported.model.preprocessing(), false)
        .unwrap();
    let p = exported.model.predict_raw(x.view()).unwrap();
    for (i, r) in kept.iter().enumerate() {
        let score = r.number("risk").unwrap();
        assert!((score - p[i]).abs() < 1e-9, "row {i}: {score} vs {}", p[i]);
    }
    let want = p.iter().filter(|p| **p > 0.7).count();
    assert_eq!(alerts.len(), want);
    assert!(want > 0 && want < kept.len());
    let text = match alerts[0].get("alert") {
        Some(Value::Text(t)) => t.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(
        text.starts_with("risk = ") && text.contains("study 'pima-risk' round 20"),
        "{text}"
    );
    let summary = counts
        .iter()
        .filter(|c| **c > 0 && **c < kept.len() as u64)
        .count();
    assert!(summary > 0, "no kill landed mid-stream: {counts:?}");
}

#[test]
fn a_model_file_changed_since_its_approval_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha"]);
    let (model, sha) = pima_model(d);
    let cfg = node_toml(d, &pima_csv(), &model, &sha);
    // The approved file scores; an edited one stops the pipeline before any record.
    let text = std::fs::read_to_string(&model).unwrap();
    std::fs::write(&model, text.replacen("\"round\": 20", "\"round\": 21", 1)).unwrap();
    let out = crate::common::medfed(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not the approved") && err.contains(&sha),
        "{err}"
    );
    std::fs::write(&model, text).unwrap();
    ok(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
}

/// `medfed model predict` on a FHIR export scores each patient as on the same rows in a
/// CSV file: the Pima FHIR export holds `pima_tr.csv`'s 200 rows.
#[test]
fn a_fhir_export_is_scored_as_its_csv() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, _) = pima_model(d);
    let mapping = d.join("mapping.toml");
    std::fs::write(
        &mapping,
        r#"features = [
  { column = "npreg", system = "http://loinc.org", code = "11996-6" },
  { column = "glu", system = "http://loinc.org", code = "2345-7" },
  { column = "bp", system = "http://loinc.org", code = "8462-4" },
  { column = "skin", system = "urn:medfed:example", code = "triceps-skinfold" },
  { column = "bmi", system = "http://loinc.org", code = "39156-5" },
  { column = "ped", system = "urn:medfed:example", code = "diabetes-pedigree" },
  { column = "age", system = "http://loinc.org", code = "30525-0" },
]
"#,
    )
    .unwrap();
    let fhir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_fhir");
    let (m, f) = (model.to_str().unwrap(), fhir.to_str().unwrap());
    let from_fhir = ok(&[
        "model",
        "predict",
        "--model",
        m,
        "--fhir",
        f,
        "--fhir-mapping",
        mapping.to_str().unwrap(),
    ]);
    let csv = pima_csv();
    let from_csv = ok(&[
        "model",
        "predict",
        "--model",
        m,
        "--data",
        csv.to_str().unwrap(),
    ]);
    let scores = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .map(|l| medfed::csv_text::fields(l)[1].clone())
            .collect()
    };
    assert!(
        from_fhir.starts_with("patient,p_Yes,error\npima-0001,"),
        "{from_fhir}"
    );
    assert_eq!(scores(&from_fhir).len(), 200);
    assert_eq!(scores(&from_fhir), scores(&from_csv));
    // The options say what is missing.
    let out = crate::common::medfed(&["model", "predict", "--model", m, "--fhir", f]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fhir-mapping"));
}
