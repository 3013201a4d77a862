//! Channels on one node: names, namespace rules, limits, presence
//! answers, protocol version 1 clients beside version 2, the client
//! library's resubscription after a reconnect, and subscriptions that end
//! with their token. The cross-node behaviour is in the shared cluster
//! scenarios (`tests/common/scenarios.rs`, run over both bus engines).

mod common;

use std::time::Duration;

use common::scenarios::{JWT_SECRET, connect_as, with_jwt};
use common::{
    TestCerts, TestNode, WAIT, assert_none_before_echo, deliver, eventually, expect_server_error,
    next_matching,
};
use quic_fabric::client::{Client, ClientConfig, Event, ReconnectPolicy};
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{Body, Frame, Payload, Priority, close_code, error_code};

fn is_publication(frame: &Frame) -> bool {
    matches!(frame.body, Body::Publish { .. })
}

#[tokio::test]
async fn bad_channel_names_are_invalid_field_with_the_rule_and_the_connection_stays() {
    let node = TestNode::start().await;
    let client = node.connect("c").await;
    let long = "c".repeat(256);
    let cases = [
        ("", "must be 1 to 255 bytes, not 0"),
        (long.as_str(), "must be 1 to 255 bytes, not 256"),
        ("a room", "byte 1 is a space"),
        ("caf\u{e9}", "byte 3 is 0xc3"),
        ("room*", "byte 4 is `*`"),
        (":x", "empty namespace"),
        ("ns:", "empty name"),
        ("n/s:x", "namespace \"n/s\""),
    ];
    for (channel, why) in cases {
        for refused in [
            client.subscribe(channel, false).await.map(drop),
            client
                .publish(channel, Payload::Text("x".into()), Priority::Normal)
                .await
                .map(drop),
            client.presence(channel).await.map(drop),
            client.unsubscribe(channel).await,
        ] {
            let message = expect_server_error(refused, error_code::INVALID_FIELD);
            assert!(message.starts_with("channel "), "{message}");
            assert!(message.contains(why), "{channel:?}: {message}");
        }
    }
    let refused = client.subscribe("chat:room", false).await;
    let message = expect_server_error(refused, error_code::UNKNOWN_NAMESPACE);
    assert!(message.contains("\"chat\""), "{message}");
    // Not a user name either: the name rule applies.
    let refused = client
        .send_to_user("a\nb", Payload::Text("x".into()), Priority::Normal)
        .await;
    expect_server_error(refused, error_code::INVALID_FIELD);
    client.ping().await.unwrap();
}

#[tokio::test]
async fn subscriptions_per_client_are_limited_and_the_limit_is_per_client() {
    let node = TestNode::start_with(|c| c.max_subscriptions = 3).await;
    let client = node.connect("c").await;
    for i in 0..3 {
        client.subscribe(&format!("c{i}"), false).await.unwrap();
    }
    // Subscribing again to one it has is no new subscription.
    client.subscribe("c0", true).await.unwrap();
    let refused = client.subscribe("c3", false).await;
    let message = expect_server_error(refused, error_code::TOO_MANY_SUBSCRIPTIONS);
    assert!(message.contains('3'), "{message}");
    // Leaving one makes room; the connection stayed usable throughout.
    client.unsubscribe("c1").await.unwrap();
    client.subscribe("c3", false).await.unwrap();
    // Unsubscribing from a channel it is not in is acknowledged too.
    client.unsubscribe("never").await.unwrap();
    let other = node.connect("other").await;
    other.subscribe("c0", false).await.unwrap();
}

#[tokio::test]
async fn presence_answers_are_truncated_at_the_limit_and_presence_can_be_off() {
    let node = TestNode::start_with(|c| {
        c.max_presence_members = 2;
        c.namespaces = vec!["quiet,presence=off,join_leave=off".parse().unwrap()];
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = node.connect(&format!("m{i}")).await;
        client.subscribe("room", false).await.unwrap();
        clients.push(client);
    }
    let (members, truncated) = clients[0].presence("room").await.unwrap();
    assert!(truncated);
    // The oldest connections first.
    let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["m0", "m1"]);

    // Presence off: no count in the ack, no member list, no events.
    let mut watcher = node.connect("w").await;
    assert_eq!(watcher.subscribe("quiet:x", true).await.unwrap(), None);
    let refused = watcher.presence("quiet:x").await;
    let message = expect_server_error(refused, error_code::NOT_ALLOWED);
    assert!(message.contains("presence is off"), "{message}");
    clients[1].subscribe("quiet:x", false).await.unwrap();
    let events = |f: &Frame| matches!(f.body, Body::Join { .. } | Body::Leave { .. });
    assert_none_before_echo(&mut watcher, events).await;
}

