//! The client side of SASL for the load generator: SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802,
//! RFC 7677) without channel binding (gs2 header `n,,`), and PLAIN (RFC 4616), as used in
//! RFC 6120 §6.
//!
//! Sans-IO: the caller moves the base64 payloads between this and the stream. The salted
//! password is cached per account and salt, as real clients do, so a login storm measures the
//! server's work and not the generator's PBKDF2.

use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// A SASL mechanism the generator can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Mechanism {
    /// RFC 4616: the password in the clear (inside TLS).
    Plain,
    /// RFC 5802 with SHA-1.
    ScramSha1,
    /// RFC 7677.
    ScramSha256,
}

impl Mechanism {
    /// The IANA name sent in `<auth mechanism='...'/>`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
        }
    }

    /// Parses a name as offered in `<mechanisms/>` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Mechanism> {
        match name.to_ascii_uppercase().as_str() {
            "PLAIN" => Some(Mechanism::Plain),
            "SCRAM-SHA-1" => Some(Mechanism::ScramSha1),
            "SCRAM-SHA-256" => Some(Mechanism::ScramSha256),
            _ => None,
        }
    }

    /// The best SCRAM mechanism among those offered, else PLAIN if offered.
    pub fn choose(offered: &[String], wanted: Option<Mechanism>) -> Option<Mechanism> {
        let offered: Vec<Mechanism> = offered.iter().filter_map(|m| Self::from_name(m)).collect();
        match wanted {
            Some(w) => offered.contains(&w).then_some(w),
            None => [
                Mechanism::ScramSha256,
                Mechanism::ScramSha1,
                Mechanism::Plain,
            ]
            .into_iter()
            .find(|m| offered.contains(m)),
        }
    }
}

/// Why a SASL exchange failed on the client side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslClientError {
    /// The server's challenge was not valid base64 or not a SCRAM server-first message.
    #[error("malformed server message: {0}")]
    Malformed(&'static str),
    /// The server nonce does not start with ours (RFC 5802 §5.1).
    #[error("server nonce does not extend the client nonce")]
    Nonce,
    /// The iteration count is zero or absurd.
    #[error("unacceptable iteration count")]
    Iterations,
    /// The server signature in `<success/>` does not verify: the server does not know the key.
    #[error("server signature mismatch")]
    ServerSignature,
    /// The server sent `e=...` in its final message.
    #[error("server error: {0}")]
    ServerError(String),
    /// A step arrived out of order.
    #[error("unexpected step")]
    State,
}

/// One cached derivation: mechanism, salt, iteration count, `SaltedPassword`.
#[derive(Debug)]
struct Salted {
    mech: Mechanism,
    salt: Vec<u8>,
    iter: u32,
    salted: Vec<u8>,
}

/// A cached `SaltedPassword` for one salt and iteration count.
#[derive(Debug, Default)]
pub struct SaltCache {
    entry: Mutex<Option<Salted>>,
}

impl SaltCache {
    fn get_or_compute(&self, mech: Mechanism, password: &[u8], salt: &[u8], iter: u32) -> Vec<u8> {
        if let Ok(guard) = self.entry.lock()
            && let Some(hit) = guard.as_ref()
            && hit.mech == mech
            && hit.salt == salt
            && hit.iter == iter
        {
            return hit.salted.clone();
        }
        let salted = hi(mech, password, salt, iter);
        if let Ok(mut guard) = self.entry.lock() {
            *guard = Some(Salted {
                mech,
                salt: salt.to_vec(),
                iter,
                salted: salted.clone(),
            });
        }
        salted
    }
}

fn hmac(mech: Mechanism, key: &[u8], data: &[u8]) -> Vec<u8> {
    fn with<M: Mac + KeyInit>(key: &[u8], data: &[u8]) -> Vec<u8> {
        match <M as KeyInit>::new_from_slice(key) {
            Ok(mut mac) => {
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            // HMAC takes keys of any length (RFC 2104 §2).
            Err(_) => Vec::new(),
        }
    }
    match mech {
        Mechanism::ScramSha1 => with::<hmac::Hmac<Sha1>>(key, data),
        _ => with::<hmac::Hmac<Sha256>>(key, data),
    }
}

fn hash(mech: Mechanism, data: &[u8]) -> Vec<u8> {
    match mech {
        Mechanism::ScramSha1 => Sha1::digest(data).to_vec(),
        _ => Sha256::digest(data).to_vec(),
    }
}

fn hi(mech: Mechanism, password: &[u8], salt: &[u8], iter: u32) -> Vec<u8> {
    match mech {
        Mechanism::ScramSha1 => {
            let mut out = vec![0u8; 20];
            pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iter, &mut out);
            out
        }
        _ => {
            let mut out = vec![0u8; 32];
            pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iter, &mut out);
            out
        }
    }
}

