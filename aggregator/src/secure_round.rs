//! Driving one training round with secure aggregation: the protocol's [`Server`] state
//! machine decides; this code only moves its messages over QUIC and tells it the time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medfed_infra::identity::{CertificateVerifier, peer_certificate};
use medfed_infra::transport::{self, TransportError};
use medfed_protocol::Message;
use medfed_protocol::messages::{RoundOpen, SecAggFromNode, SecAggToNode, SecureRound};
use medfed_protocol::model::GlobalModel;
use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::{PartyId, Server, Setup, choose_neighbours};
use medfed_protocol::update_vector;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::server::ConnectedSite;
use crate::study::{Participant, RoundAggregate, StudyRunner};

/// Up to this many parties every pair masks; above it, SecAgg+ neighbourhoods.
const COMPLETE_GRAPH_UP_TO: usize = 32;

type Answer = (PartyId, Result<Message, TransportError>);

impl StudyRunner {
    /// The round's parameters for `n` parties.
    fn secure_setup(
        &self,
        round: u32,
        attempt: u32,
        sites: Vec<String>,
        width: usize,
    ) -> Result<Setup, String> {
        let sa = &self.cfg.secure_aggregation;
        let n = sites.len();
        let (k, t) = if n <= COMPLETE_GRAPH_UP_TO {
            ((n - 1) as u32, (n / 2 + 1) as u32)
        } else {
            choose_neighbours(n, sa.expected_dropout, sa.expected_corrupt, 20, 30)
        };
        // Never decode fewer inputs than the study's quorum.
        let t = t.max(self.cfg.min_sites as u32).min(k + 1);
        Ok(Setup {
            label: format!("{}/{round}/{attempt}", self.cfg.id),
            parties: sites,
            threshold: t,
            neighbours: k,
            graph_seed: rand::random(),
            dimension: update_vector::dimension(self.cfg.model, width) as u32,
            quant: QuantParams::for_parties(n, sa.clip, sa.scale_bits)
                .map_err(|e| e.to_string())?,
        })
    }

    /// One round with secure aggregation. The aggregator learns the FedAvg of the sites that
    /// completed it, their merged evaluation, and nothing about any single site's update.
    pub(crate) async fn secure_round(
        &self,
        round: u32,
        attempt: u32,
        model: &GlobalModel,
        participants: &BTreeMap<String, Participant>,
    ) -> Result<RoundAggregate, String> {
        let cfg = &self.cfg;
        let connected: Vec<(String, ConnectedSite, u64)> = participants
            .iter()
            .filter_map(|(site, p)| {
                self.registry
                    .get(site)
                    .map(|c| (site.clone(), c, p.training_rows))
            })
            .collect();
        if connected.len() < cfg.min_sites.max(2) {
            return Err(format!(
                "{} of the {} sites needed are connected",
                connected.len(),
                cfg.min_sites.max(2)
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
        let verifier = CertificateVerifier::new(self.roots.clone(), &certificates)
            .map_err(|e| e.to_string())?;
        let total_rows: u64 = connected.iter().map(|(_, _, rows)| rows).sum();
        let setup = self.secure_setup(
            round,
            attempt,
            connected.iter().map(|(s, ..)| s.clone()).collect(),
            model.weights.len(),
        )?;
        let timeout = Duration::from_secs(cfg.round_timeout_secs);
        let start = Instant::now();
        let now_ms = || start.elapsed().as_millis() as u64;
        let mut server = Server::new(setup.clone(), now_ms(), timeout.as_millis() as u64)
            .map_err(|e| e.to_string())?;
        info!(study = %cfg.id, round, parties = setup.parties.len(), neighbours = setup.neighbours, threshold = setup.threshold, "secure aggregation starts");

        let mut params = cfg.training.params();
        params.seed = params.seed.wrapping_add(u64::from(round));
        let open = Arc::new(Message::RoundOpen(RoundOpen {
            study_id: cfg.id.clone(),
            round,
            model: model.clone(),
            params,
            deadline_ms: timeout.as_millis() as u64,
            secure: Some(SecureRound {
                setup: setup.clone(),
                certificates: certificates.into_iter().map(|(_, der)| der).collect(),
                scale: 1.0 / total_rows as f64,
            }),
        }));
        let conns: Vec<quinn::Connection> =
            connected.iter().map(|(_, c, _)| c.conn.clone()).collect();
        let mut tasks: JoinSet<Answer> = JoinSet::new();
        for (party, conn) in conns.iter().enumerate() {
            let (conn, msg, max) = (conn.clone(), open.clone(), self.max_frame);
            tasks.spawn(async move {
                (
                    party as PartyId,
                    transport::request(&conn, &msg, max, timeout).await,
                )
            });
        }
        loop {
            while let Some((v, message)) = server.poll_transmit() {
                let msg = Message::SecAggToNode(SecAggToNode {
                    study_id: cfg.id.clone(),
                    round,
                    message,
                });
                let (conn, max) = (conns[v as usize].clone(), self.max_frame);
                tasks
                    .spawn(async move { (v, transport::request(&conn, &msg, max, timeout).await) });
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
                            if let Err(e) = server.handle(now_ms(), v, message, &verifier) {
                                warn!(%site, round, "secure aggregation: {kind} refused: {e}");
                            } else {
                                debug!(%site, round, "secure aggregation: {kind}");
                            }
                        }
                        Ok(other) => warn!(%site, round, "secure aggregation: unexpected {}", other.kind()),
                        Err(e) => warn!(%site, round, "secure aggregation: no answer: {e}"),
                    }
                }
                () = sleep => server.handle_timeout(now_ms()),
            }
        }
        tasks.abort_all();
        let sum = match server.outcome() {
            Some(Ok(sum)) => sum.clone(),
            Some(Err(e)) => return Err(format!("secure aggregation failed: {e}")),
            None => return Err("secure aggregation ended without an outcome".into()),
        };
        let decoded = update_vector::decode(
            &setup.quant.decode(&sum),
            cfg.model,
            model.weights.len(),
            1.0 / total_rows as f64,
        )?;
        let sites: Vec<String> = server
            .contributors()
            .iter()
            .map(|&v| setup.parties[v as usize].clone())
            .collect();
        if decoded.weights.iter().any(|w| !w.is_finite()) {
            return Err("the decoded average is not finite".into());
        }
        Ok(RoundAggregate {
            sites,
            weights: decoded.weights,
            train_loss: decoded.train_loss,
            rows: decoded.rows,
            evaluation: decoded.evaluation,
        })
    }
}
