//! Arbitrary bytes as a value read from Redis: what the pub/sub channels
//! carry (`redis_bus::Wire`, which wraps a `BusMessage`), or a presence
//! entry (`ClientInfo`).
//! Redis is trusted, but a corrupted or foreign value must still never
//! panic a node: decoding either fails cleanly or gives a value that
//! re-encodes to exactly the input (the encoding is canonical).

#![no_main]

use libfuzzer_sys::fuzz_target;
use quic_fabric::bus::redis_bus::Wire;
use quic_fabric::protocol::ClientInfo;
use quic_fabric::protocol::codec::{decode_value, encode_value};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode_value::<Wire>(data) {
        let bytes = encode_value(&message).expect("a decoded message re-encodes");
        assert_eq!(bytes, data, "canonical encoding");
    }
    if let Ok(info) = decode_value::<ClientInfo>(data) {
        let bytes = encode_value(&info).expect("a decoded entry re-encodes");
        assert_eq!(bytes, data, "canonical encoding");
    }
});
