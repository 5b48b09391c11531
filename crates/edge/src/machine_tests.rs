//! Table-style tests of the negotiation machine: client XML in, bytes and actions out, no
//! sockets. A small harness answers the machine's requests (credentials, registration,
//! bind) from memory.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
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
        sm: SmLimits::from_settings(&s),
        csi_max_held: s.csi_max_held,
        caps: s.caps.as_ref().map(caps_feature),
        hot: crate::metrics::Hot::register(),
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
    /// What the "registry" answers to `<resume/>`.
    next_resume: Option<Result<ResumptionState, Option<u32>>>,
    resumptions: Vec<(String, Arc<str>)>,
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
            next_resume: None,
            resumptions: Vec::new(),
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
                Action::RecordResumption { jid, id, .. } => {
                    self.resumptions.push((jid.to_string(), id));
                    self.m.on_resumption_recorded(true, &mut self.out)
                }
                Action::Resume { previd, .. } => {
                    let found = self.next_resume.take().unwrap_or(Err(None));
                    assert!(
                        found.as_ref().is_err() || found.as_ref().is_ok_and(|s| *s.id == *previd)
                    );
                    self.m.on_resume(found, self.now, &mut self.out)
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
         <ver xmlns='urn:xmpp:features:rosterver'/>\
         <sm xmlns='urn:xmpp:sm:3'/><csi xmlns='urn:xmpp:csi:0'/></stream:features>"
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
    let out = c.send("<enable xmlns='urn:example:unknown'/>");
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
    // Client State Indication costs a bound session one pointer until something is held.
    assert!(std::mem::size_of::<Bound>() <= std::mem::size_of::<FullJid>() + 8);
}

// ---------------------------------------------------------------------------------------------
// Stream management (XEP-0198)

const SM: &str = "urn:xmpp:sm:3";

fn out_message(n: u32) -> Outbound {
    Outbound {
        stanza: Element::parse(
            Bytes::from(format!(
                "<message from='romeo@example.org/orchard' id='o{n}'><body>{n}</body></message>"
            )),
            "jabber:client",
        )
        .unwrap(),
        stamp_to: true,
    }
}

impl Client {
    /// The router delivers `n`, numbered from `first`; returns what was written.
    fn deliver(&mut self, first: u32, n: u32) -> String {
        for i in first..first + n {
            let action = self.m.on_outbound(out_message(i), self.now, &mut self.out);
            self.perform(action);
        }
        String::from_utf8(std::mem::take(&mut self.out)).unwrap()
    }

    fn sm_mut(&mut self) -> &mut Sm {
        self.m.sm.as_deref_mut().unwrap()
    }
}

#[test]
fn sm_feature_only_after_authentication_and_enable_only_after_bind() {
    let cfg = config(|_| {});
    let mut c = Client::tls(&cfg, LOOPBACK);
    let out = c.send(HEADER);
    assert!(!out.contains(SM), "{out}");
    c.plain("juliet", "r0m30");
    let out = c.send(HEADER);
    assert!(
        out.contains("<sm xmlns='urn:xmpp:sm:3'/><csi xmlns='urn:xmpp:csi:0'/></stream:features>"),
        "{out}"
    );
    let out = c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    assert_eq!(
        out,
        "<failed xmlns='urn:xmpp:sm:3'><unexpected-request \
         xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
    );
    // <r/> before enabling is not part of the stream.
    let mut c = Client::bound(&cfg, "r");
    let out = c.send("<r xmlns='urn:xmpp:sm:3'/>");
    assert!(stream_error(&out, "unsupported-stanza-type"), "{out}");
}

