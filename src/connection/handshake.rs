//! The application handshake: the first frame on the first stream a client
//! opens must be an acceptable Handshake (version, authentication, name);
//! the client is then admitted into the node (registry and cluster
//! presence) and gets its HandshakeAck, or it is refused with an Error
//! frame and a close code (PROTOCOL.md section 6).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::CloseReason;
use crate::limits::RateKey;
use crate::link::{InStream, Link};
use crate::node::Node;
use crate::outbound::{Outbound, QueueLimits};
use crate::protocol::stream::{Inbound, Oversized, read_frame};
use crate::protocol::{
    self, Body, ClientId, ClientInfo, CodecError, ErrorCode, Frame, HandshakeAck, MessageId,
    Priority, Sender, close_code, error_code, now_ms,
};
use crate::registry::{Access, ClientHandle};
use crate::stats::{self, RefusedReason};

/// Close reason of connections closed by the peer before any handshake.
pub(super) const PEER_LEFT_BEFORE_HANDSHAKE: &str = "peer closed before the handshake";

/// What the handshake phase hands to the rest of the connection.
pub(super) struct Admitted {
    pub handle: Arc<ClientHandle>,
    pub first_stream: InStream,
    /// When the client's token expires (Unix seconds), if it has one.
    pub expires_at: Option<u64>,
    /// Whose rate-limit state this connection continues.
    pub rate_key: Option<RateKey>,
}

/// Why a handshake is refused, as the client is told.
struct HandshakeRefusal {
    /// The Handshake frame's id, when it could be read.
    of: Option<MessageId>,
    error: ErrorCode,
    close: u32,
    message: String,
    /// What the node's statistics count it as.
    reason: RefusedReason,
}

impl HandshakeRefusal {
    fn new(
        of: Option<MessageId>,
        error: ErrorCode,
        close: u32,
        message: impl Into<String>,
    ) -> Self {
        let reason = match close {
            close_code::AUTH_FAILED => RefusedReason::AuthFailed,
            close_code::SERVER_FULL => RefusedReason::ServerFull,
            _ => RefusedReason::BadHandshake,
        };
        HandshakeRefusal {
            of,
            error,
            close,
            message: message.into(),
            reason,
        }
    }
}

