//! A server that tells different parties different survivor lists (found by the red team).
//!
//! The distributed noise of differential privacy (`docs/privacy.md`, `dp/mod.rs`) has each
//! site add `σ²/(t − c)`, on the argument that any decoded sum holds the inputs of at least
//! `t − c` honest sites. That holds only when every party is told the same survivors.
//! Before the consistency round, each party checked only that it was listed itself and that
//! at least `t` survivors were listed: a server that gave each party its own list collected
//! `t` shares of the self-mask seed of a few parties (listed by everyone) and `t` shares of
//! the mask key of every other party (each excluded by enough lists), and decoded a sum
//! over 4 of 20 sites (t = 11) without any colluding site; over five attempts of one round,
//! one site's input alone. With the consistency round of Bonawitz et al. (2017, §4.3) every
//! party signs the list it was given and reveals only against `t` of its holders'
//! signatures over that same list: the attack gets no share at all.

use std::collections::{BTreeMap, BTreeSet};

use super::sim::Identities;
use super::{AdvertisedKeys, Client, ClientMessage, PartyId, ServerMessage, Setup};
use crate::quant::QuantParams;

const N: usize = 20;
/// The aggregator's defaults for 20 sites: one tolerated colluder, threshold (20 + 1)/2 + 1
/// = 11 (which every node's `check_collusion_margin(1)` accepts), full graph.
const T: u32 = 11;
const COLLUDERS: u32 = 1;

fn input(u: usize) -> f64 {
    (u + 1) as f64
}

/// One attempt of a round (label `study/1/<attempt>`) with every one of the 20 sites
/// honest and alive, run by a server that tells each site its own survivors, so that only
/// the sites in `included` (4 of them) stay in every list and each other site is left out
/// of 11 lists (9 of its fellows' and 2 of the included sites'); no list is shorter than
/// t. Returns how many sites revealed their shares.
fn equivocating_attempt(attempt: u32, included: &[usize]) -> usize {
    assert_eq!(included.len(), 4);
    let label = format!("study/1/{attempt}");
    let setup = Setup {
        label: label.clone(),
        parties: (0..N).map(|i| format!("site-{i:02}")).collect(),
        threshold: T,
        neighbours: (N - 1) as u32,
        graph_seed: Setup::graph_seed_for(&label),
        dimension: 1,
        quant: QuantParams::for_parties(N, 1e3, 16).unwrap(),
        binding: [0; 32],
    };
    setup.validate().unwrap();
    setup.check_collusion_margin(COLLUDERS).unwrap();
    let ids = Identities::new(&setup.parties);

    // Phase 1: keys.
    let mut clients = Vec::new();
    let mut keys: BTreeMap<PartyId, AdvertisedKeys> = BTreeMap::new();
    for u in 0..N {
        let mut seed = [0u8; 32];
        seed[0] = u as u8;
        seed[1] = attempt as u8;
        let (c, msg) = Client::new(
            setup.clone(),
            u as u32,
            &[input(u)],
            &ids.signer(u as u32),
            seed,
        )
        .unwrap();
        let ClientMessage::AdvertiseKeys(k) = msg else {
            panic!()
        };
        keys.insert(u as u32, k);
        clients.push(c);
    }
    // Phase 2: the key directory; sealed shares.
    let mut sealed = Vec::new();
    for (u, c) in clients.iter_mut().enumerate() {
        let dir = keys
            .iter()
            .filter(|(v, _)| **v != u as u32)
            .map(|(_, k)| k.clone())
            .collect();
        let ClientMessage::ShareKeys(s) = c
            .handle(
                ServerMessage::KeyDirectory(dir),
                &ids,
                &ids.signer(u as u32),
            )
            .unwrap()
        else {
            panic!()
        };
        sealed.extend(s);
    }
    // Phase 3: relay the shares; masked inputs.
    for (u, c) in clients.iter_mut().enumerate() {
        let mine = sealed
            .iter()
            .filter(|s| s.to == u as u32)
            .cloned()
            .collect();
        let answer = c
            .handle(
                ServerMessage::EncryptedShares(mine),
                &ids,
                &ids.signer(u as u32),
            )
            .unwrap();
        assert!(matches!(answer, ClientMessage::MaskedInput(_)));
    }
    // Phase 4: a survivor list per party, each signed by the parties given it.
    let others: Vec<usize> = (0..N).filter(|u| !included.contains(u)).collect();
    let mut excluded: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for (i, &p) in others.iter().enumerate() {
        excluded.insert(p, (1..=9).map(|k| others[(i + k) % 16]).collect());
    }
    for (j, &p) in included.iter().enumerate() {
        let half = if j % 2 == 0 {
            &others[..8]
        } else {
            &others[8..]
        };
        excluded.insert(p, half.iter().copied().collect());
    }
    let list = |u: usize| -> Vec<PartyId> {
        (0..N)
            .filter(|v| !excluded[&u].contains(v))
            .map(|v| v as u32)
            .collect()
    };
    let mut signatures: Vec<(PartyId, Vec<u8>)> = Vec::new();
    for (u, c) in clients.iter_mut().enumerate() {
        let survivors = list(u);
        assert!(survivors.len() >= T as usize);
        let ClientMessage::SurvivorsSigned(sig) = c
            .handle(
                ServerMessage::ConsistencyCheck { survivors },
                &ids,
                &ids.signer(u as u32),
            )
            .expect("an honest party signs the list it is given")
        else {
            panic!()
        };
        signatures.push((u as u32, sig));
    }
    // Phase 5: each party asked to unmask against its own list, with every signature the
    // server holds: a party counts only those over the list it signed.
    let mut revealed = 0;
    for (u, c) in clients.iter_mut().enumerate() {
        let answer = c.handle(
            ServerMessage::UnmaskRequest {
                survivors: list(u),
                signatures: signatures.clone(),
            },
            &ids,
            &ids.signer(u as u32),
        );
        if let Ok(ClientMessage::UnmaskShares { .. }) = answer {
            revealed += 1;
        }
    }
    revealed
}

/// A server alone, telling each of 20 sites (t = 11) its own survivors so as to decode the
/// sum of sites 0..4 (4 honest noise shares, 0.4·σ²): no site reveals a share.
#[test]
fn a_server_that_equivocates_about_survivors_gets_no_share() {
    let revealed = equivocating_attempt(1, &[0, 1, 2, 3]);
    assert_eq!(
        revealed, 0,
        "{revealed} sites revealed shares to an equivocating server"
    );
}

/// Five attempts of one round (which a node joins again with the same parties), each
/// equivocating towards another 4-subset, would have given site 0's input alone: none
/// gets a share.
#[test]
fn equivocating_attempts_of_one_round_isolate_no_site() {
    let five = [0usize, 1, 2, 3, 4];
    for skip in 0..5 {
        let subset: Vec<usize> = five.iter().copied().filter(|&u| u != skip).collect();
        assert_eq!(equivocating_attempt(skip as u32 + 1, &subset), 0);
    }
}
