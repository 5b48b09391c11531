//! Splitting the server's half of an XMPP stream (RFC 6120 §4.2, §4.3) into the stream header,
//! complete top-level elements and the closing tag, from bytes that arrive in pieces.
//!
//! A deliberately small, lenient scanner independent of `starling-xml`: it only finds element
//! boundaries (quoted attribute values, comments, CDATA and processing instructions are
//! stepped over) and leaves well-formedness to minidom, which parses each element. Whitespace
//! between top-level elements (keepalives, RFC 6120 §4.6.1) is dropped.

use std::collections::BTreeMap;

/// What the scanner found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `<stream:stream ...>`, with its attributes (namespace declarations included).
    Header(Vec<(String, String)>),
    /// One complete top-level element, as the bytes received.
    Element(String),
    /// `</stream:stream>`.
    Close,
}

/// Accumulates bytes and yields frames.
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    buf: Vec<u8>,
}

impl Scanner {
    /// Appends received bytes.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet framed (for error messages).
    pub(crate) fn buffered(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// Forgets everything buffered (stream restart after TLS or SASL success, RFC 6120 §5.4.3.3
    /// and §6.4.6, when nothing may follow the `<proceed/>` or `<success/>`).
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error for input no
    /// server may send (text at the top level, a DTD).
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        loop {
            let start = self
                .buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(self.buf.len());
            self.buf.drain(..start);
            let Some(&first) = self.buf.first() else {
                return Ok(None);
            };
            if first != b'<' {
                return Err(format!(
                    "character data at the top level of the stream: {:?}",
                    preview(&self.buf)
                ));
            }
            let Some(markup) = scan_markup(&self.buf, 0)? else {
                return Ok(None);
            };
            match markup.kind {
                Markup::Skipped => {
                    self.buf.drain(..markup.end);
                }
                Markup::End => {
                    self.buf.drain(..markup.end);
                    return Ok(Some(Frame::Close));
                }
                Markup::Start { empty } => {
                    let tag =
                        String::from_utf8_lossy(self.buf.get(..markup.end).unwrap_or_default())
                            .into_owned();
                    let name = tag_name(&tag);
                    if name == "stream" || name.ends_with(":stream") {
                        let attrs = parse_attributes(&tag)?;
                        self.buf.drain(..markup.end);
                        return Ok(Some(Frame::Header(attrs)));
                    }
                    if empty {
                        self.buf.drain(..markup.end);
                        return Ok(Some(Frame::Element(tag)));
                    }
                    let Some(end) = element_end(&self.buf, markup.end)? else {
                        return Ok(None);
                    };
                    let element: Vec<u8> = self.buf.drain(..end).collect();
                    return Ok(Some(Frame::Element(
                        String::from_utf8(element).map_err(|_| "element is not UTF-8")?,
                    )));
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Markup {
    Start { empty: bool },
    End,
    Skipped,
}

#[derive(Debug, Clone, Copy)]
struct Scanned {
    kind: Markup,
    end: usize,
}

/// Scans the markup starting at `buf[at] == b'<'`; `None` when it is not complete yet.
fn scan_markup(buf: &[u8], at: usize) -> Result<Option<Scanned>, String> {
    let rest = buf.get(at..).unwrap_or_default();
    let skip_to = |terminator: &[u8]| {
        find(rest, terminator).map(|i| Scanned {
            kind: Markup::Skipped,
            end: at + i + terminator.len(),
        })
    };
    if rest.starts_with(b"<?") {
        return Ok(skip_to(b"?>"));
    }
    if rest.starts_with(b"<!--") {
        return Ok(skip_to(b"-->"));
    }
    if rest.starts_with(b"<![CDATA[") {
        return Ok(skip_to(b"]]>"));
    }
    if rest.len() < 9 && (b"<![CDATA[".starts_with(rest) || b"<!--".starts_with(rest)) {
        return Ok(None);
    }
    if rest.starts_with(b"<!") {
        return Err(format!(
            "DTD or declaration from the server: {:?}",
            preview(rest)
        ));
    }
    let mut quote = None;
    for (i, &b) in rest.iter().enumerate().skip(1) {
        match (quote, b) {
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'>') => {
                let kind = if rest.get(1) == Some(&b'/') {
                    Markup::End
                } else {
                    Markup::Start {
                        empty: i > 0 && rest.get(i - 1) == Some(&b'/'),
                    }
                };
                return Ok(Some(Scanned {
                    kind,
                    end: at + i + 1,
                }));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Where the element whose start tag ends at `from` ends (depth back to zero).
fn element_end(buf: &[u8], from: usize) -> Result<Option<usize>, String> {
    let mut depth = 1usize;
    let mut at = from;
    while let Some(offset) = buf
        .get(at..)
        .and_then(|r| r.iter().position(|&b| b == b'<'))
    {
        at += offset;
        let Some(markup) = scan_markup(buf, at)? else {
            return Ok(None);
        };
        match markup.kind {
            Markup::Start { empty: false } => depth += 1,
            Markup::End => {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(markup.end));
                }
            }
            Markup::Start { empty: true } | Markup::Skipped => {}
        }
        at = markup.end;
    }
    Ok(None)
}

/// The qualified name of a start tag (`<stream:stream a='b'>` → `stream:stream`).
fn tag_name(tag: &str) -> &str {
    let inner = tag.trim_start_matches('<');
    let end = inner
        .find(|c: char| c.is_ascii_whitespace() || c == '>' || c == '/')
        .unwrap_or(inner.len());
    &inner[..end]
}

/// The attributes of a start tag, values unescaped.
pub(crate) fn parse_attributes(tag: &str) -> Result<Vec<(String, String)>, String> {
    let name = tag_name(tag);
    let mut rest = tag
        .trim_start_matches('<')
        .get(name.len()..)
        .unwrap_or_default()
        .trim_end_matches('>')
        .trim_end_matches('/');
    let mut attrs = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(attrs);
        }
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("attribute without '=' in {tag:?}"))?;
        let attr_name = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        let quote = after
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(|| format!("unquoted attribute value in {tag:?}"))?;
        let body = &after[1..];
        let close = body
            .find(quote)
            .ok_or_else(|| format!("unterminated attribute value in {tag:?}"))?;
        attrs.push((attr_name, unescape(&body[..close])));
        rest = &body[close + 1..];
    }
}

/// The namespace prefixes declared by stream header attributes (`xmlns`, `xmlns:p`), for
/// parsing top-level elements that rely on them.
pub(crate) fn prefixes(attrs: &[(String, String)]) -> BTreeMap<Option<String>, String> {
    attrs
        .iter()
        .filter_map(|(name, value)| {
            if name == "xmlns" {
                Some((None, value.clone()))
            } else {
                name.strip_prefix("xmlns:")
                    .map(|p| (Some(p.to_owned()), value.clone()))
            }
        })
        .collect()
}

/// Replaces the predefined entities and character references (XML 1.0 §4.6, §4.1).
pub(crate) fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let Some(semi) = after.find(';') else {
            out.push_str(after);
            return out;
        };
        let entity = &after[1..semi];
        let replacement = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "amp" => Some('&'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                .or_else(|| entity.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        };
        match replacement {
            Some(c) => out.push(c),
            None => out.push_str(&after[..=semi]),
        }
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    out
}

/// Escapes text for element content and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn preview(bytes: &[u8]) -> String {
    let shown = bytes.get(..bytes.len().min(120)).unwrap_or_default();
    String::from_utf8_lossy(shown).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='example.test' \
        version='1.0' xml:lang='en'><stream:features><starttls \
        xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features> \n\
        <message to='a@b' a=\"x>y\"><body>1 &lt; 2 <![CDATA[</body>]]></body><!-- </message> --></message>\
        <proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:stream>";

    fn frames(input: &[u8], step: usize) -> Vec<Frame> {
        let mut scanner = Scanner::default();
        let mut out = Vec::new();
        for chunk in input.chunks(step) {
            scanner.push(chunk);
            while let Some(frame) = scanner.next_frame().unwrap() {
                out.push(frame);
            }
        }
        out
    }

    #[test]
    fn frames_a_stream_whatever_the_read_boundaries() {
        let whole = frames(STREAM.as_bytes(), STREAM.len());
        assert_eq!(whole.len(), 5, "{whole:?}");
        let Frame::Header(attrs) = &whole[0] else {
            panic!("{whole:?}")
        };
        assert!(attrs.contains(&("id".into(), "s1".into())));
        assert!(attrs.contains(&("xml:lang".into(), "en".into())));
        assert!(
            matches!(&whole[1], Frame::Element(e) if e.starts_with("<stream:features>") && e.ends_with("</stream:features>"))
        );
        assert!(
            matches!(&whole[2], Frame::Element(e) if e.starts_with("<message") && e.ends_with("--></message>"))
        );
        assert!(matches!(&whole[3], Frame::Element(e) if e.starts_with("<proceed")));
        assert_eq!(whole[4], Frame::Close);
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(frames(STREAM.as_bytes(), step), whole, "step {step}");
        }
    }

    #[test]
    fn incomplete_input_waits_and_bad_input_fails() {
        let mut scanner = Scanner::default();
        scanner.push(b"<stream:stream id='x'><iq><a/>");
        assert!(matches!(scanner.next_frame(), Ok(Some(Frame::Header(_)))));
        assert_eq!(scanner.next_frame(), Ok(None));
        scanner.push(b"</iq>");
        assert!(
            matches!(scanner.next_frame(), Ok(Some(Frame::Element(e))) if e == "<iq><a/></iq>")
        );

        let mut scanner = Scanner::default();
        scanner.push(b"garbage");
        assert!(scanner.next_frame().is_err());
        let mut scanner = Scanner::default();
        scanner.push(b"<!DOCTYPE x>");
        assert!(scanner.next_frame().is_err());
    }

    #[test]
    fn attributes_and_prefixes() {
        let attrs = parse_attributes(
            "<stream:stream xmlns='jabber:client' xmlns:stream=\"http://etherx.jabber.org/streams\" to='a&amp;b' x = 'it&apos;s &#x41;&#66;'>",
        )
        .unwrap();
        assert_eq!(attrs.len(), 4);
        assert_eq!(attrs[2], ("to".into(), "a&b".into()));
        assert_eq!(attrs[3], ("x".into(), "it's AB".into()));
        let p = prefixes(&attrs);
        assert_eq!(p.get(&None).map(String::as_str), Some("jabber:client"));
        assert_eq!(
            p.get(&Some("stream".into())).map(String::as_str),
            Some("http://etherx.jabber.org/streams")
        );
        assert!(parse_attributes("<a b>").is_err());
        assert!(parse_attributes("<a b=c>").is_err());
        assert_eq!(parse_attributes("<a/>").unwrap(), vec![]);
    }

    #[test]
    fn escaping_round_trips() {
        let text = "<a href=\"x\">'&'</a> &unknown; &";
        assert_eq!(unescape(&escape(text)), text);
        assert_eq!(unescape("&unknown; &#xZZ; &"), "&unknown; &#xZZ; &");
    }
}
