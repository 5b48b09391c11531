//! Local limits of the edge (RFC 6120 §13.12 "Denial of Service"; violations end in the
//! `policy-violation` stream error of §4.9.3.14 or the `resource-constraint` /
//! `temporary-auth-failure` answers named where they are used):
//!
//! - [`TokenBucket`]: bytes a connection may send, refilled at a rate up to a burst;
//! - [`WindowCounter`]: events per key (client address, account) within a fixed one-minute
//!   window, for SASL failures and in-band registrations;
//! - [`ConnectionCounter`]: open connections per client address.
//!
//! Every map here has a size limit. When a map is full even after dropping expired entries,
//! a new key is refused (treated as over its limit), with the metric
//! `starling_edge_limit_violations_total{kind="table_full"}`: under a flood from many
//! addresses the edge fails closed rather than growing.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics;

/// The most keys a [`WindowCounter`] or [`ConnectionCounter`] holds.
pub(crate) const MAX_TRACKED_KEYS: usize = 100_000;

/// A token bucket over bytes: `burst` tokens at most, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(burst: u64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst as f64,
            last: now,
        }
    }

    /// Takes `n` tokens; `false` when the bucket did not hold them (the limit is exceeded).
    pub(crate) fn take(&mut self, n: usize, rate: u64, burst: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate as f64).min(burst as f64);
        self.tokens -= n as f64;
        self.tokens >= 0.0
    }
}

/// Counts events per key in a fixed window that starts with the key's first event.
#[derive(Debug)]
pub(crate) struct WindowCounter<K> {
    window: Duration,
    entries: Mutex<HashMap<K, (Instant, u32)>>,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> WindowCounter<K> {
    /// A counter with the given window.
    pub(crate) fn new(window: Duration, max_keys: usize) -> Self {
        WindowCounter {
            window,
            entries: Mutex::new(HashMap::new()),
            max_keys,
        }
    }

    /// Whether `key` has reached `limit` events in its current window.
    pub(crate) fn is_limited(&self, key: &K, limit: u32, now: Instant) -> bool {
        let full = {
            let entries = self.entries.lock();
            if let Some((start, count)) = entries.get(key) {
                return now.saturating_duration_since(*start) < self.window && *count >= limit;
            }
            entries.len() >= self.max_keys
        };
        // Full: refuse unknown keys unless something has expired.
        full && {
            self.prune(now);
            self.entries.lock().len() >= self.max_keys
        }
    }

    /// Records one event for `key`.
    pub(crate) fn record(&self, key: K, now: Instant) {
        let mut entries = self.entries.lock();
        if !entries.contains_key(&key) && entries.len() >= self.max_keys {
            let window = self.window;
            entries.retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
            if entries.len() >= self.max_keys {
                metrics::limit_violation("table_full");
                return;
            }
        }
        let entry = entries.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    fn prune(&self, now: Instant) {
        let window = self.window;
        self.entries
            .lock()
            .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
    }

    /// Number of keys held, for tests.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// Open connections per client address.
#[derive(Debug, Default)]
pub(crate) struct ConnectionCounter {
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl ConnectionCounter {
    /// Counts a new connection from `ip`, or refuses it when `ip` already has `limit` open
    /// (or the table is full). The guard uncounts it when dropped.
    pub(crate) fn try_open(self: &Arc<Self>, ip: IpAddr, limit: u32) -> Option<ConnectionGuard> {
        let mut open = self.open.lock();
        if !open.contains_key(&ip) && open.len() >= MAX_TRACKED_KEYS {
            return None;
        }
        let count = open.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ConnectionGuard {
            counter: self.clone(),
            ip,
        })
    }

    /// Open connections from `ip`.
    #[cfg(test)]
    pub(crate) fn count(&self, ip: IpAddr) -> u32 {
        self.open.lock().get(&ip).copied().unwrap_or(0)
    }
}

/// One counted connection; uncounted on drop.
#[derive(Debug)]
pub(crate) struct ConnectionGuard {
    counter: Arc<ConnectionCounter>,
    ip: IpAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut open = self.counter.open.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The address limits are keyed on: IPv4-mapped IPv6 addresses (from a dual-stack listener)
/// count as the IPv4 address they carry.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        assert!(b.take(100, 10, 100, t0));
        assert!(!b.take(1, 10, 100, t0));
        // One second refills 10 tokens; the debt of 1 is paid first.
        let mut b = TokenBucket::new(100, t0);
        assert!(b.take(100, 10, 100, t0));
        assert!(b.take(10, 10, 100, t0 + Duration::from_secs(1)));
        assert!(!b.take(1, 10, 100, t0 + Duration::from_secs(1)));
        // Never more than the burst.
        let mut b = TokenBucket::new(100, t0);
        assert!(!b.take(101, 10, 100, t0 + Duration::from_secs(1000)));
    }

    #[test]
    fn window_counts_and_expires() {
        let t0 = Instant::now();
        let c = WindowCounter::new(Duration::from_secs(60), 10);
        for _ in 0..3 {
            assert!(!c.is_limited(&1u32, 3, t0));
            c.record(1u32, t0);
        }
        assert!(c.is_limited(&1u32, 3, t0 + Duration::from_secs(59)));
        assert!(!c.is_limited(&2u32, 3, t0));
        assert!(!c.is_limited(&1u32, 3, t0 + Duration::from_secs(60)));
        c.record(1u32, t0 + Duration::from_secs(61));
        assert!(!c.is_limited(&1u32, 3, t0 + Duration::from_secs(61)));
    }

    #[test]
    fn window_table_is_bounded() {
        let t0 = Instant::now();
        let c = WindowCounter::new(Duration::from_secs(60), 2);
        c.record(1u32, t0);
        c.record(2u32, t0);
        c.record(3u32, t0);
        assert_eq!(c.len(), 2);
        assert!(c.is_limited(&3u32, 10, t0));
        // Once the old windows pass, new keys fit again.
        let later = t0 + Duration::from_secs(61);
        assert!(!c.is_limited(&3u32, 10, later));
        c.record(3u32, later);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn connections_per_ip() {
        let c = Arc::new(ConnectionCounter::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = c.try_open(ip, 2).unwrap();
        let b = c.try_open(ip, 2).unwrap();
        assert!(c.try_open(ip, 2).is_none());
        drop(a);
        assert_eq!(c.count(ip), 1);
        let _c = c.try_open(ip, 2).unwrap();
        drop(b);
        assert_eq!(c.count(ip), 1);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(canonical_ip(mapped), ip);
    }
}
