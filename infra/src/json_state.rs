//! The small JSON files a party keeps its state in (a node's privacy ledger, the rounds it
//! revealed shares for, the cohorts it answered, the studies it was announced): read once
//! when the party starts, kept in memory behind a lock, and written through whole
//! ([`files::write_atomic`](crate::files::write_atomic): a temporary file, synced, renamed
//! into place, the directory synced) on every change.
//!
//! Fail closed: [`JsonFile::save`] returns the error of a write that failed, and its caller
//! does not act (release, reveal, answer) on a change that is not on disk.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a state file holds, for the messages of its errors.
#[derive(Debug, Clone, Copy)]
pub struct Contents {
    /// Named before the file's path in its errors ("privacy ledger"), or empty for the path
    /// alone.
    pub label: &'static str,
    /// What the file must hold, with its article, for one that does not ("a ledger").
    pub a: &'static str,
    /// What it holds, with "the", for a value that cannot be encoded ("the privacy ledger").
    pub the: &'static str,
    /// Written indented (a file a person may read) rather than compact.
    pub pretty: bool,
}

/// Why a state file could not be read or written.
#[derive(Debug)]
#[non_exhaustive]
pub enum JsonStateError {
    /// The file exists but cannot be read.
    Read {
        /// What the file holds.
        contents: Contents,
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The file does not hold what it should.
    Parse {
        /// What the file should hold.
        contents: Contents,
        /// The file.
        path: PathBuf,
        /// Where and why its JSON does not fit.
        source: serde_json::Error,
    },
    /// The value cannot be encoded as JSON.
    Encode {
        /// What the value is.
        contents: Contents,
        /// The encoding error.
        source: serde_json::Error,
    },
    /// The file cannot be written.
    Write {
        /// What the file holds.
        contents: Contents,
        /// The file.
        path: PathBuf,
        /// The write error (the old file is intact: writes are atomic).
        source: std::io::Error,
    },
}

impl fmt::Display for JsonStateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // "privacy ledger /state/privacy-ledger.json" or just the path.
        let named = |c: &Contents, path: &Path| {
            if c.label.is_empty() {
                path.display().to_string()
            } else {
                format!("{} {}", c.label, path.display())
            }
        };
        match self {
            JsonStateError::Read {
                contents,
                path,
                source,
            } => write!(f, "{}: {source}", named(contents, path)),
            JsonStateError::Parse {
                contents,
                path,
                source,
            } => write!(f, "{}: not {}: {source}", named(contents, path), contents.a),
            JsonStateError::Encode { contents, source } => {
                write!(f, "{} cannot be encoded: {source}", contents.the)
            }
            JsonStateError::Write {
                contents,
                path,
                source,
            } if contents.label.is_empty() => {
                write!(f, "cannot write {}: {source}", path.display())
            }
            JsonStateError::Write {
                contents,
                path,
                source,
            } => write!(f, "cannot write the {}: {source}", named(contents, path)),
        }
    }
}

impl std::error::Error for JsonStateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JsonStateError::Read { source, .. } | JsonStateError::Write { source, .. } => {
                Some(source)
            }
            JsonStateError::Parse { source, .. } | JsonStateError::Encode { source, .. } => {
                Some(source)
            }
        }
    }
}

/// A value kept in a JSON file: in memory behind a lock, written through on every change.
pub struct JsonFile<T> {
    path: PathBuf,
    contents: Contents,
    value: Mutex<T>,
}

impl<T: Serialize + DeserializeOwned + Default> JsonFile<T> {
    /// Reads the value in `path`; a missing file is the default value (a party's first
    /// start), a file that cannot be read or parsed is an error naming it.
    pub fn read(path: &Path, contents: Contents) -> Result<T, JsonStateError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| JsonStateError::Parse {
                contents,
                path: path.to_path_buf(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(source) => Err(JsonStateError::Read {
                contents,
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The value in `path` (as [`JsonFile::read`]), kept for writing through.
    pub fn open(path: PathBuf, contents: Contents) -> Result<JsonFile<T>, JsonStateError> {
        let value = Self::read(&path, contents)?;
        Ok(JsonFile {
            path,
            contents,
            value: Mutex::new(value),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value, for reading or changing; [`JsonFile::save`] it (with the guard held)
    /// after a change. A lock poisoned by a panic is taken over: every change is either
    /// saved whole or undone by its caller when the save fails, so the value is the file's.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `value` (the locked value, changed) to the file atomically and durably. An
    /// error means the change is not on disk: the caller must not act on it.
    pub fn save(&self, value: &T) -> Result<(), JsonStateError> {
        let bytes = if self.contents.pretty {
            serde_json::to_vec_pretty(value)
        } else {
            serde_json::to_vec(value)
        }
        .map_err(|source| JsonStateError::Encode {
            contents: self.contents,
            source,
        })?;
        crate::files::write_atomic(&self.path, &bytes).map_err(|source| JsonStateError::Write {
            contents: self.contents,
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NUMBERS: Contents = Contents {
        label: "number list",
        a: "a list of numbers",
        the: "the numbers",
        pretty: false,
    };

    #[test]
    fn a_missing_file_is_empty_a_saved_one_is_read_back_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/numbers.json");
        let file = JsonFile::<Vec<u32>>::open(path.clone(), NUMBERS).unwrap();
        assert!(file.lock().is_empty());
        {
            let mut v = file.lock();
            v.push(7);
            file.save(&v).unwrap();
        }
        let again = JsonFile::<Vec<u32>>::open(path.clone(), NUMBERS).unwrap();
        assert_eq!(*again.lock(), [7]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "[7]");

        std::fs::write(&path, b"{not json").unwrap();
        let err = JsonFile::<Vec<u32>>::read(&path, NUMBERS)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "number list {}: not a list of numbers: ",
                path.display()
            )),
            "{err}"
        );

        // A write that cannot happen (the file's directory is a file) is an error naming it.
        let blocked = dir.path().join("blocked");
        let file = JsonFile::<Vec<u32>>::open(blocked.join("numbers.json"), NUMBERS).unwrap();
        std::fs::write(&blocked, b"").unwrap();
        let err = file.save(&file.lock()).unwrap_err().to_string();
        assert!(err.starts_with("cannot write the number list "), "{err}");
    }
}
