//! Secure aggregation in memory with virtual time: the sum is exact, dropouts up to n - t
//! are survived at every phase, and each attack in the threat model fails.

use std::collections::BTreeMap;

use medfed_protocol::quant::{QuantParams, unpack};
use medfed_protocol::secagg::sim::{DropBefore, Identities, NoClock, run};
use medfed_protocol::secagg::{ClientMessage, PartyId, SecAggError, Setup, choose_neighbours};

const SCALE_BITS: u8 = 16;

fn setup(n: usize, k: u32, t: u32, d: usize) -> Setup {
    let label = format!("test/{n}/{k}/{t}");
    Setup {
        graph_seed: Setup::graph_seed_for(&label),
        label,
        parties: (0..n).map(|i| format!("site-{i:04}")).collect(),
        threshold: t,
        neighbours: k,
        dimension: d as u32,
        quant: QuantParams::for_parties(n, 8.0, SCALE_BITS).unwrap(),
        binding: [7; 32],
    }
}

/// Inputs on the fixed-point grid, so quantization is exact and sums can be compared exactly.
fn inputs(n: usize, d: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| {
            (0..d)
                .map(|j| (((i * 31 + j * 17) % 2001) as f64 - 1000.0) / 256.0)
                .collect()
        })
        .collect()
}

fn expected_sum(setup: &Setup, xs: &[Vec<f64>], who: impl Iterator<Item = PartyId>) -> Vec<f64> {
    let mut sum = vec![0.0; setup.dimension as usize];
    for u in who {
        for (s, x) in sum.iter_mut().zip(&xs[u as usize]) {
            *s += x;
        }
    }
    sum
}

fn check_exact(setup: &Setup, xs: &[Vec<f64>], drops: &BTreeMap<PartyId, DropBefore>) -> usize {
    let ids = Identities::new(&setup.parties);
    let out = run(
        setup,
        &|u| xs[u as usize].clone(),
        drops,
        &ids,
        &mut NoClock,
        2,
        true,
        None,
    );
    let sum = out
        .result
        .unwrap_or_else(|e| panic!("aggregation failed: {e} (drops {drops:?})"));
    let decoded = setup.quant.decode(&sum);
    assert_eq!(
        decoded,
        expected_sum(setup, xs, out.contributors.iter().copied())
    );
    // Exactly the parties that did not drop before sending input contributed.
    for u in 0..setup.parties.len() as PartyId {
        let sent_input = drops.get(&u).is_none_or(|d| *d > DropBefore::MaskedInput);
        assert_eq!(out.contributors.contains(&u), sent_input, "party {u}");
    }
    out.contributors.len()
}

#[test]
fn the_sum_is_exact_without_dropouts() {
    for (n, k, t) in [(2, 1, 2), (3, 2, 2), (10, 9, 6), (40, 10, 7)] {
        let s = setup(n, k, t, 50);
        assert_eq!(check_exact(&s, &inputs(n, 50), &BTreeMap::new()), n);
    }
}

#[test]
fn dropouts_up_to_n_minus_t_at_every_phase_are_survived() {
    let (n, k, t) = (12usize, 11, 7usize);
    let s = setup(n, k, t as u32, 20);
    let xs = inputs(n, 20);
    for phase in [
        DropBefore::AdvertiseKeys,
        DropBefore::ShareKeys,
        DropBefore::MaskedInput,
        DropBefore::Unmasking,
    ] {
        let drops = (0..(n - t) as PartyId)
            .map(|u| (u * 2 % n as PartyId, phase))
            .collect();
        check_exact(&s, &xs, &drops);
    }
    // Mixed: one party lost in each phase.
    let drops = BTreeMap::from([
        (1, DropBefore::AdvertiseKeys),
        (4, DropBefore::ShareKeys),
        (7, DropBefore::MaskedInput),
        (10, DropBefore::Unmasking),
    ]);
    check_exact(&s, &xs, &drops);
}

