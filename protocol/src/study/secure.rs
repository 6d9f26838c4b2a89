//! One secure aggregation inside a study: the [`secagg::Server`](crate::secagg::Server)
//! state machine, the requests that carry its messages to the sites, and the answers back.
//! Used for every secure training round, the final secure evaluation and the study's
//! secure feature statistics.

use std::collections::BTreeMap;

use crate::messages::{SecAggFromNode, SecAggToNode, SecureRound};
use crate::quant::QuantParams;
use crate::secagg::{
    PartyId, SecAggError, Server, ServerMessage, Setup, Verifier, choose_neighbours,
};
use crate::{ErrorCode, Message};

use super::{Answer, Failure, Out, RequestId, StudyConfig};

/// Up to this many parties every pair masks; above it, SecAgg+ neighbourhoods.
pub const COMPLETE_GRAPH_UP_TO: usize = 32;

/// The setup of a secure aggregation among `sites` of a sum of `dimension` entries: the
/// neighbourhood size `k` and threshold `t` for the study's quorum and tolerated colluders.
/// A decoded sum has at least `t` contributors, and `t` is at most the holders of one
/// site's secrets (`k + 1`): the neighbourhoods widen until a sum below the quorum cannot be
/// decoded at all (rather than decoding one and retrying: two sums over overlapping sites
/// would reveal their difference).
pub fn setup_for(
    cfg: &StudyConfig,
    label: String,
    sites: Vec<String>,
    dimension: usize,
    quant: QuantParams,
    binding: [u8; 32],
) -> Result<Setup, String> {
    let sa = &cfg.secure_aggregation;
    let n = sites.len();
    if n < 2 {
        return Err(format!("{n} site(s) cannot run secure aggregation"));
    }
    let (mut k, t) = if n <= COMPLETE_GRAPH_UP_TO {
        ((n - 1) as u32, 0)
    } else {
        choose_neighbours(n, sa.expected_dropout, sa.expected_corrupt, 20, 30)
    };
    let quorum = cfg.min_sites.max(2) as u32;
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

/// A secure aggregation in progress.
pub(crate) struct SecureSum {
    server: Server,
    verifier: Box<dyn Verifier + Send>,
    /// Requests awaiting an answer, by the party asked.
    waiting: BTreeMap<RequestId, PartyId>,
    /// Why sites left, for an error that says so.
    refusals: Vec<String>,
    /// `1 / S`, S the training rows of the parties asked.
    pub scale: f64,
    /// When it started (ms), for the contributors' latency.
    pub started: u64,
    study: String,
    round: u32,
    timeout_ms: u64,
    /// The survivors the unmasking asked shares for, once it did: sites that may have
    /// revealed shares for this round, which they then do again only with exactly these.
    pub unmasking: Option<Vec<String>>,
}

/// How a secure aggregation ended.
pub(crate) struct SecureOutcome {
    /// The decoded sum (value units).
    pub sum: Vec<f64>,
    /// The sites whose vectors are in it.
    pub sites: Vec<String>,
}

impl SecureSum {
    /// Starts a secure aggregation: `open` builds each party's first request from the
    /// round's [`SecureRound`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        out: &mut Out,
        now: u64,
        study: &str,
        round: u32,
        setup: Setup,
        certificates: Vec<Vec<u8>>,
        colluders: u32,
        scale: f64,
        verifier: Box<dyn Verifier + Send>,
        timeout_ms: u64,
        open: impl Fn(SecureRound) -> Message,
    ) -> Result<SecureSum, String> {
        let server = Server::new(setup.clone(), now, timeout_ms).map_err(|e| e.to_string())?;
        let first = open(SecureRound {
            setup: setup.clone(),
            certificates,
            scale,
            colluders,
        });
        let mut waiting = BTreeMap::new();
        for (v, site) in setup.parties.iter().enumerate() {
            let id = out.request(site, first.clone(), timeout_ms);
            waiting.insert(id, v as PartyId);
        }
        Ok(SecureSum {
            server,
            verifier,
            waiting,
            refusals: Vec::new(),
            scale,
            started: now,
            study: study.to_string(),
            round,
            timeout_ms,
            unmasking: None,
        })
    }

    fn party(&self, v: PartyId) -> &str {
        self.server
            .setup()
            .parties
            .get(v as usize)
            .map_or("?", String::as_str)
    }

    /// Whether `id` is one of its requests.
    pub(crate) fn owns(&self, id: RequestId) -> bool {
        self.waiting.contains_key(&id)
    }

    /// An answer to one of its requests.
    pub(crate) fn handle_answer(&mut self, out: &mut Out, now: u64, id: RequestId, answer: Answer) {
        let Some(v) = self.waiting.remove(&id) else {
            return;
        };
        let site = self.party(v).to_string();
        match answer {
            Ok(Message::SecAggFromNode(SecAggFromNode {
                study_id,
                round,
                message,
            })) if study_id == self.study && round == self.round => {
                let kind = message.kind();
                if let Err(e) = self.server.handle(now, v, message, &*self.verifier) {
                    out.note(format!("secure aggregation: {site}'s {kind} refused: {e}"));
                }
            }
            Ok(other) => out.note(format!(
                "secure aggregation: {site} answered with a {}",
                other.kind()
            )),
            Err(Failure::Refused { reason, .. }) => {
                self.refusals.push(format!("{site} refused: {reason}"));
            }
            Err(Failure::Transport(e)) => {
                self.refusals.push(format!("{site} did not answer: {e}"));
            }
        }
        self.pump(out, now);
    }

    /// Sends what the server has to send; closes a phase every request of which is settled.
    fn pump(&mut self, out: &mut Out, now: u64) {
        loop {
            while let Some((v, message)) = self.server.poll_transmit() {
                let site = self.party(v).to_string();
                if let ServerMessage::UnmaskRequest { survivors, .. } = &message
                    && self.unmasking.is_none()
                {
                    let names = survivors
                        .iter()
                        .map(|u| self.party(*u).to_string())
                        .collect();
                    self.unmasking = Some(names);
                }
                let msg = Message::SecAggToNode(SecAggToNode {
                    study_id: self.study.clone(),
                    round: self.round,
                    message,
                });
                let id = out.request(&site, msg, self.timeout_ms);
                self.waiting.insert(id, v);
            }
            if self.server.outcome().is_some() || !self.waiting.is_empty() {
                return;
            }
            // Every request of this phase has been answered or has failed.
            self.server.close_phase(now);
        }
    }

    /// When it next needs the time.
    pub(crate) fn poll_timeout(&self) -> Option<u64> {
        if self.server.outcome().is_some() {
            None
        } else {
            self.server.poll_timeout()
        }
    }

    pub(crate) fn handle_timeout(&mut self, out: &mut Out, now: u64) {
        if self.server.poll_timeout().is_some_and(|t| now >= t) {
            self.server.handle_timeout(now);
            self.pump(out, now);
        }
    }

    /// The result, once there is one: the decoded sum and its contributors, or why not.
    pub(crate) fn outcome(&self) -> Option<Result<SecureOutcome, String>> {
        let setup = self.server.setup();
        let name = |v: &PartyId| setup.parties[*v as usize].clone();
        match self.server.outcome()? {
            Ok(sum) => Some(Ok(SecureOutcome {
                sum: setup.quant.decode(sum),
                sites: self.server.contributors().iter().map(name).collect(),
            })),
            Err(e) => Some(Err(failure_words(e, &setup.parties, &self.refusals))),
        }
    }

    /// The shares found inconsistent with the rebuilt secrets, named (the holder revealed a
    /// wrong share, or the owner dealt one).
    pub(crate) fn inconsistent(&self) -> Vec<String> {
        inconsistent_words(&self.server)
    }

    /// Stops it (the study stopped): no more requests.
    pub(crate) fn abort(&mut self) {
        self.server.abort("the study stopped");
        self.waiting.clear();
    }
}

