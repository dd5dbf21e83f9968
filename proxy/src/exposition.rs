//! The two Prometheus exposition formats, and which one a scraper asked for.
//!
//! prometheus-client writes OpenMetrics 1.0. Prometheus asks for it in `Accept`, but `promtool`,
//! older scrapers and people with curl read the classic text format 0.0.4, where a counter family
//! is named with its `_total` suffix and there is no `# UNIT` or `# EOF`. The classic format is
//! derived from the OpenMetrics text line by line, so there is one registry and one encoder.

/// `Content-Type` of the OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the classic text answer.
pub const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (and prefers it to the classic text).
///
/// Prometheus sends `application/openmetrics-text;version=1.0.0,application/openmetrics-text;
/// version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`: the first media range with the
/// highest q wins; without OpenMetrics among them, the classic text is answered.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let (mut openmetrics, mut text) = (None::<f32>, None::<f32>);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    match (openmetrics, text) {
        (Some(om), Some(text)) => om > 0.0 && om >= text,
        (Some(om), None) => om > 0.0,
        _ => false,
    }
}

/// Rewrites OpenMetrics text (as prometheus-client writes it) into the text format 0.0.4.
pub fn to_text_0_0_4(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // prometheus-client writes `# HELP` before `# TYPE`; the HELP line waits for its family's type,
    // which decides the family's name in the classic format.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), None);
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "gauge" | "stateset" => ("", "gauge"),
                "info" => ("_info", "gauge"),
                "histogram" => ("", "histogram"),
                "summary" => ("", "summary"),
                _ => ("", "untyped"),
            };
            let pending = help.take();
            match pending {
                Some((help_name, text)) if help_name == name => {
                    flush_help(&mut out, Some((name, text)), Some(suffix));
                }
                other => flush_help(&mut out, other, None),
            }
            push_line(&mut out, &["# TYPE ", name, suffix, " ", kind]);
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            // No such lines in the classic format.
        } else if line.starts_with('#') {
            flush_help(&mut out, help.take(), None);
            push_line(&mut out, &[line]);
        } else {
            flush_help(&mut out, help.take(), None);
            // Exemplars (` # {...} value`) do not exist in the classic format.
            let sample = match line.find(" # ") {
                Some(at) => &line[..at],
                None => line,
            };
            push_line(&mut out, &[sample]);
        }
    }
    flush_help(&mut out, help, None);
    out
}

fn flush_help(out: &mut String, help: Option<(&str, &str)>, suffix: Option<&str>) {
    let Some((name, text)) = help else { return };
    // OpenMetrics escapes `"` in HELP; the classic format does not, and would print the backslash.
    let text = text.replace("\\\"", "\"");
    push_line(out, &["# HELP ", name, suffix.unwrap_or(""), " ", &text]);
}

fn push_line(out: &mut String, parts: &[&str]) {
    for part in parts {
        out.push_str(part);
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_classic_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("application/openmetrics-text")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some(
            "text/plain, application/openmetrics-text;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }

    #[test]
    fn counters_are_named_with_total_and_openmetrics_only_lines_go() {
        let om = "# HELP pillion_requests Requests \\\"seen\\\".\n# TYPE pillion_requests counter\npillion_requests_total{route=\"a\"} 3\n# HELP pillion_open Open.\n# TYPE pillion_open gauge\n# UNIT pillion_open connections\npillion_open 1\n# HELP pillion_duration_seconds Time.\n# TYPE pillion_duration_seconds histogram\n# UNIT pillion_duration_seconds seconds\npillion_duration_seconds_bucket{le=\"+Inf\"} 1 # {trace_id=\"x\"} 0.5\npillion_duration_seconds_sum 0.5\npillion_duration_seconds_count 1\n# HELP pillion_build Build.\n# TYPE pillion_build info\npillion_build_info{version=\"1\"} 1\n# EOF\n";
        assert_eq!(
            to_text_0_0_4(om),
            "# HELP pillion_requests_total Requests \"seen\".\n# TYPE pillion_requests_total counter\npillion_requests_total{route=\"a\"} 3\n# HELP pillion_open Open.\n# TYPE pillion_open gauge\npillion_open 1\n# HELP pillion_duration_seconds Time.\n# TYPE pillion_duration_seconds histogram\npillion_duration_seconds_bucket{le=\"+Inf\"} 1\npillion_duration_seconds_sum 0.5\npillion_duration_seconds_count 1\n# HELP pillion_build_info Build.\n# TYPE pillion_build_info gauge\npillion_build_info{version=\"1\"} 1\n"
        );
    }
}
