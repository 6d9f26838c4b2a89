//! The sled backend: one tree; a checkpoint is one sled transaction followed by a flush
//! (sled's transactions are atomic but only durable once flushed).

use std::path::{Path, PathBuf};

use super::{Backend, Batch, Store, StoreError, Visitor, full_key, strip_ns};

pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        // sled keeps a directory of files, created with the process umask's modes: make the
        // directory the owner's first, and take group and other permissions off what sled
        // made in it.
        crate::files::create_private_dir(path).map_err(|e| err(path, e))?;
        let db = sled::open(path).map_err(|e| err(path, e))?;
        crate::files::make_private(path).map_err(|e| err(path, e))?;
        Ok(SledStore {
            path: path.to_path_buf(),
            db,
        })
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        path: path.to_path_buf(),
        backend: "sled",
        detail: e.to_string(),
    }
}

impl Store for SledStore {
    fn backend(&self) -> Backend {
        Backend::Sled
    }

    fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(full_key(ns, key)?)
            .map_err(|e| err(&self.path, e))?
            .map(|v| v.to_vec()))
    }

    fn scan_each(&self, ns: &str, each: &mut Visitor<'_>) -> Result<(), StoreError> {
        for entry in self.db.scan_prefix(full_key(ns, b"")?) {
            let (k, v) = entry.map_err(|e| err(&self.path, e))?;
            if each(strip_ns(ns, &k), &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        // apply_batch is atomic; flush makes it durable.
        self.db.apply_batch(b).map_err(|e| err(&self.path, e))?;
        self.db.flush().map_err(|e| err(&self.path, e))?;
        Ok(())
    }
}
