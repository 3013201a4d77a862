//! The Redis bus: nodes sharing one Redis for presence, liveness and
//! cross-node delivery. The key and channel layout is documented in
//! CLUSTER.md; this module is its implementation.
//!
//! Connections: one multiplexed command connection (a `ConnectionManager`)
//! and one subscription connection. Every write goes through one ordered
//! queue drained by a writer task that pipelines whatever has accumulated,
//! so concurrent publishes cost one round trip per batch and this node's
//! publishes and presence changes reach Redis in the order they happened.
//! The subscriber runs its own reconnect loop; a heartbeat every
//! `heartbeat_interval` refreshes liveness and, after any outage or data
//! loss, re-registers every local client, so recovery needs no restart.
//!
//! Answers never claim more than Redis showed: a broadcast that reached
//! fewer subscribers than there are live nodes, a direct whose target node
//! is alive but not subscribed, and a lookup that misses while presence is
//! being rebuilt are errors (CLUSTER_UNAVAILABLE for the sender), not
//! successes or "unknown client". `Membership` is what the node knows to
//! tell these apart.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use serde::{Deserialize, Serialize};

use super::confirm::{Answer, Arrival, Incoming, Outgoing};
use super::master::{Commands, Master, Moved, RedisTarget, key_slot};
use super::{
    BusError, BusMessage, Claim, ClusterBus, ClusterEvent, ClusterEventSender, Feed, HistoryEntry,
    HistoryPage, HistoryRange, Landed, LocalPresence, PublishDone, Retention, SessionEnd,
    SessionLimits, StoreDone, Storing, Target, sort_and_cut,
};
use crate::protocol::codec::{decode_value, encode_value};
use crate::protocol::{ClientId, ClientInfo, NodeId, Position, now_ms};
use crate::stats::Stats;

/// Most queued operations sent in one pipeline.
const MAX_BATCH: usize = 512;

/// Settings of a Redis bus.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// The server, or the sentinels that name it.
    pub target: RedisTarget,
    /// CA certificate (PEM bytes) for `rediss://`; public web roots when unset.
    pub ca_pem: Option<Vec<u8>>,
    /// Key and channel prefix.
    pub prefix: String,
    /// This node.
    pub node_id: NodeId,
    /// This node's name (stored in its liveness key).
    pub node_name: String,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Response timeout.
    pub response_timeout: Duration,
    /// Liveness TTL.
    pub node_ttl: Duration,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Operation queue length.
    pub queue_len: usize,
    /// How long a broadcast waits for every live node's confirmation
    /// before the sender is told it may not have reached them.
    pub confirm_timeout: Duration,
    /// How long a channel's position outlives its last publication or read.
    pub history_meta_ttl: Duration,
    /// How long a detached session waits for a resume (for sessions a
    /// connection of this node detaches, or a dead node left attached).
    pub session_window: Duration,
}

/// Key and channel names (see CLUSTER.md). On one Redis (or Sentinel)
/// they are plain; on a Redis Cluster every name carries a hash tag, so
/// that what one script or transaction touches lives in one slot
/// (CLUSTER.md, "Redis Cluster"): `{n:N}` a node's keys and channel,
/// `{c:X}` a fabric channel's, `{r:B}` a routing bucket's (the client
/// routing index, split in [`ROUTE_BUCKETS`], with the sessions and
/// inboxes of its clients), `{g}` the few cluster-wide ones.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    cluster: bool,
}

/// Buckets of the routing index on a Redis Cluster: enough to spread it
/// over every shard, few enough to scan them all on a sweep.
pub const ROUTE_BUCKETS: u8 = 64;

impl Keys {
    /// Names under `prefix`, plain.
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            cluster: false,
        }
    }

    /// Names under `prefix`, hash-tagged for a Redis Cluster (the prefix
    /// itself must hold no `{` or `}`).
    pub fn tagged(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            cluster: true,
        }
    }

    /// Whether the names are hash-tagged (a Redis Cluster).
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The command that publishes: `SPUBLISH` (sharded pub/sub) on a Redis
    /// Cluster, `PUBLISH` elsewhere.
    pub fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// `P:{n:N}` on a cluster, `P:node:N` elsewhere.
    fn of_node(&self, node: NodeId) -> String {
        if self.cluster {
            format!("{}:{{n:{node}}}", self.prefix)
        } else {
            format!("{}:node:{node}", self.prefix)
        }
    }

    /// `P:{c:X}` on a cluster (`%` and `}` escaped in X so the tag closes
    /// where it should), `P:PLAIN:X` elsewhere.
    fn of_channel(&self, plain: &str, channel: &str) -> String {
        if self.cluster {
            let escaped = channel.replace('%', "%25").replace('}', "%7D");
            format!("{}:{{c:{escaped}}}", self.prefix)
        } else {
            format!("{}:{plain}:{channel}", self.prefix)
        }
    }

    /// The routing bucket of `client` (cluster only).
    fn bucket(client: ClientId) -> u8 {
        // The uuid's first byte: its first two hex digits in the text form.
        client.0.as_bytes()[0] % ROUTE_BUCKETS
    }

    /// `P:{r:B}` of `client`'s bucket.
    fn of_bucket(&self, bucket: u8) -> String {
        format!("{}:{{r:{bucket:02x}}}", self.prefix)
    }

    /// SET of every node id that registered (live or not yet swept).
    pub fn nodes(&self) -> String {
        if self.cluster {
            format!("{}:{{g}}:nodes", self.prefix)
        } else {
            format!("{}:nodes", self.prefix)
        }
    }
    /// STRING liveness key of a node, with TTL.
    pub fn node(&self, node: NodeId) -> String {
        if self.cluster {
            format!("{}:alive", self.of_node(node))
        } else {
            self.of_node(node)
        }
    }
    /// HASH client id → ClientInfo of a node's clients, with TTL.
    pub fn node_clients(&self, node: NodeId) -> String {
        format!("{}:clients", self.of_node(node))
    }
    /// HASH client id → node id: the routing index entry of `client` is
    /// in this hash (one for every client on one Redis, its bucket's on a
    /// cluster).
    pub fn client_nodes(&self, client: ClientId) -> String {
        if self.cluster {
            format!("{}:route", self.of_bucket(Self::bucket(client)))
        } else {
            format!("{}:client-nodes", self.prefix)
        }
    }
    /// Every hash of the routing index.
    pub fn route_indexes(&self) -> Vec<String> {
        if self.cluster {
            (0..ROUTE_BUCKETS)
                .map(|b| format!("{}:route", self.of_bucket(b)))
                .collect()
        } else {
            vec![format!("{}:client-nodes", self.prefix)]
        }
    }
    /// Channel every node subscribes to for broadcasts.
    pub fn broadcast_channel(&self) -> String {
        if self.cluster {
            format!("{}:{{g}}:broadcast", self.prefix)
        } else {
            format!("{}:ch:broadcast", self.prefix)
        }
    }
    /// A node's own channel (direct messages and receipts).
    pub fn node_channel(&self, node: NodeId) -> String {
        if self.cluster {
            format!("{}:ch", self.of_node(node))
        } else {
            format!("{}:ch:node:{node}", self.prefix)
        }
    }
    /// Pub/sub channel of a fabric channel's publications: only nodes with
    /// subscribers of it subscribe.
    pub fn channel(&self, channel: &str) -> String {
        if self.cluster {
            format!("{}:ch", self.of_channel("", channel))
        } else {
            self.of_channel("ch:chan", channel)
        }
    }
    /// Pub/sub channel of a fabric channel's Join and Leave events: only
    /// nodes with subscribers of it that want events subscribe.
    pub fn channel_events(&self, channel: &str) -> String {
        if self.cluster {
            format!("{}:ev", self.of_channel("", channel))
        } else {
            self.of_channel("ch:chan-events", channel)
        }
    }
    /// The pub/sub channel of `feed` of fabric channel `channel`.
    pub fn feed(&self, channel: &str, feed: Feed) -> String {
        match feed {
            Feed::Publications => self.channel(channel),
            Feed::Events => self.channel_events(channel),
        }
    }
    /// HASH client id → ClientInfo of a channel's members on a node, with
    /// TTL (channel presence).
    pub fn channel_members(&self, channel: &str, node: NodeId) -> String {
        if self.cluster {
            format!("{}:members:{node}", self.of_channel("", channel))
        } else {
            format!("{}:node:{node}", self.of_channel("chan", channel))
        }
    }
    /// HASH channel → number of subscribers on a node, with TTL.
    pub fn node_channels(&self, node: NodeId) -> String {
        format!("{}:channels", self.of_node(node))
    }
    /// HASH client id → node id of a user's connections.
    pub fn user(&self, user: &str) -> String {
        format!("{}:user:{user}", self.prefix)
    }
    /// HASH client id → user of a node's clients that have a user: which
    /// `user` entries are the node's, to remove when it is gone.
    pub fn node_users(&self, node: NodeId) -> String {
        format!("{}:users", self.of_node(node))
    }
    /// STREAM of a fabric channel's history: entry id `OFFSET-0`, field `m`
    /// the bytes published (a [`Wire::Positioned`]).
    pub fn history(&self, channel: &str) -> String {
        if self.cluster {
            format!("{}:hist", self.of_channel("", channel))
        } else {
            self.of_channel("hist", channel)
        }
    }
    /// HASH of a fabric channel's position: `e` its epoch (8 bytes, u64
    /// LE), `s` its latest offset, `r` the replication id of the server
    /// that last wrote it.
    pub fn history_meta(&self, channel: &str) -> String {
        if self.cluster {
            format!("{}:meta", self.of_channel("", channel))
        } else {
            self.of_channel("hist-meta", channel)
        }
    }
    /// STRING an idempotency key's state (`p:NODE/ATTEMPT` pending, `a` acked, `s:UNTIL` stored,
    /// `e:CODE:MESSAGE` refused), for `dedupe_window`.
    pub fn once(&self, key: &str) -> String {
        format!("{}:once:{key}", self.prefix)
    }
    /// HASH of a resumable session: `u` user ('' anonymous), `g`
    /// generation, `n` the node it is attached to ('' waiting for a
    /// resume), `b` bytes stored.
    pub fn session(&self, client: ClientId) -> String {
        if self.cluster {
            format!("{}:session:{client}", self.of_bucket(Self::bucket(client)))
        } else {
            format!("{}:session:{client}", self.prefix)
        }
    }
    /// LIST of the direct messages stored for a session.
    pub fn inbox(&self, client: ClientId) -> String {
        if self.cluster {
            format!("{}:inbox:{client}", self.of_bucket(Self::bucket(client)))
        } else {
            format!("{}:inbox:{client}", self.prefix)
        }
    }
    /// What a node's liveness key starts with (the scripts add the id);
    /// empty on a cluster, where another node's key is in another slot and
    /// `inbox_push.lua` leaves the liveness check to its caller.
    fn node_prefix(&self) -> String {
        if self.cluster {
            String::new()
        } else {
            format!("{}:node:", self.prefix)
        }
    }
    /// STRING random marker created once per Redis dataset: when it
    /// changes, Redis lost its data (a restart without persistence).
    pub fn incarnation(&self) -> String {
        if self.cluster {
            format!("{}:{{g}}:incarnation", self.prefix)
        } else {
            format!("{}:incarnation", self.prefix)
        }
    }
}

/// What this node knows about the other nodes: enough to tell a client
/// that is not connected from one whose node has not re-registered yet,
/// and to know how many nodes a broadcast must reach.
#[derive(Debug, Default)]
struct Membership {
    /// Other nodes seen alive (liveness key present), and when.
    seen: HashMap<NodeId, Instant>,
    /// Other nodes alive at the last heartbeat.
    live: HashSet<NodeId>,
    /// Redis's incarnation marker as last read.
    incarnation: Option<String>,
    /// Until when presence counts as being rebuilt after Redis lost its data.
    settling_until: Option<Instant>,
}

impl Membership {
    fn settling(&self, now: Instant) -> bool {
        self.settling_until.is_some_and(|until| now < until)
    }

    /// Counts presence as incomplete for up to `ttl`, as after data loss:
    /// after a failover, every liveness key may have expired during the
    /// gap (nobody could refresh them) while the nodes are alive and about
    /// to re-register. The nodes known before the gap count as seen now,
    /// or the gap itself would have aged them out.
    fn unsettle(&mut self, now: Instant, ttl: Duration) {
        self.settling_until = Some(now + ttl);
        let known: Vec<NodeId> = self.seen.keys().chain(&self.live).copied().collect();
        for node in known {
            self.seen.insert(node, now);
        }
    }

    /// Records the incarnation marker read from Redis (`None`: missing);
    /// true when it changed or vanished since the last read, i.e. Redis
    /// lost its data. Presence then counts as incomplete for up to `ttl`
    /// (a live node re-registers within a heartbeat; one that does not
    /// within its TTL is dead).
    fn note_incarnation(&mut self, value: Option<&str>, now: Instant, ttl: Duration) -> bool {
        let changed = match (&self.incarnation, value) {
            (Some(known), Some(value)) => known != value,
            (Some(_), None) => true,
            (None, _) => false,
        };
        self.incarnation = value.map(str::to_owned);
        if changed {
            self.settling_until = Some(now + ttl);
        }
        changed
    }

    /// Other nodes seen alive within `ttl`: the ones a broadcast must reach.
    fn recent(&self, now: Instant, ttl: Duration) -> Vec<NodeId> {
        self.seen
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) < ttl)
            .map(|(node, _)| *node)
            .collect()
    }

    fn saw(&mut self, node: NodeId, now: Instant) {
        self.seen.insert(node, now);
        self.live.insert(node);
    }

    /// Takes in a heartbeat's view: `live` nodes have their liveness key,
    /// `dead` ones are registered without it (expired: they died), and a
    /// node in neither left the cluster (it removed itself) - unless Redis
    /// just lost its data, when absence proves nothing.
    fn observe(
        &mut self,
        me: NodeId,
        live: &[NodeId],
        dead: &[NodeId],
        now: Instant,
        ttl: Duration,
    ) -> Vec<NodeId> {
        let before: Vec<NodeId> = self.seen.keys().copied().collect();
        self.live = live.iter().copied().filter(|n| *n != me).collect();
        for node in &self.live {
            self.seen.insert(*node, now);
        }
        if !self.settling(now) {
            for node in dead {
                self.seen.remove(node);
            }
            let live = &self.live;
            self.seen.retain(|node, _| live.contains(node));
        }
        self.seen
            .retain(|_, at| now.saturating_duration_since(*at) < ttl);
        // Presence is whole again once every recently seen node re-registered.
        if self.settling(now) && self.seen.keys().all(|n| self.live.contains(n)) {
            self.settling_until = None;
            info!("every node re-registered its clients; presence is complete again");
        }
        before
            .into_iter()
            .filter(|n| !self.seen.contains_key(n))
            .collect()
    }
}

/// What crosses Redis, encoded like bus messages (CLUSTER.md): a bus
/// message, or the Redis engine's own bookkeeping of broadcasts (see
/// `confirm`).
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// Tag 0: a message for the node(s) subscribed to the channel.
    Message(BusMessage),
    /// Tag 1: a broadcast, numbered within its origin's epoch.
    Broadcast {
        /// The origin's epoch (random per process).
        epoch: u64,
        /// Its number: 1, 2, … within the epoch.
        seq: u64,
        /// The broadcast itself.
        message: BusMessage,
    },
    /// Tag 2: node `from` got every broadcast of `epoch` up to `upto`.
    Confirm {
        /// The confirming node.
        from: NodeId,
        /// The origin's epoch.
        epoch: u64,
        /// Up to which number.
        upto: u64,
    },
    /// Tag 3: node `from` never got broadcasts `first..=last` of `epoch`.
    Missed {
        /// The node that missed them.
        from: NodeId,
        /// The origin's epoch.
        epoch: u64,
        /// The first missed number.
        first: u64,
        /// The last missed number.
        last: u64,
    },
    /// Tag 4: several messages for the node subscribed to the channel, in
    /// the order they were published (consecutive directs and receipts for
    /// one node travel in one PUBLISH; see `merge_messages`).
    Messages(Vec<BusMessage>),
    /// Tag 5: a channel publication and its place in the channel's
    /// history. The node encodes it with a zero position and leaves the
    /// last 16 bytes out; `publish_history.lua` appends the real one, and
    /// stores the same bytes in the history stream.
    Positioned {
        /// The publication ([`BusMessage::Publication`]).
        message: BusMessage,
        /// Its place in the channel's history.
        position: Position,
    },
}

