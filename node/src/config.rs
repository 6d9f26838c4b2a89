//! `node.toml`: who this site is, where the aggregator is, which local datasets it serves.
//!
//! Every key is documented in `docs/samples/node.toml`, which a test parses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use medfed_infra::config::{
    AuditFiles, ConfigError, TlsFiles, file_sha256, load_toml, require_file, resolve,
};
use serde::{Deserialize, Serialize};

/// A hospital node's configuration, `node.toml`, as loaded and checked by
/// [`NodeConfig::load`] (relative paths resolved against the file's directory).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This hospital's site name; must equal the common name of its certificate.
    pub site: String,
    /// Where the aggregator is (`[aggregator]`).
    pub aggregator: AggregatorAddress,
    /// This site's certificate, key, the consortium CA and its revocation list (`[tls]`).
    pub tls: TlsFiles,
    /// The compliance log (default: `audit/compliance.log`, key `audit/signing.key`).
    #[serde(default)]
    pub audit: AuditFiles,
    /// Which studies this site serves (none unless approved; see `policy`).
    #[serde(default)]
    pub policy: crate::policy::Policy,
    /// The datasets this site serves (`[[dataset]]`, at least one, names unique).
    #[serde(rename = "dataset")]
    pub datasets: Vec<DatasetConfig>,
    /// The node's durable state (store directory and backend).
    #[serde(default)]
    pub state: crate::ingest::StateConfig,
    /// Ingestion pipelines (`medfed node ingest`).
    #[serde(default, rename = "ingest")]
    pub ingests: Vec<crate::ingest::IngestConfig>,
    /// Backoff and liveness of the connection to the aggregator (`[reconnect]`).
    #[serde(default)]
    pub reconnect: Reconnect,
    /// Largest frame accepted or sent, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// SHA-256 of the file this was loaded from (for the compliance log).
    #[serde(skip)]
    pub config_sha256: String,
}

/// `[aggregator]`: the aggregator this node dials.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorAddress {
    /// `host:port` of the aggregator's QUIC endpoint (the node dials out; it opens no port).
    pub address: String,
    /// The name on the aggregator's certificate (defaults to the host part of the address
    /// dialled).
    #[serde(default)]
    pub server_name: Option<String>,
    /// The other instances of a highly available aggregator (`host:port` each; the
    /// aggregators' `[ha]`). Only one instance is active at a time: a standby answers with
    /// the active one's address, and the node moves there (or to the next address) on its
    /// own.
    #[serde(default)]
    pub others: Vec<String>,
}

/// `[[dataset]]`: a local dataset studies may use, from a CSV file or an ingest pipeline.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The name studies refer to.
    pub name: String,
    /// A CSV file with a header row (relative to this file). Either this or `ingest`.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    /// The `stream` of an `[[ingest]]` pipeline: studies use the de-identified records it
    /// has kept (a snapshot when each study is accepted), not a raw file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<String>,
    /// What this dataset may release WITHOUT differential privacy (default: nothing).
    /// `"statistics"`: exact statistics queries (secure aggregation, small-cell and
    /// complementary suppression, differencing checks); `"training"`: training studies
    /// without `[study.privacy]` (their models, losses and evaluations, summed under secure
    /// aggregation). Every other release carries noise and is charged to the budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exact_releases: Vec<ExactRelease>,
    /// Column classes (`identifier`, `patient-id`, `birth-date`, `date`, `zip`, `age`,
    /// `value`), e.g. `{ mrn = "patient-id", dob = "birth-date" }`: columns of the first
    /// five are never used by a study or a query. Unclassed columns are classed by their
    /// name and values (see `medfed node check`); class one `value` to use it anyway.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub classes: BTreeMap<String, crate::deid::FieldClass>,
}

/// A kind of release a dataset may make without differential privacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExactRelease {
    /// Exact statistics queries (`"statistics"`).
    Statistics,
    /// Training studies without differential privacy (`"training"`).
    Training,
}

impl std::fmt::Display for ExactRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExactRelease::Statistics => "statistics",
            ExactRelease::Training => "training",
        })
    }
}

