//! The quic-fabric client library: connect and handshake, send messages and
//! requests, and read incoming events. The `fabric` CLI and the tests are
//! built on it.
//!
//! Incoming frames that answer a request (Ack, Pong, ClientList, Stats, or an
//! Error naming a request) complete that request; everything else arrives as
//! an [`Event`]. Read events steadily: while the event buffer is full the
//! client stops reading from the node, and a node disconnects clients that
//! stop reading (`close_code::SLOW_CONSUMER`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::protocol::{
    self, Body, ClientId, ClientInfo, ErrorCode, Frame, HARD_MAX_FRAME_BYTES, Handshake,
    HandshakeAck, MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, MessageId, NodeId, NodeStats,
    Payload, Position, Priority, RECOVERY_VERSION, Recovery, SessionOutcome, close_code,
};
use crate::tls::{self, ServerTrust, TlsError};

pub use crate::config::Congestion;

mod socket;

pub use socket::{Socket, shared_pool_size};

/// How to reach and talk to a node.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT` of the node (or of a load balancer in front of nodes).
    pub server: String,
    /// Other `HOST:PORT`s of nodes of the same cluster: reconnects go
    /// through `server` and these in turn, starting with the one after the
    /// address just lost (empty: always `server`). They share `server_name`.
    pub servers: Vec<String>,
    /// TLS server name; by default the host part of `server`.
    pub server_name: Option<String>,
    /// How the server certificate is checked.
    pub trust: ServerTrust,
    /// Display name sent in the handshake.
    pub name: String,
    /// Bearer token (JWT) sent in the handshake, for nodes that require one.
    pub token: Option<String>,
    /// Client certificate presented to nodes that require mutual TLS.
    pub identity: Option<tls::ClientCert>,
    /// Time allowed for QUIC and application handshakes together.
    pub connect_timeout: Duration,
    /// Time allowed for a request's reply (Ack, Pong, ...).
    pub request_timeout: Duration,
    /// QUIC keep-alive interval; keeps NAT and load-balancer mappings alive.
    pub keep_alive_interval: Duration,
    /// Connection idle timeout: how long a silent node takes to count as
    /// lost (with keep-alives flowing, only a dead path is silent).
    pub idle_timeout: Duration,
    /// Incoming events buffered before the client stops reading.
    pub event_buffer: usize,
    /// Reconnect automatically after losing the node (off by default).
    pub reconnect: Option<ReconnectPolicy>,
    /// Which UDP socket to dial from: by default one of a few endpoints
    /// shared by every client of the process ([`Socket::Shared`]).
    pub socket: Socket,
    /// Congestion controller for what the client sends.
    pub congestion: Congestion,
    /// Highest protocol version offered in the handshake (the library
    /// speaks up to [`MAX_PROTOCOL_VERSION`]; lower it to act as an older
    /// client).
    pub max_version: u16,
    /// With a reconnect policy, send broadcasts, directs, publications and
    /// messages to users as Idempotent frames (version 3), and send one
    /// whose connection was lost before its answer again on the next
    /// connection, up to `retry_for` after it was first sent: the cluster
    /// handles it once (within its `dedupe_window`, 2 minutes by default).
    /// On by default; without a reconnect policy it does nothing (there
    /// is no retry to make safe, and each Idempotent message costs the
    /// node a cluster round trip).
    pub idempotent: bool,
    /// How long an idempotent request is retried across reconnects.
    pub retry_for: Duration,
    /// With a reconnect policy, ask for a resumable session (version 3,
    /// ResumeHandshake) and resume it when reconnecting: the client keeps
    /// its id and gets the direct messages sent to it while it was away
    /// (within the node's `session_resume_window`), reported by
    /// [`Event::Reconnected`]. On by default; without a reconnect policy it
    /// does nothing.
    pub resume: bool,
}

/// How a client reconnects after losing its connection.
///
/// A reconnect dials the same `server` address again from another UDP
/// port (see [`Socket`]), so behind a load balancer it may land on
/// another node (with [`ClientConfig::servers`], it tries those in turn).
/// What survives:
/// the `Client` value, its configuration (name, token), its event
/// stream, and its channel subscriptions (it subscribes again by itself
/// and reports it with [`Event::Resubscribed`]; a subscription the node
/// now refuses is dropped). In channels whose namespace keeps history
/// (protocol version 3), it subscribes again from its last position and
/// receives what was published meanwhile, exactly once and in order, or
/// is told with [`Event::Subscribed`] that it could not be recovered.
/// What does not survive: the client id (the node assigns a new one,
/// announced by [`Event::Reconnected`]), requests that were waiting for a
/// reply and are not idempotent (they fail with [`ClientError::Closed`]:
/// whether the node got them is unknown; broadcasts, directs,
/// publications and messages to users are sent again, see
/// [`ClientConfig::idempotent`]), messages sent to the old id while it was gone
/// (their senders get UNKNOWN_CLIENT), and publications of channels
/// without history made while it was away. Messages to its user reach
/// it again as soon as it is back. Requests made *while* the client is
/// reconnecting wait for the new connection, up to `request_timeout`, and
/// then go out on it.
///
/// After the node closed the connection for rate-limit abuse (close code
/// 10), the first attempt waits at least [`RATE_LIMITED_BACKOFF`] (or the
/// last `retry_after_ms` the node gave, or `initial_backoff`, whichever is
/// longest), doubling for each further close 10 in a row: a client that
/// floods must not get a fresh allowance by reconnecting at once.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// Wait before the second attempt (the first is immediate); doubles
    /// after every failed attempt.
    pub initial_backoff: Duration,
    /// Upper bound of the wait between attempts.
    pub max_backoff: Duration,
    /// Give up after this many failed attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}

impl ClientConfig {
    /// A config for `server` that trusts the CA in `ca_file`.
    pub fn new(server: impl Into<String>, ca_file: impl Into<std::path::PathBuf>) -> Self {
        ClientConfig {
            server: server.into(),
            servers: Vec::new(),
            server_name: None,
            trust: ServerTrust::CaFile(ca_file.into()),
            name: "client".into(),
            token: None,
            identity: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            event_buffer: 4096,
            reconnect: None,
            socket: Socket::Shared,
            congestion: Congestion::default(),
            max_version: MAX_PROTOCOL_VERSION,
            idempotent: true,
            retry_for: Duration::from_secs(60),
            resume: true,
        }
    }

    /// Sets the handshake name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Turns on automatic reconnection with `policy`.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = Some(policy);
        self
    }
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address could not be resolved or used.
    #[error("cannot reach {server}: {reason}")]
    Address {
        /// The address given.
        server: String,
        /// Why.
        reason: String,
    },
    /// TLS could not be set up (for example an unreadable CA file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC connection could not be established.
    #[error("cannot connect to {server}: {reason}")]
    Connect {
        /// The address given.
        server: String,
        /// Why.
        reason: String,
    },
    /// The node refused the handshake.
    #[error("server refused the connection: {message} (error {})", code.0)]
    Refused {
        /// The error code from the node.
        code: ErrorCode,
        /// The node's reason.
        message: String,
    },
    /// The node answered a request with an Error frame.
    #[error("server error {}: {message}", code.0)]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The node's reason.
        message: String,
    },
    /// The connection is closed.
    #[error("connection closed: {reason}{}", code.map(|c| format!(" (close code {c})")).unwrap_or_default())]
    Closed {
        /// Application close code, when the node closed with one.
        code: Option<u32>,
        /// Why.
        reason: String,
    },
    /// No reply in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The message is larger than the node accepts.
    #[error("message of {len} bytes exceeds the server's maximum of {max} bytes")]
    TooLarge {
        /// The encoded frame size.
        len: usize,
        /// The node's limit.
        max: usize,
    },
    /// The node broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(err: quinn::ConnectionError) -> Self {
        closed_error(&err)
    }
}

