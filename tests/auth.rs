//! Authentication: JWT in the Handshake (HS256 secret, public key PEM for
//! RS256/ES256/EdDSA, JWKS) and mutual TLS, over real QUIC.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{RawClient, TestNode, WAIT, deliver, encode, hello, ping, read_frame};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use quic_fabric::auth::{Claims, mint, mint_hs256, unix_now};
use quic_fabric::client::{Client, ClientError, Event};
use quic_fabric::protocol::{Body, close_code, error_code};
use quic_fabric::tls::{self, ClientCert};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn claims(sub: &str, ttl: i64) -> Claims {
    let now = unix_now();
    Claims {
        sub: sub.into(),
        exp: now.saturating_add_signed(ttl),
        nbf: None,
        iat: Some(now),
        aud: None,
        iss: None,
        channels: Vec::new(),
    }
}

async fn connect_with_token(node: &TestNode, token: Option<String>) -> Result<Client, ClientError> {
    let mut config = node.client_config("c");
    config.token = token;
    Client::connect(&config).await
}

fn expect_auth_refusal(result: Result<Client, ClientError>) -> String {
    match result {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, error_code::AUTH_FAILED, "{message}");
            message
        }
        Err(other) => panic!("expected AUTH_FAILED, got {other}"),
        Ok(_) => panic!("expected AUTH_FAILED, got a connection"),
    }
}

#[tokio::test]
async fn hs256_token_names_the_user_everywhere_and_bad_tokens_are_refused() {
    let node = TestNode::start_with(|c| {
        c.auth_jwt_secret = Some(SECRET.into());
        c.auth_audience = vec!["fabric".into()];
        c.auth_issuer = vec!["issuer-a".into()];
        c.auth_leeway = Duration::ZERO;
    })
    .await;
    let good = |sub: &str| {
        mint_hs256(
            SECRET,
            sub,
            Duration::from_secs(600),
            Some("fabric"),
            Some("issuer-a"),
            &[],
        )
        .unwrap()
    };
    let alice = connect_with_token(&node, Some(good("alice")))
        .await
        .unwrap();
    let mut bob = connect_with_token(&node, Some(good("bob"))).await.unwrap();

    // The subject is the user id in the client list...
    let (list, _) = alice.list().await.unwrap();
    let users: Vec<_> = list.iter().map(|c| c.user.clone()).collect();
    assert!(users.contains(&Some("alice".into())), "{users:?}");
    assert!(users.contains(&Some("bob".into())), "{users:?}");
    // ...and on every message it sends.
    let got = deliver(&alice, &mut bob, "hi").await;
    assert_eq!(got.sender.unwrap().user.as_deref(), Some("alice"));

    // Every way a token can be wrong is refused with AUTH_FAILED.
    let msg = expect_auth_refusal(connect_with_token(&node, None).await);
    assert!(msg.contains("requires a token"), "{msg}");
    let other_secret = mint_hs256(
        "another-secret-that-is-long-enough-xx",
        "mallory",
        Duration::from_secs(600),
        Some("fabric"),
        Some("issuer-a"),
        &[],
    )
    .unwrap();
    let msg = expect_auth_refusal(connect_with_token(&node, Some(other_secret)).await);
    assert!(msg.contains("bad signature"), "{msg}");
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let header = Header::new(Algorithm::HS256);
    let cases = [
        (
            Claims {
                aud: Some("fabric".into()),
                iss: Some("issuer-a".into()),
                ..claims("old", -120)
            },
            "expired",
        ),
        (
            Claims {
                aud: Some("elsewhere".into()),
                iss: Some("issuer-a".into()),
                ..claims("x", 600)
            },
            "wrong audience",
        ),
        (
            Claims {
                aud: Some("fabric".into()),
                iss: Some("issuer-b".into()),
                ..claims("x", 600)
            },
            "wrong issuer",
        ),
        (
            Claims {
                aud: Some("fabric".into()),
                iss: Some("issuer-a".into()),
                nbf: Some(unix_now() + 3600),
                ..claims("x", 7200)
            },
            "not valid yet",
        ),
        (
            Claims {
                iss: Some("issuer-a".into()),
                ..claims("x", 600)
            },
            "missing claim aud",
        ),
    ];
    for (claims, why) in cases {
        let token = mint(&header, &claims, &key).unwrap();
        let msg = expect_auth_refusal(connect_with_token(&node, Some(token)).await);
        assert!(msg.contains(why), "expected {why:?} in {msg:?}");
    }
    let msg = expect_auth_refusal(connect_with_token(&node, Some("not.a.jwt".into())).await);
    assert!(msg.contains("invalid token"), "{msg}");
    // An HS256-signed token cannot pass as another algorithm.
    let none_alg = format!(
        "{}.{}.",
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ"
    );
    expect_auth_refusal(connect_with_token(&node, Some(none_alg)).await);

    // Nothing else is processed on a refused connection: the refusal is the
    // only frame and the close code is AUTH_FAILED.
    let raw = RawClient::connect(&node).await;
    let mut send = raw.send_raw(&encode(&hello("raw", None))).await;
    let _ = send.write_all(&encode(&ping())).await;
    let mut recv = tokio::time::timeout(WAIT, raw.conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let reply = read_frame(&mut recv).await.unwrap();
    assert!(
        matches!(reply.body, Body::Error { code, .. } if code == error_code::AUTH_FAILED),
        "{reply:?}"
    );
    assert_eq!(read_frame(&mut recv).await, None, "no Pong after a refusal");
    raw.expect_closed_with(close_code::AUTH_FAILED).await;
    assert_eq!(
        node.stats()
            .refused_count(quic_fabric::stats::RefusedReason::AuthFailed),
        10
    );
    // The authenticated clients were never disturbed.
    alice.ping().await.unwrap();
}

/// Generates a key with openssl (RSA) or rcgen and returns (private PEM, public PEM).
fn rsa_keypair(dir: &Path) -> (String, String) {
    let key = dir.join("rsa.key");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key.to_str().unwrap(),
    ]);
    let public = run(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    (
        std::fs::read_to_string(&key).unwrap(),
        String::from_utf8(public).unwrap(),
    )
}

