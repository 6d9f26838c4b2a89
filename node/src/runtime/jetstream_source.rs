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

/// How each fetch (one pull request) is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    /// Messages asked for.
    pub max_messages: usize,
    /// How long the server holds the request open for messages.
    pub expires: Duration,
    /// How long after it was sent the request is still read from. A request the server
    /// expires in the middle of its delivery (a client slow to read, under load) is not
    /// always closed by the server, and the client library would wait 5 s past its expiry;
    /// cutting it here may leave deliveries unread, which the consumer sequence check
    /// catches (they are fetched again).
    pub cut_after: Duration,
}

impl Default for Fetch {
    fn default() -> Self {
        Fetch {
            max_messages: 500,
            expires: Duration::from_millis(300),
            cut_after: Duration::from_secs(1),
        }
    }
}
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
    /// How messages are fetched.
    pub fetch: Fetch,
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

/// (Re)creates the partition's durable consumer to deliver its subject, in order, from
/// stream sequence `from`.
///
/// Our checkpoint, not the server's acknowledgement state, says where to resume: the
/// consumer is recreated at each start to deliver from the first sequence the checkpoint
/// does not hold. (Resuming from redeliveries instead would bring messages out of order,
/// and acknowledging "all up to" a later one could drop earlier ones.)
async fn bind(
    stream: &jetstream::stream::Stream,
    p: &JetStreamPartition,
    from: u64,
) -> Result<jetstream::consumer::Consumer<pull::Config>, jetstream::stream::ConsumerError> {
    // Absent at a first start; any other failure shows in the creation that follows.
    let _ = stream.delete_consumer(&p.durable).await;
    let deliver_policy = if from <= 1 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: from,
        }
    };
    stream
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
}

