//! Channel names (PROTOCOL.md section 7): `[namespace:]name`, at most
//! [`MAX_CHANNEL_BYTES`] bytes of printable ASCII without spaces or `*`.
//! The namespace is the part before the first `:`; a name without `:` is
//! in the default namespace.

/// Longest channel name, in bytes (namespace and `:` included).
pub const MAX_CHANNEL_BYTES: usize = 255;

/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 64;

/// Why a channel name was refused. The messages name the rule that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Empty, or longer than the maximum.
    #[error("must be 1 to {max} bytes, not {len}")]
    Length {
        /// The name's length in bytes.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// A byte outside printable ASCII (0x21 to 0x7E), or `*` (reserved for
    /// the patterns of the token's `channels` claim).
    #[error(
        "byte {index} is {shown}; channel names are printable ASCII (0x21 to 0x7E) without `*`"
    )]
    Character {
        /// Offset of the byte.
        index: usize,
        /// The byte as shown to people.
        shown: String,
    },
    /// `namespace:` with nothing after it, or `:name` with no namespace.
    #[error("has an empty {0} around its `:`")]
    EmptyPart(&'static str),
    /// A namespace that is not letters, digits, `_`, `-` or `.`, or too long.
    #[error("namespace {0:?} must be 1 to 64 of a-z, A-Z, 0-9, `_`, `-`, `.`")]
    Namespace(String),
}

/// Checks a channel name against the grammar (not against the declared
/// namespaces: that is the node's configuration).
pub fn valid_channel(channel: &str) -> Result<(), ChannelError> {
    let max = MAX_CHANNEL_BYTES;
    if channel.is_empty() || channel.len() > max {
        return Err(ChannelError::Length {
            len: channel.len(),
            max,
        });
    }
    for (index, byte) in channel.bytes().enumerate() {
        if !(0x21..=0x7e).contains(&byte) || byte == b'*' {
            let shown = if byte == b'*' {
                "`*`".to_owned()
            } else if byte == b' ' {
                "a space".to_owned()
            } else {
                format!("0x{byte:02x}")
            };
            return Err(ChannelError::Character { index, shown });
        }
    }
    if let Some((namespace, name)) = channel.split_once(':') {
        if namespace.is_empty() {
            return Err(ChannelError::EmptyPart("namespace"));
        }
        if name.is_empty() {
            return Err(ChannelError::EmptyPart("name"));
        }
        let ok = namespace.len() <= MAX_NAMESPACE_BYTES
            && namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(ChannelError::Namespace(namespace.to_owned()));
        }
    }
    Ok(())
}

/// The namespace of a valid channel name (`""` for the default namespace)
/// and the rest.
pub fn split_channel(channel: &str) -> (&str, &str) {
    channel.split_once(':').unwrap_or(("", channel))
}

