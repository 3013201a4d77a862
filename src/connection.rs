//! The per-connection handler: application handshake, one reader task per
//! incoming stream, one writer task per priority, and an orderly end.
//!
//! Stream model (see PROTOCOL.md): every frame travels on a unidirectional
//! stream; each side opens at most one stream per priority, lazily, and sets
//! its QUIC priority. Frames on one stream are ordered; streams are
//! independent, so a large low-priority frame never holds back a
//! high-priority one.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::client_manager::ClientHandle;
use crate::handler::{MessageHandler, Next};
use crate::limits::{ClientRateLimit, ConnectionPermit, RateKey, RateVerdict};
use crate::protocol::{
    self, Body, ClientId, ClientInfo, CodecError, ErrorCode, Frame, HARD_MAX_FRAME_BYTES,
    HandshakeAck, LENGTH_PREFIX_BYTES, Priority, Sender, close_code, error_code, now_ms,
};
use crate::server::Shared;
use crate::stats::{self, RefusedReason};

/// How long the node waits for the id of an oversized Handshake frame, to
/// name it in the refusal.
const ID_PEEK_WAIT: Duration = Duration::from_millis(200);

/// Most buffer reserved for a frame before its bytes arrive.
const PREALLOCATE_BYTES: usize = 64 * 1024;

/// End reason of connections closed by the peer before any handshake.
const PEER_LEFT_BEFORE_HANDSHAKE: &str = "peer closed before the handshake";

/// What reading one frame from a stream gave.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A decoded frame and its size on the wire.
    Frame(Frame, usize),
    /// A frame that could not be decoded (with its id, when readable); the
    /// stream is still in sync.
    Bad(CodecError, Option<protocol::MessageId>),
    /// The peer finished the stream cleanly.
    End,
}

/// Reading failed so that the stream can no longer be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The stream or connection failed.
    #[error(transparent)]
    Stream(#[from] quinn::ReadError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// A length prefix beyond anything the node would skip over.
    #[error("frame length {0} is beyond the {HARD_MAX_FRAME_BYTES}-byte hard limit")]
    Untrustworthy(usize),
}

impl From<quinn::ReadExactError> for ReadError {
    fn from(err: quinn::ReadExactError) -> Self {
        match err {
            quinn::ReadExactError::FinishedEarly(_) => ReadError::Truncated,
            quinn::ReadExactError::ReadError(e) => ReadError::Stream(e),
        }
    }
}

/// Reads one frame. Frames above `max` but within the hard limit are read
/// and discarded (keeping the stream in sync) and reported as
/// `Inbound::Bad(FrameTooLarge)`; longer ones make the stream untrustworthy.
pub(crate) async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Inbound, ReadError> {
    read_frame_with(recv, max, true).await
}

/// Like [`read_frame`]; with `skip_oversized` false, a frame above `max`
/// is reported at once (after a brief look at its id) without reading its
/// body, whatever its claimed length: for peers that have not handshaken,
/// which must not make the node read large frames.
async fn read_frame_with(
    recv: &mut quinn::RecvStream,
    max: usize,
    skip_oversized: bool,
) -> Result<Inbound, ReadError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(Inbound::End),
        Err(e) => return Err(e.into()),
    }
    match protocol::decode_length(prefix, max) {
        Ok(len) => {
            // Memory grows with the bytes that actually arrive, not with
            // what the prefix claims: a peer announcing a large frame and
            // then going silent holds no more than it sent.
            let mut payload = Vec::with_capacity(len.min(PREALLOCATE_BYTES));
            while payload.len() < len {
                let chunk = recv
                    .read_chunk(len - payload.len(), true)
                    .await?
                    .ok_or(ReadError::Truncated)?;
                payload.extend_from_slice(&chunk.bytes);
            }
            Ok(match protocol::decode_frame(&payload) {
                Ok(frame) => Inbound::Frame(frame, LENGTH_PREFIX_BYTES + len),
                Err(err) => {
                    let id = err.message_id();
                    Inbound::Bad(err, id)
                }
            })
        }
        Err(CodecError::FrameTooLarge { len, .. }) if !skip_oversized => {
            let mut id = [0u8; 16];
            let head = len.min(id.len());
            // Boxed: this rare path's future would otherwise sit in every
            // idle reader task.
            let peek = Box::pin(tokio::time::timeout(
                ID_PEEK_WAIT,
                recv.read_exact(&mut id[..head]),
            ))
            .await;
            let id = match peek {
                Ok(Ok(())) => protocol::codec::peek_message_id(&id[..head]),
                _ => None,
            };
            Ok(Inbound::Bad(CodecError::FrameTooLarge { len, max }, id))
        }
        Err(CodecError::FrameTooLarge { len, .. }) if len <= HARD_MAX_FRAME_BYTES => {
            let mut id = [0u8; 16];
            let head = len.min(id.len());
            recv.read_exact(&mut id[..head]).await?;
            let mut left = len - head;
            while left > 0 {
                let chunk = recv
                    .read_chunk(left, true)
                    .await?
                    .ok_or(ReadError::Truncated)?;
                left -= chunk.bytes.len();
            }
            let id = protocol::codec::peek_message_id(&id[..head]);
            Ok(Inbound::Bad(CodecError::FrameTooLarge { len, max }, id))
        }
        Err(CodecError::FrameTooLarge { len, .. }) => Err(ReadError::Untrustworthy(len)),
        Err(other) => Ok(Inbound::Bad(other, None)),
    }
}

