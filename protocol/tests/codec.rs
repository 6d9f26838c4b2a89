//! Wire codec properties: every message round-trips, and arbitrary bytes never panic.

use medfed_protocol::codec::{
    HEADER_BYTES, check_frame_length, decode_frame, decode_payload, encode_frame,
    encode_frame_with_version,
};
use medfed_protocol::dp::{DpSgd, DpTraining};
use medfed_protocol::fedstats::{CmpOp, Condition, StatColumn, StatsQuery};
use medfed_protocol::messages::*;
use medfed_protocol::metrics::{Evaluation, SCORE_BINS};
use medfed_protocol::model::{GlobalModel, ModelKind, TrainParams};
use medfed_protocol::preprocess::{ImputeRule, Input, Preprocess, Recipe};
use medfed_protocol::quant::QuantParams;
use medfed_protocol::secagg::{
    AdvertisedKeys, ClientMessage, RevealedShare, SealedShare, ServerMessage, Setup,
};
use medfed_protocol::stats::{FeatureStats, Standardization};
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, FrameError, PROTOCOL_VERSION};
use proptest::prelude::*;

/// Every message kind, in wire order (the enum tag). `kind` below matches on [`Message`]
/// without a wildcard: a new variant does not compile until it is listed here, and the
/// tests then fail until it has a round-trip strategy and a pinned vector.
const KINDS: [&str; 15] = [
    "hello",
    "welcome",
    "study announcement",
    "study decision",
    "round open",
    "model update",
    "evaluate request",
    "evaluation report",
    "round result",
    "error",
    "secagg to node",
    "secagg from node",
    "statistics open",
    "statistics query",
    "statistics report",
];

