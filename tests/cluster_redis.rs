//! Nodes sharing a real Redis (testcontainers): the cross-node scenarios
//! shared with `tests/cluster_memory.rs` (`tests/common/scenarios.rs`:
//! broadcast, direct in order, unknown target, list, a node leaving), then
//! what only Redis has: node death by TTL (clients and channel members),
//! Redis outages and recovery (channels resubscribed), `rediss://`, the
//! command cost per message, selective channel subscriptions, the admin
//! API over the cluster, a node restarted with its id.
//!
//! The image comes from `FABRIC_REDIS_IMAGE` (default `redis:7`); on a
//! machine without a registry, `cluster/images.sh redis` builds it from
//! Debian packages (the README's test command runs it).

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::redis::{
    NODE_TTL, RedisNodes, TestRedis, free_tcp_port, pubsub_clients, redis_image, redis_node,
    redis_node_process, wait_listed, wait_ready,
};
use common::{
    TestCerts, TestNode, WAIT, deliver, directs_arrive_in_order, eventually, expect_refused,
    expect_unknown, next_matching,
};
use quic_fabric::bus::ClusterBus;
use quic_fabric::client::{ClientError, Event};
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{Body, ClientId, Payload, Priority, error_code};
use testcontainers_modules::redis::Redis;
use testcontainers_modules::testcontainers::ImageExt;
use testcontainers_modules::testcontainers::core::IntoContainerPort;
use testcontainers_modules::testcontainers::runners::AsyncRunner;

cluster_scenarios!(RedisNodes);

#[tokio::test]
async fn a_killed_node_leaves_presence_within_its_ttl_and_gets_nothing_routed() {
    let cluster = RedisNodes::start(1).await;
    let n1 = &cluster.nodes[0];
    // The victim is a real process, so it can die by SIGKILL.
    let mut victim = redis_node_process(
        &cluster.redis,
        &cluster.certs,
        NODE_TTL,
        &["--name", "victim"],
    )
    .await;
    let mut doomed = victim.connect("doomed").await;
    let a = n1.connect("a").await;
    wait_listed(&a, &[a.client_id(), doomed.client_id()]).await;
    deliver(&a, &mut doomed, "alive?").await;

    victim.kill().await;
    let killed_at = tokio::time::Instant::now();
    // Gone from presence by TTL alone (nobody cleaned up).
    wait_listed(&a, &[a.client_id()]).await;
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after < NODE_TTL * 4,
        "presence outlived the TTL by far: {gone_after:?}"
    );
    // Nothing is routed to the dead node: the sender learns the client is gone.
    expect_unknown(&a, doomed.client_id()).await;
    cluster.finish().await;
}

/// How many nodes subscribe to fabric channel `channel`'s publications in
/// Redis.
async fn channel_subscribers(url: &str, channel: &str) -> i64 {
    numsub(url, &format!("fabric:ch:chan:{channel}")).await
}

/// How many nodes subscribe to fabric channel `channel`'s Join and Leave
/// events in Redis.
async fn event_subscribers(url: &str, channel: &str) -> i64 {
    numsub(url, &format!("fabric:ch:chan-events:{channel}")).await
}

async fn numsub(url: &str, name: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(name)
        .query_async(&mut conn)
        .await
        .unwrap();
    counts[0].1
}

fn is_publication(frame: &quic_fabric::protocol::Frame) -> bool {
    matches!(frame.body, Body::Publish { .. })
}

