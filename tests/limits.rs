//! Limits and bad input: every case gets its documented outcome and the node
//! keeps serving a well-behaved client in the same test.

mod common;

use std::time::Duration;

use common::{
    RawClient, TestNode, WAIT, assert_pong, encode, expect_error, hello, next_matching, ping,
    read_frame,
};
use quic_fabric::client::{Client, ClientError, Event};
use quic_fabric::protocol::{
    Body, ClientId, Frame, Handshake, MessageId, NodeId, Payload, Priority, Sender, close_code,
    error_code,
};

/// A library client proves the node still serves others.
async fn still_serving(node: &TestNode) {
    let c = node.connect("bystander").await;
    c.ping().await.expect("node still answers pings");
}

#[tokio::test]
async fn version_mismatch_gets_error_and_close_code() {
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let hello = Frame::new(
        Priority::High,
        Body::Handshake(Handshake {
            min_version: 4,
            max_version: 5,
            name: "future".into(),
            token: None,
        }),
    );
    let _s = raw.send_raw(&encode(&hello)).await;
    let mut recv = raw.conn.accept_uni().await.unwrap();
    let reply = read_frame(&mut recv).await.unwrap();
    expect_error(&reply, error_code::UNSUPPORTED_VERSION);
    if let Body::Error { message, of, .. } = &reply.body {
        assert_eq!(*of, Some(hello.id));
        assert!(
            message.contains("1..=3"),
            "reason names the supported versions: {message}"
        );
    }
    raw.expect_closed_with(close_code::UNSUPPORTED_VERSION)
        .await;
    still_serving(&node).await;
}

#[tokio::test]
async fn frames_before_the_handshake_are_a_protocol_violation() {
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let ping = ping();
    let _s = raw.send_raw(&encode(&ping)).await;
    let mut recv = raw.conn.accept_uni().await.unwrap();
    expect_error(
        &read_frame(&mut recv).await.unwrap(),
        error_code::HANDSHAKE_REQUIRED,
    );
    raw.expect_closed_with(close_code::PROTOCOL_VIOLATION).await;
    still_serving(&node).await;
}

#[tokio::test]
async fn a_second_handshake_is_refused_but_the_connection_stays() {
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, ack) = raw.handshake("twice").await;
    assert!(matches!(ack.body, Body::HandshakeAck(_)));
    let again = hello("again", None);
    send.write_all(&encode(&again)).await.unwrap();
    expect_error(
        &read_frame(&mut recv).await.unwrap(),
        error_code::ALREADY_HANDSHAKEN,
    );
    assert_pong(&mut send, &mut recv).await;
}

#[tokio::test]
async fn invalid_names_are_refused() {
    let node = TestNode::start().await;
    // Each refusal names the rule the name broke (PROTOCOL.md section 6).
    let long = "x".repeat(65);
    let cases = [
        ("", "must be 1 to 64 bytes of UTF-8, not 0"),
        (long.as_str(), "must be 1 to 64 bytes of UTF-8, not 65"),
        ("bad\nname", "contains U+000A, a control character"),
        ("tab\there", "contains U+0009, a control character"),
        (
            "two\u{2028}lines",
            "contains U+2028, a line or paragraph separator",
        ),
        (
            "al\u{200B}",
            "contains U+200B, an invisible format character",
        ),
        (
            "\u{FEFF}al",
            "contains U+FEFF, an invisible format character",
        ),
        ("   ", "is only whitespace"),
    ];
    for (name, why) in cases {
        let config = node.client_config(name);
        match Client::connect(&config).await {
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(code, error_code::INVALID_FIELD, "{message}");
                assert_eq!(message, format!("name {why}"), "{name:?}");
            }
            Err(other) => panic!("expected INVALID_FIELD for {name:?}, got {other}"),
            Ok(_) => panic!("name {name:?} accepted"),
        }
    }
    // Spaces inside a name, and any visible script, are fine.
    for name in ["al ice", " bob ", "Zoë", "名前"] {
        node.connect(name).await.ping().await.unwrap();
    }
    still_serving(&node).await;
}