/// Bytes of an encoded [`Position`] (two u64, little-endian), the tail of
/// an encoded [`Wire::Positioned`].
const POSITION_BYTES: usize = 16;

/// A Lua script of `scripts/`: its source, loaded with SCRIPT LOAD at the
/// head of a writer pipeline that runs it (EVALSHA in a pipeline is not
/// reloaded on NOSCRIPT), and its redis-rs handle, which reloads it when
/// invoked on its own.
struct Lua {
    source: &'static str,
    script: std::sync::OnceLock<redis::Script>,
}

impl Lua {
    const fn new(source: &'static str) -> Lua {
        Lua {
            source,
            script: std::sync::OnceLock::new(),
        }
    }

    fn script(&self) -> &redis::Script {
        self.script.get_or_init(|| redis::Script::new(self.source))
    }

    /// Its SHA1, for EVALSHA.
    fn hash(&self) -> &str {
        self.script().get_hash()
    }
}

/// Appends a publication to its channel's history and publishes it.
static PUBLISH_HISTORY: Lua = Lua::new(PUBLISH_HISTORY_SOURCE);
/// Reads a channel's position and latest publications.
static HISTORY_READ: Lua = Lua::new(concat!(
    include_str!("scripts/epoch.lua"),
    include_str!("scripts/history_read.lua")
));

/// The source of the script that appends a publication to its channel's
/// history and publishes it (also run by `fabric-bench` as its floor).
pub const PUBLISH_HISTORY_SOURCE: &str = concat!(
    include_str!("scripts/epoch.lua"),
    include_str!("scripts/publish_history.lua")
);
/// The session scripts (CLUSTER.md "Sessions").
static SESSION_LEAVE: Lua = Lua::new(include_str!("scripts/session_leave.lua"));
static INBOX_PUSH: Lua = Lua::new(include_str!("scripts/inbox_push.lua"));
static SESSION_CLAIM: Lua = Lua::new(include_str!("scripts/session_claim.lua"));
static SESSION_ORPHAN: Lua = Lua::new(include_str!("scripts/session_orphan.lua"));

/// A fresh epoch as the scripts take it: 8 bytes, u64 little-endian.
fn epoch_arg() -> [u8; 8] {
    super::new_epoch().to_le_bytes()
}

/// The wire tag of [`Wire::Message`] and [`Wire::Messages`] (bincode
/// legacy: a u32, little-endian).
const WIRE_MESSAGE: [u8; 4] = 0u32.to_le_bytes();
const WIRE_MESSAGES: [u8; 4] = 4u32.to_le_bytes();

/// Whether `payload` is an encoded [`Wire::Message`].
fn is_message(payload: &[u8]) -> bool {
    payload.starts_with(&WIRE_MESSAGE)
}

/// A publish's target, number and callbacks, one entry per PUBLISH in a
/// pipeline (a merged PUBLISH has several callbacks).
type Published = (Target, Option<u64>, Vec<PublishDone>);

/// What one command of a writer pipeline is for: its reply is read
/// accordingly, and a failed command fails only what it was for.
enum Slot {
    /// A presence or bookkeeping write.
    Write,
    /// Loading the scripts the pipeline runs.
    Load,
    /// A PUBLISH (or script), for the next entry of `published`.
    Publish,
    /// A store into a session's inbox, for the next entry of `stores`.
    Store,
}

/// A writer pipeline being built: the commands, and what each is for.
struct Batch {
    pipe: redis::Pipeline,
    slots: Vec<Slot>,
    published: Vec<Published>,
    stores: Vec<StoreDone>,
}

impl Batch {
    fn new() -> Self {
        let mut pipe = redis::pipe();
        // Every reply comes back, errors included, so that one refused
        // command (a script error, out of memory) fails only its own op.
        pipe.ignore_errors();
        Batch {
            pipe,
            slots: Vec::new(),
            published: Vec::new(),
            stores: Vec::new(),
        }
    }

    /// The pipeline, to add the script that stores for `done`.
    fn store(&mut self, done: StoreDone) -> &mut redis::Pipeline {
        self.slots.push(Slot::Store);
        self.stores.push(done);
        &mut self.pipe
    }

    /// Loads `lua` first, unless this pipeline loads it already.
    fn load(&mut self, lua: &'static Lua, loaded: &mut Vec<&'static str>) {
        if !loaded.contains(&lua.source) {
            loaded.push(lua.source);
            self.slots.push(Slot::Load);
            self.pipe.cmd("SCRIPT").arg("LOAD").arg(lua.source);
        }
    }

    /// The pipeline, to add a presence or bookkeeping write to.
    fn write(&mut self) -> &mut redis::Pipeline {
        self.slots.push(Slot::Write);
        &mut self.pipe
    }

    /// The pipeline, to add the one command that publishes for `dones`.
    fn publish(
        &mut self,
        target: Target,
        seq: Option<u64>,
        dones: Vec<PublishDone>,
    ) -> &mut redis::Pipeline {
        self.slots.push(Slot::Publish);
        self.published.push((target, seq, dones));
        &mut self.pipe
    }
}

/// Consecutive encoded messages for one node's channel, to be published
/// together.
struct MessageRun {
    node: NodeId,
    channel: String,
    payloads: Vec<Vec<u8>>,
    bytes: usize,
    dones: Vec<PublishDone>,
}

impl MessageRun {
    fn new(node: NodeId, channel: String, payload: Vec<u8>, done: Option<PublishDone>) -> Self {
        MessageRun {
            node,
            channel,
            bytes: payload.len(),
            payloads: vec![payload],
            dones: done.into_iter().collect(),
        }
    }

    /// Whether `payload` for `node` on `channel` may join this run.
    fn takes(&self, node: NodeId, channel: &str, payload: &[u8]) -> bool {
        self.node == node
            && self.channel == channel
            && is_message(payload)
            && self.bytes + payload.len() <= MAX_MERGED_BYTES
    }

    fn push(&mut self, payload: Vec<u8>, done: Option<PublishDone>) {
        self.bytes += payload.len();
        self.payloads.push(payload);
        self.dones.extend(done);
    }

    /// Adds the run's PUBLISH (`command`) to `batch`.
    fn publish(self, batch: &mut Batch, command: &str) {
        let mut payloads = self.payloads;
        let payload = if payloads.len() == 1 {
            payloads.swap_remove(0)
        } else {
            merge_messages(&payloads)
        };
        batch
            .publish(Target::Node(self.node), None, self.dones)
            .cmd(command)
            .arg(self.channel)
            .arg(payload);
    }
}

/// Largest PUBLISH that merging messages makes: large messages travel
/// alone, and no single Redis message grows without bound.
const MAX_MERGED_BYTES: usize = 256 * 1024;

/// Turns encoded [`Wire::Message`]s into one encoded [`Wire::Messages`]
/// without decoding them: a `Vec` is a u64 length and its elements, so the
/// result is the tag, the count and each message's bytes after its tag.
fn merge_messages(payloads: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = payloads.iter().map(|p| p.len() - WIRE_MESSAGE.len()).sum();
    let mut merged = Vec::with_capacity(WIRE_MESSAGES.len() + 8 + len);
    merged.extend_from_slice(&WIRE_MESSAGES);
    merged.extend_from_slice(&(payloads.len() as u64).to_le_bytes());
    for payload in payloads {
        merged.extend_from_slice(&payload[WIRE_MESSAGE.len()..]);
    }
    merged
}

/// What the writer task does, in order (the bus's write queue).
enum Op {
    Publish {
        target: Target,
        /// A broadcast's number, when it must be confirmed.
        seq: Option<u64>,
        channel: String,
        payload: Vec<u8>,
        done: Option<PublishDone>,
    },
    /// A publication of a channel that keeps history: appended to the
    /// history and published by `publish_history.lua`.
    Append {
        /// The fabric channel.
        channel: String,
        retention: Retention,
        /// The encoded [`Wire::Positioned`] without its position.
        payload: Vec<u8>,
        done: Option<PublishDone>,
    },
    Join(ClientInfo, Option<oneshot::Sender<()>>),
    Leave(ClientId, Option<String>, SessionEnd),
    /// A new session attached to this node (`session_opened`).
    SessionOpen {
        client: ClientId,
        user: Option<String>,
        limits: SessionLimits,
    },
    /// A refreshed session's record lives on (`REFRESH_LUA`).
    SessionRefresh {
        client: ClientId,
        generation: u64,
        limits: SessionLimits,
    },
    /// A direct message for a session's inbox (`inbox_push.lua`).
    Store {
        to: ClientId,
        payload: Vec<u8>,
        limits: SessionLimits,
        done: StoreDone,
    },
    ChannelJoin(String, ClientInfo, Option<oneshot::Sender<()>>),
    ChannelLeave(String, ClientId),
    ChannelCount(String, usize),
    /// Send the confirmations this node owes (see `confirm`).
    Confirms,
    Heartbeat,
    Shutdown(oneshot::Sender<()>),
}

struct Inner {
    config: RedisBusConfig,
    keys: Keys,
    master: Arc<Master>,
    conn: Commands,
    ops: mpsc::Sender<Op>,
    ops_rx: Mutex<Option<mpsc::Receiver<Op>>>,
    events: ClusterEventSender,
    presence: Arc<dyn LocalPresence>,
    commands_ok: AtomicBool,
    subscribed: AtomicBool,
    needs_resync: AtomicBool,
    /// When a write last reached Redis (`since` milliseconds).
    last_write_ok: AtomicU64,
    since: Instant,
    members: Mutex<Membership>,
    /// This node's broadcasts awaiting confirmation.
    outgoing: Mutex<Outgoing>,
    /// Other nodes' broadcasts received, and the confirmations owed.
    incoming: Mutex<Incoming>,
    /// An `Op::Confirms` is queued.
    confirms_queued: AtomicBool,
    /// Pub/sub channels of fabric channel feeds this node wants.
    wanted: Mutex<HashSet<String>>,
    /// Those the current subscription connection subscribes to.
    have: Mutex<HashSet<String>>,
    /// Those whose last SUBSCRIBE or UNSUBSCRIBE Redis did not confirm:
    /// `have` may be wrong about them.
    doubtful: Mutex<HashSet<String>>,
    /// The current subscription connection's command half.
    sink: Mutex<Option<Sink>>,
    /// Where this node is in each channel with history it receives (by
    /// fabric channel): what it delivered, to detect and fill gaps.
    follows: Mutex<HashMap<String, Follow>>,
    /// Taken by whatever changes the channel subscriptions, one at a time.
    channel_turn: tokio::sync::Mutex<()>,
    cancel: CancellationToken,
    stats: Arc<Stats>,
}

/// A node's connection to the Redis bus.
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

/// Runs `pipe` on the command connection, and once more if the
/// connection had dropped: after Redis restarts, the first command on a
/// connection manager fails while it reconnects, and the retry goes out on
/// the new connection. Only for reads and commands that are safe to repeat.
async fn query_once_more<T: redis::FromRedisValue>(
    pipe: &redis::Pipeline,
    conn: &mut Commands,
) -> redis::RedisResult<T> {
    match pipe.query_async(conn).await {
        Err(err) if err.is_io_error() || err.is_connection_dropped() => {
            debug!(%err, "Redis command connection dropped; trying once more");
            pipe.query_async(conn).await
        }
        other => other,
    }
}

fn unavailable(err: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(err.to_string())
}

/// A random epoch for this process's broadcasts.
fn rand_u64() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// Gives publishes their answers (outside any lock).
fn answer(answers: Vec<Answer>) {
    for (done, result) in answers {
        done(result);
    }
}

impl Inner {
    fn members(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn outgoing(&self) -> std::sync::MutexGuard<'_, Outgoing> {
        self.outgoing.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn incoming(&self) -> std::sync::MutexGuard<'_, Incoming> {
        self.incoming.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Broadcast `seq` reached every live node's subscription (`nodes`
    /// other than this one): wait for their confirmations.
    fn expect_confirmations(
        &self,
        seq: Option<u64>,
        done: PublishDone,
        reached: usize,
        nodes: Vec<NodeId>,
    ) {
        let Some(seq) = seq else {
            return done(Ok(reached));
        };
        let now = Instant::now();
        let answered = self.outgoing().expect(seq, done, nodes, now);
        if let Some((done, result)) = answered {
            done(result);
        }
    }

    /// Queues the confirmations this node owes, once.
    fn owe_confirmations(&self) {
        if !self.confirms_queued.swap(true, Ordering::AcqRel)
            && self.ops.try_send(Op::Confirms).is_err()
        {
            // Full: the next arrival asks again.
            self.confirms_queued.store(false, Ordering::Release);
        }
    }

    /// The publishes for the confirmations owed now.
    fn confirmations(&self) -> Vec<Op> {
        self.confirms_queued.store(false, Ordering::Release);
        let me = self.config.node_id;
        let due = self.incoming().take_due();
        due.into_iter()
            .filter_map(|(origin, epoch, upto)| {
                let wire = Wire::Confirm {
                    from: me,
                    epoch,
                    upto,
                };
                let payload = encode_value(&wire).ok()?;
                Some(Op::Publish {
                    target: Target::Node(origin),
                    seq: None,
                    channel: self.keys.node_channel(origin),
                    payload,
                    done: None,
                })
            })
            .collect()
    }

    /// Nodes no longer seen: nothing more is awaited from them.
    fn forget_nodes(&self, gone: &[NodeId]) {
        for node in gone {
            self.incoming().forget(*node);
            let answers = self.outgoing().forget(*node);
            answer(answers);
        }
    }

    /// How far behind its heartbeat a node may be before the others stop
    /// trusting that its registered presence is complete: one missed beat
    /// and a reply's worth of slack.
    fn lag(&self) -> Duration {
        self.config.heartbeat_interval * 2 + self.config.response_timeout
    }

    fn wrote(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        self.last_write_ok.store(now.max(1), Ordering::Release);
    }

    /// Time since a write last reached Redis (`None`: never).
    fn since_last_write(&self) -> Option<Duration> {
        match self.last_write_ok.load(Ordering::Acquire) {
            0 => None,
            at => Some(
                self.since
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at)),
            ),
        }
    }

    /// Takes in an incarnation marker read from Redis (see [`Membership`]).
    fn note_incarnation(&self, value: Option<&str>) {
        let lost = self
            .members()
            .note_incarnation(value, Instant::now(), self.config.node_ttl);
        if lost {
            warn!(
                "Redis lost its data (restarted without persistence?); \
                 re-registering, and treating presence as incomplete until every node has"
            );
            self.needs_resync.store(true, Ordering::Release);
        }
    }

    /// Why a client that was not found may still be connected somewhere,
    /// if presence is incomplete: Redis lost its data and nodes are still
    /// re-registering, or a recently seen node is behind on its heartbeat
    /// (it may be cut off from Redis with clients it could not register).
    async fn presence_gap(&self, conn: &mut Commands) -> Result<Option<String>, BusError> {
        let now = Instant::now();
        let recent = {
            let members = self.members();
            if members.settling(now) {
                return Ok(Some(
                    "Redis lost its data or failed over, and nodes are re-registering".into(),
                ));
            }
            members.recent(now, self.config.node_ttl)
        };
        if recent.is_empty() {
            return Ok(None);
        }
        let mut pipe = redis::pipe();
        for node in &recent {
            pipe.cmd("PTTL").arg(self.keys.node(*node));
        }
        let ttls: Vec<i64> = pipe.query_async(conn).await.map_err(unavailable)?;
        // A heartbeat refreshes the TTL every interval.
        let fresh_ms = self.config.node_ttl.saturating_sub(self.lag()).as_millis() as i64;
        Ok(recent
            .iter()
            .zip(ttls)
            .find(|(_, ttl)| (0..fresh_ms).contains(ttl))
            .map(|(node, _)| format!("node {node} is behind on its heartbeat")))
    }
}

