//! The channel scenarios, on three nodes clustered through Redis:
//! `channel-fanout` (one channel, many subscribers, beside a broadcast to
//! the same clients of the same nodes) and `sparse-channels` (many
//! channels with two subscribers each, beside a raw quinn + Redis channel
//! relay of the same layout, with each node's Redis traffic checked
//! against its own channels). Placement and publication choices come from
//! a fixed seed, so runs, and fabric and floor in one run, do the same.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use crate::procs::CpuUse;
use crate::raw;
use crate::scenarios::{
    FanoutReceivers, IN_FLIGHT, Lab, Latency, PACE, RATE_WINDOW, Sizes, Step, best, broadcast,
    connect_many, cpu_json, cpu_row, open_many, past_rate_cap, ratio, raw_endpoints, stamp,
    steps_json,
};
use quic_fabric::client::{Client, PendingReply};
use quic_fabric::protocol::{self, Body, Frame, Payload, Priority};

/// Nodes (and floor servers) of both scenarios.
const NODES: usize = 3;

/// Seed of every random choice: where subscribers and publishers connect,
/// and which publisher publishes to which channel.
const SEED: u64 = 0x5EED_2026_C4A1;

/// The one channel of `channel-fanout`.
const FANOUT_CHANNEL: &str = "bench-fanout";

/// Subscribers of each channel in `sparse-channels`.
const SUBSCRIBERS: usize = 2;

/// Publications before a latency measurement whose deliveries are not
/// recorded (connections and Redis paths warm).
const WARM_UP: usize = 100;

/// How long deliveries may trail the last publication of a phase.
const DRAIN: Duration = Duration::from_secs(2);

/// A fresh Redis key prefix per cluster: a killed node's liveness and
/// channel keys outlive it by their TTL, and a later cluster on the same
/// prefix would take it for alive.
fn fresh_prefix(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "bench{tag}{}n{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts [`NODES`] nodes on Redis `url`, node `i` with `extra(i)` flags.
async fn cluster(
    lab: &mut Lab,
    url: &str,
    tag: &str,
    extra: impl Fn(usize) -> Vec<String>,
) -> anyhow::Result<Vec<SocketAddr>> {
    let prefix = fresh_prefix(tag);
    let mut addrs = Vec::new();
    for i in 0..NODES {
        let flags = extra(i);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        addrs.push(lab.node(Some((url, &prefix)), &flags).await?);
    }
    Ok(addrs)
}

/// How `channel-fanout` reaches its receivers (the index of its figures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// A Broadcast to every client (the reference).
    Broadcast = 0,
    /// A Publish to the channel every receiver subscribed to.
    Channel = 1,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Broadcast => "broadcast",
            Via::Channel => "channel",
        }
    }
}

/// Sends `payload` from `publisher` the `via` way, without waiting for
/// the Ack (like the `fanout` publisher).
async fn fan_out(publisher: &Client, via: Via, payload: Vec<u8>) -> anyhow::Result<()> {
    match via {
        Via::Broadcast => broadcast(publisher, payload).await,
        Via::Channel => {
            let body = Body::Publish {
                channel: FANOUT_CHANNEL.to_owned(),
                payload: Payload::Binary(payload),
            };
            publisher.submit(Priority::Normal, body).await?;
            Ok(())
        }
    }
}

