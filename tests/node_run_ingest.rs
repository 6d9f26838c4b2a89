//! `medfed node run` with an ingestion pipeline: the node serves the pipeline's dataset
//! only once the pipeline has caught up with its input. It used to connect at once, and a
//! study that started while the pipeline was still reading trained on part of the extract
//! (or without the site), and finished with exit status 0.

mod procs;
use procs::{Processes, all_succeed, spawn};

use std::time::Duration;

const SITES: [&str; 2] = ["site-a", "site-b"];
/// Rows per site: enough that reading them takes longer than a study takes to start.
const ROWS: usize = 40_000;

#[test]
fn a_node_serves_an_ingested_dataset_once_its_pipeline_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    procs::pki(d, &SITES);
    let (header, rows) = procs::pima();
    let port = procs::free_udp_port();
    for site in SITES {
        let extract: Vec<&str> = rows.iter().cycle().take(ROWS).map(String::as_str).collect();
        std::fs::write(
            d.join(format!("{site}.csv")),
            format!("{header}\n{}\n", extract.join("\n")),
        )
        .unwrap();
        let fields: String = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
            .iter()
            .map(|f| format!("[[ingest.field]]\nname = \"{f}\"\n"))
            .collect();
        std::fs::write(
            d.join(format!("{site}.toml")),
            format!(
                "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
                 [tls]\nca = \"pki/sites/{site}/ca.pem\"\ncert = \"pki/sites/{site}/cert.pem\"\nkey = \"pki/sites/{site}/key.pem\"\n\
                 [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
                 {}{}\
                 [[dataset]]\nname = \"pima\"\ningest = \"extract\"\nexact_releases = [\"training\"]\n\
                 [[ingest]]\nstream = \"extract\"\ncsv = \"{site}.csv\"\ncolumns = [\"glu\"]\ncommit_every = 1000\n{fields}\
                 [[ingest.field]]\nname = \"type\"\ncategories = [\"Yes\", \"No\"]\n",
                procs::SERVE_PIMA,
                procs::RECONNECT_FAST,
            ),
        )
        .unwrap();
    }
    std::fs::write(
        d.join("aggregator.toml"),
        procs::aggregator_config(
            port,
            Some("out"),
            &SITES,
            "[[study]]\nid = \"pima\"\ndataset = \"pima\"\nmodel = \"logistic\"\n\
             features = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\"]\n\
             target = \"type\"\npositive_class = \"Yes\"\nrounds = 1\nmin_sites = 2\n\
             wait_for_sites_secs = 120\nround_timeout_secs = 60\n",
        ),
    )
    .unwrap();
    // Everything at once, as an operator starting the services would.
    let mut procs = Processes(Vec::new());
    let agg = d.join("aggregator.toml");
    procs.0.push(spawn(
        d,
        "aggregator",
        &["aggregator", "run", "--config", agg.to_str().unwrap()],
    ));
    for site in SITES {
        let cfg = d.join(format!("{site}.toml"));
        procs.0.push(spawn(
            d,
            site,
            &["node", "run", "--config", cfg.to_str().unwrap()],
        ));
    }
    all_succeed(d, &mut procs, Duration::from_secs(240));
    // The model is of every row of both extracts (less the validation rows).
    let model: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/models/pima/final.json")).unwrap(),
    )
    .unwrap();
    let per_site = medfed_node::data::split_rows(ROWS, 0.25, "pima").0.len() as u64;
    assert_eq!(
        model["training_rows"].as_u64(),
        Some(2 * per_site),
        "trained on part of the extracts: {model}"
    );
    // Each node connected only after its pipeline had caught up.
    for site in SITES {
        let log = std::fs::read_to_string(d.join(format!("{site}.log"))).unwrap();
        let caught_up = log
            .find("ingestion pipelines caught up; connecting")
            .unwrap_or_else(|| panic!("{site}:\n{log}"));
        let connected = log
            .find("connected to the aggregator")
            .unwrap_or_else(|| panic!("{site}:\n{log}"));
        assert!(caught_up < connected, "{site}:\n{log}");
    }
}