/// The index of a message's kind in [`KINDS`] (its wire tag).
fn kind(m: &Message) -> usize {
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

fn finite() -> impl Strategy<Value = f64> {
    -1e6f64..1e6
}

fn model_kind() -> impl Strategy<Value = ModelKind> {
    prop_oneof![
        Just(ModelKind::Logistic),
        Just(ModelKind::Linear),
        (3u8..6).prop_map(|classes| ModelKind::Multinomial { classes }),
    ]
}

fn model() -> impl Strategy<Value = GlobalModel> {
    (1usize..6, model_kind()).prop_flat_map(|(d, kind)| {
        (
            prop::collection::vec("[a-z]{1,8}", d),
            prop::collection::vec(finite(), d),
            prop::collection::vec(0.1f64..10.0, d),
            prop::collection::vec(finite(), kind.width(d)),
        )
            .prop_map(move |(features, mean, std, weights)| GlobalModel {
                kind,
                features,
                standardization: Standardization { mean, std },
                weights,
                recipe: Default::default(),
            })
    })
}

/// The class names a model's kind needs (none but for a multinomial model).
fn class_names(kind: ModelKind) -> Vec<String> {
    (0..kind.outputs())
        .filter(|_| matches!(kind, ModelKind::Multinomial { .. }))
        .map(|c| format!("class {c}"))
        .collect()
}

fn evaluation() -> impl Strategy<Value = Evaluation> {
    prop_oneof![
        (
            prop::collection::vec(0u64..50, SCORE_BINS),
            prop::collection::vec(0u64..50, SCORE_BINS)
        )
            .prop_map(
                |(positive_scores, negative_scores)| Evaluation::Classification {
                    rows: 3,
                    log_loss_sum: 1.5,
                    tp: 1,
                    tn: 1,
                    fp: 1,
                    fn_: 0,
                    positive_scores,
                    negative_scores,
                }
            ),
        (0u64..1000, finite(), finite(), finite()).prop_map(|(rows, a, b, c)| {
            Evaluation::Regression {
                rows,
                sum_sq_error: a.abs(),
                sum_y: b,
                sum_y_sq: c.abs(),
            }
        }),
        (3usize..6).prop_flat_map(|k| (
            prop::collection::vec(0u64..50, k * k),
            prop::collection::vec(0u64..50, 2 * k * SCORE_BINS),
            finite()
        )
            .prop_map(|(confusion, class_scores, loss)| Evaluation::Multiclass {
                rows: confusion.iter().sum(),
                log_loss_sum: loss.abs(),
                confusion,
                class_scores,
            })),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,11}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn hash() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

/// A secure round's set-up (any values: the codec checks none of them).
fn secure_round() -> impl Strategy<Value = SecureRound> {
    (
        name(),
        prop::collection::vec(name(), 0..5),
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>()),
        (1.0f64..1e6, 0u8..53, prop::sample::select(vec![32u8, 64])),
        hash(),
        prop::collection::vec(bytes(40), 0..4),
        (finite(), any::<u32>()),
    )
        .prop_map(
            |(
                label,
                parties,
                (threshold, neighbours, graph_seed, dimension),
                (clip, scale_bits, modulus_bits),
                binding,
                certificates,
                (scale, colluders),
            )| SecureRound {
                setup: Setup {
                    label,
                    parties,
                    threshold,
                    neighbours,
                    graph_seed,
                    dimension,
                    quant: QuantParams {
                        clip,
                        scale_bits,
                        modulus_bits,
                    },
                    binding,
                },
                certificates,
                scale,
                colluders,
            },
        )
}

fn stats_query() -> impl Strategy<Value = StatsQuery> {
    let op = prop::sample::select(vec![
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
        CmpOp::Eq,
        CmpOp::Ne,
    ]);
    let condition = (
        name(),
        op,
        prop::option::of(finite()),
        prop::option::of(name()),
    )
        .prop_map(|(column, op, value, text)| Condition {
            column,
            op,
            value,
            text,
        });
    let column =
        (name(), finite(), prop::collection::vec(finite(), 0..6)).prop_map(|(name, low, edges)| {
            StatColumn {
                name,
                low,
                high: low + 1.0,
                edges,
            }
        });
    (
        (name(), name()),
        prop::collection::vec(condition, 0..3),
        prop::collection::vec(column, 0..3),
        any::<bool>(),
        prop::option::of(0.1f64..10.0),
        any::<u64>(),
    )
        .prop_map(
            |(
                (query_id, dataset),
                cohort,
                columns,
                correlations,
                noise_multiplier,
                suppress_below,
            )| {
                StatsQuery {
                    query_id,
                    dataset,
                    cohort,
                    columns,
                    correlations,
                    noise_multiplier,
                    suppress_below,
                    survival: None,
                    cox: None,
                    trees: None,
                }
            },
        )
}

fn privacy() -> impl Strategy<Value = Option<DpTraining>> {
    prop::option::of(
        (
            0.01f64..10.0,
            0.1f64..10.0,
            prop::option::of((0.0f64..1.0, any::<u32>(), 1.0f64..1e3)),
        )
            .prop_map(|(clip_norm, noise_multiplier, sgd)| DpTraining {
                clip_norm,
                noise_multiplier,
                sgd: sgd.map(|(sampling_rate, steps, lot_size)| DpSgd {
                    sampling_rate,
                    steps,
                    lot_size,
                }),
            }),
    )
}

fn advertised_keys() -> impl Strategy<Value = AdvertisedKeys> {
    (any::<u32>(), hash(), hash(), hash(), bytes(72)).prop_map(
        |(party, c_pk, s_pk, self_mask_commitment, signature)| AdvertisedKeys {
            party,
            c_pk,
            s_pk,
            self_mask_commitment,
            signature,
        },
    )
}

fn sealed_share() -> impl Strategy<Value = SealedShare> {
    (any::<u32>(), any::<u32>(), bytes(120)).prop_map(|(from, to, ciphertext)| SealedShare {
        from,
        to,
        ciphertext,
    })
}

fn revealed() -> impl Strategy<Value = Vec<RevealedShare>> {
    prop::collection::vec(
        (any::<u32>(), bytes(40)).prop_map(|(owner, share)| RevealedShare { owner, share }),
        0..4,
    )
}

/// Every secure-aggregation message a node sends.
fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        advertised_keys().prop_map(ClientMessage::AdvertiseKeys),
        prop::collection::vec(sealed_share(), 0..4).prop_map(ClientMessage::ShareKeys),
        bytes(64).prop_map(ClientMessage::MaskedInput),
        (revealed(), revealed()).prop_map(|(self_mask, mask_key)| {
            ClientMessage::UnmaskShares {
                self_mask,
                mask_key,
            }
        }),
        bytes(72).prop_map(ClientMessage::SurvivorsSigned),
    ]
}

