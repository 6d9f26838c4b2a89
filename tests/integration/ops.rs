//! The aggregator's operations endpoint, as a process: `/healthz`, `/status` (and `medfed
//! aggregator status`), and `/metrics`, which parses as Prometheus text exposition format
//! and counts the rounds of a study as it runs.

use std::time::{Duration, Instant};

use crate::common::{Federation, Processes, SERVE_PIMA, ok, pima_study};

const SITES: [&str; 2] = ["site-a", "site-b"];

pub(crate) fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
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

/// Every metric family of the aggregator: (name, type, unit).
const FAMILIES: &[(&str, &str, &str)] = &[
    ("medfed_uptime_seconds", "gauge", "seconds"),
    ("medfed_sites_connected", "gauge", ""),
    ("medfed_site_connected", "gauge", ""),
    ("medfed_connections_refused", "counter", ""),
    ("medfed_disconnects", "counter", ""),
    ("medfed_sent_messages", "counter", ""),
    ("medfed_sent_bytes", "counter", "bytes"),
    ("medfed_received_messages", "counter", ""),
    ("medfed_received_bytes", "counter", "bytes"),
    ("medfed_study_round", "gauge", ""),
    ("medfed_study_rounds_planned", "gauge", ""),
    ("medfed_study_running", "gauge", ""),
    ("medfed_study_round_failures", "counter", ""),
    ("medfed_study_dropouts", "counter", ""),
    ("medfed_study_refusals", "counter", ""),
    (
        "medfed_study_round_duration_seconds",
        "histogram",
        "seconds",
    ),
    ("medfed_audit_tree_head_records", "gauge", ""),
    (
        "medfed_audit_tree_head_timestamp_seconds",
        "gauge",
        "seconds",
    ),
];

/// The family an instance with `[ha]` adds.
const HA_FAMILY: (&str, &str, &str) = ("medfed_ha_active", "gauge", "");

