//! Operating a node over real HTTP: the Prometheus endpoint, the admin API
//! and draining.

mod common;

use std::time::Duration;

use common::{TestNode, WAIT, deliver, expect_unknown, http, next_matching};
use quic_fabric::client::{Client, Event};
use quic_fabric::protocol::{Body, ClientId, Payload, Priority, close_code, error_code};

const TOKEN: &str = "test-admin-token-0123456789";

/// The value of the sample `name` (with its labels, as printed) in an
/// OpenMetrics text body; 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = rest.strip_prefix(' ')?;
            value.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

async fn scrape(node: &TestNode) -> String {
    let response = http(node.metrics_addr.unwrap(), "GET", "/metrics", None, None).await;
    assert_eq!(response.status, 200);
    assert!(
        response
            .headers
            .to_ascii_lowercase()
            .contains("openmetrics-text"),
        "{}",
        response.headers
    );
    response.body
}

#[tokio::test]
async fn metrics_are_scraped_and_move_with_traffic() {
    let node = TestNode::start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.rate_limit_messages = 5;
        c.rate_limit_burst = 5;
    })
    .await;
    let before = scrape(&node).await;
    assert_eq!(sample(&before, "fabric_clients_connected"), 0.0);
    for name in [
        "fabric_connections_refused_total{reason=\"ip_rate\"}",
        "fabric_messages_in_total{type=\"direct\"}",
        "fabric_delivery_latency_seconds_count{path=\"local\"}",
        "fabric_quic_lost_packets_total",
    ] {
        assert!(before.contains(name), "{name} missing from\n{before}");
    }
    assert!(before.trim_end().ends_with("# EOF"));

    let alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    deliver(&alice, &mut bob, "hi").await;
    alice.ping().await.unwrap();
    expect_unknown(&alice, ClientId::new_random()).await;
    // Two more requests exceed the burst of 5 frames.
    let mut limited = false;
    for _ in 0..4 {
        if let Err(quic_fabric::client::ClientError::Server { code, .. }) = alice.ping().await {
            assert_eq!(code, error_code::RATE_LIMITED);
            limited = true;
        }
    }
    assert!(limited, "the rate limit was hit");

    let after = scrape(&node).await;
    assert_eq!(sample(&after, "fabric_clients_connected"), 2.0);
    assert_eq!(sample(&after, "fabric_connections_accepted_total"), 2.0);
    assert_eq!(
        sample(&after, "fabric_messages_in_total{type=\"direct\"}"),
        2.0
    );
    assert_eq!(
        sample(&after, "fabric_messages_out_total{type=\"direct\"}"),
        1.0
    );
    assert!(sample(&after, "fabric_messages_in_total{type=\"ping\"}") >= 2.0);
    assert!(sample(&after, "fabric_messages_out_total{type=\"pong\"}") >= 1.0);
    assert_eq!(sample(&after, "fabric_errors_total{code=\"7\"}"), 1.0);
    assert!(sample(&after, "fabric_errors_total{code=\"12\"}") >= 1.0);
    assert!(sample(&after, "fabric_rate_limited_total") >= 1.0);
    assert_eq!(
        sample(
            &after,
            "fabric_delivery_latency_seconds_count{path=\"local\"}"
        ),
        1.0
    );
    assert!(
        sample(&after, "fabric_received_bytes_total")
            > sample(&before, "fabric_received_bytes_total")
    );
    assert!(sample(&after, "fabric_sent_bytes_total") > 0.0);
    assert!(sample(&after, "fabric_quic_rtt_seconds_count{scope=\"client\"}") >= 2.0);
    assert_eq!(sample(&after, "fabric_ready"), 1.0);
    assert!(
        !after.contains("fabric_redis_up"),
        "single node: no Redis metrics"
    );

    alice.close("done").await;
    bob.close("done").await;
    common::eventually(WAIT, "clients gone from the gauge", || async {
        sample(&scrape(&node).await, "fabric_clients_connected") == 0.0
    })
    .await;
}

async fn admin_node() -> TestNode {
    TestNode::start_with(|c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin_token = Some(TOKEN.into());
        c.shutdown_grace = Duration::from_secs(10);
    })
    .await
}

