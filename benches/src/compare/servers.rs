//! The three servers of the comparison, each run from a private directory with a
//! configuration written here: the same domain, loopback ports, certificate (one generated
//! ECDSA P-256 key shared by all three), TLS required, SCRAM-SHA-256 with 4096 iterations,
//! in-band registration open without per-address throttling, the same listen backlog (1024,
//! what tokio gives Starling; ejabberd's default is 5 and Prosody's 128, which drop
//! connections in a login storm), and no traffic shapers or rate limits, so that what is
//! measured is each server's own work.
//!
//! Starling is our binary, run as the calling user. Prosody and ejabberd are Debian's
//! packages, run as their packages' system users (`prosody`, `ejabberd`) from the private
//! directory, never as the system services, through `setpriv` (which keeps the open-file
//! limit; ejabberd started by `ejabberdctl` as root, which uses `su`, gets PAM's default
//! limit and refuses connections past about two thousand). ejabberd's Erlang distribution
//! listens on a fixed loopback port (`ERL_DIST_PORT`), so no `epmd` daemon is started, and
//! its cookie is given on the command line, so nothing is written to the `ejabberd` user's
//! home.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};
use serde::{Deserialize, Serialize};

use crate::procfs::{Proc, pids_with_cmdline};

/// A server under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `starling serve`.
    Starling,
    /// Prosody from Debian's package.
    Prosody,
    /// ejabberd from Debian's package.
    Ejabberd,
}

impl Kind {
    /// Every server, in the order the comparison runs them.
    pub const ALL: [Kind; 3] = [Kind::Starling, Kind::Prosody, Kind::Ejabberd];

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Starling => "starling",
            Kind::Prosody => "prosody",
            Kind::Ejabberd => "ejabberd",
        }
    }

    /// Parses a name.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name.trim()))
    }

    /// The Debian package that provides it (`None`: built from this workspace).
    pub fn package(self) -> Option<&'static str> {
        match self {
            Kind::Starling => None,
            Kind::Prosody => Some("prosody"),
            Kind::Ejabberd => Some("ejabberd"),
        }
    }

    /// The system user the package runs its service as.
    pub fn system_user(self) -> Option<&'static str> {
        self.package()
    }
}

/// SCRAM iterations for new accounts on every server (Starling's default, ejabberd's fixed
/// count; Prosody's default of 10000 is lowered to match).
pub const SCRAM_ITERATIONS: u32 = 4096;

/// The listen backlog of every server's listeners: Starling's (tokio's `TcpListener::bind`).
pub const BACKLOG: u32 = 1024;

/// Where one server's files and ports are.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Which server.
    pub kind: Kind,
    /// Its private directory (configuration, data, logs).
    pub dir: PathBuf,
    /// The XMPP domain.
    pub domain: String,
    /// The STARTTLS listener.
    pub starttls: SocketAddr,
    /// The direct TLS listener (XEP-0368).
    pub direct_tls: SocketAddr,
    /// One more port: Starling's admin HTTP, ejabberd's Erlang distribution.
    pub aux: SocketAddr,
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
    /// The open-file limit the server gets (soft and hard).
    pub nofile: u64,
    /// The CPUs the server may run on (a `taskset -c` list), or any.
    pub cpus: Option<String>,
}

impl Layout {
    /// The server's configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(match self.kind {
            Kind::Starling => "starling.toml",
            Kind::Prosody => "prosody.cfg.lua",
            Kind::Ejabberd => "ejabberd.yml",
        })
    }

    /// The file the server's standard output and error go to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The Erlang node name of ejabberd, unique to this directory.
    pub fn erlang_node(&self) -> String {
        format!("starling-compare-{}@localhost", self.aux.port())
    }
}

