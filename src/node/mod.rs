//! The node: everything one quic-fabric node is, apart from its QUIC
//! endpoint. [`Node`] owns the node's state (configuration, registry of
//! clients, cluster bus, message router, counters, limits, drain state),
//! joins and removes clients (registry and cluster presence together), runs
//! the cluster event loop (what other nodes send this one), and carries the
//! operations of the admin API. The connection handlers, the admin API and
//! the metrics endpoint work through it; `server` only wires it to an
//! endpoint.

mod channel_ops;
mod idempotent;
mod sessions;

pub use channel_ops::{ServerPublishError, Unsubscribed};
pub use sessions::{Granted, Sessions};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::auth::{AuthSetupError, Authenticator};
use crate::bus::memory::{MemoryBus, MemoryCluster};
use crate::bus::redis_bus::{RedisBus, RedisBusConfig};
use crate::bus::{
    Bus, BusError, BusMessage, ClusterBus, ClusterEvent, ClusterEvents, LocalChannel,
    LocalPresence, PublishDone, SessionEnd, Target,
};
use crate::channels::Channels;
use crate::config::{ConfigError, NodeConfig};
use crate::limits::{Admission, RateLimits};
use crate::outbound::QueueBudget;
use crate::protocol::{self, ClientId, ClientInfo, MessageId, NodeId, Payload, Position, Priority};
use crate::registry::{ClientHandle, Full, Registry};
use crate::router::MessageRouter;
use crate::stats::Stats;

/// Why a node could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cluster bus could not be set up (for example an invalid Redis URL).
    #[error("cluster bus: {0}")]
    Bus(String),
    /// Authentication keys could not be loaded.
    #[error("authentication: {0}")]
    Auth(#[from] AuthSetupError),
    /// The session secret could not be loaded or made.
    #[error("sessions: {0}")]
    Sessions(String),
}

/// What the cluster bus may know of this node's clients and channels.
struct Here {
    registry: Arc<Registry>,
    channels: Arc<Channels>,
}

impl LocalPresence for Here {
    fn local_clients(&self) -> Vec<ClientInfo> {
        self.registry.local_clients()
    }

    fn local_channels(&self) -> Vec<LocalChannel> {
        self.channels.local_channels()
    }

    fn presence_channels(&self) -> Vec<String> {
        self.channels.presence_channels()
    }
}

/// Which cluster bus a node joins.
pub enum BusChoice {
    /// From the config: Redis when `redis_url`, `redis_sentinel` or `redis_cluster` is set,
    /// else a lone in-memory node.
    FromConfig,
    /// A shared in-process cluster (several nodes in one process).
    Memory(Arc<MemoryCluster>),
}

/// Where a kicked client was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// On this node; it is being disconnected.
    Local,
    /// On that node, which was asked to disconnect it.
    Remote(NodeId),
    /// Not connected anywhere.
    Unknown,
}

