//! Property tests of the frame codec (`protocol::codec`), over generated
//! frames of every type:
//!
//! * (a) encode → decode gives back the same frame, with the length prefix
//!   (`decode`) and without it (`decode_frame`);
//! * (b) every truncation of a valid encoding is "incomplete" or an error,
//!   never a panic and never some other frame; errors still name the id;
//! * (c) arbitrary bytes never panic `decode_frame`, `decode` or
//!   `decode_length`, also behind a valid frame header;
//! * (d) `decode_length` accepts exactly the lengths up to the maximum
//!   (clamped to `HARD_MAX_FRAME_BYTES`) and rejects the rest before the
//!   payload has arrived;
//! * (e) the encoding is canonical: a corrupted payload that still decodes
//!   re-encodes to exactly those bytes.
//!
//! The cargo-fuzz targets in `fuzz/` check the same things on byte inputs;
//! these run with `cargo test` in a few seconds.

use proptest::prelude::*;
use proptest::sample::Index;
use quic_fabric::protocol::codec::{BODY_VARIANTS, peek_message_id};
use quic_fabric::protocol::{
    Body, ClientId, ClientInfo, CodecError, DEFAULT_MAX_FRAME_BYTES, ErrorCode, Frame,
    HARD_MAX_FRAME_BYTES, Handshake, HandshakeAck, Keyed, LENGTH_PREFIX_BYTES, MessageId, NodeId,
    NodeStats, Payload, Position, Priority, Recovery, Sender, SessionOutcome, decode, decode_frame,
    decode_length, encode,
};
use uuid::Uuid;

// ---------------------------------------------------------------- strategies

fn uuid() -> impl Strategy<Value = Uuid> {
    prop_oneof![
        1 => Just(Uuid::nil()),
        1 => Just(Uuid::max()),
        6 => any::<u128>().prop_map(Uuid::from_u128),
    ]
}

fn message_id() -> impl Strategy<Value = MessageId> {
    uuid().prop_map(MessageId)
}

fn client_id() -> impl Strategy<Value = ClientId> {
    uuid().prop_map(ClientId)
}

fn node_id() -> impl Strategy<Value = NodeId> {
    uuid().prop_map(NodeId)
}

/// Any Unicode (control characters, astral planes, NUL), plus short
/// human-looking names and the empty string.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        2 => "[a-zA-Zé漢字🦀\\- ]{0,12}",
        1 => "\\PC{0,80}",
        1 => Just(String::new()),
    ]
}

/// Channel names: mostly well-formed ones (`[namespace:]name`), plus any
/// text, since the codec does not check the grammar (the node does).
fn channel() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "([a-z0-9_.-]{1,8}:)?[!-)+-~]{1,16}",
        1 => text(),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..96)
}

fn priority() -> impl Strategy<Value = Priority> {
    prop::sample::select(Priority::ALL.to_vec())
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        text().prop_map(Payload::Text),
        bytes().prop_map(Payload::Binary),
    ]
}

fn sender() -> impl Strategy<Value = Sender> {
    (client_id(), node_id(), text(), prop::option::of(text())).prop_map(
        |(client_id, node_id, name, user)| Sender {
            client_id,
            node_id,
            name,
            user,
        },
    )
}

fn client_info() -> impl Strategy<Value = ClientInfo> {
    (
        client_id(),
        node_id(),
        text(),
        prop::option::of(text()),
        any::<u64>(),
    )
        .prop_map(
            |(client_id, node_id, name, user, connected_at_ms)| ClientInfo {
                client_id,
                node_id,
                name,
                user,
                connected_at_ms,
            },
        )
}

fn node_stats() -> impl Strategy<Value = NodeStats> {
    (node_id(), text(), prop::array::uniform9(any::<u64>())).prop_map(
        |(node_id, server_name, n)| NodeStats {
            node_id,
            server_name,
            uptime_ms: n[0],
            clients_connected: n[1],
            connections_total: n[2],
            messages_in: n[3],
            messages_out: n[4],
            bytes_in: n[5],
            bytes_out: n[6],
            errors: n[7],
            slow_consumer_disconnects: n[8],
        },
    )
}

