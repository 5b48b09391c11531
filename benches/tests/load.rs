//! `starling-load` against a real `starling serve` started by the test (through
//! `starling-testkit`): registration, `connect`, `chat` (with the server's process watched),
//! `login-storm` paced and closed-loop, and `presence`. Assertions are on counts and errors,
//! never on timings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use starling_testkit::TestServer;

struct Load<'a> {
    server: &'a TestServer,
    dir: PathBuf,
}

impl Load<'_> {
    /// Runs the generator with the common flags plus `args`; the JSON report if `json`.
    fn run(&self, tls_direct: bool, args: &[&str]) -> Output {
        let addr = if tls_direct {
            self.server.direct_tls_addr()
        } else {
            self.server.starttls_addr()
        };
        let ca = self.server.ca_pem_path();
        Command::new(env!("CARGO_BIN_EXE_starling-load"))
            .arg("--server")
            .arg(addr.to_string())
            .arg("--domain")
            .arg(self.server.domain())
            .arg("--tls")
            .arg(if tls_direct { "direct" } else { "starttls" })
            .arg("--ca")
            .arg(&ca)
            // The server allows 5 registrations per minute per address: spread them.
            .args([
                "--source",
                "127.0.0.2-127.0.0.21",
                "--quiet",
                "--timeout",
                "20",
            ])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running starling-load: {e}"))
    }

    fn report(&self, name: &str, tls_direct: bool, args: &[&str]) -> Value {
        let json = self.dir.join(format!("{name}.json"));
        let mut all = vec!["--json", json.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.run(tls_direct, &all);
        assert!(
            out.status.success(),
            "{name} failed: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.server.log_tail(40)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("latency (ms)"), "no table: {stdout}");
        read_json(&json)
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn assert_no_errors(v: &Value) {
    assert_eq!(
        v["errors"].as_object().map(|m| m.len()),
        Some(0),
        "errors: {}",
        v["errors"]
    );
}

#[test]
fn scenarios_against_starling() {
    let server = TestServer::start().unwrap();
    let dir = std::env::temp_dir().join(format!("starling-load-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = Load {
        server: &server,
        dir: dir.clone(),
    };

    // 20 accounts through XEP-0077, then idle sessions: every login succeeds and every
    // session is still up when the hold ends.
    let connect = load.report(
        "connect",
        false,
        &[
            "--register",
            "connect",
            "--sessions",
            "20",
            "--rate",
            "200",
            "--hold",
            "1",
        ],
    );
    assert_eq!(connect["scenario"], "connect");
    assert_eq!(u(&connect, "target"), 20);
    assert_eq!(u(&connect, "logins_ok"), 20);
    assert_eq!(u(&connect, "logins_failed"), 0);
    assert_eq!(u(&connect, "sessions_held"), 20);
    assert_eq!(connect["login_latency"]["count"].as_u64(), Some(20));
    assert_no_errors(&connect);

    // Registering again finds the accounts: conflict is not an error.
    let again = load.run(false, &["--register", "register", "--users", "20"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("(20 existed)"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // 10 pairs at 200 messages/s for 2 s: every message sent arrives, each one measured;
    // the server's RSS and CPU time are read over the phase.
    let pid = server.pid().expect("the server runs").to_string();
    let chat = load.report(
        "chat",
        false,
        &[
            "--watch-pid",
            &pid,
            "chat",
            "--pairs",
            "10",
            "--msg-rate",
            "200",
            "--duration",
            "2",
        ],
    );
    assert_eq!(u(&chat, "logins_ok"), 20);
    let sent = u(&chat, "sent");
    assert!(sent >= 200, "sent only {sent}");
    assert_eq!(u(&chat, "received"), sent);
    assert_eq!(chat["e2e_latency"]["count"].as_u64(), Some(sent));
    assert_no_errors(&chat);
    let measured = &chat["measured"];
    assert_eq!(
        measured["processes"][0]["pid"].to_string(),
        pid,
        "{measured}"
    );
    assert_eq!(measured["processes"][0]["name"], "starling", "{measured}");
    assert!(
        u(&measured["processes"][0], "rss_end_kib") > 0,
        "{measured}"
    );
    assert!(u(&measured["generator"], "rss_end_kib") > 0, "{measured}");

    // Login storm over direct TLS for 3 s: every login started completes.
    let storm = load.report(
        "storm",
        true,
        &[
            "login-storm",
            "--users",
            "20",
            "--rate",
            "20",
            "--duration",
            "3",
        ],
    );
    let started = u(&storm, "target");
    assert!(started >= 30, "started only {started}");
    assert_eq!(u(&storm, "logins_ok"), started);
    assert_eq!(u(&storm, "logins_failed"), 0);
    assert_no_errors(&storm);

    // A closed-loop storm (rate 0: a new login whenever one of the 2 slots frees up).
    let closed = load.report(
        "closed",
        false,
        &[
            "login-storm",
            "--users",
            "20",
            "--rate",
            "0",
            "--max-inflight",
            "2",
            "--duration",
            "1",
        ],
    );
    assert!(u(&closed, "target") >= 2, "{closed}");
    assert_eq!(u(&closed, "logins_ok"), u(&closed, "target"));
    assert_no_errors(&closed);

    // A wrong password is counted as an auth error, not hidden.
    let bad = load.report(
        "bad",
        false,
        &[
            "--password",
            "wrong",
            "connect",
            "--sessions",
            "2",
            "--hold",
            "0",
        ],
    );
    assert_eq!(u(&bad, "logins_ok"), 0);
    assert_eq!(u(&bad, "logins_failed"), 2);
    assert_eq!(bad["errors"]["auth:not-authorized"].as_u64(), Some(2));

    // presence: 4 users, each subscribed to by 2 others, change presence for a second;
    // every change reaches every subscriber.
    let presence = load.report(
        "presence",
        false,
        &[
            "presence",
            "--users",
            "4",
            "--contacts",
            "2",
            "--duration",
            "1",
        ],
    );
    assert_no_errors(&presence);
    let sent = u(&presence, "sent");
    assert!(sent > 0, "no presence change sent: {presence}");
    assert_eq!(u(&presence, "received"), sent * 2, "{presence}");

    let _ = std::fs::remove_dir_all(&dir);
}
