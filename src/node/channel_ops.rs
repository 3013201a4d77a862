//! The node's channel operations: subscribe, unsubscribe and presence,
//! keeping the local subscriptions ([`Channels`]) and the cluster bus in
//! step, and answering the client.

use std::sync::Arc;
use std::time::Duration;

use super::Node;
use crate::bus::{BusError, BusMessage, ClusterBus, Feed, HistoryRange, PublishDone, Target};
use crate::channels::{Added, Channels, Counts, Refusal};
use crate::protocol::{
    self, Body, ClientId, Frame, MessageId, NodeId, Payload, Position, Priority, Recovery,
    error_code,
};
use crate::registry::ClientHandle;

/// Publications read from the history at a time during a recovery.
const REPLAY_PAGE: usize = 1000;

impl Node {
    /// Subscribes `client` to `channel` (frame `id`) and answers it:
    /// SubscribeAck once the node receives the channel's publications from
    /// every node, or an Error. `since` is a SubscribeSince's (version 3):
    /// the answer is then Subscribed, after the publications recovered
    /// (PROTOCOL.md section 11.3).
    pub async fn subscribe(
        &self,
        client: &Arc<ClientHandle>,
        id: MessageId,
        priority: Priority,
        channel: String,
        events: bool,
        since: Option<Option<Position>>,
    ) {
        let refuse = |(code, message): Refusal| client.error(priority, Some(id), code, message);
        let namespace = match self.channels().namespace(&channel) {
            Ok(namespace) => namespace.clone(),
            Err(refusal) => return refuse(refusal),
        };
        if let Err(refusal) = Channels::may_subscribe(&namespace, client, &channel) {
            return refuse(refusal);
        }
        let retention = namespace.retention();
        let recovering = since.is_some() && retention.is_some();
        let bus = self.bus();
        let mut flipped = Vec::new();
        let added = self
            .channels()
            .add(client, &channel, events, recovering, |before, after| {
                flipped = self.follow_counts(&channel, namespace.join_leave, before, after);
            });
        let added = match added {
            Err(refusal) => return refuse(refusal),
            Ok(added) => added,
        };
        let undo = |code, what: String| {
            if matches!(added, Added::New { .. }) {
                self.drop_subscription(client.id(), &channel, false);
            } else if recovering {
                // Subscribed before: it goes on receiving as before (told
                // when what arrived meanwhile was more than was kept).
                self.channels()
                    .finish_recovery(client.id(), &channel, |arrived| {
                        if arrived.overflowed {
                            client.reply(
                                Priority::High,
                                Body::SubscriptionLost {
                                    channel: channel.clone(),
                                    reason: "its recovery could not keep up".into(),
                                },
                            );
                        }
                        for (_, frame) in arrived.arrived {
                            let _ = client.outbound().enqueue(
                                priority,
                                protocol::tag::PUBLICATION,
                                frame,
                                true,
                            );
                        }
                    });
            }
            client.error(priority, Some(id), code, what);
        };
        for (feed, wanted) in &flipped {
            if !wanted {
                self.sync_later(&channel, *feed);
            }
        }
        // The feeds this client needs are in place before the answer,
        // whoever asked for them first: a subscriber that did not flip a
        // feed still waits for (or repairs) the subscription another one
        // started. In step already, this costs nothing.
        let mut needed = vec![Feed::Publications];
        if events && namespace.join_leave {
            needed.push(Feed::Events);
        }
        for feed in needed {
            if let Err(err) = bus.channel_sync(&channel, feed).await {
                let what = match (&added, feed) {
                    (Added::Again, Feed::Events) => {
                        format!("cannot turn on events of {channel}: {err}")
                    }
                    _ => format!("cannot subscribe to {channel}: {err}"),
                };
                return undo(error_code::CLUSTER_UNAVAILABLE, what);
            }
        }
        let started_feed = flipped.contains(&(Feed::Publications, true));
        if started_feed
            && retention.is_some()
            && let Err(err) = bus.follow_history(&channel).await
        {
            // Without it, the first publication that arrives starts the
            // gap detection instead.
            tracing::debug!(%channel, %err, "cannot read the channel's position");
        }
        // A recovery: what to replay, read after the subscription is in
        // place (so nothing falls between the read and the live feed).
        let recovery = match (since, retention) {
            (Some(since), Some(_)) => match self.recover(client, priority, &channel, since).await {
                Ok(recovery) => Some(recovery),
                Err((code, what)) => return undo(code, what),
            },
            _ => None,
        };
        if namespace.presence && matches!(added, Added::New { .. }) {
            let landed = self
                .channels()
                .while_subscribed(client.id(), &channel, || {
                    bus.channel_member_joined(&channel, &client.info)
                })
                .flatten();
            if let Some(landed) = landed {
                let wait = self.config().redis_response_timeout * 2;
                let _ = tokio::time::timeout(wait.max(Duration::from_secs(1)), landed).await;
            }
        }
        let subscribers = if namespace.presence {
            bus.channel_member_count(&channel).await.ok()
        } else {
            None
        };
        match (since, recovery) {
            (None, _) => client.reply(
                priority,
                Body::SubscribeAck {
                    of: id,
                    channel: channel.clone(),
                    subscribers,
                },
            ),
            (Some(_), None) => client.reply(
                priority,
                Body::Subscribed {
                    of: id,
                    channel: channel.clone(),
                    subscribers,
                    position: None,
                    recovery: Recovery::NoHistory,
                },
            ),
            (Some(_), Some(recovered)) => {
                // What arrived meanwhile, after what was replayed, then the
                // answer: all on this request's stream, in offset order.
                // Queued past the node's budget (bounded by the recovery
                // buffer): a frame dropped here would be lost for good.
                let (mut last, recovery) = recovered;
                let finished = self
                    .channels()
                    .finish_recovery(client.id(), &channel, |arrived| {
                        if arrived.overflowed {
                            return false;
                        }
                        for (at, frame) in arrived.arrived {
                            if at.epoch == last.epoch && at.offset <= last.offset {
                                continue;
                            }
                            let _ = client.outbound().enqueue(
                                priority,
                                protocol::tag::PUBLICATION,
                                frame,
                                true,
                            );
                            last = at;
                        }
                        client.reply(
                            priority,
                            Body::Subscribed {
                                of: id,
                                channel: channel.clone(),
                                subscribers,
                                position: Some(last),
                                recovery,
                            },
                        );
                        true
                    });
                if finished == Some(false) {
                    return undo(
                        error_code::SERVER_BUSY,
                        format!(
                            "recovery of {channel} could not keep up with its publications; retry"
                        ),
                    );
                }
            }
        }
        // Not if an Unsubscribe (on another stream) or an operator ended
        // it meanwhile: its Leave went out already (checked atomically).
        if namespace.join_leave && matches!(added, Added::New { .. }) {
            self.router().join_event(
                &channel,
                Body::Join {
                    channel: channel.clone(),
                    member: client.info.clone(),
                },
                client.id(),
            );
        }
    }

