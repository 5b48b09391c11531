//! The system-test harness for Starling (CONVENTIONS #12).
//!
//! What it does: [`TestServer`] starts the real `starling serve` binary on free loopback ports
//! with a fresh data directory and a generated configuration, waits for the readiness contract
//! (`<data_dir>/run/listeners.json` written and `/readyz` answering 200), exposes the bound
//! addresses, and kills, terminates, pauses, resumes and restarts the process. Every server
//! presents one shared test certificate ([`TestCert`]) so clients trust a single file.
//! [`Metrics`] parses the Prometheus text of `/metrics`. [`RawClient`] speaks XMPP byte by byte
//! over TCP and tokio-rustls (STARTTLS, direct TLS, SCRAM-SHA-256, PLAIN, in-band
//! registration), for the negative tests where a real client library cannot misbehave on
//! purpose. [`RegistryCluster`] starts N `starling registry` processes on distinct loopback
//! addresses, bootstrapped as one cluster, for the fault tests (kill -9, SIGSTOP/SIGCONT,
//! restarts with and without data); [`history`] records operations and checks that every
//! acknowledged write survived and reads were linearizable.
//!
//! What it must never do: talk to anything but loopback addresses; sleep as a means of
//! synchronisation (every wait polls an observable condition against a deadline); leave a
//! server process running after its [`TestServer`] is dropped; share state between servers
//! other than the read-only test certificate.
//!
//! Where it sits on the stanza path: outside it. It plays the client end of RFC 6120 streams
//! and the operator end of the admin HTTP endpoint; nothing in the server depends on it.

mod binary;
mod cert;
mod client;
mod config;
mod error;
pub mod history;
mod http;
mod metrics;
mod paths;
mod process;
mod registry;
mod server;

pub use binary::{starling_binary, workspace_root};
pub use cert::{CERT_NAMES, TestCert, shared_cert};
pub use client::scram::ScramClient;
pub use client::{
    AuthOutcome, ClientError, Features, IqOutcome, RawClient, SendReport, StreamErrorReport,
    StreamEvent, StreamHeader, ns, to_xml,
};
pub use config::{Registration, ServerConfig};
pub use error::HarnessError;
pub use http::{HttpResponse, http_get};
pub use metrics::{Metrics, Sample};
pub use registry::{RegistryCluster, RegistryClusterBuilder, RegistryProcess};
pub use server::{Listeners, TestServer, TestServerBuilder};
