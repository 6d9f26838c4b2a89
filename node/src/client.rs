//! The node's connection to the aggregator: dial out, say hello, answer the aggregator's
//! requests, and reconnect with exponential backoff when the connection is lost.
//!
//! Egress: the only things this module sends are protocol messages built from aggregates
//! (feature statistics, model parameters, evaluation summaries). No row is ever sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use medfed_infra::auditlog::AuditLog;
use medfed_infra::identity::SiteSigner;
use medfed_infra::transport::{self, Identity, TransportError};
use medfed_protocol::messages::{
    DatasetInfo, ErrorMessage, EvaluateRequest, EvaluationReport, Hello, ModelUpdate, RoundOpen,
    StudyAnnouncement, StudyDecision, training_binding,
};
use medfed_protocol::metrics::Evaluation;
use medfed_protocol::model::{GlobalModel, TrainError, mean_loss, predict, train_local_until};
use medfed_protocol::{ErrorCode, Message};
use ndarray::Array2;
use tracing::{debug, error, info, warn};

use crate::columns::ColumnClasses;
use crate::config::NodeConfig;
use crate::data::{StudyData, Table};

/// The software version reported to the aggregator and in the compliance log.
pub const SOFTWARE: &str = concat!("medfed-node ", env!("CARGO_PKG_VERSION"));

/// The peer name compliance-log records use for the aggregator.
const AGGREGATOR: &str = "aggregator";

const HELLO_TIMEOUT: Duration = Duration::from_secs(15);

/// The grid, `2^-bits`, on which a site puts a differentially private model delta sent
/// without secure aggregation, before its noise.
const TRAINING_GRID_BITS: u8 = 30;

/// Why the node could not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A dataset could not be loaded.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// TLS, the connection, or a message exchange failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The aggregator's address did not resolve.
    #[error("cannot resolve aggregator address {address:?}: {detail}")]
    Resolve {
        /// The address configured.
        address: String,
        /// The resolver's error.
        detail: String,
    },
    /// The compliance log could not be opened.
    #[error(transparent)]
    Audit(#[from] medfed_infra::auditlog::AuditLogError),
    /// The aggregator refused this node (its hello), e.g. a site not on its allow-list.
    #[error("the aggregator refused this node ({code}): {reason}")]
    Refused {
        /// The aggregator's error code.
        code: ErrorCode,
        /// The aggregator's reason.
        reason: String,
    },
    /// The privacy ledger or its compliance-log record could not be written.
    #[error("{0}")]
    Privacy(String),
    /// The node's durable store could not be opened or read.
    #[error("the node's store: {0}")]
    Store(String),
    /// A file or directory of the node's state is open to other users.
    #[error("{0} (the node does not start until then)")]
    Private(#[from] medfed_infra::files::NotPrivate),
    /// This site's certificate cannot be used (expired, revoked, not valid yet): the node
    /// stops rather than retry.
    #[error("{detail}\nfix: {fix}")]
    Certificate {
        /// What is wrong with it.
        detail: String,
        /// What the site's operator should do.
        fix: String,
    },
}

/// Why [`Node::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeExit {
    /// The aggregator finished all its studies and closed the connection.
    StudiesComplete,
    /// [`Node::run`]'s stop signal fired.
    Stopped,
}

/// Where a dataset's rows come from.
enum Dataset {
    /// A CSV file, loaded at start, and its columns' classes.
    File(Arc<Table>, ColumnClasses),
    /// The records an `[[ingest]]` pipeline has kept in the node's store, read when a study
    /// or query needs them (so records ingested since are included).
    Ingested(Box<crate::ingest::IngestConfig>),
}

/// A hospital node: its datasets, its studies' prepared rows, its QUIC endpoint.
pub struct Node {
    pub(crate) config: NodeConfig,
    datasets: HashMap<String, Dataset>,
    /// The node's store, where ingested datasets are read from.
    store: Option<Arc<dyn medfed_infra::store::Store>>,
    studies: Mutex<HashMap<String, Arc<StudyData>>>,
    /// Signs secure-aggregation keys with the site certificate's key.
    pub(crate) signer: SiteSigner,
    /// The consortium CA, to check other sites' certificates.
    pub(crate) roots: transport::Trust,
    /// Secure aggregations in progress, by study and round.
    pub(crate) secure: Mutex<HashMap<(String, u32), crate::secure::Party>>,
    /// Per study, the last secure aggregation this site finished: its round, the last
    /// request and the answer (the shares revealed). The same request delivered again gets
    /// the same answer, not an error that would drop the site from a sum it is in.
    pub(crate) secure_done: Mutex<crate::secure::Finished>,
    /// The parties of each (study, round) this site revealed unmasking shares for, kept in
    /// the state directory.
    pub(crate) revealed: crate::secure::RevealedRounds,
    /// The site's compliance log: every message in and out, every study decision.
    pub(crate) audit: Arc<AuditLog>,
    /// The differential-privacy budget spent, per study.
    pub(crate) ledger: crate::privacy::LedgerFile,
    /// The cohorts of the statistics queries answered (differencing protection).
    pub(crate) cohorts: crate::statistics::CohortMemory,
    /// The steps of iterative queries answered, per query (at most each query's steps).
    pub(crate) answered_steps: crate::statistics::AnsweredSteps,
    /// What was announced to this site (`medfed node studies`).
    pub(crate) announced: crate::announced::AnnouncedStudies,
    /// The last differentially private update sent in the clear, per study, with the
    /// round and what it answered ([`training_binding`]): a retry of that round from the
    /// same model gets the same update again, which releases nothing new and costs
    /// nothing (fresh noise would be a new release).
    pub(crate) sent_private: Mutex<SentPrivate>,
    /// Where the ingestion pipelines of this process stand: a dataset that reads one is
    /// served once it has caught up (none: every dataset is served as it is).
    readiness: Option<Arc<crate::ingest::ready::Readiness>>,
}

/// The last differentially private update sent in the clear per study: (round, what it
/// answered, the update).
pub(crate) type SentPrivate = HashMap<String, (u32, [u8; 32], ModelUpdate)>;

/// The longest one round's local training may run on a site (an hour), whatever the
/// round's deadline or epochs say: a hostile or misconfigured aggregator cannot hold the
/// site's CPU for longer (a round without a deadline would otherwise train for as many
/// epochs as it names, up to 4 billion).
pub const MAX_TRAINING_MS: u64 = 60 * 60 * 1000;

/// How long one round's training may run on this site when the aggregator asks for
/// `asked` ms (0: no deadline): never more than [`MAX_TRAINING_MS`].
fn training_deadline_ms(asked: u64) -> u64 {
    match asked {
        0 => MAX_TRAINING_MS,
        d => d.min(MAX_TRAINING_MS),
    }
}

/// The result of local training in one round.
pub(crate) struct LocalUpdate {
    pub weights: Vec<f64>,
    pub train_loss: f64,
    pub evaluation: Evaluation,
    pub rows: u64,
}

