//! The operations sidecar: `/healthz`, `/status` (JSON) and `/metrics` (Prometheus text
//! exposition format) over plain HTTP on a loopback address by default (`[ops] listen`).
//!
//! It serves GET requests only, reads at most 8 KiB of a request for at most 5 seconds, and
//! answers from a status board the aggregator's events keep up to date.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

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
    #[serde(skip)]
    round_seconds_sum: f64,
    #[serde(skip)]
    round_seconds_count: u64,
    #[serde(skip)]
    round_started: Option<Instant>,
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
            round_seconds_sum: 0.0,
            round_seconds_count: 0,
            round_started: None,
        }
    }
}

#[derive(Debug, Default)]
struct Board {
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
                s.refusals.push((site.clone(), reason.clone()));
                b.studies.insert(study_id.clone(), s);
            }
            AggregatorEvent::RoundCompleted(r) => {
                let mut s = study(&mut b, &r.study_id);
                s.round = r.round;
                s.dropouts += s.participants.len().saturating_sub(r.sites.len()) as u64;
                if let Some(t) = s.round_started {
                    s.round_seconds_sum += t.elapsed().as_secs_f64();
                    s.round_seconds_count += 1;
                }
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
            AggregatorEvent::StatisticsReleased { study_id, .. } => {
                let mut s = study(&mut b, study_id);
                s.state = "complete".into();
                s.phase = "released".into();
                b.studies.insert(study_id.clone(), s);
            }
            AggregatorEvent::StudyFailed { study_id, reason } => {
                let mut s = study(&mut b, study_id);
                s.state = if reason.contains("stopped by the operator") {
                    "stopped".into()
                } else {
                    "failed".into()
                };
                s.phase = reason.clone();
                b.studies.insert(study_id.clone(), s);
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

    /// The Prometheus text exposition of the board.
    pub fn metrics(
        &self,
        registry: &Registry,
        audit: &medfed_infra::auditlog::AuditLog,
        ha: Option<&crate::ha::Ha>,
    ) -> String {
        let b = self.lock();
        let t = audit.traffic();
        let mut m = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(m, "# HELP {name} {help}");
            let _ = writeln!(m, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(m, "{name}{labels} {v}");
            }
        };
        let per_study = |f: &dyn Fn(&StudyStatus) -> f64| -> Vec<(String, f64)> {
            b.studies
                .iter()
                .map(|(id, s)| (format!("{{study=\"{}\"}}", escape(id)), f(s)))
                .collect()
        };
        family(
            "medfed_uptime_seconds",
            "gauge",
            "Seconds since the aggregator started.",
            vec![(String::new(), self.started.elapsed().as_secs_f64())],
        );
        if let Some(ha) = ha {
            let v = ha.view();
            family(
                "medfed_ha_active",
                "gauge",
                "1 while this aggregator instance holds the lease ([ha]), else 0.",
                vec![(
                    format!("{{instance=\"{}\"}}", escape(&v.instance)),
                    f64::from(u8::from(v.role == "active")),
                )],
            );
        }
        family(
            "medfed_sites_connected",
            "gauge",
            "Hospital nodes connected now.",
            vec![(String::new(), registry.names().len() as f64)],
        );
        family(
            "medfed_connections_refused_total",
            "counter",
            "Connections refused (not on the allow-list, bad hello).",
            vec![(String::new(), b.connections_refused as f64)],
        );
        family(
            "medfed_disconnects_total",
            "counter",
            "Sites that disconnected.",
            vec![(String::new(), b.disconnects as f64)],
        );
        family(
            "medfed_messages_sent_total",
            "counter",
            "Protocol messages sent.",
            vec![(String::new(), t.messages_sent.load(Relaxed) as f64)],
        );
        family(
            "medfed_bytes_sent_total",
            "counter",
            "Bytes of protocol messages sent.",
            vec![(String::new(), t.bytes_sent.load(Relaxed) as f64)],
        );
        family(
            "medfed_messages_received_total",
            "counter",
            "Protocol messages received.",
            vec![(String::new(), t.messages_received.load(Relaxed) as f64)],
        );
        family(
            "medfed_bytes_received_total",
            "counter",
            "Bytes of protocol messages received.",
            vec![(String::new(), t.bytes_received.load(Relaxed) as f64)],
        );
        family(
            "medfed_study_rounds_completed_total",
            "counter",
            "Rounds completed, per study.",
            per_study(&|s| f64::from(s.round)),
        );
        family(
            "medfed_study_round_failures_total",
            "counter",
            "Round attempts that failed, per study.",
            per_study(&|s| s.round_failures as f64),
        );
        family(
            "medfed_study_dropouts_total",
            "counter",
            "Participants left out of completed rounds, per study.",
            per_study(&|s| s.dropouts as f64),
        );
        family(
            "medfed_study_refusals_total",
            "counter",
            "Sites that refused the study.",
            per_study(&|s| s.refusals.len() as f64),
        );
        family(
            "medfed_study_running",
            "gauge",
            "1 while the study runs.",
            per_study(&|s| f64::from(u8::from(s.state == "running"))),
        );
        let _ = writeln!(
            m,
            "# HELP medfed_study_round_duration_seconds Time from one round's end (or the study's start) to the next round's end."
        );
        let _ = writeln!(m, "# TYPE medfed_study_round_duration_seconds summary");
        for (id, s) in &b.studies {
            let id = escape(id);
            let _ = writeln!(
                m,
                "medfed_study_round_duration_seconds_sum{{study=\"{id}\"}} {}",
                s.round_seconds_sum
            );
            let _ = writeln!(
                m,
                "medfed_study_round_duration_seconds_count{{study=\"{id}\"}} {}",
                s.round_seconds_count
            );
        }
        m
    }
}

