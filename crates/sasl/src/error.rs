//! Failure conditions of the SASL exchange (RFC 6120 §6.5) and errors of the helper functions.

use std::fmt;

/// Why a SASL exchange failed, as the child element of `<failure/>` (RFC 6120 §6.5).
///
/// [`SaslFailureReason::as_str`] gives the element name the edge writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaslFailureReason {
    /// `<aborted/>` (§6.5.1): the client sent `<abort/>`.
    Aborted,
    /// `<account-disabled/>` (§6.5.2): the account exists but is disabled (decided by the caller).
    AccountDisabled,
    /// `<credentials-expired/>` (§6.5.3): the stored credentials have expired (caller's policy).
    CredentialsExpired,
    /// `<encryption-required/>` (§6.5.4): the mechanism needs an encrypted stream (PLAIN).
    EncryptionRequired,
    /// `<incorrect-encoding/>` (§6.5.5): the element's base64 text did not decode.
    IncorrectEncoding,
    /// `<invalid-authzid/>` (§6.5.6): the authorization identity is not the user's own JID.
    InvalidAuthzid,
    /// `<invalid-mechanism/>` (§6.5.7): the client asked for a mechanism that is not offered.
    InvalidMechanism,
    /// `<malformed-request/>` (§6.5.8): the mechanism's message does not follow its grammar.
    MalformedRequest,
    /// `<mechanism-too-weak/>` (§6.5.9): policy requires a stronger mechanism (caller's policy).
    MechanismTooWeak,
    /// `<not-authorized/>` (§6.5.10): bad credentials, unknown user, or a failed security check
    /// (nonce, channel binding, downgrade detection). Deliberately uninformative.
    NotAuthorized,
    /// `<temporary-auth-failure/>` (§6.5.11): a server-side problem (unusable stored record,
    /// no randomness); the client may retry later.
    TemporaryAuthFailure,
}

impl SaslFailureReason {
    /// The element name of this condition inside `<failure/>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aborted => "aborted",
            Self::AccountDisabled => "account-disabled",
            Self::CredentialsExpired => "credentials-expired",
            Self::EncryptionRequired => "encryption-required",
            Self::IncorrectEncoding => "incorrect-encoding",
            Self::InvalidAuthzid => "invalid-authzid",
            Self::InvalidMechanism => "invalid-mechanism",
            Self::MalformedRequest => "malformed-request",
            Self::MechanismTooWeak => "mechanism-too-weak",
            Self::NotAuthorized => "not-authorized",
            Self::TemporaryAuthFailure => "temporary-auth-failure",
        }
    }
}

impl fmt::Display for SaslFailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of [`crate::derive_credentials`] and [`crate::new_salt`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// The password is empty or SASLprep refuses it (prohibited or unassigned code points, bad
    /// bidi). Maps to `<not-acceptable/>` when setting a password over XEP-0077 and to
    /// `<malformed-request/>` inside SASL.
    #[error("password is empty or refused by SASLprep")]
    InvalidPassword,
    /// The salt is empty. A caller bug; maps to `<internal-server-error/>`.
    #[error("salt must not be empty")]
    EmptySalt,
    /// The iteration count is zero. A caller bug; maps to `<internal-server-error/>`.
    #[error("iteration count must be at least 1")]
    InvalidIterations,
    /// The operating system's random source failed. Maps to `<temporary-auth-failure/>` or
    /// `<internal-server-error/>`.
    #[error("random source failed: {0}")]
    Random(String),
}

/// Errors of [`crate::decode_payload`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The element text is not valid base64. Maps to `<incorrect-encoding/>` (RFC 6120 §6.5.5).
    #[error("SASL payload is not valid base64")]
    IncorrectEncoding,
}

impl PayloadError {
    /// The SASL failure condition the edge sends for this error.
    pub fn reason(&self) -> SaslFailureReason {
        match self {
            Self::IncorrectEncoding => SaslFailureReason::IncorrectEncoding,
        }
    }
}
