//! The node's QUIC server (the seed's QuicWebSocketServer): binds the
//! endpoint, runs the accept loop with admission control, and shuts down
//! gracefully: stop accepting, Goodbye to every client, drain queues for up
//! to a grace period, close the endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use tokio::sync::mpsc;

use crate::auth::Authenticator;
use crate::bus::memory::{MemoryBus, MemoryCluster};
use crate::bus::redis_bus::{RedisBus, RedisBusConfig};
use crate::bus::{Bus, BusMessage, ClusterBus};
use crate::client_manager::{ClientManager, QueueBudget};
use crate::config::NodeConfig;
use crate::limits::{Admission, Admit, RateLimits, Refusal};
use crate::protocol::{NodeId, close_code};
use crate::router::Router;
use crate::stats::RefusedReason;
use crate::stats::Stats;
use crate::tls::{self, TlsError};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Certificates could not be loaded or generated.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be set up.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The cluster bus could not be set up (for example an invalid Redis URL).
    #[error("cluster bus: {0}")]
    Bus(String),
    /// A transport setting is out of range.
    #[error("invalid transport setting: {0}")]
    Transport(String),
    /// Authentication keys could not be loaded.
    #[error("authentication: {0}")]
    Auth(#[from] crate::auth::AuthSetupError),
}

/// State shared by every task of a node.
pub struct Shared {
    /// The configuration the node runs with.
    pub config: NodeConfig,
    /// This node's id.
    pub node_id: NodeId,
    /// Connected clients.
    pub clients: Arc<ClientManager>,
    /// Message delivery, local and across the cluster.
    pub router: Arc<Router>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Verifies Handshake tokens when JWT auth is on.
    pub auth: Option<Authenticator>,
    /// Admission control for new connections.
    pub admission: Admission,
    /// Per-client message rate limits, remembered across reconnects.
    pub rate_limits: RateLimits,
    /// Bytes queued for all clients together.
    pub queue_budget: Arc<QueueBudget>,
    /// Cancelled when the node starts draining (SIGTERM, shutdown or the
    /// admin API's `POST /drain`).
    pub drain: CancellationToken,
}

impl Shared {
    /// Whether the node is draining (no new clients; clients told to leave).
    pub fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Starts draining: the node stops taking clients, asks every client
    /// to reconnect elsewhere, waits up to `shutdown_grace` for them to
    /// leave, then stops (`Server::run` returns).
    pub fn start_drain(&self) {
        self.drain.cancel();
    }

    /// Why the node is not ready for new clients, if it is not: draining,
    /// or (in cluster mode) the cluster bus unreachable.
    pub fn not_ready(&self) -> Option<String> {
        if self.draining() {
            return Some("draining".into());
        }
        let bus = self.router.bus();
        if bus.clustered() && !bus.available() {
            return Some("cluster bus (Redis) unreachable".into());
        }
        None
    }
}

/// A bound, not yet running node.
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    inbox: mpsc::Receiver<BusMessage>,
    metrics: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
}

fn bind_tcp(addr: Option<SocketAddr>) -> Result<Option<std::net::TcpListener>, ServerError> {
    let Some(addr) = addr else { return Ok(None) };
    let bind_error = |source| ServerError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(Some(listener))
}

/// Which cluster bus a node joins.
pub enum BusChoice {
    /// From the config: Redis when `redis_url` is set, else a lone in-memory node.
    FromConfig,
    /// A shared in-process cluster (several nodes in one process).
    Memory(Arc<MemoryCluster>),
}

/// UDP socket buffer size asked for; the kernel caps it at its `rmem_max`/`wmem_max`.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

impl Server {
    /// Loads or generates certificates and binds the UDP socket. Joins the
    /// Redis cluster when `redis_url` is set, else runs alone.
    pub fn bind(config: NodeConfig) -> Result<Self, ServerError> {
        Self::bind_with(config, BusChoice::FromConfig)
    }

