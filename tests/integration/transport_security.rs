//! Attacks on the aggregator over real QUIC with real certificates. Each one must be refused
//! with a clear reason while the aggregator keeps serving the well-behaved site.

use std::time::Duration;

use crate::common::inproc::*;
use medfed_infra::transport::{self, TransportError};
use medfed_protocol::codec::encode_frame_with_version;
use medfed_protocol::messages::ErrorMessage;
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, ErrorCode, Message, PROTOCOL_VERSION};

const MAX_FRAME: u32 = 1 << 20;

/// Sends raw bytes on a new stream of an authenticated connection and returns the answer.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Result<Message, TransportError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    let _ = send.finish();
    transport::read_message(&mut recv, DEFAULT_MAX_FRAME_BYTES).await
}

/// The well-behaved site's connection still gets answers from the aggregator.
async fn still_served(conn: &quinn::Connection, agg: &RunningAggregator) {
    let answer = transport::request(
        conn,
        &hello("alpha"),
        DEFAULT_MAX_FRAME_BYTES,
        Duration::from_secs(5),
    )
    .await;
    // A second hello on a welcomed connection is answered (with an error): the aggregator
    // is alive and this connection is intact.
    match answer {
        Err(TransportError::Peer {
            code: ErrorCode::UnexpectedMessage,
            ..
        }) => {}
        other => panic!("the good site is no longer served: {other:?}"),
    }
    assert!(agg.handle.connected_sites().contains("alpha"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_others_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let (agg_files, sites) = make_pki(&dir.path().join("pki"), &["alpha", "beta", "stranger"]);
    let (alpha, beta, stranger) = (&sites[0], &sites[1], &sites[2]);
    // Another CA issues a certificate for the same site name.
    let (_, forged) = make_pki(&dir.path().join("other-pki"), &["alpha"]);
    let config = serving_config(dir.path(), &agg_files, &["alpha", "beta"], MAX_FRAME);
    let agg = start_aggregator(&config);

    let (good, answer) = connect_and_hello(agg.addr, alpha, "alpha")
        .await
        .expect("alpha connects");
    assert!(matches!(answer, Message::Welcome(_)), "{answer:?}");
    eventually("alpha registered", || {
        agg.handle.connected_sites().contains("alpha")
    })
    .await;

    // 1. A certificate from another CA: the TLS handshake fails; no hello is ever read.
    // (The forged client trusts the real CA so that only the client side is wrong.)
    let mut forged_files = forged[0].clone();
    forged_files.ca = alpha.ca.clone();
    let err = connect_and_hello(agg.addr, &forged_files, "alpha")
        .await
        .expect_err("forged certificate accepted");
    assert!(matches!(err, TransportError::Connection(_)), "{err:?}");
    let text = err.to_string();
    println!("forged certificate: {text}");
    assert!(
        text.contains("certificate") || text.contains("handshake"),
        "unclear: {text}"
    );
    still_served(&good, &agg).await;

    // 2. A valid certificate whose site is not on the allow-list.
    let err = connect_and_hello(agg.addr, stranger, "stranger")
        .await
        .expect_err("stranger accepted");
    let (code, reason) = err.closed_by_peer().expect("closed by the aggregator");
    assert_eq!(code, ErrorCode::SiteNotAllowed);
    assert!(
        reason.contains("site 'stranger' is not on this aggregator's allow-list"),
        "{reason}"
    );
    still_served(&good, &agg).await;

    // 3. A hello that claims another site than its certificate.
    let err = connect_and_hello(agg.addr, beta, "alpha")
        .await
        .expect_err("impersonation accepted");
    match err {
        TransportError::Peer { code, reason } => {
            assert_eq!(code, ErrorCode::SiteNotAllowed);
            assert!(reason.contains("certificate is for 'beta'"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    still_served(&good, &agg).await;

    // 4. A message with another protocol version.
    let endpoint = client(agg.addr, beta);
    let conn = endpoint
        .connect(agg.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let frame = encode_frame_with_version(
        &hello("beta"),
        PROTOCOL_VERSION + 8,
        DEFAULT_MAX_FRAME_BYTES,
    )
    .unwrap();
    match send_raw(&conn, &frame).await.expect("an answer") {
        Message::Error(ErrorMessage { code, reason }) => {
            assert_eq!(code, ErrorCode::UnsupportedVersion);
            assert!(
                reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 8))
                    && reason.contains(&format!("version {PROTOCOL_VERSION}")),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    still_served(&good, &agg).await;

    // 5. A well-framed body that is not a message.
    let conn = endpoint
        .connect(agg.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let mut garbage = vec![0, 0, 0, 8];
    garbage.extend(PROTOCOL_VERSION.to_be_bytes());
    garbage.extend([0xff; 6]);
    match send_raw(&conn, &garbage).await.expect("an answer") {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::Malformed, "{}", e.reason),
        other => panic!("{other:?}"),
    }
    still_served(&good, &agg).await;

    // 6. A message that is not a hello.
    let conn = endpoint
        .connect(agg.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let err = transport::request(
        &conn,
        &Message::Error(ErrorMessage {
            code: ErrorCode::Internal,
            reason: "x".into(),
        }),
        DEFAULT_MAX_FRAME_BYTES,
        Duration::from_secs(5),
    )
    .await
    .expect_err("accepted");
    assert!(
        matches!(
            err,
            TransportError::Peer {
                code: ErrorCode::UnexpectedMessage,
                ..
            }
        ),
        "{err:?}"
    );
    still_served(&good, &agg).await;

    // After all that, a well-behaved second site still gets in.
    let (_beta_conn, answer) = connect_and_hello(agg.addr, beta, "beta")
        .await
        .expect("beta connects");
    assert!(matches!(answer, Message::Welcome(_)));
    eventually("beta registered", || {
        agg.handle.connected_sites().contains("beta")
    })
    .await;
    // A site that keeps opening streams after its hello (each answered with an error and
    // recorded in the compliance log) is cut off after 16: it cannot grow the log forever.
    for _ in 0..20 {
        let answer = transport::request(
            &_beta_conn,
            &hello("beta"),
            DEFAULT_MAX_FRAME_BYTES,
            Duration::from_secs(5),
        )
        .await;
        if answer.is_err() && _beta_conn.close_reason().is_some() {
            break;
        }
    }
    eventually("beta cut off", || {
        !agg.handle.connected_sites().contains("beta")
    })
    .await;
    assert!(_beta_conn.close_reason().is_some());
    still_served(&good, &agg).await;

    agg.handle.shutdown("test over");
    tokio::time::timeout(Duration::from_secs(10), agg.task)
        .await
        .expect("aggregator stops")
        .unwrap();
    // What the site sent on streams after its hello (the second hellos of `still_served`)
    // and the errors answering them are in the aggregator's compliance log (they were not).
    let log = std::fs::read_to_string(dir.path().join("aggregator-audit.log")).unwrap();
    let alpha: Vec<(String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"]["peer"] == "alpha")
        .map(|r| {
            (
                r["event"]["kind"].as_str().unwrap().to_string(),
                r["event"]["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let answered = |kind: &str| {
        alpha.windows(2).any(|w| {
            w[0] == ("received".to_string(), kind.to_string())
                && w[1] == ("sent".to_string(), "error".to_string())
        })
    };
    assert!(answered("hello"), "a second hello and its error: {alpha:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reconnects_after_the_aggregator_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (agg_files, sites) = make_pki(&dir.path().join("pki"), &["alpha"]);
    let config = serving_config(dir.path(), &agg_files, &["alpha"], MAX_FRAME);
    let agg = start_aggregator(&config);
    let port = agg.addr.port();

    let data = dir.path().join("alpha.csv");
    std::fs::write(&data, "x,y\n1,2\n3,4\n").unwrap();
    let node_cfg = dir.path().join("node.toml");
    std::fs::write(
        &node_cfg,
        format!(
            "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[audit]\nlog = \"alpha-audit.log\"\nkey = \"alpha-audit.key\"\n[[dataset]]\nname = \"d\"\npath = \"alpha.csv\"\n[reconnect]\ninitial_backoff_ms = 50\nmax_backoff_ms = 400\n",
            sites[0].ca, sites[0].cert, sites[0].key
        ),
    )
    .unwrap();
    let node =
        medfed_node::Node::new(medfed_node::config::NodeConfig::load(&node_cfg).unwrap()).unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let node_task = tokio::spawn(node.run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    eventually("the node connects", || {
        agg.handle.connected_sites().contains("alpha")
    })
    .await;

    // The aggregator goes away (the node sees its connection close) and comes back on the
    // same port.
    agg.handle.shutdown("restarting");
    agg.task.await.unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&config, text).unwrap();
    let agg = start_aggregator(&config);
    eventually("the node reconnects", || {
        agg.handle.connected_sites().contains("alpha")
    })
    .await;

    stop_tx.send(true).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), node_task)
        .await
        .expect("node stops")
        .unwrap()
        .unwrap();
    assert_eq!(exit, medfed_node::NodeExit::Stopped);
    agg.handle.shutdown("test over");
    agg.task.await.unwrap();
}
