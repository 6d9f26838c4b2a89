//! The compliance-log writer: one append-only file per party (format in
//! `medfed_protocol::audit`). Records are appended as they happen; every
//! [`BATCH`] records, at [`AuditLog::checkpoint`] and at [`AuditLog::close`] the party signs
//! the Merkle tree head (Ed25519) and the file is fsynced.
//!
//! Reopening a log after a crash cuts an incomplete last line, checks the rest verifies
//! under the party's key (refusing to append to a log that does not), and records the
//! recovery before carrying on.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use medfed_protocol::audit::{self, Event, GENESIS, Record, merkle};
use medfed_protocol::hex;
use ring::signature::{Ed25519KeyPair, KeyPair};

/// Records between two signed tree heads.
pub const BATCH: u64 = 256;

/// Why a compliance log cannot be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditLogError {
    /// The log file could not be read, created or written.
    #[error("compliance log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The signing key could not be read, created or parsed.
    #[error("compliance-log signing key {path}: {why}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The existing log fails verification: it is left untouched and nothing is appended.
    #[error(
        "compliance log {path} does not verify ({problem}); it is kept as it is: move it aside to start a new log"
    )]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// The first bad line, and why.
        problem: audit::AuditError,
    },
}

struct Inner {
    file: File,
    seq: u64,
    prev: String,
    tree: merkle::Frontier,
    since_head: u64,
}

/// A party's compliance log, open for appending.
pub struct AuditLog {
    path: PathBuf,
    party: String,
    key: Ed25519KeyPair,
    inner: Mutex<Inner>,
    /// Where a copy of every frame sent goes (`[audit] capture_sent`).
    capture: Option<Mutex<std::fs::File>>,
    traffic: Traffic,
}

/// Messages and bytes that crossed the party's boundary since it started (for metrics).
#[derive(Debug, Default)]
pub struct Traffic {
    /// Protocol messages sent.
    pub messages_sent: std::sync::atomic::AtomicU64,
    /// Bytes of the frames sent.
    pub bytes_sent: std::sync::atomic::AtomicU64,
    /// Protocol messages received.
    pub messages_received: std::sync::atomic::AtomicU64,
    /// Bytes of the frames received.
    pub bytes_received: std::sync::atomic::AtomicU64,
    /// The same, per peer (a site's name at the aggregator, `aggregator` at a node).
    per_peer: Mutex<std::collections::BTreeMap<String, PeerTraffic>>,
    /// The last signed tree head: (records covered, root hash, signed at ms since the epoch).
    last_head: Mutex<Option<(u64, String, u64)>>,
}

/// Messages and bytes exchanged with one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerTraffic {
    /// Protocol messages sent to the peer.
    pub messages_sent: u64,
    /// Bytes of the frames sent to the peer.
    pub bytes_sent: u64,
    /// Protocol messages received from the peer.
    pub messages_received: u64,
    /// Bytes of the frames received from the peer.
    pub bytes_received: u64,
}

