//! The browser door: WebTransport sessions on the node's QUIC port carry
//! the native protocol, side by side with native clients, under the same
//! limits; the door refuses wrong paths and origins; hostile input on a
//! WebTransport stream is handled as on a native one. The client here is
//! web-transport-quinn's (a browser's view: HTTP status, session close
//! code and reason); tests/browser.rs drives real Chromium.

mod common;

use std::time::Duration;

use common::web::{LOCAL_ORIGIN, WebClient, try_open};
use common::{TestNode, WAIT, expect_error, next_matching};
use quic_fabric::link::Transport;
use quic_fabric::protocol::{self, Body, Frame, Payload, Priority, close_code, error_code};
use quic_fabric::stats::get;
use web_transport_quinn as wt;

fn text(t: &str) -> Payload {
    Payload::Text(t.into())
}

#[tokio::test]
async fn a_webtransport_client_and_a_native_client_talk_both_ways() {
    let node = TestNode::start().await;
    let mut web = WebClient::open(&node).await;
    let ack = web.handshake("browser").await;
    assert_eq!(ack.version, protocol::MAX_PROTOCOL_VERSION);
    assert_eq!(ack.node_id, node.id());
    let mut native = node.connect("terminal").await;

    // The native client sees the browser as any other client.
    let (clients, _) = native.list().await.unwrap();
    let listed = clients
        .iter()
        .find(|c| c.client_id == ack.client_id)
        .expect("the browser is listed");
    assert_eq!(listed.name, "browser");

    // Browser → native: a broadcast, acknowledged, stamped by the node.
    let hello = Frame::new(
        Priority::Normal,
        Body::Broadcast {
            payload: text("hello from the browser"),
        },
    );
    web.send(&hello).await;
    let got = next_matching(&mut native, |f| f.id == hello.id).await;
    assert_eq!(got.sender.unwrap().client_id, ack.client_id);
    let acked = web
        .next_matching(|f| matches!(f.body, Body::Ack { of } if of == hello.id))
        .await;
    assert_eq!(acked.priority, Priority::Normal);

    // Native → browser: a direct at high priority.
    let id = native
        .direct(ack.client_id, text("hello, browser"), Priority::High)
        .await
        .unwrap();
    let direct = web.next_matching(|f| f.id == id).await;
    assert_eq!(
        direct.body,
        Body::Direct {
            to: ack.client_id,
            payload: text("hello, browser")
        }
    );
    assert_eq!(direct.sender.unwrap().client_id, native.client_id());

    // Ping answered on the session.
    let ping = common::ping();
    web.send(&ping).await;
    web.next_matching(|f| f.body == Body::Pong { of: ping.id })
        .await;

    // Counted by transport.
    let by = &node.stats().connections_by_transport;
    assert_eq!(get(&by[Transport::WebTransport.index()]), 1);
    assert_eq!(get(&by[Transport::Quic.index()]), 1);
    let browser = node
        .registry()
        .all()
        .into_iter()
        .find(|c| c.info.client_id == ack.client_id)
        .unwrap();
    assert_eq!(browser.transport(), Some(Transport::WebTransport));
}

#[tokio::test]
async fn the_door_refuses_other_paths_and_foreign_origins() {
    let node = TestNode::start().await;
    let refused = || {
        get(&node.stats().refused_by_reason
            [quic_fabric::stats::RefusedReason::WebTransportRequest as usize])
    };
    let Err(err) = try_open(&node, "/elsewhere", Some(LOCAL_ORIGIN)).await else {
        panic!("wrong path accepted");
    };
    assert!(err.to_string().contains("404"), "{err}");
    let Err(err) = try_open(&node, "/fabric", Some("https://evil.example")).await else {
        panic!("foreign origin accepted");
    };
    assert!(err.to_string().contains("403"), "{err}");
    assert_eq!(refused(), 2);
    // No Origin (not a web page): allowed, the token is what counts.
    try_open(&node, "/fabric", None).await.expect("no origin");
}

#[tokio::test]
async fn allowed_origins_are_configurable() {
    let node = TestNode::start_with(|c| {
        c.web_origins = vec!["https://chat.example.com".into()];
        c.webtransport_path = "/rt".into();
    })
    .await;
    try_open(&node, "/rt", Some("https://chat.example.com"))
        .await
        .expect("listed origin");
    let err = try_open(&node, "/rt", Some(LOCAL_ORIGIN)).await.err();
    let err = err.expect("loopback not listed").to_string();
    assert!(err.contains("403"), "{err}");
}

