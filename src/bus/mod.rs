//! The cluster bus: "the rest of the cluster" as seen by one node. It
//! carries presence (which client is on which node), node liveness, and
//! cross-node delivery (broadcast to every node, direct to one node).
//!
//! Two engines implement [`ClusterBus`]: [`memory`] (the default; one node,
//! or several nodes inside one process) and [`redis_bus`] (nodes sharing a
//! Redis). The node talks to a [`Bus`], which dispatches to either, so it
//! never knows which one it has. What other nodes send this one arrives as
//! [`ClusterEvents`], a channel handed to the engine at construction
//! ([`ClusterEventSender`]) and read by the node's cluster event loop
//! (`Node::start`). An engine learns about the node's own clients only
//! through [`LocalPresence`].

mod confirm;
pub mod master;
pub mod memory;
pub mod redis_bus;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::protocol::{ClientId, ClientInfo, MessageId, NodeId, Position, Priority};

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The shared store is unreachable or answered with an error.
    #[error("cluster bus unavailable: {0}")]
    Unavailable(String),
    /// Too many operations are waiting for the store.
    #[error("cluster bus backlog full")]
    Backlog,
    /// A message to every node reached fewer nodes than are alive: at
    /// least one live node was not subscribed when it was published (its
    /// subscription dropped and is being restored, or it is re-registering
    /// after Redis lost its data), so that node's clients did not get it.
    #[error("reached {reached} of {live} live nodes; the others were not listening")]
    Partial {
        /// Nodes that received it, this one included.
        reached: usize,
        /// Nodes alive when it was checked, this one included.
        live: usize,
    },
    /// The target node is alive but was not listening (its subscription
    /// dropped, or it is re-registering after Redis lost its data).
    #[error("node {0} is alive but not listening on the cluster bus; retry")]
    NotListening(NodeId),
    /// A live node reported that it never received this broadcast (its
    /// subscription dropped with the message still on its way).
    #[error("node {0} missed it (its Redis subscription dropped)")]
    Missed(NodeId),
    /// Live nodes did not confirm receipt in time.
    #[error("{unconfirmed} live node(s) did not confirm receipt in time")]
    Unconfirmed {
        /// Live nodes that did not confirm.
        unconfirmed: usize,
        /// Nodes it was published to, this one included.
        reached: usize,
    },
    /// Cluster presence is incomplete right now (Redis lost its data and
    /// nodes are re-registering their clients, or a node is behind on its
    /// heartbeat), so a client that was not found may still be connected.
    #[error("cluster presence is being rebuilt ({0}); retry")]
    Rebuilding(String),
}

