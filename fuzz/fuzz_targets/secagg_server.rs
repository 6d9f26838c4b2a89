//! The secure-aggregation server (`medfed_protocol::secagg::Server`) fed client messages
//! chosen by the fuzzer: real clients' messages (so that it gets through every phase),
//! the same mutated, dropped, replayed in another party's name, or made up from the input,
//! with timeouts and early phase ends in between.
//!
//! Properties: nothing panics; while it runs the server has a deadline; and a sum comes
//! out only with at least `threshold` contributors, who are exactly the parties whose
//! masked input the server took, and the sum is exact (the sum of their inputs) unless a
//! masked input it took was not the one its party's real client made (which no server can
//! tell).

#![no_main]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::sim::Identities;
use medfed_protocol::secagg::{
    AdvertisedKeys, Client, ClientMessage, PartyId, Phase, RevealedShare, SealedShare, Server,
    Setup,
};

const PHASE_MS: u64 = 1_000;

/// The shape of the aggregation: parties, neighbours, threshold, dimension.
fn setup(u: &mut Unstructured) -> Result<Setup> {
    let n = u.int_in_range(2..=5usize)?;
    // A complete graph, or (5 parties) the partial graph of 2 neighbours each.
    let k = if n == 5 && u.arbitrary::<bool>()? {
        2
    } else {
        n - 1
    };
    let holders = k + 1;
    let t = u.int_in_range(holders / 2 + 1..=holders)?;
    let d = u.int_in_range(1..=4usize)?;
    let bits = if u.arbitrary::<bool>()? { 16 } else { 40 };
    let label = format!("fuzz/{n}/{k}/{t}/{d}/{bits}");
    Ok(Setup {
        graph_seed: Setup::graph_seed_for(&label),
        label,
        parties: (0..n).map(|i| format!("site-{i}")).collect(),
        threshold: t as u32,
        neighbours: k as u32,
        dimension: d as u32,
        quant: QuantParams::for_parties(n, 64.0, bits).expect("quantization fits"),
        binding: [5; 32],
    })
}

/// A made-up party index: mostly a real one, sometimes not.
fn party(u: &mut Unstructured, n: usize) -> Result<PartyId> {
    Ok(if u.ratio(1, 8)? {
        u.arbitrary()?
    } else {
        u.int_in_range(0..=n as u32 - 1)?
    })
}

fn bytes(u: &mut Unstructured, max: usize) -> Result<Vec<u8>> {
    let len = u.int_in_range(0..=max)?;
    Ok(u.bytes(len)?.to_vec())
}

fn share(u: &mut Unstructured, n: usize) -> Result<RevealedShare> {
    let mut share = bytes(u, 40)?;
    if u.ratio(3, 4)? {
        share.resize(33, 0);
    }
    Ok(RevealedShare {
        owner: party(u, n)?,
        share,
    })
}

/// A client message made up from the input.
fn made_up(u: &mut Unstructured, setup: &Setup) -> Result<ClientMessage> {
    let n = setup.parties.len();
    Ok(match u.int_in_range(0..=4u8)? {
        0 => ClientMessage::AdvertiseKeys(AdvertisedKeys {
            party: party(u, n)?,
            c_pk: u.arbitrary()?,
            s_pk: u.arbitrary()?,
            self_mask_commitment: u.arbitrary()?,
            signature: bytes(u, 80)?,
        }),
        1 => {
            let count = u.int_in_range(0..=n)?;
            let mut sealed = Vec::new();
            for _ in 0..count {
                sealed.push(SealedShare {
                    from: party(u, n)?,
                    to: party(u, n)?,
                    ciphertext: bytes(u, 200)?,
                });
            }
            ClientMessage::ShareKeys(sealed)
        }
        2 => {
            let words = setup.dimension as usize * setup.quant.word_bytes();
            let len = if u.ratio(3, 4)? {
                words
            } else {
                u.int_in_range(0..=2 * words)?
            };
            ClientMessage::MaskedInput(u.bytes(len)?.to_vec())
        }
        3 => {
            let (a, b) = (u.int_in_range(0..=n)?, u.int_in_range(0..=n)?);
            ClientMessage::UnmaskShares {
                self_mask: (0..a).map(|_| share(u, n)).collect::<Result<_>>()?,
                mask_key: (0..b).map(|_| share(u, n)).collect::<Result<_>>()?,
            }
        }
        _ => ClientMessage::SurvivorsSigned(bytes(u, 80)?),
    })
}

