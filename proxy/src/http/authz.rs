//! Authorization for HTTP: decided per request from the client's identity and the port's live
//! policy, so a revocation applies to the next request on an open connection, and a denied
//! client gets a clear 403 rather than a reset.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use super::{
    ProxyRequest, ProxyResponse, ResponseFuture,
    errors::{is_grpc, synthetic_response},
};

/// What an inbound connection is checked against; `None` (outbound) allows everything.
pub struct ConnectionAuthz {
    pub authorizer: Arc<crate::authz::Authorizer>,
    pub app: SocketAddr,
    pub client: Option<crate::tls::spiffe::SpiffeId>,
    pub denied: Counter,
}

#[derive(Clone)]
pub struct AuthzLayer {
    pub check: Option<Arc<ConnectionAuthz>>,
}

#[derive(Clone)]
pub struct Authz<S> {
    check: Option<Arc<ConnectionAuthz>>,
    inner: S,
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Authz<S> {
        Authz {
            check: self.check.clone(),
            inner,
        }
    }
}

impl<S> Service<ProxyRequest> for Authz<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Future = ResponseFuture<<S as Service<ProxyRequest>>::Error>>,
    S::Error: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let allowed = self
            .check
            .as_ref()
            .is_none_or(|c| c.authorizer.decide(c.app, c.client.as_ref()));
        if allowed {
            return self.inner.call(req);
        }
        if let Some(check) = &self.check {
            check.denied.inc();
            tracing::debug!(port = check.app.port(), client = ?check.client, "request denied by authorization policy");
        }
        let denied = synthetic_response(StatusCode::FORBIDDEN, "denied by authorization policy", is_grpc(&req));
        Box::pin(std::future::ready(Ok(denied)))
    }
}
