//! Shared by medfed's fuzz targets and the seed-corpus generator (`examples/seeds.rs`):
//! one example of every wire message, a Pima study, and the framing of message sequences
//! in a fuzz input.

use medfed_protocol::audit::merkle::{self, Hash};
use medfed_protocol::audit::{self, Event, GENESIS, MessageEntry, Record};
use medfed_protocol::codec::{PROTOCOL_VERSION, encode_frame};
use medfed_protocol::fedstats::{CmpOp, Condition, StatColumn, StatsQuery};
use medfed_protocol::messages::*;
use medfed_protocol::metrics::{Evaluation, SCORE_BINS};
use medfed_protocol::model::{GlobalModel, ModelKind, TrainParams};
use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::{
    AdvertisedKeys, ClientMessage, RevealedShare, SealedShare, ServerMessage, Setup,
};
use medfed_protocol::stats::{FeatureStats, Standardization};
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, Message};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// Pima's feature columns (examples/data/pima_tr.csv, without the target `type`).
pub const PIMA_FEATURES: [&str; 7] = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"];

/// The index of a message's kind. A match without a wildcard: a new [`Message`] variant
/// does not compile until it is listed here, and so in [`samples`].
pub fn kind_index(m: &Message) -> usize {
    match m {
        Message::Hello(_) => 0,
        Message::Welcome(_) => 1,
        Message::StudyAnnouncement(_) => 2,
        Message::StudyDecision(_) => 3,
        Message::RoundOpen(_) => 4,
        Message::ModelUpdate(_) => 5,
        Message::EvaluateRequest(_) => 6,
        Message::EvaluationReport(_) => 7,
        Message::RoundResult(_) => 8,
        Message::Error(_) => 9,
        Message::SecAggToNode(_) => 10,
        Message::SecAggFromNode(_) => 11,
        Message::StatisticsOpen(_) => 12,
        Message::StatisticsQuery(_) => 13,
        Message::StatisticsReport(_) => 14,
    }
}

/// Number of [`Message`] kinds.
pub const KINDS: usize = 15;

/// A logistic model over `features`, standardized by (0, 1), all weights `w`.
pub fn model(features: &[&str], w: f64) -> GlobalModel {
    let d = features.len();
    GlobalModel {
        kind: ModelKind::Logistic,
        features: features.iter().map(|s| s.to_string()).collect(),
        standardization: Standardization {
            mean: vec![0.0; d],
            std: vec![1.0; d],
        },
        weights: vec![w; d + 1],
        recipe: Default::default(),
    }
}

/// A study of Pima's `type` (positive class `Yes`) over `features`.
pub fn pima_announcement(study_id: &str, features: &[&str], secure: bool) -> StudyAnnouncement {
    StudyAnnouncement {
        study_id: study_id.into(),
        description: "fuzz".into(),
        dataset: "pima".into(),
        features: features.iter().map(|s| s.to_string()).collect(),
        target: "type".into(),
        model: ModelKind::Logistic,
        positive_class: Some("Yes".into()),
        classes: Vec::new(),
        preprocess: Default::default(),
        validation_fraction: 0.25,
        rounds: 2,
        secure_aggregation: secure,
        privacy: None,
    }
}

fn evaluation() -> Evaluation {
    let mut positive_scores = vec![0; SCORE_BINS];
    let mut negative_scores = vec![0; SCORE_BINS];
    positive_scores[SCORE_BINS - 1] = 2;
    negative_scores[0] = 1;
    Evaluation::Classification {
        rows: 3,
        log_loss_sum: 0.9,
        tp: 2,
        tn: 1,
        fp: 0,
        fn_: 0,
        positive_scores,
        negative_scores,
    }
}

