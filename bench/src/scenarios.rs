//! The scenarios: latency, fan-out and connection-scale benchmarks, each
//! run beside its floor (raw quinn, raw Redis) in the same process, on the
//! same machine, with the same sizes, and reported as fabric / floor ratios.
//! The channel scenarios are in `channels.rs` and use the helpers here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::channels;
use crate::procs::{self, CpuMeter, CpuUse, Proc};
use crate::raw;
use quic_fabric::client::{Client, ClientConfig, Event};
use quic_fabric::config::NodeConfig;
use quic_fabric::protocol::{self, Body, ClientId, Frame, Payload, Priority};

/// Benchmarks for quic-fabric, each beside its floor.
#[derive(Debug, Parser)]
#[command(name = "fabric-bench", version)]
pub struct BenchArgs {
    /// Which scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Tiny sizes: every scenario in seconds (for CI; figures meaningless).
    #[arg(long)]
    pub quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Use this Redis instead of starting a container (direct-cross,
    /// fanout, channel-fanout, sparse-channels).
    #[arg(long)]
    pub redis: Option<String>,
    /// Samples for latency measurements.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Fan-out clients (`fanout`, `fanout-latency`, `channel-fanout`).
    #[arg(long)]
    pub clients: Option<usize>,
    /// `sparse-channels`: channels (two subscribers each).
    #[arg(long)]
    pub channels: Option<usize>,
    /// `redis-cluster`: use this Redis Cluster (seed URLs, comma-separated)
    /// instead of starting one (3 masters + 3 replicas) in a container.
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// `redis-cluster`: channels each flow spreads over (their slots spread
    /// over the masters).
    #[arg(long)]
    pub shard_channels: Option<usize>,
    /// Idle connections for `connections`.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Fan-out: deliveries/s of the first step (default: 50 per receiver).
    #[arg(long)]
    pub fanout_start: Option<f64>,
    /// Fan-out: how long each step lasts.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub fanout_step: Option<Duration>,
    /// Fan-out: stop after this many steps (e.g. 1 to hold one rate while
    /// profiling).
    #[arg(long)]
    pub fanout_steps: Option<usize>,
    /// `connections` only: open the idle clients against this already
    /// running node (e.g. one under a heap profiler), hold them `--hold`,
    /// and measure nothing else.
    #[arg(long)]
    pub against: Option<std::net::SocketAddr>,
    /// With `--against`: the CA file of that node.
    #[arg(long, default_value = "certs/ca.pem")]
    pub ca: PathBuf,
    /// With `--against`: how long to hold the connections open.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// With `--against`: bare quinn connections instead of `Client`s (the
    /// `connections` floor).
    #[arg(long)]
    pub raw_clients: bool,
    /// `connections`: each `Client` on a socket of its own
    /// (`Socket::Private`) instead of the library's shared pool, to see
    /// what the pool saves.
    #[arg(long)]
    pub private_sockets: bool,
    /// `lossy` only: the node to measure (run through bench/lossy.sh).
    #[arg(long)]
    pub server: Option<std::net::SocketAddr>,
    /// `lossy` only: a raw quinn echo server (`raw-server echo`) for the floor.
    #[arg(long)]
    pub raw_server: Option<std::net::SocketAddr>,
    /// `lossy` only: congestion controller of the clients.
    #[arg(long, value_enum, default_value_t)]
    pub congestion: quic_fabric::config::Congestion,
    /// `lossy` only: bulk messages sent but not yet received back.
    #[arg(long, default_value_t = BULK_WINDOW)]
    pub bulk_window: u64,
    /// `lossy` only: how long each measurement lasts.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Ping round trip on one connection.
    Rtt,
    /// One-way latency and rate, two clients of one node.
    DirectLocal,
    /// One-way latency and rate, clients of two nodes through Redis.
    DirectCross,
    /// Broadcast to N clients at stepped rates.
    Fanout,
    /// One broadcast at a time (10/s) to N idle clients: when the last has it.
    FanoutLatency,
    /// N idle clients: node and client memory per connection, handshakes/s.
    Connections,
    /// One channel, N subscribers over 3 nodes + Redis, one publisher:
    /// last-receiver latency and stepped rates, interleaved with
    /// broadcasts to the same N clients of the same 3 nodes.
    ChannelFanout,
    /// 1,000 channels (`--channels`) with 2 subscribers each on random
    /// nodes of 3, publishers on random nodes: publications/s, latency,
    /// and each node's messages from Redis against its own channels'
    /// publications; in turns with a raw quinn + Redis channel relay of
    /// the same layout.
    SparseChannels,
    /// Publishing to a channel with history (1,000 kept) vs without, 3
    /// nodes + Redis: Ack latency and rate beside raw Redis floors
    /// (PUBLISH; EVALSHA of the node's script), and recovery time of 100
    /// and 1,000 missed publications on another node.
    History,
    /// 3 nodes on one Redis vs on a Redis Cluster (3 masters + 3
    /// replicas): channel publications (with and without history) and
    /// cross-node directs beside raw PUBLISH / SPUBLISH floors, Redis
    /// calls per master and per message (also with 2 nodes).
    RedisCluster,
    /// Small high-priority messages with and without a bulk flow on the
    /// same connection, against `--server` across an impaired link (run
    /// by bench/lossy.sh; not part of `all`).
    Lossy,
    /// Everything.
    All,
}

/// How much each scenario does (`--quick`: seconds in all).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) samples: usize,
    pub(crate) rate_window: Duration,
    pub(crate) fanout_clients: usize,
    pub(crate) fanout_step: Duration,
    pub(crate) fanout_start: Option<f64>,
    pub(crate) fanout_steps: usize,
    /// `channel-fanout`: cap on rungs (a broadcast and a channel step each).
    pub(crate) channel_steps: usize,
    /// `channel-fanout`: messages/s of the first rung (default; each to
    /// every receiver).
    pub(crate) channel_start: f64,
    pub(crate) latency_broadcasts: usize,
    pub(crate) connections: usize,
    /// `sparse-channels`: channels, each with two subscribers.
    pub(crate) sparse_channels: usize,
    /// `sparse-channels`: publishing clients.
    pub(crate) sparse_publishers: usize,
    /// `redis-cluster`: channels per flow.
    pub(crate) shard_channels: usize,
}

impl Sizes {
    fn new(args: &BenchArgs) -> Sizes {
        let mut s = if args.quick {
            Sizes {
                samples: 200,
                rate_window: Duration::from_millis(500),
                fanout_clients: 20,
                fanout_step: Duration::from_millis(400),
                fanout_start: None,
                fanout_steps: usize::MAX,
                channel_steps: 3,
                channel_start: 50.0,
                latency_broadcasts: 10,
                connections: 200,
                sparse_channels: 50,
                sparse_publishers: 6,
                shard_channels: 64,
            }
        } else {
            Sizes {
                samples: 5_000,
                rate_window: Duration::from_secs(3),
                fanout_clients: 1_000,
                fanout_step: Duration::from_secs(2),
                fanout_start: None,
                fanout_steps: usize::MAX,
                channel_steps: usize::MAX,
                // Four steps below `fanout`'s first rate, on its ladder:
                // three nodes, Redis and the clients on 2 shared cores
                // often miss 50 per receiver, and a ratio needs a rung
                // both sustain.
                channel_start: 50.0 / (1.5 * 1.5 * 1.5 * 1.5),
                latency_broadcasts: 100,
                connections: 10_000,
                sparse_channels: 1_000,
                sparse_publishers: 30,
                shard_channels: 64,
            }
        };
        if let Some(n) = args.samples {
            s.samples = n;
        }
        if let Some(n) = args.clients {
            s.fanout_clients = n;
        }
        if let Some(n) = args.connections {
            s.connections = n;
        }
        if let Some(d) = args.fanout_step {
            s.fanout_step = d;
        }
        s.fanout_start = args.fanout_start;
        if let Some(n) = args.fanout_steps {
            s.fanout_steps = n;
            s.channel_steps = n;
        }
        if let Some(n) = args.channels {
            s.sparse_channels = n;
        }
        if let Some(n) = args.shard_channels {
            s.shard_channels = n;
        }
        s
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Latency {
    pub(crate) fn new() -> Latency {
        Latency {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let _ = self
            .hist
            .record((d.as_micros() as u64).clamp(1, 120_000_000));
    }

    /// Adds `other`'s samples to these and empties `other`.
    pub(crate) fn absorb(&mut self, other: &mut Latency) {
        let _ = self.hist.add(&other.hist);
        other.hist.reset();
    }

    pub(crate) fn q(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "samples": self.hist.len(),
            "p50_us": self.q(0.5), "p90_us": self.q(0.9), "p99_us": self.q(0.99),
            "p999_us": self.q(0.999), "max_us": self.hist.max(),
        })
    }

    pub(crate) fn row(&self, label: &str) -> String {
        format!(
            "  {label:<28} p50 {:>7} µs  p90 {:>7}  p99 {:>7}  p99.9 {:>7}  max {:>7}  n={}",
            self.q(0.5),
            self.q(0.9),
            self.q(0.99),
            self.q(0.999),
            self.hist.max(),
            self.hist.len()
        )
    }
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// Time base shared by senders and receivers in this process.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn stamp(size: usize) -> Vec<u8> {
    let mut payload = (epoch().elapsed().as_nanos() as u64).to_le_bytes().to_vec();
    payload.resize(size.max(8), 0xAB);
    payload
}

fn age(payload: &[u8]) -> Option<Duration> {
    let nanos = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(
        epoch()
            .elapsed()
            .saturating_sub(Duration::from_nanos(nanos)),
    )
}

fn payload_of(frame: &Frame) -> Option<&[u8]> {
    match &frame.body {
        Body::Direct {
            payload: Payload::Binary(b),
            ..
        }
        | Body::Broadcast {
            payload: Payload::Binary(b),
        }
        | Body::Publish {
            payload: Payload::Binary(b),
            ..
        } => Some(b),
        _ => None,
    }
}

/// Everything a run needs: certificates, and the servers it started, each
/// in a child process of its own (killed when the lab is dropped).
pub(crate) struct Lab {
    certs: tempfile::TempDir,
    servers: Vec<Proc>,
}

/// Node flags for load from one machine: all clients come from 127.0.0.1
/// and send far above a chat client's rate, so the per-IP limits are off
/// and the per-client limiter (kept on: its check is on the hot path) has
/// a rate it never reaches.
const LOAD_FLAGS: &[&str] = &[
    "--max-clients",
    "100000",
    "--max-connections-per-ip",
    "0",
    "--connection-rate-per-ip",
    "0",
    "--rate-limit-messages",
    "100000000",
    "--rate-limit-burst",
    "100000000",
    "--drain-linger",
    "0s",
    "--log-format",
    "text",
];

impl Lab {
    pub(crate) fn new() -> anyhow::Result<Lab> {
        let certs = tempfile::tempdir()?;
        quic_fabric::tls::ensure_dev_certs(certs.path(), &NodeConfig::default().cert_names)?;
        Ok(Lab {
            certs,
            servers: Vec::new(),
        })
    }