/// RFC 5802 §5.1: `=` and `,` in a username are escaped.
fn escape_username(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// SASLprep (RFC 4013) of a password, falling back to the raw bytes when it is refused, so the
/// server gives the verdict.
fn prep(password: &str) -> String {
    stringprep::saslprep(password)
        .map(|p| p.into_owned())
        .unwrap_or_else(|_| password.to_owned())
}

/// The base64 initial response of PLAIN: `\0user\0password`.
pub fn plain_initial(username: &str, password: &str) -> String {
    let mut raw = Vec::with_capacity(username.len() + password.len() + 2);
    raw.push(0);
    raw.extend_from_slice(username.as_bytes());
    raw.push(0);
    raw.extend_from_slice(password.as_bytes());
    B64.encode(raw)
}

#[derive(Debug)]
enum State {
    Start,
    SentFirst { client_first_bare: String },
    SentFinal { server_signature: Vec<u8> },
    Done,
}

/// One SCRAM exchange from the client side.
#[derive(Debug)]
pub struct ScramClient<'a> {
    mech: Mechanism,
    username: String,
    password: String,
    nonce: String,
    cache: &'a SaltCache,
    state: State,
}

impl<'a> ScramClient<'a> {
    /// A new exchange for `username` (the localpart) with a fresh random nonce.
    pub fn new(mech: Mechanism, username: &str, password: &str, cache: &'a SaltCache) -> Self {
        let mut raw = [0u8; 18];
        // A nonce without randomness would still work against a server; it must only be unique.
        if getrandom::fill(&mut raw).is_err() {
            raw.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        }
        Self::with_nonce(mech, username, password, &B64.encode(raw), cache)
    }

    /// A new exchange with a given nonce (tests).
    pub fn with_nonce(
        mech: Mechanism,
        username: &str,
        password: &str,
        nonce: &str,
        cache: &'a SaltCache,
    ) -> Self {
        ScramClient {
            mech,
            username: escape_username(username),
            password: prep(password),
            nonce: nonce.to_owned(),
            cache,
            state: State::Start,
        }
    }

    /// The base64 client-first message (the initial response).
    pub fn client_first(&mut self) -> String {
        let bare = format!("n={},r={}", self.username, self.nonce);
        let msg = format!("n,,{bare}");
        self.state = State::SentFirst {
            client_first_bare: bare,
        };
        B64.encode(msg)
    }

