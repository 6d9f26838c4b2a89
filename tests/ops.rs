//! The aggregator's operations endpoint, as a process: `/healthz`, `/status` (and `medfed
//! aggregator status`), and `/metrics`, which parses as Prometheus text exposition format
//! and counts the rounds of a study as it runs.

mod procs;
use procs::{Children, MEDFED, ok};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SITES: [&str; 2] = ["site-a", "site-b"];

fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    Some(r)
}

fn body(reply: &str) -> &str {
    reply.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn the_operations_endpoint_reports_a_running_study() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    procs::pki(d, &SITES);
    let (header, rows) = procs::pima();
    for (i, s) in SITES.iter().enumerate() {
        let part: Vec<String> = rows.iter().skip(i).step_by(2).cloned().collect();
        std::fs::write(
            d.join(format!("{s}.csv")),
            format!("{header}\n{}\n", part.join("\n")),
        )
        .unwrap();
    }
    let udp = procs::free_udp_port();
    let ops = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    std::fs::write(
        d.join("aggregator.toml"),
        format!(
            r#"listen = "127.0.0.1:{udp}"
[ops]
listen = "{ops}"
[tls]
ca = "pki/aggregator/localhost/ca.pem"
cert = "pki/aggregator/localhost/cert.pem"
key = "pki/aggregator/localhost/key.pem"
[sites]
allow = ["site-a", "site-b"]
[[study]]
id = "pima"
dataset = "pima"
model = "logistic"
features = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
target = "type"
positive_class = "Yes"
rounds = 40
min_sites = 2
wait_for_sites_secs = 60
"#
        ),
    )
    .unwrap();
    let agg_cfg = d.join("aggregator.toml");
    let mut procs = Children(vec![
        Command::new(MEDFED)
            .args(["aggregator", "run", "--config", agg_cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        if let Some(r) = get(&ops, "/healthz") {
            break r;
        }
        assert!(Instant::now() < deadline, "no /healthz at {ops}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        health.starts_with("HTTP/1.1 200") && body(&health) == "ok\n",
        "{health}"
    );
    // Before any site connects: the study waits.
    let status: serde_json::Value =
        serde_json::from_str(body(&get(&ops, "/status").unwrap())).unwrap();
    assert_eq!(status["studies"]["pima"]["state"], "waiting", "{status}");
    assert_eq!(status["sites_connected"].as_array().unwrap().len(), 0);
    let metrics = get(&ops, "/metrics").unwrap();
    assert!(
        metrics.contains("Content-Type: text/plain; version=0.0.4"),
        "{metrics}"
    );
    assert_eq!(metric(body(&metrics), "medfed_sites_connected"), Some(0.0));
    assert!(get(&ops, "/nope").unwrap().starts_with("HTTP/1.1 404"));

    for s in SITES {
        let cfg = d.join(format!("{s}.toml"));
        std::fs::write(
            &cfg,
            procs::node_config(s, udp, &format!("{s}.csv"), procs::SERVE_PIMA),
        )
        .unwrap();
        procs.0.push(
            Command::new(MEDFED)
                .args(["node", "run", "--config", cfg.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    // While the study runs: rounds are counted, traffic grows, the status table renders.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_running = false;
    // Until the aggregator finishes and exits.
    while let Some(reply) = get(&ops, "/metrics") {
        let m = body(&reply);
        let rounds = metric(m, "medfed_study_rounds_completed_total").unwrap_or(0.0);
        if rounds >= 1.0 {
            assert!(metric(m, "medfed_bytes_sent_total").unwrap() > 0.0);
            assert_eq!(metric(m, "medfed_sites_connected"), Some(2.0));
            let table = ok(&["aggregator", "status", "--address", &ops]);
            assert!(
                table.contains("pima") && table.contains("training"),
                "{table}"
            );
            assert!(table.contains("site-a, site-b"), "{table}");
            seen_running = true;
            break;
        }
        assert!(Instant::now() < deadline, "no round completed:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen_running, "the study ended before a scrape saw it run");
}
