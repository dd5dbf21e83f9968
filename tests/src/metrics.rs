//! Reading samples out of the proxy's metrics text (Prometheus / OpenMetrics exposition).
//!
//! Tests ask for a series the way a person writes a PromQL selector, e.g.
//! `pillion_tcp_connections_opened_total{direction="inbound"}`. The given labels must be present
//! with those values; any further labels are summed over, so a test keeps passing if the proxy
//! adds a dimension. A series that was never touched is simply absent from the exposition
//! (counter families appear on first use), which [`Metrics::value`] reads as 0.

use std::fmt;
use std::time::Duration;

/// `pillion_tcp_connections_opened_total{direction="<direction>"}`.
pub fn opened(direction: &str) -> String {
    format!("pillion_tcp_connections_opened_total{{direction=\"{direction}\"}}")
}

/// `pillion_tcp_connections_open{direction="<direction>"}` (gauge).
pub fn open(direction: &str) -> String {
    format!("pillion_tcp_connections_open{{direction=\"{direction}\"}}")
}

/// `pillion_tcp_read_bytes_total{direction="<direction>"}`: bytes read from the accepted peer.
pub fn read_bytes(direction: &str) -> String {
    format!("pillion_tcp_read_bytes_total{{direction=\"{direction}\"}}")
}

/// `pillion_tcp_write_bytes_total{direction="<direction>"}`: bytes written to the accepted peer.
pub fn write_bytes(direction: &str) -> String {
    format!("pillion_tcp_write_bytes_total{{direction=\"{direction}\"}}")
}

/// `pillion_tcp_connections_refused_total{direction="<direction>",reason="<reason>"}`.
pub fn refused(direction: &str, reason: &str) -> String {
    format!("pillion_tcp_connections_refused_total{{direction=\"{direction}\",reason=\"{reason}\"}}")
}

/// `pillion_tcp_connect_errors_total{direction="<direction>"}`: failed upstream connects.
pub fn connect_errors(direction: &str) -> String {
    format!("pillion_tcp_connect_errors_total{{direction=\"{direction}\"}}")
}

/// One parsed sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<Sample>,
    text: String,
}

/// Scrapes with `scrape` until the value of `selector` satisfies `accept`, for at most `timeout`
/// (metrics may be recorded asynchronously, e.g. byte counts when a connection ends); panics
/// with the last scrape otherwise.
pub fn wait_for(
    mut scrape: impl FnMut() -> Metrics,
    selector: &str,
    timeout: Duration,
    accept: impl Fn(f64) -> bool,
) -> f64 {
    let mut last = None;
    let found = crate::poll_until(timeout, Duration::from_millis(50), || {
        let metrics = scrape();
        let value = metrics.value(selector);
        last = Some(metrics);
        accept(value).then_some(value)
    });
    found.unwrap_or_else(|| {
        let metrics = last.unwrap_or_default();
        panic!(
            "{selector} = {} did not reach the expected value within {timeout:?}; metrics:\n{}",
            metrics.value(selector),
            metrics.text()
        )
    })
}

/// A malformed line in the exposition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: String,
    pub reason: &'static str,
}

impl Metrics {
    /// Parses every sample line; `#` lines (HELP, TYPE, UNIT, EOF) and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Metrics, ParseError> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                parse_sample(line).map_err(|reason| ParseError {
                    line: line.to_owned(),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Metrics {
            samples,
            text: text.to_owned(),
        })
    }

    /// The sum over series matching `selector`, or `None` when no series matches.
    ///
    /// Panics on a malformed selector: that is a bug in the test.
    pub fn get(&self, selector: &str) -> Option<f64> {
        let wanted = parse_series(selector).unwrap_or_else(|reason| panic!("bad selector {selector:?}: {reason}"));
        let mut matched = self
            .samples
            .iter()
            .filter(|s| s.name == wanted.name && wanted.labels.iter().all(|l| s.labels.contains(l)))
            .peekable();
        matched.peek()?;
        Some(matched.map(|s| s.value).sum())
    }

    /// Like [`Metrics::get`], with an absent series read as 0.
    pub fn value(&self, selector: &str) -> f64 {
        self.get(selector).unwrap_or(0.0)
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The raw exposition text, for failure messages.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in metrics line {:?}", self.reason, self.line)
    }
}

