//! Nodes on a Redis Cluster (`--redis-cluster`): 3 masters with a replica
//! each in one container (`cluster/images.sh redis-ha`,
//! `tests/common/redis_ha.rs`). The bus uses sharded pub/sub and
//! hash-tagged keys (CLUSTER.md, "Redis Cluster").
//!
//! First the cross-node scenarios shared with the other engines, on one
//! cluster per group of scenarios (starting one takes ~7 s); then masters
//! killed under traffic: the nodes follow the promoted replicas by
//! themselves, every send in the gap is refused visibly, and every
//! acknowledged direct and publication reaches its receiver exactly once
//! and in order (or, for publications, the subscriber is told the
//! channel's history changed epoch).

mod common;

use common::cluster::Cluster;
use common::redis::{short_timings, wait_ready};
use common::redis_ha::{RedisClusterSet, conn};
use common::{TestCerts, TestNode};
use quic_fabric::client::Client;
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::ClientId;

/// A node in this process on the Redis Cluster `set`.
async fn cluster_node(
    set: &RedisClusterSet,
    certs: &TestCerts,
    name: &str,
    tweak: impl FnOnce(&mut quic_fabric::NodeConfig),
) -> TestNode {
    let seeds = set.seeds.clone();
    let name = name.to_owned();
    TestNode::start_on(BusChoice::FromConfig, Some(certs), move |c| {
        c.name = name;
        c.redis_cluster = seeds;
        short_timings(c);
        tweak(c);
    })
    .await
}

/// Nodes on a Redis Cluster of their own.
struct ClusterNodes {
    nodes: Vec<TestNode>,
    _certs: TestCerts,
    set: RedisClusterSet,
}

impl Cluster for ClusterNodes {
    async fn start_with(
        n: usize,
        tweak: impl Fn(usize, &mut quic_fabric::NodeConfig),
    ) -> ClusterNodes {
        let set = RedisClusterSet::start().await;
        let certs = TestCerts::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(cluster_node(&set, &certs, &format!("n{}", i + 1), |c| tweak(i, c)).await);
        }
        wait_ready(&nodes.iter().collect::<Vec<_>>()).await;
        ClusterNodes {
            nodes,
            _certs: certs,
            set,
        }
    }

    fn nodes(&self) -> &[TestNode] {
        &self.nodes
    }

    fn nodes_mut(&mut self) -> &mut [TestNode] {
        &mut self.nodes
    }

    async fn wait_listed(&self, observer: &Client, expected: &[ClientId]) {
        common::redis::wait_listed(observer, expected).await;
    }

    async fn finish(self) {
        self.set.remove().await;
    }
}

/// The shared scenarios without users, one after another on one cluster
/// (the one that takes a node away last).
#[tokio::test]
async fn the_cluster_scenarios_pass_on_a_redis_cluster() {
    use common::scenarios::*;
    let mut cluster = ClusterNodes::start_with(3, with_history).await;
    broadcast_crosses_nodes_and_reaches_every_other_client_once(&mut cluster).await;
    direct_crosses_nodes_and_is_acknowledged_on_delivery_in_order(&mut cluster).await;
    direct_to_a_client_nowhere_in_the_cluster_is_unknown_client(&mut cluster).await;
    list_shows_every_client_of_the_cluster_with_its_node(&mut cluster).await;
    channel_publications_reach_exactly_the_subscribers_once_in_order(&mut cluster).await;
    channel_presence_and_join_leave_events_cross_nodes(&mut cluster).await;
    channel_history_keeps_the_latest_publications_at_consecutive_positions(&mut cluster).await;
    a_subscriber_recovers_from_a_position_or_is_told_why_not(&mut cluster).await;
    idempotent_messages_are_handled_once_whichever_node_each_attempt_reaches(&mut cluster).await;
    a_node_leaving_takes_its_clients_out_of_the_cluster(&mut cluster).await;
    // Sharded pub/sub only (a classic PUBLISH would be copied to every
    // cluster node), and keys on every master (no hidden single shard).
    let mut spread = Vec::new();
    for port in cluster.set.masters().await {
        let stats = command_calls(port).await;
        let keys: u64 = redis::cmd("DBSIZE")
            .query_async(&mut conn(port).await)
            .await
            .unwrap();
        assert_eq!(
            stats.get("publish"),
            None,
            "master {port}: no classic PUBLISH"
        );
        spread.push((port, stats.get("spublish").copied().unwrap_or(0), keys));
    }
    println!("per master (port, SPUBLISH calls, keys): {spread:?}");
    assert!(
        spread.iter().map(|s| s.1).sum::<u64>() > 0,
        "SPUBLISH carried the traffic"
    );
    assert!(
        spread.iter().all(|s| s.2 > 0),
        "every master holds keys: {spread:?}"
    );
    cluster.finish().await;
}

/// `INFO commandstats` of the server on `port`: calls per command.
async fn command_calls(port: u16) -> std::collections::HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn(port).await)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The shared scenarios with users (JWT), on a cluster of their own.
#[tokio::test]
async fn the_user_scenarios_pass_on_a_redis_cluster() {
    use common::scenarios::*;
    let mut cluster = ClusterNodes::start_with(3, with_jwt).await;
    user_messages_reach_every_connection_of_the_user_on_every_node(&mut cluster).await;
    granted_namespaces_follow_the_token_on_every_node(&mut cluster).await;
    cluster.finish().await;
}
