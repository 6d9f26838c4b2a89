//! Running one study: announce it, standardize from combined statistics, run the rounds
//! (FedAvg over the updates that arrive before the deadline, given a quorum), evaluate the
//! final model, and export each round's model.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use medfed_infra::transport::{self, TransportError};
use medfed_protocol::Message;
use medfed_protocol::export::{ExportedModel, MODEL_FORMAT, MissingSite};
use medfed_protocol::messages::{
    EvaluateRequest, ModelUpdate, RoundOpen, RoundResult, StudyAnnouncement, StudyDecision,
};
use medfed_protocol::metrics::{Evaluation, Metrics};
use medfed_protocol::model::{GlobalModel, federated_average};
use medfed_protocol::stats::FeatureStats;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::{Selection, StudyConfig};
use crate::server::Registry;
use crate::{AggregatorEvent, RoundSummary};
use medfed_protocol::schedule::{Requirements, SiteStats, plan};

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("study '{study}': only {got} of the {need} sites needed took part ({detail})")]
    NoQuorum {
        study: String,
        got: usize,
        need: usize,
        detail: String,
    },
    #[error("study '{study}': round {round} failed {attempts} time(s), the last because {detail}")]
    RoundFailed {
        study: String,
        round: u32,
        attempts: u32,
        detail: String,
    },
    #[error("study '{study}': {detail}")]
    Failed { study: String, detail: String },
    /// The study stopped after releasing some rounds: the last released model is exported,
    /// marked as stopped.
    #[error("{cause}; the last released model (round {round}) is {}, marked as stopped early", final_model.display())]
    EndedEarly {
        cause: Box<StudyError>,
        round: u32,
        final_model: PathBuf,
    },
    #[error("study '{study}' was stopped by the operator after round {round}")]
    Stopped { study: String, round: u32 },
    #[error("study '{study}': writing {path}: {source}")]
    Export {
        study: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The compliance log could not record a step, so the step was not taken.
    #[error("study '{study}': the compliance log cannot be written ({detail}), so the study stops")]
    Unlogged { study: String, detail: String },
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
    pub study_id: String,
    pub final_model: PathBuf,
    pub validation: Option<Metrics>,
    pub rounds: u32,
    /// Allowed sites whose data is in no round of the model, and why.
    pub missing: Vec<MissingSite>,
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
}

/// The z of a one-sided normal confidence (0.9 → 1.28, 0.95 → 1.645, 0.99 → 2.33).
fn z_of(confidence: f64) -> f64 {
    // Acklam's rational approximation is overkill here: interpolate a few table values.
    let table = [
        (0.5, 0.0),
        (0.8, 0.842),
        (0.9, 1.282),
        (0.95, 1.645),
        (0.975, 1.960),
        (0.99, 2.326),
        (0.999, 3.090),
    ];
    for w in table.windows(2) {
        let ((c0, z0), (c1, z1)) = (w[0], w[1]);
        if confidence <= c1 {
            return z0 + (z1 - z0) * (confidence - c0) / (c1 - c0);
        }
    }
    3.090
}

/// A participant's standing in the study.
#[derive(Clone)]
pub(crate) struct Participant {
    pub training_rows: u64,
    /// The connection the study was announced on; a reconnected site is announced again.
    announced_on: usize,
}

impl Participant {
    /// A site asked a statistics query (no training rows are declared).
    pub(crate) fn for_query(conn_id: usize) -> Participant {
        Participant {
            training_rows: 1,
            announced_on: conn_id,
        }
    }
}

/// What one round produced, however it was aggregated.
pub(crate) struct RoundAggregate {
    /// Sites whose updates are in the average.
    pub sites: Vec<String>,
    pub weights: Vec<f64>,
    pub train_loss: f64,
    pub rows: u64,
    /// The merged evaluation of the round's incoming model.
    pub evaluation: Evaluation,
    /// How long each contributing site took to answer, ms.
    pub latencies: BTreeMap<String, f64>,
}

/// A round's model waiting for its validation figures (they arrive in the next round).
struct Pending {
    summary: RoundSummary,
    model: GlobalModel,
}

