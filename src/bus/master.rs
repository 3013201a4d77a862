//! Where the Redis bus finds its server: one fixed address, or the master a
//! set of Redis Sentinels names, followed through failovers.
//!
//! The bus talks to Redis through a [`Commands`] handle. Every request
//! takes the connection of the *current* master at the moment it is sent,
//! so a handle held for the life of a task (the writer's, the heartbeat's)
//! follows a failover without being replaced. With Sentinel, a follower
//! task asks the sentinels which server is master: at start, whenever a
//! command fails in a way a failover explains (connection lost, `READONLY`
//! from a demoted master), on every `+switch-master` the sentinels
//! announce, and when a periodic question to one sentinel names another
//! server. When the answer changes it
//! swaps the connection, bumps the generation (the subscription watches it
//! and moves to the new master) and tells the bus to rewrite its presence,
//! since a promoted replica may lack the last writes of the old master.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Where the bus's Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server: a `redis://` or `rediss://` URL.
    Url(String),
    /// Whichever server these sentinels (`redis://host:port` URLs; user
    /// and password, when given, are used for the sentinels and for the
    /// master) name as master of `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// A Redis Cluster reached through these seed nodes (`redis://host:port`
    /// URLs; user and password, when given, are used for every node).
    Cluster { seeds: Vec<String> },
}