#[test]
fn enable_with_and_without_resumption() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "plain");
    let out = c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    assert_eq!(out, "<enabled xmlns='urn:xmpp:sm:3'/>");
    assert!(c.resumptions.is_empty());
    let out = c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    assert!(out.contains("<unexpected-request"), "enabling twice: {out}");

    let mut c = Client::bound(&cfg, "resumable");
    let out = c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    assert_eq!(c.resumptions.len(), 1);
    let (jid, id) = c.resumptions[0].clone();
    assert_eq!(jid, "juliet@example.org/resumable");
    assert_eq!(id.len(), 22, "128 bits in base64url");
    assert_eq!(
        out,
        format!("<enabled xmlns='urn:xmpp:sm:3' id='{id}' resume='true' max='300'/>")
    );
    let stream_id = c.m.stream_id().clone();
    assert_eq!(c.m.sm().unwrap().session_stream_id, stream_id);

    // The registry could not record it: enabled, not resumable.
    let mut c = Client::bound(&cfg, "r2");
    c.framer
        .feed(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    let Ok(Some(frame)) = c.framer.next_frame() else {
        panic!("no frame")
    };
    let action = c.m.on_frame(frame, c.now, &mut c.out);
    assert!(matches!(action, Action::RecordResumption { .. }));
    c.m.on_resumption_recorded(false, &mut c.out);
    assert_eq!(
        String::from_utf8(std::mem::take(&mut c.out)).unwrap(),
        "<enabled xmlns='urn:xmpp:sm:3'/>"
    );
    assert!(c.m.sm().unwrap().resumption.is_none());
}

#[test]
fn inbound_h_counts_stanzas_only_and_wraps() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "h");
    // Before enabling, nothing is counted.
    c.send("<message to='romeo@example.org'><body>before</body></message>");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    assert_eq!(
        c.send("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='0'/>"
    );
    c.send("<message to='romeo@example.org'><body>1</body></message>");
    c.send("<presence/>");
    // An IQ answered here with an error was handled too.
    let out = c.send("<iq type='get' id='bad'/>");
    assert!(stanza_error(&out, "bad-request"), "{out}");
    // That error is a stanza for the client's h: counted, kept until acked.
    let sm = c.m.sm().unwrap();
    assert_eq!((sm.sent(), sm.unacked.len()), (1, 1));
    assert_eq!(sm.unacked[0].stanza.id().as_deref(), Some("bad"));
    c.send("<a xmlns='urn:xmpp:sm:3' h='1'/>");
    assert!(c.closed.is_none());
    // The RFC 3921 session no-op answered once SM is on counts too.
    let out = c.send(
        "<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
    );
    assert!(out.contains("id='sess'"), "{out}");
    assert_eq!(c.m.sm().unwrap().sent(), 2);
    c.send("<iq type='get' id='v' to='example.org'><query xmlns='jabber:iq:version'/></iq>");
    assert_eq!(
        c.send("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='5'/>"
    );
    assert_eq!(
        c.send("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='5'/>",
        "<r/> itself is not counted"
    );
    c.sm_mut().inbound = u32::MAX;
    c.send("<presence/><presence/>");
    assert_eq!(
        c.send("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='1'/>"
    );
    assert_eq!(c.routed.len(), 1 + 4 - 1 + 2);
    // Flooding bad requests without acking hits the unacked bound like anything else.
    let cfg = config(|s| s.sm_max_unacked_stanzas = 2);
    let mut c = Client::bound(&cfg, "flood");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    let out = c.send("<iq type='get' id='1'/><iq type='get' id='2'/><iq type='get' id='3'/>");
    assert!(stream_error(&out, "policy-violation"), "{out}");
}

#[test]
fn outbound_acks_requests_and_handled_count_too_high() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "out");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    let out = c.deliver(1, 4);
    assert_eq!(out.matches("<message").count(), 4);
    assert!(out.contains("to='juliet@example.org/out'"), "{out}");
    assert!(!out.contains("<r "), "no request before the fifth: {out}");
    let out = c.deliver(5, 1);
    assert!(
        out.ends_with("</message><r xmlns='urn:xmpp:sm:3'/>"),
        "{out}"
    );
    assert_eq!(c.send("<a xmlns='urn:xmpp:sm:3' h='3'/>"), "");
    let sm = c.m.sm().unwrap();
    assert_eq!((sm.acked, sm.unacked.len()), (3, 2));
    assert_eq!(sm.unacked[0].stanza.id().as_deref(), Some("o4"));
    // A time-based request while stanzas are unacknowledged.
    let deadline = c.m.sm_deadline().unwrap();
    assert!(deadline > c.now);
    c.m.on_sm_timer(deadline, &mut c.out);
    assert_eq!(c.out, b"<r xmlns='urn:xmpp:sm:3'/>");
    c.out.clear();
    // Acking more than was sent.
    let out = c.send("<a xmlns='urn:xmpp:sm:3' h='6'/>");
    assert!(
        out.starts_with(
            "<stream:error><undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <handled-count-too-high xmlns='urn:xmpp:sm:3' h='6' send-count='5'/>"
        ),
        "{out}"
    );
    assert!(out.ends_with("</stream:error></stream:stream>"), "{out}");
    assert_eq!(
        c.closed,
        Some(EndReason::StreamError(
            StreamErrorCondition::UndefinedCondition
        ))
    );
    // What was not acked stays for the driver to hand back.
    assert_eq!(c.m.take_sm().unwrap().unacked.len(), 2);
}

#[test]
fn outbound_counter_wraps_and_all_acked_needs_no_timer() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "wrap");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    c.sm_mut().acked = u32::MAX - 1;
    c.deliver(1, 3);
    assert_eq!(c.m.sm().unwrap().sent(), 1);
    assert_eq!(c.send("<a xmlns='urn:xmpp:sm:3' h='4294967295'/>"), "");
    assert_eq!(c.send("<a xmlns='urn:xmpp:sm:3' h='1'/>"), "");
    assert!(c.m.sm().unwrap().unacked.is_empty());
    assert!(c.m.sm_deadline().is_none());
    let out = c.send("<a xmlns='urn:xmpp:sm:3' h='2'/>");
    assert!(out.contains("h='2' send-count='1'"), "{out}");
    let mut c = Client::bound(&cfg, "bad");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    let out = c.send("<a xmlns='urn:xmpp:sm:3' h='-1'/>");
    assert!(stream_error(&out, "bad-format"), "{out}");
}