/// How many of a fetch's deliveries, given by their consumer sequences in arrival order,
/// follow on from `next` (the consumer sequence expected next) without a gap; `next` is
/// moved past them.
///
/// The server numbers every delivery of a consumer, redeliveries included, one after the
/// other. A gap means deliveries were lost on the way (a fetch cut short with messages
/// still unread): messages after it must not reach the runner, because a checkpoint past
/// them would acknowledge "all up to" them, the lost ones included, and the lost ones,
/// redelivered later, would be behind what the runner already has.
fn without_gap(next: &mut u64, deliveries: impl IntoIterator<Item = u64>) -> usize {
    let mut n = 0;
    for d in deliveries {
        if d != *next {
            break;
        }
        *next += 1;
        n += 1;
    }
    n
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
    let mut consumer = bind(&stream, p, resume_from)
        .await
        .map_err(|e| fail("consumer")(&e))?;
    let p = p.clone();
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
        // The consumer sequence of the next delivery (numbered from 1 by each consumer).
        // From the consumer's own count: a create that found the consumer still there (its
        // delete failed) goes on numbering where it was.
        let mut next_delivery = consumer.cached_info().delivered.consumer_sequence + 1;
        // Re-reading up to what the runner has after a recreation: the runner is not caught
        // up with the stream until a new message or a fetch with no delivery at all.
        let mut behind = false;
        // Deliveries were lost: the consumer is to be recreated.
        let mut lost = false;
        while !runner_gone.load(Ordering::Relaxed) {
            if lost {
                // From the checkpoint, not from what the runner has: a new consumer counts
                // what it starts after as acknowledged, and the runner's records past the
                // checkpoint are not yet durable. Those delivered again are not handed over
                // twice (they are at or below `max_seen`).
                // The deleted consumer's messages are forgotten: an acknowledgement through one
                // of them would reach the new consumer (same name) with the old delivery
                // number, and make it ignore its own. Those the runner has are delivered again.
                let from = acks.lock().map_or(resume_from, |mut a| {
                    a.pending.clear();
                    a.durable
                });
                match bind(&stream, &p, from).await {
                    Ok(c) => {
                        tracing::debug!(stream = %name, partition, from, "JetStream: deliveries were lost on the way; the consumer is recreated from the checkpoint");
                        next_delivery = c.cached_info().delivered.consumer_sequence + 1;
                        (consumer, lost, behind, stalled) = (c, false, true, None);
                    }
                    Err(e) => {
                        if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                            tracing::warn!(stream = %name, partition, "JetStream: could not recreate the consumer after lost deliveries: {e}");
                            last_warned = Some(Instant::now());
                        }
                        if idle_exit.is_some_and(|d| last_new.elapsed() >= d) {
                            tracing::warn!(stream = %name, partition, from = max_seen + 1, "JetStream: ending this bounded ingestion after its idle time: deliveries were lost and the consumer could not be recreated ({e}), so messages from this offset on may be unread; a new run goes on from the checkpoint");
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let mut batch = match consumer
                .fetch()
                .max_messages(p.fetch.max_messages)
                .expires(p.fetch.expires)
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
            // Counted from the request sent, not from before (slow under load).
            let cut_at = tokio::time::Instant::now() + p.fetch.cut_after;
            let mut msgs = Vec::new();
            loop {
                match tokio::time::timeout_at(cut_at, batch.next()).await {
                    Ok(Some(Ok(m))) => msgs.push(m),
                    // A status the fetch ends on (the library ends the batch after it).
                    Ok(Some(Err(e))) => {
                        tracing::debug!(stream = %name, partition, "JetStream: the fetch ended: {e}");
                    }
                    Ok(None) => break,
                    Err(_) => {
                        tracing::debug!(stream = %name, partition, received = msgs.len(), "JetStream: a fetch still open after its expiry is cut short");
                        break;
                    }
                }
            }
            drop(batch);
            let received = msgs.len();
            // Each delivery's stream and consumer sequences; a message whose reply subject
            // does not parse cannot be placed, and counts as lost.
            let placed: Vec<(jetstream::Message, u64, u64)> = msgs
                .into_iter()
                .map_while(|m| {
                    let (seq, delivery) = m
                        .info()
                        .map(|i| (i.stream_sequence, i.consumer_sequence))
                        .ok()?;
                    Some((m, seq, delivery))
                })
                .collect();
            let kept = without_gap(&mut next_delivery, placed.iter().map(|(_, _, d)| *d));
            if kept < received {
                tracing::debug!(stream = %name, partition, received, in_order = kept, next_delivery, "JetStream: a gap in the consumer's deliveries");
                lost = true;
                // The consumer is recreated for a full idle time before a bounded ingestion
                // gives up.
                last_new = Instant::now();
            }
            let mut envs = Vec::with_capacity(kept);
            let mut covered = None;
            if let Ok(mut a) = acks.lock() {
                for (m, seq, _) in placed.into_iter().take(kept) {
                    if seq > max_seen {
                        envs.push(Envelope {
                            stream: name.clone(),
                            partition,
                            offset: seq,
                            key: None,
                            payload: m.payload.to_vec(),
                        });
                        max_seen = seq;
                        behind = false;
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
            tracing::trace!(stream = %name, partition, new = envs.len(), max_seen, "JetStream: fetched");
            if received == 0 && !lost {
                // The consumer had nothing more to deliver: the runner has it all.
                behind = false;
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
                        // The server delivered more than arrived: the lost deliveries are
                        // fetched again rather than reported done without them.
                        Ok(info) if info.delivered.consumer_sequence >= next_delivery => {
                            tracing::debug!(stream = %name, partition, delivered = info.delivered.consumer_sequence, next_delivery, "JetStream: deliveries at the end of the stream were lost on the way");
                            lost = true;
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
                // Not while deliveries were lost or re-read after a recreation: the runner is
                // then behind the stream, not caught up with it.
                if lost || behind {
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::without_gap;

    #[test]
    fn deliveries_are_taken_up_to_the_first_gap() {
        // In order, from a new consumer.
        let mut next = 1;
        assert_eq!(without_gap(&mut next, [1, 2, 3]), 3);
        assert_eq!(next, 4);
        // The next fetch goes on from there.
        assert_eq!(without_gap(&mut next, [4, 5]), 2);
        assert_eq!(next, 6);
        // Delivery 8 is missing: 9 and 10 are not taken, and the next expected stays 8.
        assert_eq!(without_gap(&mut next, [6, 7, 9, 10]), 2);
        assert_eq!(next, 8);
        // A fetch whose first delivery is past the expected one takes nothing.
        assert_eq!(without_gap(&mut next, [9]), 0);
        assert_eq!(next, 8);
        // Nor does a repeated or earlier one.
        assert_eq!(without_gap(&mut next, [7, 8]), 0);
        // An empty fetch takes nothing and moves nothing.
        assert_eq!(without_gap(&mut next, []), 0);
        assert_eq!(next, 8);
    }
}
