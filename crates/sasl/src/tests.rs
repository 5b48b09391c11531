//! Exchanges driven end to end: the RFC example vectors, a small independent client, and every
//! refusal.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;

use crate::*;

const KEY: &[u8] = b"cluster-wide fake salt secret";

fn server() -> SaslServer {
    SaslServer::new(KEY)
}

fn need(step: Step) -> NeedCredentials {
    match step {
        Step::NeedCredentials(n) => n,
        other => panic!("expected NeedCredentials, got {other:?}"),
    }
}

fn challenge(step: Step) -> (Vec<u8>, AwaitingClientFinal) {
    match step {
        Step::Challenge { data, next } => (data, next),
        other => panic!("expected Challenge, got {other:?}"),
    }
}

fn failure(step: Step) -> SaslFailureReason {
    match step {
        Step::Failure { reason, .. } => reason,
        other => panic!("expected Failure, got {other:?}"),
    }
}

fn failure_detail(step: Step) -> (SaslFailureReason, &'static str) {
    match step {
        Step::Failure { reason, detail } => (reason, detail),
        other => panic!("expected Failure, got {other:?}"),
    }
}

fn success(step: Step) -> (String, Option<String>, Option<Vec<u8>>) {
    match step {
        Step::Success {
            username,
            authzid,
            additional_data,
        } => (username, authzid, additional_data),
        other => panic!("expected Success, got {other:?}"),
    }
}

fn b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// A minimal SCRAM client written from RFC 5802 §3, independent of the server's state machine.
struct Client {
    hash: HashAlgo,
    username: &'static str,
    password: &'static str,
    authzid: Option<&'static str>,
    /// `n`, `y` or `p=<name>`.
    flag: &'static str,
    cb_data: Vec<u8>,
    nonce: &'static str,
}

struct ClientFinal {
    message: String,
    server_final: String,
}

impl Client {
    fn new(hash: HashAlgo) -> Self {
        Client {
            hash,
            username: "juliet",
            password: "r0meo, r0meo",
            authzid: None,
            flag: "n",
            cb_data: Vec::new(),
            nonce: "Jq4uClientNonce",
        }
    }

    fn escape(s: &str) -> String {
        s.replace('=', "=3D").replace(',', "=2C")
    }

    fn gs2_header(&self) -> String {
        let authzid = self
            .authzid
            .map(|a| format!("a={}", Self::escape(a)))
            .unwrap_or_default();
        format!("{},{authzid},", self.flag)
    }

    fn bare(&self) -> String {
        format!("n={},r={}", Self::escape(self.username), self.nonce)
    }

    fn first(&self) -> Vec<u8> {
        format!("{}{}", self.gs2_header(), self.bare()).into_bytes()
    }

    fn finish(&self, server_first: &[u8]) -> ClientFinal {
        let server_first = std::str::from_utf8(server_first).unwrap();
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iterations = 0;
        for attr in server_first.split(',') {
            let (k, v) = attr.split_at(2);
            match k {
                "r=" => nonce = v,
                "s=" => salt = STANDARD.decode(v).unwrap(),
                "i=" => iterations = v.parse().unwrap(),
                _ => panic!("unexpected attribute {attr}"),
            }
        }
        assert!(nonce.starts_with(self.nonce) && nonce.len() > self.nonce.len());
        let mut cb = self.gs2_header().into_bytes();
        cb.extend_from_slice(&self.cb_data);
        let without_proof = format!("c={},r={nonce}", b64(&cb));
        let auth = format!("{},{server_first},{without_proof}", self.bare());

        let salted = crypto::hi(self.hash, self.password.as_bytes(), &salt, iterations);
        let client_key = crypto::client_key(self.hash, &salted);
        let stored_key = crypto::hash(self.hash, &client_key);
        let signature = crypto::hmac(self.hash, &stored_key, auth.as_bytes());
        let proof = crypto::xor(&client_key, &signature);
        let server_key = crypto::server_key(self.hash, &salted);
        let server_signature = crypto::hmac(self.hash, &server_key, auth.as_bytes());
        ClientFinal {
            message: format!("{without_proof},p={}", b64(&proof)),
            server_final: format!("v={}", b64(&server_signature)),
        }
    }
}

