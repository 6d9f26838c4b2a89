//! The party's side of secure aggregation.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use super::crypto::{self, KeyPair};
use super::{
    AdvertisedKeys, ClientMessage, Graph, PartyId, RevealedShare, SealedShare, SecAggError,
    ServerMessage, Setup, Signer, Verifier, key_signing_message,
};
use crate::quant;

/// The plaintext of a [`SealedShare`].
#[derive(Serialize, Deserialize)]
struct SharePlaintext {
    from: PartyId,
    to: PartyId,
    mask_key: Vec<u8>,
    self_mask: Vec<u8>,
}

enum State {
    /// Keys advertised; waiting for the key directory.
    Advertised,
    /// Shares sent; waiting for the shares held for us.
    Shared {
        keys: BTreeMap<PartyId, AdvertisedKeys>,
        /// X25519 agreements on the c keys, reused to open the shares sent to us.
        c_shared: BTreeMap<PartyId, [u8; 32]>,
    },
    /// Masked input sent; waiting for the survivor list to sign.
    SentInput {
        held: BTreeMap<PartyId, (Vec<u8>, Vec<u8>)>,
    },
    /// Signed this survivor list (the only one it ever signs); waiting for the unmask
    /// request with the holders' signatures over it.
    Signed {
        held: BTreeMap<PartyId, (Vec<u8>, Vec<u8>)>,
        survivors: Vec<PartyId>,
    },
    Done,
}

/// One party of one aggregation.
pub struct Client {
    setup: Setup,
    context: [u8; 32],
    me: PartyId,
    graph: Graph,
    c: KeyPair,
    s: KeyPair,
    self_seed: [u8; 32],
    input: Vec<u64>,
    rng: ChaCha20Rng,
    /// This party's own shares of its secrets (it is one of their holders).
    own_shares: Option<(Vec<u8>, Vec<u8>)>,
    state: State,
}

pub(crate) fn pair_seed(
    shared: &[u8; 32],
    context: &[u8; 32],
    u: PartyId,
    v: PartyId,
) -> Result<[u8; 32], SecAggError> {
    let (lo, hi) = (u.min(v), u.max(v));
    crypto::derive(
        shared,
        context,
        b"pairwise-mask",
        &[&lo.to_be_bytes(), &hi.to_be_bytes()],
    )
}

pub(crate) fn self_mask_seed(
    self_seed: &[u8],
    context: &[u8; 32],
) -> Result<[u8; 32], SecAggError> {
    crypto::derive(self_seed, context, b"self-mask", &[])
}

/// What a party publishes of its self-mask seed: binding (HKDF-SHA256 of a 32-byte random
/// seed) and, under another label than the mask's seed, revealing nothing of the mask.
pub(crate) fn self_mask_commitment(
    self_seed: &[u8],
    context: &[u8; 32],
) -> Result<[u8; 32], SecAggError> {
    crypto::derive(self_seed, context, b"self-mask-commitment", &[])
}

fn share_key(
    shared: &[u8; 32],
    context: &[u8; 32],
    from: PartyId,
    to: PartyId,
) -> Result<[u8; 32], SecAggError> {
    crypto::derive(
        shared,
        context,
        b"share-key",
        &[&from.to_be_bytes(), &to.to_be_bytes()],
    )
}

fn share_aad(context: &[u8; 32], from: PartyId, to: PartyId) -> Vec<u8> {
    let mut aad = context.to_vec();
    aad.extend_from_slice(&from.to_be_bytes());
    aad.extend_from_slice(&to.to_be_bytes());
    aad
}

/// +1 if `u` adds the pairwise mask it shares with `v`, -1 if it subtracts it.
pub(crate) fn mask_sign(u: PartyId, v: PartyId) -> i8 {
    if u < v { 1 } else { -1 }
}

impl Client {
    /// Quantizes `input`, makes this round's keys, and returns the signed key advertisement.
    /// `seed` must come from a cryptographic generator (tests pass fixed seeds).
    pub fn new(
        setup: Setup,
        me: PartyId,
        input: &[f64],
        signer: &dyn Signer,
        seed: [u8; 32],
    ) -> Result<(Client, ClientMessage), SecAggError> {
        Client::new_noised(setup, me, input, 0.0, signer, seed)
    }

