//! Keeps PROTOCOL.md honest: every `<!-- example: NAME -->` block there must
//! be the exact hex encoding of the frame built here under NAME, and every
//! frame type must have one. Run with `UPDATE_PROTOCOL_EXAMPLES=1` to rewrite
//! the blocks after a deliberate protocol change.

use quic_fabric::protocol::{
    self, Body, ClientId, ClientInfo, Frame, Handshake, HandshakeAck, Keyed, MessageId, NodeId,
    NodeStats, Payload, Position, Priority, Recovery, Sender, SessionOutcome, error_code,
};
use uuid::Uuid;

const MSG: MessageId = MessageId(Uuid::from_u128(0x000102030405060708090a0b0c0d0e0f));
const REQ: MessageId = MessageId(Uuid::from_u128(0xa0a1a2a3a4a5a6a7a8a9aaabacadaeaf));
const ALICE: ClientId = ClientId(Uuid::from_u128(0x11111111111111111111111111111111));
const BOB: ClientId = ClientId(Uuid::from_u128(0x22222222222222222222222222222222));
const NODE: NodeId = NodeId(Uuid::from_u128(0x33333333333333333333333333333333));
const TS: u64 = 1_700_000_000_000;
/// The channel of the version-2 examples: `lobby` in namespace `chat`.
const CHANNEL: &str = "chat:lobby";

fn frame(priority: Priority, sender: Option<Sender>, body: Body) -> Frame {
    Frame {
        id: MSG,
        priority,
        timestamp_ms: TS,
        sender,
        body,
    }
}

fn alice() -> Option<Sender> {
    Some(Sender {
        client_id: ALICE,
        node_id: NODE,
        name: "al".into(),
        user: None,
    })
}

/// Alice as stamped by a node that authenticated her as user `alice`.
fn alice_user() -> Option<Sender> {
    Some(Sender {
        user: Some("alice".into()),
        ..alice()?
    })
}

/// Bob as a channel member: name `bo`, user `bob`, connected at [`TS`].
fn bob_info() -> ClientInfo {
    ClientInfo {
        client_id: BOB,
        node_id: NODE,
        name: "bo".into(),
        user: Some("bob".into()),
        connected_at_ms: TS,
    }
}

