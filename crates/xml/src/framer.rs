//! The incremental stream framer: bytes in as they arrive, frames out.
//!
//! quick-xml tokenises the markup; this module keeps the stream state across reads (which
//! element is open, which namespaces are in scope, where the current top-level element
//! started) and does every check RFC 6120 and XML 1.0 ask of a receiving entity.
//!
//! Only bytes up to the last `>` received are handed to the tokeniser, so it never sees a
//! token cut by the end of a read: what follows that `>` is either whitespace between
//! stanzas (consumed at once) or the beginning of markup that waits for more bytes. That
//! is what makes the output independent of how the input was split.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use quick_xml::Reader;
use quick_xml::errors::{Error as QError, IllFormedError, SyntaxError};
use quick_xml::events::Event;

use crate::element::{AddrAttr, Element, Envelope, NsRef, Span, Value, expand_reference};
use crate::error::{Condition, FrameError, nwf, policy, restricted};
use crate::ns;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Limits enforced while framing, before the bytes they limit are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level element (or stream header), in bytes.
    pub max_element_size: usize,
    /// Deepest nesting inside a top-level element; the element itself is depth 1.
    pub max_depth: usize,
    /// Most attributes on one element, namespace declarations included.
    pub max_attributes: usize,
    /// Most namespace declarations on one element.
    pub max_ns_declarations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_element_size: 256 * 1024,
            max_depth: 32,
            max_attributes: 64,
            max_ns_declarations: 16,
        }
    }
}

/// The attributes of a stream header, as the peer sent them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamHeader {
    /// `to`: the domain the initiating entity wants.
    pub to: Option<String>,
    /// `from`: who the peer says it is.
    pub from: Option<String>,
    /// `id`: set by a receiving entity.
    pub id: Option<String>,
    /// `version`: `1.0` for every XMPP 1.0 entity.
    pub version: Option<String>,
    /// `xml:lang`: the default language of the stream.
    pub lang: Option<String>,
    /// The content namespace declared as default (`jabber:client`, `jabber:server`...).
    pub content_ns: String,
}

/// What the framer yields, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The stream header `<stream:stream ...>` was received.
    StreamOpen(StreamHeader),
    /// A complete top-level element.
    Element(Element),
    /// `</stream:stream>` was received; nothing after it is read.
    StreamClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the XML declaration or the stream header.
    Prolog,
    /// Inside the stream: top-level elements follow.
    Open,
    /// After `</stream:stream>` or an error: nothing more is framed.
    Done,
}

/// A namespace declaration in scope inside the current top-level element.
#[derive(Debug, Clone)]
struct Decl {
    /// The declared prefix (a span of the buffer), or `None` for a default namespace.
    prefix: Option<Span>,
    uri: NsRef,
}

/// A namespace declaration on the stream header, which outlives the header's bytes.
#[derive(Debug, Clone)]
struct StreamDecl {
    prefix: Option<Box<str>>,
    uri: NsRef,
}

/// An element open inside the current top-level element.
#[derive(Debug, Clone, Copy)]
struct Open {
    qname: Span,
    decls_before: usize,
}

/// The state the framer keeps between reads, apart from the buffer itself.
#[derive(Debug)]
struct State {
    limits: Limits,
    allowed_content_ns: &'static [&'static str],
    phase: Phase,
    /// Bytes other than a BOM seen before the header: the XML declaration must come first.
    prolog_seen_markup: bool,
    /// Whether the start of the stream was checked for a byte order mark.
    bom_checked: bool,
    /// Declarations made on the stream header.
    stream_decls: Vec<StreamDecl>,
    /// The stream element's qualified name, to match `</stream:stream>`.
    stream_qname: Box<str>,
    /// Start of the current top-level element (or header) in the buffer.
    elem_start: Option<usize>,
    /// What parsing an element needs; allocated when a tag is parsed and freed when the
    /// stream is idle again, so an idle stream holds none of it.
    scratch: Option<Box<Scratch>>,
    /// The current element used a prefix declared on the stream header.
    stream_prefixes: bool,
}

/// The working state of the element in progress.
#[derive(Debug, Default)]
struct Scratch {
    open: Vec<Open>,
    decls: Vec<Decl>,
    envelope: Option<Envelope>,
    /// Attribute names of the tag being parsed, to find duplicates without allocating.
    seen_attrs: Vec<Span>,
}

impl Scratch {
    /// The scratch in `slot`, allocated on first use.
    fn of(slot: &mut Option<Box<Scratch>>) -> &mut Scratch {
        slot.get_or_insert_with(Box::default)
    }
}

/// What one markup event did to the stream.
enum Step {
    Nothing,
    Header(StreamHeader),
    /// The top-level element spanning the buffer range is complete.
    Element(usize, usize),
    Close,
}

