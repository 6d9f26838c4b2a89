//! `aggregator.toml`: what the aggregator listens on, whom it lets in, which studies it runs.
//!
//! Every key is documented in `docs/samples/aggregator.toml`, which a test parses.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use medfed_infra::config::{AuditFiles, ConfigError, TlsFiles, file_sha256, load_toml, resolve};
use medfed_protocol::model::{MAX_CLASSES, MIN_CLASSES, ModelFamily};
pub use medfed_protocol::study::config::{
    DpMechanism, PrivacyConfig, SchedulingConfig, SecureAggregationConfig, Selection, StudyConfig,
    TrainingConfig,
};
use medfed_protocol::study::config::{
    default_decision_timeout_secs, default_min_sites, default_round_timeout_secs,
    default_wait_for_sites_secs,
};
use serde::{Deserialize, Serialize};

/// The aggregator's configuration, `aggregator.toml`, as loaded and checked by
/// [`AggregatorConfig::load`] (relative paths resolved against the file's directory).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// A name for this aggregator, shown to nodes and in exported models.
    #[serde(default = "default_name")]
    pub name: String,
    /// UDP address to listen on for QUIC.
    pub listen: SocketAddr,
    /// Where exported models go (relative to this file).
    #[serde(default = "default_out_dir")]
    pub out_dir: PathBuf,
    /// Largest frame accepted or sent, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// The aggregator's certificate and key, the consortium CA and its revocation list (`[tls]`).
    pub tls: TlsFiles,
    /// The compliance log (default: `audit/compliance.log`, key `audit/signing.key`).
    #[serde(default)]
    pub audit: AuditFiles,
    /// The sites allowed to connect (`[sites]`).
    pub sites: Sites,
    /// The training studies to run, in order (`[[study]]`).
    #[serde(default, rename = "study")]
    pub studies: Vec<StudyConfig>,
    /// Where the aggregator checkpoints its studies (`[state]`), to resume after a crash.
    #[serde(default)]
    pub state: AggregatorState,
    /// The operations endpoint (`/healthz`, `/status`, `/metrics`); absent: none.
    #[serde(default)]
    pub ops: Option<OpsConfig>,
    /// Studies added while the aggregator runs (`medfed aggregator study create`).
    #[serde(default, rename = "studies")]
    pub studies_dir: StudiesDir,
    /// Statistics studies (`[[statistics]]`): descriptive statistics of a cohort.
    #[serde(default, rename = "statistics")]
    pub statistics: Vec<StatisticsConfig>,
    /// High availability (`[ha]`): this is one of several instances sharing their state in
    /// a NATS JetStream bucket, active while it holds the lease. Absent: a single
    /// aggregator with its local store (`[state]`), no NATS needed.
    #[serde(default)]
    pub ha: Option<HaConfig>,
    /// SHA-256 of the file this was loaded from (for the compliance log).
    #[serde(skip)]
    pub config_sha256: String,
}

/// Why `id` cannot name a study, if it cannot: ids name files (`out/models/<id>/`), URL
/// paths and metric labels, so they are 1 to 64 letters, digits, `-` and `_`.
pub fn study_id_problem(id: &str) -> Option<String> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (!ok).then(|| {
        format!(
            "{id:?} is not a study id: use 1 to 64 letters, digits, '-' and '_' (it names the \
             study's directory of models and its metrics)"
        )
    })
}

/// `[ha]`: one instance of a highly available aggregator (docs/high-availability.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// The NATS servers of the JetStream cluster (`nats://host:4222`, several for a cluster).
    pub nats: Vec<String>,
    /// The key-value bucket the instances share (created with `replicas` if missing).
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// This instance's name, different on each instance (in the lease and the logs).
    pub instance: String,
    /// The `host:port` nodes dial to reach this instance (a standby tells nodes the
    /// active one's).
    pub advertise: String,
    /// How long the lease holds without renewal, in milliseconds: a failover takes about
    /// this long. At least 1,000.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Replicas of the bucket (3 for a 3-server cluster, which then survives losing one).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// A NATS credentials file (`.creds`), if the servers require one (relative to this file).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
}

fn default_bucket() -> String {
    "medfed".into()
}
fn default_lease_ms() -> u64 {
    10_000
}
fn default_replicas() -> usize {
    3
}

