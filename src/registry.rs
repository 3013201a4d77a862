//! The registry of clients connected to this node (the seed's
//! ClientManager): each client's [`ClientHandle`] (who it is, its outbound
//! queues, the replies the node sends it) and the map of them. It needs no
//! QUIC connection to be exercised: a handle's queues wait for one until
//! the client is ready (see `outbound`), which its unit tests rely on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;

use crate::outbound::{EnqueueError, Outbound, QueueBudget};
use crate::protocol::{
    self, Body, ClientId, ClientInfo, ErrorCode, Frame, MessageId, Priority, Sender, error_code,
    tag,
};
use crate::stats::{self, Stats};

/// What a client may do beyond protocol version 1: the version it
/// negotiated and the channels its token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The protocol version of the connection.
    pub version: u16,
    /// The token's `channels` claim (patterns), empty without a token.
    pub grants: Box<[String]>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            version: protocol::MAX_PROTOCOL_VERSION,
            grants: Box::default(),
        }
    }
}

impl Access {
    /// Whether the token grants `channel` (a pattern of its `channels`
    /// claim matches it).
    pub fn grants(&self, channel: &str) -> bool {
        self.grants
            .iter()
            .any(|pattern| protocol::channel::pattern_matches(pattern, channel))
    }
}

/// The node's handle on one connected client.
#[derive(Debug)]
pub struct ClientHandle {
    /// What the client list shows about it.
    pub info: ClientInfo,
    /// The sender stamp put on everything it sends.
    pub stamp: Sender,
    /// Its protocol version and channel grants.
    pub access: Access,
    outbound: Outbound,
    stats: Arc<Stats>,
    kick: tokio::sync::Notify,
    kick_reason: Mutex<Option<String>>,
    lost_reported: AtomicU64,
    /// Who wants to learn the answer to which of its messages (an
    /// Idempotent frame's outcome is recorded for its retries).
    taps: Mutex<Taps>,
    /// `taps` is not empty (the answer path checks this first).
    tapped: std::sync::atomic::AtomicBool,
    /// The generation of the resumable session this connection holds (0:
    /// none).
    session: AtomicU64,
    /// Its session was resumed by another connection: this one closes
    /// without touching the session or the client's presence.
    moved: std::sync::atomic::AtomicBool,
}

/// The answer the node gave a client's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Ack.
    Ack,
    /// An Error with this code and message.
    Error(ErrorCode, String),
    /// Stored for a recipient waiting to resume its session, until then
    /// (Unix milliseconds); a Stored frame (Ack before version 3).
    Stored(u64),
}

/// Learns the answer to one message.
pub type Tap = Box<dyn FnOnce(Answer) + Send>;

/// The taps of a client's messages.
#[derive(Default)]
struct Taps(HashMap<MessageId, Tap>);

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Taps({})", self.0.len())
    }
}