fn closed_error(err: &quinn::ConnectionError) -> ClientError {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => ClientError::Closed {
            code: u32::try_from(close.error_code.into_inner()).ok(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => ClientError::Closed {
            code: None,
            reason: other.to_string(),
        },
    }
}

/// Something that arrived without being asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A frame: a delivery (Broadcast, Direct), an echo (Text, Binary), a
    /// Goodbye, or an Error not tied to a pending request. Boxed: the
    /// event channel allocates its slots in blocks of 32 as soon as it is
    /// made, and a 240-byte `Frame` inline made that 7.5 KiB per idle
    /// client (a sixth of its memory); the box costs one allocation per
    /// message instead.
    Frame(Box<Frame>),
    /// The connection was lost and the client is reconnecting (only with
    /// a [`ReconnectPolicy`]). Requests fail until `Reconnected`.
    Disconnected {
        /// Application close code, when the node closed with one.
        code: Option<u32>,
        /// Why.
        reason: String,
    },
    /// After a reconnect, the client subscribed again to the channels it
    /// had: those now subscribed, and those that failed with why. A
    /// channel refused for good (its rules, a limit) is forgotten; one
    /// that failed for a passing reason (the cluster bus unavailable) is
    /// tried a few times, then kept for the next reconnect.
    Resubscribed {
        /// Channels subscribed again.
        channels: Vec<String>,
        /// Channels the node refused, with the reason.
        failed: Vec<(String, String)>,
    },
    /// After a reconnect (or a SubscriptionLost), the client subscribed
    /// again to a channel with history from its last position: whether
    /// what was published meanwhile was recovered (it came as Publication
    /// frames before this event), or could not be (`recovery` says why;
    /// the channel goes on from `position`). Also sent, with
    /// `EpochChanged`, before a Publication of a new epoch (the channel's
    /// history was lost) when the client had an older one.
    Subscribed {
        /// The channel.
        channel: String,
        /// Where the client is in the channel now.
        position: Option<Position>,
        /// What became of the recovery.
        recovery: Recovery,
    },
    /// The client reconnected and handshook again.
    Reconnected {
        /// The client id: the same as before when the session was resumed.
        client_id: ClientId,
        /// The node it is now connected to.
        node_id: NodeId,
        /// What became of its session (None: it has none, see
        /// [`ClientConfig::resume`]). `Resumed`: same id, and the direct
        /// messages stored while it was away come next; anything else: a
        /// new id, and what was sent to the old one is lost.
        session: Option<SessionOutcome>,
    },
    /// The connection ended for good; no more events follow.
    Closed {
        /// Application close code, when the node closed with one.
        code: Option<u32>,
        /// Why.
        reason: String,
    },
}

type Pending = Arc<Mutex<HashMap<MessageId, oneshot::Sender<Frame>>>>;

/// The channels a client is subscribed to.
type Subscriptions = Arc<Mutex<std::collections::BTreeMap<String, Sub>>>;

/// One of the client's subscriptions.
#[derive(Debug, Clone, Default)]
struct Sub {
    /// Whether it asked for Join and Leave events.
    events: bool,
    /// What it received of the channel's history (channels with history
    /// on a version 3 connection).
    track: Option<Track>,
}

/// Which publications of a channel's history a client has: every offset
/// up to `watermark` and those in `above`, in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Track {
    epoch: u64,
    watermark: u64,
    above: std::collections::BTreeSet<u64>,
}

/// Most offsets a client remembers above its watermark (publications of
/// other priorities that overtook one); past it, the watermark moves up to
/// the lowest of them.
const MAX_ABOVE: usize = 4096;

impl Track {
    fn at(position: Position) -> Track {
        Track {
            epoch: position.epoch,
            watermark: position.offset,
            above: Default::default(),
        }
    }

    /// Whether the publication at `position` is new (and now had).
    fn take(track: &mut Option<Track>, position: Position) -> Taken {
        // Without a known base (before the Subscribed that gives it, or in
        // a new epoch), nothing below `position` counts as had: a lower
        // offset may still come on another stream.
        let unbased = |position: Position| Track {
            epoch: position.epoch,
            watermark: 0,
            above: Default::default(),
        };
        let (t, taken) = match track {
            Some(t) if t.epoch == position.epoch => (t, Taken::New),
            Some(t) => {
                // The history was lost: what came between cannot be told.
                *t = unbased(position);
                (t, Taken::NewEpoch)
            }
            None => (track.insert(unbased(position)), Taken::New),
        };
        if position.offset <= t.watermark || t.above.contains(&position.offset) {
            return Taken::Duplicate;
        }
        t.above.insert(position.offset);
        t.settle();
        if t.above.len() > MAX_ABOVE
            && let Some(&lowest) = t.above.first()
        {
            t.watermark = lowest - 1;
            t.settle();
        }
        taken
    }

    /// A Subscribed says where the client is: it has everything up to
    /// `position` (recovered), or goes on from there (not recovered:
    /// what it missed is gone). Only `Ahead` (the client's position was
    /// not one of this history's) takes it back.
    fn reached(track: &mut Option<Track>, position: Position, recovery: Recovery) {
        match track {
            Some(t) if t.epoch == position.epoch && recovery != Recovery::Ahead => {
                t.watermark = t.watermark.max(position.offset);
                t.settle();
            }
            _ => *track = Some(Track::at(position)),
        }
    }

    /// Moves the watermark over the offsets that follow it.
    fn settle(&mut self) {
        let kept = self.above.split_off(&(self.watermark + 1));
        self.above = kept;
        while self.above.first() == Some(&(self.watermark + 1)) {
            self.above.pop_first();
            self.watermark += 1;
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.watermark,
        }
    }
}

/// What [`Track::take`] made of a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    New,
    Duplicate,
    /// New, in a new epoch of the channel's history.
    NewEpoch,
}

/// What a [`Client::subscribe_since`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Members of the channel across the cluster, when revealed.
    pub subscribers: Option<u64>,
    /// Where the client is in the channel now (None: no history).
    pub position: Option<Position>,
    /// What became of the recovery.
    pub recovery: Recovery,
}

struct Inner {
    conn: quinn::Connection,
    /// The endpoint the connection runs on.
    endpoint: quinn::Endpoint,
    /// Whether the endpoint is the connection's own ([`Socket::Private`],
    /// or a reconnect beyond the shared pool): closing then waits for it to
    /// send the close.
    own_endpoint: bool,
    streams: [tokio::sync::Mutex<Option<quinn::SendStream>>; 3],
    pending: Pending,
    ack: HandshakeAck,
    /// The Session frame that followed the HandshakeAck, if a session was
    /// asked for (its token replaced by later Refreshed ones).
    session: Mutex<Option<Session>>,
    request_timeout: Duration,
}

/// A connection's session, as its Session frame said.
#[derive(Debug, Clone)]
struct Session {
    token: String,
    outcome: SessionOutcome,
}

/// What survives reconnects: the config, the current connection, the
/// event channel.
struct State {
    config: ClientConfig,
    crypto: Arc<quinn::crypto::rustls::QuicClientConfig>,
    /// This client's slot in the shared endpoint pool.
    home: usize,
    current: std::sync::RwLock<Arc<Inner>>,
    closing: std::sync::atomic::AtomicBool,
    /// Bumped whenever `current` is replaced or reconnecting is given up.
    generation: tokio::sync::watch::Sender<u64>,
    /// Reconnecting was given up (or there is no reconnect policy and the
    /// connection ended).
    gave_up: std::sync::atomic::AtomicBool,
    /// Channels to subscribe to again after a reconnect.
    subscriptions: Subscriptions,
}

