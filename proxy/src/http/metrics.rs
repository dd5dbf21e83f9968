//! HTTP metrics: per route and direction, request count and duration by status code, plus
//! retries, timeouts and retry-budget exhaustion. Label values are route names from the config
//! (never raw paths), so cardinality is bounded by the config.
//!
//! Each route resolves its handles when the policy is compiled; a common status code's handles
//! are kept by the route after its first response with that status, so recording a typical
//! response touches two atomics and no label map, and unused statuses export no empty series.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll, ready},
    time::Duration,
};

use http::StatusCode;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio::time::Instant;

use crate::{metrics::Direction, policy::Route};

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResponseLabels {
    direction: &'static str,
    route: Arc<str>,
    status_code: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct GrpcLabels {
    direction: &'static str,
    route: Arc<str>,
    grpc_status: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    direction: &'static str,
    route: Arc<str>,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct HttpMetrics {
    requests: Family<ResponseLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    durations: HistogramFamily<ResponseLabels>,
    retries: Family<RouteLabels, Counter>,
    timeouts: Family<RouteLabels, Counter>,
    budget_exhausted: Family<RouteLabels, Counter>,
    pub config_reloads_ok: Counter,
    pub config_reloads_failed: Counter,
    /// The destinations' balancers (made where routes are compiled, so listed here).
    pub balance: crate::balance::metrics::BalanceMetrics,
}

/// Handles for one route in one direction.
pub struct RouteMetrics {
    direction: &'static str,
    route: Arc<str>,
    /// Handles for the common statuses, resolved on first use (so no empty series are exported).
    common: [(StatusCode, OnceLock<(Counter, Histogram)>); COMMON_STATUSES.len()],
    requests: Family<ResponseLabels, Counter>,
    durations: HistogramFamily<ResponseLabels>,
    grpc: Family<GrpcLabels, Counter>,
    pub retries: Counter,
    pub timeouts: Counter,
    pub budget_exhausted: Counter,
}

/// Statuses whose handles a route keeps once it has used them.
const COMMON_STATUSES: [StatusCode; 8] = [
    StatusCode::OK,
    StatusCode::CREATED,
    StatusCode::NO_CONTENT,
    StatusCode::NOT_FOUND,
    StatusCode::INTERNAL_SERVER_ERROR,
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl HttpMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = HttpMetrics {
            requests: Family::default(),
            grpc: Family::default(),
            durations: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            retries: Family::default(),
            timeouts: Family::default(),
            budget_exhausted: Family::default(),
            config_reloads_ok: Counter::default(),
            config_reloads_failed: Counter::default(),
            balance: crate::balance::metrics::BalanceMetrics::register(registry),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            metrics.requests.clone(),
        );
        registry.register(
            "grpc_requests",
            "gRPC responses by route and grpc-status (from trailers, or headers for trailers-only responses)",
            metrics.grpc.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from request to response headers, by route and status code",
            Unit::Seconds,
            metrics.durations.clone(),
        );
        registry.register(
            "http_retries",
            "Retried HTTP requests by route",
            metrics.retries.clone(),
        );
        registry.register(
            "http_timeouts",
            "HTTP requests or attempts that timed out, by route",
            metrics.timeouts.clone(),
        );
        registry.register(
            "http_retry_budget_exhausted",
            "Retries skipped because the destination's retry budget was spent",
            metrics.budget_exhausted.clone(),
        );
        registry.register(
            "config_reloads",
            "Route config files applied after a change",
            metrics.config_reloads_ok.clone(),
        );
        registry.register(
            "config_reload_errors",
            "Route config files rejected after a change (the previous config stayed)",
            metrics.config_reloads_failed.clone(),
        );
        metrics
    }

    /// Handles for `route`, inbound and outbound (indexed by `Direction as usize`).
    pub fn route(&self, route: &str) -> [RouteMetrics; 2] {
        let route: Arc<str> = route.into();
        [Direction::Inbound, Direction::Outbound].map(|d| self.route_in(d, route.clone()))
    }

    fn route_in(&self, direction: Direction, route: Arc<str>) -> RouteMetrics {
        let direction = direction.as_str();
        let common = COMMON_STATUSES.map(|status| (status, OnceLock::new()));
        let labels = RouteLabels {
            direction,
            route: route.clone(),
        };
        RouteMetrics {
            direction,
            common,
            requests: self.requests.clone(),
            durations: self.durations.clone(),
            grpc: self.grpc.clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            timeouts: self.timeouts.get_or_create(&labels).clone(),
            budget_exhausted: self.budget_exhausted.get_or_create(&labels).clone(),
            route,
        }
    }
}

impl RouteMetrics {
    /// Counts a gRPC response by its `grpc-status` (`None` = the stream ended without one).
    pub fn record_grpc(&self, status: Option<u8>) {
        let grpc_status = match status {
            Some(code) => pillion_api::policy::model::RetryCode::grpc_name(u32::from(code)).unwrap_or("UNKNOWN"),
            None => "NONE",
        };
        let labels = GrpcLabels {
            direction: self.direction,
            route: self.route.clone(),
            grpc_status,
        };
        self.grpc.get_or_create(&labels).inc();
    }

    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some((_, handles)) = self.common.iter().find(|(s, _)| *s == status) {
            let (counter, histogram) = handles.get_or_init(|| self.resolve(status));
            counter.inc();
            histogram.observe(secs);
            return;
        }
        let (counter, histogram) = self.resolve(status);
        counter.inc();
        histogram.observe(secs);
    }

    fn resolve(&self, status: StatusCode) -> (Counter, Histogram) {
        let labels = ResponseLabels {
            direction: self.direction,
            route: self.route.clone(),
            status_code: status.as_u16(),
        };
        let counter = self.requests.get_or_create(&labels).clone();
        let histogram = self.durations.get_or_create(&labels).clone();
        (counter, histogram)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_authority_falls_back_to_host() {
        let entry = |uri: &str, host: Option<&'static str>| AccessEntry {
            method: http::Method::GET,
            uri: uri.parse().unwrap(),
            host: host.map(http::HeaderValue::from_static),
            version: http::Version::HTTP_11,
        };
        assert_eq!(entry("/a", Some("web.shop:8080")).authority(), Some("web.shop:8080"));
        assert_eq!(entry("http://api:80/a", Some("other")).authority(), Some("api:80"));
        assert_eq!(entry("/a", None).authority(), None);
    }
    use prometheus_client::encoding::text::encode;

    #[test]
    fn records_common_and_rare_statuses_under_the_contract_names() {
        let mut registry = Registry::with_prefix("pillion");
        let metrics = HttpMetrics::register(&mut registry);
        let [inbound, outbound] = metrics.route("web-api");
        inbound.record(StatusCode::OK, Duration::from_millis(3));
        outbound.record(StatusCode::IM_A_TEAPOT, Duration::from_millis(3));
        inbound.retries.inc();
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for want in [
            r#"pillion_http_requests_total{direction="inbound",route="web-api",status_code="200"} 1"#,
            r#"pillion_http_requests_total{direction="outbound",route="web-api",status_code="418"} 1"#,
            r#"pillion_http_request_duration_seconds_count{direction="inbound",route="web-api",status_code="200"} 1"#,
            r#"pillion_http_retries_total{direction="inbound",route="web-api"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}

/// Records every response (real or synthetic) under its route and, when enabled, writes one
/// access-log event per request (target `pillion::access`; JSON lines with `PILLION_LOG_FORMAT=json`).
#[derive(Clone, Copy, Default)]
pub struct MetricsLayer {
    pub access_log: bool,
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    access_log: bool,
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;

    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            access_log: self.access_log,
        }
    }
}

/// What the access log needs from the request, captured before it moves on.
struct AccessEntry {
    method: http::Method,
    uri: http::Uri,
    /// HTTP/1's `Host` (origin-form requests carry the authority only there).
    host: Option<http::HeaderValue>,
    version: http::Version,
}

impl AccessEntry {
    /// The request's authority: the URI's (HTTP/2, absolute-form HTTP/1), else `Host`.
    fn authority(&self) -> Option<&str> {
        match self.uri.authority() {
            Some(authority) => Some(authority.as_str()),
            None => self.host.as_ref().and_then(|h| h.to_str().ok()),
        }
    }
}

impl<S> tower::Service<super::ProxyRequest> for Metered<S>
where
    S: tower::Service<super::ProxyRequest, Response = super::ProxyResponse>,
    S::Future: Unpin,
{
    type Response = super::ProxyResponse;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: super::ProxyRequest) -> Self::Future {
        let (route, grpc) = match req.extensions().get::<super::route::RouteCtx>() {
            Some(ctx) => (Some((ctx.route.clone(), ctx.direction)), ctx.grpc),
            None => (None, super::errors::is_grpc(&req)),
        };
        let entry = self.access_log.then(|| AccessEntry {
            method: req.method().clone(),
            uri: req.uri().clone(),
            host: req.headers().get(http::header::HOST).cloned(),
            version: req.version(),
        });
        MeteredFuture {
            start: Instant::now(),
            inner: self.inner.call(req),
            route,
            grpc,
            entry,
        }
    }
}

