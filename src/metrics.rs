//! Prometheus metrics (`--metrics-listen ADDR`, `GET /metrics`), in the OpenMetrics
//! text format, with `prometheus-client`. The hot path only bumps atomics
//! and histograms in [`Stats`]; this module reads them
//! at scrape time, together with gauges computed on the spot (clients,
//! channels, queue memory, Redis state, QUIC round trips and losses).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::bus::ClusterBus;
use crate::link::Transport;
use crate::node::Node;
use crate::protocol::FRAME_NAMES;
use crate::stats::{ERROR_CODE_SLOTS, RefusedReason, Stats, get};

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders every metric of the node in the OpenMetrics text format.
pub fn render(node: &Arc<Node>) -> String {
    let mut registry = Registry::with_prefix("fabric");
    registry.register_collector(Box::new(NodeCollector { node: node.clone() }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The metrics listener's routes: `GET /metrics`.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/metrics", routing::get(metrics))
        .with_state(node)
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&node))
}

/// Reads the node's state at every scrape.
#[derive(Debug)]
struct NodeCollector {
    node: Arc<Node>,
}

type Enc<'a> = DescriptorEncoder<'a>;
type Res = Result<(), std::fmt::Error>;

fn counter(e: &mut Enc<'_>, name: &str, help: &str, unit: Option<&Unit>, value: u64) -> Res {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, unit, c.metric_type())?)
}

fn gauge(e: &mut Enc<'_>, name: &str, help: &str, unit: Option<&Unit>, value: i64) -> Res {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
}

