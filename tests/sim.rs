//! A deterministic simulated federation: the real study coordinator
//! (`medfed_protocol::study::Coordinator`), real hospital nodes (`medfed_node::Node`, with
//! their stores, compliance logs and privacy ledgers in files) and real secure aggregation,
//! on an in-memory network with a virtual clock, under seeded faults. In the spirit of
//! quinn-proto's test `Pair` and of FoundationDB's simulation testing.
//!
//! Each seed picks a mode (exact training in the clear, exact with secure aggregation,
//! differentially private with secure aggregation) and a fault plan:
//! - lossless: messages delayed by up to 400 ms (so reordered) and duplicated;
//! - lossy: also requests and answers dropped, nodes crashing and restarting (a new
//!   connection, their files kept), and the aggregator crashing and restarting from its
//!   last checkpoint (the coordinator's serialized state), losing everything in flight.
//!
//! After every step it checks:
//! 1. no model is released with fewer sites than the study's quorum, or a site not allowed;
//! 2. (secure modes) no site's input is in two different sums of one round, across attempts
//!    and aggregator restarts (two sums that differ by a site reveal its input);
//! 3. no node's privacy ledger is over its budget;
//! 4. the study ends (completed or failed, with a reason) within a bounded virtual time;
//! 5. (lossless) it completes, and its final model equals the fault-free run's.
//!
//! `MEDFED_SIM_SEEDS=N` runs N seeds (default 1,000); `MEDFED_SIM_SEED=S` runs seed S alone
//! and prints its trace. A failure names its seed and that command.

// The integration tests' helpers, for the Pima rows and node config tables.
#[path = "integration/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use medfed_aggregator::CertificateVerifiers;
use medfed_node::Node;
use medfed_node::config::NodeConfig;
use medfed_protocol::Message;
use medfed_protocol::export::ExportedModel;
use medfed_protocol::study::{
    Answer, Command, Coordinator, Ending, Failure, RequestId, SiteConn, StudyCheckpoint,
    StudyConfig, StudyEvent,
};
use medfed_protocol::time::{Clock, MockClock};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SITES: [&str; 4] = ["site-a", "site-b", "site-c", "site-d"];
const ROUNDS: u32 = 3;
const MIN_SITES: usize = 3;
/// The noise multiplier of the DP mode, and each site's budget: ε for exactly the
/// study's rounds, so a release charged twice (a retry's fresh noise) is refused.
const Z: f64 = 3.0;
const BUDGET_RELEASES: u32 = ROUNDS;
const DELTA: f64 = 1e-6;
/// Virtual time a study may take before it counts as stuck.
const MAX_VIRTUAL_MS: u64 = 4 * 3600 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Plain,
    SecureExact,
    SecureDp,
}

impl Mode {
    fn secure(self) -> bool {
        self != Mode::Plain
    }
}

/// What can go wrong in one seed's run.
#[derive(Debug, Clone)]
struct Faults {
    /// Largest delay of a message, in ms.
    max_delay: u64,
    /// Chance that a message is delivered twice.
    duplicate: f64,
    /// Chance that a request, or an answer, is lost.
    drop: f64,
    /// Node crashes (each at a random time, back after a random pause).
    node_crashes: u32,
    /// Aggregator crashes.
    aggregator_crashes: u32,
    /// Whether the operator stops the study at a random time.
    stop: bool,
}

impl Faults {
    fn none() -> Faults {
        Faults {
            max_delay: 0,
            duplicate: 0.0,
            drop: 0.0,
            node_crashes: 0,
            aggregator_crashes: 0,
            stop: false,
        }
    }

    fn lossless(&self) -> bool {
        self.drop == 0.0 && self.node_crashes == 0 && self.aggregator_crashes == 0 && !self.stop
    }

