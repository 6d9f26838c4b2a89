//! The NATS JetStream connector: a durable pull consumer per partition.
//!
//! Partitions map to subjects: partition `p` of dataset `d` is subject `medfed.<d>.<p>` in
//! one stream, and each partition has its own durable consumer (`<durable>-p<p>`) filtered to
//! its subject. Several node worker processes share a stream by owning different partitions
//! (worker `k` of `n` takes the partitions `p` with `p % n == k`).
//!
//! A message's offset is its stream sequence. On start the partition's consumer is recreated
//! to deliver from the first sequence the node's checkpoint does not hold, in order; a message
//! is acknowledged only after the checkpoint that covers it is durable (acknowledging the last
//! one acknowledges all before it, `AckPolicy::All`, which is safe because delivery is in
//! order). A worker killed mid-stream resumes at its checkpoint: every message lands in the
//! state exactly once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use futures_util::StreamExt;

use super::Envelope;

/// Messages per fetch.
const FETCH_BATCH: usize = 500;
/// Fetched batches queued for the runner.
const IN_FLIGHT_BATCHES: usize = 16;
/// No server-side limit on delivered, unacknowledged messages (-1): the runner's bounded
/// queue already limits how far fetching runs ahead, and with a limit below the records
/// between two checkpoints the server would hold deliveries back until acknowledgements
/// that only those deliveries can bring (the default, 1,000, stalled a partition for
/// seconds).
const MAX_ACK_PENDING: i64 = -1;

/// Delivered messages awaiting a checkpoint.
struct Unacknowledged {
    pending: BTreeMap<u64, jetstream::Message>,
    durable: u64,
}

impl Unacknowledged {
    /// Records that everything below `offset` is durable, forgets the messages it covers, and
    /// returns the last of them: acknowledging it acknowledges the rest (`AckPolicy::All`).
    fn cover(&mut self, offset: u64) -> Option<jetstream::Message> {
        self.durable = self.durable.max(offset);
        let rest = self.pending.split_off(&self.durable);
        let covered = std::mem::replace(&mut self.pending, rest);
        covered.into_values().next_back()
    }
}

/// Where one partition comes from.
#[derive(Debug, Clone)]
pub struct JetStreamPartition {
    /// `nats://host:port`.
    pub url: String,
    /// The JetStream stream.
    pub stream: String,
    /// The partition's subject, e.g. `medfed.pima.3`.
    pub subject: String,
    /// The durable consumer's name (one per partition).
    pub durable: String,
    /// How long the server waits for an acknowledgement before redelivering.
    pub ack_wait: Duration,
    /// Stop when no new message arrived for this long and the server holds none still to
    /// deliver (bounded ingestion); `None` runs forever.
    pub idle_exit: Option<Duration>,
}

/// Why a JetStream source could not connect or fetch.
#[derive(Debug, thiserror::Error)]
#[error("JetStream {what} ({url}): {detail}")]
pub struct JetStreamError {
    /// The NATS server.
    pub url: String,
    /// The step that failed (`"connect"`, `"stream"`, `"consumer"`, ...).
    pub what: &'static str,
    /// The client's error.
    pub detail: String,
}

/// How many messages of the partition's subject have a stream sequence of `from` or more:
/// what a pipeline whose checkpoint is at `from` has still to read (`medfed node status`'s
/// lag). Asks the server through a consumer made for the question, which delivers nothing
/// and is deleted after it; on a thread of its own, callable from inside or outside a
/// runtime.
pub fn remaining(p: &JetStreamPartition, from: u64) -> Result<u64, JetStreamError> {
    let p = p.clone();
    let fail = |what: &'static str, url: &str, detail: String| JetStreamError {
        url: url.to_string(),
        what,
        detail,
    };
    let url = p.url.clone();
    std::thread::Builder::new()
        .name("jetstream-status".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| fail("runtime", &p.url, e.to_string()))?;
            rt.block_on(async {
                let client = async_nats::connect(&p.url)
                    .await
                    .map_err(|e| fail("connect", &p.url, e.to_string()))?;
                let js = jetstream::new(client);
                let stream = js
                    .get_stream(&p.stream)
                    .await
                    .map_err(|e| fail("stream", &p.url, e.to_string()))?;
                let deliver_policy = match from {
                    0 | 1 => jetstream::consumer::DeliverPolicy::All,
                    from => jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                };
                let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
                    .create_consumer(pull::Config {
                        filter_subject: p.subject.clone(),
                        deliver_policy,
                        ack_policy: AckPolicy::None,
                        inactive_threshold: Duration::from_secs(30),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| fail("consumer", &p.url, e.to_string()))?;
                let info = consumer
                    .info()
                    .await
                    .map_err(|e| fail("consumer info", &p.url, e.to_string()))?;
                let (pending, name) = (info.num_pending, info.name.clone());
                // Left to the server's inactivity threshold if this fails.
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!("JetStream: the status consumer {name} is left to expire: {e}");
                }
                Ok(pending)
            })
        })
        .map_err(|e| fail("thread", &url, e.to_string()))?
        .join()
        .map_err(|_| fail("status", &url, "its thread panicked".into()))?
}

