//! Where a client's UDP socket and TLS setup come from.
//!
//! A QUIC endpoint (one UDP socket, its driver task and its receive
//! buffers, ~100 KiB with segmentation offload) can carry any number of
//! connections. By default every [`Client`](super::Client) in a process
//! dials from a small pool of shared endpoints instead of opening its own,
//! and clients with the same trust settings share one TLS configuration
//! (so the CA file is parsed once and TLS sessions are resumed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::tls::{self, ClientCert, ServerTrust, TlsError};

/// Which UDP socket a client dials from.
#[derive(Debug, Clone, Default)]
pub enum Socket {
    /// One of a small pool of endpoints shared by every client of this
    /// process on the same tokio runtime ([`shared_pool_size`] of them,
    /// opened on first use). A reconnect dials from another socket of the
    /// pool, so a load balancer that hashes the source port places it
    /// anew; after every pool socket was tried, attempts use a private
    /// socket each.
    #[default]
    Shared,
    /// A fresh endpoint (its own UDP socket) for each connection: what a
    /// short-lived process such as the CLI wants, since closing it waits
    /// for the close to be sent.
    Private,
    /// Always this endpoint (for example one bound to a chosen address).
    Given(quinn::Endpoint),
}

/// How many shared endpoints a runtime's pool holds: two per core, between
/// 4 and 16. Several, not one, so one socket's receive queue is not the
/// bottleneck of a process holding thousands of clients, and so reconnects
/// have other source ports to try. Computed once: `available_parallelism`
/// reads cgroup files on every call, and every connect needs the size.
pub fn shared_pool_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() * 2)
            .unwrap_or(4)
            .clamp(4, 16)
    })
}

/// A runtime's shared endpoints, by address family.
struct RuntimePool {
    v4: Vec<Option<quinn::Endpoint>>,
    v6: Vec<Option<quinn::Endpoint>>,
    /// Cleared when the runtime shuts down (its endpoints' drivers are gone).
    alive: Arc<AtomicBool>,
}

/// Sets its flag to false when dropped: held by a task that never ends, so
/// it is dropped when its runtime shuts down.
struct RuntimeWatch(Arc<AtomicBool>);

impl Drop for RuntimeWatch {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn pools() -> &'static Mutex<HashMap<tokio::runtime::Id, RuntimePool>> {
    static POOLS: OnceLock<Mutex<HashMap<tokio::runtime::Id, RuntimePool>>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The slot of the shared pool a new client starts from (round robin).
pub(super) fn home_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % shared_pool_size()
}

fn unspecified(v6: bool) -> SocketAddr {
    if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    }
}

/// The endpoint to dial `addr` from, on attempt `attempt` (0 = the first
/// connection, then each reconnect attempt) of a client whose pool slot is
/// `home`; and whether the endpoint is the connection's own (to be waited
/// for when closing).
pub(super) fn endpoint_for(
    socket: &Socket,
    addr: SocketAddr,
    home: usize,
    attempt: usize,
) -> std::io::Result<(quinn::Endpoint, bool)> {
    let v6 = addr.is_ipv6();
    match socket {
        Socket::Given(endpoint) => Ok((endpoint.clone(), false)),
        Socket::Private => Ok((quinn::Endpoint::client(unspecified(v6))?, true)),
        Socket::Shared if attempt >= shared_pool_size() => {
            Ok((quinn::Endpoint::client(unspecified(v6))?, true))
        }
        Socket::Shared => Ok((shared((home + attempt) % shared_pool_size(), v6)?, false)),
    }
}

/// Shared endpoint `slot` of the current runtime, opened on first use.
fn shared(slot: usize, v6: bool) -> std::io::Result<quinn::Endpoint> {
    let runtime = tokio::runtime::Handle::current();
    let mut pools = lock(pools());
    // Endpoints of runtimes that have shut down cannot be used; let their
    // sockets go.
    pools.retain(|_, p| p.alive.load(Ordering::Acquire));
    let pool = pools.entry(runtime.id()).or_insert_with(|| {
        let alive = Arc::new(AtomicBool::new(true));
        let watch = RuntimeWatch(alive.clone());
        runtime.spawn(async move {
            let _watch = watch;
            std::future::pending::<()>().await;
        });
        RuntimePool {
            v4: vec![None; shared_pool_size()],
            v6: vec![None; shared_pool_size()],
            alive,
        }
    });
    let slots = if v6 { &mut pool.v6 } else { &mut pool.v4 };
    match &slots[slot] {
        Some(endpoint) => Ok(endpoint.clone()),
        None => {
            // Enlarged buffers: a pool socket carries many connections.
            let socket = crate::udp::bind(unspecified(v6))?;
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )?;
            slots[slot] = Some(endpoint.clone());
            Ok(endpoint)
        }
    }
}

