//! Three nodes in one process over the in-memory bus: the cluster logic
//! (presence, cross-node broadcast and direct, node departure) without Redis.

mod common;

use common::{TestCerts, TestNode, assert_none_before_echo, next_matching};
use quic_fabric::bus::memory::MemoryCluster;
use quic_fabric::client::Client;
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{Body, ClientId, Payload, Priority, error_code};

async fn three_nodes() -> (TestCerts, Vec<TestNode>) {
    let certs = TestCerts::new();
    let cluster = MemoryCluster::new();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(
            TestNode::start_on(BusChoice::Memory(cluster.clone()), Some(&certs), |c| {
                c.name = format!("node{i}")
            })
            .await,
        );
    }
    (certs, nodes)
}

#[tokio::test]
async fn broadcast_crosses_nodes_and_reaches_every_other_client_once() {
    let (_certs, nodes) = three_nodes().await;
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
    assert_none_before_echo(&mut clients[0], |f| f.id == id).await;
}

#[tokio::test]
async fn direct_crosses_nodes_and_is_acknowledged_on_delivery() {
    let (_certs, nodes) = three_nodes().await;
    let a = nodes[0].connect("a").await;
    let mut c = nodes[2].connect("c").await;
    let id = a
        .direct(
            c.client_id(),
            Payload::Text("over there".into()),
            Priority::High,
        )
        .await
        .unwrap();
    let got = next_matching(&mut c, |f| f.id == id).await;
    assert_eq!(
        got.body,
        Body::Direct {
            to: c.client_id(),
            payload: Payload::Text("over there".into())
        }
    );
    assert_eq!(got.sender.unwrap().client_id, a.client_id());
    // Order holds across nodes too.
    let mut pending = Vec::new();
    for i in 0..100u32 {
        let body = Body::Direct {
            to: c.client_id(),
            payload: Payload::Text(i.to_string()),
        };
        pending.push(a.submit(Priority::Normal, body).await.unwrap());
    }
    for p in pending {
        p.wait().await.unwrap();
    }
    for i in 0..100u32 {
        let got = next_matching(&mut c, |f| matches!(f.body, Body::Direct { .. })).await;
        assert_eq!(
            got.body,
            Body::Direct {
                to: c.client_id(),
                payload: Payload::Text(i.to_string())
            }
        );
    }
}

#[tokio::test]
async fn list_shows_every_client_of_the_cluster_with_its_node() {
    let (_certs, nodes) = three_nodes().await;
    let a = nodes[0].connect("a").await;
    let _b = nodes[1].connect("b").await;
    let _c = nodes[2].connect("c").await;
    let (clients, truncated) = a.list().await.unwrap();
    assert!(!truncated);
    let mut seen: Vec<(String, _)> = clients
        .iter()
        .map(|c| (c.name.clone(), c.node_id))
        .collect();
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    let expected: Vec<(String, _)> = ["a", "b", "c"]
        .iter()
        .zip(&nodes)
        .map(|(n, node)| (n.to_string(), node.id()))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_node_leaving_takes_its_clients_out_of_the_cluster() {
    let (_certs, mut nodes) = three_nodes().await;
    let a = nodes[0].connect("a").await;
    let b = nodes[1].connect("b").await;
    let b_id = b.client_id();
    nodes[1].stop().await;
    let (clients, _) = a.list().await.unwrap();
    assert!(clients.iter().all(|c| c.client_id != b_id), "{clients:?}");
    common::expect_server_error(
        a.direct(b_id, Payload::Text("gone?".into()), Priority::Normal)
            .await,
        error_code::UNKNOWN_CLIENT,
    );
    // The remaining nodes still talk.
    let mut c = nodes[2].connect("c").await;
    let id = a
        .direct(
            c.client_id(),
            Payload::Text("still here".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    next_matching(&mut c, |f| f.id == id).await;
}

#[tokio::test]
async fn direct_to_a_client_nowhere_in_the_cluster_is_an_error() {
    let (_certs, nodes) = three_nodes().await;
    let a = nodes[0].connect("a").await;
    common::expect_server_error(
        a.direct(
            ClientId::new_random(),
            Payload::Text("?".into()),
            Priority::Normal,
        )
        .await,
        error_code::UNKNOWN_CLIENT,
    );
}
