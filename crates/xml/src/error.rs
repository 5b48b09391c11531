//! What can go wrong while framing a stream, and the RFC 6120 stream error each maps to.

use thiserror::Error;

/// The subset of RFC 6120 §4.9.3 stream error conditions the framer can raise.
///
/// The protocol crate (`starling-xmpp`) has the full list; this one stays here so the XML
/// layer depends on nothing above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// §4.9.3.1: XML that cannot be processed (e.g. character data between stanzas).
    BadFormat,
    /// §4.9.3.2: no or an unsupported namespace prefix where one is required.
    BadNamespacePrefix,
    /// §4.9.3.10: the stream or content namespace is wrong.
    InvalidNamespace,
    /// §4.9.3.13: XML that violates well-formedness (XML 1.0 or Namespaces in XML).
    NotWellFormed,
    /// §4.9.3.14: a local limit was exceeded (size, depth, attributes, declarations).
    PolicyViolation,
    /// §4.9.3.18: XML that RFC 6120 §11.1 forbids (comments, PIs, DTDs, entities).
    RestrictedXml,
    /// §4.9.3.22: the stream is not UTF-8.
    UnsupportedEncoding,
    /// §4.9.3.25: the stream header's version is not one this server speaks.
    UnsupportedVersion,
}

impl Condition {
    /// The element name of the condition, as written inside `<stream:error/>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::BadFormat => "bad-format",
            Condition::BadNamespacePrefix => "bad-namespace-prefix",
            Condition::InvalidNamespace => "invalid-namespace",
            Condition::NotWellFormed => "not-well-formed",
            Condition::PolicyViolation => "policy-violation",
            Condition::RestrictedXml => "restricted-xml",
            Condition::UnsupportedEncoding => "unsupported-encoding",
            Condition::UnsupportedVersion => "unsupported-version",
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A framing failure: the stream must be closed with `condition`.
///
/// `reason` is a fixed, human-readable description for logs and the optional `<text/>` of
/// the stream error; it never echoes peer input, so it is safe to log and to send back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{condition}: {reason}")]
pub struct FrameError {
    /// The stream error condition to close the stream with.
    pub condition: Condition,
    /// Why, in a few words.
    pub reason: &'static str,
}

impl FrameError {
    pub(crate) const fn new(condition: Condition, reason: &'static str) -> Self {
        FrameError { condition, reason }
    }
}

pub(crate) const fn nwf(reason: &'static str) -> FrameError {
    FrameError::new(Condition::NotWellFormed, reason)
}

pub(crate) const fn restricted(reason: &'static str) -> FrameError {
    FrameError::new(Condition::RestrictedXml, reason)
}

pub(crate) const fn policy(reason: &'static str) -> FrameError {
    FrameError::new(Condition::PolicyViolation, reason)
}