    /// As [`Client::new`], with this party's share of the differential-privacy noise: a
    /// discrete Gaussian of standard deviation at least `noise_sigma` (value units) is added
    /// to the quantized input, on its grid ([`QuantParams::encode_noised`]), so the masked
    /// words carry it exactly.
    ///
    /// [`QuantParams::encode_noised`]: crate::quant::QuantParams::encode_noised
    pub fn new_noised(
        setup: Setup,
        me: PartyId,
        input: &[f64],
        noise_sigma: f64,
        signer: &dyn Signer,
        seed: [u8; 32],
    ) -> Result<(Client, ClientMessage), SecAggError> {
        setup.validate()?;
        let name = setup
            .parties
            .get(me as usize)
            .ok_or(SecAggError::UnknownParty(me))?
            .clone();
        if input.len() != setup.dimension as usize {
            return Err(SecAggError::WrongLength {
                from: me,
                what: "input",
                got: input.len(),
                expected: setup.dimension as usize,
            });
        }
        let mut rng = ChaCha20Rng::from_seed(seed);
        let context = setup.context();
        let c = KeyPair::generate(&mut rng);
        let s = KeyPair::generate(&mut rng);
        let mut self_seed = [0u8; 32];
        rng.fill_bytes(&mut self_seed);
        let input = setup
            .quant
            .encode_noised(input, noise_sigma, setup.parties.len(), &mut rng)
            .map_err(|e| SecAggError::Noise(e.to_string()))?;
        let mut advert = AdvertisedKeys {
            party: me,
            c_pk: c.public,
            s_pk: s.public,
            self_mask_commitment: self_mask_commitment(&self_seed, &context)?,
            signature: Vec::new(),
        };
        advert.signature = signer.sign(&key_signing_message(&context, &name, &advert));
        let graph = setup.local_graph(me);
        let client = Client {
            setup,
            context,
            me,
            graph,
            c,
            s,
            self_seed,
            input,
            rng,
            own_shares: None,
            state: State::Advertised,
        };
        Ok((client, ClientMessage::AdvertiseKeys(advert)))
    }

    /// This client's party id: its index in the setup's `parties`.
    pub fn me(&self) -> PartyId {
        self.me
    }

    fn inconsistent(&self, why: impl Into<String>) -> SecAggError {
        SecAggError::Inconsistent(why.into())
    }

