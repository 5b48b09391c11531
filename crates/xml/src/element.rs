//! A framed top-level element: its exact raw bytes and the envelope parsed from its start tag.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

use crate::escape::escape_attr_into;
use crate::ns;

/// A byte range inside an element's raw bytes (or, while framing, inside the framer's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: u32,
    pub(crate) end: u32,
}

impl Span {
    pub(crate) fn new(start: usize, end: usize) -> Self {
        // Positions are bounded by the element size limit, which is far below 4 GiB.
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    pub(crate) fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    pub(crate) fn shifted_back(self, by: usize) -> Self {
        Span {
            start: self.start - by as u32,
            end: self.end - by as u32,
        }
    }
}

/// A namespace name: a well-known one as a static string, one declared inside the element as
/// a range of its raw bytes, or anything else shared with the stream it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NsRef {
    Static(&'static str),
    Raw(Span),
    Shared(Arc<str>),
}

impl NsRef {
    pub(crate) fn resolve<'a>(&'a self, raw: &'a [u8]) -> &'a str {
        match self {
            NsRef::Static(s) => s,
            NsRef::Shared(s) => s,
            // Raw spans only ever point at validated UTF-8 without references.
            NsRef::Raw(span) => std::str::from_utf8(&raw[span.range()]).unwrap_or(""),
        }
    }

    pub(crate) fn shifted_back(self, by: usize) -> Self {
        match self {
            NsRef::Raw(span) => NsRef::Raw(span.shifted_back(by)),
            other => other,
        }
    }
}

/// An attribute value inside the raw bytes; `escaped` says it holds references to expand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Value {
    pub(crate) span: Span,
    pub(crate) escaped: bool,
}

/// An attribute that may be rewritten: where the whole `·name='value'` starts, and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddrAttr {
    /// Offset of the whitespace before the attribute name.
    pub(crate) whole_start: u32,
    pub(crate) value: Value,
}

impl AddrAttr {
    fn whole_end(&self) -> usize {
        // The closing quote follows the value.
        self.value.span.end as usize + 1
    }
}

/// The envelope of an element, filled in while its start tag is framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub(crate) qname: Span,
    pub(crate) local_start: u32,
    pub(crate) ns: NsRef,
    pub(crate) to: Option<AddrAttr>,
    pub(crate) from: Option<AddrAttr>,
    pub(crate) type_: Option<Value>,
    pub(crate) id: Option<Value>,
    pub(crate) lang: Option<Value>,
    pub(crate) first_child: Option<(Span, NsRef)>,
    /// Offset just past the `>` of the start tag.
    pub(crate) start_tag_end: u32,
    /// Offset of the `<` of the end tag; equal to the length for an empty element.
    pub(crate) end_tag_start: u32,
    /// A prefix in the element resolved to a declaration on the stream header.
    pub(crate) stream_prefixes: bool,
}

impl Envelope {
    pub(crate) fn shifted_back(self, by: usize) -> Self {
        let value = |v: Value| Value {
            span: v.span.shifted_back(by),
            escaped: v.escaped,
        };
        let addr = |a: AddrAttr| AddrAttr {
            whole_start: a.whole_start - by as u32,
            value: value(a.value),
        };
        Envelope {
            qname: self.qname.shifted_back(by),
            local_start: self.local_start - by as u32,
            ns: self.ns.shifted_back(by),
            to: self.to.map(addr),
            from: self.from.map(addr),
            type_: self.type_.map(value),
            id: self.id.map(value),
            lang: self.lang.map(value),
            first_child: self
                .first_child
                .map(|(name, ns)| (name.shifted_back(by), ns.shifted_back(by))),
            start_tag_end: self.start_tag_end - by as u32,
            end_tag_start: self.end_tag_start - by as u32,
            stream_prefixes: self.stream_prefixes,
        }
    }
}

/// One top-level element of a stream (a stanza, or a negotiation element such as `<auth/>`),
/// as its exact bytes plus the parsed envelope.
///
/// The bytes are exactly what the peer sent, validated: well-formed, within limits, UTF-8,
/// free of what RFC 6120 §11.1 forbids. Accessors read the envelope without parsing again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    raw: Bytes,
    env: Envelope,
}

impl Element {
    pub(crate) fn new(raw: Bytes, env: Envelope) -> Self {
        Element { raw, env }
    }

    /// The exact bytes of the element, from its `<` to the end of its end tag.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Takes the raw bytes, dropping the envelope.
    pub fn into_raw(self) -> Bytes {
        self.raw
    }

    /// The local name (`message`, `iq`, `auth`...).
    pub fn name(&self) -> &str {
        self.str_at(Span {
            start: self.env.local_start,
            end: self.env.qname.end,
        })
    }

    /// The qualified name as written, with its prefix if it had one.
    pub fn qname(&self) -> &str {
        self.str_at(self.env.qname)
    }

