//! Cross-node scenarios, written once over the [`Cluster`] fixture and run
//! on every bus engine: `cluster_scenarios!(MemoryNodes)` in
//! `tests/cluster_memory.rs`, `cluster_scenarios!(RedisNodes)` in
//! `tests/cluster_redis.rs`. Each takes the nodes [`cluster_scenarios!`]
//! started for it; a new scenario goes in that macro's list too, so no
//! engine can miss it.

use quic_fabric::bus::ClusterBus;
use quic_fabric::client::Client;
use quic_fabric::protocol::{Body, ClientId, Frame, Payload, Priority, error_code};

use super::cluster::Cluster;
use super::{
    assert_none_before_echo, deliver, deliver_payload, directs_arrive_in_order, eventually,
    expect_server_error, expect_unknown, next_matching,
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
            channel_publications_reach_exactly_the_subscribers_once_in_order,
            channel_presence_and_join_leave_events_cross_nodes,
        );
        $crate::cluster_scenarios!(
            $engine, $crate::common::scenarios::with_jwt;
            user_messages_reach_every_connection_of_the_user_on_every_node,
            granted_namespaces_follow_the_token_on_every_node,
        );
        $crate::cluster_scenarios!(
            $engine, $crate::common::scenarios::with_history;
            channel_history_keeps_the_latest_publications_at_consecutive_positions,
            a_subscriber_recovers_from_a_position_or_is_told_why_not,
            idempotent_messages_are_handled_once_whichever_node_each_attempt_reaches,
        );
    };
    ($engine:ty: $($scenario:ident),+ $(,)?) => {
        $crate::cluster_scenarios!($engine, |_, _| {}; $($scenario),+);
    };
    ($engine:ty, $tweak:expr; $($scenario:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $scenario() {
                use $crate::common::cluster::Cluster as _;
                let mut cluster = <$engine>::start_with(3, $tweak).await;
                $crate::common::scenarios::$scenario(&mut cluster).await;
                cluster.finish().await;
            }
        )+
    };
}

/// The HS256 secret of [`with_jwt`] nodes.
pub const JWT_SECRET: &str = "0123456789abcdef0123456789abcdef-chan";

/// Node settings for the scenarios that need users: JWT auth with
/// [`JWT_SECRET`], and a namespace `vip` only the token's `channels`
/// claim opens, where only the server publishes.
pub fn with_jwt(_: usize, config: &mut quic_fabric::NodeConfig) {
    config.auth_jwt_secret = Some(JWT_SECRET.into());
    config.namespaces = vec![
        "vip,subscribe=granted,publish=granted".parse().unwrap(),
        "news,publish=nobody".parse().unwrap(),
    ];
}

/// Node settings for the history scenarios: namespace `h` keeps the last
/// 5 publications of each channel for 10 minutes.
pub fn with_history(_: usize, config: &mut quic_fabric::NodeConfig) {
    config.namespaces = vec!["h,history_size=5,history_ttl=10m".parse().unwrap()];
}