#[tokio::test]
async fn a_node_without_subscribers_of_a_channel_receives_none_of_its_traffic() {
    let cluster = RedisNodes::start(3).await;
    let url = &cluster.redis.url;
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let mut s1 = n1.connect("s1").await;
    let mut s2 = n2.connect("s2").await;
    let publisher = n3.connect("p").await;
    assert_eq!(channel_subscribers(url, "room").await, 0);
    s1.subscribe("room", false).await.unwrap();
    s2.subscribe("room", false).await.unwrap();
    // One Redis subscription per node that has subscribers, none on n3.
    assert_eq!(channel_subscribers(url, "room").await, 2);

    let received = |node: &TestNode| quic_fabric::stats::get(&node.stats().pubsub_in);
    let before = [received(n1), received(n2), received(n3)];
    let published_before = publishes(url).await;
    const COUNT: u64 = 50;
    for i in 0..COUNT {
        publisher
            .publish("room", Payload::Text(i.to_string()), Priority::Normal)
            .await
            .unwrap();
    }
    for s in [&mut s1, &mut s2] {
        for i in 0..COUNT {
            let got = next_matching(s, is_publication).await;
            assert_eq!(
                got.body,
                Body::Publish {
                    channel: "room".into(),
                    payload: Payload::Text(i.to_string())
                }
            );
        }
    }
    assert_eq!(
        publishes(url).await - published_before,
        COUNT,
        "one PUBLISH per publication, whatever the number of nodes"
    );
    let after = [received(n1), received(n2), received(n3)];
    assert_eq!(after[0] - before[0], COUNT, "n1 gets each once");
    assert_eq!(after[1] - before[1], COUNT, "n2 gets each once");
    assert_eq!(after[2] - before[2], 0, "n3 has no subscriber: no traffic");

    // Join and Leave events go only to nodes with a subscriber that asked
    // for them: none so far, then n1 once s1 asks.
    assert_eq!(event_subscribers(url, "room").await, 0);
    s1.subscribe("room", true).await.unwrap();
    assert_eq!(event_subscribers(url, "room").await, 1);
    let before = [received(n1), received(n2), received(n3)];
    let joiner = n3.connect("joiner").await;
    joiner.subscribe("room", false).await.unwrap();
    let joined = next_matching(&mut s1, |f| matches!(f.body, Body::Join { .. })).await;
    assert!(matches!(joined.body, Body::Join { member, .. } if member.name == "joiner"));
    let after = [received(n1), received(n2), received(n3)];
    assert_eq!(
        after[0] - before[0],
        1,
        "n1 takes the Join its subscriber wants"
    );
    assert_eq!(after[1] - before[1], 0, "n2's subscriber wants no events");
    joiner.close("bye").await;
    next_matching(&mut s1, |f| matches!(f.body, Body::Leave { .. })).await;

    // The last local subscriber leaving unsubscribes its node.
    s1.unsubscribe("room").await.unwrap();
    eventually(WAIT, "n1 unsubscribed from Redis", || async {
        channel_subscribers(url, "room").await == 1 && event_subscribers(url, "room").await == 0
    })
    .await;
    s2.close("bye").await;
    eventually(WAIT, "n2 unsubscribed from Redis", || async {
        channel_subscribers(url, "room").await == 0
    })
    .await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_killed_nodes_channel_members_leave_presence_within_its_ttl() {
    let cluster = RedisNodes::start(1).await;
    let n1 = &cluster.nodes[0];
    let mut victim = redis_node_process(
        &cluster.redis,
        &cluster.certs,
        NODE_TTL,
        &["--name", "victim"],
    )
    .await;
    let doomed = victim.connect("doomed").await;
    let a = n1.connect("a").await;
    a.subscribe("room", true).await.unwrap();
    assert_eq!(doomed.subscribe("room", false).await.unwrap(), Some(2));
    let (members, _) = a.presence("room").await.unwrap();
    assert_eq!(members.len(), 2);

    victim.kill().await;
    let killed_at = tokio::time::Instant::now();
    eventually(WAIT, "the dead node's member leaves presence", || async {
        a.presence("room").await.unwrap().0.len() == 1
    })
    .await;
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after < NODE_TTL * 4,
        "channel presence outlived the TTL by far: {gone_after:?}"
    );
    let (members, _) = a.presence("room").await.unwrap();
    assert_eq!(members[0].client_id, a.client_id());
    cluster.finish().await;
}

