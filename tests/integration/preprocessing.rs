//! A model trained from hospitals' ingest pipelines with categories and missing values
//! applies to the raw file as it is: Mayo Clinic's PBC trial (examples/data/pbc.csv: text
//! `sex`, categorical `edema`, `NA`s in `chol` and `platelet`) across three sites, each
//! cleaning its extract in an ingest pipeline that one-hot encodes `sex`. The study declares
//! the categories and imputes the federation's means (`[study.preprocess]`); the exported
//! model carries that recipe, so `medfed model evaluate` and `medfed model predict` read the
//! raw held-out rows with no transformation by hand.

use std::path::Path;

use medfed::csv_text;
use std::time::Duration;

use crate::common::{
    Processes, all_succeed, free_udp_port, log, medfed, ok, pki, spawn_aggregator, spawn_node,
};

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];

fn pbc() -> (String, Vec<String>) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pbc.csv"),
    )
    .unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    (header, lines.map(str::to_string).collect())
}

fn node_config(site: &str, port: u16) -> String {
    let numbers: String = ["age", "bili", "chol", "albumin", "platelet"]
        .iter()
        .map(|f| format!("[[ingest.field]]\nname = \"{f}\"\n"))
        .collect();
    format!(
        "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         [tls]\nca = \"pki/sites/{site}/ca.pem\"\ncert = \"pki/sites/{site}/cert.pem\"\nkey = \"pki/sites/{site}/key.pem\"\n\
         [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
         [policy.rules]\ndatasets = [\"pbc\"]\n\
         columns = [\"age\", \"sex\", \"edema\", \"bili\", \"chol\", \"albumin\", \"platelet\", \"status\"]\n\
         [reconnect]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n\
         [[dataset]]\nname = \"pbc\"\ningest = \"extract\"\nexact_releases = [\"training\"]\n\
         [[ingest]]\nstream = \"extract\"\ncsv = \"{site}.csv\"\ncolumns = [\"bili\"]\n{numbers}\
         [[ingest.field]]\nname = \"sex\"\ncategories = [\"f\", \"m\"]\n\
         [[ingest.field]]\nname = \"edema\"\ncategories = [\"0\", \"0.5\", \"1\"]\n\
         [[ingest.field]]\nname = \"status\"\ncategories = [\"0\", \"1\", \"2\"]\n\
         [[ingest.one_hot]]\ncolumn = \"sex\"\ncategories = [\"f\", \"m\"]\n"
    )
}

const STUDY: &str = "[[study]]\nid = \"pbc-death\"\ndataset = \"pbc\"\nmodel = \"logistic\"\n\
    features = [\"age\", \"sex\", \"edema\", \"bili\", \"chol\", \"albumin\", \"platelet\"]\n\
    target = \"status\"\npositive_class = \"2\"\nrounds = 20\nmin_sites = 3\nwait_for_sites_secs = 60\n\
    [study.preprocess]\ncategorical = { sex = [\"f\", \"m\"], edema = [\"0\", \"0.5\", \"1\"] }\n\
    impute = { chol = \"mean\", platelet = \"mean\" }\n";

#[test]
fn a_model_from_pipelines_with_categories_and_gaps_scores_the_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &SITES);
    let (header, rows) = pbc();
    // Every 5th row is held out; the others are dealt to the sites in turn.
    let holdout: Vec<&String> = rows.iter().step_by(5).collect();
    let rest: Vec<&String> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 != 0)
        .map(|(_, r)| r)
        .collect();
    let port = free_udp_port();
    for (s, site) in SITES.iter().enumerate() {
        let part: Vec<&str> = rest.iter().skip(s).step_by(3).map(|r| r.as_str()).collect();
        std::fs::write(
            d.join(format!("{site}.csv")),
            format!("{header}\n{}\n", part.join("\n")),
        )
        .unwrap();
        std::fs::write(d.join(format!("{site}.toml")), node_config(site, port)).unwrap();
    }
    let held = d.join("holdout.csv");
    let held_text: Vec<&str> = holdout.iter().map(|r| r.as_str()).collect();
    std::fs::write(&held, format!("{header}\n{}\n", held_text.join("\n"))).unwrap();
    std::fs::write(
        d.join("aggregator.toml"),
        crate::common::aggregator_config(port, Some("out"), &SITES, STUDY),
    )
    .unwrap();
    let mut procs = Processes(vec![spawn_aggregator(
        d,
        "aggregator",
        &d.join("aggregator.toml"),
    )]);
    for site in SITES {
        procs
            .0
            .push(spawn_node(d, site, &d.join(format!("{site}.toml"))));
    }
    all_succeed(d, &mut procs, Duration::from_secs(180));
    let agg_log = log(d, "aggregator");
    assert!(
        agg_log.contains("study 'pbc-death' complete after 20 rounds"),
        "{agg_log}"
    );

    // The model carries its recipe: the categories' inputs and the federation's means.
    let final_model = d.join("out/models/pbc-death/final.json");
    let model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&final_model).unwrap()).unwrap();
    assert_eq!(model["format"], "medfed-model/2");
    let features: Vec<&str> = model["model"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(
        features,
        [
            "age",
            "sex_f",
            "sex_m",
            "edema_0",
            "edema_0.5",
            "edema_1",
            "bili",
            "chol",
            "albumin",
            "platelet"
        ]
    );
    let imputed = |column: &str| {
        model["model"]["recipe"]["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|i| {
                (i["numeric"]["column"] == column).then(|| i["numeric"]["impute"].as_f64())
            })
            .flatten()
    };
    // The federation's mean of the present values of the sites' training rows: near the
    // whole trial's (chol: 369.5 over 284 patients; platelet: 257.0 over 407).
    let chol = imputed("chol").unwrap();
    let platelet = imputed("platelet").unwrap();
    assert!((chol - 369.5).abs() < 25.0, "chol imputed with {chol}");
    assert!(
        (platelet - 257.0).abs() < 15.0,
        "platelet imputed with {platelet}"
    );
    assert_eq!(imputed("age"), None);

    // Evaluated on the raw held-out rows, text categories and NAs as they are.
    let json = ok(&[
        "model",
        "evaluate",
        "--model",
        final_model.to_str().unwrap(),
        "--data",
        held.to_str().unwrap(),
        "--target",
        "status",
        "--json",
    ]);
    let metrics: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        metrics["rows"].as_u64(),
        Some(holdout.len() as u64),
        "{metrics}"
    );
    let auc = metrics["roc_auc"].as_f64().unwrap();
    eprintln!("held-out AUC {auc:.4}; imputed chol {chol:.1}, platelet {platelet:.1}");
    assert!(auc > 0.75, "held-out AUC {auc}");
    let sex = csv_text::fields(&header)
        .iter()
        .position(|c| c == "sex")
        .unwrap();
    let held_fields: Vec<Vec<String>> = holdout.iter().map(|r| csv_text::fields(r)).collect();
    assert!(
        held_fields.iter().any(|f| f.iter().any(|v| v == "NA"))
            && held_fields.iter().any(|f| f[sex] == "m"),
        "the held-out rows have gaps and both sexes"
    );

    // Scored row by row; a row the recipe cannot read says why, the others are scored.
    let mut with_bad = std::fs::read_to_string(&held).unwrap();
    with_bad.push_str(&csv_text::with_field(holdout[0], sex, "x"));
    with_bad.push('\n');
    let bad = d.join("with-bad.csv");
    std::fs::write(&bad, with_bad).unwrap();
    let scores_path = d.join("scores.csv");
    let said = medfed(&[
        "model",
        "predict",
        "--model",
        final_model.to_str().unwrap(),
        "--data",
        bad.to_str().unwrap(),
        "--id-column",
        "id",
        "--out",
        scores_path.to_str().unwrap(),
    ]);
    assert!(said.status.success(), "{said:?}");
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains(&format!(
            "scored {} of {}",
            holdout.len(),
            holdout.len() + 1
        )),
        "{stderr}"
    );
    assert!(stderr.contains("1 rows could not be scored"), "{stderr}");
    let scores = std::fs::read_to_string(&scores_path).unwrap();
    let mut lines = scores.lines();
    assert_eq!(lines.next(), Some("id,p_2,error"));
    let body: Vec<&str> = lines.collect();
    assert_eq!(body.len(), holdout.len() + 1);
    for line in &body[..holdout.len()] {
        let f = csv_text::fields(line);
        let p: f64 = f[1].parse().unwrap();
        assert!((0.0..=1.0).contains(&p) && f[2].is_empty(), "{line}");
    }
    let last = body[holdout.len()];
    assert!(
        last.contains("'sex'") && last.contains("not one of the study's categories"),
        "{last}"
    );
}
