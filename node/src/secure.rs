//! The node's side of secure aggregation: train, turn the update into the round's vector,
//! and let the protocol's [`Client`] state machine answer the aggregator's four requests.
//! The aggregator only ever sees this site's update masked.

use std::collections::HashMap;
use std::sync::MutexGuard;

use medfed_infra::identity::CertificateVerifier;
use medfed_protocol::messages::{RoundOpen, SecAggFromNode, SecAggToNode};
use medfed_protocol::secagg::{Client, ClientMessage};
use medfed_protocol::{ErrorCode, Message, update_vector};
use ring::rand::SecureRandom;
use tracing::{info, warn};

use crate::client::Node;

/// This node's state in one secure aggregation.
pub(crate) struct Party {
    client: Client,
    verifier: CertificateVerifier,
}

type Reply = Result<Message, (ErrorCode, String)>;

impl Node {
    fn secure_lock(&self) -> MutexGuard<'_, HashMap<(String, u32), Party>> {
        // Every mutation is a single insert or remove: a poisoned map is still consistent.
        self.secure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A training round under secure aggregation: answers with this site's signed keys.
    pub(crate) async fn train_secure(&self, r: RoundOpen) -> Reply {
        let invalid = |why: String| (ErrorCode::InvalidContent, why);
        let Some(sr) = r.secure.clone() else {
            return Err(invalid("not a secure round".into()));
        };
        let parties = sr.setup.parties.clone();
        let me = parties
            .iter()
            .position(|p| *p == self.config.site)
            .ok_or_else(|| {
                (
                    ErrorCode::CannotServe,
                    format!(
                        "site '{}' is not among the round's parties",
                        self.config.site
                    ),
                )
            })?;
        if sr.certificates.len() != parties.len() {
            return Err(invalid(format!(
                "{} certificates for {} parties",
                sr.certificates.len(),
                parties.len()
            )));
        }
        let certs: Vec<(String, Vec<u8>)> = parties
            .iter()
            .cloned()
            .zip(sr.certificates.iter().cloned())
            .collect();
        let verifier = CertificateVerifier::new(self.roots.clone(), &certs)
            .map_err(|e| invalid(e.to_string()))?;
        let u = self.local_update(&r).await?;
        let width = u.weights.len();
        if sr.setup.dimension as usize != update_vector::dimension(u.kind, width) {
            return Err(invalid(format!(
                "the round's vectors have {} entries; this model needs {}",
                sr.setup.dimension,
                update_vector::dimension(u.kind, width)
            )));
        }
        // The scale is 1 / (all parties' training rows): ours alone cannot exceed the total.
        if !(sr.scale.is_finite() && sr.scale > 0.0 && sr.scale * u.rows as f64 <= 1.0 + 1e-9) {
            return Err(invalid(format!(
                "scale {} does not fit this site's {} training rows",
                sr.scale, u.rows
            )));
        }
        let vector =
            update_vector::encode(&u.weights, u.train_loss, u.rows, &u.evaluation, sr.scale);
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| {
                (
                    ErrorCode::Internal,
                    "the system's random generator failed".into(),
                )
            })?;
        let (client, first) = Client::new(sr.setup, me as u32, &vector, &self.signer, seed)
            .map_err(|e| invalid(e.to_string()))?;
        info!(study = %r.study_id, round = r.round, parties = parties.len(), "secure aggregation: keys advertised");
        let mut secure = self.secure_lock();
        // A new round (or a retry of this one) replaces what an abandoned one left behind.
        secure.retain(|(study, round), _| *study != r.study_id || *round > r.round);
        secure.insert((r.study_id.clone(), r.round), Party { client, verifier });
        Ok(Message::SecAggFromNode(SecAggFromNode {
            study_id: r.study_id,
            round: r.round,
            message: first,
        }))
    }

    /// The next step of a secure aggregation in progress.
    pub(crate) fn secure_step(&self, m: SecAggToNode) -> Reply {
        let key = (m.study_id.clone(), m.round);
        let mut secure = self.secure_lock();
        let party = secure.get_mut(&key).ok_or_else(|| {
            (
                ErrorCode::UnexpectedMessage,
                format!(
                    "no secure aggregation in progress for study '{}' round {}",
                    m.study_id, m.round
                ),
            )
        })?;
        match party.client.handle(m.message, &party.verifier) {
            Ok(answer) => {
                if matches!(answer, ClientMessage::UnmaskShares { .. }) {
                    secure.remove(&key);
                    info!(study = %m.study_id, round = m.round, "secure aggregation: shares revealed; done");
                }
                Ok(Message::SecAggFromNode(SecAggFromNode {
                    study_id: m.study_id,
                    round: m.round,
                    message: answer,
                }))
            }
            Err(e) => {
                // The protocol refuses to go on (e.g. a forged key or an inconsistent request):
                // this site leaves the aggregation and reveals nothing more.
                secure.remove(&key);
                warn!(study = %m.study_id, round = m.round, "secure aggregation: left the round: {e}");
                Err((ErrorCode::InvalidContent, e.to_string()))
            }
        }
    }
}
