//! The coordinator's transitions, one test each, with a scripted federation: fake sites
//! that answer its requests at once (and real secure-aggregation clients for secure
//! rounds), and a clock moved by hand.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::messages::{EvaluationReport, SecAggFromNode, SecureRound};
use crate::secagg::sim::Identities;
use crate::secagg::{Client, PartyId};

/// How a fake site behaves.
#[derive(Debug, Clone)]
struct Site {
    /// Refuse the study with this reason.
    refuse: Option<String>,
    /// Never answer (a transport failure each time).
    silent: bool,
    /// Declared rows.
    rows: u64,
    /// Target classes named.
    classes: Vec<String>,
    /// What its update adds to each weight.
    delta: f64,
    /// Send updates of a wrong width.
    hostile: bool,
}

impl Default for Site {
    fn default() -> Self {
        Site {
            refuse: None,
            silent: false,
            rows: 100,
            classes: vec!["No".into(), "Yes".into()],
            delta: 0.1,
            hostile: false,
        }
    }
}

struct Verifiers;

impl KeyVerifiers for Verifiers {
    fn verifier(&self, parties: &[(String, Vec<u8>)]) -> Result<Box<dyn Verifier + Send>, String> {
        let names: Vec<String> = parties.iter().map(|(n, _)| n.clone()).collect();
        Ok(Box::new(Identities::new(&names)))
    }
}

/// A federation around one coordinator.
struct Fed {
    coord: Coordinator,
    now: u64,
    sites: BTreeMap<String, Site>,
    conns: BTreeMap<String, u64>,
    /// Secure-aggregation clients, by (site, round), with the parties of their setup.
    clients: BTreeMap<(String, u32), (Client, Vec<String>)>,
    /// Every command the coordinator gave that is not a request.
    seen: Vec<Command>,
    /// Every request: (site, message kind).
    asked: Vec<(String, &'static str)>,
    /// Requests not answered yet.
    inbox: std::collections::VecDeque<(RequestId, String, Message)>,
}

fn config(extra: serde_json::Value) -> StudyConfig {
    let mut v = serde_json::json!({
        "id": "pima",
        "dataset": "pima",
        "model": "logistic",
        "features": ["glu", "bmi"],
        "target": "type",
        "positive_class": "Yes",
        "rounds": 3,
        "min_sites": 2,
        "wait_for_sites_secs": 10,
        "round_timeout_secs": 5,
        "secure_aggregation": { "enabled": false },
    });
    if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    serde_json::from_value(v).unwrap()
}

fn dp() -> serde_json::Value {
    serde_json::json!({
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "feature_ranges": [[0, 200], [0, 70]],
    })
}

impl Fed {
    fn new(cfg: StudyConfig, sites: &[(&str, Site)]) -> Fed {
        Fed::resumed(cfg, sites, None)
    }

    fn resumed(cfg: StudyConfig, sites: &[(&str, Site)], cp: Option<StudyCheckpoint>) -> Fed {
        let allow: Vec<String> = sites.iter().map(|(n, _)| n.to_string()).collect();
        Fed {
            coord: Coordinator::new(
                cfg,
                allow,
                Box::new(Verifiers),
                7,
                0,
                cp,
                PathBuf::from("final.json"),
            ),
            now: 0,
            sites: sites
                .iter()
                .map(|(n, s)| (n.to_string(), s.clone()))
                .collect(),
            conns: BTreeMap::new(),
            clients: BTreeMap::new(),
            seen: Vec::new(),
            asked: Vec::new(),
            inbox: Default::default(),
        }
    }

    /// Connects `names` (a new connection for one already connected).
    fn connect(&mut self, names: &[&str]) {
        for n in names {
            *self.conns.entry(n.to_string()).or_default() += 1;
        }
        self.tell_sites();
    }

    fn disconnect(&mut self, name: &str) {
        self.conns.remove(name);
        self.tell_sites();
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
        self.pump();
    }

