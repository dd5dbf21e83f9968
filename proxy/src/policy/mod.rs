//! Route policy: the compiled form of the shared policy model (`pillion_api::policy`), looked up
//! for every HTTP request. The local route file and the control plane's updates are the same
//! model, validated by the same code, and compiled here into the same matcher.
//!
//! Lookups allocate nothing: destinations are found by host and port in hash maps, routes by a
//! scan of rules pre-sorted by Gateway API precedence (exact path, longest prefix, method, most
//! header matches, most query matches, then file order), and every route carries its metric
//! handles, resolved here once rather than per request.

pub mod reload;

/// Reading a route file is the shared model's job: the same code reads the control plane's.
pub use pillion_api::policy::{PolicyError, parse};

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderName, Method, StatusCode};
use regex::Regex;
use tower::retry::budget::TpsBudget;

use crate::{
    authz::Authorization,
    balance::{Balancer, BalancerSettings, FailureAccrual},
    http::metrics::{HttpMetrics, RouteMetrics},
    mesh::Security,
    tls::spiffe::SpiffeId,
};
use pillion_api::policy::model::{
    self, Authority, PathMatch as PathMatchSpec, ProtocolHint, RetryCode, RouteMatch as MatchSpec, StringMatch,
};

pub const DEFAULT_RETRY_BUFFER_BYTES: usize = 64 * 1024;
/// The route every request falls into when nothing in the file matches it.
pub const DEFAULT_ROUTE: &str = "default";

pub struct Policy {
    by_host: HashMap<Box<str>, Vec<(u16, Arc<Destination>)>>,
    by_addr: HashMap<SocketAddr, Arc<Destination>>,
    /// Destinations not in the file share one default route (and one retry budget).
    fallback: Arc<Destination>,
    pub retry_buffer_bytes: usize,
    inbound: HashMap<u16, Authorization>,
}

pub struct Destination {
    rules: Vec<Rule>,
    default_route: Arc<Route>,
    pub budget: Arc<TpsBudget>,
    /// Endpoints, with the identity each must present (weight 0: out of rotation). Empty: the
    /// connection's original destination (or a route's `backendRefs`) is where requests go.
    pub endpoints: Vec<Endpoint>,
    /// Balances requests over the endpoints in rotation; `None` when none is (weight 0 only, or
    /// no endpoints). Shared with the destination's previous versions, so an update keeps what
    /// was learnt about the endpoints that remain.
    pub balancer: Option<Arc<Balancer>>,
    /// How long a request waits for a usable endpoint before it is answered 503.
    pub queue_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// The identity its certificate must carry; `None` = not meshed, plaintext.
    pub identity: Option<SpiffeId>,
    pub weight: u32,
    pub protocol: ProtocolHint,
}

impl Endpoint {
    /// The security decision for a connection to this endpoint. The control plane's endpoints
    /// decide either way; a route file's can require mesh TLS but never waive it, so without an
    /// identity there: `None`, and discovery is asked by address.
    pub fn security(&self, from_control_plane: bool) -> Option<Security> {
        match (&self.identity, from_control_plane) {
            (identity, true) => Some(Security::from_identity(identity.clone())),
            (Some(id), false) => Some(Security::Mesh(id.clone())),
            (None, false) => None,
        }
    }
}

struct Rule {
    matcher: RouteMatch,
    route: Arc<Route>,
}

pub struct Route {
    pub name: Arc<str>,
    pub request_timeout: Option<Duration>,
    pub attempt_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    backends: Vec<(u32, SocketAddr)>,
    /// Indexed by [`crate::metrics::Direction`].
    pub metrics: [RouteMetrics; 2],
}

pub struct RetryPolicy {
    http: Vec<StatusCode>,
    /// Bit n set = gRPC status n is retryable.
    grpc: u32,
    pub max_retries: u8,
    pub backoff: Duration,
}

