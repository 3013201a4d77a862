//! Node-wide counters and histograms, updated lock-free (counters) on the
//! hot path, reported in Stats frames and exported to Prometheus by
//! `metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::protocol::{FRAME_NAMES, NodeId, NodeStats, SessionOutcome};

/// Error codes counted one by one; higher codes share the last slot.
pub const ERROR_CODE_SLOTS: usize = 32;

/// Why a connection was refused or ended before becoming a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReason {
    /// Too many connections mid-handshake.
    PendingHandshakes,
    /// The IP address opened connections too fast.
    IpRate,
    /// The IP address has too many connections.
    IpConnections,
    /// The node is at `max_clients`.
    ServerFull,
    /// The token or certificate was refused.
    AuthFailed,
    /// The Handshake was invalid (frame, name, version).
    BadHandshake,
    /// No Handshake in time.
    HandshakeTimeout,
    /// The node is draining or shutting down.
    Draining,
    /// A WebTransport request was refused (wrong path, origin not
    /// allowed) or never completed (no CONNECT in time, not HTTP/3).
    WebTransportRequest,
}

impl RefusedReason {
    /// Every reason, in slot order.
    pub const ALL: [RefusedReason; 9] = [
        RefusedReason::PendingHandshakes,
        RefusedReason::IpRate,
        RefusedReason::IpConnections,
        RefusedReason::ServerFull,
        RefusedReason::AuthFailed,
        RefusedReason::BadHandshake,
        RefusedReason::HandshakeTimeout,
        RefusedReason::Draining,
        RefusedReason::WebTransportRequest,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedReason::PendingHandshakes => "pending_handshakes",
            RefusedReason::IpRate => "ip_rate",
            RefusedReason::IpConnections => "ip_connections",
            RefusedReason::ServerFull => "server_full",
            RefusedReason::AuthFailed => "auth_failed",
            RefusedReason::BadHandshake => "bad_handshake",
            RefusedReason::HandshakeTimeout => "handshake_timeout",
            RefusedReason::Draining => "draining",
            RefusedReason::WebTransportRequest => "webtransport_request",
        }
    }
}

/// Counters shared by every task of a node.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    /// Handshakes completed.
    pub connections_total: AtomicU64,
    /// Handshakes completed, by transport (`Transport::index`).
    pub connections_by_transport: [AtomicU64; 2],
    /// Bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Bytes queued to clients.
    pub bytes_out: AtomicU64,
    /// Clients disconnected as slow consumers.
    pub slow_consumer_disconnects: AtomicU64,
    /// Messages refused because the node-wide queue budget was exhausted.
    pub node_busy: AtomicU64,
    /// Frames rejected by the per-client rate limit.
    pub rate_limited: AtomicU64,
    /// Clients disconnected for sustained rate-limit abuse.
    pub rate_limit_disconnects: AtomicU64,
    /// Frames received, by type (wire tag).
    pub messages_in_by_type: [AtomicU64; FRAME_NAMES.len()],
    /// Frames queued to clients, by type (wire tag).
    pub messages_out_by_type: [AtomicU64; FRAME_NAMES.len()],
    /// Error frames sent, by code.
    pub errors_by_code: [AtomicU64; ERROR_CODE_SLOTS],
    /// Connections refused or ended before becoming clients, by reason.
    pub refused_by_reason: [AtomicU64; RefusedReason::ALL.len()],
    /// Messages received from the cluster bus (Redis pub/sub).
    pub pubsub_in: AtomicU64,
    /// Messages published to the cluster bus.
    pub pubsub_out: AtomicU64,
    /// Channel publications this node's subscription missed and read back
    /// from the channel's history.
    pub history_filled: AtomicU64,
    /// Channel publications this node's subscription missed that were no
    /// longer in the channel's history (trimmed, expired or lost).
    pub history_missed: AtomicU64,
    /// Sessions granted by ResumeHandshakes, by outcome
    /// ([`SESSION_OUTCOMES`] order).
    pub sessions_by_outcome: [AtomicU64; SESSION_OUTCOMES.len()],
    /// QUIC packets lost, over all connections.
    pub quic_lost_packets: AtomicU64,
    /// From receiving a message to queueing it for local recipients.
    pub delivery_local: Histogram,
    /// From receiving a direct message to the target node's receipt.
    pub delivery_cross_node: Histogram,
    /// Redis pipeline and heartbeat round trips.
    pub redis_command: Histogram,
    /// QUIC round-trip time of clients, sampled at scrape and at close.
    pub quic_rtt: Histogram,
}

