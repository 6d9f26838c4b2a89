//! The compliance log's format and its verification (pure: the file I/O is in
//! `medfed_infra::auditlog`).
//!
//! A log is a sequence of lines, one JSON [`Record`] each. Every record carries its sequence
//! number and the SHA-256 of the previous line (a hash chain), and the lines are the leaves
//! of an RFC 6962 Merkle tree: a [`Event::TreeHead`] record signs (Ed25519) the root of the
//! tree of every line before it. [`verify`] checks all of it and names the first bad line.

pub mod merkle;

use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::hex;

/// Hex of the "previous hash" of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One log record, one line of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the log, from 0; [`verify`] requires line `i` to hold `seq == i`.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// SHA-256 (hex) of the previous line's bytes; [`GENESIS`] for the first.
    pub prev: String,
    /// What the record says happened.
    pub event: Event,
}

/// What happened. New kinds are appended; existing ones never change meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The party started: who it is, its software, and the SHA-256 of its config file.
    Start {
        /// The party's name: the site's name for a node, the aggregator's `name`.
        party: String,
        /// `"node"` or `"aggregator"`.
        role: String,
        /// The party's software and version, e.g. `medfed-node 0.1.0`.
        software: String,
        /// SHA-256 (hex) of the configuration file the party started with.
        config_sha256: String,
    },
    /// The log was reopened after an unclean stop (e.g. a crash); `dropped_bytes` of an
    /// incomplete last line were cut.
    Recovered {
        /// Bytes of the incomplete last line that were cut.
        dropped_bytes: u64,
    },
    /// A protocol message left this party.
    Sent(MessageEntry),
    /// A protocol message arrived.
    Received(MessageEntry),
    /// A study was accepted or refused, and why.
    StudyDecision {
        /// The study's id.
        study: String,
        /// Whether this site takes part.
        accepted: bool,
        /// Why, in words: the approval or rules that admitted it, or the refusal's reason.
        reason: String,
    },
    /// A study started, completed or failed (aggregator).
    StudyStatus {
        /// The study's (or statistics query's) id.
        study: String,
        /// `"started"`, what it completed with, or why it failed or did not run, in words.
        status: String,
    },
    /// A model or statistic was released (aggregator).
    Released {
        /// The study (or statistics query) whose output was released.
        study: String,
        /// The round whose model was released; 0 for statistics.
        round: u32,
        /// The sites whose contributions the release aggregates.
        sites: Vec<String>,
        /// SHA-256 (hex) of the released file's bytes (the exported model or statistics
        /// JSON), so an auditor can tie a file to this record.
        sha256: String,
    },
    /// A site took part in a differentially private release (or refused to, for its
    /// budget): ε of the study and of all studies after it, at `delta`.
    PrivacySpent {
        /// The study charged.
        study: String,
        /// The round charged (0 for feature statistics and statistics queries).
        round: u32,
        /// ε this study has spent at this site after the charge (or would have, if `refused`).
        epsilon: f64,
        /// ε all studies have spent at this site, composed, after the charge.
        total_epsilon: f64,
        /// The δ both ε are stated at (the site's budget's δ).
        delta: f64,
        /// True when the charge would have exceeded the budget and the site refused to release.
        refused: bool,
    },
    /// Something went wrong that an auditor should see.
    Error {
        /// What went wrong, in words.
        what: String,
    },
    /// A site released something WITHOUT differential privacy, as its config allows for
    /// this dataset (`exact_releases`): exact statistics of a query, or an exact training
    /// study's models and evaluations.
    ExactRelease {
        /// The study or statistics query released.
        study: String,
        /// The dataset it was computed on.
        dataset: String,
    },
    /// At start: a dataset this site may release without differential privacy, and what.
    ExactAllowed {
        /// The dataset's name in the site's configuration.
        dataset: String,
        /// What may be released exactly: `"statistics"`, `"training"` or both.
        releases: Vec<String>,
    },
    /// A study or statistics query announced to this site, as its operator sees it (what it
    /// reads, trains, releases and costs), before the site decides.
    Announced {
        /// The study's (or query's) id.
        study: String,
        /// The study's identity for approvals: SHA-256 (hex) of its announcement.
        hash: String,
        /// The announcement as shown to the site's operator (`medfed node studies`).
        summary: String,
    },
    /// The party stopped cleanly.
    Stop {
        /// Why it stopped, in words (e.g. all studies complete, or the operator's signal).
        reason: String,
    },
    /// Signed root of the Merkle tree over every line before this one.
    TreeHead {
        /// The number of lines the head covers: every line before this record.
        size: u64,
        /// The Merkle tree's root over those lines (hex, 32 bytes).
        root: String,
        /// The party's Ed25519 signature (hex) of [`tree_head_message`].
        signature: String,
    },
}

