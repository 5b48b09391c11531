//! A parser for the Prometheus text exposition format (version 0.0.4), as served on the admin
//! endpoint's `/metrics`: `# HELP`/`# TYPE` comments, samples `name{label="value",...} value
//! [timestamp]`, label values with `\\`, `\"` and `\n` escapes, `+Inf`/`-Inf`/`NaN`.

use std::collections::BTreeSet;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name (for histograms and summaries, with its `_bucket`/`_sum`/`_count`).
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn has_labels(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(name, value)| self.label(name) == Some(*value))
    }
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses a scrape; any malformed sample line is an error naming the line.
    pub fn parse(text: &str) -> Result<Metrics, String> {
        let mut samples = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let sample =
                parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", number + 1))?;
            samples.push(sample);
        }
        Ok(Metrics { samples })
    }

    /// Every sample, in order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The distinct metric names.
    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }

    /// The value of metric `name` over the series carrying every label in `labels` (other
    /// labels may be present): the sum when several series match, `None` when none does.
    /// `metric("starling_x_total", &[])` is thus the total over all label values.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.has_labels(labels))
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// Samples whose name starts with `prefix` and that carry some label with value `value`;
    /// for finding "the counter of this error condition" without knowing its exact name.
    pub fn with_label_value<'a>(
        &'a self,
        prefix: &'a str,
        value: &'a str,
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name.starts_with(prefix) && s.labels.iter().any(|(_, v)| v == value))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value_text = fields.next().ok_or("no value")?;
    let value = parse_value(value_text).ok_or_else(|| format!("bad value {value_text:?}"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `name="value",...}` and returns what follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut Vec<(String, String)>,
) -> Result<&'a str, String> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = rest[..eq].trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    Some((_, c)) => {
                        value.push('\\');
                        value.push(c);
                    }
                    None => return Err("unterminated label value".into()),
                },
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        labels.push((name.to_owned(), value));
        rest = rest[close + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP starling_c2s_connections_total Connections accepted.
# TYPE starling_c2s_connections_total counter
starling_c2s_connections_total{listener="starttls"} 3
starling_c2s_connections_total{listener="direct_tls"} 2
# TYPE starling_stream_errors_total counter
starling_stream_errors_total{condition="policy-violation",reason="rate"} 1
starling_stream_errors_total{condition="not-well-formed" , reason="xml",} 4 1700000000000
starling_sessions 7
weird_label{path="a\"b\\c\nd"} -2.5e3
starling_latency_seconds_bucket{le="+Inf"} 12
starling_ratio NaN
starling_upper +Inf
"#;

    #[test]
    fn parses_every_sample() {
        let m = Metrics::parse(SCRAPE).unwrap();
        assert_eq!(m.samples().len(), 9);
        assert_eq!(m.metric("starling_sessions", &[]), Some(7.0));
        assert_eq!(
            m.metric(
                "starling_c2s_connections_total",
                &[("listener", "starttls")]
            ),
            Some(3.0)
        );
        // No labels asked: the sum over every series.
        assert_eq!(m.metric("starling_c2s_connections_total", &[]), Some(5.0));
        assert_eq!(
            m.metric(
                "starling_stream_errors_total",
                &[("condition", "not-well-formed")]
            ),
            Some(4.0)
        );
        assert_eq!(
            m.metric(
                "starling_stream_errors_total",
                &[("condition", "host-unknown")]
            ),
            None
        );
        assert_eq!(m.metric("absent", &[]), None);
        let weird = &m.samples()[5];
        assert_eq!(weird.label("path"), Some("a\"b\\c\nd"));
        assert_eq!(weird.value, -2500.0);
        assert_eq!(
            m.metric("starling_latency_seconds_bucket", &[("le", "+Inf")]),
            Some(12.0)
        );
        assert!(m.metric("starling_ratio", &[]).unwrap().is_nan());
        assert_eq!(m.metric("starling_upper", &[]), Some(f64::INFINITY));
        assert!(m.names().contains("starling_sessions"));
    }

    #[test]
    fn finds_samples_by_label_value() {
        let m = Metrics::parse(SCRAPE).unwrap();
        let found: Vec<_> = m
            .with_label_value("starling_", "policy-violation")
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(found, ["starling_stream_errors_total"]);
        assert_eq!(m.with_label_value("other_", "policy-violation").count(), 0);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "1abc 2",
            "name",
            "name{a=\"1\" 2",
            "name{a=1} 2",
            "name{a=\"1\"} x",
            "name 1 2 3",
            "name{=\"x\"} 1",
            "name{a=\"1\"b=\"2\"} 1",
            "name 1 notatime",
        ] {
            assert!(Metrics::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(Metrics::parse("").unwrap().samples().len(), 0);
    }
}