#[tokio::test]
async fn admin_api_lists_broadcasts_and_disconnects() {
    let node = admin_node().await;
    let admin = node.admin_addr.unwrap();

    // Health and readiness need no token; everything else does.
    let health = http(admin, "GET", "/health", None, None).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["node_id"], node.id().to_string());
    assert_eq!(http(admin, "GET", "/ready", None, None).await.status, 200);
    let denied = http(admin, "GET", "/stats", None, None).await;
    assert_eq!(denied.status, 401);
    assert!(
        denied.headers.contains("www-authenticate"),
        "{}",
        denied.headers
    );
    assert_eq!(
        http(admin, "GET", "/stats", Some("wrong-token-0123456"), None)
            .await
            .status,
        401
    );
    assert_eq!(
        http(admin, "GET", "/nope", Some(TOKEN), None).await.status,
        404
    );

    let mut clients = Vec::new();
    for name in ["c1", "c2", "c3"] {
        clients.push(node.connect(name).await);
    }
    let stats = http(admin, "GET", "/stats", Some(TOKEN), None).await.json();
    assert_eq!(stats["clients_connected"], 3);
    assert_eq!(stats["draining"], false);

    // Pagination.
    let first = http(admin, "GET", "/clients?limit=2", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(first["clients"].as_array().unwrap().len(), 2);
    assert_eq!(first["next_offset"], 2);
    let rest = http(admin, "GET", "/clients?offset=2&limit=2", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(rest["clients"].as_array().unwrap().len(), 1);
    assert!(rest["next_offset"].is_null());
    let mut seen: Vec<String> = first["clients"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["clients"].as_array().unwrap())
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["c1", "c2", "c3"]);
    assert_eq!(
        http(admin, "GET", "/clients?limit=0", Some(TOKEN), None)
            .await
            .status,
        400
    );
    // A query that does not parse is a JSON error too, not plain text.
    let bad = http(admin, "GET", "/clients?limit=x", Some(TOKEN), None).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].is_string(), "{bad:?}");

    let nodes = http(admin, "GET", "/nodes", Some(TOKEN), None).await.json();
    assert_eq!(nodes["nodes"][0]["clients"], 3);
    assert_eq!(nodes["nodes"][0]["self"], true);

    // A server-originated broadcast reaches every client, with no sender.
    let sent = http(
        admin,
        "POST",
        "/broadcast",
        Some(TOKEN),
        Some(r#"{"text":"maintenance at noon","priority":"high"}"#),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert_eq!(sent.json()["local_clients"], 3);
    for client in &mut clients {
        let got = next_matching(client, |f| matches!(f.body, Body::Broadcast { .. })).await;
        assert_eq!(got.sender, None);
        assert_eq!(got.priority, Priority::High);
        assert_eq!(
            got.body,
            Body::Broadcast {
                payload: Payload::Text("maintenance at noon".into())
            }
        );
    }
    for bad in [
        r#"{"text":"a","binary_base64":"YQ=="}"#,
        r#"{"txt":"a"}"#,
        "not json",
    ] {
        let response = http(admin, "POST", "/broadcast", Some(TOKEN), Some(bad)).await;
        assert_eq!(response.status, 400, "{bad}: {}", response.body);
        assert!(response.json()["error"].is_string());
    }

    // Disconnect one client, with a reason it is told.
    let mut victim = clients.pop().unwrap();
    let path = format!("/clients/{}?reason=policy%20violation", victim.client_id());
    let kicked = http(admin, "DELETE", &path, Some(TOKEN), None).await;
    assert_eq!(kicked.status, 200, "{}", kicked.body);
    let mut goodbye = None;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match victim.next_event().await {
                Some(Event::Frame(f)) => {
                    if let Body::Goodbye { reason, reconnect } = f.body {
                        goodbye = Some((reason, reconnect));
                    }
                }
                Some(Event::Closed { code, .. }) => return code,
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(goodbye, Some(("policy violation".to_owned(), false)));
    assert_eq!(closed, Some(close_code::KICKED));
    let again = http(admin, "DELETE", &path, Some(TOKEN), None).await;
    assert_eq!(again.status, 404);
    assert_eq!(
        http(admin, "DELETE", "/clients/not-a-uuid", Some(TOKEN), None)
            .await
            .status,
        400
    );
    clients[0].ping().await.unwrap();
}

#[tokio::test]
async fn drain_turns_ready_off_asks_clients_to_leave_and_stops_the_node() {
    let mut node = admin_node().await;
    let admin = node.admin_addr.unwrap();
    let mut config = node.client_config("mobile");
    config.reconnect = Some(quic_fabric::client::ReconnectPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_attempts: Some(3),
    });
    let mut follower = Client::connect(&config).await.unwrap();
    let mut plain = node.connect("plain").await;

    let drained = http(admin, "POST", "/drain", Some(TOKEN), None).await;
    assert_eq!(drained.status, 202);
    assert_eq!(drained.json()["clients"], 2);
    let ready = http(admin, "GET", "/ready", None, None).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["reason"], "draining");

    // Both get the reconnect cue; the library client with a reconnect
    // policy leaves by itself and its reconnects are refused (draining).
    let cue = next_matching(&mut plain, |f| matches!(f.body, Body::Goodbye { .. })).await;
    assert!(matches!(
        cue.body,
        Body::Goodbye {
            reconnect: true,
            ..
        }
    ));
    let mut saw = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            match follower.next_event().await {
                Some(Event::Frame(f)) if matches!(f.body, Body::Goodbye { .. }) => {
                    saw.push("goodbye")
                }
                Some(Event::Disconnected { .. }) => saw.push("disconnected"),
                Some(Event::Closed { .. }) | None => break,
                _ => {}
            }
        }
    })
    .await
    .expect("the follower gives up on the draining node");
    assert_eq!(saw, ["goodbye", "disconnected"]);
    // A new client is refused while draining.
    assert!(Client::connect(&node.client_config("late")).await.is_err());
    assert!(
        node.stats()
            .refused_count(quic_fabric::stats::RefusedReason::Draining)
            > 0,
        "refusals counted as draining"
    );
    // The plain client stays; the node closes it after the grace period
    // and stops by itself.
    plain.close("leaving now").await;
    tokio::time::timeout(Duration::from_secs(20), node.task.take().unwrap())
        .await
        .expect("the node stops once its clients left")
        .unwrap();
}

