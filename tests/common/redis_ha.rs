//! Real Redis Cluster and Sentinel topologies in Docker (issue 17).
//!
//! Each topology runs in one container of the `redis-ha` image
//! (`FABRIC_REDIS_HA_IMAGE`, default `quic-fabric/redis-ha:latest`, built
//! offline by `cluster/images.sh redis-ha`) whose start script
//! (`cluster/redis/cluster.sh` or `sentinel.sh`) prints a ready line once
//! the topology is healthy. The container shares the host's network and
//! every process announces `127.0.0.1`, so the addresses in `CLUSTER SLOTS`
//! and Sentinel's answers are the ones a client on the host dials; each set
//! takes a block of free ports of its own, so tests run in parallel.
//!
//! Killing a process is `kill -9` of its pidfile through `docker exec`;
//! restarting it runs the `start` script the container wrote next to it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use testcontainers_modules::testcontainers::core::{ExecCommand, WaitFor};
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// Bound on a topology becoming ready (the script gives up after 50 s).
pub const STARTUP: Duration = Duration::from_secs(60);

/// Bound on a failover: measured ≈ 4.3 s (cluster, node timeout 2 s) and
/// ≈ 3.1 s (Sentinel, down-after 2 s) on an idle machine; this is a busy one.
pub const FAILOVER: Duration = Duration::from_secs(30);

/// Bound on quick things: a process answering, a replica attaching.
const SETTLE: Duration = Duration::from_secs(20);

/// The redis-ha image name and tag to run.
pub fn redis_ha_image() -> (String, String) {
    let image = std::env::var("FABRIC_REDIS_HA_IMAGE")
        .unwrap_or_else(|_| "quic-fabric/redis-ha:latest".into());
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    (name.to_owned(), tag.to_owned())
}

pub fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// A block of `len` consecutive ports, with `PORT + 10000` free as well
/// (cluster bus ports). Blocks are taken from 10000-21999, so bus ports
/// stay below Linux's ephemeral range (32768+) where other tests' ports
/// come from; a cursor per process (started from the pid) keeps this
/// process's sets apart and spreads concurrent test binaries.
fn free_block(len: u16) -> u16 {
    const FIRST: u16 = 10_000;
    const SPAN: u16 = 12_000;
    const STRIDE: u16 = 32;
    assert!(len <= STRIDE, "a set of {len} ports is larger than a block");
    static NEXT: AtomicU16 = AtomicU16::new(u16::MAX);
    let start = (std::process::id() % u32::from(SPAN / STRIDE)) as u16;
    let _ = NEXT.compare_exchange(u16::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    let free = |p: u16| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok();
    for _ in 0..SPAN / STRIDE {
        let block = NEXT.fetch_add(1, Ordering::SeqCst) % (SPAN / STRIDE);
        let base = FIRST + block * STRIDE;
        if (base..base + len).all(|p| free(p) && free(p + 10_000)) {
            return base;
        }
    }
    panic!("no free block of {len} ports (and their +10000 bus ports) in 10000-21999");
}

/// Calls `probe` every 100 ms until it yields a value; panics naming `what`
/// after `bound`.
pub async fn until_some<T, F, Fut>(bound: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + bound;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A command connection to one process, or `None` if it does not answer
/// quickly (killed, restarting).
pub async fn try_conn(port: u16) -> Option<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(1)));
    redis::Client::open(url(port))
        .ok()?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .ok()
}

/// A command connection to one process, which must answer.
pub async fn conn(port: u16) -> MultiplexedConnection {
    until_some(SETTLE, &format!("Redis on port {port} to accept"), || {
        try_conn(port)
    })
    .await
}

/// `cmd` on `port`, or `None` if the process does not answer or errs.
async fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let mut conn = try_conn(port).await?;
    cmd.query_async(&mut conn).await.ok()
}

/// `INFO replication` of `port` as field → value, if it answers.
async fn replication(port: u16) -> Option<HashMap<String, String>> {
    let info: String = query(port, redis::cmd("INFO").arg("replication")).await?;
    Some(
        info.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect(),
    )
}

