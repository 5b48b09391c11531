//! The SCRAM primitives of RFC 5802 §2.2, dispatched on [`HashAlgo`].

use hmac::{EagerHash, Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

use crate::HashAlgo;

/// `HMAC(key, data)`.
pub(crate) fn hmac(algo: HashAlgo, key: &[u8], data: &[u8]) -> Vec<u8> {
    match algo {
        HashAlgo::Sha1 => hmac_with::<Sha1>(key, data),
        HashAlgo::Sha256 => hmac_with::<Sha256>(key, data),
        HashAlgo::Sha512 => hmac_with::<Sha512>(key, data),
    }
}

fn hmac_with<D: EagerHash>(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC hashes keys longer than a block and pads shorter ones, so every key length is valid
    // (RFC 2104 §2); the error branch of `new_from_slice` exists only for fixed-key MACs.
    let mut mac = match <Hmac<D> as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// `H(data)`.
pub(crate) fn hash(algo: HashAlgo, data: &[u8]) -> Vec<u8> {
    match algo {
        HashAlgo::Sha1 => Sha1::digest(data).to_vec(),
        HashAlgo::Sha256 => Sha256::digest(data).to_vec(),
        HashAlgo::Sha512 => Sha512::digest(data).to_vec(),
    }
}

/// `Hi(password, salt, i)`, which is PBKDF2 with HMAC as the PRF and one output block.
/// `iterations` must be at least 1 (callers check).
pub(crate) fn hi(algo: HashAlgo, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; algo.output_len()];
    match algo {
        HashAlgo::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out),
        HashAlgo::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out),
        HashAlgo::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out),
    }
    out
}

/// `ClientKey = HMAC(SaltedPassword, "Client Key")`.
pub(crate) fn client_key(algo: HashAlgo, salted_password: &[u8]) -> Vec<u8> {
    hmac(algo, salted_password, b"Client Key")
}

/// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
pub(crate) fn server_key(algo: HashAlgo, salted_password: &[u8]) -> Vec<u8> {
    hmac(algo, salted_password, b"Server Key")
}

/// `a XOR b` over the shorter of the two (callers pass equal lengths).
pub(crate) fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}
