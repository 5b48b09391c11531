//! A shallow reader for the payload of a server-addressed IQ (RFC 6120 §8.2.3): the payload
//! element's attributes and its direct children with their text. Only stanzas addressed to
//! the server are ever read this way; routing never parses a payload.
//!
//! Input is the `inner()` of an IQ the framer has already validated (well-formed, within
//! limits, no DTD/PI/comments), so the work here is extraction, not validation; anything
//! unexpected is still an error, never a panic.

use std::borrow::Cow;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{QName, ResolveResult};
use quick_xml::{NsReader, XmlVersion};

/// Why an IQ payload cannot be read. Answered with `bad-request` (RFC 6120 §8.3.3.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// No child element, or more than one (an IQ get/set carries exactly one, §8.2.3).
    #[error("an IQ request must carry exactly one payload element")]
    NotExactlyOne,
    /// The XML could not be read.
    #[error("unreadable payload: {0}")]
    Xml(String),
}

/// One direct child of the payload element. `Debug` shows the length of the text, not the
/// text: it may be a password (XEP-0077).
#[derive(Clone, PartialEq, Eq)]
pub struct Child {
    /// Its local name.
    pub name: String,
    /// Whether it is in the payload's namespace (children of other namespaces are
    /// extensions the handler may ignore or refuse).
    pub in_payload_ns: bool,
    /// Its character data (text and CDATA of the child itself, references expanded).
    pub text: String,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("name", &self.name)
            .field("in_payload_ns", &self.in_payload_ns)
            .field("text_len", &self.text.len())
            .finish()
    }
}

/// The payload element of an IQ, one level deep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Payload {
    /// Attributes of the payload element (local name, value), without namespace
    /// declarations.
    pub attrs: Vec<(String, String)>,
    /// Its child elements in document order.
    pub children: Vec<Child>,
}

impl Payload {
    /// The value of an attribute of the payload element.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first child in the payload's namespace with this local name.
    pub fn child(&self, name: &str) -> Option<&Child> {
        self.children
            .iter()
            .find(|c| c.in_payload_ns && c.name == name)
    }
}

fn xml_err(e: impl std::fmt::Display) -> PayloadError {
    PayloadError::Xml(e.to_string())
}

