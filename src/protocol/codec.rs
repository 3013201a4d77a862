//! Pure encoding and decoding of frames: no I/O here.
//!
//! A frame on the wire is a `u32` big-endian payload length followed by the
//! payload: the [`Frame`] in bincode's legacy format (the bincode-1 wire format:
//! little-endian fixed-width integers, `u64` lengths, `u32` enum tags). The
//! length is checked against the maximum before anything is allocated, and
//! bincode itself runs with a byte limit, so no input can make the decoder
//! claim more than [`HARD_MAX_FRAME_BYTES`]. Why a payload does not decode
//! is worded for people (it goes to the client in an Error frame): the
//! field at fault and what was wrong, never bincode's Rust debug output.

use bincode::config::{Configuration, Fixint, Limit, LittleEndian};
use bincode::error::DecodeError;
use bytes::{BufMut, Bytes, BytesMut};

use super::{Frame, HARD_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES, MessageId, Priority, Sender};

/// Number of frame types this build knows (wire tags `0..BODY_VARIANTS`).
pub const BODY_VARIANTS: u32 = super::FRAME_NAMES.len() as u32;

type WireConfig = Configuration<LittleEndian, Fixint, Limit<HARD_MAX_FRAME_BYTES>>;

const fn wire_config() -> WireConfig {
    bincode::config::legacy().with_limit::<HARD_MAX_FRAME_BYTES>()
}

/// Why bytes could not be turned into a frame, or a frame into bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The length prefix announces more than the allowed maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Announced payload length.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// The header decoded but the frame type tag is not one this build knows.
    #[error("unknown frame type {tag}")]
    UnknownFrameType {
        /// The tag found.
        tag: u32,
        /// The frame's id, from its header.
        id: Option<MessageId>,
    },
    /// The payload is not a valid frame.
    #[error("malformed frame: {reason}")]
    Malformed {
        /// What was wrong, in plain words: for a frame, the field at fault
        /// (`priority: invalid enum tag 7 (expected 0 to 2)`).
        reason: String,
        /// The frame's id, when the header could be read.
        id: Option<MessageId>,
    },
    /// The frame could not be encoded (larger than the hard maximum).
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

impl CodecError {
    /// The id of the offending frame, when it could be recovered.
    pub fn message_id(&self) -> Option<MessageId> {
        match self {
            CodecError::UnknownFrameType { id, .. } | CodecError::Malformed { id, .. } => *id,
            _ => None,
        }
    }
}

/// Encodes `frame` with its length prefix, ready to write to a stream.
pub fn encode(frame: &Frame) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u32(0);
    let mut writer = (&mut buf).writer();
    bincode::serde::encode_into_std_write(frame, &mut writer, wire_config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = buf.len() - LENGTH_PREFIX_BYTES;
    if len > HARD_MAX_FRAME_BYTES {
        return Err(CodecError::Encode(format!(
            "{len} bytes exceeds the hard maximum of {HARD_MAX_FRAME_BYTES}"
        )));
    }
    buf[..LENGTH_PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf.freeze())
}

