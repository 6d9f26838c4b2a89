//! An aggregator in the test's own process, on a loopback QUIC port, with a real PKI and
//! config, and raw clients that can misbehave.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use medfed_aggregator::config::AggregatorConfig;
use medfed_aggregator::{Aggregator, AggregatorHandle};
use medfed_infra::pki::{self, IssuedFiles, Role};
use medfed_infra::transport::{self, Identity, TransportError};
use medfed_protocol::Message;
use medfed_protocol::messages::Hello;

/// A consortium PKI in `dir` with an aggregator certificate for localhost and the given
/// sites.
pub fn make_pki(dir: &Path, sites: &[&str]) -> (IssuedFiles, Vec<IssuedFiles>) {
    pki::init_ca(dir, "Test consortium", 2).expect("CA");
    let agg = pki::issue(dir, &Role::Aggregator("localhost".into()), 2).expect("aggregator cert");
    let sites = sites
        .iter()
        .map(|s| pki::issue(dir, &Role::Site(s.to_string()), 2).expect("site cert"))
        .collect();
    (agg, sites)
}

/// Writes an aggregator config with no study (it serves until shut down).
pub fn serving_config(dir: &Path, agg: &IssuedFiles, allow: &[&str], max_frame: u32) -> PathBuf {
    let allow = allow
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "listen = \"127.0.0.1:0\"\nmax_frame_bytes = {max_frame}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n[audit]\nlog = \"aggregator-audit.log\"\nkey = \"aggregator-audit.key\"\n\n[sites]\nallow = [{allow}]\n",
        agg.ca, agg.cert, agg.key
    );
    let path = dir.join("aggregator.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

pub struct RunningAggregator {
    pub addr: SocketAddr,
    pub handle: AggregatorHandle,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds and runs an aggregator from `config`.
pub fn start_aggregator(config: &Path) -> RunningAggregator {
    let cfg = AggregatorConfig::load(config).expect("config loads");
    // A port just released by a stopped aggregator in this process can stay busy while its
    // last tasks wind down: retry for a moment.
    let mut tries = 0;
    let aggregator = loop {
        match Aggregator::bind(cfg.clone()) {
            Ok(a) => break a,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("bind failed ({e}); retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("bind: {e}"),
        }
    };
    let addr = aggregator.local_addr().expect("addr");
    let handle = aggregator.handle();
    let task = tokio::spawn(async move {
        aggregator.run(None).await.expect("aggregator runs");
    });
    RunningAggregator { addr, handle, task }
}

/// A PKI in `dir` for `sites` (as [`make_pki`]) and an aggregator serving them, frames up
/// to `max_frame` bytes: the aggregator, and each site's files.
pub fn serve(dir: &Path, sites: &[&str], max_frame: u32) -> (RunningAggregator, Vec<IssuedFiles>) {
    let (agg_files, site_files) = make_pki(dir, sites);
    let config = serving_config(dir, &agg_files, sites, max_frame);
    (start_aggregator(&config), site_files)
}

/// A QUIC connection to the aggregator at `addr` with `files`' identity, before any hello
/// (keep the endpoint while the connection is in use).
pub async fn connect(
    addr: SocketAddr,
    files: &IssuedFiles,
) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = client(addr, files);
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    (endpoint, conn)
}

/// The aggregator's answer on `recv`, within 10 s: an error message, for the misbehaving
/// clients here.
pub async fn error_answer(recv: &mut quinn::RecvStream) -> Message {
    tokio::time::timeout(
        Duration::from_secs(10),
        transport::read_message(recv, medfed_protocol::DEFAULT_MAX_FRAME_BYTES),
    )
    .await
    .expect("an answer in time")
    .expect("an error message")
}

/// A raw client endpoint with `files`' identity, trusting `files.ca`.
pub fn client(addr: SocketAddr, files: &IssuedFiles) -> quinn::Endpoint {
    let identity = Identity::load(&files.cert, &files.key).expect("identity");
    transport::client_endpoint(
        addr,
        &transport::Trust::load(&files.ca, None).expect("trust"),
        identity,
    )
    .expect("client endpoint")
}

pub fn hello(site: &str) -> Message {
    Message::Hello(Hello {
        site: site.into(),
        software: "test".into(),
        datasets: vec![],
    })
}

/// Connects and says hello; returns the connection and the answer.
pub async fn connect_and_hello(
    addr: SocketAddr,
    files: &IssuedFiles,
    site: &str,
) -> Result<(quinn::Connection, Message), TransportError> {
    let endpoint = client(addr, files);
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let answer = transport::request(
        &conn,
        &hello(site),
        medfed_protocol::DEFAULT_MAX_FRAME_BYTES,
        Duration::from_secs(10),
    )
    .await?;
    Ok((conn, answer))
}

/// Polls `f` until it is true or 10 s have passed.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}
