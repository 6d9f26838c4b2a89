//! Driving one training study: the [`Coordinator`] of `medfed_protocol::study` decides;
//! this code connects it to the world. It tells the coordinator who is connected and what
//! time it is, carries its requests to the sites over QUIC (each logged before it leaves),
//! writes what it asks to record, checkpoint and release (logged first, fail closed), and
//! turns its ending into the aggregator's outcome or error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medfed_infra::identity::{CertificateVerifier, peer_certificate};
use medfed_infra::transport::{self, TransportError};
use medfed_protocol::Message;
use medfed_protocol::export::{ExportedModel, MissingSite};
use medfed_protocol::metrics::Metrics;
use medfed_protocol::secagg::Verifier;
use medfed_protocol::study::{
    Command, Coordinator, Ending, Failure, KeyVerifiers, RequestId, SiteConn, StudyEvent,
    StudyFailure,
};
use medfed_protocol::time::Clock;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::StudyConfig;
use crate::server::Registry;
use crate::{AggregatorEvent, RoundSummary};

/// Why a study (training or statistics) ended without completing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StudyError {
    /// Too few sites took part.
    #[error("study '{study}': only {got} of the {need} sites needed took part ({detail})")]
    NoQuorum {
        /// The study.
        study: String,
        /// Sites that took part (below `need`).
        got: usize,
        /// The quorum (`min_sites`).
        need: usize,
        /// Where and why, in words.
        detail: String,
    },
    /// Every attempt at a round failed.
    #[error("study '{study}': round {round} failed {attempts} time(s), the last because {detail}")]
    RoundFailed {
        /// The study.
        study: String,
        /// The round.
        round: u32,
        /// Attempts made (`round_attempts`).
        attempts: u32,
        /// Why the last one failed.
        detail: String,
    },
    /// Anything else (e.g. a checkpoint that could not be written).
    #[error("study '{study}': {detail}")]
    Failed {
        /// The study.
        study: String,
        /// What went wrong.
        detail: String,
    },
    /// The study stopped after releasing some rounds: the last released model is exported,
    /// marked as stopped.
    #[error("{cause}; the last released model (round {round}) is {}, marked as stopped early", final_model.display())]
    EndedEarly {
        /// Why it stopped.
        cause: Box<StudyError>,
        /// The last round released.
        round: u32,
        /// The study's final model file, that round's model.
        final_model: PathBuf,
    },
    /// The operator stopped the study (`medfed aggregator study stop`, or its stop file).
    #[error("study '{study}' was stopped by the operator after round {round}")]
    Stopped {
        /// The study.
        study: String,
        /// The last round completed (0: none).
        round: u32,
    },
    /// A model or release file could not be written.
    #[error("study '{study}': writing {path}: {source}")]
    Export {
        /// The study.
        study: String,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The compliance log could not record a step, so the step was not taken.
    #[error("study '{study}': the compliance log cannot be written ({detail}), so the study stops")]
    Unlogged {
        /// The study.
        study: String,
        /// The log's error.
        detail: String,
    },
}

impl StudyError {
    /// Why the study ended: for [`StudyError::EndedEarly`], the error that ended it.
    pub fn cause(&self) -> &StudyError {
        match self {
            StudyError::EndedEarly { cause, .. } => cause,
            e => e,
        }
    }
}

/// What a finished study leaves behind.
#[derive(Debug, Clone)]
pub struct StudyOutcome {
    /// The study.
    pub study_id: String,
    /// The final model's file (`final.json` in the study's output directory).
    pub final_model: PathBuf,
    /// The final model's federated validation metrics, when the sites evaluated it.
    pub validation: Option<Metrics>,
    /// Rounds run.
    pub rounds: u32,
    /// Allowed sites whose data is in no round of the model, and why.
    pub missing: Vec<MissingSite>,
}

