//! The SCRAM message grammar (RFC 5802 §7): parsing of the client's two messages.
//!
//! Parsing is strict: anything outside the grammar is `malformed-request`. Security checks that
//! need the session (channel binding, nonce, proof) live in [`crate::session`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::SaslFailureReason;

/// A failed step: the condition for the client and a short reason for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fail {
    pub(crate) reason: SaslFailureReason,
    pub(crate) detail: &'static str,
}

pub(crate) fn malformed(detail: &'static str) -> Fail {
    Fail {
        reason: SaslFailureReason::MalformedRequest,
        detail,
    }
}

/// The channel-binding flag of the GS2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CbFlag<'a> {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports channel binding but thinks the server does not.
    ClientOnly,
    /// `p=name`: the client binds to this channel-binding type.
    Binding(&'a str),
}

/// A parsed client-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientFirst<'a> {
    /// The GS2 header exactly as sent, including its trailing comma; echoed in `c=`.
    pub(crate) gs2_header: &'a str,
    pub(crate) flag: CbFlag<'a>,
    /// The authorization identity, `=2C`/`=3D` decoded.
    pub(crate) authzid: Option<String>,
    /// client-first-message-bare, part of AuthMessage.
    pub(crate) bare: &'a str,
    /// The user name, `=2C`/`=3D` decoded but not yet SASLprep'd.
    pub(crate) username: String,
    pub(crate) nonce: &'a str,
}

/// A parsed client-final-message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientFinal<'a> {
    /// client-final-message-without-proof, part of AuthMessage.
    pub(crate) without_proof: &'a str,
    /// The decoded `c=` value: GS2 header followed by the channel-binding data.
    pub(crate) channel_binding: Vec<u8>,
    pub(crate) nonce: &'a str,
    /// The decoded `p=` value.
    pub(crate) proof: Vec<u8>,
}

/// Parses `gs2-header client-first-message-bare`.
pub(crate) fn parse_client_first(msg: &str) -> Result<ClientFirst<'_>, Fail> {
    let (flag, rest) = if let Some(rest) = msg.strip_prefix("n,") {
        (CbFlag::NotSupported, rest)
    } else if let Some(rest) = msg.strip_prefix("y,") {
        (CbFlag::ClientOnly, rest)
    } else if let Some(rest) = msg.strip_prefix("p=") {
        let (name, rest) = rest
            .split_once(',')
            .ok_or(malformed("unterminated channel-binding flag"))?;
        if !is_cb_name(name) {
            return Err(malformed("invalid channel-binding name"));
        }
        (CbFlag::Binding(name), rest)
    } else {
        return Err(malformed("invalid GS2 channel-binding flag"));
    };

    let (authzid, bare) = if let Some(bare) = rest.strip_prefix(',') {
        (None, bare)
    } else if let Some(rest) = rest.strip_prefix("a=") {
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(malformed("unterminated GS2 header"))?;
        (Some(decode_saslname(authzid)?), bare)
    } else {
        return Err(malformed("invalid GS2 header"));
    };
    let gs2_header = &msg[..msg.len() - bare.len()];

    let mut attrs = bare.split(',');
    let first = attrs.next().unwrap_or_default();
    if first.starts_with("m=") {
        // RFC 5802 §5.1: a server that does not understand a mandatory extension must fail.
        return Err(malformed("unsupported mandatory extension"));
    }
    let username = first
        .strip_prefix("n=")
        .ok_or(malformed("missing username"))?;
    let username = decode_saslname(username)?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(malformed("missing nonce"))?;
    if !is_nonce(nonce) {
        return Err(malformed("invalid nonce"));
    }
    for ext in attrs {
        check_extension(ext)?;
    }
    Ok(ClientFirst {
        gs2_header,
        flag,
        authzid,
        bare,
        username,
        nonce,
    })
}

/// Parses `channel-binding "," nonce ["," extensions] "," proof`.
pub(crate) fn parse_client_final(msg: &str) -> Result<ClientFinal<'_>, Fail> {
    // The proof is always the last attribute, and base64 never contains a comma.
    let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(malformed("missing proof"))?;
    let mut attrs = without_proof.split(',');
    let cb = attrs
        .next()
        .and_then(|a| a.strip_prefix("c="))
        .ok_or(malformed("missing channel binding"))?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(malformed("missing nonce"))?;
    for ext in attrs {
        check_extension(ext)?;
    }
    let channel_binding = decode_b64(cb).ok_or(malformed("channel binding is not base64"))?;
    let proof = decode_b64(proof).ok_or(malformed("proof is not base64"))?;
    Ok(ClientFinal {
        without_proof,
        channel_binding,
        nonce,
        proof,
    })
}