/// A real message with one thing changed.
fn mutate(u: &mut Unstructured, msg: &ClientMessage, n: usize) -> Result<ClientMessage> {
    let mut m = msg.clone();
    let flip = |u: &mut Unstructured, b: &mut Vec<u8>| -> Result<()> {
        if b.is_empty() || u.ratio(1, 6)? {
            b.push(u.arbitrary()?);
        } else if u.ratio(1, 6)? {
            b.pop();
        } else {
            let i = u.choose_index(b.len())?;
            b[i] ^= u.arbitrary::<u8>()? | 1;
        }
        Ok(())
    };
    match &mut m {
        ClientMessage::AdvertiseKeys(k) => match u.int_in_range(0..=4u8)? {
            0 => k.party = party(u, n)?,
            1 => k.c_pk[u.choose_index(32)?] ^= 1,
            2 => k.s_pk = k.c_pk,
            3 => k.self_mask_commitment[u.choose_index(32)?] ^= 1,
            _ => flip(u, &mut k.signature)?,
        },
        ClientMessage::ShareKeys(list) => {
            if list.is_empty() || u.ratio(1, 4)? {
                let extra = list.first().cloned().unwrap_or(SealedShare {
                    from: 0,
                    to: 0,
                    ciphertext: Vec::new(),
                });
                list.push(extra);
            } else {
                let i = u.choose_index(list.len())?;
                match u.int_in_range(0..=3u8)? {
                    0 => list[i].from = party(u, n)?,
                    1 => list[i].to = party(u, n)?,
                    2 => {
                        list.remove(i);
                    }
                    _ => flip(u, &mut list[i].ciphertext)?,
                }
            }
        }
        ClientMessage::MaskedInput(b) | ClientMessage::SurvivorsSigned(b) => flip(u, b)?,
        ClientMessage::UnmaskShares {
            self_mask,
            mask_key,
        } => {
            let list = if u.arbitrary()? { self_mask } else { mask_key };
            if list.is_empty() || u.ratio(1, 4)? {
                list.push(share(u, n)?);
            } else {
                let i = u.choose_index(list.len())?;
                match u.int_in_range(0..=2u8)? {
                    0 => list[i].owner = party(u, n)?,
                    1 => {
                        list.remove(i);
                    }
                    _ => flip(u, &mut list[i].share)?,
                }
            }
        }
    }
    Ok(m)
}

struct Run {
    setup: Setup,
    ids: Identities,
    server: Server,
    clients: BTreeMap<PartyId, Client>,
    /// Each party's input (on the fixed-point grid, so sums are exact).
    inputs: Vec<Vec<f64>>,
    /// Messages the real clients made, not delivered yet.
    pending: VecDeque<(PartyId, ClientMessage)>,
    /// Everything delivered to the server, for replays.
    delivered: Vec<(PartyId, ClientMessage)>,
    /// The masked input each real client made.
    honest_inputs: BTreeMap<PartyId, Vec<u8>>,
    /// Parties whose masked input the server took.
    took_input: BTreeSet<PartyId>,
    /// The server took a masked input that its party's client did not make.
    foreign_input: bool,
    now: u64,
}