#[tokio::test]
async fn a_killed_nodes_user_routing_entries_are_swept() {
    const SECRET: &str = common::scenarios::JWT_SECRET;
    let cluster = RedisNodes::start_with(1, |_, c| common::scenarios::with_jwt(0, c)).await;
    let n1 = &cluster.nodes[0];
    let mut victim = redis_node_process(
        &cluster.redis,
        &cluster.certs,
        NODE_TTL,
        &["--name", "victim", "--auth-jwt-secret", SECRET],
    )
    .await;
    let token = |user: &str| {
        quic_fabric::auth::mint_hs256(SECRET, user, Duration::from_secs(600), None, None, &[])
            .unwrap()
    };
    let mut config = victim.client_config("doomed");
    config.token = Some(token("dora"));
    let doomed = quic_fabric::client::Client::connect(&config).await.unwrap();
    let users_of_victim = format!("fabric:node:{}:users", doomed.node_id());
    let mut config = n1.client_config("sender");
    config.token = Some(token("sam"));
    let sender = quic_fabric::client::Client::connect(&config).await.unwrap();
    sender
        .send_to_user("dora", Payload::Text("there?".into()), Priority::Normal)
        .await
        .unwrap();
    let client = redis::Client::open(cluster.redis.url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries = |key: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("HLEN")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(entries("fabric:user:dora").await, 1);
    let exists = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(exists(users_of_victim.clone()).await, 1);

    victim.kill().await;
    // Once the dead node is swept, no routing entry of its users is left
    // (nobody has to look the user up for it to go), nor its user list.
    eventually(WAIT, "the dead node's user entries are swept", || async {
        entries("fabric:user:dora").await == 0
    })
    .await;
    assert_eq!(exists(users_of_victim).await, 0);
    let refused = sender
        .send_to_user("dora", Payload::Text("gone?".into()), Priority::Normal)
        .await;
    common::expect_server_error(refused, error_code::UNKNOWN_USER);
    cluster.finish().await;
}

#[tokio::test]
async fn a_client_that_reconnects_elsewhere_is_routed_to_its_new_node() {
    let cluster = RedisNodes::start(3).await;
    let (n1, n2, n3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let sender = n1.connect("sender").await;
    let roamer = n2.connect("roamer").await;
    let old_id = roamer.client_id();
    wait_listed(&sender, &[sender.client_id(), old_id]).await;
    // Warm the sender node's lookup cache with roamer → n2.
    sender
        .direct(old_id, Payload::Text("one".into()), Priority::Normal)
        .await
        .unwrap();
    roamer.close("moving").await;

    let mut moved = n3.connect("roamer").await;
    wait_listed(&sender, &[sender.client_id(), moved.client_id()]).await;
    deliver(&sender, &mut moved, "found you").await;
    // The old id is gone even though it is still cached on n1.
    expect_unknown(&sender, old_id).await;
    cluster.finish().await;
}

#[tokio::test]
async fn redis_outage_degrades_visibly_and_recovers_by_itself() {
    let cluster = RedisNodes::start(2).await;
    let (redis, certs) = (&cluster.redis, &cluster.certs);
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let a = n1.connect("a").await;
    let mut a2 = n1.connect("a2").await;
    let mut b = n2.connect("b").await;
    wait_listed(&a, &[a.client_id(), a2.client_id(), b.client_id()]).await;
    a2.subscribe("room", false).await.unwrap();
    b.subscribe("room", false).await.unwrap();

    redis.container.stop_with_timeout(Some(0)).await.unwrap();
    let bus = n1.bus();
    eventually(WAIT, "node notices the outage", || async {
        !bus.available()
    })
    .await;

    // Local delivery goes on.
    deliver(&a, &mut a2, "local").await;
    // Cross-node sends fail visibly.
    expect_refused(&a, b.client_id(), error_code::CLUSTER_UNAVAILABLE).await;
    // A broadcast reaches local clients and tells the sender it went no further.
    let pending = a
        .submit(
            Priority::Normal,
            Body::Broadcast {
                payload: Payload::Text("partial".into()),
            },
        )
        .await
        .unwrap();
    let bid = pending.id();
    match pending.wait().await {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, error_code::CLUSTER_UNAVAILABLE);
            assert!(message.contains("1 clients on this node"), "{message}");
        }
        other => panic!("expected CLUSTER_UNAVAILABLE, got {other:?}"),
    }
    next_matching(&mut a2, |f| f.id == bid).await;
    // Listing the cluster is refused rather than silently partial.
    assert!(
        matches!(a.list().await, Err(ClientError::Server { code, .. }) if code == error_code::CLUSTER_UNAVAILABLE)
    );
    // A channel publication reaches the local subscribers and says so.
    let sent = a
        .publish("room", Payload::Text("partial".into()), Priority::Normal)
        .await;
    let message = common::expect_server_error(sent, error_code::CLUSTER_UNAVAILABLE);
    assert!(message.contains("1 subscribers on this node"), "{message}");
    next_matching(&mut a2, is_publication).await;
    // A new subscription cannot be promised: refused, not half made.
    let refused = a.subscribe("elsewhere", false).await;
    common::expect_server_error(refused, error_code::CLUSTER_UNAVAILABLE);

    // A node started during the outage starts anyway and serves locally.
    let n3 = redis_node(redis, certs, "n3").await;
    let c = n3.connect("c").await;
    c.ping().await.unwrap();

    // Longer than the command connection's own retry budget.
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.container.start().await.unwrap();
    wait_ready(&[n1, n2, &n3]).await;
    // Presence is rebuilt (the restarted Redis may have lost it) and delivery resumes.
    wait_listed(
        &a,
        &[a.client_id(), a2.client_id(), b.client_id(), c.client_id()],
    )
    .await;
    deliver(&a, &mut b, "back").await;
    // Every node subscribed to its channels again by itself: a publication
    // from the node started during the outage reaches both subscribers,
    // and channel presence is rebuilt.
    let id = c
        .publish(
            "room",
            Payload::Text("after the outage".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    assert_eq!(next_matching(&mut a2, is_publication).await.id, id);
    assert_eq!(next_matching(&mut b, is_publication).await.id, id);
    let (members, _) = c.presence("room").await.unwrap();
    let mut names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a2", "b"]);
    let id = c
        .broadcast(Payload::Text("from the late node".into()), Priority::Normal)
        .await
        .unwrap();
    next_matching(&mut b, |f| f.id == id).await;
    // Nothing from the outage is replayed.
    match tokio::time::timeout(Duration::from_millis(200), b.next_event()).await {
        Err(_) => {}
        Ok(Some(Event::Frame(f))) => {
            assert!(f.id != bid, "outage broadcast leaked to another node")
        }
        Ok(other) => panic!("unexpected {other:?}"),
    }
    drop(n3);
    cluster.finish().await;
}

#[tokio::test]
async fn a_client_is_routable_cluster_wide_as_soon_as_it_has_its_id() {
    let cluster = RedisNodes::start(2).await;
    let a = cluster.nodes[0].connect("a").await;
    for i in 0..5 {
        let mut b = cluster.nodes[1].connect(&format!("b{i}")).await;
        // No waiting for presence: the HandshakeAck came after registration.
        deliver(&a, &mut b, "hi").await;
    }
    cluster.finish().await;
}

#[tokio::test]
async fn rediss_with_a_password_and_a_private_ca() {
    // A TLS-only Redis with a password, certificate from a throwaway CA.
    let tls_dir = tempfile::tempdir().unwrap();
    let paths = quic_fabric::tls::ensure_dev_certs(tls_dir.path(), &["127.0.0.1".into()]).unwrap();
    let port = free_tcp_port();
    let (name, tag) = redis_image();
    let container = Redis::default()
        .with_name(name)
        .with_tag(tag)
        .with_mapped_port(port, 6380.tcp())
        .with_mount(
            testcontainers_modules::testcontainers::core::Mount::bind_mount(
                tls_dir.path().to_str().unwrap(),
                "/tls",
            ),
        )
        .with_cmd([
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            "6380",
            "--tls-cert-file",
            "/tls/server.pem",
            "--tls-key-file",
            "/tls/server.key",
            "--tls-ca-cert-file",
            "/tls/ca.pem",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
        ])
        .start()
        .await
        .expect("TLS Redis starts");
    let certs = TestCerts::new();
    let start = |name: &'static str, password: &'static str| {
        let url = format!("rediss://:{password}@127.0.0.1:{port}");
        let ca = paths.ca_cert.clone();
        TestNode::start_on(BusChoice::FromConfig, Some(&certs), move |c| {
            c.name = name.into();
            c.redis_url = Some(url);
            c.redis_ca = Some(ca);
            c.heartbeat_interval = Duration::from_millis(300);
            c.node_ttl = NODE_TTL;
        })
    };
    let n1 = start("n1", "s3cret").await;
    let n2 = start("n2", "s3cret").await;
    wait_ready(&[&n1, &n2]).await;
    let a = n1.connect("a").await;
    let mut b = n2.connect("b").await;
    deliver(&a, &mut b, "over TLS").await;

    // A wrong password never joins: cross-node traffic fails visibly.
    let intruder = start("n3", "wrong").await;
    let c = intruder.connect("c").await;
    c.ping().await.unwrap();
    expect_refused(&c, b.client_id(), error_code::CLUSTER_UNAVAILABLE).await;
    drop((n1, n2, intruder));
    container.rm().await.unwrap();
}

/// How many PUBLISH commands Redis has executed so far.
async fn publishes(url: &str) -> u64 {
    calls(url, "publish").await
}

/// How many times Redis ran `command` (lowercase), scripts' calls included.
async fn calls(url: &str, command: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A channel with history costs one script call per publication (which
/// appends and PUBLISHes), keeps `history_size` entries with the TTLs of
/// CLUSTER.md, handles offsets beyond 2^32, and starts a new epoch at
/// offset 1 when its position was lost or rewound below the stream, never
/// refusing the publication or serving old entries under the new epoch.
#[tokio::test]
async fn channel_history_in_redis_is_one_script_call_per_publication_and_a_lost_position_starts_an_epoch()
 {
    let cluster = RedisNodes::start_with(2, common::scenarios::with_history).await;
    let url = &cluster.redis.url;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Version 2: what the position games below do to version 3
    // subscribers (told that publications were lost) is tested elsewhere.
    let mut old = n1.client_config("s");
    old.max_version = 2;
    let mut sub = quic_fabric::client::Client::connect(&old).await.unwrap();
    let publisher = n2.connect("p").await;
    sub.subscribe("h:room", false).await.unwrap();
    let keys = quic_fabric::bus::redis_bus::Keys::new(&n1.config().redis_prefix);
    let (stream, meta) = (keys.history("h:room"), keys.history_meta("h:room"));
    let mut conn = cluster.redis.conn().await;

    let publish = async |text: &str| {
        publisher
            .publish("h:room", Payload::Text(text.into()), Priority::Normal)
            .await
            .unwrap()
    };
    let (scripts, published) = (calls(url, "evalsha").await, publishes(url).await);
    const COUNT: u64 = 10;
    for i in 0..COUNT {
        let id = publish(&format!("m{i}")).await;
        assert_eq!(next_matching(&mut sub, |f| f.id == id).await.id, id);
    }
    assert_eq!(
        calls(url, "evalsha").await - scripts,
        COUNT,
        "one script call each"
    );
    assert_eq!(
        publishes(url).await - published,
        COUNT,
        "one PUBLISH each, inside it"
    );
    let len: u64 = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 5, "history_size");
    let stream_ttl: i64 = redis::cmd("PTTL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (590_000..=600_000).contains(&stream_ttl),
        "history_ttl: {stream_ttl}"
    );
    let meta_ttl: i64 = redis::cmd("PTTL")
        .arg(&meta)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(meta_ttl > 23 * 3600 * 1000, "history_meta_ttl: {meta_ttl}");
    let epoch = n1
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 1)
        .await
        .unwrap()
        .position
        .epoch;

    // Offsets past 2^40 are exact in the script's numbers and entry ids.
    let big = 1u64 << 40;
    let () = redis::cmd("HSET")
        .arg(&meta)
        .arg("s")
        .arg(big)
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = publish("big").await;
    next_matching(&mut sub, |f| f.id == id).await;
    let page = n2
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 5)
        .await
        .unwrap();
    assert_eq!(page.position.epoch, epoch);
    assert_eq!(page.position.offset, big + 1);
    assert_eq!(page.entries.last().map(|e| e.offset), Some(big + 1));

    // The position rewound below the stream (restored from older data):
    // the publication starts a new epoch instead of failing.
    let () = redis::cmd("HSET")
        .arg(&meta)
        .arg("s")
        .arg(3)
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = publish("rewound").await;
    next_matching(&mut sub, |f| f.id == id).await;
    let page = n1
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 5)
        .await
        .unwrap();
    assert_ne!(page.position.epoch, epoch, "a new epoch");
    assert_eq!(page.position.offset, 1);
    assert_eq!(
        page.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![1]
    );
    let epoch = page.position.epoch;

    // The position lost (evicted, expired): a new epoch at offset 1, and
    // the stream left from the old one is not served in it.
    let () = redis::cmd("DEL")
        .arg(&meta)
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = publish("lost").await;
    next_matching(&mut sub, |f| f.id == id).await;
    let page = n2
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 5)
        .await
        .unwrap();
    assert_ne!(page.position.epoch, epoch, "a new epoch");
    assert_eq!(page.position.offset, 1);
    assert_eq!(page.entries.len(), 1);

    // Redis forgot its scripts (restart, SCRIPT FLUSH): the next pipeline
    // loads it again before calling it.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = publish("reloaded").await;
    next_matching(&mut sub, |f| f.id == id).await;

    // A publication Redis refuses (here: its position key is not a hash)
    // fails alone, with Redis's reason; the others in flight still land.
    let broken = keys.history_meta("h:broken");
    let () = redis::cmd("SET")
        .arg(&broken)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (refused, fine) = tokio::join!(
        publisher.publish("h:broken", Payload::Text("no".into()), Priority::Normal),
        publisher.publish("h:room", Payload::Text("yes".into()), Priority::Normal),
    );
    let message = common::expect_server_error(refused, error_code::CLUSTER_UNAVAILABLE);
    assert!(message.contains("WRONGTYPE"), "{message}");
    let id = fine.unwrap();
    next_matching(&mut sub, |f| f.id == id).await;
    cluster.finish().await;
}

