//! Ingestion pipelines declared in `node.toml` (`[[ingest]]`): a source (CSV file or
//! directory, FHIR export, NATS JetStream), its partitioning, and the task that folds the
//! records into the node's state, one task instance per partition, checkpointed in the
//! node's store (`[state]`). `medfed node ingest` runs them; `medfed node status` shows
//! where each partition stands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use medfed_infra::store::{self, Backend, Store};
use serde::{Deserialize, Serialize};

use crate::deid::pseudonym::{Keystore, Pseudonymizer};
use crate::deid::safe_harbor::Date;
use crate::deid::{
    AlertRule, Alerts, Deidentify, DeidentifyConfig, DeriveSpec, Features, FieldClass, FieldSpec,
    OneHotSpec, Standardization, ValidateClean, WindowSpec,
};
use crate::runtime::csv_source::{self, CsvOptions, Partitioning};
use crate::runtime::fhir_source::{self, FhirMapping};
#[cfg(feature = "jetstream")]
use crate::runtime::jetstream_source::{self, JetStreamPartition};
use crate::runtime::omop_source::{self, OmopConfig};
use crate::runtime::progress::Progress;
use crate::runtime::{
    Chain, ColumnStats, Envelope, KvState, MessageCollector, RunOptions, StreamTask,
    TaskCoordinator, TaskError, restore, run_partition_for,
};

pub mod quarantine;
pub mod ready;
mod status;

pub use status::{PartitionStatus, status, throughput_limit, timings};

/// The output stream of de-identified records, kept in the node's store.
pub const RECORDS_STREAM: &str = "records";

/// Keeps each de-identified record in the node's store (output stream `records`, in
/// segments of one checkpoint's records): the last task of a de-identifying pipeline.
struct KeepRecords;

impl StreamTask for KeepRecords {
    fn process(
        &mut self,
        env: &Envelope,
        state: &mut KvState,
        out: &mut MessageCollector,
        coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        match crate::deid::Record::decode(&env.payload) {
            Ok(record) => self.process_record(env, record, state, out, coord),
            Err(why) => {
                out.dead_letter(env, why);
                Ok(())
            }
        }
    }

    fn process_record(
        &mut self,
        _env: &Envelope,
        record: crate::deid::Record,
        _state: &mut KvState,
        out: &mut MessageCollector,
        _coord: &mut TaskCoordinator,
    ) -> Result<(), TaskError> {
        out.send_record(RECORDS_STREAM, record);
        Ok(())
    }
}

/// `[state]`: where the node keeps its durable state.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The store's directory (default `state`, relative to `node.toml`).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// The store's backend (default: [`Backend::DEFAULT`]).
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// This site's pseudonym keys (`medfed node init` makes it; mode 0600; never sent).
    #[serde(default = "default_keystore")]
    pub keystore: PathBuf,
}

