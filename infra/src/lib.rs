//! # medfed-infra
//!
//! The I/O that both hospital nodes and the aggregator run, written once:
//!
//! - [`pki`]: the consortium CA and per-party certificates (rcgen).
//! - [`store`]: the durable key-value store with atomic checkpoints (redb; sled with the cargo feature `sled`).
//! - [`auditlog`]: the append-only, signed compliance log.
//! - [`transport`]: QUIC endpoints with mutual TLS 1.3 (quinn + rustls/ring) and framed
//!   messages over QUIC streams.
//! - [`files`]: atomic file writes for exported artefacts.
//! - [`json_state`]: small JSON state files, kept in memory and written through.
//! - [`identity`]: signing and verifying secure-aggregation keys with site certificates.
//! - [`config`]: TOML config loading with errors that name the file and key.
//! - [`tls_errors`]: TLS and certificate failures in words, with dates.

#![forbid(unsafe_code)]

pub mod auditlog;
pub mod config;
pub mod files;
pub mod identity;
pub mod json_state;
pub mod pki;
pub mod store;
pub mod tls_errors;
pub mod transport;
