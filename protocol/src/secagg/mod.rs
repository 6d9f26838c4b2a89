//! Secure aggregation (Bonawitz et al., CCS 2017), with the SecAgg+ neighbour graph of
//! Bell et al. (CCS 2020) for large numbers of parties: the aggregator learns the sum of
//! the parties' vectors and nothing else about any one of them, even when parties drop out.
//!
//! Sans-I/O: [`Client`] and [`Server`] are state machines; the node and the aggregator move
//! their messages over QUIC, and tests move them in memory with virtual time.
//!
//! ```text
//!  phase           client → server                server → client
//!  advertise keys  AdvertiseKeys (signed c_pk, s_pk, H(b)) KeyDirectory (neighbours' keys)
//!  share keys      ShareKeys (encrypted shares)   EncryptedShares (shares held for others)
//!  masked input    MaskedInput (y = x + masks)    ConsistencyCheck (who sent input)
//!  consistency     SurvivorsSigned (sig over U3)  UnmaskRequest (U3, ≥ t signatures)
//!  unmasking       UnmaskShares (b or s_sk shares) —  the server decodes the sum
//! ```
//!
//! The consistency round (Bonawitz et al. 2017, §4.3) stops a server that tells parties
//! different survivor lists: a party reveals only after seeing at least `t` of its share
//! holders sign the very list it signed. An honest party signs one list per aggregation, so
//! with `t` above half of a party's holders no two lists can both gather `t` signatures
//! among them, and no party's secret can be rebuilt both as a survivor's and a dropout's.

mod client;
pub mod crypto;
#[cfg(test)]
mod equivocation;
mod graph;
mod server;
pub mod sim;

use serde::{Deserialize, Serialize};

pub use client::Client;
pub use graph::{Graph, choose_neighbours};
pub use server::{Phase, Server};

use crate::quant::QuantParams;

/// A party's index in [`Setup::parties`].
pub type PartyId = u32;

/// Everything all parties must agree on for one aggregation, fixed by the server before it
/// starts and bound into every key, signature and ciphertext via [`Setup::context`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// A unique label of this aggregation (e.g. "study/round/attempt").
    pub label: String,
    /// The parties' names (site names), indexed by [`PartyId`].
    pub parties: Vec<String>,
    /// Shamir threshold: shares of a party's secrets (held by its neighbours and itself)
    /// needed to rebuild them; also the fewest parties whose input the server may decode.
    pub threshold: u32,
    /// Neighbours per party (SecAgg+); `parties - 1` means every pair is masked.
    pub neighbours: u32,
    /// Seed of the neighbour graph's permutation: [`Setup::graph_seed_for`] the label, so
    /// the server cannot try seeds until its accomplices land around a victim.
    pub graph_seed: u64,
    /// Length of the input vectors.
    pub dimension: u32,
    /// The fixed-point encoding of the inputs, whose modulus the sum is taken in.
    pub quant: QuantParams,
    /// A digest of everything else each party's input depends on (for a training round:
    /// the scale, the global model and the training parameters; see
    /// [`input_binding`]). Each party checks it against what it was sent, so a server that
    /// sends one party a different round gives it a different [`Setup::context`], and its
    /// keys no longer verify with anybody else's.
    pub binding: [u8; 32],
}

