//! Scratch directories under `$TMPDIR/starling-testkit/`: unique per server, named after the
//! test process so leftovers can be traced back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::HarnessError;

/// The parent of every directory the harness creates.
pub(crate) fn scratch_root() -> PathBuf {
    std::env::temp_dir().join("starling-testkit")
}

/// Creates a new, empty directory `<root>/<prefix>-<pid>-<n>-<nanos>` that no other server of
/// this or any other process uses.
pub(crate) fn unique_dir(prefix: &str) -> Result<PathBuf, HarnessError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let root = scratch_root();
    std::fs::create_dir_all(&root)
        .map_err(|e| HarnessError::io(format!("creating {}", root.display()), e))?;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = root.join(format!("{prefix}-{}-{n}-{nanos:08x}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(HarnessError::io(format!("creating {}", dir.display()), e)),
        }
    }
}

/// Removes `<root>/<prefix>-<pid>-...` directories whose process is gone (Linux: no
/// `/proc/<pid>`). Used for the per-process certificate directories, which no `Drop` removes.
pub(crate) fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(scratch_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            // Best effort: another process may be removing it at the same moment.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_dirs_differ_and_exist() {
        let a = unique_dir("unit").unwrap();
        let b = unique_dir("unit").unwrap();
        assert_ne!(a, b);
        assert!(a.is_dir() && b.is_dir());
        let name = a.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with(&format!("unit-{}-", std::process::id())));
        std::fs::remove_dir_all(a).unwrap();
        std::fs::remove_dir_all(b).unwrap();
    }

    #[test]
    fn stale_dirs_of_dead_processes_are_removed() {
        // PIDs are below 2^22 on Linux, so this one cannot exist.
        let root = scratch_root();
        std::fs::create_dir_all(&root).unwrap();
        let dead = root.join("stale-unit-4294967290-0-0");
        let mine = root.join(format!("stale-unit-{}-0-0", std::process::id()));
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::create_dir_all(&mine).unwrap();
        remove_stale("stale-unit");
        assert!(!dead.exists());
        assert!(mine.exists());
        std::fs::remove_dir_all(mine).unwrap();
    }
}