impl ClientHandle {
    /// A handle whose frames go to `outbound`.
    pub fn new(
        info: ClientInfo,
        stamp: Sender,
        access: Access,
        outbound: Outbound,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        Arc::new(ClientHandle {
            info,
            stamp,
            access,
            outbound,
            stats,
            kick: tokio::sync::Notify::new(),
            kick_reason: Mutex::new(None),
            lost_reported: AtomicU64::new(0),
            taps: Mutex::new(Taps::default()),
            tapped: std::sync::atomic::AtomicBool::new(false),
            session: AtomicU64::new(0),
            moved: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Records that this connection holds its session at `generation`.
    pub fn set_session(&self, generation: u64) {
        self.session.store(generation, Ordering::Release);
    }

    /// The generation of the session this connection holds, if any.
    pub fn session(&self) -> Option<u64> {
        Some(self.session.load(Ordering::Acquire)).filter(|g| *g > 0)
    }

    /// Closes this connection because its session was resumed by another
    /// one (close code 13), leaving the session alone.
    pub fn take_over(&self) {
        self.moved.store(true, Ordering::Release);
        self.kick.notify_one();
    }

    /// Whether [`ClientHandle::take_over`] was called.
    pub fn moved(&self) -> bool {
        self.moved.load(Ordering::Acquire)
    }

    /// Has `tap` learn the answer (Ack or Error) the node gives message
    /// `of` of this client, when it gives it.
    pub fn tap_answer(&self, of: MessageId, tap: Tap) {
        let mut taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
        taps.0.insert(of, tap);
        self.tapped.store(true, Ordering::Release);
    }

    fn answered(&self, of: MessageId, answer: impl FnOnce() -> Answer) {
        if !self.tapped.load(Ordering::Acquire) {
            return;
        }
        let tap = {
            let mut taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
            let tap = taps.0.remove(&of);
            if taps.0.is_empty() {
                self.tapped.store(false, Ordering::Release);
            }
            tap
        };
        if let Some(tap) = tap {
            tap(answer());
        }
    }

    /// The client's id.
    pub fn id(&self) -> ClientId {
        self.info.client_id
    }

    /// The client's queues and writers.
    pub fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    /// Queues an encoded frame (a delivery) without waiting; see
    /// [`Outbound::enqueue`]. `tag` is the frame's wire tag.
    pub fn enqueue(
        &self,
        priority: Priority,
        tag: usize,
        frame: Bytes,
    ) -> Result<(), EnqueueError> {
        self.outbound.enqueue(priority, tag, frame, false)
    }

    /// Queues a node-originated reply (fresh id, current time), never
    /// refused for the node-wide budget. A failure means the client itself
    /// is slow or gone, which is handled there.
    pub fn reply(&self, priority: Priority, body: Body) {
        let tag = body.tag();
        match protocol::encode(&Frame::new(priority, body)) {
            Ok(bytes) => {
                let _ = self.outbound.enqueue(priority, tag, bytes, true);
            }
            Err(err) => tracing::error!(%err, "cannot encode reply"),
        }
    }

    /// Acknowledges message `of`.
    pub fn ack(&self, priority: Priority, of: MessageId) {
        self.answered(of, || Answer::Ack);
        self.reply(priority, Body::Ack { of });
    }

    /// Sends an Error frame about `of` (when known).
    pub fn error(
        &self,
        priority: Priority,
        of: Option<MessageId>,
        code: ErrorCode,
        message: impl ToString,
    ) {
        self.stats.error(code.0);
        let message = message.to_string();
        tracing::debug!(client_id = %self.id(), code = code.0, %message, "error to client");
        if let Some(of) = of {
            self.answered(of, || Answer::Error(code, message.clone()));
        }
        self.reply(
            priority,
            Body::Error {
                of,
                code,
                message,
                retry_after_ms: None,
            },
        );
    }

    /// Tells the sender of Direct `of` that it was stored for a recipient
    /// waiting to resume its session (Ack on connections before version
    /// 3, which have no Stored frame).
    pub fn stored(&self, priority: Priority, of: MessageId, until_ms: u64) {
        self.answered(of, || Answer::Stored(until_ms));
        self.reply_stored(priority, of, until_ms);
    }

    fn reply_stored(&self, priority: Priority, of: MessageId, until_ms: u64) {
        if self.access.version >= protocol::RECOVERY_VERSION {
            self.reply(priority, Body::Stored { of, until_ms });
        } else {
            self.reply(priority, Body::Ack { of });
        }
    }

    /// Like [`ClientHandle::ack`] and [`ClientHandle::error`], but not
    /// seen by the message's tap: an answer about an earlier attempt of
    /// the same message (idempotency), not the outcome of this one.
    pub fn answer_untapped(&self, priority: Priority, of: MessageId, answer: Answer) {
        match answer {
            Answer::Ack => self.reply(priority, Body::Ack { of }),
            Answer::Stored(until_ms) => self.reply_stored(priority, of, until_ms),
            Answer::Error(code, message) => {
                self.stats.error(code.0);
                self.reply(
                    priority,
                    Body::Error {
                        of: Some(of),
                        code,
                        message,
                        retry_after_ms: None,
                    },
                );
            }
        }
    }

    /// Drops the tap of message `of` (it will not be answered here).
    pub fn untap(&self, of: MessageId) {
        let mut taps = self.taps.lock().unwrap_or_else(|e| e.into_inner());
        taps.0.remove(&of);
        if taps.0.is_empty() {
            self.tapped.store(false, Ordering::Release);
        }
    }

    /// Tells the client that frame `of` was dropped by its rate limit and
    /// when to try again.
    pub fn rate_limited(&self, priority: Priority, of: Option<MessageId>, wait: Duration) {
        stats::add(&self.stats.rate_limited, 1);
        self.stats.error(error_code::RATE_LIMITED.0);
        let retry_after_ms = u32::try_from(wait.as_millis().max(1)).unwrap_or(u32::MAX);
        self.reply(
            priority,
            Body::Error {
                of,
                code: error_code::RATE_LIMITED,
                message: format!("rate limit exceeded; retry after {retry_after_ms} ms"),
                retry_after_ms: Some(retry_after_ms),
            },
        );
    }

    /// Queues a Goodbye (never refused for the node-wide budget).
    pub fn goodbye(&self, reason: &str, reconnect: bool) {
        self.reply(
            Priority::High,
            Body::Goodbye {
                reason: reason.to_owned(),
                reconnect,
            },
        );
    }

    /// Asks the connection to say Goodbye (`reconnect: false`) with
    /// `reason` and close with `close_code::KICKED`.
    pub fn kick(&self, reason: &str) {
        *self.kick_reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
        self.kick.notify_one();
    }

    /// Completes when [`ClientHandle::kick`] was called.
    pub async fn kicked(&self) {
        self.kick.notified().await
    }

    /// The reason given to [`ClientHandle::kick`].
    pub fn kick_reason(&self) -> String {
        self.kick_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Which door the client came through (once it is ready).
    pub fn transport(&self) -> Option<crate::link::Transport> {
        self.outbound.connection().map(crate::link::Link::transport)
    }

    /// The connection's current QUIC round-trip estimate (once it is ready).
    pub fn rtt(&self) -> Option<Duration> {
        self.outbound.connection().map(|link| link.quic().rtt())
    }

    /// Adds the packets lost since the last call to the node's counter.
    pub fn report_lost_packets(&self) {
        let Some(conn) = self.outbound.connection() else {
            return;
        };
        let lost = conn.quic().stats().path.lost_packets;
        let before = self.lost_reported.swap(lost, Ordering::AcqRel);
        stats::add(&self.stats.quic_lost_packets, lost.saturating_sub(before));
    }
}

/// The node is at `max_clients`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("server full: {max} clients connected")]
pub struct Full {
    /// The limit.
    pub max: usize,
}

/// What a local broadcast reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BroadcastCount {
    /// Clients that got it queued.
    pub delivered: usize,
    /// Clients that missed it because the node-wide queue budget was exhausted.
    pub node_busy: usize,
}

/// All clients connected to this node.
#[derive(Debug)]
pub struct Registry {
    clients: RwLock<HashMap<ClientId, Arc<ClientHandle>>>,
    /// The connections of each user (clients with a user id).
    users: RwLock<HashMap<String, Vec<Arc<ClientHandle>>>>,
    max_clients: usize,
}

impl Registry {
    /// An empty registry admitting at most `max_clients`.
    pub fn new(max_clients: usize) -> Self {
        Registry {
            clients: RwLock::new(HashMap::new()),
            users: RwLock::new(HashMap::new()),
            max_clients,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<ClientId, Arc<ClientHandle>>> {
        // A poisoned lock only means a panic elsewhere; the map itself is intact.
        self.clients.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ClientId, Arc<ClientHandle>>> {
        self.clients.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a client, unless the node is full.
    pub fn register(&self, client: Arc<ClientHandle>) -> Result<(), Full> {
        let mut clients = self.write();
        if clients.len() >= self.max_clients {
            return Err(Full {
                max: self.max_clients,
            });
        }
        if let Some(user) = &client.info.user {
            self.users
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(user.clone())
                .or_default()
                .push(client.clone());
        }
        clients.insert(client.id(), client);
        Ok(())
    }

    /// Removes this connection of a client, if it is still the one
    /// registered under its id (a resumed session's id may belong to a
    /// newer connection by now); returns whether it was.
    pub fn unregister(&self, handle: &Arc<ClientHandle>) -> bool {
        let id = handle.id();
        let mut clients = self.write();
        if !clients.get(&id).is_some_and(|c| Arc::ptr_eq(c, handle)) {
            return false;
        }
        let Some(removed) = clients.remove(&id) else {
            return false;
        };
        if let Some(user) = &removed.info.user {
            let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = users.get_mut(user) {
                list.retain(|c| !Arc::ptr_eq(c, &removed));
                if list.is_empty() {
                    users.remove(user);
                }
            }
        }
        true
    }

    /// The connections of `user` on this node.
    pub fn of_user(&self, user: &str) -> Vec<Arc<ClientHandle>> {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// The handle of a connected client.
    pub fn get(&self, id: ClientId) -> Option<Arc<ClientHandle>> {
        self.read().get(&id).cloned()
    }

    /// Number of connected clients.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `limit` clients, sorted by connection time, and whether more exist.
    pub fn list(&self, limit: usize) -> (Vec<ClientInfo>, bool) {
        let all = self.read().values().map(|c| c.info.clone()).collect();
        crate::bus::sort_and_cut(all, limit)
    }

    /// Queues `frame` for every client except `exclude`. Never blocks:
    /// slow consumers are disconnected instead.
    pub fn broadcast(
        &self,
        exclude: Option<ClientId>,
        priority: Priority,
        frame: &Bytes,
    ) -> BroadcastCount {
        let clients = self.read();
        let mut count = BroadcastCount::default();
        for client in clients.values().filter(|c| Some(c.id()) != exclude) {
            match client.enqueue(priority, tag::BROADCAST, frame.clone()) {
                Ok(()) => count.delivered += 1,
                Err(EnqueueError::NodeBusy) => count.node_busy += 1,
                Err(_) => {}
            }
        }
        count
    }

    /// Every connected client's handle.
    pub fn all(&self) -> Vec<Arc<ClientHandle>> {
        self.read().values().cloned().collect()
    }
}

impl Registry {
    /// Every client connected to this node.
    pub fn local_clients(&self) -> Vec<ClientInfo> {
        self.read().values().map(|c| c.info.clone()).collect()
    }
}

/// Disconnects clients that stopped reading whenever the node-wide queue
/// budget refuses a message: without this, clients each within their own
/// `max_queued_bytes` could together hold the whole budget and make every
/// other client's messages SERVER_BUSY for as long as they stay connected.
/// `stall` is `slow_consumer_stall`. Looks at most every 100 ms; runs
/// until `cancel`.
pub async fn reclaim(
    registry: Arc<Registry>,
    budget: Arc<QueueBudget>,
    stall: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = budget.exhausted() => {}
            _ = cancel.cancelled() => return,
        }
        let now = crate::outbound::mono_us();
        for client in registry.all() {
            if client.outbound().stalled(now, stall) {
                client
                    .outbound()
                    .disconnect_slow("not reading while the node's queue memory is exhausted");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::QueueLimits;
    use crate::protocol::{NodeId, Payload};

    struct Fixture {
        registry: Registry,
        budget: Arc<QueueBudget>,
        stats: Arc<Stats>,
    }

    impl Fixture {
        fn new(max_clients: usize, budget: usize) -> Self {
            Fixture {
                registry: Registry::new(max_clients),
                budget: QueueBudget::new(budget),
                stats: Arc::new(Stats::default()),
            }
        }

        /// A client that is connected but not ready: its frames stay queued.
        fn client(&self, name: &str, limits: QueueLimits) -> Arc<ClientHandle> {
            let client_id = ClientId::new_random();
            let node_id = NodeId::new_random();
            let info = ClientInfo {
                client_id,
                node_id,
                name: name.into(),
                user: None,
                connected_at_ms: 0,
            };
            let stamp = Sender {
                client_id,
                node_id,
                name: name.into(),
                user: None,
            };
            let outbound =
                Outbound::new(client_id, limits, self.budget.clone(), self.stats.clone());
            ClientHandle::new(info, stamp, Access::default(), outbound, self.stats.clone())
        }
    }

    fn frame(len: usize) -> Bytes {
        protocol::encode(&Frame::new(
            Priority::Normal,
            Body::Broadcast {
                payload: Payload::Binary(vec![0; len]),
            },
        ))
        .unwrap()
    }

    const ROOMY: QueueLimits = QueueLimits {
        frames: 16,
        bytes: 1 << 20,
        coalesce: Duration::ZERO,
    };

    #[test]
    fn registration_is_bounded_and_broadcast_skips_the_sender() {
        let f = Fixture::new(2, 1 << 20);
        let (a, b) = (f.client("a", ROOMY), f.client("b", ROOMY));
        f.registry.register(a.clone()).unwrap();
        f.registry.register(b.clone()).unwrap();
        assert_eq!(
            f.registry.register(f.client("c", ROOMY)),
            Err(Full { max: 2 })
        );
        let bytes = frame(10);
        let count = f.registry.broadcast(Some(a.id()), Priority::Normal, &bytes);
        assert_eq!(count.delivered, 1);
        assert_eq!(b.outbound().queued_bytes(), bytes.len());
        assert_eq!(a.outbound().queued_bytes(), 0);
        assert!(f.registry.unregister(&a));
        assert!(!f.registry.unregister(&a));
        assert_eq!(f.registry.local_clients().len(), 1);
    }

    #[test]
    fn a_full_queue_makes_a_slow_consumer_and_frees_its_budget_when_gone() {
        let f = Fixture::new(10, 1 << 20);
        let slow = f.client(
            "slow",
            QueueLimits {
                frames: 2,
                bytes: 1 << 20,
                coalesce: Duration::ZERO,
            },
        );
        f.registry.register(slow.clone()).unwrap();
        let bytes = frame(10);
        assert_eq!(
            slow.enqueue(Priority::Normal, tag::BROADCAST, bytes.clone()),
            Ok(())
        );
        assert_eq!(
            slow.enqueue(Priority::Normal, tag::BROADCAST, bytes.clone()),
            Ok(())
        );
        assert_eq!(
            slow.enqueue(Priority::Normal, tag::BROADCAST, bytes.clone()),
            Err(EnqueueError::SlowConsumer)
        );
        assert!(slow.outbound().is_slow());
        let (code, _) = slow.outbound().closed_by_node().unwrap();
        assert_eq!(code, protocol::close_code::SLOW_CONSUMER);
        assert_eq!(stats::get(&f.stats.slow_consumer_disconnects), 1);
        assert_eq!(f.budget.used(), 2 * bytes.len());
        f.registry.unregister(&slow);
        drop(slow);
        assert_eq!(f.budget.used(), 0, "queued frames give their budget back");
    }

    #[test]
    fn the_node_budget_refuses_deliveries_but_never_replies() {
        let f = Fixture::new(10, 100);
        let a = f.client("a", ROOMY);
        let bytes = frame(80);
        assert_eq!(
            a.enqueue(Priority::Normal, tag::BROADCAST, bytes),
            Err(EnqueueError::NodeBusy)
        );
        assert_eq!(stats::get(&f.stats.node_busy), 1);
        a.ack(Priority::High, MessageId::new_random());
        assert!(f.budget.used() > 0, "the reply was queued anyway");
    }

    #[test]
    fn a_queue_that_does_not_move_is_stalled() {
        let f = Fixture::new(10, 1 << 20);
        let a = f.client("a", ROOMY);
        let now = crate::outbound::mono_us();
        assert!(
            !a.outbound()
                .stalled(now + 10_000_000, Duration::from_secs(1)),
            "empty"
        );
        a.enqueue(Priority::Normal, tag::BROADCAST, frame(10))
            .unwrap();
        let now = crate::outbound::mono_us();
        assert!(!a.outbound().stalled(now, Duration::from_secs(1)));
        assert!(
            a.outbound()
                .stalled(now + 1_000_000, Duration::from_secs(1))
        );
    }
}
