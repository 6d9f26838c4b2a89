//! # medfed-node
//!
//! The service a hospital runs next to its data. It loads its local datasets, dials out to
//! the consortium's aggregator over QUIC with its site certificate (the hospital opens no
//! inbound port), and answers the aggregator's requests: whether it takes part in a study
//! (with feature statistics), local model updates per round, and evaluations on its
//! validation rows. No patient row ever leaves: only aggregates do.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use medfed_node::{Node, config::NodeConfig};
//! let node = Node::new(NodeConfig::load("node.toml".as_ref())?)?;
//! let exit = node.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod announced;
pub mod at_rest;
pub mod check;
pub mod client;
pub mod columns;
pub mod config;
pub mod data;
pub mod deid;
pub mod ingest;
pub mod policy;
pub mod privacy;
pub mod reconnect;
pub mod runtime;
mod secure;
pub mod statistics;

pub use client::{Node, NodeError, NodeExit};
