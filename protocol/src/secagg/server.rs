//! The aggregator's side of secure aggregation. It keeps one running sum of masked inputs
//! (never one vector per party: memory O(d + n·k)), relays keys and sealed shares, and in
//! the end removes the masks: self masks of parties whose input it holds, pairwise masks of
//! parties that dropped after sharing their keys.
//!
//! Time is virtual: callers pass `now_ms` and call [`Server::handle_timeout`] when
//! [`Server::poll_timeout`] says; a phase also ends as soon as every expected message is in.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::client::{mask_sign, pair_seed, self_mask_commitment, self_mask_seed};
use super::crypto::{self, KeyPair};
use super::{
    AdvertisedKeys, ClientMessage, Graph, PartyId, RevealedShare, SealedShare, SecAggError,
    ServerMessage, Setup, Verifier, key_signing_message,
};
use crate::quant;

/// The server's phase, in protocol order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Collecting the parties' signed public keys.
    AdvertiseKeys,
    /// Collecting sealed shares of the parties' secrets.
    ShareKeys,
    /// Summing the parties' masked inputs.
    MaskedInput,
    /// Collecting the parties' signatures over the survivor list.
    Consistency,
    /// Collecting revealed shares and removing the masks.
    Unmasking,
    /// Finished: the outcome (the sum or an error) is known.
    Done,
}

impl Phase {
    /// The phase's name in words, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::AdvertiseKeys => "advertise keys",
            Phase::ShareKeys => "share keys",
            Phase::MaskedInput => "masked input",
            Phase::Consistency => "consistency check",
            Phase::Unmasking => "unmasking",
            Phase::Done => "done",
        }
    }
}

/// Largest sealed share accepted (a share plaintext is about 80 bytes).
const MAX_SEALED_SHARE: usize = 512;

/// The server's state machine for one secure aggregation: feed it the parties' messages with
/// [`Server::handle`], send what [`Server::poll_transmit`] yields, and read the sum from
/// [`Server::outcome`].
pub struct Server {
    setup: Setup,
    context: [u8; 32],
    graph: Graph,
    phase: Phase,
    phase_timeout_ms: u64,
    deadline_ms: u64,
    /// U1: parties that advertised keys.
    keys: BTreeMap<PartyId, AdvertisedKeys>,
    /// U2: parties that shared keys, with their sealed shares (emptied once relayed).
    shares: BTreeMap<PartyId, Vec<SealedShare>>,
    /// For each party in U2, where the shares addressed to it are: (sender, index).
    inbox: BTreeMap<PartyId, Vec<(PartyId, usize)>>,
    /// U3: parties whose masked input is in `sum`.
    inputs: BTreeSet<PartyId>,
    /// U4: parties that signed U3 in the consistency round, with their signatures.
    signatures: BTreeMap<PartyId, Vec<u8>>,
    sum: Vec<u64>,
    /// U5: revealed shares, by revealer.
    reveals: BTreeMap<PartyId, (Vec<RevealedShare>, Vec<RevealedShare>)>,
    /// Recipients of the current phase's messages, built one at a time when polled so that
    /// the server never holds all of them at once.
    outbox: VecDeque<PartyId>,
    outcome: Option<Result<Vec<u64>, SecAggError>>,
    /// (owner, holder): shares that disagree with the owner's secret as the other shares
    /// rebuilt it (and its commitment or public key confirmed). The holder revealed a wrong
    /// share, or the owner dealt one: the protocol cannot tell which.
    inconsistent: BTreeSet<(PartyId, PartyId)>,
}

impl Server {
    /// A server in the first phase at `now_ms`, each phase lasting at most `phase_timeout_ms`;
    /// refuses an invalid setup.
    pub fn new(setup: Setup, now_ms: u64, phase_timeout_ms: u64) -> Result<Server, SecAggError> {
        setup.validate()?;
        Ok(Server {
            context: setup.context(),
            graph: setup.graph(),
            setup,
            phase: Phase::AdvertiseKeys,
            phase_timeout_ms,
            deadline_ms: now_ms.saturating_add(phase_timeout_ms),
            keys: BTreeMap::new(),
            shares: BTreeMap::new(),
            inbox: BTreeMap::new(),
            inputs: BTreeSet::new(),
            signatures: BTreeMap::new(),
            sum: Vec::new(),
            reveals: BTreeMap::new(),
            outbox: VecDeque::new(),
            outcome: None,
            inconsistent: BTreeSet::new(),
        })
    }

