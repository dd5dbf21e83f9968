//! Routing: picks the request's destination, route, backend and security decision, and attaches
//! them for the layers below to read.
//!
//! Which destination's routes govern a request (the name the app used beats the address it
//! dialled; for each, the control plane beats the local file):
//!
//! ```text
//! 1. the control plane's answer for the request's authority (Host / :authority, normalised)
//! 2. the route file's destination for that authority
//! 3. the control plane's answer for the connection's original destination ip:port
//! 4. the route file's destination for that ip:port
//! 5. the default route
//! ```
//!
//! Where the request goes: a `backendRef` of the route, else, for a destination with endpoints,
//! the original destination when it is one of them (the app's choice stands) or else the one the
//! destination's balancer picks for each attempt ([`super::balance`]); else the original
//! destination. The security decision
//! (mesh TLS to which identity) comes from the same answer, so a request sent by name to a
//! meshed destination is mTLS, and an answer's change applies to the very next request.
//!
//! A connection holds its discovery handles ([`ConnDiscovery`]); a request reads them without a
//! shared lock and waits only when a destination is asked for the first time.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::header;
use pillion_api::policy::model::Authority;
use tower::{Layer, Service, retry::budget::TpsBudget};

use super::ProxyRequest;
use crate::{
    balance::Balancer,
    discovery::{Answer, Discovery, Handle, Held, Target, lock},
    mesh::Security,
    metrics::Direction,
    policy::{Destination, Endpoint, Route, reload::SharedPolicy},
};

/// An authority without a port means port 80: the mesh carries plaintext HTTP.
const DEFAULT_PORT: u16 = 80;

/// What routing decided for one request.
#[derive(Clone)]
pub struct RouteCtx {
    pub route: Arc<Route>,
    pub budget: Arc<TpsBudget>,
    /// The address the request goes to: a `backendRef`, an endpoint, or the original destination.
    pub target: SocketAddr,
    /// Mesh TLS or plaintext to `target`, when discovery's answer decided it; `None`: the
    /// upstream asks discovery by address (a `backendRef` discovery said nothing about here).
    pub security: Option<Security>,
    pub direction: Direction,
    pub retry_buffer_bytes: usize,
    /// The request is gRPC (`content-type: application/grpc…`): errors become grpc-status.
    pub grpc: bool,
    /// Each attempt's endpoint is picked by this balancer (which then sets `target` and
    /// `security`); `None`: `target` is final.
    pub balance: Option<Balanced>,
}

/// A destination whose endpoints are balanced per attempt.
#[derive(Clone)]
pub struct Balanced {
    pub balancer: Arc<Balancer>,
    /// How long an attempt may wait for a usable endpoint before 503.
    pub queue_timeout: Duration,
    /// Whether the endpoints are the control plane's (their identities decide mesh TLS either
    /// way) or the route file's (which can require mesh TLS but never waive it).
    pub from_control_plane: bool,
}

impl Balanced {
    /// The security decision for a picked endpoint; `None`: the upstream asks discovery.
    pub fn security(&self, endpoint: &Endpoint) -> Option<Security> {
        endpoint.security(self.from_control_plane)
    }
}

/// One connection's handles into discovery: its original destination's, and the last
/// authority its requests named (a connection nearly always names one).
pub struct ConnDiscovery {
    discovery: Arc<Discovery>,
    dst_addr: SocketAddr,
    /// Followed from the first request, so its first-answer wait starts with the first request.
    dst: Mutex<Option<Held>>,
    named: Mutex<Option<Named>>,
}

/// The last authority a connection's requests named, as written, and its destination (`None`:
/// it names none, e.g. an IP literal or an invalid host).
struct Named {
    raw: Box<str>,
    held: Option<Held>,
}

/// The destination a request's authority names: normalised, with the default port; an IP literal
/// names no more than the address the app dialled.
fn named_destination(raw: &str) -> Option<Authority> {
    Authority::from_request(raw, DEFAULT_PORT).filter(|a| a.socket_addr().is_none())
}

