//! Entity Capabilities (XEP-0115) of the server: the verification string of what its
//! disco#info answers, computed once from the registered modules.
//!
//! [`verification_string`] is the generation method of §5.1 (identities, then features, then
//! extended forms (XEP-0128), each sorted by octets, joined with `<`, hashed with SHA-1 and
//! encoded in Base64), pure and tested against the examples of §5.2 and §5.3. The edge
//! advertises the result as the `<c/>` stream feature (§6.3) and the disco module answers
//! `node#ver` (§6.2) with exactly the identities and features the hash was computed from, so
//! a client can verify it (§5.4).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

/// The `node` the server's capabilities are advertised under: the URI of the software
/// (§4: "a URL at the website of the project").
pub const NODE: &str = env!("CARGO_PKG_REPOSITORY");

/// The hash function of the verification string, as the `hash` attribute names it.
pub const HASH: &str = "sha-1";

/// A service discovery identity (XEP-0030 §3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The category (`server`, `client`...).
    pub category: String,
    /// The type within the category (`im`, `pc`...).
    pub type_: String,
    /// The `xml:lang` of the name, if any.
    pub lang: Option<String>,
    /// The human-readable name, if any.
    pub name: Option<String>,
}

/// An extended information form (XEP-0128): its `FORM_TYPE` and its other fields with their
/// values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoForm {
    /// The value of the hidden `FORM_TYPE` field.
    pub form_type: String,
    /// `(var, values)` of every other field.
    pub fields: Vec<(String, Vec<String>)>,
}

/// The server's capabilities as the `<c/>` element carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// The software's URI ([`NODE`]).
    pub node: String,
    /// The verification string.
    pub ver: String,
}

impl Caps {
    /// The capabilities of an entity answering these identities, features and forms.
    pub fn new(identities: &[Identity], features: &[&str], forms: &[InfoForm]) -> Caps {
        Caps {
            node: NODE.to_owned(),
            ver: verification_string(identities, features, forms),
        }
    }

    /// The disco node that describes them: `node#ver` (§6.2).
    pub fn disco_node(&self) -> String {
        format!("{}#{}", self.node, self.ver)
    }
}

/// The verification string of §5.1 with SHA-1.
pub fn verification_string(
    identities: &[Identity],
    features: &[&str],
    forms: &[InfoForm],
) -> String {
    let mut ids: Vec<&Identity> = identities.iter().collect();
    ids.sort_by(|a, b| {
        (&a.category, &a.type_, &a.lang, &a.name).cmp(&(&b.category, &b.type_, &b.lang, &b.name))
    });
    let mut features: Vec<&str> = features.to_vec();
    features.sort_unstable();
    let mut s = String::new();
    for i in ids {
        for part in [
            i.category.as_str(),
            "/",
            &i.type_,
            "/",
            i.lang.as_deref().unwrap_or(""),
            "/",
            i.name.as_deref().unwrap_or(""),
            "<",
        ] {
            s.push_str(part);
        }
    }
    for f in features {
        s.push_str(f);
        s.push('<');
    }
    let mut forms: Vec<&InfoForm> = forms.iter().collect();
    forms.sort_by(|a, b| a.form_type.cmp(&b.form_type));
    for form in forms {
        s.push_str(&form.form_type);
        s.push('<');
        let mut fields: Vec<&(String, Vec<String>)> = form.fields.iter().collect();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        for (var, values) in fields {
            s.push_str(var);
            s.push('<');
            let mut values: Vec<&String> = values.iter().collect();
            values.sort();
            for v in values {
                s.push_str(v);
                s.push('<');
            }
        }
    }
    STANDARD.encode(Sha1::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(category: &str, type_: &str, lang: Option<&str>, name: &str) -> Identity {
        Identity {
            category: category.into(),
            type_: type_.into(),
            lang: lang.map(Into::into),
            name: Some(name.into()),
        }
    }

    #[test]
    fn the_simple_example_of_section_5_2() {
        let features = [
            "http://jabber.org/protocol/disco#info",
            "http://jabber.org/protocol/caps",
            "http://jabber.org/protocol/muc",
            "http://jabber.org/protocol/disco#items",
        ];
        assert_eq!(
            verification_string(&[id("client", "pc", None, "Exodus 0.9.1")], &features, &[]),
            "QgayPKawpkPSDYmwT/WM94uAlu0="
        );
    }

    #[test]
    fn the_complex_example_of_section_5_3() {
        let identities = [
            id("client", "pc", Some("en"), "Psi 0.11"),
            id("client", "pc", Some("el"), "Ψ 0.11"),
        ];
        let features = [
            "http://jabber.org/protocol/caps",
            "http://jabber.org/protocol/disco#info",
            "http://jabber.org/protocol/disco#items",
            "http://jabber.org/protocol/muc",
        ];
        let field = |var: &str, values: &[&str]| {
            (
                var.to_owned(),
                values.iter().map(|v| (*v).to_owned()).collect(),
            )
        };
        let form = InfoForm {
            form_type: "urn:xmpp:dataforms:softwareinfo".into(),
            fields: vec![
                field("software_version", &["0.11"]),
                field("ip_version", &["ipv6", "ipv4"]),
                field("os", &["Mac"]),
                field("os_version", &["10.5.1"]),
                field("software", &["Psi"]),
            ],
        };
        assert_eq!(
            verification_string(&identities, &features, &[form]),
            "q07IKJEyjvHSyhy//CH0CxmKi8w="
        );
    }

    #[test]
    fn order_of_input_does_not_matter_and_the_node_names_the_version() {
        let a = Caps::new(&[id("server", "im", None, "S")], &["b", "a"], &[]);
        let b = Caps::new(&[id("server", "im", None, "S")], &["a", "b"], &[]);
        assert_eq!(a, b);
        assert_eq!(a.disco_node(), format!("{NODE}#{}", a.ver));
        assert_ne!(
            a.ver,
            Caps::new(&[id("server", "im", None, "T")], &["a", "b"], &[]).ver
        );
    }
}
