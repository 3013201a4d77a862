//! The quic-fabric wire protocol: frame types ([`frame`]), the pure byte codec
//! ([`codec`]) and the numbers both ends must agree on (ALPN, versions, limits,
//! error and close codes). `PROTOCOL.md` is the normative description; the
//! `protocol_examples` test keeps the two in step.

pub mod channel;
pub mod codec;
pub mod frame;
pub mod json;
pub mod stream;

pub use channel::{ChannelError, MAX_CHANNEL_BYTES, Position, split_channel, valid_channel};
pub use codec::{CodecError, decode, decode_frame, decode_length, encode};
pub use frame::*;

/// ALPN identifier negotiated in the TLS handshake. Connections offering
/// anything else are rejected by TLS itself.
pub const ALPN: &[u8] = b"quic-fabric/1";

/// Lowest protocol version this build speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Highest protocol version this build speaks.
pub const MAX_PROTOCOL_VERSION: u16 = 3;

/// The first version with channels, user addressing and presence
/// (frame types 15 to 24).
pub const CHANNELS_VERSION: u16 = 2;

/// The first version with channel positions and recovery, and with
/// idempotent messages (frame types 25 to 31).
pub const RECOVERY_VERSION: u16 = 3;

/// Size of the big-endian length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Absolute ceiling for a frame's payload length, whatever the configuration
/// says. Also the byte limit handed to bincode, so no decode can ever claim
/// more memory than this.
pub const HARD_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Default maximum frame payload length (prefix excluded).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Default for the longest client name accepted in a handshake, in bytes
/// (`max_name_bytes`).
pub const MAX_NAME_BYTES: usize = 64;

/// Longest user id (token subject or certificate name) a node accepts and
/// puts in sender stamps and client lists.
pub const MAX_USER_BYTES: usize = 256;

/// Picks the protocol version for a Handshake offering
/// `min_version..=max_version`: the highest both sides speak. Versions are
/// 1-based, so an offer reaching down to 0 simply has no version 0 in
/// common. The error message names both ranges, or says the offer is an
/// empty range (`min_version > max_version`), which is a client bug rather
/// than a version mismatch.
pub fn negotiate_version(hello: &Handshake) -> Result<u16, String> {
    if hello.min_version > hello.max_version {
        return Err(format!(
            "unsupported protocol version: the offered range {}..={} is empty (min_version > max_version); server speaks {}..={}",
            hello.min_version, hello.max_version, MIN_PROTOCOL_VERSION, MAX_PROTOCOL_VERSION
        ));
    }
    let version = hello.max_version.min(MAX_PROTOCOL_VERSION);
    if version < hello.min_version || version < MIN_PROTOCOL_VERSION {
        return Err(format!(
            "unsupported protocol version: client speaks {}..={}, server speaks {}..={}",
            hello.min_version, hello.max_version, MIN_PROTOCOL_VERSION, MAX_PROTOCOL_VERSION
        ));
    }
    Ok(version)
}

/// Why a name (a Handshake `name`, a token subject, a certificate's user
/// name) was refused. The messages say which rule failed, without naming
/// the field, so each caller puts its own field name in front.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or longer than the maximum (counted in bytes of UTF-8).
    #[error("must be 1 to {max} bytes of UTF-8, not {len}")]
    Length {
        /// The name's length in bytes.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// A Unicode control character (general category Cc).
    #[error("contains U+{:04X}, a control character", u32::from(*.0))]
    Control(char),
    /// U+2028 or U+2029: they break lines wherever the name is shown.
    #[error("contains U+{:04X}, a line or paragraph separator", u32::from(*.0))]
    Separator(char),
    /// A character that shows nothing (zero-width, bidi control, BOM...):
    /// two names that look the same must not differ only by these.
    #[error("contains U+{:04X}, an invisible format character", u32::from(*.0))]
    Invisible(char),
    /// Nothing but whitespace: such a name shows as a blank.
    #[error("is only whitespace")]
    Blank,
}