/// Reads and checks the Handshake, admits the client into `node`, and
/// writes its HandshakeAck.
pub(super) async fn admit(
    conn: &Link,
    node: &Arc<Node>,
    shutdown: &CancellationToken,
) -> Result<Admitted, CloseReason> {
    let config = node.config();
    // The handshake: the first frame on the first stream the client opens.
    let max = config.max_handshake_bytes.min(config.max_message_bytes);
    let (first_stream, hello, hello_size) = tokio::select! {
        res = tokio::time::timeout(config.handshake_timeout, read_handshake(conn, max)) => match res {
            Ok(Ok(first)) => first,
            Ok(Err(_)) if conn.is_closed() => {
                // Gone before saying anything: a health probe or a dropped dial.
                return Err(CloseReason::new(close_code::NORMAL, PEER_LEFT_BEFORE_HANDSHAKE));
            }
            Ok(Err(refusal)) => return Err(refuse(conn, node, refusal).await),
            Err(_) => {
                node.stats().refused(RefusedReason::HandshakeTimeout);
                return Err(CloseReason::new(close_code::HANDSHAKE_TIMEOUT, "no handshake in time"));
            }
        },
        _ = shutdown.cancelled() => return Err(CloseReason::new(close_code::SHUTDOWN, "server shutting down")),
    };
    node.stats().frame_in(hello.body.tag(), hello_size);
    let hello_id = hello.id;
    // `resume`: None for a plain Handshake; for a ResumeHandshake, the
    // token of the session to resume, if any.
    let (hello, resume) = match hello.body {
        Body::Handshake(hello) => (hello, None),
        Body::ResumeHandshake { handshake, resume } => (handshake, Some(resume)),
        _ => unreachable!("read_handshake returns only handshake frames"),
    };
    let of = Some(hello_id);
    let negotiated = protocol::negotiate_version(&hello).and_then(|v| {
        if resume.is_some() && v < protocol::RECOVERY_VERSION {
            Err(format!(
                "resume_handshake needs protocol version {}; the version in common is {v}",
                protocol::RECOVERY_VERSION
            ))
        } else {
            Ok(v)
        }
    });
    let version = match negotiated {
        Ok(v) => v,
        Err(message) => {
            let refusal = HandshakeRefusal::new(
                of,
                error_code::UNSUPPORTED_VERSION,
                close_code::UNSUPPORTED_VERSION,
                message,
            );
            return Err(refuse(conn, node, refusal).await);
        }
    };
    let identity = match authenticate(conn, node, hello.token.as_deref()) {
        Ok(identity) => identity,
        Err(message) => {
            let refusal = HandshakeRefusal::new(
                of,
                error_code::AUTH_FAILED,
                close_code::AUTH_FAILED,
                message,
            );
            return Err(refuse(conn, node, refusal).await);
        }
    };
    if let Err(why) = protocol::valid_name(&hello.name, config.max_name_bytes) {
        let refusal = HandshakeRefusal::new(
            of,
            error_code::INVALID_FIELD,
            close_code::BAD_HANDSHAKE,
            format!("name {why}"),
        );
        return Err(refuse(conn, node, refusal).await);
    }

    let user = identity.user.clone();
    let granted = match &resume {
        None => None,
        Some(token) => match node.grant_session(user.as_deref(), token.as_deref()).await {
            Ok(granted) => {
                node.stats().session(granted.outcome);
                Some(granted)
            }
            Err(err) => {
                let refusal = HandshakeRefusal::new(
                    of,
                    error_code::CLUSTER_UNAVAILABLE,
                    close_code::INTERNAL,
                    format!("cannot resume the session now ({err}); retry with the same token"),
                );
                return Err(refuse(conn, node, refusal).await);
            }
        },
    };
    let client_id = granted
        .as_ref()
        .map_or_else(ClientId::new_random, |g| g.client_id);
    tracing::Span::current().record("client_id", tracing::field::display(client_id));
    let info = ClientInfo {
        client_id,
        node_id: node.id(),
        name: hello.name.clone(),
        user: user.clone(),
        connected_at_ms: now_ms(),
    };
    let rate_key = node
        .rate_limits()
        .key(user.as_deref(), conn.quic().remote_address().ip());
    let stamp = Sender {
        client_id,
        node_id: node.id(),
        name: hello.name,
        user,
    };
    let outbound = Outbound::new(
        client_id,
        QueueLimits {
            frames: config.outbound_queue_len,
            bytes: config.max_queued_bytes,
            coalesce: config.coalesce_window,
        },
        node.queue_budget().clone(),
        node.stats().clone(),
    );
    let access = Access {
        version,
        grants: identity.grants.clone().into_boxed_slice(),
    };
    let handle = ClientHandle::new(info, stamp, access, outbound, node.stats().clone());
    let (generation, outcome, stored) = match granted {
        Some(g) => (g.generation, Some(g.outcome), g.stored),
        None => (0, None, None),
    };
    handle.set_session(generation);
    let stored_count = stored.as_ref().map_or(0, Vec::len);
    // Registered cluster-wide before the client learns its id, so any
    // node can route to the id as soon as the client can hand it out.
    if let Err(full) = node.join(&handle, stored).await {
        let refusal = HandshakeRefusal::new(
            of,
            error_code::SERVER_FULL,
            close_code::SERVER_FULL,
            full.to_string(),
        );
        return Err(refuse(conn, node, refusal).await);
    }
    stats::add(&node.stats().connections_total, 1);
    stats::add(
        &node.stats().connections_by_transport[conn.transport().index()],
        1,
    );
    match outcome {
        Some(outcome) => info!(
            name = %handle.info.name,
            version,
            session = outcome.name(),
            stored = stored_count,
            "client connected"
        ),
        None => info!(name = %handle.info.name, version, "client connected"),
    }

    // The HandshakeAck is the first thing on the node's first stream (the
    // high-priority one), written before any writer runs, so the client
    // always reads it before anything else.
    let ack = Frame::new(
        Priority::High,
        Body::HandshakeAck(HandshakeAck {
            version,
            client_id,
            node_id: node.id(),
            server_name: config.name.clone(),
            max_frame_bytes: config.max_message_bytes as u32,
        }),
    );
    // A ResumeHandshake is answered with the session right after.
    let session = outcome.map(|outcome| {
        let sessions = node.sessions();
        Frame::new(
            Priority::High,
            Body::Session {
                token: sessions.map_or_else(String::new, |s| {
                    s.issue(client_id, handle.info.user.as_deref(), generation)
                }),
                window_ms: sessions.map_or(0, |s| s.limits().window.as_millis() as u64),
                outcome,
                stored: stored_count as u32,
            },
        )
    });
    // Bounded like the handshake: a client that grants no stream credit or
    // window for the answer must not stay admitted.
    let high = async {
        let mut send = conn.open_uni().await.ok()?;
        send.set_priority(protocol::stream_priority(Priority::High));
        for frame in std::iter::once(&ack).chain(session.as_ref()) {
            let bytes = protocol::encode(frame).ok()?;
            send.write_all(&bytes).await.ok()?;
            node.stats().frame_out(frame.body.tag(), bytes.len());
        }
        Some(send)
    };
    let high = match tokio::time::timeout(config.handshake_timeout, high).await {
        Ok(Some(high)) => high,
        failed => {
            node.leave(&handle, super::session_end(&handle, None));
            return Err(if failed.is_err() {
                node.stats().refused(RefusedReason::HandshakeTimeout);
                CloseReason::new(
                    close_code::HANDSHAKE_TIMEOUT,
                    "the handshake ack was not taken in time",
                )
            } else {
                CloseReason::new(close_code::INTERNAL, "cannot send handshake ack")
            });
        }
    };
    handle
        .outbound()
        .start(conn.clone(), Some(high), tracing::Span::current());
    Ok(Admitted {
        handle,
        first_stream,
        expires_at: identity.expires_at,
        rate_key,
    })
}