/// One node's state and the operations on it.
pub struct Node {
    config: NodeConfig,
    id: NodeId,
    registry: Arc<Registry>,
    channels: Arc<Channels>,
    bus: Arc<Bus>,
    router: Arc<MessageRouter>,
    stats: Arc<Stats>,
    auth: Option<Authenticator>,
    admission: Admission,
    rate_limits: RateLimits,
    queue_budget: Arc<QueueBudget>,
    /// Cancelled when the node starts draining (SIGTERM, shutdown or the
    /// admin API's `POST /drain`).
    draining: CancellationToken,
    /// What other nodes send this one, until [`Node::start`] takes it.
    events: Mutex<Option<ClusterEvents>>,
    /// Resumable sessions, when they are on.
    sessions: Option<Sessions>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node for `config` on the chosen bus. Nothing runs until
    /// [`Node::start`].
    pub fn new(config: NodeConfig, bus: BusChoice) -> Result<Arc<Node>, NodeError> {
        config.validate()?;
        let id = config.node_id.unwrap_or_else(NodeId::new_random);
        let stats = Arc::new(Stats::default());
        let registry = Arc::new(Registry::new(config.max_clients));
        let channels = Arc::new(Channels::new(&config));
        let presence = Arc::new(Here {
            registry: registry.clone(),
            channels: channels.clone(),
        });
        let (events_tx, events) = tokio::sync::mpsc::channel(config.bus_queue_len);
        let bus = match (bus, config.redis_target()) {
            (BusChoice::Memory(cluster), _) => {
                cluster.set_history_meta_ttl(config.history_meta_ttl);
                Bus::Memory(MemoryBus::join(cluster, id, events_tx))
            }
            (BusChoice::FromConfig, None) => {
                let bus = MemoryBus::single(id, events_tx);
                bus.set_history_meta_ttl(config.history_meta_ttl);
                Bus::Memory(bus)
            }
            (BusChoice::FromConfig, Some(target)) => {
                let ca_pem = match &config.redis_ca {
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        NodeError::Bus(format!("cannot read {}: {e}", path.display()))
                    })?),
                    None => None,
                };
                let redis = RedisBusConfig {
                    target,
                    ca_pem,
                    prefix: config.redis_prefix.clone(),
                    node_id: id,
                    node_name: config.name.clone(),
                    connect_timeout: config.redis_connect_timeout,
                    response_timeout: config.redis_response_timeout,
                    node_ttl: config.node_ttl,
                    heartbeat_interval: config.heartbeat_interval,
                    queue_len: config.bus_queue_len,
                    confirm_timeout: config.delivery_timeout,
                    history_meta_ttl: config.history_meta_ttl,
                    session_window: config.session_resume_window,
                };
                Bus::Redis(
                    RedisBus::new(redis, presence, events_tx, stats.clone())
                        .map_err(|e| NodeError::Bus(e.to_string()))?,
                )
            }
        };
        let bus = Arc::new(bus);
        let sessions = Sessions::from_config(&config)?;
        let router = Arc::new(MessageRouter::new(
            id,
            registry.clone(),
            channels.clone(),
            bus.clone(),
            config.delivery_timeout,
            config.bus_queue_len,
            sessions.as_ref().map(Sessions::limits),
            stats.clone(),
        ));
        Ok(Arc::new(Node {
            id,
            registry,
            channels,
            bus,
            router,
            stats,
            auth: Authenticator::from_config(&config)?,
            admission: Admission::new(&config),
            rate_limits: RateLimits::new(&config),
            queue_budget: QueueBudget::new(config.max_total_queued_bytes),
            draining: CancellationToken::new(),
            events: Mutex::new(Some(events)),
            sessions,
            config,
        }))
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The clients connected to this node.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The cluster bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The cluster bus, shared.
    pub(crate) fn bus_handle(&self) -> Arc<Bus> {
        self.bus.clone()
    }

    /// The channels of this node's clients.
    pub fn channels(&self) -> &Arc<Channels> {
        &self.channels
    }

    /// Message delivery, local and across the cluster.
    pub fn router(&self) -> &Arc<MessageRouter> {
        &self.router
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Verifies Handshake tokens when JWT auth is on.
    pub fn auth(&self) -> Option<&Authenticator> {
        self.auth.as_ref()
    }

    /// Admission control for new connections.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// Per-client message rate limits, remembered across reconnects.
    pub fn rate_limits(&self) -> &RateLimits {
        &self.rate_limits
    }

    /// Bytes queued for all clients together.
    pub fn queue_budget(&self) -> &Arc<QueueBudget> {
        &self.queue_budget
    }

    /// Starts the node's background work until `stop`: the cluster bus, the
    /// cluster event loop, the expiry of unanswered cross-node deliveries,
    /// and the disconnection of stalled readers under memory pressure.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        self.bus.start();
        let taken = self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut events) = taken {
            let node = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        event = events.recv() => match event {
                            Some(ClusterEvent::Message(message)) => node.handle_cluster_event(message),
                            Some(ClusterEvent::Positioned(message, position)) => {
                                node.handle_positioned(message, position)
                            }
                            Some(ClusterEvent::Lost { channel, reason }) => {
                                node.subscription_lost(&channel, &reason)
                            }
                            None => return,
                        },
                        _ = stop.cancelled() => return,
                    }
                }
            });
        }
        let router = self.router.clone();
        let expiry_stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(router.expiry_period());
            loop {
                tokio::select! {
                    _ = tick.tick() => router.expire_deliveries(),
                    _ = expiry_stop.cancelled() => return,
                }
            }
        });
        tokio::spawn(crate::registry::reclaim(
            self.registry.clone(),
            self.queue_budget.clone(),
            self.config.slow_consumer_stall,
            stop,
        ));
    }

    /// Delivers a publication of a channel with history (this node's own
    /// too) to its local subscribers.
    fn handle_positioned(&self, message: BusMessage, position: Position) {
        if let BusMessage::Publication {
            channel,
            priority,
            frame,
            ..
        } = message
        {
            self.router
                .deliver_positioned(&channel, priority, &frame, position);
        }
    }

    /// Handles one message another node sent this one.
    fn handle_cluster_event(&self, event: BusMessage) {
        match event {
            BusMessage::Broadcast {
                origin,
                priority,
                frame,
            } => {
                if origin != self.id {
                    self.router.deliver_broadcast(priority, &frame);
                }
            }
            BusMessage::Direct {
                origin,
                message_id,
                sender,
                to,
                priority,
                frame,
            } => self
                .router
                .deliver_direct(origin, message_id, sender, to, priority, frame),
            BusMessage::Receipt {
                message_id,
                sender,
                to,
                outcome,
            } => self.router.settle_receipt(message_id, sender, to, outcome),
            BusMessage::Kick { client, reason } => match self.registry.get(client) {
                Some(handle) => handle.kick(&reason),
                None => debug!(%client, "kick for a client that is not here"),
            },
            BusMessage::Publication {
                origin,
                channel,
                priority,
                event,
                frame,
            } => {
                // A node serves its own publications at once (those of
                // channels with history arrive positioned, from every node).
                if origin != self.id {
                    self.router
                        .deliver_publication(&channel, priority, event, &frame);
                }
            }
            BusMessage::UserDirect {
                origin,
                message_id,
                sender,
                user,
                priority,
                frame,
            } => self
                .router
                .deliver_user(origin, message_id, sender, &user, priority, &frame),
            BusMessage::UserReceipt {
                node,
                message_id,
                sender,
                delivered,
                busy,
                slow,
            } => self.router.settle_user_receipt(
                node,
                message_id,
                sender,
                crate::router::Reach {
                    delivered,
                    busy,
                    slow,
                    unreachable: 0,
                },
            ),
            BusMessage::Unsubscribe {
                client,
                channel,
                reason,
            } => {
                self.unsubscribe_by_operator(client, &channel, &reason);
            }
            BusMessage::Takeover { client } => {
                if let Some(old) = self.registry.get(client)
                    && old.session().is_some()
                {
                    old.take_over();
                }
            }
        }
    }

    /// Unsubscribes a client of this node from `channel` at an operator's
    /// request; it gets an Unsubscribed frame. Returns whether it was
    /// subscribed.
    pub fn unsubscribe_by_operator(&self, client: ClientId, channel: &str, reason: &str) -> bool {
        if !self.drop_subscription(client, channel, true) {
            return false;
        }
        if let Some(handle) = self.registry.get(client) {
            handle.reply(
                Priority::High,
                protocol::Body::Unsubscribed {
                    channel: channel.to_owned(),
                    reason: reason.to_owned(),
                },
            );
        }
        true
    }

    /// Admits a client: into the registry (unless the node is full), then
    /// into cluster presence; returns once other nodes can route to it. A
    /// resumed session's `stored` messages are queued first, before any
    /// direct message that arrives for it from now on.
    pub async fn join(
        &self,
        client: &Arc<ClientHandle>,
        stored: Option<Vec<BusMessage>>,
    ) -> Result<(), Full> {
        match stored {
            Some(stored) => {
                let registered = self
                    .router
                    .release(client, stored, || self.registry.register(client.clone()));
                if let Err(full) = registered {
                    // The session was attached here: it waits again.
                    let generation = client.session().unwrap_or_default();
                    self.bus
                        .client_left(&client.info, SessionEnd::Detach { generation });
                    return Err(full);
                }
            }
            None => self.registry.register(client.clone())?,
        }
        self.bus.client_joined(&client.info).await;
        self.session_opened(client);
        Ok(())
    }

    /// Removes a client's connection from the registry and from cluster
    /// presence (unless another connection took its session over), and
    /// tells the bus what becomes of its session.
    pub fn leave(&self, handle: &Arc<ClientHandle>, session: SessionEnd) {
        if self.registry.unregister(handle) {
            self.drop_subscriptions(handle.id());
            self.bus.client_left(&handle.info, session);
        }
    }

    /// Leaves the cluster (removes this node's presence) and stops the
    /// bus's background work.
    pub async fn leave_cluster(&self) {
        self.bus.leave().await;
    }

    /// Whether the node is draining (no new clients; clients told to leave).
    pub fn draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Starts draining: the node stops taking clients, asks every client
    /// to reconnect elsewhere, waits up to `shutdown_grace` for them to
    /// leave, then stops (`Server::run` returns).
    pub fn start_drain(&self) {
        self.draining.cancel();
    }

    /// Completes once the node started draining.
    pub async fn drain_started(&self) {
        self.draining.cancelled().await
    }

    /// Why the node is not ready for new clients, if it is not: draining,
    /// or (in cluster mode) the cluster bus unreachable.
    pub fn not_ready(&self) -> Option<String> {
        if self.draining() {
            return Some("draining".into());
        }
        if self.bus.clustered() && !self.bus.available() {
            return Some("cluster bus (Redis) unreachable".into());
        }
        None
    }

    /// Clients of the whole cluster (or of this node when it runs alone),
    /// oldest first, at most `limit`, and whether there were more.
    pub async fn list_clients(&self, limit: usize) -> Result<(Vec<ClientInfo>, bool), BusError> {
        if !self.bus.clustered() {
            return Ok(self.registry.list(limit));
        }
        if !self.bus.available() {
            return Err(BusError::Unavailable("Redis is unreachable".into()));
        }
        self.bus.list_clients(limit).await
    }

    /// Live nodes and how many clients each has (this node alone when it
    /// is not clustered).
    pub async fn nodes(&self) -> Result<Vec<(NodeId, usize)>, BusError> {
        if !self.bus.clustered() {
            return Ok(vec![(self.id, self.registry.len())]);
        }
        let live = self.bus.live_nodes().await?;
        let (clients, _) = self.bus.list_clients(usize::MAX).await?;
        let mut counts: HashMap<NodeId, usize> = live.into_iter().map(|n| (n, 0)).collect();
        for client in clients {
            if let Some(count) = counts.get_mut(&client.node_id) {
                *count += 1;
            }
        }
        let mut nodes: Vec<_> = counts.into_iter().collect();
        nodes.sort();
        Ok(nodes)
    }

    /// Broadcasts a node-originated message (no sender: it comes from the
    /// operator) to every client of the cluster. Returns its id and how
    /// many local clients got it; an error when it could not reach every
    /// other node (local clients still got it).
    pub async fn server_broadcast(
        &self,
        priority: Priority,
        payload: Payload,
    ) -> Result<(MessageId, usize), (MessageId, usize, BusError)> {
        let frame = protocol::Frame::new(priority, protocol::Body::Broadcast { payload });
        let id = frame.id;
        let bytes =
            protocol::encode(&frame).map_err(|e| (id, 0, BusError::Unavailable(e.to_string())))?;
        let local = self.registry.broadcast(None, priority, &bytes).delivered;
        if !self.bus.clustered() {
            return Ok((id, local));
        }
        if !self.bus.available() {
            return Err((
                id,
                local,
                BusError::Unavailable("Redis is unreachable".into()),
            ));
        }
        let message = BusMessage::Broadcast {
            origin: self.id,
            priority,
            frame: bytes,
        };
        match self.publish_and_wait(Target::AllNodes, message).await {
            Ok(_) => Ok((id, local)),
            Err(err) => Err((id, local, err)),
        }
    }

    /// Disconnects client `id` wherever it is in the cluster: it gets a
    /// Goodbye with `reason` and close code KICKED.
    pub async fn kick(&self, id: ClientId, reason: &str) -> Result<Kick, BusError> {
        if let Some(client) = self.registry.get(id) {
            client.kick(reason);
            return Ok(Kick::Local);
        }
        if !self.bus.clustered() {
            return Ok(Kick::Unknown);
        }
        match self.bus.locate(id).await? {
            Some(node) if node != self.id => {
                let message = BusMessage::Kick {
                    client: id,
                    reason: reason.to_owned(),
                };
                match self.publish_and_wait(Target::Node(node), message).await? {
                    0 => Ok(Kick::Unknown),
                    _ => Ok(Kick::Remote(node)),
                }
            }
            _ => Ok(Kick::Unknown),
        }
    }

    /// Publishes and waits for the outcome: how many nodes received it.
    async fn publish_and_wait(
        &self,
        target: Target,
        message: BusMessage,
    ) -> Result<usize, BusError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: PublishDone = Box::new(move |published| {
            let _ = tx.send(published);
        });
        self.bus.publish(target, message, Some(done));
        rx.await
            .unwrap_or_else(|_| Err(BusError::Unavailable("bus stopped".into())))
    }
}
