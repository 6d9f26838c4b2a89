//! The study coordinator (`medfed_protocol::study::Coordinator`) driven by events the fuzzer
//! chooses: sites connecting, disconnecting and reconnecting; answers to its requests
//! (what a real site answers, with real secure-aggregation clients, or that answer changed,
//! a failure, another message, a message decoded from the input) in any order, to real or
//! made-up request ids, twice; timeouts at arbitrary increasing times; the operator's stop;
//! a compliance log or a store that fails; and the aggregator crashing and resuming from
//! its last checkpoint.
//!
//! Checked after every event: nothing panics; a released model has at least `min_sites`
//! sites, all allowed and none twice; one event gives a bounded number of commands, and
//! time passing at one instant settles (no busy loop); an ended study asks nothing more and
//! waits for no timeout; its ending changes only when the driver reports a failed write;
//! and once the input runs out, honest sites and the clock bring every study to its end.

#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use medfed_protocol::codec::decode_payload;
use medfed_protocol::messages::*;
use medfed_protocol::metrics::Evaluation;
use medfed_protocol::model::ModelKind;
use medfed_protocol::secagg::sim::Identities;
use medfed_protocol::secagg::{Client, PartyId, Verifier};
use medfed_protocol::stats::FeatureStats;
use medfed_protocol::study::{
    Answer, Command, Coordinator, Ending, Failure, KeyVerifiers, RequestId, SiteConn,
    StudyCheckpoint, StudyConfig,
};
use medfed_protocol::{ErrorCode, Message, update_vector};

const SITES: [&str; 4] = ["a", "b", "c", "d"];
/// More commands than any one event can honestly give (announcements and secure rounds
/// give a few per site).
const MAX_COMMANDS_PER_EVENT: usize = 1_000;

struct Verifiers;

/// A cached identity set, as the coordinator's verifier.
struct Shared(&'static Identities);

impl Verifier for Shared {
    fn verify(&self, site: &str, message: &[u8], signature: &[u8]) -> bool {
        self.0.verify(site, message, signature)
    }
}

/// The signing identities of a set of parties, made once per process (there are at most
/// 2^4 sets of sites; making Ed25519 keys for every message was most of the time spent).
fn identities(parties: &[String]) -> &'static Identities {
    static CACHE: OnceLock<Mutex<HashMap<Vec<String>, &'static Identities>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .expect("not poisoned");
    cache
        .entry(parties.to_vec())
        .or_insert_with(|| Box::leak(Box::new(Identities::new(parties))))
}

/// One time in 64, and never once the input has run out.
fn rarely(u: &mut Unstructured) -> Result<bool> {
    Ok(!u.is_empty() && u.ratio(1, 64)?)
}

impl KeyVerifiers for Verifiers {
    fn verifier(&self, parties: &[(String, Vec<u8>)]) -> Result<Box<dyn Verifier + Send>, String> {
        let names: Vec<String> = parties.iter().map(|(n, _)| n.clone()).collect();
        Ok(Box::new(Shared(identities(&names))))
    }
}