/// Who a client is, as far as the node can tell from its certificate and
/// token (nothing when the node does not authenticate).
#[derive(Debug, Default)]
struct Verified {
    /// The user id (token subject, else certificate name).
    user: Option<String>,
    /// When the token expires (Unix seconds); a certificate alone does not.
    expires_at: Option<u64>,
    /// The channels the token grants (its `channels` claim).
    grants: Vec<String>,
}

/// Checks the client's certificate (mutual TLS) and token (JWT), as
/// configured. The error message goes to the client.
fn authenticate(conn: &Link, node: &Node, token: Option<&str>) -> Result<Verified, String> {
    let mut identity = Verified::default();
    if node.config().auth_client_ca.is_some() {
        // TLS already verified the chain (a node that requires
        // certificates serves no WebTransport); this only reads the name.
        let user = crate::tls::peer_user(conn.quic())
            .ok_or("the client certificate names no user (no CN or SAN)")?;
        // The same rule as for names and token subjects: a user id shows
        // in lists and stamps, so it must be visible and on one line.
        if let Err(why) = protocol::valid_name(&user, protocol::MAX_USER_BYTES) {
            return Err(format!(
                "the client certificate's name is not a usable user id: it {why}"
            ));
        }
        identity.user = Some(user);
    }
    if let Some(auth) = node.auth() {
        let verified = auth.verify(token).map_err(|e| e.to_string())?;
        // With both on, the token names the user; the certificate vouches
        // for the device.
        identity.user = Some(verified.user);
        identity.expires_at = Some(verified.expires_at);
        identity.grants = verified.channels;
    }
    Ok(identity)
}

/// Reads the first stream's first frame, which must be a Handshake.
async fn read_handshake(
    conn: &Link,
    max: usize,
) -> Result<(InStream, Frame, usize), HandshakeRefusal> {
    let violation = |of: Option<MessageId>, message: String| {
        HandshakeRefusal::new(
            of,
            error_code::HANDSHAKE_REQUIRED,
            close_code::PROTOCOL_VIOLATION,
            message,
        )
    };
    let mut recv = conn
        .accept_uni()
        .await
        .map_err(|e| violation(None, format!("connection ended before the handshake: {e}")))?;
    match read_frame(&mut recv, max, Oversized::Refuse).await {
        Ok(Inbound::Frame(frame, size))
            if matches!(
                frame.body,
                Body::Handshake(_) | Body::ResumeHandshake { .. }
            ) =>
        {
            Ok((recv, frame, size))
        }
        Ok(Inbound::Frame(frame, _)) => Err(violation(
            Some(frame.id),
            format!("expected Handshake, got {}", frame.body.name()),
        )),
        Ok(Inbound::Bad(err @ CodecError::FrameTooLarge { .. }, id)) => Err(HandshakeRefusal::new(
            id,
            error_code::FRAME_TOO_LARGE,
            close_code::BAD_HANDSHAKE,
            format!("handshake frame too large: {err}"),
        )),
        Ok(Inbound::Bad(err, id)) => Err(violation(id, format!("invalid handshake frame: {err}"))),
        Ok(Inbound::Finished) => Err(violation(
            None,
            "stream finished before the handshake".into(),
        )),
        Err(err) => Err(violation(None, format!("cannot read handshake: {err}"))),
    }
}

/// Tells the client why it is refused (Error frame), then gives the close
/// code and reason. The Error frame is given a moment to arrive first.
async fn refuse(conn: &Link, node: &Node, refusal: HandshakeRefusal) -> CloseReason {
    debug!(code = refusal.error.0, message = %refusal.message, "refusing client");
    node.stats().error(refusal.error.0);
    node.stats().refused(refusal.reason);
    let frame = Frame::new(
        Priority::High,
        Body::Error {
            of: refusal.of,
            code: refusal.error,
            message: refusal.message.clone(),
            retry_after_ms: None,
        },
    );
    if let Ok(bytes) = protocol::encode(&frame) {
        let deliver = async {
            let mut send = conn.open_uni().await.ok()?;
            send.write_all(&bytes).await.ok()?;
            send.finish_and_wait().await;
            Some(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), deliver).await;
    }
    CloseReason::new(refusal.close, refusal.message)
}
