//! Table-style tests of the negotiation machine: client XML in, bytes and actions out, no
//! sockets. A small harness answers the machine's requests (credentials, registration,
//! bind) from memory.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use starling_sasl::{ChannelBindingType, derive_credentials};

use super::*;
use crate::limits::WindowCounter;
use crate::settings::{RegistrationMode, Settings};
use crate::tests::scram::{ScramClient, element_text};

const ITERATIONS: u32 = 64;
const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>";
const LOOPBACK: &str = "127.0.0.1";
const REMOTE: &str = "192.0.2.10";

fn config(change: impl FnOnce(&mut Settings)) -> Arc<StreamConfig> {
    let mut s = Settings::default();
    s.auth.scram_iterations = ITERATIONS;
    change(&mut s);
    Arc::new(StreamConfig {
        domains: vec![Arc::from("example.org"), Arc::from("other.example")],
        require_tls: s.require_tls,
        auth: s.auth.clone(),
        registration: s.registration.clone(),
        sasl: SaslServer::new(vec![7u8; 32]).with_fake_iterations(ITERATIONS),
        limits: Limits {
            max_element_size: s.max_stanza_size,
            ..Limits::default()
        },
        auth_failures_ip: WindowCounter::new(Duration::from_secs(60), 1000),
        auth_failures_account: WindowCounter::new(Duration::from_secs(60), 1000),
        registrations_ip: WindowCounter::new(Duration::from_secs(60), 1000),
    })
}

fn exporter() -> ChannelBindingInfo {
    ChannelBindingInfo::none().with(ChannelBindingType::TlsExporter, vec![42u8; 32])
}

fn credentials(password: &str) -> Vec<ScramCredentials> {
    HashAlgo::ALL
        .into_iter()
        .map(|h| derive_credentials(h, password, b"saltsaltsalt", ITERATIONS).unwrap())
        .collect()
}

type Accounts = HashMap<BareUser, Vec<ScramCredentials>>;

/// One client connection driven synchronously.
struct Client {
    m: Machine,
    framer: Framer,
    out: Vec<u8>,
    now: Instant,
    accounts: Accounts,
    /// Channel binding the "handshake" after STARTTLS yields.
    starttls_binding: ChannelBindingInfo,
    next_bind: Option<BindOutcome>,
    tls_started: bool,
    routed: Vec<ToRouter>,
    binds: Vec<FullJid>,
    closed: Option<EndReason>,
}

impl Client {
    fn new(cfg: &Arc<StreamConfig>, peer: &str, direct_tls: Option<ChannelBindingInfo>) -> Self {
        let m = Machine::new(cfg.clone(), peer.parse().unwrap(), direct_tls);
        let framer = m.framer();
        let mut accounts = Accounts::new();
        accounts.insert(BareUser::new("example.org", "juliet"), credentials("r0m30"));
        Client {
            m,
            framer,
            out: Vec::new(),
            now: Instant::now(),
            accounts,
            starttls_binding: exporter(),
            next_bind: None,
            tls_started: false,
            routed: Vec::new(),
            binds: Vec::new(),
            closed: None,
        }
    }

    /// A client on an established TLS connection with tls-exporter binding.
    fn tls(cfg: &Arc<StreamConfig>, peer: &str) -> Self {
        Self::new(cfg, peer, Some(exporter()))
    }

    /// Feeds client XML; returns what the server wrote.
    fn send(&mut self, xml: &str) -> String {
        self.framer.feed(xml.as_bytes());
        loop {
            if self.closed.is_some() {
                break;
            }
            let action = match self.framer.next_frame() {
                Ok(Some(frame)) => self.m.on_frame(frame, self.now, &mut self.out),
                Ok(None) => break,
                Err(e) => self.m.on_frame_error(&e, &mut self.out),
            };
            self.perform(action);
        }
        String::from_utf8(std::mem::take(&mut self.out)).unwrap()
    }