#[tokio::test]
async fn publish_rules_subscribers_and_nobody_and_the_server_publishes_anyway() {
    let node = TestNode::start_with(|c| {
        c.channel_publish = quic_fabric::config::PublishPolicy::Subscribers;
        c.namespaces = vec!["news,publish=nobody".parse().unwrap()];
    })
    .await;
    let mut member = node.connect("member").await;
    let outsider = node.connect("outsider").await;
    member.subscribe("room", false).await.unwrap();
    let refused = outsider
        .publish("room", Payload::Text("hi".into()), Priority::Normal)
        .await;
    let message = expect_server_error(refused, error_code::NOT_ALLOWED);
    assert!(message.contains("only subscribers of room"), "{message}");
    let id = member
        .publish("room", Payload::Text("hi".into()), Priority::Normal)
        .await
        .unwrap();
    assert_eq!(next_matching(&mut member, is_publication).await.id, id);

    member.subscribe("news:today", false).await.unwrap();
    let refused = member
        .publish("news:today", Payload::Text("x".into()), Priority::Normal)
        .await;
    expect_server_error(refused, error_code::NOT_ALLOWED);
    let (id, local) = node
        .server_publish("news:today", Priority::High, Payload::Text("extra".into()))
        .await
        .unwrap();
    assert_eq!(local, 1);
    let got = next_matching(&mut member, is_publication).await;
    assert_eq!(got.id, id);
    assert_eq!(got.sender, None, "a server publication has no sender");
}

#[tokio::test]
async fn authenticated_namespaces_refuse_anonymous_clients() {
    let node = TestNode::start_with(|c| {
        c.channel_subscribe = quic_fabric::config::SubscribePolicy::Authenticated;
    })
    .await;
    let anonymous = node.connect("anon").await;
    let refused = anonymous.subscribe("room", false).await;
    let message = expect_server_error(refused, error_code::NOT_ALLOWED);
    assert!(message.contains("authenticated user"), "{message}");
    let refused = anonymous.presence("room").await;
    expect_server_error(refused, error_code::NOT_ALLOWED);
}

#[test]
fn history_settings_are_checked_with_a_clear_error() {
    let with = |spec: &str| quic_fabric::NodeConfig {
        namespaces: vec![spec.parse().unwrap()],
        ..Default::default()
    };
    for (spec, why) in [
        (
            "h,history_size=10",
            "history needs both history_size and history_ttl (got 10 and 0s)",
        ),
        ("h,history_ttl=1m", "history needs both"),
        (
            "h,history_size=1000001,history_ttl=1m",
            "history_size must be at most 1000000",
        ),
        (
            "h,history_size=5,history_ttl=100ms",
            "history_ttl must be at least 1s",
        ),
        (
            "h,history_size=5,history_ttl=2d",
            "must not exceed history_meta_ttl (1day)",
        ),
    ] {
        let err = with(spec).validate().unwrap_err().to_string();
        assert!(
            err.contains("namespace \"h\"") && err.contains(why),
            "{spec}: {err}"
        );
    }
    with("h,history_size=5,history_ttl=10m").validate().unwrap();
    let config = quic_fabric::NodeConfig {
        history_size: 5,
        ..Default::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("the default namespace: history needs both"),
        "{err}"
    );
    for (spec, why) in [
        (
            "h,history_size=many",
            "history_size=many: expected a number",
        ),
        ("h,history_ttl=soon", "history_ttl=soon"),
    ] {
        let err = spec.parse::<quic_fabric::config::Namespace>().unwrap_err();
        assert!(err.contains(why), "{spec}: {err}");
    }
    let ns: quic_fabric::config::Namespace = "h,history_size=7,history_ttl=90s".parse().unwrap();
    assert_eq!(
        ns.to_string(),
        "h,subscribe=anyone,publish=anyone,presence=on,join_leave=on,history_size=7,history_ttl=1m 30s"
    );
}

#[tokio::test]
async fn granted_namespaces_need_jwt_auth_in_the_config() {
    let mut config = quic_fabric::NodeConfig {
        namespaces: vec!["vip,subscribe=granted".parse().unwrap()],
        ..Default::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(
        err.contains("namespace \"vip\": `granted` needs JWT"),
        "{err}"
    );
    config.auth_jwt_secret = Some(JWT_SECRET.into());
    config.validate().unwrap();
    config.namespaces.push("vip".parse().unwrap());
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("declared twice"), "{err}");
    let err = "vip,publish=sometimes"
        .parse::<quic_fabric::config::Namespace>()
        .unwrap_err();
    assert!(
        err.contains("expected one of anyone, subscribers, granted, nobody"),
        "{err}"
    );
}

