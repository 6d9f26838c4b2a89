//! Driving secure aggregation over QUIC: the protocol's [`Server`] state machine decides;
//! this code only moves its messages and tells it the time. Used for every training round
//! and for a study's feature statistics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medfed_infra::identity::{CertificateVerifier, peer_certificate};
use medfed_infra::transport::{self, TransportError};
use medfed_protocol::Message;
use medfed_protocol::messages::{
    RoundOpen, SecAggFromNode, SecAggToNode, SecureRound, StatisticsOpen, statistics_binding,
    training_binding,
};
use medfed_protocol::model::GlobalModel;
use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::{PartyId, SecAggError, Server, Setup, choose_neighbours};
use medfed_protocol::stats::FeatureStats;
use medfed_protocol::update_vector;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::server::ConnectedSite;
use crate::study::{Participant, RoundAggregate, StudyRunner};

/// Up to this many parties every pair masks; above it, SecAgg+ neighbourhoods.
const COMPLETE_GRAPH_UP_TO: usize = 32;

/// The secure-aggregation exchanges of the statistics step use round 0 (training rounds
/// start at 1).
const STATISTICS_ROUND: u32 = 0;

/// Range bound of a statistics entry: `s·n_i·E[x²]` stays below the largest squared feature
/// value, so features up to about 30,000 in magnitude fit.
const STATISTICS_CLIP: f64 = 1e9;

type Answer = (PartyId, Result<Message, TransportError>);

/// Under secure aggregation a site's own response time is not separated from the round's:
/// every contributor is credited with the round's duration.
fn contributor_latencies(sites: &[String], started: Instant) -> BTreeMap<String, f64> {
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    sites.iter().map(|s| (s.clone(), ms)).collect()
}

/// A securely computed sum and who is in it.
pub(crate) struct SecureSum {
    /// The decoded sum of the contributors' vectors.
    pub sum: Vec<f64>,
    /// Sites whose vectors are in the sum.
    pub sites: Vec<String>,
    /// `1 / S`, S being the training rows of all the parties asked.
    scale: f64,
    /// The setup's threshold `t`: each site's noise share is `σ²/(t − c)`.
    pub threshold: u32,
}

impl StudyRunner {
    /// The parameters for `sites` computing a sum of `dimension` entries.
    fn secure_setup(
        &self,
        label: String,
        sites: Vec<String>,
        dimension: usize,
        quant: QuantParams,
        binding: [u8; 32],
    ) -> Result<Setup, String> {
        let sa = &self.cfg.secure_aggregation;
        let n = sites.len();
        let (mut k, t) = if n <= COMPLETE_GRAPH_UP_TO {
            ((n - 1) as u32, 0)
        } else {
            choose_neighbours(n, sa.expected_dropout, sa.expected_corrupt, 20, 30)
        };
        // A decoded sum has at least t contributors, and t is at most the holders of one
        // site's secrets (k + 1): widen the neighbourhoods until a sum below the quorum
        // cannot be decoded at all, rather than decoding one and retrying (two sums over
        // overlapping sites would reveal their difference).
        let quorum = self.cfg.min_sites.max(2) as u32;
        if k + 1 < quorum {
            k = if quorum as usize > n - 1 {
                (n - 1) as u32
            } else {
                let k = quorum - 1;
                (k + k % 2).min((n - 1) as u32)
            };
        }
        let c = sa.tolerated_colluders;
        let t = t.max((k + 1 + c) / 2 + 1).max(quorum);
        if t > k + 1 || k > 254 {
            return Err(format!(
                "{n} sites cannot run secure aggregation with a quorum of {quorum} that tolerates {c} colluding site(s): that needs a threshold of {t} among {} holders of each site's secrets (lower secure_aggregation.tolerated_colluders or min_sites)",
                k + 1
            ));
        }
        Ok(Setup {
            graph_seed: Setup::graph_seed_for(&label),
            label,
            parties: sites,
            threshold: t,
            neighbours: k,
            dimension: dimension as u32,
            quant,
            binding,
        })
    }