    pub(crate) fn ca(&self) -> PathBuf {
        self.certs.path().join("ca.pem")
    }

    /// Starts a `fabric-node` process (on Redis `redis` with `prefix`, or
    /// alone) with [`LOAD_FLAGS`] and `extra`; waits until it is ready.
    pub(crate) async fn node(
        &mut self,
        redis: Option<(&str, &str)>,
        extra: &[&str],
    ) -> anyhow::Result<std::net::SocketAddr> {
        let mut flags: Vec<String> = LOAD_FLAGS.iter().map(|s| s.to_string()).collect();
        if let Some((url, prefix)) = redis {
            flags.extend(["--redis-url".into(), url.into()]);
            flags.extend(["--redis-prefix".into(), prefix.into()]);
        }
        flags.extend(extra.iter().map(|s| s.to_string()));
        let node = procs::node(self.certs.path(), &flags).await?;
        let addr = node.addr;
        self.servers.push(node);
        Ok(addr)
    }

    /// Starts a raw quinn floor server process.
    pub(crate) async fn raw_server(&mut self, mode: &str) -> anyhow::Result<std::net::SocketAddr> {
        let server = procs::raw_server(self.certs.path(), mode).await?;
        let addr = server.addr;
        self.servers.push(server);
        Ok(addr)
    }

    /// Measures the CPU of every server process and of this one.
    pub(crate) fn meter(&self) -> anyhow::Result<CpuMeter> {
        CpuMeter::start(&self.servers.iter().collect::<Vec<_>>())
    }

    pub(crate) async fn client(
        &self,
        addr: std::net::SocketAddr,
        name: &str,
    ) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.client_config(addr, name)).await?)
    }

    /// The client library's defaults, as an application uses them (only
    /// the server name and patience for replies under load set).
    pub(crate) fn client_config(&self, addr: std::net::SocketAddr, name: &str) -> ClientConfig {
        let mut c = ClientConfig::new(addr.to_string(), self.ca()).name(name);
        c.server_name = Some("localhost".into());
        c.request_timeout = Duration::from_secs(30);
        c
    }
}

/// One line of CPU figures: microseconds per unit for servers and clients.
pub(crate) fn cpu_row(label: &str, cpu: &CpuUse, units: u64, unit: &str) -> String {
    format!(
        "  {label:<28} CPU per {unit}: servers {:>6.2} µs, clients {:>6.2} µs ({units} x {unit} in {:.1} s)",
        cpu.server_us_per(units),
        cpu.client_us_per(units),
        cpu.wall.as_secs_f64()
    )
}

pub(crate) fn cpu_json(cpu: &CpuUse, units: u64) -> Value {
    json!({"units": units, "server_us_per_unit": cpu.server_us_per(units),
           "client_us_per_unit": cpu.client_us_per(units), "wall_s": cpu.wall.as_secs_f64()})
}

