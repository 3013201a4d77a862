//! Nodes on a Sentinel-managed Redis (`--redis-sentinel`): one master, one
//! replica and three sentinels in one container (`cluster/images.sh
//! redis-ha`, `tests/common/redis_ha.rs`).
//!
//! First the cross-node scenarios shared with the other engines, on one
//! set; then a master killed under traffic: the nodes follow the promoted
//! replica by themselves, every send in the gap is refused visibly, every
//! acknowledged direct and publication reaches its receiver exactly once
//! and in order, and presence is rewritten on the new master.

mod common;

use std::time::Duration;

use common::TestCerts;
use common::cluster::Cluster;
use common::failover::{FailsOver, failover_under_traffic};
use common::redis::wait_ready;
use common::redis_ha::{HaNodes, SentinelSet, conn, ha_node, wait_replica};
use quic_fabric::protocol::ClientId;

/// Nodes on a Sentinel set of their own.
type SentinelNodes = HaNodes<SentinelSet>;

/// The shared scenarios, one after another on one Sentinel set (starting
/// a set takes ~12 s: the sentinels learn the replica from INFO).
#[tokio::test]
async fn the_cluster_scenarios_pass_on_the_master_the_sentinels_name() {
    use common::scenarios::*;
    let mut cluster = SentinelNodes::start_with(3, with_history).await;
    broadcast_crosses_nodes_and_reaches_every_other_client_once(&mut cluster).await;
    direct_crosses_nodes_and_is_acknowledged_on_delivery_in_order(&mut cluster).await;
    direct_to_a_client_nowhere_in_the_cluster_is_unknown_client(&mut cluster).await;
    channel_publications_reach_exactly_the_subscribers_once_in_order(&mut cluster).await;
    channel_history_keeps_the_latest_publications_at_consecutive_positions(&mut cluster).await;
    cluster.finish().await;
}

/// How a phase moves the master.
#[derive(Debug, Clone, Copy)]
enum Failover {
    /// SIGKILL: every connection to it breaks.
    Kill,
    /// `SENTINEL FAILOVER`: the old master lives on as a replica.
    Commanded,
}

/// The Sentinel set, failing over `how`.
struct Moving<'a> {
    set: &'a SentinelSet,
    how: Failover,
}

impl FailsOver for Moving<'_> {
    async fn fail_over(&self) -> (u16, u16) {
        let set = self.set;
        let old = set.master_port().await;
        match self.how {
            Failover::Kill => {
                set.kill_master().await;
            }
            Failover::Commanded => {
                let mut sentinel = redis::Client::open(set.sentinels[0].as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let _: () = redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(&set.master_name)
                    .query_async(&mut sentinel)
                    .await
                    .unwrap();
            }
        }
        (old, set.wait_failover(old).await)
    }

    async fn assert_routed(&self, ids: &[ClientId]) {
        let mut master = conn(self.set.master_port().await).await;
        let routes: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg("fabric:client-nodes")
            .query_async(&mut master)
            .await
            .unwrap();
        for id in ids {
            assert!(
                routes.contains_key(&id.to_string()),
                "{:?}: {id} routed on the new master",
                self.how
            );
        }
    }
}

/// A master killed, then (once it is back as a replica) a failover
/// commanded back to it: the nodes follow both by themselves.
#[tokio::test]
async fn the_nodes_follow_the_master_through_a_kill_and_a_commanded_failover() {
    let set = SentinelSet::start().await;
    let certs = TestCerts::new();
    // A TTL longer than the gap, as in production (10 s by default vs a
    // ~3.5 s failover); the gap outlasting it is covered by the unit
    // tests of Membership.
    let history = |c: &mut quic_fabric::NodeConfig| {
        c.node_ttl = Duration::from_secs(5);
        c.namespaces = vec!["h,history_size=10000,history_ttl=10m".parse().unwrap()];
    };
    let n1 = ha_node(&set, &certs, "n1", history).await;
    let n2 = ha_node(&set, &certs, "n2", history).await;
    wait_ready(&[&n1, &n2]).await;

    let killing = Moving {
        set: &set,
        how: Failover::Kill,
    };
    let (old, _, killed) = failover_under_traffic(&killing, "Kill", &n1, &n2, "h:Kill").await;
    println!("sentinel failover: {killed}");
    set.restart(old).await;
    // Back as a replica of the new master, and synced.
    wait_replica(old).await;
    let commanding = Moving {
        set: &set,
        how: Failover::Commanded,
    };
    let (_, back, commanded) =
        failover_under_traffic(&commanding, "Commanded", &n1, &n2, "h:Commanded").await;
    println!("sentinel failover: {commanded}");
    assert_eq!(back, old, "the only replica was the old master");
    set.remove().await;
}