fn default_state_dir() -> PathBuf {
    "state".into()
}
fn default_keystore() -> PathBuf {
    "keystore/pseudonym-keys.toml".into()
}
fn default_backend() -> Backend {
    Backend::DEFAULT
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
            backend: default_backend(),
            keystore: default_keystore(),
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
    /// Which Observation and Condition codes of the FHIR export become which columns.
    #[serde(default)]
    pub fhir_mapping: Option<FhirMapping>,
    /// A NATS JetStream source.
    #[serde(default)]
    pub jetstream: Option<JetStreamConfig>,
    /// An OMOP CDM v5.4 database on PostgreSQL (`[ingest.omop]`): one record per person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omop: Option<OmopConfig>,
    /// The built-in task: count, sum and sum of squares of these numeric columns (of the
    /// de-identified records, when fields are declared).
    pub columns: Vec<String>,
    /// The input's columns (`[[ingest.field]]`). When declared, every record is validated,
    /// cleaned and de-identified first, only declared columns go on, and the de-identified
    /// records are kept in the node's store (stream `records`).
    #[serde(default, rename = "field")]
    pub fields: Vec<FieldSpec>,
    /// How the declared fields are de-identified (`[ingest.deidentify]`).
    #[serde(default)]
    pub deidentify: DeidentifyConfig,
    /// Derived values (`[[ingest.derive]]`), e.g. BMI from weight and height.
    #[serde(default)]
    pub derive: Vec<DeriveSpec>,
    /// One-hot encodings of categories (`[[ingest.one_hot]]`).
    #[serde(default)]
    pub one_hot: Vec<OneHotSpec>,
    /// Standardization by federated statistics (`[ingest.standardize.COLUMN]`).
    #[serde(default)]
    pub standardize: BTreeMap<String, Standardization>,
    /// Per-patient windowed aggregates (`[[ingest.window]]`), to the `features` stream.
    #[serde(default, rename = "window", skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<WindowSpec>,
    /// Alert rules (`[[ingest.alert]]`), to the `alerts` stream; alerts stay in the hospital.
    #[serde(default, rename = "alert")]
    pub alerts: Vec<AlertRule>,
    /// Approved models scoring every record (`[[ingest.score]]`), after the features: the
    /// score is kept with the record, above a threshold it is an alert too; scores never
    /// leave the hospital.
    #[serde(default, rename = "score", skip_serializing_if = "Vec::is_empty")]
    pub scores: Vec<crate::deid::ScoreSpec>,
    /// Seconds between window emissions while following an unbounded input.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Records between two checkpoints of a partition (default 10,000; at least 1).
    #[serde(default = "default_commit_every")]
    pub commit_every: u64,
    /// For the site's data stewards: also append each quarantined record's raw input line
    /// to this file (CSV: stream, partition, offset, line; created mode 0600, never readable
    /// by other users). Off by default: dead letters keep only the reason, the field and
    /// the patient's pseudonym.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_rejects: Option<PathBuf>,
}

/// `[ingest.jetstream]`: a NATS JetStream source, one durable consumer per partition.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    /// The NATS server, `nats://host:port`.
    pub url: String,
    /// The JetStream stream's name.
    pub stream: String,
    /// Partition `p` is subject `<subject_prefix>.<p>`.
    pub subject_prefix: String,
    /// The stream's partitions (subjects).
    pub partitions: u32,
    /// This worker's index and the number of workers sharing the stream: worker `k` takes
    /// the partitions `p` with `p % workers == k`.
    #[serde(default)]
    pub worker: u32,
    /// Workers sharing the stream (default 1).
    #[serde(default = "one")]
    pub workers: u32,
    /// Seconds the server waits for an acknowledgement before redelivering (default 30).
    #[serde(default = "default_ack_wait")]
    pub ack_wait_secs: u64,
    /// Stop after this many seconds without a new message, once the server holds none still
    /// to deliver (bounded ingestion); forever if absent.
    #[serde(default)]
    pub idle_exit_secs: Option<u64>,
}

fn one() -> u32 {
    1
}
fn default_commit_every() -> u64 {
    10_000
}
fn default_window_secs() -> u64 {
    10
}
fn default_ack_wait() -> u64 {
    30
}

/// Why an ingestion pipeline could not be set up or run; names the pipeline.
#[derive(Debug, thiserror::Error)]
#[error("ingest '{stream}': {detail}")]
pub struct IngestError {
    /// The pipeline's `stream`.
    pub stream: String,
    /// What went wrong.
    pub detail: String,
}

impl IngestConfig {
    /// Makes the pipeline's file paths (CSV, FHIR export, restricted ZIP3 list, raw rejects)
    /// relative to the configuration file's directory.
    pub fn resolve(&mut self, config_path: &Path) {
        for p in [
            &mut self.csv,
            &mut self.fhir,
            &mut self.deidentify.restricted_zip3,
            &mut self.raw_rejects,
        ]
        .into_iter()
        .chain(
            self.omop
                .iter_mut()
                .flat_map(|o| [&mut o.password_file, &mut o.ca]),
        )
        .flatten()
        {
            *p = medfed_infra::config::resolve(config_path, p);
        }
        for s in &mut self.scores {
            s.resolve(config_path);
        }
    }