impl RedisTarget {
    /// For logs: no passwords.
    pub fn describe(&self) -> String {
        match self {
            RedisTarget::Url(url) => redacted(url),
            RedisTarget::Sentinel { sentinels, master } => format!(
                "master {master:?} of sentinels {}",
                sentinels
                    .iter()
                    .map(|s| redacted(s))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            RedisTarget::Cluster { seeds } => format!(
                "Redis Cluster through {}",
                seeds
                    .iter()
                    .map(|s| redacted(s))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// The server commands go to now.
struct Current {
    client: redis::Client,
    conn: ConnectionManager,
    /// `host:port`, to tell a new master from the same one.
    addr: String,
}

/// What [`Master::follow`] tells the bus, before commands go to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The sentinels named a master for the first time.
    Found,
    /// They named another server than before: a failover.
    Switched,
}

/// The sentinels, asked as a set (redis-rs) and one by one (the watch
/// and the periodic check).
struct Sentinels {
    set: tokio::sync::Mutex<SentinelClient>,
    each: Vec<redis::Client>,
    /// The master's name.
    name: String,
}

/// A kept connection to one sentinel, for the periodic check.
#[derive(Default)]
struct Probe {
    /// Which of [`Sentinels::each`], and the connection (none after a failure).
    at: usize,
    conn: Option<redis::aio::MultiplexedConnection>,
}

impl Probe {
    /// Whether a sentinel still names `addr` (`host:port`) as the master;
    /// false when it names another, or cannot be asked (then the next
    /// sentinel is asked next time).
    async fn still_names(&mut self, sentinels: &Sentinels, addr: &Option<String>) -> bool {
        let Some(addr) = addr else {
            return false;
        };
        let ask = async {
            let conn = match &mut self.conn {
                Some(conn) => conn,
                None => self.conn.insert(
                    sentinels.each[self.at]
                        .get_multiplexed_async_connection()
                        .await?,
                ),
            };
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&sentinels.name)
                .query_async::<Option<(String, u16)>>(conn)
                .await
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, ask).await {
            Ok(Ok(Some((host, port)))) => format!("{host}:{port}") == *addr,
            Ok(Ok(None)) => false,
            Ok(Err(_)) | Err(_) => {
                self.conn = None;
                self.at = (self.at + 1) % sentinels.each.len();
                false
            }
        }
    }
}

/// How long after a lookup that found nothing new a failing command may
/// trigger the next one: from this, doubling up to [`CALMEST`] while the
/// answer stays the same (each lookup costs the sentinels a query and the
/// named master a connection).
const CALM: Duration = Duration::from_millis(100);
const CALMEST: Duration = Duration::from_secs(2);
/// How often a sentinel is asked whether the master is still the same
/// (and how often the `+switch-master` watch PINGs its sentinel).
const POLL: Duration = Duration::from_secs(5);
/// Bound on one lookup, and on a sentinel's answer to a PING.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis Cluster: commands go through redis-rs's cluster connection
/// (routing by slot, MOVED/ASK, reconnects, slot-map refreshes); the
/// bus's sharded subscriptions use connections of their own, one per
/// master, made from `shard_info`.
struct ClusterTarget {
    /// For reads and idempotent commands: redis-rs retries them (twice,
    /// shortly) after a redirect or a lost connection.
    conn: ClusterConnection,
    /// For the writer's pipelines: no retries, since redis-rs resends a
    /// whole pipeline when one reply asks for it (or the reply timed out),
    /// which would publish or append what already ran a second time. A
    /// redirect or timeout fails the ops it carried instead, visibly.
    writes: ClusterConnection,
    /// The first seed's settings (user, password, database), RESP3: an
    /// address is put in for each master.
    shard_info: redis::ConnectionInfo,
    /// The slot map as last read (`cluster_slots`), to send each master
    /// one pipeline per flush.
    slots: Mutex<Vec<(u16, u16, String)>>,
}

/// The bus's view of its Redis server.
pub struct Master {
    manager_config: ConnectionManagerConfig,
    sentinels: Option<Sentinels>,
    cluster: Option<ClusterTarget>,
    describe: String,
    current: Mutex<Option<Arc<Current>>>,
    /// Bumped when commands move to another server.
    generation: watch::Sender<u64>,
    /// A command failed in a way a failover would explain.
    suspect: Notify,
}

impl Master {
    /// Commands go to `target`; nothing connects before [`Master::follow`]
    /// (Sentinel) or the first command (a fixed URL).
    pub fn new(
        target: &RedisTarget,
        ca_pem: Option<&[u8]>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Master, String> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let mut cluster = None;
        let (current, sentinels) = match target {
            RedisTarget::Url(url) => {
                let client = match ca_pem {
                    Some(ca) => redis::Client::build_with_tls(
                        url.as_str(),
                        redis::TlsCertificates {
                            client_tls: None,
                            root_cert: Some(ca.to_vec()),
                        },
                    ),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(|e| format!("invalid Redis URL or CA: {e}"))?;
                let conn =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                        .map_err(|e| e.to_string())?;
                let addr = client.get_connection_info().addr().to_string();
                (Some(Arc::new(Current { client, conn, addr })), None)
            }
            RedisTarget::Sentinel { sentinels, master } => {
                if ca_pem.is_some() {
                    return Err(
                        "redis_ca is for rediss://, which Sentinel mode does not support".into(),
                    );
                }
                (None, Some(sentinel_set(sentinels, master)?))
            }
            RedisTarget::Cluster { seeds } => {
                if ca_pem.is_some() {
                    return Err(
                        "redis_ca is for rediss://, which Redis Cluster mode does not support"
                            .into(),
                    );
                }
                cluster = Some(cluster_target(seeds, connect_timeout, response_timeout)?);
                (None, None)
            }
        };
        Ok(Master {
            manager_config,
            sentinels,
            cluster,
            describe: target.describe(),
            current: Mutex::new(current),
            generation: watch::Sender::new(0),
            suspect: Notify::new(),
        })
    }

    /// For logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Whether the master is looked up (Sentinel), rather than fixed.
    pub fn is_followed(&self) -> bool {
        self.sentinels.is_some()
    }

    /// Whether the bus is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// The masters of a Redis Cluster and the slots each serves, as
    /// `CLUSTER SLOTS` tells now: `(first slot, last slot, "host:port")`.
    pub async fn cluster_slots(&self) -> Result<Vec<(u16, u16, String)>, RedisError> {
        let Some(cluster) = &self.cluster else {
            return Ok(Vec::new());
        };
        let mut conn = cluster.conn.clone();
        let reply = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let ranges: Vec<(u16, u16, (String, u16))> =
            redis::FromRedisValue::from_redis_value(match reply {
                // Each range: first, last, [host, port, id, ...], replicas...:
                // keep the first three fields.
                Value::Array(ranges) => Value::Array(
                    ranges
                        .into_iter()
                        .map(|r| match r {
                            Value::Array(mut fields) => {
                                fields.truncate(3);
                                if let Some(Value::Array(master)) = fields.get_mut(2) {
                                    master.truncate(2);
                                }
                                Value::Array(fields)
                            }
                            other => other,
                        })
                        .collect(),
                ),
                other => other,
            })?;
        let mut slots: Vec<(u16, u16, String)> = ranges
            .into_iter()
            .map(|(first, last, (host, port))| (first, last, format!("{host}:{port}")))
            .collect();
        slots.sort();
        *cluster.slots.lock().unwrap_or_else(|e| e.into_inner()) = slots.clone();
        Ok(slots)
    }

    /// A connection to one master of a Redis Cluster (`host:port`), RESP3,
    /// for sharded subscriptions: its pushes go to `pushes`.
    pub async fn shard_connection(
        &self,
        addr: &str,
        pushes: impl redis::aio::AsyncPushSender,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<redis::aio::MultiplexedConnection, RedisError> {
        let Some(cluster) = &self.cluster else {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "not a Redis Cluster",
            )));
        };
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| {
                RedisError::from((
                    redis::ErrorKind::Client,
                    "bad cluster node address",
                    addr.to_owned(),
                ))
            })?;
        let info = cluster
            .shard_info
            .clone()
            .set_addr(redis::ConnectionAddr::Tcp(host, port));
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_push_sender(pushes);
        redis::Client::open(info)?
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// A handle for commands, following the master.
    pub fn commands(self: &Arc<Self>) -> Commands {
        Commands {
            master: self.clone(),
            writer: false,
        }
    }

    /// A handle for the writer's commands: like [`Master::commands`], but
    /// on a Redis Cluster never retried by redis-rs (a retried pipeline
    /// would publish twice what already ran).
    pub fn write_commands(self: &Arc<Self>) -> Commands {
        Commands {
            master: self.clone(),
            writer: true,
        }
    }

    /// A client for the current master (for a subscription connection).
    pub fn client(&self) -> Result<redis::Client, RedisError> {
        self.now().map(|c| c.client.clone())
    }

    /// Changes with every move to another server (0: none known yet).
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn now(&self) -> Result<Arc<Current>, RedisError> {
        if self.cluster.is_some() {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "a Redis Cluster has no single master",
            )));
        }
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                RedisError::from((
                    redis::ErrorKind::Io,
                    "no Redis master yet",
                    format!("the sentinels have not named a master ({})", self.describe),
                ))
            })
    }

    /// Notes a failure that a failover would explain.
    fn suspected(&self, err: &RedisError) {
        if self.sentinels.is_none() {
            return;
        }
        let demoted = |err: &RedisError| err.code() == Some("READONLY");
        // A MULTI whose writes a demoted master refused fails as EXECABORT.
        let aborted = || {
            err.clone()
                .into_server_errors()
                .is_some_and(|errs| errs.iter().any(|(_, e)| e.code() == "READONLY"))
        };
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || demoted(err)
            || aborted()
        {
            self.suspect.notify_one();
        }
    }

    /// With Sentinel: finds the master and keeps following it, until
    /// `cancel`; `moved` is told when the master is found and at every
    /// change to another server, before commands go there. Returns at once
    /// for a fixed URL.
    pub async fn follow(self: Arc<Self>, cancel: CancellationToken, moved: impl Fn(Moved) + Send) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        tokio::spawn(watch_switches(self.clone(), cancel.clone()));
        let mut failures = 0u64;
        let mut calm = CALM;
        let mut probe = Probe::default();
        let mut look = true;
        loop {
            if !look {
                // The periodic check: one question to one sentinel on a
                // kept connection; the full lookup only if the answer moved.
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {
                        look = !probe.still_names(sentinels, &self.addr()).await;
                        continue;
                    }
                    _ = self.calmed(&mut calm) => {}
                    _ = cancel.cancelled() => return,
                }
            }
            // Until a lookup succeeds, the next comes after a short wait.
            look = true;
            let lookup = async {
                let mut set = sentinels.set.lock().await;
                tokio::time::timeout(LOOKUP_TIMEOUT, set.async_get_client()).await
            };
            let found = tokio::select! {
                found = lookup => found,
                _ = cancel.cancelled() => return,
            };
            let wait = match found {
                Ok(Ok(client)) => {
                    failures = 0;
                    if self.adopt(client, &moved) {
                        calm = CALM;
                    }
                    look = false;
                    continue;
                }
                Ok(Err(err)) => {
                    self.failed(&mut failures, &err.to_string());
                    Duration::from_millis(250)
                }
                Err(_) => {
                    self.failed(&mut failures, "the sentinels did not answer in time");
                    Duration::from_millis(250)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.calmed(&mut calm) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Waits for a suspicious failure, then `calm` (failing commands come
    /// in bursts: one lookup, and fewer while the answer stays the same).
    async fn calmed(&self, calm: &mut Duration) {
        self.suspect.notified().await;
        tokio::time::sleep(*calm).await;
        *calm = (*calm * 2).min(CALMEST);
    }

    /// The current master's `host:port`, if any.
    fn addr(&self) -> Option<String> {
        self.now().ok().map(|c| c.addr.clone())
    }

    fn failed(&self, failures: &mut u64, why: &str) {
        *failures += 1;
        if *failures == 1 || failures.is_multiple_of(40) {
            warn!(
                error = why,
                attempts = *failures,
                sentinels = %self.describe,
                "cannot learn the Redis master from the sentinels"
            );
        } else {
            debug!(error = why, "sentinel lookup failed");
        }
    }

    /// Makes `client` the master if it is another server than the current
    /// one (telling `moved` first); whether it was.
    fn adopt(&self, client: redis::Client, moved: &impl Fn(Moved)) -> bool {
        let addr = client.get_connection_info().addr().to_string();
        let old = match &*self.current.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(current) if current.addr == addr => return false,
            current => current.as_ref().map(|c| c.addr.clone()),
        };
        let conn = match ConnectionManager::new_lazy_with_config(
            client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(conn) => conn,
            Err(err) => {
                warn!(%err, %addr, "cannot use the master the sentinels named");
                return false;
            }
        };
        // The bus counts presence as incomplete before any command reaches
        // the new master, where liveness keys may have expired in the gap.
        moved(if old.is_some() {
            Moved::Switched
        } else {
            Moved::Found
        });
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Current {
            client,
            conn,
            addr: addr.clone(),
        }));
        match old {
            Some(old) => warn!(
                from = %old,
                to = %addr,
                "Redis master changed (Sentinel failover); moving commands and subscriptions, rewriting presence"
            ),
            None => info!(%addr, "Redis master found through Sentinel"),
        }
        self.generation.send_modify(|g| *g += 1);
        true
    }
}

