//! The durable store both parties keep their state in: namespaced key-value data, and
//! atomic checkpoints that write input offsets, state changes and metadata in ONE durable
//! transaction, so that after a crash the state matches the offsets exactly.
//!
//! Two backends sit behind [`Store`]: [`redb`](https://docs.rs/redb), the default, and
//! [`sled`](https://docs.rs/sled) (named in the project's first requirements; its last
//! stable release is 0.34, it calls itself beta, and it pulls in two unmaintained crates),
//! which is only in a build with the cargo feature `sled`. `docs/storage.md` compares
//! them; [`Backend::DEFAULT`] is the one the measurements chose.

mod redb_store;
#[cfg(feature = "sled")]
mod sled_store;

use std::path::{Path, PathBuf};

/// Why the store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed.
    #[error("store {path} ({backend}): {detail}")]
    Backend {
        /// The store's directory or file.
        path: PathBuf,
        /// The backend's name (`redb` or `sled`).
        backend: &'static str,
        /// The backend's error, in words.
        detail: String,
    },
    /// A namespace containing a NUL byte (the separator of stored keys).
    #[error("store namespace {0:?} may not contain a NUL byte")]
    BadNamespace(String),
    /// The configuration names a backend this build does not include.
    #[error("{}", Backend::not_built_message(*.0))]
    NotBuilt(Backend),
}

/// Which implementation holds the data. A configuration may name sled in any build, but
/// only a build with the cargo feature `sled` can open it: elsewhere reading such a
/// configuration fails, naming the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Backend {
    /// sled: only in a build with the cargo feature `sled`.
    Sled,
    /// redb: the default.
    Redb,
}

impl Backend {
    /// The default, chosen by the crash test and the benchmark (see `docs/storage.md`).
    pub const DEFAULT: Backend = Backend::Redb;

    /// The backend's name in configuration files: `"sled"` or `"redb"`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sled => "sled",
            Backend::Redb => "redb",
        }
    }

    /// Whether this build can open the backend (sled needs the cargo feature `sled`).
    pub fn is_built(self) -> bool {
        match self {
            Backend::Sled => cfg!(feature = "sled"),
            Backend::Redb => true,
        }
    }

    /// The backends this build can open, the default last.
    pub fn built() -> Vec<Backend> {
        [Backend::Sled, Backend::Redb]
            .into_iter()
            .filter(|b| b.is_built())
            .collect()
    }

    fn not_built_message(self) -> String {
        format!(
            "the {0} store backend is not in this build of medfed: build it with the cargo \
             feature `{0}` (cargo build --release --features {0}), or use backend = \"redb\", \
             the default",
            self.name()
        )
    }
}

impl TryFrom<String> for Backend {
    type Error = String;
    fn try_from(s: String) -> Result<Backend, String> {
        s.parse()
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        let backend = match s {
            "sled" => Backend::Sled,
            "redb" => Backend::Redb,
            other => return Err(format!("unknown store backend {other:?} (redb or sled)")),
        };
        if backend.is_built() {
            Ok(backend)
        } else {
            Err(backend.not_built_message())
        }
    }
}

/// A stored (key, value) pair.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Writes applied together: all of them survive a crash, or none.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// The stored key of `key` in namespace `ns`.
fn full_key(ns: &str, key: &[u8]) -> Result<Vec<u8>, StoreError> {
    if ns.as_bytes().contains(&0) {
        return Err(StoreError::BadNamespace(ns.to_string()));
    }
    let mut k = Vec::with_capacity(ns.len() + 1 + key.len());
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    Ok(k)
}

impl Batch {
    /// Adds the write of `value` at `key` in namespace `ns`; refuses a namespace with a NUL byte.
    pub fn put(&mut self, ns: &str, key: &[u8], value: &[u8]) -> Result<&mut Batch, StoreError> {
        self.ops.push((full_key(ns, key)?, Some(value.to_vec())));
        Ok(self)
    }

    /// As [`Batch::put`], taking the value without copying it (a large one, such as a
    /// segment of records).
    pub fn put_vec(
        &mut self,
        ns: &str,
        key: &[u8],
        value: Vec<u8>,
    ) -> Result<&mut Batch, StoreError> {
        self.ops.push((full_key(ns, key)?, Some(value)));
        Ok(self)
    }

    /// Adds the removal of `key` from namespace `ns`; refuses a namespace with a NUL byte.
    pub fn delete(&mut self, ns: &str, key: &[u8]) -> Result<&mut Batch, StoreError> {
        self.ops.push((full_key(ns, key)?, None));
        Ok(self)
    }

    /// The writes and removals in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The writes in order, for a [`Store`] kept elsewhere: each as (namespace, a NUL byte,
    /// key) and the value, or `None` for a removal.
    pub fn into_ops(self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.ops
    }
}

