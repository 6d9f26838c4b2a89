//! The wire decoder on arbitrary bytes: `decode_frame` (a whole frame), `check_frame_length`
//! (its header) and `decode_payload` (what follows the header). Whatever decodes must
//! re-encode, decode again to the same message, and encode to the same bytes again (the
//! round trip property); and the errors must be the typed ones the receiver maps to a
//! protocol error code.

#![no_main]

use libfuzzer_sys::fuzz_target;
use medfed_fuzz::kind_index;
use medfed_protocol::codec::{
    HEADER_BYTES, PROTOCOL_VERSION, check_frame_length, decode_frame, decode_payload, encode_frame,
};
use medfed_protocol::messages::ErrorCode;
use medfed_protocol::{DEFAULT_MAX_FRAME_BYTES, FrameError, Message};

/// A decoded message re-encodes to a frame that decodes to the same message (compared by
/// its bytes, so that a NaN weight counts as itself) and re-encodes to the same bytes.
fn round_trip(msg: &Message, body_len: usize) {
    let frame = encode_frame(msg, u32::MAX).expect("a decoded message encodes");
    // Postcard accepts overlong varints (e.g. 0xcd 0x00 for 77), so a message has more than
    // one encoding, but the encoder writes the shortest: never more than it was decoded from.
    assert!(
        frame.len() - HEADER_BYTES <= body_len,
        "a {} re-encodes to {} bytes, decoded from {body_len}",
        msg.kind(),
        frame.len() - HEADER_BYTES
    );
    let again = decode_frame(&frame, u32::MAX).expect("a re-encoded message decodes");
    assert_eq!(kind_index(&again), kind_index(msg));
    assert_eq!(again.kind(), msg.kind());
    assert_eq!(again.study_round(), msg.study_round());
    let frame2 = encode_frame(&again, u32::MAX).expect("encodes again");
    assert_eq!(frame, frame2, "the round trip changed the {}", msg.kind());
    if !format!("{msg:?}").contains("NaN") {
        assert_eq!(&again, msg);
    }
}

fn check_error(e: &FrameError) {
    // Every decode error maps to a code and says something.
    let code = e.code();
    assert!(matches!(
        code,
        ErrorCode::Malformed | ErrorCode::FrameTooLarge | ErrorCode::UnsupportedVersion
    ));
    assert!(!e.to_string().is_empty());
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the receiver's limit: the default, or a small one.
    let (limit, data) = match data.split_first() {
        Some((b, rest)) if b & 1 == 1 => (1024 + u32::from(*b) * 16, rest),
        Some((_, rest)) => (DEFAULT_MAX_FRAME_BYTES, rest),
        None => (DEFAULT_MAX_FRAME_BYTES, data),
    };

    // A whole frame.
    match decode_frame(data, limit) {
        Ok(msg) => {
            assert!(data.len() <= HEADER_BYTES + limit as usize);
            round_trip(&msg, data.len() - HEADER_BYTES);
            // Its encoding fits the limit it was received under.
            assert!(encode_frame(&msg, limit).is_ok());
        }
        Err(e) => check_error(&e),
    }

    // The header alone: a length the receiver may then read.
    if let Some(header) = data.first_chunk::<HEADER_BYTES>() {
        match check_frame_length(*header, limit) {
            Ok(len) => {
                assert!(len >= 2 && len <= limit as usize);
                assert_eq!(len as u32, u32::from_be_bytes(*header));
            }
            Err(e) => {
                check_error(&e);
                let len = u32::from_be_bytes(*header);
                assert!(len < 2 || len > limit);
            }
        }
    }

    // The payload after a header: the version, then the body.
    match decode_payload(data) {
        Ok(msg) => {
            assert_eq!(data[..2], PROTOCOL_VERSION.to_be_bytes());
            round_trip(&msg, data.len());
        }
        Err(FrameError::UnsupportedVersion { got, supported }) => {
            assert_ne!(got, supported);
            assert_eq!(got.to_be_bytes(), data[..2]);
        }
        Err(e) => check_error(&e),
    }
});