/// A client of `node` authenticated as `user`, granted `channels`.
pub async fn connect_as(node: &super::TestNode, user: &str, channels: &[&str]) -> Client {
    let mut config = node.client_config(user);
    let channels: Vec<String> = channels.iter().map(|c| (*c).to_owned()).collect();
    config.token = Some(
        quic_fabric::auth::mint_hs256(
            JWT_SECRET,
            user,
            std::time::Duration::from_secs(600),
            None,
            None,
            &channels,
        )
        .unwrap(),
    );
    Client::connect(&config).await.unwrap()
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

fn publication_text(frame: &Frame, channel: &str) -> Option<String> {
    match &frame.body {
        Body::Publish {
            channel: c,
            payload: Payload::Text(text),
        }
        | Body::Publication {
            channel: c,
            payload: Payload::Text(text),
            ..
        } if c == channel => Some(text.clone()),
        _ => None,
    }
}

fn is_publication(frame: &Frame) -> bool {
    matches!(frame.body, Body::Publish { .. } | Body::Publication { .. })
}

/// Subscribers on two nodes, non-subscribers on every node, a publisher
/// on the third: every subscriber gets each publication once and in
/// order, nobody else gets any; after the subscribers of a node leave,
/// they get nothing more.
pub async fn channel_publications_reach_exactly_the_subscribers_once_in_order(
    cluster: &mut impl Cluster,
) {
    let nodes = cluster.nodes();
    let mut subs = vec![
        nodes[0].connect("s0").await,
        nodes[1].connect("s1a").await,
        nodes[1].connect("s1b").await,
    ];
    let mut others = vec![
        nodes[0].connect("x0").await,
        nodes[1].connect("x1").await,
        nodes[2].connect("x2").await,
    ];
    let publisher = nodes[2].connect("p").await;
    // The namespace keeps presence: each ack counts the members so far.
    for (i, s) in subs.iter().enumerate() {
        assert_eq!(
            s.subscribe("room", false).await.unwrap(),
            Some(i as u64 + 1)
        );
    }
    // Another channel's subscriber, to be sure it gets nothing of "room".
    others[2].subscribe("elsewhere", false).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            publisher
                .publish("room", Payload::Text(format!("m{i}")), Priority::Normal)
                .await
                .unwrap(),
        );
    }
    for s in &mut subs {
        for (i, id) in ids.iter().enumerate() {
            let got = next_matching(s, is_publication).await;
            assert_eq!(got.id, *id, "in the order published");
            assert_eq!(publication_text(&got, "room"), Some(format!("m{i}")));
            let from = got.sender.expect("stamped");
            assert_eq!(from.client_id, publisher.client_id());
            assert_eq!(from.node_id, nodes[2].id());
        }
        assert_none_before_echo(s, is_publication).await;
    }
    for o in &mut others {
        assert_none_before_echo(o, is_publication).await;
    }
    // The second node's subscribers leave: the rest still get them.
    subs[1].unsubscribe("room").await.unwrap();
    subs[2].unsubscribe("room").await.unwrap();
    let id = publisher
        .publish("room", Payload::Text("after".into()), Priority::Normal)
        .await
        .unwrap();
    assert_eq!(next_matching(&mut subs[0], is_publication).await.id, id);
    for s in &mut subs[1..] {
        assert_none_before_echo(s, is_publication).await;
    }
    // A publisher that is subscribed gets its own publication too.
    let id = subs[0]
        .publish("room", Payload::Text("mine".into()), Priority::High)
        .await
        .unwrap();
    assert_eq!(next_matching(&mut subs[0], is_publication).await.id, id);
}

/// Members on every node show in every node's presence answer; Join and
/// Leave events reach the subscribers that asked for them, on other
/// nodes too, and only those.
pub async fn channel_presence_and_join_leave_events_cross_nodes(cluster: &mut impl Cluster) {
    let nodes = cluster.nodes();
    let mut a = nodes[0].connect("a").await;
    let b = nodes[1].connect("b").await;
    let mut c = nodes[2].connect("c").await;
    a.subscribe("lobby", true).await.unwrap();
    b.subscribe("lobby", true).await.unwrap();
    let joined = next_matching(&mut a, |f| matches!(f.body, Body::Join { .. })).await;
    let Body::Join { channel, member } = joined.body else {
        unreachable!()
    };
    assert_eq!(channel, "lobby");
    assert_eq!(member.client_id, b.client_id());
    assert_eq!(member.node_id, nodes[1].id());
    assert_eq!(member.name, "b");
    c.subscribe("lobby", false).await.unwrap();
    let (members, truncated) = c.presence("lobby").await.unwrap();
    assert!(!truncated);
    let mut seen: Vec<_> = members
        .iter()
        .map(|m| (m.name.clone(), m.node_id))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("a".to_owned(), nodes[0].id()),
            ("b".to_owned(), nodes[1].id()),
            ("c".to_owned(), nodes[2].id())
        ]
    );
    // b disconnects: a hears it leave, c (no events) hears nothing.
    let b_id = b.client_id();
    b.close("bye").await;
    let left = next_matching(&mut a, |f| matches!(f.body, Body::Leave { .. })).await;
    let Body::Leave { member, .. } = left.body else {
        unreachable!()
    };
    assert_eq!(member.client_id, b_id);
    let events = |f: &Frame| matches!(f.body, Body::Join { .. } | Body::Leave { .. });
    assert_none_before_echo(&mut c, events).await;
    // Gone from presence: the leave was written before the event went out.
    let (members, _) = a.presence("lobby").await.unwrap();
    assert!(members.iter().all(|m| m.client_id != b_id), "{members:?}");
    assert_eq!(members.len(), 2);
}