/// A secure round's set-up for `parties` (valid: it passes `Setup::validate`).
pub fn secure_round(label: &str, parties: &[&str], dimension: u32) -> SecureRound {
    let n = parties.len();
    SecureRound {
        setup: Setup {
            label: label.into(),
            parties: parties.iter().map(|s| s.to_string()).collect(),
            threshold: (n as u32 / 2 + 1).min(n as u32),
            neighbours: n as u32 - 1,
            graph_seed: Setup::graph_seed_for(label),
            dimension,
            quant: QuantParams::for_parties(n, 8.0, 16).expect("quantization fits"),
            // Placeholders the node_client target fills in: the binding computed from the
            // request, and each known site's certificate.
            binding: [0; 32],
        },
        certificates: vec![vec![0x30, 0x00]; n],
        // 1 / S for three sites of 150 training rows (the node checks it against its own).
        scale: 1.0 / 450.0,
        colluders: 0,
    }
}

/// A statistics query over Pima: glucose and BMI of the patients over 30.
pub fn pima_query(query_id: &str) -> StatsQuery {
    StatsQuery {
        query_id: query_id.into(),
        dataset: "pima".into(),
        cohort: vec![Condition {
            column: "age".into(),
            op: CmpOp::Gt,
            value: Some(30.0),
            text: None,
        }],
        columns: vec![
            StatColumn {
                name: "glu".into(),
                low: 0.0,
                high: 200.0,
                edges: vec![0.0, 100.0, 140.0, 200.0],
            },
            StatColumn {
                name: "bmi".into(),
                low: 10.0,
                high: 70.0,
                edges: vec![10.0, 25.0, 30.0, 70.0],
            },
        ],
        correlations: true,
        noise_multiplier: Some(1.0),
        suppress_below: 11,
        survival: None,
        cox: None,
        trees: None,
    }
}

