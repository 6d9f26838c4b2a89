//! Pseudonyms: HMAC-SHA256 (ring) of a patient identifier under this site's secret key.
//!
//! The key lives in the node's keystore (a file of mode 0600 made by `medfed node init`);
//! it is never sent and never logged. The same identifier gets the same pseudonym across
//! restarts, a different one at every other site, and a different one after a key rotation;
//! the pseudonym names its key version (`p1-…`), so records pseudonymized before and after
//! a rotation are told apart rather than silently mixed.

use std::fmt;
use std::path::{Path, PathBuf};

use medfed_protocol::hex;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// The keystore file, as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeystoreFile {
    /// The version new pseudonyms are made with.
    current: u32,
    keys: Vec<StoredKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    version: u32,
    /// 32 random bytes, hex.
    key: String,
}

/// An error about the keystore, naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeystoreError {
    /// The keystore file is not a valid keystore.
    #[error("keystore {path}: {why}")]
    Invalid {
        /// The keystore file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// There is no keystore at the path.
    #[error(
        "keystore {path} does not exist: run `medfed node init` to create this site's pseudonym key"
    )]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// `init` found a keystore already.
    #[error("keystore {path} already exists; use `medfed node rotate-key` to add a new key")]
    Exists {
        /// The existing keystore.
        path: PathBuf,
    },
    /// The keystore could not be read or written.
    #[error("keystore {path}: {source}")]
    Io {
        /// The keystore file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The keystore or its directory is open to other users.
    #[error(transparent)]
    Private(#[from] medfed_infra::files::NotPrivate),
}

/// This site's pseudonym keys. `Debug` never shows them.
pub struct Keystore {
    path: PathBuf,
    current: u32,
    keys: Vec<(u32, hmac::Key)>,
    raw: Vec<(u32, [u8; 32])>,
}

impl fmt::Debug for Keystore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keystore")
            .field("path", &self.path)
            .field("current", &self.current)
            .field(
                "versions",
                &self.raw.iter().map(|(v, _)| v).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn random_key() -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| "the system's random generator failed".to_string())?;
    Ok(key)
}

impl Keystore {
    /// Creates a keystore with one fresh key (version 1). Refuses to overwrite one.
    pub fn create(path: &Path) -> Result<Keystore, KeystoreError> {
        if path.exists() {
            return Err(KeystoreError::Exists { path: path.into() });
        }
        let key = random_key().map_err(|why| KeystoreError::Invalid {
            path: path.into(),
            why,
        })?;
        let ks = Keystore::from_raw(path, 1, vec![(1, key)]);
        ks.save()?;
        Ok(ks)
    }

    /// Adds a new key version and makes it current; older versions stay, so existing
    /// pseudonyms can still be recognised.
    pub fn rotate(&mut self) -> Result<u32, KeystoreError> {
        let version = self.raw.iter().map(|(v, _)| *v).max().unwrap_or(0) + 1;
        let key = random_key().map_err(|why| KeystoreError::Invalid {
            path: self.path.clone(),
            why,
        })?;
        let mut raw = self.raw.clone();
        raw.push((version, key));
        let next = Keystore::from_raw(&self.path, version, raw);
        next.save()?;
        *self = next;
        Ok(version)
    }

