//! The `redis-cluster` scenario: does the bus scale out on a Redis Cluster?
//!
//! Three fabric nodes, first on one Redis, then on a Redis Cluster of 3
//! masters and 3 replicas (one container of the `redis-ha` image, host
//! networking, `cluster/redis/cluster.sh`). On each, three flows over
//! [`Sizes::shard_channels`] channels (64: their slots spread over the
//! masters): publications to channels without history, to channels with
//! history (1,000 kept), and cross-node directs. Each flow runs right
//! after its raw floor on the same Redis: pipelined `PUBLISH` (one Redis)
//! or `SPUBLISH` (cluster: a pipeline per master with the channels it
//! owns) on channels named as the bus names them, each received by a
//! subscriber in this process; with history, pipelined `EVALSHA` of the
//! node's own `publish_history.lua`, publishing as the bus does.
//! Every phase also reads `INFO commandstats`, `cpu` and `stats` of every
//! Redis process before and after: the calls per master (the load
//! distribution), the Redis commands per delivered message, commands per
//! socket read, and Redis CPU per message. On the cluster the fabric flows
//! run again with 2 nodes:
//! commands per message must not grow with nodes (nor, one Redis against
//! three masters, with shards).
//!
//! The one Redis is started here with host networking from the same
//! image family as the cluster (not the shared `redis:7` container of the
//! other scenarios, whose published port goes through docker-proxy), so
//! both sides have the same network path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::procs::CpuUse;
use crate::scenarios::{IN_FLIGHT, Lab, RATE_WINDOW, Sizes, cpu_json, ratio, stamp};
use quic_fabric::client::{Client, Event};
use quic_fabric::protocol::{Body, ClientId, Payload, Priority};

/// The node's script, which the history floor runs as a node does.
const SCRIPT: &str = quic_fabric::bus::redis_bus::PUBLISH_HISTORY_SOURCE;

/// Bytes of each message.
const PAYLOAD: usize = 100;

/// History kept per channel with history.
const HISTORY_SIZE: usize = 1_000;

/// Commands per pipeline of a floor.
const PIPELINE: usize = 64;

/// Floor messages sent but not yet received by its subscriber (the floor
/// counterpart of [`RATE_WINDOW`]: a few batches of every driver).
const FLOOR_WINDOW: u64 = 2_048;

/// Concurrent publishing drivers of a floor.
const FLOOR_DRIVERS: usize = 2;

/// Nodes in the main measurement.
const NODES: usize = 3;

/// What a flow carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Publications to channels without history.
    Plain,
    /// Publications to channels with history.
    History,
    /// Directs from a client of one node to a client of another.
    Direct,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Plain, Kind::History, Kind::Direct];

    fn key(self) -> &'static str {
        match self {
            Kind::Plain => "publish",
            Kind::History => "publish_history",
            Kind::Direct => "direct",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Plain => "channel publish",
            Kind::History => "publish, history 1,000",
            Kind::Direct => "cross-node direct",
        }
    }

    /// The fabric channel name of channel `i` of this kind.
    fn channel(self, i: usize) -> String {
        match self {
            Kind::History => format!("h:rc{i}"),
            _ => format!("rc{i}"),
        }
    }
}

/// Where a measurement's Redis is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// One Redis at this URL.
    One(String),
    /// A Redis Cluster reached through these seed URLs.
    Cluster(Vec<String>),
}

impl Target {
    fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }
}

/// A container this scenario started, removed when dropped (on errors too).
pub(crate) struct Container {
    id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.id])
            .output();
    }
}

fn docker_run(args: &[String]) -> anyhow::Result<Container> {
    let out = std::process::Command::new("docker").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "docker run failed ({}): run `cluster/images.sh redis redis-ha`, or pass --redis / --redis-cluster",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(Container {
        id: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    })
}

/// `len` consecutive free ports whose cluster bus ports (+10000) are free
/// too, in 10000-21999 (bus ports below the ephemeral range).
fn free_block(len: u16) -> anyhow::Result<u16> {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let blocks = 12_000 / 32;
    let first = fastrand::u16(0..blocks);
    for k in 0..blocks {
        let base = 10_000 + ((first + k) % blocks) * 32;
        if (base..base + len).all(|p| free(p) && free(p + 10_000)) {
            return Ok(base);
        }
    }
    anyhow::bail!("no {len} free ports (with their +10000 bus ports) in 10000-21999")
}