fn rcgen_keypair(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    (key.serialize_pem(), key.public_key_pem())
}

#[tokio::test]
async fn public_key_files_rs256_es256_eddsa() {
    let dir = tempfile::tempdir().unwrap();
    let keys = [
        (rsa_keypair(dir.path()), Algorithm::RS256),
        (
            rcgen_keypair(&rcgen::PKCS_ECDSA_P256_SHA256),
            Algorithm::ES256,
        ),
        (rcgen_keypair(&rcgen::PKCS_ED25519), Algorithm::EdDSA),
    ];
    for ((private, public), alg) in keys {
        let path = dir.path().join(format!("{alg:?}.pub.pem"));
        std::fs::write(&path, &public).unwrap();
        let node = TestNode::start_with(|c| c.auth_jwt_public_key = Some(path.clone())).await;
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private.as_bytes()),
            Algorithm::ES256 => EncodingKey::from_ec_pem(private.as_bytes()),
            _ => EncodingKey::from_ed_pem(private.as_bytes()),
        }
        .unwrap();
        let token = mint(&Header::new(alg), &claims("carol", 600), &key).unwrap();
        let carol = connect_with_token(&node, Some(token)).await.unwrap();
        let (list, _) = carol.list().await.unwrap();
        assert_eq!(list[0].user.as_deref(), Some("carol"), "{alg:?}");

        // The public key cannot be used as an HMAC secret (algorithm confusion).
        let forged = mint(
            &Header::new(Algorithm::HS256),
            &claims("mallory", 600),
            &EncodingKey::from_secret(public.as_bytes()).unwrap(),
        )
        .unwrap();
        let msg = expect_auth_refusal(connect_with_token(&node, Some(forged)).await);
        assert!(msg.contains("algorithm not allowed"), "{alg:?}: {msg}");
    }
}

