//! End to end, across processes: the real `medfed` binary as one aggregator and three
//! hospital nodes, with a PKI and configs made by the binary's own commands.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MEDFED: &str = env!("CARGO_BIN_EXE_medfed");
const SITES: [&str; 3] = ["hospital-a", "hospital-b", "hospital-c"];

/// Child processes that are killed if the test ends before they exit.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn medfed(args: &[&str]) -> Output {
    Command::new(MEDFED)
        .args(args)
        .output()
        .expect("run medfed")
}

fn ok(args: &[&str]) -> String {
    let out = medfed(args);
    assert!(
        out.status.success(),
        "medfed {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> (String, Child) {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(MEDFED)
        .args(args)
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn medfed");
    (name.to_string(), child)
}

fn wait(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Splits the Pima rows into three files of consecutive rows.
fn split_data(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_tr.csv"),
    )
    .unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let rows: Vec<&str> = lines.collect();
    rows.chunks(rows.len().div_ceil(3))
        .zip(SITES)
        .map(|(chunk, site)| {
            let p = dir.join(format!("{site}.csv"));
            std::fs::write(&p, format!("{header}\n{}\n", chunk.join("\n"))).unwrap();
            p
        })
        .collect()
}

#[test]
fn aggregator_and_three_nodes_as_processes_train_and_export_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = d.join("pki");
    let pki_s = pki.to_str().unwrap();
    assert!(ok(&["pki", "init", "--dir", pki_s]).contains("consortium CA created"));
    ok(&["pki", "issue", "--dir", pki_s, "--aggregator", "localhost"]);
    for site in SITES {
        ok(&["pki", "issue", "--dir", pki_s, "--site", site]);
    }
    let data = split_data(d);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        d.join("aggregator.toml"),
        format!(
            r#"listen = "127.0.0.1:{port}"
out_dir = "out"
[tls]
ca = "pki/aggregator/localhost/ca.pem"
cert = "pki/aggregator/localhost/cert.pem"
key = "pki/aggregator/localhost/key.pem"
[sites]
allow = ["hospital-a", "hospital-b", "hospital-c"]
[[study]]
id = "pima"
dataset = "pima"
model = "logistic"
features = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
target = "type"
positive_class = "Yes"
rounds = 5
min_sites = 3
wait_for_sites_secs = 60
round_timeout_secs = 30
"#
        ),
    )
    .unwrap();
    for (site, csv) in SITES.iter().zip(&data) {
        std::fs::write(
            d.join(format!("{site}.toml")),
            format!(
                r#"site = "{site}"
[aggregator]
address = "127.0.0.1:{port}"
server_name = "localhost"
[tls]
ca = "pki/sites/{site}/ca.pem"
cert = "pki/sites/{site}/cert.pem"
key = "pki/sites/{site}/key.pem"
[[dataset]]
name = "pima"
path = {csv:?}
[reconnect]
initial_backoff_ms = 100
max_backoff_ms = 1000
"#
            ),
        )
        .unwrap();
    }

    // Nodes first: they retry until the aggregator is up.
    let mut procs = Processes(Vec::new());
    for site in SITES {
        let cfg = d.join(format!("{site}.toml"));
        procs.0.push(spawn(
            d,
            site,
            &["node", "run", "--config", cfg.to_str().unwrap()],
        ));
    }
    let agg_cfg = d.join("aggregator.toml");
    procs.0.push(spawn(
        d,
        "aggregator",
        &["aggregator", "run", "--config", agg_cfg.to_str().unwrap()],
    ));

    for (name, child) in &mut procs.0 {
        let status = wait(child, Duration::from_secs(120));
        let log = std::fs::read_to_string(d.join(format!("{name}.log"))).unwrap_or_default();
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} did not finish cleanly ({status:?}):\n{log}"
        );
    }
    let agg_log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    assert!(
        agg_log.contains("study 'pima' complete after 5 rounds"),
        "{agg_log}"
    );
    let node_log = std::fs::read_to_string(d.join("hospital-a.log")).unwrap();
    assert!(
        node_log.contains("the aggregator completed all studies"),
        "{node_log}"
    );

    // Every round's model is exported, and the final one evaluates on the full data.
    let models = d.join("out/models/pima");
    for round in 1..=5 {
        assert!(
            models.join(format!("round-{round:04}.json")).is_file(),
            "round {round} not exported"
        );
    }
    let final_model = models.join("final.json");
    let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_tr.csv");
    let json = ok(&[
        "model",
        "evaluate",
        "--model",
        final_model.to_str().unwrap(),
        "--data",
        all.to_str().unwrap(),
        "--target",
        "type",
        "--json",
    ]);
    let metrics: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(metrics["task"], "classification");
    assert_eq!(metrics["rows"], 200);
    let auc = metrics["roc_auc"].as_f64().unwrap();
    assert!(auc > 0.8, "AUC {auc}");
    let table = ok(&[
        "model",
        "evaluate",
        "--model",
        final_model.to_str().unwrap(),
        "--data",
        all.to_str().unwrap(),
        "--target",
        "type",
    ]);
    assert!(
        table.contains("AUC") && table.contains("sensitivity"),
        "{table}"
    );
}

#[test]
fn demo_runs_and_keeps_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let stdout = ok(&["demo", "--out", out.to_str().unwrap(), "--rounds", "4"]);
    assert!(stdout.contains("round  sites  train loss"), "{stdout}");
    assert!(
        stdout.contains("federated") && stdout.contains("centralized"),
        "{stdout}"
    );
    let final_model = out.join("aggregator/models/pima-diabetes/final.json");
    assert!(
        stdout.contains(&format!("final global model: {}", final_model.display())),
        "{stdout}"
    );
    for kept in [
        "pki/ca/ca.pem",
        "aggregator.toml",
        "nodes/riverside.toml",
        "data/validation.csv",
        "logs/medfed.log",
    ] {
        assert!(out.join(kept).is_file(), "{kept} not kept");
    }
    // A second run into the same directory refuses rather than mixing runs.
    let again = medfed(&["demo", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));
}
