//! Finding the `starling` binary under test.
//!
//! `STARLING_BIN` names it explicitly. Otherwise the harness runs `cargo build -p starling`
//! once per test process (a no-op costing well under a second when nothing changed) and uses
//! the executable cargo reports; this also builds it when `target/debug/starling` is missing,
//! and never runs a stale binary after the server's sources changed (`cargo test -p
//! starling-system-tests` alone would not rebuild another package's binary). A process-wide
//! `OnceLock` keeps parallel tests of one process to one build, and an exclusive lock on
//! `target/.starling-testkit-build.lock` serialises builds of concurrent test processes.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::HarnessError;

/// The workspace root: two levels above this crate's manifest (`crates/testkit`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// The `starling` executable to test, built on first use unless `STARLING_BIN` is set.
pub fn starling_binary() -> Result<PathBuf, HarnessError> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(locate)
        .clone()
        .map_err(HarnessError::Binary)
}

fn locate() -> Result<PathBuf, String> {
    if let Some(explicit) = std::env::var_os("STARLING_BIN") {
        let path = PathBuf::from(explicit);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("STARLING_BIN={} is not a file", path.display()))
        };
    }
    let root = workspace_root();
    let target = target_dir(&root);
    std::fs::create_dir_all(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
    let lock_path = target.join(".starling-testkit-build.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
    let built = cargo_build(&root);
    // Dropping the file releases the lock; an explicit unlock reports nothing useful.
    drop(lock);
    built
}

/// `CARGO_TARGET_DIR` (relative to the workspace root when relative), else `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn cargo_build(root: &Path) -> Result<PathBuf, String> {
    // Cargo sets `CARGO` for the processes it runs (tests included); fall back to the PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "starling",
            "--bin",
            "starling",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("running {} build -p starling: {e}", cargo.to_string_lossy()))?;
    let mut executable = None;
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.map_err(|e| format!("reading cargo's output: {e}"))?;
            if let Some(path) = executable_from_message(&line) {
                executable = Some(path);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for cargo build: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build -p starling` failed ({status}); its diagnostics are above"
        ));
    }
    executable.ok_or_else(|| "cargo build -p starling reported no `starling` executable".into())
}

/// The `executable` of a `compiler-artifact` message for the `starling` binary target.
fn executable_from_message(line: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let target = message.get("target")?;
    let is_bin = target
        .get("kind")?
        .as_array()?
        .iter()
        .any(|k| k.as_str() == Some("bin"));
    if !is_bin || target.get("name")?.as_str()? != "starling" {
        return None;
    }
    message.get("executable")?.as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let root = workspace_root();
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }

    #[test]
    fn artifact_messages_name_the_executable() {
        let bin = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"starling"},"executable":"/t/debug/starling"}"#;
        assert_eq!(
            executable_from_message(bin),
            Some(PathBuf::from("/t/debug/starling"))
        );
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"starling"},"executable":null}"#;
        assert_eq!(executable_from_message(lib), None);
        let other = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"other"},"executable":"/x"}"#;
        assert_eq!(executable_from_message(other), None);
        assert_eq!(
            executable_from_message(r#"{"reason":"build-finished"}"#),
            None
        );
        assert_eq!(executable_from_message("not json"), None);
    }
}
