//! Framing tests through the public API: what comes out for valid streams, which stream
//! error each kind of bad input gets, and that every way of splitting the input gives the
//! same frames.

use proptest::prelude::*;
use starling_xml::{Condition, Element, Frame, Framer, Limits};

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0' xml:lang='en'>";

/// Feeds all of `input` in the given chunk sizes (cycled), collecting frames until the
/// first error.
fn frame_chunks(input: &[u8], chunks: &[usize], limits: Limits) -> (Vec<Frame>, Option<Condition>) {
    let mut framer = Framer::with_limits(limits);
    let mut frames = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < input.len() {
        let n = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(input.len())
            .max(1);
        let end = (at + n).min(input.len());
        framer.feed(&input[at..end]);
        at = end;
        i += 1;
        loop {
            match framer.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.condition)),
            }
        }
    }
    (frames, None)
}

fn frame_all(input: &str) -> (Vec<Frame>, Option<Condition>) {
    frame_chunks(input.as_bytes(), &[input.len()], Limits::default())
}

fn elements(frames: &[Frame]) -> Vec<&Element> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Element(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn error_of(body: &str) -> Option<Condition> {
    frame_all(&format!("{HEADER}{body}")).1
}

#[test]
fn header_elements_and_close() {
    let input = format!(
        "{HEADER}<message to='juliet@example.org/balcony' from='romeo@example.net' type='chat' \
         id='m1'><body>Art thou not Romeo?</body></message>\n \t<presence/>\
         <iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>"
    );
    let (frames, err) = frame_all(&input);
    assert_eq!(err, None);
    assert_eq!(frames.len(), 5);
    let Frame::StreamOpen(header) = &frames[0] else {
        panic!("first frame {:?}", frames[0])
    };
    assert_eq!(header.to.as_deref(), Some("example.org"));
    assert_eq!(header.version.as_deref(), Some("1.0"));
    assert_eq!(header.lang.as_deref(), Some("en"));
    assert_eq!(header.content_ns, "jabber:client");
    assert_eq!(frames[4], Frame::StreamClose);

    let els = elements(&frames);
    let msg = els[0];
    assert_eq!(msg.name(), "message");
    assert_eq!(msg.ns(), "jabber:client");
    assert!(msg.is_stanza());
    assert_eq!(msg.to().as_deref(), Some("juliet@example.org/balcony"));
    assert_eq!(msg.from().as_deref(), Some("romeo@example.net"));
    assert_eq!(msg.stanza_type().as_deref(), Some("chat"));
    assert_eq!(msg.id().as_deref(), Some("m1"));
    assert_eq!(msg.first_child(), Some(("body", "jabber:client")));
    assert_eq!(&msg.inner()[..], b"<body>Art thou not Romeo?</body>");
    assert!(msg.raw().starts_with(b"<message ") && msg.raw().ends_with(b"</message>"));

    let presence = els[1];
    assert_eq!(presence.raw().as_ref(), b"<presence/>");
    assert!(presence.is_empty_tag());
    assert_eq!(presence.first_child(), None);
    assert_eq!(presence.to(), None);

    assert_eq!(els[2].first_child(), Some(("ping", "urn:xmpp:ping")));
}

#[test]
fn namespaces_prefixes_and_redeclarations() {
    let input = format!(
        "{HEADER}<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>\
         <auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldAByMG0zMG15cjBtMzA=</auth>\
         <p:message xmlns:p='jabber:client' to='a@b'><p:body>x</p:body></p:message>\
         <iq xmlns:q='urn:a' type='get'><q:query xmlns:q='urn:b' q:attr='1'/></iq>\
         <message><x xmlns='urn:custom:thing'><y/></x></message>"
    );
    let (frames, err) = frame_all(&input);
    assert_eq!(err, None, "{frames:?}");
    let els = elements(&frames);
    assert_eq!(
        (els[0].name(), els[0].ns()),
        ("features", "http://etherx.jabber.org/streams")
    );
    assert_eq!(els[0].qname(), "stream:features");
    assert_eq!(
        els[0].first_child(),
        Some(("starttls", "urn:ietf:params:xml:ns:xmpp-tls"))
    );
    assert_eq!(
        (els[1].name(), els[1].ns()),
        ("auth", "urn:ietf:params:xml:ns:xmpp-sasl")
    );
    assert_eq!((els[2].name(), els[2].ns()), ("message", "jabber:client"));
    assert_eq!(els[2].qname(), "p:message");
    // The inner declaration of `q` wins over the outer one.
    assert_eq!(els[3].first_child(), Some(("query", "urn:b")));
    assert_eq!(els[4].first_child(), Some(("x", "urn:custom:thing")));
}

#[test]
fn server_and_component_streams() {
    for content in ["jabber:server", "jabber:component:accept"] {
        let input = format!(
            "<stream:stream xmlns='{content}' xmlns:stream='http://etherx.jabber.org/streams'>\
             <message from='a@x' to='b@y'/>"
        );
        let (frames, err) = frame_all(&input);
        assert_eq!(err, None);
        let Frame::StreamOpen(h) = &frames[0] else {
            panic!()
        };
        assert_eq!(h.content_ns, content);
        let el = elements(&frames)[0];
        assert_eq!(el.ns(), content);
        assert!(el.is_stanza());
    }
}

#[test]
fn content_namespace_can_be_restricted() {
    let mut framer = Framer::new();
    framer.allow_content_namespaces(&["jabber:client"]);
    framer.feed(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    assert_eq!(
        framer.next_frame().unwrap_err().condition,
        Condition::InvalidNamespace
    );
}

#[test]
fn attribute_values_are_unescaped_on_access() {
    let input = format!(
        "{HEADER}<message to='a@b/r&amp;&#x26;&#38;&lt;&quot;' id=\"x&apos;y\" from='c@d/e\tf'/>"
    );
    let (frames, err) = frame_all(&input);
    assert_eq!(err, None);
    let el = elements(&frames)[0];
    assert_eq!(el.to().as_deref(), Some("a@b/r&&&<\""));
    assert_eq!(el.id().as_deref(), Some("x'y"));
    // Attribute-value normalisation turns a literal tab into a space.
    assert_eq!(el.from().as_deref(), Some("c@d/e f"));
}

#[test]
fn text_with_references_and_cdata_is_accepted() {
    let input = format!(
        "{HEADER}<message><body>a &lt; b &amp;&#233;&#x1F426; <![CDATA[<not markup>]]> ž</body></message>"
    );
    let (frames, err) = frame_all(&input);
    assert_eq!(err, None);
    assert_eq!(elements(&frames).len(), 1);
}

#[test]
fn byte_order_mark_and_whitespace_before_header() {
    let input = format!("\u{FEFF}{HEADER}<presence/>");
    assert_eq!(frame_all(&input).1, None);
    let input = format!("\n  {}<presence/>", &HEADER[21..]);
    let (frames, err) = frame_all(&input);
    assert_eq!(err, None);
    assert_eq!(frames.len(), 2);
}

#[test]
fn rewriting_addresses_copies_the_rest() {
    let input = format!(
        "{HEADER}<message from='spoofed@evil' type='chat' to='juliet@example.org'><body>hi</body></message>\
         <presence/>"
    );
    let (frames, _) = frame_all(&input);
    let els = elements(&frames);
    let stamped = els[0].with_addresses(None, Some("romeo@example.net/orchard"));
    assert_eq!(
        &stamped[..],
        b"<message from='romeo@example.net/orchard' type='chat' to='juliet@example.org'><body>hi</body></message>"
    );
    let both = els[0].with_addresses(Some("juliet@example.org/balcony"), Some("r@x/'y"));
    assert_eq!(
        &both[..],
        b"<message from='r@x/&apos;y' to='juliet@example.org/balcony' type='chat'><body>hi</body></message>"
    );
    let presence = els[1].with_addresses(Some("a@b"), Some("c@d"));
    assert_eq!(&presence[..], b"<presence from='c@d' to='a@b'/>");
    // The result frames again to the same envelope with the new addresses.
    let again = frame_all(&format!("{HEADER}{}", String::from_utf8_lossy(&both)));
    let el = elements(&again.0)[0].clone();
    assert_eq!(el.to().as_deref(), Some("juliet@example.org/balcony"));
    assert_eq!(el.from().as_deref(), Some("r@x/'y"));
    assert_eq!(el.stanza_type().as_deref(), Some("chat"));
}

#[test]
fn restricted_xml_is_refused() {
    assert_eq!(error_of("<!-- hi -->"), Some(Condition::RestrictedXml));
    assert_eq!(
        error_of("<message><!-- hi --></message>"),
        Some(Condition::RestrictedXml)
    );
    assert_eq!(error_of("<?php echo 1; ?>"), Some(Condition::RestrictedXml));
    assert_eq!(
        error_of("<message><body>&nbsp;</body></message>"),
        Some(Condition::RestrictedXml)
    );
    assert_eq!(
        error_of("<message to='&foo;'/>"),
        Some(Condition::RestrictedXml)
    );
    assert_eq!(
        frame_all("<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream>").1,
        Some(Condition::RestrictedXml)
    );
    assert_eq!(
        error_of("<?xml version='1.0'?>"),
        Some(Condition::RestrictedXml)
    );
    // Cut short, these can already be told apart from anything allowed.
    assert_eq!(
        frame_all(&format!("{HEADER}<message><!--")).1,
        Some(Condition::RestrictedXml)
    );
    assert_eq!(
        frame_all(&format!("{HEADER}<message><!DOCTY")).1,
        Some(Condition::RestrictedXml)
    );
}

#[test]
fn malformed_xml_is_refused() {
    for (body, why) in [
        ("<message></presence>", "mismatched end tag"),
        ("<message a='1' a='2'/>", "duplicate attribute"),
        ("<message a=1/>", "unquoted attribute"),
        ("<message a='1'b='2'/>", "missing whitespace"),
        ("<message a='<'/>", "< in attribute"),
        ("<message><body>a & b</body></message>", "bare ampersand"),
        ("<message><body>a ]]> b</body></message>", "]]> in text"),
        ("<message><body>&#0;</body></message>", "reference to NUL"),
        (
            "<message><body>&#xD800;</body></message>",
            "reference to a surrogate",
        ),
        ("<message><body>\u{1}</body></message>", "control character"),
        ("<message><body>\u{FFFE}</body></message>", "non-character"),
        ("<1message/>", "name starting with a digit"),
        ("<p:message/>", "undeclared prefix"),
        ("<message p:a='1'/>", "undeclared attribute prefix"),
        ("<message xmlns:p=''/>", "undeclaring a prefix"),
        ("<message xmlns:xml='urn:x'/>", "rebinding xml"),
        ("<message xmlns:xmlns='urn:x'/>", "declaring xmlns"),
        ("<message a:b:c='1'/>", "two colons"),
        ("</message>", "end tag of nothing"),
        ("</stream:streams>", "wrong stream end"),
    ] {
        assert_eq!(
            error_of(body),
            Some(Condition::NotWellFormed),
            "{why}: {body}"
        );
    }
}

#[test]
fn bad_format_and_namespace_errors() {
    assert_eq!(error_of("hello"), Some(Condition::BadFormat));
    assert_eq!(
        error_of("<presence/>hello<presence/>"),
        Some(Condition::BadFormat)
    );
    assert_eq!(error_of("<presence/>&amp;"), Some(Condition::BadFormat));
    assert_eq!(error_of("<![CDATA[x]]>"), Some(Condition::BadFormat));
    assert_eq!(
        frame_all("<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>").1,
        Some(Condition::InvalidNamespace)
    );
    assert_eq!(
        frame_all(
            "<stream:stream xmlns='urn:wrong' xmlns:stream='http://etherx.jabber.org/streams'>"
        )
        .1,
        Some(Condition::InvalidNamespace)
    );
    assert_eq!(
        frame_all("<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>").1,
        Some(Condition::BadNamespacePrefix)
    );
    assert_eq!(
        frame_all("<stream:stream xmlns='jabber:client'>").1,
        Some(Condition::BadNamespacePrefix)
    );
    assert_eq!(
        frame_all(
            "<stream:flow xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
        )
        .1,
        Some(Condition::BadFormat)
    );
    assert_eq!(frame_all("hello").1, Some(Condition::NotWellFormed));
}

#[test]
fn encodings_other_than_utf8_are_refused() {
    assert_eq!(
        frame_all("<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream>").1,
        Some(Condition::UnsupportedEncoding)
    );
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend("<".encode_utf16().flat_map(|u| u.to_le_bytes()));
    assert_eq!(
        frame_chunks(&utf16, &[100], Limits::default()).1,
        Some(Condition::UnsupportedEncoding)
    );
    let mut latin1 = format!("{HEADER}<message><body>").into_bytes();
    latin1.extend_from_slice(b"caf\xE9</body></message>");
    assert_eq!(
        frame_chunks(&latin1, &[latin1.len()], Limits::default()).1,
        Some(Condition::UnsupportedEncoding)
    );
    let mut bad_attr = format!("{HEADER}<message to='").into_bytes();
    bad_attr.extend_from_slice(b"\xC3\x28'/>");
    assert_eq!(
        frame_chunks(&bad_attr, &[bad_attr.len()], Limits::default()).1,
        Some(Condition::UnsupportedEncoding)
    );
}

#[test]
fn limits_are_enforced_before_the_element_completes() {
    let limits = Limits {
        max_element_size: 1024,
        ..Limits::default()
    };
    // An element that never ends: refused once it passes the limit, not buffered further.
    let mut framer = Framer::with_limits(limits);
    framer.feed(HEADER.as_bytes());
    assert!(matches!(
        framer.next_frame(),
        Ok(Some(Frame::StreamOpen(_)))
    ));
    framer.feed(b"<message><body>");
    assert_eq!(framer.next_frame(), Ok(None));
    let chunk = [b'a'; 100];
    let mut result = Ok(None);
    for _ in 0..20 {
        framer.feed(&chunk);
        result = framer.next_frame();
        assert!(framer.buffered() <= 1024 + 100);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result.unwrap_err().condition, Condition::PolicyViolation);
    // An endless start tag is refused the same way.
    let mut framer = Framer::with_limits(limits);
    framer.feed(HEADER.as_bytes());
    let _ = framer.next_frame();
    framer.feed(b"<message to='");
    framer.feed(&[b'x'; 2000]);
    assert_eq!(
        framer.next_frame().unwrap_err().condition,
        Condition::PolicyViolation
    );

    let deep = "<a>".repeat(40) + &"</a>".repeat(40);
    assert_eq!(error_of(&deep), Some(Condition::PolicyViolation));
    let shallow = "<a>".repeat(30) + &"</a>".repeat(30);
    assert_eq!(error_of(&shallow), None);
    let attrs: String = (0..65).map(|i| format!(" a{i}='1'")).collect();
    assert_eq!(
        error_of(&format!("<message{attrs}/>")),
        Some(Condition::PolicyViolation)
    );
    let decls: String = (0..17).map(|i| format!(" xmlns:p{i}='urn:{i}'")).collect();
    assert_eq!(
        error_of(&format!("<message{decls}/>")),
        Some(Condition::PolicyViolation)
    );
    // Whitespace keepalives are consumed as they come and never accumulate.
    let mut framer = Framer::with_limits(limits);
    framer.feed(HEADER.as_bytes());
    let _ = framer.next_frame();
    for _ in 0..100 {
        framer.feed(&[b' '; 100]);
        assert_eq!(framer.next_frame(), Ok(None));
    }
    assert!(framer.is_idle());
}

#[test]
fn after_close_or_error_nothing_more_is_framed() {
    let (frames, err) = frame_all(&format!("{HEADER}</stream:stream><presence/>"));
    assert_eq!(err, None);
    assert_eq!(frames.len(), 2);
    let mut framer = Framer::new();
    framer.feed(b"<stream:stream xmlns='jabber:client'>");
    let err = framer.next_frame().unwrap_err();
    framer.feed(HEADER.as_bytes());
    assert_eq!(framer.next_frame().unwrap_err(), err);
    framer.reset();
    framer.feed(HEADER.as_bytes());
    assert!(matches!(
        framer.next_frame(),
        Ok(Some(Frame::StreamOpen(_)))
    ));
}

/// A corpus of streams to split: valid ones and ones ending in each kind of error.
fn corpus() -> Vec<String> {
    vec![
        format!(
            "{HEADER}<message to='juliet@example.org' id='a&amp;b'><body>žluťoučký kůň 🐦 &lt;3</body>\
             <x xmlns='urn:x' xmlns:p='urn:p'><p:y p:z='1'/></x></message> \n<presence><show>away</show>\
             <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='v'/></presence>\
             <iq type='result' id='r'><query xmlns='jabber:iq:roster'><item jid='a@b' name='Ä'/></query></iq>\
             <message><body><![CDATA[<raw> & stuff]]></body></message></stream:stream>"
        ),
        format!("\u{FEFF}{HEADER}<presence/>  <presence type='unavailable'/>"),
        format!("{HEADER}<message><body>ok</body></message><message><!-- no --></message>"),
        format!("{HEADER}<message><body>ok</body></message><message a='1' a='1'/>"),
        format!("{HEADER}<a><b>text ]]> here</b></a>"),
        format!("{HEADER}<presence/>stray"),
        format!("{HEADER}<message><body>\u{20AC}&unknown;</body></message>"),
        format!("{HEADER}<message><y a='1'/>\u{FEFF}<body>\u{FEFF}x</body></message>"),
        format!("<?xml\r\n\tversion='1.0'?>{}<presence/>", &HEADER[21..]),
        format!("   <?xml version='1.0'?>{}", &HEADER[21..]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_split_gives_the_same_frames(
        which in 0usize..10,
        chunks in proptest::collection::vec(1usize..40, 1..12),
    ) {
        let input = &corpus()[which];
        let whole = frame_chunks(input.as_bytes(), &[input.len()], Limits::default());
        let split = frame_chunks(input.as_bytes(), &chunks, Limits::default());
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn byte_at_a_time_matches(which in 0usize..10) {
        let input = &corpus()[which];
        let whole = frame_chunks(input.as_bytes(), &[input.len()], Limits::default());
        let split = frame_chunks(input.as_bytes(), &[1], Limits::default());
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        prefix in 0usize..2,
        data in proptest::collection::vec(any::<u8>(), 0..400),
        chunks in proptest::collection::vec(1usize..64, 1..6),
    ) {
        let mut input = if prefix == 1 { HEADER.as_bytes().to_vec() } else { Vec::new() };
        input.extend_from_slice(&data);
        let _ = frame_chunks(&input, &chunks, Limits::default());
    }

    #[test]
    fn mutated_stanzas_split_consistently(
        pos in 0usize..400,
        byte in proptest::sample::select(vec![b'<', b'>', b'&', b'\'', b'"', b'/', b'=', b' ', b':', 0xC3, 0x80, b'!', b'?']),
        chunks in proptest::collection::vec(1usize..30, 1..8),
    ) {
        let mut input = corpus()[0].clone().into_bytes();
        let p = HEADER.len() + pos % (input.len() - HEADER.len());
        input[p] = byte;
        let whole = frame_chunks(&input, &[input.len()], Limits::default());
        let split = frame_chunks(&input, &chunks, Limits::default());
        // Elements before the damage are identical; whether and where it fails may only
        // differ in the error condition, never in the elements accepted.
        prop_assert_eq!(whole.0, split.0);
        prop_assert_eq!(whole.1.is_some(), split.1.is_some());
    }
}

#[test]
fn server_built_elements_parse_standalone() {
    let el = Element::parse(
        bytes::Bytes::from_static(
            b"<iq type='result' id='1' to='a@b/c'><ping xmlns='urn:xmpp:ping'/></iq>",
        ),
        "jabber:client",
    )
    .unwrap();
    assert_eq!((el.name(), el.ns()), ("iq", "jabber:client"));
    assert_eq!(el.first_child(), Some(("ping", "urn:xmpp:ping")));
    assert!(Element::parse(bytes::Bytes::from_static(b"<a/><b/>"), "jabber:client").is_err());
    assert!(Element::parse(bytes::Bytes::from_static(b"<a>"), "jabber:client").is_err());
    assert!(
        Element::parse(
            bytes::Bytes::from_static(b"<a><!-- x --></a>"),
            "jabber:client"
        )
        .is_err()
    );
}

#[test]
fn stream_level_prefixes_are_flagged() {
    let input = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
         xmlns:x='urn:x'><message><x:y/></message><message><x:y xmlns:x='urn:z'/></message>\
         <stream:features/>";
    let (frames, err) = frame_all(input);
    assert_eq!(err, None);
    let els = elements(&frames);
    assert!(els[0].uses_stream_prefixes());
    assert!(!els[1].uses_stream_prefixes());
    assert!(els[2].uses_stream_prefixes());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Moving the envelope along with the rewritten bytes gives exactly what parsing the
    /// rewritten bytes again gives.
    #[test]
    fn readdressing_matches_a_fresh_parse(
        which in 0usize..4,
        to in proptest::option::of("[a-z@./&'<\"\t ]{0,12}"),
        from in proptest::option::of("[a-z@./&'<\"\t ]{0,12}"),
    ) {
        let stanzas = [
            "<message from='x@y/z' type='chat' to='a@b' id='1' xml:lang='en'><body>hi</body><x xmlns='urn:x'/></message>",
            "<presence/>",
            "<iq to='a&amp;b' type='get' id='i'><query xmlns='jabber:iq:version'/></iq>",
            "<message id='q' to='t@u'   from = \"f@g\" ><p:z xmlns:p='urn:p' p:a='1'/></message>",
        ];
        let (frames, err) = frame_all(&format!("{HEADER}{}", stanzas[which]));
        prop_assert_eq!(err, None);
        let el = elements(&frames)[0].clone();
        let moved = el.readdressed(to.as_deref(), from.as_deref());
        let reparsed = Element::parse(el.with_addresses(to.as_deref(), from.as_deref()), "jabber:client").unwrap();
        prop_assert_eq!(&moved, &reparsed);
        if let Some(to) = &to {
            // Escaping writes tabs as character references, which survive normalisation.
            let got = moved.to().map(|t| t.into_owned());
            prop_assert_eq!(got, Some(to.clone()));
        }
    }
}
