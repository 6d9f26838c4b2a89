//! What the integration tests share: running `medfed` as processes (and stopping them when
//! a test ends), a consortium PKI, the Pima rows, node and aggregator configs, a whole
//! federation's files ([`Federation`]), and an aggregator in this process with raw clients
//! that can misbehave ([`inproc`]).
#![allow(dead_code)]

mod federation;
pub mod inproc;
pub mod postgres;

pub use federation::{Federation, Rows, WrittenFederation};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MEDFED: &str = env!("CARGO_BIN_EXE_medfed");

/// Named child processes (their logs are `<dir>/<name>.log`), killed if the test ends
/// before they exit.
#[derive(Default)]
pub struct Processes(pub Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
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

/// The arguments of `medfed aggregator model export --config <aggregator> --study <study>`,
/// then `more` (`--round N`, `--out FILE`).
pub fn model_export<'a>(aggregator: &'a Path, study: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let config = aggregator.to_str().unwrap();
    let mut args = vec![
        "aggregator",
        "model",
        "export",
        "--config",
        config,
        "--study",
        study,
    ];
    args.extend(more);
    args
}

/// The arguments of `medfed model evaluate --model <model> --data <data> --target type`,
/// then `more`.
pub fn model_evaluate<'a>(model: &'a Path, data: &'a Path, more: &[&'a str]) -> Vec<&'a str> {
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let mut args = vec![
        "model", "evaluate", "--model", model, "--data", data, "--target", "type",
    ];
    args.extend(more);
    args
}

