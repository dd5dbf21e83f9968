//! What the user wants to see, read from the proxies' admin ports: each side's SPIFFE ID, the
//! mTLS connections by peer identity, and requests and latency per route. The same readings
//! are checked, so a demo that prints a report is a mesh that worked.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use pillion_tests::metrics::{Metrics, Sample};
use pillion_tests::sidecar::ProxyIdentity;

use crate::exercise::{LocalMesh, Traffic};

/// The proxies' view after the traffic.
pub struct Evidence {
    client_name: String,
    server_name: String,
    client_identity: ProxyIdentity,
    server_identity: ProxyIdentity,
    client_metrics: Metrics,
    server_metrics: Metrics,
}

const SETTLE: Duration = Duration::from_secs(5);

/// Reads both admin ports and checks that the traffic was all answered, over mTLS, between the
/// expected identities. `Err` says what did not hold.
pub fn collect<M: LocalMesh>(
    mesh: &M,
    traffic: &Traffic,
    client_id: &str,
    server_id: &str,
) -> Result<Evidence, String> {
    let mut problems = traffic.failures.clone();
    let (client_admin, server_admin) = (mesh.client_admin(), mesh.server_admin());
    let client_identity = client_admin.identity()?;
    let server_identity = server_admin.identity()?;
    for (name, identity, expected) in [
        (mesh.client_name(), &client_identity, client_id),
        (mesh.server_name(), &server_identity, server_id),
    ] {
        if identity.spiffe_id.as_deref() != Some(expected) {
            problems.push(format!("{name} holds {:?}, expected {expected}", identity.spiffe_id));
        }
    }

    // Counters are updated when responses end: give the last ones a moment.
    let expected = (traffic.http_requests + traffic.grpc_calls) as f64;
    let scrape_settled = |admin: pillion_tests::sidecar::AdminPort<'_>, direction: &str| {
        let selector = format!("pillion_http_requests_total{{direction=\"{direction}\"}}");
        let mut last = Err("no scrape".to_string());
        pillion_tests::poll_until(SETTLE, Duration::from_millis(100), || {
            last = admin.scrape();
            last.as_ref()
                .is_ok_and(|m| m.value(&selector) >= expected)
                .then_some(())
        });
        last
    };
    let client_metrics = scrape_settled(client_admin, "outbound")?;
    let server_metrics = scrape_settled(server_admin, "inbound")?;
    for (name, metrics, direction) in [
        (mesh.client_name(), &client_metrics, "outbound"),
        (mesh.server_name(), &server_metrics, "inbound"),
    ] {
        let counted = metrics.value(&format!("pillion_http_requests_total{{direction=\"{direction}\"}}"));
        if counted < expected {
            problems.push(format!(
                "{name} counted {counted} {direction} HTTP requests, expected {expected}"
            ));
        }
    }

    let from_client = mesh_tls(&server_metrics, "inbound", "true", Some(client_id));
    if from_client < 1.0 {
        problems.push(format!(
            "{} saw no mTLS connection from {client_id}",
            mesh.server_name()
        ));
    }
    let plaintext = mesh_tls(&server_metrics, "inbound", "false", None);
    if plaintext > 0.0 {
        problems.push(format!(
            "{} accepted {plaintext} plaintext connections",
            mesh.server_name()
        ));
    }
    if mesh.tcp_target().is_some() && mesh_tls(&client_metrics, "outbound", "true", Some(server_id)) < 1.0 {
        problems.push(format!(
            "{} opened no mTLS connection to {server_id}",
            mesh.client_name()
        ));
    }

    match problems.is_empty() {
        true => Ok(Evidence {
            client_name: mesh.client_name().to_owned(),
            server_name: mesh.server_name().to_owned(),
            client_identity,
            server_identity,
            client_metrics,
            server_metrics,
        }),
        false => Err(format!(
            "the mesh did not work as expected:\n  - {}",
            problems.join("\n  - ")
        )),
    }
}

