//! The `history` scenario: what channel history costs a publisher, and how
//! fast a subscriber recovers after a reconnect, on three nodes clustered
//! through Redis. Publishing to a channel with history (size 1,000) is
//! measured in turns with a channel without history, each beside its raw
//! Redis floor from a plain redis-rs client in this process: pipelined
//! `PUBLISH` for the one, pipelined `EVALSHA` of the node's own
//! `publish_history.lua` (same payload size) for the other.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};

use crate::scenarios::{IN_FLIGHT, Lab, Latency, Sizes, ratio};
use quic_fabric::client::{Client, Event};
use quic_fabric::protocol::{Body, Payload, Priority, Recovery};

/// The node's script, run by the floor exactly as a node runs it.
const SCRIPT: &str = quic_fabric::bus::redis_bus::PUBLISH_HISTORY_SOURCE;

/// Bytes of each publication.
const PAYLOAD: usize = 100;

/// History kept per channel.
const SIZE: usize = 1_000;

/// Rounds of the latency and rate measurements, alternating kinds.
const ROUNDS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A channel without history.
    Plain,
    /// A channel whose namespace keeps history.
    History,
}

impl Kind {
    fn channel(self) -> &'static str {
        match self {
            Kind::Plain => "bench-plain",
            Kind::History => "h:bench",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Plain => "no history",
            Kind::History => "history 1,000",
        }
    }
}

pub(crate) async fn history(sizes: &Sizes, url: &str) -> anyhow::Result<Value> {
    let mut lab = Lab::new()?;
    let namespace = format!("h,history_size={SIZE},history_ttl=10m");
    let prefix = format!("benchhist{}", std::process::id());
    let mut addrs = Vec::new();
    for _ in 0..3 {
        addrs.push(
            lab.node(Some((url, &prefix)), &["--namespaces", &namespace])
                .await?,
        );
    }
    let publisher = lab.client(addrs[0], "publisher").await?;
    // A subscriber of each channel on another node, reading.
    let mut readers = Vec::new();
    for kind in [Kind::Plain, Kind::History] {
        let mut sub = lab.client(addrs[1], "sub").await?;
        sub.subscribe(kind.channel(), false).await?;
        let mut events = sub.take_events();
        readers.push((
            sub,
            tokio::spawn(async move { while events.recv().await.is_some() {} }),
        ));
    }
    println!(
        "history: publish to a channel with history ({SIZE} kept) vs without, 3 nodes + Redis, {PAYLOAD}-byte payloads, in {ROUNDS} alternating rounds; Ack latency one at a time, rate with {IN_FLIGHT} in flight; raw floors from redis-rs in this process"
    );
    let per_round = (sizes.samples / ROUNDS).max(50);
    let mut latency = [Latency::new(), Latency::new()];
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, kind) in [Kind::Plain, Kind::History].into_iter().enumerate() {
            for _ in 0..per_round {
                let started = Instant::now();
                publisher
                    .publish(
                        kind.channel(),
                        Payload::Binary(vec![7; PAYLOAD]),
                        Priority::Normal,
                    )
                    .await?;
                latency[i].record(started.elapsed());
            }
            rates[i].push(publish_rate(&publisher, kind, per_round * 4).await?);
        }
    }
    let floors = [
        raw_rate(url, false, per_round * 4).await?,
        raw_rate(url, true, per_round * 4).await?,
    ];
    let mut out = serde_json::Map::new();
    for (i, kind) in [Kind::Plain, Kind::History].into_iter().enumerate() {
        let rate = median(&mut rates[i]);
        println!("{}", latency[i].row(&format!("{} ack", kind.label())));
        println!(
            "  {:<28} {:>9.0} publications/s (median of {ROUNDS}); raw floor {:>9.0}/s ({}); ratio {:.2}",
            kind.label(),
            rate,
            floors[i],
            if i == 0 {
                "PUBLISH"
            } else {
                "EVALSHA publish_history.lua"
            },
            ratio(rate, floors[i])
        );
        out.insert(
            format!("{kind:?}").to_lowercase(),
            json!({"ack": latency[i].json(), "rate": rate, "rates": rates[i], "floor_rate": floors[i],
                   "ratio_to_floor": ratio(rate, floors[i])}),
        );
    }
    println!(
        "  history / no history: p50 ack {:.2}x, rate {:.2}x",
        ratio(latency[1].q(0.5) as f64, latency[0].q(0.5) as f64),
        ratio(
            out["history"]["rate"].as_f64().unwrap_or(0.0),
            out["plain"]["rate"].as_f64().unwrap_or(0.0)
        )
    );
    let mut recovery = Vec::new();
    for missed in [100usize, SIZE] {
        let took = recover(&lab, &publisher, addrs[1], addrs[2], missed).await?;
        println!(
            "  recovery of {missed:>5} missed publications: {:>7.1} ms from SubscribeSince to Subscribed (on another node)",
            took.as_secs_f64() * 1000.0
        );
        recovery.push(json!({"missed": missed, "ms": took.as_secs_f64() * 1000.0}));
    }
    out.insert("recovery".into(), Value::Array(recovery));
    for (sub, task) in readers {
        task.abort();
        drop(sub);
    }
    Ok(Value::Object(out))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Publications acknowledged per second with [`IN_FLIGHT`] outstanding.
