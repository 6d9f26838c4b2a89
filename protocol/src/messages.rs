//! Wire messages exchanged between a hospital node and the aggregator.
//!
//! Every message travels in one frame (see [`crate::codec`]). The conversation is a set of
//! request/response exchanges, each on its own QUIC bidirectional stream:
//!
//! | opened by  | request               | response                |
//! |------------|-----------------------|-------------------------|
//! | node       | [`Hello`]             | [`Welcome`] or [`ErrorMessage`] |
//! | aggregator | [`StudyAnnouncement`] | [`StudyDecision`]       |
//! | aggregator | [`RoundOpen`]         | [`ModelUpdate`] or [`ErrorMessage`] |
//! | aggregator | [`EvaluateRequest`]   | [`EvaluationReport`]    |
//! | aggregator | [`RoundResult`]       | (none: one-way)         |
//! | aggregator | [`StatisticsOpen`]    | [`SecAggFromNode`]      |
//! | aggregator | [`SecAggToNode`]      | [`SecAggFromNode`]      |
//!
//! With secure aggregation a [`RoundOpen`] is answered with a [`SecAggFromNode`] (the
//! node's signed keys), and three more exchanges follow (see [`crate::secagg`]).
//!
//! Nothing in here carries a patient record: only model parameters, counts and sums.

use serde::{Deserialize, Serialize};

use crate::metrics::Evaluation;
use crate::model::{GlobalModel, TrainParams};
use crate::stats::FeatureStats;

/// One protocol message. The enum tag is part of the wire format: append new variants at
/// the end, never reorder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Node → aggregator, first on every connection: who the site is and what it serves.
    Hello(Hello),
    /// Aggregator → node: the hello was accepted.
    Welcome(Welcome),
    /// Aggregator → node: a study asks the site to take part.
    StudyAnnouncement(StudyAnnouncement),
    /// Node → aggregator: the site's answer to a study announcement.
    StudyDecision(StudyDecision),
    /// Aggregator → node: train one round from the enclosed global model.
    RoundOpen(RoundOpen),
    /// Node → aggregator: the site's locally trained parameters for a round (plain rounds only).
    ModelUpdate(ModelUpdate),
    /// Aggregator → node: evaluate a model on the site's validation rows.
    EvaluateRequest(EvaluateRequest),
    /// Node → aggregator: the answer to an evaluate request.
    EvaluationReport(EvaluationReport),
    /// Aggregator → node, one-way: a round finished.
    RoundResult(RoundResult),
    /// Either way, instead of the expected response: a refusal or failure with its code.
    Error(ErrorMessage),
    /// Aggregator → node: a secure-aggregation server message.
    SecAggToNode(SecAggToNode),
    /// Node → aggregator: a secure-aggregation client message.
    SecAggFromNode(SecAggFromNode),
    /// Aggregator → node: sum the study's feature statistics with secure aggregation.
    StatisticsOpen(StatisticsOpen),
    /// Aggregator → node: descriptive statistics of a cohort (a statistics study).
    StatisticsQuery(StatisticsQuery),
    /// Node → aggregator: a statistics query's answer, in the clear.
    StatisticsReport(StatisticsReport),
}

impl Message {
    /// The study and round a message belongs to, where it has them.
    pub fn study_round(&self) -> (Option<&str>, Option<u32>) {
        match self {
            Message::StudyAnnouncement(m) => (Some(&m.study_id), None),
            Message::StudyDecision(
                StudyDecision::Accept { study_id, .. } | StudyDecision::Refuse { study_id, .. },
            ) => (Some(study_id), None),
            Message::RoundOpen(m) => (Some(&m.study_id), Some(m.round)),
            Message::ModelUpdate(m) => (Some(&m.study_id), Some(m.round)),
            Message::EvaluateRequest(m) => (Some(&m.study_id), Some(m.round)),
            Message::EvaluationReport(m) => (Some(&m.study_id), Some(m.round)),
            Message::RoundResult(m) => (Some(&m.study_id), Some(m.round)),
            Message::SecAggToNode(m) => (Some(&m.study_id), Some(m.round)),
            Message::SecAggFromNode(m) => (Some(&m.study_id), Some(m.round)),
            Message::StatisticsOpen(m) => (Some(&m.study_id), Some(0)),
            Message::StatisticsQuery(m) => (Some(&m.query.query_id), Some(0)),
            Message::StatisticsReport(m) => (Some(&m.query_id), Some(0)),
            Message::Hello(_) | Message::Welcome(_) | Message::Error(_) => (None, None),
        }
    }

