//! The parts of the `medfed` binary that its examples and tests share: plots, a federation
//! on one machine, and CSV text read and written with the `csv` crate.

#![forbid(unsafe_code)]

pub mod csv_text;
pub mod local;
pub mod plots;
pub mod statistics_cmd;
