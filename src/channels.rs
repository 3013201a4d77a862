//! Channels on one node: who is subscribed to what here, and the namespace
//! rules that decide who may subscribe and publish. The node's channel
//! operations (`node::channel_ops`) keep the cluster bus in step with it:
//! the node takes a channel's publications only while it has a subscriber
//! of it (CLUSTER.md, "Fabric channels").
//!
//! A publication is encoded once, by the node it enters the cluster at;
//! every node then queues the same bytes to each of its subscribers
//! ([`Channels::deliver`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use crate::bus::LocalChannel;
use crate::config::{Namespace, NodeConfig, PublishPolicy, SubscribePolicy};
use crate::outbound::EnqueueError;
use crate::protocol::{
    self, Body, ClientId, ClientInfo, ErrorCode, Frame, Position, Priority, error_code, tag,
};
use crate::registry::{BroadcastCount, ClientHandle};

/// Why a channel operation is refused: the code and message the client
/// gets in its Error frame.
pub type Refusal = (ErrorCode, String);

struct Subscriber {
    handle: Arc<ClientHandle>,
    /// Wants Join and Leave events.
    events: bool,
    /// Gets publications of channels with history as Publication frames,
    /// with their positions (protocol version 3).
    positions: bool,
    /// While its SubscribeSince is being answered (`node::channel_ops`):
    /// the publications that arrived meanwhile, queued once it is.
    recovering: Mutex<Option<Recovering>>,
}

/// Publications that arrived for a subscriber while its recovery was read.
#[derive(Debug, Default)]
pub struct Recovering {
    /// Each publication's position and Publication frame, in arrival
    /// (offset) order.
    pub arrived: Vec<(Position, Bytes)>,
    bytes: usize,
    /// More arrived than [`MAX_RECOVERY_BUFFER`] allows: the recovery
    /// must be given up.
    pub overflowed: bool,
}

/// Most publications (and bytes) kept for one subscriber while its
/// recovery is read; past it, the recovery fails and may be retried.
pub const MAX_RECOVERY_BUFFER: (usize, usize) = (10_000, 16 * 1024 * 1024);

impl Recovering {
    fn push(&mut self, position: Position, frame: Bytes) {
        if self.overflowed {
            return;
        }
        self.bytes += frame.len();
        self.arrived.push((position, frame));
        if self.arrived.len() > MAX_RECOVERY_BUFFER.0 || self.bytes > MAX_RECOVERY_BUFFER.1 {
            self.overflowed = true;
            self.arrived = Vec::new();
        }
    }
}

/// The Publication frame (version 3) of a Publish frame (`frame`, length
/// prefix included) at `position`: same id, priority, time and sender.
pub fn publication_frame(frame: &Bytes, position: Position) -> Option<Bytes> {
    let mut decoded = protocol::decode_frame(frame.get(protocol::LENGTH_PREFIX_BYTES..)?).ok()?;
    let Body::Publish { channel, payload } = decoded.body else {
        return None;
    };
    decoded.body = Body::Publication {
        channel,
        payload,
        position,
    };
    protocol::encode(&Frame { ..decoded }).ok()
}

#[derive(Default)]
struct State {
    channels: HashMap<Arc<str>, HashMap<ClientId, Subscriber>>,
    /// How many subscribers of each channel want events (absent: none).
    eventful: HashMap<Arc<str>, usize>,
    by_client: HashMap<ClientId, HashSet<Arc<str>>>,
}

impl State {
    /// Whether client `id` is subscribed to `channel`.
    fn subscribed(&self, id: ClientId, channel: &str) -> bool {
        self.by_client
            .get(&id)
            .is_some_and(|set| set.contains(channel))
    }

    fn counts(&self, channel: &str) -> Counts {
        Counts {
            subscribers: self.channels.get(channel).map_or(0, HashMap::len),
            events: self.eventful.get(channel).copied().unwrap_or(0),
        }
    }

    /// One more (`up`) or one fewer subscriber of `channel` wants events.
    fn count_events(&mut self, channel: &Arc<str>, up: bool) {
        let count = self.eventful.entry(channel.clone()).or_default();
        if up {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.eventful.remove(channel);
            }
        }
    }
}