/// Starts one Redis with host networking (persistence off); returns its URL.
pub(crate) async fn start_one() -> anyhow::Result<(Container, String)> {
    let port = free_block(1)?;
    let image = std::env::var("FABRIC_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".into());
    let args: Vec<String> = [
        "run",
        "-d",
        "--rm",
        "--network",
        "host",
        &image,
        "redis-server",
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let container = docker_run(&args)?;
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.as_str())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .is_ok()
        {
            return Ok((container, url));
        }
        anyhow::ensure!(Instant::now() < deadline, "Redis did not answer on {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a Redis Cluster of `masters` masters with one replica each in one
/// container of the redis-ha image; returns its seed URLs once healthy.
pub(crate) async fn start_cluster(masters: u16) -> anyhow::Result<(Container, Vec<String>)> {
    let total = masters * 2;
    let base = free_block(total)?;
    let image = std::env::var("FABRIC_REDIS_HA_IMAGE")
        .unwrap_or_else(|_| "quic-fabric/redis-ha:latest".into());
    let env = [
        format!("REDIS_BASE_PORT={base}"),
        format!("REDIS_MASTERS={masters}"),
        "REDIS_REPLICAS=1".to_owned(),
        "REDIS_ANNOUNCE_IP=127.0.0.1".to_owned(),
        "REDIS_BIND=127.0.0.1".to_owned(),
        // Redis's default: under this load on 2 cores, a short timeout
        // could fail a master over in the middle of a measurement.
        "REDIS_NODE_TIMEOUT=15000".to_owned(),
    ];
    let mut args: Vec<String> = ["run", "-d", "--rm", "--network", "host"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for e in env {
        args.extend(["-e".to_owned(), e]);
    }
    args.extend([image, "sh".into(), "/opt/redis-ha/cluster.sh".into()]);
    let container = docker_run(&args)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = std::process::Command::new("docker")
            .args(["logs", &container.id])
            .output()?;
        let log = String::from_utf8_lossy(&out.stdout);
        if log.contains("REDIS-CLUSTER-READY") {
            break;
        }
        anyhow::ensure!(
            out.status.success() && !log.contains("REDIS-CLUSTER-FAILED"),
            "the Redis Cluster did not start: {log}"
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "the Redis Cluster was not ready after 90 s: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seeds = (base..base + total)
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    Ok((container, seeds))
}

/// Slot ranges (inclusive) a master owns.
type Slots = Vec<(u16, u16)>;

/// One Redis process whose statistics a measurement reads.
struct Process {
    /// `host:port`.
    addr: String,
    /// Whether it serves slots (or is the one Redis).
    master: bool,
    conn: redis::aio::MultiplexedConnection,
}

/// The Redis processes of a target, and which master owns each channel.
struct Topology {
    target: Target,
    /// Masters first (sorted by address), then replicas.
    processes: Vec<Process>,
    /// Per master (index into `processes`): owned slot ranges.
    slots: Vec<Slots>,
    /// Commands one EVALSHA of the history script runs inside Redis (they
    /// count in `INFO commandstats` too), measured by [`Topology::calibrate`].
    script_calls: f64,
}

impl Topology {
    async fn discover(target: &Target) -> anyhow::Result<Topology> {
        let connect = |url: String| async move {
            let conn = redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            anyhow::Ok(conn)
        };
        match target {
            Target::One(url) => {
                let addr = url.trim_start_matches("redis://").to_owned();
                Ok(Topology {
                    target: target.clone(),
                    processes: vec![Process {
                        addr,
                        master: true,
                        conn: connect(url.clone()).await?,
                    }],
                    slots: vec![vec![(0, 16383)]],
                    script_calls: 0.0,
                })
            }
            Target::Cluster(seeds) => {
                let mut text = None;
                for seed in seeds {
                    if let Ok(mut c) = connect(seed.clone()).await
                        && let Ok(t) = redis::cmd("CLUSTER")
                            .arg("NODES")
                            .query_async::<String>(&mut c)
                            .await
                    {
                        text = Some(t);
                        break;
                    }
                }
                let text = text.ok_or_else(|| anyhow::anyhow!("no seed answered CLUSTER NODES"))?;
                // (addr, master?, slots)
                let mut nodes: Vec<(String, bool, Slots)> = Vec::new();
                for line in text.lines() {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let (Some(addr), Some(flags)) = (f.get(1), f.get(2)) else {
                        continue;
                    };
                    if flags.contains("fail") {
                        continue;
                    }
                    let addr = addr.split('@').next().unwrap_or_default().to_owned();
                    let slots = f
                        .get(8..)
                        .unwrap_or_default()
                        .iter()
                        .filter(|s| !s.starts_with('['))
                        .filter_map(|s| match s.split_once('-') {
                            Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                            None => s.parse().ok().map(|one| (one, one)),
                        })
                        .collect::<Vec<_>>();
                    let master = flags.contains("master") && !slots.is_empty();
                    nodes.push((addr, master, slots));
                }
                nodes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut processes = Vec::new();
                let mut slots = Vec::new();
                for (addr, master, owned) in nodes {
                    let url = format!("redis://{addr}");
                    if master {
                        slots.push(owned);
                    }
                    processes.push(Process {
                        conn: connect(url).await?,
                        addr,
                        master,
                    });
                }
                anyhow::ensure!(!slots.is_empty(), "the cluster has no master with slots");
                Ok(Topology {
                    target: target.clone(),
                    processes,
                    slots,
                    script_calls: 0.0,
                })
            }
        }
    }

    /// Measures [`Topology::script_calls`]: 200 calls of the history
    /// script on a warm key of one master, against that master's
    /// `INFO commandstats`.
    async fn calibrate(&mut self) -> anyhow::Result<()> {
        let cluster = self.target.is_cluster();
        let script = redis::Script::new(SCRIPT);
        let prefix = format!("benchcal{}", std::process::id());
        let (channel, hist, meta) = floor_keys(&prefix, cluster, Kind::History, 0);
        let master = self.owners(std::slice::from_ref(&channel)).await?[0];
        let mut conn = self.processes[master].conn.clone();
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SCRIPT)
            .query_async(&mut conn)
            .await?;
        let call = |pipe: &mut redis::Pipeline| {
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(2)
                .arg(&hist)
                .arg(&meta)
                .arg(vec![7u8; PAYLOAD])
                .arg(HISTORY_SIZE)
                .arg(60_000)
                .arg(60_000)
                .arg(&7u64.to_le_bytes()[..])
                .arg(&channel)
                .arg(if cluster { "SPUBLISH" } else { "PUBLISH" })
                .ignore();
        };
        // The first call starts the channel's epoch (more commands).
        let mut pipe = redis::pipe();
        call(&mut pipe);
        pipe.query_async::<()>(&mut conn).await?;
        let before = self.snapshot().await?;
        let mut pipe = redis::pipe();
        for _ in 0..200 {
            call(&mut pipe);
        }
        pipe.query_async::<()>(&mut conn).await?;
        let after = self.snapshot().await?;
        let load = self.load(&before, &after, 200);
        let shard = &load.shards[master];
        self.script_calls = shard.total().saturating_sub(200) as f64 / 200.0;
        Ok(())
    }

    fn masters(&self) -> usize {
        self.slots.len()
    }

    /// The master (index) owning each key, by `CLUSTER KEYSLOT` (all on
    /// the one Redis).
    async fn owners(&self, keys: &[String]) -> anyhow::Result<Vec<usize>> {
        if !self.target.is_cluster() {
            return Ok(vec![0; keys.len()]);
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("CLUSTER").arg("KEYSLOT").arg(k);
        }
        let slots: Vec<u16> = pipe
            .query_async(&mut self.processes[0].conn.clone())
            .await?;
        slots
            .iter()
            .map(|&s| {
                self.slots
                    .iter()
                    .position(|ranges| ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&s)))
                    .ok_or_else(|| anyhow::anyhow!("no master owns slot {s}"))
            })
            .collect()
    }

    /// Every process's command calls and CPU.
    async fn snapshot(&self) -> anyhow::Result<Vec<Stats>> {
        let mut out = Vec::new();
        for p in &self.processes {
            let text: String = redis::cmd("INFO")
                .arg("commandstats")
                .arg("cpu")
                .arg("stats")
                .query_async(&mut p.conn.clone())
                .await?;
            let mut stats = Stats::default();
            for line in text.lines() {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("cmdstat_")
                    && let Some((name, fields)) = rest.split_once(':')
                {
                    let calls = fields
                        .split(',')
                        .find_map(|f| f.strip_prefix("calls="))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    stats.calls.insert(name.to_owned(), calls);
                } else if let Some(v) = line.strip_prefix("total_reads_processed:") {
                    stats.reads = v.parse().unwrap_or(0);
                } else if let Some(v) = line
                    .strip_prefix("used_cpu_sys:")
                    .or_else(|| line.strip_prefix("used_cpu_user:"))
                {
                    stats.cpu_s += v.parse::<f64>().unwrap_or(0.0);
                }
            }
            out.push(stats);
        }
        Ok(out)
    }

    /// What the processes did between two snapshots, for `messages`
    /// delivered messages.
    fn load(&self, before: &[Stats], after: &[Stats], messages: u64) -> Load {
        let mut shards = Vec::new();
        let mut replica_cpu_s = 0.0;
        for ((p, b), a) in self.processes.iter().zip(before).zip(after) {
            let cpu_s = (a.cpu_s - b.cpu_s).max(0.0);
            if !p.master {
                replica_cpu_s += cpu_s;
                continue;
            }
            let mut calls: BTreeMap<String, u64> = a
                .calls
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(*b.calls.get(k).unwrap_or(&0))))
                .collect();
            // The INFO of the `before` snapshot is counted; it is ours.
            if let Some(info) = calls.get_mut("info") {
                *info = info.saturating_sub(1);
            }
            calls.retain(|_, v| *v > 0);
            shards.push(Shard {
                addr: p.addr.clone(),
                calls,
                cpu_s,
                reads: a.reads.saturating_sub(b.reads),
            });
        }
        Load {
            shards,
            replica_cpu_s,
            messages,
            script_calls: self.script_calls,
        }
    }
}

