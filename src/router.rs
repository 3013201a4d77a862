//! The message router: decides where a message goes. Local recipients get
//! it straight into their queues; recipients on other nodes get it through
//! the cluster bus. It answers the sender (Ack or Error) once the outcome is
//! known, delivers what other nodes route here, and settles the delivery
//! receipts that come back.
//!
//! A direct message to a client of another node is acknowledged only when
//! that node's delivery receipt comes back, so an Ack means the same thing
//! everywhere: queued for the recipient. A cross-node direct, by name:
//! [`MessageRouter::direct`] → `Bus::publish` (answer: `answer_direct`) →
//! on the target node, `Node::handle_cluster_event` →
//! [`MessageRouter::deliver_direct`] → receipt → on this node,
//! `Node::handle_cluster_event` → [`MessageRouter::settle_receipt`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{debug, warn};

use crate::bus::{
    Bus, BusError, BusMessage, ClusterBus, DeliveryOutcome, PublishDone, Retention, SessionLimits,
    Storing, Target,
};
use crate::channels::Channels;
use crate::outbound::EnqueueError;
use crate::protocol::{
    self, Body, ClientId, Frame, MessageId, NodeId, Position, Priority, error_code, tag,
};
use crate::registry::{BroadcastCount, ClientHandle, Registry};
use crate::stats::Stats;

/// Most client→node lookups kept; the cache is cleared when it fills.
const LOCATE_CACHE_MAX: usize = 100_000;

/// A cross-node direct message waiting for its delivery receipt.
struct PendingDelivery {
    to: ClientId,
    node: NodeId,
    priority: Priority,
    deadline: Instant,
}

/// A message to a user, with no connection of the user on this node,
/// waiting for the receipts of the nodes that have one.
struct PendingUser {
    user: String,
    /// Nodes that have not answered yet.
    waiting: std::collections::HashSet<NodeId>,
    /// What the answers so far reached (nothing delivered yet).
    reach: Reach,
    priority: Priority,
    deadline: Instant,
}

/// Who learns what became of a direct message held for a client whose
/// session is being resumed here.
enum HeldAnswer {
    /// The sender, a client of this node.
    Local(Arc<ClientHandle>, MessageId),
    /// The sender's node, by receipt.
    Remote {
        origin: NodeId,
        message_id: MessageId,
        sender: ClientId,
    },
}

/// A direct message for a client whose session is being resumed here,
/// kept until its connection is registered so that it follows the
/// messages stored while the session was away.
struct Held {
    priority: Priority,
    frame: Bytes,
    answer: HeldAnswer,
}

/// Delivers messages to local clients and, through the bus, to other nodes.
pub struct MessageRouter {
    node_id: NodeId,
    registry: Arc<Registry>,
    channels: Arc<Channels>,
    bus: Arc<Bus>,
    pending: Mutex<HashMap<(ClientId, MessageId), PendingDelivery>>,
    pending_users: Mutex<HashMap<(ClientId, MessageId), PendingUser>>,
    located: Mutex<HashMap<ClientId, NodeId>>,
    /// Clients whose sessions are being resumed here, and the direct
    /// messages that arrived for them meanwhile.
    holding: Mutex<HashMap<ClientId, Vec<Held>>>,
    /// Sessions' limits, when sessions are on: a direct message for a
    /// client that is not connected is offered to its session's store.
    sessions: Option<SessionLimits>,
    delivery_timeout: Duration,
    max_pending: usize,
    stats: Arc<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes and returns the entries of `pending` whose deadline has passed.
fn take_expired<K: Copy + Eq + std::hash::Hash, V>(
    pending: &Mutex<HashMap<K, V>>,
    deadline: impl Fn(&V) -> Instant,
) -> Vec<(K, V)> {
    let now = Instant::now();
    let mut pending = lock(pending);
    let keys: Vec<K> = pending
        .iter()
        .filter(|(_, p)| deadline(p) <= now)
        .map(|(k, _)| *k)
        .collect();
    keys.into_iter()
        .filter_map(|k| pending.remove(&k).map(|p| (k, p)))
        .collect()
}

impl MessageRouter {
    /// A router for node `node_id` over its local registry and bus. At most
    /// `max_pending` cross-node directs wait for receipts at once, each for
    /// at most `delivery_timeout`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: NodeId,
        registry: Arc<Registry>,
        channels: Arc<Channels>,
        bus: Arc<Bus>,
        delivery_timeout: Duration,
        max_pending: usize,
        sessions: Option<SessionLimits>,
        stats: Arc<Stats>,
    ) -> Self {
        MessageRouter {
            node_id,
            registry,
            channels,
            bus,
            pending: Mutex::new(HashMap::new()),
            pending_users: Mutex::new(HashMap::new()),
            located: Mutex::new(HashMap::new()),
            holding: Mutex::new(HashMap::new()),
            sessions,
            delivery_timeout,
            max_pending,
            stats,
        }
    }

