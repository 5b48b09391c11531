//! A history checker for the registry's key model, a register per full JID (its value: the
//! stream id of the bound session, or none).
//!
//! Clients record every operation with its invoke and complete times and its outcome. The
//! workload writes each key from one writer, one write at a time, with unique values, and a
//! writer abandons a key after a failed write (whose outcome is unknown). So the writes of a
//! key are totally ordered, all acknowledged but perhaps the last. A history is linearizable
//! for such a register when every read
//! - returns a value whose write was invoked before the read completed (no reads from the
//!   future),
//! - does not return a value overwritten by a write acknowledged before the read was invoked
//!   (no stale reads),
//! - and reads ordered in real time see values in write order (no going back),
//!
//! and, after the faults, the value of every key is its last acknowledged write or the
//! unknown write after it: every acknowledged write is present.
//!
//! Used by the in-process cluster tests of `crates/registry` and the multi-process fault
//! tests of `tests/tests/registry.rs`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One write: `value` is the stream id a bind wrote to the register `key` (a full JID).
#[derive(Debug, Clone)]
pub struct Write {
    pub key: String,
    pub value: String,
    pub invoke: Instant,
    pub complete: Instant,
    pub ok: bool,
}

/// One completed read of `key`: `value` is the stream id seen, or none.
#[derive(Debug, Clone)]
pub struct Read {
    pub key: String,
    pub value: Option<String>,
    pub invoke: Instant,
    pub complete: Instant,
}

/// Every operation of a run, as the clients recorded them.
#[derive(Debug, Default)]
pub struct History {
    pub writes: Vec<Write>,
    pub reads: Vec<Read>,
}

impl History {
    /// Checks the history and the final values (read linearizably after the workload);
    /// `Err` names the first violation.
    pub fn check(&self, finals: &HashMap<String, Option<String>>) -> Result<Stats, String> {
        let mut by_key: HashMap<&str, Vec<&Write>> = HashMap::new();
        for w in &self.writes {
            by_key.entry(&w.key).or_default().push(w);
        }
        let mut stats = Stats::default();
        for (key, writes) in &mut by_key {
            writes.sort_by_key(|w| w.invoke);
            for pair in writes.windows(2) {
                if pair[1].invoke < pair[0].complete {
                    return Err(format!("{key}: workload wrote concurrently"));
                }
                if !pair[0].ok {
                    return Err(format!("{key}: workload wrote after a failed write"));
                }
            }
        }
        // Position of a value in its key's write order: 0 for none, i+1 for the i-th write.
        let pos = |key: &str, value: &Option<String>| -> Result<usize, String> {
            match value {
                None => Ok(0),
                Some(v) => by_key
                    .get(key)
                    .and_then(|ws| ws.iter().position(|w| &w.value == v))
                    .map(|i| i + 1)
                    .ok_or_else(|| format!("{key}: read {v}, which nobody wrote")),
            }
        };
        let mut reads_by_key: HashMap<&str, Vec<(&Read, usize)>> = HashMap::new();
        for r in &self.reads {
            let p = pos(&r.key, &r.value)?;
            let writes = by_key.get(r.key.as_str()).map_or(&[][..], Vec::as_slice);
            if p > 0 {
                let w = writes[p - 1];
                if w.invoke > r.complete {
                    return Err(format!(
                        "{}: read {:?} before it was written",
                        r.key, r.value
                    ));
                }
            }
            if let Some(next) = writes.get(p)
                && next.ok
                && next.complete < r.invoke
            {
                return Err(format!(
                    "{}: stale read {:?}: {} was acknowledged before the read began",
                    r.key, r.value, next.value
                ));
            }
            reads_by_key.entry(&r.key).or_default().push((r, p));
            stats.reads += 1;
        }
        for (key, reads) in &mut reads_by_key {
            reads.sort_by_key(|(r, _)| r.invoke);
            for (i, (a, pa)) in reads.iter().enumerate() {
                for (b, pb) in &reads[i + 1..] {
                    if a.complete < b.invoke && pb < pa {
                        return Err(format!(
                            "{key}: read {:?} after a read of the later {:?}",
                            b.value, a.value
                        ));
                    }
                }
            }
        }
        for (key, writes) in &by_key {
            let last_ok = writes.iter().rposition(|w| w.ok).map_or(0, |i| i + 1);
            let Some(fin) = finals.get(*key) else {
                return Err(format!("{key}: no final read"));
            };
            let p = pos(key, fin)?;
            stats.acknowledged += writes.iter().filter(|w| w.ok).count();
            stats.unknown += writes.iter().filter(|w| !w.ok).count();
            if p < last_ok {
                return Err(format!(
                    "{key}: acknowledged write {} lost (final {fin:?})",
                    writes[last_ok - 1].value
                ));
            }
            if p > last_ok && (p != last_ok + 1 || writes[p - 1].ok) {
                return Err(format!("{key}: final value {fin:?} out of order"));
            }
        }
        Ok(stats)
    }
}

/// What a history that checked contained.
#[derive(Debug, Default)]
pub struct Stats {
    pub acknowledged: usize,
    pub unknown: usize,
    pub reads: usize,
}

impl History {
    /// Every key written.
    pub fn keys(&self) -> BTreeSet<String> {
        self.writes.iter().map(|w| w.key.clone()).collect()
    }