/// `alice` connected to two nodes, `bob` on the third: a message to the
/// user reaches both of her connections; to a user with none it is
/// UNKNOWN_USER.
pub async fn user_messages_reach_every_connection_of_the_user_on_every_node(
    cluster: &mut impl Cluster,
) {
    let nodes = cluster.nodes();
    let mut alice0 = connect_as(&nodes[0], "alice", &[]).await;
    let mut alice2 = connect_as(&nodes[2], "alice", &[]).await;
    let bob = connect_as(&nodes[1], "bob", &[]).await;
    let id = bob
        .send_to_user("alice", Payload::Text("hi alice".into()), Priority::Normal)
        .await
        .unwrap();
    for alice in [&mut alice0, &mut alice2] {
        let got = next_matching(alice, |f| f.id == id).await;
        assert_eq!(
            got.body,
            Body::UserDirect {
                user: "alice".into(),
                payload: Payload::Text("hi alice".into())
            }
        );
        let from = got.sender.unwrap();
        assert_eq!(from.user.as_deref(), Some("bob"));
        assert_eq!(from.client_id, bob.client_id());
    }
    let sent = bob
        .send_to_user("carol", Payload::Text("anyone?".into()), Priority::Normal)
        .await;
    let message = expect_server_error(sent, error_code::UNKNOWN_USER);
    assert!(message.contains("carol"), "{message}");
    // Once one of her connections is gone, the other still gets them,
    // and the user's id still finds her (no stale routing entry).
    alice0.close("bye").await;
    let id = bob
        .send_to_user(
            "alice",
            Payload::Text("still there?".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    assert_eq!(next_matching(&mut alice2, |f| f.id == id).await.id, id);
    alice2.close("bye").await;
    // With both gone, the user is unknown (presence is removed in order
    // with the leave; on Redis the write may take a moment to land).
    eventually(super::WAIT, "alice unknown once she left", || async {
        matches!(
            bob.send_to_user("alice", Payload::Text("?".into()), Priority::Normal)
                .await,
            Err(quic_fabric::client::ClientError::Server { code, .. }) if code == error_code::UNKNOWN_USER
        )
    })
    .await;
}

/// A `granted` namespace: the token's `channels` claim decides, the same
/// on every node; a `publish=nobody` namespace refuses every client.
pub async fn granted_namespaces_follow_the_token_on_every_node(cluster: &mut impl Cluster) {
    let nodes = cluster.nodes();
    let mut vip = connect_as(&nodes[0], "vip-user", &["vip:lounge-*"]).await;
    let guest = connect_as(&nodes[1], "guest", &[]).await;
    let other = connect_as(&nodes[2], "other", &["vip:lounge-*"]).await;
    vip.subscribe("vip:lounge-1", false).await.unwrap();
    let refused = guest.subscribe("vip:lounge-1", false).await;
    let message = expect_server_error(refused, error_code::NOT_ALLOWED);
    assert!(message.contains("vip:lounge-1"), "{message}");
    let refused = other.subscribe("vip:backstage", false).await;
    expect_server_error(refused, error_code::NOT_ALLOWED);
    let refused = guest
        .publish(
            "vip:lounge-1",
            Payload::Text("let me in".into()),
            Priority::Normal,
        )
        .await;
    expect_server_error(refused, error_code::NOT_ALLOWED);
    let id = other
        .publish(
            "vip:lounge-1",
            Payload::Text("welcome".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    assert_eq!(next_matching(&mut vip, is_publication).await.id, id);
    let refused = vip
        .publish("news:today", Payload::Text("x".into()), Priority::Normal)
        .await;
    let message = expect_server_error(refused, error_code::NOT_ALLOWED);
    assert!(message.contains("only the server"), "{message}");
    let refused = vip.subscribe("nowhere:x", false).await;
    expect_server_error(refused, error_code::UNKNOWN_NAMESPACE);
    // The refusals left every connection open.
    guest.ping().await.unwrap();
    vip.ping().await.unwrap();
}

/// The id of the frame a history entry holds.
fn entry_id(entry: &quic_fabric::bus::HistoryEntry) -> quic_fabric::protocol::MessageId {
    let frame = quic_fabric::protocol::decode_frame(&entry.frame[4..]).expect("a frame");
    assert!(matches!(frame.body, Body::Publish { .. }), "{frame:?}");
    frame.id
}

/// Publications from two nodes to a channel that keeps history take
/// consecutive offsets in one epoch, whichever node appends them; every
/// node reads the same latest 5 (the size) with their positions, pages
/// back with `before`, and subscribers get every publication as before.
/// A channel of a namespace without history keeps none.
pub async fn channel_history_keeps_the_latest_publications_at_consecutive_positions(
    cluster: &mut impl Cluster,
) {
    let nodes = cluster.nodes();
    let mut sub = nodes[1].connect("s").await;
    let first = nodes[2].connect("p1").await;
    let second = nodes[0].connect("p2").await;
    sub.subscribe("h:room", false).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..8 {
        let publisher = if i < 6 { &first } else { &second };
        ids.push(
            publisher
                .publish("h:room", Payload::Text(format!("m{i}")), Priority::Normal)
                .await
                .unwrap(),
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let got = next_matching(&mut sub, is_publication).await;
        assert_eq!(got.id, *id, "in the order published");
        assert_eq!(publication_text(&got, "h:room"), Some(format!("m{i}")));
    }
    let mut epoch = None;
    for node in nodes {
        let page = node
            .bus()
            .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 5)
            .await
            .unwrap();
        assert_eq!(page.position.offset, 8, "8 published");
        assert_eq!(
            *epoch.get_or_insert(page.position.epoch),
            page.position.epoch
        );
        let offsets: Vec<u64> = page.entries.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, vec![4, 5, 6, 7, 8], "the latest 5, oldest first");
        let kept: Vec<_> = page.entries.iter().map(entry_id).collect();
        assert_eq!(kept, ids[3..].to_vec());
        assert!(!page.more, "only 5 are kept");
    }
    let page = nodes[2]
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 2)
        .await
        .unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![7, 8]
    );
    assert!(page.more, "older ones are kept");
    let page = nodes[2]
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(Some(7)), 2)
        .await
        .unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert!(page.more);
    let page = nodes[2]
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(Some(5)), 5)
        .await
        .unwrap();
    assert_eq!(
        page.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![4]
    );
    assert!(!page.more);
    // The same epoch continues: the next offset is 9.
    first
        .publish("h:room", Payload::Text("m8".into()), Priority::High)
        .await
        .unwrap();
    let page = nodes[0]
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 1)
        .await
        .unwrap();
    assert_eq!(page.position.epoch, epoch.unwrap());
    assert_eq!(page.position.offset, 9);
    assert_eq!(page.entries[0].priority, Priority::High);
    // No history in the default namespace: nothing kept, offset 0.
    first
        .publish("room", Payload::Text("x".into()), Priority::Normal)
        .await
        .unwrap();
    let page = nodes[0]
        .bus()
        .history("room", quic_fabric::bus::HistoryRange::Before(None), 5)
        .await
        .unwrap();
    assert_eq!((page.position.offset, page.entries.len()), (0, 0));

    // Publishers on two nodes at once: subscribers on two nodes (one of
    // them the publisher's) get the same order, the history's.
    let mut near = nodes[0].connect("near").await;
    near.subscribe("h:room", false).await.unwrap();
    let burst = async |publisher: &Client, tag: &str| {
        for i in 0..10 {
            publisher
                .publish(
                    "h:room",
                    Payload::Text(format!("{tag}{i}")),
                    Priority::Normal,
                )
                .await
                .unwrap();
        }
    };
    tokio::join!(burst(&first, "a"), burst(&second, "b"));
    let mut orders = Vec::new();
    for client in [&mut sub, &mut near] {
        let mut order = Vec::new();
        while order.len() < 20 {
            let got = next_matching(client, is_publication).await;
            if let Some(text) = publication_text(&got, "h:room")
                && (text.starts_with('a') || text.starts_with('b'))
            {
                order.push(got.id);
            }
        }
        orders.push(order);
    }
    assert_eq!(orders[0], orders[1], "one order for every subscriber");
    let page = nodes[1]
        .bus()
        .history("h:room", quic_fabric::bus::HistoryRange::Before(None), 5)
        .await
        .unwrap();
    let kept: Vec<_> = page.entries.iter().map(entry_id).collect();
    assert_eq!(kept, orders[0][15..].to_vec(), "the history's order");
}