/// Runs the benchmark; returns the process exit code.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let sizes = Sizes::new(&args);
    epoch();
    if let Some(addr) = args.against {
        return hold_idle(addr, &args, sizes.connections).await;
    }
    let mut results = BTreeMap::new();
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All => vec![
            Scenario::Rtt,
            Scenario::DirectLocal,
            Scenario::DirectCross,
            Scenario::Fanout,
            Scenario::FanoutLatency,
            Scenario::Connections,
            Scenario::ChannelFanout,
            Scenario::SparseChannels,
            Scenario::History,
            Scenario::RedisCluster,
        ],
        s => vec![s],
    };
    let mut redis = None;
    let outcome = run_scenarios(&args, &sizes, &scenarios, &mut results, &mut redis).await;
    // The Redis container goes away whatever happened.
    if let Some(container) = redis {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &container])
            .output();
    }
    outcome?;
    if let Some(path) = &args.json {
        let doc = json!({
            "quick": args.quick,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

async fn run_scenarios(
    args: &BenchArgs,
    sizes: &Sizes,
    scenarios: &[Scenario],
    results: &mut BTreeMap<String, Value>,
    redis: &mut Option<String>,
) -> anyhow::Result<()> {
    for (i, &scenario) in scenarios.iter().enumerate() {
        if i > 0 {
            // The previous scenario's nodes shut down in the background;
            // let that finish before measuring again.
            tokio::time::sleep(Duration::from_secs(if args.quick { 0 } else { 3 })).await;
        }
        let started = Instant::now();
        let value = match scenario {
            Scenario::Rtt => rtt(sizes).await?,
            Scenario::DirectLocal => direct_local(sizes).await?,
            Scenario::DirectCross => {
                let url = redis_url(args, redis).await?;
                direct_cross(sizes, &url).await?
            }
            Scenario::Fanout => {
                let url = redis_url(args, redis).await?;
                fanout(sizes, &url).await?
            }
            Scenario::FanoutLatency => fanout_latency(sizes).await?,
            Scenario::Connections => connections(sizes, args.private_sockets).await?,
            Scenario::ChannelFanout => {
                let url = redis_url(args, redis).await?;
                channels::channel_fanout(sizes, &url).await?
            }
            Scenario::SparseChannels => {
                let url = redis_url(args, redis).await?;
                channels::sparse_channels(sizes, &url).await?
            }
            Scenario::History => {
                let url = redis_url(args, redis).await?;
                crate::history::history(sizes, &url).await?
            }
            Scenario::RedisCluster => {
                crate::redis_cluster::redis_cluster(
                    sizes,
                    args.redis.clone(),
                    args.redis_cluster.clone(),
                )
                .await?
            }
            Scenario::Lossy => lossy(args).await?,
            Scenario::All => unreachable!("expanded above"),
        };
        println!("  ({:.1}s)\n", started.elapsed().as_secs_f64());
        results.insert(format!("{scenario:?}"), value);
    }
    Ok(())
}

/// The Redis to use: `--redis`, or a container started once per run.
async fn redis_url(args: &BenchArgs, started: &mut Option<String>) -> anyhow::Result<String> {
    if let Some(url) = &args.redis {
        return Ok(url.clone());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    if started.is_none() {
        let image = std::env::var("FABRIC_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".into());
        let out = std::process::Command::new("docker")
            .args([
                "run",
                "-d",
                "--rm",
                "-p",
                &format!("127.0.0.1:{port}:6379"),
                &image,
                "redis-server",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "cannot start Redis ({}): run cluster/images.sh redis, or pass --redis URL",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        *started = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        let client = redis::Client::open(url.as_str())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "Redis container did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return Ok(url);
    }
    // Reuse the started container: find its port.
    let id = started.as_ref().expect("set");
    let out = std::process::Command::new("docker")
        .args(["port", id, "6379/tcp"])
        .output()?;
    let mapping = String::from_utf8_lossy(&out.stdout);
    let port = mapping
        .trim()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok(format!("redis://127.0.0.1:{port}"))
}

async fn rtt(sizes: &Sizes) -> anyhow::Result<Value> {
    println!("rtt: ping round trip on one connection (server in its own process)");
    let mut lab = Lab::new()?;
    let addr = lab.node(None, &[]).await?;
    let client = lab.client(addr, "rtt").await?;
    for _ in 0..100 {
        client.ping().await?;
    }
    let mut fabric = Latency::new();
    let meter = lab.meter()?;
    for _ in 0..sizes.samples {
        fabric.record(client.ping().await?);
    }
    let fabric_cpu = meter.stop()?;
    drop(lab);
    let mut lab = Lab::new()?;
    let (floor, floor_cpu) = raw_rtt(&mut lab, sizes.samples).await?;
    println!("{}", fabric.row("fabric ping/pong"));
    println!("{}", floor.row("floor: raw quinn echo"));
    let n = sizes.samples as u64;
    println!("{}", cpu_row("fabric", &fabric_cpu, n, "round trip"));
    println!("{}", cpu_row("floor", &floor_cpu, n, "round trip"));
    let r = ratio(fabric.q(0.99) as f64, floor.q(0.99) as f64);
    println!(
        "  fabric / floor: p50 {:.2}x, p99 {r:.2}x",
        ratio(fabric.q(0.5) as f64, floor.q(0.5) as f64)
    );
    Ok(
        json!({"fabric": fabric.json(), "floor_raw_quinn": floor.json(), "p99_ratio": r,
              "fabric_cpu": cpu_json(&fabric_cpu, n), "floor_cpu": cpu_json(&floor_cpu, n)}),
    )
}

/// Raw quinn echo of a Ping-sized frame: the floor for any round trip.
async fn raw_rtt(lab: &mut Lab, samples: usize) -> anyhow::Result<(Latency, CpuUse)> {
    let addr = lab.raw_server("echo").await?;
    let mut client = raw::RawClient::connect(addr, &lab.ca()).await?;
    let ping = protocol::encode(&Frame::new(Priority::High, Body::Ping))?;
    let mut hist = Latency::new();
    for _ in 0..100 {
        client.send(&ping).await?;
        client.recv().await?;
    }
    let meter = lab.meter()?;
    for _ in 0..samples {
        let start = Instant::now();
        client.send(&ping).await?;
        client.recv().await?;
        hist.record(start.elapsed());
    }
    Ok((hist, meter.stop()?))
}

/// What a one-way measurement found: latency paced at [`PACE`], then the
/// saturated rate and its CPU cost.
struct OneWay {
    latency: Latency,
    rate: f64,
    lost: u64,
    cpu: CpuUse,
    messages: u64,
}

/// Pace of one-way latency samples: 1,000 messages/s.
pub(crate) const PACE: Duration = Duration::from_millis(1);

/// One-way latency (directs paced at [`PACE`]) and saturated rate from
/// `a` to `b`.
async fn one_way(
    lab: &Lab,
    a: &Client,
    b: &mut Client,
    samples: usize,
    window: Duration,
) -> anyhow::Result<OneWay> {
    let to = b.client_id();
    let mut events = b.take_events();
    let total = samples + 100;
    let receiver = tokio::spawn(async move {
        let mut hist = Latency::new();
        let mut seen = 0;
        while seen < total {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                Ok(Some(Event::Frame(f))) => {
                    if let Some(d) = payload_of(&f).and_then(age) {
                        seen += 1;
                        if seen > 100 {
                            hist.record(d);
                        }
                    }
                }
                other => anyhow::bail!("receiver lost after {seen} messages: {other:?}"),
            }
        }
        Ok((hist, events))
    });
    let mut next = tokio::time::Instant::now();
    let mut acks = Vec::with_capacity(total);
    for _ in 0..total {
        acks.push(
            a.submit(
                Priority::Normal,
                Body::Direct {
                    to,
                    payload: Payload::Binary(stamp(100)),
                },
            )
            .await?,
        );
        next += PACE;
        tokio::time::sleep_until(next).await;
    }
    for ack in acks {
        ack.wait().await?;
    }
    let (latency, events) = receiver.await??;
    let meter = lab.meter()?;
    let (rate, sent, received) = saturate(a, events, to, window).await?;
    let cpu = meter.stop()?;
    Ok(OneWay {
        latency,
        rate,
        lost: sent - received,
        cpu,
        messages: received,
    })
}

/// Most messages sent but not yet received during a rate measurement: an
/// end-to-end window, so the measured rate is what the receiver sustains
/// (without it a producer simply outruns the consumer, which the node then
/// disconnects as slow).
pub(crate) const RATE_WINDOW: u64 = 512;

/// Counts receptions until 500 ms of silence; returns messages/s.
fn count_rate(received: &std::sync::atomic::AtomicU64, first: Instant, last: Instant) -> f64 {
    let n = received.load(std::sync::atomic::Ordering::Relaxed);
    n as f64 / last.duration_since(first).as_secs_f64().max(1e-3)
}

/// Sends directs from `a` to `to` (whose events are `events`) for
/// `window`, at most [`RATE_WINDOW`] unreceived; returns (received/s,
/// sent, received).
async fn saturate(
    a: &Client,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    to: ClientId,
    window: Duration,
) -> anyhow::Result<(f64, u64, u64)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let receiver = tokio::spawn(async move {
        let mut last = Instant::now();
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(500), events.recv()).await
        {
            if matches!(event, Event::Frame(_)) {
                counter.fetch_add(1, Ordering::Relaxed);
                last = Instant::now();
            }
        }
        last
    });
    let start = Instant::now();
    let deadline = start + window;
    let mut sent = 0u64;
    let mut acks = std::collections::VecDeque::new();
    while Instant::now() < deadline {
        while sent - received.load(Ordering::Relaxed) >= RATE_WINDOW {
            // Bounded: a lost delivery must end the run, not spin forever.
            anyhow::ensure!(
                Instant::now() < deadline + Duration::from_secs(10),
                "deliveries stopped: {} of {sent} received 10 s after the window",
                received.load(Ordering::Relaxed)
            );
            tokio::task::yield_now().await;
        }
        acks.push_back(
            a.submit(
                Priority::Normal,
                Body::Direct {
                    to,
                    payload: Payload::Binary(stamp(100)),
                },
            )
            .await?,
        );
        sent += 1;
        if acks.len() >= RATE_WINDOW as usize
            && let Some(p) = acks.pop_front()
        {
            p.wait().await?;
        }
    }
    for p in acks {
        p.wait().await?;
    }
    let last = receiver.await?;
    Ok((
        count_rate(&received, start, last),
        sent,
        received.load(Ordering::Relaxed),
    ))
}

/// The raw quinn relay's one-way latency (paced like [`one_way`]) and rate.
async fn raw_one_way(lab: &mut Lab, samples: usize, window: Duration) -> anyhow::Result<OneWay> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let addr = lab.raw_server("forward").await?;
    let mut a = raw::RawClient::connect(addr, &lab.ca()).await?;
    let mut b = raw::RawClient::connect(addr, &lab.ca()).await?;
    let direct = || {
        protocol::encode(&Frame::new(
            Priority::Normal,
            Body::Direct {
                to: ClientId::new_random(),
                payload: Payload::Binary(stamp(100)),
            },
        ))
    };
    // The relay forwards only to peers it has heard from: wait until b's
    // announcement has surely landed (a's first frames would be lost).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let total = samples + 100;
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let receiver = tokio::spawn(async move {
        let mut hist = Latency::new();
        let mut last = Instant::now();
        while let Ok(Ok(got)) = tokio::time::timeout(Duration::from_millis(500), b.recv()).await {
            let n = count.fetch_add(1, Ordering::Relaxed) + 1;
            last = Instant::now();
            if n > 100
                && n <= total as u64
                && let Ok(frame) = protocol::decode_frame(&got[protocol::LENGTH_PREFIX_BYTES..])
                && let Some(d) = payload_of(&frame).and_then(age)
            {
                hist.record(d);
            }
        }
        (hist, last)
    });
    let mut next = tokio::time::Instant::now();
    for _ in 0..total {
        a.send(&direct()?).await?;
        next += PACE;
        tokio::time::sleep_until(next).await;
    }
    while received.load(Ordering::Relaxed) < total as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let meter = lab.meter()?;
    let start = Instant::now();
    let deadline = start + window;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        while sent + total as u64 - received.load(Ordering::Relaxed) >= RATE_WINDOW {
            tokio::task::yield_now().await;
        }
        a.send(&direct()?).await?;
        sent += 1;
    }
    let (latency, last) = receiver.await?;
    let cpu = meter.stop()?;
    let got = received.load(Ordering::Relaxed) - total as u64;
    Ok(OneWay {
        latency,
        rate: got as f64 / last.duration_since(start).as_secs_f64().max(1e-3),
        lost: sent - got,
        cpu,
        messages: got,
    })
}

/// The floor of the same shape as a cross-node direct: client A on raw
/// server 1, which PUBLISHes each frame on Redis; raw server 2, subscribed,
/// writes it to client B. One-way latency paced at 1,000/s (no rate: each
/// relay publishes one frame at a time).
async fn raw_relay_one_way(lab: &mut Lab, url: &str, samples: usize) -> anyhow::Result<Latency> {
    let mode = format!("relay:{url}");
    let s1 = lab.raw_server(&mode).await?;
    let s2 = lab.raw_server(&mode).await?;
    let mut a = raw::RawClient::connect(s1, &lab.ca()).await?;
    let mut b = raw::RawClient::connect(s2, &lab.ca()).await?;
    // Both relays subscribe as they start and b's announcement must have
    // landed before a's first frames.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let receiver = tokio::spawn(async move {
        let mut hist = Latency::new();
        for n in 0..samples + 100 {
            let Ok(Ok(got)) = tokio::time::timeout(Duration::from_secs(2), b.recv()).await else {
                break;
            };
            if n >= 100
                && let Ok(frame) = protocol::decode_frame(&got[protocol::LENGTH_PREFIX_BYTES..])
                && let Some(d) = payload_of(&frame).and_then(age)
            {
                hist.record(d);
            }
        }
        hist
    });
    let mut next = tokio::time::Instant::now();
    for _ in 0..samples + 100 {
        let frame = protocol::encode(&Frame::new(
            Priority::Normal,
            Body::Direct {
                to: ClientId::new_random(),
                payload: Payload::Binary(stamp(100)),
            },
        ))?;
        a.send(&frame).await?;
        next += PACE;
        tokio::time::sleep_until(next).await;
    }
    let hist = receiver.await?;
    anyhow::ensure!(
        hist.hist.len() * 2 >= samples as u64,
        "the Redis relay floor delivered {} of {samples} frames (relay servers could not reach {url}?)",
        hist.hist.len()
    );
    Ok(hist)
}