    /// Takes the coordinator's commands (requests into the inbox).
    fn pump(&mut self) {
        while let Some(c) = self.coord.poll_command() {
            match c {
                Command::Request {
                    id, site, message, ..
                } => {
                    self.asked.push((site.clone(), message.kind()));
                    self.inbox.push_back((id, site, message));
                }
                other => self.seen.push(other),
            }
        }
    }

    /// One step: answers the requests waiting (those they lead to wait for the next
    /// step), or moves the clock to the next timeout. False once the study has ended.
    fn step(&mut self) -> bool {
        self.pump();
        if self.coord.ending().is_some() {
            return false;
        }
        if self.inbox.is_empty() {
            let t = self
                .coord
                .poll_timeout()
                .expect("the coordinator waits for nothing");
            self.now = self.now.max(t);
            self.coord.handle_timeout(self.now);
        } else {
            for (id, site, message) in std::mem::take(&mut self.inbox) {
                let answer = self.answer(&site, message);
                self.coord.handle_answer(self.now, id, answer);
            }
        }
        self.pump();
        true
    }

    /// Steps until `done` holds (or the study ends).
    fn run_until(&mut self, done: impl Fn(&Fed) -> bool) {
        for _ in 0..10_000 {
            if done(self) || !self.step() {
                return;
            }
        }
        panic!("never got there");
    }

    /// Runs until the study ends.
    fn run(&mut self) -> Ending {
        self.run_until(|_| false);
        self.coord.ending().cloned().expect("ended")
    }

    /// Whether round `r` has been aggregated.
    fn aggregated(&self, r: u32) -> bool {
        self.seen.iter().any(
            |c| matches!(c, Command::Event(StudyEvent::Aggregated { round, .. }) if *round == r),
        )
    }

