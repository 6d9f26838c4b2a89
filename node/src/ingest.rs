//! Ingestion pipelines declared in `node.toml` (`[[ingest]]`): a source (CSV file or
//! directory, FHIR export, NATS JetStream), its partitioning, and the task that folds the
//! records into the node's state, one task instance per partition, checkpointed in the
//! node's store (`[state]`). `medfed node ingest` runs them; `medfed node status` shows
//! where each partition stands.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use medfed_infra::store::{self, Backend, Store};
use serde::{Deserialize, Serialize};

use crate::runtime::csv_source::{self, CsvOptions, Partitioning};
use crate::runtime::fhir_source::{self, FhirMapping};
use crate::runtime::jetstream_source::{self, JetStreamPartition};
use crate::runtime::{ColumnStats, RunOptions, restore, run_partition_with};

/// `[state]`: where the node keeps its durable state.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    #[serde(default = "default_backend")]
    pub backend: Backend,
}

fn default_state_dir() -> PathBuf {
    "state".into()
}
fn default_backend() -> Backend {
    Backend::DEFAULT
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
            backend: default_backend(),
        }
    }
}

/// One `[[ingest]]` pipeline.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The stream's name (its state and offsets are kept under it).
    pub stream: String,
    /// A CSV file or a directory of CSV files (one partition per file).
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// Hash-partition a CSV file by this column ...
    #[serde(default)]
    pub partition_by: Option<String>,
    /// ... into this many partitions.
    #[serde(default = "one")]
    pub partitions: u32,
    /// Keep reading rows appended to the CSV file.
    #[serde(default)]
    pub follow: bool,
    /// A FHIR R4 Bulk Data export directory, with its mapping.
    #[serde(default)]
    pub fhir: Option<PathBuf>,
    #[serde(default)]
    pub fhir_mapping: Option<FhirMapping>,
    /// A NATS JetStream source.
    #[serde(default)]
    pub jetstream: Option<JetStreamConfig>,
    /// The built-in task: count, sum and sum of squares of these numeric columns.
    pub columns: Vec<String>,
    #[serde(default = "default_commit_every")]
    pub commit_every: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    pub url: String,
    pub stream: String,
    /// Partition `p` is subject `<subject_prefix>.<p>`.
    pub subject_prefix: String,
    pub partitions: u32,
    /// This worker's index and the number of workers sharing the stream: worker `k` takes
    /// the partitions `p` with `p % workers == k`.
    #[serde(default)]
    pub worker: u32,
    #[serde(default = "one")]
    pub workers: u32,
    #[serde(default = "default_ack_wait")]
    pub ack_wait_secs: u64,
    /// Stop after this many idle seconds (bounded ingestion); forever if absent.
    #[serde(default)]
    pub idle_exit_secs: Option<u64>,
}

fn one() -> u32 {
    1
}
fn default_commit_every() -> u64 {
    10_000
}
fn default_ack_wait() -> u64 {
    30
}

#[derive(Debug, thiserror::Error)]
#[error("ingest '{stream}': {detail}")]
pub struct IngestError {
    pub stream: String,
    pub detail: String,
}

impl IngestConfig {
    pub fn resolve(&mut self, config_path: &Path) {
        for p in [&mut self.csv, &mut self.fhir].into_iter().flatten() {
            *p = medfed_infra::config::resolve(config_path, p);
        }
    }