/// What one node sends another through the bus. Encoded with the protocol's
/// codec settings (bincode legacy) when it crosses Redis; see CLUSTER.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BusMessage {
    /// Tag 0: A client broadcast, delivered by every node but `origin` to all
    /// of its clients.
    Broadcast {
        /// The node the sender is on (it delivered locally already).
        origin: NodeId,
        /// Delivery priority.
        priority: Priority,
        /// The stamped frame, length prefix included, ready to queue.
        frame: Bytes,
    },
    /// Tag 1: A direct message for a client of the receiving node.
    Direct {
        /// The sender's node, which waits for the receipt.
        origin: NodeId,
        /// The message's id.
        message_id: MessageId,
        /// The sending client.
        sender: ClientId,
        /// The recipient.
        to: ClientId,
        /// Delivery priority.
        priority: Priority,
        /// The stamped frame, length prefix included.
        frame: Bytes,
    },
    /// Tag 2: The outcome of a Direct, sent back to its origin node.
    Receipt {
        /// The message's id.
        message_id: MessageId,
        /// The sending client.
        sender: ClientId,
        /// The recipient.
        to: ClientId,
        /// What happened.
        outcome: DeliveryOutcome,
    },
    /// Tag 3: An operator asked to disconnect a client of the receiving node.
    Kick {
        /// The client.
        client: ClientId,
        /// Why (sent to the client in its Goodbye).
        reason: String,
    },
    /// Tag 4: A channel publication, or a Join or Leave event (`event`),
    /// for the local subscribers of `channel` on every node but `origin`.
    Publication {
        /// The node that published it (it delivered locally already).
        origin: NodeId,
        /// The channel.
        channel: String,
        /// Delivery priority.
        priority: Priority,
        /// Whether it is a Join or Leave event (only for subscribers that
        /// asked for events).
        event: bool,
        /// The frame, length prefix included, ready to queue.
        frame: Bytes,
    },
    /// Tag 5: A message for every connection of `user` on the receiving node.
    UserDirect {
        /// The sender's node, which waits for the receipt.
        origin: NodeId,
        /// The message's id.
        message_id: MessageId,
        /// The sending client.
        sender: ClientId,
        /// The recipient user.
        user: String,
        /// Delivery priority.
        priority: Priority,
        /// The stamped UserDirect frame, length prefix included.
        frame: Bytes,
    },
    /// Tag 6: How many of the user's connections on the sending node a
    /// UserDirect was queued for; sent back to its origin.
    UserReceipt {
        /// The node answering.
        node: NodeId,
        /// The message's id.
        message_id: MessageId,
        /// The sending client.
        sender: ClientId,
        /// Connections it was queued for.
        delivered: u32,
        /// Connections that missed it because that node's queues are full.
        busy: u32,
        /// Connections that missed it because they are being disconnected
        /// as slow consumers.
        slow: u32,
    },
    /// Tag 7: An operator asked to unsubscribe a client of the receiving
    /// node from a channel.
    Unsubscribe {
        /// The client.
        client: ClientId,
        /// The channel.
        channel: String,
        /// Why (sent to the client in an Unsubscribed frame).
        reason: String,
    },
    /// Tag 8: The session of `client` was resumed by another connection:
    /// the receiving node closes its connection of that client, if it
    /// still has one, without ending the session.
    Takeover {
        /// The session (its client id).
        client: ClientId,
    },
}

/// What became of a cross-node direct message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryOutcome {
    /// Tag 0: Queued for the recipient.
    Delivered,
    /// Tag 1: The recipient is not connected to that node.
    UnknownClient,
    /// Tag 2: The recipient is being disconnected as a slow consumer.
    RecipientSlow,
    /// Tag 3: The recipient's node has no queue memory left.
    NodeBusy,
    /// Tag 4: The recipient's session waits for a resume; the message is
    /// stored for it until then (Unix milliseconds).
    Stored {
        /// When the session ends unless it resumes.
        until_ms: u64,
    },
    /// Tag 5: The recipient's session waits for a resume and its store is
    /// full.
    InboxFull,
}

/// How a client's connection ended, for its session (see
/// [`ClusterBus::client_left`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// It had no session (it did not ask for one, or sessions are off).
    None,
    /// Its session waits for a resume for the resume window, if it is still
    /// at `generation` and attached here.
    Detach {
        /// The generation the connection held.
        generation: u64,
    },
    /// Its session ends (Goodbye, kick), if it is still at `generation`.
    End {
        /// The generation the connection held.
        generation: u64,
    },
}

/// What resuming a session gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The session is now attached to this node at `generation`.
    Resumed {
        /// The session's new generation (the new token's).
        generation: u64,
        /// Direct messages stored while it was away
        /// ([`BusMessage::Direct`]), oldest first; the store is empty now.
        stored: Vec<BusMessage>,
        /// The node its previous connection was attached to, if it still
        /// was (it must close that connection).
        previous: Option<NodeId>,
    },
    /// No such session (its window passed, it ended, or it never was).
    Gone,
    /// The session is at another generation: the token was used already.
    Used,
    /// The session belongs to another user.
    WrongUser,
}

/// What became of a direct message for a client not connected here,
/// offered to its session's store ([`ClusterBus::store_direct`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storing {
    /// Stored; delivered if the session resumes before `until_ms` (Unix
    /// milliseconds).
    Stored {
        /// When the session ends unless it resumes.
        until_ms: u64,
    },
    /// The store is full (`session_inbox_len` or `session_inbox_bytes`).
    Full,
    /// No such session: the recipient is unknown.
    Gone,
    /// The session is attached to that (live) node: deliver there.
    Attached(NodeId),
}

