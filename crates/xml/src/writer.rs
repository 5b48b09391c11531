//! Writing XML for an XMPP stream: stream headers, features, and server-generated elements.
//!
//! Everything is appended to a caller-owned `Vec<u8>`, so one buffer serves a whole write.
//! Attribute values and text are escaped on the way in; element names are written as given
//! and must be valid names (they are constants in Starling's code, never peer input).

use crate::escape::{escape_attr_into, escape_text_into};
use crate::ns;

/// The attributes of a stream header Starling sends.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamOpen<'a> {
    /// The content namespace: `jabber:client`, `jabber:server`...
    pub content_ns: &'a str,
    /// `from`: our domain.
    pub from: Option<&'a str>,
    /// `to`: the peer, if it told us who it is.
    pub to: Option<&'a str>,
    /// `id`: the stream id, when we are the receiving entity.
    pub id: Option<&'a str>,
    /// `xml:lang`: the stream's default language.
    pub lang: Option<&'a str>,
}

/// Writes the XML declaration and a stream header with the `stream` prefix bound to the
/// streams namespace and `version='1.0'`.
pub fn write_stream_open(out: &mut Vec<u8>, open: &StreamOpen<'_>) {
    out.extend_from_slice(b"<?xml version='1.0'?><stream:stream xmlns='");
    escape_attr_into(out, open.content_ns);
    out.extend_from_slice(b"' xmlns:stream='");
    out.extend_from_slice(ns::STREAMS.as_bytes());
    out.push(b'\'');
    for (name, value) in [("id", open.id), ("from", open.from), ("to", open.to)] {
        if let Some(value) = value {
            write_attr(out, name, value);
        }
    }
    out.extend_from_slice(b" version='1.0'");
    if let Some(lang) = open.lang {
        write_attr(out, "xml:lang", lang);
    }
    out.push(b'>');
}

/// Writes `</stream:stream>`.
pub fn write_stream_close(out: &mut Vec<u8>) {
    out.extend_from_slice(b"</stream:stream>");
}

/// Writes `<stream:features>` around the already-serialised feature elements.
pub fn write_features<'a>(out: &mut Vec<u8>, features: impl IntoIterator<Item = &'a [u8]>) {
    out.extend_from_slice(b"<stream:features>");
    for feature in features {
        out.extend_from_slice(feature);
    }
    out.extend_from_slice(b"</stream:features>");
}

/// Appends ` name='value'`, escaping the value.
pub fn write_attr(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(b' ');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"='");
    escape_attr_into(out, value);
    out.push(b'\'');
}

/// Builds elements into a buffer, closing start tags and escaping as it goes.
///
/// ```
/// use starling_xml::writer::XmlWriter;
/// let mut out = Vec::new();
/// let mut w = XmlWriter::new(&mut out);
/// w.start("iq").attr("type", "result").attr("id", "a<1");
/// w.start("query").attr("xmlns", "jabber:iq:version");
/// w.start("name").text("Starling").end("name");
/// w.end("query").end("iq");
/// assert_eq!(
///     String::from_utf8(out).unwrap(),
///     "<iq type='result' id='a&lt;1'><query xmlns='jabber:iq:version'>\
///      <name>Starling</name></query></iq>"
/// );
/// ```
#[derive(Debug)]
pub struct XmlWriter<'a> {
    out: &'a mut Vec<u8>,
    /// A start tag is open and still takes attributes.
    in_start_tag: bool,
}

impl<'a> XmlWriter<'a> {
    /// A writer appending to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        XmlWriter {
            out,
            in_start_tag: false,
        }
    }

    fn close_start_tag(&mut self) {
        if self.in_start_tag {
            self.out.push(b'>');
            self.in_start_tag = false;
        }
    }

    /// Opens `<name`; attributes may follow.
    pub fn start(&mut self, name: &str) -> &mut Self {
        self.close_start_tag();
        self.out.push(b'<');
        self.out.extend_from_slice(name.as_bytes());
        self.in_start_tag = true;
        self
    }

    /// Adds an attribute to the open start tag.
    pub fn attr(&mut self, name: &str, value: &str) -> &mut Self {
        debug_assert!(self.in_start_tag, "attribute outside a start tag");
        write_attr(self.out, name, value);
        self
    }

    /// Adds an attribute if there is a value.
    pub fn attr_opt(&mut self, name: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.attr(name, value);
        }
        self
    }

    /// Closes the open start tag as an empty element: `<name .../>`.
    pub fn empty(&mut self) -> &mut Self {
        debug_assert!(self.in_start_tag, "empty() without an open start tag");
        self.out.extend_from_slice(b"/>");
        self.in_start_tag = false;
        self
    }

    /// Writes escaped character data.
    pub fn text(&mut self, text: &str) -> &mut Self {
        self.close_start_tag();
        escape_text_into(self.out, text);
        self
    }

    /// Copies bytes that are already well-formed XML (e.g. a payload framed from a peer).
    pub fn raw(&mut self, xml: &[u8]) -> &mut Self {
        self.close_start_tag();
        self.out.extend_from_slice(xml);
        self
    }

    /// Writes `</name>`.
    pub fn end(&mut self, name: &str) -> &mut Self {
        self.close_start_tag();
        self.out.extend_from_slice(b"</");
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'>');
        self
    }

    /// Writes `<name>text</name>`.
    pub fn text_element(&mut self, name: &str, text: &str) -> &mut Self {
        self.start(name).text(text).end(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Frame, Framer};

    #[test]
    fn stream_open_is_read_back_by_the_framer() {
        let mut out = Vec::new();
        write_stream_open(
            &mut out,
            &StreamOpen {
                content_ns: ns::CLIENT,
                from: Some("example.org"),
                to: Some("juliet@example.org"),
                id: Some("s'1"),
                lang: Some("en"),
            },
        );
        let mut framer = Framer::new();
        framer.feed(&out);
        let Ok(Some(Frame::StreamOpen(header))) = framer.next_frame() else {
            panic!("no header from {}", String::from_utf8_lossy(&out));
        };
        assert_eq!(header.content_ns, ns::CLIENT);
        assert_eq!(header.from.as_deref(), Some("example.org"));
        assert_eq!(header.to.as_deref(), Some("juliet@example.org"));
        assert_eq!(header.id.as_deref(), Some("s'1"));
        assert_eq!(header.version.as_deref(), Some("1.0"));
        assert_eq!(header.lang.as_deref(), Some("en"));
    }

    #[test]
    fn features_wrap_their_children() {
        let mut out = Vec::new();
        write_features(&mut out, [&b"<a/>"[..], b"<b/>"]);
        assert_eq!(out, b"<stream:features><a/><b/></stream:features>");
        let mut out = Vec::new();
        write_stream_close(&mut out);
        assert_eq!(out, b"</stream:stream>");
    }

    #[test]
    fn writer_escapes_and_nests() {
        let mut out = Vec::new();
        XmlWriter::new(&mut out)
            .start("message")
            .attr("to", "a&b")
            .attr_opt("id", None)
            .start("body")
            .text("1 < 2 & 3")
            .end("body")
            .start("x")
            .attr("xmlns", "urn:x")
            .empty()
            .raw(b"<y/>")
            .end("message");
        assert_eq!(
            out,
            b"<message to='a&amp;b'><body>1 &lt; 2 &amp; 3</body><x xmlns='urn:x'/><y/></message>"
        );
    }
}