    fn draw(rng: &mut ChaCha8Rng) -> Faults {
        let mut f = Faults {
            max_delay: rng.random_range(1..400),
            duplicate: [0.0, 0.05, 0.2][rng.random_range(0..3)],
            ..Faults::none()
        };
        if rng.random_bool(0.5) {
            f.drop = [0.0, 0.02, 0.1][rng.random_range(0..3)];
            f.node_crashes = rng.random_range(0..3);
            f.aggregator_crashes = rng.random_range(0..3);
            f.stop = rng.random_bool(0.1);
        }
        f
    }
}

/// Built once for all seeds: the consortium PKI, each site's rows, the CA's trust.
struct World {
    dir: tempfile::TempDir,
    trust: medfed_infra::transport::Trust,
    certificates: BTreeMap<String, Vec<u8>>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempdir();
        let pki = dir.path().join("pki");
        medfed_infra::pki::init_ca(&pki, "sim", 30).unwrap();
        let mut certificates = BTreeMap::new();
        for site in SITES {
            let role = medfed_infra::pki::Role::Site(site.into());
            medfed_infra::pki::issue(&pki, &role, 30).unwrap();
            let cert =
                medfed_infra::transport::load_certs(&pki.join(format!("sites/{site}/cert.pem")))
                    .unwrap();
            certificates.insert(site.to_string(), cert[0].to_vec());
        }
        let (header, rows) = common::pima();
        for (i, site) in SITES.iter().enumerate() {
            let mut csv = format!("{header}\n");
            for row in rows.iter().skip(i).step_by(SITES.len()) {
                csv.push_str(row);
                csv.push('\n');
            }
            std::fs::write(dir.path().join(format!("{site}.csv")), csv).unwrap();
        }
        let trust =
            medfed_infra::transport::Trust::load(&medfed_infra::pki::ca_cert_path(&pki), None)
                .unwrap();
        World {
            dir,
            trust,
            certificates,
        }
    })
}

/// A temporary directory in memory where there is one (the nodes write their files often).
fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

fn study_config(mode: Mode) -> StudyConfig {
    let mut v = serde_json::json!({
        "id": "pima",
        "dataset": "pima",
        "model": "logistic",
        "features": ["glu", "bmi", "age"],
        "target": "type",
        "positive_class": "Yes",
        "rounds": ROUNDS,
        "min_sites": MIN_SITES,
        "wait_for_sites_secs": 30,
        "round_timeout_secs": 5,
        "decision_timeout_secs": 5,
        "training": { "local_epochs": 1, "batch_size": 16 },
        "secure_aggregation": { "enabled": mode.secure() },
    });
    if mode == Mode::SecureDp {
        v["privacy"] = serde_json::json!({
            "clip_norm": 1.0,
            "noise_multiplier": Z,
            "feature_ranges": [[0, 200], [0, 67], [21, 81]],
        });
    }
    serde_json::from_value(v).unwrap()
}

/// ε of `releases` releases at noise multiplier [`Z`]: a DP site's budget.
fn budget_epsilon(releases: u32) -> f64 {
    let mut ledger = medfed_protocol::dp::ledger::Ledger::default();
    for _ in 0..releases {
        ledger.record("pima", Z);
    }
    ledger.epsilon(None, DELTA)
}