/// Why a secure aggregation over `parties` failed, in words, with why sites left
/// (`refusals`): the one wording of the coordinator's sums and a statistics study's.
pub fn failure_words(e: &SecAggError, parties: &[String], refusals: &[String]) -> String {
    let name = |v: &PartyId| parties.get(*v as usize).map_or("?", String::as_str);
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
    if refusals.is_empty() {
        format!("secure aggregation failed: {e}")
    } else {
        format!("secure aggregation failed: {e}; {}", refusals.join("; "))
    }
}

/// The shares of `server`'s aggregation found inconsistent with the rebuilt secrets, named
/// ("b's share of a's secret"): the holder revealed a wrong share, or the owner dealt one.
pub fn inconsistent_words(server: &Server) -> Vec<String> {
    let parties = &server.setup().parties;
    let name = |v: &PartyId| parties.get(*v as usize).map_or("?", String::as_str);
    server
        .inconsistent_shares()
        .iter()
        .map(|(owner, holder)| format!("{}'s share of {}'s secret", name(holder), name(owner)))
        .collect()
}

/// The error code of a refusal, for the sake of a `Failure` built by a driver.
pub fn refused(code: ErrorCode, reason: impl Into<String>) -> Failure {
    Failure::Refused {
        code,
        reason: reason.into(),
    }
}