/// One Redis process's counters.
#[derive(Debug, Default, Clone)]
struct Stats {
    calls: BTreeMap<String, u64>,
    cpu_s: f64,
    /// Reads from client sockets (`total_reads_processed`): about one per
    /// pipeline a client sends, so messages per read tell pipeline sizes.
    reads: u64,
}

/// One master's share of a phase.
struct Shard {
    addr: String,
    calls: BTreeMap<String, u64>,
    cpu_s: f64,
    reads: u64,
}

impl Shard {
    fn total(&self) -> u64 {
        self.calls.values().sum()
    }
}

/// What Redis did in a phase.
struct Load {
    shards: Vec<Shard>,
    replica_cpu_s: f64,
    messages: u64,
    /// Commands run inside each EVALSHA (see [`Topology::script_calls`]).
    script_calls: f64,
}

impl Load {
    /// Every command call, inside scripts too.
    fn total(&self) -> u64 {
        self.shards.iter().map(Shard::total).sum()
    }

    /// Commands sent to Redis (script calls' inner commands taken out).
    fn sent(&self) -> f64 {
        let evalsha: u64 = self
            .shards
            .iter()
            .map(|s| s.calls.get("evalsha").copied().unwrap_or(0))
            .sum();
        self.total() as f64 - evalsha as f64 * self.script_calls
    }