/// Whether `c` is one of the invisible format characters names may not
/// contain (PROTOCOL.md section 6): soft hyphen, Arabic letter mark,
/// Mongolian vowel separator, zero-width characters and directional marks,
/// bidi embeddings and isolates, invisible operators, BOM, interlinear
/// annotation marks.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

/// Checks a client name (and, with their own maximum, token subjects and
/// certificate user names): 1 to `max_bytes` bytes of UTF-8, no control
/// characters (Cc), no line or paragraph separator, no invisible format
/// character, and not only whitespace. The rule is in PROTOCOL.md section
/// 6; a name that passes shows as something visible on one line.
pub fn valid_name(name: &str, max_bytes: usize) -> Result<(), NameError> {
    if name.is_empty() || name.len() > max_bytes {
        return Err(NameError::Length {
            len: name.len(),
            max: max_bytes,
        });
    }
    for c in name.chars() {
        if c.is_control() {
            return Err(NameError::Control(c));
        }
        if matches!(c, '\u{2028}' | '\u{2029}') {
            return Err(NameError::Separator(c));
        }
        if is_invisible_format(c) {
            return Err(NameError::Invisible(c));
        }
    }
    if name.chars().all(char::is_whitespace) {
        return Err(NameError::Blank);
    }
    Ok(())
}

/// Maps a [`Priority`] to quinn's stream priority: higher is sent first.
pub fn stream_priority(priority: Priority) -> i32 {
    match priority {
        Priority::Low => -1,
        Priority::Normal => 0,
        Priority::High => 1,
    }
}

/// Application error codes carried in QUIC CONNECTION_CLOSE frames.
pub mod close_code {
    /// Normal close: the client said Goodbye or simply left.
    pub const NORMAL: u32 = 0;
    /// The server is shutting down (a Goodbye frame was sent first).
    pub const SHUTDOWN: u32 = 1;
    /// The peer broke the protocol in a way that leaves the connection untrustworthy.
    pub const PROTOCOL_VIOLATION: u32 = 2;
    /// No protocol version in common.
    pub const UNSUPPORTED_VERSION: u32 = 3;
    /// The node already has `max_clients` clients.
    pub const SERVER_FULL: u32 = 4;
    /// The client did not read its messages fast enough; its outbound queue filled up.
    pub const SLOW_CONSUMER: u32 = 5;
    /// The client did not complete the handshake in time.
    pub const HANDSHAKE_TIMEOUT: u32 = 6;
    /// Authentication failed: missing or invalid token or client certificate.
    pub const AUTH_FAILED: u32 = 7;
    /// The handshake was invalid (for example a name that is too long).
    pub const BAD_HANDSHAKE: u32 = 8;
    /// An internal server error ended the connection.
    pub const INTERNAL: u32 = 9;
    /// The client kept sending over its rate limit (`rate_limit_strikes`).
    pub const RATE_LIMITED: u32 = 10;
    /// The client's token expired while it was connected.
    pub const TOKEN_EXPIRED: u32 = 11;
    /// An operator disconnected the client (admin API); a Goodbye with the
    /// reason and `reconnect: false` was sent first.
    pub const KICKED: u32 = 12;
    /// The connection's session was resumed by another connection (one
    /// that presented its resume token); this one is closed without ending
    /// the session.
    pub const SESSION_MOVED: u32 = 13;
}

/// Application error codes carried in [`Body::Error`] frames.
pub mod error_code {
    use super::ErrorCode;