    /// Checks the declaration; the message names the stream.
    pub fn validate(&self) -> Result<(), String> {
        let sources = [
            self.csv.is_some(),
            self.fhir.is_some(),
            self.jetstream.is_some(),
            self.omop.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if sources != 1 {
            return Err("needs exactly one source: csv, fhir, jetstream or omop".into());
        }
        if self.fhir.is_some() && self.fhir_mapping.is_none() {
            return Err("a fhir source needs a fhir_mapping".into());
        }
        if let Some(omop) = &self.omop {
            omop.validate()?;
        }
        if (self.columns.is_empty() && self.fields.is_empty())
            || self.commit_every == 0
            || self.partitions == 0
        {
            return Err(
                "needs columns (or declared fields), and commit_every and partitions of at least 1"
                    .into(),
            );
        }
        let has = |name: &str| self.fields.iter().any(|f| f.name == name);
        if !self.fields.is_empty() {
            let mut seen = std::collections::BTreeSet::new();
            for f in &self.fields {
                if !seen.insert(&f.name) {
                    return Err(format!("field '{}' is declared twice", f.name));
                }
            }
            for c in &self.columns {
                let derived = self.derive.iter().any(|d| &d.name == c)
                    || self
                        .one_hot
                        .iter()
                        .any(|h| c.starts_with(&format!("{}_", h.column)));
                if !has(c) && !derived && !c.ends_with("_missing") {
                    return Err(format!(
                        "column '{c}' is neither a declared field nor derived"
                    ));
                }
                if let Some(f) = self.fields.iter().find(|f| &f.name == c)
                    && matches!(f.class, FieldClass::PatientId | FieldClass::Identifier)
                {
                    return Err(format!(
                        "column '{c}' is an identifier: it is removed, and cannot be counted"
                    ));
                }
            }
        } else if !(self.derive.is_empty()
            && self.one_hot.is_empty()
            && self.standardize.is_empty()
            && self.windows.is_empty()
            && self.alerts.is_empty()
            && self.scores.is_empty())
        {
            return Err(
                "derive, one_hot, standardize, window, alert and score need the input's fields declared ([[ingest.field]])"
                    .into(),
            );
        }
        let mut outputs = std::collections::BTreeSet::new();
        for s in &self.scores {
            if s.output.is_empty() || !outputs.insert(s.output.as_str()) {
                return Err(format!(
                    "score output {:?} is empty or used twice",
                    s.output
                ));
            }
            if self.fields.iter().any(|f| f.name == s.output) {
                return Err(format!(
                    "score output '{}' is also an input field: name the score anew",
                    s.output
                ));
            }
            if s.alert_above.is_some_and(|a| !a.is_finite()) {
                return Err(format!(
                    "score '{}': alert_above must be a number",
                    s.output
                ));
            }
        }
        if self.commit_every > MAX_COMMIT_EVERY {
            return Err(format!(
                "commit_every is {}; at most {MAX_COMMIT_EVERY} (a checkpoint's records are held in memory until it is written)",
                self.commit_every
            ));
        }
        if self.window_secs == 0 {
            return Err("window_secs must be at least 1".into());
        }
        if self.jetstream.is_some() && !cfg!(feature = "jetstream") {
            return Err(JETSTREAM_NOT_BUILT.into());
        }
        if let Some(js) = &self.jetstream
            && (js.workers == 0 || js.worker >= js.workers || js.partitions == 0)
        {
            return Err("jetstream needs partitions >= 1 and worker < workers".into());
        }
        Ok(())
    }
}

/// The most records between two checkpoints.
pub const MAX_COMMIT_EVERY: u64 = 1_000_000;

/// Why a jetstream source is refused by a build without the feature.
const JETSTREAM_NOT_BUILT: &str = "a jetstream source needs the NATS JetStream connector, which is \
     not in this build of medfed: build it with the cargo feature `jetstream` (on by default; \
     cargo build --release --features jetstream)";

/// A partition of a pipeline and how to open it.
pub(crate) enum Part {
    Csv {
        path: PathBuf,
        opts: CsvOptions,
    },
    Fhir(PathBuf, FhirMapping),
    Omop(Box<OmopConfig>),
    #[cfg(feature = "jetstream")]
    Jet(JetStreamPartition),
}

pub(crate) fn parts(cfg: &IngestConfig) -> Result<Vec<(u32, Part)>, String> {
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
    if let Some(omop) = &cfg.omop {
        return Ok(vec![(0, Part::Omop(Box::new(omop.clone())))]);
    }
    jetstream_parts(cfg)
}

#[cfg(not(feature = "jetstream"))]
fn jetstream_parts(_: &IngestConfig) -> Result<Vec<(u32, Part)>, String> {
    Err(JETSTREAM_NOT_BUILT.into())
}

#[cfg(feature = "jetstream")]
fn jetstream_parts(cfg: &IngestConfig) -> Result<Vec<(u32, Part)>, String> {
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
                    fetch: Default::default(),
                }),
            )
        })
        .collect())
}