impl State {
    /// What the next ResumeHandshake presents: None for a plain Handshake,
    /// else the current connection's token (if it has one).
    fn resume(&self) -> Option<Option<String>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let session = lock(&current.session);
        let session = session.as_ref()?;
        Some(Some(session.token.clone()).filter(|t| !t.is_empty()))
    }
}

impl State {
    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// A connected, handshaken client.
pub struct Client {
    state: Arc<State>,
    events: mpsc::Receiver<Event>,
}

/// Shortest wait before reconnecting after the node closed the connection
/// with close code 10 (RATE_LIMITED).
pub const RATE_LIMITED_BACKOFF: Duration = Duration::from_secs(1);

/// A sent request whose reply has not been awaited yet.
pub struct PendingReply {
    id: MessageId,
    rx: oneshot::Receiver<Frame>,
    inner: Arc<Inner>,
    /// UDP datagrams received on the connection when the request was sent.
    heard_at_send: u64,
}

impl PendingReply {
    /// The request's message id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Waits for the reply; an Error reply becomes [`ClientError::Server`].
    ///
    /// A request whose connection is lost before its reply came fails with
    /// [`ClientError::Closed`] (whether the node handled it is unknown).
    /// When `request_timeout` passes without a reply and without a single
    /// packet from the node since the request was sent (a live node at
    /// least acknowledges it within milliseconds), the node is presumed
    /// gone: the connection is closed (a reconnect policy then reconnects)
    /// and the request fails with `Closed` too. Only a node that is heard
    /// from but does not answer in time gives [`ClientError::Timeout`].
    pub async fn wait(self) -> Result<Frame, ClientError> {
        let timeout = self.inner.request_timeout;
        let reply = match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(_)) => return Err(self.inner.closed_error()),
            Err(_) => {
                lock(&self.inner.pending).remove(&self.id);
                let conn = &self.inner.conn;
                if conn.close_reason().is_some() {
                    return Err(self.inner.closed_error());
                }
                let silent = conn.stats().udp_rx.datagrams <= self.heard_at_send;
                // Too short a timeout proves nothing about the path.
                let meaningful = timeout >= conn.rtt() * 3 + Duration::from_millis(200);
                if silent && meaningful {
                    let reason = format!(
                        "nothing heard from the node for {timeout:?}; connection presumed lost"
                    );
                    conn.close(close_code::NORMAL.into(), reason.as_bytes());
                    return Err(ClientError::Closed { code: None, reason });
                }
                return Err(ClientError::Timeout(timeout));
            }
        };
        match reply.body {
            Body::Error { code, message, .. } => Err(ClientError::Server { code, message }),
            _ => Ok(reply),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Without this the receive task's clone would keep a dropped client's
        // connection alive through keep-alives.
        self.conn
            .close(close_code::NORMAL.into(), b"client dropped");
    }
}

impl Inner {
    fn closed_error(&self) -> ClientError {
        match self.conn.close_reason() {
            Some(err) => closed_error(&err),
            None => ClientError::Closed {
                code: None,
                reason: "reply channel dropped".into(),
            },
        }
    }

    async fn write(&self, frame: &Frame) -> Result<(), ClientError> {
        let bytes = protocol::encode(frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let max = self.ack.max_frame_bytes as usize;
        if bytes.len() - protocol::LENGTH_PREFIX_BYTES > max {
            return Err(ClientError::TooLarge {
                len: bytes.len() - protocol::LENGTH_PREFIX_BYTES,
                max,
            });
        }
        let mut slot = self.streams[frame.priority.index()].lock().await;
        if slot.is_none() {
            let send = self.conn.open_uni().await?;
            let _ = send.set_priority(protocol::stream_priority(frame.priority));
            *slot = Some(send);
        }
        let Some(send) = slot.as_mut() else {
            return Err(ClientError::Protocol("stream missing".into()));
        };
        send.write_all(&bytes).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(err) => closed_error(&err),
            other => ClientError::Closed {
                code: None,
                reason: other.to_string(),
            },
        })
    }
}

impl Client {
    /// Connects, verifies the server and performs the handshake. With a
    /// reconnect policy, later losses of the connection are repaired in the
    /// background; the first connection must succeed.
    pub async fn connect(config: &ClientConfig) -> Result<Client, ClientError> {
        // TLS is set up once per trust settings (shared with other clients)
        // and reused by reconnects.
        let crypto = socket::client_crypto(&config.trust, config.identity.as_ref())?;
        let home = socket::home_slot();
        let resume = (config.resume && config.reconnect.is_some() && config.max_version >= 3)
            .then_some(None);
        let (inner, first) = connect_once(config, &crypto, home, 0, resume).await?;
        let (events_tx, events) = mpsc::channel(config.event_buffer.max(1));
        let conn = inner.conn.clone();
        let state = Arc::new(State {
            config: config.clone(),
            crypto,
            home,
            current: std::sync::RwLock::new(inner.clone()),
            closing: std::sync::atomic::AtomicBool::new(false),
            generation: tokio::sync::watch::Sender::new(0),
            gave_up: std::sync::atomic::AtomicBool::new(false),
            subscriptions: Subscriptions::default(),
        });
        // The supervisor owns the only event sender: when it ends, the
        // stream ends.
        tokio::spawn(supervise(
            Arc::downgrade(&state),
            events_tx,
            conn,
            first,
            inner,
        ));
        Ok(Client { state, events })
    }

    fn inner(&self) -> Arc<Inner> {
        self.state
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The id the node gave this client (it changes when it reconnects).
    pub fn client_id(&self) -> ClientId {
        self.inner().ack.client_id
    }

    /// The node this client is connected to.
    pub fn node_id(&self) -> NodeId {
        self.inner().ack.node_id
    }

    /// The resume token of the current connection's session, if it has one.
    pub fn session_token(&self) -> Option<String> {
        lock(&self.inner().session)
            .as_ref()
            .map(|s| s.token.clone())
            .filter(|t| !t.is_empty())
    }

    /// What became of the current connection's session request, if it
    /// made one.
    pub fn session_outcome(&self) -> Option<SessionOutcome> {
        lock(&self.inner().session).as_ref().map(|s| s.outcome)
    }

    /// The HandshakeAck of the current connection.
    pub fn handshake(&self) -> HandshakeAck {
        self.inner().ack.clone()
    }

    /// The local address of the UDP socket the current connection runs on
    /// (shared with other clients unless [`Socket::Private`]).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner().endpoint.local_addr()
    }

    /// Current QUIC round-trip estimate.
    pub fn quic_rtt(&self) -> Duration {
        self.inner().conn.rtt()
    }

    /// The current connection's QUIC statistics (packets, frames, path
    /// MTU, congestion window), for diagnostics.
    pub fn quic_stats(&self) -> quinn::ConnectionStats {
        self.inner().conn.stats()
    }

    /// The connection to send on. While a reconnect is under way (the
    /// current connection is closed and a reconnect policy is set), waits
    /// for the new connection, up to `request_timeout`: a request made in
    /// the gap goes out once the client is back instead of failing. Past
    /// that, or once reconnecting was given up, the closed connection is
    /// returned and the write fails with `ClientError::Closed`.
    async fn live_inner(&self) -> Arc<Inner> {
        let old = self.inner();
        if old.conn.close_reason().is_none() || self.state.config.reconnect.is_none() {
            return old;
        }
        let mut changed = self.state.generation.subscribe();
        let deadline = tokio::time::Instant::now() + self.state.config.request_timeout;
        loop {
            let current = self.inner();
            if !Arc::ptr_eq(&current, &old) {
                return current;
            }
            let over = self
                .state
                .gave_up
                .load(std::sync::atomic::Ordering::Acquire)
                || self
                    .state
                    .closing
                    .load(std::sync::atomic::Ordering::Acquire);
            if over
                || !matches!(
                    tokio::time::timeout_at(deadline, changed.changed()).await,
                    Ok(Ok(()))
                )
            {
                return current;
            }
        }
    }

