//! One client connection, from QUIC accept to close: the application
//! handshake ([`handshake`]), then one reader task per incoming stream
//! ([`reader`]) while the client's outbound queues are written by their own
//! writers (`outbound`), and an orderly end.
//!
//! Stream model (see PROTOCOL.md): every frame travels on a unidirectional
//! stream; each side opens at most one stream per priority, lazily, and sets
//! its QUIC priority. Frames on one stream are ordered; streams are
//! independent, so a large low-priority frame never holds back a
//! high-priority one.

mod handshake;
mod reader;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::bus::SessionEnd;
use crate::limits::{ClientRateLimit, ConnectionPermit, RateVerdict};
use crate::link::{InStream, Link, LinkError, Transport};
use crate::node::Node;
use crate::protocol::{Priority, close_code, error_code};
use crate::registry::ClientHandle;
use crate::web::WebDoor;
use handshake::{Admitted, PEER_LEFT_BEFORE_HANDSHAKE, admit};
use reader::{Closer, Reader, read_stream};

/// How a connection ended: the close code sent (or received) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseReason {
    /// The QUIC application close code (`protocol::close_code`).
    pub code: u32,
    /// Human-readable reason, also sent as the close reason phrase.
    pub reason: String,
}

impl CloseReason {
    pub(crate) fn new(code: u32, reason: impl Into<String>) -> Self {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }
}