    /// The message's name as used in logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::StudyAnnouncement(_) => "study announcement",
            Message::StudyDecision(_) => "study decision",
            Message::RoundOpen(_) => "round open",
            Message::ModelUpdate(_) => "model update",
            Message::EvaluateRequest(_) => "evaluate request",
            Message::EvaluationReport(_) => "evaluation report",
            Message::RoundResult(_) => "round result",
            Message::Error(_) => "error",
            Message::SecAggToNode(m) => m.message.kind(),
            Message::SecAggFromNode(m) => m.message.kind(),
            Message::StatisticsOpen(_) => "statistics open",
            Message::StatisticsQuery(_) => "statistics query",
            Message::StatisticsReport(_) => "statistics report",
        }
    }
}

/// A dataset a node can serve: its name and column names (never its values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// The dataset's name in the node's configuration (`[[dataset]] name`), which studies name.
    pub name: String,
    /// The names of its columns a study may use, in file order: columns classed as
    /// identifiers, patient ids, birth dates, dates or zip codes are left out.
    pub columns: Vec<String>,
}

/// First message of a connection, node → aggregator. The site name must match the name in
/// the node's TLS client certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The site's name; the aggregator refuses a hello whose site is not the one its TLS client
    /// certificate names.
    pub site: String,
    /// The node's software version, for the operator's status page.
    pub software: String,
    /// The datasets the node serves.
    pub datasets: Vec<DatasetInfo>,
}

/// The aggregator accepted the node's hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The aggregator's name (`name` in its configuration).
    pub aggregator: String,
    /// The aggregator's software version, e.g. `medfed-aggregator 0.1.0`.
    pub software: String,
}

/// What a study asks of a node: which dataset, which columns, what model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyAnnouncement {
    /// The study's id, unique in the consortium; every later message of the study carries it.
    pub study_id: String,
    /// What the study is for, in words, as the operator wrote it: shown to the site's reviewer.
    pub description: String,
    /// The name of the node's dataset the study trains on ([`DatasetInfo::name`]).
    pub dataset: String,
    /// The columns used as model inputs, in the model's order.
    pub features: Vec<String>,
    /// The column the model predicts.
    pub target: String,
    /// Logistic (binary classification), multinomial (classification into `classes`) or
    /// linear (regression).
    pub model: crate::model::ModelKind,
    /// For binary classification: the target value that counts as the positive class.
    pub positive_class: Option<String>,
    /// For a multinomial model: the target's values, in the order of the model's class
    /// blocks (as many as the model's classes); empty otherwise.
    pub classes: Vec<String>,
    /// Which features are categorical and how missing values are imputed: every site
    /// makes the model's inputs from its raw columns the same way.
    pub preprocess: crate::preprocess::Preprocess,
    /// Share of the node's rows it keeps aside for validation, in (0, 1).
    pub validation_fraction: f64,
    /// The number of training rounds.
    pub rounds: u32,
    /// With secure aggregation the feature statistics are summed securely in a
    /// [`StatisticsOpen`] exchange instead of being sent with the decision.
    pub secure_aggregation: bool,
    /// DP-FedAvg: each round releases only the noisy sum of clipped model deltas; each site
    /// charges it to its own budget. No statistics, losses or evaluations are released.
    pub privacy: Option<crate::dp::DpTraining>,
}

impl StudyAnnouncement {
    /// The hash a site approves the study by (`medfed node approve`), the SHA-256 of its
    /// encoding. A study without classes or preprocessing is hashed in protocol 3's
    /// layout, so that a study approved before either existed keeps its hash and its
    /// approval stands.
    pub fn approval_hash(&self) -> String {
        let bytes = if self.classes.is_empty() && self.preprocess.is_empty() {
            postcard::to_allocvec(&AnnouncementV3 {
                study_id: &self.study_id,
                description: &self.description,
                dataset: &self.dataset,
                features: &self.features,
                target: &self.target,
                model: self.model,
                positive_class: &self.positive_class,
                validation_fraction: self.validation_fraction,
                rounds: self.rounds,
                secure_aggregation: self.secure_aggregation,
                privacy: &self.privacy,
            })
        } else {
            postcard::to_allocvec(self)
        };
        crate::audit::sha256_hex(&bytes.unwrap_or_default())
    }
}