    /// The namespace name the element is in, resolved through the stream's declarations.
    pub fn ns(&self) -> &str {
        self.env.ns.resolve(&self.raw)
    }

    /// Whether this is `message`, `presence` or `iq` in a stanza namespace
    /// (`jabber:client`, `jabber:server` or `jabber:component:accept`).
    pub fn is_stanza(&self) -> bool {
        matches!(self.name(), "message" | "presence" | "iq")
            && matches!(self.ns(), ns::CLIENT | ns::SERVER | ns::COMPONENT)
    }

    /// The `to` attribute, with references expanded.
    pub fn to(&self) -> Option<Cow<'_, str>> {
        self.env.to.map(|a| self.value(a.value))
    }

    /// The `from` attribute, with references expanded.
    pub fn from(&self) -> Option<Cow<'_, str>> {
        self.env.from.map(|a| self.value(a.value))
    }

    /// The `type` attribute, with references expanded.
    pub fn stanza_type(&self) -> Option<Cow<'_, str>> {
        self.env.type_.map(|v| self.value(v))
    }

    /// The `id` attribute, with references expanded.
    pub fn id(&self) -> Option<Cow<'_, str>> {
        self.env.id.map(|v| self.value(v))
    }

    /// The `xml:lang` attribute, with references expanded.
    pub fn lang(&self) -> Option<Cow<'_, str>> {
        self.env.lang.map(|v| self.value(v))
    }

    /// The local name and namespace of the first child element, if there is one: enough to
    /// dispatch an `<iq/>` by its payload without parsing the payload.
    pub fn first_child(&self) -> Option<(&str, &str)> {
        self.env
            .first_child
            .as_ref()
            .map(|(name, ns)| (self.str_at(*name), ns.resolve(&self.raw)))
    }

    /// Whether the element was written as an empty-element tag (`<x/>`).
    pub fn is_empty_tag(&self) -> bool {
        self.env.end_tag_start as usize == self.raw.len()
    }

    /// The bytes between the start tag and the end tag: the payload, children and text as
    /// sent, in the namespace context of this element.
    pub fn inner(&self) -> Bytes {
        self.raw
            .slice(self.env.start_tag_end as usize..self.env.end_tag_start as usize)
    }

    /// Writes the element to `out` with its `to` and/or `from` attributes set or replaced,
    /// copying every other byte unchanged. `None` leaves that attribute as it is.
    pub fn write_with_addresses(&self, out: &mut Vec<u8>, to: Option<&str>, from: Option<&str>) {
        let raw = &self.raw[..];
        // The attributes to cut, in the order they appear.
        let mut cuts: [Option<(usize, usize)>; 2] = [None, None];
        if to.is_some() {
            cuts[0] = self.env.to.map(|a| (a.whole_start as usize, a.whole_end()));
        }
        if from.is_some() {
            cuts[1] = self
                .env
                .from
                .map(|a| (a.whole_start as usize, a.whole_end()));
        }
        if let [Some(a), Some(b)] = cuts
            && b.0 < a.0
        {
            cuts = [Some(b), Some(a)];
        }
        let name_end = self.env.qname.end as usize;
        let extra = to.map_or(0, |t| t.len() + 6) + from.map_or(0, |f| f.len() + 8);
        out.reserve(raw.len() + extra);
        out.extend_from_slice(&raw[..name_end]);
        if let Some(from) = from {
            out.extend_from_slice(b" from='");
            escape_attr_into(out, from);
            out.push(b'\'');
        }
        if let Some(to) = to {
            out.extend_from_slice(b" to='");
            escape_attr_into(out, to);
            out.push(b'\'');
        }
        let mut at = name_end;
        for (start, end) in cuts.into_iter().flatten() {
            out.extend_from_slice(&raw[at..start]);
            at = end;
        }
        out.extend_from_slice(&raw[at..]);
    }

    /// Returns the element with its `to` and/or `from` set or replaced, the rest unchanged.
    pub fn with_addresses(&self, to: Option<&str>, from: Option<&str>) -> Bytes {
        if to.is_none() && from.is_none() {
            return self.raw.clone();
        }
        let mut out = Vec::new();
        self.write_with_addresses(&mut out, to, from);
        Bytes::from(out)
    }

    /// Like [`Element::with_addresses`], but returns an `Element` whose envelope is moved
    /// along with the bytes instead of parsed again: the cheap way to stamp `from` on every
    /// stanza a client sends.
    pub fn readdressed(&self, to: Option<&str>, from: Option<&str>) -> Element {
        if to.is_none() && from.is_none() {
            return self.clone();
        }
        let mut out = Vec::new();
        self.write_with_addresses(&mut out, to, from);
        let env = &self.env;
        let name_end = env.qname.end;
        // What was cut, in order, and how much was inserted right after the name.
        let mut cuts: Vec<(u32, u32)> = Vec::with_capacity(2);
        if to.is_some()
            && let Some(a) = env.to
        {
            cuts.push((a.whole_start, a.whole_end() as u32));
        }
        if from.is_some()
            && let Some(a) = env.from
        {
            cuts.push((a.whole_start, a.whole_end() as u32));
        }
        cuts.sort_unstable();
        let removed: u32 = cuts.iter().map(|(s, e)| e - s).sum();
        let inserted = (out.len() + removed as usize - self.raw.len()) as u32;
        let shift = |off: u32| -> u32 {
            if off < name_end {
                return off;
            }
            let before: u32 = cuts
                .iter()
                .filter(|(_, e)| *e <= off)
                .map(|(s, e)| e - s)
                .sum();
            off + inserted - before
        };
        let span = |sp: Span| Span {
            start: shift(sp.start),
            end: shift(sp.end),
        };
        let value = |v: Value| Value {
            span: span(v.span),
            escaped: v.escaped,
        };
        let ns = |n: &NsRef| match n {
            NsRef::Raw(sp) => NsRef::Raw(span(*sp)),
            other => other.clone(),
        };
        // The new attributes sit right after the name: ` from='…'` first, then ` to='…'`.
        let mut at = name_end;
        let mut placed = |prefix_len: u32, present: bool| -> Option<AddrAttr> {
            if !present {
                return None;
            }
            let start = at + prefix_len;
            let end = start
                + out[start as usize..]
                    .iter()
                    .position(|b| *b == b'\'')
                    .unwrap_or(0) as u32;
            at = end + 1;
            let escaped = out[start as usize..end as usize].contains(&b'&');
            Some(AddrAttr {
                whole_start: start - prefix_len,
                value: Value {
                    span: Span { start, end },
                    escaped,
                },
            })
        };
        let new_from = placed(7, from.is_some());
        let new_to = placed(5, to.is_some());
        let new_env = Envelope {
            qname: env.qname,
            local_start: env.local_start,
            ns: ns(&env.ns),
            to: if to.is_some() {
                new_to
            } else {
                env.to.map(|a| AddrAttr {
                    whole_start: shift(a.whole_start),
                    value: value(a.value),
                })
            },
            from: if from.is_some() {
                new_from
            } else {
                env.from.map(|a| AddrAttr {
                    whole_start: shift(a.whole_start),
                    value: value(a.value),
                })
            },
            type_: env.type_.map(value),
            id: env.id.map(value),
            lang: env.lang.map(value),
            first_child: env.first_child.as_ref().map(|(n, c)| (span(*n), ns(c))),
            start_tag_end: shift(env.start_tag_end),
            end_tag_start: shift(env.end_tag_start),
            stream_prefixes: env.stream_prefixes,
        };
        Element {
            raw: Bytes::from(out),
            env: new_env,
        }
    }

    /// Whether the element uses a namespace prefix declared on the stream header of the
    /// stream it came from. Such an element cannot be copied to another stream as it is.
    pub fn uses_stream_prefixes(&self) -> bool {
        self.env.stream_prefixes
    }

    fn str_at(&self, span: Span) -> &str {
        // The framer validated the whole element as UTF-8 and spans sit on ASCII boundaries.
        std::str::from_utf8(&self.raw[span.range()]).unwrap_or("")
    }

    fn value(&self, v: Value) -> Cow<'_, str> {
        let s = self.str_at(v.span);
        if v.escaped {
            Cow::Owned(unescape_attr(s))
        } else {
            Cow::Borrowed(s)
        }
    }
}

