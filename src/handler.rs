//! MessageHandler: what each frame type means once a client is connected.
//! It stamps the sender, answers requests, and hands messages to the
//! router. Replies go to the sender's own queue at the priority of the
//! request.

use std::sync::Arc;

use crate::node::Node;
use crate::outbound::EnqueueError;
use crate::protocol::{self, Body, CodecError, Frame, MessageId, Priority, error_code};
use crate::registry::ClientHandle;

/// Handles frames from connected clients.
#[derive(Clone)]
pub struct MessageHandler {
    node: Arc<Node>,
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
    /// A handler for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        MessageHandler { node }
    }

    /// Handles one decoded frame from `client`. Frames of one stream are
    /// handled one after another, which is what keeps them in order.
    pub async fn handle(&self, client: &Arc<ClientHandle>, mut frame: Frame) -> Next {
        // The node decides who the sender is, whatever the client wrote.
        frame.sender = Some(client.stamp.clone());
        let priority = frame.priority;
        let id = frame.id;
        let router = self.node.router();
        let needs = protocol::version_of_tag(frame.body.tag());
        if needs > client.access.version {
            client.error(
                priority,
                Some(id),
                error_code::UNKNOWN_FRAME_TYPE,
                format!(
                    "{} frames need protocol version {needs}; this connection speaks version {}",
                    frame.body.name(),
                    client.access.version
                ),
            );
            return Next::Continue;
        }
        match &frame.body {
            Body::Text { .. } | Body::Binary { .. } => {
                if let Some(bytes) = encode(client, &frame) {
                    match client.enqueue(priority, frame.body.tag(), bytes) {
                        Ok(()) => client.ack(priority, id),
                        // The Ack would claim an echo that was never queued.
                        Err(EnqueueError::NodeBusy) => client.error(
                            priority,
                            Some(id),
                            error_code::SERVER_BUSY,
                            "not echoed: the node's queues are full; retry later",
                        ),
                        // The client itself is slow or gone: it is being closed.
                        Err(EnqueueError::SlowConsumer | EnqueueError::Closed) => {}
                    }
                }
            }
            Body::Broadcast { .. } => {
                if let Some(bytes) = encode(client, &frame) {
                    router.broadcast(client, id, priority, bytes);
                }
            }
            Body::Direct { to, .. } => {
                let to = *to;
                if let Some(bytes) = encode(client, &frame) {
                    // Boxed: a cross-node lookup's future is large, and
                    // inline it would sit in every idle reader task.
                    Box::pin(router.direct(client, id, to, priority, bytes)).await;
                }
            }
            Body::Ping => client.reply(priority, Body::Pong { of: id }),
            Body::ListClients => {
                match Box::pin(self.node.list_clients(self.node.config().max_list_clients)).await {
                    Ok((clients, truncated)) => client.reply(
                        priority,
                        Body::ClientList {
                            of: id,
                            clients,
                            truncated,
                        },
                    ),
                    Err(err) => client.error(
                        priority,
                        Some(id),
                        error_code::CLUSTER_UNAVAILABLE,
                        format!("cannot list the cluster's clients: {err}"),
                    ),
                }
            }
            Body::StatsRequest => {
                let stats = self.node.stats().snapshot(
                    self.node.id(),
                    &self.node.config().name,
                    self.node.registry().len(),
                );
                client.reply(priority, Body::Stats { of: id, stats });
            }
            Body::Handshake(_) | Body::ResumeHandshake { .. } => client.error(
                priority,
                Some(id),
                error_code::ALREADY_HANDSHAKEN,
                format!("already handshaken; {} ignored", frame.body.name()),
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
            Body::Subscribe { channel, events } => {
                let (channel, events) = (channel.clone(), *events);
                Box::pin(
                    self.node
                        .subscribe(client, id, priority, channel, events, None),
                )
                .await;
            }
            Body::SubscribeSince {
                channel,
                events,
                since,
            } => {
                let (channel, events, since) = (channel.clone(), *events, *since);
                Box::pin(
                    self.node
                        .subscribe(client, id, priority, channel, events, Some(since)),
                )
                .await;
            }
            Body::Idempotent { message } => {
                // The message it stands for, with its id, handled once.
                let inner = Frame {
                    body: message.clone().into_body(),
                    ..frame.clone()
                };
                if let Some(claimed) = Box::pin(self.node.claim_idempotent(client, &inner)).await {
                    let next = Box::pin(self.handle(client, inner)).await;
                    claimed.handed_off();
                    return next;
                }
            }
            Body::HistoryRequest {
                channel,
                limit,
                before,
            } => {
                let channel = channel.clone();
                Box::pin(
                    self.node
                        .history(client, id, priority, channel, *limit, *before),
                )
                .await;
            }
            Body::Unsubscribe { channel } => {
                if let Err(why) = protocol::valid_channel(channel) {
                    client.error(
                        priority,
                        Some(id),
                        error_code::INVALID_FIELD,
                        format!("channel {why}"),
                    );
                } else {
                    self.node.drop_subscription(client.id(), channel, true);
                    client.ack(priority, id);
                }
            }
            Body::Publish { channel, .. } => {
                let channels = self.node.channels();
                let allowed = channels
                    .namespace(channel)
                    .and_then(|ns| channels.may_publish(ns, client, channel));
                match allowed {
                    Err((code, message)) => client.error(priority, Some(id), code, message),
                    Ok(()) => {
                        if let Some(bytes) = encode(client, &frame) {
                            router.publish(client, id, priority, channel, bytes);
                        }
                    }
                }
            }
            Body::PresenceRequest { channel } => {
                let channel = channel.clone();
                Box::pin(self.node.presence(client, id, priority, channel)).await;
            }
            Body::UserDirect { user, .. } => {
                if let Err(why) = protocol::valid_name(user, protocol::MAX_USER_BYTES) {
                    client.error(
                        priority,
                        Some(id),
                        error_code::INVALID_FIELD,
                        format!("user {why}"),
                    );
                } else if let Some(bytes) = encode(client, &frame) {
                    Box::pin(router.user_direct(client, id, user, priority, bytes)).await;
                }
            }
            Body::HandshakeAck(_)
            | Body::ClientList { .. }
            | Body::Stats { .. }
            | Body::SubscribeAck { .. }
            | Body::Join { .. }
            | Body::Leave { .. }
            | Body::Presence { .. }
            | Body::Unsubscribed { .. }
            | Body::Publication { .. }
            | Body::Subscribed { .. }
            | Body::History { .. }
            | Body::SubscriptionLost { .. }
            | Body::Session { .. }
            | Body::Stored { .. } => client.error(
                priority,
                Some(id),
                error_code::UNEXPECTED_FRAME,
                format!("{} frames are only sent by servers", frame.body.name()),
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
        client.error(Priority::High, of, code, err);
    }
}

fn encode(client: &ClientHandle, frame: &Frame) -> Option<bytes::Bytes> {
    match protocol::encode(frame) {
        Ok(bytes) => Some(bytes),
        Err(err) => {
            client.error(frame.priority, Some(frame.id), error_code::INTERNAL, err);
            None
        }
    }
}
