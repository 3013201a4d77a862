//! Nodes sharing a real Redis (testcontainers): presence, cross-node
//! delivery, node death, Redis outages and recovery.
//!
//! The image comes from `FABRIC_REDIS_IMAGE` (default `redis:7`); on a
//! machine without a registry, `cluster/images.sh redis` builds it from
//! Debian packages (the README's test command runs it).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::redis::{
    NODE_TTL, TestRedis, free_tcp_port, redis_image, redis_node, wait_listed, wait_ready,
};
use common::{TestCerts, TestNode, WAIT, eventually, next_matching};
use quic_fabric::bus::ClusterBus;
use quic_fabric::client::{Client, ClientConfig, ClientError, Event};
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{Body, ClientId, Payload, Priority, error_code};
use testcontainers_modules::redis::Redis;
use testcontainers_modules::testcontainers::ImageExt;
use testcontainers_modules::testcontainers::core::IntoContainerPort;
use testcontainers_modules::testcontainers::runners::AsyncRunner;

#[tokio::test]
async fn broadcast_direct_and_list_work_across_nodes() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let n1 = redis_node(&redis, &certs, "n1").await;
    let n2 = redis_node(&redis, &certs, "n2").await;
    let n3 = redis_node(&redis, &certs, "n3").await;
    wait_ready(&[&n1, &n2, &n3]).await;

    let a = n1.connect("a").await;
    let mut b = n2.connect("b").await;
    let mut c = n3.connect("c").await;
    let mut a2 = n1.connect("a2").await;
    let all = [a.client_id(), b.client_id(), c.client_id(), a2.client_id()];
    wait_listed(&a, &all).await;
    let (clients, _) = b.list().await.unwrap();
    for info in &clients {
        let expected_node = if info.name.starts_with('a') {
            n1.id()
        } else if info.name == "b" {
            n2.id()
        } else {
            n3.id()
        };
        assert_eq!(info.node_id, expected_node, "{info:?}");
    }

    // Broadcast: once to every other client, on every node.
    let id = a
        .broadcast(Payload::Text("cluster-wide".into()), Priority::Normal)
        .await
        .unwrap();
    for receiver in [&mut b, &mut c, &mut a2] {
        let got = next_matching(receiver, |f| f.id == id).await;
        assert_eq!(
            got.body,
            Body::Broadcast {
                payload: Payload::Text("cluster-wide".into())
            }
        );
        common::assert_none_before_echo(receiver, |f| f.id == id).await;
    }

    // Direct across nodes, acknowledged after delivery, in order.
    let mut pending = Vec::new();
    for i in 0..50u32 {
        let body = Body::Direct {
            to: c.client_id(),
            payload: Payload::Text(i.to_string()),
        };
        pending.push(a.submit(Priority::Normal, body).await.unwrap());
    }
    for p in pending {
        assert!(matches!(p.wait().await.unwrap().body, Body::Ack { .. }));
    }
    for i in 0..50u32 {
        let got = next_matching(&mut c, |f| matches!(f.body, Body::Direct { .. })).await;
        assert_eq!(
            got.body,
            Body::Direct {
                to: c.client_id(),
                payload: Payload::Text(i.to_string())
            }
        );
        assert_eq!(got.sender.as_ref().unwrap().node_id, n1.id());
    }

    // Unknown target.
    common::expect_server_error(
        a.direct(
            ClientId::new_random(),
            Payload::Text("?".into()),
            Priority::Normal,
        )
        .await,
        error_code::UNKNOWN_CLIENT,
    );
    drop((a, b, c, a2));
    drop((n1, n2, n3));
    redis.remove().await;
}

