//! Snapshot files: the latest snapshot of each shard in a file of its own,
//! `<data dir>/snapshots/shard-<n>.snap`, beside the redb log.
//!
//! A snapshot is the size of its shard (megabytes), so it is written here, on the calling
//! (blocking) thread, and never through the log's group-commit writer: appends, and with them
//! every write's commit, do not wait behind it. A file is written whole to a temporary name,
//! fsynced, renamed over the previous one and the directory fsynced, so after a crash the
//! name holds either the old snapshot or the new one, complete.
//!
//! **Invariant:** a snapshot is durable before `build_snapshot` or `install_snapshot`
//! returns, because openraft purges the log up to it right after; and a file is never
//! replaced by an older snapshot (a build that started before an install finishes after it).
//!
//! Layout of a file: the magic `STSNAP\0\x01`, the length of the meta (u32, little endian),
//! the `pb::SnapshotMeta`, the length of the data (u64, little endian), the
//! `pb::SnapshotData`; nothing after it. Anything else reads as damaged.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::LogId;
use parking_lot::Mutex;
use prost::Message;

use crate::codec::{self, MemberId};
use crate::pb;
use crate::storage::{Disk, StoreError};

const MAGIC: &[u8; 8] = b"STSNAP\0\x01";
const TMP_MARK: &str = ".tmp-";

/// The snapshot files of a node.
#[derive(Debug)]
pub(crate) struct SnapshotFiles {
    dir: PathBuf,
    /// Makes temporary names unique within the process.
    seq: AtomicU64,
    /// The last log id of the snapshot on disk, by shard; held while a file is replaced, so
    /// writes of one shard are ordered (and the node writes one snapshot at a time: they are
    /// rare, and one sequential write at a time suits the disk the log shares).
    latest: Mutex<BTreeMap<u32, Option<LogId<MemberId>>>>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Db(format!("{what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync", dir, e))
}

impl SnapshotFiles {
    /// The snapshot files under `dir`, created if missing; temporary files left by a crash
    /// are removed.
    pub(crate) fn open(dir: &Path) -> Result<SnapshotFiles, StoreError> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        for entry in std::fs::read_dir(dir).map_err(|e| io("list", dir, e))? {
            let entry = entry.map_err(|e| io("list", dir, e))?;
            if entry.file_name().to_string_lossy().contains(TMP_MARK) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(SnapshotFiles {
            dir: dir.to_owned(),
            seq: AtomicU64::new(0),
            latest: Mutex::new(BTreeMap::new()),
        })
    }

    fn path(&self, shard: u32) -> PathBuf {
        self.dir.join(format!("shard-{shard}.snap"))
    }

    /// The snapshot of `shard` on disk: its meta and data.
    pub(crate) fn read(
        &self,
        shard: u32,
    ) -> Result<Option<(pb::SnapshotMeta, Vec<u8>)>, StoreError> {
        let path = self.path(shard);
        let mut buf = match std::fs::read(&path) {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path, e)),
        };
        let (meta, range) = parse(&buf)
            .ok_or_else(|| StoreError::Corrupt(format!("snapshot file {}", path.display())))?;
        buf.truncate(range.end);
        buf.drain(..range.start);
        Ok(Some((meta, buf)))
    }

    /// Notes the log id of the snapshot of `shard` found on disk at start.
    pub(crate) fn note_loaded(&self, shard: u32, last: Option<LogId<MemberId>>) {
        self.latest.lock().insert(shard, last);
    }

    /// Durably replaces the snapshot of `shard` (see the module doc). Blocking: call it from
    /// a blocking thread. Returns `false`, writing nothing, when the file already holds a
    /// later snapshot.
    pub(crate) fn write(
        &self,
        shard: u32,
        last: Option<LogId<MemberId>>,
        meta: &pb::SnapshotMeta,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        let mut latest = self.latest.lock();
        if latest.get(&shard).is_some_and(|on_disk| *on_disk > last) {
            return Ok(false);
        }
        let path = self.path(shard);
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!("shard-{shard}.snap{TMP_MARK}{n}"));
        let result = write_file(&tmp, meta, data).and_then(|()| {
            std::fs::rename(&tmp, &path).map_err(|e| io("rename", &tmp, e))?;
            sync_dir(&self.dir)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        latest.insert(shard, last);
        Ok(true)
    }
}

fn write_file(path: &Path, meta: &pb::SnapshotMeta, data: &[u8]) -> Result<(), StoreError> {
    let meta = meta.encode_to_vec();
    let meta_len = u32::try_from(meta.len())
        .map_err(|_| StoreError::Corrupt("snapshot meta over 4 GiB".into()))?;
    let mut head = Vec::with_capacity(MAGIC.len() + 4 + meta.len() + 8);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&meta_len.to_le_bytes());
    head.extend_from_slice(&meta);
    head.extend_from_slice(&(data.len() as u64).to_le_bytes());
    let mut file = File::create(path).map_err(|e| io("create", path, e))?;
    file.write_all(&head)
        .and_then(|()| file.write_all(data))
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write", path, e))
}

/// The meta of a snapshot file and where its data lies in it; `None` if it is damaged.
fn parse(buf: &[u8]) -> Option<(pb::SnapshotMeta, std::ops::Range<usize>)> {
    let rest = buf.strip_prefix(MAGIC.as_slice())?;
    let (meta_len, rest) = rest.split_first_chunk::<4>()?;
    let meta_len = usize::try_from(u32::from_le_bytes(*meta_len)).ok()?;
    if rest.len() < meta_len {
        return None;
    }
    let (meta, rest) = rest.split_at(meta_len);
    let meta = pb::SnapshotMeta::decode(meta).ok()?;
    let (data_len, rest) = rest.split_first_chunk::<8>()?;
    let data_len = usize::try_from(u64::from_le_bytes(*data_len)).ok()?;
    if rest.len() != data_len {
        return None;
    }
    let start = buf.len() - data_len;
    Some((meta, start..buf.len()))
}

