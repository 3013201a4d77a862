//! ClientManager: the registry of clients connected to this node, and each
//! client's bounded outbound queues.
//!
//! Every client has one queue per priority, drained by its own writer task
//! onto its own QUIC stream (see `connection`). Enqueueing never blocks: a
//! client whose queue is full, or who has more than `max_queued_bytes`
//! waiting, is a slow consumer and is disconnected with
//! `close_code::SLOW_CONSUMER`, so one slow reader can neither stall its
//! senders nor grow the node's memory. When the node-wide budget
//! (`max_total_queued_bytes`) runs out before any one client's does,
//! [`reclaim`] disconnects the clients whose queues have not moved for
//! `slow_consumer_stall`, so clients that stopped reading cannot block
//! everyone else whatever the two budgets are.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::protocol::{
    self, Body, ClientId, ClientInfo, ErrorCode, Frame, MessageId, Priority, Sender, close_code,
};
use crate::stats::{self, Stats};

/// Why a frame could not be queued for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// The client's queue was full; it is being disconnected.
    #[error("recipient is not reading fast enough and is being disconnected")]
    SlowConsumer,
    /// The client is already gone.
    #[error("recipient has disconnected")]
    Closed,
    /// The node's memory budget for queued messages (all clients together)
    /// is exhausted; the message was not queued.
    #[error("the node's queues are full (max_total_queued_bytes)")]
    NodeBusy,
}

/// Milliseconds on a process-wide monotonic clock (for progress stamps).
fn mono_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The node-wide budget for bytes queued to clients.
#[derive(Debug)]
pub struct QueueBudget {
    used: AtomicUsize,
    max: usize,
    /// Woken when the budget refused a message, so [`reclaim`] looks for
    /// clients that stopped reading.
    exhausted: tokio::sync::Notify,
}

impl QueueBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(QueueBudget {
            used: AtomicUsize::new(0),
            max,
            exhausted: tokio::sync::Notify::new(),
        })
    }

    /// Bytes queued for all clients right now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, len: usize) -> bool {
        let before = self.used.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max {
            self.used.fetch_sub(len, Ordering::AcqRel);
            self.exhausted.notify_one();
            return false;
        }
        true
    }

    fn force(&self, len: usize) {
        self.used.fetch_add(len, Ordering::AcqRel);
    }

    fn give(&self, len: usize) {
        self.used.fetch_sub(len, Ordering::AcqRel);
    }
}

/// The node's handle on one connected client.
#[derive(Debug)]
pub struct ClientHandle {
    /// What the client list shows about it.
    pub info: ClientInfo,
    /// The sender stamp put on everything it sends.
    pub stamp: Sender,
    lanes: [Lane; 3],
    queue_len: usize,
    queued_bytes: Arc<AtomicUsize>,
    max_queued_bytes: usize,
    budget: Arc<QueueBudget>,
    slow: AtomicBool,
    conn: quinn::Connection,
    stats: Arc<Stats>,
    writers: TaskTracker,
    span: tracing::Span,
    ready: AtomicBool,
    high_stream: Mutex<Option<quinn::SendStream>>,
    kick: tokio::sync::Notify,
    kick_reason: Mutex<Option<String>>,
    lost_reported: std::sync::atomic::AtomicU64,
    /// Since when (`mono_ms`) the queue has held bytes without a write
    /// completing: set when it turns non-empty and after every write.
    progress_ms: Arc<AtomicU64>,
    /// How the node itself closed the connection, for the close log line.
    closed: Arc<NodeClose>,
}

/// The close code and reason the node closed a connection with, kept so
/// the connection's log line states what the client received (quinn only
/// reports "closed locally").
#[derive(Debug, Default)]
pub struct NodeClose {
    end: Mutex<Option<(u32, String)>>,
}