/// The answers a request is routed by: for the name it used (if a name) and for the address.
struct Answers {
    named: Option<Answer>,
    dst: Answer,
}

/// Handles still waiting for a first answer.
struct Pending {
    named: Option<Handle>,
    dst: Option<Handle>,
}

impl ConnDiscovery {
    /// `dst_handle`: the original destination's handle when the connection took one already
    /// (outbound does, to decide the protocol), so it is not taken twice.
    pub fn new(discovery: Arc<Discovery>, dst: SocketAddr, dst_handle: Option<Handle>) -> Self {
        ConnDiscovery {
            discovery,
            dst_addr: dst,
            dst: Mutex::new(dst_handle.map(|handle| Held::from_handle(dst.into(), handle))),
            named: Mutex::default(),
        }
    }

    /// The settled answers for the request's authority (`raw`, as written in `Host` or
    /// `:authority`) and the original destination, or the handles to wait on. The authority is
    /// parsed only when it differs from the connection's last one, and handles are cloned only
    /// to wait, so the steady state allocates nothing and touches no shared lock.
    fn answers(&self, raw: Option<&str>) -> Result<Answers, Pending> {
        let mut dst = lock(&self.dst);
        let dst_handle = dst
            .get_or_insert_with(|| Held::new(&self.discovery, self.dst_addr.into()))
            .handle(&self.discovery);
        let mut named = lock(&self.named);
        let named_handle = match raw {
            None => None,
            Some(raw) => {
                if named.as_ref().is_none_or(|n| &*n.raw != raw) {
                    *named = Some(Named {
                        raw: raw.into(),
                        held: named_destination(raw).map(|name| Held::new(&self.discovery, name)),
                    });
                }
                named
                    .as_mut()
                    .and_then(|n| n.held.as_mut())
                    .and_then(|held| held.handle(&self.discovery))
            }
        };
        let dst_answer = dst_handle.map_or(Some(None), Handle::settled);
        let named_answer = named_handle.map(Handle::settled);
        match (named_answer, dst_answer) {
            (None, Some(dst)) => Ok(Answers { named: None, dst }),
            (Some(Some(named)), Some(dst)) => Ok(Answers {
                named: Some(named),
                dst,
            }),
            _ => Err(Pending {
                named: named_handle.cloned(),
                dst: dst_handle.cloned(),
            }),
        }
    }
}

impl Pending {
    async fn resolve(mut self) -> Answers {
        let dst = match &mut self.dst {
            Some(handle) => handle.resolve().await,
            None => None,
        };
        let named = match &mut self.named {
            Some(handle) => Some(handle.resolve().await),
            None => None,
        };
        Answers { named, dst }
    }
}

#[derive(Clone)]
pub struct RouteLayer {
    policy: SharedPolicy,
    direction: Direction,
    /// The connection's original destination.
    dst: SocketAddr,
    /// Outbound with a control plane: the connection's handles.
    discovery: Option<Arc<ConnDiscovery>>,
}

#[derive(Clone)]
pub struct Routing<S> {
    layer: RouteLayer,
    inner: S,
}

impl RouteLayer {
    pub fn new(
        policy: SharedPolicy,
        direction: Direction,
        dst: SocketAddr,
        discovery: Option<Arc<ConnDiscovery>>,
    ) -> Self {
        RouteLayer {
            policy,
            direction,
            dst,
            discovery,
        }
    }

    /// Routes `req` by the file and the control plane's `answers`.
    fn route(&self, req: &mut ProxyRequest, answers: Option<&Answers>) {
        let policy = self.policy.load();
        let named = answers.and_then(|a| a.named.as_ref()).and_then(known);
        // 1-5 of the module's precedence.
        let (destination, from_control_plane) = match named {
            Some(routes) => (routes, true),
            // The Host lookup is only worth doing when the file names some destination by host.
            None => match policy
                .routes_by_host()
                .then(|| authority(req))
                .flatten()
                .and_then(|a| policy.destination_by_authority(a))
            {
                Some(routes) => (routes, false),
                None => match answers.and_then(|a| known(&a.dst)) {
                    Some(routes) => (routes, true),
                    None => (policy.destination_by_addr(self.dst), false),
                },
            },
        };
        let route = destination.route(req).clone();
        let dst_answer = answers.and_then(|a| a.dst.as_deref());
        let (target, security, balance) = self.target(&route, destination, from_control_plane, dst_answer);
        let ctx = RouteCtx {
            target,
            security,
            balance,
            budget: destination.budget.clone(),
            route,
            direction: self.direction,
            retry_buffer_bytes: policy.retry_buffer_bytes,
            grpc: super::errors::is_grpc(req),
        };
        req.extensions_mut().insert(ctx);
    }