impl HaConfig {
    /// Checks the section; the problem, named by its key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if self.nats.is_empty() {
            return Err((
                "ha.nats".into(),
                "lists no NATS server (e.g. [\"nats://10.0.0.5:4222\"])".into(),
            ));
        }
        for url in &self.nats {
            if let Err(e) = url.parse::<async_nats::ServerAddr>() {
                return Err((
                    "ha.nats".into(),
                    format!("{url:?} is not a NATS server URL ({e}), as in nats://10.0.0.5:4222"),
                ));
            }
        }
        if !token(&self.bucket) {
            return Err((
                "ha.bucket".into(),
                format!(
                    "{:?} may hold only letters, digits, '-' and '_'",
                    self.bucket
                ),
            ));
        }
        if !token(&self.instance) {
            return Err((
                "ha.instance".into(),
                format!(
                    "{:?} may hold only letters, digits, '-' and '_'",
                    self.instance
                ),
            ));
        }
        if !self.advertise.contains(':') {
            return Err((
                "ha.advertise".into(),
                format!(
                    "{:?} needs a port, as in host:4433 (the address nodes dial)",
                    self.advertise
                ),
            ));
        }
        if !(1_000..=600_000).contains(&self.lease_ms) {
            return Err((
                "ha.lease_ms".into(),
                format!("{} is outside 1000..=600000 (milliseconds)", self.lease_ms),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err((
                "ha.replicas".into(),
                format!("{} is outside 1..=5 (JetStream's limit)", self.replicas),
            ));
        }
        Ok(())
    }
}

/// `[state]`: the aggregator's durable state.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorState {
    /// The store directory (relative to this file).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// The store's backend (default: [`medfed_infra::store::Backend::DEFAULT`]).
    #[serde(default = "default_backend")]
    pub backend: medfed_infra::store::Backend,
}

fn default_state_dir() -> PathBuf {
    "aggregator-state".into()
}
fn default_backend() -> medfed_infra::store::Backend {
    medfed_infra::store::Backend::DEFAULT
}

impl Default for AggregatorState {
    fn default() -> Self {
        AggregatorState {
            dir: default_state_dir(),
            backend: default_backend(),
        }
    }
}

/// `[studies]`: a directory of study specs, one `<id>.toml` each, that the aggregator runs
/// after the configured ones; `<id>.stop` there stops a study at its next round.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StudiesDir {
    /// The directory of study specs (default `studies.d`, relative to this file).
    #[serde(default = "default_studies_dir")]
    pub dir: PathBuf,
    /// Keep serving after every study is done, waiting for new ones (default: exit).
    #[serde(default)]
    pub keep_serving: bool,
    /// While keeping serving: a study that failed for too few sites (say, not yet approved
    /// by enough hospitals) is announced again this many seconds later, and again after
    /// each failure, so an approval made since takes effect without a restart.
    #[serde(default = "default_retry_failed_secs")]
    pub retry_failed_secs: u64,
}

fn default_retry_failed_secs() -> u64 {
    30
}

fn default_studies_dir() -> PathBuf {
    "studies.d".into()
}

impl Default for StudiesDir {
    fn default() -> Self {
        StudiesDir {
            dir: default_studies_dir(),
            keep_serving: false,
            retry_failed_secs: default_retry_failed_secs(),
        }
    }
}

impl StudiesDir {
    /// The study specs in the directory, by file name; a spec that does not load is an
    /// error naming the file.
    pub fn specs(&self) -> Result<Vec<(PathBuf, StudyConfig)>, ConfigError> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(d) => d
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        files.sort();
        files
            .into_iter()
            .map(|p| load_toml::<StudyConfig>(&p).map(|s| (p, s)))
            .collect()
    }

    /// The file that asks the study `id` to stop.
    pub fn stop_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.stop"))
    }
}