#[tokio::test]
async fn a_subscription_ends_with_its_token() {
    let node = TestNode::start_with(|c| {
        with_jwt(0, c);
        c.auth_leeway = Duration::ZERO;
    })
    .await;
    let watcher = connect_as(&node, "watcher", &["vip:*"]).await;
    let mut config = node.client_config("brief");
    config.token = Some(
        quic_fabric::auth::mint_hs256(
            JWT_SECRET,
            "brief",
            Duration::from_secs(2),
            None,
            None,
            &["vip:*".to_owned()],
        )
        .unwrap(),
    );
    let mut brief = Client::connect(&config).await.unwrap();
    brief.subscribe("vip:room", false).await.unwrap();
    watcher.subscribe("vip:room", false).await.unwrap();
    assert_eq!(watcher.presence("vip:room").await.unwrap().0.len(), 2);
    // At expiry the connection closes, and the subscription with it.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match brief.next_event().await {
                Some(Event::Closed { code, .. }) => return code,
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await
    .expect("closed at expiry");
    assert_eq!(closed, Some(close_code::TOKEN_EXPIRED));
    eventually(WAIT, "the expired member leaves presence", || async {
        watcher.presence("vip:room").await.unwrap().0.len() == 1
    })
    .await;
}

#[tokio::test]
async fn a_version_1_client_works_unchanged_beside_version_2_clients() {
    let node = TestNode::start_with(|c| with_jwt(0, c)).await;
    let mut config = node.client_config("old");
    config.max_version = 1;
    config.token = Some(
        quic_fabric::auth::mint_hs256(JWT_SECRET, "old-timer", WAIT * 60, None, None, &[]).unwrap(),
    );
    let mut old = Client::connect(&config).await.unwrap();
    assert_eq!(old.handshake().version, 1);
    let mut new = connect_as(&node, "newcomer", &[]).await;
    assert_eq!(new.handshake().version, 3);
    // Version 1 messaging as before, both ways.
    deliver(&new, &mut old, "hello old").await;
    deliver(&old, &mut new, "hello new").await;
    let id = old
        .broadcast(Payload::Text("all".into()), Priority::Normal)
        .await
        .unwrap();
    next_matching(&mut new, |f| f.id == id).await;
    // Version 2 frames are unknown to a version 1 connection, which stays.
    let refused = old.subscribe("room", false).await;
    let message = expect_server_error(refused, error_code::UNKNOWN_FRAME_TYPE);
    assert!(
        message.contains("subscribe frames need protocol version 2"),
        "{message}"
    );
    old.ping().await.unwrap();
    // A message to its user reaches it as a Direct addressed to it.
    let id = new
        .send_to_user(
            "old-timer",
            Payload::Text("via user".into()),
            Priority::Normal,
        )
        .await
        .unwrap();
    let got = next_matching(&mut old, |f| f.id == id).await;
    assert_eq!(
        got.body,
        Body::Direct {
            to: old.client_id(),
            payload: Payload::Text("via user".into())
        }
    );
    assert_eq!(got.sender.unwrap().user.as_deref(), Some("newcomer"));
    // And publications never reach it (it cannot subscribe).
    new.subscribe("room", false).await.unwrap();
    new.publish("room", Payload::Text("x".into()), Priority::Normal)
        .await
        .unwrap();
    assert_none_before_echo(&mut old, is_publication).await;
}

#[tokio::test]
async fn the_library_subscribes_again_after_a_reconnect_and_says_so() {
    let certs = TestCerts::new();
    let node = TestNode::start_on(BusChoice::FromConfig, Some(&certs), |_| {}).await;
    let mut config = ClientConfig::new(node.addr.to_string(), certs.dir.path().join("ca.pem"))
        .name("faithful")
        .reconnect(ReconnectPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            max_attempts: None,
        });
    config.request_timeout = Duration::from_secs(3);
    let mut client = Client::connect(&config).await.unwrap();
    client.subscribe("a", false).await.unwrap();
    client.subscribe("b", true).await.unwrap();
    let old_id = client.client_id();
    // The operator disconnects it; it comes back by itself.
    let publisher = node.connect("publisher").await;
    node.kick(old_id, "go away").await.unwrap();
    let mut resubscribed = None;
    tokio::time::timeout(WAIT, async {
        while let Some(event) = client.next_event().await {
            if let Event::Resubscribed { channels, failed } = event {
                resubscribed = Some((channels, failed));
                return;
            }
        }
    })
    .await
    .expect("resubscribed in time");
    let (mut channels, failed) = resubscribed.unwrap();
    channels.sort();
    assert_eq!(channels, ["a", "b"]);
    assert!(failed.is_empty(), "{failed:?}");
    assert_ne!(client.client_id(), old_id);
    let id = publisher
        .publish("b", Payload::Text("welcome back".into()), Priority::Normal)
        .await
        .unwrap();
    assert_eq!(next_matching(&mut client, is_publication).await.id, id);
    // The node lists the new connection as the member, not the old one.
    let (members, _) = publisher.presence("a").await.unwrap();
    let ids: Vec<_> = members.iter().map(|m| m.client_id).collect();
    assert_eq!(ids, [client.client_id()]);
}