/// A counter family with one label, from `(label value, count)` pairs.
fn labelled_counter<'v>(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl Iterator<Item = (&'v str, u64)>,
) -> Res {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, count) in values {
        let labels = [(label, value)];
        ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn labelled_gauge<'v>(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl Iterator<Item = (&'v str, i64)>,
) -> Res {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, level) in values {
        let labels = [(label, value)];
        ConstGauge::new(level).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histograms(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&str, &Histogram)],
) -> Res {
    let mut family =
        e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (value, histogram) in values {
        let labels = [(label, *value)];
        histogram.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = &self.node;
        let s: &Stats = node.stats();
        let clients = node.registry().all();
        sample_quic(s, &clients);

        gauge(
            &mut e,
            "clients_connected",
            "Clients connected to this node.",
            None,
            clients.len() as i64,
        )?;
        gauge(
            &mut e,
            "handshakes_pending",
            "Connections that have not finished the application handshake.",
            None,
            node.admission().pending() as i64,
        )?;
        gauge(
            &mut e,
            "draining",
            "1 while the node drains (no new clients).",
            None,
            i64::from(node.draining()),
        )?;
        gauge(
            &mut e,
            "ready",
            "1 when the node accepts clients (and, in cluster mode, reaches Redis).",
            None,
            i64::from(node.not_ready().is_none()),
        )?;
        gauge(
            &mut e,
            "uptime",
            "Time since the node started.",
            Some(&Unit::Seconds),
            s.uptime().as_secs() as i64,
        )?;
        let (channels, subscriptions) = node.channels().counts();
        gauge(
            &mut e,
            "channels_subscribed",
            "Channels with at least one subscriber on this node.",
            None,
            channels as i64,
        )?;
        gauge(
            &mut e,
            "channel_subscriptions",
            "Channel subscriptions of this node's clients.",
            None,
            subscriptions as i64,
        )?;
        let by_namespace = node.channels().subscriptions_by_namespace();
        labelled_gauge(
            &mut e,
            "namespace_subscriptions",
            "Channel subscriptions of this node's clients, by namespace (`default` for names without `:`).",
            "namespace",
            by_namespace
                .iter()
                .map(|(namespace, count)| (namespace.as_str(), *count as i64)),
        )?;
        counter(
            &mut e,
            "connections_accepted",
            "Clients admitted (handshake completed).",
            None,
            get(&s.connections_total),
        )?;
        labelled_counter(
            &mut e,
            "connections_by_transport",
            "Clients admitted (handshake completed), by transport: quic (native) or webtransport (browsers).",
            "transport",
            Transport::ALL
                .iter()
                .map(|t| (t.label(), get(&s.connections_by_transport[t.index()]))),
        )?;
        labelled_gauge(
            &mut e,
            "clients_by_transport",
            "Clients connected to this node, by transport.",
            "transport",
            Transport::ALL.iter().map(|t| {
                let n = clients.iter().filter(|c| c.transport() == Some(*t)).count();
                (t.label(), n as i64)
            }),
        )?;
        labelled_counter(
            &mut e,
            "connections_refused",
            "Connections refused or ended before becoming clients, by reason.",
            "reason",
            RefusedReason::ALL
                .iter()
                .zip(&s.refused_by_reason)
                .map(|(r, c)| (r.as_str(), get(c))),
        )?;
        labelled_counter(
            &mut e,
            "sessions",
            "Sessions granted to connections that asked for one (ResumeHandshake), by outcome: new, resumed, or a new one because the token's session was expired, already used, invalid or another user's (disabled: the node keeps none).",
            "outcome",
            crate::stats::SESSION_OUTCOMES
                .iter()
                .zip(&s.sessions_by_outcome)
                .map(|(o, c)| (o.name(), get(c))),
        )?;
        labelled_counter(
            &mut e,
            "messages_in",
            "Frames received from clients, by type.",
            "type",
            FRAME_NAMES
                .iter()
                .zip(&s.messages_in_by_type)
                .map(|(k, c)| (*k, get(c))),
        )?;
        labelled_counter(
            &mut e,
            "messages_out",
            "Frames queued to clients, by type.",
            "type",
            FRAME_NAMES
                .iter()
                .zip(&s.messages_out_by_type)
                .map(|(k, c)| (*k, get(c))),
        )?;
        counter(
            &mut e,
            "received",
            "Bytes received from clients (frames).",
            Some(&Unit::Bytes),
            get(&s.bytes_in),
        )?;
        counter(
            &mut e,
            "sent",
            "Bytes queued to clients (frames).",
            Some(&Unit::Bytes),
            get(&s.bytes_out),
        )?;
        let codes: Vec<(String, u64)> = s
            .errors_by_code
            .iter()
            .enumerate()
            .filter_map(|(code, c)| {
                let n = get(c);
                let label = if code == ERROR_CODE_SLOTS - 1 {
                    format!("{code}+")
                } else {
                    code.to_string()
                };
                (n > 0).then_some((label, n))
            })
            .collect();
        labelled_counter(
            &mut e,
            "errors",
            "Error frames sent to clients, by error code (PROTOCOL.md).",
            "code",
            codes.iter().map(|(l, n)| (l.as_str(), *n)),
        )?;
        counter(
            &mut e,
            "slow_consumer_disconnects",
            "Clients disconnected because they did not read fast enough.",
            None,
            get(&s.slow_consumer_disconnects),
        )?;
        counter(
            &mut e,
            "rate_limited",
            "Frames dropped by the per-client rate limit.",
            None,
            get(&s.rate_limited),
        )?;
        counter(
            &mut e,
            "rate_limit_disconnects",
            "Clients disconnected for sustained rate-limit abuse.",
            None,
            get(&s.rate_limit_disconnects),
        )?;
        counter(
            &mut e,
            "queue_full_rejections",
            "Messages refused because the node-wide queue memory was used up (SERVER_BUSY).",
            None,
            get(&s.node_busy),
        )?;
        gauge(
            &mut e,
            "outbound_queue",
            "Bytes queued for all clients, not yet written to QUIC.",
            Some(&Unit::Bytes),
            node.queue_budget().used() as i64,
        )?;
        histograms(
            &mut e,
            "delivery_latency",
            "From reading a message to queueing it for its recipients (local), or to the target node's delivery receipt (cross_node).",
            "path",
            &[
                ("local", &s.delivery_local),
                ("cross_node", &s.delivery_cross_node),
            ],
        )?;
        let bus = node.bus();
        if bus.clustered() {
            gauge(
                &mut e,
                "redis_up",
                "1 when the node's Redis connections work.",
                None,
                i64::from(bus.available()),
            )?;
            let mut h = e.encode_descriptor(
                "redis_command_duration",
                "Round trip of Redis pipelines (presence, publishes) and heartbeats.",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            s.redis_command
                .encode(h.encode_family(&[("op", "pipeline")])?)?;
            labelled_counter(
                &mut e,
                "pubsub_messages",
                "Cluster messages through Redis pub/sub, by direction.",
                "direction",
                [("in", get(&s.pubsub_in)), ("out", get(&s.pubsub_out))].into_iter(),
            )?;
            labelled_counter(
                &mut e,
                "history_gap_publications",
                "Channel publications the node's Redis subscription missed: read back from the channel's history (filled), or no longer there (missed).",
                "outcome",
                [
                    ("filled", get(&s.history_filled)),
                    ("missed", get(&s.history_missed)),
                ]
                .into_iter(),
            )?;
        }
        histograms(
            &mut e,
            "quic_rtt",
            "QUIC round-trip time of connected clients, sampled at every scrape and at disconnect.",
            "scope",
            &[("client", &s.quic_rtt)],
        )?;
        counter(
            &mut e,
            "quic_lost_packets",
            "QUIC packets the node considered lost, over all client connections.",
            None,
            get(&s.quic_lost_packets),
        )?;
        Ok(())
    }
}

/// Samples round trips and adds new packet losses of connected clients.
fn sample_quic(stats: &Stats, clients: &[Arc<crate::registry::ClientHandle>]) {
    for client in clients {
        if let Some(rtt) = client.rtt() {
            stats.quic_rtt.observe(rtt.as_secs_f64());
        }
        client.report_lost_packets();
    }
}