    /// Sends a request without waiting for its reply. With a reconnect
    /// policy, a request made while the client is reconnecting waits for
    /// the new connection (up to `request_timeout`).
    pub async fn submit(
        &self,
        priority: Priority,
        body: Body,
    ) -> Result<PendingReply, ClientError> {
        submit_on(self.live_inner().await, priority, body).await
    }

    /// Sends a frame that expects no reply (for example an Ack of a delivery).
    pub async fn send_frame(&self, frame: &Frame) -> Result<(), ClientError> {
        self.live_inner().await.write(frame).await
    }

    /// Sends a request and takes its reply apart with `pick`; a reply of
    /// another type (`pick` gives `None`) is a protocol error naming
    /// `expected`.
    async fn request<T>(
        &self,
        priority: Priority,
        body: Body,
        expected: &str,
        pick: impl FnOnce(Body) -> Option<T>,
    ) -> Result<T, ClientError> {
        let reply = self.submit(priority, body).await?.wait().await?.body;
        let got = reply.name();
        pick(reply).ok_or_else(|| ClientError::Protocol(format!("expected {expected}, got {got}")))
    }

    async fn acked(&self, priority: Priority, body: Body) -> Result<MessageId, ClientError> {
        let mut inner = self.live_inner().await;
        // Only worth its cost (a cluster round trip per message on the node)
        // when the client will send it again after a reconnect.
        let keyed = self.state.config.idempotent
            && self.state.config.reconnect.is_some()
            && inner.ack.version >= RECOVERY_VERSION;
        let body = match keyed {
            true => match protocol::Keyed::from_body(body) {
                Ok(message) => Body::Idempotent { message },
                Err(body) => *body,
            },
            false => body,
        };
        let retried = matches!(body, Body::Idempotent { .. });
        let frame = Frame::new(priority, body);
        let id = frame.id;
        let until = Instant::now() + self.state.config.retry_for;
        loop {
            let reply = match submit_frame_on(inner.clone(), frame.clone()).await {
                Ok(pending) => pending.wait().await,
                Err(err) => Err(err),
            };
            match reply {
                Ok(reply) => {
                    return match reply.body {
                        // A Direct stored for a recipient that is away
                        // with a resumable session counts as sent.
                        Body::Ack { .. } | Body::Stored { .. } => Ok(id),
                        other => Err(ClientError::Protocol(format!(
                            "expected Ack, got {}",
                            other.name()
                        ))),
                    };
                }
                // The answer was lost with the connection: the same frame
                // again on the next one (the cluster handles it once).
                Err(ClientError::Closed { .. }) if retried && Instant::now() < until => {
                    let next = self.live_inner().await;
                    if Arc::ptr_eq(&next, &inner) || next.ack.version < RECOVERY_VERSION {
                        return Err(next.closed_error());
                    }
                    inner = next;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Sends text to the node, which echoes it back (as an event) and acknowledges it.
    pub async fn send_text(&self, text: impl Into<String>) -> Result<MessageId, ClientError> {
        self.acked(Priority::Normal, Body::Text { text: text.into() })
            .await
    }

    /// Sends bytes to the node, which echoes them back (as an event) and acknowledges them.
    pub async fn send_binary(&self, data: Vec<u8>) -> Result<MessageId, ClientError> {
        self.acked(Priority::Normal, Body::Binary { data }).await
    }

    /// Delivers `payload` to every other client; returns once the node acknowledged.
    pub async fn broadcast(
        &self,
        payload: Payload,
        priority: Priority,
    ) -> Result<MessageId, ClientError> {
        self.acked(priority, Body::Broadcast { payload }).await
    }

    /// Delivers `payload` to client `to`; returns once the node acknowledged
    /// it (queued for `to`), or stored it for `to`, which is away with a
    /// resumable session (a Stored reply: delivered if `to` resumes in
    /// time). An unknown recipient is `ClientError::Server` with
    /// `error_code::UNKNOWN_CLIENT`; a full store for it, `INBOX_FULL`.
    pub async fn direct(
        &self,
        to: ClientId,
        payload: Payload,
        priority: Priority,
    ) -> Result<MessageId, ClientError> {
        self.acked(priority, Body::Direct { to, payload }).await
    }

    /// Subscribes to `channel` (receiving its Join and Leave events when
    /// `events`); returns the channel's member count when its namespace
    /// reveals it. The client subscribes again by itself after every
    /// reconnect ([`Event::Resubscribed`]).
    pub async fn subscribe(&self, channel: &str, events: bool) -> Result<Option<u64>, ClientError> {
        if self.inner().ack.version >= RECOVERY_VERSION {
            // From the channel's current position, so that positions are
            // tracked from a known base.
            return Ok(self
                .subscribe_since(channel, events, None)
                .await?
                .subscribers);
        }
        let body = Body::Subscribe {
            channel: channel.to_owned(),
            events,
        };
        let subscribers = self
            .request(
                Priority::Normal,
                body,
                "SubscribeAck",
                |reply| match reply {
                    Body::SubscribeAck { subscribers, .. } => Some(subscribers),
                    _ => None,
                },
            )
            .await?;
        lock(&self.state.subscriptions)
            .entry(channel.to_owned())
            .or_default()
            .events = events;
        Ok(subscribers)
    }

    /// Subscribes to `channel` recovering what was published after
    /// `since` (a position this client had, from [`Client::position`], an
    /// earlier process, or `None` for just the current position). The
    /// recovered publications arrive as events (Publication frames) before
    /// this returns; [`Subscription::recovery`] says whether they are all
    /// there. Needs protocol version 3 and a namespace with history for
    /// positions (else `recovery` is [`Recovery::NoHistory`]). After a
    /// reconnect the client does this by itself from its last position.
    pub async fn subscribe_since(
        &self,
        channel: &str,
        events: bool,
        since: Option<Position>,
    ) -> Result<Subscription, ClientError> {
        let before = lock(&self.state.subscriptions).get(channel).cloned();
        if let Some(since) = since {
            let mut subs = lock(&self.state.subscriptions);
            let sub = subs.entry(channel.to_owned()).or_default();
            sub.events = events;
            sub.track = Some(Track::at(since));
        }
        let inner = self.live_inner().await;
        let result =
            subscribe_since_on(&inner, &self.state.subscriptions, channel, events, since).await;
        if result.is_err() {
            // As it was: subscribed (with its position) or not.
            let mut subs = lock(&self.state.subscriptions);
            match before {
                Some(before) => subs.insert(channel.to_owned(), before),
                None => subs.remove(channel),
            };
        }
        result
    }

    /// This client's position in `channel` (a channel with history): every
    /// publication up to it was received. `None` before the first one, or
    /// for other channels.
    pub fn position(&self, channel: &str) -> Option<Position> {
        lock(&self.state.subscriptions)
            .get(channel)
            .and_then(|s| s.track.as_ref().map(Track::position))
    }

    /// The latest publications (at most `limit`, the node may cap it) of
    /// `channel`'s history older than offset `before` (`None`: the newest),
    /// oldest first, as Publication frames; with the channel's current
    /// position and whether older ones are kept.
    pub async fn history(
        &self,
        channel: &str,
        limit: u32,
        before: Option<u64>,
    ) -> Result<(Vec<Frame>, Position, bool), ClientError> {
        let body = Body::HistoryRequest {
            channel: channel.to_owned(),
            limit,
            before,
        };
        let (publications, position, more) = self
            .request(Priority::Normal, body, "History", |reply| match reply {
                Body::History {
                    publications,
                    position,
                    more,
                    ..
                } => Some((publications, position, more)),
                _ => None,
            })
            .await?;
        let mut frames = Vec::with_capacity(publications.len());
        for bytes in publications {
            let frame = bytes
                .get(protocol::LENGTH_PREFIX_BYTES..)
                .map(protocol::decode_frame)
                .and_then(Result::ok)
                .ok_or_else(|| {
                    ClientError::Protocol("undecodable publication in History".into())
                })?;
            frames.push(frame);
        }
        Ok((frames, position, more))
    }

    /// Leaves `channel`.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        // (Its position goes too.)
        lock(&self.state.subscriptions).remove(channel);
        self.acked(
            Priority::Normal,
            Body::Unsubscribe {
                channel: channel.to_owned(),
            },
        )
        .await
        .map(drop)
    }

    /// The channels this client is subscribed to (as far as it knows).
    pub fn subscriptions(&self) -> Vec<String> {
        lock(&self.state.subscriptions).keys().cloned().collect()
    }

    /// Publishes `payload` to `channel`; returns once the node acknowledged.
    pub async fn publish(
        &self,
        channel: &str,
        payload: Payload,
        priority: Priority,
    ) -> Result<MessageId, ClientError> {
        let body = Body::Publish {
            channel: channel.to_owned(),
            payload,
        };
        self.acked(priority, body).await
    }

    /// The members of `channel` across the cluster, and whether the list
    /// was cut short.
    pub async fn presence(&self, channel: &str) -> Result<(Vec<ClientInfo>, bool), ClientError> {
        let body = Body::PresenceRequest {
            channel: channel.to_owned(),
        };
        self.request(Priority::Normal, body, "Presence", |reply| match reply {
            Body::Presence {
                members, truncated, ..
            } => Some((members, truncated)),
            _ => None,
        })
        .await
    }

    /// Delivers `payload` to every connection of `user`, on every node;
    /// returns once the node acknowledged (queued for at least one). A
    /// user without connections is `ClientError::Server` with
    /// `error_code::UNKNOWN_USER`.
    pub async fn send_to_user(
        &self,
        user: &str,
        payload: Payload,
        priority: Priority,
    ) -> Result<MessageId, ClientError> {
        let body = Body::UserDirect {
            user: user.to_owned(),
            payload,
        };
        self.acked(priority, body).await
    }

    /// The clients the node knows, and whether the list was cut short.
    pub async fn list(&self) -> Result<(Vec<ClientInfo>, bool), ClientError> {
        let body = Body::ListClients;
        self.request(Priority::Normal, body, "ClientList", |reply| match reply {
            Body::ClientList {
                clients, truncated, ..
            } => Some((clients, truncated)),
            _ => None,
        })
        .await
    }

    /// Application-level round trip: Ping to Pong.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self
            .submit(Priority::High, Body::Ping)
            .await?
            .wait()
            .await?
            .body
        {
            Body::Pong { .. } => Ok(start.elapsed()),
            other => Err(ClientError::Protocol(format!(
                "expected Pong, got {}",
                other.name()
            ))),
        }
    }

    /// The node's counters.
    pub async fn stats(&self) -> Result<NodeStats, ClientError> {
        let body = Body::StatsRequest;
        self.request(Priority::Normal, body, "Stats", |reply| match reply {
            Body::Stats { stats, .. } => Some(stats),
            _ => None,
        })
        .await
    }

    /// The next incoming event; `None` after `Event::Closed` was returned.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Takes the event receiver, so events can be read in one task while
    /// another sends. `next_event` returns `None` afterwards.
    pub fn take_events(&mut self) -> mpsc::Receiver<Event> {
        std::mem::replace(&mut self.events, mpsc::channel(1).1)
    }

    /// Says Goodbye and closes the connection, waiting briefly for the close to be sent.
    pub async fn close(self, reason: &str) {
        self.state
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        let inner = self.inner();
        let bye = Frame::new(
            Priority::High,
            Body::Goodbye {
                reason: reason.to_owned(),
                reconnect: false,
            },
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.write(&bye)).await;
        inner
            .conn
            .close(close_code::NORMAL.into(), reason.as_bytes());
        if inner.own_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.endpoint.wait_idle()).await;
        }
    }
}