/// Learns what became of a [`ClusterBus::store_direct`].
pub type StoreDone = Box<dyn FnOnce(Result<Storing, BusError>) + Send>;

/// Sessions' limits, as the bus applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// How long a detached session waits for a resume.
    pub window: Duration,
    /// Most direct messages stored per session.
    pub inbox_len: usize,
    /// Most bytes of direct messages stored per session.
    pub inbox_bytes: usize,
    /// How long a session record lives while attached (a backstop for
    /// records no node detaches: the token lifetime).
    pub lifetime: Duration,
}

/// Where a bus message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every node (the sender's own node ignores it).
    AllNodes,
    /// One node.
    Node(NodeId),
    /// The nodes subscribed to the channel of the [`BusMessage::Publication`]
    /// published, on its [`Feed`].
    Channel,
    /// Like [`Target::Channel`], for a publication of a channel that keeps
    /// history: it is appended to the channel's history at the next
    /// position, atomically with being published, and every node with
    /// subscribers, the sender's included, delivers it as it comes back
    /// (so all in offset order).
    History(Retention),
}

/// How much history a channel keeps (its namespace's `history_size` and
/// `history_ttl`, both non-zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most publications kept (the oldest go first).
    pub size: u32,
    /// How long the history lives after the channel's last publication.
    pub ttl: Duration,
}

/// Publications of a channel's history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The channel's current position: its epoch, and the offset of its
    /// latest publication (0 when none was published in this epoch).
    pub position: Position,
    /// The publications asked for, oldest first.
    pub entries: Vec<HistoryEntry>,
    /// Whether more publications are kept beyond these, in the direction
    /// read (older for [`HistoryRange::Before`], newer for
    /// [`HistoryRange::After`]).
    pub more: bool,
}

/// One publication of a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Its offset in the page's epoch.
    pub offset: u64,
    /// Its delivery priority.
    pub priority: Priority,
    /// The Publish frame as subscribers got it, length prefix included.
    pub frame: Bytes,
}

/// What the bus hands the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A message another node sent.
    Message(BusMessage),
    /// A publication of a channel with history (its own node's too), at
    /// its position.
    Positioned(BusMessage, Position),
    /// The node could not deliver some publications of `channel` (no
    /// longer in the history, or the history was lost): its subscribers
    /// that track positions must be told.
    Lost {
        /// The channel.
        channel: String,
        /// Why.
        reason: String,
    },
}

/// What other nodes send this one, in the order they arrive; read by the
/// node's cluster event loop.
pub type ClusterEvents = mpsc::Receiver<ClusterEvent>;

/// The engine's end of [`ClusterEvents`].
pub type ClusterEventSender = mpsc::Sender<ClusterEvent>;

/// Which publications of a channel's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryRange {
    /// The latest, older than this offset if given.
    Before(Option<u64>),
    /// The oldest after this offset.
    After(u64),
}

/// What an engine may know of the node's own clients: enough to register
/// them all again after Redis lost them.
pub trait LocalPresence: Send + Sync {
    /// Every client connected to this node.
    fn local_clients(&self) -> Vec<ClientInfo>;

    /// Every channel with subscribers on this node.
    fn local_channels(&self) -> Vec<LocalChannel>;

    /// The channels with subscribers on this node whose namespace keeps
    /// presence (what the heartbeat refreshes; cheaper than
    /// [`LocalPresence::local_channels`]).
    fn presence_channels(&self) -> Vec<String>;
}

/// A channel as this node has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalChannel {
    /// The channel.
    pub name: String,
    /// Its subscribers on this node.
    pub subscribers: usize,
    /// Its members on this node, when its namespace keeps presence.
    pub members: Option<Vec<ClientInfo>>,
}

/// A channel's two kinds of traffic, which nodes take separately: a node
/// takes a channel's Join and Leave events only while one of its
/// subscribers asked for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feed {
    /// Publications (a client's or the server's).
    Publications,
    /// Join and Leave events.
    Events,
}

