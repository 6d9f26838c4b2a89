//! A training study as a sans-I/O state machine: the [`Coordinator`] decides everything
//! about a study (who takes part, when a round starts, is retried or fails, what enters the
//! average, what is released and checkpointed), and a driver does the I/O.
//!
//! Modelled on quinn-proto's `Connection` and this crate's [`secagg::Server`]: the driver
//! feeds it events with the time (`now`, in ms of a clock the driver chooses) and carries
//! out what it asks, in order:
//!
//! ```text
//!   driver                                   Coordinator
//!   ── sites(now, connected) ──────────────▶ (who is connected, with which connection)
//!   ── handle_answer(now, id, answer) ─────▶ (the answer to one of its requests)
//!   ── handle_timeout(now) ────────────────▶ (poll_timeout() has passed)
//!   ── stop(now) ──────────────────────────▶ (the operator: stop at the next round)
//!   ◀── poll_command(): Request, Notify, Record, Checkpoint, Release, Event, Note
//!   ── unlogged(why) / io_failed(why) ─────▶ (a Record, Checkpoint or Release failed)
//!   ◀── ending(): Completed or Failed
//! ```
//!
//! It reads no clock, draws no OS randomness (the site sampling uses a generator seeded by
//! the driver), and touches no file or socket; the aggregator's `study.rs` drives it over
//! QUIC, and `tests/sim.rs` drives it over a simulated network with a virtual clock.
//!
//! [`secagg::Server`]: crate::secagg::Server

pub mod checkpoint;
pub mod config;
pub mod rules;
pub mod secure;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

use rand::SeedableRng;
use rand::seq::IteratorRandom;
use rand_chacha::ChaCha8Rng;

use crate::audit::Event as AuditEvent;
use crate::export::{ExportedModel, MODEL_FORMAT, MissingSite};
use crate::messages::{
    EvaluateRequest, ModelUpdate, RoundOpen, RoundResult, StatisticsOpen, StudyAnnouncement,
    StudyDecision, statistics_binding, training_binding,
};
use crate::metrics::{Evaluation, Metrics};
use crate::model::{GlobalModel, ServerState, federated_average};
use crate::quant::QuantParams;
use crate::schedule::{Requirements, SiteStats, plan};
use crate::secagg::Verifier;
use crate::stats::FeatureStats;
use crate::{ErrorCode, Message, update_vector};

pub use checkpoint::{PendingRound, StudyCheckpoint, config_hash};
pub use config::{Selection, StudyConfig};
pub use rules::{MAX_ROWS, check_classes, check_target, check_update, dp_average, z_of};

use secure::SecureSum;

/// One request of the coordinator's, named in its answer.
pub type RequestId = u64;

/// Why a request got no usable answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The site answered with an error.
    Refused {
        /// The site's error code.
        code: ErrorCode,
        /// The site's reason.
        reason: String,
    },
    /// No answer: a timeout, a lost connection, an unreadable frame.
    Transport(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused { code, reason } => write!(f, "refused ({code}): {reason}"),
            Failure::Transport(e) => write!(f, "{e}"),
        }
    }
}

/// The answer to a request.
pub type Answer = Result<Message, Failure>;

/// A connected site, as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConn {
    /// The site's name (its certificate's).
    pub name: String,
    /// Its connection: a new one after a reconnect.
    pub conn: u64,
    /// Its certificate (DER), for secure aggregation's key signatures.
    pub certificate: Vec<u8>,
}

/// Builds the checker of secure-aggregation key signatures for a set of parties, from
/// their certificates (the aggregator: X.509 under the consortium CA).
pub trait KeyVerifiers: Send {
    /// The verifier for `parties` (name, certificate DER).
    fn verifier(&self, parties: &[(String, Vec<u8>)]) -> Result<Box<dyn Verifier + Send>, String>;
}

/// What the coordinator asks of its driver, in order.
#[derive(Debug, Clone)]
pub enum Command {
    /// Ask `site`; its answer (or failure, at the latest after `timeout_ms`) goes to
    /// [`Coordinator::handle_answer`] with `id`.
    Request {
        /// Names the answer.
        id: RequestId,
        /// Whom to ask.
        site: String,
        /// What.
        message: Message,
        /// How long the answer may take.
        timeout_ms: u64,
    },
    /// Tell `site`, expecting no answer.
    Notify {
        /// Whom.
        site: String,
        /// What.
        message: Message,
    },
    /// Record in the compliance log before going on; if it cannot be, call
    /// [`Coordinator::unlogged`] (nothing that follows is then done).
    Record(AuditEvent),
    /// Store the study's state; if it cannot be, call [`Coordinator::io_failed`].
    Checkpoint(StudyCheckpoint),
    /// Release a round's model (logged, then written as `round-NNNN.json`, and copied to
    /// `final.json` if `final_copy`); `created_unix` is the driver's to set. If it cannot
    /// be, call [`Coordinator::io_failed`] (or [`Coordinator::unlogged`]).
    Release {
        /// The model file's content.
        model: Box<ExportedModel>,
        /// Whether it is also the study's `final.json`.
        final_copy: bool,
    },
    /// Something for the operator's display.
    Event(StudyEvent),
    /// A line for the operator's log (the driver's logger).
    Note {
        /// A warning, or information.
        warning: bool,
        /// The round it is about, if one.
        round: Option<u32>,
        /// The line.
        text: String,
    },
}

/// What the operator's display is told.
#[derive(Debug, Clone, PartialEq)]
pub enum StudyEvent {
    /// The rounds start, with these sites.
    Started {
        /// The participants.
        sites: Vec<String>,
        /// The rounds asked.
        rounds: u32,
    },
    /// A site refused the study.
    Refused {
        /// The site.
        site: String,
        /// Its reason.
        reason: String,
    },
    /// A round's attempt failed.
    RoundFailed {
        /// The round.
        round: u32,
        /// Why.
        reason: String,
    },
    /// A sum (or average) of one round was computed from these sites' inputs.
    Aggregated {
        /// The round (0: the feature statistics; `rounds + 1`: the final evaluation).
        round: u32,
        /// The attempt.
        attempt: u32,
        /// Whose inputs are in it.
        sites: Vec<String>,
    },
}

/// Why a study ended without completing.
#[derive(Debug, Clone, PartialEq)]
pub enum StudyFailure {
    /// Too few sites took part.
    NoQuorum {
        /// Sites that took part (always below `need`).
        got: usize,
        /// The quorum.
        need: usize,
        /// Where and why.
        detail: String,
    },
    /// Every attempt of a round failed before its contributions could be counted.
    RoundFailed {
        /// The round.
        round: u32,
        /// Attempts made.
        attempts: u32,
        /// Why the last failed.
        detail: String,
    },
    /// Anything else.
    Failed(String),
    /// The operator stopped it after this round.
    Stopped {
        /// The last completed round.
        round: u32,
    },
    /// The compliance log cannot record a step.
    Unlogged(String),
    /// It ended after releasing rounds: the last released model is exported, marked.
    EndedEarly {
        /// Why it ended.
        cause: Box<StudyFailure>,
        /// The last released round.
        round: u32,
    },
}

impl StudyFailure {
    /// Why it ended: for [`StudyFailure::EndedEarly`], the failure that ended it.
    pub fn cause(&self) -> &StudyFailure {
        match self {
            StudyFailure::EndedEarly { cause, .. } => cause,
            f => f,
        }
    }

    /// The failure in words, naming the study.
    pub fn describe(&self, study: &str) -> String {
        match self {
            StudyFailure::NoQuorum { got, need, detail } => {
                format!(
                    "study '{study}': only {got} of the {need} sites needed took part ({detail})"
                )
            }
            StudyFailure::RoundFailed {
                round,
                attempts,
                detail,
            } => format!(
                "study '{study}': round {round} failed {attempts} time(s), the last because {detail}"
            ),
            StudyFailure::Failed(detail) => format!("study '{study}': {detail}"),
            StudyFailure::Stopped { round } => {
                format!("study '{study}' was stopped by the operator after round {round}")
            }
            StudyFailure::Unlogged(detail) => format!(
                "study '{study}': the compliance log cannot be written ({detail}), so the study stops"
            ),
            StudyFailure::EndedEarly { cause, round } => format!(
                "{}; the last released model is round {round}'s, marked as stopped early",
                cause.describe(study)
            ),
        }
    }
}

