//! End-to-end messaging on one node, over real QUIC on loopback.

mod common;

use common::{
    RawClient, TestNode, WAIT, assert_none_before_echo, deliver_payload, directs_arrive_in_order,
    encode, eventually, expect_unknown, next_matching, read_frame,
};
use quic_fabric::client::{ClientError, Event};
use quic_fabric::protocol::{Body, ClientId, Frame, HandshakeAck, Payload, Priority};
use std::time::Duration;

#[tokio::test]
async fn handshake_assigns_ids_and_reports_the_node() {
    let node = TestNode::start().await;
    let a = node.connect("alice").await;
    let b = node.connect("bob").await;
    assert_ne!(a.client_id(), b.client_id());
    assert_eq!(a.node_id(), node.id());
    assert_eq!(a.handshake().version, 3);
    assert_eq!(a.handshake().server_name, "test-node");
    assert_eq!(
        a.handshake().max_frame_bytes as usize,
        node.config().max_message_bytes
    );
}

#[tokio::test]
async fn broadcast_reaches_every_other_client_exactly_once() {
    let node = TestNode::start().await;
    let mut a = node.connect("alice").await;
    let mut b = node.connect("bob").await;
    let mut c = node.connect("carol").await;

    let id = a
        .broadcast(Payload::Text("hello all".into()), Priority::Normal)
        .await
        .unwrap();
    for receiver in [&mut b, &mut c] {
        let got = next_matching(receiver, |f| f.id == id).await;
        assert_eq!(
            got.body,
            Body::Broadcast {
                payload: Payload::Text("hello all".into())
            }
        );
        let sender = got.sender.expect("node stamps the sender");
        assert_eq!(sender.client_id, a.client_id());
        assert_eq!(sender.name, "alice");
        // Exactly once: nothing else carrying that id before a later probe.
        assert_none_before_echo(receiver, |f| f.id == id).await;
    }
    // The sender does not get its own broadcast.
    assert_none_before_echo(&mut a, |f| f.id == id).await;
}

#[tokio::test]
async fn direct_message_reaches_only_its_target() {
    let node = TestNode::start().await;
    let a = node.connect("alice").await;
    let mut b = node.connect("bob").await;
    let mut c = node.connect("carol").await;

    let got = deliver_payload(&a, &mut b, Payload::Binary(vec![1, 2, 3]), Priority::High).await;
    assert_eq!(got.priority, Priority::High);
    assert_none_before_echo(&mut c, |f| f.id == got.id).await;
}

#[tokio::test]
async fn a_direct_to_oneself_is_delivered_then_acknowledged() {
    // PROTOCOL.md section 5: the node treats the sender like any recipient;
    // the delivery is queued before the Ack, on the same stream.
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, ack) = raw.handshake("alice").await;
    let Body::HandshakeAck(HandshakeAck { client_id: me, .. }) = ack.body else {
        panic!("no HandshakeAck: {ack:?}")
    };
    // High: the replies come on the node's high stream, which carried
    // the HandshakeAck.
    let direct = Frame::new(
        Priority::High,
        Body::Direct {
            to: me,
            payload: Payload::Text("note to self".into()),
        },
    );
    send.write_all(&encode(&direct)).await.unwrap();
    let delivered = read_frame(&mut recv).await.unwrap();
    assert_eq!(delivered.id, direct.id);
    assert_eq!(delivered.body, direct.body);
    assert_eq!(delivered.sender.unwrap().client_id, me);
    assert_eq!(
        read_frame(&mut recv).await.unwrap().body,
        Body::Ack { of: direct.id }
    );
}

#[tokio::test]
async fn empty_payloads_are_messages_like_any_other() {
    let node = TestNode::start().await;
    let a = node.connect("alice").await;
    let mut b = node.connect("bob").await;
    for payload in [Payload::Text(String::new()), Payload::Binary(Vec::new())] {
        deliver_payload(&a, &mut b, payload.clone(), Priority::Normal).await;
        let id = a.broadcast(payload.clone(), Priority::Low).await.unwrap();
        let got = next_matching(&mut b, |f| f.id == id).await;
        assert_eq!(got.body, Body::Broadcast { payload });
    }
    a.send_text("")
        .await
        .expect("an empty Text is acknowledged");
    a.send_binary(Vec::new())
        .await
        .expect("an empty Binary is acknowledged");
}

#[tokio::test]
async fn direct_to_unknown_client_is_an_error_for_the_sender() {
    let node = TestNode::start().await;
    let a = node.connect("alice").await;
    expect_unknown(&a, ClientId::new_random()).await;
}