fn config(u: &mut Unstructured, sites: usize) -> Result<StudyConfig> {
    let secure = u.ratio(1, 3)?;
    let private = !secure && u.ratio(1, 4)?;
    let min_sites = if secure {
        u.int_in_range(2..=sites)?
    } else {
        u.int_in_range(1..=sites)?
    };
    let mut v = serde_json::json!({
        "id": "pima",
        "dataset": "pima",
        "model": "logistic",
        "features": ["glu", "bmi"],
        "target": "type",
        "positive_class": "Yes",
        "rounds": u.int_in_range(1..=3u32)?,
        "min_sites": min_sites,
        "wait_for_sites_secs": u.int_in_range(0..=20u64)?,
        "round_timeout_secs": u.int_in_range(1..=10u64)?,
        "decision_timeout_secs": u.int_in_range(1..=10u64)?,
        "round_attempts": u.int_in_range(1..=3u32)?,
        "secure_aggregation": {
            "enabled": secure,
            "tolerated_colluders": u.int_in_range(0..=1u32)?,
        },
    });
    let o = v.as_object_mut().expect("an object");
    if private {
        o.insert(
            "privacy".into(),
            serde_json::json!({
                "clip_norm": 1.0,
                "noise_multiplier": 1.0,
                "feature_ranges": [[0, 200], [0, 70]],
            }),
        );
    }
    match u.int_in_range(0..=3u8)? {
        0 => {
            o.insert(
                "scheduling".into(),
                serde_json::json!({ "selection": "sample", "sample_fraction": 0.5 }),
            );
        }
        1 => {
            o.insert(
                "scheduling".into(),
                serde_json::json!({ "selection": "latency" }),
            );
        }
        _ => {}
    }
    if u.ratio(1, 4)? {
        o.insert(
            "server_optimizer".into(),
            serde_json::json!({ "kind": "fed_adam", "learning_rate": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.001 }),
        );
    }
    Ok(serde_json::from_value(v).expect("a valid study configuration"))
}

/// A federation of fake sites around one coordinator (the shape of the coordinator's unit
/// tests in protocol/src/study/tests.rs).
struct Fed {
    cfg: StudyConfig,
    allow: Vec<String>,
    coord: Coordinator,
    now: u64,
    /// Connected sites and their connection numbers.
    conns: BTreeMap<String, u64>,
    next_conn: u64,
    /// Each site's rows and what its update adds.
    rows: BTreeMap<String, u64>,
    /// Secure-aggregation clients by (site, round).
    clients: BTreeMap<(String, u32), (Client, Vec<String>)>,
    /// Requests not answered yet.
    inbox: VecDeque<(RequestId, String, Message)>,
    /// Requests answered, for repeats.
    answered: Vec<RequestId>,
    last_checkpoint: Option<StudyCheckpoint>,
    ending: Option<Ending>,
    restarts: u32,
}

