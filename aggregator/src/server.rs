//! The QUIC server: accepts node connections, checks each site against the allow-list,
//! takes its hello, and keeps a registry of connected sites that the study runner uses.
//! A misbehaving connection is answered with an error and closed; it never affects others.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use medfed_infra::transport::{self, TransportError};
use medfed_protocol::messages::{ErrorMessage, Hello, Welcome};
use medfed_protocol::{ErrorCode, Message};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::AggregatorEvent;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest hello accepted: a site's name, software and its datasets' column names.
pub const MAX_HELLO_BYTES: u32 = 16 * 1024;
/// The largest message read on a stream a node should not have opened (it is answered
/// with an error, whatever it holds).
const MAX_UNEXPECTED_BYTES: u32 = 4 * 1024;
/// Streams a site may open after its hello (each answered with an error, and recorded in
/// the compliance log) before its connection is closed: nodes open none, and a loop of
/// them would grow the log without end.
const MAX_UNEXPECTED_STREAMS: u32 = 16;
/// Connections of one site that may wait for their hello at once.
pub const MAX_PENDING_PER_SITE: usize = 4;

/// A connected, welcomed site.
#[derive(Debug, Clone)]
pub struct ConnectedSite {
    pub hello: Hello,
    pub conn: quinn::Connection,
}

/// Sites currently connected, by name. One connection per site: a newer one replaces an
/// older one.
#[derive(Debug, Default)]
pub struct Registry {
    sites: Mutex<HashMap<String, ConnectedSite>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, ConnectedSite>> {
        // A poisoned lock means a panic elsewhere; the map itself is still consistent
        // (every mutation is a single insert or remove).
        self.sites.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, site: &str) -> Option<ConnectedSite> {
        self.lock().get(site).cloned()
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.lock().keys().cloned().collect()
    }

    fn insert(&self, site: ConnectedSite) -> Option<ConnectedSite> {
        self.lock().insert(site.hello.site.clone(), site)
    }

    /// Removes `site` only if its registered connection is `conn` (not a newer one).
    fn remove_if(&self, site: &str, conn: &quinn::Connection) -> bool {
        let mut map = self.lock();
        if map
            .get(site)
            .is_some_and(|s| s.conn.stable_id() == conn.stable_id())
        {
            map.remove(site);
            true
        } else {
            false
        }
    }

    pub fn close_all(&self, code: ErrorCode, reason: &str) {
        for site in self.lock().values() {
            transport::close(&site.conn, code, reason);
        }
    }
}

pub(crate) struct Server {
    pub endpoint: quinn::Endpoint,
    pub registry: Arc<Registry>,
    pub allow: Arc<BTreeSet<String>>,
    pub name: String,
    pub max_frame: u32,
    pub events: Option<mpsc::UnboundedSender<AggregatorEvent>>,
    pub audit: Arc<medfed_infra::auditlog::AuditLog>,
    /// Connections per site still waiting for their hello.
    pub pending: Mutex<HashMap<String, usize>>,
    /// `[ha]`: sites are let in only while this instance holds the lease.
    pub ha: Option<crate::ha::Ha>,
}

/// One pending connection of a site, counted while it lives.
struct Pending<'a> {
    server: &'a Server,
    site: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut pending = self
            .server
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = pending.get_mut(&self.site) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pending.remove(&self.site);
            }
        }
    }
}

