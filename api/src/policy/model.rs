//! The policy YAML model: destinations (endpoints, retry budget, load balancing, routes) and inbound
//! authorization.
//!
//! Route semantics follow the Gateway API HTTPRoute, so `HTTPRoute` objects translate one to one.
//! Every value is validated while it is deserialized (newtypes with `try_from`), so an error carries
//! the line and column of the offending value. The proxy's route file and the control plane's
//! policy file are both this model; the proxy compiles it into its request matcher.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{
    Deserialize, Deserializer,
    de::{self, Visitor},
};

pub use crate::spiffe::SpiffeId;

/// The whole file, as written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyFile {
    /// The largest request body a proxy keeps for retries; read from the proxy's own file only.
    #[serde(default)]
    pub retry_buffer_bytes: Option<u32>,
    #[serde(default)]
    pub destinations: Vec<Destination>,
    #[serde(default)]
    pub inbound: Vec<Inbound>,
}

/// The file indexed for lookups; duplicates were refused while building it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub retry_buffer_bytes: Option<u32>,
    pub destinations: HashMap<Authority, Destination>,
    pub inbound: HashMap<u16, Authorization>,
    /// Kubernetes mode: each meshed pod's inbound authorization, under every IP of the pod. For an
    /// `ip:port` destination it wins over `inbound` (the policy file never fills it).
    pub workloads: HashMap<IpAddr, WorkloadInbound>,
}

/// Who may call one workload (a pod), port by port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadInbound {
    /// The workload's own identity: only its proxy is told who may call it.
    pub owner: SpiffeId,
    /// Ports with an authorization of their own.
    pub ports: HashMap<u16, Authorization>,
    /// Every other port.
    pub default: Authorization,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub destination: Authority,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub retry_budget: RetryBudget,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default)]
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Expected SPIFFE ID; absent = not meshed.
    #[serde(default)]
    pub identity: Option<SpiffeId>,
    #[serde(default)]
    pub protocol: ProtocolHint,
    #[serde(default = "one")]
    pub weight: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolHint {
    #[default]
    Unknown,
    Http1,
    Http2,
    Opaque,
}

/// Retries allowed per destination: `percent` of requests plus `minRetriesPerSecond`, over `ttl`.
/// Each field is checked where it is read, so an error points at the value.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetryBudget {
    #[serde(deserialize_with = "budget_percent")]
    pub percent: u32,
    pub min_retries_per_second: u32,
    #[serde(deserialize_with = "budget_ttl")]
    pub ttl: Duration,
}

/// How the proxy balances over a destination's endpoints: when an endpoint leaves rotation after
/// failures, and how long a request waits for a usable one. Defaults are Linkerd's.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LoadBalancer {
    pub failure_accrual: FailureAccrual,
    /// How long a request waits for a usable endpoint before the proxy answers 503 (more than 0s, at most 60s).
    #[serde(deserialize_with = "queue_timeout")]
    pub queue_timeout: Duration,
}

/// `consecutive_failures` in a row take an endpoint out of rotation (0 = never); it is probed
/// again after a jittered backoff that starts at `min_backoff` and doubles up to `max_backoff`.
/// Read through `RawFailureAccrual` because `maxBackoff` is checked against `minBackoff`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawFailureAccrual")]
pub struct FailureAccrual {
    pub consecutive_failures: u32,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct RawFailureAccrual {
    #[serde(deserialize_with = "consecutive_failures")]
    consecutive_failures: u32,
    #[serde(deserialize_with = "min_backoff")]
    min_backoff: Duration,
    #[serde(deserialize_with = "max_backoff")]
    max_backoff: Duration,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// The `route` metric label.
    pub name: RouteName,
    /// Any one matching selects the route; none = match everything.
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    #[serde(default)]
    pub retry: Option<Retry>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct RouteName(pub String);

/// All present conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub method: Option<HttpMethod>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<QueryParamMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawPathMatch")]
pub enum PathMatch {
    Exact(String),
    /// Whole path segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    Regex(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPathMatch {
    #[serde(rename = "type", default)]
    kind: PathMatchType,
    #[serde(default = "root_path")]
    value: String,
}

#[derive(Default, Deserialize)]
enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct HttpMethod(pub String);

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawNameMatch")]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    pub value: StringMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawNameMatch")]
pub struct QueryParamMatch {
    pub name: String,
    pub value: StringMatch,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Regex(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNameMatch {
    name: String,
    value: String,
    #[serde(rename = "type", default)]
    kind: StringMatchType,
}

#[derive(Default, Deserialize)]
enum StringMatchType {
    #[default]
    Exact,
    RegularExpression,
}

/// `request` covers the whole transaction including retries, `backendRequest` one attempt.
/// Absent = the proxy's default; `0s` = disabled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawTimeouts")]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTimeouts {
    #[serde(default, deserialize_with = "optional_duration")]
    request: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    backend_request: Option<Duration>,
}

/// Gateway API HTTPRouteRetry: `attempts` is the number of retries after the first try.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    #[serde(default)]
    pub codes: Vec<RetryCode>,
    #[serde(default = "one")]
    pub attempts: u32,
    #[serde(default = "default_backoff", deserialize_with = "duration")]
    pub backoff: Duration,
}

