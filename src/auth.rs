//! Client authentication: JWT bearer tokens carried in the Handshake
//! (HS256 with a shared secret; RS256, ES256 or EdDSA with a public key
//! file or a JWKS file), verified with `jsonwebtoken`. The token's subject
//! becomes the client's user id. Mutual TLS is configured in `tls`; its
//! certificate name is used as the user id when no JWT is configured.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;

pub use crate::config::MIN_SECRET_BYTES;

/// Longest token accepted in a Handshake.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

pub use crate::protocol::MAX_USER_BYTES;

/// Why the authenticator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key is unusable.
    #[error("{0}")]
    Key(String),
}

/// Why a client was not authenticated. The message goes to the client, so
/// it names the failed check but never echoes key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The node requires a token and the Handshake carried none.
    #[error("this node requires a token in the handshake")]
    Missing,
    /// The token is longer than [`MAX_TOKEN_BYTES`].
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    /// The token was rejected.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token is fine but names no usable user: its subject breaks the
    /// name rule of [`crate::protocol::valid_name`] (with at most
    /// [`MAX_USER_BYTES`] bytes).
    #[error("token subject {0}")]
    BadSubject(crate::protocol::NameError),
}

/// The registered claims of a token, as [`mint_hs256`] and the tests mint
/// them. The node reads tokens more leniently than this struct (see
/// [`Authenticator::verify`]): `aud` may also be an array of strings and
/// `exp` / `nbf` may be fractional; unknown claims are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Channel patterns (`*` = any run of characters) the user may
    /// subscribe and publish to in namespaces whose rule is `granted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
}

/// Most patterns a token's `channels` claim may hold.
pub const MAX_CHANNEL_GRANTS: usize = 256;

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (token subject).
    pub user: String,
    /// When the token expires (Unix seconds).
    pub expires_at: u64,
    /// The token's `channels` claim: patterns of the channels granted.
    pub channels: Vec<String>,
}

#[derive(Debug)]
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
}

/// Verifies Handshake tokens.
#[derive(Debug)]
pub struct Authenticator {
    keys: Vec<Key>,
    validation: Validation,
}

impl Authenticator {
    /// The authenticator `config` asks for, or `None` when JWT auth is off.
    pub fn from_config(config: &NodeConfig) -> Result<Option<Self>, AuthSetupError> {
        let keys = if let Some(secret) = &config.auth_jwt_secret {
            if secret.len() < MIN_SECRET_BYTES {
                return Err(AuthSetupError::Key(format!(
                    "the JWT secret must be at least {MIN_SECRET_BYTES} bytes"
                )));
            }
            vec![Key {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()).map_err(key_error)?,
                algorithms: vec![Algorithm::HS256],
            }]
        } else if let Some(path) = &config.auth_jwt_public_key {
            vec![public_key_from_pem(&read(path)?, path)?]
        } else if let Some(path) = &config.auth_jwks {
            jwks(&read(path)?, path)?
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.auth_leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if !config.auth_audience.is_empty() {
            validation.set_audience(&config.auth_audience);
            validation.required_spec_claims.insert("aud".into());
        } else {
            validation.validate_aud = false;
        }
        if !config.auth_issuer.is_empty() {
            validation.set_issuer(&config.auth_issuer);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Some(Authenticator { keys, validation }))
    }

