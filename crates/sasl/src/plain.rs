//! The PLAIN message (RFC 4616 §2): `[authzid] NUL authcid NUL passwd`.

use crate::credentials::prepare_password;
use crate::scram::{Fail, malformed};

/// A parsed PLAIN message, with the authentication identity and password SASLprep'd.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PlainMessage {
    pub(crate) authzid: Option<String>,
    pub(crate) username: String,
    pub(crate) password: String,
}

pub(crate) fn parse_plain(msg: &[u8]) -> Result<PlainMessage, Fail> {
    let mut parts = msg.split(|b| *b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("PLAIN needs exactly two NUL separators"));
    };
    let authzid = std::str::from_utf8(authzid).map_err(|_| malformed("authzid is not UTF-8"))?;
    let authcid = std::str::from_utf8(authcid).map_err(|_| malformed("authcid is not UTF-8"))?;
    let password = std::str::from_utf8(password).map_err(|_| malformed("password is not UTF-8"))?;
    let username = prepare_username(authcid)?;
    let password = prepare_password(password).map_err(|_| malformed("password refused"))?;
    Ok(PlainMessage {
        authzid: (!authzid.is_empty()).then(|| authzid.to_owned()),
        username,
        password,
    })
}

/// SASLprep (RFC 4013) for user names; empty results are refused.
pub(crate) fn prepare_username(name: &str) -> Result<String, Fail> {
    match stringprep::saslprep(name) {
        Ok(p) if !p.is_empty() => Ok(p.into_owned()),
        _ => Err(malformed("user name refused by SASLprep")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prepares() {
        let m = parse_plain(b"\0user\0pen\xc2\xa0cil").unwrap();
        assert_eq!(m.authzid, None);
        assert_eq!(m.username, "user");
        // SASLprep maps the non-ASCII space to U+0020.
        assert_eq!(m.password, "pen cil");
        let m = parse_plain(b"user@example.com\0user\0pencil").unwrap();
        assert_eq!(m.authzid.as_deref(), Some("user@example.com"));
    }

    #[test]
    fn refuses() {
        for bad in [
            &b""[..],
            b"user\0pencil",
            b"\0\0pencil",
            b"\0user\0",
            b"\0user\0pen\0cil",
            b"\0us\xffer\0pencil",
            b"\0user\0pen\x07cil",
        ] {
            assert!(parse_plain(bad).is_err(), "{bad:?} accepted");
        }
    }
}