/// Writes `site`'s node config into `dir`; its path.
fn node_config(dir: &Path, site: &str, mode: Mode) -> PathBuf {
    let w = world().dir.path();
    let pki = w.join("pki/sites").join(site);
    // The plain mode's studies send updates in the clear: the sites' rules allow it.
    let serve = if mode.secure() {
        common::SERVE_PIMA.to_string()
    } else {
        format!(
            "{}allow_without_secure_aggregation = true\n",
            common::SERVE_PIMA
        )
    };
    let dataset = if mode == Mode::SecureDp {
        String::new()
    } else {
        "exact_releases = [\"training\"]\n".to_string()
    };
    let eps = budget_epsilon(BUDGET_RELEASES);
    let text = format!(
        "site = \"{site}\"\n[aggregator]\naddress = \"127.0.0.1:1\"\nserver_name = \"localhost\"\n\
         [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
         [audit]\nlog = \"{site}-audit.log\"\nkey = \"{site}-audit.key\"\n[state]\ndir = \"{site}-state\"\n\
         [[dataset]]\nname = \"pima\"\npath = {csv:?}\n{dataset}{serve}\
         [policy.privacy]\nepsilon = {eps}\ntotal_epsilon = {eps}\ndelta = {DELTA}\n",
        ca = pki.join("ca.pem"),
        cert = pki.join("cert.pem"),
        key = pki.join("key.pem"),
        csv = w.join(format!("{site}.csv")),
    );
    let path = dir.join(format!("{site}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Something that happens at a time.
#[derive(Debug)]
enum Ev {
    /// A message reaches a node on connection `conn` (a request `id`, or a notification).
    ToNode {
        site: String,
        conn: u64,
        id: Option<RequestId>,
        msg: Message,
    },
    /// An answer reaches the aggregator's life `life`.
    ToAgg {
        life: u32,
        id: RequestId,
        conn: u64,
        answer: Answer,
    },
    /// A request's deadline, in the aggregator's life `life`.
    Expire {
        life: u32,
        id: RequestId,
    },
    CrashNode(String),
    RestartNode(String),
    CrashAggregator,
    RestartAggregator,
    /// The operator asks the study to stop (after the round in progress).
    Stop,
    /// A site's connection `conn` breaks (the transport gave up on a lost message).
    Reset {
        site: String,
        conn: u64,
    },
    /// The site dials again.
    Redial(String),
}

/// One seed's run.
struct Sim {
    mode: Mode,
    faults: Faults,
    cfg: StudyConfig,
    rng: ChaCha8Rng,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    configs: BTreeMap<String, PathBuf>,
    /// The virtual clock; `now` is its reading.
    clock: MockClock,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    nodes: BTreeMap<String, Node>,
    /// Each connected site's connection (to the aggregator's current life).
    conns: BTreeMap<String, u64>,
    next_conn: u64,
    coord: Option<Coordinator>,
    /// The aggregator's life (1, 2, ... after each restart).
    life: u32,
    /// Requests of the current life not answered yet: (site, connection).
    outstanding: BTreeMap<RequestId, (String, u64)>,
    /// The last checkpoint stored (what survives an aggregator crash).
    checkpoint: Option<StudyCheckpoint>,
    releases: Vec<ExportedModel>,
    /// Per round, each sum: (life, attempt, whose inputs).
    sums: BTreeMap<u32, Vec<(u32, u32, BTreeSet<String>)>>,
    records: usize,
    ending: Option<Ending>,
    trace: Vec<String>,
    verbose: bool,
    /// What happened: messages lost and duplicated, node and aggregator crashes.
    counts: Counts,
    /// Why the study failed, if it did.
    why: Option<String>,
}

/// What a run went through.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    lost: u64,
    duplicated: u64,
    node_crashes: u64,
    aggregator_crashes: u64,
    completed: u64,
    failed: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.node_crashes += o.node_crashes;
        self.aggregator_crashes += o.aggregator_crashes;
        self.completed += o.completed;
        self.failed += o.failed;
    }
}

type Outcome = Result<Option<Vec<f64>>, String>;

impl Sim {
    fn new(seed: u64, mode: Mode, faults: Faults, verbose: bool) -> Sim {
        let dir = tempdir();
        let configs = SITES
            .iter()
            .map(|s| (s.to_string(), node_config(dir.path(), s, mode)))
            .collect();
        Sim {
            mode,
            faults,
            cfg: study_config(mode),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            _dir: dir,
            configs,
            clock: MockClock::new(0),
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            nodes: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            coord: None,
            life: 0,
            outstanding: BTreeMap::new(),
            checkpoint: None,
            releases: Vec::new(),
            sums: BTreeMap::new(),
            records: 0,
            ending: None,
            trace: Vec::new(),
            verbose,
            counts: Counts::default(),
            why: None,
        }
    }

    fn note(&mut self, line: String) {
        let line = format!("{:>9} ms  {line}", self.now);
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.push(line);
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((t, self.seq), ev);
    }

    fn delay(&mut self) -> u64 {
        if self.faults.max_delay == 0 {
            1
        } else {
            self.rng.random_range(1..=self.faults.max_delay)
        }
    }

    fn lost(&mut self) -> bool {
        let lost = self.faults.drop > 0.0 && self.rng.random_bool(self.faults.drop);
        self.counts.lost += u64::from(lost);
        lost
    }

    /// Half the messages lost are lost with their connection (QUIC streams are reliable:
    /// what is lost for good is a connection that failed); the site dials again.
    fn maybe_reset(&mut self, site: &str, conn: u64) {
        if self.rng.random_bool(0.5) {
            let t = self.now + self.delay();
            self.at(
                t,
                Ev::Reset {
                    site: site.to_string(),
                    conn,
                },
            );
        }
    }

    fn twice(&mut self) -> bool {
        let twice = self.faults.duplicate > 0.0 && self.rng.random_bool(self.faults.duplicate);
        self.counts.duplicated += u64::from(twice);
        twice
    }

    fn start_node(&mut self, site: &str) -> Result<(), String> {
        let cfg = NodeConfig::load(&self.configs[site]).map_err(|e| e.to_string())?;
        let node = Node::new(cfg).map_err(|e| format!("{site} does not start: {e}"))?;
        self.nodes.insert(site.to_string(), node);
        Ok(())
    }

    fn connect(&mut self, site: &str) {
        self.next_conn += 1;
        self.conns.insert(site.to_string(), self.next_conn);
    }

    fn tell_sites(&mut self) {
        let w = world();
        let list: Vec<SiteConn> = self
            .conns
            .iter()
            .map(|(name, conn)| SiteConn {
                name: name.clone(),
                conn: *conn,
                certificate: w.certificates[name].clone(),
            })
            .collect();
        let now = self.now;
        if let Some(c) = &mut self.coord {
            c.sites(now, &list);
        }
    }

    fn start_aggregator(&mut self) {
        self.life += 1;
        self.outstanding.clear();
        self.note(format!(
            "aggregator life {} starts{}",
            self.life,
            match &self.checkpoint {
                Some(cp) => format!(" from the checkpoint after round {}", cp.round),
                None => String::new(),
            }
        ));
        self.coord = Some(Coordinator::new(
            self.cfg.clone(),
            SITES.iter().map(|s| s.to_string()),
            Box::new(CertificateVerifiers(world().trust.clone())),
            7,
            self.now,
            self.checkpoint.clone(),
            PathBuf::from("final.json"),
        ));
        // Every running node dials the new aggregator.
        let up: Vec<String> = self.nodes.keys().cloned().collect();
        self.conns.clear();
        for site in up {
            self.connect(&site);
        }
        self.tell_sites();
    }

    /// Runs the study to its end; the final model's weights if it completed.
    fn run(&mut self) -> Outcome {
        for site in SITES {
            self.start_node(site)?;
        }
        // Crashes land within the time a fault-free study takes (about 2.5 virtual s).
        let horizon = 3_000;
        for _ in 0..self.faults.node_crashes {
            let t = self.rng.random_range(0..horizon);
            let site = SITES[self.rng.random_range(0..SITES.len())].to_string();
            self.at(t, Ev::CrashNode(site));
        }
        for _ in 0..self.faults.aggregator_crashes {
            let t = self.rng.random_range(0..horizon);
            self.at(t, Ev::CrashAggregator);
        }
        if self.faults.stop {
            let t = self.rng.random_range(0..horizon);
            self.at(t, Ev::Stop);
        }
        self.start_aggregator();
        let mut steps = 0u64;
        loop {
            steps += 1;
            self.drain()?;
            if let Some(ending) = &self.ending {
                return match ending {
                    Ending::Completed(_) => {
                        self.counts.completed += 1;
                        let last = self.releases.last().ok_or("completed without a release")?;
                        Ok(Some(last.model.weights.clone()))
                    }
                    Ending::Failed(f) => {
                        self.counts.failed += 1;
                        let why = f.describe("pima");
                        self.note(format!("ended: {why}"));
                        self.why = Some(why);
                        Ok(None)
                    }
                };
            }
            if self.now > MAX_VIRTUAL_MS || steps > 1_000_000 {
                return Err(format!(
                    "the study has not ended after {} virtual ms and {steps} steps",
                    self.now
                ));
            }
            let timer = self.coord.as_ref().and_then(Coordinator::poll_timeout);
            let event = self.events.keys().next().copied();
            let take_event = match (event, timer) {
                (Some((t, _)), Some(tt)) => t <= tt,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => {
                    return Err(
                        "the coordinator waits for nothing and nothing is on its way".into(),
                    );
                }
            };
            if let (true, Some(key)) = (take_event, event) {
                let ev = self.events.remove(&key).ok_or("lost event")?;
                self.clock.advance_to(key.0);
                self.now = self.clock.now_ms();
                self.handle(ev)?;
            } else if let Some(t) = timer {
                self.clock.advance_to(t);
                self.now = self.clock.now_ms();
                let now = self.now;
                if let Some(c) = &mut self.coord {
                    c.handle_timeout(now);
                }
            }
        }
    }

    fn answer(&mut self, id: RequestId, answer: Answer) {
        if self.outstanding.remove(&id).is_none() {
            return;
        }
        let now = self.now;
        if let Some(c) = &mut self.coord {
            c.handle_answer(now, id, answer);
        }
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::ToNode {
                site,
                conn,
                id,
                msg,
            } => {
                if self.conns.get(&site) != Some(&conn) || !self.nodes.contains_key(&site) {
                    return Ok(()); // its connection is gone
                }
                let kind = msg.kind();
                let node = &self.nodes[&site];
                match id {
                    None => node.serve_one_way(msg),
                    Some(id) => {
                        let reply = self.rt.block_on(node.serve(msg));
                        self.note(format!("{site} answers {kind} #{id}: {}", reply.kind()));
                        let answer = match reply {
                            Message::Error(e) => Err(Failure::Refused {
                                code: e.code,
                                reason: e.reason,
                            }),
                            m => Ok(m),
                        };
                        if self.lost() {
                            self.note(format!("the answer to #{id} is lost"));
                            self.maybe_reset(&site, conn);
                        } else {
                            let life = self.life;
                            let t = self.now + self.delay();
                            self.at(
                                t,
                                Ev::ToAgg {
                                    life,
                                    id,
                                    conn,
                                    answer,
                                },
                            );
                        }
                    }
                }
                self.check_budget(&site)?;
            }
            Ev::ToAgg {
                life,
                id,
                conn,
                answer,
            } => {
                if life == self.life && self.outstanding.get(&id).is_some_and(|(_, c)| *c == conn) {
                    self.answer(id, answer);
                }
            }
            Ev::Expire { life, id } => {
                if life == self.life {
                    self.answer(id, Err(Failure::Transport("timed out".into())));
                }
            }
            Ev::CrashNode(site) => {
                if self.nodes.remove(&site).is_some() {
                    self.note(format!("{site} crashes"));
                    self.counts.node_crashes += 1;
                    self.conns.remove(&site);
                    let gone: Vec<RequestId> = self
                        .outstanding
                        .iter()
                        .filter(|(_, (s, _))| *s == site)
                        .map(|(id, _)| *id)
                        .collect();
                    self.tell_sites();
                    for id in gone {
                        self.answer(id, Err(Failure::Transport("connection lost".into())));
                    }
                    let t = self.now + self.rng.random_range(100..5_000);
                    self.at(t, Ev::RestartNode(site));
                }
            }
            Ev::RestartNode(site) => {
                self.note(format!("{site} restarts"));
                self.start_node(&site)?;
                if self.coord.is_some() {
                    self.connect(&site);
                    self.tell_sites();
                }
            }
            Ev::CrashAggregator => {
                if self.coord.take().is_some() {
                    self.note(format!("the aggregator (life {}) crashes", self.life));
                    self.counts.aggregator_crashes += 1;
                    self.outstanding.clear();
                    self.conns.clear();
                    let t = self.now + self.rng.random_range(100..5_000);
                    self.at(t, Ev::RestartAggregator);
                }
            }
            Ev::Reset { site, conn } => {
                if self.conns.get(&site) == Some(&conn) {
                    self.note(format!("{site}'s connection breaks"));
                    self.conns.remove(&site);
                    self.tell_sites();
                    let gone: Vec<RequestId> = self
                        .outstanding
                        .iter()
                        .filter(|(_, (s, c))| *s == site && *c == conn)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in gone {
                        self.answer(id, Err(Failure::Transport("connection lost".into())));
                    }
                    let t = self.now + self.rng.random_range(50..500);
                    self.at(t, Ev::Redial(site));
                }
            }
            Ev::Redial(site) => {
                if self.coord.is_some()
                    && self.nodes.contains_key(&site)
                    && !self.conns.contains_key(&site)
                {
                    self.note(format!("{site} dials again"));
                    self.connect(&site);
                    self.tell_sites();
                }
            }
            Ev::Stop => {
                self.note("the operator stops the study".into());
                if let Some(c) = &mut self.coord {
                    c.stop();
                }
            }
            Ev::RestartAggregator => {
                if let Some(cp) = &self.checkpoint
                    && cp.complete.is_some()
                {
                    // The driver reads a complete study's checkpoint and does not run it.
                    self.note("the checkpoint says the study is complete".into());
                    self.ending = Some(Ending::Completed(medfed_protocol::study::Completed {
                        rounds: ROUNDS,
                        validation: None,
                        missing: Vec::new(),
                        final_model: PathBuf::from("final.json"),
                    }));
                    return Ok(());
                }
                self.start_aggregator();
            }
        }
        Ok(())
    }

    /// Carries out the coordinator's commands.
    fn drain(&mut self) -> Result<(), String> {
        while let Some(command) = self.coord.as_mut().and_then(Coordinator::poll_command) {
            match command {
                Command::Request {
                    id,
                    site,
                    message,
                    timeout_ms,
                } => {
                    let life = self.life;
                    self.at(self.now + timeout_ms, Ev::Expire { life, id });
                    let Some(conn) = self.conns.get(&site).copied() else {
                        self.outstanding.insert(id, (site, 0));
                        self.at(
                            self.now,
                            Ev::ToAgg {
                                life,
                                id,
                                conn: 0,
                                answer: Err(Failure::Transport("not connected".into())),
                            },
                        );
                        continue;
                    };
                    self.outstanding.insert(id, (site.clone(), conn));
                    if self.lost() {
                        self.note(format!("request #{id} to {site} is lost"));
                        self.maybe_reset(&site, conn);
                        continue;
                    }
                    let copies = if self.twice() { 2 } else { 1 };
                    for _ in 0..copies {
                        let t = self.now + self.delay();
                        self.at(
                            t,
                            Ev::ToNode {
                                site: site.clone(),
                                conn,
                                id: Some(id),
                                msg: message.clone(),
                            },
                        );
                    }
                }
                Command::Notify { site, message } => {
                    if let Some(conn) = self.conns.get(&site).copied() {
                        let t = self.now + self.delay();
                        self.at(
                            t,
                            Ev::ToNode {
                                site,
                                conn,
                                id: None,
                                msg: message,
                            },
                        );
                    }
                }
                Command::Record(_) => self.records += 1,
                Command::Checkpoint(cp) => {
                    self.note(format!("checkpoint after round {}", cp.round));
                    self.checkpoint = Some(cp);
                }
                Command::Release { model, final_copy } => {
                    self.note(format!(
                        "release of round {} ({}){}",
                        model.round,
                        model.sites.join(", "),
                        if final_copy { ", final" } else { "" }
                    ));
                    // Invariant 1: never below quorum, never a stranger.
                    if model.sites.len() < self.cfg.min_sites {
                        return Err(format!(
                            "round {} released with {} sites, below the quorum of {}",
                            model.round,
                            model.sites.len(),
                            self.cfg.min_sites
                        ));
                    }
                    if let Some(s) = model.sites.iter().find(|s| !SITES.contains(&s.as_str())) {
                        return Err(format!(
                            "round {} released with a stranger: {s}",
                            model.round
                        ));
                    }
                    self.releases.push(*model);
                }
                Command::Event(StudyEvent::Aggregated {
                    round,
                    attempt,
                    sites,
                }) => {
                    let set: BTreeSet<String> = sites.into_iter().collect();
                    self.note(format!(
                        "round {round} attempt {attempt} summed {:?}",
                        set.iter().collect::<Vec<_>>()
                    ));
                    // Invariant 2: no site in two different sums of one round.
                    if self.mode.secure() {
                        for (life, a, other) in self.sums.get(&round).into_iter().flatten() {
                            if *other != set && other.intersection(&set).next().is_some() {
                                return Err(format!(
                                    "round {round}: two different sums share sites: {other:?} (life {life}, attempt {a}) and {set:?} (life {}, attempt {attempt}); their difference reveals inputs",
                                    self.life
                                ));
                            }
                        }
                    }
                    self.sums
                        .entry(round)
                        .or_default()
                        .push((self.life, attempt, set));
                }
                Command::Note { text, .. } => self.note(text),
                Command::Event(_) => {}
            }
        }
        if let Some(c) = &self.coord
            && let Some(e) = c.ending()
        {
            self.ending = Some(e.clone());
        }
        Ok(())
    }

    /// Invariant 3: a node's ledger within its budget.
    fn check_budget(&self, site: &str) -> Result<(), String> {
        if self.mode != Mode::SecureDp {
            return Ok(());
        }
        let dir = self.configs[site].with_file_name(format!("{site}-state"));
        let ledger = medfed_node::privacy::load_ledger(&medfed_node::privacy::ledger_path(&dir))?;
        let spent = ledger.epsilon(None, DELTA);
        let limit = budget_epsilon(BUDGET_RELEASES);
        if spent > limit + 1e-9 {
            return Err(format!(
                "{site} spent ε = {spent:.4}, over its budget of {limit:.4}"
            ));
        }
        Ok(())
    }
}

