//! The redb backend: one table; a checkpoint is one write transaction, durable on commit
//! (redb's default durability fsyncs before `commit` returns).

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, TableDefinition};

use super::{Backend, Batch, Store, StoreError, Visitor, full_key, strip_ns};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The page cache's size.
const CACHE_BYTES: usize = 16 << 20;

pub struct RedbStore {
    path: PathBuf,
    db: redb::Database,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        path: path.to_path_buf(),
        backend: "redb",
        detail: e.to_string(),
    }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        if !path.exists() {
            // A crash while a new database file is being laid out leaves a file redb cannot
            // open ("invalid data"): build it under a temporary name, with its table, and move
            // it into place only when complete.
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".creating");
            let tmp = PathBuf::from(tmp);
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(&tmp, e)),
                _ => {}
            }
            {
                let db = redb::Database::create(&tmp).map_err(|e| err(&tmp, e))?;
                let txn = db.begin_write().map_err(|e| err(&tmp, e))?;
                txn.open_table(KV).map_err(|e| err(&tmp, e))?;
                txn.commit().map_err(|e| err(&tmp, e))?;
            }
            // redb creates the file with the process umask's mode: make it the owner's alone
            // before it gets its name.
            crate::files::make_private(&tmp).map_err(|e| err(&tmp, e))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| err(&tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| err(path, e))?;
            if let Some(dir) = path.parent()
                && let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all())
            {
                // The rename is durable at the next sync of the directory anyway.
                tracing::warn!("cannot sync directory {}: {e}", dir.display());
            }
        }
        // redb's page cache defaults to 1 GiB: bounded here, so that a node's memory does not
        // grow with the size of its store (docs/performance.md).
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| err(path, e))?;
        Ok(RedbStore {
            path: path.to_path_buf(),
            db,
        })
    }
}

impl Store for RedbStore {
    fn backend(&self) -> Backend {
        Backend::Redb
    }

    fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let k = full_key(ns, key)?;
        let txn = self.db.begin_read().map_err(|e| err(&self.path, e))?;
        let table = txn.open_table(KV).map_err(|e| err(&self.path, e))?;
        Ok(table
            .get(k.as_slice())
            .map_err(|e| err(&self.path, e))?
            .map(|v| v.value().to_vec()))
    }

    fn scan_each(&self, ns: &str, each: &mut Visitor<'_>) -> Result<(), StoreError> {
        let start = full_key(ns, b"")?;
        // The namespace's keys are those between "ns\0" and "ns\x01".
        let mut end = ns.as_bytes().to_vec();
        end.push(1);
        let txn = self.db.begin_read().map_err(|e| err(&self.path, e))?;
        let table = txn.open_table(KV).map_err(|e| err(&self.path, e))?;
        let range = table
            .range(start.as_slice()..end.as_slice())
            .map_err(|e| err(&self.path, e))?;
        for entry in range {
            let (k, v) = entry.map_err(|e| err(&self.path, e))?;
            if each(strip_ns(ns, k.value()), v.value()).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| err(&self.path, e))?;
        {
            let mut table = txn.open_table(KV).map_err(|e| err(&self.path, e))?;
            for (k, v) in &batch.ops {
                match v {
                    Some(v) => {
                        table
                            .insert(k.as_slice(), v.as_slice())
                            .map_err(|e| err(&self.path, e))?;
                    }
                    None => {
                        table.remove(k.as_slice()).map_err(|e| err(&self.path, e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| err(&self.path, e))
    }
}
