//! Hostile clients against the hardening limits: message and stream floods
//! (per-client rate limit), stream credit, truncated and oversized frames,
//! admission control before TLS (per-IP count and rate, pending
//! handshakes, Retry) and the node-wide queue budget. Every test checks
//! the documented outcome precisely and that the same node still serves a
//! well-behaved client afterwards. (Cases already in `limits.rs` are not
//! repeated here.)

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{
    RawClient, TestNode, WAIT, assert_pong, connect_when_admitted, deliver, encode, expect_error,
    hello, is_refused, next_frame, next_matching, ping, read_frame,
};
use quic_fabric::client::{Client, ClientError};
use quic_fabric::config::AddressValidation;
use quic_fabric::protocol::{
    self, Body, ClientId, Frame, HandshakeAck, MessageId, Payload, Priority, Sender, close_code,
    error_code,
};
use tokio::sync::mpsc;

/// A library client on another host proves the node still serves others.
/// (One from the abuser's own address would inherit the abuser's
/// rate-limit debt: anonymous clients are limited by address.)
async fn still_serving(node: &TestNode) {
    let c = node.connect_from([127, 0, 0, 2], "bystander").await;
    c.ping().await.expect("node still answers pings");
}

fn stat(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// `Some(of)` when `frame` is a RATE_LIMITED Error (checking that it says
/// when to retry), `None` for anything else.
fn rate_limited(frame: &Frame) -> Option<Option<MessageId>> {
    match &frame.body {
        Body::Error {
            of,
            code,
            retry_after_ms,
            ..
        } if *code == error_code::RATE_LIMITED => {
            assert!(
                retry_after_ms.is_some_and(|ms| ms > 0),
                "RATE_LIMITED carries a positive retry_after_ms: {frame:?}"
            );
            Some(*of)
        }
        _ => None,
    }
}

/// Pings on `send` until a Pong comes back on `recv`, honouring each
/// RATE_LIMITED's retry_after_ms: the rate-limited connection is still
/// usable. Returns how many probes were rate limited first. Every frame
/// read must answer one of the probes: nothing else may be pending.
async fn pong_after_retry(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) -> u64 {
    tokio::time::timeout(WAIT, async {
        let mut limited = 0;
        loop {
            let probe = ping();
            send.write_all(&encode(&probe)).await.unwrap();
            let answer = read_frame(recv).await.expect("an answer to the probe");
            if answer.body == (Body::Pong { of: probe.id }) {
                return limited;
            }
            assert_eq!(rate_limited(&answer), Some(Some(probe.id)), "{answer:?}");
            limited += 1;
            let Body::Error {
                retry_after_ms: Some(ms),
                ..
            } = answer.body
            else {
                unreachable!()
            };
            tokio::time::sleep(Duration::from_millis(ms.into())).await;
        }
    })
    .await
    .expect("a Pong once the client waits as told")
}

// ---------------------------------------------------------------- rate limit

#[tokio::test]
async fn a_ping_flood_gets_one_answer_per_ping_and_the_connection_stays() {
    const BURST: usize = 20;
    // 500 pings at 50/s: without a rejection the node would have to take
    // more than 9 s to read them.
    const PINGS: usize = 500;
    let node = TestNode::start_with(|c| {
        c.rate_limit_messages = 50;
        c.rate_limit_burst = BURST as u32;
        c.rate_limit_strikes = 1_000_000;
    })
    .await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, _) = raw.handshake("flooder").await;

    let pings: Vec<Frame> = (0..PINGS).map(|_| ping()).collect();
    let flood: Vec<u8> = pings.iter().flat_map(encode).collect();
    send.write_all(&flood).await.unwrap();

    // Exactly one answer per ping (Pong or RATE_LIMITED naming it), nothing lost.
    let mut answers: HashMap<MessageId, bool> = HashMap::new(); // id -> got a Pong
    for _ in 0..PINGS {
        let answer = read_frame(&mut recv).await.expect("every ping is answered");
        let (id, pong) = match answer.body {
            Body::Pong { of } => (of, true),
            _ => match rate_limited(&answer) {
                Some(Some(of)) => (of, false),
                _ => panic!("expected Pong or RATE_LIMITED about a ping, got {answer:?}"),
            },
        };
        assert!(answers.insert(id, pong).is_none(), "{id:?} answered twice");
    }
    for p in &pings {
        assert!(answers.contains_key(&p.id), "ping {:?} not answered", p.id);
    }
    // The bucket starts full: the first `BURST` pings all get Pongs.
    for p in &pings[..BURST] {
        assert!(answers[&p.id], "ping within the burst was rate limited");
    }
    let pongs = answers.values().filter(|pong| **pong).count();
    let limited = PINGS - pongs;
    assert!(
        limited > 0,
        "a {PINGS}-ping flood is rate limited at 50/s burst {BURST}"
    );

    // Still open: after waiting as told, a ping gets its Pong.
    let probes_limited = pong_after_retry(&mut send, &mut recv).await;
    assert!(raw.conn.close_reason().is_none());
    let stats = &node.stats();
    assert_eq!(
        stat(&stats.rate_limited),
        limited as u64 + probes_limited,
        "every rejection counted, and only this client's"
    );
    assert_eq!(stat(&stats.rate_limit_disconnects), 0);

    // Another client has its own bucket: its whole burst is served.
    let other = RawClient::connect(&node).await;
    let (mut send2, mut recv2, _) = other.handshake("neighbour").await;
    let burst: Vec<Frame> = (0..BURST).map(|_| ping()).collect();
    send2
        .write_all(&burst.iter().flat_map(encode).collect::<Vec<u8>>())
        .await
        .unwrap();
    for p in &burst {
        assert_eq!(
            read_frame(&mut recv2).await.unwrap().body,
            Body::Pong { of: p.id }
        );
    }
    still_serving(&node).await;
}

