//! The promise to a hospital, tested end to end over real QUIC: no patient record and no
//! identifier ever leaves it.
//!
//! Three hospitals hold extracts with synthetic names, MRNs, SSNs, e-mail addresses, phone
//! numbers, birth dates and full ZIP codes beside the Pima clinical values. They ingest
//! them through the de-identification pipeline and train a model with the aggregator over
//! several rounds. Then every byte each node sent (captured before encryption), every log
//! line of every process, every compliance log and every file the aggregator wrote is
//! searched for each identifier, in several encodings: there must be no hit. Each
//! pipeline also scores every record with a deployed model (`[[ingest.score]]`): no score
//! may be found either, as a double or as text.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{
    Processes, aggregator_config, all_succeed, free_udp_port, ok, pima, pima_study, pki, spawn_with,
};

const SITES: [&str; 3] = ["hospital-a", "hospital-b", "hospital-c"];

/// One synthetic patient's identifiers; each is unique to the patient.
fn identifiers(site: usize, i: usize) -> [String; 7] {
    let n = site * 1000 + i;
    [
        format!("Quentavia Brisbanewicz{n}"),
        format!("MRN-{:07}", 4_410_000 + n),
        format!("9{:02}-{:02}-{:04}", 10 + n % 80, 10 + n % 89, 1000 + n),
        format!("q.brisbanewicz{n}@canary-hospital.example"),
        format!("(617) 555-{:04}", 1000 + n),
        format!("19{:02}-{:02}-{:02}", 30 + n % 60, 1 + n % 12, 1 + n % 28),
        format!("0{:04}-{:04}", 2100 + n % 800, 1000 + n),
    ]
}

/// Writes each hospital's extract: the Pima rows plus identifier columns.
fn extracts(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    let (header, rows) = pima();
    let mut canaries = Vec::new();
    let mut files = Vec::new();
    for (s, chunk) in rows.chunks(rows.len().div_ceil(3)).enumerate() {
        let mut out = format!("name,mrn,ssn,email,phone,birth_date,zip,{header}\n");
        for (i, row) in chunk.iter().enumerate() {
            let ids = identifiers(s, i);
            out += &format!(
                "\"{}\",{},{},{},{},{},{},{row}\n",
                ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], ids[6]
            );
            canaries.extend(ids);
        }
        let p = dir.join(format!("{}.csv", SITES[s]));
        std::fs::write(&p, out).unwrap();
        files.push(p);
    }
    (files, canaries)
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..=c.len() {
            s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
        }
    }
    s
}

