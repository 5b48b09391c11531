//! System tests for Starling. They start the real `starling` binary on free loopback ports
//! (through `starling-testkit`) and talk to it over sockets with independent clients:
//! tokio-xmpp (Rust, `tests/tests/common/tokio_xmpp.rs`), slixmpp (Python, `tests/python/`,
//! run from here) and the harness's raw client for negative tests. See `tests/tests/`.
//!
//! What this library must never do: skip a test because a tool is missing. A missing Python
//! environment is a failure that says to run `scripts/setup`.
//!
//! Where it sits on the stanza path: outside the server, at the client end of its streams.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use starling_testkit::{TestServer, workspace_root};
use tokio::io::AsyncWriteExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The most stderr kept per script (its tail matters when a check fails).
const STDERR_LIMIT: usize = 256 * 1024;

/// Why a Python interop script could not be run or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum PyError {
    /// `target/venv` does not exist or has no slixmpp.
    #[error(
        "the Python environment for the slixmpp interop tests is missing ({0}); run scripts/setup"
    )]
    MissingVenv(String),
    /// Starting or talking to the process failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The script did not print the expected JSON line in time, or exited first.
    #[error("{script}: {problem}\n--- stderr (tail) ---\n{stderr}")]
    NoAnswer {
        /// The script's name.
        script: String,
        /// What went wrong.
        problem: String,
        /// The tail of its standard error (slixmpp's debug log).
        stderr: String,
    },
}

/// The interpreter of the virtual environment `scripts/setup` creates.
pub fn venv_python() -> Result<PathBuf, PyError> {
    let python = workspace_root()
        .join("target")
        .join("venv")
        .join("bin")
        .join("python");
    if !python.exists() {
        return Err(PyError::MissingVenv(format!(
            "{} not found",
            python.display()
        )));
    }
    Ok(python)
}

/// A script in `tests/python/`.
pub fn python_script(name: &str) -> PathBuf {
    workspace_root().join("tests").join("python").join(name)
}

/// The arguments every script takes: where to connect, who to be, what to trust.
#[derive(Debug, Clone)]
pub struct PyArgs {
    /// `starttls` or `direct`.
    pub mode: &'static str,
    /// The listener address.
    pub addr: std::net::SocketAddr,
    /// The account's bare JID.
    pub jid: String,
    /// Its password.
    pub password: String,
    /// The CA file to trust.
    pub ca: PathBuf,
}

impl PyArgs {
    /// STARTTLS on the server's first STARTTLS listener.
    pub fn starttls(server: &TestServer, jid: &str, password: &str) -> PyArgs {
        PyArgs {
            mode: "starttls",
            addr: server.starttls_addr(),
            jid: jid.to_owned(),
            password: password.to_owned(),
            ca: server.ca_pem_path(),
        }
    }

    /// Direct TLS on the server's first direct TLS listener.
    pub fn direct_tls(server: &TestServer, jid: &str, password: &str) -> PyArgs {
        PyArgs {
            mode: "direct",
            addr: server.direct_tls_addr(),
            ..PyArgs::starttls(server, jid, password)
        }
    }

    fn to_args(&self) -> Vec<String> {
        vec![
            "--host".into(),
            self.addr.ip().to_string(),
            "--port".into(),
            self.addr.port().to_string(),
            "--jid".into(),
            self.jid.clone(),
            "--password".into(),
            self.password.clone(),
            "--ca".into(),
            self.ca.display().to_string(),
            "--mode".into(),
            self.mode.into(),
        ]
    }
}

/// A running interop script: JSON lines from its stdout, stderr collected for diagnostics.
#[derive(Debug)]
pub struct PyProcess {
    script: String,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    drain: Option<tokio::task::JoinHandle<()>>,
    /// The script's stdin, for interactive scripts ([`PyProcess::spawn_interactive`]).
    stdin: Option<ChildStdin>,
    /// Objects read by [`PyProcess::expect_event`] that did not match, oldest first.
    backlog: std::collections::VecDeque<Value>,
}

impl PyProcess {
    /// Starts `tests/python/<script>` with the common arguments and `extra` ones.
    pub fn spawn(script: &str, args: &PyArgs, extra: &[&str]) -> Result<PyProcess, PyError> {
        PyProcess::spawn_with(script, args, extra, false)
    }

    /// Like [`PyProcess::spawn`], with the script's stdin piped for
    /// [`PyProcess::command`]; closing it (dropping the process) ends such scripts.
    pub fn spawn_interactive(
        script: &str,
        args: &PyArgs,
        extra: &[&str],
    ) -> Result<PyProcess, PyError> {
        PyProcess::spawn_with(script, args, extra, true)
    }