#[test]
fn more_dropouts_abort_cleanly_and_reveal_nothing() {
    let (n, k, t) = (8usize, 7, 5usize);
    let s = setup(n, k, t as u32, 10);
    let xs = inputs(n, 10);
    let ids = Identities::new(&s.parties);
    for phase in [
        DropBefore::AdvertiseKeys,
        DropBefore::ShareKeys,
        DropBefore::MaskedInput,
    ] {
        let drops = (0..(n - t + 1) as PartyId).map(|u| (u, phase)).collect();
        let out = run(
            &s,
            &|u| xs[u as usize].clone(),
            &drops,
            &ids,
            &mut NoClock,
            2,
            true,
            None,
        );
        assert!(
            matches!(out.result, Err(SecAggError::TooFewSurvivors { .. })),
            "{phase:?}: {:?}",
            out.result
        );
        let revealed = out
            .sent
            .values()
            .flatten()
            .any(|m| matches!(m, ClientMessage::UnmaskShares { .. }));
        assert!(
            !revealed,
            "{phase:?}: shares were revealed in an aborted round"
        );
    }
    // Too few left to unmask: the server cannot rebuild the masks and says so, at the
    // consistency check (too few signers) before anyone reveals anything.
    let drops = (0..(n - t + 1) as PartyId)
        .map(|u| (u, DropBefore::Unmasking))
        .collect();
    let out = run(
        &s,
        &|u| xs[u as usize].clone(),
        &drops,
        &ids,
        &mut NoClock,
        2,
        true,
        None,
    );
    assert!(
        matches!(
            out.result,
            Err(SecAggError::TooFewSurvivors {
                phase: "consistency check",
                ..
            })
        ),
        "{:?}",
        out.result
    );
}

#[test]
fn a_thousand_parties_with_secagg_plus_and_dropouts_in_every_phase() {
    let n = 1000;
    let (k, t) = choose_neighbours(n, 0.1, 0.05, 20, 30);
    assert!(k < 100, "k = {k}");
    let s = setup(n, k, t, 16);
    let xs = inputs(n, 16);
    // 2% of the parties lost in each phase: 8% in all.
    let phases = [
        DropBefore::AdvertiseKeys,
        DropBefore::ShareKeys,
        DropBefore::MaskedInput,
        DropBefore::Unmasking,
    ];
    let drops = (0..80u32)
        .map(|i| (i * 12 + 5, phases[(i % 4) as usize]))
        .collect();
    let contributors = check_exact(&s, &xs, &drops);
    assert_eq!(contributors, n - 60);
}

#[test]
fn one_masked_input_looks_uniform_to_the_server() {
    let (n, d) = (5, 50_000);
    let s = setup(n, 4, 3, d);
    // A very non-uniform input: every coordinate the same small value.
    let xs = vec![vec![1.0; d]; n];
    let ids = Identities::new(&s.parties);
    let out = run(
        &s,
        &|u| xs[u as usize].clone(),
        &BTreeMap::new(),
        &ids,
        &mut NoClock,
        2,
        true,
        None,
    );
    assert!(out.result.is_ok());
    let masked = out.sent[&0].iter().find_map(|m| match m {
        ClientMessage::MaskedInput(bytes) => unpack(bytes, s.quant.modulus_bits),
        _ => None,
    });
    let words = masked.expect("party 0 sent a masked input");
    // Chi-square of the top and bottom bytes of each word against uniform.
    for shift in [0, s.quant.modulus_bits as u32 - 8] {
        let mut hist = [0f64; 256];
        for w in &words {
            hist[((w >> shift) & 0xff) as usize] += 1.0;
        }
        let e = d as f64 / 256.0;
        let chi2: f64 = hist.iter().map(|o| (o - e).powi(2) / e).sum();
        // 255 degrees of freedom: the 99.9% quantile is about 330.
        assert!(chi2 < 330.0, "byte at bit {shift}: chi2 = {chi2}");
    }
    // The same test tells the unmasked encoding apart at once (seeded, like everything in
    // protocol: the stochastic rounding must not make the test flaky).
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
    let plain = s.quant.encode(&xs[0], &mut rng);
    let mut hist = [0f64; 256];
    plain.iter().for_each(|w| hist[(w & 0xff) as usize] += 1.0);
    assert!(hist.iter().filter(|&&c| c > 0.0).count() < 4);
}