impl Node {
    /// Loads the configured datasets (so a bad file is reported before connecting), opening
    /// the node's store if a dataset is an ingestion pipeline's records.
    pub fn new(config: NodeConfig) -> Result<Node, NodeError> {
        let store = if config.datasets.iter().any(|d| d.ingest.is_some()) {
            Some(
                crate::ingest::open_store(&config.state)
                    .map_err(|e| NodeError::Store(e.to_string()))?,
            )
        } else {
            None
        };
        Node::with_store(config, store)
    }

    /// As [`Node::new`], with the store already open (the ingestion pipelines running in
    /// the same process share it).
    pub fn with_store(
        config: NodeConfig,
        store: Option<Arc<dyn medfed_infra::store::Store>>,
    ) -> Result<Node, NodeError> {
        crate::at_rest::check(&config)?;
        let mut datasets = HashMap::new();
        for d in &config.datasets {
            let dataset = match &d.ingest {
                Some(stream) => {
                    let pipeline = config
                        .ingests
                        .iter()
                        .find(|g| &g.stream == stream)
                        .cloned()
                        .ok_or_else(|| {
                            NodeError::Store(format!(
                                "dataset '{}': no [[ingest]] pipeline '{stream}'",
                                d.name
                            ))
                        })?;
                    let store = store.as_ref().ok_or_else(|| {
                        NodeError::Store(format!(
                            "dataset '{}' reads pipeline '{stream}', but no store is open",
                            d.name
                        ))
                    })?;
                    let rows = crate::ingest::kept_count(&pipeline, &**store)
                        .map_err(|e| NodeError::Store(e.to_string()))?;
                    info!(dataset = %d.name, rows, pipeline = %stream, "dataset: the pipeline's de-identified records (read again for each study)");
                    Dataset::Ingested(Box::new(pipeline))
                }
                None => {
                    let table = Table::load(&d.path)?;
                    info!(dataset = %d.name, rows = table.len(), path = %d.path.display(), "dataset loaded");
                    let classes = ColumnClasses::for_table(&table, &d.classes);
                    for (column, class) in classes.unusable() {
                        info!(dataset = %d.name, %column, "column never used by a study or query: {class}");
                    }
                    for (column, looks) in crate::columns::value_warnings(&table, &d.classes) {
                        warn!(dataset = %d.name, %column, "column not classed whose values look like {looks}: class it in [dataset.classes] (`medfed node check` says how)");
                    }
                    Dataset::File(Arc::new(table), classes)
                }
            };
            datasets.insert(d.name.clone(), dataset);
        }
        let signer = SiteSigner::load(&config.tls.key)?;
        let mut audit = AuditLog::open(
            &config.audit.log,
            &config.audit.key,
            &config.site,
            "node",
            SOFTWARE,
            &config.config_sha256,
        )?;
        if let Some(capture) = &config.audit.capture_sent {
            audit = audit.capture_sent_frames(capture)?;
        }
        for d in config
            .datasets
            .iter()
            .filter(|d| !d.exact_releases.is_empty())
        {
            let releases: Vec<String> = d.exact_releases.iter().map(|r| r.to_string()).collect();
            warn!(
                dataset = %d.name,
                "EXACT releases allowed (no differential privacy): {} (exact_releases in node.toml)",
                releases.join(", ")
            );
            audit
                .record(medfed_protocol::audit::Event::ExactAllowed {
                    dataset: d.name.clone(),
                    releases,
                })
                .map_err(|e| NodeError::Privacy(format!("cannot write the compliance log: {e}")))?;
        }
        let audit = Arc::new(audit);
        let roots = config.tls.trust()?;
        let ledger = crate::privacy::open_ledger(crate::privacy::ledger_path(&config.state.dir))
            .map_err(NodeError::Privacy)?;
        let revealed = crate::secure::RevealedRounds::open(crate::secure::RevealedRounds::path(
            &config.state.dir,
        ))
        .map_err(NodeError::Privacy)?;
        let cohorts = crate::statistics::CohortMemory::open(crate::statistics::CohortMemory::path(
            &config.state.dir,
        ))
        .map_err(NodeError::Privacy)?;
        let answered_steps = crate::statistics::AnsweredSteps::open(
            crate::statistics::AnsweredSteps::path(&config.state.dir),
        )
        .map_err(NodeError::Privacy)?;
        let announced =
            crate::announced::AnnouncedStudies::open(crate::announced::path(&config.state.dir))
                .map_err(NodeError::Privacy)?;
        Ok(Node {
            config,
            datasets,
            store,
            studies: Mutex::default(),
            signer,
            roots,
            secure: Mutex::default(),
            secure_done: Mutex::default(),
            sent_private: Mutex::default(),
            readiness: None,
            revealed,
            audit,
            ledger,
            cohorts,
            answered_steps,
            announced,
        })
    }

    /// Serves the datasets of ingestion pipelines only once `readiness` says they caught
    /// up, and connects to the aggregator only then (or once they failed).
    pub fn with_readiness(mut self, readiness: Arc<crate::ingest::ready::Readiness>) -> Node {
        self.readiness = Some(readiness);
        self
    }

    /// The streams of the ingestion pipelines this node's datasets read.
    fn ingested_streams(&self) -> Vec<String> {
        let mut streams: Vec<String> = self
            .datasets
            .values()
            .filter_map(|d| match d {
                Dataset::Ingested(p) => Some(p.stream.clone()),
                Dataset::File(..) => None,
            })
            .collect();
        streams.sort();
        streams.dedup();
        streams
    }

    fn hello(&self) -> Hello {
        let mut datasets: Vec<DatasetInfo> = self
            .datasets
            .keys()
            .map(|name| DatasetInfo {
                name: name.clone(),
                // Only the columns a study may use: the others' names are nobody's business.
                columns: match self.columns_with_classes(name) {
                    Ok(Some((columns, classes))) => columns
                        .iter()
                        .filter(|c| {
                            classes
                                .class(c)
                                .is_none_or(|(class, _)| crate::columns::usable(*class))
                        })
                        .cloned()
                        .collect(),
                    Ok(None) => Vec::new(),
                    Err(e) => {
                        warn!(dataset = %name, "{e}");
                        Vec::new()
                    }
                },
            })
            .collect();
        datasets.sort_by(|a, b| a.name.cmp(&b.name));
        Hello {
            site: self.config.site.clone(),
            software: SOFTWARE.to_string(),
            datasets,
        }
    }

    async fn resolve(&self) -> Result<SocketAddr, NodeError> {
        self.resolve_address(&self.config.aggregator.address).await
    }

