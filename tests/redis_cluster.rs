//! Nodes on a Redis Cluster (`--redis-cluster`): 3 masters with a replica
//! each in one container (`cluster/images.sh redis-ha`,
//! `tests/common/redis_ha.rs`). The bus uses sharded pub/sub and
//! hash-tagged keys (CLUSTER.md, "Redis Cluster").
//!
//! First the cross-node scenarios shared with the other engines, on one
//! cluster per group of scenarios (starting one takes ~7 s); then, under
//! traffic, a master killed (the nodes follow the promoted replica by
//! themselves) and slots moved to another master (resharding): every send
//! in the gap is refused visibly, and every acknowledged direct and
//! publication reaches its receiver exactly once and in order (or, for
//! publications, the subscriber is told the channel's history changed
//! epoch).

mod common;

use common::cluster::Cluster;
use common::failover::{FailsOver, failover_under_traffic};
use common::redis::wait_ready;
use common::redis_ha::{HaNodes, RedisClusterSet, conn, ha_node};
use common::{TestCerts, TestNode};
use quic_fabric::protocol::ClientId;

/// Nodes on a Redis Cluster of their own.
type ClusterNodes = HaNodes<RedisClusterSet>;

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

/// A channel name starting with `stem` whose slot master `port` serves.
async fn channel_on(set: &RedisClusterSet, port: u16, stem: &str) -> String {
    for i in 0.. {
        let name = format!("{stem}{i}");
        if set
            .master_port_for_key(&format!("fabric:{{c:{name}}}:ch"))
            .await
            == port
        {
            return name;
        }
    }
    unreachable!()
}

/// Two nodes on `set` for the traffic of `failover_under_traffic`: a node
/// TTL longer than a failover's gap, as in production, and namespace `h`
/// with history.
async fn two_nodes_with_history(set: &RedisClusterSet, certs: &TestCerts) -> (TestNode, TestNode) {
    let history = |c: &mut quic_fabric::NodeConfig| {
        c.node_ttl = std::time::Duration::from_secs(5);
        c.namespaces = vec!["h,history_size=10000,history_ttl=10m".parse().unwrap()];
    };
    let n1 = ha_node(set, certs, "n1", history).await;
    let n2 = ha_node(set, certs, "n2", history).await;
    wait_ready(&[&n1, &n2]).await;
    (n1, n2)
}

/// The cluster, losing master `victim` to SIGKILL.
struct Killing<'a> {
    set: &'a RedisClusterSet,
    victim: u16,
}

impl FailsOver for Killing<'_> {
    async fn fail_over(&self) -> (u16, u16) {
        self.set.kill(self.victim).await;
        (self.victim, self.set.wait_promoted(self.victim).await)
    }

    async fn assert_routed(&self, ids: &[ClientId]) {
        let mut cluster = self.set.client().await;
        for id in ids {
            let text = id.to_string();
            let bucket = u8::from_str_radix(&text[..2], 16).unwrap() % 64;
            let node: Option<String> = redis::cmd("HGET")
                .arg(format!("fabric:{{r:{bucket:02x}}}:route"))
                .arg(&text)
                .query_async(&mut cluster)
                .await
                .unwrap();
            assert!(node.is_some(), "{id} routed after the failover");
        }
    }
}

/// The master that serves the receiving node's channel (so directs to it)
/// and a channel with history is SIGKILLed under traffic: its replica is
/// promoted, the nodes follow by themselves, sends in the gap are refused
/// with CLUSTER_UNAVAILABLE, and nothing acknowledged is lost silently.
#[tokio::test]
async fn the_nodes_follow_a_killed_master_to_its_promoted_replica() {
    let set = RedisClusterSet::start().await;
    let certs = TestCerts::new();
    let (n1, n2) = two_nodes_with_history(&set, &certs).await;
    let victim = set
        .master_port_for_key(&format!("fabric:{{n:{}}}:ch", n2.id()))
        .await;
    let channel = channel_on(&set, victim, "h:kill").await;
    let killing = Killing { set: &set, victim };
    let (old, new, figures) = failover_under_traffic(&killing, "Kill", &n1, &n2, &channel).await;
    println!("redis cluster failover ({old} -> {new}): {figures}");
    set.remove().await;
}

/// The cluster, moving `slots` from master `from` to master `to` the way
/// `redis-cli --cluster reshard` does (IMPORTING/MIGRATING, MIGRATE of
/// every key, then the new owner announced to every master).
struct Resharding<'a> {
    set: &'a RedisClusterSet,
    slots: Vec<u16>,
    from: u16,
    to: u16,
}

impl FailsOver for Resharding<'_> {
    fn starts_an_epoch(&self) -> bool {
        false
    }

    async fn fail_over(&self) -> (u16, u16) {
        let nodes = self.set.nodes().await;
        let id = |port: u16| nodes.iter().find(|n| n.port == port).unwrap().id.clone();
        let (from_id, to_id) = (id(self.from), id(self.to));
        let mut src = conn(self.from).await;
        let mut dst = conn(self.to).await;
        let setslot = |slot: u16, how: &str, node: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .arg(node)
                .clone()
        };
        for &slot in &self.slots {
            let () = setslot(slot, "IMPORTING", &from_id)
                .query_async(&mut dst)
                .await
                .unwrap();
            let () = setslot(slot, "MIGRATING", &to_id)
                .query_async(&mut src)
                .await
                .unwrap();
            loop {
                let keys: Vec<String> = redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(100)
                    .query_async(&mut src)
                    .await
                    .unwrap();
                if keys.is_empty() {
                    break;
                }
                let () = redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(self.to)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(keys)
                    .query_async(&mut src)
                    .await
                    .unwrap();
            }
            for port in self.set.masters().await {
                let () = setslot(slot, "NODE", &to_id)
                    .query_async(&mut conn(port).await)
                    .await
                    .unwrap();
            }
        }
        (self.from, self.to)
    }

    async fn assert_routed(&self, ids: &[ClientId]) {
        Killing {
            set: self.set,
            victim: self.from,
        }
        .assert_routed(ids)
        .await;
    }
}

/// The slots of the receiving node's channel and of a channel with history
/// move to another master under traffic (resharding): the nodes follow by
/// themselves (the old owner drops their subscriptions, the slot map
/// changes), and nothing acknowledged is lost silently.
#[tokio::test]
async fn the_nodes_follow_slots_moved_to_another_master() {
    let set = RedisClusterSet::start().await;
    let certs = TestCerts::new();
    let (n1, n2) = two_nodes_with_history(&set, &certs).await;
    let node_channel = format!("fabric:{{n:{}}}:ch", n2.id());
    let from = set.master_port_for_key(&node_channel).await;
    let channel = &channel_on(&set, from, "h:moving").await;
    let to = set
        .masters()
        .await
        .into_iter()
        .find(|p| *p != from)
        .unwrap();
    let mut slots = vec![
        set.slot(&node_channel).await,
        set.slot(&format!("fabric:{{c:{channel}}}:ch")).await,
    ];
    slots.dedup();
    let moving = Resharding {
        set: &set,
        slots: slots.clone(),
        from,
        to,
    };
    let (_, _, figures) = failover_under_traffic(&moving, "Reshard", &n1, &n2, channel).await;
    println!("redis cluster resharding (slots {slots:?} from {from} to {to}): {figures}");
    set.remove().await;
}