/// Waits until `port` is a replica in sync with a master; returns the
/// master's port.
pub async fn wait_replica(port: u16) -> u16 {
    until_some(
        FAILOVER,
        &format!("port {port} to be a synced replica"),
        || async {
            let info = replication(port).await?;
            let synced = info.get("role")? == "slave"
                && info.get("master_link_status")? == "up"
                && info.get("master_sync_in_progress")? == "0";
            synced.then(|| info.get("master_port")?.parse().ok())?
        },
    )
    .await
}

/// One topology's container and the processes in it.
pub struct HaContainer {
    pub container: ContainerAsync<GenericImage>,
    /// Every process's port: data nodes, then sentinels (if any).
    pub ports: Vec<u16>,
}

impl HaContainer {
    /// Runs `script` (in /opt/redis-ha) with `env` on host networking and
    /// waits for its `ready` line.
    async fn start(script: &str, ready: &str, ports: Vec<u16>, env: &[(&str, String)]) -> Self {
        let (name, tag) = redis_ha_image();
        let mut request = GenericImage::new(name.as_str(), tag.as_str())
            .with_wait_for(WaitFor::message_on_stdout(ready))
            .with_cmd(["sh", &format!("/opt/redis-ha/{script}")])
            .with_network("host")
            .with_startup_timeout(STARTUP)
            .with_env_var("REDIS_BASE_PORT", ports[0].to_string())
            .with_env_var("REDIS_ANNOUNCE_IP", "127.0.0.1")
            .with_env_var("REDIS_BIND", "127.0.0.1");
        for (key, value) in env {
            request = request.with_env_var(*key, value.clone());
        }
        let container = request.start().await.unwrap_or_else(|e| {
            panic!(
                "cannot start {script} in image {name}:{tag} ({e}); \
                 run `cluster/images.sh redis-ha` first"
            )
        });
        HaContainer { container, ports }
    }

    /// Runs `sh -c script` in the container; panics unless it exits 0.
    pub async fn sh(&self, script: &str) -> String {
        let mut exec = self
            .container
            .exec(ExecCommand::new(["sh", "-c", script]))
            .await
            .unwrap_or_else(|e| panic!("docker exec `{script}`: {e}"));
        let stdout = exec.stdout_to_vec().await.unwrap();
        let stderr = exec.stderr_to_vec().await.unwrap();
        let code = until_some(SETTLE, &format!("`{script}` to exit"), || async {
            exec.exit_code().await.unwrap()
        })
        .await;
        assert_eq!(
            code,
            0,
            "`{script}` failed: {}",
            String::from_utf8_lossy(&stderr)
        );
        String::from_utf8_lossy(&stdout).into_owned()
    }

    /// SIGKILL to the process on `port` (no shutdown, no goodbye to its
    /// peers); returns once the port refuses connections.
    pub async fn kill(&self, port: u16) {
        self.sh(&format!("kill -9 \"$(cat /data/{port}/pid)\""))
            .await;
        until_some(SETTLE, &format!("port {port} to close"), || async {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err()
                .then_some(())
        })
        .await;
    }

    /// Starts the process on `port` again with its original command line
    /// and waits until it answers.
    pub async fn restart(&self, port: u16) {
        self.sh(&format!("sh /data/{port}/start")).await;
        let mut conn = conn(port).await;
        let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    }

    /// Removes the container (every process in it).
    pub async fn remove(self) {
        self.container.rm().await.expect("container removed");
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    /// Owned slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// `fail` or `fail?` (the node considers it down).
    pub fn is_failing(&self) -> bool {
        self.flags.iter().any(|f| f.starts_with("fail"))
    }

    pub fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot))
    }

    fn parse(line: &str) -> Option<ClusterNode> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let addr = fields.get(1)?.split('@').next()?;
        let master = *fields.get(3)?;
        Some(ClusterNode {
            id: fields[0].to_owned(),
            port: addr.rsplit_once(':')?.1.parse().ok()?,
            flags: fields[2].split(',').map(str::to_owned).collect(),
            master_id: (master != "-").then(|| master.to_owned()),
            // Importing/migrating entries ("[slot->-id]") are not ownership.
            slots: fields
                .get(8..)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                    None => s.parse().ok().map(|one| (one, one)),
                })
                .collect(),
        })
    }
}