    fn perform(&mut self, mut action: Action) {
        loop {
            action = match action {
                Action::Continue => return,
                Action::StartTls => {
                    self.tls_started = true;
                    self.framer = self.m.framer();
                    self.m.tls_established(self.starttls_binding.clone());
                    return;
                }
                Action::Restart => {
                    self.framer.reset();
                    return;
                }
                Action::LookupCredentials { user, hash } => {
                    let found = self
                        .accounts
                        .get(&user)
                        .and_then(|c| c.iter().find(|c| c.hash == hash).cloned());
                    self.m.on_credentials(Ok(found), self.now, &mut self.out)
                }
                Action::VerifyPlain { need, credentials } => {
                    let step = need.with_credentials(credentials);
                    self.m.on_sasl_step(step, self.now, &mut self.out)
                }
                Action::Register { user, password } => {
                    let outcome = match self.accounts.entry(user) {
                        std::collections::hash_map::Entry::Occupied(_) => RegisterOutcome::Conflict,
                        std::collections::hash_map::Entry::Vacant(slot) => {
                            slot.insert(credentials(&password));
                            RegisterOutcome::Created
                        }
                    };
                    self.m.on_registered(outcome, &mut self.out)
                }
                Action::Bind { jid } => {
                    self.binds.push(jid);
                    let outcome = self.next_bind.take().unwrap_or(BindOutcome::Bound);
                    self.m.on_bind(outcome, &mut self.out)
                }
                Action::Route(msg) => {
                    self.routed.push(msg);
                    return;
                }
                Action::Close(reason) => {
                    self.closed = Some(reason);
                    return;
                }
            }
        }
    }

    fn plain(&mut self, user: &str, password: &str) -> String {
        let payload = STANDARD.encode(format!("\0{user}\0{password}"));
        self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{payload}</auth>"
        ))
    }

    /// Opens the stream, logs in with PLAIN, restarts, and binds `resource`.
    fn bound(cfg: &Arc<StreamConfig>, resource: &str) -> Self {
        let mut c = Client::tls(cfg, LOOPBACK);
        c.send(HEADER);
        assert!(c.plain("juliet", "r0m30").contains("<success"));
        c.send(HEADER);
        let out = c.send(&format!(
            "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>{resource}</resource></bind></iq>"
        ));
        assert!(out.contains("<jid>juliet@example.org/"), "{out}");
        c
    }
}

fn stream_error(out: &str, condition: &str) -> bool {
    out.contains(&format!(
        "<stream:error><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
    )) && out.ends_with("</stream:stream>")
}

fn sasl_failure(out: &str, condition: &str) -> bool {
    out.contains(&format!(
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{condition}/>"
    ))
}

fn stanza_error(out: &str, condition: &str) -> bool {
    out.contains(&format!(
        "<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
    )) && out.contains("type='error'")
}

// ---------------------------------------------------------------------------------------------
// Stream header and features

#[test]
fn header_and_features_before_tls_require_starttls() {
    let cfg = config(|_| {});
    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(HEADER);
    assert!(out.starts_with("<?xml version='1.0'?><stream:stream xmlns='jabber:client'"));
    assert!(out.contains(" from='example.org'"));
    assert!(out.contains(" version='1.0'"));
    assert!(out.contains(&format!(" id='{}'", c.m.stream_id())));
    assert!(out.ends_with(
        "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>\
         </starttls></stream:features>"
    ));
    assert!(!out.contains("mechanisms"));
    assert!(!c.m.is_authenticated());
    assert!(c.m.is_stream_open());
}