/// `channel-fanout`: publications to one channel whose `n` subscribers
/// are spread evenly over three nodes, beside broadcasts to the same `n`
/// clients (the same deliveries, packets, Redis hop and processes: what
/// differs is the channel routing). Both run in one lab, interleaved, so
/// the machine's noise falls on both alike: latency with one fan-out
/// every 100 ms, alternately a broadcast and a publication; then a
/// ladder of rates, each rung a broadcast step and a publication step
/// (their order alternating), until both are over on one rung or either
/// was over twice.
pub(crate) async fn channel_fanout(sizes: &Sizes, url: &str) -> anyhow::Result<Value> {
    let n = sizes.fanout_clients;
    let count = sizes.latency_broadcasts;
    println!(
        "channel-fanout: 1 publisher, {n} subscribers of one channel spread over {NODES} nodes + Redis, 100-byte publications; beside broadcasts to the same {n} clients, interleaved"
    );
    let mut lab = Lab::new()?;
    // The `fanout` scenario's node flags.
    let flags = |_| vec!["--outbound-queue-len".to_owned(), "4096".to_owned()];
    let addrs = cluster(&mut lab, url, "chf", flags).await?;
    let (receivers, clients) = connect_many(&lab, &addrs, n).await?;
    futures_util::stream::iter(&clients)
        .map(|c| c.subscribe(FANOUT_CHANNEL, false))
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let publisher = lab.client(addrs[0], "publisher").await?;
    let receivers = FanoutReceivers::new(receivers, Vec::new());

    let [(b_last, b_all), (c_last, c_all)] =
        interleaved_latency(&receivers, &publisher, n, count).await?;
    println!("{}", b_last.row("broadcast, last receiver"));
    println!("{}", c_last.row("channel, last receiver"));
    println!("{}", b_all.row("broadcast, every delivery"));
    println!("{}", c_all.row("channel, every delivery"));
    let q = |l: &Latency, p| l.q(p) as f64;
    let last50 = ratio(q(&c_last, 0.5), q(&b_last, 0.5));
    let last99 = ratio(q(&c_last, 0.99), q(&b_last, 0.99));
    let all50 = ratio(q(&c_all, 0.5), q(&b_all, 0.5));
    let all99 = ratio(q(&c_all, 0.99), q(&b_all, 0.99));
    println!(
        "  channel / broadcast at 5/s each: last receiver p50 {last50:.2}x, p99 {last99:.2}x; every delivery p50 {all50:.2}x, p99 {all99:.2}x"
    );

    let mut rate = sizes
        .fanout_start
        .map_or(sizes.channel_start, |d| d / n.max(1) as f64);
    let mut steps: [Vec<Step>; 2] = Default::default();
    let mut send_broadcast = |p| fan_out(&publisher, Via::Broadcast, p);
    let mut send_channel = |p| fan_out(&publisher, Via::Channel, p);
    println!("  rates, each rung broadcast and channel in turn:");
    loop {
        let order = if steps[0].len().is_multiple_of(2) {
            [Via::Broadcast, Via::Channel]
        } else {
            [Via::Channel, Via::Broadcast]
        };
        for via in order {
            let step = match via {
                Via::Broadcast => {
                    receivers
                        .step(&lab, rate, sizes.fanout_step, &mut send_broadcast)
                        .await?
                }
                Via::Channel => {
                    receivers
                        .step(&lab, rate, sizes.fanout_step, &mut send_channel)
                        .await?
                }
            };
            println!("    {:<9} {}", via.label(), step.line());
            if !step.ok {
                // Let an overloaded step's backlog clear before the other.
                tokio::time::sleep(DRAIN).await;
            }
            steps[via as usize].push(step);
        }
        // On 2 shared cores one noisy second can fail a step that the
        // next rung passes: the ladder goes on until both are over on one
        // rung, or either was over twice.
        let rungs = steps[0].len();
        let both_over = steps.iter().all(|s| s.last().is_some_and(|s| !s.ok));
        let twice_over = steps
            .iter()
            .any(|s| s.iter().filter(|s| !s.ok).count() >= 2);
        if both_over || twice_over || past_rate_cap(rate) || rungs >= sizes.channel_steps {
            break;
        }
        rate *= 1.5;
    }
    let [b_steps, c_steps] = &steps;
    let (b_best, c_best) = (best(b_steps), best(c_steps));
    let rate_ratio = ratio(c_best, b_best);
    println!(
        "  sustained deliveries/s (highest rung passed): channel {c_best:.0}, broadcast {b_best:.0} ({rate_ratio:.2}x; rungs are 1.5x apart)"
    );
    // At the highest rung both sustained: the same offered rate, measured
    // within seconds of each other.
    let shared = b_steps
        .iter()
        .zip(c_steps)
        .rev()
        .find(|(b, c)| b.ok && c.ok);
    let at_shared = shared.map(|(b, c)| {
        let r = |c: f64, b: f64| ratio(c, b);
        println!(
            "  channel / broadcast at {:.0} deliveries/s: server CPU per delivery {:.2} / {:.2} µs ({:.2}x), clients {:.2} / {:.2} µs ({:.2}x), p50 {:.2}x, p99 {:.2}x",
            c.offered,
            c.server_us,
            b.server_us,
            r(c.server_us, b.server_us),
            c.client_us,
            b.client_us,
            r(c.client_us, b.client_us),
            r(c.p50_us as f64, b.p50_us as f64),
            r(c.p99_us as f64, b.p99_us as f64),
        );
        json!({"offered": c.offered,
               "server_us_ratio": r(c.server_us, b.server_us),
               "client_us_ratio": r(c.client_us, b.client_us),
               "p50_ratio": r(c.p50_us as f64, b.p50_us as f64),
               "p99_ratio": r(c.p99_us as f64, b.p99_us as f64)})
    });
    Ok(json!({
        "clients": n, "nodes": NODES, "latency_messages_each": count,
        "channel": {"last": c_last.json(), "all": c_all.json(), "steps": steps_json(c_steps)},
        "broadcast": {"last": b_last.json(), "all": b_all.json(), "steps": steps_json(b_steps)},
        "last_p50_ratio": last50, "last_p99_ratio": last99,
        "all_p50_ratio": all50, "all_p99_ratio": all99,
        "rate_ratio": rate_ratio, "at_highest_shared_rung": at_shared,
    }))
}