/// A canary and its common encodings, as byte strings to search for.
fn encodings(canary: &str) -> Vec<Vec<u8>> {
    let mut v = vec![
        canary.as_bytes().to_vec(),
        canary.to_lowercase().into_bytes(),
        canary.to_uppercase().into_bytes(),
        medfed_protocol::hex::encode(canary.as_bytes()).into_bytes(),
        canary.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        canary.replace('@', "%40").replace(' ', "%20").into_bytes(),
        serde_json::to_string(canary).unwrap().into_bytes(),
    ];
    // Base64 at each of the three alignments (the middle of a longer encoded string).
    for skip in 0..3 {
        let enc = base64(&[&b"xx"[..skip], canary.as_bytes()].concat());
        let start = (skip * 4).div_ceil(3) + 1;
        v.push(enc.as_bytes()[start..enc.len().saturating_sub(4)].to_vec());
    }
    // A name's parts on their own.
    for part in canary.split(' ').filter(|p| p.len() >= 8) {
        v.push(part.as_bytes().to_vec());
    }
    v
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn no_identifier_leaves_a_hospital() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &SITES);
    let (data, canaries) = extracts(d);
    assert_eq!(canaries.len(), 7 * 200);
    let (model, sha256) = crate::scoring::pima_model(d);
    let port = free_udp_port();
    std::fs::write(
        d.join("aggregator.toml"),
        aggregator_config(
            port,
            Some("agg/out"),
            &SITES,
            &format!(
                "[audit]\nlog = \"agg/audit/compliance.log\"\nkey = \"agg/audit/signing.key\"\n\
                 capture_sent = \"agg/sent.bin\"\n{}",
                pima_study(
                    "pima",
                    "rounds = 4\nmin_sites = 3\nwait_for_sites_secs = 60\nround_timeout_secs = 30\n"
                )
            ),
        ),
    )
    .unwrap();
    let mut nodes = Vec::new();
    for (site, csv) in SITES.iter().zip(&data) {
        let node_dir = d.join(site);
        ok(&[
            "node",
            "init",
            "--dir",
            node_dir.to_str().unwrap(),
            "--site",
            site,
        ]);
        let cfg = node_dir.join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                r#"site = "{site}"
[aggregator]
address = "127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca = "../pki/sites/{site}/ca.pem"
cert = "../pki/sites/{site}/cert.pem"
key = "../pki/sites/{site}/key.pem"
[audit]
capture_sent = "sent.bin"
[policy.rules]
datasets = ["pima"]
columns = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age", "type"]
[[dataset]]
name = "pima"
ingest = "extract"
exact_releases = ["training"]
[reconnect]
initial_backoff_ms = 100
max_backoff_ms = 1000
[[ingest]]
stream = "extract"
csv = {csv:?}
columns = ["glu", "bmi", "age"]
[[ingest.field]]
name = "mrn"
class = "patient-id"
[[ingest.field]]
name = "name"
class = "identifier"
[[ingest.field]]
name = "ssn"
class = "identifier"
[[ingest.field]]
name = "email"
class = "identifier"
[[ingest.field]]
name = "phone"
class = "identifier"
[[ingest.field]]
name = "birth_date"
class = "birth-date"
quasi_identifier = true
[[ingest.field]]
name = "zip"
class = "zip"
quasi_identifier = true
[[ingest.field]]
name = "npreg"
[[ingest.field]]
name = "glu"
[[ingest.field]]
name = "bp"
[[ingest.field]]
name = "skin"
[[ingest.field]]
name = "bmi"
[[ingest.field]]
name = "ped"
[[ingest.field]]
name = "age"
class = "age"
[[ingest.field]]
name = "type"
categories = ["Yes", "No"]
[[ingest.alert]]
column = "glu"
above = 180
[[ingest.score]]
model = {model:?}
sha256 = "{sha256}"
output = "risk"
alert_above = 0.8
"#
            ),
        )
        .unwrap();
        nodes.push(cfg);
    }

    // The study trains on what the pipeline kept: ingest first.
    for cfg in &nodes {
        ok(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    }
    let mut procs = Processes(Vec::new());
    for (site, cfg) in SITES.iter().zip(&nodes) {
        procs.0.push(spawn_with(
            d,
            site,
            &["node", "run", "--config", cfg.to_str().unwrap()],
            &[("MEDFED_LOG", "debug")],
        ));
    }
    let agg_cfg = d.join("aggregator.toml");
    procs.0.push(spawn_with(
        d,
        "aggregator",
        &["aggregator", "run", "--config", agg_cfg.to_str().unwrap()],
        &[("MEDFED_LOG", "debug")],
    ));
    all_succeed(d, &mut procs, Duration::from_secs(120));
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert!(
        agg_log.contains("study 'pima' complete after 4 rounds"),
        "{agg_log}"
    );

    // The pipeline ran inside each node and kept pseudonymized records: the test is not
    // vacuous about the identifiers having been read.
    let report = ok(&[
        "node",
        "privacy-report",
        "--config",
        nodes[0].to_str().unwrap(),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report[0]["report"]["records"], 67, "{report}");
    // And the study trained on those records, not on the extract.
    let log = std::fs::read_to_string(d.join("hospital-a.log")).unwrap();
    assert!(
        log.contains(r#""rows":67,"pipeline":"extract""#),
        "the dataset is the pipeline's 67 records:\n{log}"
    );
    let round: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("agg/out/models/pima/round-0001.json")).unwrap(),
    )
    .unwrap();
    let rows = round["training_rows"].as_u64().unwrap();
    assert!(
        rows > 100 && rows < 200,
        "three sites' ingested records, less validation: {round}"
    );

    // What to search: every byte each party sent, every log, every aggregator file.
    let mut scanned = vec![d.join("aggregator.log")];
    for site in SITES {
        scanned.push(d.join(format!("{site}.log")));
        scanned.push(d.join(site).join("sent.bin"));
        scanned.push(d.join(site).join("audit/compliance.log"));
    }
    files_under(&d.join("agg"), &mut scanned);
    let mut sent_bytes = 0;
    for site in SITES {
        let sent = std::fs::metadata(d.join(site).join("sent.bin"))
            .unwrap()
            .len();
        assert!(sent > 1000, "{site} captured only {sent} bytes");
        sent_bytes += sent;
    }
    let mut needles: Vec<(String, Vec<u8>)> = canaries
        .iter()
        .flat_map(|c| encodings(c).into_iter().map(move |e| (c.clone(), e)))
        .collect();
    // Every score the pipelines kept, as the double it is and as text.
    let mut scores = 0;
    for cfg in &nodes {
        let cfg = medfed_node::config::NodeConfig::load(cfg).unwrap();
        let store = medfed_node::ingest::open_store(&cfg.state).unwrap();
        for r in medfed_node::ingest::kept_records(&cfg.ingests[0], &*store).unwrap() {
            let p = r.number("risk").expect("every kept record is scored");
            scores += 1;
            needles.push((format!("score {p}"), p.to_le_bytes().to_vec()));
            needles.push((format!("score {p}"), p.to_string().into_bytes()));
        }
    }
    assert_eq!(scores, 200);
    let searcher = aho_corasick::AhoCorasick::new(needles.iter().map(|(_, n)| n)).unwrap();
    let mut hits = Vec::new();
    let mut scanned_bytes = 0;
    for file in &scanned {
        let bytes = std::fs::read(file).unwrap();
        scanned_bytes += bytes.len();
        for m in searcher.find_overlapping_iter(&bytes) {
            hits.push(format!(
                "{}: {}",
                file.display(),
                needles[m.pattern().as_usize()].0
            ));
        }
    }
    assert!(
        hits.is_empty(),
        "identifiers left a hospital:\n{}",
        hits.join("\n")
    );
    // The scan finds what it looks for: every identifier is found in the extracts.
    let mut found = std::collections::BTreeSet::new();
    for file in &data {
        let bytes = std::fs::read(file).unwrap();
        for m in searcher.find_overlapping_iter(&bytes) {
            found.insert(needles[m.pattern().as_usize()].0.clone());
        }
    }
    assert_eq!(
        found.iter().filter(|f| !f.starts_with("score ")).count(),
        canaries
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    eprintln!(
        "scanned {} files ({scanned_bytes} bytes; {sent_bytes} bytes sent by the nodes) for {} identifiers in {} encodings: no hit",
        scanned.len(),
        canaries.len(),
        needles.len()
    );
}
