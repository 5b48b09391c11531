//! The configuration tree of `starling`: one serde struct per TOML section, every default in
//! [`defaults`], layered by [`load`] (defaults, then the TOML file, then `STARLING_*`
//! environment variables, then command-line flags) and checked by [`validate`], which reports
//! every problem at once.
//!
//! The runtime crates (edge, router) never see this tree: [`Checked`] holds the parsed values
//! and `serve` converts them into each crate's plain `Settings`.
//!
//! Every key is documented in the README's Configuration section; a test keeps the two in step.

mod layers;
mod registry;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub(crate) use layers::{CliOverrides, ENV_PREFIX, RegistryOverrides, Sources, load};
pub(crate) use registry::{RegistryConfig, RegistrySettings};
pub(crate) use validate::{Checked, validate};

/// Loads every layer and validates the result: the one entry point for `serve`, `user` and
/// `config check`.
pub(crate) fn resolve(sources: &Sources) -> Result<Checked, ConfigErrors> {
    let loaded = load(sources).map_err(ConfigErrors)?;
    validate(loaded)
}

/// The whole configuration. `#[serde(default)]` on every section means a file only names what
/// it changes; `deny_unknown_fields` means a misspelt key is an error, never silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    pub(crate) server: ServerConfig,
    pub(crate) c2s: C2sConfig,
    pub(crate) tls: TlsConfig,
    pub(crate) auth: AuthConfig,
    pub(crate) registration: RegistrationConfig,
    pub(crate) admin: AdminConfig,
    pub(crate) log: LogConfig,
    pub(crate) registry: RegistryConfig,
}

/// `[server]`: what this node serves and where it keeps its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ServerConfig {
    /// The virtual hosts (XMPP domains) served.
    pub(crate) domains: Vec<String>,
    /// The redb store, generated certificates and run files live here.
    pub(crate) data_dir: PathBuf,
    /// This node's name in the cluster.
    pub(crate) node_name: String,
}

/// `[c2s]`: client-to-server listeners and per-connection limits (RFC 6120).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct C2sConfig {
    /// Plain TCP listeners offering STARTTLS (RFC 6120 §5).
    pub(crate) listen_starttls: Vec<String>,
    /// Direct TLS listeners (XEP-0368), ALPN `xmpp-client`.
    pub(crate) listen_direct_tls: Vec<String>,
    /// Refuse to authenticate a stream that has not negotiated TLS.
    pub(crate) require_tls: bool,
    /// The largest stanza accepted, in bytes.
    pub(crate) max_stanza_size: u64,
    /// Open connections allowed from one IP address.
    pub(crate) max_connections_per_ip: u32,
    /// Time a connection has to authenticate.
    pub(crate) preauth_timeout_secs: u64,
    /// A stream with no traffic for this long is closed.
    pub(crate) idle_timeout_secs: u64,
    /// A whitespace ping is sent after this long without writing.
    pub(crate) keepalive_interval_secs: u64,
    /// Token-bucket refill per connection, bytes per second.
    pub(crate) rate_bytes_per_sec: u64,
    /// Token-bucket capacity per connection, bytes.
    pub(crate) rate_burst_bytes: u64,
    /// Per-session outbound queue; overflow closes the stream with `policy-violation`.
    pub(crate) outbound_queue_stanzas: u64,
    /// Stream management (XEP-0198): how long a dropped resumable session is kept.
    pub(crate) sm_max_resume_secs: u32,
    /// Stream management: request an ack after this many unacked outbound stanzas.
    pub(crate) sm_ack_every_stanzas: u32,
    /// Stream management: request an ack after this long with stanzas unacked.
    pub(crate) sm_ack_every_secs: u64,
    /// Stream management: most unacked outbound stanzas; more closes the stream.
    pub(crate) sm_max_unacked_stanzas: u64,
    /// Stream management: most unacked outbound bytes; more closes the stream.
    pub(crate) sm_max_unacked_bytes: u64,
    /// Client State Indication (XEP-0352): most senders whose presence is held for an
    /// inactive client; one more flushes them all.
    pub(crate) csi_max_held: u64,
}

/// `[tls]`: certificates. Empty `certificates` means a self-signed one is generated in
/// `<data_dir>/tls/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TlsConfig {
    /// PEM certificate chains with their private keys.
    pub(crate) certificates: Vec<CertificatePair>,
    /// How often the files are checked for changes.
    pub(crate) reload_check_secs: u64,
}

/// One certificate chain and its key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CertificatePair {
    /// The certificate chain, leaf first.
    pub(crate) cert: PathBuf,
    /// The private key.
    pub(crate) key: PathBuf,
}