/// Whether `channel` matches `pattern`, where `*` in the pattern stands
/// for any run of characters (also none) and everything else for itself.
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    let (p, c) = (pattern.as_bytes(), channel.as_bytes());
    // Classic wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ci) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ci < c.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ci));
            pi += 1;
        } else if pi < p.len() && p[pi] == c[ci] {
            pi += 1;
            ci += 1;
        } else if let Some((sp, sc)) = star {
            pi = sp + 1;
            ci = sc + 1;
            star = Some((sp, sc + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// A place in a channel's history: the history's `epoch` (random; a new
/// one means the earlier history was lost) and the publication's `offset`
/// in it (1, 2, … in publish order). Text form: `EPOCH:OFFSET`, the epoch
/// as 16 lowercase hex digits (a random u64 does not survive JSON numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The history's epoch.
    pub epoch: u64,
    /// The offset within it (0: nothing published yet).
    pub offset: u64,
}

impl Position {
    /// The epoch as 16 lowercase hex digits.
    pub fn epoch_hex(&self) -> String {
        format!("{:016x}", self.epoch)
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}:{}", self.epoch, self.offset)
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, offset) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected EPOCH:OFFSET"))?;
        if epoch.len() != 16 {
            return Err(format!("{epoch:?}: an epoch is 16 hex digits"));
        }
        let epoch = u64::from_str_radix(epoch, 16)
            .map_err(|_| format!("{epoch:?}: an epoch is 16 hex digits"))?;
        let offset = offset
            .parse()
            .map_err(|_| format!("{offset:?}: an offset is a decimal number"))?;
        Ok(Position { epoch, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_back_from_their_text_and_bad_ones_say_why() {
        let position = Position {
            epoch: 0x00ab_cdef_0123_4567,
            offset: 42,
        };
        assert_eq!(position.to_string(), "00abcdef01234567:42");
        assert_eq!("00abcdef01234567:42".parse(), Ok(position));
        let max = Position {
            epoch: u64::MAX,
            offset: u64::MAX,
        };
        assert_eq!(max.to_string().parse(), Ok(max));
        for (text, why) in [
            ("00abcdef01234567", "expected EPOCH:OFFSET"),
            ("abcdef01234567:1", "16 hex digits"),
            ("00abcdef0123456g:1", "16 hex digits"),
            ("00abcdef01234567:-1", "decimal"),
            ("00abcdef01234567:", "decimal"),
        ] {
            let err = text.parse::<Position>().unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn names_of_the_grammar_are_accepted() {
        for name in [
            "lobby",
            "chat:room-1",
            "a",
            "news:sport:football",
            "x.y_z-1:~!@#$%^&()[]{}<>?/|\\=+",
        ] {
            assert_eq!(valid_channel(name), Ok(()), "{name}");
        }
        assert_eq!(valid_channel(&"c".repeat(255)), Ok(()));
    }

    #[test]
    fn bad_names_are_refused_with_the_rule_that_failed() {
        assert_eq!(
            valid_channel(""),
            Err(ChannelError::Length { len: 0, max: 255 })
        );
        assert_eq!(
            valid_channel(&"c".repeat(256)).unwrap_err().to_string(),
            "must be 1 to 255 bytes, not 256"
        );
        assert_eq!(
            valid_channel("a b").unwrap_err().to_string(),
            "byte 1 is a space; channel names are printable ASCII (0x21 to 0x7E) without `*`"
        );
        assert!(matches!(
            valid_channel("é"),
            Err(ChannelError::Character { index: 0, .. })
        ));
        assert!(matches!(
            valid_channel("room*"),
            Err(ChannelError::Character { index: 4, .. })
        ));
        assert!(matches!(
            valid_channel("a\nb"),
            Err(ChannelError::Character { index: 1, .. })
        ));
        assert_eq!(
            valid_channel(":x"),
            Err(ChannelError::EmptyPart("namespace"))
        );
        assert_eq!(valid_channel("ns:"), Err(ChannelError::EmptyPart("name")));
        assert_eq!(
            valid_channel("n/s:x"),
            Err(ChannelError::Namespace("n/s".into()))
        );
        assert!(valid_channel(&format!("{}:x", "n".repeat(65))).is_err());
    }

    #[test]
    fn the_namespace_is_before_the_first_colon() {
        assert_eq!(split_channel("lobby"), ("", "lobby"));
        assert_eq!(split_channel("chat:a:b"), ("chat", "a:b"));
    }

    #[test]
    fn patterns_match_with_star_as_any_run() {
        assert!(pattern_matches("*", "anything:at-all"));
        assert!(pattern_matches("chat:*", "chat:room"));
        assert!(pattern_matches("chat:*", "chat:"));
        assert!(!pattern_matches("chat:*", "chats:room"));
        assert!(pattern_matches("chat:room-*-vip", "chat:room-7-vip"));
        assert!(!pattern_matches("chat:room-*-vip", "chat:room-7-vip2"));
        assert!(pattern_matches("chat:lobby", "chat:lobby"));
        assert!(!pattern_matches("chat:lobby", "chat:lobby2"));
        assert!(pattern_matches("*:*", "a:b"));
        assert!(!pattern_matches("*:*", "ab"));
        assert!(pattern_matches("a**b", "ab"));
    }
}