    /// Takes the base64 server-first challenge; returns the base64 client-final response.
    pub fn client_final(&mut self, challenge_b64: &str) -> Result<String, SaslClientError> {
        let State::SentFirst { client_first_bare } = &self.state else {
            return Err(SaslClientError::State);
        };
        let raw = B64
            .decode(challenge_b64.trim())
            .map_err(|_| SaslClientError::Malformed("base64"))?;
        let server_first =
            String::from_utf8(raw).map_err(|_| SaslClientError::Malformed("utf-8"))?;
        let (mut nonce, mut salt, mut iter) = (None, None, None);
        for part in server_first.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = Some(v);
            } else if let Some(v) = part.strip_prefix("i=") {
                iter = Some(v);
            } else if part.starts_with("m=") {
                return Err(SaslClientError::Malformed("mandatory extension"));
            }
        }
        let nonce = nonce.ok_or(SaslClientError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(SaslClientError::Nonce);
        }
        let salt = B64
            .decode(salt.ok_or(SaslClientError::Malformed("no salt"))?)
            .map_err(|_| SaslClientError::Malformed("salt"))?;
        let iter: u32 = iter
            .ok_or(SaslClientError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| SaslClientError::Iterations)?;
        if iter == 0 || iter > 10_000_000 {
            return Err(SaslClientError::Iterations);
        }
        let salted = self
            .cache
            .get_or_compute(self.mech, self.password.as_bytes(), &salt, iter);
        let client_key = hmac(self.mech, &salted, b"Client Key");
        let stored_key = hash(self.mech, &client_key);
        // gs2 header "n,," base64 is "biws".
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(self.mech, &stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(self.mech, &salted, b"Server Key");
        let server_signature = hmac(self.mech, &server_key, auth_message.as_bytes());
        self.state = State::SentFinal { server_signature };
        Ok(B64.encode(format!("{without_proof},p={}", B64.encode(proof))))
    }

    /// Verifies the server-final message carried in `<success/>` (base64).
    pub fn verify_success(&mut self, success_b64: &str) -> Result<(), SaslClientError> {
        let State::SentFinal { server_signature } = &self.state else {
            return Err(SaslClientError::State);
        };
        let raw = B64
            .decode(success_b64.trim())
            .map_err(|_| SaslClientError::Malformed("base64"))?;
        let text = String::from_utf8(raw).map_err(|_| SaslClientError::Malformed("utf-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(SaslClientError::ServerError(e.to_owned()));
        }
        let v = text
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or(SaslClientError::Malformed("no verifier"))?;
        let v = B64
            .decode(v)
            .map_err(|_| SaslClientError::Malformed("verifier"))?;
        if &v != server_signature {
            return Err(SaslClientError::ServerSignature);
        }
        self.state = State::Done;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        B64.encode(s)
    }

    /// RFC 7677 §3: the SCRAM-SHA-256 example exchange.
    #[test]
    fn rfc7677_example() {
        let cache = SaltCache::default();
        let mut c = ScramClient::with_nonce(
            Mechanism::ScramSha256,
            "user",
            "pencil",
            "rOprNGfwEbeRWgbNEkqO",
            &cache,
        );
        assert_eq!(c.client_first(), b64("n,,n=user,r=rOprNGfwEbeRWgbNEkqO"));
        let fin = c
            .client_final(&b64("r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"))
            .unwrap();
        assert_eq!(
            fin,
            b64(
                "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
            )
        );
        assert_eq!(
            c.verify_success(&b64("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")),
            Ok(())
        );
    }

    /// RFC 5802 §5: the SCRAM-SHA-1 example exchange.
    #[test]
    fn rfc5802_example() {
        let cache = SaltCache::default();
        let mut c = ScramClient::with_nonce(
            Mechanism::ScramSha1,
            "user",
            "pencil",
            "fyko+d2lbbFgONRv9qkxdawL",
            &cache,
        );
        c.client_first();
        let fin = c
            .client_final(&b64(
                "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
            ))
            .unwrap();
        assert_eq!(
            fin,
            b64(
                "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
            )
        );
        assert_eq!(
            c.verify_success(&b64("v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")),
            Ok(())
        );
        assert_eq!(
            c.verify_success(&b64("v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")),
            Err(SaslClientError::State)
        );
    }

    #[test]
    fn rejects_bad_server_messages() {
        let cache = SaltCache::default();
        let mut c = ScramClient::with_nonce(Mechanism::ScramSha256, "u", "p", "abc", &cache);
        c.client_first();
        assert_eq!(
            c.client_final(&b64("r=xyz123,s=QSXCR+Q6sek8bf92,i=4096")),
            Err(SaslClientError::Nonce)
        );
        assert_eq!(
            c.client_final(&b64("r=abcdef,s=QSXCR+Q6sek8bf92,i=0")),
            Err(SaslClientError::Iterations)
        );
        assert_eq!(
            c.client_final("!!!"),
            Err(SaslClientError::Malformed("base64"))
        );
        let fin = c.client_final(&b64("r=abcdef,s=QSXCR+Q6sek8bf92,i=16"));
        assert!(fin.is_ok());
        assert_eq!(
            c.verify_success(&b64("v=AAAA")),
            Err(SaslClientError::ServerSignature)
        );
    }

    #[test]
    fn chooses_best_offered() {
        let offered: Vec<String> = [
            "PLAIN",
            "SCRAM-SHA-1",
            "SCRAM-SHA-256-PLUS",
            "SCRAM-SHA-256",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            Mechanism::choose(&offered, None),
            Some(Mechanism::ScramSha256)
        );
        assert_eq!(
            Mechanism::choose(&offered[..2], None),
            Some(Mechanism::ScramSha1)
        );
        assert_eq!(
            Mechanism::choose(&offered[..1], Some(Mechanism::ScramSha256)),
            None
        );
        assert_eq!(plain_initial("a", "b"), B64.encode(b"\0a\0b"));
        assert_eq!(escape_username("a=b,c"), "a=3Db=2Cc");
    }
}
