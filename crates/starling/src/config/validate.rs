//! Semantic validation: the values that deserialised are checked against each other and the
//! machine (domains are JIDs per RFC 7622 §3.2, addresses parse, sizes are positive,
//! certificate files are readable). Every problem is collected; nothing stops at the first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use super::layers::Loaded;
use super::{Config, ConfigError, ConfigErrors, RegistrySettings};

/// A configuration that passed every check, with the values the runtime needs already parsed.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// The effective configuration; domains (and registration host keys) normalised.
    pub(crate) config: Config,
    /// `c2s.listen_starttls`, parsed.
    pub(crate) c2s_starttls: Vec<SocketAddr>,
    /// `c2s.listen_direct_tls`, parsed.
    pub(crate) c2s_direct_tls: Vec<SocketAddr>,
    /// `admin.listen`, parsed.
    pub(crate) admin: SocketAddr,
    /// Whether `log.level` was given on the command line (which then beats `RUST_LOG`).
    pub(crate) log_level_from_cli: bool,
    /// `[registry]`, parsed.
    pub(crate) registry: RegistrySettings,
}

/// The levels a bare `log.level` directive may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks everything [`super::load`] could not, and returns all errors (the loader's first).
pub(crate) fn validate(loaded: Loaded) -> Result<Checked, ConfigErrors> {
    let mut errors = Vec::new();
    let mut config = loaded.config.clone();
    let mut err = |path: String, message: String| {
        errors.push(ConfigError {
            origin: loaded.origin(&path),
            path,
            message,
        });
    };

    // [server]
    if config.server.domains.is_empty() {
        err(
            "server.domains".into(),
            "at least one domain must be served".into(),
        );
    }
    let mut domains: Vec<String> = Vec::new();
    for (i, d) in config.server.domains.iter().enumerate() {
        match starling_xmpp::jid::parse_domain(d) {
            Ok(normal) => {
                let normal = normal.as_str().to_owned();
                if domains.contains(&normal) {
                    err(
                        format!("server.domains[{i}]"),
                        format!("`{d}` is listed more than once"),
                    );
                } else {
                    domains.push(normal);
                }
            }
            Err(e) => err(
                format!("server.domains[{i}]"),
                format!("`{d}` is not a valid domain ({e})"),
            ),
        }
    }
    if config.server.data_dir.as_os_str().is_empty() {
        err("server.data_dir".into(), "must not be empty".into());
    }
    let node = &config.server.node_name;
    if node.is_empty() || node.len() > 255 {
        err(
            "server.node_name".into(),
            "must be 1 to 255 bytes long".into(),
        );
    } else if node
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        err(
            "server.node_name".into(),
            format!("`{node}` must not contain whitespace, control characters or `/`"),
        );
    }

    // [c2s]
    let c2s_starttls = addrs("c2s.listen_starttls", &config.c2s.listen_starttls, &mut err);
    let c2s_direct_tls = addrs(
        "c2s.listen_direct_tls",
        &config.c2s.listen_direct_tls,
        &mut err,
    );
    if config.c2s.listen_starttls.is_empty() && config.c2s.listen_direct_tls.is_empty() {
        err(
            "c2s.listen_starttls".into(),
            "no client listener: give `c2s.listen_starttls` or `c2s.listen_direct_tls`".into(),
        );
    }
    let c2s = &config.c2s;
    for (key, value) in [
        ("c2s.max_stanza_size", c2s.max_stanza_size),
        (
            "c2s.max_connections_per_ip",
            u64::from(c2s.max_connections_per_ip),
        ),
        ("c2s.preauth_timeout_secs", c2s.preauth_timeout_secs),
        ("c2s.idle_timeout_secs", c2s.idle_timeout_secs),
        ("c2s.keepalive_interval_secs", c2s.keepalive_interval_secs),
        ("c2s.rate_bytes_per_sec", c2s.rate_bytes_per_sec),
        ("c2s.rate_burst_bytes", c2s.rate_burst_bytes),
        ("c2s.outbound_queue_stanzas", c2s.outbound_queue_stanzas),
        ("c2s.sm_max_resume_secs", u64::from(c2s.sm_max_resume_secs)),
        (
            "c2s.sm_ack_every_stanzas",
            u64::from(c2s.sm_ack_every_stanzas),
        ),
        ("c2s.sm_ack_every_secs", c2s.sm_ack_every_secs),
        ("c2s.sm_max_unacked_stanzas", c2s.sm_max_unacked_stanzas),
        ("c2s.sm_max_unacked_bytes", c2s.sm_max_unacked_bytes),
        ("c2s.csi_max_held", c2s.csi_max_held),
        ("tls.reload_check_secs", config.tls.reload_check_secs),
        (
            "auth.scram_iterations",
            u64::from(config.auth.scram_iterations),
        ),
        (
            "auth.failures_per_minute_per_ip",
            u64::from(config.auth.failures_per_minute_per_ip),
        ),
        (
            "auth.failures_per_minute_per_account",
            u64::from(config.auth.failures_per_minute_per_account),
        ),
        (
            "registration.per_minute_per_ip",
            u64::from(config.registration.per_minute_per_ip),
        ),
    ] {
        if value == 0 {
            err(key.into(), "must be greater than 0".into());
        }
    }
    if usize::try_from(c2s.max_stanza_size).is_err() {
        err(
            "c2s.max_stanza_size".into(),
            "too large for this machine".into(),
        );
    }

    // [tls]
    for (i, pair) in config.tls.certificates.iter().enumerate() {
        for (field, path) in [("cert", &pair.cert), ("key", &pair.key)] {
            if let Err(message) = readable_file(path) {
                err(format!("tls.certificates[{i}].{field}"), message);
            }
        }
    }

    // [registration]
    let mut hosts = BTreeMap::new();
    for (host, mode) in &config.registration.hosts {
        let path = format!("registration.hosts.\"{host}\"");
        match starling_xmpp::jid::parse_domain(host) {
            Ok(normal) if domains.iter().any(|d| d == normal.as_str()) => {
                hosts.insert(normal.as_str().to_owned(), *mode);
            }
            Ok(_) => err(
                path,
                format!("`{host}` is not a served domain (see server.domains)"),
            ),
            Err(e) => err(path, format!("`{host}` is not a valid domain ({e})")),
        }
    }

    // [admin]
    let admin = match config.admin.listen.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            err(
                "admin.listen".into(),
                format!(
                    "`{}` is not an IP address with a port (e.g. `127.0.0.1:5280`)",
                    config.admin.listen
                ),
            );
            None
        }
    };

    // Two listeners on one fixed port cannot both bind; port 0 asks for a fresh port each time.
    let mut seen: Vec<(SocketAddr, String)> = Vec::new();
    let all = c2s_starttls
        .iter()
        .map(|a| (*a, "c2s.listen_starttls"))
        .chain(c2s_direct_tls.iter().map(|a| (*a, "c2s.listen_direct_tls")))
        .chain(admin.iter().map(|a| (*a, "admin.listen")));
    for (addr, key) in all {
        if addr.port() == 0 {
            continue;
        }
        if let Some((_, first)) = seen.iter().find(|(a, _)| *a == addr) {
            err(
                key.into(),
                format!("`{addr}` is also used by {first}: each listener needs its own address"),
            );
        } else {
            seen.push((addr, key.to_owned()));
        }
    }

    // [log]
    if let Err(message) = check_log_level(&config.log.level) {
        err("log.level".into(), message);
    }

    // [registry]
    let registry = super::registry::validate(&config.registry, &mut err);

    let mut all_errors = loaded.errors.clone();
    all_errors.extend(errors);
    match (admin, registry) {
        (Some(admin), Some(registry)) if all_errors.is_empty() => {
            config.server.domains = domains;
            config.registration.hosts = hosts;
            Ok(Checked {
                config,
                c2s_starttls,
                c2s_direct_tls,
                admin,
                log_level_from_cli: loaded
                    .origin("log.level")
                    .is_some_and(|o| o.starts_with("--")),
                registry,
            })
        }
        _ => Err(ConfigErrors(all_errors)),
    }
}