#[tokio::test]
async fn hostile_input_on_a_webtransport_stream_is_answered_as_on_a_native_one() {
    let node = TestNode::start_with(|c| c.max_message_bytes = 4096).await;
    let mut web = WebClient::open(&node).await;
    web.handshake("hostile").await;

    // Garbage inside a well-formed length: Error 1 MALFORMED_FRAME, the
    // session goes on.
    let mut garbage = 9u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 9]);
    web.send_raw(&garbage).await;
    let frame = web
        .next_matching(|f| matches!(f.body, Body::Error { .. }))
        .await;
    expect_error(&frame, error_code::MALFORMED_FRAME);

    // Oversized but under the hard limit: skipped, FRAME_TOO_LARGE naming
    // the frame, and the stream stays in sync.
    let big = Frame::new(
        Priority::Normal,
        Body::Broadcast {
            payload: Payload::Binary(vec![7; 10_000]),
        },
    );
    web.send(&big).await;
    let frame = web
        .next_matching(|f| matches!(f.body, Body::Error { .. }))
        .await;
    let (of, _) = expect_error(&frame, error_code::FRAME_TOO_LARGE);
    assert_eq!(of, Some(big.id));
    let ping = common::ping();
    web.send(&ping).await;
    web.next_matching(|f| f.body == Body::Pong { of: ping.id })
        .await;

    // Beyond the hard limit: the session closes with PROTOCOL_VIOLATION,
    // which the browser sees as the close code.
    web.send_raw(&(protocol::HARD_MAX_FRAME_BYTES as u32 + 1).to_be_bytes())
        .await;
    let (code, reason) = web.closed().await;
    assert_eq!(code, close_code::PROTOCOL_VIOLATION, "{reason}");
}