async fn direct_local(sizes: &Sizes) -> anyhow::Result<Value> {
    println!(
        "direct-local: client A -> client B on one node (latency paced at 1,000/s, then saturated)"
    );
    let mut lab = Lab::new()?;
    let addr = lab.node(None, &[]).await?;
    let a = lab.client(addr, "a").await?;
    let mut b = lab.client(addr, "b").await?;
    let fabric = one_way(&lab, &a, &mut b, sizes.samples, sizes.rate_window).await?;
    drop(lab);
    let mut lab = Lab::new()?;
    let floor = raw_one_way(&mut lab, sizes.samples, sizes.rate_window).await?;
    println!("{}", fabric.latency.row("fabric one-way"));
    println!("{}", floor.latency.row("floor: raw quinn relay"));
    one_way_rates(&fabric, &floor, "floor");
    let r = ratio(fabric.latency.q(0.99) as f64, floor.latency.q(0.99) as f64);
    println!(
        "  fabric / floor: p50 {:.2}x, p99 {r:.2}x (target <= 1.3x), rate {:.2}x",
        ratio(fabric.latency.q(0.5) as f64, floor.latency.q(0.5) as f64),
        ratio(fabric.rate, floor.rate)
    );
    Ok(
        json!({"fabric": one_way_json(&fabric), "floor_raw_quinn": one_way_json(&floor), "p99_ratio": r}),
    )
}

fn one_way_rates(fabric: &OneWay, floor: &OneWay, label: &str) {
    println!(
        "  saturated: fabric {:.0} msg/s ({} lost), {label} {:.0} msg/s ({} lost)",
        fabric.rate, fabric.lost, floor.rate, floor.lost
    );
    println!(
        "{}",
        cpu_row("fabric, saturated", &fabric.cpu, fabric.messages, "message")
    );
    println!(
        "{}",
        cpu_row(
            &format!("{label}, saturated"),
            &floor.cpu,
            floor.messages,
            "message"
        )
    );
}

fn one_way_json(w: &OneWay) -> Value {
    json!({"latency": w.latency.json(), "rate": w.rate, "lost": w.lost,
           "cpu": cpu_json(&w.cpu, w.messages)})
}

/// Raw Redis hop: PUBLISH on one connection, SUBSCRIBE on another.
async fn redis_hop(url: &str, samples: usize, window: Duration) -> anyhow::Result<(Latency, f64)> {
    use futures_util::StreamExt;
    let client = redis::Client::open(url)?;
    let mut publisher = client.get_multiplexed_async_connection().await?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe("bench:hop").await?;
    let mut stream = pubsub.into_on_message();
    let mut hist = Latency::new();
    for i in 0..samples + 100 {
        redis::cmd("PUBLISH")
            .arg("bench:hop")
            .arg(stamp(100))
            .query_async::<i64>(&mut publisher)
            .await?;
        let msg = stream
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        if i >= 100
            && let Some(d) = age(msg.get_payload_bytes())
        {
            hist.record(d);
        }
    }
    let counter = tokio::spawn(async move {
        let mut n = 0u64;
        let mut first = None;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(500), stream.next()).await
        {
            first.get_or_insert_with(Instant::now);
            n += 1;
        }
        let span = first.map_or(Duration::from_millis(1), |f: Instant| {
            f.elapsed().saturating_sub(Duration::from_millis(500))
        });
        n as f64 / span.as_secs_f64().max(1e-3)
    });
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        // Batches of 64 concurrent publishes, like the node's pipelined writer.
        let mut pipe = redis::pipe();
        for _ in 0..64 {
            pipe.cmd("PUBLISH")
                .arg("bench:hop")
                .arg(stamp(100))
                .ignore();
        }
        pipe.query_async::<()>(&mut publisher).await?;
    }
    Ok((hist, counter.await?))
}

async fn direct_cross(sizes: &Sizes, url: &str) -> anyhow::Result<Value> {
    println!(
        "direct-cross: client A on node 1 -> client B on node 2 through Redis (latency paced at 1,000/s, then saturated)"
    );
    let mut lab = Lab::new()?;
    let prefix = format!("bench{}", std::process::id());
    let n1 = lab.node(Some((url, &prefix)), &[]).await?;
    let n2 = lab.node(Some((url, &prefix)), &[]).await?;
    let a = lab.client(n1, "a").await?;
    let mut b = lab.client(n2, "b").await?;
    let fabric = one_way(&lab, &a, &mut b, sizes.samples, sizes.rate_window).await?;
    drop(lab);
    let mut lab = Lab::new()?;
    let (rtt_floor, _) = raw_rtt(&mut lab, sizes.samples).await?;
    let (hop, hop_rate) = redis_hop(url, sizes.samples, sizes.rate_window).await?;
    let relay = raw_relay_one_way(&mut lab, url, sizes.samples).await?;
    println!("{}", fabric.latency.row("fabric one-way via Redis"));
    println!("{}", rtt_floor.row("floor: raw quinn RTT"));
    println!("{}", hop.row("floor: raw Redis hop"));
    println!("{}", relay.row("floor: raw quinn relay via Redis"));
    let floor_p50 = (rtt_floor.q(0.5) + hop.q(0.5)) as f64;
    let floor_p99 = (rtt_floor.q(0.99) + hop.q(0.99)) as f64;
    let r50 = ratio(fabric.latency.q(0.5) as f64, floor_p50);
    let r = ratio(fabric.latency.q(0.99) as f64, floor_p99);
    println!(
        "  saturated: fabric {:.0} msg/s ({} lost), raw Redis pub/sub {hop_rate:.0} msg/s",
        fabric.rate, fabric.lost
    );
    println!(
        "{}",
        cpu_row("fabric, saturated", &fabric.cpu, fabric.messages, "message")
    );
    println!(
        "  fabric / (quinn RTT + Redis hop): p50 {r50:.2}x (target <= 1.2x), p99 {r:.2}x (target <= 1.5x), rate {:.2}x",
        ratio(fabric.rate, hop_rate)
    );
    let (relay50, relay99) = (
        ratio(fabric.latency.q(0.5) as f64, relay.q(0.5) as f64),
        ratio(fabric.latency.q(0.99) as f64, relay.q(0.99) as f64),
    );
    println!("  fabric / raw quinn relay via Redis: p50 {relay50:.2}x, p99 {relay99:.2}x");
    Ok(
        json!({"fabric": one_way_json(&fabric), "floor_raw_quinn_rtt": rtt_floor.json(), "floor_raw_redis_hop": hop.json(),
              "floor_raw_relay": relay.json(), "p50_ratio": r50, "p99_ratio": r,
              "relay_p50_ratio": relay50, "relay_p99_ratio": relay99, "floor_redis_rate": hop_rate}),
    )
}