    fn spawn_with(
        script: &str,
        args: &PyArgs,
        extra: &[&str],
        interactive: bool,
    ) -> Result<PyProcess, PyError> {
        let python = venv_python()?;
        let path = python_script(script);
        let mut child = Command::new(&python)
            .arg(&path)
            .args(args.to_args())
            .args(extra)
            .current_dir(workspace_root().join("tests").join("python"))
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(if interactive {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| PyError::Io {
                context: format!("starting {} {}", python.display(), path.display()),
                source,
            })?;
        let stdout = child.stdout.take().ok_or_else(|| PyError::Io {
            context: "taking the script's stdout".into(),
            source: std::io::Error::other("not piped"),
        })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut drain = None;
        if let Some(mut pipe) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            // Drains stderr so the script never blocks on a full pipe; ends with the process.
            drain = Some(tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut kept) = sink.lock() {
                        kept.extend_from_slice(buf.get(..n).unwrap_or_default());
                        let excess = kept.len().saturating_sub(STDERR_LIMIT);
                        kept.drain(..excess);
                    }
                }
            }));
        }
        let stdin = child.stdin.take();
        Ok(PyProcess {
            script: script.to_owned(),
            child,
            stdout: BufReader::new(stdout).lines(),
            stderr,
            drain,
            stdin,
            backlog: std::collections::VecDeque::new(),
        })
    }

    /// Writes one JSON command line to an interactive script's stdin.
    pub async fn command(&mut self, command: &Value) -> Result<(), PyError> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(PyError::Io {
                context: format!("commanding {}", self.script),
                source: std::io::Error::other("not spawned interactive"),
            });
        };
        let mut line = command.to_string();
        line.push('\n');
        let written = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        };
        written.await.map_err(|source| PyError::Io {
            context: format!("writing a command to {}", self.script),
            source,
        })
    }

    /// The first JSON object (oldest first, including those set aside by earlier calls)
    /// for which `matches` holds, within `timeout`; the others are kept, in order, for later
    /// calls.
    pub async fn expect_event(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Result<Value, PyError> {
        if let Some(at) = self.backlog.iter().position(&mut matches)
            && let Some(found) = self.backlog.remove(at)
        {
            return Ok(found);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json(left).await {
                Ok(value) if matches(&value) => return Ok(value),
                Ok(value) => self.backlog.push_back(value),
                Err(PyError::NoAnswer {
                    script,
                    problem,
                    stderr,
                }) => {
                    let seen: Vec<String> = self.backlog.iter().map(Value::to_string).collect();
                    return Err(PyError::NoAnswer {
                        script,
                        problem: format!(
                            "waiting for {what}: {problem}; other lines: {}",
                            seen.join("\n")
                        ),
                        stderr,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The objects read but not yet matched by [`PyProcess::expect_event`], oldest first.
    pub fn backlog(&self) -> impl Iterator<Item = &Value> {
        self.backlog.iter()
    }

    /// The tail of what the script wrote on stderr so far.
    pub fn stderr_tail(&self) -> String {
        self.stderr
            .lock()
            .map(|kept| String::from_utf8_lossy(&kept).into_owned())
            .unwrap_or_default()
    }

    fn no_answer(&self, problem: String) -> PyError {
        PyError::NoAnswer {
            script: self.script.clone(),
            problem,
            stderr: self.stderr_tail(),
        }
    }

    /// The next JSON object the script prints, within `timeout`. Non-JSON lines are skipped.
    pub async fn next_json(&mut self, timeout: Duration) -> Result<Value, PyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.stdout.next_line()).await;
            match line {
                Err(_) => {
                    return Err(self.no_answer(format!("no JSON line within {timeout:?}")));
                }
                Ok(Err(source)) => {
                    return Err(PyError::Io {
                        context: format!("reading {}'s stdout", self.script),
                        source,
                    });
                }
                Ok(Ok(None)) => {
                    let status = self.child.wait().await.ok();
                    self.drained().await;
                    return Err(self.no_answer(format!(
                        "exited ({status:?}) without the expected JSON line"
                    )));
                }
                Ok(Ok(Some(line))) => {
                    if let Ok(value @ Value::Object(_)) = serde_json::from_str::<Value>(&line) {
                        return Ok(value);
                    }
                }
            }
        }
    }

    /// The next JSON object that has key `key`, skipping others.
    pub async fn expect_json_with(
        &mut self,
        key: &str,
        timeout: Duration,
    ) -> Result<Value, PyError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let value = self.next_json(left).await?;
            if value.get(key).is_some() {
                return Ok(value);
            }
        }
    }

    /// Waits until stderr is read to its end (the process has closed it), at most 5 s.
    async fn drained(&mut self) {
        if let Some(drain) = self.drain.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        }
    }

    /// Waits for the process to exit (killing it after `timeout`); returns all of stderr that
    /// was kept.
    pub async fn finish(mut self, timeout: Duration) -> Result<String, PyError> {
        // An interactive script reads commands until its stdin closes.
        drop(self.stdin.take());
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(_)) => {
                self.drained().await;
                Ok(self.stderr_tail())
            }
            Ok(Err(source)) => Err(PyError::Io {
                context: format!("waiting for {}", self.script),
                source,
            }),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(self.no_answer(format!("still running after {timeout:?}; killed")))
            }
        }
    }
}

