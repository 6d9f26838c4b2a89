//! The node's side of secure aggregation: train, turn the update into the round's vector,
//! and let the protocol's [`Client`] state machine answer the aggregator's four requests.
//! The aggregator only ever sees this site's update masked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::MutexGuard;

use medfed_infra::identity::CertificateVerifier;
use medfed_infra::json_state::{Contents, JsonFile};
use medfed_protocol::dp::Charge;
use medfed_protocol::messages::{
    RoundOpen, SecAggFromNode, SecAggToNode, SecureRound, StatisticsOpen, statistics_binding,
    training_binding,
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
    parties: Vec<String>,
    /// Reveal nothing unless every party is in the sum (exact statistics: a sum over fewer
    /// sites than asked would differ from an earlier one by those sites).
    all_must_survive: bool,
    /// What the masked input costs the site's budget, charged as it leaves.
    charge: Option<Charge>,
    /// The setup's label and binding, and this site's first message: the same round
    /// opened again (a request delivered twice) gets the same answer.
    opened: (String, [u8; 32], ClientMessage),
    /// The last request handled and its answer: the same request again gets the same
    /// answer (the state machine has moved on).
    last: Option<(medfed_protocol::secagg::ServerMessage, ClientMessage)>,
}

/// Per study, the last secure aggregation a site finished: (round, last request, answer).
pub(crate) type Finished =
    std::collections::HashMap<String, (u32, medfed_protocol::secagg::ServerMessage, ClientMessage)>;

/// What a site adds to its vector before masking, and what that costs its budget.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Noise {
    /// This site's share of the differential-privacy noise (value units; 0: none).
    pub sigma: f64,
    /// Whether the site reveals its unmasking shares only when every party is in the sum.
    pub all_must_survive: bool,
    /// The privacy-budget charge of the site's input, made when the masked input leaves
    /// (after enough parties joined to go on): an attempt that fails before costs nothing.
    pub charge: Option<Charge>,
}

impl Noise {
    pub(crate) const NONE: Noise = Noise {
        sigma: 0.0,
        all_must_survive: false,
        charge: None,
    };
}

type Reply = Result<Message, (ErrorCode, String)>;

/// The most attempts of one round a node joins (each attempt is a new neighbour graph).
pub(crate) const MAX_ATTEMPTS: u32 = 16;

/// The node's own checks of a secure aggregation before it joins (the protocol's
/// `Setup::validate` checks the rest); returns the attempt number.
///
/// - The label names this study, round and an attempt of at most [`MAX_ATTEMPTS`]: the
///   graph's seed is derived from it, so the aggregator has few graphs to choose from.
/// - The setup's binding is the one computed from what this node was sent.
/// - The threshold keeps `tolerated_colluders` sites and the aggregator from unmasking
///   this site.
/// - After revealing its shares for this round (`revealed`: the sites whose input was in
///   that sum), the node joins again only with exactly those sites as the parties: their
///   sum is the same, so nothing new is learnt, while a sum over other sites would reveal
///   the difference. (At the reveal itself the survivors are checked again.)
fn admit(
    study_id: &str,
    round: u32,
    setup: &medfed_protocol::secagg::Setup,
    binding: &[u8; 32],
    tolerated_colluders: u32,
    revealed: Option<&str>,
) -> Result<u32, (ErrorCode, String)> {
    let invalid = |why: String| (ErrorCode::InvalidContent, why);
    let attempt = setup
        .label
        .strip_prefix(&format!("{study_id}/{round}/"))
        .and_then(|a| a.parse::<u32>().ok())
        .filter(|a| (1..=MAX_ATTEMPTS).contains(a))
        .ok_or_else(|| {
            invalid(format!(
                "secure aggregation label {:?} is not '{study_id}/{round}/<attempt 1..={MAX_ATTEMPTS}>'",
                setup.label
            ))
        })?;
    if setup.binding != *binding {
        return Err(invalid(
            "the round's secure-aggregation setup does not match its model, parameters and scale"
                .into(),
        ));
    }
    setup
        .check_collusion_margin(tolerated_colluders)
        .map_err(|e| {
            (
                ErrorCode::CannotServe,
                format!("{e} (this site's policy: tolerated_colluders = {tolerated_colluders})"),
            )
        })?;
    if let Some(before) = revealed
        && before != parties_digest(&setup.parties)
    {
        return Err((
            ErrorCode::CannotServe,
            format!(
                "this site already revealed its shares for study '{study_id}' round {round} with other sites; joining again with a different set would let the aggregator subtract two sums"
            ),
        ));
    }
    Ok(attempt)
}