/// A Redis Cluster (default 3 masters, 1 replica each) in one container.
pub struct RedisClusterSet {
    pub ha: HaContainer,
    /// `redis://127.0.0.1:PORT` of every node, for a cluster client.
    pub seeds: Vec<String>,
    /// A slot of each master [`RedisClusterSet::kill`] took down, so that
    /// [`RedisClusterSet::wait_promoted`] knows what to look for.
    killed_slots: Mutex<HashMap<u16, u16>>,
}

impl RedisClusterSet {
    /// 3 masters with 1 replica each, `cluster-node-timeout` 2000 ms.
    pub async fn start() -> RedisClusterSet {
        Self::start_with(3, 1).await
    }

    pub async fn start_with(masters: u16, replicas: u16) -> RedisClusterSet {
        let total = masters * (replicas + 1);
        let base = free_block(total);
        let env = [
            ("REDIS_MASTERS", masters.to_string()),
            ("REDIS_REPLICAS", replicas.to_string()),
            ("REDIS_NODE_TIMEOUT", "2000".to_owned()),
        ];
        let ports: Vec<u16> = (base..base + total).collect();
        let ha = HaContainer::start("cluster.sh", "REDIS-CLUSTER-READY", ports, &env).await;
        RedisClusterSet {
            seeds: ha.ports.iter().map(|&p| url(p)).collect(),
            ha,
            killed_slots: Mutex::default(),
        }
    }

    /// A cluster-aware connection through the seeds.
    pub async fn client(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.seeds.clone())
            .expect("valid seeds")
            .get_async_connection()
            .await
            .expect("cluster client connects through the seeds")
    }

    /// `CLUSTER NODES` as seen by the first node that answers (skipping `except`).
    pub async fn nodes_except(&self, except: Option<u16>) -> Vec<ClusterNode> {
        until_some(SETTLE, "a cluster node to answer CLUSTER NODES", || async {
            for &port in self.ha.ports.iter().filter(|&&p| Some(p) != except) {
                let cmd = redis::cmd("CLUSTER").arg("NODES").clone();
                if let Some(text) = query::<String>(port, &cmd).await {
                    return Some(text.lines().filter_map(ClusterNode::parse).collect());
                }
            }
            None
        })
        .await
    }

    pub async fn nodes(&self) -> Vec<ClusterNode> {
        self.nodes_except(None).await
    }

    /// Ports of the masters that own slots and are not failing, sorted.
    pub async fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = (self.nodes().await.iter())
            .filter(|n| n.is_master() && !n.is_failing() && !n.slots.is_empty())
            .map(|n| n.port)
            .collect();
        ports.sort();
        ports
    }

    /// Ports of `master`'s replicas, sorted.
    pub async fn replicas_of(&self, master: u16) -> Vec<u16> {
        let nodes = self.nodes().await;
        let id = &nodes
            .iter()
            .find(|n| n.port == master)
            .expect("known port")
            .id;
        let mut ports: Vec<u16> = (nodes.iter())
            .filter(|n| n.master_id.as_ref() == Some(id))
            .map(|n| n.port)
            .collect();
        ports.sort();
        ports
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, hash tags included).
    pub async fn slot(&self, key: &str) -> u16 {
        let cmd = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).clone();
        until_some(SETTLE, "CLUSTER KEYSLOT", || async {
            for &port in &self.ha.ports {
                if let Some(slot) = query(port, &cmd).await {
                    return Some(slot);
                }
            }
            None
        })
        .await
    }

    /// The port of the master that owns `slot` and is not failing.
    pub async fn master_port_for_slot(&self, slot: u16) -> u16 {
        (self.nodes().await.iter())
            .find(|n| n.is_master() && !n.is_failing() && n.owns(slot))
            .unwrap_or_else(|| panic!("no live master owns slot {slot}"))
            .port
    }

    /// The port of the master that owns `key`'s slot.
    pub async fn master_port_for_key(&self, key: &str) -> u16 {
        self.master_port_for_slot(self.slot(key).await).await
    }

    /// SIGKILL to the node on `port`.
    pub async fn kill(&self, port: u16) {
        let nodes = self.nodes_except(Some(port)).await;
        if let Some(&(slot, _)) = nodes
            .iter()
            .find(|n| n.port == port && n.is_master())
            .and_then(|n| n.slots.first())
        {
            self.killed_slots.lock().unwrap().insert(port, slot);
        }
        self.ha.kill(port).await;
    }

    /// Starts the node on `port` again (same identity, from its nodes.conf).
    pub async fn restart(&self, port: u16) {
        self.ha.restart(port).await;
    }

    /// Waits until another node has taken over the slots of `old`, a master
    /// killed with [`RedisClusterSet::kill`], and the cluster is ok again;
    /// returns the new master's port.
    pub async fn wait_promoted(&self, old: u16) -> u16 {
        let slot = *(self.killed_slots.lock().unwrap())
            .get(&old)
            .unwrap_or_else(|| panic!("port {old} was not a master killed with kill()"));
        let new = until_some(
            FAILOVER,
            &format!("a replica to take over from {old}"),
            || async {
                (self.nodes_except(Some(old)).await.iter())
                    .find(|n| n.port != old && n.is_master() && !n.is_failing() && n.owns(slot))
                    .map(|n| n.port)
            },
        )
        .await;
        self.wait_ok().await;
        new
    }

    /// Waits until every node that answers reports `cluster_state:ok`.
    pub async fn wait_ok(&self) {
        until_some(FAILOVER, "cluster_state:ok on every live node", || async {
            let mut answered = false;
            for &port in &self.ha.ports {
                let cmd = redis::cmd("CLUSTER").arg("INFO").clone();
                let Some(info) = query::<String>(port, &cmd).await else {
                    continue;
                };
                if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    return None;
                }
                answered = true;
            }
            answered.then_some(())
        })
        .await
    }

    pub async fn remove(self) {
        self.ha.remove().await;
    }
}