/// A completed study.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed {
    /// Rounds run.
    pub rounds: u32,
    /// The final model's federated validation, if released.
    pub validation: Option<Metrics>,
    /// Allowed sites whose data is in no round of the model, or that left, and why.
    pub missing: Vec<MissingSite>,
    /// The final model's file, as given to [`Coordinator::new`].
    pub final_model: PathBuf,
}

/// How a study ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// Every round, and the final model released.
    Completed(Completed),
    /// It ended without completing.
    Failed(StudyFailure),
}

/// Commands on their way to the driver, and request ids.
#[derive(Default)]
pub(crate) struct Out {
    commands: VecDeque<Command>,
    next_id: RequestId,
}

impl Out {
    fn push(&mut self, c: Command) {
        self.commands.push_back(c);
    }

    /// Queues a request; its id.
    pub(crate) fn request(&mut self, site: &str, message: Message, timeout_ms: u64) -> RequestId {
        self.next_id += 1;
        let id = self.next_id;
        self.push(Command::Request {
            id,
            site: site.to_string(),
            message,
            timeout_ms,
        });
        id
    }

    pub(crate) fn note(&mut self, text: String) {
        self.push(Command::Note {
            warning: true,
            round: None,
            text,
        });
    }

    fn info(&mut self, text: String) {
        self.push(Command::Note {
            warning: false,
            round: None,
            text,
        });
    }

    fn note_round(&mut self, round: u32, warning: bool, text: String) {
        self.push(Command::Note {
            warning,
            round: Some(round),
            text,
        });
    }
}

/// A participant's standing in the study.
#[derive(Debug, Clone)]
struct Participant {
    /// Declared on acceptance (0 under differential privacy).
    training_rows: u64,
    /// The connection the study was announced on; a reconnected site is announced again.
    announced_on: u64,
}

/// What one round produced, however it was aggregated.
struct RoundAggregate {
    sites: Vec<String>,
    weights: Vec<f64>,
    train_loss: f64,
    rows: u64,
    evaluation: Evaluation,
    /// How long each contributing site took, ms.
    latencies: BTreeMap<String, f64>,
}

/// A round's model waiting for its validation figures (they arrive in the next round).
#[derive(Debug, Clone)]
struct Pending {
    round: u32,
    sites: Vec<String>,
    training_rows: u64,
    train_loss: f64,
    model: GlobalModel,
}

/// What an announcement (or re-announcement) is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnnounceFor {
    /// The study's start.
    Start,
    /// Before an attempt of `round` (`rounds + 1`: the final evaluation).
    Attempt { round: u32, attempt: u32 },
}

/// A plain round in progress.
struct PlainRound {
    round: u32,
    attempt: u32,
    invited: BTreeSet<String>,
    waiting: BTreeMap<RequestId, String>,
    started: u64,
    updates: BTreeMap<String, ModelUpdate>,
    latencies: BTreeMap<String, f64>,
    evaluation: Evaluation,
    model: GlobalModel,
}

enum Phase {
    /// Waiting for the allowed sites to connect, until `until`.
    WaitingForSites { until: u64 },
    /// Announced to these sites; waiting for their decisions.
    Announcing {
        purpose: AnnounceFor,
        waiting: BTreeMap<RequestId, String>,
    },
    /// The accepting sites' feature statistics, summed securely (exact studies).
    FeatureStatistics { attempt: u32, sum: Box<SecureSum> },
    /// A training round without secure aggregation.
    Plain(Box<PlainRound>),
    /// A training round (or the final evaluation) under secure aggregation.
    Secure {
        round: u32,
        attempt: u32,
        invited: BTreeSet<String>,
        sum: Box<SecureSum>,
    },
    /// Waiting before the next attempt of a round.
    Pause {
        until: u64,
        round: u32,
        attempt: u32,
    },
    /// The final model's evaluation without secure aggregation.
    Evaluating {
        waiting: BTreeMap<RequestId, String>,
        total: Evaluation,
    },
    /// Ended (see [`Coordinator::ending`]).
    Ended,
}

/// The pause between two attempts of a round, ms.
const RETRY_PAUSE_MS: u64 = 1000;

/// The round number of a study's secure feature statistics.
const STATISTICS_ROUND: u32 = 0;

/// Range bound of a feature-statistics entry: `s·n_i·E[x²]` stays below the largest
/// squared feature value, so features up to about 30,000 in magnitude fit.
const STATISTICS_CLIP: f64 = 1e9;

/// A training study, decided here, driven by I/O code elsewhere.
pub struct Coordinator {
    cfg: StudyConfig,
    allow: BTreeSet<String>,
    verifiers: Box<dyn KeyVerifiers>,
    rng: ChaCha8Rng,
    final_model: PathBuf,
    out: Out,
    phase: Phase,
    ending: Option<Ending>,
    stop_requested: bool,

    connected: BTreeMap<String, SiteConn>,
    participants: BTreeMap<String, Participant>,
    /// Why each allowed site is not in the study.
    absent: BTreeMap<String, String>,
    /// The target classes each accepting site names.
    classes: BTreeMap<String, Vec<String>>,
    /// When the wait for sites ends (the start's deadline for decisions too).
    wait_until: u64,
    /// Sites that answered the announcement (accepted, refused, or answered wrongly): not
    /// asked again at the start.
    decided: BTreeSet<String>,
    /// The connection each undecided site was last announced the study on: one that
    /// reconnects is asked again while the start waits for a quorum.
    tried: BTreeMap<String, u64>,
    /// Whether the study has been announced once.
    announced_once: bool,
    /// Per round, the survivors a failed secure attempt asked unmasking shares of: they
    /// may have revealed, and join that round again only with exactly these parties (a
    /// node refuses any other set), so the retries invite them.
    revealed_with: BTreeMap<u32, BTreeSet<String>>,
    /// Feature statistics: the secure sum, or (exact studies without secure aggregation)
    /// summed from `site_stats` when the rounds begin.
    stats: FeatureStats,
    /// Each accepting site's feature statistics (exact studies without secure aggregation),
    /// summed in the sites' order, not their answers' (the standardization, and so the
    /// model, must not depend on which site answered first).
    site_stats: BTreeMap<String, FeatureStats>,
    /// Rounds each site's input is in.
    contributed: BTreeMap<String, u32>,
    /// The threshold of the last secure round started, for the models' provenance.
    last_threshold: Option<u32>,
    scheduler: BTreeMap<String, SiteStats>,
    resume: Option<StudyCheckpoint>,
    model: Option<GlobalModel>,
    server_state: ServerState,
    pending: Option<Pending>,
    /// The next round to run.
    round: u32,
}