    /// Reads every key's final value with `read` (linearizable, after the workload) and
    /// checks the history against them.
    pub async fn check_reading<F, Fut>(&self, read: F) -> Result<Stats, String>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Option<String>, String>>,
    {
        let mut finals = HashMap::new();
        for key in self.keys() {
            let value = read(key.clone())
                .await
                .map_err(|e| format!("final read of {key}: {e}"))?;
            finals.insert(key, value);
        }
        self.check(&finals)
    }
}

/// A workload that fits the checker: `writers` tasks each write keys `w{task}k{n}@x/r` one
/// write at a time with unique values, `values_per_key` values per key, moving to a new key
/// after a failed write; `readers` tasks read random keys written so far.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Writing tasks.
    pub writers: usize,
    /// Reading tasks.
    pub readers: usize,
    /// Values written to a key before moving on.
    pub values_per_key: usize,
}

/// A running [`Workload`]; [`RunningWorkload::stop`] ends it and returns the history.
#[derive(Debug)]
pub struct RunningWorkload {
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Workload {
    /// Starts the tasks. `write(key, value)` answers whether the write was acknowledged;
    /// `read(key)` the value read, or `None` when the read failed (not recorded).
    pub fn start<W, WF, R, RF>(self, write: W, read: R) -> RunningWorkload
    where
        W: Fn(String, String) -> WF + Clone + Send + Sync + 'static,
        WF: Future<Output = bool> + Send + 'static,
        R: Fn(String) -> RF + Clone + Send + Sync + 'static,
        RF: Future<Output = Option<Option<String>>> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(History::default()));
        let keys: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for w in 0..self.writers {
            let (write, history, keys, stop) =
                (write.clone(), history.clone(), keys.clone(), stop.clone());
            let per_key = self.values_per_key.max(1);
            tasks.push(tokio::spawn(async move {
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{w}k{k}@x/r");
                    lock(&keys).push(key.clone());
                    for v in 0..per_key {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let value = format!("{w}-{k}-{v}");
                        let invoke = Instant::now();
                        let ok = write(key.clone(), value.clone()).await;
                        lock(&history).writes.push(Write {
                            key: key.clone(),
                            value,
                            invoke,
                            complete: Instant::now(),
                            ok,
                        });
                        if !ok {
                            break;
                        }
                    }
                    k += 1;
                }
            }));
        }
        for r in 0..self.readers {
            let (read, history, keys, stop) =
                (read.clone(), history.clone(), keys.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    let key = {
                        let keys = lock(&keys);
                        (!keys.is_empty()).then(|| keys[(i * 7919) % keys.len()].clone())
                    };
                    i += 1;
                    let Some(key) = key else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let invoke = Instant::now();
                    if let Some(value) = read(key.clone()).await {
                        lock(&history).reads.push(Read {
                            key,
                            value,
                            invoke,
                            complete: Instant::now(),
                        });
                    }
                }
            }));
        }
        RunningWorkload {
            stop,
            history,
            tasks,
        }
    }
}

impl RunningWorkload {
    /// Stops every task, waits for the operations in flight to finish, and returns the
    /// history.
    pub async fn stop(self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            // A task that panicked lost its last operations; the checker then sees fewer.
            let _ = t.await;
        }
        std::mem::take(&mut *lock(&self.history))
    }

    /// How many writes recorded so far were acknowledged and satisfy `filter`.
    pub fn acknowledged(&self, filter: impl Fn(&Write) -> bool) -> usize {
        lock(&self.history)
            .writes
            .iter()
            .filter(|w| w.ok && filter(w))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn w(base: Instant, v: &str, a: u64, b: u64, ok: bool) -> Write {
        Write {
            key: "k".into(),
            value: v.into(),
            invoke: t(base, a),
            complete: t(base, b),
            ok,
        }
    }

    fn r(base: Instant, v: Option<&str>, a: u64, b: u64) -> Read {
        Read {
            key: "k".into(),
            value: v.map(str::to_owned),
            invoke: t(base, a),
            complete: t(base, b),
        }
    }

    #[test]
    fn checker_accepts_and_rejects() {
        let b = Instant::now();
        let writes = vec![
            w(b, "1", 0, 10, true),
            w(b, "2", 20, 30, true),
            w(b, "3", 40, 50, false),
        ];
        let finals = |v: &str| HashMap::from([("k".to_owned(), Some(v.to_owned()))]);
        let good = History {
            writes: writes.clone(),
            reads: vec![
                r(b, None, 0, 5),
                r(b, Some("1"), 11, 19),
                r(b, Some("2"), 25, 26),
                r(b, Some("3"), 45, 60),
            ],
        };
        assert!(good.check(&finals("2")).is_ok());
        assert!(good.check(&finals("3")).is_ok());
        // The acknowledged write 2 is lost.
        assert!(good.check(&finals("1")).is_err());
        // A stale read: 2 was acknowledged at 30, the read began at 31.
        let stale = History {
            writes: writes.clone(),
            reads: vec![r(b, Some("1"), 31, 35)],
        };
        assert!(stale.check(&finals("2")).is_err());
        // A read from the future.
        let future = History {
            writes: writes.clone(),
            reads: vec![r(b, Some("2"), 12, 15)],
        };
        assert!(future.check(&finals("2")).is_err());
        // Going back: 2 then, later, 1.
        let back = History {
            writes,
            reads: vec![r(b, Some("2"), 21, 22), r(b, Some("1"), 23, 29)],
        };
        assert!(back.check(&finals("2")).is_err());
    }
}