    /// Where the request goes, and under which security decision when the policy decided it.
    /// `from_control_plane`: whether `destination` is the control plane's (else the file's).
    fn target(
        &self,
        route: &Route,
        destination: &Destination,
        from_control_plane: bool,
        dst_answer: Option<&Target>,
    ) -> (SocketAddr, Option<Security>, Option<Balanced>) {
        // Inbound, the upstream is always the app at the original destination: a client's Host
        // never sends the request anywhere else.
        if self.direction == Direction::Inbound {
            return (self.dst, None, None);
        }
        // The control plane's word on `addr`: its endpoint there, in the destination it sent or
        // in its answer for the dialled address.
        let control_plane = |addr: SocketAddr| -> Option<&Endpoint> {
            let own = if from_control_plane {
                destination.endpoint(addr)
            } else {
                None
            };
            own.or_else(|| dst_answer.filter(|_| addr == self.dst)?.routes.as_ref()?.endpoint(addr))
        };
        let decided = |addr: SocketAddr| -> Option<Security> {
            if let Some(endpoint) = control_plane(addr) {
                return Some(Security::from_identity(endpoint.identity.clone()));
            }
            // The file may require mesh TLS; it never waives what discovery would say.
            let file = if from_control_plane {
                None
            } else {
                destination.identity(addr)
            };
            match file {
                Some(id) => Some(Security::Mesh(id.clone())),
                // The dialled address was answered (or its wait is over): that answer stands.
                None if self.discovery.is_some() && addr == self.dst => Some(Security::Plain),
                // Else the upstream asks discovery by address.
                None => None,
            }
        };
        if let Some(backend) = route.backend() {
            return (backend, decided(backend), None);
        }
        // The app's choice stands when it dialled one of the endpoints.
        if let Some(endpoint) = destination.endpoint(self.dst) {
            return (endpoint.address, decided(endpoint.address), None);
        }
        if let Some(balancer) = &destination.balancer {
            let balanced = Balanced {
                balancer: balancer.clone(),
                queue_timeout: destination.queue_timeout,
                from_control_plane,
            };
            // The target and security are each attempt's pick's.
            return (self.dst, None, Some(balanced));
        }
        (self.dst, decided(self.dst), None)
    }
}

/// The control plane's compiled destination, when it knows the destination.
fn known(answer: &Answer) -> Option<&Arc<Destination>> {
    answer.as_deref()?.routes.as_ref()
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

impl<S> Service<ProxyRequest> for Routing<S>
where
    S: Service<ProxyRequest> + Clone + Send + 'static,
    S::Future: Send + Unpin + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RoutingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ProxyRequest) -> Self::Future {
        let Some(conn) = self.layer.discovery.clone() else {
            // No control plane (or inbound): the route file alone.
            self.layer.route(&mut req, None);
            return RoutingFuture::Ready(self.inner.call(req));
        };
        match conn.answers(authority(&req)) {
            Ok(answers) => {
                self.layer.route(&mut req, Some(&answers));
                RoutingFuture::Ready(self.inner.call(req))
            }
            // A destination's first request waits (briefly) for the control plane's first answer.
            Err(pending) => {
                let layer = self.layer.clone();
                // The readied service goes to the waiting request; this one readies a clone.
                let inner = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, inner);
                RoutingFuture::Resolving(Box::pin(async move {
                    let answers = pending.resolve().await;
                    layer.route(&mut req, Some(&answers));
                    inner.call(req).await
                }))
            }
        }
    }
}