impl RedisBus {
    /// Prepares the bus without connecting (a node starts even while Redis
    /// is down); [`RedisBus::start`] begins connecting.
    pub fn new(
        config: RedisBusConfig,
        presence: Arc<dyn LocalPresence>,
        events: ClusterEventSender,
        stats: Arc<Stats>,
    ) -> Result<Self, BusError> {
        let master = Arc::new(
            Master::new(
                &config.target,
                config.ca_pem.as_deref(),
                config.connect_timeout,
                config.response_timeout,
            )
            .map_err(BusError::Unavailable)?,
        );
        let keys = if master.is_cluster() {
            if config.prefix.contains(['{', '}']) {
                return Err(BusError::Unavailable(format!(
                    "the Redis prefix {:?} must not contain braces on a Redis Cluster (they are hash tags)",
                    config.prefix
                )));
            }
            Keys::tagged(&config.prefix)
        } else {
            Keys::new(&config.prefix)
        };
        let conn = master.commands();
        let (ops, ops_rx) = mpsc::channel(config.queue_len);
        let outgoing = Outgoing::new(rand_u64(), config.queue_len);
        Ok(RedisBus {
            inner: Arc::new(Inner {
                keys,
                config,
                master,
                conn,
                ops,
                ops_rx: Mutex::new(Some(ops_rx)),
                events,
                presence,
                commands_ok: AtomicBool::new(false),
                subscribed: AtomicBool::new(false),
                needs_resync: AtomicBool::new(true),
                last_write_ok: AtomicU64::new(0),
                since: Instant::now(),
                members: Mutex::new(Membership::default()),
                outgoing: Mutex::new(outgoing),
                incoming: Mutex::new(Incoming::default()),
                confirms_queued: AtomicBool::new(false),
                wanted: Mutex::new(HashSet::new()),
                have: Mutex::new(HashSet::new()),
                doubtful: Mutex::new(HashSet::new()),
                sink: Mutex::new(None),
                follows: Mutex::new(HashMap::new()),
                channel_turn: tokio::sync::Mutex::new(()),
                cancel: CancellationToken::new(),
                stats,
            }),
        })
    }

    /// The key and channel names in use.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    fn enqueue(&self, op: Op) {
        if let Err(mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op)) =
            self.inner.ops.try_send(op)
        {
            self.refused(op);
        }
    }

    /// What becomes of an operation the full (or closed) queue refused.
    /// Queues a publication of a channel that keeps history, to be
    /// appended to it and published in one script.
    fn append(&self, retention: Retention, message: BusMessage, done: Option<PublishDone>) {
        let channel = match &message {
            BusMessage::Publication {
                channel,
                event: false,
                ..
            } => channel.clone(),
            other => {
                warn!(
                    ?other,
                    "only publications go to a channel's history; dropped"
                );
                return;
            }
        };
        let wire = Wire::Positioned {
            message,
            position: Position {
                epoch: 0,
                offset: 0,
            },
        };
        let mut payload = match encode_value(&wire) {
            Ok(payload) => payload,
            Err(err) => {
                if let Some(done) = done {
                    done(Err(BusError::Unavailable(err.to_string())));
                }
                return;
            }
        };
        payload.truncate(payload.len() - POSITION_BYTES);
        let queued = self.inner.ops.try_send(Op::Append {
            channel,
            retention,
            payload,
            done,
        });
        if let Err(mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op)) =
            queued
        {
            self.refused(op);
        }
    }

    fn refused(&self, op: Op) {
        match op {
            Op::Publish {
                done: Some(done), ..
            }
            | Op::Append {
                done: Some(done), ..
            } => done(Err(BusError::Backlog)),
            Op::Store { done, .. } => done(Err(BusError::Backlog)),
            Op::Join(..)
            | Op::Leave(..)
            | Op::SessionOpen { .. }
            | Op::SessionRefresh { .. }
            | Op::ChannelJoin(..)
            | Op::ChannelLeave(..)
            | Op::ChannelCount(..) => {
                // Presence will be rewritten in full once the queue drains.
                self.inner.needs_resync.store(true, Ordering::Release);
            }
            _ => {}
        }
    }
}

impl ClusterBus for RedisBus {
    /// Starts the writer, subscriber and heartbeat tasks.
    fn start(&self) {
        let Some(ops_rx) = self
            .inner
            .ops_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        info!(redis = %self.inner.master.describe(), prefix = %self.inner.config.prefix, "joining cluster through Redis");
        let inner = self.inner.clone();
        tokio::spawn(
            self.inner
                .master
                .clone()
                .follow(self.inner.cancel.clone(), move |moved| {
                    if moved == Moved::Switched {
                        // A promoted replica may lack the old master's last
                        // writes, and every liveness key may have expired in
                        // the gap: presence is rewritten whole, and counts as
                        // incomplete until every node known before has a
                        // liveness key again (or for node_ttl at most).
                        inner
                            .members()
                            .unsettle(Instant::now(), inner.config.node_ttl);
                        inner.needs_resync.store(true, Ordering::Release);
                    }
                    let _ = inner.ops.try_send(Op::Heartbeat);
                }),
        );
        tokio::spawn(writer(self.inner.clone(), ops_rx));
        tokio::spawn(subscriber(self.inner.clone()));
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let period = (inner.config.confirm_timeout / 4)
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => expire_confirmations(&inner).await,
                    _ = inner.cancel.cancelled() => return,
                }
            }
        });
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(inner.config.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = inner.ops.try_send(Op::Heartbeat); }
                    _ = inner.cancel.cancelled() => return,
                }
            }
        });
    }

    fn available(&self) -> bool {
        self.inner.commands_ok.load(Ordering::Acquire)
            && self.inner.subscribed.load(Ordering::Acquire)
    }

    fn writable(&self) -> bool {
        self.inner.commands_ok.load(Ordering::Acquire)
    }

    fn clustered(&self) -> bool {
        true
    }

    async fn client_joined(&self, info: &ClientInfo) {
        // The client must not learn its id before other nodes can find it,
        // or else tell "not found" from "not registered yet". So the write
        // is awaited (retried while it fails), and so is this node being a
        // listening member (alive and subscribed: else its id would lead
        // others to a node that cannot receive). The wait ends early when
        // this node has been cut off from Redis for longer than the lag
        // others tolerate on its heartbeat: from then on they treat its
        // presence as incomplete (CLUSTER_UNAVAILABLE, see `presence_gap`),
        // and its resync after the outage registers the client. It never
        // lasts longer than that lag either.
        let inner = &self.inner;
        // One more beat of margin over what the others tolerate.
        let stale = inner.lag() + inner.config.heartbeat_interval;
        let give_up = tokio::time::Instant::now() + stale;
        loop {
            let (tx, rx) = oneshot::channel();
            self.enqueue(Op::Join(info.clone(), Some(tx)));
            let landed = matches!(
                tokio::time::timeout(inner.config.response_timeout * 2, rx).await,
                Ok(Ok(()))
            );
            let member = inner.subscribed.load(Ordering::Acquire)
                && !inner.needs_resync.load(Ordering::Acquire);
            if landed && member {
                return;
            }
            if inner
                .since_last_write()
                .is_none_or(|cut_off| cut_off >= stale)
                || tokio::time::Instant::now() >= give_up
            {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = inner.cancel.cancelled() => return,
            }
        }
    }

    fn client_left(&self, info: &ClientInfo, session: SessionEnd) {
        self.enqueue(Op::Leave(info.client_id, info.user.clone(), session));
    }

    fn session_opened(&self, client: ClientId, user: Option<&str>, limits: SessionLimits) {
        self.enqueue(Op::SessionOpen {
            client,
            user: user.map(str::to_owned),
            limits,
        });
    }

    async fn session_claim(
        &self,
        client: ClientId,
        user: Option<&str>,
        generation: u64,
        limits: SessionLimits,
    ) -> Result<Claim, BusError> {
        let inner = &self.inner;
        let keys = &inner.keys;
        let mut conn = inner.conn.clone();
        let reply: redis::Value = SESSION_CLAIM
            .script()
            .key(keys.session(client))
            .key(keys.inbox(client))
            .key(keys.client_nodes(client))
            .arg(client.to_string())
            .arg(generation)
            .arg(user.unwrap_or_default())
            .arg(inner.config.node_id.to_string())
            .arg(limits.lifetime.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        parse_claim(reply).map_err(BusError::Unavailable)
    }

    fn session_refreshed(&self, client: ClientId, generation: u64, limits: SessionLimits) {
        self.enqueue(Op::SessionRefresh {
            client,
            generation,
            limits,
        });
    }

    fn store_direct(&self, message: BusMessage, limits: SessionLimits, done: StoreDone) {
        let BusMessage::Direct { to, .. } = &message else {
            return done(Ok(Storing::Gone));
        };
        let to = *to;
        match encode_value(&message) {
            Ok(payload) => self.enqueue(Op::Store {
                to,
                payload,
                limits,
                done,
            }),
            Err(err) => done(Err(BusError::Unavailable(err.to_string()))),
        }
    }

    async fn locate(&self, id: ClientId) -> Result<Option<NodeId>, BusError> {
        let inner = &self.inner;
        let mut conn = inner.conn.clone();
        let mut lookup = redis::pipe();
        lookup
            .cmd("HGET")
            .arg(inner.keys.client_nodes(id))
            .arg(id.to_string())
            .cmd("GET")
            .arg(inner.keys.incarnation());
        let (node, incarnation): (Option<String>, Option<String>) =
            query_once_more(&lookup, &mut conn)
                .await
                .map_err(unavailable)?;
        inner.note_incarnation(incarnation.as_deref());
        if node.as_deref() == Some(DETACHED) {
            // A session waiting for a resume: not connected, and its
            // record (not presence) says what becomes of a message for it.
            return Ok(None);
        }
        let Some(node) = node.and_then(|n| n.parse::<NodeId>().ok()) else {
            // Not registered: a definite "not connected" only while
            // presence is complete.
            return match inner.presence_gap(&mut conn).await? {
                Some(why) => Err(BusError::Rebuilding(why)),
                None => Ok(None),
            };
        };
        if inner.members().live.contains(&node) {
            return Ok(Some(node));
        }
        // Not alive at the last heartbeat: it may have joined since, be
        // dead, or be re-registering. Ask its liveness key.
        let alive: bool = redis::cmd("EXISTS")
            .arg(inner.keys.node(node))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let now = Instant::now();
        let mut members = inner.members();
        if alive {
            members.saw(node, now);
            Ok(Some(node))
        } else if members.settling(now) && members.seen.contains_key(&node) {
            Err(BusError::Rebuilding(format!(
                "node {node} is re-registering after Redis lost its data or failed over"
            )))
        } else {
            Ok(None)
        }
    }

    async fn list_clients(&self, limit: usize) -> Result<(Vec<ClientInfo>, bool), BusError> {
        let nodes = self.live_nodes().await?;
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.cmd("HVALS").arg(self.inner.keys.node_clients(*node));
        }
        let mut conn = self.inner.conn.clone();
        let values: Vec<Vec<Vec<u8>>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let clients = values
            .iter()
            .flatten()
            .filter_map(|bytes| match decode_value::<ClientInfo>(bytes) {
                Ok(info) => Some(info),
                Err(err) => {
                    warn!(%err, "undecodable presence entry in Redis; skipped");
                    None
                }
            })
            .collect();
        Ok(sort_and_cut(clients, limit))
    }

    async fn live_nodes(&self) -> Result<Vec<NodeId>, BusError> {
        let mut conn = self.inner.conn.clone();
        let (live, _dead) = query_live_nodes(&self.inner.keys, &mut conn)
            .await
            .map_err(unavailable)?;
        Ok(live)
    }

    fn publish(&self, target: Target, message: BusMessage, done: Option<PublishDone>) {
        if let Target::History(retention) = target {
            return self.append(retention, message, done);
        }
        // A broadcast is numbered and queued under one lock, held until
        // it is queued: the write queue, and so Redis, must see broadcasts
        // in number order. Numbered first and queued after, two tasks
        // broadcasting at once could queue 408 before 407; a receiver would
        // take 407 as missed and then drop it as stale, while its
        // confirmation "up to 408" covered it.
        let mut in_order = None;
        let (channel, seq, wire) = match target {
            Target::AllNodes => {
                let mut outgoing = self.inner.outgoing();
                let (epoch, seq) = (outgoing.epoch(), outgoing.number());
                in_order = Some(outgoing);
                (
                    self.inner.keys.broadcast_channel(),
                    Some(seq),
                    Wire::Broadcast {
                        epoch,
                        seq,
                        message,
                    },
                )
            }
            Target::Node(node) => (
                self.inner.keys.node_channel(node),
                None,
                Wire::Message(message),
            ),
            Target::Channel => {
                let channel = match &message {
                    BusMessage::Publication { channel, event, .. } => {
                        self.inner.keys.feed(channel, Feed::of(*event))
                    }
                    other => {
                        warn!(?other, "only publications go to channels; dropped");
                        return;
                    }
                };
                (channel, None, Wire::Message(message))
            }
            Target::History(_) => unreachable!("appended above"),
        };
        let payload = match encode_value(&wire) {
            Ok(payload) => payload,
            Err(err) => {
                drop(in_order);
                if let Some(done) = done {
                    done(Err(BusError::Unavailable(err.to_string())));
                }
                return;
            }
        };
        let queued = self.inner.ops.try_send(Op::Publish {
            target,
            seq,
            channel,
            payload,
            done,
        });
        // Released before a refused publish's callback runs.
        drop(in_order);
        if let Err(mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op)) =
            queued
        {
            self.refused(op);
        }
    }

    async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.ops.send(Op::Shutdown(tx)).await.is_ok() {
            let wait = self.inner.config.response_timeout * 2 + Duration::from_millis(500);
            if tokio::time::timeout(wait, rx).await.is_err() {
                warn!(
                    "could not remove this node's presence from Redis; it expires with the node TTL"
                );
            }
        }
        self.inner.cancel.cancel();
    }

    fn want_channel(&self, channel: &str, feed: Feed, wanted: bool) {
        let name = self.inner.keys.feed(channel, feed);
        let mut set = lock(&self.inner.wanted);
        if wanted {
            set.insert(name);
        } else {
            set.remove(&name);
            drop(set);
            if feed == Feed::Publications {
                lock(&self.inner.follows).remove(channel);
            }
        }
    }

    async fn channel_sync(&self, channel: &str, feed: Feed) -> Result<(), BusError> {
        let inner = &self.inner;
        let name = inner.keys.feed(channel, feed);
        let _turn = inner.channel_turn.lock().await;
        let want = lock(&inner.wanted).contains(&name);
        let doubtful = lock(&inner.doubtful).contains(&name);
        if want == lock(&inner.have).contains(&name) && !doubtful {
            return Ok(());
        }
        let Some(mut sink) = lock(&inner.sink).clone() else {
            // Not subscribed to Redis at all: the reconnect subscribes to
            // every wanted channel.
            return if want {
                Err(BusError::Unavailable(
                    "not subscribed to Redis (reconnecting)".into(),
                ))
            } else {
                Ok(())
            };
        };
        // Until Redis confirms, whether it carried the command out is
        // unknown (a timeout, or this future dropped with its task): the
        // next sync then sends the command again, whatever `have` says
        // (both are idempotent in Redis).
        lock(&inner.doubtful).insert(name.clone());
        let change = async {
            if want {
                sink.subscribe(&name).await
            } else {
                sink.unsubscribe(&name).await
            }
        };
        match tokio::time::timeout(inner.config.response_timeout * 2, change).await {
            Ok(Ok(())) => {
                let mut have = lock(&inner.have);
                if want {
                    have.insert(name.clone());
                } else {
                    have.remove(&name);
                }
                lock(&inner.doubtful).remove(&name);
                Ok(())
            }
            Ok(Err(err)) => Err(unavailable(err)),
            Err(_) => Err(BusError::Unavailable(
                "Redis did not confirm the channel subscription in time".into(),
            )),
        }
    }

    fn channel_member_joined(&self, channel: &str, info: &ClientInfo) -> Landed {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Op::ChannelJoin(channel.to_owned(), info.clone(), Some(tx)));
        Some(rx)
    }

    fn channel_member_left(&self, channel: &str, id: ClientId) {
        self.enqueue(Op::ChannelLeave(channel.to_owned(), id));
    }

    fn channel_subscribers(&self, channel: &str, count: usize) {
        self.enqueue(Op::ChannelCount(channel.to_owned(), count));
    }

    async fn channel_members(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<(Vec<ClientInfo>, bool), BusError> {
        let nodes = self.live_nodes().await?;
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.cmd("HVALS")
                .arg(self.inner.keys.channel_members(channel, *node));
        }
        let mut conn = self.inner.conn.clone();
        let values: Vec<Vec<Vec<u8>>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let members = values
            .iter()
            .flatten()
            .filter_map(|bytes| decode_value::<ClientInfo>(bytes).ok())
            .collect();
        Ok(sort_and_cut(members, limit))
    }

    async fn channel_member_count(&self, channel: &str) -> Result<u64, BusError> {
        let nodes = self.live_nodes().await?;
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.cmd("HLEN")
                .arg(self.inner.keys.channel_members(channel, *node));
        }
        let mut conn = self.inner.conn.clone();
        let counts: Vec<u64> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(counts.iter().sum())
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, BusError> {
        let nodes = self.live_nodes().await?;
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.cmd("HGETALL")
                .arg(self.inner.keys.node_channels(*node));
        }
        let mut conn = self.inner.conn.clone();
        let per_node: Vec<HashMap<String, u64>> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut counts: HashMap<String, u64> = HashMap::new();
        for (channel, count) in per_node.into_iter().flatten() {
            *counts.entry(channel).or_default() += count;
        }
        let mut channels: Vec<_> = counts.into_iter().collect();
        channels.sort();
        Ok(channels)
    }

    async fn history(
        &self,
        channel: &str,
        range: HistoryRange,
        limit: usize,
    ) -> Result<HistoryPage, BusError> {
        // Nothing is older than offset 1: only the position.
        let none_older = matches!(range, HistoryRange::Before(Some(before)) if before <= 1);
        let (read, limit) = match range {
            _ if none_older => (Read::Before(None), 0),
            HistoryRange::Before(before) => (Read::Before(before), limit),
            HistoryRange::After(after) => (Read::After(after), limit),
        };
        let (position, entries, more) = read_history(&self.inner, channel, read, limit).await?;
        let more = more && !none_older;
        Ok(HistoryPage {
            position,
            entries: entries
                .into_iter()
                .filter_map(|(message, position)| match message {
                    BusMessage::Publication {
                        priority, frame, ..
                    } => Some(HistoryEntry {
                        offset: position.offset,
                        priority,
                        frame,
                    }),
                    _ => None,
                })
                .collect(),
            more,
        })
    }

    async fn once_claim(
        &self,
        key: &str,
        pending: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BusError> {
        let key = self.inner.keys.once(key);
        let mut conn = self.inner.conn.clone();
        let mut claim = redis::pipe();
        claim
            .cmd("SET")
            .arg(&key)
            .arg(pending)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .cmd("GET")
            .arg(&key);
        let (claimed, held): (Option<String>, Option<String>) = query_once_more(&claim, &mut conn)
            .await
            .map_err(unavailable)?;
        // `pending` is unique to this attempt: finding it means a first try
        // whose reply was lost claimed the key.
        Ok(match (claimed, held) {
            (Some(_), _) => None,
            (None, Some(held)) if held == pending => None,
            (None, held) => Some(held.unwrap_or_default()),
        })
    }

    fn once_settle(&self, key: &str, outcome: String) {
        let key = self.inner.keys.once(key);
        let mut conn = self.inner.conn.clone();
        tokio::spawn(async move {
            let settled: redis::RedisResult<()> = redis::cmd("SET")
                .arg(&key)
                .arg(outcome)
                .arg("XX")
                .arg("KEEPTTL")
                .query_async(&mut conn)
                .await;
            if let Err(err) = settled {
                // Its retries will be told the outcome is unknown.
                warn!(%err, "cannot record an idempotent message's outcome");
            }
        });
    }

    fn once_release(&self, key: &str, pending: &str) {
        static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            )
        });
        let key = self.inner.keys.once(key);
        let pending = pending.to_owned();
        let mut conn = self.inner.conn.clone();
        tokio::spawn(async move {
            let released: redis::RedisResult<i64> =
                RELEASE.key(key).arg(pending).invoke_async(&mut conn).await;
            if let Err(err) = released {
                warn!(%err, "cannot free an idempotency key; retries wait for its window");
            }
        });
    }

    async fn follow_history(&self, channel: &str) -> Result<(), BusError> {
        let inner = &self.inner;
        if !lock(&inner.wanted).contains(&inner.keys.channel(channel)) {
            return Ok(());
        }
        let (position, _, _) = read_history(inner, channel, Read::Before(None), 0).await?;
        // Publications up to `position` may still be on their way to this
        // node: they are delivered as they come, not taken for duplicates.
        lock(&inner.follows)
            .entry(channel.to_owned())
            .or_insert(Follow {
                epoch: position.epoch,
                last: position.offset,
                seeded: true,
            });
        Ok(())
    }

    async fn locate_user(&self, user: &str) -> Result<Vec<NodeId>, BusError> {
        let inner = &self.inner;
        let mut conn = inner.conn.clone();
        let key = inner.keys.user(user);
        let entries: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut nodes: Vec<NodeId> = entries.values().filter_map(|n| n.parse().ok()).collect();
        nodes.sort();
        nodes.dedup();
        let (live, _) = query_live_nodes(&inner.keys, &mut conn)
            .await
            .map_err(unavailable)?;
        let (alive, dead): (Vec<NodeId>, Vec<NodeId>) =
            nodes.into_iter().partition(|n| live.contains(n));
        let settling = inner.members().settling(Instant::now());
        if !dead.is_empty() && !settling {
            // Entries of nodes that died: nobody else removes them.
            let dead: HashSet<String> = dead.iter().map(ToString::to_string).collect();
            let stale: Vec<&String> = entries
                .iter()
                .filter(|(_, node)| dead.contains(*node))
                .map(|(client, _)| client)
                .collect();
            let _ = redis::cmd("HDEL")
                .arg(&key)
                .arg(stale)
                .query_async::<()>(&mut conn)
                .await;
        }
        if alive.is_empty() {
            // "Nowhere" only while presence is complete, as for a client.
            if let Some(why) = inner.presence_gap(&mut conn).await? {
                return Err(BusError::Rebuilding(why));
            }
        }
        Ok(alive)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the node set and tells live nodes (liveness key present) from dead ones.
async fn query_live_nodes(
    keys: &Keys,
    conn: &mut Commands,
) -> redis::RedisResult<(Vec<NodeId>, Vec<NodeId>)> {
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys.nodes())
        .query_async(conn)
        .await?;
    let nodes: Vec<NodeId> = members.iter().filter_map(|m| m.parse().ok()).collect();
    if nodes.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut pipe = redis::pipe();
    for node in &nodes {
        pipe.cmd("EXISTS").arg(keys.node(*node));
    }
    let exists: Vec<i64> = pipe.query_async(conn).await?;
    let (live, dead): (Vec<_>, Vec<_>) = nodes.into_iter().zip(exists).partition(|(_, e)| *e > 0);
    Ok((
        live.into_iter().map(|(n, _)| n).collect(),
        dead.into_iter().map(|(n, _)| n).collect(),
    ))
}

