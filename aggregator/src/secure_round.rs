//! Driving one secure aggregation over QUIC for a statistics study: the protocol's
//! [`Server`] state machine decides; this code only moves its messages and tells it the
//! time. (Training studies run theirs inside the study [`Coordinator`].)
//!
//! [`Coordinator`]: medfed_protocol::study::Coordinator

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medfed_infra::identity::{CertificateVerifier, peer_certificate};
use medfed_infra::transport::{self, TransportError};
use medfed_protocol::Message;
use medfed_protocol::messages::{SecAggFromNode, SecAggToNode, SecureRound};
use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::{PartyId, Server};
use medfed_protocol::study::secure::{failure_words, inconsistent_words};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::server::ConnectedSite;
use crate::study::{Participant, StudyRunner};

type Answer = (PartyId, Result<Message, TransportError>);

/// A securely computed sum and who is in it.
pub(crate) struct SecureSum {
    /// The decoded sum of the contributors' vectors.
    pub sum: Vec<f64>,
    /// Sites whose vectors are in the sum.
    pub sites: Vec<String>,
    /// The setup's threshold `t`: each site's noise share is `σ²/(t − c)`.
    pub threshold: u32,
}

impl StudyRunner {
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
        let setup = medfed_protocol::study::secure::setup_for(
            cfg,
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
                // [ha]: an instance that lost its lease sends nothing more (the unmasking
                // requests above all); the active instance repeats the query.
                if !self.may_act() {
                    return Err(
                        "this aggregator instance lost its lease mid-round; nothing more was sent"
                            .into(),
                    );
                }
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
        // Wrong shares never make a wrong sum (rebuilt secrets are checked); the inconsistent
        // ones are named so that the operator can look into them. Either the holder revealed
        // a wrong share or the owner dealt one: the protocol cannot tell which.
        let inconsistent = inconsistent_words(&server);
        if !inconsistent.is_empty() {
            warn!(round, shares = %inconsistent.join(", "), "secure aggregation: shares inconsistent with the rebuilt secrets (the holder revealed a wrong share, or the owner dealt one)");
        }
        let sum = match server.outcome() {
            Some(Ok(sum)) => setup.quant.decode(sum),
            Some(Err(e)) => return Err(failure_words(e, &setup.parties, &refusals)),
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
            threshold: setup.threshold,
        })
    }
}
