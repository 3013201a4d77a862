//! Resumable sessions (PROTOCOL.md 11.8) against real Redis: a client
//! whose node is killed resumes on another node with the same id and gets
//! every direct message the fabric accepted for it, once and in order
//! (also from a sender whose route to it went stale); a
//! session not resumed within its window ends (stored messages gone from
//! Redis, senders told UNKNOWN_CLIENT); a token presented by two
//! connections at once resumes exactly one; hostile tokens get a fresh
//! session, never someone else's id. On the in-memory engine: a token
//! presented by another user, and a resume on the same node.

mod common;

use std::time::Duration;

use common::cluster::Cluster;
use common::redis::{RedisNodes, TestRedis, redis_node_process};
use common::{RawClient, TestCerts, TestNode, WAIT, encode, eventually, read_frame};
use quic_fabric::client::{Client, ClientError, Event};
use quic_fabric::protocol::{
    Body, ClientId, Frame, Handshake, Payload, Priority, SessionOutcome, error_code,
};
use redis::AsyncCommands;

/// A raw connection that asked for a session: its id and Session frame.
struct Raw {
    client: RawClient,
    /// The node's first stream (high priority), kept open.
    recv: quinn::RecvStream,
    /// The stream the ResumeHandshake went on, kept open.
    send: quinn::SendStream,
    id: ClientId,
    token: String,
    outcome: SessionOutcome,
}

/// Opens a raw connection to `addr` with a ResumeHandshake presenting
/// `resume`.
async fn resume_at(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    resume: Option<String>,
) -> Raw {
    resume_as(addr, ca, None, resume).await
}