/// A channel's local subscribers: all of them, and those that want Join
/// and Leave events. What the node takes from the cluster follows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Subscribers.
    pub subscribers: usize,
    /// Subscribers that want events.
    pub events: usize,
}

/// What [`Channels::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new subscription; the channel has `count` local subscribers now.
    New {
        /// Local subscribers, this one included.
        count: usize,
    },
    /// The client was subscribed already (its events choice is updated).
    Again,
}

/// The channels of this node's clients, and the namespace rules.
pub struct Channels {
    default: Namespace,
    namespaces: HashMap<String, Namespace>,
    max_subscriptions: usize,
    state: RwLock<State>,
}

impl Channels {
    /// Channels with the namespaces and limits of `config`.
    pub fn new(config: &NodeConfig) -> Self {
        Channels {
            default: config.default_namespace(),
            namespaces: config
                .namespaces
                .iter()
                .map(|n| (n.name.clone(), n.clone()))
                .collect(),
            max_subscriptions: config.max_subscriptions,
            state: RwLock::new(State::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `channel` against the grammar and finds its namespace.
    pub fn namespace(&self, channel: &str) -> Result<&Namespace, Refusal> {
        if let Err(why) = protocol::valid_channel(channel) {
            return Err((error_code::INVALID_FIELD, format!("channel {why}")));
        }
        match protocol::split_channel(channel) {
            ("", _) => Ok(&self.default),
            (namespace, _) => self.namespaces.get(namespace).ok_or_else(|| {
                (
                    error_code::UNKNOWN_NAMESPACE,
                    format!("namespace {namespace:?} is not declared on this node"),
                )
            }),
        }
    }

    /// The history `channel` keeps, if its namespace keeps one (and the
    /// name is valid).
    pub fn retention(&self, channel: &str) -> Option<crate::bus::Retention> {
        self.namespace(channel).ok().and_then(Namespace::retention)
    }

    /// Whether `client` may subscribe to `channel` of `namespace`.
    pub fn may_subscribe(
        namespace: &Namespace,
        client: &ClientHandle,
        channel: &str,
    ) -> Result<(), Refusal> {
        let allowed = match namespace.subscribe {
            SubscribePolicy::Anyone => true,
            SubscribePolicy::Authenticated => client.info.user.is_some(),
            SubscribePolicy::Granted => client.access.grants(channel),
        };
        if allowed {
            return Ok(());
        }
        Err((
            error_code::NOT_ALLOWED,
            match namespace.subscribe {
                SubscribePolicy::Authenticated => {
                    format!("subscribing to {channel} needs an authenticated user")
                }
                _ => format!("the token's channels claim does not grant {channel}"),
            },
        ))
    }

    /// Whether `client` may publish to `channel` of `namespace`.
    pub fn may_publish(
        &self,
        namespace: &Namespace,
        client: &ClientHandle,
        channel: &str,
    ) -> Result<(), Refusal> {
        let refuse = |why: String| Err((error_code::NOT_ALLOWED, why));
        match namespace.publish {
            PublishPolicy::Anyone => Ok(()),
            PublishPolicy::Subscribers if self.is_subscribed(client.id(), channel) => Ok(()),
            PublishPolicy::Subscribers => {
                refuse(format!("only subscribers of {channel} may publish to it"))
            }
            PublishPolicy::Granted if client.access.grants(channel) => Ok(()),
            PublishPolicy::Granted => refuse(format!(
                "the token's channels claim does not grant {channel}"
            )),
            PublishPolicy::Nobody => refuse(format!(
                "clients may not publish to {channel}; only the server does"
            )),
        }
    }

    /// Whether client `id` is subscribed to `channel` here.
    pub fn is_subscribed(&self, id: ClientId, channel: &str) -> bool {
        self.read().subscribed(id, channel)
    }

    /// Subscribes `client` to `channel`, or updates its `events` choice.
    /// `changed(before, after)` runs under the lock with the channel's
    /// local counts before and after, so bus writes stay in the order of
    /// the changes.
    /// With `recovering`, the subscriber starts (or, subscribed already,
    /// starts again) collecting what arrives instead of receiving it, until
    /// [`Channels::finish_recovery`].
    pub fn add(
        &self,
        client: &Arc<ClientHandle>,
        channel: &str,
        events: bool,
        recovering: bool,
        changed: impl FnOnce(Counts, Counts),
    ) -> Result<Added, Refusal> {
        let mut state = self.write();
        let state = &mut *state;
        let before = state.counts(channel);
        let mine = state.by_client.entry(client.id()).or_default();
        if let Some(name) = mine.get(channel).cloned() {
            let sub = state
                .channels
                .get_mut(channel)
                .and_then(|subs| subs.get_mut(&client.id()));
            if let Some(sub) = sub {
                if recovering {
                    let mut held = lock(&sub.recovering);
                    if held.is_some() {
                        return Err((
                            error_code::SERVER_BUSY,
                            format!(
                                "a recovery of {channel} is under way on this connection; retry when it is answered"
                            ),
                        ));
                    }
                    *held = Some(Recovering::default());
                }
                if sub.events != events {
                    sub.events = events;
                    state.count_events(&name, events);
                    changed(before, state.counts(channel));
                }
            }
            return Ok(Added::Again);
        }
        if mine.len() >= self.max_subscriptions {
            let max = self.max_subscriptions;
            if mine.is_empty() {
                state.by_client.remove(&client.id());
            }
            return Err((
                error_code::TOO_MANY_SUBSCRIPTIONS,
                format!("already subscribed to {max} channels, the most a client may have"),
            ));
        }
        let name: Arc<str> = match state.channels.get_key_value(channel) {
            Some((name, _)) => name.clone(),
            None => Arc::from(channel),
        };
        mine.insert(name.clone());
        state.channels.entry(name.clone()).or_default().insert(
            client.id(),
            Subscriber {
                handle: client.clone(),
                events,
                positions: client.access.version >= protocol::RECOVERY_VERSION,
                recovering: Mutex::new(recovering.then(Recovering::default)),
            },
        );
        if events {
            state.count_events(&name, true);
        }
        let after = state.counts(channel);
        changed(before, after);
        Ok(Added::New {
            count: after.subscribers,
        })
    }

    /// Unsubscribes client `id` from `channel`. `changed(before, after)`
    /// runs under the lock with the channel's local counts. Returns the
    /// client's info if it was subscribed.
    pub fn remove(
        &self,
        id: ClientId,
        channel: &str,
        changed: impl FnOnce(Counts, Counts),
    ) -> Option<ClientInfo> {
        let mut state = self.write();
        let state = &mut *state;
        let before = state.counts(channel);
        let mine = state.by_client.get_mut(&id)?;
        let name = mine.take(channel)?;
        if mine.is_empty() {
            state.by_client.remove(&id);
        }
        let subs = state.channels.get_mut(channel)?;
        let removed = subs.remove(&id)?;
        if subs.is_empty() {
            state.channels.remove(channel);
        }
        if removed.events {
            state.count_events(&name, false);
        }
        changed(before, state.counts(channel));
        Some(removed.handle.info.clone())
    }

    /// Runs `f` under the lock if client `id` is subscribed to `channel`
    /// (so what it writes cannot follow the unsubscription's writes).
    pub fn while_subscribed<T>(
        &self,
        id: ClientId,
        channel: &str,
        f: impl FnOnce() -> T,
    ) -> Option<T> {
        let state = self.read();
        state.subscribed(id, channel).then(f)
    }

    /// The channels client `id` is subscribed to.
    pub fn of_client(&self, id: ClientId) -> Vec<String> {
        self.read()
            .by_client
            .get(&id)
            .map(|set| set.iter().map(|c| c.to_string()).collect())
            .unwrap_or_default()
    }

    /// Queues `frame` for the local subscribers of `channel` (only those
    /// that want events when `event`), except `exclude`. The same bytes go
    /// to every subscriber.
    pub fn deliver(
        &self,
        channel: &str,
        priority: Priority,
        frame: &Bytes,
        event: bool,
        exclude: Option<ClientId>,
    ) -> BroadcastCount {
        deliver(&self.read(), channel, priority, frame, event, exclude)
    }

    /// How many of this node's clients are subscribed to `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.read().channels.get(channel).map_or(0, HashMap::len)
    }

    /// Queues a publication of a channel with history (`frame`, a Publish)
    /// at `position`: subscribers that track positions get it as a
    /// Publication (encoded once), the others as it is; subscribers being
    /// recovered keep it for later.
    pub fn deliver_positioned(
        &self,
        channel: &str,
        priority: Priority,
        frame: &Bytes,
        position: Position,
    ) -> BroadcastCount {
        deliver_at(&self.read(), channel, priority, frame, position)
    }

    /// Ends client `id`'s recovery on `channel`: runs `finish` with what
    /// arrived meanwhile, under the subscriber's lock, so nothing that
    /// arrives later can be queued before what `finish` queues. `None`
    /// when the client is no longer subscribed.
    pub fn finish_recovery<T>(
        &self,
        id: ClientId,
        channel: &str,
        finish: impl FnOnce(Recovering) -> T,
    ) -> Option<T> {
        let state = self.read();
        let sub = state.channels.get(channel)?.get(&id)?;
        let mut recovering = lock(&sub.recovering);
        let arrived = recovering.take().unwrap_or_default();
        Some(finish(arrived))
    }

    /// Whether client `id`'s recovery on `channel` collected more than it
    /// may (or it is no longer subscribed).
    pub fn recovery_overflowed(&self, id: ClientId, channel: &str) -> bool {
        let state = self.read();
        state
            .channels
            .get(channel)
            .and_then(|subs| subs.get(&id))
            .is_none_or(|sub| lock(&sub.recovering).as_ref().is_some_and(|r| r.overflowed))
    }

    /// The local subscribers of `channel` that track positions.
    pub fn position_subscribers(&self, channel: &str) -> Vec<Arc<ClientHandle>> {
        self.read()
            .channels
            .get(channel)
            .map(|subs| {
                // Not those being recovered: their recovery reads what
                // is still there, and says what is not.
                subs.values()
                    .filter(|s| s.positions && lock(&s.recovering).is_none())
                    .map(|s| s.handle.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A Join of `member` to `channel`, only while it is still subscribed:
    /// under one lock, it checks, queues `frame` for the local subscribers
    /// that want events and runs `publish` (which hands it to the bus), so
    /// no unsubscription (and its Leave) can come in between. Returns
    /// whether it was sent.
    pub fn join_while_subscribed(
        &self,
        member: ClientId,
        channel: &str,
        frame: &Bytes,
        publish: impl FnOnce(),
    ) -> bool {
        let state = self.read();
        let subscribed = state.subscribed(member, channel);
        if subscribed {
            deliver(&state, channel, Priority::Normal, frame, true, Some(member));
            publish();
        }
        subscribed
    }

    /// Number of channels with local subscribers, and of subscriptions.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.read();
        (
            state.channels.len(),
            state.channels.values().map(HashMap::len).sum(),
        )
    }

    /// Local subscriptions per declared namespace (`default` for the
    /// default namespace), every namespace listed.
    pub fn subscriptions_by_namespace(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<&str, usize> = self
            .namespaces
            .keys()
            .map(|n| (n.as_str(), 0))
            .chain([("", 0)])
            .collect();
        let state = self.read();
        for (name, subs) in &state.channels {
            let (namespace, _) = protocol::split_channel(name);
            if let Some(count) = counts.get_mut(namespace) {
                *count += subs.len();
            }
        }
        let mut counts: Vec<(String, usize)> = counts
            .into_iter()
            .map(|(n, c)| (if n.is_empty() { "default" } else { n }.to_owned(), c))
            .collect();
        counts.sort();
        counts
    }

    /// The local members of `channel`.
    pub fn local_members(&self, channel: &str) -> Vec<ClientInfo> {
        self.read()
            .channels
            .get(channel)
            .map(|subs| subs.values().map(|s| s.handle.info.clone()).collect())
            .unwrap_or_default()
    }

    /// The channels with local subscribers whose namespace keeps presence.
    pub fn presence_channels(&self) -> Vec<String> {
        self.read()
            .channels
            .keys()
            .filter(|name| self.namespace(name).is_ok_and(|ns| ns.presence))
            .map(|name| name.to_string())
            .collect()
    }

    /// Every channel with local subscribers, with its members where its
    /// namespace keeps presence.
    pub fn local_channels(&self) -> Vec<LocalChannel> {
        let state = self.read();
        state
            .channels
            .iter()
            .map(|(name, subs)| {
                let presence = self.namespace(name).is_ok_and(|ns| ns.presence);
                LocalChannel {
                    name: name.to_string(),
                    subscribers: subs.len(),
                    members: presence
                        .then(|| subs.values().map(|s| s.handle.info.clone()).collect()),
                }
            })
            .collect()
    }
}

/// [`Channels::deliver`] under a lock already held.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`deliver`] of a publication of a channel with history, at `position`.
fn deliver_at(
    state: &State,
    channel: &str,
    priority: Priority,
    frame: &Bytes,
    position: Position,
) -> BroadcastCount {
    let mut count = BroadcastCount::default();
    let Some(subs) = state.channels.get(channel) else {
        return count;
    };
    // Encoded once, for the first subscriber that needs it.
    let mut positioned: Option<Option<Bytes>> = None;
    for sub in subs.values() {
        let built = match sub.positions {
            true => positioned.get_or_insert_with(|| publication_frame(frame, position)),
            false => &None,
        };
        let (bytes, frame_tag) = match built {
            Some(bytes) => (bytes.clone(), tag::PUBLICATION),
            None => (frame.clone(), tag::PUBLISH),
        };
        if let Some(recovering) = lock(&sub.recovering).as_mut() {
            recovering.push(position, bytes);
            count.delivered += 1;
            continue;
        }
        match sub.handle.enqueue(priority, frame_tag, bytes) {
            Ok(()) => count.delivered += 1,
            Err(EnqueueError::NodeBusy) => {
                count.node_busy += 1;
                if sub.positions {
                    // Not silently: it subscribes again from its position
                    // (a reply: it passes the exhausted node budget).
                    sub.handle.reply(
                        Priority::High,
                        Body::SubscriptionLost {
                            channel: channel.to_owned(),
                            reason: format!(
                                "the node's queues were full: missed offset {}",
                                position.offset
                            ),
                        },
                    );
                }
            }
            Err(_) => {}
        }
    }
    count
}

fn deliver(
    state: &State,
    channel: &str,
    priority: Priority,
    frame: &Bytes,
    event: bool,
    exclude: Option<ClientId>,
) -> BroadcastCount {
    let mut count = BroadcastCount::default();
    let Some(subs) = state.channels.get(channel) else {
        return count;
    };
    let tag = if event {
        event_tag(frame)
    } else {
        tag::PUBLISH
    };
    for (id, sub) in subs {
        if Some(*id) == exclude || (event && !sub.events) {
            continue;
        }
        match sub.handle.enqueue(priority, tag, frame.clone()) {
            Ok(()) => count.delivered += 1,
            Err(EnqueueError::NodeBusy) => count.node_busy += 1,
            Err(_) => {}
        }
    }
    count
}

/// The wire tag (Join or Leave) of an event frame, for the counters. Events
/// come from a node, without a sender stamp, so the body's tag sits right
/// after the fixed header: id (16), priority (4), timestamp (8), and the
/// `None` of the sender (1).
fn event_tag(frame: &Bytes) -> usize {
    const AT: usize = protocol::LENGTH_PREFIX_BYTES + 16 + 4 + 8 + 1;
    frame
        .get(AT..AT + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .map_or(tag::JOIN, |t| t as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Body, ClientId, ClientInfo, Frame, NodeId, Priority};

    #[test]
    fn an_events_tag_is_read_from_its_fixed_header() {
        let member = ClientInfo {
            client_id: ClientId::new_random(),
            node_id: NodeId::new_random(),
            name: "m".into(),
            user: None,
            connected_at_ms: 1,
        };
        for (body, expected) in [
            (
                Body::Join {
                    channel: "c".into(),
                    member: member.clone(),
                },
                tag::JOIN,
            ),
            (
                Body::Leave {
                    channel: "c".into(),
                    member,
                },
                tag::LEAVE,
            ),
        ] {
            let frame = protocol::encode(&Frame::new(Priority::Normal, body)).unwrap();
            assert_eq!(event_tag(&frame), expected);
        }
    }
}
