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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{Cluster, exactly};
use common::redis::{NODE_TTL, wait_ready};
use common::redis_ha::{SentinelSet, conn};
use common::{TestCerts, TestNode, WAIT, eventually};
use quic_fabric::bus::ClusterBus;
use quic_fabric::client::{Client, ClientError};
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{Body, ClientId, Payload, Priority, error_code};
use tokio::time::Instant;

/// A node in this process on the master `set`'s sentinels name.
async fn sentinel_node(
    set: &SentinelSet,
    certs: &TestCerts,
    name: &str,
    tweak: impl FnOnce(&mut quic_fabric::NodeConfig),
) -> TestNode {
    let sentinels = set.sentinels.clone();
    let master = set.master_name.clone();
    let name = name.to_owned();
    TestNode::start_on(BusChoice::FromConfig, Some(certs), move |c| {
        c.name = name;
        c.redis_sentinel = sentinels;
        c.redis_sentinel_master = Some(master);
        c.node_ttl = NODE_TTL;
        c.heartbeat_interval = Duration::from_millis(300);
        c.delivery_timeout = Duration::from_secs(3);
        c.redis_connect_timeout = Duration::from_millis(500);
        c.redis_response_timeout = Duration::from_millis(500);
        tweak(c);
    })
    .await
}

/// Nodes on a Sentinel set of their own.
struct SentinelNodes {
    nodes: Vec<TestNode>,
    _certs: TestCerts,
    set: SentinelSet,
}

impl Cluster for SentinelNodes {
    async fn start_with(
        n: usize,
        tweak: impl Fn(usize, &mut quic_fabric::NodeConfig),
    ) -> SentinelNodes {
        let set = SentinelSet::start().await;
        let certs = TestCerts::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(sentinel_node(&set, &certs, &format!("n{}", i + 1), |c| tweak(i, c)).await);
        }
        wait_ready(&nodes.iter().collect::<Vec<_>>()).await;
        SentinelNodes {
            nodes,
            _certs: certs,
            set,
        }
    }

    fn nodes(&self) -> &[TestNode] {
        &self.nodes
    }

    fn nodes_mut(&mut self) -> &mut [TestNode] {
        &mut self.nodes
    }

    async fn wait_listed(&self, observer: &Client, expected: &[ClientId]) {
        common::redis::wait_listed(observer, expected).await;
    }

    async fn finish(self) {
        self.set.remove().await;
    }
}

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

/// What became of one numbered send.
#[derive(Debug)]
struct Sent {
    n: u32,
    at: Instant,
    outcome: Result<(), String>,
}