    /// Like [`Server::bind`], choosing the cluster bus explicitly.
    pub fn bind_with(config: NodeConfig, bus: BusChoice) -> Result<Self, ServerError> {
        config.validate()?;
        let endpoint = endpoint(&config)?;
        let metrics = bind_tcp(config.metrics_listen)?;
        let admin = bind_tcp(config.admin_listen)?;

        let node_id = config.node_id.unwrap_or_else(NodeId::new_random);
        let stats = Arc::new(Stats::default());
        let clients = Arc::new(ClientManager::new(config.max_clients));
        let (inbox_tx, inbox) = mpsc::channel(config.bus_queue_len);
        let bus = match (bus, &config.redis_url) {
            (BusChoice::Memory(cluster), _) => {
                Bus::Memory(MemoryBus::join(cluster, node_id, inbox_tx))
            }
            (BusChoice::FromConfig, None) => Bus::Memory(MemoryBus::single(node_id, inbox_tx)),
            (BusChoice::FromConfig, Some(url)) => Bus::Redis(
                RedisBus::new(
                    RedisBusConfig {
                        url: url.clone(),
                        ca_pem: match &config.redis_ca {
                            Some(path) => Some(std::fs::read(path).map_err(|e| {
                                ServerError::Bus(format!("cannot read {}: {e}", path.display()))
                            })?),
                            None => None,
                        },
                        prefix: config.redis_prefix.clone(),
                        node_id,
                        node_name: config.name.clone(),
                        connect_timeout: config.redis_connect_timeout,
                        response_timeout: config.redis_response_timeout,
                        node_ttl: config.node_ttl,
                        heartbeat_interval: config.heartbeat_interval,
                        queue_len: config.bus_queue_len,
                    },
                    clients.clone(),
                    inbox_tx,
                    stats.clone(),
                )
                .map_err(|e| ServerError::Bus(e.to_string()))?,
            ),
        };
        let router = Router::new(
            node_id,
            clients.clone(),
            bus,
            config.delivery_timeout,
            config.bus_queue_len,
            stats.clone(),
        );
        let shared = Arc::new(Shared {
            node_id,
            router: Arc::new(router),
            clients,
            stats,
            drain: CancellationToken::new(),
            auth: Authenticator::from_config(&config)?,
            admission: Admission::new(&config),
            rate_limits: RateLimits::new(&config),
            queue_budget: QueueBudget::new(config.max_total_queued_bytes),
            config,
        });
        Ok(Server {
            endpoint,
            shared,
            inbox,
            metrics,
            admin,
        })
    }

