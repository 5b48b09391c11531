//! Process control shared by the harnesses: signals, waiting for an exit or for the kernel to
//! report a process stopped or running again, each against a deadline, each failure naming
//! the process's log and its tail.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::HarnessError;
use crate::server::log_tail;

/// The interval at which process states are polled.
const POLL: Duration = Duration::from_millis(20);
/// Lines of the log carried by an error.
const TAIL_LINES: usize = 50;

/// A readiness or process-state failure naming `log` and carrying its tail.
pub(crate) fn failed(log: &Path, timeout: Duration, reason: String) -> HarnessError {
    HarnessError::NotReady {
        timeout,
        reason,
        log: log.to_path_buf(),
        tail: log_tail(log, TAIL_LINES),
    }
}

/// SIGKILL, then reap; the slot is emptied.
pub(crate) fn kill(slot: &mut Option<Child>) -> Result<ExitStatus, HarnessError> {
    let mut child = slot.take().ok_or(HarnessError::NotRunning)?;
    // Killing a process that already exited fails harmlessly; wait reports its status.
    let _ = child.kill();
    child
        .wait()
        .map_err(|e| HarnessError::io("waiting for the killed process", e))
}

/// SIGTERM (after a SIGCONT, since a paused process would never handle it), then wait for
/// the exit; after `timeout`, SIGKILL and an error.
pub(crate) fn terminate(
    slot: &mut Option<Child>,
    timeout: Duration,
    log: &Path,
) -> Result<ExitStatus, HarnessError> {
    let mut child = slot.take().ok_or(HarnessError::NotRunning)?;
    let _ = signal(&child, Signal::CONT);
    signal(&child, Signal::TERM)?;
    match wait_timeout(&mut child, timeout)? {
        Some(status) => Ok(status),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(failed(
                log,
                timeout,
                "the process did not exit after SIGTERM; killed it".into(),
            ))
        }
    }
}

/// SIGSTOP, and wait until the kernel reports the process stopped.
pub(crate) fn pause(child: Option<&Child>, log: &Path) -> Result<(), HarnessError> {
    let child = child.ok_or(HarnessError::NotRunning)?;
    signal(child, Signal::STOP)?;
    wait_state(child.id(), |s| s == 'T' || s == 't', "stopped", log)
}

/// SIGCONT, and wait until the process runs again.
pub(crate) fn resume(child: Option<&Child>, log: &Path) -> Result<(), HarnessError> {
    let child = child.ok_or(HarnessError::NotRunning)?;
    signal(child, Signal::CONT)?;
    wait_state(child.id(), |s| s != 'T' && s != 't', "running", log)
}

fn wait_state(
    pid: u32,
    wanted: impl Fn(char) -> bool,
    what: &str,
    log: &Path,
) -> Result<(), HarnessError> {
    let timeout = Duration::from_secs(5);
    let deadline = Instant::now() + timeout;
    loop {
        match process_state(pid) {
            Some(state) if wanted(state) => return Ok(()),
            None => return Err(HarnessError::NotRunning),
            Some(_) if Instant::now() >= deadline => {
                return Err(failed(
                    log,
                    timeout,
                    format!("the process did not become {what}"),
                ));
            }
            Some(_) => std::thread::sleep(POLL),
        }
    }
}

pub(crate) fn signal(child: &Child, sig: Signal) -> Result<(), HarnessError> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(HarnessError::NotRunning)?;
    kill_process(pid, sig).map_err(|e| HarnessError::io(format!("sending {sig:?}"), e.into()))
}

pub(crate) fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>, HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| HarnessError::io("waiting for the server", e))?
        {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// The state letter of `/proc/<pid>/stat` (R, S, D, T, t, Z...).
pub(crate) fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is parenthesised and may contain spaces; the state follows it.
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}