fn addrs(key: &str, list: &[String], err: &mut dyn FnMut(String, String)) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (i, a) in list.iter().enumerate() {
        match a.parse::<SocketAddr>() {
            Ok(addr) => out.push(addr),
            Err(_) => err(
                format!("{key}[{i}]"),
                format!("`{a}` is not an IP address with a port (e.g. `[::]:5222`)"),
            ),
        }
    }
    out
}

fn readable_file(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("must not be empty".into());
    }
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("`{}` is not a file", path.display())),
        Err(e) => Err(format!("cannot read `{}`: {e}", path.display())),
    }
}

/// `log.level` is a `tracing` filter: comma-separated directives, each a level (`info`) or
/// `target=level` (`starling_edge=debug`). A bare word that is not a level is refused, since
/// it would silently mean "everything from a target of that name".
fn check_log_level(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err("must not be empty".into());
    }
    for directive in level.split(',').map(str::trim) {
        if directive.is_empty() {
            return Err(format!("`{level}` has an empty directive"));
        }
        let lvl = match directive.rsplit_once('=') {
            Some((target, lvl)) if !target.is_empty() => lvl,
            Some(_) => return Err(format!("`{directive}` has no target before `=`")),
            None => directive,
        };
        if !LEVELS.contains(&lvl.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}`: `{lvl}` is not a level (one of {})",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| format!("`{level}` is not a valid filter: {e}"))
}
