//! Retries, per route, limited by the destination's retry budget.
//!
//! A response (or a proxy error, judged by the status it becomes) is retried when the route
//! lists its HTTP status or, for gRPC, the `grpc-status` of a trailers-only response (a status
//! sent in trailers after a streamed body cannot be taken back). A retry happens only if
//! attempts remain, the request body could be replayed (it was sent whole and fit the buffer
//! limit), and the budget allows it; otherwise the client gets the last real answer.
//! Backoff is exponential with full jitter between retries.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, StatusCode};
use tower::{Layer, Service, retry::budget::Budget};

use super::{ProxyRequest, ProxyResponse, ResponseFuture, body::RequestBody, errors::ProxyError, route::RouteCtx};

#[derive(Clone, Copy, Default)]
pub struct RetryLayer;

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner }
    }
}

impl<S> Service<ProxyRequest> for Retry<S>
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
        let ctx = match req.extensions().get::<RouteCtx>() {
            Some(ctx) if ctx.route.retry.is_some() => ctx.clone(),
            _ => return self.inner.call(req),
        };
        // Take the ready service; a clone stands in for the next call (tower's usual pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(retry_loop(inner, ctx, req))
    }
}

async fn retry_loop<S>(mut inner: S, ctx: RouteCtx, req: ProxyRequest) -> Result<ProxyResponse, ProxyError>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError>,
{
    let Some(policy) = ctx.route.retry.as_ref() else {
        return inner.call(req).await;
    };
    let metrics = &ctx.route.metrics[ctx.direction as usize];
    ctx.budget.deposit();

    let (parts, body) = req.into_parts();
    let (body, replay) = body.tee(ctx.retry_buffer_bytes);
    let template = Request::from_parts(parts, ());
    let mut attempt_req = copy_request(&template, body);
    let mut retries = 0u8;
    loop {
        let result = inner.call(attempt_req).await;
        if retries >= policy.max_retries || !retryable(policy, &result) {
            return result;
        }
        let Some(body) = replay.body() else {
            return result;
        };
        if !ctx.budget.withdraw() {
            metrics.budget_exhausted.inc();
            return result;
        }
        retries += 1;
        metrics.retries.inc();
        // Drop the failed response before waiting so its connection is released.
        drop(result);
        tokio::time::sleep(backoff(policy.backoff, retries)).await;
        std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
        attempt_req = copy_request(&template, body);
    }
}

fn retryable(policy: &crate::policy::RetryPolicy, result: &Result<ProxyResponse, ProxyError>) -> bool {
    match result {
        Ok(rsp) => {
            policy.retries_status(rsp.status())
                || (rsp.status() == StatusCode::OK
                    && rsp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse::<u8>().ok())
                        .is_some_and(|code| policy.retries_grpc(code)))
        }
        // A request timeout ends the whole transaction; an attempt timeout or a connection
        // failure is judged by the status it would become.
        Err(ProxyError::RequestTimeout) => false,
        Err(e) => policy.retries_status(e.status()),
    }
}

fn copy_request(template: &Request<()>, body: RequestBody) -> ProxyRequest {
    let mut req = Request::new(body);
    *req.method_mut() = template.method().clone();
    *req.uri_mut() = template.uri().clone();
    *req.version_mut() = template.version();
    *req.headers_mut() = template.headers().clone();
    if let Some(ctx) = template.extensions().get::<RouteCtx>() {
        req.extensions_mut().insert(ctx.clone());
    }
    req
}

/// Exponential backoff with full jitter: uniformly random in [0, base·2^(n-1)], capped at 10×base.
fn backoff(base: Duration, retry: u8) -> Duration {
    let factor = 1u32 << retry.saturating_sub(1).min(10);
    let ceiling = base.saturating_mul(factor).min(base.saturating_mul(10));
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        let base = Duration::from_millis(100);
        for retry in 1..=20 {
            let d = backoff(base, retry);
            let ceiling = base * (1u32 << (retry - 1).min(10)).min(10);
            assert!(d <= ceiling, "retry {retry}: {d:?} > {ceiling:?}");
        }
    }
}