    /// How often [`MessageRouter::expire_deliveries`] should run.
    pub fn expiry_period(&self) -> Duration {
        (self.delivery_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// Delivers a broadcast from `from` to every other client of the
    /// cluster and answers the sender. When other nodes cannot be reached
    /// the local clients still get it and the sender gets
    /// CLUSTER_UNAVAILABLE instead of an Ack.
    pub fn broadcast(
        &self,
        from: &Arc<ClientHandle>,
        id: MessageId,
        priority: Priority,
        frame: Bytes,
    ) {
        let started = Instant::now();
        let count = self.registry.broadcast(Some(from.id()), priority, &frame);
        self.stats
            .delivery_local
            .observe(started.elapsed().as_secs_f64());
        let local = count.delivered;
        if !self.goes_on(from, id, priority, count, "clients") {
            return;
        }
        let message = BusMessage::Broadcast {
            origin: self.node_id,
            priority,
            frame,
        };
        self.bus.publish(
            Target::AllNodes,
            message,
            Some(answer_broadcast(from.clone(), id, priority, local)),
        );
    }

    /// After a message from `from` was queued locally (`count`; `whom`
    /// names the recipients in messages): whether it goes on to the other
    /// nodes. If not, the sender is answered here: SERVER_BUSY when local
    /// recipients missed it (nothing lost silently; it is not sent on),
    /// Ack on a lone node, CLUSTER_UNAVAILABLE when the bus is down.
    fn goes_on(
        &self,
        from: &ClientHandle,
        id: MessageId,
        priority: Priority,
        count: BroadcastCount,
        whom: &str,
    ) -> bool {
        let local = count.delivered;
        if count.node_busy > 0 {
            from.error(
                priority,
                Some(id),
                error_code::SERVER_BUSY,
                format!(
                    "delivered to {local} {whom} on this node; {} missed it because the node's queues are full (not sent to other nodes)",
                    count.node_busy
                ),
            );
            return false;
        }
        if !self.bus.clustered() {
            from.ack(priority, id);
            return false;
        }
        if !self.bus.available() {
            from.error(
                priority,
                Some(id),
                error_code::CLUSTER_UNAVAILABLE,
                format!(
                    "delivered to {local} {whom} on this node only: the cluster bus is unavailable"
                ),
            );
            return false;
        }
        true
    }

    /// Delivers a direct message from `from` to `to`, wherever it is, and
    /// answers the sender (now, or when the target node's receipt arrives).
    pub async fn direct(
        self: &Arc<Self>,
        from: &Arc<ClientHandle>,
        id: MessageId,
        to: ClientId,
        priority: Priority,
        frame: Bytes,
    ) {
        let started = Instant::now();
        if self
            .deliver_here(to, priority, &frame, HeldAnswer::Local(from.clone(), id))
            .is_ok()
        {
            self.stats
                .delivery_local
                .observe(started.elapsed().as_secs_f64());
            return;
        }
        if !self.bus.clustered() {
            return self.store(from, id, to, priority, frame, true);
        }
        if !self.bus.available() {
            return from.error(
                priority,
                Some(id),
                error_code::CLUSTER_UNAVAILABLE,
                format!("client {to} is not on this node and the cluster bus is unavailable"),
            );
        }
        let node = match self.locate(to).await {
            Ok(Some(node)) if node != self.node_id => node,
            // Not connected: maybe a session waiting for a resume.
            Ok(_) => return self.store(from, id, to, priority, frame, true),
            Err(err) => {
                return from.error(priority, Some(id), error_code::CLUSTER_UNAVAILABLE, err);
            }
        };
        self.send_direct(from, id, to, node, priority, frame, true);
    }

    /// Sends a direct message to the node `to` is on (`node`); its
    /// receipt answers the sender. If that node turns out to be gone and
    /// `may_store`, the message is offered to `to`'s session's store.
    #[allow(clippy::too_many_arguments)]
    fn send_direct(
        self: &Arc<Self>,
        from: &Arc<ClientHandle>,
        id: MessageId,
        to: ClientId,
        node: NodeId,
        priority: Priority,
        frame: Bytes,
        may_store: bool,
    ) {
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= self.max_pending {
                drop(pending);
                return from.error(
                    priority,
                    Some(id),
                    error_code::CLUSTER_UNAVAILABLE,
                    "too many cross-node messages awaiting delivery; retry later",
                );
            }
            if pending.contains_key(&(from.id(), id)) {
                drop(pending);
                return from.error(
                    priority,
                    Some(id),
                    error_code::INVALID_FIELD,
                    "a message with this id is already awaiting delivery",
                );
            }
            pending.insert(
                (from.id(), id),
                PendingDelivery {
                    to,
                    node,
                    priority,
                    deadline: Instant::now() + self.delivery_timeout,
                },
            );
        }
        let retry = (may_store && self.sessions.is_some()).then(|| frame.clone());
        let message = BusMessage::Direct {
            origin: self.node_id,
            message_id: id,
            sender: from.id(),
            to,
            priority,
            frame,
        };
        self.bus.publish(
            Target::Node(node),
            message,
            Some(answer_direct(
                self.clone(),
                from.clone(),
                id,
                to,
                priority,
                retry,
            )),
        );
    }

    /// Queues a direct message for `to` if it is connected here, or keeps
    /// it if `to`'s session is being resumed here; either way `answer`
    /// learns the outcome. Gives `answer` back when `to` is not here.
    fn deliver_here(
        &self,
        to: ClientId,
        priority: Priority,
        frame: &Bytes,
        answer: HeldAnswer,
    ) -> Result<(), HeldAnswer> {
        if let Some(target) = self.registry.get(to) {
            let outcome = match target.enqueue(priority, tag::DIRECT, frame.clone()) {
                Ok(()) => DeliveryOutcome::Delivered,
                Err(err) => outcome_of(err),
            };
            self.answer_held(to, priority, answer, outcome);
            return Ok(());
        }
        if self.sessions.is_none() {
            return Err(answer);
        }
        {
            let mut holding = lock(&self.holding);
            if let Some(held) = holding.get_mut(&to) {
                held.push(Held {
                    priority,
                    frame: frame.clone(),
                    answer,
                });
                return Ok(());
            }
        }
        // Registered while the holding lock was taken?
        match self.registry.get(to) {
            Some(_) => self.deliver_here(to, priority, frame, answer),
            None => Err(answer),
        }
    }

    fn answer_held(
        &self,
        to: ClientId,
        priority: Priority,
        answer: HeldAnswer,
        outcome: DeliveryOutcome,
    ) {
        match answer {
            HeldAnswer::Local(from, id) => reply_outcome(&from, priority, id, to, outcome),
            HeldAnswer::Remote {
                origin,
                message_id,
                sender,
            } => self.bus.publish(
                Target::Node(origin),
                BusMessage::Receipt {
                    message_id,
                    sender,
                    to,
                    outcome,
                },
                None,
            ),
        }
    }

    /// Starts keeping direct messages for `client`, whose session is being
    /// resumed here, until [`MessageRouter::release`].
    pub fn hold(&self, client: ClientId) {
        lock(&self.holding).entry(client).or_default();
    }

    /// Queues to `handle` the messages stored for its session, then those
    /// kept since [`MessageRouter::hold`], and registers it with
    /// `register`, all before any later direct message can reach it.
    pub fn release<E>(
        &self,
        handle: &Arc<ClientHandle>,
        stored: Vec<BusMessage>,
        register: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut holding = lock(&self.holding);
        let held = holding.remove(&handle.id()).unwrap_or_default();
        for message in stored {
            if let BusMessage::Direct {
                priority, frame, ..
            } = message
                && let Err(err) = handle.enqueue(priority, tag::DIRECT, frame)
            {
                warn!(client = %handle.id(), ?err, "a stored direct message could not be queued");
            }
        }
        let registered = register();
        for Held {
            priority,
            frame,
            answer,
        } in held
        {
            let outcome = match &registered {
                Ok(()) => match handle.enqueue(priority, tag::DIRECT, frame) {
                    Ok(()) => DeliveryOutcome::Delivered,
                    Err(err) => outcome_of(err),
                },
                Err(_) => DeliveryOutcome::UnknownClient,
            };
            self.answer_held(handle.id(), priority, answer, outcome);
        }
        drop(holding);
        registered
    }

    /// Stops keeping messages for `client` (its resume failed); what was
    /// kept is answered as for a client that is not connected.
    pub fn drop_hold(&self, client: ClientId) {
        let held = lock(&self.holding).remove(&client).unwrap_or_default();
        for Held {
            priority, answer, ..
        } in held
        {
            self.answer_held(client, priority, answer, DeliveryOutcome::UnknownClient);
        }
    }

    /// Offers a direct message for `to`, which is not connected to this
    /// node, to `to`'s session's store (when sessions are on) and answers
    /// the sender; a session attached to another live node gets it there
    /// (once: `may_forward`).
    fn store(
        self: &Arc<Self>,
        from: &Arc<ClientHandle>,
        id: MessageId,
        to: ClientId,
        priority: Priority,
        frame: Bytes,
        may_forward: bool,
    ) {
        let Some(limits) = self.sessions else {
            return reply_outcome(from, priority, id, to, DeliveryOutcome::UnknownClient);
        };
        let message = BusMessage::Direct {
            origin: self.node_id,
            message_id: id,
            sender: from.id(),
            to,
            priority,
            frame: frame.clone(),
        };
        let router = self.clone();
        let from = from.clone();
        let done = Box::new(move |stored: Result<Storing, BusError>| match stored {
            Ok(Storing::Attached(node)) if node != router.node_id && may_forward => {
                router.send_direct(&from, id, to, node, priority, frame, false)
            }
            Ok(Storing::Attached(_)) => {
                let answer = HeldAnswer::Local(from.clone(), id);
                if let Err(HeldAnswer::Local(from, id)) =
                    router.deliver_here(to, priority, &frame, answer)
                {
                    from.error(
                        priority,
                        Some(id),
                        error_code::CLUSTER_UNAVAILABLE,
                        format!("client {to} is moving between nodes; retry"),
                    );
                }
            }
            Ok(stored) => reply_outcome(&from, priority, id, to, stored_outcome(stored)),
            Err(err) => from.error(priority, Some(id), error_code::CLUSTER_UNAVAILABLE, err),
        });
        self.bus.store_direct(message, limits, done);
    }

    async fn locate(&self, to: ClientId) -> Result<Option<NodeId>, BusError> {
        if let Some(node) = lock(&self.located).get(&to) {
            return Ok(Some(*node));
        }
        let node = self.bus.locate(to).await?;
        if let Some(node) = node {
            let mut located = lock(&self.located);
            if located.len() >= LOCATE_CACHE_MAX {
                located.clear();
            }
            located.insert(to, node);
        }
        Ok(node)
    }

    /// Queues a broadcast another node sent for this node's clients.
    pub fn deliver_broadcast(&self, priority: Priority, frame: &Bytes) {
        let count = self.registry.broadcast(None, priority, frame);
        if count.node_busy > 0 {
            // The origin acknowledged once every node received it; all that
            // is left is to make the loss visible here (PROTOCOL.md §5).
            warn!(
                missed = count.node_busy,
                "cluster broadcast not delivered to some clients: node queues full"
            );
        }
    }

    /// Queues a direct message another node routed to a client of this
    /// node, and sends that node the delivery receipt.
    pub fn deliver_direct(
        &self,
        origin: NodeId,
        message_id: MessageId,
        sender: ClientId,
        to: ClientId,
        priority: Priority,
        frame: Bytes,
    ) {
        let answer = HeldAnswer::Remote {
            origin,
            message_id,
            sender,
        };
        let Err(answer) = self.deliver_here(to, priority, &frame, answer) else {
            return;
        };
        let Some(limits) = self.sessions else {
            return self.answer_held(to, priority, answer, DeliveryOutcome::UnknownClient);
        };
        // Not here (any more): its session may wait for a resume, or have
        // been resumed on another node.
        let message = BusMessage::Direct {
            origin,
            message_id,
            sender,
            to,
            priority,
            frame,
        };
        let forward = message.clone();
        let bus = self.bus.clone();
        let me = self.node_id;
        let done = Box::new(move |stored: Result<Storing, BusError>| {
            let outcome = match stored {
                Ok(Storing::Attached(node)) if node != me => {
                    // Its receipt goes to the origin from there.
                    return bus.publish(Target::Node(node), forward, None);
                }
                Ok(stored) => stored_outcome(stored),
                Err(err) => {
                    warn!(%err, "cannot store a direct message for a session");
                    return;
                }
            };
            let receipt = BusMessage::Receipt {
                message_id,
                sender,
                to,
                outcome,
            };
            bus.publish(Target::Node(origin), receipt, None);
        });
        self.bus.store_direct(message, limits, done);
    }

    /// Answers the sender of a cross-node direct message from its
    /// delivery receipt.
    pub fn settle_receipt(
        &self,
        message_id: MessageId,
        sender: ClientId,
        to: ClientId,
        outcome: DeliveryOutcome,
    ) {
        let Some(pending) = lock(&self.pending).remove(&(sender, message_id)) else {
            debug!(%message_id, "receipt for an expired or unknown delivery");
            return;
        };
        if outcome == DeliveryOutcome::UnknownClient {
            lock(&self.located).remove(&to);
        }
        if outcome == DeliveryOutcome::Delivered {
            let started = pending.deadline - self.delivery_timeout;
            self.stats
                .delivery_cross_node
                .observe(started.elapsed().as_secs_f64());
        }
        if let Some(from) = self.registry.get(sender) {
            reply_outcome(&from, pending.priority, message_id, to, outcome);
        }
    }

    /// Fails deliveries whose receipt did not come in time.
    pub fn expire_deliveries(&self) {
        self.expire_user_deliveries();
        let expired = take_expired(&self.pending, |p| p.deadline);
        for ((sender, id), p) in expired {
            warn!(%id, node = %p.node, "no delivery receipt in time");
            lock(&self.located).remove(&p.to);
            if let Some(from) = self.registry.get(sender) {
                from.error(
                    p.priority,
                    Some(id),
                    error_code::CLUSTER_UNAVAILABLE,
                    format!(
                        "no delivery receipt from node {} within {:?}; the message may not have been delivered",
                        p.node, self.delivery_timeout
                    ),
                );
            }
        }
    }
}

impl MessageRouter {
    /// A channel publication (or Join/Leave event, `event`) from this node
    /// for the bus.
    fn publication(
        &self,
        channel: &str,
        priority: Priority,
        event: bool,
        frame: Bytes,
    ) -> BusMessage {
        BusMessage::Publication {
            origin: self.node_id,
            channel: channel.to_owned(),
            priority,
            event,
            frame,
        }
    }
}

/// Answers a client's publication once the bus has it: Ack, or
/// CLUSTER_UNAVAILABLE saying `short` and why.
fn answer_publish(
    from: &Arc<ClientHandle>,
    id: MessageId,
    priority: Priority,
    short: String,
) -> PublishDone {
    let sender = from.clone();
    Box::new(move |published| match published {
        Ok(_) => sender.ack(priority, id),
        Err(err) => sender.error(
            priority,
            Some(id),
            error_code::CLUSTER_UNAVAILABLE,
            format!("{short}: {err}"),
        ),
    })
}

impl MessageRouter {
    /// Publishes a client's frame to `channel`: the local subscribers get
    /// it at once, the other nodes' through the bus; the sender is
    /// answered once Redis accepted it for them (PROTOCOL.md section 7).
    pub fn publish(
        &self,
        from: &Arc<ClientHandle>,
        id: MessageId,
        priority: Priority,
        channel: &str,
        frame: Bytes,
    ) {
        if let Some(retention) = self.channels.retention(channel) {
            return self.publish_with_history(from, id, priority, channel, frame, retention);
        }
        let started = Instant::now();
        let count = self
            .channels
            .deliver(channel, priority, &frame, false, None);
        self.stats
            .delivery_local
            .observe(started.elapsed().as_secs_f64());
        let local = count.delivered;
        if !self.goes_on(from, id, priority, count, "subscribers") {
            return;
        }
        let message = self.publication(channel, priority, false, frame);
        let answer = answer_publish(
            from,
            id,
            priority,
            format!("delivered to {local} subscribers on this node only"),
        );
        self.bus.publish(Target::Channel, message, Some(answer));
    }

