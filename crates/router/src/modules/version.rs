//! Software Version (XEP-0092) of the server: name and version from the settings, and the
//! operating system only when configured (§5 warns that revealing it helps attackers).

use async_trait::async_trait;
use bytes::Bytes;
use starling_xml::writer::XmlWriter;
use starling_xmpp::ns;

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request, get_only};
use crate::stanza::IqType;

/// The XEP-0092 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Version;

#[async_trait]
impl Module for Version {
    fn name(&self) -> &'static str {
        "version"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::VERSION]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        super::is_server_level(target) && ns == ns::VERSION
    }

    async fn handle_iq(&self, ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        if iq.kind != IqType::Get {
            return get_only();
        }
        if iq.name != "query" {
            return bad_request("the version payload is <query/>");
        }
        let settings = &ctx.services.settings;
        let mut out = Vec::with_capacity(128);
        let mut w = XmlWriter::new(&mut out);
        w.start("query")
            .attr("xmlns", ns::VERSION)
            .text_element("name", &settings.name)
            .text_element("version", &settings.version);
        if let Some(os) = &settings.os {
            w.text_element("os", os);
        }
        w.end("query");
        IqResult::Result(Some(Bytes::from(out)))
    }
}