#[tokio::test]
async fn redis_cost_per_message_is_as_documented() {
    let cluster = RedisNodes::start(3).await;
    let (redis, n1, n2, n3) = (
        &cluster.redis,
        &cluster.nodes[0],
        &cluster.nodes[1],
        &cluster.nodes[2],
    );
    let a = n1.connect("a").await;
    let mut a2 = n1.connect("a2").await;
    let mut b = n2.connect("b").await;
    let _c = n3.connect("c").await;
    // Warm the lookup cache.
    deliver(&a, &mut b, "warm").await;

    let before = publishes(&redis.url).await;
    deliver(&a, &mut a2, "same node").await;
    assert_eq!(
        publishes(&redis.url).await - before,
        0,
        "a same-node direct message never touches Redis"
    );

    let before = publishes(&redis.url).await;
    let id = a
        .broadcast(Payload::Text("all".into()), Priority::Normal)
        .await
        .unwrap();
    next_matching(&mut b, |f| f.id == id).await;
    // The Ack came after both other nodes confirmed receipt, so their
    // confirmations are counted by now.
    assert_eq!(
        publishes(&redis.url).await - before,
        3,
        "a broadcast is published once for 3 nodes, and each other node confirms it"
    );

    let before = publishes(&redis.url).await;
    deliver(&a, &mut b, "cross").await;
    assert_eq!(
        publishes(&redis.url).await - before,
        2,
        "message and receipt"
    );

    // A burst: directs (and their receipts) queued together for one node
    // share PUBLISHes, and still arrive in order, each acknowledged.
    const BURST: u32 = 500;
    let before = publishes(&redis.url).await;
    directs_arrive_in_order(&a, &mut b, BURST).await;
    let burst = publishes(&redis.url).await - before;
    assert!(
        burst < u64::from(2 * BURST) / 2,
        "{BURST} cross-node directs took {burst} PUBLISHes"
    );
    cluster.finish().await;
}

