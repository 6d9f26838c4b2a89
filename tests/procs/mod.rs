//! Shared by the tests that run `medfed` as processes: starting and stopping them, a PKI, the
//! Pima rows split across sites, and a site's config.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MEDFED: &str = env!("CARGO_BIN_EXE_medfed");

/// Child processes that are killed if the test ends before they exit.
pub struct Processes(pub Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Unnamed child processes, killed if the test ends before they exit.
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn medfed(args: &[&str]) -> Output {
    Command::new(MEDFED)
        .args(args)
        .output()
        .expect("run medfed")
}

/// Runs `medfed args`, which must succeed; its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = medfed(args);
    assert!(
        out.status.success(),
        "medfed {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `medfed args` with stdout and stderr in `dir/<name>.log`.
pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> (String, Child) {
    spawn_with(dir, name, args, &[])
}

/// As [`spawn`], with extra environment variables.
pub fn spawn_with(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> (String, Child) {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(MEDFED)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn medfed");
    (name.to_string(), child)
}

/// Waits for `child` to exit, up to `within`.
pub fn wait(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Waits for every process to exit successfully, naming the first that does not, with its
/// log.
pub fn all_succeed(dir: &Path, procs: &mut Processes, within: Duration) {
    for (name, child) in &mut procs.0 {
        let status = wait(child, within);
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} did not finish cleanly ({status:?}):\n{log}"
        );
    }
}

/// A free UDP port on loopback, for an aggregator.
pub fn free_udp_port() -> u16 {
    // Below the kernel's ephemeral range, so that no process's own port-0 socket (a node's
    // QUIC endpoint, started before the aggregator) can take it in the meantime.
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        use std::hash::{BuildHasher, Hasher};
        for _ in 0..200 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let port = low - 10_000 + (h.finish() % 10_000) as u16;
            if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A consortium PKI in `dir/pki` with the aggregator's certificate for localhost and one
/// per site.
pub fn pki(dir: &Path, sites: &[&str]) -> PathBuf {
    let pki = dir.join("pki");
    let p = pki.to_str().unwrap();
    ok(&["pki", "init", "--dir", p]);
    ok(&["pki", "issue", "--dir", p, "--aggregator", "localhost"]);
    for s in sites {
        ok(&["pki", "issue", "--dir", p, "--site", s]);
    }
    pki
}

/// The header and rows of the Pima training data.
pub fn pima() -> (String, Vec<String>) {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_tr.csv"),
    )
    .unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    (header, lines.map(str::to_string).collect())
}

/// The aggregator config listening on `port` for `sites` (PKI in `pki/`, as [`pki`] makes
/// it), with `out_dir` if given; `rest` is appended (studies and other tables).
pub fn aggregator_config(port: u16, out_dir: Option<&str>, sites: &[&str], rest: &str) -> String {
    let out = out_dir.map_or(String::new(), |o| format!("out_dir = {o:?}\n"));
    format!(
        "listen = \"127.0.0.1:{port}\"\n{out}[tls]\nca = \"pki/aggregator/localhost/ca.pem\"\n\
         cert = \"pki/aggregator/localhost/cert.pem\"\nkey = \"pki/aggregator/localhost/key.pem\"\n\
         [sites]\nallow = {sites:?}\n{rest}"
    )
}

/// Node config tables: serve dataset "pima" (its columns) by rule.
pub const SERVE_PIMA: &str = "[policy.rules]\ndatasets = [\"pima\"]\n\
    columns = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\", \"type\"]\n";
/// Node config tables: reconnect within a second (tests restart the aggregator).
pub const RECONNECT_FAST: &str = "[reconnect]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n";

/// The node config of `site` (PKI in `pki/`, its files named after it in the same
/// directory), dialling the aggregator on `port`, serving dataset "pima" from `csv`;
/// `extra` is appended (more keys or tables).
/// The dataset lets studies without differential privacy train on it (`exact_releases`):
/// the tests of training mechanics use exact models.
pub fn node_config(site: &str, port: u16, csv: &str, extra: &str) -> String {
    node_config_with(site, port, csv, "exact_releases = [\"training\"]\n", extra)
}

/// As [`node_config`], with `dataset` as the dataset's own keys (e.g. its `exact_releases`;
/// empty for the default policy: differential privacy for everything).
pub fn node_config_with(site: &str, port: u16, csv: &str, dataset: &str, extra: &str) -> String {
    format!(
        "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
         [tls]\nca = \"pki/sites/{site}/ca.pem\"\ncert = \"pki/sites/{site}/cert.pem\"\nkey = \"pki/sites/{site}/key.pem\"\n\
         [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
         [[dataset]]\nname = \"pima\"\npath = {csv:?}\n{dataset}{extra}"
    )
}

/// Has each site's operator approve, one by one, every exact `[[statistics]]` query of the
/// aggregator config `agg` (exact statistics are served only so): `medfed node approve
/// --force` with each node config in `nodes` (the nodes have not seen the queries yet).
pub fn approve_exact_queries(agg: &Path, nodes: &[PathBuf]) {
    let cfg = medfed_aggregator::config::AggregatorConfig::load(agg).unwrap();
    for s in cfg.statistics.iter().filter(|s| s.exact) {
        let hash = medfed_node::policy::query_hash(&s.query());
        for node in nodes {
            ok(&[
                "node",
                "approve",
                "--config",
                node.to_str().unwrap(),
                "--study",
                &hash,
                "--force",
            ]);
        }
    }
}