#[tokio::test]
async fn messages_between_two_clients_keep_their_order() {
    let node = TestNode::start().await;
    let a = node.connect("alice").await;
    let mut b = node.connect("bob").await;
    directs_arrive_in_order(&a, &mut b, 200).await;
}

#[tokio::test]
async fn text_and_binary_are_echoed_and_acknowledged() {
    let node = TestNode::start().await;
    let mut a = node.connect("alice").await;
    let id = a.send_text("echo me").await.unwrap();
    let echo = next_matching(&mut a, |f| f.id == id).await;
    assert_eq!(
        echo.body,
        Body::Text {
            text: "echo me".into()
        }
    );
    assert_eq!(echo.sender.unwrap().client_id, a.client_id());

    let id = a.send_binary(vec![0, 255]).await.unwrap();
    let echo = next_matching(&mut a, |f| f.id == id).await;
    assert_eq!(echo.body, Body::Binary { data: vec![0, 255] });
}

#[tokio::test]
async fn list_shows_every_connected_client_and_drops_leavers() {
    let node = TestNode::start().await;
    let a = node.connect("alice").await;
    let b = node.connect("bob").await;
    let (clients, truncated) = a.list().await.unwrap();
    assert!(!truncated);
    let mut names: Vec<_> = clients.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["alice", "bob"]);
    assert!(clients.iter().all(|c| c.node_id == node.id()));

    let b_id = b.client_id();
    b.close("bye").await;
    tokio::time::timeout(WAIT, async {
        loop {
            let (clients, _) = a.list().await.unwrap();
            if clients.iter().all(|c| c.client_id != b_id) {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("bob leaves the list");
}

#[tokio::test]
async fn list_is_capped_and_says_so() {
    let node = TestNode::start_with(|c| c.max_list_clients = 2).await;
    let a = node.connect("a").await;
    let _b = node.connect("b").await;
    let _c = node.connect("c").await;
    let (clients, truncated) = a.list().await.unwrap();
    assert_eq!(clients.len(), 2);
    assert!(truncated);
}

#[tokio::test]
async fn ping_gets_pong_and_stats_count_traffic() {
    let node = TestNode::start().await;
    let a = node.connect("alice").await;
    let rtt = a.ping().await.unwrap();
    assert!(rtt < WAIT);
    let stats = a.stats().await.unwrap();
    assert_eq!(stats.node_id, node.id());
    assert_eq!(stats.clients_connected, 1);
    // Handshake, Ping and the StatsRequest itself.
    assert!(stats.messages_in >= 3, "{stats:?}");
    assert!(stats.bytes_in > 0 && stats.bytes_out > 0);
}

#[tokio::test]
async fn graceful_shutdown_delivers_goodbye_then_closes() {
    let mut node = TestNode::start().await;
    let mut a = node.connect("alice").await;
    let mut b = node.connect("bob").await;
    // Something queued just before shutdown is still delivered first.
    let id = a
        .broadcast(Payload::Text("last words".into()), Priority::Low)
        .await
        .unwrap();
    node.stop().await;
    let mut saw_broadcast = false;
    let mut saw_goodbye = false;
    loop {
        match tokio::time::timeout(WAIT, b.next_event())
            .await
            .expect("events in time")
        {
            Some(Event::Frame(f)) if f.id == id => saw_broadcast = true,
            Some(Event::Frame(f)) => {
                if let Body::Goodbye { reconnect, .. } = f.body {
                    assert!(reconnect, "a restarting node invites reconnects");
                    saw_goodbye = true;
                }
            }
            Some(Event::Closed { code, .. }) => {
                assert_eq!(code, Some(quic_fabric::protocol::close_code::SHUTDOWN));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_broadcast, "queued broadcast delivered before close");
    assert!(saw_goodbye, "goodbye delivered before close");
    // The other client saw the goodbye too.
    let goodbye = next_matching(&mut a, |f| matches!(f.body, Body::Goodbye { .. })).await;
    assert!(matches!(goodbye.body, Body::Goodbye { .. }));
}

#[tokio::test]
async fn client_refuses_a_server_it_cannot_verify() {
    let node = TestNode::start().await;
    let other_ca_dir = tempfile::tempdir().unwrap();
    let other =
        quic_fabric::tls::ensure_dev_certs(other_ca_dir.path(), &["localhost".into()]).unwrap();
    let mut config = node.client_config("mallory");
    config.trust = quic_fabric::tls::ServerTrust::CaFile(other.ca_cert);
    match quic_fabric::client::Client::connect(&config).await {
        Err(ClientError::Connect { reason, .. }) => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        Err(other) => panic!("expected a certificate error, got {other}"),
        Ok(_) => panic!("connected to a server signed by an untrusted CA"),
    }
    // Explicitly insecure mode connects.
    config.trust = quic_fabric::tls::ServerTrust::InsecureAcceptAny;
    quic_fabric::client::Client::connect(&config).await.unwrap();
}

#[tokio::test]
async fn the_handshake_ack_comes_first_even_while_broadcasts_fly() {
    let node = TestNode::start().await;
    let publisher = node.connect("publisher").await;
    let stop = tokio_util::sync::CancellationToken::new();
    let storm = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Bounded: at most 20,000 broadcasts, until the joins are done.
            for i in 0..20_000u32 {
                if stop.is_cancelled() {
                    break;
                }
                let priority = Priority::ALL[i as usize % 3];
                let _ = publisher
                    .submit(
                        priority,
                        Body::Broadcast {
                            payload: Payload::Text(i.to_string()),
                        },
                    )
                    .await;
                tokio::task::yield_now().await;
            }
        })
    };
    // A client whose first frame is not the HandshakeAck fails to connect.
    for i in 0..20 {
        let mut c = node.connect(&format!("joiner{i}")).await;
        c.ping().await.unwrap();
        drop(c.take_events());
    }
    stop.cancel();
    storm.await.unwrap();
}

#[tokio::test]
async fn many_clients_of_one_process_share_a_few_udp_sockets() {
    let node = TestNode::start().await;
    let mut clients = Vec::new();
    for i in 0..60 {
        clients.push(node.connect(&format!("c{i}")).await);
    }
    let ports: std::collections::HashSet<u16> = clients
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    assert!(
        ports.len() <= quic_fabric::client::shared_pool_size(),
        "60 clients dial from {} UDP ports; the shared pool has {}",
        ports.len(),
        quic_fabric::client::shared_pool_size()
    );
    // Sharing sockets takes nothing from delivery: a broadcast reaches all.
    let (sender, receivers) = clients.split_first_mut().unwrap();
    let id = sender
        .broadcast(Payload::Text("to all".into()), Priority::Normal)
        .await
        .unwrap();
    for receiver in receivers {
        next_matching(receiver, |f| f.id == id).await;
    }
}

#[tokio::test]
async fn every_congestion_controller_carries_messages_both_ways() {
    use quic_fabric::client::{Client, Congestion};
    for (node_cc, client_cc) in [
        (Congestion::Cubic, Congestion::Bbr),
        (Congestion::Bbr, Congestion::NewReno),
        (Congestion::NewReno, Congestion::Cubic),
    ] {
        let node = TestNode::start_with(|c| c.congestion_controller = node_cc).await;
        let mut config = node.client_config("sender");
        config.congestion = client_cc;
        let sender = Client::connect(&config).await.unwrap();
        let mut receiver = node.connect("receiver").await;
        // Large enough to take many packets in each direction.
        let bulk = vec![7u8; 256 * 1024];
        let id = sender
            .direct(
                receiver.client_id(),
                Payload::Binary(bulk.clone()),
                Priority::Low,
            )
            .await
            .unwrap_or_else(|e| panic!("{node_cc:?}/{client_cc:?}: {e}"));
        let got = next_matching(&mut receiver, |f| f.id == id).await;
        assert!(
            matches!(&got.body, Body::Direct { payload: Payload::Binary(b), .. } if *b == bulk),
            "{node_cc:?} node, {client_cc:?} client: the payload arrives whole"
        );
    }
}

#[tokio::test]
async fn a_connection_finds_the_largest_mtu_with_few_probes_each_way() {
    // Each path-MTU probe is a full-size packet plus an acknowledgment;
    // quinn's default search sends four each way on every new connection,
    // more than the rest of the handshake (BENCHMARKS.md, `connections`).
    let node = TestNode::start().await;
    let client = node.connect("prober").await;
    eventually(Duration::from_secs(5), "the path MTU reaches 1452", || {
        let mtu = client.quic_stats().path.current_mtu;
        async move { mtu == 1452 }
    })
    .await;
    let stats = client.quic_stats();
    assert!(
        stats.path.sent_plpmtud_probes <= 2,
        "the client sent {} MTU probes",
        stats.path.sent_plpmtud_probes
    );
    // The node's probes are the PING frames the client received (no
    // keep-alive is due this early).
    assert!(
        stats.frame_rx.ping <= 2,
        "the node sent {} MTU probes",
        stats.frame_rx.ping
    );
}