/// [`StudyAnnouncement`] as protocol 3 had it, for [`StudyAnnouncement::approval_hash`].
#[derive(Serialize)]
struct AnnouncementV3<'a> {
    study_id: &'a str,
    description: &'a str,
    dataset: &'a str,
    features: &'a [String],
    target: &'a str,
    model: crate::model::ModelKind,
    positive_class: &'a Option<String>,
    validation_fraction: f64,
    rounds: u32,
    secure_aggregation: bool,
    privacy: &'a Option<crate::dp::DpTraining>,
}

/// The node's answer to a study announcement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StudyDecision {
    /// The node takes part. Its feature statistics (counts, sums, sums of squares over its
    /// training rows) let the aggregator standardize features without seeing any value; they
    /// are absent when the study sums them with secure aggregation instead.
    Accept {
        /// The study answered.
        study_id: String,
        /// Rows the site trains on (its rows minus the validation share).
        training_rows: u64,
        /// Rows the site keeps aside for validation.
        validation_rows: u64,
        /// Per-feature count, sums and sums of squares over the training rows; `None` with
        /// secure aggregation.
        feature_stats: Option<FeatureStats>,
        /// A classification study's target classes at this site: the values of the target
        /// column that at least `min_cell` of its patients have (no count, and no class
        /// fewer have), sorted, at most [`MAX_TARGET_CLASSES`]. The aggregator stops a study
        /// whose positive class no site names, or whose target has one class, before round 1.
        target_classes: Vec<String>,
    },
    /// The node does not take part: its policy refuses the study, its privacy budget cannot
    /// pay for it, it serves no such dataset, or a reason that depends on its data (given to
    /// the aggregator in fixed words that say nothing about the data).
    Refuse {
        /// The study refused.
        study_id: String,
        /// Why, in words, for the aggregator's operator.
        reason: String,
    },
}

/// Most target classes a site names in its study decision.
pub const MAX_TARGET_CLASSES: usize = 32;

/// The aggregator opens a training round: train from this model, send back an update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundOpen {
    /// The study.
    pub study_id: String,
    /// The round, from 1.
    pub round: u32,
    /// The global model to train from (and to evaluate on the validation rows).
    pub model: GlobalModel,
    /// The local training's hyper-parameters (epochs, batch size, learning rate, ...).
    pub params: TrainParams,
    /// Milliseconds the node has to answer before the round goes on without it.
    pub deadline_ms: u64,
    /// When set, the node answers with the first message of secure aggregation instead of a
    /// [`ModelUpdate`], and its update is only ever seen summed with the others'.
    pub secure: Option<SecureRound>,
}

/// The [`crate::secagg::Setup::binding`] of a secure training round: the round's scale,
/// global model and training parameters. The node recomputes it from what it was sent.
pub fn training_binding(
    study_id: &str,
    round: u32,
    scale: f64,
    model: &GlobalModel,
    params: &TrainParams,
) -> [u8; 32] {
    crate::secagg::input_binding(&("training", study_id, round, scale, model, params))
}

/// The [`crate::secagg::Setup::binding`] of a study's secure feature statistics.
pub fn statistics_binding(study_id: &str, scale: f64) -> [u8; 32] {
    crate::secagg::input_binding(&("statistics", study_id, scale))
}

/// The secure-aggregation part of a [`RoundOpen`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureRound {
    /// The secure aggregation's parameters: parties, threshold, neighbours, dimension, encoding.
    pub setup: crate::secagg::Setup,
    /// Each party's site certificate (DER), indexed like `setup.parties`, so that nodes can
    /// check each other's key signatures against the consortium CA.
    pub certificates: Vec<Vec<u8>>,
    /// `1 / S`, S being the training rows of all parties (see [`crate::update_vector`]).
    pub scale: f64,
    /// `c`, the colluding sites the round's differential-privacy noise allows for: each
    /// site adds its share `σ²/(t − c)` (`t` the setup's threshold), so the honest sites of
    /// any decodable sum carry σ² together, and the sum's total noise is known. A site
    /// whose policy tolerates more colluders refuses the round.
    pub colluders: u32,
}