/// A label value in the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the sidecar needs.
pub struct Ops {
    /// The studies' standing, updated from the aggregator's events.
    pub board: Arc<StatusBoard>,
    /// The connected sites.
    pub registry: Arc<Registry>,
    /// The compliance log, for its traffic counters.
    pub audit: Arc<medfed_infra::auditlog::AuditLog>,
    /// `[ha]`: the lease, for the instance's role.
    pub ha: Option<crate::ha::Ha>,
}

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Ops {
    /// Serves until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "operations endpoint listening (/healthz, /status, /metrics)");
        }
        accept_loop(
            || listener.accept(),
            |(stream, peer)| {
                let ops = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, ops.answer(stream)).await
                    {
                        debug!(%peer, "operations request timed out: {e}");
                    }
                });
            },
        )
        .await;
    }

    async fn answer(&self, mut stream: tokio::net::TcpStream) {
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > MAX_REQUEST {
                let _ = respond(
                    &mut stream,
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    "request too large\n",
                )
                .await;
                return;
            }
        }
        let head = String::from_utf8_lossy(&buf);
        let mut parts = head.lines().next().unwrap_or("").split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if method != "GET" {
            let _ = respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await;
            return;
        }
        let (status, kind, body) = match path.split('?').next().unwrap_or("") {
            "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
            "/status" => (
                "200 OK",
                "application/json",
                self.board
                    .status_json(&self.registry, &self.audit, self.ha.as_ref()),
            ),
            "/metrics" => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                self.board
                    .metrics(&self.registry, &self.audit, self.ha.as_ref()),
            ),
            _ => (
                "404 Not Found",
                "text/plain",
                "not found: try /healthz, /status or /metrics\n".to_string(),
            ),
        };
        let _ = respond(&mut stream, status, kind, &body).await;
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Accepts connections for ever, handing each to `handle`. An accept error (out of file
/// descriptors, say) is logged, at most once per streak, and waited out with a backoff from
/// 50 ms to 2 s, so a persistent error cannot spin a core.
async fn accept_loop<C, F, Fut>(mut accept: F, mut handle: impl FnMut(C))
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<C>>,
{
    let mut backoff = std::time::Duration::from_millis(50);
    let mut streak = 0u64;
    loop {
        match accept().await {
            Ok(c) => {
                if streak > 0 {
                    info!("operations endpoint accepting again after {streak} error(s)");
                }
                streak = 0;
                backoff = std::time::Duration::from_millis(50);
                handle(c);
            }
            Err(e) => {
                if streak == 0 {
                    tracing::warn!(
                        "operations endpoint cannot accept a connection: {e}; retrying with backoff"
                    );
                }
                streak += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that keeps failing (e.g. out of file descriptors) is retried with a
    /// backoff, not in a loop that spins a core.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_are_waited_out() {
        let calls = std::cell::Cell::new(0u32);
        let looped = accept_loop(
            || {
                calls.set(calls.get() + 1);
                std::future::ready(Err::<(), _>(std::io::Error::other("too many open files")))
            },
            |()| {},
        );
        // One virtual second: 50 + 100 + 200 + 400 ms of backoff, then one more try.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), looped).await;
        assert!(
            (4..=6).contains(&calls.get()),
            "{} accepts in 1 s",
            calls.get()
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