struct RouteMatch {
    path: PathMatch,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

enum PathMatch {
    Any,
    Exact(String),
    /// Stored without a trailing slash; matches whole path segments only.
    Prefix(String),
    Regex(Regex),
}

enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl Policy {
    /// Compiles a validated policy (the model refused duplicates and bad values already).
    /// Errors name the destination.
    pub fn compile(policy: model::Policy, metrics: &HttpMetrics) -> Result<Self, String> {
        Self::compile_after(policy, metrics, None)
    }

    /// [`compile`](Self::compile) for a reload: destinations the `previous` policy had keep
    /// their balancers (what was learnt about their endpoints).
    pub fn compile_after(
        policy: model::Policy,
        metrics: &HttpMetrics,
        previous: Option<&Policy>,
    ) -> Result<Self, String> {
        let mut by_host: HashMap<Box<str>, Vec<(u16, Arc<Destination>)>> = HashMap::new();
        let mut by_addr = HashMap::new();
        for (key, spec) in policy.destinations {
            let before = previous.and_then(|p| match key.as_str().parse::<SocketAddr>() {
                Ok(addr) => p.by_addr.get(&addr),
                Err(_) => p.by_authority(key.as_str()),
            });
            let dst = Arc::new(
                Destination::compile(spec, metrics, before.map(|d| &**d))
                    .map_err(|e| format!("destination {key}: {e}"))?,
            );
            match key.as_str().parse::<SocketAddr>() {
                Ok(addr) => {
                    by_addr.insert(addr, dst);
                }
                Err(_) => {
                    let host = host_of(&key);
                    by_host.entry(host.into()).or_default().push((key.port(), dst));
                }
            }
        }
        Ok(Policy {
            by_host,
            by_addr,
            fallback: Arc::new(Destination::fallback(metrics)),
            retry_buffer_bytes: policy
                .retry_buffer_bytes
                .map_or(DEFAULT_RETRY_BUFFER_BYTES, |n| n as usize),
            inbound: policy.inbound,
        })
    }

    /// The policy with no file: one default route for everything.
    pub fn empty(metrics: &HttpMetrics) -> Self {
        Policy {
            by_host: HashMap::new(),
            by_addr: HashMap::new(),
            fallback: Arc::new(Destination::fallback(metrics)),
            retry_buffer_bytes: DEFAULT_RETRY_BUFFER_BYTES,
            inbound: HashMap::new(),
        }
    }

    /// The route file's authorization for an inbound port, if it names the port.
    pub fn inbound_authorization(&self, port: u16) -> Option<&Authorization> {
        self.inbound.get(&port)
    }

    /// The destination a request is for: by its authority (Host / `:authority`) if the file names
    /// it, else by the connection's original destination address.
    pub fn destination(&self, authority: Option<&str>, dst: SocketAddr) -> &Arc<Destination> {
        match authority.and_then(|a| self.destination_by_authority(a)) {
            Some(found) => found,
            None => self.destination_by_addr(dst),
        }
    }

    /// The file's destination for a request's authority, if the file names it.
    pub fn destination_by_authority(&self, authority: &str) -> Option<&Arc<Destination>> {
        self.by_authority(authority)
    }

    /// The file's destination for an original destination address, else the default one.
    pub fn destination_by_addr(&self, dst: SocketAddr) -> &Arc<Destination> {
        self.by_addr.get(&dst).unwrap_or(&self.fallback)
    }

    /// Whether any destination is named by host (else only the original destination counts).
    pub fn routes_by_host(&self) -> bool {
        !self.by_host.is_empty()
    }

    /// An authority without a port means port 80: the mesh carries plaintext HTTP.
    fn by_authority(&self, authority: &str) -> Option<&Arc<Destination>> {
        const DEFAULT_PORT: u16 = 80;
        if self.by_host.is_empty() {
            return None;
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An unparsable port names no destination (as `Authority::from_request` says too).
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
            _ => (authority, DEFAULT_PORT),
        };
        // Normalised as destination keys are: a fully qualified name's trailing dot is dropped.
        let host = host.strip_suffix('.').unwrap_or(host);
        let ports = match self.by_host.get(host) {
            Some(ports) => ports,
            // Hosts are case-insensitive; lowercase only in the rare case that it matters.
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => self.by_host.get(&*host.to_ascii_lowercase())?,
            None => return None,
        };
        ports.iter().find(|(p, _)| *p == port).map(|(_, d)| d)
    }
}

impl Destination {
    /// Compiles one destination of the model: the local file's, or one the control plane sent.
    /// `previous`: the same destination's last compiled version, whose balancer (latency
    /// estimates, failure accrual) carries over to the endpoints that remain.
    pub fn compile(
        spec: model::Destination,
        metrics: &HttpMetrics,
        previous: Option<&Destination>,
    ) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (r, route_spec) in spec.routes.into_iter().enumerate() {
            // A route without `matches` matches every request (Gateway API: implicit `PathPrefix /`).
            let match_specs = match &route_spec.matches {
                none if none.is_empty() => vec![MatchSpec::default()],
                some => some.clone(),
            };
            let route = Arc::new(Route::compile(route_spec, metrics).map_err(|e| format!("routes[{r}].{e}"))?);
            for (m, spec) in match_specs.into_iter().enumerate() {
                let matcher = RouteMatch::compile(spec).map_err(|e| format!("routes[{r}].matches[{m}].{e}"))?;
                rules.push((
                    matcher.precedence(),
                    rules.len(),
                    Rule {
                        matcher,
                        route: route.clone(),
                    },
                ));
            }
        }
        rules.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        // Weight 0 takes an endpoint out of rotation, not out of the mesh: it stays listed so a
        // connection dialled to it still gets its identity.
        let endpoints = spec
            .endpoints
            .iter()
            .map(|e| Endpoint {
                address: e.address,
                identity: e.identity.clone(),
                weight: e.weight,
                protocol: e.protocol,
            })
            .collect::<Vec<_>>();
        let lb = &spec.load_balancer;
        let settings = BalancerSettings {
            failure_accrual: FailureAccrual {
                consecutive_failures: lb.failure_accrual.consecutive_failures,
                min_backoff: lb.failure_accrual.min_backoff,
                max_backoff: lb.failure_accrual.max_backoff,
            },
            ..BalancerSettings::default()
        };
        let balancer = endpoints.iter().any(|e| e.weight > 0).then(|| {
            let balancer = previous
                .and_then(|p| p.balancer.as_ref())
                .filter(|b| *b.settings() == settings)
                .cloned()
                .unwrap_or_else(|| {
                    let balancer = Arc::new(Balancer::new(settings));
                    metrics.balance.balancers.add(spec.destination.as_str(), &balancer);
                    balancer
                });
            balancer.update(&endpoints);
            balancer
        });
        Ok(Destination {
            rules: rules.into_iter().map(|(_, _, rule)| rule).collect(),
            default_route: Arc::new(Route::default_route(metrics)),
            budget: Arc::new(budget(&spec.retry_budget)),
            endpoints,
            balancer,
            queue_timeout: lb.queue_timeout,
        })
    }