/// Frames an XMPP stream: feed it bytes as they arrive; take frames out.
///
/// ```
/// use starling_xml::{Frame, Framer};
/// let mut framer = Framer::new();
/// framer.feed(b"<stream:stream xmlns='jabber:client' \
///     xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>\
///     <message to='juliet@example.org'><body>Wherefore art thou?</bo");
/// assert!(matches!(framer.next_frame(), Ok(Some(Frame::StreamOpen(_)))));
/// assert!(matches!(framer.next_frame(), Ok(None)));
/// framer.feed(b"dy></message>");
/// let Ok(Some(Frame::Element(message))) = framer.next_frame() else { panic!() };
/// assert_eq!(message.name(), "message");
/// assert_eq!(message.ns(), "jabber:client");
/// assert_eq!(message.to().as_deref(), Some("juliet@example.org"));
/// ```
#[derive(Debug)]
pub struct Framer {
    buf: BytesMut,
    /// Everything before `pos` has been framed (or is part of the element in progress).
    pos: usize,
    state: State,
    failed: Option<FrameError>,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

impl Framer {
    /// A framer with the default [`Limits`] that accepts any of the three content namespaces.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A framer with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        Framer {
            buf: BytesMut::new(),
            pos: 0,
            state: State {
                limits,
                allowed_content_ns: &[ns::CLIENT, ns::SERVER, ns::COMPONENT],
                phase: Phase::Prolog,
                prolog_seen_markup: false,
                bom_checked: false,
                stream_decls: Vec::new(),
                stream_qname: Box::from(""),
                elem_start: None,
                scratch: None,
                stream_prefixes: false,
            },
            failed: None,
        }
    }

    /// Restricts the content namespaces a stream header may declare as default
    /// (e.g. only `jabber:client` on a C2S listener). Others get `invalid-namespace`.
    pub fn allow_content_namespaces(&mut self, allowed: &'static [&'static str]) {
        self.state.allowed_content_ns = allowed;
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.state.limits
    }

    /// Starts over for a stream restart (after STARTTLS or SASL): the next bytes must be a
    /// new stream header. Buffered bytes are discarded, as RFC 6120 requires.
    pub fn reset(&mut self) {
        let limits = self.state.limits;
        let allowed = self.state.allowed_content_ns;
        *self = Self::with_limits(limits);
        self.state.allowed_content_ns = allowed;
    }

    /// Appends bytes read from the peer. Call [`Framer::next_frame`] until it returns
    /// `Ok(None)` before feeding more: then the buffer never holds more than one partial
    /// element (at most the size limit) plus one read.
    pub fn feed(&mut self, data: &[u8]) {
        if self.state.phase != Phase::Done {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes held for an element not complete yet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether the framer holds no bytes and no open element: an idle stream.
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.state.elem_start.is_none()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the error the stream
    /// must be closed with. After an error or the stream close, it returns `Ok(None)`
    /// for the close and the same error for an error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        match self.step() {
            Ok(frame) => Ok(frame),
            Err(err) => {
                self.state.phase = Phase::Done;
                self.buf = BytesMut::new();
                self.pos = 0;
                self.failed = Some(err.clone());
                Err(err)
            }
        }
    }

    fn step(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.state.phase == Phase::Done {
            return Ok(None);
        }
        if self.state.phase == Phase::Prolog && !self.state.bom_checked {
            match self.buf.first() {
                None => return Ok(None),
                Some(0xFE | 0xFF) => {
                    return Err(FrameError::new(
                        Condition::UnsupportedEncoding,
                        "UTF-16 input",
                    ));
                }
                Some(0xEF) if self.buf.len() < 3 => {
                    if UTF8_BOM.starts_with(&self.buf) {
                        return Ok(None);
                    }
                }
                Some(0xEF) if self.buf.starts_with(UTF8_BOM) => self.pos = 3,
                Some(_) => {}
            }
            self.state.bom_checked = true;
        }
        let Framer {
            buf, pos, state, ..
        } = self;
        let step = match memchr::memrchr(b'>', &buf[*pos..]) {
            Some(i) => state.tokenise(buf, pos, *pos + i + 1)?,
            None => Step::Nothing,
        };
        let frame = match step {
            Step::Nothing => {
                state.tail(buf, pos)?;
                self.compact();
                return Ok(None);
            }
            Step::Header(header) => {
                self.compact();
                Frame::StreamOpen(header)
            }
            Step::Close => {
                self.state.phase = Phase::Done;
                self.buf = BytesMut::new();
                self.pos = 0;
                Frame::StreamClose
            }
            Step::Element(start, end) => {
                let env = self
                    .state
                    .scratch
                    .as_mut()
                    .and_then(|scratch| scratch.envelope.take())
                    .ok_or(nwf("element without envelope"))?;
                self.buf.advance(start);
                let raw: Bytes = self.buf.split_to(end - start).freeze();
                self.pos = 0;
                check_chars(&raw)?;
                Frame::Element(Element::new(raw, env.shifted_back(start)))
            }
        };
        self.compact();
        Ok(Some(frame))
    }

    /// Drops consumed bytes when no element is in progress, and the allocation with them
    /// when nothing is left, so an idle stream holds no buffer: neither bytes nor the scratch
    /// lists of the element just framed.
    fn compact(&mut self) {
        if self.state.elem_start.is_none() && self.pos > 0 {
            self.buf.advance(self.pos);
            self.pos = 0;
        }
        if self.buf.is_empty() && self.state.elem_start.is_none() {
            if self.buf.capacity() > 0 {
                self.buf = BytesMut::new();
            }
            self.state.release_scratch();
        }
    }
}

impl State {
    /// Frees the working state of elements between them: no element is open, its
    /// declarations are gone, and the attribute names are rebuilt for every tag.
    fn release_scratch(&mut self) {
        if self
            .scratch
            .as_ref()
            .is_some_and(|s| s.open.is_empty() && s.decls.is_empty() && s.envelope.is_none())
        {
            self.scratch = None;
        }
    }

