//! What the benchmarks read about processes from Linux's `/proc` (proc(5)): resident memory
//! (`VmRSS` of `/proc/PID/status`), CPU time (`utime + stime` of `/proc/PID/stat`, all
//! threads), the command name, and the machine's load average (`/proc/loadavg`).
//!
//! Readers return `None` when the process is gone or the file does not parse; a benchmark
//! reports the gap rather than a made-up number.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A process to read: a pid, or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    /// Another process.
    Pid(u32),
    /// The calling process (`/proc/self`).
    OwnProcess,
}

impl Proc {
    fn path(self, file: &str) -> PathBuf {
        match self {
            Proc::Pid(pid) => PathBuf::from(format!("/proc/{pid}/{file}")),
            Proc::OwnProcess => PathBuf::from(format!("/proc/self/{file}")),
        }
    }

    /// Resident set size in KiB.
    pub fn rss_kib(self) -> Option<u64> {
        parse_status_kib(&std::fs::read_to_string(self.path("status")).ok()?, "VmRSS")
    }

    /// User plus system CPU time so far, all threads.
    pub fn cpu(self) -> Option<Duration> {
        let ticks = parse_stat_ticks(&std::fs::read_to_string(self.path("stat")).ok()?)?;
        let hz = rustix::param::clock_ticks_per_second();
        (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
    }

    /// The command name (`comm`).
    pub fn name(self) -> Option<String> {
        let comm = std::fs::read_to_string(self.path("comm")).ok()?;
        Some(comm.trim_end().to_owned())
    }

    /// The command line, arguments joined by spaces.
    pub fn cmdline(self) -> Option<String> {
        let raw = std::fs::read(self.path("cmdline")).ok()?;
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some(args.join(" "))
    }
}

/// The value in KiB of a `Key:   1234 kB` line of `/proc/PID/status`.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `utime + stime` in clock ticks from `/proc/PID/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let after = stat.get(stat.rfind(')')? + 1..)?;
    // Field 3 (state) is the first after the name; utime and stime are fields 14 and 15.
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The 1-, 5- and 15-minute load averages.
pub fn loadavg() -> Option<[f64; 3]> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// Parses the first three fields of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Every pid whose command line contains `needle` (other than the caller).
pub fn pids_with_cmdline(needle: &str) -> Vec<u32> {
    let own = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|&pid| Proc::Pid(pid).cmdline().is_some_and(|c| c.contains(needle)))
        .collect();
    out.sort_unstable();
    out
}

/// One process at the start and the end of a measured phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcWindow {
    /// The pid.
    pub pid: u32,
    /// Its command name.
    pub name: String,
    /// RSS at the start, KiB (0: unreadable).
    pub rss_start_kib: u64,
    /// RSS at the end, KiB (0: unreadable).
    pub rss_end_kib: u64,
    /// CPU seconds (user + system) spent between start and end.
    pub cpu_secs: f64,
}

/// A sample taken at the start of a phase, closed by [`ProcStart::finish`].
#[derive(Debug, Clone, Copy)]
pub struct ProcStart {
    proc: Proc,
    rss_kib: Option<u64>,
    cpu: Option<Duration>,
}

impl ProcStart {
    /// Samples `proc` now.
    pub fn sample(proc: Proc) -> Self {
        ProcStart {
            proc,
            rss_kib: proc.rss_kib(),
            cpu: proc.cpu(),
        }
    }

    /// Samples again and returns the window.
    pub fn finish(&self) -> ProcWindow {
        let cpu_end = self.proc.cpu();
        let cpu_secs = match (self.cpu, cpu_end) {
            (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
            _ => 0.0,
        };
        ProcWindow {
            pid: match self.proc {
                Proc::Pid(p) => p,
                Proc::OwnProcess => std::process::id(),
            },
            name: self.proc.name().unwrap_or_default(),
            rss_start_kib: self.rss_kib.unwrap_or(0),
            rss_end_kib: self.proc.rss_kib().unwrap_or(0),
            cpu_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_stat_and_loadavg() {
        let status = "Name:\tbeam.smp\nVmPeak:\t  9000 kB\nVmRSS:\t   51234 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(51234));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        // A command name with a space and a parenthesis, as comm may hold.
        let stat = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 \
                    12345 1000000 300 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(
            parse_loadavg("0.52 1.10 0.95 2/301 4242\n"),
            Some([0.52, 1.10, 0.95])
        );
        assert_eq!(parse_loadavg("x"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = Proc::OwnProcess;
        assert!(me.rss_kib().is_some_and(|k| k > 0));
        assert!(me.cpu().is_some());
        let start = ProcStart::sample(Proc::Pid(std::process::id()));
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let w = start.finish();
        assert_eq!(w.pid, std::process::id());
        assert!(w.rss_end_kib > 0);
        assert!(w.cpu_secs >= 0.0);
        assert!(loadavg().is_some());
        assert!(Proc::Pid(u32::MAX).rss_kib().is_none());
    }
}
