//! Arbitrary bytes as the contents of one QUIC stream, read by the node's
//! own frame reader (`protocol::stream::read_frame`, which the node runs on
//! every client stream) and checked the way the node checks a connection's
//! first frame (`protocol::negotiate_version` and `valid_name`, with the
//! default config: 16 KiB handshake cap, 64-byte names). Token and
//! client-certificate authentication are not modelled. Every decoded frame
//! is also stamped with a sender and re-encoded, as the node does when it
//! echoes or fans a message out.
//!
//! The stream is read three times: as a connection's first stream (the
//! first frame must be an acceptable Handshake, refused from its length
//! prefix when oversized, else the node stops reading) and as a later
//! stream, both with the default 1 MiB maximum; and as a later stream with
//! a tiny maximum, so that the "oversized but within the hard limit: skip it
//! and stay in sync" path is reachable with inputs of fuzzer size
//! (libFuzzer's default -max_len is 4096).

#![no_main]

use libfuzzer_sys::fuzz_target;
use quic_fabric::protocol::stream::{Inbound, Oversized, ReadError, read_frame};
use quic_fabric::protocol::{
    self, Body, ClientId, DEFAULT_MAX_FRAME_BYTES, Frame, HARD_MAX_FRAME_BYTES, Handshake,
    MAX_NAME_BYTES, MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, NodeId, Sender,
};

/// Default `max_handshake_bytes`: the node reads the first frame with
/// `max_handshake_bytes.min(max_message_bytes)` as its maximum.
const MAX_HANDSHAKE_BYTES: usize = 16 * 1024;

/// The node's own handshake checks; true when the node would admit it.
fn acceptable(hello: &Handshake) -> bool {
    let version = protocol::negotiate_version(hello);
    if let Ok(version) = version {
        assert!((MIN_PROTOCOL_VERSION..=MAX_PROTOCOL_VERSION).contains(&version));
        assert!((hello.min_version..=hello.max_version).contains(&version));
    }
    let name = protocol::valid_name(&hello.name, MAX_NAME_BYTES);
    if name.is_ok() {
        assert!(!hello.name.is_empty() && hello.name.len() <= MAX_NAME_BYTES);
    }
    version.is_ok() && name.is_ok()
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

/// Reads one stream as the node does. `first`: the connection's first
/// stream, whose first frame must be an acceptable Handshake.
async fn read_stream(mut rest: &[u8], max: usize, mut first: bool) {
    let mut name = String::new();
    loop {
        let (limit, oversized) = if first {
            (max.min(MAX_HANDSHAKE_BYTES), Oversized::Refuse)
        } else {
            (max, Oversized::Skip)
        };
        match read_frame(&mut rest, limit, oversized).await {
            Ok(Inbound::Frame(frame, size)) => {
                assert!(size > protocol::LENGTH_PREFIX_BYTES && size - 4 <= limit);
                let hello = match &frame.body {
                    Body::Handshake(hello) => Some(hello),
                    // The node checks a ResumeHandshake's handshake the same
                    // way (its token is checked by `resume_token`).
                    Body::ResumeHandshake { handshake, .. } => Some(handshake),
                    _ => None,
                };
                if let Some(hello) = hello {
                    if !acceptable(hello) && first {
                        return; // refused: the node closes the connection
                    }
                    if first {
                        name = hello.name.clone();
                    }
                } else if first {
                    return; // HANDSHAKE_REQUIRED: connection closed
                }
                stamp_and_reencode(frame, &name);
            }
            Ok(Inbound::Bad(err, _)) => {
                let _ = err.to_string();
                if first {
                    return; // refused: the node closes the connection
                }
            }
            Ok(Inbound::Finished) => return,
            Err(ReadError::Untrustworthy(len)) => {
                assert!(len > HARD_MAX_FRAME_BYTES);
                return; // PROTOCOL_VIOLATION: connection closed
            }
            Err(ReadError::Truncated | ReadError::Io(_)) => return,
        }
        first = false;
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|runtime| runtime.block_on(async {
        read_stream(data, DEFAULT_MAX_FRAME_BYTES, true).await;
        read_stream(data, DEFAULT_MAX_FRAME_BYTES, false).await;
        read_stream(data, 64, false).await;
    }));
});