#[test]
fn a_late_input_is_refused_and_never_both_unmasked_and_key_revealed() {
    let (n, t) = (6, 4);
    let s = setup(n, 5, t, 8);
    let xs = inputs(n, 8);
    let ids = Identities::new(&s.parties);
    // Party 2 goes silent before the masked-input phase: the server times out, asks the
    // others to unmask; then party 2's input arrives late.
    let drops = BTreeMap::from([(2, DropBefore::MaskedInput)]);
    let out = run(
        &s,
        &|u| xs[u as usize].clone(),
        &drops,
        &ids,
        &mut NoClock,
        2,
        true,
        None,
    );
    let sum = out.result.expect("the round completes without party 2");
    assert!(!out.contributors.contains(&2));
    assert_eq!(
        s.quant.decode(&sum),
        expected_sum(&s, &xs, out.contributors.iter().copied())
    );
    // Survivors revealed party 2's mask key and no survivor revealed its self-mask seed.
    for msgs in out.sent.values() {
        for m in msgs {
            if let ClientMessage::UnmaskShares {
                self_mask,
                mask_key,
            } = m
            {
                assert!(self_mask.iter().all(|r| r.owner != 2));
                assert!(mask_key.iter().any(|r| r.owner == 2));
            }
        }
    }
    // A server in the unmasking phase refuses input, late or not.
    let mut server = medfed_protocol::secagg::Server::new(s.clone(), 0, 10).unwrap();
    for u in 0..n as PartyId {
        let _ = server.handle(0, u, ClientMessage::MaskedInput(vec![0; 64]), &ids);
    }
    assert!(matches!(
        server.handle(0, 0, ClientMessage::MaskedInput(vec![0; 64]), &ids),
        Err(SecAggError::WrongPhase {
            kind: "masked-input",
            phase: "advertise keys",
            ..
        })
    ));
}