/// One fan-out step's outcome.
pub(crate) struct Step {
    pub(crate) offered: f64,
    delivered_per_s: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) ok: bool,
    /// Server and client CPU per delivery, µs.
    pub(crate) server_us: f64,
    pub(crate) client_us: f64,
    /// UDP datagrams dropped by full socket buffers (any socket).
    drops: u64,
    /// UDP datagrams received (by anyone) per delivery.
    datagrams: f64,
}

impl Step {
    /// The step as one line of text.
    pub(crate) fn line(&self) -> String {
        format!(
            "offered {:>9.0} deliveries/s: delivered {:>9.0}/s, p50 {:>6} µs, p99 {:>7} µs, CPU per delivery: server {:>5.2} µs, clients {:>5.2} µs, {:.2} datagrams per delivery, UDP drops {} {}",
            self.offered,
            self.delivered_per_s,
            self.p50_us,
            self.p99_us,
            self.server_us,
            self.client_us,
            self.datagrams,
            self.drops,
            if self.ok { "ok" } else { "over" }
        )
    }

    fn json(&self) -> Value {
        json!({"offered": self.offered, "delivered_per_s": self.delivered_per_s,
               "p50_us": self.p50_us, "p99_us": self.p99_us, "ok": self.ok,
               "server_us_per_delivery": self.server_us, "client_us_per_delivery": self.client_us,
               "udp_drops": self.drops, "datagrams_per_delivery": self.datagrams})
    }
}

