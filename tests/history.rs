//! Channel history and recovery across reconnects (protocol version 3),
//! against real Redis and real node processes: a subscriber whose node is
//! killed (SIGKILL) or drained (SIGTERM) mid-stream reconnects to another
//! node and ends with every publication exactly once, in order; history
//! requests; version 2 clients beside version 3 ones; an idempotent
//! publication whose answer was lost, sent again by the library on another
//! node and handled once. The recovery
//! decisions on both bus engines are in the shared scenarios
//! (`tests/common/scenarios.rs`).

mod common;

use std::time::Duration;

use common::redis::{TestRedis, redis_node_process};
use common::{TestCerts, TestNode, expect_server_error, next_matching};
use quic_fabric::client::{Client, Event, ReconnectPolicy};
use quic_fabric::protocol::{Body, Payload, Priority, Recovery, error_code};

const HISTORY: &str = "h,history_size=5000,history_ttl=10m";

/// How the subscriber loses its node.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// The node is killed (SIGKILL).
    Kill,
    /// The node drains (SIGTERM): Goodbye, then the connection closes.
    Drain,
    /// The subscriber's network goes: nothing gets through any more, and
    /// the node stays up (it keeps the dead connection until its idle
    /// timeout).
    Network,
}

/// 2,000 numbered publications from a publisher on node A; the subscriber
/// is on node B, which goes away (`loss`) after ~700 reached it; the
/// subscriber reconnects to node C by itself and must end with all 2,000,
/// in order, none twice, told that the recovery was complete.
async fn recovers_every_publication_once_in_order(loss: Loss) {
    const COUNT: usize = 2000;
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let ttl = Duration::from_secs(3);
    let args = ["--namespaces", HISTORY];
    let a = redis_node_process(&redis, &certs, ttl, &args).await;
    let b = redis_node_process(&redis, &certs, ttl, &args).await;
    let c = redis_node_process(&redis, &certs, ttl, &args).await;

    let mut config = common::resilient(b.client_config("sub"), vec![c.addr.clone()], 2 * COUNT);
    let proxy = common::UdpProxy::start(b.addr.parse().unwrap()).await;
    if let Loss::Network = loss {
        config.server = proxy.addr.to_string();
    }
    let mut sub = Client::connect(&config).await.unwrap();
    let first = sub.subscribe_since("h:feed", false, None).await.unwrap();
    assert_eq!(first.recovery, Recovery::NotRequested);
    let start = first
        .position
        .expect("a channel with history has a position");

    let publisher = a.connect("pub").await;
    let publishing = tokio::spawn(async move {
        for i in 1..=COUNT {
            publisher
                .publish("h:feed", Payload::Text(i.to_string()), Priority::Normal)
                .await
                .unwrap_or_else(|e| panic!("publication {i} not acknowledged: {e}"));
        }
        publisher
    });

    let mut b = Some(b);
    let mut lost = false;
    let mut got: Vec<usize> = Vec::with_capacity(COUNT);
    let mut recoveries = Vec::new();
    let mut reconnected_to = None;
    let collect = async {
        while got.len() < COUNT {
            match sub.next_event().await.expect("events go on") {
                Event::Frame(frame) => {
                    if let Body::Publication {
                        payload: Payload::Text(text),
                        position,
                        ..
                    } = &frame.body
                    {
                        assert_eq!(position.epoch, start.epoch);
                        got.push(text.parse().unwrap());
                    }
                }
                Event::Subscribed { recovery, .. } => recoveries.push(recovery),
                Event::Reconnected { node_id, .. } => reconnected_to = Some(node_id),
                Event::Closed { reason, .. } => panic!("closed: {reason}"),
                _ => {}
            }
            if got.len() >= 700
                && !lost
                && let Some(mut node) = b.take()
            {
                lost = true;
                match loss {
                    Loss::Kill => node.kill().await,
                    Loss::Drain => {
                        tokio::spawn(node.terminate());
                    }
                    Loss::Network => {
                        proxy.cut();
                        // B stays up (dropped at the end of the test).
                        b = Some(node);
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), collect)
        .await
        .unwrap_or_else(|_| panic!("only {} of {COUNT} arrived", got.len()));
    let _publisher = publishing.await.unwrap();
    let expected: Vec<usize> = (1..=COUNT).collect();
    assert_eq!(got, expected, "every publication once, in order");
    assert!(reconnected_to.is_some(), "the subscriber moved to node C");
    assert_eq!(recoveries, vec![Recovery::Recovered]);
    assert_eq!(
        sub.position("h:feed").unwrap().offset,
        start.offset + COUNT as u64
    );
    drop((a, b, c, proxy));
    redis.remove().await;
}

#[tokio::test]
async fn a_subscriber_whose_node_is_killed_recovers_every_publication_on_another_node() {
    recovers_every_publication_once_in_order(Loss::Kill).await;
}

#[tokio::test]
async fn a_subscriber_whose_node_drains_recovers_every_publication_on_another_node() {
    recovers_every_publication_once_in_order(Loss::Drain).await;
}

#[tokio::test]
async fn a_subscriber_that_loses_its_network_recovers_every_publication_on_another_node() {
    recovers_every_publication_once_in_order(Loss::Network).await;
}

fn text_of(frame: &quic_fabric::protocol::Frame) -> String {
    match &frame.body {
        Body::Publication {
            payload: Payload::Text(text),
            ..
        }
        | Body::Publish {
            payload: Payload::Text(text),
            ..
        } => text.clone(),
        other => panic!("not a publication: {other:?}"),
    }
}

/// History requests: the latest publications as Publication frames with
/// their positions, paged with `before`, capped by `max_history_page`;
/// refused where the namespace keeps none.
#[tokio::test]
async fn history_requests_page_back_through_a_channels_history() {
    let node = TestNode::start_with(|c| {
        c.namespaces = vec!["h,history_size=50,history_ttl=10m".parse().unwrap()];
        c.max_history_page = 20;
    })
    .await;
    let client = node.connect("reader").await;
    for i in 1..=30 {
        client
            .publish("h:log", Payload::Text(i.to_string()), Priority::Normal)
            .await
            .unwrap();
    }
    let (frames, position, more) = client.history("h:log", 5, None).await.unwrap();
    assert_eq!(position.offset, 30);
    assert!(more);
    let texts: Vec<String> = frames.iter().map(text_of).collect();
    assert_eq!(texts, ["26", "27", "28", "29", "30"]);
    for (frame, offset) in frames.iter().zip(26..) {
        match &frame.body {
            Body::Publication { position: p, .. } => {
                assert_eq!((p.epoch, p.offset), (position.epoch, offset));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(frame.sender.as_ref().unwrap().client_id, client.client_id());
    }
    let (frames, _, more) = client.history("h:log", 20, Some(26)).await.unwrap();
    assert_eq!(frames.len(), 20);
    assert_eq!(text_of(&frames[0]), "6");
    assert!(more);
    let (frames, _, more) = client.history("h:log", 20, Some(6)).await.unwrap();
    assert_eq!(
        frames.iter().map(text_of).collect::<Vec<_>>(),
        ["1", "2", "3", "4", "5"]
    );
    assert!(!more);
    let message = expect_server_error(
        client.history("h:log", 21, None).await,
        error_code::INVALID_FIELD,
    );
    assert!(message.contains("limit must be 1..=20"), "{message}");
    let message = expect_server_error(
        client.history("room", 5, None).await,
        error_code::NOT_ALLOWED,
    );
    assert!(message.contains("history is off"), "{message}");
    expect_server_error(
        client.history("nope:x", 5, None).await,
        error_code::UNKNOWN_NAMESPACE,
    );
}

/// A version 2 client beside version 3 ones in a channel with history:
/// it gets Publish frames (no positions), in the same order; version 3
/// frames are unknown to it, naming the version they need.
#[tokio::test]
async fn a_version_2_client_gets_publish_frames_and_cannot_send_version_3_ones() {
    let node = TestNode::start_with(|c| {
        c.namespaces = vec!["h,history_size=50,history_ttl=10m".parse().unwrap()];
    })
    .await;
    let mut config = node.client_config("old");
    config.max_version = 2;
    let mut old = Client::connect(&config).await.unwrap();
    assert_eq!(old.handshake().version, 2);
    let mut new = node.connect("new").await;
    assert_eq!(new.handshake().version, 3);
    old.subscribe("h:room", false).await.unwrap();
    new.subscribe("h:room", false).await.unwrap();
    let id = new
        .publish("h:room", Payload::Text("hi".into()), Priority::Normal)
        .await
        .unwrap();
    let got = next_matching(&mut old, |f| f.id == id).await;
    assert!(matches!(got.body, Body::Publish { .. }), "{got:?}");
    let got = next_matching(&mut new, |f| f.id == id).await;
    match got.body {
        Body::Publication { position, .. } => assert_eq!(position.offset, 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(new.position("h:room").unwrap().offset, 1);
    let message = expect_server_error(
        old.subscribe_since("h:room", false, None).await,
        error_code::UNKNOWN_FRAME_TYPE,
    );
    assert!(
        message.contains(
            "subscribe_since frames need protocol version 3; this connection speaks version 2"
        ),
        "{message}"
    );
    let message = expect_server_error(
        old.history("h:room", 5, None).await,
        error_code::UNKNOWN_FRAME_TYPE,
    );
    assert!(message.contains("need protocol version 3"), "{message}");
    old.ping().await.unwrap();
}

/// The library publishes; the node gets it (and publishes it) but its
/// answer is lost on the way back; the client's connection times out, it
/// reconnects to another node and sends the same Idempotent frame again:
/// the application gets its Ack, and the subscriber the publication once.
#[tokio::test]
async fn a_publication_whose_answer_was_lost_is_sent_again_and_handled_once() {
    use common::cluster::Cluster;
    use common::redis::RedisNodes;
    let cluster = RedisNodes::start(2).await;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut sub = n2.connect("sub").await;
    sub.subscribe("room", false).await.unwrap();
    let proxy = common::UdpProxy::start(n1.addr).await;
    let mut config = n1.client_config("pub");
    config.server = proxy.addr.to_string();
    config.server_name = Some("localhost".into());
    config.servers = vec![n2.addr.to_string()];
    config.idle_timeout = Duration::from_millis(800);
    config.keep_alive_interval = Duration::from_millis(200);
    config.request_timeout = Duration::from_secs(5);
    config.reconnect = Some(ReconnectPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_attempts: Some(20),
    });
    let publisher = Client::connect(&config).await.unwrap();
    let before = publisher.node_id();
    proxy.cut_downstream();
    let id = tokio::time::timeout(
        Duration::from_secs(20),
        publisher.publish("room", Payload::Text("once".into()), Priority::Normal),
    )
    .await
    .expect("answered after the reconnect")
    .expect("acknowledged, not Closed");
    assert_ne!(publisher.node_id(), before, "answered by the other node");
    let got = next_matching(&mut sub, |f| f.id == id).await;
    assert_eq!(text_of(&got), "once");
    common::assert_none_before_echo(&mut sub, |f| f.id == id).await;
    drop(proxy);
    cluster.finish().await;
}

/// Appends one publication with the node's own script on `conn`; returns
/// its position (epoch, offset).
async fn append_with_script(conn: &mut redis::aio::MultiplexedConnection, n: u8) -> (u64, u64) {
    let script = redis::Script::new(quic_fabric::bus::redis_bus::PUBLISH_HISTORY_SOURCE);
    let fresh = u64::from(n) << 32 | 0xfab;
    let (position, _): (Vec<u8>, i64) = script
        .key("t:hist:c")
        .key("t:hist-meta:c")
        .arg(vec![n; 8])
        .arg(100)
        .arg(60_000)
        .arg(60_000)
        .arg(fresh.to_le_bytes().to_vec())
        .arg("t:ch:chan:c")
        .invoke_async(conn)
        .await
        .unwrap();
    let word = |i: usize| u64::from_le_bytes(position[i..i + 8].try_into().unwrap());
    (word(0), word(8))
}

/// A channel's history goes on in its epoch on a server restarted from its
/// own disk (a new replication id, no previous one), and starts a new
/// epoch on a promoted replica (whose previous replication id is the one
/// that last wrote it): the old master may have taken publications the
/// replica never got, and their offsets must not be reused.
#[tokio::test]
async fn a_promoted_replica_starts_a_new_epoch_and_a_restarted_master_does_not() {
    let redis = TestRedis::start().await;
    let mut conn = redis.conn().await;
    let (epoch, first) = append_with_script(&mut conn, 1).await;
    assert_eq!(first, 1);
    // The last writer's id differs, but this server was never a replica:
    // as after a restart from disk, the history goes on.
    let _: () = redis::cmd("HSET")
        .arg("t:hist-meta:c")
        .arg("r")
        .arg("0123456789abcdef0123456789abcdef01234567")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(append_with_script(&mut conn, 2).await, (epoch, 2));
    // A replica (of nothing reachable) promoted again: its previous
    // replication id is the one that wrote the history.
    for args in [&["127.0.0.1", "1"][..], &["NO", "ONE"][..]] {
        let _: () = redis::cmd("REPLICAOF")
            .arg(args)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let (new_epoch, offset) = append_with_script(&mut conn, 3).await;
    assert_ne!(new_epoch, epoch, "a new epoch after the promotion");
    assert_eq!(offset, 1, "the new epoch starts at offset 1");
    let kept: usize = redis::cmd("XLEN")
        .arg("t:hist:c")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        kept, 1,
        "the old epoch's entries are not served in the new one"
    );
    // And goes on in it.
    assert_eq!(append_with_script(&mut conn, 4).await, (new_epoch, 2));
    redis.remove().await;
}