/// `[ops]`: the HTTP operations endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OpsConfig {
    /// TCP address of the console, `/healthz`, `/status` and `/metrics` (loopback by
    /// default; anywhere else it needs `token_file`, `tls_cert` and `tls_key`).
    #[serde(default = "default_ops_listen")]
    pub listen: SocketAddr,
    /// A file holding a secret token (one line, mode 0600; relative to this file). Required
    /// when `listen` is not a loopback address: every request but `/healthz` must then carry
    /// it (`Authorization: Bearer <token>`, or HTTP Basic with it as the password).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The endpoint's certificate (PEM, then its chain; relative to this file): HTTPS.
    /// Required when `listen` is not a loopback address, so that the token and the pages
    /// do not cross the network in clear. The aggregator's certificate from the
    /// consortium PKI serves (`pki/aggregator/<host>/cert.pem`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl OpsConfig {
    /// The HTTPS server configuration of `tls_cert` and `tls_key`; `None` without them.
    /// A key others can read, or one that is not the certificate's, is refused, naming the
    /// file.
    pub fn tls(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        medfed_infra::files::check_private(&[medfed_infra::files::PrivatePath::new(
            "[ops] tls_key",
            key,
        )])
        .map_err(|e| e.to_string())?;
        let identity = medfed_infra::transport::Identity::load(cert, key)
            .map_err(|e| format!("[ops] tls_cert / tls_key: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("[ops] TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain, identity.key)
        .map_err(|e| format!("[ops] tls_cert / tls_key: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(std::sync::Arc::new(config)))
    }

    /// The token, read from `token_file`; `None` without one.
    pub fn token(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("[ops] token_file = {}: {e}", path.display()))?;
        let token = text.trim().to_string();
        if token.len() < 16 {
            return Err(format!(
                "[ops] token_file = {} holds a token of {} characters: use at least 16 random ones \
                 (e.g. `openssl rand -hex 24 > {}`)",
                path.display(),
                token.len(),
                path.display()
            ));
        }
        Ok(Some(token))
    }
}

fn default_ops_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// `[[statistics]]`: a statistics study, run after the training studies.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsConfig {
    /// The statistics study's id, unique among the aggregator's studies.
    pub id: String,
    /// The name of the sites' dataset to describe.
    pub dataset: String,
    /// Rows meeting every condition, e.g. `{ column = "age", op = ">=", value = 30 }` or
    /// `{ column = "type", op = "==", text = "Yes" }`.
    #[serde(default)]
    pub cohort: Vec<medfed_protocol::fedstats::Condition>,
    /// The columns, with bounds and histogram edges (`[[statistics.column]]`); none for a
    /// query that asks only for survival curves.
    #[serde(default, rename = "column")]
    pub columns: Vec<medfed_protocol::fedstats::StatColumn>,
    /// Kaplan–Meier curves of the cohort (`[statistics.survival]`).
    #[serde(default)]
    pub survival: Option<SurvivalConfig>,
    /// A Cox model of the survival part's time and event (`[statistics.cox]`), each site a
    /// stratum of its own; exact, under secure aggregation.
    #[serde(default)]
    pub cox: Option<CoxConfig>,
    /// Gradient-boosted trees (`[statistics.boosted_trees]`), grown from secure sums of the
    /// sites' gradient histograms, with differential privacy (the logistic loss) or exact.
    /// The model is written to `out_dir/models/<id>/final.json`.
    #[serde(default)]
    pub boosted_trees: Option<TreesConfig>,
    /// Also the Pearson correlation of every pair of columns.
    #[serde(default)]
    pub correlations: bool,
    /// Differential privacy: the noise multiplier z (noise standard deviation over the
    /// query's sensitivity). Every site adds its share and charges the release to its
    /// budget.
    #[serde(default = "default_statistics_noise")]
    pub noise_multiplier: f64,
    /// Ask for exact statistics (no noise). Only sites whose dataset opts in with
    /// `exact_releases = ["statistics"]` answer, and only under secure aggregation.
    #[serde(default)]
    pub exact: bool,
    /// The δ at which the release's ε is reported (each site charges its own δ).
    #[serde(default = "default_statistics_delta")]
    pub delta: f64,
    /// Cells (counts) below this are not released.
    #[serde(default = "default_suppress_below")]
    pub suppress_below: u64,
    /// Fewest sites whose cohorts the release must sum (at least 2 with secure aggregation).
    #[serde(default = "default_min_sites")]
    pub min_sites: usize,
    /// How long to wait for every allowed site before starting with at least `min_sites`.
    #[serde(default = "default_wait_for_sites_secs")]
    pub wait_for_sites_secs: u64,
    /// Deadline for each site's answer, seconds (at least 1).
    #[serde(default = "default_round_timeout_secs")]
    pub timeout_secs: u64,
    /// Secure aggregation of the sites' statistics (on by default).
    #[serde(default)]
    pub secure_aggregation: SecureAggregationConfig,
}

fn default_suppress_below() -> u64 {
    11
}

/// `[statistics.survival]`: Kaplan–Meier curves of the cohort on a time grid, per stratum,
/// with the log-rank test between strata.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SurvivalConfig {
    /// The column of follow-up times (in the grid's unit, e.g. days).
    pub time: String,
    /// The column saying whether follow-up ended with the event.
    pub event: String,
    /// The event column's values meaning the event happened.
    #[serde(default = "default_event_codes")]
    pub event_codes: Vec<String>,
    /// The event column's values meaning the patient was censored.
    #[serde(default = "default_censored_codes")]
    pub censored_codes: Vec<String>,
    /// The grid's first edge (with `end` and `step`; or give `edges`).
    #[serde(default)]
    pub start: Option<f64>,
    /// The grid's last edge: later times are censored at it.
    #[serde(default)]
    pub end: Option<f64>,
    /// The width of the grid's bins. Times in whole days with `step = 1` give the exact
    /// Kaplan–Meier curve; a wider step groups times (fewer, larger counts under noise).
    #[serde(default)]
    pub step: Option<f64>,
    /// The grid's edges, strictly rising (instead of start, end and step).
    #[serde(default)]
    pub edges: Option<Vec<f64>>,
    /// One curve per level of a column, e.g. `{ column = "rx", levels = ["Obs", "Lev"] }`.
    #[serde(default)]
    pub strata: Option<medfed_protocol::survival::Strata>,
}