/// Reads a length prefix and checks it against `max` (never above
/// [`HARD_MAX_FRAME_BYTES`]).
pub fn decode_length(prefix: [u8; LENGTH_PREFIX_BYTES], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(prefix) as usize;
    let max = max.min(HARD_MAX_FRAME_BYTES);
    if len > max {
        return Err(CodecError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one frame payload (the bytes after the length prefix). The whole
/// slice must be consumed: trailing bytes are an error.
pub fn decode_frame(payload: &[u8]) -> Result<Frame, CodecError> {
    match bincode::serde::decode_from_slice::<Frame, _>(payload, wire_config()) {
        Ok((frame, used)) if used == payload.len() => Ok(frame),
        Ok((frame, used)) => Err(CodecError::Malformed {
            reason: format!("{} trailing bytes", payload.len() - used),
            id: Some(frame.id),
        }),
        Err(err) => Err(classify(payload, err)),
    }
}

/// Decodes the first frame in `buf` (length prefix included). Returns
/// `Ok(None)` when `buf` does not hold a whole frame yet, otherwise the frame
/// and the number of bytes it occupied.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, CodecError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let len = decode_length(*prefix, max)?;
    let Some(payload) = buf.get(LENGTH_PREFIX_BYTES..LENGTH_PREFIX_BYTES + len) else {
        return Ok(None);
    };
    decode_frame(payload).map(|frame| Some((frame, LENGTH_PREFIX_BYTES + len)))
}

/// Encodes any value with the wire settings (used for cluster bus
/// messages and Redis values, so they share the protocol's encoding).
pub fn encode_value<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, wire_config())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a value written by [`encode_value`]; the whole slice must be used.
pub fn decode_value<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bincode::serde::decode_from_slice::<T, _>(bytes, wire_config()) {
        Ok((value, used)) if used == bytes.len() => Ok(value),
        Ok((_, used)) => Err(CodecError::Malformed {
            reason: format!("{} trailing bytes", bytes.len() - used),
            id: None,
        }),
        Err(err) => Err(CodecError::Malformed {
            reason: describe(&err),
            id: None,
        }),
    }
}

/// Reads just the message id from the start of a payload, if it is long enough.
pub fn peek_message_id(payload: &[u8]) -> Option<MessageId> {
    let bytes: [u8; 16] = payload.get(..16)?.try_into().ok()?;
    Some(MessageId(uuid::Uuid::from_bytes(bytes)))
}

/// Decodes one `T` from the front of `rest` and moves `rest` past it.
fn take<T: serde::de::DeserializeOwned>(rest: &mut &[u8]) -> Result<T, DecodeError> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(rest, wire_config())?;
    *rest = rest.get(used..).unwrap_or_default();
    Ok(value)
}

/// Explains why a full decode of `payload` failed: the header fields are
/// decoded one by one to name the field at fault, and a valid header
/// followed by a tag this build does not know is an unknown frame type,
/// not a corrupt frame.
fn classify(payload: &[u8], err: DecodeError) -> CodecError {
    let malformed = |field: &str, err: &DecodeError| CodecError::Malformed {
        reason: format!("{field}: {}", describe(err)),
        id: peek_message_id(payload),
    };
    let mut rest = payload;
    if let Err(e) = take::<MessageId>(&mut rest) {
        return malformed("id", &e);
    }
    if let Err(e) = take::<Priority>(&mut rest) {
        return malformed("priority", &e);
    }
    if let Err(e) = take::<u64>(&mut rest) {
        return malformed("timestamp_ms", &e);
    }
    if let Err(e) = take::<Option<Sender>>(&mut rest) {
        return malformed("sender", &e);
    }
    let tag = match take::<u32>(&mut rest) {
        Ok(tag) => tag,
        Err(e) => return malformed("body", &e),
    };
    match super::FRAME_NAMES.get(tag as usize) {
        Some(kind) => malformed(&format!("body ({kind})"), &err),
        None => CodecError::UnknownFrameType {
            tag,
            id: peek_message_id(payload),
        },
    }
}

