//! Running one task instance over one input partition, with transactional checkpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use medfed_infra::store::{Batch, Store, StoreError};

use super::record::{Record, SegmentBuilder};
use super::{Envelope, KvState, MessageCollector, Scope, StreamTask, TaskCoordinator, TaskError};
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
    shutdown: AtomicBool,
    commits: AtomicU64,
    progress: Option<Arc<super::progress::Progress>>,
}

impl PipelineSignals {
    /// Signals whose partitions also count what they process into `progress`.
    pub fn with_progress(progress: Arc<super::progress::Progress>) -> PipelineSignals {
        PipelineSignals {
            progress: Some(progress),
            ..PipelineSignals::default()
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
    let k = key(stream, partition);
    let read = |ns: &str| -> Result<u64, StoreError> {
        Ok(store
            .get(ns, &k)?
            .and_then(|v| v.try_into().ok())
            .map_or(0, u64::from_be_bytes))
    };
    let state = KvState::restore(store.scan(&format!("state/{stream}/{partition}"))?);
    Ok((
        read("offsets")?,
        state,
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
    input: Receiver<Vec<Envelope>>,
    opts: &RunOptions,
) -> Result<PartitionReport, RuntimeError> {
    run_partition_with(task, store, stream, partition, input, opts, &|_| {})
}

/// As [`run_partition`], calling `on_checkpoint(offset)` after each durable checkpoint (a
/// source acknowledges its input from there).
pub fn run_partition_with(
    mut task: Box<dyn StreamTask>,
    store: Arc<dyn Store>,
    stream: &str,
    partition: u32,
    input: Receiver<Vec<Envelope>>,
    opts: &RunOptions,
    on_checkpoint: &dyn Fn(u64),
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
            match outputs
                .iter_mut()
                .rev()
                .find(|(n, ..)| *n == name)
                .filter(|(.., segment)| !segment.is_full())
            {
                Some((.., segment)) => segment.push(record),
                None => {
                    let mut segment = SegmentBuilder::default();
                    segment.push(record);
                    outputs.push((name, at, segment));
                }
            }
        }
    };
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
     -> Result<(), StoreError> {
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
        for (i, (name, first, segment)) in record_outputs.drain(..).enumerate() {
            // Keyed by the first record's input offset, then the segment's place in this
            // checkpoint (a full segment is followed by another).
            let mut key = first.to_be_bytes().to_vec();
            key.extend_from_slice(&(u32::MAX - 0xffff).saturating_add(i as u32).to_be_bytes());
            b.put(
                &format!("output/{name}/{stream}/{partition}"),
                &key,
                &{ segment }.finish(),
            )?;
        }
        store.commit(b)
    };

    // How long to wait for input before looking at the window timer and the pipeline's
    // signals again.
    const POLL: Duration = Duration::from_millis(200);
    'outer: loop {
        let wait = opts
            .window
            .map_or(POLL, |w| w.saturating_sub(last_window.elapsed()).min(POLL));
        let batch = match input.recv_timeout(wait) {
            Ok(b) => Some(b),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Some(w) = opts.window
            && last_window.elapsed() >= w
        {
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
        }
        // A task elsewhere in the pipeline asked every task to stop.
        if batch.is_none()
            && opts
                .signals
                .as_ref()
                .is_some_and(|s| s.shutdown.load(Ordering::Relaxed))
        {
            report.shut_down = true;
            break;
        }
        // An empty batch: the source handed over all it holds for now.
        let drained = batch.as_ref().is_some_and(Vec::is_empty);
        if batch.is_none() || drained {
            if opts.checkpoint_when_idle && since > 0 {
                task.flush(&mut state);
                checkpoint(
                    offset,
                    processed,
                    quarantined,
                    &mut state,
                    &mut dead,
                    &mut outputs,
                    &mut record_outputs,
                )?;
                on_checkpoint(offset);
                report.checkpoints += 1;
                since = 0;
            }
            if drained
                && since == 0
                && let Some(flag) = &opts.caught_up
            {
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
        for env in batch {
            if env.offset < offset {
                continue; // already in the state (the source re-sent it)
            }
            // Offsets may skip (a JetStream partition's stream sequences do).
            // Another task of the pipeline asked all tasks to commit or stop.
            if let Some(sig) = &opts.signals {
                let commits = sig.commits.load(Ordering::Relaxed);
                if commits != commits_seen || sig.shutdown.load(Ordering::Relaxed) {
                    commits_seen = commits;
                    task.flush(&mut state);
                    checkpoint(
                        offset,
                        processed,
                        quarantined,
                        &mut state,
                        &mut dead,
                        &mut outputs,
                        &mut record_outputs,
                    )?;
                    on_checkpoint(offset);
                    report.checkpoints += 1;
                    since = 0;
                    if sig.shutdown.load(Ordering::Relaxed) {
                        report.shut_down = true;
                        break 'outer;
                    }
                }
            }
            let mut coord = TaskCoordinator::default();
            out.clear();
            task.process(&env, &mut state, &mut out, &mut coord)?;
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
                checkpoint(
                    offset,
                    processed,
                    quarantined,
                    &mut state,
                    &mut dead,
                    &mut outputs,
                    &mut record_outputs,
                )?;
                on_checkpoint(offset);
                report.checkpoints += 1;
                since = 0;
            }
            if matches!(coord.shutdown, Some(Scope::CurrentTask | Scope::AllTasks)) {
                report.shut_down = true;
                break 'outer;
            }
        }
        if let Some(p) = progress {
            p.add(processed - before, quarantined - quarantined_before, bytes);
        }
    }
    if !report.shut_down {
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
    checkpoint(
        offset,
        processed,
        quarantined,
        &mut state,
        &mut dead,
        &mut outputs,
        &mut record_outputs,
    )?;
    on_checkpoint(offset);
    report.checkpoints += 1;
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