/// `[statistics.cox]`: a Cox proportional-hazards model, fitted by Newton–Raphson over
/// secure sums of the sites' partial-likelihood terms.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoxConfig {
    /// The covariates (numeric columns), in the coefficients' order.
    pub covariates: Vec<String>,
    /// Tied event times: "efron" (default, as lifelines and R) or "breslow".
    #[serde(default)]
    pub ties: medfed_protocol::cox::Ties,
    /// The most iterations (each one exact release of every site's sums).
    #[serde(default = "default_cox_iterations")]
    pub max_iterations: u32,
}

fn default_cox_iterations() -> u32 {
    30
}

/// `[statistics.boosted_trees]`: a histogram gradient-boosted trees model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TreesConfig {
    /// The column predicted.
    pub target: String,
    /// For a classifier: the target value that is the positive class (logistic loss);
    /// absent: a numeric target and the squared loss.
    #[serde(default)]
    pub positive_class: Option<String>,
    /// The features, with bounds for the bins: `{ name = "glu", low = 40, high = 200 }`.
    pub features: Vec<medfed_protocol::trees::FeatureRange>,
    /// How many trees (each is `depth` rounds of secure sums).
    #[serde(default = "default_trees")]
    pub trees: u32,
    /// Levels of splits per tree.
    #[serde(default = "default_tree_depth")]
    pub depth: u8,
    /// The shrinkage of each tree.
    #[serde(default = "default_tree_learning_rate")]
    pub learning_rate: f64,
    /// The most bins per feature, at the federation's quantiles.
    #[serde(default = "default_tree_bins")]
    pub max_bins: u16,
    /// The L2 penalty on leaf values.
    #[serde(default)]
    pub l2: f64,
    /// The least Hessian a child may have.
    #[serde(default = "default_min_child_weight")]
    pub min_child_weight: f64,
    /// The fewest rows a child may have.
    #[serde(default = "default_min_child_samples")]
    pub min_child_samples: u32,
}

fn default_trees() -> u32 {
    100
}
fn default_tree_depth() -> u8 {
    3
}
fn default_tree_learning_rate() -> f64 {
    0.1
}
fn default_tree_bins() -> u16 {
    32
}
fn default_min_child_weight() -> f64 {
    1e-3
}
fn default_min_child_samples() -> u32 {
    20
}

impl TreesConfig {
    /// The model the query asks for.
    pub fn boosting(&self) -> medfed_protocol::trees::Boosting {
        medfed_protocol::trees::Boosting {
            target: self.target.clone(),
            positive_class: self.positive_class.clone(),
            loss: if self.positive_class.is_some() {
                medfed_protocol::trees::Loss::Logistic
            } else {
                medfed_protocol::trees::Loss::Squared
            },
            features: self.features.clone(),
            trees: self.trees,
            depth: self.depth,
            learning_rate: self.learning_rate,
            max_bins: self.max_bins,
            l2: self.l2,
            min_child_weight: self.min_child_weight,
            min_child_samples: self.min_child_samples,
        }
    }
}

fn default_event_codes() -> Vec<String> {
    vec!["1".into()]
}

fn default_censored_codes() -> Vec<String> {
    vec!["0".into()]
}

impl SurvivalConfig {
    /// The grid's edges: `edges`, or `start` to `end` by `step` (the last bin ends at `end`).
    pub fn grid(&self) -> Result<Vec<f64>, String> {
        match (&self.edges, self.start, self.end, self.step) {
            (Some(e), None, None, None) => Ok(e.clone()),
            (None, Some(start), Some(end), Some(step)) => {
                if !(start.is_finite()
                    && end.is_finite()
                    && step.is_finite()
                    && step > 0.0
                    && end > start)
                {
                    return Err(format!(
                        "the grid needs start < end and step > 0 (got start {start}, end {end}, step {step})"
                    ));
                }
                let bins = ((end - start) / step).ceil();
                if bins > medfed_protocol::survival::MAX_BINS as f64 {
                    return Err(format!(
                        "the grid from {start} to {end} by {step} has {bins} bins; at most {} (use a wider step)",
                        medfed_protocol::survival::MAX_BINS
                    ));
                }
                // Edges below `end` only (floating point can put `start + k·step` on or past
                // it), then `end` itself.
                let mut edges: Vec<f64> = (0..bins as usize)
                    .map(|i| start + i as f64 * step)
                    .filter(|e| *e < end)
                    .collect();
                edges.push(end);
                Ok(edges)
            }
            _ => Err("give the grid as start, end and step, or as edges = [...] (not both)".into()),
        }
    }