/// `count` fan-outs each way, one every 100 ms, broadcast and
/// publication in turn (5/s each); per way, the latency of each
/// message's last arrival and of every delivery.
async fn interleaved_latency(
    receivers: &FanoutReceivers,
    publisher: &Client,
    n: usize,
    count: usize,
) -> anyhow::Result<[(Latency, Latency); 2]> {
    receivers.track_arrivals();
    let before = receivers.count();
    let mut sent: [Vec<u64>; 2] = Default::default();
    let mut next = tokio::time::Instant::now();
    for i in 0..count * 2 {
        let via = [Via::Broadcast, Via::Channel][i % 2];
        let payload = stamp(100);
        sent[via as usize].push(u64::from_le_bytes(payload[..8].try_into()?));
        fan_out(publisher, via, payload).await?;
        next += Duration::from_millis(100);
        tokio::time::sleep_until(next).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while receivers.count() - before < (2 * count * n) as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let arrivals = receivers.take_arrivals();
    let mut out = [(); 2].map(|_| (Latency::new(), Latency::new()));
    for (via, keys) in [Via::Broadcast, Via::Channel].into_iter().zip(&sent) {
        let (last, all) = &mut out[via as usize];
        for key in keys {
            let got: Vec<Duration> = arrivals
                .iter()
                .filter_map(|a| a.get(key).copied())
                .collect();
            anyhow::ensure!(
                got.len() == n,
                "a {} reached {} of {n} receivers within 5 s",
                via.label(),
                got.len()
            );
            for &d in &got {
                all.record(d);
            }
            last.record(got.into_iter().max().unwrap_or_default());
        }
    }
    Ok(out)
}

/// Where `sparse-channels` puts its clients, drawn from [`SEED`].
struct Layout {
    /// The nodes of each channel's subscribers (independent draws: both
    /// may be on one node).
    channels: Vec<[usize; SUBSCRIBERS]>,
    /// The node of each publisher.
    publishers: Vec<usize>,
}

impl Layout {
    fn new(channels: usize, publishers: usize) -> Layout {
        let mut rng = fastrand::Rng::with_seed(SEED);
        Layout {
            channels: (0..channels)
                .map(|_| std::array::from_fn(|_| rng.usize(..NODES)))
                .collect(),
            publishers: (0..publishers).map(|_| rng.usize(..NODES)).collect(),
        }
    }

    fn name(channel: usize) -> String {
        format!("sparse-{channel:04}")
    }

    /// Every subscriber as (channel, node), in connection order.
    fn subscribers(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.channels
            .iter()
            .enumerate()
            .flat_map(|(c, nodes)| nodes.iter().map(move |&node| (c, node)))
    }

    /// Channels with a subscriber on `node`.
    fn node_channels(&self, node: usize) -> usize {
        self.channels.iter().filter(|n| n.contains(&node)).count()
    }

    /// Of `per_channel` publications, those to channels with a subscriber
    /// on `node`: what the node's Redis subscription should carry.
    fn node_publications(&self, node: usize, per_channel: &[u64]) -> u64 {
        self.channels
            .iter()
            .zip(per_channel)
            .filter(|(n, _)| n.contains(&node))
            .map(|(_, count)| count)
            .sum()
    }
}

/// Rounds each `sparse-channels` phase is cut into, fabric and floor
/// taking turns (the order alternating), so a noisy stretch of the shared
/// machine falls on both.
const ROUNDS: usize = 3;

/// How one side of `sparse-channels` publishes.
enum Publishers {
    /// Fabric clients, whose Acks are awaited at most [`RATE_WINDOW`]
    /// behind (like `saturate`'s).
    Fabric {
        clients: Vec<Client>,
        acks: VecDeque<PendingReply>,
    },
    /// Raw quinn clients of the floor, which acknowledges nothing.
    Raw(Vec<raw::RawClient>),
}

impl Publishers {
    fn len(&self) -> usize {
        match self {
            Publishers::Fabric { clients, .. } => clients.len(),
            Publishers::Raw(clients) => clients.len(),
        }
    }

    /// Publishes `payload` to `channel` from publisher `from`.
    async fn send(&mut self, from: usize, channel: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        let body = Body::Publish {
            channel: channel.to_owned(),
            payload: Payload::Binary(payload),
        };
        match self {
            Publishers::Fabric { clients, acks } => {
                acks.push_back(clients[from].submit(Priority::Normal, body).await?);
                if acks.len() > RATE_WINDOW as usize
                    && let Some(ack) = acks.pop_front()
                {
                    ack.wait().await?;
                }
            }
            Publishers::Raw(clients) => {
                let frame = protocol::encode(&Frame::new(Priority::Normal, body))?;
                clients[from].send(&frame).await?;
            }
        }
        Ok(())
    }

    /// Waits for every Ack still due.
    async fn finish(&mut self) -> anyhow::Result<()> {
        if let Publishers::Fabric { acks, .. } = self {
            for ack in acks.drain(..) {
                ack.wait().await?;
            }
        }
        Ok(())
    }
}

/// One side of `sparse-channels` (fabric or floor): its servers and
/// clients, and what it measured so far.
struct Side {
    label: &'static str,
    lab: Lab,
    publishers: Publishers,
    receivers: FanoutReceivers,
    /// Fabric subscribers (their connections end with them).
    _subscribers: Vec<Client>,
    /// Which publisher publishes to which channel next: from the same
    /// seed on both sides, so both publish the same sequence.
    rng: fastrand::Rng,
    /// Publications to each channel so far.
    per_channel: Vec<u64>,
    /// Every delivery's latency in the paced rounds.
    latency: Latency,
    /// Saturated rounds: deliveries expected and received, time from
    /// each round's start to its last delivery, CPU used.
    expected: u64,
    delivered: u64,
    busy: Duration,
    servers_cpu: Duration,
    clients_cpu: Duration,
}

impl Side {
    fn new(
        label: &'static str,
        lab: Lab,
        publishers: Publishers,
        receivers: FanoutReceivers,
        subscribers: Vec<Client>,
    ) -> Side {
        Side {
            label,
            lab,
            publishers,
            receivers,
            _subscribers: subscribers,
            rng: fastrand::Rng::with_seed(SEED + 1),
            per_channel: Vec::new(),
            latency: Latency::new(),
            expected: 0,
            delivered: 0,
            busy: Duration::ZERO,
            servers_cpu: Duration::ZERO,
            clients_cpu: Duration::ZERO,
        }
    }

    /// One publication from a random publisher to a random channel.
    async fn publish(&mut self, names: &[String]) -> anyhow::Result<()> {
        let (p, c) = (
            self.rng.usize(..self.publishers.len()),
            self.rng.usize(..names.len()),
        );
        self.per_channel.resize(names.len(), 0);
        self.per_channel[c] += 1;
        self.publishers.send(p, &names[c], stamp(100)).await
    }

    /// `count` publications paced at [`PACE`]; their deliveries' latency
    /// is kept when `keep` (not for a warm-up).
    async fn paced(&mut self, names: &[String], count: usize, keep: bool) -> anyhow::Result<()> {
        // What saturated rounds recorded is not paced latency.
        self.receivers.collect();
        let before = self.receivers.count();
        let mut next = tokio::time::Instant::now();
        for _ in 0..count {
            self.publish(names).await?;
            next += PACE;
            tokio::time::sleep_until(next).await;
        }
        let expected = (count * SUBSCRIBERS) as u64;
        self.receivers.settle(before + expected, DRAIN).await;
        let mut recorded = self.receivers.collect();
        if keep {
            self.latency.absorb(&mut recorded);
        }
        Ok(())
    }

    /// Publishes for `duration` as fast as at most [`RATE_WINDOW`]
    /// publications undelivered allow.
    async fn saturate(&mut self, names: &[String], duration: Duration) -> anyhow::Result<()> {
        let per = SUBSCRIBERS as u64;
        let before = self.receivers.count();
        let meter = self.lab.meter()?;
        let start = Instant::now();
        let deadline = start + duration;
        let mut sent = 0u64;
        'sending: while Instant::now() < deadline {
            while (sent * per).saturating_sub(self.receivers.count() - before) >= RATE_WINDOW * per
            {
                if Instant::now() >= deadline {
                    break 'sending;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.publish(names).await?;
            sent += 1;
        }
        let last = self.receivers.settle(before + sent * per, DRAIN).await;
        let cpu = meter.stop()?;
        self.expected += sent * per;
        self.delivered += self.receivers.count() - before;
        self.busy += last.saturating_duration_since(start);
        self.servers_cpu += cpu.servers;
        self.clients_cpu += cpu.clients;
        Ok(())
    }

    /// Saturated publications/s whose deliveries arrived.
    fn publications_per_s(&self) -> f64 {
        self.delivered as f64 / SUBSCRIBERS as f64 / self.busy.as_secs_f64().max(1e-3)
    }

    fn cpu(&self) -> CpuUse {
        CpuUse {
            servers: self.servers_cpu,
            clients: self.clients_cpu,
            wall: self.busy,
        }
    }

    fn report(&self) -> Value {
        let publications = self.delivered / SUBSCRIBERS as u64;
        println!(
            "  saturated: {} {:.0} publications/s ({} of {} deliveries lost)",
            self.label,
            self.publications_per_s(),
            self.expected.saturating_sub(self.delivered),
            self.expected
        );
        println!(
            "{}",
            cpu_row(self.label, &self.cpu(), publications, "publication")
        );
        json!({"latency": self.latency.json(), "publications_per_s": self.publications_per_s(),
               "deliveries_expected": self.expected, "deliveries": self.delivered,
               "lost": self.expected.saturating_sub(self.delivered),
               "cpu": cpu_json(&self.cpu(), publications)})
    }
}

/// The counter line of a node's metrics that counts what its Redis
/// subscription delivered.
const PUBSUB_IN: &str = "fabric_pubsub_messages_total{direction=\"in\"}";

/// A node's pub/sub messages received from Redis so far, from its metrics
/// endpoint (the Stats frame does not carry them).
async fn pubsub_in(metrics: SocketAddr) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(metrics).await?;
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange).await??;
    text.lines()
        .find_map(|l| l.strip_prefix(PUBSUB_IN))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{metrics}/metrics has no {PUBSUB_IN}"))
}