/// A number is an HTTP status; a name (`UNAVAILABLE`) a gRPC status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCode {
    Http(u16),
    Grpc(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// `ip:port`: a proxy sends to a backend itself, so it must be an address. (A Kubernetes
    /// control plane resolves a Service `backendRef` to its endpoints before sending.)
    #[serde(deserialize_with = "backend_address")]
    pub address: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inbound {
    pub port: u16,
    pub authorization: Authorization,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    AllUnauthenticated,
    AllAuthenticated,
    Deny,
    /// Exact SPIFFE IDs, and prefixes (written `spiffe://td/ns/prod/*`, kept as `spiffe://td/ns/prod/`).
    Allow {
        identities: Vec<SpiffeId>,
        prefixes: Vec<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    allow: Vec<String>,
}

/// `host:port` or `ip:port`, normalised: lower-case host, no trailing dot, IPv6 in brackets.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Authority {
    text: String,
    port: u16,
}

impl Policy {
    /// Indexes the file; a destination or inbound port listed twice is an error.
    pub fn from_file(file: PolicyFile) -> Result<Self, String> {
        let mut policy = Policy {
            retry_buffer_bytes: file.retry_buffer_bytes,
            ..Policy::default()
        };
        for (i, d) in file.destinations.into_iter().enumerate() {
            let mut names = std::collections::HashSet::new();
            for r in &d.routes {
                if !names.insert(&r.name) {
                    return Err(format!(
                        "destinations[{i}] ({}): route name `{}` is used twice",
                        d.destination, r.name.0
                    ));
                }
            }
            if let Some(prev) = policy.destinations.insert(d.destination.clone(), d) {
                return Err(format!("destinations[{i}]: {} is listed twice", prev.destination));
            }
        }
        for (i, inbound) in file.inbound.into_iter().enumerate() {
            if policy.inbound.insert(inbound.port, inbound.authorization).is_some() {
                return Err(format!("inbound[{i}]: port {} is listed twice", inbound.port));
            }
        }
        Ok(policy)
    }
}

impl Policy {
    /// The inbound authorization for a workload's `destination`: the pod's own entry when the
    /// destination is a known pod address, else the per-port entry.
    pub fn inbound_at(&self, destination: &Authority) -> Option<&Authorization> {
        if let Some(address) = destination.socket_addr()
            && let Some(workload) = self.workloads.get(&address.ip())
        {
            return Some(workload.ports.get(&address.port()).unwrap_or(&workload.default));
        }
        self.inbound.get(&destination.port())
    }

    /// The identity of the workload at `destination`, when it is a known pod address.
    pub fn owner_at(&self, destination: &Authority) -> Option<&SpiffeId> {
        let address = destination.socket_addr()?;
        self.workloads.get(&address.ip()).map(|w| &w.owner)
    }
}

impl Authority {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl From<SocketAddr> for Authority {
    fn from(addr: SocketAddr) -> Self {
        Authority {
            text: addr.to_string(),
            port: addr.port(),
        }
    }
}

impl Authority {
    /// A request's authority (`Host` or `:authority`) as a destination: normalised like a policy
    /// key (lower case, no trailing dot), with `default_port` when it names none. `None` when it is
    /// not a valid host.
    pub fn from_request(authority: &str, default_port: u16) -> Option<Authority> {
        let has_port = match authority.rsplit_once(':') {
            // `[v6]` alone has colons but no port; `[v6]:p` and `host:p` have one.
            Some((host, _)) => !authority.ends_with(']') && (host.starts_with('[') || !host.contains(':')),
            None => false,
        };
        if has_port {
            authority.parse().ok()
        } else {
            format!("{authority}:{default_port}").parse().ok()
        }
    }

    /// The address, when this authority is `ip:port` rather than a name.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.text.parse().ok()
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Authority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Authority::try_from(s.to_string())
    }
}

impl TryFrom<String> for Authority {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return nonzero_port(addr.port(), &s).map(|port| Authority {
                text: addr.to_string(),
                port,
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not host:port or ip:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
        let port = nonzero_port(port, &s)?;
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !valid {
            return Err(format!("`{s}`: `{host}` is not a valid host name"));
        }
        Ok(Authority {
            text: format!("{host}:{port}"),
            port,
        })
    }
}

fn nonzero_port(port: u16, s: &str) -> Result<u16, String> {
    if port == 0 {
        Err(format!("`{s}`: port 0 is not a destination"))
    } else {
        Ok(port)
    }
}

impl TryFrom<String> for RouteName {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        // It becomes a metric label value: keep it printable and short.
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
        if ok {
            Ok(RouteName(s))
        } else {
            Err(format!(
                "route name `{s}` must be 1-128 characters of letters, digits, `-`, `_`, `.`, `/`"
            ))
        }
    }
}

impl TryFrom<String> for HttpMethod {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let upper = s.to_ascii_uppercase();
        http::Method::from_bytes(upper.as_bytes()).map_err(|_| format!("`{s}` is not an HTTP method"))?;
        Ok(HttpMethod(upper))
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: default_budget_percent(),
            min_retries_per_second: default_budget_min(),
            ttl: default_budget_ttl(),
        }
    }
}