    /// Opens the keystore at `path`; it must exist (`medfed node init` creates it) and be
    /// this user's alone.
    pub fn open(path: &Path) -> Result<Keystore, KeystoreError> {
        let invalid = |why: String| KeystoreError::Invalid {
            path: path.into(),
            why,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeystoreError::Missing { path: path.into() });
            }
            Err(source) => {
                return Err(KeystoreError::Io {
                    path: path.into(),
                    source,
                });
            }
        };
        medfed_infra::files::check_private(&[medfed_infra::files::PrivatePath::new(
            "the pseudonym keystore",
            path,
        )])?;
        let file: KeystoreFile =
            toml::from_str(&text).map_err(|e| invalid(format!("not a keystore: {e}")))?;
        let mut raw = Vec::new();
        for k in &file.keys {
            let bytes = hex::decode_array::<32>(&k.key).ok_or_else(|| {
                invalid(format!("key version {} is not 32 bytes of hex", k.version))
            })?;
            if raw.iter().any(|(v, _)| *v == k.version) {
                return Err(invalid(format!("key version {} appears twice", k.version)));
            }
            raw.push((k.version, bytes));
        }
        if !raw.iter().any(|(v, _)| *v == file.current) {
            return Err(invalid(format!(
                "no key of the current version {}",
                file.current
            )));
        }
        Ok(Keystore::from_raw(path, file.current, raw))
    }

    fn from_raw(path: &Path, current: u32, raw: Vec<(u32, [u8; 32])>) -> Keystore {
        Keystore {
            path: path.into(),
            current,
            keys: raw
                .iter()
                .map(|(v, k)| (*v, hmac::Key::new(hmac::HMAC_SHA256, k)))
                .collect(),
            raw,
        }
    }

    fn save(&self) -> Result<(), KeystoreError> {
        let file = KeystoreFile {
            current: self.current,
            keys: self
                .raw
                .iter()
                .map(|(version, k)| StoredKey {
                    version: *version,
                    key: hex::encode(k),
                })
                .collect(),
        };
        let text = format!(
            "# medfed pseudonym keys of this site. SECRET: never copy it off this machine;\n\
             # back it up with the node's state (docs/deploying.md). Losing it means new\n\
             # pseudonyms for every patient.\n{}",
            toml::to_string(&file).expect("a keystore serializes")
        );
        let io = |source| KeystoreError::Io {
            path: self.path.clone(),
            source,
        };
        // Creates the keystore's directory mode 0700 and the file 0600.
        medfed_infra::files::write_secret_atomically(&self.path, text.as_bytes()).map_err(io)
    }

    /// The version of the key new pseudonyms are made with, the `p{version}-` prefix of each
    /// (`medfed node rotate-key` adds a key with the next version).
    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// The pseudonymizer of the current key.
    pub fn pseudonymizer(&self) -> Pseudonymizer {
        let key = self
            .keys
            .iter()
            .find(|(v, _)| *v == self.current)
            .map(|(_, k)| k.clone())
            .expect("open and create check the current version exists");
        Pseudonymizer::with_key(self.current, key)
    }
}

/// Turns identifiers into pseudonyms under one key version.
#[derive(Clone)]
pub struct Pseudonymizer {
    version: u32,
    /// `p{version}-`
    prefix: String,
    key: hmac::Key,
}

impl fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonymizer(key version {})", self.version)
    }
}

/// Domain separation: a pseudonym and a date shift of the same identifier are unrelated.
const PSEUDONYM_DOMAIN: &[u8] = b"medfed pseudonym v1\0";
const DATE_SHIFT_DOMAIN: &[u8] = b"medfed date shift v1\0";

/// The largest date shift, in days, either way.
pub const MAX_DATE_SHIFT_DAYS: i64 = 365;