/// Serves one incoming connection until it ends.
pub(crate) async fn serve(
    incoming: quinn::Incoming,
    mut permit: ConnectionPermit,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let remote = incoming.remote_address();
    let span = info_span!(
        "conn",
        %remote,
        node_id = %shared.node_id,
        client_id = tracing::field::Empty
    );
    async move {
        let conn = match incoming.accept() {
            Ok(connecting) => match connecting.await {
                Ok(conn) => conn,
                Err(err) => {
                    debug!(%err, "QUIC handshake failed");
                    return;
                }
            },
            Err(err) => {
                debug!(%err, "could not accept connection");
                return;
            }
        };
        let started = Instant::now();
        let (code, reason) = match run(&conn, &mut permit, &shared, &shutdown).await {
            Ok(end) => end,
            Err(end) => end,
        };
        conn.close(code.into(), reason.as_bytes());
        if reason == PEER_LEFT_BEFORE_HANDSHAKE {
            debug!("peer closed before the handshake (health probe?)");
            return;
        }
        info!(
            code,
            reason,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
    }
    .instrument(span)
    .await
}

type End = (u32, String);

async fn admit(
    conn: &quinn::Connection,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<Admitted, End> {
    let config = &shared.config;
    // The handshake: the first frame on the first stream the client opens.
    let (first_stream, hello, hello_size) = tokio::select! {
        res = tokio::time::timeout(config.handshake_timeout, read_handshake(conn, config.max_handshake_bytes.min(config.max_message_bytes))) => match res {
            Ok(Ok(first)) => first,
            Ok(Err(_)) if conn.close_reason().is_some() => {
                // Gone before saying anything: a health probe or a dropped dial.
                return Err((close_code::NORMAL, PEER_LEFT_BEFORE_HANDSHAKE.into()));
            }
            Ok(Err(end)) => return Err(reject(conn, shared, end).await),
            Err(_) => {
                shared.stats.refused(RefusedReason::HandshakeTimeout);
                return Err((close_code::HANDSHAKE_TIMEOUT, "no handshake in time".into()));
            }
        },
        _ = shutdown.cancelled() => return Err((close_code::SHUTDOWN, "server shutting down".into())),
    };
    shared.stats.frame_in(hello.body.tag(), hello_size);
    let Frame {
        id: hello_id,
        body: Body::Handshake(hello),
        ..
    } = hello
    else {
        unreachable!("read_handshake returns only Handshake frames")
    };
    let version = match protocol::negotiate_version(&hello) {
        Ok(v) => v,
        Err(message) => {
            return Err(reject(
                conn,
                shared,
                Rejection {
                    of: Some(hello_id),
                    error: error_code::UNSUPPORTED_VERSION,
                    close: close_code::UNSUPPORTED_VERSION,
                    message,
                },
            )
            .await);
        }
    };
    let identity = match authenticate(conn, shared, hello.token.as_deref()) {
        Ok(identity) => identity,
        Err(message) => {
            return Err(reject(
                conn,
                shared,
                Rejection {
                    of: Some(hello_id),
                    error: error_code::AUTH_FAILED,
                    close: close_code::AUTH_FAILED,
                    message,
                },
            )
            .await);
        }
    };
    if let Err(why) = protocol::valid_name(&hello.name, config.max_name_bytes) {
        return Err(reject(
            conn,
            shared,
            Rejection {
                of: Some(hello_id),
                error: error_code::INVALID_FIELD,
                close: close_code::BAD_HANDSHAKE,
                message: format!("name {why}"),
            },
        )
        .await);
    }

    let client_id = ClientId::new_random();
    tracing::Span::current().record("client_id", tracing::field::display(client_id));
    let info = ClientInfo {
        client_id,
        node_id: shared.node_id,
        name: hello.name.clone(),
        user: identity.user.clone(),
        connected_at_ms: now_ms(),
    };
    let rate_key = shared
        .rate_limits
        .key(identity.user.as_deref(), conn.remote_address().ip());
    let stamp = Sender {
        client_id,
        node_id: shared.node_id,
        name: hello.name,
        user: identity.user,
    };
    let handle = ClientHandle::new(
        info,
        stamp,
        conn.clone(),
        config.outbound_queue_len,
        config.max_queued_bytes,
        shared.queue_budget.clone(),
        shared.stats.clone(),
    );
    if let Err(full) = shared.clients.register(handle.clone()) {
        return Err(reject(
            conn,
            shared,
            Rejection {
                of: Some(hello_id),
                error: error_code::SERVER_FULL,
                close: close_code::SERVER_FULL,
                message: full.to_string(),
            },
        )
        .await);
    }
    stats::add(&shared.stats.connections_total, 1);
    // Registered cluster-wide before the client learns its id, so any
    // node can route to the id as soon as the client can hand it out.
    shared.router.client_joined(&handle.info).await;
    info!(name = %handle.info.name, version, "client connected");

    // The HandshakeAck is the first thing on the node's first stream (the
    // high-priority one), written before any writer runs, so the client
    // always reads it before anything else.
    let ack = Frame::new(
        Priority::High,
        Body::HandshakeAck(HandshakeAck {
            version,
            client_id,
            node_id: shared.node_id,
            server_name: config.name.clone(),
            max_frame_bytes: config.max_message_bytes as u32,
        }),
    );
    let high = async {
        let mut send = conn.open_uni().await.ok()?;
        let _ = send.set_priority(protocol::stream_priority(Priority::High));
        let bytes = protocol::encode(&ack).ok()?;
        send.write_all(&bytes).await.ok()?;
        shared.stats.frame_out(ack.body.tag(), bytes.len());
        Some(send)
    }
    .await;
    let Some(high) = high else {
        shared.clients.unregister(client_id);
        shared.router.client_left(client_id);
        return Err((close_code::INTERNAL, "cannot send handshake ack".into()));
    };
    handle.mark_ready(high);
    Ok(Admitted {
        handle,
        first_stream,
        expires_at: identity.expires_at,
        rate_key,
    })
}

/// Who the client is, as far as the node can tell.
#[derive(Debug, Default)]
struct ClientIdentity {
    /// The authenticated user id (token subject or certificate name).
    user: Option<String>,
    /// When the client's token expires (Unix seconds).
    expires_at: Option<u64>,
}

/// Checks the client's certificate (mutual TLS) and token (JWT), as
/// configured. The error message goes to the client.
fn authenticate(
    conn: &quinn::Connection,
    shared: &Shared,
    token: Option<&str>,
) -> Result<ClientIdentity, String> {
    let mut identity = ClientIdentity::default();
    if shared.config.auth_client_ca.is_some() {
        // TLS already verified the chain; this only reads the name.
        let user = crate::tls::peer_user(conn)
            .ok_or("the client certificate names no user (no CN or SAN)")?;
        // The same rule as for names and token subjects: a user id shows
        // in lists and stamps, so it must be visible and on one line.
        if let Err(why) = protocol::valid_name(&user, crate::auth::MAX_USER_BYTES) {
            return Err(format!(
                "the client certificate's name is not a usable user id: it {why}"
            ));
        }
        identity.user = Some(user);
    }
    if let Some(auth) = &shared.auth {
        let verified = auth.verify(token).map_err(|e| e.to_string())?;
        // With both on, the token names the user; the certificate vouches
        // for the device.
        identity.user = Some(verified.user);
        identity.expires_at = Some(verified.expires_at);
    }
    Ok(identity)
}

/// What the handshake phase hands to the rest of the connection.
struct Admitted {
    handle: Arc<ClientHandle>,
    first_stream: quinn::RecvStream,
    expires_at: Option<u64>,
    /// Whose rate-limit state this connection continues.
    rate_key: Option<RateKey>,
}

/// How readers tell the connection task to end it.
#[derive(Clone)]
struct Closer {
    token: CancellationToken,
    end: Arc<std::sync::Mutex<Option<End>>>,
}

impl Closer {
    /// Asks for the connection to end with `end`; true for the first ask
    /// (later ones keep the first reason).
    fn close(&self, end: End) -> bool {
        let mut slot = self.end.lock().unwrap_or_else(|e| e.into_inner());
        let first = slot.is_none() && !self.token.is_cancelled();
        slot.get_or_insert(end);
        self.token.cancel();
        first
    }
}

async fn run(
    conn: &quinn::Connection,
    permit: &mut ConnectionPermit,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<End, End> {
    // Each phase is boxed and freed when it is over, so an idle connection
    // keeps only the steady phase's state (measured with massif:
    // BENCHMARKS.md, `connections`).
    let admitted = Box::pin(admit(conn, shared, shutdown)).await;
    permit.handshake_done();
    let Admitted {
        handle,
        first_stream,
        expires_at,
        rate_key,
    } = admitted?;
    let limit = shared.rate_limits.start(rate_key.as_ref()).map(Arc::new);
    let end = Box::pin(steady(
        conn,
        shared,
        shutdown,
        &handle,
        first_stream,
        expires_at,
        limit.clone(),
    ))
    .await;
    if let Some(limit) = &limit {
        // The next connection of this identity starts from here.
        shared.rate_limits.remember(rate_key, limit);
    }
    Box::pin(drain(shared, handle, end)).await
}

/// Reads the client's streams until the connection ends.
async fn steady(
    conn: &quinn::Connection,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    handle: &Arc<ClientHandle>,
    first_stream: quinn::RecvStream,
    expires_at: Option<u64>,
    limit: Option<Arc<ClientRateLimit>>,
) -> End {
    let reader = Reader {
        client: handle.clone(),
        handler: MessageHandler::new(shared.clone()),
        shared: shared.clone(),
        close: Closer {
            token: CancellationToken::new(),
            end: Arc::new(std::sync::Mutex::new(None)),
        },
        limit,
    };
    let closer = reader.close.clone();
    // The connection's one deadline, when it has one: its token's expiry
    // (plus the clock-skew leeway), or, once the node drains, the end of
    // the grace period the client gets to leave by itself, whichever comes
    // first. The timer is boxed and made only when needed, so idle
    // connections without a token carry none.
    let mut deadline: Option<(Pin<Box<tokio::time::Sleep>>, End)> = expires_at.map(|exp| {
        let left =
            exp.saturating_sub(crate::auth::unix_now()) + shared.config.auth_leeway.as_secs();
        (
            Box::pin(tokio::time::sleep(Duration::from_secs(left))),
            (close_code::TOKEN_EXPIRED, "token expired".into()),
        )
    });
    let mut draining = false;
    let mut readers = JoinSet::new();
    readers.spawn(read_stream(first_stream, reader.clone()).in_current_span());
    let end: End = loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(mut recv) => {
                    // Opening a stream costs a token too, so stream churn
                    // is rate limited like frames.
                    match reader.check_rate(Priority::High, None) {
                        RateVerdict::Allow => {
                            readers.spawn(read_stream(recv, reader.clone()).in_current_span());
                        }
                        RateVerdict::Reject(_) => {
                            let _ = recv.stop(VarInt::from_u32(close_code::RATE_LIMITED));
                        }
                        RateVerdict::Disconnect => {}
                    }
                }
                Err(err) => break match (&err, handle.closed_by_node()) {
                    // The node closed it itself (slow consumer, a stopped
                    // node stream): log what the client received.
                    (quinn::ConnectionError::LocallyClosed, Some(end)) => end,
                    _ => closed_reason(&err),
                },
            },
            _ = async { if let Some((timer, _)) = &mut deadline { timer.await } }, if deadline.is_some() => {
                let Some((_, end)) = deadline.take() else { continue };
                if end.0 == close_code::TOKEN_EXPIRED {
                    handle.error(Priority::High, None, error_code::AUTH_FAILED, "token expired");
                }
                break end;
            }
            // Draining (SIGTERM or the admin API): say Goodbye with a
            // reconnect cue, keep serving what the client still sends, and
            // give it the grace period to leave by itself.
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                handle.goodbye("node draining; reconnect to another node", true);
                let grace = shared.config.shutdown_grace;
                let sooner = deadline
                    .as_ref()
                    .is_none_or(|(timer, _)| tokio::time::Instant::now() + grace < timer.deadline());
                if sooner {
                    deadline = Some((
                        Box::pin(tokio::time::sleep(grace)),
                        (close_code::SHUTDOWN, "drain grace period over".into()),
                    ));
                }
            }
            _ = closer.token.cancelled() => {
                let end = closer.end.lock().unwrap_or_else(|e| e.into_inner()).take();
                break end.unwrap_or((close_code::NORMAL, "closed".into()));
            }
            _ = handle.kicked() => {
                let reason = handle.kick_reason();
                handle.goodbye(&reason, false);
                break (close_code::KICKED, format!("disconnected by an operator: {reason}"));
            }
            // Reap finished readers so the set does not grow.
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    };
    readers.abort_all();
    while readers.join_next().await.is_some() {}
    end
}

