//! The scenarios: latency, fan-out and connection-scale benchmarks, each
//! run beside its floor (raw quinn, raw Redis) in the same process, on the
//! same machine, with the same sizes, and reported as fabric / floor ratios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use quic_fabric::client::{Client, ClientConfig, Event};
use quic_fabric::config::NodeConfig;
use quic_fabric::protocol::{self, Body, ClientId, Frame, Payload, Priority};
use quic_fabric::server::Server;

use crate::raw;

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
    /// Use this Redis instead of starting a container (direct-cross, fanout).
    #[arg(long)]
    pub redis: Option<String>,
    /// Samples for latency measurements.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Fan-out clients.
    #[arg(long)]
    pub clients: Option<usize>,
    /// Idle connections for `connections`.
    #[arg(long)]
    pub connections: Option<usize>,
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
    /// N idle clients: node memory per connection and handshakes/s.
    Connections,
    /// Everything.
    All,
}

struct Sizes {
    samples: usize,
    rate_window: Duration,
    fanout_clients: usize,
    fanout_step: Duration,
    connections: usize,
}

impl Sizes {
    fn new(args: &BenchArgs) -> Sizes {
        let mut s = if args.quick {
            Sizes {
                samples: 200,
                rate_window: Duration::from_millis(500),
                fanout_clients: 20,
                fanout_step: Duration::from_millis(400),
                connections: 200,
            }
        } else {
            Sizes {
                samples: 5_000,
                rate_window: Duration::from_secs(3),
                fanout_clients: 1_000,
                fanout_step: Duration::from_secs(2),
                connections: 10_000,
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
        s
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Latency {
    fn new() -> Latency {
        Latency {
            hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds"),
        }
    }

    fn record(&mut self, d: Duration) {
        let _ = self
            .hist
            .record((d.as_micros() as u64).clamp(1, 120_000_000));
    }

    fn q(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }

    fn json(&self) -> Value {
        json!({
            "samples": self.hist.len(),
            "p50_us": self.q(0.5), "p90_us": self.q(0.9), "p99_us": self.q(0.99),
            "p999_us": self.q(0.999), "max_us": self.hist.max(),
        })
    }

    fn row(&self, label: &str) -> String {
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

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// Time base shared by senders and receivers in this process.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn stamp(size: usize) -> Vec<u8> {
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
        } => Some(b),
        _ => None,
    }
}

/// Everything a run needs: certificates and in-process nodes.
struct Lab {
    certs: tempfile::TempDir,
    stops: Vec<CancellationToken>,
}

impl Lab {
    fn new() -> anyhow::Result<Lab> {
        let certs = tempfile::tempdir()?;
        quic_fabric::tls::ensure_dev_certs(certs.path(), &NodeConfig::default().cert_names)?;
        Ok(Lab {
            certs,
            stops: Vec::new(),
        })
    }

    fn ca(&self) -> PathBuf {
        self.certs.path().join("ca.pem")
    }

    async fn node(
        &mut self,
        redis: Option<&str>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> anyhow::Result<std::net::SocketAddr> {
        let mut config = NodeConfig {
            listen: "127.0.0.1:0".parse()?,
            certs_dir: self.certs.path().to_owned(),
            redis_url: redis.map(str::to_owned),
            max_clients: 100_000,
            // All load comes from one address, and the load generator's
            // clients send far above a chat client's rate: per-IP limits
            // off, the per-client limiter kept on (its check is on the hot
            // path) with a rate it never reaches.
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            rate_limit_messages: 100_000_000,
            rate_limit_burst: 100_000_000,
            drain_linger: Duration::ZERO,
            ..NodeConfig::default()
        };
        tweak(&mut config);
        let server = Server::bind(config)?;
        let addr = server.local_addr();
        let node = server.node();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(server.run(async move { token.cancelled().await }));
        self.stops.push(stop);
        if redis.is_some() {
            use quic_fabric::bus::ClusterBus;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !node.bus().available() {
                anyhow::ensure!(Instant::now() < deadline, "node did not reach Redis");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(addr)
    }

    async fn client(&self, addr: std::net::SocketAddr, name: &str) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.client_config(addr, name)).await?)
    }

    fn client_config(&self, addr: std::net::SocketAddr, name: &str) -> ClientConfig {
        let mut c = ClientConfig::new(addr.to_string(), self.ca()).name(name);
        c.server_name = Some("localhost".into());
        c.request_timeout = Duration::from_secs(30);
        c.event_buffer = 65_536;
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &self.stops {
            s.cancel();
        }
    }
}

/// Runs the benchmark; returns the process exit code.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let sizes = Sizes::new(&args);
    epoch();
    if let Some(addr) = args.against {
        return hold_idle(addr, &args.ca, sizes.connections, args.hold).await;
    }
    let mut results = BTreeMap::new();
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All => vec![
            Scenario::Rtt,
            Scenario::DirectLocal,
            Scenario::DirectCross,
            Scenario::Fanout,
            Scenario::Connections,
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
            Scenario::Connections => connections(sizes).await?,
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
    println!("rtt: ping round trip on one connection");
    let mut lab = Lab::new()?;
    let addr = lab.node(None, |_| {}).await?;
    let client = lab.client(addr, "rtt").await?;
    for _ in 0..100 {
        client.ping().await?;
    }
    let mut fabric = Latency::new();
    for _ in 0..sizes.samples {
        fabric.record(client.ping().await?);
    }
    let floor = raw_rtt(&lab, sizes.samples).await?;
    println!("{}", fabric.row("fabric ping/pong"));
    println!("{}", floor.row("floor: raw quinn echo"));
    let r = ratio(fabric.q(0.99) as f64, floor.q(0.99) as f64);
    println!(
        "  fabric / floor: p50 {:.2}x, p99 {r:.2}x",
        ratio(fabric.q(0.5) as f64, floor.q(0.5) as f64)
    );
    Ok(json!({"fabric": fabric.json(), "floor_raw_quinn": floor.json(), "p99_ratio": r}))
}

/// Raw quinn echo of a Ping-sized frame: the floor for any round trip.
async fn raw_rtt(lab: &Lab, samples: usize) -> anyhow::Result<Latency> {
    let server = raw::RawServer::start(lab.certs.path(), raw::Mode::Echo)?;
    let mut client = raw::RawClient::connect(server.addr(), &lab.ca()).await?;
    let ping = protocol::encode(&Frame::new(Priority::High, Body::Ping))?;
    let mut hist = Latency::new();
    for i in 0..samples + 100 {
        let start = Instant::now();
        client.send(&ping).await?;
        client.recv().await?;
        if i >= 100 {
            hist.record(start.elapsed());
        }
    }
    Ok(hist)
}

/// One-way latency (one message at a time) and saturated rate from `a` to `b`.
async fn one_way(
    a: &Client,
    b: &mut Client,
    samples: usize,
    window: Duration,
) -> anyhow::Result<(Latency, f64)> {
    let to = b.client_id();
    let mut hist = Latency::new();
    for i in 0..samples + 100 {
        a.submit(
            Priority::Normal,
            Body::Direct {
                to,
                payload: Payload::Binary(stamp(100)),
            },
        )
        .await?;
        let took = loop {
            match b.next_event().await {
                Some(Event::Frame(f)) => {
                    if let Some(d) = payload_of(&f).and_then(age) {
                        break d;
                    }
                }
                other => anyhow::bail!("receiver lost: {other:?}"),
            }
        };
        if i >= 100 {
            hist.record(took);
        }
    }
    // Saturation: keep up to 1024 messages in flight, count receptions.
    let rate = saturate(a, b, to, window).await?;
    Ok((hist, rate))
}

/// Most messages sent but not yet received during a rate measurement: an
/// end-to-end window, so the measured rate is what the receiver sustains
/// (without it a producer simply outruns the consumer, which the node then
/// disconnects as slow).
const RATE_WINDOW: u64 = 512;

/// Counts receptions until 500 ms of silence; returns messages/s.
fn count_rate(received: &std::sync::atomic::AtomicU64, first: Instant, last: Instant) -> f64 {
    let n = received.load(std::sync::atomic::Ordering::Relaxed);
    n as f64 / last.duration_since(first).as_secs_f64().max(1e-3)
}

async fn saturate(
    a: &Client,
    b: &mut Client,
    to: ClientId,
    window: Duration,
) -> anyhow::Result<f64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let mut events = b.take_events();
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
    Ok(count_rate(&received, start, last))
}

async fn raw_one_way(
    lab: &Lab,
    samples: usize,
    window: Duration,
) -> anyhow::Result<(Latency, f64)> {
    let server = raw::RawServer::start(lab.certs.path(), raw::Mode::Forward)?;
    let mut a = raw::RawClient::connect(server.addr(), &lab.ca()).await?;
    let mut b = raw::RawClient::connect(server.addr(), &lab.ca()).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut hist = Latency::new();
    for i in 0..samples + 100 {
        let frame = protocol::encode(&Frame::new(
            Priority::Normal,
            Body::Direct {
                to: ClientId::new_random(),
                payload: Payload::Binary(stamp(100)),
            },
        ))?;
        a.send(&frame).await?;
        let got = b.recv().await?;
        let frame = protocol::decode_frame(&got[protocol::LENGTH_PREFIX_BYTES..])?;
        if i >= 100
            && let Some(d) = payload_of(&frame).and_then(age)
        {
            hist.record(d);
        }
    }
    use std::sync::atomic::{AtomicU64, Ordering};
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let counter = tokio::spawn(async move {
        let mut last = Instant::now();
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), b.recv()).await {
            count.fetch_add(1, Ordering::Relaxed);
            last = Instant::now();
        }
        last
    });
    let start = Instant::now();
    let deadline = start + window;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        while sent - received.load(Ordering::Relaxed) >= RATE_WINDOW {
            tokio::task::yield_now().await;
        }
        let frame = protocol::encode(&Frame::new(
            Priority::Normal,
            Body::Direct {
                to: ClientId::new_random(),
                payload: Payload::Binary(stamp(100)),
            },
        ))?;
        a.send(&frame).await?;
        sent += 1;
    }
    let last = counter.await?;
    Ok((hist, count_rate(&received, start, last)))
}

