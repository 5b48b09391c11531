//! Runs the compiled `starling` binary: `config check`, `user add|passwd|list|del`, and `serve`
//! with its readiness contract (`run/listeners.json`, `/healthz`, `/readyz`, `/metrics`) and
//! graceful exit on SIGTERM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_starling");

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        // Each test uses its own tag, so pid and tag make the name unique.
        let path = std::env::temp_dir().join(format!("starling-bin-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with an environment free of configuration variables, so the test sees only
/// what it sets.
fn starling() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STARLING_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version() {
    let out = run(starling().arg("--version"), "");
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("starling {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_check_good_and_bad_files() {
    let dir = TempDir::new("check");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[server]\ndomains = [\"example.test\"]\n[c2s]\nmax_stanza_size = 10000\n",
    )
    .unwrap();
    let out = run(
        starling()
            .args(["config", "check", "--config"])
            .arg(&good)
            .env("STARLING_C2S__REQUIRE_TLS", "false"),
        "",
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let printed: String = text(&out.stdout);
    let table: toml::Table = toml::from_str(&printed).unwrap();
    assert_eq!(table["server"]["domains"][0].as_str(), Some("example.test"));
    assert_eq!(table["c2s"]["max_stanza_size"].as_integer(), Some(10000));
    assert_eq!(table["c2s"]["require_tls"].as_bool(), Some(false));
    assert_eq!(table["registration"]["mode"].as_str(), Some("loopback"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\ndomains = []\n[c2s]\nmax_stanza_size = 0\nlisten = [\"x\"]\n",
    )
    .unwrap();
    let out = run(
        starling().args(["config", "check", "--config"]).arg(&bad),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let errors = text(&out.stderr);
    assert!(errors.contains("3 errors"), "{errors}");
    assert!(errors.contains("c2s.listen"), "{errors}");
    assert!(errors.contains("unknown field `listen`"), "{errors}");
    assert!(errors.contains("at least one domain"), "{errors}");
    assert!(
        errors.contains("c2s.max_stanza_size (from ") && errors.contains("must be greater than 0"),
        "{errors}"
    );

    // Flags are checked too.
    let out = run(
        starling().args(["config", "check", "--admin-listen", "nowhere"]),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("admin.listen (from --admin-listen)"));
}

#[test]
fn user_add_list_passwd_del() {
    let dir = TempDir::new("users");
    let data = dir.path().join("data");
    let user = |args: &[&str], stdin: &str| {
        run(
            starling()
                .arg("--data-dir")
                .arg(&data)
                .env("STARLING_SERVER__DOMAINS", "localhost,example.test")
                .arg("user")
                .args(args),
            stdin,
        )
    };

    let out = user(&["add", "alice@localhost", "--password-stdin"], "pw1\n");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "created alice@localhost\n");
    assert!(data.join("starling.redb").exists());

    let out = user(&["add", "bob@localhost", "--password", "pw2"], "");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let out = user(&["add", "bob@localhost", "--password", "pw2"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("already exists"));
    let out = user(&["add", "x@elsewhere.test", "--password", "pw"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not served"));

    let out = user(&["list", "localhost"], "");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "alice@localhost\nbob@localhost\n");

    let out = user(&["passwd", "alice@localhost", "--password-stdin"], "new\n");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));

    let out = user(&["del", "alice@localhost"], "");
    assert!(out.status.success());
    let out = user(&["del", "alice@localhost"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no account alice@localhost"));

    let out = user(&["list", "localhost"], "");
    assert_eq!(text(&out.stdout), "bob@localhost\n");
    let out = user(&["list", "example.test"], "");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "");
}

/// One HTTP/1.0 GET: status and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A running `starling serve`, its standard error collected by a thread (so a chatty log
/// cannot fill the pipe and block it); killed if the test fails before it exits.
struct Server {
    child: Child,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    fn spawn(cmd: &mut Command) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut log = String::new();
            let _ = stderr.read_to_string(&mut log);
            log
        });
        Server {
            child,
            log: Some(log),
        }
    }

    /// The whole log; only once the process has exited.
    fn log(&mut self) -> String {
        self.log
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_for(path: &Path, server: &mut Server) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return serde_json::from_str(&text).unwrap();
        }
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!(
                "starling serve exited early with {status}: {}",
                server.log()
            );
        }
        assert!(Instant::now() < deadline, "no {} in time", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn addr(v: &serde_json::Value) -> SocketAddr {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn serve_reports_ready_and_stops_cleanly_on_sigterm() {
    let dir = TempDir::new("serve");
    let data = dir.path().join("data");
    let mut server = Server::spawn(starling().args(["serve", "--data-dir"]).arg(&data).args([
        "--c2s-listen",
        "127.0.0.1:0",
        "--c2s-tls-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-level",
        "debug",
    ]));
    let listeners_path = data.join("run").join("listeners.json");
    let listeners = wait_for(&listeners_path, &mut server);

    let admin = addr(&listeners["admin"]);
    assert_ne!(admin.port(), 0);
    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz"), (200, "ready\n".into()));
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "starling_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    assert!(metrics.contains("starling_uptime_seconds"), "{metrics}");
    assert!(metrics.contains("starling_ready 1"), "{metrics}");

    // A client stream on the STARTTLS listener gets a stream header and features.
    let starttls = listeners["c2s_starttls"].as_array().unwrap();
    let direct_tls = listeners["c2s_direct_tls"].as_array().unwrap();
    assert_eq!((starttls.len(), direct_tls.len()), (1, 1));
    assert_ne!(addr(&starttls[0]).port(), 0);
    assert_ne!(addr(&direct_tls[0]).port(), 0);
    TcpStream::connect(addr(&direct_tls[0])).unwrap();
    let mut client = TcpStream::connect(addr(&starttls[0])).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client
        .write_all(
            b"<?xml version='1.0'?><stream:stream to='localhost' version='1.0' \
              xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
        )
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !text(&received).contains("</stream:features>") {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed early: {}", text(&received));
        received.extend_from_slice(&buf[..n]);
    }
    let features = text(&received);
    assert!(
        features.contains("urn:ietf:params:xml:ns:xmpp-tls"),
        "{features}"
    );
    assert!(data.join("tls").join("cert.pem").exists());

    let secret = std::fs::read(data.join("secret")).unwrap();
    assert_eq!(secret.len(), 32);
    assert!(data.join("starling.redb").exists());

    // The store is locked while the server runs: user commands say so.
    let out = run(
        starling()
            .arg("--data-dir")
            .arg(&data)
            .args(["user", "list", "localhost"]),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("in use by another process"));

    // A second server on the same data directory stops at the store lock, touching nothing.
    let ports = [
        "--c2s-listen",
        "127.0.0.1:0",
        "--c2s-tls-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let out = run(
        starling()
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(ports),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("in use by another process"));
    assert!(
        listeners_path.exists(),
        "the first server's listeners.json is kept"
    );

    // One whose client port is taken fails to start, and says which address.
    let other = dir.path().join("other");
    let taken = starttls[0].as_str().unwrap();
    let out = run(
        starling().args(["serve", "--data-dir"]).arg(&other).args([
            "--c2s-listen",
            taken,
            "--c2s-tls-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {taken}")), "{err}");
    assert!(!other.join("run").join("listeners.json").exists());

    let pid = server.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    // The open stream is closed with <system-shutdown/> (RFC 6120 §4.9.3.22).
    let mut rest = Vec::new();
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the stream after SIGTERM: {e}; got {}", text(&rest)),
        }
    }
    let rest = text(&rest);
    assert!(rest.contains("<system-shutdown"), "{rest}");
    assert!(rest.contains("</stream:stream>"), "{rest}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = server.log();
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!listeners_path.exists(), "listeners.json removed on exit");
}
