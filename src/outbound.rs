//! One client's outbound side: a bounded queue per priority, each drained
//! by its own writer task onto its own QUIC stream, and the node-wide
//! budget all queues share.
//!
//! Enqueueing never blocks. A client whose queue is full, or who has more
//! than `max_queued_bytes` waiting, is a slow consumer and is disconnected
//! with `close_code::SLOW_CONSUMER`, so one slow reader can neither stall
//! its senders nor grow the node's memory. Frames queued before the client
//! is ready (its HandshakeAck written) wait until [`Outbound::start`] hands
//! over the connection, so the client always reads the HandshakeAck first;
//! until then an `Outbound` needs no connection at all (the registry's unit
//! tests use it so).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::link::{Link as ClientLink, OutStream, WriteError};
use crate::protocol::{self, ClientId, Priority, close_code};
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

/// Microseconds on a process-wide monotonic clock (for progress stamps).
pub(crate) fn mono_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The node-wide budget for bytes queued to clients.
#[derive(Debug)]
pub struct QueueBudget {
    used: AtomicUsize,
    max: usize,
    /// Woken when the budget refused a message, so the registry's
    /// `reclaim` looks for clients that stopped reading.
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

    /// Completes after the budget refused a message.
    pub async fn exhausted(&self) {
        self.exhausted.notified().await
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

/// How the node itself closed a client's connection (close code and
/// reason), kept so the connection's log line states what the client
/// received (quinn only reports "closed locally").
#[derive(Debug, Default)]
struct NodeClose {
    end: Mutex<Option<(u32, String)>>,
}

impl NodeClose {
    /// Records the close (the first one wins) and closes `conn` when the
    /// client has one yet.
    fn close(&self, conn: Option<&ClientLink>, code: u32, reason: String) {
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            if let Some(conn) = conn {
                conn.close(code, &reason);
            }
            *end = Some((code, reason));
        }
    }

    fn get(&self) -> Option<(u32, String)> {
        self.end.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The queue limits of one client.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Frames per priority (`outbound_queue_len`).
    pub frames: usize,
    /// Bytes over all priorities (`max_queued_bytes`).
    pub bytes: usize,
    /// Least time between two writes on one stream (`coalesce_window`).
    pub coalesce: Duration,
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
    /// Wakes a writer that holds its next write back (see [`Coalescer`])
    /// when anything but a broadcast is queued: replies and direct
    /// messages are never held back, since a sender's next request may wait
    /// for them (a producer that waits for its consumer would otherwise be
    /// slowed to a window of messages per `coalesce_window`).
    flush: OnceLock<Arc<tokio::sync::Notify>>,
}

impl Lane {
    fn flush(&self) -> &Arc<tokio::sync::Notify> {
        self.flush.get_or_init(Default::default)
    }
}

/// What the writers write to, set once the client is ready.
#[derive(Debug)]
struct Link {
    conn: ClientLink,
    /// The connection's span, which the writer tasks run in.
    span: tracing::Span,
}

/// Most frames a writer puts into one write call.
const WRITE_BATCH: usize = 64;

/// When a client's queues last turned non-empty or a write ended
/// (`mono_us`), shared by the `Outbound` and its writers.
#[derive(Debug)]
struct Progress {
    /// Since when the queues (all lanes) have held bytes without a write
    /// completing: set when they turn non-empty and after every write
    /// (the stall detector).
    any: AtomicU64,
    /// Per lane: when its queue last turned non-empty (how late its
    /// writer runs; see [`Coalescer`]).
    lanes: [AtomicU64; 3],
}

impl Progress {
    fn new() -> Arc<Self> {
        let now = mono_us();
        Arc::new(Progress {
            any: AtomicU64::new(now),
            lanes: [
                AtomicU64::new(now),
                AtomicU64::new(now),
                AtomicU64::new(now),
            ],
        })
    }
}

/// One client's outbound queues and writers.
#[derive(Debug)]
pub struct Outbound {
    /// Whose queues these are (for the logs).
    client: ClientId,
    lanes: [Lane; 3],
    limits: QueueLimits,
    queued_bytes: Arc<AtomicUsize>,
    budget: Arc<QueueBudget>,
    slow: AtomicBool,
    progress: Arc<Progress>,
    closed: Arc<NodeClose>,
    stats: Arc<Stats>,
    writers: TaskTracker,
    link: OnceLock<Link>,
    /// The high-priority stream the HandshakeAck went out on, reused by
    /// the high lane's writer.
    high_stream: Mutex<Option<OutStream>>,
}

impl Outbound {
    /// Empty queues for `client` within `limits`, drawing on the
    /// node-wide `budget`.
    pub fn new(
        client: ClientId,
        limits: QueueLimits,
        budget: Arc<QueueBudget>,
        stats: Arc<Stats>,
    ) -> Self {
        Outbound {
            client,
            lanes: Default::default(),
            limits,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            budget,
            slow: AtomicBool::new(false),
            progress: Progress::new(),
            closed: Arc::new(NodeClose::default()),
            stats,
            writers: TaskTracker::new(),
            link: OnceLock::new(),
            high_stream: Mutex::new(None),
        }
    }

    /// Starts delivery on `conn` once the HandshakeAck is on `high` (the
    /// high-priority stream, reused by the high lane). Writer tasks run in
    /// `span`. Frames queued before stay queued until now.
    pub fn start(&self, conn: ClientLink, high: Option<OutStream>, span: tracing::Span) {
        *self.high_stream.lock().unwrap_or_else(|e| e.into_inner()) = high;
        if let Some((code, reason)) = self.closed.get() {
            // Dropped as slow before it was even ready.
            conn.close(code, &reason);
        }
        if self.link.set(Link { conn, span }).is_err() {
            return;
        }
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

    /// The client's connection, once it is ready.
    pub fn connection(&self) -> Option<&ClientLink> {
        self.link.get().map(|link| &link.conn)
    }

    fn spawn_writer(&self, priority: Priority, rx: mpsc::Receiver<Bytes>) {
        let Some(link) = self.link.get() else { return };
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
                conn: link.conn.clone(),
                priority,
                queued_bytes: self.queued_bytes.clone(),
                budget: self.budget.clone(),
                progress: self.progress.clone(),
                closed: self.closed.clone(),
                coalesce: self.limits.coalesce,
                flush: self.lanes[priority.index()].flush().clone(),
            },
            stream,
            rx,
        );
        // A span is entered and left on every poll, that is for every
        // delivery (~4 % of a fan-out's CPU); the writer only logs at debug
        // level, so it gets its connection's span only when that is on.
        if tracing::enabled!(tracing::Level::DEBUG) {
            self.writers.spawn(writer.instrument(link.span.clone()));
        } else {
            self.writers.spawn(writer);
        }
    }

    /// The writer tasks; they end once the queues are closed (the last
    /// handle dropped) and drained.
    pub fn writers(&self) -> TaskTracker {
        self.writers.clone()
    }

    fn sender(&self, priority: Priority) -> &mpsc::Sender<Bytes> {
        let lane = &self.lanes[priority.index()];
        lane.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.limits.frames);
            // Checked under the lane lock, which `start` also takes after
            // setting the link: the receiver is spawned here or found there.
            let mut pending = lane.pending.lock().unwrap_or_else(|e| e.into_inner());
            if self.link.get().is_some() {
                drop(pending);
                self.spawn_writer(priority, rx);
            } else {
                *pending = Some(rx);
            }
            tx
        })
    }

    /// Queues an encoded frame without waiting. A full queue disconnects
    /// the client as a slow consumer; an exhausted node-wide budget refuses
    /// the frame with [`EnqueueError::NodeBusy`], except for `reply`:
    /// replies to the client's own requests are small and bounded by its
    /// own budget, so a request always gets its answer. `tag` is the
    /// frame's wire tag ([`protocol::Body::tag`]), for the statistics.
    pub fn enqueue(
        &self,
        priority: Priority,
        tag: usize,
        frame: Bytes,
        reply: bool,
    ) -> Result<(), EnqueueError> {
        if self.slow.load(Ordering::Relaxed) {
            return Err(EnqueueError::SlowConsumer);
        }
        let len = frame.len();
        // The client's own budget first: a client that stopped reading is
        // a slow consumer even when the node-wide budget is no larger.
        let before = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        // An empty queue always takes one frame, whatever its size.
        if before > 0 && before + len > self.limits.bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.disconnect_slow("outbound byte budget exhausted");
            return Err(EnqueueError::SlowConsumer);
        }
        if reply {
            self.budget.force(len);
        } else if !self.budget.take(len) {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            stats::add(&self.stats.node_busy, 1);
            return Err(EnqueueError::NodeBusy);
        }
        let sender = self.sender(priority);
        let waiting = sender.max_capacity() - sender.capacity();
        let coalescing = !self.limits.coalesce.is_zero();
        // One clock read serves both stamps (this is every delivery's path).
        let now = (before == 0 || (coalescing && waiting == 0)).then(mono_us);
        if let (0, Some(now)) = (before, now) {
            // Stall time counts from when the queue stopped being empty.
            self.progress.any.store(now, Ordering::Release);
        }
        match sender.try_send(frame) {
            Ok(()) => {
                if let (0, true, Some(now)) = (waiting, coalescing, now) {
                    // Only the coalescer reads a lane's lateness.
                    self.progress.lanes[priority.index()].store(now, Ordering::Release);
                }
                // What must not wait for a held write (see `Coalescer`):
                // anything but a broadcast or channel publication, and a backlog that would fill
                // the queue or the byte budget before the window ends.
                if coalescing
                    && (!matches!(tag, protocol::tag::BROADCAST | protocol::tag::PUBLISH)
                        || waiting + 1 >= WRITE_BATCH
                        || 2 * (before + len) >= self.limits.bytes)
                {
                    self.lanes[priority.index()].flush().notify_one();
                }
                self.stats.frame_out(tag, len);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                release(&self.queued_bytes, &self.budget, len);
                self.disconnect_slow("outbound queue full");
                Err(EnqueueError::SlowConsumer)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                release(&self.queued_bytes, &self.budget, len);
                Err(EnqueueError::Closed)
            }
        }
    }

    /// Whether a frame of `len` bytes at `priority` fits in half of what
    /// the client may have queued (frames and bytes): what a sender that
    /// can wait (a replay) waits for, so that live traffic keeps room.
    pub fn has_room(&self, priority: Priority, len: usize) -> bool {
        let sender = self.sender(priority);
        let queued = sender.max_capacity() - sender.capacity();
        2 * (queued + 1) <= sender.max_capacity()
            && (self.queued_bytes() == 0 || 2 * (self.queued_bytes() + len) <= self.limits.bytes)
    }

    /// Closes the connection with `close_code::SLOW_CONSUMER` (once).
    pub fn disconnect_slow(&self, why: &str) {
        if !self.slow.swap(true, Ordering::AcqRel) {
            stats::add(&self.stats.slow_consumer_disconnects, 1);
            tracing::warn!(client_id = %self.client, why, "disconnecting slow consumer");
            self.closed.close(
                self.connection(),
                close_code::SLOW_CONSUMER,
                format!("slow consumer: {why}"),
            );
        }
    }

    /// How the node closed this client's connection itself (slow consumer,
    /// a client that stopped a node stream), if it did.
    pub fn closed_by_node(&self) -> Option<(u32, String)> {
        self.closed.get()
    }

    /// Whether the client was disconnected as a slow consumer.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// Bytes queued for this client, not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Whether the queue holds bytes that no write has taken for `stall`:
    /// the client stopped reading.
    pub fn stalled(&self, now_us: u64, stall: Duration) -> bool {
        self.queued_bytes() > 0
            && now_us.saturating_sub(self.progress.any.load(Ordering::Acquire))
                >= stall.as_micros() as u64
    }
}

