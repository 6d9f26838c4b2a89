//! The operations endpoint (`[ops] listen`, loopback by default), served with axum:
//! `/healthz`, `/status` (JSON), `/metrics` (OpenMetrics text from `prometheus-client`), and the
//! read-only web console ([`crate::console`]: `/` and `/studies/<id>`), all answered from a
//! status board the aggregator's events keep up to date.
//!
//! Bound to anything but loopback it serves only HTTPS (`[ops] tls_cert`, `tls_key`) and
//! requires `[ops] token_file`'s token on every request but `/healthz` (`Authorization:
//! Bearer <token>`, or HTTP Basic with the token as password, which browsers ask for).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry as Metrics, Unit};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::AggregatorEvent;
use crate::server::Registry;

/// One study's standing, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StudyStatus {
    /// `"training"` or `"statistics"`.
    pub kind: &'static str,
    /// waiting, running, complete or failed
    pub state: String,
    /// Rounds the study asks for (1 for statistics).
    pub rounds_planned: u32,
    /// The last completed round.
    pub round: u32,
    /// What it is doing, in words (e.g. "waiting for sites", "round 3", "done").
    pub phase: String,
    /// The sites taking part.
    pub participants: Vec<String>,
    /// Participants left out of completed rounds, summed over rounds.
    pub dropouts: u64,
    /// Round attempts that failed.
    pub round_failures: u64,
    /// Sites that refused the study, and why.
    pub refusals: Vec<(String, String)>,
    /// Each completed round's duration, in seconds.
    #[serde(skip)]
    round_seconds: Vec<f64>,
    #[serde(skip)]
    round_started: Option<Instant>,
    /// The rounds, for the console's curves.
    #[serde(skip)]
    history: Vec<crate::console::RoundPoint>,
    /// The last release (a round's model, or the statistics file).
    #[serde(skip)]
    released: Option<std::path::PathBuf>,
    /// What that release's `provenance` says (read once, when it was released).
    #[serde(skip)]
    provenance: Option<serde_json::Value>,
}

/// At most 300 characters of a text a site sent (a refusal's reason).
fn clip(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// The `provenance` of a released file (the aggregator's own), if it has one.
fn provenance(path: &std::path::Path) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v.get("provenance").cloned()
}

impl StudyStatus {
    fn new(kind: &'static str, rounds: u32) -> StudyStatus {
        StudyStatus {
            kind,
            state: "waiting".into(),
            rounds_planned: rounds,
            round: 0,
            phase: "waiting for sites".into(),
            participants: Vec::new(),
            dropouts: 0,
            round_failures: 0,
            refusals: Vec::new(),
            round_seconds: Vec::new(),
            round_started: None,
            history: Vec::new(),
            released: None,
            provenance: None,
        }
    }
}

/// How a site has been answering: when last, and how long its recent answers took.
#[derive(Debug, Default)]
struct SiteHealth {
    last_answer: Option<Instant>,
    /// The latest answer times, in seconds (at most [`RECENT_ANSWERS`]).
    recent: std::collections::VecDeque<f64>,
}

/// Answer times kept per site, for the console's median.
const RECENT_ANSWERS: usize = 50;

#[derive(Debug, Default)]
struct Board {
    sites: BTreeMap<String, SiteHealth>,
    studies: BTreeMap<String, StudyStatus>,
    connections_refused: u64,
    disconnects: u64,
}

/// What the sidecar reports, kept up to date from the aggregator's events.
pub struct StatusBoard {
    board: Mutex<Board>,
    started: Instant,
    name: String,
}

/// `/status`.
#[derive(Debug, Serialize)]
struct StatusReply<'a> {
    aggregator: &'a str,
    uptime_secs: u64,
    sites_connected: Vec<String>,
    connections_refused: u64,
    disconnects: u64,
    messages_sent: u64,
    bytes_sent: u64,
    messages_received: u64,
    bytes_received: u64,
    studies: &'a BTreeMap<String, StudyStatus>,
    /// `[ha]`: this instance's role and the active instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    ha: Option<crate::ha::HaView>,
}