    /// The working state of the element in progress, allocated on first use.
    fn scratch(&mut self) -> &mut Scratch {
        Scratch::of(&mut self.scratch)
    }

    /// Runs the tokeniser over `buf[*pos..end]`, where `end` is just past a `>`, until a
    /// frame completes or the complete markup runs out.
    fn tokenise(&mut self, buf: &[u8], pos: &mut usize, end: usize) -> Result<Step, FrameError> {
        let pos0 = *pos;
        let slice = &buf[pos0..end];
        // quick-xml drops a leading UTF-8 BOM without counting it in its positions. The one
        // that may open a stream was consumed already; any other is U+FEFF in text.
        let skew = if slice.starts_with(UTF8_BOM) {
            if self.elem_start.is_none() {
                return Err(self.stray_text());
            }
            UTF8_BOM.len()
        } else {
            0
        };
        // The stripped U+FEFF is character data of the open element: step over it.
        *pos += skew;
        let mut reader = Reader::from_reader(slice);
        let config = reader.config_mut();
        config.check_end_names = false;
        config.check_comments = false;
        config.expand_empty_elements = false;
        config.allow_dangling_amp = false;
        // End tags of elements opened in an earlier read are matched by this module.
        config.allow_unmatched_ends = true;
        config.trim_text(false);
        loop {
            let ev_start = *pos;
            let event = match reader.read_event() {
                Ok(Event::Eof) => return Ok(Step::Nothing),
                Ok(event) => event,
                Err(err) => {
                    return match incomplete(&err, slice) {
                        Some(Ok(())) => Ok(Step::Nothing),
                        Some(Err(e)) => Err(e),
                        None => Err(map_error(&err)),
                    };
                }
            };
            let ev_end = pos0 + skew + reader.buffer_position() as usize;
            let step = self.event(buf, event, ev_start, ev_end)?;
            *pos = ev_end;
            if let Some(start) = self.elem_start
                && ev_end - start > self.limits.max_element_size
            {
                return Err(policy("element larger than the size limit"));
            }
            if !matches!(step, Step::Nothing) {
                return Ok(step);
            }
        }
    }

    /// Handles the bytes after the last `>`: whitespace between elements is consumed, the
    /// start of markup waits, anything else is an error; and the size limit holds.
    fn tail(&mut self, buf: &[u8], pos: &mut usize) -> Result<(), FrameError> {
        // Markup cut short that can only become something refused is refused at once. The
        // tokeniser stopped at the start of the incomplete token; text holds no `<`, so the
        // first `<` from there starts markup (a later one may sit inside a quoted value).
        if let Some(lt) = memchr::memchr(b'<', &buf[*pos..]) {
            let markup = &buf[*pos + lt..];
            // After `<!` only CDATA may follow; a comment or a DTD is refused, and anything
            // else is not XML. Each decision holds however many more bytes arrive.
            if markup.len() >= 3 && markup[1] == b'!' {
                let n = markup.len().min(9);
                if markup[2] == b'-' {
                    return Err(restricted("comment"));
                }
                if markup[2] != b'[' {
                    return Err(restricted("document type declaration"));
                }
                if !b"<![CDATA[".starts_with(&markup[..n]) {
                    return Err(nwf("unknown markup after '<!'"));
                }
            }
            // The XML declaration must open the stream: nothing, not even whitespace, before it.
            let xml_decl_possible =
                self.phase == Phase::Prolog && !self.prolog_seen_markup && lt == 0;
            if markup.len() >= 2
                && markup.starts_with(b"<?")
                && !(xml_decl_possible && could_be_xml_declaration(markup))
            {
                return Err(restricted("processing instruction"));
            }
        }
        let from = match self.elem_start {
            Some(start) => start,
            None => {
                let rest = &buf[*pos..];
                let ws = rest.iter().take_while(|b| is_ws(**b)).count();
                if ws < rest.len() && rest[ws] != b'<' {
                    return Err(self.stray_text());
                }
                if ws > 0 && self.phase == Phase::Prolog {
                    self.prolog_seen_markup = true;
                }
                *pos += ws;
                *pos
            }
        };
        if buf.len() - from > self.limits.max_element_size {
            return Err(policy("element larger than the size limit"));
        }
        Ok(())
    }

    /// The error for character data outside any element.
    fn stray_text(&self) -> FrameError {
        match self.phase {
            Phase::Prolog => nwf("text before the stream header"),
            _ => FrameError::new(Condition::BadFormat, "text between elements"),
        }
    }