/// Runs every partition of `cfg` (one task instance each, concurrently) until its input ends.
pub async fn run(
    cfg: &IngestConfig,
    store: Arc<dyn Store>,
    keystore: &Path,
) -> Result<Vec<(u32, crate::runtime::PartitionReport)>, IngestError> {
    run_reporting(cfg, store, keystore, None).await
}

/// As [`run`], telling `readiness` when each partition has caught up with its input and
/// when the pipeline fails (a node serves the pipeline's datasets from then on).
pub async fn run_reporting(
    cfg: &IngestConfig,
    store: Arc<dyn Store>,
    keystore: &Path,
    readiness: Option<Arc<ready::Readiness>>,
) -> Result<Vec<(u32, crate::runtime::PartitionReport)>, IngestError> {
    run_with_progress(cfg, store, keystore, readiness, None).await
}

/// As [`run_reporting`], counting what the partitions process into `progress` (and the
/// input's size, where it is known, for the share read and the time left).
pub async fn run_with_progress(
    cfg: &IngestConfig,
    store: Arc<dyn Store>,
    keystore: &Path,
    readiness: Option<Arc<ready::Readiness>>,
    progress: Option<Arc<Progress>>,
) -> Result<Vec<(u32, crate::runtime::PartitionReport)>, IngestError> {
    let result = run_inner(cfg, store, keystore, readiness.clone(), progress).await;
    if let (Some(r), Err(e)) = (&readiness, &result) {
        r.failed(&cfg.stream, e.to_string());
    }
    result
}

