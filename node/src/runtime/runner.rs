//! Running one task instance over one input partition, with transactional checkpoints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use medfed_infra::store::{Batch, Store, StoreError};

use super::record::{Record, SegmentBuilder, chunk_value, segment_chunks};
use super::{KvState, MessageCollector, Scope, StreamTask, TaskCoordinator, TaskError};
use std::borrow::Cow;

/// Why a partition's run stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task failed (not a bad record: those are quarantined).
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The source failed after it started: what was processed before is checkpointed,
    /// and the end of the input was not reached.
    #[error(
        "{detail} (stopped at offset {offset}, which the checkpoint holds; a new run resumes there)"
    )]
    Source {
        /// The source's own words.
        detail: String,
        /// The checkpointed offset.
        offset: u64,
    },
}

/// How a partition's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionReport {
    /// The offset to resume from (all envelopes before it are in the state).
    pub offset: u64,
    /// Envelopes processed, quarantined ones included.
    pub processed: u64,
    /// Envelopes quarantined.
    pub quarantined: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// True if a task asked to shut down before the input ended.
    pub shut_down: bool,
}

/// Options of a partition's run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Checkpoint after this many envelopes.
    pub commit_every: u64,
    /// Call the task's `window` this often.
    pub window: Option<Duration>,
    /// Shared by the partitions of one pipeline, for the `AllTasks` scope.
    pub signals: Option<Arc<PipelineSignals>>,
    /// Checkpoint what was processed whenever the input pauses (a stream that never ends:
    /// its records reach the store, and its source learns they are durable, without
    /// waiting for `commit_every` more).
    pub checkpoint_when_idle: bool,
    /// Set once everything the source had is processed and checkpointed: when the input
    /// ends, or when the source says it has handed over all it holds for now (an empty
    /// batch) and the runner checkpointed up to there. A dataset is served from then on.
    pub caught_up: Option<Arc<AtomicBool>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            commit_every: 10_000,
            window: None,
            signals: None,
            checkpoint_when_idle: false,
            caught_up: None,
        }
    }
}

/// What a task asks of all the tasks of its pipeline (Samza's `AllTasks` scope).
#[derive(Debug, Default)]
pub struct PipelineSignals {
    shutdown: Arc<AtomicBool>,
    commits: AtomicU64,
    progress: Option<Arc<super::progress::Progress>>,
    /// Each partition's source's failure slot.
    failures: Mutex<BTreeMap<u32, super::SourceFailure>>,
}

impl PipelineSignals {
    /// Signals whose partitions also count what they process into `progress`.
    pub fn with_progress(progress: Arc<super::progress::Progress>) -> PipelineSignals {
        PipelineSignals {
            progress: Some(progress),
            ..PipelineSignals::default()
        }
    }

    /// Where the source of `partitions` (one reader may feed several) leaves a failure
    /// after its start, before it closes its channels: each of those partitions then stops
    /// with an error (its work checkpointed), not as at the end of its input, and the
    /// pipeline's other partitions checkpoint and stop.
    pub fn source_failure(&self, partitions: &[u32]) -> super::SourceFailure {
        let failure = super::SourceFailure {
            stop: self.shutdown.clone(),
            ..Default::default()
        };
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for p in partitions {
            map.insert(*p, failure.clone());
        }
        failure
    }

    /// Whether `partition` is to checkpoint and stop: the pipeline stops, and not because
    /// this partition's own source failed (that partition takes what its source handed
    /// over, until the source closes its channel).
    fn stopping(&self, partition: u32) -> bool {
        self.shutdown.load(Ordering::Relaxed) && self.failure_of(partition).is_none()
    }

    /// The failure of `partition`'s source, if it failed.
    fn failure_of(&self, partition: u32) -> Option<String> {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&partition).and_then(super::SourceFailure::failed)
    }
}

/// Where a partition's time went in its current (or last) run, checkpointed with it under
/// `metrics/timing`: what `medfed node status` tells the operator limits throughput.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// Microseconds waiting for input (the source reading and parsing, or no new records).
    pub wait_us: u64,
    /// Microseconds in the tasks (records through the pipeline).
    pub work_us: u64,
    /// Microseconds in the store's commits (writing and syncing checkpoints, waiting for
    /// another partition's commit).
    pub commit_us: u64,
    /// Records processed in this run.
    pub records: u64,
}

