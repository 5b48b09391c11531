//! The server side of an exchange as an explicit state machine.
//!
//! States are types: [`NeedCredentials`] (the client's first message is accepted, the caller
//! must look up the user) and [`AwaitingClientFinal`] (SCRAM's server-first-message is sent).
//! Every transition consumes its state and returns a [`Step`], so the only way forward is the
//! protocol's order.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use subtle::ConstantTimeEq;

use crate::plain::{parse_plain, prepare_username};
use crate::scram::{CbFlag, Fail, malformed, parse_client_final, parse_client_first};
use crate::{
    ChannelBindingInfo, ChannelBindingType, DEFAULT_ITERATIONS, HashAlgo, Mechanism, SALT_LEN,
    SaslFailureReason, ScramCredentials, crypto, verify_plain_password,
};

/// The longest client message accepted, in bytes. Real SCRAM and PLAIN messages are a few hundred
/// bytes; this bounds the work and memory a client can cause.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Random bytes in the server's nonce part (24 base64 characters).
const SERVER_NONCE_BYTES: usize = 18;

/// What the caller does next.
#[derive(Debug)]
pub enum Step {
    /// Look up the credentials of `need.username()` for `need.hash()` and call
    /// [`NeedCredentials::with_credentials`] (with `None` when there is no such user).
    NeedCredentials(NeedCredentials),
    /// Send `data` in `<challenge/>`, then feed the client's `<response/>` to `next`.
    Challenge {
        /// The challenge bytes (SCRAM's server-first-message).
        data: Vec<u8>,
        /// The state waiting for the client's reply.
        next: AwaitingClientFinal,
    },
    /// Authenticated. Send `<success/>` with `additional_data` (SCRAM's server-final-message
    /// `v=…`; `None` for PLAIN).
    Success {
        /// The SASLprep'd user name the client authenticated as.
        username: String,
        /// The authorization identity the client asked for, already checked to be the user's own
        /// bare JID.
        authzid: Option<String>,
        /// The data for `<success/>`.
        additional_data: Option<Vec<u8>>,
    },
    /// Failed. Send `<failure/>` with `reason`. `detail` is for logs; it never says whether the
    /// user exists.
    Failure {
        /// The RFC 6120 §6.5 condition.
        reason: SaslFailureReason,
        /// A short, fixed description for logs and metrics.
        detail: &'static str,
    },
}

impl From<Fail> for Step {
    fn from(f: Fail) -> Self {
        Step::Failure {
            reason: f.reason,
            detail: f.detail,
        }
    }
}

fn fail(reason: SaslFailureReason, detail: &'static str) -> Step {
    Step::Failure { reason, detail }
}

/// Server-wide SASL settings, built once from configuration and shared by all streams.
#[derive(Clone)]
pub struct SaslServer {
    fake_salt_key: Arc<[u8]>,
    fake_iterations: u32,
}

impl fmt::Debug for SaslServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslServer")
            .field("fake_iterations", &self.fake_iterations)
            .finish_non_exhaustive()
    }
}

impl SaslServer {
    /// `fake_salt_key` is a secret, the same on every node of the cluster and stable across
    /// restarts: unknown users get salts derived from it, so that asking twice, or asking another
    /// node, returns the same salt, as for a real user. Without the secret an attacker cannot tell
    /// a fake salt from a real one.
    pub fn new(fake_salt_key: impl Into<Vec<u8>>) -> Self {
        Self {
            fake_salt_key: Arc::from(fake_salt_key.into()),
            fake_iterations: DEFAULT_ITERATIONS,
        }
    }

    /// The iteration count shown to unknown users; set it to the count new accounts get, so that
    /// it does not stand out. Zero is raised to one.
    pub fn with_fake_iterations(mut self, iterations: u32) -> Self {
        self.fake_iterations = iterations.max(1);
        self
    }