#[test]
fn unacked_overflow_closes_with_policy_violation_and_keeps_everything() {
    let cfg = config(|s| s.sm_max_unacked_stanzas = 3);
    let mut c = Client::bound(&cfg, "full");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    let out = c.deliver(1, 4);
    assert_eq!(out.matches("<message").count(), 3, "{out}");
    assert!(stream_error(&out, "policy-violation"), "{out}");
    assert_eq!(
        c.closed,
        Some(EndReason::StreamError(
            StreamErrorCondition::PolicyViolation
        ))
    );
    let ids: Vec<_> =
        c.m.take_sm()
            .unwrap()
            .unacked
            .iter()
            .map(|o| o.stanza.id().unwrap().into_owned())
            .collect();
    assert_eq!(ids, ["o1", "o2", "o3", "o4"], "the refused one is kept too");

    let size = out_message(1).weight();
    let cfg = config(|s| s.sm_max_unacked_bytes = size * 2);
    let mut c = Client::bound(&cfg, "bytes");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    let out = c.deliver(1, 2);
    assert!(!out.contains("stream:error"), "{out}");
    let out = c.deliver(3, 1);
    assert!(stream_error(&out, "policy-violation"), "{out}");
}

fn resumption_state(
    id: &str,
    inbound: u32,
    acked: u32,
    unacked: u32,
    pending: u32,
) -> ResumptionState {
    ResumptionState {
        id: Arc::from(id),
        jid: jid::parse_full("juliet@example.org/old").unwrap(),
        stream_id: Arc::from("old-stream"),
        inbound,
        acked,
        unacked: (1..=unacked).map(out_message).collect(),
        pending: (unacked + 1..=unacked + pending).map(out_message).collect(),
    }
}