/// Drains the operation queue in order, pipelining consecutive writes.
async fn writer(inner: Arc<Inner>, mut ops: mpsc::Receiver<Op>) {
    let mut conn = inner.master.write_commands();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let n = tokio::select! {
            n = ops.recv_many(&mut batch, MAX_BATCH) => n,
            _ = inner.cancel.cancelled() => 0,
        };
        if n == 0 {
            return;
        }
        let mut writes = Vec::new();
        for op in batch.drain(..) {
            match op {
                Op::Heartbeat => {
                    flush(&inner, &mut conn, std::mem::take(&mut writes)).await;
                    heartbeat(&inner, &mut conn).await;
                }
                Op::Shutdown(done) => {
                    // Confirmations owed go out before this node leaves.
                    writes.extend(inner.confirmations());
                    flush(&inner, &mut conn, std::mem::take(&mut writes)).await;
                    remove_self(&inner, &mut conn).await;
                    let _ = done.send(());
                    return;
                }
                Op::Confirms => writes.extend(inner.confirmations()),
                write => writes.push(write),
            }
        }
        flush(&inner, &mut conn, writes).await;
    }
}

/// A publish whose receiver count needs a second look before its outcome
/// can be told (see [`verify`]).
enum Doubt {
    /// A broadcast (number `seq`) that reached `reached` subscribers, fewer
    /// than expected.
    Short {
        reached: usize,
        seq: Option<u64>,
        done: PublishDone,
    },
    /// A direct publish nobody received: is its node dead or just not listening?
    Unheard { node: NodeId, done: PublishDone },
}

/// Sends a batch of publishes and presence changes as one pipeline.
async fn flush(inner: &Arc<Inner>, conn: &mut Commands, ops: Vec<Op>) {
    if ops.is_empty() {
        return;
    }
    let keys = &inner.keys;
    let node = inner.config.node_id.to_string();
    let node_ttl_ms = inner.config.node_ttl.as_millis() as u64;
    let mut batch = Batch::new();
    // EVALSHA in a pipeline is not retried on NOSCRIPT (a Redis that
    // restarted, or flushed its scripts): loading each script the
    // pipeline runs first makes every EVALSHA after it find it, in order.
    let mut loaded = Vec::new();
    for op in &ops {
        match op {
            Op::Append { .. } => batch.load(&PUBLISH_HISTORY, &mut loaded),
            Op::Leave(_, _, SessionEnd::Detach { .. } | SessionEnd::End { .. }) => {
                batch.load(&SESSION_LEAVE, &mut loaded)
            }
            Op::Store { .. } => batch.load(&INBOX_PUSH, &mut loaded),
            _ => {}
        }
    }
    let mut registrations: Vec<oneshot::Sender<()>> = Vec::new();
    // Consecutive messages (directs, receipts, kicks) for one node, not
    // yet added to the pipeline: they go out as one PUBLISH.
    let mut run: Option<MessageRun> = None;
    for op in ops {
        if let Op::Publish {
            target: Target::Node(node),
            seq: None,
            channel,
            payload,
            done,
        } = op
        {
            match &mut run {
                Some(open) if open.takes(node, &channel, &payload) => open.push(payload, done),
                _ => {
                    if let Some(ended) = run.take() {
                        ended.publish(&mut batch, keys.publish_command());
                    }
                    let started = MessageRun::new(node, channel, payload, done);
                    if is_message(&started.payloads[0]) {
                        run = Some(started);
                    } else {
                        started.publish(&mut batch, keys.publish_command());
                    }
                }
            }
            continue;
        }
        if let Some(ended) = run.take() {
            ended.publish(&mut batch, keys.publish_command());
        }
        match op {
            Op::Publish {
                target,
                seq,
                channel,
                payload,
                done,
            } => {
                batch
                    .publish(target, seq, done.into_iter().collect())
                    .cmd(keys.publish_command())
                    .arg(channel)
                    .arg(payload);
            }
            Op::Append {
                channel,
                retention,
                payload,
                done,
            } => {
                batch
                    .publish(Target::History(retention), None, done.into_iter().collect())
                    .cmd("EVALSHA")
                    .arg(PUBLISH_HISTORY.hash())
                    .arg(2)
                    .arg(keys.history(&channel))
                    .arg(keys.history_meta(&channel))
                    .arg(payload)
                    .arg(retention.size)
                    .arg(retention.ttl.as_millis() as u64)
                    .arg(inner.config.history_meta_ttl.as_millis() as u64)
                    .arg(&epoch_arg()[..])
                    .arg(keys.channel(&channel))
                    .arg(keys.publish_command());
            }
            Op::Join(info, registered) => match encode_value(&info) {
                Ok(value) => {
                    let id = info.client_id.to_string();
                    batch
                        .write()
                        .cmd("HSET")
                        .arg(keys.node_clients(inner.config.node_id))
                        .arg(&id)
                        .arg(value);
                    batch
                        .write()
                        .cmd("HSET")
                        .arg(keys.client_nodes(info.client_id))
                        .arg(&id)
                        .arg(&node);
                    if let Some(user) = &info.user {
                        batch
                            .write()
                            .cmd("HSET")
                            .arg(keys.user(user))
                            .arg(&id)
                            .arg(&node);
                        batch
                            .write()
                            .cmd("HSET")
                            .arg(keys.node_users(inner.config.node_id))
                            .arg(&id)
                            .arg(user);
                    }
                    registrations.extend(registered);
                }
                Err(err) => warn!(%err, "cannot encode presence"),
            },
            Op::Leave(client, user, session) => {
                let id = client.to_string();
                batch
                    .write()
                    .cmd("HDEL")
                    .arg(keys.node_clients(inner.config.node_id))
                    .arg(&id);
                let (mode, generation) = match session {
                    SessionEnd::None => ("", 0),
                    SessionEnd::Detach { generation } => ("detach", generation),
                    SessionEnd::End { generation } => ("end", generation),
                };
                if mode.is_empty() {
                    batch
                        .write()
                        .cmd("HDEL")
                        .arg(keys.client_nodes(client))
                        .arg(&id);
                } else {
                    // A session's client id may be attached elsewhere by
                    // now: the script detaches or ends it only if it is
                    // still this connection's.
                    batch
                        .write()
                        .cmd("EVALSHA")
                        .arg(SESSION_LEAVE.hash())
                        .arg(3)
                        .arg(keys.session(client))
                        .arg(keys.inbox(client))
                        .arg(keys.client_nodes(client))
                        .arg(&id)
                        .arg(&node)
                        .arg(mode)
                        .arg(generation)
                        .arg(inner.config.session_window.as_millis() as u64);
                }
                if let Some(user) = user {
                    if mode.is_empty() {
                        batch.write().cmd("HDEL").arg(keys.user(&user)).arg(&id);
                    } else {
                        // Compared first: a resumed session's entry may be
                        // another node's now.
                        batch
                            .write()
                            .cmd("EVAL")
                            .arg(DELETE_IF_LUA)
                            .arg(1)
                            .arg(keys.user(&user))
                            .arg(&id)
                            .arg(&node);
                    }
                    batch
                        .write()
                        .cmd("HDEL")
                        .arg(keys.node_users(inner.config.node_id))
                        .arg(&id);
                }
            }
            Op::SessionOpen {
                client,
                user,
                limits,
            } => {
                let key = keys.session(client);
                batch
                    .write()
                    .cmd("HSET")
                    .arg(&key)
                    .arg("u")
                    .arg(user.unwrap_or_default())
                    .arg("g")
                    .arg(1)
                    .arg("n")
                    .arg(&node)
                    .arg("b")
                    .arg(0);
                batch
                    .write()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(limits.lifetime.as_millis() as u64);
            }
            Op::SessionRefresh {
                client,
                generation,
                limits,
            } => {
                batch
                    .write()
                    .cmd("EVAL")
                    .arg(REFRESH_LUA)
                    .arg(1)
                    .arg(keys.session(client))
                    .arg(generation)
                    .arg(&node)
                    .arg(limits.lifetime.as_millis() as u64);
            }
            Op::Store {
                to,
                payload,
                limits,
                done,
            } => {
                batch
                    .store(done)
                    .cmd("EVALSHA")
                    .arg(INBOX_PUSH.hash())
                    .arg(3)
                    .arg(keys.session(to))
                    .arg(keys.inbox(to))
                    .arg(keys.client_nodes(to))
                    .arg(payload)
                    .arg(limits.inbox_len)
                    .arg(limits.inbox_bytes)
                    .arg(keys.node_prefix())
                    .arg(limits.window.as_millis() as u64)
                    .arg(to.to_string());
            }
            Op::ChannelJoin(channel, info, registered) => match encode_value(&info) {
                Ok(value) => {
                    let key = keys.channel_members(&channel, inner.config.node_id);
                    batch
                        .write()
                        .cmd("HSET")
                        .arg(&key)
                        .arg(info.client_id.to_string())
                        .arg(value);
                    batch.write().cmd("PEXPIRE").arg(&key).arg(node_ttl_ms);
                    registrations.extend(registered);
                }
                Err(err) => warn!(%err, "cannot encode channel presence"),
            },
            Op::ChannelLeave(channel, id) => {
                batch
                    .write()
                    .cmd("HDEL")
                    .arg(keys.channel_members(&channel, inner.config.node_id))
                    .arg(id.to_string());
            }
            Op::ChannelCount(channel, count) => {
                let key = keys.node_channels(inner.config.node_id);
                if count == 0 {
                    batch.write().cmd("HDEL").arg(&key).arg(&channel);
                } else {
                    batch.write().cmd("HSET").arg(&key).arg(&channel).arg(count);
                    batch.write().cmd("PEXPIRE").arg(&key).arg(node_ttl_ms);
                }
            }
            Op::Heartbeat | Op::Shutdown(_) | Op::Confirms => {
                unreachable!("handled by the writer")
            }
        }
    }
    if let Some(ended) = run.take() {
        ended.publish(&mut batch, keys.publish_command());
    }
    let Batch {
        pipe,
        slots,
        published,
        stores,
    } = batch;
    let publishes = published.len() as u64;
    let started = std::time::Instant::now();
    let result = pipe.query_async::<Vec<redis::Value>>(conn).await;
    inner
        .stats
        .redis_command
        .observe(started.elapsed().as_secs_f64());
    let replies = match result {
        Ok(replies) => replies,
        Err(err) => {
            set_commands_ok(inner, false, &err.to_string());
            inner.needs_resync.store(true, Ordering::Release);
            let err = unavailable(&err);
            for done in published.into_iter().flat_map(|(_, _, done)| done) {
                done(Err(err.clone()));
            }
            for done in stores {
                done(Err(err.clone()));
            }
            return;
        }
    };
    inner.wrote();
    crate::stats::add(&inner.stats.pubsub_out, publishes);
    // Each publish's outcome: how many subscribers received it, or why
    // Redis refused it.
    let mut counts: Vec<Result<usize, BusError>> = Vec::with_capacity(published.len());
    let mut refused_write = None;
    let mut stores = stores.into_iter();
    for (slot, reply) in slots
        .iter()
        .zip(replies.into_iter().map(Some).chain(std::iter::repeat(None)))
    {
        match (slot, reply) {
            (Slot::Publish, reply) => counts.push(published_count(reply)),
            (Slot::Store, reply) => {
                if let Some(done) = stores.next() {
                    done(stored(reply));
                }
            }
            (Slot::Write, Some(redis::Value::ServerError(err))) => {
                refused_write = Some(format!("{err:?}"));
            }
            (Slot::Load, Some(redis::Value::ServerError(err))) => {
                warn!(error = ?err, "Redis refused to load a script");
            }
            (Slot::Write | Slot::Load, _) => {}
        }
    }
    if let Some(err) = refused_write {
        // Presence is rewritten whole by the next heartbeat.
        warn!(error = %err, "Redis refused a presence write; presence will be rewritten");
        inner.needs_resync.store(true, Ordering::Release);
    } else {
        for registered in registrations {
            let _ = registered.send(());
        }
    }
    // Every live node subscribes to the broadcast channel, this one
    // included: fewer receivers than that means someone was not listening.
    let others = inner
        .members()
        .recent(Instant::now(), inner.config.node_ttl);
    let expected = 1 + others.len();
    let mut doubts = Vec::new();
    for ((target, seq, done), count) in published.into_iter().zip(counts) {
        let reached = match count {
            Ok(reached) => reached,
            Err(err) => {
                for done in done {
                    done(Err(err.clone()));
                }
                continue;
            }
        };
        for done in done {
            match target {
                Target::AllNodes if reached < expected => {
                    doubts.push(Doubt::Short { reached, seq, done })
                }
                Target::AllNodes => inner.expect_confirmations(seq, done, reached, others.clone()),
                Target::Node(node) if reached == 0 => doubts.push(Doubt::Unheard { node, done }),
                Target::Node(_) | Target::Channel | Target::History(_) => done(Ok(reached)),
            }
        }
    }
    if !doubts.is_empty() {
        // Off the writer, so later writes do not wait for the check.
        tokio::spawn(verify(inner.clone(), doubts));
    }
}