/// Expands the predefined entities and character references of an attribute value the framer
/// has validated, and applies XML's attribute-value normalisation of literal whitespace.
pub(crate) fn unescape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(['&', '\t', '\n', '\r']) {
        out.push_str(&rest[..i]);
        if rest.as_bytes()[i] != b'&' {
            out.push(' ');
            rest = &rest[i + 1..];
            continue;
        }
        let after = &rest[i + 1..];
        let Some(semi) = after.find(';') else {
            out.push_str(&rest[i..]);
            return out;
        };
        match expand_reference(&after[..semi]) {
            Some(c) => out.push(c),
            None => out.push_str(&rest[i..=i + 1 + semi]),
        }
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    out
}

/// The character a predefined entity or character reference stands for, if it is one and
/// names a character XML allows.
pub(crate) fn expand_reference(name: &str) -> Option<char> {
    match name {
        "lt" => Some('<'),
        "gt" => Some('>'),
        "amp" => Some('&'),
        "apos" => Some('\''),
        "quot" => Some('"'),
        _ => {
            let digits = name.strip_prefix('#')?;
            let code = if let Some(hex) = digits.strip_prefix('x') {
                if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                u32::from_str_radix(hex, 16).ok()?
            } else {
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                digits.parse::<u32>().ok()?
            };
            let c = char::from_u32(code)?;
            is_xml_char(c).then_some(c)
        }
    }
}

/// XML 1.0 `Char`: tab, newline, carriage return, and everything from space up except
/// surrogates (which `char` cannot hold) and U+FFFE/U+FFFF.
pub(crate) fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | ' '..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}
