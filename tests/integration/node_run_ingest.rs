//! `medfed node run` with an ingestion pipeline: the node serves the pipeline's dataset
//! only once the pipeline has caught up with its input. It used to connect at once, and a
//! study that started while the pipeline was still reading trained on part of the extract
//! (or without the site), and finished with exit status 0.

use std::time::Duration;

use crate::common::{
    Processes, RECONNECT_FAST, SERVE_PIMA, aggregator_config, all_succeed, free_udp_port, pima,
    pima_study, pki, spawn_aggregator, spawn_node,
};

const SITES: [&str; 2] = ["site-a", "site-b"];
/// Rows per site: enough that reading them takes longer than a study takes to start.
const ROWS: usize = 40_000;

#[test]
fn a_node_serves_an_ingested_dataset_once_its_pipeline_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &SITES);
    let (header, rows) = pima();
    let port = free_udp_port();
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
                 {SERVE_PIMA}{RECONNECT_FAST}\
                 [[dataset]]\nname = \"pima\"\ningest = \"extract\"\nexact_releases = [\"training\"]\n\
                 [[ingest]]\nstream = \"extract\"\ncsv = \"{site}.csv\"\ncolumns = [\"glu\"]\ncommit_every = 1000\n{fields}\
                 [[ingest.field]]\nname = \"type\"\ncategories = [\"Yes\", \"No\"]\n"
            ),
        )
        .unwrap();
    }
    std::fs::write(
        d.join("aggregator.toml"),
        aggregator_config(
            port,
            Some("out"),
            &SITES,
            &pima_study(
                "pima",
                "rounds = 1\nmin_sites = 2\nwait_for_sites_secs = 120\nround_timeout_secs = 60\n",
            ),
        ),
    )
    .unwrap();
    // Everything at once, as an operator starting the services would.
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