/// Which entries of a channel's history to read.
#[derive(Debug, Clone, Copy)]
enum Read {
    /// The latest, older than this offset if given.
    Before(Option<u64>),
    /// The oldest after this offset.
    After(u64),
}

/// A channel's history as `history_read.lua` has it now: its position, up
/// to `limit` publications (oldest first) with theirs, and whether there
/// are more beyond them (older for [`Read::Before`], newer for
/// [`Read::After`]).
type HistoryRead = (Position, Vec<(BusMessage, Position)>, bool);

async fn read_history(
    inner: &Inner,
    channel: &str,
    read: Read,
    limit: usize,
) -> Result<HistoryRead, BusError> {
    let keys = &inner.keys;
    let (mode, bound) = match read {
        Read::Before(None) => ("before", "+".to_owned()),
        Read::Before(Some(offset)) => ("before", format!("({offset}-0")),
        Read::After(offset) => ("after", format!("({offset}-0")),
    };
    let mut conn = inner.conn.clone();
    let reply: redis::Value = HISTORY_READ
        .script()
        .key(keys.history(channel))
        .key(keys.history_meta(channel))
        .arg(limit.saturating_add(1))
        .arg(bound)
        .arg(inner.config.history_meta_ttl.as_millis() as u64)
        .arg(&epoch_arg()[..])
        .arg(mode)
        .invoke_async(&mut conn)
        .await
        .map_err(unavailable)?;
    parse_history(reply, limit, matches!(read, Read::Before(_))).map_err(BusError::Unavailable)
}

/// Reads `history_read.lua`'s reply: the epoch, the latest offset and up
/// to `limit` + 1 entries, newest first when `newest_first` (one more than
/// asked tells whether there are more).
fn parse_history(
    reply: redis::Value,
    limit: usize,
    newest_first: bool,
) -> Result<HistoryRead, String> {
    use redis::Value;
    let Value::Array(items) = reply else {
        return Err(format!("unexpected history reply: {reply:?}"));
    };
    let [
        Value::BulkString(epoch),
        Value::Int(top),
        Value::Array(entries),
    ] = items.as_slice()
    else {
        return Err(format!("unexpected history reply: {items:?}"));
    };
    let epoch: [u8; 8] = epoch
        .as_slice()
        .try_into()
        .map_err(|_| format!("a channel epoch is 8 bytes, got {}", epoch.len()))?;
    let position = Position {
        epoch: u64::from_le_bytes(epoch),
        offset: u64::try_from(*top).unwrap_or(0),
    };
    let more = entries.len() > limit;
    let mut page = Vec::with_capacity(entries.len().min(limit));
    for entry in entries.iter().take(limit) {
        match history_entry(entry, position.epoch) {
            Ok(entry) => page.push(entry),
            // One undecodable entry (written by a different version) is
            // left out rather than failing the whole read.
            Err(why) => warn!(why, "skipping a history entry"),
        }
    }
    if newest_first {
        page.reverse();
    }
    Ok((position, page, more))
}

/// One stream entry (`[id, [m, bytes]]`): the publication and its
/// position, which must match its id and the channel's `epoch`.
fn history_entry(entry: &redis::Value, epoch: u64) -> Result<(BusMessage, Position), String> {
    use redis::Value;
    let Value::Array(parts) = entry else {
        return Err(format!("not a stream entry: {entry:?}"));
    };
    let [Value::BulkString(id), Value::Array(fields)] = parts.as_slice() else {
        return Err(format!("not a stream entry: {parts:?}"));
    };
    let id = String::from_utf8_lossy(id);
    let offset: u64 = id
        .strip_suffix("-0")
        .and_then(|o| o.parse().ok())
        .ok_or_else(|| format!("entry id {id:?} is not OFFSET-0"))?;
    let [_, Value::BulkString(bytes)] = fields.as_slice() else {
        return Err(format!("entry {id} has no message"));
    };
    match decode_value::<Wire>(bytes) {
        Ok(Wire::Positioned {
            message: message @ BusMessage::Publication { .. },
            position,
        }) if position.offset == offset && position.epoch == epoch => Ok((message, position)),
        Ok(_) => Err(format!(
            "entry {id} does not hold the publication at its position"
        )),
        Err(err) => Err(format!("entry {id}: {err}")),
    }
}

/// The number of subscribers a PUBLISH (an integer reply) or
/// `publish_history.lua` (`{position, count}`) reached, or why Redis
/// refused it.
/// Extends a session record's life if it is at generation ARGV[1] and
/// attached to node ARGV[2] (KEYS[1] the record, ARGV[3] the TTL in ms).
const REFRESH_LUA: &str = "local s = redis.call('HMGET', KEYS[1], 'g', 'n') \
     if s[1] == ARGV[1] and s[2] == ARGV[2] then \
     return redis.call('PEXPIRE', KEYS[1], ARGV[3]) end return 0";

/// The routing-index value of a session waiting for a resume.
const DETACHED: &str = "~";

/// Deletes a hash field if it holds the given value (KEYS[1] the hash,
/// ARGV[1] the field, ARGV[2] the value).
const DELETE_IF_LUA: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
     return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0";

/// What `inbox_push.lua` answered.
fn stored(reply: Option<redis::Value>) -> Result<Storing, BusError> {
    use redis::Value;
    let bad = |what: &dyn std::fmt::Debug| {
        Err(BusError::Unavailable(format!(
            "unexpected reply from the inbox script: {what:?}"
        )))
    };
    let items = match reply {
        Some(Value::Array(items)) => items,
        Some(Value::ServerError(err)) => {
            return Err(BusError::Unavailable(format!(
                "Redis refused to store the message: {err:?}"
            )));
        }
        other => return bad(&other),
    };
    match items.as_slice() {
        [Value::Int(0)] => Ok(Storing::Gone),
        [Value::Int(1), Value::Int(left)] => Ok(Storing::Stored {
            until_ms: crate::protocol::now_ms() + u64::try_from(*left).unwrap_or(0),
        }),
        [Value::Int(2)] => Ok(Storing::Full),
        [Value::Int(3), node] => match redis::from_redis_value::<String>(node.clone())
            .ok()
            .and_then(|n| n.parse::<NodeId>().ok())
        {
            Some(node) => Ok(Storing::Attached(node)),
            None => bad(&items),
        },
        _ => bad(&items),
    }
}

/// What `session_claim.lua` answered.
fn parse_claim(reply: redis::Value) -> Result<Claim, String> {
    use redis::Value;
    let Value::Array(items) = reply else {
        return Err(format!("unexpected reply from the claim script: {reply:?}"));
    };
    match items.as_slice() {
        [Value::Int(0)] => Ok(Claim::Gone),
        [Value::Int(1)] => Ok(Claim::Used),
        [Value::Int(2)] => Ok(Claim::WrongUser),
        [
            Value::Int(3),
            Value::Int(generation),
            previous,
            Value::Array(stored),
        ] => {
            let previous = redis::from_redis_value::<String>(previous.clone())
                .ok()
                .and_then(|n| n.parse::<NodeId>().ok());
            let mut messages = Vec::with_capacity(stored.len());
            for entry in stored {
                let bytes: Vec<u8> = redis::from_redis_value(entry.clone())
                    .map_err(|e| format!("stored message: {e}"))?;
                match decode_value::<BusMessage>(&bytes) {
                    Ok(message) => messages.push(message),
                    Err(err) => warn!(%err, "undecodable stored message skipped"),
                }
            }
            Ok(Claim::Resumed {
                generation: u64::try_from(*generation).unwrap_or(0),
                stored: messages,
                previous,
            })
        }
        other => Err(format!("unexpected reply from the claim script: {other:?}")),
    }
}

fn published_count(reply: Option<redis::Value>) -> Result<usize, BusError> {
    use redis::Value;
    match reply {
        Some(Value::Int(n)) => Ok(usize::try_from(n).unwrap_or(0)),
        Some(Value::Array(items)) => match items.as_slice() {
            [_, Value::Int(n)] => Ok(usize::try_from(*n).unwrap_or(0)),
            other => Err(BusError::Unavailable(format!(
                "unexpected reply from the history script: {other:?}"
            ))),
        },
        Some(Value::ServerError(err)) => Err(BusError::Unavailable(format!(
            "Redis refused the publish: {err:?}"
        ))),
        Some(other) => Err(BusError::Unavailable(format!(
            "unexpected reply to a publish: {other:?}"
        ))),
        None => Err(BusError::Unavailable("no reply to a publish".into())),
    }
}

/// Settles publishes whose receiver count fell short, against the liveness
/// keys as they are now: a broadcast is complete when it reached every
/// node that is alive (a node that left or died since the last heartbeat
/// does not count), and a direct nobody received goes to a node that is
/// gone, or to one that is alive but not listening. While Redis is being
/// repopulated after losing its data, nodes seen before the loss count as
/// alive until they re-register or their TTL passes.
async fn verify(inner: Arc<Inner>, doubts: Vec<Doubt>) {
    let now = Instant::now();
    let mut nodes = inner.members().recent(now, inner.config.node_ttl);
    for doubt in &doubts {
        if let Doubt::Unheard { node, .. } = doubt
            && !nodes.contains(node)
        {
            nodes.push(*node);
        }
    }
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(inner.keys.incarnation());
    for node in &nodes {
        pipe.cmd("EXISTS").arg(inner.keys.node(*node));
    }
    let mut conn = inner.conn.clone();
    let result = pipe
        .query_async::<Vec<redis::Value>>(&mut conn)
        .await
        .map(incarnation_and_counts);
    let exists = match result {
        Ok((incarnation, exists)) => {
            inner.note_incarnation(incarnation.as_deref());
            exists
        }
        Err(err) => {
            let err = unavailable(&err);
            for doubt in doubts {
                let (Doubt::Short { done, .. } | Doubt::Unheard { done, .. }) = doubt;
                done(Err(err.clone()));
            }
            return;
        }
    };
    let alive: HashSet<NodeId> = {
        let mut members = inner.members();
        let settling = members.settling(now);
        let mut alive = HashSet::new();
        for (node, exists) in nodes.iter().zip(exists) {
            if exists > 0 {
                members.saw(*node, now);
                alive.insert(*node);
            } else if settling && members.seen.contains_key(node) {
                alive.insert(*node);
            }
        }
        alive
    };
    let recent: HashSet<NodeId> = inner
        .members()
        .recent(now, inner.config.node_ttl)
        .into_iter()
        .collect();
    let alive_others: Vec<NodeId> = alive.intersection(&recent).copied().collect();
    let live = 1 + alive_others.len();
    for doubt in doubts {
        match doubt {
            Doubt::Short { reached, seq, done } if reached >= live => {
                inner.expect_confirmations(seq, done, reached, alive_others.clone())
            }
            Doubt::Short { reached, done, .. } => done(Err(BusError::Partial { reached, live })),
            Doubt::Unheard { node, done } if alive.contains(&node) => {
                done(Err(BusError::NotListening(node)))
            }
            Doubt::Unheard { done, .. } => done(Ok(0)),
        }
    }
}

fn set_commands_ok(inner: &Inner, ok: bool, why: &str) {
    let was = inner.commands_ok.swap(ok, Ordering::AcqRel);
    match (was, ok) {
        (true, false) => warn!(
            error = why,
            "Redis commands failing; serving local clients only until it is back"
        ),
        (false, true) => info!("Redis commands working"),
        _ => {}
    }
}

/// Refreshes liveness, notices when Redis lost its data, re-registers local
/// presence when needed (first start, outage, data loss, expiry), learns
/// which nodes are alive and sweeps dead ones.
async fn heartbeat(inner: &Inner, conn: &mut Commands) {
    let keys = &inner.keys;
    let me = inner.config.node_id;
    let ttl_ms = inner.config.node_ttl.as_millis() as u64;
    let record = format!("{}|{}", inner.config.node_name, now_ms());
    let started = std::time::Instant::now();
    // The liveness key is only refreshed (XX), never created here: it is
    // created by `resync` together with this node's presence, so a node
    // whose key exists always has its clients registered.
    let result: redis::RedisResult<(Option<String>, Option<String>, bool)> = redis::pipe()
        .cmd("SET")
        .arg(keys.incarnation())
        .arg(uuid::Uuid::new_v4().simple().to_string())
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(keys.incarnation())
        .cmd("SET")
        .arg(keys.node(me))
        .arg(&record)
        .arg("PX")
        .arg(ttl_ms)
        .arg("XX")
        .cmd("PEXPIRE")
        .arg(keys.node_clients(me))
        .arg(ttl_ms)
        .ignore()
        .cmd("PEXPIRE")
        .arg(keys.node_channels(me))
        .arg(ttl_ms)
        .ignore()
        .cmd("SISMEMBER")
        .arg(keys.nodes())
        .arg(me.to_string())
        .query_async(conn)
        .await;
    // Channel presence expires with the node too, unless refreshed.
    let presence = inner.presence.presence_channels();
    let result = match (result, presence.is_empty()) {
        (Ok(replies), false) => {
            let mut pipe = redis::pipe();
            for channel in &presence {
                pipe.cmd("PEXPIRE")
                    .arg(keys.channel_members(channel, me))
                    .arg(ttl_ms)
                    .ignore();
            }
            pipe.query_async::<()>(conn).await.map(|()| replies)
        }
        (result, _) => result,
    };
    inner
        .stats
        .redis_command
        .observe(started.elapsed().as_secs_f64());
    let (incarnation, refreshed, member) = match result {
        Ok(replies) => replies,
        Err(err) => {
            set_commands_ok(inner, false, &err.to_string());
            inner.needs_resync.store(true, Ordering::Release);
            return;
        }
    };
    inner.wrote();
    inner.note_incarnation(incarnation.as_deref());
    if refreshed.is_none() {
        // Our liveness key was gone: first start, Redis restarted or lost
        // data, or we were silent past the TTL. Presence must be rewritten.
        inner.needs_resync.store(true, Ordering::Release);
    } else if !member {
        // Alive, yet swept: another node found our key expired (after an
        // outage) and removed us from the node set, and maybe our routing
        // entries, just after our re-registration rewrote them. Without
        // this, the node would stay out of every node's live list.
        warn!("this node was removed from the node set while alive; registering again");
        inner.needs_resync.store(true, Ordering::Release);
    }
    // A node comes alive only once it listens: alive but not subscribed,
    // every broadcast in between would be refused as missing it. (The
    // subscriber asks for a heartbeat as soon as it is subscribed.)
    if inner.subscribed.load(Ordering::Acquire)
        && inner.needs_resync.swap(false, Ordering::AcqRel)
        && let Err(err) = resync(inner, conn).await
    {
        inner.needs_resync.store(true, Ordering::Release);
        set_commands_ok(inner, false, &err.to_string());
        return;
    }
    match query_live_nodes(keys, conn).await {
        Ok((live, dead)) => {
            let gone =
                inner
                    .members()
                    .observe(me, &live, &dead, Instant::now(), inner.config.node_ttl);
            inner.forget_nodes(&gone);
            // While presence is being rebuilt, an expired liveness key
            // proves nothing (after a failover every key may have expired):
            // a node that does not re-register is swept once it is over.
            let settling = inner.members().settling(Instant::now());
            for node in dead.into_iter().filter(|_| !settling) {
                if let Err(err) = sweep(inner, conn, node).await {
                    debug!(%err, %node, "sweep of dead node failed; will retry");
                }
            }
            set_commands_ok(inner, true, "");
        }
        Err(err) => set_commands_ok(inner, false, &err.to_string()),
    }
}