#[test]
fn starttls_then_features_after_tls() {
    let cfg = config(|_| {});
    let mut c = Client::new(&cfg, LOOPBACK, None);
    let first_id = {
        c.send(HEADER);
        c.m.stream_id().clone()
    };
    let out = c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
    assert_eq!(out, "<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
    assert!(c.tls_started);
    assert!(
        !c.m.is_stream_open(),
        "no whitespace may be written before the new header"
    );
    let out = c.send(HEADER);
    assert_ne!(
        c.m.stream_id(),
        &first_id,
        "a restarted stream gets a new id"
    );
    let mechanisms = element_text(&out, "mechanisms").unwrap();
    assert_eq!(
        mechanisms,
        "<mechanism>SCRAM-SHA-512-PLUS</mechanism><mechanism>SCRAM-SHA-256-PLUS</mechanism>\
         <mechanism>SCRAM-SHA-1-PLUS</mechanism><mechanism>SCRAM-SHA-512</mechanism>\
         <mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism>\
         <mechanism>PLAIN</mechanism>"
    );
    assert!(out.contains(
        "<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'>\
         <channel-binding type='tls-exporter'/></sasl-channel-binding>"
    ));
    assert!(out.contains("<register xmlns='http://jabber.org/features/iq-register'/>"));
    assert!(!out.contains("starttls"), "STARTTLS is not offered twice");
}

#[test]
fn anything_but_starttls_before_mandatory_tls() {
    let cfg = config(|_| {});
    let mut c = Client::new(&cfg, LOOPBACK, None);
    c.send(HEADER);
    let out = c.plain("juliet", "r0m30");
    assert!(stream_error(&out, "policy-violation"), "{out}");
    assert_eq!(
        c.closed,
        Some(EndReason::StreamError(
            StreamErrorCondition::PolicyViolation
        ))
    );

    let mut c = Client::new(&cfg, LOOPBACK, None);
    c.send(HEADER);
    let out = c.send("<message to='romeo@example.org'><body>hi</body></message>");
    assert!(stream_error(&out, "not-authorized"), "{out}");
}

#[test]
fn optional_tls_offers_no_plain_and_no_plus() {
    let cfg = config(|s| s.require_tls = false);
    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(HEADER);
    assert!(out.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"));
    let mechanisms = element_text(&out, "mechanisms").unwrap();
    assert!(!mechanisms.contains("PLAIN") && !mechanisms.contains("PLUS"));
    assert!(mechanisms.contains("SCRAM-SHA-256"));
    assert!(!out.contains("sasl-channel-binding"));
    let out = c.plain("juliet", "r0m30");
    assert!(sasl_failure(&out, "encryption-required"), "{out}");
    assert!(c.closed.is_none());
    // SCRAM without binding works in the clear.
    let mut scram = ScramClient::new("juliet", "r0m30");
    let out = c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
        scram.first()
    ));
    let challenge = element_text(&out, "challenge").unwrap();
    let out = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        scram.finish(challenge)
    ));
    assert!(
        scram.verify(element_text(&out, "success").unwrap()),
        "{out}"
    );
}

#[test]
fn header_errors() {
    let cfg = config(|_| {});
    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(&HEADER.replace("example.org", "unknown.example"));
    // An error on the initial header still gets our header first (RFC 6120 §4.9.1.2).
    assert!(out.starts_with("<?xml version='1.0'?><stream:stream"));
    assert!(stream_error(&out, "host-unknown"), "{out}");
    assert_eq!(
        c.closed,
        Some(EndReason::StreamError(StreamErrorCondition::HostUnknown))
    );

    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(&HEADER.replace("to='example.org' ", ""));
    assert!(stream_error(&out, "host-unknown"), "{out}");

    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(&HEADER.replace("' version='1.0'>", "' version='2.0'>"));
    assert!(stream_error(&out, "unsupported-version"), "{out}");

    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(&HEADER.replace(" version='1.0'>", ">"));
    assert!(stream_error(&out, "unsupported-version"), "{out}");

    // A higher minor version is answered with 1.0.
    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(&HEADER.replace("' version='1.0'>", "' version='1.1'>"));
    assert!(out.contains("version='1.0'") && c.closed.is_none(), "{out}");

    // Domains are compared normalised.
    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(&HEADER.replace("example.org", "EXAMPLE.org"));
    assert!(
        out.contains("from='example.org'") && c.closed.is_none(),
        "{out}"
    );

    let mut c = Client::new(&cfg, LOOPBACK, None);
    let out = c.send(&HEADER.replace("jabber:client", "jabber:server"));
    assert!(stream_error(&out, "invalid-namespace"), "{out}");
}