    /// Publishes to a channel with history: appended and published in one
    /// step, then delivered by every node with subscribers (this one too)
    /// as the bus hands it back, so every subscriber gets the channel's
    /// publications in the history's order. Nothing is delivered before it
    /// is in the history.
    fn publish_with_history(
        &self,
        from: &Arc<ClientHandle>,
        id: MessageId,
        priority: Priority,
        channel: &str,
        frame: Bytes,
        retention: Retention,
    ) {
        // Its subscription need not be up: the history carries it to every
        // node that missed it, this one included.
        if !self.bus.writable() {
            return from.error(
                priority,
                Some(id),
                error_code::CLUSTER_UNAVAILABLE,
                format!("not published to {channel}: the cluster bus is unavailable"),
            );
        }
        let message = self.publication(channel, priority, false, frame);
        let answer = answer_publish(
            from,
            id,
            priority,
            format!("not confirmed published to {channel}"),
        );
        self.bus
            .publish(Target::History(retention), message, Some(answer));
    }

    /// Publishes a node-originated frame (a server publication, or a Join
    /// or Leave event when `event`) to `channel` everywhere, except to
    /// client `exclude`. Returns the local subscribers that got it.
    pub fn publish_from_node(
        &self,
        channel: &str,
        priority: Priority,
        frame: Bytes,
        event: bool,
        exclude: Option<ClientId>,
        done: Option<PublishDone>,
    ) -> usize {
        let retention = match event {
            true => None,
            false => self.channels.retention(channel),
        };
        if let Some(retention) = retention {
            // Delivered here too when the bus hands it back (see
            // `publish_with_history`): these are the subscribers it is for.
            let local = self.channels.subscriber_count(channel);
            let message = self.publication(channel, priority, event, frame);
            self.bus.publish(Target::History(retention), message, done);
            return local;
        }
        let local = self
            .channels
            .deliver(channel, priority, &frame, event, exclude)
            .delivered;
        if self.bus.clustered() {
            let message = self.publication(channel, priority, event, frame);
            self.bus.publish(Target::Channel, message, done);
        } else if let Some(done) = done {
            done(Ok(1));
        }
        local
    }

