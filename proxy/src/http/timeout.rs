//! Timeouts from the route: `request` bounds the whole transaction including retries (placed
//! above the retry layer), `backendRequest` bounds one attempt (placed below it). Both measure
//! until the response headers arrive; a streaming body is not cut off afterwards.

use std::task::{Context, Poll};

use tower::{Layer, Service};

use super::{ProxyRequest, ProxyResponse, ResponseFuture, errors::ProxyError, route::RouteCtx};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `timeouts.request`: the whole request, retries included.
    Request,
    /// `timeouts.backendRequest`: one attempt.
    Attempt,
}

#[derive(Clone, Copy)]
pub struct TimeoutLayer(pub Scope);

#[derive(Clone)]
pub struct Timeout<S> {
    scope: Scope,
    inner: S,
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { scope: self.0, inner }
    }
}

impl<S> Service<ProxyRequest> for Timeout<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError, Future = ResponseFuture>,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let limit = req.extensions().get::<RouteCtx>().and_then(|ctx| {
            let route = &ctx.route;
            let limit = match self.scope {
                Scope::Request => route.request_timeout,
                Scope::Attempt => route.attempt_timeout,
            }?;
            Some((limit, route.clone(), ctx.direction))
        });
        let call = self.inner.call(req);
        let Some((limit, route, direction)) = limit else {
            return call;
        };
        let scope = self.scope;
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => {
                    route.metrics[direction as usize].timeouts.inc();
                    Err(match scope {
                        Scope::Request => ProxyError::RequestTimeout,
                        Scope::Attempt => ProxyError::AttemptTimeout,
                    })
                }
            }
        })
    }
}