    /// Starts an exchange with the client's first message: the initial response of `<auth/>`,
    /// or, when `<auth/>` had none, the reply to the empty challenge the edge sent.
    ///
    /// `channel_binding` describes the stream's TLS connection (empty without TLS); the edge must
    /// advertise `-PLUS` mechanisms exactly when it is non-empty. `domain` is the stream's domain,
    /// used to accept an authzid equal to the user's bare JID `username@domain`; without it every
    /// authzid is refused.
    pub fn start(
        &self,
        mechanism: Mechanism,
        channel_binding: &ChannelBindingInfo,
        domain: Option<&str>,
        client_first: &[u8],
    ) -> Step {
        match self.try_start(mechanism, channel_binding, domain, client_first) {
            Ok(need) => Step::NeedCredentials(need),
            Err(f) => f.into(),
        }
    }

    fn try_start(
        &self,
        mechanism: Mechanism,
        channel_binding: &ChannelBindingInfo,
        domain: Option<&str>,
        msg: &[u8],
    ) -> Result<NeedCredentials, Fail> {
        if msg.len() > MAX_MESSAGE_LEN {
            return Err(malformed("message too long"));
        }
        if mechanism.is_plus() && !channel_binding.advertises_plus() {
            return Err(Fail {
                reason: SaslFailureReason::InvalidMechanism,
                detail: "channel binding is not available on this stream",
            });
        }
        let Some(hash) = mechanism.hash() else {
            let plain = parse_plain(msg)?;
            check_authzid(plain.authzid.as_deref(), &plain.username, domain)?;
            return Ok(NeedCredentials {
                mechanism,
                username: plain.username,
                authzid: plain.authzid,
                fake_salt_key: self.fake_salt_key.clone(),
                fake_iterations: self.fake_iterations,
                pending: Pending::Plain {
                    password: plain.password,
                },
            });
        };

        let msg = std::str::from_utf8(msg).map_err(|_| malformed("message is not UTF-8"))?;
        let first = parse_client_first(msg)?;
        let cb_data = match (first.flag, mechanism.is_plus()) {
            (CbFlag::Binding(name), true) => {
                let data = ChannelBindingType::from_name(name)
                    .and_then(|kind| channel_binding.data(kind))
                    .ok_or(malformed("channel-binding type not offered"))?;
                data.to_vec()
            }
            (CbFlag::Binding(_), false) => {
                return Err(malformed(
                    "channel binding requested with a non-PLUS mechanism",
                ));
            }
            (_, true) => return Err(malformed("PLUS mechanism without channel binding")),
            (CbFlag::ClientOnly, false) if channel_binding.advertises_plus() => {
                // RFC 5802 §6: the client would have bound, and thinks we cannot; we advertised
                // PLUS, so someone stripped it in between.
                return Err(Fail {
                    reason: SaslFailureReason::NotAuthorized,
                    detail: "channel-binding downgrade detected",
                });
            }
            (CbFlag::ClientOnly | CbFlag::NotSupported, false) => Vec::new(),
        };
        let username = prepare_username(&first.username)?;
        check_authzid(first.authzid.as_deref(), &username, domain)?;

        let mut expected_cb = first.gs2_header.as_bytes().to_vec();
        expected_cb.extend_from_slice(&cb_data);
        Ok(NeedCredentials {
            mechanism,
            username,
            authzid: first.authzid,
            fake_salt_key: self.fake_salt_key.clone(),
            fake_iterations: self.fake_iterations,
            pending: Pending::Scram {
                hash,
                client_first_bare: first.bare.to_owned(),
                client_nonce: first.nonce.to_owned(),
                expected_cb,
            },
        })
    }
}

/// The authzid, when given, must be the user's own bare JID (`username@domain`, domain compared
/// case-insensitively). Finer JID comparison (PRECIS) is left to the caller's account mapping.
fn check_authzid(authzid: Option<&str>, username: &str, domain: Option<&str>) -> Result<(), Fail> {
    let Some(authzid) = authzid else {
        return Ok(());
    };
    let own = domain.is_some_and(|domain| {
        authzid
            .split_once('@')
            .is_some_and(|(local, dom)| local == username && dom.eq_ignore_ascii_case(domain))
    });
    if own {
        Ok(())
    } else {
        Err(Fail {
            reason: SaslFailureReason::InvalidAuthzid,
            detail: "authzid is not the user's own JID",
        })
    }
}

