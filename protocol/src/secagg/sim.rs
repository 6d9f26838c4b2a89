//! An in-memory federation for secure aggregation: n clients and a server exchanging
//! messages through a simulated network with virtual time, with parties dropping out at
//! chosen phases. Tests use it to check correctness and privacy properties; `medfed bench
//! secagg` uses it (with a real clock in the [`Stopwatch`]) to measure cost.

use std::collections::{BTreeMap, BTreeSet};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use super::{
    Client, ClientMessage, PartyId, SecAggError, Server, ServerMessage, Setup, Signer, Verifier,
};

/// Ed25519 identities for simulated parties (a real deployment signs with site certificates).
pub struct Identities {
    keys: Vec<Ed25519KeyPair>,
    public: BTreeMap<String, Vec<u8>>,
}

impl Identities {
    pub fn new(parties: &[String]) -> Identities {
        let keys: Vec<Ed25519KeyPair> = (0..parties.len())
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
                // A 32-byte seed is always a valid Ed25519 private key.
                Ed25519KeyPair::from_seed_unchecked(&seed).expect("32-byte Ed25519 seed")
            })
            .collect();
        let public = parties
            .iter()
            .cloned()
            .zip(keys.iter().map(|k| k.public_key().as_ref().to_vec()))
            .collect();
        Identities { keys, public }
    }

    pub fn signer(&self, party: PartyId) -> impl Signer + '_ {
        struct S<'a>(&'a Ed25519KeyPair);
        impl Signer for S<'_> {
            fn sign(&self, message: &[u8]) -> Vec<u8> {
                self.0.sign(message).as_ref().to_vec()
            }
        }
        S(&self.keys[party as usize])
    }
}

impl Verifier for Identities {
    fn verify(&self, site: &str, message: &[u8], signature: &[u8]) -> bool {
        self.public.get(site).is_some_and(|pk| {
            UnparsedPublicKey::new(&ED25519, pk)
                .verify(message, signature)
                .is_ok()
        })
    }
}

/// The phase before which a party stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropBefore {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    Unmasking,
}

/// Who did the work being timed.
#[derive(Debug, Clone, Copy)]
pub enum Actor {
    Client(PartyId),
    Server,
}

/// Times the parties' work; tests use [`NoClock`].
pub trait Stopwatch {
    fn time<R>(&mut self, actor: Actor, f: impl FnOnce() -> R) -> R;
}

pub struct NoClock;

impl Stopwatch for NoClock {
    fn time<R>(&mut self, _: Actor, f: impl FnOnce() -> R) -> R {
        f()
    }
}

/// What a simulated aggregation produced.
pub struct SimOutcome {
    pub result: Result<Vec<u64>, SecAggError>,
    pub contributors: BTreeSet<PartyId>,
    /// Every message each client sent, in order (for inspection by privacy tests).
    pub sent: BTreeMap<PartyId, Vec<ClientMessage>>,
    /// Serialized bytes each client sent and received.
    pub bytes_sent: BTreeMap<PartyId, usize>,
    pub bytes_received: BTreeMap<PartyId, usize>,
    /// Messages the server rejected, with the reason.
    pub rejected: Vec<(PartyId, SecAggError)>,
}

/// Runs one aggregation of `inputs` (one per party) under `setup`, with `drops` deciding
/// who stops answering before which phase, and `tamper` a hook that may rewrite a client's
/// message before the server sees it (for attacks).
pub fn run(
    setup: &Setup,
    inputs: &[Vec<f64>],
    drops: &BTreeMap<PartyId, DropBefore>,
    ids: &Identities,
    clock: &mut impl Stopwatch,
    mut tamper: impl FnMut(PartyId, ClientMessage) -> ClientMessage,
) -> SimOutcome {
    const PHASE_MS: u64 = 1_000;
    let mut now = 0u64;
    let mut out = SimOutcome {
        result: Err(SecAggError::Aborted("not run".into())),
        contributors: BTreeSet::new(),
        sent: BTreeMap::new(),
        bytes_sent: BTreeMap::new(),
        bytes_received: BTreeMap::new(),
        rejected: Vec::new(),
    };
    let mut server = match clock.time(Actor::Server, || Server::new(setup.clone(), now, PHASE_MS)) {
        Ok(s) => s,
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    };
    let alive = |party: PartyId, phase: DropBefore| drops.get(&party).is_none_or(|d| *d > phase);
    let mut clients: BTreeMap<PartyId, Client> = BTreeMap::new();
    let mut pending: Vec<(PartyId, ClientMessage)> = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        let u = i as PartyId;
        if !alive(u, DropBefore::AdvertiseKeys) {
            continue;
        }
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&u.to_be_bytes());
        seed[4..12].copy_from_slice(&setup.graph_seed.to_be_bytes());
        match clock.time(Actor::Client(u), || {
            Client::new(setup.clone(), u, x, &ids.signer(u), seed)
        }) {
            Ok((client, msg)) => {
                clients.insert(u, client);
                pending.push((u, msg));
            }
            Err(e) => out.rejected.push((u, e)),
        }
    }
    let phase_of = |m: &ServerMessage| match m {
        ServerMessage::KeyDirectory(_) => DropBefore::ShareKeys,
        ServerMessage::EncryptedShares(_) => DropBefore::MaskedInput,
        ServerMessage::UnmaskRequest { .. } => DropBefore::Unmasking,
    };
    loop {
        for (u, msg) in pending.drain(..) {
            let msg = tamper(u, msg);
            *out.bytes_sent.entry(u).or_default() +=
                postcard::to_allocvec(&msg).map_or(0, |b| b.len());
            out.sent.entry(u).or_default().push(msg.clone());
            if let Err(e) = clock.time(Actor::Server, || server.handle(now, u, msg, ids)) {
                out.rejected.push((u, e));
            }
        }
        if server.outcome().is_some() {
            break;
        }
        // Deliver what the server sent; clients that dropped stay silent.
        let mut delivered = false;
        while let Some((v, msg)) = server.poll_transmit() {
            delivered = true;
            if !alive(v, phase_of(&msg)) {
                continue;
            }
            *out.bytes_received.entry(v).or_default() +=
                postcard::to_allocvec(&msg).map_or(0, |b| b.len());
            let Some(client) = clients.get_mut(&v) else {
                continue;
            };
            match clock.time(Actor::Client(v), || client.handle(msg, ids)) {
                Ok(answer) => pending.push((v, answer)),
                Err(e) => out.rejected.push((v, e)),
            }
        }
        if pending.is_empty() && !delivered {
            // Nobody has anything left to say: let the phase deadline pass.
            now = server.poll_timeout().unwrap_or(now).max(now);
            clock.time(Actor::Server, || server.handle_timeout(now));
            if server.outcome().is_some() {
                break;
            }
        }
    }
    out.contributors = server.contributors().clone();
    out.result = server
        .outcome()
        .cloned()
        .unwrap_or(Err(SecAggError::Aborted("no outcome".into())));
    out
}
