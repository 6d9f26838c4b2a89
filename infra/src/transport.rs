//! QUIC endpoints with mutual TLS, and framed messages over QUIC streams.
//!
//! - TLS 1.3 only, rustls with the ring provider, ALPN [`ALPN`].
//! - The aggregator's endpoint requires a client certificate that chains to the consortium
//!   CA; the site name is the certificate's common name ([`peer_site`]). Whether that site
//!   may take part is the aggregator's decision (its allow-list), made right after the
//!   handshake.
//! - Nodes only dial out: [`client_endpoint`] binds an ephemeral port and accepts no
//!   connections.
//! - Each request/response exchange uses its own bidirectional stream and one frame each way
//!   ([`read_message`], [`write_message`]); the frame length is checked before the body is
//!   read or allocated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use medfed_protocol::codec::{self, FrameError, HEADER_BYTES};
use medfed_protocol::{ErrorCode, Message};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
pub use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// Our ALPN protocol identifier; a peer that does not offer it fails the handshake.
pub const ALPN: &[u8] = b"medfed/1";

/// Why setting up TLS, connecting, or exchanging a message failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A certificate, key or CRL file could not be read as PEM.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// rustls refused the TLS configuration.
    #[error("TLS configuration: {}", crate::tls_errors::tls_error(.0))]
    Tls(rustls::Error),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// quinn could not start a connection (e.g. a bad address or server name).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed: a failed handshake, a timeout, the peer's close.
    #[error("connection: {}", crate::tls_errors::connection_error(.0))]
    Connection(quinn::ConnectionError),
    /// A stream could not be read to the end of a frame.
    #[error("reading from the peer: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// A stream could not be written.
    #[error("writing to the peer: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was closed before the message was sent.
    #[error("the stream was closed before the message was sent")]
    StreamClosed,
    /// A frame was too large, of another protocol version, or not a valid message.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer answered with an [`medfed_protocol::messages::ErrorMessage`].
    #[error("the peer answered with an error ({code}): {reason}")]
    Peer {
        /// The peer's error code.
        code: ErrorCode,
        /// The peer's reason, in words.
        reason: String,
    },
    /// No answer in time.
    #[error("timed out after {} waiting for {what}", seconds(.after))]
    Timeout {
        /// What was awaited (e.g. "the node's model update").
        what: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The peer's certificate is missing, unreadable, or names no usable site.
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
    /// A private key that is not the certificate's (it signs for another certificate).
    #[error(
        "the private key {} does not belong to the certificate {}: install the key.pem issued with this cert.pem (the two come from the same folder of `medfed pki issue`)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The private key file.
        key: PathBuf,
    },
    /// The compliance log could not record the message, so it was not sent (or not used).
    #[error("the compliance log cannot record the message, so it was not sent or used: {0}")]
    Unlogged(String),
}

// Not `#[from]`: the source's own text (enum names, UNIX times) would follow the words
// above in an error chain.
impl From<rustls::Error> for TransportError {
    fn from(e: rustls::Error) -> Self {
        TransportError::Tls(e)
    }
}

impl From<quinn::ConnectionError> for TransportError {
    fn from(e: quinn::ConnectionError) -> Self {
        TransportError::Connection(e)
    }
}

/// A duration as seconds, e.g. `15 s` or `2.5 s`.
fn seconds(d: &Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl TransportError {
    /// If the TLS handshake failed: who refused which certificate, and why.
    pub fn handshake_failure(&self) -> Option<crate::tls_errors::HandshakeFailure> {
        match self {
            TransportError::Connection(e) => crate::tls_errors::HandshakeFailure::of(e),
            _ => None,
        }
    }

    /// If the peer closed the connection on purpose, its error code and reason.
    pub fn closed_by_peer(&self) -> Option<(ErrorCode, String)> {
        let TransportError::Connection(conn) = self else {
            return None;
        };
        match conn {
            quinn::ConnectionError::ApplicationClosed(close) => Some((
                ErrorCode::from_close_code(close.error_code.into_inner()),
                String::from_utf8_lossy(&close.reason).into_owned(),
            )),
            _ => None,
        }
    }
}

/// A party's certificate chain and private key, loaded from PEM files.
pub struct Identity {
    /// The certificate, then any intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The certificate's private key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn pem_err(path: &Path, detail: impl std::fmt::Display) -> TransportError {
    TransportError::Pem {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Reads every certificate in a PEM file; a file with none is an error naming it.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate in this file"));
    }
    Ok(certs)
}

impl Identity {
    /// The certificate in `cert` and its private key in `key`; a key that is not the
    /// certificate's is refused here, naming both files.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TransportError> {
        let identity = Identity {
            cert_chain: load_certs(cert)?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?,
        };
        let signing = provider()
            .key_provider
            .load_private_key(identity.key.clone_key())
            .map_err(|e| {
                pem_err(
                    key,
                    format!(
                        "not a private key medfed can use: {}",
                        crate::tls_errors::tls_error(&e)
                    ),
                )
            })?;
        let certified = rustls::sign::CertifiedKey::new(identity.cert_chain.clone(), signing);
        match certified.keys_match() {
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(TransportError::KeyMismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                })
            }
            // A key whose public half cannot be derived is checked by the handshake itself.
            _ => Ok(identity),
        }
    }
}

