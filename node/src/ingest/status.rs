//! `medfed node status`: where each partition of the configured pipelines stands.

use medfed_infra::store::Store;

use super::{IngestConfig, IngestError, Part, parts};
use crate::runtime::csv_source::Partitioning;
use crate::runtime::restore;

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
    /// Rows not yet processed, when the source can tell (CSV files).
    pub lag: Option<u64>,
    /// When it last checkpointed (ms since the UNIX epoch), if ever.
    pub last_checkpoint_ms: Option<u64>,
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
        for (p, part) in parts(cfg).map_err(fail)? {
            let (offset, _, processed, quarantined) =
                restore(store, &cfg.stream, p).map_err(|e| fail(e.to_string()))?;
            let key = format!("{}/{p}", cfg.stream);
            let last = store
                .get("metrics/checkpoint_ms", key.as_bytes())
                .map_err(|e| fail(e.to_string()))?
                .and_then(|v| v.try_into().ok())
                .map(u64::from_be_bytes);
            let lag = match &part {
                Part::Csv { path, opts } if opts.partitioning == Partitioning::Whole => {
                    std::fs::read(path).ok().map(|b| {
                        (b.iter().filter(|c| **c == b'\n').count() as u64)
                            .saturating_sub(1)
                            .saturating_sub(offset)
                    })
                }
                _ => None,
            };
            out.push(PartitionStatus {
                stream: cfg.stream.clone(),
                partition: p,
                offset,
                processed,
                quarantined,
                lag,
                last_checkpoint_ms: last,
            });
        }
    }
    Ok(out)
}
