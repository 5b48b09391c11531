//! JIDs (RFC 7622): parsing with a server-side error, on top of the `jid` crate.
//!
//! Parse every JID that comes from the network or from configuration with [`parse`],
//! [`parse_bare`], [`parse_full`] or [`parse_domain`], never with the `jid` crate's own `new`
//! or `FromStr`: these functions prepare the domainpart first, working around the places
//! where `jid` 0.12 departs from RFC 7622 (each has an `upstream_*` test below):
//!
//! - a final dot on the domainpart must be stripped (§3.2); `jid` keeps it when no other
//!   part changes under normalisation, and then reports a resourcepart that starts with `/`;
//! - an A-label must be converted to its U-label (§3.2.1); `jid` keeps `xn--` labels, so the
//!   same domain written two ways compared unequal;
//! - the ideographic full stops U+3002 and U+FF61 are label separators (IDNA/UTS #46); `jid`
//!   validates them as dots but keeps them in the normalised string;
//! - `jid` validates a domain before mapping it and never validates the result, so `ß--x`
//!   becomes `ss--x`, which it then refuses; [`parse`] parses again any input that
//!   normalisation changed, and refuses a JID that does not come back unchanged;
//! - an IPv6 literal is written in its RFC 5952 form, so `[::1]` and `[0::1]` are one host.
//!
//! What is not worked around: `jid` prepares the localpart and resourcepart with the
//! stringprep profiles of RFC 6122 (Unicode 3.2, NFKC) instead of the PRECIS profiles of
//! RFC 7622 (UsernameCaseMapped and OpaqueString, NFC), and the domainpart with nameprep
//! (IDNA2003) after an IDNA2008 check. See `upstream_gap_stringprep_instead_of_precis`.

use std::net::Ipv6Addr;

pub use ::jid::{
    BareJid, DomainPart, DomainRef, FullJid, Jid, NodePart, NodeRef, ResourcePart, ResourceRef,
};

use crate::error::{StanzaError, StanzaErrorCondition};

/// Why a string is not a JID. Every variant maps to the `jid-malformed` stanza error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum JidError {
    /// `@` with nothing before it.
    #[error("malformed JID: empty localpart")]
    LocalpartEmpty,
    /// The localpart is longer than 1023 bytes once prepared.
    #[error("malformed JID: localpart longer than 1023 bytes")]
    LocalpartTooLong,
    /// The localpart holds a character the address format forbids.
    #[error("malformed JID: forbidden character in localpart")]
    LocalpartInvalid,
    /// The domainpart is empty, or neither a valid domain name nor an IP address.
    #[error("malformed JID: invalid domainpart")]
    DomainInvalid,
    /// A second `@` before the resourcepart.
    #[error("malformed JID: more than one '@' before the resourcepart")]
    TooManyAts,
    /// `/` with nothing after it.
    #[error("malformed JID: empty resourcepart")]
    ResourceEmpty,
    /// The resourcepart is longer than 1023 bytes once prepared.
    #[error("malformed JID: resourcepart longer than 1023 bytes")]
    ResourceTooLong,
    /// The resourcepart holds a character the address format forbids.
    #[error("malformed JID: forbidden character in resourcepart")]
    ResourceInvalid,
    /// A full JID was required and this one has no resourcepart.
    #[error("malformed JID: a resourcepart is required")]
    ResourceMissing,
    /// A bare JID was required and this one has a resourcepart.
    #[error("malformed JID: a resourcepart is not allowed here")]
    ResourceNotAllowed,
    /// A domain was required and this JID has a localpart or resourcepart.
    #[error("malformed JID: a domain without localpart or resourcepart is required")]
    NotDomainOnly,
}

impl JidError {
    /// The stanza error condition to answer with: always `jid-malformed` (RFC 6120 §8.3.3.8).
    pub fn condition(self) -> StanzaErrorCondition {
        StanzaErrorCondition::JidMalformed
    }
}

impl From<JidError> for StanzaError {
    fn from(error: JidError) -> Self {
        StanzaError::new(error.condition()).with_text(error.to_string())
    }
}

impl From<::jid::Error> for JidError {
    fn from(error: ::jid::Error) -> Self {
        use ::jid::Error as E;
        match error {
            E::NodeEmpty => Self::LocalpartEmpty,
            E::NodeTooLong => Self::LocalpartTooLong,
            E::NodePrep => Self::LocalpartInvalid,
            E::NamePrep | E::Idna => Self::DomainInvalid,
            E::TooManyAts => Self::TooManyAts,
            E::ResourceEmpty => Self::ResourceEmpty,
            E::ResourceTooLong => Self::ResourceTooLong,
            E::ResourcePrep => Self::ResourceInvalid,
            E::ResourceMissingInFullJid => Self::ResourceMissing,
            E::ResourceInBareJid => Self::ResourceNotAllowed,
        }
    }
}