/// Fan-out receivers (fabric clients' event streams and raw floor
/// clients), each read by a task that records every delivery's latency
/// (one recorder per receiver: its lock is uncontended except when a
/// step ends and the stepper collects them) and counts it.
pub(crate) struct FanoutReceivers {
    recorders: Vec<std::sync::Arc<std::sync::Mutex<Recorder>>>,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What one fan-out receiver recorded.
struct Recorder {
    latency: Latency,
    /// While tracked: each message's latency by its send stamp.
    arrivals: Option<std::collections::HashMap<u64, Duration>>,
}

impl Recorder {
    fn note(&mut self, payload: &[u8]) -> bool {
        let (Some(d), Some(key)) = (age(payload), payload.get(..8)) else {
            return false;
        };
        self.latency.record(d);
        if let Some(arrivals) = &mut self.arrivals {
            arrivals.insert(u64::from_le_bytes(key.try_into().expect("8 bytes")), d);
        }
        true
    }
}

impl FanoutReceivers {
    pub(crate) fn new(
        receivers: Vec<tokio::sync::mpsc::Receiver<Event>>,
        raw: Vec<raw::RawClient>,
    ) -> FanoutReceivers {
        use std::sync::{Arc, Mutex};
        let n = receivers.len() + raw.len();
        let recorders: Vec<Arc<Mutex<Recorder>>> = (0..n)
            .map(|_| {
                Arc::new(Mutex::new(Recorder {
                    latency: Latency::new(),
                    arrivals: None,
                }))
            })
            .collect();
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        let mut slots = recorders.iter().cloned();
        for mut rx in receivers {
            let (rec, count) = (slots.next().expect("one per receiver"), count.clone());
            tasks.push(tokio::spawn(async move {
                while let Some(Event::Frame(f)) = rx.recv().await {
                    if let Some(p) = payload_of(&f)
                        && rec.lock().unwrap_or_else(|e| e.into_inner()).note(p)
                    {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        for mut c in raw {
            let (rec, count) = (slots.next().expect("one per receiver"), count.clone());
            tasks.push(tokio::spawn(async move {
                while let Ok(frame) = c.recv().await {
                    let Ok(f) = protocol::decode_frame(&frame[protocol::LENGTH_PREFIX_BYTES..])
                    else {
                        continue;
                    };
                    if let Some(p) = payload_of(&f)
                        && rec.lock().unwrap_or_else(|e| e.into_inner()).note(p)
                    {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        FanoutReceivers {
            recorders,
            count,
            tasks,
        }
    }

    /// Deliveries so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every latency recorded since the last call.
    pub(crate) fn collect(&self) -> Latency {
        let mut all = Latency::new();
        for r in &self.recorders {
            all.absorb(&mut r.lock().unwrap_or_else(|e| e.into_inner()).latency);
        }
        all
    }

    /// Waits until `target` deliveries arrived, at most `patience`;
    /// returns when the last one seen arrived (to within a millisecond).
    pub(crate) async fn settle(&self, target: u64, patience: Duration) -> Instant {
        let deadline = Instant::now() + patience;
        let (mut seen, mut last) = (self.count(), Instant::now());
        while seen < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let now = self.count();
            if now != seen {
                (seen, last) = (now, Instant::now());
            }
        }
        last
    }

    /// From now on, each receiver also notes every message's latency by
    /// its send stamp, until [`FanoutReceivers::take_arrivals`].
    pub(crate) fn track_arrivals(&self) {
        for r in &self.recorders {
            r.lock().unwrap_or_else(|e| e.into_inner()).arrivals = Some(Default::default());
        }
    }

    /// Per receiver, the latency of each message (by send stamp) since
    /// [`FanoutReceivers::track_arrivals`]; stops tracking.
    pub(crate) fn take_arrivals(&self) -> Vec<std::collections::HashMap<u64, Duration>> {
        self.recorders
            .iter()
            .map(|r| {
                r.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .arrivals
                    .take()
                    .unwrap_or_default()
            })
            .collect()
    }

    /// One step: `send` at `rate` messages/s (each to every receiver) for
    /// `duration`, then up to 2 s for the deliveries to land.
    pub(crate) async fn step<S, F>(
        &self,
        lab: &Lab,
        rate: f64,
        duration: Duration,
        send: &mut S,
    ) -> anyhow::Result<Step>
    where
        S: FnMut(Vec<u8>) -> F,
        F: std::future::Future<Output = anyhow::Result<()>>,
    {
        let n = self.recorders.len();
        let count = &self.count;
        self.collect();
        let before = count.load(std::sync::atomic::Ordering::Relaxed);
        let meter = lab.meter()?;
        let drops_before = procs::udp_receive_drops();
        let datagrams_before = procs::udp_datagrams_in();
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut next = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            send(stamp(100)).await?;
            sent += 1;
            next += interval;
            let now = Instant::now();
            if next > now {
                tokio::time::sleep(next - now).await;
            }
        }
        // Let in-flight deliveries land (bounded).
        let expected = sent * n as u64;
        let drain_deadline = Instant::now() + Duration::from_secs(2);
        while count.load(std::sync::atomic::Ordering::Relaxed) - before < expected
            && Instant::now() < drain_deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delivered = count.load(std::sync::atomic::Ordering::Relaxed) - before;
        let cpu = meter.stop()?;
        let latency = self.collect();
        let p99 = latency.q(0.99);
        let ok = delivered >= expected * 99 / 100 && p99 < 50_000;
        let s = Step {
            offered: rate * n as f64,
            delivered_per_s: delivered as f64 / duration.as_secs_f64(),
            p50_us: latency.q(0.5),
            p99_us: p99,
            ok,
            server_us: cpu.server_us_per(delivered),
            client_us: cpu.client_us_per(delivered),
            drops: procs::udp_receive_drops() - drops_before,
            datagrams: (procs::udp_datagrams_in() - datagrams_before) as f64
                / delivered.max(1) as f64,
        };
        Ok(s)
    }
}

impl Drop for FanoutReceivers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Receivers record latency of every delivery; returns per-step results.
async fn fanout_steps<S, F>(
    lab: &Lab,
    receivers: Vec<tokio::sync::mpsc::Receiver<Event>>,
    raw: Vec<raw::RawClient>,
    sizes: &Sizes,
    mut send: S,
) -> anyhow::Result<Vec<Step>>
where
    S: FnMut(Vec<u8>) -> F,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let n = receivers.len() + raw.len();
    let receivers = FanoutReceivers::new(receivers, raw);
    let mut steps = Vec::new();
    let mut rate = sizes.fanout_start.map_or(50.0, |d| d / n.max(1) as f64);
    loop {
        let s = receivers
            .step(lab, rate, sizes.fanout_step, &mut send)
            .await?;
        println!("    {}", s.line());
        let ok = s.ok;
        steps.push(s);
        if !ok || past_rate_cap(rate) || steps.len() >= sizes.fanout_steps {
            break;
        }
        rate *= 1.5;
    }
    Ok(steps)
}

/// Fan-out steps stop past a million messages/s offered per receiver set.
pub(crate) fn past_rate_cap(rate: f64) -> bool {
    rate > 1_000_000.0
}

pub(crate) fn best(steps: &[Step]) -> f64 {
    steps
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.delivered_per_s)
        .fold(0.0, f64::max)
}

/// The best sustained step, as JSON with the steps.
pub(crate) fn steps_json(steps: &[Step]) -> Value {
    json!({"best": best(steps), "steps": steps.iter().map(Step::json).collect::<Vec<_>>()})
}

/// Server CPU per delivery at the step closest to `rate` deliveries/s.
fn server_us_near(steps: &[Step], rate: f64) -> Option<f64> {
    steps
        .iter()
        .min_by(|a, b| {
            (a.offered - rate)
                .abs()
                .total_cmp(&(b.offered - rate).abs())
        })
        .map(|s| s.server_us)
}

async fn fanout(sizes: &Sizes, url: &str) -> anyhow::Result<Value> {
    let n = sizes.fanout_clients;
    println!(
        "fanout: 1 publisher, {n} receivers (one Client each, library defaults), 100-byte broadcasts at rising rates (sustained = 99 % delivered, p99 < 50 ms)"
    );
    // Fabric, one node.
    let one_node = {
        let mut lab = Lab::new()?;
        let addr = lab.node(None, &["--outbound-queue-len", "4096"]).await?;
        println!("  fabric, 1 node:");
        fabric_fanout(&lab, &[addr], sizes).await?
    };
    // Floor: raw quinn fan-out.
    let floor = {
        let mut lab = Lab::new()?;
        let addr = lab.raw_server("forward").await?;
        let (publisher, raws) = raw_fanout_clients(&lab, addr, n).await?;
        println!("  floor, raw quinn:");
        fanout_steps(&lab, Vec::new(), raws, sizes, |p| publisher.broadcast(p)).await?
    };
    // Fabric, three nodes through Redis.
    let three_nodes = {
        let mut lab = Lab::new()?;
        let prefix = format!("benchfan{}", std::process::id());
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(
                lab.node(Some((url, &prefix)), &["--outbound-queue-len", "4096"])
                    .await?,
            );
        }
        println!("  fabric, 3 nodes + Redis:");
        fabric_fanout(&lab, &addrs, sizes).await?
    };
    let (one, raw_best, three) = (best(&one_node), best(&floor), best(&three_nodes));
    println!(
        "  sustained deliveries/s: fabric 1 node {one:.0}, floor {raw_best:.0} ({:.2}x), fabric 3 nodes {three:.0} ({:.2}x); target >= 150000 on one node",
        ratio(one, raw_best),
        ratio(three, raw_best)
    );
    if let (Some(f), Some(r)) = (
        server_us_near(&one_node, 100_000.0),
        server_us_near(&floor, 100_000.0),
    ) {
        println!(
            "  server CPU per delivery near 100000/s: fabric {f:.2} µs, floor {r:.2} µs ({:.2}x); target <= 5 µs",
            ratio(f, r)
        );
    }
    Ok(
        json!({"clients": n, "fabric_one_node": steps_json(&one_node), "floor_raw_quinn": steps_json(&floor),
              "fabric_three_nodes": steps_json(&three_nodes),
              "one_node_ratio": ratio(one, raw_best), "three_nodes_ratio": ratio(three, raw_best)}),
    )
}

/// Fabric fan-out: `n` receivers spread over `addrs`, the publisher on the
/// first node; returns the steps.
async fn fabric_fanout(
    lab: &Lab,
    addrs: &[std::net::SocketAddr],
    sizes: &Sizes,
) -> anyhow::Result<Vec<Step>> {
    let (receivers, _clients) = connect_many(lab, addrs, sizes.fanout_clients).await?;
    let publisher = lab.client(addrs[0], "publisher").await?;
    fanout_steps(lab, receivers, Vec::new(), sizes, |p| {
        broadcast(&publisher, p)
    })
    .await
}

/// A fabric client broadcasting `payload` without waiting for the Ack.
pub(crate) async fn broadcast(publisher: &Client, payload: Vec<u8>) -> anyhow::Result<()> {
    let body = Body::Broadcast {
        payload: Payload::Binary(payload),
    };
    publisher.submit(Priority::Normal, body).await?;
    Ok(())
}

/// The publisher of the raw fan-out floor.
struct RawPublisher(tokio::sync::Mutex<raw::RawClient>);

impl RawPublisher {
    /// Sends `payload` as a Broadcast frame, which the floor forwards to
    /// every other client.
    async fn broadcast(&self, payload: Vec<u8>) -> anyhow::Result<()> {
        let frame = protocol::encode(&Frame::new(
            Priority::Normal,
            Body::Broadcast {
                payload: Payload::Binary(payload),
            },
        ))?;
        self.0.lock().await.send(&frame).await
    }
}

/// A publisher and `n` receivers of the raw forwarding floor at `addr`,
/// the receivers on sockets shared like the library's pool.
async fn raw_fanout_clients(
    lab: &Lab,
    addr: std::net::SocketAddr,
    n: usize,
) -> anyhow::Result<(RawPublisher, Vec<raw::RawClient>)> {
    let publisher = raw::RawClient::connect(addr, &lab.ca()).await?;
    let endpoints = raw_endpoints()?;
    let mut raws = Vec::new();
    for i in 0..n {
        let endpoint = endpoints[i % endpoints.len()].clone();
        raws.push(raw::RawClient::connect_on(endpoint, addr, &lab.ca()).await?);
    }
    // The floor forwards only to clients it has heard from: let the
    // receivers' announcements land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((RawPublisher(tokio::sync::Mutex::new(publisher)), raws))
}

/// Client endpoints for the raw floors: as many as the library's shared
/// pool, with the same enlarged socket buffers.
pub(crate) fn raw_endpoints() -> anyhow::Result<Vec<quinn::Endpoint>> {
    (0..quic_fabric::client::shared_pool_size())
        .map(|_| {
            let socket = quic_fabric::udp::bind("127.0.0.1:0".parse()?)?;
            Ok(quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                std::sync::Arc::new(quinn::TokioRuntime),
            )?)
        })
        .collect()
}

/// Handshakes in flight while opening many connections.
pub(crate) const IN_FLIGHT: usize = 64;

/// `n` clients with the library's defaults spread over `addrs`, opened
/// [`IN_FLIGHT`] at a time; returns their event streams and the clients.
pub(crate) async fn connect_many(
    lab: &Lab,
    addrs: &[std::net::SocketAddr],
    n: usize,
) -> anyhow::Result<(Vec<tokio::sync::mpsc::Receiver<Event>>, Vec<Client>)> {
    let configs = (0..n).map(|i| lab.client_config(addrs[i % addrs.len()], &format!("r{i}")));
    let mut clients = open_many(configs, |c| async move { Client::connect(&c).await }).await?;
    let receivers = clients.iter_mut().map(Client::take_events).collect();
    Ok((receivers, clients))
}

/// Runs `open` on every item, [`IN_FLIGHT`] at a time; returns the results
/// in order.
pub(crate) async fn open_many<I, T, O, F, E>(items: I, open: O) -> anyhow::Result<Vec<T>>
where
    I: IntoIterator,
    I::Item: Send + 'static,
    O: Fn(I::Item) -> F,
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Into<anyhow::Error> + Send + 'static,
{
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut handles = Vec::new();
    for item in items {
        let permit = limit.clone().acquire_owned().await?;
        let fut = open(item);
        handles.push(tokio::spawn(async move {
            let out = fut.await;
            drop(permit);
            out
        }));
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await?.map_err(Into::into)?);
    }
    Ok(out)
}

/// One broadcast to every receiver at a low rate: how long until the last
/// receiver has it.
async fn fanout_latency(sizes: &Sizes) -> anyhow::Result<Value> {
    let n = sizes.fanout_clients;
    let count = sizes.latency_broadcasts;
    println!(
        "fanout-latency: {count} broadcasts at 10/s to {n} idle receivers; per broadcast, when the last receiver has it"
    );
    let mut results = BTreeMap::new();
    for floor in [false, true] {
        let mut lab = Lab::new()?;
        let (last, all, cpu) = if floor {
            let addr = lab.raw_server("forward").await?;
            let (publisher, raws) = raw_fanout_clients(&lab, addr, n).await?;
            last_arrivals(&lab, Vec::new(), raws, count, |p| publisher.broadcast(p)).await?
        } else {
            let addr = lab.node(None, &[]).await?;
            let (receivers, _clients) = connect_many(&lab, &[addr], n).await?;
            let publisher = lab.client(addr, "publisher").await?;
            last_arrivals(&lab, receivers, Vec::new(), count, |p| {
                broadcast(&publisher, p)
            })
            .await?
        };
        let label = if floor { "floor: raw quinn" } else { "fabric" };
        println!("{}", last.row(&format!("{label}, last receiver")));
        println!("{}", all.row(&format!("{label}, every delivery")));
        let deliveries = (count * n) as u64;
        println!("{}", cpu_row(label, &cpu, deliveries, "delivery"));
        results.insert(
            if floor { "floor_raw_quinn" } else { "fabric" },
            json!({"last": last.json(), "all": all.json(), "cpu": cpu_json(&cpu, deliveries)}),
        );
    }
    Ok(json!({"clients": n, "broadcasts": count, "results": results}))
}

/// Sends `count` broadcasts 100 ms apart; returns the latency of each
/// broadcast's last arrival, of every arrival, and the CPU used.
async fn last_arrivals<S, F>(
    lab: &Lab,
    receivers: Vec<tokio::sync::mpsc::Receiver<Event>>,
    raw: Vec<raw::RawClient>,
    count: usize,
    mut send: S,
) -> anyhow::Result<(Latency, Latency, CpuUse)>
where
    S: FnMut(Vec<u8>) -> F,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::sync::{Arc, Mutex};
    let n = receivers.len() + raw.len();
    // Per broadcast (its send stamp): arrivals and the latest age.
    type Arrivals = Arc<Mutex<std::collections::HashMap<u64, (usize, Duration)>>>;
    let arrivals: Arrivals = Arc::default();
    let all = Arc::new(Mutex::new(Latency::new()));
    let note = {
        let (arrivals, all) = (arrivals.clone(), all.clone());
        move |payload: &[u8]| {
            let (Some(d), Some(key)) = (age(payload), payload.get(..8)) else {
                return;
            };
            let key = u64::from_le_bytes(key.try_into().expect("8 bytes"));
            all.lock().unwrap_or_else(|e| e.into_inner()).record(d);
            let mut a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
            let e = a.entry(key).or_insert((0, Duration::ZERO));
            e.0 += 1;
            e.1 = e.1.max(d);
        }
    };
    let mut tasks = Vec::new();
    for mut rx in receivers {
        let note = note.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Event::Frame(f)) = rx.recv().await {
                if let Some(p) = payload_of(&f) {
                    note(p);
                }
            }
        }));
    }
    for mut c in raw {
        let note = note.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(frame) = c.recv().await {
                if let Ok(f) = protocol::decode_frame(&frame[protocol::LENGTH_PREFIX_BYTES..])
                    && let Some(p) = payload_of(&f)
                {
                    note(p);
                }
            }
        }));
    }
    let meter = lab.meter()?;
    let mut next = tokio::time::Instant::now();
    for _ in 0..count {
        send(stamp(100)).await?;
        next += Duration::from_millis(100);
        tokio::time::sleep_until(next).await;
    }
    let expected = count * n;
    let deadline = Instant::now() + Duration::from_secs(5);
    let arrived = || {
        arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(k, _)| *k)
            .sum::<usize>()
    };
    while arrived() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = meter.stop()?;
    for t in tasks {
        t.abort();
    }
    let mut last = Latency::new();
    let arrivals = arrivals.lock().unwrap_or_else(|e| e.into_inner());
    let complete = arrivals.values().filter(|(k, _)| *k == n).count();
    anyhow::ensure!(
        complete == count,
        "only {complete} of {count} broadcasts reached all {n} receivers"
    );
    for (_, latest) in arrivals.values() {
        last.record(*latest);
    }
    let all = all.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((last, all, cpu))
}