#[test]
fn hostile_messages_are_rejected_and_the_round_goes_on() {
    let (n, t) = (7, 4);
    let s = setup(n, 6, t, 8);
    let xs = inputs(n, 8);
    let ids = Identities::new(&s.parties);
    let mut first_keys = None;
    let out = run(
        &s,
        &|u| xs[u as usize].clone(),
        &BTreeMap::new(),
        &ids,
        &mut NoClock,
        2,
        true,
        Some(&mut |u, m| match (u, m) {
            // Party 1 forges its signature.
            (1, ClientMessage::AdvertiseKeys(mut k)) => {
                k.signature[0] ^= 1;
                ClientMessage::AdvertiseKeys(k)
            }
            // Party 3 sends a masked input one word short.
            (3, ClientMessage::MaskedInput(mut b)) => {
                b.truncate(b.len() - s.quant.word_bytes());
                ClientMessage::MaskedInput(b)
            }
            (u, m) => {
                if u == 5
                    && let ClientMessage::AdvertiseKeys(k) = &m
                {
                    first_keys = Some(k.clone());
                }
                m
            }
        }),
    );
    let rejected: Vec<_> = out.rejected.iter().map(|(u, e)| (*u, e.clone())).collect();
    assert!(
        rejected.contains(&(1, SecAggError::ForgedSignature { party: 1 })),
        "{rejected:?}"
    );
    assert!(
        rejected.iter().any(|(u, e)| *u == 3
            && matches!(
                e,
                SecAggError::WrongLength {
                    what: "masked input",
                    ..
                }
            )),
        "{rejected:?}"
    );
    let sum = out.result.expect("the others' round completes");
    assert_eq!(
        out.contributors.iter().copied().collect::<Vec<_>>(),
        vec![0, 2, 4, 5, 6]
    );
    assert_eq!(
        s.quant.decode(&sum),
        expected_sum(&s, &xs, out.contributors.iter().copied())
    );

    // Replays: the same keys again are a duplicate; keys from another aggregation do not
    // verify under this one's context.
    let mut server = medfed_protocol::secagg::Server::new(s.clone(), 0, 10).unwrap();
    let keys = first_keys.expect("party 5 advertised keys");
    server
        .handle(0, 5, ClientMessage::AdvertiseKeys(keys.clone()), &ids)
        .unwrap();
    assert_eq!(
        server.handle(0, 5, ClientMessage::AdvertiseKeys(keys.clone()), &ids),
        Err(SecAggError::Duplicate(5))
    );
    let mut other = s.clone();
    other.label = "another round".into();
    other.graph_seed = Setup::graph_seed_for(&other.label);
    let mut server = medfed_protocol::secagg::Server::new(other, 0, 10).unwrap();
    assert_eq!(
        server.handle(0, 5, ClientMessage::AdvertiseKeys(keys.clone()), &ids),
        Err(SecAggError::ForgedSignature { party: 5 })
    );
    // Keys sent in another party's name are refused.
    assert!(matches!(
        server.handle(0, 4, ClientMessage::AdvertiseKeys(keys.clone()), &ids),
        Err(SecAggError::Invalid { from: 4, .. })
    ));
    // A key of small order (here the point of order 1, u = 0, and u = 1) is refused before
    // any neighbour sees it.
    for weak in [[0u8; 32], {
        let mut one = [0u8; 32];
        one[0] = 1;
        one
    }] {
        let mut bad = keys.clone();
        bad.party = 6;
        bad.c_pk = weak;
        let err = server
            .handle(0, 6, ClientMessage::AdvertiseKeys(bad), &ids)
            .unwrap_err();
        assert!(err.to_string().contains("small order"), "{err}");
    }
    assert_eq!(
        server.handle(0, 99, ClientMessage::MaskedInput(vec![]), &ids),
        Err(SecAggError::UnknownParty(99))
    );
}

#[test]
fn a_server_that_substitutes_keys_is_caught_by_the_clients() {
    use medfed_protocol::secagg::{Client, ServerMessage};
    let s = setup(3, 2, 2, 4);
    let ids = Identities::new(&s.parties);
    let xs = inputs(3, 4);
    let (mut c0, _) = Client::new(s.clone(), 0, &xs[0], &ids.signer(0), [1; 32]).unwrap();
    let (_, ClientMessage::AdvertiseKeys(mut k1)) =
        Client::new(s.clone(), 1, &xs[1], &ids.signer(1), [2; 32]).unwrap()
    else {
        panic!()
    };
    let (_, ClientMessage::AdvertiseKeys(k2)) =
        Client::new(s.clone(), 2, &xs[2], &ids.signer(2), [3; 32]).unwrap()
    else {
        panic!()
    };
    // The server swaps in its own mask key for party 1 (to learn party 0's pairwise mask).
    k1.s_pk = k2.s_pk;
    let err = c0
        .handle(
            ServerMessage::KeyDirectory(vec![k1, k2]),
            &ids,
            &ids.signer(0),
        )
        .unwrap_err();
    assert_eq!(err, SecAggError::ForgedSignature { party: 1 });
}