    /// Sends a Join or Leave event (`body`) of `channel` to the
    /// subscribers that asked for events, everywhere, except `member`.
    pub fn channel_event(&self, channel: &str, body: Body, member: ClientId) {
        match protocol::encode(&Frame::new(Priority::Normal, body)) {
            Ok(frame) => {
                self.publish_from_node(channel, Priority::Normal, frame, true, Some(member), None);
            }
            Err(err) => warn!(%err, "cannot encode a channel event"),
        }
    }

    /// Sends the Join event (`body`) of `member` to `channel`, like
    /// [`MessageRouter::channel_event`], but only if `member` is still
    /// subscribed, checked atomically with sending it: a Join can never
    /// follow the same member's Leave.
    pub fn join_event(&self, channel: &str, body: Body, member: ClientId) {
        let frame = match protocol::encode(&Frame::new(Priority::Normal, body)) {
            Ok(frame) => frame,
            Err(err) => return warn!(%err, "cannot encode a channel event"),
        };
        let clustered = self.bus.clustered();
        self.channels
            .join_while_subscribed(member, channel, &frame, || {
                if clustered {
                    let message = self.publication(channel, Priority::Normal, true, frame.clone());
                    self.bus.publish(Target::Channel, message, None);
                }
            });
    }

    /// Queues a publication (or event) another node sent for this node's
    /// subscribers of `channel`.
    pub fn deliver_publication(
        &self,
        channel: &str,
        priority: Priority,
        event: bool,
        frame: &Bytes,
    ) {
        let count = self.channels.deliver(channel, priority, frame, event, None);
        if count.node_busy > 0 {
            warn!(
                channel,
                missed = count.node_busy,
                "channel publication not delivered to some subscribers: node queues full"
            );
        }
    }

