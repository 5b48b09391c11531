//! A minimal SCRAM-SHA-256(-PLUS) client (RFC 5802, RFC 7677), written for the tests: it
//! computes the client proof and checks the server signature.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// One exchange, from the client's side.
#[derive(Debug)]
pub(crate) struct ScramClient {
    user: String,
    password: String,
    nonce: String,
    gs2_header: String,
    cb_data: Vec<u8>,
    auth_message: String,
    server_signature: Vec<u8>,
}

impl ScramClient {
    /// Without channel binding (`n,,`).
    pub(crate) fn new(user: &str, password: &str) -> Self {
        Self::with_binding(user, password, "n,,", Vec::new())
    }

    /// With a GS2 header such as `p=tls-exporter,,` and its binding data.
    pub(crate) fn with_binding(user: &str, password: &str, gs2: &str, data: Vec<u8>) -> Self {
        ScramClient {
            user: user.to_owned(),
            password: password.to_owned(),
            nonce: "fyko+d2lbbFgONRv9qkxdawL".to_owned(),
            gs2_header: gs2.to_owned(),
            cb_data: data,
            auth_message: String::new(),
            server_signature: Vec::new(),
        }
    }

    fn first_bare(&self) -> String {
        format!("n={},r={}", self.user, self.nonce)
    }

    /// The client-first-message, base64.
    pub(crate) fn first(&self) -> String {
        STANDARD.encode(format!("{}{}", self.gs2_header, self.first_bare()))
    }

    /// The client-final-message (base64) for the server-first-message (base64).
    pub(crate) fn finish(&mut self, server_first_b64: &str) -> String {
        let server_first =
            String::from_utf8(STANDARD.decode(server_first_b64).expect("base64")).expect("utf8");
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iterations = 0u32;
        for part in server_first.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = v;
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = STANDARD.decode(v).expect("salt");
            } else if let Some(v) = part.strip_prefix("i=") {
                iterations = v.parse().expect("iterations");
            }
        }
        assert!(
            nonce.starts_with(&self.nonce),
            "server nonce must extend ours"
        );
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(self.password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(&client_key).to_vec();
        let mut cb = self.gs2_header.as_bytes().to_vec();
        cb.extend_from_slice(&self.cb_data);
        let without_proof = format!("c={},r={}", STANDARD.encode(&cb), nonce);
        self.auth_message = format!("{},{},{}", self.first_bare(), server_first, without_proof);
        let signature = hmac(&stored_key, self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = hmac(&server_key, self.auth_message.as_bytes());
        STANDARD.encode(format!("{without_proof},p={}", STANDARD.encode(proof)))
    }

    /// Whether `<success/>`'s data (base64 `v=…`) proves the server knew our keys.
    pub(crate) fn verify(&self, success_b64: &str) -> bool {
        let Ok(data) = STANDARD.decode(success_b64) else {
            return false;
        };
        let expected = format!("v={}", STANDARD.encode(&self.server_signature));
        data == expected.as_bytes()
    }
}

/// The text between `<tag …>` and `</tag>` in `xml`, for picking SASL payloads out of output.
pub(crate) fn element_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}"))?;
    let rest = &xml[start..];
    let open_end = rest.find('>')?;
    let body = &rest[open_end + 1..];
    let end = body.find(&format!("</{tag}>"))?;
    Some(&body[..end])
}
