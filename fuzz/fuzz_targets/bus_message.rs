//! Arbitrary bytes as a value read from Redis: a cluster message from the
//! pub/sub channels (`BusMessage`) or a presence entry (`ClientInfo`).
//! Redis is trusted, but a corrupted or foreign value must still never
//! panic a node: decoding either fails cleanly or gives a value that
//! re-encodes to exactly the input (the encoding is canonical).

#![no_main]

use libfuzzer_sys::fuzz_target;
use quic_fabric::bus::BusMessage;
use quic_fabric::protocol::ClientInfo;
use quic_fabric::protocol::codec::{decode_value, encode_value};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode_value::<BusMessage>(data) {
        let bytes = encode_value(&message).expect("a decoded message re-encodes");
        assert_eq!(bytes, data, "canonical encoding");
    }
    if let Ok(info) = decode_value::<ClientInfo>(data) {
        let bytes = encode_value(&info).expect("a decoded entry re-encodes");
        assert_eq!(bytes, data, "canonical encoding");
    }
});