/// Reads the payload element out of an IQ's inner bytes. `payload_ns` is the namespace the
/// envelope resolved for it (through declarations outside `inner`, if need be).
pub fn parse(inner: &[u8], payload_ns: &str) -> Result<Payload, PayloadError> {
    let text = std::str::from_utf8(inner).map_err(xml_err)?;
    let mut reader = NsReader::from_str(text);
    reader.config_mut().trim_text(false);
    let mut state = State {
        payload_ns,
        payload: Payload::default(),
        payload_prefix: None,
        seen_payload: false,
    };
    // Depth inside the payload: 0 outside it, 1 directly inside it, 2 inside a child.
    let mut depth = 0usize;
    loop {
        let (resolved, event) = reader.read_resolved_event().map_err(xml_err)?;
        match event {
            Event::Start(start) => {
                state.element(depth, &resolved, &start)?;
                depth += 1;
            }
            // An empty-element tag has no end event, so it leaves the depth alone.
            Event::Empty(start) => state.element(depth, &resolved, &start)?,
            Event::End(_) => depth = depth.saturating_sub(1),
            Event::Text(t) if depth == 2 => state.push_text(&t.xml10_content()),
            Event::CData(t) if depth == 2 => state.push_text(&t.xml10_content()),
            Event::GeneralRef(r) if depth == 2 => {
                let c = match r.resolve_char_ref().map_err(xml_err)? {
                    Some(c) => c,
                    None => predefined(&r).ok_or_else(|| xml_err("unknown entity"))?,
                };
                state.push_text(c.encode_utf8(&mut [0u8; 4]));
            }
            Event::Text(t) if depth == 0 && !t.trim_ascii().is_empty() => {
                return Err(xml_err("text beside the payload"));
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !state.seen_payload {
        return Err(PayloadError::NotExactlyOne);
    }
    Ok(state.payload)
}

struct State<'a> {
    payload_ns: &'a str,
    payload: Payload,
    /// The prefix the payload element was written with, if any.
    payload_prefix: Option<String>,
    seen_payload: bool,
}

impl State<'_> {
    /// A start or empty-element tag at `depth`.
    fn element(
        &mut self,
        depth: usize,
        resolved: &ResolveResult<'_>,
        start: &BytesStart<'_>,
    ) -> Result<(), PayloadError> {
        match depth {
            0 => {
                if self.seen_payload {
                    return Err(PayloadError::NotExactlyOne);
                }
                self.seen_payload = true;
                self.payload_prefix = prefix_of(start.name());
                self.payload.attrs = attributes(start)?;
            }
            1 => {
                let in_payload_ns = match resolved {
                    ResolveResult::Bound(ns) => ns.as_ref() == self.payload_ns,
                    // The prefix (or default namespace) was declared outside `inner`: it is
                    // the payload's own when the child uses the payload's prefix.
                    _ => prefix_of(start.name()) == self.payload_prefix,
                };
                self.payload.children.push(Child {
                    name: local_name(start),
                    in_payload_ns,
                    text: String::new(),
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn push_text(&mut self, text: &str) {
        if let Some(child) = self.payload.children.last_mut() {
            child.text.push_str(text);
        }
    }
}

fn prefix_of(name: QName<'_>) -> Option<String> {
    name.prefix().map(|p| p.as_ref().to_owned())
}

fn predefined(name: &str) -> Option<char> {
    Some(match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => return None,
    })
}

fn local_name(start: &BytesStart<'_>) -> String {
    start.local_name().as_ref().to_owned()
}

fn attributes(start: &BytesStart<'_>) -> Result<Vec<(String, String)>, PayloadError> {
    let mut out = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(xml_err)?;
        let key = attr.key;
        if key.as_namespace_binding().is_some() {
            continue;
        }
        let name = key.local_name().as_ref().to_owned();
        let value: Cow<'_, str> = attr
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(xml_err)?;
        out.push((name, value.into_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_children_and_text() {
        let p = parse(
            b"<query xmlns='jabber:iq:register'><username>bill</username>\
              <password>a&amp;b&#x3C;c<![CDATA[<d>]]></password><x xmlns='jabber:x:data'/></query>",
            "jabber:iq:register",
        )
        .unwrap();
        assert_eq!(p.child("username").unwrap().text, "bill");
        assert_eq!(p.child("password").unwrap().text, "a&b<c<d>");
        assert!(p.child("x").is_none(), "x is in another namespace");
        assert_eq!(p.children.len(), 3);
        assert!(
            !format!("{p:?}").contains("a&b"),
            "Debug must not show the password"
        );
    }

    #[test]
    fn empty_payload_and_attributes() {
        let p = parse(
            b"<query xmlns='http://jabber.org/protocol/disco#info' node='n&apos;1'/>",
            "http://jabber.org/protocol/disco#info",
        )
        .unwrap();
        assert_eq!(p.attr("node"), Some("n'1"));
        assert_eq!(p.attr("xmlns"), None);
        assert!(p.children.is_empty());
    }

    #[test]
    fn prefixes_declared_outside_are_the_payloads_own() {
        let p = parse(
            b"<r:query><r:remove/><other/></r:query>",
            "jabber:iq:register",
        )
        .unwrap();
        assert!(p.child("remove").is_some());
        assert!(!p.children[1].in_payload_ns);
    }

    #[test]
    fn deeper_text_is_not_a_childs_text() {
        let p = parse(b"<query xmlns='q'><a>x<b>y</b>z</a><c/></query>", "q").unwrap();
        assert_eq!(p.child("a").unwrap().text, "xz");
        assert!(p.child("b").is_none());
        assert!(p.child("c").is_some());
    }

    #[test]
    fn exactly_one_payload() {
        assert_eq!(parse(b"", "q"), Err(PayloadError::NotExactlyOne));
        assert_eq!(parse(b"  ", "q"), Err(PayloadError::NotExactlyOne));
        assert_eq!(
            parse(b"<a xmlns='q'/><b xmlns='q'/>", "q"),
            Err(PayloadError::NotExactlyOne)
        );
        assert!(parse(b"\n <a xmlns='q'>t</a>\n", "q").is_ok());
    }
}