/// Runs `medfed args`: whether it succeeded, and its stdout and stderr.
pub fn run(args: &[&str]) -> (bool, String) {
    let out = medfed(args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
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

/// `medfed node run --config <config>`, as [`spawn`].
pub fn spawn_node(dir: &Path, name: &str, config: &Path) -> (String, Child) {
    spawn(
        dir,
        name,
        &["node", "run", "--config", config.to_str().unwrap()],
    )
}

/// `medfed aggregator run --config <config>`, as [`spawn`].
pub fn spawn_aggregator(dir: &Path, name: &str, config: &Path) -> (String, Child) {
    spawn(
        dir,
        name,
        &["aggregator", "run", "--config", config.to_str().unwrap()],
    )
}

/// The log of process `name` (as [`spawn`] started it) so far; empty if there is none.
pub fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Waits for `child` to exit, up to `within`.
pub fn wait(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Waits for every process to exit successfully, naming the first that does not, with its
/// log.
pub fn all_succeed(dir: &Path, procs: &mut Processes, within: Duration) {
    for (name, child) in &mut procs.0 {
        let status = wait(child, within);
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} did not finish cleanly ({status:?}):\n{}",
            log(dir, name)
        );
    }
}

/// Polls `done` until it is true; fails the test if `within` passes first.
pub fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the log of process `name` in `dir` says `needle`.
pub fn until_logged(dir: &Path, name: &str, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !log(dir, name).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{name} did not log {needle:?}:\n{}",
            log(dir, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free UDP port on loopback, for an aggregator; never the same one twice in this
/// process (its tests run at once, and a port is free only until its aggregator binds it).
pub fn free_udp_port() -> u16 {
    free_port(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// A free TCP port on loopback (a NATS server's, an operations endpoint's), on the same
/// terms as [`free_udp_port`]: two tests running at once once drew the same port from the
/// kernel, and one test's NATS client reached the other test's server.
pub fn free_tcp_port() -> u16 {
    free_port(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A port `bindable` can bind, never handed out before in this process.
fn free_port(bindable: impl Fn(u16) -> bool) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let free = |port: u16| !given.contains(&port) && bindable(port);
    // Below the kernel's ephemeral range, so that no process's own port-0 socket (a node's
    // QUIC endpoint, a client's connection) can take it in the meantime.
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut port = None;
    if low > 12_000 {
        use std::hash::{BuildHasher, Hasher};
        for _ in 0..200 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            let p = low - 10_000 + (h.finish() % 10_000) as u16;
            if free(p) {
                port = Some(p);
                break;
            }
        }
    }
    let port = port.unwrap_or_else(|| {
        (1024..=u16::MAX)
            .rev()
            .find(|p| free(*p))
            .expect("a free port on loopback")
    });
    given.push(port);
    port
}

/// A free TCP address on loopback (an operations endpoint's).
pub fn free_tcp_addr() -> String {
    format!("127.0.0.1:{}", free_tcp_port())
}

/// A consortium PKI in `dir/pki` with the aggregator's certificate for localhost and one
/// per site.
pub fn pki(dir: &Path, sites: &[&str]) -> PathBuf {
    let pki = dir.join("pki");
    pki_at(&pki, sites);
    pki
}

/// As [`pki`], in the directory `pki`.
pub fn pki_at(pki: &Path, sites: &[&str]) {
    let p = pki.to_str().unwrap();
    let made = ok(&["pki", "init", "--dir", p]);
    assert!(made.contains("consortium CA created"), "{made}");
    ok(&["pki", "issue", "--dir", p, "--aggregator", "localhost"]);
    for s in sites {
        ok(&["pki", "issue", "--dir", p, "--site", s]);
    }
}

/// The Pima training data (examples/data/pima_tr.csv).
pub fn pima_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_tr.csv")
}

/// The header and rows of the Pima training data.
pub fn pima() -> (String, Vec<String>) {
    let text = std::fs::read_to_string(pima_csv()).unwrap();
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

/// The keys of a logistic study `id` of the Pima rows: dataset "pima", the seven clinical
/// features, target `type`, positive class "Yes" (a `study create` spec starts so).
pub fn pima_study_keys(id: &str) -> String {
    format!(
        "id = \"{id}\"\ndataset = \"pima\"\nmodel = \"logistic\"\n\
         features = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\"]\n\
         target = \"type\"\npositive_class = \"Yes\"\n"
    )
}

/// The `[[study]]` of an aggregator config: [`pima_study_keys`], then `keys` (rounds,
/// quorum, timeouts, the study's tables).
pub fn pima_study(id: &str, keys: &str) -> String {
    format!("[[study]]\n{}{keys}", pima_study_keys(id))
}

/// Node config tables: serve dataset "pima" (its columns) by rule.
pub const SERVE_PIMA: &str = "[policy.rules]\ndatasets = [\"pima\"]\n\
    columns = [\"npreg\", \"glu\", \"bp\", \"skin\", \"bmi\", \"ped\", \"age\", \"type\"]\n";
/// A key of `[policy.rules]`, right after [`SERVE_PIMA`]: serve studies without secure
/// aggregation too.
pub const ALLOW_PLAIN: &str = "allow_without_secure_aggregation = true\n";
/// Node config tables: reconnect within a second (tests restart the aggregator).
pub const RECONNECT_FAST: &str = "[reconnect]\ninitial_backoff_ms = 100\nmax_backoff_ms = 1000\n";

/// The node config of `site` (PKI in `pki/`, its files named after it in the same
/// directory), dialling the aggregator on `port`, serving dataset "pima" from `csv`;
/// `extra` is appended (more keys or tables).
/// The dataset lets studies without differential privacy train on it (`exact_releases`):
/// the tests of training mechanics use exact models.
pub fn node_config(site: &str, port: u16, csv: &str, extra: &str) -> String {
    node_config_with(site, port, csv, EXACT_TRAINING, extra)
}

/// The dataset keys of [`node_config`]: exact models may be trained on it.
pub const EXACT_TRAINING: &str = "exact_releases = [\"training\"]\n";

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

/// `medfed node check --config <config> --timeout <secs>`: whether it passed, and its
/// stdout and stderr (which must not show a panic).
pub fn node_check(config: &Path, timeout_secs: u32) -> (bool, String) {
    let (good, text) = run(&[
        "node",
        "check",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        &timeout_secs.to_string(),
    ]);
    assert!(!text.contains("panicked"), "{text}");
    (good, text)
}

/// An example's binary, beside this test binary (target/<profile>/examples); `cargo test
/// --workspace` builds them.
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} not built: `cargo test --workspace` builds the examples",
        path.display()
    );
    path
}

/// Starts `worker` 50 times, each time killing it (SIGKILL) after a random delay (seeded by
/// `seed`): 1–14 ms for the first 10 lives, while its store may still be being created, then
/// `later` ms; runs `check` (the stored state against its stored offset) after every kill.
/// The offsets `check` returned, in order.
pub fn kill_50_times(
    worker: impl Fn() -> Command,
    seed: u64,
    later: std::ops::Range<u64>,
    check: impl Fn() -> u64,
) -> Vec<u64> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut offsets = Vec::new();
    for kill in 0..50 {
        let mut child = worker().spawn().unwrap();
        let delay = if kill < 10 {
            rng.random_range(1..15)
        } else {
            rng.random_range(later.clone())
        };
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        offsets.push(check());
    }
    offsets
}

/// This test binary, set to run only its test `test` (its whole name, `module::test`) as a
/// worker process, with `var` set to `value` (without it the test does nothing) and its
/// output discarded.
pub fn worker(test: &str, var: &str, value: &str) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(var, value)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// `medfed node status --json` of `site`: its ledger entry for `study` (null if none).
pub fn spent(d: &Path, site: &str, study: &str) -> serde_json::Value {
    let cfg = d.join(format!("{site}.toml"));
    let status: serde_json::Value = serde_json::from_str(&ok(&[
        "node",
        "status",
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    status["privacy"]["studies"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["study"] == study).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// A federation of `sites` set up in `d` from `tests/fixtures/<fixtures>/`, started (the
/// aggregator first): each site's rows (`<site>.csv`, copied beside its config) and node
/// config `node(site, port)`, dialling a free port; the aggregator runs `rest` (after its
/// listen address, TLS and allow-list, writing to `out/`); each site's operator has
/// approved its exact `[[statistics]]` queries one by one.
pub fn fixture_federation(
    d: &Path,
    sites: &[&str],
    fixtures: &str,
    node: impl Fn(&str, u16) -> String,
    rest: &str,
) -> Processes {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixtures);
    pki(d, sites);
    let port = free_udp_port();
    let mut nodes = Vec::new();
    for site in sites {
        std::fs::copy(
            from.join(format!("{site}.csv")),
            d.join(format!("{site}.csv")),
        )
        .unwrap();
        let config = d.join(format!("{site}.toml"));
        std::fs::write(&config, node(site, port)).unwrap();
        nodes.push(config);
    }
    let agg = d.join("aggregator.toml");
    std::fs::write(&agg, aggregator_config(port, Some("out"), sites, rest)).unwrap();
    approve_exact_queries(&agg, &nodes);
    let mut procs = Processes(vec![spawn_aggregator(d, "aggregator", &agg)]);
    for (site, config) in sites.iter().zip(&nodes) {
        procs.0.push(spawn_node(d, site, config));
    }
    procs
}

/// `medfed audit report --format json` of the compliance log `log`, verified with `key`.
pub fn audit_report(log: &Path, key: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&[
        "audit",
        "report",
        "--log",
        log.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--format",
        "json",
    ]))
    .unwrap()
}