/// The digest [`Setup::binding`] holds, over `parts` (e.g. `(scale, model, params)`).
pub fn input_binding<T: Serialize>(parts: &T) -> [u8; 32] {
    let bytes = postcard::to_allocvec(parts).expect("round parameters serialize");
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"medfed-secagg-v1 input binding\0");
    ctx.update(&bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

impl Setup {
    /// A hash binding every field: keys, signatures and ciphertexts of one aggregation are
    /// useless in another.
    pub fn context(&self) -> [u8; 32] {
        let bytes = postcard::to_allocvec(self).expect("a setup serializes");
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        out
    }

    /// Checks a setup received from the server.
    pub fn validate(&self) -> Result<(), SecAggError> {
        let n = self.parties.len();
        let bad = |why: String| Err(SecAggError::BadSetup(why));
        if n < 2 {
            return bad(format!("{n} parties; secure aggregation needs at least 2"));
        }
        if u32::try_from(n).is_err() {
            return bad("too many parties".into());
        }
        let k = self.neighbours as usize;
        if k == 0 || k > n - 1 || k > 254 {
            return bad(format!(
                "{k} neighbours for {n} parties (must be 1..={} and at most 254)",
                n - 1
            ));
        }
        if k < n - 1 && k % 2 == 1 {
            return bad(format!(
                "{k} neighbours: a partial graph needs an even number"
            ));
        }
        // Each party's secrets are shared among its k neighbours and itself. A threshold of
        // more than half the holders keeps a server that lies about dropouts from collecting
        // both kinds of shares of one party from honest holders.
        let (t, holders) = (self.threshold as usize, k + 1);
        if 2 * t <= holders || t > holders {
            return bad(format!(
                "threshold {t} for {holders} share holders (must be more than {} and at most {holders})",
                holders / 2
            ));
        }
        // One canonical order (sorted, no repeats): with the seed fixed by the label, the
        // server cannot reorder the parties to place them in the graph either.
        if let Some(w) = self.parties.windows(2).find(|w| w[0] >= w[1]) {
            return bad(if w[0] == w[1] {
                format!("party '{}' is listed twice", w[0])
            } else {
                format!(
                    "parties are not in sorted order ('{}' before '{}')",
                    w[0], w[1]
                )
            });
        }
        if self.graph_seed != Setup::graph_seed_for(&self.label) {
            return bad("the graph seed is not the one derived from the label".into());
        }
        if self.dimension == 0 {
            return bad("dimension 0".into());
        }
        self.quant
            .check(n)
            .map_err(|e| SecAggError::BadSetup(e.to_string()))
    }

    /// The neighbour graph's seed for an aggregation labelled `label`: SHA-256 of the label,
    /// so nobody chooses it.
    pub fn graph_seed_for(label: &str) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"medfed-secagg-v1 graph seed\0");
        ctx.update(label.as_bytes());
        let d = ctx.finish();
        u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"))
    }

    /// Checks that at most `colluders` parties colluding with the server cannot rebuild both
    /// secrets of an honest party: a server that tells some of the party's share holders it
    /// dropped and others that it survived collects at most `holders - t` honest shares of
    /// one kind besides `t` of the other, so it needs `2t <= holders + colluders`.
    pub fn check_collusion_margin(&self, colluders: u32) -> Result<(), SecAggError> {
        let holders = u64::from(self.neighbours) + 1;
        let t = u64::from(self.threshold);
        if 2 * t <= holders + u64::from(colluders) {
            return Err(SecAggError::BadSetup(format!(
                "threshold {t} of {holders} share holders lets the aggregator and {colluders} colluding site(s) unmask a site (needs a threshold above {})",
                (holders + u64::from(colluders)) / 2
            )));
        }
        Ok(())
    }

    /// The neighbour graph this setup fixes (from `parties`, `neighbours` and `graph_seed`).
    pub fn graph(&self) -> Graph {
        Graph::new(
            self.parties.len(),
            self.neighbours as usize,
            self.graph_seed,
        )
    }

    /// [`Setup::graph`] as party `me` needs it: its neighbours and theirs.
    pub fn local_graph(&self, me: PartyId) -> Graph {
        Graph::local(
            self.parties.len(),
            self.neighbours as usize,
            self.graph_seed,
            me,
        )
    }
}

/// Signs a party's advertised keys with its long-term identity (a site's certificate key).
pub trait Signer {
    /// The signature of `message` (for a site: with its certificate's key).
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}

/// Checks that `signature` over `message` was made by party `site`'s identity key.
pub trait Verifier {
    /// True if `signature` over `message` verifies with `site`'s identity key (its certificate
    /// from the consortium CA); false for an unknown site.
    fn verify(&self, site: &str, message: &[u8], signature: &[u8]) -> bool;
}

