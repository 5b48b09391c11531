//! Negative tests with the harness's raw client, which can misbehave on purpose: bad
//! credentials, PLAIN without TLS, malformed XML, a DTD, an unknown host, an oversized stanza,
//! a flood. Each checks the exact error the RFC prescribes, that a second well-behaved client
//! still logs in and pings afterwards (the server stays up for everyone else), and that the
//! server's metric for the outcome moved where it exposes one.

mod common;

use std::time::Duration;

use common::{PASSWORD, WAIT, assert_server_still_serves, register};
use starling_system_tests::unique_user;
use starling_testkit::{AuthOutcome, Metrics, RawClient, StreamEvent, TestServer};

/// The sum of every `starling_*` series with some label equal to `value` (e.g. a condition
/// name), or `None` when the server exposes no such series.
fn labelled(metrics: &Metrics, value: &str) -> Option<f64> {
    let samples: Vec<_> = metrics.with_label_value("starling_", value).collect();
    if samples.is_empty() {
        None
    } else {
        Some(samples.iter().map(|s| s.value).sum())
    }
}

/// Scrapes before the misbehaviour.
fn before(server: &TestServer) -> Metrics {
    server
        .fetch_metrics()
        .unwrap_or_else(|e| panic!("scraping /metrics: {e}"))
}

/// Asserts the metric labelled `value` grew, if the server exposes one (and says so if not).
fn assert_metric_grew(server: &TestServer, earlier: &Metrics, value: &str) {
    let later = server
        .fetch_metrics()
        .unwrap_or_else(|e| panic!("scraping /metrics: {e}"));
    match labelled(&later, value) {
        Some(after) => {
            let before = labelled(earlier, value).unwrap_or(0.0);
            assert!(
                after > before,
                "metrics labelled {value:?} did not grow ({before} → {after}): {:?}",
                later
                    .with_label_value("starling_", value)
                    .collect::<Vec<_>>()
            );
        }
        None => eprintln!(
            "note: the server exposes no starling_* series labelled {value:?}; metric names: {:?}",
            later.names()
        ),
    }
}

async fn logged_in(server: &TestServer, user: &str) -> (RawClient, String) {
    RawClient::login(server.starttls_addr(), server.domain(), user, PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("login as {user}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_not_authorized() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("victim");
    register(&server, &user).await;
    let metrics = before(&server);

    for mechanism in ["SCRAM-SHA-256", "PLAIN"] {
        let mut client = RawClient::connect(server.starttls_addr(), server.domain())
            .await
            .unwrap();
        client.open_stream().await.unwrap();
        let features = client.starttls().await.unwrap();
        assert!(
            features.mechanisms().iter().any(|m| m == mechanism),
            "{mechanism} not offered over TLS: {:?}",
            features.mechanisms()
        );
        let outcome = match mechanism {
            "PLAIN" => client.auth_plain(&user, "wrong password").await,
            _ => client.auth_scram_sha256(&user, "wrong password").await,
        }
        .unwrap();
        match outcome {
            AuthOutcome::Failure { condition, .. } => assert_eq!(
                condition, "not-authorized",
                "{mechanism} with a wrong password (RFC 6120 §6.5.10)"
            ),
            AuthOutcome::Success => panic!("{mechanism} accepted a wrong password"),
        }
    }
    assert_metric_grew(&server, &metrics, "not-authorized");
    assert_server_still_serves(&mut server, &user).await;
}

/// RFC 6120 §6.4.1/§13.9.4: PLAIN must not be offered or accepted on a stream without TLS.
/// §6.5.4 gives `<encryption-required/>` for a mechanism that needs a protected stream
/// (§6.5.5 `<invalid-mechanism/>` for one not offered is accepted too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_is_refused_on_a_plaintext_stream() {
    let mut server = TestServer::builder()
        .require_tls(false)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("plain");
    register(&server, &user).await;
    let metrics = before(&server);

    let mut client = RawClient::connect(server.starttls_addr(), server.domain())
        .await
        .unwrap();
    let features = client.open_stream().await.unwrap();
    assert!(!client.is_tls());
    assert!(
        !features.mechanisms().iter().any(|m| m == "PLAIN"),
        "PLAIN offered on a plaintext stream: {:?}",
        features.0
    );
    client
        .send_auth("PLAIN", Some(format!("\0{user}\0{PASSWORD}").as_bytes()))
        .await
        .unwrap();
    let outcome = client.read_auth_outcome().await.unwrap();
    match &outcome {
        AuthOutcome::Failure { condition, .. }
            if condition == "encryption-required" || condition == "invalid-mechanism" => {}
        other => panic!("PLAIN without TLS answered {other:?}"),
    }
    if let AuthOutcome::Failure { condition, .. } = &outcome {
        assert_metric_grew(&server, &metrics, condition);
    }
    assert_server_still_serves(&mut server, &user).await;
}

/// RFC 6120 §4.9.3.13: XML that is not well-formed ends the stream with `<not-well-formed/>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_xml_is_not_well_formed() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("sloppy");
    register(&server, &user).await;
    let metrics = before(&server);

    let (mut client, _) = logged_in(&server, &user).await;
    client
        .send(&format!(
            "<message to='{user}@{}'><body>mismatched</bodyy></message>",
            server.domain()
        ))
        .await
        .unwrap();
    let error = client.expect_stream_error().await.unwrap();
    assert_eq!(error.condition, "not-well-formed", "{error:?}");
    assert!(
        error.closed_with_tag,
        "no </stream:stream> after the error: {error:?}"
    );
    assert_metric_grew(&server, &metrics, "not-well-formed");
    assert_server_still_serves(&mut server, &user).await;
}