    /// Queues a publication of a channel with history for this node's
    /// subscribers of `channel`, at `position`.
    pub fn deliver_positioned(
        &self,
        channel: &str,
        priority: Priority,
        frame: &Bytes,
        position: Position,
    ) {
        let count = self
            .channels
            .deliver_positioned(channel, priority, frame, position);
        if count.node_busy > 0 {
            warn!(
                channel,
                missed = count.node_busy,
                "channel publication not delivered to some subscribers: node queues full"
            );
        }
    }

    /// Queues a UserDirect frame for every local connection of `user`
    /// (a version-1 connection gets it as a Direct addressed to itself).
    /// Returns how many got it and how many missed it for lack of queue
    /// memory.
    fn deliver_to_user(&self, user: &str, priority: Priority, frame: &Bytes) -> Reach {
        let mut reach = Reach::default();
        for target in self.registry.of_user(user) {
            let current = target.access.version >= protocol::CHANNELS_VERSION;
            let bytes = if current {
                Some(frame.clone())
            } else {
                as_direct(frame, target.id())
            };
            let Some(bytes) = bytes else { continue };
            let tag = if current {
                tag::USER_DIRECT
            } else {
                tag::DIRECT
            };
            match target.enqueue(priority, tag, bytes) {
                Ok(()) => reach.delivered += 1,
                Err(EnqueueError::NodeBusy) => reach.busy += 1,
                Err(EnqueueError::SlowConsumer) => reach.slow += 1,
                Err(EnqueueError::Closed) => {}
            }
        }
        reach
    }