/// Resident memory of this process, KiB.
fn own_rss_kib() -> anyhow::Result<u64> {
    procs::rss_kib(std::process::id())
}

/// Opens `n` connections to `addr`, [`IN_FLIGHT`] at a time; returns
/// (handshakes/s, client CPU per handshake, the connections).
async fn open_idle(
    lab: &Lab,
    addr: std::net::SocketAddr,
    n: usize,
    raw_quic: bool,
    private_sockets: bool,
) -> anyhow::Result<(f64, CpuUse, Vec<Box<dyn std::any::Any + Send>>)> {
    let meter = lab.meter()?;
    let held: Vec<Box<dyn std::any::Any + Send>> = if raw_quic {
        // The floor: bare quinn connections from a pool of sockets like the
        // library's, with one shared TLS configuration (as the library).
        let endpoints = raw_endpoints()?;
        let crypto = std::sync::Arc::new(quic_fabric::tls::client_crypto(
            &quic_fabric::tls::ServerTrust::CaFile(lab.ca()),
            None,
        )?);
        let items = (0..n).map(|i| (endpoints[i % endpoints.len()].clone(), crypto.clone()));
        let mut held: Vec<Box<dyn std::any::Any + Send>> =
            open_many(items, |(endpoint, crypto)| async move {
                let mut cfg = quinn::ClientConfig::new(crypto);
                let mut t = quinn::TransportConfig::default();
                t.keep_alive_interval(Some(Duration::from_secs(5)));
                t.mtu_discovery_config(Some(quic_fabric::udp::mtu_discovery()));
                cfg.transport_config(std::sync::Arc::new(t));
                let conn = endpoint.connect_with(cfg, addr, "localhost")?.await?;
                Ok::<Box<dyn std::any::Any + Send>, anyhow::Error>(Box::new(conn))
            })
            .await?;
        held.push(Box::new(endpoints));
        held
    } else {
        let configs = (0..n).map(|i| {
            let mut c = lab.client_config(addr, &format!("idle{i}"));
            if private_sockets {
                c.socket = quic_fabric::client::Socket::Private;
            }
            c
        });
        open_many(configs, |config| async move {
            let c = Client::connect(&config).await?;
            Ok::<Box<dyn std::any::Any + Send>, anyhow::Error>(Box::new(c))
        })
        .await?
    };
    let cpu = meter.stop()?;
    Ok((n as f64 / cpu.wall.as_secs_f64(), cpu, held))
}

/// The line a `--against` child prints once its clients are connected:
/// `CLIENTS {json}`.
const CLIENTS_LINE: &str = "CLIENTS ";

async fn connections(sizes: &Sizes, private_sockets: bool) -> anyhow::Result<Value> {
    use tokio::io::AsyncBufReadExt;
    let n = sizes.connections;
    println!(
        "connections: {n} idle clients against one server, {IN_FLIGHT} handshakes in flight, clients in a child process of their own (library defaults)"
    );
    let mut results = BTreeMap::new();
    for raw in [false, true] {
        let mut lab = Lab::new()?;
        let addr = if raw {
            lab.raw_server("echo").await?
        } else {
            lab.node(None, &[]).await?
        };
        let pid = lab.servers[0].pid;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let node_before = procs::rss_kib(pid)?;
        // The clients run in a fresh process, so their memory is theirs
        // alone (in this process, memory freed by an earlier run would be
        // reused and hide their cost).
        let mut args = vec![
            "connections".to_owned(),
            "--against".to_owned(),
            addr.to_string(),
            "--ca".to_owned(),
            lab.ca().display().to_string(),
            "--connections".to_owned(),
            n.to_string(),
            "--hold".to_owned(),
            "10min".to_owned(),
        ];
        if raw {
            args.push("--raw-clients".to_owned());
        } else if private_sockets {
            args.push("--private-sockets".to_owned());
        }
        let meter = lab.meter()?;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("child stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let report: Value = loop {
            let line = tokio::time::timeout(Duration::from_secs(600), lines.next_line())
                .await??
                .ok_or_else(|| anyhow::anyhow!("client process ended without a report"))?;
            if let Some(json) = line.strip_prefix(CLIENTS_LINE) {
                break serde_json::from_str(json)?;
            }
        };
        let server_cpu = meter.stop()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let node_after = procs::rss_kib(pid)?;
        child.kill().await?;
        let node_kib = node_after.saturating_sub(node_before) as f64 / n as f64;
        let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        let (rate, client_kib, client_us) = (f("rate"), f("kib_per_conn"), f("cpu_us_per_conn"));
        let server_us = server_cpu.server_us_per(n as u64);
        let label = if raw {
            "floor: raw quinn"
        } else if private_sockets {
            "fabric, private sockets"
        } else {
            "fabric"
        };
        println!(
            "  {label:<18} {rate:>8.0} handshakes/s; server {node_kib:.1} KiB per connection (RSS {node_before} -> {node_after} KiB), client side {client_kib:.1} KiB per connection"
        );
        println!(
            "  {label:<18} CPU per handshake: server {server_us:.0} µs, client {client_us:.0} µs"
        );
        results.insert(
            if raw { "floor_raw_quinn" } else { "fabric" },
            json!({"handshakes_per_s": rate, "server_kib_per_conn": node_kib,
                   "client_kib_per_conn": client_kib, "server_us_per_conn": server_us,
                   "client_us_per_conn": client_us}),
        );
    }
    let get = |k: &str, f: &str| results[k][f].as_f64().unwrap_or(f64::NAN);
    let r = |f: &str| ratio(get("fabric", f), get("floor_raw_quinn", f));
    println!(
        "  fabric / floor: handshakes/s {:.2}x (target >= 3000/s), server memory per connection {:.2}x (target <= 24 KiB), client memory per connection {:.2}x (target <= 40 KB)",
        r("handshakes_per_s"),
        r("server_kib_per_conn"),
        r("client_kib_per_conn"),
    );
    Ok(json!({"connections": n, "in_flight": IN_FLIGHT, "results": results}))
}