/// Every Body variant, equally likely. The coverage test below checks that
/// every tag below `BODY_VARIANTS` (one per variant, kept exhaustive by
/// `Body::tag`) is generated.
fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), text(), prop::option::of(text())).prop_map(
            |(min_version, max_version, name, token)| {
                Body::Handshake(Handshake {
                    min_version,
                    max_version,
                    name,
                    token,
                })
            }
        ),
        (any::<u16>(), client_id(), node_id(), text(), any::<u32>()).prop_map(
            |(version, client_id, node_id, server_name, max_frame_bytes)| {
                Body::HandshakeAck(HandshakeAck {
                    version,
                    client_id,
                    node_id,
                    server_name,
                    max_frame_bytes,
                })
            }
        ),
        text().prop_map(|text| Body::Text { text }),
        bytes().prop_map(|data| Body::Binary { data }),
        payload().prop_map(|payload| Body::Broadcast { payload }),
        (client_id(), payload()).prop_map(|(to, payload)| Body::Direct { to, payload }),
        Just(Body::Ping),
        message_id().prop_map(|of| Body::Pong { of }),
        Just(Body::ListClients),
        (
            message_id(),
            prop::collection::vec(client_info(), 0..4),
            any::<bool>()
        )
            .prop_map(|(of, clients, truncated)| Body::ClientList {
                of,
                clients,
                truncated
            }),
        message_id().prop_map(|of| Body::Ack { of }),
        (
            prop::option::of(message_id()),
            any::<u16>(),
            text(),
            prop::option::of(any::<u32>())
        )
            .prop_map(|(of, code, message, retry_after_ms)| Body::Error {
                of,
                code: ErrorCode(code),
                message,
                retry_after_ms,
            }),
        (text(), any::<bool>()).prop_map(|(reason, reconnect)| Body::Goodbye { reason, reconnect }),
        Just(Body::StatsRequest),
        (message_id(), node_stats()).prop_map(|(of, stats)| Body::Stats { of, stats }),
        (channel(), any::<bool>())
            .prop_map(|(channel, events)| Body::Subscribe { channel, events }),
        (message_id(), channel(), prop::option::of(any::<u64>())).prop_map(
            |(of, channel, subscribers)| Body::SubscribeAck {
                of,
                channel,
                subscribers,
            }
        ),
        channel().prop_map(|channel| Body::Unsubscribe { channel }),
        (channel(), payload()).prop_map(|(channel, payload)| Body::Publish { channel, payload }),
        (channel(), client_info()).prop_map(|(channel, member)| Body::Join { channel, member }),
        (channel(), client_info()).prop_map(|(channel, member)| Body::Leave { channel, member }),
        channel().prop_map(|channel| Body::PresenceRequest { channel }),
        (
            message_id(),
            channel(),
            prop::collection::vec(client_info(), 0..4),
            any::<bool>()
        )
            .prop_map(|(of, channel, members, truncated)| Body::Presence {
                of,
                channel,
                members,
                truncated
            }),
        (text(), payload()).prop_map(|(user, payload)| Body::UserDirect { user, payload }),
        (channel(), text()).prop_map(|(channel, reason)| Body::Unsubscribed { channel, reason }),
        (channel(), payload(), position()).prop_map(|(channel, payload, position)| {
            Body::Publication {
                channel,
                payload,
                position,
            }
        }),
        (channel(), any::<bool>(), prop::option::of(position())).prop_map(
            |(channel, events, since)| Body::SubscribeSince {
                channel,
                events,
                since,
            }
        ),
        (
            message_id(),
            channel(),
            prop::option::of(any::<u64>()),
            prop::option::of(position()),
            recovery()
        )
            .prop_map(|(of, channel, subscribers, position, recovery)| {
                Body::Subscribed {
                    of,
                    channel,
                    subscribers,
                    position,
                    recovery,
                }
            }),
        (channel(), any::<u32>(), prop::option::of(any::<u64>())).prop_map(
            |(channel, limit, before)| Body::HistoryRequest {
                channel,
                limit,
                before,
            }
        ),
        (
            message_id(),
            channel(),
            position(),
            prop::collection::vec(bytes().prop_map(bytes::Bytes::from), 0..3),
            any::<bool>()
        )
            .prop_map(|(of, channel, position, publications, more)| {
                Body::History {
                    of,
                    channel,
                    position,
                    publications,
                    more,
                }
            }),
        (channel(), text())
            .prop_map(|(channel, reason)| Body::SubscriptionLost { channel, reason }),
        keyed().prop_map(|message| Body::Idempotent { message }),
        (
            any::<u16>(),
            any::<u16>(),
            text(),
            prop::option::of(text()),
            prop::option::of(text())
        )
            .prop_map(|(min_version, max_version, name, token, resume)| {
                Body::ResumeHandshake {
                    handshake: Handshake {
                        min_version,
                        max_version,
                        name,
                        token,
                    },
                    resume,
                }
            }),
        (text(), any::<u64>(), session_outcome(), any::<u32>()).prop_map(
            |(token, window_ms, outcome, stored)| Body::Session {
                token,
                window_ms,
                outcome,
                stored,
            }
        ),
        (message_id(), any::<u64>()).prop_map(|(of, until_ms)| Body::Stored { of, until_ms }),
    ]
}