#[tokio::test]
async fn sustained_flooding_closes_the_connection_with_rate_limited() {
    let node = TestNode::start_with(|c| {
        c.rate_limit_messages = 10;
        c.rate_limit_burst = 5;
        c.rate_limit_strikes = 20;
    })
    .await;
    let raw = RawClient::connect(&node).await;
    let (mut send, _recv, _) = raw.handshake("abuser").await;
    let flood = async {
        let mut sent = 0u64;
        while send.write_all(&encode(&ping())).await.is_ok() {
            sent += 1;
        }
        sent
    };
    let sent = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the node ends a sustained flood");
    assert!(sent > 5 + 20, "closed only after burst and strikes: {sent}");
    raw.expect_closed_with(close_code::RATE_LIMITED).await;
    assert_eq!(stat(&node.stats().rate_limit_disconnects), 1);
    still_serving(&node).await;
}

// ------------------------------------------------------------------- streams

#[tokio::test]
async fn streams_beyond_the_concurrency_limit_wait_for_credit() {
    // Default: max_streams_per_connection = 3, and the handshake stream is one.
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let (_hs, mut recv, _) = raw.handshake("hoarder").await;
    let mut second = raw.conn.open_uni().await.unwrap();
    let _third = raw.conn.open_uni().await.unwrap();
    // The 4th concurrent stream has no QUIC credit: opening it waits.
    let fourth = raw.conn.open_uni();
    tokio::pin!(fourth);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut fourth)
            .await
            .is_err(),
        "a 4th concurrent stream opened beyond max_streams_per_connection = 3"
    );
    // Once one stream is finished and read to its end, credit comes back.
    let p = ping();
    second.write_all(&encode(&p)).await.unwrap();
    second.finish().unwrap();
    assert_eq!(
        read_frame(&mut recv).await.unwrap().body,
        Body::Pong { of: p.id }
    );
    let mut fourth = tokio::time::timeout(WAIT, fourth)
        .await
        .expect("credit returns after a stream ends")
        .unwrap();
    assert_pong(&mut fourth, &mut recv).await;
    still_serving(&node).await;
}