/// Forgets a shared endpoint that refused to dial (its driver is gone), so
/// the next use opens a new one.
pub(super) fn evict(endpoint: &quinn::Endpoint) {
    let Ok(local) = endpoint.local_addr() else {
        return;
    };
    for pool in lock(pools()).values_mut() {
        for slot in pool.v4.iter_mut().chain(pool.v6.iter_mut()) {
            if slot
                .as_ref()
                .is_some_and(|e| e.local_addr().ok() == Some(local))
            {
                *slot = None;
            }
        }
    }
}

/// What identifies a file's version without reading it: path, size,
/// modification time and inode (a renewed file written by rename gets a
/// new inode even within one clock tick).
type FileStamp = (std::path::PathBuf, u64, Option<std::time::SystemTime>, u64);

type CryptoKey = (Option<FileStamp>, Option<(FileStamp, FileStamp)>);

fn stamp(path: &std::path::Path) -> Result<FileStamp, TlsError> {
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Ok((path.to_owned(), meta.len(), meta.modified().ok(), inode))
}

/// The files' contents, for the cache's periodic check.
fn contents(trust: &ServerTrust, identity: Option<&ClientCert>) -> Result<Vec<Vec<u8>>, TlsError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| TlsError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let mut all = Vec::new();
    if let ServerTrust::CaFile(path) = trust {
        all.push(read(path)?);
    }
    if let Some(id) = identity {
        all.push(read(&id.cert)?);
        all.push(read(&id.key)?);
    }
    Ok(all)
}

/// A cached configuration and the file contents it was made from.
struct Cached {
    config: Arc<quinn::crypto::rustls::QuicClientConfig>,
    contents: Vec<Vec<u8>>,
    checked: std::time::Instant,
}

