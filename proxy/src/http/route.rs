//! Routing: picks the request's route from the current policy and attaches it, with the
//! destination's retry budget and the chosen backend, for the layers below to read.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::header;
use tower::{Layer, Service, retry::budget::TpsBudget};

use super::ProxyRequest;
use crate::{
    metrics::Direction,
    policy::{Route, reload::SharedPolicy},
};

/// What routing decided for one request.
#[derive(Clone)]
pub struct RouteCtx {
    pub route: Arc<Route>,
    pub budget: Arc<TpsBudget>,
    /// The address the request goes to: a `backendRef`, or the original destination.
    pub target: SocketAddr,
    pub direction: Direction,
    pub retry_buffer_bytes: usize,
    /// The request is gRPC (`content-type: application/grpc…`): errors become grpc-status.
    pub grpc: bool,
}

#[derive(Clone)]
pub struct RouteLayer {
    policy: SharedPolicy,
    direction: Direction,
    /// The connection's original destination.
    dst: SocketAddr,
}

#[derive(Clone)]
pub struct Routing<S> {
    layer: RouteLayer,
    inner: S,
}

impl RouteLayer {
    pub fn new(policy: SharedPolicy, direction: Direction, dst: SocketAddr) -> Self {
        RouteLayer { policy, direction, dst }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Routing<S>;

    fn layer(&self, inner: S) -> Routing<S> {
        Routing {
            layer: self.clone(),
            inner,
        }
    }
}

impl<S: Service<ProxyRequest>> Service<ProxyRequest> for Routing<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ProxyRequest) -> S::Future {
        let policy = self.layer.policy.load();
        // The Host lookup is only worth doing when some destination is named by host.
        let authority = if policy.routes_by_host() { authority(&req) } else { None };
        let destination = policy.destination(authority, self.layer.dst);
        let route = destination.route(&req).clone();
        let ctx = RouteCtx {
            target: route.backend(self.layer.dst),
            budget: destination.budget.clone(),
            route,
            direction: self.layer.direction,
            retry_buffer_bytes: policy.retry_buffer_bytes,
            grpc: super::errors::is_grpc(&req),
        };
        req.extensions_mut().insert(ctx);
        self.inner.call(req)
    }
}

/// `:authority` for HTTP/2 (and absolute-form HTTP/1), else the Host header.
fn authority<B>(req: &http::Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}
