//! Entity Time (XEP-0202) of the server: `<tzo/>` and `<utc/>` in the formats of XEP-0082
//! (§3: TZD `+hh:mm`, DateTime `CCYY-MM-DDThh:mm:ss.sssZ`). The server reports UTC as its
//! zone, so it reveals nothing about where it runs.

use async_trait::async_trait;
use bytes::Bytes;
use starling_xml::writer::XmlWriter;
use starling_xmpp::ns;
use time::OffsetDateTime;

use super::{IqContext, IqRequest, IqResult, IqTarget, Module, bad_request, get_only};
use crate::stanza::IqType;

/// The XEP-0202 module.
#[derive(Debug, Clone, Copy, Default)]
pub struct Time;

/// A moment as an XEP-0082 DateTime in UTC with milliseconds.
pub(crate) fn xep0082_datetime(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[async_trait]
impl Module for Time {
    fn name(&self) -> &'static str {
        "time"
    }

    fn features(&self) -> &[&'static str] {
        &[ns::TIME]
    }

    fn handles_iq(&self, target: &IqTarget, ns: &str) -> bool {
        super::is_server_level(target) && ns == ns::TIME
    }

    async fn handle_iq(&self, _ctx: &IqContext<'_>, iq: &IqRequest<'_>) -> IqResult {
        if iq.kind != IqType::Get {
            return get_only();
        }
        if iq.name != "time" {
            return bad_request("the time payload is <time/>");
        }
        let mut out = Vec::with_capacity(96);
        XmlWriter::new(&mut out)
            .start("time")
            .attr("xmlns", ns::TIME)
            .text_element("tzo", "+00:00")
            .text_element("utc", &xep0082_datetime(OffsetDateTime::now_utc()))
            .end("time");
        IqResult::Result(Some(Bytes::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_format() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_166_551_115_042_000_000).unwrap();
        assert_eq!(xep0082_datetime(t), "2006-12-19T17:58:35.042Z");
        let offset = time::UtcOffset::from_hms(-6, 0, 0).unwrap();
        assert_eq!(
            xep0082_datetime(t.to_offset(offset)),
            "2006-12-19T17:58:35.042Z"
        );
    }
}
