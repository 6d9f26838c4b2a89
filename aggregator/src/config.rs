//! `aggregator.toml`: what the aggregator listens on, whom it lets in, which studies it runs.
//!
//! Every key is documented in `docs/samples/aggregator.toml`, which a test parses.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use medfed_infra::config::{AuditFiles, ConfigError, TlsFiles, file_sha256, load_toml, resolve};
use medfed_protocol::model::{ModelKind, ServerOptimizer, TrainParams};
use serde::{Deserialize, Serialize};

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
    pub tls: TlsFiles,
    /// The compliance log (default: `audit/compliance.log`, key `audit/signing.key`).
    #[serde(default)]
    pub audit: AuditFiles,
    pub sites: Sites,
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
    /// SHA-256 of the file this was loaded from (for the compliance log).
    #[serde(skip)]
    pub config_sha256: String,
}

/// `[state]`: the aggregator's durable state.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorState {
    /// The store directory (relative to this file).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
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
    /// TCP address of `/healthz`, `/status` and `/metrics` (plain HTTP: keep it on
    /// loopback, or behind your monitoring network's controls).
    #[serde(default = "default_ops_listen")]
    pub listen: SocketAddr,
}

fn default_ops_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

/// `[[statistics]]`: a statistics study, run after the training studies.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatisticsConfig {
    pub id: String,
    pub dataset: String,
    /// Rows meeting every condition, e.g. `{ column = "age", op = ">=", value = 30 }` or
    /// `{ column = "type", op = "==", text = "Yes" }`.
    #[serde(default)]
    pub cohort: Vec<medfed_protocol::fedstats::Condition>,
    /// The columns, with bounds and histogram edges (`[[statistics.column]]`).
    #[serde(rename = "column")]
    pub columns: Vec<medfed_protocol::fedstats::StatColumn>,
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
    #[serde(default = "default_min_sites")]
    pub min_sites: usize,
    #[serde(default = "default_wait_for_sites_secs")]
    pub wait_for_sites_secs: u64,
    #[serde(default = "default_round_timeout_secs")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub secure_aggregation: SecureAggregationConfig,
}

fn default_decision_timeout_secs() -> u64 {
    10
}

