//! Framing and encoding of [`Message`]s.
//!
//! A frame is
//!
//! ```text
//! +----------------------+--------------------+-------------------------------+
//! | length: u32, BE      | version: u16, BE   | body: postcard(Message)       |
//! +----------------------+--------------------+-------------------------------+
//!   counts version+body    PROTOCOL_VERSION
//! ```
//!
//! The receiver reads the 4-byte header first and calls [`check_frame_length`] before it
//! reads or allocates the rest, so an oversized frame costs it nothing. The version comes
//! before the body so that a peer speaking another version gets
//! [`FrameError::UnsupportedVersion`], not a confusing decode error.

use crate::messages::{ErrorCode, Message};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 5;

/// Default upper bound on a frame's length (version + body), 64 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 64 * 1024 * 1024;

/// Bytes of the length header.
pub const HEADER_BYTES: usize = 4;

const VERSION_BYTES: usize = 2;

/// Why a frame could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame's length is above the limit: refused before anything is read or allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The frame's length (version + body), in bytes.
        len: u64,
        /// The limit, in bytes.
        max: u32,
    },
    /// The frame's length cannot even hold the 2-byte version.
    #[error("frame of {len} bytes is too short to hold a protocol version")]
    TooShort {
        /// The frame's length, in bytes.
        len: u32,
    },
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks protocol version {got}; this build speaks version {supported} \
         (upgrade the older side)"
    )]
    UnsupportedVersion {
        /// The peer's protocol version.
        got: u16,
        /// This build's, [`PROTOCOL_VERSION`].
        supported: u16,
    },
    /// The bytes are not a valid message (or a message could not be encoded).
    #[error("malformed {context}: {detail}")]
    Malformed {
        /// What was being decoded or encoded.
        context: &'static str,
        /// The decoder's error, in words.
        detail: String,
    },
}

impl FrameError {
    /// The protocol error code to report to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::TooShort { .. } | FrameError::Malformed { .. } => ErrorCode::Malformed,
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
        }
    }
}

/// Encodes `msg` into one complete frame (header, version, body).
pub fn encode_frame(msg: &Message, max: u32) -> Result<Vec<u8>, FrameError> {
    encode_frame_with_version(msg, PROTOCOL_VERSION, max)
}

/// As [`encode_frame`] but with an explicit version; tests use it to play a peer of another
/// version.
pub fn encode_frame_with_version(
    msg: &Message,
    version: u16,
    max: u32,
) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_BYTES + VERSION_BYTES];
    out[HEADER_BYTES..].copy_from_slice(&version.to_be_bytes());
    let mut out = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed {
        context: "outgoing message",
        detail: e.to_string(),
    })?;
    let len = (out.len() - HEADER_BYTES) as u64;
    if len > u64::from(max) {
        return Err(FrameError::TooLarge { len, max });
    }
    // len <= max <= u32::MAX, checked just above.
    out[..HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Validates a frame header and returns the number of bytes that follow it. Call this before
/// reading or allocating the frame's body.
pub fn check_frame_length(header: [u8; HEADER_BYTES], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    if (len as usize) < VERSION_BYTES {
        return Err(FrameError::TooShort { len });
    }
    Ok(len as usize)
}

/// Decodes the part of a frame after the header: version, then body.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    let (version, body) =
        payload
            .split_first_chunk::<VERSION_BYTES>()
            .ok_or(FrameError::TooShort {
                len: payload.len() as u32,
            })?;
    let version = u16::from_be_bytes(*version);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            got: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let (msg, rest) =
        postcard::take_from_bytes::<Message>(body).map_err(|e| FrameError::Malformed {
            context: "message body",
            detail: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed {
            context: "message body",
            detail: format!("{} unexpected bytes after the message", rest.len()),
        });
    }
    Ok(msg)
}

/// Decodes one complete frame (header included) held in memory.
pub fn decode_frame(frame: &[u8], max: u32) -> Result<Message, FrameError> {
    let (header, payload) =
        frame
            .split_first_chunk::<HEADER_BYTES>()
            .ok_or(FrameError::TooShort {
                len: frame.len() as u32,
            })?;
    let len = check_frame_length(*header, max)?;
    if payload.len() != len {
        return Err(FrameError::Malformed {
            context: "frame",
            detail: format!("header announces {len} bytes but {} follow", payload.len()),
        });
    }
    decode_payload(payload)
}
