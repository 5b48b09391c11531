//! [`TestServer`]: one `starling serve` process on free loopback ports.
//!
//! Readiness contract (from the brief): after binding every listener the server writes
//! `<data_dir>/run/listeners.json` = `{"c2s_starttls": [...], "c2s_direct_tls": [...], "admin":
//! "..."}` with the actual ports, and `/readyz` on the admin listener answers 200. The harness
//! polls both against a deadline (20 s by default), and fails with the log's tail when the
//! process exits or the deadline passes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Value;

use crate::process::{self, wait_timeout};
use crate::{
    HarnessError, HttpResponse, Metrics, Registration, ServerConfig, TestCert, http_get, paths,
    shared_cert, starling_binary,
};

/// How long a server gets to become ready, unless the builder says otherwise.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `terminate` waits for a graceful exit before it kills.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(15);
/// The interval at which readiness and exit are polled.
const POLL: Duration = Duration::from_millis(20);
/// Lines of the log printed when a test fails.
const TAIL_LINES: usize = 50;

/// The addresses a server reported in `run/listeners.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Listeners {
    /// STARTTLS (plain TCP first) client listeners.
    pub c2s_starttls: Vec<SocketAddr>,
    /// Direct TLS client listeners (XEP-0368).
    pub c2s_direct_tls: Vec<SocketAddr>,
    /// The admin HTTP listener.
    pub admin: SocketAddr,
}

impl Listeners {
    fn check(&self) -> Result<(), String> {
        let all = self
            .c2s_starttls
            .iter()
            .chain(&self.c2s_direct_tls)
            .chain(std::iter::once(&self.admin));
        if let Some(zero) = all.clone().find(|a| a.port() == 0) {
            return Err(format!(
                "listeners.json reports port 0 ({zero}), not the bound port"
            ));
        }
        if self.c2s_starttls.is_empty() || self.c2s_direct_tls.is_empty() {
            return Err(format!(
                "listeners.json lacks a STARTTLS or a direct TLS listener: {self:?}"
            ));
        }
        Ok(())
    }
}

/// Builds a [`TestServer`]: domains, registration mode, limits, extra TOML, environment.
#[derive(Debug, Clone)]
pub struct TestServerBuilder {
    config: ServerConfig,
    domains_set: bool,
    env: Vec<(String, String)>,
    ready_timeout: Duration,
}

impl Default for TestServerBuilder {
    fn default() -> Self {
        TestServerBuilder {
            config: ServerConfig::default(),
            domains_set: false,
            env: Vec::new(),
            ready_timeout: READY_TIMEOUT,
        }
    }
}

impl TestServerBuilder {
    /// Serves `domain`. The first call replaces the default (`example.test`), later calls add;
    /// the first domain is the one [`TestServer::domain`] returns.
    pub fn domain(mut self, domain: &str) -> Self {
        let mut domains = if self.domains_set {
            self.config.domains().to_vec()
        } else {
            Vec::new()
        };
        domains.push(domain.to_owned());
        self.config.set_domains(domains);
        self.domains_set = true;
        self
    }

    /// `[registration] mode` (default here: open).
    pub fn registration(mut self, mode: Registration) -> Self {
        self.config.set_registration(mode);
        self
    }

    /// `[c2s] require_tls`.
    pub fn require_tls(self, required: bool) -> Self {
        self.set("c2s", "require_tls", required)
    }

    /// `[c2s] max_stanza_size`, bytes.
    pub fn max_stanza_size(self, bytes: u32) -> Self {
        self.set("c2s", "max_stanza_size", i64::from(bytes))
    }

    /// `[c2s] rate_bytes_per_sec` and `rate_burst_bytes`.
    pub fn rate_limit(self, bytes_per_sec: u32, burst_bytes: u32) -> Self {
        self.set("c2s", "rate_bytes_per_sec", i64::from(bytes_per_sec))
            .set("c2s", "rate_burst_bytes", i64::from(burst_bytes))
    }

    /// `[c2s] max_connections_per_ip`.
    pub fn max_connections_per_ip(self, n: u32) -> Self {
        self.set("c2s", "max_connections_per_ip", i64::from(n))
    }

    /// `[c2s] preauth_timeout_secs`.
    pub fn preauth_timeout_secs(self, secs: u32) -> Self {
        self.set("c2s", "preauth_timeout_secs", i64::from(secs))
    }