async fn direct_local(sizes: &Sizes) -> anyhow::Result<Value> {
    println!("direct-local: client A -> client B on one node");
    let mut lab = Lab::new()?;
    let addr = lab.node(None, |_| {}).await?;
    let a = lab.client(addr, "a").await?;
    let mut b = lab.client(addr, "b").await?;
    let (fabric, fabric_rate) = one_way(&a, &mut b, sizes.samples, sizes.rate_window).await?;
    let (floor, floor_rate) = raw_one_way(&lab, sizes.samples, sizes.rate_window).await?;
    println!("{}", fabric.row("fabric one-way"));
    println!("{}", floor.row("floor: raw quinn relay"));
    println!("  rate at saturation: fabric {fabric_rate:.0} msg/s, floor {floor_rate:.0} msg/s");
    let r = ratio(fabric.q(0.99) as f64, floor.q(0.99) as f64);
    println!(
        "  fabric / floor: p99 {r:.2}x (target <= 1.3x), rate {:.2}x",
        ratio(fabric_rate, floor_rate)
    );
    Ok(
        json!({"fabric": fabric.json(), "floor_raw_quinn": floor.json(), "p99_ratio": r,
              "fabric_rate": fabric_rate, "floor_rate": floor_rate}),
    )
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
    println!("direct-cross: client A on node 1 -> client B on node 2 through Redis");
    let mut lab = Lab::new()?;
    let prefix = format!("bench{}", std::process::id());
    let n1 = lab
        .node(Some(url), |c| c.redis_prefix = prefix.clone())
        .await?;
    let n2 = lab
        .node(Some(url), |c| c.redis_prefix = prefix.clone())
        .await?;
    let a = lab.client(n1, "a").await?;
    let mut b = lab.client(n2, "b").await?;
    let (fabric, fabric_rate) = one_way(&a, &mut b, sizes.samples, sizes.rate_window).await?;
    let rtt_floor = raw_rtt(&lab, sizes.samples).await?;
    let (hop, hop_rate) = redis_hop(url, sizes.samples, sizes.rate_window).await?;
    println!("{}", fabric.row("fabric one-way via Redis"));
    println!("{}", rtt_floor.row("floor: raw quinn RTT"));
    println!("{}", hop.row("floor: raw Redis hop"));
    let floor_p99 = (rtt_floor.q(0.99) + hop.q(0.99)) as f64;
    let r = ratio(fabric.q(0.99) as f64, floor_p99);
    println!(
        "  rate at saturation: fabric {fabric_rate:.0} msg/s, raw Redis pub/sub {hop_rate:.0} msg/s"
    );
    println!(
        "  fabric / (quinn RTT + Redis hop): p99 {r:.2}x (target <= 1.5x), rate {:.2}x",
        ratio(fabric_rate, hop_rate)
    );
    Ok(
        json!({"fabric": fabric.json(), "floor_raw_quinn_rtt": rtt_floor.json(), "floor_raw_redis_hop": hop.json(),
              "p99_ratio": r, "fabric_rate": fabric_rate, "floor_redis_rate": hop_rate}),
    )
}

