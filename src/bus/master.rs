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
//! announce, and every few seconds regardless. When the answer changes it
//! swaps the connection, bumps the generation (the subscription watches it
//! and moves to the new master) and tells the bus to rewrite its presence,
//! since a promoted replica may lack the last writes of the old master.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
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
#[derive(Clone)]
struct Current {
    client: redis::Client,
    conn: ConnectionManager,
    /// `host:port`, to tell a new master from the same one.
    addr: String,
}

/// The bus's view of its Redis server.
pub struct Master {
    manager_config: ConnectionManagerConfig,
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    describe: String,
    current: Mutex<Option<Current>>,
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
        let tls = |ca: &[u8]| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.to_vec()),
        };
        let (current, sentinel) = match target {
            RedisTarget::Url(url) => {
                let client = match ca_pem {
                    Some(ca) => redis::Client::build_with_tls(url.as_str(), tls(ca)),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(|e| format!("invalid Redis URL or CA: {e}"))?;
                let conn =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                        .map_err(|e| e.to_string())?;
                let addr = client.get_connection_info().addr().to_string();
                (Some(Current { client, conn, addr }), None)
            }
            RedisTarget::Sentinel { sentinels, master } => {
                let mut addrs = Vec::new();
                let mut credentials = None;
                for url in sentinels {
                    let info = url
                        .as_str()
                        .into_connection_info()
                        .map_err(|e| format!("invalid sentinel URL {}: {e}", redacted(url)))?;
                    if !matches!(info.addr(), redis::ConnectionAddr::Tcp(..)) {
                        return Err(format!(
                            "sentinel URL {}: only redis:// (TCP without TLS) is supported with Sentinel",
                            redacted(url)
                        ));
                    }
                    let settings = info.redis_settings();
                    credentials.get_or_insert((
                        settings.username().map(str::to_owned),
                        settings.password().map(str::to_owned),
                    ));
                    addrs.push(info.addr().clone());
                }
                if addrs.is_empty() {
                    return Err("redis_sentinel needs at least one sentinel URL".into());
                }
                let mut builder =
                    SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                        .map_err(|e| e.to_string())?;
                if let Some((user, password)) = credentials {
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
                }
                let client = builder.build().map_err(|e| e.to_string())?;
                (None, Some(tokio::sync::Mutex::new(client)))
            }
        };
        Ok(Master {
            manager_config,
            sentinel,
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

    /// A handle for commands, following the master.
    pub fn commands(self: &Arc<Self>) -> Commands {
        Commands {
            master: self.clone(),
        }
    }

    /// A client for the current master (for a subscription connection).
    pub fn client(&self) -> Result<redis::Client, RedisError> {
        self.now().map(|c| c.client)
    }

    /// Changes with every move to another server.
    pub fn generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn now(&self) -> Result<Current, RedisError> {
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
        if self.sentinel.is_some()
            && (err.is_io_error()
                || err.is_connection_dropped()
                || err.is_connection_refusal()
                || err.is_timeout()
                || err.code() == Some("READONLY"))
        {
            self.suspect.notify_one();
        }
    }

    /// With Sentinel: finds the master and keeps following it, until
    /// `cancel`; `moved(switched)` is called when the master is found
    /// (false) and after every change to another server (true). Returns at
    /// once for a fixed URL.
    pub async fn follow(self: Arc<Self>, cancel: CancellationToken, moved: impl Fn(bool) + Send) {
        let Some(sentinel) = &self.sentinel else {
            return;
        };
        tokio::spawn(watch_switches(self.clone(), cancel.clone()));
        let mut failures = 0u64;
        loop {
            let found = {
                let mut sentinel = sentinel.lock().await;
                tokio::time::timeout(Duration::from_secs(5), sentinel.async_get_client()).await
            };
            let wait = match found {
                Ok(Ok(client)) => {
                    failures = 0;
                    if let Some(switched) = self.adopt(client) {
                        moved(switched);
                    }
                    Duration::from_secs(5)
                }
                Ok(Err(err)) => {
                    self.failed(&mut failures, &err.to_string());
                    Duration::from_millis(250)
                }
                Err(_) => {
                    self.failed(&mut failures, "sentinels did not answer in 5s");
                    Duration::from_millis(250)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.suspect.notified() => {
                    // Several failing commands in a burst: one lookup.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ = cancel.cancelled() => return,
            }
        }
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
    /// one: `None` if it is the same, else whether there was another before.
    fn adopt(&self, client: redis::Client) -> Option<bool> {
        let addr = client.get_connection_info().addr().to_string();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|c| c.addr == addr) {
            return None;
        }
        let conn = match ConnectionManager::new_lazy_with_config(
            client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(conn) => conn,
            Err(err) => {
                warn!(%err, %addr, "cannot use the master the sentinels named");
                return None;
            }
        };
        let old = current.replace(Current {
            client,
            conn,
            addr: addr.clone(),
        });
        drop(current);
        match &old {
            Some(old) => warn!(
                from = %old.addr,
                to = %addr,
                "Redis master changed (Sentinel failover); moving commands and subscriptions, rewriting presence"
            ),
            None => info!(%addr, "Redis master found through Sentinel"),
        }
        self.generation.send_modify(|g| *g += 1);
        Some(old.is_some())
    }
}

/// Listens for the sentinels' `+switch-master` announcements and asks for
/// a lookup at each, so a failover is followed as soon as it is decided.
async fn watch_switches(master: Arc<Master>, cancel: CancellationToken) {
    let Some(sentinel) = &master.sentinel else {
        return;
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = async {
            let client = sentinel.lock().await.async_get_sentinel_client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok::<_, RedisError>(pubsub)
        };
        let attempt = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), attempt) => r,
            _ = cancel.cancelled() => return,
        };
        if let Ok(Ok(pubsub)) = attempt {
            backoff = Duration::from_millis(250);
            let mut messages = pubsub.into_on_message();
            loop {
                tokio::select! {
                    message = messages.next() => match message {
                        Some(message) => {
                            let text: String = message.get_payload().unwrap_or_default();
                            info!(announcement = %text, "sentinel announced a new master");
                            master.suspect.notify_one();
                        }
                        None => break,
                    },
                    _ = cancel.cancelled() => return,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Redis commands, sent to whichever server is master when each is sent.
#[derive(Clone)]
pub struct Commands {
    master: Arc<Master>,
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
            let mut conn = self.master.now()?.conn;
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
            let mut conn = self.master.now()?.conn;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            self.noted(&result);
            let values = result?;
            // A write refused by a demoted master comes back inside the
            // pipeline's replies, not as the call's error.
            if self.master.sentinel.is_some()
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
        new(sentinel(&["redis://s1:26379", "redis://user:pw@s2:26379"])).unwrap();
        let err = new(sentinel(&["rediss://s1:26379"])).unwrap_err();
        assert!(err.contains("only redis://"), "{err}");
        let err = new(sentinel(&["not a url"])).unwrap_err();
        assert!(err.contains("invalid sentinel URL"), "{err}");
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