impl Fed {
    fn new(u: &mut Unstructured) -> Result<Fed> {
        let n = u.int_in_range(2..=SITES.len())?;
        let cfg = config(u, n)?;
        let allow: Vec<String> = SITES[..n].iter().map(|s| s.to_string()).collect();
        let rows = allow
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), 50 + 25 * i as u64))
            .collect();
        let coord = Coordinator::new(
            cfg.clone(),
            allow.clone(),
            Box::new(Verifiers),
            u.arbitrary()?,
            0,
            None,
            PathBuf::from("final.json"),
        );
        Ok(Fed {
            cfg,
            allow,
            coord,
            now: 0,
            conns: BTreeMap::new(),
            next_conn: 0,
            rows,
            clients: BTreeMap::new(),
            inbox: VecDeque::new(),
            answered: Vec::new(),
            last_checkpoint: None,
            ending: None,
            restarts: 0,
        })
    }

    fn tell_sites(&mut self) {
        let list: Vec<SiteConn> = self
            .conns
            .iter()
            .map(|(n, c)| SiteConn {
                name: n.clone(),
                conn: *c,
                certificate: n.as_bytes().to_vec(),
            })
            .collect();
        self.coord.sites(self.now, &list);
    }

    /// Takes the coordinator's commands, checking each; `fail_io` makes the driver fail
    /// the first write it is asked for.
    fn pump(&mut self, u: &mut Unstructured) -> Result<()> {
        let mut count = 0;
        while let Some(c) = self.coord.poll_command() {
            count += 1;
            assert!(
                count <= MAX_COMMANDS_PER_EVENT,
                "one event gave over {MAX_COMMANDS_PER_EVENT} commands"
            );
            match c {
                Command::Request {
                    id, site, message, ..
                } => {
                    assert!(self.ending.is_none(), "an ended study asks {site}");
                    assert!(self.allow.contains(&site), "a request to '{site}'");
                    self.inbox.push_back((id, site, message));
                }
                Command::Notify { site, .. } => {
                    assert!(self.allow.contains(&site), "a notice to '{site}'");
                }
                Command::Release { model, final_copy } => {
                    let sites: BTreeSet<&String> = model.sites.iter().collect();
                    assert_eq!(sites.len(), model.sites.len(), "a site twice in a model");
                    assert!(
                        model.sites.len() >= self.cfg.min_sites,
                        "round {} released with {} site(s), min_sites {}",
                        model.round,
                        model.sites.len(),
                        self.cfg.min_sites
                    );
                    assert!(model.sites.iter().all(|s| self.allow.contains(s)));
                    assert!(model.round >= 1 && model.round <= self.cfg.rounds);
                    assert_eq!(model.model.weights.len(), self.cfg.features.len() + 1);
                    if rarely(u)? {
                        self.coord.io_failed("the model file cannot be written");
                        self.settle_ending(true);
                        return Ok(());
                    }
                    let _ = final_copy;
                }
                Command::Record(_) => {
                    if rarely(u)? {
                        self.coord.unlogged("the compliance log is full");
                        self.settle_ending(true);
                        return Ok(());
                    }
                }
                Command::Checkpoint(cp) => {
                    assert!(cp.round <= self.cfg.rounds);
                    if rarely(u)? {
                        self.coord.io_failed("the store is gone");
                        self.settle_ending(true);
                        return Ok(());
                    }
                    self.last_checkpoint = Some(cp);
                }
                Command::Event(_) | Command::Note { .. } => {}
            }
        }
        self.settle_ending(false);
        Ok(())
    }

    /// The ending appears once and stays, unless the driver reported a failed write.
    fn settle_ending(&mut self, io_failure: bool) {
        let now = self.coord.ending().cloned();
        match (&self.ending, &now) {
            (Some(before), Some(after)) if !io_failure => {
                assert_eq!(before, after, "the ending changed");
            }
            (Some(_), None) => panic!("the ending went away"),
            _ => {}
        }
        if now.is_some() {
            assert_eq!(self.coord.poll_timeout(), None, "an ended study waits");
            if io_failure {
                assert!(self.coord.poll_command().is_none());
            }
        }
        self.ending = now;
    }

    /// Time passes to `now`; the coordinator then waits for a later time, or nothing.
    fn advance(&mut self, u: &mut Unstructured, now: u64) -> Result<()> {
        self.now = self.now.max(now);
        for i in 0.. {
            self.coord.handle_timeout(self.now);
            self.pump(u)?;
            match self.coord.poll_timeout() {
                Some(t) if t <= self.now => {
                    assert!(i < 64, "timeouts at {t} keep firing at {}", self.now)
                }
                _ => break,
            }
        }
        Ok(())
    }

    /// What a real site answers.
    fn honest(&mut self, site: &str, msg: Message) -> Answer {
        if !self.conns.contains_key(site) {
            return Err(Failure::Transport("not connected".into()));
        }
        let rows = self.rows.get(site).copied().unwrap_or(1);
        let private = self.cfg.privacy.is_some();
        let kind = ModelKind::Logistic;
        let delta = rows as f64 / 1000.0;
        match msg {
            Message::StudyAnnouncement(a) => Ok(Message::StudyDecision(StudyDecision::Accept {
                study_id: a.study_id,
                training_rows: if private { 0 } else { rows },
                validation_rows: 0,
                feature_stats: (!a.secure_aggregation && !private).then(|| FeatureStats {
                    count: rows,
                    sum: vec![rows as f64; a.features.len()],
                    sum_sq: vec![2.0 * rows as f64; a.features.len()],
                    present: Vec::new(),
                }),
                target_classes: vec!["No".into(), "Yes".into()],
            })),
            Message::RoundOpen(r) => {
                let weights: Vec<f64> = r.model.weights.iter().map(|w| w + delta).collect();
                let mut evaluation = Evaluation::empty(kind);
                if !private {
                    evaluation.add_rows(&[0.8, 0.3], &[1.0, 0.0]);
                }
                match r.secure {
                    None => Ok(Message::ModelUpdate(ModelUpdate {
                        study_id: r.study_id,
                        round: r.round,
                        num_samples: if private { 0 } else { rows },
                        weights,
                        train_loss: 0.5,
                        evaluation,
                    })),
                    Some(sr) => {
                        let vector = if private {
                            vec![delta; r.model.weights.len()]
                        } else {
                            update_vector::encode(&weights, 0.5, rows, &evaluation, sr.scale)
                        };
                        self.join(site, r.round, sr, &vector)
                    }
                }
            }
            Message::StatisticsOpen(so) => {
                let d = self.cfg.features.len();
                let stats = FeatureStats {
                    count: rows,
                    sum: vec![rows as f64; d],
                    sum_sq: vec![2.0 * rows as f64; d],
                    present: Vec::new(),
                };
                let vector = update_vector::encode_statistics(&stats, so.secure.scale);
                self.join(site, 0, so.secure, &vector)
            }
            Message::SecAggToNode(m) => {
                let Some((client, parties)) = self.clients.get_mut(&(site.to_string(), m.round))
                else {
                    return Err(Failure::Refused {
                        code: ErrorCode::UnexpectedMessage,
                        reason: "no secure aggregation in progress".into(),
                    });
                };
                let ids = identities(parties);
                let me = client.me();
                match client.handle(m.message, ids, &ids.signer(me)) {
                    Ok(message) => Ok(Message::SecAggFromNode(SecAggFromNode {
                        study_id: m.study_id,
                        round: m.round,
                        message,
                    })),
                    Err(e) => Err(Failure::Refused {
                        code: ErrorCode::InvalidContent,
                        reason: e.to_string(),
                    }),
                }
            }
            Message::EvaluateRequest(r) => {
                let mut evaluation = Evaluation::empty(kind);
                evaluation.add_rows(&[0.9, 0.1, 0.7], &[1.0, 0.0, 1.0]);
                Ok(Message::EvaluationReport(EvaluationReport {
                    study_id: r.study_id,
                    round: r.round,
                    evaluation,
                }))
            }
            other => Err(Failure::Refused {
                code: ErrorCode::UnexpectedMessage,
                reason: format!("a site does not answer a {}", other.kind()),
            }),
        }
    }

    fn join(&mut self, site: &str, round: u32, sr: SecureRound, vector: &[f64]) -> Answer {
        let parties = sr.setup.parties.clone();
        let me = parties
            .iter()
            .position(|p| p == site)
            .ok_or_else(|| Failure::Refused {
                code: ErrorCode::InvalidContent,
                reason: "not a party".into(),
            })? as PartyId;
        let ids = identities(&parties);
        let mut seed = [0u8; 32];
        seed[0] = site.as_bytes()[0];
        seed[31] = round as u8;
        let (client, first) =
            Client::new(sr.setup, me, vector, &ids.signer(me), seed).map_err(|e| {
                Failure::Refused {
                    code: ErrorCode::InvalidContent,
                    reason: e.to_string(),
                }
            })?;
        self.clients
            .insert((site.to_string(), round), (client, parties));
        Ok(Message::SecAggFromNode(SecAggFromNode {
            study_id: self.cfg.id.clone(),
            round,
            message: first,
        }))
    }

    /// A site's honest answer, changed.
    fn tampered(&mut self, u: &mut Unstructured, site: &str, msg: Message) -> Result<Answer> {
        let honest = self.honest(site, msg);
        let Ok(mut m) = honest else {
            return Ok(honest);
        };
        let number = |u: &mut Unstructured| -> Result<f64> {
            Ok(match u.int_in_range(0..=5u8)? {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => -1e300,
                3 => 0.0,
                _ => f64::from(u.arbitrary::<i32>()?),
            })
        };
        match &mut m {
            Message::StudyDecision(StudyDecision::Accept {
                study_id,
                training_rows,
                feature_stats,
                target_classes,
                ..
            }) => match u.int_in_range(0..=4u8)? {
                0 => *training_rows = u.arbitrary()?,
                1 => *study_id = "another".into(),
                2 => {
                    if let Some(fs) = feature_stats {
                        fs.count = u.arbitrary()?;
                        if let Some(x) = fs.sum.first_mut() {
                            *x = number(u)?;
                        }
                    } else {
                        *feature_stats = Some(FeatureStats {
                            count: 1,
                            sum: vec![1.0],
                            sum_sq: vec![],
                            present: Vec::new(),
                        });
                    }
                }
                3 => *target_classes = vec![u.arbitrary::<String>()?],
                _ => *feature_stats = None,
            },
            Message::ModelUpdate(up) => match u.int_in_range(0..=5u8)? {
                0 => {
                    if let Some(w) = up.weights.first_mut() {
                        *w = number(u)?
                    }
                }
                1 => up.weights.push(0.0),
                2 => up.num_samples = u.arbitrary()?,
                3 => up.round = u.arbitrary()?,
                4 => up.train_loss = number(u)?,
                _ => {
                    up.evaluation = Evaluation::Regression {
                        rows: u.arbitrary()?,
                        sum_sq_error: number(u)?,
                        sum_y: number(u)?,
                        sum_y_sq: number(u)?,
                    }
                }
            },
            Message::EvaluationReport(r) => {
                if u.arbitrary()? {
                    r.round = u.arbitrary()?;
                } else {
                    r.evaluation = Evaluation::Classification {
                        rows: u.arbitrary()?,
                        log_loss_sum: number(u)?,
                        tp: u.arbitrary()?,
                        tn: 0,
                        fp: 0,
                        fn_: 0,
                        positive_scores: vec![0; u.int_in_range(0..=12usize)?],
                        negative_scores: vec![],
                    };
                }
            }
            Message::SecAggFromNode(s) => {
                if u.arbitrary()? {
                    s.round = u.arbitrary()?;
                } else {
                    s.study_id = "another".into();
                }
            }
            _ => {}
        }
        Ok(Ok(m))
    }

    fn answer(&mut self, id: RequestId, answer: Answer) {
        self.answered.push(id);
        self.coord.handle_answer(self.now, id, answer);
    }

    fn step(&mut self, u: &mut Unstructured) -> Result<()> {
        match u.int_in_range(0..=15u8)? {
            // The next request, answered as a real site would.
            0..=6 => match self.inbox.pop_front() {
                Some((id, site, msg)) => {
                    let a = self.honest(&site, msg);
                    self.answer(id, a);
                }
                None => {
                    let t = self.coord.poll_timeout().unwrap_or(self.now);
                    self.advance(u, t)?;
                }
            },
            // Any waiting request, answered as a real site would (out of order).
            7 => {
                if !self.inbox.is_empty() {
                    let i = u.choose_index(self.inbox.len())?;
                    if let Some((id, site, msg)) = self.inbox.remove(i) {
                        let a = self.honest(&site, msg);
                        self.answer(id, a);
                    }
                }
            }
            8 => {
                if let Some((id, site, msg)) = self.inbox.pop_front() {
                    let a = self.tampered(u, &site, msg)?;
                    self.answer(id, a);
                }
            }
            9 => {
                if let Some((id, _, _)) = self.inbox.pop_front() {
                    let a = if u.arbitrary()? {
                        Err(Failure::Transport("timed out".into()))
                    } else {
                        Err(Failure::Refused {
                            code: ErrorCode::CannotServe,
                            reason: u.arbitrary()?,
                        })
                    };
                    self.answer(id, a);
                }
            }
            // Another message, or one decoded from the input, to a request or a made-up id.
            10 => {
                let len = u.int_in_range(0..=128usize)?;
                let payload = u.bytes(len)?;
                let msg = match decode_payload(payload) {
                    Ok(m) => m,
                    Err(_) => {
                        let samples = medfed_fuzz::samples();
                        samples[u.choose_index(samples.len())?].1.clone()
                    }
                };
                let id = match u.int_in_range(0..=2u8)? {
                    0 if !self.inbox.is_empty() => {
                        let i = u.choose_index(self.inbox.len())?;
                        self.inbox.remove(i).map_or(0, |r| r.0)
                    }
                    1 if !self.answered.is_empty() => {
                        self.answered[u.choose_index(self.answered.len())?]
                    }
                    _ => u.arbitrary()?,
                };
                self.answer(id, Ok(msg));
            }
            // An answer given twice.
            11 => {
                if let Some((id, site, msg)) = self.inbox.front().cloned() {
                    let a = self.honest(&site, msg);
                    self.answer(id, a.clone());
                    self.answer(id, a);
                    self.inbox.pop_front();
                }
            }
            // Sites come and go.
            12 => {
                let site = self.allow[u.choose_index(self.allow.len())?].clone();
                if self.conns.contains_key(&site) && u.arbitrary()? {
                    self.conns.remove(&site);
                } else {
                    self.next_conn += 1;
                    self.conns.insert(site, self.next_conn);
                }
                self.tell_sites();
            }
            // The clock.
            13 => {
                let dt = u.int_in_range(0..=30_000u64)?;
                self.advance(u, self.now.saturating_add(dt))?;
            }
            // The operator, or a crash of the aggregator.
            14 => {
                if u.ratio(1, 3)? {
                    self.coord.stop();
                } else if self.restarts < 3 {
                    self.restart(u)?;
                }
            }
            // Everyone connects.
            _ => {
                for s in self.allow.clone() {
                    self.next_conn += 1;
                    self.conns.entry(s).or_insert(self.next_conn);
                }
                self.tell_sites();
            }
        }
        self.pump(u)
    }

    /// The aggregator restarts from its last checkpoint: a new coordinator, the requests
    /// of the old one unanswered (their answers may still arrive, to ids it never gave).
    fn restart(&mut self, u: &mut Unstructured) -> Result<()> {
        self.restarts += 1;
        self.coord = Coordinator::new(
            self.cfg.clone(),
            self.allow.clone(),
            Box::new(Verifiers),
            u.arbitrary()?,
            self.now,
            self.last_checkpoint.clone(),
            PathBuf::from("final.json"),
        );
        self.ending = None;
        if u.arbitrary()? {
            self.inbox.clear();
        }
        self.clients.clear();
        self.tell_sites();
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(mut fed) = Fed::new(&mut u) else {
        return;
    };
    for _ in 0..300 {
        if u.is_empty() || fed.step(&mut u).is_err() {
            break;
        }
    }
    // The input ran out: every site connects, answers what it is asked, and the clock
    // moves. Every study ends.
    let mut none = Unstructured::new(&[]);
    for s in fed.allow.clone() {
        fed.next_conn += 1;
        fed.conns.entry(s).or_insert(fed.next_conn);
    }
    fed.tell_sites();
    let _ = fed.pump(&mut none);
    for _ in 0..10_000 {
        if fed.coord.ending().is_some() {
            return;
        }
        match fed.inbox.pop_front() {
            Some((id, site, msg)) => {
                let a = fed.honest(&site, msg);
                fed.answer(id, a);
                let _ = fed.pump(&mut none);
            }
            None => {
                let t = fed
                    .coord
                    .poll_timeout()
                    .expect("a study that has not ended waits for an answer or a time");
                let _ = fed.advance(&mut none, t);
            }
        }
    }
    panic!("the study never ended");
});
