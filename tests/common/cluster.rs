//! A cluster fixture: N nodes in this process sharing one cluster bus, so a
//! cross-node scenario (`scenarios.rs`) is written once and run over every
//! bus engine. One fixture per engine: [`MemoryNodes`] here, over the
//! in-memory bus, and [`super::redis::RedisNodes`] next to the Redis
//! container it needs.

use std::future::Future;

use quic_fabric::bus::memory::MemoryCluster;
use quic_fabric::client::Client;
use quic_fabric::node::BusChoice;
use quic_fabric::protocol::{ClientId, ClientInfo};

use super::{TestCerts, TestNode};

/// Nodes sharing one cluster bus, as a scenario sees them.
pub trait Cluster: Sized {
    /// Starts `n` nodes (`n1`, `n2`, …) with one CA and returns once every
    /// node sees all the others.
    fn start(n: usize) -> impl Future<Output = Self> {
        Self::start_with(n, |_, _| {})
    }

    /// Like [`Cluster::start`], with `tweak(i, config)` applied to node `i`
    /// (from 0).
    fn start_with(
        n: usize,
        tweak: impl Fn(usize, &mut quic_fabric::NodeConfig),
    ) -> impl Future<Output = Self>;

    fn nodes(&self) -> &[TestNode];

    fn nodes_mut(&mut self) -> &mut [TestNode];

    /// Returns once `observer`'s cluster list holds exactly `expected`.
    fn wait_listed(&self, observer: &Client, expected: &[ClientId]) -> impl Future<Output = ()>;

    /// Removes what the cluster holds outside this process.
    fn finish(self) -> impl Future<Output = ()>;
}

/// Whether `clients` are exactly the clients `expected`, in any order.
pub fn exactly(clients: &[ClientInfo], expected: &[ClientId]) -> bool {
    let mut ids: Vec<_> = clients.iter().map(|c| c.client_id).collect();
    let mut want = expected.to_vec();
    ids.sort();
    want.sort();
    ids == want
}

/// Nodes over the in-memory bus.
pub struct MemoryNodes {
    pub nodes: Vec<TestNode>,
    pub certs: TestCerts,
}

impl Cluster for MemoryNodes {
    async fn start_with(
        n: usize,
        tweak: impl Fn(usize, &mut quic_fabric::NodeConfig),
    ) -> MemoryNodes {
        let certs = TestCerts::new();
        // Members join the shared map as they start: nothing to wait for.
        let bus = MemoryCluster::new();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let node = TestNode::start_on(BusChoice::Memory(bus.clone()), Some(&certs), |c| {
                c.name = format!("n{i}");
                tweak(i - 1, c);
            })
            .await;
            nodes.push(node);
        }
        MemoryNodes { nodes, certs }
    }

    fn nodes(&self) -> &[TestNode] {
        &self.nodes
    }

    fn nodes_mut(&mut self) -> &mut [TestNode] {
        &mut self.nodes
    }

    /// Presence is in place before a client's HandshakeAck, so the list
    /// must be exact at once: asserted without waiting.
    async fn wait_listed(&self, observer: &Client, expected: &[ClientId]) {
        let (clients, _) = observer.list().await.unwrap();
        assert!(
            exactly(&clients, expected),
            "not listed at once: {expected:?} in {clients:?}"
        );
    }

    async fn finish(self) {}
}