async fn publish_rate(publisher: &Client, kind: Kind, n: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut sent = 0;
    while sent < n || !pending.is_empty() {
        while sent < n && pending.len() < IN_FLIGHT {
            let body = Body::Publish {
                channel: kind.channel().to_owned(),
                payload: Payload::Binary(vec![7; PAYLOAD]),
            };
            pending.push(publisher.submit(Priority::Normal, body).await?.wait());
            sent += 1;
        }
        if let Some(reply) = pending.next().await {
            reply?;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The raw floor: `n` PUBLISHes (or script calls, `script`) from redis-rs,
/// pipelined [`IN_FLIGHT`] at a time, per second.
async fn raw_rate(url: &str, script: bool, n: usize) -> anyhow::Result<f64> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let script_obj = redis::Script::new(SCRIPT);
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SCRIPT)
        .query_async(&mut conn)
        .await?;
    let payload = vec![7u8; PAYLOAD + 80];
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let batch = IN_FLIGHT.min(n - done);
        let mut pipe = redis::pipe();
        for _ in 0..batch {
            if script {
                pipe.cmd("EVALSHA")
                    .arg(script_obj.get_hash())
                    .arg(2)
                    .arg("benchfloor:hist")
                    .arg("benchfloor:hist-meta")
                    .arg(&payload)
                    .arg(SIZE)
                    .arg(600_000)
                    .arg(86_400_000)
                    .arg(&7u64.to_le_bytes()[..])
                    .arg("benchfloor:ch")
                    .ignore();
            } else {
                pipe.cmd("PUBLISH")
                    .arg("benchfloor:ch")
                    .arg(&payload)
                    .ignore();
            }
        }
        pipe.query_async::<()>(&mut conn).await?;
        done += batch;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _: () = redis::cmd("DEL")
        .arg("benchfloor:hist")
        .arg("benchfloor:hist-meta")
        .query_async(&mut conn)
        .await?;
    Ok(rate)
}

/// A subscriber on `home` takes its position and leaves; `missed`
/// publications go out; a new client on `other` subscribes from the
/// position. Returns how long from SubscribeSince to its answer (every
/// missed publication arrived before it; checked).
async fn recover(
    lab: &Lab,
    publisher: &Client,
    home: std::net::SocketAddr,
    other: std::net::SocketAddr,
    missed: usize,
) -> anyhow::Result<Duration> {
    let channel = Kind::History.channel();
    let first = lab.client(home, "away").await?;
    let position = first
        .subscribe_since(channel, false, None)
        .await?
        .position
        .ok_or_else(|| anyhow::anyhow!("no position"))?;
    first.close("away").await;
    for _ in 0..missed {
        publisher
            .publish(channel, Payload::Binary(vec![7; PAYLOAD]), Priority::Normal)
            .await?;
    }
    let mut back = lab.client(other, "back").await?;
    let started = Instant::now();
    let got = back.subscribe_since(channel, false, Some(position)).await?;
    let took = started.elapsed();
    anyhow::ensure!(
        got.recovery == Recovery::Recovered,
        "recovery {:?}",
        got.recovery
    );
    let mut replayed = 0;
    while let Ok(Some(Event::Frame(frame))) =
        tokio::time::timeout(Duration::from_millis(200), back.next_event()).await
    {
        if matches!(frame.body, Body::Publication { .. }) {
            replayed += 1;
        }
    }
    anyhow::ensure!(
        replayed >= missed,
        "{replayed} of {missed} missed publications recovered"
    );
    Ok(took)
}