#[test]
fn restart_must_keep_the_domain() {
    let cfg = config(|_| {});
    let mut c = Client::tls(&cfg, LOOPBACK);
    c.send(HEADER);
    c.plain("juliet", "r0m30");
    let out = c.send(&HEADER.replace("example.org", "other.example"));
    assert!(stream_error(&out, "host-unknown"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// In-band registration (XEP-0077)

const REG_GET: &str = "<iq type='get' id='r1'><query xmlns='jabber:iq:register'/></iq>";

fn reg_set(user: &str, password: &str) -> String {
    format!(
        "<iq type='set' id='r2'><query xmlns='jabber:iq:register'>\
         <username>{user}</username><password>{password}</password></query></iq>"
    )
}

#[test]
fn registration_on_loopback_creates_an_account_then_logs_in() {
    let cfg = config(|_| {});
    let mut c = Client::tls(&cfg, LOOPBACK);
    c.send(HEADER);
    let out = c.send(REG_GET);
    assert_eq!(
        out,
        "<iq type='result' id='r1'><query xmlns='jabber:iq:register'><instructions>Choose a \
         username and password for use with this service.</instructions><username/><password/>\
         </query></iq>"
    );
    let out = c.send(&reg_set("Romeo", "m0ntague"));
    assert_eq!(out, "<iq type='result' id='r2'/>");
    // Stored under the normalised localpart.
    assert!(
        c.accounts
            .contains_key(&BareUser::new("example.org", "romeo"))
    );
    // XEP-0077 §3.1.1: one registration per stream.
    let out = c.send(&reg_set("benvolio", "x"));
    assert!(stanza_error(&out, "not-acceptable"), "{out}");
    let out = c.plain("romeo", "m0ntague");
    assert!(out.contains("<success"), "{out}");
}

#[test]
fn registration_errors() {
    let cfg = config(|s| s.registration.per_minute_per_ip = 100);
    let cases = [
        (reg_set("juliet", "x"), "conflict"),
        (
            "<iq type='set' id='r2'><query xmlns='jabber:iq:register'><username>a</username>\
             </query></iq>"
                .to_owned(),
            "not-acceptable",
        ),
        (reg_set("a", ""), "not-acceptable"),
        (reg_set("bad user", "x"), "not-acceptable"),
        (reg_set("a@b", "x"), "not-acceptable"),
        (reg_set("a/b", "x"), "not-acceptable"),
        (
            "<iq type='set' id='r2'><query xmlns='jabber:iq:register'><remove/></query></iq>"
                .to_owned(),
            "not-authorized",
        ),
        (
            "<iq type='get'><query xmlns='jabber:iq:register'/></iq>".to_owned(),
            "bad-request",
        ),
    ];
    for (xml, condition) in cases {
        let mut c = Client::tls(&cfg, LOOPBACK);
        c.send(HEADER);
        let out = c.send(&xml);
        assert!(stanza_error(&out, condition), "{xml} → {out}");
        assert!(c.closed.is_none());
    }
}

#[test]
fn registration_forbidden_by_mode_and_address() {
    // Loopback mode, remote client: not advertised, refused.
    let cfg = config(|_| {});
    let mut c = Client::tls(&cfg, REMOTE);
    let out = c.send(HEADER);
    assert!(!out.contains("iq-register"), "{out}");
    let out = c.send(REG_GET);
    assert!(stanza_error(&out, "not-allowed"), "{out}");
    let out = c.send(&reg_set("romeo", "x"));
    assert!(stanza_error(&out, "not-allowed"), "{out}");
    assert!(
        !c.accounts
            .contains_key(&BareUser::new("example.org", "romeo"))
    );

    // Closed for one host, open for everyone elsewhere.
    let cfg = config(|s| {
        s.registration.mode = RegistrationMode::Open;
        s.registration
            .hosts
            .insert("example.org".into(), RegistrationMode::Closed);
    });
    let mut c = Client::tls(&cfg, LOOPBACK);
    let out = c.send(HEADER);
    assert!(!out.contains("iq-register"));
    assert!(stanza_error(&c.send(REG_GET), "not-allowed"));
    let mut c = Client::tls(&cfg, REMOTE);
    let out = c.send(&HEADER.replace("example.org", "other.example"));
    assert!(out.contains("iq-register"));
    assert_eq!(
        c.send(&reg_set("romeo", "x")),
        "<iq type='result' id='r2'/>"
    );

    // Never before mandatory TLS: the stanza is refused with the stream.
    let cfg = config(|s| s.registration.mode = RegistrationMode::Open);
    let mut c = Client::new(&cfg, LOOPBACK, None);
    c.send(HEADER);
    assert!(stream_error(&c.send(REG_GET), "not-authorized"));
}

#[test]
fn registration_is_throttled_per_address() {
    let cfg = config(|s| s.registration.per_minute_per_ip = 2);
    for (i, expect_ok) in [(0, true), (1, true), (2, false)] {
        let mut c = Client::tls(&cfg, LOOPBACK);
        c.send(HEADER);
        let out = c.send(&reg_set(&format!("user{i}"), "pw"));
        if expect_ok {
            assert_eq!(out, "<iq type='result' id='r2'/>");
        } else {
            assert!(stanza_error(&out, "resource-constraint"), "{out}");
            assert!(out.contains("<error type='wait'>"), "{out}");
        }
    }
    // Another address is not affected, and the window passes.
    let mut c = Client::tls(&cfg, "127.0.0.2");
    c.send(HEADER);
    assert_eq!(
        c.send(&reg_set("user9", "pw")),
        "<iq type='result' id='r2'/>"
    );
    let mut c = Client::tls(&cfg, LOOPBACK);
    c.now += Duration::from_secs(61);
    c.send(HEADER);
    assert_eq!(
        c.send(&reg_set("user3", "pw")),
        "<iq type='result' id='r2'/>"
    );
}

// ---------------------------------------------------------------------------------------------
// SASL

#[test]
fn plain_success_restarts_with_bind_features() {
    let cfg = config(|_| {});
    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    let out = c.plain("juliet", "r0m30");
    assert_eq!(out, "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    assert!(c.m.is_authenticated());
    assert!(!c.m.is_stream_open());
    let out = c.send(HEADER);
    assert!(out.ends_with(
        "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
         <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>\
         </stream:features>"
    ));
}

#[test]
fn scram_sha256_and_plus_succeed() {
    let cfg = config(|_| {});
    // `y` ("I could bind, but you cannot") while we advertise PLUS is a downgrade
    // (RFC 5802 §6).
    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    let scram = ScramClient::with_binding("juliet", "r0m30", "y,,", vec![]);
    let out = c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
        scram.first()
    ));
    assert!(sasl_failure(&out, "not-authorized"), "{out}");

    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    let mut scram =
        ScramClient::with_binding("juliet", "r0m30", "p=tls-exporter,,", vec![42u8; 32]);
    let out = c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256-PLUS'>{}</auth>",
        scram.first()
    ));
    let challenge = element_text(&out, "challenge").expect(&out);
    let out = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        scram.finish(challenge)
    ));
    assert!(
        scram.verify(element_text(&out, "success").expect(&out)),
        "{out}"
    );
    assert!(c.m.is_authenticated());

    // Plain `n` SCRAM works too.
    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    let mut scram = ScramClient::new("juliet", "r0m30");
    // Without an initial response, the server asks with an empty challenge (§6.4.2).
    let out = c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'/>");
    assert_eq!(out, "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    let out = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        scram.first()
    ));
    let challenge = element_text(&out, "challenge").expect(&out);
    let out = c.send(&format!(
        "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
        scram.finish(challenge)
    ));
    assert!(scram.verify(element_text(&out, "success").expect(&out)));
}

