//! Node configuration: one struct ([`NodeConfig`]) whose `Default` is a node
//! that works out of the box, filled from an optional TOML file, then
//! environment variables (`FABRIC_*`), then command-line flags ([`NodeArgs`]),
//! each overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::protocol::{DEFAULT_MAX_FRAME_BYTES, HARD_MAX_FRAME_BYTES, MAX_NAME_BYTES, NodeId};

/// When the node asks new connections to prove their address with a QUIC
/// Retry (one extra round trip; spoofed source addresses cannot answer it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AddressValidation {
    /// Every connection.
    Always,
    /// Only while more than half of `max_pending_handshakes` are in use.
    #[default]
    UnderLoad,
    /// Never.
    Never,
}

/// Shortest HS256 secret accepted: 256 bits, as RFC 7518 §3.2 requires.
pub const MIN_SECRET_BYTES: usize = 32;

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this struct.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a node needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Human-readable node name, reported in HandshakeAck and stats.
    pub name: String,
    /// Node id; a fresh random one when unset, so restarts look like new nodes.
    pub node_id: Option<NodeId>,
    /// Where dev certificates are generated and looked up.
    pub certs_dir: PathBuf,
    /// Certificate chain (PEM). With `key`, replaces the generated dev certificate.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for `cert`.
    pub key: Option<PathBuf>,
    /// Names (DNS or IP) the generated dev certificate is valid for.
    pub cert_names: Vec<String>,
    /// Clients this node accepts at once; the next one is refused with SERVER_FULL.
    pub max_clients: usize,
    /// Connections allowed to be mid-handshake at once, beyond `max_clients`;
    /// further connection attempts are refused before TLS.
    pub max_pending_handshakes: usize,
    /// Largest frame payload accepted, in bytes (at most 16 MiB).
    pub max_message_bytes: usize,
    /// Time a new connection has to complete the application handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no packets for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How often the node sends QUIC keep-alives on quiet connections (0 = never).
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// Unidirectional streams a client may have open at once (at least 3: one per priority).
    pub max_streams_per_connection: u32,
    /// QUIC flow-control window per stream, in bytes.
    pub stream_receive_window: u32,
    /// QUIC flow-control window per connection, in bytes.
    pub connection_receive_window: u32,
    /// Unacknowledged bytes the node may have in flight per connection.
    pub send_window: u64,
    /// Messages queued per client and priority before it counts as a slow consumer.
    pub outbound_queue_len: usize,
    /// Bytes queued per client (all priorities) before it counts as a slow consumer.
    pub max_queued_bytes: usize,
    /// While the node-wide queue budget is exhausted, a client whose queue
    /// has held bytes without any being written for this long counts as a
    /// slow consumer and is disconnected, so clients that stopped reading
    /// cannot block everyone else whatever the budgets are.
    #[serde(with = "humantime_serde")]
    pub slow_consumer_stall: Duration,
    /// Most entries returned in one ClientList.
    pub max_list_clients: usize,
    /// On drain or shutdown, how long clients get to leave by themselves.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a draining node keeps refusing new connections (instead of
    /// vanishing) after it started draining, so that reconnects a load
    /// balancer still sends here are turned away at once.
    #[serde(with = "humantime_serde")]
    pub drain_linger: Duration,
    /// Redis URL (`redis://`, `rediss://`, with optional `user:password@`);
    /// unset runs a single node with the in-memory bus.
    pub redis_url: Option<String>,
    /// CA certificate (PEM) that a `rediss://` server must chain to, instead
    /// of the public web roots.
    pub redis_ca: Option<PathBuf>,
    /// Prefix of every Redis key and channel this cluster uses.
    pub redis_prefix: String,
    /// Time to establish a Redis connection.
    #[serde(with = "humantime_serde")]
    pub redis_connect_timeout: Duration,
    /// Time to wait for a Redis reply.
    #[serde(with = "humantime_serde")]
    pub redis_response_timeout: Duration,
    /// A node that stops refreshing its heartbeat for this long is dead: its
    /// clients leave presence and nothing is routed to it.
    #[serde(with = "humantime_serde")]
    pub node_ttl: Duration,
    /// How often a node refreshes its heartbeat (well below `node_ttl`).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long a cross-node direct message waits for the target node's
    /// delivery receipt before the sender gets CLUSTER_UNAVAILABLE.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Cluster operations queued for Redis before new ones fail fast.
    pub bus_queue_len: usize,
    /// Longest client name accepted in a handshake, in bytes (at most 1024).
    pub max_name_bytes: usize,
    /// Largest Handshake frame accepted from a not yet authenticated peer
    /// (capped by `max_message_bytes`).
    pub max_handshake_bytes: usize,
    /// Bytes queued for all clients together; beyond it new messages are
    /// refused with SERVER_BUSY instead of growing memory.
    pub max_total_queued_bytes: usize,
    /// Messages per second each client may send (0 = unlimited).
    pub rate_limit_messages: u32,
    /// Size of each client's token bucket: the frames it may send at once.
    /// The bucket starts full and refills at `rate_limit_messages` per
    /// second; the burst is the bucket's size, not added to the rate.
    pub rate_limit_burst: u32,
    /// Rate-limited frames tolerated within `rate_limit_strike_window`
    /// before the client is disconnected (close code 10).
    pub rate_limit_strikes: u32,
    /// Window for `rate_limit_strikes`.
    #[serde(with = "humantime_serde")]
    pub rate_limit_strike_window: Duration,
    /// Whether an anonymous client's rate-limit state follows its IP
    /// address across reconnects (an authenticated client's follows its
    /// user). Turn off behind a proxy that hides client addresses, where
    /// every anonymous client would inherit every other's debt.
    pub rate_limit_anonymous_by_ip: bool,
    /// Connections at once from one IP address (0 = unlimited).
    pub max_connections_per_ip: usize,
    /// New connections per second from one IP address (0 = unlimited).
    pub connection_rate_per_ip: u32,
    /// Size of each IP address's token bucket for new connections: the
    /// connections it may open at once (refilled at
    /// `connection_rate_per_ip` per second; not added to the rate).
    pub connection_burst_per_ip: u32,
    /// When new connections must prove their address with a QUIC Retry.
    pub address_validation: AddressValidation,
    /// HS256 shared secret (at least 32 bytes); turns JWT auth on. The key
    /// is the UTF-8 bytes of this string as they are (not base64-decoded),
    /// which is what other JWT libraries do with a string secret.
    pub auth_jwt_secret: Option<String>,
    /// Public key PEM (RSA → RS256, P-256 → ES256, Ed25519 → EdDSA); turns JWT auth on.
    pub auth_jwt_public_key: Option<PathBuf>,
    /// JWKS file (keys chosen by `kid`); turns JWT auth on.
    pub auth_jwks: Option<PathBuf>,
    /// Accepted token audiences (`aud`); empty = not checked.
    pub auth_audience: Vec<String>,
    /// Accepted token issuers (`iss`); empty = not checked.
    pub auth_issuer: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub auth_leeway: Duration,
    /// CA (PEM) client certificates must chain to; turns mutual TLS on.
    pub auth_client_ca: Option<PathBuf>,
    /// TCP address of the Prometheus endpoint (`GET /metrics`); off when unset.
    pub metrics_listen: Option<SocketAddr>,
    /// TCP address of the admin HTTP API; off when unset.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin API requires (mandatory when `admin_listen`
    /// is not a loopback address).
    pub admin_token: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            name: "quic-fabric".into(),
            node_id: None,
            certs_dir: PathBuf::from("certs"),
            cert: None,
            key: None,
            cert_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            max_clients: 10_000,
            max_pending_handshakes: 1_000,
            max_message_bytes: DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::from_secs(10),
            max_streams_per_connection: 3,
            stream_receive_window: 1024 * 1024,
            connection_receive_window: 4 * 1024 * 1024,
            send_window: 4 * 1024 * 1024,
            outbound_queue_len: 1024,
            max_queued_bytes: 16 * 1024 * 1024,
            slow_consumer_stall: Duration::from_secs(2),
            max_list_clients: 10_000,
            shutdown_grace: Duration::from_secs(5),
            drain_linger: Duration::from_secs(2),
            redis_url: None,
            redis_ca: None,
            redis_prefix: "fabric".into(),
            redis_connect_timeout: Duration::from_secs(1),
            redis_response_timeout: Duration::from_secs(1),
            node_ttl: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            delivery_timeout: Duration::from_secs(5),
            bus_queue_len: 65_536,
            max_name_bytes: MAX_NAME_BYTES,
            max_handshake_bytes: 16 * 1024,
            max_total_queued_bytes: 1024 * 1024 * 1024,
            rate_limit_messages: 1_000,
            rate_limit_burst: 2_000,
            rate_limit_strikes: 1_000,
            rate_limit_strike_window: Duration::from_secs(10),
            rate_limit_anonymous_by_ip: true,
            max_connections_per_ip: 256,
            connection_rate_per_ip: 20,
            connection_burst_per_ip: 100,
            address_validation: AddressValidation::UnderLoad,
            auth_jwt_secret: None,
            auth_jwt_public_key: None,
            auth_jwks: None,
            auth_audience: Vec::new(),
            auth_issuer: Vec::new(),
            auth_leeway: Duration::from_secs(30),
            auth_client_ca: None,
            metrics_listen: None,
            admin_listen: None,
            admin_token: None,
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Checks ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.max_message_bytes == 0 || self.max_message_bytes > HARD_MAX_FRAME_BYTES {
            return invalid(format!(
                "max_message_bytes must be 1..={HARD_MAX_FRAME_BYTES}, got {}",
                self.max_message_bytes
            ));
        }
        if self.max_clients == 0 {
            return invalid("max_clients must be at least 1".into());
        }
        if self.max_streams_per_connection < 3 {
            return invalid(format!(
                "max_streams_per_connection must be at least 3 (one per priority), got {}",
                self.max_streams_per_connection
            ));
        }
        if self.outbound_queue_len == 0 {
            return invalid("outbound_queue_len must be at least 1".into());
        }
        if self.max_queued_bytes < self.max_message_bytes {
            return invalid(format!(
                "max_queued_bytes ({}) must be at least max_message_bytes ({})",
                self.max_queued_bytes, self.max_message_bytes
            ));
        }
        if self.slow_consumer_stall.is_zero() {
            return invalid("slow_consumer_stall must be above zero".into());
        }
        if self.idle_timeout.is_zero() {
            return invalid("idle_timeout must be above zero".into());
        }
        if !self.keep_alive_interval.is_zero() && self.keep_alive_interval >= self.idle_timeout {
            return invalid(format!(
                "keep_alive_interval ({:?}) must be below idle_timeout ({:?})",
                self.keep_alive_interval, self.idle_timeout
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return invalid("--cert and --key go together".into());
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval * 2 > self.node_ttl {
            return invalid(format!(
                "heartbeat_interval ({:?}) must be above zero and at most half of node_ttl ({:?})",
                self.heartbeat_interval, self.node_ttl
            ));
        }
        if self.node_ttl < Duration::from_millis(100) {
            return invalid("node_ttl must be at least 100ms".into());
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(char::is_whitespace) {
            return invalid("redis_prefix must be non-empty without spaces".into());
        }
        if self.bus_queue_len == 0 || self.delivery_timeout.is_zero() {
            return invalid("bus_queue_len and delivery_timeout must be above zero".into());
        }
        if self.name.is_empty() {
            return invalid("name must not be empty".into());
        }
        if self.max_name_bytes == 0 || self.max_name_bytes > 1024 {
            return invalid(format!(
                "max_name_bytes must be 1..=1024, got {}",
                self.max_name_bytes
            ));
        }
        if self.max_handshake_bytes < 256 {
            return invalid(format!(
                "max_handshake_bytes must be at least 256, got {}",
                self.max_handshake_bytes
            ));
        }
        // A ClientList must fit in one frame, or the request goes unanswered.
        let entry_bytes =
            16 + 16 + 8 + self.max_name_bytes + 1 + 8 + crate::protocol::MAX_USER_BYTES + 8;
        if self.max_list_clients == 0
            || self.max_list_clients.saturating_mul(entry_bytes) > HARD_MAX_FRAME_BYTES - 1024
        {
            return invalid(format!(
                "max_list_clients must be 1..={} with max_name_bytes {} (a client list must fit in one 16 MiB frame), got {}",
                (HARD_MAX_FRAME_BYTES - 1024) / entry_bytes,
                self.max_name_bytes,
                self.max_list_clients
            ));
        }
        if self.max_total_queued_bytes < self.max_queued_bytes {
            return invalid(format!(
                "max_total_queued_bytes ({}) must be at least max_queued_bytes ({})",
                self.max_total_queued_bytes, self.max_queued_bytes
            ));
        }
        if self.rate_limit_messages > 0 && self.rate_limit_burst < self.rate_limit_messages.min(1) {
            return invalid("rate_limit_burst must be at least 1".into());
        }
        if self.rate_limit_strike_window.is_zero() {
            return invalid("rate_limit_strike_window must be above zero".into());
        }
        let key_sources = [
            self.auth_jwt_secret.is_some(),
            self.auth_jwt_public_key.is_some(),
            self.auth_jwks.is_some(),
        ];
        if key_sources.iter().filter(|on| **on).count() > 1 {
            return invalid(
                "choose one of --auth-jwt-secret, --auth-jwt-public-key and --auth-jwks".into(),
            );
        }
        if let Some(admin) = self.admin_listen
            && !admin.ip().is_loopback()
            && self.admin_token.is_none()
        {
            return invalid(format!(
                "the admin API on {admin} is reachable beyond this host: set --admin-token"
            ));
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return invalid("admin_token must be at least 16 characters".into());
        }
        if let Some(secret) = &self.auth_jwt_secret
            && secret.len() < MIN_SECRET_BYTES
        {
            return invalid(format!(
                "the JWT secret must be at least {} bytes (256 bits)",
                MIN_SECRET_BYTES
            ));
        }
        Ok(())
    }
}

/// Node flags; every one also reads a `FABRIC_*` environment variable.
/// Unset flags leave the file's (or the default) value alone.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML config file; flags and environment override it.
    #[arg(long, env = "FABRIC_CONFIG")]
    pub config: Option<PathBuf>,
    /// UDP address to listen on [default: 0.0.0.0:4433].
    #[arg(long, env = "FABRIC_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Node name shown to clients [default: quic-fabric].
    #[arg(long, env = "FABRIC_NAME")]
    pub name: Option<String>,
    /// Node id (uuid) [default: random at each start].
    #[arg(long, env = "FABRIC_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// Directory for generated dev certificates [default: certs].
    #[arg(long = "certs", env = "FABRIC_CERTS")]
    pub certs_dir: Option<PathBuf>,
    /// Certificate chain PEM file (instead of the generated dev certificate).
    #[arg(long, env = "FABRIC_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key PEM file for --cert.
    #[arg(long, env = "FABRIC_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Comma-separated names for the dev certificate [default: localhost,127.0.0.1,::1].
    #[arg(long, env = "FABRIC_CERT_NAMES", value_delimiter = ',')]
    pub cert_names: Option<Vec<String>>,
    /// Maximum connected clients [default: 10000].
    #[arg(long, env = "FABRIC_MAX_CLIENTS")]
    pub max_clients: Option<usize>,
    /// Maximum connections mid-handshake [default: 1000].
    #[arg(long, env = "FABRIC_MAX_PENDING_HANDSHAKES")]
    pub max_pending_handshakes: Option<usize>,
    /// Maximum frame payload in bytes [default: 1048576].
    #[arg(long, env = "FABRIC_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Time allowed for the application handshake, e.g. 10s [default: 10s].
    #[arg(long, env = "FABRIC_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Close connections silent for this long, e.g. 30s [default: 30s].
    #[arg(long, env = "FABRIC_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// QUIC keep-alive interval, 0s to disable [default: 10s].
    #[arg(long, env = "FABRIC_KEEP_ALIVE", value_parser = humantime::parse_duration)]
    pub keep_alive_interval: Option<Duration>,
    /// Concurrent unidirectional streams per client, at least 3 [default: 3].
    #[arg(long, env = "FABRIC_MAX_STREAMS")]
    pub max_streams_per_connection: Option<u32>,
    /// Per-stream receive window in bytes [default: 1048576].
    #[arg(long, env = "FABRIC_STREAM_RECEIVE_WINDOW")]
    pub stream_receive_window: Option<u32>,
    /// Per-connection receive window in bytes [default: 4194304].
    #[arg(long, env = "FABRIC_CONNECTION_RECEIVE_WINDOW")]
    pub connection_receive_window: Option<u32>,
    /// Per-connection send window in bytes [default: 4194304].
    #[arg(long, env = "FABRIC_SEND_WINDOW")]
    pub send_window: Option<u64>,
    /// Queued messages per client and priority before disconnecting it as slow [default: 1024].
    #[arg(long, env = "FABRIC_OUTBOUND_QUEUE_LEN")]
    pub outbound_queue_len: Option<usize>,
    /// Queued bytes per client before disconnecting it as slow [default: 16777216].
    #[arg(long, env = "FABRIC_MAX_QUEUED_BYTES")]
    pub max_queued_bytes: Option<usize>,
    /// Stall after which, while the node's queue memory is exhausted, a
    /// client that stopped reading is disconnected as slow [default: 2s].
    #[arg(long, env = "FABRIC_SLOW_CONSUMER_STALL", value_parser = humantime::parse_duration)]
    pub slow_consumer_stall: Option<Duration>,
    /// Most entries in one client list [default: 10000].
    #[arg(long, env = "FABRIC_MAX_LIST_CLIENTS")]
    pub max_list_clients: Option<usize>,
    /// Time clients get to leave a draining node [default: 5s].
    #[arg(long, env = "FABRIC_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Time a draining node keeps refusing new connections [default: 2s].
    #[arg(long, env = "FABRIC_DRAIN_LINGER", value_parser = humantime::parse_duration)]
    pub drain_linger: Option<Duration>,
    /// Redis URL for clustering, e.g. redis://127.0.0.1:6379 [default: none, single node].
    #[arg(long = "redis", env = "FABRIC_REDIS_URL")]
    pub redis_url: Option<String>,
    /// CA certificate (PEM) for a rediss:// server [default: public web roots].
    #[arg(long, env = "FABRIC_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,
    /// Prefix of Redis keys and channels [default: fabric].
    #[arg(long, env = "FABRIC_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Redis connection timeout [default: 1s].
    #[arg(long, env = "FABRIC_REDIS_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub redis_connect_timeout: Option<Duration>,
    /// Redis response timeout [default: 1s].
    #[arg(long, env = "FABRIC_REDIS_RESPONSE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub redis_response_timeout: Option<Duration>,
    /// Heartbeat TTL: a silent node is dead after this [default: 10s].
    #[arg(long, env = "FABRIC_NODE_TTL", value_parser = humantime::parse_duration)]
    pub node_ttl: Option<Duration>,
    /// Heartbeat refresh interval [default: 2s].
    #[arg(long, env = "FABRIC_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Wait for a cross-node delivery receipt [default: 5s].
    #[arg(long, env = "FABRIC_DELIVERY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub delivery_timeout: Option<Duration>,
    /// Cluster operations queued for Redis [default: 65536].
    #[arg(long, env = "FABRIC_BUS_QUEUE_LEN")]
    pub bus_queue_len: Option<usize>,
    /// Longest client name in bytes [default: 64].
    #[arg(long, env = "FABRIC_MAX_NAME_BYTES")]
    pub max_name_bytes: Option<usize>,
    /// Largest Handshake frame in bytes [default: 16384].
    #[arg(long, env = "FABRIC_MAX_HANDSHAKE_BYTES")]
    pub max_handshake_bytes: Option<usize>,
    /// Bytes queued for all clients together [default: 1073741824].
    #[arg(long, env = "FABRIC_MAX_TOTAL_QUEUED_BYTES")]
    pub max_total_queued_bytes: Option<usize>,
    /// Messages per second per client, 0 = unlimited [default: 1000].
    #[arg(long, alias = "rate-limit", env = "FABRIC_RATE_LIMIT")]
    pub rate_limit_messages: Option<u32>,
    /// Frames a client may send at once: its token bucket's size, refilled at --rate-limit per second [default: 2000].
    #[arg(long, env = "FABRIC_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Rate-limited frames within the strike window before disconnecting [default: 1000].
    #[arg(long, env = "FABRIC_RATE_LIMIT_STRIKES")]
    pub rate_limit_strikes: Option<u32>,
    /// Strike window [default: 10s].
    #[arg(long, env = "FABRIC_RATE_LIMIT_STRIKE_WINDOW", value_parser = humantime::parse_duration)]
    pub rate_limit_strike_window: Option<Duration>,
    /// Remember anonymous clients' rate-limit state by IP across reconnects
    /// (false behind a proxy that hides client addresses) [default: true].
    #[arg(long, env = "FABRIC_RATE_LIMIT_ANONYMOUS_BY_IP")]
    pub rate_limit_anonymous_by_ip: Option<bool>,
    /// Connections at once per IP address, 0 = unlimited [default: 256].
    #[arg(long, env = "FABRIC_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// New connections per second per IP address, 0 = unlimited [default: 20].
    #[arg(long, env = "FABRIC_CONNECTION_RATE_PER_IP")]
    pub connection_rate_per_ip: Option<u32>,
    /// New connections an IP address may open at once: its token bucket's size, refilled at --connection-rate-per-ip per second [default: 100].
    #[arg(long, env = "FABRIC_CONNECTION_BURST_PER_IP")]
    pub connection_burst_per_ip: Option<u32>,
    /// QUIC Retry (address validation) for new connections [default: under-load].
    #[arg(long, env = "FABRIC_ADDRESS_VALIDATION", value_enum)]
    pub address_validation: Option<AddressValidation>,
    /// Require a JWT signed with this HS256 secret (at least 32 bytes; its UTF-8 bytes are the key, not base64-decoded).
    #[arg(long, env = "FABRIC_AUTH_JWT_SECRET", hide_env_values = true)]
    pub auth_jwt_secret: Option<String>,
    /// Require a JWT signed by this public key (PEM: RSA, P-256 or Ed25519).
    #[arg(long, env = "FABRIC_AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<PathBuf>,
    /// Require a JWT signed by a key of this JWKS file (chosen by kid).
    #[arg(long, env = "FABRIC_AUTH_JWKS")]
    pub auth_jwks: Option<PathBuf>,
    /// Accepted token audience (repeat or comma-separate for several).
    #[arg(long, env = "FABRIC_AUTH_AUDIENCE", value_delimiter = ',')]
    pub auth_audience: Option<Vec<String>>,
    /// Accepted token issuer (repeat or comma-separate for several).
    #[arg(long, env = "FABRIC_AUTH_ISSUER", value_delimiter = ',')]
    pub auth_issuer: Option<Vec<String>>,
    /// Clock skew tolerated on exp/nbf [default: 30s].
    #[arg(long, env = "FABRIC_AUTH_LEEWAY", value_parser = humantime::parse_duration)]
    pub auth_leeway: Option<Duration>,
    /// Require client certificates signed by this CA (mutual TLS).
    #[arg(long, env = "FABRIC_AUTH_CLIENT_CA")]
    pub auth_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9090 [default: off].
    #[arg(long = "metrics", env = "FABRIC_METRICS")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the admin HTTP API on ADDR, e.g. 127.0.0.1:9091 [default: off].
    #[arg(long = "admin", env = "FABRIC_ADMIN")]
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token for the admin API (required unless it listens on loopback).
    #[arg(long, env = "FABRIC_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl NodeArgs {
    /// Builds the config: defaults, then `--config` file, then these flags
    /// (which clap has already merged with the environment). Validated.
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        macro_rules! overlay {
            ($($field:ident),* $(,)?) => {
                $(if let Some(value) = self.$field { config.$field = value; })*
            };
        }
        overlay!(
            listen,
            name,
            certs_dir,
            cert_names,
            max_clients,
            max_pending_handshakes,
            max_message_bytes,
            handshake_timeout,
            idle_timeout,
            keep_alive_interval,
            max_streams_per_connection,
            stream_receive_window,
            connection_receive_window,
            send_window,
            outbound_queue_len,
            max_queued_bytes,
            slow_consumer_stall,
            max_list_clients,
            shutdown_grace,
            drain_linger,
            redis_prefix,
            redis_connect_timeout,
            redis_response_timeout,
            node_ttl,
            heartbeat_interval,
            delivery_timeout,
            bus_queue_len,
            max_name_bytes,
            max_handshake_bytes,
            max_total_queued_bytes,
            rate_limit_messages,
            rate_limit_burst,
            rate_limit_strikes,
            rate_limit_strike_window,
            rate_limit_anonymous_by_ip,
            max_connections_per_ip,
            connection_rate_per_ip,
            connection_burst_per_ip,
            address_validation,
            auth_audience,
            auth_issuer,
            auth_leeway,
        );
        macro_rules! overlay_optional {
            ($($field:ident),* $(,)?) => {
                $(if self.$field.is_some() { config.$field = self.$field; })*
            };
        }
        overlay_optional!(
            auth_jwt_secret,
            auth_jwt_public_key,
            auth_jwks,
            auth_client_ca,
            metrics_listen,
            admin_listen,
            admin_token
        );
        if self.redis_url.is_some() {
            config.redis_url = self.redis_url;
        }
        if self.redis_ca.is_some() {
            config.redis_ca = self.redis_ca;
        }
        if self.node_id.is_some() {
            config.node_id = self.node_id;
        }
        if self.cert.is_some() {
            config.cert = self.cert;
            config.key = self.key;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "name = \"from-file\"\nmax_clients = 7\nidle_timeout = \"45s\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--max-clients",
            "9",
        ]);
        let config = cli.node.into_config().unwrap();
        assert_eq!(config.name, "from-file");
        assert_eq!(config.max_clients, 9);
        assert_eq!(config.idle_timeout, Duration::from_secs(45));
        assert_eq!(config.listen, NodeConfig::default().listen);
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "max_clientz = 7\n").unwrap();
        let err = NodeConfig::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("max_clientz"), "{err}");

        let config = NodeConfig {
            max_list_clients: 100_000,
            ..Default::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("1..=44499"),
            "a list must fit one frame: {err}"
        );

        let config = NodeConfig {
            max_streams_per_connection: 2,
            ..Default::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("at least 3")
        );
    }
}