    /// Handles the server's next message and returns the answer to send. `verifier`
    /// checks other parties' signatures; `signer` signs this party's survivor list.
    pub fn handle(
        &mut self,
        msg: ServerMessage,
        verifier: &dyn Verifier,
        signer: &dyn Signer,
    ) -> Result<ClientMessage, SecAggError> {
        let state = std::mem::replace(&mut self.state, State::Done);
        let result = match (state, msg) {
            (State::Advertised, ServerMessage::KeyDirectory(entries)) => {
                self.share_keys(entries, verifier)
            }
            (State::Shared { keys, c_shared }, ServerMessage::EncryptedShares(shares)) => {
                self.masked_input(&keys, &c_shared, shares)
            }
            (State::SentInput { held }, ServerMessage::ConsistencyCheck { survivors }) => {
                self.sign_survivors(held, survivors, signer)
            }
            (
                State::Signed { held, survivors },
                ServerMessage::UnmaskRequest {
                    survivors: listed,
                    signatures,
                },
            ) => {
                if listed != survivors {
                    Err(self.inconsistent(
                        "the unmask request lists other survivors than the list this party signed",
                    ))
                } else {
                    self.check_signatures(&survivors, &signatures, verifier)
                        .and_then(|()| self.unmask(&held, &survivors))
                }
            }
            (_, msg) => Err(self.inconsistent(format!("unexpected {} message", msg.kind()))),
        };
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn share_keys(
        &mut self,
        entries: Vec<AdvertisedKeys>,
        verifier: &dyn Verifier,
    ) -> Result<ClientMessage, SecAggError> {
        let mut keys = BTreeMap::new();
        for e in entries {
            if e.party == self.me {
                continue;
            }
            if !self.graph.are_neighbours(self.me, e.party) {
                return Err(self.inconsistent(format!(
                    "keys of party {}, which is not a neighbour",
                    e.party
                )));
            }
            let name = &self.setup.parties[e.party as usize];
            if e.c_pk == e.s_pk
                || !verifier.verify(
                    name,
                    &key_signing_message(&self.context, name, &e),
                    &e.signature,
                )
            {
                return Err(SecAggError::ForgedSignature { party: e.party });
            }
            if keys.insert(e.party, e).is_some() {
                return Err(self.inconsistent("a party's keys appear twice"));
            }
        }
        let need = self.setup.threshold as usize;
        if keys.len() + 1 < need {
            return Err(SecAggError::TooFewSurvivors {
                phase: "advertise keys",
                got: keys.len() + 1,
                need,
            });
        }
        let holders = self.graph.holders(self.me);
        let t = self.setup.threshold as usize;
        let key_shares =
            crypto::shamir_split(&self.s.secret.to_bytes(), t, holders.len(), &mut self.rng)?;
        let seed_shares = crypto::shamir_split(&self.self_seed, t, holders.len(), &mut self.rng)?;
        let mut sealed = Vec::with_capacity(keys.len());
        let mut c_shared = BTreeMap::new();
        for (i, &v) in holders.iter().enumerate() {
            if v == self.me {
                self.own_shares = Some((key_shares[i].clone(), seed_shares[i].clone()));
                continue;
            }
            let Some(peer) = keys.get(&v) else { continue };
            let plain = SharePlaintext {
                from: self.me,
                to: v,
                mask_key: key_shares[i].clone(),
                self_mask: seed_shares[i].clone(),
            };
            let bytes =
                postcard::to_allocvec(&plain).map_err(|e| SecAggError::Sharing(e.to_string()))?;
            let shared = crypto::agree(&self.c.secret, &peer.c_pk)?;
            c_shared.insert(v, shared);
            let key = share_key(&shared, &self.context, self.me, v)?;
            sealed.push(SealedShare {
                from: self.me,
                to: v,
                ciphertext: crypto::seal_once(&key, &share_aad(&self.context, self.me, v), &bytes)?,
            });
        }
        self.state = State::Shared { keys, c_shared };
        Ok(ClientMessage::ShareKeys(sealed))
    }

    fn masked_input(
        &mut self,
        keys: &BTreeMap<PartyId, AdvertisedKeys>,
        c_shared: &BTreeMap<PartyId, [u8; 32]>,
        shares: Vec<SealedShare>,
    ) -> Result<ClientMessage, SecAggError> {
        let mut held = BTreeMap::new();
        for sh in shares {
            let peer = keys.get(&sh.from).ok_or_else(|| {
                self.inconsistent(format!(
                    "a share from party {}, which sent no keys",
                    sh.from
                ))
            })?;
            if sh.to != self.me {
                return Err(self.inconsistent(format!("a share addressed to party {}", sh.to)));
            }
            // The agreement made when sealing our shares for this peer, or a fresh one.
            let shared = match c_shared.get(&sh.from) {
                Some(s) => *s,
                None => crypto::agree(&self.c.secret, &peer.c_pk)?,
            };
            let key = share_key(&shared, &self.context, sh.from, self.me)?;
            let plain = crypto::open_once(
                &key,
                &share_aad(&self.context, sh.from, self.me),
                &sh.ciphertext,
            )?;
            let plain: SharePlaintext =
                postcard::from_bytes(&plain).map_err(|e| SecAggError::Sharing(e.to_string()))?;
            let x = self.graph.share_index(sh.from, self.me);
            if plain.from != sh.from
                || plain.to != self.me
                || plain.mask_key.first().copied() != x
                || plain.self_mask.first().copied() != x
            {
                return Err(
                    self.inconsistent(format!("the share from party {} is not ours", sh.from))
                );
            }
            if held
                .insert(sh.from, (plain.mask_key, plain.self_mask))
                .is_some()
            {
                return Err(self.inconsistent(format!("two shares from party {}", sh.from)));
            }
        }
        let need = self.setup.threshold as usize;
        if held.len() + 1 < need {
            return Err(SecAggError::TooFewSurvivors {
                phase: "share keys",
                got: held.len() + 1,
                need,
            });
        }
        let bits = self.setup.quant.modulus_bits;
        let mut y = std::mem::take(&mut self.input);
        crypto::apply_mask(
            &mut y,
            &self_mask_seed(&self.self_seed, &self.context)?,
            bits,
            1,
        );
        for &v in held.keys() {
            let shared = crypto::agree(&self.s.secret, &keys[&v].s_pk)?;
            crypto::apply_mask(
                &mut y,
                &pair_seed(&shared, &self.context, self.me, v)?,
                bits,
                mask_sign(self.me, v),
            );
        }
        if let Some(own) = self.own_shares.take() {
            held.insert(self.me, own);
        }
        self.state = State::SentInput { held };
        Ok(ClientMessage::MaskedInput(quant::pack(&y, bits)))
    }

    /// Checks the survivor list as [`Client::unmask`] would, then signs it: the one list
    /// this party will ever reveal for.
    fn sign_survivors(
        &mut self,
        held: BTreeMap<PartyId, (Vec<u8>, Vec<u8>)>,
        mut survivors: Vec<PartyId>,
        signer: &dyn Signer,
    ) -> Result<ClientMessage, SecAggError> {
        let sorted = survivors.windows(2).all(|w| w[0] < w[1]);
        if !sorted
            || survivors
                .iter()
                .any(|v| *v as usize >= self.setup.parties.len())
        {
            return Err(self.inconsistent("the survivor list is not a sorted list of parties"));
        }
        self.check_survivors(&held, &survivors)?;
        let name = &self.setup.parties[self.me as usize];
        let signature = signer.sign(&super::survivors_signing_message(
            &self.context,
            name,
            &survivors,
        ));
        survivors.shrink_to_fit();
        self.state = State::Signed { held, survivors };
        Ok(ClientMessage::SurvivorsSigned(signature))
    }

    /// At least `t` of this party's share holders (itself included) signed `survivors`,
    /// each at most once, each a survivor.
    fn check_signatures(
        &self,
        survivors: &[PartyId],
        signatures: &[(PartyId, Vec<u8>)],
        verifier: &dyn Verifier,
    ) -> Result<(), SecAggError> {
        let listed: BTreeSet<PartyId> = survivors.iter().copied().collect();
        let mut signed = BTreeSet::new();
        for (v, sig) in signatures {
            let holder = *v == self.me || self.graph.are_neighbours(self.me, *v);
            if !holder || !listed.contains(v) || (*v as usize) >= self.setup.parties.len() {
                continue;
            }
            let name = &self.setup.parties[*v as usize];
            let message = super::survivors_signing_message(&self.context, name, survivors);
            if verifier.verify(name, &message, sig) {
                signed.insert(*v);
            }
        }
        let need = self.setup.threshold as usize;
        if signed.len() < need {
            return Err(self.inconsistent(format!(
                "only {} of this party's share holders signed the survivor list it signed ({need} needed): \
                 the server may be telling parties different survivors",
                signed.len()
            )));
        }
        Ok(())
    }

    /// Whether `survivors` is a list this party may reveal for: it is on it, at least `t` of
    /// its holders are, and every survivor among its neighbours shared keys with it.
    fn check_survivors(
        &self,
        held: &BTreeMap<PartyId, (Vec<u8>, Vec<u8>)>,
        survivors: &[PartyId],
    ) -> Result<(), SecAggError> {
        let survivors: BTreeSet<PartyId> = survivors.iter().copied().collect();
        if !survivors.contains(&self.me) {
            return Err(self.inconsistent("the server lists this party as dropped"));
        }
        let local = survivors
            .iter()
            .filter(|&&v| v == self.me || self.graph.are_neighbours(self.me, v))
            .count();
        if local < self.setup.threshold as usize {
            return Err(SecAggError::TooFewSurvivors {
                phase: "masked input",
                got: local,
                need: self.setup.threshold as usize,
            });
        }
        for &v in &survivors {
            if v != self.me && self.graph.are_neighbours(self.me, v) && !held.contains_key(&v) {
                return Err(self.inconsistent(format!(
                    "party {v} is listed as a survivor but never shared keys with us"
                )));
            }
        }
        Ok(())
    }

    fn unmask(
        &mut self,
        held: &BTreeMap<PartyId, (Vec<u8>, Vec<u8>)>,
        survivors: &[PartyId],
    ) -> Result<ClientMessage, SecAggError> {
        let survivors: BTreeSet<PartyId> = survivors.iter().copied().collect();
        if !survivors.contains(&self.me) {
            // The server counts this party as dropped: revealing anything now could let it
            // unmask our input.
            return Err(self.inconsistent("the server lists this party as dropped"));
        }
        // The survivors among the holders of our shares: with fewer than t of them, our
        // self mask cannot be rebuilt, and the round cannot succeed anyway.
        let local = survivors
            .iter()
            .filter(|&&v| v == self.me || self.graph.are_neighbours(self.me, v))
            .count();
        if local < self.setup.threshold as usize {
            return Err(SecAggError::TooFewSurvivors {
                phase: "masked input",
                got: local,
                need: self.setup.threshold as usize,
            });
        }
        for &v in &survivors {
            if v != self.me && self.graph.are_neighbours(self.me, v) && !held.contains_key(&v) {
                return Err(self.inconsistent(format!(
                    "party {v} is listed as a survivor but never shared keys with us"
                )));
            }
        }
        // Each owner gets exactly one kind of share: the self-mask seed if its input counts,
        // the mask key if it dropped. Never both.
        let (mut self_mask, mut mask_key) = (Vec::new(), Vec::new());
        for (&owner, (key_share, seed_share)) in held {
            if survivors.contains(&owner) {
                self_mask.push(RevealedShare {
                    owner,
                    share: seed_share.clone(),
                });
            } else {
                mask_key.push(RevealedShare {
                    owner,
                    share: key_share.clone(),
                });
            }
        }
        self.state = State::Done;
        Ok(ClientMessage::UnmaskShares {
            self_mask,
            mask_key,
        })
    }
}
