//! Channel-binding data of the TLS connection, supplied by the edge (RFC 5056, RFC 5929,
//! RFC 9266).

use std::fmt;

/// A channel-binding type (the IANA "channel-binding unique prefix").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelBindingType {
    /// `tls-exporter` (RFC 9266): 32 bytes of TLS keying material exported with the label
    /// `EXPORTER-Channel-Binding` and an empty context. The edge offers it only on TLS 1.3.
    TlsExporter,
    /// `tls-server-end-point` (RFC 5929 §4.1): the hash of the server's certificate, with SHA-256
    /// when the certificate is signed with MD5 or SHA-1, else with the certificate's signature
    /// hash. XEP-0440 requires servers to offer it.
    TlsServerEndPoint,
}

impl ChannelBindingType {
    /// Every type this crate knows, strongest first.
    pub const ALL: [ChannelBindingType; 2] = [
        ChannelBindingType::TlsExporter,
        ChannelBindingType::TlsServerEndPoint,
    ];

    /// The name used in the GS2 header (`p=…`) and in XEP-0440's `<channel-binding type='…'/>`.
    pub fn name(self) -> &'static str {
        match self {
            Self::TlsExporter => "tls-exporter",
            Self::TlsServerEndPoint => "tls-server-end-point",
        }
    }

    /// Parses a channel-binding name; names are compared exactly (they are lower case).
    pub fn from_name(name: &str) -> Option<ChannelBindingType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What the edge's TLS connection can bind to: the types it offers with their data.
///
/// Empty on a plain-text stream, or when the TLS library gives no binding data. When non-empty,
/// the edge advertises the `-PLUS` mechanisms (and XEP-0440's `<sasl-channel-binding/>` listing
/// [`ChannelBindingInfo::types`]); a client that then says `y` ("I support channel binding, but
/// you don't") is detected as the victim of a downgrade.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChannelBindingInfo {
    offered: Vec<(ChannelBindingType, Vec<u8>)>,
}

impl ChannelBindingInfo {
    /// No channel binding (plain-text stream, or no data available).
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one type with the bytes computed by the edge for this connection.
    pub fn with(mut self, kind: ChannelBindingType, data: Vec<u8>) -> Self {
        self.offered.retain(|(k, _)| *k != kind);
        self.offered.push((kind, data));
        self
    }

    /// Whether any type is offered, i.e. whether the server advertises `-PLUS` mechanisms.
    pub fn advertises_plus(&self) -> bool {
        !self.offered.is_empty()
    }

    /// The offered types, in the order they were added.
    pub fn types(&self) -> impl Iterator<Item = ChannelBindingType> + '_ {
        self.offered.iter().map(|(k, _)| *k)
    }

    /// The binding data of one type, if offered.
    pub fn data(&self, kind: ChannelBindingType) -> Option<&[u8]> {
        self.offered
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| d.as_slice())
    }
}

impl fmt::Debug for ChannelBindingInfo {
    // The data is connection-specific secret-ish material; print only the types.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.types().map(|t| t.name()))
            .finish()
    }
}