#[tokio::test]
async fn admin_api_and_metrics_see_and_steer_the_whole_cluster() {
    const TOKEN: &str = "cluster-admin-token-0123";
    let cluster = RedisNodes::start_with(2, |i, c| {
        if i == 0 {
            c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
            c.admin_token = Some(TOKEN.into());
            c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        }
    })
    .await;
    let (redis, n1, n2) = (&cluster.redis, &cluster.nodes[0], &cluster.nodes[1]);
    let admin = n1.admin_addr.unwrap();
    let on1 = n1.connect("on1").await;
    let mut on2 = n2.connect("on2").await;
    let mut other2 = n2.connect("other2").await;
    wait_listed(
        &on1,
        &[on1.client_id(), on2.client_id(), other2.client_id()],
    )
    .await;

    let ready = common::http(admin, "GET", "/ready", None, None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let nodes = common::http(admin, "GET", "/nodes", Some(TOKEN), None)
        .await
        .json();
    let mut counts: Vec<(String, u64, bool)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_owned(),
                n["clients"].as_u64().unwrap(),
                n["self"].as_bool().unwrap(),
            )
        })
        .collect();
    counts.sort();
    let mut want = vec![
        (n1.id().to_string(), 1, true),
        (n2.id().to_string(), 2, false),
    ];
    want.sort();
    assert_eq!(counts, want);
    let listed = common::http(admin, "GET", "/clients?limit=10", Some(TOKEN), None)
        .await
        .json();
    assert_eq!(
        listed["clients"].as_array().unwrap().len(),
        3,
        "cluster-wide"
    );

    // An operator broadcast from n1 reaches the clients of n2.
    let sent = common::http(
        admin,
        "POST",
        "/broadcast",
        Some(TOKEN),
        Some(r#"{"text":"ops"}"#),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let got = next_matching(&mut on2, |f| matches!(f.body, Body::Broadcast { .. })).await;
    assert_eq!(got.sender, None);

    // Disconnecting a client of n2 through n1's API.
    let path = format!("/clients/{}?reason=bye", other2.client_id());
    let kicked = common::http(admin, "DELETE", &path, Some(TOKEN), None).await;
    assert_eq!(kicked.status, 202, "{}", kicked.body);
    assert_eq!(kicked.json()["node_id"], n2.id().to_string());
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match other2.next_event().await {
                Some(Event::Closed { code, .. }) => return code,
                None => return None,
                Some(_) => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, Some(quic_fabric::protocol::close_code::KICKED));
    on2.ping().await.unwrap();

    // Cluster metrics: Redis up, pub/sub, command and cross-node delivery
    // latency recorded.
    on1.direct(on2.client_id(), Payload::Text("x".into()), Priority::Normal)
        .await
        .unwrap();
    let metrics = common::http(n1.metrics_addr.unwrap(), "GET", "/metrics", None, None)
        .await
        .body;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{metrics}"))
    };
    assert_eq!(value("fabric_redis_up"), 1.0);
    assert!(value("fabric_pubsub_messages_total{direction=\"out\"}") >= 2.0);
    assert!(value("fabric_redis_command_duration_seconds_count{op=\"pipeline\"}") >= 1.0);
    assert_eq!(
        value("fabric_delivery_latency_seconds_count{path=\"cross_node\"}"),
        1.0
    );

    // Without Redis the node is not ready (it still serves local clients).
    redis.container.stop().await.unwrap();
    eventually(WAIT, "/ready turns 503 without Redis", || async {
        let ready = common::http(admin, "GET", "/ready", None, None).await;
        ready.status == 503 && ready.json()["reason"] == "cluster bus (Redis) unreachable"
    })
    .await;
    on1.ping().await.unwrap();
    drop((on1, on2));
    cluster.finish().await;
}