/// Unregisters the client and lets the writers deliver what is queued
/// (a Goodbye, when the node sent one) for a short while.
async fn drain(shared: &Arc<Shared>, handle: Arc<ClientHandle>, end: End) -> Result<End, End> {
    let client_id = handle.id();
    shared.clients.unregister(client_id);
    shared.router.client_left(client_id);
    shared.stats.quic_rtt.observe(handle.rtt().as_secs_f64());
    handle.report_lost_packets();
    let grace = if matches!(end.0, close_code::SHUTDOWN | close_code::KICKED) {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(500)
    };
    // Dropping the last handle closes the queues: writers drain what is
    // queued, finish their streams and wait for the peer to have it all.
    let writers = handle.writers();
    drop(handle);
    writers.close();
    let drained = tokio::time::timeout(grace, writers.wait()).await;
    if drained.is_err() {
        debug!(
            ?grace,
            "queued messages not delivered within the grace period"
        );
    }
    Ok(end)
}

fn closed_reason(err: &quinn::ConnectionError) -> End {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => (
            close_code::NORMAL,
            format!("client closed: {}", String::from_utf8_lossy(&close.reason)),
        ),
        quinn::ConnectionError::LocallyClosed => (close_code::NORMAL, "closed locally".into()),
        other => (close_code::NORMAL, other.to_string()),
    }
}