    fn event(
        &mut self,
        buf: &[u8],
        event: Event<'_>,
        start: usize,
        end: usize,
    ) -> Result<Step, FrameError> {
        let in_element = self.scratch.as_ref().is_some_and(|s| !s.open.is_empty());
        match event {
            Event::Start(_) | Event::Empty(_) => {
                let empty = matches!(event, Event::Empty(_));
                // The tag content runs from after `<` to before `>` or `/>`.
                let content_end = if empty { end - 2 } else { end - 1 };
                self.start_tag(buf, start, content_end, end, empty)
            }
            Event::End(_) => self.end_tag(buf, start, end),
            Event::Text(text) => {
                let bytes = text.as_bytes();
                if in_element {
                    if memchr::memchr_iter(b']', bytes).any(|i| bytes[i..].starts_with(b"]]>")) {
                        return Err(nwf("']]>' in character data"));
                    }
                    Ok(Step::Nothing)
                } else if bytes.iter().all(|b| is_ws(*b)) {
                    if self.phase == Phase::Prolog {
                        self.prolog_seen_markup = true;
                    }
                    Ok(Step::Nothing)
                } else {
                    Err(self.stray_text())
                }
            }
            Event::GeneralRef(reference) => {
                if !in_element {
                    return Err(FrameError::new(
                        Condition::BadFormat,
                        "text between elements",
                    ));
                }
                check_reference(reference.as_bytes())?;
                Ok(Step::Nothing)
            }
            Event::CData(_) => {
                if in_element {
                    Ok(Step::Nothing)
                } else {
                    Err(FrameError::new(
                        Condition::BadFormat,
                        "CDATA between elements",
                    ))
                }
            }
            Event::Comment(_) => Err(restricted("comment")),
            Event::DocType(_) => Err(restricted("document type declaration")),
            Event::PI(_) => Err(restricted("processing instruction")),
            Event::Decl(_) => {
                if self.phase != Phase::Prolog || self.prolog_seen_markup {
                    return Err(restricted("XML declaration after the start of the stream"));
                }
                self.prolog_seen_markup = true;
                self.xml_declaration(&buf[start + 5..end - 2])?;
                Ok(Step::Nothing)
            }
            Event::Eof => Ok(Step::Nothing),
        }
    }

    fn xml_declaration(&mut self, content: &[u8]) -> Result<(), FrameError> {
        let mut version_ok = false;
        for attr in AttrIter::new(content, 0) {
            let attr = attr?;
            let name = &content[attr.name.range()];
            let value = &content[attr.value.range()];
            match name {
                b"version" => version_ok = value == b"1.0",
                b"encoding" => {
                    if !value.eq_ignore_ascii_case(b"utf-8") {
                        return Err(FrameError::new(
                            Condition::UnsupportedEncoding,
                            "encoding other than UTF-8",
                        ));
                    }
                }
                b"standalone" => {}
                _ => return Err(nwf("unknown pseudo-attribute in the XML declaration")),
            }
        }
        if version_ok {
            Ok(())
        } else {
            Err(nwf("XML declaration without version 1.0"))
        }
    }

    fn start_tag(
        &mut self,
        buf: &[u8],
        start: usize,
        content_end: usize,
        end: usize,
        empty: bool,
    ) -> Result<Step, FrameError> {
        let content = &buf[..content_end];
        let name_start = start + 1;
        let name_end = name_start
            + content[name_start..]
                .iter()
                .position(|b| is_ws(*b))
                .unwrap_or(content_end - name_start);
        let qname = Span::new(name_start, name_end);
        let colon = check_qname(&buf[name_start..name_end])?;
        let local_start = colon.map_or(name_start, |c| name_start + c + 1);

        if self.phase == Phase::Prolog {
            self.prolog_seen_markup = true;
            return self.stream_header(buf, qname, local_start, content_end, end, empty);
        }
        let top_level = self.scratch().open.is_empty();
        if top_level {
            self.elem_start = Some(start);
            self.stream_prefixes = false;
        }
        if self.scratch().open.len() + 1 > self.limits.max_depth {
            return Err(policy("element nested deeper than the depth limit"));
        }

        let decls_before = self.scratch().decls.len();
        let mut envelope = top_level.then_some(Envelope {
            qname,
            local_start: local_start as u32,
            ns: NsRef::Static(""),
            to: None,
            from: None,
            type_: None,
            id: None,
            lang: None,
            first_child: None,
            start_tag_end: end as u32,
            end_tag_start: end as u32,
            stream_prefixes: false,
        });

        let scratch = Scratch::of(&mut self.scratch);
        scratch.seen_attrs.clear();
        let mut ns_decls = 0usize;
        let mut prefixed_attrs = false;
        for attr in AttrIter::new(content, name_end) {
            let attr = attr?;
            if scratch.seen_attrs.len() >= self.limits.max_attributes {
                return Err(policy("more attributes than the limit"));
            }
            let name = &buf[attr.name.range()];
            if scratch.seen_attrs.iter().any(|s| &buf[s.range()] == name) {
                return Err(nwf("duplicate attribute"));
            }
            scratch.seen_attrs.push(attr.name);
            let acolon = check_qname(name)?;
            let value = &buf[attr.value.range()];
            let escaped = attr.special && check_attr_value(value)?;
            if name == b"xmlns" || name.starts_with(b"xmlns:") {
                ns_decls += 1;
                if ns_decls > self.limits.max_ns_declarations {
                    return Err(policy("more namespace declarations than the limit"));
                }
                let prefix = (name.len() > 5)
                    .then(|| Span::new(attr.name.start as usize + 6, attr.name.end as usize));
                let uri = ns_ref(value, attr.value, escaped);
                check_declaration(prefix.map(|p| &buf[p.range()]), uri_str(&uri, buf))?;
                scratch.decls.push(Decl { prefix, uri });
                continue;
            }
            if acolon.is_some() {
                prefixed_attrs = true;
            }
            if let Some(env) = envelope.as_mut() {
                let v = Value {
                    span: attr.value,
                    escaped,
                };
                match name {
                    b"to" => {
                        env.to = Some(AddrAttr {
                            whole_start: attr.whole_start,
                            value: v,
                        })
                    }
                    b"from" => {
                        env.from = Some(AddrAttr {
                            whole_start: attr.whole_start,
                            value: v,
                        })
                    }
                    b"type" => env.type_ = Some(v),
                    b"id" => env.id = Some(v),
                    b"xml:lang" => env.lang = Some(v),
                    _ => {}
                }
            }
        }
        // Prefixes of attributes must be bound, like those of elements.
        if prefixed_attrs {
            for i in 0..self.scratch().seen_attrs.len() {
                let span = self.scratch().seen_attrs[i];
                let name = &buf[span.range()];
                if let Some(c) = memchr::memchr(b':', name) {
                    let prefix = &name[..c];
                    if prefix != b"xmlns" && prefix != b"xml" {
                        self.resolve(buf, Some(prefix))?;
                    }
                }
            }
        }
        let element_ns = self.resolve(buf, colon.map(|c| &buf[name_start..name_start + c]))?;

        if let Some(mut env) = envelope {
            env.ns = element_ns;
            self.scratch().envelope = Some(env);
        } else if self.scratch().open.len() == 1
            && let Some(env) = self.scratch().envelope.as_mut()
            && env.first_child.is_none()
        {
            env.first_child = Some((Span::new(local_start, name_end), element_ns));
        }

        if empty {
            self.scratch().decls.truncate(decls_before);
            if top_level {
                return self.complete(end);
            }
        } else {
            self.scratch().open.push(Open {
                qname,
                decls_before,
            });
        }
        Ok(Step::Nothing)
    }

