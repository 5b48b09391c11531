//! The edge's settings: a plain struct with the documented defaults (the `[c2s]`, `[auth]` and
//! `[registration]` sections of the configuration). The binary owns the serde tree and
//! converts it into this.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Everything the edge needs to know besides its dependencies.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Listeners where streams start in plain text and negotiate STARTTLS (RFC 6120 §5).
    /// Default `[::]:5222`.
    pub listen_starttls: Vec<SocketAddr>,
    /// Listeners where TLS comes first, with ALPN `xmpp-client` (XEP-0368). Default `[::]:5223`.
    pub listen_direct_tls: Vec<SocketAddr>,
    /// Whether STARTTLS is mandatory-to-negotiate on the plain-text listeners. Default `true`.
    pub require_tls: bool,
    /// Largest top-level element a client may send, in bytes. Default 262144.
    pub max_stanza_size: usize,
    /// Open connections allowed per client address. Default 64.
    pub max_connections_per_ip: u32,
    /// Time a connection has to authenticate. Default 30 s.
    pub preauth_timeout: Duration,
    /// A stream that sends no byte for this long is closed with `connection-timeout`.
    /// Default 600 s.
    pub idle_timeout: Duration,
    /// A single space is written after this long without writing anything. Default 120 s.
    pub keepalive_interval: Duration,
    /// Token-bucket refill per connection, bytes per second. Default 65536.
    pub rate_bytes_per_sec: u64,
    /// Token-bucket size per connection, bytes. Default 524288.
    pub rate_burst_bytes: u64,
    /// Stanzas queued per session before the session is closed with `policy-violation`.
    /// Default 2048.
    pub outbound_queue_stanzas: usize,
    /// How long a write to a client may take before the connection is dropped. Default 30 s.
    pub write_timeout: Duration,
    /// How long shutdown waits for streams to close before aborting them. Default 10 s.
    pub shutdown_grace: Duration,
    /// Stream management (XEP-0198): the longest a detached resumable session is kept, in
    /// seconds, advertised as `max` in `<enabled/>`. Default 300.
    pub sm_max_resume_secs: u32,
    /// The server asks for an ack (`<r/>`) after this many unacknowledged outbound stanzas.
    /// Default 5.
    pub sm_ack_every_stanzas: u32,
    /// The server asks for an ack this long after the last request while stanzas are
    /// unacknowledged. Default 30 s.
    pub sm_ack_every: Duration,
    /// Unacknowledged outbound stanzas a session may hold (also while detached); one more
    /// closes the stream with `policy-violation`. Default 1000.
    pub sm_max_unacked_stanzas: usize,
    /// The same limit in bytes of stanza XML. Default 1 MiB.
    pub sm_max_unacked_bytes: usize,
    /// Client State Indication (XEP-0352): most senders whose latest presence is held for an
    /// inactive client; a presence from one more flushes everything held. Default 256.
    pub csi_max_held: usize,
    /// The server's entity capabilities (XEP-0115), advertised as the `<c/>` stream feature
    /// after authentication. Not configuration: the binary fills it from the router, which
    /// computes `ver` from what its disco#info answers. Default `None` (not advertised).
    pub caps: Option<ServerCaps>,
    /// The `[auth]` section.
    pub auth: AuthSettings,
    /// The `[registration]` section.
    pub registration: RegistrationSettings,
}

impl Default for Settings {
    fn default() -> Self {
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        Settings {
            listen_starttls: vec![SocketAddr::new(any, 5222)],
            listen_direct_tls: vec![SocketAddr::new(any, 5223)],
            require_tls: true,
            max_stanza_size: 262_144,
            max_connections_per_ip: 64,
            preauth_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(120),
            rate_bytes_per_sec: 65_536,
            rate_burst_bytes: 524_288,
            outbound_queue_stanzas: 2048,
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            sm_max_resume_secs: 300,
            sm_ack_every_stanzas: 5,
            sm_ack_every: Duration::from_secs(30),
            sm_max_unacked_stanzas: 1000,
            sm_max_unacked_bytes: 1 << 20,
            csi_max_held: 256,
            caps: None,
            auth: AuthSettings::default(),
            registration: RegistrationSettings::default(),
        }
    }
}

/// Entity capabilities (XEP-0115 §4) of the server, as the `<c/>` element carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCaps {
    /// The hash function `ver` was computed with (`sha-1`).
    pub hash: String,
    /// The URI of the software.
    pub node: String,
    /// The verification string (§5.1).
    pub ver: String,
}

