//! Whether each ingestion pipeline has caught up with its input: a dataset that reads a
//! pipeline's records is served only once it has (a study started earlier would train on
//! the part of the extract read so far, and say nothing).
//!
//! A pipeline over a file or an export has caught up when it has read all of it (and
//! checkpointed it); one over a JetStream stream when every partition has checkpointed all
//! the stream held when it looked (a fetch that brings nothing new).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Where a pipeline stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Reading what its input holds; `partitions` still to catch up.
    CatchingUp {
        /// Partitions that have not caught up yet.
        partitions: usize,
    },
    /// Everything its input held when it started is in the store.
    CaughtUp,
    /// It stopped with an error.
    Failed(String),
}

/// The pipelines of one node process, by stream name.
#[derive(Debug, Default)]
pub struct Readiness {
    streams: Mutex<HashMap<String, Stage>>,
    changed: tokio::sync::Notify,
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stage>> {
        // Every change is one insert: a poisoned map is still consistent.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, stream: &str, stage: Stage) {
        self.lock().insert(stream.to_string(), stage);
        self.changed.notify_waiters();
    }

    /// `stream` starts, with `partitions` to catch up.
    pub fn starting(&self, stream: &str, partitions: usize) {
        let stage = if partitions == 0 {
            Stage::CaughtUp
        } else {
            Stage::CatchingUp { partitions }
        };
        self.set(stream, stage);
    }

    /// One partition of `stream` caught up (each partition says so once).
    pub fn partition_caught_up(&self, stream: &str) {
        let mut streams = self.lock();
        if let Some(Stage::CatchingUp { partitions }) = streams.get_mut(stream) {
            *partitions = partitions.saturating_sub(1);
            if *partitions == 0 {
                streams.insert(stream.to_string(), Stage::CaughtUp);
            }
        }
        drop(streams);
        self.changed.notify_waiters();
    }

    /// Every partition of `stream` caught up (its input ended).
    pub fn caught_up(&self, stream: &str) {
        self.set(stream, Stage::CaughtUp);
    }

    /// `stream` stopped with an error (a stage it had caught up before stays failed: its
    /// records are no longer kept current).
    pub fn failed(&self, stream: &str, why: String) {
        self.set(stream, Stage::Failed(why));
    }

    /// Where `stream` stands; `None` if it was never started in this process.
    pub fn stage(&self, stream: &str) -> Option<Stage> {
        self.lock().get(stream).cloned()
    }

    /// Waits until every one of `streams` has caught up or failed, calling `waiting` with
    /// the ones still catching up every `every`.
    pub async fn wait_for(&self, streams: &[String], every: Duration, waiting: impl Fn(&[String])) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let behind: Vec<String> = streams
                .iter()
                .filter(|s| matches!(self.stage(s), None | Some(Stage::CatchingUp { .. })))
                .cloned()
                .collect();
            if behind.is_empty() {
                return;
            }
            if tokio::time::timeout(every, notified).await.is_err() {
                waiting(&behind);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_is_ready_when_every_partition_caught_up() {
        let r = std::sync::Arc::new(Readiness::default());
        assert_eq!(r.stage("s"), None);
        r.starting("s", 2);
        r.partition_caught_up("s");
        assert_eq!(r.stage("s"), Some(Stage::CatchingUp { partitions: 1 }));
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move {
                r.wait_for(&["s".to_string()], Duration::from_millis(10), |_| {})
                    .await;
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished());
        r.partition_caught_up("s");
        assert_eq!(r.stage("s"), Some(Stage::CaughtUp));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        r.failed("s", "gone".into());
        assert_eq!(r.stage("s"), Some(Stage::Failed("gone".into())));
        r.starting("empty", 0);
        assert_eq!(r.stage("empty"), Some(Stage::CaughtUp));
    }
}
