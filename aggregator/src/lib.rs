//! # medfed-aggregator
//!
//! The consortium's coordinating service. It listens for hospital nodes over QUIC with
//! mutual TLS, lets in only allow-listed sites, runs the configured studies round by round
//! (FedAvg weighted by sample counts, with a quorum and per-round deadlines), and exports
//! each round's global model as JSON.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use medfed_aggregator::{Aggregator, config::AggregatorConfig};
//! let config = AggregatorConfig::load("aggregator.toml".as_ref())?;
//! let aggregator = Aggregator::bind(config)?;
//! println!("listening on {}", aggregator.local_addr()?);
//! let outcomes = aggregator.run(None).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod at_rest;
mod checkpoint;
pub mod config;
pub mod console;
pub mod ha;
pub mod ops;
mod release;
mod secure_round;
mod server;
pub use server::{MAX_HELLO_BYTES, MAX_PENDING_PER_SITE};
mod statistics;
mod study;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use medfed_infra::auditlog::AuditLog;
use medfed_infra::transport::{self, Identity, TransportError};
use medfed_protocol::ErrorCode;
use medfed_protocol::metrics::Metrics;
use tokio::sync::{mpsc, watch};

use crate::config::AggregatorConfig;
use crate::server::{Registry, Server};
pub use crate::study::{CertificateVerifiers, StudyError, StudyOutcome};

/// The software version reported to peers.
pub const SOFTWARE: &str = concat!("medfed-aggregator ", env!("CARGO_PKG_VERSION"));

/// One finished round, as shown to the operator.
#[derive(Debug, Clone)]
pub struct RoundSummary {
    /// The study.
    pub study_id: String,
    /// The round, from 1.
    pub round: u32,
    /// Sites whose updates were averaged.
    pub sites: Vec<String>,
    /// Training rows behind the average.
    pub training_rows: u64,
    /// Sample-weighted mean of the sites' training losses.
    pub train_loss: f64,
    /// Federated validation metrics of this round's model.
    pub validation: Option<Metrics>,
    /// Where the round's model was exported.
    pub model_path: PathBuf,
}

/// What the aggregator reports as it works (for progress displays; everything is also
/// logged through `tracing`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AggregatorEvent {
    /// A site answered a request of a training study's round (its model update, its
    /// evaluation, a secure-aggregation step), this many seconds after it was sent: the
    /// site's local work and the network together.
    SiteAnswered {
        /// The site's name.
        site: String,
        /// Seconds from the request to its answer.
        seconds: f64,
    },
    /// A site connected and was let in (its hello accepted).
    SiteConnected {
        /// The site's name.
        site: String,
    },
    /// A connected site's connection ended.
    SiteDisconnected {
        /// The site's name.
        site: String,
        /// Why, in words (e.g. the connection's close reason).
        reason: String,
    },
    /// A connection was refused: a failed TLS handshake, a site not on the allow-list, a
    /// bad hello.
    SiteRefused {
        /// The peer's address.
        remote: SocketAddr,
        /// The site it claimed or its certificate names, if known.
        site: Option<String>,
        /// Why, in words.
        reason: String,
    },
    /// A training study's rounds start.
    StudyStarted {
        /// The study.
        study_id: String,
        /// The sites taking part.
        sites: Vec<String>,
        /// The rounds asked for.
        rounds: u32,
    },
    /// A site refused a study.
    StudyRefused {
        /// The study.
        study_id: String,
        /// The site.
        site: String,
        /// The site's reason.
        reason: String,
    },
    /// A round's model was released.
    RoundCompleted(RoundSummary),
    /// An attempt at a round failed (it may be tried again).
    RoundFailed {
        /// The study.
        study_id: String,
        /// The round.
        round: u32,
        /// Why, in words.
        reason: String,
    },
    /// A training study completed all its rounds.
    StudyCompleted(StudyOutcome),
    /// A study (training or statistics) failed.
    StudyFailed {
        /// The study.
        study_id: String,
        /// Why, in words.
        reason: String,
    },
    /// A statistics study released its results to `path`.
    StatisticsReleased {
        /// The statistics study.
        study_id: String,
        /// The released JSON file.
        path: PathBuf,
    },
}