fn authenticated(cfg: &Arc<StreamConfig>) -> Client {
    let mut c = Client::tls(cfg, LOOPBACK);
    c.send(HEADER);
    assert!(c.plain("juliet", "r0m30").contains("<success"));
    c.send(HEADER);
    c
}

#[test]
fn resume_acks_retransmits_and_continues() {
    let cfg = config(|_| {});
    let mut c = authenticated(&cfg);
    // 10 sent so far: acked up to 7, 8..=10 unacked; two delivered while detached.
    c.next_resume = Some(Ok(resumption_state("prev", 42, 7, 3, 2)));
    let out = c.send("<resume xmlns='urn:xmpp:sm:3' previd='prev' h='8'/>");
    assert!(
        out.starts_with("<resumed xmlns='urn:xmpp:sm:3' previd='prev' h='42'/>"),
        "{out}"
    );
    let ids: Vec<_> = out
        .match_indices("id='o")
        .map(|(i, _)| &out[i + 4..i + 6])
        .collect();
    assert_eq!(ids, ["o2", "o3", "o4", "o5"], "{out}");
    assert!(out.contains("to='juliet@example.org/old'"), "{out}");
    assert!(out.ends_with("<r xmlns='urn:xmpp:sm:3'/>"), "{out}");
    assert_eq!(c.m.bound_jid().unwrap().as_str(), "juliet@example.org/old");
    let sm = c.m.sm().unwrap();
    assert_eq!((sm.acked, sm.sent(), sm.inbound), (8, 12, 42));
    assert_eq!(&*sm.session_stream_id, "old-stream");
    // The stream goes on as the old session.
    c.send("<message to='romeo@example.org'><body>again</body></message>");
    assert_eq!(
        c.send("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='43'/>"
    );
    assert_eq!(c.send("<a xmlns='urn:xmpp:sm:3' h='12'/>"), "");
}

#[test]
fn resume_failures() {
    let cfg = config(|_| {});
    let mut c = authenticated(&cfg);
    c.next_resume = Some(Err(Some(4)));
    let out = c.send("<resume xmlns='urn:xmpp:sm:3' previd='gone' h='1'/>");
    assert_eq!(
        out,
        "<failed xmlns='urn:xmpp:sm:3' h='4'><item-not-found \
         xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
    );
    // The client may bind instead.
    let out = c.send(
        "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>new</resource></bind></iq>",
    );
    assert!(out.contains("<jid>juliet@example.org/new</jid>"), "{out}");
    let out = c.send("<resume xmlns='urn:xmpp:sm:3' previd='x' h='1'/>");
    assert!(
        out.contains("<unexpected-request"),
        "resume once bound: {out}"
    );

    let mut c = authenticated(&cfg);
    let out = c.send("<resume xmlns='urn:xmpp:sm:3' previd='unknown' h='0'/>");
    assert_eq!(
        out,
        "<failed xmlns='urn:xmpp:sm:3'><item-not-found \
         xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>"
    );
    let out = c.send("<resume xmlns='urn:xmpp:sm:3' h='0'/>");
    assert!(out.contains("<bad-request"), "{out}");

    // An h above what the old session sent.
    let mut c = authenticated(&cfg);
    c.next_resume = Some(Ok(resumption_state("prev", 0, 7, 3, 0)));
    let out = c.send("<resume xmlns='urn:xmpp:sm:3' previd='prev' h='11'/>");
    assert!(out.contains("h='11' send-count='10'"), "{out}");
    assert!(c.closed.is_some());
    assert_eq!(
        c.m.take_sm().unwrap().unacked.len(),
        3,
        "kept for the router"
    );
}

#[test]
fn delivery_receipts_pass_through_untouched() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "r");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    c.send(
        "<message to='romeo@example.org/orchard' id='m1'><body>hi</body>\
         <request xmlns='urn:xmpp:receipts'/></message>",
    );
    let Some(ToRouter::Stanza { stanza, .. }) = c.routed.last() else {
        panic!("not routed")
    };
    assert!(
        String::from_utf8_lossy(stanza.raw())
            .contains("<body>hi</body><request xmlns='urn:xmpp:receipts'/></message>")
    );
    let receipt = Outbound {
        stanza: Element::parse(
            Bytes::from_static(
                b"<message from='romeo@example.org/orchard' id='r1'>\
                  <received xmlns='urn:xmpp:receipts' id='m1'/></message>",
            ),
            "jabber:client",
        )
        .unwrap(),
        stamp_to: true,
    };
    let action = c.m.on_outbound(receipt, c.now, &mut c.out);
    assert!(matches!(action, Action::Continue));
    let out = String::from_utf8(std::mem::take(&mut c.out)).unwrap();
    assert!(
        out.contains("<received xmlns='urn:xmpp:receipts' id='m1'/></message>"),
        "{out}"
    );
    assert_eq!(
        c.m.sm().unwrap().unacked.len(),
        1,
        "a receipt is a stanza like any"
    );
}