/// A message that crossed the party's boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageEntry {
    /// The other party (site name, or the aggregator's name).
    pub peer: String,
    /// The message kind (e.g. "round open", "masked-input").
    pub message: String,
    /// The study (or statistics query) the message belongs to, if any.
    pub study: Option<String>,
    /// The round the message belongs to, if any.
    pub round: Option<u32>,
    /// Bytes of the frame on the wire.
    pub bytes: u64,
    /// SHA-256 (hex) of the frame.
    pub sha256: String,
}

/// SHA-256 of `bytes`, in lower-case hex (64 digits): the digest every record and release
/// uses.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The bytes a party signs for a tree head: its name, the tree's size and root, and the
/// head record's own time (the rest of that record is fixed by the chain).
pub fn tree_head_message(party: &str, size: u64, root: &merkle::Hash, time_ms: u64) -> Vec<u8> {
    let mut m = b"medfed-audit-v1 tree head\0".to_vec();
    m.extend_from_slice(party.as_bytes());
    m.push(0);
    m.extend_from_slice(&size.to_be_bytes());
    m.extend_from_slice(root);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m
}

/// Why a log failed verification, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct AuditError {
    /// 1-based line number of the first bad record.
    pub line: usize,
    /// What is wrong with it, in words.
    pub why: String,
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The party whose log it is (from its start records).
    pub party: String,
    /// Every record, in order.
    pub records: Vec<Record>,
    /// Records covered by the last signed tree head.
    pub signed: usize,
    /// The last signed head: (size, root).
    pub head: Option<(u64, merkle::Hash)>,
}

impl Verified {
    /// Checks that this log contains a tree head an auditor saw earlier (its size and root):
    /// a log cut short, or rewritten, since then does not.
    pub fn check_known_head(&self, size: u64, root: &merkle::Hash) -> Result<(), String> {
        let heads: Vec<(u64, Option<merkle::Hash>)> = self
            .records
            .iter()
            .filter_map(|r| match &r.event {
                Event::TreeHead { size, root, .. } => Some((*size, unhex32(root))),
                _ => None,
            })
            .collect();
        match heads.iter().find(|(s, _)| *s == size) {
            Some((_, Some(r))) if r == root => Ok(()),
            Some(_) => Err(format!(
                "the tree head over {size} records has another root: the log was rewritten"
            )),
            None if (self.records.len() as u64) < size => Err(format!(
                "the log has {} records but the known tree head covers {size}: records were cut after line {}",
                self.records.len(),
                self.records.len()
            )),
            None => Err(format!(
                "no tree head over exactly {size} records in this log"
            )),
        }
    }

    /// Records after the last signed tree head (written before a crash, or tampered with
    /// after it: either way not covered by a signature).
    pub fn unsigned_tail(&self) -> usize {
        self.records.len() - self.signed
    }
}

/// Lowercase hex, as [`hex::encode`] writes it, and nothing else: a decoder that also took
/// `A-F` (or, as `u8::from_str_radix` did, a leading `+`) would let a signed head's line be
/// respelled and still verify.
fn unhex(s: &str) -> Option<Vec<u8>> {
    hex::decode_lowercase(s)
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    unhex(s)?.try_into().ok()
}