/// The outcomes sessions are counted by.
pub const SESSION_OUTCOMES: [SessionOutcome; 8] = [
    SessionOutcome::New,
    SessionOutcome::Resumed,
    SessionOutcome::Expired,
    SessionOutcome::AlreadyUsed,
    SessionOutcome::Invalid,
    SessionOutcome::WrongUser,
    SessionOutcome::Disabled,
    SessionOutcome::Refreshed,
];

fn latency_histogram() -> Histogram {
    // 10 µs to about 10 s.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 21))
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            connections_total: AtomicU64::new(0),
            connections_by_transport: counters(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            node_busy: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            rate_limit_disconnects: AtomicU64::new(0),
            messages_in_by_type: counters(),
            messages_out_by_type: counters(),
            errors_by_code: counters(),
            refused_by_reason: counters(),
            pubsub_in: AtomicU64::new(0),
            pubsub_out: AtomicU64::new(0),
            history_filled: AtomicU64::new(0),
            history_missed: AtomicU64::new(0),
            sessions_by_outcome: counters(),
            quic_lost_packets: AtomicU64::new(0),
            delivery_local: latency_histogram(),
            delivery_cross_node: latency_histogram(),
            redis_command: latency_histogram(),
            quic_rtt: latency_histogram(),
        }
    }
}

/// Adds `n` to a counter (relaxed: these are statistics, not synchronisation).
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn sum(counters: &[AtomicU64]) -> u64 {
    counters.iter().map(get).sum()
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Stats {
    /// Counts one inbound frame of type `tag` and `bytes` on the wire.
    pub(crate) fn frame_in(&self, tag: usize, bytes: usize) {
        add(&self.bytes_in, bytes as u64);
        if let Some(c) = self.messages_in_by_type.get(tag) {
            add(c, 1);
        }
    }

    /// Counts one frame of type `tag` queued to a client.
    pub(crate) fn frame_out(&self, tag: usize, bytes: usize) {
        add(&self.bytes_out, bytes as u64);
        if let Some(c) = self.messages_out_by_type.get(tag) {
            add(c, 1);
        }
    }

    /// Counts one Error frame with `code`.
    pub(crate) fn error(&self, code: u16) {
        let slot = usize::from(code).min(ERROR_CODE_SLOTS - 1);
        add(&self.errors_by_code[slot], 1);
    }

    /// Counts one session granted with `outcome`.
    pub(crate) fn session(&self, outcome: SessionOutcome) {
        if let Some(i) = SESSION_OUTCOMES.iter().position(|o| *o == outcome) {
            add(&self.sessions_by_outcome[i], 1);
        }
    }

    /// Counts one connection refused for `reason`.
    pub(crate) fn refused(&self, reason: RefusedReason) {
        if let Some(i) = RefusedReason::ALL.iter().position(|r| *r == reason) {
            add(&self.refused_by_reason[i], 1);
        }
    }

    /// Frames received from clients (all types).
    pub fn messages_in(&self) -> u64 {
        sum(&self.messages_in_by_type)
    }

    /// Frames queued to clients (all types).
    pub fn messages_out(&self) -> u64 {
        sum(&self.messages_out_by_type)
    }

    /// Error frames sent (all codes).
    pub fn errors(&self) -> u64 {
        sum(&self.errors_by_code)
    }

    /// Connections refused or ended before becoming clients for `reason`.
    pub fn refused_count(&self, reason: RefusedReason) -> u64 {
        RefusedReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| get(&self.refused_by_reason[i]))
    }

    /// Connection attempts refused by admission control, before TLS.
    pub fn refused_before_tls(&self) -> u64 {
        [
            RefusedReason::PendingHandshakes,
            RefusedReason::IpRate,
            RefusedReason::IpConnections,
        ]
        .into_iter()
        .map(|r| self.refused_count(r))
        .sum()
    }

    /// Time since the node started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A consistent-enough copy for a Stats frame.
    pub fn snapshot(&self, node_id: NodeId, server_name: &str, clients: usize) -> NodeStats {
        NodeStats {
            node_id,
            server_name: server_name.to_owned(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            clients_connected: clients as u64,
            connections_total: get(&self.connections_total),
            messages_in: self.messages_in(),
            messages_out: self.messages_out(),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            errors: self.errors(),
            slow_consumer_disconnects: get(&self.slow_consumer_disconnects),
        }
    }
}