/// Sends `body(n)` from `client` every 10 ms until `stop`, recording each
/// answer as it comes (without waiting for it before the next send).
fn traffic(
    client: Arc<Client>,
    body: impl Fn(u32) -> Body + Send + 'static,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Vec<Sent>> {
    tokio::spawn(async move {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut waits = tokio::task::JoinSet::new();
        let mut n = 0;
        while !stop.is_cancelled() && n < 10_000 {
            n += 1;
            let at = Instant::now();
            let pending = client.submit(Priority::Normal, body(n)).await;
            let log = log.clone();
            waits.spawn(async move {
                let outcome = match pending {
                    Ok(p) => match p.wait().await {
                        Ok(frame) if matches!(frame.body, Body::Ack { .. }) => Ok(()),
                        Ok(frame) => Err(format!("{:?}", frame.body)),
                        Err(ClientError::Server { code, message }) => {
                            Err(format!("{code:?}: {message}"))
                        }
                        Err(err) => Err(format!("client: {err}")),
                    },
                    Err(err) => Err(format!("submit: {err}")),
                };
                log.lock().unwrap().push(Sent { n, at, outcome });
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while waits.join_next().await.is_some() {}
        let mut sent = std::mem::take(&mut *log.lock().unwrap());
        sent.sort_by_key(|s| s.n);
        sent
    })
}

/// The numbers `client` receives (from `frame_number`) until every one of
/// `expected` has arrived: asserts each arrives once and in order.
async fn receive_all(
    client: &mut Client,
    expected: &[u32],
    frame_number: impl Fn(&Body) -> Option<u32>,
) -> Vec<u32> {
    let last = expected.iter().copied().max().unwrap_or(0);
    let mut got = Vec::new();
    tokio::time::timeout(WAIT * 2, async {
        while got.last().is_none_or(|n| *n < last) {
            match client.next_event().await {
                Some(quic_fabric::client::Event::Frame(f)) => {
                    if let Some(n) = frame_number(&f.body) {
                        got.push(n);
                    }
                }
                Some(_) => {}
                None => panic!("receiver closed"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "not all acknowledged arrived; last {last}, got up to {:?}",
            got.last()
        )
    });
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, got, "each once, in the order sent");
    for n in expected {
        assert!(got.contains(n), "acknowledged {n} never arrived");
    }
    got
}

fn number(payload: &Payload) -> Option<u32> {
    match payload {
        Payload::Text(t) => t.parse().ok(),
        _ => None,
    }
}

/// A run of sends: the acknowledged numbers, refusals by message, and the
/// gap (first refusal to last).
struct Summary {
    acked: Vec<u32>,
    refused: BTreeMap<String, usize>,
    gap: Option<(Instant, Instant)>,
}

fn summary(sent: &[Sent]) -> Summary {
    let mut acked = Vec::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    let mut gap: Option<(Instant, Instant)> = None;
    for s in sent {
        match &s.outcome {
            Ok(()) => acked.push(s.n),
            Err(why) => {
                *refused.entry(why.clone()).or_default() += 1;
                let (first, last) = gap.get_or_insert((s.at, s.at));
                *first = (*first).min(s.at);
                *last = (*last).max(s.at);
            }
        }
    }
    Summary {
        acked,
        refused,
        gap,
    }
}

#[tokio::test]
async fn a_killed_master_is_followed_to_the_promoted_replica_with_nothing_acknowledged_lost() {
    let set = SentinelSet::start().await;
    let certs = TestCerts::new();
    let n1 = sentinel_node(&set, &certs, "n1", |c| {
        c.namespaces = vec!["h,history_size=10000,history_ttl=10m".parse().unwrap()]
    })
    .await;
    let n2 = sentinel_node(&set, &certs, "n2", |c| {
        c.namespaces = vec!["h,history_size=10000,history_ttl=10m".parse().unwrap()]
    })
    .await;
    wait_ready(&[&n1, &n2]).await;
    let a = Arc::new(n1.connect("a").await);
    let publisher = Arc::new(n1.connect("p").await);
    let mut b = n2.connect("b").await;
    let mut s = n2.connect("s").await;
    s.subscribe("h:feed", false).await.unwrap();
    let everyone = [
        a.client_id(),
        publisher.client_id(),
        b.client_id(),
        s.client_id(),
    ];
    common::redis::wait_listed(&a, &everyone).await;

    let to = b.client_id();
    let stop = tokio_util::sync::CancellationToken::new();
    let directs = traffic(
        a.clone(),
        move |n| Body::Direct {
            to,
            payload: Payload::Text(n.to_string()),
        },
        stop.clone(),
    );
    let publications = traffic(
        publisher.clone(),
        |n| Body::Publish {
            channel: "h:feed".into(),
            payload: Payload::Text(n.to_string()),
        },
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let old = set.master_port().await;
    let killed = Instant::now();
    set.kill_master().await;
    let new = set.wait_failover(old).await;
    let promoted = killed.elapsed();
    // Both nodes work again by themselves: a direct each way is acknowledged.
    let resumed = {
        let b_side = n2.connect("probe").await;
        eventually(
            Duration::from_secs(30),
            "delivery resumes on the new master",
            || async {
                n1.bus().available()
                    && n2.bus().available()
                    && a.direct(
                        b_side.client_id(),
                        Payload::Text("probe".into()),
                        Priority::Normal,
                    )
                    .await
                    .is_ok()
            },
        )
        .await;
        killed.elapsed()
    };
    // Traffic goes on a little past the failover, then stops.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let directs = directs.await.unwrap();
    let publications = publications.await.unwrap();

    let Summary {
        acked: acked_directs,
        refused: refused_directs,
        gap: gap_directs,
    } = summary(&directs);
    let Summary {
        acked: acked_pubs,
        refused: refused_pubs,
        gap: gap_pubs,
    } = summary(&publications);
    for (what, refused) in [("direct", &refused_directs), ("publication", &refused_pubs)] {
        for why in refused.keys() {
            assert!(
                why.starts_with(&format!("{:?}", error_code::CLUSTER_UNAVAILABLE)),
                "a {what} was refused with something else than CLUSTER_UNAVAILABLE: {why}"
            );
        }
    }
    assert!(
        !refused_directs.is_empty(),
        "a direct sent while no master answered must be refused, not acknowledged"
    );
    let last_direct = directs.last().unwrap().n;
    assert!(
        acked_directs.iter().any(|n| *n > last_direct - 50),
        "directs are acknowledged again after the failover"
    );
    // Every acknowledged direct and publication arrived exactly once, in order.
    receive_all(&mut b, &acked_directs, |body| match body {
        Body::Direct { payload, .. } => number(payload),
        _ => None,
    })
    .await;
    receive_all(&mut s, &acked_pubs, |body| match body {
        Body::Publication { payload, .. } | Body::Publish { payload, .. } => number(payload),
        _ => None,
    })
    .await;

    // Presence was rewritten on the new master: it routes to everyone.
    let mut new_master = conn(new).await;
    let routes: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("fabric:client-nodes")
        .query_async(&mut new_master)
        .await
        .unwrap();
    for id in everyone {
        assert!(
            routes.contains_key(&id.to_string()),
            "{id} routed on the new master"
        );
    }
    let (listed, _) = a.list().await.unwrap();
    let probe_gone: Vec<_> = listed
        .iter()
        .filter(|c| c.name != "probe")
        .cloned()
        .collect();
    assert!(
        exactly(&probe_gone, &everyone),
        "list after the failover: {listed:?}"
    );

    let span = |gap: Option<(Instant, Instant)>| {
        gap.map(|(f, l)| {
            format!(
                "{:.1}s..{:.1}s after the kill",
                f.saturating_duration_since(killed).as_secs_f64(),
                l.saturating_duration_since(killed).as_secs_f64()
            )
        })
        .unwrap_or_else(|| "none".into())
    };
    println!(
        "sentinel failover: master {old} killed, {new} named after {:.1}s, delivery resumed after {:.1}s; directs {} acked / {} refused ({}), publications {} acked / {} refused ({}); refusals: {refused_directs:?} {refused_pubs:?}",
        promoted.as_secs_f64(),
        resumed.as_secs_f64(),
        acked_directs.len(),
        directs.len() - acked_directs.len(),
        span(gap_directs),
        acked_pubs.len(),
        publications.len() - acked_pubs.len(),
        span(gap_pubs),
    );
    set.remove().await;
}