/// Connects, binds the durable consumer and starts fetching. Returns the envelopes and the
/// sender on which the runner reports each durable checkpoint's offset (so the source can
/// acknowledge the messages it covers).
pub async fn subscribe(
    p: &JetStreamPartition,
    stream_name: &str,
    partition: u32,
    resume_from: u64,
) -> Result<
    (
        Receiver<Vec<Envelope>>,
        tokio::sync::mpsc::UnboundedSender<u64>,
    ),
    JetStreamError,
> {
    let fail = |what: &'static str| {
        let url = p.url.clone();
        move |e: &dyn std::fmt::Display| JetStreamError {
            url: url.clone(),
            what,
            detail: e.to_string(),
        }
    };
    let client = async_nats::connect(&p.url)
        .await
        .map_err(|e| fail("connect")(&e))?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&p.stream)
        .await
        .map_err(|e| fail("stream")(&e))?;
    // Our checkpoint, not the server's acknowledgement state, says where to resume: the
    // consumer is recreated at each start to deliver, in order, from the first sequence the
    // checkpoint does not hold. (Resuming from redeliveries instead would bring messages out
    // of order, and acknowledging "all up to" a later one could drop earlier ones.)
    let _ = stream.delete_consumer(&p.durable).await;
    let deliver_policy = if resume_from <= 1 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: resume_from,
        }
    };
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .create_consumer(pull::Config {
            durable_name: Some(p.durable.clone()),
            filter_subject: p.subject.clone(),
            ack_policy: AckPolicy::All,
            ack_wait: p.ack_wait,
            max_ack_pending: MAX_ACK_PENDING,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| fail("consumer")(&e))?;
    let (tx, rx) = sync_channel::<Vec<Envelope>>(IN_FLIGHT_BATCHES);
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let name: Arc<str> = stream_name.into();
    let idle_exit = p.idle_exit;
    // Delivered, not yet acknowledged messages by stream sequence, and the offset below
    // which everything is in a durable checkpoint. Shared by the fetching loop and the
    // acknowledging task, so that acknowledgements go out as soon as a checkpoint is durable
    // rather than after the next fetch (which the server may hold back until they come).
    let acks = Arc::new(Mutex::new(Unacknowledged {
        pending: BTreeMap::new(),
        durable: resume_from,
    }));
    let runner_gone = Arc::new(AtomicBool::new(false));
    let acker = {
        let (acks, runner_gone) = (acks.clone(), runner_gone.clone());
        tokio::spawn(async move {
            while let Some(offset) = ack_rx.recv().await {
                let last = acks.lock().map(|mut a| a.cover(offset)).unwrap_or(None);
                if let Some(m) = last {
                    let _ = m.ack().await;
                }
            }
            runner_gone.store(true, Ordering::Relaxed);
        })
    };
    tokio::spawn(async move {
        // The highest sequence handed to the runner; redeliveries at or below it are not
        // handed over again.
        let mut max_seen = resume_from.saturating_sub(1);
        let mut last_new = Instant::now();
        let mut last_warned: Option<Instant> = None;
        // What the server had still to deliver, its deliveries (redeliveries included) and
        // the durable offset, at the last idle time that passed with messages left (reset
        // by a new message).
        let mut stalled: Option<(u64, u64, u64)> = None;
        while !runner_gone.load(Ordering::Relaxed) {
            let batch = match consumer
                .fetch()
                .max_messages(FETCH_BATCH)
                .expires(Duration::from_millis(300))
                .messages()
                .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    // The server is unreachable or refused the pull: a bounded ingestion still
                    // ends after its idle time (what it has is checkpointed); an unbounded one
                    // keeps trying.
                    // Once, then at most every 30 s while it lasts.
                    if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        tracing::warn!(stream = %name, partition, "JetStream fetch failed: {e}");
                        last_warned = Some(Instant::now());
                    }
                    if idle_exit.is_some_and(|d| last_new.elapsed() >= d) {
                        tracing::warn!(stream = %name, partition, "JetStream: ending this bounded ingestion after its idle time; the last fetch failed: {e}");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let msgs: Vec<jetstream::Message> =
                batch.filter_map(|m| async move { m.ok() }).collect().await;
            let mut envs = Vec::with_capacity(msgs.len());
            let mut covered = None;
            if let Ok(mut a) = acks.lock() {
                for m in msgs {
                    let Ok(seq) = m.info().map(|i| i.stream_sequence) else {
                        continue;
                    };
                    if seq > max_seen {
                        envs.push(Envelope {
                            stream: name.clone(),
                            partition,
                            offset: seq,
                            key: None,
                            payload: m.payload.to_vec(),
                        });
                        max_seen = seq;
                        last_new = Instant::now();
                        stalled = None;
                    }
                    // Kept (or refreshed, for a redelivery) until a checkpoint covers it.
                    a.pending.insert(seq, m);
                }
                // Redeliveries of what a checkpoint already holds are acknowledged at once.
                let durable = a.durable;
                covered = a.cover(durable);
            }
            if let Some(m) = covered {
                let _ = m.ack().await;
            }
            if envs.is_empty() {
                if idle_exit.is_some_and(|d| last_new.elapsed() >= d) {
                    // Idle only if the server holds nothing undelivered for this consumer:
                    // fetches filled with redeliveries (a runner slower than `ack_wait`
                    // under load) are not the end of the stream, and ending there would
                    // report a bounded ingestion done with messages left unread.
                    // Unless nothing at all moved since the last such check (no delivery,
                    // not even a redelivery, and no checkpoint): then it ends, saying what
                    // is left.
                    let durable = acks.lock().map_or(0, |a| a.durable);
                    match consumer.get_info().await {
                        Ok(info)
                            if info.num_pending > 0
                                && stalled
                                    == Some((
                                        info.num_pending,
                                        info.delivered.consumer_sequence,
                                        durable,
                                    )) =>
                        {
                            tracing::warn!(stream = %name, partition, undelivered = info.num_pending, "JetStream: ending this bounded ingestion with messages the server has not delivered: no delivery, redelivery or checkpoint for an idle time; a new run goes on from the checkpoint");
                            break;
                        }
                        Ok(info) if info.num_pending > 0 => {
                            tracing::debug!(stream = %name, partition, undelivered = info.num_pending, "JetStream: idle time passed with messages still to fetch; going on");
                            stalled =
                                Some((info.num_pending, info.delivered.consumer_sequence, durable));
                            last_new = Instant::now();
                            continue;
                        }
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(stream = %name, partition, "JetStream: ending this bounded ingestion after its idle time without knowing whether the stream holds more for it (consumer info failed: {e}); a new run goes on from its checkpoint");
                            break;
                        }
                    }
                }
                // Nothing new: the runner has all the stream holds for now (an empty batch
                // tells it so; skipped if it is busy with earlier ones).
                if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) = tx.try_send(Vec::new())
                {
                    break;
                }
                continue;
            }
            // The runner's channel is bounded: wait here (without stalling the runtime's
            // other tasks) when it is full.
            if tokio::task::block_in_place(|| tx.send(envs)).is_err() {
                break;
            }
        }
        // The runner ends when this sender is gone; the acknowledging task then sends the
        // acknowledgements of its last checkpoint and stops.
        drop(tx);
        let _ = acker.await;
    });
    Ok((rx, ack_tx))
}
