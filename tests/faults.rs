//! Fault injection with accounting: clients exchange broadcasts and direct
//! messages without pause while a fault is injected (a node's Redis
//! subscription dropped, Redis restarted without persistence, a node killed
//! with SIGKILL, a client flooding and reconnecting at once). Every
//! acknowledged message is then checked against what its recipients
//! received: an Ack must never claim more than happened.
//!
//! The rules, per acknowledged message:
//! - a Broadcast must have reached, exactly once, every other client whose
//!   connection was up from before it was sent until [`GRACE`] after its Ack;
//! - a Direct must have reached its target exactly once if the target's
//!   connection (the session with that id) lasted until [`GRACE`] after the Ack;
//! - and no Direct may be answered UNKNOWN_CLIENT while its target's
//!   session was up across the whole request, or while it waited for a
//!   resume that came (the same id connected again later);
//! - a Direct answered Stored (its target was away with a resumable
//!   session) must have reached its target exactly once if the target
//!   resumed (the same id) and stayed until [`GRACE`] after the answer.
//!
//! Errors (CLUSTER_UNAVAILABLE and the like) are allowed: they are the
//! honest answer during a fault. Each test also checks that the fault was
//! actually hit (some sends were refused), so it cannot pass vacuously.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::redis::{NODE_TTL, RedisNodes, TestRedis, pubsub_clients, redis_node_process};
use common::{RawClient, TcpProxy, TestNode, WAIT, eventually};
use quic_fabric::client::{Client, ClientConfig, ClientError, Event, ReconnectPolicy, Socket};
use quic_fabric::protocol::{
    self, Body, ClientId, ErrorCode, Frame, MessageId, Payload, Priority, error_code,
};
use tokio_util::sync::CancellationToken;

/// How long after its Ack a message may still be on its way: a recipient
/// whose connection ended within this window is not held to it.
const GRACE: Duration = Duration::from_secs(1);

/// One connection of a peer: the id the node gave it, and when it was up.
#[derive(Debug, Clone)]
struct Session {
    id: ClientId,
    start: Instant,
    end: Option<Instant>,
}

impl Session {
    /// Up from before `from` until at least `until`.
    fn covers(&self, from: Instant, until: Instant) -> bool {
        self.start < from && self.end.is_none_or(|end| end > until)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Broadcast,
    Direct(ClientId),
}

#[derive(Debug)]
enum Outcome {
    Ack,
    /// Stored for a target away with a resumable session.
    Stored,
    Refused(ErrorCode),
    /// Closed or timed out: whether it was delivered is unknown.
    Unknown,
}

#[derive(Debug)]
struct Sent {
    from: usize,
    id: MessageId,
    kind: Kind,
    sent_at: Instant,
    answered_at: Instant,
    outcome: Outcome,
}

/// Everything the peers saw, for the final accounting.
#[derive(Debug, Default)]
struct Ledger {
    /// Send directs to a peer's last id even while it is away (its
    /// session may be waiting for a resume).
    to_away: bool,
    sessions: Vec<Vec<Session>>,
    received: Vec<HashMap<MessageId, u32>>,
    sent: Vec<Sent>,
}

impl Ledger {
    fn current(&self, peer: usize) -> Option<ClientId> {
        self.sessions[peer]
            .last()
            .filter(|s| self.to_away || s.end.is_none())
            .map(|s| s.id)
    }

