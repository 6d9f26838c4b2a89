//! A compromised hospital (a valid, allow-listed certificate) against the aggregator: it
//! cannot make the aggregator buffer a large hello, hold many connections waiting for
//! their hello, or delay every study by staying silent when one is announced.

use std::time::{Duration, Instant};

use crate::common::inproc::*;
use crate::common::{Federation, Processes, SERVE_PIMA, wait};
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, ErrorCode, Message};

/// A hello of 1 MiB (far below the 64 MiB frame limit) is refused at its header, and the
/// sender cannot push more than the pre-hello window meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_hello_is_refused_at_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, sites) = serve(dir.path(), &["alpha"], DEFAULT_MAX_FRAME_BYTES);
    let (_endpoint, conn) = connect(agg.addr, &sites[0]).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let body = 1u32 << 20;
    send.write_all(&body.to_be_bytes()).await.unwrap();
    // The body streams in the background: flow control stops it early.
    let pushed = tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < body as usize {
            if send.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let answer = error_answer(&mut recv).await;
    match answer {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::FrameTooLarge, "{}", e.reason);
            assert!(
                e.reason
                    .contains(&format!("limit of {}", medfed_aggregator::MAX_HELLO_BYTES)),
                "{}",
                e.reason
            );
        }
        other => panic!("{other:?}"),
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), pushed).await;
    agg.handle.shutdown("test done");
}

/// Before its hello, a connection can push little into the aggregator's buffers, even on a
/// second stream the aggregator does not read yet: its credit at the handshake is small
/// (it was the full 64 MiB window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cannot_fill_the_aggregators_buffers_before_its_hello() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, sites) = serve(dir.path(), &["alpha"], DEFAULT_MAX_FRAME_BYTES);
    let (_endpoint, conn) = connect(agg.addr, &sites[0]).await;
    // A hello that never completes, and 4 MiB on another stream.
    let (mut hello, _hello_recv) = conn.open_bi().await.unwrap();
    hello.write_all(&[0, 0]).await.unwrap();
    let (mut other, _other_recv) = conn.open_bi().await.unwrap();
    let pushed = tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..64 {
            if other.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let crossed = conn.stats().udp_tx.bytes;
    assert!(
        crossed < 1024 * 1024,
        "{crossed} bytes crossed to the aggregator before any hello"
    );
    pushed.abort();
    agg.handle.shutdown("test done");
}

/// A site's connections that never say hello: a few wait (for their hello timeout), the
/// next are refused at once, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cannot_hold_many_connections_before_its_hello() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, sites) = serve(dir.path(), &["alpha"], DEFAULT_MAX_FRAME_BYTES);
    let max = medfed_aggregator::MAX_PENDING_PER_SITE;
    let mut held = Vec::new();
    for _ in 0..max {
        held.push(connect(agg.addr, &sites[0]).await);
    }
    // Give the aggregator a moment to count them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_endpoint, extra) = connect(agg.addr, &sites[0]).await;
    let closed = tokio::time::timeout(Duration::from_secs(3), extra.closed())
        .await
        .expect("the extra connection is refused at once, not after the hello timeout");
    assert!(
        closed.to_string().contains("waiting for their hello"),
        "{closed}"
    );
    // The waiting ones are still open (until their own hello timeout).
    assert!(held.iter().all(|(_, c)| c.close_reason().is_none()));
    agg.handle.shutdown("test done");
}

/// Two connected but silent sites delay a study's start by the decision timeout once, not
/// by a round timeout each: the study completes with the two sites that answer, long
/// before 2 × 60 s.
#[test]
fn silent_sites_delay_a_study_by_the_decision_timeout_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fed = Federation::new(d)
        .sites(&["site-a", "site-b"])
        .played_sites(&["silent-1", "silent-2"])
        .node_extra(|_| SERVE_PIMA.to_string())
        .aggregator(
            r#"[[study]]
id = "pima"
dataset = "pima"
model = "logistic"
features = ["glu", "bmi"]
target = "type"
positive_class = "Yes"
rounds = 2
min_sites = 2
wait_for_sites_secs = 60
round_timeout_secs = 60
decision_timeout_secs = 2
"#,
        )
        .write();
    let port = fed.port;
    let mut procs = Processes::default();
    // The silent sites connect and say hello, then never answer anything.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let silent: Vec<quinn::Connection> = ["silent-1", "silent-2"]
        .iter()
        .map(|s| {
            let files = medfed_infra::pki::IssuedFiles {
                dir: d.join(format!("pki/sites/{s}")),
                ca: d.join(format!("pki/sites/{s}/ca.pem")),
                cert: d.join(format!("pki/sites/{s}/cert.pem")),
                key: d.join(format!("pki/sites/{s}/key.pem")),
            };
            (s.to_string(), files)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|(s, files)| {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            // The aggregator may not listen yet: retry for a while.
            if s == "silent-1" {
                procs.0.push(fed.spawn_aggregator());
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok((conn, Message::Welcome(_))) =
                    rt.block_on(connect_and_hello(addr, &files, &s))
                {
                    break conn;
                }
                assert!(Instant::now() < deadline, "{s} could not connect");
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .collect();
    let started = Instant::now();
    procs.0.extend(fed.spawn_nodes());
    let status = wait(&mut procs.0[0].1, Duration::from_secs(110));
    let log = std::fs::read_to_string(d.join("aggregator.log")).unwrap();
    // Completed without the two silent sites, and says so (exit status 2).
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    for s in ["silent-1", "silent-2"] {
        assert!(
            log.contains(&format!("WITHOUT site '{s}': no study decision")),
            "{log}"
        );
    }
    let took = started.elapsed();
    // Sequential announcements waited a round timeout per silent site: at least 120 s.
    assert!(
        took < Duration::from_secs(60),
        "the study took {took:?}:\n{log}"
    );
    assert!(
        log.contains("study 'pima' complete after 2 rounds"),
        "{log}"
    );
    drop(silent);
}