impl Feed {
    /// The feed a [`BusMessage::Publication`] travels on.
    pub fn of(event: bool) -> Feed {
        if event {
            Feed::Events
        } else {
            Feed::Publications
        }
    }
}

/// Completes when a presence write reached the shared store (`None`: it
/// was not queued, or there is no store to wait for).
pub type Landed = Option<tokio::sync::oneshot::Receiver<()>>;

/// Told how a publish went: `Ok(n)` with the number of nodes that received
/// it, or the error. For [`Target::AllNodes`], `Ok` means every live node
/// received it (a shortfall is [`BusError::Partial`]); for
/// [`Target::Node`], `Ok(0)` means that node is gone (dead or left), while
/// a live node that was not listening is [`BusError::NotListening`].
pub type PublishDone = Box<dyn FnOnce(Result<usize, BusError>) + Send>;

/// One engine of the cluster bus.
pub trait ClusterBus: Send + Sync {
    /// Starts the engine's background work (connections, heartbeat);
    /// nothing before it touches the network.
    fn start(&self);

    /// Whether the cluster can be reached right now. When false, cross-node
    /// operations fail fast instead of waiting for timeouts.
    fn available(&self) -> bool;

    /// Whether writes reach the shared store right now, whatever the state
    /// of this node's subscription (enough for what is delivered from a
    /// channel's history).
    fn writable(&self) -> bool {
        self.available()
    }

    /// Whether other nodes can exist at all (false for a lone in-memory node).
    fn clustered(&self) -> bool;

    /// Records that a client connected to this node. Completes once the
    /// rest of the cluster can see it (or at once when the cluster is
    /// unreachable; presence is then rewritten when it comes back).
    fn client_joined(&self, info: &ClientInfo) -> impl Future<Output = ()> + Send;

    /// Records that a client left this node, and what becomes of its
    /// session.
    fn client_left(&self, info: &ClientInfo, session: SessionEnd);

    /// Records a new session for `client` (of `user`) at generation 1,
    /// attached to this node, in order with the client's join.
    fn session_opened(&self, client: ClientId, user: Option<&str>, limits: SessionLimits);

    /// Resumes `client`'s session if it is at `generation` and belongs to
    /// `user`: attaches it to this node (routing included) and takes its
    /// stored messages, atomically. A losing racer gets [`Claim::Used`].
    fn session_claim(
        &self,
        client: ClientId,
        user: Option<&str>,
        generation: u64,
        limits: SessionLimits,
    ) -> impl Future<Output = Result<Claim, BusError>> + Send;

    /// Keeps `client`'s session record for another `limits.lifetime`, if it
    /// is still at `generation` and attached here (its token was refreshed).
    fn session_refreshed(&self, client: ClientId, generation: u64, limits: SessionLimits);

    /// Offers a [`BusMessage::Direct`] for a client that is not connected
    /// here to its session's store, in order with this node's publishes.
    fn store_direct(&self, message: BusMessage, limits: SessionLimits, done: StoreDone);

    /// The node client `id` is connected to, if any live node has it.
    /// `Ok(None)` is a definite "not connected"; while presence is
    /// incomplete the answer is [`BusError::Rebuilding`] instead.
    fn locate(&self, id: ClientId)
    -> impl Future<Output = Result<Option<NodeId>, BusError>> + Send;

    /// Clients of the whole cluster, in connection order, at most `limit`,
    /// and whether there were more.
    fn list_clients(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<ClientInfo>, bool), BusError>> + Send;

    /// Live nodes of the cluster.
    fn live_nodes(&self) -> impl Future<Output = Result<Vec<NodeId>, BusError>> + Send;

    /// Sends `message` to `target`, in order with this node's other
    /// publishes; `done` (if any) learns the outcome.
    fn publish(&self, target: Target, message: BusMessage, done: Option<PublishDone>);

    /// Removes this node from the cluster (presence and liveness) and stops
    /// background work.
    fn leave(&self) -> impl Future<Output = ()> + Send;