    /// Commands sent per delivered message.
    fn per_message(&self) -> f64 {
        self.sent() / self.messages.max(1) as f64
    }

    /// Command calls (inside scripts too) per delivered message.
    fn calls_per_message(&self) -> f64 {
        self.total() as f64 / self.messages.max(1) as f64
    }

    /// Largest master's calls over the mean (1.0 = even).
    fn imbalance(&self) -> f64 {
        let max = self.shards.iter().map(Shard::total).max().unwrap_or(0) as f64;
        ratio(max, self.total() as f64 / self.shards.len().max(1) as f64)
    }

    /// Commands sent per socket read on the masters (about the commands
    /// per pipeline).
    fn sent_per_read(&self) -> f64 {
        ratio(
            self.sent(),
            self.shards.iter().map(|s| s.reads).sum::<u64>() as f64,
        )
    }

    fn master_cpu_us(&self) -> f64 {
        self.shards.iter().map(|s| s.cpu_s).sum::<f64>() * 1e6 / self.messages.max(1) as f64
    }

    fn replica_cpu_us(&self) -> f64 {
        self.replica_cpu_s * 1e6 / self.messages.max(1) as f64
    }

    fn lines(&self) -> Vec<String> {
        let total = self.total().max(1) as f64;
        let mut lines = Vec::new();
        for s in &self.shards {
            let mut top: Vec<(&String, &u64)> = s.calls.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1));
            let top: Vec<String> = top
                .iter()
                .take(4)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            lines.push(format!(
                "      {:<16} {:>5.1} % of calls ({}), CPU {:.2} s",
                s.addr,
                s.total() as f64 * 100.0 / total,
                top.join(", "),
                s.cpu_s
            ));
        }
        lines.push(format!(
            "      {:.3} Redis commands sent per message ({:.0} / {} messages; {:.2} calls per message counting those inside scripts; {:.1} commands per socket read), largest master {:.2}x the mean; Redis CPU per message: masters {:.2} µs, replicas {:.2} µs",
            self.per_message(),
            self.sent(),
            self.messages,
            self.calls_per_message(),
            self.sent_per_read(),
            self.imbalance(),
            self.master_cpu_us(),
            self.replica_cpu_us()
        ));
        lines
    }

    fn json(&self) -> Value {
        let total = self.total().max(1) as f64;
        json!({
            "commands_per_message": self.per_message(),
            "commands_sent": self.sent(),
            "calls_per_message": self.calls_per_message(),
            "commands_per_read": self.sent_per_read(),
            "total_calls": self.total(),
            "calls_inside_each_script_call": self.script_calls,
            "messages": self.messages,
            "largest_over_mean": self.imbalance(),
            "master_cpu_us_per_message": self.master_cpu_us(),
            "replica_cpu_us_per_message": self.replica_cpu_us(),
            "masters": self.shards.iter().map(|s| json!({
                "addr": s.addr, "calls": s.total(), "share": s.total() as f64 / total,
                "by_command": s.calls, "cpu_s": s.cpu_s, "reads": s.reads,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Deliveries counted by receiving tasks, with the time of the last one.
struct Counter {
    n: AtomicU64,
    /// Nanoseconds since `born` of the latest delivery.
    last_ns: AtomicU64,
    born: Instant,
}

impl Counter {
    fn new() -> Arc<Counter> {
        Arc::new(Counter {
            n: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    fn note(&self) {
        self.n.fetch_add(1, Ordering::Relaxed);
        self.last_ns
            .store(self.born.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        self.born + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }

    /// Waits (at most `patience`) until `target` deliveries were counted.
    async fn settle(&self, target: u64, patience: Duration) {
        let deadline = Instant::now() + patience;
        while self.count() < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// How long and how much a flow may send.
#[derive(Debug, Clone, Copy)]
struct Limits {
    window: Duration,
    max: u64,
}

/// What one flow measured.
struct Flow {
    sent: u64,
    delivered: u64,
    rate: f64,
    load: Load,
    /// CPU of the node processes (none for a floor) and of this process.
    cpu: CpuUse,
}

impl Flow {
    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }

    fn json(&self) -> Value {
        let mut v = json!({"rate": self.rate, "sent": self.sent, "delivered": self.delivered,
                           "lost": self.lost(), "redis": self.load.json()});
        v["cpu"] = cpu_json(&self.cpu, self.delivered);
        v
    }
}

// ---------------------------------------------------------------- floors ---

/// The floor's names for channel `i` of `kind` (pub/sub channel, history
/// stream, history meta): the bus's own names (`Keys`) under `prefix`,
/// hash-tagged on a cluster, so a floor channel lives on the slot of the
/// fabric channel of the same name.
fn floor_keys(prefix: &str, cluster: bool, kind: Kind, i: usize) -> (String, String, String) {
    use quic_fabric::bus::redis_bus::Keys;
    let keys = if cluster {
        Keys::tagged(prefix)
    } else {
        Keys::new(prefix)
    };
    let name = kind.channel(i);
    (
        keys.channel(&name),
        keys.history(&name),
        keys.history_meta(&name),
    )
}

/// The raw floor of `kind` (Plain or History; a direct's floor is
/// Plain's): pipelined PUBLISH / SPUBLISH (or EVALSHA) over `channels`
/// channels from this process, each received by one subscriber here.
async fn floor(
    topo: &Topology,
    kind: Kind,
    channels: usize,
    limits: Limits,
) -> anyhow::Result<Flow> {
    let prefix = format!("benchfloor{}", std::process::id());
    let cluster = topo.target.is_cluster();
    let keys: Vec<(String, String, String)> = (0..channels)
        .map(|i| floor_keys(&prefix, cluster, kind, i))
        .collect();
    // The subscriber: RESP3 pushes into one channel, counted by one task.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
    let counter = Counter::new();
    let count = counter.clone();
    let reader = tokio::spawn(async move {
        while let Some(push) = rx.recv().await {
            if matches!(
                push.kind,
                redis::PushKind::Message | redis::PushKind::SMessage
            ) {
                count.note();
            }
        }
    });
    let names: Vec<&String> = keys.iter().map(|k| &k.0).collect();
    let _subscriber: Box<dyn std::any::Any + Send> = match &topo.target {
        Target::One(url) => {
            let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
            let mut conn = redis::Client::open(format!("{url}/?protocol=resp3"))?
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            for name in &names {
                conn.subscribe(*name).await?;
            }
            Box::new(conn)
        }
        Target::Cluster(seeds) => {
            let mut conn = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .build()?
                .get_async_connection()
                .await?;
            // One per call: channels of several slots in one SSUBSCRIBE
            // are refused (CROSSSLOT).
            for name in &names {
                conn.ssubscribe(*name).await?;
            }
            Box::new(conn)
        }
    };
    let script = redis::Script::new(SCRIPT);
    // Publishing: FLOOR_DRIVERS drivers, each taking the channels in
    // turn (as the fabric's publishers do), a batch of PIPELINE messages
    // per master at a time, grouped by the master that owns the channel
    // (on one Redis: as many pipelines of PIPELINE, so both sides keep
    // the same number of pipelines in flight), sent concurrently. The
    // load on each master so follows its share of the channels, not its
    // speed.
    let owners = topo
        .owners(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .await?;
    let pipes = topo.masters().max(NODES);
    let mut conns = Vec::new();
    for master in 0..topo.masters() {
        let mut conn = topo.processes[master].conn.clone();
        if kind == Kind::History {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SCRIPT)
                .query_async(&mut conn)
                .await?;
        }
        conns.push(conn);
    }
    let keys = Arc::new(keys);
    let owners = Arc::new(owners);
    let sent = Arc::new(AtomicU64::new(0));
    let before = topo.snapshot().await?;
    let meter = crate::procs::CpuMeter::start(&[])?;
    let start = Instant::now();
    let deadline = start + limits.window;
    let mut tasks = Vec::new();
    let batch = (PIPELINE * pipes) as u64;
    for driver in 0..FLOOR_DRIVERS {
        let (keys, owners, sent, counter) =
            (keys.clone(), owners.clone(), sent.clone(), counter.clone());
        let conns = conns.clone();
        let hash = script.get_hash().to_owned();
        tasks.push(tokio::spawn(async move {
            let mut next = driver * channels / FLOOR_DRIVERS;
            let payload = vec![7u8; PAYLOAD + 80];
            while Instant::now() < deadline {
                let reserved = sent.fetch_add(batch, Ordering::Relaxed);
                if reserved >= limits.max {
                    sent.fetch_sub(batch, Ordering::Relaxed);
                    break;
                }
                while reserved.saturating_sub(counter.count()) >= FLOOR_WINDOW {
                    anyhow::ensure!(
                        Instant::now() < deadline + Duration::from_secs(10),
                        "floor deliveries stopped: {} of {reserved}",
                        counter.count()
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let mut groups: Vec<(usize, redis::Pipeline)> = Vec::new();
                for k in 0..batch as usize {
                    let i = next % channels;
                    next += 1;
                    let (channel, hist, meta) = &keys[i];
                    let group = if cluster { owners[i] } else { k / PIPELINE };
                    let pipe = match groups.iter_mut().find(|(g, _)| *g == group) {
                        Some((_, pipe)) => pipe,
                        None => {
                            groups.push((group, redis::pipe()));
                            &mut groups.last_mut().expect("just pushed").1
                        }
                    };
                    if kind == Kind::History {
                        pipe.cmd("EVALSHA")
                            .arg(&hash)
                            .arg(2)
                            .arg(hist)
                            .arg(meta)
                            .arg(&payload)
                            .arg(HISTORY_SIZE)
                            .arg(60_000)
                            .arg(60_000)
                            .arg(&7u64.to_le_bytes()[..])
                            .arg(channel)
                            .arg(if cluster { "SPUBLISH" } else { "PUBLISH" })
                            .ignore();
                    } else {
                        pipe.cmd(if cluster { "SPUBLISH" } else { "PUBLISH" })
                            .arg(channel)
                            .arg(&payload)
                            .ignore();
                    }
                }
                let sends = groups.into_iter().map(|(group, pipe)| {
                    let mut conn = conns[if cluster { group } else { 0 }].clone();
                    async move { pipe.query_async::<()>(&mut conn).await }
                });
                for r in futures_util::future::join_all(sends).await {
                    r?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let sent = sent.load(Ordering::Relaxed);
    counter.settle(sent, Duration::from_secs(10)).await;
    let cpu = meter.stop()?;
    let delivered = counter.count();
    let after = topo.snapshot().await?;
    reader.abort();
    Ok(Flow {
        sent,
        delivered,
        rate: delivered as f64 / counter.last().duration_since(start).as_secs_f64().max(1e-3),
        load: topo.load(&before, &after, delivered),
        cpu,
    })
}

// ---------------------------------------------------------------- fabric ---

/// Fabric nodes on one target, with a publisher and a subscriber client
/// on each node.
struct Fabric {
    lab: Lab,
    publishers: Vec<Arc<Client>>,
    /// The subscriber clients' ids (the directs' recipients).
    subscribers: Vec<ClientId>,
    counter: Arc<Counter>,
    _held: Vec<Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fabric {
    /// `nodes` nodes on `target`; channel `i` (of each publication kind)
    /// gets one subscriber, on node `i % nodes`.
    async fn start(target: &Target, nodes: usize, channels: usize) -> anyhow::Result<Fabric> {
        let mut lab = Lab::new()?;
        static LABS: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "benchrc{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let namespace = format!("h,history_size={HISTORY_SIZE},history_ttl=1m");
        let mut addrs = Vec::new();
        for _ in 0..nodes {
            addrs.push(match target {
                Target::One(url) => {
                    lab.node(Some((url, &prefix)), &["--namespaces", &namespace])
                        .await?
                }
                Target::Cluster(seeds) => {
                    let seeds = seeds.join(",");
                    lab.node(
                        None,
                        &[
                            "--redis-cluster",
                            &seeds,
                            "--redis-prefix",
                            &prefix,
                            "--namespaces",
                            &namespace,
                        ],
                    )
                    .await?
                }
            });
        }
        let counter = Counter::new();
        let mut publishers = Vec::new();
        let mut subscribers = Vec::new();
        let mut held = Vec::new();
        let mut tasks = Vec::new();
        for (j, &addr) in addrs.iter().enumerate() {
            publishers.push(Arc::new(lab.client(addr, &format!("pub{j}")).await?));
            let mut sub = lab.client(addr, &format!("sub{j}")).await?;
            for kind in [Kind::Plain, Kind::History] {
                for i in (0..channels).filter(|i| i % nodes == j) {
                    sub.subscribe(&kind.channel(i), false).await?;
                }
            }
            subscribers.push(sub.client_id());
            let mut events = sub.take_events();
            let count = counter.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if let Event::Frame(f) = event
                        && matches!(
                            f.body,
                            Body::Publication { .. } | Body::Publish { .. } | Body::Direct { .. }
                        )
                    {
                        count.note();
                    }
                }
            }));
            held.push(sub);
        }
        Ok(Fabric {
            lab,
            publishers,
            subscribers,
            counter,
            _held: held,
            tasks,
        })
    }

    /// One flow of `kind`: every publisher sends (publications round-robin
    /// over the channels, or directs to the subscriber of the next node)
    /// with at most [`IN_FLIGHT`] unacknowledged each and [`RATE_WINDOW`]
    /// undelivered in all.
    async fn flow(
        &self,
        topo: &Topology,
        kind: Kind,
        channels: usize,
        limits: Limits,
    ) -> anyhow::Result<Flow> {
        let nodes = self.publishers.len();
        let base = self.counter.count();
        let sent = Arc::new(AtomicU64::new(0));
        let before = topo.snapshot().await?;
        let meter = self.lab.meter()?;
        let start = Instant::now();
        let deadline = start + limits.window;
        let mut tasks = Vec::new();
        for (j, client) in self.publishers.iter().enumerate() {
            let (client, sent, counter) = (client.clone(), sent.clone(), self.counter.clone());
            let to = self.subscribers[(j + 1) % nodes];
            tasks.push(tokio::spawn(async move {
                let mut acks = VecDeque::new();
                let mut next = j;
                while Instant::now() < deadline {
                    let reserved = sent.fetch_add(1, Ordering::Relaxed);
                    if reserved >= limits.max {
                        sent.fetch_sub(1, Ordering::Relaxed);
                        break;
                    }
                    while reserved.saturating_sub(counter.count() - base) >= RATE_WINDOW {
                        anyhow::ensure!(
                            Instant::now() < deadline + Duration::from_secs(10),
                            "deliveries stopped: {} of {reserved}",
                            counter.count() - base
                        );
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let payload = Payload::Binary(stamp(PAYLOAD));
                    let body = match kind {
                        Kind::Direct => Body::Direct { to, payload },
                        _ => {
                            next += 1;
                            Body::Publish {
                                channel: kind.channel(next % channels),
                                payload,
                            }
                        }
                    };
                    acks.push_back(client.submit(Priority::Normal, body).await?);
                    if acks.len() >= IN_FLIGHT
                        && let Some(a) = acks.pop_front()
                    {
                        a.wait().await?;
                    }
                }
                for a in acks {
                    a.wait().await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let sent = sent.load(Ordering::Relaxed);
        self.counter
            .settle(base + sent, Duration::from_secs(10))
            .await;
        let cpu = meter.stop()?;
        let delivered = self.counter.count() - base;
        let after = topo.snapshot().await?;
        Ok(Flow {
            sent,
            delivered,
            rate: delivered as f64
                / self
                    .counter
                    .last()
                    .duration_since(start)
                    .as_secs_f64()
                    .max(1e-3),
            load: topo.load(&before, &after, delivered),
            cpu,
        })
    }
}

// -------------------------------------------------------------- scenario ---

/// Fabric beside floor for each kind, on one target.
struct Measured {
    fabric: BTreeMap<&'static str, Flow>,
    floor: BTreeMap<&'static str, Flow>,
}

fn print_flow(label: &str, flow: &Flow) {
    println!(
        "    {label:<44} {:>9.0} msg/s ({} sent, {} lost); CPU per message: nodes {:.1} µs, bench {:.1} µs",
        flow.rate,
        flow.sent,
        flow.lost(),
        flow.cpu.server_us_per(flow.delivered),
        flow.cpu.client_us_per(flow.delivered),
    );
    for line in flow.load.lines() {
        println!("{line}");
    }
}

async fn measure(
    target: &Target,
    nodes: usize,
    channels: usize,
    limits: Limits,
    with_floors: bool,
) -> anyhow::Result<Measured> {
    let mut topo = Topology::discover(target).await?;
    topo.calibrate().await?;
    print_layout(&topo, channels).await?;
    let fabric = Fabric::start(target, nodes, channels).await?;
    // Subscriptions and Join events settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut out = Measured {
        fabric: BTreeMap::new(),
        floor: BTreeMap::new(),
    };
    for kind in Kind::ALL {
        if with_floors && kind != Kind::Direct {
            let f = floor(&topo, kind, channels, limits).await?;
            let name = match (kind, target.is_cluster()) {
                (Kind::History, true) => "floor: EVALSHA (SPUBLISH inside)",
                (Kind::History, false) => "floor: EVALSHA (PUBLISH inside)",
                (_, true) => "floor: pipelined SPUBLISH",
                (_, false) => "floor: pipelined PUBLISH",
            };
            print_flow(name, &f);
            out.floor.insert(kind.key(), f);
        }
        let f = fabric.flow(&topo, kind, channels, limits).await?;
        print_flow(&format!("fabric, {nodes} nodes: {}", kind.label()), &f);
        out.fabric.insert(kind.key(), f);
    }
    Ok(out)
}

/// How many of the channels each master owns (by the bus's hash tag).
async fn print_layout(topo: &Topology, channels: usize) -> anyhow::Result<()> {
    let mut parts = Vec::new();
    for kind in [Kind::Plain, Kind::History] {
        let names: Vec<String> = (0..channels)
            .map(|i| floor_keys("x", topo.target.is_cluster(), kind, i).0)
            .collect();
        let owners = topo.owners(&names).await?;
        let per: Vec<String> = (0..topo.masters())
            .map(|m| owners.iter().filter(|&&o| o == m).count().to_string())
            .collect();
        parts.push(format!("{} {}", kind.key(), per.join("/")));
    }
    println!(
        "    channels per master: {}; {:.1} commands inside each call of the history script",
        parts.join(", "),
        topo.script_calls
    );
    Ok(())
}

/// The floor a fabric flow of `kind` is set against.
fn floor_of(m: &Measured, kind: Kind) -> Option<&Flow> {
    m.floor.get(match kind {
        Kind::History => Kind::History.key(),
        _ => Kind::Plain.key(),
    })
}

fn measured_json(m: &Measured) -> Value {
    let mut out = serde_json::Map::new();
    for kind in Kind::ALL {
        let Some(f) = m.fabric.get(kind.key()) else {
            continue;
        };
        let mut v = json!({"fabric": f.json()});
        if let Some(floor) = floor_of(m, kind) {
            v["floor"] = floor.json();
            v["ratio_to_floor"] = json!(ratio(f.rate, floor.rate));
        }
        out.insert(kind.key().to_owned(), v);
    }
    Value::Object(out)
}

pub(crate) async fn redis_cluster(
    sizes: &Sizes,
    one: Option<String>,
    cluster: Vec<String>,
) -> anyhow::Result<Value> {
    let channels = sizes.shard_channels;
    let limits = Limits {
        window: sizes.rate_window,
        max: 5_000_000,
    };
    println!(
        "redis-cluster: {NODES} nodes on one Redis vs on a Redis Cluster (3 masters + 3 replicas), {channels} channels, {PAYLOAD}-byte messages, {:.1} s per flow; each flow beside its raw floor, and Redis calls per master (INFO commandstats)",
        limits.window.as_secs_f64()
    );
    // One Redis, started here unless given.
    let (_one_container, one_url) = match one {
        Some(url) => (None, url),
        None => {
            let (c, url) = start_one().await?;
            (Some(c), url)
        }
    };
    println!("  one Redis ({one_url}):");
    let single = measure(&Target::One(one_url), NODES, channels, limits, true).await?;
    let started = Instant::now();
    let (_cluster_container, seeds) = if cluster.is_empty() {
        let (c, seeds) = start_cluster(3).await?;
        (Some(c), seeds)
    } else {
        (None, cluster)
    };
    println!(
        "  Redis Cluster ({} processes; ready in {:.1} s):",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    let target = Target::Cluster(seeds);
    let sharded = measure(&target, NODES, channels, limits, true).await?;
    println!("  Redis Cluster, 2 nodes (commands per message must not grow with nodes):");
    let two = measure(&target, 2, channels, limits, false).await?;
    print_summary(&single, &sharded, &two);
    let mut vs = serde_json::Map::new();
    for kind in Kind::ALL {
        let (Some(a), Some(b)) = (
            single.fabric.get(kind.key()),
            sharded.fabric.get(kind.key()),
        ) else {
            continue;
        };
        vs.insert(
            kind.key().to_owned(),
            json!({
                "fabric_rate": ratio(b.rate, a.rate),
                "floor_rate": ratio(
                    floor_of(&sharded, kind).map_or(f64::NAN, |f| f.rate),
                    floor_of(&single, kind).map_or(f64::NAN, |f| f.rate)),
                "commands_per_message": [a.load.per_message(), b.load.per_message(),
                    two.fabric.get(kind.key()).map_or(f64::NAN, |f| f.load.per_message())],
            }),
        );
    }
    Ok(json!({
        "channels": channels, "nodes": NODES, "payload": PAYLOAD, "window_s": limits.window.as_secs_f64(),
        "one_redis": measured_json(&single),
        "cluster": measured_json(&sharded),
        "cluster_two_nodes": measured_json(&two),
        "cluster_over_one": vs,
    }))
}

/// The table the lead pastes.
fn print_summary(single: &Measured, sharded: &Measured, two: &Measured) {
    println!(
        "  summary (msg/s; ratio = fabric / its floor; commands = Redis commands sent per delivered message; last column: cluster, 3 nodes):"
    );
    println!(
        "    | flow | one Redis: fabric | floor | ratio | cluster: fabric | floor | ratio | cluster / one (fabric, floor) | commands 1 Redis / cluster 3 nodes / 2 nodes | largest master / mean | node CPU µs per message 1 Redis / cluster |"
    );
    println!("    |---|---|---|---|---|---|---|---|---|---|---|");
    for kind in Kind::ALL {
        let (Some(a), Some(b)) = (
            single.fabric.get(kind.key()),
            sharded.fabric.get(kind.key()),
        ) else {
            continue;
        };
        let (fa, fb) = (floor_of(single, kind), floor_of(sharded, kind));
        let rate = |f: Option<&Flow>| f.map_or(f64::NAN, |f| f.rate);
        let c2 = two
            .fabric
            .get(kind.key())
            .map_or(f64::NAN, |f| f.load.per_message());
        println!(
            "    | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2}, {:.2} | {:.2} / {:.2} / {:.2} | {:.2} | {:.1} / {:.1} |",
            kind.label(),
            a.rate,
            rate(fa),
            ratio(a.rate, rate(fa)),
            b.rate,
            rate(fb),
            ratio(b.rate, rate(fb)),
            ratio(b.rate, a.rate),
            ratio(rate(fb), rate(fa)),
            a.load.per_message(),
            b.load.per_message(),
            c2,
            b.load.imbalance(),
            a.cpu.server_us_per(a.delivered),
            b.cpu.server_us_per(b.delivered),
        );
    }
}