/// Every secure-aggregation message the aggregator sends.
fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        prop::collection::vec(advertised_keys(), 0..4).prop_map(ServerMessage::KeyDirectory),
        prop::collection::vec(sealed_share(), 0..4).prop_map(ServerMessage::EncryptedShares),
        (
            prop::collection::vec(any::<u32>(), 0..16),
            prop::collection::vec((any::<u32>(), bytes(72)), 0..4)
        )
            .prop_map(|(survivors, signatures)| ServerMessage::UnmaskRequest {
                survivors,
                signatures,
            }),
        prop::collection::vec(any::<u32>(), 0..16)
            .prop_map(|survivors| ServerMessage::ConsistencyCheck { survivors }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            name(),
            any::<u32>(),
            prop::option::of(secure_round()),
            model(),
            any::<u64>()
        )
            .prop_map(|(study_id, round, secure, model, deadline_ms)| {
                Message::RoundOpen(RoundOpen {
                    study_id,
                    round,
                    model,
                    params: TrainParams {
                        seed: deadline_ms ^ 7,
                        ..TrainParams::default()
                    },
                    deadline_ms,
                    secure,
                })
            }),
        (model(), privacy(), any::<bool>()).prop_map(|(m, privacy, secure_aggregation)| {
            Message::StudyAnnouncement(StudyAnnouncement {
                study_id: "s".into(),
                description: "d".into(),
                dataset: "pima".into(),
                features: m.features,
                target: "type".into(),
                model: m.kind,
                positive_class: None,
                classes: class_names(m.kind),
                preprocess: Default::default(),
                validation_fraction: 0.2,
                rounds: 3,
                secure_aggregation,
                privacy,
            })
        }),
        (name(), any::<u32>(), server_message()).prop_map(|(study_id, round, message)| {
            Message::SecAggToNode(SecAggToNode {
                study_id,
                round,
                message,
            })
        }),
        (name(), any::<u32>(), client_message()).prop_map(|(study_id, round, message)| {
            Message::SecAggFromNode(SecAggFromNode {
                study_id,
                round,
                message,
            })
        }),
        (name(), secure_round()).prop_map(|(study_id, secure)| {
            Message::StatisticsOpen(StatisticsOpen { study_id, secure })
        }),
        (stats_query(), prop::option::of(secure_round())).prop_map(|(query, secure)| {
            Message::StatisticsQuery(StatisticsQuery {
                query,
                secure,
                step: None,
            })
        }),
        (name(), prop::collection::vec(finite(), 0..32)).prop_map(|(query_id, vector)| {
            Message::StatisticsReport(StatisticsReport { query_id, vector })
        }),
        (
            "[a-z-]{1,20}",
            prop::collection::vec(
                ("[a-z]{1,10}", prop::collection::vec("[a-z]{1,6}", 0..5)),
                0..3
            )
        )
            .prop_map(|(site, ds)| Message::Hello(Hello {
                site,
                software: "medfed 0.1.0".into(),
                datasets: ds
                    .into_iter()
                    .map(|(name, columns)| DatasetInfo { name, columns })
                    .collect(),
            })),
        "[a-z]{0,10}".prop_map(|a| Message::Welcome(Welcome {
            aggregator: a,
            software: "x".into()
        })),
        (model(), 1u32..100).prop_map(|(m, rounds)| Message::StudyAnnouncement(
            StudyAnnouncement {
                study_id: "s".into(),
                description: "d".into(),
                dataset: "pima".into(),
                features: m.features,
                target: "type".into(),
                model: m.kind,
                positive_class: Some("Yes".into()),
                classes: class_names(m.kind),
                preprocess: Default::default(),
                validation_fraction: 0.25,
                rounds,
                secure_aggregation: true,
                privacy: None,
            }
        )),
        (0u64..1000, prop::collection::vec(finite(), 0..8)).prop_map(|(n, v)| {
            Message::StudyDecision(StudyDecision::Accept {
                study_id: "s".into(),
                training_rows: n,
                validation_rows: n / 3,
                feature_stats: Some(FeatureStats {
                    count: n,
                    sum: v.clone(),
                    sum_sq: v,
                    present: Vec::new(),
                }),
                target_classes: vec!["No".into(), "Yes".into()],
            })
        }),
        "[ -~]{0,40}".prop_map(|reason| Message::StudyDecision(StudyDecision::Refuse {
            study_id: "s".into(),
            reason
        })),
        (model(), any::<u32>(), any::<u64>()).prop_map(|(model, round, deadline_ms)| {
            Message::RoundOpen(RoundOpen {
                study_id: "s".into(),
                round,
                model,
                params: TrainParams::default(),
                deadline_ms,
                secure: None,
            })
        }),
        (prop::collection::vec(any::<u8>(), 0..64), any::<u32>()).prop_map(|(bytes, round)| {
            Message::SecAggFromNode(SecAggFromNode {
                study_id: "s".into(),
                round,
                message: medfed_protocol::secagg::ClientMessage::MaskedInput(bytes),
            })
        }),
        (
            prop::collection::vec(any::<u32>(), 0..16),
            prop::collection::vec(
                (any::<u32>(), prop::collection::vec(any::<u8>(), 0..72)),
                0..4
            )
        )
            .prop_map(|(survivors, signatures)| {
                Message::SecAggToNode(SecAggToNode {
                    study_id: "s".into(),
                    round: 1,
                    message: medfed_protocol::secagg::ServerMessage::UnmaskRequest {
                        survivors,
                        signatures,
                    },
                })
            }),
        prop::collection::vec(any::<u32>(), 0..16).prop_map(|survivors| {
            Message::SecAggToNode(SecAggToNode {
                study_id: "s".into(),
                round: 1,
                message: medfed_protocol::secagg::ServerMessage::ConsistencyCheck { survivors },
            })
        }),
        prop::collection::vec(any::<u8>(), 0..72).prop_map(|sig| {
            Message::SecAggFromNode(SecAggFromNode {
                study_id: "s".into(),
                round: 1,
                message: medfed_protocol::secagg::ClientMessage::SurvivorsSigned(sig),
            })
        }),
        (
            prop::collection::vec(finite(), 0..64),
            any::<u64>(),
            evaluation()
        )
            .prop_map(|(weights, num_samples, evaluation)| {
                Message::ModelUpdate(ModelUpdate {
                    study_id: "s".into(),
                    round: 3,
                    weights,
                    num_samples,
                    train_loss: 0.5,
                    evaluation,
                })
            }),
        model().prop_map(|model| Message::EvaluateRequest(EvaluateRequest {
            study_id: "s".into(),
            round: 20,
            model
        })),
        evaluation().prop_map(|evaluation| Message::EvaluationReport(EvaluationReport {
            study_id: "s".into(),
            round: 1,
            evaluation
        })),
        (prop::collection::vec("[a-z]{1,8}", 0..5), any::<bool>()).prop_map(
            |(participants, study_complete)| {
                Message::RoundResult(RoundResult {
                    study_id: "s".into(),
                    round: 2,
                    participants,
                    train_loss: 0.4,
                    study_complete,
                })
            }
        ),
        "[ -~]{0,80}".prop_map(|reason| Message::Error(ErrorMessage {
            code: ErrorCode::InvalidContent,
            reason
        })),
    ]
}

