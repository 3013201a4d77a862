//! Message router: decides where a message goes. Local recipients get it
//! straight into their queues; recipients on other nodes get it through the
//! cluster bus. It also answers the sender (Ack or Error) once the outcome
//! is known, and handles what other nodes send this one.
//!
//! A direct message to a client of another node is acknowledged only when
//! that node's delivery receipt comes back, so an Ack means the same thing
//! everywhere: queued for the recipient.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bus::{Bus, BusError, BusMessage, ClusterBus, DeliveryOutcome, Target};
use crate::client_manager::{ClientHandle, ClientManager, EnqueueError};
use crate::protocol::{self, ClientId, ClientInfo, MessageId, NodeId, Priority, error_code};
use crate::stats::Stats;

/// Most client→node lookups kept; the cache is cleared when it fills.
const LOCATE_CACHE_MAX: usize = 100_000;

struct PendingDelivery {
    to: ClientId,
    node: NodeId,
    priority: Priority,
    deadline: Instant,
}

/// Delivers messages to local clients and, through the bus, to other nodes.
pub struct Router {
    node_id: NodeId,
    clients: Arc<ClientManager>,
    bus: Bus,
    pending: Mutex<HashMap<(ClientId, MessageId), PendingDelivery>>,
    located: Mutex<HashMap<ClientId, NodeId>>,
    delivery_timeout: Duration,
    max_pending: usize,
    stats: Arc<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Router {
    /// A router for node `node_id` over its local registry and bus.
    pub fn new(
        node_id: NodeId,
        clients: Arc<ClientManager>,
        bus: Bus,
        delivery_timeout: Duration,
        max_pending: usize,
        stats: Arc<Stats>,
    ) -> Self {
        Router {
            node_id,
            clients,
            bus,
            pending: Mutex::new(HashMap::new()),
            located: Mutex::new(HashMap::new()),
            delivery_timeout,
            max_pending,
            stats,
        }
    }

    /// The bus this router uses.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Starts the bus and the tasks that process other nodes' messages and
    /// expire unanswered deliveries.
    pub fn start(
        self: &Arc<Self>,
        mut inbox: mpsc::Receiver<BusMessage>,
        cancel: CancellationToken,
    ) {
        if let Bus::Redis(redis) = &self.bus {
            redis.start();
        }
        let router = self.clone();
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = inbox.recv() => match message {
                        Some(message) => router.handle_bus_message(message),
                        None => return,
                    },
                    _ = stop.cancelled() => return,
                }
            }
        });
        let router = self.clone();
        tokio::spawn(async move {
            let period = (router.delivery_timeout / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => router.expire_deliveries(),
                    _ = cancel.cancelled() => return,
                }
            }
        });
    }

    /// Leaves the cluster (removes this node's presence).
    pub async fn leave(&self) {
        self.bus.leave().await;
    }

    /// Records a newly connected local client in cluster presence; returns
    /// once other nodes can route to it (bounded wait when Redis is slow).
    pub async fn client_joined(&self, info: &ClientInfo) {
        self.bus.client_joined(info).await;
    }

    /// Records that a local client left.
    pub fn client_left(&self, id: ClientId) {
        self.bus.client_left(id);
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
        let count = self.clients.broadcast(Some(from.id()), priority, &frame);
        self.stats
            .delivery_local
            .observe(started.elapsed().as_secs_f64());
        let local = count.delivered;
        if count.node_busy > 0 {
            // Nothing lost silently: the sender learns that some missed it.
            return from.error(
                priority,
                Some(id),
                error_code::SERVER_BUSY,
                format!(
                    "delivered to {local} clients on this node; {} missed it because the node's queues are full (not sent to other nodes)",
                    count.node_busy
                ),
            );
        }
        if !self.bus.clustered() {
            from.ack(priority, id);
            return;
        }
        if !self.bus.available() {
            from.error(
                priority,
                Some(id),
                error_code::CLUSTER_UNAVAILABLE,
                format!(
                    "delivered to {local} clients on this node only: the cluster bus is unavailable"
                ),
            );
            return;
        }
        let sender = from.clone();
        let message = BusMessage::Broadcast {
            origin: self.node_id,
            priority,
            frame,
        };
        self.bus.publish(
            Target::AllNodes,
            message,
            Some(Box::new(move |result| match result {
                Ok(_) => sender.ack(priority, id),
                Err(err) => sender.error(
                    priority,
                    Some(id),
                    error_code::CLUSTER_UNAVAILABLE,
                    broadcast_shortfall(local, &err),
                ),
            })),
        );
    }

    /// Broadcasts a node-originated message (no sender: it comes from the
    /// operator) to every client of the cluster. Returns its id and how
    /// many local clients got it; an error when it could not reach the
    /// other nodes (local clients still got it).
    pub async fn server_broadcast(
        &self,
        priority: Priority,
        payload: protocol::Payload,
    ) -> Result<(MessageId, usize), (MessageId, usize, BusError)> {
        let frame = protocol::Frame::new(priority, protocol::Body::Broadcast { payload });
        let id = frame.id;
        let bytes =
            protocol::encode(&frame).map_err(|e| (id, 0, BusError::Unavailable(e.to_string())))?;
        let local = self.clients.broadcast(None, priority, &bytes).delivered;
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
            origin: self.node_id,
            priority,
            frame: bytes,
        };
        match self.publish_and_wait(Target::AllNodes, message).await {
            Ok(_) => Ok((id, local)),
            Err(err) => Err((id, local, err)),
        }
    }

    /// Publishes and waits for the outcome: how many nodes received it.
    async fn publish_and_wait(
        &self,
        target: Target,
        message: BusMessage,
    ) -> Result<usize, BusError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.bus.publish(
            target,
            message,
            Some(Box::new(move |result| {
                let _ = tx.send(result);
            })),
        );
        rx.await
            .unwrap_or_else(|_| Err(BusError::Unavailable("bus stopped".into())))
    }

    /// Disconnects client `id` wherever it is in the cluster: it gets a
    /// Goodbye with `reason` and close code KICKED.
    pub async fn kick(&self, id: ClientId, reason: &str) -> Result<Kick, BusError> {
        if let Some(client) = self.clients.get(id) {
            client.kick(reason);
            return Ok(Kick::Local);
        }
        if !self.bus.clustered() {
            return Ok(Kick::Unknown);
        }
        match self.bus.locate(id).await? {
            Some(node) if node != self.node_id => {
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

    /// Live nodes and how many clients each has (this node alone when it
    /// is not clustered).
    pub async fn nodes(&self, max_clients: usize) -> Result<Vec<(NodeId, usize)>, BusError> {
        if !self.bus.clustered() {
            return Ok(vec![(self.node_id, self.clients.len())]);
        }
        let live = self.bus.live_nodes().await?;
        let (clients, _) = self.bus.list_clients(max_clients).await?;
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
        if let Some(target) = self.clients.get(to) {
            match target.enqueue(priority, protocol::kind::DIRECT, frame) {
                Ok(()) => {
                    self.stats
                        .delivery_local
                        .observe(started.elapsed().as_secs_f64());
                    from.ack(priority, id)
                }
                Err(err) => self.reply_outcome(from, priority, id, to, outcome_of(err)),
            }
            return;
        }
        if !self.bus.clustered() {
            return self.reply_outcome(from, priority, id, to, DeliveryOutcome::UnknownClient);
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
            Ok(_) => {
                return self.reply_outcome(from, priority, id, to, DeliveryOutcome::UnknownClient);
            }
            Err(err) => {
                return from.error(priority, Some(id), error_code::CLUSTER_UNAVAILABLE, err);
            }
        };
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
        let message = BusMessage::Direct {
            origin: self.node_id,
            message_id: id,
            sender: from.id(),
            to,
            priority,
            frame,
        };
        let router = self.clone();
        let sender = from.clone();
        self.bus.publish(
            Target::Node(node),
            message,
            Some(Box::new(move |result| {
                let failure = match result {
                    Ok(0) => {
                        // Nobody listens on that node's channel: it is gone.
                        lock(&router.located).remove(&to);
                        Some((
                            error_code::UNKNOWN_CLIENT,
                            format!("no client with id {to} is connected"),
                        ))
                    }
                    Ok(_) => None,
                    Err(err) => Some((error_code::CLUSTER_UNAVAILABLE, err.to_string())),
                };
                if let Some((code, message)) = failure
                    && lock(&router.pending).remove(&(sender.id(), id)).is_some()
                {
                    sender.error(priority, Some(id), code, message);
                }
            })),
        );
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

    fn reply_outcome(
        &self,
        from: &ClientHandle,
        priority: Priority,
        id: MessageId,
        to: ClientId,
        outcome: DeliveryOutcome,
    ) {
        match outcome {
            DeliveryOutcome::Delivered => from.ack(priority, id),
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

    /// Clients of the whole cluster (or of this node when it runs alone).
    pub async fn list(&self, limit: usize) -> Result<(Vec<ClientInfo>, bool), BusError> {
        if !self.bus.clustered() {
            return Ok(self.clients.list(limit));
        }
        if !self.bus.available() {
            return Err(BusError::Unavailable("Redis is unreachable".into()));
        }
        self.bus.list_clients(limit).await
    }

    /// Handles one message from another node.
    pub fn handle_bus_message(&self, message: BusMessage) {
        match message {
            BusMessage::Broadcast {
                origin,
                priority,
                frame,
            } => {
                if origin != self.node_id {
                    let count = self.clients.broadcast(None, priority, &frame);
                    if count.node_busy > 0 {
                        // The origin acknowledged on publish; all that is
                        // left is to make the loss visible here.
                        warn!(
                            missed = count.node_busy,
                            "cluster broadcast not delivered to some clients: node queues full"
                        );
                    }
                }
            }
            BusMessage::Direct {
                origin,
                message_id,
                sender,
                to,
                priority,
                frame,
            } => {
                let outcome = match self.clients.get(to) {
                    Some(target) => match target.enqueue(priority, protocol::kind::DIRECT, frame) {
                        Ok(()) => DeliveryOutcome::Delivered,
                        Err(err) => outcome_of(err),
                    },
                    None => DeliveryOutcome::UnknownClient,
                };
                let receipt = BusMessage::Receipt {
                    message_id,
                    sender,
                    to,
                    outcome,
                };
                self.bus.publish(Target::Node(origin), receipt, None);
            }
            BusMessage::Kick { client, reason } => match self.clients.get(client) {
                Some(handle) => handle.kick(&reason),
                None => debug!(%client, "kick for a client that is not here"),
            },
            BusMessage::Receipt {
                message_id,
                sender,
                to,
                outcome,
            } => {
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
                if let Some(from) = self.clients.get(sender) {
                    self.reply_outcome(&from, pending.priority, message_id, to, outcome);
                }
            }
        }
    }

    /// Fails deliveries whose receipt did not come in time.
    fn expire_deliveries(&self) {
        let now = Instant::now();
        let expired: Vec<_> = {
            let mut pending = lock(&self.pending);
            let keys: Vec<_> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter()
                .filter_map(|k| pending.remove(&k).map(|p| (k, p)))
                .collect()
        };
        for ((sender, id), p) in expired {
            warn!(%id, node = %p.node, "no delivery receipt in time");
            lock(&self.located).remove(&p.to);
            if let Some(from) = self.clients.get(sender) {
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

/// What the sender of a broadcast that did not reach every live node is told.
pub(crate) fn broadcast_shortfall(local: usize, err: &BusError) -> String {
    match err {
        BusError::Partial { reached, live } => format!(
            "delivered to {local} clients on this node and to {} of the {} other live nodes; \
             the others were not listening (subscription lost or re-registering), so their clients did not get it",
            reached.saturating_sub(1),
            live.saturating_sub(1)
        ),
        other => format!("delivered to {local} clients on this node only: {other}"),
    }
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

fn outcome_of(err: EnqueueError) -> DeliveryOutcome {
    match err {
        EnqueueError::SlowConsumer => DeliveryOutcome::RecipientSlow,
        EnqueueError::Closed => DeliveryOutcome::UnknownClient,
        EnqueueError::NodeBusy => DeliveryOutcome::NodeBusy,
    }
}