/// The aggregator asks for a study's feature statistics under secure aggregation (round 0
/// of the study's secure-aggregation exchanges). The node answers like a secure
/// [`RoundOpen`], with its signed keys; its vector is described in
/// [`crate::update_vector::encode_statistics`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatisticsOpen {
    /// The study whose feature statistics are summed.
    pub study_id: String,
    /// The secure aggregation to sum them in.
    pub secure: SecureRound,
}

/// The aggregator asks for descriptive statistics of a cohort (a statistics study). With
/// `secure` the node answers like a secure [`RoundOpen`] (round 0 of the query), else with
/// a [`StatisticsReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatisticsQuery {
    /// What to compute: dataset, cohort, columns, noise and suppression.
    pub query: crate::fedstats::StatsQuery,
    /// With secure aggregation: its setup; `None` for a report in the clear.
    pub secure: Option<SecureRound>,
    /// For an iterative query (a Cox model, boosted trees): the step to answer.
    pub step: Option<QueryStep>,
}

/// One step of an iterative statistics query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueryStep {
    /// A Cox model's iteration: the coefficients to evaluate at.
    Cox(crate::cox::CoxStep),
    /// Boosted trees: the tree, level and ensemble so far (boxed: it is the largest).
    Trees(Box<crate::trees::TreeStep>),
}

impl QueryStep {
    /// The step's number, from 0: its secure-aggregation round.
    pub fn round(&self) -> u32 {
        match self {
            QueryStep::Cox(s) => s.iteration,
            QueryStep::Trees(s) => s.step,
        }
    }
}

/// A node's statistics vector (see [`crate::fedstats`]), sent in the clear (only for
/// queries without secure aggregation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatisticsReport {
    /// The query answered ([`crate::fedstats::StatsQuery::query_id`]).
    pub query_id: String,
    /// The site's statistics vector, laid out as [`crate::fedstats`] describes.
    pub vector: Vec<f64>,
}

/// The [`crate::secagg::Setup::binding`] of a statistics query.
pub fn query_binding(query: &crate::fedstats::StatsQuery, scale: f64) -> [u8; 32] {
    crate::secagg::input_binding(&("query", query, scale))
}

/// The binding of one step of an iterative query: the query, the scale and the step, so
/// that a masked input answers that step only.
pub fn step_binding(query: &crate::fedstats::StatsQuery, scale: f64, step: &QueryStep) -> [u8; 32] {
    crate::secagg::input_binding(&("step", query, scale, step))
}

/// A secure-aggregation message from the aggregator to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggToNode {
    /// The study (for a statistics query, the query's id).
    pub study_id: String,
    /// The round (0 for feature statistics and statistics queries).
    pub round: u32,
    /// The secure-aggregation server's message.
    pub message: crate::secagg::ServerMessage,
}

/// A node's secure-aggregation message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecAggFromNode {
    /// The study (for a statistics query, the query's id).
    pub study_id: String,
    /// The round (0 for feature statistics and statistics queries).
    pub round: u32,
    /// The node's secure-aggregation client message.
    pub message: crate::secagg::ClientMessage,
}

/// A node's local update for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelUpdate {
    /// The study.
    pub study_id: String,
    /// The round this update answers.
    pub round: u32,
    /// The locally trained parameters (same layout as [`GlobalModel::weights`]).
    pub weights: Vec<f64>,
    /// Training rows the update was computed from: the FedAvg weight.
    pub num_samples: u64,
    /// Mean training loss after local training.
    pub train_loss: f64,
    /// Evaluation of the round's *incoming* global model on the node's validation rows.
    pub evaluation: Evaluation,
}

/// Evaluate a model on the node's validation rows (used after the last round).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateRequest {
    /// The study.
    pub study_id: String,
    /// The round whose model this is (the study's last round after training).
    pub round: u32,
    /// The model to evaluate.
    pub model: GlobalModel,
}

/// A node's evaluation of the model of an [`EvaluateRequest`] on its validation rows: counts
/// and sums only, combinable across sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    /// The study.
    pub study_id: String,
    /// The round of the evaluated model.
    pub round: u32,
    /// The combinable evaluation summary.
    pub evaluation: Evaluation,
}