/// A Sentinel set in one container: a master, one replica and three
/// sentinels (quorum 2, down-after 2000 ms, failover-timeout 10000 ms).
pub struct SentinelSet {
    pub ha: HaContainer,
    /// `redis://127.0.0.1:PORT` of every sentinel.
    pub sentinels: Vec<String>,
    /// The name the master is monitored under.
    pub master_name: String,
    /// Ports of the master and replicas as started (the master first).
    pub data_ports: Vec<u16>,
}

impl SentinelSet {
    pub async fn start() -> SentinelSet {
        let base = free_block(5);
        let master_name = "fabric".to_owned();
        let env = [
            ("REDIS_REPLICAS", "1".to_owned()),
            ("REDIS_SENTINELS", "3".to_owned()),
            ("REDIS_MASTER_NAME", master_name.clone()),
            ("REDIS_DOWN_AFTER", "2000".to_owned()),
            ("REDIS_FAILOVER_TIMEOUT", "10000".to_owned()),
        ];
        let ports: Vec<u16> = (base..base + 5).collect();
        let ha = HaContainer::start("sentinel.sh", "REDIS-SENTINEL-READY", ports, &env).await;
        SentinelSet {
            sentinels: ha.ports[2..].iter().map(|&p| url(p)).collect(),
            data_ports: ha.ports[..2].to_vec(),
            master_name,
            ha,
        }
    }