async fn pubsub_in_all(metrics: &[SocketAddr]) -> anyhow::Result<Vec<u64>> {
    let mut counts = Vec::new();
    for &m in metrics {
        counts.push(pubsub_in(m).await?);
    }
    Ok(counts)
}

/// The fabric side of `sparse-channels`: three nodes (with their
/// metrics endpoints, returned too), the layout's subscribers subscribed,
/// its publishers connected.
async fn fabric_side(
    url: &str,
    layout: &Layout,
    names: &[String],
) -> anyhow::Result<(Side, Vec<SocketAddr>)> {
    let mut lab = Lab::new()?;
    let mut metrics = Vec::new();
    for _ in 0..NODES {
        metrics.push(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?);
    }
    let flags = |i: usize| vec!["--metrics-listen".to_owned(), metrics[i].to_string()];
    let addrs = cluster(&mut lab, url, "sparse", flags).await?;
    let configs: Vec<_> = layout
        .subscribers()
        .enumerate()
        .map(|(i, (_, node))| lab.client_config(addrs[node], &format!("s{i}")))
        .collect();
    let mut subscribers = open_many(configs, |c| async move { Client::connect(&c).await }).await?;
    futures_util::stream::iter(subscribers.iter().zip(layout.subscribers()))
        .map(|(client, (c, _))| client.subscribe(&names[c], false))
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let receivers = FanoutReceivers::new(
        subscribers.iter_mut().map(Client::take_events).collect(),
        Vec::new(),
    );
    let mut publishers = Vec::new();
    for (i, &node) in layout.publishers.iter().enumerate() {
        publishers.push(lab.client(addrs[node], &format!("p{i}")).await?);
    }
    let publishers = Publishers::Fabric {
        clients: publishers,
        acks: VecDeque::new(),
    };
    let side = Side::new("fabric", lab, publishers, receivers, subscribers);
    Ok((side, metrics))
}