fn mode_of(seed: u64) -> Mode {
    [Mode::Plain, Mode::SecureExact, Mode::SecureDp][(seed % 3) as usize]
}

/// The fault-free run's final model, per mode.
fn reference(mode: Mode) -> Option<Vec<f64>> {
    static REF: OnceLock<BTreeMap<Mode, Option<Vec<f64>>>> = OnceLock::new();
    REF.get_or_init(|| {
        [Mode::Plain, Mode::SecureExact, Mode::SecureDp]
            .into_iter()
            .map(|m| {
                let mut sim = Sim::new(u64::MAX, m, Faults::none(), false);
                let out = sim.run();
                let trace = sim.trace.join("\n");
                let weights =
                    out.unwrap_or_else(|e| panic!("the fault-free {m:?} run: {e}\n{trace}"));
                assert!(
                    weights.is_some(),
                    "the fault-free {m:?} run did not complete:\n{trace}"
                );
                (m, weights)
            })
            .collect()
    })[&mode]
        .clone()
}

/// Runs one seed; what went wrong, with the trace's end.
type SeedResult = Result<(Mode, bool, Counts, Option<String>), String>;

fn run_seed(seed: u64, verbose: bool) -> SeedResult {
    let mode = mode_of(seed);
    let faults = Faults::draw(&mut ChaCha8Rng::seed_from_u64(seed));
    let want = reference(mode);
    let mut sim = Sim::new(seed, mode, faults.clone(), verbose);
    let out = sim.run();
    let failure = match out {
        Err(e) => Some(e),
        Ok(got) if faults.lossless() => match (&got, &want) {
            (None, _) => Some("a study under lossless faults did not complete".to_string()),
            // Secure aggregation rounds each site's vector to its fixed-point grid at
            // random (unbiased rounding), so its sums agree to the grid, not bitwise.
            (Some(g), Some(w))
                if mode == Mode::Plain && g != w
                    || mode == Mode::SecureExact
                        && (g.len() != w.len()
                            || g.iter().zip(w).any(|(a, b)| (a - b).abs() > 1e-5)) =>
            {
                Some(format!(
                    "the final model differs from the fault-free run's:\n  got  {g:?}\n  want {w:?}"
                ))
            }
            _ => None,
        },
        Ok(_) => None,
    };
    match failure {
        None => Ok((mode, faults.lossless(), sim.counts, sim.why.take())),
        Some(why) => {
            let tail: Vec<&String> = sim.trace.iter().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
            Err(format!(
                "seed {seed} ({mode:?}, {faults:?}): {why}\n  reproduce: MEDFED_SIM_SEED={seed} cargo test --test sim -- --nocapture\n  the trace's end:\n{}",
                tail.join("\n")
            ))
        }
    }
}