    /// What each answering sentinel names as the master's port.
    async fn named_masters(&self) -> Vec<u16> {
        let cmd = (redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME"))
            .arg(&self.master_name)
            .clone();
        let mut named = Vec::new();
        for &port in &self.ha.ports[2..] {
            if let Some((_, master)) = query::<(String, u16)>(port, &cmd).await {
                named.push(master);
            }
        }
        named
    }

    /// The master's port, as the first answering sentinel names it.
    pub async fn master_port(&self) -> u16 {
        until_some(SETTLE, "a sentinel to name the master", || async {
            self.named_masters().await.first().copied()
        })
        .await
    }

    /// SIGKILL to the current master; returns its port.
    pub async fn kill_master(&self) -> u16 {
        let port = self.master_port().await;
        self.ha.kill(port).await;
        port
    }

    /// Starts the process on `port` again; an old master comes back as a
    /// master and Sentinel turns it into a replica (see [`wait_replica`]).
    pub async fn restart(&self, port: u16) {
        self.ha.restart(port).await;
    }

    /// Waits until every sentinel names a master other than `old` and that
    /// process says it is a master; returns its port.
    pub async fn wait_failover(&self, old: u16) -> u16 {
        let what = format!("the sentinels to agree on a master other than {old}");
        until_some(FAILOVER, &what, || async {
            let named = self.named_masters().await;
            let new = *named.first()?;
            let agreed = new != old && named.len() == 3 && named.iter().all(|&p| p == new);
            let role = replication(new).await?;
            (agreed && role.get("role")? == "master").then_some(new)
        })
        .await
    }

    pub async fn remove(self) {
        self.ha.remove().await;
    }
}

/// A Redis topology nodes can run on: [`HaNodes`] over it is a
/// [`super::cluster::Cluster`], so the shared scenarios run on it.
pub trait HaSet: Sized {
    fn start() -> impl Future<Output = Self>;

    /// Points a node's settings at this topology.
    fn point(&self, config: &mut quic_fabric::NodeConfig);

    fn remove(self) -> impl Future<Output = ()>;
}

impl HaSet for RedisClusterSet {
    fn start() -> impl Future<Output = Self> {
        RedisClusterSet::start()
    }

    fn point(&self, config: &mut quic_fabric::NodeConfig) {
        config.redis_cluster = self.seeds.clone();
    }

    fn remove(self) -> impl Future<Output = ()> {
        RedisClusterSet::remove(self)
    }
}

impl HaSet for SentinelSet {
    fn start() -> impl Future<Output = Self> {
        SentinelSet::start()
    }

    fn point(&self, config: &mut quic_fabric::NodeConfig) {
        config.redis_sentinel = self.sentinels.clone();
        config.redis_sentinel_master = Some(self.master_name.clone());
    }

    fn remove(self) -> impl Future<Output = ()> {
        SentinelSet::remove(self)
    }
}

/// A node in this process on `set`, with the short timings of the Redis
/// tests, then `tweak`.
pub async fn ha_node(
    set: &impl HaSet,
    certs: &super::TestCerts,
    name: &str,
    tweak: impl FnOnce(&mut quic_fabric::NodeConfig),
) -> super::TestNode {
    let name = name.to_owned();
    super::TestNode::start_on(
        quic_fabric::node::BusChoice::FromConfig,
        Some(certs),
        move |c| {
            c.name = name;
            set.point(c);
            super::redis::short_timings(c);
            tweak(c);
        },
    )
    .await
}

/// Nodes on a Redis topology of their own.
pub struct HaNodes<S> {
    pub nodes: Vec<super::TestNode>,
    _certs: super::TestCerts,
    pub set: S,
}

impl<S: HaSet> super::cluster::Cluster for HaNodes<S> {
    async fn start_with(
        n: usize,
        tweak: impl Fn(usize, &mut quic_fabric::NodeConfig),
    ) -> HaNodes<S> {
        let set = S::start().await;
        let certs = super::TestCerts::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(ha_node(&set, &certs, &format!("n{}", i + 1), |c| tweak(i, c)).await);
        }
        super::redis::wait_ready(&nodes.iter().collect::<Vec<_>>()).await;
        HaNodes {
            nodes,
            _certs: certs,
            set,
        }
    }

    fn nodes(&self) -> &[super::TestNode] {
        &self.nodes
    }

    fn nodes_mut(&mut self) -> &mut [super::TestNode] {
        &mut self.nodes
    }

    async fn wait_listed(
        &self,
        observer: &quic_fabric::client::Client,
        expected: &[quic_fabric::protocol::ClientId],
    ) {
        super::redis::wait_listed(observer, expected).await;
    }

    async fn finish(self) {
        self.set.remove().await;
    }
}