impl Server {
    /// Accepts connections until the endpoint is closed.
    pub async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let server = self.clone();
            tokio::spawn(async move { server.handle(incoming).await });
        }
    }

    fn emit(&self, e: AggregatorEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    fn refuse(
        &self,
        conn: &quinn::Connection,
        site: Option<&str>,
        code: ErrorCode,
        reason: String,
    ) {
        warn!(remote = %conn.remote_address(), site, %code, "refused connection: {reason}");
        let what = format!(
            "refused {} ({}): {reason}",
            site.unwrap_or("a peer"),
            conn.remote_address()
        );
        if let Err(e) = self
            .audit
            .record(medfed_protocol::audit::Event::Error { what })
        {
            warn!("cannot write the compliance log: {e}");
        }
        self.emit(AggregatorEvent::SiteRefused {
            remote: conn.remote_address(),
            site: site.map(str::to_string),
            reason: reason.clone(),
        });
        transport::close(conn, code, &reason);
    }

    async fn handle(&self, incoming: quinn::Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                // Most often: a certificate from another CA, or no certificate at all.
                let why = medfed_infra::tls_errors::connection_error(&e);
                warn!(%remote, "TLS handshake failed: {why}");
                self.emit(AggregatorEvent::SiteRefused {
                    remote,
                    site: None,
                    reason: format!("TLS handshake failed: {why}"),
                });
                return;
            }
            Err(_) => {
                warn!(%remote, "TLS handshake timed out");
                return;
            }
        };
        let site = match transport::peer_site(&conn) {
            Ok(site) => site,
            Err(e) => return self.refuse(&conn, None, ErrorCode::SiteNotAllowed, e.to_string()),
        };
        if !self.allow.contains(&site) {
            let reason = format!("site '{site}' is not on this aggregator's allow-list");
            return self.refuse(&conn, Some(&site), ErrorCode::SiteNotAllowed, reason);
        }
        // Before its hello a connection may send little (its credit at the handshake is
        // transport::PRE_HELLO_RECEIVE_WINDOW), and a site may hold few such connections:
        // a site's valid certificate does not buy it the aggregator's memory.
        let pending = {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(site.clone()).or_insert(0);
            if *n >= MAX_PENDING_PER_SITE {
                drop(map);
                let reason = format!(
                    "site '{site}' already has {MAX_PENDING_PER_SITE} connections waiting for \
                     their hello; this one is refused (is the site running several times?)"
                );
                return self.refuse(&conn, Some(&site), ErrorCode::UnexpectedMessage, reason);
            }
            *n += 1;
            Pending {
                server: self,
                site: site.clone(),
            }
        };
        let Some(hello) = self.receive_hello(&conn, &site).await else {
            return;
        };
        drop(pending);
        conn.set_receive_window(quinn::VarInt::from_u32(transport::RECEIVE_WINDOW));
        info!(%site, %remote, software = %hello.software, "site connected");
        let entry = ConnectedSite {
            hello,
            conn: conn.clone(),
        };
        if let Some(old) = self.registry.insert(entry) {
            transport::close(
                &old.conn,
                ErrorCode::Replaced,
                "a newer connection from this site took this one's place; if this repeats, \
                 the site is running twice",
            );
        }
        self.emit(AggregatorEvent::SiteConnected { site: site.clone() });

        // Nodes only answer requests; a stream a node opens after its hello gets an error.
        let mut unexpected = 0u32;
        let reason = loop {
            match conn.accept_bi().await {
                Ok(_) if unexpected >= MAX_UNEXPECTED_STREAMS => {
                    let reason = format!(
                        "site '{site}' opened {MAX_UNEXPECTED_STREAMS} streams after its hello; nodes open none: the connection is closed"
                    );
                    warn!(%site, "{reason}");
                    transport::close(&conn, ErrorCode::UnexpectedMessage, &reason);
                    break reason;
                }
                Ok((send, recv)) => {
                    unexpected += 1;
                    let max = MAX_UNEXPECTED_BYTES.min(self.max_frame);
                    let (conn, audit, site) = (conn.clone(), self.audit.clone(), site.clone());
                    tokio::spawn(async move {
                        answer_unexpected_stream(&conn, send, recv, max, &audit, &site).await;
                    });
                }
                Err(e) => break e.to_string(),
            }
        };
        if self.registry.remove_if(&site, &conn) {
            info!(%site, "site disconnected: {reason}");
            self.emit(AggregatorEvent::SiteDisconnected { site, reason });
        }
    }

    /// Reads and checks the first message; on failure answers with an error, closes the
    /// connection and returns `None`.
    async fn receive_hello(&self, conn: &quinn::Connection, site: &str) -> Option<Hello> {
        let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await
        {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                warn!(%site, "connection lost before hello: {e}");
                return None;
            }
            Err(_) => {
                self.refuse(
                    conn,
                    Some(site),
                    ErrorCode::UnexpectedMessage,
                    "no hello within 10 s".into(),
                );
                return None;
            }
        };
        let msg = tokio::time::timeout(
            HELLO_TIMEOUT,
            transport::read_message_info(&mut recv, MAX_HELLO_BYTES.min(self.max_frame)),
        )
        .await;
        if let Ok(Ok((m, info))) = &msg
            && let Err(e) = transport::Egress::received(&*self.audit, site, m, info)
        {
            // A hello the compliance log cannot record is not acted on.
            self.refuse(
                conn,
                Some(site),
                ErrorCode::Internal,
                format!("the aggregator cannot write its compliance log: {e}"),
            );
            return None;
        }
        let msg = msg.map(|r| r.map(|(m, _)| m));
        let (code, reason) = match msg {
            Ok(Ok(Message::Hello(_))) if self.ha.as_ref().is_some_and(|ha| !ha.is_active()) => {
                let reason = self
                    .ha
                    .as_ref()
                    .map(crate::ha::Ha::refusal)
                    .unwrap_or_default();
                // Not an error: nodes try every instance until they find the active one.
                tracing::debug!(%site, "{reason}");
                reply_error(
                    &mut send,
                    ErrorCode::NotActive,
                    &reason,
                    self.max_frame,
                    Some((&*self.audit, site)),
                )
                .await;
                transport::close(conn, ErrorCode::NotActive, &reason);
                return None;
            }
            Ok(Ok(Message::Hello(hello))) if hello.site == site => {
                let welcome = Message::Welcome(Welcome {
                    aggregator: self.name.clone(),
                    software: crate::SOFTWARE.to_string(),
                });
                let log: Option<(&dyn transport::Egress, &str)> = Some((&*self.audit, site));
                return match transport::write_message_logged(
                    &mut send,
                    &welcome,
                    self.max_frame,
                    log,
                )
                .await
                {
                    Ok(_) => Some(hello),
                    Err(e) => {
                        warn!(%site, "could not send welcome: {e}");
                        None
                    }
                };
            }
            Ok(Ok(Message::Hello(hello))) => (
                ErrorCode::SiteNotAllowed,
                format!(
                    "hello names site '{}' but the certificate is for '{site}'",
                    hello.site
                ),
            ),
            Ok(Ok(other)) => (
                ErrorCode::UnexpectedMessage,
                format!("expected a hello, got a {}", other.kind()),
            ),
            Ok(Err(TransportError::Frame(e))) => (e.code(), e.to_string()),
            Ok(Err(e)) => (ErrorCode::Malformed, format!("reading hello: {e}")),
            Err(_) => (
                ErrorCode::UnexpectedMessage,
                "no complete hello within 10 s".into(),
            ),
        };
        reply_error(
            &mut send,
            code,
            &reason,
            self.max_frame,
            Some((&*self.audit, site)),
        )
        .await;
        self.refuse(conn, Some(site), code, reason);
        None
    }
}

