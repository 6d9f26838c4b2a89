//! The StreamTask runtime, in the model of Apache Samza's low-level API.
//!
//! An input is a stream of partitions; each [`Envelope`] carries its stream, partition,
//! offset, key and payload. One task instance runs per input partition (on its own tokio
//! task, fed through a bounded channel, so a slow task pushes back on its reader) and sees
//! the partition's envelopes in order. A task keeps its state in a [`KvState`]; every
//! `commit_every` envelopes (or when it asks, through the [`TaskCoordinator`]) the runtime
//! writes the partition's next offset and the state's changes in ONE durable store
//! transaction, so a restarted node resumes exactly where its state says it was.
//!
//! Records a task cannot use go to the dead-letter stream through the [`MessageCollector`],
//! with a [`Rejection`]: the reason, the field and the patient's pseudonym, never a value.
//! They are counted and never stop the partition.

pub mod csv_row;
pub mod csv_source;
pub mod fhir_source;
#[cfg(feature = "jetstream")]
pub mod jetstream_source;
pub mod omop_source;
pub mod progress;
pub mod record;
mod rejection;
mod runner;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub use record::Record;
pub use rejection::Rejection;
pub use runner::{
    PartitionReport, PipelineSignals, RunOptions, RuntimeError, Timing, restore, restore_counts,
    run_partition, run_partition_for, run_partition_with,
};
pub use tasks::ColumnStats;

mod tasks;

/// One message of a partitioned stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The stream the message belongs to.
    pub stream: Arc<str>,
    /// Its partition.
    pub partition: u32,
    /// Position in the partition; the checkpoint stores the offset to resume from.
    pub offset: u64,
    /// The message's key, if the source has one.
    pub key: Option<Vec<u8>>,
    /// The message's bytes (a CSV row, a FHIR resource, an encoded record).
    pub payload: Vec<u8>,
}

