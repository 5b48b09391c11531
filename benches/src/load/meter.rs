//! Resource use over a scenario's measured phase: RSS and CPU seconds of the watched server
//! processes (`--watch-pid`), the generator's own CPU seconds, and the load average at both
//! ends, all read from `/proc` (see [`crate::procfs`]).
//!
//! The generator shares the machine with the server it drives, so its own CPU use is part of
//! every report: a run where the generator used as much CPU as it could get measured the
//! generator, not the server.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::procfs::{Proc, ProcStart, ProcWindow, loadavg};

/// What was measured over one phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Measured {
    /// Wall seconds between the two samples.
    pub secs: f64,
    /// The watched processes, in the order given.
    pub processes: Vec<ProcWindow>,
    /// The generator itself.
    pub generator: ProcWindow,
    /// 1-, 5- and 15-minute load averages at the start.
    pub loadavg_start: [f64; 3],
    /// And at the end.
    pub loadavg_end: [f64; 3],
}

/// The start samples of a phase.
#[derive(Debug)]
pub struct Meter {
    at: Instant,
    processes: Vec<ProcStart>,
    generator: ProcStart,
    loadavg: [f64; 3],
}

impl Meter {
    /// Samples the processes `pids`, the generator and the load average now.
    pub fn start(pids: &[u32]) -> Self {
        Meter {
            at: Instant::now(),
            processes: pids
                .iter()
                .map(|&p| ProcStart::sample(Proc::Pid(p)))
                .collect(),
            generator: ProcStart::sample(Proc::OwnProcess),
            loadavg: loadavg().unwrap_or_default(),
        }
    }

    /// Samples again: the phase's [`Measured`].
    pub fn finish(&self) -> Measured {
        Measured {
            secs: self.at.elapsed().as_secs_f64(),
            processes: self.processes.iter().map(ProcStart::finish).collect(),
            generator: self.generator.finish(),
            loadavg_start: self.loadavg,
            loadavg_end: loadavg().unwrap_or_default(),
        }
    }
}