/// The round-trip property's messages include every kind.
#[test]
fn the_round_trip_strategy_covers_every_kind() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strategy = message();
    let mut seen = [0usize; KINDS.len()];
    for _ in 0..3000 {
        let m = strategy.new_tree(&mut runner).unwrap().current();
        seen[kind(&m)] += 1;
    }
    for (k, n) in KINDS.iter().zip(seen) {
        assert!(n > 0, "the strategy never makes a {k}");
    }
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in message()) {
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
        // The body starts with the kind's tag, its index in KINDS.
        prop_assert_eq!(usize::from(frame[HEADER_BYTES + 2]), kind(&msg));
        prop_assert_eq!(decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap(), msg);
    }

    #[test]
    fn arbitrary_payloads_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_payload(&bytes);
        let _ = decode_frame(&bytes, DEFAULT_MAX_FRAME_BYTES);
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_version_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut payload = PROTOCOL_VERSION.to_be_bytes().to_vec();
        payload.extend(body);
        if let Err(e) = decode_payload(&payload) {
            prop_assert_eq!(e.code(), ErrorCode::Malformed);
        }
    }

    #[test]
    fn mutated_frames_never_panic(msg in message(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut frame = encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
        for (i, b) in flips {
            let i = i.index(frame.len());
            frame[i] ^= b;
        }
        let _ = decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES);
    }

    #[test]
    fn error_codes_survive_quic_close_codes(code in prop::sample::select(vec![
        ErrorCode::UnsupportedVersion, ErrorCode::Malformed, ErrorCode::FrameTooLarge,
        ErrorCode::SiteNotAllowed, ErrorCode::UnexpectedMessage, ErrorCode::InvalidContent,
        ErrorCode::CannotServe, ErrorCode::StudiesComplete, ErrorCode::Internal, ErrorCode::ShuttingDown,
        ErrorCode::Replaced, ErrorCode::NotActive,
    ])) {
        prop_assert_eq!(ErrorCode::from_close_code(code.to_close_code().into()), code);
    }
}