/// The snapshot `shard` starts from: its file, or the snapshot an earlier version kept in the
/// database (`legacy`, from [`Disk::load_shard`]). A legacy snapshot is moved: written to its
/// file (when it is the later of the two), then removed from the database, so it is read
/// only once.
pub(crate) async fn latest_snapshot(
    disk: &Disk,
    files: &SnapshotFiles,
    shard: u32,
    legacy: Option<(pb::SnapshotMeta, Vec<u8>)>,
) -> Result<Option<(pb::SnapshotMeta, Vec<u8>)>, StoreError> {
    let file = files.read(shard)?;
    let Some(legacy) = legacy else {
        return Ok(file);
    };
    let last = |m: &pb::SnapshotMeta| codec::opt_log_id_from_pb(m.last_log_id.as_ref());
    let chosen = if file
        .as_ref()
        .is_none_or(|(meta, _)| last(meta) < last(&legacy.0))
    {
        files.write(shard, last(&legacy.0), &legacy.0, &legacy.1)?;
        Some(legacy)
    } else {
        file
    };
    disk.drop_legacy_snapshot(shard).await?;
    tracing::info!(
        shard,
        "moved the shard's snapshot from registry.redb to its own file"
    );
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::temp_dir;

    fn log_id(index: u64) -> Option<LogId<MemberId>> {
        Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index))
    }

    fn meta(id: &str) -> pb::SnapshotMeta {
        pb::SnapshotMeta {
            snapshot_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_written_snapshot_survives_reopen_and_is_never_replaced_by_an_older_one() {
        let dir = temp_dir("snapfiles").join("snapshots");
        let files = SnapshotFiles::open(&dir).unwrap();
        assert!(files.read(0).unwrap().is_none());
        assert!(files.write(0, log_id(10), &meta("a"), b"ten").unwrap());
        assert!(files.write(1, log_id(3), &meta("b"), b"").unwrap());
        assert!(files.write(0, log_id(20), &meta("c"), b"twenty").unwrap());
        // A build that froze at 15 and finished after the install at 20.
        assert!(!files.write(0, log_id(15), &meta("d"), b"fifteen").unwrap());
        // A crash left a temporary file behind.
        std::fs::write(dir.join("shard-0.snap.tmp-99"), b"half").unwrap();
        drop(files);

        let files = SnapshotFiles::open(&dir).unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.contains(TMP_MARK)), "{names:?}");
        let (m, data) = files.read(0).unwrap().unwrap();
        assert_eq!(
            (m.snapshot_id.as_str(), data.as_slice()),
            ("c", &b"twenty"[..])
        );
        let (m, data) = files.read(1).unwrap().unwrap();
        assert_eq!((m.snapshot_id.as_str(), data.len()), ("b", 0));

        files.note_loaded(0, log_id(20));
        assert!(!files.write(0, log_id(19), &meta("e"), b"").unwrap());
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    fn meta_at(id: &str, index: u64) -> pb::SnapshotMeta {
        pb::SnapshotMeta {
            snapshot_id: id.into(),
            last_log_id: log_id(index).as_ref().map(codec::log_id_to_pb),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_snapshot_an_earlier_version_kept_in_the_database_moves_to_its_file_once() {
        let dir = temp_dir("snapmigrate");
        let disk = Disk::open(&dir.join("registry.redb"), 16).unwrap();
        disk.put_legacy_snapshot(0, &meta_at("legacy0", 7), b"zero");
        disk.put_legacy_snapshot(1, &meta_at("legacy1", 7), b"one");
        let files = SnapshotFiles::open(&dir.join("snapshots")).unwrap();
        // Shard 1 already has a later file (say, a crash between the move and the removal
        // and a snapshot since): the file wins.
        assert!(
            files
                .write(1, log_id(9), &meta_at("file1", 9), b"uno")
                .unwrap()
        );

        let mut got = Vec::new();
        for shard in 0..3 {
            let legacy = disk.load_shard(shard).unwrap().legacy_snapshot;
            assert_eq!(legacy.is_some(), shard < 2);
            let s = latest_snapshot(&disk, &files, shard, legacy).await.unwrap();
            got.push(s.map(|(m, d)| (m.snapshot_id, d)));
        }
        assert_eq!(
            got,
            vec![
                Some(("legacy0".to_owned(), b"zero".to_vec())),
                Some(("file1".to_owned(), b"uno".to_vec())),
                None
            ]
        );
        for shard in 0..2 {
            assert!(disk.load_shard(shard).unwrap().legacy_snapshot.is_none());
        }
        disk.close().await;
        drop((disk, files));

        // After a restart the files alone hold them.
        let disk = Disk::open(&dir.join("registry.redb"), 16).unwrap();
        let files = SnapshotFiles::open(&dir.join("snapshots")).unwrap();
        let (m, d) = latest_snapshot(&disk, &files, 0, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.snapshot_id.as_str(), d.as_slice()),
            ("legacy0", &b"zero"[..])
        );
        disk.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_files_are_reported_not_misread() {
        let dir = temp_dir("snapdamaged").join("snapshots");
        let files = SnapshotFiles::open(&dir).unwrap();
        assert!(files.write(2, log_id(1), &meta("x"), b"payload").unwrap());
        let path = files.path(2);
        let whole = std::fs::read(&path).unwrap();
        for cut in [0, 5, 12, whole.len() - 1] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            assert!(
                matches!(files.read(2), Err(StoreError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        let mut longer = whole.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert!(matches!(files.read(2), Err(StoreError::Corrupt(_))));
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