/// What a party trusts: certificates issued by the consortium CA, less those its
/// certificate revocation list revokes (`medfed pki revoke`; `[tls] crl`).
#[derive(Debug, Clone)]
pub struct Trust {
    /// The consortium CA's certificate(s).
    pub roots: Arc<rustls::RootCertStore>,
    /// The certificate revocation lists checked (empty without `[tls] crl`).
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Trust {
    /// The CA in `ca` (PEM) and, if given, the CRL in `crl` (PEM).
    pub fn load(ca: &Path, crl: Option<&Path>) -> Result<Trust, TransportError> {
        let crls = match crl {
            Some(path) => {
                let crls = CertificateRevocationListDer::pem_file_iter(path)
                    .map_err(|e| pem_err(path, e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| pem_err(path, e))?;
                if crls.is_empty() {
                    return Err(pem_err(path, "no certificate revocation list in this file"));
                }
                crls
            }
            None => Vec::new(),
        };
        Ok(Trust {
            roots: load_roots(ca)?,
            crls,
        })
    }

    /// A verifier of client (site) certificates: chained to the CA, not revoked.
    pub fn client_verifier(
        &self,
    ) -> Result<
        Arc<dyn rustls::server::danger::ClientCertVerifier>,
        rustls::server::VerifierBuilderError,
    > {
        let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        );
        if self.crls.is_empty() {
            builder.build()
        } else {
            builder
                .with_crls(self.crls.iter().cloned())
                .only_check_end_entity_revocation()
                .build()
        }
    }

    fn server_verifier(
        &self,
    ) -> Result<Arc<rustls::client::WebPkiServerVerifier>, rustls::server::VerifierBuilderError>
    {
        let builder = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        );
        if self.crls.is_empty() {
            builder.build()
        } else {
            builder
                .with_crls(self.crls.iter().cloned())
                .only_check_end_entity_revocation()
                .build()
        }
    }
}

/// The consortium CA as a root store.
pub fn load_roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| pem_err(ca, e))?;
    }
    Ok(Arc::new(roots))
}

/// A TLS client configuration (TCP services: the operations endpoint, a database) that
/// trusts the CA certificates in `ca` (PEM) and verifies the server's name; ring, TLS 1.2
/// and 1.3.
pub fn tls_client_config(ca: &Path) -> Result<rustls::ClientConfig, TransportError> {
    let roots = load_roots(ca)?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| pem_err(ca, e))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Flow-control windows large enough that one model update of tens of MB is not throttled
/// by the receiver; a keep-alive every 3 s holds idle connections open through NATs, and 10 s
/// without any packet means the peer is gone (a killed node is noticed within 10 s).
fn transport_config() -> quinn::TransportConfig {
    transport_config_with(Liveness::default())
}

/// How a connection shows it is alive, and how soon a silent peer counts as gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often an idle connection sends a keep-alive packet.
    pub keep_alive: Duration,
    /// How long without any packet before the peer counts as gone.
    pub idle_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            keep_alive: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
        }
    }
}

fn transport_config_with(l: Liveness) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let idle_ms = u32::try_from(l.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20))
        .receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(64 << 20)
        .keep_alive_interval(Some(l.keep_alive))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(idle_ms).into()));
    t
}

/// The connection-level credit a node gets at the handshake, before its hello.
pub const PRE_HELLO_RECEIVE_WINDOW: u32 = 64 * 1024;

/// The connection-level receive window of a welcomed connection.
pub const RECEIVE_WINDOW: u32 = 64 << 20;

