//! The store's error type.

/// Errors of every store operation. Each variant names the XMPP condition the caller reports
/// when the error reaches a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The account (or the item) does not exist. XMPP: `<item-not-found/>` for IQs about it,
    /// `<service-unavailable/>` for messages to a user without an account (RFC 6121 §8.5.1),
    /// `<not-authorized/>` inside SASL.
    #[error("not found")]
    NotFound,
    /// The account already exists. XMPP: `<conflict/>` (XEP-0077 registration).
    #[error("already exists")]
    Conflict,
    /// The user's offline storage is full. XMPP: `<service-unavailable/>` returned to the sender
    /// (RFC 6121 §8.5.2.1.1 allows bouncing when storage is full).
    #[error("quota exceeded")]
    QuotaExceeded,
    /// The caller passed data the store cannot hold (malformed credentials, a field over 4 GiB).
    /// XMPP: `<bad-request/>` when the data came from a client, else `<internal-server-error/>`.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The backend failed (I/O, database, lost blocking task). XMPP: `<internal-server-error/>`
    /// for IQs, `<temporary-auth-failure/>` inside SASL; the operation may be retried.
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// A stored record could not be decoded (unknown format, truncated, inconsistent). XMPP:
    /// `<internal-server-error/>`, `<temporary-auth-failure/>` inside SASL; needs an operator.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

macro_rules! backend_errors {
    ($($t:ty),+ $(,)?) => {
        $(
            impl From<$t> for StoreError {
                fn from(e: $t) -> Self {
                    StoreError::Backend(e.to_string())
                }
            }
        )+
    };
}

backend_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::SetDurabilityError,
    redb::CommitError,
);