struct Rejection {
    of: Option<protocol::MessageId>,
    error: ErrorCode,
    close: u32,
    message: String,
}

/// Reads the first stream's first frame, which must be a Handshake.
async fn read_handshake(
    conn: &quinn::Connection,
    max: usize,
) -> Result<(quinn::RecvStream, Frame, usize), Rejection> {
    let violation = |message: String| Rejection {
        of: None,
        error: error_code::HANDSHAKE_REQUIRED,
        close: close_code::PROTOCOL_VIOLATION,
        message,
    };
    let mut recv = conn
        .accept_uni()
        .await
        .map_err(|e| violation(format!("connection ended before the handshake: {e}")))?;
    match read_frame_with(&mut recv, max, false).await {
        Ok(Inbound::Frame(frame, size)) if matches!(frame.body, Body::Handshake(_)) => {
            Ok((recv, frame, size))
        }
        Ok(Inbound::Frame(frame, _)) => Err(Rejection {
            of: Some(frame.id),
            ..violation(format!("expected Handshake, got {}", frame.body.kind()))
        }),
        Ok(Inbound::Bad(err @ CodecError::FrameTooLarge { .. }, id)) => Err(Rejection {
            of: id,
            error: error_code::FRAME_TOO_LARGE,
            close: close_code::BAD_HANDSHAKE,
            message: format!("handshake frame too large: {err}"),
        }),
        Ok(Inbound::Bad(err, id)) => Err(Rejection {
            of: id,
            ..violation(format!("invalid handshake frame: {err}"))
        }),
        Ok(Inbound::End) => Err(violation("stream finished before the handshake".into())),
        Err(err) => Err(violation(format!("cannot read handshake: {err}"))),
    }
}