/// Parses and normalises any JID.
///
/// The result is a fixed point: parsing its string again gives the same JID, so a JID
/// normalised by one node (say, as a routing key) is the same JID on every other.
pub fn parse(s: &str) -> Result<Jid, JidError> {
    let jid = parse_once(s)?;
    if jid.as_str() != s {
        // `jid` validates its input but not its output, and nameprep can turn a valid domain
        // into an invalid one (see `upstream_bug_normalised_domain_fails_validation`). Only
        // input that was not already normalised pays for this second pass.
        let again = parse_once(jid.as_str())?;
        if again != jid {
            return Err(if again.node() != jid.node() {
                JidError::LocalpartInvalid
            } else if again.domain() != jid.domain() {
                JidError::DomainInvalid
            } else {
                JidError::ResourceInvalid
            });
        }
    }
    Ok(jid)
}

/// One pass of [`parse`], which may not be idempotent.
fn parse_once(s: &str) -> Result<Jid, JidError> {
    // Before `jid` sees the domain: a final dot left in would shift the parts (see
    // `upstream_bug_trailing_dot_kept_and_resource_shifted`).
    let parts = Split::new(s);
    let jid = match prepare_domain(parts.domain)? {
        None => Jid::new(s)?,
        Some(domain) => Jid::new(&parts.join(&domain))?,
    };
    // And after: `jid`'s mappings (case, width, ignorable code points) can reveal an A-label
    // or a separator that was not visible in the input.
    match prepare_domain(jid.domain().as_str())? {
        None => Ok(jid),
        Some(domain) => {
            let domain = DomainPart::new(&domain)?;
            if prepare_domain(domain.as_str())?.is_some() {
                // Only a contrived input needs a second round; refuse it rather than loop.
                return Err(JidError::DomainInvalid);
            }
            Ok(Jid::from_parts(jid.node(), &domain, jid.resource()))
        }
    }
}

/// Parses a JID that must have no resourcepart.
pub fn parse_bare(s: &str) -> Result<BareJid, JidError> {
    match parse(s)?.try_into_full() {
        Ok(_) => Err(JidError::ResourceNotAllowed),
        Err(bare) => Ok(bare),
    }
}

/// Parses a JID that must have a resourcepart.
pub fn parse_full(s: &str) -> Result<FullJid, JidError> {
    parse(s)?
        .try_into_full()
        .map_err(|_| JidError::ResourceMissing)
}

/// Parses a domainpart on its own, e.g. a hosted domain from configuration or the `to` of a
/// stream header.
pub fn parse_domain(s: &str) -> Result<DomainPart, JidError> {
    let jid = parse(s)?;
    if !is_domain_only(&jid) {
        return Err(JidError::NotDomainOnly);
    }
    Ok(jid.domain().to_owned())
}

/// Whether `jid` is a bare domain (no localpart, no resourcepart): the address of a server
/// or service itself.
pub fn is_domain_only(jid: &Jid) -> bool {
    jid.node().is_none() && jid.resource().is_none()
}

/// Whether two JIDs have the same bare JID (localpart and domainpart), without building
/// either bare JID: routing compares bare JIDs on every message, and `to_bare()` allocates.
pub fn same_bare(a: &Jid, b: &Jid) -> bool {
    a.node() == b.node() && a.domain() == b.domain()
}

/// The domain of `jid` as a JID of its own, e.g. the server a stanza is routed to.
pub fn domain_only(jid: &Jid) -> BareJid {
    BareJid::from_parts(None, jid.domain())
}

/// A string cut at its separators as RFC 7622 §3.1 does: the resourcepart starts after the
/// first `/`, the localpart ends at the first `@` before that.
struct Split<'a> {
    node: Option<&'a str>,
    domain: &'a str,
    resource: Option<&'a str>,
}

impl<'a> Split<'a> {
    fn new(s: &'a str) -> Self {
        let (before, resource) = match s.split_once('/') {
            Some((before, resource)) => (before, Some(resource)),
            None => (s, None),
        };
        let (node, domain) = match before.split_once('@') {
            Some((node, domain)) => (Some(node), domain),
            None => (None, before),
        };
        Self {
            node,
            domain,
            resource,
        }
    }