/// One fan-out step's outcome.
struct Step {
    offered: f64,
    delivered_per_s: f64,
    p99_us: u64,
    ok: bool,
}

/// Receivers record latency of every delivery; returns per-step results.
async fn fanout_steps<S, F>(
    receivers: Vec<tokio::sync::mpsc::Receiver<Event>>,
    raw: Vec<raw::RawClient>,
    step: Duration,
    mut send: S,
) -> anyhow::Result<Vec<Step>>
where
    S: FnMut(Vec<u8>) -> F,
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::sync::{Arc, Mutex};
    let n = receivers.len() + raw.len();
    // One histogram per receiver: its lock is uncontended except when a
    // step ends and the stepper collects them.
    let hists: Vec<Arc<Mutex<Latency>>> = (0..n)
        .map(|_| Arc::new(Mutex::new(Latency::new())))
        .collect();
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut slots = hists.iter().cloned();
    for mut rx in receivers {
        let (hist, count) = (slots.next().expect("one per receiver"), count.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(Event::Frame(f)) = rx.recv().await {
                if let Some(d) = payload_of(&f).and_then(age) {
                    hist.lock().unwrap_or_else(|e| e.into_inner()).record(d);
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    for mut c in raw {
        let (hist, count) = (slots.next().expect("one per receiver"), count.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(frame) = c.recv().await {
                let Ok(f) = protocol::decode_frame(&frame[protocol::LENGTH_PREFIX_BYTES..]) else {
                    continue;
                };
                if let Some(d) = payload_of(&f).and_then(age) {
                    hist.lock().unwrap_or_else(|e| e.into_inner()).record(d);
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    let collect = || {
        let mut all = Latency::new();
        for h in &hists {
            let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
            let _ = all.hist.add(&h.hist);
            h.hist.reset();
        }
        all
    };
    let mut steps = Vec::new();
    let mut rate = 50.0f64;
    loop {
        collect();
        let before = count.load(std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut next = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < step {
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
        let p99 = collect().q(0.99);
        let ok = delivered >= expected * 99 / 100 && p99 < 50_000;
        let s = Step {
            offered: rate * n as f64,
            delivered_per_s: delivered as f64 / step.as_secs_f64(),
            p99_us: p99,
            ok,
        };
        println!(
            "    offered {:>9.0} deliveries/s: delivered {:>9.0}/s, p99 {:>7} µs {}",
            s.offered,
            s.delivered_per_s,
            s.p99_us,
            if ok { "ok" } else { "over" }
        );
        steps.push(s);
        if !ok || rate > 1_000_000.0 {
            break;
        }
        rate *= 2.0;
    }
    for t in tasks {
        t.abort();
    }
    Ok(steps)
}

fn best(steps: &[Step]) -> f64 {
    steps
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.delivered_per_s)
        .fold(0.0, f64::max)
}

async fn fanout(sizes: &Sizes, url: &str) -> anyhow::Result<Value> {
    let n = sizes.fanout_clients;
    println!(
        "fanout: 1 publisher, {n} receivers, 100-byte broadcasts at doubling rates (sustained = all delivered, p99 < 50 ms)"
    );
    // Fabric, one node.
    let one_node = {
        let mut lab = Lab::new()?;
        let addr = lab.node(None, |c| c.outbound_queue_len = 4096).await?;
        println!("  fabric, 1 node:");
        fabric_fanout(&lab, &[addr], n, sizes.fanout_step).await?
    };
    // Floor: raw quinn fan-out.
    let floor = {
        let lab = Lab::new()?;
        let server = raw::RawServer::start(lab.certs.path(), raw::Mode::Forward)?;
        let mut publisher = raw::RawClient::connect(server.addr(), &lab.ca()).await?;
        // Same load-generator shape as the fabric side: 8 shared sockets.
        let endpoints: Vec<quinn::Endpoint> = (0..8)
            .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")))
            .collect::<Result<_, _>>()?;
        let mut raws = Vec::new();
        for i in 0..n {
            raws.push(
                raw::RawClient::connect_on(endpoints[i % 8].clone(), server.addr(), &lab.ca())
                    .await?,
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!("  floor, raw quinn:");
        let publisher = tokio::sync::Mutex::new(&mut publisher);
        let steps = fanout_steps(Vec::new(), raws, sizes.fanout_step, |p| {
            let publisher = &publisher;
            async move {
                let frame = protocol::encode(&Frame::new(
                    Priority::Normal,
                    Body::Broadcast {
                        payload: Payload::Binary(p),
                    },
                ))?;
                publisher.lock().await.send(&frame).await
            }
        })
        .await?;
        best(&steps)
    };
    // Fabric, three nodes through Redis.
    let three_nodes = {
        let mut lab = Lab::new()?;
        let prefix = format!("benchfan{}", std::process::id());
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(
                lab.node(Some(url), |c| {
                    c.redis_prefix = prefix.clone();
                    c.outbound_queue_len = 4096;
                })
                .await?,
            );
        }
        println!("  fabric, 3 nodes + Redis:");
        fabric_fanout(&lab, &addrs, n, sizes.fanout_step).await?
    };
    println!(
        "  sustained deliveries/s: fabric 1 node {one_node:.0}, floor {floor:.0} ({:.2}x), fabric 3 nodes {three_nodes:.0} ({:.2}x); target >= 500000 on one node",
        ratio(one_node, floor),
        ratio(three_nodes, floor)
    );
    Ok(
        json!({"clients": n, "fabric_one_node": one_node, "floor_raw_quinn": floor, "fabric_three_nodes": three_nodes,
              "one_node_ratio": ratio(one_node, floor), "three_nodes_ratio": ratio(three_nodes, floor)}),
    )
}

/// Fabric fan-out: `n` receivers spread over `addrs`, the publisher on the
/// first node; returns the highest sustained deliveries/s.
async fn fabric_fanout(
    lab: &Lab,
    addrs: &[std::net::SocketAddr],
    n: usize,
    step: Duration,
) -> anyhow::Result<f64> {
    let receivers = connect_many(lab, addrs, n).await?;
    let publisher = lab.client(addrs[0], "publisher").await?;
    let steps = fanout_steps(receivers, Vec::new(), step, |p| {
        let publisher = &publisher;
        async move {
            let broadcast = Body::Broadcast {
                payload: Payload::Binary(p),
            };
            publisher.submit(Priority::Normal, broadcast).await?;
            Ok(())
        }
    })
    .await?;
    Ok(best(&steps))
}

/// `n` clients spread over `addrs`, sharing a few UDP sockets; returns their event streams.
async fn connect_many(
    lab: &Lab,
    addrs: &[std::net::SocketAddr],
    n: usize,
) -> anyhow::Result<Vec<tokio::sync::mpsc::Receiver<Event>>> {
    let endpoints: Vec<quinn::Endpoint> = (0..8)
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")))
        .collect::<Result<_, _>>()?;
    let mut receivers = Vec::with_capacity(n);
    let mut keep = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let mut handles = Vec::new();
        for &i in chunk {
            let mut config = lab.client_config(addrs[i % addrs.len()], &format!("r{i}"));
            config.endpoint = Some(endpoints[i % endpoints.len()].clone());
            handles.push(tokio::spawn(async move { Client::connect(&config).await }));
        }
        for h in handles {
            let mut c = h.await??;
            receivers.push(c.take_events());
            keep.push(c);
        }
    }
    // Keep the clients alive for the rest of the run.
    std::mem::forget(keep);
    Ok(receivers)
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

/// A node (or raw server) in a child process, so its memory can be measured.
struct Child {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
}

async fn spawn_child(exe: &Path, args: &[String]) -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

async fn start_child(lab: &Lab, raw_server: bool, max: usize) -> anyhow::Result<Child> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let dir = std::env::current_exe()?
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default();
    let certs = lab.certs.path().display().to_string();
    let child = if raw_server {
        spawn_child(
            &std::env::current_exe()?,
            &["raw-server".into(), addr.to_string(), certs],
        )
        .await?
    } else {
        spawn_child(
            &dir.join("fabric-node"),
            &[
                "--listen".into(),
                addr.to_string(),
                "--certs-dir".into(),
                certs,
                "--max-clients".into(),
                max.to_string(),
                // Every client comes from 127.0.0.1.
                "--max-connections-per-ip".into(),
                "0".into(),
                "--connection-rate-per-ip".into(),
                "0".into(),
            ],
        )
        .await?
    };
    let mut probe = lab.client_config(addr, "probe");
    probe.connect_timeout = Duration::from_millis(300);
    let deadline = Instant::now() + Duration::from_secs(20);
    while quic_fabric::client::probe(&probe).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "child server did not start");
    }
    Ok(Child { child, addr })
}

/// Opens `n` connections to `addr`; returns (handshakes/s, the connections).
async fn open_idle(
    lab: &Lab,
    addr: std::net::SocketAddr,
    n: usize,
    raw_quic: bool,
) -> anyhow::Result<(f64, Vec<Box<dyn std::any::Any + Send>>)> {
    let endpoints: Vec<quinn::Endpoint> = (0..16)
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::with_capacity(n);
    let crypto = std::sync::Arc::new(quic_fabric::tls::client_crypto(
        &quic_fabric::tls::ServerTrust::CaFile(lab.ca()),
        None,
    )?);
    for chunk in (0..n).collect::<Vec<_>>().chunks(128) {
        let mut handles = Vec::new();
        for &i in chunk {
            let endpoint = endpoints[i % endpoints.len()].clone();
            if raw_quic {
                let crypto = crypto.clone();
                handles.push(tokio::spawn(async move {
                    let mut cfg = quinn::ClientConfig::new(crypto);
                    let mut t = quinn::TransportConfig::default();
                    t.keep_alive_interval(Some(Duration::from_secs(5)));
                    cfg.transport_config(std::sync::Arc::new(t));
                    let conn = endpoint.connect_with(cfg, addr, "localhost")?.await?;
                    Ok::<Box<dyn std::any::Any + Send>, anyhow::Error>(Box::new(conn))
                }));
            } else {
                let mut config = lab.client_config(addr, &format!("idle{i}"));
                config.endpoint = Some(endpoint);
                handles.push(tokio::spawn(async move {
                    let c = Client::connect(&config).await?;
                    Ok::<Box<dyn std::any::Any + Send>, anyhow::Error>(Box::new(c))
                }));
            }
        }
        for h in handles {
            held.push(h.await??);
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    held.push(Box::new(endpoints));
    Ok((rate, held))
}

async fn connections(sizes: &Sizes) -> anyhow::Result<Value> {
    let n = sizes.connections;
    println!("connections: {n} idle clients against one node (node in a child process)");
    let lab = Lab::new()?;
    let mut results = Vec::new();
    for raw_server in [false, true] {
        let child = start_child(&lab, raw_server, n + 10).await?;
        let pid = child
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("child exited"))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_kib(pid)?;
        let (rate, held) = open_idle(&lab, child.addr, n, raw_server).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(pid)?;
        let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
        let label = if raw_server {
            "floor: raw quinn server"
        } else {
            "fabric node"
        };
        println!(
            "  {label:<24} {rate:>8.0} handshakes/s, RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
            per_conn / 1024.0
        );
        results.push((rate, per_conn));
        drop(held);
        drop(child);
    }
    let (fr, fm) = results[0];
    let (rr, rm) = results[1];
    println!(
        "  fabric / floor: handshakes/s {:.2}x, bytes per connection {:.2}x (target <= 32 KiB per connection)",
        ratio(fr, rr),
        ratio(fm, rm)
    );
    Ok(
        json!({"connections": n, "fabric_handshakes_per_s": fr, "fabric_bytes_per_conn": fm,
              "floor_handshakes_per_s": rr, "floor_bytes_per_conn": rm}),
    )
}

/// Opens `n` idle clients against a running node and holds them.
async fn hold_idle(
    addr: std::net::SocketAddr,
    ca: &Path,
    n: usize,
    hold: Duration,
) -> anyhow::Result<()> {
    let lab = Lab {
        certs: tempfile::tempdir()?,
        stops: Vec::new(),
    };
    std::fs::copy(ca, lab.ca())?;
    let (rate, held) = open_idle(&lab, addr, n, false).await?;
    println!(
        "{n} idle clients connected to {addr} at {rate:.0} handshakes/s; holding for {hold:?}"
    );
    tokio::time::sleep(hold).await;
    drop(held);
    Ok(())
}

/// Runs a raw quinn echo server until killed (the `connections` floor child).
pub async fn raw_server_main(addr: std::net::SocketAddr, certs: &Path) -> anyhow::Result<()> {
    let config = NodeConfig {
        listen: addr,
        certs_dir: certs.to_owned(),
        ..NodeConfig::default()
    };
    let endpoint = quic_fabric::server::endpoint(&config)?;
    let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    while let Some(incoming) = endpoint.accept().await {
        // Concurrent handshakes, as the node does them.
        let conns = conns.clone();
        tokio::spawn(async move {
            if let Ok(conn) = incoming.await {
                conns.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
            }
        });
    }
    Ok(())
}
