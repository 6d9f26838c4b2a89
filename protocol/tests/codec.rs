//! Wire codec properties: every message round-trips, and arbitrary bytes never panic.

use medfed_protocol::codec::{
    HEADER_BYTES, check_frame_length, decode_frame, decode_payload, encode_frame,
    encode_frame_with_version,
};
use medfed_protocol::messages::*;
use medfed_protocol::metrics::{Evaluation, SCORE_BINS};
use medfed_protocol::model::{GlobalModel, ModelKind, TrainParams};
use medfed_protocol::stats::{FeatureStats, Standardization};
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, FrameError, PROTOCOL_VERSION};
use proptest::prelude::*;

fn finite() -> impl Strategy<Value = f64> {
    -1e6f64..1e6
}

fn model() -> impl Strategy<Value = GlobalModel> {
    (1usize..6, any::<bool>()).prop_flat_map(|(d, logistic)| {
        (
            prop::collection::vec("[a-z]{1,8}", d),
            prop::collection::vec(finite(), d),
            prop::collection::vec(0.1f64..10.0, d),
            prop::collection::vec(finite(), d + 1),
        )
            .prop_map(move |(features, mean, std, weights)| GlobalModel {
                kind: if logistic {
                    ModelKind::Logistic
                } else {
                    ModelKind::Linear
                },
                features,
                standardization: Standardization { mean, std },
                weights,
            })
    })
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
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
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

proptest! {
    #[test]
    fn every_message_round_trips(msg in message()) {
        let frame = encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
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
        ErrorCode::Replaced,
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
            0, 3, // protocol version 3
            9, // Message::Error (variant index 9)
            1, // ErrorCode::Malformed (variant index 1)
            2, b'a', b'b', // reason: varint length, bytes
        ]
    );
    assert_eq!(frame.len(), HEADER_BYTES + 7);
}