/// Runs a script to completion and returns its result: the last JSON object with an `ok` key.
pub async fn run_python(
    script: &str,
    args: &PyArgs,
    extra: &[&str],
    timeout: Duration,
) -> Result<PyResult, PyError> {
    let mut process = PyProcess::spawn(script, args, extra)?;
    let value = process.expect_json_with("ok", timeout).await?;
    let stderr = process.finish(Duration::from_secs(10)).await?;
    Ok(PyResult { value, stderr })
}

/// A script's verdict and its log.
#[derive(Debug, Clone)]
pub struct PyResult {
    /// The JSON result object.
    pub value: Value,
    /// The tail of stderr (slixmpp's debug log with every stanza).
    pub stderr: String,
}

impl PyResult {
    /// Whether the script reported `"ok": true`.
    pub fn ok(&self) -> bool {
        self.value.get("ok").and_then(Value::as_bool) == Some(true)
    }

    /// A JSON pointer lookup (`/tls/version`).
    pub fn get(&self, pointer: &str) -> Option<&Value> {
        self.value.pointer(pointer)
    }

    /// A string at a JSON pointer.
    pub fn str(&self, pointer: &str) -> Option<&str> {
        self.get(pointer).and_then(Value::as_str)
    }

    /// The result and the script's log, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "result: {}\n--- slixmpp log (tail) ---\n{}",
            serde_json::to_string_pretty(&self.value).unwrap_or_default(),
            tail_lines(&self.stderr, 80)
        )
    }
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .get(lines.len().saturating_sub(n)..)
        .unwrap_or_default()
        .join("\n")
}

/// A unique account name for a test (servers are per test, but names still tell tests apart
/// in logs).
pub fn unique_user(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_paths_are_in_the_tests_package() {
        assert!(python_script("common.py").is_file());
        assert!(python_script("session_check.py").is_file());
        assert!(python_script("chat_peer.py").is_file());
    }

    #[test]
    fn results_read_by_pointer() {
        let r = PyResult {
            value: serde_json::json!({"ok": true, "tls": {"version": "TLSv1.3"}}),
            stderr: "a\nb\nc".into(),
        };
        assert!(r.ok());
        assert_eq!(r.str("/tls/version"), Some("TLSv1.3"));
        assert!(r.describe().contains("TLSv1.3"));
        assert_eq!(tail_lines("a\nb\nc", 2), "b\nc");
    }

    fn selftest_args() -> PyArgs {
        PyArgs {
            mode: "direct",
            addr: "127.0.0.1:5223".parse().unwrap(),
            jid: "a@example.test".into(),
            password: "p".into(),
            ca: PathBuf::from("/dev/null"),
        }
    }

    /// Needs `scripts/setup`: without the venv this fails with a message saying so.
    #[tokio::test]
    async fn the_runner_reads_json_results_and_reports_silent_exits() {
        let args = selftest_args();
        let result = run_python("selftest.py", &args, &[], Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(result.ok(), "{}", result.describe());
        assert_eq!(result.str("/jid"), Some("a@example.test"));
        assert_eq!(result.str("/mode"), Some("direct"));
        assert_eq!(result.get("/port").and_then(Value::as_u64), Some(5223));
        assert!(result.stderr.contains("bye"));

        let silent = run_python("selftest.py", &args, &["--silent"], Duration::from_secs(30)).await;
        match silent {
            Err(PyError::NoAnswer {
                problem, stderr, ..
            }) => {
                assert!(problem.contains("exited"), "{problem}");
                assert!(stderr.contains("bye"), "{stderr}");
            }
            other => panic!("a silent script gave {other:?}"),
        }
    }
}
