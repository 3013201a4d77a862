//! Failovers under traffic, shared by the Sentinel and Redis Cluster
//! tests: two nodes' clients exchange numbered directs and publications
//! while the Redis master under them goes, and every answer is checked
//! against what arrived.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quic_fabric::bus::ClusterBus;
use quic_fabric::client::{Client, ClientError};
use quic_fabric::protocol::{Body, ClientId, Payload, Priority, error_code};
use tokio::time::Instant;

use super::{TestNode, WAIT, eventually};

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

/// What a receiver got: the numbers (from `frame_number`), and how many
/// of them had arrived each time it was told that messages before were
/// lost (a SubscriptionLost, or a resubscription that could not recover).
#[derive(Debug, Default)]
struct Got {
    numbers: Vec<u32>,
    told_lost: Vec<usize>,
}

/// What `client` receives until `last` has arrived, or `within` has
/// passed.
async fn received(
    client: &mut Client,
    last: u32,
    within: Duration,
    frame_number: impl Fn(&Body) -> Option<u32>,
) -> Got {
    use quic_fabric::client::Event;
    use quic_fabric::protocol::Recovery;
    let mut got = Got::default();
    let _ = tokio::time::timeout(within, async {
        while got.numbers.last().is_none_or(|n| *n < last) {
            match client.next_event().await {
                Some(Event::Frame(f)) => {
                    if let Some(n) = frame_number(&f.body) {
                        got.numbers.push(n);
                    } else if matches!(f.body, Body::SubscriptionLost { .. }) {
                        got.told_lost.push(got.numbers.len());
                    }
                }
                Some(Event::Subscribed { recovery, .. })
                    if !matches!(recovery, Recovery::Recovered | Recovery::NotRequested) =>
                {
                    got.told_lost.push(got.numbers.len());
                }
                Some(_) => {}
                None => panic!("receiver closed"),
            }
        }
    })
    .await;
    got
}

/// Asserts `got` holds each number once, in order; returns the
/// acknowledged ones (`acked`) missing from it.
fn in_order_missing(what: &str, got: &[u32], acked: &[u32]) -> Vec<u32> {
    let mut sorted = got.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, got, "each {what} once, in the order sent");
    acked.iter().copied().filter(|n| !got.contains(n)).collect()
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

/// How a phase moves the master.
/// A Redis whose master can be made to fail over under the nodes.
pub trait FailsOver {
    /// Makes the master go (killed, or a failover commanded) and returns
    /// once another serves in its place: the old and the new master's
    /// ports.
    fn fail_over(&self) -> impl Future<Output = (u16, u16)>;

    /// Asserts that the Redis serving now routes every client of `ids`.
    fn assert_routed(&self, ids: &[ClientId]) -> impl Future<Output = ()>;

    /// Whether another server takes over the channel's history (so a new
    /// epoch starts, and subscribers are told): not when slots move
    /// between live masters with their keys.
    fn starts_an_epoch(&self) -> bool {
        true
    }
}