/// How often a cached configuration's files are read again even though
/// their stat is unchanged: a file rewritten with the same size within one
/// coarse mtime tick (older kernels, some file systems), on a reused inode,
/// keeps its stat.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The TLS client configuration for `trust` and `identity`, shared by
/// every client whose settings (and files) are the same: the CA file is
/// parsed once, and the configuration's session cache lets reconnects and
/// further clients resume TLS sessions. A changed file is read anew: at
/// once when its size, time or inode changed, otherwise within a second
/// (unchanged files cost one `stat` per connect and one read per second).
pub(super) fn client_crypto(
    trust: &ServerTrust,
    identity: Option<&ClientCert>,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, TlsError> {
    static CACHE: OnceLock<Mutex<HashMap<CryptoKey, Cached>>> = OnceLock::new();
    /// Distinct configurations kept; more are rare (a process talks to few
    /// clusters) and simply start the cache over.
    const MAX_CACHED: usize = 16;
    let key: CryptoKey = (
        match trust {
            ServerTrust::CaFile(path) => Some(stamp(path)?),
            ServerTrust::InsecureAcceptAny => None,
        },
        match identity {
            Some(id) => Some((stamp(&id.cert)?, stamp(&id.key)?)),
            None => None,
        },
    );
    let cache = CACHE.get_or_init(Default::default);
    let now = std::time::Instant::now();
    let stale = match lock(cache).get(&key) {
        Some(found) if now.duration_since(found.checked) < RECHECK => {
            return Ok(found.config.clone());
        }
        Some(found) => Some(found.contents.clone()),
        None => None,
    };
    let read = contents(trust, identity)?;
    if stale.as_ref() == Some(&read)
        && let Some(found) = lock(cache).get_mut(&key)
    {
        found.checked = now;
        return Ok(found.config.clone());
    }
    let made = Arc::new(tls::client_crypto(trust, identity)?);
    let mut cache = lock(cache);
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(
        key,
        Cached {
            config: made.clone(),
            contents: read,
            checked: now,
        },
    );
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(endpoint: &quinn::Endpoint) -> u16 {
        endpoint.local_addr().expect("bound").port()
    }

    #[tokio::test]
    async fn clients_share_the_pool_and_reconnects_move_to_other_ports() {
        let addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let k = shared_pool_size();
        let (first, own) = endpoint_for(&Socket::Shared, addr, 1, 0).unwrap();
        assert!(!own, "a pool endpoint is not the connection's own");
        // Another client with the same home slot dials from the same socket.
        let (again, _) = endpoint_for(&Socket::Shared, addr, 1, 0).unwrap();
        assert_eq!(port(&first), port(&again));
        // Each reconnect attempt within the pool uses another socket.
        let mut ports = std::collections::HashSet::new();
        for attempt in 0..k {
            let (e, own) = endpoint_for(&Socket::Shared, addr, 1, attempt).unwrap();
            assert!(!own);
            ports.insert(port(&e));
        }
        assert_eq!(ports.len(), k, "the pool's sockets are distinct");
        // Beyond the pool: a private socket per attempt, new each time.
        let (a, own_a) = endpoint_for(&Socket::Shared, addr, 1, k).unwrap();
        let (b, own_b) = endpoint_for(&Socket::Shared, addr, 1, k + 1).unwrap();
        assert!(own_a && own_b);
        assert!(!ports.contains(&port(&a)) && port(&a) != port(&b));
        // Private: always a fresh socket.
        let (p, own_p) = endpoint_for(&Socket::Private, addr, 1, 0).unwrap();
        assert!(own_p && !ports.contains(&port(&p)));
    }

    #[test]
    fn a_runtime_that_shut_down_leaves_no_endpoint_behind() {
        let addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let first = runtime();
        let old_id = first.handle().id();
        first.block_on(async { endpoint_for(&Socket::Shared, addr, 0, 0).unwrap() });
        assert!(lock(pools()).contains_key(&old_id));
        drop(first);
        let second = runtime();
        let (endpoint, _) =
            second.block_on(async { endpoint_for(&Socket::Shared, addr, 0, 0).unwrap() });
        let pools = lock(pools());
        assert!(
            !pools.contains_key(&old_id),
            "the dead runtime's pool was let go"
        );
        let current = pools
            .get(&second.handle().id())
            .expect("a pool for the live runtime");
        assert_eq!(
            current.v4[0].as_ref().map(port),
            Some(port(&endpoint)),
            "the live runtime has endpoints of its own"
        );
    }

    #[test]
    fn clients_with_the_same_trust_share_one_tls_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        crate::tls::ensure_dev_certs(dir.path(), &names).unwrap();
        let trust = ServerTrust::CaFile(dir.path().join("ca.pem"));
        let a = client_crypto(&trust, None).unwrap();
        let b = client_crypto(&trust, None).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "same CA file: one config");
        // A renewed CA (new contents at the same path) is read anew.
        std::fs::remove_dir_all(dir.path()).unwrap();
        crate::tls::ensure_dev_certs(dir.path(), &names).unwrap();
        let c = client_crypto(&trust, None).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "a changed CA file gets a new config");
    }

    #[test]
    fn a_file_rewritten_with_the_same_stat_is_read_again_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned()];
        crate::tls::ensure_dev_certs(dir.path(), &names).unwrap();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let path = dir.path().join("trust.pem");
        let with_note = |note: &[u8]| [note, &ca[..]].concat();
        std::fs::write(&path, with_note(b"x\n")).unwrap();
        let trust = ServerTrust::CaFile(path.clone());
        let a = client_crypto(&trust, None).unwrap();
        // Same size, same inode, and the old mtime put back: what a coarse
        // clock or a quick rewrite looks like.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &file, &with_note(b"y\n")).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        let b = client_crypto(&trust, None).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "within a second: stat only");
        std::thread::sleep(RECHECK + std::time::Duration::from_millis(100));
        let c = client_crypto(&trust, None).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "then the contents are compared");
        let d = client_crypto(&trust, None).unwrap();
        assert!(Arc::ptr_eq(&c, &d));
    }
}
