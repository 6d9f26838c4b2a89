//! `medfed bench transport`: how fast a model update crosses loopback QUIC (mutual TLS 1.3,
//! the transport medfed uses) compared with plain TCP measured in the same run.
//!
//! Each transfer sends one framed `ModelUpdate` on a fresh stream and waits for a one-byte
//! acknowledgement after the receiver has read (and, for "message", decoded) the whole
//! frame. "raw" sends a pre-encoded frame and does not decode: the transport alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use medfed_infra::{pki, transport};
use medfed_protocol::codec::{self, HEADER_BYTES};
use medfed_protocol::messages::ModelUpdate;
use medfed_protocol::metrics::Evaluation;
use medfed_protocol::model::ModelKind;
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub struct TransportArgs {
    /// Size of the model update's weights in MB (10^6 bytes; 8 bytes per weight).
    #[arg(long, default_value_t = 8)]
    size_mb: usize,
    /// Timed transfers per transport and mode (after two warm-up transfers).
    #[arg(long, default_value_t = 30)]
    iterations: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Encode on send, decode on receipt: what a round does.
    Message,
    /// Pre-encoded frame, not decoded: the transport alone.
    Raw,
}

fn update(size_mb: usize) -> Message {
    let n = size_mb * 1_000_000 / 8;
    Message::ModelUpdate(ModelUpdate {
        study_id: "bench".into(),
        round: 1,
        weights: (0..n).map(|i| (i as f64).sin()).collect(),
        num_samples: 1000,
        train_loss: 0.5,
        evaluation: Evaluation::empty(ModelKind::Linear),
    })
}

struct Stats {
    median_mbps: f64,
    best_mbps: f64,
}

fn stats(bytes: usize, mut times: Vec<Duration>) -> Stats {
    times.sort();
    let mbps = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    Stats {
        median_mbps: mbps(times[times.len() / 2]),
        best_mbps: mbps(times[0]),
    }
}

pub fn transport(args: TransportArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.size_mb >= 1 && args.size_mb <= 60,
        "--size-mb must be between 1 and 60 (the frame limit is 64 MiB)"
    );
    anyhow::ensure!(args.iterations >= 1, "--iterations must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let msg = update(args.size_mb);
        let frame = codec::encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES)?;
        println!(
            "sending a {:.1} MB model update ({} weights) over loopback, {} timed transfers each",
            frame.len() as f64 / 1e6,
            args.size_mb * 1_000_000 / 8,
            args.iterations
        );
        let pki_dir = tempfile::tempdir()?;
        pki::init_ca(pki_dir.path(), "bench", 1)?;
        let server_files = pki::issue(
            pki_dir.path(),
            &pki::Role::Aggregator("localhost".into()),
            1,
        )?;
        let client_files = pki::issue(pki_dir.path(), &pki::Role::Site("bench-site".into()), 1)?;

        let mut rows = Vec::new();
        for mode in [Mode::Message, Mode::Raw] {
            let quic = quic_times(
                &server_files,
                &client_files,
                &msg,
                &frame,
                mode,
                args.iterations,
            )
            .await?;
            let tcp = tcp_times(&msg, &frame, mode, args.iterations).await?;
            rows.push((mode, stats(frame.len(), quic), stats(frame.len(), tcp)));
        }
        println!(
            "\n{:<8}  {:<17}  {:>11}  {:>9}",
            "mode", "transport", "median MB/s", "best MB/s"
        );
        println!("{}", "-".repeat(8 + 2 + 17 + 2 + 11 + 2 + 9));
        for (mode, quic, tcp) in &rows {
            let name = if *mode == Mode::Message {
                "message"
            } else {
                "raw"
            };
            println!(
                "{:<8}  {:<17}  {:>11.0}  {:>9.0}",
                name, "QUIC (mTLS 1.3)", quic.median_mbps, quic.best_mbps
            );
            println!(
                "{:<8}  {:<17}  {:>11.0}  {:>9.0}",
                name, "TCP (plain)", tcp.median_mbps, tcp.best_mbps
            );
            println!(
                "{:<8}  {:<17}  {:>11.2}",
                name,
                "QUIC / TCP",
                quic.median_mbps / tcp.median_mbps
            );
        }
        Ok(())
    })
}