/// Tells the client why it is refused (Error frame), then gives the close
/// code and reason. The Error frame is given a moment to arrive first.
async fn reject(conn: &quinn::Connection, shared: &Shared, rejection: Rejection) -> End {
    debug!(code = rejection.error.0, message = %rejection.message, "refusing client");
    shared.stats.error(rejection.error.0);
    shared.stats.refused(match rejection.close {
        close_code::AUTH_FAILED => RefusedReason::AuthFailed,
        close_code::SERVER_FULL => RefusedReason::ServerFull,
        _ => RefusedReason::BadHandshake,
    });
    let mut frame = Frame::new(
        Priority::High,
        Body::Error {
            of: rejection.of,
            code: rejection.error,
            message: rejection.message.clone(),
            retry_after_ms: None,
        },
    );
    frame.timestamp_ms = now_ms();
    if let Ok(bytes) = protocol::encode(&frame) {
        let deliver = async {
            let mut send = conn.open_uni().await.ok()?;
            send.write_all(&bytes).await.ok()?;
            send.finish().ok()?;
            send.stopped().await.ok()
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), deliver).await;
    }
    (rejection.close, rejection.message)
}

/// What every reader task of one connection shares.
#[derive(Clone)]
struct Reader {
    client: Arc<ClientHandle>,
    handler: MessageHandler,
    shared: Arc<Shared>,
    close: Closer,
    limit: Option<Arc<ClientRateLimit>>,
}