impl Run {
    fn new(u: &mut Unstructured) -> Result<Run> {
        let setup = setup(u)?;
        let ids = Identities::new(&setup.parties);
        let d = setup.dimension as usize;
        let mut inputs = Vec::new();
        for _ in &setup.parties {
            let mut x = Vec::new();
            for _ in 0..d {
                x.push(f64::from(u.int_in_range(-512..=512i16)?) / 8.0);
            }
            inputs.push(x);
        }
        let server = Server::new(setup.clone(), 0, PHASE_MS).expect("a valid setup");
        let mut run = Run {
            ids,
            server,
            clients: BTreeMap::new(),
            inputs,
            pending: VecDeque::new(),
            delivered: Vec::new(),
            honest_inputs: BTreeMap::new(),
            took_input: BTreeSet::new(),
            foreign_input: false,
            now: 0,
            setup,
        };
        for p in 0..run.setup.parties.len() as PartyId {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&p.to_be_bytes());
            seed[4] = u.arbitrary()?;
            let (client, first) = Client::new(
                run.setup.clone(),
                p,
                &run.inputs[p as usize],
                &run.ids.signer(p),
                seed,
            )
            .expect("a client of a valid setup starts");
            run.clients.insert(p, client);
            run.pending.push_back((p, first));
        }
        Ok(run)
    }

    fn deliver(&mut self, from: PartyId, msg: ClientMessage) {
        let input = match &msg {
            ClientMessage::MaskedInput(b) => Some(b.clone()),
            _ => None,
        };
        let before = self.server.phase();
        let took = self.server.handle(self.now, from, msg.clone(), &self.ids);
        if took.is_ok()
            && let Some(bytes) = input
        {
            assert_eq!(before, Phase::MaskedInput, "an input taken in {before:?}");
            assert!(
                self.took_input.insert(from),
                "party {from}'s input taken twice"
            );
            if self.honest_inputs.get(&from) != Some(&bytes) {
                self.foreign_input = true;
            }
        }
        self.delivered.push((from, msg));
        self.relay();
    }

    /// The server's messages go to the clients still running; their answers wait.
    fn relay(&mut self) {
        while let Some((to, msg)) = self.server.poll_transmit() {
            let Some(client) = self.clients.get_mut(&to) else {
                continue;
            };
            match client.handle(msg, &self.ids, &self.ids.signer(to)) {
                Ok(answer) => {
                    if let ClientMessage::MaskedInput(b) = &answer {
                        self.honest_inputs.insert(to, b.clone());
                    }
                    self.pending.push_back((to, answer));
                }
                // A client that refuses what it was sent stops (it is right to, or the
                // server is wrong: the sum below says which).
                Err(_) => {
                    self.clients.remove(&to);
                }
            }
        }
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        let n = self.setup.parties.len();
        match u.int_in_range(0..=9u8)? {
            // Mostly: the next real message, as it is.
            0..=3 => {
                if let Some((from, msg)) = self.pending.pop_front() {
                    self.deliver(from, msg);
                } else {
                    self.timeout();
                }
            }
            4 => {
                if let Some((from, msg)) = self.pending.pop_front() {
                    let m = mutate(u, &msg, n)?;
                    self.deliver(from, m);
                    // The real one may still arrive later.
                    if u.arbitrary()? {
                        self.pending.push_back((from, msg));
                    }
                }
            }
            // A party drops out: its next message never arrives.
            5 => {
                if !self.pending.is_empty() {
                    let i = u.choose_index(self.pending.len())?;
                    if let Some((p, _)) = self.pending.remove(i) {
                        self.clients.remove(&p);
                    }
                }
            }
            // A replay, perhaps in another party's name.
            6 => {
                if !self.delivered.is_empty() {
                    let i = u.choose_index(self.delivered.len())?;
                    let (from, msg) = self.delivered[i].clone();
                    let from = if u.arbitrary()? { from } else { party(u, n)? };
                    self.deliver(from, msg);
                }
            }
            7 => {
                let from = party(u, n)?;
                let m = made_up(u, &self.setup)?;
                self.deliver(from, m);
            }
            8 => {
                self.now = self.now.saturating_add(u.int_in_range(0..=2 * PHASE_MS)?);
                self.server.handle_timeout(self.now);
                self.relay();
            }
            _ => {
                if u.ratio(1, 4)? {
                    self.server.close_phase(self.now);
                    self.relay();
                } else if u.ratio(1, 16)? {
                    self.server.abort("fuzz");
                } else if let Some(i) = (!self.pending.is_empty())
                    .then(|| u.choose_index(self.pending.len()))
                    .transpose()?
                {
                    // Out of order.
                    if let Some(item) = self.pending.remove(i) {
                        self.deliver(item.0, item.1);
                    }
                }
            }
        }
        Ok(())
    }

    fn timeout(&mut self) {
        if let Some(t) = self.server.poll_timeout() {
            self.now = self.now.max(t);
            self.server.handle_timeout(self.now);
            self.relay();
        }
    }

    fn check(&self) {
        let done = self.server.phase() == Phase::Done;
        assert_eq!(self.server.poll_timeout().is_some(), !done);
        assert_eq!(self.server.outcome().is_some(), done);
        assert!(
            self.server
                .contributors()
                .iter()
                .all(|p| self.took_input.contains(p))
        );
        let Some(Ok(sum)) = self.server.outcome() else {
            return;
        };
        let t = self.setup.threshold as usize;
        let contributors = self.server.contributors();
        assert!(
            contributors.len() >= t,
            "a sum of {} parties, threshold {t}",
            contributors.len()
        );
        assert_eq!(contributors, &self.took_input);
        assert_eq!(sum.len(), self.setup.dimension as usize);
        let mask = self.setup.quant.mask();
        assert!(sum.iter().all(|w| w & !mask == 0));
        if !self.foreign_input {
            let mut expected = vec![0.0; self.setup.dimension as usize];
            for &p in contributors {
                for (e, x) in expected.iter_mut().zip(&self.inputs[p as usize]) {
                    *e += x;
                }
            }
            assert_eq!(
                self.setup.quant.decode(sum),
                expected,
                "the sum of {contributors:?} is wrong"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut run) = Run::new(&mut u) else {
        return;
    };
    for _ in 0..200 {
        if run.server.outcome().is_some() || u.is_empty() {
            break;
        }
        if run.step(&mut u).is_err() {
            break;
        }
        run.check();
    }
    // The input ran out: the rest of the real messages arrive, and phases time out.
    for _ in 0..200 {
        if run.server.outcome().is_some() {
            break;
        }
        match run.pending.pop_front() {
            Some((from, msg)) => run.deliver(from, msg),
            None => run.timeout(),
        }
        run.check();
    }
    assert!(
        run.server.outcome().is_some(),
        "the aggregation never ended"
    );
    run.check();
});