/// A failure's reason without the names and numbers that vary between seeds.
fn reason_class(why: &str) -> String {
    let why = why.split_once("because ").map_or(why, |(_, w)| w);
    let mut out = String::new();
    for part in why.split(' ').take(16) {
        let word = if part.starts_with("'site-") || part.starts_with("site-") {
            "<site>".to_string()
        } else if part.chars().any(|c| c.is_ascii_digit()) {
            "<n>".to_string()
        } else {
            part.to_string()
        };
        out.push_str(&word);
        out.push(' ');
    }
    out.trim_end().to_string()
}

#[test]
fn simulated_federation_keeps_its_invariants_under_faults() {
    if let Some(seed) = std::env::var("MEDFED_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        match run_seed(seed, true) {
            Ok((mode, _, counts, _)) => println!("seed {seed}: {mode:?}, {counts:?}"),
            Err(e) => panic!("{e}"),
        }
        return;
    }
    let seeds: u64 = std::env::var("MEDFED_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    // The references first (each thread would otherwise wait on the first to build them).
    reference(Mode::Plain);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let results: Vec<SeedResult> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (0..seeds)
                        .filter(|seed| seed % threads == t)
                        .map(|seed| run_seed(seed, false))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    // What the seeds went through (shown with --nocapture): the faults were real.
    let mut table: BTreeMap<(Mode, bool), (u64, Counts)> = BTreeMap::new();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for (mode, lossless, counts, why) in results.iter().flatten() {
        let row = table.entry((*mode, *lossless)).or_default();
        row.0 += 1;
        row.1.add(counts);
        if let Some(why) = why {
            *reasons.entry(reason_class(why)).or_default() += 1;
        }
    }
    println!(
        "mode         faults    seeds  completed  failed  lost  duplicated  node crashes  aggregator crashes"
    );
    for ((mode, lossless), (n, c)) in &table {
        println!(
            "{:<12} {:<8} {n:>6} {:>10} {:>7} {:>5} {:>11} {:>13} {:>19}",
            format!("{mode:?}"),
            if *lossless { "lossless" } else { "lossy" },
            c.completed,
            c.failed,
            c.lost,
            c.duplicated,
            c.node_crashes,
            c.aggregator_crashes
        );
    }
    let mut reasons: Vec<(u64, String)> = reasons.into_iter().map(|(r, n)| (n, r)).collect();
    reasons.sort_by(|a, b| b.cmp(a));
    println!("\nwhy the studies that failed (under lossy faults) failed:");
    for (n, why) in reasons.iter().take(12) {
        println!("{n:>6}  {why}");
    }
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    let headlines: Vec<&str> = failures
        .iter()
        .take(20)
        .filter_map(|f| f.lines().next())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed:\n{}\nthe first in full:\n{}",
        failures.len(),
        headlines.join("\n"),
        failures[0]
    );
}
