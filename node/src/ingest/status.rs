//! `medfed node status`: where each partition of the configured pipelines stands.

use medfed_infra::store::Store;

use super::{IngestConfig, IngestError, Part, parts};
use crate::runtime::Timing;
use crate::runtime::restore_counts;

/// One line of `medfed node status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    /// The pipeline's stream.
    pub stream: String,
    /// The partition.
    pub partition: u32,
    /// The offset it resumes from: every record before it is processed and checkpointed.
    pub offset: u64,
    /// Records processed, quarantined ones included.
    pub processed: u64,
    /// Records quarantined.
    pub quarantined: u64,
    /// Records not yet processed, when the source can tell: rows of an unpartitioned CSV
    /// file, persons of an OMOP database, messages of a JetStream partition (counted by
    /// the database or the server when `medfed node status` asks).
    pub lag: Option<u64>,
    /// Why the lag is unknown, where the source could have told it (its database could
    /// not be asked).
    pub lag_unknown: Option<String>,
    /// When it last checkpointed (ms since the UNIX epoch), if ever.
    pub last_checkpoint_ms: Option<u64>,
    /// Where its last run's time went, as of its last checkpoint.
    pub timing: Option<Timing>,
}

/// Where every partition of the configured pipelines stands, from the store.
pub fn status(
    ingests: &[IngestConfig],
    store: &dyn Store,
) -> Result<Vec<PartitionStatus>, IngestError> {
    let mut out = Vec::new();
    for cfg in ingests {
        let fail = |detail: String| IngestError {
            stream: cfg.stream.clone(),
            detail,
        };
        let parts = parts(cfg).map_err(fail)?;
        let mut counts = Vec::new();
        for (p, _) in &parts {
            counts.push(restore_counts(store, &cfg.stream, *p).map_err(|e| fail(e.to_string()))?);
        }
        // A CSV file's partitions share one pass over it.
        let csv_lags = csv_lags(&parts, &counts);
        for ((p, part), (offset, processed, quarantined)) in parts.into_iter().zip(counts) {
            let key = format!("{}/{p}", cfg.stream);
            let last = store
                .get("metrics/checkpoint_ms", key.as_bytes())
                .map_err(|e| fail(e.to_string()))?
                .and_then(|v| v.try_into().ok())
                .map(u64::from_be_bytes);
            // The lag where the source can tell it, or why asking it failed.
            let lag: Result<Option<u64>, String> = match &part {
                Part::Csv { .. } => csv_lags.get(&p).cloned().transpose(),
                Part::Omop(omop) => crate::runtime::omop_source::remaining(omop, offset)
                    .map(Some)
                    .map_err(|e| e.to_string()),
                #[cfg(feature = "jetstream")]
                Part::Jet(jet) => crate::runtime::jetstream_source::remaining(jet, offset)
                    .map(Some)
                    .map_err(|e| e.to_string()),
                _ => Ok(None),
            };
            let (lag, lag_unknown) = match lag {
                Ok(lag) => (lag, None),
                Err(why) => (None, Some(why)),
            };
            out.push(PartitionStatus {
                stream: cfg.stream.clone(),
                partition: p,
                offset,
                processed,
                quarantined,
                lag,
                lag_unknown,
                last_checkpoint_ms: last,
                timing: Timing::load(store, &cfg.stream, p).map_err(|e| fail(e.to_string()))?,
            });
        }
    }
    Ok(out)
}

/// The rows each CSV partition still has to read (`csv_source::remaining`), or why they
/// could not be counted: one pass over each file, for all the partitions reading it.
fn csv_lags(
    parts: &[(u32, Part)],
    counts: &[(u64, u64, u64)],
) -> std::collections::BTreeMap<u32, Result<u64, String>> {
    let mut by_file: std::collections::BTreeMap<&std::path::Path, (_, Vec<(u32, u64)>)> =
        Default::default();
    for ((p, part), (offset, ..)) in parts.iter().zip(counts) {
        if let Part::Csv { path, opts } = part {
            by_file
                .entry(path.as_path())
                .or_insert_with(|| (opts, Vec::new()))
                .1
                .push((*p, *offset));
        }
    }
    let mut lags = std::collections::BTreeMap::new();
    for (path, (opts, from)) in by_file {
        match crate::runtime::csv_source::remaining(path, opts, &from) {
            Ok(left) => lags.extend(from.iter().map(|(p, _)| *p).zip(left.into_iter().map(Ok))),
            Err(e) => {
                let why = format!("{}: {e}", path.display());
                lags.extend(from.iter().map(|(p, _)| (*p, Err(why.clone()))));
            }
        }
    }
    lags
}