impl StatusBoard {
    /// A board for aggregator `name` and its studies, each given as (id, kind, rounds planned),
    /// all waiting for sites.
    pub fn new(
        name: &str,
        studies: impl IntoIterator<Item = (String, &'static str, u32)>,
    ) -> StatusBoard {
        let studies = studies
            .into_iter()
            .map(|(id, kind, rounds)| (id, StudyStatus::new(kind, rounds)))
            .collect();
        StatusBoard {
            board: Mutex::new(Board {
                studies,
                ..Board::default()
            }),
            started: Instant::now(),
            name: name.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Folds one event into the board.
    pub fn apply(&self, e: &AggregatorEvent) {
        let mut b = self.lock();
        // A copy of the study's standing, updated and put back (small: the history and
        // the refusals are bounded).
        let study = |b: &mut Board, id: &str| {
            b.studies
                .entry(id.to_string())
                .or_insert_with(|| StudyStatus::new("training", 0))
                .clone()
        };
        match e {
            AggregatorEvent::SiteDisconnected { .. } => b.disconnects += 1,
            AggregatorEvent::SiteRefused { .. } => b.connections_refused += 1,
            AggregatorEvent::StudyStarted {
                study_id,
                sites,
                rounds,
            } => {
                let mut s = study(&mut b, study_id);
                s.state = "running".into();
                s.rounds_planned = *rounds;
                s.participants = sites.clone();
                s.phase = "round 1".into();
                s.round_started = Some(Instant::now());
                b.studies.insert(study_id.clone(), s);
            }
            AggregatorEvent::StudyRefused {
                study_id,
                site,
                reason,
            } => {
                let mut s = study(&mut b, study_id);
                // A site's latest refusal, its reason cut short: a site cannot grow the
                // board (or the console's page) by refusing again and again at length.
                let reason = clip(reason);
                match s.refusals.iter_mut().find(|(x, _)| x == site) {
                    Some(r) => r.1 = reason,
                    None => s.refusals.push((site.clone(), reason)),
                }
                b.studies.insert(study_id.clone(), s);
            }
            AggregatorEvent::RoundCompleted(r) => {
                let mut s = study(&mut b, &r.study_id);
                s.round = r.round;
                s.dropouts += s.participants.len().saturating_sub(r.sites.len()) as u64;
                if let Some(t) = s.round_started {
                    s.round_seconds.push(t.elapsed().as_secs_f64());
                }
                s.history.retain(|p| p.round != r.round);
                s.history.push(crate::console::RoundPoint {
                    round: r.round,
                    sites: r.sites.clone(),
                    training_rows: r.training_rows,
                    train_loss: r.train_loss,
                    metric: r
                        .validation
                        .as_ref()
                        .map(medfed_protocol::metrics::Metrics::headline),
                });
                s.released = Some(r.model_path.clone());
                s.provenance = provenance(&r.model_path);
                s.round_started = Some(Instant::now());
                s.phase = if r.round >= s.rounds_planned {
                    "evaluating the final model".into()
                } else {
                    format!("round {}", r.round + 1)
                };
                b.studies.insert(r.study_id.clone(), s);
            }
            AggregatorEvent::RoundFailed { study_id, .. } => {
                let mut s = study(&mut b, study_id);
                s.round_failures += 1;
                b.studies.insert(study_id.clone(), s);
            }
            AggregatorEvent::StudyCompleted(o) => {
                let mut s = study(&mut b, &o.study_id);
                s.state = "complete".into();
                s.phase = "done".into();
                b.studies.insert(o.study_id.clone(), s);
            }
            AggregatorEvent::StatisticsReleased { study_id, path } => {
                let mut s = study(&mut b, study_id);
                s.state = "complete".into();
                s.phase = "released".into();
                s.released = Some(path.clone());
                s.provenance = provenance(path);
                b.studies.insert(study_id.clone(), s);
            }
            AggregatorEvent::StudyFailed { study_id, reason } => {
                let mut s = study(&mut b, study_id);
                s.state = if reason.contains("stopped by the operator") {
                    "stopped".into()
                } else {
                    "failed".into()
                };
                s.phase = clip(reason);
                b.studies.insert(study_id.clone(), s);
            }
            AggregatorEvent::SiteAnswered { site, seconds } => {
                let h = b.sites.entry(site.clone()).or_default();
                h.last_answer = Some(Instant::now());
                if h.recent.len() == RECENT_ANSWERS {
                    h.recent.pop_front();
                }
                h.recent.push_back(*seconds);
            }
            AggregatorEvent::SiteConnected { .. } => {}
        }
    }

    fn status_json(
        &self,
        registry: &Registry,
        audit: &medfed_infra::auditlog::AuditLog,
        ha: Option<&crate::ha::Ha>,
    ) -> String {
        let b = self.lock();
        let t = audit.traffic();
        let reply = StatusReply {
            aggregator: &self.name,
            uptime_secs: self.started.elapsed().as_secs(),
            sites_connected: registry.names().into_iter().collect(),
            connections_refused: b.connections_refused,
            disconnects: b.disconnects,
            messages_sent: t.messages_sent.load(Relaxed),
            bytes_sent: t.bytes_sent.load(Relaxed),
            messages_received: t.messages_received.load(Relaxed),
            bytes_received: t.bytes_received.load(Relaxed),
            studies: &b.studies,
            ha: ha.map(crate::ha::Ha::view),
        };
        serde_json::to_string_pretty(&reply).expect("status serializes")
    }

    /// The metrics, in the OpenMetrics text format (names, types and units by the
    /// Prometheus conventions; `docs/aggregator-operator.md` lists them).
    pub fn metrics(
        &self,
        registry: &Registry,
        audit: &medfed_infra::auditlog::AuditLog,
        allowed: &[String],
        ha: Option<&crate::ha::Ha>,
    ) -> String {
        let b = self.lock();
        let t = audit.traffic();
        let mut m = Metrics::with_prefix("medfed");
        m.register_with_unit(
            "uptime",
            "Time since the aggregator started",
            Unit::Seconds,
            ConstGauge::new(self.started.elapsed().as_secs_f64()),
        );
        let connected = registry.names();
        m.register(
            "sites_connected",
            "Hospital nodes connected now",
            ConstGauge::new(connected.len() as i64),
        );
        let site_up = Family::<SiteLabel, Gauge>::default();
        for site in allowed {
            site_up
                .get_or_create(&SiteLabel { site: site.clone() })
                .set(i64::from(connected.contains(site)));
        }
        m.register(
            "site_connected",
            "1 while the site is connected, else 0 (every allowed site)",
            site_up,
        );
        m.register(
            "connections_refused",
            "Connections refused (not on the allow-list, bad hello)",
            ConstCounter::new(b.connections_refused),
        );
        m.register(
            "disconnects",
            "Sites that disconnected",
            ConstCounter::new(b.disconnects),
        );
        let per_peer = t.per_peer();
        let traffic = |field: fn(&medfed_infra::auditlog::PeerTraffic) -> u64| {
            let f = Family::<SiteLabel, prometheus_client::metrics::counter::Counter>::default();
            for (peer, tr) in &per_peer {
                f.get_or_create(&SiteLabel { site: peer.clone() })
                    .inc_by(field(tr));
            }
            f
        };
        m.register(
            "sent_messages",
            "Protocol messages sent, per site",
            traffic(|t| t.messages_sent),
        );
        m.register_with_unit(
            "sent",
            "Bytes of protocol messages sent, per site",
            Unit::Bytes,
            traffic(|t| t.bytes_sent),
        );
        m.register(
            "received_messages",
            "Protocol messages received, per site",
            traffic(|t| t.messages_received),
        );
        m.register_with_unit(
            "received",
            "Bytes of protocol messages received, per site",
            Unit::Bytes,
            traffic(|t| t.bytes_received),
        );
        let gauge = |f: &dyn Fn(&StudyStatus) -> i64| {
            let fam = Family::<StudyLabel, Gauge>::default();
            for (id, s) in &b.studies {
                fam.get_or_create(&StudyLabel { study: id.clone() })
                    .set(f(s));
            }
            fam
        };
        let counter = |f: &dyn Fn(&StudyStatus) -> u64| {
            let fam = Family::<StudyLabel, prometheus_client::metrics::counter::Counter>::default();
            for (id, s) in &b.studies {
                fam.get_or_create(&StudyLabel { study: id.clone() })
                    .inc_by(f(s));
            }
            fam
        };
        m.register(
            "study_round",
            "The study's last completed round",
            gauge(&|s| i64::from(s.round)),
        );
        m.register(
            "study_rounds_planned",
            "Rounds the study asks for (1 for statistics)",
            gauge(&|s| i64::from(s.rounds_planned)),
        );
        m.register(
            "study_running",
            "1 while the study runs",
            gauge(&|s| i64::from(s.state == "running")),
        );
        m.register(
            "study_round_failures",
            "Round attempts that failed, per study",
            counter(&|s| s.round_failures),
        );
        m.register(
            "study_dropouts",
            "Participants left out of completed rounds, per study",
            counter(&|s| s.dropouts),
        );
        m.register(
            "study_refusals",
            "Sites that refused the study",
            counter(&|s| s.refusals.len() as u64),
        );
        let durations = Family::<StudyLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
            ])
        });
        for (id, s) in &b.studies {
            let h = durations.get_or_create(&StudyLabel { study: id.clone() });
            for d in &s.round_seconds {
                h.observe(*d);
            }
        }
        m.register_with_unit(
            "study_round_duration",
            "Time from one round's end (or the study's start) to the next round's end",
            Unit::Seconds,
            durations,
        );
        if let Some((size, _, at)) = t.last_tree_head() {
            m.register(
                "audit_tree_head_records",
                "Records covered by the compliance log's last signed tree head",
                ConstGauge::new(i64::try_from(size).unwrap_or(i64::MAX)),
            );
            m.register_with_unit(
                "audit_tree_head_timestamp",
                "When the compliance log's last tree head was signed (Unix time)",
                Unit::Seconds,
                ConstGauge::new(at as f64 / 1000.0),
            );
        }
        if let Some(ha) = ha {
            let v = ha.view();
            let fam = Family::<InstanceLabel, Gauge>::default();
            fam.get_or_create(&InstanceLabel {
                instance: v.instance.clone(),
            })
            .set(i64::from(v.role == "active"));
            m.register(
                "ha_active",
                "1 while this aggregator instance holds the lease ([ha]), else 0",
                fam,
            );
        }
        drop(b);
        let mut out = String::new();
        match prometheus_client::encoding::text::encode(&mut out, &m) {
            Ok(()) => out,
            Err(e) => {
                warn!("cannot encode the metrics: {e}");
                String::new()
            }
        }
    }

    /// The console's overview.
    fn overview(&self, ops: &Ops) -> crate::console::Overview {
        let b = self.lock();
        let connected = ops.registry.names();
        let traffic = ops.audit.traffic();
        let per_peer = traffic.per_peer();
        crate::console::Overview {
            aggregator: self.name.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            ha: ops.ha.as_ref().map(crate::ha::Ha::view),
            tree_head: traffic.last_tree_head(),
            log: ops.log.clone(),
            sites: ops
                .allowed
                .iter()
                .map(|site| {
                    let health = b.sites.get(site);
                    crate::console::SiteRow {
                        site: site.clone(),
                        connected: connected.contains(site),
                        traffic: per_peer.get(site).copied().unwrap_or_default(),
                        last_answer_secs: health
                            .and_then(|h| h.last_answer)
                            .map(|t| t.elapsed().as_secs()),
                        median_answer_secs: health.and_then(|h| median(&h.recent)),
                    }
                })
                .collect(),
            studies: b.studies.iter().map(|(id, s)| row(id, s)).collect(),
        }
    }

    /// A study's console page, if the study exists.
    fn study_page(&self, id: &str) -> Option<crate::console::StudyPage> {
        let b = self.lock();
        let s = b.studies.get(id)?;
        Some(crate::console::StudyPage {
            row: row(id, s),
            rounds: s.history.clone(),
            provenance: s.provenance.clone(),
            released: s.released.as_ref().map(|p| p.display().to_string()),
        })
    }
}

