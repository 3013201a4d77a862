//! Opt-in automatic reconnect of the client library.

mod common;

use std::time::Duration;

use common::{TestCerts, TestNode, WAIT};
use quic_fabric::client::{Client, ClientConfig, Event, ReconnectPolicy};
use quic_fabric::server::BusChoice;

fn policy() -> ReconnectPolicy {
    ReconnectPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_attempts: None,
    }
}

async fn node_at(certs: &TestCerts, addr: std::net::SocketAddr, name: &str) -> TestNode {
    let name = name.to_owned();
    TestNode::start_on(BusChoice::FromConfig, Some(certs), move |c| {
        c.listen = addr;
        c.name = name;
    })
    .await
}

async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("event in time")
        .expect("event stream open")
}

#[tokio::test]
async fn a_client_reconnects_to_whatever_answers_at_the_same_address() {
    let certs = TestCerts::new();
    let mut first = node_at(&certs, "127.0.0.1:0".parse().unwrap(), "first").await;
    let addr = first.addr;
    let mut config = ClientConfig::new(addr.to_string(), certs.dir.path().join("ca.pem"))
        .name("phoenix")
        .reconnect(policy());
    config.connect_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(3);
    let mut client = Client::connect(&config).await.unwrap();
    let old_id = client.client_id();
    assert_eq!(client.node_id(), first.shared.node_id);

    first.stop().await;
    // A Goodbye with the reconnect cue: the client leaves by itself at once
    // (it does not wait for the node's grace period to run out).
    let mut goodbye = false;
    loop {
        match next_event(&mut client).await {
            Event::Frame(frame) => {
                if let quic_fabric::protocol::Body::Goodbye { reconnect, .. } = frame.body {
                    assert!(reconnect);
                    goodbye = true;
                }
            }
            Event::Disconnected { reason, .. } => {
                assert!(goodbye, "Goodbye before the disconnect ({reason})");
                assert!(reason.contains("at the node's request"), "{reason}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A request made while reconnecting waits for the new connection, but
    // only up to the request timeout: with nobody answering it fails
    // instead of hanging.
    assert!(client.ping().await.is_err());
    // When a node comes back within the request timeout, the request made
    // in the gap goes out on the new connection and succeeds.
    let (pinged, second) = tokio::join!(client.ping(), node_at(&certs, addr, "second"));
    pinged.expect("the request made while reconnecting succeeds once reconnected");
    match next_event(&mut client).await {
        Event::Reconnected { client_id, node_id } => {
            assert_ne!(client_id, old_id, "a new connection gets a new id");
            assert_eq!(node_id, second.shared.node_id);
            assert_eq!(client.client_id(), client_id);
            assert_eq!(client.handshake().server_name, "second");
        }
        other => panic!("expected Reconnected, got {other:?}"),
    }
    client.ping().await.unwrap();
    let (clients, _) = client.list().await.unwrap();
    assert_eq!(clients.len(), 1);
    assert_eq!(
        clients[0].name, "phoenix",
        "the name survives the reconnect"
    );
}

#[tokio::test]
async fn without_a_policy_the_connection_just_ends() {
    let mut node = TestNode::start().await;
    let mut client = node.connect("mortal").await;
    node.stop().await;
    loop {
        match next_event(&mut client).await {
            Event::Frame(_) => {}
            Event::Closed { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let after = tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("stream ends");
    assert!(after.is_none(), "nothing follows Closed: {after:?}");
}

#[tokio::test]
async fn reconnecting_gives_up_after_max_attempts() {
    let certs = TestCerts::new();
    let mut node = node_at(&certs, "127.0.0.1:0".parse().unwrap(), "only").await;
    let mut config = ClientConfig::new(node.addr.to_string(), certs.dir.path().join("ca.pem"))
        .reconnect(ReconnectPolicy {
            max_attempts: Some(2),
            ..policy()
        });
    config.connect_timeout = Duration::from_millis(300);
    let mut client = Client::connect(&config).await.unwrap();
    node.stop().await;
    loop {
        match next_event(&mut client).await {
            Event::Frame(_) | Event::Disconnected { .. } => {}
            Event::Closed { reason, .. } => {
                assert!(reason.contains("gave up"), "{reason}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
