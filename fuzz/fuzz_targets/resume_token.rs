//! Arbitrary bytes as a resume token (PROTOCOL.md 11.8), presented to a
//! node's token check.
//!
//! Properties checked:
//! * `TokenKeys::verify` never panics, whatever it is given;
//! * nothing but a token this cluster issued is accepted: a fuzzed input
//!   verifies only if it is byte for byte a token the keys issue for the
//!   claims it decodes to (so flipping, truncating or splicing a real
//!   token never yields a session).

#![no_main]

use libfuzzer_sys::fuzz_target;
use quic_fabric::session::TokenKeys;

fuzz_target!(|data: &[u8]| {
    let keys = TokenKeys::new(&[7u8; 32], Some(&[8u8; 32]), "fabric");
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(claims) = keys.verify(text, 0) {
        let current = keys.issue(&claims);
        let old = TokenKeys::new(&[8u8; 32], None, "fabric").issue(&claims);
        assert!(text == current || text == old, "accepted a token not issued: {text}");
    }
});