fn examples() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "handshake",
            frame(
                Priority::High,
                None,
                Body::Handshake(Handshake {
                    min_version: 1,
                    max_version: 2,
                    name: "al".into(),
                    token: None,
                }),
            ),
        ),
        (
            "handshake_ack",
            frame(
                Priority::High,
                None,
                Body::HandshakeAck(HandshakeAck {
                    version: 2,
                    client_id: ALICE,
                    node_id: NODE,
                    server_name: "n1".into(),
                    max_frame_bytes: 1_048_576,
                }),
            ),
        ),
        (
            "text",
            frame(Priority::Normal, None, Body::Text { text: "hi".into() }),
        ),
        (
            "binary",
            frame(
                Priority::Low,
                None,
                Body::Binary {
                    data: vec![0xde, 0xad],
                },
            ),
        ),
        (
            "broadcast",
            frame(
                Priority::Normal,
                None,
                Body::Broadcast {
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "broadcast_delivered",
            frame(
                Priority::Normal,
                alice(),
                Body::Broadcast {
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "broadcast_delivered_user",
            frame(
                Priority::Normal,
                alice_user(),
                Body::Broadcast {
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "direct",
            frame(
                Priority::High,
                None,
                Body::Direct {
                    to: BOB,
                    payload: Payload::Binary(vec![1, 2]),
                },
            ),
        ),
        ("ping", frame(Priority::High, None, Body::Ping)),
        ("pong", frame(Priority::High, None, Body::Pong { of: REQ })),
        (
            "list_clients",
            frame(Priority::Normal, None, Body::ListClients),
        ),
        (
            "client_list",
            frame(
                Priority::Normal,
                None,
                Body::ClientList {
                    of: REQ,
                    clients: vec![ClientInfo {
                        client_id: ALICE,
                        node_id: NODE,
                        name: "al".into(),
                        user: None,
                        connected_at_ms: TS,
                    }],
                    truncated: false,
                },
            ),
        ),
        (
            "client_list_two",
            frame(
                Priority::Normal,
                None,
                Body::ClientList {
                    of: REQ,
                    clients: vec![
                        ClientInfo {
                            client_id: ALICE,
                            node_id: NODE,
                            name: "al".into(),
                            user: None,
                            connected_at_ms: TS,
                        },
                        bob_info(),
                    ],
                    truncated: false,
                },
            ),
        ),
        ("ack", frame(Priority::Normal, None, Body::Ack { of: REQ })),
        (
            "error",
            frame(
                Priority::Normal,
                None,
                Body::Error {
                    of: Some(REQ),
                    code: error_code::UNKNOWN_CLIENT,
                    message: "no".into(),
                    retry_after_ms: None,
                },
            ),
        ),
        (
            "error_rate_limited",
            frame(
                Priority::Normal,
                None,
                Body::Error {
                    of: Some(REQ),
                    code: error_code::RATE_LIMITED,
                    message: "slow".into(),
                    retry_after_ms: Some(250),
                },
            ),
        ),
        (
            "goodbye",
            frame(
                Priority::High,
                None,
                Body::Goodbye {
                    reason: "bye".into(),
                    reconnect: true,
                },
            ),
        ),
        (
            "stats_request",
            frame(Priority::Normal, None, Body::StatsRequest),
        ),
        (
            "stats",
            frame(
                Priority::Normal,
                None,
                Body::Stats {
                    of: REQ,
                    stats: NodeStats {
                        node_id: NODE,
                        server_name: "n1".into(),
                        uptime_ms: 1000,
                        clients_connected: 2,
                        connections_total: 3,
                        messages_in: 4,
                        messages_out: 5,
                        bytes_in: 6,
                        bytes_out: 7,
                        errors: 8,
                        slow_consumer_disconnects: 9,
                    },
                },
            ),
        ),
        (
            "subscribe",
            frame(
                Priority::Normal,
                None,
                Body::Subscribe {
                    channel: CHANNEL.into(),
                    events: true,
                },
            ),
        ),
        (
            "subscribe_ack",
            frame(
                Priority::Normal,
                None,
                Body::SubscribeAck {
                    of: REQ,
                    channel: CHANNEL.into(),
                    subscribers: Some(2),
                },
            ),
        ),
        (
            "unsubscribe",
            frame(
                Priority::Normal,
                None,
                Body::Unsubscribe {
                    channel: CHANNEL.into(),
                },
            ),
        ),
        (
            "publish",
            frame(
                Priority::Normal,
                None,
                Body::Publish {
                    channel: CHANNEL.into(),
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "publish_delivered",
            frame(
                Priority::Normal,
                alice(),
                Body::Publish {
                    channel: CHANNEL.into(),
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "join",
            frame(
                Priority::Normal,
                None,
                Body::Join {
                    channel: CHANNEL.into(),
                    member: bob_info(),
                },
            ),
        ),
        (
            "leave",
            frame(
                Priority::Normal,
                None,
                Body::Leave {
                    channel: CHANNEL.into(),
                    member: bob_info(),
                },
            ),
        ),
        (
            "presence_request",
            frame(
                Priority::Normal,
                None,
                Body::PresenceRequest {
                    channel: CHANNEL.into(),
                },
            ),
        ),
        (
            "presence",
            frame(
                Priority::Normal,
                None,
                Body::Presence {
                    of: REQ,
                    channel: CHANNEL.into(),
                    members: vec![bob_info()],
                    truncated: false,
                },
            ),
        ),
        (
            "user_direct",
            frame(
                Priority::Normal,
                None,
                Body::UserDirect {
                    user: "bob".into(),
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "user_direct_delivered",
            frame(
                Priority::Normal,
                alice_user(),
                Body::UserDirect {
                    user: "bob".into(),
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "user_direct_as_direct",
            frame(
                Priority::Normal,
                alice_user(),
                Body::Direct {
                    to: BOB,
                    payload: Payload::Text("hi".into()),
                },
            ),
        ),
        (
            "unsubscribed",
            frame(
                Priority::High,
                None,
                Body::Unsubscribed {
                    channel: CHANNEL.into(),
                    reason: "spam".into(),
                },
            ),
        ),
        (
            "publication",
            frame(
                Priority::Normal,
                alice(),
                Body::Publication {
                    channel: FEED.into(),
                    payload: Payload::Text("hi".into()),
                    position: at(42),
                },
            ),
        ),
        (
            "subscribe_since",
            frame(
                Priority::Normal,
                None,
                Body::SubscribeSince {
                    channel: FEED.into(),
                    events: false,
                    since: Some(at(40)),
                },
            ),
        ),
        (
            "subscribed",
            frame(
                Priority::Normal,
                None,
                Body::Subscribed {
                    of: REQ,
                    channel: FEED.into(),
                    subscribers: Some(3),
                    position: Some(at(42)),
                    recovery: Recovery::Recovered,
                },
            ),
        ),
        (
            "history_request",
            frame(
                Priority::Normal,
                None,
                Body::HistoryRequest {
                    channel: FEED.into(),
                    limit: 10,
                    before: Some(40),
                },
            ),
        ),
        (
            "history",
            frame(
                Priority::Normal,
                None,
                Body::History {
                    of: REQ,
                    channel: FEED.into(),
                    position: at(42),
                    publications: Vec::new(),
                    more: false,
                },
            ),
        ),
        (
            "idempotent",
            frame(
                Priority::Normal,
                None,
                Body::Idempotent {
                    message: Keyed::Publish {
                        channel: FEED.into(),
                        payload: Payload::Text("hi".into()),
                    },
                },
            ),
        ),
        (
            "subscription_lost",
            frame(
                Priority::High,
                None,
                Body::SubscriptionLost {
                    channel: FEED.into(),
                    reason: "trimmed".into(),
                },
            ),
        ),
        (
            "resume_handshake",
            frame(
                Priority::High,
                None,
                Body::ResumeHandshake {
                    handshake: Handshake {
                        min_version: 3,
                        max_version: 3,
                        name: "ann".into(),
                        token: None,
                    },
                    resume: Some("fs1.x.y".into()),
                },
            ),
        ),
        (
            "session",
            frame(
                Priority::High,
                None,
                Body::Session {
                    token: "fs1.x.z".into(),
                    window_ms: 60_000,
                    outcome: SessionOutcome::Resumed,
                    stored: 2,
                },
            ),
        ),
        (
            "stored",
            frame(
                Priority::Normal,
                None,
                Body::Stored {
                    of: REQ,
                    until_ms: 1_700_000_060_000,
                },
            ),
        ),
    ]
}

/// The channel of the version-3 examples.
const FEED: &str = "h:feed";

/// Offset `offset` of epoch `0102030405060708`.
fn at(offset: u64) -> Position {
    Position {
        epoch: 0x0102_0304_0506_0708,
        offset,
    }
}

fn hex_dump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, chunk)| {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}  {}", i * 16, hex.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const MARK: &str = "<!-- example: ";

/// Splits PROTOCOL.md into (name, hex block) pairs and rebuilds it with new blocks.
fn rewrite(doc: &str, blocks: &dyn Fn(&str) -> Option<String>) -> (String, Vec<(String, String)>) {
    let mut out = String::new();
    let mut found = Vec::new();
    let mut rest = doc;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let after = &rest[at + MARK.len()..];
        let end = after.find(" -->").expect("example marker closed");
        let name = after[..end].to_owned();
        let body = &after[end + 4..];
        let open = body.find("```text\n").expect("hex block follows marker");
        let close = body[open + 8..].find("```").expect("hex block closed") + open + 8;
        let current = body[open + 8..close].trim_end().to_owned();
        out.push_str(&format!("{MARK}{name} -->{}```text\n", &body[..open]));
        out.push_str(&blocks(&name).unwrap_or_else(|| current.clone()));
        out.push_str("\n```");
        found.push((name, current));
        rest = &body[close + 3..];
    }
    out.push_str(rest);
    (out, found)
}

/// PROTOCOL.md section 3 gives the largest stamp as a formula and as 369
/// bytes (default `max_name_bytes`) and 1,329 bytes (its maximum, 1024):
/// what stamping the largest Sender adds to a client's frame.
#[test]
fn stamp_sizes_in_protocol_md_match_the_encoder() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("PROTOCOL.md exists");
    let max_user = quic_fabric::auth::MAX_USER_BYTES;
    assert_eq!(max_user, 256, "the formula in PROTOCOL.md says 256");
    for (max_name, documented) in [
        (protocol::MAX_NAME_BYTES, "**369 bytes**"),
        (1024, "**1,329 bytes**"),
    ] {
        let sent = frame(
            Priority::Normal,
            None,
            Body::Broadcast {
                payload: Payload::Text("hi".into()),
            },
        );
        let stamped = Frame {
            sender: Some(Sender {
                client_id: ALICE,
                node_id: NODE,
                name: "n".repeat(max_name),
                user: Some("u".repeat(max_user)),
            }),
            ..sent.clone()
        };
        let growth =
            protocol::encode(&stamped).unwrap().len() - protocol::encode(&sent).unwrap().len();
        assert_eq!(growth, 16 + 16 + 8 + max_name + 1 + 8 + max_user);
        let number: String = documented.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(growth.to_string(), number);
        assert!(doc.contains(documented), "PROTOCOL.md states {documented}");
    }
    // The largest ClientList entry with the default max_name_bytes.
    let entry = ClientInfo {
        client_id: ALICE,
        node_id: NODE,
        name: "n".repeat(protocol::MAX_NAME_BYTES),
        user: Some("u".repeat(max_user)),
        connected_at_ms: TS,
    };
    assert_eq!(protocol::codec::encode_value(&entry).unwrap().len(), 377);
    assert!(doc.contains("**377 bytes**"));
}

#[test]
fn protocol_md_hex_examples_match_the_encoder() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("PROTOCOL.md exists");
    let examples = examples();
    let encoded = |name: &str| {
        examples
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| hex_dump(&protocol::encode(f).unwrap()))
    };
    if std::env::var_os("UPDATE_PROTOCOL_EXAMPLES").is_some() {
        let (updated, _) = rewrite(&doc, &encoded);
        std::fs::write(path, updated).unwrap();
        return;
    }
    let (_, found) = rewrite(&doc, &|_| None);
    for (name, frame) in &examples {
        let Some((_, block)) = found.iter().find(|(n, _)| n == name) else {
            panic!("PROTOCOL.md has no example block for {name}");
        };
        let expected = hex_dump(&protocol::encode(frame).unwrap());
        assert_eq!(block, &expected, "example {name} drifted from the encoder");
        // And the documented bytes decode back to the frame.
        let bytes = protocol::encode(frame).unwrap();
        assert_eq!(&protocol::decode_frame(&bytes[4..]).unwrap(), frame);
    }
    for (name, _) in &found {
        assert!(
            examples.iter().any(|(n, _)| n == name),
            "PROTOCOL.md example {name} is not checked"
        );
    }
    // Every frame type has an example.
    let mut kinds: Vec<&str> = examples.iter().map(|(_, f)| f.body.name()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds.len(), protocol::codec::BODY_VARIANTS as usize);
}
