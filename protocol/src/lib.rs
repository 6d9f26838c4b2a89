//! # medfed-protocol
//!
//! The pure logic of medfed, shared by hospital nodes and the aggregator: no I/O, no clock,
//! no async. Everything here is deterministic, so thousands of simulated parties can run in
//! one test.
//!
//! ```text
//!   node                                   aggregator
//!   ----                                   ----------
//!   rows ─▶ stats::FeatureStats ──────────▶ merge ─▶ stats::Standardization
//!   rows ─▶ model::train_local  ─ update ─▶ model::federated_average ─▶ GlobalModel
//!   rows ─▶ metrics::Evaluation ──────────▶ merge ─▶ metrics::Metrics
//!            all carried by messages::Message, framed by codec
//! ```
//!
//! - [`messages`]: the versioned wire messages.
//! - [`audit`]: the compliance log format, RFC 6962 Merkle tree, verification.
//! - [`codec`]: length-prefixed framing with a size limit checked before allocation.
//! - [`hex`]: the one hexadecimal encoder and decoder.
//! - [`model`]: logistic, multinomial and linear regression, local mini-batch training, FedAvg.
//! - [`preprocess`]: a study's feature pipeline (categories, imputation), carried by its model.
//! - [`stats`]: combinable feature statistics for standardization.
//! - [`quant`]: fixed-point encoding into Z_2^32 / Z_2^64 with overflow checks.
//! - [`schedule`]: latency-aware choice of participants and deadlines for a round.
//! - [`secagg`]: secure aggregation (SecAgg / SecAgg+) client and server state machines.
//! - [`update_vector`]: what a node feeds into secure aggregation in a training round.
//! - [`metrics`]: exact metrics and the combinable per-site evaluation summary.
//! - [`export`]: the JSON layout of an exported global model.
//! - [`lease`]: the leadership lease of highly available aggregators.

pub mod audit;
pub mod codec;
pub mod cox;
pub mod dp;
pub mod export;
pub mod fedstats;
pub mod hex;
pub mod lease;
pub mod linalg;
pub mod messages;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod quant;
pub mod schedule;
pub mod secagg;
pub mod stats;
pub mod study;
pub mod survival;
pub mod time;
pub mod trees;
pub mod update_vector;

pub use codec::{DEFAULT_MAX_FRAME_BYTES, FrameError, PROTOCOL_VERSION};
pub use messages::{ErrorCode, Message};