impl Default for LoadBalancer {
    fn default() -> Self {
        LoadBalancer {
            failure_accrual: FailureAccrual::default(),
            queue_timeout: default_queue_timeout(),
        }
    }
}

impl Default for FailureAccrual {
    fn default() -> Self {
        FailureAccrual {
            consecutive_failures: default_consecutive_failures(),
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl Default for RawFailureAccrual {
    fn default() -> Self {
        let d = FailureAccrual::default();
        RawFailureAccrual {
            consecutive_failures: d.consecutive_failures,
            min_backoff: d.min_backoff,
            max_backoff: d.max_backoff,
        }
    }
}

impl TryFrom<RawFailureAccrual> for FailureAccrual {
    type Error = String;

    fn try_from(raw: RawFailureAccrual) -> Result<Self, String> {
        // A cap below the first backoff would make the doubling meaningless.
        if raw.max_backoff < raw.min_backoff {
            return Err(format!(
                "loadBalancer.failureAccrual.maxBackoff ({}) is shorter than minBackoff ({})",
                humantime::format_duration(raw.max_backoff),
                humantime::format_duration(raw.min_backoff)
            ));
        }
        Ok(FailureAccrual {
            consecutive_failures: raw.consecutive_failures,
            min_backoff: raw.min_backoff,
            max_backoff: raw.max_backoff,
        })
    }
}

impl TryFrom<RawPathMatch> for PathMatch {
    type Error = String;

    fn try_from(raw: RawPathMatch) -> Result<Self, String> {
        match raw.kind {
            PathMatchType::RegularExpression => {
                check_regex(&raw.value)?;
                Ok(PathMatch::Regex(raw.value))
            }
            _ if !raw.value.starts_with('/') => Err(format!("path `{}` must start with `/`", raw.value)),
            PathMatchType::Exact => Ok(PathMatch::Exact(raw.value)),
            PathMatchType::PathPrefix => Ok(PathMatch::Prefix(raw.value)),
        }
    }
}

impl TryFrom<RawNameMatch> for HeaderMatch {
    type Error = String;

    fn try_from(raw: RawNameMatch) -> Result<Self, String> {
        let name = http::HeaderName::from_bytes(raw.name.as_bytes())
            .map_err(|_| format!("`{}` is not a valid header name", raw.name))?;
        Ok(HeaderMatch {
            name: name.as_str().to_string(),
            value: string_match(raw.kind, raw.value)?,
        })
    }
}

impl TryFrom<RawNameMatch> for QueryParamMatch {
    type Error = String;

    fn try_from(raw: RawNameMatch) -> Result<Self, String> {
        if raw.name.is_empty() {
            return Err("query parameter name is empty".to_string());
        }
        Ok(QueryParamMatch {
            name: raw.name,
            value: string_match(raw.kind, raw.value)?,
        })
    }
}

fn string_match(kind: StringMatchType, value: String) -> Result<StringMatch, String> {
    match kind {
        StringMatchType::Exact => Ok(StringMatch::Exact(value)),
        StringMatchType::RegularExpression => {
            check_regex(&value)?;
            Ok(StringMatch::Regex(value))
        }
    }
}

fn check_regex(re: &str) -> Result<(), String> {
    regex::Regex::new(re)
        .map(|_| ())
        .map_err(|e| format!("invalid regular expression `{re}`: {e}"))
}

impl TryFrom<RawTimeouts> for Timeouts {
    type Error = String;

    fn try_from(raw: RawTimeouts) -> Result<Self, String> {
        // Gateway API: a per-attempt timeout longer than the whole request's can never fire.
        if let (Some(request), Some(backend)) = (raw.request, raw.backend_request)
            && !request.is_zero()
            && backend > request
        {
            return Err(format!(
                "timeouts.backendRequest ({}) is longer than timeouts.request ({})",
                humantime::format_duration(backend),
                humantime::format_duration(request)
            ));
        }
        Ok(Timeouts {
            request: raw.request,
            backend_request: raw.backend_request,
        })
    }
}

/// gRPC status names, in code order (google.rpc.Code); OK (0) is never retried.
const GRPC_CODES: [&str; 17] = [
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

impl RetryCode {
    /// The gRPC status name of a code, for display.
    pub fn grpc_name(code: u32) -> Option<&'static str> {
        GRPC_CODES.get(code as usize).copied()
    }
}

impl RetryCode {
    fn from_number(n: u64) -> Result<Self, String> {
        match n {
            400..=599 => Ok(RetryCode::Http(n as u16)),
            _ => Err(format!("retry code {n} is not an HTTP error status (400-599)")),
        }
    }

    fn from_name(name: &str) -> Result<Self, String> {
        match GRPC_CODES.iter().position(|c| c.eq_ignore_ascii_case(name)) {
            Some(0) | None => Err(format!(
                "retry code `{name}` is neither an HTTP status nor a gRPC status name (e.g. UNAVAILABLE)"
            )),
            Some(code) => Ok(RetryCode::Grpc(code as u32)),
        }
    }
}

// Hand-written visitors (not `untagged`) so errors keep the position of the value.
impl<'de> Deserialize<'de> for RetryCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CodeVisitor;
        impl Visitor<'_> for CodeVisitor {
            type Value = RetryCode;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an HTTP status (e.g. 503) or a gRPC status name (e.g. UNAVAILABLE)")
            }

            fn visit_u64<E: de::Error>(self, n: u64) -> Result<RetryCode, E> {
                RetryCode::from_number(n).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, n: i64) -> Result<RetryCode, E> {
                let n = u64::try_from(n).map_err(|_| E::custom(format!("retry code {n} is negative")))?;
                RetryCode::from_number(n).map_err(E::custom)
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<RetryCode, E> {
                RetryCode::from_name(name).map_err(E::custom)
            }
        }
        d.deserialize_any(CodeVisitor)
    }
}