/// One secure aggregation this site revealed unmasking shares for, and with whom.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevealedRound {
    study: String,
    round: u32,
    /// [`parties_digest`] of the sum's parties.
    parties_sha256: String,
}

/// SHA-256 of a sum's party list (names in order, one per line), hex.
pub(crate) fn parties_digest(parties: &[String]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parties {
        ctx.update(p.as_bytes());
        ctx.update(b"\n");
    }
    medfed_protocol::hex::encode(ctx.finish().as_ref())
}

/// Why a reveal was not recorded (and so does not happen).
#[derive(Debug)]
pub(crate) enum RecordError {
    /// This round was revealed with other parties.
    OtherParties(String),
    /// The record could not be written.
    Write(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::OtherParties(why) | RecordError::Write(why) => f.write_str(why),
        }
    }
}

/// Every secure aggregation this site revealed shares for, kept in the node's state
/// directory, so that neither a retry nor a restart lets the aggregator have this site join
/// a second sum of the same study and round over other parties (and subtract the two).
/// Written before the shares are sent; nothing is ever forgotten (64 bytes per round), and
/// round 0 (a study's feature statistics) is protected like any other.
pub(crate) struct RevealedRounds(JsonFile<Vec<RevealedRound>>);

/// What the file of revealed rounds holds, for its errors.
const REVEALED: Contents = Contents {
    label: "",
    a: "a list of revealed rounds",
    the: "the revealed rounds",
    pretty: false,
};

impl RevealedRounds {
    pub(crate) fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("revealed-rounds.json")
    }

    pub(crate) fn open(path: PathBuf) -> Result<RevealedRounds, String> {
        JsonFile::open(path, REVEALED)
            .map(RevealedRounds)
            .map_err(|e| e.to_string())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<RevealedRound>> {
        self.0.lock()
    }

    /// The digest of the parties this site revealed shares with for `study` `round`, if it
    /// did.
    pub(crate) fn get(&self, study: &str, round: u32) -> Option<String> {
        self.lock()
            .iter()
            .find(|r| r.study == study && r.round == round)
            .map(|r| r.parties_sha256.clone())
    }

    /// Records a reveal durably, before it happens. Refuses (so the shares do not leave)
    /// when this round was already revealed with other parties: two attempts admitted at
    /// once both reach this point, and only the first may reveal.
    pub(crate) fn record(
        &self,
        study: &str,
        round: u32,
        parties: &[String],
    ) -> Result<(), RecordError> {
        let digest = parties_digest(parties);
        let mut rounds = self.lock();
        if let Some(before) = rounds.iter().find(|r| r.study == study && r.round == round) {
            return if before.parties_sha256 == digest {
                Ok(())
            } else {
                Err(RecordError::OtherParties(format!(
                    "this site already revealed its shares for study '{study}' round {round} with other sites"
                )))
            };
        }
        rounds.push(RevealedRound {
            study: study.to_string(),
            round,
            parties_sha256: digest,
        });
        self.0.save(&rounds).map_err(|e| {
            // Not recorded: not revealed, and not remembered either.
            rounds.pop();
            RecordError::Write(e.to_string())
        })
    }
}