/// [`resume_at`] with a JWT in the handshake.
async fn resume_as(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    jwt: Option<String>,
    resume: Option<String>,
) -> Raw {
    let client = RawClient::try_connect_to(addr, ca, |_| {}).await.unwrap();
    let hello = Frame::new(
        Priority::High,
        Body::ResumeHandshake {
            handshake: Handshake {
                min_version: 3,
                max_version: 3,
                name: "raw".into(),
                token: jwt,
            },
            resume,
        },
    );
    let send = client.send_raw(&encode(&hello)).await;
    let mut recv = tokio::time::timeout(WAIT, client.conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let Some(Body::HandshakeAck(ack)) = read_frame(&mut recv).await.map(|f| f.body) else {
        panic!("HandshakeAck first");
    };
    let Some(Body::Session { token, outcome, .. }) = read_frame(&mut recv).await.map(|f| f.body)
    else {
        panic!("Session right after the HandshakeAck");
    };
    Raw {
        client,
        recv,
        send,
        id: ack.client_id,
        token,
        outcome,
    }
}

/// Sends a direct from `sender` to `to` until the node stores it (the
/// recipient's detach reached Redis); returns its reply.
async fn direct_until_stored(sender: &Client, to: ClientId, text: &str) {
    let frame = Frame::new(
        Priority::Normal,
        Body::Direct {
            to,
            payload: Payload::Text(text.into()),
        },
    );
    eventually(WAIT, "the direct is stored", || {
        let frame = Frame {
            id: quic_fabric::protocol::MessageId::new_random(),
            ..frame.clone()
        };
        async move {
            let reply = sender.submit(Priority::Normal, frame.body).await.unwrap();
            matches!(reply.wait().await.map(|f| f.body), Ok(Body::Stored { .. }))
        }
    })
    .await;
}

#[tokio::test]
async fn directs_to_a_client_whose_node_died_arrive_after_it_resumes_elsewhere_same_id_in_order() {
    const COUNT: usize = 300;
    let redis = TestRedis::start().await;
    let certs = TestCerts::new();
    let ttl = Duration::from_secs(3);
    let a = redis_node_process(&redis, &certs, ttl, &[]).await;
    let mut b = redis_node_process(&redis, &certs, ttl, &[]).await;
    let c = redis_node_process(&redis, &certs, ttl, &[]).await;
    let d = redis_node_process(&redis, &certs, ttl, &[]).await;

    let config = common::resilient(b.client_config("receiver"), vec![c.addr.clone()], 2 * COUNT);
    let mut receiver = Client::connect(&config).await.unwrap();
    assert_eq!(receiver.session_outcome(), Some(SessionOutcome::New));
    let id = receiver.client_id();
    let sender = a.connect("sender").await;
    // A sender on a node of its own, which learns the receiver's route
    // now and sends nothing more until the receiver has moved.
    let late = d.connect("late").await;
    late.direct(id, Payload::Text("0".into()), Priority::Normal)
        .await
        .unwrap();
    let mut accepted = Vec::new();
    for i in 1..=100 {
        sender
            .direct(id, Payload::Text(i.to_string()), Priority::Normal)
            .await
            .unwrap();
        accepted.push(i);
    }
    b.kill().await;
    // Keep sending while B is dead, the receiver moves, and B's liveness
    // key expires: each is accepted (Ack or Stored) or refused plainly.
    let mut refused = 0;
    for i in 101..=COUNT {
        match sender
            .direct(id, Payload::Text(i.to_string()), Priority::Normal)
            .await
        {
            Ok(_) => accepted.push(i),
            Err(ClientError::Server { code, .. }) if code == error_code::CLUSTER_UNAVAILABLE => {
                refused += 1
            }
            Err(err) => panic!("direct {i}: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let mut got: Vec<usize> = Vec::new();
    let mut session = None;
    let collect = async {
        loop {
            match receiver.next_event().await.expect("events go on") {
                Event::Frame(frame) => {
                    if let Body::Direct {
                        payload: Payload::Text(text),
                        ..
                    } = frame.body
                    {
                        let n: usize = text.parse().unwrap();
                        if n > 0 {
                            got.push(n);
                        }
                    }
                }
                Event::Reconnected {
                    client_id,
                    session: outcome,
                    ..
                } => {
                    assert_eq!(client_id, id, "the same id after the resume");
                    session = outcome;
                }
                Event::Closed { reason, .. } => panic!("closed: {reason}"),
                _ => {}
            }
            if got.last() == accepted.last() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .unwrap_or_else(|_| panic!("got {} of {} accepted", got.len(), accepted.len()));
    assert_eq!(session, Some(SessionOutcome::Resumed));
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, none twice: {got:?}"
    );
    for i in &accepted {
        assert!(got.contains(i), "accepted direct {i} arrived");
    }
    assert!(
        accepted.len() > 100,
        "directs were accepted while the receiver was away ({refused} refused)"
    );
    assert_eq!(receiver.client_id(), id);
    // Node D still routes to dead B: it finds B gone and the session on C.
    tokio::time::sleep(ttl).await;
    let last = late
        .direct(id, Payload::Text("late".into()), Priority::Normal)
        .await
        .expect("a sender whose route went stale reaches the resumed session");
    common::next_matching(&mut receiver, |f| f.id == last).await;
}

#[tokio::test]
async fn a_session_not_resumed_within_its_window_ends_with_what_was_stored_for_it() {
    let cluster = RedisNodes::start_with(2, |_, c| {
        c.session_resume_window = Duration::from_secs(1);
    })
    .await;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let away = resume_at(n1.addr, &n1.ca, None).await;
    assert_eq!(away.outcome, SessionOutcome::New);
    assert!(away.token.starts_with("fs1."));
    let id = away.id;
    away.client.conn.close(0u32.into(), b"gone");
    let sender = n2.connect("sender").await;
    direct_until_stored(&sender, id, "kept").await;
    let mut redis = cluster.redis.conn().await;
    let session_key = format!("fabric:session:{id}");
    let inbox_key = format!("fabric:inbox:{id}");
    assert_eq!(redis.llen::<_, usize>(&inbox_key).await.unwrap(), 1);
    // The window passes: the session and its stored message are gone.
    eventually(WAIT, "the session expires", || {
        let mut redis = redis.clone();
        let (s, i) = (session_key.clone(), inbox_key.clone());
        async move {
            let gone: (bool, bool) = redis::pipe()
                .exists(&s)
                .exists(&i)
                .query_async(&mut redis)
                .await
                .unwrap();
            gone == (false, false)
        }
    })
    .await;
    let err = sender
        .direct(id, Payload::Text("late".into()), Priority::Normal)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Server { code, .. } if code == error_code::UNKNOWN_CLIENT),
        "{err}"
    );
    let back = resume_at(n2.addr, &n2.ca, Some(away.token)).await;
    assert_eq!(back.outcome, SessionOutcome::Expired);
    assert_ne!(back.id, id, "an ended session's id is not handed out again");
}

#[tokio::test]
async fn a_token_presented_twice_at_once_resumes_exactly_one_connection() {
    let cluster = RedisNodes::start_with(2, |_, _| {}).await;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let first = resume_at(n1.addr, &n1.ca, None).await;
    let id = first.id;
    let mut token = first.token.clone();
    let mut holder = first;
    for round in 0..20 {
        let (x, y) = tokio::join!(
            resume_at(n1.addr, &n1.ca, Some(token.clone())),
            resume_at(n2.addr, &n2.ca, Some(token.clone())),
        );
        let (winner, loser) = match (x.outcome, y.outcome) {
            (SessionOutcome::Resumed, _) => (x, y),
            (_, SessionOutcome::Resumed) => (y, x),
            other => panic!("round {round}: no winner: {other:?}"),
        };
        assert_eq!(loser.outcome, SessionOutcome::AlreadyUsed, "round {round}");
        assert_eq!(winner.id, id, "round {round}");
        assert_ne!(loser.id, id, "round {round}: never someone else's id");
        // The previous holder is closed with SESSION_MOVED.
        holder
            .client
            .expect_closed_with(quic_fabric::protocol::close_code::SESSION_MOVED)
            .await;
        // The old token does not work twice.
        let replay = resume_at(n2.addr, &n2.ca, Some(token.clone())).await;
        assert_eq!(replay.outcome, SessionOutcome::AlreadyUsed);
        token = winner.token.clone();
        holder = winner;
    }
}

#[tokio::test]
async fn hostile_resume_tokens_get_a_fresh_session_and_a_working_connection() {
    let node = TestNode::start().await;
    let genuine = resume_at(node.addr, &node.ca, None).await;
    let other_cluster = quic_fabric::session::TokenKeys::new(&[9u8; 32], None, "fabric").issue(
        &quic_fabric::session::Claims {
            client: genuine.id,
            user: None,
            generation: 1,
            expires_ms: u64::MAX,
        },
    );
    let t = &genuine.token;
    let cases = [
        ("forged", other_cluster),
        ("truncated", t[..t.len() - 3].to_owned()),
        ("garbage base64", "fs1.!!!!.????".to_owned()),
        ("empty", String::new()),
        ("no prefix", t.replacen("fs1.", "", 1)),
        ("swapped parts", {
            let (body, mac) = t[4..].split_once('.').unwrap();
            format!("fs1.{mac}.{body}")
        }),
        ("oversized", format!("fs1.{}", "A".repeat(1500))),
    ];
    for (what, token) in cases {
        let mut raw = resume_at(node.addr, &node.ca, Some(token)).await;
        assert_eq!(raw.outcome, SessionOutcome::Invalid, "{what}");
        assert_ne!(raw.id, genuine.id, "{what}: never another client's id");
        // The connection works.
        raw.send.write_all(&encode(&common::ping())).await.unwrap();
        assert!(
            matches!(
                read_frame(&mut raw.recv).await.map(|f| f.body),
                Some(Body::Pong { .. })
            ),
            "{what}"
        );
    }
    // A ResumeHandshake later in the connection is refused like a second
    // Handshake, and one offering no version 3 is refused.
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, ack) = raw.handshake("v1").await;
    assert!(matches!(ack.body, Body::HandshakeAck(_)));
    let again = Frame::new(
        Priority::High,
        Body::ResumeHandshake {
            handshake: Handshake {
                min_version: 1,
                max_version: 1,
                name: "x".into(),
                token: None,
            },
            resume: None,
        },
    );
    send.write_all(&encode(&again)).await.unwrap();
    let reply = read_frame(&mut recv).await.expect("a reply");
    assert!(
        matches!(reply.body, Body::Error { code, .. } if code == error_code::UNKNOWN_FRAME_TYPE),
        "{reply:?}"
    );
    let old = RawClient::connect(&node).await;
    let _send = old.send_raw(&encode(&again)).await;
    old.expect_closed_with(quic_fabric::protocol::close_code::UNSUPPORTED_VERSION)
        .await;
}

/// On the in-memory engine (a lone node) with JWT auth: another user's
/// connection presenting a session's token gets WrongUser and a new id
/// (and the token stays good); the owner resumes on the same node, same
/// id, and gets the direct stored while it was away.
#[tokio::test]
async fn a_token_is_refused_to_another_user_and_resumes_for_its_own() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef-sess";
    let node = TestNode::start_with(|c| c.auth_jwt_secret = Some(SECRET.into())).await;
    let jwt = |user: &str| {
        Some(
            quic_fabric::auth::mint_hs256(SECRET, user, Duration::from_secs(600), None, None, &[])
                .unwrap(),
        )
    };
    let alice = resume_as(node.addr, &node.ca, jwt("alice"), None).await;
    let id = alice.id;
    alice.client.conn.close(0u32.into(), b"network gone");
    let mut sender_config = node.client_config("bob");
    sender_config.token = jwt("bob");
    let bob = Client::connect(&sender_config).await.unwrap();
    direct_until_stored(&bob, id, "while you were away").await;

    let mallory = resume_as(
        node.addr,
        &node.ca,
        jwt("mallory"),
        Some(alice.token.clone()),
    )
    .await;
    assert_eq!(mallory.outcome, SessionOutcome::WrongUser);
    assert_ne!(mallory.id, id, "never another user's id");

    let back = resume_as(node.addr, &node.ca, jwt("alice"), Some(alice.token)).await;
    assert_eq!(back.outcome, SessionOutcome::Resumed);
    assert_eq!(back.id, id);
    let mut stream = tokio::time::timeout(WAIT, back.client.conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let stored = read_frame(&mut stream).await.expect("the stored direct");
    assert!(
        matches!(
            &stored.body,
            Body::Direct { payload: Payload::Text(t), .. } if t == "while you were away"
        ),
        "{stored:?}"
    );
    assert_eq!(stored.sender.map(|s| s.user), Some(Some("bob".into())));
}

/// A connection gets a new token at half the token's lifetime: once the
/// first token has expired, the refreshed one still resumes the session.
#[tokio::test]
async fn a_long_connection_gets_fresh_tokens_that_outlive_the_first() {
    let node = TestNode::start_with(|c| {
        c.session_token_lifetime = Duration::from_secs(4);
        c.session_resume_window = Duration::from_secs(2);
    })
    .await;
    let started = tokio::time::Instant::now();
    let mut raw = resume_at(node.addr, &node.ca, None).await;
    let first = raw.token.clone();
    let refreshed = tokio::time::timeout(Duration::from_secs(4), read_frame(&mut raw.recv))
        .await
        .expect("a refreshed token within the lifetime");
    let Some(Body::Session {
        token,
        outcome: SessionOutcome::Refreshed,
        stored: 0,
        ..
    }) = refreshed.map(|f| f.body)
    else {
        panic!("expected Session(Refreshed)");
    };
    assert_ne!(token, first);
    // Past the first token's lifetime, within the second's.
    tokio::time::sleep_until(started + Duration::from_millis(4300)).await;
    raw.client.conn.close(0u32.into(), b"gone");
    let stale = resume_at(node.addr, &node.ca, Some(first)).await;
    assert_eq!(stale.outcome, SessionOutcome::Expired);
    let back = resume_at(node.addr, &node.ca, Some(token)).await;
    assert_eq!(back.outcome, SessionOutcome::Resumed);
    assert_eq!(back.id, raw.id);
}
