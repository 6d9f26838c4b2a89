//! Compliance-log verification (`medfed_protocol::audit::verify`) of arbitrary bytes split
//! into lines, with the public key of a real log; and Merkle proofs
//! (`verify_inclusion`, `verify_consistency`) made up or changed by the fuzzer.
//!
//! The first byte chooses. Below 0x80 the rest is a log: the checked-in seed is a real log
//! (written as `medfed_infra::auditlog` writes one: a start, messages, decisions, a signed
//! tree head every few records, a stop), which the fuzzer then changes. A log that
//! verifies must be the real one as far as its last signed tree head covers it (the same
//! lines, byte for byte, and a head the key really signed): nobody without the key makes a
//! log that passes for it. Then each proof: a real proof verifies, and a proof that
//! verifies against the real root proves what is really in the tree.

#![no_main]

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use medfed_fuzz::RealLog;
use medfed_protocol::audit::merkle::{
    self, Hash, consistency_proof, inclusion_proof, verify_consistency, verify_inclusion,
};
use medfed_protocol::audit::{Event, Record, verify};

fn real_log() -> &'static RealLog {
    static LOG: OnceLock<RealLog> = OnceLock::new();
    LOG.get_or_init(medfed_fuzz::audit_log)
}

fn check_log(text: &[u8]) {
    let real = real_log();
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.split('\n').collect();
    let Ok(v) = verify(&lines, &real.public) else {
        return;
    };
    assert_eq!(v.records.len(), lines.len());
    assert!(v.signed <= v.records.len());
    assert_eq!(v.unsigned_tail(), v.records.len() - v.signed);
    let Some((size, root)) = v.head else {
        assert_eq!(v.signed, 0, "signed records without a head");
        return;
    };
    // The head the log ends its signed part with is one the key signed...
    assert!(
        real.heads.contains(&(size, root)),
        "a tree head over {size} records the key never signed"
    );
    assert_eq!(
        v.signed as u64,
        size + 1,
        "the signed part ends at its head"
    );
    // ...and every line it covers is the real one.
    for (i, line) in lines[..size as usize].iter().enumerate() {
        assert_eq!(
            *line,
            real.lines[i],
            "line {} differs from the real log but verifies",
            i + 1
        );
    }
    // The head's own line can differ in its JSON form (spacing, escapes), never in what it
    // says.
    let real_head: Record =
        serde_json::from_str(&real.lines[size as usize]).expect("the real head parses");
    assert_eq!(
        v.records[size as usize], real_head,
        "a signed head that says otherwise"
    );
    assert!(matches!(real_head.event, Event::TreeHead { .. }));
    assert_eq!(v.party, "st-marys");
    // A head the auditor saw is found in it.
    assert!(v.check_known_head(size, &root).is_ok());
}

/// A tree of up to 37 leaves, and its prefixes.
fn leaves() -> &'static Vec<Hash> {
    static LEAVES: OnceLock<Vec<Hash>> = OnceLock::new();
    LEAVES.get_or_init(|| {
        (0..37u32)
            .map(|i| merkle::leaf_hash(&i.to_be_bytes()))
            .collect()
    })
}

fn hash(u: &mut Unstructured) -> Result<Hash> {
    u.arbitrary()
}

/// A proof: the real one, or the real one changed, or made up.
fn proof(u: &mut Unstructured, real: Vec<Hash>) -> Result<Vec<Hash>> {
    let mut p = real;
    match u.int_in_range(0..=5u8)? {
        0 => {}
        1 => {
            if !p.is_empty() {
                let i = u.choose_index(p.len())?;
                p[i][u.choose_index(32)?] ^= 1 << u.int_in_range(0..=7u8)?;
            }
        }
        2 => {
            p.pop();
        }
        3 => p.push(hash(u)?),
        4 => {
            if p.len() >= 2 {
                let (i, j) = (u.choose_index(p.len())?, u.choose_index(p.len())?);
                p.swap(i, j);
            }
        }
        _ => {
            let n = u.int_in_range(0..=70usize)?;
            p = (0..n).map(|_| hash(u)).collect::<Result<_>>()?;
        }
    }
    Ok(p)
}

fn size(u: &mut Unstructured, real: usize) -> Result<usize> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => u.arbitrary()?,
        1 => real.wrapping_add(u.int_in_range(0..=3usize)?),
        2 => real.saturating_sub(u.int_in_range(0..=3usize)?),
        _ => real,
    })
}

fn check_inclusion(u: &mut Unstructured) -> Result<()> {
    let all = leaves();
    let n = u.int_in_range(1..=all.len())?;
    let tree = &all[..n];
    let root = merkle::root(tree);
    let m = u.int_in_range(0..=n - 1)?;
    let real_proof = inclusion_proof(tree, m);
    assert!(
        verify_inclusion(&tree[m], m, n, &real_proof, &root),
        "the real proof of leaf {m} of {n} fails"
    );
    let leaf = if u.ratio(1, 4)? { hash(u)? } else { tree[m] };
    let claimed_m = size(u, m)?;
    let claimed_n = size(u, n)?;
    let p = proof(u, real_proof)?;
    let claimed_root = if u.ratio(1, 8)? { hash(u)? } else { root };
    if verify_inclusion(&leaf, claimed_m, claimed_n, &p, &claimed_root)
        && claimed_root == root
        && claimed_n == n
    {
        assert!(claimed_m < n);
        assert_eq!(leaf, tree[claimed_m], "a false inclusion proof verifies");
    }
    Ok(())
}

fn check_consistency(u: &mut Unstructured) -> Result<()> {
    let all = leaves();
    let n = u.int_in_range(1..=all.len())?;
    let m = u.int_in_range(1..=n)?;
    let (old, new) = (merkle::root(&all[..m]), merkle::root(&all[..n]));
    let real_proof = consistency_proof(&all[..n], m);
    assert!(
        verify_consistency(m, n, &real_proof, &old, &new),
        "the real proof from {m} to {n} fails"
    );
    let claimed_m = size(u, m)?;
    let claimed_n = size(u, n)?;
    let p = proof(u, real_proof)?;
    let claimed_old = if u.ratio(1, 4)? { hash(u)? } else { old };
    let claimed_new = if u.ratio(1, 8)? { hash(u)? } else { new };
    if verify_consistency(claimed_m, claimed_n, &p, &claimed_old, &claimed_new)
        && claimed_new == new
        && claimed_n == n
    {
        assert!(claimed_m >= 1 && claimed_m <= n);
        assert_eq!(
            claimed_old,
            merkle::root(&all[..claimed_m]),
            "a false consistency proof verifies ({claimed_m} of {n})"
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode < 0x80 {
        check_log(rest);
    } else {
        let mut u = Unstructured::new(rest);
        let _ = if mode < 0xc0 {
            check_inclusion(&mut u)
        } else {
            check_consistency(&mut u)
        };
    }
});