fn session_outcome() -> impl Strategy<Value = SessionOutcome> {
    prop_oneof![
        Just(SessionOutcome::New),
        Just(SessionOutcome::Resumed),
        Just(SessionOutcome::Expired),
        Just(SessionOutcome::AlreadyUsed),
        Just(SessionOutcome::Invalid),
        Just(SessionOutcome::WrongUser),
        Just(SessionOutcome::Disabled),
        Just(SessionOutcome::Refreshed),
    ]
}

fn keyed() -> impl Strategy<Value = Keyed> {
    prop_oneof![
        payload().prop_map(|payload| Keyed::Broadcast { payload }),
        (client_id(), payload()).prop_map(|(to, payload)| Keyed::Direct { to, payload }),
        (channel(), payload()).prop_map(|(channel, payload)| Keyed::Publish { channel, payload }),
        (text(), payload()).prop_map(|(user, payload)| Keyed::UserDirect { user, payload }),
    ]
}

fn position() -> impl Strategy<Value = Position> {
    (any::<u64>(), any::<u64>()).prop_map(|(epoch, offset)| Position { epoch, offset })
}

fn recovery() -> impl Strategy<Value = Recovery> {
    prop_oneof![
        Just(Recovery::NotRequested),
        Just(Recovery::Recovered),
        Just(Recovery::EpochChanged),
        Just(Recovery::Trimmed),
        Just(Recovery::NoHistory),
        Just(Recovery::Ahead),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        message_id(),
        priority(),
        any::<u64>(),
        prop::option::of(sender()),
        body(),
    )
        .prop_map(|(id, priority, timestamp_ms, sender, body)| Frame {
            id,
            priority,
            timestamp_ms,
            sender,
            body,
        })
}

/// The wire tag of a body (PROTOCOL.md section 4.2), as the library names
/// it; the properties check it against the encoded bytes.
fn body_tag(body: &Body) -> u32 {
    body.tag() as u32
}

/// The encoded header (id, priority, timestamp, sender) of `frame`: its
/// encoding minus the body. Ping's body is only its 4-byte tag.
fn header_bytes(frame: &Frame) -> Vec<u8> {
    let ping = Frame {
        body: Body::Ping,
        ..frame.clone()
    };
    let bytes = encode(&ping).unwrap();
    bytes[LENGTH_PREFIX_BYTES..bytes.len() - 4].to_vec()
}

// ---------------------------------------------------- the generator itself