    /// Checks a Handshake's token.
    pub fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .or_else(|| self.only_key())
                .ok_or_else(|| AuthError::Invalid(format!("unknown key id {kid:?}")))?,
            None => self.only_key().ok_or_else(|| {
                AuthError::Invalid(
                    "the token names no key id (kid) and the key set has several keys".into(),
                )
            })?,
        };
        let mut validation = self.validation.clone();
        validation.algorithms = key.algorithms.clone();
        // Decoded as a plain JSON object, not as [`Claims`]: jsonwebtoken
        // deserializes the claims before it validates them, so a typed
        // struct would turn a missing `exp` into "not a well-formed JWT"
        // and refuse an `aud` array, which RFC 7519 allows. The validation
        // checks presence and types (exp, sub, nbf, aud, iss) and names
        // what failed.
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(invalid)?;
        let user = data
            .claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| AuthError::Invalid("missing claim sub".into()))?
            .to_owned();
        let expires_at = data
            .claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or_else(|| AuthError::Invalid("missing claim exp".into()))?;
        crate::protocol::valid_name(&user, MAX_USER_BYTES).map_err(AuthError::BadSubject)?;
        let channels = channel_grants(data.claims.get("channels"))?;
        Ok(Identity {
            user,
            expires_at,
            channels,
        })
    }

    fn only_key(&self) -> Option<&Key> {
        match self.keys.as_slice() {
            [only] => Some(only),
            _ => None,
        }
    }
}

/// A NumericDate (RFC 7519: seconds, possibly fractional) as whole
/// seconds, rounded the way jsonwebtoken's own `exp` check rounds it.
/// Reads the `channels` claim: absent, or an array of at most
/// [`MAX_CHANNEL_GRANTS`] strings of at most 255 bytes each.
fn channel_grants(claim: Option<&serde_json::Value>) -> Result<Vec<String>, AuthError> {
    let Some(claim) = claim else {
        return Ok(Vec::new());
    };
    let bad = |why: String| AuthError::Invalid(format!("claim channels {why}"));
    let list = claim
        .as_array()
        .ok_or_else(|| bad("must be an array of strings".into()))?;
    if list.len() > MAX_CHANNEL_GRANTS {
        return Err(bad(format!(
            "has {} patterns; at most {MAX_CHANNEL_GRANTS} are accepted",
            list.len()
        )));
    }
    list.iter()
        .map(|value| match value.as_str() {
            Some(p) if !p.is_empty() && p.len() <= crate::protocol::MAX_CHANNEL_BYTES => {
                Ok(p.to_owned())
            }
            Some(p) => Err(bad(format!(
                "has a pattern of {} bytes (1 to 255 expected)",
                p.len()
            ))),
            None => Err(bad("must be an array of strings".into())),
        })
        .collect()
}

fn numeric_date(value: &serde_json::Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    })
}

fn invalid(err: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    let reason = match err.kind() {
        ErrorKind::ExpiredSignature => "expired".to_owned(),
        ErrorKind::ImmatureSignature => "not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidSignature => "bad signature".to_owned(),
        ErrorKind::InvalidAudience => "wrong audience".to_owned(),
        ErrorKind::InvalidIssuer => "wrong issuer".to_owned(),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed for this key".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        ErrorKind::InvalidClaimFormat(claim) => format!("malformed claim {claim}"),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) => {
            "not a well-formed JWT".to_owned()
        }
        _ => "rejected".to_owned(),
    };
    AuthError::Invalid(reason)
}

fn key_error(err: jsonwebtoken::errors::Error) -> AuthSetupError {
    AuthSetupError::Key(format!("unusable JWT key: {err}"))
}

fn read(path: &Path) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|source| AuthSetupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// An RSA, EC (P-256) or Ed25519 public key in PEM; the algorithm follows
/// from the key type.
fn public_key_from_pem(pem: &[u8], path: &Path) -> Result<Key, AuthSetupError> {
    type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
    let candidates: [(Parse, Algorithm); 3] = [
        (DecodingKey::from_rsa_pem, Algorithm::RS256),
        (DecodingKey::from_ec_pem, Algorithm::ES256),
        (DecodingKey::from_ed_pem, Algorithm::EdDSA),
    ];
    candidates
        .iter()
        .find_map(|(parse, alg)| {
            parse(pem).ok().map(|key| Key {
                kid: None,
                key,
                algorithms: vec![*alg],
            })
        })
        .ok_or_else(|| {
            AuthSetupError::Key(format!(
                "{}: not an RSA, EC or Ed25519 public key in PEM",
                path.display()
            ))
        })
}