    /// The survival part of the query.
    pub fn survival(&self) -> Result<medfed_protocol::survival::Survival, String> {
        Ok(medfed_protocol::survival::Survival {
            time: self.time.clone(),
            event: self.event.clone(),
            event_codes: self.event_codes.clone(),
            censored_codes: self.censored_codes.clone(),
            grid: self.grid()?,
            strata: self.strata.clone(),
        })
    }
}

/// One release at z = 1.5 costs each site ε ≈ 3.4 at δ = 10⁻⁶, within a node's default
/// per-study limit of 5.
fn default_statistics_noise() -> f64 {
    1.5
}

fn default_statistics_delta() -> f64 {
    1e-6
}

impl StatisticsConfig {
    /// The query sent to the sites (no noise multiplier when `exact`). A survival part whose
    /// grid is malformed is left out here and refused by [`AggregatorConfig::validate`].
    pub fn query(&self) -> medfed_protocol::fedstats::StatsQuery {
        medfed_protocol::fedstats::StatsQuery {
            survival: self
                .survival
                .as_ref()
                .and_then(|s| s.survival().ok())
                .map(Box::new),
            cox: self.cox.as_ref().map(|c| medfed_protocol::cox::Cox {
                covariates: c.covariates.clone(),
                ties: c.ties,
                max_iterations: c.max_iterations,
            }),
            trees: self.boosted_trees.as_ref().map(|t| Box::new(t.boosting())),
            query_id: self.id.clone(),
            dataset: self.dataset.clone(),
            cohort: self.cohort.clone(),
            columns: self.columns.clone(),
            correlations: self.correlations,
            noise_multiplier: (!self.exact).then_some(self.noise_multiplier),
            suppress_below: self.suppress_below,
        }
    }

    /// The parts of a study a statistics query shares with one (id, dataset, quorum,
    /// timeouts, secure aggregation): the secure-aggregation driver is the studies'.
    pub(crate) fn as_study(&self) -> StudyConfig {
        StudyConfig {
            id: self.id.clone(),
            description: String::new(),
            dataset: self.dataset.clone(),
            model: ModelFamily::Linear,
            features: self.columns.iter().map(|c| c.name.clone()).collect(),
            target: String::new(),
            positive_class: None,
            classes: Vec::new(),
            preprocess: Default::default(),
            validation_fraction: 0.25,
            rounds: 1,
            min_sites: self.min_sites,
            wait_for_sites_secs: self.wait_for_sites_secs,
            round_timeout_secs: self.timeout_secs,
            decision_timeout_secs: default_decision_timeout_secs(),
            round_attempts: 1,
            training: TrainingConfig::default(),
            server_optimizer: medfed_protocol::model::ServerOptimizer::FedAvg,
            secure_aggregation: self.secure_aggregation.clone(),
            privacy: None,
            scheduling: SchedulingConfig::default(),
        }
    }
}

/// `[sites]`: who may connect.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sites {
    /// Site names (certificate common names) allowed to connect.
    pub allow: Vec<String>,
}

fn default_name() -> String {
    "medfed-aggregator".into()
}
fn default_out_dir() -> PathBuf {
    "aggregator-out".into()
}
fn default_max_frame() -> u32 {
    medfed_protocol::DEFAULT_MAX_FRAME_BYTES
}

