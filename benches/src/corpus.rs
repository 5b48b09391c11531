//! A realistic stanza mix for benchmarks: what a busy XMPP server's C2S streams carry.
//!
//! Proportions per 20 stanzas: 10 chat messages (with a receipt request and a chat state),
//! 6 presences with entity capabilities, 3 roster results of 20 items, and 1 PEP/pubsub
//! event carrying a 4 KiB item. The average stanza is a little over 1 KiB.

/// The stream header the corpus streams start with.
pub const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0' \
    xml:lang='en'>";

fn chat(i: usize) -> String {
    format!(
        "<message from='juliet{i}@example.org/balcony' to='romeo{i}@example.net' type='chat' \
         id='msg-{i:08}' xml:lang='en'><body>Art thou not Romeo, and a Montague? That is message \
         number {i} &amp; it has some text in it, as chat messages do.</body>\
         <active xmlns='http://jabber.org/protocol/chatstates'/>\
         <request xmlns='urn:xmpp:receipts'/><origin-id xmlns='urn:xmpp:sid:0' \
         id='5ed1b4e0-{i:08}'/></message>"
    )
}

fn presence(i: usize) -> String {
    format!(
        "<presence from='device{i}@example.org/sensor-{i}' id='p{i}'><show>away</show>\
         <status>Temperature probe {i} in standby</status><priority>5</priority>\
         <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='https://starling.example/caps' \
         ver='QgayPKawpkPSDYmwT/WM94uAlu0='/><x xmlns='vcard-temp:x:update'>\
         <photo>01b87fcd030b72895ff8e88db57ec525450f000d</photo></x>\
         <delay xmlns='urn:xmpp:delay' from='example.org' stamp='2026-11-25T10:00:00Z'/></presence>"
    )
}

fn roster(i: usize) -> String {
    let mut s = format!(
        "<iq type='result' id='roster-{i}' to='user{i}@example.org/phone'>\
         <query xmlns='jabber:iq:roster' ver='ver{i}'>"
    );
    for k in 0..20 {
        s.push_str(&format!(
            "<item jid='contact{k}@example.net' name='Contact Number {k}' subscription='both'>\
             <group>Friends</group></item>"
        ));
    }
    s.push_str("</query></iq>");
    s
}

fn pubsub(i: usize) -> String {
    let payload: String = (0..64)
        .map(|k| {
            format!("<entry k='{k:03}'>reading {i}.{k} from sensor array, value 21.5C, ok</entry>")
        })
        .collect::<String>();
    let payload = &payload[..payload.len().min(4096)];
    // Cut at an entry boundary so the item stays well-formed.
    let cut = payload
        .rfind("</entry>")
        .map_or(0, |p| p + "</entry>".len());
    format!(
        "<message from='pubsub.example.org' to='subscriber{i}@example.org' id='ps{i}'>\
         <event xmlns='http://jabber.org/protocol/pubsub#event'><items node='urn:sensors:{i}'>\
         <item id='item-{i}'><readings xmlns='urn:example:sensors'>{}</readings></item>\
         </items></event></message>",
        &payload[..cut]
    )
}

/// `n` stanzas of the mix, each a standalone top-level element (default namespace inherited
/// from the stream header).
pub fn stanzas(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 20 {
            0..=9 => chat(i),
            10..=15 => presence(i),
            16..=18 => roster(i),
            _ => pubsub(i),
        })
        .collect()
}

/// A whole client stream: header, `n` stanzas with whitespace between some of them, close.
pub fn stream(n: usize) -> Vec<u8> {
    let mut out = String::from(HEADER);
    for (i, s) in stanzas(n).iter().enumerate() {
        out.push_str(s);
        if i % 7 == 0 {
            out.push(' ');
        }
    }
    out.push_str("</stream:stream>");
    out.into_bytes()
}