    /// The socket address of the aggregator instance at `address` (`host:port`).
    async fn resolve_address(&self, address: &str) -> Result<SocketAddr, NodeError> {
        let resolve_err = |detail: String| NodeError::Resolve {
            address: address.to_string(),
            detail,
        };
        // An IPv4 address where the name has one: `localhost` often lists ::1 first, while
        // aggregators usually listen on IPv4.
        let found: Vec<SocketAddr> = tokio::net::lookup_host(address)
            .await
            .map_err(|e| resolve_err(e.to_string()))?
            .collect();
        found
            .iter()
            .find(|a| a.is_ipv4())
            .or(found.first())
            .copied()
            .ok_or_else(|| resolve_err("no address found".into()))
    }

    /// Connects once, says hello, and leaves: whether the aggregator is reachable and lets
    /// this site in (`medfed node check`). Returns the aggregator's name.
    pub async fn probe(&self, within: Duration) -> Result<String, NodeError> {
        let addr = self.resolve().await?;
        let identity = Identity::load(&self.config.tls.cert, &self.config.tls.key)?;
        let endpoint = transport::client_endpoint(addr, &self.roots, identity)?;
        let attempt = async {
            let conn = endpoint
                .connect(addr, self.config.aggregator.server_name())
                .map_err(TransportError::from)?
                .await
                .map_err(TransportError::from)?;
            let hello = Message::Hello(self.hello());
            let answer = transport::request_logged(
                &conn,
                &hello,
                self.config.max_frame_bytes,
                within,
                Some((&*self.audit, AGGREGATOR)),
            )
            .await;
            transport::close(&conn, ErrorCode::ShuttingDown, "node check done");
            match answer {
                Ok(Message::Welcome(w)) => Ok(w.aggregator),
                Ok(other) => Err(NodeError::Refused {
                    code: ErrorCode::UnexpectedMessage,
                    reason: format!("expected a welcome, got a {}", other.kind()),
                }),
                Err(TransportError::Peer { code, reason }) => {
                    Err(NodeError::Refused { code, reason })
                }
                Err(e) => Err(classify(e)),
            }
        };
        let result = match tokio::time::timeout(within, attempt).await {
            Ok(r) => r,
            Err(_) => Err(NodeError::Transport(TransportError::Timeout {
                what: "the aggregator's welcome",
                after: within,
            })),
        };
        endpoint.close(quinn::VarInt::from_u32(0), b"node check done");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        if let Err(e) = self.audit.close("node check done") {
            // The check's own result stands; the log's state is for the next start to see
            // (a log not closed is recovered and says so).
            warn!("cannot close the compliance log: {e}");
        }
        result
    }

