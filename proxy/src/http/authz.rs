//! Authorization for HTTP: decided per connection (by the client's identity and the port's
//! policy) and enforced per request, so a denied client gets a clear 403 rather than a reset.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::StatusCode;
use tower::{Layer, Service};

use super::{
    ProxyRequest, ProxyResponse,
    errors::{is_grpc, synthetic_response},
};

#[derive(Clone, Copy)]
pub struct AuthzLayer {
    pub allowed: bool,
}

#[derive(Clone)]
pub struct Authz<S> {
    allowed: bool,
    inner: S,
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            allowed: self.allowed,
            inner,
        }
    }
}

impl<S> Service<ProxyRequest> for Authz<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse>,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        if self.allowed {
            return Box::pin(self.inner.call(req));
        }
        let denied = synthetic_response(StatusCode::FORBIDDEN, "denied by authorization policy", is_grpc(&req));
        Box::pin(std::future::ready(Ok(denied)))
    }
}
