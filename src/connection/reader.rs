//! Reading a client's streams: one task per stream, each reading frames in
//! order, checking the rate limit, and handing them to the
//! [`MessageHandler`]. A reader asks the connection to end through the
//! [`Closer`] all readers share.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::CloseReason;
use crate::handler::{MessageHandler, Next};
use crate::limits::{ClientRateLimit, RateVerdict};
use crate::link::InStream;
use crate::node::Node;
use crate::protocol::stream::{Inbound, Oversized, ReadError, read_frame};
use crate::protocol::{Body, CodecError, MessageId, Priority, close_code};
use crate::registry::ClientHandle;

/// Close reason of a connection whose client said Goodbye.
pub(super) const CLIENT_GOODBYE: &str = "client said goodbye";
use crate::stats;

/// How readers tell the connection task to end it.
#[derive(Clone, Default)]
pub(super) struct Closer {
    token: CancellationToken,
    end: Arc<Mutex<Option<CloseReason>>>,
}

impl Closer {
    /// Asks for the connection to end with `end`; true for the first ask
    /// (later ones keep the first reason).
    fn close(&self, end: CloseReason) -> bool {
        let mut slot = self.end.lock().unwrap_or_else(|e| e.into_inner());
        let first = slot.is_none() && !self.token.is_cancelled();
        slot.get_or_insert(end);
        self.token.cancel();
        first
    }

    /// Completes when a reader asked to close, with its reason.
    pub(super) async fn closed(&self) -> CloseReason {
        self.token.cancelled().await;
        self.end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| CloseReason::new(close_code::NORMAL, "closed"))
    }
}

/// What every reader task of one connection shares.
#[derive(Clone)]
pub(super) struct Reader {
    client: Arc<ClientHandle>,
    handler: MessageHandler,
    node: Arc<Node>,
    close: Closer,
    limit: Option<Arc<ClientRateLimit>>,
}

impl Reader {
    pub(super) fn new(
        client: Arc<ClientHandle>,
        node: Arc<Node>,
        limit: Option<Arc<ClientRateLimit>>,
    ) -> Self {
        Reader {
            client,
            handler: MessageHandler::new(node.clone()),
            node,
            close: Closer::default(),
            limit,
        }
    }

    /// The closer the readers use.
    pub(super) fn closer(&self) -> Closer {
        self.close.clone()
    }

    /// Takes a rate-limit token for one frame (or stream). Over the limit
    /// the client is told (Error RATE_LIMITED with retry_after_ms); after
    /// too many strikes the connection is closed.
    pub(super) fn check_rate(&self, priority: Priority, of: Option<MessageId>) -> RateVerdict {
        let Some(limit) = &self.limit else {
            return RateVerdict::Allow;
        };
        let verdict = limit.check();
        match verdict {
            RateVerdict::Allow => {}
            RateVerdict::Reject(wait) => self.client.rate_limited(priority, of, wait),
            RateVerdict::Disconnect => {
                let first = self.close.close(CloseReason::new(
                    close_code::RATE_LIMITED,
                    "rate limit exceeded for too long",
                ));
                if first {
                    stats::add(&self.node.stats().rate_limit_disconnects, 1);
                    warn!("client kept sending over its rate limit; disconnecting");
                }
            }
        }
        verdict
    }
}

/// Reads one client stream until it ends, handling its frames in order.
pub(super) async fn read_stream(mut recv: InStream, reader: Reader) {
    let Reader {
        client,
        handler,
        node,
        close,
        ..
    } = &reader;
    let max = node.config().max_message_bytes;
    loop {
        match read_frame(&mut recv, max, Oversized::Skip).await {
            Ok(Inbound::Frame(frame, size)) => {
                node.stats().frame_in(frame.body.tag(), size);
                // A Goodbye is always honoured, limit or not.
                if !matches!(frame.body, Body::Goodbye { .. }) {
                    match reader.check_rate(frame.priority, Some(frame.id)) {
                        RateVerdict::Allow => {}
                        RateVerdict::Reject(_) => continue,
                        RateVerdict::Disconnect => return,
                    }
                }
                if handler.handle(client, frame).await == Next::Close {
                    close.close(CloseReason::new(close_code::NORMAL, CLIENT_GOODBYE));
                    return;
                }
            }
            Ok(Inbound::Bad(err, id)) => match reader.check_rate(Priority::High, id) {
                RateVerdict::Allow => handler.bad_frame(client, &err, id),
                RateVerdict::Reject(_) => {}
                RateVerdict::Disconnect => return,
            },
            Ok(Inbound::Finished) => return,
            Err(ReadError::Untrustworthy(len)) => {
                let err = CodecError::FrameTooLarge { len, max };
                handler.bad_frame(client, &err, None);
                warn!(len, "frame length beyond the hard limit; closing");
                close.close(CloseReason::new(
                    close_code::PROTOCOL_VIOLATION,
                    err.to_string(),
                ));
                return;
            }
            Err(ReadError::Truncated) => {
                debug!("stream ended inside a frame");
                return;
            }
            Err(ReadError::Io(err)) => {
                debug!(%err, "stream read failed");
                return;
            }
        }
    }
}
