//! Counters, HDR histograms and the final report of a load run (table and JSON).
//!
//! Counters are atomics shared by every connection task; the two latency histograms sit behind
//! a mutex each (a record is a few nanoseconds, far below a message's cost). Error kinds are
//! strings (`connect`, `tls`, `auth:<condition>`, `timeout:<step>`, `stream-error:<condition>`,
//! ...) counted in a bounded map: past [`MAX_ERROR_KINDS`] kinds, the rest go to `other`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::load::meter::Measured;

/// Most distinct error kinds kept; the map is bounded because kinds carry server-chosen text.
pub const MAX_ERROR_KINDS: usize = 64;

/// Microseconds since the process's first call: the clock message stamps use. Sender and
/// receiver are in this one process, so one monotonic clock serves both ends.
pub fn now_micros() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn new_histogram() -> Mutex<Option<Histogram<u64>>> {
    // 1 µs .. 1 hour, 3 significant digits: valid constants, so this is always `Some`.
    Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).ok())
}

/// Everything a run counts.
#[derive(Debug)]
pub struct Stats {
    /// TCP connections attempted.
    pub connects: AtomicU64,
    /// Logins that reached a bound resource.
    pub logins_ok: AtomicU64,
    /// Logins that failed (any kind).
    pub logins_failed: AtomicU64,
    /// Sessions bound right now.
    pub sessions_up: AtomicU64,
    /// Accounts created in band.
    pub registered: AtomicU64,
    /// Accounts that already existed (`conflict`), which a re-run expects.
    pub register_existing: AtomicU64,
    /// Stanzas sent by the scenario (messages or presence changes).
    pub sent: AtomicU64,
    /// Stanzas received that carried one of our stamps.
    pub received: AtomicU64,
    login: Mutex<Option<Histogram<u64>>>,
    e2e: Mutex<Option<Histogram<u64>>>,
    errors: Mutex<BTreeMap<String, u64>>,
    mechanisms: Mutex<std::collections::BTreeSet<&'static str>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connects: AtomicU64::new(0),
            logins_ok: AtomicU64::new(0),
            logins_failed: AtomicU64::new(0),
            sessions_up: AtomicU64::new(0),
            registered: AtomicU64::new(0),
            register_existing: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            login: new_histogram(),
            e2e: new_histogram(),
            errors: Mutex::new(BTreeMap::new()),
            mechanisms: Mutex::new(std::collections::BTreeSet::new()),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

impl Stats {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: &str) {
        if let Ok(mut map) = self.errors.lock() {
            let key = if map.len() >= MAX_ERROR_KINDS && !map.contains_key(kind) {
                "other".to_owned()
            } else {
                kind.to_owned()
            };
            *map.entry(key).or_insert(0) += 1;
        }
    }

    /// Records a login that took `took`.
    pub fn login(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        if let Ok(mut guard) = self.login.lock()
            && let Some(h) = guard.as_mut()
        {
            h.saturating_record(us);
        }
    }

    /// Records a stamped stanza sent at `sent_micros` (of [`now_micros`]) received now.
    pub fn delivered(&self, sent_micros: u64) {
        let us = now_micros().saturating_sub(sent_micros).max(1);
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut guard) = self.e2e.lock()
            && let Some(h) = guard.as_mut()
        {
            h.saturating_record(us);
        }
    }

    /// Notes the SASL mechanism a login used.
    pub fn mechanism(&self, name: &'static str) {
        if let Ok(mut set) = self.mechanisms.lock() {
            set.insert(name);
        }
    }

    /// The SASL mechanisms logins used, space-separated.
    pub fn mechanisms(&self) -> String {
        self.mechanisms
            .lock()
            .map(|set| set.iter().copied().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    }

    /// Errors so far, by kind.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Total errors so far.
    pub fn error_total(&self) -> u64 {
        self.errors().values().sum()
    }

    /// Login latency so far.
    pub fn login_latency(&self) -> Percentiles {
        self.login
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(Percentiles::of))
            .unwrap_or_default()
    }

    /// End-to-end latency so far.
    pub fn e2e_latency(&self) -> Percentiles {
        self.e2e
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(Percentiles::of))
            .unwrap_or_default()
    }

    /// One progress line (for stderr).
    pub fn progress_line(&self, elapsed: Duration) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "[{:>6.1}s] up {} | logins ok {} failed {} | sent {} recv {} | errors {}",
            elapsed.as_secs_f64(),
            g(&self.sessions_up),
            g(&self.logins_ok),
            g(&self.logins_failed),
            g(&self.sent),
            g(&self.received),
            self.error_total()
        )
    }
}