/// The median of `v`, if it has values.
fn median(v: &std::collections::VecDeque<f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn row(id: &str, s: &StudyStatus) -> crate::console::StudyRow {
    crate::console::StudyRow {
        id: id.to_string(),
        kind: s.kind.to_string(),
        state: s.state.clone(),
        round: s.round,
        rounds_planned: s.rounds_planned,
        phase: s.phase.clone(),
        participants: s.participants.clone(),
        dropouts: s.dropouts,
        round_failures: s.round_failures,
        refusals: s.refusals.clone(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StudyLabel {
    study: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SiteLabel {
    site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabel {
    instance: String,
}

/// What the endpoint needs.
pub struct Ops {
    /// The studies' standing, updated from the aggregator's events.
    pub board: Arc<StatusBoard>,
    /// The connected sites.
    pub registry: Arc<Registry>,
    /// The compliance log, for its traffic counters and tree head.
    pub audit: Arc<medfed_infra::auditlog::AuditLog>,
    /// The compliance log's path, as the console names it.
    pub log: String,
    /// The sites on the allow-list.
    pub allowed: Vec<String>,
    /// `[ha]`: the lease, for the instance's role.
    pub ha: Option<crate::ha::Ha>,
    /// `[ops] token_file`'s token, required on every request but `/healthz` when set.
    pub token: Option<String>,
    /// The address listened on (a request's `Host` may name it).
    pub listen: Option<std::net::SocketAddr>,
    /// `[ops] tls_cert` / `tls_key`: every connection is HTTPS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Connections served at once; more are closed at once (a scraper and a few browsers need
/// far fewer).
const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection lives at most this long (keep-alive included).
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);
/// A TLS handshake must finish within this (before the headers' time starts).
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Connections one client address may hold at once: one client cannot take every slot
/// (and with them `/healthz`, which needs no token) from the others.
const MAX_PER_PEER: usize = 8;

/// A client address's share of the connections, given back when its connection ends.
struct PeerSlot {
    peers: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    /// A slot for `ip`, unless it holds its share already.
    fn take(
        peers: &Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<PeerSlot> {
        let mut map = peers.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Ops {
    /// Serves until the task is dropped. Each connection must finish its TLS handshake (if
    /// any) within 3 s and send its headers within 10 s more, and lives at most 60 s; at
    /// most 64 are served at once, at most 8 from one client address, so slow or idle
    /// clients cannot take the process's file descriptors or lock the others out.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "operations endpoint and console listening (/, /healthz, /status, /metrics)");
        }
        let self_tls = self.tls.clone();
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok\n" }))
            .route("/status", axum::routing::get(status))
            .route("/metrics", axum::routing::get(metrics))
            .route("/", axum::routing::get(console_overview))
            .route("/studies/{id}", axum::routing::get(console_study))
            .fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                authorize,
            ))
            .with_state(self);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let peers = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let mut backoff = std::time::Duration::from_millis(50);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    backoff = std::time::Duration::from_millis(50);
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors, say: wait it out rather than spin.
                    warn!("operations endpoint cannot accept a connection: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                    continue;
                }
            };
            let Some(peer_slot) = PeerSlot::take(&peers, peer.ip()) else {
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let tls = self_tls.clone();
            tokio::spawn(async move {
                let served = async {
                    match tls {
                        // The handshake within the headers' time: a client that opens
                        // a connection and stays silent holds it no longer.
                        Some(acceptor) => {
                            match tokio::time::timeout(
                                TLS_HANDSHAKE_TIMEOUT,
                                acceptor.accept(stream),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => serve_io(tls, service).await,
                                Ok(Err(e)) => {
                                    tracing::debug!("ops TLS handshake failed: {e}");
                                }
                                Err(_) => tracing::debug!("ops TLS handshake timed out"),
                            }
                        }
                        None => serve_io(stream, service).await,
                    }
                };
                if tokio::time::timeout(CONNECTION_LIFETIME, served)
                    .await
                    .is_err()
                {
                    tracing::debug!("an ops connection reached its 60 s lifetime");
                }
                drop(slot);
                drop(peer_slot);
            });
        }
    }
}

/// Serves HTTP/1.1 on one connection (plain or TLS) with the headers' time limit.
async fn serve_io<I>(io: I, service: hyper_util::service::TowerToHyperService<axum::Router>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!("ops connection ended: {e}");
    }
}

/// Whether a request's `Host` names this machine's loopback (or the address listened on):
/// without a token, a page of another site that a browser was tricked into sending here
/// (DNS rebinding) is refused.
fn local_host(headers: &HeaderMap, listen: Option<std::net::SocketAddr>) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || listen.is_some_and(|l| l.ip() == ip))
}

/// With a token configured, every request but `/healthz` must carry it.
async fn authorize(
    State(ops): State<Arc<Ops>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &ops.token else {
        if local_host(request.headers(), ops.listen) {
            return next.run(request).await;
        }
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "this endpoint answers requests for localhost or its own address only\n",
        )
            .into_response();
    };
    if request.uri().path() == "/healthz" || authorized(request.headers(), token) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"medfed console\", charset=\"UTF-8\"")],
        "this endpoint needs the token of [ops] token_file: Authorization: Bearer <token>, or any user name with the token as password\n",
    )
        .into_response()
}