/// The bytes a party signs: its name, both public keys and its self-mask commitment,
/// bound to the setup.
pub fn key_signing_message(context: &[u8; 32], site: &str, keys: &AdvertisedKeys) -> Vec<u8> {
    let mut m = b"medfed-secagg-v1 advertise".to_vec();
    m.extend_from_slice(context);
    m.extend_from_slice(&(site.len() as u32).to_be_bytes());
    m.extend_from_slice(site.as_bytes());
    m.extend_from_slice(&keys.c_pk);
    m.extend_from_slice(&keys.s_pk);
    m.extend_from_slice(&keys.self_mask_commitment);
    m
}

/// The bytes a party signs in the consistency round: its name and the survivor list,
/// bound to the setup.
pub fn survivors_signing_message(context: &[u8; 32], site: &str, survivors: &[PartyId]) -> Vec<u8> {
    let mut m = b"medfed-secagg-v1 survivors".to_vec();
    m.extend_from_slice(context);
    m.extend_from_slice(&(site.len() as u32).to_be_bytes());
    m.extend_from_slice(site.as_bytes());
    m.extend_from_slice(&(survivors.len() as u32).to_be_bytes());
    for v in survivors {
        m.extend_from_slice(&v.to_be_bytes());
    }
    m
}

/// A party's signed public keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvertisedKeys {
    /// The advertising party.
    pub party: PartyId,
    /// Key agreement for encrypting shares.
    pub c_pk: [u8; 32],
    /// Key agreement for pairwise masks.
    pub s_pk: [u8; 32],
    /// HKDF of the self-mask seed under the round context: the server checks a rebuilt seed
    /// against it, so a wrong revealed share cannot silently corrupt the sum.
    pub self_mask_commitment: [u8; 32],
    /// The party's signature over [`key_signing_message`].
    pub signature: Vec<u8>,
}

/// An encrypted share from one party to another, relayed by the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedShare {
    /// The party that sealed the share.
    pub from: PartyId,
    /// The party that can open it.
    pub to: PartyId,
    /// AES-256-GCM of both of `from`'s shares for `to`, under their agreed key.
    pub ciphertext: Vec<u8>,
}

/// A revealed share of `owner`'s secret (its self-mask seed or its mask key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// The party whose secret the share is of.
    pub owner: PartyId,
    /// Shamir share: x-coordinate byte, then the share bytes.
    pub share: Vec<u8>,
}

/// A party's message to the server, one per phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Phase 1: the party's signed public keys.
    AdvertiseKeys(AdvertisedKeys),
    /// Phase 2: shares of its secrets, sealed for each of its neighbours.
    ShareKeys(Vec<SealedShare>),
    /// The masked input, packed little-endian words of `quant.modulus_bits`.
    MaskedInput(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Phase 5: the shares the server needs to remove the masks.
    UnmaskShares {
        /// Shares of the surviving parties' self-mask seeds.
        self_mask: Vec<RevealedShare>,
        /// Shares of the dropped parties' mask keys (so their pairwise masks can be removed).
        mask_key: Vec<RevealedShare>,
    },
    /// The party's signature over the survivor list it was given
    /// ([`survivors_signing_message`]).
    SurvivorsSigned(Vec<u8>),
}

impl ClientMessage {
    /// The message's name in logs and the compliance log (e.g. `"masked-input"`).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::AdvertiseKeys(_) => "advertise-keys",
            ClientMessage::ShareKeys(_) => "share-keys",
            ClientMessage::MaskedInput(_) => "masked-input",
            ClientMessage::UnmaskShares { .. } => "unmask-shares",
            ClientMessage::SurvivorsSigned(_) => "survivors-signed",
        }
    }
}

