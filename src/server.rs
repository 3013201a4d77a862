//! The node's QUIC server (the seed's QuicWebSocketServer): binds the
//! endpoint, runs the accept loop with admission control, and shuts down
//! gracefully: stop accepting, Goodbye to every client, let their queues
//! drain for up to a grace period, close the endpoint. The node itself
//! (state, clients, cluster) is a [`Node`]; this module wires it to QUIC
//! and to the metrics and admin HTTP listeners.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::NodeConfig;
use crate::limits::Admit;
use crate::node::{BusChoice, Node, NodeError};
use crate::protocol::{NodeId, close_code};
use crate::stats::RefusedReason;
use crate::tls::{self, TlsError};
use crate::web::WebDoor;

/// Bytes of unread datagrams a connection may hold (see `transport_config`).
const DATAGRAM_BUFFER: usize = 4096;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The node could not be set up (configuration, cluster bus, keys).
    #[error(transparent)]
    Node(#[from] NodeError),
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
    /// A transport setting is out of range.
    #[error("invalid transport setting: {0}")]
    Transport(String),
}

/// A bound, not yet running node.
pub struct Server {
    endpoint: quinn::Endpoint,
    node: Arc<Node>,
    metrics: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    /// The WebTransport door, when browsers may connect.
    web: Option<Arc<WebDoor>>,
    /// The `--web` listener (page and discovery endpoint).
    web_listener: Option<std::net::TcpListener>,
}

fn bind_tcp(addr: Option<SocketAddr>) -> Result<Option<std::net::TcpListener>, ServerError> {
    let Some(addr) = addr else { return Ok(None) };
    let bind_error = |source| ServerError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(Some(listener))
}

impl Server {
    /// Loads or generates certificates and binds the UDP socket. Joins the
    /// Redis cluster when `redis_url`, `redis_sentinel` or `redis_cluster` is set, else runs alone.
    pub fn bind(config: NodeConfig) -> Result<Self, ServerError> {
        Self::bind_with(config, BusChoice::FromConfig)
    }

    /// Like [`Server::bind`], choosing the cluster bus explicitly.
    pub fn bind_with(config: NodeConfig, bus: BusChoice) -> Result<Self, ServerError> {
        config.validate().map_err(NodeError::from)?;
        let (endpoint, web_cert) = node_endpoint(&config)?;
        let metrics = bind_tcp(config.metrics_listen)?;
        let admin = bind_tcp(config.admin_listen)?;
        let web = match web_cert {
            Some(cert) => {
                let addr = endpoint.local_addr().unwrap_or(config.listen);
                let door = WebDoor::new(&config, cert, addr)
                    .map_err(|m| NodeError::from(crate::config::ConfigError::Invalid(m)))?;
                Some(Arc::new(door))
            }
            None => None,
        };
        let web_listener = match (&web, config.web_listen) {
            (Some(_), listen) => bind_tcp(listen)?,
            (None, Some(addr)) => {
                warn!(%addr, "WebTransport is off, so the web page is not served");
                None
            }
            (None, None) => None,
        };
        let node = Node::new(config, bus)?;
        Ok(Server {
            endpoint,
            node,
            metrics,
            admin,
            web,
            web_listener,
        })
    }

    /// The address the node actually listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.node.config().listen)
    }

    /// Where the metrics endpoint listens, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the admin API listens, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where the web page and discovery endpoint listen, when enabled.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The SHA-256 hashes of the WebTransport dev certificate (what pages
    /// pass as `serverCertificateHashes`); empty with real certificates or
    /// without WebTransport.
    pub fn web_cert_hashes(&self) -> Vec<[u8; 32]> {
        self.web
            .as_ref()
            .map(|web| web.cert().hashes())
            .unwrap_or_default()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node.id()
    }

    /// The node this server serves (registry, counters, cluster).
    pub fn node(&self) -> Arc<Node> {
        self.node.clone()
    }

    /// Serves clients until `shutdown` completes or a drain is requested
    /// ([`Node::start_drain`]), then drains: new connections are refused,
    /// every client gets a Goodbye with a reconnect cue and `shutdown_grace`
    /// to leave; then the node leaves the cluster and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            endpoint,
            node,
            metrics,
            admin,
            web,
            web_listener,
        } = self;
        let config = node.config();
        let http_cancel = CancellationToken::new();
        let web_app = web.clone().map(WebDoor::router).unwrap_or_default();
        let http: Vec<_> = [
            (metrics, "metrics", crate::metrics::router(node.clone())),
            (admin, "admin API", crate::admin::router(node.clone())),
            (web_listener, "web page", web_app),
        ]
        .into_iter()
        .filter_map(|(listener, what, app)| serve_http(listener?, what, app, http_cancel.clone()))
        .collect();
        let connections_cancel = CancellationToken::new();
        let node_stop = CancellationToken::new();
        node.start(node_stop.clone());
        let tracker = TaskTracker::new();
        let mut forget = tokio::time::interval(Duration::from_secs(60));
        // Every minute the dev WebTransport certificate is renewed when due,
        // or taken over from another node that renewed it.
        if let Some(web) = &web {
            let cert = web.cert().clone();
            let cancel = http_cancel.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                every.tick().await;
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = cancel.cancelled() => return,
                    }
                    let cert = cert.clone();
                    match tokio::task::spawn_blocking(move || cert.reload()).await {
                        Ok(Ok(true)) => info!("serving a new WebTransport dev certificate"),
                        Ok(Ok(false)) => {}
                        Ok(Err(err)) => {
                            warn!(%err, "cannot renew the WebTransport dev certificate")
                        }
                        Err(err) => warn!(%err, "WebTransport certificate renewal failed"),
                    }
                }
            });
        }
        info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
              node_id = %node.id(), name = %config.name, "node listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = node.drain_started() => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    match node.admission().admit(remote.ip(), incoming.remote_address_validated()) {
                        Admit::Accept(permit) => {
                            tracker.spawn(crate::connection::serve(incoming, permit, node.clone(), web.clone(), connections_cancel.clone()));
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
                            node.stats().refused(why);
                            debug!(%remote, reason = why.as_str(), "connection refused before TLS");
                            incoming.refuse();
                        }
                    }
                }
                _ = forget.tick() => {
                    node.admission().forget_idle();
                    node.rate_limits().forget_idle();
                }
            }
        }
        node.start_drain();
        info!(
            clients = node.registry().len(),
            grace = ?config.shutdown_grace,
            "draining: refusing new connections, asking clients to reconnect elsewhere"
        );
        connections_cancel.cancel();
        tracker.close();
        let drain_began = tokio::time::Instant::now();
        let deadline = tokio::time::sleep(config.shutdown_grace + Duration::from_secs(2));
        tokio::pin!(deadline);
        // Once every client left, go on refusing for `drain_linger`: a load
        // balancer still sends some reconnect attempts here, and a refusal
        // sends them elsewhere at once where silence would cost them their
        // connect timeout.
        let linger = async {
            tracker.wait().await;
            tokio::time::sleep_until(drain_began + config.drain_linger).await;
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
                        node.stats().refused(RefusedReason::Draining);
                        incoming.refuse();
                    }
                    None => break,
                },
            }
        }
        endpoint.set_server_config(None);
        // Connections are gone (their presence removals are queued); now
        // leave the cluster so nothing more is routed here.
        node.leave_cluster().await;
        node_stop.cancel();
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

