//! The CSV connector. A file is one partition (a directory: one partition per `.csv` file),
//! or a file is split into several partitions by a hash of a key column. A row's offset is
//! its index among the file's data rows (the header excluded). Rows are read on their own
//! thread and handed over in batches through a bounded channel (back-pressure). In follow
//! mode the reader keeps picking up rows appended to the file.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::Duration;

use super::csv_row::Splitter;
use super::{Envelope, Input};

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
        // An entry that cannot be read is an error, not a file left out of the run.
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "csv") {
                files.push(p);
            }
        }
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

/// The column rows are partitioned by (its index) and the number of partitions, if any.
type KeyColumn = Option<(usize, u64)>;

/// Where the key of `opts`' partitioning is in `header`.
fn key_column(header: &[String], path: &Path, opts: &CsvOptions) -> std::io::Result<KeyColumn> {
    match &opts.partitioning {
        Partitioning::Whole => Ok(None),
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
            Ok(Some((i, u64::from((*partitions).max(1)))))
        }
    }
}

/// A row's key. A row whose key cannot be read has the empty key: its partition's task
/// quarantines it.
fn key_of<'a>(splitter: &'a mut Splitter, row: &[u8], key_col: KeyColumn) -> Option<&'a [u8]> {
    key_col.map(|(i, _)| splitter.leading_field(row, i).unwrap_or_default())
}

/// The partition a row with `key` goes to (`None`: every partition).
fn target_of(key: Option<&[u8]>, key_col: KeyColumn) -> Option<u32> {
    match (key_col, key) {
        (Some((_, n)), Some(k)) => Some((key_hash(k) % n) as u32),
        _ => None,
    }
}

/// How many rows each of `partitions` (`(partition, from)`, as for [`read_partitions`])
/// still has to read in `path`: the rows at or after its `from` that go to it. One pass
/// over the file, reading and partitioning rows as the reader does; for `medfed node
/// status`.
pub fn remaining(
    path: &Path,
    opts: &CsvOptions,
    partitions: &[(u32, u64)],
) -> std::io::Result<Vec<u64>> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    let key_col = key_column(&super::csv_row::header(&line), path, opts)?;
    let mut splitter = Splitter::new();
    let mut left = vec![0u64; partitions.len()];
    let mut row = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(left);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let target = target_of(key_of(&mut splitter, &line, key_col), key_col);
        for (n, (p, from)) in left.iter_mut().zip(partitions) {
            if row >= *from && target.is_none_or(|t| t == *p) {
                *n += 1;
            }
        }
        row += 1;
    }
}

/// Starts reading `path` (one partition) from data row `from`.
pub fn read(
    path: &Path,
    stream: &str,
    partition: u32,
    from: u64,
) -> std::io::Result<(Vec<String>, Input)> {
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
) -> std::io::Result<(Vec<String>, Input)> {
    read_with_reporting(path, stream, partition, from, opts, None)
}

/// As [`read_with`], leaving a read error after the start in `failure`
/// ([`read_partitions_reporting`]).
pub fn read_with_reporting(
    path: &Path,
    stream: &str,
    partition: u32,
    from: u64,
    opts: &CsvOptions,
    failure: Option<super::SourceFailure>,
) -> std::io::Result<(Vec<String>, Input)> {
    let (header, mut rxs) =
        read_partitions_reporting(path, stream, &[(partition, from)], opts, failure)?;
    let rx = rxs
        .pop()
        .ok_or_else(|| std::io::Error::other("no partition"))?;
    Ok((header, rx))
}

/// Starts reading several partitions of `path`, each `(partition, from)` from its own data
/// row, with ONE reader: each row is read once and handed to the partition its key hashes
/// to (with [`Partitioning::Whole`], every row goes to every partition listed). Returns the
/// header and one receiver per listed partition, in order.
pub fn read_partitions(
    path: &Path,
    stream: &str,
    partitions: &[(u32, u64)],
    opts: &CsvOptions,
) -> std::io::Result<(Vec<String>, Vec<Batches>)> {
    read_partitions_reporting(path, stream, partitions, opts, None)
}

/// As [`read_partitions`], leaving a read error after the start in `failure` (the
/// pipeline's, [`super::PipelineSignals::source_failure`]) before the partitions' channels
/// close: their runs then stop with an error, not as at the end of the file.
pub fn read_partitions_reporting(
    path: &Path,
    stream: &str,
    partitions: &[(u32, u64)],
    opts: &CsvOptions,
    failure: Option<super::SourceFailure>,
) -> std::io::Result<(Vec<String>, Vec<Batches>)> {
    let file = std::fs::File::open(path)?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    read_partitions_from(reader, path, stream, partitions, opts, failure)
}