    /// Sets whether this node wants `feed` of `channel` (it has local
    /// subscribers, that want events for [`Feed::Events`]);
    /// [`ClusterBus::channel_sync`] makes it so.
    fn want_channel(&self, channel: &str, feed: Feed, wanted: bool);

    /// Brings this node's subscription to `feed` of `channel` in line with
    /// what is wanted. `Ok` for a wanted feed means what any node sends
    /// on it reaches this one from now on.
    fn channel_sync(
        &self,
        channel: &str,
        feed: Feed,
    ) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Records that `info` is a member of `channel` (channel presence), in
    /// order with this node's other writes.
    fn channel_member_joined(&self, channel: &str, info: &ClientInfo) -> Landed;

    /// Records that client `id` is no longer a member of `channel`.
    fn channel_member_left(&self, channel: &str, id: ClientId);

    /// Records this node's number of subscribers of `channel` (0: none).
    fn channel_subscribers(&self, channel: &str, count: usize);

    /// Members of `channel` across the cluster, oldest first, at most
    /// `limit`, and whether there were more.
    fn channel_members(
        &self,
        channel: &str,
        limit: usize,
    ) -> impl Future<Output = Result<(Vec<ClientInfo>, bool), BusError>> + Send;

    /// Number of members of `channel` across the cluster.
    fn channel_member_count(
        &self,
        channel: &str,
    ) -> impl Future<Output = Result<u64, BusError>> + Send;

    /// Channels with subscribers anywhere in the cluster, and how many.
    fn channels(&self) -> impl Future<Output = Result<Vec<(String, u64)>, BusError>> + Send;

    /// The live nodes where `user` has at least one connection.
    fn locate_user(&self, user: &str)
    -> impl Future<Output = Result<Vec<NodeId>, BusError>> + Send;

    /// Claims idempotency key `key` for `ttl`, marked `pending`: `Ok(None)`
    /// when it was free (the caller handles the message, then settles
    /// it), else what the key holds (`p:NODE/ATTEMPT` pending, or the settled
    /// outcome).
    fn once_claim(
        &self,
        key: &str,
        pending: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<String>, BusError>> + Send;

    /// Records the outcome of a claimed key (keeping its TTL).
    fn once_settle(&self, key: &str, outcome: String);

    /// Frees a claimed key still marked `pending` (its message was never
    /// handled).
    fn once_release(&self, key: &str, pending: &str);

    /// Makes this node deliver `channel`'s publications without a gap
    /// from its current position on: call it once the node subscribed to
    /// a channel with history. A publication its subscription misses later
    /// is read back from the history and delivered in offset order.
    fn follow_history(&self, channel: &str) -> impl Future<Output = Result<(), BusError>> + Send;

    /// Up to `limit` publications of `channel`'s history in `range`,
    /// oldest first, with the channel's current position; `more` tells
    /// whether the history has more beyond them in the direction read.
    fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        limit: usize,
    ) -> impl Future<Output = Result<HistoryPage, BusError>> + Send;
}

/// The bus a node runs with.
pub enum Bus {
    /// In-process engine.
    Memory(memory::MemoryBus),
    /// Redis engine.
    Redis(redis_bus::RedisBus),
}

macro_rules! dispatch {
    ($self:ident, $bus:ident => $e:expr) => {
        match $self {
            Bus::Memory($bus) => $e,
            Bus::Redis($bus) => $e,
        }
    };
}

impl ClusterBus for Bus {
    fn start(&self) {
        dispatch!(self, b => b.start())
    }

    fn available(&self) -> bool {
        dispatch!(self, b => b.available())
    }

    fn writable(&self) -> bool {
        dispatch!(self, b => b.writable())
    }

    fn clustered(&self) -> bool {
        dispatch!(self, b => b.clustered())
    }

    async fn client_joined(&self, info: &ClientInfo) {
        dispatch!(self, b => b.client_joined(info).await)
    }

    fn client_left(&self, info: &ClientInfo, session: SessionEnd) {
        dispatch!(self, b => b.client_left(info, session))
    }