impl Pseudonymizer {
    /// A pseudonymizer straight from key bytes (benchmarks and tests).
    pub fn from_key(version: u32, key: &[u8; 32]) -> Pseudonymizer {
        Pseudonymizer::with_key(version, hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    fn with_key(version: u32, key: hmac::Key) -> Pseudonymizer {
        Pseudonymizer {
            version,
            prefix: format!("p{version}-"),
            key,
        }
    }

    fn tag(&self, domain: &[u8], identifier: &str) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(domain);
        ctx.update(identifier.trim().as_bytes());
        ctx.sign()
    }

    /// `p{version}-{32 hex digits}`: the first 128 bits of the HMAC, which make a collision
    /// among a hospital's patients negligible (about n²/2¹²⁹).
    pub fn pseudonym(&self, identifier: &str) -> String {
        let tag = self.tag(PSEUDONYM_DOMAIN, identifier);
        let mut out = String::with_capacity(self.prefix.len() + 32);
        out.push_str(&self.prefix);
        hex::encode_into(&mut out, &tag.as_ref()[..16]);
        out
    }

    /// The patient's date shift in days, in `-365..=365` without 0, derived from the keyed
    /// identifier: every date of one patient moves by the same amount, so intervals are
    /// kept, and nobody without the key can undo it.
    pub fn date_shift_days(&self, identifier: &str) -> i64 {
        let tag = self.tag(DATE_SHIFT_DOMAIN, identifier);
        let x = u64::from_be_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"));
        // 730 values, uniform up to a bias of 730/2⁶⁴.
        let k = (x % (2 * MAX_DATE_SHIFT_DAYS as u64)) as i64;
        if k < MAX_DATE_SHIFT_DAYS {
            k - MAX_DATE_SHIFT_DAYS
        } else {
            k - MAX_DATE_SHIFT_DAYS + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_identifier_keeps_its_pseudonym_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keystore.toml");
        let first = Keystore::create(&path)
            .unwrap()
            .pseudonymizer()
            .pseudonym("MRN-0042");
        assert!(first.starts_with("p1-") && first.len() == 35, "{first}");
        // "Restart": open the file again.
        let again = Keystore::open(&path).unwrap().pseudonymizer();
        assert_eq!(again.pseudonym("MRN-0042"), first);
        assert_eq!(
            again.pseudonym(" MRN-0042 "),
            first,
            "surrounding spaces ignored"
        );
        assert_ne!(again.pseudonym("MRN-0043"), first);
        // Another site's key gives another pseudonym.
        let other = Keystore::create(&dir.path().join("other.toml")).unwrap();
        assert_ne!(other.pseudonymizer().pseudonym("MRN-0042"), first);
        assert!(matches!(
            Keystore::create(&path),
            Err(KeystoreError::Exists { .. })
        ));
    }

    #[test]
    fn rotation_changes_pseudonyms_and_names_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keystore.toml");
        let mut ks = Keystore::create(&path).unwrap();
        let v1 = ks.pseudonymizer().pseudonym("MRN-1");
        assert_eq!(ks.rotate().unwrap(), 2);
        let v2 = ks.pseudonymizer().pseudonym("MRN-1");
        assert!(v2.starts_with("p2-"));
        assert_ne!(v1[3..], v2[3..]);
        let reopened = Keystore::open(&path).unwrap();
        assert_eq!(reopened.current_version(), 2);
        assert_eq!(reopened.pseudonymizer().pseudonym("MRN-1"), v2);
    }

    #[test]
    fn known_answer_against_ring_hmac() {
        // The pseudonym is the HMAC-SHA256 of domain ‖ identifier, truncated: recompute it.
        let key = [7u8; 32];
        let p = Pseudonymizer::from_key(3, &key);
        let mut msg = PSEUDONYM_DOMAIN.to_vec();
        msg.extend_from_slice(b"12345");
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &msg);
        assert_eq!(
            p.pseudonym("12345"),
            format!("p3-{}", hex::encode(&tag.as_ref()[..16]))
        );
    }

    #[test]
    fn date_shifts_are_per_patient_nonzero_and_bounded() {
        let p = Pseudonymizer::from_key(1, &[9u8; 32]);
        let shifts: Vec<i64> = (0..5000)
            .map(|i| p.date_shift_days(&format!("MRN-{i}")))
            .collect();
        assert!(
            shifts
                .iter()
                .all(|s| *s != 0 && s.abs() <= MAX_DATE_SHIFT_DAYS)
        );
        assert!(shifts.iter().any(|s| *s < -300) && shifts.iter().any(|s| *s > 300));
        assert_eq!(p.date_shift_days("MRN-7"), shifts[7]);
        let q = Pseudonymizer::from_key(1, &[10u8; 32]);
        let same = (0..200)
            .filter(|i| q.date_shift_days(&format!("MRN-{i}")) == shifts[*i])
            .count();
        assert!(same < 10, "another key gives other shifts ({same} equal)");
    }

    #[test]
    fn a_keystore_readable_by_others_or_broken_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keystore.toml");
        assert!(matches!(
            Keystore::open(&path),
            Err(KeystoreError::Missing { .. })
        ));
        Keystore::create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Keystore::open(&path).unwrap_err().to_string();
            assert!(
                err.contains("is open to other users (mode 644)")
                    && err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        medfed_infra::files::write_secret_atomically(&path, b"current = 2\nkeys = []\n").unwrap();
        let err = Keystore::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("no key of the current version 2") && err.contains("keystore.toml"),
            "{err}"
        );
        let ks = format!("{:?}", Keystore::create(&dir.path().join("k2")).unwrap());
        assert!(!ks.contains("key:") && ks.contains("versions"), "{ks}");
    }
}