#[tokio::test]
async fn a_session_that_never_handshakes_is_closed_with_handshake_timeout() {
    let node = TestNode::start_with(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    let web = WebClient::open(&node).await;
    let (code, reason) = web.closed().await;
    assert_eq!(code, close_code::HANDSHAKE_TIMEOUT, "{reason}");
    // A first frame that is not a Handshake: refused like a native one.
    let mut web = WebClient::open(&node).await;
    web.send(&common::ping()).await;
    let frame = web.next().await.expect("refusal");
    expect_error(&frame, error_code::HANDSHAKE_REQUIRED);
    assert_eq!(web.closed().await.0, close_code::PROTOCOL_VIOLATION);
}

#[tokio::test]
async fn an_h3_connection_without_a_session_request_is_dropped_in_time() {
    let node = TestNode::start_with(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    // A bare QUIC connection with ALPN h3 that never sends SETTINGS or a
    // CONNECT.
    let conn = h3_connect(&node).await.expect("h3 accepted");
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("dropped in time");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code.into_inner(),
                close_code::HANDSHAKE_TIMEOUT as u64
            );
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    let timeouts = get(&node.stats().refused_by_reason
        [quic_fabric::stats::RefusedReason::HandshakeTimeout as usize]);
    assert_eq!(timeouts, 1);
}

#[tokio::test]
async fn admission_and_drain_apply_to_webtransport_sessions() {
    let node = TestNode::start_with(|c| {
        c.max_clients = 1;
        c.shutdown_grace = Duration::from_millis(300);
    })
    .await;
    let _native = node.connect("first").await;
    // Full: refused with SERVER_FULL, as the browser sees it.
    let mut web = WebClient::open(&node).await;
    web.send(&common::hello("second", None)).await;
    expect_error(&web.next().await.unwrap(), error_code::SERVER_FULL);
    assert_eq!(web.closed().await.0, close_code::SERVER_FULL);

    // Drain: Goodbye with a reconnect cue, then SHUTDOWN after the grace.
    let node = TestNode::start_with(|c| c.shutdown_grace = Duration::from_millis(300)).await;
    let mut web = WebClient::open(&node).await;
    web.handshake("leaving").await;
    node.start_drain();
    let bye = web
        .next_matching(|f| matches!(f.body, Body::Goodbye { .. }))
        .await;
    assert!(matches!(
        bye.body,
        Body::Goodbye {
            reconnect: true,
            ..
        }
    ));
    let (code, _) = web.closed().await;
    assert_eq!(code, close_code::SHUTDOWN);
}

#[tokio::test]
async fn the_rate_limit_applies_to_a_webtransport_client() {
    const PINGS: usize = 300;
    let node = TestNode::start_with(|c| {
        c.rate_limit_messages = 50;
        c.rate_limit_burst = 20;
        c.rate_limit_strikes = 1_000_000;
    })
    .await;
    let mut web = WebClient::open(&node).await;
    web.handshake("flooder").await;
    let pings: Vec<Frame> = (0..PINGS).map(|_| common::ping()).collect();
    let flood: Vec<u8> = pings.iter().flat_map(common::encode).collect();
    web.send_raw(&flood).await;
    // One answer per ping, a Pong or RATE_LIMITED naming it.
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..PINGS {
        match web.next().await.expect("every ping is answered").body {
            Body::Pong { .. } => pongs += 1,
            Body::Error {
                code, of: Some(_), ..
            } if code == error_code::RATE_LIMITED => limited += 1,
            other => panic!("expected Pong or RATE_LIMITED, got {other:?}"),
        }
    }
    assert!(pongs >= 20, "the burst is served: {pongs}");
    assert!(limited > 0, "a {PINGS}-ping flood is limited at 50/s");
}

#[tokio::test]
async fn a_webtransport_client_that_stops_reading_is_dropped_as_a_slow_consumer() {
    let node = TestNode::start_with(|c| c.outbound_queue_len = 64).await;
    // A session that reads its HandshakeAck and nothing more.
    let session = try_open(&node, "/fabric", Some(LOCAL_ORIGIN))
        .await
        .expect("session opens");
    let mut send = session.open_uni().await.unwrap();
    send.write_all(&common::encode(&common::hello("sloth", None)))
        .await
        .unwrap();
    let mut first = session.accept_uni().await.unwrap();
    let ack = protocol::stream::read_frame(
        &mut first,
        protocol::HARD_MAX_FRAME_BYTES,
        protocol::stream::Oversized::Skip,
    )
    .await
    .unwrap();
    assert!(matches!(
        ack,
        protocol::stream::Inbound::Frame(
            Frame {
                body: Body::HandshakeAck(_),
                ..
            },
            _
        )
    ));
    let publisher = node.connect("publisher").await;
    let mut fast = node.connect("fast").await;
    // 400 x 16 KiB: far beyond the sloth's stream window (1.25 MB), so
    // the node's queue for it fills while the others keep receiving.
    let total = 400;
    let payload = Payload::Binary(vec![7; 16 * 1024]);
    for _ in 0..total {
        publisher
            .broadcast(payload.clone(), Priority::Normal)
            .await
            .unwrap();
    }
    let err = tokio::time::timeout(WAIT, session.closed())
        .await
        .expect("closed in time");
    match err {
        wt::SessionError::WebTransportError(wt::WebTransportError::Closed(code, _)) => {
            assert_eq!(code, close_code::SLOW_CONSUMER)
        }
        other => panic!("expected close code SLOW_CONSUMER, got {other:?}"),
    }
    for _ in 0..total {
        next_matching(&mut fast, |f| matches!(f.body, Body::Broadcast { .. })).await;
    }
}

#[tokio::test]
async fn a_webtransport_session_gets_no_more_streams_than_a_native_connection() {
    let node = TestNode::start().await; // max_streams_per_connection: 3
    let mut web = WebClient::open(&node).await;
    web.handshake("greedy").await;
    // Two more streams: served.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut send = web.session.open_uni().await.unwrap();
        let ping = common::ping();
        send.write_all(&common::encode(&ping)).await.unwrap();
        web.next_matching(|f| f.body == Body::Pong { of: ping.id })
            .await;
        open.push(send);
    }
    // A fourth open at once (the HTTP/3 streams' credit left unused):
    // stopped with RATE_LIMITED, and nothing on it is handled.
    let mut fourth = web.session.open_uni().await.unwrap();
    let _ = fourth.write_all(&common::encode(&common::ping())).await;
    let stopped = tokio::time::timeout(WAIT, fourth.stopped())
        .await
        .expect("stopped in time")
        .unwrap();
    assert_eq!(stopped, Some(close_code::RATE_LIMITED));
    // The others still work.
    let ping = common::ping();
    open[0].write_all(&common::encode(&ping)).await.unwrap();
    web.next_matching(|f| f.body == Body::Pong { of: ping.id })
        .await;
}