#[test]
fn a_client_listed_as_dropped_reveals_nothing_and_answers_only_once() {
    use medfed_protocol::secagg::{Client, ServerMessage};
    let s = setup(4, 3, 3, 4);
    let xs = inputs(4, 4);
    let ids = Identities::new(&s.parties);
    // Four honest clients, driven by hand up to the unmask request.
    let (mut clients, mut keys) = (Vec::new(), Vec::new());
    for u in 0..4u32 {
        let (c, m) = Client::new(
            s.clone(),
            u,
            &xs[u as usize],
            &ids.signer(u),
            [u as u8 + 1; 32],
        )
        .unwrap();
        let ClientMessage::AdvertiseKeys(k) = m else {
            unreachable!()
        };
        clients.push(c);
        keys.push(k);
    }
    let mut sealed = Vec::new();
    for (u, c) in clients.iter_mut().enumerate() {
        let ClientMessage::ShareKeys(sh) = c
            .handle(
                ServerMessage::KeyDirectory(keys.clone()),
                &ids,
                &ids.signer(u as u32),
            )
            .unwrap()
        else {
            unreachable!()
        };
        sealed.extend(sh);
    }
    for (u, c) in clients.iter_mut().enumerate() {
        let mine = sealed
            .iter()
            .filter(|x| x.to == u as PartyId)
            .cloned()
            .collect();
        assert!(matches!(
            c.handle(
                ServerMessage::EncryptedShares(mine),
                &ids,
                &ids.signer(u as u32)
            )
            .unwrap(),
            ClientMessage::MaskedInput(_)
        ));
    }
    // The server claims party 0 dropped (to collect its mask key) yet asks party 0 to sign.
    let err = clients[0]
        .handle(
            ServerMessage::ConsistencyCheck {
                survivors: vec![1, 2, 3],
            },
            &ids,
            &ids.signer(0),
        )
        .unwrap_err();
    assert!(
        matches!(err, SecAggError::Inconsistent(ref why) if why.contains("dropped")),
        "{err:?}"
    );
    // Parties 1..4 sign the full list; each reveals only against t signatures over the list
    // it signed.
    let all = vec![0, 1, 2, 3];
    let mut sigs = Vec::new();
    for u in 1..4u32 {
        let ClientMessage::SurvivorsSigned(sig) = clients[u as usize]
            .handle(
                ServerMessage::ConsistencyCheck {
                    survivors: all.clone(),
                },
                &ids,
                &ids.signer(u),
            )
            .unwrap()
        else {
            unreachable!()
        };
        sigs.push((u, sig));
    }
    // Two signatures are fewer than t = 3: nothing is revealed.
    let err = clients[3]
        .handle(
            ServerMessage::UnmaskRequest {
                survivors: all.clone(),
                signatures: sigs[..2].to_vec(),
            },
            &ids,
            &ids.signer(3),
        )
        .unwrap_err();
    assert!(
        matches!(err, SecAggError::Inconsistent(ref why) if why.contains("signed")),
        "{err:?}"
    );
    // Three over the list party 1 signed: it reveals, once.
    let first = clients[1]
        .handle(
            ServerMessage::UnmaskRequest {
                survivors: all.clone(),
                signatures: sigs.clone(),
            },
            &ids,
            &ids.signer(1),
        )
        .unwrap();
    assert!(matches!(first, ClientMessage::UnmaskShares { .. }));
    assert!(
        clients[1]
            .handle(
                ServerMessage::UnmaskRequest {
                    survivors: vec![1, 2, 3],
                    signatures: sigs.clone(),
                },
                &ids,
                &ids.signer(1)
            )
            .is_err()
    );
    // Another list than the one it signed (party 0 "dropped", to get its mask key on top of
    // its self-mask seed): refused, whatever signatures come with it.
    let err = clients[2]
        .handle(
            ServerMessage::UnmaskRequest {
                survivors: vec![1, 2, 3],
                signatures: sigs,
            },
            &ids,
            &ids.signer(2),
        )
        .unwrap_err();
    assert!(
        matches!(err, SecAggError::Inconsistent(ref why) if why.contains("signed")),
        "{err:?}"
    );
}

/// Changes every byte of `owner`'s share (after its x-coordinate) by an amount that
/// depends on the byte and on the party `by` that reveals it. (The same change on several
/// shares could cancel out in the interpolation: a wrong share that rebuilds the right
/// secret is harmless, but would prove nothing here.)
fn corrupt(
    shares: &mut [medfed_protocol::secagg::RevealedShare],
    owner: PartyId,
    by: PartyId,
) -> bool {
    let mut hit = false;
    for r in shares.iter_mut().filter(|r| r.owner == owner) {
        for (i, b) in r.share.iter_mut().enumerate().skip(1) {
            *b ^= (i as u8).wrapping_mul(29).wrapping_add(by as u8 * 71) | 1;
        }
        hit = true;
    }
    hit
}