/// The strategies reach every body type, priority, payload kind and both
/// sides of the header's Option, so the properties below cover them all.
#[test]
fn strategies_cover_every_variant() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let strategy = frame();
    let mut tags = [false; BODY_VARIANTS as usize];
    let mut priorities = [false; 3];
    let (mut text_payload, mut binary_payload) = (false, false);
    let (mut with_sender, mut without_sender) = (false, false);
    let (mut error_with_retry, mut error_without_retry) = (false, false);
    let (mut with_count, mut without_count) = (false, false);
    let mut non_ascii = false;
    for _ in 0..3000 {
        let frame = strategy.new_tree(&mut runner).unwrap().current();
        tags[body_tag(&frame.body) as usize] = true;
        priorities[frame.priority.index()] = true;
        with_sender |= frame.sender.is_some();
        without_sender |= frame.sender.is_none();
        match &frame.body {
            Body::Broadcast { payload }
            | Body::Direct { payload, .. }
            | Body::Publish { payload, .. }
            | Body::UserDirect { payload, .. } => match payload {
                Payload::Text(_) => text_payload = true,
                Payload::Binary(_) => binary_payload = true,
            },
            Body::Error { retry_after_ms, .. } => {
                error_with_retry |= retry_after_ms.is_some();
                error_without_retry |= retry_after_ms.is_none();
            }
            Body::SubscribeAck { subscribers, .. } => {
                with_count |= subscribers.is_some();
                without_count |= subscribers.is_none();
            }
            Body::Text { text } => non_ascii |= !text.is_ascii(),
            _ => {}
        }
    }
    assert!(tags.iter().all(|&t| t), "body tags reached: {tags:?}");
    assert!(priorities.iter().all(|&p| p));
    assert!(text_payload && binary_payload);
    assert!(with_sender && without_sender);
    assert!(error_with_retry && error_without_retry);
    assert!(with_count && without_count);
    assert!(non_ascii);
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) encode → decode round-trips, with and without the length prefix.
    #[test]
    fn round_trip(frame in frame()) {
        let bytes = encode(&frame).unwrap();
        let len = bytes.len() - LENGTH_PREFIX_BYTES;
        prop_assert_eq!(&bytes[..LENGTH_PREFIX_BYTES], &(len as u32).to_be_bytes()[..]);

        let (decoded, used) = decode(&bytes, DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&decoded, &frame);

        let payload = &bytes[LENGTH_PREFIX_BYTES..];
        prop_assert_eq!(&decode_frame(payload).unwrap(), &frame);
        prop_assert_eq!(peek_message_id(payload), Some(frame.id));

        // The body tag sits right after the header, as PROTOCOL.md says.
        let header = header_bytes(&frame);
        prop_assert_eq!(&payload[..header.len()], &header[..]);
        let tag = u32::from_le_bytes(payload[header.len()..header.len() + 4].try_into().unwrap());
        prop_assert_eq!(tag, body_tag(&frame.body));

        // A frame followed by the next one on the stream: only the first is taken.
        let mut two = bytes.to_vec();
        two.extend_from_slice(&bytes);
        let (first, used) = decode(&two, DEFAULT_MAX_FRAME_BYTES).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(first, frame);
    }

    /// (b) Truncations: with the original prefix the frame is incomplete
    /// (`Ok(None)`); with a prefix that claims only what is there, or as a
    /// bare payload, it is an error, and the error names the frame's id once
    /// the 16 id bytes are present.
    #[test]
    fn truncation_never_panics_nor_decodes_to_another_frame(
        frame in frame(),
        cuts in prop::collection::vec(any::<Index>(), 24),
    ) {
        let bytes = encode(&frame).unwrap();
        let payload = &bytes[LENGTH_PREFIX_BYTES..];
        // Every cut for small frames, a sample (plus the edges) for big ones.
        let mut points: Vec<usize> = if bytes.len() <= 160 {
            (0..bytes.len()).collect()
        } else {
            cuts.iter().map(|i| i.index(bytes.len())).collect()
        };
        points.extend([0, LENGTH_PREFIX_BYTES, LENGTH_PREFIX_BYTES + 16, bytes.len() - 1]);
        for cut in points {
            prop_assert_eq!(decode(&bytes[..cut], DEFAULT_MAX_FRAME_BYTES), Ok(None));
            let Some(short) = payload.get(..cut.saturating_sub(LENGTH_PREFIX_BYTES)) else {
                continue;
            };
            if short.len() == payload.len() {
                continue;
            }
            let err = decode_frame(short).unwrap_err();
            prop_assert!(
                matches!(err, CodecError::Malformed { .. } | CodecError::UnknownFrameType { .. }),
                "{:?}", err
            );
            let expected_id = (short.len() >= 16).then_some(frame.id);
            prop_assert_eq!(err.message_id(), expected_id);

            let mut reframed = (short.len() as u32).to_be_bytes().to_vec();
            reframed.extend_from_slice(short);
            prop_assert_eq!(decode(&reframed, DEFAULT_MAX_FRAME_BYTES), Err(err));
        }
    }

    /// (c) Arbitrary bytes never panic any decoder.
    #[test]
    fn arbitrary_bytes_never_panic(
        data in prop::collection::vec(any::<u8>(), 0..600),
        max in prop_oneof![Just(0usize), 0usize..4096, Just(DEFAULT_MAX_FRAME_BYTES), Just(usize::MAX)],
    ) {
        if let Err(err) = decode_frame(&data)
            && let Some(id) = err.message_id()
        {
            prop_assert_eq!(Some(id), peek_message_id(&data));
        }
        let _ = decode(&data, max);
        if let Some(prefix) = data.first_chunk::<LENGTH_PREFIX_BYTES>() {
            let _ = decode_length(*prefix, max);
        }
    }

    /// (c') Arbitrary bytes behind a valid header, so the fuzzing reaches
    /// every body decoder rather than stopping in the header.
    #[test]
    fn arbitrary_body_never_panics(
        frame in frame(),
        tag in prop_oneof![0u32..BODY_VARIANTS + 2, any::<u32>()],
        rest in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut payload = header_bytes(&frame);
        payload.extend_from_slice(&tag.to_le_bytes());
        payload.extend_from_slice(&rest);
        match decode_frame(&payload) {
            Ok(decoded) => {
                prop_assert_eq!(decoded.id, frame.id);
                prop_assert_eq!(body_tag(&decoded.body), tag);
                prop_assert_eq!(&encode(&decoded).unwrap()[LENGTH_PREFIX_BYTES..], &payload[..]);
            }
            Err(CodecError::UnknownFrameType { tag: t, id }) => {
                prop_assert!(tag >= BODY_VARIANTS);
                prop_assert_eq!(t, tag);
                prop_assert_eq!(id, Some(frame.id));
            }
            Err(CodecError::Malformed { id, .. }) => {
                prop_assert!(tag < BODY_VARIANTS, "unknown tag {} reported as malformed", tag);
                prop_assert_eq!(id, Some(frame.id));
            }
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }

    /// (d) `decode_length` accepts exactly `len <= min(max, HARD_MAX)`, and
    /// `decode` rejects a too-long frame from its prefix alone.
    #[test]
    fn decode_length_enforces_the_maximum(
        len in prop_oneof![
            any::<u32>(),
            0u32..=2048,
            Just(HARD_MAX_FRAME_BYTES as u32),
            Just(HARD_MAX_FRAME_BYTES as u32 + 1),
            Just(DEFAULT_MAX_FRAME_BYTES as u32),
            Just(DEFAULT_MAX_FRAME_BYTES as u32 + 1),
            Just(u32::MAX),
        ],
        max in prop_oneof![
            any::<usize>(),
            0usize..=2048,
            Just(DEFAULT_MAX_FRAME_BYTES),
            Just(HARD_MAX_FRAME_BYTES),
            Just(usize::MAX),
        ],
    ) {
        let prefix = len.to_be_bytes();
        let limit = max.min(HARD_MAX_FRAME_BYTES);
        let len = len as usize;
        if len <= limit {
            prop_assert_eq!(decode_length(prefix, max), Ok(len));
            if len > 0 {
                // Within the limit but not all there yet: incomplete.
                prop_assert_eq!(decode(&prefix, max), Ok(None));
            }
        } else {
            let too_large = CodecError::FrameTooLarge { len, max: limit };
            prop_assert_eq!(decode_length(prefix, max), Err(too_large.clone()));
            prop_assert_eq!(decode(&prefix, max), Err(too_large));
        }
    }

    /// (e) The encoding is canonical: if a payload with one byte changed
    /// still decodes, encoding the result gives exactly the changed bytes
    /// (so a decoded frame always has one wire form, which the fuzz target
    /// `frame_decode` also asserts).
    #[test]
    fn corrupted_payload_decodes_only_canonically(
        frame in frame(),
        at in any::<Index>(),
        xor in 1u8..=255,
    ) {
        let bytes = encode(&frame).unwrap();
        let mut payload = bytes[LENGTH_PREFIX_BYTES..].to_vec();
        let i = at.index(payload.len());
        payload[i] ^= xor;
        if let Ok(decoded) = decode_frame(&payload) {
            prop_assert_ne!(&decoded, &frame);
            prop_assert_eq!(&encode(&decoded).unwrap()[LENGTH_PREFIX_BYTES..], &payload[..]);
        }
    }
}

/// Fixed edge cases the generators may not hit often.
#[test]
fn empty_and_tiny_inputs() {
    assert!(matches!(
        decode_frame(&[]),
        Err(CodecError::Malformed { id: None, .. })
    ));
    assert_eq!(decode(&[], DEFAULT_MAX_FRAME_BYTES), Ok(None));
    assert_eq!(decode(&[0, 0, 0], DEFAULT_MAX_FRAME_BYTES), Ok(None));
    // A zero-length frame is complete and malformed.
    assert!(matches!(
        decode(&[0, 0, 0, 0], DEFAULT_MAX_FRAME_BYTES),
        Err(CodecError::Malformed { id: None, .. })
    ));
    assert_eq!(decode_length([0; 4], 0), Ok(0));
    assert!(decode_length([0, 0, 0, 1], 0).is_err());
}
