//! Limits a client cannot get around: the per-client message rate limit
//! (token bucket, with disconnection for sustained abuse) and admission
//! control for new connections (pending handshakes, per-IP connection rate
//! and count, QUIC Retry under load), all decided before TLS runs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use crate::config::NodeConfig;

/// When the node asks new connections to prove their address with a QUIC
/// Retry (one extra round trip; spoofed source addresses cannot answer it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AddressValidation {
    /// Every connection.
    Always,
    /// Only while more than half of `max_pending_handshakes` are in use.
    #[default]
    UnderLoad,
    /// Never.
    Never,
}

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

/// One client's message rate limit. Frames (and newly opened streams) take
/// a token each; a frame without a token is rejected, and more than
/// `strikes` rejections within `strike_window` disconnect the client.
#[derive(Debug)]
pub struct ClientRateLimit {
    bucket: DefaultDirectRateLimiter,
    clock: DefaultClock,
    strikes: u32,
    strike_window: Duration,
    /// Start of the current strike window, as milliseconds since `epoch`.
    window_start_ms: AtomicU64,
    rejected_in_window: AtomicU32,
    epoch: Instant,
}

impl ClientRateLimit {
    /// The limit configured for `config`, or `None` when rate limiting is off.
    pub fn from_config(config: &NodeConfig) -> Option<Self> {
        let rate = NonZeroU32::new(config.rate_limit_messages)?;
        let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(rate);
        Some(ClientRateLimit {
            bucket: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            strikes: config.rate_limit_strikes,
            strike_window: config.rate_limit_strike_window,
            window_start_ms: AtomicU64::new(0),
            rejected_in_window: AtomicU32::new(0),
            epoch: Instant::now(),
        })
    }

    /// Takes a token for one frame.
    pub fn check(&self) -> RateVerdict {
        match self.bucket.check() {
            Ok(()) => RateVerdict::Allow,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                if self.strike() {
                    RateVerdict::Disconnect
                } else {
                    RateVerdict::Reject(wait)
                }
            }
        }
    }

    /// Counts one rejection; true once the client exceeded its strikes.
    fn strike(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= self.strike_window.as_millis() as u64 {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.rejected_in_window.store(0, Ordering::Relaxed);
        }
        self.rejected_in_window.fetch_add(1, Ordering::Relaxed) + 1 > self.strikes
    }
}

/// Why a new connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_pending_handshakes` connections are already mid-handshake.
    TooManyPending,
    /// The source address opened connections faster than its rate.
    IpRate,
    /// The source address already has `max_connections_per_ip` connections.
    IpConnections,
}

impl Refusal {
    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooManyPending => "pending_handshakes",
            Refusal::IpRate => "ip_rate",
            Refusal::IpConnections => "ip_connections",
        }
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
    Refuse(Refusal),
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
            return Admit::Refuse(Refusal::TooManyPending);
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
            return Admit::Refuse(Refusal::IpConnections);
        }
        if let Some(rate) = &self.ip_rate
            && rate.check_key(&ip).is_err()
        {
            return Admit::Refuse(Refusal::IpRate);
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
            Admit::Refuse(Refusal::IpConnections)
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
            Admit::Refuse(Refusal::TooManyPending)
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
            Admit::Refuse(Refusal::IpRate)
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
    fn zero_rate_turns_the_limit_off() {
        let config = NodeConfig {
            rate_limit_messages: 0,
            ..config()
        };
        assert!(ClientRateLimit::from_config(&config).is_none());
    }
}