#[tokio::test]
async fn the_client_beyond_max_clients_is_refused_with_a_reason() {
    let node = TestNode::start_with(|c| c.max_clients = 2).await;
    let a = node.connect("a").await;
    let _b = node.connect("b").await;
    match Client::connect(&node.client_config("c")).await {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, error_code::SERVER_FULL);
            assert!(message.contains("2 clients"), "{message}");
        }
        Err(other) => panic!("expected SERVER_FULL, got {other}"),
        Ok(_) => panic!("third client accepted"),
    }
    a.ping().await.unwrap();
    // A leaver frees its place.
    a.close("bye").await;
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(c) = Client::connect(&node.client_config("c")).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a place frees up after a client leaves");
}

#[tokio::test]
async fn oversized_frame_is_rejected_and_the_stream_stays_usable() {
    let node = TestNode::start_with(|c| c.max_message_bytes = 1024).await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, _) = raw.handshake("big").await;
    // Any 2000-byte payload: only its first 16 bytes (the id) are looked at.
    let id = MessageId::new_random();
    let mut big = (2000u32).to_be_bytes().to_vec();
    big.extend_from_slice(id.0.as_bytes());
    big.resize(4 + 2000, 0xAB);
    send.write_all(&big).await.unwrap();
    let reply = read_frame(&mut recv).await.unwrap();
    expect_error(&reply, error_code::FRAME_TOO_LARGE);
    assert_eq!(
        reply.body.reply_to(),
        Some(id),
        "the error names the rejected message"
    );
    // Same stream, next frame: still in sync.
    assert_pong(&mut send, &mut recv).await;
    still_serving(&node).await;

    // The library refuses to send what the node would reject.
    let c = node.connect("lib").await;
    match c.send_binary(vec![0; 2000]).await {
        Err(ClientError::TooLarge { max, .. }) => assert_eq!(max, 1024),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[tokio::test]
async fn a_4_gib_length_prefix_closes_the_connection() {
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, _) = raw.handshake("liar").await;
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    expect_error(
        &read_frame(&mut recv).await.unwrap(),
        error_code::FRAME_TOO_LARGE,
    );
    raw.expect_closed_with(close_code::PROTOCOL_VIOLATION).await;
    still_serving(&node).await;
}

#[tokio::test]
async fn garbage_and_unknown_types_get_errors_and_the_connection_survives() {
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, _) = raw.handshake("noisy").await;

    // Valid length, garbage payload.
    let mut garbage = 10u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xFF; 10]);
    send.write_all(&garbage).await.unwrap();
    expect_error(
        &read_frame(&mut recv).await.unwrap(),
        error_code::MALFORMED_FRAME,
    );

    // A well-formed header with frame type 99.
    let ping = ping();
    let mut unknown = encode(&ping);
    let at = unknown.len() - 4;
    unknown[at..].copy_from_slice(&99u32.to_le_bytes());
    send.write_all(&unknown).await.unwrap();
    let reply = read_frame(&mut recv).await.unwrap();
    expect_error(&reply, error_code::UNKNOWN_FRAME_TYPE);
    assert_eq!(reply.body.reply_to(), Some(ping.id));

    // Server-only frame types from a client.
    let bogus = Frame::new(Priority::High, Body::Ack { of: ping.id });
    send.write_all(&encode(&bogus)).await.unwrap();
    let stats = Frame::new(
        Priority::High,
        Body::Stats {
            of: ping.id,
            stats: Default::default(),
        },
    );
    send.write_all(&encode(&stats)).await.unwrap();
    expect_error(
        &read_frame(&mut recv).await.unwrap(),
        error_code::UNEXPECTED_FRAME,
    );

    // Still usable.
    send.write_all(&encode(&ping)).await.unwrap();
    assert_eq!(
        read_frame(&mut recv).await.unwrap().body,
        Body::Pong { of: ping.id }
    );
    still_serving(&node).await;
}

