//! The StreamTask runtime under SIGKILL, with real processes: a node worker ingests a CSV
//! partition into column statistics, checkpointing every 1,000 rows; it is killed at random
//! moments 50 times per store backend and restarted. After every kill the stored statistics
//! must equal exactly those of the rows before the stored offset.

use std::io::Write;
use std::sync::Arc;

use medfed_infra::store::{self, Backend};
use medfed_node::runtime::{ColumnStats, RunOptions, csv_source, restore, run_partition};

const ROWS: u64 = 300_000;

fn value(i: u64) -> u64 {
    i.wrapping_mul(2_654_435_761) % 997
}

fn write_csv(path: &std::path::Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "glu,bmi").unwrap();
    for i in 0..ROWS {
        writeln!(f, "{},{}", value(i), i % 50).unwrap();
    }
}

#[test]
fn runtime_crash_worker() {
    let Ok(spec) = std::env::var("MEDFED_RUNTIME_WORKER") else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (backend, state, csv) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let s: Arc<dyn store::Store> =
        Arc::from(store::open(backend.parse().unwrap(), state.as_ref()).unwrap());
    let (offset, ..) = restore(&*s, "csv", 0).unwrap();
    let (header, rx) = csv_source::read(csv.as_ref(), "csv", 0, offset).unwrap();
    let task = ColumnStats::new(&header, &["glu", "bmi"]).unwrap();
    run_partition(
        Box::new(task),
        s,
        "csv",
        0,
        rx,
        &RunOptions {
            commit_every: 1000,
            window: None,
            signals: None,
            checkpoint_when_idle: false,
            caught_up: None,
        },
    )
    .unwrap();
}

#[cfg(unix)]
fn kill_many_times(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (state, csv) = (dir.path().join("state"), dir.path().join("in.csv"));
    write_csv(&csv);
    let spec = format!("{}|{}|{}", backend.name(), state.display(), csv.display());
    let worker = || {
        crate::common::worker(
            "runtime_crash::runtime_crash_worker",
            "MEDFED_RUNTIME_WORKER",
            &spec,
        )
    };
    let check = || {
        let s = store::open(backend, &state).unwrap();
        let (offset, st, processed, _) = restore(&*s, "csv", 0).unwrap();
        let (count, sum, _) = ColumnStats::read(&st, 2);
        let want: u64 = (0..offset).map(value).sum();
        assert_eq!(
            (count, processed),
            (offset, offset),
            "{}: rows counted do not match the offset",
            backend.name()
        );
        assert_eq!(
            sum[0],
            want as f64,
            "{}: sum does not match offset {offset}",
            backend.name()
        );
        offset
    };
    let offsets = crate::common::kill_50_times(worker, 11, 10..80, check);
    assert!(
        offsets.last() > offsets.first(),
        "no progress across kills: {offsets:?}"
    );
    assert!(worker().status().unwrap().success());
    assert_eq!(check(), ROWS);
}

#[cfg(unix)]
#[test]
fn redb_runtime_state_matches_offsets_after_50_kills() {
    kill_many_times(Backend::Redb);
}

#[cfg(all(unix, feature = "sled"))]
#[test]
fn sled_runtime_state_matches_offsets_after_50_kills() {
    kill_many_times(Backend::Sled);
}
