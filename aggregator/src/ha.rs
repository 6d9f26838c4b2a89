//! High availability (`[ha]`): several aggregator instances of one consortium share their
//! state through a replicated NATS JetStream key-value bucket, and one of them, the holder
//! of a lease in that bucket, is active. The decisions are [`medfed_protocol::lease`]'s;
//! this is the thin driver that talks to NATS.
//!
//! - The bucket holds the lease (key `lease`) and the aggregator's store (keys
//!   `s.<namespace>.<hex key>`: the studies' checkpoints, the released statistics).
//! - Every write of the active instance, renewals included, expects the bucket's last
//!   sequence to be its own previous write's: once a standby has taken the lease over,
//!   no write of the former active can land (it is fenced), however long it was paused.
//! - A takeover expects the bucket's last sequence as the standby read it (and the lease
//!   key at the revision it saw unchanged for a whole lease), and is confirmed by a fenced
//!   renewal before the instance loads the state and says it is active.
//! - The NATS client lives on a thread of its own with its own runtime: the store kept in
//!   the bucket (a [`Store`], whose methods are synchronous) hands it the writes and waits
//!   for them.
//!
//! A standby answers nodes with [`ErrorCode::NotActive`](medfed_protocol::ErrorCode) and
//! the active instance's address; an active instance whose lease ran out (a pause, a lost
//! NATS connection) or was taken stops acting at once and steps down.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind};
use futures_util::StreamExt;
use medfed_infra::store::{Backend, Batch, Store, StoreError, Visitor};
use medfed_protocol::hex;
use medfed_protocol::lease::{Decision, Lease, LeaseRecord, LeaseTiming, Role};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::HaConfig;

/// The key of the lease in the bucket.
const LEASE_KEY: &str = "lease";
/// The prefix of the store's keys in the bucket.
const STORE_PREFIX: &str = "s.";
/// How often a standby reads the lease, and the active instance checks its own.
const TICK: Duration = Duration::from_millis(100);

/// Where this instance stands, for the server (what to tell nodes) and the run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaStatus {
    /// Waiting for the lease; the active instance, if one holds it.
    Standby {
        /// The active instance and where nodes reach it.
        holder: Option<LeaseRecord>,
    },
    /// Holding the lease since the bucket's sequence `epoch`; the store is loaded.
    Active {
        /// The sequence of the write that took the lease.
        epoch: u64,
    },
    /// Held the lease and lost it: acts no more.
    SteppedDown {
        /// Why, in words.
        reason: String,
    },
}

/// An instance's standing, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HaView {
    /// This instance's name (`[ha] instance`).
    pub instance: String,
    /// `active`, `standby` or `stepped down`.
    pub role: &'static str,
    /// The instance holding the lease, if known.
    pub active_instance: Option<String>,
}

/// Why the HA driver could not start, or a write failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HaError {
    /// NATS could not be reached, or the bucket opened.
    #[error("[ha]: {0}")]
    Setup(String),
    /// This instance does not hold the lease (any more).
    #[error(
        "this aggregator instance is not the active one (it lost or never held the lease); nothing was written"
    )]
    NotActive,
    /// Another instance took the lease: the write was refused by the bucket.
    #[error(
        "another aggregator instance took the lease over; this one steps down and wrote nothing"
    )]
    Fenced,
    /// NATS refused the write, or did not store it before the lease ran out.
    #[error("the NATS bucket did not store the write: {0}")]
    Unavailable(String),
}

struct Shared {
    lease: Mutex<Lease>,
    timing: LeaseTiming,
    /// [`boottime`] when the driver started.
    clock: Duration,
    /// The store's keys and values, loaded when the lease is taken, kept by every write.
    state: Mutex<BTreeMap<String, Vec<u8>>>,
    status: watch::Sender<HaStatus>,
    /// Number of fenced writes so far (with the instance and epoch: the message ids that
    /// let a write retried after a timeout be recognised as a duplicate).
    writes: std::sync::atomic::AtomicU64,
    instance: String,
    record: LeaseRecord,
    /// One fenced write at a time (renewals and the store's): each expects the sequence
    /// the previous one produced.
    write_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Milliseconds since the driver started, on a clock that also counts time the machine
    /// spent suspended (CLOCK_BOOTTIME on Linux): a VM frozen or suspended past its lease
    /// finds the lease expired when it wakes.
    fn now(&self) -> u64 {
        u64::try_from(boottime().saturating_sub(self.clock).as_millis()).unwrap_or(u64::MAX)
    }