/// The aggregator's endpoint: listens on `addr`, demands a client certificate from `ca`.
pub fn server_endpoint(
    addr: SocketAddr,
    trust: &Trust,
    identity: Identity,
) -> Result<quinn::Endpoint, TransportError> {
    let verifier = trust
        .client_verifier()
        .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // A node opens one stream (its hello) and answers the aggregator's; it may not open more
    // at once, nor any one-way stream, so it cannot make the aggregator buffer for it.
    let mut t = transport_config();
    t.max_concurrent_bidi_streams(2u8.into())
        .max_concurrent_uni_streams(0u8.into())
        // What a new connection may send before the aggregator has taken its hello: the
        // credit granted at the handshake cannot be taken back, so it starts small, and
        // the aggregator raises it (`Connection::set_receive_window`) once the site is
        // welcomed.
        .receive_window(quinn::VarInt::from_u32(PRE_HELLO_RECEIVE_WINDOW));
    config.transport_config(Arc::new(t));
    quinn::Endpoint::server(config, addr).map_err(|source| TransportError::Bind { addr, source })
}

/// A node's endpoint: dials out only, trusts only the consortium CA, presents the site's
/// certificate.
pub fn client_endpoint(
    server: SocketAddr,
    trust: &Trust,
    identity: Identity,
) -> Result<quinn::Endpoint, TransportError> {
    client_endpoint_with(server, trust, identity, Liveness::default())
}

/// As [`client_endpoint`], with the node's own keep-alive and idle timeout (the smaller of
/// the two sides' idle timeouts applies, so a node can notice a dead aggregator sooner).
pub fn client_endpoint_with(
    server: SocketAddr,
    trust: &Trust,
    identity: Identity,
    liveness: Liveness,
) -> Result<quinn::Endpoint, TransportError> {
    let verifier = trust
        .server_verifier()
        .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(rustls::Error::General(e.to_string())))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config_with(liveness)));
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|source| TransportError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// The site name (certificate common name) of a connected peer. The TLS layer has already
/// verified the certificate against the consortium CA.
pub fn peer_site(conn: &quinn::Connection) -> Result<String, TransportError> {
    let chain = conn
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| TransportError::PeerCertificate("no client certificate".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TransportError::PeerCertificate("empty certificate chain".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TransportError::PeerCertificate(e.to_string()))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| TransportError::PeerCertificate("no common name".into()))?;
    Ok(cn.to_string())
}

/// The names (DNS names and IP addresses of the subject alternative names) of the first
/// certificate in the PEM file `path`: what a client may verify it against.
pub fn certificate_names(path: &Path) -> Result<Vec<String>, TransportError> {
    let certs = load_certs(path)?;
    let leaf = certs
        .first()
        .ok_or_else(|| pem_err(path, "no certificate".to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| pem_err(path, e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        names.push(std::net::IpAddr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        names.push(std::net::IpAddr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

/// Closes `conn` with `code` and a human-readable reason that the peer will see.
pub fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    // QUIC close reasons must fit in one packet; keep them short.
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    conn.close(quinn::VarInt::from_u32(code.to_close_code()), reason);
}

/// Size and SHA-256 of a frame that crossed the wire (what the compliance log records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    /// The frame's length on the wire, header included.
    pub bytes: u64,
    /// SHA-256 of the frame (hex).
    pub sha256: String,
}

impl FrameInfo {
    /// Of a whole encoded frame.
    pub fn of_frame(frame: &[u8]) -> FrameInfo {
        FrameInfo::of(frame, &[])
    }

    fn of(header: &[u8], payload: &[u8]) -> FrameInfo {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(header);
        ctx.update(payload);
        FrameInfo {
            bytes: (header.len() + payload.len()) as u64,
            sha256: medfed_protocol::hex::encode(ctx.finish().as_ref()),
        }
    }
}

/// Records what crosses a party's boundary (the compliance log implements it). Fails
/// closed: [`Egress::sent`] is called before a frame leaves, and a frame it cannot record is
/// not sent; a message [`Egress::received`] cannot record is not acted on.
pub trait Egress: Send + Sync {
    /// Records `msg`, about to be sent to `peer`; an error stops the send.
    fn sent(&self, peer: &str, msg: &Message, frame: &FrameInfo) -> Result<(), String>;
    /// Records `msg`, received from `peer`; an error means it is not acted on.
    fn received(&self, peer: &str, msg: &Message, frame: &FrameInfo) -> Result<(), String>;
}

/// Reads one framed message. The length is checked against `max` before the body is read or
/// allocated.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    max: u32,
) -> Result<Message, TransportError> {
    Ok(read_message_info(recv, max).await?.0)
}

/// As [`read_message`], also returning the frame's size and hash.
pub async fn read_message_info(
    recv: &mut quinn::RecvStream,
    max: u32,
) -> Result<(Message, FrameInfo), TransportError> {
    let mut header = [0u8; HEADER_BYTES];
    recv.read_exact(&mut header).await.map_err(read_err)?;
    let len = codec::check_frame_length(header, max)?;
    // The buffer grows as bytes arrive: a peer that announces a large frame and sends little
    // costs little.
    let mut payload = Vec::with_capacity(len.min(1 << 20));
    while payload.len() < len {
        match recv.read_chunk(len - payload.len(), true).await {
            Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(TransportError::Read(quinn::ReadExactError::FinishedEarly(
                    payload.len(),
                )));
            }
            Err(quinn::ReadError::ConnectionLost(c)) => return Err(TransportError::Connection(c)),
            Err(e) => return Err(TransportError::Read(quinn::ReadExactError::ReadError(e))),
        }
    }
    let info = FrameInfo::of(&header, &payload);
    Ok((codec::decode_payload(&payload)?, info))
}

/// A lost connection is reported as such, with quinn's reason (e.g. a TLS alert), rather
/// than as a bare "connection lost" on a stream.
fn read_err(e: quinn::ReadExactError) -> TransportError {
    match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
            TransportError::Connection(c)
        }
        e => TransportError::Read(e),
    }
}

