//! Resume tokens: what a client presents to get its session back after a
//! reconnect (PROTOCOL.md section 11.6, SECURITY.md "Resume tokens").
//!
//! A token is `fs1.` ‖ base64url(claims) ‖ `.` ‖ base64url(HMAC-SHA256).
//! The claims name the session (its client id), its user, the session's
//! generation and when the token expires. The MAC key is derived with
//! HKDF-SHA256 from the cluster's session secret and its Redis prefix, so a
//! token of another cluster (another secret or prefix) fails the MAC. A
//! token only proves what it was issued for; whether the session can still
//! be resumed (it exists, the generation is current, the user matches) is
//! decided by the cluster bus, atomically.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

use crate::protocol::ClientId;

/// The token format's prefix (version 1).
const PREFIX: &str = "fs1.";

/// Longest token accepted; anything longer is refused before decoding.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// Shortest session secret accepted.
pub const MIN_SECRET_BYTES: usize = 32;

/// HKDF salt: names what the key is for.
const SALT: &[u8] = b"quic-fabric session v1";

/// Bytes of the claims before the user: client id, generation, expiry, and
/// whether a user follows.
const FIXED_CLAIMS: usize = 16 + 8 + 8 + 1;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The session (its client id).
    pub client: ClientId,
    /// The user the session was opened by (None: anonymous).
    pub user: Option<String>,
    /// The session's generation when the token was issued: a resume
    /// succeeds only while it is still current, so a token works once.
    pub generation: u64,
    /// When the token stops being accepted (Unix milliseconds).
    pub expires_ms: u64,
}

impl Claims {
    fn encode(&self) -> Vec<u8> {
        let user = self.user.as_deref().unwrap_or_default().as_bytes();
        let mut out = Vec::with_capacity(FIXED_CLAIMS + user.len());
        out.extend_from_slice(self.client.0.as_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.push(u8::from(self.user.is_some()));
        out.extend_from_slice(user);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Claims> {
        if bytes.len() < FIXED_CLAIMS {
            return None;
        }
        let (fixed, user) = bytes.split_at(FIXED_CLAIMS);
        let client = ClientId(uuid::Uuid::from_slice(&fixed[..16]).ok()?);
        let generation = u64::from_le_bytes(fixed[16..24].try_into().ok()?);
        let expires_ms = u64::from_le_bytes(fixed[24..32].try_into().ok()?);
        let user = match fixed[32] {
            0 if user.is_empty() => None,
            1 => Some(String::from_utf8(user.to_vec()).ok()?),
            _ => return None,
        };
        Some(Claims {
            client,
            user,
            generation,
            expires_ms,
        })
    }
}

/// Why a token was not accepted. Never shown with the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of this format, or damaged, or not signed by this
    /// cluster (another secret or Redis prefix).
    #[error("invalid resume token")]
    Invalid,
    /// Signed by this cluster, but past its expiry.
    #[error("resume token expired")]
    Expired,
}

/// The keys tokens are signed and checked with.
pub struct TokenKeys {
    /// Signs new tokens; checks first.
    current: hmac::Key,
    /// Also accepted when checking (a rotated-out secret).
    old: Option<hmac::Key>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys").finish_non_exhaustive()
    }
}

/// The MAC key for `secret` in the cluster whose Redis prefix is `scope`:
/// HKDF-SHA256 (RFC 5869) with salt [`SALT`] and info `scope`, one 32-byte
/// block, written out with HMAC (Extract, then the first Expand block).
fn derive(secret: &[u8], scope: &str) -> hmac::Key {
    let prk = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, SALT), secret);
    let mut info = scope.as_bytes().to_vec();
    info.push(1);
    let okm = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, prk.as_ref()), &info);
    hmac::Key::new(hmac::HMAC_SHA256, okm.as_ref())
}

impl TokenKeys {
    /// Keys from the cluster's secret (and a previous one still accepted),
    /// for the cluster named by `scope` (its Redis key prefix).
    pub fn new(secret: &[u8], old: Option<&[u8]>, scope: &str) -> TokenKeys {
        TokenKeys {
            current: derive(secret, scope),
            old: old.map(|old| derive(old, scope)),
        }
    }

