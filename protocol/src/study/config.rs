//! A training study's configuration (`[[study]]` in `aggregator.toml`, or a study file):
//! pure data, read by the aggregator and driven by the [`Coordinator`](super::Coordinator).
//!
//! Every key is documented in `docs/samples/aggregator.toml`.

use serde::{Deserialize, Serialize};

use crate::model::{ModelFamily, ModelKind, ServerOptimizer, TrainParams};

/// One training study as the aggregator's operator configures it: what to train on which
/// dataset, for how many rounds, with what quorum, deadlines, privacy and secure aggregation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StudyConfig {
    /// The study's id, unique in the consortium: every message of the study carries it, and
    /// each site's privacy ledger charges the study's releases to it.
    pub id: String,
    /// What the study is for, shown to each site's reviewer (empty by default).
    #[serde(default)]
    pub description: String,
    /// The dataset name nodes serve it from.
    pub dataset: String,
    /// `"logistic"` (binary classification), `"multinomial"` (classification into the
    /// `classes`) or `"linear"` (regression).
    pub model: ModelFamily,
    /// The input columns, in the model's order.
    pub features: Vec<String>,
    /// The column to predict.
    pub target: String,
    /// For logistic models: the target value counted as positive.
    #[serde(default)]
    pub positive_class: Option<String>,
    /// For multinomial models: the target's values, each a class, in the model's order
    /// ([`crate::model::MIN_CLASSES`] to [`crate::model::MAX_CLASSES`] of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Categorical features and imputed missing values (`[study.preprocess]`); the model
    /// carries them, so it applies to raw records.
    #[serde(
        default,
        skip_serializing_if = "crate::preprocess::Preprocess::is_empty"
    )]
    pub preprocess: crate::preprocess::Preprocess,
    /// Share of each site's rows kept aside for validation, in (0, 1) (default 0.25): of
    /// its patients, where the site's dataset has a patient key (a patient's rows all go
    /// one way).
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Training rounds.
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
    /// Local training's hyper-parameters (`[study.training]`).
    #[serde(default)]
    pub training: TrainingConfig,
    /// How the round's average becomes the next model: `{ kind = "fed_avg" }` (default) or
    /// `{ kind = "fed_adam", learning_rate, beta1, beta2, tau }`.
    #[serde(default = "default_server_optimizer")]
    pub server_optimizer: ServerOptimizer,
    /// Secure aggregation of the rounds (`[study.secure_aggregation]`, on by default).
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
    /// How each round picks its participants (default: all of them).
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
    /// The DP parameters a study announces to its sites (DP-SGD's part only with
    /// `mechanism = "dp-sgd"`).
    pub fn training(&self) -> crate::dp::DpTraining {
        crate::dp::DpTraining {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            sgd: (self.mechanism == DpMechanism::DpSgd).then_some(crate::dp::DpSgd {
                sampling_rate: self.sampling_rate,
                steps: self.local_steps,
                lot_size: self.lot_size,
            }),
        }
    }

    /// The standardization the declared ranges give over a recipe's inputs: each
    /// categorical feature's range (which must be `[0, 1]`) covers each of its categories.
    pub fn standardization_for(
        &self,
        recipe: &crate::preprocess::Recipe,
    ) -> crate::stats::Standardization {
        let mut ranges = Vec::new();
        for (input, range) in recipe.inputs.iter().zip(&self.feature_ranges) {
            match input {
                crate::preprocess::Input::Numeric { .. } => ranges.push(*range),
                crate::preprocess::Input::Categorical { categories, .. } => {
                    ranges.extend(std::iter::repeat_n(*range, categories.len()));
                }
            }
        }
        PrivacyConfig {
            feature_ranges: ranges,
            ..self.clone()
        }
        .standardization()
    }

    /// The standardization the declared ranges give: centre and half-width.
    pub fn standardization(&self) -> crate::stats::Standardization {
        crate::stats::Standardization {
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

/// `[study.training]`: local training's hyper-parameters (defaults: those of
/// [`TrainParams::default`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Passes over a site's training rows per round (default 5).
    #[serde(default = "default_local_epochs")]
    pub local_epochs: u32,
    /// Rows per mini-batch (default 16).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// The gradient step's size (default 0.1).
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Weight of the L2 penalty on the weights, not the bias (default 0.01).
    #[serde(default = "default_l2")]
    pub l2: f64,
    /// Seed of the mini-batch shuffle (default 0); each round mixes in its number.
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
    /// These settings as the [`TrainParams`] a round sends.
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

impl StudyConfig {
    /// The model the study trains: its family, with the class count of a multinomial one
    /// (saturated at 255: [`ModelKind::validate`] refuses more than
    /// [`crate::model::MAX_CLASSES`]).
    pub fn kind(&self) -> ModelKind {
        match self.model {
            ModelFamily::Logistic => ModelKind::Logistic,
            ModelFamily::Linear => ModelKind::Linear,
            ModelFamily::Multinomial => ModelKind::Multinomial {
                classes: u8::try_from(self.classes.len()).unwrap_or(u8::MAX),
            },
        }
    }

    /// The model's inputs: the features, each categorical one expanded into
    /// `{column}_{category}` per category.
    pub fn inputs(&self) -> Vec<String> {
        self.preprocess.recipe(&self.features).features()
    }

    /// What the nodes are told of the study; its hash is what a site approves.
    pub fn announcement(&self) -> crate::messages::StudyAnnouncement {
        crate::messages::StudyAnnouncement {
            study_id: self.id.clone(),
            description: self.description.clone(),
            dataset: self.dataset.clone(),
            features: self.features.clone(),
            target: self.target.clone(),
            model: self.kind(),
            positive_class: self.positive_class.clone(),
            classes: self.classes.clone(),
            preprocess: self.preprocess.clone(),
            validation_fraction: self.validation_fraction,
            rounds: self.rounds,
            secure_aggregation: self.secure_aggregation.enabled,
            privacy: self.privacy.as_ref().map(|p| p.training()),
        }
    }
}

fn default_server_optimizer() -> ServerOptimizer {
    ServerOptimizer::FedAvg
}
fn default_validation_fraction() -> f64 {
    0.25
}
/// The default quorum: 2 sites.
pub fn default_min_sites() -> usize {
    2
}
/// How long a study waits for its sites by default: 120 s.
pub fn default_wait_for_sites_secs() -> u64 {
    120
}
/// A round's default deadline: 120 s.
pub fn default_round_timeout_secs() -> u64 {
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
/// A site's default time to decide on an announcement: 10 s.
pub fn default_decision_timeout_secs() -> u64 {
    10
}
