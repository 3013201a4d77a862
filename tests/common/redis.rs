//! A real Redis in Docker (testcontainers) and nodes clustered through it.
//!
//! The image comes from `FABRIC_REDIS_IMAGE` (default `redis:7`); on a
//! machine without a registry, `cluster/images.sh redis` builds it from
//! Debian packages (the README's test command runs it).

use std::time::Duration;

use quic_fabric::bus::ClusterBus;
use quic_fabric::client::Client;
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::ClientId;
use testcontainers_modules::redis::Redis;
use testcontainers_modules::testcontainers::core::IntoContainerPort;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

use super::cluster::{Cluster, exactly};
use super::{NodeProcess, TestCerts, TestNode, WAIT, eventually};

/// The node TTL the cluster tests run with (short, so deaths show quickly).
pub const NODE_TTL: Duration = Duration::from_secs(2);

pub struct TestRedis {
    pub container: ContainerAsync<Redis>,
    pub url: String,
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Redis image name and tag to run.
pub fn redis_image() -> (String, String) {
    let image = std::env::var("FABRIC_REDIS_IMAGE").unwrap_or_else(|_| "redis:7".into());
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    (name.to_owned(), tag.to_owned())
}

impl TestRedis {
    /// A Redis container on a fixed host port, so a restart keeps its address.
    pub async fn start() -> TestRedis {
        Self::start_with_args(&[]).await
    }

    /// Like [`TestRedis::start`], with extra `redis-server` arguments.
    pub async fn start_with_args(args: &[&str]) -> TestRedis {
        let (name, tag) = redis_image();
        let port = free_tcp_port();
        let mut redis = Redis::default()
            .with_name(&name)
            .with_tag(&tag)
            .with_mapped_port(port, 6379.tcp());
        if !args.is_empty() {
            let cmd: Vec<String> = std::iter::once("redis-server".to_owned())
                .chain(args.iter().map(|a| a.to_string()))
                .collect();
            redis = redis.with_cmd(cmd);
        }
        let container = redis.start().await.unwrap_or_else(|e| {
            panic!(
                "cannot start Redis image {name}:{tag} ({e}); run `cluster/images.sh redis` first"
            )
        });
        TestRedis {
            container,
            url: format!("redis://127.0.0.1:{port}"),
        }
    }

    /// A command connection of the test's own.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn remove(self) {
        self.container.rm().await.expect("container removed");
    }
}

/// A node in this process clustered through `redis`, with short timings.
pub async fn redis_node(redis: &TestRedis, certs: &TestCerts, name: &str) -> TestNode {
    redis_node_with(redis, certs, name, |_| {}).await
}

/// Like [`redis_node`], with `tweak` applied last.
pub async fn redis_node_with(
    redis: &TestRedis,
    certs: &TestCerts,
    name: &str,
    tweak: impl FnOnce(&mut quic_fabric::NodeConfig),
) -> TestNode {
    let url = redis.url.clone();
    let name = name.to_owned();
    TestNode::start_on(BusChoice::FromConfig, Some(certs), move |c| {
        c.name = name;
        c.redis_url = Some(url);
        short_timings(c);
        tweak(c);
    })
    .await
}

/// The cluster tests' timings: a short node TTL and heartbeat, so deaths
/// and recoveries show quickly, and short Redis timeouts.
pub fn short_timings(c: &mut quic_fabric::NodeConfig) {
    c.node_ttl = NODE_TTL;
    c.heartbeat_interval = Duration::from_millis(300);
    c.delivery_timeout = Duration::from_secs(3);
    c.redis_connect_timeout = Duration::from_millis(500);
    c.redis_response_timeout = Duration::from_millis(500);
}

/// Waits until every node reaches Redis and sees all the others alive.
pub async fn wait_ready(nodes: &[&TestNode]) {
    let ids: Vec<_> = nodes.iter().map(|n| n.id()).collect();
    for node in nodes {
        let bus = node.bus();
        eventually(WAIT, "node joins the cluster", || async {
            bus.available() && matches!(bus.live_nodes().await, Ok(live) if ids.iter().all(|i| live.contains(i)))
        })
        .await;
    }
}

/// Waits until `observer`'s cluster list has exactly `expected` clients.
pub async fn wait_listed(observer: &Client, expected: &[ClientId]) {
    eventually(WAIT, "cluster list converges", || async {
        match observer.list().await {
            Ok((clients, _)) => exactly(&clients, expected),
            Err(_) => false,
        }
    })
    .await;
}

/// A `fabric-node` process (so it can be SIGKILLed) clustered through
/// `redis` with `ttl` and [`redis_node`]'s heartbeat; `args` are appended.
pub async fn redis_node_process(
    redis: &TestRedis,
    certs: &TestCerts,
    ttl: Duration,
    args: &[&str],
) -> NodeProcess {
    let ttl = format!("{}ms", ttl.as_millis());
    let cluster = ["--redis-url", &redis.url, "--node-ttl", &ttl];
    let args = [&cluster[..], &["--heartbeat-interval", "300ms"], args].concat();
    NodeProcess::start(certs.dir.path(), &args).await
}

/// Nodes in this process clustered through a Redis container of their own.
pub struct RedisNodes {
    pub nodes: Vec<TestNode>,
    pub certs: TestCerts,
    pub redis: TestRedis,
}

impl RedisNodes {
    /// Like [`RedisNodes::start_with`], on a Redis the test started.
    pub async fn start_on(
        redis: TestRedis,
        n: usize,
        tweak: impl Fn(usize, &mut quic_fabric::NodeConfig),
    ) -> RedisNodes {
        let certs = TestCerts::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            nodes.push(redis_node_with(&redis, &certs, &name, |c| tweak(i, c)).await);
        }
        let cluster = RedisNodes {
            nodes,
            certs,
            redis,
        };
        cluster.wait_ready().await;
        cluster
    }

    /// [`wait_ready`] for every node.
    pub async fn wait_ready(&self) {
        wait_ready(&self.nodes.iter().collect::<Vec<_>>()).await;
    }
}

impl Cluster for RedisNodes {
    /// Applies `tweak` after [`redis_node`]'s settings.
    async fn start_with(
        n: usize,
        tweak: impl Fn(usize, &mut quic_fabric::NodeConfig),
    ) -> RedisNodes {
        Self::start_on(TestRedis::start().await, n, tweak).await
    }

    fn nodes(&self) -> &[TestNode] {
        &self.nodes
    }

    fn nodes_mut(&mut self) -> &mut [TestNode] {
        &mut self.nodes
    }

    /// Presence in Redis is read back by polling.
    async fn wait_listed(&self, observer: &Client, expected: &[ClientId]) {
        wait_listed(observer, expected).await
    }

    /// The nodes go first, then the container.
    async fn finish(self) {
        drop(self.nodes);
        self.redis.remove().await;
    }
}

/// The ids of Redis's pub/sub connections, oldest first.
pub async fn pubsub_clients(redis: &TestRedis) -> Vec<u64> {
    let mut conn = redis.conn().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut ids: Vec<u64> = list
        .lines()
        .filter_map(|line| line.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .collect();
    ids.sort();
    ids
}
