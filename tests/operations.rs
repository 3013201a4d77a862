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