    fn end_tag(&mut self, buf: &[u8], start: usize, end: usize) -> Result<Step, FrameError> {
        // `</name>` with optional whitespace before `>`.
        let inner = &buf[start + 2..end - 1];
        let name_len = inner.iter().position(|b| is_ws(*b)).unwrap_or(inner.len());
        if !inner[name_len..].iter().all(|b| is_ws(*b)) {
            return Err(nwf("end tag with attributes"));
        }
        let name = &inner[..name_len];
        match self.scratch.as_mut().and_then(|s| s.open.pop()) {
            Some(open) => {
                if &buf[open.qname.range()] != name {
                    return Err(nwf("end tag does not match the start tag"));
                }
                self.scratch().decls.truncate(open.decls_before);
                if self.scratch().open.is_empty() {
                    if let Some(env) = self.scratch().envelope.as_mut() {
                        env.end_tag_start = start as u32;
                    }
                    return self.complete(end);
                }
                Ok(Step::Nothing)
            }
            None if self.phase == Phase::Open => {
                if name != self.stream_qname.as_bytes() {
                    return Err(nwf("end tag does not match the stream header"));
                }
                self.phase = Phase::Done;
                Ok(Step::Close)
            }
            None => Err(nwf("end tag before the stream header")),
        }
    }

    fn complete(&mut self, end: usize) -> Result<Step, FrameError> {
        let start = self
            .elem_start
            .take()
            .ok_or(nwf("element end without a start"))?;
        if end - start > self.limits.max_element_size {
            return Err(policy("element larger than the size limit"));
        }
        self.scratch().decls.clear();
        let stream_prefixes = self.stream_prefixes;
        if let Some(env) = self.scratch().envelope.as_mut() {
            env.stream_prefixes = stream_prefixes;
        }
        Ok(Step::Element(start, end))
    }