#[test]
fn wrong_revealed_shares_are_got_around_and_never_corrupt_the_sum() {
    // 7 parties, complete graph (7 holders per secret), t = 5: two spare shares.
    let (n, t) = (7, 5);
    let s = setup(n, 6, t, 8);
    let xs = inputs(n, 8);
    let ids = Identities::new(&s.parties);
    // Party 3 drops before sending its input: its mask key is revealed. Party 1 reveals a
    // wrong share of party 0's self-mask seed and party 2 a wrong share of party 3's key.
    let drops = BTreeMap::from([(3, DropBefore::MaskedInput)]);
    let mut tampered = Vec::new();
    let out = run(
        &s,
        &|u| xs[u as usize].clone(),
        &drops,
        &ids,
        &mut NoClock,
        2,
        false,
        Some(&mut |u, m| match m {
            ClientMessage::UnmaskShares {
                mut self_mask,
                mut mask_key,
            } => {
                if u == 1 && corrupt(&mut self_mask, 0, u) {
                    tampered.push("self mask of 0");
                }
                if u == 2 && corrupt(&mut mask_key, 3, u) {
                    tampered.push("mask key of 3");
                }
                ClientMessage::UnmaskShares {
                    self_mask,
                    mask_key,
                }
            }
            m => m,
        }),
    );
    assert_eq!(tampered, ["self mask of 0", "mask key of 3"]);
    let sum = out
        .result
        .expect("one wrong share per secret is got around");
    assert_eq!(
        s.quant.decode(&sum),
        expected_sum(&s, &xs, out.contributors.iter().copied())
    );
    assert_eq!(
        out.inconsistent.iter().copied().collect::<Vec<_>>(),
        vec![(0, 1), (3, 2)],
        "the inconsistent shares are named: (owner, holder)"
    );

    // Three wrong shares of party 0's seed leave 4 right ones, below t = 5: the round fails
    // naming party 0, instead of releasing a wrong sum.
    let out = run(
        &s,
        &|u| xs[u as usize].clone(),
        &BTreeMap::new(),
        &ids,
        &mut NoClock,
        2,
        false,
        Some(&mut |u, m| match m {
            ClientMessage::UnmaskShares {
                mut self_mask,
                mask_key,
            } if (1..=3).contains(&u) => {
                corrupt(&mut self_mask, 0, u);
                ClientMessage::UnmaskShares {
                    self_mask,
                    mask_key,
                }
            }
            m => m,
        }),
    );
    let err = out.result.expect_err("no right subset of 5 shares exists");
    assert_eq!(
        err,
        SecAggError::Unrebuildable {
            owner: 0,
            what: "self-mask seed",
            gave_up: false
        }
    );
    assert!(
        err.to_string()
            .contains("some are wrong (its holders revealed wrong ones, or it dealt them)"),
        "{err}"
    );
}

#[test]
fn a_forged_self_mask_commitment_fails_the_signature() {
    use medfed_protocol::secagg::Server;
    let s = setup(3, 2, 3, 4);
    let ids = Identities::new(&s.parties);
    let mut keys = None;
    let _ = run(
        &s,
        &|_| vec![0.0; 4],
        &BTreeMap::new(),
        &ids,
        &mut NoClock,
        1,
        false,
        Some(&mut |u, m| {
            if let (1, ClientMessage::AdvertiseKeys(k)) = (u, &m) {
                keys = Some(k.clone());
            }
            m
        }),
    );
    let mut keys = keys.expect("party 1 advertised keys");
    keys.self_mask_commitment[0] ^= 1;
    let mut server = Server::new(s, 0, 10).unwrap();
    assert_eq!(
        server.handle(0, 1, ClientMessage::AdvertiseKeys(keys), &ids),
        Err(SecAggError::ForgedSignature { party: 1 })
    );
}
