//! RFC 6962 (Certificate Transparency) Merkle tree hashing over SHA-256, with inclusion and
//! consistency proofs (RFC 6962 section 2.1). Leaves are hashed with a 0x00 prefix and
//! interior nodes with 0x01, so a leaf can never pass for a node.

use ring::digest::{SHA256, digest};

/// A SHA-256 digest: a leaf's, an interior node's or a root's.
pub type Hash = [u8; 32];

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut buf = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        buf.extend_from_slice(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, &buf).as_ref());
    out
}

/// RFC 6962's leaf hash, `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[0x00], data])
}

/// RFC 6962's interior node hash, `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

/// The largest power of two strictly below `n` (1 for n <= 2). Computed from the bit
/// length, not by doubling: doubling overflowed for a size above 2^63 (a proof claiming such
/// a tree panicked, or looped forever where overflow wraps).
fn split(n: usize) -> usize {
    if n <= 2 {
        return 1;
    }
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// `MTH(D[n])` over leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The root of a growing tree from O(log n) state: the perfect subtrees that make up the
/// leaves so far (RFC 6962's MTH splits at powers of two, so the root is the right fold of
/// these subtrees, largest first).
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    /// (number of leaves, hash) of each perfect subtree, largest first.
    subtrees: Vec<(u64, Hash)>,
    size: u64,
}

impl Frontier {
    /// Appends a leaf hash (from [`leaf_hash`]), merging equal-sized subtrees.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (1u64, leaf);
        while let Some(&(n, h)) = self.subtrees.last() {
            if n != node.0 {
                break;
            }
            self.subtrees.pop();
            node = (n * 2, node_hash(&h, &node.1));
        }
        self.subtrees.push(node);
        self.size += 1;
    }

    /// The number of leaves pushed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree's root over every leaf pushed so far, equal to [`root`] over the same leaves
    /// (the hash of the empty string for no leaf).
    pub fn root(&self) -> Hash {
        let mut iter = self.subtrees.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return sha256(&[]);
        };
        for (_, h) in iter {
            acc = node_hash(h, &acc);
        }
        acc
    }
}

/// `PATH(m, D[n])`: the audit path of leaf `m`.
pub fn inclusion_proof(leaves: &[Hash], m: usize) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || m >= n {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = inclusion_proof(&leaves[..k], m);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(&leaves[k..], m - k);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Checks that `leaf` is leaf `m` of a tree of `n` leaves with root `root_hash`.
pub fn verify_inclusion(leaf: &Hash, m: usize, n: usize, proof: &[Hash], root_hash: &Hash) -> bool {
    fn walk(leaf: &Hash, m: usize, n: usize, proof: &[Hash]) -> Option<Hash> {
        if n == 1 {
            return proof.is_empty().then_some(*leaf);
        }
        let (last, rest) = proof.split_last()?;
        let k = split(n);
        if m < k {
            Some(node_hash(&walk(leaf, m, k, rest)?, last))
        } else {
            Some(node_hash(last, &walk(leaf, m - k, n - k, rest)?))
        }
    }
    m < n && walk(leaf, m, n, proof).is_some_and(|r| r == *root_hash)
}

/// `PROOF(m, D[n])`: the consistency proof between the first `m` leaves and all `n`.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Vec<Hash> {
    fn subproof(leaves: &[Hash], m: usize, complete: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if complete {
                Vec::new()
            } else {
                vec![root(leaves)]
            };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(&leaves[..k], m, complete);
            p.push(root(&leaves[k..]));
            p
        } else {
            let mut p = subproof(&leaves[k..], m - k, false);
            p.push(root(&leaves[..k]));
            p
        }
    }
    if m == 0 || m > leaves.len() {
        return Vec::new();
    }
    subproof(leaves, m, true)
}