/// The sentinels of `urls`, for master `name`. Their user and password
/// (one pair for all) and database number also go to the master.
impl ClusterTarget {
    fn conn(&self, writer: bool) -> ClusterConnection {
        if writer {
            self.writes.clone()
        } else {
            self.conn.clone()
        }
    }
}

/// The cluster connection for `seeds` (connecting in the background: a
/// node starts while Redis is down), with the bus's timeouts and few,
/// short retries: a command the cluster cannot serve fails fast, as on
/// one Redis, rather than after redis-rs's default 16 retries.
fn cluster_target(
    seeds: &[String],
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<ClusterTarget, String> {
    if seeds.is_empty() {
        return Err("redis_cluster needs at least one seed URL".into());
    }
    let mut infos = Vec::new();
    for url in seeds {
        if !url.starts_with("redis://") {
            return Err(format!(
                "Redis Cluster seed {} must be a redis:// URL (TLS to a cluster is not supported)",
                redacted(url)
            ));
        }
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("invalid Redis Cluster seed {}: {e}", redacted(url)))?;
        if !url
            .trim_end_matches('/')
            .rsplit(':')
            .next()
            .is_some_and(|p| {
                p.split('/')
                    .next()
                    .is_some_and(|p| p.parse::<u16>().is_ok())
            })
        {
            return Err(format!(
                "Redis Cluster seed {} must name its port",
                redacted(url)
            ));
        }
        infos.push(info);
    }
    let first = infos[0].redis_settings().clone();
    if infos.iter().any(|i| {
        let r = i.redis_settings();
        r.username() != first.username() || r.password() != first.password()
    }) {
        return Err("every Redis Cluster seed URL must carry the same user and password".into());
    }
    let connect = |retries: u32| {
        let client = ClusterClientBuilder::new(infos.clone())
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(retries)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(|e| format!("invalid Redis Cluster seeds: {e}"))?;
        let config = ClusterConfig::new()
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(response_timeout);
        Ok::<_, String>(client.get_pending_async_connection_with_config(config))
    };
    let conn = connect(2)?;
    let writes = connect(0)?;
    let shard_info = infos[0]
        .clone()
        .set_redis_settings(first.set_protocol(redis::ProtocolVersion::RESP3));
    Ok(ClusterTarget {
        conn,
        writes,
        shard_info,
        slots: Mutex::new(Vec::new()),
    })
}