    /// The endpoint at `address`, if it is one of this destination's.
    pub fn endpoint(&self, address: SocketAddr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.address == address)
    }

    /// Whether the destination is to be forwarded without protocol detection: every endpoint
    /// says its port is opaque (a server-speaks-first protocol, by `pillion.io/opaque-ports` or
    /// `appProtocol` in Kubernetes, or `protocol: opaque` in a policy file).
    pub fn opaque(&self) -> bool {
        !self.endpoints.is_empty() && self.endpoints.iter().all(|e| e.protocol == ProtocolHint::Opaque)
    }

    /// The identity expected at `address`.
    pub fn identity(&self, address: SocketAddr) -> Option<&SpiffeId> {
        self.endpoint(address)?.identity.as_ref()
    }

    fn fallback(metrics: &HttpMetrics) -> Self {
        Destination {
            rules: Vec::new(),
            default_route: Arc::new(Route::default_route(metrics)),
            budget: Arc::new(budget(&model::RetryBudget::default())),
            endpoints: Vec::new(),
            balancer: None,
            queue_timeout: model::LoadBalancer::default().queue_timeout,
        }
    }

    /// The first rule (in precedence order) that matches, or the default route.
    pub fn route<B>(&self, req: &http::Request<B>) -> &Arc<Route> {
        self.rules
            .iter()
            .find(|rule| rule.matcher.matches(req))
            .map_or(&self.default_route, |rule| &rule.route)
    }
}

impl Route {
    fn compile(spec: model::Route, metrics: &HttpMetrics) -> Result<Self, String> {
        // Zero disables a timeout (Gateway API); the model refused an attempt longer than the whole.
        let enabled = |d: Option<Duration>| d.filter(|d| !d.is_zero());
        let timeouts = spec.timeouts.unwrap_or_default();
        let retry = spec.retry.map(|r| {
            let codes = if r.codes.is_empty() {
                vec![
                    RetryCode::Http(502),
                    RetryCode::Http(503),
                    RetryCode::Http(504),
                    RetryCode::Grpc(14),
                ]
            } else {
                r.codes
            };
            RetryPolicy {
                http: codes
                    .iter()
                    .filter_map(|c| match c {
                        RetryCode::Http(s) => StatusCode::from_u16(*s).ok(),
                        RetryCode::Grpc(_) => None,
                    })
                    .collect(),
                grpc: codes.iter().fold(0, |bits, c| match c {
                    RetryCode::Grpc(n) if *n < 32 => bits | (1 << n),
                    _ => bits,
                }),
                // The retry budget bounds retries across requests; this bounds one request's.
                max_retries: u8::try_from(r.attempts).unwrap_or(u8::MAX),
                backoff: r.backoff,
            }
        });
        let mut total = 0u32;
        let mut backends = Vec::new();
        for (i, b) in spec.backend_refs.iter().enumerate() {
            if b.weight == 0 {
                continue;
            }
            total = total
                .checked_add(b.weight)
                .ok_or_else(|| format!("backendRefs[{i}]: weights add up to more than {}", u32::MAX))?;
            let address = b.address;
            backends.push((total, address));
        }
        if !spec.backend_refs.is_empty() && backends.is_empty() {
            return Err("backendRefs: every weight is 0, so no request could be sent".to_string());
        }
        let name: Arc<str> = spec.name.0.into();
        Ok(Route {
            metrics: metrics.route(&name),
            name,
            request_timeout: enabled(timeouts.request),
            attempt_timeout: enabled(timeouts.backend_request),
            retry,
            backends,
        })
    }