/// Checks that a tree of `m` leaves with root `old` is a prefix of a tree of `n` leaves with
/// root `new` (RFC 9162 section 2.1.4.2 verification).
pub fn verify_consistency(m: usize, n: usize, proof: &[Hash], old: &Hash, new: &Hash) -> bool {
    if m == 0 || m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && old == new;
    }
    let mut proof: Vec<Hash> = proof.to_vec();
    if m.is_power_of_two() {
        proof.insert(0, *old);
    }
    let Some((first, rest)) = proof.split_first() else {
        return false;
    };
    let (mut fnode, mut snode) = (m - 1, n - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *old && sr == *new
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leaves and roots of the RFC 6962 test vectors used by the Certificate
    /// Transparency implementations (certificate-transparency-go, merkle_tree_test.go).
    fn vectors() -> (Vec<Hash>, [&'static str; 8]) {
        let data: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        (data.iter().map(|d| leaf_hash(d)).collect(), roots)
    }

    #[test]
    fn roots_match_the_rfc_6962_vectors() {
        let (leaves, roots) = vectors();
        assert_eq!(
            crate::hex::encode(&root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        for (n, want) in roots.iter().enumerate() {
            assert_eq!(
                crate::hex::encode(&root(&leaves[..=n])),
                *want,
                "tree of {} leaves",
                n + 1
            );
        }
    }

    #[test]
    fn the_frontier_root_equals_the_full_root() {
        let leaves: Vec<Hash> = (0..100u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut f = Frontier::default();
        assert_eq!(f.root(), root(&[]));
        for (i, l) in leaves.iter().enumerate() {
            f.push(*l);
            assert_eq!(f.root(), root(&leaves[..=i]), "{} leaves", i + 1);
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_wrong_one_does_not() {
        let (leaves, _) = vectors();
        for n in 1..=8 {
            let r = root(&leaves[..n]);
            for m in 0..n {
                let p = inclusion_proof(&leaves[..n], m);
                assert!(
                    verify_inclusion(&leaves[m], m, n, &p, &r),
                    "leaf {m} of {n}"
                );
                assert!(
                    !verify_inclusion(&leaves[(m + 1) % 8], m, n, &p, &r)
                        || n == 1 && m == 0 && leaves[1] == leaves[0]
                );
            }
        }
    }

    #[test]
    fn split_is_the_largest_power_of_two_below() {
        for n in 2..=1025usize {
            let k = split(n);
            assert!(
                k.is_power_of_two() && k < n && 2 * k >= n,
                "split({n}) = {k}"
            );
        }
        assert_eq!(split(usize::MAX), 1 << (usize::BITS - 1));
        assert_eq!(split((1 << (usize::BITS - 1)) + 1), 1 << (usize::BITS - 1));
    }

    /// Found by the audit_verify fuzz target: a proof claiming a tree of more than 2^63
    /// leaves overflowed `split` (a panic with overflow checks; an endless loop without).
    #[test]
    fn proofs_about_huge_trees_are_refused_not_a_panic() {
        let (leaves, _) = vectors();
        let r = root(&leaves[..8]);
        let p = inclusion_proof(&leaves[..8], 3);
        for n in [
            usize::MAX,
            (1 << (usize::BITS - 1)) + 20,
            1 << (usize::BITS - 1),
        ] {
            assert!(!verify_inclusion(&leaves[3], 3, n, &p, &r));
            assert!(!verify_inclusion(&leaves[3], n - 1, n, &p, &r));
            assert!(!verify_consistency(3, n, &p, &root(&leaves[..3]), &r));
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_a_forked_one_does_not() {
        let (leaves, _) = vectors();
        for n in 1..=8 {
            for m in 1..=n {
                let p = consistency_proof(&leaves[..n], m);
                assert!(
                    verify_consistency(m, n, &p, &root(&leaves[..m]), &root(&leaves[..n])),
                    "{m} -> {n}"
                );
            }
        }
        // A history rewritten before the old head is not consistent with it.
        let mut forked = leaves.clone();
        forked[1] = leaf_hash(b"rewritten");
        let p = consistency_proof(&forked, 3);
        assert!(!verify_consistency(
            3,
            8,
            &p,
            &root(&leaves[..3]),
            &root(&forked)
        ));
    }
}