fn creds(hash: HashAlgo, password: &str) -> ScramCredentials {
    derive_credentials(hash, password, b"0123456789abcdef", 64).unwrap()
}

/// Runs a whole SCRAM exchange with `client` against the given stored password.
fn exchange(
    mechanism: Mechanism,
    cb: &ChannelBindingInfo,
    domain: Option<&str>,
    client: &Client,
    stored_password: Option<&str>,
) -> Step {
    let step = server().start(mechanism, cb, domain, &client.first());
    let need = need(step);
    assert_eq!(need.username(), client.username);
    assert!(!need.is_expensive());
    let stored = stored_password.map(|p| creds(need.hash(), p));
    let (data, next) = challenge(need.with_credentials(stored));
    let last = client.finish(&data);
    let step = next.client_final(last.message.as_bytes());
    if let Step::Success {
        additional_data: Some(v),
        ..
    } = &step
    {
        assert_eq!(v, last.server_final.as_bytes(), "server signature");
    }
    step
}

#[test]
fn rfc5802_scram_sha1_example() {
    let salt = STANDARD.decode("QSXCR+Q6sek8bf92").unwrap();
    let stored = derive_credentials(HashAlgo::Sha1, "pencil", &salt, 4096).unwrap();
    let need = need(server().start(
        Mechanism::ScramSha1,
        &ChannelBindingInfo::none(),
        None,
        b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    ));
    assert_eq!(need.username(), "user");
    assert_eq!(need.hash(), HashAlgo::Sha1);
    let (data, next) =
        challenge(need.with_credentials_and_nonce(Some(stored), "3rfcNHYJY1ZVvWVs7j"));
    assert_eq!(
        data,
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
    );
    let (username, authzid, additional) = success(next.client_final(
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    ));
    assert_eq!(username, "user");
    assert_eq!(authzid, None);
    assert_eq!(
        additional.as_deref(),
        Some(&b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="[..])
    );
}

#[test]
fn rfc7677_scram_sha256_example() {
    let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    let stored = derive_credentials(HashAlgo::Sha256, "pencil", &salt, 4096).unwrap();
    let need = need(server().start(
        Mechanism::ScramSha256,
        &ChannelBindingInfo::none(),
        None,
        b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    ));
    let (data, next) =
        challenge(need.with_credentials_and_nonce(Some(stored), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"));
    assert_eq!(
        data,
        &b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
            [..]
    );
    let (_, _, additional) = success(next.client_final(
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
          p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
    ));
    assert_eq!(
        additional.as_deref(),
        Some(&b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="[..])
    );
}

#[test]
fn scram_sha512_full_exchange() {
    let client = Client::new(HashAlgo::Sha512);
    let step = exchange(
        Mechanism::ScramSha512,
        &ChannelBindingInfo::none(),
        None,
        &client,
        Some("r0meo, r0meo"),
    );
    let (username, authzid, _) = success(step);
    assert_eq!(username, "juliet");
    assert_eq!(authzid, None);
}

#[test]
fn every_hash_and_plus_variant_succeeds() {
    let cb = ChannelBindingInfo::none()
        .with(ChannelBindingType::TlsExporter, vec![7; 32])
        .with(ChannelBindingType::TlsServerEndPoint, vec![9; 32]);
    for hash in HashAlgo::ALL {
        for (mechanism, flag, data) in [
            (plain_scram(hash), "n", vec![]),
            (plus_scram(hash), "p=tls-exporter", vec![7; 32]),
            (plus_scram(hash), "p=tls-server-end-point", vec![9; 32]),
        ] {
            let client = Client {
                flag,
                cb_data: data,
                ..Client::new(hash)
            };
            success(exchange(
                mechanism,
                &cb,
                None,
                &client,
                Some("r0meo, r0meo"),
            ));
        }
    }
}

fn plain_scram(hash: HashAlgo) -> Mechanism {
    match hash {
        HashAlgo::Sha1 => Mechanism::ScramSha1,
        HashAlgo::Sha256 => Mechanism::ScramSha256,
        HashAlgo::Sha512 => Mechanism::ScramSha512,
    }
}

fn plus_scram(hash: HashAlgo) -> Mechanism {
    match hash {
        HashAlgo::Sha1 => Mechanism::ScramSha1Plus,
        HashAlgo::Sha256 => Mechanism::ScramSha256Plus,
        HashAlgo::Sha512 => Mechanism::ScramSha512Plus,
    }
}

#[test]
fn wrong_password_is_not_authorized() {
    let client = Client::new(HashAlgo::Sha256);
    let step = exchange(
        Mechanism::ScramSha256,
        &ChannelBindingInfo::none(),
        None,
        &client,
        Some("something else"),
    );
    assert_eq!(failure(step), SaslFailureReason::NotAuthorized);
}

#[test]
fn unknown_user_gets_a_full_fake_exchange() {
    let client = Client::new(HashAlgo::Sha256);
    let salt_of = |name: &'static str, server: &SaslServer| {
        let c = Client {
            username: name,
            ..Client::new(HashAlgo::Sha256)
        };
        let need = need(server.start(
            Mechanism::ScramSha256,
            &ChannelBindingInfo::none(),
            None,
            &c.first(),
        ));
        let (data, _) = challenge(need.with_credentials(None));
        let text = String::from_utf8(data).unwrap();
        let salt = text.split(',').nth(1).unwrap().to_owned();
        let iterations = text.split(',').nth(2).unwrap().to_owned();
        (salt, iterations)
    };
    let s = server().with_fake_iterations(10_000);
    let (salt, iterations) = salt_of("ghost", &s);
    assert_eq!(STANDARD.decode(&salt[2..]).unwrap().len(), SALT_LEN);
    assert_eq!(iterations, "i=10000");
    // Stable for the same user and secret (another node, a later attempt)...
    assert_eq!(
        salt_of("ghost", &SaslServer::new(KEY).with_fake_iterations(1)).0,
        salt
    );
    // ...different for another user or another secret.
    assert_ne!(salt_of("phantom", &s).0, salt);
    assert_ne!(
        salt_of("ghost", &SaslServer::new(b"other".to_vec())).0,
        salt
    );

    // The client can finish the exchange; it fails only at the end, like a wrong password.
    let step = exchange(
        Mechanism::ScramSha256,
        &ChannelBindingInfo::none(),
        None,
        &client,
        None,
    );
    match step {
        Step::Failure { reason, detail } => {
            assert_eq!(reason, SaslFailureReason::NotAuthorized);
            assert_eq!(detail, "authentication failed");
        }
        other => panic!("expected failure, got {other:?}"),
    }
}

/// Starts a SHA-256 exchange for `client` with the right password and returns the challenge.
fn to_final(
    mechanism: Mechanism,
    cb: &ChannelBindingInfo,
    client: &Client,
) -> (Vec<u8>, AwaitingClientFinal) {
    let need = need(server().start(mechanism, cb, None, &client.first()));
    let stored = creds(need.hash(), client.password);
    challenge(need.with_credentials(Some(stored)))
}

#[test]
fn tampered_nonce_is_refused() {
    let client = Client::new(HashAlgo::Sha256);
    let (data, next) = to_final(Mechanism::ScramSha256, &ChannelBindingInfo::none(), &client);
    let last = client.finish(&data).message;
    let tampered = last.replacen(",r=Jq4u", ",r=Jq4v", 1);
    assert_ne!(tampered, last);
    assert_eq!(
        failure_detail(next.client_final(tampered.as_bytes())),
        (SaslFailureReason::NotAuthorized, "nonce mismatch")
    );
}

#[test]
fn malformed_client_final_messages() {
    let client = Client::new(HashAlgo::Sha256);
    type Mangle = fn(&str) -> Vec<u8>;
    let cases: [(&str, Mangle); 6] = [
        ("missing c=", |m| {
            m.split_once(',').unwrap().1.as_bytes().to_vec()
        }),
        ("bad base64 proof", |m| {
            let (head, _) = m.rsplit_once(",p=").unwrap();
            format!("{head},p=!!!!").into_bytes()
        }),
        ("bad base64 c=", |m| {
            m.replacen("c=biws", "c=bi*s", 1).into_bytes()
        }),
        ("short proof", |m| {
            let (head, _) = m.rsplit_once(",p=").unwrap();
            format!("{head},p=AAAA").into_bytes()
        }),
        ("non-UTF-8", |m| {
            let mut b = m.as_bytes().to_vec();
            b.insert(3, 0xff);
            b
        }),
        ("too long", |m| {
            let (head, tail) = m.rsplit_once(",p=").unwrap();
            format!("{head},x={},p={tail}", "a".repeat(MAX_MESSAGE_LEN)).into_bytes()
        }),
    ];
    for (name, mangle) in cases {
        let (data, next) = to_final(Mechanism::ScramSha256, &ChannelBindingInfo::none(), &client);
        let last = client.finish(&data).message;
        assert_eq!(
            failure(next.client_final(&mangle(&last))),
            SaslFailureReason::MalformedRequest,
            "{name}"
        );
    }
}

#[test]
fn wrong_channel_binding_data_is_refused() {
    let cb = ChannelBindingInfo::none().with(ChannelBindingType::TlsExporter, vec![1; 32]);
    let client = Client {
        flag: "p=tls-exporter",
        cb_data: vec![2; 32],
        ..Client::new(HashAlgo::Sha256)
    };
    let (data, next) = to_final(Mechanism::ScramSha256Plus, &cb, &client);
    let last = client.finish(&data).message;
    assert_eq!(
        failure_detail(next.client_final(last.as_bytes())),
        (
            SaslFailureReason::NotAuthorized,
            "channel-binding data mismatch"
        )
    );
}

#[test]
fn plus_client_final_must_carry_the_binding_data() {
    // A client that sends only the GS2 header in c= (as if it were not binding) is refused.
    let cb = ChannelBindingInfo::none().with(ChannelBindingType::TlsExporter, vec![1; 32]);
    let client = Client {
        flag: "p=tls-exporter",
        cb_data: Vec::new(),
        ..Client::new(HashAlgo::Sha256)
    };
    let (data, next) = to_final(Mechanism::ScramSha256Plus, &cb, &client);
    let last = client.finish(&data).message;
    assert_eq!(
        failure_detail(next.client_final(last.as_bytes())),
        (
            SaslFailureReason::NotAuthorized,
            "channel-binding data mismatch"
        )
    );
}

#[test]
fn y_flag_is_a_downgrade_when_plus_is_advertised() {
    let client = Client {
        flag: "y",
        ..Client::new(HashAlgo::Sha256)
    };
    let plus = ChannelBindingInfo::none().with(ChannelBindingType::TlsServerEndPoint, vec![3; 32]);
    assert_eq!(
        failure(server().start(Mechanism::ScramSha256, &plus, None, &client.first())),
        SaslFailureReason::NotAuthorized
    );
    // Without PLUS on offer, `y` is honest and the exchange succeeds.
    let step = exchange(
        Mechanism::ScramSha256,
        &ChannelBindingInfo::none(),
        None,
        &client,
        Some(client.password),
    );
    success(step);
    // `n` is fine even when PLUS is advertised.
    let client = Client::new(HashAlgo::Sha256);
    success(exchange(
        Mechanism::ScramSha256,
        &plus,
        None,
        &client,
        Some(client.password),
    ));
}

#[test]
fn client_first_refusals() {
    let exporter = ChannelBindingInfo::none().with(ChannelBindingType::TlsExporter, vec![1; 32]);
    let endpoint =
        ChannelBindingInfo::none().with(ChannelBindingType::TlsServerEndPoint, vec![1; 32]);
    let none = ChannelBindingInfo::none();
    let cases: [(
        &str,
        Mechanism,
        &ChannelBindingInfo,
        &[u8],
        SaslFailureReason,
    ); 11] = [
        (
            "p= on non-PLUS",
            Mechanism::ScramSha256,
            &exporter,
            b"p=tls-exporter,,n=u,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "n on PLUS",
            Mechanism::ScramSha256Plus,
            &exporter,
            b"n,,n=u,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "y on PLUS",
            Mechanism::ScramSha256Plus,
            &exporter,
            b"y,,n=u,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "type not offered",
            Mechanism::ScramSha256Plus,
            &endpoint,
            b"p=tls-exporter,,n=u,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "unknown type",
            Mechanism::ScramSha256Plus,
            &exporter,
            b"p=tls-unique,,n=u,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "PLUS without TLS binding",
            Mechanism::ScramSha256Plus,
            &none,
            b"p=tls-exporter,,n=u,r=abc",
            SaslFailureReason::InvalidMechanism,
        ),
        (
            "m= extension",
            Mechanism::ScramSha256,
            &none,
            b"n,,m=ext,n=u,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "non-UTF-8",
            Mechanism::ScramSha256,
            &none,
            b"n,,n=\xff\xfe,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "bad escape",
            Mechanism::ScramSha256,
            &none,
            b"n,,n=a=2D,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "SASLprep refuses",
            Mechanism::ScramSha256,
            &none,
            b"n,,n=a\x07b,r=abc",
            SaslFailureReason::MalformedRequest,
        ),
        (
            "empty",
            Mechanism::ScramSha256,
            &none,
            b"",
            SaslFailureReason::MalformedRequest,
        ),
    ];
    for (name, mechanism, cb, msg, want) in cases {
        assert_eq!(
            failure(server().start(mechanism, cb, None, msg)),
            want,
            "{name}"
        );
    }
    let long = format!("n,,n=u,r={}", "a".repeat(MAX_MESSAGE_LEN));
    assert_eq!(
        failure(server().start(Mechanism::ScramSha256, &none, None, long.as_bytes())),
        SaslFailureReason::MalformedRequest
    );
}

#[test]
fn authzid_must_be_the_users_own_jid() {
    let none = ChannelBindingInfo::none();
    let client = Client {
        authzid: Some("juliet@Capulet.example"),
        ..Client::new(HashAlgo::Sha256)
    };
    let (_, authzid, _) = success(exchange(
        Mechanism::ScramSha256,
        &none,
        Some("capulet.example"),
        &client,
        Some(client.password),
    ));
    assert_eq!(authzid.as_deref(), Some("juliet@Capulet.example"));

    for (authzid, domain) in [
        ("romeo@capulet.example", Some("capulet.example")),
        ("juliet@montague.example", Some("capulet.example")),
        ("juliet@capulet.example/balcony", Some("capulet.example")),
        ("juliet", Some("capulet.example")),
        ("juliet@capulet.example", None),
    ] {
        let client = Client {
            authzid: Some(authzid),
            ..Client::new(HashAlgo::Sha256)
        };
        assert_eq!(
            failure(server().start(Mechanism::ScramSha256, &none, domain, &client.first())),
            SaslFailureReason::InvalidAuthzid,
            "{authzid}"
        );
    }
}

#[test]
fn username_escapes_and_saslprep() {
    let client = Client {
        username: "a,b=c",
        ..Client::new(HashAlgo::Sha1)
    };
    let need = need(server().start(
        Mechanism::ScramSha1,
        &ChannelBindingInfo::none(),
        None,
        &client.first(),
    ));
    assert_eq!(need.username(), "a,b=c");
    // SASLprep maps U+00A0 (no-break space) to a plain space and drops U+00AD (soft hyphen).
    let need = need_of(b"n,,n=a\xc2\xa0b\xc2\xadc,r=abc");
    assert_eq!(need.username(), "a bc");
}

fn need_of(msg: &[u8]) -> NeedCredentials {
    need(server().start(
        Mechanism::ScramSha256,
        &ChannelBindingInfo::none(),
        None,
        msg,
    ))
}

#[test]
fn credentials_of_another_hash_are_a_server_problem() {
    let need = need_of(b"n,,n=u,r=abc");
    assert_eq!(
        failure(need.with_credentials(Some(creds(HashAlgo::Sha1, "pw")))),
        SaslFailureReason::TemporaryAuthFailure
    );
    let mut broken = creds(HashAlgo::Sha256, "pw");
    broken.stored_key.pop();
    assert_eq!(
        failure(need_of(b"n,,n=u,r=abc").with_credentials(Some(broken))),
        SaslFailureReason::TemporaryAuthFailure
    );
}

#[test]
fn server_nonce_is_fresh() {
    let a = challenge(need_of(b"n,,n=u,r=abc").with_credentials(None)).0;
    let b = challenge(need_of(b"n,,n=u,r=abc").with_credentials(None)).0;
    assert_ne!(a, b);
    let text = String::from_utf8(a).unwrap();
    assert!(text.starts_with("r=abc"));
    assert_eq!(text.split(',').next().unwrap().len(), 2 + 3 + 24);
}

fn plain(msg: &[u8], domain: Option<&str>, stored: Option<ScramCredentials>) -> Step {
    let step = server().start(Mechanism::Plain, &ChannelBindingInfo::none(), domain, msg);
    let need = need(step);
    assert!(need.is_expensive());
    assert_eq!(need.hash(), HashAlgo::Sha256);
    need.with_credentials(stored)
}

#[test]
fn plain_accepts_the_right_password() {
    let stored = creds(HashAlgo::Sha256, "pencil");
    let (username, authzid, additional) =
        success(plain(b"\0user\0pencil", None, Some(stored.clone())));
    assert_eq!(
        (username.as_str(), authzid, additional),
        ("user", None, None)
    );
    let (_, authzid, _) = success(plain(
        b"user@example.com\0user\0pencil",
        Some("example.com"),
        Some(stored.clone()),
    ));
    assert_eq!(authzid.as_deref(), Some("user@example.com"));
    // Any stored hash verifies PLAIN.
    success(plain(
        b"\0user\0pencil",
        None,
        Some(creds(HashAlgo::Sha512, "pencil")),
    ));
}

#[test]
fn plain_refusals() {
    let stored = creds(HashAlgo::Sha256, "pencil");
    assert_eq!(
        failure(plain(b"\0user\0crayon", None, Some(stored.clone()))),
        SaslFailureReason::NotAuthorized
    );
    assert_eq!(
        failure(plain(b"\0user\0pencil", None, None)),
        SaslFailureReason::NotAuthorized
    );
    let s = server();
    let none = ChannelBindingInfo::none();
    assert_eq!(
        failure(s.start(
            Mechanism::Plain,
            &none,
            Some("example.com"),
            b"other@example.com\0user\0pencil"
        )),
        SaslFailureReason::InvalidAuthzid
    );
    assert_eq!(
        failure(s.start(Mechanism::Plain, &none, None, b"user\0pencil")),
        SaslFailureReason::MalformedRequest
    );
    assert_eq!(
        failure(s.start(Mechanism::Plain, &none, None, b"\0us\xffer\0pencil")),
        SaslFailureReason::MalformedRequest
    );
}

#[test]
fn derive_and_verify() {
    let salt = new_salt().unwrap();
    assert_eq!(salt.len(), SALT_LEN);
    assert_ne!(salt, new_salt().unwrap());
    let c = derive_credentials(HashAlgo::Sha512, "I\u{00AD}X", &salt, 16).unwrap();
    assert!(c.is_well_formed());
    assert_eq!(c.stored_key.len(), 64);
    // SASLprep removes the soft hyphen, so "IX" is the same password.
    assert!(verify_plain_password(&c, "IX"));
    assert!(!verify_plain_password(&c, "IY"));
    assert_eq!(
        derive_credentials(HashAlgo::Sha1, "", &salt, 16),
        Err(CredentialsError::InvalidPassword)
    );
    assert_eq!(
        derive_credentials(HashAlgo::Sha1, "a\u{0007}", &salt, 16),
        Err(CredentialsError::InvalidPassword)
    );
    assert_eq!(
        derive_credentials(HashAlgo::Sha1, "pw", &[], 16),
        Err(CredentialsError::EmptySalt)
    );
    assert_eq!(
        derive_credentials(HashAlgo::Sha1, "pw", &salt, 0),
        Err(CredentialsError::InvalidIterations)
    );
    assert!(!format!("{c:?}").contains("stored_key"));
}

#[test]
fn mechanism_names_and_offers() {
    for m in Mechanism::ALL {
        assert_eq!(Mechanism::from_name(m.name()), Some(m));
        assert_eq!(m.is_plus(), m.name().ends_with("-PLUS"));
        assert_eq!(m.is_scram(), m.name().starts_with("SCRAM-"));
        if let Some(h) = m.hash() {
            assert!(m.name().contains(h.name()));
        }
    }
    assert_eq!(Mechanism::from_name("scram-sha-1"), None);
    assert_eq!(Mechanism::from_name("DIGEST-MD5"), None);
    let cb = ChannelBindingInfo::none().with(ChannelBindingType::TlsExporter, vec![0; 32]);
    assert_eq!(Mechanism::offered(&cb, true), Mechanism::ALL.to_vec());
    assert_eq!(
        Mechanism::offered(&ChannelBindingInfo::none(), false),
        vec![
            Mechanism::ScramSha512,
            Mechanism::ScramSha256,
            Mechanism::ScramSha1
        ]
    );
    for t in ChannelBindingType::ALL {
        assert_eq!(ChannelBindingType::from_name(t.name()), Some(t));
    }
    assert_eq!(
        SaslFailureReason::InvalidAuthzid.as_str(),
        "invalid-authzid"
    );
    assert_eq!(
        SaslFailureReason::TemporaryAuthFailure.to_string(),
        "temporary-auth-failure"
    );
}

#[test]
fn payload_encoding() {
    assert_eq!(decode_payload("="), Ok(Vec::new()));
    assert_eq!(decode_payload(""), Ok(Vec::new()));
    assert_eq!(decode_payload("biws"), Ok(b"n,,".to_vec()));
    assert_eq!(decode_payload("bi*s"), Err(PayloadError::IncorrectEncoding));
    assert_eq!(
        decode_payload("biw").map_err(|e| e.reason()),
        Err(SaslFailureReason::IncorrectEncoding)
    );
    assert_eq!(encode_payload(b""), "=");
    assert_eq!(encode_payload(b"n,,"), "biws");
}

proptest! {
    #[test]
    fn arbitrary_client_messages_never_panic(
        first in proptest::collection::vec(any::<u8>(), 0..256),
        last in proptest::collection::vec(any::<u8>(), 0..256),
        which in 0usize..Mechanism::ALL.len(),
    ) {
        let cb = ChannelBindingInfo::none().with(ChannelBindingType::TlsExporter, vec![5; 32]);
        let mechanism = Mechanism::ALL[which];
        if let Step::NeedCredentials(need) = server().start(mechanism, &cb, Some("x"), &first) {
            // PLAIN would run PBKDF2 here; its parsing is what is under test.
            if !need.is_expensive()
                && let Step::Challenge { next, .. } = need.with_credentials(None)
            {
                let _ = next.client_final(&last);
            }
        }
        // And a real session fed garbage as its final message.
        let (_, next) = challenge(need_of(b"n,,n=u,r=abc").with_credentials(None));
        let _ = next.client_final(&last);
    }

    #[test]
    fn near_valid_messages_never_panic(s in "[nyp=,a-zA-Z0-9=+/]{0,80}") {
        let cb = ChannelBindingInfo::none().with(ChannelBindingType::TlsExporter, vec![5; 32]);
        for mechanism in [Mechanism::ScramSha1, Mechanism::ScramSha1Plus] {
            let _ = server().start(mechanism, &cb, None, s.as_bytes());
        }
        let (_, next) = challenge(need_of(b"n,,n=u,r=abc").with_credentials(None));
        let _ = next.client_final(s.as_bytes());
    }
}