impl<'de> Deserialize<'de> for Authorization {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AuthorizationVisitor;
        impl<'de> Visitor<'de> for AuthorizationVisitor {
            type Value = Authorization;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("all-unauthenticated, all-authenticated, deny, or {allow: [...]}")
            }

            fn visit_str<E: de::Error>(self, mode: &str) -> Result<Authorization, E> {
                mode.parse().map_err(E::custom)
            }

            fn visit_map<M: de::MapAccess<'de>>(self, map: M) -> Result<Authorization, M::Error> {
                let RawAllow { allow } = RawAllow::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Authorization::allow(allow).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(AuthorizationVisitor)
    }
}

/// The named modes (`all-unauthenticated`, `all-authenticated`, `deny`); an allow-list is only
/// written in YAML (`{allow: [...]}`).
impl std::str::FromStr for Authorization {
    type Err = String;

    fn from_str(mode: &str) -> Result<Self, String> {
        match mode {
            "all-unauthenticated" => Ok(Authorization::AllUnauthenticated),
            "all-authenticated" => Ok(Authorization::AllAuthenticated),
            "deny" => Ok(Authorization::Deny),
            other => Err(format!(
                "authorization `{other}` is not one of all-unauthenticated, all-authenticated, deny, {{allow: [...]}}"
            )),
        }
    }
}

impl fmt::Display for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authorization::AllUnauthenticated => f.write_str("all-unauthenticated"),
            Authorization::AllAuthenticated => f.write_str("all-authenticated"),
            Authorization::Deny => f.write_str("deny"),
            Authorization::Allow { .. } => f.write_str("allow-list"),
        }
    }
}