    /// The store's keys and values, as this instance holds them.
    fn state(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This instance's lease record, as written to the bucket.
    fn record_bytes(&self) -> Result<Vec<u8>, String> {
        serde_json::to_vec(&self.record).map_err(|e| format!("the lease record: {e}"))
    }

    fn lease(&self) -> MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this instance may act now; on the first "no" after being active it says
    /// so to everyone watching.
    fn is_active(&self) -> bool {
        let now = self.now();
        let mut lease = self.lease();
        let was = lease.role();
        let active = lease.is_active(now);
        if was == Role::Active && !active {
            drop(lease);
            self.step_down("its lease ran out before it was renewed (the process was paused, or NATS was unreachable)");
        }
        active
    }

    fn step_down(&self, reason: &str) {
        self.lease().fenced();
        let reason = format!("this aggregator instance steps down: {reason}");
        self.status.send_if_modified(|s| {
            if matches!(s, HaStatus::SteppedDown { .. }) {
                false
            } else {
                warn!("{reason}");
                *s = HaStatus::SteppedDown {
                    reason: reason.clone(),
                };
                true
            }
        });
    }
}

/// This instance's connection to the bucket and its view of the lease.
#[derive(Clone)]
pub struct Ha {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    js: jetstream::Context,
    bucket: String,
    /// The thread's runtime stops when the last handle goes.
    _stop: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl Ha {
    /// Connects to NATS, opens (or creates) the bucket and starts the lease loop on a thread
    /// of its own: the instance is a standby until the lease is its.
    pub fn start(cfg: &HaConfig) -> Result<Ha, HaError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let cfg2 = cfg.clone();
        std::thread::Builder::new()
            .name("medfed-ha".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(HaError::Setup(format!(
                            "cannot start its runtime: {e}"
                        ))));
                        return;
                    }
                };
                rt.block_on(async move {
                    let ha = match connect(&cfg2, tokio::runtime::Handle::current()).await {
                        Ok(ha) => ha,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(ha.clone()));
                    drop(tx);
                    tokio::select! {
                        () = ha.lease_loop() => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .map_err(|e| HaError::Setup(format!("cannot start its thread: {e}")))?;
        let mut ha = rx
            .recv()
            .map_err(|_| HaError::Setup("its thread ended before connecting".into()))??;
        ha._stop = Arc::new(stop_tx);
        Ok(ha)
    }

    /// Where this instance stands, as it changes.
    pub fn status(&self) -> watch::Receiver<HaStatus> {
        self.shared.status.subscribe()
    }

    /// Whether this instance may act now: it took the lease, loaded the state, and its
    /// lease has not run out.
    pub fn is_active(&self) -> bool {
        matches!(*self.shared.status.borrow(), HaStatus::Active { .. }) && self.shared.is_active()
    }

    /// What a standby tells a node, with the active instance's address when one holds the
    /// lease (the node reads it with [`ErrorCode::not_active_hint`](medfed_protocol::ErrorCode::not_active_hint)).
    pub fn refusal(&self) -> String {
        let me = &self.shared.instance;
        match &*self.shared.status.borrow() {
            HaStatus::Standby { holder: Some(h) } if !h.advertise.is_empty() => format!(
                "aggregator instance '{me}' is a standby; the active instance is '{}'; try {}",
                h.holder, h.advertise
            ),
            HaStatus::SteppedDown { .. } => {
                format!("aggregator instance '{me}' stepped down; another instance is active")
            }
            _ => format!("aggregator instance '{me}' is a standby; no instance is active yet"),
        }
    }

    /// This instance's standing, for `/status` and `/metrics`.
    pub fn view(&self) -> HaView {
        let (role, active) = match &*self.shared.status.borrow() {
            HaStatus::Active { .. } => ("active", Some(self.shared.instance.clone())),
            HaStatus::Standby { holder } => ("standby", holder.as_ref().map(|h| h.holder.clone())),
            HaStatus::SteppedDown { .. } => ("stepped down", None),
        };
        HaView {
            instance: self.shared.instance.clone(),
            role,
            active_instance: active,
        }
    }

    /// The store kept in the bucket, for the studies (usable while active).
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::new(HaStore { ha: self.clone() })
    }

    fn subject(&self, key: &str) -> String {
        format!("$KV.{}.{key}", self.bucket)
    }

    /// Holds the lease: reads it while standby, renews it while active, until this instance
    /// steps down.
    async fn lease_loop(&self) {
        let stream_name = format!("KV_{}", self.bucket);
        loop {
            tokio::time::sleep(TICK).await;
            let role = self.shared.lease().role();
            match role {
                Role::Standby => {
                    if let Err(e) = self.standby_tick(&stream_name).await {
                        warn!("[ha] {e}");
                    }
                    if self.shared.lease().role() == Role::SteppedDown {
                        return;
                    }
                }
                Role::Active => {
                    if !self.shared.is_active() {
                        return;
                    }
                    let now = self.shared.now();
                    if !self.shared.lease().renewal_due(now) {
                        continue;
                    }
                    let Ok(value) = self.shared.record_bytes() else {
                        continue;
                    };
                    match self.fenced(LEASE_KEY, Some(value)).await {
                        Ok(seq) => self.shared.lease().renewed(now, seq),
                        Err(HaError::Fenced) => return,
                        Err(e) => warn!("[ha] cannot renew the lease: {e}"),
                    }
                }
                Role::SteppedDown => return,
            }
        }
    }

    /// One look at the lease as a standby: wait, or take it over (then confirm it with a
    /// fenced renewal, load the state, and only then say Active).
    async fn standby_tick(&self, stream_name: &str) -> Result<(), String> {
        let mut stream = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| format!("cannot open the bucket's stream: {e}"))?;
        let current = match stream
            .get_last_raw_message_by_subject(&self.subject(LEASE_KEY))
            .await
        {
            Ok(m) => Some((
                m.sequence,
                serde_json::from_slice::<LeaseRecord>(&m.payload).unwrap_or_else(|e| {
                    warn!("[ha] the lease in the bucket is unreadable ({e}); it is taken over once it stays unchanged for a whole lease");
                    LeaseRecord {
                        holder: "?".into(),
                        advertise: String::new(),
                        duration_ms: 0,
                    }
                }),
            )),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                None
            }
            Err(e) => return Err(format!("cannot read the lease: {e}")),
        };
        let now = self.shared.now();
        let decision = self.shared.lease().observe(now, current);
        let revision = match decision {
            Decision::Wait { holder } => {
                self.shared.status.send_if_modified(|s| {
                    let new = HaStatus::Standby { holder };
                    (*s != new).then(|| *s = new).is_some()
                });
                return Ok(());
            }
            Decision::Create => 0,
            Decision::TakeOver { revision } => revision,
        };
        // The takeover expects the whole bucket unchanged since this read (the stream's last
        // sequence, which the servers check against writes still being replicated, too), and
        // the lease key at the revision seen. Any write since, a renewal or another
        // standby's takeover, makes it fail.
        let last = stream
            .info()
            .await
            .map_err(|e| format!("cannot read the bucket's state: {e}"))?
            .state
            .last_sequence;
        let value = self.shared.record_bytes()?;
        let mut msg = jetstream::message::PublishMessage::build()
            .payload(value.into())
            .message_id(format!("{}-take-{revision}-{last}", self.shared.instance))
            .expected_last_subject_sequence(revision);
        if last > 0 {
            msg = msg.expected_last_sequence(last);
        }
        let mut taken = None;
        for _ in 0..3 {
            let sent = match self
                .js
                .send_publish(self.subject(LEASE_KEY), msg.clone())
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(ack) if ack.sequence > 0 => {
                    taken = Some(ack.sequence);
                    break;
                }
                Ok(_) => tokio::time::sleep(TICK).await,
                Err(e) if retryable(&e) => tokio::time::sleep(TICK).await,
                // Someone wrote first: read again.
                Err(e) => {
                    info!("[ha] did not take the lease: {e}");
                    return Ok(());
                }
            }
        }
        let Some(seq) = taken else {
            return Err("the takeover was not confirmed; reading the lease again".into());
        };
        self.shared.lease().acquired(now, seq);
        // A second, fenced write: of two standbys that both believed they took the lease,
        // only the later one's expectation holds.
        let confirm_at = self.shared.now();
        match self
            .fenced(LEASE_KEY, Some(self.shared.record_bytes()?))
            .await
        {
            Ok(seq) => self.shared.lease().renewed(confirm_at, seq),
            Err(e) => {
                *self.shared.lease() = Lease::new(self.shared.timing);
                return Err(format!(
                    "the lease was not confirmed ({e}); this instance stays a standby"
                ));
            }
        }
        info!(
            epoch = seq,
            "[ha] this instance took the lease: it is the active aggregator"
        );
        match self.load().await {
            Ok(n) => info!(entries = n, "[ha] state loaded from the bucket"),
            Err(e) => {
                self.shared
                    .step_down(&format!("cannot load the state from the bucket: {e}"));
                return Ok(());
            }
        }
        if !self.shared.is_active() {
            return Ok(());
        }
        // Never over a step-down that happened meanwhile.
        self.shared.status.send_if_modified(|s| {
            if matches!(s, HaStatus::SteppedDown { .. }) {
                false
            } else {
                *s = HaStatus::Active { epoch: seq };
                true
            }
        });
        Ok(())
    }

    /// Reads every store key of the bucket into memory (from the stream's leader, not a
    /// replica that may lag).
    async fn load(&self) -> Result<usize, String> {
        let kv = self
            .js
            .get_key_value(&self.bucket)
            .await
            .map_err(|e| e.to_string())?;
        let stream = self
            .js
            .get_stream_no_info(format!("KV_{}", self.bucket))
            .await
            .map_err(|e| e.to_string())?;
        let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
        let mut state = BTreeMap::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if !key.starts_with(STORE_PREFIX) {
                continue;
            }
            let m = stream
                .get_last_raw_message_by_subject(&self.subject(&key))
                .await
                .map_err(|e| format!("key {key}: {e}"))?;
            let deleted = m
                .headers
                .get("KV-Operation")
                .is_some_and(|v| v.as_str() != "PUT");
            if !deleted {
                state.insert(key, m.payload.to_vec());
            }
        }
        let n = state.len();
        *self.shared.state() = state;
        Ok(n)
    }

    /// Writes `key` (or deletes it, with `None`), expecting the bucket's last sequence to be
    /// this instance's last write. A write that times out is sent again with the same
    /// message id (NATS stores it once) until the lease runs out.
    async fn fenced(&self, key: &str, value: Option<Vec<u8>>) -> Result<u64, HaError> {
        let _one_at_a_time = self.shared.write_lock.lock().await;
        let Some(expect) = self.shared.lease().expected_seq() else {
            return Err(HaError::NotActive);
        };
        let epoch = self.shared.lease().epoch();
        let n = self
            .shared
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{epoch}-{n}", self.shared.instance);
        let mut msg = jetstream::message::PublishMessage::build()
            .message_id(&id)
            .expected_last_sequence(expect);
        msg = match value {
            Some(v) => msg.payload(v.into()),
            None => msg.header("KV-Operation", "DEL"),
        };
        loop {
            if !self.shared.is_active() {
                return Err(HaError::NotActive);
            }
            let sent = match self.js.send_publish(self.subject(key), msg.clone()).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match sent {
                // A duplicate acknowledged before the original was stored says sequence 0:
                // not a confirmation (and 0 would switch the fence off), so ask again.
                Ok(ack) if ack.sequence == 0 => tokio::time::sleep(TICK).await,
                Ok(ack) => {
                    self.shared.lease().wrote(ack.sequence);
                    return Ok(ack.sequence);
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    self.shared.step_down("another instance took the lease over (the bucket refused this instance's write)");
                    return Err(HaError::Fenced);
                }
                // No answer (a NATS server lost, a stream leader being elected): the same
                // message again; stored once, thanks to its id.
                Err(e) if retryable(&e) => {
                    warn!(%key, "[ha] write not confirmed ({e}); sending it again");
                    tokio::time::sleep(TICK).await;
                }
                // Refused for what it is (too large for the servers' max_payload, say):
                // sending it again cannot help.
                Err(e) => return Err(HaError::Unavailable(e.to_string())),
            }
        }
    }

    /// Runs `fut` on the HA thread and waits for it (from any thread, any runtime).
    fn block_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, HaError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| HaError::Unavailable("the HA thread stopped".into()))
    }
}

