//! Helpers shared by the test files: each file is its own crate and uses a different subset,
//! hence the `dead_code` allowance.
#![allow(dead_code)]

pub(crate) mod tokio_xmpp;

use std::time::Duration;

use starling_testkit::{RawClient, TestServer};

/// The password every test account gets (ASCII, so SASLprep is the identity).
pub(crate) const PASSWORD: &str = "correct horse battery staple";

/// Creates `user` on `server` with in-band registration (XEP-0077) over STARTTLS using the
/// raw client; returns the bare JID.
pub(crate) async fn register(server: &TestServer, user: &str) -> String {
    RawClient::register_account(server.starttls_addr(), server.domain(), user, PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("registering {user}@{}: {e}", server.domain()));
    format!("{user}@{}", server.domain())
}

/// After a misbehaving client was dealt with: a second, well-behaved client still logs in and
/// pings the server, and the process is still alive.
pub(crate) async fn assert_server_still_serves(server: &mut TestServer, user: &str) {
    assert!(server.is_running(), "the server process is gone");
    let (mut client, jid) =
        RawClient::login(server.starttls_addr(), server.domain(), user, PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("a well-behaved client could not log in afterwards: {e}"));
    assert!(jid.starts_with(&format!("{user}@")), "bound {jid}");
    client
        .ping(None)
        .await
        .unwrap_or_else(|e| panic!("a well-behaved client could not ping afterwards: {e}"));
    client.close().await.expect("a clean close");
}

/// Successful authentications with `mechanism` as the server counts them: the sum of the
/// `starling_*` samples labelled `mechanism=<mechanism>` and `outcome=success`, `None` when the
/// server exposes no such labels. The server-side proof of which mechanism a client used.
pub(crate) fn auth_successes(server: &TestServer, mechanism: &str) -> Option<f64> {
    let metrics = server
        .fetch_metrics()
        .unwrap_or_else(|e| panic!("scraping /metrics: {e}"));
    let labelled: Vec<_> = metrics
        .samples()
        .iter()
        .filter(|s| s.name.starts_with("starling_") && s.label("mechanism").is_some())
        .collect();
    if labelled.is_empty() {
        return None;
    }
    Some(
        labelled
            .iter()
            .filter(|s| {
                s.label("mechanism") == Some(mechanism) && s.label("outcome") == Some("success")
            })
            .map(|s| s.value)
            .sum(),
    )
}

/// Asserts that every successful authentication so far used SCRAM-SHA-256 (when the server
/// counts authentications by mechanism; otherwise says so).
pub(crate) fn assert_only_scram_sha_256_succeeded(server: &TestServer, logins: f64) {
    match auth_successes(server, "SCRAM-SHA-256") {
        Some(scram) => {
            assert_eq!(scram, logins, "SCRAM-SHA-256 logins counted by the server");
            for other in [
                "PLAIN",
                "SCRAM-SHA-1",
                "SCRAM-SHA-256-PLUS",
                "SCRAM-SHA-512",
            ] {
                assert_eq!(
                    auth_successes(server, other),
                    Some(0.0),
                    "a login used {other}"
                );
            }
        }
        None => eprintln!("note: the server does not count authentications by mechanism"),
    }
}

/// Test timeouts: long enough for a debug build on a loaded 2-core machine.
pub(crate) const WAIT: Duration = Duration::from_secs(20);