    /// `[auth] failures_per_minute_per_ip` and `failures_per_minute_per_account`.
    pub fn auth_failures_per_minute(self, per_ip: u32, per_account: u32) -> Self {
        self.set("auth", "failures_per_minute_per_ip", i64::from(per_ip))
            .set(
                "auth",
                "failures_per_minute_per_account",
                i64::from(per_account),
            )
    }

    /// Any `[section] key = value`.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Self {
        self.config.set(section, key, value);
        self
    }

    /// A TOML fragment merged over the generated configuration.
    pub fn extra_toml(mut self, fragment: &str) -> Self {
        self.config.add_toml(fragment);
        self
    }

    /// `[log] level` (default: `STARLING_TEST_LOG`, else `info`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.config.set_log_level(level);
        self
    }

    /// An environment variable for the server process (the test process's `STARLING_*`
    /// variables are not passed on, so a developer's shell cannot change a test).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How long to wait for readiness (default 20 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The configuration as it will be written.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Writes the configuration into a fresh data directory, starts the server and waits
    /// until it is ready.
    pub fn start(self) -> Result<TestServer, HarnessError> {
        let binary = starling_binary()?;
        let cert = shared_cert()?;
        let data_dir = paths::unique_dir("data")?;
        let mut server = TestServer {
            binary,
            cert,
            config_path: data_dir.join("starling.toml"),
            log_path: data_dir.join("starling.log"),
            data_dir,
            domains: self.config.domains().to_vec(),
            env: self.env,
            ready_timeout: self.ready_timeout,
            child: None,
            listeners: None,
            starts: 0,
            keep_data: false,
        };
        let toml = self.config.to_toml(cert)?;
        std::fs::write(&server.config_path, toml).map_err(|e| {
            HarnessError::io(format!("writing {}", server.config_path.display()), e)
        })?;
        if let Err(e) = server.spawn_and_wait() {
            // The error names the log: keep it for whoever reads the error.
            server.keep_data = true;
            return Err(e);
        }
        Ok(server)
    }
}

/// A running `starling serve` with its own data directory. Dropping it kills the process and
/// removes the directory (kept when `STARLING_KEEP_TEST_DATA` is set or the test is failing,
/// in which case the log's path and tail are printed).
#[derive(Debug)]
pub struct TestServer {
    binary: PathBuf,
    cert: &'static TestCert,
    config_path: PathBuf,
    log_path: PathBuf,
    data_dir: PathBuf,
    domains: Vec<String>,
    env: Vec<(String, String)>,
    ready_timeout: Duration,
    child: Option<Child>,
    listeners: Option<Listeners>,
    starts: u32,
    keep_data: bool,
}

