//! The embedded implementation: one redb file in the data directory.
//!
//! Every operation is one redb transaction run on tokio's blocking pool. Write transactions are
//! serialised by redb and commit with `Durability::Immediate` (fsync before `commit` returns), so
//! an acknowledged write survives a crash, and check-then-write sequences (create, quota) are
//! atomic.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use starling_sasl::{HashAlgo, ScramCredentials};

use crate::codec::AccountRecord;
use crate::{
    AccountStore, BareUser, LastPresence, OfflineStore, PresenceStore, PrivateStore, Roster,
    RosterItem, RosterStore, StoreError, VcardStore,
};

/// Store-wide metadata: `"schema"` → the layout version below.
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// `(domain, localpart)` → account record (codec).
const ACCOUNTS: TableDefinition<'static, (&str, &str), &[u8]> = TableDefinition::new("accounts");
/// `(domain, localpart, contact)` → roster item record (codec).
const ROSTER_ITEMS: TableDefinition<'static, (&str, &str, &str), &[u8]> =
    TableDefinition::new("roster_items");
/// `(domain, localpart)` → roster version.
const ROSTER_VERSIONS: TableDefinition<'static, (&str, &str), u64> =
    TableDefinition::new("roster_versions");
/// `(domain, localpart, sequence)` → serialised stanza.
const OFFLINE: TableDefinition<'static, (&str, &str, u64), &[u8]> = TableDefinition::new("offline");
/// `(domain, localpart)` → number of offline stanzas, so the quota check does not scan.
const OFFLINE_COUNTS: TableDefinition<'static, (&str, &str), u64> =
    TableDefinition::new("offline_counts");
/// `(domain, localpart, namespace)` → private XML fragment.
const PRIVATE: TableDefinition<'static, (&str, &str, &str), &[u8]> =
    TableDefinition::new("private_xml");
/// `(domain, localpart)` → vCard XML.
const VCARDS: TableDefinition<'static, (&str, &str), &[u8]> = TableDefinition::new("vcards");
/// `(domain, localpart)` → last unavailable presence record (codec). Added without a schema
/// change: a file from before simply gets the empty table.
const LAST_PRESENCE: TableDefinition<'static, (&str, &str), &[u8]> =
    TableDefinition::new("last_presence");

/// The layout version written in [`META`]; a file with a newer one is refused.
const SCHEMA_VERSION: u64 = 1;

/// `s` followed by NUL: the smallest string greater than `s`. Tuple keys compare element by
/// element, so `(d, l, "")..(d, successor(l), "")` covers exactly the keys that start with
/// `(d, l)`, and `(d, "")..(successor(d), "")` the keys of domain `d`.
fn successor(s: &str) -> String {
    let mut next = String::with_capacity(s.len() + 1);
    next.push_str(s);
    next.push('\0');
    next
}

/// The embedded store: a redb database file, shared by all tasks of the process.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: Option<PathBuf>,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the database file at `path`, creating it (and its tables) if missing. Blocking:
    /// call at startup, or inside `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let db = Database::create(path)?;
        Self::init(db, Some(path.to_path_buf()))
    }

    /// A store that lives in memory only (redb's in-memory backend), for tests and throwaway
    /// single-process runs.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let db = redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::init(db, None)
    }

    fn init(db: Database, path: Option<PathBuf>) -> Result<Self, StoreError> {
        let txn = db.begin_write()?;
        {
            // Creating every table up front lets read transactions open them unconditionally.
            txn.open_table(ACCOUNTS)?;
            txn.open_table(ROSTER_ITEMS)?;
            txn.open_table(ROSTER_VERSIONS)?;
            txn.open_table(OFFLINE)?;
            txn.open_table(OFFLINE_COUNTS)?;
            txn.open_table(PRIVATE)?;
            txn.open_table(VCARDS)?;
            txn.open_table(LAST_PRESENCE)?;
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema")?.map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema", SCHEMA_VERSION)?;
                }
                Some(v) if v <= SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(StoreError::Corrupt(format!(
                        "database schema {v} is newer than this build ({SCHEMA_VERSION})"
                    )));
                }
            }
        }
        txn.commit()?;
        Ok(RedbStore {
            db: Arc::new(db),
            path,
        })
    }

    /// Runs `f` on the blocking pool with the database.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Backend(format!("blocking task failed: {e}")))?
    }

    /// Runs `f` in a read transaction on the calling task. redb's read transactions do not
    /// wait for writers or the disk while the file's pages are cached (they take microseconds),
    /// so a read costs no hand-off to the blocking pool: a login makes several reads, and the
    /// hand-offs cost more than the reads. Writes, which wait for fsync, go to the pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError>,
    {
        let txn = self.db.begin_read()?;
        f(&txn)
    }

    /// Runs `f` in a write transaction and commits it if `f` succeeds (dropping it aborts).
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        })
        .await
    }

    /// Like [`RedbStore::write`], but the commit does not wait for the disk (redb's
    /// `Durability::None`): it is visible to every later read at once and becomes durable with
    /// the next durable commit or when the database is closed. For data whose loss in a crash
    /// is harmless and which may be written in bursts (an edge going away ends thousands of
    /// sessions at once), so that a burst does not cost one fsync per write.
    async fn write_relaxed<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(redb::Durability::None)?;
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        })
        .await
    }
}