/// Every metric family of a running aggregator, with its type and unit: the names follow the
/// Prometheus conventions (a `medfed_` prefix, snake case, base units named as a suffix,
/// `_total` on counters only), and nothing else appears.
fn conventions(text: &str) {
    let mut types = std::collections::BTreeMap::new();
    let mut units = std::collections::BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next(), w.next()) {
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                types.insert(name.to_string(), kind.to_string());
            }
            (Some("#"), Some("UNIT"), Some(name), Some(unit)) => {
                units.insert(name.to_string(), unit.to_string());
            }
            _ => {}
        }
    }
    let want: std::collections::BTreeMap<String, String> = FAMILIES
        .iter()
        .map(|(n, t, _)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(types, want, "the metric families and their types:\n{text}");
    for (name, kind, unit) in FAMILIES {
        assert!(
            name.starts_with("medfed_")
                && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{name}"
        );
        assert_eq!(
            units.get(*name).map_or("", String::as_str),
            *unit,
            "the unit of {name}"
        );
        if !unit.is_empty() {
            assert!(
                name.ends_with(&format!("_{unit}")),
                "{name} does not end in its unit"
            );
        }
        assert!(
            !name.ends_with("_total"),
            "{name}: _total belongs to the counter's samples"
        );
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let sample_name = sample.split(['{', ' ']).next().unwrap_or("");
            if sample_name.strip_suffix("_total") == Some(*name) {
                assert_eq!(
                    *kind, "counter",
                    "{sample_name}: only counters end in _total"
                );
            }
        }
    }
    // Per-site and per-study labels, and a parser's view of the whole exposition.
    assert!(
        text.contains("medfed_sent_bytes_total{site=\"site-a\"}"),
        "{text}"
    );
    assert!(
        text.contains("medfed_study_round{study=\"pima\"}"),
        "{text}"
    );
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text");
    assert!(scrape.samples.len() > 20);
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
        metrics
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{metrics}"
    );
    assert_eq!(metric(body(&metrics), "medfed_sites_connected"), Some(0.0));
    assert!(get(&ops, "/nope").unwrap().starts_with("HTTP/1.1 404"));
    // A page of another site, rebound to this address by DNS, gets nothing.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&ops).unwrap();
        write!(
            s,
            "GET /status HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.1 421") && !r.contains("pima"), "{r}");
    }

    procs.0.extend(fed.spawn_nodes());
    // While the study runs: rounds are counted, traffic grows, the status table renders.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_running = false;
    // Until the aggregator finishes and exits.
    while let Some(reply) = get(&ops, "/metrics") {
        let m = body(&reply);
        let rounds = metric(m, "medfed_study_round").unwrap_or(0.0);
        if rounds >= 1.0 {
            assert!(metric(m, "medfed_sent_bytes_total").unwrap() > 0.0);
            conventions(m);
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
    assert!(
        seen_running,
        "the study ended before a scrape saw it run:\n{}",
        fed.log("aggregator")
    );
}

/// Off loopback the endpoint needs a token and HTTPS: without `[ops] token_file`, or
/// without `tls_cert` / `tls_key`, the aggregator does not start; with them, every
/// connection is TLS, every request but `/healthz` needs the token (Bearer, or Basic as
/// browsers send it), and `aggregator status` says how to give both.
#[test]
fn an_endpoint_off_loopback_requires_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = crate::common::free_tcp_port();
    let study = pima_study(
        "pima",
        "rounds = 1\nmin_sites = 2\nwait_for_sites_secs = 60\n",
    );
    let fed = Federation::new(d)
        .sites(&SITES)
        .node_extra(|_| SERVE_PIMA.to_string())
        .out_dir(None)
        .aggregator(&format!("{study}[ops]\nlisten = \"0.0.0.0:{port}\"\n"))
        .write();
    // The aggregator refuses to start, its error holding each of `words`.
    let refused = |words: &[&str]| {
        let (ok, out) = crate::common::run(&[
            "aggregator",
            "run",
            "--config",
            fed.aggregator.to_str().unwrap(),
        ]);
        assert!(!ok, "{out}");
        assert!(words.iter().all(|w| out.contains(w)), "{words:?}: {out}");
    };
    refused(&["ops.listen", "is not a loopback address", "token_file"]);

    let token = "3f9c1d2e8a7b6c5d4e3f2a1b";
    std::fs::write(d.join("ops.token"), format!("{token}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("ops.token"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    // A token without TLS: it would cross the network in clear.
    fed.write_aggregator(&format!(
        "{study}[ops]\nlisten = \"0.0.0.0:{port}\"\ntoken_file = \"ops.token\"\n"
    ));
    refused(&["ops.listen", "in clear", "tls_cert"]);
    // The aggregator's certificate from the consortium PKI (for localhost) serves HTTPS.
    let ca = d.join("pki/ca/ca.pem");
    fed.write_aggregator(&format!(
        "{study}[ops]\nlisten = \"0.0.0.0:{port}\"\ntoken_file = \"ops.token\"\n\
         tls_cert = \"pki/aggregator/localhost/cert.pem\"\ntls_key = \"pki/aggregator/localhost/key.pem\"\n"
    ));
    let _procs = Processes(vec![fed.spawn_aggregator()]);
    let ops = format!("127.0.0.1:{port}");
    let with = |auth: &str, path: &str| -> Option<String> {
        use std::io::{Read, Write};
        let config = medfed_infra::transport::tls_client_config(&ca).unwrap();
        let tcp = std::net::TcpStream::connect(&ops).ok()?;
        let conn = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
        )
        .ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        Some(r)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while with("", "/healthz").is_none_or(|r| !r.starts_with("HTTP/1.1 200")) {
        assert!(
            Instant::now() < deadline,
            "no /healthz over HTTPS:\n{}",
            fed.log("aggregator")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Plain HTTP gets nothing.
    assert!(
        get(&ops, "/healthz").is_none_or(|r| !r.contains("HTTP/1.1 200")),
        "plain HTTP was answered"
    );
    // One client address holds at most 8 connections: 8 silent ones (stuck in the TLS
    // handshake) leave the next unanswered, not the other clients; once they are gone,
    // it is served again.
    let silent: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&ops).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        with("", "/healthz").is_none_or(|r| !r.starts_with("HTTP/1.1 200")),
        "a ninth connection from one address was served"
    );
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while with("", "/healthz").is_none_or(|r| !r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "not served again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let with = |auth: &str, path: &str| with(auth, path).unwrap();
    for path in ["/status", "/metrics", "/", "/studies/pima"] {
        let r = with("", path);
        assert!(
            r.starts_with("HTTP/1.1 401") && r.to_lowercase().contains("www-authenticate: basic"),
            "{path}: {r}"
        );
        assert!(
            with("Authorization: Bearer wrong-token-0000000\r\n", path).starts_with("HTTP/1.1 401")
        );
        assert!(
            with(&format!("Authorization: Bearer {token}\r\n"), path).starts_with("HTTP/1.1 200"),
            "{path}"
        );
    }
    // "auditor:<token>", as a browser sends it after asking.
    let basic = "YXVkaXRvcjozZjljMWQyZThhN2I2YzVkNGUzZjJhMWI=";
    assert!(with(&format!("Authorization: Basic {basic}\r\n"), "/").starts_with("HTTP/1.1 200"));
    let (ok, out) = crate::common::run(&["aggregator", "status", "--address", &ops]);
    assert!(!ok && out.contains("pass --ca"), "{out}");
    let https = format!("localhost:{port}");
    let ca_s = ca.to_str().unwrap();
    let (ok, out) =
        crate::common::run(&["aggregator", "status", "--address", &https, "--ca", ca_s]);
    assert!(!ok && out.contains("pass --token-file"), "{out}");
    let tf = d.join("ops.token");
    let table = crate::common::ok(&[
        "aggregator",
        "status",
        "--address",
        &https,
        "--ca",
        ca_s,
        "--token-file",
        tf.to_str().unwrap(),
    ]);
    assert!(table.contains("pima"), "{table}");
    // Another CA's certificate is not trusted.
    crate::common::ok(&["pki", "init", "--dir", d.join("other").to_str().unwrap()]);
    let (ok, out) = crate::common::run(&[
        "aggregator",
        "status",
        "--address",
        &https,
        "--ca",
        d.join("other/ca/ca.pem").to_str().unwrap(),
        "--token-file",
        tf.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("is --ca the CA"), "{out}");
}

/// The Grafana dashboard in docs/ queries only metrics the aggregator has.
#[test]
fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/grafana/medfed-aggregator.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("medfed_") {
                    continue;
                }
                let family = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    FAMILIES
                        .iter()
                        .chain([&HA_FAMILY])
                        .any(|(n, ..)| *n == family || *n == word),
                    "panel {:?} queries {word}, which the aggregator does not export",
                    panel["title"]
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10, "{queried}");
}