    /// The string again, with `domain` as its domainpart.
    fn join(&self, domain: &str) -> String {
        let len = self.node.map_or(0, |n| n.len() + 1)
            + domain.len()
            + self.resource.map_or(0, |r| r.len() + 1);
        let mut out = String::with_capacity(len);
        if let Some(node) = self.node {
            out.push_str(node);
            out.push('@');
        }
        out.push_str(domain);
        if let Some(resource) = self.resource {
            out.push('/');
            out.push_str(resource);
        }
        out
    }
}

/// Label separators other than U+002E: the ideographic, fullwidth and halfwidth ideographic
/// full stops. (`jid`'s NFKC maps U+FF0E too, but only after it has looked for a final dot.)
fn is_other_label_separator(c: char) -> bool {
    matches!(c, '\u{3002}' | '\u{FF0E}' | '\u{FF61}')
}

/// Whether any label of `domain` starts with the ACE prefix `xn--`.
fn has_a_label(domain: &str) -> bool {
    domain
        .split('.')
        .any(|label| label.len() >= 4 && label.as_bytes()[..4].eq_ignore_ascii_case(b"xn--"))
}

/// Prepares a domainpart where `jid` would get it wrong: `None` if it can be passed on as it
/// is (the common case, which costs a scan and no allocation), or the string to use instead.
fn prepare_domain(domain: &str) -> Result<Option<String>, JidError> {
    if let Some(literal) = domain.strip_prefix('[') {
        let address: Ipv6Addr = literal
            .strip_suffix(']')
            .and_then(|inner| inner.parse().ok())
            .ok_or(JidError::DomainInvalid)?;
        let canonical = format!("[{address}]");
        return Ok((canonical != domain).then_some(canonical));
    }

    let other_separators = !domain.is_ascii() && domain.contains(is_other_label_separator);
    if !other_separators && !domain.ends_with('.') && !has_a_label(domain) {
        return Ok(None);
    }
    let mut prepared: String = domain
        .chars()
        .map(|c| if is_other_label_separator(c) { '.' } else { c })
        .collect();
    // Exactly one final dot is the DNS root; `jid` would strip a second one too.
    if prepared.ends_with('.') {
        prepared.pop();
        if prepared.is_empty() || prepared.ends_with('.') {
            return Err(JidError::DomainInvalid);
        }
    }
    if has_a_label(&prepared) {
        prepared = to_u_labels(&prepared)?;
    }
    Ok(Some(prepared))
}

/// Replaces each A-label of `domain` by its U-label. The result is validated afterwards by
/// `jid`, as any Unicode domain is.
fn to_u_labels(domain: &str) -> Result<String, JidError> {
    let mut out = String::with_capacity(domain.len() + 8);
    for (i, label) in domain.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        match label.get(..4) {
            Some(prefix) if prefix.eq_ignore_ascii_case("xn--") => {
                // A DNS label is at most 63 octets; bounding it also bounds the decoder's work.
                if label.len() > 63 {
                    return Err(JidError::DomainInvalid);
                }
                let u_label = punycode::decode(&label[4..]).ok_or(JidError::DomainInvalid)?;
                // An A-label always encodes something beyond ASCII (RFC 5890 §2.3.2.1).
                if u_label.is_ascii() {
                    return Err(JidError::DomainInvalid);
                }
                out.push_str(&u_label);
            }
            _ => out.push_str(label),
        }
    }
    Ok(out)
}

/// Punycode decoding (RFC 3492 §6.2), the only part of it a server needs.
mod punycode {
    const BASE: u32 = 36;
    const T_MIN: u32 = 1;
    const T_MAX: u32 = 26;
    const SKEW: u32 = 38;
    const DAMP: u32 = 700;
    const INITIAL_BIAS: u32 = 72;
    const INITIAL_N: u32 = 0x80;

    /// Decodes the part of an A-label after `xn--`; `None` if it is not valid Punycode.
    pub(super) fn decode(input: &str) -> Option<String> {
        if !input.is_ascii() {
            return None;
        }
        // Basic code points come before the last delimiter, if anything does.
        let (basic, deltas) = match input.rfind('-') {
            Some(at) if at > 0 => (&input[..at], &input[at + 1..]),
            _ => ("", input),
        };
        let mut output: Vec<char> = basic.chars().collect();
        let mut n = INITIAL_N;
        let mut i: u32 = 0;
        let mut bias = INITIAL_BIAS;
        let mut digits = deltas.bytes().peekable();
        while digits.peek().is_some() {
            let old_i = i;
            let mut weight: u32 = 1;
            let mut k = BASE;
            loop {
                let digit = digit_value(digits.next()?)?;
                i = i.checked_add(digit.checked_mul(weight)?)?;
                let threshold = if k <= bias {
                    T_MIN
                } else if k >= bias + T_MAX {
                    T_MAX
                } else {
                    k - bias
                };
                if digit < threshold {
                    break;
                }
                weight = weight.checked_mul(BASE - threshold)?;
                k = k.checked_add(BASE)?;
            }
            let len = u32::try_from(output.len()).ok()?.checked_add(1)?;
            bias = adapt(i - old_i, len, old_i == 0);
            n = n.checked_add(i / len)?;
            i %= len;
            let c = char::from_u32(n)?;
            // Inserting a basic code point is an error (RFC 3492 §6.2).
            if c.is_ascii() {
                return None;
            }
            output.insert(usize::try_from(i).ok()?, c);
            i += 1;
        }
        Some(output.into_iter().collect())
    }

