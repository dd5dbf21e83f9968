//! Per-attempt endpoint choice for balanced destinations (routing attached a [`Balanced`]).
//!
//! Below the retry layer, so every attempt is balanced afresh (a retry usually lands on another
//! endpoint), and above the attempt timeout, so an attempt that times out counts against its
//! endpoint. For each attempt: pick an endpoint ([`crate::balance`]), send the attempt there under
//! that endpoint's own security decision (mesh TLS to its identity), and report the outcome when
//! the response headers arrive. A connection error, a timeout or a 5xx response is a failure
//! for failure accrual; a request the client cancels reports nothing.
//!
//! When no endpoint is usable (all in failure backoff, or probing), the attempt waits for the
//! earliest backoff to end, at most the destination's queue time, then fails fast with 503
//! `no healthy endpoint` instead of hanging.

use std::task::{Context, Poll};

use tokio::time::Instant;

use tower::{Layer, Service};

use super::{
    ProxyRequest, ProxyResponse, ResponseFuture,
    errors::ProxyError,
    route::{Balanced, RouteCtx},
};
use crate::balance::Picked;

#[derive(Clone, Copy, Default)]
pub struct BalanceLayer;

#[derive(Clone)]
pub struct Balance<S> {
    inner: S,
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Balance<S> {
        Balance { inner }
    }
}

impl<S> Service<ProxyRequest> for Balance<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = ResponseFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> ResponseFuture {
        let Some(balanced) = req.extensions().get::<RouteCtx>().and_then(|ctx| ctx.balance.clone()) else {
            return self.inner.call(req);
        };
        // Nearly always: an endpoint is usable now, and the attempt goes out without waiting.
        match balanced.balancer.pick() {
            Ok(picked) => {
                let call = send_to(&mut self.inner, req, &balanced, &picked);
                Box::pin(complete(call, picked))
            }
            Err(_) => {
                // Take the ready service; a clone stands in for the next call.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(queue(inner, req, balanced))
            }
        }
    }
}

/// Points the attempt at the picked endpoint and sends it.
fn send_to<S>(inner: &mut S, mut req: ProxyRequest, balanced: &Balanced, picked: &Picked) -> ResponseFuture
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = ResponseFuture>,
{
    if let Some(ctx) = req.extensions_mut().get_mut::<RouteCtx>() {
        ctx.target = picked.address();
        ctx.security = balanced.security(picked.endpoint());
    }
    inner.call(req)
}

/// Waits for the attempt's response headers, then reports the outcome to the balancer.
async fn complete(call: ResponseFuture, picked: Picked) -> Result<ProxyResponse, ProxyError> {
    let started = Instant::now();
    let result = call.await;
    let failed = match &result {
        Ok(rsp) => rsp.status().is_server_error(),
        // The client's own body failing is not the endpoint's fault.
        Err(ProxyError::RequestBody(_)) => false,
        Err(_) => true,
    };
    picked.complete(started.elapsed(), failed);
    result
}

/// No endpoint was usable at once: wait for one until the queue time is over.
async fn queue<S>(mut inner: S, req: ProxyRequest, balanced: Balanced) -> Result<ProxyResponse, ProxyError>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = ResponseFuture>,
{
    match balanced.balancer.pick_within(balanced.queue_timeout).await {
        Ok(picked) => {
            let call = send_to(&mut inner, req, &balanced, &picked);
            complete(call, picked).await
        }
        Err(_) => Err(ProxyError::NoHealthyEndpoint),
    }
}