impl Timing {
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [self.wait_us, self.work_us, self.commit_us, self.records]
            .iter()
            .enumerate()
        {
            b[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    /// The stored form back; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Timing> {
        let v = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(
                bytes.get(8 * i..8 * i + 8)?.try_into().ok()?,
            ))
        };
        (bytes.len() == 32).then_some(())?;
        Some(Timing {
            wait_us: v(0)?,
            work_us: v(1)?,
            commit_us: v(2)?,
            records: v(3)?,
        })
    }

    /// The partition's last checkpointed timing.
    pub fn load(
        store: &dyn Store,
        stream: &str,
        partition: u32,
    ) -> Result<Option<Timing>, StoreError> {
        Ok(store
            .get("metrics/timing", &key(stream, partition))?
            .and_then(|b| Timing::decode(&b)))
    }

    /// Records a second of the tasks' time (not waiting, not committing).
    pub fn work_rate(&self) -> Option<f64> {
        (self.work_us > 0).then(|| self.records as f64 / (self.work_us as f64 / 1e6))
    }
}

/// A segment's key: `candidate` (its first record's offset, then its place in the
/// checkpoint), moved past the last key this run wrote in `ns` and past any key already in
/// the store. Records a window or the end of the input sends are kept at the partition's
/// next offset, which a later checkpoint (or run) can use again: the later segment goes
/// after the earlier one instead of over it.
fn unique_segment_key(
    store: &dyn Store,
    ns: &str,
    candidate: Vec<u8>,
    last_keys: &mut std::collections::HashMap<String, Vec<u8>>,
) -> Result<Vec<u8>, StoreError> {
    let next = |k: &[u8]| -> Vec<u8> {
        let mut k = k.to_vec();
        let low = k.len() - 4;
        let n = u32::from_be_bytes([k[low], k[low + 1], k[low + 2], k[low + 3]]);
        k[low..].copy_from_slice(&n.saturating_add(1).to_be_bytes());
        k
    };
    let mut key = match last_keys.get(ns) {
        Some(last) if candidate <= *last => next(last),
        _ => candidate,
    };
    while store.get(ns, &key)?.is_some() {
        key = next(&key);
    }
    last_keys.insert(ns.to_string(), key.clone());
    Ok(key)
}

/// Changes a partition's timing in place.
fn update(timing: &std::cell::Cell<Timing>, f: impl FnOnce(&mut Timing)) {
    let mut t = timing.get();
    f(&mut t);
    timing.set(t);
}

/// Commits a partition's checkpoints on a thread of its own, one at a time.
struct Committer {
    to_thread: Option<std::sync::mpsc::SyncSender<(Batch, u64)>>,
    done: Receiver<Result<u64, StoreError>>,
    in_flight: usize,
    thread: Option<std::thread::JoinHandle<()>>,
    backend: &'static str,
}

impl Committer {
    fn start(store: Arc<dyn Store>) -> Committer {
        let (to_thread, from_partition) = std::sync::mpsc::sync_channel::<(Batch, u64)>(1);
        let (to_partition, done) = std::sync::mpsc::channel();
        let backend = store.backend().name();
        let thread = std::thread::Builder::new()
            .name("medfed-commit".into())
            .spawn(move || {
                for (batch, offset) in from_partition {
                    let r = store.commit(batch).map(|()| offset);
                    let failed = r.is_err();
                    if to_partition.send(r).is_err() || failed {
                        break;
                    }
                }
            })
            .ok();
        Committer {
            to_thread: thread.as_ref().map(|_| to_thread),
            done,
            in_flight: 0,
            thread,
            backend,
        }
    }

    fn stopped(&self) -> StoreError {
        StoreError::Backend {
            path: std::path::PathBuf::from("(checkpoint commits)"),
            backend: self.backend,
            detail: "the thread committing checkpoints could not start or stopped".into(),
        }
    }

    /// Hands `batch` over, once the commit before it is durable.
    fn submit(
        &mut self,
        batch: Batch,
        offset: u64,
        on_durable: &dyn Fn(u64),
    ) -> Result<(), StoreError> {
        self.settle(on_durable)?;
        let tx = self.to_thread.as_ref().ok_or_else(|| self.stopped())?;
        tx.send((batch, offset)).map_err(|_| self.stopped())?;
        self.in_flight += 1;
        Ok(())
    }

