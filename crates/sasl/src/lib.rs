//! Sans-IO SASL server mechanisms for Starling: SCRAM-SHA-1, SCRAM-SHA-256, SCRAM-SHA-512, their
//! channel-binding `-PLUS` variants, and PLAIN (RFC 6120 §6, RFC 5802, RFC 7677, RFC 9266,
//! RFC 5929, RFC 4616).
//!
//! # Where it sits on the stanza path
//! Before any stanza flows, the **edge** negotiates SASL on each client stream. The edge decodes
//! the base64 text of `<auth/>` and `<response/>` ([`decode_payload`]), feeds the bytes to this
//! crate, looks up stored credentials in the store when asked, and writes back whatever this crate
//! returns (`<challenge/>`, `<success/>`, `<failure/>`). The store persists [`ScramCredentials`]
//! produced by [`derive_credentials`]; nothing else on the path touches passwords.
//!
//! # The flow
//! ```text
//! SaslServer::start(mechanism, &channel_binding, domain, initial response)
//!   └─ Step::NeedCredentials(need)          caller looks up (user, need.hash())
//!        └─ need.with_credentials(found)
//!             ├─ SCRAM: Step::Challenge { data: server-first-message, next }
//!             │    └─ next.client_final(client-final-message)
//!             │         └─ Step::Success { additional_data: v=…, .. } | Step::Failure { .. }
//!             └─ PLAIN: Step::Success { .. } | Step::Failure { .. }
//! ```
//! Each state is its own type and each transition consumes it, so a step cannot be replayed or
//! taken out of order. An unknown user gets a complete fake exchange with a deterministic salt and
//! fails only at the end with `not-authorized`, exactly like a wrong password.
//!
//! # What it must never do
//! - Perform I/O, block on anything but CPU, spawn, or know about the store or the network: the
//!   caller supplies the client's bytes, the channel-binding data of its TLS connection, and the
//!   stored credentials.
//! - Run PBKDF2 during a SCRAM login: SCRAM verifies against the stored `StoredKey`/`ServerKey`.
//!   Only PLAIN logins and [`derive_credentials`] run the key derivation (so the caller should run
//!   [`NeedCredentials::with_credentials`] for PLAIN on a blocking thread, see
//!   [`NeedCredentials::is_expensive`]).
//! - Decide whether PLAIN may be offered: that is the edge's job, and it must offer PLAIN only on
//!   encrypted streams (see [`Mechanism::offered`]).
//! - Panic on anything a client sends, or compare secrets in variable time.

#![forbid(unsafe_code)]

mod channel_binding;
mod credentials;
mod crypto;
mod error;
mod mechanism;
mod payload;
mod plain;
mod scram;
mod session;

#[cfg(test)]
mod tests;

pub use channel_binding::{ChannelBindingInfo, ChannelBindingType};
pub use credentials::{
    DEFAULT_ITERATIONS, SALT_LEN, ScramCredentials, derive_credentials, new_salt,
    verify_plain_password,
};
pub use error::{CredentialsError, PayloadError, SaslFailureReason};
pub use mechanism::{HashAlgo, Mechanism};
pub use payload::{decode_payload, encode_payload};
pub use session::{AwaitingClientFinal, MAX_MESSAGE_LEN, NeedCredentials, SaslServer, Step};