/// State: the client's first message is accepted; the caller must supply the user's credentials.
pub struct NeedCredentials {
    mechanism: Mechanism,
    username: String,
    authzid: Option<String>,
    fake_salt_key: Arc<[u8]>,
    fake_iterations: u32,
    pending: Pending,
}

enum Pending {
    Scram {
        hash: HashAlgo,
        client_first_bare: String,
        client_nonce: String,
        /// What `c=` must decode to: the GS2 header, then the channel-binding data.
        expected_cb: Vec<u8>,
    },
    Plain {
        password: String,
    },
}

impl fmt::Debug for NeedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NeedCredentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("authzid", &self.authzid)
            .finish_non_exhaustive()
    }
}

impl NeedCredentials {
    /// The mechanism of this exchange.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// The user name, SASLprep'd and with `=2C`/`=3D` decoded: the account to look up.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The authorization identity, already checked to be the user's own bare JID.
    pub fn authzid(&self) -> Option<&str> {
        self.authzid.as_deref()
    }

    /// Which stored credentials to look up. SCRAM needs the mechanism's hash; PLAIN can verify
    /// against any, and asks for SHA-256.
    pub fn hash(&self) -> HashAlgo {
        self.mechanism.hash().unwrap_or(HashAlgo::Sha256)
    }

    /// Whether [`NeedCredentials::with_credentials`] runs PBKDF2 (PLAIN does, SCRAM does not), so
    /// the caller should run it on a blocking thread.
    pub fn is_expensive(&self) -> bool {
        matches!(self.pending, Pending::Plain { .. })
    }

    /// Continues with the stored credentials, or `None` when the user does not exist (which is
    /// then revealed only as `not-authorized` at the very end, like a wrong password).
    ///
    /// SCRAM: returns [`Step::Challenge`] with the server-first-message. PLAIN: verifies the
    /// password and returns [`Step::Success`] or [`Step::Failure`].
    pub fn with_credentials(self, credentials: Option<ScramCredentials>) -> Step {
        if self.is_expensive() {
            return self.finish(credentials, "");
        }
        let mut raw = [0u8; SERVER_NONCE_BYTES];
        if getrandom::fill(&mut raw).is_err() {
            return fail(
                SaslFailureReason::TemporaryAuthFailure,
                "random source failed",
            );
        }
        let nonce = STANDARD.encode(raw);
        self.finish(credentials, &nonce)
    }

    /// [`NeedCredentials::with_credentials`] with a given server nonce, so that published
    /// example exchanges can be reproduced byte for byte. Never use outside tests: the nonce
    /// must be fresh and unpredictable.
    #[doc(hidden)]
    pub fn with_credentials_and_nonce(
        self,
        credentials: Option<ScramCredentials>,
        server_nonce: &str,
    ) -> Step {
        self.finish(credentials, server_nonce)
    }

    fn finish(self, credentials: Option<ScramCredentials>, server_nonce: &str) -> Step {
        let NeedCredentials {
            mechanism,
            username,
            authzid,
            fake_salt_key,
            fake_iterations,
            pending,
        } = self;
        match pending {
            Pending::Plain { password } => {
                let ok = match credentials {
                    Some(creds) => verify_plain_password(&creds, &password),
                    None => {
                        // Same work as a real check, so timing does not reveal the user is unknown.
                        let fake = fake_credentials(
                            &fake_salt_key,
                            HashAlgo::Sha256,
                            &username,
                            fake_iterations,
                        );
                        let _ = verify_plain_password(&fake, &password);
                        false
                    }
                };
                if ok {
                    Step::Success {
                        username,
                        authzid,
                        additional_data: None,
                    }
                } else {
                    fail(SaslFailureReason::NotAuthorized, "authentication failed")
                }
            }
            Pending::Scram {
                hash,
                client_first_bare,
                client_nonce,
                expected_cb,
            } => {
                let (credentials, known_user) = match credentials {
                    Some(creds) => {
                        if creds.hash != hash || !creds.is_well_formed() {
                            return fail(
                                SaslFailureReason::TemporaryAuthFailure,
                                "stored credentials unusable for this mechanism",
                            );
                        }
                        (creds, true)
                    }
                    None => (
                        fake_credentials(&fake_salt_key, hash, &username, fake_iterations),
                        false,
                    ),
                };
                if server_nonce.is_empty() || server_nonce.contains(',') {
                    return fail(SaslFailureReason::TemporaryAuthFailure, "bad server nonce");
                }
                let nonce = format!("{client_nonce}{server_nonce}");
                let server_first = format!(
                    "r={nonce},s={},i={}",
                    STANDARD.encode(&credentials.salt),
                    credentials.iterations
                );
                Step::Challenge {
                    data: server_first.clone().into_bytes(),
                    next: AwaitingClientFinal {
                        mechanism,
                        username,
                        authzid,
                        credentials,
                        known_user,
                        client_first_bare,
                        server_first,
                        nonce,
                        expected_cb,
                    },
                }
            }
        }
    }
}