/// [`read_partitions_reporting`] of any reader (`path` names it in errors).
fn read_partitions_from<R: BufRead + Send + 'static>(
    mut reader: R,
    path: &Path,
    stream: &str,
    partitions: &[(u32, u64)],
    opts: &CsvOptions,
    failure: Option<super::SourceFailure>,
) -> std::io::Result<(Vec<String>, Vec<Batches>)> {
    let mut first = Vec::new();
    reader.read_until(b'\n', &mut first)?;
    let header = super::csv_row::header(&first);
    let key_col = key_column(&header, path, opts)?;
    // Without the pipeline's slot, a failure is left where the partitions' runs find it.
    let failure = failure.unwrap_or_default();
    let mut outs = Vec::new();
    let mut rxs = Vec::new();
    for &(partition, from) in partitions {
        let (tx, rx) = sync_channel(IN_FLIGHT);
        // Batches the partition is done with come back, their envelopes' buffers reused:
        // the partition's thread then frees nothing the reader allocated.
        let (back_tx, back_rx) = sync_channel(IN_FLIGHT);
        outs.push(Out {
            partition,
            from,
            tx: Some(tx),
            batch: Vec::with_capacity(BATCH),
            returned: back_rx,
            spare: Vec::new(),
        });
        rxs.push(Input::new(rx, Some(failure.clone())).with_recycling(back_tx));
    }
    let follow = opts.follow;
    let stream: Arc<str> = stream.into();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let mut outs = outs;
        // Declared after `outs`, so dropped before it: a panic is recorded before the
        // partitions' channels close (else it would look like the end of the file).
        let _guard = PanicGuard(failure.clone());
        let mut splitter = Splitter::new();
        let mut offset = 0u64;
        let mut line: Vec<u8> = Vec::new();
        // The lowest row any partition still needs.
        let start = outs.iter().map(|o| o.from).min().unwrap_or(0);
        loop {
            loop {
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        // Never a silent end: the tasks stop with what they have and
                        // fail, and the operator is told (a new run starts from the
                        // checkpoint).
                        let why = format!(
                            "{}: reading data row {} (offset {offset}) failed: {e}",
                            path.display(),
                            offset + 1
                        );
                        tracing::error!("{why}; the partitions stop here");
                        failure.fail(why);
                        // The rows read before it go on, to be checkpointed.
                        for o in &mut outs {
                            o.flush();
                        }
                        return;
                    }
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                } else if follow {
                    // A row still being written: wait for the rest of it.
                    break;
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                let row = offset;
                offset += 1;
                if row < start {
                    line.clear();
                    continue;
                }
                let key = key_of(&mut splitter, &line, key_col);
                let target = target_of(key, key_col);
                for o in outs
                    .iter_mut()
                    .filter(|o| target.is_none_or(|t| t == o.partition) && row >= o.from)
                {
                    o.push(&stream, row, key, &line);
                }
                line.clear();
                if outs.iter().all(|o| o.tx.is_none()) {
                    return; // every task stopped
                }
            }
            for o in &mut outs {
                o.flush();
            }
            if !follow || outs.iter().all(|o| o.tx.is_none()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
            // An empty batch finds out whether the task is still there.
            for o in &mut outs {
                if let Some(tx) = &o.tx
                    && tx.send(Vec::new()).is_err()
                {
                    o.tx = None;
                }
            }
        }
    });
    Ok((header, rxs))
}

/// Records a failure when the reader's thread unwinds from a panic.
struct PanicGuard(super::SourceFailure);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail("the CSV reader stopped unexpectedly (a bug: see the log)".into());
        }
    }
}

/// The batches of envelopes of one partition.
pub type Batches = Input;

/// One partition's side of a shared reader.
struct Out {
    partition: u32,
    from: u64,
    /// Gone once its task stopped.
    tx: Option<SyncSender<Vec<Envelope>>>,
    batch: Vec<Envelope>,
    /// Batches the partition handed back ([`Input::give_back`]).
    returned: std::sync::mpsc::Receiver<Vec<Envelope>>,
    /// Envelopes of a handed-back batch, to fill again.
    spare: Vec<Envelope>,
}