    /// Marks the current session of `peer` as ended at `at` (its node died
    /// then, whenever the client notices).
    fn end_session(&mut self, peer: usize, at: Instant) {
        if let Some(session) = self.sessions[peer].last_mut() {
            session.end = Some(session.end.map_or(at, |end| end.min(at)));
        }
    }
}

/// What the accounting found.
#[derive(Debug, Default)]
struct Report {
    acked_broadcasts: usize,
    acked_directs: usize,
    stored_directs: usize,
    refused: HashMap<u16, usize>,
    unknown: usize,
    /// Acknowledged, and a recipient held to it did not get it.
    lost: Vec<String>,
    duplicated: Vec<String>,
    /// UNKNOWN_CLIENT for a target that was connected all along.
    wrongly_unknown: Vec<String>,
}

impl Report {
    fn of(ledger: &Ledger) -> Report {
        let mut report = Report::default();
        let find = |id: ClientId| {
            ledger
                .sessions
                .iter()
                .enumerate()
                .find_map(|(peer, sessions)| {
                    sessions.iter().find(|s| s.id == id).map(|s| (peer, s))
                })
        };
        for sent in &ledger.sent {
            let until = sent.answered_at + GRACE;
            match (&sent.outcome, sent.kind) {
                (Outcome::Ack, Kind::Broadcast) => {
                    report.acked_broadcasts += 1;
                    for (peer, sessions) in ledger.sessions.iter().enumerate() {
                        if peer == sent.from
                            || !sessions.iter().any(|s| s.covers(sent.sent_at, until))
                        {
                            continue;
                        }
                        report.check(ledger, peer, sent);
                    }
                }
                (Outcome::Ack, Kind::Direct(to)) => {
                    report.acked_directs += 1;
                    // Queued to the connection that was up when it was
                    // sent (a resumed session is the same id later on).
                    if let Some((peer, _)) = find(to)
                        && ledger.sessions[peer].iter().any(|s| {
                            s.id == to
                                && s.start <= sent.sent_at
                                && s.end.is_none_or(|end| end > until)
                        })
                    {
                        report.check(ledger, peer, sent);
                    }
                }
                (Outcome::Stored, Kind::Direct(to)) => {
                    report.stored_directs += 1;
                    if let Some((peer, _)) = find(to)
                        && ledger.sessions[peer]
                            .iter()
                            .any(|s| s.id == to && s.end.is_none_or(|end| end > until))
                    {
                        report.check(ledger, peer, sent);
                    }
                }
                (Outcome::Refused(code), Kind::Direct(to))
                    if *code == error_code::UNKNOWN_CLIENT =>
                {
                    *report.refused.entry(code.0).or_default() += 1;
                    if let Some((peer, session)) = find(to) {
                        let resumed_later = ledger.sessions[peer]
                            .iter()
                            .any(|s| s.id == to && s.start > sent.answered_at);
                        if session.covers(sent.sent_at, sent.answered_at) || resumed_later {
                            report.wrongly_unknown.push(format!(
                                "direct {} from peer {} to peer {peer} ({to}) answered UNKNOWN_CLIENT while its session was alive",
                                sent.id, sent.from
                            ));
                        }
                    }
                }
                (Outcome::Refused(code), _) => *report.refused.entry(code.0).or_default() += 1,
                (Outcome::Stored, Kind::Broadcast) => unreachable!("broadcasts are never stored"),
                (Outcome::Unknown, _) => report.unknown += 1,
            }
        }
        report
    }

    fn check(&mut self, ledger: &Ledger, peer: usize, sent: &Sent) {
        match ledger.received[peer].get(&sent.id).copied().unwrap_or(0) {
            1 => {}
            0 => self.lost.push(format!(
                "{:?} {} from peer {} acked but never reached peer {peer}",
                sent.kind, sent.id, sent.from
            )),
            n => self.duplicated.push(format!(
                "{:?} {} from peer {} reached peer {peer} {n} times",
                sent.kind, sent.id, sent.from
            )),
        }
    }

    fn refused(&self, code: ErrorCode) -> usize {
        self.refused.get(&code.0).copied().unwrap_or(0)
    }