/// SASL settings (RFC 6120 §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// PBKDF2 iterations for new credentials (and shown to unknown users). Default 4096.
    pub scram_iterations: u32,
    /// SASL failures per client address per minute before further attempts are refused with
    /// `temporary-auth-failure`. Default 10.
    pub failures_per_minute_per_ip: u32,
    /// The same, per account. Default 10.
    pub failures_per_minute_per_account: u32,
    /// Failed SASL attempts per stream before it is closed with `policy-violation`
    /// (RFC 6120 §6.4.5 asks for a limit between 2 and 5). Default 5.
    pub max_attempts_per_stream: u32,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            scram_iterations: 4096,
            failures_per_minute_per_ip: 10,
            failures_per_minute_per_account: 10,
            max_attempts_per_stream: 5,
        }
    }
}

/// Who may create an account in-band (XEP-0077).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegistrationMode {
    /// Anyone.
    Open,
    /// No one.
    Closed,
    /// Only clients connecting from a loopback address (127.0.0.0/8, ::1). The default.
    #[default]
    Loopback,
}

impl RegistrationMode {
    /// Whether a client at `ip` may register under this mode.
    pub fn allows(self, ip: IpAddr) -> bool {
        match self {
            RegistrationMode::Open => true,
            RegistrationMode::Closed => false,
            RegistrationMode::Loopback => ip.to_canonical().is_loopback(),
        }
    }
}

/// In-band registration settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationSettings {
    /// The mode for hosts without an override. Default [`RegistrationMode::Loopback`].
    pub mode: RegistrationMode,
    /// Per-host overrides, keyed by domain.
    pub hosts: HashMap<String, RegistrationMode>,
    /// Registration attempts per client address per minute; more are refused with
    /// `resource-constraint`. Default 5.
    pub per_minute_per_ip: u32,
}

impl Default for RegistrationSettings {
    fn default() -> Self {
        RegistrationSettings {
            mode: RegistrationMode::Loopback,
            hosts: HashMap::new(),
            per_minute_per_ip: 5,
        }
    }
}

impl RegistrationSettings {
    /// The mode in force for `domain`.
    pub fn mode_for(&self, domain: &str) -> RegistrationMode {
        self.hosts
            .iter()
            .find(|(host, _)| host.eq_ignore_ascii_case(domain))
            .map_or(self.mode, |(_, mode)| *mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_configuration() {
        let s = Settings::default();
        assert_eq!(s.listen_starttls, vec!["[::]:5222".parse().unwrap()]);
        assert_eq!(s.listen_direct_tls, vec!["[::]:5223".parse().unwrap()]);
        assert!(s.require_tls);
        assert_eq!(s.max_stanza_size, 262_144);
        assert_eq!(s.max_connections_per_ip, 64);
        assert_eq!(s.preauth_timeout, Duration::from_secs(30));
        assert_eq!(s.idle_timeout, Duration::from_secs(600));
        assert_eq!(s.keepalive_interval, Duration::from_secs(120));
        assert_eq!(
            (s.rate_bytes_per_sec, s.rate_burst_bytes),
            (65_536, 524_288)
        );
        assert_eq!(s.outbound_queue_stanzas, 2048);
        assert_eq!(s.sm_max_resume_secs, 300);
        assert_eq!(s.sm_ack_every_stanzas, 5);
        assert_eq!(s.sm_ack_every, Duration::from_secs(30));
        assert_eq!(s.sm_max_unacked_stanzas, 1000);
        assert_eq!(s.sm_max_unacked_bytes, 1_048_576);
        assert_eq!(s.csi_max_held, 256);
        assert_eq!(s.caps, None);
        assert_eq!(s.auth.scram_iterations, 4096);
        assert_eq!(s.auth.failures_per_minute_per_ip, 10);
        assert_eq!(s.auth.failures_per_minute_per_account, 10);
        assert_eq!(s.registration.mode, RegistrationMode::Loopback);
    }

    #[test]
    fn registration_modes() {
        let lo: IpAddr = "127.0.0.5".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(RegistrationMode::Loopback.allows(lo));
        assert!(RegistrationMode::Loopback.allows(lo6));
        assert!(RegistrationMode::Loopback.allows(mapped));
        assert!(!RegistrationMode::Loopback.allows(remote));
        assert!(RegistrationMode::Open.allows(remote));
        assert!(!RegistrationMode::Closed.allows(lo));
        let mut r = RegistrationSettings::default();
        r.hosts
            .insert("Example.org".into(), RegistrationMode::Closed);
        assert_eq!(r.mode_for("example.org"), RegistrationMode::Closed);
        assert_eq!(r.mode_for("other.org"), RegistrationMode::Loopback);
    }
}
