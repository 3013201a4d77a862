//! Limits a client cannot get around: the per-client message rate limit
//! (token bucket, with disconnection for sustained abuse, remembered across
//! reconnects by [`RateLimits`] so a new connection does not bring a fresh
//! burst) and admission control for new connections (pending handshakes,
//! per-IP connection rate and count, QUIC Retry under load), all decided
//! before TLS runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{AddressValidation, NodeConfig};
use crate::stats::RefusedReason;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The outcome of a rate-limit check on one inbound frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateVerdict {
    /// Within the limit: handle the frame.
    Allow,
    /// Over the limit: reject the frame; a frame is accepted again after this.
    Reject(Duration),
    /// Over the limit for too long: disconnect the client.
    Disconnect,
}

/// Most identities whose rate-limit state is remembered after their
/// connections ended; beyond it, entries whose bucket refilled are dropped
/// first and new ones are not remembered.
pub const MAX_REMEMBERED: usize = 100_000;

/// Who a client is for its rate limit's memory across connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// An authenticated user (token subject or certificate name).
    User(String),
    /// An anonymous client, by source address (`rate_limit_anonymous_by_ip`).
    Ip(IpAddr),
}

/// A token bucket in GCRA form: one "theoretical arrival time" in
/// nanoseconds since the node's epoch, updated with compare-and-swap. The
/// bucket is full when it is in the past; each frame moves it one interval
/// forward, and a frame is refused when that would put it more than
/// `burst` intervals ahead of now.
#[derive(Debug)]
struct Bucket {
    tat_ns: AtomicU64,
    interval_ns: u64,
    tolerance_ns: u64,
}