#[test]
fn oversized_header_is_refused_before_the_body() {
    let header = (DEFAULT_MAX_FRAME_BYTES + 1).to_be_bytes();
    assert_eq!(
        check_frame_length(header, DEFAULT_MAX_FRAME_BYTES),
        Err(FrameError::TooLarge {
            len: u64::from(DEFAULT_MAX_FRAME_BYTES) + 1,
            max: DEFAULT_MAX_FRAME_BYTES
        })
    );
    assert_eq!(
        check_frame_length(u32::MAX.to_be_bytes(), 1024)
            .unwrap_err()
            .code(),
        ErrorCode::FrameTooLarge
    );
    assert_eq!(
        check_frame_length(1u32.to_be_bytes(), 1024),
        Err(FrameError::TooShort { len: 1 })
    );
}

#[test]
fn encoder_refuses_messages_over_the_limit() {
    let msg = Message::Error(ErrorMessage {
        code: ErrorCode::Internal,
        reason: "x".repeat(100),
    });
    assert!(matches!(
        encode_frame(&msg, 50),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn another_version_is_a_typed_error() {
    let msg = Message::Welcome(Welcome {
        aggregator: "a".into(),
        software: "b".into(),
    });
    let frame = encode_frame_with_version(&msg, 9, DEFAULT_MAX_FRAME_BYTES).unwrap();
    let err = decode_frame(&frame, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert_eq!(
        err,
        FrameError::UnsupportedVersion {
            got: 9,
            supported: PROTOCOL_VERSION
        }
    );
    assert!(err.to_string().contains("version 9"));
}

/// The frame layout is a compatibility promise: pin it byte for byte.
#[test]
fn frame_layout_vector() {
    let msg = Message::Error(ErrorMessage {
        code: ErrorCode::Malformed,
        reason: "ab".into(),
    });
    let frame = encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
    assert_eq!(
        frame,
        vec![
            0, 0, 0, 7, // length of what follows: 2 (version) + 5 (body)
            0, 5, // protocol version 5
            9, // Message::Error (variant index 9)
            1, // ErrorCode::Malformed (variant index 1)
            2, b'a', b'b', // reason: varint length, bytes
        ]
    );
    assert_eq!(frame.len(), HEADER_BYTES + 7);
}

/// One fixed example of every message kind (and of every secure-aggregation step inside
/// the two secure-aggregation kinds), for the pinned vectors below.
fn pinned_examples() -> Vec<(&'static str, Message)> {
    let model = GlobalModel {
        kind: ModelKind::Logistic,
        features: vec!["glu".into()],
        standardization: Standardization {
            mean: vec![120.5],
            std: vec![30.25],
        },
        weights: vec![0.5, -1.0],
        recipe: Recipe {
            inputs: vec![Input::Numeric {
                column: "glu".into(),
                impute: Some(120.5),
            }],
        },
    };
    let secure = SecureRound {
        setup: Setup {
            label: "s/1/1".into(),
            parties: vec!["a".into(), "b".into()],
            threshold: 2,
            neighbours: 1,
            graph_seed: 0x0102_0304_0506_0708,
            dimension: 3,
            quant: QuantParams {
                clip: 8.0,
                scale_bits: 16,
                modulus_bits: 32,
            },
            binding: [7; 32],
        },
        certificates: vec![vec![0x30, 0x00], vec![0x30, 0x01]],
        scale: 0.5,
        colluders: 0,
    };
    let query = StatsQuery {
        query_id: "q".into(),
        dataset: "pima".into(),
        cohort: vec![Condition {
            column: "age".into(),
            op: CmpOp::Ge,
            value: Some(40.0),
            text: None,
        }],
        columns: vec![StatColumn {
            name: "glu".into(),
            low: 0.0,
            high: 200.0,
            edges: vec![0.0, 100.0, 200.0],
        }],
        correlations: false,
        noise_multiplier: Some(1.5),
        suppress_below: 11,
        survival: Some(Box::new(medfed_protocol::survival::Survival {
            time: "days".into(),
            event: "status".into(),
            event_codes: vec!["2".into()],
            censored_codes: vec!["1".into()],
            grid: vec![0.0, 30.0, 60.0],
            strata: Some(medfed_protocol::survival::Strata {
                column: "sex".into(),
                levels: vec!["1".into(), "2".into()],
            }),
        })),
        cox: None,
        trees: None,
    };
    let keys = AdvertisedKeys {
        party: 1,
        c_pk: [1; 32],
        s_pk: [2; 32],
        self_mask_commitment: [3; 32],
        signature: vec![4, 5],
    };
    let sealed = SealedShare {
        from: 0,
        to: 1,
        ciphertext: vec![6, 7, 8],
    };
    let to_node = |message| {
        Message::SecAggToNode(SecAggToNode {
            study_id: "s".into(),
            round: 1,
            message,
        })
    };
    let from_node = |message| {
        Message::SecAggFromNode(SecAggFromNode {
            study_id: "s".into(),
            round: 1,
            message,
        })
    };
    let mut scores = vec![0u64; SCORE_BINS];
    scores[3] = 2;
    vec![
        (
            "hello",
            Message::Hello(Hello {
                site: "a".into(),
                software: "m 1".into(),
                datasets: vec![DatasetInfo {
                    name: "pima".into(),
                    columns: vec!["glu".into()],
                }],
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                aggregator: "agg".into(),
                software: "m 1".into(),
            }),
        ),
        (
            "study announcement",
            Message::StudyAnnouncement(StudyAnnouncement {
                study_id: "s".into(),
                description: "d".into(),
                dataset: "pima".into(),
                features: vec!["glu".into()],
                target: "type".into(),
                model: ModelKind::Logistic,
                positive_class: Some("Yes".into()),
                classes: Vec::new(),
                preprocess: Default::default(),
                validation_fraction: 0.25,
                rounds: 2,
                secure_aggregation: false,
                privacy: Some(DpTraining {
                    clip_norm: 1.0,
                    noise_multiplier: 2.0,
                    sgd: Some(DpSgd {
                        sampling_rate: 0.125,
                        steps: 10,
                        lot_size: 16.0,
                    }),
                }),
            }),
        ),
        (
            "multinomial study announcement",
            Message::StudyAnnouncement(StudyAnnouncement {
                study_id: "s".into(),
                description: "d".into(),
                dataset: "diabetes".into(),
                features: vec!["glufast".into()],
                target: "group".into(),
                model: ModelKind::Multinomial { classes: 3 },
                positive_class: None,
                classes: vec!["Normal".into(), "Chemical".into(), "Overt".into()],
                preprocess: Preprocess {
                    categorical: [("sex".to_string(), vec!["f".to_string(), "m".to_string()])]
                        .into(),
                    impute: [
                        ("glufast".to_string(), ImputeRule::Mean),
                        ("bmi".to_string(), ImputeRule::Value(25.0)),
                    ]
                    .into(),
                },
                validation_fraction: 0.25,
                rounds: 2,
                secure_aggregation: true,
                privacy: None,
            }),
        ),
        (
            "study decision accept",
            Message::StudyDecision(StudyDecision::Accept {
                study_id: "s".into(),
                training_rows: 300,
                validation_rows: 100,
                feature_stats: Some(FeatureStats {
                    count: 300,
                    sum: vec![36000.0],
                    sum_sq: vec![4.5e6],
                    present: Vec::new(),
                }),
                target_classes: vec!["No".into(), "Yes".into()],
            }),
        ),
        (
            "study decision refuse",
            Message::StudyDecision(StudyDecision::Refuse {
                study_id: "s".into(),
                reason: "no".into(),
            }),
        ),
        (
            "round open",
            Message::RoundOpen(RoundOpen {
                study_id: "s".into(),
                round: 1,
                model: model.clone(),
                params: TrainParams::default(),
                deadline_ms: 60_000,
                secure: Some(secure.clone()),
            }),
        ),
        (
            "model update",
            Message::ModelUpdate(ModelUpdate {
                study_id: "s".into(),
                round: 1,
                weights: vec![0.25, -0.75],
                num_samples: 300,
                train_loss: 0.5,
                evaluation: Evaluation::Regression {
                    rows: 4,
                    sum_sq_error: 1.0,
                    sum_y: 2.0,
                    sum_y_sq: 3.0,
                },
            }),
        ),
        (
            "evaluate request",
            Message::EvaluateRequest(EvaluateRequest {
                study_id: "s".into(),
                round: 2,
                model,
            }),
        ),
        (
            "evaluation report",
            Message::EvaluationReport(EvaluationReport {
                study_id: "s".into(),
                round: 2,
                evaluation: Evaluation::Classification {
                    rows: 2,
                    log_loss_sum: 1.25,
                    tp: 1,
                    tn: 1,
                    fp: 0,
                    fn_: 0,
                    positive_scores: scores.clone(),
                    negative_scores: scores,
                },
            }),
        ),
        (
            "round result",
            Message::RoundResult(RoundResult {
                study_id: "s".into(),
                round: 2,
                participants: vec!["a".into(), "b".into()],
                train_loss: 0.5,
                study_complete: true,
            }),
        ),
        (
            "error",
            Message::Error(ErrorMessage {
                code: ErrorCode::Replaced,
                reason: "r".into(),
            }),
        ),
        (
            "key directory",
            to_node(ServerMessage::KeyDirectory(vec![keys.clone()])),
        ),
        (
            "encrypted shares",
            to_node(ServerMessage::EncryptedShares(vec![sealed.clone()])),
        ),
        (
            "unmask request",
            to_node(ServerMessage::UnmaskRequest {
                survivors: vec![0, 1],
                signatures: vec![(1, vec![9])],
            }),
        ),
        (
            "consistency check",
            to_node(ServerMessage::ConsistencyCheck {
                survivors: vec![0, 1],
            }),
        ),
        (
            "advertise keys",
            from_node(ClientMessage::AdvertiseKeys(keys)),
        ),
        (
            "share keys",
            from_node(ClientMessage::ShareKeys(vec![sealed])),
        ),
        (
            "masked input",
            from_node(ClientMessage::MaskedInput(vec![1, 2, 3, 4])),
        ),
        (
            "unmask shares",
            from_node(ClientMessage::UnmaskShares {
                self_mask: vec![RevealedShare {
                    owner: 0,
                    share: vec![1, 2],
                }],
                mask_key: vec![],
            }),
        ),
        (
            "survivors signed",
            from_node(ClientMessage::SurvivorsSigned(vec![5, 6])),
        ),
        (
            "statistics open",
            Message::StatisticsOpen(StatisticsOpen {
                study_id: "s".into(),
                secure: secure.clone(),
            }),
        ),
        (
            "statistics query",
            Message::StatisticsQuery(StatisticsQuery {
                query: query.clone(),
                secure: Some(secure),
                step: None,
            }),
        ),
        (
            "cox iteration",
            Message::StatisticsQuery(StatisticsQuery {
                query: StatsQuery {
                    noise_multiplier: None,
                    columns: Vec::new(),
                    cox: Some(medfed_protocol::cox::Cox {
                        covariates: vec!["age".into(), "sex".into()],
                        ties: medfed_protocol::cox::Ties::Efron,
                        max_iterations: 30,
                    }),
                    ..query
                },
                secure: None,
                step: Some(medfed_protocol::messages::QueryStep::Cox(
                    medfed_protocol::cox::CoxStep {
                        iteration: 2,
                        beta: vec![0.5, -0.25],
                    },
                )),
            }),
        ),
        (
            "statistics report",
            Message::StatisticsReport(StatisticsReport {
                query_id: "q".into(),
                vector: vec![3.0, 0.5],
            }),
        ),
    ]
}

/// The frames of [`pinned_examples`], in hex: the wire format this version speaks. A
/// failure here is a wire change: if it is meant, bump `PROTOCOL_VERSION` and regenerate
/// with `MEDFED_PRINT_WIRE_VECTORS=1 cargo test -p medfed-protocol --test codec pinned --
/// --nocapture`.
const PINNED: &[(&str, &str)] = &[
    ("hello", "000000140005000161036d2031010470696d610103676c75"),
    ("welcome", "0000000b00050103616767036d2031"),
    (
        "study announcement",
        "0000004c000502017301640470696d610103676c750474797065000103596573000000000000000000d03f020001000000000000f03f000000000000004001000000000000c03f0a0000000000003040",
    ),
    (
        "multinomial study announcement",
        "00000065000502017301640864696162657465730107676c75666173740567726f757002030003064e6f726d616c084368656d6963616c054f766572740103736578020166016d0203626d6901000000000000394007676c756661737400000000000000d03f020100",
    ),
    (
        "study decision accept",
        "00000027000503000173ac026401ac0201000000000094e1400100000000882a51410002024e6f03596573",
    ),
    ("study decision refuse", "00000009000503010173026e6f"),
    (
        "round open",
        "000000ae000504017301000103676c75010000000000205e40010000000000403e4002000000000000e03f000000000000f0bf010003676c75010000000000205e4005109a9999999999b93f7b14ae47e17a843f000000000000000000e0d4030105732f312f3102016101620201888e98a8c0e08081010300000000000020401020070707070707070707070707070707070707070707070707070707070707070702023000023001000000000000e03f00",
    ),
    (
        "model update",
        "0000003b00050501730102000000000000d03f000000000000e8bfac02000000000000e03f0204000000000000f03f00000000000000400000000000000840",
    ),
    (
        "evaluate request",
        "0000003e000506017302000103676c75010000000000205e40010000000000403e4002000000000000e03f000000000000f0bf010003676c75010000000000205e40",
    ),
    (
        "evaluation report",
        "000000de0005070173020002000000000000f43f0101000064000000020000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000006400000002000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
    ),
    (
        "round result",
        "000000140005080173020201610162000000000000e03f01",
    ),
    ("error", "000000060005090a0172"),
    (
        "key directory",
        "0000006c00050a017301000101010101010101010101010101010101010101010101010101010101010101010102020202020202020202020202020202020202020202020202020202020202020303030303030303030303030303030303030303030303030303030303030303020405",
    ),
    ("encrypted shares", "0000000e00050a0173010101000103060708"),
    ("unmask request", "0000000e00050a0173010202000101010109"),
    ("consistency check", "0000000a00050a01730103020001"),
    (
        "advertise keys",
        "0000006b00050b0173010001010101010101010101010101010101010101010101010101010101010101010102020202020202020202020202020202020202020202020202020202020202020303030303030303030303030303030303030303030303030303030303030303020405",
    ),
    ("share keys", "0000000e00050b0173010101000103060708"),
    ("masked input", "0000000c00050b017301020401020304"),
    ("unmask shares", "0000000d00050b01730103010002010200"),
    ("survivors signed", "0000000a00050b01730104020506"),
    (
        "statistics open",
        "0000005600050c017305732f312f3102016101620201888e98a8c0e08081010300000000000020401020070707070707070707070707070707070707070707070707070707070707070702023000023001000000000000e03f00",
    ),
    (
        "statistics query",
        "000000de00050d01710470696d61010361676503010000000000004440000103676c7500000000000000000000000000006940030000000000000000000000000000594000000000000069400001000000000000f83f0b010464617973067374617475730101320101310300000000000000000000000000003e400000000000004e400103736578020131013200000105732f312f3102016101620201888e98a8c0e08081010300000000000020401020070707070707070707070707070707070707070707070707070707070707070702023000023001000000000000e03f0000",
    ),
    (
        "cox iteration",
        "0000007600050d01710470696d61010361676503010000000000004440000000000b010464617973067374617475730101320101310300000000000000000000000000003e400000000000004e400103736578020131013201020361676503736578011e000001000202000000000000e03f000000000000d0bf",
    ),
    (
        "statistics report",
        "0000001600050e0171020000000000000840000000000000e03f",
    ),
];

fn hex(bytes: &[u8]) -> String {
    medfed_protocol::hex::encode(bytes)
}

fn unhex(s: &str) -> Vec<u8> {
    medfed_protocol::hex::decode(s).unwrap()
}

#[test]
fn pinned_wire_vectors_of_every_kind() {
    let examples = pinned_examples();
    // Printing the vectors again, after a deliberate wire change, is the only use of the
    // environment here.
    #[allow(clippy::disallowed_methods)]
    let print = std::env::var_os("MEDFED_PRINT_WIRE_VECTORS").is_some();
    if print {
        for (name, msg) in &examples {
            let frame = encode_frame(msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
            println!(
                "    (\n        {name:?},\n        \"{}\",\n    ),",
                hex(&frame)
            );
        }
    }
    // Every kind has an example, and every example a vector.
    for (k, name) in KINDS.iter().enumerate() {
        assert!(
            examples.iter().any(|(_, m)| kind(m) == k),
            "no pinned example of a {name}"
        );
    }
    let names: Vec<&str> = examples.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        PINNED.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "an example without its vector, or a vector without its example"
    );
    for ((name, msg), (_, want)) in examples.iter().zip(PINNED) {
        let frame = encode_frame(msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
        assert_eq!(hex(&frame), *want, "the {name} encodes differently");
        assert_eq!(
            decode_frame(&unhex(want), DEFAULT_MAX_FRAME_BYTES).unwrap(),
            *msg,
            "the pinned {name} decodes differently"
        );
        assert_eq!(usize::from(frame[HEADER_BYTES + 2]), kind(msg));
    }
}

#[test]
fn a_standby_s_hint_names_the_active_address_or_nothing() {
    let hint = ErrorCode::not_active_hint;
    assert_eq!(
        hint("instance 'b' is a standby; the active instance is 'a'; try 10.0.0.1:4433"),
        Some("10.0.0.1:4433")
    );
    assert_eq!(
        hint("instance 'b' is a standby; no instance is active yet"),
        None
    );
    assert_eq!(hint("standby; try "), None);
    assert_eq!(hint("standby; try not an address"), None);
}