    /// Shares found inconsistent at unmasking, as (owner, holder): each was tested against
    /// the owner's secret as the other shares rebuilt it and its commitment or public key
    /// confirmed. Either the holder revealed a wrong share or the owner dealt one.
    pub fn inconsistent_shares(&self) -> &BTreeSet<(PartyId, PartyId)> {
        &self.inconsistent
    }

    /// The aggregation's setup.
    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// When the current phase ends if not every expected message arrives.
    pub fn poll_timeout(&self) -> Option<u64> {
        (self.phase != Phase::Done).then_some(self.deadline_ms)
    }

    /// The next message to deliver.
    pub fn poll_transmit(&mut self) -> Option<(PartyId, ServerMessage)> {
        let v = self.outbox.pop_front()?;
        let msg = match self.phase {
            Phase::ShareKeys => ServerMessage::KeyDirectory(
                self.graph
                    .neighbours(v)
                    .iter()
                    .filter_map(|u| self.keys.get(u).cloned())
                    .collect(),
            ),
            Phase::MaskedInput => {
                let list = self.inbox.remove(&v).unwrap_or_default();
                let shares = list
                    .iter()
                    .filter_map(|(from, i)| self.shares.get(from).and_then(|s| s.get(*i)).cloned())
                    .collect();
                if self.outbox.is_empty() {
                    // Every share has been relayed: the ciphertexts are of no further use.
                    self.shares.values_mut().for_each(|s| *s = Vec::new());
                    self.inbox.clear();
                }
                ServerMessage::EncryptedShares(shares)
            }
            Phase::Consistency => ServerMessage::ConsistencyCheck {
                survivors: self.inputs.iter().copied().collect(),
            },
            Phase::Unmasking => {
                // The signatures of v's share holders (all v checks).
                let signatures = self
                    .graph
                    .holders(v)
                    .into_iter()
                    .filter_map(|u| self.signatures.get(&u).map(|s| (u, s.clone())))
                    .collect();
                ServerMessage::UnmaskRequest {
                    survivors: self.inputs.iter().copied().collect(),
                    signatures,
                }
            }
            Phase::AdvertiseKeys | Phase::Done => return None,
        };
        Some((v, msg))
    }

    /// The decoded-modulo sum (words mod 2^bits) once the aggregation has ended, or why it
    /// failed.
    pub fn outcome(&self) -> Option<&Result<Vec<u64>, SecAggError>> {
        self.outcome.as_ref()
    }

    /// Parties whose input is in the sum (U3).
    pub fn contributors(&self) -> &BTreeSet<PartyId> {
        &self.inputs
    }

    fn expected(&self) -> usize {
        match self.phase {
            Phase::AdvertiseKeys => self.setup.parties.len(),
            Phase::ShareKeys => self.keys.len(),
            Phase::MaskedInput => self.shares.len(),
            Phase::Consistency => self.inputs.len(),
            Phase::Unmasking => self.signatures.len(),
            Phase::Done => 0,
        }
    }

    fn received(&self) -> usize {
        match self.phase {
            Phase::AdvertiseKeys => self.keys.len(),
            Phase::ShareKeys => self.shares.len(),
            Phase::MaskedInput => self.inputs.len(),
            Phase::Consistency => self.signatures.len(),
            Phase::Unmasking => self.reveals.len(),
            Phase::Done => 0,
        }
    }