/// One example of every message kind (at least one each; some kinds several, e.g. both
/// study decisions and every secure-aggregation step), indexed so that
/// `kind_index(&samples()[i].1)` covers `0..KINDS`.
pub fn samples() -> Vec<(&'static str, Message)> {
    let f = &PIMA_FEATURES[..2];
    let keys = AdvertisedKeys {
        party: 1,
        c_pk: [9; 32],
        s_pk: [10; 32],
        self_mask_commitment: [11; 32],
        signature: vec![12; 64],
    };
    let sealed = SealedShare {
        from: 1,
        to: 0,
        ciphertext: vec![13; 96],
    };
    let from_node = |round: u32, message: ClientMessage| {
        Message::SecAggFromNode(SecAggFromNode {
            study_id: "s1".into(),
            round,
            message,
        })
    };
    let to_node = |message: ServerMessage| {
        Message::SecAggToNode(SecAggToNode {
            study_id: "s2".into(),
            round: 1,
            message,
        })
    };
    let mut out = vec![
        (
            "hello",
            Message::Hello(Hello {
                site: "st-marys".into(),
                software: "medfed 0.1.0".into(),
                datasets: vec![DatasetInfo {
                    name: "pima".into(),
                    columns: PIMA_FEATURES.iter().map(|s| s.to_string()).collect(),
                }],
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                aggregator: "consortium".into(),
                software: "medfed 0.1.0".into(),
            }),
        ),
        (
            "announcement",
            Message::StudyAnnouncement(pima_announcement("s1", f, false)),
        ),
        (
            "announcement-secure",
            Message::StudyAnnouncement(pima_announcement("s2", f, true)),
        ),
        (
            "decision-accept",
            Message::StudyDecision(StudyDecision::Accept {
                study_id: "s1".into(),
                training_rows: 150,
                validation_rows: 50,
                feature_stats: Some(FeatureStats {
                    count: 150,
                    sum: vec![18000.0, 4800.0],
                    sum_sq: vec![2.3e6, 1.6e5],
                    present: Vec::new(),
                }),
                target_classes: vec!["No".into(), "Yes".into()],
            }),
        ),
        (
            "decision-refuse",
            Message::StudyDecision(StudyDecision::Refuse {
                study_id: "s1".into(),
                reason: "not approved".into(),
            }),
        ),
        (
            "round-open",
            Message::RoundOpen(RoundOpen {
                study_id: "s1".into(),
                round: 1,
                model: model(f, 0.0),
                params: TrainParams::default(),
                deadline_ms: 30_000,
                secure: None,
            }),
        ),
        (
            "round-open-secure",
            Message::RoundOpen(RoundOpen {
                study_id: "s2".into(),
                round: 1,
                model: model(f, 0.0),
                params: TrainParams::default(),
                deadline_ms: 30_000,
                secure: Some(secure_round(
                    "s2/1/1",
                    &["a", "b", "st-marys"],
                    medfed_protocol::update_vector::dimension(ModelKind::Logistic, f.len() + 1)
                        as u32,
                )),
            }),
        ),
        (
            "model-update",
            Message::ModelUpdate(ModelUpdate {
                study_id: "s1".into(),
                round: 1,
                weights: vec![0.1, -0.2, 0.3],
                num_samples: 150,
                train_loss: 0.6,
                evaluation: evaluation(),
            }),
        ),
        (
            "evaluate-request",
            Message::EvaluateRequest(EvaluateRequest {
                study_id: "s1".into(),
                round: 2,
                model: model(f, 0.1),
            }),
        ),
        (
            "evaluation-report",
            Message::EvaluationReport(EvaluationReport {
                study_id: "s1".into(),
                round: 2,
                evaluation: Evaluation::Regression {
                    rows: 4,
                    sum_sq_error: 1.5,
                    sum_y: 10.0,
                    sum_y_sq: 30.0,
                },
            }),
        ),
        (
            "round-result",
            Message::RoundResult(RoundResult {
                study_id: "s1".into(),
                round: 1,
                participants: vec!["a".into(), "st-marys".into()],
                train_loss: 0.55,
                study_complete: false,
            }),
        ),
        (
            "error",
            Message::Error(ErrorMessage {
                code: ErrorCode::CannotServe,
                reason: "no dataset 'x'".into(),
            }),
        ),
        (
            "secagg-key-directory",
            to_node(ServerMessage::KeyDirectory(vec![keys.clone()])),
        ),
        (
            "secagg-encrypted-shares",
            to_node(ServerMessage::EncryptedShares(vec![sealed.clone()])),
        ),
        (
            "secagg-consistency-check",
            to_node(ServerMessage::ConsistencyCheck {
                survivors: vec![0, 1, 2],
            }),
        ),
        (
            "secagg-unmask-request",
            to_node(ServerMessage::UnmaskRequest {
                survivors: vec![0, 1, 2],
                signatures: vec![(0, vec![14; 64]), (1, vec![15; 64])],
            }),
        ),
        (
            "secagg-advertise-keys",
            from_node(1, ClientMessage::AdvertiseKeys(keys)),
        ),
        (
            "secagg-share-keys",
            from_node(1, ClientMessage::ShareKeys(vec![sealed])),
        ),
        (
            "secagg-masked-input",
            from_node(1, ClientMessage::MaskedInput(vec![16; 48])),
        ),
        (
            "secagg-survivors-signed",
            from_node(1, ClientMessage::SurvivorsSigned(vec![17; 64])),
        ),
        (
            "secagg-unmask-shares",
            from_node(
                1,
                ClientMessage::UnmaskShares {
                    self_mask: vec![RevealedShare {
                        owner: 0,
                        share: vec![1; 33],
                    }],
                    mask_key: vec![RevealedShare {
                        owner: 2,
                        share: vec![2; 33],
                    }],
                },
            ),
        ),
        (
            "statistics-open",
            Message::StatisticsOpen(StatisticsOpen {
                study_id: "s2".into(),
                secure: secure_round(
                    "s2/0/1",
                    &["a", "b", "st-marys"],
                    medfed_protocol::update_vector::statistics_dimension(f.len()) as u32,
                ),
            }),
        ),
        (
            "statistics-query",
            Message::StatisticsQuery(StatisticsQuery {
                query: pima_query("q1"),
                secure: None,
                step: None,
            }),
        ),
        (
            "statistics-query-secure",
            Message::StatisticsQuery(StatisticsQuery {
                query: pima_query("q2"),
                secure: Some(secure_round(
                    "q2/0/1",
                    &["a", "b", "st-marys"],
                    pima_query("q2").dimension() as u32,
                )),
                step: None,
            }),
        ),
        (
            "statistics-report",
            Message::StatisticsReport(StatisticsReport {
                query_id: "q1".into(),
                vector: vec![120.0, 15000.0, 2.0e6, 3.0, 40.0, 77.0],
            }),
        ),
    ];
    out.sort_by_key(|(_, m)| kind_index(m));
    out
}