#[tokio::test]
async fn a_node_restarted_with_its_id_within_its_ttl_leaves_no_stale_routing_entries() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let node_id = ClientId::new_random().to_string();
    let ttl = Duration::from_secs(10);
    let mut node = redis_node_process(&redis, &certs, ttl, &["--node-id", &node_id]).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(node.connect(&format!("c{i}")).await);
    }
    let mut conn = redis.conn().await;
    let index = async |conn: &mut redis::aio::MultiplexedConnection| -> Vec<(String, String)> {
        redis::cmd("HGETALL")
            .arg("fabric:client-nodes")
            .query_async(conn)
            .await
            .unwrap()
    };
    assert_eq!(
        index(&mut conn).await.len(),
        3,
        "the three clients are routable"
    );

    // Killed, and back with the same id long before its TTL ran out: the
    // old process's clients are gone and must not stay routable here.
    node.kill().await;
    node.restart().await;
    drop(clients);
    eventually(WAIT, "stale routing entries removed", || {
        let mut conn = conn.clone();
        async move { index(&mut conn).await.is_empty() }
    })
    .await;
    drop(node);
    redis.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_from_many_tasks_at_once_are_all_delivered_and_acked() {
    // Broadcasts are numbered per node for the confirmations; the numbers
    // must reach Redis in order even when many tasks broadcast at once, or
    // a receiver takes the later one for a gap, drops the earlier one as
    // stale and the origin's Ack turns into an error.
    let cluster = RedisNodes::start(2).await;
    let mut receiver = cluster.nodes[1].connect("receiver").await;
    let mut senders = Vec::new();
    for i in 0..8 {
        senders.push(cluster.nodes[0].connect(&format!("s{i}")).await);
    }
    let mut ids: Vec<ClientId> = senders.iter().map(|s| s.client_id()).collect();
    ids.push(receiver.client_id());
    wait_listed(&receiver, &ids).await;
    const EACH: usize = 150;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let mut pending = Vec::new();
                for n in 0..EACH {
                    let body = Body::Broadcast {
                        payload: Payload::Text(format!("{n}")),
                    };
                    pending.push(s.submit(Priority::Normal, body).await.unwrap());
                }
                let mut failed = Vec::new();
                for p in pending {
                    if let Err(e) = p.wait().await {
                        failed.push(e.to_string());
                    }
                }
                (s, failed)
            })
        })
        .collect();
    let mut failed = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (s, f) = t.await.unwrap();
        failed.extend(f);
        keep.push(s);
    }
    assert!(
        failed.is_empty(),
        "{} of {} broadcasts failed, e.g. {:?}",
        failed.len(),
        8 * EACH,
        failed.first()
    );
    let mut got = 0;
    while got < 8 * EACH {
        match tokio::time::timeout(WAIT, receiver.next_event()).await {
            Ok(Some(Event::Frame(f))) if matches!(f.body, Body::Broadcast { .. }) => got += 1,
            Ok(Some(_)) => {}
            other => panic!(
                "the receiver got {got} of {} broadcasts: {other:?}",
                8 * EACH
            ),
        }
    }
    cluster.finish().await;
}