impl StudyRunner {
    fn emit(&self, e: AggregatorEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(e);
        }
    }

    fn announcement(&self) -> StudyAnnouncement {
        self.cfg.announcement()
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

    /// Announces the study to `sites` all at once, each answer awaited for at most the
    /// study's `decision_timeout_secs`: a silent site costs that once, not a round timeout
    /// per site. The answers in site order.
    async fn announce_all(
        &self,
        sites: impl IntoIterator<Item = String>,
    ) -> Vec<(String, Result<(usize, StudyDecision), TransportError>)> {
        let msg = Arc::new(Message::StudyAnnouncement(self.announcement()));
        let timeout = Duration::from_secs(self.cfg.decision_timeout_secs);
        let mut tasks = JoinSet::new();
        for site in sites {
            let Some(connected) = self.registry.get(&site) else {
                continue;
            };
            let (msg, max, audit) = (msg.clone(), self.max_frame, self.audit.clone());
            tasks.spawn(async move {
                let conn = connected.conn;
                let answer =
                    transport::request_logged(&conn, &msg, max, timeout, Some((&*audit, &site)))
                        .await
                        .and_then(|m| match m {
                            Message::StudyDecision(d) => Ok((conn.stable_id(), d)),
                            other => Err(TransportError::Peer {
                                code: medfed_protocol::ErrorCode::UnexpectedMessage,
                                reason: format!(
                                    "expected a study decision, got a {}",
                                    other.kind()
                                ),
                            }),
                        });
                (site, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(answer) = joined {
                answers.push(answer);
            }
        }
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        answers
    }

    pub async fn run(&self, allowed: usize) -> Result<StudyOutcome, StudyError> {
        let cfg = &self.cfg;
        let resume = crate::checkpoint::load(&*self.store, cfg).map_err(|e| self.failed(e))?;
        if let Some(cp) = &resume
            && let Some((final_model, validation)) = &cp.complete
        {
            info!(study = %cfg.id, "study already complete (checkpoint); not run again");
            return Ok(StudyOutcome {
                study_id: cfg.id.clone(),
                final_model: final_model.clone(),
                validation: *validation,
                rounds: cfg.rounds,
                missing: Vec::new(),
            });
        }
        self.wait_for_sites(allowed).await?;
        let d = cfg.features.len();

        // Announce; combine the accepting sites' feature statistics.
        let mut participants: BTreeMap<String, Participant> = BTreeMap::new();
        let mut stats = FeatureStats::empty(d);
        // The target classes each accepting site names (classification studies).
        let mut classes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // Why each allowed site is not in the study (it may still join on reconnecting).
        let mut absent: BTreeMap<String, String> = self
            .allow
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    "not connected when the study was announced".to_string(),
                )
            })
            .collect();
        for (site, answer) in self.announce_all(self.registry.names()).await {
            absent.insert(site.clone(), "no study decision".into());
            match answer {
                Ok((
                    conn_id,
                    StudyDecision::Accept {
                        study_id,
                        training_rows,
                        feature_stats,
                        target_classes,
                        ..
                    },
                )) if study_id == cfg.id => {
                    classes.insert(site.clone(), target_classes);
                    if !self.plausible_rows(training_rows) {
                        warn!(%site, training_rows, "accepted with an implausible number of training rows; site left out");
                        continue;
                    }
                    if !cfg.secure_aggregation.enabled && cfg.privacy.is_none() {
                        let Some(feature_stats) = feature_stats else {
                            warn!(%site, "accepted without feature statistics; site left out");
                            continue;
                        };
                        if training_rows != feature_stats.count {
                            warn!(%site, "inconsistent row counts in study decision; site left out");
                            continue;
                        }
                        if let Err(e) = stats.merge(&feature_stats) {
                            warn!(%site, "feature statistics refused: {e}; site left out");
                            continue;
                        }
                    }
                    absent.remove(&site);
                    info!(study = %cfg.id, %site, training_rows, "site accepted the study");
                    self.audit
                        .record(medfed_protocol::audit::Event::StudyDecision {
                            study: cfg.id.clone(),
                            accepted: true,
                            reason: if cfg.privacy.is_some() {
                                format!("site '{site}' accepted (no row count under DP)")
                            } else {
                                format!("site '{site}' accepted with {training_rows} training rows")
                            },
                        })
                        .map_err(|e| self.unlogged(e))?;
                    participants.insert(
                        site,
                        Participant {
                            training_rows,
                            announced_on: conn_id,
                        },
                    );
                }
                Ok((_, StudyDecision::Refuse { reason, .. })) => {
                    warn!(study = %cfg.id, %site, "site refused the study: {reason}");
                    absent.insert(site.clone(), format!("refused the study: {reason}"));
                    self.audit
                        .record(medfed_protocol::audit::Event::StudyDecision {
                            study: cfg.id.clone(),
                            accepted: false,
                            reason: format!("site '{site}' refused: {reason}"),
                        })
                        .map_err(|e| self.unlogged(e))?;
                    self.emit(AggregatorEvent::StudyRefused {
                        study_id: cfg.id.clone(),
                        site,
                        reason,
                    });
                }
                Ok(_) => warn!(%site, "study decision for another study; site left out"),
                Err(e) => {
                    warn!(study = %cfg.id, %site, "no study decision: {e}");
                    absent.insert(site.clone(), format!("no study decision: {e}"));
                }
            }
        }
        if participants.len() < cfg.min_sites {
            return Err(StudyError::NoQuorum {
                study: cfg.id.clone(),
                got: participants.len(),
                need: cfg.min_sites,
                detail: "too few sites accepted the study".into(),
            });
        }
        if cfg.model == medfed_protocol::model::ModelKind::Logistic {
            let named: BTreeMap<String, Vec<String>> = classes
                .into_iter()
                .filter(|(site, _)| participants.contains_key(site))
                .collect();
            check_target(&cfg.target, cfg.positive_class.as_deref(), &named)
                .map_err(|why| self.failed(why))?;
        }
        if resume.is_some() || cfg.privacy.is_some() {
            // Resuming: the checkpoint holds the model and its standardization. Under
            // differential privacy nothing about the data is released but the noisy model:
            // standardize from the declared feature ranges.
        } else if cfg.secure_aggregation.enabled {
            // The sites' statistics are only ever seen summed.
            let (secure, sites) = self
                .secure_statistics(&participants)
                .await
                .map_err(|e| self.failed(format!("feature statistics: {e}")))?;
            info!(study = %cfg.id, sites = sites.len(), rows = secure.count, "feature statistics summed securely");
            stats = secure;
        }
        let mut scheduler: BTreeMap<String, SiteStats> = participants
            .iter()
            .map(|(site, p)| {
                (
                    site.clone(),
                    SiteStats::new(site.clone(), p.training_rows.max(1), 1000.0),
                )
            })
            .collect();
        if let Some(cp) = &resume {
            for s in &cp.scheduler {
                if let Some(mine) = scheduler.get_mut(&s.name) {
                    *mine = s.clone();
                }
            }
        }
        let (mut model, mut server_state, first_round, mut pending) = match resume {
            Some(cp) => {
                info!(study = %cfg.id, round = cp.round, "resuming from the checkpoint after round {}", cp.round);
                let pending = cp.pending.map(|p| Pending {
                    summary: RoundSummary {
                        study_id: cfg.id.clone(),
                        round: p.round,
                        sites: p.sites,
                        training_rows: p.training_rows,
                        train_loss: p.train_loss.unwrap_or(f64::NAN),
                        validation: None,
                        model_path: PathBuf::new(),
                    },
                    model: cp.model.clone(),
                });
                (cp.model, cp.server_state, cp.round + 1, pending)
            }
            None => {
                let standardization = match &cfg.privacy {
                    Some(p) => p.standardization(),
                    None => stats
                        .standardization()
                        .map_err(|e| self.failed(e.to_string()))?,
                };
                let model = GlobalModel::zeros(cfg.model, cfg.features.clone(), standardization);
                (
                    model,
                    medfed_protocol::model::ServerState::default(),
                    1,
                    None,
                )
            }
        };
        self.emit(AggregatorEvent::StudyStarted {
            study_id: cfg.id.clone(),
            sites: participants.keys().cloned().collect(),
            rounds: cfg.rounds,
        });

        // Rounds each site's update is in (this run; a resumed study counts the pending
        // round's sites once).
        let mut contributed: BTreeMap<String, u32> = BTreeMap::new();
        for site in pending.iter().flat_map(|p| &p.summary.sites) {
            contributed.insert(site.clone(), 1);
        }
        // Every way the rounds end early (the operator, too few sites, a round that keeps
        // failing) comes out here, so that the last released model is exported first.
        let ended: Option<StudyError> = 'rounds: {
            for round in first_round..=cfg.rounds {
                if self.stop_file.exists() {
                    break 'rounds Some(StudyError::Stopped {
                        study: cfg.id.clone(),
                        round: round - 1,
                    });
                }
                let mut attempt = 0;
                let aggregate = loop {
                    attempt += 1;
                    self.reannounce(&mut participants).await;
                    if participants.len() < cfg.min_sites {
                        // Sites left the study: no attempt can reach the quorum.
                        break 'rounds Some(StudyError::NoQuorum {
                            study: cfg.id.clone(),
                            got: participants.len(),
                            need: cfg.min_sites,
                            detail: "sites left the study (they refused it on reconnecting)".into(),
                        });
                    }
                    let (invited, deadline) = self.select(round, &participants, &mut scheduler);
                    let result = if cfg.secure_aggregation.enabled {
                        self.secure_round(round, attempt, &model, &invited).await
                    } else {
                        self.plain_round(round, &model, &invited, deadline).await
                    };
                    if let Ok(a) = &result {
                        // What the scheduler learns: who answered, and how fast.
                        for site in invited.keys() {
                            if let Some(s) = scheduler.get_mut(site) {
                                s.observe(a.latencies.get(site).copied());
                            }
                        }
                    }
                    // How many sites contributed, when the round got as far as counting them.
                    let (why, contributed) = match result {
                        Ok(a) if a.sites.len() >= cfg.min_sites => break a,
                        Ok(a) => (
                            format!(
                                "{} of the {} sites needed contributed",
                                a.sites.len(),
                                cfg.min_sites
                            ),
                            Some(a.sites.len()),
                        ),
                        Err(why) => (why, None),
                    };
                    let why_attempt =
                        format!("{why} (attempt {attempt} of {})", cfg.round_attempts);
                    warn!(study = %cfg.id, round, "round failed: {why_attempt}");
                    self.emit(AggregatorEvent::RoundFailed {
                        study_id: cfg.id.clone(),
                        round,
                        reason: why_attempt.clone(),
                    });
                    if attempt >= cfg.round_attempts {
                        break 'rounds Some(match contributed {
                            Some(got) => StudyError::NoQuorum {
                                study: cfg.id.clone(),
                                got,
                                need: cfg.min_sites,
                                detail: format!(
                                    "round {round}, {attempt} attempt(s); the last: {why}"
                                ),
                            },
                            None => StudyError::RoundFailed {
                                study: cfg.id.clone(),
                                round,
                                attempts: attempt,
                                detail: why,
                            },
                        });
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                };
                // The round's evaluation is of the incoming model: the previous round's.
                if let Some(p) = pending.take() {
                    let metrics =
                        (aggregate.evaluation.rows() > 0).then(|| aggregate.evaluation.metrics());
                    self.complete(p, metrics)?;
                }
                let RoundAggregate {
                    sites,
                    weights,
                    train_loss,
                    rows,
                    ..
                } = aggregate;
                for site in &sites {
                    *contributed.entry(site.clone()).or_default() += 1;
                }
                model.weights =
                    cfg.server_optimizer
                        .step(&mut server_state, &model.weights, &weights);
                info!(study = %cfg.id, round, sites = sites.len(), train_loss, "round aggregated");
                self.broadcast_result(round, &sites, train_loss);
                pending = Some(Pending {
                    summary: RoundSummary {
                        study_id: cfg.id.clone(),
                        round,
                        sites,
                        training_rows: rows,
                        train_loss,
                        validation: None,
                        model_path: PathBuf::new(),
                    },
                    model: model.clone(),
                });
                let cp = crate::checkpoint::StudyCheckpoint {
                    config_sha256: crate::checkpoint::config_hash(cfg),
                    round,
                    model: model.clone(),
                    server_state: server_state.clone(),
                    pending: pending.as_ref().map(|p| crate::checkpoint::PendingRound {
                        round: p.summary.round,
                        sites: p.summary.sites.clone(),
                        training_rows: p.summary.training_rows,
                        train_loss: Some(p.summary.train_loss).filter(|l| l.is_finite()),
                    }),
                    complete: None,
                    scheduler: scheduler.values().cloned().collect(),
                };
                crate::checkpoint::save(&*self.store, &cfg.id, &cp)
                    .map_err(|e| self.failed(format!("checkpoint after round {round}: {e}")))?;
            }
            None
        };
        if let Some(cause) = ended {
            // What was released stays released: the last model is exported as the study's
            // result, with why it stopped, so that nobody takes it for a finished study.
            let Some(last) = pending.take() else {
                return Err(cause);
            };
            let round = last.summary.round;
            let missing = self.missing_sites(&absent, &contributed, &participants);
            let path = self.complete_with(last, None, Some(cause.to_string()), missing)?;
            let final_model = self.export_final(&path)?;
            warn!(study = %cfg.id, round, "study stopped early; its last released model is {}", final_model.display());
            return Err(StudyError::EndedEarly {
                cause: Box::new(cause),
                round,
                final_model,
            });
        }

        // Evaluate the last model (not under differential privacy: the sites' evaluations
        // would be a release outside the budget). Under secure aggregation the sites'
        // evaluations are only seen summed: one more secure round from the final model,
        // whose summed evaluation is kept and whose update is discarded.
        let evaluation = if cfg.privacy.is_some() {
            Evaluation::empty(cfg.model)
        } else if cfg.secure_aggregation.enabled {
            self.reannounce(&mut participants).await;
            match self
                .secure_round(cfg.rounds + 1, 1, &model, &participants)
                .await
            {
                Ok(a) => a.evaluation,
                Err(e) => {
                    warn!(study = %cfg.id, "the final model's secure evaluation failed: {e}");
                    Evaluation::empty(cfg.model)
                }
            }
        } else {
            self.collect_evaluation(cfg.rounds, &model, &participants)
                .await
        };
        let metrics = (evaluation.rows() > 0).then(|| evaluation.metrics());
        let last = pending.ok_or_else(|| self.failed("no round completed"))?;
        let missing = self.missing_sites(&absent, &contributed, &participants);
        for m in &missing {
            warn!(study = %cfg.id, site = %m.site, "the model is without this site: {}", m.reason);
        }
        let path = self.complete_with(last, metrics, None, missing.clone())?;
        let final_path = self.export_final(&path)?;
        let done = crate::checkpoint::StudyCheckpoint {
            config_sha256: crate::checkpoint::config_hash(cfg),
            round: cfg.rounds,
            model: model.clone(),
            server_state,
            pending: None,
            complete: Some((final_path.clone(), metrics)),
            scheduler: scheduler.values().cloned().collect(),
        };
        crate::checkpoint::save(&*self.store, &cfg.id, &done)
            .map_err(|e| self.failed(format!("checkpoint of the completed study: {e}")))?;
        Ok(StudyOutcome {
            study_id: cfg.id.clone(),
            final_model: final_path,
            validation: metrics,
            rounds: cfg.rounds,
            missing,
        })
    }

    /// The allowed sites whose data is in no round of the model, or that left the study
    /// before its end, and why.
    fn missing_sites(
        &self,
        absent: &BTreeMap<String, String>,
        contributed: &BTreeMap<String, u32>,
        participants: &BTreeMap<String, Participant>,
    ) -> Vec<MissingSite> {
        self.allow
            .iter()
            .filter_map(|site| {
                let rounds = contributed.get(site).copied().unwrap_or(0);
                let reason = match (rounds, participants.contains_key(site)) {
                    (0, false) => absent
                        .get(site)
                        .cloned()
                        .unwrap_or_else(|| "left the study before its first round".into()),
                    (0, true) => "accepted the study, but its update is in no round (too slow \
                                  for the rounds' deadlines, or it dropped out of each)"
                        .into(),
                    (k, false) => format!("left the study after its update was in {k} round(s)"),
                    (_, true) => return None,
                };
                Some(MissingSite {
                    site: site.clone(),
                    reason,
                })
            })
            .collect()
    }

    /// The sites a round invites, and its deadline, by `[study.scheduling]`.
    fn select(
        &self,
        round: u32,
        participants: &BTreeMap<String, Participant>,
        scheduler: &mut BTreeMap<String, SiteStats>,
    ) -> (BTreeMap<String, Participant>, Duration) {
        let cfg = &self.cfg;
        let full = Duration::from_secs(cfg.round_timeout_secs);
        let everyone = || {
            participants
                .iter()
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let (invited, deadline) = match cfg.scheduling.selection {
            Selection::All => (everyone(), full),
            Selection::Sample => {
                use rand::seq::IteratorRandom;
                let n = ((participants.len() as f64 * cfg.scheduling.sample_fraction).ceil()
                    as usize)
                    .max(cfg.min_sites)
                    .min(participants.len());
                let mut rng = rand::rng();
                let chosen = participants.keys().cloned().sample(&mut rng, n);
                (
                    participants
                        .iter()
                        .filter(|(k, _)| chosen.contains(k))
                        .map(|(k, p)| (k.clone(), p.clone()))
                        .collect(),
                    full,
                )
            }
            Selection::Latency => {
                for (site, p) in participants {
                    scheduler.entry(site.clone()).or_insert_with(|| {
                        SiteStats::new(site.clone(), p.training_rows.max(1), 1000.0)
                    });
                }
                let candidates: Vec<SiteStats> = participants
                    .keys()
                    .filter_map(|s| scheduler.get(s).cloned())
                    .collect();
                let req = Requirements {
                    quorum: cfg.min_sites,
                    min_coverage: cfg.scheduling.min_coverage,
                    confidence_z: z_of(cfg.scheduling.confidence),
                    max_deadline_ms: full.as_secs_f64() * 1000.0,
                };
                match plan(&candidates, &req) {
                    Some(p) => (
                        p.participants
                            .iter()
                            .filter_map(|&i| {
                                let name = &candidates[i].name;
                                participants.get(name).map(|x| (name.clone(), x.clone()))
                            })
                            .collect(),
                        // Margin for the messages' own time, and at least a second so that
                        // one pause of a fast site does not cost it the round; never beyond
                        // the configured deadline.
                        Duration::from_secs_f64((p.deadline_ms * 1.5 + 200.0) / 1000.0)
                            .max(Duration::from_secs(1))
                            .min(full),
                    ),
                    None => (everyone(), full),
                }
            }
        };
        if invited.len() < participants.len() {
            let left: Vec<&String> = participants
                .keys()
                .filter(|k| !invited.contains_key(*k))
                .collect();
            info!(study = %cfg.id, round, "scheduler: invited {} of {} sites (left out: {}), deadline {} ms",
                invited.len(), participants.len(),
                left.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                deadline.as_millis());
        }
        (invited, deadline)
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
        for site in sites {
            let Some(s) = self.registry.get(site) else {
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

    /// Whether a site's declared training rows are plausible: none under differential
    /// privacy (no count leaves a site), else between 1 and [`MAX_ROWS`].
    fn plausible_rows(&self, rows: u64) -> bool {
        if self.cfg.privacy.is_some() {
            rows == 0
        } else {
            (1..=MAX_ROWS).contains(&rows)
        }
    }

    /// Announces the study again to participants that reconnected since. One that now
    /// refuses it (its policy or data changed) leaves the study; one that accepts declares
    /// its rows again.
    async fn reannounce(&self, participants: &mut BTreeMap<String, Participant>) {
        let mut withdrawn = Vec::new();
        // The reconnected ones (a new connection), announced to all at once.
        let reconnected: Vec<String> = participants
            .iter()
            .filter(|(site, p)| {
                self.registry
                    .get(site)
                    .is_some_and(|c| c.conn.stable_id() != p.announced_on)
            })
            .map(|(site, _)| site.clone())
            .collect();
        if reconnected.is_empty() {
            return;
        }
        for (site, answer) in self.announce_all(reconnected).await {
            let Some(p) = participants.get_mut(&site) else {
                continue;
            };
            let site = &site;
            match answer {
                Ok((
                    conn_id,
                    StudyDecision::Accept {
                        study_id,
                        training_rows,
                        ..
                    },
                )) if study_id == self.cfg.id && self.plausible_rows(training_rows) => {
                    p.announced_on = conn_id;
                    p.training_rows = training_rows;
                }
                Ok((_, decision)) => {
                    let reason = match decision {
                        StudyDecision::Refuse { reason, .. } => reason,
                        StudyDecision::Accept { training_rows, .. } => format!(
                            "accepted another study, or with an implausible {training_rows} training rows"
                        ),
                    };
                    warn!(%site, "reconnected site refused the study, and leaves it: {reason}");
                    if let Err(e) =
                        self.audit
                            .record(medfed_protocol::audit::Event::StudyDecision {
                                study: self.cfg.id.clone(),
                                accepted: false,
                                reason: format!("site '{site}' refused on reconnecting: {reason}"),
                            })
                    {
                        // The site leaves the study either way; the round that follows
                        // writes to the log too, and stops the study if it still cannot.
                        tracing::error!("cannot write the compliance log: {e}");
                    }
                    withdrawn.push(site.clone());
                }
                Err(e) => warn!(%site, "reconnected site did not answer the announcement: {e}"),
            }
        }
        for site in withdrawn {
            participants.remove(&site);
        }
    }

    /// A round without secure aggregation: each node's update is seen by the aggregator.
    async fn plain_round(
        &self,
        round: u32,
        model: &GlobalModel,
        participants: &BTreeMap<String, Participant>,
        timeout: Duration,
    ) -> Result<RoundAggregate, String> {
        let cfg = &self.cfg;
        let mut params = cfg.training.params();
        params.seed = params.seed.wrapping_add(u64::from(round));
        let msg = Arc::new(Message::RoundOpen(RoundOpen {
            study_id: cfg.id.clone(),
            round,
            model: model.clone(),
            params,
            deadline_ms: timeout.as_millis() as u64,
            secure: None,
        }));
        let mut tasks = self.ask_all(msg, participants.keys(), timeout);
        let mut updates = BTreeMap::new();
        let mut latencies = BTreeMap::new();
        let mut evaluation = Evaluation::empty(cfg.model);
        while let Some(joined) = tasks.join_next().await {
            let Ok((site, result, ms)) = joined else {
                continue;
            };
            let update = match result {
                Ok(Message::ModelUpdate(u)) => u,
                Ok(other) => {
                    warn!(%site, round, "expected a model update, got a {}", other.kind());
                    continue;
                }
                Err(e) => {
                    warn!(%site, round, "no update: {e}");
                    continue;
                }
            };
            let declared = participants.get(&site).map_or(0, |p| p.training_rows);
            if let Err(why) = check_update(&update, &cfg.id, round, model.weights.len(), declared) {
                warn!(%site, round, "update refused: {why}");
                continue;
            }
            if let Err(e) = evaluation.merge(&update.evaluation) {
                warn!(%site, round, "update refused: evaluation: {e}");
                continue;
            }
            latencies.insert(site.clone(), ms);
            updates.insert(site, update);
        }
        let weights = federated_average(
            updates
                .values()
                .map(|u| (u.weights.as_slice(), u.num_samples)),
        )
        .ok_or_else(|| {
            format!(
                "{} of the {} sites needed sent an update",
                updates.len(),
                cfg.min_sites
            )
        })?;
        let rows: u64 = updates
            .values()
            .fold(0u64, |a, u| a.saturating_add(u.num_samples));
        if let Some(p) = &cfg.privacy {
            // Each site clipped its delta and added all of the noise itself.
            let dp = p.training();
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
            let weights = dp_average(&model.weights, deltas, &dp);
            return Ok(RoundAggregate {
                sites: updates.into_keys().collect(),
                weights,
                train_loss: f64::NAN,
                rows,
                evaluation: Evaluation::empty(cfg.model),
                latencies,
            });
        }
        let train_loss = updates
            .values()
            .map(|u| u.train_loss * u.num_samples as f64)
            .sum::<f64>()
            / rows as f64;
        Ok(RoundAggregate {
            sites: updates.into_keys().collect(),
            weights,
            train_loss,
            rows,
            evaluation,
            latencies,
        })
    }

    async fn collect_evaluation(
        &self,
        round: u32,
        model: &GlobalModel,
        participants: &BTreeMap<String, Participant>,
    ) -> Evaluation {
        let timeout = Duration::from_secs(self.cfg.round_timeout_secs);
        let msg = Arc::new(Message::EvaluateRequest(EvaluateRequest {
            study_id: self.cfg.id.clone(),
            round,
            model: model.clone(),
        }));
        let mut tasks = self.ask_all(msg, participants.keys(), timeout);
        let mut total = Evaluation::empty(self.cfg.model);
        while let Some(joined) = tasks.join_next().await {
            let Ok((site, result, _)) = joined else {
                continue;
            };
            match result {
                Ok(Message::EvaluationReport(r))
                    if r.study_id == self.cfg.id && r.round == round =>
                {
                    if let Err(e) = total.merge(&r.evaluation) {
                        warn!(%site, "evaluation refused: {e}");
                    }
                }
                Ok(other) => warn!(%site, "expected an evaluation report, got a {}", other.kind()),
                Err(e) => warn!(%site, "no evaluation: {e}"),
            }
        }
        total
    }

    fn broadcast_result(&self, round: u32, sites: &[String], train_loss: f64) {
        let msg = Message::RoundResult(RoundResult {
            study_id: self.cfg.id.clone(),
            round,
            participants: sites.to_vec(),
            train_loss,
            study_complete: round == self.cfg.rounds,
        });
        let Ok(frame) = medfed_protocol::codec::encode_frame(&msg, self.max_frame) else {
            return;
        };
        let info = transport::FrameInfo::of_frame(&frame);
        for site in sites {
            if let Some(s) = self.registry.get(site) {
                // Recorded before it leaves; not sent if it cannot be recorded.
                if let Err(e) = transport::Egress::sent(&*self.audit, site, &msg, &info) {
                    warn!(%site, round, "round result not sent: {e}");
                    continue;
                }
                let frame = frame.clone();
                // A node that stops reading cannot hold the task (or its buffer) forever.
                tokio::spawn(tokio::time::timeout(Duration::from_secs(10), async move {
                    if let Ok(mut send) = s.conn.open_uni().await {
                        let _ = send.write_all(&frame).await;
                        let _ = send.finish();
                    }
                }));
            }
        }
    }

    /// Writes a round's model with its validation figures and reports the round.
    fn complete(&self, p: Pending, validation: Option<Metrics>) -> Result<PathBuf, StudyError> {
        self.complete_with(p, validation, None, Vec::new())
    }

    /// Copies a round's model file to the study's `final.json`.
    fn export_final(&self, round_file: &std::path::Path) -> Result<PathBuf, StudyError> {
        let final_path = self
            .out_dir
            .join("models")
            .join(&self.cfg.id)
            .join("final.json");
        std::fs::copy(round_file, &final_path).map_err(|source| StudyError::Export {
            study: self.cfg.id.clone(),
            path: final_path.clone(),
            source,
        })?;
        Ok(final_path)
    }

    /// As [`StudyRunner::complete`]; `stopped` says why the study ended after this round
    /// when it was not its last.
    fn complete_with(
        &self,
        p: Pending,
        validation: Option<Metrics>,
        stopped: Option<String>,
        missing_sites: Vec<MissingSite>,
    ) -> Result<PathBuf, StudyError> {
        let Pending { mut summary, model } = p;
        let export = ExportedModel {
            format: MODEL_FORMAT.to_string(),
            study_id: summary.study_id.clone(),
            round: summary.round,
            target: self.cfg.target.clone(),
            positive_class: self.cfg.positive_class.clone(),
            model,
            sites: summary.sites.clone(),
            training_rows: summary.training_rows,
            train_loss: summary.train_loss,
            validation,
            missing_sites,
            stopped,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let path = self
            .out_dir
            .join("models")
            .join(&summary.study_id)
            .join(format!("round-{:04}.json", summary.round));
        let json = serde_json::to_vec_pretty(&export)
            .map_err(|e| self.failed(format!("encoding the model: {e}")))?;
        // Logged before it is released: a release the compliance log cannot record is not
        // written.
        let released = medfed_protocol::audit::Event::Released {
            study: summary.study_id.clone(),
            round: summary.round,
            sites: summary.sites.clone(),
            sha256: medfed_protocol::audit::sha256_hex(&json),
        };
        crate::release::release(&self.audit, released, || Ok(()), &path, &json).map_err(
            |e| match e {
                crate::release::ReleaseError::Write { path, source } => StudyError::Export {
                    study: summary.study_id.clone(),
                    path,
                    source,
                },
                e @ crate::release::ReleaseError::Unlogged(_) => self.unlogged(e),
                e => self.failed(e.to_string()),
            },
        )?;
        summary.validation = validation;
        summary.model_path = path.clone();
        self.emit(AggregatorEvent::RoundCompleted(summary));
        Ok(path)
    }
}

/// Checks a classification study's target against the classes its sites name (each site
/// names the classes at least `min_cell` of its patients have): the positive class must be
/// named by some site, and the target must have another class. Otherwise the study would
/// train on an all-negative (or all-positive) target and report a perfect accuracy.
fn check_target(
    target: &str,
    positive_class: Option<&str>,
    named: &BTreeMap<String, Vec<String>>,
) -> Result<(), String> {
    let Some(positive) = positive_class else {
        return Ok(());
    };
    let all: std::collections::BTreeSet<&str> =
        named.values().flatten().map(String::as_str).collect();
    let listed = || {
        if all.is_empty() {
            "none".to_string()
        } else {
            all.iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let rule = "a site names a class only if at least min_cell of its patients have it, and \
        never says how many";
    if !all.contains(positive) {
        let near: Vec<&&str> = all
            .iter()
            .filter(|c| c.eq_ignore_ascii_case(positive))
            .collect();
        let fix = match near.first() {
            Some(c) => format!("fix: positive_class = {c:?} (classes are compared exactly, case included)"),
            None => "fix: set positive_class to one of the named classes, or check the study's target column".to_string(),
        };
        return Err(format!(
            "positive_class = {positive:?} is not a class of target '{}' at any of the {} accepting sites; \
                the classes they name: {} ({rule}); training would see no positive row. {fix}",
            target,
            named.len(),
            listed(),
        ));
    }
    if all.len() < 2 {
        return Err(format!(
            "target '{}' has a single class at the {} accepting sites ({}; {rule}): a classifier \
                cannot learn from it. fix: choose a target with both outcomes, or a site's data that has them",
            target,
            named.len(),
            listed(),
        ));
    }
    Ok(())
}

/// Largest weight an update may carry.
const MAX_WEIGHT: f64 = 1e6;

/// Most training rows a site may declare (a bound on its FedAvg weight and on every sum).
pub(crate) const MAX_ROWS: u64 = 1_000_000_000;

/// Checks a node's update before it can enter the average.
fn check_update(
    u: &ModelUpdate,
    study: &str,
    round: u32,
    width: usize,
    declared_rows: u64,
) -> Result<(), String> {
    if u.study_id != study || u.round != round {
        return Err(format!(
            "it is for study '{}' round {}, not '{study}' round {round}",
            u.study_id, u.round
        ));
    }
    if u.weights.len() != width {
        return Err(format!("{} weights, expected {width}", u.weights.len()));
    }
    if u.weights.iter().any(|w| !w.is_finite()) || !u.train_loss.is_finite() {
        return Err("non-finite weight or loss".into());
    }
    // Standardized-feature models have weights of a few units; a huge one can only be an
    // attempt to push the average to infinity.
    if u.weights.iter().any(|w| w.abs() > MAX_WEIGHT) {
        return Err(format!("a weight beyond ±{MAX_WEIGHT}"));
    }
    if declared_rows == 0 {
        // Under differential privacy no count is declared, and none is sent.
        return if u.num_samples == 0 {
            Ok(())
        } else {
            Err("a row count in a differentially private update".into())
        };
    }
    if u.num_samples == 0 || u.num_samples > declared_rows {
        return Err(format!(
            "claims {} training rows; the site declared {declared_rows}",
            u.num_samples
        ));
    }
    Ok(())
}

/// Differentially private training without secure aggregation: `global + Σ Δ_i / m`, each
/// `Δ_i` a site's delta with all of its noise already added by the site (nobody here adds
/// or removes any). Under DP-FedAvg a delta longer than an honest one can be (`C` plus its
/// noise's norm beyond eight standard deviations) is cut to that length, so one site cannot
/// push the model anywhere; under DP-SGD only the weights' bound applies.
pub(crate) fn dp_average(
    global: &[f64],
    deltas: Vec<Vec<f64>>,
    dp: &medfed_protocol::dp::DpTraining,
) -> Vec<f64> {
    let m = deltas.len().max(1) as f64;
    let d = global.len() as f64;
    let bound = dp.clip_norm + dp.sigma() * (d.sqrt() + 8.0);
    let mut sum = vec![0.0; global.len()];
    for mut delta in deltas {
        if dp.sgd.is_none() {
            medfed_protocol::dp::clip_l2(&mut delta, bound);
        }
        for (s, x) in sum.iter_mut().zip(&delta) {
            *s += x;
        }
    }
    global.iter().zip(&sum).map(|(g, s)| g + s / m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfed_protocol::model::ModelKind;

    #[test]
    fn a_hostile_delta_is_cut_to_what_an_honest_noisy_one_can_be() {
        let dp = medfed_protocol::dp::DpTraining {
            clip_norm: 1.0,
            noise_multiplier: 0.5,
            sgd: None,
        };
        // σ = z·2C = 1; one coordinate: an honest noisy delta is at most C + 9σ = 10 long.
        let w = dp_average(&[0.0], vec![vec![1e6], vec![0.0]], &dp);
        assert!((w[0] - 5.0).abs() < 1e-9, "{w:?}");
        // Honest deltas (noise included) pass unchanged: the average of the two.
        let w = dp_average(&[1.0], vec![vec![2.5], vec![-0.5]], &dp);
        assert!((w[0] - 2.0).abs() < 1e-12, "{w:?}");
    }

    #[test]
    fn a_target_without_its_positive_class_or_with_one_class_stops_the_study() {
        let sites = |named: &[&[&str]]| -> BTreeMap<String, Vec<String>> {
            named
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        format!("site-{i}"),
                        c.iter().map(|c| c.to_string()).collect(),
                    )
                })
                .collect()
        };
        let ok = sites(&[&["No", "Yes"], &["No"]]);
        assert!(check_target("type", Some("Yes"), &ok).is_ok());
        // The positive class at one site only is enough.
        assert!(check_target("type", Some("Yes"), &sites(&[&["No"], &["Yes"]])).is_ok());
        // The wrong case: named, with the fix.
        let err = check_target("type", Some("yes"), &ok).unwrap_err();
        assert!(
            err.contains(r#"the classes they name: "No", "Yes""#),
            "{err}"
        );
        assert!(err.contains(r#"fix: positive_class = "Yes""#), "{err}");
        // Absent everywhere.
        let err = check_target("diagnosis", Some("normal"), &sites(&[&["B", "M"]])).unwrap_err();
        assert!(
            err.contains("is not a class of target 'diagnosis'"),
            "{err}"
        );
        assert!(err.contains("set positive_class to one of"), "{err}");
        // One class in the whole federation.
        let err = check_target("type", Some("Yes"), &sites(&[&["Yes"], &["Yes"]])).unwrap_err();
        assert!(err.contains("a single class"), "{err}");
        // Nothing named (every class rarer than min_cell everywhere).
        let err = check_target("type", Some("Yes"), &sites(&[&[], &[]])).unwrap_err();
        assert!(err.contains("name: none"), "{err}");
        // A regression study has no classes to check.
        assert!(check_target("y", None, &sites(&[&[]])).is_ok());
    }

    fn update() -> ModelUpdate {
        ModelUpdate {
            study_id: "s".into(),
            round: 2,
            weights: vec![0.1, 0.2, 0.3],
            num_samples: 10,
            train_loss: 0.5,
            evaluation: Evaluation::empty(ModelKind::Logistic),
        }
    }

    #[test]
    fn hostile_updates_are_refused() {
        assert!(check_update(&update(), "s", 2, 3, 10).is_ok());
        assert!(
            check_update(&update(), "s", 3, 3, 10)
                .unwrap_err()
                .contains("round 2")
        );
        assert!(
            check_update(&update(), "s", 2, 4, 10)
                .unwrap_err()
                .contains("expected 4")
        );
        let mut nan = update();
        nan.weights[1] = f64::NAN;
        assert!(check_update(&nan, "s", 2, 3, 10).is_err());
        // A site may not inflate its FedAvg weight beyond the rows it declared.
        assert!(
            check_update(&update(), "s", 2, 3, 9)
                .unwrap_err()
                .contains("declared 9")
        );
        let mut zero = update();
        zero.num_samples = 0;
        assert!(check_update(&zero, "s", 2, 3, 10).is_err());
    }
}