    /// Takes one party's message. A rejected message leaves the aggregation as it was: the
    /// party is simply counted as having sent nothing in this phase.
    pub fn handle(
        &mut self,
        now_ms: u64,
        from: PartyId,
        msg: ClientMessage,
        verifier: &dyn Verifier,
    ) -> Result<(), SecAggError> {
        if from as usize >= self.setup.parties.len() {
            return Err(SecAggError::UnknownParty(from));
        }
        let wrong_phase = SecAggError::WrongPhase {
            from,
            kind: msg.kind(),
            phase: self.phase.name(),
        };
        match (self.phase, msg) {
            (Phase::AdvertiseKeys, ClientMessage::AdvertiseKeys(keys)) => {
                self.take_keys(from, keys, verifier)?;
            }
            (Phase::ShareKeys, ClientMessage::ShareKeys(sealed)) => {
                self.take_shares(from, sealed)?;
            }
            (Phase::MaskedInput, ClientMessage::MaskedInput(bytes)) => {
                self.take_input(from, &bytes)?;
            }
            (Phase::Consistency, ClientMessage::SurvivorsSigned(signature)) => {
                self.take_signature(from, signature, verifier)?;
            }
            (
                Phase::Unmasking,
                ClientMessage::UnmaskShares {
                    self_mask,
                    mask_key,
                },
            ) => self.take_reveals(from, self_mask, mask_key)?,
            _ => return Err(wrong_phase),
        }
        if self.received() >= self.expected() {
            self.advance(now_ms);
        }
        Ok(())
    }