/// Answers a stream with an error, recorded in the compliance log first when `log` names it
/// (what leaves the aggregator is logged; a refusal to a site is no exception).
async fn reply_error(
    send: &mut quinn::SendStream,
    code: ErrorCode,
    reason: &str,
    max: u32,
    log: Option<(&dyn transport::Egress, &str)>,
) {
    let msg = Message::Error(ErrorMessage {
        code,
        reason: reason.to_string(),
    });
    if transport::write_message_logged(send, &msg, max, log)
        .await
        .is_ok()
    {
        // Give the error a moment to reach the peer before the connection is closed.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
}

/// Answers a stream a site opened after its hello with an error; what the site sent and
/// the error are recorded in the compliance log as every other message is (a message the
/// log cannot record gets no answer, and the connection ends).
async fn answer_unexpected_stream(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    max: u32,
    audit: &medfed_infra::auditlog::AuditLog,
    site: &str,
) {
    let read =
        tokio::time::timeout(HELLO_TIMEOUT, transport::read_message_info(&mut recv, max)).await;
    let read = read.unwrap_or(Err(TransportError::Timeout {
        what: "a complete message",
        after: HELLO_TIMEOUT,
    }));
    if let Ok((m, info)) = &read
        && let Err(e) = transport::Egress::received(audit, site, m, info)
    {
        warn!(%site, "cannot write the compliance log: {e}");
        transport::close(
            conn,
            ErrorCode::Internal,
            "the aggregator cannot write its compliance log",
        );
        return;
    }
    let read = read.map(|(m, _)| m);
    let (code, reason) = match read {
        Ok(msg) => (
            ErrorCode::UnexpectedMessage,
            format!("the aggregator does not accept a {} here", msg.kind()),
        ),
        Err(TransportError::Frame(e)) => (e.code(), e.to_string()),
        Err(e) => (ErrorCode::Malformed, e.to_string()),
    };
    let msg = Message::Error(ErrorMessage {
        code,
        reason: reason.clone(),
    });
    if let Err(e) = transport::write_message_logged(&mut send, &msg, max, Some((audit, site))).await
    {
        // Unanswered (the log could not record the answer, or the stream broke): the
        // connection ends rather than leave the site with an empty stream.
        warn!(%site, "cannot answer a stream opened after the hello: {e}");
        transport::close(
            conn,
            ErrorCode::Internal,
            "the aggregator could not answer a stream",
        );
        return;
    }
    // Give the error a moment to reach the site.
    if tokio::time::timeout(Duration::from_millis(500), send.stopped())
        .await
        .is_err()
    {
        tracing::debug!(%site, "the site did not take the error within 500 ms");
    }
    if code != ErrorCode::UnexpectedMessage {
        // A broken frame leaves the peer in an unknown state: end the connection.
        transport::close(conn, code, &reason);
    }
}
