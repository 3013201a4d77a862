//! The Redis Cluster and Sentinel harness (issue 17) against real
//! topologies: it must name the right masters, and failovers must happen
//! within the bounds the bus's tests will rely on.
//!
//! Needs the redis-ha image: `cluster/images.sh redis-ha`.

mod common;

use std::time::{Duration, Instant};

use common::redis_ha::{RedisClusterSet, SentinelSet, conn, until_some, wait_replica};
use redis::AsyncCommands;

/// The cluster announces addresses the host reaches, and the harness's slot
/// map agrees with the cluster client's routing and with the servers.
#[tokio::test]
async fn cluster_routes_keys_and_sharded_publishes_to_the_named_master() {
    let started = Instant::now();
    let set = RedisClusterSet::start().await;
    println!("cluster ready in {:?}", started.elapsed());
    let masters = set.masters().await;
    assert_eq!(masters.len(), 3, "three masters: {masters:?}");
    for &master in &masters {
        assert_eq!(
            set.replicas_of(master).await.len(),
            1,
            "{master} has a replica"
        );
    }

    // Through the seeds, as the bus will connect: a write lands on the
    // master the harness names, and every other master redirects.
    let mut cluster = set.client().await;
    let key = "{t1}key";
    let () = cluster.set(key, "v").await.unwrap();
    let owner = set.master_port_for_key(key).await;
    let got: String = conn(owner).await.get(key).await.unwrap();
    assert_eq!(got, "v");
    for &other in masters.iter().filter(|&&m| m != owner) {
        let err = conn(other).await.get::<_, String>(key).await.unwrap_err();
        let owner_addr = format!("127.0.0.1:{owner}");
        assert_eq!(
            err.redirect_node(),
            Some((owner_addr.as_str(), set.slot(key).await)),
            "{other} redirects to the owner: {err}"
        );
    }

    // A sharded subscriber on the named master gets what the cluster client
    // publishes on that channel.
    let channel = "{t2}channel";
    let owner = set.master_port_for_key(channel).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut subscriber =
        redis::Client::open(format!("{}?protocol=resp3", common::redis_ha::url(owner)))
            .unwrap()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
    let () = redis::cmd("SSUBSCRIBE")
        .arg(channel)
        .query_async(&mut subscriber)
        .await
        .unwrap();
    let receivers: i64 = redis::cmd("SPUBLISH")
        .arg(channel)
        .arg("hello")
        .query_async(&mut cluster)
        .await
        .unwrap();
    assert_eq!(receivers, 1, "SPUBLISH reached the subscriber's master");
    let message = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let push = rx.recv().await.expect("push channel open");
            if push.kind == redis::PushKind::SMessage {
                return push.data;
            }
        }
    })
    .await
    .expect("the sharded message arrives");
    assert_eq!(
        message,
        vec![
            redis::Value::BulkString(channel.into()),
            redis::Value::BulkString("hello".into())
        ]
    );
    set.remove().await;
}

/// Killing a master promotes its replica within the bound; the old master,
/// started again, rejoins as a replica of the new one.
#[tokio::test]
async fn killed_cluster_master_is_replaced_and_returns_as_replica() {
    let set = RedisClusterSet::start().await;
    let key = "{t3}key";
    let mut cluster = set.client().await;
    let () = cluster.set(key, "before").await.unwrap();
    let old = set.master_port_for_key(key).await;
    let replicas = set.replicas_of(old).await;
    wait_replica(replicas[0]).await;

    let killed = Instant::now();
    set.kill(old).await;
    let new = set.wait_promoted(old).await;
    println!(
        "cluster: master {old} killed, {new} promoted after {:?}",
        killed.elapsed()
    );
    assert!(
        replicas.contains(&new),
        "{new} was a replica of {old}: {replicas:?}"
    );
    assert_eq!(set.master_port_for_key(key).await, new);
    // The replica had the write (it was in sync before the kill).
    let got: String = conn(new).await.get(key).await.unwrap();
    assert_eq!(got, "before");

    let restarted = Instant::now();
    set.restart(old).await;
    assert_eq!(wait_replica(old).await, new, "{old} follows {new}");
    println!(
        "cluster: {old} back as a replica of {new} after {:?}",
        restarted.elapsed()
    );
    set.wait_ok().await;
    assert_eq!(set.masters().await.len(), 3);
    set.remove().await;
}

/// Killing the master makes every sentinel name the replica within the
/// bound; the old master, started again, is turned into its replica.
#[tokio::test]
async fn sentinels_fail_over_to_the_replica_and_demote_the_old_master() {
    let started = Instant::now();
    let set = SentinelSet::start().await;
    println!("sentinel set ready in {:?}", started.elapsed());
    let old = set.master_port().await;
    assert_eq!(old, set.data_ports[0]);
    let replica = set.data_ports[1];
    assert_eq!(wait_replica(replica).await, old);

    // Through the sentinels, as the bus will connect.
    let mut sentinel = redis::sentinel::SentinelClient::build(
        set.sentinels.clone(),
        &set.master_name,
        None,
        redis::sentinel::SentinelServerType::Master,
    )
    .unwrap();
    let mut master = sentinel.get_async_connection().await.unwrap();
    let () = master.set("k", "before").await.unwrap();
    until_some(
        Duration::from_secs(5),
        "the write to reach the replica",
        || async {
            let got: Option<String> = conn(replica).await.get("k").await.ok()?;
            got.filter(|v| v == "before")
        },
    )
    .await;

    let killed = Instant::now();
    assert_eq!(set.kill_master().await, old);
    let new = set.wait_failover(old).await;
    println!(
        "sentinel: master {old} killed, {new} named after {:?}",
        killed.elapsed()
    );
    assert_eq!(new, replica);
    let mut master = sentinel.get_async_connection().await.unwrap();
    let got: String = master.get("k").await.unwrap();
    assert_eq!(got, "before");
    let () = master.set("k", "after").await.unwrap();

    let restarted = Instant::now();
    set.restart(old).await;
    assert_eq!(
        wait_replica(old).await,
        new,
        "Sentinel re-points {old} at {new}"
    );
    println!(
        "sentinel: {old} back as a replica of {new} after {:?}",
        restarted.elapsed()
    );
    set.remove().await;
}