    fn stream_header(
        &mut self,
        buf: &[u8],
        qname: Span,
        local_start: usize,
        content_end: usize,
        end: usize,
        empty: bool,
    ) -> Result<Step, FrameError> {
        if end > self.limits.max_element_size {
            return Err(policy("stream header larger than the size limit"));
        }
        check_chars(&buf[..end])?;
        let content = &buf[..content_end];
        let mut header = StreamHeader::default();
        let mut default_ns: Option<NsRef> = None;
        let seen_attrs = &mut Scratch::of(&mut self.scratch).seen_attrs;
        seen_attrs.clear();
        let mut ns_decls = 0;
        for attr in AttrIter::new(content, qname.end as usize) {
            let attr = attr?;
            if seen_attrs.len() >= self.limits.max_attributes {
                return Err(policy("more attributes than the limit"));
            }
            let name = &buf[attr.name.range()];
            if seen_attrs.iter().any(|s| &buf[s.range()] == name) {
                return Err(nwf("duplicate attribute"));
            }
            seen_attrs.push(attr.name);
            check_qname(name)?;
            let raw_value = &buf[attr.value.range()];
            let escaped = attr.special && check_attr_value(raw_value)?;
            let value = owned_value(raw_value, escaped);
            if name == b"xmlns" || name.starts_with(b"xmlns:") {
                ns_decls += 1;
                if ns_decls > self.limits.max_ns_declarations {
                    return Err(policy("more namespace declarations than the limit"));
                }
                let prefix = name.strip_prefix(b"xmlns:");
                check_declaration(prefix, &value)?;
                let uri = match ns::well_known(value.as_bytes()) {
                    Some(s) => NsRef::Static(s),
                    None => NsRef::Shared(Arc::from(value.as_str())),
                };
                match prefix {
                    None => default_ns = Some(uri.clone()),
                    Some(p) => self.stream_decls.push(StreamDecl {
                        prefix: Some(Box::from(std::str::from_utf8(p).unwrap_or(""))),
                        uri,
                    }),
                }
                continue;
            }
            match name {
                b"to" => header.to = Some(value),
                b"from" => header.from = Some(value),
                b"id" => header.id = Some(value),
                b"version" => header.version = Some(value),
                b"xml:lang" => header.lang = Some(value),
                _ => {}
            }
        }
        // The stream element itself must be in the streams namespace.
        let qname_bytes = &buf[qname.range()];
        let prefix = memchr::memchr(b':', qname_bytes).map(|c| &qname_bytes[..c]);
        let stream_ns = match prefix {
            Some(p) => self
                .stream_decls
                .iter()
                .rev()
                .find(|d| d.prefix.as_deref().map(str::as_bytes) == Some(p))
                .map(|d| d.uri.clone()),
            None => default_ns.clone(),
        };
        let Some(stream_ns) = stream_ns else {
            return Err(FrameError::new(
                Condition::BadNamespacePrefix,
                "stream element prefix is not declared",
            ));
        };
        if uri_str(&stream_ns, buf) != ns::STREAMS {
            return Err(FrameError::new(
                Condition::InvalidNamespace,
                "wrong stream namespace",
            ));
        }
        if &buf[local_start..qname.end as usize] != b"stream" {
            return Err(FrameError::new(
                Condition::BadFormat,
                "root element is not <stream>",
            ));
        }
        if empty {
            return Err(FrameError::new(
                Condition::BadFormat,
                "empty stream element",
            ));
        }
        let Some(content_ns) = default_ns.filter(|_| prefix.is_some()) else {
            return Err(FrameError::new(
                Condition::BadNamespacePrefix,
                "no default content namespace declared",
            ));
        };
        let content_ns_str = uri_str(&content_ns, buf).to_owned();
        if !self.allowed_content_ns.contains(&content_ns_str.as_str()) {
            return Err(FrameError::new(
                Condition::InvalidNamespace,
                "unsupported content namespace",
            ));
        }
        self.stream_decls.push(StreamDecl {
            prefix: None,
            uri: content_ns,
        });
        header.content_ns = content_ns_str;
        // Kept for the whole stream: no spare capacity.
        self.stream_decls.shrink_to_fit();
        self.stream_qname = Box::from(std::str::from_utf8(qname_bytes).unwrap_or(""));
        self.phase = Phase::Open;
        Ok(Step::Header(header))
    }

    /// The namespace a prefix (or, for `None`, the default namespace) is bound to here.
    fn resolve(&mut self, buf: &[u8], prefix: Option<&[u8]>) -> Result<NsRef, FrameError> {
        if prefix == Some(b"xml") {
            return Ok(NsRef::Static(ns::XML));
        }
        let found = self.scratch.as_ref().and_then(|scratch| {
            scratch
                .decls
                .iter()
                .rev()
                .find(|d| d.prefix.map(|p| &buf[p.range()]) == prefix)
                .map(|d| d.uri.clone())
        });
        if let Some(uri) = found {
            return Ok(uri);
        }
        let found = self
            .stream_decls
            .iter()
            .rev()
            .find(|d| d.prefix.as_deref().map(str::as_bytes) == prefix)
            .map(|d| d.uri.clone());
        if found.is_some() && prefix.is_some() {
            self.stream_prefixes = true;
        }
        match (found, prefix) {
            (Some(NsRef::Static("")), None) => Ok(NsRef::Static("")),
            (Some(uri), _) => Ok(uri),
            (None, None) => Ok(NsRef::Static("")),
            (None, Some(_)) => Err(nwf("undeclared namespace prefix")),
        }
    }
}

/// Turns a namespace declaration's value into an `NsRef`, without copying the common ones.
fn ns_ref(value: &[u8], span: Span, escaped: bool) -> NsRef {
    if let Some(s) = ns::well_known(value) {
        return NsRef::Static(s);
    }
    if escaped {
        NsRef::Shared(Arc::from(owned_value(value, true).as_str()))
    } else {
        NsRef::Raw(span)
    }
}

fn uri_str<'a>(uri: &'a NsRef, buf: &'a [u8]) -> &'a str {
    uri.resolve(buf)
}

fn owned_value(value: &[u8], escaped: bool) -> String {
    let s = std::str::from_utf8(value).unwrap_or("");
    if escaped {
        crate::element::unescape_attr(s)
    } else {
        s.to_owned()
    }
}

/// Namespaces in XML 1.0 §3: `xml` may only be bound to its namespace, `xmlns` never, and
/// nothing else to either; a prefix may not be undeclared.
fn check_declaration(prefix: Option<&[u8]>, uri: &str) -> Result<(), FrameError> {
    match prefix {
        Some(b"xmlns") => Err(nwf("the xmlns prefix cannot be declared")),
        Some(b"xml") if uri != ns::XML => Err(nwf("the xml prefix bound to another namespace")),
        Some(b"xml") => Ok(()),
        _ if uri == ns::XML || uri == ns::XMLNS => Err(nwf("reserved namespace bound to a prefix")),
        Some(_) if uri.is_empty() => Err(nwf("prefix undeclared with an empty namespace")),
        _ => Ok(()),
    }
}

