//! Storage for everything Starling persists: accounts (SCRAM credentials only), rosters, offline
//! messages, private XML (XEP-0049), vCards (XEP-0054) and each account's last unavailable
//! presence (RFC 6121 §4.3.2), behind async, object-safe traits, with the embedded
//! [redb](https://docs.rs/redb) implementation, [`RedbStore`].
//!
//! # Where it sits on the stanza path
//! Off the hot path. The **edge** reads [`AccountStore::credentials`] once per login (SASL); the
//! **router** reads and writes rosters, offline messages, private XML and vCards when a stanza
//! addressed to the server or to an offline user needs them, and caches what it may. Routing a
//! stanza between two online users never touches the store.
//!
//! # Keys
//! Every user is a [`BareUser`]: `(domain, localpart)`, strings the caller has already normalised
//! (PRECIS / nodeprep for the localpart, lower-cased IDNA for the domain). The store compares
//! bytes and normalises nothing, so two spellings of one JID are two users unless the caller
//! normalises first.
//!
//! # What it must never do
//! - Store a password, or anything but SCRAM salted keys ([`starling_sasl::ScramCredentials`]).
//! - Block an async task: every redb call runs on `tokio::task::spawn_blocking`.
//! - Leave data behind for a deleted account: [`AccountStore::delete`] removes roster, offline
//!   messages, private XML, vCard and last presence in the same transaction, and writes to
//!   per-user data of a user without an account fail with [`StoreError::NotFound`].
//! - Grow without bound: offline messages are capped per user by the caller's quota.
//! - Panic on what it reads back: records are versioned binary ([`StoreError::Corrupt`] when not
//!   understood).

#![forbid(unsafe_code)]

mod codec;
mod error;
mod model;
mod redb_store;
mod traits;

#[cfg(test)]
mod tests;

pub use error::StoreError;
pub use model::{BareUser, LastPresence, Roster, RosterItem};
pub use redb_store::RedbStore;
pub use traits::{
    AccountStore, OfflineStore, PresenceStore, PrivateStore, RosterStore, Store, VcardStore,
};
