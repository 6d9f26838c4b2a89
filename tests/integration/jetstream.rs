//! NATS JetStream against a real `nats-server -js` on loopback (started and stopped by this
//! test): two node workers share one stream of 10,000 records, each owning two of its four
//! partitions; one worker is killed with SIGKILL mid-stream and restarted. Every record must
//! land in the workers' states exactly once.
//!
//! `scripts/test` installs `nats-server` when it is missing; the workers are this test
//! binary, re-run with `MEDFED_JS_WORKER` set.

#![cfg(feature = "jetstream")]

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medfed_infra::store::{self, Backend};
use medfed_node::runtime::jetstream_source::{Fetch, JetStreamPartition, subscribe};
use medfed_node::runtime::{
    Envelope, KvState, MessageCollector, RunOptions, StreamTask, TaskCoordinator, TaskError,
    restore, run_partition_with,
};

const RECORDS: u64 = 10_000;
const PARTITIONS: u32 = 4;

/// Sums the records' values (and counts them) into the state.
struct Sum {
    count: u64,
    sum: u64,
    /// Take a millisecond per record (so that a kill lands mid-stream on any machine).
    slow: bool,
}

impl StreamTask for Sum {
    fn init(&mut self, s: &mut KvState) -> Result<(), TaskError> {
        (self.count, self.sum) = (s.get_u64(b"count"), s.get_u64(b"sum"));
        Ok(())
    }
    fn process(
        &mut self,
        env: &Envelope,
        _: &mut KvState,
        out: &mut MessageCollector,
        _: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        match String::from_utf8_lossy(&env.payload).parse::<u64>() {
            Ok(v) => {
                self.count += 1;
                self.sum += v;
                if self.slow {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(_) => out.dead_letter(env, "not a number"),
        }
        Ok(())
    }
    fn flush(&mut self, s: &mut KvState) {
        s.put_u64(b"count", self.count);
        s.put_u64(b"sum", self.sum);
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nats(dir: &std::path::Path) -> (Server, String) {
    let port = crate::common::free_tcp_port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is not installed: run scripts/test, which installs it (apt-get install nats-server)");
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // What answers is this server, not another that holds the port.
    assert!(
        matches!(server.0.try_wait(), Ok(None)),
        "nats-server exited at start (port {port} taken?)"
    );
    (server, format!("nats://127.0.0.1:{port}"))
}

/// A worker: owns `partitions`, ingests them into its own store until the stream is idle.
#[test]
fn jetstream_worker() {
    let Ok(spec) = std::env::var("MEDFED_JS_WORKER") else {
        return;
    };
    let mut it = spec.split('|');
    let (url, state, parts) = (
        it.next().unwrap().to_string(),
        it.next().unwrap().to_string(),
        it.next().unwrap().to_string(),
    );
    let slow = it.next() == Some("slow");
    // What the source did, for the test to show if this worker does not finish.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("medfed_node=debug")
        .with_writer(std::io::stderr)
        .try_init();
    let s: Arc<dyn store::Store> =
        Arc::from(store::open(Backend::DEFAULT, state.as_ref()).unwrap());
    let parts: Vec<u32> = parts.split(',').map(|p| p.parse().unwrap()).collect();
    ingest(&url, s, &parts, slow, Fetch::default());
}

/// Ingests `parts` of the test stream into `s` until the stream is idle.
fn ingest(url: &str, s: Arc<dyn store::Store>, parts: &[u32], slow: bool, fetch: Fetch) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut runs = Vec::new();
        for &p in parts {
            let src = JetStreamPartition {
                url: url.to_string(),
                stream: "medfed".into(),
                subject: format!("medfed.test.{p}"),
                durable: format!("test-p{p}"),
                ack_wait: Duration::from_secs(1),
                idle_exit: Some(Duration::from_secs(3)),
                fetch,
            };
            let (resume, ..) = restore(&*s, "test", p).unwrap();
            let (rx, acks) = subscribe(&src, "test", p, resume).await.unwrap();
            let s = s.clone();
            runs.push(tokio::task::spawn_blocking(move || {
                let task = Box::new(Sum {
                    count: 0,
                    sum: 0,
                    slow,
                });
                let on_checkpoint = move |offset: u64| {
                    let _ = acks.send(offset);
                };
                run_partition_with(
                    task,
                    s,
                    "test",
                    p,
                    rx,
                    &RunOptions {
                        commit_every: 200,
                        window: None,
                        signals: None,
                        checkpoint_when_idle: false,
                        caught_up: None,
                    },
                    &on_checkpoint,
                )
                .unwrap();
            }));
        }
        for r in runs {
            r.await.unwrap();
        }
        // Let the last acknowledgements go out.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
}

#[cfg(unix)]
#[test]
fn two_workers_share_a_stream_and_every_record_counts_once_despite_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = start_nats(&dir.path().join("nats"));
    // The stream, and 10,000 records spread over four partition subjects.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "medfed".into(),
            subjects: vec!["medfed.test.*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        for i in 0..RECORDS {
            js.publish(
                format!("medfed.test.{}", i % u64::from(PARTITIONS)),
                i.to_string().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    });
    let worker = |state: &std::path::Path, parts: &str| {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.with_extension("log"))
            .unwrap();
        crate::common::worker(
            "jetstream::jetstream_worker",
            "MEDFED_JS_WORKER",
            &format!("{url}|{}|{parts}", state.display()),
        )
        .stderr(log)
        .spawn()
        .unwrap()
    };
    let (a_state, b_state) = (dir.path().join("worker-a"), dir.path().join("worker-b"));
    // Worker A's first life takes over a second for its 5,000 records: kill it mid-stream,
    // then restart it.
    let mut a = worker(&a_state, "0,1|slow");
    let mut b = worker(&b_state, "2,3");
    std::thread::sleep(Duration::from_millis(300));
    a.kill().unwrap();
    a.wait().unwrap();
    let killed_at: u64 = {
        let s = store::open(Backend::DEFAULT, &a_state).unwrap();
        (0..2).map(|p| restore(&*s, "test", p).unwrap().2).sum()
    };
    // `node status`'s lag, asked of the server: the messages of each partition's subject
    // at or after its checkpoint (message i is sequence i + 1, on partition i % 4).
    let lags_are_right = |state: &std::path::Path| {
        let cfg: medfed_node::ingest::IngestConfig = toml::from_str(&format!(
            "stream = \"test\"\ncolumns = []\n[jetstream]\nurl = \"{url}\"\nstream = \"medfed\"\n\
             subject_prefix = \"medfed.test\"\npartitions = {PARTITIONS}\n"
        ))
        .unwrap();
        let s = store::open(Backend::DEFAULT, state).unwrap();
        for row in medfed_node::ingest::status(std::slice::from_ref(&cfg), &*s).unwrap() {
            let want = (0..RECORDS)
                .filter(|i| i % u64::from(PARTITIONS) == u64::from(row.partition))
                .filter(|i| i + 1 >= row.offset)
                .count() as u64;
            assert_eq!(
                (row.lag, row.lag_unknown.as_deref()),
                (Some(want), None),
                "partition {} at offset {}",
                row.partition,
                row.offset
            );
        }
    };
    lags_are_right(&a_state);
    let mut a = worker(&a_state, "0,1");
    for (name, child) in [("a", &mut a), ("b", &mut b)] {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "worker {name}: {status:?}");
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let state = if name == "a" { &a_state } else { &b_state };
                let log = std::fs::read_to_string(state.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(200).collect();
                let s = store::open(Backend::DEFAULT, state).unwrap();
                let offsets: Vec<u64> = (0..PARTITIONS)
                    .map(|p| restore(&*s, "test", p).map_or(0, |r| r.0))
                    .collect();
                panic!(
                    "worker {name} did not finish; checkpoints {offsets:?}; its log's last lines:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (mut count, mut sum) = (0, 0);
    let mut per_partition = Vec::new();
    for (state, parts) in [(&a_state, [0, 1]), (&b_state, [2, 3])] {
        let s = store::open(Backend::DEFAULT, state).unwrap();
        for p in parts {
            let (offset, st, processed, _) = restore(&*s, "test", p).unwrap();
            count += st.get_u64(b"count");
            sum += st.get_u64(b"sum");
            per_partition.push((p, offset, processed, st.get_u64(b"count")));
        }
    }
    println!("(partition, offset, processed, counted): {per_partition:?}");
    println!("worker A had processed {killed_at} records when it was killed");
    assert!(
        killed_at < RECORDS / 2,
        "the kill came after worker A was done ({killed_at})"
    );
    assert_eq!(count, RECORDS, "records counted");
    assert_eq!(sum, (0..RECORDS).sum::<u64>(), "sum of the records");
    lags_are_right(&a_state);
    lags_are_right(&b_state);
    // A server that cannot be asked leaves the lag unknown, and says why.
    let gone = crate::common::free_tcp_port();
    let cfg: medfed_node::ingest::IngestConfig = toml::from_str(&format!(
        "stream = \"test\"\ncolumns = []\n[jetstream]\nurl = \"nats://127.0.0.1:{gone}\"\n\
         stream = \"medfed\"\nsubject_prefix = \"medfed.test\"\npartitions = 1\n"
    ))
    .unwrap();
    let s = store::open(Backend::DEFAULT, &a_state).unwrap();
    let rows = medfed_node::ingest::status(std::slice::from_ref(&cfg), &*s).unwrap();
    assert_eq!(rows[0].lag, None);
    let why = rows[0].lag_unknown.as_deref().unwrap_or_default();
    assert!(
        why.contains("JetStream connect") && why.contains(&gone.to_string()),
        "{why}"
    );
}

/// Fetches cut short while the server is still delivering (here after a few milliseconds;
/// under load, a client too slow to read a fetch within its time) leave deliveries unread.
/// Every record must still count once: nothing after a lost delivery is taken, and the lost
/// ones are fetched again.
#[cfg(unix)]
#[test]
fn fetches_cut_short_lose_no_record() {
    const N: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let (_server, url) = start_nats(&dir.path().join("nats"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "medfed".into(),
            subjects: vec!["medfed.test.*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        // Acknowledged in the end, not one by one (the publishing is not what is tested).
        let mut acks = Vec::new();
        for i in 0..N {
            acks.push(
                js.publish("medfed.test.0", i.to_string().into())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    });
    drop(rt);
    let state = dir.path().join("state");
    let s: Arc<dyn store::Store> = Arc::from(store::open(Backend::DEFAULT, &state).unwrap());
    ingest(
        &url,
        s.clone(),
        &[0],
        false,
        Fetch {
            max_messages: 2_000,
            // Cut before the server stops delivering.
            expires: Duration::from_millis(50),
            cut_after: Duration::from_millis(5),
        },
    );
    let (offset, st, processed, _) = restore(&*s, "test", 0).unwrap();
    assert_eq!(
        (st.get_u64(b"count"), st.get_u64(b"sum"), processed),
        (N, (0..N).sum::<u64>(), N),
        "records counted, their sum, processed (checkpoint at {offset})"
    );
    assert_eq!(offset, N + 1, "the checkpoint is past the last record");
}
