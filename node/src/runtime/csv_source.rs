//! The CSV connector. A file is one partition (a directory: one partition per `.csv` file),
//! or a file is split into several partitions by a hash of a key column. A row's offset is
//! its index among the file's data rows (the header excluded). Rows are read on their own
//! thread and handed over in batches through a bounded channel (back-pressure). In follow
//! mode the reader keeps picking up rows appended to the file.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Duration;

use super::Envelope;

/// Envelopes per batch, and batches in flight.
const BATCH: usize = 1024;
const IN_FLIGHT: usize = 16;

/// How a CSV file is cut into partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitioning {
    /// The file is one partition.
    Whole,
    /// Rows go to partition `hash(key column) % partitions` (FNV-1a, stable across runs); a
    /// row's offset stays its row index in the file, so a partition's offsets skip.
    ByKey {
        /// The key column.
        column: String,
        /// The number of partitions.
        partitions: u32,
    },
}

/// Options of a CSV read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// How the file is cut into partitions.
    pub partitioning: Partitioning,
    /// Keep reading rows appended to the file (polling every 200 ms) instead of ending.
    pub follow: bool,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            partitioning: Partitioning::Whole,
            follow: false,
        }
    }
}

/// The files of a CSV input: the file itself, or a directory's `.csv` files in name order
/// (one partition each).
pub fn files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "csv"))
            .collect();
        files.sort();
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

fn key_hash(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Starts reading `path` (one partition) from data row `from`.
pub fn read(
    path: &Path,
    stream: &str,
    partition: u32,
    from: u64,
) -> std::io::Result<(Vec<String>, Receiver<Vec<Envelope>>)> {
    read_with(path, stream, partition, from, &CsvOptions::default())
}

/// Starts reading partition `partition` of `path` from data row `from`; returns the header
/// and the envelopes.
pub fn read_with(
    path: &Path,
    stream: &str,
    partition: u32,
    from: u64,
    opts: &CsvOptions,
) -> std::io::Result<(Vec<String>, Receiver<Vec<Envelope>>)> {
    let file = std::fs::File::open(path)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut first = Vec::new();
    reader.read_until(b'\n', &mut first)?;
    let header = super::csv_row::header(&first);
    let key_col = match &opts.partitioning {
        Partitioning::Whole => None,
        Partitioning::ByKey { column, partitions } => {
            let i = header.iter().position(|h| h == column).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{}: no column named '{column}' to partition by",
                        path.display()
                    ),
                )
            })?;
            Some((i, u64::from((*partitions).max(1))))
        }
    };
    let follow = opts.follow;
    let (tx, rx) = sync_channel(IN_FLIGHT);
    let stream: Arc<str> = stream.into();
    std::thread::spawn(move || {
        let mut splitter = super::csv_row::Splitter::new();
        let mut batch = Vec::with_capacity(BATCH);
        let mut offset = 0u64;
        let mut line: Vec<u8> = Vec::new();
        loop {
            loop {
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                } else if follow {
                    // A row still being written: wait for the rest of it.
                    break;
                }
                let mut row_bytes = std::mem::take(&mut line);
                if row_bytes.last() == Some(&b'\r') {
                    row_bytes.pop();
                }
                let row = offset;
                offset += 1;
                if row < from {
                    continue;
                }
                // A row whose key cannot be read goes to the partition of the empty key,
                // where its task quarantines it.
                let key = key_col.map(|(i, _)| {
                    splitter
                        .field(&row_bytes, i)
                        .map(<[u8]>::to_vec)
                        .unwrap_or_default()
                });
                if let (Some((_, n)), Some(k)) = (key_col, &key)
                    && key_hash(k) % n != u64::from(partition)
                {
                    continue;
                }
                batch.push(Envelope {
                    stream: stream.clone(),
                    partition,
                    offset: row,
                    key,
                    payload: row_bytes,
                });
                if batch.len() == BATCH
                    && tx
                        .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                        .is_err()
                {
                    return; // the task stopped
                }
            }
            if !batch.is_empty() && tx.send(std::mem::take(&mut batch)).is_err() {
                return;
            }
            if !follow {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
            // An empty batch finds out whether the task is still there.
            if tx.send(Vec::new()).is_err() {
                return;
            }
        }
    });
    Ok((header, rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn partitions_by_key_cover_every_row_once_and_keep_a_key_together() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("obs.csv");
        let mut text = String::from("patient,glu\n");
        for i in 0..1000 {
            text.push_str(&format!("p{},{}\n", i % 37, i));
        }
        std::fs::write(&p, text).unwrap();
        let mut seen = Vec::new();
        let mut owner = std::collections::HashMap::new();
        for part in 0..4 {
            let opts = CsvOptions {
                partitioning: Partitioning::ByKey {
                    column: "patient".into(),
                    partitions: 4,
                },
                follow: false,
            };
            let (_, rx) = read_with(&p, "obs", part, 0, &opts).unwrap();
            for e in rx.iter().flatten() {
                seen.push(e.offset);
                let key = e.key.clone().unwrap();
                assert_eq!(
                    *owner.entry(key).or_insert(part),
                    part,
                    "a patient split across partitions"
                );
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        let bad = CsvOptions {
            partitioning: Partitioning::ByKey {
                column: "mrn".into(),
                partitions: 2,
            },
            follow: false,
        };
        assert!(
            read_with(&p, "obs", 0, 0, &bad)
                .err()
                .unwrap()
                .to_string()
                .contains("no column named 'mrn'")
        );
    }

    #[test]
    fn follow_mode_picks_up_appended_rows_but_not_half_written_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("live.csv");
        std::fs::write(&p, "glu\n100\n").unwrap();
        let (_, rx) = read_with(
            &p,
            "live",
            0,
            0,
            &CsvOptions {
                partitioning: Partitioning::Whole,
                follow: true,
            },
        )
        .unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap()[0].payload,
            b"100"
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"12").unwrap(); // half a row
        f.flush().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_millis(600);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            // Empty batches are the reader checking that the task is still there.
            if let Ok(batch) = rx.recv_timeout(left) {
                assert!(batch.is_empty(), "a half-written row was read");
            }
        }
        f.write_all(b"0\n130\n").unwrap();
        f.flush().unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        }
        assert_eq!(
            got.iter()
                .map(|e| (e.offset, e.payload.clone()))
                .collect::<Vec<_>>(),
            vec![(1, b"120".to_vec()), (2, b"130".to_vec())]
        );
        let dirs = files(dir.path()).unwrap();
        assert_eq!(dirs, vec![p]);
    }
}