impl Coordinator {
    /// A study `cfg` for the sites in `allow`, starting at `now` (or going on from
    /// `resume`, its last checkpoint). `seed` seeds the site sampling; `final_model` is
    /// the path the driver writes `final.json` to (kept in the completed checkpoint).
    pub fn new(
        cfg: StudyConfig,
        allow: impl IntoIterator<Item = String>,
        verifiers: Box<dyn KeyVerifiers>,
        seed: u64,
        now: u64,
        resume: Option<StudyCheckpoint>,
        final_model: PathBuf,
    ) -> Coordinator {
        let d = cfg.inputs().len();
        let allow: BTreeSet<String> = allow.into_iter().collect();
        let absent = allow
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    "not connected when the study was announced".into(),
                )
            })
            .collect();
        let wait_until = now.saturating_add(cfg.wait_for_sites_secs.saturating_mul(1000));
        let mut c = Coordinator {
            phase: Phase::WaitingForSites { until: wait_until },
            wait_until,
            decided: BTreeSet::new(),
            tried: BTreeMap::new(),
            announced_once: false,
            revealed_with: BTreeMap::new(),
            allow,
            verifiers,
            rng: ChaCha8Rng::seed_from_u64(seed),
            final_model,
            out: Out::default(),
            ending: None,
            stop_requested: false,
            connected: BTreeMap::new(),
            participants: BTreeMap::new(),
            absent,
            classes: BTreeMap::new(),
            stats: FeatureStats::empty(d),
            site_stats: BTreeMap::new(),
            contributed: BTreeMap::new(),
            last_threshold: None,
            scheduler: BTreeMap::new(),
            model: None,
            server_state: ServerState::default(),
            pending: None,
            round: 1,
            resume: None,
            cfg,
        };
        if let Some(cp) = resume {
            if let Some((_, validation)) = &cp.complete {
                c.out.info(format!(
                    "study '{}' already complete (checkpoint); not run again",
                    c.cfg.id
                ));
                c.ending = Some(Ending::Completed(Completed {
                    rounds: c.cfg.rounds,
                    validation: validation.clone(),
                    missing: Vec::new(),
                    final_model: c.final_model.clone(),
                }));
                c.phase = Phase::Ended;
            } else {
                c.resume = Some(cp);
            }
        }
        c
    }

    /// The study's configuration.
    pub fn config(&self) -> &StudyConfig {
        &self.cfg
    }

    /// The next command for the driver.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.commands.pop_front()
    }

    /// How the study ended, once it has.
    pub fn ending(&self) -> Option<&Ending> {
        self.ending.as_ref()
    }

    /// When the coordinator next needs [`Coordinator::handle_timeout`] (ms), if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.phase {
            Phase::WaitingForSites { until } | Phase::Pause { until, .. } => Some(*until),
            Phase::FeatureStatistics { sum, .. } | Phase::Secure { sum, .. } => sum.poll_timeout(),
            _ => None,
        }
    }

    /// The sites connected now (all of them, each time the set or a connection changes).
    pub fn sites(&mut self, now: u64, connected: &[SiteConn]) {
        self.connected = connected
            .iter()
            .filter(|s| self.allow.contains(&s.name))
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        if matches!(self.phase, Phase::WaitingForSites { .. }) {
            self.handle_timeout(now);
        }
    }

    /// The operator asks the study to stop: it does at the start of its next round.
    pub fn stop(&mut self) {
        self.stop_requested = true;
    }

    /// A [`Command::Record`] could not be written: the study stops, doing nothing more.
    pub fn unlogged(&mut self, why: impl Into<String>) {
        self.out.commands.clear();
        self.abort_phase();
        self.ending = Some(Ending::Failed(StudyFailure::Unlogged(why.into())));
    }

    /// A [`Command::Checkpoint`] or [`Command::Release`] could not be carried out: the
    /// study stops.
    pub fn io_failed(&mut self, why: impl Into<String>) {
        self.out.commands.clear();
        self.abort_phase();
        self.ending = Some(Ending::Failed(StudyFailure::Failed(why.into())));
    }

    fn abort_phase(&mut self) {
        if let Phase::Secure { sum, .. } | Phase::FeatureStatistics { sum, .. } = &mut self.phase {
            sum.abort();
        }
        self.phase = Phase::Ended;
    }

    /// The time has come (see [`Coordinator::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: u64) {
        if self.ending.is_some() {
            return;
        }
        match &mut self.phase {
            Phase::WaitingForSites { until } if self.announced_once => {
                // Too few accepted at the start: a site that had not answered and has
                // reconnected since is asked again, until the wait ends.
                let until = *until;
                if !self.start_candidates().is_empty() {
                    self.announce(now, AnnounceFor::Start);
                } else if now >= until {
                    self.fail(StudyFailure::NoQuorum {
                        got: self.participants.len(),
                        need: self.cfg.min_sites,
                        detail: format!(
                            "too few sites accepted the study; waited {} s for the others",
                            self.cfg.wait_for_sites_secs
                        ),
                    });
                }
            }
            Phase::WaitingForSites { until } => {
                let until = *until;
                let n = self.connected.len();
                if n >= self.allow.len() || (now >= until && n >= self.cfg.min_sites) {
                    self.announce(now, AnnounceFor::Start);
                } else if now >= until {
                    self.fail(StudyFailure::NoQuorum {
                        got: n,
                        need: self.cfg.min_sites,
                        detail: format!(
                            "waited {} s for sites to connect",
                            self.cfg.wait_for_sites_secs
                        ),
                    });
                }
            }
            Phase::Pause {
                until,
                round,
                attempt,
            } if now >= *until => {
                let (round, attempt) = (*round, *attempt);
                self.begin_attempt(now, round, attempt);
            }
            Phase::FeatureStatistics { sum, .. } => {
                sum.handle_timeout(&mut self.out, now);
                self.settle_feature_statistics(now);
            }
            Phase::Secure { sum, .. } => {
                sum.handle_timeout(&mut self.out, now);
                self.settle_secure(now);
            }
            _ => {}
        }
    }

    /// The answer to request `id`.
    pub fn handle_answer(&mut self, now: u64, id: RequestId, answer: Answer) {
        if self.ending.is_some() {
            return;
        }
        match &mut self.phase {
            Phase::Announcing { waiting, purpose } => {
                let purpose = *purpose;
                let Some(site) = waiting.remove(&id) else {
                    return;
                };
                self.on_decision(&site, purpose, answer);
                if self.ending.is_none()
                    && let Phase::Announcing { waiting, .. } = &self.phase
                    && waiting.is_empty()
                {
                    self.announced(now, purpose);
                }
            }
            Phase::FeatureStatistics { sum, .. } if sum.owns(id) => {
                sum.handle_answer(&mut self.out, now, id, answer);
                self.settle_feature_statistics(now);
            }
            Phase::Secure { sum, .. } if sum.owns(id) => {
                sum.handle_answer(&mut self.out, now, id, answer);
                self.settle_secure(now);
            }
            Phase::Plain(p) => {
                let Some(site) = p.waiting.remove(&id) else {
                    return;
                };
                let declared = self.participants.get(&site).map_or(0, |p| p.training_rows);
                let update = match answer {
                    Ok(Message::ModelUpdate(u)) => u,
                    Ok(other) => {
                        self.out.note(format!(
                            "round {}: {site} answered with a {}, not a model update",
                            p.round,
                            other.kind()
                        ));
                        return self.settle_plain(now);
                    }
                    Err(e) => {
                        self.out
                            .note(format!("round {}: no update from {site}: {e}", p.round));
                        return self.settle_plain(now);
                    }
                };
                if let Err(why) = check_update(
                    &update,
                    &self.cfg.id,
                    p.round,
                    p.model.weights.len(),
                    declared,
                ) {
                    self.out
                        .note(format!("round {}: {site}'s update refused: {why}", p.round));
                } else if let Err(e) = p.evaluation.merge(&update.evaluation) {
                    self.out.note(format!(
                        "round {}: {site}'s update refused: evaluation: {e}",
                        p.round
                    ));
                } else {
                    p.latencies
                        .insert(site.clone(), now.saturating_sub(p.started) as f64);
                    p.updates.insert(site, update);
                }
                self.settle_plain(now);
            }
            Phase::Evaluating { waiting, total } => {
                let Some(site) = waiting.remove(&id) else {
                    return;
                };
                let final_round = self.cfg.rounds;
                match answer {
                    Ok(Message::EvaluationReport(r))
                        if r.study_id == self.cfg.id && r.round == final_round =>
                    {
                        if let Err(e) = total.merge(&r.evaluation) {
                            self.out.note(format!("{site}'s evaluation refused: {e}"));
                        }
                    }
                    Ok(other) => self.out.note(format!(
                        "{site} answered with a {}, not an evaluation report",
                        other.kind()
                    )),
                    Err(e) => self.out.note(format!("no evaluation from {site}: {e}")),
                }
                if let Phase::Evaluating { waiting, total } = &self.phase
                    && waiting.is_empty()
                {
                    let total = total.clone();
                    self.finish(total);
                }
            }
            _ => {}
        }
    }

    // ---- announcing -------------------------------------------------------------------

    fn announcement(&self) -> StudyAnnouncement {
        self.cfg.announcement()
    }

    /// Announces the study to every connected site (at the start) or to the participants
    /// that reconnected since they were announced it (before an attempt).
    fn announce(&mut self, now: u64, purpose: AnnounceFor) {
        let sites: Vec<String> = match purpose {
            AnnounceFor::Start => {
                self.announced_once = true;
                let sites = self.start_candidates();
                for site in &sites {
                    if let Some(c) = self.connected.get(site) {
                        self.tried.insert(site.clone(), c.conn);
                    }
                }
                sites
            }
            AnnounceFor::Attempt { .. } => self
                .participants
                .iter()
                .filter(|(site, p)| {
                    self.connected
                        .get(*site)
                        .is_some_and(|c| c.conn != p.announced_on)
                })
                .map(|(site, _)| site.clone())
                .collect(),
        };
        if sites.is_empty() {
            return self.announced(now, purpose);
        }
        let msg = Message::StudyAnnouncement(self.announcement());
        let timeout = self.cfg.decision_timeout_secs.saturating_mul(1000);
        let mut waiting = BTreeMap::new();
        for site in sites {
            if purpose == AnnounceFor::Start {
                self.absent.insert(site.clone(), "no study decision".into());
            }
            let id = self.out.request(&site, msg.clone(), timeout);
            waiting.insert(id, site);
        }
        self.phase = Phase::Announcing { purpose, waiting };
    }

    /// The connected sites to announce the study to at the start: those that have not
    /// answered it, each once per connection.
    fn start_candidates(&self) -> Vec<String> {
        self.connected
            .iter()
            .filter(|(site, c)| {
                !self.decided.contains(*site) && self.tried.get(*site) != Some(&c.conn)
            })
            .map(|(site, _)| site.clone())
            .collect()
    }

    fn record(&mut self, event: AuditEvent) {
        self.out.push(Command::Record(event));
    }

    fn plausible_rows(&self, rows: u64) -> bool {
        if self.cfg.privacy.is_some() {
            rows == 0
        } else {
            (1..=MAX_ROWS).contains(&rows)
        }
    }

    fn on_decision(&mut self, site: &str, purpose: AnnounceFor, answer: Answer) {
        if purpose == AnnounceFor::Start && !matches!(answer, Err(Failure::Transport(_))) {
            self.decided.insert(site.to_string());
        }
        let id = self.cfg.id.clone();
        let conn = self.connected.get(site).map_or(0, |c| c.conn);
        let refused = |reason: String| match purpose {
            AnnounceFor::Start => format!("site '{site}' refused: {reason}"),
            AnnounceFor::Attempt { .. } => {
                format!("site '{site}' refused on reconnecting: {reason}")
            }
        };
        match answer {
            Ok(Message::StudyDecision(StudyDecision::Accept {
                study_id,
                training_rows,
                feature_stats,
                target_classes,
                ..
            })) if study_id == id => {
                if !self.plausible_rows(training_rows) {
                    self.out.note(format!(
                        "{site} accepted with an implausible number of training rows ({training_rows}); left out"
                    ));
                    return self.withdraw(site, purpose, "accepted with an implausible row count");
                }
                if purpose == AnnounceFor::Start {
                    if !self.cfg.secure_aggregation.enabled && self.cfg.privacy.is_none() {
                        let Some(fs) = feature_stats else {
                            self.out.note(format!(
                                "{site} accepted without feature statistics; left out"
                            ));
                            return;
                        };
                        if training_rows != fs.count {
                            self.out.note(format!(
                                "{site}: inconsistent row counts in its study decision; left out"
                            ));
                            return;
                        }
                        if let Err(e) = FeatureStats::empty(self.cfg.inputs().len()).merge(&fs) {
                            self.out.note(format!(
                                "{site}'s feature statistics refused: {e}; left out"
                            ));
                            return;
                        }
                        self.site_stats.insert(site.to_string(), fs);
                    }
                    self.classes.insert(site.to_string(), target_classes);
                    self.absent.remove(site);
                    self.out.info(format!(
                        "study '{id}': site '{site}' accepted ({})",
                        if self.cfg.privacy.is_some() {
                            "no row count under DP".to_string()
                        } else {
                            format!("{training_rows} training rows")
                        }
                    ));
                    self.record(AuditEvent::StudyDecision {
                        study: id,
                        accepted: true,
                        reason: if self.cfg.privacy.is_some() {
                            format!("site '{site}' accepted (no row count under DP)")
                        } else {
                            format!("site '{site}' accepted with {training_rows} training rows")
                        },
                    });
                }
                self.participants.insert(
                    site.to_string(),
                    Participant {
                        training_rows,
                        announced_on: conn,
                    },
                );
            }
            Ok(Message::StudyDecision(StudyDecision::Refuse { reason, .. })) => {
                self.out.note(format!(
                    "study '{id}': site '{site}' refused the study: {reason}"
                ));
                self.record(AuditEvent::StudyDecision {
                    study: id,
                    accepted: false,
                    reason: refused(reason.clone()),
                });
                self.absent
                    .insert(site.to_string(), format!("refused the study: {reason}"));
                self.out.push(Command::Event(StudyEvent::Refused {
                    site: site.to_string(),
                    reason,
                }));
                if purpose != AnnounceFor::Start {
                    self.participants.remove(site);
                }
            }
            Ok(other) => {
                self.out.note(format!(
                    "{site} answered the announcement with a {} (another study's?); left out",
                    other.kind()
                ));
                self.withdraw(
                    site,
                    purpose,
                    "answered the announcement with another message",
                );
            }
            Err(e) => {
                self.out
                    .note(format!("study '{id}': no study decision from {site}: {e}"));
                if purpose == AnnounceFor::Start {
                    self.absent
                        .insert(site.to_string(), format!("no study decision: {e}"));
                }
                // A reconnected participant that does not answer stays: the round will
                // find out whether it is there.
            }
        }
    }

    fn withdraw(&mut self, site: &str, purpose: AnnounceFor, why: &str) {
        if purpose != AnnounceFor::Start {
            self.participants.remove(site);
        }
        self.absent.insert(site.to_string(), why.to_string());
    }

    /// Every decision is in.
    fn announced(&mut self, now: u64, purpose: AnnounceFor) {
        match purpose {
            AnnounceFor::Attempt { round, attempt } => self.start_attempt(now, round, attempt),
            AnnounceFor::Start => {
                let undecided = self
                    .allow
                    .iter()
                    .filter(|s| !self.decided.contains(*s))
                    .count();
                if self.participants.len() < self.cfg.min_sites
                    && now < self.wait_until
                    && self.participants.len() + undecided >= self.cfg.min_sites
                {
                    // Sites that did not answer (a node restarting) may still: wait for
                    // them to reconnect, until the wait for sites ends.
                    self.out.info(format!(
                        "study '{}': {} of the {} sites needed accepted; waiting for the {undecided} that did not answer",
                        self.cfg.id,
                        self.participants.len(),
                        self.cfg.min_sites
                    ));
                    self.phase = Phase::WaitingForSites {
                        until: self.wait_until,
                    };
                    return;
                }
                if self.participants.len() < self.cfg.min_sites {
                    return self.fail(StudyFailure::NoQuorum {
                        got: self.participants.len(),
                        need: self.cfg.min_sites,
                        detail: "too few sites accepted the study".into(),
                    });
                }
                if self.cfg.kind().is_classifier() {
                    let named: BTreeMap<String, Vec<String>> = std::mem::take(&mut self.classes)
                        .into_iter()
                        .filter(|(site, _)| self.participants.contains_key(site))
                        .collect();
                    let checked = if self.cfg.classes.is_empty() {
                        check_target(&self.cfg.target, self.cfg.positive_class.as_deref(), &named)
                            .map(|()| None)
                    } else {
                        check_classes(&self.cfg.target, &self.cfg.classes, &named)
                    };
                    match checked {
                        Err(why) => return self.fail(StudyFailure::Failed(why)),
                        Ok(Some(note)) => self.out.note(format!("study '{}': {note}", self.cfg.id)),
                        Ok(None) => {}
                    }
                }
                if self.resume.is_none()
                    && self.cfg.privacy.is_none()
                    && self.cfg.secure_aggregation.enabled
                {
                    // The sites' statistics are only ever seen summed.
                    return self.start_feature_statistics(now, 1);
                }
                self.begin_rounds(now);
            }
        }
    }

    // ---- feature statistics -----------------------------------------------------------

    fn start_feature_statistics(&mut self, now: u64, attempt: u32) {
        let d = self.cfg.inputs().len();
        let study = self.cfg.id.clone();
        let parties = self.parties_for(
            STATISTICS_ROUND,
            self.participants.keys().cloned().collect(),
        );
        let result = self.start_sum(
            now,
            STATISTICS_ROUND,
            attempt,
            parties.into_iter().collect(),
            update_vector::statistics_dimension(d),
            |n, scale| {
                // The finest fixed point that cannot overflow 64 bits for n parties.
                let room = (2f64.powi(62) / (n as f64 * STATISTICS_CLIP))
                    .log2()
                    .floor();
                let bits = room.clamp(0.0, 24.0) as u8;
                let quant = QuantParams::for_parties(n, STATISTICS_CLIP, bits)
                    .map_err(|e| e.to_string())?;
                Ok((quant, statistics_binding(&study, scale)))
            },
            |secure| {
                Message::StatisticsOpen(StatisticsOpen {
                    study_id: study.clone(),
                    secure,
                })
            },
        );
        match result {
            Ok(sum) => {
                self.phase = Phase::FeatureStatistics {
                    attempt,
                    sum: Box::new(sum),
                }
            }
            Err(e) => self.feature_statistics_failed(now, attempt, e),
        }
    }

    fn settle_feature_statistics(&mut self, now: u64) {
        let Phase::FeatureStatistics { attempt, sum } = &self.phase else {
            return;
        };
        let Some(outcome) = sum.outcome() else {
            return;
        };
        if outcome.is_err()
            && let Some(s) = &sum.unmasking
        {
            self.revealed_with
                .insert(STATISTICS_ROUND, s.iter().cloned().collect());
        }
        let (attempt, scale) = (*attempt, sum.scale);
        let d = self.cfg.inputs().len();
        let result = outcome.and_then(|s| {
            if s.sites.len() < self.cfg.min_sites {
                return Err(format!(
                    "{} of the {} sites needed contributed",
                    s.sites.len(),
                    self.cfg.min_sites
                ));
            }
            update_vector::decode_statistics(&s.sum, d, scale).map(|stats| (stats, s.sites))
        });
        match result {
            Ok((stats, sites)) => {
                self.out.push(Command::Event(StudyEvent::Aggregated {
                    round: STATISTICS_ROUND,
                    attempt,
                    sites: sites.clone(),
                }));
                self.out.info(format!(
                    "study '{}': feature statistics summed securely ({} sites, {} rows)",
                    self.cfg.id,
                    sites.len(),
                    stats.count
                ));
                self.stats = stats;
                self.begin_rounds(now);
            }
            Err(e) => self.feature_statistics_failed(now, attempt, e),
        }
    }

    fn feature_statistics_failed(&mut self, now: u64, attempt: u32, e: String) {
        self.out.note(format!(
            "study '{}': secure feature statistics failed (attempt {attempt}): {e}",
            self.cfg.id
        ));
        if attempt >= self.cfg.round_attempts {
            self.fail(StudyFailure::Failed(format!("feature statistics: {e}")));
        } else {
            // As a round's attempt: after a pause (a site that dropped out may be back),
            // sites that reconnected meanwhile (a restarted node forgets the study) are
            // announced it again first.
            self.phase = Phase::Pause {
                until: now.saturating_add(RETRY_PAUSE_MS),
                round: STATISTICS_ROUND,
                attempt: attempt + 1,
            };
        }
    }

    // ---- rounds ----------------------------------------------------------------------

    /// The feature statistics the standardization comes from: the secure sum, or the
    /// accepting sites' summed in name order.
    fn summed_stats(&self) -> Result<FeatureStats, crate::stats::StatsError> {
        if self.site_stats.is_empty() {
            return Ok(self.stats.clone());
        }
        let mut total = FeatureStats::empty(self.cfg.inputs().len());
        for fs in self.site_stats.values() {
            total.merge(fs)?;
        }
        Ok(total)
    }

    fn begin_rounds(&mut self, now: u64) {
        for (site, p) in &self.participants {
            self.scheduler.insert(
                site.clone(),
                SiteStats::new(site.clone(), p.training_rows.max(1), 1000.0),
            );
        }
        match self.resume.take() {
            Some(cp) => {
                for s in &cp.scheduler {
                    if let Some(mine) = self.scheduler.get_mut(&s.name) {
                        *mine = s.clone();
                    }
                }
                self.out.info(format!(
                    "study '{}': resuming from the checkpoint after round {}",
                    self.cfg.id, cp.round
                ));
                self.pending = cp.pending.map(|p| Pending {
                    round: p.round,
                    sites: p.sites,
                    training_rows: p.training_rows,
                    train_loss: p.train_loss.unwrap_or(f64::NAN),
                    model: cp.model.clone(),
                });
                for site in self.pending.iter().flat_map(|p| &p.sites) {
                    self.contributed.insert(site.clone(), 1);
                }
                self.model = Some(cp.model);
                self.server_state = cp.server_state;
                self.round = cp.round + 1;
            }
            None => {
                let mut recipe = self.cfg.preprocess.recipe(&self.cfg.features);
                let standardization = match &self.cfg.privacy {
                    // Under differential privacy nothing about the data is released but the
                    // noisy model: standardize from the declared feature ranges (and impute
                    // only declared values).
                    Some(p) => p.standardization_for(&recipe),
                    None => match self.summed_stats().and_then(|s| s.standardization()) {
                        // A "mean" imputation is the federation's mean of the present values.
                        Ok(s) => {
                            recipe.resolve_means(&s.mean);
                            s
                        }
                        Err(e) => return self.fail(StudyFailure::Failed(e.to_string())),
                    },
                };
                let mut model =
                    GlobalModel::zeros(self.cfg.kind(), recipe.features(), standardization);
                if !self.cfg.preprocess.is_empty() {
                    model.recipe = recipe;
                }
                self.model = Some(model);
                self.round = 1;
            }
        }
        self.out.push(Command::Event(StudyEvent::Started {
            sites: self.participants.keys().cloned().collect(),
            rounds: self.cfg.rounds,
        }));
        if self.round > self.cfg.rounds {
            return self.evaluate_final(now);
        }
        self.begin_attempt(now, self.round, 1);
    }

    /// Before each attempt: the operator's stop, then re-announcement to reconnected
    /// participants, then the attempt.
    fn begin_attempt(&mut self, now: u64, round: u32, attempt: u32) {
        if self.stop_requested && round <= self.cfg.rounds {
            return self.fail(StudyFailure::Stopped {
                round: round.saturating_sub(1),
            });
        }
        self.announce(now, AnnounceFor::Attempt { round, attempt });
    }

    fn start_attempt(&mut self, now: u64, round: u32, attempt: u32) {
        if round == STATISTICS_ROUND {
            return self.start_feature_statistics(now, attempt);
        }
        if round > self.cfg.rounds {
            return self.start_final_secure(now);
        }
        if self.participants.len() < self.cfg.min_sites {
            // Sites left the study: no attempt can reach the quorum.
            return self.fail(StudyFailure::NoQuorum {
                got: self.participants.len(),
                need: self.cfg.min_sites,
                detail: "sites left the study (they refused it on reconnecting)".into(),
            });
        }
        let (invited, deadline_ms) = self.select(round);
        let invited = if self.cfg.secure_aggregation.enabled {
            self.parties_for(round, invited)
        } else {
            invited
        };
        let Some(model) = self.model.clone() else {
            return self.fail(StudyFailure::Failed("no model to train".into()));
        };
        let mut params = self.cfg.training.params();
        params.seed = params.seed.wrapping_add(u64::from(round));
        if self.cfg.secure_aggregation.enabled {
            let width = model.weights.len();
            let (cfg, study) = (&self.cfg, self.cfg.id.clone());
            let dimension = match &cfg.privacy {
                // DP-FedAvg: each site's clipped delta plus its share of the noise.
                Some(_) => width,
                None => update_vector::dimension(cfg.kind(), width),
            };
            let private = cfg.privacy.is_some();
            let (sa_clip, sa_bits) = (
                cfg.secure_aggregation.clip,
                cfg.secure_aggregation.scale_bits,
            );
            let timeout_ms = cfg.round_timeout_secs.saturating_mul(1000);
            let mut warn_coarse = None;
            let result = self.start_sum(
                now,
                round,
                attempt,
                invited.iter().cloned().collect(),
                dimension,
                |n, scale| {
                    let quant = if private {
                        QuantParams::for_parties(n, sa_clip, sa_bits)
                    } else {
                        // The vector carries counts scaled by 1/S: a finer fixed point where
                        // S is large keeps them exact.
                        QuantParams::for_scaled_counts(n, sa_clip, sa_bits, 1.0 / scale).map(
                            |(quant, exact)| {
                                if !exact {
                                    warn_coarse = Some((1.0 / scale, quant.scale_bits));
                                }
                                quant
                            },
                        )
                    }
                    .map_err(|e| e.to_string())?;
                    Ok((
                        quant,
                        training_binding(&study, round, scale, &model, &params),
                    ))
                },
                |secure| {
                    Message::RoundOpen(RoundOpen {
                        study_id: study.clone(),
                        round,
                        model: model.clone(),
                        params: params.clone(),
                        deadline_ms: timeout_ms,
                        secure: Some(secure),
                    })
                },
            );
            if let Some((rows, bits)) = warn_coarse {
                self.out.note(format!(
                    "round {round}: evaluation counts may decode a few off: the sites' {rows} \
                     rows need a finer fixed point than 64 bits allow with secure_aggregation.clip \
                     ({bits} bits); lower the clip"
                ));
            }
            match result {
                Ok(sum) => {
                    self.phase = Phase::Secure {
                        round,
                        attempt,
                        invited,
                        sum: Box::new(sum),
                    }
                }
                Err(e) => self.attempt_failed(now, round, attempt, e, None),
            }
        } else {
            let msg = Message::RoundOpen(RoundOpen {
                study_id: self.cfg.id.clone(),
                round,
                model: model.clone(),
                params,
                deadline_ms,
                secure: None,
            });
            let mut waiting = BTreeMap::new();
            for site in invited.iter().filter(|s| self.connected.contains_key(*s)) {
                let id = self.out.request(site, msg.clone(), deadline_ms);
                waiting.insert(id, site.clone());
            }
            let kind = self.cfg.kind();
            self.phase = Phase::Plain(Box::new(PlainRound {
                round,
                attempt,
                invited,
                waiting,
                started: now,
                updates: BTreeMap::new(),
                latencies: BTreeMap::new(),
                evaluation: Evaluation::empty(kind),
                model,
            }));
            self.settle_plain(now);
        }
    }

    /// Starts a secure aggregation among the connected ones of `sites`: `params` gives the
    /// fixed point and the setup's binding for `n` parties and scale `1/S`.
    #[allow(clippy::too_many_arguments)]
    fn start_sum(
        &mut self,
        now: u64,
        round: u32,
        attempt: u32,
        sites: Vec<String>,
        dimension: usize,
        params: impl FnOnce(usize, f64) -> Result<(QuantParams, [u8; 32]), String>,
        open: impl Fn(crate::messages::SecureRound) -> Message,
    ) -> Result<SecureSum, String> {
        let connected: Vec<(String, Vec<u8>, u64)> = sites
            .iter()
            .filter_map(|site| {
                let c = self.connected.get(site)?;
                let rows = self.participants.get(site).map_or(1, |p| p.training_rows);
                Some((site.clone(), c.certificate.clone(), rows))
            })
            .collect();
        let need = self.cfg.min_sites.max(2);
        if connected.len() < need {
            return Err(format!(
                "{} of the {need} sites needed are connected",
                connected.len()
            ));
        }
        let certificates: Vec<(String, Vec<u8>)> = connected
            .iter()
            .map(|(s, der, _)| (s.clone(), der.clone()))
            .collect();
        let verifier = self.verifiers.verifier(&certificates)?;
        let rows: u64 = connected.iter().map(|(_, _, r)| (*r).max(1)).sum();
        let scale = 1.0 / rows as f64;
        let names: Vec<String> = connected.iter().map(|(s, ..)| s.clone()).collect();
        let (quant, binding) = params(names.len(), scale)?;
        let setup = secure::setup_for(
            &self.cfg,
            format!("{}/{round}/{attempt}", self.cfg.id),
            names,
            dimension,
            quant,
            binding,
        )?;
        self.last_threshold = Some(setup.threshold);
        self.out.note_round(
            round,
            false,
            format!(
                "secure aggregation starts ({} parties, {} neighbours, threshold {})",
                setup.parties.len(),
                setup.neighbours,
                setup.threshold
            ),
        );
        SecureSum::start(
            &mut self.out,
            now,
            &self.cfg.id,
            round,
            setup,
            certificates.into_iter().map(|(_, der)| der).collect(),
            self.cfg.secure_aggregation.tolerated_colluders,
            scale,
            verifier,
            self.cfg.round_timeout_secs.saturating_mul(1000),
            open,
        )
    }

    /// The sites a round invites, and its deadline (ms), by `[study.scheduling]`.
    /// The parties of a secure attempt of `round`: `chosen`, unless an earlier attempt
    /// reached its unmasking; then its survivors (the only set they would join again with).
    fn parties_for(&mut self, round: u32, chosen: BTreeSet<String>) -> BTreeSet<String> {
        match self.revealed_with.get(&round) {
            Some(s) if *s != chosen => {
                self.out.info(format!(
                    "study '{}' round {round}: inviting the {} sites an earlier attempt asked to unmask ({}): they may have revealed, and join again only with the same set",
                    self.cfg.id,
                    s.len(),
                    s.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
                s.clone()
            }
            _ => chosen,
        }
    }

    fn select(&mut self, round: u32) -> (BTreeSet<String>, u64) {
        let cfg = &self.cfg;
        let full = cfg.round_timeout_secs.saturating_mul(1000);
        let everyone = || self.participants.keys().cloned().collect::<BTreeSet<_>>();
        let (invited, deadline) = match cfg.scheduling.selection {
            Selection::All => (everyone(), full),
            Selection::Sample => {
                let n = ((self.participants.len() as f64 * cfg.scheduling.sample_fraction).ceil()
                    as usize)
                    .max(cfg.min_sites)
                    .min(self.participants.len());
                let chosen = self.participants.keys().cloned().sample(&mut self.rng, n);
                (chosen.into_iter().collect(), full)
            }
            Selection::Latency => {
                for (site, p) in &self.participants {
                    self.scheduler.entry(site.clone()).or_insert_with(|| {
                        SiteStats::new(site.clone(), p.training_rows.max(1), 1000.0)
                    });
                }
                let candidates: Vec<SiteStats> = self
                    .participants
                    .keys()
                    .filter_map(|s| self.scheduler.get(s).cloned())
                    .collect();
                let req = Requirements {
                    quorum: cfg.min_sites,
                    min_coverage: cfg.scheduling.min_coverage,
                    confidence_z: z_of(cfg.scheduling.confidence),
                    max_deadline_ms: full as f64,
                };
                match plan(&candidates, &req) {
                    Some(p) => (
                        p.participants
                            .iter()
                            .map(|&i| candidates[i].name.clone())
                            .collect(),
                        // Margin for the messages' own time, and at least a second so that
                        // one pause of a fast site does not cost it the round; never beyond
                        // the configured deadline.
                        ((p.deadline_ms * 1.5 + 200.0) as u64).max(1000).min(full),
                    ),
                    None => (everyone(), full),
                }
            }
        };
        if invited.len() < self.participants.len() {
            let left: Vec<&str> = self
                .participants
                .keys()
                .filter(|k| !invited.contains(*k))
                .map(String::as_str)
                .collect();
            self.out.note_round(
                round,
                false,
                format!(
                    "scheduler: invited {} of {} sites (left out: {}), deadline {deadline} ms",
                    invited.len(),
                    self.participants.len(),
                    left.join(", ")
                ),
            );
        }
        (invited, deadline)
    }

    fn settle_plain(&mut self, now: u64) {
        let Phase::Plain(p) = &self.phase else {
            return;
        };
        if !p.waiting.is_empty() {
            return;
        }
        let Phase::Plain(p) = std::mem::replace(&mut self.phase, Phase::Ended) else {
            return;
        };
        let PlainRound {
            round,
            attempt,
            invited,
            updates,
            latencies,
            evaluation,
            model,
            ..
        } = *p;
        if updates.is_empty() {
            let why = format!("none of the {} sites invited sent an update", invited.len());
            return self.attempt_failed(now, round, attempt, why, Some((0, &invited)));
        }
        let rows: u64 = updates
            .values()
            .fold(0u64, |a, u| a.saturating_add(u.num_samples));
        let sites: Vec<String> = updates.keys().cloned().collect();
        let aggregate = if let Some(p) = &self.cfg.privacy {
            // Each site clipped its delta and added all of the noise itself.
            let deltas: Vec<Vec<f64>> = updates
                .values()
                .map(|u| {
                    u.weights
                        .iter()
                        .zip(&model.weights)
                        .map(|(w, g)| w - g)
                        .collect()
                })
                .collect();
            RoundAggregate {
                sites,
                weights: dp_average(&model.weights, deltas, &p.training()),
                train_loss: f64::NAN,
                rows,
                evaluation: Evaluation::empty(self.cfg.kind()),
                latencies,
            }
        } else {
            // Weighted by the rows each site declared (none is 0: checked on arrival).
            let Some(weights) = federated_average(
                updates
                    .values()
                    .map(|u| (u.weights.as_slice(), u.num_samples)),
            ) else {
                let why = "the updates' rows sum to zero".to_string();
                return self.attempt_failed(now, round, attempt, why, Some((0, &invited)));
            };
            let train_loss = updates
                .values()
                .map(|u| u.train_loss * u.num_samples as f64)
                .sum::<f64>()
                / rows as f64;
            RoundAggregate {
                sites,
                weights,
                train_loss,
                rows,
                evaluation,
                latencies,
            }
        };
        self.round_aggregated(now, round, attempt, &invited, aggregate);
    }

    fn settle_secure(&mut self, now: u64) {
        let Phase::Secure { sum, .. } = &self.phase else {
            return;
        };
        let Some(outcome) = sum.outcome() else {
            return;
        };
        let inconsistent = sum.inconsistent();
        let Phase::Secure {
            round,
            attempt,
            invited,
            sum,
        } = std::mem::replace(&mut self.phase, Phase::Ended)
        else {
            return;
        };
        if !inconsistent.is_empty() {
            self.out.note(format!(
                "round {round}: secure aggregation: shares inconsistent with the rebuilt secrets (the holder revealed a wrong share, or the owner dealt one): {}",
                inconsistent.join(", ")
            ));
        }
        let secure = match outcome {
            Ok(s) => s,
            Err(e) => {
                if round > self.cfg.rounds {
                    self.out
                        .note(format!("the final model's secure evaluation failed: {e}"));
                    return self.finish(Evaluation::empty(self.cfg.kind()));
                }
                if let Some(s) = &sum.unmasking {
                    self.revealed_with
                        .insert(round, s.iter().cloned().collect());
                }
                return self.attempt_failed(now, round, attempt, e, None);
            }
        };
        self.out.push(Command::Event(StudyEvent::Aggregated {
            round,
            attempt,
            sites: secure.sites.clone(),
        }));
        let Some(model) = self.model.clone() else {
            return self.fail(StudyFailure::Failed("no model".into()));
        };
        let ms = now.saturating_sub(sum.started) as f64;
        let latencies: BTreeMap<String, f64> =
            secure.sites.iter().map(|s| (s.clone(), ms)).collect();
        let aggregate = if self.cfg.privacy.is_some() {
            // The sum of the contributors' noisy clipped deltas: their average moves the
            // model. Row counts are public (declared on acceptance); nothing else is known.
            let m = secure.sites.len().max(1) as f64;
            let weights: Vec<f64> = model
                .weights
                .iter()
                .zip(&secure.sum)
                .map(|(g, s)| g + s / m)
                .collect();
            if weights.iter().any(|w| !w.is_finite()) {
                return self.attempt_failed(
                    now,
                    round,
                    attempt,
                    "the decoded average is not finite".into(),
                    None,
                );
            }
            let rows = secure
                .sites
                .iter()
                .filter_map(|s| self.participants.get(s))
                .fold(0u64, |a, p| a.saturating_add(p.training_rows));
            RoundAggregate {
                sites: secure.sites,
                weights,
                train_loss: f64::NAN,
                rows,
                evaluation: Evaluation::empty(self.cfg.kind()),
                latencies,
            }
        } else {
            let decoded = match update_vector::decode(
                &secure.sum,
                self.cfg.kind(),
                model.weights.len(),
                sum.scale,
            ) {
                Ok(d) if d.weights.iter().all(|w| w.is_finite()) => d,
                Ok(_) => {
                    return self.attempt_failed(
                        now,
                        round,
                        attempt,
                        "the decoded average is not finite".into(),
                        None,
                    );
                }
                Err(e) => return self.attempt_failed(now, round, attempt, e, None),
            };
            RoundAggregate {
                sites: secure.sites,
                weights: decoded.weights,
                train_loss: decoded.train_loss,
                rows: decoded.rows,
                evaluation: decoded.evaluation,
                latencies,
            }
        };
        if round > self.cfg.rounds {
            // The final evaluation: the update is discarded.
            return self.finish(aggregate.evaluation);
        }
        self.round_aggregated(now, round, attempt, &invited, aggregate);
    }

    /// An attempt of `round` failed; `counted` is how many sites contributed when the round
    /// got as far as counting them (and the sites invited).
    fn attempt_failed(
        &mut self,
        now: u64,
        round: u32,
        attempt: u32,
        why: String,
        counted: Option<(usize, &BTreeSet<String>)>,
    ) {
        if round > self.cfg.rounds {
            self.out
                .note(format!("the final model's evaluation failed: {why}"));
            return self.finish(Evaluation::empty(self.cfg.kind()));
        }
        // What the scheduler learns from a failed attempt: nothing (as before).
        let why_attempt = format!("{why} (attempt {attempt} of {})", self.cfg.round_attempts);
        self.out.note(format!(
            "study '{}' round {round} failed: {why_attempt}",
            self.cfg.id
        ));
        self.out.push(Command::Event(StudyEvent::RoundFailed {
            round,
            reason: why_attempt,
        }));
        if attempt >= self.cfg.round_attempts {
            let failure = match counted {
                Some((got, _)) => StudyFailure::NoQuorum {
                    got,
                    need: self.cfg.min_sites,
                    detail: format!("round {round}, {attempt} attempt(s); the last: {why}"),
                },
                None => StudyFailure::RoundFailed {
                    round,
                    attempts: attempt,
                    detail: why,
                },
            };
            return self.fail(failure);
        }
        self.phase = Phase::Pause {
            until: now.saturating_add(RETRY_PAUSE_MS),
            round,
            attempt: attempt + 1,
        };
    }

    fn round_aggregated(
        &mut self,
        now: u64,
        round: u32,
        attempt: u32,
        invited: &BTreeSet<String>,
        aggregate: RoundAggregate,
    ) {
        if aggregate.sites.len() < self.cfg.min_sites {
            let why = format!(
                "{} of the {} sites needed contributed",
                aggregate.sites.len(),
                self.cfg.min_sites
            );
            let n = aggregate.sites.len();
            return self.attempt_failed(now, round, attempt, why, Some((n, invited)));
        }
        // What the scheduler learns: who answered, and how fast.
        for site in invited {
            if let Some(s) = self.scheduler.get_mut(site) {
                s.observe(aggregate.latencies.get(site).copied());
            }
        }
        for site in &aggregate.sites {
            *self.contributed.entry(site.clone()).or_default() += 1;
        }
        // The round's evaluation is of the incoming model: the previous round's.
        if let Some(p) = self.pending.take() {
            let metrics = (aggregate.evaluation.rows() > 0).then(|| aggregate.evaluation.metrics());
            self.release(p, metrics, None, Vec::new(), false);
        }
        let Some(model) = self.model.as_mut() else {
            return self.fail(StudyFailure::Failed("no model".into()));
        };
        model.weights = self.cfg.server_optimizer.step(
            &mut self.server_state,
            &model.weights,
            &aggregate.weights,
        );
        let model = model.clone();
        self.out.note_round(
            round,
            false,
            format!(
                "round aggregated ({} sites, train loss {})",
                aggregate.sites.len(),
                aggregate.train_loss
            ),
        );
        let result = Message::RoundResult(RoundResult {
            study_id: self.cfg.id.clone(),
            round,
            participants: aggregate.sites.clone(),
            train_loss: aggregate.train_loss,
            study_complete: round == self.cfg.rounds,
        });
        for site in &aggregate.sites {
            if self.connected.contains_key(site) {
                self.out.push(Command::Notify {
                    site: site.clone(),
                    message: result.clone(),
                });
            }
        }
        if self.cfg.secure_aggregation.enabled {
            // (Secure rounds said so when decoded.)
        } else {
            self.out.push(Command::Event(StudyEvent::Aggregated {
                round,
                attempt,
                sites: aggregate.sites.clone(),
            }));
        }
        self.pending = Some(Pending {
            round,
            sites: aggregate.sites,
            training_rows: aggregate.rows,
            train_loss: aggregate.train_loss,
            model,
        });
        self.checkpoint(round, None);
        if self.ending.is_some() {
            return;
        }
        self.round = round + 1;
        if self.round > self.cfg.rounds {
            self.evaluate_final(now);
        } else {
            self.begin_attempt(now, self.round, 1);
        }
    }

    fn checkpoint(&mut self, round: u32, complete: Option<Option<Metrics>>) {
        let Some(model) = self.model.clone() else {
            return;
        };
        self.out.push(Command::Checkpoint(StudyCheckpoint {
            config_sha256: config_hash(&self.cfg),
            round,
            model,
            server_state: self.server_state.clone(),
            pending: self.pending.as_ref().map(|p| PendingRound {
                round: p.round,
                sites: p.sites.clone(),
                training_rows: p.training_rows,
                train_loss: Some(p.train_loss).filter(|l| l.is_finite()),
            }),
            complete: complete.map(|m| (self.final_model.clone(), m)),
            scheduler: self.scheduler.values().cloned().collect(),
        }));
    }

    // ---- the end ---------------------------------------------------------------------

    /// Evaluates the last model (not under differential privacy: the sites' evaluations
    /// would be a release outside the budget). Under secure aggregation the sites'
    /// evaluations are only seen summed: one more secure round from the final model, whose
    /// summed evaluation is kept and whose update is discarded.
    fn evaluate_final(&mut self, now: u64) {
        if self.cfg.privacy.is_some() {
            return self.finish(Evaluation::empty(self.cfg.kind()));
        }
        if self.cfg.secure_aggregation.enabled {
            return self.announce(
                now,
                AnnounceFor::Attempt {
                    round: self.cfg.rounds + 1,
                    attempt: 1,
                },
            );
        }
        let Some(model) = self.model.clone() else {
            return self.finish(Evaluation::empty(self.cfg.kind()));
        };
        let msg = Message::EvaluateRequest(EvaluateRequest {
            study_id: self.cfg.id.clone(),
            round: self.cfg.rounds,
            model,
        });
        let timeout = self.cfg.round_timeout_secs.saturating_mul(1000);
        let mut waiting = BTreeMap::new();
        let sites: Vec<String> = self
            .participants
            .keys()
            .filter(|s| self.connected.contains_key(*s))
            .cloned()
            .collect();
        for site in sites {
            let id = self.out.request(&site, msg.clone(), timeout);
            waiting.insert(id, site);
        }
        if waiting.is_empty() {
            return self.finish(Evaluation::empty(self.cfg.kind()));
        }
        self.phase = Phase::Evaluating {
            waiting,
            total: Evaluation::empty(self.cfg.kind()),
        };
    }

    /// The final secure evaluation round (`rounds + 1`), after its re-announcement.
    fn start_final_secure(&mut self, now: u64) {
        let round = self.cfg.rounds + 1;
        let Some(model) = self.model.clone() else {
            return self.finish(Evaluation::empty(self.cfg.kind()));
        };
        let mut params = self.cfg.training.params();
        params.seed = params.seed.wrapping_add(u64::from(round));
        let width = model.weights.len();
        let study = self.cfg.id.clone();
        let kind = self.cfg.kind();
        let (clip, bits) = (
            self.cfg.secure_aggregation.clip,
            self.cfg.secure_aggregation.scale_bits,
        );
        let timeout_ms = self.cfg.round_timeout_secs.saturating_mul(1000);
        let invited: BTreeSet<String> = self.participants.keys().cloned().collect();
        let result = self.start_sum(
            now,
            round,
            1,
            invited.iter().cloned().collect(),
            update_vector::dimension(kind, width),
            |n, scale| {
                let quant = QuantParams::for_scaled_counts(n, clip, bits, 1.0 / scale)
                    .map(|(q, _)| q)
                    .map_err(|e| e.to_string())?;
                Ok((
                    quant,
                    training_binding(&study, round, scale, &model, &params),
                ))
            },
            |secure| {
                Message::RoundOpen(RoundOpen {
                    study_id: study.clone(),
                    round,
                    model: model.clone(),
                    params: params.clone(),
                    deadline_ms: timeout_ms,
                    secure: Some(secure),
                })
            },
        );
        match result {
            Ok(sum) => {
                self.phase = Phase::Secure {
                    round,
                    attempt: 1,
                    invited,
                    sum: Box::new(sum),
                }
            }
            Err(e) => {
                self.out
                    .note(format!("the final model's secure evaluation failed: {e}"));
                self.finish(Evaluation::empty(self.cfg.kind()));
            }
        }
    }

    fn finish(&mut self, evaluation: Evaluation) {
        let metrics = (evaluation.rows() > 0).then(|| evaluation.metrics());
        let Some(last) = self.pending.take() else {
            return self.fail(StudyFailure::Failed("no round completed".into()));
        };
        let missing = self.missing_sites();
        for m in &missing {
            self.out.note(format!(
                "study '{}': the model is without site '{}': {}",
                self.cfg.id, m.site, m.reason
            ));
        }
        self.release(last, metrics.clone(), None, missing.clone(), true);
        self.checkpoint(self.cfg.rounds, Some(metrics.clone()));
        self.phase = Phase::Ended;
        if self.ending.is_none() {
            self.ending = Some(Ending::Completed(Completed {
                rounds: self.cfg.rounds,
                validation: metrics,
                missing,
                final_model: self.final_model.clone(),
            }));
        }
    }

    /// Ends the study with `cause`. What was released stays released: the last model is
    /// exported as the study's result, with why it stopped, so that nobody takes it for a
    /// finished study's.
    fn fail(&mut self, cause: StudyFailure) {
        self.abort_phase();
        let ending = match self.pending.take() {
            Some(last) if !matches!(cause, StudyFailure::Unlogged(_)) => {
                let round = last.round;
                let missing = self.missing_sites();
                self.release(
                    last,
                    None,
                    Some(cause.describe(&self.cfg.id)),
                    missing,
                    true,
                );
                StudyFailure::EndedEarly {
                    cause: Box::new(cause),
                    round,
                }
            }
            _ => cause,
        };
        if self.ending.is_none() {
            self.ending = Some(Ending::Failed(ending));
        }
    }

    /// The released model's provenance after `round`: the approval hash, the secure
    /// aggregation it ran under, and what its rounds cost under differential privacy (ε at
    /// δ = 10⁻⁶, the sites' default).
    fn provenance(&self, round: u32) -> crate::export::Provenance {
        let privacy = self.cfg.privacy.as_ref().map(|p| {
            let dp = p.training();
            let mut acc = crate::dp::accountant::RdpAccountant::default();
            match dp.sgd {
                Some(s) => acc.compose_gaussian(
                    s.sampling_rate,
                    dp.noise_multiplier,
                    u64::from(round) * u64::from(s.steps),
                ),
                None => acc.compose_gaussian(1.0, dp.noise_multiplier, u64::from(round)),
            }
            let delta = 1e-6;
            crate::export::PrivacyCost {
                mechanism: if dp.sgd.is_some() {
                    "dp-sgd"
                } else {
                    "dp-fedavg"
                }
                .into(),
                clip_norm: dp.clip_norm,
                noise_multiplier: dp.noise_multiplier,
                rounds: round,
                epsilon: acc.epsilon(delta).0,
                delta,
            }
        });
        crate::export::Provenance {
            study_sha256: self.cfg.announcement().approval_hash(),
            secure_aggregation: self.cfg.secure_aggregation.enabled.then_some(
                crate::export::SecureAggregationUsed {
                    threshold: self.last_threshold,
                    tolerated_colluders: self.cfg.secure_aggregation.tolerated_colluders,
                },
            ),
            privacy,
        }
    }

    fn release(
        &mut self,
        p: Pending,
        validation: Option<Metrics>,
        stopped: Option<String>,
        missing_sites: Vec<MissingSite>,
        final_copy: bool,
    ) {
        let model = ExportedModel {
            format: MODEL_FORMAT.to_string(),
            study_id: self.cfg.id.clone(),
            round: p.round,
            target: self.cfg.target.clone(),
            positive_class: self.cfg.positive_class.clone(),
            classes: self.cfg.classes.clone(),
            model: p.model,
            sites: p.sites,
            training_rows: p.training_rows,
            train_loss: p.train_loss,
            validation,
            missing_sites,
            stopped,
            created_unix: 0,
            provenance: Some(self.provenance(p.round)),
            trees: None,
        };
        self.out.push(Command::Release {
            model: Box::new(model),
            final_copy,
        });
    }

    /// The allowed sites whose data is in no round of the model, or that left the study
    /// before its end, and why.
    fn missing_sites(&self) -> Vec<MissingSite> {
        self.allow
            .iter()
            .filter_map(|site| {
                let rounds = self.contributed.get(site).copied().unwrap_or(0);
                let reason = match (rounds, self.participants.contains_key(site)) {
                    (0, false) => self
                        .absent
                        .get(site)
                        .cloned()
                        .unwrap_or_else(|| "left the study before its first round".into()),
                    (0, true) => "accepted the study, but its update is in no round (too slow \
                                  for the rounds' deadlines, or it dropped out of each)"
                        .into(),
                    (k, false) => format!("left the study after its update was in {k} round(s)"),
                    (k, true)
                        if !self.connected.contains_key(site)
                            && !self
                                .pending
                                .as_ref()
                                .is_some_and(|p| p.sites.contains(site)) =>
                    {
                        format!(
                            "disconnected after its update was in {k} round(s), and is not in the last"
                        )
                    }
                    (_, true) => return None,
                };
                Some(MissingSite {
                    site: site.clone(),
                    reason,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
