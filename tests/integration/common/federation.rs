//! One federation's files, as most process tests set them up: a PKI, the Pima rows split
//! across the sites (`<site>.csv`), each site's node config (`<site>.toml`) and the
//! aggregator's (`aggregator.toml`), all in one directory and dialling one free port; then
//! the processes, started with their logs beside them.
//!
//! ```ignore
//! let fed = Federation::new(d)
//!     .sites(&["site-a", "site-b"])
//!     .aggregator(STUDY)
//!     .write();
//! let mut procs = fed.start();
//! ```

use std::path::{Path, PathBuf};
use std::process::Child;

use super::{
    EXACT_TRAINING, Processes, RECONNECT_FAST, SERVE_PIMA, aggregator_config,
    approve_exact_queries, node_config_with, pima, pki, spawn, spawn_aggregator, spawn_node,
};

/// Which of the Pima rows each site holds.
#[derive(Debug, Clone, Copy)]
pub enum Rows {
    /// Of n sites, site i holds rows i, i + n, i + 2n, ... (the default).
    Interleaved,
    /// Site i holds rows i mod k, i mod k + k, ...: with more than k sites, some hold the
    /// same rows.
    Every(usize),
    /// Consecutive blocks of ⌈rows / n⌉ rows, in the sites' order.
    Blocks,
}

/// Rewrites a row, given its index.
type EditRow = Box<dyn Fn(usize, &str) -> String>;

/// A federation's files, to be written in a directory: see the module's documentation.
pub struct Federation {
    dir: PathBuf,
    sites: Vec<String>,
    played: Vec<String>,
    rows: Rows,
    copies: Box<dyn Fn(usize) -> usize>,
    edit: EditRow,
    dataset: String,
    node_extra: Box<dyn Fn(&str) -> String>,
    out_dir: Option<String>,
    ops: bool,
    aggregator: String,
}

impl Federation {
    /// No sites yet; each site will serve its rows as dataset "pima" by rule, reconnect
    /// fast, and allow exact training ([`super::node_config`]); the aggregator writes to
    /// `out/` and runs no study.
    pub fn new(dir: &Path) -> Federation {
        Federation {
            dir: dir.to_path_buf(),
            sites: Vec::new(),
            played: Vec::new(),
            rows: Rows::Interleaved,
            copies: Box::new(|_| 1),
            edit: Box::new(|_, row| row.to_string()),
            dataset: EXACT_TRAINING.to_string(),
            node_extra: Box::new(|_| format!("{SERVE_PIMA}{RECONNECT_FAST}")),
            out_dir: Some("out".into()),
            ops: false,
            aggregator: String::new(),
        }
    }

    /// The sites that run a node: each has a certificate, rows and a node config, and is
    /// allowed by the aggregator.
    pub fn sites(mut self, sites: &[&str]) -> Federation {
        self.sites = sites.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sites the test plays itself: a certificate and a place on the allow-list, after
    /// [`Federation::sites`], but no rows and no node config.
    pub fn played_sites(mut self, sites: &[&str]) -> Federation {
        self.played = sites.iter().map(|s| s.to_string()).collect();
        self
    }

    /// How the rows are split ([`Rows::Interleaved`] by default).
    pub fn rows(mut self, rows: Rows) -> Federation {
        self.rows = rows;
        self
    }

    /// How many times site i's extract repeats its rows (once by default): larger extracts,
    /// for slower local training.
    pub fn copies(mut self, copies: impl Fn(usize) -> usize + 'static) -> Federation {
        self.copies = Box::new(copies);
        self
    }

    /// Rewrites each row (with its index among all the Pima rows) before the split.
    pub fn edit_rows(mut self, edit: impl Fn(usize, &str) -> String + 'static) -> Federation {
        self.edit = Box::new(edit);
        self
    }

    /// The dataset's own keys in each node config ([`EXACT_TRAINING`] by default; empty for
    /// the default policy, differential privacy for everything).
    pub fn dataset(mut self, keys: &str) -> Federation {
        self.dataset = keys.to_string();
        self
    }

    /// What is appended to a site's node config ([`SERVE_PIMA`] and [`RECONNECT_FAST`] by
    /// default).
    pub fn node_extra(mut self, extra: impl Fn(&str) -> String + 'static) -> Federation {
        self.node_extra = Box::new(extra);
        self
    }

    /// The aggregator's `out_dir` (`out` by default; `None` for its default).
    pub fn out_dir(mut self, dir: Option<&str>) -> Federation {
        self.out_dir = dir.map(str::to_string);
        self
    }

    /// Gives the aggregator an operations endpoint (`[ops]`) on a free TCP port
    /// ([`WrittenFederation::ops`]).
    pub fn ops(mut self) -> Federation {
        self.ops = true;
        self
    }

    /// What is appended to the aggregator's config: studies, statistics, other tables.
    pub fn aggregator(mut self, rest: &str) -> Federation {
        self.aggregator = rest.to_string();
        self
    }

    /// Writes the PKI, the extracts and the configs, on a free port.
    pub fn write(self) -> WrittenFederation {
        let d = &self.dir;
        let all: Vec<&str> = self
            .sites
            .iter()
            .chain(&self.played)
            .map(String::as_str)
            .collect();
        pki(d, &all);
        let (header, rows) = pima();
        let rows: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (self.edit)(i, r))
            .collect();
        let port = super::free_udp_port();
        let n = self.sites.len();
        for (i, site) in self.sites.iter().enumerate() {
            let part: Vec<&String> = match self.rows {
                Rows::Interleaved => rows.iter().skip(i).step_by(n).collect(),
                Rows::Every(k) => rows.iter().skip(i % k).step_by(k).collect(),
                Rows::Blocks => rows
                    .chunks(rows.len().div_ceil(n))
                    .nth(i)
                    .unwrap_or_default()
                    .iter()
                    .collect(),
            };
            let mut csv = format!("{header}\n");
            for _ in 0..(self.copies)(i) {
                for row in &part {
                    csv.push_str(row);
                    csv.push('\n');
                }
            }
            std::fs::write(d.join(format!("{site}.csv")), csv).unwrap();
            std::fs::write(
                d.join(format!("{site}.toml")),
                node_config_with(
                    site,
                    port,
                    &format!("{site}.csv"),
                    &self.dataset,
                    &(self.node_extra)(site),
                ),
            )
            .unwrap();
        }
        let fed = WrittenFederation {
            dir: self.dir.clone(),
            port,
            sites: self.sites.clone(),
            allowed: all.iter().map(|s| s.to_string()).collect(),
            out_dir: self.out_dir.clone(),
            ops: self.ops.then(super::free_tcp_addr),
            aggregator: d.join("aggregator.toml"),
        };
        fed.write_aggregator(&self.aggregator);
        fed
    }
}