/// Starling's configuration: defaults except the listeners, the certificate, open
/// registration, and the per-address and per-connection limits lifted.
pub fn starling_toml(l: &Layout) -> String {
    let q = |p: &Path| toml_string(&p.display().to_string());
    format!(
        "# Written by starling-compare.\n\
         [server]\n\
         domains = [{domain}]\n\
         data_dir = {data}\n\
         \n\
         [c2s]\n\
         listen_starttls = [\"{starttls}\"]\n\
         listen_direct_tls = [\"{direct}\"]\n\
         require_tls = true\n\
         # Lifted: the generator spreads its connections over many loopback addresses, and a\n\
         # byte-rate limit would be a shaper the other servers do not have.\n\
         max_connections_per_ip = 1000000\n\
         rate_bytes_per_sec = 1073741824\n\
         rate_burst_bytes = 1073741824\n\
         \n\
         [tls]\n\
         certificates = [{{ cert = {cert}, key = {key} }}]\n\
         \n\
         [auth]\n\
         scram_iterations = {SCRAM_ITERATIONS}\n\
         \n\
         [registration]\n\
         mode = \"open\"\n\
         per_minute_per_ip = 1000000\n\
         \n\
         [admin]\n\
         listen = \"{admin}\"\n\
         \n\
         [log]\n\
         level = \"warn\"\n",
        domain = toml_string(&l.domain),
        data = q(&l.dir.join("data")),
        starttls = l.starttls,
        direct = l.direct_tls,
        cert = q(&l.cert),
        key = q(&l.key),
        admin = l.aux,
    )
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn lua_string(s: &str) -> String {
    toml_string(s)
}

/// Prosody's configuration: only the modules the scenarios use (no `limits`, so no
/// bandwidth limiting; no `register_limits` throttling; no s2s), SCRAM-SHA-256 with
/// hashed storage, TLS required, files in the private directory.
pub fn prosody_cfg(l: &Layout) -> String {
    let p = |path: &Path| lua_string(&path.display().to_string());
    let mut s = String::new();
    let _ = write!(
        s,
        "-- Written by starling-compare.\n\
         data_path = {data}\n\
         pidfile = {pid}\n\
         log = {{ warn = {log} }}\n\
         network_backend = \"epoll\"\n\
         network_settings = {{ tcp_backlog = {BACKLOG} }}\n\
         interfaces = {{ \"{ip}\" }}\n\
         c2s_ports = {{ {starttls} }}\n\
         c2s_direct_tls_ports = {{ {direct} }}\n\
         modules_enabled = {{ \"roster\", \"saslauth\", \"tls\", \"disco\", \"ping\", \"register\" }}\n\
         modules_disabled = {{ \"s2s\" }}\n\
         c2s_require_encryption = true\n\
         authentication = \"internal_hashed\"\n\
         password_hash = \"SHA-256\"\n\
         default_iteration_count = {SCRAM_ITERATIONS}\n\
         storage = \"internal\"\n\
         allow_registration = true\n\
         ssl = {{ certificate = {cert}, key = {key} }}\n\
         \n\
         VirtualHost {domain}\n\
         \tssl = {{ certificate = {cert}, key = {key} }}\n",
        data = p(&l.dir.join("data")),
        pid = p(&l.dir.join("prosody.pid")),
        log = p(&l.dir.join("prosody.log")),
        ip = l.starttls.ip(),
        starttls = l.starttls.port(),
        direct = l.direct_tls.port(),
        cert = p(&l.cert),
        key = p(&l.key),
        domain = lua_string(&l.domain),
    );
    s
}

/// ejabberd's configuration: two C2S listeners without shapers, SCRAM-SHA-256 in Mnesia,
/// registration open to every address with no per-address timeout, no limit on sessions per
/// user beyond a generous one.
pub fn ejabberd_yml(l: &Layout) -> String {
    let q = |path: &Path| format!("'{}'", path.display().to_string().replace('\'', "''"));
    // The two C2S listeners differ only in how TLS starts.
    let listener = |addr: SocketAddr, tls: &str| {
        format!(
            "  -\n    port: {}\n    ip: '{}'\n    module: ejabberd_c2s\n    {tls}\n    \
             max_stanza_size: 262144\n    backlog: {BACKLOG}\n    access: c2s\n",
            addr.port(),
            addr.ip()
        )
    };
    format!(
        "# Written by starling-compare.\n\
         hosts:\n  - '{domain}'\n\
         loglevel: warning\n\
         certfiles:\n  - {cert}\n  - {key}\n\
         listen:\n\
         {starttls}\
         {direct}\
         auth_method: internal\n\
         auth_password_format: scram\n\
         auth_scram_hash: sha256\n\
         # Default 600 s: one registration per address per 10 minutes.\n\
         registration_timeout: infinity\n\
         s2s_access: none\n\
         access_rules:\n\
         \x20 c2s:\n    allow: all\n\
         \x20 register:\n    allow: all\n\
         shaper_rules:\n\
         \x20 # Default 10 sessions per user.\n\
         \x20 max_user_sessions: 1000\n\
         modules:\n\
         \x20 mod_disco: {{}}\n\
         \x20 mod_ping: {{}}\n\
         \x20 mod_roster: {{}}\n\
         \x20 mod_register:\n\
         \x20   access: register\n\
         \x20   ip_access: all\n\
         \x20   password_strength: 0\n",
        domain = l.domain,
        cert = q(&l.cert),
        key = q(&l.key),
        starttls = listener(l.starttls, "starttls_required: true"),
        direct = listener(l.direct_tls, "tls: true"),
    )
}

/// The `ejabberdctl` settings file given with `--ctl-config`. Debian's own
/// `/etc/ejabberd/ejabberdctl.cfg` sets `EJABBERD_CONFIG_PATH`, which would override
/// `--config`; this file sets it to ours.
pub fn ejabberdctl_cfg(l: &Layout, cookie: &str) -> String {
    format!(
        "# Written by starling-compare.\n\
         ERLANG_NODE={node}\n\
         EJABBERD_CONFIG_PATH='{config}'\n\
         EJABBERD_PID_PATH='{pid}'\n\
         POLL=true\n\
         ERL_MAX_PORTS={ports}\n\
         ERL_PROCESSES=1000000\n\
         INET_DIST_INTERFACE=127.0.0.1\n\
         ERL_DIST_PORT={dist}\n\
         ERL_OPTIONS='-setcookie {cookie} -env ERL_CRASH_DUMP_BYTES 0'\n",
        node = l.erlang_node(),
        config = l.config_path().display(),
        pid = l.dir.join("ejabberd.pid").display(),
        ports = l.nofile.max(1024),
        dist = l.aux.port(),
    )
}

/// The resolver settings ejabberd reads (`ERL_INETRC`, in its configuration directory):
/// the hosts file, then the system's resolver.
pub const EJABBERD_INETRC: &str = "{lookup, [file, native]}.\n";

/// Pids of the processes this run started and has not stopped yet (servers and their
/// measured processes), for [`kill_all_started`] when the run is interrupted.
static STARTED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Records a started process for [`kill_all_started`].
pub fn track(pid: u32) {
    if let Ok(mut v) = STARTED.lock() {
        v.push(pid);
    }
}

/// Forgets a process that ended.
pub fn untrack(pid: u32) {
    if let Ok(mut v) = STARTED.lock() {
        v.retain(|&p| p != pid);
    }
}

/// Sends SIGKILL to every tracked process (on SIGINT or SIGTERM of the run).
pub fn kill_all_started() {
    if let Ok(v) = STARTED.lock() {
        for &p in v.iter() {
            signal(p, Signal::KILL);
        }
    }
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    layout: Layout,
    child: Child,
    /// The processes whose RSS and CPU are measured (for ejabberd: `beam.smp`).
    pub measured: Vec<u32>,
}

/// Fails when something already listens on `addr`.
pub fn ensure_free(addr: SocketAddr) -> anyhow::Result<()> {
    TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("port {addr} is in use; choose others with --port-base"))
}

