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
    /// One deterministic key pair per party (seeded by its index), keyed by the party's name.
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

    /// The signer of party `party` (its index in the list given to [`Identities::new`]).
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
    /// Never answers.
    AdvertiseKeys,
    /// Advertises its keys, then stops.
    ShareKeys,
    /// Shares its keys, then stops before sending its masked input.
    MaskedInput,
    /// Sends its masked input, then stops before revealing any share.
    Unmasking,
}

/// Who did the work being timed.
#[derive(Debug, Clone, Copy)]
pub enum Actor {
    /// A client, by party id.
    Client(PartyId),
    /// The server.
    Server,
}

/// Times the parties' work; tests use [`NoClock`]. Client work may run on several threads:
/// each gets a [`Stopwatch::fork`], merged back with [`Stopwatch::join`].
pub trait Stopwatch: Send {
    /// Runs `f` as `actor`'s work, timing it.
    fn time<R>(&mut self, actor: Actor, f: impl FnOnce() -> R) -> R;
    /// `bytes` made by `actor` left it over the network (for memory accounting).
    fn sent(&mut self, _actor: Actor, _bytes: usize) {}
    /// A stopwatch for work on another thread.
    fn fork(&self) -> Self;
    /// Adds a forked stopwatch's measurements to this one's.
    fn join(&mut self, other: Self);
}

/// A [`Stopwatch`] that measures nothing: tests stay deterministic and clock-free.
pub struct NoClock;

impl Stopwatch for NoClock {
    fn time<R>(&mut self, _: Actor, f: impl FnOnce() -> R) -> R {
        f()
    }
    fn fork(&self) -> Self {
        NoClock
    }
    fn join(&mut self, _: Self) {}
}

/// What a simulated aggregation produced.
pub struct SimOutcome {
    /// The decoded sum (modulo the encoding's modulus), or why there is none.
    pub result: Result<Vec<u64>, SecAggError>,
    /// The parties whose inputs are in the sum.
    pub contributors: BTreeSet<PartyId>,
    /// Every message each client sent, in order (for inspection by privacy tests).
    pub sent: BTreeMap<PartyId, Vec<ClientMessage>>,
    /// Serialized bytes each client sent and received.
    pub bytes_sent: BTreeMap<PartyId, usize>,
    /// Serialized bytes each client received.
    pub bytes_received: BTreeMap<PartyId, usize>,
    /// Messages the server rejected, with the reason.
    pub rejected: Vec<(PartyId, SecAggError)>,
    /// Inconsistent shares the server found, as (owner, holder).
    pub inconsistent: BTreeSet<(PartyId, PartyId)>,
}

/// One unit of client work: create the client, or answer a server message.
enum Work {
    Start(PartyId),
    Answer(PartyId, Vec<u8>),
}

/// Does `work` on up to `threads` threads; returns each party's answer (or error) in order.
#[allow(clippy::type_complexity)]
fn client_batch<W: Stopwatch>(
    work: Vec<Work>,
    clients: &mut BTreeMap<PartyId, Client>,
    setup: &Setup,
    inputs: &(dyn Fn(PartyId) -> Vec<f64> + Sync),
    ids: &Identities,
    clock: &mut W,
    threads: usize,
) -> Vec<(PartyId, Result<(ClientMessage, Vec<u8>), SecAggError>)> {
    // Each item carries its client out of the map and back, so threads own disjoint clients.
    let items: Vec<(Work, Option<Client>)> = work
        .into_iter()
        .map(|w| {
            let c = match &w {
                Work::Start(_) => None,
                Work::Answer(v, _) => clients.remove(v),
            };
            (w, c)
        })
        .collect();
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    let mut chunks: Vec<Vec<(Work, Option<Client>)>> = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        chunks.push(items.by_ref().take(chunk).collect());
    }
    let do_one = |clock: &mut W,
                  (w, c): (Work, Option<Client>)|
     -> (
        PartyId,
        Option<Client>,
        Result<(ClientMessage, Vec<u8>), SecAggError>,
    ) {
        match w {
            Work::Start(u) => {
                let x = inputs(u);
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&u.to_be_bytes());
                seed[4..12].copy_from_slice(&setup.graph_seed.to_be_bytes());
                let r = clock.time(Actor::Client(u), || {
                    let (client, msg) = Client::new(setup.clone(), u, &x, &ids.signer(u), seed)?;
                    let bytes = postcard::to_allocvec(&msg).unwrap_or_default();
                    Ok((client, msg, bytes))
                });
                match r {
                    Ok((client, msg, bytes)) => (u, Some(client), Ok((msg, bytes))),
                    Err(e) => (u, None, Err(e)),
                }
            }
            Work::Answer(v, bytes) => {
                let Some(mut client) = c else {
                    return (v, None, Err(SecAggError::UnknownParty(v)));
                };
                let r = clock.time(Actor::Client(v), || {
                    let msg: ServerMessage = postcard::from_bytes(&bytes)
                        .map_err(|e| SecAggError::Inconsistent(e.to_string()))?;
                    let answer = client.handle(msg, ids, &ids.signer(v))?;
                    let bytes = postcard::to_allocvec(&answer).unwrap_or_default();
                    Ok((answer, bytes))
                });
                (v, Some(client), r)
            }
        }
    };
    let results: Vec<Vec<_>> = if chunks.len() <= 1 {
        chunks
            .into_iter()
            .map(|c| c.into_iter().map(|item| do_one(clock, item)).collect())
            .collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|c| {
                    let mut local = clock.fork();
                    let do_one = &do_one;
                    scope.spawn(move || {
                        let r: Vec<_> =
                            c.into_iter().map(|item| do_one(&mut local, item)).collect();
                        (r, local)
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .map(|(r, local)| {
                    clock.join(local);
                    r
                })
                .collect()
        })
    };
    results
        .into_iter()
        .flatten()
        .map(|(u, client, r)| {
            if let Some(c) = client {
                clients.insert(u, c);
            }
            (u, r)
        })
        .collect()
}

