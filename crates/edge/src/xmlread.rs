//! Reading the few values stream negotiation needs from inside framed elements: the
//! `mechanism` of `<auth/>` (RFC 6120 §6.4.2), the base64 text of `<auth/>` and `<response/>`,
//! `<resource/>` inside `<bind/>` (§7.6) and the fields of `jabber:iq:register` (XEP-0077 §3.1).
//!
//! Off the hot path: these run a handful of times per login, never per routed stanza. The
//! framer has already checked the bytes (well-formed, within limits, no DTD or entities), so a
//! reader error here can only mean a bug; it is reported as "absent" and the caller answers with
//! the protocol's error for a missing value.

use quick_xml::Reader;
use quick_xml::events::{BytesRef, Event};

/// The value of attribute `name` (without prefix) on the element's start tag.
pub(crate) fn attribute(raw: &[u8], name: &str) -> Option<String> {
    let mut reader = Reader::from_reader(raw);
    match reader.read_event() {
        Ok(Event::Start(start) | Event::Empty(start)) => start
            .attributes()
            .flatten()
            .find(|a| a.key.as_ref() == name)
            .and_then(|a| {
                a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                    .ok()
                    .map(|v| v.into_owned())
            }),
        _ => None,
    }
}

/// The character data directly inside the element (its children's text excluded).
pub(crate) fn text(raw: &[u8]) -> String {
    let mut out = String::new();
    walk(raw, |depth, event| {
        if depth == 1 {
            push_text(&mut out, event);
        }
    });
    out
}

/// One child of a child: its local name and its text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Field {
    pub(crate) name: String,
    pub(crate) text: String,
}

/// The children of the element's first child element, with their text: the fields of
/// `<iq><query><username>…</username>…</query></iq>` or `<iq><bind><resource>…`.
pub(crate) fn grandchildren(raw: &[u8]) -> Vec<Field> {
    let mut fields: Vec<Field> = Vec::new();
    let mut seen_first_child = false;
    let mut in_first_child = false;
    walk(raw, |depth, event| match event {
        Walk::Open(local) => {
            if depth == 2 {
                in_first_child = !seen_first_child;
                seen_first_child = true;
            } else if depth == 3 && in_first_child {
                fields.push(Field {
                    name: local.to_owned(),
                    text: String::new(),
                });
            }
        }
        Walk::Close => {
            if depth == 2 {
                in_first_child = false;
            }
        }
        other => {
            if depth == 3
                && in_first_child
                && let Some(field) = fields.last_mut()
            {
                push_text(&mut field.text, other);
            }
        }
    });
    fields
}

/// What [`walk`] reports, with the depth of the element it belongs to (1: the element itself).
enum Walk<'a> {
    Open(&'a str),
    Close,
    Text(&'a str),
    Ref(&'a BytesRef<'a>),
}

fn push_text(out: &mut String, event: Walk<'_>) {
    match event {
        Walk::Text(t) => out.push_str(t),
        Walk::Ref(r) => {
            if let Ok(Some(c)) = r.resolve_char_ref() {
                out.push(c);
            } else if let Some(s) = quick_xml::escape::resolve_predefined_entity(r) {
                out.push_str(s);
            }
        }
        Walk::Open(_) | Walk::Close => {}
    }
}

/// Calls `f` for every start tag (at the depth it opens), end (at the depth it closes) and
/// piece of text (at the depth of the element holding it).
fn walk(raw: &[u8], mut f: impl FnMut(usize, Walk<'_>)) {
    let mut reader = Reader::from_reader(raw);
    let mut depth = 0usize;
    loop {
        match reader.read_event() {
            Ok(Event::Start(start)) => {
                depth += 1;
                let local = start.local_name();
                f(depth, Walk::Open(local.as_ref()));
            }
            Ok(Event::Empty(start)) => {
                let local = start.local_name();
                f(depth + 1, Walk::Open(local.as_ref()));
                f(depth + 1, Walk::Close);
            }
            Ok(Event::End(_)) => {
                f(depth, Walk::Close);
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return;
                }
            }
            Ok(Event::Text(t)) => f(depth, Walk::Text(&t.xml10_content())),
            Ok(Event::CData(c)) => f(depth, Walk::Text(&c.xml10_content())),
            Ok(Event::GeneralRef(r)) => f(depth, Walk::Ref(&r)),
            Ok(Event::Eof) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_attributes_text_and_fields() {
        let auth = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-1'>biws&#61;</auth>";
        assert_eq!(attribute(auth, "mechanism").as_deref(), Some("SCRAM-SHA-1"));
        assert_eq!(attribute(auth, "other"), None);
        assert_eq!(text(auth), "biws=");
        assert_eq!(text(b"<abort xmlns='x'/>"), "");

        let iq = b"<iq type='set' id='1'><query xmlns='jabber:iq:register'>\
            <username>b&amp;ll</username><password><![CDATA[p<w]]></password><remove/></query>\
            <other><username>ignored</username></other></iq>";
        let fields = grandchildren(iq);
        let names: Vec<_> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["username", "password", "remove"]);
        assert_eq!(fields[0].text, "b&ll");
        assert_eq!(fields[1].text, "p<w");
        assert_eq!(fields[2].text, "");

        let bind = b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>";
        assert!(grandchildren(bind).is_empty());
    }
}