async fn quic_times(
    server_files: &pki::IssuedFiles,
    client_files: &pki::IssuedFiles,
    msg: &Message,
    frame: &[u8],
    mode: Mode,
    iterations: u32,
) -> anyhow::Result<Vec<Duration>> {
    let identity = transport::Identity::load(&server_files.cert, &server_files.key)?;
    let server = transport::server_endpoint(
        "127.0.0.1:0".parse()?,
        &transport::Trust::load(&server_files.ca, None)?,
        identity,
    )?;
    let addr = server.local_addr()?;
    let accept = server.clone();
    let server_task = tokio::spawn(async move {
        let conn = accept.accept().await.context("no connection")?.await?;
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            match mode {
                Mode::Message => {
                    transport::read_message(&mut recv, DEFAULT_MAX_FRAME_BYTES).await?;
                }
                Mode::Raw => {
                    let mut header = [0u8; HEADER_BYTES];
                    recv.read_exact(&mut header).await?;
                    let len = codec::check_frame_length(header, DEFAULT_MAX_FRAME_BYTES)?;
                    let mut body = vec![0u8; len];
                    recv.read_exact(&mut body).await?;
                }
            }
            send.write_all(&[1]).await?;
            send.finish()?;
        }
        anyhow::Ok(())
    });
    let identity = transport::Identity::load(&client_files.cert, &client_files.key)?;
    let client = transport::client_endpoint(
        addr,
        &transport::Trust::load(&client_files.ca, None)?,
        identity,
    )?;
    let conn = client.connect(addr, "localhost")?.await?;
    let mut times = Vec::new();
    for i in 0..iterations + 2 {
        let start = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await?;
        match mode {
            Mode::Message => {
                transport::write_message(&mut send, msg, DEFAULT_MAX_FRAME_BYTES).await?;
            }
            Mode::Raw => {
                send.write_all(frame).await?;
                send.finish()?;
            }
        }
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await?;
        if i >= 2 {
            times.push(start.elapsed());
        }
    }
    conn.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    let _ = server_task.await;
    client.wait_idle().await;
    Ok(times)
}

async fn tcp_times(
    msg: &Message,
    frame: &[u8],
    mode: Mode,
    iterations: u32,
) -> anyhow::Result<Vec<Duration>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let server_task = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        loop {
            let mut header = [0u8; HEADER_BYTES];
            if sock.read_exact(&mut header).await.is_err() {
                return anyhow::Ok(());
            }
            let len = codec::check_frame_length(header, DEFAULT_MAX_FRAME_BYTES)?;
            let mut body = vec![0u8; len];
            sock.read_exact(&mut body).await?;
            if mode == Mode::Message {
                codec::decode_payload(&body)?;
            }
            sock.write_all(&[1]).await?;
        }
    });
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let frame = Arc::new(frame.to_vec());
    let mut times = Vec::new();
    for i in 0..iterations + 2 {
        let start = Instant::now();
        match mode {
            Mode::Message => {
                sock.write_all(&codec::encode_frame(msg, DEFAULT_MAX_FRAME_BYTES)?)
                    .await?;
            }
            Mode::Raw => sock.write_all(&frame).await?,
        }
        let mut ack = [0u8; 1];
        sock.read_exact(&mut ack).await?;
        if i >= 2 {
            times.push(start.elapsed());
        }
    }
    drop(sock);
    server_task.await??;
    Ok(times)
}

/// A progress bar on standard error for `len` steps (drawn only on a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>18} [{bar:30}] {human_pos}/{human_len} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
