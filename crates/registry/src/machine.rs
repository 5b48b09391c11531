//! The openraft state machine of one shard: applies committed batches to a [`ShardState`],
//! publishes the resulting account changes on the shard's watch channel, and builds and
//! installs snapshots (persisted as [`SnapshotFiles`], so a restart starts from the latest
//! snapshot and replays the committed log after it).
//!
//! Building a snapshot holds the state's write lock only to freeze it (O(1), see `state` and
//! `accounts`); encoding the frozen view and writing the file run on a blocking thread while
//! `apply` and the reads carry on. Installing one decodes it and writes its file before taking
//! the lock, which then only swaps the state in.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, BasicNode, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use tokio::sync::broadcast;

use crate::codec::{self, MemberId, TypeConfig};
use crate::pb;
use crate::snapshots::SnapshotFiles;
use crate::state::ShardState;
use crate::storage::StoreError;

#[derive(Debug)]
struct Inner {
    last_applied: Option<LogId<MemberId>>,
    membership: StoredMembership<MemberId, BasicNode>,
    data: ShardState,
}

/// The state machine of one shard, shared by openraft and the read path.
#[derive(Debug)]
pub(crate) struct Machine {
    shard: u32,
    inner: RwLock<Inner>,
    /// The latest snapshot's meta; its data stays on disk until a follower needs it (a
    /// snapshot is the size of the shard: keeping it in memory would double the footprint).
    current: Mutex<Option<SnapshotMeta<MemberId, BasicNode>>>,
    files: Arc<SnapshotFiles>,
    events: broadcast::Sender<Arc<pb::WatchEvent>>,
    built: AtomicU64,
}

impl Machine {
    /// The state machine of `shard`, starting from its persisted snapshot if there is one.
    pub(crate) fn open(
        shard: u32,
        files: Arc<SnapshotFiles>,
        snapshot: Option<(pb::SnapshotMeta, Vec<u8>)>,
        watch_capacity: usize,
    ) -> Result<Arc<Machine>, StoreError> {
        let mut inner = Inner {
            last_applied: None,
            membership: StoredMembership::default(),
            data: ShardState::default(),
        };
        let mut current = None;
        if let Some((meta, data)) = snapshot {
            let meta = codec::snapshot_meta_from_pb(&meta)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let state = pb::SnapshotData::decode(data.as_slice())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
            inner.data = ShardState::from_snapshot(state);
            files.note_loaded(shard, meta.last_log_id);
            current = Some(meta);
        }
        let (events, _) = broadcast::channel(watch_capacity.max(1));
        Ok(Arc::new(Machine {
            shard,
            inner: RwLock::new(inner),
            current: Mutex::new(current),
            files,
            events,
            built: AtomicU64::new(0),
        }))
    }

    /// Reads the state as of the last applied entry; also returns that entry's index.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&ShardState) -> T) -> (u64, T) {
        let inner = self.inner.read();
        let index = inner.last_applied.map_or(0, |l| l.index);
        (index, f(&inner.data))
    }

    /// Subscribes to the account changes of this shard, in log order.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<pb::WatchEvent>> {
        self.events.subscribe()
    }

    fn publish(&self, event: pb::WatchEvent) {
        // No subscriber is not an error: nobody watches this shard here.
        let _ = self.events.send(Arc::new(event));
    }

    /// Makes `meta` the current snapshot unless a later one already is (a build that froze
    /// the state before an install may finish after it).
    fn set_current(&self, meta: &SnapshotMeta<MemberId, BasicNode>) {
        let mut current = self.current.lock();
        if current
            .as_ref()
            .is_none_or(|c| c.last_log_id <= meta.last_log_id)
        {
            *current = Some(meta.clone());
        }
    }
}

/// Runs `f` on the blocking pool: snapshot encoding, decoding and file I/O take milliseconds
/// to seconds, which must not stall the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StorageError<MemberId>> {
    tokio::task::spawn_blocking(f).await.map_err(sm_err)
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<MemberId> {
    StorageError::IO {
        source: StorageIOError::write_state_machine(AnyError::error(e.to_string())),
    }
}

/// openraft's handle on a shard's [`Machine`].
#[derive(Debug, Clone)]
pub(crate) struct MachineStore(pub(crate) Arc<Machine>);