#[test]
fn failures_abort_and_retry_limit() {
    let cfg = config(|s| {
        s.auth.failures_per_minute_per_ip = 100;
        s.auth.failures_per_minute_per_account = 100;
    });
    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    assert!(sasl_failure(&c.plain("juliet", "wrong"), "not-authorized"));
    assert!(sasl_failure(&c.plain("nobody", "wrong"), "not-authorized"));
    let out =
        c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='X-UNKNOWN'>=</auth>");
    assert!(sasl_failure(&out, "invalid-mechanism"), "{out}");
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'/>");
    let out = c.send("<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>");
    assert_eq!(
        out,
        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><aborted/></failure>"
    );
    assert!(c.closed.is_none());
    // The fifth failed attempt closes the stream (RFC 6120 §6.4.5).
    let out = c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!</auth>");
    assert!(sasl_failure(&out, "incorrect-encoding"), "{out}");
    assert!(stream_error(&out, "policy-violation"), "{out}");
    assert_eq!(
        c.closed,
        Some(EndReason::StreamError(
            StreamErrorCondition::PolicyViolation
        ))
    );

    // A retry after a failure can succeed.
    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    assert!(sasl_failure(&c.plain("juliet", "wrong"), "not-authorized"));
    assert!(c.plain("juliet", "r0m30").contains("<success"));
}