impl TestServer {
    /// A builder with the defaults: domain `example.test`, open registration, TLS required.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder::default()
    }

    /// Starts a server with the defaults.
    pub fn start() -> Result<TestServer, HarnessError> {
        TestServer::builder().start()
    }

    fn listeners(&self) -> &Listeners {
        // Set by every successful start; a TestServer exists only after one.
        match &self.listeners {
            Some(l) => l,
            None => unreachable!("a TestServer is returned only once it is ready"),
        }
    }

    /// All addresses the server reported.
    pub fn all_listeners(&self) -> &Listeners {
        self.listeners()
    }

    /// The first STARTTLS listener.
    pub fn starttls_addr(&self) -> SocketAddr {
        self.listeners()
            .c2s_starttls
            .first()
            .copied()
            .unwrap_or(self.listeners().admin)
    }

    /// The first direct TLS listener.
    pub fn direct_tls_addr(&self) -> SocketAddr {
        self.listeners()
            .c2s_direct_tls
            .first()
            .copied()
            .unwrap_or(self.listeners().admin)
    }

    /// The admin HTTP listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.listeners().admin
    }

    /// The first served domain.
    pub fn domain(&self) -> &str {
        self.domains
            .first()
            .map(String::as_str)
            .unwrap_or("localhost")
    }

    /// Every served domain.
    pub fn domains(&self) -> &[String] {
        &self.domains
    }

    /// The certificate chain the server presents (trustable as a CA file: it contains the CA).
    pub fn cert_pem_path(&self) -> PathBuf {
        self.cert.cert_pem_path()
    }

    /// The test CA alone: the one file a client needs to trust.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.cert.ca_pem_path()
    }

    /// The shared test certificate.
    pub fn cert(&self) -> &'static TestCert {
        self.cert
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The captured standard output and error of every start.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (running or paused).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_)) | Err(_)) | None => false,
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    timeout,
                    reason: format!("the log never contained {needle:?}"),
                    log: self.log_path.clone(),
                    tail: self.log_tail(TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `GET path` on the admin listener.
    pub fn http_get(&self, path: &str) -> Result<HttpResponse, HarnessError> {
        http_get(self.admin_addr(), path, Duration::from_secs(5))
    }

    /// The current Prometheus scrape.
    pub fn fetch_metrics(&self) -> Result<Metrics, HarnessError> {
        let response = self.http_get("/metrics")?;
        if response.status != 200 {
            return Err(HarnessError::Http(format!(
                "/metrics answered {}: {}",
                response.status,
                response.text()
            )));
        }
        Metrics::parse(&response.text()).map_err(HarnessError::Http)
    }

    /// One metric from a fresh scrape: see [`Metrics::metric`].
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>, HarnessError> {
        Ok(self.fetch_metrics()?.metric(name, labels))
    }

    /// SIGKILL, then reap the process.
    pub fn kill(&mut self) -> Result<ExitStatus, HarnessError> {
        process::kill(&mut self.child)
    }

    /// SIGTERM, then wait for a graceful exit (killing it after 15 s, which is an error).
    pub fn terminate(&mut self) -> Result<ExitStatus, HarnessError> {
        process::terminate(&mut self.child, TERMINATE_TIMEOUT, &self.log_path)
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, HarnessError> {
        let child = self.child.as_mut().ok_or(HarnessError::NotRunning)?;
        match wait_timeout(child, timeout)? {
            Some(status) => {
                self.child = None;
                Ok(status)
            }
            None => Err(HarnessError::NotReady {
                timeout,
                reason: "the server did not exit".into(),
                log: self.log_path.clone(),
                tail: self.log_tail(TAIL_LINES),
            }),
        }
    }

    /// SIGSTOP, and wait until the kernel reports the process stopped.
    pub fn pause(&mut self) -> Result<(), HarnessError> {
        process::pause(self.child.as_ref(), &self.log_path)
    }

    /// SIGCONT, and wait until the process runs again.
    pub fn resume(&mut self) -> Result<(), HarnessError> {
        process::resume(self.child.as_ref(), &self.log_path)
    }

    /// Stops the server (gracefully if it is running) and starts it again on the same data
    /// directory and configuration; the listeners get new ports.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        if self.is_running() {
            self.terminate()?;
        } else if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        self.spawn_and_wait()
    }

    fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let listeners_path = self.data_dir.join("run").join("listeners.json");
        match std::fs::remove_file(&listeners_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(HarnessError::io(
                    format!("removing the stale {}", listeners_path.display()),
                    e,
                ));
            }
        }
        self.listeners = None;
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log_path.display()), e))?;
        let banner = format!("===== testkit: start #{} =====\n", self.starts);
        log.write_all(banner.as_bytes())
            .map_err(|e| HarnessError::io("writing the log banner", e))?;
        let stderr = log
            .try_clone()
            .map_err(|e| HarnessError::io("duplicating the log file", e))?;

        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--c2s-listen", "127.0.0.1:0"])
            .args(["--c2s-tls-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STARLING_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = command
            .spawn()
            .map_err(|e| HarnessError::io(format!("starting {}", self.binary.display()), e))?;
        self.child = Some(child);
        self.wait_ready(&listeners_path)
    }

    fn wait_ready(&mut self, listeners_path: &Path) -> Result<(), HarnessError> {
        let timeout = self.ready_timeout;
        let deadline = Instant::now() + timeout;
        let mut missing = String::from("run/listeners.json was never written");
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(self.not_ready(timeout, format!("the process exited: {status}")));
            }
            if self.listeners.is_none() {
                match std::fs::read(listeners_path) {
                    Ok(bytes) => match serde_json::from_slice::<Listeners>(&bytes) {
                        Ok(listeners) => {
                            if let Err(bad) = listeners.check() {
                                return Err(self.not_ready(timeout, bad));
                            }
                            self.listeners = Some(listeners);
                            missing = "/readyz never answered 200".into();
                        }
                        // Possibly caught half-written: poll again.
                        Err(e) => missing = format!("run/listeners.json does not parse: {e}"),
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => missing = format!("run/listeners.json unreadable: {e}"),
                }
            }
            if let Some(listeners) = &self.listeners {
                match http_get(listeners.admin, "/readyz", Duration::from_secs(2)) {
                    Ok(r) if r.status == 200 => return Ok(()),
                    Ok(r) => missing = format!("/readyz answered {}: {}", r.status, r.text()),
                    Err(e) => missing = format!("/readyz: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(timeout, missing));
            }
            std::thread::sleep(POLL);
        }
    }

    fn not_ready(&self, timeout: Duration, reason: String) -> HarnessError {
        process::failed(&self.log_path, timeout, reason)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let keep = self.keep_data || std::env::var_os("STARLING_KEEP_TEST_DATA").is_some();
        if std::thread::panicking() {
            eprintln!(
                "\n===== starling test server log: {} (data kept in {}) =====\n{}\n===== end of log tail =====",
                self.log_path.display(),
                self.data_dir.display(),
                self.log_tail(TAIL_LINES)
            );
        } else if keep {
            eprintln!("starling test data kept in {}", self.data_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// The last `n` lines of a file, reading at most its last 256 KiB.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    const WINDOW: u64 = 256 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(WINDOW)))
        .is_err()
    {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .get(lines.len().saturating_sub(n)..)
        .unwrap_or_default()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::process_state;

    #[test]
    fn listeners_json_parses_and_port_zero_is_refused() {
        let ok: Listeners = serde_json::from_str(
            r#"{"c2s_starttls": ["127.0.0.1:40001", "[::1]:40002"], "c2s_direct_tls": ["127.0.0.1:40003"], "admin": "127.0.0.1:40004", "future_key": 1}"#,
        )
        .unwrap();
        assert!(ok.check().is_ok());
        assert_eq!(ok.c2s_starttls.len(), 2);
        assert_eq!(ok.admin.port(), 40004);
        let zero: Listeners = serde_json::from_str(
            r#"{"c2s_starttls": ["127.0.0.1:0"], "c2s_direct_tls": ["127.0.0.1:1"], "admin": "127.0.0.1:2"}"#,
        )
        .unwrap();
        assert!(zero.check().unwrap_err().contains("port 0"));
        let none: Listeners = serde_json::from_str(
            r#"{"c2s_starttls": [], "c2s_direct_tls": ["127.0.0.1:1"], "admin": "127.0.0.1:2"}"#,
        )
        .unwrap();
        assert!(none.check().is_err());
    }

    #[test]
    fn tail_of_a_log() {
        let dir = paths::unique_dir("unit-log").unwrap();
        let path = dir.join("log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = log_tail(&path, 3);
        assert_eq!(tail, "line 98\nline 99\nline 100");
        assert!(log_tail(&dir.join("absent"), 3).contains("no log"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn own_process_state_is_running_or_sleeping() {
        let state = process_state(std::process::id()).unwrap();
        assert!("RSD".contains(state), "{state}");
    }

    #[test]
    fn builder_domains_replace_then_add() {
        let b = TestServer::builder();
        assert_eq!(b.config().domains(), ["example.test"]);
        let b = b.domain("localhost").domain("a.example.test");
        assert_eq!(b.config().domains(), ["localhost", "a.example.test"]);
    }

    #[test]
    fn pause_resume_and_terminate_a_real_process() {
        // Exercised on `sleep`, so the signals are tested without the server.
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let dir = paths::unique_dir("unit-proc").unwrap();
        let mut server = TestServer {
            binary: PathBuf::from("sleep"),
            cert: shared_cert().unwrap(),
            config_path: dir.join("c"),
            log_path: dir.join("log"),
            data_dir: dir,
            domains: vec!["example.test".into()],
            env: Vec::new(),
            ready_timeout: READY_TIMEOUT,
            child: Some(child),
            listeners: None,
            starts: 1,
            keep_data: false,
        };
        assert!(server.is_running());
        server.pause().unwrap();
        assert!(matches!(
            process_state(server.pid().unwrap()),
            Some('T' | 't')
        ));
        server.resume().unwrap();
        let status = server.terminate().unwrap();
        assert!(!status.success());
        assert!(!server.is_running());
        assert!(matches!(server.kill(), Err(HarnessError::NotRunning)));
    }
}