/// Sends a request on `inner` without waiting for its reply.
async fn submit_on(
    inner: Arc<Inner>,
    priority: Priority,
    body: Body,
) -> Result<PendingReply, ClientError> {
    submit_frame_on(inner, Frame::new(priority, body)).await
}

/// Sends request `frame` on `inner` without waiting for its reply.
async fn submit_frame_on(inner: Arc<Inner>, frame: Frame) -> Result<PendingReply, ClientError> {
    let (tx, rx) = oneshot::channel();
    lock(&inner.pending).insert(frame.id, tx);
    let heard_at_send = inner.conn.stats().udp_rx.datagrams;
    if let Err(err) = inner.write(&frame).await {
        lock(&inner.pending).remove(&frame.id);
        return Err(err);
    }
    Ok(PendingReply {
        id: frame.id,
        rx,
        inner,
        heard_at_send,
    })
}

/// Sends a SubscribeSince for `channel` on `inner` and takes in its
/// answer (the client's position in the channel).
async fn subscribe_since_on(
    inner: &Arc<Inner>,
    subscriptions: &Subscriptions,
    channel: &str,
    events: bool,
    since: Option<Position>,
) -> Result<Subscription, ClientError> {
    let body = Body::SubscribeSince {
        channel: channel.to_owned(),
        events,
        since,
    };
    let reply = submit_on(inner.clone(), Priority::Normal, body)
        .await?
        .wait()
        .await?;
    let Body::Subscribed {
        subscribers,
        position,
        recovery,
        ..
    } = reply.body
    else {
        return Err(ClientError::Protocol(format!(
            "expected Subscribed, got {}",
            reply.body.name()
        )));
    };
    let mut subs = lock(subscriptions);
    let sub = subs.entry(channel.to_owned()).or_default();
    sub.events = events;
    match position {
        Some(position) => Track::reached(&mut sub.track, position, recovery),
        None => sub.track = None,
    }
    Ok(Subscription {
        subscribers,
        position: sub.track.as_ref().map(Track::position).or(position),
        recovery,
    })
}

/// Subscribes a new connection to the channels the client had, and
/// reports how it went.
async fn resubscribe(inner: Arc<Inner>, subscriptions: Subscriptions, events: mpsc::Sender<Event>) {
    let wanted: Vec<String> = lock(&subscriptions).keys().cloned().collect();
    if wanted.is_empty() {
        return;
    }
    let (mut channels, mut failed) = (Vec::new(), Vec::new());
    for channel in wanted {
        match subscribe_again(&inner, &subscriptions, &channel).await {
            Ok(Some(subscription)) => {
                if let Some(subscription) = subscription
                    && subscription.recovery != Recovery::NoHistory
                {
                    let _ = events
                        .send(Event::Subscribed {
                            channel: channel.clone(),
                            position: subscription.position,
                            recovery: subscription.recovery,
                        })
                        .await;
                }
                channels.push(channel);
            }
            // Unsubscribed by the application meanwhile.
            Ok(None) => {}
            Err(err) => failed.push((channel, err.to_string())),
        }
    }
    let _ = events.send(Event::Resubscribed { channels, failed }).await;
}

/// Attempts at subscribing again to one channel after a reconnect, while
/// the node answers with an error that may pass (the cluster bus
/// reconnecting, queues full).
const RESUBSCRIBE_ATTEMPTS: u32 = 5;

