//! A frame over the limit is refused before its body is read or allocated. The test binary's
//! global allocator records the largest single allocation of this test's threads (its
//! async runtime's, where the aggregator and the client run) while a client announces a
//! 4 GiB frame to a real aggregator over QUIC.

use std::time::Duration;

use crate::common::inproc::*;
use medfed_infra::transport;
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, ErrorCode, Message};

/// Well above the few-MB buffers the runtime allocates for itself, far below the announced sizes.
const LIMIT: u32 = 16 << 20;

#[test]
fn oversized_frames_are_refused_without_allocating_them() {
    medfed_alloc_meter::watch_this_thread();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(medfed_alloc_meter::watch_this_thread)
        .enable_all()
        .build()
        .unwrap()
        .block_on(refuse_oversized_frames());
}

async fn refuse_oversized_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, sites) = serve(dir.path(), &["alpha", "beta"], LIMIT);
    let (good, _) = connect_and_hello(agg.addr, &sites[0], "alpha")
        .await
        .expect("alpha connects");

    for announced in [LIMIT + 1, u32::MAX] {
        let (_endpoint, conn) = connect(agg.addr, &sites[1]).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        // The header announces `announced` bytes; a few body bytes follow, never the rest.
        send.write_all(&announced.to_be_bytes()).await.unwrap();
        send.write_all(&[0, 1, 0, 0]).await.unwrap();
        let answer = error_answer(&mut recv).await;
        match answer {
            Message::Error(e) => {
                assert_eq!(e.code, ErrorCode::FrameTooLarge);
                // A hello is capped far below the frame limit.
                let hello_limit = medfed_aggregator::MAX_HELLO_BYTES.min(LIMIT);
                assert_eq!(
                    e.reason,
                    format!("frame of {announced} bytes exceeds the limit of {hello_limit} bytes")
                );
            }
            other => panic!("{other:?}"),
        }
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("connection closed");
        let (code, _) = transport::TransportError::Connection(closed)
            .closed_by_peer()
            .expect("closed by the aggregator");
        assert_eq!(code, ErrorCode::FrameTooLarge);
    }

    // Nothing near the announced sizes was ever allocated (quinn's own buffers are far
    // smaller than the limit).
    let largest = medfed_alloc_meter::largest();
    assert!(
        largest < LIMIT as usize,
        "largest single allocation was {largest} bytes"
    );
    // The meter does watch this test's threads (their buffers are some MB).
    assert!(largest > 64 << 10, "only {largest} bytes recorded");

    // The well-behaved site is still served, and a frame right at the limit still passes
    // the length check (it is then refused as not-a-hello, not as too large).
    let answer = transport::request(
        &good,
        &hello("alpha"),
        DEFAULT_MAX_FRAME_BYTES,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(
            answer,
            Err(transport::TransportError::Peer {
                code: ErrorCode::UnexpectedMessage,
                ..
            })
        ),
        "{answer:?}"
    );
    agg.handle.shutdown("test over");
    agg.task.await.unwrap();
}
