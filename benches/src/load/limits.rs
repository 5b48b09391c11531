//! The process's open-file limit (POSIX `setrlimit(RLIMIT_NOFILE)`): one file descriptor per
//! simulated session, so the generator raises its soft limit to the hard limit at start.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft limit before and after raising it to the hard limit, and the error if raising
/// failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NofileOutcome {
    /// The soft limit found at start (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now (`None`: unlimited).
    pub after: Option<u64>,
    /// Why raising failed, if it did.
    pub error: Option<String>,
}

impl NofileOutcome {
    /// The usable limit as a number (`u64::MAX` when unlimited).
    pub fn limit(&self) -> u64 {
        self.after.unwrap_or(u64::MAX)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> NofileOutcome {
    let before = getrlimit(Resource::Nofile);
    let wanted = Rlimit {
        current: before.maximum,
        maximum: before.maximum,
    };
    let error = if before.current == before.maximum {
        None
    } else {
        setrlimit(Resource::Nofile, wanted)
            .err()
            .map(|e| e.to_string())
    };
    NofileOutcome {
        before: before.current,
        after: getrlimit(Resource::Nofile).current,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_to_the_hard_limit() {
        let out = raise_nofile();
        assert_eq!(out.error, None);
        assert_eq!(out.after, getrlimit(Resource::Nofile).maximum);
        assert!(out.limit() >= out.before.unwrap_or(0));
    }
}