#[test]
fn an_admin_api_beyond_loopback_needs_a_token() {
    let config = quic_fabric::NodeConfig {
        admin_listen: Some("0.0.0.0:9091".parse().unwrap()),
        ..Default::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("--admin-token"), "{err}");
    let config = quic_fabric::NodeConfig {
        admin_listen: Some("0.0.0.0:9091".parse().unwrap()),
        admin_token: Some(TOKEN.into()),
        ..Default::default()
    };
    config.validate().unwrap();
}

#[tokio::test]
async fn a_drained_node_keeps_refusing_for_the_linger_instead_of_vanishing() {
    let mut node = TestNode::start_with(|c| c.drain_linger = Duration::from_secs(3)).await;
    node.start_drain();
    // No clients: without the linger the node would be gone at once and an
    // attempt would just time out; with it, the attempt is refused at once.
    let attempt = common::RawClient::try_connect(&node).await;
    match attempt {
        Err(err) => assert!(common::is_refused(&err), "{err}"),
        Ok(_) => panic!("a draining node accepted a connection"),
    }
    tokio::time::timeout(Duration::from_secs(20), node.task.take().unwrap())
        .await
        .expect("the node stops after the linger")
        .unwrap();
}

/// `chat:` keeps presence, `quiet:` does not, and only the server
/// publishes to `news:`.
fn channel_namespaces(c: &mut quic_fabric::NodeConfig) {
    use quic_fabric::config::{Namespace, PublishPolicy};
    c.namespaces = vec![
        Namespace::open("chat"),
        Namespace {
            presence: false,
            ..Namespace::open("quiet")
        },
        Namespace {
            publish: PublishPolicy::Nobody,
            ..Namespace::open("news")
        },
    ];
}

async fn channel_admin_node() -> TestNode {
    TestNode::start_with(|c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin_token = Some(TOKEN.into());
        channel_namespaces(c);
    })
    .await
}