/// A node whose Redis subscription drops (three times, mid-stream) loses
/// nothing of a channel with history: it reads what it missed back from
/// the history and its subscribers get every publication exactly once, in
/// order, like the subscribers on the publisher's node (who get them as
/// Redis hands them back too).
#[tokio::test]
async fn a_node_whose_subscription_drops_fills_the_gap_from_the_history() {
    let cluster = RedisNodes::start_with(2, |_, c| {
        c.namespaces = vec!["h,history_size=5000,history_ttl=10m".parse().unwrap()];
    })
    .await;
    let (redis, n1, n2) = (&cluster.redis, &cluster.nodes[0], &cluster.nodes[1]);
    let mut near = n1.connect("near").await;
    let mut far = n2.connect("far").await;
    near.subscribe("h:feed", false).await.unwrap();
    far.subscribe("h:feed", false).await.unwrap();
    // One node's subscription, killed three times.
    let mut victim = *pubsub_clients(redis).await.last().unwrap();
    let publisher = n1.connect("p").await;
    const COUNT: usize = 600;
    let publishing = tokio::spawn(async move {
        for i in 0..COUNT {
            publisher
                .publish("h:feed", Payload::Text(i.to_string()), Priority::Normal)
                .await
                .unwrap_or_else(|e| panic!("publication {i}: {e}"));
        }
        publisher
    });
    let mut conn = redis.conn().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(victim)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(killed, 1);
        eventually(WAIT, "the node subscribes again", || async {
            pubsub_clients(redis).await.last() > Some(&victim)
        })
        .await;
        victim = *pubsub_clients(redis).await.last().unwrap();
    }
    let _publisher = publishing.await.unwrap();
    for (who, client) in [("near", &mut near), ("far", &mut far)] {
        for i in 0..COUNT {
            let got = next_matching(client, |f| matches!(f.body, Body::Publication { .. })).await;
            match &got.body {
                Body::Publication {
                    payload: Payload::Text(text),
                    position,
                    ..
                } => {
                    assert_eq!(text, &i.to_string(), "{who}: in order, once each");
                    assert_eq!(position.offset, i as u64 + 1);
                }
                other => panic!("{who}: {other:?}"),
            }
        }
        common::assert_none_before_echo(client, |f| {
            matches!(f.body, Body::Publish { .. } | Body::Publication { .. })
        })
        .await;
    }
    // (Which node's subscription was the newest is up to the start order.)
    let count = |n: &TestNode| {
        let s = n.stats();
        (
            quic_fabric::stats::get(&s.history_filled),
            quic_fabric::stats::get(&s.history_missed),
        )
    };
    let (filled, missed) = [count(n1), count(n2)]
        .into_iter()
        .fold((0, 0), |(f, m), (f2, m2)| (f + f2, m + m2));
    assert!(filled > 0, "the drops never cost a node a publication");
    assert_eq!(missed, 0);
    cluster.finish().await;
}