impl Reader {
    /// Takes a rate-limit token for one frame (or stream). Over the limit
    /// the client is told (Error RATE_LIMITED with retry_after_ms); after
    /// too many strikes the connection is closed.
    fn check_rate(&self, priority: Priority, of: Option<protocol::MessageId>) -> RateVerdict {
        let Some(limit) = &self.limit else {
            return RateVerdict::Allow;
        };
        let verdict = limit.check();
        match verdict {
            RateVerdict::Allow => {}
            RateVerdict::Reject(wait) => self.client.rate_limited(priority, of, wait),
            RateVerdict::Disconnect => {
                let first = self.close.close((
                    close_code::RATE_LIMITED,
                    "rate limit exceeded for too long".into(),
                ));
                if first {
                    stats::add(&self.shared.stats.rate_limit_disconnects, 1);
                    warn!("client kept sending over its rate limit; disconnecting");
                }
            }
        }
        verdict
    }
}

async fn read_stream(mut recv: quinn::RecvStream, reader: Reader) {
    let Reader {
        client,
        handler,
        shared,
        close,
        ..
    } = &reader;
    let max = shared.config.max_message_bytes;
    loop {
        match read_frame(&mut recv, max).await {
            Ok(Inbound::Frame(frame, size)) => {
                shared.stats.frame_in(frame.body.tag(), size);
                // A Goodbye is always honoured, limit or not.
                if !matches!(frame.body, Body::Goodbye { .. }) {
                    match reader.check_rate(frame.priority, Some(frame.id)) {
                        RateVerdict::Allow => {}
                        RateVerdict::Reject(_) => continue,
                        RateVerdict::Disconnect => return,
                    }
                }
                if handler.handle(client, frame).await == Next::Close {
                    close.close((close_code::NORMAL, "client said goodbye".into()));
                    return;
                }
            }
            Ok(Inbound::Bad(err, id)) => match reader.check_rate(Priority::High, id) {
                RateVerdict::Allow => handler.bad_frame(client, &err, id),
                RateVerdict::Reject(_) => {}
                RateVerdict::Disconnect => return,
            },
            Ok(Inbound::End) => return,
            Err(ReadError::Untrustworthy(len)) => {
                let err = CodecError::FrameTooLarge { len, max };
                handler.bad_frame(client, &err, None);
                warn!(len, "frame length beyond the hard limit; closing");
                close.close((close_code::PROTOCOL_VIOLATION, err.to_string()));
                return;
            }
            Err(ReadError::Truncated) => {
                debug!("stream ended inside a frame");
                return;
            }
            Err(ReadError::Stream(err)) => {
                debug!(%err, "stream read failed");
                return;
            }
        }
    }
}