impl Out {
    /// Adds the row at `offset` to the batch: into a handed-back envelope where there is
    /// one (its buffers keep their capacity), else a new one.
    fn push(&mut self, stream: &Arc<str>, offset: u64, key: Option<&[u8]>, row: &[u8]) {
        if self.tx.is_none() {
            return;
        }
        if self.spare.is_empty()
            && let Ok(back) = self.returned.try_recv()
        {
            self.spare = back;
        }
        let env = match self.spare.pop() {
            Some(mut env) => {
                if !Arc::ptr_eq(&env.stream, stream) {
                    env.stream = stream.clone();
                }
                env.offset = offset;
                env.partition = self.partition;
                match (&mut env.key, key) {
                    (Some(k), Some(key)) => {
                        k.clear();
                        k.extend_from_slice(key);
                    }
                    (k, key) => *k = key.map(<[u8]>::to_vec),
                }
                env.payload.clear();
                env.payload.extend_from_slice(row);
                env
            }
            None => Envelope {
                stream: stream.clone(),
                partition: self.partition,
                offset,
                key: key.map(<[u8]>::to_vec),
                payload: row.to_vec(),
            },
        };
        self.batch.push(env);
        if self.batch.len() == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        // The next batch fills the emptied vector of a handed-back one where there is one.
        let next = match self.spare.is_empty() {
            true => std::mem::take(&mut self.spare),
            false => Vec::with_capacity(BATCH),
        };
        let batch = std::mem::replace(&mut self.batch, next);
        if self.batch.capacity() < BATCH {
            self.batch.reserve(BATCH);
        }
        if let Some(tx) = &self.tx
            && tx.send(batch).is_err()
        {
            self.tx = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A reader that fails once what it holds is read (a disk error mid-file).
    struct FailsAfter(std::io::Cursor<Vec<u8>>);

    impl std::io::Read for FailsAfter {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(std::io::Error::other("Input/output error")),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn a_read_error_mid_file_fails_the_partitions_not_ends_them() {
        let failure = super::super::SourceFailure::default();
        let reader =
            std::io::BufReader::new(FailsAfter(std::io::Cursor::new(b"glu\n1\n2\n3\n".to_vec())));
        let (header, mut rxs) = read_partitions_from(
            reader,
            Path::new("extract.csv"),
            "s",
            &[(0, 0)],
            &CsvOptions::default(),
            Some(failure.clone()),
        )
        .unwrap();
        assert_eq!(header, ["glu"]);
        let rx = rxs.pop().unwrap();
        // The rows before the error are handed over; the channel closes only once the
        // failure is recorded.
        let rows: usize = rx.iter().map(|b| b.len()).sum();
        assert_eq!(rows, 3);
        assert_eq!(
            failure.failed().as_deref(),
            Some("extract.csv: reading data row 4 (offset 3) failed: Input/output error")
        );
    }

    #[test]
    fn without_the_pipelines_slot_a_read_error_still_fails_the_run() {
        // The public readers (`read`, `read_with`, `read_partitions`) leave the failure
        // with the input itself: the run stops with an error and checkpoints the rows it
        // had, instead of taking the error for the end of the file.
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn medfed_infra::store::Store> = Arc::from(
            medfed_infra::store::open(
                medfed_infra::store::Backend::DEFAULT,
                &dir.path().join("state"),
            )
            .unwrap(),
        );
        let reader =
            std::io::BufReader::new(FailsAfter(std::io::Cursor::new(b"glu\n1\n2\n3\n".to_vec())));
        let (header, mut inputs) = read_partitions_from(
            reader,
            Path::new("extract.csv"),
            "s",
            &[(0, 0)],
            &CsvOptions::default(),
            None,
        )
        .unwrap();
        let task = super::super::ColumnStats::new(&header, &["glu"]).unwrap();
        let err = super::super::run_partition(
            Box::new(task),
            store.clone(),
            "s",
            0,
            inputs.pop().unwrap(),
            &super::super::RunOptions::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "extract.csv: reading data row 4 (offset 3) failed: Input/output error \
             (stopped at offset 3, which the checkpoint holds; a new run resumes there)"
        );
        let (offset, _, processed, _) = super::super::restore(&*store, "s", 0).unwrap();
        assert_eq!((offset, processed), (3, 3));
    }

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
        // What `node status` tells as each partition's lag: the rows its reader would
        // still hand it from where it stands.
        let opts = CsvOptions {
            partitioning: Partitioning::ByKey {
                column: "patient".into(),
                partitions: 4,
            },
            follow: false,
        };
        let from = [(0, 0), (1, 500), (2, 999), (3, 1000)];
        let want: Vec<u64> = from
            .iter()
            .map(|&(part, offset)| {
                let (_, rx) = read_with(&p, "obs", part, offset, &opts).unwrap();
                rx.iter().map(|b| b.len() as u64).sum()
            })
            .collect();
        assert_eq!(remaining(&p, &opts, &from).unwrap(), want);
        assert!(want[0] > 0 && want[1] > 0 && want[3] == 0, "{want:?}");
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