/// What [`Store::scan_each`] hands each (key, value) to; breaking stops the scan.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> std::ops::ControlFlow<()> + 'a;

/// A party's durable state.
pub trait Store: Send + Sync {
    /// Which backend this is.
    fn backend(&self) -> Backend;
    /// The value of `key` in namespace `ns`.
    fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every (key, value) of namespace `ns`, in key order.
    fn scan(&self, ns: &str) -> Result<Vec<Entry>, StoreError> {
        let mut entries = Vec::new();
        self.scan_each(ns, &mut |k, v| {
            entries.push((k.to_vec(), v.to_vec()));
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(entries)
    }
    /// Hands every (key, value) of namespace `ns` to `each`, in key order, one at a time
    /// (nothing is collected: a namespace larger than memory can be read), until `each`
    /// breaks. The redb backend reads one snapshot, held open for the whole visit (pages
    /// freed by commits meanwhile are reused only after it).
    fn scan_each(&self, ns: &str, each: &mut Visitor<'_>) -> Result<(), StoreError>;
    /// Applies `batch` atomically and durably (fsynced before returning).
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
}

/// Opens (creating if needed) the store at `path` with `backend`.
pub fn open(backend: Backend, path: &Path) -> Result<Box<dyn Store>, StoreError> {
    match backend {
        #[cfg(feature = "sled")]
        Backend::Sled => Ok(Box::new(sled_store::SledStore::open(path)?)),
        #[cfg(not(feature = "sled"))]
        Backend::Sled => Err(StoreError::NotBuilt(Backend::Sled)),
        Backend::Redb => Ok(Box::new(redb_store::RedbStore::open(path)?)),
    }
}

fn strip_ns<'a>(ns: &str, full: &'a [u8]) -> &'a [u8] {
    full.get(ns.len() + 1..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(backend: Backend) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        {
            let s = open(backend, &path).unwrap();
            assert_eq!(s.get("offsets", b"in-0").unwrap(), None);
            let mut b = Batch::default();
            b.put("offsets", b"in-0", &42u64.to_be_bytes()).unwrap();
            b.put("task/a", b"x", b"1").unwrap();
            b.put("task/a", b"y", b"2").unwrap();
            b.put("task/ab", b"z", b"not in task/a").unwrap();
            s.commit(b).unwrap();
            let mut b = Batch::default();
            b.delete("task/a", b"x").unwrap();
            s.commit(b).unwrap();
        }
        let s = open(backend, &path).unwrap();
        assert_eq!(
            s.get("offsets", b"in-0").unwrap(),
            Some(42u64.to_be_bytes().to_vec())
        );
        assert_eq!(
            s.scan("task/a").unwrap(),
            vec![(b"y".to_vec(), b"2".to_vec())]
        );
        assert_eq!(s.backend(), backend);
        assert!(matches!(
            Batch::default().put("bad\0ns", b"k", b"v"),
            Err(StoreError::BadNamespace(_))
        ));
    }

    #[cfg(feature = "sled")]
    #[test]
    fn sled_keeps_committed_state_across_reopening() {
        exercise(Backend::Sled);
    }

    #[test]
    fn redb_keeps_committed_state_across_reopening() {
        exercise(Backend::Redb);
    }

    #[cfg(unix)]
    #[test]
    fn a_new_store_is_its_owners_alone_whatever_the_umask() {
        use crate::files::{PrivatePath, check_private, set_umask};
        set_umask(0o022);
        for backend in Backend::built() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("{}.db", backend.name()));
            {
                let s = open(backend, &path).unwrap();
                let mut b = Batch::default();
                b.put("offsets", b"in-0", &7u64.to_be_bytes()).unwrap();
                s.commit(b).unwrap();
            }
            let again = open(backend, &path).unwrap();
            assert!(again.get("offsets", b"in-0").unwrap().is_some());
            check_private(&[PrivatePath::new("the store", &path)])
                .unwrap_or_else(|e| panic!("{}: {e}", backend.name()));
        }
    }

    #[test]
    fn a_missing_directory_is_named() {
        let err = open(Backend::Redb, Path::new("/nonexistent/dir/state"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/state"), "{err}");
    }

    #[cfg(not(feature = "sled"))]
    #[test]
    fn sled_outside_a_sled_build_names_the_feature() {
        let err = "sled".parse::<Backend>().unwrap_err();
        assert!(err.contains("--features sled"), "{err}");
        let err =
            toml::from_str::<std::collections::BTreeMap<String, Backend>>("backend = \"sled\"")
                .unwrap_err();
        assert!(err.to_string().contains("cargo feature `sled`"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = open(Backend::Sled, &dir.path().join("s")).err().unwrap();
        assert!(err.to_string().contains("--features sled"), "{err}");
        assert_eq!(Backend::built(), vec![Backend::Redb]);
        assert_eq!("redb".parse::<Backend>(), Ok(Backend::Redb));
    }
}