#[tokio::test]
async fn jwks_selects_the_key_by_kid() {
    let dir = tempfile::tempdir().unwrap();
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let ed_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ed = EncodingKey::from_ed_pem(ed_pair.serialize_pem().as_bytes()).unwrap();
    let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).unwrap();
    // Public JWKs, as an identity provider publishes them.
    let ec_point = ec_pair.public_key_raw(); // 0x04 || x || y
    let ed_jwk: Jwk = serde_json::from_value(serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
        "x": b64(ed_pair.public_key_raw()),
    }))
    .unwrap();
    let ec_jwk: Jwk = serde_json::from_value(serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": "ec-1",
        "x": b64(&ec_point[1..33]), "y": b64(&ec_point[33..65]),
    }))
    .unwrap();
    let set = JwkSet {
        keys: vec![ed_jwk, ec_jwk],
    };
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();
    let node = TestNode::start_with(|c| c.auth_jwks = Some(path.clone())).await;

    let with_kid = |alg, kid: Option<&str>| {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        h
    };
    let ed_token = mint(
        &with_kid(Algorithm::EdDSA, Some("ed-1")),
        &claims("dave", 600),
        &ed,
    )
    .unwrap();
    let ec_token = mint(
        &with_kid(Algorithm::ES256, Some("ec-1")),
        &claims("erin", 600),
        &ec,
    )
    .unwrap();
    connect_with_token(&node, Some(ed_token)).await.unwrap();
    connect_with_token(&node, Some(ec_token)).await.unwrap();

    // Signed by the EC key but claiming the Ed key's id: refused.
    let crossed = mint(
        &with_kid(Algorithm::ES256, Some("ed-1")),
        &claims("x", 600),
        &ec,
    )
    .unwrap();
    expect_auth_refusal(connect_with_token(&node, Some(crossed)).await);
    let unknown = mint(
        &with_kid(Algorithm::EdDSA, Some("nope")),
        &claims("x", 600),
        &ed,
    )
    .unwrap();
    let msg = expect_auth_refusal(connect_with_token(&node, Some(unknown)).await);
    assert!(msg.contains("unknown key id"), "{msg}");
    let no_kid = mint(&with_kid(Algorithm::EdDSA, None), &claims("x", 600), &ed).unwrap();
    let msg = expect_auth_refusal(connect_with_token(&node, Some(no_kid)).await);
    assert!(msg.contains("kid"), "{msg}");
}

#[tokio::test]
async fn a_connection_does_not_outlive_its_token() {
    let node = TestNode::start_with(|c| {
        c.auth_jwt_secret = Some(SECRET.into());
        c.auth_leeway = Duration::ZERO;
    })
    .await;
    let token = mint_hs256(SECRET, "brief", Duration::from_secs(2), None, None, &[]).unwrap();
    let mut client = connect_with_token(&node, Some(token)).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match client.next_event().await {
                Some(Event::Closed { code, .. }) => return code,
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .expect("closed at expiry");
    assert_eq!(closed, Some(close_code::TOKEN_EXPIRED));
}

#[tokio::test]
async fn mutual_tls_requires_a_certificate_from_the_configured_ca() {
    let certs = common::TestCerts::new();
    let ca = certs.dir.path().join("ca.pem");
    let node = TestNode::start_on(
        quic_fabric::node::BusChoice::FromConfig,
        Some(&certs),
        |c| c.auth_client_ca = Some(ca.clone()),
    )
    .await;
    let alice_id = tls::issue_dev_client_cert(certs.dir.path(), "alice").unwrap();

    let mut config = node.client_config("phone");
    config.identity = Some(alice_id.clone());
    let alice = Client::connect(&config).await.unwrap();
    let (list, _) = alice.list().await.unwrap();
    assert_eq!(list[0].user.as_deref(), Some("alice"));

    // No certificate: the TLS handshake fails.
    let no_cert = Client::connect(&node.client_config("anon")).await;
    assert!(no_cert.is_err(), "a client without a certificate got in");

    // A certificate from another CA: refused too.
    let other = tempfile::tempdir().unwrap();
    let stranger = tls::issue_dev_client_cert(other.path(), "mallory").unwrap();
    let mut config = node.client_config("stranger");
    config.identity = Some(ClientCert {
        cert: stranger.cert,
        key: stranger.key,
    });
    assert!(Client::connect(&config).await.is_err());
    alice.ping().await.unwrap();
}

#[test]
fn weak_secrets_and_conflicting_key_sources_are_config_errors() {
    let config = quic_fabric::NodeConfig {
        auth_jwt_secret: Some("short".into()),
        ..Default::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("at least 32 bytes"), "{err}");
    let config = quic_fabric::NodeConfig {
        auth_jwt_secret: Some(SECRET.into()),
        auth_jwks: Some("x.json".into()),
        ..Default::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("choose one"), "{err}");
    assert!(mint_hs256("short", "x", Duration::from_secs(1), None, None, &[]).is_err());
}