async fn run_inner(
    cfg: &IngestConfig,
    store: Arc<dyn Store>,
    keystore: &Path,
    readiness: Option<Arc<ready::Readiness>>,
    progress: Option<Arc<Progress>>,
) -> Result<Vec<(u32, crate::runtime::PartitionReport)>, IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    let pseudonymizer = if cfg.fields.iter().any(|f| f.class == FieldClass::PatientId) {
        Some(
            Keystore::open(keystore)
                .map_err(|e| fail(e.to_string()))?
                .pseudonymizer(),
        )
    } else {
        None
    };
    quarantine::scrub_earlier(cfg, &*store)?;
    let raw_rejects = match &cfg.raw_rejects {
        Some(path) => Some(quarantine::RawRejects::open(path).map_err(|e| {
            fail(format!(
                "cannot open the raw rejects file {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    // One set of signals per pipeline: a task's AllTasks commit or shutdown reaches every
    // partition.
    let signals = Arc::new(match &progress {
        Some(p) => crate::runtime::PipelineSignals::with_progress(p.clone()),
        None => crate::runtime::PipelineSignals::default(),
    });
    let mut runs = Vec::new();
    let parts = parts(cfg).map_err(fail)?;
    if let Some(progress) = &progress {
        expect_input(cfg, &*store, &parts, progress);
    }
    // One flag per partition, set by its runner once it has caught up; a watcher tells
    // `readiness` as each is.
    let flags: Vec<Arc<std::sync::atomic::AtomicBool>> =
        parts.iter().map(|_| Arc::default()).collect();
    if let Some(r) = &readiness {
        r.starting(&cfg.stream, parts.len());
        let (r, flags, stream) = (r.clone(), flags.clone(), cfg.stream.clone());
        tokio::spawn(async move {
            let mut told = vec![false; flags.len()];
            while told.iter().any(|t| !t)
                && !matches!(r.stage(&stream), Some(ready::Stage::Failed(_)))
            {
                for (f, t) in flags.iter().zip(told.iter_mut()) {
                    if !*t && f.load(std::sync::atomic::Ordering::Relaxed) {
                        *t = true;
                        r.partition_caught_up(&stream);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    // The partitions of one CSV file split by key share one reader: each row is read once.
    let mut shared: BTreeMap<u32, (Vec<String>, crate::runtime::Input)> = BTreeMap::new();
    if let Some((_, Part::Csv { path, opts })) = parts.first()
        && matches!(opts.partitioning, Partitioning::ByKey { .. })
    {
        let mut from = Vec::new();
        for (p, _) in &parts {
            let (offset, ..) =
                restore(&*store, &cfg.stream, *p).map_err(|e| fail(e.to_string()))?;
            from.push((*p, offset));
        }
        let (header, rxs) = csv_source::read_partitions_reporting(
            path,
            &cfg.stream,
            &from,
            opts,
            Some(signals.source_failure(&parts.iter().map(|(p, _)| *p).collect::<Vec<_>>())),
        )
        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        for ((p, _), rx) in from.into_iter().zip(rxs) {
            shared.insert(p, (header.clone(), rx));
        }
    }
    for ((p, part), caught_up) in parts.into_iter().zip(flags) {
        let (offset, _, processed, _) =
            restore(&*store, &cfg.stream, p).map_err(|e| fail(e.to_string()))?;
        // Where a source reports each durable checkpoint's offset (JetStream acknowledges the
        // messages it covers); files need no acknowledgement.
        let (header, rx, acks): (_, _, Option<tokio::sync::mpsc::UnboundedSender<u64>>) = match part
        {
            Part::Csv { path, opts } => {
                let (h, rx) = match shared.remove(&p) {
                    Some(reader) => reader,
                    None => csv_source::read_with_reporting(
                        &path,
                        &cfg.stream,
                        p,
                        offset,
                        &opts,
                        Some(signals.source_failure(&[p])),
                    )
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?,
                };
                (h, rx, None)
            }
            Part::Fhir(dir, mapping) => {
                let (h, rx) = fhir_source::read(&dir, &mapping, &cfg.stream, p, offset)
                    .map_err(|e| fail(e.to_string()))?;
                (h, rx.into(), None)
            }
            Part::Omop(omop) => {
                // A database failure after the start ends the partition with what it has
                // checkpointed, and fails the pipeline (not "input ended").
                let (h, rx) = omop_source::read(
                    &omop,
                    &cfg.stream,
                    p,
                    offset,
                    processed,
                    signals.source_failure(&[p]),
                )
                .await
                .map_err(|e| fail(e.to_string()))?;
                (h, rx.into(), None)
            }
            #[cfg(feature = "jetstream")]
            Part::Jet(js) => {
                let (rx, acks) = jetstream_source::subscribe(&js, &cfg.stream, p, offset)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                // JetStream payloads are CSV rows in the configured column order.
                (cfg.columns.clone(), rx.into(), Some(acks))
            }
        };
        let mut task =
            build_task(cfg, &header, pseudonymizer.as_ref()).map_err(|e| fail(e.to_string()))?;
        if let Some(sink) = &raw_rejects {
            task = Box::new(quarantine::KeepRawRejects {
                inner: task,
                sink: sink.clone(),
            });
        }
        let (store, stream, opts) = (
            store.clone(),
            cfg.stream.clone(),
            RunOptions {
                commit_every: cfg.commit_every,
                window: (!cfg.windows.is_empty()).then(|| Duration::from_secs(cfg.window_secs)),
                signals: Some(signals.clone()),
                checkpoint_when_idle: true,
                caught_up: Some(caught_up),
            },
        );
        runs.push(tokio::task::spawn_blocking(move || {
            // A source that acknowledges (JetStream) has each checkpoint waited for and
            // acknowledged at once; the others' checkpoints commit while records go on.
            let ack = acks.map(|a| {
                move |offset: u64| {
                    if a.send(offset).is_err() {
                        tracing::debug!(
                            "the source is gone; checkpoint at {offset} not acknowledged"
                        );
                    }
                }
            });
            let ack_ref: Option<&dyn Fn(u64)> = ack.as_ref().map(|a| a as &dyn Fn(u64));
            run_partition_for(task, store, &stream, p, rx, &opts, ack_ref)
                .map(|r| (p, r))
                .map_err(|e| format!("partition {p}: {e}"))
        }));
    }
    let mut reports = Vec::new();
    for r in runs {
        reports.push(r.await.map_err(|e| fail(e.to_string()))?.map_err(fail)?);
    }
    Ok(reports)
}

/// Tells `progress` the input's size: the CSV files' bytes, when every partition starts
/// from the beginning (a resumed run, or another source, shows its rate without the share
/// read).
fn expect_input(cfg: &IngestConfig, store: &dyn Store, parts: &[(u32, Part)], progress: &Progress) {
    let mut files = std::collections::BTreeSet::new();
    for (p, part) in parts {
        let Part::Csv { path, .. } = part else {
            return;
        };
        if !matches!(restore(store, &cfg.stream, *p), Ok((0, ..))) {
            return;
        }
        files.insert(path.clone());
    }
    let bytes = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    progress.expect_bytes(bytes);
}

/// Today's date (UTC), for ages computed from birth dates.
pub fn today() -> Date {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Date::from_days((secs / 86_400) as i64)
}

/// The task a pipeline runs on each partition: without declared fields, the column
/// statistics of CSV rows; with them, validate and clean → de-identify → alerts →
/// features → keep the records → column statistics.
pub fn build_task(
    cfg: &IngestConfig,
    header: &[String],
    pseudonymizer: Option<&Pseudonymizer>,
) -> Result<Box<dyn StreamTask>, TaskError> {
    let columns: Vec<&str> = cfg.columns.iter().map(String::as_str).collect();
    if cfg.fields.is_empty() {
        return Ok(Box::new(ColumnStats::new(header, &columns)?));
    }
    let mut tasks: Vec<Box<dyn StreamTask>> = vec![
        Box::new(ValidateClean::new(header, &cfg.fields)?.with_pseudonyms(pseudonymizer.cloned())),
        Box::new(Deidentify::new(
            &cfg.fields,
            &cfg.deidentify,
            pseudonymizer.cloned(),
            today(),
        )?),
    ];
    if !cfg.alerts.is_empty() {
        tasks.push(Box::new(Alerts::new(cfg.alerts.clone())?));
    }
    if !(cfg.derive.is_empty()
        && cfg.one_hot.is_empty()
        && cfg.standardize.is_empty()
        && cfg.windows.is_empty())
    {
        tasks.push(Box::new(Features::new(
            cfg.derive.clone(),
            cfg.one_hot.clone(),
            cfg.standardize.clone(),
            cfg.windows.clone(),
        )?));
    }
    if !cfg.scores.is_empty() {
        tasks.push(Box::new(crate::deid::Score::new(&cfg.scores)?));
    }
    tasks.push(Box::new(ColumnStats::over_records(&columns)));
    tasks.push(Box::new(KeepRecords));
    Ok(Box::new(Chain::new(tasks)))
}

/// The de-identified records a pipeline has kept, in input order.
pub fn kept_records(
    cfg: &IngestConfig,
    store: &dyn Store,
) -> Result<Vec<crate::deid::Record>, IngestError> {
    let mut out = Vec::new();
    for_each_kept(cfg, store, &mut |_, records| {
        out.extend(records);
        Ok(())
    })?;
    Ok(out)
}

/// Hands the de-identified records a pipeline has kept to `each`, in input order, read
/// from the store a segment at a time ([`kept_records`] without holding them all).
pub fn for_each_kept_record(
    cfg: &IngestConfig,
    store: &dyn Store,
    each: &mut dyn FnMut(crate::deid::Record),
) -> Result<(), IngestError> {
    for_each_kept(cfg, store, &mut |_, records| {
        records.into_iter().for_each(&mut *each);
        Ok(())
    })
}

/// Records per partition a stable id can tell apart (2^24).
const RECORDS_PER_PARTITION: u32 = 1 << 24;

/// The kept records with an id that stays the same as more records arrive: the partition
/// in the high 8 bits, the record's place in its partition in the low 24. (Records are only
/// ever appended, so a record's place does not change.)
pub fn kept_records_with_ids(
    cfg: &IngestConfig,
    store: &dyn Store,
) -> Result<Vec<(u32, crate::deid::Record)>, IngestError> {
    let mut out = Vec::new();
    for_each_kept_with_ids(cfg, store, &mut |id, record| out.push((id, record)))?;
    Ok(out)
}

/// The kept records as a dataset's table ([`crate::data::Table::from_records`] of
/// [`kept_records_with_ids`]), read a segment at a time: the records are never all in
/// memory beside the table. `source` names the table in errors.
pub fn kept_table(
    cfg: &IngestConfig,
    store: &dyn Store,
    source: &std::path::Path,
) -> Result<crate::data::Table, IngestError> {
    let mut table = crate::data::TableBuilder::new(source);
    for_each_kept_with_ids(cfg, store, &mut |id, record| table.push(id, &record))?;
    Ok(table.finish())
}

/// How many records a pipeline has kept, counted from the stored segments' headers
/// without decoding them (a header that cannot be read is an error; the rest of a
/// segment is checked when a study reads the dataset).
pub fn kept_count(cfg: &IngestConfig, store: &dyn Store) -> Result<usize, IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    let mut n = 0;
    for (p, _) in parts(cfg).map_err(fail)? {
        let ns = format!("output/{RECORDS_STREAM}/{}/{p}", cfg.stream);
        let mut failed = None;
        store
            .scan_each(
                &ns,
                &mut |_, v| match crate::runtime::record::records_begun(v) {
                    Ok(k) => {
                        n += k;
                        std::ops::ControlFlow::Continue(())
                    }
                    Err(e) => {
                        failed = Some(e);
                        std::ops::ControlFlow::Break(())
                    }
                },
            )
            .map_err(|e| fail(e.to_string()))?;
        if let Some(e) = failed {
            return Err(fail(format!("partition {p}'s kept records: {e}")));
        }
    }
    Ok(n)
}

/// Hands each kept record, with its stable id ([`kept_records_with_ids`]), to `each`.
fn for_each_kept_with_ids(
    cfg: &IngestConfig,
    store: &dyn Store,
    each: &mut dyn FnMut(u32, crate::deid::Record),
) -> Result<(), IngestError> {
    let mut place: Option<(u32, u32)> = None;
    for_each_kept(cfg, store, &mut |p, records| {
        let at = match place {
            Some((q, at)) if q == p => at,
            _ => 0,
        };
        let too_many = |why: String| IngestError {
            stream: cfg.stream.clone(),
            detail: format!(
                "{why}: a dataset reads at most 256 partitions of {RECORDS_PER_PARTITION} records"
            ),
        };
        if p > 255 {
            return Err(too_many(format!("it has a partition {p}")));
        }
        let after = u32::try_from(records.len())
            .ok()
            .and_then(|n| at.checked_add(n))
            .filter(|&n| n <= RECORDS_PER_PARTITION)
            .ok_or_else(|| {
                too_many(format!(
                    "partition {p} holds at least {} records",
                    u64::from(at) + records.len() as u64
                ))
            })?;
        for (i, r) in records.into_iter().enumerate() {
            each(p * RECORDS_PER_PARTITION + at + i as u32, r);
        }
        place = Some((p, after));
        Ok(())
    })
}

/// The alerts a pipeline raised (`[[ingest.alert]]`, `[[ingest.score]]`), partition by
/// partition in input order: each a record with the patient's pseudonym and the reason.
pub fn alerts(
    cfg: &IngestConfig,
    store: &dyn Store,
) -> Result<Vec<crate::deid::Record>, IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    let mut out = Vec::new();
    for (p, _) in parts(cfg).map_err(fail)? {
        let ns = format!("output/{}/{}/{p}", crate::deid::ALERTS_STREAM, cfg.stream);
        for (_, v) in store.scan(&ns).map_err(|e| fail(e.to_string()))? {
            out.push(
                crate::deid::Record::decode(&v)
                    .map_err(|e| fail(format!("partition {p}'s alerts: {e}")))?,
            );
        }
    }
    Ok(out)
}

/// The field names of a pipeline's kept records, in name order (the columns of its
/// dataset's table, [`kept_table`]), read from the stored segments without decoding their
/// values: what a node tells the aggregator it can serve, without building the table.
pub fn kept_columns(cfg: &IngestConfig, store: &dyn Store) -> Result<Vec<String>, IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    let mut names = std::collections::BTreeSet::new();
    for (p, _) in parts(cfg).map_err(fail)? {
        let ns = format!("output/{RECORDS_STREAM}/{}/{p}", cfg.stream);
        let mut decoder = crate::runtime::record::ChunkedDecoder::default();
        let mut collect = |whole: &[u8]| {
            names.extend(crate::runtime::record::stored_field_names(whole)?);
            Ok(())
        };
        let mut failed = None;
        store
            .scan_each(&ns, &mut |_, v| match decoder.push_with(v, &mut collect) {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    std::ops::ControlFlow::Break(())
                }
            })
            .map_err(|e| fail(e.to_string()))?;
        failed
            .map_or(Ok(()), Err)
            .and_then(|()| decoder.finish_with(&mut collect))
            .map_err(|e| fail(format!("partition {p}'s kept records: {e}")))?;
    }
    Ok(names.into_iter().collect())
}

/// Hands each partition's kept records to `each`, partition by partition in input order,
/// a stored segment at a time: never all of them at once (a dataset of tens of millions
/// of records would not fit in memory).
fn for_each_kept(
    cfg: &IngestConfig,
    store: &dyn Store,
    each: &mut dyn FnMut(u32, Vec<crate::deid::Record>) -> Result<(), IngestError>,
) -> Result<(), IngestError> {
    let fail = |detail: String| IngestError {
        stream: cfg.stream.clone(),
        detail,
    };
    for (p, _) in parts(cfg).map_err(fail)? {
        let ns = format!("output/{RECORDS_STREAM}/{}/{p}", cfg.stream);
        let mut decoder = crate::runtime::record::ChunkedDecoder::default();
        let mut failed = None;
        let mut take = |records: Result<Vec<crate::deid::Record>, String>| {
            records
                .map_err(|e| fail(format!("partition {p}'s kept records: {e}")))
                .and_then(|records| match records.is_empty() {
                    true => Ok(()),
                    false => each(p, records),
                })
        };
        store
            .scan_each(&ns, &mut |_, v| match take(decoder.push(v)) {
                Ok(()) => std::ops::ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    std::ops::ControlFlow::Break(())
                }
            })
            .map_err(|e| fail(e.to_string()))?;
        if let Some(e) = failed {
            return Err(e);
        }
        take(decoder.finish())?;
    }
    Ok(())
}

/// Opens the node's store, creating the state directory (mode 0700) if needed.
pub fn open_store(state: &StateConfig) -> Result<Arc<dyn Store>, store::StoreError> {
    let path = state.dir.join(format!("{}.db", state.backend.name()));
    medfed_infra::files::create_private_dir(&state.dir).map_err(|e| {
        store::StoreError::Backend {
            path: path.clone(),
            backend: state.backend.name(),
            detail: format!(
                "cannot create the state directory {}: {e}",
                state.dir.display()
            ),
        }
    })?;
    Ok(Arc::from(store::open(state.backend, &path)?))
}