/// The result of one scenario run, as printed and as written to `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `connect`, `chat`, `presence` or `login-storm`.
    pub scenario: String,
    /// The server address.
    pub server: String,
    /// `starttls` or `direct`.
    pub tls: String,
    /// The SASL mechanisms used (by name).
    pub mechanism: String,
    /// The open-file limit the generator got.
    pub nofile_limit: u64,
    /// Wall time of the measured phase, seconds.
    pub duration_secs: f64,
    /// Sessions (or logins) the scenario asked for.
    pub target: u64,
    /// Logins that completed.
    pub logins_ok: u64,
    /// Logins that failed.
    pub logins_failed: u64,
    /// Sessions still up at the end of the hold (`connect`).
    pub sessions_held: u64,
    /// Completed logins per second over the ramp (or storm) phase.
    pub login_rate_per_sec: f64,
    /// Login latency: TCP connect to bound resource (and initial presence sent).
    pub login_latency: Percentiles,
    /// Stamped stanzas sent.
    pub sent: u64,
    /// Stamped stanzas received.
    pub received: u64,
    /// Received per second over the measured phase.
    pub receive_rate_per_sec: f64,
    /// Send to receive latency of stamped stanzas.
    pub e2e_latency: Percentiles,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Resource use of the watched processes and the generator over the measured phase.
    pub measured: Measured,
}

impl Report {
    /// Writes the human-readable table.
    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "scenario        {}", self.scenario)?;
        writeln!(
            out,
            "server          {} ({}, {})",
            self.server, self.tls, self.mechanism
        )?;
        writeln!(out, "open files      {}", self.nofile_limit)?;
        writeln!(out, "duration        {:.2} s", self.duration_secs)?;
        if self.scenario == "connect" {
            writeln!(out, "sessions held   {}", self.sessions_held)?;
        }
        writeln!(
            out,
            "logins          {} ok / {} failed of {} ({:.1}/s)",
            self.logins_ok, self.logins_failed, self.target, self.login_rate_per_sec
        )?;
        if self.sent > 0 || self.received > 0 {
            writeln!(
                out,
                "stanzas         {} sent / {} received ({:.1}/s received)",
                self.sent, self.received, self.receive_rate_per_sec
            )?;
        }
        writeln!(
            out,
            "{:<15} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
        )?;
        for (name, p) in [
            ("login", &self.login_latency),
            ("end-to-end", &self.e2e_latency),
        ] {
            if p.count == 0 {
                continue;
            }
            writeln!(
                out,
                "{:<15} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name, p.count, p.mean_ms, p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
            )?;
        }
        let m = &self.measured;
        writeln!(
            out,
            "measured        {:.2} s, load average {:.2} -> {:.2}",
            m.secs, m.loadavg_start[0], m.loadavg_end[0]
        )?;
        writeln!(
            out,
            "{:<15} {:>8} {:<16} {:>10} {:>10} {:>8}",
            "process", "pid", "name", "rss0 KiB", "rss1 KiB", "cpu s"
        )?;
        let rows = m.processes.iter().map(|p| ("watched", p));
        for (role, p) in rows.chain(std::iter::once(("generator", &m.generator))) {
            writeln!(
                out,
                "{:<15} {:>8} {:<16} {:>10} {:>10} {:>8.2}",
                role, p.pid, p.name, p.rss_start_kib, p.rss_end_kib, p.cpu_secs
            )?;
        }
        if self.errors.is_empty() {
            writeln!(out, "errors          none")?;
        } else {
            writeln!(out, "errors")?;
            for (kind, n) in &self.errors {
                writeln!(out, "  {kind:<30} {n}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_errors() {
        let s = Stats::default();
        for ms in 1..=100u64 {
            s.login(Duration::from_millis(ms));
        }
        let p = s.login_latency();
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.2, "{p:?}");
        assert!((p.max_ms - 100.0).abs() < 0.2, "{p:?}");
        s.error("auth:not-authorized");
        s.error("auth:not-authorized");
        s.error("timeout:bind");
        assert_eq!(s.error_total(), 3);
        assert_eq!(s.errors().get("auth:not-authorized"), Some(&2));
        for i in 0..(MAX_ERROR_KINDS + 5) {
            s.error(&format!("k{i}"));
        }
        assert!(s.errors().len() <= MAX_ERROR_KINDS + 1);
        assert!(s.errors().contains_key("other"));
        assert_eq!(s.e2e_latency().count, 0);
    }
}