    fn digit_value(byte: u8) -> Option<u32> {
        match byte {
            b'a'..=b'z' => Some(u32::from(byte - b'a')),
            b'A'..=b'Z' => Some(u32::from(byte - b'A')),
            b'0'..=b'9' => Some(u32::from(byte - b'0') + 26),
            _ => None,
        }
    }

    /// Bias adaptation (RFC 3492 §6.1).
    fn adapt(delta: u32, num_points: u32, first_time: bool) -> u32 {
        let mut delta = if first_time { delta / DAMP } else { delta / 2 };
        delta += delta / num_points;
        let mut k = 0;
        while delta > ((BASE - T_MIN) * T_MAX) / 2 {
            delta /= BASE - T_MIN;
            k += BASE;
        }
        k + ((BASE - T_MIN + 1) * delta) / (delta + SKEW)
    }

    #[cfg(test)]
    mod tests {
        use super::decode;

        #[test]
        fn decodes_known_labels() {
            assert_eq!(decode("bcher-kva").as_deref(), Some("bücher"));
            assert_eq!(decode("mnchen-3ya").as_deref(), Some("münchen"));
            assert_eq!(decode("fa-hia").as_deref(), Some("faß"));
            assert_eq!(decode("p1ai").as_deref(), Some("рф"));
            assert_eq!(decode("d1abbgf6aiiy").as_deref(), Some("президент"));
            assert_eq!(decode("wgv71a119e").as_deref(), Some("日本語"));
            // RFC 3492 §7.1 (B), Chinese (simplified).
            assert_eq!(
                decode("ihqwcrb4cv8a8dqg056pqjye").as_deref(),
                Some("他们为什么不说中文")
            );
        }

