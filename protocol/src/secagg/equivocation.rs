//! Red team: a server that tells different parties different survivor lists.
//!
//! The distributed noise of differential privacy (`docs/privacy.md`, `dp/mod.rs`) has each
//! site add `σ²/(t − c)`, on the argument that any decoded sum holds the inputs of at least
//! `t − c` honest sites. That holds when every party is told the same survivors. Nothing
//! makes it so: each party checks only that it is listed itself and that at least `t`
//! survivors are listed. A server that gives each party its own list can collect `t` shares
//! of the self-mask seed of a few parties (listed by everyone) and `t` shares of the mask
//! key of every other party (each excluded by enough lists), and decode a sum over far fewer
//! than `t` inputs (`Setup::threshold`: "the fewest parties whose input the server may
//! decode"), without any colluding site; over several attempts of one round (which a node
//! joins again with the same parties), one site's input alone. The fix is the consistency
//! round of Bonawitz et al. (2017, §4.3): every party signs the survivor list it was given,
//! and reveals only once it sees `t` signatures over that same list.

use std::collections::{BTreeMap, BTreeSet};

use super::client::{mask_sign, pair_seed, self_mask_seed};
use super::crypto::{self, KeyPair};
use super::sim::Identities;
use super::{AdvertisedKeys, Client, ClientMessage, PartyId, ServerMessage, Setup};
use crate::quant::{self, QuantParams};

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
/// t. Returns the sum it decodes.
fn equivocating_attempt(attempt: u32, included: &[usize]) -> f64 {
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
    let bits = setup.quant.modulus_bits;
    let context = setup.context();

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
        let ClientMessage::ShareKeys(s) = c.handle(ServerMessage::KeyDirectory(dir), &ids).unwrap()
        else {
            panic!()
        };
        sealed.extend(s);
    }
    // Phase 3: relay the shares; masked inputs, kept one by one (the server may).
    let mut masked: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for (u, c) in clients.iter_mut().enumerate() {
        let mine = sealed
            .iter()
            .filter(|s| s.to == u as u32)
            .cloned()
            .collect();
        let ClientMessage::MaskedInput(bytes) = c
            .handle(ServerMessage::EncryptedShares(mine), &ids)
            .unwrap()
        else {
            panic!()
        };
        masked.insert(u, quant::unpack(&bytes, bits).unwrap());
    }
    // Phase 4: a survivor list per party.
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
    let mut self_mask: BTreeMap<PartyId, Vec<Vec<u8>>> = BTreeMap::new();
    let mut mask_key: BTreeMap<PartyId, Vec<Vec<u8>>> = BTreeMap::new();
    for (u, c) in clients.iter_mut().enumerate() {
        let survivors: Vec<PartyId> = (0..N)
            .filter(|v| !excluded[&u].contains(v))
            .map(|v| v as u32)
            .collect();
        assert!(survivors.len() >= T as usize);
        let answer = c
            .handle(ServerMessage::UnmaskRequest { survivors }, &ids)
            .expect("an honest party reveals on its own list");
        let ClientMessage::UnmaskShares {
            self_mask: sm,
            mask_key: mk,
        } = answer
        else {
            panic!()
        };
        for r in sm {
            self_mask.entry(r.owner).or_default().push(r.share);
        }
        for r in mk {
            mask_key.entry(r.owner).or_default().push(r.share);
        }
    }
    // Decode the sum over `included` alone: their self masks, and the pairwise masks
    // shared with every other site (whose mask keys t lists gave away).
    let mut sum = vec![0u64; 1];
    for &u in included {
        for (s, w) in sum.iter_mut().zip(&masked[&u]) {
            *s = s.wrapping_add(*w);
        }
        let shares = &self_mask[&(u as u32)];
        assert!(shares.len() >= T as usize);
        let seed = crypto::shamir_combine(&shares[..T as usize]).unwrap();
        crypto::apply_mask(&mut sum, &self_mask_seed(&seed, &context), bits, -1);
    }
    for &h in &others {
        let shares = &mask_key[&(h as u32)];
        assert!(shares.len() >= T as usize, "{h}: {}", shares.len());
        let secret: [u8; 32] = crypto::shamir_combine(&shares[..T as usize])
            .unwrap()
            .try_into()
            .unwrap();
        let pair = KeyPair::from_secret(secret);
        assert_eq!(pair.public, keys[&(h as u32)].s_pk);
        for &v in included {
            let shared = crypto::agree(&pair.secret, &keys[&(v as u32)].s_pk).unwrap();
            crypto::apply_mask(
                &mut sum,
                &pair_seed(&shared, &context, h as u32, v as u32),
                bits,
                -mask_sign(v as u32, h as u32),
            );
        }
    }
    sum.iter_mut().for_each(|w| *w &= setup.quant.mask());
    setup.quant.decode(&sum)[0]
}

/// Each site's noise share is σ²/(t − c) = σ²/10, for at least 10 honest sites in any
/// sum. The server, alone, decodes the sum of sites 0..4: 4 honest shares of noise, 0.4·σ²
/// (with one colluding site, 2 honest sites: 0.2·σ²).
#[test]
fn a_server_that_equivocates_about_survivors_decodes_a_sum_of_too_few_sites() {
    let included = [0, 1, 2, 3];
    let decoded = equivocating_attempt(1, &included);
    let four: f64 = included.iter().map(|&u| input(u)).sum();
    let share = included.len() as f64 / f64::from(T - COLLUDERS);
    println!(
        "decoded {decoded} = the inputs of sites {included:?} ({four}); noise there: {share:.2}·σ²"
    );
    assert!(
        (decoded - four).abs() > 0.5,
        "a server alone decoded the sum of {} sites, fewer than t = {T} (and than t − c = {}): \
         the distributed noise of that sum is {share:.2}·σ², not σ²",
        included.len(),
        T - COLLUDERS,
    );
}

/// Worse: a node joins up to 16 attempts of a round with the same parties ("their sum is
/// the same, so nothing new is learnt"), but each attempt can decode a different subset.
/// The five 4-subsets of sites 0..5 give each of those sites' input alone: site 0's is the
/// sum of all five over 4, minus the one without it. Without noise (a round of a study
/// that opted in to exact training) that is one hospital's exact update.
#[test]
fn five_equivocating_attempts_of_one_round_isolate_one_site() {
    let five = [0usize, 1, 2, 3, 4];
    let sums: Vec<f64> = (0..5)
        .map(|skip| {
            let subset: Vec<usize> = five.iter().copied().filter(|&u| u != skip).collect();
            equivocating_attempt(skip as u32 + 1, &subset)
        })
        .collect();
    let total = sums.iter().sum::<f64>() / 4.0;
    let site0 = total - sums[0];
    println!(
        "site 0's input, isolated from 5 attempts: {site0} (its input: {})",
        input(0)
    );
    assert!(
        (site0 - input(0)).abs() > 0.5,
        "five attempts of one round gave site 0's input alone: {site0}"
    );
}
