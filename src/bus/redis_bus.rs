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

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{BusError, BusMessage, ClusterBus, PublishDone, Target, sort_and_cut};
use crate::client_manager::ClientManager;
use crate::protocol::codec::{decode_value, encode_value};
use crate::protocol::{ClientId, ClientInfo, NodeId, now_ms};
use crate::stats::Stats;

/// Most queued operations sent in one pipeline.
const MAX_BATCH: usize = 512;

/// Settings of a Redis bus.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// `redis://` or `rediss://` URL.
    pub url: String,
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
}

/// Key and channel names (see CLUSTER.md).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }
    /// SET of every node id that registered (live or not yet swept).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    /// STRING liveness key of a node, with TTL.
    pub fn node(&self, node: NodeId) -> String {
        format!("{}:node:{node}", self.prefix)
    }
    /// HASH client id → ClientInfo of a node's clients, with TTL.
    pub fn node_clients(&self, node: NodeId) -> String {
        format!("{}:node:{node}:clients", self.prefix)
    }
    /// HASH client id → node id of every client (routing index).
    pub fn client_nodes(&self) -> String {
        format!("{}:client-nodes", self.prefix)
    }
    /// Channel every node subscribes to for broadcasts.
    pub fn broadcast_channel(&self) -> String {
        format!("{}:ch:broadcast", self.prefix)
    }
    /// A node's own channel (direct messages and receipts).
    pub fn node_channel(&self, node: NodeId) -> String {
        format!("{}:ch:node:{node}", self.prefix)
    }
}

enum Op {
    Publish {
        channel: String,
        payload: Vec<u8>,
        done: Option<PublishDone>,
    },
    Join(ClientInfo, Option<oneshot::Sender<()>>),
    Leave(ClientId),
    Heartbeat,
    Shutdown(oneshot::Sender<()>),
}

struct Inner {
    config: RedisBusConfig,
    keys: Keys,
    client: redis::Client,
    conn: ConnectionManager,
    ops: mpsc::Sender<Op>,
    ops_rx: Mutex<Option<mpsc::Receiver<Op>>>,
    inbox: mpsc::Sender<BusMessage>,
    presence: Arc<ClientManager>,
    commands_ok: AtomicBool,
    subscribed: AtomicBool,
    needs_resync: AtomicBool,
    live: RwLock<HashSet<NodeId>>,
    dropped_inbound: AtomicU64,
    cancel: CancellationToken,
    stats: Arc<Stats>,
}

/// A node's connection to the Redis bus.
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

fn unavailable(err: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(err.to_string())
}