    /// The frame payload could not be decoded.
    pub const MALFORMED_FRAME: ErrorCode = ErrorCode(1);
    /// The frame is longer than the negotiated maximum; it was discarded.
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(2);
    /// The frame type is not known to this server.
    pub const UNKNOWN_FRAME_TYPE: ErrorCode = ErrorCode(3);
    /// No protocol version in common; the connection closes.
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(4);
    /// A frame other than Handshake arrived before the handshake completed.
    pub const HANDSHAKE_REQUIRED: ErrorCode = ErrorCode(5);
    /// A second Handshake on an established connection; it was ignored.
    pub const ALREADY_HANDSHAKEN: ErrorCode = ErrorCode(6);
    /// The target of a Direct message is not connected anywhere.
    pub const UNKNOWN_CLIENT: ErrorCode = ErrorCode(7);
    /// The node already has `max_clients` clients; the connection closes.
    pub const SERVER_FULL: ErrorCode = ErrorCode(8);
    /// A field is invalid (for example a name that is too long or empty).
    pub const INVALID_FIELD: ErrorCode = ErrorCode(9);
    /// The frame type is only sent by servers.
    pub const UNEXPECTED_FRAME: ErrorCode = ErrorCode(10);
    /// The message must cross the cluster but the cluster bus is unavailable.
    pub const CLUSTER_UNAVAILABLE: ErrorCode = ErrorCode(11);
    /// The client exceeded its message rate; the frame was dropped. The
    /// Error carries `retry_after_ms`.
    pub const RATE_LIMITED: ErrorCode = ErrorCode(12);
    /// The Handshake's token (or client certificate) was missing or
    /// invalid; the connection closes with `close_code::AUTH_FAILED`.
    pub const AUTH_FAILED: ErrorCode = ErrorCode(13);
    /// The server hit an internal error while handling the frame.
    pub const INTERNAL: ErrorCode = ErrorCode(14);
    /// The recipient's outbound queue is full; it is being disconnected.
    pub const RECIPIENT_SLOW: ErrorCode = ErrorCode(15);
    /// The node's memory budget for queued messages is exhausted; the
    /// message was not (fully) delivered. Retry later.
    pub const SERVER_BUSY: ErrorCode = ErrorCode(16);
    /// The client may not do this on this channel (subscribe, publish,
    /// ask for presence), by its namespace's rules and the client's token.
    pub const NOT_ALLOWED: ErrorCode = ErrorCode(17);
    /// The client already has `max_subscriptions` subscriptions.
    pub const TOO_MANY_SUBSCRIPTIONS: ErrorCode = ErrorCode(18);
    /// The channel's namespace is not declared on this node.
    pub const UNKNOWN_NAMESPACE: ErrorCode = ErrorCode(19);
    /// The target user of a UserDirect has no connection anywhere.
    pub const UNKNOWN_USER: ErrorCode = ErrorCode(20);
    /// An Idempotent frame whose key was used before, by a message that
    /// did not end in Ack (the message names the first outcome) or whose
    /// outcome is not known yet; it was not handled again.
    pub const DUPLICATE: ErrorCode = ErrorCode(21);
    /// A Direct to a client whose session waits for a resume, whose inbox
    /// is full (`session_inbox_len` messages or `session_inbox_bytes`); it
    /// was not stored. Retry later.
    pub const INBOX_FULL: ErrorCode = ErrorCode(22);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(min_version: u16, max_version: u16) -> Handshake {
        Handshake {
            min_version,
            max_version,
            name: "n".into(),
            token: None,
        }
    }

    #[test]
    fn versions_are_one_based_and_the_highest_common_one_is_chosen() {
        assert_eq!(negotiate_version(&offer(1, 1)), Ok(1));
        assert_eq!(negotiate_version(&offer(1, 2)), Ok(2));
        assert_eq!(negotiate_version(&offer(2, 2)), Ok(2));
        assert_eq!(negotiate_version(&offer(1, 3)), Ok(3));
        assert_eq!(negotiate_version(&offer(1, 7)), Ok(3));
        // An offer reaching down to 0 still has 1 in common.
        assert_eq!(negotiate_version(&offer(0, 1)), Ok(1));
        assert_eq!(negotiate_version(&offer(0, u16::MAX)), Ok(3));
        for (min, max) in [(0, 0), (4, 5)] {
            let err = negotiate_version(&offer(min, max)).unwrap_err();
            assert!(err.contains(&format!("{min}..={max}")), "{err}");
            assert!(err.contains("1..=3"), "{err}");
            assert!(!err.contains("empty"), "{err}");
        }
    }