/// The server's message to a party, one per phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// The advertised keys of the receiver's neighbours that took part.
    KeyDirectory(Vec<AdvertisedKeys>),
    /// The shares other parties sealed for the receiver.
    EncryptedShares(Vec<SealedShare>),
    /// The parties whose masked input the server holds (U3, in order), and each party's
    /// signature over that list from its share holders that signed it.
    UnmaskRequest {
        /// The parties whose masked input the server holds.
        survivors: Vec<PartyId>,
        /// Signatures over `survivors` by the receiver's share holders, by party.
        signatures: Vec<(PartyId, Vec<u8>)>,
    },
    /// The parties whose masked input the server holds (U3, in order), for every party to
    /// sign before anyone reveals anything.
    ConsistencyCheck {
        /// The parties whose masked input the server holds.
        survivors: Vec<PartyId>,
    },
}

impl ServerMessage {
    /// The message's name in logs and the compliance log (e.g. `"key-directory"`).
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::KeyDirectory(_) => "key-directory",
            ServerMessage::EncryptedShares(_) => "encrypted-shares",
            ServerMessage::UnmaskRequest { .. } => "unmask-request",
            ServerMessage::ConsistencyCheck { .. } => "consistency-check",
        }
    }
}

/// Why a secure aggregation (or one party's message in it) failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// The setup is invalid, or too weak for the colluders tolerated.
    #[error("invalid secure-aggregation setup: {0}")]
    BadSetup(String),
    /// A peer's public key is of small order (it would fix the agreed key).
    #[error("a peer offered a small-order public key")]
    WeakPublicKey,
    /// A sealed share did not decrypt.
    #[error("a share failed to decrypt (wrong key, context or tampering)")]
    Decryption,
    /// Encrypting a share failed.
    #[error("a share could not be encrypted; it is not sent")]
    Sealing,
    /// HKDF failed.
    #[error("a key could not be derived; the round stops")]
    KeyDerivation,
    /// Shamir splitting or combining failed.
    #[error("secret sharing: {0}")]
    Sharing(String),
    /// The party's differential-privacy noise could not be drawn.
    #[error("differential-privacy noise: {0}")]
    Noise(String),
    /// A party's key signature does not verify with its certificate.
    #[error("the signature on party {party}'s keys does not verify")]
    ForgedSignature {
        /// The party whose keys carry the signature.
        party: PartyId,
    },
    /// A message names a party that is not in the setup.
    #[error("unknown party {0}")]
    UnknownParty(PartyId),
    /// A message for another phase than the current one.
    #[error("party {from} sent a {kind} message during the {phase} phase")]
    WrongPhase {
        /// The sender.
        from: PartyId,
        /// The message's kind.
        kind: &'static str,
        /// The current phase.
        phase: &'static str,
    },
    /// A second message from a party in one phase.
    #[error("party {0} already sent this phase's message")]
    Duplicate(PartyId),
    /// A list or vector of the wrong length.
    #[error("party {from}: {what} has {got} entries, expected {expected}")]
    WrongLength {
        /// The sender.
        from: PartyId,
        /// What was too long or too short.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length it must have.
        expected: usize,
    },
    /// A message that breaks the protocol in another way, said in `why`.
    #[error("party {from}: {why}")]
    Invalid {
        /// The sender.
        from: PartyId,
        /// What is wrong with its message.
        why: String,
    },
    /// The server (seen by a client) asked for something the protocol forbids, e.g. shares
    /// of both kinds of one party.
    #[error("the server asked for shares inconsistent with the protocol: {0}")]
    Inconsistent(String),
    /// Fewer parties than the threshold remain: the sum cannot be decoded.
    #[error("only {got} parties remain in the {phase} phase; at least {need} are needed")]
    TooFewSurvivors {
        /// The phase in which they fell below it.
        phase: &'static str,
        /// Parties remaining.
        got: usize,
        /// The threshold.
        need: usize,
    },
    /// Too few of a party's shares arrived to rebuild its secret.
    #[error("party {owner}'s secret cannot be rebuilt: {got} of {need} shares arrived")]
    Unrecoverable {
        /// The party.
        owner: PartyId,
        /// Shares that arrived.
        got: usize,
        /// The threshold.
        need: usize,
    },
    /// Enough shares arrived, but none of their subsets rebuilds the secret its owner
    /// advertised (the self-mask seed's commitment, or the mask key's public key).
    #[error(
        "the shares revealed of party {owner}'s {what} do not rebuild it: some are wrong (its \
         holders revealed wrong ones, or it dealt them){}",
        if *gave_up { "; the search for a right subset stopped at the round's limit" } else { "" }
    )]
    Unrebuildable {
        /// The party.
        owner: PartyId,
        /// Which secret: the self-mask seed or the mask key.
        what: &'static str,
        /// The search for a right subset ran out of the round's budget.
        gave_up: bool,
    },
    /// The aggregation was aborted by its driver (e.g. the study stopped); the reason says
    /// why.
    #[error("the aggregation was aborted: {0}")]
    Aborted(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(n: usize, k: u32, t: u32) -> Setup {
        Setup {
            label: "s/1".into(),
            parties: (0..n).map(|i| format!("site-{i}")).collect(),
            threshold: t,
            neighbours: k,
            graph_seed: Setup::graph_seed_for("s/1"),
            dimension: 4,
            quant: QuantParams::for_parties(n, 1.0, 16).unwrap(),
            binding: [0; 32],
        }
    }

    #[test]
    fn setups_are_checked() {
        assert!(setup(3, 2, 2).validate().is_ok());
        assert!(setup(1, 1, 1).validate().is_err());
        assert!(setup(10, 3, 2).validate().is_err(), "odd partial degree");
        assert!(
            setup(10, 4, 2).validate().is_err(),
            "threshold not above half the holders"
        );
        assert!(
            setup(10, 4, 6).validate().is_err(),
            "threshold above the holders"
        );
        assert!(setup(10, 4, 5).validate().is_ok());
        assert!(setup(2, 1, 2).validate().is_ok());
        let mut dup = setup(3, 2, 2);
        dup.parties[1] = dup.parties[0].clone();
        assert!(dup.validate().is_err());
        let mut overflow = setup(3, 2, 2);
        overflow.quant.modulus_bits = 32;
        overflow.quant.scale_bits = 40;
        assert!(overflow.validate().is_err());
    }

    #[test]
    fn the_context_binds_every_field() {
        let a = setup(3, 2, 2);
        let mut b = a.clone();
        b.dimension += 1;
        assert_ne!(a.context(), b.context());
        let mut c = a.clone();
        c.label = "s/2".into();
        assert_ne!(a.context(), c.context());
        let mut d = a.clone();
        d.binding = input_binding(&(0.5f64, "another model"));
        assert_ne!(a.context(), d.context());
        assert_ne!(input_binding(&1.0f64), input_binding(&2.0f64));
    }

    #[test]
    fn the_server_chooses_neither_the_graph_seed_nor_the_order() {
        let mut seeded = setup(5, 4, 3);
        seeded.graph_seed ^= 1;
        let err = seeded.validate().unwrap_err().to_string();
        assert!(err.contains("graph seed"), "{err}");
        let mut shuffled = setup(5, 4, 3);
        shuffled.parties.swap(1, 3);
        let err = shuffled.validate().unwrap_err().to_string();
        assert!(
            err.contains("not in sorted order ('site-3' before 'site-2')"),
            "{err}"
        );
        assert_ne!(
            Setup::graph_seed_for("s/1/1"),
            Setup::graph_seed_for("s/1/2")
        );
    }

    #[test]
    fn the_collusion_margin() {
        // 3 holders (complete graph of 3): t = 2 falls to one colluder, t = 3 does not.
        assert!(setup(3, 2, 2).check_collusion_margin(0).is_ok());
        let err = setup(3, 2, 2)
            .check_collusion_margin(1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "threshold 2 of 3 share holders lets the aggregator and 1 colluding site(s)"
            ),
            "{err}"
        );
        assert!(setup(3, 2, 3).check_collusion_margin(1).is_ok());
        // 101 holders, t = 51 tolerates no colluder; t = 68 tolerates 34.
        assert!(setup(101, 100, 51).check_collusion_margin(1).is_err());
        assert!(setup(101, 100, 68).check_collusion_margin(34).is_ok());
        assert!(setup(101, 100, 68).check_collusion_margin(35).is_err());
    }
}
