//! Escaping of text and attribute values for XML written on an XMPP stream.
//!
//! Output is always UTF-8 and always well-formed: the five special characters are replaced
//! by the predefined entities, and characters XML 1.0 forbids (most C0 controls) are dropped
//! rather than written, because a peer would have to close the stream over them.

/// Appends `text` to `out`, escaped for use as element character data.
pub fn escape_text_into(out: &mut Vec<u8>, text: &str) {
    escape_into(out, text, false);
}

/// Appends `value` to `out`, escaped for use inside a single- or double-quoted attribute value.
pub fn escape_attr_into(out: &mut Vec<u8>, value: &str) {
    escape_into(out, value, true);
}

/// Returns `text` escaped as character data.
pub fn escape_text(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    escape_text_into(&mut out, text);
    // Escaping maps UTF-8 to UTF-8 and only ever drops whole ASCII characters.
    String::from_utf8(out).unwrap_or_default()
}

/// Returns `value` escaped for an attribute value.
pub fn escape_attr(value: &str) -> String {
    let mut out = Vec::with_capacity(value.len());
    escape_attr_into(&mut out, value);
    String::from_utf8(out).unwrap_or_default()
}

fn escape_into(out: &mut Vec<u8>, s: &str, attr: bool) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let replacement: &[u8] = match b {
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' if attr => b"&quot;",
            b'\'' if attr => b"&apos;",
            // Tab, newline and carriage return would be normalised to spaces inside an
            // attribute value by the reader; keep them exact with character references.
            b'\t' if attr => b"&#9;",
            b'\n' if attr => b"&#10;",
            b'\r' => b"&#13;",
            0x00..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(replacement);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_the_special_characters() {
        assert_eq!(escape_text("a<b>&c\"'"), "a&lt;b&gt;&amp;c\"'");
        assert_eq!(escape_attr("a<b>&c\"'"), "a&lt;b&gt;&amp;c&quot;&apos;");
    }

    #[test]
    fn keeps_whitespace_exact_in_attributes() {
        assert_eq!(escape_attr("a\tb\nc\rd"), "a&#9;b&#10;c&#13;d");
        assert_eq!(escape_text("a\tb\nc\rd"), "a\tb\nc&#13;d");
    }

    #[test]
    fn drops_characters_xml_forbids() {
        assert_eq!(escape_text("a\u{0}b\u{1b}c"), "abc");
    }

    #[test]
    fn passes_multibyte_text_through() {
        assert_eq!(escape_text("žluťoučký 🐦 <"), "žluťoučký 🐦 &lt;");
    }
}