impl RaftSnapshotBuilder<TypeConfig> for MachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<MemberId>> {
        let m = &self.0;
        let (frozen, meta) = {
            let mut inner = m.inner.write();
            let frozen = inner.data.freeze();
            let n = m.built.fetch_add(1, Ordering::Relaxed) + 1;
            let snapshot_id = match inner.last_applied {
                Some(l) => format!("{}-{}-{}-{}", m.shard, l.leader_id.term, l.index, n),
                None => format!("{}-0-0-{}", m.shard, n),
            };
            let meta = SnapshotMeta {
                last_log_id: inner.last_applied,
                last_membership: inner.membership.clone(),
                snapshot_id,
            };
            (frozen, meta)
        };
        let (files, shard, last) = (m.files.clone(), m.shard, meta.last_log_id);
        let meta_pb = codec::snapshot_meta_to_pb(&meta);
        let data = blocking(move || {
            let started = Instant::now();
            let data = frozen.encode();
            let sessions = frozen.count();
            // Dropped before the write, so applies merge their overlay back the sooner.
            drop(frozen);
            let encoded = started.elapsed();
            metrics::histogram!("starling_registry_snapshot_encode_seconds")
                .record(encoded.as_secs_f64());
            tracing::debug!(
                shard,
                sessions,
                bytes = data.len(),
                ?encoded,
                "snapshot encoded"
            );
            let started = Instant::now();
            // Not written if a later snapshot was installed meanwhile; openraft keeps the
            // later one as its snapshot then.
            files.write(shard, last, &meta_pb, &data)?;
            metrics::histogram!("starling_registry_snapshot_write_seconds")
                .record(started.elapsed().as_secs_f64());
            Ok::<_, StoreError>(data)
        })
        .await?
        .map_err(sm_err)?;
        metrics::counter!("starling_registry_snapshots_built_total").increment(1);
        metrics::gauge!("starling_registry_snapshot_bytes", "shard" => m.shard.to_string())
            .set(data.len() as f64);
        m.set_current(&meta);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<MemberId>>,
            StoredMembership<MemberId, BasicNode>,
        ),
        StorageError<MemberId>,
    > {
        let inner = self.0.inner.read();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(
        &mut self,
        entries: I,
    ) -> Result<Vec<Vec<pb::OpResult>>, StorageError<MemberId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let m = &self.0;
        let mut out = Vec::new();
        let mut inner = m.inner.write();
        inner.data.quiet = m.events.receiver_count() == 0;
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(Vec::new()),
                EntryPayload::Normal(batch) => {
                    let applied = inner.data.apply(&batch);
                    metrics::counter!("starling_registry_applied_ops_total")
                        .increment(batch.ops.len() as u64);
                    if !applied.changes.is_empty() {
                        m.publish(pb::WatchEvent {
                            shard: m.shard,
                            index: entry.log_id.index,
                            changes: applied.changes,
                            resync: false,
                        });
                    }
                    out.push(applied.results);
                }
                EntryPayload::Membership(mem) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), mem);
                    out.push(Vec::new());
                }
            }
        }
        metrics::gauge!("starling_registry_sessions", "shard" => m.shard.to_string())
            .set(inner.data.count() as f64);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<MemberId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<MemberId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<MemberId>> {
        let m = &self.0;
        let data = snapshot.into_inner();
        let (files, shard, last) = (m.files.clone(), m.shard, meta.last_log_id);
        let meta_pb = codec::snapshot_meta_to_pb(meta);
        // Decoded and durable before the state is replaced: openraft purges the log after this.
        let state = blocking(move || {
            let state = pb::SnapshotData::decode(data.as_slice())?;
            let written = files.write(shard, last, &meta_pb, &data);
            drop(data);
            Ok::<_, prost::DecodeError>(written.map(|_| ShardState::from_snapshot(state)))
        })
        .await?
        .map_err(|e| StorageError::IO {
            source: StorageIOError::read_snapshot(
                Some(meta.signature()),
                AnyError::error(e.to_string()),
            ),
        })?
        .map_err(sm_err)?;
        let old = {
            let mut inner = m.inner.write();
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership.clone();
            let old = std::mem::replace(&mut inner.data, state);
            m.publish(pb::WatchEvent {
                shard: m.shard,
                index: meta.last_log_id.map_or(0, |l| l.index),
                changes: Vec::new(),
                resync: true,
            });
            old
        };
        // Freed outside the lock: dropping a shard's sessions takes a while.
        drop(old);
        metrics::counter!("starling_registry_snapshots_installed_total").increment(1);
        m.set_current(meta);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<MemberId>> {
        if self.0.current.lock().is_none() {
            return Ok(None);
        }
        let read_err = |e: String| StorageError::IO {
            source: StorageIOError::read_snapshot(None, AnyError::error(e)),
        };
        let (files, shard) = (self.0.files.clone(), self.0.shard);
        let Some((meta, data)) = blocking(move || files.read(shard))
            .await?
            .map_err(|e| read_err(e.to_string()))?
        else {
            return Ok(None);
        };
        let meta = codec::snapshot_meta_from_pb(&meta).map_err(|e| read_err(e.to_string()))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