/// Waits for the answer, then records it. A plain future rather than a boxed `async` block: it
/// runs for every request.
pub struct MeteredFuture<F> {
    inner: F,
    start: Instant,
    route: Option<(Arc<Route>, Direction)>,
    grpc: bool,
    entry: Option<AccessEntry>,
}

impl<F, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<super::ProxyResponse, E>> + Unpin,
{
    type Output = Result<super::ProxyResponse, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut result = ready!(Pin::new(&mut this.inner).poll(cx));
        let elapsed = this.start.elapsed();
        if let (Some((route, direction)), Ok(rsp)) = (&this.route, &mut result) {
            route.metrics[*direction as usize].record(rsp.status(), elapsed);
            if this.grpc {
                super::body::observe_grpc_status(rsp, route.clone(), *direction);
            }
            if let Some(entry) = this.entry.take() {
                tracing::info!(
                    target: "pillion::access",
                    direction = direction.as_str(),
                    route = &*route.name,
                    method = %entry.method,
                    authority = entry.authority(),
                    path = entry.uri.path(),
                    version = ?entry.version,
                    status = rsp.status().as_u16(),
                    duration_ms = elapsed.as_secs_f64() * 1000.0,
                    proxy_error = rsp.headers().get(super::errors::PROXY_ERROR_HEADER).and_then(|v| v.to_str().ok()),
                );
            }
        }
        Poll::Ready(result)
    }
}