impl StudyError {
    fn from_failure(study: &str, f: StudyFailure, final_model: &std::path::Path) -> StudyError {
        let study = study.to_string();
        match f {
            StudyFailure::NoQuorum { got, need, detail } => StudyError::NoQuorum {
                study,
                got,
                need,
                detail,
            },
            StudyFailure::RoundFailed {
                round,
                attempts,
                detail,
            } => StudyError::RoundFailed {
                study,
                round,
                attempts,
                detail,
            },
            StudyFailure::Failed(detail) => StudyError::Failed { study, detail },
            StudyFailure::Stopped { round } => StudyError::Stopped { study, round },
            StudyFailure::Unlogged(detail) => StudyError::Unlogged { study, detail },
            StudyFailure::EndedEarly { cause, round } => StudyError::EndedEarly {
                cause: Box::new(StudyError::from_failure(&study, *cause, final_model)),
                round,
                final_model: final_model.to_path_buf(),
            },
        }
    }
}

pub(crate) struct StudyRunner {
    pub cfg: StudyConfig,
    pub registry: Arc<Registry>,
    pub out_dir: PathBuf,
    pub max_frame: u32,
    pub events: Option<tokio::sync::mpsc::UnboundedSender<AggregatorEvent>>,
    /// The consortium CA, to check the site certificates behind secure-aggregation keys.
    /// The consortium CA and CRL, to check sites' certificates.
    pub roots: medfed_infra::transport::Trust,
    /// The aggregator's compliance log.
    pub audit: Arc<medfed_infra::auditlog::AuditLog>,
    /// Where study checkpoints go.
    pub store: Arc<dyn medfed_infra::store::Store>,
    /// The file whose presence stops the study at its next round.
    pub stop_file: PathBuf,
    /// The sites the study is for (the aggregator's allow list).
    pub allow: Arc<std::collections::BTreeSet<String>>,
    /// `[ha]`: nothing is sent, written or released unless this instance holds the lease.
    pub ha: Option<crate::ha::Ha>,
}

/// A site asked a statistics query (no training rows are declared: each counts 1 in the
/// secure sum's scale).
#[derive(Clone)]
pub(crate) struct Participant {
    pub training_rows: u64,
}

impl Participant {
    pub(crate) fn for_query() -> Participant {
        Participant { training_rows: 1 }
    }
}

/// Builds the checkers of secure-aggregation key signatures from the sites' certificates,
/// under the consortium CA (and CRL).
pub struct CertificateVerifiers(pub medfed_infra::transport::Trust);

impl KeyVerifiers for CertificateVerifiers {
    fn verifier(&self, parties: &[(String, Vec<u8>)]) -> Result<Box<dyn Verifier + Send>, String> {
        CertificateVerifier::new(&self.0, parties)
            .map(|v| Box::new(v) as Box<dyn Verifier + Send>)
            .map_err(|e| e.to_string())
    }
}

/// The coordinator's time in the aggregator: milliseconds of the process's monotonic
/// clock since the study's driver started (a wall-clock step cannot move a deadline).
pub struct MonotonicClock(Instant);

impl MonotonicClock {
    /// A clock starting now.
    pub fn new() -> MonotonicClock {
        MonotonicClock(Instant::now())
    }