/// The node's QUIC endpoint: certificates (given or dev), TLS, transport
/// settings and UDP socket. The benchmark's raw-quinn floor uses it too, so
/// the two differ only in what runs on top.
pub fn endpoint(config: &NodeConfig) -> Result<quinn::Endpoint, ServerError> {
    node_endpoint(config).map(|(endpoint, _)| endpoint)
}

/// Whether the node serves WebTransport: asked for, and possible. A
/// browser cannot present a client certificate, and any client can
/// negotiate `h3`: a node that requires certificates (mutual TLS) keeps the
/// WebTransport door shut, so that no one gets in without one.
fn webtransport_on(config: &NodeConfig) -> bool {
    if !config.webtransport {
        return false;
    }
    if config.auth_client_ca.is_some() {
        warn!(
            "WebTransport is off: this node requires client certificates (auth_client_ca), \
             which browsers cannot present"
        );
        return false;
    }
    true
}

/// [`endpoint`], with the WebTransport certificate when browsers may
/// connect.
fn node_endpoint(
    config: &NodeConfig,
) -> Result<(quinn::Endpoint, Option<Arc<tls::WebCert>>), ServerError> {
    let (certs, key, dev) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (tls::load_certs(cert)?, tls::load_key(key)?, false),
        _ => {
            // Read under the certs directory's lock: a node renewing the
            // certificate at the same moment cannot swap one file of the pair.
            let dev = tls::load_dev_certs(&config.certs_dir, &config.cert_names)?;
            (dev.chain, dev.key, true)
        }
    };
    let web = if webtransport_on(config) {
        let cert = if dev || config.webtransport_dev_cert {
            tls::WebCert::dev(&config.certs_dir, &config.cert_names)
        } else {
            tls::WebCert::real(certs.clone(), key.clone_key())
        };
        match cert {
            Ok(cert) => Some(Arc::new(cert)),
            // A certificate only browsers use never keeps the node from
            // serving native clients (a read-only certs directory without
            // one, say).
            Err(err) => {
                warn!(%err, "WebTransport is off: no certificate for browsers");
                None
            }
        }
    } else {
        None
    };
    let endpoint_config = tls::endpoint_config(&key)?;
    let crypto = tls::server_crypto(certs, key, config.auth_client_ca.as_deref(), web.clone())?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport_config(config)?));
    // Returning clients are validated by Retry as before: no address
    // validation tokens (web-transport-quinn turns on quinn's `bloom`
    // feature, whose default would hand out NEW_TOKEN frames).
    let mut validation = quinn::ValidationTokenConfig::default();
    validation.sent(0).log(Arc::new(quinn::NoneTokenLog));
    server_config.validation_token_config(validation);
    let bind_error = |source| ServerError::Bind {
        addr: config.listen,
        source,
    };
    let socket = crate::udp::bind(config.listen).map_err(bind_error)?;
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    Ok((endpoint, web))
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
        .send_window(config.send_window)
        .mtu_discovery_config(Some(crate::udp::mtu_discovery()))
        .congestion_controller_factory(config.congestion_controller.factory())
        // Datagrams are not used, but WebTransport needs them offered;
        // unread ones are dropped beyond this (quinn's default would let
        // a client park 1.25 MB per connection).
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    Ok(transport)
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