/// Writes every local client into Redis again and comes alive: first drops
/// routing-index entries that point here but are no local client (clients
/// that left while Redis was unreachable, or of an earlier process that ran
/// with this node id), then, in one transaction, replaces this node's
/// presence hash and sets its liveness key and node-set entry, so other
/// nodes never see this node alive with half its presence.
async fn resync(inner: &Inner, conn: &mut Commands) -> redis::RedisResult<()> {
    let keys = &inner.keys;
    let me = inner.config.node_id;
    let clients: Vec<ClientInfo> = inner.presence.local_clients();
    let here: HashSet<String> = clients.iter().map(|c| c.client_id.to_string()).collect();
    let me_str = me.to_string();
    let stale = remove_index_entries(inner, conn, |client, node| {
        node == me_str && !here.contains(client)
    })
    .await?;
    remove_user_entries(inner, conn, me, |client| !here.contains(client)).await?;
    let mut pipe = redis::pipe();
    if !keys.is_cluster() {
        pipe.atomic();
    }
    pipe.cmd("DEL").arg(keys.node_clients(me)).ignore();
    for chunk in clients.chunks(1000) {
        let mut infos = redis::cmd("HSET");
        infos.arg(keys.node_clients(me));
        let mut index: HashMap<String, redis::Cmd> = HashMap::new();
        for info in chunk {
            let Ok(value) = encode_value(info) else {
                continue;
            };
            infos.arg(info.client_id.to_string()).arg(value);
            index
                .entry(keys.client_nodes(info.client_id))
                .or_insert_with_key(|key| {
                    let mut hset = redis::cmd("HSET");
                    hset.arg(key);
                    hset
                })
                .arg(info.client_id.to_string())
                .arg(&me_str);
        }
        pipe.add_command(infos).ignore();
        for (_, hset) in index {
            pipe.add_command(hset).ignore();
        }
    }
    for info in &clients {
        if let Some(user) = &info.user {
            pipe.cmd("HSET")
                .arg(keys.user(user))
                .arg(info.client_id.to_string())
                .arg(&me_str)
                .ignore();
            pipe.cmd("HSET")
                .arg(keys.node_users(me))
                .arg(info.client_id.to_string())
                .arg(user)
                .ignore();
        }
    }
    let ttl_ms = inner.config.node_ttl.as_millis() as u64;
    pipe.cmd("PEXPIRE")
        .arg(keys.node_clients(me))
        .arg(ttl_ms)
        .ignore();
    // Channels: subscriber counts and presence, replaced as a whole.
    pipe.cmd("DEL").arg(keys.node_channels(me)).ignore();
    for channel in inner.presence.local_channels() {
        pipe.cmd("HSET")
            .arg(keys.node_channels(me))
            .arg(&channel.name)
            .arg(channel.subscribers)
            .ignore();
        let Some(members) = channel.members else {
            continue;
        };
        let key = keys.channel_members(&channel.name, me);
        pipe.cmd("DEL").arg(&key).ignore();
        for chunk in members.chunks(1000) {
            let mut hset = redis::cmd("HSET");
            hset.arg(&key);
            for info in chunk {
                if let Ok(value) = encode_value(info) {
                    hset.arg(info.client_id.to_string()).arg(value);
                }
            }
            pipe.add_command(hset).ignore();
        }
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
    }
    pipe.cmd("PEXPIRE")
        .arg(keys.node_channels(me))
        .arg(ttl_ms)
        .ignore();
    // On a Redis Cluster the writes above span slots, so no transaction
    // holds them all: they land first, and the node comes alive after.
    let mut alive = if keys.is_cluster() {
        pipe.query_async::<()>(conn).await?;
        redis::pipe()
    } else {
        pipe
    };
    alive
        .cmd("SET")
        .arg(keys.node(me))
        .arg(format!("{}|{}", inner.config.node_name, now_ms()))
        .arg("PX")
        .arg(ttl_ms)
        .ignore();
    alive.cmd("SADD").arg(keys.nodes()).arg(&me_str).ignore();
    alive.query_async::<()>(conn).await?;
    info!(
        clients = clients.len(),
        stale_index_entries = stale,
        "registered local clients in Redis"
    );
    Ok(())
}

/// Removes the routing-index entries for which `stale(client, node)` holds
/// (scanned with HSCAN, so the index is never read at once); returns how
/// many.
async fn remove_index_entries(
    inner: &Inner,
    conn: &mut Commands,
    stale: impl Fn(&str, &str) -> bool,
) -> redis::RedisResult<usize> {
    let mut removed = 0;
    for index in inner.keys.route_indexes() {
        removed += remove_entries_of(conn, &index, &stale).await?;
    }
    Ok(removed)
}

/// [`remove_index_entries`] on one hash of the routing index.
async fn remove_entries_of(
    conn: &mut Commands,
    index: &str,
    stale: &impl Fn(&str, &str) -> bool,
) -> redis::RedisResult<usize> {
    let mut cursor: u64 = 0;
    let mut removed = 0;
    loop {
        let (next, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(index)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        let doomed: Vec<&String> = entries
            .iter()
            .filter(|(client, node)| stale(client, node))
            .map(|(client, _)| client)
            .collect();
        if !doomed.is_empty() {
            removed += doomed.len();
            redis::cmd("HDEL")
                .arg(index)
                .arg(doomed)
                .query_async::<()>(conn)
                .await?;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(removed);
        }
    }
}

/// Runs `session_orphan.lua` on every routing entry of dead node `dead`
/// (scanned with HSCAN, one pipeline per page): its clients' sessions wait
/// for a resume from now on, and the entries of clients without one go.
async fn orphan_index_entries(
    inner: &Inner,
    conn: &mut Commands,
    dead: &str,
) -> redis::RedisResult<()> {
    for index in inner.keys.route_indexes() {
        orphan_entries_of(inner, conn, &index, dead).await?;
    }
    Ok(())
}

/// [`orphan_index_entries`] on one hash of the routing index.
async fn orphan_entries_of(
    inner: &Inner,
    conn: &mut Commands,
    index: &str,
    dead: &str,
) -> redis::RedisResult<()> {
    let keys = &inner.keys;
    let window = inner.config.session_window.as_millis() as u64;
    let mut cursor: u64 = 0;
    loop {
        let (next, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(index)
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        let mut pipe = redis::pipe();
        let mut any = false;
        for (client, node) in &entries {
            let Ok(id) = client.parse::<ClientId>() else {
                continue;
            };
            if node != dead {
                continue;
            }
            if !any {
                pipe.cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(SESSION_ORPHAN.source)
                    .ignore();
                any = true;
            }
            pipe.cmd("EVALSHA")
                .arg(SESSION_ORPHAN.hash())
                .arg(2)
                .arg(keys.session(id))
                .arg(index)
                .arg(client)
                .arg(dead)
                .arg(window)
                .ignore();
        }
        if any {
            pipe.query_async::<()>(conn).await?;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

/// Forgets a dead node: its routing index entries and its node-set entry.
/// Its presence hash and liveness key have already expired by TTL.
async fn sweep(inner: &Inner, conn: &mut Commands, dead: NodeId) -> redis::RedisResult<()> {
    let dead_str = dead.to_string();
    // Checked again here: the node may have re-registered since it was
    // found dead. (What remains of the race, a re-registration between
    // this check and the SREM, the node repairs at its next heartbeat.)
    let alive: bool = redis::cmd("EXISTS")
        .arg(inner.keys.node(dead))
        .query_async(conn)
        .await?;
    if alive {
        return Ok(());
    }
    orphan_index_entries(inner, conn, &dead_str).await?;
    remove_user_entries(inner, conn, dead, |_| true).await?;
    redis::cmd("SREM")
        .arg(inner.keys.nodes())
        .arg(&dead_str)
        .query_async::<()>(conn)
        .await?;
    info!(node = %dead, "removed dead node from the cluster");
    Ok(())
}

/// Removes the `P:user:U` entries of node `node`'s clients for which
/// `stale(client)` holds, found through the node's `P:node:N:users`
/// (from which they are removed too; the hash goes when it is empty).
async fn remove_user_entries(
    inner: &Inner,
    conn: &mut Commands,
    node: NodeId,
    stale: impl Fn(&str) -> bool,
) -> redis::RedisResult<()> {
    let keys = &inner.keys;
    let entries: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.node_users(node))
        .query_async(conn)
        .await?;
    let doomed: Vec<(&String, &String)> = entries.iter().filter(|(c, _)| stale(c)).collect();
    if doomed.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for (client, user) in &doomed {
        pipe.cmd("HDEL").arg(keys.user(user)).arg(*client).ignore();
        pipe.cmd("HDEL")
            .arg(keys.node_users(node))
            .arg(*client)
            .ignore();
    }
    pipe.query_async::<()>(conn).await
}

/// Graceful leave: remove liveness, presence and index entries at once.
async fn remove_self(inner: &Inner, conn: &mut Commands) {
    let keys = &inner.keys;
    let me = inner.config.node_id;
    let ids: Vec<String> = match redis::cmd("HKEYS")
        .arg(keys.node_clients(me))
        .query_async(conn)
        .await
    {
        Ok(ids) => ids,
        Err(err) => {
            warn!(%err, "cannot remove presence from Redis; it expires with the node TTL");
            return;
        }
    };
    let mut pipe = redis::pipe();
    pipe.cmd("DEL").arg(keys.node(me)).ignore();
    pipe.cmd("DEL").arg(keys.node_clients(me)).ignore();
    pipe.cmd("DEL").arg(keys.node_channels(me)).ignore();
    pipe.cmd("DEL").arg(keys.node_users(me)).ignore();
    for channel in inner.presence.presence_channels() {
        pipe.cmd("DEL")
            .arg(keys.channel_members(&channel, me))
            .ignore();
    }
    for info in inner.presence.local_clients() {
        if let Some(user) = &info.user {
            pipe.cmd("HDEL")
                .arg(keys.user(user))
                .arg(info.client_id.to_string())
                .ignore();
        }
    }
    pipe.cmd("SREM")
        .arg(keys.nodes())
        .arg(me.to_string())
        .ignore();
    let mut index: HashMap<String, Vec<String>> = HashMap::new();
    for id in ids {
        if let Ok(client) = id.parse::<ClientId>() {
            index.entry(keys.client_nodes(client)).or_default().push(id);
        }
    }
    for (key, ids) in index {
        pipe.cmd("HDEL").arg(key).arg(ids).ignore();
    }
    match pipe.query_async::<()>(conn).await {
        Ok(()) => info!("left the cluster"),
        Err(err) => warn!(%err, "cannot remove presence from Redis; it expires with the node TTL"),
    }
}

/// Where the node subscribes to fabric channel feeds: its one pub/sub
/// connection, or (Redis Cluster) the connections to each master.
#[derive(Clone)]
enum Sink {
    Plain(redis::aio::PubSubSink),
    Sharded(Arc<Shards>),
}

impl Sink {
    async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Sink::Plain(sink) => sink.subscribe(channel).await,
            Sink::Sharded(shards) => shards.command("SSUBSCRIBE", channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Sink::Plain(sink) => sink.unsubscribe(channel).await,
            Sink::Sharded(shards) => shards.command("SUNSUBSCRIBE", channel).await,
        }
    }
}

/// A Redis Cluster's masters as the sharded subscriptions saw them: the
/// slot map, and one RESP3 connection per master carrying only this
/// node's `SSUBSCRIBE`s, `SUNSUBSCRIBE`s and PINGs (never other commands:
/// an unsolicited `sunsubscribe` would be taken for their reply).
struct Shards {
    slots: Vec<(u16, u16, String)>,
    conns: HashMap<String, redis::aio::MultiplexedConnection>,
    /// A reply was not the one its command asks for: an unsolicited push
    /// was taken as a reply, and every later reply on that connection may
    /// be shifted. The subscriptions start over.
    broken: tokio::sync::Notify,
}

impl Shards {
    /// Sends `command` (SSUBSCRIBE or SUNSUBSCRIBE) for `channel` to the
    /// master serving its slot: one channel per command, since one command
    /// must stay within one slot.
    async fn command(&self, command: &str, channel: &str) -> redis::RedisResult<()> {
        let slot = key_slot(channel.as_bytes());
        let conn = self
            .slots
            .iter()
            .find(|(first, last, _)| (*first..=*last).contains(&slot))
            .and_then(|(_, _, addr)| self.conns.get(addr))
            .ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no Redis Cluster master serves the slot",
                    format!("slot {slot} of {channel}"),
                ))
            })?;
        let mut conn = conn.clone();
        let reply = redis::cmd(command)
            .arg(channel)
            .query_async::<redis::Value>(&mut conn)
            .await?;
        let kind = if command == "SSUBSCRIBE" {
            redis::PushKind::SSubscribe
        } else {
            redis::PushKind::SUnsubscribe
        };
        match reply {
            redis::Value::Push { kind: got, data }
                if got == kind
                    && matches!(data.first(), Some(redis::Value::BulkString(name)) if name == channel.as_bytes()) =>
            {
                Ok(())
            }
            other => {
                self.broken.notify_one();
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "unexpected reply on a shard subscription connection",
                    format!("{command} {channel}: {other:?}"),
                )))
            }
        }
    }
}