    /// Delivers a UserDirect from `from` to every connection of `user` in
    /// the cluster, and answers the sender: Ack once it is queued for at
    /// least one connection, UNKNOWN_USER when the user has none.
    pub async fn user_direct(
        self: &Arc<Self>,
        from: &Arc<ClientHandle>,
        id: MessageId,
        user: &str,
        priority: Priority,
        frame: Bytes,
    ) {
        let here = self.deliver_to_user(user, priority, &frame);
        let local = here.delivered;
        let nodes = if !self.bus.clustered() {
            Ok(Vec::new())
        } else if !self.bus.available() {
            Err(BusError::Unavailable(
                "the cluster bus is unavailable".into(),
            ))
        } else {
            self.bus.locate_user(user).await.map(|nodes| {
                nodes
                    .into_iter()
                    .filter(|n| *n != self.node_id)
                    .collect::<Vec<_>>()
            })
        };
        let nodes = match nodes {
            Ok(nodes) => nodes,
            Err(_) if local > 0 => return from.ack(priority, id),
            Err(err) => {
                return from.error(
                    priority,
                    Some(id),
                    error_code::CLUSTER_UNAVAILABLE,
                    format!("cannot reach user {user}'s other nodes: {err}"),
                );
            }
        };
        if nodes.is_empty() {
            return answer_user(from, priority, id, user, here);
        }
        if local == 0 {
            let mut pending = lock(&self.pending_users);
            if pending.contains_key(&(from.id(), id)) {
                drop(pending);
                return from.error(
                    priority,
                    Some(id),
                    error_code::INVALID_FIELD,
                    "a message with this id is already awaiting delivery",
                );
            }
            if pending.len() >= self.max_pending {
                drop(pending);
                return from.error(
                    priority,
                    Some(id),
                    error_code::CLUSTER_UNAVAILABLE,
                    "too many cross-node messages awaiting delivery; retry later",
                );
            }
            pending.insert(
                (from.id(), id),
                PendingUser {
                    user: user.to_owned(),
                    waiting: nodes.iter().copied().collect(),
                    reach: here,
                    priority,
                    deadline: Instant::now() + self.delivery_timeout,
                },
            );
        } else {
            from.ack(priority, id);
        }
        for node in nodes {
            let message = BusMessage::UserDirect {
                origin: self.node_id,
                message_id: id,
                sender: from.id(),
                user: user.to_owned(),
                priority,
                frame: frame.clone(),
            };
            let done: Option<PublishDone> = (local == 0).then(|| {
                let router = self.clone();
                let sender = from.id();
                Box::new(move |published: Result<usize, BusError>| {
                    let answer = match published {
                        Ok(n) if n > 0 => return,
                        // That node is gone: the user is not there.
                        Ok(_) => Reach::default(),
                        // It may be there, unreachable: not "unknown".
                        Err(_) => Reach {
                            unreachable: 1,
                            ..Reach::default()
                        },
                    };
                    router.settle_user_receipt(node, id, sender, answer);
                }) as PublishDone
            });
            self.bus.publish(Target::Node(node), message, done);
        }
    }