#[tokio::test]
async fn stream_churn_is_rate_limited_and_every_stream_is_answered() {
    const BURST: usize = 10;
    let node = TestNode::start_with(|c| {
        c.rate_limit_messages = 5;
        c.rate_limit_burst = BURST as u32;
        c.rate_limit_strikes = 1_000_000;
    })
    .await;
    let raw = RawClient::connect(&node).await;
    let (mut hs, mut recv, _) = raw.handshake("churner").await;

    // All answers come on the node's high stream (the Pings are High, and
    // a refused stream is reported at High); read them as they come.
    let rejections = Arc::new(AtomicUsize::new(0));
    let (tx, mut answers) = mpsc::unbounded_channel();
    let reader = {
        let rejections = rejections.clone();
        tokio::spawn(async move {
            while let Some(frame) = next_frame(&mut recv).await {
                if rate_limited(&frame).is_some() {
                    rejections.fetch_add(1, Ordering::Relaxed);
                }
                if tx.send(frame).is_err() {
                    break;
                }
            }
            recv
        })
    };

    // One Ping per fresh stream, finished at once: at most 2 at a time
    // (the handshake stream holds the third credit). Up to 2000 streams
    // for at least 10 s, and on until some rejection was seen.
    let started = tokio::time::Instant::now();
    let mut pings = Vec::new();
    while pings.len() < 2000
        && (started.elapsed() < Duration::from_secs(10) || rejections.load(Ordering::Relaxed) == 0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no rate limiting after {} streams",
            pings.len()
        );
        let mut send = tokio::time::timeout(WAIT, raw.conn.open_uni())
            .await
            .expect("stream credit comes back as streams end")
            .expect("connection stays open");
        let p = ping();
        // A refused stream may be stopped before the write: still an outcome.
        let _ = send.write_all(&encode(&p)).await;
        let _ = send.finish();
        pings.push(p.id);
    }

    // Every stream gets exactly one answer: a Pong or a RATE_LIMITED naming
    // its Ping, or (the stream itself refused) a RATE_LIMITED without `of`.
    let mut pongs = 0;
    let mut ping_limited = 0;
    let mut stream_refused = 0;
    let mut answered = std::collections::HashSet::new();
    for _ in 0..pings.len() {
        let frame = tokio::time::timeout(WAIT, answers.recv())
            .await
            .expect("every stream is answered")
            .expect("reader alive");
        let id = match (&frame.body, rate_limited(&frame)) {
            (Body::Pong { of }, _) => {
                pongs += 1;
                Some(*of)
            }
            (_, Some(Some(of))) => {
                ping_limited += 1;
                Some(of)
            }
            (_, Some(None)) => {
                stream_refused += 1;
                None
            }
            _ => panic!("unexpected answer {frame:?}"),
        };
        if let Some(id) = id {
            assert!(
                pings.contains(&id),
                "answer about an unknown ping {frame:?}"
            );
            assert!(answered.insert(id), "ping answered twice {frame:?}");
        }
    }
    assert_eq!(pongs + ping_limited + stream_refused, pings.len());
    // The first BURST tokens are all granted, each stream takes two (open
    // and Ping), and at most two streams are between the two: at least
    // (BURST - 2) / 2 streams are served in full.
    assert!(pongs >= (BURST - 2) / 2, "pongs: {pongs}");
    assert!(ping_limited + stream_refused > 0);

    // Nothing further is pending: the next answer is a probe's. After
    // waiting as told, a probe gets its Pong: the connection stays usable.
    tokio::time::timeout(WAIT, async {
        loop {
            let p = ping();
            hs.write_all(&encode(&p)).await.unwrap();
            let answer = answers.recv().await.expect("reader alive");
            if answer.body == (Body::Pong { of: p.id }) {
                break;
            }
            assert_eq!(rate_limited(&answer), Some(Some(p.id)), "{answer:?}");
            if let Body::Error {
                retry_after_ms: Some(ms),
                ..
            } = answer.body
            {
                tokio::time::sleep(Duration::from_millis(ms.into())).await;
            }
        }
    })
    .await
    .expect("a Pong once the client waits as told");
    reader.abort();
    assert!(raw.conn.close_reason().is_none());
    assert_eq!(stat(&node.stats().rate_limit_disconnects), 0);
    still_serving(&node).await;
}

/// A node that allows 5 frames/s with a burst of 10 and closes a client
/// after 10 rate-limited frames.
async fn churn_node() -> TestNode {
    TestNode::start_with(|c| {
        c.rate_limit_messages = 5;
        c.rate_limit_burst = 10;
        c.rate_limit_strikes = 10;
    })
    .await
}

/// Opens streams, a Ping on each, as fast as it can until the node closes
/// the connection, which must be for RATE_LIMITED; returns how many it opened.
async fn churn_until_closed(raw: &RawClient) -> u64 {
    let churn = async {
        let mut opened = 0u64;
        while let Ok(mut send) = raw.conn.open_uni().await {
            let _ = send.write_all(&encode(&ping())).await;
            let _ = send.finish();
            opened += 1;
        }
        opened
    };
    let opened = tokio::time::timeout(Duration::from_secs(30), churn)
        .await
        .expect("the node ends sustained stream churn");
    raw.expect_closed_with(close_code::RATE_LIMITED).await;
    opened
}

#[tokio::test]
async fn stream_churn_past_the_strikes_closes_the_connection() {
    let node = churn_node().await;
    let raw = RawClient::connect(&node).await;
    let (_hs, _recv, _) = raw.handshake("churner").await;
    let opened = churn_until_closed(&raw).await;
    assert!(opened > 5, "closed only after the burst: {opened}");
    // At least once: see the ignored test below for "exactly once".
    assert!(stat(&node.stats().rate_limit_disconnects) >= 1);
    still_serving(&node).await;
}

#[tokio::test]
async fn a_rate_limit_disconnect_is_counted_once_per_client() {
    let node = churn_node().await;
    // The double count is a race; three churners make it near certain.
    const CHURNERS: u64 = 3;
    for i in 0..CHURNERS {
        let raw = RawClient::connect(&node).await;
        let (_hs, _recv, _) = raw.handshake(&format!("churner{i}")).await;
        churn_until_closed(&raw).await;
    }
    assert_eq!(
        stat(&node.stats().rate_limit_disconnects),
        CHURNERS,
        "one disconnect per client"
    );
}