/// Keeps a subscription to the broadcast channel and this node's channel,
/// reconnecting with backoff for as long as the node runs.
async fn subscriber(inner: Arc<Inner>) {
    if inner.master.is_cluster() {
        return sharded_subscriber(inner).await;
    }
    let channels = [
        inner.keys.broadcast_channel(),
        inner.keys.node_channel(inner.config.node_id),
    ];
    let mut backoff = Duration::from_millis(100);
    // After Redis comes back (having lost its data, say), the other nodes
    // count this one alive for `node_ttl` while it re-registers, and
    // re-registering waits for this subscription: the wait between
    // attempts stays well inside that (2 s, or a quarter of the TTL).
    let longest =
        (inner.config.node_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
    let mut failures: u64 = 0;
    if inner.master.is_followed() {
        // Nothing to connect to before the sentinels name a master.
        let mut generation = inner.master.generation();
        tokio::select! {
            _ = generation.wait_for(|g| *g > 0) => {}
            _ = inner.cancel.cancelled() => return,
        }
    }
    loop {
        // Taken before connecting: a master change from here on ends the
        // subscription, so it never stays on a demoted server.
        let mut generation = inner.master.generation();
        let connect = async {
            let pubsub = inner.master.client()?.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&channels[..]).await?;
            // Every fabric channel this node wants, under the turn, so no
            // `channel_sync` runs on the old state meanwhile.
            let turn = inner.channel_turn.lock().await;
            let wanted: Vec<String> = lock(&inner.wanted).iter().cloned().collect();
            for chunk in wanted.chunks(1000) {
                sink.subscribe(chunk).await?;
            }
            *lock(&inner.have) = wanted.into_iter().collect();
            lock(&inner.doubtful).clear();
            *lock(&inner.sink) = Some(Sink::Plain(sink.clone()));
            drop(turn);
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout(inner.config.connect_timeout + inner.config.response_timeout, connect) => r,
            _ = inner.cancel.cancelled() => return,
        };
        match attempt {
            Ok(Ok((sink, stream))) => {
                failures = 0;
                backoff = Duration::from_millis(100);
                info!(
                    channels = lock(&inner.have).len(),
                    "subscribed to cluster channels"
                );
                let end = subscribed(&inner, receive(&inner, &mut generation, sink, stream)).await;
                if inner.cancel.is_cancelled() {
                    return;
                }
                warn!(reason = %end, "cluster subscription lost; reconnecting");
            }
            Ok(Err(err)) => log_failure(&mut failures, &err.to_string()),
            Err(_) => log_failure(&mut failures, "timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(longest),
            // A new master: try it at once, not after the backoff the old
            // one's failures built up.
            _ = generation.changed() => backoff = Duration::from_millis(100),
            _ = inner.cancel.cancelled() => return,
        }
    }
}

/// [`subscriber`] on a Redis Cluster: sharded pub/sub, each channel
/// subscribed (`SSUBSCRIBE`) on the master serving its slot, through a
/// connection per master. When any of them is lost, a subscription is
/// dropped by its shard (its slot moved) or the slot map changes, the node
/// subscribes everything again from a fresh slot map: the same gap
/// handling as on one Redis (catch-up from the history, presence written
/// again), and after a change of masters presence counts as incomplete
/// until every node re-registered, as after a Sentinel failover.
async fn sharded_subscriber(inner: Arc<Inner>) {
    let base = [
        inner.keys.broadcast_channel(),
        inner.keys.node_channel(inner.config.node_id),
    ];
    let mut backoff = Duration::from_millis(100);
    let longest =
        (inner.config.node_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
    let mut failures: u64 = 0;
    let mut masters_before: Option<Vec<String>> = None;
    loop {
        let (pushes, mut arrivals) = mpsc::unbounded_channel::<(String, redis::PushInfo)>();
        let connect = async {
            let slots = inner.master.cluster_slots().await?;
            let mut masters: Vec<String> = slots.iter().map(|(_, _, a)| a.clone()).collect();
            masters.sort();
            masters.dedup();
            let mut conns = HashMap::new();
            for addr in &masters {
                let pushes = pushes.clone();
                let tag = addr.clone();
                let conn = inner
                    .master
                    .shard_connection(
                        addr,
                        move |push: redis::PushInfo| {
                            pushes.send((tag.clone(), push)).map_err(|_| ())
                        },
                        inner.config.connect_timeout,
                        inner.config.response_timeout,
                    )
                    .await?;
                conns.insert(addr.clone(), conn);
            }
            let shards = Arc::new(Shards {
                slots,
                conns,
                broken: tokio::sync::Notify::new(),
            });
            futures_util::future::try_join_all(
                base.iter().map(|c| shards.command("SSUBSCRIBE", c)),
            )
            .await?;
            let turn = inner.channel_turn.lock().await;
            let wanted: Vec<String> = lock(&inner.wanted).iter().cloned().collect();
            for chunk in wanted.chunks(1000) {
                futures_util::future::try_join_all(
                    chunk.iter().map(|c| shards.command("SSUBSCRIBE", c)),
                )
                .await?;
            }
            *lock(&inner.have) = wanted.into_iter().collect();
            lock(&inner.doubtful).clear();
            *lock(&inner.sink) = Some(Sink::Sharded(shards.clone()));
            drop(turn);
            Ok::<_, redis::RedisError>((shards, masters))
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout((inner.config.connect_timeout + inner.config.response_timeout) * 2, connect) => r,
            _ = inner.cancel.cancelled() => return,
        };
        match attempt {
            Ok(Ok((shards, masters))) => {
                failures = 0;
                backoff = Duration::from_millis(100);
                if masters_before
                    .as_ref()
                    .is_some_and(|before| *before != masters)
                {
                    warn!(
                        before = ?masters_before,
                        now = ?masters,
                        "Redis Cluster masters changed (failover or resharding); \
                         re-registering, and treating presence as incomplete until every node has"
                    );
                    inner
                        .members()
                        .unsettle(Instant::now(), inner.config.node_ttl);
                }
                masters_before = Some(masters.clone());
                // A shard may have lost writes (a promoted replica, or a
                // master restarted empty): presence is written again.
                inner.needs_resync.store(true, Ordering::Release);
                info!(
                    channels = lock(&inner.have).len(),
                    masters = masters.len(),
                    "subscribed to cluster channels (sharded)"
                );
                let end = subscribed(&inner, receive_sharded(&inner, &shards, &mut arrivals)).await;
                if inner.cancel.is_cancelled() {
                    return;
                }
                warn!(reason = %end, "cluster subscription lost; subscribing again");
            }
            Ok(Err(err)) => log_failure(&mut failures, &err.to_string()),
            Err(_) => log_failure(&mut failures, "timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(longest),
            _ = inner.cancel.cancelled() => return,
        }
    }
}

/// Takes in what the shard connections push until one of them is lost,
/// drops a subscription the node still wants, stops answering PINGs, or
/// the slot map changes; returns why.
async fn receive_sharded(
    inner: &Inner,
    shards: &Shards,
    arrivals: &mut mpsc::UnboundedReceiver<(String, redis::PushInfo)>,
) -> String {
    let me = inner.config.node_id;
    let mut ping = tokio::time::interval(inner.config.heartbeat_interval);
    ping.tick().await;
    let mut changed: Option<Vec<(u16, u16, String)>> = None;
    loop {
        tokio::select! {
            arrival = arrivals.recv() => {
                let Some((shard, push)) = arrival else { return "connections closed".into() };
                match push.kind {
                    redis::PushKind::SMessage => {
                        let Some(redis::Value::BulkString(payload)) = push.data.get(1) else {
                            continue;
                        };
                        crate::stats::add(&inner.stats.pubsub_in, 1);
                        let wire = match decode_value::<Wire>(payload) {
                            Ok(wire) => wire,
                            Err(err) => {
                                warn!(%err, %shard, "undecodable cluster message dropped");
                                continue;
                            }
                        };
                        if let Err(stopped) = take_in(inner, me, wire).await {
                            return stopped;
                        }
                    }
                    redis::PushKind::Disconnection => {
                        return format!("lost the connection to Redis Cluster master {shard}");
                    }
                    redis::PushKind::SUnsubscribe => {
                        // Ours (a channel no longer wanted), or the shard's
                        // own: the slot moved away.
                        let channel = match push.data.first() {
                            Some(redis::Value::BulkString(name)) => String::from_utf8_lossy(name).into_owned(),
                            _ => continue,
                        };
                        let base = channel == inner.keys.broadcast_channel()
                            || channel == inner.keys.node_channel(me);
                        if base || lock(&inner.wanted).contains(&channel) {
                            return format!("Redis Cluster master {shard} dropped the subscription to {channel} (its slot moved?)");
                        }
                    }
                    _ => {}
                }
            }
            _ = shards.broken.notified() => {
                return "a shard connection's replies no longer match its commands".into();
            }
            _ = ping.tick() => {
                for (addr, conn) in &shards.conns {
                    let mut conn = conn.clone();
                    let pong = tokio::time::timeout(
                        inner.config.response_timeout * 2,
                        redis::cmd("PING").query_async::<redis::Value>(&mut conn),
                    )
                    .await;
                    match pong {
                        Ok(Ok(redis::Value::SimpleString(pong))) if pong == "PONG" => {}
                        Ok(Ok(other)) => {
                            return format!("Redis Cluster master {addr} answered PING with {other:?}");
                        }
                        _ => return format!("Redis Cluster master {addr} does not answer PING"),
                    }
                }
                // A failover or resharding that kept every connection up
                // (a slot moved between live masters) shows in the map;
                // two reads that agree, since nodes may briefly disagree.
                match inner.master.cluster_slots().await {
                    Ok(slots) if slots != shards.slots => {
                        if changed.as_ref() == Some(&slots) {
                            return "the Redis Cluster slot map changed".into();
                        }
                        changed = Some(slots);
                    }
                    _ => changed = None,
                }
            }
            _ = inner.cancel.cancelled() => return "shutting down".into(),
        }
    }
}

/// What follows a (re)subscription, whichever the kind: the bus counts as
/// subscribed, presence is written again at once, what was published meanwhile caught up, then `receive`
/// until it ends (its reason is returned), after which nothing counts as
/// subscribed.
async fn subscribed(inner: &Inner, receive: impl std::future::Future<Output = String>) -> String {
    inner.subscribed.store(true, Ordering::Release);
    // Re-register at once rather than at the next tick.
    let _ = inner.ops.try_send(Op::Heartbeat);
    // Whatever was published while not subscribed, before what arrives
    // from now on.
    catch_up_all(inner).await;
    let end = receive.await;
    inner.subscribed.store(false, Ordering::Release);
    let _turn = inner.channel_turn.lock().await;
    *lock(&inner.sink) = None;
    lock(&inner.have).clear();
    lock(&inner.doubtful).clear();
    end
}

fn log_failure(failures: &mut u64, why: &str) {
    *failures += 1;
    // Loud at first, then every ~30 attempts (about a minute at full backoff).
    if *failures == 1 || failures.is_multiple_of(30) {
        warn!(
            error = why,
            attempts = *failures,
            "cannot reach Redis for the cluster subscription"
        );
    } else {
        debug!(error = why, "cannot reach Redis");
    }
}

/// Handles one message from Redis: bus messages go to the node (a broadcast
/// is confirmed once handed over, and a gap before it reported), the
/// engine's own confirmations settle this node's broadcasts. Errs when the
/// node stopped.
async fn take_in(inner: &Inner, me: NodeId, wire: Wire) -> Result<(), String> {
    let (message, numbered) = match wire {
        Wire::Message(message) => (message, None),
        Wire::Positioned { message, position } => {
            return take_positioned(inner, message, position).await;
        }
        Wire::Messages(messages) => {
            for message in messages {
                hand_over(inner, message, None).await?;
            }
            return Ok(());
        }
        Wire::Broadcast {
            epoch,
            seq,
            message,
        } => {
            let origin = match &message {
                BusMessage::Broadcast { origin, .. } => *origin,
                _ => return Ok(()),
            };
            if origin == me {
                return Ok(()); // this node's own, delivered locally already
            }
            match inner.incoming().arrived(origin, epoch, seq) {
                Arrival::Stale => return Ok(()),
                Arrival::Gap(first, last) => {
                    warn!(%origin, first, last, "cluster broadcasts missed (subscription gap); telling their origin");
                    let missed = Wire::Missed {
                        from: me,
                        epoch,
                        first,
                        last,
                    };
                    if let Ok(payload) = encode_value(&missed) {
                        let _ = inner.ops.try_send(Op::Publish {
                            target: Target::Node(origin),
                            seq: None,
                            channel: inner.keys.node_channel(origin),
                            payload,
                            done: None,
                        });
                    }
                }
                Arrival::InOrder => {}
            }
            (message, Some((origin, seq)))
        }
        Wire::Confirm { from, epoch, upto } => {
            let answers = {
                let mut outgoing = inner.outgoing();
                if outgoing.epoch() != epoch {
                    return Ok(());
                }
                outgoing.confirm(from, upto)
            };
            answer(answers);
            return Ok(());
        }
        Wire::Missed {
            from,
            epoch,
            first,
            last,
        } => {
            let answers = {
                let mut outgoing = inner.outgoing();
                if outgoing.epoch() != epoch {
                    return Ok(());
                }
                outgoing.missed(from, first, last)
            };
            answer(answers);
            return Ok(());
        }
    };
    hand_over(inner, message, numbered).await
}

/// Where a node is in a channel with history: the epoch and the offset of
/// the last publication it delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Follow {
    epoch: u64,
    last: u64,
    /// Set by `follow_history` from the channel's position when the node
    /// subscribed: publications up to `last` may still arrive and are
    /// delivered (they cannot have been delivered already).
    seeded: bool,
}

/// What to do with a publication of a channel with history that arrived.
#[derive(Debug, PartialEq, Eq)]
enum Arrived {
    Deliver,
    /// Already delivered (read back from the history).
    Duplicate,
    /// Publications after `after` and before it were missed.
    Gap {
        after: u64,
    },
}

impl Follow {
    /// Takes the publication at `position` into account.
    fn arrived(follow: &mut Option<Follow>, position: Position) -> Arrived {
        let next = Follow {
            epoch: position.epoch,
            last: position.offset,
            seeded: false,
        };
        match follow {
            // The first one since the node subscribed.
            None => *follow = Some(next),
            // A new epoch: the old one's history was lost (nothing of it
            // can be read back), but what the new one holds before this
            // publication (after a failover, what the other nodes
            // published on the new master while this one was switching)
            // is read from its start.
            Some(f) if f.epoch != position.epoch => {
                if position.offset > 1 {
                    *f = Follow {
                        epoch: position.epoch,
                        last: 0,
                        seeded: false,
                    };
                    return Arrived::Gap { after: 0 };
                }
                *f = next
            }
            Some(f) if f.seeded && position.offset <= f.last => {}
            Some(f) if position.offset <= f.last => return Arrived::Duplicate,
            Some(f) if position.offset == f.last + 1 => *f = next,
            Some(f) => return Arrived::Gap { after: f.last },
        }
        Arrived::Deliver
    }
}

impl Inner {
    /// Whether this node takes `channel`'s publications (its follow is
    /// kept only then: a stale one would make the next subscription look
    /// like a gap, and be read back).
    fn wants_publications(&self, channel: &str) -> bool {
        lock(&self.wanted).contains(&self.keys.channel(channel))
    }

    fn set_follow(&self, channel: &str, follow: Follow) {
        let wanted = self.wants_publications(channel);
        let mut follows = lock(&self.follows);
        if wanted {
            follows.insert(channel.to_owned(), follow);
        } else {
            follows.remove(channel);
        }
    }
}

/// Most publications read back from a history in one read.
const FILL_BATCH: usize = 1000;

/// Delivers a publication of a channel with history in offset order: a
/// publication this node's subscription missed before it (the subscription
/// dropped, or Redis dropped it) is read back from the history first.
async fn take_positioned(
    inner: &Inner,
    message: BusMessage,
    position: Position,
) -> Result<(), String> {
    let BusMessage::Publication { channel, .. } = &message else {
        return Ok(());
    };
    let channel = channel.clone();
    // (Read before `follows` is locked: `want_channel` takes them in the
    // other order.)
    let wanted = inner.wants_publications(&channel);
    let arrived = {
        let mut follows = lock(&inner.follows);
        let mut follow = follows.get(&channel).copied();
        let new_epoch = follow.is_some_and(|f| f.epoch != position.epoch);
        let arrived = Follow::arrived(&mut follow, position);
        if let Some(follow) = follow
            && wanted
        {
            follows.insert(channel.clone(), follow);
        }
        (arrived, new_epoch)
    };
    let (arrived, new_epoch) = arrived;
    if new_epoch {
        warn!(%channel, "the channel's history was lost (a new epoch)");
        report_lost(inner, &channel, "the channel's history was lost".into()).await?;
    }
    match arrived {
        Arrived::Deliver => hand_over_positioned(inner, message, position).await,
        Arrived::Duplicate => Ok(()),
        Arrived::Gap { after } => {
            catch_up(
                inner,
                &channel,
                position.epoch,
                after,
                Some(position.offset),
            )
            .await?;
            // Delivered in the catch-up unless the history lost it.
            let mut follow = lock(&inner.follows).get(&channel).copied();
            if Follow::arrived(&mut follow, position) == Arrived::Deliver {
                if let Some(follow) = follow {
                    inner.set_follow(&channel, follow);
                }
                hand_over_positioned(inner, message, position).await?;
            }
            Ok(())
        }
    }
}

/// Reads `channel`'s publications after offset `after` of `epoch` back
/// from its history and delivers them, up to (not including) `until`, or
/// up to the latest. Those no longer in the history are counted and
/// logged; a lost epoch ends the catch-up (its publications are gone).
async fn catch_up(
    inner: &Inner,
    channel: &str,
    mut epoch: u64,
    mut after: u64,
    until: Option<u64>,
) -> Result<(), String> {
    loop {
        let wanted = until.map_or(FILL_BATCH, |u| {
            (u.saturating_sub(after + 1) as usize).min(FILL_BATCH)
        });
        if wanted == 0 {
            return Ok(());
        }
        let (position, entries, _) =
            match read_history(inner, channel, Read::After(after), wanted).await {
                Ok(read) => read,
                Err(err) => {
                    // Left for the next arrival or resubscription to retry.
                    warn!(%channel, %err, "cannot read missed publications back from the history");
                    return Ok(());
                }
            };
        if position.epoch != epoch {
            warn!(%channel, "the channel's history was lost; publications this node missed cannot be delivered");
            report_lost(inner, channel, "the channel's history was lost".into()).await?;
            if let Some(until) = until {
                let lost = until.saturating_sub(after + 1);
                crate::stats::add(&inner.stats.history_missed, lost);
                return Ok(());
            }
            // What the new epoch holds already is delivered from its start
            // (after a failover, the new master's first publications).
            epoch = position.epoch;
            after = 0;
            inner.set_follow(
                channel,
                Follow {
                    epoch,
                    last: 0,
                    seeded: false,
                },
            );
            continue;
        }
        let top = until
            .map_or(position.offset, |u| u - 1)
            .min(position.offset);
        let mut filled = 0;
        for (message, at) in entries {
            if at.offset > top {
                break;
            }
            if at.offset > after + 1 {
                let lost = at.offset - after - 1;
                warn!(%channel, lost, "publications this node missed are no longer in the history");
                crate::stats::add(&inner.stats.history_missed, lost);
                let reason = format!(
                    "{lost} publications after offset {after} are no longer in the history"
                );
                report_lost(inner, channel, reason).await?;
            }
            after = at.offset;
            inner.set_follow(
                channel,
                Follow {
                    epoch,
                    last: after,
                    seeded: false,
                },
            );
            hand_over_positioned(inner, message, at).await?;
            filled += 1;
        }
        crate::stats::add(&inner.stats.history_filled, filled);
        if after >= top {
            return Ok(());
        }
        if filled == 0 {
            // The rest is gone (trimmed or expired).
            let lost = top - after;
            warn!(%channel, lost, "publications this node missed are no longer in the history");
            crate::stats::add(&inner.stats.history_missed, lost);
            inner.set_follow(
                channel,
                Follow {
                    epoch,
                    last: top,
                    seeded: false,
                },
            );
            let reason =
                format!("{lost} publications after offset {after} are no longer in the history");
            return report_lost(inner, channel, reason).await;
        }
    }
}

/// After the subscription connection was (re)made: delivers what this
/// node's channels with history published while it was not subscribed.
async fn catch_up_all(inner: &Inner) {
    let follows: Vec<(String, Follow)> = lock(&inner.follows)
        .iter()
        .map(|(c, f)| (c.clone(), *f))
        .collect();
    for (channel, follow) in follows {
        if let Err(err) = catch_up(inner, &channel, follow.epoch, follow.last, None).await {
            debug!(%err, "catch-up stopped");
            return;
        }
    }
}

/// Hands a publication of a channel with history to this node.
async fn hand_over_positioned(
    inner: &Inner,
    message: BusMessage,
    position: Position,
) -> Result<(), String> {
    let event = ClusterEvent::Positioned(message, position);
    inner
        .events
        .send(event)
        .await
        .map_err(|_| "node stopped".to_owned())
}

/// Tells this node that publications of `channel` it received were lost.
async fn report_lost(inner: &Inner, channel: &str, reason: String) -> Result<(), String> {
    let event = ClusterEvent::Lost {
        channel: channel.to_owned(),
        reason,
    };
    inner
        .events
        .send(event)
        .await
        .map_err(|_| "node stopped".to_owned())
}

/// Hands a message from another node to this node; `numbered` is the
/// origin and number of a broadcast, confirmed once handed over.
async fn hand_over(
    inner: &Inner,
    message: BusMessage,
    numbered: Option<(NodeId, u64)>,
) -> Result<(), String> {
    // Waits rather than drops when the node's inbox is full: dropping would
    // make the sender's answer a lie. If the wait lasts, Redis closes this
    // subscriber over its output buffer limit, which is a gap the origin
    // learns about.
    if inner
        .events
        .send(ClusterEvent::Message(message))
        .await
        .is_err()
    {
        return Err("node stopped".into());
    }
    if let Some((origin, seq)) = numbered {
        inner.incoming().handed(origin, seq);
        inner.owe_confirmations();
    }
    Ok(())
}

/// Settles this node's broadcasts that waited for confirmations longer
/// than `confirm_timeout`: nodes that are gone since are no longer awaited;
/// a live node that stayed silent fails the broadcast.
async fn expire_confirmations(inner: &Inner) {
    let now = Instant::now();
    let timeout = inner.config.confirm_timeout;
    let nodes = inner.outgoing().overdue(now, timeout);
    if nodes.is_empty() {
        return;
    }
    // The incarnation too: a node whose key is missing because Redis lost
    // its data (and that has not re-registered yet) is not dead, and this
    // node may not have noticed the loss yet (its next heartbeat would).
    // Without this check a broadcast published just before the loss was
    // acknowledged here as if the others had left.
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(inner.keys.incarnation());
    for node in &nodes {
        pipe.cmd("EXISTS").arg(inner.keys.node(*node));
    }
    let mut conn = inner.conn.clone();
    let replies = pipe
        .query_async::<Vec<redis::Value>>(&mut conn)
        .await
        .map(incarnation_and_counts);
    let alive: Vec<NodeId> = match replies {
        Ok((incarnation, exists)) => {
            inner.note_incarnation(incarnation.as_deref());
            let members = inner.members();
            let settling = members.settling(now);
            nodes
                .iter()
                .zip(exists)
                .filter(|(n, e)| *e > 0 || (settling && members.seen.contains_key(n)))
                .map(|(n, _)| *n)
                .collect()
        }
        // Cannot tell: take them for alive (the broadcast then fails).
        Err(_) => nodes,
    };
    let answers = inner.outgoing().expire(now, timeout, &alive);
    answer(answers);
}

/// The replies of a pipeline of `GET P:incarnation` then `EXISTS`es: the
/// marker, and the counts.
fn incarnation_and_counts(replies: Vec<redis::Value>) -> (Option<String>, Vec<i64>) {
    let mut replies = replies.into_iter();
    let incarnation = match replies.next() {
        Some(redis::Value::BulkString(bytes)) => String::from_utf8(bytes).ok(),
        _ => None,
    };
    let exists: Vec<i64> = replies
        .map(|reply| match reply {
            redis::Value::Int(n) => n,
            _ => 0,
        })
        .collect();
    (incarnation, exists)
}

/// Dispatches subscribed messages until the connection ends; a periodic PING
/// detects a silently dead connection.
async fn receive(
    inner: &Inner,
    generation: &mut tokio::sync::watch::Receiver<u64>,
    mut sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
) -> String {
    let me = inner.config.node_id;
    let mut ping = tokio::time::interval(inner.config.heartbeat_interval);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = generation.changed() => return "the Redis master changed".into(),
            msg = stream.next() => {
                let Some(msg) = msg else { return "connection closed".into() };
                crate::stats::add(&inner.stats.pubsub_in, 1);
                let wire = match decode_value::<Wire>(msg.get_payload_bytes()) {
                    Ok(wire) => wire,
                    Err(err) => {
                        warn!(%err, channel = msg.get_channel_name(), "undecodable cluster message dropped");
                        continue;
                    }
                };
                if let Err(stopped) = take_in(inner, me, wire).await {
                    return stopped;
                }
            }
            _ = ping.tick() => {
                let pong = tokio::time::timeout(inner.config.response_timeout * 2, sink.ping::<redis::Value>()).await;
                match pong {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return format!("ping failed: {err}"),
                    Err(_) => return "ping timed out".into(),
                }
            }
            _ = inner.cancel.cancelled() => return "shutting down".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::DeliveryOutcome;
    use crate::protocol::MessageId;

    #[test]
    fn arrivals_are_delivered_once_in_offset_order_and_gaps_are_found() {
        let at = |epoch, offset| Position { epoch, offset };
        let mut follow = None;
        // The first arrival starts the follow.
        assert_eq!(Follow::arrived(&mut follow, at(7, 10)), Arrived::Deliver);
        assert_eq!(Follow::arrived(&mut follow, at(7, 11)), Arrived::Deliver);
        assert_eq!(Follow::arrived(&mut follow, at(7, 11)), Arrived::Duplicate);
        assert_eq!(Follow::arrived(&mut follow, at(7, 3)), Arrived::Duplicate);
        assert_eq!(
            Follow::arrived(&mut follow, at(7, 14)),
            Arrived::Gap { after: 11 }
        );
        assert_eq!(follow.unwrap().last, 11, "a gap moves nothing");
        // A new epoch: the old history is gone, nothing to read back, but
        // the new one is read from its start.
        assert_eq!(
            Follow::arrived(&mut follow.clone(), at(8, 40)),
            Arrived::Gap { after: 0 }
        );
        assert_eq!(Follow::arrived(&mut follow, at(8, 1)), Arrived::Deliver);
        assert_eq!(
            follow.unwrap(),
            Follow {
                epoch: 8,
                last: 1,
                seeded: false
            }
        );
        // Seeded from the position at subscribe time: older ones still on
        // their way are delivered, the next one ends the seeding.
        let mut follow = Some(Follow {
            epoch: 8,
            last: 50,
            seeded: true,
        });
        assert_eq!(Follow::arrived(&mut follow, at(8, 49)), Arrived::Deliver);
        assert_eq!(Follow::arrived(&mut follow, at(8, 50)), Arrived::Deliver);
        assert_eq!(Follow::arrived(&mut follow, at(8, 51)), Arrived::Deliver);
        assert_eq!(Follow::arrived(&mut follow, at(8, 50)), Arrived::Duplicate);
        let mut follow = Some(Follow {
            epoch: 8,
            last: 50,
            seeded: true,
        });
        assert_eq!(
            Follow::arrived(&mut follow, at(8, 53)),
            Arrived::Gap { after: 50 }
        );
    }

    #[test]
    fn on_a_redis_cluster_what_one_script_touches_shares_a_slot() {
        let keys = Keys::tagged("fabric");
        let node = NodeId::new_random();
        let client = ClientId::new_random();
        let slot = |k: String| key_slot(k.as_bytes());
        let one = |names: Vec<String>| {
            let slots: HashSet<u16> = names.iter().map(|k| key_slot(k.as_bytes())).collect();
            assert_eq!(slots.len(), 1, "one slot for {names:?}");
        };
        one(vec![
            keys.node(node),
            keys.node_clients(node),
            keys.node_channels(node),
            keys.node_users(node),
            keys.node_channel(node),
        ]);
        one(vec![
            keys.session(client),
            keys.inbox(client),
            keys.client_nodes(client),
        ]);
        one(vec![
            keys.nodes(),
            keys.incarnation(),
            keys.broadcast_channel(),
        ]);
        // Channel names may hold braces: the tag still closes where ours
        // does, and names stay apart.
        for channel in ["chat", "a}b", "{x}", "50%", "%7D"] {
            one(vec![
                keys.history(channel),
                keys.history_meta(channel),
                keys.channel(channel),
                keys.channel_events(channel),
                keys.channel_members(channel, node),
            ]);
        }
        assert_ne!(keys.channel("a}b"), keys.channel("a%7Db"));
        assert_eq!(slot(keys.channel("a}b")), slot("{c:a%7Db}".into()));
        // The routing index spreads over every bucket.
        assert_eq!(keys.route_indexes().len(), usize::from(ROUTE_BUCKETS));
        assert!(keys.route_indexes().contains(&keys.client_nodes(client)));
        // On one Redis, the names are the plain ones CLUSTER.md lists.
        let plain = Keys::new("fabric");
        assert_eq!(plain.node(node), format!("fabric:node:{node}"));
        assert_eq!(plain.client_nodes(client), "fabric:client-nodes");
        assert_eq!(plain.history("c"), "fabric:hist:c");
        assert_eq!(
            plain.channel_members("c", node),
            format!("fabric:chan:c:node:{node}")
        );
        assert_eq!(plain.publish_command(), "PUBLISH");
        assert_eq!(keys.publish_command(), "SPUBLISH");
    }

    #[test]
    fn merged_messages_decode_as_the_messages_in_order() {
        let receipt = |outcome| BusMessage::Receipt {
            message_id: MessageId::new_random(),
            sender: ClientId::new_random(),
            to: ClientId::new_random(),
            outcome,
        };
        let messages = vec![
            receipt(DeliveryOutcome::Delivered),
            BusMessage::Kick {
                client: ClientId::new_random(),
                reason: "gone".into(),
            },
            receipt(DeliveryOutcome::UnknownClient),
        ];
        let payloads: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| encode_value(&Wire::Message(m.clone())).unwrap())
            .collect();
        assert!(payloads.iter().all(|p| is_message(p)));
        let merged = merge_messages(&payloads);
        assert_eq!(
            decode_value::<Wire>(&merged).unwrap(),
            Wire::Messages(messages.clone())
        );
        assert_eq!(merged, encode_value(&Wire::Messages(messages)).unwrap());
        // Other wires are never merged.
        let confirm = Wire::Confirm {
            from: NodeId::new_random(),
            epoch: 1,
            upto: 2,
        };
        assert!(!is_message(&encode_value(&confirm).unwrap()));
    }

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn a_changed_or_vanished_incarnation_means_redis_lost_its_data() {
        let now = Instant::now();
        let mut m = Membership::default();
        assert!(!m.note_incarnation(Some("a"), now, TTL), "first sight");
        assert!(!m.note_incarnation(Some("a"), now, TTL));
        assert!(!m.settling(now));
        assert!(m.note_incarnation(Some("b"), now, TTL), "changed");
        assert!(m.settling(now) && !m.settling(now + TTL));
        let mut m = Membership::default();
        m.note_incarnation(Some("a"), now, TTL);
        assert!(m.note_incarnation(None, now, TTL), "vanished");
        assert!(m.settling(now));
        // The marker that replaces it is not a second loss.
        assert!(!m.note_incarnation(Some("c"), now, TTL));
    }

    #[test]
    fn nodes_that_died_or_left_are_forgotten_but_not_while_settling() {
        let me = NodeId::new_random();
        let (a, b, c) = (
            NodeId::new_random(),
            NodeId::new_random(),
            NodeId::new_random(),
        );
        let now = Instant::now();
        let mut m = Membership::default();
        m.observe(me, &[me, a, b, c], &[], now, TTL);
        assert_eq!(m.recent(now, TTL).len(), 3, "this node is not counted");
        // a died (registered, no key), b left (gone from the node set).
        m.observe(me, &[me, c], &[a], now, TTL);
        assert_eq!(m.recent(now, TTL), vec![c]);

        // Redis lost its data: nobody is registered yet, nobody is forgotten.
        let mut m = Membership::default();
        m.note_incarnation(Some("x"), now, TTL);
        m.observe(me, &[me, a, b], &[], now, TTL);
        m.note_incarnation(Some("y"), now, TTL);
        m.observe(me, &[me], &[], now, TTL);
        let mut recent = m.recent(now, TTL);
        recent.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(recent, want);
        assert!(m.settling(now));
        // Once every node seen before came back, presence is complete again.
        m.observe(me, &[me, a, b], &[], now, TTL);
        assert!(!m.settling(now));
        // And one that never comes back is dead after its TTL.
        let later = now + TTL;
        assert!(m.recent(later, TTL).is_empty());
    }

    #[test]
    fn after_a_failover_nodes_whose_keys_expired_in_the_gap_are_not_dead_yet() {
        let me = NodeId::new_random();
        let (a, b) = (NodeId::new_random(), NodeId::new_random());
        let before = Instant::now();
        let mut m = Membership::default();
        m.observe(me, &[me, a, b], &[], before, TTL);
        // The gap outlasted the TTL: by the clock, nobody was seen recently.
        let now = before + TTL * 2;
        assert!(m.recent(now, TTL).is_empty());
        m.unsettle(now, TTL);
        assert!(m.settling(now));
        // Both keys expired on the promoted replica; a re-registered, b not yet.
        m.observe(me, &[me, a], &[b], now, TTL);
        let mut recent = m.recent(now, TTL);
        recent.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(recent, want, "b may be re-registering: not dead yet");
        assert!(m.settling(now));
        // b re-registers: presence is complete again.
        m.observe(me, &[me, a, b], &[], now, TTL);
        assert!(!m.settling(now));
        // Had b never come back, it would be dead once the TTL passed.
        let mut m = Membership::default();
        m.observe(me, &[me, a, b], &[], before, TTL);
        m.unsettle(now, TTL);
        m.observe(me, &[me, a], &[b], now, TTL);
        let later = now + TTL;
        m.observe(me, &[me, a], &[b], later, TTL);
        assert_eq!(m.recent(later, TTL), vec![a]);
        assert!(!m.settling(later));
    }
}
