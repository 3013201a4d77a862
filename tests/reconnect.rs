//! Opt-in automatic reconnect of the client library.

mod common;

use std::time::Duration;

use common::{TestCerts, TestNode, WAIT};
use quic_fabric::client::{Client, ClientConfig, Event, ReconnectPolicy};
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::SessionOutcome;

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
    assert_eq!(client.node_id(), first.id());

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
        Event::Reconnected {
            client_id,
            node_id,
            session,
        } => {
            // A lone node that restarted has no memory of the session.
            assert_eq!(session, Some(SessionOutcome::Expired));
            assert_ne!(client_id, old_id, "a forgotten session gets a new id");
            assert_eq!(node_id, second.id());
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

/// A node process killed with SIGKILL: the client's next request must end
/// with `Closed` (its connection is gone), never with a bare `Timeout`,
/// whether the request timeout is shorter than the idle timeout or equal.
#[tokio::test]
async fn a_request_to_a_node_that_died_ends_closed_not_timed_out() {
    let certs = TestCerts::new();
    for (request, idle) in [(1, 10), (3, 3)] {
        let mut node = common::NodeProcess::start(certs.dir.path(), &[]).await;
        let mut config = node.client_config("orphan");
        config.request_timeout = Duration::from_secs(request);
        config.idle_timeout = Duration::from_secs(idle);
        let client = Client::connect(&config).await.unwrap();
        client.ping().await.unwrap();
        node.kill().await;
        let started = std::time::Instant::now();
        let result = client.ping().await;
        assert!(
            matches!(result, Err(quic_fabric::client::ClientError::Closed { .. })),
            "request {request}s / idle {idle}s: expected Closed, got {result:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(request + 2),
            "answered only after {:?}",
            started.elapsed()
        );
    }
}

/// After the node closed it for rate-limit abuse (close code 10), the
/// library waits before reconnecting instead of coming back at once with
/// a fresh connection.
#[tokio::test]
async fn a_client_closed_for_flooding_backs_off_before_reconnecting() {
    let node = TestNode::start_with(|c| {
        c.rate_limit_messages = 10;
        c.rate_limit_burst = 5;
        c.rate_limit_strikes = 20;
    })
    .await;
    let config = node.client_config("flooder").reconnect(policy());
    let mut client = Client::connect(&config).await.unwrap();
    // Far past burst and strikes, without waiting for answers.
    let mut pending = Vec::new();
    for _ in 0..100 {
        match client
            .submit(
                quic_fabric::protocol::Priority::Normal,
                quic_fabric::protocol::Body::Ping,
            )
            .await
        {
            Ok(p) => pending.push(p),
            Err(_) => break,
        }
    }
    let disconnected = loop {
        match next_event(&mut client).await {
            Event::Disconnected { code, .. } => {
                assert_eq!(code, Some(quic_fabric::protocol::close_code::RATE_LIMITED));
                break std::time::Instant::now();
            }
            Event::Frame(_) => {}
            other => panic!("expected a disconnect, got {other:?}"),
        }
    };
    loop {
        match next_event(&mut client).await {
            Event::Reconnected { .. } => break,
            Event::Frame(_) => {}
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
    let waited = disconnected.elapsed();
    assert!(
        waited >= quic_fabric::client::RATE_LIMITED_BACKOFF,
        "reconnected {waited:?} after close 10"
    );
    drop(pending);
}

#[tokio::test]
async fn a_reconnect_dials_from_another_source_port() {
    // A load balancer that hashes the source address and port must be
    // able to place a reconnecting client anew, even though clients share
    // the library's socket pool.
    let certs = TestCerts::new();
    let mut first = node_at(&certs, "127.0.0.1:0".parse().unwrap(), "first").await;
    let addr = first.addr;
    let mut config =
        ClientConfig::new(addr.to_string(), certs.dir.path().join("ca.pem")).reconnect(policy());
    config.connect_timeout = Duration::from_secs(1);
    let mut client = Client::connect(&config).await.unwrap();
    let before = client.local_addr().unwrap().port();
    first.stop().await;
    loop {
        if let Event::Disconnected { .. } = next_event(&mut client).await {
            break;
        }
    }
    let _second = node_at(&certs, addr, "second").await;
    loop {
        match next_event(&mut client).await {
            Event::Reconnected { .. } => break,
            Event::Frame(_) => {}
            other => panic!("expected Reconnected, got {other:?}"),
        }
    }
    let after = client.local_addr().unwrap().port();
    assert_ne!(before, after, "the reconnect dials from another port");
    client.ping().await.unwrap();
}
