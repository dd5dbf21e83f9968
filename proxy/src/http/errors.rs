//! Proxy errors and the synthetic responses they become.
//!
//! When no upstream answer exists, the client gets a response that says so plainly: the right
//! status (502 unreachable/reset, 503 no endpoint, 504 timeout, 403 denied, 400 bad request), the
//! header `pillion-proxy-error: <reason>`, and for gRPC callers a trailers-only gRPC response
//! (HTTP 200 with `grpc-status`) since gRPC clients ignore HTTP statuses.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{HeaderValue, Response, StatusCode, header};
use tower::{Layer, Service};

use super::{ProxyRequest, ProxyResponse, body::ResponseBody, route::RouteCtx};
use crate::policy::Route;

pub const PROXY_ERROR_HEADER: &str = "pillion-proxy-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream unreachable: {0}")]
    Connect(std::io::Error),
    #[error("upstream connection failed: {0}")]
    Upstream(hyper::Error),
    #[error("invalid request body: {0}")]
    RequestBody(hyper::Error),
    #[error("request timeout")]
    RequestTimeout,
    #[error("backend request timeout")]
    AttemptTimeout,
    /// Every endpoint of a balanced destination stayed out of rotation for the queue time.
    #[error("no healthy endpoint")]
    NoHealthyEndpoint,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::RequestBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::RequestTimeout | ProxyError::AttemptTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoHealthyEndpoint => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `pillion-proxy-error` value: short, stable, greppable.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Connect(_) => "upstream unreachable",
            ProxyError::Upstream(_) => "upstream reset",
            ProxyError::RequestBody(_) => "invalid request body",
            ProxyError::RequestTimeout => "request timeout",
            ProxyError::AttemptTimeout => "backend request timeout",
            ProxyError::NoHealthyEndpoint => "no healthy endpoint",
        }
    }

    /// Classifies a hyper client error: a failure reading the *client's* body is the client's
    /// fault (400), anything else is the upstream's (502).
    pub fn from_send(error: hyper::Error) -> Self {
        let body_read = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<hyper::Error>())
            .is_some_and(|inner| inner.is_parse() || inner.is_incomplete_message() || inner.is_body_write_aborted());
        if error.is_user() || body_read {
            ProxyError::RequestBody(error)
        } else {
            ProxyError::Upstream(error)
        }
    }
}

/// Builds the synthetic response for a proxy failure.
pub fn synthetic_response(status: StatusCode, reason: &'static str, grpc: bool) -> ProxyResponse {
    let mut rsp = if grpc {
        let mut rsp = Response::new(ResponseBody::empty());
        let headers = rsp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static(grpc_status_for(status)));
        headers.insert("grpc-message", HeaderValue::from_static(reason));
        rsp
    } else {
        let mut rsp = Response::new(ResponseBody::full(format!("{reason}\n")));
        *rsp.status_mut() = status;
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        rsp
    };
    rsp.headers_mut()
        .insert(PROXY_ERROR_HEADER, HeaderValue::from_static(reason));
    rsp
}

fn grpc_status_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::GATEWAY_TIMEOUT => "4", // DEADLINE_EXCEEDED
        StatusCode::FORBIDDEN => "7",       // PERMISSION_DENIED
        StatusCode::BAD_REQUEST => "13",    // INTERNAL
        _ => "14",                          // UNAVAILABLE
    }
}

pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// Turns errors from the layers below into synthetic responses.
#[derive(Clone, Copy, Default)]
pub struct ErrorLayer;

#[derive(Clone)]
pub struct Errors<S> {
    inner: S,
}

impl<S> Layer<S> for ErrorLayer {
    type Service = Errors<S>;

    fn layer(&self, inner: S) -> Errors<S> {
        Errors { inner }
    }
}

impl<S> Service<ProxyRequest> for Errors<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = ProxyError>,
    S::Future: Unpin,
{
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = ErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let (route, grpc) = match req.extensions().get::<RouteCtx>() {
            Some(ctx) => (Some(ctx.route.clone()), ctx.grpc),
            None => (None, is_grpc(&req)),
        };
        ErrorsFuture {
            inner: self.inner.call(req),
            grpc,
            route,
        }
    }
}

/// The inner answer, or the synthetic response for its error. A plain future rather than a
/// boxed `async` block: it runs for every request.
pub struct ErrorsFuture<F> {
    inner: F,
    grpc: bool,
    route: Option<Arc<Route>>,
}

impl<F> Future for ErrorsFuture<F>
where
    F: Future<Output = Result<ProxyResponse, ProxyError>> + Unpin,
{
    type Output = Result<ProxyResponse, ProxyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll(cx)) {
            Ok(rsp) => Poll::Ready(Ok(rsp)),
            Err(error) => {
                let route = this.route.as_ref().map_or("", |r| &r.name);
                tracing::info!(route, %error, "request failed");
                Poll::Ready(Ok(synthetic_response(error.status(), error.reason(), this.grpc)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_callers_get_a_grpc_status() {
        let rsp = synthetic_response(StatusCode::GATEWAY_TIMEOUT, "request timeout", true);
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["grpc-status"], "4");
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "request timeout");

        let rsp = synthetic_response(StatusCode::BAD_GATEWAY, "upstream unreachable", false);
        assert_eq!(rsp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rsp.headers()[PROXY_ERROR_HEADER], "upstream unreachable");
    }
}