    /// Connects and serves until the aggregator is done, a permanent refusal, or `stop`.
    /// Transient failures (aggregator down, network lost) are retried with backoff.
    pub async fn run(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<NodeExit, NodeError> {
        // One node process per state directory: two would overwrite each other's privacy
        // ledger, answered cohorts and revealed rounds.
        let _state_lock = lock_state_dir(&self.config.state.dir)?;
        crate::reconnect::own_certificate(&self.config)?;
        tokio::pin!(stop);
        // Datasets fed by ingestion pipelines: connect once they caught up, so that no study
        // starts on part of an extract.
        if let Some(r) = &self.readiness {
            let streams = self.ingested_streams();
            if !streams.is_empty() {
                info!(streams = %streams.join(", "), "waiting for the ingestion pipelines to catch up before connecting to the aggregator");
                let wait = r.wait_for(&streams, Duration::from_secs(10), |behind| {
                    info!(streams = %behind.join(", "), "still catching up; not connected to the aggregator yet");
                });
                tokio::select! {
                    () = wait => {}
                    () = &mut stop => return Ok(NodeExit::Stopped),
                }
                for s in &streams {
                    if let Some(crate::ingest::ready::Stage::Failed(why)) = r.stage(s) {
                        warn!(stream = %s, "ingestion pipeline failed: its datasets are not served ({why})");
                    }
                }
                info!("ingestion pipelines caught up; connecting");
            }
        }
        let node = Arc::new(self);
        let addr = node.resolve().await?;
        let identity = Identity::load(&node.config.tls.cert, &node.config.tls.key)?;
        let endpoint = transport::client_endpoint_with(
            addr,
            &node.roots,
            identity,
            node.config.reconnect.liveness(),
        )?;
        let reconnect = &node.config.reconnect;
        let mut backoff = Duration::from_millis(reconnect.initial_backoff_ms);
        let max_backoff = Duration::from_millis(reconnect.max_backoff_ms);
        let mut addr = addr;
        // [aggregator] others: the instances of a highly available aggregator, tried in turn.
        let addresses: Vec<String> = node
            .config
            .aggregator
            .all()
            .into_iter()
            .map(str::to_string)
            .collect();
        let mut current = 0usize;
        let result = loop {
            let server_name = node
                .config
                .aggregator
                .server_name_for(&addresses[current])
                .to_string();
            let session = node.clone().session(&endpoint, addr, &server_name);
            let outcome = tokio::select! {
                r = session => r,
                () = &mut stop => break Ok(NodeExit::Stopped),
            };
            let err = match outcome {
                Ok(exit) => break Ok(exit),
                Err(SessionEnd { welcomed, error }) => {
                    if welcomed {
                        backoff = Duration::from_millis(reconnect.initial_backoff_ms);
                    }
                    error
                }
            };
            if let NodeError::Refused { code, .. } = &err
                && code.is_permanent()
            {
                break Err(err);
            }
            // A standby of a highly available aggregator names the active instance: go
            // there (if it is one of ours), else to the next address, without backing off.
            let standby = match &err {
                NodeError::Refused {
                    code: ErrorCode::NotActive,
                    reason,
                } => Some(reason.clone()),
                _ => None,
            };
            let hinted = standby
                .as_deref()
                .and_then(ErrorCode::not_active_hint)
                .and_then(|h| addresses.iter().position(|a| a == h))
                .filter(|&i| i != current);
            let previous = current;
            if addresses.len() > 1 {
                current = hinted.unwrap_or((current + 1) % addresses.len());
            }
            // Named by a standby: go there at once. (A standby that names no active
            // instance is waited for with the usual backoff: none may be active for a while.)
            if let (Some(reason), Some(_)) = (&standby, hinted) {
                info!(site = %node.config.site, "{reason}; dialling {}", addresses[current]);
                backoff = Duration::from_millis(reconnect.initial_backoff_ms);
                match node.resolve_address(&addresses[current]).await {
                    Ok(a) => addr = a,
                    Err(e) => {
                        warn!(site = %node.config.site, "{e}");
                        current = previous;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut stop => break Ok(NodeExit::Stopped),
                }
                continue;
            }
            // Jitter (up to a quarter of the wait) keeps many nodes from reconnecting in step.
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.25);
            let wait = match crate::reconnect::next(&node.config, err) {
                crate::reconnect::Next::Stop(e) => break Err(e),
                crate::reconnect::Next::RetryRarely(why) => {
                    let wait = crate::reconnect::RARE_RETRY;
                    error!(site = %node.config.site, "{why}; trying again in {} minutes", wait.as_secs() / 60);
                    wait
                }
                crate::reconnect::Next::Retry(err) => {
                    warn!(site = %node.config.site, "{err}; reconnecting in {:.1} s", (backoff + jitter).as_secs_f64());
                    backoff + jitter
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut stop => break Ok(NodeExit::Stopped),
            }
            backoff = (backoff * 2).min(max_backoff);
            // The aggregator may have moved (a new address behind its name).
            match node.resolve_address(&addresses[current]).await {
                Ok(a) if a != addr => {
                    info!(site = %node.config.site, "the aggregator's address is now {a}");
                    addr = a;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(site = %node.config.site, "{e}; trying the last known address");
                    current = previous;
                }
            }
        };
        endpoint.close(
            quinn::VarInt::from_u32(ErrorCode::ShuttingDown.to_close_code()),
            b"node stopping",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        let reason = match &result {
            Ok(NodeExit::StudiesComplete) => "the aggregator completed all studies".to_string(),
            Ok(NodeExit::Stopped) => "stopped by the operator".to_string(),
            Err(e) => format!("stopped on an error: {e}"),
        };
        if let Err(e) = node.audit.close(&reason) {
            warn!("cannot close the compliance log: {e}");
        }
        result
    }

    /// One connection's life.
    async fn session(
        self: Arc<Self>,
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<NodeExit, SessionEnd> {
        let fail = |welcomed: bool| move |e: NodeError| SessionEnd { welcomed, error: e };
        let max = self.config.max_frame_bytes;
        let conn = async {
            let connecting = endpoint
                .connect(addr, server_name)
                .map_err(TransportError::from)?;
            Ok::<_, NodeError>(connecting.await.map_err(TransportError::from)?)
        }
        .await
        .map_err(fail(false))?;
        let hello = Message::Hello(self.hello());
        match transport::request_logged(
            &conn,
            &hello,
            max,
            HELLO_TIMEOUT,
            Some((&*self.audit, AGGREGATOR)),
        )
        .await
        {
            Ok(Message::Welcome(w)) => {
                info!(site = %self.config.site, aggregator = %w.aggregator, software = %w.software, "connected to the aggregator");
            }
            Ok(other) => {
                let reason = format!("expected a welcome, got a {}", other.kind());
                transport::close(&conn, ErrorCode::UnexpectedMessage, &reason);
                return Err(fail(false)(NodeError::Refused {
                    code: ErrorCode::UnexpectedMessage,
                    reason,
                }));
            }
            Err(TransportError::Peer { code, reason }) => {
                return Err(fail(false)(NodeError::Refused { code, reason }));
            }
            Err(e) => return Err(fail(false)(classify(e))),
        }
        loop {
            tokio::select! {
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let (node, conn) = (self.clone(), conn.clone());
                        tokio::spawn(async move { node.answer(&conn, send, recv).await });
                    }
                    Err(e) => return closed(e),
                },
                uni = conn.accept_uni() => match uni {
                    Ok(mut recv) => match transport::read_message_info(&mut recv, max).await {
                        Ok((msg, frame)) => {
                            // A message the compliance log cannot record is not used.
                            if transport::Egress::received(&*self.audit, AGGREGATOR, &msg, &frame).is_ok() {
                                self.one_way(msg);
                            }
                        }
                        Err(e) => warn!("unreadable one-way message: {e}"),
                    },
                    Err(e) => return closed(e),
                },
            }
        }
    }

    /// Answers one request from the aggregator without a network: recorded in the
    /// compliance log as received, answered as over QUIC, the answer recorded as sent
    /// (a request or answer the log cannot record is not acted on, or not given). For
    /// simulations (`tests/sim.rs`) and fuzzing; the node's sessions use the same steps.
    pub async fn serve(&self, msg: Message) -> Message {
        let max = self.config.max_frame_bytes;
        let info = |m: &Message| {
            medfed_protocol::codec::encode_frame(m, max)
                .map(|f| transport::FrameInfo::of_frame(&f))
                .map_err(|e| e.to_string())
        };
        let unlogged = || {
            Message::Error(ErrorMessage {
                code: ErrorCode::Internal,
                reason: "this site cannot write its compliance log, so it does not answer".into(),
            })
        };
        let received = info(&msg)
            .and_then(|i| transport::Egress::received(&*self.audit, AGGREGATOR, &msg, &i));
        if received.is_err() {
            return unlogged();
        }
        let reply = self.respond(msg).await;
        match info(&reply)
            .and_then(|i| transport::Egress::sent(&*self.audit, AGGREGATOR, &reply, &i))
        {
            Ok(()) => reply,
            Err(_) => unlogged(),
        }
    }

    /// A one-way message from the aggregator without a network (see [`Node::serve`]).
    pub fn serve_one_way(&self, msg: Message) {
        self.one_way(msg);
    }

    fn one_way(&self, msg: Message) {
        match msg {
            Message::RoundResult(r) => info!(
                study = %r.study_id, round = r.round, sites = r.participants.len(),
                train_loss = r.train_loss, complete = r.study_complete, "round result"
            ),
            other => debug!("ignored one-way {}", other.kind()),
        }
    }

    /// Answers one request stream from the aggregator.
    async fn answer(
        &self,
        conn: &quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let max = self.config.max_frame_bytes;
        // A request that does not arrive in full within the hello timeout is dropped.
        let read =
            tokio::time::timeout(HELLO_TIMEOUT, transport::read_message_info(&mut recv, max));
        let Ok(read) = read.await else {
            warn!(
                "a request from the aggregator did not arrive within {} s; dropped",
                HELLO_TIMEOUT.as_secs()
            );
            return;
        };
        let reply = match read {
            Ok((msg, frame)) => {
                match transport::Egress::received(&*self.audit, AGGREGATOR, &msg, &frame) {
                    Ok(()) => self.respond(msg).await,
                    // A request the compliance log cannot record is not acted on.
                    Err(_) => Message::Error(ErrorMessage {
                        code: ErrorCode::Internal,
                        reason: "this site cannot write its compliance log, so it does not answer"
                            .into(),
                    }),
                }
            }
            Err(TransportError::Frame(e)) => {
                warn!("unreadable request from the aggregator: {e}");
                transport::close(conn, e.code(), &e.to_string());
                return;
            }
            Err(e) => {
                debug!("request stream failed: {e}");
                return;
            }
        };
        // Recorded before it leaves; not sent if it cannot be recorded.
        let log: Option<(&dyn transport::Egress, &str)> = Some((&*self.audit, AGGREGATOR));
        if let Err(e) = transport::write_message_logged(&mut send, &reply, max, log).await {
            warn!("could not send the {}: {e}", reply.kind());
        }
    }

    async fn respond(&self, msg: Message) -> Message {
        let result = match msg {
            Message::StudyAnnouncement(a) => Ok(self.announced_study(&a)),
            Message::RoundOpen(r) if r.secure.is_some() => self.train_secure(r).await,
            Message::RoundOpen(r) => self.train(r).await,
            Message::SecAggToNode(m) => self.secure_step(m),
            Message::StatisticsOpen(s) => self.statistics_secure(s),
            Message::StatisticsQuery(q) => {
                let hash = crate::policy::query_hash(&q.query);
                let summary = crate::announced::Announced::of_query(
                    &q.query,
                    hash.clone(),
                    q.secure.is_some(),
                    self.config.policy.privacy.delta,
                );
                match self.log_announced(&q.query.query_id, &hash, &summary) {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let answer = self.answer_query(q);
                        let shown = match &answer {
                            Ok(m) => m.clone(),
                            Err((code, reason)) => Message::Error(ErrorMessage {
                                code: *code,
                                reason: reason.clone(),
                            }),
                        };
                        self.note_announced(summary, &shown);
                        answer
                    }
                }
            }
            Message::EvaluateRequest(r) => self.evaluate(r),
            other => Err((
                ErrorCode::UnexpectedMessage,
                format!("a node does not answer a {}", other.kind()),
            )),
        };
        result.unwrap_or_else(|(code, reason)| {
            warn!(%code, "refused a request: {reason}");
            Message::Error(ErrorMessage { code, reason })
        })
    }

    /// Decides on an announced study, with its summary in the compliance log first and in
    /// the site's list of announcements after.
    fn announced_study(&self, a: &StudyAnnouncement) -> Message {
        let hash = crate::policy::study_hash(a);
        let summary = crate::announced::Announced::of_study(
            a,
            hash.clone(),
            self.config.policy.privacy.delta,
        );
        if let Err((code, reason)) = self.log_announced(&a.study_id, &hash, &summary) {
            return Message::Error(ErrorMessage { code, reason });
        }
        let answer = self.decide(a);
        self.note_announced(summary, &answer);
        answer
    }

    /// Records an announcement's summary in the compliance log. Fails closed.
    pub(crate) fn log_announced(
        &self,
        study: &str,
        hash: &str,
        summary: &crate::announced::Announced,
    ) -> Result<(), (ErrorCode, String)> {
        self.audit
            .record(medfed_protocol::audit::Event::Announced {
                study: study.to_string(),
                hash: hash.to_string(),
                summary: summary.describe(),
            })
            .map_err(|e| {
                warn!("cannot write the compliance log: {e}");
                (
                    ErrorCode::Internal,
                    "this site cannot write its compliance log, so it does not answer".to_string(),
                )
            })
    }

    /// Keeps an announcement and this site's answer for `medfed node studies`.
    pub(crate) fn note_announced(&self, summary: crate::announced::Announced, answer: &Message) {
        let decision = match answer {
            Message::StudyDecision(StudyDecision::Accept { .. }) => "accepted".to_string(),
            Message::StudyDecision(StudyDecision::Refuse { reason, .. }) => {
                format!("refused: {reason}")
            }
            Message::Error(e) => format!("refused: {}", e.reason),
            _ => "answered".to_string(),
        };
        if let Err(e) = self.announced.note(summary, &decision) {
            warn!("cannot keep the announcement for `medfed node studies`: {e}");
        }
    }

    fn decide(&self, a: &StudyAnnouncement) -> Message {
        // Fails closed: a decision that cannot be logged is not sent.
        let decision = |accepted: bool, reason: &str, msg: StudyDecision| -> Message {
            match self.log_decision(&a.study_id, accepted, reason) {
                Ok(()) => Message::StudyDecision(msg),
                Err((code, reason)) => Message::Error(ErrorMessage { code, reason }),
            }
        };
        let refuse = |reason: String| {
            warn!(study = %a.study_id, "refusing study: {reason}");
            decision(
                false,
                &reason,
                StudyDecision::Refuse {
                    study_id: a.study_id.clone(),
                    reason: reason.clone(),
                },
            )
        };
        // Refused for a reason that depends on the data: the aggregator is told only that
        // the site does not serve the study, in the same words whatever the data.
        let decline = |reason: String| {
            warn!(study = %a.study_id, "declining study: {reason}");
            decision(
                false,
                &reason,
                StudyDecision::Refuse {
                    study_id: a.study_id.clone(),
                    reason: crate::statistics::DECLINED.to_string(),
                },
            )
        };
        if let Some(dp) = &a.privacy
            && let Err(why) = dp.validate()
        {
            return refuse(format!("differential privacy parameters: {why}"));
        }
        let approval = match self.config.policy.decide(a) {
            crate::policy::Verdict::Approved(why) => why,
            crate::policy::Verdict::Refused(why) => return refuse(why),
        };
        if let Some(dp) = &a.privacy
            && let Err(why) = self.check_study_budget(&a.study_id, &dp.charge(), a.rounds)
        {
            return refuse(why);
        }
        let Some(dataset) = self.dataset_config(&a.dataset) else {
            return refuse(format!("this site serves no dataset named '{}'", a.dataset));
        };
        if a.privacy.is_none() {
            if !dataset.allows_exact(crate::config::ExactRelease::Training) {
                return refuse(format!(
                    "this site trains on dataset '{}' only with differential privacy: give the \
                     study a [study.privacy] section (its operator can allow exact models with \
                     exact_releases = [\"training\"] on the dataset)",
                    a.dataset
                ));
            }
            if self.config.policy.privacy.require {
                return refuse(
                    "this site serves only differentially private studies ([policy.privacy] require = true)"
                        .into(),
                );
            }
        }
        let (table, classes) = match self.table_with_classes(&a.dataset) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return refuse(format!("this site serves no dataset named '{}'", a.dataset));
            }
            Err(e) => {
                warn!(study = %a.study_id, "{e}");
                // Not ready yet, or its pipeline failed: said as such (the state of a
                // pipeline, not of the data). A failure's own words stay here: they can
                // name internal hosts, files and values (a database's error quoting one).
                if e.contains(" is not ready: ") {
                    return refuse(e);
                }
                if e.contains(" is not served: ") {
                    return refuse(format!(
                        "dataset '{}' is not served: its ingestion pipeline failed (the reason is in this site's log)",
                        a.dataset
                    ));
                }
                return refuse(format!("this site cannot read dataset '{}' now", a.dataset));
            }
        };
        let read = columns_read(a);
        let used = read.iter().map(String::as_str);
        if let Err(why) = classes.check(&a.dataset, used.clone()) {
            return refuse(why);
        }
        if a.privacy.is_some()
            && let Err(why) = classes.check_private(&a.dataset, used)
        {
            return refuse(why);
        }
        let prepared = if a.privacy.is_some() {
            // Rows with an unusable value are left out: a refusal would say that one exists.
            StudyData::prepare_private(&table, a, classes.patient_key()).map(|(d, left_out)| {
                if left_out > 0 {
                    warn!(study = %a.study_id, left_out, "rows without a usable value in the study's columns are left out");
                }
                d
            })
        } else {
            // A row without a target value cannot be learnt from: left out, and counted in
            // the site's log (an exact study releases its row counts anyway).
            // So is a row of a class a multinomial study does not list: refusing would tell
            // the aggregator that such a class exists here, however few patients have it.
            table
                .with_value_in(&a.target, (!a.classes.is_empty()).then_some(&a.classes[..]))
                .and_then(|(labelled, unlabelled)| {
                    if unlabelled > 0 {
                        warn!(study = %a.study_id, unlabelled, "rows without a value of the study's target (or of a class it does not list) are left out");
                    }
                    StudyData::prepare_keyed(&labelled, a, classes.patient_key())
                })
        };
        let data = match prepared {
            Ok(d) => d,
            Err(e @ crate::data::DataError::MissingColumn { .. }) => {
                // The schema, not the data: say which column.
                warn!(study = %a.study_id, "the study's data cannot be prepared: {e}");
                return refuse(e.public_reason());
            }
            Err(e) if a.privacy.is_some() => {
                // The details (value, line, path) stay here; under differential privacy the
                // aggregator learns nothing that depends on the data.
                return decline(format!("the study's data cannot be prepared: {e}"));
            }
            Err(e) => {
                // An exact study (opted in): the kind of problem and the column, never a
                // value, a line or a path.
                warn!(study = %a.study_id, "the study's data cannot be prepared: {e}");
                return refuse(e.public_reason());
            }
        };
        // The least number of training rows is a rule on the data: under differential
        // privacy the decision would release the count without noise (and the aggregator
        // picks the validation fraction), so it binds exact studies only; a DP study's
        // noise protects a small cohort.
        if a.privacy.is_none()
            && let Err(why) = self.config.policy.check_cohort(data.x_train.nrows() as u64)
        {
            return decline(why);
        }
        info!(study = %a.study_id, training_rows = data.x_train.nrows(), validation_rows = data.x_val.nrows(), dp = a.privacy.is_some(), "accepted study");
        let (training_rows, validation_rows) = if a.privacy.is_some() {
            // Under differential privacy no count leaves: the model is all that is released.
            (0, 0)
        } else {
            (data.x_train.nrows() as u64, data.x_val.nrows() as u64)
        };
        let accept = StudyDecision::Accept {
            study_id: a.study_id.clone(),
            training_rows,
            validation_rows,
            // Under secure aggregation the statistics are only sent masked, when asked.
            // Under differential privacy nothing but the noisy model is released.
            feature_stats: (!a.secure_aggregation && a.privacy.is_none())
                .then(|| data.feature_stats()),
            target_classes: data.common_classes(self.config.policy.min_cell),
        };
        if a.privacy.is_none()
            && let Err((code, reason)) = self.record_exact_release(&a.study_id, &a.dataset)
        {
            return Message::Error(ErrorMessage { code, reason });
        }
        let message = decision(true, &approval, accept);
        if matches!(
            message,
            Message::StudyDecision(StudyDecision::Accept { .. })
        ) {
            self.studies_lock()
                .insert(a.study_id.clone(), Arc::new(data));
        }
        message
    }

    /// Records a decision in the compliance log. Fails closed: a decision that cannot be
    /// logged is not acted on (the caller answers with the error instead).
    pub(crate) fn log_decision(
        &self,
        study: &str,
        accepted: bool,
        reason: &str,
    ) -> Result<(), (ErrorCode, String)> {
        let event = medfed_protocol::audit::Event::StudyDecision {
            study: study.to_string(),
            accepted,
            reason: reason.to_string(),
        };
        self.audit.record(event).map_err(|e| {
            warn!("cannot write the compliance log: {e}");
            (
                ErrorCode::Internal,
                "this site cannot write its compliance log, so it does not answer".to_string(),
            )
        })
    }

    /// Records in the compliance log that `study` made an exact (not differentially private)
    /// release of `dataset`, as the dataset's `exact_releases` allows. Fails closed.
    pub(crate) fn record_exact_release(
        &self,
        study: &str,
        dataset: &str,
    ) -> Result<(), (ErrorCode, String)> {
        warn!(%study, %dataset, "EXACT release (no differential privacy), as [[dataset]] exact_releases allows");
        self.ledger_exact(study)?;
        self.audit
            .record(medfed_protocol::audit::Event::ExactRelease {
                study: study.to_string(),
                dataset: dataset.to_string(),
            })
            .map_err(|e| {
                warn!("cannot write the compliance log: {e}");
                (
                    ErrorCode::Internal,
                    "this site cannot write its compliance log, so it does not answer".to_string(),
                )
            })
    }

    fn studies_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<StudyData>>> {
        // Every mutation is a single insert: a poisoned map is still consistent.
        self.studies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store holding an ingested dataset's records, once its pipeline has caught up.
    fn ingested_store(
        &self,
        name: &str,
        pipeline: &crate::ingest::IngestConfig,
    ) -> Result<&Arc<dyn medfed_infra::store::Store>, String> {
        if let Some(r) = &self.readiness {
            use crate::ingest::ready::Stage;
            match r.stage(&pipeline.stream) {
                Some(Stage::CaughtUp) => {}
                Some(Stage::Failed(why)) => {
                    return Err(format!(
                        "dataset '{name}' is not served: its ingestion pipeline '{}' failed ({why})",
                        pipeline.stream
                    ));
                }
                None | Some(Stage::CatchingUp { .. }) => {
                    return Err(format!(
                        "dataset '{name}' is not ready: its ingestion pipeline '{}' is still reading its input",
                        pipeline.stream
                    ));
                }
            }
        }
        self.store
            .as_ref()
            .ok_or_else(|| format!("dataset '{name}': the node's store is not open"))
    }

    /// A configured dataset's columns and their classes, without reading its rows (an
    /// ingested dataset's from its stored segments' column names).
    pub(crate) fn columns_with_classes(
        &self,
        name: &str,
    ) -> Result<Option<(Vec<String>, ColumnClasses)>, String> {
        match self.datasets.get(name) {
            None => Ok(None),
            Some(Dataset::File(t, classes)) => Ok(Some((t.columns.clone(), classes.clone()))),
            Some(Dataset::Ingested(pipeline)) => {
                let store = self.ingested_store(name, pipeline)?;
                let columns = crate::ingest::kept_columns(pipeline, &**store)
                    .map_err(|e| format!("dataset '{name}': {e}"))?;
                let classes = self.pipeline_classes(name, pipeline, &columns);
                Ok(Some((columns, classes)))
            }
        }
    }

    /// The classes of an ingested dataset's `columns`: its pipeline's, then as declared
    /// for the dataset; its score outputs never read.
    fn pipeline_classes(
        &self,
        name: &str,
        pipeline: &crate::ingest::IngestConfig,
        columns: &[String],
    ) -> ColumnClasses {
        let declared = self
            .dataset_config(name)
            .map(|d| d.classes.clone())
            .unwrap_or_default();
        ColumnClasses::for_pipeline(columns, &pipeline.fields, &declared)
            .with_local_only(pipeline.scores.iter().map(|s| s.output.as_str()))
    }

    /// A configured dataset, by name.
    pub(crate) fn table(&self, name: &str) -> Result<Option<Arc<Table>>, String> {
        match self.datasets.get(name) {
            None => Ok(None),
            Some(Dataset::File(t, _)) => Ok(Some(t.clone())),
            Some(Dataset::Ingested(pipeline)) => {
                let store = self.ingested_store(name, pipeline)?;
                let source = PathBuf::from(format!("ingest pipeline '{}'", pipeline.stream));
                let table = crate::ingest::kept_table(pipeline, &**store, &source)
                    .map_err(|e| format!("dataset '{name}': {e}"))?;
                Ok(Some(Arc::new(table)))
            }
        }
    }

    /// A configured dataset and the classes of its columns.
    pub(crate) fn table_with_classes(
        &self,
        name: &str,
    ) -> Result<Option<(Arc<Table>, ColumnClasses)>, String> {
        match self.datasets.get(name) {
            None => Ok(None),
            Some(Dataset::File(t, classes)) => Ok(Some((t.clone(), classes.clone()))),
            Some(Dataset::Ingested(pipeline)) => {
                let Some(table) = self.table(name)? else {
                    return Ok(None);
                };
                let classes = self.pipeline_classes(name, pipeline, &table.columns);
                Ok(Some((table, classes)))
            }
        }
    }

    /// A dataset's configuration, by name.
    pub(crate) fn dataset_config(&self, name: &str) -> Option<&crate::config::DatasetConfig> {
        self.config.datasets.iter().find(|d| d.name == name)
    }

    /// The rows prepared for an announced study.
    pub(crate) fn study_data(&self, id: &str) -> Result<Arc<StudyData>, (ErrorCode, String)> {
        self.studies_lock().get(id).cloned().ok_or_else(|| {
            (
                ErrorCode::CannotServe,
                format!("study '{id}' was not announced to this node"),
            )
        })
    }

    pub(crate) fn study(
        &self,
        id: &str,
        model: &GlobalModel,
    ) -> Result<Arc<StudyData>, (ErrorCode, String)> {
        let data = self.study_data(id)?;
        model
            .validate()
            .map_err(|e| (ErrorCode::InvalidContent, format!("global model: {e}")))?;
        if model.features != data.features || model.kind != data.kind {
            return Err((
                ErrorCode::InvalidContent,
                "the global model does not match the announced study".into(),
            ));
        }
        Ok(data)
    }

    /// Trains locally from the round's model: the new weights, the training loss, the
    /// evaluation of the incoming model on the validation rows, and the training rows.
    pub(crate) async fn local_update(
        &self,
        r: &RoundOpen,
    ) -> Result<LocalUpdate, (ErrorCode, String)> {
        let data = self.study(&r.study_id, &r.model)?;
        let site = self.config.site.clone();
        let (model, params, study, round) = (
            r.model.clone(),
            r.params.clone(),
            r.study_id.clone(),
            r.round,
        );
        // Past the round's deadline the aggregator goes on without this site: stop training
        // then rather than finish an update nobody waits for.
        // Whatever the aggregator asks (no deadline, 0, or one of days), one round's training
        // holds this site's CPU for at most MAX_TRAINING_MS.
        let deadline_ms = training_deadline_ms(r.deadline_ms);
        let until = Some(std::time::Instant::now() + Duration::from_millis(deadline_ms));
        // Training is CPU work: keep it off the threads that drive the connection.
        tokio::task::spawn_blocking(move || {
            let (x_train, x_val) = standardized(&data, &model)?;
            let evaluation = evaluate(&data, &model, &x_val)?;
            let stop = || until.is_some_and(|t| std::time::Instant::now() >= t);
            let trained = match data.privacy {
                Some(dp) if dp.sgd.is_some() => {
                    // Record-level DP inside this site: sampling and noise from a secret
                    // generator.
                    let mut rng = Node::secret_rng()?;
                    medfed_protocol::dp::sgd::train_patients(
                        data.kind,
                        &model.weights,
                        x_train.view(),
                        data.y_train.view(),
                        (!data.train_patients.is_empty()).then_some(&data.train_patients[..]),
                        &params,
                        &dp,
                        &mut rng,
                        &stop,
                    )
                }
                _ => train_local_until(
                    data.kind,
                    &model.weights,
                    x_train.view(),
                    data.y_train.view(),
                    &params,
                    &stop,
                ),
            };
            let weights = match trained {
                Ok(w) => w,
                Err(e @ (TrainError::Stopped { .. } | TrainError::StoppedAtStep { .. })) => {
                    info!(%site, %study, round, "local training stopped: {e} ({deadline_ms} ms)");
                    // How far it got measures the site's rows: not said under DP.
                    let said = if data.privacy.is_some() {
                        "local training did not finish before the round's deadline".to_string()
                    } else {
                        format!("local {e} ({deadline_ms} ms)")
                    };
                    return Err((ErrorCode::CannotServe, said));
                }
                Err(e) if data.privacy.is_some() => {
                    // Whether training works (it may diverge) depends on the data, and the
                    // budget is already charged: telling the aggregator would release that
                    // bit without noise. Under differential privacy the site contributes
                    // the round's model unchanged instead (a zero delta, within any clipping
                    // bound), noised as any other.
                    warn!(%site, %study, round, "local training failed ({e}); contributing a zero update");
                    model.weights.clone()
                }
                Err(e) => return Err((ErrorCode::InvalidContent, e.to_string())),
            };
            let train_loss = mean_loss(data.kind, &weights, x_train.view(), data.y_train.view())
                .map_err(|e| (ErrorCode::Internal, e.to_string()))?;
            info!(%site, %study, round, train_loss, "local update ready");
            Ok(LocalUpdate {
                weights,
                train_loss,
                evaluation,
                rows: data.x_train.nrows() as u64,
            })
        })
        .await
        .map_err(|e| (ErrorCode::Internal, format!("training task failed: {e}")))?
    }

    async fn train(&self, r: RoundOpen) -> Result<Message, (ErrorCode, String)> {
        let data = self.study(&r.study_id, &r.model)?;
        if let Some(dp) = data.privacy {
            // Without secure aggregation the update is seen alone: this site adds all of
            // the noise itself (trusting nobody), charges its budget first, and sends
            // nothing else: no count, loss or evaluation.
            let binding = training_binding(&r.study_id, r.round, 0.0, &r.model, &r.params);
            if let Some((round, b, update)) = self.sent_private_lock().get(&r.study_id)
                && *round == r.round
                && *b == binding
            {
                info!(study = %r.study_id, round = r.round, "the round again from the same model: the same update again, at no cost");
                return Ok(Message::ModelUpdate(update.clone()));
            }
            self.spend_budget(&r.study_id, r.round, dp.charge())?;
            let u = self.local_update(&r).await?;
            let delta = if dp.sgd.is_some() {
                // DP-SGD: every local step was already private.
                u.weights
                    .iter()
                    .zip(&r.model.weights)
                    .map(|(w, g)| w - g)
                    .collect()
            } else {
                let width = r.model.weights.len();
                let sigma = dp.sigma_on_grid(TRAINING_GRID_BITS, width, false);
                Node::dp_contribution(&r.model.weights, &u.weights, &dp, sigma, TRAINING_GRID_BITS)?
            };
            let update = ModelUpdate {
                study_id: r.study_id.clone(),
                round: r.round,
                weights: r
                    .model
                    .weights
                    .iter()
                    .zip(&delta)
                    .map(|(g, d)| g + d)
                    .collect(),
                num_samples: 0,
                train_loss: 0.0,
                evaluation: Evaluation::empty(data.kind),
            };
            self.sent_private_lock()
                .insert(r.study_id, (r.round, binding, update.clone()));
            return Ok(Message::ModelUpdate(update));
        }
        let u = self.local_update(&r).await?;
        Ok(Message::ModelUpdate(ModelUpdate {
            study_id: r.study_id,
            round: r.round,
            weights: u.weights,
            num_samples: u.rows,
            train_loss: u.train_loss,
            evaluation: u.evaluation,
        }))
    }

    fn sent_private_lock(&self) -> std::sync::MutexGuard<'_, SentPrivate> {
        // Only ever replaced whole: a poisoned map is still consistent.
        self.sent_private.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn evaluate(&self, r: EvaluateRequest) -> Result<Message, (ErrorCode, String)> {
        let data = self.study(&r.study_id, &r.model)?;
        if data.privacy.is_some() {
            return Err((
                ErrorCode::CannotServe,
                "the study is differentially private: this site releases no evaluation".into(),
            ));
        }
        let (_, x_val) = standardized(&data, &r.model)?;
        let evaluation = evaluate(&data, &r.model, &x_val)?;
        Ok(Message::EvaluationReport(EvaluationReport {
            study_id: r.study_id,
            round: r.round,
            evaluation,
        }))
    }
}