impl DatasetConfig {
    /// Whether this dataset may release `what` without noise.
    pub fn allows_exact(&self, what: ExactRelease) -> bool {
        self.exact_releases.contains(&what)
    }
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// `[reconnect]`: how the node reconnects, and how it tells the aggregator is gone.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Reconnect {
    /// First wait after a lost connection; doubles up to `max_backoff_ms`.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest wait between reconnection attempts, ms (default 30,000).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// A keep-alive this often holds the connection open through NATs and firewalls.
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// This long without a packet from the aggregator means it is gone: reconnect.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

impl Reconnect {
    /// The connection's keep-alive and idle timeout.
    pub fn liveness(&self) -> medfed_infra::transport::Liveness {
        medfed_infra::transport::Liveness {
            keep_alive: std::time::Duration::from_millis(self.keep_alive_ms),
            idle_timeout: std::time::Duration::from_millis(self.idle_timeout_ms),
        }
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
            keep_alive_ms: default_keep_alive_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

fn default_max_frame() -> u32 {
    medfed_protocol::DEFAULT_MAX_FRAME_BYTES
}
fn default_initial_backoff_ms() -> u64 {
    500
}
fn default_max_backoff_ms() -> u64 {
    30_000
}
fn default_keep_alive_ms() -> u64 {
    3_000
}
fn default_idle_timeout_ms() -> u64 {
    10_000
}

impl AggregatorAddress {
    /// The name the aggregator's certificate must hold: `server_name`, or the host part of
    /// `address` (without brackets for IPv6).
    pub fn server_name(&self) -> &str {
        self.server_name_for(&self.address)
    }

    /// As [`AggregatorAddress::server_name`], for the instance at `address`.
    pub fn server_name_for<'a>(&'a self, address: &'a str) -> &'a str {
        self.server_name
            .as_deref()
            .unwrap_or_else(|| match address.rsplit_once(':') {
                Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
                None => address,
            })
    }

    /// Every configured address: `address`, then `others`.
    pub fn all(&self) -> Vec<&str> {
        std::iter::once(self.address.as_str())
            .chain(self.others.iter().map(String::as_str))
            .collect()
    }
}

impl NodeConfig {
    /// Loads and checks `node.toml`: resolves relative paths, validates the site name, the
    /// aggregator's address, the datasets and ingest pipelines, and records the file's SHA-256.
    /// Errors name the file and the key.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let mut cfg: NodeConfig = load_toml(path)?;
        cfg.tls.resolve(path)?;
        cfg.audit.resolve(path);
        cfg.policy.resolve(path);
        cfg.state.dir = resolve(path, &cfg.state.dir);
        cfg.state.keystore = resolve(path, &cfg.state.keystore);
        for (i, ing) in cfg.ingests.iter_mut().enumerate() {
            ing.resolve(path);
            ing.validate().map_err(|why| ConfigError::Invalid {
                path: path.to_path_buf(),
                key: format!("ingest[{i}]"),
                why,
            })?;
        }
        cfg.config_sha256 = file_sha256(path);
        let invalid = |key: String, why: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            why,
        };
        medfed_infra::pki::validate_site_name(&cfg.site)
            .map_err(|e| invalid("site".into(), e.to_string()))?;
        if !cfg.aggregator.address.contains(':') {
            return Err(invalid(
                "aggregator.address".into(),
                format!("{:?} needs a port, as in host:4433", cfg.aggregator.address),
            ));
        }
        for (i, other) in cfg.aggregator.others.iter().enumerate() {
            if !other.contains(':') {
                return Err(invalid(
                    format!("aggregator.others[{i}]"),
                    format!("{other:?} needs a port, as in host:4433"),
                ));
            }
        }
        if cfg.datasets.is_empty() {
            return Err(invalid(
                "dataset".into(),
                "no dataset configured: add a [[dataset]] with name and path".into(),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, d) in cfg.datasets.iter_mut().enumerate() {
            if !names.insert(d.name.clone()) {
                return Err(invalid(
                    format!("dataset[{i}].name"),
                    format!("{:?} is used twice", d.name),
                ));
            }
            match (&d.ingest, path_is_empty(&d.path)) {
                (Some(stream), true) => {
                    if let Some(g) = cfg.ingests.iter().find(|g| &g.stream == stream)
                        && g.fields.is_empty()
                    {
                        return Err(invalid(
                            format!("dataset[{i}].ingest"),
                            format!(
                                "pipeline {stream:?} declares no [[ingest.field]], so it keeps no \
                                 de-identified records to learn from: declare its columns"
                            ),
                        ));
                    }
                    if !cfg.ingests.iter().any(|g| &g.stream == stream) {
                        return Err(invalid(
                            format!("dataset[{i}].ingest"),
                            format!(
                                "no [[ingest]] pipeline has stream = {stream:?} (configured: {})",
                                cfg.ingests
                                    .iter()
                                    .map(|g| format!("{:?}", g.stream))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                }
                (None, false) => {
                    d.path = resolve(path, &d.path);
                    require_file(path, &format!("dataset[{i}].path"), &d.path)?;
                }
                (Some(_), false) => {
                    return Err(invalid(
                        format!("dataset[{i}]"),
                        "has both path and ingest: a dataset is a CSV file or a pipeline's records, not both".into(),
                    ));
                }
                (None, true) => {
                    return Err(invalid(
                        format!("dataset[{i}]"),
                        "needs path (a CSV file) or ingest (an [[ingest]] pipeline's stream)"
                            .into(),
                    ));
                }
            }
        }
        if cfg.reconnect.initial_backoff_ms == 0
            || cfg.reconnect.max_backoff_ms < cfg.reconnect.initial_backoff_ms
        {
            return Err(invalid(
                "reconnect".into(),
                "needs 0 < initial_backoff_ms <= max_backoff_ms".into(),
            ));
        }
        cfg.policy
            .privacy
            .validate()
            .map_err(|why| invalid("policy.privacy".into(), why))?;
        if cfg.reconnect.idle_timeout_ms < 200
            || cfg.reconnect.keep_alive_ms == 0
            || cfg.reconnect.keep_alive_ms >= cfg.reconnect.idle_timeout_ms
        {
            return Err(invalid(
                "reconnect".into(),
                "needs 0 < keep_alive_ms < idle_timeout_ms, and idle_timeout_ms of at least 200"
                    .into(),
            ));
        }
        if cfg.max_frame_bytes < 1024 {
            return Err(invalid(
                "max_frame_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        Ok(cfg)
    }
}
