//! Arbitrary bytes as one frame payload (the bytes after the length prefix).
//!
//! Properties checked:
//! * `decode_frame` and `peek_message_id` never panic;
//! * any id reported by a decode error is the id in the first 16 bytes;
//! * whatever decodes re-encodes to exactly the input bytes (the encoding is
//!   canonical) and decodes again to an equal frame, with and without the
//!   length prefix.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quic_fabric::protocol::{
    self, CodecError, HARD_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES, codec::peek_message_id,
};

fuzz_target!(|data: &[u8]| {
    let peeked = peek_message_id(data);
    assert_eq!(peeked.is_some(), data.len() >= 16);

    match protocol::decode_frame(data) {
        Ok(frame) => {
            assert_eq!(peeked, Some(frame.id), "the id is the first 16 bytes");
            let bytes = protocol::encode(&frame).expect("a decoded frame re-encodes");
            assert_eq!(
                &bytes[..LENGTH_PREFIX_BYTES],
                &(data.len() as u32).to_be_bytes(),
                "length prefix is the payload length"
            );
            assert_eq!(
                &bytes[LENGTH_PREFIX_BYTES..],
                data,
                "re-encoding gives back the accepted bytes"
            );
            let again = protocol::decode_frame(&bytes[LENGTH_PREFIX_BYTES..])
                .expect("a re-encoded frame decodes");
            assert_eq!(again, frame);
            let (framed, used) = protocol::decode(&bytes, HARD_MAX_FRAME_BYTES)
                .expect("a re-encoded frame decodes with its prefix")
                .expect("the whole frame is there");
            assert_eq!(used, bytes.len());
            assert_eq!(framed, frame);
        }
        Err(err) => {
            match &err {
                CodecError::UnknownFrameType { id, .. } => {
                    assert!(id.is_some(), "unknown type implies a readable header");
                }
                CodecError::Malformed { .. } => {}
                other => panic!("decode_frame returned an unexpected error kind: {other:?}"),
            }
            if let Some(id) = err.message_id() {
                assert_eq!(Some(id), peeked, "error id is the first 16 bytes");
            }
            let _ = err.to_string();
        }
    }
});