impl Traffic {
    /// Traffic per peer so far.
    pub fn per_peer(&self) -> std::collections::BTreeMap<String, PeerTraffic> {
        self.per_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last signed tree head: (records covered, root hash in hex, signed at ms since
    /// the epoch), if one was signed since the log was opened.
    pub fn last_tree_head(&self) -> Option<(u64, String, u64)> {
        self.last_head
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn count(&self, peer: &str, sent: bool, bytes: u64) {
        let mut map = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let t = map.entry(peer.to_string()).or_default();
        if sent {
            t.messages_sent += 1;
            t.bytes_sent += bytes;
        } else {
            t.messages_received += 1;
            t.bytes_received += bytes;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Loads the party's Ed25519 signing key (PKCS#8), making one (mode 0600) on first use; also
/// writes the public key, hex, beside it as `<key>.pub` for auditors.
pub fn load_or_create_key(path: &Path) -> Result<Ed25519KeyPair, AuditLogError> {
    let key_err = |why: String| AuditLogError::Key {
        path: path.to_path_buf(),
        why,
    };
    let pkcs8 = if path.exists() {
        std::fs::read(path).map_err(|e| key_err(e.to_string()))?
    } else {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| key_err(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::files::create_private_dir(dir).map_err(|e| key_err(e.to_string()))?;
        }
        let mut f = crate::files::private_file_options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| key_err(e.to_string()))?;
        f.write_all(doc.as_ref())
            .and_then(|()| f.sync_all())
            .map_err(|e| key_err(e.to_string()))?;
        doc.as_ref().to_vec()
    };
    let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|e| key_err(format!("not an Ed25519 PKCS#8 key ({e})")))?;
    let public = hex::encode(key.public_key().as_ref());
    // Owner-only like everything else the party keeps; auditors get a copy from the party.
    crate::files::write_atomic(&public_key_path(path), format!("{public}\n").as_bytes())
        .map_err(|e| key_err(e.to_string()))?;
    Ok(key)
}

/// Where the public key of the signing key at `key` is written.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push(".pub");
    key.with_file_name(name)
}

/// Runs `f`, which blocks on the disk (an fsync): on a multi-threaded tokio runtime's
/// worker, the worker's other tasks move to other threads meanwhile; elsewhere it simply
/// blocks this thread. The log is written from async tasks (each message a party sends or
/// receives), and a tree head's fsync can take milliseconds.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path` and records the start. `role` is "node" or
    /// "aggregator"; `config_sha256` identifies the configuration the party runs with.
    pub fn open(
        path: &Path,
        key_path: &Path,
        party: &str,
        role: &str,
        software: &str,
        config_sha256: &str,
    ) -> Result<AuditLog, AuditLogError> {
        let io = |source| AuditLogError::Io {
            path: path.to_path_buf(),
            source,
        };
        let key = load_or_create_key(key_path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::files::create_private_dir(dir).map_err(io)?;
        }
        let mut file = crate::files::private_file_options()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io)?;
        // A crash can leave a last line without its newline: cut it.
        let complete = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let dropped = (text.len() - complete) as u64;
        if dropped > 0 {
            file.set_len(complete as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        let text = String::from_utf8_lossy(&text[..complete]).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let mut inner = Inner {
            file,
            seq: 0,
            prev: GENESIS.to_string(),
            tree: merkle::Frontier::default(),
            since_head: 0,
        };
        let mut clean = true;
        if !lines.is_empty() {
            let verified = audit::verify(&lines, key.public_key().as_ref()).map_err(|problem| {
                AuditLogError::Corrupt {
                    path: path.to_path_buf(),
                    problem,
                }
            })?;
            for line in &lines {
                inner.tree.push(merkle::leaf_hash(line.as_bytes()));
            }
            inner.seq = lines.len() as u64;
            inner.prev = audit::sha256_hex(lines[lines.len() - 1].as_bytes());
            inner.since_head = verified.unsigned_tail() as u64;
            clean = verified.unsigned_tail() == 0;
        }
        let log = AuditLog {
            path: path.to_path_buf(),
            party: party.to_string(),
            key,
            inner: Mutex::new(inner),
            capture: None,
            traffic: Traffic::default(),
        };
        log.record(Event::Start {
            party: party.to_string(),
            role: role.to_string(),
            software: software.to_string(),
            config_sha256: config_sha256.to_string(),
        })
        .map_err(io)?;
        if dropped > 0 || !clean {
            log.record(Event::Recovered {
                dropped_bytes: dropped,
            })
            .map_err(io)?;
        }
        log.checkpoint().map_err(io)?;
        Ok(log)
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-append; the file is still a valid prefix (a torn
        // line is cut on the next open), so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, inner: &mut Inner, event: Event) -> std::io::Result<()> {
        let record = Record {
            seq: inner.seq,
            time_ms: now_ms(),
            prev: std::mem::take(&mut inner.prev),
            event,
        };
        let line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        inner.file.write_all(&bytes)?;
        inner.tree.push(merkle::leaf_hash(line.as_bytes()));
        inner.prev = audit::sha256_hex(line.as_bytes());
        inner.seq += 1;
        Ok(())
    }

    fn sign_head(&self, inner: &mut Inner) -> std::io::Result<()> {
        let root = inner.tree.root();
        let size = inner.seq;
        let time_ms = now_ms();
        let signature = self
            .key
            .sign(&audit::tree_head_message(&self.party, size, &root, time_ms));
        let record = Record {
            seq: size,
            time_ms,
            prev: std::mem::take(&mut inner.prev),
            event: Event::TreeHead {
                size,
                root: hex::encode(&root),
                signature: hex::encode(signature.as_ref()),
            },
        };
        let line = serde_json::to_string(&record).map_err(std::io::Error::other)?;
        inner.file.write_all(format!("{line}\n").as_bytes())?;
        inner.tree.push(merkle::leaf_hash(line.as_bytes()));
        inner.prev = audit::sha256_hex(line.as_bytes());
        inner.seq += 1;
        inner.since_head = 0;
        let file = &inner.file;
        blocking(|| file.sync_data())?;
        *self
            .traffic
            .last_head
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((size, hex::encode(&root), time_ms));
        Ok(())
    }

    /// Appends one record; signs a tree head every [`BATCH`] records.
    pub fn record(&self, event: Event) -> std::io::Result<()> {
        let mut inner = self.lock();
        self.append(&mut inner, event)?;
        inner.since_head += 1;
        if inner.since_head >= BATCH {
            self.sign_head(&mut inner)?;
        }
        Ok(())
    }

    /// From now on every write fails, as on a full or failed disk (tests of what the party
    /// does when it cannot log).
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn fail_writes(&self) -> std::io::Result<()> {
        let mut inner = self.lock();
        inner.file = std::fs::OpenOptions::new().write(true).open("/dev/full")?;
        Ok(())
    }

    /// Signs a tree head over everything so far and syncs the file (at round boundaries).
    pub fn checkpoint(&self) -> std::io::Result<()> {
        let mut inner = self.lock();
        if inner.since_head > 0 || inner.seq == 0 {
            self.sign_head(&mut inner)?;
        }
        Ok(())
    }

    /// Records a clean stop and signs the final tree head.
    pub fn close(&self, reason: &str) -> std::io::Result<()> {
        let mut inner = self.lock();
        self.append(
            &mut inner,
            Event::Stop {
                reason: reason.to_string(),
            },
        )?;
        self.sign_head(&mut inner)
    }
}

fn entry(
    peer: &str,
    msg: &medfed_protocol::Message,
    frame: &crate::transport::FrameInfo,
) -> audit::MessageEntry {
    let (study, round) = msg.study_round();
    audit::MessageEntry {
        peer: peer.to_string(),
        message: msg.kind().to_string(),
        study: study.map(str::to_string),
        round,
        bytes: frame.bytes,
        sha256: frame.sha256.clone(),
    }
}

impl AuditLog {
    /// Also appends a copy of every frame this party sends (its bytes as they go into the
    /// encrypted connection) to `path`, for a privacy review that wants to read exactly what
    /// left. The copy is re-encoded from the message and checked against the hash of the
    /// frame that was sent, so it is byte for byte what the peer received.
    pub fn capture_sent_frames(mut self, path: &Path) -> Result<AuditLog, AuditLogError> {
        let file = crate::files::private_file_options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| AuditLogError::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        self.capture = Some(Mutex::new(file));
        Ok(self)
    }

    fn capture(
        &self,
        msg: &medfed_protocol::Message,
        frame: &crate::transport::FrameInfo,
    ) -> Result<(), String> {
        use std::io::Write;
        let Some(file) = &self.capture else {
            return Ok(());
        };
        let bytes = match medfed_protocol::codec::encode_frame(msg, u32::MAX) {
            Ok(b) if audit::sha256_hex(&b) == frame.sha256 => b,
            _ => return Err("a frame could not be reproduced for the capture file".into()),
        };
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&bytes)
            .and_then(|()| f.flush())
            .map_err(|e| format!("cannot write the capture of sent frames: {e}"))
    }
}

impl AuditLog {
    /// Messages and bytes in and out so far.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }
}

impl crate::transport::Egress for AuditLog {
    fn sent(
        &self,
        peer: &str,
        msg: &medfed_protocol::Message,
        frame: &crate::transport::FrameInfo,
    ) -> Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        self.capture(msg, frame).inspect_err(|e| {
            tracing::error!("{e}: the message is not sent");
        })?;
        self.record(Event::Sent(entry(peer, msg, frame)))
            .map_err(|e| {
                tracing::error!(log = %self.path.display(), "cannot write the compliance log: {e}; the message is not sent");
                format!("{}: {e}", self.path.display())
            })?;
        self.traffic.messages_sent.fetch_add(1, Relaxed);
        self.traffic.bytes_sent.fetch_add(frame.bytes, Relaxed);
        self.traffic.count(peer, true, frame.bytes);
        Ok(())
    }
    fn received(
        &self,
        peer: &str,
        msg: &medfed_protocol::Message,
        frame: &crate::transport::FrameInfo,
    ) -> Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        self.traffic.messages_received.fetch_add(1, Relaxed);
        self.traffic.bytes_received.fetch_add(frame.bytes, Relaxed);
        self.traffic.count(peer, false, frame.bytes);
        self.record(Event::Received(entry(peer, msg, frame)))
            .map_err(|e| {
                tracing::error!(log = %self.path.display(), "cannot write the compliance log: {e}; the message is not used");
                format!("{}: {e}", self.path.display())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medfed_protocol::audit::MessageEntry;

    fn sent(i: u64) -> Event {
        Event::Sent(MessageEntry {
            peer: "aggregator".into(),
            message: "model update".into(),
            study: Some("s".into()),
            round: Some(i as u32),
            bytes: i,
            sha256: audit::sha256_hex(&i.to_be_bytes()),
        })
    }

    /// A message the log cannot record is reported as not sendable, and not counted.
    #[test]
    fn a_message_that_cannot_be_logged_is_not_sent() {
        use crate::transport::Egress;
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(
            &dir.path().join("log"),
            &dir.path().join("key"),
            "alpha",
            "node",
            "test",
            "",
        )
        .unwrap();
        let msg = medfed_protocol::Message::Error(medfed_protocol::messages::ErrorMessage {
            code: medfed_protocol::ErrorCode::Internal,
            reason: "x".into(),
        });
        let frame = crate::transport::FrameInfo::of_frame(b"frame");
        assert!(log.sent("aggregator", &msg, &frame).is_ok());
        log.fail_writes().unwrap();
        assert!(log.sent("aggregator", &msg, &frame).is_err());
        assert!(log.received("aggregator", &msg, &frame).is_err());
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(log.traffic().messages_sent.load(Relaxed), 1);
    }

    fn read(path: &Path, key: &Path) -> Result<audit::Verified, audit::AuditError> {
        let text = std::fs::read_to_string(path).unwrap();
        let public = std::fs::read_to_string(public_key_path(key)).unwrap();
        let public = hex::decode(public.trim()).unwrap();
        audit::verify(&text.lines().collect::<Vec<_>>(), &public)
    }

    #[test]
    fn a_log_verifies_across_batches_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = (
            dir.path().join("log/compliance.log"),
            dir.path().join("keys/audit.key"),
        );
        let log = AuditLog::open(&path, &key, "st-marys", "node", "test", "cfg").unwrap();
        for i in 0..(BATCH + 10) {
            log.record(sent(i)).unwrap();
        }
        log.close("done").unwrap();
        drop(log);
        let v = read(&path, &key).unwrap();
        assert_eq!(v.unsigned_tail(), 0);
        // Reopening continues the same log with the same key.
        let log = AuditLog::open(&path, &key, "st-marys", "node", "test", "cfg").unwrap();
        log.record(sent(1)).unwrap();
        log.close("done").unwrap();
        let v = read(&path, &key).unwrap();
        assert!(v.records.len() as u64 > BATCH + 15);
        assert!(
            !v.records
                .iter()
                .any(|r| matches!(r.event, Event::Recovered { .. }))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_log_its_keys_and_the_capture_are_owner_only_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        crate::files::set_umask(0o022);
        let dir = tempfile::tempdir().unwrap();
        let (path, key, capture) = (
            dir.path().join("log/compliance.log"),
            dir.path().join("keys/audit.key"),
            dir.path().join("sent.bin"),
        );
        let log = AuditLog::open(&path, &key, "st-marys", "node", "test", "cfg")
            .unwrap()
            .capture_sent_frames(&capture)
            .unwrap();
        log.close("done").unwrap();
        for (p, want) in [
            (dir.path().join("log"), 0o700),
            (dir.path().join("keys"), 0o700),
            (path, 0o600),
            (key.clone(), 0o600),
            (public_key_path(&key), 0o600),
            (capture, 0o600),
        ] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{}", p.display());
        }
    }

    #[test]
    fn a_torn_last_line_is_cut_and_the_recovery_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = (dir.path().join("c.log"), dir.path().join("a.key"));
        let log = AuditLog::open(&path, &key, "st-marys", "node", "test", "cfg").unwrap();
        log.record(sent(1)).unwrap();
        log.record(sent(2)).unwrap();
        drop(log); // no close: as if killed
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":99,\"time_ms\":1,\"pre").unwrap();
        drop(f);
        let log = AuditLog::open(&path, &key, "st-marys", "node", "test", "cfg").unwrap();
        log.close("done").unwrap();
        let v = read(&path, &key).unwrap();
        let dropped = v.records.iter().find_map(|r| match r.event {
            Event::Recovered { dropped_bytes } => Some(dropped_bytes),
            _ => None,
        });
        assert_eq!(dropped, Some(26));
        assert_eq!(v.unsigned_tail(), 0);
    }

    #[test]
    fn a_tampered_log_is_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = (dir.path().join("c.log"), dir.path().join("a.key"));
        let log = AuditLog::open(&path, &key, "st-marys", "node", "test", "cfg").unwrap();
        log.record(sent(1)).unwrap();
        log.close("done").unwrap();
        drop(log);
        let text =
            std::fs::read_to_string(&path)
                .unwrap()
                .replacen("\"bytes\":1", "\"bytes\":2", 1);
        std::fs::write(&path, text).unwrap();
        let err = AuditLog::open(&path, &key, "st-marys", "node", "test", "cfg")
            .err()
            .unwrap();
        assert!(matches!(err, AuditLogError::Corrupt { .. }), "{err}");
        // The chain breaks at line 4, which names line 3 as altered.
        assert!(
            err.to_string().contains("line 4: the hash of line 3"),
            "{err}"
        );
    }
}
