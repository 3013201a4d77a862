//! The node's channel operations: subscribe, unsubscribe and presence,
//! keeping the local subscriptions ([`Channels`]) and the cluster bus in
//! step, and answering the client.

use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::bus::ClusterBus;
use crate::channels::{Added, Channels, Refusal};
use crate::protocol::{Body, ClientId, MessageId, Priority, error_code};
use crate::registry::ClientHandle;

impl Node {
    /// Subscribes `client` to `channel` (frame `id`) and answers it:
    /// SubscribeAck once the node receives the channel's publications from
    /// every node, or an Error.
    pub async fn subscribe(
        &self,
        client: &Arc<ClientHandle>,
        id: MessageId,
        priority: Priority,
        channel: String,
        events: bool,
    ) {
        let refuse = |(code, message): Refusal| client.error(priority, Some(id), code, message);
        let namespace = match self.channels().namespace(&channel) {
            Ok(namespace) => namespace.clone(),
            Err(refusal) => return refuse(refusal),
        };
        if let Err(refusal) = Channels::may_subscribe(&namespace, client, &channel) {
            return refuse(refusal);
        }
        let bus = self.bus();
        let added = self.channels().add(client, &channel, events, |first, count| {
            if first {
                bus.want_channel(&channel, true);
            }
            bus.channel_subscribers(&channel, count);
        });
        match added {
            Err(refusal) => return refuse(refusal),
            Ok(Added::Again) => {}
            Ok(Added::New { .. }) => {
                if let Err(err) = bus.channel_sync(&channel).await {
                    self.drop_subscription(client.id(), &channel, false);
                    return client.error(
                        priority,
                        Some(id),
                        error_code::CLUSTER_UNAVAILABLE,
                        format!("cannot subscribe to {channel}: {err}"),
                    );
                }
                if namespace.presence {
                    let landed = self
                        .channels()
                        .while_subscribed(client.id(), &channel, || {
                            bus.channel_member_joined(&channel, &client.info)
                        })
                        .flatten();
                    if let Some(landed) = landed {
                        let wait = self.config().redis_response_timeout * 2;
                        let _ = tokio::time::timeout(wait.max(Duration::from_secs(1)), landed)
                            .await;
                    }
                }
            }
        }
        let subscribers = if namespace.presence {
            bus.channel_member_count(&channel).await.ok()
        } else {
            None
        };
        client.reply(
            priority,
            Body::SubscribeAck {
                of: id,
                channel: channel.clone(),
                subscribers,
            },
        );
        if namespace.join_leave && matches!(added, Ok(Added::New { .. })) {
            self.router().channel_event(
                &channel,
                Body::Join {
                    channel: channel.clone(),
                    member: client.info.clone(),
                },
                client.id(),
            );
        }
    }

    /// Unsubscribes client `id` from `channel`; announces its Leave when
    /// `announce` and the namespace sends events. Returns whether it was
    /// subscribed.
    pub fn drop_subscription(&self, id: ClientId, channel: &str, announce: bool) -> bool {
        let Ok(namespace) = self.channels().namespace(channel) else {
            return false;
        };
        let namespace = namespace.clone();
        let bus = self.bus();
        let removed = self.channels().remove(id, channel, |remaining| {
            if namespace.presence {
                bus.channel_member_left(channel, id);
            }
            bus.channel_subscribers(channel, remaining);
            if remaining == 0 {
                bus.want_channel(channel, false);
                let bus = self.bus_handle();
                let channel = channel.to_owned();
                tokio::spawn(async move {
                    if let Err(err) = bus.channel_sync(&channel).await {
                        tracing::debug!(%err, channel, "unsubscribe from Redis failed; the reconnect drops it");
                    }
                });
            }
        });
        let Some(member) = removed else {
            return false;
        };
        if announce && namespace.join_leave {
            self.router().channel_event(
                channel,
                Body::Leave {
                    channel: channel.to_owned(),
                    member,
                },
                id,
            );
        }
        true
    }

    /// Unsubscribes a client that left from all its channels.
    pub fn drop_subscriptions(&self, id: ClientId) {
        for channel in self.channels().of_client(id) {
            self.drop_subscription(id, &channel, true);
        }
    }

    /// Answers a PresenceRequest for `channel`.
    pub async fn presence(
        &self,
        client: &Arc<ClientHandle>,
        id: MessageId,
        priority: Priority,
        channel: String,
    ) {
        let refuse = |(code, message): Refusal| client.error(priority, Some(id), code, message);
        let namespace = match self.channels().namespace(&channel) {
            Ok(namespace) => namespace.clone(),
            Err(refusal) => return refuse(refusal),
        };
        if !namespace.presence {
            return refuse((
                error_code::NOT_ALLOWED,
                format!("presence is off for the namespace of {channel}"),
            ));
        }
        if let Err(refusal) = Channels::may_subscribe(&namespace, client, &channel) {
            return refuse(refusal);
        }
        match self
            .bus()
            .channel_members(&channel, self.config().max_presence_members)
            .await
        {
            Ok((members, truncated)) => client.reply(
                priority,
                Body::Presence {
                    of: id,
                    channel,
                    members,
                    truncated,
                },
            ),
            Err(err) => client.error(
                priority,
                Some(id),
                error_code::CLUSTER_UNAVAILABLE,
                format!("cannot list the members of {channel}: {err}"),
            ),
        }
    }
}