    /// Ends the current phase if its deadline has passed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.phase != Phase::Done && now_ms >= self.deadline_ms {
            self.advance(now_ms);
        }
    }

    /// Ends the current phase now: the driver knows no further message can arrive in it
    /// (every party has answered or its connection is gone).
    pub fn close_phase(&mut self, now_ms: u64) {
        if self.phase != Phase::Done {
            self.advance(now_ms);
        }
    }

    /// Aborts the aggregation (e.g. the study was cancelled).
    pub fn abort(&mut self, reason: &str) {
        self.finish(Err(SecAggError::Aborted(reason.to_string())));
    }

    fn take_keys(
        &mut self,
        from: PartyId,
        keys: AdvertisedKeys,
        verifier: &dyn Verifier,
    ) -> Result<(), SecAggError> {
        if keys.party != from {
            return Err(SecAggError::Invalid {
                from,
                why: format!("keys claim to be party {}'s", keys.party),
            });
        }
        if self.keys.contains_key(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        // A key of small order would make every honest neighbour abort later; refuse it now
        // so that the party is simply left out.
        if super::crypto::is_weak_public_key(&keys.c_pk)
            || super::crypto::is_weak_public_key(&keys.s_pk)
        {
            return Err(SecAggError::Invalid {
                from,
                why: "a public key of small order".into(),
            });
        }
        let name = &self.setup.parties[from as usize];
        if keys.c_pk == keys.s_pk
            || !verifier.verify(
                name,
                &key_signing_message(&self.context, name, &keys),
                &keys.signature,
            )
        {
            return Err(SecAggError::ForgedSignature { party: from });
        }
        self.keys.insert(from, keys);
        Ok(())
    }

    fn take_shares(&mut self, from: PartyId, sealed: Vec<SealedShare>) -> Result<(), SecAggError> {
        if !self.keys.contains_key(&from) {
            return Err(SecAggError::Invalid {
                from,
                why: "shared keys without advertising any".into(),
            });
        }
        if self.shares.contains_key(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let expected: BTreeSet<PartyId> = self
            .graph
            .neighbours(from)
            .iter()
            .copied()
            .filter(|v| self.keys.contains_key(v))
            .collect();
        if sealed.len() != expected.len() {
            return Err(SecAggError::WrongLength {
                from,
                what: "shares",
                got: sealed.len(),
                expected: expected.len(),
            });
        }
        let mut seen = BTreeSet::new();
        for s in &sealed {
            if s.from != from
                || !expected.contains(&s.to)
                || !seen.insert(s.to)
                || s.ciphertext.len() > MAX_SEALED_SHARE
            {
                return Err(SecAggError::Invalid {
                    from,
                    why: format!("bad share for party {}", s.to),
                });
            }
        }
        self.shares.insert(from, sealed);
        Ok(())
    }

    fn take_input(&mut self, from: PartyId, bytes: &[u8]) -> Result<(), SecAggError> {
        if !self.shares.contains_key(&from) {
            return Err(SecAggError::Invalid {
                from,
                why: "sent input without sharing its keys".into(),
            });
        }
        if self.inputs.contains(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let d = self.setup.dimension as usize;
        let bits = self.setup.quant.modulus_bits;
        let got = bytes.len() / self.setup.quant.word_bytes();
        // Added straight from the received bytes: no per-party vector is ever held.
        if bytes.len() != d * self.setup.quant.word_bytes()
            || !quant::add_packed(&mut self.sum, bytes, bits)
        {
            return Err(SecAggError::WrongLength {
                from,
                what: "masked input",
                got,
                expected: d,
            });
        }
        self.inputs.insert(from);
        Ok(())
    }

    fn take_signature(
        &mut self,
        from: PartyId,
        signature: Vec<u8>,
        verifier: &dyn Verifier,
    ) -> Result<(), SecAggError> {
        if !self.inputs.contains(&from) {
            return Err(SecAggError::Invalid {
                from,
                why: "signed the survivors without having sent input".into(),
            });
        }
        if self.signatures.contains_key(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let survivors: Vec<PartyId> = self.inputs.iter().copied().collect();
        let name = &self.setup.parties[from as usize];
        let message = super::survivors_signing_message(&self.context, name, &survivors);
        if !verifier.verify(name, &message, &signature) {
            return Err(SecAggError::ForgedSignature { party: from });
        }
        self.signatures.insert(from, signature);
        Ok(())
    }

    fn take_reveals(
        &mut self,
        from: PartyId,
        self_mask: Vec<RevealedShare>,
        mask_key: Vec<RevealedShare>,
    ) -> Result<(), SecAggError> {
        if !self.signatures.contains_key(&from) {
            return Err(SecAggError::Invalid {
                from,
                why: "revealed shares without having signed the survivors".into(),
            });
        }
        if self.reveals.contains_key(&from) {
            return Err(SecAggError::Duplicate(from));
        }
        let mut owners = BTreeSet::new();
        for (list, want_survivor) in [(&self_mask, true), (&mask_key, false)] {
            for r in list {
                let ok = self.shares.contains_key(&r.owner)
                    && self.inputs.contains(&r.owner) == want_survivor
                    && self
                        .graph
                        .share_index(r.owner, from)
                        .is_some_and(|x| r.share.first() == Some(&x))
                    && r.share.len() == 33
                    && owners.insert(r.owner);
                if !ok {
                    return Err(SecAggError::Invalid {
                        from,
                        why: format!("unexpected share of party {}", r.owner),
                    });
                }
            }
        }
        self.reveals.insert(from, (self_mask, mask_key));
        Ok(())
    }

    fn finish(&mut self, outcome: Result<Vec<u64>, SecAggError>) {
        self.phase = Phase::Done;
        self.outbox.clear();
        self.outcome = Some(outcome);
    }

    fn advance(&mut self, now_ms: u64) {
        let need = self.setup.threshold as usize;
        let got = self.received();
        if got < need {
            let phase = self.phase.name();
            return self.finish(Err(SecAggError::TooFewSurvivors { phase, got, need }));
        }
        self.deadline_ms = now_ms.saturating_add(self.phase_timeout_ms);
        match self.phase {
            Phase::AdvertiseKeys => {
                self.outbox = self.keys.keys().copied().collect();
                self.phase = Phase::ShareKeys;
            }
            Phase::ShareKeys => {
                let mut inbox: BTreeMap<PartyId, Vec<(PartyId, usize)>> =
                    self.shares.keys().map(|&v| (v, Vec::new())).collect();
                for (&from, list) in &self.shares {
                    for (i, s) in list.iter().enumerate() {
                        if let Some(slot) = inbox.get_mut(&s.to) {
                            slot.push((from, i));
                        }
                    }
                }
                self.outbox = inbox.keys().copied().collect();
                self.inbox = inbox;
                self.sum = vec![0; self.setup.dimension as usize];
                self.phase = Phase::MaskedInput;
            }
            Phase::MaskedInput => {
                self.outbox = self.inputs.iter().copied().collect();
                self.phase = Phase::Consistency;
            }
            Phase::Consistency => {
                self.outbox = self.signatures.keys().copied().collect();
                self.phase = Phase::Unmasking;
            }
            Phase::Unmasking => {
                let result = self.unmask();
                self.finish(result);
            }
            Phase::Done => {}
        }
    }

    /// `shares` with those of holders already found inconsistent moved to the end, so that
    /// the first `t` tried are likely right.
    fn suspects_last(&self, shares: &[(PartyId, Vec<u8>)]) -> Vec<(PartyId, Vec<u8>)> {
        let suspect = |holder: PartyId| self.inconsistent.iter().any(|&(_, h)| h == holder);
        let mut ordered: Vec<(PartyId, Vec<u8>)> = shares.to_vec();
        ordered.sort_by_key(|(holder, _)| suspect(*holder));
        ordered
    }

    /// Rebuilds the secrets the survivors revealed and removes every mask from the sum.
    fn unmask(&mut self) -> Result<Vec<u64>, SecAggError> {
        let t = self.setup.threshold as usize;
        let bits = self.setup.quant.modulus_bits;
        // Each owner's revealed shares, with the party that revealed each.
        let mut self_mask: BTreeMap<PartyId, Vec<(PartyId, Vec<u8>)>> = BTreeMap::new();
        let mut mask_key: BTreeMap<PartyId, Vec<(PartyId, Vec<u8>)>> = BTreeMap::new();
        for (&holder, (sm, mk)) in &self.reveals {
            for r in sm {
                self_mask
                    .entry(r.owner)
                    .or_default()
                    .push((holder, r.share.clone()));
            }
            for r in mk {
                mask_key
                    .entry(r.owner)
                    .or_default()
                    .push((holder, r.share.clone()));
            }
        }
        // Extra Shamir reconstructions allowed in all, this round, to get around wrong
        // shares (an honest round needs none), and, apart, to find which shares were wrong.
        let mut budget = Budget {
            search: 8 * MAX_REBUILDS,
            identify: 8 * MAX_REBUILDS,
        };
        let mut sum = std::mem::take(&mut self.sum);
        // Every mask to take out, as (seed, sign); applied at the end, in parallel.
        let mut masks: Vec<([u8; 32], i8)> = Vec::new();
        for &u in &self.inputs {
            let shares = self_mask.get(&u).map_or(&[][..], Vec::as_slice);
            if shares.len() < t {
                return Err(SecAggError::Unrecoverable {
                    owner: u,
                    got: shares.len(),
                    need: t,
                });
            }
            let commitment = self.keys[&u].self_mask_commitment;
            let shares = self.suspects_last(shares);
            let rebuilt = rebuild(&shares, t, &mut budget, |seed| {
                self_mask_commitment(seed, &self.context).is_ok_and(|c| c == commitment)
            });
            self.inconsistent
                .extend(rebuilt.wrong.iter().map(|&holder| (u, holder)));
            let seed = rebuilt.secret.ok_or(SecAggError::Unrebuildable {
                owner: u,
                what: "self-mask seed",
                gave_up: rebuilt.gave_up,
            })?;
            masks.push((self_mask_seed(&seed, &self.context)?, -1));
        }
        let dropped: Vec<PartyId> = self
            .shares
            .keys()
            .copied()
            .filter(|u| !self.inputs.contains(u))
            .collect();
        for u in dropped {
            let shares = mask_key.get(&u).map_or(&[][..], Vec::as_slice);
            if shares.len() < t {
                return Err(SecAggError::Unrecoverable {
                    owner: u,
                    got: shares.len(),
                    need: t,
                });
            }
            let advertised = self.keys[&u].s_pk;
            let shares = self.suspects_last(shares);
            let rebuilt = rebuild(&shares, t, &mut budget, |secret| {
                <[u8; 32]>::try_from(secret)
                    .is_ok_and(|b| KeyPair::from_secret(b).public == advertised)
            });
            self.inconsistent
                .extend(rebuilt.wrong.iter().map(|&holder| (u, holder)));
            let secret = rebuilt
                .secret
                .and_then(|secret| <[u8; 32]>::try_from(secret).ok())
                .ok_or(SecAggError::Unrebuildable {
                    owner: u,
                    what: "mask key",
                    gave_up: rebuilt.gave_up,
                })?;
            let pair = KeyPair::from_secret(secret);
            for &v in self.graph.neighbours(u) {
                if self.inputs.contains(&v) {
                    let shared = crypto::agree(&pair.secret, &self.keys[&v].s_pk)?;
                    // v applied mask_sign(v, u) times this mask; take it back out.
                    masks.push((pair_seed(&shared, &self.context, u, v)?, -mask_sign(v, u)));
                }
            }
        }
        crypto::apply_masks_parallel(&mut sum, &masks, bits);
        let mask = self.setup.quant.mask();
        sum.iter_mut().for_each(|w| *w &= mask);
        Ok(sum)
    }
}

/// Reconstructions allowed per secret while searching for wrong shares.
const MAX_REBUILDS: usize = 512;

/// A rebuilt secret (if any subset of the shares passed its check), the parties whose
/// shares disagree with it, and whether the search stopped for lack of budget.
struct Rebuilt {
    secret: Option<Vec<u8>>,
    wrong: Vec<PartyId>,
    gave_up: bool,
}

/// Reconstructions left this round: to get around wrong shares, and to find them.
struct Budget {
    search: usize,
    identify: usize,
}

/// Rebuilds a secret from `t` of `shares` (each with the party that revealed it) that
/// passes `check` (its commitment or public key): the first `t` shares, else leaving out
/// one share at a time, else two, up to [`MAX_REBUILDS`] tries and while the round's search
/// budget lasts. So one wrong share among more than `t` is always got around, and two where
/// the neighbourhood is small. When the first `t` did not pass, each share outside the
/// subset that did is then tested in place of one of the subset's: one that changes the
/// secret is inconsistent (its Lagrange coefficient is never 0), and its party returned.
fn rebuild(
    shares: &[(PartyId, Vec<u8>)],
    t: usize,
    budget: &mut Budget,
    check: impl Fn(&[u8]) -> bool,
) -> Rebuilt {
    let m = shares.len();
    let combine = |indices: &[usize]| {
        let subset: Vec<Vec<u8>> = indices.iter().map(|&i| shares[i].1.clone()).collect();
        crypto::shamir_combine(&subset).ok()
    };
    let first: Vec<usize> = (0..m.min(t)).collect();
    if first.len() == t
        && let Some(secret) = combine(&first).filter(|s| check(s))
    {
        // The honest round: any other share did not touch the sum.
        return Rebuilt {
            secret: Some(secret),
            wrong: Vec::new(),
            gave_up: false,
        };
    }
    // Leaving out a share beyond the first t + 1 changes nothing that leaving out fewer
    // did not already try.
    let reach = m.min(t + 1);
    let singles = (0..reach).map(|i| vec![i]);
    let pairs = (0..reach).flat_map(|i| (i + 1..reach).map(move |j| vec![i, j]));
    let mut gave_up = false;
    let found = singles
        .chain(pairs)
        .filter(|left_out| m - left_out.len() >= t)
        .take(MAX_REBUILDS)
        .find_map(|left_out| {
            if budget.search == 0 {
                gave_up = true;
                return None;
            }
            budget.search -= 1;
            let subset: Vec<usize> = (0..m).filter(|i| !left_out.contains(i)).take(t).collect();
            let secret = combine(&subset).filter(|s| check(s))?;
            Some((subset, secret))
        });
    let Some((subset, secret)) = found else {
        return Rebuilt {
            secret: None,
            wrong: Vec::new(),
            gave_up,
        };
    };
    let wrong = (0..m)
        .filter(|i| !subset.contains(i))
        .filter(|&j| {
            if budget.identify == 0 {
                // Not named; it did not touch the sum, which is right.
                return false;
            }
            budget.identify -= 1;
            let mut swapped = subset.clone();
            swapped[0] = j;
            combine(&swapped).is_some_and(|s| s != secret)
        })
        .map(|j| shares[j].0)
        .collect();
    Rebuilt {
        secret: Some(secret),
        wrong,
        gave_up: false,
    }
}