/// Why the aggregator could not start, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregatorError {
    /// The compliance log could not be opened.
    #[error(transparent)]
    Audit(#[from] medfed_infra::auditlog::AuditLogError),
    /// The TLS files could not be loaded, or the QUIC endpoint bound.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A study failed (without `keep_serving`).
    #[error(transparent)]
    Study(#[from] StudyError),
    /// The operations endpoint, the state directory or the store, or the compliance log at
    /// shutdown, failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A file or directory of the aggregator's state is open to other users.
    #[error("{0} (the aggregator does not start until then)")]
    Private(#[from] medfed_infra::files::NotPrivate),
    /// `[ha]`: NATS or the bucket could not be reached.
    #[error(transparent)]
    Ha(#[from] ha::HaError),
    /// `[ha]`: this instance held the lease and lost it (a pause longer than the lease, NATS
    /// unreachable, or another instance took over); it stopped acting. Start it again to
    /// make it a standby.
    #[error("{0}")]
    SteppedDown(String),
}

/// A bound aggregator, ready to [`run`](Aggregator::run).
pub struct Aggregator {
    config: AggregatorConfig,
    /// Study checkpoints (`[state]`).
    store: Arc<dyn medfed_infra::store::Store>,
    /// The operations endpoint's socket (`[ops]`), bound with the QUIC one.
    ops_listener: Option<std::net::TcpListener>,
    audit: Arc<AuditLog>,
    endpoint: quinn::Endpoint,
    registry: Arc<Registry>,
    stop: Arc<watch::Sender<Option<String>>>,
    /// `[ha]`: the lease, and the bucket the store is kept in.
    ha: Option<ha::Ha>,
    /// `[ops] token_file`'s token.
    ops_token: Option<String>,
    /// `[ops] tls_cert` / `tls_key`: the endpoint serves HTTPS.
    ops_tls: Option<Arc<rustls::ServerConfig>>,
}

/// How one study's run ended.
enum StudyEnd {
    Done(StudyOutcome),
    Stopped,
    Failed(StudyError),
    Interrupted,
}

/// Watches and stops a running aggregator from another task (e.g. on SIGTERM). It holds no
/// socket: once [`Aggregator::run`] has returned, the port is free again.
#[derive(Clone)]
pub struct AggregatorHandle {
    registry: Arc<Registry>,
    stop: Arc<watch::Sender<Option<String>>>,
}

impl AggregatorHandle {
    /// Names of the sites connected right now.
    pub fn connected_sites(&self) -> BTreeSet<String> {
        self.registry.names()
    }

    /// Asks [`Aggregator::run`] to tell every node `reason`, close the endpoint and return.
    pub fn shutdown(&self, reason: &str) {
        self.stop.send_replace(Some(reason.to_string()));
    }
}

impl Aggregator {
    /// Loads the TLS identity and binds the QUIC endpoint.
    pub fn bind(config: AggregatorConfig) -> Result<Aggregator, AggregatorError> {
        at_rest::check(&config)?;
        let identity = Identity::load(&config.tls.cert, &config.tls.key)?;
        let mut audit = AuditLog::open(
            &config.audit.log,
            &config.audit.key,
            &config.name,
            "aggregator",
            SOFTWARE,
            &config.config_sha256,
        )?;
        if let Some(capture) = &config.audit.capture_sent {
            audit = audit.capture_sent_frames(capture)?;
        }
        let audit = Arc::new(audit);
        let endpoint = transport::server_endpoint(config.listen, &config.tls.trust()?, identity)?;
        let ops_token = match &config.ops {
            Some(ops) => ops.token().map_err(std::io::Error::other)?,
            None => None,
        };
        let ops_tls = match &config.ops {
            Some(ops) => ops.tls().map_err(std::io::Error::other)?,
            None => None,
        };
        let ops_listener = match &config.ops {
            // Checked by the config's loading too; here for configs built otherwise.
            Some(ops)
                if !ops.listen.ip().is_loopback() && (ops_tls.is_none() || ops_token.is_none()) =>
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "[ops] listen = {} is not a loopback address: it needs token_file, tls_cert and tls_key",
                        ops.listen
                    ),
                )
                .into());
            }
            Some(ops) => {
                let l = std::net::TcpListener::bind(ops.listen).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen on [ops] listen = {}: {e}", ops.listen),
                    )
                })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        // With [ha] the state is in the NATS bucket, shared by the instances.
        let ha = config.ha.as_ref().map(ha::Ha::start).transpose()?;
        let store: Arc<dyn medfed_infra::store::Store> = match &ha {
            Some(ha) => ha.store(),
            None => {
                medfed_infra::files::create_private_dir(&config.state.dir).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot create the state directory {}: {e}",
                            config.state.dir.display()
                        ),
                    )
                })?;
                Arc::from(
                    medfed_infra::store::open(
                        config.state.backend,
                        &config
                            .state
                            .dir
                            .join(format!("{}.db", config.state.backend.name())),
                    )
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
                )
            }
        };
        Ok(Aggregator {
            config,
            store,
            ops_listener,
            audit,
            endpoint,
            registry: Arc::default(),
            stop: Arc::new(watch::channel(None).0),
            ha,
            ops_token,
            ops_tls,
        })
    }

    /// The UDP address the QUIC endpoint is bound to (the port chosen, with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The operations endpoint's address, if `[ops]` is configured.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle to watch and stop this aggregator from another task.
    pub fn handle(&self) -> AggregatorHandle {
        AggregatorHandle {
            registry: self.registry.clone(),
            stop: self.stop.clone(),
        }
    }

    fn study_runner(
        &self,
        cfg: &config::StudyConfig,
        events: Option<&mpsc::UnboundedSender<AggregatorEvent>>,
        roots: &transport::Trust,
    ) -> study::StudyRunner {
        study::StudyRunner {
            cfg: cfg.clone(),
            registry: self.registry.clone(),
            out_dir: self.config.out_dir.clone(),
            max_frame: self.config.max_frame_bytes,
            events: events.cloned(),
            roots: roots.clone(),
            audit: self.audit.clone(),
            store: self.store.clone(),
            stop_file: self.config.studies_dir.stop_file(&cfg.id),
            allow: Arc::new(self.config.sites.allow.iter().cloned().collect()),
            ha: self.ha.clone(),
        }
    }

    /// Runs one training study, recording its start and end.
    async fn run_study(
        &self,
        cfg: &config::StudyConfig,
        events: Option<&mpsc::UnboundedSender<AggregatorEvent>>,
        roots: &transport::Trust,
        allowed: usize,
        stop: &mut watch::Receiver<Option<String>>,
    ) -> StudyEnd {
        let runner = self.study_runner(cfg, events, roots);
        let status = |status: String| {
            self.audit
                .record(medfed_protocol::audit::Event::StudyStatus {
                    study: cfg.id.clone(),
                    status,
                })
                .map_err(|e| runner.unlogged(e))
        };
        // A study the compliance log cannot record starting does not start.
        let outcome = match status("started".into()) {
            Err(e) => Err(e),
            Ok(()) => tokio::select! {
                r = runner.run(allowed) => r,
                _ = stop.wait_for(Option::is_some) => return StudyEnd::Interrupted,
            },
        };
        let status = |text: String| {
            if let Err(e) = status(text) {
                tracing::error!("{e}");
            }
        };
        let send = |e: AggregatorEvent| {
            if let Some(tx) = events {
                let _ = tx.send(e);
            }
        };
        match outcome {
            Ok(o) => {
                status(format!("completed after {} rounds", o.rounds));
                send(AggregatorEvent::StudyCompleted(o.clone()));
                StudyEnd::Done(o)
            }
            Err(e) if matches!(e.cause(), StudyError::Stopped { .. }) => {
                tracing::info!("{e}");
                status(e.to_string());
                send(AggregatorEvent::StudyFailed {
                    study_id: cfg.id.clone(),
                    reason: e.to_string(),
                });
                StudyEnd::Stopped
            }
            Err(e) => {
                status(format!("failed: {e}"));
                send(AggregatorEvent::StudyFailed {
                    study_id: cfg.id.clone(),
                    reason: e.to_string(),
                });
                if !self.config.studies_dir.keep_serving {
                    self.stop.send_replace(Some(format!("study failed: {e}")));
                }
                StudyEnd::Failed(e)
            }
        }
    }

    /// Serves nodes and runs every configured study in turn; when all are complete, tells
    /// the nodes so and returns. With no study configured it serves until shut down.
    pub async fn run(
        self,
        events: Option<mpsc::UnboundedSender<AggregatorEvent>>,
    ) -> Result<Vec<StudyOutcome>, AggregatorError> {
        // Every event updates the status board, then goes on to the caller.
        let board = Arc::new(ops::StatusBoard::new(
            &self.config.name,
            self.config
                .studies
                .iter()
                .map(|s| (s.id.clone(), "training", s.rounds))
                .chain(
                    self.config
                        .statistics
                        .iter()
                        .map(|s| (s.id.clone(), "statistics", 1)),
                ),
        ));
        let (itx, mut irx) = mpsc::unbounded_channel::<AggregatorEvent>();
        let forward = {
            let board = board.clone();
            tokio::spawn(async move {
                while let Some(e) = irx.recv().await {
                    board.apply(&e);
                    if let Some(tx) = &events {
                        let _ = tx.send(e);
                    }
                }
            })
        };
        let events = Some(itx);
        let ops_task = match self.ops_listener.as_ref().map(|l| l.try_clone()) {
            Some(Ok(l)) => {
                let listener = tokio::net::TcpListener::from_std(l)?;
                let ops = Arc::new(ops::Ops {
                    board: board.clone(),
                    registry: self.registry.clone(),
                    audit: self.audit.clone(),
                    log: self.config.audit.log.display().to_string(),
                    allowed: self.config.sites.allow.clone(),
                    ha: self.ha.clone(),
                    token: self.ops_token.clone(),
                    tls: self.ops_tls.clone().map(tokio_rustls::TlsAcceptor::from),
                    listen: listener.local_addr().ok(),
                });
                Some(tokio::spawn(ops.serve(listener)))
            }
            Some(Err(e)) => return Err(AggregatorError::Io(e)),
            None => None,
        };
        let allow: Arc<BTreeSet<String>> =
            Arc::new(self.config.sites.allow.iter().cloned().collect());
        let server = Arc::new(Server {
            endpoint: self.endpoint.clone(),
            registry: self.registry.clone(),
            allow: allow.clone(),
            name: self.config.name.clone(),
            max_frame: self.config.max_frame_bytes,
            events: events.clone(),
            audit: self.audit.clone(),
            pending: std::sync::Mutex::default(),
            ha: self.ha.clone(),
        });
        let accept = tokio::spawn(server.accept_loop());
        let mut stop = self.stop.subscribe();
        let roots = self.config.tls.trust()?;
        let mut outcomes = Vec::new();
        let mut result = Ok(());
        let mut interrupted = false;
        // [ha]: a standby answers nodes "not active" until the lease is its; once active,
        // losing the lease stops everything at once.
        let mut stepped_down: Option<watch::Receiver<ha::HaStatus>> = None;
        if let Some(ha) = &self.ha {
            let mut status = ha.status();
            tracing::info!(
                "[ha] standby: waiting for the lease (nodes are told to use the active instance)"
            );
            tokio::select! {
                _ = status.wait_for(|s| !matches!(s, ha::HaStatus::Standby { .. })) => {}
                _ = stop.wait_for(Option::is_some) => interrupted = true,
            }
            if !interrupted {
                let stop = self.stop.clone();
                let mut watch = status.clone();
                tokio::spawn(async move {
                    if let Ok(s) = watch
                        .wait_for(|s| matches!(s, ha::HaStatus::SteppedDown { .. }))
                        .await
                        && let ha::HaStatus::SteppedDown { reason } = &*s
                    {
                        stop.send_replace(Some(reason.clone()));
                    }
                });
                if let ha::HaStatus::SteppedDown { reason } = &*status.borrow() {
                    self.stop.send_replace(Some(reason.clone()));
                    interrupted = true;
                }
                stepped_down = Some(status);
            }
        }
        let mut finished = 0usize;
        let keep_serving = self.config.studies_dir.keep_serving;
        // Studies that failed for too few sites, to announce again (keep_serving only).
        let retry_after = std::time::Duration::from_secs(self.config.studies_dir.retry_failed_secs);
        let mut retry: Vec<(std::time::Instant, config::StudyConfig)> = Vec::new();
        let retryable = |e: &StudyError| {
            matches!(
                e.cause(),
                StudyError::NoQuorum { .. } | StudyError::RoundFailed { .. }
            )
        };
        for cfg in &self.config.studies {
            if interrupted {
                break;
            }
            match self
                .run_study(cfg, events.as_ref(), &roots, allow.len(), &mut stop)
                .await
            {
                StudyEnd::Done(o) => {
                    outcomes.push(o);
                    finished += 1;
                }
                StudyEnd::Stopped => finished += 1,
                StudyEnd::Failed(e) if keep_serving => {
                    tracing::warn!("{e}");
                    if retryable(&e) {
                        retry.push((std::time::Instant::now() + retry_after, cfg.clone()));
                    }
                }
                StudyEnd::Failed(e) => {
                    result = Err(e);
                    break;
                }
                StudyEnd::Interrupted => {
                    interrupted = true;
                    break;
                }
            }
        }
        let mut released = 0;
        if result.is_ok() && !interrupted {
            for sc in &self.config.statistics {
                let runner = self.study_runner(&sc.as_study(), events.as_ref(), &roots);
                let status = |status: String| {
                    self.audit
                        .record(medfed_protocol::audit::Event::StudyStatus {
                            study: sc.id.clone(),
                            status,
                        })
                        .map_err(|e| runner.unlogged(e))
                };
                let outcome = match checkpoint::statistics_action(&*self.store, &sc.id) {
                    checkpoint::StatisticsAction::Released(path) => {
                        tracing::info!(study = %sc.id, "statistics already released: {}", path.display());
                        released += 1;
                        continue;
                    }
                    checkpoint::StatisticsAction::Unknown(e) => Err(StudyError::Failed {
                        study: sc.id.clone(),
                        detail: format!(
                            "cannot read from the store whether it was already released ({e}); \
                             it is not run, so that it cannot be released twice"
                        ),
                    }),
                    checkpoint::StatisticsAction::Run => match status("started".into()) {
                        Err(e) => Err(e),
                        Ok(()) => {
                            let query = sc.query();
                            tokio::select! {
                                r = runner.run_statistics(&query, allow.len(), sc.delta) => r,
                                _ = stop.wait_for(Option::is_some) => {
                                    interrupted = true;
                                    break;
                                }
                            }
                        }
                    },
                };
                match outcome {
                    Ok((_, path)) => {
                        if let Err(e) = status(format!("statistics released: {}", path.display())) {
                            // The release itself is in the log (recorded before the file).
                            tracing::error!(study = %sc.id, "{e}");
                        }
                        if let Some(tx) = &events {
                            let _ = tx.send(AggregatorEvent::StatisticsReleased {
                                study_id: sc.id.clone(),
                                path,
                            });
                        }
                        released += 1;
                    }
                    Err(e) => {
                        tracing::error!("{e}");
                        if let Err(log) = status(format!("failed: {e}")) {
                            tracing::error!(study = %sc.id, "{log}");
                        }
                        if let Some(tx) = &events {
                            let _ = tx.send(AggregatorEvent::StudyFailed {
                                study_id: sc.id.clone(),
                                reason: e.to_string(),
                            });
                        }
                        if self.config.studies_dir.keep_serving {
                            // Serving goes on: the other studies, and those to come.
                            continue;
                        }
                        self.stop.send_replace(Some(format!("study failed: {e}")));
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        // Studies added to the studies directory (`medfed aggregator study create`).
        let mut seen: BTreeSet<String> = self
            .config
            .studies
            .iter()
            .map(|s| s.id.clone())
            .chain(self.config.statistics.iter().map(|s| s.id.clone()))
            .collect();
        while result.is_ok() && !interrupted {
            let specs = match self.config.studies_dir.specs() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("studies directory: {e}");
                    Vec::new()
                }
            };
            let Some((path, spec)) = specs.into_iter().find(|(_, s)| !seen.contains(&s.id)) else {
                if !self.config.studies_dir.keep_serving {
                    break;
                }
                let now = std::time::Instant::now();
                if let Some(i) = retry.iter().position(|(at, _)| *at <= now) {
                    let (_, cfg) = retry.remove(i);
                    tracing::info!(study = %cfg.id, "announcing the study again: it failed for too few sites, and approvals may have changed since");
                    match self
                        .run_study(&cfg, events.as_ref(), &roots, allow.len(), &mut stop)
                        .await
                    {
                        StudyEnd::Done(o) => {
                            outcomes.push(o);
                            finished += 1;
                        }
                        StudyEnd::Stopped => finished += 1,
                        StudyEnd::Failed(e) => {
                            tracing::warn!("{e}");
                            if retryable(&e) {
                                retry.push((std::time::Instant::now() + retry_after, cfg));
                            }
                        }
                        StudyEnd::Interrupted => interrupted = true,
                    }
                    continue;
                }
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    _ = stop.wait_for(Option::is_some) => {
                        interrupted = true;
                        break;
                    }
                }
            };
            seen.insert(spec.id.clone());
            if let Err(e) = self.config.validate_study(&spec, "study", &path) {
                tracing::warn!("{e}; study not run");
                if let Err(log) = self
                    .audit
                    .record(medfed_protocol::audit::Event::StudyStatus {
                        study: spec.id.clone(),
                        status: format!("not run: {e}"),
                    })
                {
                    tracing::error!(study = %spec.id, "cannot write the compliance log: {log}");
                }
                continue;
            }
            match self
                .run_study(&spec, events.as_ref(), &roots, allow.len(), &mut stop)
                .await
            {
                StudyEnd::Done(o) => {
                    outcomes.push(o);
                    finished += 1;
                }
                StudyEnd::Stopped => finished += 1,
                // One added study failing does not stop an aggregator that keeps serving.
                StudyEnd::Failed(e) if self.config.studies_dir.keep_serving => {
                    tracing::warn!("{e}");
                    if retryable(&e) {
                        retry.push((std::time::Instant::now() + retry_after, spec));
                    }
                }
                StudyEnd::Failed(e) => result = Err(e),
                StudyEnd::Interrupted => interrupted = true,
            }
        }
        let lost = stepped_down.as_ref().and_then(|s| match &*s.borrow() {
            ha::HaStatus::SteppedDown { reason } => Some(reason.clone()),
            _ => None,
        });
        let (code, reason) = if let Some(reason) = &lost {
            (ErrorCode::NotActive, reason.clone())
        } else if result.is_ok() && !interrupted && finished + released > 0 {
            (
                ErrorCode::StudiesComplete,
                "all studies complete".to_string(),
            )
        } else {
            // Serving without studies, or stopped early: wait for the stop signal.
            let reason = stop
                .wait_for(Option::is_some)
                .await
                .map(|r| r.clone().unwrap_or_default())
                .unwrap_or_default();
            (ErrorCode::ShuttingDown, reason)
        };
        self.registry.close_all(code, &reason);
        self.endpoint.close(
            quinn::VarInt::from_u32(code.to_close_code()),
            reason.as_bytes(),
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.endpoint.wait_idle())
            .await;
        accept.abort();
        if let Some(t) = ops_task {
            t.abort();
        }
        drop(events);
        let _ = forward.await;
        self.audit.close(&reason).map_err(AggregatorError::Io)?;
        if let Some(reason) = lost {
            return Err(AggregatorError::SteppedDown(reason));
        }
        result?;
        Ok(outcomes)
    }
}