async fn connect(cfg: &HaConfig, runtime: tokio::runtime::Handle) -> Result<Ha, HaError> {
    let urls = cfg.nats.join(",");
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("medfed-aggregator {}", cfg.instance))
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect();
    if let Some(creds) = &cfg.credentials {
        options = options.credentials_file(creds).await.map_err(|e| {
            HaError::Setup(format!(
                "cannot read credentials = {}: {e}",
                creds.display()
            ))
        })?;
    }
    let addrs: Vec<async_nats::ServerAddr> = cfg
        .nats
        .iter()
        .map(|u| {
            u.parse()
                .map_err(|e| HaError::Setup(format!("nats: {u:?} is not a NATS server URL: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let client = tokio::time::timeout(Duration::from_secs(30), options.connect(addrs))
        .await
        .map_err(|_| {
            HaError::Setup(format!(
                "no NATS server of nats = [{urls}] answered within 30 s"
            ))
        })?
        .map_err(|e| HaError::Setup(format!("cannot connect to nats = [{urls}]: {e}")))?;
    let mut js = jetstream::new(client);
    // A write unanswered for a third of the lease is sent again well before the lease ends.
    js.set_timeout(Duration::from_millis((cfg.lease_ms / 3).max(300)));
    // A cluster that has just started may have no JetStream leader yet: try for a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if js.get_key_value(&cfg.bucket).await.is_ok() {
            break;
        }
        // The bucket's stream, as `create_key_value` makes it (which also reads the account's
        // limits, in a form older servers, such as Debian's 2.9, do not send).
        let created = js
            .create_stream(jetstream::stream::Config {
                name: format!("KV_{}", cfg.bucket),
                description: Some("medfed aggregators' lease and state".into()),
                subjects: vec![format!("$KV.{}.>", cfg.bucket)],
                max_messages_per_subject: 1,
                discard: jetstream::stream::DiscardPolicy::New,
                deny_delete: true,
                allow_rollup: true,
                allow_direct: true,
                num_replicas: cfg.replicas,
                storage: jetstream::stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                return Err(HaError::Setup(format!(
                    "cannot open or create the bucket '{}' with {} replicas on nats = [{urls}]: {e} \
                     (is JetStream enabled, with at least {} servers in the cluster?)",
                    cfg.bucket, cfg.replicas, cfg.replicas
                )));
            }
            Err(e) => {
                info!("[ha] the bucket is not available yet ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let timing = LeaseTiming {
        duration_ms: cfg.lease_ms,
    };
    let (status, _) = watch::channel(HaStatus::Standby { holder: None });
    Ok(Ha {
        shared: Arc::new(Shared {
            lease: Mutex::new(Lease::new(timing)),
            timing,
            clock: boottime(),
            state: Mutex::default(),
            status,
            writes: std::sync::atomic::AtomicU64::new(0),
            instance: cfg.instance.clone(),
            record: LeaseRecord {
                holder: cfg.instance.clone(),
                advertise: cfg.advertise.clone(),
                duration_ms: cfg.lease_ms,
            },
            write_lock: tokio::sync::Mutex::new(()),
        }),
        runtime,
        js,
        bucket: cfg.bucket.clone(),
        _stop: Arc::new(tokio::sync::oneshot::channel().0),
    })
}

/// The time since boot, suspended time included (Linux: CLOCK_BOOTTIME); elsewhere the
/// process's monotonic clock.
fn boottime() -> Duration {
    #[cfg(target_os = "linux")]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        )
    }
    #[cfg(not(target_os = "linux"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

/// Whether a write that failed this way may have gone unanswered (a lost server, an
/// election), rather than been refused for what it is.
fn retryable(e: &jetstream::context::PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::StreamNotFound => true,
        PublishErrorKind::Other => {
            let text = e.to_string().to_lowercase();
            text.contains("unavailable") || text.contains("leader")
        }
        _ => false,
    }
}

/// The bucket key of `ns`/`key`.
fn bucket_key(ns: &str, key: &[u8]) -> String {
    let ns = if !ns.is_empty() && ns.bytes().all(|b| b.is_ascii_alphanumeric()) {
        ns.to_string()
    } else {
        format!("x{}", hex::encode(ns.as_bytes()))
    };
    format!("{STORE_PREFIX}{ns}.{}", hex::encode(key))
}

/// The aggregator's [`Store`] kept in the bucket: reads from memory (loaded when the lease
/// was taken; no one else writes while it is held), writes fenced by the lease.
struct HaStore {
    ha: Ha,
}

impl HaStore {
    fn error(&self, detail: String) -> StoreError {
        StoreError::Backend {
            path: format!("nats bucket {}", self.ha.bucket).into(),
            backend: "jetstream",
            detail,
        }
    }

    fn check_active(&self) -> Result<(), StoreError> {
        if self.ha.is_active() {
            Ok(())
        } else {
            Err(self.error(HaError::NotActive.to_string()))
        }
    }
}

impl Store for HaStore {
    /// The bucket is not a local backend; the default is named for messages only.
    fn backend(&self) -> Backend {
        Backend::DEFAULT
    }

    fn get(&self, ns: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_active()?;
        let state = self.ha.shared.state();
        Ok(state.get(&bucket_key(ns, key)).cloned())
    }

    fn scan_each(&self, ns: &str, each: &mut Visitor<'_>) -> Result<(), StoreError> {
        self.check_active()?;
        let prefix = bucket_key(ns, b"");
        // Copied out first: `each` runs without the shared state's lock (the bucket is
        // small, the aggregator's own state).
        let entries: Vec<(String, Vec<u8>)> = self
            .ha
            .shared
            .state()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in entries {
            let key = hex::decode(&k[prefix.len()..]).ok_or_else(|| {
                self.error(format!("key {k} is not hexadecimal after its namespace"))
            })?;
            if each(&key, &v).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// One key per commit (the aggregator's commits are single writes): a batch of several
    /// would not be atomic in the bucket, and is refused.
    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let mut ops = batch.into_ops();
        if ops.len() > 1 {
            return Err(self.error(format!(
                "a batch of {} writes: the bucket stores one key per commit",
                ops.len()
            )));
        }
        let Some((full, value)) = ops.pop() else {
            return Ok(());
        };
        let split = full.iter().position(|&b| b == 0).unwrap_or(full.len());
        let ns = String::from_utf8_lossy(&full[..split]).into_owned();
        let key = full.get(split + 1..).unwrap_or_default();
        let bkey = bucket_key(&ns, key);
        let ha = self.ha.clone();
        let (k, v) = (bkey.clone(), value.clone());
        let write = || self.ha.block_on(async move { ha.fenced(&k, v).await });
        // On a multi-threaded runtime the wait moves off the worker; elsewhere it blocks
        // this thread only (the write runs on the HA thread's runtime).
        let written = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(write),
            _ => write(),
        };
        written
            .and_then(|r| r)
            .map_err(|e| self.error(e.to_string()))?;
        let mut state = self.ha.shared.state();
        match value {
            Some(v) => state.insert(bkey, v),
            None => state.remove(&bkey),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_are_valid_nats_tokens_and_keep_namespaces_apart() {
        assert_eq!(bucket_key("studies", b"pima"), "s.studies.70696d61");
        assert_eq!(bucket_key("task/a", b""), "s.x7461736b2f61.");
        assert_ne!(bucket_key("ab", b"\x01"), bucket_key("a", b"b\x01"));
        for k in [bucket_key("studies", b"x y"), bucket_key("a.b", b"\xff")] {
            assert!(
                k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'),
                "{k}"
            );
        }
    }
}