// ---------------------------------------------------------------------------------------------
// Client State Indication (XEP-0352) and the server's entity capabilities (XEP-0115)

const INACTIVE: &str = "<inactive xmlns='urn:xmpp:csi:0'/>";
const ACTIVE: &str = "<active xmlns='urn:xmpp:csi:0'/>";

fn outbound(xml: &str) -> Outbound {
    Outbound {
        stanza: Element::parse(Bytes::from(xml.to_owned()), "jabber:client").unwrap(),
        stamp_to: true,
    }
}

fn presence_from(id: &str, from: &str) -> String {
    format!("<presence id='{id}' from='{from}'/>")
}

/// The `id`s of the stanzas in `out`, in order.
fn written_ids(out: &str) -> Vec<String> {
    out.match_indices(" id='")
        .map(|(i, _)| {
            let rest = &out[i + 5..];
            rest[..rest.find('\'').unwrap()].to_owned()
        })
        .collect()
}

impl Client {
    /// The router delivers one stanza; returns what was written.
    fn deliver_xml(&mut self, xml: &str) -> String {
        let action = self.m.on_outbound(outbound(xml), self.now, &mut self.out);
        self.perform(action);
        String::from_utf8(std::mem::take(&mut self.out)).unwrap()
    }

    fn held(&self) -> usize {
        match &self.m.state {
            State::Bound(b) | State::Closed(Some(b)) => b.held.as_ref().map_or(0, |h| h.len()),
            _ => 0,
        }
    }
}

#[test]
fn csi_and_caps_features_only_after_authentication() {
    let caps = ServerCaps {
        hash: "sha-1".into(),
        node: "https://example.invalid/starling".into(),
        ver: "abc+/=".into(),
    };
    let cfg = config(|s| s.caps = Some(caps.clone()));
    let mut c = Client::tls(&cfg, LOOPBACK);
    let out = c.send(HEADER);
    assert!(
        !out.contains("urn:xmpp:csi:0") && !out.contains("caps"),
        "{out}"
    );
    c.plain("juliet", "r0m30");
    let out = c.send(HEADER);
    assert!(
        out.ends_with(
            "<sm xmlns='urn:xmpp:sm:3'/><csi xmlns='urn:xmpp:csi:0'/>\
             <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' \
             node='https://example.invalid/starling' ver='abc+/='/></stream:features>"
        ),
        "{out}"
    );
    // Without capabilities from the router, no <c/>.
    let cfg = config(|_| {});
    let mut c = Client::tls(&cfg, LOOPBACK);
    c.send(HEADER);
    c.plain("juliet", "r0m30");
    let out = c.send(HEADER);
    assert!(
        out.contains("<csi xmlns='urn:xmpp:csi:0'/></stream:features>"),
        "{out}"
    );
    assert!(!out.contains("jabber.org/protocol/caps"), "{out}");
}