/// `pillion_tcp_mesh_connections_total` for `direction` and `tls`, for one peer or all.
fn mesh_tls(metrics: &Metrics, direction: &str, tls: &str, peer_id: Option<&str>) -> f64 {
    let peer = peer_id.map_or(String::new(), |id| format!(",peer_id=\"{id}\""));
    metrics.value(&format!(
        "pillion_tcp_mesh_connections_total{{direction=\"{direction}\",tls=\"{tls}\"{peer}}}"
    ))
}

impl Evidence {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Mutual TLS between the proxies (GET /identity, pillion_tcp_mesh_connections_total)"
        );
        for (name, identity) in [
            (&self.client_name, &self.client_identity),
            (&self.server_name, &self.server_identity),
        ] {
            let _ = writeln!(
                out,
                "  {name:<12} {}   certificate from the {}, expires in {}",
                identity.spiffe_id.as_deref().unwrap_or("(none)"),
                identity.source.replace('-', " "),
                human(identity.expires_in_seconds.unwrap_or(0))
            );
        }
        for (name, metrics, direction, verb) in [
            (&self.server_name, &self.server_metrics, "inbound", "from"),
            (&self.client_name, &self.client_metrics, "outbound", "to"),
        ] {
            for sample in by_name(metrics, "pillion_tcp_mesh_connections_total") {
                if label(sample, "direction") != direction || sample.value == 0.0 {
                    continue;
                }
                let line = match label(sample, "tls") {
                    "true" => format!("{} mTLS {verb} {}", sample.value, label(sample, "peer_id")),
                    _ => format!("{} in plaintext", sample.value),
                };
                let _ = writeln!(out, "  {name:<12} {direction:<9} connections: {line}");
            }
        }
        let _ = writeln!(
            out,
            "  (the apps spoke plaintext; the proxies verified each other's SPIFFE ID)"
        );

        let _ = writeln!(
            out,
            "\nHTTP by route (pillion_http_requests_total, pillion_http_request_duration_seconds)"
        );
        let _ = writeln!(
            out,
            "  {:<12} {:<9} {:<10} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "proxy", "direction", "route", "status", "requests", "mean", "p50", "p99"
        );
        for (name, metrics) in [
            (&self.client_name, &self.client_metrics),
            (&self.server_name, &self.server_metrics),
        ] {
            for row in route_rows(metrics) {
                let _ = writeln!(
                    out,
                    "  {name:<12} {:<9} {:<10} {:>6} {:>9} {:>9} {:>9} {:>9}",
                    row.direction, row.route, row.status, row.count, row.mean, row.p50, row.p99
                );
            }
        }

        let _ = writeln!(out, "\ngRPC by route (pillion_grpc_requests_total)");
        for (name, metrics) in [
            (&self.client_name, &self.client_metrics),
            (&self.server_name, &self.server_metrics),
        ] {
            let mut by_route: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
            for sample in by_name(metrics, "pillion_grpc_requests_total") {
                by_route
                    .entry((label(sample, "direction").into(), label(sample, "route").into()))
                    .or_default()
                    .push(format!("{} ×{}", label(sample, "grpc_status"), sample.value));
            }
            for ((direction, route), counts) in by_route {
                let _ = writeln!(out, "  {name:<12} {direction:<9} {route:<10} {}", counts.join(", "));
            }
        }
        out
    }
}

struct RouteRow {
    direction: String,
    route: String,
    status: String,
    count: f64,
    mean: String,
    p50: String,
    p99: String,
}

