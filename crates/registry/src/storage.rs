//! Durable Raft storage on redb: the log, the vote and the committed pointer of every shard
//! of a node, in one database file. Snapshots are files of their own (`snapshots`), written
//! outside this file's writer; data directories of earlier versions kept them here, in the
//! `snapshot` table, which is read once at start and emptied (see `load_shard`).
//!
//! **Group commit.** One writer thread owns every write to the file. Appends, truncations,
//! purges and vote changes from all shards queue in one bounded channel; the writer takes
//! everything queued, writes it in one transaction with `Durability::Immediate` (one fsync),
//! then acknowledges each request. `RaftLogStorage::append` returns as soon as the entries are
//! in memory (readable), and openraft learns they are durable through the `LogFlushed`
//! callback after the shared fsync, so a burst of appends from many shards costs one fsync, not
//! one each (DESIGN.md, "The registry's throughput comes from batching").
//!
//! The committed pointer of each shard is not a request of its own: it is noted in memory and
//! written with the next group that holds the log entries it points at, so it never costs an
//! fsync (it only speeds up a restart, which otherwise learns it from the leader).
//!
//! The unpurged log of each shard is also kept in memory for reads; snapshots bound it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote,
};
use parking_lot::Mutex;
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{self, MemberId, TypeConfig};
use crate::pb;

/// Raft log entries by (shard, index), as `pb::Entry`.
const LOG: TableDefinition<'static, (u32, u64), &[u8]> = TableDefinition::new("raft_log");
/// Per-shard small values by (shard, key): see the `KEY_*` constants.
const META: TableDefinition<'static, (u32, &str), &[u8]> = TableDefinition::new("raft_meta");
/// Earlier versions' snapshot of each shard, as `pb::SnapshotData` (its meta under
/// `KEY_SNAPSHOT_META`): read at start, moved to a snapshot file, then removed.
const SNAPSHOT: TableDefinition<'static, u32, &[u8]> = TableDefinition::new("snapshot");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";

/// Most requests one transaction takes; the rest wait for the next one.
const MAX_GROUP: usize = 4096;
/// redb's page cache. The log is read from memory and snapshots live in files of their own,
/// so the cache only serves writes; redb's default (1 GiB) would grow with the file.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption, or the file is open elsewhere).
    #[error("registry storage: {0}")]
    Db(String),
    /// A stored record does not decode.
    #[error("registry storage: damaged record: {0}")]
    Corrupt(String),
    /// The writer thread is gone (shut down or failed).
    #[error("registry storage is closed")]
    Closed,
}

impl StoreError {
    fn db(e: impl std::fmt::Display) -> Self {
        StoreError::Db(e.to_string())
    }
}

type Ack = oneshot::Sender<Result<(), String>>;

enum DiskOp {
    Append {
        shard: u32,
        entries: Vec<(u64, Vec<u8>)>,
        done: LogFlushed<TypeConfig>,
    },
    Truncate {
        shard: u32,
        from: u64,
        done: Ack,
    },
    Purge {
        shard: u32,
        upto: u64,
        log_id: Vec<u8>,
        done: Ack,
    },
    Meta {
        shard: u32,
        key: &'static str,
        value: Vec<u8>,
        done: Option<Ack>,
    },
    DropLegacySnapshot {
        shard: u32,
        done: Ack,
    },
    Stop,
}

/// What is on disk for one shard when a node starts.
#[derive(Debug, Default)]
pub(crate) struct LoadedShard {
    pub(crate) log: BTreeMap<u64, Entry<TypeConfig>>,
    pub(crate) vote: Option<Vote<MemberId>>,
    pub(crate) committed: Option<LogId<MemberId>>,
    pub(crate) purged: Option<LogId<MemberId>>,
    /// The snapshot an earlier version kept in the database, if any.
    pub(crate) legacy_snapshot: Option<(pb::SnapshotMeta, Vec<u8>)>,
}

/// The database file of a node and its writer thread.
#[derive(Debug)]
pub(crate) struct Disk {
    tx: mpsc::Sender<DiskOp>,
    /// Taken by `close`, so the file is released once the writer has stopped.
    db: Mutex<Option<Arc<Database>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Transactions committed (each one fsync), read by tests.
    #[cfg_attr(not(test), allow(dead_code))]
    commits: Arc<AtomicU64>,
    /// Committed pointers noted and not yet written, by shard.
    committed: Arc<Mutex<BTreeMap<u32, LogId<MemberId>>>>,
}

