//! Node-wide counters, updated lock-free on the hot path and reported in
//! Stats frames.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::protocol::{NodeId, NodeStats};

/// Counters shared by every task of a node.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Handshakes completed.
    pub connections_total: AtomicU64,
    /// Frames received from clients.
    pub messages_in: AtomicU64,
    /// Frames queued to clients.
    pub messages_out: AtomicU64,
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes queued to clients.
    pub bytes_out: AtomicU64,
    /// Error frames sent.
    pub errors: AtomicU64,
    /// Clients disconnected as slow consumers.
    pub slow_consumer_disconnects: AtomicU64,
    /// Messages refused because the node-wide queue budget was exhausted.
    pub node_busy: AtomicU64,
    /// Frames rejected by the per-client rate limit.
    pub rate_limited: AtomicU64,
    /// Clients disconnected for sustained rate-limit abuse.
    pub rate_limit_disconnects: AtomicU64,
    /// Handshakes refused for authentication.
    pub auth_failures: AtomicU64,
    /// Connection attempts refused before TLS (admission control).
    pub connections_refused: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            connections_total: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            node_busy: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            rate_limit_disconnects: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
        }
    }
}

/// Adds `n` to a counter (relaxed: these are statistics, not synchronisation).
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    /// A consistent-enough copy for a Stats frame.
    pub fn snapshot(&self, node_id: NodeId, server_name: &str, clients: usize) -> NodeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NodeStats {
            node_id,
            server_name: server_name.to_owned(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            clients_connected: clients as u64,
            connections_total: get(&self.connections_total),
            messages_in: get(&self.messages_in),
            messages_out: get(&self.messages_out),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            errors: get(&self.errors),
            slow_consumer_disconnects: get(&self.slow_consumer_disconnects),
        }
    }
}