impl NodeClose {
    /// Closes `conn` with `code` and `reason` (the first close wins).
    fn close(&self, conn: &quinn::Connection, code: u32, reason: String) {
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            conn.close(code.into(), reason.as_bytes());
            *end = Some((code, reason));
        }
    }

    /// The code and reason, if the node closed the connection this way.
    pub fn get(&self) -> Option<(u32, String)> {
        self.end.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One priority's queue and writer, created on first use: most clients
/// never use all three priorities, and an idle client then costs no
/// channel and no task for them (see BENCHMARKS.md, `connections`).
#[derive(Debug, Default)]
struct Lane {
    tx: OnceLock<mpsc::Sender<Bytes>>,
    /// A receiver waiting for the client to be ready before its writer
    /// starts, so nothing is written before the HandshakeAck.
    pending: Mutex<Option<mpsc::Receiver<Bytes>>>,
}

/// Most frames a writer puts into one write call.
const WRITE_BATCH: usize = 64;

impl ClientHandle {
    /// A handle whose queues hold `queue_len` messages per priority. Writer
    /// tasks run in `span` and are tracked by [`ClientHandle::writers`].
    pub fn new(
        info: ClientInfo,
        stamp: Sender,
        conn: quinn::Connection,
        queue_len: usize,
        max_queued_bytes: usize,
        budget: Arc<QueueBudget>,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        Arc::new(ClientHandle {
            info,
            stamp,
            lanes: Default::default(),
            queue_len,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            max_queued_bytes,
            budget,
            slow: AtomicBool::new(false),
            conn,
            stats,
            writers: TaskTracker::new(),
            span: tracing::Span::current(),
            ready: AtomicBool::new(false),
            high_stream: Mutex::new(None),
            kick: tokio::sync::Notify::new(),
            kick_reason: Mutex::new(None),
            lost_reported: std::sync::atomic::AtomicU64::new(0),
            progress_ms: Arc::new(AtomicU64::new(mono_ms())),
            closed: Arc::new(NodeClose::default()),
        })
    }

    /// How the node closed this client's connection itself (slow consumer,
    /// a client that stopped a node stream), if it did.
    pub fn closed_by_node(&self) -> Option<(u32, String)> {
        self.closed.get()
    }

    /// Whether the client's queue holds bytes that no write has taken for
    /// `stall`: it stopped reading.
    fn stalled(&self, now_ms: u64, stall: Duration) -> bool {
        self.queued_bytes.load(Ordering::Acquire) > 0
            && now_ms.saturating_sub(self.progress_ms.load(Ordering::Acquire))
                >= stall.as_millis() as u64
    }

    /// Starts delivery once the HandshakeAck is on `high` (the high-priority
    /// stream, reused by the high lane). Frames queued before stay queued
    /// until now, so the client always reads the HandshakeAck first.
    pub fn mark_ready(&self, high: quinn::SendStream) {
        *self.high_stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(high);
        self.ready.store(true, Ordering::SeqCst);
        for priority in Priority::ALL {
            let rx = self.lanes[priority.index()]
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(rx) = rx {
                self.spawn_writer(priority, rx);
            }
        }
    }

    fn spawn_writer(&self, priority: Priority, rx: mpsc::Receiver<Bytes>) {
        let stream = if priority == Priority::High {
            self.high_stream
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        } else {
            None
        };
        let writer = write_stream(
            Writer {
                conn: self.conn.clone(),
                priority,
                queued_bytes: self.queued_bytes.clone(),
                budget: self.budget.clone(),
                progress_ms: self.progress_ms.clone(),
                closed: self.closed.clone(),
            },
            stream,
            rx,
        );
        self.writers.spawn(writer.instrument(self.span.clone()));
    }

    /// The writer tasks; they end once the last handle is dropped and their
    /// queues are drained.
    pub fn writers(&self) -> TaskTracker {
        self.writers.clone()
    }

    fn sender(&self, priority: Priority) -> &mpsc::Sender<Bytes> {
        let lane = &self.lanes[priority.index()];
        lane.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.queue_len);
            // Checked under the lane lock, which mark_ready also takes after
            // setting `ready`: the receiver is either spawned here or found there.
            let mut pending = lane.pending.lock().unwrap_or_else(|e| e.into_inner());
            if self.ready.load(Ordering::SeqCst) {
                drop(pending);
                self.spawn_writer(priority, rx);
            } else {
                *pending = Some(rx);
            }
            tx
        })
    }

    /// The client's id.
    pub fn id(&self) -> ClientId {
        self.info.client_id
    }

    /// Queues an encoded frame without waiting. A full queue disconnects the
    /// client as a slow consumer; an exhausted node-wide budget refuses the
    /// frame with [`EnqueueError::NodeBusy`].
    /// `kind` is the frame's wire tag ([`Body::tag`]), for the statistics.
    pub fn enqueue(
        &self,
        priority: Priority,
        kind: usize,
        frame: Bytes,
    ) -> Result<(), EnqueueError> {
        self.enqueue_inner(priority, kind, frame, false)
    }

    fn enqueue_inner(
        &self,
        priority: Priority,
        kind: usize,
        frame: Bytes,
        is_reply: bool,
    ) -> Result<(), EnqueueError> {
        if self.slow.load(Ordering::Relaxed) {
            return Err(EnqueueError::SlowConsumer);
        }
        let len = frame.len();
        // The client's own budget first: a client that stopped reading is
        // a slow consumer even when the node-wide budget is no larger.
        let before = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        // An empty queue always takes one frame, whatever its size.
        if before > 0 && before + len > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.disconnect_slow("outbound byte budget exhausted");
            return Err(EnqueueError::SlowConsumer);
        }
        // Replies to the client's own requests are small and bounded by its
        // own budget; they are never refused for the node-wide one, so a
        // request always gets its answer.
        if is_reply {
            self.budget.force(len);
        } else if !self.budget.take(len) {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            stats::add(&self.stats.node_busy, 1);
            return Err(EnqueueError::NodeBusy);
        }
        if before == 0 {
            // Stall time counts from when the queue stopped being empty.
            self.progress_ms.store(mono_ms(), Ordering::Release);
        }
        match self.sender(priority).try_send(frame) {
            Ok(()) => {
                self.stats.frame_out(kind, len);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                self.budget.give(len);
                self.disconnect_slow("outbound queue full");
                Err(EnqueueError::SlowConsumer)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                self.budget.give(len);
                Err(EnqueueError::Closed)
            }
        }
    }

    /// Closes the connection with `close_code::SLOW_CONSUMER` (once).
    fn disconnect_slow(&self, why: &str) {
        if !self.slow.swap(true, Ordering::AcqRel) {
            stats::add(&self.stats.slow_consumer_disconnects, 1);
            tracing::warn!(client_id = %self.id(), why, "disconnecting slow consumer");
            self.closed.close(
                &self.conn,
                close_code::SLOW_CONSUMER,
                format!("slow consumer: {why}"),
            );
        }
    }

    /// Queues a node-originated reply (fresh id, current time). A failure
    /// means the client itself is slow or gone, which is handled there.
    pub fn reply(&self, priority: Priority, body: Body) {
        let kind = body.tag();
        match protocol::encode(&Frame::new(priority, body)) {
            Ok(bytes) => {
                let _ = self.enqueue_inner(priority, kind, bytes, true);
            }
            Err(err) => tracing::error!(%err, "cannot encode reply"),
        }
    }

    /// Acknowledges message `of`.
    pub fn ack(&self, priority: Priority, of: MessageId) {
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

    /// Tells the client that frame `of` was dropped by its rate limit and
    /// when to try again.
    pub fn rate_limited(&self, priority: Priority, of: Option<MessageId>, wait: Duration) {
        stats::add(&self.stats.rate_limited, 1);
        self.stats
            .error(crate::protocol::error_code::RATE_LIMITED.0);
        let retry_after_ms = u32::try_from(wait.as_millis().max(1)).unwrap_or(u32::MAX);
        self.reply(
            priority,
            Body::Error {
                of,
                code: crate::protocol::error_code::RATE_LIMITED,
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

    /// The connection's current QUIC round-trip estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Adds the packets lost since the last call to the node's counter.
    pub fn report_lost_packets(&self) {
        let lost = self.conn.stats().path.lost_packets;
        let before = self.lost_reported.swap(lost, Ordering::AcqRel);
        stats::add(&self.stats.quic_lost_packets, lost.saturating_sub(before));
    }

    /// Whether the client was disconnected as a slow consumer.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }
}

/// The node is at `max_clients`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("server full: {max} clients connected")]
pub struct Full {
    /// The limit.
    pub max: usize,
}

/// All clients connected to this node.
#[derive(Debug)]
pub struct ClientManager {
    clients: RwLock<HashMap<ClientId, Arc<ClientHandle>>>,
    max_clients: usize,
}

impl ClientManager {
    /// An empty registry admitting at most `max_clients`.
    pub fn new(max_clients: usize) -> Self {
        ClientManager {
            clients: RwLock::new(HashMap::new()),
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
        clients.insert(client.id(), client);
        Ok(())
    }

    /// Removes a client; returns whether it was there.
    pub fn unregister(&self, id: ClientId) -> bool {
        self.write().remove(&id).is_some()
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
        let mut all: Vec<ClientInfo> = self.read().values().map(|c| c.info.clone()).collect();
        all.sort_by_key(|c| (c.connected_at_ms, c.client_id));
        let truncated = all.len() > limit;
        all.truncate(limit);
        (all, truncated)
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
            match client.enqueue(priority, protocol::kind::BROADCAST, frame.clone()) {
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

/// What a local broadcast reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BroadcastCount {
    /// Clients that got it queued.
    pub delivered: usize,
    /// Clients that missed it because the node-wide queue budget was exhausted.
    pub node_busy: usize,
}

/// What a writer task needs of its client.
struct Writer {
    conn: quinn::Connection,
    priority: Priority,
    queued_bytes: Arc<AtomicUsize>,
    budget: Arc<QueueBudget>,
    progress_ms: Arc<AtomicU64>,
    closed: Arc<NodeClose>,
}

/// Drains one priority's queue onto its own stream, opened on first use.
async fn write_stream(
    w: Writer,
    mut stream: Option<quinn::SendStream>,
    mut rx: mpsc::Receiver<Bytes>,
) {
    let Writer {
        conn,
        priority,
        queued_bytes,
        budget,
        ..
    } = &w;
    let mut batch: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let len: usize = batch.iter().map(Bytes::len).sum();
        let send = match &mut stream {
            Some(s) => s,
            None => match conn.open_uni().await {
                Ok(s) => {
                    let _ = s.set_priority(protocol::stream_priority(*priority));
                    stream.insert(s)
                }
                Err(err) => {
                    tracing::debug!(%err, %priority, "cannot open stream");
                    release(queued_bytes, budget, len);
                    return discard(rx, queued_bytes, budget);
                }
            },
        };
        let result = write_all(send, &mut batch, &w.progress_ms).await;
        batch.clear();
        release(queued_bytes, budget, len);
        match result {
            Ok(()) => {}
            Err(quinn::WriteError::Stopped(code)) => {
                // The client may not stop the node's streams (PROTOCOL.md
                // section 2): everything later on this priority would be
                // lost while it looks connected.
                tracing::debug!(%code, %priority, "client stopped a node stream");
                w.closed.close(
                    conn,
                    close_code::PROTOCOL_VIOLATION,
                    format!("the client stopped the node's {priority} stream (code {code})"),
                );
                return discard(rx, queued_bytes, budget);
            }
            Err(err) => {
                tracing::debug!(%err, %priority, "stream write failed");
                return discard(rx, queued_bytes, budget);
            }
        }
    }
    if let Some(mut send) = stream {
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// Writes the whole batch, stamping progress whenever some of it went out
/// (a client that reads slowly but steadily is never taken for stalled).
async fn write_all(
    send: &mut quinn::SendStream,
    mut bufs: &mut [Bytes],
    progress_ms: &AtomicU64,
) -> Result<(), quinn::WriteError> {
    while !bufs.is_empty() {
        let written = send.write_chunks(bufs).await?;
        progress_ms.store(mono_ms(), Ordering::Release);
        bufs = &mut bufs[written.chunks..];
    }
    Ok(())
}

/// Disconnects clients that stopped reading whenever the node-wide queue
/// budget refuses a message: without this, clients each within their own
/// `max_queued_bytes` could together hold the whole budget and make every
/// other client's messages SERVER_BUSY for as long as they stay connected.
/// `stall` is `slow_consumer_stall`. Looks at most every 100 ms; runs
/// until `cancel`.
pub async fn reclaim(
    clients: Arc<ClientManager>,
    budget: Arc<QueueBudget>,
    stall: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = budget.exhausted.notified() => {}
            _ = cancel.cancelled() => return,
        }
        let now = mono_ms();
        for client in clients.all() {
            if client.stalled(now, stall) {
                client.disconnect_slow("not reading while the node's queue memory is exhausted");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

fn release(queued_bytes: &AtomicUsize, budget: &QueueBudget, len: usize) {
    queued_bytes.fetch_sub(len, Ordering::AcqRel);
    budget.give(len);
}

/// Gives back the budget of frames that will never be written.
fn discard(mut rx: mpsc::Receiver<Bytes>, queued_bytes: &AtomicUsize, budget: &QueueBudget) {
    rx.close();
    while let Ok(frame) = rx.try_recv() {
        release(queued_bytes, budget, frame.len());
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        // Lanes whose writer never started (the client never became ready).
        for lane in &self.lanes {
            let pending = lane
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(rx) = pending {
                discard(rx, &self.queued_bytes, &self.budget);
            }
        }
    }
}