/// Subscribes `inner`'s connection to `channel` again, if the client still
/// wants it (`Ok(None)` when it no longer does): from its position on a
/// version 3 connection (`Ok(Some(Some(_)))` then says how the recovery
/// went), with a plain Subscribe on older ones. A refusal that will not
/// pass (rules, limits, a bad name) makes the client forget the channel;
/// one that may pass is retried a few times with backoff, and the client
/// keeps the channel for its next reconnect if they all fail.
async fn subscribe_again(
    inner: &Arc<Inner>,
    subscriptions: &Subscriptions,
    channel: &str,
) -> Result<Option<Option<Subscription>>, ClientError> {
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        let Some(sub) = lock(subscriptions).get(channel).cloned() else {
            return Ok(None);
        };
        let outcome = if inner.ack.version >= RECOVERY_VERSION {
            let since = sub.track.as_ref().map(Track::position);
            subscribe_since_on(inner, subscriptions, channel, sub.events, since)
                .await
                .map(Some)
        } else {
            let body = Body::Subscribe {
                channel: channel.to_owned(),
                events: sub.events,
            };
            match submit_on(inner.clone(), Priority::Normal, body).await {
                Ok(pending) => pending.wait().await.map(|_| None),
                Err(err) => Err(err),
            }
        };
        let err = match outcome {
            Ok(subscription) => return Ok(Some(subscription)),
            Err(err) => err,
        };
        let lasting = matches!(
            &err,
            ClientError::Server { code, .. } if [
                protocol::error_code::NOT_ALLOWED,
                protocol::error_code::UNKNOWN_NAMESPACE,
                protocol::error_code::INVALID_FIELD,
                protocol::error_code::TOO_MANY_SUBSCRIPTIONS,
                protocol::error_code::UNKNOWN_FRAME_TYPE,
            ]
            .contains(code)
        );
        if lasting {
            lock(subscriptions).remove(channel);
            return Err(err);
        }
        let passing = matches!(err, ClientError::Server { .. } | ClientError::Timeout(_));
        if !passing || attempt >= RESUBSCRIBE_ATTEMPTS || inner.conn.close_reason().is_some() {
            return Err(err);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(3));
        attempt += 1;
    }
}

/// Checks that a node accepts QUIC connections with a certificate the
/// config trusts, without becoming a client (no handshake, no presence):
/// what a container health check needs. Returns the handshake time.
pub async fn probe(config: &ClientConfig) -> Result<Duration, ClientError> {
    let crypto = Arc::new(tls::client_crypto(&config.trust, config.identity.as_ref())?);
    let start = Instant::now();
    // Its own socket, so the close can be waited for.
    let private = ClientConfig {
        socket: Socket::Private,
        ..config.clone()
    };
    let (endpoint, _, conn) =
        tokio::time::timeout(config.connect_timeout, dial(&private, &crypto, 0, 0))
            .await
            .map_err(|_| ClientError::Timeout(config.connect_timeout))??;
    let elapsed = start.elapsed();
    conn.close(close_code::NORMAL.into(), b"health probe");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(elapsed)
}

/// Opens a QUIC connection (TLS verified) from the socket `config` and
/// the attempt number choose (see [`Socket`]); returns the endpoint,
/// whether it is the connection's own, and the connection.
async fn dial(
    config: &ClientConfig,
    crypto: &Arc<quinn::crypto::rustls::QuicClientConfig>,
    home: usize,
    attempt: usize,
) -> Result<(quinn::Endpoint, bool, quinn::Connection), ClientError> {
    let addr = resolve(&config.server).await?;
    let server_name = config
        .server_name
        .clone()
        .unwrap_or_else(|| host_part(&config.server));
    let mut client_config = quinn::ClientConfig::new(crypto.clone());
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(3u32.into())
        .keep_alive_interval(Some(config.keep_alive_interval))
        .max_idle_timeout(quinn::IdleTimeout::try_from(config.idle_timeout).ok())
        .mtu_discovery_config(Some(crate::udp::mtu_discovery()))
        .congestion_controller_factory(config.congestion.factory());
    client_config.transport_config(Arc::new(transport));
    let connect_err = |reason: String| ClientError::Connect {
        server: config.server.clone(),
        reason,
    };
    let pick = || {
        socket::endpoint_for(&config.socket, addr, home, attempt)
            .map_err(|e| connect_err(e.to_string()))
    };
    let (mut endpoint, mut own) = pick()?;
    let connecting = match endpoint.connect_with(client_config.clone(), addr, &server_name) {
        Err(quinn::ConnectError::EndpointStopping) if !own => {
            // A shared endpoint whose driver is gone: replace it once.
            socket::evict(&endpoint);
            (endpoint, own) = pick()?;
            endpoint.connect_with(client_config, addr, &server_name)
        }
        other => other,
    };
    let conn = connecting
        .map_err(|e| connect_err(e.to_string()))?
        .await
        .map_err(|e| match e {
            quinn::ConnectionError::ApplicationClosed(_) => closed_error(&e),
            other => connect_err(other.to_string()),
        })?;
    Ok((endpoint, own, conn))
}

/// One connection attempt: QUIC + TLS, then the application handshake.
/// `resume`: None for a plain Handshake, else a ResumeHandshake with the
/// token of the session to resume (if any).
async fn connect_once(
    config: &ClientConfig,
    crypto: &Arc<quinn::crypto::rustls::QuicClientConfig>,
    home: usize,
    attempt: usize,
    resume: Option<Option<String>>,
) -> Result<(Arc<Inner>, quinn::RecvStream), ClientError> {
    let asked = resume.is_some();
    let handshake = async {
        let (endpoint, own_endpoint, conn) = dial(config, crypto, home, attempt).await?;
        let mut high = conn.open_uni().await?;
        let _ = high.set_priority(protocol::stream_priority(Priority::High));
        let handshake = Handshake {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: config.max_version,
            name: config.name.clone(),
            token: config.token.clone(),
        };
        let hello = Frame::new(
            Priority::High,
            match resume {
                None => Body::Handshake(handshake),
                Some(resume) => Body::ResumeHandshake { handshake, resume },
            },
        );
        let bytes = protocol::encode(&hello).map_err(|e| ClientError::Protocol(e.to_string()))?;
        high.write_all(&bytes)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut first = conn.accept_uni().await?;
        let reply = read_frame(&mut first)
            .await
            .map_err(|e| match conn.close_reason() {
                Some(err) => closed_error(&err),
                None => ClientError::Protocol(format!("reading handshake reply: {e}")),
            })?;
        let ack = match reply.map(|f| f.body) {
            Some(Body::HandshakeAck(ack)) => ack,
            Some(Body::Error { code, message, .. }) => {
                return Err(ClientError::Refused { code, message });
            }
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected HandshakeAck, got {}",
                    other.name()
                )));
            }
            None => {
                return Err(ClientError::Protocol(
                    "stream ended before HandshakeAck".into(),
                ));
            }
        };
        // A ResumeHandshake is answered with the session right after.
        let session = if asked {
            match read_frame(&mut first).await?.map(|f| f.body) {
                Some(Body::Session { token, outcome, .. }) => Some(Session { token, outcome }),
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected Session after HandshakeAck, got {:?}",
                        other.map(|b| b.name())
                    )));
                }
            }
        } else {
            None
        };
        Ok((endpoint, own_endpoint, conn, high, first, ack, session))
    };
    let (endpoint, own_endpoint, conn, high, first, ack, session) =
        tokio::time::timeout(config.connect_timeout, handshake)
            .await
            .map_err(|_| ClientError::Timeout(config.connect_timeout))??;

    let inner = Arc::new(Inner {
        conn,
        endpoint,
        own_endpoint,
        streams: [
            tokio::sync::Mutex::new(None),
            tokio::sync::Mutex::new(None),
            tokio::sync::Mutex::new(Some(high)),
        ],
        pending: Arc::new(Mutex::new(HashMap::new())),
        ack,
        session: Mutex::new(session),
        request_timeout: config.request_timeout,
    });
    Ok((inner, first))
}