/// The position of a Publication frame.
fn position_of(frame: &Frame) -> quic_fabric::protocol::Position {
    match &frame.body {
        Body::Publication { position, .. } => *position,
        other => panic!("not a Publication: {other:?}"),
    }
}

/// SubscribeSince on another node than the publisher's: a position still
/// in the history gets what followed it (before the answer, then live,
/// none twice); the answer says `recovered` only then, and otherwise why
/// not (trimmed, ahead, another epoch, no history) with the position the
/// subscriber goes on from, replaying nothing.
pub async fn a_subscriber_recovers_from_a_position_or_is_told_why_not(cluster: &mut impl Cluster) {
    use quic_fabric::bus::HistoryRange;
    use quic_fabric::protocol::{Position, Recovery};
    let nodes = cluster.nodes();
    let publisher = nodes[0].connect("p").await;
    let say = async |from: u32, to: u32| {
        for i in from..=to {
            publisher
                .publish("h:r", Payload::Text(format!("m{i}")), Priority::Normal)
                .await
                .unwrap();
        }
    };
    say(1, 4).await;
    let top = nodes[1]
        .bus()
        .history("h:r", HistoryRange::Before(None), 1)
        .await
        .unwrap()
        .position;
    assert_eq!(top.offset, 4);
    let at = |offset| Position {
        epoch: top.epoch,
        offset,
    };

    let mut sub = nodes[1].connect("s").await;
    let got = sub
        .subscribe_since("h:r", false, Some(at(2)))
        .await
        .unwrap();
    assert_eq!(
        (got.recovery, got.position),
        (Recovery::Recovered, Some(at(4)))
    );
    for i in 3..=4 {
        let frame = next_matching(&mut sub, is_publication).await;
        assert_eq!(publication_text(&frame, "h:r"), Some(format!("m{i}")));
        assert_eq!(position_of(&frame), at(i as u64));
    }
    assert_none_before_echo(&mut sub, is_publication).await;

    let mut other = nodes[2].connect("o").await;
    let elsewhere = Position {
        epoch: top.epoch ^ 0xff,
        offset: 2,
    };
    // From another epoch: the channel's epoch is replayed from its start,
    // since the history still holds all of it.
    let got = other
        .subscribe_since("h:r", false, Some(elsewhere))
        .await
        .unwrap();
    assert_eq!(
        (got.recovery, got.position),
        (Recovery::EpochChanged, Some(at(4)))
    );
    // (The library also reports the new epoch when its first publication
    // arrives, before them.)
    match other.next_event().await {
        Some(quic_fabric::client::Event::Subscribed { recovery, .. }) => {
            assert_eq!(recovery, Recovery::EpochChanged)
        }
        other => panic!("expected the library's EpochChanged, got {other:?}"),
    }
    for i in 1..=4 {
        let frame = next_matching(&mut other, is_publication).await;
        assert_eq!(position_of(&frame), at(i as u64));
    }
    assert_none_before_echo(&mut other, is_publication).await;
    let cases = [(at(4), Recovery::Recovered), (at(9), Recovery::Ahead)];
    for (since, recovery) in cases {
        let got = other
            .subscribe_since("h:r", false, Some(since))
            .await
            .unwrap();
        assert_eq!(
            (got.recovery, got.position),
            (recovery, Some(at(4))),
            "{since}"
        );
        assert_none_before_echo(&mut other, is_publication).await;
    }

    // Past the history size (5): 6..=10 are kept.
    say(5, 10).await;
    for client in [&mut sub, &mut other] {
        for i in 5..=10 {
            let frame = next_matching(client, is_publication).await;
            assert_eq!(position_of(&frame), at(i));
        }
    }
    let got = other
        .subscribe_since("h:r", false, Some(at(3)))
        .await
        .unwrap();
    assert_eq!(
        (got.recovery, got.position),
        (Recovery::Trimmed, Some(at(10)))
    );
    assert_none_before_echo(&mut other, is_publication).await;
    // From another epoch, when this one is no longer whole: nothing.
    let got = other
        .subscribe_since("h:r", false, Some(elsewhere))
        .await
        .unwrap();
    assert_eq!(
        (got.recovery, got.position),
        (Recovery::EpochChanged, Some(at(10)))
    );
    assert_none_before_echo(&mut other, is_publication).await;
    let mut late = nodes[2].connect("late").await;
    let got = late
        .subscribe_since("h:r", false, Some(at(5)))
        .await
        .unwrap();
    assert_eq!(
        (got.recovery, got.position),
        (Recovery::Recovered, Some(at(10)))
    );
    for i in 6..=10 {
        let frame = next_matching(&mut late, is_publication).await;
        assert_eq!(position_of(&frame), at(i));
    }
    // Live from there on, once.
    say(11, 11).await;
    for client in [&mut sub, &mut late] {
        let frame = next_matching(client, is_publication).await;
        assert_eq!(position_of(&frame), at(11));
        assert_none_before_echo(client, is_publication).await;
    }
    // No history in the default namespace.
    let got = late
        .subscribe_since("room", false, Some(at(1)))
        .await
        .unwrap();
    assert_eq!((got.recovery, got.position), (Recovery::NoHistory, None));
}