/// A federation whose files are written: where they are, and its processes.
pub struct WrittenFederation {
    pub dir: PathBuf,
    /// The aggregator's UDP port.
    pub port: u16,
    /// The sites that run a node.
    pub sites: Vec<String>,
    /// Every site the aggregator allows.
    allowed: Vec<String>,
    out_dir: Option<String>,
    /// The address of the aggregator's operations endpoint, if it has one.
    pub ops: Option<String>,
    /// The aggregator's config.
    pub aggregator: PathBuf,
}

impl WrittenFederation {
    /// The node config of `site`.
    pub fn node(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.toml"))
    }

    /// Every site's node config, in the sites' order.
    pub fn nodes(&self) -> Vec<PathBuf> {
        self.sites.iter().map(|s| self.node(s)).collect()
    }

    /// (Re)writes the aggregator's config with `rest` appended.
    pub fn write_aggregator(&self, rest: &str) {
        let allowed: Vec<&str> = self.allowed.iter().map(String::as_str).collect();
        let ops = self
            .ops
            .as_ref()
            .map_or(String::new(), |a| format!("[ops]\nlisten = \"{a}\"\n"));
        std::fs::write(
            &self.aggregator,
            aggregator_config(
                self.port,
                self.out_dir.as_deref(),
                &allowed,
                &format!("{ops}{rest}"),
            ),
        )
        .unwrap();
    }

    /// Has every site's operator approve every exact statistics query of the aggregator's
    /// config ([`approve_exact_queries`]).
    pub fn approve_exact_queries(&self) {
        approve_exact_queries(&self.aggregator, &self.nodes());
    }

    /// Starts `site`'s node, its log in `<site>.log`.
    pub fn spawn_node(&self, site: &str) -> (String, Child) {
        spawn_node(&self.dir, site, &self.node(site))
    }

    /// Starts every site's node.
    pub fn spawn_nodes(&self) -> Vec<(String, Child)> {
        self.sites.iter().map(|s| self.spawn_node(s)).collect()
    }

    /// Starts the aggregator, its log in `aggregator.log`.
    pub fn spawn_aggregator(&self) -> (String, Child) {
        spawn_aggregator(&self.dir, "aggregator", &self.aggregator)
    }

    /// Starts the aggregator as `name` (its log in `<name>.log`), with `medfed`'s global
    /// options `global` (such as `--log-format json`).
    pub fn spawn_aggregator_as(&self, name: &str, global: &[&str]) -> (String, Child) {
        let config = self.aggregator.to_str().unwrap();
        let args: Vec<&str> = global
            .iter()
            .copied()
            .chain(["aggregator", "run", "--config", config])
            .collect();
        spawn(&self.dir, name, &args)
    }

    /// Starts the nodes, then the aggregator (the last process).
    pub fn start(&self) -> Processes {
        let mut procs = Processes(self.spawn_nodes());
        procs.0.push(self.spawn_aggregator());
        procs
    }

    /// Starts the aggregator (the first process), then the nodes.
    pub fn start_aggregator_first(&self) -> Processes {
        let mut procs = Processes(vec![self.spawn_aggregator()]);
        procs.0.extend(self.spawn_nodes());
        procs
    }

    /// The log of process `name` so far.
    pub fn log(&self, name: &str) -> String {
        super::log(&self.dir, name)
    }
}