    /// Runs one secure aggregation among the connected `participants`; `open` builds the
    /// request that starts it at each node.
    pub(crate) async fn secure_sum(
        &self,
        round: u32,
        attempt: u32,
        participants: &BTreeMap<String, Participant>,
        dimension: usize,
        // The fixed-point parameters for n parties, and the setup's binding for a scale.
        round_params: impl FnOnce(usize, f64) -> Result<(QuantParams, [u8; 32]), String>,
        open: impl FnOnce(SecureRound) -> Message,
    ) -> Result<SecureSum, String> {
        let cfg = &self.cfg;
        let connected: Vec<(String, ConnectedSite, u64)> = participants
            .iter()
            .filter_map(|(site, p)| {
                self.registry
                    .get(site)
                    .map(|c| (site.clone(), c, p.training_rows))
            })
            .collect();
        let need = cfg.min_sites.max(2);
        if connected.len() < need {
            return Err(format!(
                "{} of the {need} sites needed are connected",
                connected.len()
            ));
        }
        let certificates: Vec<(String, Vec<u8>)> = connected
            .iter()
            .map(|(site, c, _)| {
                peer_certificate(&c.conn)
                    .map(|der| (site.clone(), der))
                    .ok_or(format!("no certificate for site '{site}'"))
            })
            .collect::<Result<_, _>>()?;
        let verifier =
            CertificateVerifier::new(&self.roots, &certificates).map_err(|e| e.to_string())?;
        let scale = 1.0 / connected.iter().map(|(_, _, rows)| rows).sum::<u64>() as f64;
        let sites: Vec<String> = connected.iter().map(|(s, ..)| s.clone()).collect();
        let (quant, binding) = round_params(connected.len(), scale)?;
        let setup = self.secure_setup(
            format!("{}/{round}/{attempt}", cfg.id),
            sites,
            dimension,
            quant,
            binding,
        )?;
        let timeout = Duration::from_secs(cfg.round_timeout_secs);
        let start = Instant::now();
        let now_ms = || start.elapsed().as_millis() as u64;
        let mut server = Server::new(setup.clone(), now_ms(), timeout.as_millis() as u64)
            .map_err(|e| e.to_string())?;
        info!(study = %cfg.id, round, parties = setup.parties.len(), neighbours = setup.neighbours, threshold = setup.threshold, "secure aggregation starts");

        let first = Arc::new(open(SecureRound {
            setup: setup.clone(),
            certificates: certificates.into_iter().map(|(_, der)| der).collect(),
            scale,
            colluders: cfg.secure_aggregation.tolerated_colluders,
        }));
        let conns: Vec<quinn::Connection> =
            connected.iter().map(|(_, c, _)| c.conn.clone()).collect();
        let mut tasks: JoinSet<Answer> = JoinSet::new();
        for (party, conn) in conns.iter().enumerate() {
            let (conn, msg, max, audit, site) = (
                conn.clone(),
                first.clone(),
                self.max_frame,
                self.audit.clone(),
                setup.parties[party].clone(),
            );
            tasks.spawn(async move {
                let answer =
                    transport::request_logged(&conn, &msg, max, timeout, Some((&*audit, &site)))
                        .await;
                (party as PartyId, answer)
            });
        }
        // Why sites left, for an error that says so.
        let mut refusals: Vec<String> = Vec::new();
        loop {
            while let Some((v, message)) = server.poll_transmit() {
                let msg = Message::SecAggToNode(SecAggToNode {
                    study_id: cfg.id.clone(),
                    round,
                    message,
                });
                let (conn, max, audit, site) = (
                    conns[v as usize].clone(),
                    self.max_frame,
                    self.audit.clone(),
                    setup.parties[v as usize].clone(),
                );
                tasks.spawn(async move {
                    (
                        v,
                        transport::request_logged(
                            &conn,
                            &msg,
                            max,
                            timeout,
                            Some((&*audit, &site)),
                        )
                        .await,
                    )
                });
            }
            if server.outcome().is_some() {
                break;
            }
            if tasks.is_empty() {
                // Every request of this phase has been answered or has failed.
                server.close_phase(now_ms());
                continue;
            }
            let deadline = server.poll_timeout().unwrap_or(0);
            let sleep = tokio::time::sleep_until((start + Duration::from_millis(deadline)).into());
            tokio::select! {
                Some(joined) = tasks.join_next() => {
                    let Ok((v, answer)) = joined else { continue };
                    let site = &setup.parties[v as usize];
                    match answer {
                        Ok(Message::SecAggFromNode(SecAggFromNode { study_id, round: r, message })) if study_id == cfg.id && r == round => {
                            let kind = message.kind();
                            match server.handle(now_ms(), v, message, &verifier) {
                                Ok(()) => debug!(%site, round, "secure aggregation: {kind}"),
                                Err(e) => warn!(%site, round, "secure aggregation: {kind} refused: {e}"),
                            }
                        }
                        Ok(other) => warn!(%site, round, "secure aggregation: unexpected {}", other.kind()),
                        Err(TransportError::Peer { reason, .. }) => {
                            warn!(%site, round, "secure aggregation: the site refused: {reason}");
                            refusals.push(format!("{site} refused: {reason}"));
                        }
                        Err(e) => {
                            warn!(%site, round, "secure aggregation: no answer: {e}");
                            refusals.push(format!("{site} did not answer: {e}"));
                        }
                    }
                }
                () = sleep => server.handle_timeout(now_ms()),
            }
        }
        tasks.abort_all();
        let name = |v: &u32| setup.parties[*v as usize].clone();
        // Wrong shares never make a wrong sum (rebuilt secrets are checked); the inconsistent
        // ones are named so that the operator can look into them. Either the holder revealed
        // a wrong share or the owner dealt one: the protocol cannot tell which.
        let inconsistent: Vec<String> = server
            .inconsistent_shares()
            .iter()
            .map(|(owner, holder)| format!("{}'s share of {}'s secret", name(holder), name(owner)))
            .collect();
        if !inconsistent.is_empty() {
            warn!(round, shares = %inconsistent.join(", "), "secure aggregation: shares inconsistent with the rebuilt secrets (the holder revealed a wrong share, or the owner dealt one)");
        }
        let sum = match server.outcome() {
            Some(Ok(sum)) => setup.quant.decode(sum),
            Some(Err(e)) => {
                let e = match e {
                    SecAggError::Unrebuildable {
                        owner,
                        what,
                        gave_up,
                    } => format!(
                        "the shares revealed of site '{}''s {what} do not rebuild it: some are \
                         wrong (its neighbours revealed wrong ones, or it dealt them){}",
                        name(owner),
                        if *gave_up {
                            "; the search stopped at the round's limit"
                        } else {
                            ""
                        }
                    ),
                    e => e.to_string(),
                };
                return Err(if refusals.is_empty() {
                    format!("secure aggregation failed: {e}")
                } else {
                    format!("secure aggregation failed: {e}; {}", refusals.join("; "))
                });
            }
            None => return Err("secure aggregation ended without an outcome".into()),
        };
        let sites = server
            .contributors()
            .iter()
            .map(|&v| setup.parties[v as usize].clone())
            .collect();
        Ok(SecureSum {
            sum,
            sites,
            scale,
            threshold: setup.threshold,
        })
    }