    /// Queues a UserDirect another node routed here for the local
    /// connections of `user`, and sends that node the receipt.
    pub fn deliver_user(
        &self,
        origin: NodeId,
        message_id: MessageId,
        sender: ClientId,
        user: &str,
        priority: Priority,
        frame: &Bytes,
    ) {
        let reach = self.deliver_to_user(user, priority, frame);
        let receipt = BusMessage::UserReceipt {
            node: self.node_id,
            message_id,
            sender,
            delivered: reach.delivered,
            busy: reach.busy,
            slow: reach.slow,
        };
        self.bus.publish(Target::Node(origin), receipt, None);
    }

    /// Counts one node's receipt for a message to a user; answers the
    /// sender once it is queued somewhere or every node said it was not.
    pub fn settle_user_receipt(
        &self,
        node: NodeId,
        message_id: MessageId,
        sender: ClientId,
        reach: Reach,
    ) {
        let key = (sender, message_id);
        let settled = {
            let mut pending = lock(&self.pending_users);
            let Some(entry) = pending.get_mut(&key) else {
                return;
            };
            // One answer per node (a failed publish may still arrive).
            if !entry.waiting.remove(&node) {
                return;
            }
            entry.reach = entry.reach + reach;
            if reach.delivered > 0 || entry.waiting.is_empty() {
                pending.remove(&key)
            } else {
                None
            }
        };
        let Some(pending) = settled else {
            return;
        };
        if let Some(from) = self.registry.get(sender) {
            answer_user(
                &from,
                pending.priority,
                message_id,
                &pending.user,
                pending.reach,
            );
        }
    }

    fn expire_user_deliveries(&self) {
        let expired = take_expired(&self.pending_users, |p| p.deadline);
        for ((sender, id), p) in expired {
            if let Some(from) = self.registry.get(sender) {
                from.error(
                    p.priority,
                    Some(id),
                    error_code::CLUSTER_UNAVAILABLE,
                    format!(
                        "no delivery receipt for user {} within {:?}; the message may not have been delivered",
                        p.user, self.delivery_timeout
                    ),
                );
            }
        }
    }
}

/// What a message to a user reached on one node, or on several together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    /// Connections it was queued for.
    pub delivered: u32,
    /// Connections that missed it: their node's queue memory is used up.
    pub busy: u32,
    /// Connections that missed it: they are being disconnected as slow.
    pub slow: u32,
    /// Nodes with a connection of the user that could not be reached.
    pub unreachable: u32,
}

impl std::ops::Add for Reach {
    type Output = Reach;

    fn add(self, other: Reach) -> Reach {
        Reach {
            delivered: self.delivered.saturating_add(other.delivered),
            busy: self.busy.saturating_add(other.busy),
            slow: self.slow.saturating_add(other.slow),
            unreachable: self.unreachable.saturating_add(other.unreachable),
        }
    }
}

/// Answers the sender of a message to `user` from what it reached: Ack
/// when it is queued somewhere, else why not.
fn answer_user(from: &ClientHandle, priority: Priority, id: MessageId, user: &str, reach: Reach) {
    let (code, message) = match reach {
        Reach { delivered: 1.., .. } => return from.ack(priority, id),
        Reach {
            unreachable: 1.., ..
        } => (
            error_code::CLUSTER_UNAVAILABLE,
            format!("user {user}'s other nodes could not be reached; retry"),
        ),
        Reach { busy: 1.., .. } => (
            error_code::SERVER_BUSY,
            format!(
                "user {user}'s connections are on nodes with no queue memory left; retry later"
            ),
        ),
        Reach { slow: 1.., .. } => (
            error_code::RECIPIENT_SLOW,
            format!(
                "user {user}'s connections are not reading fast enough and are being disconnected"
            ),
        ),
        _ => (
            error_code::UNKNOWN_USER,
            format!("user {user} has no connection"),
        ),
    };
    from.error(priority, Some(id), code, message);
}

/// A UserDirect frame re-encoded as a Direct to `to`, for a version-1
/// connection (which does not know UserDirect).
fn as_direct(frame: &Bytes, to: ClientId) -> Option<Bytes> {
    let mut decoded = protocol::decode_frame(frame.get(protocol::LENGTH_PREFIX_BYTES..)?).ok()?;
    let Body::UserDirect { payload, .. } = decoded.body else {
        return None;
    };
    decoded.body = Body::Direct { to, payload };
    protocol::encode(&decoded).ok()
}