/// Runs one aggregation under `setup` of `inputs(party)` for each party, with `drops`
/// deciding who stops answering before which phase, and `tamper` a hook that may rewrite a
/// client's message before the server sees it (for attacks). With `record`, every client
/// message is kept in [`SimOutcome::sent`].
#[allow(clippy::too_many_arguments)]
pub fn run(
    setup: &Setup,
    inputs: &(dyn Fn(PartyId) -> Vec<f64> + Sync),
    drops: &BTreeMap<PartyId, DropBefore>,
    ids: &Identities,
    clock: &mut impl Stopwatch,
    threads: usize,
    record: bool,
    mut tamper: Option<&mut dyn FnMut(PartyId, ClientMessage) -> ClientMessage>,
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
        inconsistent: BTreeSet::new(),
    };
    let mut server = match clock.time(Actor::Server, || Server::new(setup.clone(), now, PHASE_MS)) {
        Ok(s) => s,
        Err(e) => {
            out.result = Err(e);
            return out;
        }
    };
    let alive = |party: PartyId, phase: DropBefore| drops.get(&party).is_none_or(|d| *d > phase);
    let phase_of = |m: &ServerMessage| match m {
        ServerMessage::KeyDirectory(_) => DropBefore::ShareKeys,
        ServerMessage::EncryptedShares(_) => DropBefore::MaskedInput,
        // A party that drops before unmasking leaves after its masked input: before the
        // consistency check, so it is not among the signers either.
        ServerMessage::ConsistencyCheck { .. } | ServerMessage::UnmaskRequest { .. } => {
            DropBefore::Unmasking
        }
    };
    let mut clients: BTreeMap<PartyId, Client> = BTreeMap::new();
    let mut work: Vec<Work> = (0..setup.parties.len() as PartyId)
        .filter(|&u| alive(u, DropBefore::AdvertiseKeys))
        .map(Work::Start)
        .collect();
    loop {
        // Clients work (in parallel); their answers cross to the server as bytes.
        let answers = client_batch(
            std::mem::take(&mut work),
            &mut clients,
            setup,
            inputs,
            ids,
            clock,
            threads,
        );
        for (u, answer) in answers {
            let (msg, bytes) = match answer {
                Ok(a) => a,
                Err(e) => {
                    out.rejected.push((u, e));
                    continue;
                }
            };
            // An attack rewrites the message as it crosses the network.
            let (msg, bytes) = match tamper.as_mut() {
                Some(tamper) => {
                    let m = tamper(u, msg);
                    let b = postcard::to_allocvec(&m).unwrap_or_default();
                    (m, b)
                }
                None => (msg, bytes),
            };
            if record {
                out.sent.entry(u).or_default().push(msg);
            }
            *out.bytes_sent.entry(u).or_default() += bytes.len();
            let handled = clock.time(Actor::Server, || {
                let msg: ClientMessage =
                    postcard::from_bytes(&bytes).map_err(|e| SecAggError::Invalid {
                        from: u,
                        why: e.to_string(),
                    })?;
                server.handle(now, u, msg, ids)
            });
            if let Err(e) = handled {
                out.rejected.push((u, e));
            }
        }
        if server.outcome().is_some() {
            break;
        }
        // The server's messages; parties that dropped stay silent.
        while let Some((v, phase, bytes)) = clock.time(Actor::Server, || {
            server.poll_transmit().map(|(v, m)| {
                (
                    v,
                    phase_of(&m),
                    postcard::to_allocvec(&m).unwrap_or_default(),
                )
            })
        }) {
            clock.sent(Actor::Server, bytes.capacity());
            if alive(v, phase) && clients.contains_key(&v) {
                *out.bytes_received.entry(v).or_default() += bytes.len();
                work.push(Work::Answer(v, bytes));
            }
        }
        if work.is_empty() {
            // Nobody has anything left to say: let the phase deadline pass.
            now = server.poll_timeout().unwrap_or(now).max(now);
            clock.time(Actor::Server, || server.handle_timeout(now));
            if server.outcome().is_some() {
                break;
            }
        }
    }
    out.contributors = server.contributors().clone();
    out.inconsistent = server.inconsistent_shares().clone();
    out.result = server
        .outcome()
        .cloned()
        .unwrap_or(Err(SecAggError::Aborted("no outcome".into())));
    out
}