impl Bucket {
    /// Takes a token at `now_ns`, or says how long until one is free.
    fn take(&self, now_ns: u64) -> Result<(), u64> {
        let mut tat = self.tat_ns.load(Ordering::Acquire);
        loop {
            let next = tat.max(now_ns) + self.interval_ns;
            let ahead = next - now_ns;
            if ahead > self.tolerance_ns {
                return Err(ahead - self.tolerance_ns);
            }
            match self
                .tat_ns
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// The node's rate-limit settings and what it remembers of identities
/// whose connections ended: their bucket level. A client that reconnects
/// (the same user, or the same address for anonymous clients) starts from
/// where its last connection left its bucket, not from a full one, so the
/// limit cannot be escaped by reconnecting.
#[derive(Debug)]
pub struct RateLimits {
    /// Interval and tolerance of a bucket; `None` when rate limiting is off.
    quota: Option<(u64, u64)>,
    strikes: u32,
    strike_window: Duration,
    by_ip: bool,
    epoch: Instant,
    remembered: Mutex<HashMap<RateKey, u64>>,
}

impl RateLimits {
    /// The limits of `config`.
    pub fn new(config: &NodeConfig) -> Self {
        let quota = (config.rate_limit_messages > 0).then(|| {
            let interval = 1_000_000_000 / u64::from(config.rate_limit_messages);
            let burst = u64::from(config.rate_limit_burst.max(1));
            (interval.max(1), interval.max(1) * burst)
        });
        RateLimits {
            quota,
            strikes: config.rate_limit_strikes,
            strike_window: config.rate_limit_strike_window,
            by_ip: config.rate_limit_anonymous_by_ip,
            epoch: Instant::now(),
            remembered: Mutex::new(HashMap::new()),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The identity a client's rate state follows: its user when
    /// authenticated, else its address (unless addresses do not identify
    /// clients here, e.g. behind a proxy that hides them).
    pub fn key(&self, user: Option<&str>, ip: IpAddr) -> Option<RateKey> {
        match user {
            Some(user) => Some(RateKey::User(user.to_owned())),
            None => self.by_ip.then_some(RateKey::Ip(ip)),
        }
    }

    /// The rate limit of a new connection of `key`, starting from the
    /// bucket level its identity's last connection left; `None` when rate
    /// limiting is off.
    pub fn start(&self, key: Option<&RateKey>) -> Option<ClientRateLimit> {
        let (interval_ns, tolerance_ns) = self.quota?;
        let tat = key
            .and_then(|key| {
                self.remembered
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(key)
                    .copied()
            })
            .unwrap_or(0);
        Some(ClientRateLimit {
            bucket: Bucket {
                tat_ns: AtomicU64::new(tat),
                interval_ns,
                tolerance_ns,
            },
            strikes: self.strikes,
            strike_window: self.strike_window,
            window_start_ms: AtomicU64::new(0),
            rejected_in_window: AtomicU32::new(0),
            limits_epoch: self.epoch,
        })
    }

    /// Remembers the bucket level a connection of `key` ended with, for
    /// the identity's next connection (nothing to remember once it refilled).
    pub fn remember(&self, key: Option<RateKey>, limit: &ClientRateLimit) {
        let Some(key) = key else { return };
        let now = self.now_ns();
        let tat = limit.bucket.tat_ns.load(Ordering::Acquire);
        let mut remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        if tat <= now {
            return;
        }
        if remembered.len() >= MAX_REMEMBERED && !remembered.contains_key(&key) {
            remembered.retain(|_, tat| *tat > now);
            if remembered.len() >= MAX_REMEMBERED {
                tracing::debug!("rate-limit memory full; not remembering this identity");
                return;
            }
        }
        let entry = remembered.entry(key).or_insert(0);
        // Several connections of one identity: the emptiest bucket wins.
        *entry = (*entry).max(tat);
    }

    /// Forgets identities whose bucket has refilled since (call
    /// periodically, so the table only holds identities still in debt).
    pub fn forget_idle(&self) {
        let now = self.now_ns();
        self.remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, tat| *tat > now);
    }

    /// Identities remembered right now.
    pub fn remembered(&self) -> usize {
        self.remembered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// One connection's message rate limit. Frames (and newly opened streams)
/// take a token each from a bucket of `rate_limit_burst` tokens refilled
/// at `rate_limit_messages` per second; a frame without a token is
/// rejected, and more than `strikes` rejections within `strike_window`
/// disconnect the client.
#[derive(Debug)]
pub struct ClientRateLimit {
    bucket: Bucket,
    strikes: u32,
    strike_window: Duration,
    /// Start of the current strike window, as milliseconds since `limits_epoch`.
    window_start_ms: AtomicU64,
    rejected_in_window: AtomicU32,
    limits_epoch: Instant,
}

impl ClientRateLimit {
    /// A fresh limit as configured for `config` (no memory of earlier
    /// connections), or `None` when rate limiting is off.
    pub fn from_config(config: &NodeConfig) -> Option<Self> {
        RateLimits::new(config).start(None)
    }

    /// Takes a token for one frame.
    pub fn check(&self) -> RateVerdict {
        let now = self.limits_epoch.elapsed();
        match self.bucket.take(now.as_nanos() as u64) {
            Ok(()) => RateVerdict::Allow,
            Err(wait_ns) => {
                if self.strike(now) {
                    RateVerdict::Disconnect
                } else {
                    RateVerdict::Reject(Duration::from_nanos(wait_ns))
                }
            }
        }
    }

    /// Counts one rejection; true once the client exceeded its strikes.
    fn strike(&self, now: Duration) -> bool {
        let now = now.as_millis() as u64;
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= self.strike_window.as_millis() as u64 {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.rejected_in_window.store(0, Ordering::Relaxed);
        }
        self.rejected_in_window.fetch_add(1, Ordering::Relaxed) + 1 > self.strikes
    }
}

/// What to do with a new connection attempt.
#[derive(Debug)]
pub enum Admit {
    /// Go ahead; the permit frees its slots when dropped.
    Accept(ConnectionPermit),
    /// Ask the client to prove its address first (QUIC Retry).
    Retry,
    /// Refuse before TLS.
    Refuse(RefusedReason),
}

/// Admission control for new connections.
#[derive(Debug)]
pub struct Admission {
    pending: Arc<AtomicUsize>,
    max_pending: usize,
    validation: AddressValidation,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
    ip_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Admission {
    /// Admission control with the limits of `config`.
    pub fn new(config: &NodeConfig) -> Self {
        let ip_rate = NonZeroU32::new(config.connection_rate_per_ip).map(|rate| {
            let burst = NonZeroU32::new(config.connection_burst_per_ip).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Admission {
            pending: Arc::new(AtomicUsize::new(0)),
            max_pending: config.max_pending_handshakes,
            validation: config.address_validation,
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip: config.max_connections_per_ip,
            ip_rate,
        }
    }

    /// Decides about a connection attempt from `ip`, whose source address
    /// is proven when `validated` (it answered a Retry).
    pub fn admit(&self, ip: IpAddr, validated: bool) -> Admit {
        let pending = self.pending.load(Ordering::Acquire);
        if pending >= self.max_pending {
            return Admit::Refuse(RefusedReason::PendingHandshakes);
        }
        if !validated {
            let retry = match self.validation {
                AddressValidation::Always => true,
                AddressValidation::UnderLoad => pending * 2 > self.max_pending,
                AddressValidation::Never => false,
            };
            if retry {
                return Admit::Retry;
            }
        }
        // The count is checked before the rate, so an attempt refused for
        // the count does not use up a rate token.
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if self.max_per_ip > 0 && per_ip.get(&ip).is_some_and(|n| *n >= self.max_per_ip) {
            return Admit::Refuse(RefusedReason::IpConnections);
        }
        if let Some(rate) = &self.ip_rate
            && rate.check_key(&ip).is_err()
        {
            return Admit::Refuse(RefusedReason::IpRate);
        }
        if self.max_per_ip > 0 {
            *per_ip.entry(ip).or_insert(0) += 1;
        }
        drop(per_ip);
        self.pending.fetch_add(1, Ordering::AcqRel);
        Admit::Accept(ConnectionPermit {
            ip,
            per_ip: (self.max_per_ip > 0).then(|| self.per_ip.clone()),
            pending: Some(self.pending.clone()),
        })
    }

    /// Connections currently mid-handshake.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Forgets per-IP rate state that has fully refilled (call periodically
    /// so the table does not grow with every address ever seen).
    pub fn forget_idle(&self) {
        if let Some(rate) = &self.ip_rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }
}

/// A connection's claim on admission slots: one pending-handshake slot
/// until [`ConnectionPermit::handshake_done`], and one per-IP slot for its
/// whole life.
#[derive(Debug)]
pub struct ConnectionPermit {
    ip: IpAddr,
    per_ip: Option<Arc<Mutex<HashMap<IpAddr, usize>>>>,
    pending: Option<Arc<AtomicUsize>>,
}

impl ConnectionPermit {
    /// The application handshake is over (admitted or refused): frees the
    /// pending-handshake slot.
    pub fn handshake_done(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.handshake_done();
        if let Some(per_ip) = &self.per_ip {
            let mut per_ip = per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(count) = per_ip.get_mut(&self.ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NodeConfig {
        NodeConfig {
            max_pending_handshakes: 4,
            max_connections_per_ip: 2,
            connection_rate_per_ip: 0,
            address_validation: AddressValidation::Never,
            rate_limit_messages: 10,
            rate_limit_burst: 5,
            rate_limit_strikes: 3,
            rate_limit_strike_window: Duration::from_secs(60),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn per_ip_connections_are_counted_and_released() {
        let admission = Admission::new(&config());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let Admit::Accept(a) = admission.admit(ip, false) else {
            panic!()
        };
        let Admit::Accept(mut b) = admission.admit(ip, false) else {
            panic!()
        };
        assert!(matches!(
            admission.admit(ip, false),
            Admit::Refuse(RefusedReason::IpConnections)
        ));
        // Another address is not affected.
        assert!(matches!(
            admission.admit([10, 0, 0, 2].into(), false),
            Admit::Accept(_)
        ));
        b.handshake_done();
        assert_eq!(admission.pending(), 1, "a's slot is still pending");
        drop(a);
        assert!(matches!(admission.admit(ip, false), Admit::Accept(_)));
    }

    #[test]
    fn pending_handshakes_are_capped_and_retry_kicks_in_under_load() {
        let mut config = config();
        config.max_connections_per_ip = 0;
        config.address_validation = AddressValidation::UnderLoad;
        let admission = Admission::new(&config);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let mut held = Vec::new();
        for _ in 0..2 {
            let Admit::Accept(p) = admission.admit(ip, false) else {
                panic!()
            };
            held.push(p);
        }
        // 2 of 4 pending is not yet "under load"; 3 of 4 is.
        let Admit::Accept(p) = admission.admit(ip, false) else {
            panic!()
        };
        held.push(p);
        assert!(matches!(admission.admit(ip, false), Admit::Retry));
        let Admit::Accept(p) = admission.admit(ip, true) else {
            panic!()
        };
        held.push(p);
        assert!(matches!(
            admission.admit(ip, true),
            Admit::Refuse(RefusedReason::PendingHandshakes)
        ));
    }

    #[test]
    fn connection_rate_per_ip() {
        let mut config = config();
        config.connection_rate_per_ip = 1;
        config.connection_burst_per_ip = 2;
        config.max_connections_per_ip = 0;
        let admission = Admission::new(&config);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let mut held = Vec::new();
        for _ in 0..2 {
            match admission.admit(ip, false) {
                Admit::Accept(mut p) => {
                    p.handshake_done();
                    held.push(p)
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            admission.admit(ip, false),
            Admit::Refuse(RefusedReason::IpRate)
        ));
    }

    #[test]
    fn burst_then_rejections_then_disconnect() {
        let limit = ClientRateLimit::from_config(&config()).unwrap();
        for _ in 0..5 {
            assert_eq!(limit.check(), RateVerdict::Allow);
        }
        for _ in 0..3 {
            let RateVerdict::Reject(wait) = limit.check() else {
                panic!()
            };
            assert!(wait <= Duration::from_millis(100), "{wait:?}");
        }
        assert_eq!(limit.check(), RateVerdict::Disconnect);
    }

    #[test]
    fn a_reconnect_starts_from_the_bucket_its_identity_left() {
        let limits = RateLimits::new(&config());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let key = limits.key(None, ip);
        let first = limits.start(key.as_ref()).unwrap();
        for _ in 0..5 {
            assert_eq!(first.check(), RateVerdict::Allow);
        }
        assert!(matches!(first.check(), RateVerdict::Reject(_)));
        limits.remember(key.clone(), &first);
        assert_eq!(limits.remembered(), 1);
        // Same address: no fresh burst.
        let again = limits.start(key.as_ref()).unwrap();
        assert!(matches!(again.check(), RateVerdict::Reject(_)));
        // Another address, or the same address as a user, starts full.
        let other = limits.start(limits.key(None, [10, 0, 0, 2].into()).as_ref());
        assert_eq!(other.unwrap().check(), RateVerdict::Allow);
        let user = limits.start(limits.key(Some("alice"), ip).as_ref());
        assert_eq!(user.unwrap().check(), RateVerdict::Allow);
        // Without address identity, anonymous clients are not remembered.
        let blind = RateLimits::new(&NodeConfig {
            rate_limit_anonymous_by_ip: false,
            ..config()
        });
        assert_eq!(blind.key(None, ip), None);
    }

    #[test]
    fn zero_rate_turns_the_limit_off() {
        let config = NodeConfig {
            rate_limit_messages: 0,
            ..config()
        };
        assert!(ClientRateLimit::from_config(&config).is_none());
    }
}