/// RFC 6120 §11.1 and §4.9.3.18: a DTD is restricted XML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dtd_is_restricted_xml() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("dtd");
    register(&server, &user).await;
    let metrics = before(&server);

    let (mut client, _) = logged_in(&server, &user).await;
    client
        .send("<!DOCTYPE message [<!ENTITY boom 'boom'>]><message><body>&boom;</body></message>")
        .await
        .unwrap();
    let error = client.expect_stream_error().await.unwrap();
    assert_eq!(error.condition, "restricted-xml", "{error:?}");
    assert_metric_grew(&server, &metrics, "restricted-xml");
    assert_server_still_serves(&mut server, &user).await;
}

/// RFC 6120 §4.9.3.6 and §4.9.1.2: a header for a domain not served gets the server's own
/// header, then `<host-unknown/>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_is_host_unknown() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("lost");
    register(&server, &user).await;
    let metrics = before(&server);

    let mut client = RawClient::connect(server.starttls_addr(), server.domain())
        .await
        .unwrap();
    client.send_header(Some("unknown.invalid")).await.unwrap();
    let first = client.next_event().await.unwrap();
    assert!(
        matches!(first, StreamEvent::Header(_)),
        "the server must open its stream before the error (RFC 6120 §4.9.1.2), got {first:?}"
    );
    let error = client.expect_stream_error().await.unwrap();
    assert_eq!(error.condition, "host-unknown", "{error:?}");
    assert!(error.closed_with_tag, "{error:?}");
    assert_metric_grew(&server, &metrics, "host-unknown");
    assert_server_still_serves(&mut server, &user).await;
}

/// RFC 6120 §4.9.3.12 and §13.12: a stanza over the configured limit is a policy violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_stanza_is_a_policy_violation() {
    const LIMIT: u32 = 16 * 1024;
    let mut server = TestServer::builder()
        .max_stanza_size(LIMIT)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("big");
    register(&server, &user).await;
    let metrics = before(&server);

    let (mut client, jid) = logged_in(&server, &user).await;
    // A stanza just under the limit is fine...
    let fits = "x".repeat(LIMIT as usize / 2);
    client
        .send(&format!(
            "<message to='{jid}' id='fits'><body>{fits}</body></message>"
        ))
        .await
        .unwrap();
    let echoed = client.expect_element("the message to self").await.unwrap();
    assert_eq!(echoed.attr("id"), Some("fits"), "{echoed:?}");
    // ...four times the limit is not.
    let body = "x".repeat(LIMIT as usize * 4);
    let stanza = format!("<message to='{jid}'><body>{body}</body></message>").into_bytes();
    let report = client
        .send_while_reading([stanza], Duration::from_secs(10))
        .await
        .unwrap();
    let error = report
        .stream_error()
        .unwrap_or_else(|| panic!("no stream error after an oversized stanza: {report:?}"));
    assert_eq!(error.condition, "policy-violation", "{error:?}");
    assert_metric_grew(&server, &metrics, "policy-violation");
    assert_server_still_serves(&mut server, &user).await;
}

/// A client exceeding the configured byte rate is cut off with `<policy-violation/>`
/// (RFC 6120 §4.9.3.12 names rate limits as an example).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_over_the_rate_limit_is_a_policy_violation() {
    let mut server = TestServer::builder()
        .rate_limit(4096, 16 * 1024)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("flood");
    register(&server, &user).await;
    let metrics = before(&server);

    let (mut client, jid) = logged_in(&server, &user).await;
    let body = "f".repeat(1000);
    // 1 MiB at full speed: 250 seconds' worth at 4 KiB/s.
    let stanzas = (0..1000).map(|i| {
        format!("<message to='{jid}' id='f{i}'><body>{body}</body></message>").into_bytes()
    });
    let report = client.send_while_reading(stanzas, WAIT).await.unwrap();
    let error = report.stream_error().unwrap_or_else(|| {
        panic!(
            "no stream error after {} bytes over 4 KiB/s (write error: {:?}; {} events)",
            report.bytes_written,
            report.write_error,
            report.events.len()
        )
    });
    assert_eq!(error.condition, "policy-violation", "{error:?}");
    assert_metric_grew(&server, &metrics, "policy-violation");
    assert_server_still_serves(&mut server, &user).await;
}

/// In-band registration cannot create an account that exists (XEP-0077 §3.1: `<conflict/>`),
/// and the first registration still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_taken_name_is_a_conflict() {
    let mut server = TestServer::start().unwrap_or_else(|e| panic!("{e}"));
    let user = unique_user("taken");
    register(&server, &user).await;

    let mut client = RawClient::connect(server.starttls_addr(), server.domain())
        .await
        .unwrap();
    client.open_stream().await.unwrap();
    let features = client.starttls().await.unwrap();
    assert!(
        features.has_register(),
        "XEP-0077 §4 stream feature: {:?}",
        features.0
    );
    match client.register(&user, "another password").await.unwrap() {
        starling_testkit::IqOutcome::Error { condition, .. } => {
            assert_eq!(condition, "conflict");
        }
        starling_testkit::IqOutcome::Result(r) => panic!("registered {user} twice: {r:?}"),
    }
    let _ = tokio::time::timeout(WAIT, client.close()).await;
    assert_server_still_serves(&mut server, &user).await;
}