    fn session_opened(&self, client: ClientId, user: Option<&str>, limits: SessionLimits) {
        dispatch!(self, b => b.session_opened(client, user, limits))
    }

    async fn session_claim(
        &self,
        client: ClientId,
        user: Option<&str>,
        generation: u64,
        limits: SessionLimits,
    ) -> Result<Claim, BusError> {
        dispatch!(self, b => b.session_claim(client, user, generation, limits).await)
    }

    fn store_direct(&self, message: BusMessage, limits: SessionLimits, done: StoreDone) {
        dispatch!(self, b => b.store_direct(message, limits, done))
    }

    fn session_refreshed(&self, client: ClientId, generation: u64, limits: SessionLimits) {
        dispatch!(self, b => b.session_refreshed(client, generation, limits))
    }

    async fn locate(&self, id: ClientId) -> Result<Option<NodeId>, BusError> {
        dispatch!(self, b => b.locate(id).await)
    }

    async fn list_clients(&self, limit: usize) -> Result<(Vec<ClientInfo>, bool), BusError> {
        dispatch!(self, b => b.list_clients(limit).await)
    }

    async fn live_nodes(&self) -> Result<Vec<NodeId>, BusError> {
        dispatch!(self, b => b.live_nodes().await)
    }

    fn publish(&self, target: Target, message: BusMessage, done: Option<PublishDone>) {
        dispatch!(self, b => b.publish(target, message, done))
    }

    async fn leave(&self) {
        dispatch!(self, b => b.leave().await)
    }

    fn want_channel(&self, channel: &str, feed: Feed, wanted: bool) {
        dispatch!(self, b => b.want_channel(channel, feed, wanted))
    }

    async fn channel_sync(&self, channel: &str, feed: Feed) -> Result<(), BusError> {
        dispatch!(self, b => b.channel_sync(channel, feed).await)
    }

    fn channel_member_joined(&self, channel: &str, info: &ClientInfo) -> Landed {
        dispatch!(self, b => b.channel_member_joined(channel, info))
    }

    fn channel_member_left(&self, channel: &str, id: ClientId) {
        dispatch!(self, b => b.channel_member_left(channel, id))
    }

    fn channel_subscribers(&self, channel: &str, count: usize) {
        dispatch!(self, b => b.channel_subscribers(channel, count))
    }

    async fn channel_members(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<(Vec<ClientInfo>, bool), BusError> {
        dispatch!(self, b => b.channel_members(channel, limit).await)
    }

    async fn channel_member_count(&self, channel: &str) -> Result<u64, BusError> {
        dispatch!(self, b => b.channel_member_count(channel).await)
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, BusError> {
        dispatch!(self, b => b.channels().await)
    }

    async fn locate_user(&self, user: &str) -> Result<Vec<NodeId>, BusError> {
        dispatch!(self, b => b.locate_user(user).await)
    }

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, BusError> {
        dispatch!(self, b => b.history(channel, range, limit).await)
    }

    async fn follow_history(&self, channel: &str) -> Result<(), BusError> {
        dispatch!(self, b => b.follow_history(channel).await)
    }

    async fn once_claim(
        &self,
        key: &str,
        pending: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BusError> {
        dispatch!(self, b => b.once_claim(key, pending, ttl).await)
    }

    fn once_settle(&self, key: &str, outcome: String) {
        dispatch!(self, b => b.once_settle(key, outcome))
    }

    fn once_release(&self, key: &str, pending: &str) {
        dispatch!(self, b => b.once_release(key, pending))
    }
}

/// A new random, non-zero history epoch.
pub(crate) fn new_epoch() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 | 1
}

/// Sorts clients by connection time and cuts the list at `limit`.
pub(crate) fn sort_and_cut(mut clients: Vec<ClientInfo>, limit: usize) -> (Vec<ClientInfo>, bool) {
    clients.sort_by_key(|c| (c.connected_at_ms, c.client_id));
    let truncated = clients.len() > limit;
    clients.truncate(limit);
    (clients, truncated)
}