/// A decoding failure in words a client in any language can read.
/// bincode's own `Display` prints its Rust debug form (for example
/// `UnexpectedEnd { additional: 98 }`), which goes to clients in Error
/// frames and means little outside Rust.
fn describe(err: &DecodeError) -> String {
    use bincode::error::AllowedEnumVariants;
    match err {
        DecodeError::UnexpectedEnd { additional } | DecodeError::Io { additional, .. } => {
            format!("truncated: {additional} more bytes expected")
        }
        DecodeError::LimitExceeded => {
            format!("a length field claims more than the {HARD_MAX_FRAME_BYTES}-byte maximum")
        }
        DecodeError::UnexpectedVariant {
            type_name, found, ..
        } if type_name.starts_with("Option") => {
            format!("invalid Option tag 0x{found:02x} (expected 0x00 or 0x01)")
        }
        DecodeError::UnexpectedVariant {
            type_name,
            found,
            allowed,
        } => match allowed {
            AllowedEnumVariants::Range { min, max } => {
                format!("invalid enum tag {found} for {type_name} (expected {min} to {max})")
            }
            _ => format!("invalid enum tag {found} for {type_name}"),
        },
        DecodeError::Utf8 { inner } => format!(
            "invalid UTF-8 in a string, at byte {} of the string",
            inner.valid_up_to()
        ),
        DecodeError::InvalidCharEncoding(_) => "invalid UTF-8 in a character".to_owned(),
        DecodeError::InvalidBooleanValue(byte) => {
            format!("invalid bool byte 0x{byte:02x} (expected 0x00 or 0x01)")
        }
        DecodeError::ArrayLengthMismatch { required, found } => {
            format!("{found} elements where exactly {required} are expected")
        }
        DecodeError::OutsideUsizeRange(len) => format!("length {len} is out of range"),
        DecodeError::OtherString(message) => describe_serde(message),
        _ => "the bytes are not a valid value of the expected type".to_owned(),
    }
}