async fn resolve(server: &str) -> Result<SocketAddr, ClientError> {
    let err = |reason: String| ClientError::Address {
        server: server.to_owned(),
        reason,
    };
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address found".into()))
}

/// The host part of `HOST:PORT` or `[V6]:PORT`.
fn host_part(server: &str) -> String {
    let host = match server.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => server,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// Reads one frame sent by a node (`None` at the stream's end). The node is
/// trusted up to the hard limit (its frames carry a sender stamp on top of
/// the client's payload); anything it cannot decode is a protocol error.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>, ClientError> {
    use protocol::stream::{Inbound, Oversized};
    match protocol::stream::read_frame(recv, HARD_MAX_FRAME_BYTES, Oversized::Skip).await {
        Ok(Inbound::Frame(frame, _)) => Ok(Some(frame)),
        Ok(Inbound::Finished) => Ok(None),
        Ok(Inbound::Bad(err, _)) => Err(ClientError::Protocol(err.to_string())),
        Err(err) => Err(ClientError::Protocol(err.to_string())),
    }
}

/// Runs connections one after another: reads the current one until it
/// ends, then either reports `Event::Closed` or, with a reconnect policy,
/// reconnects with backoff and carries on.
async fn supervise(
    state: std::sync::Weak<State>,
    events: mpsc::Sender<Event>,
    mut conn: quinn::Connection,
    mut first: quinn::RecvStream,
    inner: Arc<Inner>,
) {
    let mut pending = inner.pending.clone();
    let mut weak_inner = Arc::downgrade(&inner);
    drop(inner);
    let follow_goodbye = state
        .upgrade()
        .is_some_and(|s| s.config.reconnect.is_some());
    let subscriptions = state
        .upgrade()
        .map(|s| s.subscriptions.clone())
        .unwrap_or_default();
    // The longest retry_after_ms of the current connection, and the wait
    // after the last close 10 (doubled by each close 10 in a row).
    let retry_hint = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut rate_backoff = Duration::ZERO;
    // Which address the connection is to: 0 is `server`, then `servers`.
    let mut serving = 0usize;
    loop {
        let reader = StreamReader {
            pending,
            subscriptions: subscriptions.clone(),
            events: events.clone(),
            inner: weak_inner,
            follow_goodbye: follow_goodbye.then(Left::default),
            retry_hint: retry_hint.clone(),
        };
        let (code, reason) = receive(conn, first, reader).await;
        let policy = match state.upgrade() {
            Some(s) if !s.closing.load(std::sync::atomic::Ordering::Acquire) => {
                s.config.reconnect.clone()
            }
            _ => None,
        };
        let give_up = |state: &std::sync::Weak<State>| {
            if let Some(s) = state.upgrade() {
                s.gave_up.store(true, std::sync::atomic::Ordering::Release);
                s.bump();
            }
        };
        let Some(policy) = policy else {
            give_up(&state);
            let _ = events.send(Event::Closed { code, reason }).await;
            return;
        };
        let _ = events.send(Event::Disconnected { code, reason }).await;
        let hint = Duration::from_millis(u64::from(
            retry_hint.swap(0, std::sync::atomic::Ordering::AcqRel),
        ));
        rate_backoff = if code != Some(close_code::RATE_LIMITED) {
            Duration::ZERO
        } else if rate_backoff.is_zero() {
            RATE_LIMITED_BACKOFF.max(policy.initial_backoff).max(hint)
        } else {
            (rate_backoff * 2).min(policy.max_backoff.max(RATE_LIMITED_BACKOFF))
        };
        if !rate_backoff.is_zero() {
            tracing::debug!(
                ?rate_backoff,
                "closed for exceeding the rate limit; waiting before reconnecting"
            );
        }
        let mut backoff = rate_backoff;
        let mut attempts = 0u32;
        let (next, next_first) = loop {
            tokio::time::sleep(backoff).await;
            let Some(s) = state.upgrade() else { return };
            if s.closing.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            let (mut config, crypto, home) = (s.config.clone(), s.crypto.clone(), s.home);
            let resume = s.resume();
            drop(s);
            // Through the other addresses in turn, from the one after the
            // address just lost.
            let addresses = 1 + config.servers.len();
            let index = (serving + 1 + attempts as usize) % addresses;
            if index > 0 {
                config.server = config.servers[index - 1].clone();
            }
            // Attempt 0 was the lost connection's socket: start from the next.
            // Boxed: only a reconnect needs this (large) future, so an idle
            // connection's supervisor does not carry its size.
            match Box::pin(connect_once(
                &config,
                &crypto,
                home,
                attempts as usize + 1,
                resume,
            ))
            .await
            {
                Ok(ok) => {
                    serving = index;
                    break ok;
                }
                Err(err) => {
                    attempts += 1;
                    tracing::debug!(%err, attempts, "reconnect failed");
                    // A refused token or certificate will be refused again.
                    let hopeless = matches!(
                        &err,
                        ClientError::Refused { code, .. } if *code == protocol::error_code::AUTH_FAILED
                    );
                    if hopeless || policy.max_attempts.is_some_and(|max| attempts >= max) {
                        give_up(&state);
                        let _ = events
                            .send(Event::Closed {
                                code: None,
                                reason: format!("gave up reconnecting: {err}"),
                            })
                            .await;
                        return;
                    }
                    backoff = if backoff.is_zero() {
                        policy.initial_backoff
                    } else {
                        (backoff * 2).min(policy.max_backoff)
                    };
                }
            }
        };
        let Some(s) = state.upgrade() else { return };
        *s.current.write().unwrap_or_else(|e| e.into_inner()) = next.clone();
        s.bump();
        drop(s);
        let session = lock(&next.session).as_ref().map(|s| s.outcome);
        let _ = events
            .send(Event::Reconnected {
                client_id: next.ack.client_id,
                node_id: next.ack.node_id,
                session,
            })
            .await;
        // Concurrently with `receive`, which reads the replies.
        tokio::spawn(resubscribe(
            next.clone(),
            subscriptions.clone(),
            events.clone(),
        ));
        conn = next.conn.clone();
        first = next_first;
        pending = next.pending.clone();
        weak_inner = Arc::downgrade(&next);
    }
}

/// Reads every stream the node opens and dispatches its frames until the
/// connection ends; returns the close code and reason.
async fn receive(
    conn: quinn::Connection,
    first: quinn::RecvStream,
    reader: StreamReader,
) -> (Option<u32>, String) {
    let pending = reader.pending.clone();
    let left = reader.follow_goodbye.clone();
    let mut readers = tokio::task::JoinSet::new();
    readers.spawn(read_stream(first, reader.clone()));
    let err = loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(recv) => {
                    readers.spawn(read_stream(recv, reader.clone()));
                }
                Err(err) => break err,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    };
    // Let readers hand over what they already read, then fail what is left.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while readers.join_next().await.is_some() {}
    })
    .await;
    lock(&pending).clear();
    if let Some(reason) = left.and_then(|left| lock(&left).take()) {
        return (
            Some(protocol::close_code::NORMAL),
            format!("left at the node's request: {reason}"),
        );
    }
    match closed_error(&err) {
        ClientError::Closed { code, reason } => (code, reason),
        other => (None, other.to_string()),
    }
}