/// One row per (direction, route, status) of `pillion_http_requests_total`, with the duration
/// histogram's mean and bucket bounds for the median and the 99th percentile.
fn route_rows(metrics: &Metrics) -> Vec<RouteRow> {
    type Key = (String, String, String);
    let key = |s: &Sample| -> Key {
        (
            label(s, "direction").into(),
            label(s, "route").into(),
            label(s, "status_code").into(),
        )
    };
    let mut counts: BTreeMap<Key, f64> = BTreeMap::new();
    for sample in by_name(metrics, "pillion_http_requests_total") {
        *counts.entry(key(sample)).or_default() += sample.value;
    }
    let mut sums: BTreeMap<Key, f64> = BTreeMap::new();
    for sample in by_name(metrics, "pillion_http_request_duration_seconds_sum") {
        *sums.entry(key(sample)).or_default() += sample.value;
    }
    let mut buckets: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in by_name(metrics, "pillion_http_request_duration_seconds_bucket") {
        let le = match label(sample, "le") {
            "+Inf" => f64::INFINITY,
            le => le.parse().unwrap_or(f64::INFINITY),
        };
        buckets.entry(key(sample)).or_default().push((le, sample.value));
    }
    counts
        .into_iter()
        // Common statuses are registered up front, at 0: only show what happened.
        .filter(|(_, count)| *count > 0.0)
        .map(|(k, count)| {
            let mut bounds = buckets.remove(&k).unwrap_or_default();
            bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mean = sums.get(&k).map_or("-".into(), |sum| seconds(sum / count.max(1.0)));
            RouteRow {
                p50: quantile_bound(&bounds, 0.5),
                p99: quantile_bound(&bounds, 0.99),
                direction: k.0,
                route: k.1,
                status: k.2,
                count,
                mean,
            }
        })
        .collect()
}

/// `≤ <bucket bound>` for quantile `q` of cumulative `(le, count)` buckets.
fn quantile_bound(buckets: &[(f64, f64)], q: f64) -> String {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return "-".into();
    }
    let wanted = (q * total).ceil();
    match buckets.iter().find(|(_, cumulative)| *cumulative >= wanted) {
        Some((le, _)) if le.is_finite() => format!("≤{}", seconds(*le)),
        _ => "slow".into(),
    }
}

fn seconds(s: f64) -> String {
    match s < 1.0 {
        true => format!("{:.1}ms", s * 1000.0),
        false => format!("{s:.2}s"),
    }
}

fn human(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn by_name<'a>(metrics: &'a Metrics, name: &'a str) -> impl Iterator<Item = &'a Sample> {
    metrics.samples().iter().filter(move |s| s.name == name)
}

fn label<'a>(sample: &'a Sample, key: &str) -> &'a str {
    sample
        .labels
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_tabulated_from_the_exposition() {
        let text = "\
pillion_http_requests_total{direction=\"outbound\",route=\"hello\",status_code=\"200\"} 4
pillion_http_request_duration_seconds_sum{direction=\"outbound\",route=\"hello\",status_code=\"200\"} 0.008
pillion_http_request_duration_seconds_count{direction=\"outbound\",route=\"hello\",status_code=\"200\"} 4
pillion_http_request_duration_seconds_bucket{le=\"0.001\",direction=\"outbound\",route=\"hello\",status_code=\"200\"} 1
pillion_http_request_duration_seconds_bucket{le=\"0.002\",direction=\"outbound\",route=\"hello\",status_code=\"200\"} 3
pillion_http_request_duration_seconds_bucket{le=\"0.004\",direction=\"outbound\",route=\"hello\",status_code=\"200\"} 4
pillion_http_request_duration_seconds_bucket{le=\"+Inf\",direction=\"outbound\",route=\"hello\",status_code=\"200\"} 4
# EOF
";
        let rows = route_rows(&Metrics::parse(text).unwrap());
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(
            (row.route.as_str(), row.status.as_str(), row.count),
            ("hello", "200", 4.0)
        );
        assert_eq!(row.mean, "2.0ms");
        assert_eq!(row.p50, "≤2.0ms");
        assert_eq!(row.p99, "≤4.0ms");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(86_399), "23h59m");
        assert_eq!(human(300), "5m");
        assert_eq!(seconds(0.0005), "0.5ms");
        assert_eq!(seconds(2.5), "2.50s");
        assert_eq!(quantile_bound(&[(0.001, 0.0), (f64::INFINITY, 2.0)], 0.5), "slow");
    }
}