/// The aggregator's announcement of a finished round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundResult {
    /// The study.
    pub study_id: String,
    /// The round that finished.
    pub round: u32,
    /// The sites whose contributions were aggregated in the round.
    pub participants: Vec<String>,
    /// Their training losses' mean weighted by training rows; NaN when no loss is released
    /// (differentially private rounds).
    pub train_loss: f64,
    /// True when this was the study's last round.
    pub study_complete: bool,
}

/// A refusal or failure, sent instead of the expected response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What kind of refusal or failure.
    pub code: ErrorCode,
    /// Details in words, for logs and the operator.
    pub reason: String,
}

/// Error codes, shared by [`ErrorMessage`] and QUIC connection close codes. The numeric
/// values are part of the protocol: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer speaks a protocol version we do not.
    UnsupportedVersion,
    /// A frame or message could not be decoded.
    Malformed,
    /// A frame was larger than the receiver's limit.
    FrameTooLarge,
    /// The site is not on the aggregator's allow-list, or its hello names another site than
    /// its certificate.
    SiteNotAllowed,
    /// A message arrived that the receiver did not expect at this point.
    UnexpectedMessage,
    /// The message was well-formed but its content is invalid (e.g. wrong number of weights).
    InvalidContent,
    /// The node cannot serve the request (missing dataset or column).
    CannotServe,
    /// The sender is shutting down; all its studies are complete.
    StudiesComplete,
    /// Anything else; the reason says what.
    Internal,
    /// The aggregator is shutting down before its studies completed.
    ShuttingDown,
    /// A newer connection from the same site took this one's place (the node reconnected,
    /// or the site runs twice).
    Replaced,
    /// This aggregator instance is a standby (or stepped down): the reason names the active
    /// instance's address when one is known, as `...; try host:port`.
    NotActive,
}

impl ErrorCode {
    /// The QUIC application close code for this error (one mapping, used by both parties).
    pub fn to_close_code(self) -> u32 {
        match self {
            ErrorCode::StudiesComplete => 0,
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::SiteNotAllowed => 4,
            ErrorCode::UnexpectedMessage => 5,
            ErrorCode::InvalidContent => 6,
            ErrorCode::CannotServe => 7,
            ErrorCode::Internal => 8,
            ErrorCode::ShuttingDown => 9,
            ErrorCode::Replaced => 10,
            ErrorCode::NotActive => 11,
        }
    }

    /// The inverse of [`ErrorCode::to_close_code`]; unknown codes map to `Internal`.
    pub fn from_close_code(code: u64) -> ErrorCode {
        match code {
            0 => ErrorCode::StudiesComplete,
            1 => ErrorCode::UnsupportedVersion,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::SiteNotAllowed,
            5 => ErrorCode::UnexpectedMessage,
            6 => ErrorCode::InvalidContent,
            7 => ErrorCode::CannotServe,
            9 => ErrorCode::ShuttingDown,
            10 => ErrorCode::Replaced,
            11 => ErrorCode::NotActive,
            _ => ErrorCode::Internal,
        }
    }

    /// Whether a node should give up (true) or reconnect later (false) after the aggregator
    /// closed its connection with this code.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ErrorCode::StudiesComplete | ErrorCode::UnsupportedVersion | ErrorCode::SiteNotAllowed
        )
    }
}

impl ErrorCode {
    /// The address a [`ErrorCode::NotActive`] reason points to (`...; try host:port`).
    pub fn not_active_hint(reason: &str) -> Option<&str> {
        let (_, addr) = reason.rsplit_once("; try ")?;
        let addr = addr.trim();
        (!addr.is_empty() && addr.contains(':') && !addr.contains(char::is_whitespace))
            .then_some(addr)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::UnsupportedVersion => "unsupported protocol version",
            ErrorCode::Malformed => "malformed message",
            ErrorCode::FrameTooLarge => "frame too large",
            ErrorCode::SiteNotAllowed => "site not allowed",
            ErrorCode::UnexpectedMessage => "unexpected message",
            ErrorCode::InvalidContent => "invalid content",
            ErrorCode::CannotServe => "cannot serve the request",
            ErrorCode::StudiesComplete => "all studies complete",
            ErrorCode::Internal => "internal error",
            ErrorCode::ShuttingDown => "shutting down",
            ErrorCode::Replaced => "replaced by a newer connection from the same site",
            ErrorCode::NotActive => "not the active aggregator",
        };
        f.write_str(s)
    }
}