#[test]
fn inactive_holds_the_latest_presence_per_sender_and_active_writes_them() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "phone");
    assert_eq!(c.send(INACTIVE), "", "a nonza has no answer");
    assert!(c.m.csi.is_inactive());
    assert_eq!(c.held(), 0, "nothing allocated before something is held");
    for (id, from) in [
        ("r1", "romeo@example.org/orchard"),
        ("b1", "benvolio@example.org/street"),
        ("r2", "romeo@example.org/orchard"),
        ("r3", "romeo@example.org/orchard"),
    ] {
        assert_eq!(c.deliver_xml(&presence_from(id, from)), "", "{id} is held");
    }
    let gone = "<presence id='m1' from='mercutio@example.org/x' type='unavailable'/>";
    assert_eq!(c.deliver_xml(gone), "");
    assert_eq!(c.held(), 3);
    // A message from someone whose presence is not held passes alone, at once.
    let out =
        c.deliver_xml("<message id='msg' from='tybalt@example.org/y'><body>hi</body></message>");
    assert_eq!(written_ids(&out), ["msg"]);
    // Important presences pass at once too.
    for (id, type_) in [
        ("s1", "subscribe"),
        ("s2", "subscribed"),
        ("s3", "unsubscribe"),
        ("s4", "unsubscribed"),
        ("e1", "error"),
    ] {
        let out = c.deliver_xml(&format!(
            "<presence id='{id}' from='paris@example.org' type='{type_}'/>"
        ));
        assert_eq!(written_ids(&out), [id], "{type_}");
    }
    assert_eq!(c.held(), 3);
    // Active: the latest of each sender, in the order of their latest update, and then
    // nothing is held any more.
    let out = c.send(ACTIVE);
    assert_eq!(written_ids(&out), ["b1", "r3", "m1"], "{out}");
    assert!(out.contains("to='juliet@example.org/phone'"), "{out}");
    assert_eq!(c.held(), 0);
    assert!(!c.m.csi.is_inactive());
    assert_eq!(
        written_ids(&c.deliver_xml(&presence_from("r4", "romeo@example.org/orchard"))),
        ["r4"]
    );
    // Repeated indications change nothing.
    assert_eq!(c.send(ACTIVE), "");
    assert_eq!(c.send(INACTIVE), "");
    assert_eq!(c.send(INACTIVE), "");
    assert_eq!(
        c.deliver_xml(&presence_from("r5", "romeo@example.org/orchard")),
        ""
    );
}

#[test]
fn a_stanza_from_a_contact_writes_that_contact_s_held_presence_first() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "phone");
    c.send(INACTIVE);
    for (id, from) in [
        ("r1", "romeo@example.org/orchard"),
        ("b1", "benvolio@example.org/street"),
        ("r2", "romeo@example.org/balcony"),
        ("r1b", "romeo@example.org/orchard"),
    ] {
        c.deliver_xml(&presence_from(id, from));
    }
    // Any resource of Romeo's: both of his resources' latest presences, then the message.
    let out = c.deliver_xml(
        "<message id='msg' from='romeo@example.org/orchard'><body>hi</body></message>",
    );
    assert_eq!(written_ids(&out), ["r2", "r1b", "msg"], "{out}");
    assert_eq!(c.held(), 1, "Benvolio's presence stays held");
    let out = c.deliver_xml("<iq id='q' type='get' from='benvolio@example.org/street'/>");
    assert_eq!(written_ids(&out), ["b1", "q"], "{out}");
    assert_eq!(c.held(), 0);
}

