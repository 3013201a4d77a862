//! Arbitrary bytes as the contents of one QUIC stream, read the way the node
//! reads it (`connection::read_frame`, `read_handshake`, `admit`):
//!
//! ```text
//! loop {
//!     4-byte prefix (stop at end of input)
//!     decode_length(prefix, max)
//!       Ok(len)                           -> take len bytes (stop if truncated), decode_frame
//!       FrameTooLarge, len <= HARD_MAX    -> read the 16-byte id, skip len bytes (stop if truncated)
//!       anything else                     -> stop (the node closes the connection)
//! }
//! ```
//!
//! Every Handshake frame goes through the node's version negotiation and name
//! checks (the node's own `protocol::negotiate_version` and `valid_name`,
//! with the default config: 16 KiB handshake cap, 64-byte names). Token and
//! client-certificate authentication are not modelled.
//! Every decoded frame is also stamped with a sender and re-encoded, as the
//! node does when it echoes or fans a message out.
//!
//! The stream is read three times: as a connection's first stream (the first
//! frame must be an acceptable Handshake, else the node refuses and stops
//! reading) and as a later stream, both with the default 1 MiB maximum; and
//! as a later stream with a tiny maximum, so that the "oversized but within
//! the hard limit: skip it and stay in sync" path is reachable with inputs of
//! fuzzer size (libFuzzer's default -max_len is 4096).

#![no_main]

use libfuzzer_sys::fuzz_target;
use quic_fabric::protocol::{
    self, Body, ClientId, CodecError, DEFAULT_MAX_FRAME_BYTES, Frame, HARD_MAX_FRAME_BYTES,
    Handshake, LENGTH_PREFIX_BYTES, MAX_NAME_BYTES, MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION,
    NodeId, Sender, codec::peek_message_id,
};

/// Default `max_handshake_bytes`: the node reads the first frame with
/// `max_handshake_bytes.min(max_message_bytes)` as its maximum.
const MAX_HANDSHAKE_BYTES: usize = 16 * 1024;

/// The node's own checks (`connection::admit` calls these).
fn negotiate(hello: &Handshake) -> Result<u16, String> {
    quic_fabric::protocol::negotiate_version(hello)
}

/// The name check with the default `max_name_bytes` (= `MAX_NAME_BYTES`).
fn name_ok(name: &str) -> bool {
    quic_fabric::protocol::valid_name(name, MAX_NAME_BYTES).is_ok()
}

fn check_handshake(hello: &Handshake) {
    match negotiate(hello) {
        Ok(version) => {
            assert!((MIN_PROTOCOL_VERSION..=MAX_PROTOCOL_VERSION).contains(&version));
            assert!((hello.min_version..=hello.max_version).contains(&version));
        }
        Err(message) => assert!(!message.is_empty()),
    }
    if name_ok(&hello.name) {
        assert!(!hello.name.is_empty() && hello.name.len() <= MAX_NAME_BYTES);
    }
}

/// What the node does with an accepted frame that matters to the codec:
/// stamp it with the sender and encode it again.
fn stamp_and_reencode(mut frame: Frame, name: &str) {
    frame.sender = Some(Sender {
        client_id: ClientId::default(),
        node_id: NodeId::default(),
        name: name.to_owned(),
        user: None,
    });
    let bytes = protocol::encode(&frame).expect("a stamped frame re-encodes");
    let (back, used) = protocol::decode(&bytes, HARD_MAX_FRAME_BYTES)
        .expect("a stamped frame decodes")
        .expect("the whole frame is there");
    assert_eq!(used, bytes.len());
    assert_eq!(back, frame);
}

/// Reads one stream. `handshake_first`: this is the connection's first
/// stream, whose first frame must be a valid Handshake (else the node refuses
/// the connection); otherwise a later stream, read in steady state.
fn read_stream(mut rest: &[u8], max: usize, handshake_first: bool) {
    // The Handshake's name becomes the sender stamp for the frames after it.
    let mut name: Option<String> = None;
    let mut first = handshake_first;
    loop {
        let Some((prefix, after)) = rest.split_first_chunk::<LENGTH_PREFIX_BYTES>() else {
            return; // clean end (or a partial prefix: truncated)
        };
        let max = if first {
            max.min(MAX_HANDSHAKE_BYTES)
        } else {
            max
        };
        // `decode` (prefix included) must agree with the step-by-step path.
        let whole = protocol::decode(rest, max);
        match protocol::decode_length(*prefix, max) {
            Ok(len) => {
                assert!(len <= max.min(HARD_MAX_FRAME_BYTES));
                let Some(payload) = after.get(..len) else {
                    assert_eq!(whole, Ok(None), "truncated frame is incomplete");
                    return; // stream ended inside a frame
                };
                rest = &after[len..];
                match protocol::decode_frame(payload) {
                    Ok(frame) => {
                        assert_eq!(
                            whole.as_ref().ok().and_then(|w| w.as_ref()),
                            Some(&(frame.clone(), LENGTH_PREFIX_BYTES + len))
                        );
                        if let Body::Handshake(hello) = &frame.body {
                            check_handshake(hello);
                            if first {
                                if negotiate(hello).is_err() || !name_ok(&hello.name) {
                                    return; // refused: the node closes the connection
                                }
                                name = Some(hello.name.clone());
                            }
                        } else if first {
                            return; // HANDSHAKE_REQUIRED, connection closed
                        }
                        let stamp = name.as_deref().unwrap_or_default();
                        stamp_and_reencode(frame, stamp);
                    }
                    Err(err) => {
                        assert_eq!(whole, Err(err.clone()));
                        if let Some(id) = err.message_id() {
                            assert_eq!(Some(id), peek_message_id(payload));
                        }
                        let _ = err.to_string();
                        if first {
                            return; // undecodable handshake: connection closed
                        }
                    }
                }
            }
            Err(CodecError::FrameTooLarge { len, max: m }) if len <= HARD_MAX_FRAME_BYTES => {
                assert!(len > m);
                assert!(matches!(whole, Err(CodecError::FrameTooLarge { .. })));
                let head = len.min(16);
                let Some(id) = after.get(..head) else {
                    return;
                };
                let _ = peek_message_id(id);
                let Some(skipped) = after.get(len..) else {
                    return; // truncated while skipping
                };
                rest = skipped;
                if first {
                    return; // oversized handshake: connection closed
                }
            }
            Err(CodecError::FrameTooLarge { len, .. }) => {
                assert!(len > HARD_MAX_FRAME_BYTES);
                return; // untrustworthy: PROTOCOL_VIOLATION, closed
            }
            Err(other) => panic!("decode_length returned {other:?}"),
        }
        first = false;
    }
}

fuzz_target!(|data: &[u8]| {
    read_stream(data, DEFAULT_MAX_FRAME_BYTES, true);
    read_stream(data, DEFAULT_MAX_FRAME_BYTES, false);
    read_stream(data, 64, false);
});