/// The sender's answer to a broadcast, once the bus knows how many nodes
/// it reached (`local` clients of this node already got it).
fn answer_broadcast(
    sender: Arc<ClientHandle>,
    id: MessageId,
    priority: Priority,
    local: usize,
) -> PublishDone {
    Box::new(move |published| match published {
        Ok(_) => sender.ack(priority, id),
        Err(err) => sender.error(
            priority,
            Some(id),
            error_code::CLUSTER_UNAVAILABLE,
            broadcast_shortfall(local, &err),
        ),
    })
}

/// What becomes of a cross-node direct once its publish is done: nothing
/// yet if the target node received it (its receipt answers the sender),
/// else the sender is answered now.
fn answer_direct(
    router: Arc<MessageRouter>,
    sender: Arc<ClientHandle>,
    id: MessageId,
    to: ClientId,
    priority: Priority,
    retry: Option<Bytes>,
) -> PublishDone {
    Box::new(move |published| {
        let failure = match published {
            Ok(0) if retry.is_some() => {
                // Its node is gone; its session may wait for a resume.
                lock(&router.located).remove(&to);
                if lock(&router.pending).remove(&(sender.id(), id)).is_some()
                    && let Some(frame) = retry
                {
                    // A session resumed elsewhere gets it there (once: that
                    // send does not come back here).
                    router.store(&sender, id, to, priority, frame, true);
                }
                return;
            }
            Ok(0) => {
                // Its node is gone, so is the client.
                lock(&router.located).remove(&to);
                Some((
                    error_code::UNKNOWN_CLIENT,
                    format!("no client with id {to} is connected"),
                ))
            }
            Ok(_) => None,
            Err(err) => {
                // Looked up again next time: the client may have moved.
                lock(&router.located).remove(&to);
                Some((error_code::CLUSTER_UNAVAILABLE, err.to_string()))
            }
        };
        if let Some((code, message)) = failure
            && lock(&router.pending).remove(&(sender.id(), id)).is_some()
        {
            sender.error(priority, Some(id), code, message);
        }
    })
}

fn reply_outcome(
    from: &ClientHandle,
    priority: Priority,
    id: MessageId,
    to: ClientId,
    outcome: DeliveryOutcome,
) {
    match outcome {
        DeliveryOutcome::Delivered => from.ack(priority, id),
        DeliveryOutcome::Stored { until_ms } => from.stored(priority, id, until_ms),
        DeliveryOutcome::InboxFull => from.error(
            priority,
            Some(id),
            error_code::INBOX_FULL,
            format!("client {to} is away and its stored messages are at their limit; retry later"),
        ),
        DeliveryOutcome::UnknownClient => from.error(
            priority,
            Some(id),
            error_code::UNKNOWN_CLIENT,
            format!("no client with id {to} is connected"),
        ),
        DeliveryOutcome::NodeBusy => from.error(
            priority,
            Some(id),
            error_code::SERVER_BUSY,
            format!("client {to}'s node has no queue memory left; retry later"),
        ),
        DeliveryOutcome::RecipientSlow => from.error(
            priority,
            Some(id),
            error_code::RECIPIENT_SLOW,
            format!("client {to} is not reading fast enough and is being disconnected"),
        ),
    }
}

/// What the sender of a broadcast that did not reach every live node is told.
pub(crate) fn broadcast_shortfall(local: usize, err: &BusError) -> String {
    match err {
        BusError::Partial { reached, live } => format!(
            "delivered to {local} clients on this node and to {} of the {} other live nodes; \
             the others were not listening (subscription lost or re-registering), so their clients did not get it",
            reached.saturating_sub(1),
            live.saturating_sub(1)
        ),
        BusError::Missed(node) => format!(
            "delivered to {local} clients on this node, but node {node} missed it (its link to Redis dropped), so its clients did not get it"
        ),
        BusError::Unconfirmed { unconfirmed, .. } => format!(
            "delivered to {local} clients on this node, but {unconfirmed} other live node(s) did not confirm receipt in time; their clients may not have got it"
        ),
        other => format!("delivered to {local} clients on this node only: {other}"),
    }
}

/// The sender's answer to a direct message offered to a session's store.
fn stored_outcome(stored: Storing) -> DeliveryOutcome {
    match stored {
        Storing::Stored { until_ms } => DeliveryOutcome::Stored { until_ms },
        Storing::Full => DeliveryOutcome::InboxFull,
        Storing::Gone | Storing::Attached(_) => DeliveryOutcome::UnknownClient,
    }
}

fn outcome_of(err: EnqueueError) -> DeliveryOutcome {
    match err {
        EnqueueError::SlowConsumer => DeliveryOutcome::RecipientSlow,
        EnqueueError::Closed => DeliveryOutcome::UnknownClient,
        EnqueueError::NodeBusy => DeliveryOutcome::NodeBusy,
    }
}