fn default_suppress_below() -> u64 {
    11
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
    pub fn query(&self) -> medfed_protocol::fedstats::StatsQuery {
        medfed_protocol::fedstats::StatsQuery {
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
            model: ModelKind::Linear,
            features: self.columns.iter().map(|c| c.name.clone()).collect(),
            target: String::new(),
            positive_class: None,
            validation_fraction: default_validation_fraction(),
            rounds: 1,
            min_sites: self.min_sites,
            wait_for_sites_secs: self.wait_for_sites_secs,
            round_timeout_secs: self.timeout_secs,
            decision_timeout_secs: default_decision_timeout_secs(),
            round_attempts: 1,
            training: TrainingConfig::default(),
            server_optimizer: ServerOptimizer::FedAvg,
            secure_aggregation: self.secure_aggregation.clone(),
            privacy: None,
            scheduling: SchedulingConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sites {
    /// Site names (certificate common names) allowed to connect.
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    pub id: String,
    #[serde(default)]
    pub description: String,
    /// The dataset name nodes serve it from.
    pub dataset: String,
    pub model: ModelKind,
    pub features: Vec<String>,
    pub target: String,
    /// For logistic models: the target value counted as positive.
    #[serde(default)]
    pub positive_class: Option<String>,
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    pub rounds: u32,
    /// Quorum: fewest site updates a round needs.
    #[serde(default = "default_min_sites")]
    pub min_sites: usize,
    /// How long to wait for all allowed sites before starting with at least `min_sites`.
    #[serde(default = "default_wait_for_sites_secs")]
    pub wait_for_sites_secs: u64,
    /// Deadline for each node's answer within a round.
    #[serde(default = "default_round_timeout_secs")]
    pub round_timeout_secs: u64,
    /// Deadline for each site's decision on the study's announcement (all sites are asked
    /// at once, so a silent site delays the start by this, once).
    #[serde(default = "default_decision_timeout_secs")]
    pub decision_timeout_secs: u64,
    /// Times a round is tried before the study is abandoned for lack of quorum.
    #[serde(default = "default_round_attempts")]
    pub round_attempts: u32,
    #[serde(default)]
    pub training: TrainingConfig,
    /// How the round's average becomes the next model: `{ kind = "fed_avg" }` (default) or
    /// `{ kind = "fed_adam", learning_rate, beta1, beta2, tau }`.
    #[serde(default = "default_server_optimizer")]
    pub server_optimizer: ServerOptimizer,
    #[serde(default)]
    pub secure_aggregation: SecureAggregationConfig,
    /// Differential privacy (DP-FedAvg): absent means none.
    #[serde(default)]
    pub privacy: Option<PrivacyConfig>,
    /// Which sites each round invites, and its deadline (`[study.scheduling]`).
    #[serde(default)]
    pub scheduling: SchedulingConfig,
}

/// How a round picks its participants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Every participant, every round.
    #[default]
    All,
    /// A random share (`sample_fraction`) of the participants, at least the quorum.
    Sample,
    /// The latency-aware scheduler (`docs/scheduling.md`): the sites likely to answer by the
    /// shortest deadline that still meets the quorum and `min_coverage` with confidence.
    Latency,
}

/// `[study.scheduling]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulingConfig {
    #[serde(default)]
    pub selection: Selection,
    /// With `sample`: the share of participants invited each round.
    #[serde(default = "default_sample_fraction")]
    pub sample_fraction: f64,
    /// With `latency`: the least share of all participants' training rows a round covers.
    #[serde(default = "default_min_coverage")]
    pub min_coverage: f64,
    /// With `latency`: the one-sided confidence that the quorum and coverage hold.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
}

fn default_sample_fraction() -> f64 {
    1.0
}
fn default_min_coverage() -> f64 {
    0.5
}
fn default_confidence() -> f64 {
    0.95
}

impl Default for SchedulingConfig {
    fn default() -> Self {
        SchedulingConfig {
            selection: Selection::All,
            sample_fraction: default_sample_fraction(),
            min_coverage: default_min_coverage(),
            confidence: default_confidence(),
        }
    }
}

/// `[study.privacy]`: DP-FedAvg (see `docs/privacy.md`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// `"dp-fedavg"` (default): each round, each site's model delta is clipped and noised,
    /// protecting all of a hospital's data; `"dp-sgd"`: every local step inside each site
    /// clips each record's gradient and adds noise, protecting each record, with no trust
    /// in the aggregator or the other sites.
    #[serde(default)]
    pub mechanism: DpMechanism,
    /// L2 bound of each site's model delta per round (DP-FedAvg), or of each record's
    /// gradient (DP-SGD).
    pub clip_norm: f64,
    /// Noise standard deviation over the sensitivity (2 × clip_norm for DP-FedAvg,
    /// clip_norm for DP-SGD).
    pub noise_multiplier: f64,
    /// DP-SGD: the share of a site's records each local step samples (Poisson).
    #[serde(default = "default_sampling_rate")]
    pub sampling_rate: f64,
    /// DP-SGD: noisy local steps per round.
    #[serde(default = "default_local_steps")]
    pub local_steps: u32,
    /// DP-SGD: what a step divides its noisy gradient sum by, the same at every site: about
    /// the records a step samples at a typical site (`sampling_rate` × its rows). Never a
    /// site's own count, which its updates would then reveal.
    #[serde(default = "default_lot_size")]
    pub lot_size: f64,
    /// `[low, high]` of each feature, in the order of `features`. Features are standardized
    /// from these declared ranges, so that nothing about the data is released besides the
    /// noisy model.
    pub feature_ranges: Vec<[f64; 2]>,
}

/// How a study's training is made differentially private.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpMechanism {
    /// DP-FedAvg: hospital-level, per round.
    #[default]
    DpFedavg,
    /// DP-SGD inside each site: record-level, per local step.
    DpSgd,
}

fn default_sampling_rate() -> f64 {
    0.1
}

fn default_local_steps() -> u32 {
    10
}

fn default_lot_size() -> f64 {
    16.0
}

impl PrivacyConfig {
    pub fn training(&self) -> medfed_protocol::dp::DpTraining {
        medfed_protocol::dp::DpTraining {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            sgd: (self.mechanism == DpMechanism::DpSgd).then_some(medfed_protocol::dp::DpSgd {
                sampling_rate: self.sampling_rate,
                steps: self.local_steps,
                lot_size: self.lot_size,
            }),
        }
    }

    /// The standardization the declared ranges give: centre and half-width.
    pub fn standardization(&self) -> medfed_protocol::stats::Standardization {
        medfed_protocol::stats::Standardization {
            mean: self
                .feature_ranges
                .iter()
                .map(|[lo, hi]| (lo + hi) / 2.0)
                .collect(),
            std: self
                .feature_ranges
                .iter()
                .map(|[lo, hi]| (hi - lo) / 2.0)
                .collect(),
        }
    }
}