/// The Redis Cluster slot of a key or shard channel (CRC16 of its hash
/// tag, or of the whole name without one, modulo 16384).
pub fn key_slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|b| *b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(key)) % 16384
}

/// The key a command is routed by in a Redis Cluster, for the commands the
/// bus sends (`None`: keyless, like `SCRIPT LOAD`).
fn routing_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(a) => Some(a),
            _ => None,
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" => {
            let keys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            (keys > 0).then(|| args.get(3).map(|k| k.to_vec()))?
        }
        b"SCRIPT" | b"PING" | b"INFO" | b"WAIT" | b"CLUSTER" => None,
        _ => args.get(1).map(|k| k.to_vec()),
    }
}

/// Where a group of a cluster pipeline goes: a master by address (from
/// the slot map last read), or, for a slot the map does not know, the
/// slot's master as redis-rs routes it.
#[derive(PartialEq, Eq)]
enum Group {
    Master(String),
    Slot(Slot),
}

/// Runs a (non-atomic) pipeline on a Redis Cluster: its commands grouped by
/// the master that serves their slot (`slots`, the map last read), each
/// group one pipeline to that master (so the commands of one master, and
/// so of one key or channel, keep their order), the groups at once; the
/// replies put back in the pipeline's order. A map gone stale meanwhile
/// shows as `MOVED` replies: on the writer's connection (no retries) they
/// fail those commands, visibly. `SCRIPT LOAD` goes at the head of every
/// group that runs a script, since a script cache is per server; other
/// keyless commands are refused. A group that fails gives each of its
/// commands an error reply (`UNAVAILABLE …`), so that the others' replies
/// stand: a caller reading replies one by one fails only what that group
/// carried.
async fn cluster_pipeline(
    conn: &ClusterConnection,
    pipeline: &Pipeline,
    slots: &[(u16, u16, String)],
) -> Result<Replies, RedisError> {
    let cmds: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut keyless = Vec::new();
    let mut groups: Vec<(Group, Vec<usize>)> = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        match routing_key(cmd) {
            None if is_script_load(cmd) => keyless.push(i),
            None => {
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "a keyless command cannot go in a Redis Cluster pipeline",
                )));
            }
            Some(key) => {
                let slot = key_slot(&key);
                let group = slots
                    .iter()
                    .find(|(first, last, _)| (*first..=*last).contains(&slot))
                    .map(|(_, _, addr)| Group::Master(addr.clone()))
                    .unwrap_or_else(|| Group::Slot(Slot::for_key(&key)));
                match groups.iter_mut().find(|(g, _)| *g == group) {
                    Some((_, members)) => members.push(i),
                    None => groups.push((group, vec![i])),
                }
            }
        }
    }
    let runs_script = |members: &[usize]| {
        members.iter().any(|i| {
            matches!(cmds[*i].args_iter().next(), Some(redis::Arg::Simple(n)) if n.eq_ignore_ascii_case(b"EVALSHA"))
        })
    };
    let sends = groups.iter().map(|(group, members)| {
        let mut pipe = redis::pipe();
        let lead: &[usize] = if runs_script(members) { &keyless } else { &[] };
        for i in lead.iter().chain(members) {
            pipe.add_command(cmds[*i].clone());
        }
        let mut conn = conn.clone();
        let count = pipe.len();
        let master = match group {
            Group::Master(addr) => addr
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_owned(), port.parse::<u16>().ok()?))),
            Group::Slot(_) => None,
        };
        async move {
            let values = match master {
                Some((host, port)) => {
                    let route = SingleNodeRoutingInfo::ByAddress { host, port };
                    conn.route_pipeline(pipe, 0, count, route).await?
                }
                None => conn.req_packed_commands(&pipe, 0, count).await?,
            };
            Ok::<_, RedisError>((lead.len(), values))
        }
    });
    let results = futures_util::future::join_all(sends).await;
    let mut replies: Vec<Option<Value>> = vec![None; cmds.len()];
    let mut failures = 0;
    let mut first_failure = None;
    let mut stale = false;
    for ((group, members), result) in groups.iter().zip(results) {
        let (lead, values) = match result {
            Ok(done) => done,
            Err(err) => {
                failures += 1;
                stale |= matches!(group, Group::Master(_));
                let reply = failed_reply(&err);
                for i in members {
                    replies[*i] = Some(reply.clone());
                }
                first_failure.get_or_insert(err);
                continue;
            }
        };
        stale |= values.iter().any(
            |v| matches!(v, Value::ServerError(e) if matches!(e.code(), "MOVED" | "ASK" | "READONLY")),
        );
        let mut values = values.into_iter();
        for i in keyless.iter().take(lead) {
            let value = values.next();
            if replies[*i].is_none() {
                replies[*i] = value;
            }
        }
        for i in members {
            replies[*i] = values.next();
        }
    }
    // Nothing went through: the caller gets the error itself.
    if let Some(err) = first_failure
        && failures == groups.len()
    {
        return Err(err);
    }
    Ok(Replies {
        values: replies
            .into_iter()
            .map(|v| v.unwrap_or(Value::Okay))
            .collect(),
        stale,
    })
}