/// `chat:room/1` in a path segment.
const ROOM: &str = "chat:room/1";
const ROOM_PATH: &str = "chat%3Aroom%2F1";

/// The subscriber count `GET /channels` gives for `channel`, if listed.
async fn listed(admin: std::net::SocketAddr, channel: &str) -> Option<u64> {
    let response = http(admin, "GET", "/channels", Some(TOKEN), None).await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == channel)
        .map(|c| c["subscribers"].as_u64().unwrap())
}

/// The client ids in a presence answer, sorted.
fn member_ids(presence: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["client_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

fn sorted_ids(clients: &[&Client]) -> Vec<String> {
    let mut ids: Vec<String> = clients.iter().map(|c| c.client_id().to_string()).collect();
    ids.sort();
    ids
}

/// Asserts `response` is `status` with a JSON error mentioning `needle`.
fn assert_error(response: &common::HttpResponse, status: u16, needle: &str) {
    assert_eq!(response.status, status, "{}", response.body);
    let message = response.json()["error"].as_str().unwrap().to_owned();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

#[tokio::test]
async fn admin_api_lists_channels_and_their_members() {
    let node = channel_admin_node().await;
    let admin = node.admin_addr.unwrap();
    let alice = node.connect("alice").await;
    let bob = node.connect("bob").await;
    let carol = node.connect("carol").await;
    assert_eq!(alice.subscribe(ROOM, false).await.unwrap(), Some(1));
    assert_eq!(bob.subscribe(ROOM, false).await.unwrap(), Some(2));
    carol.subscribe("lobby", false).await.unwrap();
    carol.subscribe("quiet:corner", false).await.unwrap();

    let list = http(admin, "GET", "/channels", Some(TOKEN), None).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(
        list.json(),
        serde_json::json!({"channels": [
            {"channel": ROOM, "subscribers": 2},
            {"channel": "lobby", "subscribers": 1},
            {"channel": "quiet:corner", "subscribers": 1},
        ], "offset": 0, "limit": 1000, "next_offset": null})
    );
    // A page at a time.
    let first = http(admin, "GET", "/channels?limit=2", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(first["channels"].as_array().unwrap().len(), 2);
    assert_eq!(first["next_offset"], 2);
    let rest = http(
        admin,
        "GET",
        "/channels?offset=2&limit=2",
        Some(TOKEN),
        None,
    )
    .await
    .json();
    assert_eq!(rest["channels"][0]["channel"], "quiet:corner");
    assert_eq!(rest["next_offset"], serde_json::Value::Null);
    let bad = http(admin, "GET", "/channels?limit=0", Some(TOKEN), None).await;
    assert_eq!(bad.status, 400);

    // The percent-encoded segment is the channel's real name.
    let presence = http(
        admin,
        "GET",
        &format!("/channels/{ROOM_PATH}/presence"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(presence.status, 200, "{}", presence.body);
    let presence = presence.json();
    assert_eq!(presence["channel"], ROOM);
    assert_eq!(presence["truncated"], false);
    assert_eq!(member_ids(&presence), sorted_ids(&[&alice, &bob]));
    let member = presence["members"][0].as_object().unwrap();
    let mut fields: Vec<&str> = member.keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        ["client_id", "connected_at_ms", "name", "node_id", "user"]
    );
    assert_eq!(member["node_id"], node.id().to_string());
    let one = http(
        admin,
        "GET",
        &format!("/channels/{ROOM_PATH}/presence?limit=1"),
        Some(TOKEN),
        None,
    )
    .await
    .json();
    assert_eq!(one["members"].as_array().unwrap().len(), 1);
    assert_eq!(one["truncated"], true);
    let nobody = http(admin, "GET", "/channels/empty/presence", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(nobody["members"], serde_json::json!([]));

    let path = |channel: &str| format!("/channels/{channel}/presence");
    for (channel, status, why) in [
        ("quiet%3Acorner", 409, "presence is off"),
        ("nope%3Ax", 400, "not declared"),
        ("two%20words", 400, "space"),
        ("%FF", 400, "UTF-8"),
    ] {
        let response = http(admin, "GET", &path(channel), Some(TOKEN), None).await;
        assert_error(&response, status, why);
    }
    for query in ["limit=0", "limit=1001", "limit=x"] {
        let response = http(
            admin,
            "GET",
            &format!("{}?{query}", path("lobby")),
            Some(TOKEN),
            None,
        )
        .await;
        assert_error(&response, 400, "limit");
    }
    // An unencoded `/` splits the name: no such endpoint.
    assert_eq!(
        http(admin, "GET", &path("chat:room/1"), Some(TOKEN), None)
            .await
            .status,
        404
    );
    for path in ["/channels", "/channels/lobby/presence"] {
        assert_eq!(http(admin, "GET", path, None, None).await.status, 401);
    }

    // Counts follow unsubscriptions; a channel nobody is left in goes.
    bob.unsubscribe(ROOM).await.unwrap();
    assert_eq!(listed(admin, ROOM).await, Some(1));
    alice.unsubscribe(ROOM).await.unwrap();
    assert_eq!(listed(admin, ROOM).await, None);
    assert_eq!(listed(admin, "lobby").await, Some(1));
}

#[tokio::test]
async fn admin_api_publishes_to_a_channel() {
    let node = channel_admin_node().await;
    let admin = node.admin_addr.unwrap();
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    alice.subscribe("news:alerts", false).await.unwrap();
    bob.subscribe(ROOM, false).await.unwrap();
    // Clients may not publish to `news:`; the server may.
    common::expect_server_error(
        alice
            .publish("news:alerts", Payload::Text("me?".into()), Priority::Normal)
            .await,
        error_code::NOT_ALLOWED,
    );

    let sent = http(
        admin,
        "POST",
        "/channels/news%3Aalerts/publish",
        Some(TOKEN),
        Some(r#"{"text":"storm warning","priority":"high"}"#),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let sent = sent.json();
    assert_eq!(sent["local_subscribers"], 1);
    assert_eq!(sent["cluster"], false);
    let got = next_matching(&mut alice, |f| matches!(f.body, Body::Publish { .. })).await;
    assert_eq!(got.id.to_string(), sent["id"].as_str().unwrap());
    assert_eq!(got.sender, None);
    assert_eq!(got.priority, Priority::High);
    assert_eq!(
        got.body,
        Body::Publish {
            channel: "news:alerts".into(),
            payload: Payload::Text("storm warning".into()),
        }
    );

    let binary = http(
        admin,
        "POST",
        &format!("/channels/{ROOM_PATH}/publish"),
        Some(TOKEN),
        Some(r#"{"binary_base64":"AAEC/w=="}"#),
    )
    .await;
    assert_eq!(binary.status, 200, "{}", binary.body);
    let got = next_matching(&mut bob, |f| matches!(f.body, Body::Publish { .. })).await;
    assert_eq!(got.sender, None);
    assert_eq!(got.priority, Priority::Normal);
    assert_eq!(
        got.body,
        Body::Publish {
            channel: ROOM.into(),
            payload: Payload::Binary(vec![0, 1, 2, 255]),
        }
    );
    // Alice is not in that channel.
    common::assert_none_before_echo(&mut alice, |f| matches!(f.body, Body::Publish { .. })).await;

    let empty = http(
        admin,
        "POST",
        "/channels/nobody-here/publish",
        Some(TOKEN),
        Some(r#"{"text":"hello?"}"#),
    )
    .await;
    assert_eq!(empty.status, 200, "{}", empty.body);
    assert_eq!(empty.json()["local_subscribers"], 0);

    let publish = |channel: &str| format!("/channels/{channel}/publish");
    let text = Some(r#"{"text":"a"}"#);
    for (channel, body, why) in [
        ("nope%3Ax", text, "not declared"),
        ("a%2Ab", text, "`*`"),
        (
            "lobby",
            Some(r#"{"text":"a","binary_base64":"YQ=="}"#),
            "exactly one",
        ),
        ("lobby", Some(r#"{"txt":"a"}"#), "txt"),
        (
            "lobby",
            Some(r#"{"text":"a","priority":"urgent"}"#),
            "urgent",
        ),
        ("lobby", Some(r#"{"binary_base64":"!!"}"#), "binary_base64"),
        ("lobby", Some("not json"), ""),
    ] {
        let response = http(admin, "POST", &publish(channel), Some(TOKEN), body).await;
        assert_error(&response, 400, why);
    }
    let big = format!(
        r#"{{"text":"{}"}}"#,
        "x".repeat(node.config().max_message_bytes + 1)
    );
    let response = http(admin, "POST", &publish("lobby"), Some(TOKEN), Some(&big)).await;
    assert_error(&response, 413, "max_message_bytes");
    assert_eq!(
        http(admin, "POST", &publish("lobby"), None, text)
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn admin_api_unsubscribes_a_client() {
    let node = channel_admin_node().await;
    let admin = node.admin_addr.unwrap();
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    alice.subscribe(ROOM, false).await.unwrap();
    alice.subscribe("lobby", false).await.unwrap();
    bob.subscribe(ROOM, true).await.unwrap();

    let path = |channel: &str, id: &str| format!("/channels/{channel}/subscribers/{id}");
    let alice_id = alice.client_id().to_string();
    let removed = http(
        admin,
        "DELETE",
        &format!("{}?reason=off%20topic", path(ROOM_PATH, &alice_id)),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(
        removed.json(),
        serde_json::json!({
            "client_id": alice_id,
            "channel": ROOM,
            "node_id": node.id().to_string(),
            "status": "unsubscribed",
        })
    );
    let told = next_matching(&mut alice, |f| matches!(f.body, Body::Unsubscribed { .. })).await;
    assert_eq!(
        told.body,
        Body::Unsubscribed {
            channel: ROOM.into(),
            reason: "off topic".into(),
        }
    );
    assert_eq!(alice.subscriptions(), ["lobby"]);
    // Bob asked for events: he sees Alice leave.
    let left = next_matching(&mut bob, |f| matches!(f.body, Body::Leave { .. })).await;
    match left.body {
        Body::Leave { channel, member } => {
            assert_eq!(channel, ROOM);
            assert_eq!(member.client_id, alice.client_id());
        }
        other => panic!("expected Leave, got {other:?}"),
    }
    assert_eq!(listed(admin, ROOM).await, Some(1));

    // A publication now reaches Bob only. Alice's echo comes after
    // anything queued for her before it (same priority, same stream).
    let sent = http(
        admin,
        "POST",
        &format!("/channels/{ROOM_PATH}/publish"),
        Some(TOKEN),
        Some(r#"{"text":"still here?"}"#),
    )
    .await;
    assert_eq!(sent.json()["local_subscribers"], 1);
    next_matching(&mut bob, |f| matches!(f.body, Body::Publish { .. })).await;
    common::assert_none_before_echo(&mut alice, |f| matches!(f.body, Body::Publish { .. })).await;

    let again = http(
        admin,
        "DELETE",
        &path(ROOM_PATH, &alice_id),
        Some(TOKEN),
        None,
    )
    .await;
    assert_error(&again, 404, "not subscribed");
    let stranger = ClientId::new_random().to_string();
    let unknown = http(
        admin,
        "DELETE",
        &path(ROOM_PATH, &stranger),
        Some(TOKEN),
        None,
    )
    .await;
    assert_error(&unknown, 404, "no client");
    for (path, why) in [
        (path(ROOM_PATH, "not-a-uuid"), "client id"),
        (path("nope%3Ax", &alice_id), "not declared"),
        (path("", &alice_id), ""),
        (
            format!("{}?reason=a%0Ab", path("lobby", &alice_id)),
            "control",
        ),
        (
            format!("{}?reason={}", path("lobby", &alice_id), "x".repeat(257)),
            "at most 256",
        ),
    ] {
        let response = http(admin, "DELETE", &path, Some(TOKEN), None).await;
        if why.is_empty() {
            assert!(response.status >= 400, "{path}: {}", response.status);
        } else {
            assert_error(&response, 400, why);
        }
    }
    assert_eq!(
        http(admin, "DELETE", &path("lobby", &alice_id), None, None)
            .await
            .status,
        401
    );
    // Refused requests left the other subscription alone.
    assert_eq!(listed(admin, "lobby").await, Some(1));
}

#[tokio::test]
async fn admin_channel_endpoints_span_the_cluster() {
    use quic_fabric::bus::memory::MemoryCluster;
    use quic_fabric::node::BusChoice;
    let certs = common::TestCerts::new();
    let bus = MemoryCluster::new();
    let n1 = TestNode::start_on(BusChoice::Memory(bus.clone()), Some(&certs), |c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin_token = Some(TOKEN.into());
        channel_namespaces(c);
    })
    .await;
    let n2 = TestNode::start_on(BusChoice::Memory(bus), Some(&certs), channel_namespaces).await;
    let admin = n1.admin_addr.unwrap();
    let mut alice = n1.connect("alice").await;
    let mut bob = n2.connect("bob").await;
    let mut carol = n2.connect("carol").await;
    for client in [&alice, &bob, &carol] {
        client.subscribe(ROOM, false).await.unwrap();
    }

    assert_eq!(listed(admin, ROOM).await, Some(3));
    let presence = http(
        admin,
        "GET",
        &format!("/channels/{ROOM_PATH}/presence"),
        Some(TOKEN),
        None,
    )
    .await
    .json();
    assert_eq!(member_ids(&presence), sorted_ids(&[&alice, &bob, &carol]));

    let sent = http(
        admin,
        "POST",
        &format!("/channels/{ROOM_PATH}/publish"),
        Some(TOKEN),
        Some(r#"{"text":"everyone"}"#),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert_eq!(sent.json()["local_subscribers"], 1);
    assert_eq!(sent.json()["cluster"], true);
    for client in [&mut alice, &mut bob, &mut carol] {
        let got = next_matching(client, |f| matches!(f.body, Body::Publish { .. })).await;
        assert_eq!(got.sender, None);
    }

    // Bob is on the other node: that node is asked to unsubscribe him.
    let removed = http(
        admin,
        "DELETE",
        &format!("/channels/{ROOM_PATH}/subscribers/{}", bob.client_id()),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(removed.status, 202, "{}", removed.body);
    assert_eq!(removed.json()["node_id"], n2.id().to_string());
    assert_eq!(removed.json()["status"], "requested");
    let told = next_matching(&mut bob, |f| matches!(f.body, Body::Unsubscribed { .. })).await;
    assert_eq!(
        told.body,
        Body::Unsubscribed {
            channel: ROOM.into(),
            reason: "unsubscribed by an operator".into(),
        }
    );
    assert_eq!(listed(admin, ROOM).await, Some(2));

    // Carol, on Bob's node, gets the next publication; by the time she
    // has, Bob's node has queued whatever it would give him before his echo.
    http(
        admin,
        "POST",
        &format!("/channels/{ROOM_PATH}/publish"),
        Some(TOKEN),
        Some(r#"{"text":"without bob"}"#),
    )
    .await;
    next_matching(&mut carol, |f| matches!(f.body, Body::Publish { .. })).await;
    common::assert_none_before_echo(&mut bob, |f| matches!(f.body, Body::Publish { .. })).await;
}

#[tokio::test]
async fn channel_gauges_follow_subscriptions() {
    let node = TestNode::start_with(|c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let before = scrape(&node).await;
    for name in ["fabric_channels_subscribed", "fabric_channel_subscriptions"] {
        assert!(
            before.contains(&format!("\n{name} 0\n")),
            "{name} in\n{before}"
        );
    }
    let mut alice = node.connect("alice").await;
    let mut bob = node.connect("bob").await;
    alice.subscribe("a", false).await.unwrap();
    alice.subscribe("b", false).await.unwrap();
    bob.subscribe("a", false).await.unwrap();
    alice
        .publish("a", Payload::Text("hi".into()), Priority::Normal)
        .await
        .unwrap();
    for client in [&mut alice, &mut bob] {
        next_matching(client, |f| matches!(f.body, Body::Publish { .. })).await;
    }

    let after = scrape(&node).await;
    assert_eq!(sample(&after, "fabric_channels_subscribed"), 2.0);
    assert_eq!(sample(&after, "fabric_channel_subscriptions"), 3.0);
    assert_eq!(
        sample(
            &after,
            "fabric_namespace_subscriptions{namespace=\"default\"}"
        ),
        3.0
    );
    // (Version 3 clients subscribe with SubscribeSince.)
    assert_eq!(
        sample(&after, "fabric_messages_in_total{type=\"subscribe_since\"}"),
        3.0
    );
    assert_eq!(
        sample(&after, "fabric_messages_out_total{type=\"subscribed\"}"),
        3.0
    );
    // One publication in, one copy out per subscriber (the publisher too).
    assert_eq!(
        sample(&after, "fabric_messages_in_total{type=\"publish\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "fabric_messages_out_total{type=\"publish\"}"),
        2.0
    );

    bob.close("done").await;
    common::eventually(WAIT, "bob's subscription gone from the gauge", || async {
        sample(&scrape(&node).await, "fabric_channel_subscriptions") == 2.0
    })
    .await;
    assert_eq!(
        sample(&scrape(&node).await, "fabric_channels_subscribed"),
        2.0
    );
    alice.unsubscribe("b").await.unwrap();
    let last = scrape(&node).await;
    assert_eq!(sample(&last, "fabric_channels_subscribed"), 1.0);
    assert_eq!(sample(&last, "fabric_channel_subscriptions"), 1.0);
}

/// A lone node keeps history too: `GET /channels/{c}/history` gives the
/// latest publications (the client's and the server's) as `fabric sub`
/// lines with their epoch and offset, pages back with `before`, checks
/// `limit` against the history size, and refuses a namespace without
/// history.
#[tokio::test]
async fn admin_api_reads_a_channels_history() {
    let node = TestNode::start_with(|c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin_token = Some(TOKEN.into());
        c.history_size = 3;
        c.history_ttl = Duration::from_secs(60);
        channel_namespaces(c);
    })
    .await;
    let admin = node.admin_addr.unwrap();
    let alice = node.connect("alice").await;
    for i in 0..4 {
        alice
            .publish("room", Payload::Text(format!("m{i}")), Priority::Normal)
            .await
            .unwrap();
    }
    let sent = http(
        admin,
        "POST",
        "/channels/room/publish",
        Some(TOKEN),
        Some(r#"{"binary_base64":"AAEC/w==","priority":"high"}"#),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);

    let read = http(admin, "GET", "/channels/room/history", Some(TOKEN), None).await;
    assert_eq!(read.status, 200, "{}", read.body);
    let page = read.json();
    assert_eq!(page["channel"], "room");
    assert_eq!(page["offset"], 5);
    let epoch = page["epoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 16, "{epoch}");
    assert_eq!(page["more"], false, "the 3 kept are all there");
    let publications = page["publications"].as_array().unwrap();
    let offsets: Vec<u64> = publications
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4, 5]);
    for p in publications {
        assert_eq!(p["type"], "publication");
        assert_eq!(p["channel"], "room");
        assert_eq!(p["epoch"], epoch.as_str());
    }
    assert_eq!(publications[0]["text"], "m2");
    assert_eq!(
        publications[0]["from"]["client_id"],
        alice.client_id().to_string()
    );
    assert_eq!(publications[2]["binary"], "AAEC/w==");
    assert_eq!(publications[2]["from"], serde_json::Value::Null);
    assert_eq!(publications[2]["priority"], "high");
    assert_eq!(publications[2]["id"], sent.json()["id"]);

    let read = http(
        admin,
        "GET",
        "/channels/room/history?limit=1",
        Some(TOKEN),
        None,
    )
    .await;
    let page = read.json();
    assert_eq!(page["publications"][0]["offset"], 5);
    assert_eq!(page["more"], true);
    let read = http(
        admin,
        "GET",
        "/channels/room/history?limit=2&before=5",
        Some(TOKEN),
        None,
    )
    .await;
    let page = read.json();
    let offsets: Vec<u64> = page["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4]);
    assert_eq!(page["more"], false, "1 and 2 are no longer kept");

    for bad in ["limit=0", "limit=4"] {
        let read = http(
            admin,
            "GET",
            &format!("/channels/room/history?{bad}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(read.status, 400, "{bad}: {}", read.body);
        assert!(read.body.contains("limit must be 1..=3"), "{}", read.body);
    }
    let read = http(
        admin,
        "GET",
        "/channels/chat%3Aroom/history",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(read.status, 409, "{}", read.body);
    assert!(read.body.contains("history is off"), "{}", read.body);
}