/// What every stream reader of one connection shares.
#[derive(Clone)]
struct StreamReader {
    pending: Pending,
    /// The client's channels (an operator's Unsubscribed removes one).
    subscriptions: Subscriptions,
    events: mpsc::Sender<Event>,
    inner: std::sync::Weak<Inner>,
    /// Set when Goodbyes asking to reconnect are followed.
    follow_goodbye: Option<Left>,
    /// The longest `retry_after_ms` seen (RATE_LIMITED errors).
    retry_hint: Arc<std::sync::atomic::AtomicU32>,
}

async fn read_stream(mut recv: quinn::RecvStream, reader: StreamReader) {
    let StreamReader {
        pending,
        subscriptions,
        events,
        inner,
        follow_goodbye,
        retry_hint,
    } = reader;
    loop {
        let frame = match read_frame(&mut recv).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(%err, "stream from node ended");
                return;
            }
        };
        if let Body::Error {
            code,
            retry_after_ms: Some(wait),
            ..
        } = &frame.body
            && *code == protocol::error_code::RATE_LIMITED
        {
            retry_hint.fetch_max(*wait, std::sync::atomic::Ordering::AcqRel);
        }
        if let Some(of) = frame.body.reply_to() {
            let waiter = lock(&pending).remove(&of);
            if let Some(waiter) = waiter {
                let _ = waiter.send(frame);
                continue;
            }
        }
        if let Body::Unsubscribed { channel, .. } = &frame.body {
            lock(&subscriptions).remove(channel);
        }
        if let Body::Publication {
            channel, position, ..
        } = &frame.body
        {
            // Exactly once: a publication recovered after a reconnect may
            // have come before it.
            let taken = lock(&subscriptions)
                .get_mut(channel)
                .map(|sub| Track::take(&mut sub.track, *position));
            match taken {
                Some(Taken::Duplicate) => continue,
                Some(Taken::NewEpoch) => {
                    let lost = Event::Subscribed {
                        channel: channel.clone(),
                        position: Some(*position),
                        recovery: Recovery::EpochChanged,
                    };
                    if events.send(lost).await.is_err() {
                        return;
                    }
                }
                _ => {}
            }
        }
        if let Body::SubscriptionLost { channel, .. } = &frame.body
            && let Some(inner) = inner.upgrade()
        {
            // Subscribed again from its position: the node sends what it
            // still has, or says what was lost (Event::Subscribed).
            let (subscriptions, events, channel) =
                (subscriptions.clone(), events.clone(), channel.clone());
            tokio::spawn(async move {
                let event = match subscribe_again(&inner, &subscriptions, &channel).await {
                    Ok(Some(Some(subscription))) => Event::Subscribed {
                        channel,
                        position: subscription.position,
                        recovery: subscription.recovery,
                    },
                    Ok(_) => return,
                    // Said, not swallowed: the application learns the
                    // channel may have a gap until the next reconnect.
                    Err(err) => Event::Resubscribed {
                        channels: Vec::new(),
                        failed: vec![(channel, err.to_string())],
                    },
                };
                let _ = events.send(event).await;
            });
        }
        if let Body::Session {
            token,
            outcome: SessionOutcome::Refreshed,
            ..
        } = &frame.body
        {
            // The token the next resume presents.
            if let Some(inner) = inner.upgrade()
                && let Some(session) = lock(&inner.session).as_mut()
            {
                session.token = token.clone();
            }
            continue;
        }
        if matches!(frame.body, Body::Ping) {
            if let Some(inner) = inner.upgrade() {
                let pong = Frame::new(frame.priority, Body::Pong { of: frame.id });
                // Boxed: rare, and a large future for every idle reader.
                let _ = Box::pin(inner.write(&pong)).await;
            }
            continue;
        }
        let leave = match (&follow_goodbye, &frame.body) {
            (
                Some(left),
                Body::Goodbye {
                    reason,
                    reconnect: true,
                },
            ) => {
                *lock(left) = Some(reason.clone());
                true
            }
            _ => false,
        };
        if events.send(Event::Frame(Box::new(frame))).await.is_err() {
            return;
        }
        if leave && let Some(inner) = inner.upgrade() {
            // The node is draining: a cue to reconnect (through the load
            // balancer, to another node) at once. Requests in flight get
            // their replies first; the node keeps serving meanwhile.
            let conn = inner.conn.clone();
            drop(inner);
            let pending = pending.clone();
            tokio::spawn(async move {
                let settled = async {
                    while !lock(&pending).is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                let _ = tokio::time::timeout(GOODBYE_SETTLE, settled).await;
                conn.close(
                    quinn::VarInt::from_u32(protocol::close_code::NORMAL),
                    b"reconnecting: the node asked",
                );
            });
        }
    }
}

/// Why the client left its connection itself (a Goodbye's reason), if it did.
type Left = Arc<Mutex<Option<String>>>;

/// Longest a client waits for its requests in flight after a Goodbye that
/// asks it to reconnect.
const GOODBYE_SETTLE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::{Position, Recovery, Taken, Track, host_part};

    #[test]
    fn positions_are_taken_once_whatever_the_order_they_come_in() {
        let at = |offset| Position { epoch: 9, offset };
        let mut track = None;
        // Before the base is known, a lower offset may still come (other
        // priorities travel on other streams).
        assert_eq!(Track::take(&mut track, at(8)), Taken::New);
        assert_eq!(Track::take(&mut track, at(7)), Taken::New);
        assert_eq!(Track::take(&mut track, at(8)), Taken::Duplicate);
        // The Subscribed: nothing missed up to 6.
        Track::reached(&mut track, at(6), Recovery::NotRequested);
        assert_eq!(track.as_ref().unwrap().position(), at(8));
        assert_eq!(Track::take(&mut track, at(7)), Taken::Duplicate);
        assert_eq!(Track::take(&mut track, at(10)), Taken::New);
        assert_eq!(track.as_ref().unwrap().position(), at(8), "9 is missing");
        assert_eq!(Track::take(&mut track, at(9)), Taken::New);
        assert_eq!(track.as_ref().unwrap().position(), at(10));
        // A new epoch: told, and based anew.
        let other = Position {
            epoch: 10,
            offset: 2,
        };
        assert_eq!(Track::take(&mut track, other), Taken::NewEpoch);
        assert_eq!(
            Track::take(
                &mut track,
                Position {
                    epoch: 10,
                    offset: 1
                }
            ),
            Taken::New
        );
        assert_eq!(track.as_ref().unwrap().position(), other);
        // A Subscribed never takes back what the client had, except Ahead
        // (its position was not one of this history's).
        let trimmed = Position {
            epoch: 10,
            offset: 1,
        };
        Track::reached(&mut track, trimmed, Recovery::Trimmed);
        assert_eq!(track.as_ref().unwrap().position().offset, 2);
        let mut ahead = Some(Track::at(at(50)));
        Track::reached(&mut ahead, at(20), Recovery::Ahead);
        assert_eq!(ahead.unwrap().position(), at(20));
    }

    #[test]
    fn an_event_is_small_so_an_idle_clients_event_channel_is_small() {
        // The event channel allocates a block of 32 slots when made.
        assert!(
            std::mem::size_of::<super::Event>() * 32 <= 2048,
            "Event is {} bytes",
            std::mem::size_of::<super::Event>()
        );
    }

    #[test]
    fn host_part_handles_names_ipv4_and_ipv6() {
        assert_eq!(host_part("localhost:4433"), "localhost");
        assert_eq!(host_part("127.0.0.1:4433"), "127.0.0.1");
        assert_eq!(host_part("[::1]:4433"), "::1");
        assert_eq!(host_part("example.org"), "example.org");
    }
}