    /// Checks the declaration; the message names the stream.
    pub fn validate(&self) -> Result<(), String> {
        let sources = [
            self.csv.is_some(),
            self.fhir.is_some(),
            self.jetstream.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if sources != 1 {
            return Err("needs exactly one source: csv, fhir or jetstream".into());
        }
        if self.fhir.is_some() && self.fhir_mapping.is_none() {
            return Err("a fhir source needs a fhir_mapping".into());
        }
        if self.columns.is_empty() || self.commit_every == 0 || self.partitions == 0 {
            return Err("needs columns, and commit_every and partitions of at least 1".into());
        }
        if let Some(js) = &self.jetstream
            && (js.workers == 0 || js.worker >= js.workers || js.partitions == 0)
        {
            return Err("jetstream needs partitions >= 1 and worker < workers".into());
        }
        Ok(())
    }
}

/// A partition of a pipeline and how to open it.
enum Part {
    Csv { path: PathBuf, opts: CsvOptions },
    Fhir(PathBuf, FhirMapping),
    Jet(JetStreamPartition),
}

fn parts(cfg: &IngestConfig) -> Result<Vec<(u32, Part)>, String> {
    if let Some(path) = &cfg.csv {
        let files = csv_source::files(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(column) = &cfg.partition_by {
            let file = files
                .first()
                .ok_or_else(|| format!("{}: no CSV file", path.display()))?;
            let partitioning = Partitioning::ByKey {
                column: column.clone(),
                partitions: cfg.partitions,
            };
            return Ok((0..cfg.partitions)
                .map(|p| {
                    (
                        p,
                        Part::Csv {
                            path: file.clone(),
                            opts: CsvOptions {
                                partitioning: partitioning.clone(),
                                follow: cfg.follow,
                            },
                        },
                    )
                })
                .collect());
        }
        return Ok(files
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                (
                    i as u32,
                    Part::Csv {
                        path: f,
                        opts: CsvOptions {
                            partitioning: Partitioning::Whole,
                            follow: cfg.follow,
                        },
                    },
                )
            })
            .collect());
    }
    if let (Some(dir), Some(mapping)) = (&cfg.fhir, &cfg.fhir_mapping) {
        return Ok(vec![(0, Part::Fhir(dir.clone(), mapping.clone()))]);
    }
    let js = cfg.jetstream.as_ref().ok_or("no source")?;
    Ok((0..js.partitions)
        .filter(|p| p % js.workers == js.worker)
        .map(|p| {
            (
                p,
                Part::Jet(JetStreamPartition {
                    url: js.url.clone(),
                    stream: js.stream.clone(),
                    subject: format!("{}.{p}", js.subject_prefix),
                    durable: format!("medfed-{}-p{p}", cfg.stream),
                    ack_wait: Duration::from_secs(js.ack_wait_secs),
                    idle_exit: js.idle_exit_secs.map(Duration::from_secs),
                }),
            )
        })
        .collect())
}

/// Runs every partition of `cfg` (one task instance each, concurrently) until its input ends.
pub async fn run(
    cfg: &IngestConfig,
    store: Arc<dyn Store>,
) -> Result<Vec<(u32, crate::runtime::PartitionReport)>, IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    let columns: Vec<&str> = cfg.columns.iter().map(String::as_str).collect();
    // One set of signals per pipeline: a task's AllTasks commit or shutdown reaches every
    // partition.
    let signals = Arc::new(crate::runtime::PipelineSignals::default());
    let mut runs = Vec::new();
    for (p, part) in parts(cfg).map_err(fail)? {
        let (offset, ..) = restore(&*store, &cfg.stream, p).map_err(|e| fail(e.to_string()))?;
        let (header, rx, acks) = match part {
            Part::Csv { path, opts } => {
                let (h, rx) = csv_source::read_with(&path, &cfg.stream, p, offset, &opts)
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                (h, rx, None)
            }
            Part::Fhir(dir, mapping) => {
                let (h, rx) = fhir_source::read(&dir, &mapping, &cfg.stream, p, offset)
                    .map_err(|e| fail(e.to_string()))?;
                (h, rx, None)
            }
            Part::Jet(js) => {
                let (rx, acks) = jetstream_source::subscribe(&js, &cfg.stream, p, offset)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                // JetStream payloads are CSV rows in the configured column order.
                (cfg.columns.clone(), rx, Some(acks))
            }
        };
        let task = ColumnStats::new(&header, &columns).map_err(|e| fail(e.to_string()))?;
        let (store, stream, opts) = (
            store.clone(),
            cfg.stream.clone(),
            RunOptions {
                commit_every: cfg.commit_every,
                window: None,
                signals: Some(signals.clone()),
            },
        );
        runs.push(tokio::task::spawn_blocking(move || {
            let ack = move |offset: u64| {
                if let Some(a) = &acks {
                    let _ = a.send(offset);
                }
            };
            run_partition_with(Box::new(task), store, &stream, p, rx, &opts, &ack).map(|r| (p, r))
        }));
    }
    let mut reports = Vec::new();
    for r in runs {
        reports.push(
            r.await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| fail(e.to_string()))?,
        );
    }
    Ok(reports)
}

/// One line of `medfed node status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionStatus {
    pub stream: String,
    pub partition: u32,
    pub offset: u64,
    pub processed: u64,
    pub quarantined: u64,
    /// Rows not yet processed, when the source can tell (CSV files).
    pub lag: Option<u64>,
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

/// Opens the node's store.
pub fn open_store(state: &StateConfig) -> Result<Arc<dyn Store>, store::StoreError> {
    if let Some(parent) = state.dir.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::create_dir_all(&state.dir);
    Ok(Arc::from(store::open(
        state.backend,
        &state.dir.join(format!("{}.db", state.backend.name())),
    )?))
}
