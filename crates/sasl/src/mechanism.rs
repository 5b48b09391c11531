//! Mechanism names and their hash functions.

use crate::ChannelBindingInfo;

/// The hash function of a SCRAM mechanism (and of the credentials stored for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    /// SHA-1 (RFC 5802; kept for older clients).
    Sha1,
    /// SHA-256 (RFC 7677).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl HashAlgo {
    /// Every hash, weakest first; an account stores credentials for each.
    pub const ALL: [HashAlgo; 3] = [HashAlgo::Sha1, HashAlgo::Sha256, HashAlgo::Sha512];

    /// Length in bytes of the hash output (and so of `StoredKey`, `ServerKey` and proofs).
    pub fn output_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
            Self::Sha512 => 64,
        }
    }

    /// The hash's name as it appears in mechanism names: `SHA-1`, `SHA-256`, `SHA-512`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha1 => "SHA-1",
            Self::Sha256 => "SHA-256",
            Self::Sha512 => "SHA-512",
        }
    }
}

/// A SASL mechanism this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// `PLAIN` (RFC 4616): password in clear; only on encrypted streams.
    Plain,
    /// `SCRAM-SHA-1` (RFC 5802).
    ScramSha1,
    /// `SCRAM-SHA-1-PLUS` (RFC 5802 with channel binding).
    ScramSha1Plus,
    /// `SCRAM-SHA-256` (RFC 7677).
    ScramSha256,
    /// `SCRAM-SHA-256-PLUS` (RFC 7677 with channel binding).
    ScramSha256Plus,
    /// `SCRAM-SHA-512`.
    ScramSha512,
    /// `SCRAM-SHA-512-PLUS`.
    ScramSha512Plus,
}

impl Mechanism {
    /// Every mechanism, in the order a server should advertise them (strongest first).
    pub const ALL: [Mechanism; 7] = [
        Mechanism::ScramSha512Plus,
        Mechanism::ScramSha256Plus,
        Mechanism::ScramSha1Plus,
        Mechanism::ScramSha512,
        Mechanism::ScramSha256,
        Mechanism::ScramSha1,
        Mechanism::Plain,
    ];

    /// The IANA-registered name, as written in `<mechanism/>` and `<auth mechanism='…'/>`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha1 => "SCRAM-SHA-1",
            Self::ScramSha1Plus => "SCRAM-SHA-1-PLUS",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::ScramSha512Plus => "SCRAM-SHA-512-PLUS",
        }
    }

    /// Parses a mechanism name. SASL mechanism names are upper case (RFC 4422 §3.1), so the
    /// match is exact.
    pub fn from_name(name: &str) -> Option<Mechanism> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether this is a channel-binding (`-PLUS`) mechanism.
    pub fn is_plus(self) -> bool {
        matches!(
            self,
            Self::ScramSha1Plus | Self::ScramSha256Plus | Self::ScramSha512Plus
        )
    }

    /// Whether this is a SCRAM mechanism (with or without channel binding).
    pub fn is_scram(self) -> bool {
        self.hash().is_some()
    }

    /// The SCRAM hash of this mechanism; `None` for PLAIN.
    pub fn hash(self) -> Option<HashAlgo> {
        match self {
            Self::Plain => None,
            Self::ScramSha1 | Self::ScramSha1Plus => Some(HashAlgo::Sha1),
            Self::ScramSha256 | Self::ScramSha256Plus => Some(HashAlgo::Sha256),
            Self::ScramSha512 | Self::ScramSha512Plus => Some(HashAlgo::Sha512),
        }
    }

    /// The mechanisms a stream may advertise, strongest first: `-PLUS` variants exactly when the
    /// connection has channel-binding data (this crate treats that as "the server advertises
    /// PLUS" for downgrade detection), PLAIN only when `encrypted` (RFC 6120 §6.4.1: PLAIN must
    /// not be offered over an unencrypted stream).
    pub fn offered(channel_binding: &ChannelBindingInfo, encrypted: bool) -> Vec<Mechanism> {
        Self::ALL
            .into_iter()
            .filter(|m| match m {
                Mechanism::Plain => encrypted,
                m if m.is_plus() => channel_binding.advertises_plus(),
                _ => true,
            })
            .collect()
    }
}