#[test]
fn throttled_per_address_and_per_account() {
    let cfg = config(|s| {
        s.auth.failures_per_minute_per_ip = 2;
        s.auth.failures_per_minute_per_account = 3;
    });
    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    assert!(sasl_failure(&c.plain("juliet", "a"), "not-authorized"));
    assert!(sasl_failure(&c.plain("juliet", "b"), "not-authorized"));
    // The right password is not even checked now.
    let out = c.plain("juliet", "r0m30");
    assert!(sasl_failure(&out, "temporary-auth-failure"), "{out}");
    // On a new stream from the same address too, until the window passes.
    let mut c = Client::tls(&cfg, REMOTE);
    c.send(HEADER);
    assert!(sasl_failure(
        &c.plain("juliet", "r0m30"),
        "temporary-auth-failure"
    ));
    c.now += Duration::from_secs(61);
    assert!(c.plain("juliet", "r0m30").contains("<success"));

    // Per account: failures from several addresses add up.
    let cfg = config(|s| {
        s.auth.failures_per_minute_per_ip = 100;
        s.auth.failures_per_minute_per_account = 2;
    });
    for ip in ["192.0.2.1", "192.0.2.2"] {
        let mut c = Client::tls(&cfg, ip);
        c.send(HEADER);
        assert!(sasl_failure(&c.plain("juliet", "bad"), "not-authorized"));
    }
    let mut c = Client::tls(&cfg, "192.0.2.3");
    c.send(HEADER);
    assert!(sasl_failure(
        &c.plain("juliet", "r0m30"),
        "temporary-auth-failure"
    ));
    // Other accounts are not affected.
    c.accounts
        .insert(BareUser::new("example.org", "romeo"), credentials("pw"));
    assert!(c.plain("romeo", "pw").contains("<success"));
}

// ---------------------------------------------------------------------------------------------
// Binding and stanzas

#[test]
fn bind_with_and_without_resource() {
    let cfg = config(|_| {});
    let c = Client::bound(&cfg, "balcony");
    assert_eq!(c.binds[0].as_str(), "juliet@example.org/balcony");
    assert_eq!(
        c.m.bound_jid().map(|j| j.as_str()),
        Some("juliet@example.org/balcony")
    );

    let mut c = Client::tls(&cfg, LOOPBACK);
    c.send(HEADER);
    c.plain("juliet", "r0m30");
    c.send(HEADER);
    let out = c.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    let jid = element_text(&out, "jid").unwrap();
    let resource = jid.strip_prefix("juliet@example.org/").unwrap();
    assert_eq!(resource.len(), 24);
    assert!(out.starts_with("<iq type='result' id='b'><bind"));
}

#[test]
fn bind_errors() {
    let cfg = config(|_| {});
    let login = |c: &mut Client| {
        c.send(HEADER);
        c.plain("juliet", "r0m30");
        c.send(HEADER);
    };
    // Too long a resource.
    let mut c = Client::tls(&cfg, LOOPBACK);
    login(&mut c);
    let long = "r".repeat(1100);
    let out = c.send(&format!(
        "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>{long}</resource></bind></iq>"
    ));
    assert!(stanza_error(&out, "bad-request"), "{out}");
    assert!(c.binds.is_empty());
    // Registry limit: resource-constraint, and the stream may try again.
    c.next_bind = Some(BindOutcome::Failed(RegistryError::LimitReached));
    let out = c.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(stanza_error(&out, "resource-constraint"), "{out}");
    assert!(c.m.bound_jid().is_none());
    let out = c.send("<iq type='get' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(stanza_error(&out, "bad-request"), "{out}");
    let out = c.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(out.contains("<jid>"), "{out}");
    // A second bind on the same stream.
    let out = c.send("<iq type='set' id='c'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(stanza_error(&out, "not-allowed"), "{out}");
}

#[test]
fn stanza_before_bind_and_unknown_elements() {
    let cfg = config(|_| {});
    let mut c = Client::tls(&cfg, LOOPBACK);
    c.send(HEADER);
    c.plain("juliet", "r0m30");
    c.send(HEADER);
    let out = c.send("<message to='romeo@example.org'><body>hi</body></message>");
    assert!(stream_error(&out, "not-authorized"), "{out}");
    assert!(c.routed.is_empty());

    let mut c = Client::bound(&cfg, "r");
    let out = c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    assert!(stream_error(&out, "unsupported-stanza-type"), "{out}");
    assert_eq!(
        c.closed,
        Some(EndReason::StreamError(
            StreamErrorCondition::UnsupportedStanzaType
        ))
    );

    let mut c = Client::tls(&cfg, LOOPBACK);
    c.send(HEADER);
    let out = c.send("<compress xmlns='http://jabber.org/protocol/compress'/>");
    assert!(stream_error(&out, "unsupported-stanza-type"), "{out}");
}

#[test]
fn session_iq_is_a_no_op() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "r");
    let out = c
        .send("<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>");
    assert_eq!(out, "<iq type='result' id='s1'/>");
    assert!(c.routed.is_empty());
}