impl Node {
    fn secure_lock(&self) -> MutexGuard<'_, HashMap<(String, u32), Party>> {
        // Every mutation is a single insert or remove: a poisoned map is still consistent.
        self.secure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything [`Node::join_secure`] checks of a secure aggregation before anything is
    /// computed, remembered or charged: the label, binding and collusion margin
    /// ([`admit`]), this site among the parties, a certificate per party, the dimension.
    /// So a bogus request cannot drain the budget.
    pub(crate) fn check_join(
        &self,
        study_id: &str,
        round: u32,
        sr: &SecureRound,
        binding: &[u8; 32],
        dimension: usize,
    ) -> Result<(), (ErrorCode, String)> {
        admit(
            study_id,
            round,
            &sr.setup,
            binding,
            self.config.policy.tolerated_colluders,
            self.revealed.get(study_id, round).as_deref(),
        )?;
        sr.setup
            .validate()
            .map_err(|e| (ErrorCode::InvalidContent, e.to_string()))?;
        if !sr.setup.parties.contains(&self.config.site) {
            return Err((
                ErrorCode::CannotServe,
                format!(
                    "site '{}' is not among the round's parties",
                    self.config.site
                ),
            ));
        }
        if sr.certificates.len() != sr.setup.parties.len()
            || sr.setup.dimension as usize != dimension
        {
            return Err((
                ErrorCode::InvalidContent,
                "the secure aggregation's certificates or dimension do not fit its parties and vector"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Checks that a round's noise shares allow for at least as many colluding sites as
    /// this site's policy (`tolerated_colluders`), and leave at least one honest share.
    pub(crate) fn noise_colluders(&self, sr: &SecureRound) -> Result<(), String> {
        let mine = self.config.policy.tolerated_colluders;
        if sr.colluders < mine {
            return Err(format!(
                "the round's noise allows for {} colluding site(s); this site's policy tolerates {mine} \
                 (the aggregator's secure_aggregation.tolerated_colluders must be at least that)",
                sr.colluders
            ));
        }
        if sr.setup.threshold <= sr.colluders {
            return Err(format!(
                "the round's threshold {} leaves no honest site's noise when {} collude",
                sr.setup.threshold, sr.colluders
            ));
        }
        Ok(())
    }

    /// Joins a secure aggregation of `vector` (a training round, or round 0 for the
    /// study's feature statistics) with this site's share of the `noise`, and answers with
    /// this site's signed keys.
    pub(crate) fn join_secure(
        &self,
        study_id: String,
        round: u32,
        sr: SecureRound,
        vector: Vec<f64>,
        binding: [u8; 32],
        noise: Noise,
    ) -> Reply {
        let invalid = |why: String| (ErrorCode::InvalidContent, why);
        let attempt = admit(
            &study_id,
            round,
            &sr.setup,
            &binding,
            self.config.policy.tolerated_colluders,
            self.revealed.get(&study_id, round).as_deref(),
        )?;
        let parties = sr.setup.parties.clone();
        if let Some(p) = self.secure_lock().get(&(study_id.clone(), round))
            && p.opened.0 == sr.setup.label
            && p.opened.1 == sr.setup.binding
            && p.parties == parties
        {
            // The same round opened again (a request delivered twice): the same answer.
            return Ok(Message::SecAggFromNode(SecAggFromNode {
                study_id,
                round,
                message: p.opened.2.clone(),
            }));
        }
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
        let verifier =
            CertificateVerifier::new(&self.roots, &certs).map_err(|e| invalid(e.to_string()))?;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| {
                (
                    ErrorCode::Internal,
                    "the system's random generator failed".into(),
                )
            })?;
        let opened = (sr.setup.label.clone(), sr.setup.binding);
        let (client, first) = Client::new_noised(
            sr.setup,
            me as u32,
            &vector,
            noise.sigma,
            &self.signer,
            seed,
        )
        .map_err(|e| invalid(e.to_string()))?;
        info!(study = %study_id, round, attempt, parties = parties.len(), "secure aggregation: keys advertised");
        let mut secure = self.secure_lock();
        // A new round (or a retry of this one) replaces what an abandoned one left behind.
        secure.retain(|(study, r), _| *study != study_id || *r > round);
        secure.insert(
            (study_id.clone(), round),
            Party {
                client,
                verifier,
                parties,
                all_must_survive: noise.all_must_survive,
                charge: noise.charge,
                opened: (opened.0, opened.1, first.clone()),
                last: None,
            },
        );
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
        let binding = training_binding(&r.study_id, r.round, sr.scale, &r.model, &r.params);
        let data = self.study(&r.study_id, &r.model)?;
        if let Some(dp) = data.privacy {
            // Distributed DP: the noise of the fewest honest contributors a decoded sum can
            // have (t - c) adds up to the study's σ.
            self.noise_colluders(&sr)
                .map_err(|why| (ErrorCode::CannotServe, why))?;
            let honest = sr.setup.threshold.saturating_sub(sr.colluders).max(1);
            if sr.setup.dimension as usize != r.model.weights.len() {
                return Err((
                    ErrorCode::InvalidContent,
                    "a differentially private round sums model deltas only".into(),
                ));
            }
            // Checked before the budget is charged, so that bogus rounds cannot drain it.
            admit(
                &r.study_id,
                r.round,
                &sr.setup,
                &binding,
                self.config.policy.tolerated_colluders,
                self.revealed.get(&r.study_id, r.round).as_deref(),
            )?;
            sr.setup
                .validate()
                .map_err(|e| (ErrorCode::InvalidContent, e.to_string()))?;
            // Only checked here: the charge is made when the masked input leaves.
            self.check_budget(&r.study_id, &dp.charge())?;
            let u = self.local_update(&r).await?;
            let (vector, noise) = if dp.sgd.is_some() {
                // DP-SGD: every local step was already private; the delta goes as it is.
                let delta = u
                    .weights
                    .iter()
                    .zip(&r.model.weights)
                    .map(|(w, g)| w - g)
                    .collect();
                let noise = Noise {
                    charge: Some(dp.charge()),
                    ..Noise::NONE
                };
                (delta, noise)
            } else {
                let vector = Node::dp_contribution(&r.model.weights, &u.weights, &dp, 0.0, 0)?;
                let sigma = dp.sigma_on_grid(sr.setup.quant.scale_bits, vector.len(), true);
                let noise = Noise {
                    sigma: sigma / f64::from(honest).sqrt(),
                    all_must_survive: false,
                    charge: Some(dp.charge()),
                };
                (vector, noise)
            };
            return self.join_secure(r.study_id, r.round, sr, vector, binding, noise);
        }
        let u = self.local_update(&r).await?;
        Self::check_scale(sr.scale, u.rows)?;
        let vector =
            update_vector::encode(&u.weights, u.train_loss, u.rows, &u.evaluation, sr.scale);
        self.join_secure(r.study_id, r.round, sr, vector, binding, Noise::NONE)
    }

    /// The study's feature statistics under secure aggregation.
    pub(crate) fn statistics_secure(&self, s: StatisticsOpen) -> Reply {
        let data = self.study_data(&s.study_id)?;
        if data.privacy.is_some() {
            return Err((
                ErrorCode::CannotServe,
                "the study is differentially private: this site releases no statistics".into(),
            ));
        }
        let stats = data.feature_stats();
        Self::check_scale(s.secure.scale, stats.count)?;
        let vector = update_vector::encode_statistics(&stats, s.secure.scale);
        let binding = statistics_binding(&s.study_id, s.secure.scale);
        self.join_secure(s.study_id, 0, s.secure, vector, binding, Noise::NONE)
    }

    /// The next step of a secure aggregation in progress.
    pub(crate) fn secure_step(&self, m: SecAggToNode) -> Reply {
        let key = (m.study_id.clone(), m.round);
        let mut secure = self.secure_lock();
        if !secure.contains_key(&key)
            && let Some(answer) = self
                .secure_done
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&m.study_id)
                .filter(|(round, request, _)| *round == m.round && *request == m.message)
                .map(|(_, _, answer)| answer.clone())
        {
            // The last request of a finished aggregation again: the same answer (the same
            // shares, revealed once already).
            return Ok(Message::SecAggFromNode(SecAggFromNode {
                study_id: m.study_id,
                round: m.round,
                message: answer,
            }));
        }
        let party = secure.get_mut(&key).ok_or_else(|| {
            (
                ErrorCode::UnexpectedMessage,
                format!(
                    "no secure aggregation in progress for study '{}' round {}",
                    m.study_id, m.round
                ),
            )
        })?;
        use medfed_protocol::secagg::ServerMessage;
        if let Some((request, answer)) = &party.last
            && *request == m.message
        {
            // The same request again (delivered twice): the same answer.
            return Ok(Message::SecAggFromNode(SecAggFromNode {
                study_id: m.study_id,
                round: m.round,
                message: answer.clone(),
            }));
        }
        let request = m.message.clone();
        let listed = match &m.message {
            ServerMessage::ConsistencyCheck { survivors }
            | ServerMessage::UnmaskRequest { survivors, .. } => Some(survivors.clone()),
            _ => None,
        };
        if party.all_must_survive
            && let Some(survivors) = &listed
            && survivors.len() != party.parties.len()
        {
            let why = format!(
                "{} of the {} sites are in the sum: an exact answer over fewer sites than asked \
                 would differ from an earlier one by those sites, so this site does not reveal",
                survivors.len(),
                party.parties.len(),
            );
            secure.remove(&key);
            warn!(study = %m.study_id, round = m.round, "secure aggregation: left the round: {why}");
            return Err((ErrorCode::CannotServe, why));
        }
        // The names of the sites whose input is in the sum: what a reveal is remembered by.
        let survivor_names: Vec<String> = listed
            .unwrap_or_default()
            .iter()
            .filter_map(|v| party.parties.get(*v as usize).cloned())
            .collect();
        match party
            .client
            .handle(m.message, &party.verifier, &self.signer)
        {
            Ok(answer) => {
                if matches!(answer, ClientMessage::MaskedInput(_))
                    && let Some(charge) = party.charge
                {
                    // The input leaves now (masked): charged durably first, or it does not
                    // leave. Attempts that failed before this point cost nothing.
                    if let Err(refused) = self.spend_budget(&m.study_id, m.round, charge) {
                        secure.remove(&key);
                        return Err(refused);
                    }
                }
                if matches!(answer, ClientMessage::UnmaskShares { .. }) {
                    if secure.remove(&key).is_some() {
                        // Durably, before the shares leave: if it cannot be recorded, they
                        // do not leave. A second sum of this round over other sites (other
                        // survivors, or other parties) would reveal the difference.
                        self.revealed
                            .record(&key.0, key.1, &survivor_names)
                            .map_err(|e| {
                                warn!(study = %m.study_id, round = m.round, "secure aggregation: left the round: {e}");
                                match e {
                                    RecordError::OtherParties(why) => (ErrorCode::CannotServe, why),
                                    RecordError::Write(_) => (
                                        ErrorCode::Internal,
                                        "this site cannot record its reveal, so it does not reveal"
                                            .to_string(),
                                    ),
                                }
                            })?;
                    }
                    self.secure_done
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.0.clone(), (key.1, request, answer.clone()));
                    info!(study = %m.study_id, round = m.round, "secure aggregation: shares revealed; done");
                } else if let Some(party) = secure.get_mut(&key) {
                    party.last = Some((request, answer.clone()));
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

#[cfg(test)]
mod tests {
    use medfed_protocol::quant::QuantParams;
    use medfed_protocol::secagg::Setup;

    use super::*;

    fn setup(label: &str, n: usize, t: u32, binding: [u8; 32]) -> Setup {
        Setup {
            label: label.into(),
            parties: (0..n).map(|i| format!("site-{i}")).collect(),
            threshold: t,
            neighbours: (n - 1) as u32,
            graph_seed: Setup::graph_seed_for(label),
            dimension: 4,
            quant: QuantParams::for_parties(n, 1.0, 16).unwrap(),
            binding,
        }
    }

    #[test]
    fn a_node_refuses_rounds_that_would_expose_it() {
        let b = [1u8; 32];
        let ok = setup("pima/3/2", 3, 3, b);
        assert_eq!(admit("pima", 3, &ok, &b, 1, None), Ok(2));
        let why = |r: Result<u32, (ErrorCode, String)>| r.unwrap_err().1;
        // Another round's model or scale.
        assert!(why(admit("pima", 3, &ok, &[2; 32], 1, None)).contains("does not match"));
        // A label of another study or round, or an attempt beyond the cap.
        assert!(why(admit("other", 3, &ok, &b, 1, None)).contains("is not 'other/3/"));
        assert!(why(admit("pima", 4, &ok, &b, 1, None)).contains("is not 'pima/4/"));
        let many = setup("pima/3/17", 3, 3, b);
        assert!(why(admit("pima", 3, &many, &b, 1, None)).contains("attempt 1..=16"));
        // A threshold one colluding site could defeat.
        let low = setup("pima/3/1", 3, 2, b);
        let err = why(admit("pima", 3, &low, &b, 1, None));
        assert!(err.contains("tolerated_colluders = 1"), "{err}");
        assert!(admit("pima", 3, &low, &b, 0, None).is_ok());
        // A second sum of this round over other sites.
        let first = parties_digest(&ok.parties);
        assert_eq!(admit("pima", 3, &ok, &b, 1, Some(&first)), Ok(2));
        let fewer = setup("pima/3/3", 2, 2, b);
        assert!(why(admit("pima", 3, &fewer, &b, 1, Some(&first))).contains("already revealed"));

        // The memory of reveals survives a restart, forgets nothing (round 0, a study's
        // feature statistics, included), and refuses to record a second reveal of a round
        // with other parties (two attempts admitted at once: only the first reveals).
        let dir = tempfile::tempdir().unwrap();
        let path = RevealedRounds::path(dir.path());
        let memory = RevealedRounds::open(path.clone()).unwrap();
        memory.record("pima", 0, &ok.parties).unwrap();
        memory.record("pima", 3, &ok.parties).unwrap();
        memory.record("other", 1, &["x".to_string()]).unwrap();
        assert!(matches!(
            memory.record("pima", 3, &fewer.parties),
            Err(RecordError::OtherParties(_))
        ));
        memory.record("pima", 3, &ok.parties).unwrap();
        drop(memory);
        let reopened = RevealedRounds::open(path.clone()).unwrap();
        let before = reopened.get("pima", 3);
        assert_eq!(before.as_deref(), Some(first.as_str()));
        assert!(
            why(admit("pima", 3, &fewer, &b, 1, before.as_deref())).contains("already revealed")
        );
        for round in 4..40 {
            reopened.record("pima", round, &ok.parties).unwrap();
        }
        assert_eq!(reopened.get("pima", 0).as_deref(), Some(first.as_str()));
        assert_eq!(reopened.get("pima", 3).as_deref(), Some(first.as_str()));
        assert!(reopened.get("other", 1).is_some());
        std::fs::write(&path, b"not json").unwrap();
        let err = RevealedRounds::open(path).err().unwrap();
        assert!(err.contains("not a list of revealed rounds"), "{err}");
    }
}