// ------------------------------------------------------ truncated and silent

#[tokio::test]
async fn a_truncated_frame_holds_only_its_own_stream() {
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let (mut hs, mut recv, _) = raw.handshake("teaser").await;

    // Announce a frame just under max_message_bytes, send 10 bytes of it,
    // and go silent.
    let announced = (protocol::DEFAULT_MAX_FRAME_BYTES - 100) as u32;
    let mut teaser = announced.to_be_bytes().to_vec();
    teaser.extend_from_slice(&[0xAB; 10]);
    let mut stalled = raw.send_raw(&teaser).await;

    // The handshake stream still works.
    assert_pong(&mut hs, &mut recv).await;
    // So does a third stream, of another priority: its Pong comes on the
    // node's Low stream.
    let low = Frame::new(Priority::Low, Body::Ping);
    let _low_stream = raw.send_raw(&encode(&low)).await;
    let mut low_recv = tokio::time::timeout(WAIT, raw.conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read_frame(&mut low_recv).await.unwrap().body,
        Body::Pong { of: low.id }
    );
    still_serving(&node).await;
    assert!(
        raw.conn.close_reason().is_none(),
        "a stalled frame is an idle client, not an error"
    );

    // Ending the stream inside the frame drops that frame only.
    stalled.finish().unwrap();
    assert_pong(&mut hs, &mut recv).await;
    assert!(raw.conn.close_reason().is_none());
}