    /// Reads what `client` missed of `channel` since `since` and queues it
    /// at `priority` (the request's: recovered publications come on its
    /// stream, before the answer), paced by the client's queue room. Returns the
    /// position of the last publication queued (or the channel's latest,
    /// when nothing was), and what became of the recovery.
    async fn recover(
        &self,
        client: &Arc<ClientHandle>,
        priority: Priority,
        channel: &str,
        since: Option<Position>,
    ) -> Result<(Position, Recovery), Refusal> {
        let cannot = |err: BusError| {
            (
                error_code::CLUSTER_UNAVAILABLE,
                format!("cannot recover {channel}: {err}"),
            )
        };
        let gone = |what: &str| {
            (
                error_code::SERVER_BUSY,
                format!("the history of {channel} was {what} during its recovery; retry"),
            )
        };
        // The position first: most answers need nothing more.
        let top = self
            .bus()
            .history(channel, HistoryRange::Before(None), 0)
            .await
            .map_err(cannot)?
            .position;
        let Some(since) = since else {
            return Ok((top, Recovery::NotRequested));
        };
        // Another epoch: what the old one published after `since` is lost,
        // but the new one is replayed from its start when the history
        // still holds it all (after a failover, what was published on the
        // promoted server before the client came back).
        let (since, outcome) = if top.epoch != since.epoch {
            let start = Position {
                epoch: top.epoch,
                offset: 0,
            };
            (start, Recovery::EpochChanged)
        } else {
            (since, Recovery::Recovered)
        };
        if since.offset > top.offset {
            return Ok((top, Recovery::Ahead));
        }
        // Then page by page, each publication queued as room allows.
        let mut last = since;
        while last.offset < top.offset {
            let page = self
                .bus()
                .history(channel, HistoryRange::After(last.offset), REPLAY_PAGE)
                .await
                .map_err(cannot)?;
            if page.position.epoch != since.epoch {
                return match last == since {
                    true => Ok((page.position, Recovery::EpochChanged)),
                    false => Err(gone("lost")),
                };
            }
            let contiguous = page.entries.first().map(|e| e.offset) == Some(last.offset + 1);
            if !contiguous {
                return match (last == since, outcome) {
                    // A new epoch no longer whole: nothing replayed.
                    (true, Recovery::EpochChanged) => Ok((top, Recovery::EpochChanged)),
                    (true, _) => Ok((top, Recovery::Trimmed)),
                    (false, _) => Err(gone("trimmed")),
                };
            }
            for entry in page.entries {
                if entry.offset > top.offset {
                    // Newer ones come from the held-back publications.
                    break;
                }
                let at = Position {
                    epoch: since.epoch,
                    offset: entry.offset,
                };
                let Some(frame) = crate::channels::publication_frame(&entry.frame, at) else {
                    return Err((
                        error_code::INTERNAL,
                        format!("cannot recover {channel}: its publication at {at} cannot be sent"),
                    ));
                };
                // Paced: a long replay must not fill the client's queue
                // (which would close it as a slow consumer).
                let deadline = tokio::time::Instant::now() + self.config().slow_consumer_stall;
                while !client.outbound().has_room(priority, frame.len()) {
                    if tokio::time::Instant::now() >= deadline || client.outbound().is_slow() {
                        return Err((
                            error_code::SERVER_BUSY,
                            format!("recovery of {channel} stalled: the client does not read"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                if self.channels().recovery_overflowed(client.id(), channel) {
                    return Err((
                        error_code::SERVER_BUSY,
                        format!(
                            "recovery of {channel} could not keep up with its publications; retry"
                        ),
                    ));
                }
                if client
                    .enqueue(priority, protocol::tag::PUBLICATION, frame)
                    .is_err()
                {
                    return Err((
                        error_code::SERVER_BUSY,
                        format!("recovery of {channel} could not be queued; retry"),
                    ));
                }
                last = at;
            }
            if !page.more && last.offset < top.offset {
                // The rest expired while it was read.
                return Err(gone("trimmed"));
            }
        }
        Ok((if last == since { top } else { last }, outcome))
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
        let removed = self.channels().remove(id, channel, |before, after| {
            if namespace.presence {
                bus.channel_member_left(channel, id);
            }
            for (feed, _) in self.follow_counts(channel, namespace.join_leave, before, after) {
                self.sync_later(channel, feed);
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

    /// Follows a change of a channel's local counts on the bus: its
    /// subscriber count, and which feeds this node takes (publications
    /// while it has subscribers, events while one of them wants events and
    /// the namespace sends them). Returns the feeds whose want flipped,
    /// and to what. Runs under the channels' lock.
    fn follow_counts(
        &self,
        channel: &str,
        join_leave: bool,
        before: Counts,
        after: Counts,
    ) -> Vec<(Feed, bool)> {
        let bus = self.bus();
        if before.subscribers != after.subscribers {
            bus.channel_subscribers(channel, after.subscribers);
        }
        let feeds = [
            (
                Feed::Publications,
                before.subscribers > 0,
                after.subscribers > 0,
            ),
            (
                Feed::Events,
                join_leave && before.events > 0,
                join_leave && after.events > 0,
            ),
        ];
        let mut flipped = Vec::new();
        for (feed, was, is) in feeds {
            if was != is {
                bus.want_channel(channel, feed, is);
                flipped.push((feed, is));
            }
        }
        flipped
    }

    /// Brings a feed's Redis subscription in line in the background (an
    /// unsubscription nobody waits for).
    fn sync_later(&self, channel: &str, feed: Feed) {
        let bus = self.bus_handle();
        let channel = channel.to_owned();
        tokio::spawn(async move {
            if let Err(err) = bus.channel_sync(&channel, feed).await {
                tracing::debug!(%err, channel, ?feed, "channel subscription change failed; the reconnect makes it");
            }
        });
    }

    /// Unsubscribes a client that left from all its channels.
    pub fn drop_subscriptions(&self, id: ClientId) {
        for channel in self.channels().of_client(id) {
            self.drop_subscription(id, &channel, true);
        }
    }

    /// Answers a HistoryRequest for `channel`: the latest `limit`
    /// publications older than `before`, as Publication frames.
    pub async fn history(
        &self,
        client: &Arc<ClientHandle>,
        id: MessageId,
        priority: Priority,
        channel: String,
        limit: u32,
        before: Option<u64>,
    ) {
        let refuse = |(code, message): Refusal| client.error(priority, Some(id), code, message);
        let namespace = match self.channels().namespace(&channel) {
            Ok(namespace) => namespace.clone(),
            Err(refusal) => return refuse(refusal),
        };
        let Some(retention) = namespace.retention() else {
            return refuse((
                error_code::NOT_ALLOWED,
                format!("history is off for the namespace of {channel}"),
            ));
        };
        if let Err(refusal) = Channels::may_subscribe(&namespace, client, &channel) {
            return refuse(refusal);
        }
        let most = self.config().max_history_page.min(retention.size as usize);
        if limit == 0 || limit as usize > most {
            return refuse((
                error_code::INVALID_FIELD,
                format!("limit must be 1..={most}, got {limit}"),
            ));
        }
        let page = match self
            .bus()
            .history(&channel, HistoryRange::Before(before), limit as usize)
            .await
        {
            Ok(page) => page,
            Err(err) => {
                return refuse((
                    error_code::CLUSTER_UNAVAILABLE,
                    format!("cannot read the history of {channel}: {err}"),
                ));
            }
        };
        // Newest kept first when the frame would grow past the limit.
        let room = (self.config().max_message_bytes.max(64 * 1024) * 4)
            .min(protocol::HARD_MAX_FRAME_BYTES - 64 * 1024);
        let mut publications = Vec::new();
        let mut bytes = 0;
        let mut more = page.more;
        for entry in page.entries.iter().rev() {
            let at = Position {
                epoch: page.position.epoch,
                offset: entry.offset,
            };
            let Some(frame) = crate::channels::publication_frame(&entry.frame, at) else {
                continue;
            };
            if bytes + frame.len() > room && !publications.is_empty() {
                more = true;
                break;
            }
            bytes += frame.len();
            publications.push(frame);
        }
        publications.reverse();
        client.reply(
            priority,
            Body::History {
                of: id,
                channel,
                position: page.position,
                publications,
                more,
            },
        );
    }

    /// Tells this node's subscribers of `channel` that track positions
    /// that they missed publications (`reason`): they get
    /// SubscriptionLost and may subscribe again with `since`.
    pub fn subscription_lost(&self, channel: &str, reason: &str) {
        for client in self.channels().position_subscribers(channel) {
            client.reply(
                Priority::High,
                Body::SubscriptionLost {
                    channel: channel.to_owned(),
                    reason: reason.to_owned(),
                },
            );
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

/// Where a client an operator unsubscribed was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribed {
    /// On this node, and subscribed: it is unsubscribed now.
    Local,
    /// On that node, which was asked to unsubscribe it.
    Remote(NodeId),
    /// Connected here but not subscribed to the channel.
    NotSubscribed,
    /// Not connected anywhere.
    Unknown,
}

impl Node {
    /// Publishes `payload` to `channel` as the server (no sender stamp),
    /// whatever the namespace's publish rule: the admin API's publish.
    /// Returns the frame's id and how many local subscribers got it; an
    /// error when it could not be handed to the other nodes (local
    /// subscribers still got it).
    pub async fn server_publish(
        &self,
        channel: &str,
        priority: Priority,
        payload: Payload,
    ) -> Result<(MessageId, usize), ServerPublishError> {
        self.channels()
            .namespace(channel)
            .map_err(|(_, why)| ServerPublishError::Channel(why))?;
        let frame = Frame::new(
            priority,
            Body::Publish {
                channel: channel.to_owned(),
                payload,
            },
        );
        let id = frame.id;
        let bytes =
            protocol::encode(&frame).map_err(|e| ServerPublishError::Channel(e.to_string()))?;
        if self.bus().clustered() && !self.bus().available() {
            let local = self
                .channels()
                .deliver(channel, priority, &bytes, false, None)
                .delivered;
            return Err(ServerPublishError::Bus {
                id,
                local,
                error: BusError::Unavailable("Redis is unreachable".into()),
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: PublishDone = Box::new(move |published| {
            let _ = tx.send(published);
        });
        let local =
            self.router()
                .publish_from_node(channel, priority, bytes, false, None, Some(done));
        match rx.await {
            Ok(Ok(_)) => Ok((id, local)),
            Ok(Err(error)) => Err(ServerPublishError::Bus { id, local, error }),
            Err(_) => Err(ServerPublishError::Bus {
                id,
                local,
                error: BusError::Unavailable("bus stopped".into()),
            }),
        }
    }

    /// Unsubscribes client `id` from `channel` wherever it is connected
    /// (the admin API); it gets an Unsubscribed frame with `reason`.
    pub async fn unsubscribe_client(
        &self,
        id: ClientId,
        channel: &str,
        reason: &str,
    ) -> Result<Unsubscribed, BusError> {
        if self.registry().get(id).is_some() {
            return Ok(if self.unsubscribe_by_operator(id, channel, reason) {
                Unsubscribed::Local
            } else {
                Unsubscribed::NotSubscribed
            });
        }
        if !self.bus().clustered() {
            return Ok(Unsubscribed::Unknown);
        }
        match self.bus().locate(id).await? {
            Some(node) if node != self.id() => {
                let message = BusMessage::Unsubscribe {
                    client: id,
                    channel: channel.to_owned(),
                    reason: reason.to_owned(),
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let done: PublishDone = Box::new(move |published| {
                    let _ = tx.send(published);
                });
                self.bus().publish(Target::Node(node), message, Some(done));
                match rx.await {
                    Ok(Ok(0)) => Ok(Unsubscribed::Unknown),
                    Ok(Ok(_)) => Ok(Unsubscribed::Remote(node)),
                    Ok(Err(err)) => Err(err),
                    Err(_) => Err(BusError::Unavailable("bus stopped".into())),
                }
            }
            _ => Ok(Unsubscribed::Unknown),
        }
    }
}

/// Why a server publication failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerPublishError {
    /// The channel name is invalid or its namespace undeclared.
    #[error("{0}")]
    Channel(String),
    /// Local subscribers got it, but the other nodes may not have.
    #[error("delivered to {local} local subscribers only: {error}")]
    Bus {
        /// The publication's id.
        id: MessageId,
        /// Local subscribers that got it.
        local: usize,
        /// What went wrong.
        error: BusError,
    },
}