/// Decides whether a tokeniser error means "the markup is not complete yet" (`Some(Ok)`),
/// is already known to be refused however it continues (`Some(Err)`), or is a real
/// error (`None`).
fn incomplete(err: &QError, slice: &[u8]) -> Option<Result<(), FrameError>> {
    match err {
        QError::Syntax(
            SyntaxError::UnclosedTag
            | SyntaxError::UnclosedSingleQuotedAttributeValue
            | SyntaxError::UnclosedDoubleQuotedAttributeValue
            | SyntaxError::UnclosedCData
            | SyntaxError::UnclosedXmlDecl,
        ) => Some(Ok(())),
        QError::Syntax(SyntaxError::UnclosedComment) => Some(Err(restricted("comment"))),
        QError::Syntax(SyntaxError::UnclosedDoctype) => {
            Some(Err(restricted("document type declaration")))
        }
        QError::Syntax(SyntaxError::UnclosedPI) => {
            // `<?xm` may still become the XML declaration; anything else is a PI.
            let at = memchr::memrchr(b'<', slice).unwrap_or(0);
            let tail = &slice[at..];
            if could_be_xml_declaration(tail) {
                Some(Ok(()))
            } else {
                Some(Err(restricted("processing instruction")))
            }
        }
        QError::Syntax(SyntaxError::InvalidBangMarkup) => {
            // `<!` cut short: it can only become CDATA, a comment or a DTD.
            let at = memchr::memrchr(b'<', slice).unwrap_or(0);
            let tail = &slice[at..];
            let n = tail.len();
            if n < 9 && b"<![CDATA[".starts_with(tail) {
                Some(Ok(()))
            } else if n < 4 && b"<!--".starts_with(tail) {
                Some(Err(restricted("comment")))
            } else if b"<!DOCTYPE".starts_with(&tail[..n.min(9)]) {
                Some(Err(restricted("document type declaration")))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Whether markup cut short may still become `<?xml` followed by whitespace.
fn could_be_xml_declaration(markup: &[u8]) -> bool {
    b"<?xml".starts_with(&markup[..markup.len().min(5)]) && markup.get(5).is_none_or(|b| is_ws(*b))
}

fn map_error(err: &QError) -> FrameError {
    match err {
        QError::Encoding(_) => {
            FrameError::new(Condition::UnsupportedEncoding, "input is not UTF-8")
        }
        QError::IllFormed(IllFormedError::UnclosedReference) => nwf("'&' not starting a reference"),
        QError::IllFormed(IllFormedError::DoubleHyphenInComment) => restricted("comment"),
        QError::Syntax(SyntaxError::InvalidBangMarkup) => nwf("unknown markup after '<!'"),
        _ => nwf("malformed markup"),
    }
}

/// An attribute found in a start tag: spans into the buffer.
#[derive(Debug, Clone, Copy)]
struct RawAttr {
    /// Offset of the whitespace before the name.
    whole_start: u32,
    name: Span,
    value: Span,
    /// The value holds `<`, `&` or literal whitespace other than space.
    special: bool,
}

/// Iterates `name = 'value'` pairs in `content[from..]` (a start tag without `<` and `>`),
/// checking the syntax strictly: whitespace before each attribute, quoted values.
struct AttrIter<'a> {
    content: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> AttrIter<'a> {
    fn new(content: &'a [u8], from: usize) -> Self {
        AttrIter {
            content,
            at: from,
            done: false,
        }
    }

    fn parse(&mut self) -> Result<Option<RawAttr>, FrameError> {
        let c = self.content;
        let whole_start = self.at;
        let mut i = self.at;
        while i < c.len() && is_ws(c[i]) {
            i += 1;
        }
        if i == c.len() {
            return Ok(None);
        }
        if i == whole_start {
            return Err(nwf("no whitespace before an attribute"));
        }
        let name_start = i;
        while i < c.len() && !is_ws(c[i]) && c[i] != b'=' {
            i += 1;
        }
        let name = Span::new(name_start, i);
        while i < c.len() && is_ws(c[i]) {
            i += 1;
        }
        if i == c.len() || c[i] != b'=' {
            return Err(nwf("attribute without a value"));
        }
        i += 1;
        while i < c.len() && is_ws(c[i]) {
            i += 1;
        }
        let Some(&quote) = c.get(i).filter(|q| **q == b'"' || **q == b'\'') else {
            return Err(nwf("attribute value not quoted"));
        };
        let value_start = i + 1;
        // One pass finds the closing quote and notes the bytes that need a closer look;
        // values are short, where a byte loop beats several memchr calls.
        let mut special = false;
        let mut j = value_start;
        while j < c.len() && c[j] != quote {
            special |= matches!(c[j], b'<' | b'&' | b'\t' | b'\n' | b'\r');
            j += 1;
        }
        if j == c.len() {
            return Err(nwf("attribute value not closed"));
        }
        self.at = j + 1;
        Ok(Some(RawAttr {
            whole_start: whole_start as u32,
            name,
            value: Span::new(value_start, j),
            special,
        }))
    }
}

impl Iterator for AttrIter<'_> {
    type Item = Result<RawAttr, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.parse() {
            Ok(Some(attr)) => Some(Ok(attr)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Checks a qualified name (`NCName` or `NCName:NCName`) and returns the colon's offset.
/// ASCII is checked exactly against XML's name rules; non-ASCII name characters are
/// accepted as a class, which admits a few code points XML 1.0 excludes.
fn check_qname(name: &[u8]) -> Result<Option<usize>, FrameError> {
    let mut colon = None;
    let mut at_start = true;
    for (i, &b) in name.iter().enumerate() {
        let ok = if at_start {
            b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
        } else if b == b':' {
            if colon.is_some() {
                return Err(nwf("invalid name"));
            }
            colon = Some(i);
            at_start = true;
            continue;
        } else {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') || b >= 0x80
        };
        if !ok {
            return Err(nwf("invalid name"));
        }
        at_start = false;
    }
    if at_start {
        // Empty, or ending in a colon.
        return Err(nwf("invalid name"));
    }
    Ok(colon)
}

/// Checks an attribute value: no `<`, and every `&` starts a predefined entity or a
/// character reference. Returns whether the value holds references.
fn check_attr_value(value: &[u8]) -> Result<bool, FrameError> {
    if memchr::memchr(b'<', value).is_some() {
        return Err(nwf("'<' in an attribute value"));
    }
    let mut escaped = false;
    let mut rest = value;
    while let Some(i) = memchr::memchr(b'&', rest) {
        let after = &rest[i + 1..];
        let Some(semi) = memchr::memchr(b';', after) else {
            return Err(nwf("'&' not starting a reference"));
        };
        check_reference(&after[..semi])?;
        escaped = true;
        rest = &after[semi + 1..];
    }
    if memchr::memchr3(b'\t', b'\n', b'\r', value).is_some() {
        escaped = true;
    }
    Ok(escaped)
}

/// RFC 6120 §11.1: only the five predefined entities and character references of XML
/// characters. Other names would need a DTD, which is itself refused.
fn check_reference(name: &[u8]) -> Result<(), FrameError> {
    let name = std::str::from_utf8(name).map_err(|_| nwf("invalid reference"))?;
    if expand_reference(name).is_some() {
        return Ok(());
    }
    if name.starts_with('#') {
        Err(nwf("character reference to a character XML does not allow"))
    } else {
        Err(restricted(
            "entity reference other than the predefined entities",
        ))
    }
}

/// XML 1.0 §2.2: C0 controls other than tab, newline and carriage return, and U+FFFE and
/// U+FFFF, may not appear anywhere. The tokeniser has already checked that input is UTF-8.
fn check_chars(bytes: &[u8]) -> Result<(), FrameError> {
    let mut bad = false;
    for chunk in bytes.chunks(64) {
        bad |= chunk.iter().fold(false, |acc, &b| {
            acc | ((b < 0x20) & (b != b'\t') & (b != b'\n') & (b != b'\r'))
        });
    }
    if bad {
        return Err(nwf("control character"));
    }
    for i in memchr::memchr_iter(0xEF, bytes) {
        if bytes.get(i + 1) == Some(&0xBF) && matches!(bytes.get(i + 2), Some(0xBE | 0xBF)) {
            return Err(nwf("non-character U+FFFE or U+FFFF"));
        }
    }
    Ok(())
}

impl Element {
    /// Frames one standalone element, as if it were sent on a stream whose default namespace
    /// is `content_ns`: for stanzas a server builds itself, so that they travel as the same
    /// type as framed ones. The bytes must hold exactly one element.
    pub fn parse(xml: Bytes, content_ns: &'static str) -> Result<Element, FrameError> {
        let mut framer = Framer::new();
        framer.state.phase = Phase::Open;
        framer.state.bom_checked = true;
        framer.state.stream_decls.push(StreamDecl {
            prefix: None,
            uri: NsRef::Static(content_ns),
        });
        framer.state.stream_decls.push(StreamDecl {
            prefix: Some(Box::from("stream")),
            uri: NsRef::Static(ns::STREAMS),
        });
        let len = xml.len();
        framer.buf = BytesMut::from(xml);
        match framer.next_frame()? {
            Some(Frame::Element(el)) if el.raw().len() == len => Ok(el),
            _ => Err(nwf("not exactly one complete element")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the framer allocates and keeps, apart from the stream's own declarations.
    fn held(framer: &Framer) -> usize {
        framer.buf.capacity() + framer.state.scratch.as_ref().map_or(0, |_| 1)
    }

    #[test]
    fn an_idle_stream_holds_no_buffer() {
        let mut framer = Framer::new();
        framer.feed(
            b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
              to='example.org' version='1.0'>",
        );
        assert!(matches!(
            framer.next_frame(),
            Ok(Some(Frame::StreamOpen(_)))
        ));
        assert_eq!(framer.next_frame(), Ok(None));
        assert_eq!(held(&framer), 0);
        assert_eq!(
            framer.state.stream_decls.capacity(),
            framer.state.stream_decls.len()
        );

        framer
            .feed(b"<message to='a@example.org' xmlns:x='urn:x'><x:y a='1' b='2'><z/></x:y></mess");
        assert_eq!(framer.next_frame(), Ok(None));
        assert!(held(&framer) > 0, "a partial element is held");
        framer.feed(b"age> ");
        assert!(matches!(framer.next_frame(), Ok(Some(Frame::Element(_)))));
        assert_eq!(framer.next_frame(), Ok(None));
        assert_eq!(held(&framer), 0, "nothing is kept between elements");
    }
}
