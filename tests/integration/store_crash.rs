//! Crash safety of the store, with real processes: a worker folds a stream of records into
//! state and checkpoints {offset, state} in one transaction every few records; it is killed
//! with SIGKILL at random moments, 50 times per backend, and restarted. After every kill the
//! stored state must equal exactly the fold of the records up to the stored offset: nothing
//! lost, nothing counted twice.
//!
//! The worker is this test binary itself, re-run with `MEDFED_STORE_WORKER` set.

use medfed_infra::store::{self, Backend, Batch};

const RECORDS: u64 = 200_000;

fn record(i: u64) -> u64 {
    i.wrapping_mul(2_654_435_761) % 1000
}

/// (offset, sum, count) as stored.
fn read(s: &dyn store::Store) -> (u64, u64, u64) {
    let get = |ns: &str, k: &[u8]| {
        s.get(ns, k).unwrap().map_or(0, |v| {
            u64::from_be_bytes(v.try_into().expect("8-byte value"))
        })
    };
    (
        get("offsets", b"input-0"),
        get("task/sum", b"sum"),
        get("task/sum", b"count"),
    )
}

/// The worker: resumes from the checkpoint and keeps folding until killed or done.
#[test]
fn store_crash_worker() {
    let Ok(spec) = std::env::var("MEDFED_STORE_WORKER") else {
        return;
    };
    let (backend, path) = spec.split_once(':').expect("BACKEND:PATH");
    let s = store::open(backend.parse().unwrap(), path.as_ref()).unwrap();
    let (mut offset, mut sum, mut count) = read(&*s);
    let mut since = 0;
    while offset < RECORDS {
        sum += record(offset);
        count += 1;
        offset += 1;
        since += 1;
        if since == 37 || offset == RECORDS {
            let mut b = Batch::default();
            b.put("offsets", b"input-0", &offset.to_be_bytes()).unwrap();
            b.put("task/sum", b"sum", &sum.to_be_bytes()).unwrap();
            b.put("task/sum", b"count", &count.to_be_bytes()).unwrap();
            s.commit(b).unwrap();
            since = 0;
        }
    }
}

#[cfg(unix)]
fn crash_many_times(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let spec = format!("{}:{}", backend.name(), path.display());
    let worker = || {
        crate::common::worker(
            "store_crash::store_crash_worker",
            "MEDFED_STORE_WORKER",
            &spec,
        )
    };
    let check = || {
        let s = store::open(backend, &path).unwrap();
        let (offset, sum, count) = read(&*s);
        let want: u64 = (0..offset).map(record).sum();
        assert_eq!(
            (sum, count),
            (want, offset),
            "{}: state does not match its offset {offset}",
            backend.name()
        );
        offset
    };
    let offsets = crate::common::kill_50_times(worker, 7, 20..120, check);
    // Progress was made across the kills, and a final run completes the stream exactly.
    assert!(offsets.last() > offsets.first(), "{offsets:?}");
    let status = worker().status().unwrap();
    assert!(status.success());
    assert_eq!(check(), RECORDS);
}

#[cfg(all(unix, feature = "sled"))]
#[test]
fn sled_state_matches_its_offsets_after_50_kills() {
    crash_many_times(Backend::Sled);
}

#[cfg(unix)]
#[test]
fn redb_state_matches_its_offsets_after_50_kills() {
    crash_many_times(Backend::Redb);
}
