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
        }
    }
}
