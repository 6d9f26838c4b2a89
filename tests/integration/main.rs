//! Every integration test of the `medfed` binary, as modules of one test binary (one link
//! instead of one per file): run them all with `cargo test --test integration`, a file's
//! with `cargo test --test integration <file>::` (e.g. `e2e::`). The deterministic
//! simulation is its own binary (`cargo test --test sim`).
//!
//! The tests of a binary run at once, on threads of one process: none sets environment
//! variables or changes directory (child processes get theirs), and the process-wide
//! allocator below records only the threads that ask it to.

mod common;

mod aggregator_crash;
mod at_rest;
mod attacks;
mod audit;
mod canary;
mod cli;
mod console;
mod e2e;
mod examples;
mod frame_limit;
mod help;
mod high_availability;
mod hostile_site;
mod ingest;
mod jetstream;
mod multiclass;
mod node_check;
mod node_run_ingest;
mod omop;
mod ops;
mod preprocessing;
mod privacy;
mod quickstart;
mod revocation;
mod runtime_crash;
mod scoring;
mod silent_wrong;
mod statistics;
mod store_crash;
mod straggler;
mod studies;
mod survival;
mod transport_security;
mod trees;

/// Records the largest single allocation of the threads that ask it to
/// ([`medfed_alloc_meter::watch_this_thread`]): `frame_limit` checks that a frame over the
/// limit is never allocated.
#[global_allocator]
static ALLOCATOR: medfed_alloc_meter::Largest = medfed_alloc_meter::Largest;