    fn default_route(metrics: &HttpMetrics) -> Self {
        Route {
            name: DEFAULT_ROUTE.into(),
            request_timeout: None,
            attempt_timeout: None,
            retry: None,
            backends: Vec::new(),
            metrics: metrics.route(DEFAULT_ROUTE),
        }
    }

    /// A weighted pick among the route's `backendRefs`; `None` when it has none.
    pub fn backend(&self) -> Option<SocketAddr> {
        match self.backends.as_slice() {
            [] => None,
            [(_, only)] => Some(*only),
            all => {
                let total = all.last().map_or(1, |(t, _)| *t);
                let pick = fastrand::u32(0..total);
                all.iter().find(|(upto, _)| pick < *upto).map(|(_, a)| *a)
            }
        }
    }
}

impl RetryPolicy {
    pub fn retries_status(&self, status: StatusCode) -> bool {
        self.http.contains(&status)
    }

    pub fn retries_grpc(&self, code: u8) -> bool {
        code < 32 && self.grpc & (1 << code) != 0
    }
}

impl RouteMatch {
    fn compile(spec: MatchSpec) -> Result<Self, String> {
        let path = match spec.path {
            None => PathMatch::Any,
            Some(PathMatchSpec::Exact(p)) => PathMatch::Exact(p),
            Some(PathMatchSpec::Prefix(p)) => match p.trim_end_matches('/') {
                "" => PathMatch::Any,
                prefix => PathMatch::Prefix(prefix.to_string()),
            },
            Some(PathMatchSpec::Regex(re)) => PathMatch::Regex(anchored(&re).map_err(|e| format!("path: {e}"))?),
        };
        let value = |v: StringMatch, what: &str, name: &str| -> Result<ValueMatch, String> {
            Ok(match v {
                StringMatch::Exact(v) => ValueMatch::Exact(v),
                StringMatch::Regex(re) => {
                    ValueMatch::Regex(anchored(&re).map_err(|e| format!("{what} {name:?}: {e}"))?)
                }
            })
        };
        let mut headers = Vec::new();
        for h in spec.headers {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("headers: invalid header name {:?}", h.name))?;
            headers.push((name, value(h.value, "headers", &h.name)?));
        }
        let mut query = Vec::new();
        for q in spec.query_params {
            query.push((q.name.clone(), value(q.value, "queryParams", &q.name)?));
        }
        let method = spec
            .method
            .map(|m| Method::from_bytes(m.0.as_bytes()).map_err(|_| format!("method: {:?} is not a method", m.0)))
            .transpose()?;
        Ok(RouteMatch {
            path,
            method,
            headers,
            query,
        })
    }

    /// Sort key: smaller sorts first (wins).
    fn precedence(
        &self,
    ) -> (
        u8,
        std::cmp::Reverse<usize>,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ) {
        let (rank, len) = match &self.path {
            PathMatch::Exact(p) => (0, p.len()),
            PathMatch::Prefix(p) => (1, p.len()),
            PathMatch::Any => (1, 0),
            PathMatch::Regex(_) => (2, 0),
        };
        (
            rank,
            std::cmp::Reverse(len),
            self.method.is_none(),
            std::cmp::Reverse(self.headers.len()),
            std::cmp::Reverse(self.query.len()),
        )
    }

    fn matches<B>(&self, req: &http::Request<B>) -> bool {
        let path = req.uri().path();
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            PathMatch::Regex(re) => re.is_match(path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method())
            && self.headers.iter().all(|(name, want)| {
                req.headers()
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
            })
            && (self.query.is_empty() || self.query_matches(req.uri().query().unwrap_or("")))
    }

    fn query_matches(&self, query: &str) -> bool {
        self.query.iter().all(|(name, want)| {
            query.split('&').any(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                k == name && want.matches(v)
            })
        })
    }
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(want) => value == want,
            ValueMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// A retry budget as the model states it (defaults filled in by the model).
fn budget(b: &model::RetryBudget) -> TpsBudget {
    TpsBudget::new(
        b.ttl,
        b.min_retries_per_second.min(i32::MAX as u32 - 1),
        b.percent as f32 / 100.0,
    )
}

/// The host part of a validated `host:port` authority.
fn host_of(key: &Authority) -> &str {
    key.as_str().rsplit_once(':').map_or(key.as_str(), |(host, _)| host)
}

/// Gateway API regular expressions match the whole value.
fn anchored(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regular expression: {e}"))
}

#[cfg(test)]
mod tests;