/// `NotFound` unless the user has an account; checked inside the writing transaction so that
/// no data is written for an account being deleted concurrently.
fn require_account(txn: &WriteTransaction, user: &BareUser) -> Result<(), StoreError> {
    let accounts = txn.open_table(ACCOUNTS)?;
    if accounts.get(key(user))?.is_some() {
        Ok(())
    } else {
        Err(StoreError::NotFound)
    }
}

fn key(user: &BareUser) -> (&str, &str) {
    (user.domain(), user.localpart())
}

/// Bumps and returns the roster version of `user`.
fn bump_roster_version(txn: &WriteTransaction, user: &BareUser) -> Result<u64, StoreError> {
    let mut versions = txn.open_table(ROSTER_VERSIONS)?;
    let current = versions.get(key(user))?.map(|v| v.value()).unwrap_or(0);
    let next = current
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("roster version overflow".into()))?;
    versions.insert(key(user), next)?;
    Ok(next)
}

#[async_trait]
impl AccountStore for RedbStore {
    async fn create(
        &self,
        user: &BareUser,
        credentials: Vec<ScramCredentials>,
    ) -> Result<(), StoreError> {
        let record = AccountRecord::new(credentials).encode()?;
        let user = user.clone();
        self.write(move |txn| {
            let mut accounts = txn.open_table(ACCOUNTS)?;
            if accounts.get(key(&user))?.is_some() {
                return Err(StoreError::Conflict);
            }
            accounts.insert(key(&user), record.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn credentials(
        &self,
        user: &BareUser,
        hash: HashAlgo,
    ) -> Result<Option<ScramCredentials>, StoreError> {
        let user = user.clone();
        self.read(move |txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            let Some(raw) = accounts.get(key(&user))? else {
                return Ok(None);
            };
            let record = AccountRecord::decode(raw.value())?;
            Ok(record.credentials(hash).cloned())
        })
        .await
    }

    async fn set_credentials(
        &self,
        user: &BareUser,
        credentials: Vec<ScramCredentials>,
    ) -> Result<(), StoreError> {
        let record = AccountRecord::new(credentials).encode()?;
        let user = user.clone();
        self.write(move |txn| {
            let mut accounts = txn.open_table(ACCOUNTS)?;
            if accounts.get(key(&user))?.is_none() {
                return Err(StoreError::NotFound);
            }
            accounts.insert(key(&user), record.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn delete(&self, user: &BareUser) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |txn| {
            let (d, l) = key(&user);
            if txn.open_table(ACCOUNTS)?.remove((d, l))?.is_none() {
                return Err(StoreError::NotFound);
            }
            let next = successor(l);
            txn.open_table(ROSTER_ITEMS)?
                .retain_in((d, l, "")..(d, next.as_str(), ""), |_, _| false)?;
            txn.open_table(ROSTER_VERSIONS)?.remove((d, l))?;
            txn.open_table(OFFLINE)?
                .retain_in((d, l, 0)..=(d, l, u64::MAX), |_, _| false)?;
            txn.open_table(OFFLINE_COUNTS)?.remove((d, l))?;
            txn.open_table(PRIVATE)?
                .retain_in((d, l, "")..(d, next.as_str(), ""), |_, _| false)?;
            txn.open_table(VCARDS)?.remove((d, l))?;
            txn.open_table(LAST_PRESENCE)?.remove((d, l))?;
            Ok(())
        })
        .await
    }

    async fn exists(&self, user: &BareUser) -> Result<bool, StoreError> {
        let user = user.clone();
        self.read(move |txn| Ok(txn.open_table(ACCOUNTS)?.get(key(&user))?.is_some()))
            .await
    }

    async fn list(&self, domain: &str) -> Result<Vec<String>, StoreError> {
        let domain = domain.to_owned();
        self.read(move |txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            let next = successor(&domain);
            let mut out = Vec::new();
            for entry in accounts.range((domain.as_str(), "")..(next.as_str(), ""))? {
                let (k, _) = entry?;
                out.push(k.value().1.to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn count(&self, domain: &str) -> Result<u64, StoreError> {
        let domain = domain.to_owned();
        self.read(move |txn| {
            let accounts = txn.open_table(ACCOUNTS)?;
            let next = successor(&domain);
            let mut n = 0u64;
            for entry in accounts.range((domain.as_str(), "")..(next.as_str(), ""))? {
                entry?;
                n += 1;
            }
            Ok(n)
        })
        .await
    }
}

#[async_trait]
impl RosterStore for RedbStore {
    async fn roster(&self, user: &BareUser) -> Result<Roster, StoreError> {
        let user = user.clone();
        self.read(move |txn| {
            let (d, l) = key(&user);
            let version = txn
                .open_table(ROSTER_VERSIONS)?
                .get((d, l))?
                .map(|v| v.value())
                .unwrap_or(0);
            let items_table = txn.open_table(ROSTER_ITEMS)?;
            let next = successor(l);
            let mut items = Vec::new();
            for entry in items_table.range((d, l, "")..(d, next.as_str(), ""))? {
                let (_, v) = entry?;
                items.push(RosterItem::decode(v.value())?);
            }
            Ok(Roster { version, items })
        })
        .await
    }

    async fn roster_item(
        &self,
        user: &BareUser,
        jid: &str,
    ) -> Result<Option<RosterItem>, StoreError> {
        let user = user.clone();
        let jid = jid.to_owned();
        self.read(move |txn| {
            let (d, l) = key(&user);
            let items = txn.open_table(ROSTER_ITEMS)?;
            let found = items.get((d, l, jid.as_str()))?;
            found.map(|v| RosterItem::decode(v.value())).transpose()
        })
        .await
    }

    async fn set_roster_item(&self, user: &BareUser, item: RosterItem) -> Result<u64, StoreError> {
        let record = item.encode()?;
        let user = user.clone();
        self.write(move |txn| {
            require_account(txn, &user)?;
            let (d, l) = key(&user);
            txn.open_table(ROSTER_ITEMS)?
                .insert((d, l, item.jid.as_str()), record.as_slice())?;
            bump_roster_version(txn, &user)
        })
        .await
    }

    async fn remove_roster_item(&self, user: &BareUser, jid: &str) -> Result<u64, StoreError> {
        let user = user.clone();
        let jid = jid.to_owned();
        self.write(move |txn| {
            require_account(txn, &user)?;
            let (d, l) = key(&user);
            if txn
                .open_table(ROSTER_ITEMS)?
                .remove((d, l, jid.as_str()))?
                .is_none()
            {
                return Err(StoreError::NotFound);
            }
            bump_roster_version(txn, &user)
        })
        .await
    }
}

#[async_trait]
impl OfflineStore for RedbStore {
    async fn push_offline(
        &self,
        user: &BareUser,
        stanza: Bytes,
        quota: u64,
    ) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |txn| {
            require_account(txn, &user)?;
            let (d, l) = key(&user);
            let mut counts = txn.open_table(OFFLINE_COUNTS)?;
            let count = counts.get((d, l))?.map(|v| v.value()).unwrap_or(0);
            if count >= quota {
                return Err(StoreError::QuotaExceeded);
            }
            let mut offline = txn.open_table(OFFLINE)?;
            let last_seq = match offline.range((d, l, 0)..=(d, l, u64::MAX))?.next_back() {
                Some(entry) => Some(entry?.0.value().2),
                None => None,
            };
            let seq = match last_seq {
                Some(last) => last
                    .checked_add(1)
                    .ok_or_else(|| StoreError::Corrupt("offline sequence overflow".into()))?,
                None => 0,
            };
            offline.insert((d, l, seq), stanza.as_ref())?;
            counts.insert((d, l), count + 1)?;
            Ok(())
        })
        .await
    }

    async fn pop_offline(&self, user: &BareUser) -> Result<Vec<Bytes>, StoreError> {
        // Every initial presence pops, and almost always finds nothing: a read says so without
        // a write transaction (an fsync and a hand-off to the blocking pool per login). A
        // message stored after this read is popped at the next login, as one stored after
        // the write transaction below would be.
        if self.count_offline(user).await? == 0 {
            return Ok(Vec::new());
        }
        let user = user.clone();
        self.write(move |txn| {
            let (d, l) = key(&user);
            let mut offline = txn.open_table(OFFLINE)?;
            let mut out = Vec::new();
            for entry in offline.range((d, l, 0)..=(d, l, u64::MAX))? {
                let (_, v) = entry?;
                out.push(Bytes::copy_from_slice(v.value()));
            }
            if out.is_empty() {
                return Ok(out);
            }
            offline.retain_in((d, l, 0)..=(d, l, u64::MAX), |_, _| false)?;
            txn.open_table(OFFLINE_COUNTS)?.remove((d, l))?;
            Ok(out)
        })
        .await
    }

    async fn count_offline(&self, user: &BareUser) -> Result<u64, StoreError> {
        let user = user.clone();
        self.read(move |txn| {
            let counts = txn.open_table(OFFLINE_COUNTS)?;
            Ok(counts.get(key(&user))?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }
}

#[async_trait]
impl PrivateStore for RedbStore {
    async fn private_xml(
        &self,
        user: &BareUser,
        namespace: &str,
    ) -> Result<Option<Bytes>, StoreError> {
        let user = user.clone();
        let namespace = namespace.to_owned();
        self.read(move |txn| {
            let (d, l) = key(&user);
            let table = txn.open_table(PRIVATE)?;
            let found = table.get((d, l, namespace.as_str()))?;
            Ok(found.map(|v| Bytes::copy_from_slice(v.value())))
        })
        .await
    }

    async fn set_private_xml(
        &self,
        user: &BareUser,
        namespace: &str,
        xml: Bytes,
    ) -> Result<(), StoreError> {
        let user = user.clone();
        let namespace = namespace.to_owned();
        self.write(move |txn| {
            require_account(txn, &user)?;
            let (d, l) = key(&user);
            txn.open_table(PRIVATE)?
                .insert((d, l, namespace.as_str()), xml.as_ref())?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl VcardStore for RedbStore {
    async fn vcard(&self, user: &BareUser) -> Result<Option<Bytes>, StoreError> {
        let user = user.clone();
        self.read(move |txn| {
            let table = txn.open_table(VCARDS)?;
            let found = table.get(key(&user))?;
            Ok(found.map(|v| Bytes::copy_from_slice(v.value())))
        })
        .await
    }

    async fn set_vcard(&self, user: &BareUser, vcard: Bytes) -> Result<(), StoreError> {
        let user = user.clone();
        self.write(move |txn| {
            require_account(txn, &user)?;
            txn.open_table(VCARDS)?.insert(key(&user), vcard.as_ref())?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl PresenceStore for RedbStore {
    async fn last_unavailable(&self, user: &BareUser) -> Result<Option<LastPresence>, StoreError> {
        let user = user.clone();
        self.read(move |txn| {
            let table = txn.open_table(LAST_PRESENCE)?;
            let found = table.get(key(&user))?;
            found.map(|v| LastPresence::decode(v.value())).transpose()
        })
        .await
    }

    async fn set_last_unavailable(
        &self,
        user: &BareUser,
        presence: LastPresence,
    ) -> Result<(), StoreError> {
        let record = presence.encode()?;
        let user = user.clone();
        // Written for every account that goes offline; losing the latest one in a crash only
        // makes a probe answer older or absent (RFC 6121 §4.3.2 makes the answer optional).
        self.write_relaxed(move |txn| {
            require_account(txn, &user)?;
            txn.open_table(LAST_PRESENCE)?
                .insert(key(&user), record.as_slice())?;
            Ok(())
        })
        .await
    }
}

/// Test support: raw access to prove deletion is complete and to plant damaged records.
#[cfg(test)]
impl RedbStore {
    /// How many rows all tables except `meta` hold in total.
    pub(crate) fn total_rows(&self) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata as _;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(ACCOUNTS)?.len()?
            + txn.open_table(ROSTER_ITEMS)?.len()?
            + txn.open_table(ROSTER_VERSIONS)?.len()?
            + txn.open_table(OFFLINE)?.len()?
            + txn.open_table(OFFLINE_COUNTS)?.len()?
            + txn.open_table(PRIVATE)?.len()?
            + txn.open_table(VCARDS)?.len()?
            + txn.open_table(LAST_PRESENCE)?.len()?)
    }

    pub(crate) fn put_raw_account(&self, user: &BareUser, raw: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(ACCOUNTS)?.insert(key(user), raw)?;
        txn.commit()?;
        Ok(())
    }

    pub(crate) fn set_schema(&self, version: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert("schema", version)?;
        txn.commit()?;
        Ok(())
    }
}