    /// Fails the test on any loss, duplicate or false UNKNOWN_CLIENT.
    fn assert_honest(&self, scenario: &str) {
        println!(
            "{scenario}: acked {} broadcasts and {} directs; stored {} directs; refused {:?}; {} unknown outcomes",
            self.acked_broadcasts,
            self.acked_directs,
            self.stored_directs,
            self.refused,
            self.unknown
        );
        assert!(
            self.acked_broadcasts > 0 && self.acked_directs > 0,
            "{scenario}: no traffic got through at all: {self:?}"
        );
        let show = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ");
        assert!(
            self.lost.is_empty(),
            "{scenario}: {} acknowledged deliveries did not arrive:\n  {}",
            self.lost.len(),
            show(&self.lost)
        );
        assert!(
            self.duplicated.is_empty(),
            "{scenario}: {} duplicated deliveries:\n  {}",
            self.duplicated.len(),
            show(&self.duplicated)
        );
        assert!(
            self.wrongly_unknown.is_empty(),
            "{scenario}: {} directs to connected clients answered UNKNOWN_CLIENT:\n  {}",
            self.wrongly_unknown.len(),
            show(&self.wrongly_unknown)
        );
    }
}

/// Clients exchanging traffic, with their ledger.
struct Traffic {
    ledger: Arc<Mutex<Ledger>>,
    stop_sending: CancellationToken,
    stop_reading: CancellationToken,
    senders: Vec<tokio::task::JoinHandle<()>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

/// Peer settings: reconnecting when asked, and waiting for answers longer
/// than the nodes' delivery timeout (3 s in these tests), so that every
/// request the node settles is answered rather than timed out.
fn peer_config(mut config: ClientConfig, reconnect: bool) -> ClientConfig {
    config.request_timeout = Duration::from_secs(6);
    config.connect_timeout = Duration::from_secs(2);
    if reconnect {
        config.reconnect = Some(ReconnectPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            max_attempts: None,
        });
    }
    config
}

impl Traffic {
    /// Starts every client sending, in turn, a Broadcast and a Direct to
    /// another client (a few milliseconds apart) until stopped.
    async fn start(configs: Vec<ClientConfig>) -> Traffic {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut clients = Vec::new();
        for config in &configs {
            let client = Client::connect(config)
                .await
                .unwrap_or_else(|e| panic!("peer {} connects: {e}", config.name));
            let mut l = lock(&ledger);
            l.sessions.push(vec![Session {
                id: client.client_id(),
                start: Instant::now(),
                end: None,
            }]);
            l.received.push(HashMap::new());
            drop(l);
            clients.push(client);
        }
        let stop_sending = CancellationToken::new();
        let stop_reading = CancellationToken::new();
        let peers = clients.len();
        let mut senders = Vec::new();
        let mut readers = Vec::new();
        for (me, mut client) in clients.into_iter().enumerate() {
            let events = client.take_events();
            readers.push(tokio::spawn(read(
                me,
                events,
                ledger.clone(),
                stop_reading.clone(),
            )));
            senders.push(tokio::spawn(send(
                me,
                peers,
                client,
                ledger.clone(),
                stop_sending.clone(),
            )));
        }
        Traffic {
            ledger,
            stop_sending,
            stop_reading,
            senders,
            readers,
        }
    }

    /// Waits until `n` more messages were acknowledged (traffic flows).
    async fn acked_more(&self, n: usize, within: Duration) {
        let count = || {
            lock(&self.ledger)
                .sent
                .iter()
                .filter(|s| matches!(s.outcome, Outcome::Ack))
                .count()
        };
        let target = count() + n;
        common::eventually(within, "traffic flows", || async { count() >= target }).await;
    }

    /// Stops sending, lets deliveries settle, and accounts.
    async fn finish(self) -> Report {
        self.stop_sending.cancel();
        for sender in self.senders {
            tokio::time::timeout(WAIT, sender)
                .await
                .expect("sender stops")
                .expect("sender task");
        }
        tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
        self.stop_reading.cancel();
        for reader in self.readers {
            tokio::time::timeout(WAIT, reader)
                .await
                .expect("reader stops")
                .expect("reader task");
        }
        Report::of(&lock(&self.ledger))
    }
}

async fn read(
    me: usize,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = stop.cancelled() => return,
        };
        let now = Instant::now();
        let ended = {
            let mut l = lock(&ledger);
            match &event {
                Some(Event::Frame(f))
                    if matches!(f.body, Body::Broadcast { .. } | Body::Direct { .. }) =>
                {
                    *l.received[me].entry(f.id).or_default() += 1
                }
                Some(Event::Frame(_) | Event::Resubscribed { .. } | Event::Subscribed { .. }) => {}
                Some(Event::Disconnected { .. }) => l.end_session(me, now),
                Some(Event::Reconnected { client_id, .. }) => {
                    l.end_session(me, now);
                    l.sessions[me].push(Session {
                        id: *client_id,
                        start: now,
                        end: None,
                    });
                }
                Some(Event::Closed { .. }) | None => l.end_session(me, now),
            }
            matches!(event, Some(Event::Closed { .. }) | None)
        };
        if ended {
            stop.cancelled().await;
            return;
        }
    }
}