    fn answer(&mut self, site: &str, msg: Message) -> Answer {
        let s = self.sites.get(site).cloned().unwrap_or_default();
        if !self.conns.contains_key(site) {
            return Err(Failure::Transport("not connected".into()));
        }
        if s.silent {
            return Err(Failure::Transport("timed out".into()));
        }
        let kind = crate::model::ModelKind::Logistic;
        match msg {
            Message::StudyAnnouncement(a) => Ok(Message::StudyDecision(match &s.refuse {
                Some(reason) => StudyDecision::Refuse {
                    study_id: a.study_id,
                    reason: reason.clone(),
                },
                None => StudyDecision::Accept {
                    study_id: a.study_id,
                    training_rows: if a.privacy.is_some() { 0 } else { s.rows },
                    validation_rows: 0,
                    feature_stats: (!a.secure_aggregation && a.privacy.is_none()).then(|| {
                        FeatureStats {
                            count: s.rows,
                            sum: vec![s.rows as f64; a.features.len()],
                            sum_sq: vec![2.0 * s.rows as f64; a.features.len()],
                            present: Vec::new(),
                        }
                    }),
                    target_classes: s.classes.clone(),
                },
            })),
            Message::RoundOpen(r) => {
                let width = r.model.weights.len() + usize::from(s.hostile);
                let weights: Vec<f64> = (0..width)
                    .map(|i| r.model.weights.get(i).copied().unwrap_or(0.0) + s.delta)
                    .collect();
                let mut evaluation = Evaluation::empty(kind);
                evaluation.add_rows(&[0.8, 0.3], &[1.0, 0.0]);
                match r.secure {
                    None => Ok(Message::ModelUpdate(ModelUpdate {
                        study_id: r.study_id,
                        round: r.round,
                        num_samples: if self.coord.config().privacy.is_some() {
                            0
                        } else {
                            s.rows
                        },
                        weights,
                        train_loss: 0.5,
                        evaluation: if self.coord.config().privacy.is_some() {
                            Evaluation::empty(kind)
                        } else {
                            evaluation
                        },
                    })),
                    Some(sr) => {
                        let vector = if self.coord.config().privacy.is_some() {
                            vec![s.delta; r.model.weights.len()]
                        } else {
                            update_vector::encode(&weights, 0.5, s.rows, &evaluation, sr.scale)
                        };
                        self.join(site, r.round, sr, &vector)
                    }
                }
            }
            Message::StatisticsOpen(so) => {
                let d = self.coord.config().features.len();
                let stats = FeatureStats {
                    count: s.rows,
                    sum: vec![s.rows as f64; d],
                    sum_sq: vec![2.0 * s.rows as f64; d],
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
                let ids = Identities::new(parties);
                let me = parties.iter().position(|p| p == site).unwrap() as PartyId;
                match client.handle(m.message, &ids, &ids.signer(me)) {
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
        let me = parties.iter().position(|p| p == site).unwrap() as PartyId;
        let ids = Identities::new(&parties);
        let mut seed = [0u8; 32];
        seed[..site.len().min(32)].copy_from_slice(&site.as_bytes()[..site.len().min(32)]);
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
            study_id: self.coord.config().id.clone(),
            round,
            message: first,
        }))
    }

    fn releases(&self) -> Vec<&ExportedModel> {
        self.seen
            .iter()
            .filter_map(|c| match c {
                Command::Release { model, .. } => Some(&**model),
                _ => None,
            })
            .collect()
    }

    fn finals(&self) -> Vec<&ExportedModel> {
        self.seen
            .iter()
            .filter_map(|c| match c {
                Command::Release {
                    model,
                    final_copy: true,
                } => Some(&**model),
                _ => None,
            })
            .collect()
    }

    fn checkpoints(&self) -> Vec<&StudyCheckpoint> {
        self.seen
            .iter()
            .filter_map(|c| match c {
                Command::Checkpoint(cp) => Some(cp),
                _ => None,
            })
            .collect()
    }

    fn records(&self) -> Vec<&AuditEvent> {
        self.seen
            .iter()
            .filter_map(|c| match c {
                Command::Record(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn asked_for(&self, kind: &str) -> usize {
        self.asked.iter().filter(|(_, k)| *k == kind).count()
    }
}

fn three() -> Vec<(&'static str, Site)> {
    vec![
        ("a", Site::default()),
        (
            "b",
            Site {
                delta: 0.2,
                rows: 300,
                ..Site::default()
            },
        ),
        (
            "c",
            Site {
                delta: 0.3,
                ..Site::default()
            },
        ),
    ]
}

fn completed(e: &Ending) -> &Completed {
    match e {
        Ending::Completed(c) => c,
        Ending::Failed(f) => panic!("not completed: {f:?}"),
    }
}

fn failed(e: &Ending) -> &StudyFailure {
    match e {
        Ending::Failed(f) => f,
        Ending::Completed(c) => panic!("not failed: {c:?}"),
    }
}

#[test]
fn it_waits_for_every_allowed_site_then_starts_at_once() {
    let mut fed = Fed::new(config(serde_json::json!({})), &three());
    fed.connect(&["a", "b"]);
    assert_eq!(fed.asked_for("study announcement"), 0, "waits for c");
    assert_eq!(fed.coord.poll_timeout(), Some(10_000));
    fed.connect(&["c"]);
    assert_eq!(fed.asked_for("study announcement"), 3);
}

#[test]
fn after_the_wait_it_starts_with_a_quorum_or_fails_without_one() {
    let mut fed = Fed::new(config(serde_json::json!({})), &three());
    fed.connect(&["a", "b"]);
    fed.now = 10_000;
    fed.coord.handle_timeout(fed.now);
    fed.pump();
    assert_eq!(fed.asked_for("study announcement"), 2);
    completed(&fed.run());

    let mut fed = Fed::new(config(serde_json::json!({})), &three());
    fed.connect(&["a"]);
    let e = fed.run();
    let f = failed(&e);
    assert!(
        matches!(f, StudyFailure::NoQuorum { got: 1, need: 2, detail } if detail.contains("waited 10 s")),
        "{f:?}"
    );
    assert!(fed.releases().is_empty());
}

#[test]
fn a_plain_study_runs_every_round_releases_each_model_and_evaluates_the_last() {
    let mut fed = Fed::new(config(serde_json::json!({})), &three());
    fed.connect(&["a", "b", "c"]);
    let e = fed.run();
    let c = completed(&e);
    assert_eq!(c.rounds, 3);
    assert!(c.missing.is_empty());
    // Three rounds, each released once; the last as final.json with its validation.
    let rounds: Vec<u32> = fed.releases().iter().map(|m| m.round).collect();
    assert_eq!(rounds, [1, 2, 3]);
    let last = fed.finals();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].validation.as_ref().map(|m| m.rows()), Some(9));
    assert!(c.validation.is_some());
    // Each round's model is the rows-weighted average: (0.1·100 + 0.2·300 + 0.3·100)/500 =
    // 0.2 per round, from zero: 0.6 after three.
    for w in &last[0].model.weights {
        assert!((w - 0.6).abs() < 1e-9, "{w}");
    }
    assert_eq!(last[0].training_rows, 500);
    // A checkpoint after every round, and one of the completed study.
    let cps = fed.checkpoints();
    assert_eq!(
        cps.iter().map(|c| c.round).collect::<Vec<_>>(),
        [1, 2, 3, 3]
    );
    assert!(cps[3].complete.is_some() && cps[2].complete.is_none());
    // The decisions are recorded, and the sites told each round's result.
    assert_eq!(fed.records().len(), 3);
    let notified = fed
        .seen
        .iter()
        .filter(|c| matches!(c, Command::Notify { .. }))
        .count();
    assert_eq!(notified, 9);
    assert_eq!(fed.asked_for("evaluate request"), 3);
}

#[test]
fn refusals_that_leave_too_few_sites_fail_the_study_and_are_recorded() {
    let refuse = Site {
        refuse: Some("not approved".into()),
        ..Site::default()
    };
    let mut fed = Fed::new(
        config(serde_json::json!({})),
        &[("a", Site::default()), ("b", refuse.clone()), ("c", refuse)],
    );
    fed.connect(&["a", "b", "c"]);
    let e = fed.run();
    let f = failed(&e);
    assert!(
        matches!(f, StudyFailure::NoQuorum { got: 1, need: 2, detail } if detail.contains("too few sites accepted")),
        "{f:?}"
    );
    let refusals = fed
        .records()
        .iter()
        .filter(|e| {
            matches!(
                e,
                AuditEvent::StudyDecision {
                    accepted: false,
                    ..
                }
            )
        })
        .count();
    assert_eq!(refusals, 2);
    assert!(fed.seen.iter().any(|c| matches!(
        c,
        Command::Event(StudyEvent::Refused { site, .. }) if site == "b"
    )));
}

#[test]
fn a_positive_class_no_site_names_stops_the_study_before_round_1() {
    let mut fed = Fed::new(
        config(serde_json::json!({ "positive_class": "yes" })),
        &three(),
    );
    fed.connect(&["a", "b", "c"]);
    let e = fed.run();
    match failed(&e) {
        StudyFailure::Failed(why) => {
            assert!(why.contains(r#"fix: positive_class = "Yes""#), "{why}");
        }
        f => panic!("{f:?}"),
    }
    assert_eq!(fed.asked_for("round open"), 0);
}

#[test]
fn a_failed_attempt_is_retried_after_a_pause_and_a_lasting_one_fails_truthfully() {
    // c is silent: with a quorum of 3, no attempt can succeed.
    let mut sites = three();
    sites[2].1.silent = true;
    let mut fed = Fed::new(
        config(serde_json::json!({ "min_sites": 3, "round_attempts": 2 })),
        &sites,
    );
    fed.connect(&["a", "b", "c"]);
    // c gives no decision: two participants, fewer than the quorum of 3.
    let e = fed.run();
    assert!(matches!(
        failed(&e),
        StudyFailure::NoQuorum {
            got: 2,
            need: 3,
            ..
        }
    ));

    // Now c accepts but sends no update: round 1's attempts fail, each after a pause.
    let mut fed = Fed::new(
        config(serde_json::json!({ "min_sites": 3, "round_attempts": 2 })),
        &three(),
    );
    fed.connect(&["a", "b", "c"]);
    fed.run_until(|f| f.aggregated(1));
    // Round 1 ran; c is silent from now on.
    fed.sites.get_mut("c").unwrap().silent = true;
    let e = fed.run();
    let f = failed(&e);
    // Round 1 was released before: the study ended early, its model exported.
    let StudyFailure::EndedEarly { cause, round } = f else {
        panic!("{f:?}")
    };
    assert_eq!(*round, 1);
    assert!(
        matches!(&**cause, StudyFailure::NoQuorum { got: 2, need: 3, detail } if detail.contains("round 2, 2 attempt(s)")),
        "{cause:?}"
    );
    let fin = fed.finals();
    assert_eq!(fin.len(), 1);
    assert_eq!(fin[0].round, 1);
    assert!(
        fin[0]
            .stopped
            .as_deref()
            .unwrap()
            .contains("only 2 of the 3")
    );
    // Two attempts of round 2, one second apart.
    let failures = fed
        .seen
        .iter()
        .filter(|c| matches!(c, Command::Event(StudyEvent::RoundFailed { round: 2, .. })))
        .count();
    assert_eq!(failures, 2);
    assert!(fed.now >= 1000);
}

#[test]
fn the_operator_stops_it_at_the_next_round_and_the_last_model_is_kept() {
    let mut fed = Fed::new(config(serde_json::json!({ "rounds": 10 })), &three());
    fed.connect(&["a", "b"]);
    fed.coord.stop();
    fed.connect(&["c"]);
    let e = fed.run();
    // Stopped before round 1: nothing released.
    assert!(matches!(failed(&e), StudyFailure::Stopped { round: 0 }));
    assert!(fed.releases().is_empty());

    let mut fed = Fed::new(config(serde_json::json!({ "rounds": 10 })), &three());
    fed.sites.get_mut("c").unwrap().silent = true;
    fed.connect(&["a", "b", "c"]);
    fed.run_until(|f| f.aggregated(2));
    fed.coord.stop();
    let e = fed.run();
    let StudyFailure::EndedEarly { cause, round } = failed(&e) else {
        panic!("{e:?}")
    };
    // It stops at the start of the round after the one running when it was asked to.
    assert!(matches!(**cause, StudyFailure::Stopped { round: r } if r == *round));
    assert_eq!(fed.finals()[0].round, *round);
    assert!(
        fed.finals()[0]
            .stopped
            .as_deref()
            .unwrap()
            .contains("stopped by the operator")
    );
    // c never took part: it is named missing, with why.
    let missing = &fed.finals()[0].missing_sites;
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].site, "c");
    assert!(
        missing[0].reason.contains("no study decision"),
        "{missing:?}"
    );
}

#[test]
fn a_site_that_did_not_answer_the_start_is_asked_again_when_it_reconnects() {
    // Quorum 3 of 3; c does not answer the announcement (a node restarting).
    let cfg = config(serde_json::json!({ "min_sites": 3 }));
    let mut sites = three();
    sites[2].1.silent = true;
    let mut fed = Fed::new(cfg.clone(), &sites);
    fed.connect(&["a", "b", "c"]);
    fed.step();
    fed.pump();
    assert!(fed.coord.ending().is_none(), "it waits for c, not fails");
    assert_eq!(fed.asked_for("study announcement"), 3);
    // Nothing changes: it is not asked again on the same connection.
    fed.coord.handle_timeout(fed.now + 1_000);
    fed.pump();
    assert_eq!(fed.asked_for("study announcement"), 3);
    // c comes back on a new connection, and answers now.
    fed.sites.get_mut("c").unwrap().silent = false;
    fed.connect(&["c"]);
    assert_eq!(fed.asked_for("study announcement"), 4, "only c, once more");
    let e = fed.run();
    assert_eq!(completed(&e).missing, []);

    // One that never comes back: the study fails when the wait for sites ends, saying so.
    let mut fed = Fed::new(cfg, &sites);
    fed.connect(&["a", "b", "c"]);
    let e = fed.run();
    let f = failed(&e);
    assert!(
        matches!(f, StudyFailure::NoQuorum { got: 2, need: 3, detail } if detail.contains("waited 10 s for the others")),
        "{f:?}"
    );
    assert!(fed.now >= 10_000, "it waited: {}", fed.now);
}

#[test]
fn a_reconnected_site_is_announced_again_and_leaves_if_it_now_refuses() {
    let mut fed = Fed::new(config(serde_json::json!({ "rounds": 3 })), &three());
    fed.connect(&["a", "b", "c"]);
    assert_eq!(fed.asked_for("study announcement"), 3);
    fed.run_until(|f| f.aggregated(1));
    // During the study c reconnects (a new connection) and now refuses.
    fed.sites.get_mut("c").unwrap().refuse = Some("policy changed".into());
    fed.connect(&["c"]);
    let e = fed.run();
    let c = completed(&e);
    assert_eq!(
        fed.asked_for("study announcement"),
        4,
        "c asked again, once"
    );
    let reconnect = fed.records().iter().any(|e| {
        matches!(e, AuditEvent::StudyDecision { accepted: false, reason, .. } if reason.contains("refused on reconnecting"))
    });
    assert!(reconnect);
    // c's data is in round 1 only; it is named as having left.
    assert_eq!(c.missing.len(), 1);
    assert!(
        c.missing[0].reason.contains("left the study"),
        "{:?}",
        c.missing
    );
}

#[test]
fn hostile_and_unknown_answers_do_not_enter_the_average() {
    let mut sites = three();
    sites[2].1.hostile = true;
    let mut fed = Fed::new(config(serde_json::json!({ "rounds": 1 })), &sites);
    fed.connect(&["a", "b", "c"]);
    // An answer to a request that does not exist is ignored.
    fed.coord.handle_answer(
        0,
        999_999,
        Ok(Message::EvaluateRequest(EvaluateRequest {
            study_id: "pima".into(),
            round: 1,
            model: GlobalModel::zeros(
                crate::model::ModelKind::Logistic,
                vec![],
                crate::stats::Standardization {
                    mean: vec![],
                    std: vec![],
                },
            ),
        })),
    );
    let e = fed.run();
    completed(&e);
    let fin = fed.finals();
    assert_eq!(fin[0].sites, ["a", "b"], "c's update had a wrong width");
}

#[test]
fn a_differentially_private_study_releases_no_count_and_cuts_hostile_deltas() {
    let mut sites = three();
    sites[2].1.delta = 1e5; // far beyond an honest noisy delta
    let mut fed = Fed::new(
        config(serde_json::json!({ "rounds": 1, "privacy": dp() })),
        &sites,
    );
    fed.connect(&["a", "b", "c"]);
    let e = fed.run();
    let c = completed(&e);
    assert!(c.validation.is_none(), "no evaluation under DP");
    assert_eq!(fed.asked_for("evaluate request"), 0);
    let fin = fed.finals();
    assert_eq!(fin[0].training_rows, 0);
    assert!(fin[0].train_loss.is_nan());
    // c's delta is cut to C + σ(√d + 8) per site: the average stays bounded.
    let bound = 1.0 + 2.0 * ((3.0f64).sqrt() + 8.0);
    for w in &fin[0].model.weights {
        assert!(w.abs() <= (0.1 + 0.2 + bound) / 3.0 + 1e-9, "{w}");
    }
}

#[test]
fn a_secure_study_sums_the_statistics_and_updates_and_reaches_the_plain_model() {
    let secure =
        serde_json::json!({ "secure_aggregation": { "enabled": true, "tolerated_colluders": 0 } });
    let mut fed = Fed::new(config(secure), &three());
    fed.connect(&["a", "b", "c"]);
    let e = fed.run();
    let c = completed(&e);
    // The feature statistics (round 0), three rounds and the final evaluation (round 4),
    // each a secure aggregation.
    let sums: BTreeSet<u32> = fed
        .seen
        .iter()
        .filter_map(|c| match c {
            Command::Event(StudyEvent::Aggregated { round, sites, .. }) => {
                assert_eq!(sites.len(), 3);
                Some(*round)
            }
            _ => None,
        })
        .collect();
    assert_eq!(sums, BTreeSet::from([0, 1, 2, 3, 4]));
    assert_eq!(c.validation.as_ref().map(|m| m.rows()), Some(6));
    let mut plain = Fed::new(config(serde_json::json!({})), &three());
    plain.connect(&["a", "b", "c"]);
    plain.run();
    let (s, p) = (
        &fed.finals()[0].model.weights,
        &plain.finals()[0].model.weights,
    );
    for (a, b) in s.iter().zip(p.iter()) {
        assert!((a - b).abs() < 1e-5, "{s:?} vs {p:?}");
    }
}

#[test]
fn a_secure_round_that_loses_a_site_is_retried_without_it() {
    let secure = serde_json::json!({
        "rounds": 2,
        "secure_aggregation": { "enabled": true, "tolerated_colluders": 0 },
        "privacy": dp(),
    });
    let mut fed = Fed::new(config(secure), &three());
    fed.connect(&["a", "b", "c"]);
    fed.run_until(|f| f.aggregated(1));
    fed.disconnect("c");
    let e = fed.run();
    let c = completed(&e);
    assert_eq!(fed.finals()[0].sites, ["a", "b"]);
    assert_eq!(c.missing.len(), 1);
    assert!(
        c.missing[0]
            .reason
            .contains("disconnected after its update was in 1 round"),
        "{:?}",
        c.missing
    );
}

#[test]
fn a_log_that_cannot_record_stops_everything_at_once() {
    let mut fed = Fed::new(config(serde_json::json!({})), &three());
    fed.connect(&["a", "b"]);
    fed.coord.unlogged("disk full");
    fed.connect(&["c"]);
    assert!(matches!(
        fed.coord.ending(),
        Some(Ending::Failed(StudyFailure::Unlogged(_)))
    ));
    assert_eq!(fed.asked_for("study announcement"), 0);
    assert!(fed.coord.poll_command().is_none());
    let mut fed = Fed::new(config(serde_json::json!({})), &three());
    fed.connect(&["a", "b", "c"]);
    fed.coord.io_failed("cannot write round-0001.json");
    assert!(matches!(
        fed.coord.ending(),
        Some(Ending::Failed(
            StudyFailure::EndedEarly { .. } | StudyFailure::Failed(_)
        ))
    ));
}

#[test]
fn a_resumed_study_goes_on_after_its_checkpoint_and_a_complete_one_is_not_run_again() {
    let mut fed = Fed::new(config(serde_json::json!({})), &three());
    fed.connect(&["a", "b", "c"]);
    fed.run();
    let cps: Vec<StudyCheckpoint> = fed.checkpoints().into_iter().cloned().collect();
    let want = fed.finals()[0].model.weights.clone();
    // From the checkpoint after round 1.
    let mut again = Fed::resumed(
        config(serde_json::json!({})),
        &three(),
        Some(cps[0].clone()),
    );
    again.connect(&["a", "b", "c"]);
    completed(&again.run());
    let rounds: Vec<u32> = again.releases().iter().map(|m| m.round).collect();
    assert_eq!(
        rounds,
        [1, 2, 3],
        "round 1 released on with round 2's evaluation"
    );
    assert_eq!(again.finals()[0].model.weights, want);
    // Complete: nothing asked, nothing released.
    let mut done = Fed::resumed(
        config(serde_json::json!({})),
        &three(),
        Some(cps[3].clone()),
    );
    done.connect(&["a", "b", "c"]);
    assert!(matches!(done.coord.ending(), Some(Ending::Completed(_))));
    assert!(done.asked.is_empty() && done.releases().is_empty());
}

#[test]
fn sampling_invites_a_seeded_share_of_the_participants() {
    let sampled = serde_json::json!({
        "rounds": 4,
        "scheduling": { "selection": "sample", "sample_fraction": 0.5 },
    });
    let run = || {
        let sites: Vec<(&str, Site)> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| (*n, Site::default()))
            .collect();
        let mut fed = Fed::new(config(sampled.clone()), &sites);
        fed.connect(&["a", "b", "c", "d"]);
        completed(&fed.run());
        fed.releases()
            .iter()
            .map(|m| m.sites.clone())
            .collect::<Vec<_>>()
    };
    let first = run();
    assert!(first.iter().all(|s| s.len() == 2), "{first:?}");
    assert_eq!(first, run(), "the same seed, the same sample");
}
