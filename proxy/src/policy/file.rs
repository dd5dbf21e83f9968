//! The route file (`PILLION_CONFIG`): its YAML schema, following Gateway API `HTTPRoute`
//! semantics so a person who writes HTTPRoutes can read it without a manual.
//!
//! Every leaf value is validated while it is deserialised, so a mistake is reported with the
//! file's line and column; what cannot be checked per value is checked in [`super::Policy::compile`].
//!
//! ```yaml
//! retryBufferBytes: 65536
//! destinations:
//!   - destination: web.default.svc.cluster.local:80   # authority (Host) or ip:port
//!     retryBudget: { percent: 20, minRetriesPerSecond: 10, ttl: 10s }
//!     routes:
//!       - name: web-api
//!         matches:
//!           - path: { type: PathPrefix, value: /api }
//!             method: GET
//!             headers: [{ name: x-env, value: canary }]
//!         timeouts: { request: 10s, backendRequest: 2s }
//!         retry: { codes: [502, 503, UNAVAILABLE], attempts: 2, backoff: 25ms }
//!         backendRefs: [{ address: 10.0.0.7:8080, weight: 90 }, { address: 10.0.0.8:8080, weight: 10 }]
//! inbound:
//!   - port: 8080
//!     authorization: all-authenticated   # all-unauthenticated | deny | { allow: [spiffe://td/ns/prod/*] }
//! ```

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, de};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteFile {
    /// Largest request body kept for replay; bigger requests are not retried.
    #[serde(default)]
    pub retry_buffer_bytes: Option<u32>,
    #[serde(default)]
    pub destinations: Vec<DestinationSpec>,
    /// Authorization per inbound port of this workload.
    #[serde(default)]
    pub inbound: Vec<InboundSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundSpec {
    pub port: u16,
    pub authorization: crate::authz::Authorization,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationSpec {
    pub destination: Authority,
    #[serde(default)]
    pub retry_budget: Option<BudgetSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSpec {
    #[serde(default)]
    pub percent: Option<Percent>,
    #[serde(default)]
    pub min_retries_per_second: Option<u32>,
    #[serde(default)]
    pub ttl: Option<BudgetTtl>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    pub name: RouteName,
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    #[serde(default)]
    pub backend_refs: Vec<BackendSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default)]
    pub method: Option<Method>,
    #[serde(default)]
    pub headers: Vec<ValueMatchSpec>,
    #[serde(default)]
    pub query_params: Vec<ValueMatchSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatchSpec {
    #[serde(rename = "type", default)]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatchSpec {
    #[serde(rename = "type", default)]
    pub kind: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// The whole transaction, retries included. `0s` disables.
    #[serde(default)]
    pub request: Option<HumanDuration>,
    /// One attempt. `0s` disables.
    #[serde(default)]
    pub backend_request: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default)]
    pub codes: Vec<RetryCode>,
    /// Retries after the first attempt (Gateway API semantics).
    #[serde(default)]
    pub attempts: Option<u8>,
    #[serde(default)]
    pub backoff: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendSpec {
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// `host:port` or `ip:port`, lowercased.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Authority(pub String);

#[derive(Clone, Debug)]
pub struct RouteName(pub String);

#[derive(Clone, Copy, Debug)]
pub struct HumanDuration(pub Duration);

#[derive(Clone, Copy, Debug)]
pub struct BudgetTtl(pub Duration);

#[derive(Clone, Copy, Debug)]
pub struct Percent(pub f32);

#[derive(Clone, Debug)]
pub struct Method(pub http::Method);

/// A retryable outcome: an HTTP status, or a gRPC status by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCode {
    Http(http::StatusCode),
    Grpc(u8),
}

/// gRPC status names in code order (the code is the index).
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A file that could not be read or understood; the message names the file and the place.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FileError {
    pub path: String,
    pub reason: String,
}

impl RouteFile {
    pub fn read(path: &Path) -> Result<Self, FileError> {
        let text = std::fs::read_to_string(path).map_err(|e| FileError {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| FileError {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(RouteFile::default());
        }
        yaml_serde::from_str(text).map_err(|e| e.to_string())
    }
}

/// Implements `Deserialize` through `FromStr`-like parsing so errors keep their location.
macro_rules! from_str_deserialize {
    ($ty:ty, $expecting:literal, $parse:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        let parse: fn(&str) -> Result<$ty, String> = $parse;
                        parse(s).map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, n: u64) -> Result<$ty, E> {
                        self.visit_str(&n.to_string())
                    }
                    fn visit_i64<E: de::Error>(self, n: i64) -> Result<$ty, E> {
                        self.visit_str(&n.to_string())
                    }
                    fn visit_f64<E: de::Error>(self, n: f64) -> Result<$ty, E> {
                        self.visit_str(&n.to_string())
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

from_str_deserialize!(HumanDuration, "a duration such as 2s or 250ms", |s| {
    humantime::parse_duration(s)
        .map(HumanDuration)
        .map_err(|e| format!("invalid duration {s:?}: {e}"))
});

from_str_deserialize!(BudgetTtl, "a duration between 1s and 60s", |s| {
    let d = humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    if (Duration::from_secs(1)..=Duration::from_secs(60)).contains(&d) {
        Ok(BudgetTtl(d))
    } else {
        Err(format!("retry budget ttl {s} is outside 1s..60s"))
    }
});

from_str_deserialize!(Percent, "a percentage between 0 and 1000", |s| {
    match s.trim_end_matches('%').parse::<f32>() {
        Ok(p) if (0.0..=1000.0).contains(&p) => Ok(Percent(p)),
        _ => Err(format!("invalid percent {s:?}: expected a number between 0 and 1000")),
    }
});

from_str_deserialize!(Method, "an HTTP method", |s| {
    http::Method::from_bytes(s.as_bytes())
        .map(Method)
        .map_err(|_| format!("invalid HTTP method {s:?}"))
});

from_str_deserialize!(RouteName, "a route name", |s| {
    let ok = !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(RouteName(s.to_string()))
    } else {
        Err(format!(
            "invalid route name {s:?}: 1-63 characters of letters, digits, '-', '_' or '.' (it becomes a metric label)"
        ))
    }
});

from_str_deserialize!(Authority, "host:port or ip:port", |s| {
    let s = s.to_ascii_lowercase();
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(Authority(s));
    }
    let valid = s
        .parse::<http::uri::Authority>()
        .ok()
        .filter(|a| a.port_u16().is_some() && !a.host().is_empty());
    match valid {
        Some(_) => Ok(Authority(s)),
        None => Err(format!("invalid destination {s:?}: expected host:port or ip:port")),
    }
});

from_str_deserialize!(
    RetryCode,
    "an HTTP status (e.g. 503) or a gRPC status name (e.g. UNAVAILABLE)",
    |s| {
        if let Ok(n) = s.parse::<u16>() {
            return match http::StatusCode::from_u16(n) {
                Ok(code) if (100..600).contains(&n) => Ok(RetryCode::Http(code)),
                _ => Err(format!("invalid HTTP status {n}")),
            };
        }
        GRPC_STATUS_NAMES
            .iter()
            .position(|name| name.eq_ignore_ascii_case(s))
            .map(|i| RetryCode::Grpc(i as u8))
            .ok_or_else(|| format!("unknown retry code {s:?}: use an HTTP status or a gRPC status name"))
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let file = RouteFile::parse(
            r#"
retryBufferBytes: 1024
destinations:
  - destination: Web.default.svc.cluster.local:80
    retryBudget: { percent: 20, minRetriesPerSecond: 10, ttl: 10s }
    routes:
      - name: web-api
        matches:
          - path: { type: PathPrefix, value: /api }
            method: GET
            headers: [{ name: x-env, value: canary }]
        timeouts: { request: 10s, backendRequest: 2s }
        retry: { codes: [502, 503, UNAVAILABLE], attempts: 2, backoff: 25ms }
        backendRefs: [{ address: "10.0.0.7:8080", weight: 90 }]
"#,
        )
        .unwrap();
        let dst = &file.destinations[0];
        assert_eq!(dst.destination.0, "web.default.svc.cluster.local:80");
        let route = &dst.routes[0];
        let retry = route.retry.as_ref().unwrap();
        assert_eq!(
            retry.codes,
            vec![
                RetryCode::Http(http::StatusCode::BAD_GATEWAY),
                RetryCode::Http(http::StatusCode::SERVICE_UNAVAILABLE),
                RetryCode::Grpc(14)
            ]
        );
        assert_eq!(route.timeouts.backend_request.unwrap().0, Duration::from_secs(2));
    }

    #[test]
    fn errors_carry_line_and_column() {
        let err = RouteFile::parse("destinations:\n  - destination: web:80\n    routes:\n      - name: a\n        retry: { codes: [UNAVAILBLE] }\n").unwrap_err();
        assert!(err.contains("UNAVAILBLE") && err.contains("line 5"), "{err}");

        let err = RouteFile::parse("destinations:\n  - destination: web\n").unwrap_err();
        assert!(err.contains("host:port") && err.contains("line 2"), "{err}");

        let err =
            RouteFile::parse("destinations:\n  - destination: web:80\n    retryBudget: { ttl: 5m }\n").unwrap_err();
        assert!(err.contains("1s..60s") && err.contains("line 3"), "{err}");

        let err = RouteFile::parse("destinatons: []\n").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");

        let err =
            RouteFile::parse("destinations:\n  - destination: web:80\n    routes:\n      - name: \"has space\"\n")
                .unwrap_err();
        assert!(err.contains("metric label"), "{err}");
    }

    #[test]
    fn an_empty_file_is_an_empty_policy() {
        assert!(RouteFile::parse("  \n").unwrap().destinations.is_empty());
    }
}