async fn send(
    me: usize,
    peers: usize,
    client: Client,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    let mut turn = 0usize;
    while !stop.is_cancelled() {
        turn += 1;
        let kind = if turn.is_multiple_of(2) {
            let target = (me + turn / 2) % peers;
            let target = if target == me {
                (me + 1) % peers
            } else {
                target
            };
            match lock(&ledger).current(target) {
                Some(id) => Kind::Direct(id),
                None => Kind::Broadcast,
            }
        } else {
            Kind::Broadcast
        };
        let payload = Payload::Text(format!("{me}:{turn}"));
        let body = match kind {
            Kind::Broadcast => Body::Broadcast { payload },
            Kind::Direct(to) => Body::Direct { to, payload },
        };
        let sent_at = Instant::now();
        let (id, outcome) = match client.submit(Priority::Normal, body).await {
            Ok(pending) => {
                let id = pending.id();
                let outcome = match pending.wait().await {
                    Ok(Frame {
                        body: Body::Ack { .. },
                        ..
                    }) => Outcome::Ack,
                    Ok(Frame {
                        body: Body::Stored { .. },
                        ..
                    }) => Outcome::Stored,
                    Ok(other) => panic!("unexpected reply {other:?}"),
                    Err(ClientError::Server { code, .. }) => Outcome::Refused(code),
                    Err(_) => Outcome::Unknown,
                };
                (id, outcome)
            }
            Err(_) => {
                // Not sent at all: nothing to account.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let failed = !matches!(outcome, Outcome::Ack | Outcome::Stored);
        lock(&ledger).sent.push(Sent {
            from: me,
            id,
            kind,
            sent_at,
            answered_at: Instant::now(),
            outcome,
        });
        let pause = if failed { 20 } else { 4 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

fn two_peers_each(nodes: &[TestNode]) -> Vec<ClientConfig> {
    nodes
        .iter()
        .flat_map(|n| {
            [
                peer_config(n.client_config("peer-a"), false),
                peer_config(n.client_config("peer-b"), false),
            ]
        })
        .collect()
}

#[tokio::test]
async fn a_dropped_redis_subscription_never_leaves_an_ack_that_overclaims() {
    let cluster = RedisNodes::start(3).await;
    let redis = &cluster.redis;
    let traffic = Traffic::start(two_peers_each(&cluster.nodes)).await;
    traffic.acked_more(50, WAIT).await;
    let mut conn = redis.conn().await;
    // One node's subscription at a time (the newest: after the first kill,
    // the same node's again), as Redis does to a subscriber over its
    // output buffer limit; then everyone's at once.
    for _ in 0..3 {
        let newest = *pubsub_clients(redis).await.last().expect("subscribers");
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(newest)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(killed, 1);
        traffic.acked_more(50, WAIT).await;
    }
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    traffic.acked_more(50, WAIT).await;
    let report = traffic.finish().await;
    report.assert_honest("dropped subscriptions");
    assert!(
        report.refused(error_code::CLUSTER_UNAVAILABLE) > 0,
        "the subscription gaps were never hit: {report:?}"
    );
    cluster.finish().await;
}

async fn set_pubsub_buffer_limit(redis: &TestRedis, limit: &str) {
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg(limit)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_subscriber_closed_over_its_output_buffer_limit_leaves_no_overclaiming_ack() {
    // Long TTLs: the stalled node must stay alive (and its clients
    // routable) while it does not run.
    let long = Duration::from_secs(10);
    let cluster = RedisNodes::start_with(2, |_, c| c.node_ttl = long).await;
    let (redis, n1) = (&cluster.redis, &cluster.nodes[0]);
    let stalled = redis_node_process(
        redis,
        &cluster.certs,
        long,
        &[
            "--name",
            "stalled",
            "--redis-response-timeout",
            "500ms",
            "--delivery-timeout",
            "3s",
        ],
    )
    .await;
    // The stalled node subscribed last.
    let its_subscription = *pubsub_clients(redis).await.last().unwrap();
    let mut configs = two_peers_each(&cluster.nodes);
    configs.push(peer_config(stalled.client_config("far-a"), false));
    configs.push(peer_config(stalled.client_config("far-b"), false));
    let traffic = Traffic::start(configs).await;
    traffic.acked_more(100, WAIT).await;

    // The node stops running (as under a long pause or CPU starvation)
    // while the others go on broadcasting to it; past its (here 2 MB)
    // output buffer limit Redis closes its subscription with the buffered
    // broadcasts, which it had counted as received when they were
    // published.
    set_pubsub_buffer_limit(redis, "pubsub 2097152 0 0").await;
    let pid = stalled.child.id().unwrap().to_string();
    let signal = |sig: &str| {
        let sent = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP");
    // Large broadcasts fill the socket buffers towards the stalled node fast.
    let blaster = n1.connect("blaster").await;
    let blast = async {
        loop {
            let _ = blaster
                .submit(
                    Priority::Low,
                    Body::Broadcast {
                        payload: Payload::Binary(vec![0; 64 * 1024]),
                    },
                )
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let closed = async {
        while pubsub_clients(redis).await.contains(&its_subscription) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = blast => unreachable!(),
        waited = tokio::time::timeout(WAIT, closed) => waited.expect("Redis closes the stalled subscriber"),
    }
    set_pubsub_buffer_limit(redis, "pubsub 33554432 8388608 60").await;
    signal("-CONT");
    traffic.acked_more(100, WAIT).await;
    let report = traffic.finish().await;
    report.assert_honest("subscriber over its output buffer limit");
    assert!(
        report.refused(error_code::CLUSTER_UNAVAILABLE) > 0,
        "no broadcast was refused although a node lost some: {report:?}"
    );
    drop((stalled, blaster));
    cluster.finish().await;
}

#[tokio::test]
async fn a_redis_restart_without_persistence_leaves_no_overclaiming_ack_and_no_false_unknown() {
    // No snapshot and no AOF: a restart loses presence, as in production
    // without persistence.
    let redis = TestRedis::start_with_args(&["--save", "", "--appendonly", "no"]).await;
    let cluster = RedisNodes::start_on(redis, 3, |_, _| {}).await;
    let traffic = Traffic::start(two_peers_each(&cluster.nodes)).await;
    traffic.acked_more(50, WAIT).await;
    let container = &cluster.redis.container;
    container.stop_with_timeout(Some(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    container.start().await.unwrap();
    cluster.wait_ready().await;
    // Well past the re-registration: routing must be exact again.
    traffic.acked_more(200, WAIT).await;
    let report = traffic.finish().await;
    report.assert_honest("Redis restart");
    assert!(
        report.refused(error_code::CLUSTER_UNAVAILABLE) > 0,
        "the outage was never hit: {report:?}"
    );
    cluster.finish().await;
}

#[tokio::test]
async fn a_client_that_joins_right_after_a_redis_restart_is_never_called_unknown() {
    let redis = TestRedis::start_with_args(&["--save", "", "--appendonly", "no"]).await;
    let cluster = RedisNodes::start_on(redis, 2, |i, c| {
        if i == 1 {
            // Many quick connections from one address.
            c.connection_rate_per_ip = 0;
        }
    })
    .await;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let sender = n1.connect("sender").await;
    let container = &cluster.redis.container;
    container.stop_with_timeout(Some(0)).await.unwrap();
    container.start().await.unwrap();
    // Clients join n2 while presence is being rebuilt, and are addressed
    // from n1 as soon as they have their id.
    let started = Instant::now();
    let (mut acked, mut unavailable) = (0, 0);
    while started.elapsed() < Duration::from_secs(4) || acked < 5 {
        assert!(started.elapsed() < WAIT, "routing never recovered");
        let joined = n2.connect("newcomer").await;
        match sender
            .direct(
                joined.client_id(),
                Payload::Text("hi".into()),
                Priority::Normal,
            )
            .await
        {
            Ok(_) => acked += 1,
            Err(ClientError::Server { code, .. }) if code == error_code::CLUSTER_UNAVAILABLE => {
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!(
                "a client connected to n2 {:?} after the restart was not routable: {err}",
                started.elapsed()
            ),
        }
    }
    println!("after the restart: {unavailable} CLUSTER_UNAVAILABLE, then {acked} acked");
    cluster.finish().await;
}

#[tokio::test]
async fn a_client_that_joins_a_node_cut_off_from_redis_is_never_called_unknown() {
    let redis = TestRedis::start().await;
    // n2 reaches Redis through a link the test can cut.
    let target: std::net::SocketAddr = redis.url.trim_start_matches("redis://").parse().unwrap();
    let link = TcpProxy::start(target).await;
    let cluster = RedisNodes::start_on(redis, 2, |i, c| {
        c.node_ttl = Duration::from_secs(4);
        if i == 1 {
            c.redis_url = Some(format!("redis://{}", link.addr));
            c.connection_rate_per_ip = 0;
        }
    })
    .await;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let sender = n1.connect("sender").await;
    link.cut();
    // Clients that join n2 during the cut are addressed from n1 at once:
    // never "unknown" while n2 still counts as alive (within its TTL).
    let started = Instant::now();
    let mut joined = Vec::new();
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    while started.elapsed() < Duration::from_secs(2) {
        let client = n2.connect("newcomer").await;
        let outcome = match sender
            .direct(
                client.client_id(),
                Payload::Text("hi".into()),
                Priority::Normal,
            )
            .await
        {
            Ok(_) => "acked".to_owned(),
            Err(ClientError::Server { code, .. }) if code == error_code::CLUSTER_UNAVAILABLE => {
                "cluster unavailable".to_owned()
            }
            Err(err) => panic!(
                "a client of n2 {:?} into its cut was answered: {err}",
                started.elapsed()
            ),
        };
        *outcomes.entry(outcome).or_default() += 1;
        joined.push(client);
    }
    println!("during the cut: {outcomes:?}");
    // Once the link is back, n2 registers them and they are reachable.
    link.restore();
    cluster.wait_ready().await;
    let last = joined.last_mut().unwrap();
    let deadline = Instant::now() + WAIT;
    let id = loop {
        match sender
            .direct(
                last.client_id(),
                Payload::Text("back".into()),
                Priority::Normal,
            )
            .await
        {
            Ok(id) => break id,
            Err(err) => {
                assert!(Instant::now() < deadline, "never routable again: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    common::next_matching(last, |f| f.id == id).await;
    cluster.finish().await;
}

/// SIGKILLs `victim`; the connections of its clients `doomed` end then
/// (whenever the clients notice).
async fn kill(victim: &mut common::NodeProcess, traffic: &Traffic, doomed: [usize; 2]) {
    victim.kill().await;
    let killed = Instant::now();
    let mut ledger = lock(&traffic.ledger);
    for peer in doomed {
        ledger.end_session(peer, killed);
    }
}

#[tokio::test]
async fn a_node_killed_with_sigkill_costs_the_others_nothing_acked() {
    let cluster = RedisNodes::start(2).await;
    let (redis, certs) = (&cluster.redis, &cluster.certs);
    let mut victim = redis_node_process(redis, certs, NODE_TTL, &["--name", "victim"]).await;
    let mut configs = two_peers_each(&cluster.nodes);
    configs.push(peer_config(victim.client_config("doomed-a"), false));
    configs.push(peer_config(victim.client_config("doomed-b"), false));
    let doomed = [configs.len() - 2, configs.len() - 1];
    let traffic = Traffic::start(configs).await;
    traffic.acked_more(100, WAIT).await;
    kill(&mut victim, &traffic, doomed).await;
    // Past the victim's TTL, so the survivors see it dead.
    tokio::time::sleep(NODE_TTL + Duration::from_secs(1)).await;
    traffic.acked_more(100, WAIT).await;
    let report = traffic.finish().await;
    report.assert_honest("node killed");
    cluster.finish().await;
}

/// Like the SIGKILL scenario, with the killed node's clients reconnecting
/// to a survivor and resuming their sessions: directs sent to them while
/// they are away are stored (once the killed node is found dead) and
/// must all reach them after the resume, once; none may be answered
/// UNKNOWN_CLIENT, since their sessions were waiting.
#[tokio::test]
async fn clients_of_a_killed_node_resume_and_get_every_direct_stored_for_them() {
    let cluster = RedisNodes::start(2).await;
    let (redis, certs) = (&cluster.redis, &cluster.certs);
    let mut victim = redis_node_process(redis, certs, NODE_TTL, &["--name", "victim"]).await;
    let mut configs = two_peers_each(&cluster.nodes);
    for name in ["doomed-a", "doomed-b"] {
        let mut config = peer_config(victim.client_config(name), true);
        config.servers = vec![cluster.nodes[0].addr.to_string()];
        // Noticed after the victim's TTL, so that directs get stored.
        config.idle_timeout = NODE_TTL + Duration::from_secs(2);
        configs.push(config);
    }
    let doomed = [configs.len() - 2, configs.len() - 1];
    let traffic = Traffic::start(configs).await;
    let ids: Vec<ClientId> = {
        let mut ledger = lock(&traffic.ledger);
        ledger.to_away = true;
        doomed.iter().map(|p| ledger.sessions[*p][0].id).collect()
    };
    traffic.acked_more(100, WAIT).await;
    kill(&mut victim, &traffic, doomed).await;
    eventually(Duration::from_secs(30), "the doomed clients resume", || {
        let ledger = traffic.ledger.clone();
        let ids = ids.clone();
        async move {
            let l = lock(&ledger);
            doomed.iter().zip(&ids).all(|(p, id)| {
                l.sessions[*p].len() > 1 && l.sessions[*p].iter().all(|s| s.id == *id)
            })
        }
    })
    .await;
    traffic.acked_more(100, WAIT).await;
    let report = traffic.finish().await;
    report.assert_honest("node killed, sessions resumed");
    assert!(
        report.stored_directs > 0,
        "directs were stored for the away clients: {report:?}"
    );
    cluster.finish().await;
}

#[tokio::test]
async fn a_flooder_that_reconnects_at_once_gets_no_fresh_allowance_and_costs_others_nothing() {
    const RATE: u32 = 200;
    const BURST: u32 = 100;
    let node = TestNode::start_with(|c| {
        c.rate_limit_messages = RATE;
        c.rate_limit_burst = BURST;
        c.rate_limit_strikes = 50;
        // As behind a load balancer: reconnecting is not throttled by the
        // per-IP connection rate, so only the rate limit's memory holds.
        c.connection_rate_per_ip = 0;
    })
    .await;
    // Well-behaved peers on other addresses (below their rate).
    let mut configs = Vec::new();
    for (i, ip) in [[127, 0, 0, 2], [127, 0, 0, 3]].into_iter().enumerate() {
        let mut config = peer_config(node.client_config(&format!("peer{i}")), false);
        config.socket =
            Socket::Given(quinn::Endpoint::client(std::net::SocketAddr::from((ip, 0))).unwrap());
        configs.push(config);
    }
    let traffic = Traffic::start(configs).await;

    // The flooder: pings as fast as it can, and reconnects at once when
    // the node closes it (close code 10).
    let started = Instant::now();
    let mut answered = 0usize;
    let mut cycles = 0usize;
    while started.elapsed() < Duration::from_secs(3) {
        cycles += 1;
        let raw = RawClient::connect(&node).await;
        let (mut send, mut recv, _) = raw.handshake("flooder").await;
        let count = tokio::spawn(async move {
            let mut pongs = 0usize;
            while let Some(frame) = common::next_frame(&mut recv).await {
                if matches!(frame.body, Body::Pong { .. }) {
                    pongs += 1;
                }
            }
            pongs
        });
        let ping = protocol::encode(&Frame::new(Priority::High, Body::Ping)).unwrap();
        while started.elapsed() < Duration::from_secs(3) && send.write_all(&ping).await.is_ok() {}
        raw.conn.close(0u32.into(), b"done");
        answered += count.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = f64::from(BURST) + f64::from(RATE) * elapsed;
    println!(
        "flooder: {answered} pings answered over {cycles} connections in {elapsed:.1}s (limit ~{allowed:.0})"
    );
    assert!(
        cycles > 3,
        "the flooder was not closed and reconnected: {cycles} connections"
    );
    assert!(
        (answered as f64) <= allowed * 1.1 + 10.0,
        "{answered} pings answered in {elapsed:.1}s over {cycles} connections: the limit is {RATE}/s with a burst of {BURST}"
    );
    let report = traffic.finish().await;
    report.assert_honest("reconnecting flooder");
}