/// One complete frame of `msg`.
pub fn frame(msg: &Message) -> Vec<u8> {
    encode_frame(msg, DEFAULT_MAX_FRAME_BYTES).expect("a sample message encodes")
}

/// The payload of a frame (version and body, the part `decode_payload` reads).
pub fn payload(msg: &Message) -> Vec<u8> {
    frame(msg)[medfed_protocol::codec::HEADER_BYTES..].to_vec()
}

/// A sequence of messages as one fuzz input: each a u16 big-endian length, then that many
/// bytes of payload (version and body; [`split_payloads`] reads it back).
pub fn join_payloads(msgs: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        let p = payload(m);
        out.extend_from_slice(&(p.len().min(u16::MAX as usize) as u16).to_be_bytes());
        out.extend_from_slice(&p);
    }
    out
}

/// Splits a fuzz input into payloads as [`join_payloads`] writes them (a short last one is
/// taken as it is).
pub fn split_payloads(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        out.push(&rest[..len]);
        data = &rest[len..];
    }
    out
}

pub struct RealLog {
    pub lines: Vec<String>,
    pub public: Vec<u8>,
    /// The heads the key signed: (size, root).
    pub heads: Vec<(u64, Hash)>,
}

/// A compliance log as `medfed_infra::auditlog` writes one (the same records, JSON and
/// hash chain; a signed tree head every few records), with a fixed key and clock.
pub fn audit_log() -> RealLog {
    {
        let key = Ed25519KeyPair::from_seed_unchecked(&[42; 32]).expect("a 32-byte seed");
        let party = "st-marys";
        let mut lines: Vec<String> = Vec::new();
        let mut tree = merkle::Frontier::default();
        let mut heads = Vec::new();
        let mut prev = GENESIS.to_string();
        let mut push = |event: Event, lines: &mut Vec<String>, tree: &mut merkle::Frontier| {
            let seq = lines.len() as u64;
            let event = match event {
                Event::TreeHead { .. } => {
                    let root = tree.root();
                    let time_ms = 1_700_000_000_000 + seq;
                    let sig = key.sign(&audit::tree_head_message(party, seq, &root, time_ms));
                    heads.push((seq, root));
                    Event::TreeHead {
                        size: seq,
                        root: medfed_protocol::hex::encode(&root),
                        signature: medfed_protocol::hex::encode(sig.as_ref()),
                    }
                }
                e => e,
            };
            let record = Record {
                seq,
                time_ms: 1_700_000_000_000 + seq,
                prev: std::mem::take(&mut prev),
                event,
            };
            let line = serde_json::to_string(&record).expect("a record serializes");
            tree.push(merkle::leaf_hash(line.as_bytes()));
            prev = audit::sha256_hex(line.as_bytes());
            lines.push(line);
        };
        let head = || Event::TreeHead {
            size: 0,
            root: String::new(),
            signature: String::new(),
        };
        let message = |sent: bool, kind: &str, round: Option<u32>| {
            let entry = MessageEntry {
                peer: "aggregator".into(),
                message: kind.into(),
                study: Some("pima".into()),
                round,
                bytes: 120 + u64::from(round.unwrap_or(0)),
                sha256: audit::sha256_hex(kind.as_bytes()),
            };
            if sent {
                Event::Sent(entry)
            } else {
                Event::Received(entry)
            }
        };
        let events = vec![
            Event::Start {
                party: party.into(),
                role: "node".into(),
                software: "medfed 0.1.0".into(),
                config_sha256: audit::sha256_hex(b"node.toml"),
            },
            Event::ExactAllowed {
                dataset: "pima".into(),
                releases: vec!["training".into()],
            },
            message(false, "study announcement", None),
            Event::Announced {
                study: "pima".into(),
                hash: audit::sha256_hex(b"study"),
                summary: "study 'pima': features glu, bmi".into(),
            },
            Event::StudyDecision {
                study: "pima".into(),
                accepted: true,
                reason: "matches the site's policy rules".into(),
            },
            message(true, "study decision", None),
            head(),
            message(false, "round open", Some(1)),
            Event::PrivacySpent {
                study: "pima".into(),
                round: 1,
                epsilon: 0.25,
                total_epsilon: 1.5,
                delta: 1e-6,
                refused: false,
            },
            message(true, "model update", Some(1)),
            Event::ExactRelease {
                study: "pima".into(),
                dataset: "pima".into(),
            },
            head(),
            message(false, "round result", Some(1)),
            Event::Error {
                what: "a request did not arrive in time".into(),
            },
            Event::Stop {
                reason: "signal".into(),
            },
            head(),
            message(false, "round open", Some(2)),
        ];
        for e in events {
            push(e, &mut lines, &mut tree);
        }
        let public = key.public_key().as_ref().to_vec();
        RealLog {
            lines,
            public,
            heads,
        }
    }
}

