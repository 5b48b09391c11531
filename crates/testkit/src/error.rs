//! The harness's error type: every failure says what was being done and, for a server that did
//! not come up, carries the tail of its log.

use std::path::PathBuf;
use std::time::Duration;

/// Why the harness could not do what a test asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The `starling` binary could not be found or built.
    #[error("starling binary: {0}")]
    Binary(String),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// The test certificate could not be generated or written.
    #[error("test certificate: {0}")]
    Cert(String),
    /// The configuration could not be built (bad extra TOML, unknown test domain...).
    #[error("test configuration: {0}")]
    Config(String),
    /// The server did not become ready in time, or exited while starting.
    #[error(
        "starling did not become ready (waited at most {timeout:?}): {reason}\nlog: {log}\n--- last lines of the log ---\n{tail}"
    )]
    NotReady {
        /// How long the harness waited.
        timeout: Duration,
        /// What was still missing (or how the process exited).
        reason: String,
        /// The captured log file.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// An admin HTTP request failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// A process-control operation was asked of a server that is not running.
    #[error("server is not running")]
    NotRunning,
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }
}