/// Opens `n` idle clients (or bare quinn connections) against a running
/// node, prints what they cost on [`CLIENTS_LINE`], and holds them.
async fn hold_idle(addr: std::net::SocketAddr, args: &BenchArgs, n: usize) -> anyhow::Result<()> {
    let lab = Lab {
        certs: tempfile::tempdir()?,
        servers: Vec::new(),
    };
    std::fs::copy(&args.ca, lab.ca())?;
    let before = own_rss_kib()?;
    let (rate, cpu, held) =
        open_idle(&lab, addr, n, args.raw_clients, args.private_sockets).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = own_rss_kib()?;
    let report = json!({"rate": rate, "kib_per_conn": after.saturating_sub(before) as f64 / n as f64,
                        "cpu_us_per_conn": cpu.client_us_per(n as u64)});
    println!("{CLIENTS_LINE}{report}");
    println!(
        "{n} idle clients connected to {addr} at {rate:.0} handshakes/s; holding for {:?}",
        args.hold
    );
    tokio::time::sleep(args.hold).await;
    drop(held);
    Ok(())
}

/// Payload of a bulk message in `lossy`.
const BULK_BYTES: usize = 64 * 1024;
/// Bulk messages sent but not yet received back, by default: enough to
/// fill a 50 ms path at ~170 Mbit/s, bounded so the node's queue for the
/// client stays far below its limit (16 MiB).
const BULK_WINDOW: u64 = 16;
/// Small messages per second in `lossy`.
const SMALL_RATE: u32 = 20;

/// What one `lossy` measurement found.
struct Lossy {
    small: Latency,
    bulk_mbit_s: f64,
}

async fn lossy(args: &BenchArgs) -> anyhow::Result<Value> {
    let server = args
        .server
        .ok_or_else(|| anyhow::anyhow!("lossy needs --server (run bench/lossy.sh)"))?;
    let cc = args.congestion;
    println!(
        "lossy: {SMALL_RATE}/s 100-byte high-priority directs to oneself, alone and beside 64 KiB low-priority bulk directs on the same connection ({cc:?})"
    );
    let alone = fabric_lossy(server, args, false).await?;
    println!("{}", alone.small.row("fabric small, alone"));
    let with_bulk = fabric_lossy(server, args, true).await?;
    println!("{}", with_bulk.small.row("fabric small, with bulk"));
    println!("  fabric bulk goodput: {:.1} Mbit/s", with_bulk.bulk_mbit_s);
    let mut floor = json!(null);
    if let Some(raw) = args.raw_server {
        let (small, bulk) = raw_lossy(raw, args).await?;
        println!("{}", small.row("floor: raw quinn echo, small"));
        println!("  floor: raw quinn echo, bulk alone: {bulk:.1} Mbit/s");
        floor = json!({"small": small.json(), "bulk_mbit_s": bulk});
    }
    Ok(json!({"congestion": format!("{cc:?}"),
              "small_alone": alone.small.json(),
              "small_with_bulk": with_bulk.small.json(),
              "bulk_mbit_s": with_bulk.bulk_mbit_s,
              "floor_raw_quinn": floor}))
}

/// Sends small directs to itself for `--duration`, with a bulk flow if
/// `bulk`; every message crosses the link twice (up to the node, back).
async fn fabric_lossy(
    server: std::net::SocketAddr,
    args: &BenchArgs,
    bulk: bool,
) -> anyhow::Result<Lossy> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut config = ClientConfig::new(server.to_string(), args.ca.clone()).name("lossy");
    config.server_name = Some("localhost".into());
    config.congestion = args.congestion;
    config.request_timeout = Duration::from_secs(60);
    config.socket = quic_fabric::client::Socket::Private;
    let mut client = Client::connect(&config).await?;
    let me = client.client_id();
    let mut events = client.take_events();
    let bulk_in = Arc::new(AtomicU64::new(0));
    let bulk_count = bulk_in.clone();
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on = measuring.clone();
    let receiver = tokio::spawn(async move {
        let mut small = Latency::new();
        let mut bytes = 0u64;
        while let Some(Event::Frame(f)) = events.recv().await {
            let Some(p) = payload_of(&f) else { continue };
            if f.priority == Priority::Low {
                bulk_count.fetch_add(1, Ordering::Relaxed);
                if on.load(Ordering::Relaxed) {
                    bytes += p.len() as u64;
                }
            } else if on.load(Ordering::Relaxed)
                && let Some(d) = age(p)
            {
                small.record(d);
            }
        }
        (small, bytes)
    });
    let client = Arc::new(client);
    let stop = tokio_util::sync::CancellationToken::new();
    let window = args.bulk_window;
    let bulk_task = bulk.then(|| {
        let (client, stop, bulk_in) = (client.clone(), stop.clone(), bulk_in.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut acks = std::collections::VecDeque::new();
            while !stop.is_cancelled() {
                if sent - bulk_in.load(Ordering::Relaxed) >= window {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let body = Body::Direct {
                    to: me,
                    payload: Payload::Binary(vec![0x5A; BULK_BYTES]),
                };
                acks.push_back(client.submit(Priority::Low, body).await?);
                sent += 1;
                while acks.len() > window as usize {
                    if let Some(a) = acks.pop_front() {
                        a.wait().await?;
                    }
                }
            }
            anyhow::Ok(())
        })
    });
    // Warm up (the bulk flow reaches its rate), then measure.
    tokio::time::sleep(Duration::from_secs(if bulk { 3 } else { 1 })).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let interval = Duration::from_secs(1) / SMALL_RATE;
    let mut next = tokio::time::Instant::now();
    let mut acks = Vec::new();
    while start.elapsed() < args.duration {
        let body = Body::Direct {
            to: me,
            payload: Payload::Binary(stamp(100)),
        };
        acks.push(client.submit(Priority::High, body).await?);
        next += interval;
        tokio::time::sleep_until(next).await;
    }
    // The last small messages land within a few round trips.
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.cancel();
    if let Some(t) = bulk_task {
        t.await??;
    }
    for a in acks {
        a.wait().await?;
    }
    drop(client);
    let (small, bytes) = tokio::time::timeout(Duration::from_secs(30), receiver).await??;
    Ok(Lossy {
        small,
        bulk_mbit_s: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
    })
}

/// The raw quinn floor across the same link: small frames echoed one at a
/// time (round trip, as the fabric's direct to oneself), then bulk frames
/// echoed with the same window, alone.
async fn raw_lossy(raw: std::net::SocketAddr, args: &BenchArgs) -> anyhow::Result<(Latency, f64)> {
    let mut small = Latency::new();
    {
        let mut c = raw::RawClient::connect_with(raw, &args.ca, args.congestion).await?;
        let interval = Duration::from_secs(1) / SMALL_RATE;
        let frame = |p| protocol::encode(&Frame::new(Priority::High, Body::Binary { data: p }));
        // The echo server answers on its stream once it heard ours.
        c.send(&frame(stamp(100))?).await?;
        c.recv().await?;
        let start = Instant::now();
        let mut next = tokio::time::Instant::now();
        while start.elapsed() < args.duration {
            c.send(&frame(stamp(100))?).await?;
            let got = c.recv().await?;
            let f = protocol::decode_frame(&got[protocol::LENGTH_PREFIX_BYTES..])?;
            if let Body::Binary { data } = &f.body
                && let Some(d) = age(data)
            {
                small.record(d);
            }
            next += interval;
            tokio::time::sleep_until(next).await;
        }
    }
    let c = raw::RawClient::connect_with(raw, &args.ca, args.congestion).await?;
    let bulk = protocol::encode(&Frame::new(
        Priority::Low,
        Body::Binary {
            data: vec![0x5A; BULK_BYTES],
        },
    ))?;
    let (mut send, mut recv) = c.split();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = received.clone();
    let reader = tokio::spawn(async move {
        while recv.recv().await.is_ok() {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut sent = 0u64;
    let warm = Instant::now() + Duration::from_secs(3);
    let mut start = None;
    let mut at_start = 0;
    let end = warm + args.duration;
    while Instant::now() < end {
        if start.is_none() && Instant::now() >= warm {
            start = Some(Instant::now());
            at_start = received.load(std::sync::atomic::Ordering::Relaxed);
        }
        if sent - received.load(std::sync::atomic::Ordering::Relaxed) >= args.bulk_window {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        send.send(&bulk).await?;
        sent += 1;
    }
    let got = received.load(std::sync::atomic::Ordering::Relaxed) - at_start;
    reader.abort();
    let secs = start.map_or(1.0, |s| s.elapsed().as_secs_f64());
    Ok((small, got as f64 * BULK_BYTES as f64 * 8.0 / secs / 1e6))
}