impl std::error::Error for ParseError {}

/// `name{labels} value [timestamp] [# exemplar]`.
fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let series_end = match line.find('{') {
        // The label block may contain spaces inside quoted values: find its closing brace.
        Some(_) => closing_brace(line).ok_or("unterminated label set")? + 1,
        None => line.find(char::is_whitespace).ok_or("no value")?,
    };
    let mut sample = parse_series(&line[..series_end])?;
    let value = line[series_end..].split_whitespace().next().ok_or("no value")?;
    sample.value = value.parse::<f64>().map_err(|_| "bad value")?;
    Ok(sample)
}

/// `name` or `name{a="x",b="y"}` (value left at 0).
fn parse_series(series: &str) -> Result<Sample, &'static str> {
    let series = series.trim();
    let (name, mut rest) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}').ok_or("missing `}`")?),
        None => (series, ""),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err("bad metric name");
    }
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if rest.is_empty() {
            break;
        }
        let (key, after) = rest.split_once("=\"").ok_or("bad label")?;
        let (value, after) = unescape_until_quote(after).ok_or("unterminated label value")?;
        labels.push((key.trim().to_owned(), value));
        rest = after;
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: 0.0,
    })
}

/// Reads a label value up to its closing quote; returns it and the text after the quote.
fn unescape_until_quote(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// Byte index of the `}` closing the first label set, skipping quoted values.
fn closing_brace(line: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match (in_quotes, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_quotes = !in_quotes,
            (false, _, '}') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP pillion_tcp_connections_opened Connections accepted.
# TYPE pillion_tcp_connections_opened counter
pillion_tcp_connections_opened_total{direction=\"inbound\"} 3
pillion_tcp_connections_opened_total{direction=\"outbound\"} 1
# TYPE pillion_tcp_connections_refused counter
pillion_tcp_connections_refused_total{reason=\"loop\",direction=\"inbound\"} 2
pillion_tcp_connections_refused_total{direction=\"inbound\",reason=\"no_original_dst\"} 5
pillion_weird{path=\"a b}\\\"c\"} 1.5e3 1700000000
pillion_up 1
# EOF
";

    #[test]
    fn reads_series_by_labels_in_any_order() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(
            m.get("pillion_tcp_connections_opened_total{direction=\"inbound\"}"),
            Some(3.0)
        );
        assert_eq!(
            m.get("pillion_tcp_connections_refused_total{direction=\"inbound\",reason=\"loop\"}"),
            Some(2.0)
        );
        assert_eq!(m.get("pillion_up"), Some(1.0));
    }

    #[test]
    fn sums_over_unnamed_labels_and_reads_absent_as_zero() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(
            m.get("pillion_tcp_connections_refused_total{direction=\"inbound\"}"),
            Some(7.0)
        );
        assert_eq!(m.get("pillion_tcp_connections_opened_total"), Some(4.0));
        assert_eq!(
            m.get("pillion_tcp_connections_opened_total{direction=\"sideways\"}"),
            None
        );
        assert_eq!(m.value("pillion_nothing_total"), 0.0);
    }

    #[test]
    fn handles_escapes_timestamps_and_exponents() {
        let m = Metrics::parse(TEXT).unwrap();
        assert_eq!(m.get("pillion_weird{path=\"a b}\\\"c\"}"), Some(1500.0));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Metrics::parse("pillion_x{direction=\"in} 1\n").is_err());
        assert!(Metrics::parse("pillion_x{direction=\"in\"} one\n").is_err());
    }
}