/// `[auth]`: SASL (RFC 6120 §6) policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AuthConfig {
    /// PBKDF2 iterations for new SCRAM credentials (RFC 7677 §4 asks for at least 4096).
    pub(crate) scram_iterations: u32,
    /// Failed authentications allowed per minute from one IP address.
    pub(crate) failures_per_minute_per_ip: u32,
    /// Failed authentications allowed per minute against one account.
    pub(crate) failures_per_minute_per_account: u32,
}

/// `[registration]`: in-band registration (XEP-0077).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RegistrationConfig {
    /// Who may register an account.
    pub(crate) mode: RegistrationMode,
    /// Per-domain overrides of `mode`; keys must be served domains.
    pub(crate) hosts: BTreeMap<String, RegistrationMode>,
    /// Accounts one IP address may register per minute.
    pub(crate) per_minute_per_ip: u32,
}

/// Who may create an account with in-band registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RegistrationMode {
    /// Anyone.
    Open,
    /// No one (accounts are made with `starling user add`).
    Closed,
    /// Only clients connecting from 127.0.0.0/8 or ::1.
    Loopback,
}

impl fmt::Display for RegistrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegistrationMode::Open => "open",
            RegistrationMode::Closed => "closed",
            RegistrationMode::Loopback => "loopback",
        })
    }
}

/// `[admin]`: the operator's HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AdminConfig {
    /// Address of the admin HTTP listener.
    pub(crate) listen: String,
}

/// `[log]`: the `tracing` subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LogConfig {
    /// An `EnvFilter` directive: `info`, `starling_edge=debug,info`, ...
    pub(crate) level: String,
    /// Output format on standard error.
    pub(crate) format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every default, in one place. The README documents the same values.
mod defaults {
    use super::*;

    impl Default for ServerConfig {
        fn default() -> Self {
            ServerConfig {
                domains: vec!["localhost".to_owned()],
                data_dir: PathBuf::from("data"),
                node_name: "starling".to_owned(),
            }
        }
    }

    impl Default for C2sConfig {
        fn default() -> Self {
            C2sConfig {
                listen_starttls: vec!["[::]:5222".to_owned()],
                listen_direct_tls: vec!["[::]:5223".to_owned()],
                require_tls: true,
                max_stanza_size: 262_144,
                max_connections_per_ip: 64,
                preauth_timeout_secs: 30,
                idle_timeout_secs: 600,
                keepalive_interval_secs: 120,
                rate_bytes_per_sec: 65_536,
                rate_burst_bytes: 524_288,
                outbound_queue_stanzas: 2048,
                sm_max_resume_secs: 300,
                sm_ack_every_stanzas: 5,
                sm_ack_every_secs: 30,
                sm_max_unacked_stanzas: 1000,
                sm_max_unacked_bytes: 1_048_576,
                csi_max_held: 256,
            }
        }
    }

    impl Default for TlsConfig {
        fn default() -> Self {
            TlsConfig {
                certificates: Vec::new(),
                reload_check_secs: 30,
            }
        }
    }

    impl Default for AuthConfig {
        fn default() -> Self {
            AuthConfig {
                scram_iterations: 4096,
                failures_per_minute_per_ip: 10,
                failures_per_minute_per_account: 10,
            }
        }
    }

    impl Default for RegistrationConfig {
        fn default() -> Self {
            RegistrationConfig {
                mode: RegistrationMode::Loopback,
                hosts: BTreeMap::new(),
                per_minute_per_ip: 5,
            }
        }
    }

    impl Default for AdminConfig {
        fn default() -> Self {
            AdminConfig {
                listen: "127.0.0.1:5280".to_owned(),
            }
        }
    }

    impl Default for LogConfig {
        fn default() -> Self {
            LogConfig {
                level: "info".to_owned(),
                format: LogFormat::Text,
            }
        }
    }
}

impl Config {
    /// The effective configuration as TOML, as `starling config check` prints it.
    pub(crate) fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string_pretty(self)
    }
}

/// One problem with the configuration: where (the key path and, when it did not come from the
/// file, which variable or flag set it) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    /// Dotted key path, e.g. `c2s.max_stanza_size`; empty for the file as a whole.
    pub(crate) path: String,
    /// Where the value came from: a file name, `STARLING_...`, or `--flag`.
    pub(crate) origin: Option<String>,
    /// What is wrong.
    pub(crate) message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            origin: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            f.write_str(&self.path)?;
            if let Some(origin) = &self.origin {
                write!(f, " (from {origin})")?;
            }
            f.write_str(": ")?;
        } else if let Some(origin) = &self.origin {
            write!(f, "{origin}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// All problems found, in the order found; never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigErrors(pub(crate) Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid configuration ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests;