/// Each partition's timing of its last run, for one pipeline (none for a partition that
/// never checkpointed); reads nothing else.
pub fn timings(cfg: &IngestConfig, store: &dyn Store) -> Result<Vec<Timing>, IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    let mut out = Vec::new();
    for (p, _) in parts(cfg).map_err(fail)? {
        out.extend(Timing::load(store, &cfg.stream, p).map_err(|e| fail(e.to_string()))?);
    }
    Ok(out)
}

/// What limits a pipeline's throughput, from its partitions' timings (of the same stream)
/// on a machine with `cores` cores: one sentence for the operator, or `None` before any
/// record was processed.
pub fn throughput_limit(timings: &[Timing], cores: usize, commit_every: u64) -> Option<String> {
    let sum = |f: fn(&Timing) -> u64| timings.iter().map(f).sum::<u64>() as f64;
    let (wait, work, commit) = (sum(|t| t.wait_us), sum(|t| t.work_us), sum(|t| t.commit_us));
    let total = wait + work + commit;
    if total <= 0.0 || sum(|t| t.records) <= 0.0 {
        return None;
    }
    let pct = |x: f64| format!("{:.0}%", 100.0 * x / total);
    let n = timings.len();
    let busy = work + commit;
    Some(if wait >= 0.5 * total {
        format!(
            "input: the partitions waited for records {} of the time. The source is the limit \
             (one thread reads and splits each CSV file; or a JetStream or FHIR source), or the \
             stream has no new records (a stream that is caught up waits)",
            pct(wait)
        )
    } else if commit >= 0.25 * total {
        let advice = if commit_every < 100_000 {
            format!(
                "; a larger commit_every (now {commit_every}) makes commits fewer, if their \
                 number rather than the bytes they write is the cost"
            )
        } else {
            "; the store's disk is the limit".to_string()
        };
        format!(
            "store commits: {} of the time goes to writing and syncing checkpoints{advice}",
            pct(commit)
        )
    } else {
        let cores_note = match n.cmp(&cores) {
            std::cmp::Ordering::Less => format!(
                "; {} of the {cores} cores are idle: more partitions (`partitions` in \
                 [[ingest]]) would use them",
                cores - n
            ),
            std::cmp::Ordering::Equal => "; one partition per core: this is the machine's limit \
                 for this pipeline"
                .to_string(),
            std::cmp::Ordering::Greater => {
                format!("; {n} partitions share {cores} cores: more partitions will not help")
            }
        };
        format!(
            "the tasks (CPU): the partitions worked {} of the time ({} in tasks, {} \
             committing){cores_note}",
            pct(busy),
            pct(work),
            pct(commit)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(wait_us: u64, work_us: u64, commit_us: u64) -> Timing {
        Timing {
            wait_us,
            work_us,
            commit_us,
            records: 1000,
        }
    }

    #[test]
    fn the_limit_named_is_where_the_time_went() {
        assert_eq!(throughput_limit(&[], 2, 10_000), None);
        assert_eq!(
            throughput_limit(
                &[Timing {
                    records: 0,
                    ..t(5, 5, 5)
                }],
                2,
                10_000
            ),
            None
        );
        let input = throughput_limit(&[t(80, 15, 5), t(70, 25, 5)], 2, 10_000).unwrap();
        assert!(
            input.starts_with("input: ") && input.contains("75%"),
            "{input}"
        );
        let commits = throughput_limit(&[t(10, 50, 40)], 2, 500).unwrap();
        assert!(commits.starts_with("store commits: 40%") && commits.contains("now 500"));
        let one = throughput_limit(&[t(10, 85, 5)], 2, 10_000).unwrap();
        assert!(one.starts_with("the tasks (CPU)") && one.contains("1 of the 2 cores are idle"));
        let two = throughput_limit(&[t(10, 85, 5), t(10, 85, 5)], 2, 10_000).unwrap();
        assert!(two.contains("the machine's limit"), "{two}");
        let four = throughput_limit(&[t(10, 85, 5); 4], 2, 10_000).unwrap();
        assert!(four.contains("will not help"), "{four}");
    }
}