/// Deterministic stand-in credentials for a user that does not exist: the salt is an HMAC of the
/// user name under the server's secret, so it is stable but unpredictable; the keys match no
/// password anyone knows.
fn fake_credentials(
    key: &[u8],
    hash: HashAlgo,
    username: &str,
    iterations: u32,
) -> ScramCredentials {
    let derive = |label: &str| {
        let mut input = Vec::with_capacity(label.len() + hash.name().len() + username.len() + 2);
        input.extend_from_slice(label.as_bytes());
        input.push(0);
        input.extend_from_slice(hash.name().as_bytes());
        input.push(0);
        input.extend_from_slice(username.as_bytes());
        input
    };
    let mut salt = crypto::hmac(HashAlgo::Sha256, key, &derive("starling fake salt"));
    salt.truncate(SALT_LEN);
    ScramCredentials {
        hash,
        salt,
        iterations,
        stored_key: crypto::hmac(hash, key, &derive("starling fake stored key")),
        server_key: crypto::hmac(hash, key, &derive("starling fake server key")),
    }
}

/// State: SCRAM's server-first-message was sent; waiting for the client-final-message.
pub struct AwaitingClientFinal {
    mechanism: Mechanism,
    username: String,
    authzid: Option<String>,
    credentials: ScramCredentials,
    known_user: bool,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    expected_cb: Vec<u8>,
}

impl fmt::Debug for AwaitingClientFinal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwaitingClientFinal")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl AwaitingClientFinal {
    /// The mechanism of this exchange.
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Verifies the client-final-message: channel binding, nonce, then the proof against
    /// `StoredKey` in constant time. An unknown user goes through the same checks and fails.
    pub fn client_final(self, msg: &[u8]) -> Step {
        if msg.len() > MAX_MESSAGE_LEN {
            return malformed("message too long").into();
        }
        let Ok(msg) = std::str::from_utf8(msg) else {
            return malformed("message is not UTF-8").into();
        };
        let last = match parse_client_final(msg) {
            Ok(m) => m,
            Err(f) => return f.into(),
        };
        if !bool::from(last.channel_binding.ct_eq(&self.expected_cb)) {
            return fail(
                SaslFailureReason::NotAuthorized,
                "channel-binding data mismatch",
            );
        }
        if last.nonce != self.nonce {
            return fail(SaslFailureReason::NotAuthorized, "nonce mismatch");
        }
        let hash = self.credentials.hash;
        if last.proof.len() != hash.output_len() {
            return malformed("proof has the wrong length").into();
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, last.without_proof
        );
        let client_signature =
            crypto::hmac(hash, &self.credentials.stored_key, auth_message.as_bytes());
        let client_key = crypto::xor(&last.proof, &client_signature);
        let proof_ok = crypto::hash(hash, &client_key).ct_eq(&self.credentials.stored_key);
        // Computed before the verdict so a fake exchange costs the same as a real one.
        let server_signature =
            crypto::hmac(hash, &self.credentials.server_key, auth_message.as_bytes());
        if !(bool::from(proof_ok) && self.known_user) {
            return fail(SaslFailureReason::NotAuthorized, "authentication failed");
        }
        Step::Success {
            username: self.username,
            authzid: self.authzid,
            additional_data: Some(format!("v={}", STANDARD.encode(server_signature)).into_bytes()),
        }
    }
}
