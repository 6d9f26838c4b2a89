//! How far an ingestion has got: records and input bytes handed to the tasks, counted by
//! the partitions' runners, read by whoever shows progress (a bar on a terminal, periodic
//! log lines otherwise).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters shared by the partitions of one or more pipelines.
#[derive(Debug)]
pub struct Progress {
    records: AtomicU64,
    quarantined: AtomicU64,
    bytes: AtomicU64,
    /// The input's size in bytes, where it is known (CSV files), else 0.
    total_bytes: AtomicU64,
    started: Instant,
}

impl Progress {
    /// New counters, at zero, the clock started.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            records: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// Counts records processed (and how many of them were quarantined) and the input bytes
    /// they came from.
    pub fn add(&self, records: u64, quarantined: u64, bytes: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.quarantined.fetch_add(quarantined, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Adds `bytes` to the input's known size.
    pub fn expect_bytes(&self, bytes: u64) {
        self.total_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records processed so far.
    pub fn processed(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// A snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let records = self.records.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let total = self.total_bytes.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let fraction = (total > 0).then(|| (bytes as f64 / total as f64).min(1.0));
        let eta = fraction
            .filter(|f| *f > 0.0)
            .map(|f| Duration::from_secs_f64((secs / f - secs).clamp(0.0, 1e7)));
        Snapshot {
            records,
            quarantined: self.quarantined.load(Ordering::Relaxed),
            rate: records as f64 / secs,
            fraction,
            eta,
            elapsed,
        }
    }
}

/// Progress at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Records processed.
    pub records: u64,
    /// Of which quarantined.
    pub quarantined: u64,
    /// Records per second since the start.
    pub rate: f64,
    /// The share of the input read, where its size is known.
    pub fraction: Option<f64>,
    /// The time left at this rate, where the input's size is known.
    pub eta: Option<Duration>,
    /// Since the start.
    pub elapsed: Duration,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records ({} quarantined), {:.0} records/s",
            self.records, self.quarantined, self.rate
        )?;
        if let (Some(fr), Some(eta)) = (self.fraction, self.eta) {
            write!(
                f,
                ", {:.0}% of the input, {} s left",
                fr * 100.0,
                eta.as_secs()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_read_and_the_time_left_come_from_bytes() {
        let p = Progress::new();
        assert_eq!(p.snapshot().fraction, None);
        p.expect_bytes(1000);
        p.add(10, 1, 250);
        let s = p.snapshot();
        assert_eq!((s.records, s.quarantined), (10, 1));
        assert_eq!(s.fraction, Some(0.25));
        assert!(s.eta.is_some());
        assert!(s.to_string().contains("10 records (1 quarantined)"), "{s}");
        assert!(s.to_string().contains("25% of the input"), "{s}");
    }
}
