//! Stored SCRAM credentials (RFC 5802 §3): what the store keeps instead of a password.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::{CredentialsError, HashAlgo, crypto};

/// Length of the salts [`new_salt`] makes.
pub const SALT_LEN: usize = 16;

/// Iteration count for new credentials: RFC 7677 §4 asks for at least 4096.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// The server's SCRAM record for one user and one hash: salt, iteration count, `StoredKey` and
/// `ServerKey`. Never the password, nor `SaltedPassword`.
///
/// `Debug` hides the keys: `StoredKey` lets an attacker mount an offline dictionary attack and
/// `ServerKey` lets them impersonate the server.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredentials {
    /// The hash these keys were made with.
    pub hash: HashAlgo,
    /// The per-user salt.
    pub salt: Vec<u8>,
    /// The PBKDF2 iteration count.
    pub iterations: u32,
    /// `StoredKey = H(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: Vec<u8>,
    /// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
    pub server_key: Vec<u8>,
}

impl ScramCredentials {
    /// Whether the record is usable: non-empty salt, at least one iteration, and keys as long as
    /// the hash output. A record read back from storage is checked before use.
    pub fn is_well_formed(&self) -> bool {
        let n = self.hash.output_len();
        !self.salt.is_empty()
            && self.iterations >= 1
            && self.stored_key.len() == n
            && self.server_key.len() == n
    }
}

impl fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramCredentials")
            .field("hash", &self.hash)
            .field("salt_len", &self.salt.len())
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// Derives the stored credentials for `password`:
/// `SaltedPassword = Hi(SASLprep(password), salt, iterations)`, then `StoredKey` and `ServerKey`.
///
/// This runs PBKDF2 (`iterations` HMACs), so it is slow on purpose: call it on a blocking thread.
pub fn derive_credentials(
    hash: HashAlgo,
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<ScramCredentials, CredentialsError> {
    if salt.is_empty() {
        return Err(CredentialsError::EmptySalt);
    }
    if iterations == 0 {
        return Err(CredentialsError::InvalidIterations);
    }
    let prepared = prepare_password(password)?;
    let salted = crypto::hi(hash, prepared.as_bytes(), salt, iterations);
    Ok(ScramCredentials {
        hash,
        salt: salt.to_vec(),
        iterations,
        stored_key: crypto::hash(hash, &crypto::client_key(hash, &salted)),
        server_key: crypto::server_key(hash, &salted),
    })
}

/// Checks a clear-text password (from PLAIN) against stored SCRAM credentials: derives
/// `StoredKey` with the stored salt and iteration count and compares it in constant time.
///
/// Runs PBKDF2: call it on a blocking thread. Returns `false` for a password SASLprep refuses
/// and for a malformed record.
pub fn verify_plain_password(credentials: &ScramCredentials, password: &str) -> bool {
    if !credentials.is_well_formed() {
        return false;
    }
    match derive_credentials(
        credentials.hash,
        password,
        &credentials.salt,
        credentials.iterations,
    ) {
        Ok(derived) => bool::from(derived.stored_key.ct_eq(&credentials.stored_key)),
        Err(_) => false,
    }
}

/// A fresh random salt of [`SALT_LEN`] bytes from the operating system.
pub fn new_salt() -> Result<Vec<u8>, CredentialsError> {
    let mut salt = vec![0u8; SALT_LEN];
    getrandom::fill(&mut salt).map_err(|e| CredentialsError::Random(e.to_string()))?;
    Ok(salt)
}

/// SASLprep (RFC 4013) for passwords; empty results are refused.
pub(crate) fn prepare_password(password: &str) -> Result<String, CredentialsError> {
    match stringprep::saslprep(password) {
        Ok(p) if !p.is_empty() => Ok(p.into_owned()),
        _ => Err(CredentialsError::InvalidPassword),
    }
}