/// serde's own messages are English already, except for the code quotes;
/// the one every derived enum produces for an unknown tag is reworded.
fn describe_serde(message: &str) -> String {
    // "invalid value: integer `7`, expected variant index 0 <= i < 3"
    if let Some(rest) = message.strip_prefix("invalid value: integer `")
        && let Some((found, count)) = rest.split_once("`, expected variant index 0 <= i < ")
        && let Ok(count) = count.parse::<u32>()
    {
        return format!(
            "invalid enum tag {found} (expected 0 to {})",
            count.saturating_sub(1)
        );
    }
    message.replace(['`', '{', '}'], "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    fn sample_frames() -> Vec<Frame> {
        let client = ClientId::new_random();
        let node = NodeId::new_random();
        let id = MessageId::new_random();
        let sender = Sender {
            client_id: client,
            node_id: node,
            name: "alice".into(),
            user: Some("u-1".into()),
        };
        let info = ClientInfo {
            client_id: client,
            node_id: node,
            name: "alice".into(),
            user: None,
            connected_at_ms: 42,
        };
        let bodies = vec![
            Body::Handshake(Handshake {
                min_version: 1,
                max_version: 1,
                name: "alice".into(),
                token: Some("t".into()),
            }),
            Body::HandshakeAck(HandshakeAck {
                version: 1,
                client_id: client,
                node_id: node,
                server_name: "n".into(),
                max_frame_bytes: 1024,
            }),
            Body::Text {
                text: "héllo".into(),
            },
            Body::Binary {
                data: vec![0, 1, 255],
            },
            Body::Broadcast {
                payload: Payload::Text("hi".into()),
            },
            Body::Direct {
                to: client,
                payload: Payload::Binary(vec![9; 300]),
            },
            Body::Ping,
            Body::Pong { of: id },
            Body::ListClients,
            Body::ClientList {
                of: id,
                clients: vec![info.clone(), info.clone()],
                truncated: true,
            },
            Body::Ack { of: id },
            Body::Error {
                of: Some(id),
                code: error_code::UNKNOWN_CLIENT,
                message: "x".into(),
                retry_after_ms: Some(250),
            },
            Body::Goodbye {
                reason: "bye".into(),
                reconnect: true,
            },
            Body::StatsRequest,
            Body::Stats {
                of: id,
                stats: NodeStats {
                    node_id: node,
                    messages_in: 7,
                    ..Default::default()
                },
            },
            Body::Subscribe {
                channel: "chat:lobby".into(),
                events: true,
            },
            Body::SubscribeAck {
                of: id,
                channel: "chat:lobby".into(),
                subscribers: Some(3),
            },
            Body::Unsubscribe {
                channel: "lobby".into(),
            },
            Body::Publish {
                channel: "chat:lobby".into(),
                payload: Payload::Binary(vec![7; 40]),
            },
            Body::Join {
                channel: "chat:lobby".into(),
                member: info.clone(),
            },
            Body::Leave {
                channel: "chat:lobby".into(),
                member: info.clone(),
            },
            Body::PresenceRequest {
                channel: "chat:lobby".into(),
            },
            Body::Presence {
                of: id,
                channel: "chat:lobby".into(),
                members: vec![info],
                truncated: false,
            },
            Body::UserDirect {
                user: "u-2".into(),
                payload: Payload::Text("hé".into()),
            },
            Body::Unsubscribed {
                channel: "chat:lobby".into(),
                reason: "moderated".into(),
            },
            Body::Publication {
                channel: "h:feed".into(),
                payload: Payload::Text("p".into()),
                position: super::super::Position {
                    epoch: u64::MAX - 3,
                    offset: 1 << 40,
                },
            },
            Body::SubscribeSince {
                channel: "h:feed".into(),
                events: false,
                since: Some(super::super::Position {
                    epoch: 9,
                    offset: 12,
                }),
            },
            Body::Subscribed {
                of: id,
                channel: "h:feed".into(),
                subscribers: None,
                position: None,
                recovery: super::super::Recovery::Trimmed,
            },
            Body::HistoryRequest {
                channel: "h:feed".into(),
                limit: 50,
                before: Some(7),
            },
            Body::History {
                of: id,
                channel: "h:feed".into(),
                position: super::super::Position {
                    epoch: 9,
                    offset: 12,
                },
                publications: vec![bytes::Bytes::from_static(&[0, 0, 0, 1, 6])],
                more: true,
            },
            Body::SubscriptionLost {
                channel: "h:feed".into(),
                reason: "trimmed".into(),
            },
            Body::Idempotent {
                message: super::super::Keyed::UserDirect {
                    user: "u-3".into(),
                    payload: Payload::Binary(vec![1, 2]),
                },
            },
            Body::ResumeHandshake {
                handshake: Handshake {
                    min_version: 1,
                    max_version: 3,
                    name: "r".into(),
                    token: None,
                },
                resume: Some("fs1.a.b".into()),
            },
            Body::Session {
                token: "fs1.a.b".into(),
                window_ms: 60_000,
                outcome: super::super::SessionOutcome::Resumed,
                stored: 2,
            },
            Body::Stored {
                of: MessageId::new_random(),
                until_ms: 1_700_000_000_000,
            },
        ];
        assert_eq!(
            bodies.len() as u32,
            BODY_VARIANTS,
            "every frame type is sampled"
        );
        for (tag, body) in bodies.iter().enumerate() {
            assert_eq!(body.tag(), tag, "sampled in wire tag order");
        }
        bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Frame {
                id: MessageId::new_random(),
                priority: Priority::ALL[i % 3],
                timestamp_ms: 1_700_000_000_000 + i as u64,
                sender: (i % 2 == 0).then(|| sender.clone()),
                body,
            })
            .collect()
    }

    #[test]
    fn every_frame_type_round_trips() {
        for frame in sample_frames() {
            let bytes = encode(&frame).unwrap();
            let (decoded, used) = decode(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(decoded, frame);
        }
    }

    #[test]
    fn every_truncation_is_incomplete_or_error_never_panic() {
        for frame in sample_frames() {
            let bytes = encode(&frame).unwrap();
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut], DEFAULT_MAX_FRAME_BYTES), Ok(None));
                if cut >= LENGTH_PREFIX_BYTES {
                    // The payload cut short, with a prefix that claims only what is there.
                    assert!(decode_frame(&bytes[LENGTH_PREFIX_BYTES..cut]).is_err());
                }
            }
        }
    }

    #[test]
    fn oversized_prefix_is_rejected_before_allocation() {
        let prefix = u32::MAX.to_be_bytes();
        assert_eq!(
            decode(&prefix, DEFAULT_MAX_FRAME_BYTES),
            Err(CodecError::FrameTooLarge {
                len: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME_BYTES
            })
        );
        // The configured maximum is clamped to the hard maximum.
        assert!(matches!(
            decode_length(
                ((HARD_MAX_FRAME_BYTES + 1) as u32).to_be_bytes(),
                usize::MAX
            ),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn huge_claimed_string_length_is_an_error_not_an_abort() {
        // A Text frame whose string claims 2^40 bytes.
        let mut frame = encode(&Frame::new(
            Priority::Normal,
            Body::Text {
                text: String::new(),
            },
        ))
        .unwrap()
        .to_vec();
        let len_at = frame.len() - 8;
        frame[len_at..].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = decode_frame(&frame[LENGTH_PREFIX_BYTES..]).unwrap_err();
        assert!(
            matches!(err, CodecError::Malformed { id: Some(_), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic pseudo-random garbage of many lengths.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode_frame(&bytes);
            let _ = decode(&bytes, DEFAULT_MAX_FRAME_BYTES);
        }
    }

    #[test]
    fn unknown_type_is_told_apart_from_garbage() {
        let frame = Frame::new(Priority::High, Body::Ping);
        let mut bytes = encode(&frame).unwrap().to_vec();
        // Ping has no fields: its tag is the last 4 bytes.
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&99u32.to_le_bytes());
        assert_eq!(
            decode_frame(&bytes[LENGTH_PREFIX_BYTES..]),
            Err(CodecError::UnknownFrameType {
                tag: 99,
                id: Some(frame.id)
            })
        );
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let frame = Frame::new(Priority::High, Body::Ping);
        let mut payload = encode(&frame).unwrap()[LENGTH_PREFIX_BYTES..].to_vec();
        payload.push(0);
        assert!(matches!(
            decode_frame(&payload),
            Err(CodecError::Malformed { .. })
        ));
    }

    /// The reason of a Malformed error; fails on any other outcome.
    fn malformed_reason(payload: &[u8]) -> String {
        match decode_frame(payload) {
            Err(CodecError::Malformed { reason, .. }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// No Rust struct or debug syntax: a client in any language reads it.
    fn assert_plain(reason: &str) {
        for rust in ['{', '}', '`'] {
            assert!(!reason.contains(rust), "{rust:?} in {reason:?}");
        }
        for name in [
            "UnexpectedEnd",
            "additional",
            "OtherString",
            "Utf8Error",
            "InvalidBooleanValue",
        ] {
            assert!(!reason.contains(name), "{name:?} in {reason:?}");
        }
    }

    fn payload_of(frame: &Frame) -> Vec<u8> {
        encode(frame).unwrap()[LENGTH_PREFIX_BYTES..].to_vec()
    }

    #[test]
    fn a_truncated_frame_says_how_many_bytes_are_missing() {
        let payload = payload_of(&Frame::new(
            Priority::Normal,
            Body::Text {
                text: "x".repeat(100),
            },
        ));
        let reason = malformed_reason(&payload[..payload.len() - 98]);
        assert_plain(&reason);
        assert_eq!(reason, "body (text): truncated: 98 more bytes expected");
        // Cut inside the header: the field is named.
        let reason = malformed_reason(&payload[..18]);
        assert_plain(&reason);
        assert_eq!(reason, "priority: truncated: 2 more bytes expected");
    }

    #[test]
    fn invalid_utf8_is_named() {
        let mut payload = payload_of(&Frame::new(
            Priority::Normal,
            Body::Text { text: "hi".into() },
        ));
        let last = payload.len() - 1;
        payload[last] = 0xff;
        let reason = malformed_reason(&payload);
        assert_plain(&reason);
        assert!(
            reason.starts_with("body (text): invalid UTF-8 in a string"),
            "{reason}"
        );
    }

    #[test]
    fn an_invalid_bool_byte_is_named() {
        let mut payload = payload_of(&Frame::new(
            Priority::High,
            Body::Goodbye {
                reason: "bye".into(),
                reconnect: true,
            },
        ));
        let last = payload.len() - 1;
        payload[last] = 5;
        let reason = malformed_reason(&payload);
        assert_plain(&reason);
        assert_eq!(
            reason,
            "body (goodbye): invalid bool byte 0x05 (expected 0x00 or 0x01)"
        );
    }

    #[test]
    fn invalid_enum_and_option_tags_are_named() {
        let payload = payload_of(&Frame::new(Priority::High, Body::Ping));
        // Priority is the u32 after the 16-byte id.
        let mut bad = payload.clone();
        bad[16..20].copy_from_slice(&7u32.to_le_bytes());
        let reason = malformed_reason(&bad);
        assert_plain(&reason);
        assert_eq!(reason, "priority: invalid enum tag 7 (expected 0 to 2)");
        // The sender Option's tag byte follows the 8-byte timestamp.
        let mut bad = payload.clone();
        bad[28] = 5;
        let reason = malformed_reason(&bad);
        assert_plain(&reason);
        assert_eq!(
            reason,
            "sender: invalid Option tag 0x05 (expected 0x00 or 0x01)"
        );
        // A Payload tag inside a Broadcast body.
        let mut bad = payload_of(&Frame::new(
            Priority::High,
            Body::Broadcast {
                payload: Payload::Text(String::new()),
            },
        ));
        bad[33..37].copy_from_slice(&9u32.to_le_bytes());
        let reason = malformed_reason(&bad);
        assert_plain(&reason);
        assert_eq!(
            reason,
            "body (broadcast): invalid enum tag 9 (expected 0 to 1)"
        );
    }

    #[test]
    fn a_length_beyond_the_hard_maximum_is_named() {
        let mut payload = payload_of(&Frame::new(
            Priority::Normal,
            Body::Text {
                text: String::new(),
            },
        ));
        let at = payload.len() - 8;
        payload[at..].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let reason = malformed_reason(&payload);
        assert_plain(&reason);
        assert!(reason.starts_with("body (text): "), "{reason}");
    }

    #[test]
    fn decode_value_reasons_are_plain_too() {
        let info = ClientInfo {
            client_id: ClientId::new_random(),
            node_id: NodeId::new_random(),
            name: "al".into(),
            user: Some("u".into()),
            connected_at_ms: 1,
        };
        let bytes = encode_value(&info).unwrap();
        let reason = |bytes: &[u8]| match decode_value::<ClientInfo>(bytes) {
            Err(CodecError::Malformed { reason, id: None }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        };
        let truncated = reason(&bytes[..bytes.len() - 3]);
        assert_plain(&truncated);
        assert_eq!(truncated, "truncated: 3 more bytes expected");
        let mut bad = bytes.clone();
        bad[32 + 8] = 0xff; // first byte of the name
        let utf8 = reason(&bad);
        assert_plain(&utf8);
        assert!(utf8.starts_with("invalid UTF-8 in a string"), "{utf8}");
        let mut bad = bytes.clone();
        bad[32 + 8 + 2] = 7; // the user Option's tag
        let option = reason(&bad);
        assert_plain(&option);
        assert_eq!(option, "invalid Option tag 0x07 (expected 0x00 or 0x01)");
        let mut priority = encode_value(&Priority::High).unwrap();
        priority[0] = 3;
        let tag = match decode_value::<Priority>(&priority) {
            Err(CodecError::Malformed { reason, .. }) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        };
        assert_eq!(tag, "invalid enum tag 3 (expected 0 to 2)");
    }
}