/// Two nodes' clients exchange numbered directs and publications (100 a
/// second each, the publications to `channel`, whose namespace keeps
/// history) while `set` fails over (`label` names how, in messages): every
/// refusal must be
/// CLUSTER_UNAVAILABLE, every acknowledged message must reach its receiver
/// once and in order, delivery must resume by itself soon after the
/// promotion, and the new master must route to every client. Returns the
/// old and new master ports and a line of figures.
pub async fn failover_under_traffic(
    set: &impl FailsOver,
    label: &str,
    n1: &TestNode,
    n2: &TestNode,
    channel: &str,
) -> (u16, u16, String) {
    let channel = channel.to_owned();
    let a = Arc::new(n1.connect("a").await);
    let publisher = Arc::new(n1.connect("p").await);
    let mut b = n2.connect("b").await;
    let mut s = n2.connect("s").await;
    s.subscribe(&channel, false).await.unwrap();
    let everyone = [
        a.client_id(),
        publisher.client_id(),
        b.client_id(),
        s.client_id(),
    ];
    super::redis::wait_listed(&a, &everyone).await;

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
    let published = channel.clone();
    let publications = traffic(
        publisher.clone(),
        move |n| Body::Publish {
            channel: published.clone(),
            payload: Payload::Text(n.to_string()),
        },
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let (old, new) = set.fail_over().await;
    let promoted = started.elapsed();
    // Both nodes work again by themselves: a direct across is acknowledged.
    let probe = n2.connect("probe").await;
    eventually(
        Duration::from_secs(30),
        "delivery resumes on the new master",
        || async {
            n1.bus().available()
                && n2.bus().available()
                && a.direct(
                    probe.client_id(),
                    Payload::Text("probe".into()),
                    Priority::Normal,
                )
                .await
                .is_ok()
        },
    )
    .await;
    let resumed = started.elapsed();
    assert!(
        resumed < promoted + Duration::from_secs(8),
        "{label}: the nodes took {:.1}s after the promotion to deliver again",
        (resumed - promoted).as_secs_f64()
    );
    drop(probe);
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
                "{label}: a {what} was refused with something else than CLUSTER_UNAVAILABLE: {why}"
            );
        }
    }
    let last_direct = directs.last().unwrap().n;
    assert!(
        acked_directs
            .iter()
            .any(|n| *n > last_direct.saturating_sub(50)),
        "{label}: directs are acknowledged again after the failover"
    );
    // Every acknowledged direct arrived exactly once, in order.
    let last = acked_directs.last().copied().unwrap_or(0);
    let got = received(&mut b, last, WAIT * 2, |body| match body {
        Body::Direct { payload, .. } => number(payload),
        _ => None,
    })
    .await;
    assert!(got.told_lost.is_empty(), "{label}: directs are never lost");
    let missing = in_order_missing("direct", &got.numbers, &acked_directs);
    assert!(
        missing.is_empty(),
        "{label}: acknowledged directs never arrived: {missing:?}"
    );
    // So did every acknowledged publication, or the subscriber was told
    // that the channel's history was lost before it received anything
    // later: after a commanded failover the old master takes publications
    // until Sentinel demotes it, and they are lost with its data; the new
    // master starts a new epoch (CLUSTER.md, "History across failovers").
    let last = acked_pubs.last().copied().unwrap_or(0);
    let got = received(&mut s, last, WAIT * 2, |body| match body {
        Body::Publication { payload, .. } | Body::Publish { payload, .. } => number(payload),
        _ => None,
    })
    .await;
    let lost = in_order_missing("publication", &got.numbers, &acked_pubs);
    let told_by = got
        .told_lost
        .last()
        .and_then(|i| got.numbers.get(*i).copied())
        .unwrap_or(u32::MAX);
    // A promoted server starts a new epoch (it cannot know what the old
    // master took last), and says so.
    assert!(
        !set.starts_an_epoch() || !got.told_lost.is_empty(),
        "{label}: the subscriber is told that the channel's history changed epoch"
    );
    let untold: Vec<u32> = lost.iter().copied().filter(|n| *n > told_by).collect();
    assert!(
        untold.is_empty() && (lost.is_empty() || !got.told_lost.is_empty()),
        "{label}: acknowledged publications never arrived and nobody said so: {lost:?} (told at {:?} of {:?})",
        got.told_lost,
        got.numbers
    );

    // Presence was rewritten on the new master: it routes to everyone.
    set.assert_routed(&everyone).await;
    super::redis::wait_listed(&a, &everyone).await;

    let span = |gap: Option<(Instant, Instant)>| {
        gap.map(|(f, l)| {
            format!(
                "{:.1}s..{:.1}s",
                f.saturating_duration_since(started).as_secs_f64(),
                l.saturating_duration_since(started).as_secs_f64()
            )
        })
        .unwrap_or_else(|| "none".into())
    };
    let figures = format!(
        "{label}: master {old} -> {new} named after {:.1}s, delivery resumed after {:.1}s; directs {} acked / {} refused ({}), publications {} acked / {} refused ({}), acknowledged but lost {} {:?} (told {}x at {:?} of {} received); refusals: {refused_directs:?} {refused_pubs:?}",
        promoted.as_secs_f64(),
        resumed.as_secs_f64(),
        acked_directs.len(),
        directs.len() - acked_directs.len(),
        span(gap_directs),
        acked_pubs.len(),
        publications.len() - acked_pubs.len(),
        span(gap_pubs),
        lost.len(),
        lost.first().zip(lost.last()),
        got.told_lost.len(),
        got.told_lost
            .iter()
            .map(|i| got.numbers.get(*i))
            .collect::<Vec<_>>(),
        got.numbers.len(),
    );
    (old, new, figures)
}