#[tokio::test]
async fn a_killed_node_leaves_presence_within_its_ttl_and_gets_nothing_routed() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let n1 = redis_node(&redis, &certs, "n1").await;
    // The victim is a real process, so it can die by SIGKILL.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut victim = tokio::process::Command::new(env!("CARGO_BIN_EXE_fabric-node"))
        .args(["--listen", &addr, "--certs-dir"])
        .arg(certs.dir.path())
        .args([
            "--redis-url",
            &redis.url,
            "--node-ttl",
            "2s",
            "--heartbeat-interval",
            "300ms",
            "--name",
            "victim",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let config = ClientConfig::new(addr.clone(), certs.dir.path().join("ca.pem")).name("doomed");
    let doomed = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(c) = Client::connect(&config).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("victim node comes up");
    let a = n1.connect("a").await;
    wait_listed(&a, &[a.client_id(), doomed.client_id()]).await;
    a.direct(
        doomed.client_id(),
        Payload::Text("alive?".into()),
        Priority::Normal,
    )
    .await
    .unwrap();

    victim.start_kill().unwrap();
    victim.wait().await.unwrap();
    let killed_at = tokio::time::Instant::now();
    // Gone from presence by TTL alone (nobody cleaned up).
    wait_listed(&a, &[a.client_id()]).await;
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after < NODE_TTL * 4,
        "presence outlived the TTL by far: {gone_after:?}"
    );
    // Nothing is routed to the dead node: the sender learns the client is gone.
    common::expect_server_error(
        a.direct(
            doomed.client_id(),
            Payload::Text("dead?".into()),
            Priority::Normal,
        )
        .await,
        error_code::UNKNOWN_CLIENT,
    );
    drop(n1);
    redis.remove().await;
}

#[tokio::test]
async fn a_gracefully_stopped_node_leaves_presence_at_once() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let n1 = redis_node(&redis, &certs, "n1").await;
    let mut n2 = redis_node(&redis, &certs, "n2").await;
    wait_ready(&[&n1, &n2]).await;
    let a = n1.connect("a").await;
    let b = n2.connect("b").await;
    wait_listed(&a, &[a.client_id(), b.client_id()]).await;
    n2.stop().await;
    // No waiting: the node removed its presence before it stopped.
    let (clients, _) = a.list().await.unwrap();
    assert_eq!(
        clients.iter().map(|c| c.client_id).collect::<Vec<_>>(),
        vec![a.client_id()]
    );
    let live = n1.bus().live_nodes().await.unwrap();
    assert_eq!(live, vec![n1.id()]);
    drop(n1);
    redis.remove().await;
}