fn jwks(json: &[u8], path: &Path) -> Result<Vec<Key>, AuthSetupError> {
    let set: JwkSet = serde_json::from_slice(json)
        .map_err(|e| AuthSetupError::Key(format!("{}: not a JWKS: {e}", path.display())))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let key = DecodingKey::from_jwk(jwk).map_err(key_error)?;
        let algorithms = match jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse().ok())
        {
            Some(alg) => vec![alg],
            None => match key.family() {
                jsonwebtoken::AlgorithmFamily::Rsa => vec![Algorithm::RS256],
                jsonwebtoken::AlgorithmFamily::Ec => vec![Algorithm::ES256],
                jsonwebtoken::AlgorithmFamily::Ed => vec![Algorithm::EdDSA],
                jsonwebtoken::AlgorithmFamily::Hmac => {
                    return Err(AuthSetupError::Key(format!(
                        "{}: symmetric keys do not belong in a JWKS file; use --auth-jwt-secret",
                        path.display()
                    )));
                }
            },
        };
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            key,
            algorithms,
        });
    }
    if keys.is_empty() {
        return Err(AuthSetupError::Key(format!(
            "{}: the key set is empty",
            path.display()
        )));
    }
    Ok(keys)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token for local testing (`fabric token`).
pub fn mint_hs256(
    secret: &str,
    sub: &str,
    ttl: Duration,
    audience: Option<&str>,
    issuer: Option<&str>,
    channels: &[String],
) -> Result<String, AuthSetupError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(AuthSetupError::Key(format!(
            "the JWT secret must be at least {MIN_SECRET_BYTES} bytes"
        )));
    }
    let now = unix_now();
    let claims = Claims {
        sub: sub.to_owned(),
        exp: now + ttl.as_secs(),
        nbf: None,
        iat: Some(now),
        aud: audience.map(str::to_owned),
        iss: issuer.map(str::to_owned),
        channels: channels.to_vec(),
    };
    let key = EncodingKey::from_secret(secret.as_bytes()).map_err(key_error)?;
    mint(&Header::new(Algorithm::HS256), &claims, &key)
}