#[test]
fn a_full_buffer_is_flushed_with_the_newcomer() {
    let cfg = config(|s| s.csi_max_held = 2);
    let mut c = Client::bound(&cfg, "phone");
    c.send(INACTIVE);
    c.deliver_xml(&presence_from("a", "a@example.org/1"));
    c.deliver_xml(&presence_from("b", "b@example.org/1"));
    assert_eq!(c.deliver_xml(&presence_from("b2", "b@example.org/1")), "");
    let out = c.deliver_xml(&presence_from("c", "c@example.org/1"));
    assert_eq!(written_ids(&out), ["a", "b2", "c"]);
    assert_eq!(c.held(), 0);
    // Holding starts again.
    assert_eq!(c.deliver_xml(&presence_from("d", "d@example.org/1")), "");
    assert_eq!(c.held(), 1);
}

#[test]
fn csi_nonzas_are_not_counted_and_flushed_presence_is() {
    let cfg = config(|_| {});
    let mut c = Client::bound(&cfg, "phone");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    c.send(INACTIVE);
    c.deliver_xml(&presence_from("a", "a@example.org/1"));
    assert_eq!(c.m.sm().unwrap().sent(), 0, "a held presence is not sent");
    c.send(ACTIVE);
    assert_eq!(
        c.send("<r xmlns='urn:xmpp:sm:3'/>"),
        "<a xmlns='urn:xmpp:sm:3' h='0'/>",
        "the nonzas were not stanzas"
    );
    assert_eq!(c.m.sm().unwrap().sent(), 1);
    // An unknown element in the CSI namespace is no nonza this stream knows.
    let out = c.send("<asleep xmlns='urn:xmpp:csi:0'/>");
    assert!(stream_error(&out, "unsupported-stanza-type"), "{out}");
}

#[test]
fn an_indication_before_bind_carries_over_to_the_session() {
    let cfg = config(|_| {});
    let mut c = authenticated(&cfg);
    assert_eq!(c.send(INACTIVE), "");
    let out = c.send(
        "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>r</resource></bind></iq>",
    );
    assert!(out.contains("<jid>juliet@example.org/r</jid>"), "{out}");
    assert_eq!(c.deliver_xml(&presence_from("a", "a@example.org/1")), "");
    assert_eq!(written_ids(&c.send(ACTIVE)), ["a"]);
}

#[test]
fn held_presence_travels_with_a_resumable_session_only() {
    let cfg = config(|_| {});
    // Resumable: what is held becomes the first of what the resumed session writes.
    let mut c = Client::bound(&cfg, "phone");
    c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    c.deliver_xml("<message id='m' from='a@example.org/1'><body>x</body></message>");
    c.send(INACTIVE);
    c.deliver_xml(&presence_from("p", "b@example.org/1"));
    let jid = c.m.bound_jid().unwrap().clone();
    let sm = c.m.take_sm().unwrap();
    assert_eq!(c.held(), 0);
    let state = sm.into_resumption(jid).unwrap();
    assert_eq!(state.unacked.len(), 1);
    let pending: Vec<_> = state
        .pending
        .iter()
        .map(|o| o.stanza.id().unwrap())
        .collect();
    assert_eq!(pending, ["p"]);
    // A resumed stream starts active and writes it.
    let mut r = authenticated(&cfg);
    r.next_resume = Some(Ok(state));
    let previd = r
        .next_resume
        .as_ref()
        .unwrap()
        .as_ref()
        .unwrap()
        .id
        .to_string();
    let out = r.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='0'/>"
    ));
    assert_eq!(written_ids(&out), ["m", "p"], "{out}");
    assert!(!r.m.csi.is_inactive());

    // Not resumable: dropped with the connection.
    let mut c = Client::bound(&cfg, "plain");
    c.send("<enable xmlns='urn:xmpp:sm:3'/>");
    c.send(INACTIVE);
    c.deliver_xml(&presence_from("p", "b@example.org/1"));
    let sm = c.m.take_sm().unwrap();
    assert!(sm.held.is_none());
    assert_eq!(c.held(), 1, "left to be dropped with the machine");
}