/// Checks a whole log: record syntax, sequence numbers, the hash chain, and every tree head
/// (its size, its Merkle root, its Ed25519 signature by `public_key`). Stops at the first
/// bad line.
pub fn verify(lines: &[&str], public_key: &[u8]) -> Result<Verified, AuditError> {
    let key = UnparsedPublicKey::new(&ED25519, public_key);
    let mut records = Vec::with_capacity(lines.len());
    let mut tree = merkle::Frontier::default();
    let mut prev = GENESIS.to_string();
    let mut party = None;
    let (mut signed, mut head) = (0, None);
    for (i, line) in lines.iter().enumerate() {
        let bad = |why: String| AuditError { line: i + 1, why };
        let record: Record =
            serde_json::from_str(line).map_err(|e| bad(format!("not a log record ({e})")))?;
        if record.seq != i as u64 {
            return Err(bad(format!(
                "sequence number {} where {i} was expected (a record was removed, added or moved)",
                record.seq
            )));
        }
        if record.prev != prev {
            return Err(bad(if i == 0 {
                "the first record does not start the chain (records before it were removed)".into()
            } else {
                format!(
                    "the hash of line {i} recorded here does not match it: line {i} was altered, or records were removed or moved"
                )
            }));
        }
        match &record.event {
            Event::Start { party: p, .. } => match &party {
                None => party = Some(p.clone()),
                Some(first) if first != p => {
                    return Err(bad(format!(
                        "a start record for party '{p}' in the log of '{first}'"
                    )));
                }
                Some(_) => {}
            },
            Event::TreeHead {
                size,
                root,
                signature,
            } => {
                let name = party
                    .as_deref()
                    .ok_or_else(|| bad("a tree head before any start record".into()))?;
                if *size != i as u64 {
                    return Err(bad(format!(
                        "the tree head covers {size} records but {i} precede it"
                    )));
                }
                let computed = tree.root();
                if unhex32(root) != Some(computed) {
                    return Err(bad(
                        "the signed tree root does not match the records before it".into(),
                    ));
                }
                let ok = unhex(signature).is_some_and(|sig| {
                    key.verify(
                        &tree_head_message(name, *size, &computed, record.time_ms),
                        &sig,
                    )
                    .is_ok()
                });
                if !ok {
                    return Err(bad(
                        "the tree head's signature does not verify with this public key".into(),
                    ));
                }
                signed = i + 1;
                head = Some((*size, computed));
            }
            _ => {}
        }
        if i == 0 && party.is_none() {
            return Err(bad("the log does not begin with a start record".into()));
        }
        tree.push(merkle::leaf_hash(line.as_bytes()));
        prev = sha256_hex(line.as_bytes());
        records.push(record);
    }
    let party = party.ok_or(AuditError {
        line: 1,
        why: "the log is empty".into(),
    })?;
    Ok(Verified {
        party,
        records,
        signed,
        head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    /// Builds a log in memory the way the writer does.
    fn log(events: Vec<Event>, key: &Ed25519KeyPair) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        let mut leaves = Vec::new();
        for event in events {
            let event = match event {
                Event::TreeHead { .. } => {
                    let root = merkle::root(&leaves);
                    let size = lines.len() as u64;
                    let sig = key.sign(&tree_head_message("st-marys", size, &root, 1_000 + size));
                    Event::TreeHead {
                        size,
                        root: hex::encode(&root),
                        signature: hex::encode(sig.as_ref()),
                    }
                }
                e => e,
            };
            let prev = lines
                .last()
                .map_or(GENESIS.to_string(), |l| sha256_hex(l.as_bytes()));
            let r = Record {
                seq: lines.len() as u64,
                time_ms: 1_000 + lines.len() as u64,
                prev,
                event,
            };
            let line = serde_json::to_string(&r).unwrap();
            leaves.push(merkle::leaf_hash(line.as_bytes()));
            lines.push(line);
        }
        lines
    }

    fn sample(key: &Ed25519KeyPair) -> Vec<String> {
        let sent = |round| {
            Event::Sent(MessageEntry {
                peer: "aggregator".into(),
                message: "model update".into(),
                study: Some("pima".into()),
                round: Some(round),
                bytes: 1234,
                sha256: sha256_hex(&[round as u8]),
            })
        };
        let head = || Event::TreeHead {
            size: 0,
            root: String::new(),
            signature: String::new(),
        };
        log(
            vec![
                Event::Start {
                    party: "st-marys".into(),
                    role: "node".into(),
                    software: "medfed".into(),
                    config_sha256: sha256_hex(b"cfg"),
                },
                Event::StudyDecision {
                    study: "pima".into(),
                    accepted: true,
                    reason: "approved".into(),
                },
                sent(1),
                sent(2),
                head(),
                sent(3),
                Event::Stop {
                    reason: "signal".into(),
                },
                head(),
            ],
            key,
        )
    }

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    fn check(lines: &[String], public: &[u8]) -> Result<Verified, AuditError> {
        verify(
            &lines.iter().map(String::as_str).collect::<Vec<_>>(),
            public,
        )
    }

    #[test]
    fn an_intact_log_verifies() {
        let k = key(1);
        let v = check(&sample(&k), k.public_key().as_ref()).unwrap();
        assert_eq!(v.party, "st-marys");
        assert_eq!(v.records.len(), 8);
        assert_eq!(v.unsigned_tail(), 0);
    }

    #[test]
    fn every_single_byte_flip_is_detected_at_or_before_its_line() {
        let k = key(1);
        let lines = sample(&k);
        for (i, line) in lines.iter().enumerate() {
            for pos in 0..line.len() {
                let mut bytes = line.clone().into_bytes();
                bytes[pos] ^= 0x01;
                let Ok(text) = String::from_utf8(bytes) else {
                    continue;
                };
                let mut tampered = lines.clone();
                tampered[i] = text;
                let err = check(&tampered, k.public_key().as_ref())
                    .expect_err(&format!("flip at line {} byte {pos} undetected", i + 1));
                // The change is caught at its own line or at the next one (whose hash chain
                // or tree head covers it).
                assert!(
                    err.line == i + 1 || err.line == i + 2,
                    "flip in line {} reported at {}",
                    i + 1,
                    err.line
                );
            }
        }
    }

    /// Found while writing the audit_verify fuzz target's property (a log that verifies
    /// says what the signed one said): hex was read with `u8::from_str_radix`, which
    /// also takes `A-F` and a leading `+`, so a signed head's line could be rewritten ("0f"
    /// as "+f" or "0F") and still verify.
    #[test]
    fn a_head_in_other_hex_spelling_is_refused() {
        let k = key(1);
        let lines = sample(&k);
        let last = lines.len() - 1;
        let head: Record = serde_json::from_str(&lines[last]).unwrap();
        let Event::TreeHead {
            size,
            root,
            signature,
        } = head.event.clone()
        else {
            panic!("the sample ends with a head");
        };
        let respelled = |root: String, signature: String| {
            let mut r = head.clone();
            r.event = Event::TreeHead {
                size,
                root,
                signature,
            };
            let mut l = lines.clone();
            l[last] = serde_json::to_string(&r).unwrap();
            check(&l, k.public_key().as_ref())
        };
        assert!(respelled(root.clone(), signature.clone()).is_ok());
        let plus = |h: &str| {
            let i = (0..h.len()).step_by(2).find(|&i| &h[i..=i] == "0").unwrap();
            format!("{}+{}", &h[..i], &h[i + 1..])
        };
        for (r, s) in [
            (root.to_uppercase(), signature.clone()),
            (root.clone(), signature.to_uppercase()),
            (plus(&root), signature.clone()),
            (root.clone(), plus(&signature)),
            (format!("{root}0"), signature.clone()),
            (root.clone(), format!("{signature}00")),
        ] {
            let err = respelled(r, s).unwrap_err();
            assert_eq!(err.line, last + 1, "{err}");
        }
        assert_eq!(unhex("00ff7a"), Some(vec![0, 255, 122]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("+f"), None);
        assert_eq!(unhex("é0"), None);
    }

    #[test]
    fn deletion_reordering_duplication_and_another_key_are_detected() {
        let k = key(1);
        let lines = sample(&k);
        let public = k.public_key();
        let mut deleted = lines.clone();
        deleted.remove(2);
        assert_eq!(check(&deleted, public.as_ref()).unwrap_err().line, 3);
        let mut swapped = lines.clone();
        swapped.swap(2, 3);
        assert_eq!(check(&swapped, public.as_ref()).unwrap_err().line, 3);
        let mut duplicated = lines.clone();
        duplicated.insert(3, lines[2].clone());
        assert_eq!(check(&duplicated, public.as_ref()).unwrap_err().line, 4);
        let other = key(2);
        let err = check(&lines, other.public_key().as_ref()).unwrap_err();
        assert_eq!(err.line, 5);
        assert!(err.why.contains("signature"), "{err}");
        // Truncation to a clean prefix ending at a signed head still verifies, but what was
        // cut is visible against the last head seen before (its size).
        let truncated = &lines[..5];
        let v = check(truncated, public.as_ref()).unwrap();
        assert_eq!(v.head.map(|h| h.0), Some(4));
        // Truncation inside the unsigned tail shows as records no signature covers.
        let v = check(&lines[..7], public.as_ref()).unwrap();
        assert_eq!(v.unsigned_tail(), 2);
    }
}