impl Drop for Outbound {
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

/// What a writer task needs of its client.
struct Writer {
    conn: ClientLink,
    priority: Priority,
    queued_bytes: Arc<AtomicUsize>,
    budget: Arc<QueueBudget>,
    progress: Arc<Progress>,
    closed: Arc<NodeClose>,
    coalesce: Duration,
    flush: Arc<tokio::sync::Notify>,
}

/// Drains one priority's queue onto its own stream, opened on first use.
async fn write_stream(w: Writer, mut stream: Option<OutStream>, mut rx: mpsc::Receiver<Bytes>) {
    let Writer {
        conn,
        priority,
        queued_bytes,
        budget,
        ..
    } = &w;
    let mut batch: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    let mut hold = Coalescer::new(if *priority == Priority::High {
        Duration::ZERO
    } else {
        w.coalesce
    });
    while rx.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        // How long the queue held bytes before this writer ran.
        let lag_us =
            mono_us().saturating_sub(w.progress.lanes[priority.index()].load(Ordering::Acquire));
        if let Some(due) = hold.due()
            && tokio::time::Instant::now() < due
        {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = w.flush.notified() => {}
            }
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(frame) => batch.push(frame),
                    Err(_) => break,
                }
            }
        }
        let len: usize = batch.iter().map(Bytes::len).sum();
        let send = match &mut stream {
            Some(s) => s,
            None => match conn.open_uni().await {
                Ok(s) => {
                    s.set_priority(protocol::stream_priority(*priority));
                    stream.insert(s)
                }
                Err(err) => {
                    tracing::debug!(%err, %priority, "cannot open stream");
                    release(queued_bytes, budget, len);
                    return discard(rx, queued_bytes, budget);
                }
            },
        };
        let result = write_all(send, &mut batch, &w.progress.any).await;
        hold.wrote(batch.len(), lag_us, !rx.is_empty());
        batch.clear();
        release(queued_bytes, budget, len);
        match result {
            Ok(()) => {}
            Err(WriteError::Stopped(code)) => {
                // The client may not stop the node's streams (PROTOCOL.md
                // section 2): everything later on this priority would be
                // lost while it looks connected.
                tracing::debug!(%code, %priority, "client stopped a node stream");
                w.closed.close(
                    Some(conn),
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
        send.finish_and_wait().await;
    }
}

/// A writer ran this late (µs) after its queue turned non-empty: the node
/// is behind. 1 ms: a prompt writer runs within tens of µs; at 2 ms, three
/// nodes sharing two cores with their clients never saw their writers
/// that late while the clients drowned (3-node fan-out sustained 50,000
/// deliveries/s against 253,500 at 1 ms).
const LATE_US: u64 = 1_000;

/// Lateness is remembered for this many windows: holding goes on while
/// windows keep gathering frames and a writer of this lane ran late at
/// least once in that span, so a busy client of a node that has caught up
/// stops being held within 10 windows (200 ms by default).
const LATE_MEMORY_WINDOWS: u32 = 50;

/// Holds a writer's next write back by up to `coalesce_window` while the
/// node is behind, so what arrives meanwhile goes out in one write and
/// fewer packets. It starts holding when this lane's writer ran late (the
/// node's CPU is saturated: every packet is costing latency already) and
/// goes on while each window gathers more than one frame, as long as
/// lateness was seen within the last [`LATE_MEMORY_WINDOWS`] windows. So a
/// busy client of an idle node is not held back, nor is the first message
/// after a quiet spell. A write that left frames queued (a full batch, or
/// frames that came during a slow write) is followed at once, so holding
/// never caps what a client receives.
#[derive(Debug)]
struct Coalescer {
    window: Duration,
    holding: bool,
    /// When a writer of this lane last ran late.
    late_at: Option<tokio::time::Instant>,
    /// When the last write ended, if it left the queue empty.
    drained_at: Option<tokio::time::Instant>,
}

impl Coalescer {
    fn new(window: Duration) -> Self {
        Coalescer {
            window,
            holding: false,
            late_at: None,
            drained_at: None,
        }
    }

    /// When the next write may go out, if it is held back.
    fn due(&self) -> Option<tokio::time::Instant> {
        match self.drained_at {
            Some(at) if self.holding => Some(at + self.window),
            _ => None,
        }
    }

    /// A write of `frames` frames ended; the writer had run `lag_us` after
    /// its queue turned non-empty; `more` frames are queued already.
    fn wrote(&mut self, frames: usize, lag_us: u64, more: bool) {
        let now = tokio::time::Instant::now();
        let late = lag_us >= LATE_US;
        if late {
            self.late_at = Some(now);
        }
        let recently_late = self
            .late_at
            .is_some_and(|at| now.duration_since(at) <= self.window * LATE_MEMORY_WINDOWS);
        self.holding =
            !self.window.is_zero() && (late || (self.holding && frames > 1 && recently_late));
        self.drained_at = (!more && frames < WRITE_BATCH).then_some(now);
    }
}

/// Writes the whole batch, stamping progress whenever some of it went out
/// (a client that reads slowly but steadily is never taken for stalled).
async fn write_all(
    send: &mut OutStream,
    mut bufs: &mut [Bytes],
    progress: &AtomicU64,
) -> Result<(), WriteError> {
    while !bufs.is_empty() {
        let chunks = send.write_chunks(bufs).await?;
        progress.store(mono_us(), Ordering::Release);
        bufs = &mut bufs[chunks..];
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(20);

    #[tokio::test(start_paused = true)]
    async fn a_writer_holds_back_only_after_running_late() {
        let mut hold = Coalescer::new(WINDOW);
        // Prompt writers (the node keeps up) never hold, whatever they
        // find queued.
        hold.wrote(1, 0, false);
        assert_eq!(hold.due(), None);
        hold.wrote(5, LATE_US - 1, false);
        assert_eq!(hold.due(), None);
        // A late writer holds its next write back for one window.
        hold.wrote(1, LATE_US, false);
        let wrote_at = tokio::time::Instant::now();
        assert_eq!(hold.due(), Some(wrote_at + WINDOW));
    }

    #[tokio::test(start_paused = true)]
    async fn holding_lasts_while_windows_gather_frames() {
        let mut hold = Coalescer::new(WINDOW);
        hold.wrote(1, LATE_US + 3, false);
        tokio::time::advance(WINDOW).await;
        // The window gathered several frames: still holding, even though
        // this writer was not late.
        hold.wrote(4, 0, false);
        assert_eq!(hold.due(), Some(tokio::time::Instant::now() + WINDOW));
        tokio::time::advance(WINDOW).await;
        // A window that gathered one frame: the client is not busy; the
        // next write goes out at once.
        hold.wrote(1, 0, false);
        assert_eq!(hold.due(), None);
    }

    /// A node-side connection and the client's end of it, over loopback.
    async fn connection_pair(dir: &std::path::Path) -> (quinn::Connection, quinn::Connection) {
        let config = crate::config::NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            certs_dir: dir.to_owned(),
            ..Default::default()
        };
        let server = crate::server::endpoint(&config).unwrap();
        let addr = server.local_addr().unwrap();
        let crypto =
            crate::tls::client_crypto(&crate::tls::ServerTrust::CaFile(dir.join("ca.pem")), None)
                .unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let dial = client
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                addr,
                "localhost",
            )
            .unwrap();
        let accept = async { server.accept().await.unwrap().await.unwrap() };
        let (node_side, client_side) = tokio::join!(accept, dial);
        (node_side, client_side.unwrap())
    }

    /// Reads `n` one-byte frames from `stream`, with when each arrived.
    async fn read_frames(
        stream: &mut quinn::RecvStream,
        n: usize,
    ) -> Vec<(u8, std::time::Instant)> {
        let mut got = Vec::new();
        while got.len() < n {
            let chunk = tokio::time::timeout(Duration::from_secs(10), stream.read_chunk(64, true))
                .await
                .expect("frames within 10 s")
                .unwrap()
                .expect("stream open");
            let at = std::time::Instant::now();
            got.extend(chunk.bytes.iter().map(|&b| (b, at)));
        }
        got
    }

    #[tokio::test]
    async fn broadcasts_are_held_back_after_a_late_write_and_a_direct_releases_them() {
        let dir = tempfile::tempdir().unwrap();
        let (node_side, client_side) = connection_pair(dir.path()).await;
        let window = Duration::from_millis(400);
        let out = Outbound::new(
            ClientId::new_random(),
            QueueLimits {
                frames: 256,
                bytes: 1 << 20,
                coalesce: window,
            },
            QueueBudget::new(1 << 20),
            Arc::new(Stats::default()),
        );
        let broadcast = |b: u8| {
            out.enqueue(
                Priority::Normal,
                protocol::tag::BROADCAST,
                Bytes::from(vec![b]),
                false,
            )
        };
        // Queued before the client is ready, so its writer starts late.
        broadcast(1).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        out.start(ClientLink::Native(node_side), None, tracing::Span::none());
        let mut stream = client_side.accept_uni().await.unwrap();
        let first = read_frames(&mut stream, 1).await[0].1;
        // The next broadcasts wait out the window after the late write.
        broadcast(2).unwrap();
        broadcast(3).unwrap();
        let got = read_frames(&mut stream, 2).await;
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [2, 3]);
        assert!(
            got[0].1 - first >= window - Duration::from_millis(50),
            "the next broadcast came {:?} after the late one",
            got[0].1 - first
        );
        // That window gathered two frames, so the writer holds on; a direct
        // queued meanwhile goes out at once and takes the held broadcast
        // with it.
        broadcast(4).unwrap();
        let queued = std::time::Instant::now();
        out.enqueue(
            Priority::Normal,
            protocol::tag::DIRECT,
            Bytes::from(vec![5]),
            false,
        )
        .unwrap();
        let got = read_frames(&mut stream, 2).await;
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            [4, 5],
            "in order"
        );
        assert!(
            got[1].1 - queued < window / 2,
            "the direct came {:?} after it was queued",
            got[1].1 - queued
        );
        // Still holding (that window gathered two). A backlog of a whole
        // write batch is not held: more broadcasts than one write takes go
        // out at once, not one window per batch of WRITE_BATCH (nor after
        // the window: the queue must not fill up while the writer waits).
        let queued = std::time::Instant::now();
        for b in 0..200u8 {
            broadcast(b).unwrap();
        }
        let got = read_frames(&mut stream, 200).await;
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            (0..200).collect::<Vec<u8>>()
        );
        assert!(
            got[199].1 - queued < window / 2,
            "200 broadcasts queued during a hold took {:?}",
            got[199].1 - queued
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_followed_at_once() {
        let mut hold = Coalescer::new(WINDOW);
        hold.wrote(1, LATE_US, false);
        assert!(hold.due().is_some());
        // More may be queued than one write takes: no waiting for it.
        hold.wrote(WRITE_BATCH, 0, false);
        assert_eq!(hold.due(), None);
        // Still holding: once the rest is written, the next write waits.
        hold.wrote(3, 0, false);
        assert_eq!(hold.due(), Some(tokio::time::Instant::now() + WINDOW));
    }

    #[tokio::test(start_paused = true)]
    async fn holding_ends_once_lateness_is_old_even_while_frames_keep_coming() {
        let mut hold = Coalescer::new(WINDOW);
        hold.wrote(1, LATE_US, false);
        for _ in 0..LATE_MEMORY_WINDOWS {
            tokio::time::advance(WINDOW).await;
            hold.wrote(3, 0, false);
            assert!(hold.due().is_some(), "late within the memory: holding");
        }
        // A node that caught up: its busy client is no longer held.
        tokio::time::advance(WINDOW).await;
        hold.wrote(3, 0, false);
        assert_eq!(hold.due(), None);
        hold.wrote(3, 0, false);
        assert_eq!(hold.due(), None, "and it does not start again by itself");
    }

    #[tokio::test(start_paused = true)]
    async fn frames_left_queued_by_a_write_go_out_at_once() {
        let mut hold = Coalescer::new(WINDOW);
        hold.wrote(1, LATE_US, false);
        // More frames came during a slow write: no window for them.
        hold.wrote(2, 0, true);
        assert_eq!(hold.due(), None);
        hold.wrote(2, 0, false);
        assert_eq!(hold.due(), Some(tokio::time::Instant::now() + WINDOW));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_window_never_holds() {
        let mut hold = Coalescer::new(Duration::ZERO);
        hold.wrote(64, 1_000, false);
        assert_eq!(hold.due(), None);
    }
}