/// Secure aggregation of the training rounds (on by default).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationConfig {
    /// Off only for debugging: the aggregator then sees every site's update.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Range bound of every entry of a site's (scaled) update vector.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Fixed-point precision: entries are rounded to multiples of 2^-scale_bits.
    #[serde(default = "default_scale_bits")]
    pub scale_bits: u8,
    /// Share of sites expected to drop out of a round; sizes SecAgg+ neighbourhoods (above
    /// 32 sites).
    #[serde(default = "default_expected_dropout")]
    pub expected_dropout: f64,
    /// Share of sites assumed to collude with the aggregator; sizes SecAgg+ neighbourhoods.
    #[serde(default = "default_expected_corrupt")]
    pub expected_corrupt: f64,
    /// Sites that may collude with the aggregator without it unmasking any other site's
    /// update: the threshold is set above (holders + this) / 2. Nodes check it against their
    /// own policy. More tolerance means fewer dropouts survived.
    #[serde(default = "default_tolerated_colluders")]
    pub tolerated_colluders: u32,
}

impl Default for SecureAggregationConfig {
    fn default() -> Self {
        SecureAggregationConfig {
            enabled: true,
            clip: default_clip(),
            scale_bits: default_scale_bits(),
            expected_dropout: default_expected_dropout(),
            expected_corrupt: default_expected_corrupt(),
            tolerated_colluders: default_tolerated_colluders(),
        }
    }
}

fn default_tolerated_colluders() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_clip() -> f64 {
    1e6
}
fn default_scale_bits() -> u8 {
    24
}
fn default_expected_dropout() -> f64 {
    0.1
}
fn default_expected_corrupt() -> f64 {
    0.05
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    #[serde(default = "default_local_epochs")]
    pub local_epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "default_l2")]
    pub l2: f64,
    #[serde(default)]
    pub seed: u64,
    /// FedProx: weight of the proximal term keeping local training near the global model.
    #[serde(default)]
    pub prox_mu: f64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            local_epochs: default_local_epochs(),
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            l2: default_l2(),
            seed: 0,
            prox_mu: 0.0,
        }
    }
}

impl TrainingConfig {
    pub fn params(&self) -> TrainParams {
        TrainParams {
            local_epochs: self.local_epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            l2: self.l2,
            seed: self.seed,
            prox_mu: self.prox_mu,
        }
    }
}

fn default_server_optimizer() -> ServerOptimizer {
    ServerOptimizer::FedAvg
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
fn default_validation_fraction() -> f64 {
    0.25
}
fn default_min_sites() -> usize {
    2
}
fn default_wait_for_sites_secs() -> u64 {
    120
}
fn default_round_timeout_secs() -> u64 {
    120
}
fn default_round_attempts() -> u32 {
    3
}
fn default_local_epochs() -> u32 {
    TrainParams::default().local_epochs
}
fn default_batch_size() -> u32 {
    TrainParams::default().batch_size
}
fn default_learning_rate() -> f64 {
    TrainParams::default().learning_rate
}
fn default_l2() -> f64 {
    TrainParams::default().l2
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
        cfg.validate(path)?;
        Ok(cfg)
    }

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
        let mut ids = BTreeSet::new();
        for (i, s) in self.statistics.iter().enumerate() {
            let key = |k: &str| format!("statistics[{i}].{k}");
            if s.id.is_empty() || !ids.insert(s.id.as_str()) {
                return Err(invalid(
                    key("id"),
                    format!("{:?} is empty or used twice", s.id),
                ));
            }
            s.query()
                .validate()
                .map_err(|why| invalid(key("column"), why))?;
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
        if s.id.is_empty() {
            return Err(invalid(key("id"), "is empty".into()));
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
        if s.model == ModelKind::Logistic && s.positive_class.is_none() {
            return Err(invalid(
                key("positive_class"),
                "is required for a logistic model (the target value counted as positive)".into(),
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

impl StudyConfig {
    /// What the nodes are told of the study; its hash is what a site approves.
    pub fn announcement(&self) -> medfed_protocol::messages::StudyAnnouncement {
        medfed_protocol::messages::StudyAnnouncement {
            study_id: self.id.clone(),
            description: self.description.clone(),
            dataset: self.dataset.clone(),
            features: self.features.clone(),
            target: self.target.clone(),
            model: self.model,
            positive_class: self.positive_class.clone(),
            validation_fraction: self.validation_fraction,
            rounds: self.rounds,
            secure_aggregation: self.secure_aggregation.enabled,
            privacy: self.privacy.as_ref().map(|p| p.training()),
        }
    }
}