/// A cluster pipeline's replies, and whether they showed the slot map
/// used to route it stale (a master lost, or a redirect).
struct Replies {
    values: Vec<Value>,
    stale: bool,
}

fn is_script_load(cmd: &Cmd) -> bool {
    let mut args = cmd.args_iter();
    matches!(
        (args.next(), args.next()),
        (Some(redis::Arg::Simple(a)), Some(redis::Arg::Simple(b)))
            if a.eq_ignore_ascii_case(b"SCRIPT") && b.eq_ignore_ascii_case(b"LOAD")
    )
}

/// The reply that stands for a command whose slot's pipeline failed: an
/// error value, as Redis would send one.
fn failed_reply(err: &RedisError) -> Value {
    let why: String = err
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    redis::parse_redis_value(format!("-UNAVAILABLE {why}\r\n").as_bytes()).unwrap_or(Value::Nil)
}

fn sentinel_set(urls: &[String], name: &str) -> Result<Sentinels, String> {
    let mut addrs = Vec::new();
    let mut each = Vec::new();
    let mut shared: Option<(Option<String>, Option<String>, i64)> = None;
    for url in urls {
        let invalid = |why: &str| format!("sentinel URL {}: {why}", redacted(url));
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| invalid(&e.to_string()))?;
        let redis::ConnectionAddr::Tcp(_, port) = info.addr() else {
            return Err(invalid(
                "only redis:// (TCP without TLS) is supported with Sentinel",
            ));
        };
        if !url.contains(&format!(":{port}")) {
            return Err(invalid("give the sentinel's port (usually 26379)"));
        }
        let settings = info.redis_settings();
        let these = (
            settings.username().map(str::to_owned),
            settings.password().map(str::to_owned),
            settings.db(),
        );
        if shared.get_or_insert_with(|| these.clone()) != &these {
            return Err(invalid(
                "every sentinel URL must carry the same user, password and database",
            ));
        }
        each.push(redis::Client::open(info.clone()).map_err(|e| invalid(&e.to_string()))?);
        addrs.push(info.addr().clone());
    }
    let Some((user, password, db)) = shared else {
        return Err("redis_sentinel needs at least one sentinel URL".into());
    };
    let mut builder = SentinelClientBuilder::new(addrs, name, SentinelServerType::Master)
        .map_err(|e| e.to_string())?
        .set_client_to_redis_db(db);
    if let Some(user) = user {
        builder = builder
            .set_client_to_sentinel_username(&user)
            .set_client_to_redis_username(&user);
    }
    if let Some(password) = password {
        builder = builder
            .set_client_to_sentinel_password(&password)
            .set_client_to_redis_password(&password);
    }
    Ok(Sentinels {
        set: tokio::sync::Mutex::new(builder.build().map_err(|e| e.to_string())?),
        each,
        name: name.to_owned(),
    })
}