/// How Redis loses a channel's history.
#[derive(Debug, Clone, Copy)]
enum DataLoss {
    /// FLUSHALL.
    Flush,
    /// The Redis container restarts without persistence.
    Restart,
}

/// Redis loses its data (FLUSHALL, or a restart without persistence): the
/// next publication starts a new epoch; a version 3 subscriber is told
/// plainly (SubscriptionLost from its node, and `Event::Subscribed` with
/// EpochChanged), never a silent gap, and goes on receiving; an old
/// position is then answered EpochChanged, with the new epoch replayed.
#[tokio::test]
async fn a_lost_history_is_a_new_epoch_that_subscribers_are_told_about() {
    lost_history_is_told(DataLoss::Flush).await;
}

#[tokio::test]
async fn a_redis_restart_without_persistence_is_a_new_epoch_that_subscribers_are_told_about() {
    lost_history_is_told(DataLoss::Restart).await;
}

async fn lost_history_is_told(loss: DataLoss) {
    use quic_fabric::protocol::Recovery;
    let redis = TestRedis::start_with_args(&["--save", "", "--appendonly", "no"]).await;
    let cluster = RedisNodes::start_on(redis, 2, common::scenarios::with_history).await;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut sub = n2.connect("s").await;
    sub.subscribe_since("h:room", false, None).await.unwrap();
    let publisher = n1.connect("p").await;
    for i in 1..=3 {
        let id = publisher
            .publish("h:room", Payload::Text(i.to_string()), Priority::Normal)
            .await
            .unwrap();
        next_matching(&mut sub, |f| f.id == id).await;
    }
    let before = sub.position("h:room").unwrap();
    assert_eq!(before.offset, 3);
    match loss {
        DataLoss::Flush => {
            let mut conn = cluster.redis.conn().await;
            let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
        }
        DataLoss::Restart => {
            let container = &cluster.redis.container;
            container.stop_with_timeout(Some(0)).await.unwrap();
            container.start().await.unwrap();
            cluster.wait_ready().await;
        }
    }
    // Sent again while the nodes find Redis back (it refuses publishes
    // plainly meanwhile).
    let deadline = tokio::time::Instant::now() + WAIT;
    let id = loop {
        match publisher
            .publish("h:room", Payload::Text("after".into()), Priority::Normal)
            .await
        {
            Ok(id) => break id,
            Err(err) => {
                assert!(tokio::time::Instant::now() < deadline, "{err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (mut told, mut lost_frame, mut delivered) = (None, false, false);
    tokio::time::timeout(WAIT, async {
        while told.is_none() || !lost_frame || !delivered {
            match sub.next_event().await.unwrap() {
                Event::Subscribed {
                    recovery: Recovery::EpochChanged,
                    position,
                    ..
                } => told = position,
                Event::Frame(f) if matches!(f.body, Body::SubscriptionLost { .. }) => {
                    lost_frame = true
                }
                Event::Frame(f) if f.id == id => delivered = true,
                _ => {}
            }
        }
    })
    .await
    .expect("told about the lost history, and the publication delivered");
    // Told before or after the new epoch's first publication (a restart
    // is noticed on its own; a FLUSHALL only by that publication).
    let told = told.unwrap();
    let now = sub.position("h:room").unwrap();
    assert_ne!(now.epoch, before.epoch);
    assert_eq!(told.epoch, now.epoch);
    assert!(told.offset <= 1, "{told:?}");
    assert_eq!(now.offset, 1);
    let mut late = n1.connect("late").await;
    let got = late
        .subscribe_since("h:room", false, Some(before))
        .await
        .unwrap();
    assert_eq!(got.recovery, Recovery::EpochChanged);
    assert_eq!(got.position, Some(now));
    // The new epoch is replayed from its start (whole in the history),
    // after the library's own word that the epoch changed.
    let replayed = tokio::time::timeout(WAIT, async {
        loop {
            match late.next_event().await.unwrap() {
                Event::Frame(f) if matches!(f.body, Body::Publication { .. }) => return f,
                Event::Subscribed {
                    recovery: Recovery::EpochChanged,
                    ..
                } => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    })
    .await
    .expect("the new epoch's publication is replayed");
    assert_eq!(replayed.id, id);
    common::assert_none_before_echo(&mut late, |f| matches!(f.body, Body::Publication { .. }))
        .await;
    cluster.finish().await;
}