/// Strict, padded base64; empty input is refused (every SCRAM base64 value is non-empty).
pub(crate) fn decode_b64(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() {
        return None;
    }
    STANDARD.decode(s).ok()
}

/// Decodes a `saslname` (RFC 5802 §7): `=2C` is `,` and `=3D` is `=`; any other `=`, a comma,
/// NUL or an empty name is malformed.
pub(crate) fn decode_saslname(s: &str) -> Result<String, Fail> {
    if s.is_empty() {
        return Err(malformed("empty name"));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find(['=', ',', '\0']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("=2C") {
            out.push(',');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("=3D") {
            out.push('=');
            rest = after;
        } else {
            return Err(malformed("invalid character or escape in name"));
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `printable = %x21-2B / %x2D-7E` (visible ASCII except comma), at least one.
fn is_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// `cb-name = 1*(ALPHA / DIGIT / "." / "-")`.
fn is_cb_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// An optional extension `attr-val` (RFC 5802 §7): a letter, `=`, a non-empty value without NUL.
/// Unknown extensions are ignored (§5.1), but one that repeats a defined attribute is not an
/// extension and is refused.
fn check_extension(attr: &str) -> Result<(), Fail> {
    let mut chars = attr.chars();
    let name = chars.next();
    let valid = matches!(name, Some(c) if c.is_ascii_alphabetic())
        && chars.next() == Some('=')
        && !chars.as_str().is_empty()
        && !chars.as_str().contains('\0');
    if !valid {
        return Err(malformed("invalid attribute"));
    }
    if matches!(name, Some('m' | 'n' | 'r' | 'c' | 'p' | 'a')) {
        return Err(malformed("unexpected attribute"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saslname_escapes() {
        assert_eq!(decode_saslname("a=2Cb=3Dc").as_deref(), Ok("a,b=c"));
        assert!(decode_saslname("a=2").is_err());
        assert!(decode_saslname("a=41").is_err());
        assert!(decode_saslname("").is_err());
        assert!(decode_saslname("a\0b").is_err());
    }

    #[test]
    fn client_first_fields() {
        let m = parse_client_first("p=tls-exporter,a=me@x=2Cy,n=us=3Der,r=abc,x=ext").unwrap();
        assert_eq!(m.gs2_header, "p=tls-exporter,a=me@x=2Cy,");
        assert_eq!(m.flag, CbFlag::Binding("tls-exporter"));
        assert_eq!(m.authzid.as_deref(), Some("me@x,y"));
        assert_eq!(m.bare, "n=us=3Der,r=abc,x=ext");
        assert_eq!(m.username, "us=er");
        assert_eq!(m.nonce, "abc");
    }

    #[test]
    fn client_first_refusals() {
        for bad in [
            "",
            "n",
            "n,",
            "n,,",
            "x,,n=u,r=a",
            "p=,,n=u,r=a",
            "p=tls_unique,,n=u,r=a",
            "n,b=x,n=u,r=a",
            "n,,m=x,n=u,r=a",
            "n,,n=u",
            "n,,n=u,r=",
            "n,,r=a,n=u",
            "n,,n=u,r=a b",
            "n,,n=u,r=a,1=x",
            "n,,n=u,r=a,x=",
            "n,,n=u,r=a,r=b",
        ] {
            assert!(parse_client_first(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn client_final_fields_and_refusals() {
        let m = parse_client_final("c=biws,r=abc,x=1,p=AAAA").unwrap();
        assert_eq!(m.without_proof, "c=biws,r=abc,x=1");
        assert_eq!(m.channel_binding, b"n,,");
        assert_eq!(m.nonce, "abc");
        assert_eq!(m.proof, vec![0, 0, 0]);
        for bad in [
            "r=abc,p=AAAA",
            "c=biws,p=AAAA",
            "c=biws,r=abc",
            "c=biws,r=abc,p=",
            "c=b!ws,r=abc,p=AAAA",
            "c=biws,r=abc,p=AAA",
            "c=,r=abc,p=AAAA",
        ] {
            assert!(parse_client_final(bad).is_err(), "{bad:?} accepted");
        }
    }
}
