//! The client side of SCRAM-SHA-256 (RFC 5802 §3 and §5, RFC 7677), without channel binding
//! (GS2 flag `n`: this client does not support it). Independent of `starling-sasl` on purpose:
//! the two must agree because they follow the RFC, not because they share code.
//!
//! Usernames are escaped (`=` → `=3D`, `,` → `=2C`); SASLprep of the password is not applied,
//! so tests use ASCII passwords, for which it is the identity.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = hmac::Hmac<Sha256>;

/// The GS2 header this client sends: no channel binding, no authorization identity.
const GS2_HEADER: &str = "n,,";

/// Iteration counts above this are refused, so a hostile server cannot stall a test.
const MAX_ITERATIONS: u32 = 1_000_000;

/// One SCRAM-SHA-256 exchange, from the client's side.
#[derive(Debug, Clone)]
pub struct ScramClient {
    client_first_bare: String,
    client_nonce: String,
    password: String,
    expected_server_signature: Option<Vec<u8>>,
}

impl ScramClient {
    /// A new exchange with a random 24-byte client nonce.
    pub fn new(username: &str, password: &str) -> ScramClient {
        let mut raw = [0u8; 24];
        // A test nonce needs no cryptographic quality; a failing RNG leaves zeros.
        let _ = getrandom::fill(&mut raw);
        ScramClient::with_nonce(username, password, &B64.encode(raw))
    }

    /// A new exchange with a chosen client nonce (for test vectors).
    pub fn with_nonce(username: &str, password: &str, nonce: &str) -> ScramClient {
        let escaped = username.replace('=', "=3D").replace(',', "=2C");
        ScramClient {
            client_first_bare: format!("n={escaped},r={nonce}"),
            client_nonce: nonce.to_owned(),
            password: password.to_owned(),
            expected_server_signature: None,
        }
    }

    /// The client-first-message, to send base64-encoded in `<auth/>`.
    pub fn client_first(&self) -> String {
        format!("{GS2_HEADER}{}", self.client_first_bare)
    }

    /// Processes the server-first-message and returns the client-final-message.
    pub fn client_final(&mut self, server_first: &str) -> Result<String, String> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("m", _)) => return Err("server sent a mandatory extension (m=)".into()),
                Some(("e", v)) => return Err(format!("server error e={v}")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or("server-first-message has no nonce")?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() <= self.client_nonce.len() {
            return Err(format!(
                "server nonce {nonce:?} does not extend the client nonce {:?}",
                self.client_nonce
            ));
        }
        let salt = B64
            .decode(salt.ok_or("server-first-message has no salt")?)
            .map_err(|e| format!("salt is not base64: {e}"))?;
        let iterations: u32 = iterations
            .ok_or("server-first-message has no iteration count")?
            .parse()
            .map_err(|_| "iteration count is not a number")?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(format!("iteration count {iterations} out of range"));
        }

        let without_proof = format!("c={},r={nonce}", B64.encode(GS2_HEADER));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(self.password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(&client_key);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message (`v=` must carry the server signature).
    pub fn verify_server_final(&self, server_final: &str) -> Result<(), String> {
        let expected = self
            .expected_server_signature
            .as_ref()
            .ok_or("server-final-message before server-first-message")?;
        for attr in server_final.split(',') {
            match attr.split_once('=') {
                Some(("e", v)) => return Err(format!("server error e={v}")),
                Some(("v", v)) => {
                    let got = B64
                        .decode(v)
                        .map_err(|e| format!("server signature is not base64: {e}"))?;
                    return if &got == expected {
                        Ok(())
                    } else {
                        Err("server signature does not verify".into())
                    };
                }
                _ => {}
            }
        }
        Err(format!(
            "server-final-message {server_final:?} has no v= or e="
        ))
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length (RFC 2104 §2), so this constructor cannot fail.
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else {
        return Vec::new();
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SCRAM-SHA-256 example of RFC 7677 §3.
    #[test]
    fn rfc7677_example() {
        let mut client = ScramClient::with_nonce("user", "pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(client.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final = client.client_final(server_first).unwrap();
        assert_eq!(
            client_final,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
             p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        client
            .verify_server_final("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(
            client
                .verify_server_final("v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
                .is_err()
        );
        assert_eq!(
            client.verify_server_final("e=invalid-proof").unwrap_err(),
            "server error e=invalid-proof"
        );
    }

    #[test]
    fn usernames_are_escaped() {
        let client = ScramClient::with_nonce("a=b,c", "p", "n");
        assert_eq!(client.client_first(), "n,,n=a=3Db=2Cc,r=n");
    }

    #[test]
    fn bad_server_first_messages_are_refused() {
        let mut client = ScramClient::with_nonce("u", "p", "abc");
        for bad in [
            "r=xyz123,s=AAAA,i=4096",
            "r=abc,s=AAAA,i=4096",
            "r=abcdef,s=!!!,i=4096",
            "r=abcdef,s=AAAA,i=0",
            "r=abcdef,s=AAAA,i=99999999",
            "r=abcdef,s=AAAA",
            "m=ext,r=abcdef,s=AAAA,i=1",
            "e=other-error",
        ] {
            assert!(client.client_final(bad).is_err(), "{bad} accepted");
        }
        assert!(client.verify_server_final("v=AAAA").is_err());
    }

    #[test]
    fn random_nonces_differ() {
        let a = ScramClient::new("u", "p").client_first();
        let b = ScramClient::new("u", "p").client_first();
        assert_ne!(a, b);
    }
}