    /// The instant `ms` milliseconds after the clock's start (for a timer).
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A request on its way: its id, the site, and its answer.
/// A request's answer: its id, the site, the answer, and the seconds it took.
type Answered = (RequestId, String, Result<Message, Failure>, f64);

impl StudyRunner {
    fn emit(&self, e: AggregatorEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    pub(crate) fn failed(&self, detail: impl Into<String>) -> StudyError {
        StudyError::Failed {
            study: self.cfg.id.clone(),
            detail: detail.into(),
        }
    }

    /// Waits until every allowed site is connected, or until the wait is over and at least
    /// `min_sites` are.
    pub(crate) async fn wait_for_sites(&self, allowed: usize) -> Result<(), StudyError> {
        let deadline = Instant::now() + Duration::from_secs(self.cfg.wait_for_sites_secs);
        loop {
            let n = self.registry.names().len();
            if n >= allowed || (Instant::now() >= deadline && n >= self.cfg.min_sites) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StudyError::NoQuorum {
                    study: self.cfg.id.clone(),
                    got: n,
                    need: self.cfg.min_sites,
                    detail: format!(
                        "waited {} s for sites to connect",
                        self.cfg.wait_for_sites_secs
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `msg` to each of `sites` that is connected, all at once; each answer comes with
    /// the site and how long it took (ms).
    pub(crate) fn ask_all<'a>(
        &self,
        msg: Arc<Message>,
        sites: impl Iterator<Item = &'a String>,
        timeout: Duration,
    ) -> JoinSet<(String, Result<Message, TransportError>, f64)> {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        // [ha]: an instance that lost its lease sends nothing (its answers are "not connected").
        let acting = self.may_act();
        for site in sites {
            let Some(s) = self.registry.get(site).filter(|_| acting) else {
                continue;
            };
            let (msg, site, max, audit) = (
                msg.clone(),
                site.clone(),
                self.max_frame,
                self.audit.clone(),
            );
            tasks.spawn(async move {
                let answer =
                    transport::request_logged(&s.conn, &msg, max, timeout, Some((&*audit, &site)))
                        .await;
                (site, answer, started.elapsed().as_secs_f64() * 1000.0)
            });
        }
        tasks
    }

    /// The error of a step the compliance log could not record.
    pub(crate) fn unlogged(&self, e: impl std::fmt::Display) -> StudyError {
        tracing::error!(study = %self.cfg.id, "cannot write the compliance log: {e}");
        StudyError::Unlogged {
            study: self.cfg.id.clone(),
            detail: e.to_string(),
        }
    }

    /// The connected sites, as the coordinator sees them (certificates kept per connection).
    fn snapshot(&self, certificates: &mut BTreeMap<(String, usize), Vec<u8>>) -> Vec<SiteConn> {
        let mut sites = Vec::new();
        for name in self.registry.names() {
            let Some(c) = self.registry.get(&name) else {
                continue;
            };
            let id = c.conn.stable_id();
            let certificate = certificates
                .entry((name.clone(), id))
                .or_insert_with(|| peer_certificate(&c.conn).unwrap_or_default())
                .clone();
            sites.push(SiteConn {
                name,
                conn: id as u64,
                certificate,
            });
        }
        sites
    }

    /// Runs the study to its end.
    pub async fn run(&self, _allowed: usize) -> Result<StudyOutcome, StudyError> {
        let cfg = &self.cfg;
        let resume = crate::checkpoint::load(&*self.store, cfg).map_err(|e| self.failed(e))?;
        let final_path = self.out_dir.join("models").join(&cfg.id).join("final.json");
        // The site sampling's seed (the coordinator draws no OS randomness itself).
        let seed: u64 = rand::random();
        let clock = MonotonicClock::new();
        let now = || clock.now_ms();
        let mut coord = Coordinator::new(
            cfg.clone(),
            self.allow.iter().cloned(),
            Box::new(CertificateVerifiers(self.roots.clone())),
            seed,
            now(),
            resume,
            final_path.clone(),
        );
        let mut certificates = BTreeMap::new();
        let mut connected = self.snapshot(&mut certificates);
        coord.sites(now(), &connected);
        let mut tasks: JoinSet<Answered> = JoinSet::new();
        // An error of the driver's own (a file it could not write), kept over the
        // coordinator's summary of it.
        let mut own_error: Option<StudyError> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while let Some(command) = coord.poll_command() {
                if let Err(e) = self.carry_out(command, &mut coord, &mut tasks) {
                    own_error = Some(e);
                }
            }
            if coord.ending().is_some() {
                break;
            }
            let deadline = coord.poll_timeout();
            let sleep =
                tokio::time::sleep_until(clock.instant_at(deadline.unwrap_or(u64::MAX / 4)).into());
            tokio::select! {
                Some(joined) = tasks.join_next() => {
                    let Ok((id, site, answer, seconds)) = joined else { continue };
                    match &answer {
                        Err(Failure::Transport(e)) => tracing::debug!(%site, "no answer: {e}"),
                        Ok(_) => self.emit(AggregatorEvent::SiteAnswered { site: site.clone(), seconds }),
                        Err(_) => {}
                    }
                    coord.handle_answer(now(), id, answer);
                }
                () = sleep, if deadline.is_some() => coord.handle_timeout(now()),
                _ = tick.tick() => {
                    if self.stop_file.exists() {
                        coord.stop();
                    }
                    let sites = self.snapshot(&mut certificates);
                    if sites != connected {
                        connected = sites;
                        coord.sites(now(), &connected);
                    }
                }
            }
        }
        tasks.abort_all();
        match coord.ending().cloned() {
            Some(Ending::Completed(c)) => Ok(StudyOutcome {
                study_id: cfg.id.clone(),
                final_model: c.final_model,
                validation: c.validation,
                rounds: c.rounds,
                missing: c.missing,
            }),
            Some(Ending::Failed(f)) => {
                Err(own_error.unwrap_or_else(|| StudyError::from_failure(&cfg.id, f, &final_path)))
            }
            None => Err(self.failed("the study ended without an outcome")),
        }
    }

    /// Carries out one of the coordinator's commands; an error of its own, if one stopped
    /// the study.
    fn carry_out(
        &self,
        command: Command,
        coord: &mut Coordinator,
        tasks: &mut JoinSet<Answered>,
    ) -> Result<(), StudyError> {
        let study = &self.cfg.id;
        let acts = matches!(
            command,
            Command::Request { .. }
                | Command::Notify { .. }
                | Command::Checkpoint(_)
                | Command::Release { .. }
        );
        if acts && !self.may_act() {
            // The run loop stops the study (the lease's loss stops the aggregator); the
            // instance now active repeats the round from its checkpoint.
            warn!(study = %study, "[ha] not carried out: this instance no longer holds the lease");
            return Ok(());
        }
        match command {
            Command::Request {
                id,
                site,
                message,
                timeout_ms,
            } => {
                let (max, audit) = (self.max_frame, self.audit.clone());
                let conn = self.registry.get(&site).map(|c| c.conn);
                tasks.spawn(async move {
                    let started = Instant::now();
                    let answer = match conn {
                        Some(conn) => transport::request_logged(
                            &conn,
                            &message,
                            max,
                            Duration::from_millis(timeout_ms),
                            Some((&*audit, &site)),
                        )
                        .await
                        .map_err(|e| match e {
                            TransportError::Peer { code, reason } => {
                                Failure::Refused { code, reason }
                            }
                            e => Failure::Transport(e.to_string()),
                        }),
                        None => Err(Failure::Transport("not connected".into())),
                    };
                    (id, site, answer, started.elapsed().as_secs_f64())
                });
            }
            Command::Notify { site, message } => self.notify(&site, &message),
            Command::Record(event) => {
                if let Err(e) = self.audit.record(event) {
                    let err = self.unlogged(&e);
                    coord.unlogged(e.to_string());
                    return Err(err);
                }
            }
            Command::Checkpoint(cp) => {
                if let Err(e) = crate::checkpoint::save(&*self.store, study, &cp) {
                    let err = self.failed(format!("checkpoint after round {}: {e}", cp.round));
                    coord.io_failed(err.to_string());
                    return Err(err);
                }
            }
            Command::Release { model, final_copy } => {
                if let Err(err) = self.release(*model, final_copy) {
                    match &err {
                        StudyError::Unlogged { detail, .. } => coord.unlogged(detail.clone()),
                        e => coord.io_failed(e.to_string()),
                    }
                    return Err(err);
                }
            }
            Command::Event(e) => match e {
                StudyEvent::Started { sites, rounds } => self.emit(AggregatorEvent::StudyStarted {
                    study_id: study.clone(),
                    sites,
                    rounds,
                }),
                StudyEvent::Refused { site, reason } => {
                    self.emit(AggregatorEvent::StudyRefused {
                        study_id: study.clone(),
                        site,
                        reason,
                    });
                }
                StudyEvent::RoundFailed { round, reason } => {
                    self.emit(AggregatorEvent::RoundFailed {
                        study_id: study.clone(),
                        round,
                        reason,
                    });
                }
                StudyEvent::Aggregated { .. } => {}
            },
            Command::Note {
                warning,
                round,
                text,
            } => match (warning, round) {
                (true, Some(round)) => warn!(study = %study, round, "{text}"),
                (true, None) => warn!(study = %study, "{text}"),
                (false, Some(round)) => info!(study = %study, round, "{text}"),
                (false, None) => info!(study = %study, "{text}"),
            },
        }
        Ok(())
    }

    /// Whether this instance may send, write or release: always without `[ha]`, and while it
    /// holds the lease with it.
    pub(crate) fn may_act(&self) -> bool {
        self.ha.as_ref().is_none_or(crate::ha::Ha::is_active)
    }

    /// A one-way message to `site` (a round's result): logged, then sent.
    fn notify(&self, site: &str, msg: &Message) {
        let Some(s) = self.registry.get(site) else {
            return;
        };
        let Ok(frame) = medfed_protocol::codec::encode_frame(msg, self.max_frame) else {
            return;
        };
        let info = transport::FrameInfo::of_frame(&frame);
        // Recorded before it leaves; not sent if it cannot be recorded.
        if let Err(e) = transport::Egress::sent(&*self.audit, site, msg, &info) {
            warn!(%site, "{} not sent: {e}", msg.kind());
            return;
        }
        // A node that stops reading cannot hold the task (or its buffer) forever.
        let site = site.to_string();
        tokio::spawn(tokio::time::timeout(Duration::from_secs(10), async move {
            // Recorded as sent already: a round's result that does not arrive is only
            // information the node lacks, but the operator's log says so.
            let sent = match s.conn.open_uni().await {
                Ok(mut send) => match send.write_all(&frame).await {
                    Ok(()) => send.finish().map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                warn!(%site, "a notification logged as sent did not arrive: {e}");
            }
        }));
    }

    /// Writes a round's model (logged before it is released), and `final.json` with it.
    fn release(&self, mut export: ExportedModel, final_copy: bool) -> Result<(), StudyError> {
        export.created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let dir = self.out_dir.join("models").join(&export.study_id);
        let path = dir.join(format!("round-{:04}.json", export.round));
        let json = serde_json::to_vec_pretty(&export)
            .map_err(|e| self.failed(format!("encoding the model: {e}")))?;
        let released = medfed_protocol::audit::Event::Released {
            study: export.study_id.clone(),
            round: export.round,
            sites: export.sites.clone(),
            sha256: medfed_protocol::audit::sha256_hex(&json),
        };
        crate::release::release(&self.audit, released, || Ok(()), &path, &json).map_err(
            |e| match e {
                crate::release::ReleaseError::Write { path, source } => StudyError::Export {
                    study: export.study_id.clone(),
                    path,
                    source,
                },
                e @ crate::release::ReleaseError::Unlogged(_) => self.unlogged(e),
                e => self.failed(e.to_string()),
            },
        )?;
        if final_copy {
            let final_path = dir.join("final.json");
            std::fs::copy(&path, &final_path).map_err(|source| StudyError::Export {
                study: export.study_id.clone(),
                path: final_path.clone(),
                source,
            })?;
            if export.stopped.is_some() {
                warn!(study = %export.study_id, round = export.round, "study stopped early; its last released model is {}", final_path.display());
            }
        }
        self.emit(AggregatorEvent::RoundCompleted(RoundSummary {
            study_id: export.study_id,
            round: export.round,
            sites: export.sites,
            training_rows: export.training_rows,
            train_loss: export.train_loss,
            validation: export.validation,
            model_path: path,
        }));
        Ok(())
    }
}