#[tokio::test]
async fn a_client_that_reconnects_elsewhere_is_routed_to_its_new_node() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let n1 = redis_node(&redis, &certs, "n1").await;
    let n2 = redis_node(&redis, &certs, "n2").await;
    let n3 = redis_node(&redis, &certs, "n3").await;
    wait_ready(&[&n1, &n2, &n3]).await;
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
    let id = sender
        .direct(
            moved.client_id(),
            Payload::Text("found you".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    let got = next_matching(&mut moved, |f| f.id == id).await;
    assert_eq!(
        got.body,
        Body::Direct {
            to: moved.client_id(),
            payload: Payload::Text("found you".into())
        }
    );
    // The old id is gone even though it is still cached on n1.
    common::expect_server_error(
        sender
            .direct(old_id, Payload::Text("stale".into()), Priority::Normal)
            .await,
        error_code::UNKNOWN_CLIENT,
    );
    drop((n1, n2, n3));
    redis.remove().await;
}

#[tokio::test]
async fn redis_outage_degrades_visibly_and_recovers_by_itself() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let n1 = redis_node(&redis, &certs, "n1").await;
    let n2 = redis_node(&redis, &certs, "n2").await;
    wait_ready(&[&n1, &n2]).await;
    let a = n1.connect("a").await;
    let mut a2 = n1.connect("a2").await;
    let mut b = n2.connect("b").await;
    wait_listed(&a, &[a.client_id(), a2.client_id(), b.client_id()]).await;

    redis.container.stop_with_timeout(Some(0)).await.unwrap();
    let bus = n1.bus();
    eventually(WAIT, "node notices the outage", || async {
        !bus.available()
    })
    .await;

    // Local delivery goes on.
    let id = a
        .direct(
            a2.client_id(),
            Payload::Text("local".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    next_matching(&mut a2, |f| f.id == id).await;
    // Cross-node sends fail visibly.
    common::expect_server_error(
        a.direct(
            b.client_id(),
            Payload::Text("remote".into()),
            Priority::Normal,
        )
        .await,
        error_code::CLUSTER_UNAVAILABLE,
    );
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

    // A node started during the outage starts anyway and serves locally.
    let n3 = redis_node(&redis, &certs, "n3").await;
    let c = n3.connect("c").await;
    c.ping().await.unwrap();

    // Longer than the command connection's own retry budget.
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.container.start().await.unwrap();
    wait_ready(&[&n1, &n2, &n3]).await;
    // Presence is rebuilt (the restarted Redis may have lost it) and delivery resumes.
    wait_listed(
        &a,
        &[a.client_id(), a2.client_id(), b.client_id(), c.client_id()],
    )
    .await;
    let id = a
        .direct(
            b.client_id(),
            Payload::Text("back".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    let got = next_matching(&mut b, |f| f.id == id).await;
    assert_eq!(
        got.body,
        Body::Direct {
            to: b.client_id(),
            payload: Payload::Text("back".into())
        }
    );
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
    drop((n1, n2, n3));
    redis.remove().await;
}

#[tokio::test]
async fn a_client_is_routable_cluster_wide_as_soon_as_it_has_its_id() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let n1 = redis_node(&redis, &certs, "n1").await;
    let n2 = redis_node(&redis, &certs, "n2").await;
    wait_ready(&[&n1, &n2]).await;
    let a = n1.connect("a").await;
    for i in 0..5 {
        let mut b = n2.connect(&format!("b{i}")).await;
        // No waiting for presence: the HandshakeAck came after registration.
        let id = a
            .direct(b.client_id(), Payload::Text("hi".into()), Priority::Normal)
            .await
            .unwrap();
        next_matching(&mut b, |f| f.id == id).await;
    }
    drop((n1, n2));
    redis.remove().await;
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
    let id = a
        .direct(
            b.client_id(),
            Payload::Text("over TLS".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    next_matching(&mut b, |f| f.id == id).await;

    // A wrong password never joins: cross-node traffic fails visibly.
    let intruder = start("n3", "wrong").await;
    let c = intruder.connect("c").await;
    c.ping().await.unwrap();
    common::expect_server_error(
        c.direct(
            b.client_id(),
            Payload::Text("let me in".into()),
            Priority::Normal,
        )
        .await,
        error_code::CLUSTER_UNAVAILABLE,
    );
    drop((n1, n2, intruder));
    container.rm().await.unwrap();
}

/// How many PUBLISH commands Redis has executed so far.
async fn publishes(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn redis_cost_per_message_is_as_documented() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let n1 = redis_node(&redis, &certs, "n1").await;
    let n2 = redis_node(&redis, &certs, "n2").await;
    let n3 = redis_node(&redis, &certs, "n3").await;
    wait_ready(&[&n1, &n2, &n3]).await;
    let a = n1.connect("a").await;
    let mut a2 = n1.connect("a2").await;
    let mut b = n2.connect("b").await;
    let _c = n3.connect("c").await;
    // Warm the lookup cache.
    a.direct(
        b.client_id(),
        Payload::Text("warm".into()),
        Priority::Normal,
    )
    .await
    .unwrap();

    let before = publishes(&redis.url).await;
    let id = a
        .direct(
            a2.client_id(),
            Payload::Text("same node".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    next_matching(&mut a2, |f| f.id == id).await;
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
    let id = a
        .direct(
            b.client_id(),
            Payload::Text("cross".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    next_matching(&mut b, |f| f.id == id).await;
    assert_eq!(
        publishes(&redis.url).await - before,
        2,
        "message and receipt"
    );
    drop((n1, n2, n3));
    redis.remove().await;
}

#[tokio::test]
async fn admin_api_and_metrics_see_and_steer_the_whole_cluster() {
    const TOKEN: &str = "cluster-admin-token-0123";
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let url = redis.url.clone();
    let n1 = TestNode::start_on(BusChoice::FromConfig, Some(&certs), move |c| {
        c.name = "n1".into();
        c.redis_url = Some(url);
        c.node_ttl = NODE_TTL;
        c.heartbeat_interval = Duration::from_millis(300);
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin_token = Some(TOKEN.into());
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let n2 = redis_node(&redis, &certs, "n2").await;
    wait_ready(&[&n1, &n2]).await;
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
    drop((n1, n2));
    redis.remove().await;
}

#[tokio::test]
async fn a_node_restarted_with_its_id_within_its_ttl_leaves_no_stale_routing_entries() {
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let node_id = ClientId::new_random().to_string();
    let mut node = common::NodeProcess::start(
        certs.dir.path(),
        &[
            "--redis-url",
            &redis.url,
            "--node-id",
            &node_id,
            "--node-ttl",
            "10s",
            "--heartbeat-interval",
            "300ms",
        ],
    )
    .await;
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