impl Authorization {
    /// Whether a client with `peer` (its verified mesh identity; `None` = no mesh TLS) may connect.
    pub fn permits(&self, peer: Option<&SpiffeId>) -> bool {
        match self {
            Authorization::AllUnauthenticated => true,
            Authorization::AllAuthenticated => peer.is_some(),
            Authorization::Deny => false,
            Authorization::Allow { identities, prefixes } => peer.is_some_and(|id| {
                identities.contains(id) || prefixes.iter().any(|p| id.as_str().starts_with(p.as_str()))
            }),
        }
    }

    /// Splits `allow` entries into exact IDs and `.../*` prefixes.
    pub fn allow(entries: Vec<String>) -> Result<Self, String> {
        let mut identities = Vec::new();
        let mut prefixes = Vec::new();
        for entry in entries {
            match entry.strip_suffix("/*") {
                Some(prefix) => {
                    // A valid prefix is one that yields a valid ID when a segment is added.
                    SpiffeId::try_from(format!("{prefix}/x"))
                        .map_err(|_| format!("`{entry}` is not a SPIFFE ID prefix (spiffe://<td>/.../*)"))?;
                    prefixes.push(format!("{prefix}/"));
                }
                None => identities.push(SpiffeId::try_from(entry)?),
            }
        }
        Ok(Authorization::Allow { identities, prefixes })
    }
}

fn one() -> u32 {
    1
}

fn root_path() -> String {
    "/".to_string()
}

fn default_budget_percent() -> u32 {
    20
}

fn default_budget_min() -> u32 {
    10
}

fn default_budget_ttl() -> Duration {
    Duration::from_secs(10)
}

fn default_backoff() -> Duration {
    Duration::from_millis(25)
}

fn default_consecutive_failures() -> u32 {
    7
}

fn default_min_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

fn default_queue_timeout() -> Duration {
    Duration::from_secs(3)
}

/// Above this, an endpoint would effectively never leave rotation; likely a typo.
const MAX_CONSECUTIVE_FAILURES: u32 = 1000;
const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(3600);
const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration ({e}; e.g. `10s`, `250ms`)"))
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn budget_percent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        p @ 0..=1000 => Ok(p),
        p => Err(serde::de::Error::custom(format!(
            "retry budget percent {p} is above 1000"
        ))),
    }
}

fn budget_ttl<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let ttl = duration(d)?;
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
        return Err(serde::de::Error::custom(format!(
            "retry budget ttl {} must be between 1s and 60s",
            humantime::format_duration(ttl)
        )));
    }
    Ok(ttl)
}

fn consecutive_failures<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        n if n <= MAX_CONSECUTIVE_FAILURES => Ok(n),
        n => Err(serde::de::Error::custom(format!(
            "loadBalancer.failureAccrual.consecutiveFailures {n} is above {MAX_CONSECUTIVE_FAILURES}"
        ))),
    }
}

fn min_backoff<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let backoff = duration(d)?;
    if backoff.is_zero() {
        return Err(serde::de::Error::custom(
            "loadBalancer.failureAccrual.minBackoff must be longer than 0s",
        ));
    }
    Ok(backoff)
}

fn max_backoff<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let backoff = duration(d)?;
    if backoff > MAX_FAILURE_BACKOFF {
        return Err(serde::de::Error::custom(format!(
            "loadBalancer.failureAccrual.maxBackoff {} is longer than {}",
            humantime::format_duration(backoff),
            humantime::format_duration(MAX_FAILURE_BACKOFF)
        )));
    }
    Ok(backoff)
}

fn queue_timeout<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let timeout = duration(d)?;
    if timeout.is_zero() || timeout > MAX_QUEUE_TIMEOUT {
        return Err(serde::de::Error::custom(format!(
            "loadBalancer.queueTimeout {} must be longer than 0s and at most {}",
            humantime::format_duration(timeout),
            humantime::format_duration(MAX_QUEUE_TIMEOUT)
        )));
    }
    Ok(timeout)
}

fn backend_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    match s.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        Ok(_) => Err(serde::de::Error::custom(format!("`{s}`: port 0 is not a backend"))),
        Err(_) => Err(serde::de::Error::custom(format!(
            "backendRef `{s}` is not ip:port (backends are addresses; list a name's endpoints instead)"
        ))),
    }
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| parse_duration(&s))
        .transpose()
        .map_err(serde::de::Error::custom)
}