/// The inner service's future, or (a destination's first request) waiting for discovery first.
pub enum RoutingFuture<F: Future> {
    Ready(F),
    Resolving(Pin<Box<dyn Future<Output = F::Output> + Send>>),
}

impl<F: Future + Unpin> Future for RoutingFuture<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            RoutingFuture::Ready(inner) => Pin::new(inner).poll(cx),
            RoutingFuture::Resolving(resolving) => resolving.as_mut().poll(cx),
        }
    }
}

/// `:authority` for HTTP/2 (and absolute-form HTTP/1), else the Host header.
fn authority<B>(req: &http::Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

#[cfg(test)]
mod tests {
    use arc_swap::ArcSwap;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        http::{body::RequestBody, metrics::HttpMetrics},
        policy::{self, Policy},
    };

    const FILE: &str = r#"
destinations:
  - destination: db.shop:5432
    endpoints: [{ address: "10.0.0.5:5432" }]
  - destination: web.shop:80
    endpoints: [{ address: "10.0.0.7:8080", identity: spiffe://td/ns/shop/sa/web }]
"#;

    fn layer(direction: Direction) -> RouteLayer {
        let metrics = HttpMetrics::register(&mut Registry::default());
        let file = Policy::compile(policy::parse(FILE, "routes.yaml").unwrap(), &metrics).unwrap();
        let dst = "10.0.0.9:8080".parse().unwrap();
        RouteLayer::new(Arc::new(ArcSwap::from_pointee(file)), direction, dst, None)
    }

    fn routed(layer: &RouteLayer, host: &str) -> RouteCtx {
        let mut req = http::Request::get("/")
            .header("host", host)
            .body(RequestBody::Empty)
            .unwrap();
        layer.route(&mut req, None);
        req.extensions().get::<RouteCtx>().unwrap().clone()
    }

    /// The endpoint the balancer picks for a routed request, and its security decision.
    fn picked(ctx: &RouteCtx) -> (SocketAddr, Option<Security>) {
        let balanced = ctx.balance.as_ref().expect("a destination with endpoints is balanced");
        let picked = balanced.balancer.pick().expect("an endpoint in rotation");
        (picked.address(), balanced.security(picked.endpoint()))
    }

    #[test]
    fn inbound_never_leaves_the_app_whatever_the_host() {
        let ctx = routed(&layer(Direction::Inbound), "db.shop:5432");
        assert_eq!(ctx.target, "10.0.0.9:8080".parse().unwrap());
        assert!(ctx.balance.is_none());
        let outbound = routed(&layer(Direction::Outbound), "db.shop:5432");
        assert_eq!(picked(&outbound).0, "10.0.0.5:5432".parse().unwrap());
    }

    #[test]
    fn the_file_can_require_mesh_tls_but_never_waives_it() {
        let layer = layer(Direction::Outbound);
        let (target, security) = picked(&routed(&layer, "web.shop"));
        assert_eq!(target, "10.0.0.7:8080".parse().unwrap());
        assert!(matches!(security, Some(Security::Mesh(ref id)) if id.as_str() == "spiffe://td/ns/shop/sa/web"));
        // No identity in the file: the upstream asks discovery by address, not "plaintext".
        assert!(picked(&routed(&layer, "db.shop:5432")).1.is_none());
    }

    #[test]
    fn a_dialled_endpoint_is_not_balanced_away() {
        let metrics = HttpMetrics::register(&mut Registry::default());
        let file = Policy::compile(policy::parse(FILE, "routes.yaml").unwrap(), &metrics).unwrap();
        let dst = "10.0.0.5:5432".parse().unwrap();
        let layer = RouteLayer::new(Arc::new(ArcSwap::from_pointee(file)), Direction::Outbound, dst, None);
        let ctx = routed(&layer, "db.shop:5432");
        assert!(ctx.balance.is_none(), "the app's choice of endpoint stands");
        assert_eq!(ctx.target, dst);
    }
}