/// Where a source that can fail after its start (a database connection, a file on a
/// failing disk) leaves the failure, before it closes its channel. Made for the partitions
/// the source feeds by [`PipelineSignals::source_failure`]: a failure also asks the
/// pipeline's other partitions to checkpoint and stop, so the pipeline's error reaches the
/// operator at once (not after a following partition's input, which never ends).
#[derive(Debug, Clone, Default)]
pub struct SourceFailure {
    detail: Arc<std::sync::Mutex<Option<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl SourceFailure {
    /// Records a failure (the first one stays) and stops the pipeline.
    pub fn fail(&self, detail: String) {
        let mut slot = self.detail.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(detail);
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The failure, if the source failed.
    pub fn failed(&self) -> Option<String> {
        self.detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One partition's input from a source: batches of envelopes in offset order, and where
/// the source leaves a failure before it closes the batches' channel. A closed channel is
/// the end of the input only if the source did not fail: a read that failed half-way is
/// never taken for the end of the file ([`run_partition`] stops with
/// [`RuntimeError::Source`] instead).
#[derive(Debug)]
pub struct Input {
    batches: std::sync::mpsc::Receiver<Vec<Envelope>>,
    failure: Option<SourceFailure>,
    /// Where batches go back to the source once processed, for their buffers' reuse.
    recycle: Option<std::sync::mpsc::SyncSender<Vec<Envelope>>>,
}

impl Input {
    /// The input of `batches`, whose source leaves a failure in `failure`.
    pub fn new(
        batches: std::sync::mpsc::Receiver<Vec<Envelope>>,
        failure: Option<SourceFailure>,
    ) -> Input {
        Input {
            batches,
            failure,
            recycle: None,
        }
    }

    /// The input, handing each processed batch back to its source through `recycle`
    /// (the source reuses the envelopes' buffers).
    pub fn with_recycling(self, recycle: std::sync::mpsc::SyncSender<Vec<Envelope>>) -> Input {
        Input {
            recycle: Some(recycle),
            ..self
        }
    }

    /// Hands a processed batch back to the source, if it takes them back and has room;
    /// else the batch is freed here.
    pub fn give_back(&self, batch: Vec<Envelope>) {
        if let Some(recycle) = &self.recycle {
            // Full (the source has enough spare batches) or gone: freed here.
            recycle.try_send(batch).ok();
        }
    }

    /// The next batch, waiting at most `wait`.
    pub fn recv_timeout(
        &self,
        wait: std::time::Duration,
    ) -> Result<Vec<Envelope>, std::sync::mpsc::RecvTimeoutError> {
        self.batches.recv_timeout(wait)
    }

    /// The batches until the source closes its channel (then see [`Input::failed`]).
    pub fn iter(&self) -> impl Iterator<Item = Vec<Envelope>> + '_ {
        self.batches.iter()
    }

    /// Why the source stopped before the end of its input, if it did.
    pub fn failed(&self) -> Option<String> {
        self.failure.as_ref().and_then(SourceFailure::failed)
    }
}

/// A source whose failures cannot reach the reader of its channel (it fails before or
/// never).
impl From<std::sync::mpsc::Receiver<Vec<Envelope>>> for Input {
    fn from(batches: std::sync::mpsc::Receiver<Vec<Envelope>>) -> Input {
        Input::new(batches, None)
    }
}

/// The dead-letter stream's name.
pub const DEAD_LETTER: &str = "dead-letter";

/// What a task sends on: records to named output streams (the next task, alerts, the
/// dead-letter stream).
#[derive(Debug, Default)]
pub struct MessageCollector {
    pub(crate) out: Vec<(String, Vec<u8>)>,
    /// Records for named output streams (kept in the store as segments).
    pub(crate) records: Vec<(Cow<'static, str>, Record)>,
    /// Records for the next task of a [`Chain`].
    pub(crate) next: Vec<Record>,
    pub(crate) dead: Vec<DeadLetter>,
}

/// A record a task could not use, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The stream.
    pub stream: Arc<str>,
    /// The partition.
    pub partition: u32,
    /// The record's offset.
    pub offset: u64,
    /// Why, without any value of the record.
    pub rejection: Rejection,
}

impl MessageCollector {
    /// Sends `payload` to output stream `stream`.
    pub fn send(&mut self, stream: &str, payload: Vec<u8>) {
        self.out.push((stream.to_string(), payload));
    }

    /// Sends `record` to output stream `stream`: to the next task of a [`Chain`] as it is
    /// (stream [`NEXT`]), else kept in the store with the checkpoint, in segments of records.
    pub fn send_record(&mut self, stream: impl Into<Cow<'static, str>>, record: Record) {
        let stream = stream.into();
        if stream == NEXT {
            self.next.push(record);
        } else {
            self.records.push((stream, record));
        }
    }

    /// Records sent so far to output streams other than [`NEXT`], in order.
    pub fn sent_records(&self) -> &[(Cow<'static, str>, Record)] {
        &self.records
    }

    /// Records sent so far to [`NEXT`], in order.
    pub fn next_records(&self) -> &[Record] {
        &self.next
    }

    /// Empties the collector, keeping its buffers.
    pub(crate) fn clear(&mut self) {
        self.out.clear();
        self.records.clear();
        self.next.clear();
        self.dead.clear();
    }

    /// Quarantines `envelope` (it goes to the dead-letter stream and is counted) with why:
    /// a reason, or a [`Rejection`] naming the field and the patient's pseudonym. The
    /// reason is kept in the node's store: it must not quote the record's values.
    pub fn dead_letter(&mut self, envelope: &Envelope, why: impl Into<Rejection>) {
        self.dead.push(DeadLetter {
            stream: envelope.stream.clone(),
            partition: envelope.partition,
            offset: envelope.offset,
            rejection: why.into(),
        });
    }

    /// How many records this collector has quarantined so far.
    pub fn quarantined(&self) -> usize {
        self.dead.len()
    }

    /// What was sent so far: (output stream, payload), in order.
    pub fn sent(&self) -> &[(String, Vec<u8>)] {
        &self.out
    }

    /// What was quarantined so far, in order.
    pub fn dead_letters(&self) -> &[DeadLetter] {
        &self.dead
    }
}

/// Samza's commit and shutdown scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This partition's task only.
    CurrentTask,
    /// Every partition of the pipeline.
    AllTasks,
}

/// What a task asks of the runtime.
#[derive(Debug, Default)]
pub struct TaskCoordinator {
    pub(crate) commit: Option<Scope>,
    pub(crate) shutdown: Option<Scope>,
}

impl TaskCoordinator {
    /// Checkpoint now (after this envelope), rather than at the next interval.
    pub fn commit(&mut self, scope: Scope) {
        self.commit = Some(scope);
    }

    /// Stop after this envelope (checkpointing first).
    pub fn shutdown(&mut self, scope: Scope) {
        self.shutdown = Some(scope);
    }
}

/// A task instance's key-value state: read and written in memory, checkpointed by the
/// runtime with the partition's offset.
#[derive(Debug, Default, Clone)]
pub struct KvState {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    dirty: BTreeSet<Vec<u8>>,
}

impl KvState {
    pub(crate) fn restore(entries: Vec<(Vec<u8>, Vec<u8>)>) -> KvState {
        KvState {
            map: entries.into_iter().collect(),
            dirty: BTreeSet::new(),
        }
    }

    /// The value at `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    /// Sets `key` to `value` (stored at the next checkpoint).
    pub fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.dirty.insert(key.to_vec());
        self.map.insert(key.to_vec(), value);
    }

    /// Removes `key` (from the store at the next checkpoint).
    pub fn delete(&mut self, key: &[u8]) {
        self.dirty.insert(key.to_vec());
        self.map.remove(key);
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        self.map
            .range(prefix.to_vec()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// A u64 counter (big-endian); 0 when absent.
    pub fn get_u64(&self, key: &[u8]) -> u64 {
        self.get(key)
            .and_then(|v| v.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// Sets the counter at `key` (big-endian).
    pub fn put_u64(&mut self, key: &[u8], value: u64) {
        self.put(key, value.to_be_bytes().to_vec());
    }

    /// The changes since the last checkpoint, and forget them.
    pub(crate) fn take_changes(&mut self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|k| {
                let v = self.map.get(&k).cloned();
                (k, v)
            })
            .collect()
    }
}

/// An error that stops a task (not a bad record: those are dead-lettered).
#[derive(Debug, thiserror::Error)]
#[error("task {task}: {detail}")]
pub struct TaskError {
    /// The task's name.
    pub task: String,
    /// What went wrong.
    pub detail: String,
}

/// Tasks composed in order: what a task sends to the stream [`NEXT`] is the next task's
/// input (same stream, partition and offset): records as they are ([`StreamTask::process_record`]),
/// bytes as an envelope. The tasks share the partition's state: use distinct keys.
pub struct Chain {
    tasks: Vec<Box<dyn StreamTask>>,
    /// What the task that just ran sent (buffers reused from record to record).
    scratch: MessageCollector,
    /// The records and payloads passed on to the next task, and the buffers of those the
    /// current task reads.
    records: Vec<Record>,
    payloads: Vec<Vec<u8>>,
    spare_records: Vec<Record>,
    spare_payloads: Vec<Vec<u8>>,
}

/// The output stream that feeds the next task of a [`Chain`].
pub const NEXT: &str = "next";

impl Chain {
    /// Empties the buffers between the tasks (keeping their capacity) before an input.
    fn clear_buffers(&mut self) {
        self.scratch.clear();
        self.records.clear();
        self.payloads.clear();
        self.spare_records.clear();
        self.spare_payloads.clear();
    }

    /// The chain of `tasks`, first to last.
    pub fn new(tasks: Vec<Box<dyn StreamTask>>) -> Chain {
        Chain {
            tasks,
            scratch: MessageCollector::default(),
            records: Vec::new(),
            payloads: Vec::new(),
            spare_records: Vec::new(),
            spare_payloads: Vec::new(),
        }
    }

    /// Moves what the task that just ran sent: its records and payloads for [`NEXT`] to
    /// the next task's inputs, everything else to `collector`.
    fn collect(&mut self, collector: &mut MessageCollector) {
        let s = &mut self.scratch;
        // Most of these are empty for most records: skipping them is measurably cheaper.
        if !s.dead.is_empty() {
            collector.dead.append(&mut s.dead);
        }
        if !s.records.is_empty() {
            collector.records.append(&mut s.records);
        }
        if !s.next.is_empty() {
            self.records.append(&mut s.next);
        }
        if !s.out.is_empty() {
            for (stream, payload) in s.out.drain(..) {
                if stream == NEXT {
                    self.payloads.push(payload);
                } else {
                    collector.out.push((stream, payload));
                }
            }
        }
    }

    /// Runs the tasks after the first over what the first passed on.
    fn run_rest(
        &mut self,
        envelope: &Envelope,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        self.collect(collector);
        for i in 1..self.tasks.len() {
            std::mem::swap(&mut self.records, &mut self.spare_records);
            std::mem::swap(&mut self.payloads, &mut self.spare_payloads);
            let task = &mut self.tasks[i];
            for record in self.spare_records.drain(..) {
                task.process_record(envelope, record, state, &mut self.scratch, coordinator)?;
            }
            if !self.spare_payloads.is_empty() {
                for payload in self.spare_payloads.drain(..) {
                    let env = Envelope {
                        payload,
                        ..envelope.clone()
                    };
                    task.process(&env, state, &mut self.scratch, coordinator)?;
                }
            }
            self.collect(collector);
        }
        // What the last task passed on goes nowhere.
        self.records.clear();
        self.payloads.clear();
        Ok(())
    }
}

impl StreamTask for Chain {
    fn init(&mut self, state: &mut KvState) -> Result<(), TaskError> {
        self.tasks.iter_mut().try_for_each(|t| t.init(state))
    }

    fn process(
        &mut self,
        envelope: &Envelope,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        self.clear_buffers();
        let Some(first) = self.tasks.first_mut() else {
            return Ok(());
        };
        first.process(envelope, state, &mut self.scratch, coordinator)?;
        self.run_rest(envelope, state, collector, coordinator)
    }

    fn process_record(
        &mut self,
        envelope: &Envelope,
        record: Record,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        self.clear_buffers();
        let Some(first) = self.tasks.first_mut() else {
            return Ok(());
        };
        first.process_record(envelope, record, state, &mut self.scratch, coordinator)?;
        self.run_rest(envelope, state, collector, coordinator)
    }

    fn window(
        &mut self,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        self.tasks
            .iter_mut()
            .try_for_each(|t| t.window(state, collector, coordinator))
    }

    fn flush(&mut self, state: &mut KvState) {
        self.tasks.iter_mut().for_each(|t| t.flush(state));
    }

    fn on_end_of_stream(
        &mut self,
        state: &mut KvState,
        collector: &mut MessageCollector,
    ) -> Result<(), TaskError> {
        self.tasks
            .iter_mut()
            .try_for_each(|t| t.on_end_of_stream(state, collector))
    }

    fn close(&mut self) {
        self.tasks.iter_mut().for_each(|t| t.close());
    }
}

/// `process` for a task that reads records and leaves others alone (it is not their
/// reader): a record is handed to `process_record`, any other payload passed on to
/// [`NEXT`] unchanged.
pub fn process_or_pass_on<T: StreamTask + ?Sized>(
    task: &mut T,
    env: &Envelope,
    state: &mut KvState,
    out: &mut MessageCollector,
    coord: &mut TaskCoordinator,
) -> Result<(), TaskError> {
    match Record::decode(&env.payload) {
        Ok(record) => task.process_record(env, record, state, out, coord),
        Err(_) => {
            out.send(NEXT, env.payload.clone());
            Ok(())
        }
    }
}

/// `process` for a task that reads records: the envelope's payload read as a record
/// ([`Record::encode`]'s form) and handed to `process_record`; a payload that is not one
/// goes to the dead letters with the reason.
pub fn process_as_record<T: StreamTask + ?Sized>(
    task: &mut T,
    env: &Envelope,
    state: &mut KvState,
    out: &mut MessageCollector,
    coord: &mut TaskCoordinator,
) -> Result<(), TaskError> {
    match Record::decode(&env.payload) {
        Ok(record) => task.process_record(env, record, state, out, coord),
        Err(why) => {
            out.dead_letter(env, why);
            Ok(())
        }
    }
}

/// Samza's low-level task API. One instance per input partition.
pub trait StreamTask: Send {
    /// Called once before the first envelope, with the state restored from the last
    /// checkpoint.
    fn init(&mut self, _state: &mut KvState) -> Result<(), TaskError> {
        Ok(())
    }

    /// Handles one envelope.
    fn process(
        &mut self,
        envelope: &Envelope,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError>;

    /// Handles one record a previous task of a [`Chain`] passed on (same stream, partition
    /// and offset as `envelope`, whose payload is the chain's input). By default the task
    /// reads the record as bytes: `process` gets an envelope with the record's JSON form.
    fn process_record(
        &mut self,
        envelope: &Envelope,
        record: Record,
        state: &mut KvState,
        collector: &mut MessageCollector,
        coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        let env = Envelope {
            payload: record.encode(),
            ..envelope.clone()
        };
        self.process(&env, state, collector, coordinator)
    }

    /// Called every window interval, never at the same time as `process`.
    fn window(
        &mut self,
        _state: &mut KvState,
        _collector: &mut MessageCollector,
        _coordinator: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        Ok(())
    }

    /// Called right before each checkpoint: write to `state` anything kept in fields (a task
    /// may keep hot aggregates in fields and only store them here).
    fn flush(&mut self, _state: &mut KvState) {}

    /// Called when a bounded input has no more envelopes.
    fn on_end_of_stream(
        &mut self,
        _state: &mut KvState,
        _collector: &mut MessageCollector,
    ) -> Result<(), TaskError> {
        Ok(())
    }

    /// Called once when the partition's run ends.
    fn close(&mut self) {}
}
