//! The aggregator's operations endpoint, as a process: `/healthz`, `/status` (and `medfed
//! aggregator status`), and `/metrics`, which parses as Prometheus text exposition format
//! and counts the rounds of a study as it runs.

use std::time::{Duration, Instant};

use crate::common::{Federation, Processes, SERVE_PIMA, ok, pima_study};

const SITES: [&str; 2] = ["site-a", "site-b"];

pub(crate) fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    Some(r)
}

pub(crate) fn body(reply: &str) -> &str {
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
    let fed = Federation::new(d)
        .sites(&SITES)
        .node_extra(|_| SERVE_PIMA.to_string())
        .out_dir(None)
        .ops()
        .aggregator(&pima_study(
            "pima",
            "rounds = 40\nmin_sites = 2\nwait_for_sites_secs = 60\n",
        ))
        .write();
    let ops = fed.ops.clone().unwrap();
    let mut procs = Processes(vec![fed.spawn_aggregator()]);
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

    procs.0.extend(fed.spawn_nodes());
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