/// Every column a study may read: its features and target, and for a categorical feature
/// the one-hot columns `{column}_{category}` read in its place where a pipeline made them
/// (each checked against the column classes like the features).
pub(crate) fn columns_read(a: &StudyAnnouncement) -> Vec<String> {
    let mut cols: Vec<String> = a
        .features
        .iter()
        .chain(std::iter::once(&a.target))
        .cloned()
        .collect();
    for (c, cats) in &a.preprocess.categorical {
        cols.extend(cats.iter().map(|k| format!("{c}_{k}")));
    }
    cols
}

/// The study's rows as the model reads them: missing values imputed with the model's
/// values (the federation's means, or the study's declared ones), then standardized. A
/// missing value the model imputes nothing for is an error (the study was prepared so that
/// only declared imputations leave gaps).
fn standardized(
    data: &StudyData,
    model: &GlobalModel,
) -> Result<(Array2<f64>, Array2<f64>), (ErrorCode, String)> {
    let (mut x_train, mut x_val) = (data.x_train.clone(), data.x_val.clone());
    let imputed = model.recipe.imputed();
    for x in [&mut x_train, &mut x_val] {
        for mut row in x.rows_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                if v.is_nan() {
                    match imputed.get(j) {
                        Some(fill) if fill.is_finite() => *v = *fill,
                        _ => {
                            return Err((
                                ErrorCode::InvalidContent,
                                format!(
                                    "the global model imputes no value for '{}', which this site's rows miss",
                                    data.features.get(j).map_or("?", String::as_str)
                                ),
                            ));
                        }
                    }
                }
            }
        }
        model.standardization.apply(x);
    }
    Ok((x_train, x_val))
}