    /// The address the node actually listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// Where the metrics endpoint listens, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the admin API listens, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// The node's shared state (registry, counters).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves clients until `shutdown` completes or a drain is requested
    /// ([`Shared::start_drain`]), then drains: new connections are refused,
    /// every client gets a Goodbye with a reconnect cue and `shutdown_grace`
    /// to leave; then the node leaves the cluster and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            endpoint,
            shared,
            inbox,
            metrics,
            admin,
        } = self;
        let http_cancel = CancellationToken::new();
        let http: Vec<_> = [
            (metrics, "metrics", crate::metrics::router(shared.clone())),
            (admin, "admin API", crate::admin::router(shared.clone())),
        ]
        .into_iter()
        .filter_map(|(listener, what, app)| serve_http(listener?, what, app, http_cancel.clone()))
        .collect();
        let cancel = CancellationToken::new();
        let bus_cancel = CancellationToken::new();
        shared.router.start(inbox, bus_cancel.clone());
        tokio::spawn(crate::client_manager::reclaim(
            shared.clients.clone(),
            shared.queue_budget.clone(),
            shared.config.slow_consumer_stall,
            bus_cancel.clone(),
        ));
        let tracker = TaskTracker::new();
        let mut forget = tokio::time::interval(Duration::from_secs(60));
        info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
              node_id = %shared.node_id, name = %shared.config.name, "node listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = shared.drain.cancelled() => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    match shared.admission.admit(remote.ip(), incoming.remote_address_validated()) {
                        Admit::Accept(permit) => {
                            tracker.spawn(crate::connection::serve(incoming, permit, shared.clone(), cancel.clone()));
                        }
                        Admit::Retry => {
                            debug!(%remote, "asking for address validation (Retry)");
                            if let Err(err) = incoming.retry() {
                                // Only fails if the address was validated already.
                                debug!(%remote, ?err, "cannot send Retry");
                                err.into_incoming().refuse();
                            }
                        }
                        Admit::Refuse(why) => {
                            shared.stats.refused(match why {
                                Refusal::TooManyPending => RefusedReason::PendingHandshakes,
                                Refusal::IpRate => RefusedReason::IpRate,
                                Refusal::IpConnections => RefusedReason::IpConnections,
                            });
                            debug!(%remote, reason = why.as_str(), "connection refused before TLS");
                            incoming.refuse();
                        }
                    }
                }
                _ = forget.tick() => {
                    shared.admission.forget_idle();
                    shared.rate_limits.forget_idle();
                }
            }
        }
        shared.drain.cancel();
        info!(
            clients = shared.clients.len(),
            grace = ?shared.config.shutdown_grace,
            "draining: refusing new connections, asking clients to reconnect elsewhere"
        );
        cancel.cancel();
        tracker.close();
        let drain_started = tokio::time::Instant::now();
        let deadline = tokio::time::sleep(shared.config.shutdown_grace + Duration::from_secs(2));
        tokio::pin!(deadline);
        // Once every client left, go on refusing for `drain_linger`: a load
        // balancer still sends some reconnect attempts here, and a refusal
        // sends them elsewhere at once where silence would cost them their
        // connect timeout.
        let linger = async {
            tracker.wait().await;
            tokio::time::sleep_until(drain_started + shared.config.drain_linger).await;
        };
        tokio::pin!(linger);
        loop {
            tokio::select! {
                _ = &mut linger => break,
                _ = &mut deadline => {
                    warn!("connections still open after the grace period; closing them");
                    break;
                }
                // Refused at once, so a reconnecting client tries elsewhere
                // instead of waiting for a timeout.
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        shared.stats.refused(RefusedReason::Draining);
                        incoming.refuse();
                    }
                    None => break,
                },
            }
        }
        endpoint.set_server_config(None);
        // Connections are gone (their presence removals are queued); now
        // leave the cluster so nothing more is routed here.
        shared.router.leave().await;
        bus_cancel.cancel();
        http_cancel.cancel();
        for task in http {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        endpoint.close(close_code::SHUTDOWN.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        info!("node stopped");
    }
}

/// Serves `app` on `listener` until `cancel` (the metrics and admin
/// listeners).
fn serve_http(
    listener: std::net::TcpListener,
    what: &'static str,
    app: axum::Router,
    cancel: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            warn!(%err, what, "cannot serve HTTP listener");
            return None;
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(%addr, what, "HTTP listening");
    Some(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(%err, what, "HTTP listener failed");
        }
    }))
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// The node's QUIC endpoint: certificates (given or dev), TLS, transport
/// settings and UDP socket. The benchmark's raw-quinn floor uses it too, so
/// the two differ only in what runs on top.
pub fn endpoint(config: &NodeConfig) -> Result<quinn::Endpoint, ServerError> {
    let (certs, key) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (tls::load_certs(cert)?, tls::load_key(key)?),
        _ => {
            // Read under the certs directory's lock: a node renewing the
            // certificate at the same moment cannot swap one file of the pair.
            let dev = tls::load_dev_certs(&config.certs_dir, &config.cert_names)?;
            (dev.chain, dev.key)
        }
    };
    let endpoint_config = tls::endpoint_config(&key)?;
    let crypto = tls::server_crypto(certs, key, config.auth_client_ca.as_deref())?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport_config(config)?));
    let bind_error = |source| ServerError::Bind {
        addr: config.listen,
        source,
    };
    let socket = bind_socket(config.listen).map_err(bind_error)?;
    quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)
}

fn transport_config(config: &NodeConfig) -> Result<TransportConfig, ServerError> {
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(config.max_streams_per_connection))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(config.idle_timeout)
                .map_err(|e| ServerError::Transport(format!("idle_timeout: {e}")))?,
        ))
        .keep_alive_interval(
            (!config.keep_alive_interval.is_zero()).then_some(config.keep_alive_interval),
        )
        .stream_receive_window(VarInt::from_u32(config.stream_receive_window))
        .receive_window(VarInt::from_u32(config.connection_receive_window))
        .send_window(config.send_window);
    Ok(transport)
}

/// A UDP socket with enlarged buffers: quinn does not size them, and the
/// kernel default drops packets under bursts.
fn bind_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