    /// A token for `claims`.
    pub fn issue(&self, claims: &Claims) -> String {
        let body = claims.encode();
        let tag = hmac::sign(&self.current, &body);
        format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// The claims of `token` if this cluster signed it and it has not
    /// expired at `now_ms`. Checks the MAC (in constant time) before
    /// looking at anything it protects.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid);
        }
        let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Invalid)?;
        let (body, tag) = rest.split_once('.').ok_or(TokenError::Invalid)?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Invalid)?;
        let signed = hmac::verify(&self.current, &body, &tag).is_ok()
            || self
                .old
                .as_ref()
                .is_some_and(|old| hmac::verify(old, &body, &tag).is_ok());
        if !signed {
            return Err(TokenError::Invalid);
        }
        let claims = Claims::decode(&body).ok_or(TokenError::Invalid)?;
        if claims.expires_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(user: Option<&str>) -> Claims {
        Claims {
            client: ClientId::new_random(),
            user: user.map(str::to_owned),
            generation: 7,
            expires_ms: 2_000,
        }
    }

    fn keys() -> TokenKeys {
        TokenKeys::new(&[7u8; 32], None, "fabric")
    }

    #[test]
    fn a_token_reads_back_as_issued_until_it_expires() {
        for user in [None, Some(""), Some("alice"), Some("zoë")] {
            let claims = claims(user);
            let token = keys().issue(&claims);
            assert!(token.starts_with("fs1.") && token.len() < 200, "{token}");
            assert_eq!(keys().verify(&token, 1_999), Ok(claims.clone()));
            assert_eq!(keys().verify(&token, 2_000), Err(TokenError::Expired));
        }
    }

    #[test]
    fn forged_damaged_and_foreign_tokens_are_invalid() {
        let token = keys().issue(&claims(Some("alice")));
        let invalid = |t: &str| assert_eq!(keys().verify(t, 0), Err(TokenError::Invalid), "{t}");
        // Another secret, another cluster prefix.
        invalid(&TokenKeys::new(&[8u8; 32], None, "fabric").issue(&claims(None)));
        invalid(&TokenKeys::new(&[7u8; 32], None, "other").issue(&claims(None)));
        // Truncated anywhere, a flipped character anywhere.
        for cut in 0..token.len() {
            invalid(&token[..cut]);
        }
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            if let Ok(t) = String::from_utf8(bytes) {
                invalid(&t);
            }
        }
        // Claims swapped for someone else's with the original MAC.
        let (_, tag) = token.rsplit_once('.').unwrap();
        let other = keys().issue(&claims(Some("mallory")));
        let (body, _) = other.rsplit_once('.').unwrap();
        invalid(&format!("{body}.{tag}"));
        // Garbage, oversize, wrong prefix, extra parts.
        invalid("");
        invalid("fs1.");
        invalid("fs1..");
        invalid("fs1.!!!.???");
        invalid(&format!("fs1.{}", "A".repeat(64 * 1024)));
        invalid(&token.replacen("fs1.", "fs2.", 1));
        invalid(&format!("{token}.x"));
        // Trailing claims bytes signed correctly still do not decode.
        let mut body = claims(None).encode();
        body.push(0);
        let tag = hmac::sign(&derive(&[7u8; 32], "fabric"), &body);
        invalid(&format!(
            "fs1.{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ));
    }

    #[test]
    fn the_key_is_hkdf_sha256_of_the_secret() {
        // ring's own HKDF gives the same key.
        struct Len;
        impl ring::hkdf::KeyType for Len {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, SALT).extract(&[5u8; 40]);
        let mut okm = [0u8; 32];
        prk.expand(&[b"fabric"], Len)
            .unwrap()
            .fill(&mut okm)
            .unwrap();
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &okm), b"m");
        assert!(hmac::verify(&derive(&[5u8; 40], "fabric"), b"m", tag.as_ref()).is_ok());
    }

    #[test]
    fn a_rotated_out_secret_is_still_accepted_but_not_used() {
        let old = TokenKeys::new(&[1u8; 32], None, "fabric");
        let rotated = TokenKeys::new(&[2u8; 32], Some(&[1u8; 32]), "fabric");
        let claims = claims(None);
        assert_eq!(rotated.verify(&old.issue(&claims), 0), Ok(claims.clone()));
        assert_eq!(
            old.verify(&rotated.issue(&claims), 0),
            Err(TokenError::Invalid)
        );
    }
}