        #[test]
        fn refuses_invalid_input() {
            for bad in ["", "-", "-abc", "bcher-kv!", "bcher-ü", "99999999999", "a-"] {
                let decoded = decode(bad);
                assert!(
                    decoded.as_deref().is_none_or(|d| d.is_ascii()),
                    "{bad:?} decoded to {decoded:?}"
                );
            }
            // Deltas that overflow 32 bits.
            assert_eq!(decode(&"9".repeat(20)), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(s: &str) -> String {
        parse(s)
            .unwrap_or_else(|e| panic!("{s:?}: {e}"))
            .to_string()
    }

    fn parts(s: &str) -> (Option<String>, String, Option<String>) {
        let jid = parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (
            jid.node().map(|n| n.to_string()),
            jid.domain().to_string(),
            jid.resource().map(|r| r.to_string()),
        )
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    // RFC 7622 §3.3.2 and §3.2.2: the localpart and domainpart are case-folded, the
    // resourcepart keeps its case (§3.4.2).
    #[test]
    fn case_folds_localpart_and_domain_but_not_resource() {
        assert_eq!(
            ok("Juliet@Example.COM/Balcony"),
            "juliet@example.com/Balcony"
        );
        assert_eq!(ok("ΚΑΛΗ@EXAMPLE.com"), "καλη@example.com");
        assert_ne!(parse("a@b/R"), parse("a@b/r"));
    }

    // RFC 7622 §3.3.2 (width mapping of the localpart) and §3.2.2 (of the domainpart).
    #[test]
    fn maps_fullwidth_characters_in_localpart_and_domain() {
        assert_eq!(
            ok("ｊｕｌｉｅｔ@ｅｘａｍｐｌｅ．ｃｏｍ"),
            "juliet@example.com"
        );
    }

    #[test]
    fn same_bare_compares_localpart_and_domain_only() {
        let j = |s: &str| parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        assert!(same_bare(&j("a@example.com/one"), &j("A@Example.com/two")));
        assert!(same_bare(&j("a@example.com"), &j("a@example.com/r")));
        assert!(!same_bare(&j("a@example.com/r"), &j("b@example.com/r")));
        assert!(!same_bare(&j("a@example.com"), &j("a@example.org")));
        assert!(!same_bare(&j("example.com"), &j("a@example.com")));
        assert!(same_bare(&j("example.com/x"), &j("example.com")));
    }

    // RFC 7622 §3.3.2, §3.2.2, §3.4.2: NFC.
    #[test]
    fn normalises_to_nfc() {
        assert_eq!(ok("e\u{301}@example.com"), "\u{e9}@example.com");
        assert_eq!(parse("e\u{301}@example.com"), parse("\u{e9}@example.com"));
        assert_eq!(ok("u@example.com/e\u{301}"), "u@example.com/\u{e9}");
        assert_eq!(ok("u@b\u{fc}cher.example"), ok("u@bu\u{308}cher.example"));
    }

    // RFC 7622 §3.3.1 and §3.4.1: at most 1023 bytes, counted in UTF-8 octets.
    #[test]
    fn limits_localpart_and_resource_to_1023_bytes() {
        let a1023 = "a".repeat(1023);
        let a1024 = "a".repeat(1024);
        assert!(parse(&format!("{a1023}@example.com")).is_ok());
        assert_eq!(
            parse(&format!("{a1024}@example.com")),
            Err(JidError::LocalpartTooLong)
        );
        assert!(parse(&format!("example.com/{a1023}")).is_ok());
        assert_eq!(
            parse(&format!("example.com/{a1024}")),
            Err(JidError::ResourceTooLong)
        );
        // 512 two-byte characters are 1024 bytes.
        let e511 = "\u{e9}".repeat(511);
        let e512 = "\u{e9}".repeat(512);
        assert!(parse(&format!("{e511}@example.com/{e511}")).is_ok());
        assert_eq!(
            parse(&format!("{e512}@example.com")),
            Err(JidError::LocalpartTooLong)
        );
        assert_eq!(
            parse(&format!("example.com/{e512}")),
            Err(JidError::ResourceTooLong)
        );
        // The limit applies to the prepared string: 1024 bytes that NFC composes into 1023.
        let decomposed = format!("{}e\u{301}", "a".repeat(1021));
        assert_eq!(decomposed.len(), 1024);
        assert!(parse(&format!("{decomposed}@example.com")).is_ok());
        assert!(parse(&format!("example.com/{decomposed}")).is_ok());
    }

    // RFC 7622 §3.2.1 allows 1023 bytes, but a domain name must also fit DNS (63-byte labels,
    // 253 bytes in all) under IDNA2008, which is the stricter limit `jid` applies.
    #[test]
    fn limits_domains_to_dns_lengths() {
        assert!(parse(&format!("{}.example", "a".repeat(63))).is_ok());
        assert_eq!(
            parse(&format!("{}.example", "a".repeat(64))),
            Err(JidError::DomainInvalid)
        );
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(parse(&long), Err(JidError::DomainInvalid));
    }

    // RFC 7622 §3.1: no part may be empty once its separator is present.
    #[test]
    fn refuses_empty_parts() {
        assert_eq!(parse(""), Err(JidError::DomainInvalid));
        assert_eq!(parse("@example.com"), Err(JidError::LocalpartEmpty));
        assert_eq!(parse("example.com/"), Err(JidError::ResourceEmpty));
        assert_eq!(parse("user@example.com/"), Err(JidError::ResourceEmpty));
        assert_eq!(parse("user@/res"), Err(JidError::DomainInvalid));
        assert_eq!(parse("user@"), Err(JidError::DomainInvalid));
        assert_eq!(parse("/res"), Err(JidError::DomainInvalid));
        assert_eq!(parse("@"), Err(JidError::LocalpartEmpty));
    }

    // RFC 7622 §3.1: the first '/' starts the resourcepart, which may hold '@' and '/'.
    #[test]
    fn splits_at_the_first_slash_then_the_first_at() {
        assert_eq!(
            parts("user@example.com/a@b/c"),
            (some("user"), "example.com".into(), some("a@b/c"))
        );
        assert_eq!(
            parts("example.com/user@host"),
            (None, "example.com".into(), some("user@host"))
        );
        assert_eq!(parts("a/b@c"), (None, "a".into(), some("b@c")));
        assert_eq!(
            parts("example.com//"),
            (None, "example.com".into(), some("/"))
        );
        assert_eq!(parse("a@b@example.com"), Err(JidError::TooManyAts));
        assert_eq!(parse("a@b@example.com/r"), Err(JidError::TooManyAts));
        // '@', '/', and the other characters RFC 7622 §3.3.1 forbids in a localpart.
        for c in ['"', '&', '\'', ':', '<', '>', ' '] {
            assert_eq!(
                parse(&format!("a{c}b@example.com")),
                Err(JidError::LocalpartInvalid),
                "{c:?}"
            );
        }
    }

    // RFC 7622 §3.2: IDNs; an A-label is converted to its U-label (§3.2.1).
    #[test]
    fn lowercases_idns_and_converts_a_labels() {
        assert_eq!(ok("user@BÜCHER.example"), "user@bücher.example");
        assert_eq!(ok("user@xn--bcher-kva.example"), "user@bücher.example");
        assert_eq!(ok("user@XN--BCHER-KVA.Example/R"), "user@bücher.example/R");
        assert_eq!(
            parse("user@xn--bcher-kva.example"),
            parse("user@bücher.example")
        );
        assert_eq!(ok("xn--d1abbgf6aiiy.xn--p1ai"), "президент.рф");
        // A-labels that only appear once `jid` has mapped the input (found by proptest).
        assert_eq!(ok("\u{ad}xn--bcher-kva/a"), "bücher/a");
        assert_eq!(ok("ｘｎ－－ｂｃｈｅｒ－ｋｖａ.example"), "bücher.example");
        // Not Punycode, or Punycode of plain ASCII: not an A-label.
        assert_eq!(
            parse("u@xn--bcher-k!a.example"),
            Err(JidError::DomainInvalid)
        );
        assert_eq!(parse("u@xn--abc-.example"), Err(JidError::DomainInvalid));
        assert_eq!(parse("u@xn--.example"), Err(JidError::DomainInvalid));
        assert_eq!(parse("u@-example.com"), Err(JidError::DomainInvalid));
        assert_eq!(parse("u@exa mple.com"), Err(JidError::DomainInvalid));
    }

    #[test]
    fn maps_ideographic_full_stops_to_dots() {
        assert_eq!(ok("user@example\u{3002}com"), "user@example.com");
        assert_eq!(ok("user@example\u{ff61}com/r"), "user@example.com/r");
        assert_eq!(ok("user@example.com\u{3002}"), "user@example.com");
    }

    // RFC 7622 §3.2: IP literals, IPv6 in brackets.
    #[test]
    fn accepts_ip_literals_in_canonical_form() {
        assert_eq!(ok("[::1]"), "[::1]");
        assert_eq!(
            parts("user@[::1]/r"),
            (some("user"), "[::1]".into(), some("r"))
        );
        assert_eq!(ok("[0:0:0:0:0:0:0:1]"), "[::1]");
        assert_eq!(ok("u@[2001:DB8::ABCD]"), "u@[2001:db8::abcd]");
        assert_eq!(ok("127.0.0.1"), "127.0.0.1");
        assert_eq!(ok("u@192.0.2.1/r"), "u@192.0.2.1/r");
        for bad in [
            "[::1",
            "::1]",
            "[::1].",
            "[zz::1]",
            "[]",
            "[::1]x",
            "[127.0.0.1]",
        ] {
            assert_eq!(parse(bad), Err(JidError::DomainInvalid), "{bad}");
        }
    }

    // RFC 7622 §3.2: a final dot is stripped before the JID is compared or used.
    #[test]
    fn strips_one_trailing_dot_from_the_domain() {
        assert_eq!(ok("example.com."), "example.com");
        assert_eq!(ok("user@example.com."), "user@example.com");
        assert_eq!(
            parts("user@example.com./res"),
            (some("user"), "example.com".into(), some("res"))
        );
        assert_eq!(
            parts("example.com./a/b"),
            (None, "example.com".into(), some("a/b"))
        );
        assert_eq!(parse("user@example.com."), parse("user@example.com"));
        assert_eq!(parse("example.com.."), Err(JidError::DomainInvalid));
        assert_eq!(parse("."), Err(JidError::DomainInvalid));
        assert_eq!(parse("user@./r"), Err(JidError::DomainInvalid));
        // A dot in the resourcepart is just a character.
        assert_eq!(ok("example.com/res."), "example.com/res.");
    }

    #[test]
    fn bare_full_and_domain_parsers_check_the_shape() {
        assert_eq!(
            parse_bare("u@example.com")
                .map(|j| j.to_string())
                .as_deref(),
            Ok("u@example.com")
        );
        assert_eq!(
            parse_bare("u@example.com/r"),
            Err(JidError::ResourceNotAllowed)
        );
        assert_eq!(
            parse_full("u@example.com/r")
                .map(|j| j.to_string())
                .as_deref(),
            Ok("u@example.com/r")
        );
        assert_eq!(parse_full("u@example.com"), Err(JidError::ResourceMissing));
        assert_eq!(
            parse_full("u@example.com./r")
                .map(|j| j.resource().to_string())
                .as_deref(),
            Ok("r")
        );
        assert_eq!(
            parse_domain("Example.COM.")
                .map(|d| d.to_string())
                .as_deref(),
            Ok("example.com")
        );
        assert_eq!(parse_domain("u@example.com"), Err(JidError::NotDomainOnly));
        assert_eq!(parse_domain("example.com/r"), Err(JidError::NotDomainOnly));
    }

    #[test]
    fn domain_helpers() {
        let jid = parse("u@Example.com/r").unwrap_or_else(|e| panic!("{e}"));
        assert!(!is_domain_only(&jid));
        assert_eq!(domain_only(&jid).to_string(), "example.com");
        assert!(is_domain_only(&Jid::from(domain_only(&jid))));
    }

    #[test]
    fn errors_map_to_jid_malformed() {
        let error = parse("@example.com").unwrap_err();
        assert_eq!(error.condition(), StanzaErrorCondition::JidMalformed);
        assert_eq!(error.to_string(), "malformed JID: empty localpart");
        let stanza_error = StanzaError::from(error);
        assert_eq!(stanza_error.condition, StanzaErrorCondition::JidMalformed);
        assert_eq!(stanza_error.type_, crate::StanzaErrorType::Modify);
        assert_eq!(
            stanza_error.text.as_deref(),
            Some("malformed JID: empty localpart")
        );
    }

    // ---- Where the `jid` crate departs from RFC 7622 --------------------------------------
    //
    // The `upstream_bug_*` tests assert the crate's current behaviour; when one fails, the crate
    // was fixed and the matching workaround in `prepare_domain` can go.

    /// RFC 7622 §3.2: the final dot MUST be stripped. `jid` strips it when checking the domain
    /// but then, when no part changed under normalisation, keeps the input string unchanged
    /// while computing the part offsets from the stripped lengths: the dot stays and the
    /// resourcepart is read one byte early, starting with '/'.
    #[test]
    fn upstream_bug_trailing_dot_kept_and_resource_shifted() {
        let raw = Jid::new("user@example.com./res").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.as_str(), "user@example.com./res");
        assert_eq!(raw.domain().as_str(), "example.com");
        assert_eq!(raw.resource().map(|r| r.as_str()), Some("/res"));
        assert_ne!(Some(&raw), Jid::new("user@example.com/res").ok().as_ref());
        let raw = Jid::new("user@example.com.").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.as_str(), "user@example.com.");
        // Only a bare domain, which takes another path, comes out right.
        assert_eq!(
            Jid::new("example.com.").map(|j| j.to_string()),
            Ok("example.com".into())
        );
        // Through our wrapper both are right.
        assert_eq!(ok("user@example.com./res"), "user@example.com/res");
    }

    /// RFC 7622 §3.2.1: each A-label MUST be converted to a U-label. `jid` keeps it.
    #[test]
    fn upstream_bug_a_label_not_converted() {
        let raw = Jid::new("user@xn--bcher-kva.example").map(|j| j.to_string());
        assert_eq!(raw, Ok("user@xn--bcher-kva.example".into()));
        assert_ne!(
            Jid::new("user@xn--bcher-kva.example"),
            Jid::new("user@bücher.example")
        );
    }

    /// UTS #46 (and IDNA2003) treat U+3002 and U+FF61 as label separators; `jid` validates the
    /// domain that way but stores the separator unchanged, so equal domains compare unequal.
    #[test]
    fn upstream_bug_ideographic_full_stop_kept() {
        let raw = Jid::new("user@example\u{3002}com").map(|j| j.to_string());
        assert_eq!(raw, Ok("user@example\u{3002}com".into()));
    }

    /// `jid` checks the domain with UTS #46 before mapping it with nameprep, and does not check
    /// the result: "ß--x" passes (the hyphens are 2nd and 3rd), maps to "ss--x" (3rd and 4th,
    /// which IDNA forbids), and that JID fails to parse again.
    #[test]
    fn upstream_bug_normalised_domain_fails_validation() {
        let raw = Jid::new("u@\u{df}--bcher-kva").map(|j| j.to_string());
        assert_eq!(raw, Ok("u@ss--bcher-kva".into()));
        assert_eq!(Jid::new("u@ss--bcher-kva"), Err(::jid::Error::Idna));
        // We refuse such a domain rather than hand out a JID that cannot be parsed back.
        assert_eq!(parse("u@\u{df}--bcher-kva"), Err(JidError::DomainInvalid));
    }

    /// IPv6 literals are kept as written, so one address has many JIDs.
    #[test]
    fn upstream_bug_ipv6_literal_not_canonical() {
        assert_ne!(Jid::new("[::1]"), Jid::new("[0::1]"));
        assert_ne!(Jid::new("[::abcd]"), Jid::new("[::ABCD]"));
    }

    /// Not worked around: `jid` implements RFC 6122's stringprep (Unicode 3.2, NFKC) where
    /// RFC 7622 specifies PRECIS (RFC 7613 UsernameCaseMapped for the localpart, OpaqueString
    /// for the resourcepart, both NFC) and IDNA2008 for the domainpart. Each line below is
    /// what Starling does today, followed by what RFC 7622 asks.
    #[test]
    fn upstream_gap_stringprep_instead_of_precis() {
        // Compatibility characters in a localpart are DISALLOWED (IdentifierClass,
        // HasCompat); NFKC folds them instead.
        assert_eq!(ok("\u{fb01}@example.com"), "fi@example.com");
        assert_eq!(ok("\u{2163}@example.com"), "iv@example.com");
        // OpaqueString keeps resources as written up to NFC: "ﬁ", "Ⅳ" and fullwidth letters
        // stay; NFKC merges them with other resources.
        assert_eq!(ok("u@example.com/\u{fb01}"), "u@example.com/fi");
        assert_eq!(ok("u@example.com/\u{ff42}"), "u@example.com/b");
        // FreeformClass allows symbols, so emoji are valid in a resourcepart (and MUC nick);
        // stringprep's Unicode 3.2 repertoire refuses them.
        assert_eq!(
            parse("u@example.com/\u{1f916}"),
            Err(JidError::ResourceInvalid)
        );
        // PRECIS is Unicode-version agile: U+A78B (Unicode 5.1) is a valid letter.
        assert_eq!(
            parse("\u{a78b}@example.com"),
            Err(JidError::LocalpartInvalid)
        );
        assert_eq!(
            parse("u@example.com/\u{a78b}"),
            Err(JidError::ResourceInvalid)
        );
        // Default-ignorable code points are DISALLOWED; stringprep maps them to nothing.
        assert_eq!(ok("us\u{ad}er@example.com"), "user@example.com");
        // IDNA2008 keeps ß (PVALID); nameprep (IDNA2003) maps it to "ss".
        assert_eq!(ok("u@fa\u{df}.de"), "u@fass.de");
    }

    fn jid_like() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "a",
            "B",
            "z",
            "0",
            "@",
            "/",
            ".",
            "-",
            "[",
            "]",
            ":",
            "::1",
            "xn--",
            "bcher-kva",
            "ß",
            "é",
            "e\u{301}",
            "Σ",
            "\u{fb01}",
            "ｅ",
            "\u{3002}",
            "\u{ad}",
            " ",
            "\u{1f916}",
            "XN--",
            "ｘｎ－－",
            "\u{ff0e}",
            "\u{ff61}",
            "\u{2024}",
            "\u{200b}",
        ]);
        prop::collection::vec(pieces, 0..16).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = parse(&s);
        }

        #[test]
        fn same_bare_agrees_with_comparing_bare_jids(a in jid_like(), b in jid_like()) {
            if let (Ok(a), Ok(b)) = (parse(&a), parse(&b)) {
                prop_assert_eq!(same_bare(&a, &b), a.to_bare() == b.to_bare());
                prop_assert!(same_bare(&a, &a));
            }
        }

        #[test]
        fn parsing_is_idempotent_and_parts_are_consistent(s in jid_like()) {
            if let Ok(jid) = parse(&s) {
                let again = parse(jid.as_str());
                prop_assert_eq!(again.as_ref(), Ok(&jid), "{:?} -> {}", s, jid);
                let node = jid.node().map(|n| n.as_str());
                let resource = jid.resource().map(|r| r.as_str());
                let rebuilt = format!(
                    "{}{}{}",
                    node.map(|n| format!("{n}@")).unwrap_or_default(),
                    jid.domain().as_str(),
                    resource.map(|r| format!("/{r}")).unwrap_or_default(),
                );
                prop_assert_eq!(rebuilt.as_str(), jid.as_str());
                prop_assert!(!jid.domain().as_str().ends_with('.'));
                prop_assert!(node.is_none_or(|n| !n.is_empty() && n.len() <= 1023));
                prop_assert!(resource.is_none_or(|r| !r.is_empty() && r.len() <= 1023));
            }
        }
    }
}