impl std::fmt::Debug for DiskOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskOp::Append { .. } => "Append",
            DiskOp::Truncate { .. } => "Truncate",
            DiskOp::Purge { .. } => "Purge",
            DiskOp::Meta { .. } => "Meta",
            DiskOp::DropLegacySnapshot { .. } => "DropLegacySnapshot",
            DiskOp::Stop => "Stop",
        })
    }
}

impl Disk {
    /// Opens (or creates) the database at `path` and starts the writer thread. `queue` bounds
    /// the requests waiting for the writer; a full queue makes appends wait (backpressure).
    pub(crate) fn open(path: &Path, queue: usize) -> Result<Arc<Disk>, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(StoreError::db)?;
        let txn = db.begin_write().map_err(StoreError::db)?;
        txn.open_table(LOG).map_err(StoreError::db)?;
        txn.open_table(META).map_err(StoreError::db)?;
        txn.open_table(SNAPSHOT).map_err(StoreError::db)?;
        txn.commit().map_err(StoreError::db)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(queue.max(1));
        let writer_db = db.clone();
        let commits = Arc::new(AtomicU64::new(0));
        let committed = Arc::new(Mutex::new(BTreeMap::new()));
        let (writer_commits, writer_committed) = (commits.clone(), committed.clone());
        let writer = std::thread::Builder::new()
            .name("registry-disk".into())
            .spawn(move || writer_loop(writer_db, rx, &writer_commits, &writer_committed))
            .map_err(StoreError::db)?;
        Ok(Arc::new(Disk {
            tx,
            db: Mutex::new(Some(db)),
            writer: Mutex::new(Some(writer)),
            commits,
            committed,
        }))
    }

    /// Stops the writer after the queued requests and waits for it, releasing the file.
    pub(crate) async fn close(&self) {
        let _ = self.tx.send(DiskOp::Stop).await;
        self.db.lock().take();
        let handle = self.writer.lock().take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// Reads what one shard has in the database.
    pub(crate) fn load_shard(&self, shard: u32) -> Result<LoadedShard, StoreError> {
        let db = self.db.lock().clone().ok_or(StoreError::Closed)?;
        let txn = db.begin_read().map_err(StoreError::db)?;
        let log_t = txn.open_table(LOG).map_err(StoreError::db)?;
        let meta_t = txn.open_table(META).map_err(StoreError::db)?;
        let snap_t = txn.open_table(SNAPSHOT).map_err(StoreError::db)?;
        let mut out = LoadedShard::default();
        for row in log_t
            .range((shard, 0)..=(shard, u64::MAX))
            .map_err(StoreError::db)?
        {
            let (k, v) = row.map_err(StoreError::db)?;
            let e = pb::Entry::decode(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let e = codec::entry_from_pb(e).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.log.insert(k.value().1, e);
        }
        let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta_t
                .get((shard, key))
                .map_err(StoreError::db)?
                .map(|v| v.value().to_vec()))
        };
        let corrupt = |e: prost::DecodeError| StoreError::Corrupt(e.to_string());
        if let Some(v) = get(KEY_VOTE)? {
            let v = pb::Vote::decode(v.as_slice()).map_err(corrupt)?;
            out.vote =
                Some(codec::vote_from_pb(Some(v)).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        if let Some(v) = get(KEY_COMMITTED)? {
            out.committed = Some(codec::log_id_from_pb(
                &pb::LogId::decode(v.as_slice()).map_err(corrupt)?,
            ));
        }
        if let Some(v) = get(KEY_PURGED)? {
            out.purged = Some(codec::log_id_from_pb(
                &pb::LogId::decode(v.as_slice()).map_err(corrupt)?,
            ));
        }
        if let Some(meta) = get(KEY_SNAPSHOT_META)? {
            let meta = pb::SnapshotMeta::decode(meta.as_slice()).map_err(corrupt)?;
            let data = snap_t
                .get(shard)
                .map_err(StoreError::db)?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            out.legacy_snapshot = Some((meta, data));
        }
        Ok(out)
    }

    async fn send(&self, op: DiskOp) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::Closed)
    }

    async fn send_and_wait(&self, make: impl FnOnce(Ack) -> DiskOp) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Db(e)),
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Removes the snapshot an earlier version kept in the database for `shard`, once it
    /// has been moved to its file; waits for the commit.
    pub(crate) async fn drop_legacy_snapshot(&self, shard: u32) -> Result<(), StoreError> {
        self.send_and_wait(|done| DiskOp::DropLegacySnapshot { shard, done })
            .await
    }

    /// Notes the committed pointer of `shard`; written with a later group (see the module doc).
    pub(crate) fn note_committed(&self, shard: u32, committed: LogId<MemberId>) {
        self.committed.lock().insert(shard, committed);
    }

    /// Writes a snapshot into the database the way earlier versions did, for migration tests.
    #[cfg(test)]
    pub(crate) fn put_legacy_snapshot(&self, shard: u32, meta: &pb::SnapshotMeta, data: &[u8]) {
        let db = self.db.lock().clone().expect("open");
        let txn = db.begin_write().expect("write");
        {
            let mut snap = txn.open_table(SNAPSHOT).expect("table");
            let mut m = txn.open_table(META).expect("table");
            snap.insert(shard, data).expect("insert");
            m.insert((shard, KEY_SNAPSHOT_META), meta.encode_to_vec().as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }

    /// How many transactions the writer has committed.
    #[cfg(test)]
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// The highest log index each shard has written in this process (entries before the start
/// are not counted: a committed pointer then waits for the next append).
type Written = BTreeMap<u32, u64>;

/// The committed pointers that may go into `group`: those whose entry is written by now or
/// by this group. The others stay noted.
fn committed_for(
    group: &[DiskOp],
    written: &mut Written,
    noted: &Mutex<BTreeMap<u32, LogId<MemberId>>>,
) -> Vec<(u32, Vec<u8>)> {
    for op in group {
        match op {
            DiskOp::Append { shard, entries, .. } => {
                if let Some((last, _)) = entries.last() {
                    written.insert(*shard, *last);
                }
            }
            DiskOp::Truncate { shard, from, .. } => {
                if let Some(w) = written.get_mut(shard) {
                    *w = (*w).min(from.saturating_sub(1));
                }
            }
            _ => {}
        }
    }
    let mut noted = noted.lock();
    let ready: Vec<u32> = noted
        .iter()
        .filter(|(shard, l)| written.get(*shard).is_some_and(|w| l.index <= *w))
        .map(|(shard, _)| *shard)
        .collect();
    ready
        .into_iter()
        .filter_map(|shard| {
            let l = noted.remove(&shard)?;
            Some((shard, codec::log_id_to_pb(&l).encode_to_vec()))
        })
        .collect()
}

fn writer_loop(
    db: Arc<Database>,
    mut rx: mpsc::Receiver<DiskOp>,
    commits: &AtomicU64,
    noted: &Mutex<BTreeMap<u32, LogId<MemberId>>>,
) {
    let mut group: Vec<DiskOp> = Vec::new();
    let mut written = Written::new();
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => group.push(op),
                Err(_) => break,
            }
        }
        let stop = group.iter().any(|op| matches!(op, DiskOp::Stop));
        let committed = committed_for(&group, &mut written, noted);
        let started = std::time::Instant::now();
        let result = write_group(&db, &group, &committed).map_err(|e| e.to_string());
        commits.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("starling_registry_disk_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("starling_registry_disk_group_size").record(group.len() as f64);
        metrics::counter!(
            "starling_registry_disk_commits_total",
            "outcome" => if result.is_ok() { "ok" } else { "error" }
        )
        .increment(1);
        if let Err(e) = &result {
            tracing::error!(error = %e, "registry storage commit failed");
        }
        for op in group.drain(..) {
            match op {
                DiskOp::Append { done, .. } => done
                    .log_io_completed(result.clone().map_err(|e| std::io::Error::other(e.clone()))),
                DiskOp::Truncate { done, .. }
                | DiskOp::Purge { done, .. }
                | DiskOp::DropLegacySnapshot { done, .. } => {
                    let _ = done.send(result.clone());
                }
                DiskOp::Meta { done, .. } => {
                    if let Some(done) = done {
                        let _ = done.send(result.clone());
                    }
                }
                DiskOp::Stop => {}
            }
        }
        if stop {
            break;
        }
    }
}