    /// Calls `on_durable` for each commit that became durable since, without waiting (a
    /// source acknowledges its input as soon as it can: one that stops delivering while
    /// acknowledgements are pending would otherwise wait for them forever).
    fn poll(&mut self, on_durable: &dyn Fn(u64)) -> Result<(), StoreError> {
        while self.in_flight > 0 {
            match self.done.try_recv() {
                Ok(r) => {
                    self.in_flight -= 1;
                    on_durable(r?);
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Err(self.stopped()),
            }
        }
        Ok(())
    }

    /// Waits until every commit handed over is durable, calling `on_durable` with each
    /// one's offset; the first failure stops the partition.
    fn settle(&mut self, on_durable: &dyn Fn(u64)) -> Result<(), StoreError> {
        while self.in_flight > 0 {
            let offset = self.done.recv().map_err(|_| self.stopped())??;
            self.in_flight -= 1;
            on_durable(offset);
        }
        Ok(())
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // A commit in flight finishes (it is whole or absent in the store either way).
        self.to_thread = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the thread committing checkpoints panicked");
        }
        // The partition stopped (a task failed) with a commit in flight: its failure is
        // still told.
        while let Ok(r) = self.done.try_recv() {
            if let Err(e) = r {
                tracing::error!("a checkpoint's commit failed as the partition stopped: {e}");
            }
        }
    }
}

fn key(stream: &str, partition: u32) -> Vec<u8> {
    format!("{stream}/{partition}").into_bytes()
}

/// The offset a partition resumes from, and its task state, as last checkpointed.
pub fn restore(
    store: &dyn Store,
    stream: &str,
    partition: u32,
) -> Result<(u64, KvState, u64, u64), StoreError> {
    let (offset, processed, quarantined) = restore_counts(store, stream, partition)?;
    let state = KvState::restore(store.scan(&format!("state/{stream}/{partition}"))?);
    Ok((offset, state, processed, quarantined))
}

/// As [`restore`] without the task state: the offset to resume from, records processed
/// and quarantined (for status, which should not read a large state).
pub fn restore_counts(
    store: &dyn Store,
    stream: &str,
    partition: u32,
) -> Result<(u64, u64, u64), StoreError> {
    let k = key(stream, partition);
    let read = |ns: &str| -> Result<u64, StoreError> {
        Ok(store
            .get(ns, &k)?
            .and_then(|v| v.try_into().ok())
            .map_or(0, u64::from_be_bytes))
    };
    Ok((
        read("offsets")?,
        read("metrics/processed")?,
        read("metrics/quarantined")?,
    ))
}

/// Runs `task` over the envelopes of one partition, read from `input` (which the caller
/// started at the offset [`restore`] returned), checkpointing into `store`.
pub fn run_partition(
    task: Box<dyn StreamTask>,
    store: Arc<dyn Store>,
    stream: &str,
    partition: u32,
    input: impl Into<super::Input>,
    opts: &RunOptions,
) -> Result<PartitionReport, RuntimeError> {
    run_partition_inner(
        task,
        store,
        stream,
        partition,
        input.into(),
        opts,
        &|_| {},
        true,
    )
}

/// As [`run_partition`]; with `acks`, as [`run_partition_with`] (a source that acknowledges
/// its input), else with checkpoints committed while the partition goes on.
pub fn run_partition_for(
    task: Box<dyn StreamTask>,
    store: Arc<dyn Store>,
    stream: &str,
    partition: u32,
    input: impl Into<super::Input>,
    opts: &RunOptions,
    acks: Option<&dyn Fn(u64)>,
) -> Result<PartitionReport, RuntimeError> {
    match acks {
        Some(on_checkpoint) => {
            run_partition_with(task, store, stream, partition, input, opts, on_checkpoint)
        }
        None => run_partition(task, store, stream, partition, input, opts),
    }
}

/// As [`run_partition`], calling `on_checkpoint(offset)` after each durable checkpoint (a
/// source acknowledges its input from there). Each checkpoint is waited for, so that its
/// acknowledgement goes out at once: a JetStream consumer redelivers what is not
/// acknowledged within its `ack_wait`, and under load the redeliveries of a larger window
/// of unacknowledged messages crowded out new ones (a bounded ingestion then ended early).
pub fn run_partition_with(
    task: Box<dyn StreamTask>,
    store: Arc<dyn Store>,
    stream: &str,
    partition: u32,
    input: impl Into<super::Input>,
    opts: &RunOptions,
    on_checkpoint: &dyn Fn(u64),
) -> Result<PartitionReport, RuntimeError> {
    run_partition_inner(
        task,
        store,
        stream,
        partition,
        input.into(),
        opts,
        on_checkpoint,
        false,
    )
}

