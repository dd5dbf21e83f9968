//! Authorization for HTTP: decided per request from the client's identity and the port's live
//! policy, so a revocation applies to the next request on an open connection, and a denied
//! client gets a clear 403 rather than a reset.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};

use crate::{
    authz::{Authorizer, PortPolicy},
    tls::spiffe::SpiffeId,
};

use super::{
    ProxyRequest, ProxyResponse,
    errors::{is_grpc, synthetic_response},
};

/// What an inbound connection is checked against; `None` (outbound) allows everything.
pub struct ConnectionAuthz {
    authorizer: Arc<Authorizer>,
    /// The port's policy, held for the connection: a request's check takes no shared lock.
    port: PortPolicy,
    client: Option<SpiffeId>,
    denied: Counter,
}

impl ConnectionAuthz {
    pub fn new(authorizer: Arc<Authorizer>, app: SocketAddr, client: Option<SpiffeId>, denied: Counter) -> Self {
        ConnectionAuthz {
            port: authorizer.port(app),
            authorizer,
            client,
            denied,
        }
    }
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
    S: Service<ProxyRequest, Response = ProxyResponse>,
    S::Future: Unpin,
{
    type Response = ProxyResponse;
    type Error = S::Error;
    type Future = AuthzFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let allowed = self
            .check
            .as_ref()
            .is_none_or(|c| c.authorizer.decide(&c.port, c.client.as_ref()));
        if allowed {
            return AuthzFuture::Allowed(self.inner.call(req));
        }
        if let Some(check) = &self.check {
            check.denied.inc();
            tracing::debug!(port = check.port.app().port(), client = ?check.client, "request denied by authorization policy");
        }
        let denied = synthetic_response(StatusCode::FORBIDDEN, "denied by authorization policy", is_grpc(&req));
        AuthzFuture::Denied(Some(denied))
    }
}

/// The inner answer when allowed, else the 403 (taken once).
pub enum AuthzFuture<F> {
    Allowed(F),
    Denied(Option<ProxyResponse>),
}

impl<F, E> Future for AuthzFuture<F>
where
    F: Future<Output = Result<ProxyResponse, E>> + Unpin,
{
    type Output = Result<ProxyResponse, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            AuthzFuture::Allowed(inner) => Pin::new(inner).poll(cx),
            AuthzFuture::Denied(denied) => match denied.take() {
                Some(rsp) => Poll::Ready(Ok(rsp)),
                None => Poll::Pending,
            },
        }
    }
}