/// Whether the request carries `token` (Bearer, or Basic with it as the password), compared
/// in constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let given = if let Some(t) = value.strip_prefix("Bearer ") {
        t.trim().as_bytes().to_vec()
    } else if let Some(b) = value.strip_prefix("Basic ") {
        use base64::Engine as _;
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else {
            return false;
        };
        match decoded.iter().position(|&c| c == b':') {
            Some(i) => decoded[i + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    // Constant time in the token's content (its length is no secret).
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn status(State(ops): State<Arc<Ops>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ops.board
            .status_json(&ops.registry, &ops.audit, ops.ha.as_ref()),
    )
        .into_response()
}

async fn metrics(State(ops): State<Arc<Ops>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.board
            .metrics(&ops.registry, &ops.audit, &ops.allowed, ops.ha.as_ref()),
    )
        .into_response()
}

async fn console_overview(State(ops): State<Arc<Ops>>) -> Html<String> {
    Html(crate::console::overview(&ops.board.overview(&ops)))
}

async fn console_study(State(ops): State<Arc<Ops>>, UrlPath(id): UrlPath<String>) -> Response {
    match ops.board.study_page(&id) {
        Some(p) => Html(crate::console::study(&p)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Html(format!(
                "<!doctype html><html lang=\"en\"><title>not found</title><p>No study '{}' on this aggregator. <a href=\"/\">Overview</a></p></html>",
                crate::console::esc(&id)
            )),
        )
            .into_response(),
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: try /, /healthz, /status or /metrics\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_s_answer_times_keep_the_latest_fifty_and_give_their_median() {
        let board = StatusBoard::new("agg", []);
        for i in 0..120 {
            board.apply(&AggregatorEvent::SiteAnswered {
                site: "riverside".into(),
                seconds: f64::from(i),
            });
        }
        let b = board.lock();
        let h = &b.sites["riverside"];
        assert_eq!(h.recent.len(), RECENT_ANSWERS);
        // The latest fifty: 70..=119, median 94.5.
        assert_eq!(median(&h.recent), Some(94.5));
        assert_eq!(median(&std::collections::VecDeque::new()), None);
    }

    #[test]
    fn only_local_host_names_are_served_without_a_token() {
        let host = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, v.parse().unwrap());
            h
        };
        let listen = Some("10.1.2.3:9464".parse().unwrap());
        for ok in [
            "localhost:9464",
            "127.0.0.1:9464",
            "[::1]:9464",
            "LOCALHOST",
            "10.1.2.3:9464",
        ] {
            assert!(local_host(&host(ok), listen), "{ok}");
        }
        for bad in [
            "evil.example:9464",
            "evil.example",
            "127.0.0.1.evil.example",
            "[::2]:1",
        ] {
            assert!(!local_host(&host(bad), listen), "{bad}");
        }
        assert!(!local_host(&HeaderMap::new(), listen));
    }

    #[test]
    fn bearer_and_basic_tokens_are_accepted_and_nothing_else() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(authorized(&with("Bearer s3cret"), "s3cret"));
        // "auditor:s3cret"
        assert!(authorized(&with("Basic YXVkaXRvcjpzM2NyZXQ="), "s3cret"));
        assert!(!authorized(&with("Bearer s3cre"), "s3cret"));
        assert!(!authorized(&with("Basic YXVkaXRvcjpub3Bl"), "s3cret"));
        assert!(!authorized(&with("Basic !!!"), "s3cret"));
        assert!(!authorized(&HeaderMap::new(), "s3cret"));
    }
}
