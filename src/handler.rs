//! MessageHandler: what each frame type means once a client is connected.
//! It stamps the sender, answers requests, and asks the router to deliver
//! messages. Replies go to the sender's own queue at the priority of the
//! request.

use std::sync::Arc;

use crate::client_manager::ClientHandle;
use crate::protocol::{
    self, Body, CodecError, ErrorCode, Frame, MessageId, Priority, error_code, now_ms,
};
use crate::router::RouteError;
use crate::server::Shared;
use crate::stats;

/// Handles frames from connected clients.
#[derive(Clone)]
pub struct MessageHandler {
    shared: Arc<Shared>,
}

/// What the connection should do after a frame was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep reading.
    Continue,
    /// The client said Goodbye: close the connection normally.
    Close,
}

impl MessageHandler {
    /// A handler for the node behind `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        MessageHandler { shared }
    }

    /// Handles one decoded frame from `client`.
    pub fn handle(&self, client: &ClientHandle, mut frame: Frame) -> Next {
        // The node decides who the sender is, whatever the client wrote.
        frame.sender = Some(client.stamp.clone());
        let priority = frame.priority;
        let id = frame.id;
        match &frame.body {
            Body::Text { .. } | Body::Binary { .. } => {
                self.send(client, &frame);
                self.ack(client, priority, id);
            }
            Body::Broadcast { .. } => {
                if let Some(bytes) = self.encode(client, &frame) {
                    self.shared.router.broadcast(client.id(), priority, &bytes);
                    self.ack(client, priority, id);
                }
            }
            Body::Direct { to, .. } => {
                let to = *to;
                if let Some(bytes) = self.encode(client, &frame) {
                    match self.shared.router.direct(to, priority, bytes) {
                        Ok(()) => self.ack(client, priority, id),
                        Err(err @ RouteError::UnknownClient(_)) => {
                            self.error(client, priority, Some(id), error_code::UNKNOWN_CLIENT, err)
                        }
                        Err(err @ RouteError::RecipientSlow(_)) => {
                            self.error(client, priority, Some(id), error_code::RECIPIENT_SLOW, err)
                        }
                    }
                }
            }
            Body::Ping => self.reply(client, priority, Body::Pong { of: id }),
            Body::ListClients => {
                let (clients, truncated) = self
                    .shared
                    .clients
                    .list(self.shared.config.max_list_clients);
                self.reply(
                    client,
                    priority,
                    Body::ClientList {
                        of: id,
                        clients,
                        truncated,
                    },
                );
            }
            Body::StatsRequest => {
                let stats = self.shared.stats.snapshot(
                    self.shared.node_id,
                    &self.shared.config.name,
                    self.shared.clients.len(),
                );
                self.reply(client, priority, Body::Stats { of: id, stats });
            }
            Body::Handshake(_) => self.error(
                client,
                priority,
                Some(id),
                error_code::ALREADY_HANDSHAKEN,
                "already handshaken; second Handshake ignored",
            ),
            // Recipients may acknowledge deliveries; the node accepts and drops them.
            Body::Ack { .. } | Body::Pong { .. } => {}
            Body::Error { code, message, .. } => {
                tracing::debug!(code = code.0, message, "client reported an error");
            }
            Body::Goodbye { reason, .. } => {
                tracing::debug!(reason, "client said goodbye");
                return Next::Close;
            }
            Body::HandshakeAck(_) | Body::ClientList { .. } | Body::Stats { .. } => self.error(
                client,
                priority,
                Some(id),
                error_code::UNEXPECTED_FRAME,
                format!("{} frames are only sent by servers", frame.body.kind()),
            ),
        }
        Next::Continue
    }

    /// Answers a frame that could not be decoded (the stream is still in sync).
    pub fn bad_frame(&self, client: &ClientHandle, err: &CodecError, of: Option<MessageId>) {
        let code = match err {
            CodecError::FrameTooLarge { .. } => error_code::FRAME_TOO_LARGE,
            CodecError::UnknownFrameType { .. } => error_code::UNKNOWN_FRAME_TYPE,
            CodecError::Malformed { .. } | CodecError::Encode(_) => error_code::MALFORMED_FRAME,
        };
        self.error(client, Priority::High, of, code, err);
    }

    fn encode(&self, client: &ClientHandle, frame: &Frame) -> Option<bytes::Bytes> {
        match protocol::encode(frame) {
            Ok(bytes) => Some(bytes),
            Err(err) => {
                self.error(
                    client,
                    frame.priority,
                    Some(frame.id),
                    error_code::INTERNAL,
                    err,
                );
                None
            }
        }
    }

    fn send(&self, client: &ClientHandle, frame: &Frame) {
        if let Some(bytes) = self.encode(client, frame) {
            // A failure here means the client itself is slow or gone.
            let _ = client.enqueue(frame.priority, bytes);
        }
    }

    fn reply(&self, client: &ClientHandle, priority: Priority, body: Body) {
        let mut frame = Frame::new(priority, body);
        frame.timestamp_ms = now_ms();
        self.send(client, &frame);
    }

    fn ack(&self, client: &ClientHandle, priority: Priority, of: MessageId) {
        self.reply(client, priority, Body::Ack { of });
    }

    /// Sends an Error frame to `client`.
    pub fn error(
        &self,
        client: &ClientHandle,
        priority: Priority,
        of: Option<MessageId>,
        code: ErrorCode,
        message: impl ToString,
    ) {
        stats::add(&self.shared.stats.errors, 1);
        let message = message.to_string();
        tracing::debug!(code = code.0, %message, "error to client");
        self.reply(client, priority, Body::Error { of, code, message });
    }
}