#[test]
fn iq_validity() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "r");
    let cases = [
        "<iq type='get'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq id='1' type='bogus'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq id='1'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq id='1' type='get'/>",
    ];
    for xml in cases {
        let out = c.send(xml);
        assert!(stanza_error(&out, "bad-request"), "{xml} → {out}");
        assert!(out.contains("to='juliet@example.org/r'"), "{out}");
    }
    assert!(c.routed.is_empty());
    assert!(c.closed.is_none());
    c.send("<iq id='2' type='get'><query xmlns='jabber:iq:roster'/></iq>");
    c.send("<iq id='3' type='result'/>");
    assert_eq!(c.routed.len(), 2);
}

#[test]
fn from_is_stamped_and_to_is_checked() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "balcony");
    c.send(
        "<message from='mallory@evil.example/x' to='Romeo@Example.org' id='m1'>\
         <body>hi</body></message><presence/>",
    );
    assert_eq!(c.routed.len(), 2);
    let ToRouter::Stanza { from, stanza } = &c.routed[0] else {
        panic!("not a stanza");
    };
    assert_eq!(from.as_str(), "juliet@example.org/balcony");
    assert_eq!(stanza.from().as_deref(), Some("juliet@example.org/balcony"));
    assert_eq!(stanza.to().as_deref(), Some("Romeo@Example.org"));
    assert_eq!(stanza.name(), "message");
    assert!(
        std::str::from_utf8(stanza.raw())
            .unwrap()
            .contains("<body>hi</body>")
    );
    let ToRouter::Stanza { stanza, .. } = &c.routed[1] else {
        panic!("not a stanza");
    };
    assert_eq!(stanza.from().as_deref(), Some("juliet@example.org/balcony"));

    // A malformed `to` is a stanza error for the sender, not a stream error.
    let out = c.send("<message to='@example.org' id='m2'><body>x</body></message>");
    assert!(stanza_error(&out, "jid-malformed"), "{out}");
    assert!(out.starts_with("<message type='error' id='m2' to='juliet@example.org/balcony'>"));
    assert_eq!(c.routed.len(), 2);
    assert!(c.closed.is_none());
    // And an error stanza is never answered with one.
    let out = c.send("<message type='error' to='a@b@c'/>");
    assert_eq!(out, "");
}

#[test]
fn client_close_and_server_close() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "r");
    let out = c.send("</stream:stream>");
    assert_eq!(out, "</stream:stream>");
    assert_eq!(c.closed, Some(EndReason::Closed));

    // Shutdown before any header: our header, the error, the close.
    let mut c = Client::new(&cfg, LOOPBACK, None);
    let mut out = Vec::new();
    let action = c.m.close_with(
        StreamError::new(StreamErrorCondition::SystemShutdown),
        EndReason::Shutdown,
        &mut out,
    );
    assert!(matches!(action, Action::Close(EndReason::Shutdown)));
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("<?xml version='1.0'?><stream:stream"));
    assert!(stream_error(&out, "system-shutdown"), "{out}");
    // Once closed, nothing more is written.
    let mut more = Vec::new();
    c.m.close_with(
        StreamError::new(StreamErrorCondition::SystemShutdown),
        EndReason::Shutdown,
        &mut more,
    );
    assert!(more.is_empty());
}

#[test]
fn framer_errors_close_with_their_condition() {
    let cfg = config(|s| s.max_stanza_size = 300);
    let mut c = Client::bound(&cfg, "r");
    let out = c.send(&format!(
        "<message to='romeo@example.org'><body>{}</body></message>",
        "x".repeat(300)
    ));
    assert!(stream_error(&out, "policy-violation"), "{out}");
    let mut c = Client::bound(&config(|_| {}), "r");
    let out = c.send("<message><!-- no --></message>");
    assert!(stream_error(&out, "restricted-xml"), "{out}");
}

#[test]
fn machine_state_stays_small() {
    // Per-session XMPP state must stay small (DESIGN.md, "The hot path").
    assert!(
        std::mem::size_of::<Machine>() <= 96,
        "{}",
        std::mem::size_of::<Machine>()
    );
    assert!(std::mem::size_of::<State>() <= 24);
}