#[tokio::test]
async fn a_node_that_requires_client_certificates_keeps_the_webtransport_door_shut() {
    // Any client can choose ALPN h3; a browser cannot present a
    // certificate. So with mutual TLS (even with JWT on) there is no h3.
    let node = TestNode::start_with(|c| {
        c.auth_client_ca = Some(c.certs_dir.join("ca.pem"));
        c.auth_jwt_secret = Some("0123456789abcdef0123456789abcdef".into());
    })
    .await;
    assert!(node.web_hashes.is_empty());
    assert!(h3_connect(&node).await.is_err(), "h3 refused at TLS");
}

#[tokio::test]
async fn metrics_count_clients_by_transport() {
    let node =
        TestNode::start_with(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let mut web = WebClient::open(&node).await;
    web.handshake("browser").await;
    let _native = node.connect("native").await;
    let metrics = common::http(node.metrics_addr.unwrap(), "GET", "/metrics", None, None)
        .await
        .body;
    for line in [
        "fabric_clients_by_transport{transport=\"webtransport\"} 1",
        "fabric_clients_by_transport{transport=\"quic\"} 1",
        "fabric_connections_by_transport_total{transport=\"webtransport\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn webtransport_can_be_turned_off() {
    let node = TestNode::start_with(|c| c.webtransport = false).await;
    assert!(node.web_hashes.is_empty());
    // A browser fails the TLS handshake: the node offers no h3.
    let err = h3_connect(&node).await.expect_err("h3 refused");
    assert!(
        err.to_string().contains("no_application_protocol") || err.to_string().contains("120"),
        "{err}"
    );
    // Native clients are unaffected.
    node.connect("native").await;
}

#[tokio::test]
async fn the_web_listener_serves_the_page_and_the_discovery_endpoint() {
    let node = TestNode::start_with(|c| c.web_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let web = node.web_addr.expect("web listener");
    let (status, headers, body) = get_http(web, "/", None).await;
    assert_eq!(status, 200);
    assert!(headers.contains("content-type: text/html"), "{headers}");
    assert!(body.contains("<html"), "the demo page");
    let (status, headers, _) = get_http(web, "/fabric.js", None).await;
    assert_eq!(status, 200);
    assert!(
        headers.contains("content-type: text/javascript"),
        "{headers}"
    );

    let (status, headers, body) = get_http(web, "/webtransport.json", Some(LOCAL_ORIGIN)).await;
    assert_eq!(status, 200);
    assert!(headers.contains("cache-control: no-store"), "{headers}");
    assert!(
        headers.contains(&format!("access-control-allow-origin: {LOCAL_ORIGIN}")),
        "{headers}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["url"],
        format!("https://127.0.0.1:{}/fabric", node.addr.port())
    );
    use base64::Engine as _;
    let hash = base64::engine::general_purpose::STANDARD.encode(node.web_hashes[0]);
    assert_eq!(json["serverCertificateHashes"][0]["value"], hash);
    assert_eq!(json["serverCertificateHashes"][0]["algorithm"], "sha-256");

    let (status, _, _) = get_http(web, "/webtransport.json", Some("https://evil.example")).await;
    assert_eq!(status, 403);
}

/// A bare QUIC connection to `node` with ALPN h3 (any certificate).
async fn h3_connect(node: &TestNode) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert))
    .with_no_client_auth();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap(),
    ));
    tokio::time::timeout(
        WAIT,
        endpoint
            .connect_with(config, node.addr, "localhost")
            .unwrap(),
    )
    .await
    .expect("handshake ends in time")
}

/// A GET with an optional Origin; (status, lower-cased head, body).
async fn get_http(
    addr: std::net::SocketAddr,
    path: &str,
    origin: Option<&str>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{origin}Connection: close\r\n\r\n",
        addr.port()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("reply in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Accepts any server certificate (the test only needs the connection).
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
