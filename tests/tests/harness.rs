//! The harness against the real binary: readiness contract, admin endpoint, process control
//! (kill, SIGTERM, pause/resume, restart), persistence across restarts, direct TLS with ALPN.

mod common;

use std::time::Duration;

use common::{PASSWORD, WAIT, register};
use starling_system_tests::unique_user;
use starling_testkit::{RawClient, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_starts_with_its_listeners_and_admin_endpoint() {
    let server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let listeners = server.all_listeners();
    assert!(listeners.c2s_starttls.iter().all(|a| a.ip().is_loopback()));
    let mut ports = vec![
        server.starttls_addr().port(),
        server.direct_tls_addr().port(),
        server.admin_addr().port(),
    ];
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3, "{listeners:?}");

    for path in ["/healthz", "/readyz"] {
        let r = server.http_get(path).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let metrics = server.fetch_metrics().unwrap();
    assert!(
        metrics.names().iter().any(|n| n.starts_with("starling_")),
        "no starling_ metric in {:?}",
        metrics.names()
    );

    // Direct TLS (XEP-0368): the server picks `xmpp-client` when offered.
    let mut client = RawClient::connect_direct_tls(server.direct_tls_addr(), server.domain())
        .await
        .unwrap();
    assert_eq!(client.alpn_protocol().as_deref(), Some(&b"xmpp-client"[..]));
    let features = client.open_stream().await.unwrap();
    assert!(
        !features.has_starttls(),
        "STARTTLS offered inside TLS: {:?}",
        features.0
    );
    assert!(features.mechanisms().iter().any(|m| m == "SCRAM-SHA-256"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_is_required_before_authentication_by_default() {
    let server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let mut client = RawClient::connect(server.starttls_addr(), server.domain())
        .await
        .unwrap();
    let features = client.open_stream().await.unwrap();
    assert!(features.starttls_required(), "{:?}", features.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_survive_a_restart_on_new_ports() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("persist");
    register(&server, &user).await;
    let old = server.starttls_addr();
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    assert!(server.is_running());
    let (mut client, jid) =
        RawClient::login(server.starttls_addr(), server.domain(), &user, PASSWORD)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "login after restart (old {old}, new {}): {e}",
                    server.starttls_addr()
                )
            });
    assert!(jid.starts_with(&format!("{user}@")));
    client.ping(None).await.unwrap();
}

/// SIGTERM closes every stream with `<system-shutdown/>` (RFC 6120 §4.9.3.22) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_with_system_shutdown() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("bye");
    register(&server, &user).await;
    let (mut client, _) =
        RawClient::login(server.starttls_addr(), server.domain(), &user, PASSWORD)
            .await
            .unwrap();
    let stopping = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (server, status)
    });
    let error = client.expect_stream_error().await.unwrap();
    assert_eq!(error.condition, "system-shutdown", "{error:?}");
    let (server, status) = stopping.await.unwrap();
    let status = status.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.success(),
        "exit status {status} after SIGTERM\n{}",
        server.log_tail(30)
    );
}

/// A paused server answers nothing; resumed, it answers what was waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_answers_once_resumed() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    server.pause().unwrap();
    // The kernel completes the TCP handshake from the listen backlog; the process is frozen.
    let mut client = RawClient::connect(server.starttls_addr(), server.domain())
        .await
        .unwrap();
    client.set_timeout(Duration::from_millis(500));
    let silent = client.open_stream().await;
    assert!(silent.is_err(), "a stopped process answered: {silent:?}");
    server.resume().unwrap();
    client.set_timeout(WAIT);
    // The header was sent before the pause ended: the features arrive now.
    let header = client.expect_header().await.unwrap();
    assert!(header.attr("id").is_some(), "{header:?}");
    let features = client.expect_element("features").await.unwrap();
    assert!(features.is("features", starling_testkit::ns::STREAM));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_refuses_connections_and_restarts() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let addr = server.starttls_addr();
    let status = server.kill().unwrap();
    assert!(!status.success());
    assert!(!server.is_running());
    assert!(RawClient::connect(addr, server.domain()).await.is_err());
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    let mut client = RawClient::connect(server.starttls_addr(), server.domain())
        .await
        .unwrap();
    client.open_stream().await.unwrap();
}
