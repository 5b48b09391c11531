//! Interoperability with two independent client libraries (issue 3, "Show"): tokio-xmpp 6
//! (Rust) and slixmpp (Python). In-band registration (XEP-0077), SCRAM-SHA-256 login over
//! STARTTLS (RFC 6120 §5, §6) and direct TLS (XEP-0368), messages both ways between the two
//! libraries (RFC 6121 §5), ping (XEP-0199), disco#info (XEP-0030), software version
//! (XEP-0092). Each test starts its own server.

mod common;

use std::time::Duration;

use common::tokio_xmpp::{MECHANISM, Transport, TxClient, is_chat_from};
use common::{PASSWORD, WAIT, assert_only_scram_sha_256_succeeded, register};
use starling_system_tests::{PyArgs, PyProcess, PyResult, run_python, unique_user};
use starling_testkit::TestServer;
use tokio_xmpp::jid::{BareJid, Jid};

/// What the server must list in disco#info because the scenario uses it (CONVENTIONS #4: disco
/// advertises exactly what is there).
const REQUIRED_FEATURES: &[&str] = &[
    "http://jabber.org/protocol/disco#info",
    "urn:xmpp:ping",
    "jabber:iq:version",
];

fn start_server() -> TestServer {
    TestServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// Checks a slixmpp session_check.py result: logged in with SCRAM-SHA-256 over TLS, and the
/// server answered ping, disco#info and version.
fn assert_slixmpp_session(result: &PyResult, jid: &str) {
    let why = result.describe();
    assert!(result.ok(), "slixmpp session failed\n{why}");
    assert_eq!(result.str("/mechanism"), Some(MECHANISM), "{why}");
    assert_eq!(
        result.get("/tls/encrypted").and_then(|v| v.as_bool()),
        Some(true),
        "{why}"
    );
    let bound = result.str("/bound_jid").unwrap_or_default();
    assert!(
        bound.starts_with(&format!("{jid}/")),
        "bound {bound}\n{why}"
    );
    assert_eq!(
        result.get("/ping/ok").and_then(|v| v.as_bool()),
        Some(true),
        "{why}"
    );
    let features: Vec<&str> = result
        .get("/disco/features")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
        .unwrap_or_default();
    for feature in REQUIRED_FEATURES {
        assert!(
            features.contains(feature),
            "disco#info lacks {feature}\n{why}"
        );
    }
    let identities = result.get("/disco/identities").and_then(|v| v.as_array());
    assert!(
        identities.is_some_and(|ids| ids
            .iter()
            .any(|i| i.get(0).and_then(|c| c.as_str()) == Some("server")
                && i.get(1).and_then(|t| t.as_str()) == Some("im"))),
        "disco#info lacks the server/im identity\n{why}"
    );
    assert!(
        !result.str("/version/name").unwrap_or_default().is_empty(),
        "no software name\n{why}"
    );
    assert!(
        !result
            .str("/version/version")
            .unwrap_or_default()
            .is_empty(),
        "no software version\n{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_registers_in_band_then_logs_in_over_starttls() {
    let server = start_server();
    let jid = format!("{}@{}", unique_user("sli"), server.domain());
    let args = PyArgs::starttls(&server, &jid, PASSWORD);
    let result = run_python("session_check.py", &args, &["--register"], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let why = result.describe();
    assert_eq!(
        result
            .get("/register_feature_offered")
            .and_then(|v| v.as_bool()),
        Some(true),
        "the server did not advertise in-band registration (XEP-0077 §4)\n{why}"
    );
    assert_eq!(
        result.get("/registered").and_then(|v| v.as_bool()),
        Some(true),
        "{why}"
    );
    assert_slixmpp_session(&result, &jid);
    assert_only_scram_sha_256_succeeded(&server, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_logs_in_over_direct_tls() {
    let server = start_server();
    let jid = register(&server, &unique_user("slid")).await;
    let args = PyArgs::direct_tls(&server, &jid, PASSWORD);
    let result = run_python("session_check.py", &args, &[], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_slixmpp_session(&result, &jid);
    assert_only_scram_sha_256_succeeded(&server, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slixmpp_wrong_password_fails_to_log_in() {
    let server = start_server();
    let jid = register(&server, &unique_user("sliw")).await;
    let args = PyArgs::starttls(&server, &jid, "not the password");
    let result = run_python("session_check.py", &args, &[], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let why = result.describe();
    assert!(!result.ok(), "logged in with a wrong password\n{why}");
    let failures = result
        .get("/failures")
        .map(|f| f.to_string())
        .unwrap_or_default();
    assert!(failures.contains("not-authorized"), "{why}");
}

async fn tokio_xmpp_session(transport: Transport) {
    let server = start_server();
    let user = unique_user("tx");
    let jid: BareJid = register(&server, &user).await.parse().unwrap();
    let addr = match transport {
        Transport::StartTls => server.starttls_addr(),
        Transport::DirectTls => server.direct_tls_addr(),
    };
    let mut client = TxClient::connect(addr, transport, server.cert(), &jid, PASSWORD)
        .await
        .unwrap_or_else(|e| panic!("tokio-xmpp login over {transport:?}: {e}"));
    assert_eq!(client.jid().to_bare(), jid);
    // tokio-xmpp reports no mechanism: the server's count is the evidence it used SCRAM-SHA-256.
    assert_only_scram_sha_256_succeeded(&server, 1.0);

    client
        .ping_server()
        .await
        .expect("XEP-0199 ping of the server");

    let info = client
        .disco_info_server()
        .await
        .expect("XEP-0030 disco#info");
    for feature in REQUIRED_FEATURES {
        assert!(
            info.features.contains(*feature),
            "disco#info lacks {feature}: {info:?}"
        );
    }
    assert!(
        info.identities
            .iter()
            .any(|i| i.category == "server" && i.type_ == "im"),
        "no server/im identity: {info:?}"
    );

    let version = client.version_server().await.expect("XEP-0092 version");
    assert!(
        !version.name.is_empty() && !version.version.is_empty(),
        "{version:?}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_logs_in_over_starttls_and_queries_the_server() {
    tokio_xmpp_session(Transport::StartTls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_logs_in_over_direct_tls_and_queries_the_server() {
    tokio_xmpp_session(Transport::DirectTls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_wrong_password_fails_to_log_in() {
    let server = start_server();
    let jid: BareJid = register(&server, &unique_user("txw"))
        .await
        .parse()
        .unwrap();
    let err = TxClient::connect(
        server.starttls_addr(),
        Transport::StartTls,
        server.cert(),
        &jid,
        "not the password",
    )
    .await
    .expect_err("logged in with a wrong password");
    assert!(
        err.contains("NotAuthorized") || err.contains("not-authorized"),
        "{err}"
    );
}

/// tokio-xmpp (STARTTLS) and slixmpp (direct TLS) send each other a chat message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_xmpp_and_slixmpp_exchange_messages_both_ways() {
    let server = start_server();
    let alice: BareJid = register(&server, &unique_user("alice"))
        .await
        .parse()
        .unwrap();
    let bob = register(&server, &unique_user("bob")).await;
    let bob_bare: BareJid = bob.parse().unwrap();

    let mut tx = TxClient::connect(
        server.starttls_addr(),
        Transport::StartTls,
        server.cert(),
        &alice,
        PASSWORD,
    )
    .await
    .unwrap_or_else(|e| panic!("tokio-xmpp login: {e}"));
    tx.send_presence().await;

    const FROM_SLIXMPP: &str = "hello from slixmpp";
    const FROM_TOKIO_XMPP: &str = "hello from tokio-xmpp ✓ <&>";
    let args = PyArgs::direct_tls(&server, &bob, PASSWORD);
    let alice_full = tx.jid().to_string();
    let mut py = PyProcess::spawn(
        "chat_peer.py",
        &args,
        &[
            "--peer",
            &alice_full,
            "--send-body",
            FROM_SLIXMPP,
            "--expect-body",
            FROM_TOKIO_XMPP,
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let online = py
        .expect_json_with("event", WAIT)
        .await
        .unwrap_or_else(|e| panic!("slixmpp did not come online: {e}"));
    let bob_full: Jid = online
        .get("jid")
        .and_then(|j| j.as_str())
        .and_then(|j| j.parse().ok())
        .unwrap_or_else(|| panic!("no full JID in {online}"));
    assert_eq!(bob_full.to_bare(), bob_bare);

    // slixmpp → tokio-xmpp
    let message = tx
        .expect_message(WAIT)
        .await
        .unwrap_or_else(|e| panic!("tokio-xmpp got no message: {e}\n{}", py.stderr_tail()));
    assert!(
        is_chat_from(&message, &bob_bare, FROM_SLIXMPP),
        "unexpected message {message:?}"
    );
    assert_eq!(
        message.from.as_ref(),
        Some(&bob_full),
        "the sender's full JID is stamped"
    );

    // tokio-xmpp → slixmpp
    tx.send_chat(bob_full, FROM_TOKIO_XMPP).await;
    let result = py
        .expect_json_with("ok", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = py
        .finish(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let result = PyResult {
        value: result,
        stderr,
    };
    let why = result.describe();
    assert!(result.ok(), "slixmpp did not get the message\n{why}");
    assert_eq!(result.str("/received/body"), Some(FROM_TOKIO_XMPP), "{why}");
    assert_eq!(
        result.str("/received/from"),
        Some(alice_full.as_str()),
        "{why}"
    );
    assert_eq!(result.str("/received/type"), Some("chat"), "{why}");
    assert_eq!(result.str("/mechanism"), Some(MECHANISM), "{why}");
    assert_only_scram_sha_256_succeeded(&server, 2.0);
    tx.close().await;
}