/// The run; `overlap`: commit count-based checkpoints while going on with the next records.
#[allow(clippy::too_many_arguments)]
fn run_partition_inner(
    mut task: Box<dyn StreamTask>,
    store: Arc<dyn Store>,
    stream: &str,
    partition: u32,
    input: super::Input,
    opts: &RunOptions,
    on_checkpoint: &dyn Fn(u64),
    overlap: bool,
) -> Result<PartitionReport, RuntimeError> {
    let (mut offset, mut state, mut processed, mut quarantined) =
        restore(&*store, stream, partition)?;
    task.init(&mut state)?;
    let state_ns = format!("state/{stream}/{partition}");
    let k = key(stream, partition);
    let mut report = PartitionReport {
        offset,
        processed,
        quarantined,
        checkpoints: 0,
        shut_down: false,
    };
    let mut dead = Vec::new();
    let mut outputs: Vec<(String, u64, Vec<u8>)> = Vec::new();
    // Records sent to output streams since the last checkpoint: per stream, the first
    // record's input offset and the segment being built.
    let mut record_outputs: Vec<(Cow<'static, str>, u64, SegmentBuilder)> = Vec::new();
    let keep = |outputs: &mut Vec<(Cow<'static, str>, u64, SegmentBuilder)>,
                sent: &mut Vec<(Cow<'static, str>, Record)>,
                at: u64| {
        for (name, record) in sent.drain(..) {
            // The stream's first builder with room: builders fill in turn, and all of
            // them are empty again after a checkpoint.
            match outputs
                .iter_mut()
                .find(|(n, _, segment)| *n == name && !segment.is_full())
            {
                Some((_, first, segment)) => {
                    // A builder of an earlier checkpoint, reused.
                    if segment.is_empty() {
                        *first = at;
                    }
                    segment.push(record);
                }
                None => {
                    let mut segment = SegmentBuilder::default();
                    segment.push(record);
                    outputs.push((name, at, segment));
                }
            }
        }
    };
    let timing = std::cell::Cell::new(Timing::default());
    // The last segment key written in each output namespace by this run.
    let last_keys = std::cell::RefCell::new(std::collections::HashMap::<String, Vec<u8>>::new());
    // One collector for every envelope (its buffers are reused).
    let mut out = MessageCollector::default();
    let mut since = 0u64;
    let mut last_window = Instant::now();
    let mut commits_seen = opts
        .signals
        .as_ref()
        .map_or(0, |s| s.commits.load(Ordering::Relaxed));

    let checkpoint = |offset: u64,
                      processed: u64,
                      quarantined: u64,
                      state: &mut KvState,
                      dead: &mut Vec<super::DeadLetter>,
                      outputs: &mut Vec<(String, u64, Vec<u8>)>,
                      record_outputs: &mut Vec<(Cow<'static, str>, u64, SegmentBuilder)>|
     -> Result<Batch, StoreError> {
        let mut b = Batch::default();
        b.put("offsets", &k, &offset.to_be_bytes())?;
        b.put("metrics/processed", &k, &processed.to_be_bytes())?;
        b.put("metrics/quarantined", &k, &quarantined.to_be_bytes())?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        b.put("metrics/checkpoint_ms", &k, &now_ms.to_be_bytes())?;
        for (key, value) in state.take_changes() {
            match value {
                Some(v) => b.put(&state_ns, &key, &v)?,
                None => b.delete(&state_ns, &key)?,
            };
        }
        for d in dead.drain(..) {
            b.put(
                &format!("dead-letter/{stream}/{partition}"),
                &d.offset.to_be_bytes(),
                &d.rejection.encode(),
            )?;
        }
        // Records sent to named output streams (alerts, monitoring), durable with the
        // checkpoint, keyed by input offset and position.
        for (i, (name, at, payload)) in outputs.drain(..).enumerate() {
            let mut key = at.to_be_bytes().to_vec();
            key.extend_from_slice(&(i as u32).to_be_bytes());
            b.put(
                &format!("output/{name}/{stream}/{partition}"),
                &key,
                &payload,
            )?;
        }
        // Records sent to output streams: one segment per stream and checkpoint, keyed by
        // the first record's input offset (so segments read back in input order).
        for (i, (name, first, segment)) in record_outputs.iter_mut().enumerate() {
            if segment.is_empty() {
                continue;
            }
            // Keyed by the first record's input offset, then the segment's place in this
            // checkpoint (a full segment is followed by another).
            let ns = format!("output/{name}/{stream}/{partition}");
            let mut key = first.to_be_bytes().to_vec();
            key.extend_from_slice(&(u32::MAX - 0xffff).saturating_add(i as u32).to_be_bytes());
            let key = unique_segment_key(&*store, &ns, key, &mut last_keys.borrow_mut())?;
            // In chunks (`segment_chunks`), the later ones keyed by the key and their number.
            let bytes = segment.finish();
            for (c, chunk) in segment_chunks(&bytes).into_iter().enumerate() {
                let mut ck = key.clone();
                if c > 0 {
                    ck.extend_from_slice(&(c as u32).to_be_bytes());
                }
                b.put_vec(&ns, &ck, chunk_value(c, chunk))?;
            }
        }
        b.put("metrics/timing", &k, &timing.get().encode())?;
        Ok(b)
    };
    // Checkpoints are committed on their own thread, at most one in flight: the partition
    // goes on with the next records meanwhile, and waits for a commit before handing over
    // the next one (or before telling anyone a checkpoint is durable).
    let mut committer = Committer::start(store.clone());
    // Commits `b` (made at `offset`); `wait`: return only once it is durable.
    let mut commit = |b: Option<(Batch, u64)>, wait: bool| -> Result<(), StoreError> {
        let Some((b, offset)) = b else {
            return match wait {
                true => committer.settle(on_checkpoint),
                false => committer.poll(on_checkpoint),
            };
        };
        let started = Instant::now();
        committer.submit(b, offset, on_checkpoint)?;
        if wait {
            committer.settle(on_checkpoint)?;
        }
        // Only the time the partition waits for the store counts as committing; encoding
        // the checkpoint's records is the tasks' work.
        update(&timing, |t| {
            t.commit_us += started.elapsed().as_micros() as u64;
        });
        Ok(())
    };

    // How long to wait for input before looking at the window timer and the pipeline's
    // signals again.
    const POLL: Duration = Duration::from_millis(200);
    'outer: loop {
        let wait = opts
            .window
            .map_or(POLL, |w| w.saturating_sub(last_window.elapsed()).min(POLL));
        let waiting = Instant::now();
        let batch = match input.recv_timeout(wait) {
            Ok(b) => Some(b),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        update(&timing, |t| {
            t.wait_us += waiting.elapsed().as_micros() as u64;
        });
        // Tell the source of the checkpoints that became durable meanwhile.
        commit(None, false)?;
        if let Some(w) = opts.window
            && last_window.elapsed() >= w
        {
            let windowing = Instant::now();
            let mut coord = TaskCoordinator::default();
            out.clear();
            task.window(&mut state, &mut out, &mut coord)?;
            quarantined += out.dead.len() as u64;
            dead.append(&mut out.dead);
            outputs.extend(
                out.out
                    .drain(..)
                    .map(|(name, payload)| (name, offset, payload)),
            );
            keep(&mut record_outputs, &mut out.records, offset);
            last_window = Instant::now();
            update(&timing, |t| {
                t.work_us += windowing.elapsed().as_micros() as u64;
            });
        }
        // A task elsewhere in the pipeline asked every task to stop.
        if batch.is_none() && opts.signals.as_ref().is_some_and(|s| s.stopping(partition)) {
            report.shut_down = true;
            break;
        }
        // An empty batch: the source handed over all it holds for now.
        let drained = batch.as_ref().is_some_and(Vec::is_empty);
        if batch.is_none() || drained {
            if opts.checkpoint_when_idle && since > 0 {
                task.flush(&mut state);
                let b = checkpoint(
                    offset,
                    processed,
                    quarantined,
                    &mut state,
                    &mut dead,
                    &mut outputs,
                    &mut record_outputs,
                )?;
                commit(Some((b, offset)), true)?;
                report.checkpoints += 1;
                since = 0;
            }
            if drained
                && since == 0
                && let Some(flag) = &opts.caught_up
            {
                // Caught up only once the last checkpoint (perhaps still in flight) is
                // durable.
                commit(None, true)?;
                flag.store(true, Ordering::Relaxed);
            }
            continue;
        }
        let Some(batch) = batch else { continue };
        let progress = opts.signals.as_ref().and_then(|s| s.progress.as_ref());
        let (before, quarantined_before) = (processed, quarantined);
        let bytes: u64 = match progress {
            Some(_) => batch.iter().map(|e| e.payload.len() as u64 + 1).sum(),
            None => 0,
        };
        let (working, committed_before) = (Instant::now(), timing.get().commit_us);
        for env in &batch {
            if env.offset < offset {
                continue; // already in the state (the source re-sent it)
            }
            // Offsets may skip (a JetStream partition's stream sequences do).
            // Another task of the pipeline asked all tasks to commit or stop.
            if let Some(sig) = &opts.signals {
                let commits = sig.commits.load(Ordering::Relaxed);
                if commits != commits_seen || sig.stopping(partition) {
                    commits_seen = commits;
                    task.flush(&mut state);
                    let b = checkpoint(
                        offset,
                        processed,
                        quarantined,
                        &mut state,
                        &mut dead,
                        &mut outputs,
                        &mut record_outputs,
                    )?;
                    commit(Some((b, offset)), true)?;
                    report.checkpoints += 1;
                    since = 0;
                    if sig.stopping(partition) {
                        report.shut_down = true;
                        break 'outer;
                    }
                }
            }
            let mut coord = TaskCoordinator::default();
            out.clear();
            task.process(env, &mut state, &mut out, &mut coord)?;
            if let Some(sig) = &opts.signals {
                if coord.commit == Some(Scope::AllTasks) {
                    sig.commits.fetch_add(1, Ordering::Relaxed);
                }
                if coord.shutdown == Some(Scope::AllTasks) {
                    sig.shutdown.store(true, Ordering::Relaxed);
                }
            }
            quarantined += out.dead.len() as u64;
            dead.append(&mut out.dead);
            for (name, payload) in out.out.drain(..) {
                outputs.push((name, env.offset, payload));
            }
            keep(&mut record_outputs, &mut out.records, env.offset);
            processed += 1;
            offset = env.offset + 1;
            since += 1;
            if since >= opts.commit_every || coord.commit.is_some() || coord.shutdown.is_some() {
                task.flush(&mut state);
                let b = checkpoint(
                    offset,
                    processed,
                    quarantined,
                    &mut state,
                    &mut dead,
                    &mut outputs,
                    &mut record_outputs,
                )?;
                commit(
                    Some((b, offset)),
                    !overlap || coord.commit.is_some() || coord.shutdown.is_some(),
                )?;
                report.checkpoints += 1;
                since = 0;
            }
            if matches!(coord.shutdown, Some(Scope::CurrentTask | Scope::AllTasks)) {
                report.shut_down = true;
                break 'outer;
            }
        }
        input.give_back(batch);
        if let Some(p) = progress {
            p.add(processed - before, quarantined - quarantined_before, bytes);
        }
        update(&timing, |t| {
            t.work_us += (working.elapsed().as_micros() as u64)
                .saturating_sub(t.commit_us - committed_before);
            t.records += processed - before;
        });
    }
    // A closed input is its end unless the source failed: then what was processed is
    // checkpointed, without the tasks' end-of-input work and without "caught up".
    let failed = opts
        .signals
        .as_ref()
        .and_then(|s| s.failure_of(partition))
        .or_else(|| input.failed());
    if !report.shut_down && failed.is_none() {
        out.clear();
        task.on_end_of_stream(&mut state, &mut out)?;
        keep(&mut record_outputs, &mut out.records, offset);
        quarantined += out.dead.len() as u64;
        dead.append(&mut out.dead);
        outputs.extend(
            out.out
                .drain(..)
                .map(|(name, payload)| (name, offset, payload)),
        );
    }
    task.flush(&mut state);
    let b = checkpoint(
        offset,
        processed,
        quarantined,
        &mut state,
        &mut dead,
        &mut outputs,
        &mut record_outputs,
    )?;
    commit(Some((b, offset)), true)?;
    report.checkpoints += 1;
    if let Some(detail) = failed {
        task.close();
        return Err(RuntimeError::Source { detail, offset });
    }
    if let Some(flag) = &opts.caught_up {
        flag.store(true, Ordering::Relaxed);
    }
    task.close();
    Ok(PartitionReport {
        offset,
        processed,
        quarantined,
        ..report
    })
}
