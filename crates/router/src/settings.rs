//! The router's settings: a plain struct with documented defaults. The binary owns the
//! configuration file and converts its `[server]`/`[auth]` sections into this.

use std::time::Duration;

/// How the router runs and what it says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The domains (virtual hosts) this server serves. Stanzas to any other domain are
    /// answered with `remote-server-not-found` until server-to-server routing exists.
    /// Default: `["localhost"]`.
    pub domains: Vec<String>,
    /// Number of worker tasks stanzas are sharded over by the bare JID of their subject.
    /// Default: the available parallelism of the machine.
    pub workers: usize,
    /// Capacity of each worker's queue; when it is full, the link's `send` waits
    /// (backpressure onto the edge). Default: 1024.
    pub queue_per_worker: usize,
    /// Software name answered to XEP-0092 and used as the XEP-0030 identity name.
    /// Default: `"Starling"`.
    pub name: String,
    /// Software version answered to XEP-0092. Default: this crate's version.
    pub version: String,
    /// Operating system answered to XEP-0092; `None` leaves `<os/>` out, so the server does
    /// not reveal it (XEP-0092 §5). Default: `None`.
    pub os: Option<String>,
    /// PBKDF2 iteration count for credentials derived on an in-band password change
    /// (XEP-0077 §3.3). Default: 4096 (RFC 7677 §4's minimum).
    pub scram_iterations: u32,
    /// How long workers keep draining their queues after cancellation before they drop
    /// what is left (counted as `dropped`). Default: 5 s.
    pub drain_timeout: Duration,
    /// Most items one roster may hold (RFC 6121 §2.3.3: a set beyond it is refused with
    /// `resource-constraint`). Default: 1000.
    pub max_roster_items: usize,
    /// Longest roster item `name`, in bytes (§2.3.3: `not-acceptable`). Default: 1024.
    pub max_roster_name_bytes: usize,
    /// Longest group name, in bytes (§2.3.3: `not-acceptable`). Default: 1024.
    pub max_roster_group_bytes: usize,
    /// Most groups on one roster item (`not-acceptable`). Default: 64.
    pub max_roster_groups: usize,
    /// Most messages stored for one offline account (XEP-0160 §3: beyond it the sender
    /// gets `service-unavailable`). Default: 1000.
    pub offline_quota: u64,
    /// Most directed-presence recipients remembered per session (RFC 6121 §4.6.3); later
    /// ones still get the presence but are not sent `unavailable` at the end (counted).
    /// Default: 64.
    pub max_directed_presence: usize,
    /// Most sessions whose presence state (available, roster requested, directed
    /// presence) the router tracks; a session beyond it is treated as unknown: at its end
    /// unavailable is broadcast as if it had been available. Default: 1,000,000.
    pub max_tracked_sessions: usize,
    /// Largest vCard stored (XEP-0054), in bytes; larger is `not-acceptable`.
    /// Default: 65,536.
    pub max_vcard_bytes: usize,
    /// Largest private XML fragment stored (XEP-0049), in bytes; larger is
    /// `not-acceptable`. Default: 65,536.
    pub max_private_bytes: usize,
    /// Most JIDs on one blocklist (XEP-0191); a block beyond it is `resource-constraint`.
    /// Default: 1000.
    pub max_blocklist_items: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            domains: vec!["localhost".to_owned()],
            workers: std::thread::available_parallelism().map_or(1, usize::from),
            queue_per_worker: 1024,
            name: "Starling".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            os: None,
            scram_iterations: starling_sasl::DEFAULT_ITERATIONS,
            drain_timeout: Duration::from_secs(5),
            max_roster_items: 1000,
            max_roster_name_bytes: 1024,
            max_roster_group_bytes: 1024,
            max_roster_groups: 64,
            offline_quota: 1000,
            max_directed_presence: 64,
            max_tracked_sessions: 1_000_000,
            max_vcard_bytes: 65_536,
            max_private_bytes: 65_536,
            max_blocklist_items: 1000,
        }
    }
}