    /// One training round with secure aggregation. The aggregator learns the FedAvg of the
    /// sites that completed it, their merged evaluation, and nothing about any single site's
    /// update.
    pub(crate) async fn secure_round(
        &self,
        round: u32,
        attempt: u32,
        model: &GlobalModel,
        participants: &BTreeMap<String, Participant>,
    ) -> Result<RoundAggregate, String> {
        let cfg = &self.cfg;
        let started = Instant::now();
        let width = model.weights.len();
        let sa = &cfg.secure_aggregation;
        let mut params = cfg.training.params();
        params.seed = params.seed.wrapping_add(u64::from(round));
        let timeout_ms = cfg.round_timeout_secs * 1000;
        let secure = self
            .secure_sum(
                round,
                attempt,
                participants,
                match &cfg.privacy {
                    // DP-FedAvg: each site's clipped delta plus its share of the noise.
                    Some(_) => width,
                    None => update_vector::dimension(cfg.model, width),
                },
                |n, scale| {
                    let quant = if cfg.privacy.is_some() {
                        QuantParams::for_parties(n, sa.clip, sa.scale_bits)
                    } else {
                        // The vector carries counts scaled by 1/S: a finer fixed point where
                        // S is large keeps them exact.
                        QuantParams::for_scaled_counts(n, sa.clip, sa.scale_bits, 1.0 / scale).map(
                            |(quant, exact)| {
                                if !exact {
                                    tracing::warn!(
                                        study = %cfg.id,
                                        round,
                                        rows = 1.0 / scale,
                                        scale_bits = quant.scale_bits,
                                        "evaluation counts may decode a few off: the sites' \
                                         rows need a finer fixed point than 64 bits allow \
                                         with secure_aggregation.clip; lower the clip"
                                    );
                                }
                                quant
                            },
                        )
                    }
                    .map_err(|e| e.to_string())?;
                    Ok((
                        quant,
                        training_binding(&cfg.id, round, scale, model, &params),
                    ))
                },
                |secure| {
                    Message::RoundOpen(RoundOpen {
                        study_id: cfg.id.clone(),
                        round,
                        model: model.clone(),
                        params: params.clone(),
                        deadline_ms: timeout_ms,
                        secure: Some(secure),
                    })
                },
            )
            .await?;
        if cfg.privacy.is_some() {
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
                return Err("the decoded average is not finite".into());
            }
            let rows = secure
                .sites
                .iter()
                .filter_map(|s| participants.get(s))
                .fold(0u64, |a, p| a.saturating_add(p.training_rows));
            let latencies = contributor_latencies(&secure.sites, started);
            return Ok(RoundAggregate {
                sites: secure.sites,
                weights,
                train_loss: f64::NAN,
                rows,
                evaluation: medfed_protocol::metrics::Evaluation::empty(cfg.model),
                latencies,
            });
        }
        let decoded = update_vector::decode(&secure.sum, cfg.model, width, secure.scale)?;
        if decoded.weights.iter().any(|w| !w.is_finite()) {
            return Err("the decoded average is not finite".into());
        }
        let latencies = contributor_latencies(&secure.sites, started);
        Ok(RoundAggregate {
            sites: secure.sites,
            weights: decoded.weights,
            train_loss: decoded.train_loss,
            rows: decoded.rows,
            evaluation: decoded.evaluation,
            latencies,
        })
    }

    /// The participants' pooled feature statistics, summed with secure aggregation.
    pub(crate) async fn secure_statistics(
        &self,
        participants: &BTreeMap<String, Participant>,
    ) -> Result<(FeatureStats, Vec<String>), String> {
        let cfg = &self.cfg;
        let d = cfg.features.len();
        let mut last = String::new();
        for attempt in 1..=cfg.round_attempts {
            let result = self
                .secure_sum(
                    STATISTICS_ROUND,
                    attempt,
                    participants,
                    update_vector::statistics_dimension(d),
                    // The finest fixed point that cannot overflow 64 bits for n parties.
                    |n, scale| {
                        let room = (2f64.powi(62) / (n as f64 * STATISTICS_CLIP))
                            .log2()
                            .floor();
                        let bits = room.clamp(0.0, 24.0) as u8;
                        let quant = QuantParams::for_parties(n, STATISTICS_CLIP, bits)
                            .map_err(|e| e.to_string())?;
                        Ok((quant, statistics_binding(&cfg.id, scale)))
                    },
                    |secure| {
                        Message::StatisticsOpen(StatisticsOpen {
                            study_id: cfg.id.clone(),
                            secure,
                        })
                    },
                )
                .await;
            match result.and_then(|s| {
                if s.sites.len() < cfg.min_sites {
                    return Err(format!(
                        "{} of the {} sites needed contributed",
                        s.sites.len(),
                        cfg.min_sites
                    ));
                }
                update_vector::decode_statistics(&s.sum, d, s.scale).map(|stats| (stats, s.sites))
            }) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    warn!(study = %cfg.id, attempt, "secure feature statistics failed: {e}");
                    last = e;
                }
            }
        }
        Err(last)
    }
}