/// The floor of `sparse-channels`: three raw quinn servers in
/// `channels:URL` mode (a Redis SUBSCRIBE per channel while a connection
/// subscribes to it, one pipelined PUBLISH per publication, nothing
/// else), the same layout.
async fn floor_side(url: &str, layout: &Layout, names: &[String]) -> anyhow::Result<Side> {
    let mut lab = Lab::new()?;
    let mut addrs = Vec::new();
    for _ in 0..NODES {
        addrs.push(lab.raw_server(&format!("channels:{url}")).await?);
    }
    let endpoints = raw_endpoints()?;
    let ca = lab.ca();
    let target = |i: usize, node: usize| {
        (
            endpoints[i % endpoints.len()].clone(),
            addrs[node],
            ca.clone(),
        )
    };
    let open = |(endpoint, addr, ca): (quinn::Endpoint, SocketAddr, std::path::PathBuf)| async move {
        raw::RawClient::connect_on(endpoint, addr, &ca).await
    };
    let targets: Vec<_> = layout
        .subscribers()
        .enumerate()
        .map(|(i, (_, node))| target(i, node))
        .collect();
    let mut subscribers = open_many(targets, open).await?;
    futures_util::stream::iter(subscribers.iter_mut().zip(layout.subscribers()))
        .map(|(client, (c, _))| {
            let subscribe = Frame::new(
                Priority::Normal,
                Body::Subscribe {
                    channel: names[c].clone(),
                    events: false,
                },
            );
            async move {
                client.send(&protocol::encode(&subscribe)?).await?;
                // The server's SubscribeAck, once Redis confirmed.
                tokio::time::timeout(Duration::from_secs(10), client.recv()).await??;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let receivers = FanoutReceivers::new(Vec::new(), subscribers);
    let targets: Vec<_> = layout
        .publishers
        .iter()
        .enumerate()
        .map(|(i, &node)| target(i, node))
        .collect();
    let publishers = Publishers::Raw(open_many(targets, open).await?);
    Ok(Side::new("floor", lab, publishers, receivers, Vec::new()))
}

/// `sparse-channels`: many channels with two subscribers each on random
/// nodes, publishers on random nodes publishing to random channels,
/// beside the raw channel relay floor with the same layout and
/// publication sequence (both set up at once, measured in turns). Each
/// node's messages from Redis must follow its own channels'
/// publications, not all of them.
pub(crate) async fn sparse_channels(sizes: &Sizes, url: &str) -> anyhow::Result<Value> {
    let layout = Layout::new(sizes.sparse_channels, sizes.sparse_publishers);
    let channels = layout.channels.len();
    let names: Vec<String> = (0..channels).map(Layout::name).collect();
    println!(
        "sparse-channels: {channels} channels x {SUBSCRIBERS} subscribers on random nodes of {NODES} (+ Redis), {} publishers on random nodes publishing 100 bytes to random channels (seeded); latency paced at 1,000/s, then saturated; fabric and floor in {ROUNDS} turns each",
        layout.publishers.len()
    );
    let (mut fabric, metrics) = fabric_side(url, &layout, &names).await?;
    let mut floor = floor_side(url, &layout, &names).await?;
    // The subscriptions' Join events cross Redis too: let them land
    // before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = pubsub_in_all(&metrics).await?;
    fabric.paced(&names, WARM_UP, false).await?;
    floor.paced(&names, WARM_UP, false).await?;
    let per_round = sizes.samples.div_ceil(ROUNDS);
    for round in 0..ROUNDS {
        let turns = if round % 2 == 0 {
            [&mut fabric, &mut floor]
        } else {
            [&mut floor, &mut fabric]
        };
        for side in turns {
            side.paced(&names, per_round, true).await?;
        }
    }
    for round in 0..ROUNDS {
        let turns = if round % 2 == 0 {
            [&mut fabric, &mut floor]
        } else {
            [&mut floor, &mut fabric]
        };
        for side in turns {
            side.saturate(&names, sizes.rate_window / ROUNDS as u32)
                .await?;
        }
    }
    fabric.publishers.finish().await?;
    floor.publishers.finish().await?;
    let after = pubsub_in_all(&metrics).await?;

    println!("{}", fabric.latency.row("fabric, every delivery"));
    println!("{}", floor.latency.row("floor: raw channel relay"));
    let fabric_json = fabric.report();
    let floor_json = floor.report();
    let (p50, p99) = (
        ratio(fabric.latency.q(0.5) as f64, floor.latency.q(0.5) as f64),
        ratio(fabric.latency.q(0.99) as f64, floor.latency.q(0.99) as f64),
    );
    let rate = ratio(fabric.publications_per_s(), floor.publications_per_s());
    println!("  fabric / floor: latency p50 {p50:.2}x, p99 {p99:.2}x; publications/s {rate:.2}x");
    let total: u64 = fabric.per_channel.iter().sum();
    let mut nodes = Vec::new();
    for (node, (a, b)) in after.iter().zip(&before).enumerate() {
        let got = a - b;
        let own = layout.node_publications(node, &fabric.per_channel);
        let own_channels = layout.node_channels(node);
        println!(
            "  node {}: subscribers of {own_channels} of {channels} channels; {got} messages from Redis for {own} publications to them ({:.3}x), {total} publications in all ({:.2} of them)",
            node + 1,
            ratio(got as f64, own as f64),
            ratio(got as f64, total as f64)
        );
        nodes.push(json!({"channels": own_channels, "pubsub_in": got,
                          "own_publications": own, "ratio_to_own": ratio(got as f64, own as f64),
                          "share_of_all": ratio(got as f64, total as f64)}));
    }
    Ok(json!({
        "channels": channels, "subscribers_per_channel": SUBSCRIBERS, "nodes": NODES,
        "publishers": layout.publishers.len(), "publications": total,
        "fabric": fabric_json, "floor_raw_channels": floor_json,
        "latency_p50_ratio": p50, "latency_p99_ratio": p99, "rate_ratio": rate,
        "per_node": nodes,
    }))
}
