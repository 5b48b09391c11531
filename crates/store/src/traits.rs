//! The storage traits. Object-safe and `Send + Sync`, used as `Arc<dyn AccountStore>` and so on;
//! each is implemented by [`crate::RedbStore`] and is meant to be implemented for Redis too, so
//! every method is one atomic operation a Redis script could also perform.
//!
//! Method names differ across traits so a type implementing all of them can be called without
//! naming the trait.

use async_trait::async_trait;
use bytes::Bytes;
use starling_sasl::{HashAlgo, ScramCredentials};

use crate::{BareUser, LastPresence, Roster, RosterItem, StoreError};

/// Accounts and their SCRAM credentials.
#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates the account with its credentials (normally one per [`HashAlgo`]; later entries
    /// replace earlier ones of the same hash). [`StoreError::Conflict`] if it exists; of
    /// concurrent creations of one account exactly one succeeds.
    async fn create(
        &self,
        user: &BareUser,
        credentials: Vec<ScramCredentials>,
    ) -> Result<(), StoreError>;

    /// The stored credentials for one hash; `None` when the account or that hash is missing.
    async fn credentials(
        &self,
        user: &BareUser,
        hash: HashAlgo,
    ) -> Result<Option<ScramCredentials>, StoreError>;

    /// Replaces all credentials of an existing account (password change).
    /// [`StoreError::NotFound`] if there is no such account.
    async fn set_credentials(
        &self,
        user: &BareUser,
        credentials: Vec<ScramCredentials>,
    ) -> Result<(), StoreError>;

    /// Deletes the account and, in the same transaction, all of its data (roster, offline
    /// messages, private XML, vCard). [`StoreError::NotFound`] if there is no such account.
    async fn delete(&self, user: &BareUser) -> Result<(), StoreError>;

    /// Whether the account exists.
    async fn exists(&self, user: &BareUser) -> Result<bool, StoreError>;

    /// The localparts of all accounts of `domain`, in byte order. For administration: it reads
    /// the whole domain.
    async fn list(&self, domain: &str) -> Result<Vec<String>, StoreError>;

    /// The number of accounts of `domain`. For administration and metrics.
    async fn count(&self, domain: &str) -> Result<u64, StoreError>;
}

/// Rosters (RFC 6121 §2) with a version number (XEP-0237).
#[async_trait]
pub trait RosterStore: Send + Sync {
    /// The whole roster and its version; empty with version 0 when never written.
    async fn roster(&self, user: &BareUser) -> Result<Roster, StoreError>;

    /// One item by contact JID.
    async fn roster_item(
        &self,
        user: &BareUser,
        jid: &str,
    ) -> Result<Option<RosterItem>, StoreError>;

    /// Adds or replaces the item keyed by `item.jid`; returns the roster's new version.
    /// [`StoreError::NotFound`] if the user has no account.
    async fn set_roster_item(&self, user: &BareUser, item: RosterItem) -> Result<u64, StoreError>;

    /// Removes one item; returns the roster's new version. [`StoreError::NotFound`] if the user
    /// has no account or no such item.
    async fn remove_roster_item(&self, user: &BareUser, jid: &str) -> Result<u64, StoreError>;
}

/// Messages stored for users while they are offline (RFC 6121 §8.5.2.1.1, XEP-0160).
#[async_trait]
pub trait OfflineStore: Send + Sync {
    /// Appends one serialised stanza unless the user already has `quota` messages stored
    /// ([`StoreError::QuotaExceeded`]). [`StoreError::NotFound`] if the user has no account.
    async fn push_offline(
        &self,
        user: &BareUser,
        stanza: Bytes,
        quota: u64,
    ) -> Result<(), StoreError>;

    /// Removes and returns all of the user's stored stanzas, oldest first.
    async fn pop_offline(&self, user: &BareUser) -> Result<Vec<Bytes>, StoreError>;

    /// How many stanzas are stored for the user.
    async fn count_offline(&self, user: &BareUser) -> Result<u64, StoreError>;
}

/// Private XML storage (XEP-0049): one raw XML fragment per (user, namespace).
#[async_trait]
pub trait PrivateStore: Send + Sync {
    /// The stored fragment for `namespace`, if any.
    async fn private_xml(
        &self,
        user: &BareUser,
        namespace: &str,
    ) -> Result<Option<Bytes>, StoreError>;

    /// Stores (replaces) the fragment for `namespace`. [`StoreError::NotFound`] if the user has
    /// no account.
    async fn set_private_xml(
        &self,
        user: &BareUser,
        namespace: &str,
        xml: Bytes,
    ) -> Result<(), StoreError>;
}

/// vCards (XEP-0054), as raw serialised XML.
#[async_trait]
pub trait VcardStore: Send + Sync {
    /// The user's vCard, if one was stored.
    async fn vcard(&self, user: &BareUser) -> Result<Option<Bytes>, StoreError>;

    /// Stores (replaces) the user's vCard. [`StoreError::NotFound`] if the user has no account.
    async fn set_vcard(&self, user: &BareUser, vcard: Bytes) -> Result<(), StoreError>;
}

/// The last unavailable presence of each account (RFC 6121 §4.3.2: a probe of a contact with
/// no available resource may be answered with it).
#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// The last unavailable presence stored for the user, if any.
    async fn last_unavailable(&self, user: &BareUser) -> Result<Option<LastPresence>, StoreError>;

    /// Stores (replaces) the user's last unavailable presence. [`StoreError::NotFound`] if
    /// the user has no account.
    async fn set_last_unavailable(
        &self,
        user: &BareUser,
        presence: LastPresence,
    ) -> Result<(), StoreError>;
}

/// Everything the server persists, as one object: `Arc<dyn Store>` upcasts to each part.
pub trait Store:
    AccountStore + RosterStore + OfflineStore + PrivateStore + VcardStore + PresenceStore
{
}

impl<T> Store for T where
    T: AccountStore + RosterStore + OfflineStore + PrivateStore + VcardStore + PresenceStore
{
}