fn write_err(e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::ConnectionLost(c) => TransportError::Connection(c),
        e => TransportError::Write(e),
    }
}

/// Writes one framed message and finishes the stream.
pub async fn write_message(
    send: &mut quinn::SendStream,
    msg: &Message,
    max: u32,
) -> Result<FrameInfo, TransportError> {
    write_message_logged(send, msg, max, None).await
}

/// As [`write_message`], first recording the frame with `log` under the peer's name: a
/// frame that cannot be recorded is not sent ([`TransportError::Unlogged`]).
pub async fn write_message_logged(
    send: &mut quinn::SendStream,
    msg: &Message,
    max: u32,
    log: Option<(&dyn Egress, &str)>,
) -> Result<FrameInfo, TransportError> {
    let frame = codec::encode_frame(msg, max)?;
    let info = FrameInfo::of(&frame[..HEADER_BYTES], &frame[HEADER_BYTES..]);
    if let Some((log, peer)) = log {
        log.sent(peer, msg, &info)
            .map_err(TransportError::Unlogged)?;
    }
    send.write_all(&frame).await.map_err(write_err)?;
    send.finish().map_err(|_| TransportError::StreamClosed)?;
    Ok(info)
}

/// One request/response exchange on a new bidirectional stream, bounded by `timeout`.
/// An [`Message::Error`] answer becomes [`TransportError::Peer`].
pub async fn request(
    conn: &quinn::Connection,
    msg: &Message,
    max: u32,
    timeout: Duration,
) -> Result<Message, TransportError> {
    request_logged(conn, msg, max, timeout, None).await
}

/// As [`request`], recording both frames with `log` under the peer's name `peer`.
pub async fn request_logged(
    conn: &quinn::Connection,
    msg: &Message,
    max: u32,
    timeout: Duration,
    log: Option<(&dyn Egress, &str)>,
) -> Result<Message, TransportError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_message_logged(&mut send, msg, max, log).await?;
        let (answer, received) = read_message_info(&mut recv, max).await?;
        if let Some((log, peer)) = log {
            log.received(peer, &answer, &received)
                .map_err(TransportError::Unlogged)?;
        }
        Ok(answer)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(TransportError::Timeout {
            what: msg_response_name(msg),
            after: timeout,
        }),
        Ok(Ok(Message::Error(e))) => Err(TransportError::Peer {
            code: e.code,
            reason: e.reason,
        }),
        Ok(other) => other,
    }
}

fn msg_response_name(msg: &Message) -> &'static str {
    match msg {
        Message::Hello(_) => "the aggregator's welcome",
        Message::StudyAnnouncement(_) => "the node's study decision",
        Message::RoundOpen(_) => "the node's model update",
        Message::EvaluateRequest(_) => "the node's evaluation report",
        _ => "a response",
    }
}