/// Serves one incoming connection until it ends.
///
/// The ALPN the client chose decides the door: `h3` is a browser's
/// WebTransport session (accepted by `web`, when the node serves
/// WebTransport), anything else a native connection.
pub(crate) async fn serve(
    incoming: quinn::Incoming,
    mut permit: ConnectionPermit,
    node: Arc<Node>,
    web: Option<Arc<WebDoor>>,
    shutdown: CancellationToken,
) {
    let remote = incoming.remote_address();
    let span = info_span!(
        "conn",
        %remote,
        node_id = %node.id(),
        transport = tracing::field::Empty,
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
        let link = match (&web, is_http3(&conn)) {
            (Some(web), true) => {
                tracing::Span::current().record("transport", Transport::WebTransport.label());
                let accepted = tokio::select! {
                    accepted = web.accept(conn.clone(), &node) => accepted,
                    _ = shutdown.cancelled() => {
                        Err(CloseReason::new(close_code::SHUTDOWN, "server shutting down"))
                    }
                };
                match accepted {
                    Ok(session) => Link::Web(Box::new(session)),
                    Err(CloseReason { code, reason }) => {
                        conn.close(code.into(), reason.as_bytes());
                        return;
                    }
                }
            }
            _ => {
                tracing::Span::current().record("transport", Transport::Quic.label());
                Link::Native(conn)
            }
        };
        let CloseReason { code, reason } = match run(&link, &mut permit, &node, &shutdown).await {
            Ok(end) => end,
            Err(end) => end,
        };
        link.close(code, &reason);
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

async fn run(
    conn: &Link,
    permit: &mut ConnectionPermit,
    node: &Arc<Node>,
    shutdown: &CancellationToken,
) -> Result<CloseReason, CloseReason> {
    // Each phase is boxed and freed when it is over, so an idle connection
    // keeps only the steady phase's state (measured with massif:
    // BENCHMARKS.md, `connections`).
    let admitted = Box::pin(admit(conn, node, shutdown)).await;
    permit.handshake_done();
    let Admitted {
        handle,
        first_stream,
        expires_at,
        rate_key,
    } = admitted?;
    let limit = node.rate_limits().start(rate_key.as_ref()).map(Arc::new);
    let end = Box::pin(steady(
        conn,
        node,
        shutdown,
        &handle,
        first_stream,
        expires_at,
        limit.clone(),
    ))
    .await;
    if let Some(limit) = &limit {
        // The next connection of this identity starts from here.
        node.rate_limits().remember(rate_key, limit);
    }
    Box::pin(finish(node, handle, end)).await
}

/// Reads the client's streams until the connection ends.
async fn steady(
    conn: &Link,
    node: &Arc<Node>,
    shutdown: &CancellationToken,
    handle: &Arc<ClientHandle>,
    first_stream: InStream,
    expires_at: Option<u64>,
    limit: Option<Arc<ClientRateLimit>>,
) -> CloseReason {
    let reader = Reader::new(handle.clone(), node.clone(), limit);
    let closer: Closer = reader.closer();
    let config = node.config();
    // The connection's one deadline, when it has one: its token's expiry
    // (plus the clock-skew leeway), or, once the node drains, the end of
    // the grace period the client gets to leave by itself, whichever comes
    // first. The timer is boxed and made only when needed, so idle
    // connections without a token carry none.
    let mut deadline: Option<(Pin<Box<tokio::time::Sleep>>, CloseReason)> = expires_at.map(|exp| {
        let left = exp.saturating_sub(crate::auth::unix_now()) + config.auth_leeway.as_secs();
        (
            Box::pin(tokio::time::sleep(Duration::from_secs(left))),
            CloseReason::new(close_code::TOKEN_EXPIRED, "token expired"),
        )
    });
    // A resumable session's token is renewed at half its lifetime, so a
    // connection that outlives its first token can still be resumed.
    let refresh_every = node
        .sessions()
        .filter(|_| handle.session().is_some())
        .map(|s| s.limits().lifetime / 2);
    let mut refresh = refresh_every.map(|every| Box::pin(tokio::time::sleep(every)));
    let mut draining = false;
    let mut readers = JoinSet::new();
    readers.spawn(read_stream(first_stream, reader.clone()).in_current_span());
    let end = loop {
        tokio::select! {
            accepted = conn.accept_uni() => match accepted {
                Ok(mut recv) => {
                    // QUIC stream credit holds a native client to
                    // `max_streams_per_connection` streams at once; a
                    // WebTransport session's credit also covers the HTTP/3
                    // streams, which a client may leave unopened, so its
                    // streams are counted here.
                    if conn.transport() == Transport::WebTransport
                        && readers.len() >= config.max_streams_per_connection as usize
                    {
                        recv.stop(close_code::RATE_LIMITED);
                        continue;
                    }
                    // Opening a stream costs a token too, so stream churn
                    // is rate limited like frames.
                    match reader.check_rate(Priority::High, None) {
                        RateVerdict::Allow => {
                            readers.spawn(read_stream(recv, reader.clone()).in_current_span());
                        }
                        RateVerdict::Reject(_) => recv.stop(close_code::RATE_LIMITED),
                        RateVerdict::Disconnect => {}
                    }
                }
                Err(err) => break match (&err, handle.outbound().closed_by_node()) {
                    // The node closed it itself (slow consumer, a stopped
                    // node stream): log what the client received.
                    (LinkError::Quic(quinn::ConnectionError::LocallyClosed), Some((code, reason))) => {
                        CloseReason::new(code, reason)
                    }
                    _ => closed_reason(&err),
                },
            },
            _ = async { if let Some((timer, _)) = &mut deadline { timer.await } }, if deadline.is_some() => {
                let Some((_, end)) = deadline.take() else { continue };
                if end.code == close_code::TOKEN_EXPIRED {
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
                let grace = config.shutdown_grace;
                let sooner = deadline
                    .as_ref()
                    .is_none_or(|(timer, _)| tokio::time::Instant::now() + grace < timer.deadline());
                if sooner {
                    deadline = Some((
                        Box::pin(tokio::time::sleep(grace)),
                        CloseReason::new(close_code::SHUTDOWN, "drain grace period over"),
                    ));
                }
            }
            _ = async { if let Some(timer) = &mut refresh { timer.await } }, if refresh.is_some() => {
                node.refresh_session(handle);
                if let (Some(timer), Some(every)) = (&mut refresh, refresh_every) {
                    timer.as_mut().reset(tokio::time::Instant::now() + every);
                }
            }
            end = closer.closed() => break end,
            _ = handle.kicked() => {
                if handle.moved() {
                    break CloseReason::new(
                        close_code::SESSION_MOVED,
                        "the session was resumed by another connection",
                    );
                }
                let reason = handle.kick_reason();
                handle.goodbye(&reason, false);
                break CloseReason::new(close_code::KICKED, format!("disconnected by an operator: {reason}"));
            }
            // Reap finished readers so the set does not grow.
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    };
    readers.abort_all();
    while readers.join_next().await.is_some() {}
    end
}

/// Removes the client from the node and lets its writers deliver what is
/// queued (a Goodbye, when the node sent one) for a short while.
async fn finish(
    node: &Arc<Node>,
    handle: Arc<ClientHandle>,
    end: CloseReason,
) -> Result<CloseReason, CloseReason> {
    node.leave(&handle, session_end(&handle, Some(&end)));
    if let Some(rtt) = handle.rtt() {
        node.stats().quic_rtt.observe(rtt.as_secs_f64());
    }
    handle.report_lost_packets();
    let grace = if matches!(end.code, close_code::SHUTDOWN | close_code::KICKED) {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(500)
    };
    // Dropping the last handle closes the queues: writers drain what is
    // queued, finish their streams and wait for the peer to have it all.
    let writers = handle.outbound().writers();
    drop(handle);
    writers.close();
    let flushed = tokio::time::timeout(grace, writers.wait()).await;
    if flushed.is_err() {
        debug!(
            ?grace,
            "queued messages not delivered within the grace period"
        );
    }
    Ok(end)
}

/// What becomes of a connection's session when it ends with `end` (None:
/// before the client was told its id): a Goodbye from the client or an
/// operator's kick ends it; anything else (a lost network, a drain, an
/// idle timeout, a slow consumer) leaves it waiting for a resume.
fn session_end(handle: &ClientHandle, end: Option<&CloseReason>) -> SessionEnd {
    let Some(generation) = handle.session() else {
        return SessionEnd::None;
    };
    match end {
        Some(end) if end.code == close_code::KICKED || end.reason == reader::CLIENT_GOODBYE => {
            SessionEnd::End { generation }
        }
        _ => SessionEnd::Detach { generation },
    }
}

fn closed_reason(err: &LinkError) -> CloseReason {
    match err {
        LinkError::Quic(quinn::ConnectionError::ApplicationClosed(close)) => CloseReason::new(
            close_code::NORMAL,
            format!("client closed: {}", String::from_utf8_lossy(&close.reason)),
        ),
        LinkError::SessionClosed { reason, .. } => {
            CloseReason::new(close_code::NORMAL, format!("client closed: {reason}"))
        }
        LinkError::Quic(quinn::ConnectionError::LocallyClosed) => {
            CloseReason::new(close_code::NORMAL, "closed locally")
        }
        other => CloseReason::new(close_code::NORMAL, other.to_string()),
    }
}

/// Whether the client chose ALPN `h3` (a browser's WebTransport session).
fn is_http3(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .is_some_and(|alpn| alpn == crate::tls::WEB_ALPN)
}