/// The protocol version bytes every payload starts with.
pub const VERSION: [u8; 2] = PROTOCOL_VERSION.to_be_bytes();

/// An ingestion pipeline as a node runs one over an extract (`[[ingest]]` with declared
/// fields: validate and clean → de-identify → alerts → features → keep the records →
/// column statistics), fed one row at a time, with the checks every row must pass.
pub mod pipeline {
    use std::sync::Arc;

    use medfed_node::deid::pseudonym::Pseudonymizer;
    use medfed_node::deid::{PATIENT, Record, Value};
    use medfed_node::ingest::{IngestConfig, RECORDS_STREAM, build_task};
    use medfed_node::runtime::{Envelope, KvState, MessageCollector, StreamTask, TaskCoordinator};

    /// [`make_config`], parsed once per process.
    fn config(with_mrn: bool) -> &'static IngestConfig {
        static CONFIGS: std::sync::OnceLock<[IngestConfig; 2]> = std::sync::OnceLock::new();
        &CONFIGS.get_or_init(|| [make_config(false), make_config(true)])[usize::from(with_mrn)]
    }

    /// The pipeline's declared fields and features (docs/samples/node.toml's, with a
    /// patient id and a clipped blood pressure); `mrn` only where the input has one.
    fn make_config(with_mrn: bool) -> IngestConfig {
        let mrn = if with_mrn {
            "[[field]]\nname = \"mrn\"\nclass = \"patient-id\"\nrequired = true\n"
        } else {
            ""
        };
        let toml = format!(
            "stream = \"extract\"\ncsv = \"extract.csv\"\ncolumns = [\"glu\", \"bmi\"]\n\
             {mrn}\
             [[field]]\nname = \"glu\"\nmissing = \"median\"\nmin = 0\nmax = 1000\n\
             [[field]]\nname = \"bp\"\nmissing = \"indicator\"\nmin = 40\nmax = 140\nout_of_range = \"clip\"\n\
             [[field]]\nname = \"bmi\"\nmissing = \"mean\"\n\
             [[field]]\nname = \"age\"\nclass = \"age\"\nquasi_identifier = true\n\
             [[field]]\nname = \"type\"\ncategories = [\"Yes\", \"No\"]\n\
             [[one_hot]]\ncolumn = \"type\"\ncategories = [\"Yes\", \"No\"]\n\
             [[derive]]\nname = \"glu_per_bmi\"\nformula = \"ratio\"\ninputs = [\"glu\", \"bmi\"]\n\
             [standardize.bmi]\nmean = 32.3\nsd = 6.1\n\
             [[alert]]\ncolumn = \"glu\"\nabove = 200\n"
        );
        let cfg: IngestConfig = toml::from_str(&toml).expect("a valid [[ingest]]");
        cfg.validate().expect("a valid pipeline");
        cfg
    }

    /// What became of one row.
    #[derive(Debug)]
    pub enum Outcome {
        Kept(Record),
        Quarantined,
    }

    pub struct Pipeline {
        task: Box<dyn StreamTask>,
        state: KvState,
        stream: Arc<str>,
        /// Names a dead letter may blame, and prefixes of a kept record's keys.
        names: Vec<String>,
        offset: u64,
    }

    impl Pipeline {
        pub fn new(header: &[String]) -> Pipeline {
            let with_mrn = header.iter().any(|h| h == "mrn");
            let cfg = config(with_mrn);
            let key = Pseudonymizer::from_key(1, &[5; 32]);
            let mut task = build_task(cfg, header, Some(&key)).expect("the pipeline builds");
            let mut state = KvState::default();
            task.init(&mut state).expect("the pipeline starts");
            let mut names: Vec<String> = cfg.fields.iter().map(|f| f.name.clone()).collect();
            names.extend(cfg.derive.iter().map(|d| d.name.clone()));
            names.push(PATIENT.to_string());
            Pipeline {
                task,
                state,
                stream: "extract".into(),
                names,
                offset: 0,
            }
        }

        /// Feeds one row. A row is kept or quarantined, never both, never neither, and a
        /// bad row never stops the pipeline. A quarantined row is blamed on a declared
        /// field (or none) and never quotes the patient's identifier `mrn` (if it has an
        /// '@', so that it is told apart from the reasons' words); a kept row holds only
        /// declared and derived fields, finite numbers, ages of at most 90 (Safe Harbor),
        /// and never the identifier.
        pub fn feed(&mut self, row: &[u8], mrn: Option<&str>) -> Outcome {
            let env = Envelope {
                stream: self.stream.clone(),
                partition: 0,
                offset: self.offset,
                key: None,
                payload: row.to_vec(),
            };
            self.offset += 1;
            let mut out = MessageCollector::default();
            let mut coord = TaskCoordinator::default();
            self.task
                .process(&env, &mut self.state, &mut out, &mut coord)
                .expect("a bad row is quarantined, it does not stop the pipeline");
            let kept: Vec<&Record> = out
                .sent_records()
                .iter()
                .filter(|(s, _)| s == RECORDS_STREAM)
                .map(|(_, r)| r)
                .collect();
            let dead = out.dead_letters();
            assert_eq!(
                kept.len() + dead.len(),
                1,
                "a row kept {} time(s) and quarantined {} time(s)",
                kept.len(),
                dead.len()
            );
            // An identifier worth looking for: one with an '@', which no reason, field name,
            // category or pseudonym holds (the seeds' patient ids have one).
            let mrn = mrn.filter(|m| m.len() >= 4 && m.contains('@'));
            if let Some(d) = dead.first() {
                assert_eq!(d.offset, env.offset);
                let r = &d.rejection;
                assert!(!r.reason.is_empty(), "a dead letter without a reason");
                if let Some(field) = &r.field {
                    assert!(
                        self.names.contains(field),
                        "a dead letter blames '{field}', which is not a field"
                    );
                }
                if let Some(mrn) = mrn {
                    let text = format!("{} {:?} {:?}", r.reason, r.field, r.patient);
                    assert!(
                        !text.contains(mrn),
                        "a dead letter quotes the identifier: {r:?}"
                    );
                }
                return Outcome::Quarantined;
            }
            let record = kept[0].clone();
            // What the store keeps: a segment that gives the record back as it was.
            let segment =
                medfed_node::runtime::record::encode_segment(std::slice::from_ref(&record));
            assert_eq!(
                medfed_node::runtime::record::decode_segment(&segment).as_deref(),
                Ok(std::slice::from_ref(&record))
            );
            for (key, value) in record.iter() {
                assert!(
                    self.names.iter().any(|n| key.starts_with(n.as_str())),
                    "a kept record has a field '{key}' nobody declared"
                );
                match value {
                    Value::Number(x) => assert!(x.is_finite(), "'{key}' is {x}"),
                    Value::Text(t) => {
                        if let Some(mrn) = mrn {
                            assert!(!t.contains(mrn), "'{key}' keeps the identifier");
                        }
                    }
                    _ => {}
                }
            }
            if let Some(age) = record.number("age") {
                assert!(
                    age <= 90.0,
                    "an age of {age} is kept (Safe Harbor: 90 and over)"
                );
            }
            assert_eq!(Record::decode(&record.encode()).as_ref(), Ok(&record));
            Outcome::Kept(record)
        }
    }
}
