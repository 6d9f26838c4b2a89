//! The node's side of secure aggregation: train, turn the update into the round's vector,
//! and let the protocol's [`Client`] state machine answer the aggregator's four requests.
//! The aggregator only ever sees this site's update masked.

use std::collections::HashMap;
use std::sync::MutexGuard;

use medfed_infra::identity::CertificateVerifier;
use medfed_protocol::messages::{
    RoundOpen, SecAggFromNode, SecAggToNode, SecureRound, StatisticsOpen,
};
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

    /// Joins a secure aggregation of `vector` (a training round, or round 0 for the
    /// study's feature statistics) and answers with this site's signed keys.
    fn join_secure(
        &self,
        study_id: String,
        round: u32,
        sr: SecureRound,
        vector: Vec<f64>,
    ) -> Reply {
        let invalid = |why: String| (ErrorCode::InvalidContent, why);
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
        if sr.setup.dimension as usize != vector.len() {
            return Err(invalid(format!(
                "the round's vectors have {} entries; this site's has {}",
                sr.setup.dimension,
                vector.len()
            )));
        }
        let certs: Vec<(String, Vec<u8>)> = parties.iter().cloned().zip(sr.certificates).collect();
        let verifier = CertificateVerifier::new(self.roots.clone(), &certs)
            .map_err(|e| invalid(e.to_string()))?;
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
        info!(study = %study_id, round, parties = parties.len(), "secure aggregation: keys advertised");
        let mut secure = self.secure_lock();
        // A new round (or a retry of this one) replaces what an abandoned one left behind.
        secure.retain(|(study, r), _| *study != study_id || *r > round);
        secure.insert((study_id.clone(), round), Party { client, verifier });
        Ok(Message::SecAggFromNode(SecAggFromNode {
            study_id,
            round,
            message: first,
        }))
    }

    /// Checks the round's scale `1 / S` against this site's `rows` (ours alone cannot exceed
    /// the total).
    fn check_scale(scale: f64, rows: u64) -> Result<(), (ErrorCode, String)> {
        if scale.is_finite() && scale > 0.0 && scale * rows as f64 <= 1.0 + 1e-9 {
            Ok(())
        } else {
            Err((
                ErrorCode::InvalidContent,
                format!("scale {scale} does not fit this site's {rows} training rows"),
            ))
        }
    }

    /// A training round under secure aggregation.
    pub(crate) async fn train_secure(&self, r: RoundOpen) -> Reply {
        let Some(sr) = r.secure.clone() else {
            return Err((ErrorCode::InvalidContent, "not a secure round".into()));
        };
        let u = self.local_update(&r).await?;
        Self::check_scale(sr.scale, u.rows)?;
        let vector =
            update_vector::encode(&u.weights, u.train_loss, u.rows, &u.evaluation, sr.scale);
        self.join_secure(r.study_id, r.round, sr, vector)
    }

    /// The study's feature statistics under secure aggregation.
    pub(crate) fn statistics_secure(&self, s: StatisticsOpen) -> Reply {
        let data = self.study_data(&s.study_id)?;
        let stats = data.feature_stats();
        Self::check_scale(s.secure.scale, stats.count)?;
        let vector = update_vector::encode_statistics(&stats, s.secure.scale);
        self.join_secure(s.study_id, 0, s.secure, vector)
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
