//! Cross-node scenarios, written once over the [`Cluster`] fixture and run
//! on every bus engine: `cluster_scenarios!(MemoryNodes)` in
//! `tests/cluster_memory.rs`, `cluster_scenarios!(RedisNodes)` in
//! `tests/cluster_redis.rs`. Each takes the nodes [`cluster_scenarios!`]
//! started for it; a new scenario goes in that macro's list too, so no
//! engine can miss it.

use quic_fabric::bus::ClusterBus;
use quic_fabric::client::Client;
use quic_fabric::protocol::{Body, ClientId, Payload, Priority};

use super::cluster::Cluster;
use super::{
    assert_none_before_echo, deliver, deliver_payload, directs_arrive_in_order, expect_unknown,
    next_matching,
};

/// One `#[tokio::test]` per scenario, each on 3 fresh nodes of `$engine`
/// (a [`Cluster`]), torn down with [`Cluster::finish`].
#[macro_export]
macro_rules! cluster_scenarios {
    ($engine:ty) => {
        $crate::cluster_scenarios!(
            $engine:
            broadcast_crosses_nodes_and_reaches_every_other_client_once,
            direct_crosses_nodes_and_is_acknowledged_on_delivery_in_order,
            direct_to_a_client_nowhere_in_the_cluster_is_unknown_client,
            list_shows_every_client_of_the_cluster_with_its_node,
            a_node_leaving_takes_its_clients_out_of_the_cluster,
        );
    };
    ($engine:ty: $($scenario:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $scenario() {
                use $crate::common::cluster::Cluster as _;
                let mut cluster = <$engine>::start(3).await;
                $crate::common::scenarios::$scenario(&mut cluster).await;
                cluster.finish().await;
            }
        )+
    };
}

/// Two clients on every node; the first broadcasts.
pub async fn broadcast_crosses_nodes_and_reaches_every_other_client_once(
    cluster: &mut impl Cluster,
) {
    let nodes = cluster.nodes();
    let mut clients: Vec<Client> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..2 {
            clients.push(node.connect(&format!("c{i}{j}")).await);
        }
    }
    let id = clients[0]
        .broadcast(Payload::Text("to all".into()), Priority::Normal)
        .await
        .unwrap();
    // Once to every other client, on its own node and on the others.
    for c in clients.iter_mut().skip(1) {
        let got = next_matching(c, |f| f.id == id).await;
        assert_eq!(
            got.body,
            Body::Broadcast {
                payload: Payload::Text("to all".into())
            }
        );
        assert_eq!(got.sender.unwrap().node_id, nodes[0].id());
        assert_none_before_echo(c, |f| f.id == id).await;
    }
    // Not back to the sender.
    assert_none_before_echo(&mut clients[0], |f| f.id == id).await;
}

pub async fn direct_crosses_nodes_and_is_acknowledged_on_delivery_in_order(
    cluster: &mut impl Cluster,
) {
    let nodes = cluster.nodes();
    let a = nodes[0].connect("a").await;
    let mut c = nodes[2].connect("c").await;
    deliver_payload(
        &a,
        &mut c,
        Payload::Text("over there".into()),
        Priority::High,
    )
    .await;
    // Order holds across nodes too.
    for got in directs_arrive_in_order(&a, &mut c, 100).await {
        assert_eq!(got.sender.unwrap().node_id, nodes[0].id());
    }
}

pub async fn direct_to_a_client_nowhere_in_the_cluster_is_unknown_client(
    cluster: &mut impl Cluster,
) {
    let a = cluster.nodes()[0].connect("a").await;
    expect_unknown(&a, ClientId::new_random()).await;
}

/// Two clients on the first node, one on each other; every node's view.
pub async fn list_shows_every_client_of_the_cluster_with_its_node(cluster: &mut impl Cluster) {
    let nodes = cluster.nodes();
    let placed = [("a", 0), ("a2", 0), ("b", 1), ("c", 2)];
    let mut clients = Vec::new();
    for (name, node) in placed {
        clients.push(nodes[node].connect(name).await);
    }
    let all: Vec<_> = clients.iter().map(Client::client_id).collect();
    cluster.wait_listed(&clients[0], &all).await;
    let expected: Vec<(String, _)> = placed
        .iter()
        .map(|(name, node)| (name.to_string(), nodes[*node].id()))
        .collect();
    for (observer, (name, _)) in clients.iter().zip(placed) {
        let (listed, truncated) = observer.list().await.unwrap();
        assert!(!truncated);
        let mut seen: Vec<(String, _)> =
            listed.iter().map(|c| (c.name.clone(), c.node_id)).collect();
        seen.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(seen, expected, "as {name} sees it");
    }
}

/// A graceful stop: the node removes its presence before it stops.
pub async fn a_node_leaving_takes_its_clients_out_of_the_cluster(cluster: &mut impl Cluster) {
    let nodes = cluster.nodes();
    let a = nodes[0].connect("a").await;
    let b = nodes[1].connect("b").await;
    let b_id = b.client_id();
    cluster.wait_listed(&a, &[a.client_id(), b_id]).await;
    cluster.nodes_mut()[1].stop().await;
    let nodes = cluster.nodes();
    // No waiting: gone from the list and from the live nodes at once.
    let (clients, _) = a.list().await.unwrap();
    assert_eq!(
        clients.iter().map(|c| c.client_id).collect::<Vec<_>>(),
        vec![a.client_id()]
    );
    let mut live = nodes[0].bus().live_nodes().await.unwrap();
    let mut staying = vec![nodes[0].id(), nodes[2].id()];
    live.sort();
    staying.sort();
    assert_eq!(live, staying);
    expect_unknown(&a, b_id).await;
    // The remaining nodes still talk.
    let mut c = nodes[2].connect("c").await;
    deliver(&a, &mut c, "still here").await;
}