/// Listens for the sentinels' `+switch-master` announcements (on one
/// sentinel at a time, the next when it fails or stops answering PINGs)
/// and asks for a lookup at each, so a failover is followed as soon as it
/// is decided.
async fn watch_switches(master: Arc<Master>, cancel: CancellationToken) {
    let Some(sentinels) = &master.sentinels else {
        return;
    };
    let mut backoff = Duration::from_millis(250);
    for sentinel in sentinels.each.iter().cycle() {
        let attempt = async {
            let mut pubsub = sentinel.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, RedisError>(pubsub.split())
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout(LOOKUP_TIMEOUT, attempt) => r,
            _ = cancel.cancelled() => return,
        };
        if let Ok(Ok((mut sink, mut messages))) = attempt {
            backoff = Duration::from_millis(250);
            let mut ping = tokio::time::interval(POLL);
            ping.tick().await;
            loop {
                tokio::select! {
                    message = messages.next() => match message {
                        Some(message) => {
                            let text: String = message.get_payload().unwrap_or_default();
                            info!(announcement = %text, "a sentinel announced a new master");
                            master.suspect.notify_one();
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        let pong = tokio::time::timeout(LOOKUP_TIMEOUT, sink.ping::<Value>()).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            break;
                        }
                    }
                    _ = cancel.cancelled() => return,
                }
            }
            debug!(sentinel = %sentinel.get_connection_info().addr(), "sentinel watch lost; trying the next");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(POLL);
    }
}

/// Redis commands, sent to whichever server is master when each is sent.
#[derive(Clone)]
pub struct Commands {
    master: Arc<Master>,
    /// The writer's: on a Redis Cluster, never retried (see
    /// `ClusterTarget::writes`).
    writer: bool,
}

impl Commands {
    fn noted<T>(&self, result: &Result<T, RedisError>) {
        if let Err(err) = result {
            self.master.suspected(err);
        }
    }
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            if let Some(cluster) = &self.master.cluster {
                return cluster.conn(self.writer).req_packed_command(cmd).await;
            }
            let mut conn = self.master.now()?.conn.clone();
            let result = conn.req_packed_command(cmd).await;
            self.noted(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            if let Some(cluster) = &self.master.cluster {
                // A transaction (MULTI/EXEC: replies start past `offset`)
                // must stay within one slot, and goes as it is.
                if offset > 0 {
                    return cluster
                        .conn(self.writer)
                        .req_packed_commands(pipeline, offset, count)
                        .await;
                }
                let slots = cluster
                    .slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let result = cluster_pipeline(&cluster.conn(self.writer), pipeline, &slots).await;
                if result.as_ref().map_or(true, |r| r.stale) {
                    // Routed by slot (redis-rs follows the cluster) until
                    // the map is read again.
                    cluster
                        .slots
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clear();
                }
                return result.map(|r| r.values);
            }
            let mut conn = self.master.now()?.conn.clone();
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            self.noted(&result);
            let values = result?;
            // A write refused by a demoted master comes back inside the
            // pipeline's replies, not as the call's error.
            if self.master.sentinels.is_some()
                && values
                    .iter()
                    .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY"))
            {
                self.master.suspect.notify_one();
            }
            Ok(values)
        })
    }

    fn get_db(&self) -> i64 {
        self.master.now().map(|c| c.conn.get_db()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(urls: &[&str]) -> RedisTarget {
        RedisTarget::Sentinel {
            sentinels: urls.iter().map(|u| u.to_string()).collect(),
            master: "m".into(),
        }
    }

    #[test]
    fn logs_never_show_passwords() {
        assert_eq!(
            RedisTarget::Url("redis://user:secret@r:6379/2".into()).describe(),
            "redis://***@r:6379/2"
        );
        let described = sentinel(&["redis://:pw@s1:26379", "redis://s2:26379"]).describe();
        assert_eq!(
            described,
            "master \"m\" of sentinels redis://***@s1:26379,redis://s2:26379"
        );
    }

    #[test]
    fn sentinel_targets_are_checked_before_anything_connects() {
        let new = |target: RedisTarget| {
            Master::new(
                &target,
                None,
                Duration::from_secs(1),
                Duration::from_secs(1),
            )
            .map(|_| ())
        };
        new(sentinel(&[
            "redis://user:pw@s1:26379",
            "redis://user:pw@s2:26379/0",
        ]))
        .unwrap();
        let err = new(sentinel(&["rediss://s1:26379"])).unwrap_err();
        assert!(err.contains("only redis://"), "{err}");
        let err = new(sentinel(&["redis://s1"])).unwrap_err();
        assert!(err.contains("give the sentinel's port"), "{err}");
        let err = new(sentinel(&["redis://:a@s1:26379", "redis://:b@s2:26379"])).unwrap_err();
        assert!(
            err.contains("the same user, password and database"),
            "{err}"
        );
        let err = new(sentinel(&["not a url"])).unwrap_err();
        assert!(err.contains("did not parse"), "{err}");
        let err = new(sentinel(&[])).unwrap_err();
        assert!(err.contains("at least one"), "{err}");
        // Before the sentinels are asked there is no master: commands fail
        // with a reason, they do not go anywhere.
        let master = Arc::new(
            Master::new(
                &sentinel(&["redis://127.0.0.1:1"]),
                None,
                Duration::from_secs(1),
                Duration::from_secs(1),
            )
            .unwrap(),
        );
        let err = master.client().unwrap_err().to_string();
        assert!(err.contains("have not named a master"), "{err}");
    }
}