impl RedisBus {
    /// Prepares the bus without connecting (a node starts even while Redis
    /// is down); [`RedisBus::start`] begins connecting.
    pub fn new(
        config: RedisBusConfig,
        presence: Arc<ClientManager>,
        inbox: mpsc::Sender<BusMessage>,
        stats: Arc<Stats>,
    ) -> Result<Self, BusError> {
        let client = match &config.ca_pem {
            Some(ca) => redis::Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
            None => redis::Client::open(config.url.as_str()),
        }
        .map_err(|e| BusError::Unavailable(format!("invalid Redis URL or CA: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(unavailable)?;
        let (ops, ops_rx) = mpsc::channel(config.queue_len);
        Ok(RedisBus {
            inner: Arc::new(Inner {
                keys: Keys::new(&config.prefix),
                config,
                client,
                conn,
                ops,
                ops_rx: Mutex::new(Some(ops_rx)),
                inbox,
                presence,
                commands_ok: AtomicBool::new(false),
                subscribed: AtomicBool::new(false),
                needs_resync: AtomicBool::new(true),
                live: RwLock::new(HashSet::new()),
                dropped_inbound: AtomicU64::new(0),
                cancel: CancellationToken::new(),
                stats,
            }),
        })
    }

    /// Starts the writer, subscriber and heartbeat tasks.
    pub fn start(&self) {
        let Some(ops_rx) = self
            .inner
            .ops_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        info!(url = %redacted(&self.inner.config.url), prefix = %self.inner.config.prefix, "joining cluster through Redis");
        tokio::spawn(writer(self.inner.clone(), ops_rx));
        tokio::spawn(subscriber(self.inner.clone()));
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

    /// Messages from Redis dropped because this node's inbox was full.
    pub fn dropped_inbound(&self) -> u64 {
        self.inner.dropped_inbound.load(Ordering::Relaxed)
    }

    /// The key and channel names in use.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    fn enqueue(&self, op: Op) {
        match self.inner.ops.try_send(op) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op)) => {
                match op {
                    Op::Publish {
                        done: Some(done), ..
                    } => done(Err(BusError::Backlog)),
                    Op::Join(..) | Op::Leave(_) => {
                        // Presence will be rewritten in full once the queue drains.
                        self.inner.needs_resync.store(true, Ordering::Release);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The URL without its password, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl ClusterBus for RedisBus {
    fn available(&self) -> bool {
        self.inner.commands_ok.load(Ordering::Acquire)
            && self.inner.subscribed.load(Ordering::Acquire)
    }

    fn clustered(&self) -> bool {
        true
    }

    async fn client_joined(&self, info: &ClientInfo) {
        if !self.available() {
            // Registered by the resync once Redis is back.
            self.enqueue(Op::Join(info.clone(), None));
            return;
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(Op::Join(info.clone(), Some(tx)));
        let _ = tokio::time::timeout(self.inner.config.response_timeout * 2, rx).await;
    }

    fn client_left(&self, id: ClientId) {
        self.enqueue(Op::Leave(id));
    }

    async fn locate(&self, id: ClientId) -> Result<Option<NodeId>, BusError> {
        let mut conn = self.inner.conn.clone();
        let node: Option<String> = redis::cmd("HGET")
            .arg(self.inner.keys.client_nodes())
            .arg(id.to_string())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(node) = node.and_then(|n| n.parse::<NodeId>().ok()) else {
            return Ok(None);
        };
        if self
            .inner
            .live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&node)
        {
            return Ok(Some(node));
        }
        // Not in the cache of live nodes: it may have joined since the last
        // heartbeat, or be dead. Ask its liveness key.
        let alive: bool = redis::cmd("EXISTS")
            .arg(self.inner.keys.node(node))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if alive {
            self.inner
                .live
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(node);
        }
        Ok(alive.then_some(node))
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
        let channel = match target {
            Target::AllNodes => self.inner.keys.broadcast_channel(),
            Target::Node(node) => self.inner.keys.node_channel(node),
        };
        match encode_value(&message) {
            Ok(payload) => self.enqueue(Op::Publish {
                channel,
                payload,
                done,
            }),
            Err(err) => {
                if let Some(done) = done {
                    done(Err(BusError::Unavailable(err.to_string())));
                }
            }
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
}

/// Reads the node set and tells live nodes (liveness key present) from dead ones.
async fn query_live_nodes(
    keys: &Keys,
    conn: &mut ConnectionManager,
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
    let mut conn = inner.conn.clone();
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
                    flush(&inner, &mut conn, std::mem::take(&mut writes)).await;
                    remove_self(&inner, &mut conn).await;
                    let _ = done.send(());
                    return;
                }
                write => writes.push(write),
            }
        }
        flush(&inner, &mut conn, writes).await;
    }
}

/// Sends a batch of publishes and presence changes as one pipeline.
async fn flush(inner: &Inner, conn: &mut ConnectionManager, ops: Vec<Op>) {
    if ops.is_empty() {
        return;
    }
    let keys = &inner.keys;
    let node = inner.config.node_id.to_string();
    let mut pipe = redis::pipe();
    let mut dones = Vec::new();
    let mut registrations: Vec<oneshot::Sender<()>> = Vec::new();
    for op in ops {
        match op {
            Op::Publish {
                channel,
                payload,
                done,
            } => {
                pipe.cmd("PUBLISH").arg(channel).arg(payload);
                dones.push(done);
            }
            Op::Join(info, registered) => match encode_value(&info) {
                Ok(value) => {
                    let id = info.client_id.to_string();
                    pipe.cmd("HSET")
                        .arg(keys.node_clients(inner.config.node_id))
                        .arg(&id)
                        .arg(value)
                        .ignore();
                    pipe.cmd("HSET")
                        .arg(keys.client_nodes())
                        .arg(&id)
                        .arg(&node)
                        .ignore();
                    registrations.extend(registered);
                }
                Err(err) => warn!(%err, "cannot encode presence"),
            },
            Op::Leave(id) => {
                let id = id.to_string();
                pipe.cmd("HDEL")
                    .arg(keys.node_clients(inner.config.node_id))
                    .arg(&id)
                    .ignore();
                pipe.cmd("HDEL").arg(keys.client_nodes()).arg(&id).ignore();
            }
            Op::Heartbeat | Op::Shutdown(_) => unreachable!("handled by the writer"),
        }
    }
    let publishes = dones.len() as u64;
    let started = std::time::Instant::now();
    let result = pipe.query_async::<Vec<i64>>(conn).await;
    inner
        .stats
        .redis_command
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(counts) => {
            crate::stats::add(&inner.stats.pubsub_out, publishes);
            for registered in registrations {
                let _ = registered.send(());
            }
            for (done, count) in dones
                .into_iter()
                .zip(counts.into_iter().chain(std::iter::repeat(0)))
            {
                if let Some(done) = done {
                    done(Ok(usize::try_from(count).unwrap_or(0)));
                }
            }
        }
        Err(err) => {
            set_commands_ok(inner, false, &err.to_string());
            inner.needs_resync.store(true, Ordering::Release);
            let err = unavailable(&err);
            for done in dones.into_iter().flatten() {
                done(Err(err.clone()));
            }
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

/// Refreshes liveness, learns which nodes are alive, sweeps dead ones, and
/// re-registers local presence when Redis lost it (outage, restart, expiry).
async fn heartbeat(inner: &Inner, conn: &mut ConnectionManager) {
    let keys = &inner.keys;
    let me = inner.config.node_id;
    let ttl_ms = inner.config.node_ttl.as_millis() as u64;
    let record = format!("{}|{}", inner.config.node_name, now_ms());
    let started = std::time::Instant::now();
    let result: redis::RedisResult<(Option<String>, i64, i64)> = redis::pipe()
        .cmd("SET")
        .arg(keys.node(me))
        .arg(&record)
        .arg("PX")
        .arg(ttl_ms)
        .arg("GET")
        .cmd("SADD")
        .arg(keys.nodes())
        .arg(me.to_string())
        .cmd("PEXPIRE")
        .arg(keys.node_clients(me))
        .arg(ttl_ms)
        .query_async(conn)
        .await;
    inner
        .stats
        .redis_command
        .observe(started.elapsed().as_secs_f64());
    let previous = match result {
        Ok((previous, _, _)) => previous,
        Err(err) => {
            set_commands_ok(inner, false, &err.to_string());
            inner.needs_resync.store(true, Ordering::Release);
            return;
        }
    };
    if previous.is_none() {
        // Our liveness key was gone: first start, Redis restarted or lost
        // data, or we were silent past the TTL. Presence must be rewritten.
        inner.needs_resync.store(true, Ordering::Release);
    }
    if inner.needs_resync.swap(false, Ordering::AcqRel)
        && let Err(err) = resync(inner, conn).await
    {
        inner.needs_resync.store(true, Ordering::Release);
        set_commands_ok(inner, false, &err.to_string());
        return;
    }
    match query_live_nodes(keys, conn).await {
        Ok((live, dead)) => {
            *inner.live.write().unwrap_or_else(|e| e.into_inner()) = live.into_iter().collect();
            for node in dead {
                if let Err(err) = sweep(inner, conn, node).await {
                    debug!(%err, %node, "sweep of dead node failed; will retry");
                }
            }
            set_commands_ok(inner, true, "");
        }
        Err(err) => set_commands_ok(inner, false, &err.to_string()),
    }
}

/// Writes every local client into Redis again.
async fn resync(inner: &Inner, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
    let keys = &inner.keys;
    let me = inner.config.node_id;
    let clients: Vec<ClientInfo> = inner
        .presence
        .all()
        .iter()
        .map(|c| c.info.clone())
        .collect();
    let mut pipe = redis::pipe();
    pipe.cmd("DEL").arg(keys.node_clients(me)).ignore();
    for chunk in clients.chunks(1000) {
        let mut infos = redis::cmd("HSET");
        infos.arg(keys.node_clients(me));
        let mut index = redis::cmd("HSET");
        index.arg(keys.client_nodes());
        for info in chunk {
            let Ok(value) = encode_value(info) else {
                continue;
            };
            infos.arg(info.client_id.to_string()).arg(value);
            index.arg(info.client_id.to_string()).arg(me.to_string());
        }
        pipe.add_command(infos).ignore();
        pipe.add_command(index).ignore();
    }
    pipe.cmd("PEXPIRE")
        .arg(keys.node_clients(me))
        .arg(inner.config.node_ttl.as_millis() as u64)
        .ignore();
    pipe.query_async::<()>(conn).await?;
    info!(clients = clients.len(), "registered local clients in Redis");
    Ok(())
}

/// Forgets a dead node: its routing index entries and its node-set entry.
/// Its presence hash and liveness key have already expired by TTL.
async fn sweep(
    inner: &Inner,
    conn: &mut ConnectionManager,
    dead: NodeId,
) -> redis::RedisResult<()> {
    let keys = &inner.keys;
    let dead_str = dead.to_string();
    let mut cursor: u64 = 0;
    loop {
        let (next, entries): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(keys.client_nodes())
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        let stale: Vec<&String> = entries
            .iter()
            .filter(|(_, n)| *n == dead_str)
            .map(|(c, _)| c)
            .collect();
        if !stale.is_empty() {
            redis::cmd("HDEL")
                .arg(keys.client_nodes())
                .arg(stale)
                .query_async::<()>(conn)
                .await?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    redis::cmd("SREM")
        .arg(keys.nodes())
        .arg(&dead_str)
        .query_async::<()>(conn)
        .await?;
    info!(node = %dead, "removed dead node from the cluster");
    Ok(())
}

/// Graceful leave: remove liveness, presence and index entries at once.
async fn remove_self(inner: &Inner, conn: &mut ConnectionManager) {
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
    pipe.cmd("SREM")
        .arg(keys.nodes())
        .arg(me.to_string())
        .ignore();
    if !ids.is_empty() {
        pipe.cmd("HDEL").arg(keys.client_nodes()).arg(ids).ignore();
    }
    match pipe.query_async::<()>(conn).await {
        Ok(()) => info!("left the cluster"),
        Err(err) => warn!(%err, "cannot remove presence from Redis; it expires with the node TTL"),
    }
}

/// Keeps a subscription to the broadcast channel and this node's channel,
/// reconnecting with backoff for as long as the node runs.
async fn subscriber(inner: Arc<Inner>) {
    let channels = [
        inner.keys.broadcast_channel(),
        inner.keys.node_channel(inner.config.node_id),
    ];
    let mut backoff = Duration::from_millis(100);
    let mut failures: u64 = 0;
    loop {
        let connect = async {
            let mut pubsub = inner.client.get_async_pubsub().await?;
            for channel in &channels {
                pubsub.subscribe(channel).await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout(inner.config.connect_timeout + inner.config.response_timeout, connect) => r,
            _ = inner.cancel.cancelled() => return,
        };
        match attempt {
            Ok(Ok(pubsub)) => {
                failures = 0;
                backoff = Duration::from_millis(100);
                inner.subscribed.store(true, Ordering::Release);
                info!("subscribed to cluster channels");
                // Re-register at once rather than at the next tick.
                let _ = inner.ops.try_send(Op::Heartbeat);
                let end = receive(&inner, pubsub).await;
                inner.subscribed.store(false, Ordering::Release);
                if inner.cancel.is_cancelled() {
                    return;
                }
                warn!(reason = %end, "cluster subscription lost; reconnecting");
            }
            Ok(Err(err)) => log_failure(&mut failures, &err.to_string()),
            Err(_) => log_failure(&mut failures, "timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = inner.cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
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

/// Dispatches subscribed messages until the connection ends; a periodic PING
/// detects a silently dead connection.
async fn receive(inner: &Inner, pubsub: redis::aio::PubSub) -> String {
    let (mut sink, mut stream) = pubsub.split();
    let me = inner.config.node_id;
    let mut ping = tokio::time::interval(inner.config.heartbeat_interval);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return "connection closed".into() };
                crate::stats::add(&inner.stats.pubsub_in, 1);
                let message = match decode_value::<BusMessage>(msg.get_payload_bytes()) {
                    Ok(m) => m,
                    Err(err) => {
                        warn!(%err, channel = msg.get_channel_name(), "undecodable cluster message dropped");
                        continue;
                    }
                };
                if matches!(&message, BusMessage::Broadcast { origin, .. } if *origin == me) {
                    continue;
                }
                if inner.inbox.try_send(message).is_err() {
                    let n = inner.dropped_inbound.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == 1 || n.is_multiple_of(1000) {
                        warn!(dropped = n, "node inbox full: cluster messages dropped");
                    }
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