/// Sends `frame` on `client` and returns the answer the node gives it.
async fn answer_to(client: &mut Client, frame: &Frame) -> Frame {
    client.send_frame(frame).await.unwrap();
    next_matching(client, |f| f.body.reply_to() == Some(frame.id)).await
}

/// The same Idempotent frame sent on two nodes (as a client does after
/// losing the answer and reconnecting elsewhere): the message is handled
/// once; the second attempt gets the first one's answer (Ack), or Error 21
/// DUPLICATE naming the first one's error.
pub async fn idempotent_messages_are_handled_once_whichever_node_each_attempt_reaches(
    cluster: &mut impl Cluster,
) {
    use quic_fabric::protocol::Keyed;
    let nodes = cluster.nodes();
    let mut sub = nodes[2].connect("sub").await;
    sub.subscribe("room", false).await.unwrap();
    let mut a = nodes[0].connect("a").await;
    let mut b = nodes[1].connect("b").await;
    let keyed = |message| Frame::new(Priority::Normal, Body::Idempotent { message });
    let sent = [
        keyed(Keyed::Publish {
            channel: "room".into(),
            payload: Payload::Text("once".into()),
        }),
        keyed(Keyed::Broadcast {
            payload: Payload::Text("once to all".into()),
        }),
        keyed(Keyed::Direct {
            to: sub.client_id(),
            payload: Payload::Text("once to you".into()),
        }),
    ];
    for frame in &sent {
        for client in [&mut a, &mut b] {
            let answer = answer_to(client, frame).await;
            assert!(matches!(answer.body, Body::Ack { .. }), "{answer:?}");
        }
        let got = next_matching(&mut sub, |f| f.id == frame.id).await;
        assert_eq!(
            got.sender.unwrap().client_id,
            a.client_id(),
            "the first attempt's"
        );
    }
    assert_none_before_echo(&mut sub, |f| sent.iter().any(|s| s.id == f.id)).await;
    // A first attempt refused: the retry is not handled again either.
    let lost = keyed(Keyed::Direct {
        to: ClientId::new_random(),
        payload: Payload::Text("nobody".into()),
    });
    let first = answer_to(&mut a, &lost).await;
    assert!(
        matches!(first.body, Body::Error { code, .. } if code == error_code::UNKNOWN_CLIENT),
        "{first:?}"
    );
    let again = answer_to(&mut b, &lost).await;
    match again.body {
        Body::Error { code, message, .. } => {
            assert_eq!(code, error_code::DUPLICATE);
            assert!(
                message.contains(&format!(
                    "the first attempt got error {}",
                    error_code::UNKNOWN_CLIENT.0
                )),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}