fn evaluate(
    data: &StudyData,
    model: &GlobalModel,
    x_val: &Array2<f64>,
) -> Result<Evaluation, (ErrorCode, String)> {
    let p = predict(data.kind, &model.weights, x_val.view())
        .map_err(|e| (ErrorCode::InvalidContent, e.to_string()))?;
    let mut evaluation = Evaluation::empty(data.kind);
    evaluation.add_rows(
        p.as_slice().unwrap_or(&[]),
        data.y_val.as_slice().unwrap_or(&[]),
    );
    Ok(evaluation)
}

struct SessionEnd {
    welcomed: bool,
    error: NodeError,
}

fn classify(e: TransportError) -> NodeError {
    match e.closed_by_peer() {
        Some((code, reason)) => NodeError::Refused { code, reason },
        None => NodeError::Transport(e),
    }
}

/// Maps the end of a welcomed connection to the node's next step.
fn closed(e: quinn::ConnectionError) -> Result<NodeExit, SessionEnd> {
    match classify(TransportError::Connection(e)) {
        NodeError::Refused {
            code: ErrorCode::StudiesComplete,
            ..
        } => Ok(NodeExit::StudiesComplete),
        error => Err(SessionEnd {
            welcomed: true,
            error,
        }),
    }
}

/// Holds `dir/node.lock` locked for as long as the returned file is open.
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, NodeError> {
    let fail =
        |detail: String| NodeError::Store(format!("state directory {}: {detail}", dir.display()));
    medfed_infra::files::create_private_dir(dir).map_err(|e| fail(e.to_string()))?;
    let path = dir.join("node.lock");
    let file = medfed_infra::files::private_file_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(fail(
            "another medfed node process is using it: give each node its own [state] dir".into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(fail(format!("cannot lock {}: {e}", path.display())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A categorical feature's one-hot columns are read (and so checked) like its column:
    /// a study cannot reach `name_first` by declaring a categorical `name` with category
    /// `first` on a table without a `name` column.
    #[test]
    fn a_categorical_features_one_hot_columns_are_columns_read() {
        let mut a = StudyAnnouncement {
            study_id: "s".into(),
            description: String::new(),
            dataset: "d".into(),
            features: vec!["glu".into(), "name".into()],
            target: "type".into(),
            model: medfed_protocol::model::ModelKind::Logistic,
            positive_class: Some("Yes".into()),
            classes: Vec::new(),
            preprocess: Default::default(),
            validation_fraction: 0.25,
            rounds: 1,
            secure_aggregation: true,
            privacy: None,
        };
        a.preprocess
            .categorical
            .insert("name".into(), vec!["first".into()]);
        let read = columns_read(&a);
        assert!(read.contains(&"name".to_string()) && read.contains(&"name_first".to_string()));
    }

    #[test]
    fn no_round_holds_the_sites_cpu_longer_than_the_cap() {
        // No deadline, or one of days, from a hostile or misconfigured aggregator: the cap.
        assert_eq!(training_deadline_ms(0), MAX_TRAINING_MS);
        assert_eq!(training_deadline_ms(u64::MAX), MAX_TRAINING_MS);
        assert_eq!(training_deadline_ms(7 * 24 * 3_600_000), MAX_TRAINING_MS);
        // An ordinary round's deadline is kept.
        assert_eq!(training_deadline_ms(15_000), 15_000);
    }
}