impl AggregatorConfig {
    /// Reads, resolves and validates a config file.
    pub fn load(path: &Path) -> Result<AggregatorConfig, ConfigError> {
        let mut cfg: AggregatorConfig = load_toml(path)?;
        cfg.tls.resolve(path)?;
        cfg.audit.resolve(path);
        cfg.config_sha256 = file_sha256(path);
        cfg.out_dir = resolve(path, &cfg.out_dir);
        cfg.state.dir = resolve(path, &cfg.state.dir);
        cfg.studies_dir.dir = resolve(path, &cfg.studies_dir.dir);
        if let Some(ha) = &mut cfg.ha
            && let Some(creds) = &ha.credentials
        {
            ha.credentials = Some(resolve(path, creds));
        }
        if let Some(ops) = &mut cfg.ops {
            for p in [&mut ops.token_file, &mut ops.tls_cert, &mut ops.tls_key]
                .into_iter()
                .flatten()
            {
                *p = resolve(path, p);
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the configuration: frame limit, allow-list, and every study's and statistics
    /// study's settings (unique ids, quorum, features, fractions, rounds, ...). The error names
    /// the file and the key.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, why: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            why,
        };
        if self.max_frame_bytes < 1024 {
            return Err(invalid(
                "max_frame_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        if self.sites.allow.is_empty() {
            return Err(invalid(
                "sites.allow".into(),
                "lists no site: no node could connect".into(),
            ));
        }
        for site in &self.sites.allow {
            medfed_infra::pki::validate_site_name(site)
                .map_err(|e| invalid("sites.allow".into(), e.to_string()))?;
        }
        if let Some(ha) = &self.ha {
            ha.validate().map_err(|(key, why)| invalid(key, why))?;
        }
        if let Some(ops) = &self.ops
            && !ops.listen.ip().is_loopback()
            && ops.token_file.is_none()
        {
            return Err(invalid(
                "ops.listen".into(),
                format!(
                    "{} is not a loopback address: the console, /status and /metrics would be open \
                     to anyone who can reach it. Set [ops] token_file (a file holding a secret token) \
                     and tls_cert / tls_key, or listen on 127.0.0.1",
                    ops.listen
                ),
            ));
        }
        if let Some(ops) = &self.ops {
            if ops.tls_cert.is_some() != ops.tls_key.is_some() {
                return Err(invalid(
                    "ops.tls_cert".into(),
                    "set both tls_cert and tls_key, or neither".into(),
                ));
            }
            if !ops.listen.ip().is_loopback() && ops.tls_cert.is_none() {
                return Err(invalid(
                    "ops.listen".into(),
                    format!(
                        "{} is not a loopback address: the token and the pages would cross the \
                         network in clear. Set [ops] tls_cert and tls_key (the aggregator's \
                         certificate from the consortium PKI serves: pki/aggregator/<host>/cert.pem \
                         and key.pem), or listen on 127.0.0.1",
                        ops.listen
                    ),
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for (i, s) in self.statistics.iter().enumerate() {
            let key = |k: &str| format!("statistics[{i}].{k}");
            if let Some(why) = study_id_problem(&s.id) {
                return Err(invalid(key("id"), why));
            }
            if !ids.insert(s.id.as_str()) {
                return Err(invalid(key("id"), format!("{:?} is used twice", s.id)));
            }
            if let Some(sv) = &s.survival {
                sv.survival()
                    .and_then(|sv| sv.validate())
                    .map_err(|why| invalid(key("survival"), why))?;
            }
            if s.boosted_trees.is_some() && !s.secure_aggregation.enabled {
                return Err(invalid(
                    key("boosted_trees"),
                    "boosted trees are grown under secure aggregation only".into(),
                ));
            }
            if s.cox.is_some() {
                if s.survival.is_none() {
                    return Err(invalid(
                        key("cox"),
                        "a Cox model needs [statistics.survival] (time, event, grid, strata)"
                            .into(),
                    ));
                }
                if !s.exact || !s.secure_aggregation.enabled {
                    return Err(invalid(
                        key("cox"),
                        "a Cox model is fitted from exact sums under secure aggregation only \
                         (differential privacy for Cox models is not built): set exact = true"
                            .into(),
                    ));
                }
            }
            // The part of the query a problem is most likely in.
            let part = if s.boosted_trees.is_some() {
                "boosted_trees"
            } else if s.cox.is_some() {
                "cox"
            } else if s.columns.is_empty() && s.survival.is_some() {
                "survival"
            } else {
                "column"
            };
            s.query()
                .validate()
                .map_err(|why| invalid(key(part), why))?;
            if s.min_sites == 0 || s.min_sites > self.sites.allow.len() {
                return Err(invalid(
                    key("min_sites"),
                    format!(
                        "must be between 1 and the {} allowed sites",
                        self.sites.allow.len()
                    ),
                ));
            }
            if s.secure_aggregation.enabled && s.min_sites < 2 {
                return Err(invalid(
                    key("min_sites"),
                    "must be at least 2 with secure aggregation".into(),
                ));
            }
            if s.timeout_secs == 0 {
                return Err(invalid(key("timeout_secs"), "must be at least 1".into()));
            }
            if s.exact && !s.secure_aggregation.enabled {
                return Err(invalid(
                    key("exact"),
                    "exact statistics need secure aggregation (sites release them only so)".into(),
                ));
            }
            if !(s.delta > 0.0 && s.delta < 1e-3) {
                return Err(invalid(
                    key("delta"),
                    format!("{} must be in (0, 0.001)", s.delta),
                ));
            }
        }
        for (i, s) in self.studies.iter().enumerate() {
            if s.id.is_empty() || !ids.insert(s.id.as_str()) {
                return Err(invalid(
                    format!("study[{i}].id"),
                    format!("{:?} is empty or used twice", s.id),
                ));
            }
            self.validate_study(s, &format!("study[{i}]"), path)?;
        }
        Ok(())
    }

    /// Checks one study against this aggregator (its sites); `at` names it in errors
    /// (`study[0]`, or a study file's path).
    pub fn validate_study(
        &self,
        s: &StudyConfig,
        at: &str,
        path: &Path,
    ) -> Result<(), ConfigError> {
        let invalid = |key: String, why: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            why,
        };
        let key = |k: &str| format!("{at}.{k}");
        if let Some(why) = study_id_problem(&s.id) {
            return Err(invalid(key("id"), why));
        }
        if s.features.is_empty() {
            return Err(invalid(key("features"), "lists no feature".into()));
        }
        let unique: BTreeSet<_> = s.features.iter().collect();
        if unique.len() != s.features.len() {
            return Err(invalid(key("features"), "names a feature twice".into()));
        }
        if s.features.contains(&s.target) {
            return Err(invalid(key("target"), "is also listed as a feature".into()));
        }
        if s.model == ModelFamily::Logistic && s.positive_class.is_none() {
            return Err(invalid(
                key("positive_class"),
                "is required for a logistic model (the target value counted as positive)".into(),
            ));
        }
        if s.model != ModelFamily::Logistic && s.positive_class.is_some() {
            return Err(invalid(
                key("positive_class"),
                format!("is for a logistic model, not a {} one", s.model),
            ));
        }
        if s.model == ModelFamily::Multinomial {
            let distinct: BTreeSet<&String> = s.classes.iter().collect();
            if !(MIN_CLASSES..=MAX_CLASSES).contains(&s.classes.len()) {
                return Err(invalid(
                    key("classes"),
                    format!(
                        "lists {} classes; a multinomial model has {MIN_CLASSES} to {MAX_CLASSES} \
                         (for two, use model = \"logistic\" with positive_class)",
                        s.classes.len()
                    ),
                ));
            }
            if distinct.len() != s.classes.len() {
                return Err(invalid(key("classes"), "names a class twice".into()));
            }
            if s.classes
                .iter()
                .any(|c| c.trim().is_empty() || c.eq_ignore_ascii_case("na"))
            {
                return Err(invalid(
                    key("classes"),
                    "names an empty or NA class (a missing label is not a class)".into(),
                ));
            }
        } else if !s.classes.is_empty() {
            return Err(invalid(
                key("classes"),
                format!(
                    "is for a multinomial model, not a {} one (model = \"multinomial\")",
                    s.model
                ),
            ));
        }
        if !(s.validation_fraction > 0.0 && s.validation_fraction < 1.0) {
            return Err(invalid(
                key("validation_fraction"),
                "must be between 0 and 1".into(),
            ));
        }
        if s.rounds == 0 {
            return Err(invalid(key("rounds"), "must be at least 1".into()));
        }
        if s.min_sites == 0 || s.min_sites > self.sites.allow.len() {
            return Err(invalid(
                key("min_sites"),
                format!(
                    "must be between 1 and the {} allowed sites",
                    self.sites.allow.len()
                ),
            ));
        }
        if s.decision_timeout_secs == 0 {
            return Err(invalid(
                key("decision_timeout_secs"),
                "must be at least 1".into(),
            ));
        }
        if s.round_timeout_secs == 0 || s.round_attempts == 0 {
            return Err(invalid(
                key("round_timeout_secs"),
                "and round_attempts must be at least 1".into(),
            ));
        }
        let sch = &s.scheduling;
        let fraction_ok = sch.sample_fraction > 0.0 && sch.sample_fraction <= 1.0;
        let confidence_ok = sch.confidence > 0.5 && sch.confidence < 1.0;
        if !fraction_ok || !(0.0..=1.0).contains(&sch.min_coverage) || !confidence_ok {
            return Err(invalid(
                key("scheduling"),
                "needs 0 < sample_fraction <= 1, 0 <= min_coverage <= 1 and 0.5 < confidence < 1"
                    .into(),
            ));
        }
        if let Some(p) = &s.privacy {
            p.training()
                .validate()
                .map_err(|why| invalid(key("privacy"), why))?;
            if p.feature_ranges.len() != s.features.len() {
                return Err(invalid(
                    key("privacy.feature_ranges"),
                    format!(
                        "has {} ranges for {} features (one [low, high] per feature, in order)",
                        p.feature_ranges.len(),
                        s.features.len()
                    ),
                ));
            }
            if let Some((j, _)) = p
                .feature_ranges
                .iter()
                .enumerate()
                .find(|(_, [lo, hi])| !(lo.is_finite() && hi.is_finite() && lo < hi))
            {
                return Err(invalid(
                    key("privacy.feature_ranges"),
                    format!("the range of '{}' needs low < high", s.features[j]),
                ));
            }
        }
        s.preprocess
            .validate(&s.features)
            .map_err(|(k, why)| invalid(key(&k), why))?;
        if let Some(p) = &s.privacy {
            if let Some((column, _)) = s
                .preprocess
                .impute
                .iter()
                .find(|(_, r)| **r == medfed_protocol::preprocess::ImputeRule::Mean)
            {
                return Err(invalid(
                    key(&format!("preprocess.impute.{column}")),
                    "cannot be \"mean\" under [study.privacy] (no statistics are released \
                     to take a mean from): give a value, e.g. { value = 72 }"
                        .into(),
                ));
            }
            for (j, f) in s.features.iter().enumerate() {
                if s.preprocess.categorical.contains_key(f)
                    && p.feature_ranges.get(j) != Some(&[0.0, 1.0])
                {
                    return Err(invalid(
                        key("privacy.feature_ranges"),
                        format!("the range of categorical feature '{f}' must be [0, 1]"),
                    ));
                }
            }
        }
        let sa = &s.secure_aggregation;
        if sa.enabled && s.min_sites < 2 {
            return Err(invalid(
                key("min_sites"),
                "must be at least 2 with secure aggregation (a sum of one site's update is that update); \
                 raise it, or set secure_aggregation.enabled = false"
                    .into(),
            ));
        }
        medfed_protocol::quant::QuantParams::for_parties(
            self.sites.allow.len(),
            sa.clip,
            sa.scale_bits,
        )
        .map_err(|e| invalid(key("secure_aggregation"), e.to_string()))?;
        for (name, v) in [
            ("expected_dropout", sa.expected_dropout),
            ("expected_corrupt", sa.expected_corrupt),
        ] {
            if !(0.0..0.5).contains(&v) {
                return Err(invalid(
                    key(&format!("secure_aggregation.{name}")),
                    "must be at least 0 and below 0.5".into(),
                ));
            }
        }
        s.training
            .params()
            .validate()
            .map_err(|e| invalid(key("training"), e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_study(keys: &str) -> Result<(), ConfigError> {
        let text = format!(
            "listen = \"127.0.0.1:4433\"\n[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [sites]\nallow = [\"a\", \"b\", \"c\"]\n[[study]]\nid = \"s\"\ndataset = \"d\"\n\
             features = [\"x\"]\ntarget = \"y\"\nrounds = 3\n{keys}"
        );
        let cfg: AggregatorConfig = toml::from_str(&text).unwrap();
        cfg.validate(Path::new("aggregator.toml"))
    }

    fn key_of(r: Result<(), ConfigError>) -> (String, String) {
        match r {
            Err(ConfigError::Invalid { key, why, .. }) => (key, why),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_multinomial_study_lists_three_to_thirty_two_distinct_classes() {
        assert!(with_study("model = \"multinomial\"\nclasses = [\"a\", \"b\", \"c\"]\n").is_ok());
        let (key, why) = key_of(with_study(
            "model = \"multinomial\"\nclasses = [\"a\", \"b\"]\n",
        ));
        assert_eq!(key, "study[0].classes");
        assert!(why.contains("use model = \"logistic\""), "{why}");
        let (key, _) = key_of(with_study("model = \"multinomial\"\n"));
        assert_eq!(key, "study[0].classes");
        let (_, why) = key_of(with_study(
            "model = \"multinomial\"\nclasses = [\"a\", \"b\", \"a\"]\n",
        ));
        assert!(why.contains("twice"), "{why}");
        let (_, why) = key_of(with_study(
            "model = \"multinomial\"\nclasses = [\"a\", \"b\", \"NA\"]\n",
        ));
        assert!(why.contains("missing label"), "{why}");
        let many: Vec<String> = (0..33).map(|i| format!("\"c{i}\"")).collect();
        let (_, why) = key_of(with_study(&format!(
            "model = \"multinomial\"\nclasses = [{}]\n",
            many.join(", ")
        )));
        assert!(why.contains("lists 33 classes"), "{why}");
        // Each model's own keys only.
        let (key, _) = key_of(with_study(
            "model = \"logistic\"\npositive_class = \"a\"\nclasses = [\"a\", \"b\", \"c\"]\n",
        ));
        assert_eq!(key, "study[0].classes");
        let (key, _) = key_of(with_study(
            "model = \"multinomial\"\npositive_class = \"a\"\nclasses = [\"a\", \"b\", \"c\"]\n",
        ));
        assert_eq!(key, "study[0].positive_class");
    }
}

#[cfg(test)]
mod study_id_tests {
    use super::study_id_problem;

    /// Ids name directories, URL paths and metric labels: nothing that could leave the out
    /// directory or break a scrape passes.
    #[test]
    fn study_ids_are_plain_names() {
        for ok in ["pima", "pima-diabetes", "lung_cox_2", &"a".repeat(64)] {
            assert_eq!(study_id_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "../x",
            "/etc",
            "a b",
            "a\"b",
            "a\nb",
            "é",
            &"a".repeat(65),
            ".",
        ] {
            assert!(study_id_problem(bad).is_some(), "{bad:?}");
        }
    }
}