/// Makes `path` owned by `user` (recursively), for servers that run as their system user.
pub fn chown_to(path: &Path, user: &str) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(path)
        .status()
        .context("running chown")?;
    if !status.success() {
        bail!("chown {user} {} failed", path.display());
    }
    Ok(())
}

/// Writes the configuration and starts the server; returns once it accepts connections on
/// both listeners (or fails after `timeout`).
pub fn start(l: &Layout, starling_bin: &Path, timeout: Duration) -> anyhow::Result<Running> {
    for addr in [l.starttls, l.direct_tls, l.aux] {
        ensure_free(addr)?;
    }
    std::fs::create_dir_all(&l.dir).with_context(|| format!("creating {}", l.dir.display()))?;
    let log = std::fs::File::create(l.log_path()).context("creating the server log")?;
    let mut cmd = match l.kind {
        Kind::Starling => {
            std::fs::write(l.config_path(), starling_toml(l))?;
            let mut c = pinned(l.cpus.as_deref(), starling_bin);
            c.arg("serve").arg("--config").arg(l.config_path());
            c
        }
        Kind::Prosody => {
            std::fs::create_dir_all(l.dir.join("data"))?;
            std::fs::write(l.config_path(), prosody_cfg(l))?;
            chown_to(&l.dir, "prosody")?;
            let mut c = pinned(l.cpus.as_deref(), "setpriv");
            c.args([
                "--reuid=prosody",
                "--regid=prosody",
                "--init-groups",
                "--",
                "prosody",
                "-F",
                "--config",
            ])
            .arg(l.config_path());
            c
        }
        Kind::Ejabberd => {
            let cookie = random_cookie()?;
            for sub in ["spool", "logs"] {
                std::fs::create_dir_all(l.dir.join(sub))?;
            }
            std::fs::write(l.config_path(), ejabberd_yml(l))?;
            std::fs::write(l.dir.join("ejabberdctl.cfg"), ejabberdctl_cfg(l, &cookie))?;
            std::fs::write(l.dir.join("inetrc"), EJABBERD_INETRC)?;
            chown_to(&l.dir, "ejabberd")?;
            let mut c = ejabberdctl(l);
            c.arg("foreground");
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir(&l.dir);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", l.kind.name()))?;
    track(child.id());
    let mut running = Running {
        layout: l.clone(),
        child,
        measured: Vec::new(),
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = running.child.try_wait()? {
            bail!(
                "{} exited at startup ({status}); its log {}:\n{}",
                l.kind.name(),
                l.log_path().display(),
                tail(&l.log_path(), 30)
            );
        }
        let up = [l.starttls, l.direct_tls]
            .iter()
            .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok());
        if up {
            break;
        }
        if Instant::now() >= deadline {
            running.stop();
            bail!(
                "{} did not accept connections within {timeout:?}; its log:\n{}",
                l.kind.name(),
                tail(&l.log_path(), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    running.measured = match l.kind {
        Kind::Ejabberd => {
            let node = l.erlang_node();
            let beams: Vec<u32> = pids_with_cmdline(&node)
                .into_iter()
                .filter(|&p| Proc::Pid(p).name().is_some_and(|n| n.starts_with("beam")))
                .collect();
            if beams.is_empty() {
                running.stop();
                bail!("ejabberd accepts connections but no beam.smp process runs node {node}");
            }
            beams
        }
        _ => vec![running.child.id()],
    };
    for &p in &running.measured {
        track(p);
    }
    Ok(running)
}

/// `ejabberdctl` with the private directory's files, run as the `ejabberd` user through
/// `setpriv`: run as root, `ejabberdctl` switches user with `su`, whose PAM session applies
/// the system's default open-file limit (too few for the sessions), where `setpriv` keeps
/// the limit this run raised.
fn ejabberdctl(l: &Layout) -> Command {
    let mut c = pinned(l.cpus.as_deref(), "setpriv");
    c.args([
        "--reuid=ejabberd",
        "--regid=ejabberd",
        "--init-groups",
        "--",
        "ejabberdctl",
    ])
    .env("HOME", &l.dir)
    .arg("--config-dir")
    .arg(&l.dir)
    .arg("--config")
    .arg(l.config_path())
    .arg("--ctl-config")
    .arg(l.dir.join("ejabberdctl.cfg"))
    .arg("--logs")
    .arg(l.dir.join("logs"))
    .arg("--spool")
    .arg(l.dir.join("spool"));
    c
}

/// A command for `program`, run on `cpus` only (through `taskset -c`, whose affinity every
/// process and thread the program starts inherits) when given.
pub fn pinned(cpus: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn random_cookie() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("random cookie: {e}"))?;
    Ok(b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    }))
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Running {
    /// The layout it runs from.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Stops the server: ejabberd through `ejabberdctl stop`, the others with SIGTERM; after
    /// 30 seconds, SIGKILL to everything left.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait()
            && self.measured.iter().all(|&p| Proc::Pid(p).name().is_none())
        {
            return;
        }
        match self.layout.kind {
            Kind::Ejabberd => {
                let _ = ejabberdctl(&self.layout)
                    .arg("stop")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            _ => signal(self.child.id(), Signal::TERM),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let gone = |r: &mut Running| {
            matches!(r.child.try_wait(), Ok(Some(_)))
                && r.measured.iter().all(|&p| Proc::Pid(p).name().is_none())
        };
        while !gone(self) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if !gone(self) {
            for &p in &self.measured {
                signal(p, Signal::KILL);
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        untrack(self.child.id());
        for &p in &self.measured {
            untrack(p);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(kind: Kind) -> Layout {
        Layout {
            kind,
            dir: PathBuf::from("/tmp/cmp/x"),
            domain: "localhost".to_owned(),
            starttls: "127.0.0.1:25222".parse().unwrap(),
            direct_tls: "127.0.0.1:25223".parse().unwrap(),
            aux: "127.0.0.1:25280".parse().unwrap(),
            cert: PathBuf::from("/tmp/cmp/cert.pem"),
            key: PathBuf::from("/tmp/cmp/key.pem"),
            nofile: 20000,
            cpus: None,
        }
    }

    #[test]
    fn starling_config_is_valid_toml_with_limits_lifted() {
        let text = starling_toml(&layout(Kind::Starling));
        let v: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(
            v["c2s"]["listen_starttls"][0].as_str(),
            Some("127.0.0.1:25222")
        );
        assert_eq!(v["c2s"]["require_tls"].as_bool(), Some(true));
        assert_eq!(v["registration"]["mode"].as_str(), Some("open"));
        assert_eq!(
            v["tls"]["certificates"][0]["cert"].as_str(),
            Some("/tmp/cmp/cert.pem")
        );
        assert_eq!(v["auth"]["scram_iterations"].as_integer(), Some(4096));
    }

    #[test]
    fn prosody_config_names_what_matters() {
        let text = prosody_cfg(&layout(Kind::Prosody));
        for needle in [
            "c2s_ports = { 25222 }",
            "c2s_direct_tls_ports = { 25223 }",
            "authentication = \"internal_hashed\"",
            "password_hash = \"SHA-256\"",
            "default_iteration_count = 4096",
            "c2s_require_encryption = true",
            "allow_registration = true",
            "VirtualHost \"localhost\"",
            "tcp_backlog = 1024",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
        assert!(!text.contains("\"limits\""), "{text}");
    }

    #[test]
    fn ejabberd_configs_override_what_debian_sets() {
        let l = layout(Kind::Ejabberd);
        let yml = ejabberd_yml(&l);
        for needle in [
            "port: 25222",
            "port: 25223",
            "tls: true",
            "starttls_required: true",
            "auth_password_format: scram",
            "auth_scram_hash: sha256",
            "registration_timeout: infinity",
            "max_user_sessions: 1000",
            "ip_access: all",
            "backlog: 1024",
        ] {
            assert!(yml.contains(needle), "{needle} missing:\n{yml}");
        }
        assert!(!yml.contains("shaper:"), "{yml}");
        let ctl = ejabberdctl_cfg(&l, "c00k1e");
        assert!(ctl.contains("EJABBERD_CONFIG_PATH='/tmp/cmp/x/ejabberd.yml'"));
        assert!(ctl.contains("ERL_DIST_PORT=25280"));
        assert!(ctl.contains("ERLANG_NODE=starling-compare-25280@localhost"));
        assert!(ctl.contains("-setcookie c00k1e"));
        assert!(ctl.contains("ERL_MAX_PORTS=20000"));
    }

    #[test]
    fn names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
        assert_eq!(Kind::from_name(" Prosody "), Some(Kind::Prosody));
        assert_eq!(Kind::from_name("openfire"), None);
    }
}