    #[test]
    fn an_empty_offered_range_is_refused_as_empty() {
        for (min, max) in [(2, 1), (1, 0), (u16::MAX, 1)] {
            let err = negotiate_version(&offer(min, max)).unwrap_err();
            assert!(err.contains(&format!("{min}..={max} is empty")), "{err}");
        }
    }

    #[test]
    fn names_of_visible_characters_on_one_line_are_accepted() {
        for name in [
            "al",
            "Zoë",
            "名前",
            "a b",
            " padded ",
            "emoji 🦀",
            "x".repeat(64).as_str(),
            "é".repeat(32).as_str(),
        ] {
            assert_eq!(valid_name(name, MAX_NAME_BYTES), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn name_length_is_counted_in_bytes() {
        assert_eq!(
            valid_name("", 64),
            Err(NameError::Length { len: 0, max: 64 })
        );
        assert_eq!(
            valid_name(&"é".repeat(5), 8),
            Err(NameError::Length { len: 10, max: 8 })
        );
        assert_eq!(
            valid_name("ninechars", 8).unwrap_err().to_string(),
            "must be 1 to 8 bytes of UTF-8, not 9"
        );
    }

    #[test]
    fn control_characters_are_refused() {
        for c in [
            '\0', '\t', '\n', '\r', '\u{1F}', '\u{7F}', '\u{80}', '\u{85}', '\u{9F}',
        ] {
            let name = format!("a{c}b");
            assert_eq!(
                valid_name(&name, 64),
                Err(NameError::Control(c)),
                "{name:?}"
            );
        }
        assert_eq!(
            valid_name("a\tb", 64).unwrap_err().to_string(),
            "contains U+0009, a control character"
        );
        // The first character past the Cc range is an ordinary one.
        assert_eq!(valid_name("a\u{A1}b", 64), Ok(()));
    }

    #[test]
    fn line_and_paragraph_separators_are_refused() {
        for c in ['\u{2028}', '\u{2029}'] {
            assert_eq!(
                valid_name(&format!("a{c}b"), 64),
                Err(NameError::Separator(c))
            );
        }
        assert_eq!(
            valid_name("a\u{2028}", 64).unwrap_err().to_string(),
            "contains U+2028, a line or paragraph separator"
        );
    }

    #[test]
    fn invisible_format_characters_are_refused() {
        let invisible = [
            '\u{00AD}', '\u{061C}', '\u{180E}', '\u{200B}', '\u{200C}', '\u{200D}', '\u{200E}',
            '\u{200F}', '\u{202A}', '\u{202E}', '\u{2060}', '\u{2064}', '\u{2066}', '\u{2069}',
            '\u{206F}', '\u{FEFF}', '\u{FFF9}', '\u{FFFB}',
        ];
        for c in invisible {
            assert_eq!(
                valid_name(&format!("a{c}b"), 64),
                Err(NameError::Invisible(c)),
                "U+{:04X}",
                u32::from(c)
            );
        }
        assert_eq!(
            valid_name("al\u{200B}", 64).unwrap_err().to_string(),
            "contains U+200B, an invisible format character"
        );
        // Neighbours of the ranges are visible characters (or spaces).
        for c in ['\u{00AC}', '\u{2010}', '\u{2065}', '\u{FFFC}', '\u{2029}'] {
            assert_ne!(
                valid_name(&format!("a{c}b"), 64).err(),
                Some(NameError::Invisible(c)),
                "U+{:04X}",
                u32::from(c)
            );
        }
    }

    #[test]
    fn whitespace_only_names_are_refused_but_inner_spaces_are_fine() {
        for name in [" ", "   ", "\u{A0}", "\u{3000}", "\u{2003} \u{2003}"] {
            assert_eq!(valid_name(name, 64), Err(NameError::Blank), "{name:?}");
        }
        assert_eq!(
            valid_name(" ", 64).unwrap_err().to_string(),
            "is only whitespace"
        );
        assert_eq!(valid_name(" a ", 64), Ok(()));
    }
}