#[tokio::test]
async fn a_forged_sender_is_replaced_by_the_real_one() {
    let node = TestNode::start().await;
    let mut victim = node.connect("victim").await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, ack) = raw.handshake("forger").await;
    let Body::HandshakeAck(ack) = ack.body else {
        panic!("no ack")
    };
    let mut frame = Frame::new(
        Priority::High,
        Body::Direct {
            to: victim.client_id(),
            payload: Payload::Text("trust me".into()),
        },
    );
    frame.sender = Some(Sender {
        client_id: ClientId::new_random(),
        node_id: NodeId::new_random(),
        name: "admin".into(),
        user: Some("root".into()),
    });
    send.write_all(&encode(&frame)).await.unwrap();
    assert_eq!(
        read_frame(&mut recv).await.unwrap().body,
        Body::Ack { of: frame.id }
    );
    let got = next_matching(&mut victim, |f| f.id == frame.id).await;
    let sender = got.sender.unwrap();
    assert_eq!(sender.client_id, ack.client_id);
    assert_eq!(sender.name, "forger");
    assert_eq!(sender.user, None);
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_as_slow_while_others_keep_receiving() {
    let node = TestNode::start_with(|c| c.outbound_queue_len = 64).await;
    // Tiny receive window: the slow client's QUIC stack stops accepting
    // data almost at once, so the node's queue for it fills.
    let slow = RawClient::connect_with(&node, |t| {
        t.stream_receive_window(quinn::VarInt::from_u32(4096));
        t.receive_window(quinn::VarInt::from_u32(8192));
    })
    .await;
    let (_send, _recv, _) = slow.handshake("sloth").await;
    let publisher = node.connect("publisher").await;
    let mut fast = node.connect("fast").await;

    let total = 400;
    let payload = Payload::Binary(vec![7; 1000]);
    for _ in 0..total {
        publisher
            .broadcast(payload.clone(), Priority::Normal)
            .await
            .unwrap();
    }
    slow.expect_closed_with(close_code::SLOW_CONSUMER).await;
    let mut received = 0;
    while received < total {
        let f = next_matching(&mut fast, |f| {
            f.sender.as_ref().is_some_and(|s| s.name == "publisher")
        })
        .await;
        assert_eq!(
            f.body,
            Body::Broadcast {
                payload: payload.clone()
            }
        );
        received += 1;
    }
    let stats = publisher.stats().await.unwrap();
    assert_eq!(stats.slow_consumer_disconnects, 1);
}

#[tokio::test]
async fn a_connection_without_handshake_times_out() {
    let node = TestNode::start_with(|c| c.handshake_timeout = Duration::from_millis(300)).await;
    let raw = RawClient::connect(&node).await;
    raw.expect_closed_with(close_code::HANDSHAKE_TIMEOUT).await;
    still_serving(&node).await;
}

#[tokio::test]
async fn idle_clients_time_out() {
    let node = TestNode::start_with(|c| {
        c.idle_timeout = Duration::from_millis(500);
        c.keep_alive_interval = Duration::ZERO;
    })
    .await;
    let raw = RawClient::connect_with(&node, |t| {
        t.keep_alive_interval(None);
    })
    .await;
    let _hs = raw.handshake("sleepy").await;
    let err = tokio::time::timeout(WAIT, raw.conn.closed())
        .await
        .expect("idle connection closes");
    assert!(matches!(err, quinn::ConnectionError::TimedOut), "{err:?}");
    // The node forgot it.
    let c = node.connect("awake").await;
    let (clients, _) = c.list().await.unwrap();
    assert!(clients.iter().all(|x| x.name != "sleepy"));
}

#[tokio::test]
async fn goodbye_from_a_client_closes_it_normally() {
    let node = TestNode::start().await;
    let mut a = node.connect("a").await;
    let bye = Frame::new(
        Priority::High,
        Body::Goodbye {
            reason: "done".into(),
            reconnect: false,
        },
    );
    a.send_frame(&bye).await.unwrap();
    match tokio::time::timeout(WAIT, a.next_event()).await.unwrap() {
        Some(Event::Closed { code, .. }) => assert_eq!(code, Some(close_code::NORMAL)),
        other => panic!("expected close, got {other:?}"),
    }
}