fn write_group(
    db: &Database,
    group: &[DiskOp],
    committed: &[(u32, Vec<u8>)],
) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        let mut snap = txn.open_table(SNAPSHOT)?;
        for op in group {
            match op {
                DiskOp::Append { shard, entries, .. } => {
                    for (index, bytes) in entries {
                        log.insert((*shard, *index), bytes.as_slice())?;
                    }
                }
                DiskOp::Truncate { shard, from, .. } => {
                    log.retain_in((*shard, *from)..=(*shard, u64::MAX), |_, _| false)?;
                }
                DiskOp::Purge {
                    shard,
                    upto,
                    log_id,
                    ..
                } => {
                    log.retain_in((*shard, 0)..=(*shard, *upto), |_, _| false)?;
                    meta.insert((*shard, KEY_PURGED), log_id.as_slice())?;
                }
                DiskOp::Meta {
                    shard, key, value, ..
                } => {
                    meta.insert((*shard, *key), value.as_slice())?;
                }
                DiskOp::DropLegacySnapshot { shard, .. } => {
                    snap.remove(*shard)?;
                    meta.remove((*shard, KEY_SNAPSHOT_META))?;
                }
                DiskOp::Stop => {}
            }
        }
        for (shard, value) in committed {
            meta.insert((*shard, KEY_COMMITTED), value.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

fn io_err(
    make: fn(AnyError) -> StorageIOError<MemberId>,
    e: impl std::fmt::Display,
) -> StorageError<MemberId> {
    StorageError::IO {
        source: make(AnyError::error(e.to_string())),
    }
}

#[derive(Debug)]
struct MemLog {
    log: BTreeMap<u64, Entry<TypeConfig>>,
    purged: Option<LogId<MemberId>>,
    vote: Option<Vote<MemberId>>,
    committed: Option<LogId<MemberId>>,
}

/// The Raft log storage of one shard (cheap to clone: clones share the log).
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    shard: u32,
    disk: Arc<Disk>,
    mem: Arc<Mutex<MemLog>>,
}

impl LogStore {
    pub(crate) fn new(shard: u32, disk: Arc<Disk>, loaded: &mut LoadedShard) -> Self {
        LogStore {
            shard,
            disk,
            mem: Arc::new(Mutex::new(MemLog {
                log: std::mem::take(&mut loaded.log),
                purged: loaded.purged,
                vote: loaded.vote,
                committed: loaded.committed,
            })),
        }
    }
}

/// `entries` if they begin at the range's start, else nothing. A leader's replication task
/// may ask for entries a concurrent purge (after a snapshot) has just removed; answering with
/// the later entries would ship them with the wrong `prev_log_id`, and the follower would
/// apply a log with a hole. Nothing is a legal answer ("fewer entries than asked"): openraft
/// then sends a heartbeat, sees the purge, and sends the snapshot.
fn contiguous_from(
    start: std::ops::Bound<u64>,
    entries: Vec<Entry<TypeConfig>>,
) -> Vec<Entry<TypeConfig>> {
    let want = match start {
        std::ops::Bound::Included(i) => Some(i),
        std::ops::Bound::Excluded(i) => Some(i.saturating_add(1)),
        std::ops::Bound::Unbounded => None,
    };
    match (want, entries.first()) {
        (Some(w), Some(first)) if first.log_id.index != w => {
            metrics::counter!("starling_registry_log_reads_behind_purge_total").increment(1);
            Vec::new()
        }
        _ => entries,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<MemberId>> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let mem = self.mem.lock();
        let entries: Vec<Entry<TypeConfig>> = mem
            .log
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect();
        Ok(contiguous_from(start, entries))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<MemberId>> {
        let mem = self.mem.lock();
        let last = mem
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(mem.purged);
        Ok(LogState {
            last_purged_log_id: mem.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<MemberId>) -> Result<(), StorageError<MemberId>> {
        let value = codec::vote_to_pb(vote).encode_to_vec();
        let shard = self.shard;
        self.disk
            .send_and_wait(|done| DiskOp::Meta {
                shard,
                key: KEY_VOTE,
                value,
                done: Some(done),
            })
            .await
            .map_err(|e| io_err(StorageIOError::write_vote, e))?;
        self.mem.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<MemberId>>, StorageError<MemberId>> {
        Ok(self.mem.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<MemberId>>,
    ) -> Result<(), StorageError<MemberId>> {
        self.mem.lock().committed = committed;
        if let Some(c) = committed {
            // Not waited for, and no request of its own (see the module doc).
            self.disk.note_committed(self.shard, c);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<MemberId>>, StorageError<MemberId>> {
        Ok(self.mem.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<MemberId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut encoded = Vec::new();
        {
            let mut mem = self.mem.lock();
            for e in entries {
                encoded.push((e.log_id.index, codec::entry_to_pb(&e).encode_to_vec()));
                mem.log.insert(e.log_id.index, e);
            }
        }
        metrics::counter!("starling_registry_log_appended_entries_total")
            .increment(encoded.len() as u64);
        self.disk
            .send(DiskOp::Append {
                shard: self.shard,
                entries: encoded,
                done: callback,
            })
            .await
            .map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    async fn truncate(&mut self, log_id: LogId<MemberId>) -> Result<(), StorageError<MemberId>> {
        {
            let mut mem = self.mem.lock();
            let _ = mem.log.split_off(&log_id.index);
        }
        let shard = self.shard;
        self.disk
            .send_and_wait(|done| DiskOp::Truncate {
                shard,
                from: log_id.index,
                done,
            })
            .await
            .map_err(|e| io_err(StorageIOError::write_logs, e))
    }

    async fn purge(&mut self, log_id: LogId<MemberId>) -> Result<(), StorageError<MemberId>> {
        {
            let mut mem = self.mem.lock();
            let keep = mem.log.split_off(&log_id.index.saturating_add(1));
            mem.log = keep;
            mem.purged = Some(log_id);
        }
        let shard = self.shard;
        let bytes = codec::log_id_to_pb(&log_id).encode_to_vec();
        self.disk
            .send_and_wait(|done| DiskOp::Purge {
                shard,
                upto: log_id.index,
                log_id: bytes,
                done,
            })
            .await
            .map_err(|e| io_err(StorageIOError::write_logs, e))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "starling-registry-{name}-{}-{}",
            std::process::id(),
            crate::proposer::now_ms()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_below_a_purge_answer_nothing_rather_than_a_gap() {
        use std::ops::Bound;
        let entry = |i: u64| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
            payload: openraft::EntryPayload::Blank,
        };
        let later = vec![entry(5010), entry(5011)];
        assert!(contiguous_from(Bound::Included(0), later.clone()).is_empty());
        assert_eq!(
            contiguous_from(Bound::Included(5010), later.clone()).len(),
            2
        );
        assert_eq!(
            contiguous_from(Bound::Excluded(5009), later.clone()).len(),
            2
        );
        assert_eq!(contiguous_from(Bound::Unbounded, later).len(), 2);
        assert!(contiguous_from(Bound::Included(3), Vec::new()).is_empty());
    }

    #[tokio::test]
    async fn group_commit_shares_fsyncs_and_survives_reopen() {
        let dir = temp_dir("disk");
        let path = dir.join("r.redb");
        let disk = Disk::open(&path, 8192).unwrap();
        let before = disk.commits();
        // Many writes queued back to back, from two shards: the writer takes them together.
        for i in 0..2000u64 {
            let shard = u32::try_from(i % 2).unwrap();
            let value = codec::log_id_to_pb(&LogId::new(openraft::CommittedLeaderId::new(1, 1), i))
                .encode_to_vec();
            disk.send(DiskOp::Meta {
                shard,
                key: KEY_COMMITTED,
                value,
                done: None,
            })
            .await
            .unwrap();
        }
        let vote = Vote::new(7, 3);
        disk.send_and_wait(|done| DiskOp::Meta {
            shard: 1,
            key: KEY_VOTE,
            value: codec::vote_to_pb(&vote).encode_to_vec(),
            done: Some(done),
        })
        .await
        .unwrap();
        let commits = disk.commits() - before;
        assert!(commits < 200, "{commits} commits for 2001 writes");
        disk.close().await;
        drop(disk);

        let disk = Disk::open(&path, 16).unwrap();
        let s0 = disk.load_shard(0).unwrap();
        let s1 = disk.load_shard(1).unwrap();
        assert_eq!(s0.committed.map(|l| l.index), Some(1998));
        assert_eq!(s1.committed.map(|l| l.index), Some(1999));
        assert_eq!(s1.vote, Some(vote));
        assert_eq!(s0.vote, None);
        disk.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