#[tokio::test]
async fn a_partial_handshake_times_out() {
    let node = TestNode::start_with(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    let raw = RawClient::connect(&node).await;
    let bytes = encode(&hello("slowpoke", None));
    let _s = raw.send_raw(&bytes[..bytes.len() / 2]).await;
    raw.expect_closed_with(close_code::HANDSHAKE_TIMEOUT).await;
    still_serving(&node).await;
}

// ------------------------------------------------------ handshake size limits

/// Sends `frame` as the handshake on a fresh connection; returns the
/// node's first frame and the connection.
async fn try_handshake(node: &TestNode, frame: &Frame) -> (Frame, RawClient) {
    let raw = RawClient::connect(node).await;
    let _s = raw.send_raw(&encode(frame)).await;
    let mut recv = tokio::time::timeout(WAIT, raw.conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    let reply = read_frame(&mut recv)
        .await
        .expect("a reply to the handshake");
    (reply, raw)
}

/// A handshake whose token pads its payload to exactly `payload_len` bytes.
fn handshake_of_len(payload_len: usize) -> Frame {
    let base = encode(&hello("padded", Some(String::new()))).len() - 4;
    let frame = hello("padded", Some("t".repeat(payload_len - base)));
    assert_eq!(encode(&frame).len() - 4, payload_len);
    frame
}

#[tokio::test]
async fn an_oversized_handshake_is_refused_with_bad_handshake() {
    let node = TestNode::start().await;
    let max = node.config().max_handshake_bytes;
    assert_eq!(max, 16 * 1024, "the default");

    // Exactly at the limit: accepted (without auth the token is ignored).
    let (reply, _ok) = try_handshake(&node, &handshake_of_len(max)).await;
    assert!(matches!(reply.body, Body::HandshakeAck(_)), "{reply:?}");

    // One byte over, and a 20 KiB token: FRAME_TOO_LARGE naming the
    // handshake, then close BAD_HANDSHAKE.
    for frame in [
        handshake_of_len(max + 1),
        hello("padded", Some("t".repeat(20 * 1024))),
    ] {
        let (reply, raw) = try_handshake(&node, &frame).await;
        let (of, _) = expect_error(&reply, error_code::FRAME_TOO_LARGE);
        assert_eq!(of, Some(frame.id));
        raw.expect_closed_with(close_code::BAD_HANDSHAKE).await;
    }
    still_serving(&node).await;
}

#[tokio::test]
async fn an_oversized_handshake_prefix_is_refused_without_waiting_for_the_body() {
    // The node should not read (and wait for) megabytes from a peer that
    // has not even handshaken: the announced length alone decides.
    let node = TestNode::start_with(|c| c.handshake_timeout = Duration::from_secs(60)).await;
    for announced in [20 * 1024u32, 64 * 1024 * 1024] {
        let raw = RawClient::connect(&node).await;
        let id = MessageId::new_random();
        let mut head = announced.to_be_bytes().to_vec();
        head.extend_from_slice(id.0.as_bytes());
        let _s = raw.send_raw(&head).await;
        let mut recv = tokio::time::timeout(WAIT, raw.conn.accept_uni())
            .await
            .expect("refused at once, not after handshake_timeout")
            .unwrap();
        let reply = read_frame(&mut recv).await.unwrap();
        let (of, _) = expect_error(&reply, error_code::FRAME_TOO_LARGE);
        assert_eq!(of, Some(id));
        raw.expect_closed_with(close_code::BAD_HANDSHAKE).await;
    }
    still_serving(&node).await;
}

#[tokio::test]
async fn max_name_bytes_counts_bytes() {
    let node = TestNode::start_with(|c| c.max_name_bytes = 8).await;
    for name in ["ninechars", "ééééé"] {
        let frame = hello(name, None);
        let (reply, raw) = try_handshake(&node, &frame).await;
        let (of, message) = expect_error(&reply, error_code::INVALID_FIELD);
        assert_eq!(of, Some(frame.id));
        assert!(message.contains("1 to 8 bytes"), "{message}");
        assert_eq!(
            raw.closed_code().await,
            Some(close_code::BAD_HANDSHAKE as u64),
            "{name:?}"
        );
    }
    for name in ["eightchr", "éééé"] {
        let c = node.connect(name).await;
        c.ping().await.unwrap();
    }
}

// ------------------------------------------------------------- pipelining

#[tokio::test]
async fn frames_pipelined_before_the_handshake_ack_are_answered_after_it() {
    // PROTOCOL.md section 6: a client MAY send frames right after its
    // Handshake, on the same stream or on others, without waiting for the
    // HandshakeAck; the node processes them once the handshake succeeded.
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let mut first = raw.conn.open_uni().await.unwrap();
    let mut second = raw.conn.open_uni().await.unwrap();
    // The second stream's Ping is sent before the Handshake is even
    // written, so it can reach the node first; the node still reads the
    // Handshake from the first stream the client opened.
    let early = ping();
    second.write_all(&encode(&early)).await.unwrap();
    // The Handshake and a Ping in one write on the first stream.
    let pipelined = ping();
    let mut bytes = encode(&hello("pipeliner", None));
    bytes.extend(encode(&pipelined));
    first.write_all(&bytes).await.unwrap();

    let mut recv = tokio::time::timeout(WAIT, raw.conn.accept_uni())
        .await
        .expect("the node opens its stream")
        .unwrap();
    let ack = read_frame(&mut recv).await.expect("a first frame");
    assert!(
        matches!(ack.body, Body::HandshakeAck(_)),
        "the HandshakeAck comes first: {ack:?}"
    );
    // Both Pings are answered, after the HandshakeAck (the two streams'
    // answers are not ordered against each other).
    let mut answered = std::collections::HashSet::new();
    for _ in 0..2 {
        match read_frame(&mut recv).await.expect("a Pong").body {
            Body::Pong { of } => assert!(answered.insert(of), "{of:?} answered twice"),
            other => panic!("expected a Pong, got {other:?}"),
        }
    }
    assert_eq!(
        answered,
        [early.id, pipelined.id].into_iter().collect(),
        "both pipelined Pings answered"
    );
    // Both streams stay usable.
    for send in [&mut first, &mut second] {
        assert_pong(send, &mut recv).await;
    }
    assert!(raw.conn.close_reason().is_none());
}

// ---------------------------------------------------------------- admission

#[tokio::test]
async fn connections_per_ip_are_capped_and_released() {
    let node = TestNode::start_with(|c| {
        c.max_connections_per_ip = 2;
        c.connection_rate_per_ip = 0;
    })
    .await;
    let a = RawClient::connect(&node).await;
    let (mut a_send, mut a_recv, _) = a.handshake("a").await;
    let b = RawClient::connect(&node).await;
    let _b_hs = b.handshake("b").await;

    let third = RawClient::try_connect(&node).await;
    match &third {
        Err(err) => assert!(is_refused(err), "{err:?}"),
        Ok(_) => panic!("a third connection from one IP was accepted"),
    }
    match Client::connect(&node.client_config("c")).await {
        Err(ClientError::Connect { .. }) => {}
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("a library client got in beyond the per-IP limit"),
    }
    assert_eq!(node.stats().refused_before_tls(), 2);
    // Those already in are served.
    assert_pong(&mut a_send, &mut a_recv).await;

    // Once the node has noticed b leaving, its place is free again.
    b.conn.close(0u32.into(), b"bye");
    let c = connect_when_admitted(&node, "c").await;
    c.ping().await.unwrap();
    // And the limit holds again with a and c connected.
    assert!(
        RawClient::try_connect(&node)
            .await
            .err()
            .as_ref()
            .is_some_and(is_refused)
    );
}

#[tokio::test]
async fn connection_rate_per_ip_refuses_beyond_the_burst() {
    let node = TestNode::start_with(|c| {
        c.connection_rate_per_ip = 1;
        c.connection_burst_per_ip = 3;
        c.max_connections_per_ip = 0;
    })
    .await;
    // The burst is there at once: the first three are accepted.
    let mut accepted = Vec::new();
    for _ in 0..3 {
        accepted.push(
            RawClient::try_connect(&node)
                .await
                .expect("within the burst"),
        );
    }
    // Then the rate (1/s) holds: the next quick attempts are refused (at
    // most one more per second passes).
    let mut refused = None;
    for _ in 0..20 {
        match RawClient::try_connect(&node).await {
            Ok(raw) => accepted.push(raw),
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    let refused = refused.expect("a connection beyond the per-IP rate is refused");
    assert!(is_refused(&refused), "{refused:?}");
    assert!(node.stats().refused_before_tls() >= 1);
    // The accepted ones are full clients.
    for (i, raw) in accepted.iter().enumerate() {
        let (mut send, mut recv, ack) = raw.handshake(&format!("quick{i}")).await;
        assert!(matches!(ack.body, Body::HandshakeAck(_)), "{ack:?}");
        assert_pong(&mut send, &mut recv).await;
    }
    // As the bucket refills, the address is let in again.
    let c = connect_when_admitted(&node, "patient").await;
    c.ping().await.unwrap();
}

#[tokio::test]
async fn pending_handshakes_are_capped_before_tls() {
    let node = TestNode::start_with(|c| {
        c.max_pending_handshakes = 2;
        c.address_validation = AddressValidation::Never;
        c.connection_rate_per_ip = 0;
        // Long enough that the node does not free the slots itself.
        c.handshake_timeout = Duration::from_secs(120);
    })
    .await;
    // Two connections finish TLS and never say Handshake.
    let silent1 = RawClient::connect(&node).await;
    let silent2 = RawClient::connect(&node).await;
    assert_eq!(node.admission().pending(), 2);
    let third = RawClient::try_connect(&node).await;
    match &third {
        Err(err) => assert!(is_refused(err), "{err:?}"),
        Ok(_) => panic!("a third pending handshake was admitted"),
    }
    assert_eq!(node.stats().refused_before_tls(), 1);

    // The silent ones leave: their slots are freed and a client gets in.
    silent1.conn.close(0u32.into(), b"bye");
    silent2.conn.close(0u32.into(), b"bye");
    let c = connect_when_admitted(&node, "latecomer").await;
    c.ping().await.unwrap();
    // Both silent ones noticed gone, and a finished handshake holds no slot.
    let shared = node.node.clone();
    common::eventually(WAIT, "no pending handshakes", || {
        let shared = shared.clone();
        async move { shared.admission().pending() == 0 }
    })
    .await;
    // A handshaken client holds no pending slot: two more may be pending.
    let _p1 = RawClient::connect(&node).await;
    let _p2 = RawClient::connect(&node).await;
    assert!(
        RawClient::try_connect(&node)
            .await
            .err()
            .as_ref()
            .is_some_and(is_refused)
    );
    c.ping().await.unwrap();
}

#[tokio::test]
async fn address_validation_always_is_transparent_to_clients() {
    let node = TestNode::start_with(|c| c.address_validation = AddressValidation::Always).await;
    let a = node.connect("retried-a").await;
    let mut b = node.connect("retried-b").await;
    a.ping().await.unwrap();
    deliver(&a, &mut b, "hi").await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, ack) = raw.handshake("retried-raw").await;
    assert!(matches!(ack.body, Body::HandshakeAck(_)), "{ack:?}");
    assert_pong(&mut send, &mut recv).await;
    // Retried or not, every finished handshake releases its slot.
    let shared = node.node.clone();
    common::eventually(WAIT, "no pending handshakes", || {
        let shared = shared.clone();
        async move { shared.admission().pending() == 0 }
    })
    .await;
    assert_eq!(node.stats().refused_before_tls(), 0);
}

// ------------------------------------------------------- node-wide budget

/// The node queue budget of [`budget_node`], which is also each client's.
const BUDGET: usize = 16 * 1024;

/// A node whose per-client queue budget is the node's ([`BUDGET`]), for
/// messages of up to 2 KiB; a reader stalled for `stall` is dropped as slow.
async fn budget_node(stall: Duration) -> TestNode {
    TestNode::start_with(|c| {
        c.max_message_bytes = 2048;
        c.max_queued_bytes = BUDGET;
        c.max_total_queued_bytes = BUDGET;
        c.slow_consumer_stall = stall;
    })
    .await
}

#[tokio::test]
async fn an_exhausted_node_queue_budget_refuses_with_server_busy_but_replies_flow() {
    // Per-client budget = node budget, and two recipients that never read
    // share it: the node budget runs out while neither is over its own.
    // Stalled clients would be disconnected after slow_consumer_stall
    // (see slow_consumer_tests); here they must stay for the whole test.
    let node = budget_node(Duration::from_secs(3600)).await;
    let sinks = [
        stalled_reader(&node, "sink1").await,
        stalled_reader(&node, "sink2").await,
    ];
    let sink_ids = [sinks[0].2, sinks[1].2];
    let mut watcher = node.connect("watcher").await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, ack) = raw.handshake("sender").await;
    let Body::HandshakeAck(HandshakeAck {
        client_id: sender_id,
        node_id,
        ..
    }) = ack.body
    else {
        panic!("no ack: {ack:?}")
    };
    // What one Direct costs in the budget: the frame as queued, stamped.
    let stamped_len = |body: Body| {
        let mut f = Frame::new(Priority::High, body);
        f.sender = Some(Sender {
            client_id: sender_id,
            node_id,
            name: "sender".into(),
            user: None,
        });
        protocol::encode(&f).unwrap().len()
    };
    let direct = |to: ClientId, len: usize| {
        Frame::new(
            Priority::High,
            Body::Direct {
                to,
                payload: Payload::Binary(vec![7; len]),
            },
        )
    };
    let direct_len = stamped_len(direct(sink_ids[0], 1000).body);

    // Directs to the sinks (in turn) are acknowledged until the budget is
    // used up, then refused with SERVER_BUSY naming the message.
    let mut acks = 0;
    loop {
        assert!(acks < 100, "the node budget never ran out");
        let d = direct(sink_ids[acks % 2], 1000);
        send.write_all(&encode(&d)).await.unwrap();
        let answer = read_frame(&mut recv).await.unwrap();
        match answer.body {
            Body::Ack { of } if of == d.id => acks += 1,
            Body::Error { of, code, .. } if code == error_code::SERVER_BUSY => {
                assert_eq!(of, Some(d.id));
                break;
            }
            other => panic!("expected Ack or SERVER_BUSY, got {other:?}"),
        }
    }
    // Refused only with the budget (nearly) full: what is queued is at most
    // the acknowledged Directs plus a few in-flight replies.
    assert!(
        acks * direct_len + direct_len + 512 > BUDGET,
        "refused early: {acks} acks of {direct_len} bytes"
    );
    let stats = &node.stats();
    assert!(stat(&stats.node_busy) >= 1);
    assert_eq!(
        stat(&stats.slow_consumer_disconnects),
        0,
        "the recipients are not dropped as slow"
    );
    assert!(sinks.iter().all(|s| s.0.conn.close_reason().is_none()));

    // Replies are never refused: Ping still gets its Pong.
    assert_pong(&mut send, &mut recv).await;
    // A Broadcast (larger than the refused Direct, so it cannot fit either)
    // reaches nobody, and the sender learns how many missed it.
    let b = Frame::new(
        Priority::High,
        Body::Broadcast {
            payload: Payload::Binary(vec![9; 1500]),
        },
    );
    send.write_all(&encode(&b)).await.unwrap();
    let (of, message) = expect_error(
        &read_frame(&mut recv).await.unwrap(),
        error_code::SERVER_BUSY,
    );
    assert_eq!(of, Some(b.id));
    assert!(
        message.contains("delivered to 0") && message.contains("3 missed"),
        "{message}"
    );
    // An echo that does not fit is refused the same way: no Ack without
    // the echo it stands for.
    let t = Frame::new(
        Priority::High,
        Body::Text {
            text: "e".repeat(1500),
        },
    );
    send.write_all(&encode(&t)).await.unwrap();
    let (of, _) = expect_error(
        &read_frame(&mut recv).await.unwrap(),
        error_code::SERVER_BUSY,
    );
    assert_eq!(of, Some(t.id));
    // Others are still served (their replies too).
    watcher.ping().await.unwrap();

    // When the sinks leave, everything queued for them is given back.
    for sink in &sinks {
        sink.0.conn.close(0u32.into(), b"bye");
    }
    let budget = node.queue_budget().clone();
    common::eventually(WAIT, "queue budget back to zero", || {
        let budget = budget.clone();
        async move { budget.used() == 0 }
    })
    .await;
    // And messages flow again.
    let d = direct(watcher.client_id(), 1000);
    send.write_all(&encode(&d)).await.unwrap();
    assert_eq!(
        read_frame(&mut recv).await.unwrap().body,
        Body::Ack { of: d.id }
    );
    let got = next_matching(&mut watcher, |f| f.id == d.id).await;
    assert_eq!(got.sender.unwrap().client_id, sender_id);
}

/// The handshake streams of a [`stalled_reader`], held open and unread.
type Held = (quinn::SendStream, quinn::RecvStream);

/// A recipient that never reads, with tiny QUIC windows: what the node
/// queues for it stays queued. Returns it with its streams (to hold) and
/// its client id.
async fn stalled_reader(node: &TestNode, name: &str) -> (RawClient, Held, ClientId) {
    let sink = RawClient::connect_with(node, |t| {
        t.stream_receive_window(quinn::VarInt::from_u32(4096));
        t.receive_window(quinn::VarInt::from_u32(8192));
    })
    .await;
    let (send, recv, ack) = sink.handshake(name).await;
    let Body::HandshakeAck(HandshakeAck { client_id, .. }) = ack.body else {
        panic!("no ack: {ack:?}")
    };
    (sink, (send, recv), client_id)
}

/// Sends Directs of `len` bytes to `targets` in turn from `sender` (acks
/// awaited, errors tolerated) until `done` holds; fails after `limit`.
async fn push_until(
    sender: &Client,
    targets: &[ClientId],
    len: usize,
    limit: usize,
    mut done: impl FnMut() -> bool,
) -> HashMap<u16, usize> {
    let mut outcomes = HashMap::new();
    for i in 0..limit {
        if done() {
            return outcomes;
        }
        let to = targets[i % targets.len()];
        let code = match sender
            .direct(to, Payload::Binary(vec![1; len]), Priority::Normal)
            .await
        {
            Ok(_) => 0,
            Err(ClientError::Server { code, .. }) => code.0,
            Err(err) => panic!("sender failed: {err}"),
        };
        *outcomes.entry(code).or_default() += 1;
        if code != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("still not done after {limit} messages: {outcomes:?}");
}

#[tokio::test]
async fn a_reader_that_stops_is_dropped_as_slow_even_when_the_node_budget_is_no_larger() {
    let node = budget_node(Duration::from_secs(3600)).await;
    let (sink, _keep, sink_id) = stalled_reader(&node, "sink").await;
    let sender = node.connect("sender").await;
    // The recipient's own budget trips first: it is disconnected as slow
    // (RECIPIENT_SLOW to the sender), never a node-wide SERVER_BUSY.
    let conn = sink.conn.clone();
    let outcomes = push_until(&sender, &[sink_id], 1000, 200, || {
        conn.close_reason().is_some()
    })
    .await;
    assert_eq!(
        outcomes.get(&error_code::SERVER_BUSY.0),
        None,
        "other clients were refused because of one that stopped reading: {outcomes:?}"
    );
    sink.expect_closed_with(close_code::SLOW_CONSUMER).await;
    assert_eq!(stat(&node.stats().slow_consumer_disconnects), 1);
    still_serving(&node).await;
}

#[tokio::test]
async fn readers_that_stop_together_are_dropped_once_they_exhaust_the_node_budget() {
    let node = budget_node(Duration::from_millis(300)).await;
    // Two readers that stop, each within its own budget, together holding
    // the node's.
    let (sink1, _k1, id1) = stalled_reader(&node, "sink1").await;
    let (sink2, _k2, id2) = stalled_reader(&node, "sink2").await;
    let sender = node.connect("sender").await;
    let (c1, c2) = (sink1.conn.clone(), sink2.conn.clone());
    let outcomes = push_until(&sender, &[id1, id2], 1000, 2000, || {
        c1.close_reason().is_some() && c2.close_reason().is_some()
    })
    .await;
    assert!(
        outcomes.contains_key(&error_code::SERVER_BUSY.0),
        "the node budget was never exhausted: {outcomes:?}"
    );
    // Both were disconnected as slow consumers once stalled, and the
    // node's queue memory came back.
    sink1.expect_closed_with(close_code::SLOW_CONSUMER).await;
    sink2.expect_closed_with(close_code::SLOW_CONSUMER).await;
    let budget = node.queue_budget().clone();
    common::eventually(WAIT, "queue budget given back", || {
        let budget = budget.clone();
        async move { budget.used() == 0 }
    })
    .await;
    // Messages flow again.
    let mut watcher = node.connect("watcher").await;
    deliver(&sender, &mut watcher, "flowing").await;
}

#[tokio::test]
async fn a_client_that_stops_a_node_stream_is_closed_as_a_protocol_violation() {
    let node = TestNode::start().await;
    let raw = RawClient::connect(&node).await;
    let (mut send, mut recv, _) = raw.handshake("stopper").await;
    // Stopping the node's high stream would silently lose every later
    // high-priority frame for this client: the node closes instead.
    recv.stop(quinn::VarInt::from_u32(99)).unwrap();
    let p = ping();
    send.write_all(&encode(&p)).await.unwrap();
    raw.expect_closed_with(close_code::PROTOCOL_VIOLATION).await;
    still_serving(&node).await;
}