/// Signs `claims` with `key` (tests and tools).
pub fn mint(header: &Header, claims: &Claims, key: &EncodingKey) -> Result<String, AuthSetupError> {
    jsonwebtoken::encode(header, claims, key).map_err(key_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-unit";

    fn authenticator(audience: &[&str]) -> Authenticator {
        let config = NodeConfig {
            auth_jwt_secret: Some(SECRET.into()),
            auth_audience: audience.iter().map(|a| (*a).to_owned()).collect(),
            ..NodeConfig::default()
        };
        Authenticator::from_config(&config).unwrap().unwrap()
    }

    /// Signs any JSON claims with the test secret (HS256).
    fn token(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn later() -> u64 {
        unix_now() + 600
    }

    #[test]
    fn a_token_without_exp_is_missing_claim_exp() {
        let err = authenticator(&[])
            .verify(Some(&token(json!({ "sub": "alice" }))))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("missing claim exp".into()));
    }

    #[test]
    fn a_token_without_sub_is_missing_claim_sub() {
        let err = authenticator(&[])
            .verify(Some(&token(json!({ "exp": later() }))))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("missing claim sub".into()));
    }

    #[test]
    fn claims_of_the_wrong_type_are_named() {
        let auth = authenticator(&[]);
        // jsonwebtoken counts a required claim that is not a number as absent.
        let err = auth
            .verify(Some(&token(json!({ "sub": "alice", "exp": "soon" }))))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("missing claim exp".into()));
        let err = auth
            .verify(Some(&token(
                json!({ "sub": "alice", "exp": later(), "nbf": "now" }),
            )))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("malformed claim nbf".into()));
    }

    #[test]
    fn a_fractional_exp_is_a_numeric_date() {
        // RFC 7519 NumericDate may have a fraction.
        let exp = later();
        let ok = authenticator(&[])
            .verify(Some(&token(
                json!({ "sub": "alice", "exp": exp as f64 + 0.25 }),
            )))
            .unwrap();
        assert_eq!(ok.expires_at, exp);
    }

    #[test]
    fn the_channels_claim_is_a_bounded_list_of_patterns() {
        let auth = authenticator(&[]);
        let exp = later();
        let ok = auth
            .verify(Some(&token(
                json!({ "sub": "a", "exp": exp, "channels": ["chat:*", "news"] }),
            )))
            .unwrap();
        assert_eq!(ok.channels, vec!["chat:*".to_owned(), "news".to_owned()]);
        for (bad, why) in [
            (json!("chat:*"), "must be an array of strings"),
            (json!([1]), "must be an array of strings"),
            (json!([""]), "1 to 255 expected"),
            (json!(vec!["x"; 257]), "at most 256"),
        ] {
            let err = auth
                .verify(Some(&token(
                    json!({ "sub": "a", "exp": exp, "channels": bad }),
                )))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn an_audience_array_is_accepted_when_one_entry_matches() {
        let auth = authenticator(&["fabric"]);
        let exp = later();
        let ok = auth
            .verify(Some(&token(
                json!({ "sub": "alice", "exp": exp, "aud": ["other", "fabric"] }),
            )))
            .unwrap();
        assert_eq!(
            ok,
            Identity {
                user: "alice".into(),
                expires_at: exp,
                channels: Vec::new(),
            }
        );
        // A single string still works, and an array without a match is refused.
        auth.verify(Some(&token(
            json!({ "sub": "alice", "exp": exp, "aud": "fabric" }),
        )))
        .unwrap();
        let err = auth
            .verify(Some(&token(
                json!({ "sub": "alice", "exp": exp, "aud": ["other", "elsewhere"] }),
            )))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("wrong audience".into()));
        // Without a configured audience any `aud` is accepted.
        authenticator(&[])
            .verify(Some(&token(
                json!({ "sub": "alice", "exp": exp, "aud": ["x", "y"] }),
            )))
            .unwrap();
    }

    #[test]
    fn the_hs256_secret_is_the_utf8_bytes_of_the_setting() {
        // Not base64-decoded: a secret that happens to be valid base64 is
        // still used as its text.
        let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";
        let config = NodeConfig {
            auth_jwt_secret: Some(secret.into()),
            ..NodeConfig::default()
        };
        let auth = Authenticator::from_config(&config).unwrap().unwrap();
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        let claims = json!({ "sub": "alice", "exp": later() });
        let good = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        auth.verify(Some(&good)).unwrap();
        let decoded = EncodingKey::from_base64_secret(secret).unwrap();
        let other =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &decoded).unwrap();
        assert_eq!(
            auth.verify(Some(&other)),
            Err(AuthError::Invalid("bad signature".into()))
        );
    }

    #[test]
    fn subjects_follow_the_name_rule() {
        let auth = authenticator(&[]);
        for (sub, why) in [
            ("", "must be 1 to 256 bytes of UTF-8, not 0"),
            ("a\tb", "contains U+0009, a control character"),
            (
                "al\u{200B}",
                "contains U+200B, an invisible format character",
            ),
            (
                "a\u{2029}",
                "contains U+2029, a line or paragraph separator",
            ),
            ("  ", "is only whitespace"),
        ] {
            let err = auth
                .verify(Some(&token(json!({ "sub": sub, "exp": later() }))))
                .unwrap_err();
            assert_eq!(err.to_string(), format!("token subject {why}"), "{sub:?}");
        }
        let long = "u".repeat(MAX_USER_BYTES + 1);
        let err = auth
            .verify(Some(&token(json!({ "sub": long, "exp": later() }))))
            .unwrap_err();
        assert!(matches!(err, AuthError::BadSubject(_)), "{err:?}");
        let user = "u".repeat(MAX_USER_BYTES);
        assert_eq!(
            auth.verify(Some(&token(json!({ "sub": user, "exp": later() }))))
                .unwrap()
                .user,
            user
        );
    }
}
