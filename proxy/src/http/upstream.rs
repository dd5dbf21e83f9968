//! Upstream HTTP: connections to the target, pooled, and the requests sent on them.
//!
//! - HTTP/2: one multiplexed connection per target, shared by every client connection.
//! - HTTP/1.1: a client connection holds the upstream connection it last used, so the steady
//!   state of a keep-alive client takes no lock and no pool lookup; when the client connection
//!   ends, its upstream connection goes back to a per-target idle pool for the next client.
//! - A request that never left a pooled connection (the server closed it while idle) is sent
//!   again on a fresh connection; nothing else is resent here (that is the retry layer's job).
//! - Outbound, a target that discovery says is meshed is reached over mesh TLS (mTLS, its
//!   identity verified); the connection is otherwise the same. Connections are pooled by target
//!   *and* security decision ([`Security`]), and every request takes the decision in force: when
//!   discovery's answer changes, no request reuses a connection made under the old one.
//! - `Upgrade` (WebSocket) and `CONNECT` get a dedicated connection; after the upstream agrees,
//!   both sides become a raw byte tunnel, and the framing guard is told so ([`admit_upgrade`]).
//!   `Upgrade: h2c` is never tunnelled: HTTP/2 inside a tunnel would bypass per-request routing,
//!   metrics, timeouts and authorization, so (as Linkerd and Envoy do) the request goes on as
//!   plain HTTP/1.1 without it.
//! - HTTP/1 between proxies travels as HTTP/2: outbound, an HTTP/1 request to a meshed target
//!   (whose mesh TLS a Pillion proxy terminates) becomes a stream on the one shared HTTP/2
//!   connection to that target, marked [`ORIG_PROTO`]; the far proxy's inbound takes the mark
//!   off and sends the request to its app as HTTP/1 again. Fewer connections and handshakes
//!   between pods, and no head-of-line blocking of one client's requests behind another's.
//!   Upgrades and `CONNECT` stay HTTP/1.1 on their own connection.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tower::Service;
use tracing::debug;

use super::{
    ProxyRequest, ProxyResponse,
    body::ResponseBody,
    errors::ProxyError,
    framing::{self, PendingUpgrade, UpgradeWatch},
    route::RouteCtx,
};
use crate::{
    mesh::{Mesh, Security},
    metrics::TcpMetrics,
    transport::{self, ConnectSettings},
};

type H1 = http1::SendRequest<super::body::RequestBody>;
type H2 = http2::SendRequest<super::body::RequestBody>;

/// Marks an HTTP/1 request carried as HTTP/2 between proxies, with its original version
/// (`HTTP/1.1` or `HTTP/1.0`); the inbound proxy restores it for its app (Linkerd's
/// `l5d-orig-proto`).
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("pillion-orig-proto");

/// Idle HTTP/1 connections kept per target.
const MAX_IDLE_PER_TARGET: usize = 32;

/// What a pooled connection is for: a target, under one security decision.
type Key = (SocketAddr, Security);
/// An HTTP/2 connection: its key, and which of the target's lanes it is.
type H2Key = (Key, usize);

/// Connections shared by all client connections of one direction.
pub struct Pool {
    connect: ConnectSettings,
    /// Outbound only: originate mesh TLS to targets that discovery says are meshed.
    mesh: Option<Arc<Mesh>>,
    /// Counts new upstream connections by mesh identity (when `mesh` is set).
    metrics: TcpMetrics,
    h1_idle: Mutex<HashMap<Key, Vec<H1>>>,
    /// Up to `h2_lanes` HTTP/2 connections per target, one per lane: a connection's frames
    /// and TLS records are handled by one task, so one connection would hold all the requests
    /// to a target to one core; a client connection always uses the same lane.
    h2: Mutex<HashMap<H2Key, H2>>,
    h2_lanes: usize,
    next_lane: std::sync::atomic::AtomicUsize,
    /// Lanes an HTTP/2 connection is being made for: a request that finds none waits its turn
    /// here, so a burst of first requests makes one connection per lane, not one each.
    h2_connecting: Mutex<HashMap<H2Key, Arc<tokio::sync::Mutex<()>>>>,
}

/// Which protocol the upstream speaks: the one the client spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

impl Version {
    /// The HTTP version detection found (anything but HTTP/1 here is HTTP/2).
    pub fn of(protocol: crate::detect::Protocol) -> Self {
        if protocol == crate::detect::Protocol::Http1 {
            Version::Http1
        } else {
            Version::Http2
        }
    }
}

/// The upstream side of one client connection.
#[derive(Clone)]
pub struct Upstream {
    session: Arc<Session>,
    version: Version,
    /// Inbound: HTTP/2 requests marked [`ORIG_PROTO`] go to the app in their original HTTP/1.
    restores_http1: bool,
}

struct Session {
    pool: Arc<Pool>,
    held: Mutex<Option<(Key, H1)>>,
    /// The HTTP/2 connection this client connection last used, so its next request to the same
    /// target takes it without the pool's shared map.
    held_h2: Mutex<Option<(Key, H2)>>,
    /// This client connection's HTTP/2 lane to every target.
    lane: usize,
}

impl Pool {
    pub fn new(connect: ConnectSettings, mesh: Option<Arc<Mesh>>, metrics: TcpMetrics) -> Self {
        Pool {
            connect,
            mesh,
            metrics,
            h1_idle: Mutex::default(),
            h2: Mutex::default(),
            // As many lanes as the runtime has workers (1 outside a runtime, in tests).
            h2_lanes: tokio::runtime::Handle::try_current()
                .map_or(1, |rt| rt.metrics().num_workers())
                .clamp(1, 8),
            next_lane: std::sync::atomic::AtomicUsize::new(0),
            h2_connecting: Mutex::default(),
        }
    }

    /// The lane of a new client connection: round robin.
    fn lane(&self) -> usize {
        self.next_lane.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.h2_lanes
    }

    /// The security decision in force for `target`, when it is known without waiting: the one
    /// routing `decided` from the connection's discovery handles, else discovery's by address.
    fn settled_key(&self, target: SocketAddr, decided: Option<&Security>) -> Option<Key> {
        match (&self.mesh, decided) {
            // Without a mesh identity, only a route file can ask for mesh TLS; the connection
            // then fails (below) rather than going in plaintext.
            (_, Some(decided)) => Some((target, decided.clone())),
            (None, None) => Some((target, Security::Plain)),
            (Some(mesh), None) => Some((target, mesh.settled_security(target)?)),
        }
    }

    /// The security decision in force for `target`; the first request to a destination may wait
    /// briefly for discovery's first answer.
    async fn key(&self, target: SocketAddr, decided: Option<&Security>) -> Key {
        if let Some(key) = self.settled_key(target, decided) {
            return key;
        }
        match &self.mesh {
            None => (target, Security::Plain),
            Some(mesh) => (target, mesh.security_for(target).await),
        }
    }

    /// Discovery, when this direction has a control plane.
    pub fn discovery(&self) -> Option<&Arc<crate::discovery::Discovery>> {
        self.mesh.as_ref()?.discovery.as_ref()
    }

    /// Connects to `key`'s target under its decision: plain TCP, or mesh TLS verifying the identity.
    async fn connect(&self, key: &Key) -> Result<Connection, ProxyError> {
        let (target, security) = key;
        let stream = transport::connect(*target, self.connect)
            .await
            .map_err(ProxyError::Connect)?;
        if self.mesh.is_some() {
            let id = match security {
                Security::Mesh(id) => Some(id.as_str()),
                Security::Plain => None,
            };
            self.metrics.mesh_connection(id);
        }
        match (&self.mesh, security) {
            (Some(mesh), Security::Mesh(id)) => {
                let tls = mesh.connect(stream, id).await.map_err(ProxyError::Connect)?;
                Ok(Connection::Mesh(Box::new(tls)))
            }
            // A target that must be mesh TLS is never reached in plaintext.
            (None, Security::Mesh(id)) => Err(ProxyError::Connect(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{target} requires mesh TLS to {id}, and this proxy has no workload identity"),
            ))),
            (_, Security::Plain) => Ok(Connection::Plain(stream)),
        }
    }

    async fn connect_h1(&self, key: &Key, upgrades: bool) -> Result<H1, ProxyError> {
        let target = key.0;
        match self.connect(key).await? {
            Connection::Plain(io) => handshake_h1(io, target, upgrades).await,
            Connection::Mesh(io) => handshake_h1(*io, target, upgrades).await,
        }
    }

    /// The shared HTTP/2 connection for `key` (a target's lane), if there is one still open.
    fn h2_ready(&self, key: &H2Key) -> Option<H2> {
        self.h2
            .lock()
            .ok()
            .and_then(|m| m.get(key).filter(|tx| !tx.is_closed()).cloned())
    }

    async fn h2(&self, key: H2Key) -> Result<H2, ProxyError> {
        if let Some(tx) = self.h2_ready(&key) {
            return Ok(tx);
        }
        // One connection attempt per target at a time; those waiting use what it made (or,
        // if it failed, try in turn).
        let gate = crate::discovery::lock(&self.h2_connecting)
            .entry(key.clone())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        if let Some(tx) = self.h2_ready(&key) {
            return Ok(tx);
        }
        let target = key.0.0;
        let made = match self.connect(&key.0).await {
            Ok(Connection::Plain(io)) => handshake_h2(io, target).await,
            Ok(Connection::Mesh(io)) => handshake_h2(*io, target).await,
            Err(error) => Err(error),
        };
        let tx = match made {
            Ok(tx) => tx,
            Err(error) => {
                self.h2_gate_done(&key, &gate);
                return Err(error);
            }
        };
        if let Ok(mut map) = self.h2.lock() {
            // A connection made under an older decision for this target is not used again.
            map.retain(|((addr, security), _), _| *addr != target || *security == key.0.1);
            map.insert(key.clone(), tx.clone());
        }
        self.h2_gate_done(&key, &gate);
        Ok(tx)
    }

    /// Forgets `key`'s gate unless a newer one replaced it; requests already queued on it keep
    /// their clone and find the connection when their turn comes.
    fn h2_gate_done(&self, key: &H2Key, gate: &Arc<tokio::sync::Mutex<()>>) {
        let mut connecting = crate::discovery::lock(&self.h2_connecting);
        if connecting.get(key).is_some_and(|g| Arc::ptr_eq(g, gate)) {
            connecting.remove(key);
        }
    }

    fn take_idle_h1(&self, key: &Key) -> Option<H1> {
        let mut idle = self.h1_idle.lock().ok()?;
        let list = idle.get_mut(key)?;
        while let Some(tx) = list.pop() {
            if tx.is_ready() {
                return Some(tx);
            }
        }
        None
    }

    fn put_idle_h1(&self, key: Key, tx: H1) {
        if tx.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.h1_idle.lock() {
            let list = idle.entry(key).or_default();
            if list.len() < MAX_IDLE_PER_TARGET {
                list.push(tx);
            }
        }
    }
}

/// A fresh upstream connection, plain or mesh TLS.
enum Connection {
    Plain(TcpStream),
    Mesh(Box<crate::tls::expiry::CertBound<tokio_rustls::client::TlsStream<TcpStream>>>),
}

async fn handshake_h1<I>(io: I, target: SocketAddr, upgrades: bool) -> Result<H1, ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // writev off: hyper then copies a small head and body into one buffer and makes one plain
    // write, which costs less than assembling an iovec for the typical small message.
    let (tx, conn) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(io))
        .await
        .map_err(ProxyError::Upstream)?;
    tokio::spawn(async move {
        let done = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(error) = done {
            debug!(%target, %error, "upstream HTTP/1 connection ended");
        }
    });
    Ok(tx)
}

async fn handshake_h2<I>(io: I, target: SocketAddr) -> Result<H2, ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(ProxyError::Upstream)?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%target, %error, "upstream HTTP/2 connection ended");
        }
    });
    Ok(tx)
}

impl Upstream {
    /// `restores_http1`: inbound, where peers' proxies send HTTP/1 requests as HTTP/2.
    pub fn new(pool: Arc<Pool>, version: Version, restores_http1: bool) -> Self {
        Upstream {
            session: Arc::new(Session {
                lane: pool.lane(),
                pool,
                held: Mutex::new(None),
                held_h2: Mutex::new(None),
            }),
            version,
            restores_http1,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some((key, tx)) = self.held.get_mut().ok().and_then(|h| h.take()) {
            self.pool.put_idle_h1(key, tx);
        }
    }
}

impl Session {
    /// A ready HTTP/1 connection to `target` under the security decision in force, without
    /// waiting: the one this client connection holds, else an idle pooled one. `None` when the
    /// decision is not settled yet or no connection is ready.
    fn ready_h1(&self, key: Option<Key>) -> Option<(Key, H1)> {
        let held = self.held.lock().ok().and_then(|mut h| h.take());
        if let Some((held_key, tx)) = held {
            if Some(&held_key) == key.as_ref() {
                if tx.is_ready() {
                    return Some((held_key, tx));
                }
            } else {
                // Another target, or made under another decision: back to the pool under its own key.
                self.pool.put_idle_h1(held_key, tx);
            }
        }
        let key = key?;
        let tx = self.pool.take_idle_h1(&key)?;
        Some((key, tx))
    }

    /// The HTTP/2 connection this client connection holds for `key`, if it is still open.
    fn held_h2(&self, key: &Key) -> Option<H2> {
        let held = self.held_h2.lock().ok()?;
        held.as_ref()
            .filter(|(held_key, tx)| held_key == key && !tx.is_closed())
            .map(|(_, tx)| tx.clone())
    }

    fn hold(&self, key: Key, tx: H1) {
        if let Ok(mut held) = self.held.lock() {
            if let Some((previous_key, previous)) = held.replace((key, tx)) {
                self.pool.put_idle_h1(previous_key, previous);
            }
        }
    }
}

impl Service<ProxyRequest> for Upstream {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyResponse, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ProxyRequest) -> Self::Future {
        let Some((target, decided)) = req
            .extensions()
            .get::<RouteCtx>()
            .map(|ctx| (ctx.target, ctx.security.clone()))
        else {
            let error = ProxyError::Connect(std::io::Error::other("no route target"));
            return Box::pin(std::future::ready(Err(error)));
        };
        let session = self.session.clone();
        if self.version == Version::Http1 {
            // Only requests `admit_upgrade` let through as upgrades carry this.
            if let Some(upgrade) = req.extensions_mut().remove::<PendingUpgrade>() {
                return Box::pin(async move {
                    Ok(tunnel(&session.pool, (target, decided.as_ref()), req, upgrade)
                        .await?
                        .map(ResponseBody::Upstream))
                });
            }
        }
        match self.version {
            Version::Http1 => {
                strip_hop_by_hop(req.headers_mut());
                let key = session.pool.settled_key(target, decided.as_ref());
                if let Some(key) = key.as_ref().filter(|key| between_proxies(key)) {
                    return Box::pin(send_h2(session, key.clone(), as_http2(req)));
                }
                match session.ready_h1(key) {
                    // The steady state of a keep-alive client: the request is handed to a ready
                    // connection right here, and the future only waits for the answer.
                    Some((key, tx)) => Box::pin(send_h1(session, key, tx, req)),
                    None => Box::pin(async move {
                        let key = session.pool.key(target, decided.as_ref()).await;
                        if between_proxies(&key) {
                            return send_h2(session, key, as_http2(req)).await;
                        }
                        let tx = match session.pool.take_idle_h1(&key) {
                            Some(tx) => tx,
                            None => session.pool.connect_h1(&key, false).await?,
                        };
                        send_h1(session, key, tx, req).await
                    }),
                }
            }
            // A peer proxy's HTTP/1 request, carried as HTTP/2: to the app as it was sent.
            Version::Http2 if self.restores_http1 && restore_http1(&mut req) => Box::pin(async move {
                let key = session.pool.key(target, decided.as_ref()).await;
                // The connection this one holds or an idle one (ready_h1 tries both), else a new one.
                let tx = match session.ready_h1(Some(key.clone())) {
                    Some((_, tx)) => tx,
                    None => session.pool.connect_h1(&key, false).await?,
                };
                send_h1(session, key, tx, req).await
            }),
            // No stripping here: hyper's HTTP/2 client and server remove connection-specific
            // headers from every request and response they send.
            Version::Http2 => {
                if !self.restores_http1 {
                    // Only our own proxy marks a request; an app's mark is not passed on.
                    req.headers_mut().remove(ORIG_PROTO);
                }
                Box::pin(async move {
                    let key = session.pool.key(target, decided.as_ref()).await;
                    send_h2(session, key, req).await
                })
            }
        }
    }
}

/// Whether requests under `key` go to a peer proxy: mesh TLS is terminated by a Pillion proxy,
/// which takes HTTP/1 requests as HTTP/2 streams.
fn between_proxies(key: &Key) -> bool {
    matches!(key.1, Security::Mesh(_))
}

/// An HTTP/1 request (hop-by-hop headers already gone) marked for the far proxy to restore.
fn as_http2(mut req: ProxyRequest) -> ProxyRequest {
    let original = if req.version() == http::Version::HTTP_10 {
        HeaderValue::from_static("HTTP/1.0")
    } else {
        HeaderValue::from_static("HTTP/1.1")
    };
    req.headers_mut().insert(ORIG_PROTO, original);
    req
}

/// Takes the [`ORIG_PROTO`] mark off an HTTP/2 request and gives it back its HTTP/1 version;
/// false (and nothing changed) for a request without a valid mark.
fn restore_http1(req: &mut ProxyRequest) -> bool {
    let version = match req.headers().get(ORIG_PROTO).map(HeaderValue::as_bytes) {
        None => return false,
        Some(b"HTTP/1.1") => http::Version::HTTP_11,
        Some(b"HTTP/1.0") => http::Version::HTTP_10,
        // Not ours: dropped, and the request stays HTTP/2.
        Some(_) => {
            req.headers_mut().remove(ORIG_PROTO);
            return false;
        }
    };
    req.headers_mut().remove(ORIG_PROTO);
    *req.version_mut() = version;
    // HTTP/1 needs a Host; a request that came as HTTP/1 has one, but the mark alone proves
    // nothing about the sender, so one is made from the authority if it is missing.
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    true
}

/// Sends `req` on the shared HTTP/2 connection for `key` (this client connection's lane), made
/// if there is none.
async fn send_h2(session: Arc<Session>, key: Key, req: ProxyRequest) -> Result<ProxyResponse, ProxyError> {
    let mut tx = match session.held_h2(&key) {
        Some(tx) => tx,
        None => {
            let lane = (key.clone(), session.lane);
            let tx = match session.pool.h2_ready(&lane) {
                Some(tx) => tx,
                // Boxed: the handshake future is large and rarely needed.
                None => Box::pin(session.pool.h2(lane)).await?,
            };
            if let Ok(mut held) = session.held_h2.lock() {
                *held = Some((key, tx.clone()));
            }
            tx
        }
    };
    let rsp = tx.send_request(req).await.map_err(ProxyError::from_send)?;
    Ok(rsp.map(ResponseBody::Upstream))
}

/// Sends `req` on `tx` now; the future waits for the response.
fn send_h1(
    session: Arc<Session>,
    key: Key,
    mut tx: H1,
    req: ProxyRequest,
) -> impl Future<Output = Result<ProxyResponse, ProxyError>> {
    let sent = tx.try_send_request(req);
    async move {
        match sent.await {
            Ok(rsp) => {
                session.hold(key, tx);
                Ok(upstream_response(rsp))
            }
            // Boxed: rare, and inline it would make every request's future that much larger.
            Err(unsent) => Box::pin(resend_h1(session, key, unsent)).await,
        }
    }
}

/// A request that never left (the server had closed the pooled connection) goes again on a
/// fresh connection; one that did is not resent here (that is the retry layer's call).
async fn resend_h1(
    session: Arc<Session>,
    key: Key,
    mut unsent: hyper::client::conn::TrySendError<ProxyRequest>,
) -> Result<ProxyResponse, ProxyError> {
    let Some(req) = unsent.take_message() else {
        return Err(ProxyError::from_send(unsent.into_error()));
    };
    let mut tx = session.pool.connect_h1(&key, false).await?;
    let rsp = tx.send_request(req).await.map_err(ProxyError::from_send)?;
    session.hold(key, tx);
    Ok(upstream_response(rsp))
}

/// An HTTP/1 upstream's response as the client gets it: without hop-by-hop headers.
fn upstream_response(mut rsp: http::Response<hyper::body::Incoming>) -> ProxyResponse {
    strip_hop_by_hop(rsp.headers_mut());
    rsp.map(ResponseBody::Upstream)
}

/// Sends an upgrade or CONNECT request on its own connection and, if the upstream accepts,
/// joins the two upgraded connections into a byte tunnel. `upgrade` tells the client
/// connection's framing guard the outcome: accepted here, refused when dropped unaccepted
/// (including when this future is dropped, on a timeout).
async fn tunnel(
    pool: &Pool,
    (target, decided): (SocketAddr, Option<&Security>),
    mut req: ProxyRequest,
    upgrade: PendingUpgrade,
) -> Result<http::Response<hyper::body::Incoming>, ProxyError> {
    let client_side = hyper::upgrade::on(&mut req);
    let is_connect = req.method() == Method::CONNECT;
    let key = pool.key(target, decided).await;
    let mut tx = pool.connect_h1(&key, true).await?;
    let mut rsp = tx.send_request(req).await.map_err(ProxyError::from_send)?;
    let accepted = rsp.status() == StatusCode::SWITCHING_PROTOCOLS || (is_connect && rsp.status().is_success());
    if !accepted {
        // An ordinary answer: the connection goes on as HTTP/1, so this response loses its
        // hop-by-hop headers like any other. (A 101 keeps Upgrade and Connection: they are the
        // answer.)
        strip_hop_by_hop(rsp.headers_mut());
    } else {
        // Before hyper writes the 101: the guard then hands the client's next bytes to the tunnel.
        upgrade.accept();
        let server_side = hyper::upgrade::on(&mut rsp);
        tokio::spawn(async move {
            match tokio::try_join!(client_side, server_side) {
                Ok((client, server)) => {
                    let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                        debug!(%target, %error, "tunnel ended with an error");
                    }
                }
                Err(error) => debug!(%target, %error, "upgrade failed"),
            }
        });
    }
    Ok(rsp)
}

/// For an HTTP/1 request hyper flagged as a possible upgrade (`CONNECT`, or an `Upgrade`
/// header): h2c is taken out (see [`strip_h2c`]); if a real upgrade remains, the request carries
/// the token the tunnel settles, so the connection's framing guard learns whether it switched.
/// The guard decides with the same rule ([`framing::switches_protocols`]) on the raw head.
#[inline]
pub fn admit_upgrade<B>(req: &mut http::Request<B>, upgrades: &UpgradeWatch) {
    // Cheap for every other request: hyper attached nothing, so the map is empty.
    if req.extensions().get::<hyper::upgrade::OnUpgrade>().is_some() {
        admit_flagged_upgrade(req, upgrades);
    }
}

#[cold]
fn admit_flagged_upgrade<B>(req: &mut http::Request<B>, upgrades: &UpgradeWatch) {
    strip_h2c(req.headers_mut());
    let token = req
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| framing::names_protocol_to_switch_to(v.as_bytes()));
    let connect = req.method() == Method::CONNECT;
    if framing::switches_protocols(connect, req.version() == http::Version::HTTP_11, token) {
        req.extensions_mut().insert(upgrades.pending());
    }
}

/// Removes an h2c upgrade offer (RFC 7540 §3.2): the `h2c` token of `Upgrade` (the header goes
/// if nothing else is left), `HTTP2-Settings`, and their tokens in `Connection`. The request then
/// is plain HTTP/1.1 and gets its answer as such.
pub fn strip_h2c(headers: &mut HeaderMap) {
    let settings = headers.remove(HTTP2_SETTINGS).is_some();
    let h2c = |t: &str| t.eq_ignore_ascii_case("h2c");
    let offered = headers.get_all(header::UPGRADE).iter().any(|v| tokens(v).any(h2c));
    if !offered && !settings {
        return;
    }
    if offered {
        let others = joined(headers, header::UPGRADE, |t| !h2c(t));
        headers.remove(header::UPGRADE);
        if let Some(others) = others {
            headers.insert(header::UPGRADE, others);
        }
    }
    let upgrade_left = headers.contains_key(header::UPGRADE);
    let connection = joined(headers, header::CONNECTION, |t| {
        !t.eq_ignore_ascii_case(HTTP2_SETTINGS.as_str()) && (upgrade_left || !t.eq_ignore_ascii_case("upgrade"))
    });
    headers.remove(header::CONNECTION);
    if let Some(connection) = connection {
        headers.insert(header::CONNECTION, connection);
    }
}

/// The tokens of every `name` header that `keep` keeps, as one value (`None` if none is kept).
/// A value that is not text is kept whole: the framing guard reads the raw bytes, and if this
/// dropped them the two would disagree on whether the request is an upgrade (the guard would
/// then wait for an answer nobody gives, and the connection would hang).
fn joined(headers: &HeaderMap, name: HeaderName, keep: impl Fn(&str) -> bool) -> Option<HeaderValue> {
    let kept: Vec<&[u8]> = headers
        .get_all(name)
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(_) => tokens(v).filter(|t| keep(t)).map(str::as_bytes).collect(),
            Err(_) => vec![v.as_bytes()],
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&kept.join(&b", "[..])).ok()
}

/// The comma-separated tokens of a header value (none if it is not text).
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), which describe one connection and must not be
/// forwarded. `te: trailers` stays: gRPC needs it end to end. hyper re-frames bodies itself.
///
/// Runs twice per request, so it first looks at each name once and removes only what is there:
/// most messages carry no hop-by-hop header but `connection: keep-alive`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found = HopByHop::default();
    for (name, value) in headers.iter() {
        found.note(name, value);
    }
    if found == HopByHop::default() {
        return;
    }
    if found.connection {
        headers.remove(header::CONNECTION);
    }
    for name in found.listed.drain(..).filter(|n| n != header::TE) {
        headers.remove(name);
    }
    if found.transfer_encoding {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if found.upgrade {
        headers.remove(header::UPGRADE);
    }
    if found.keep_alive {
        headers.remove(KEEP_ALIVE);
    }
    if found.proxy_connection {
        headers.remove(PROXY_CONNECTION);
    }
    if found.te
        && headers
            .get(header::TE)
            .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Part of an h2c upgrade offer, meaningful only on the connection it was sent on.
const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The hop-by-hop headers one message carries.
#[derive(Default, PartialEq)]
struct HopByHop {
    connection: bool,
    transfer_encoding: bool,
    upgrade: bool,
    keep_alive: bool,
    proxy_connection: bool,
    te: bool,
    /// Names listed in `Connection`.
    listed: Vec<HeaderName>,
}

impl HopByHop {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        // Dispatch on the length first: most names are ruled out by it alone.
        match name.as_str().len() {
            2 => self.te |= name == header::TE,
            7 => self.upgrade |= name == header::UPGRADE,
            10 if name == header::CONNECTION => {
                self.connection = true;
                self.note_listed(value);
            }
            10 => self.keep_alive |= name == KEEP_ALIVE,
            16 => self.proxy_connection |= name == PROXY_CONNECTION,
            17 => self.transfer_encoding |= name == header::TRANSFER_ENCODING,
            _ => {}
        }
    }

    /// The names a `Connection` value lists, but the options that name no header.
    fn note_listed(&mut self, value: &HeaderValue) {
        for name in value.to_str().unwrap_or_default().split(',').map(str::trim) {
            let option = name.eq_ignore_ascii_case("keep-alive") || name.eq_ignore_ascii_case("close");
            if name.is_empty() || option {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                self.listed.push(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of first requests to one target shares the one connection the first of them makes.
    #[tokio::test]
    async fn concurrent_first_requests_make_one_http2_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let metrics = crate::metrics::Metrics::new();
        let connect = ConnectSettings {
            timeout: std::time::Duration::from_secs(3),
            keepalive: std::time::Duration::from_secs(10),
        };
        let pool = Arc::new(Pool::new(
            connect,
            None,
            metrics.tcp(crate::metrics::Direction::Outbound),
        ));
        let burst = (0..20).map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.h2(((target, Security::Plain), 0)).await.map(|_| ()) })
        });
        for request in burst {
            request.await.unwrap().unwrap();
        }
        // The server counts when it accepts, which may trail the client's handshake.
        let settled = |want: usize| {
            let accepted = accepted.clone();
            async move {
                for _ in 0..200 {
                    if accepted.load(std::sync::atomic::Ordering::SeqCst) >= want {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                accepted.load(std::sync::atomic::Ordering::SeqCst)
            }
        };
        assert_eq!(settled(1).await, 1);
        // Another lane is another connection; the first lane's is shared still.
        pool.h2(((target, Security::Plain), 1)).await.unwrap();
        pool.h2(((target, Security::Plain), 0)).await.unwrap();
        assert_eq!(settled(2).await, 2);
    }

    #[test]
    fn hop_by_hop_headers_are_removed_end_to_end_ones_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, x-session".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-session", "abc".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::HOST, "web:80".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["te", "host"]);
    }

    #[test]
    fn connection_options_and_other_hop_by_hop_names_are_handled() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "close".parse().unwrap());
        headers.insert("proxy-connection", "keep-alive".parse().unwrap());
        headers.insert(header::TE, "gzip".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert("x-close", "kept".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-close"]);

        // Nothing hop-by-hop: the map is left exactly as it was.
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "web".parse().unwrap());
        headers.append("x-many", "1".parse().unwrap());
        headers.append("x-many", "2".parse().unwrap());
        let before = headers.clone();
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn an_h2c_offer_is_removed_and_other_upgrades_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "Upgrade, HTTP2-Settings".parse().unwrap());
        headers.insert(header::UPGRADE, "h2c".parse().unwrap());
        headers.insert(HTTP2_SETTINGS, "AAMAAABkAAQAAP__".parse().unwrap());
        headers.insert(header::HOST, "web".parse().unwrap());
        strip_h2c(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["host"]);

        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            "keep-alive, Upgrade, HTTP2-Settings".parse().unwrap(),
        );
        headers.insert(header::UPGRADE, "H2C, websocket".parse().unwrap());
        headers.insert(HTTP2_SETTINGS, "AAMAAABkAAQAAP__".parse().unwrap());
        strip_h2c(&mut headers);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "keep-alive, Upgrade");
        assert!(!headers.contains_key(HTTP2_SETTINGS));

        // Nothing h2c: left as it was.
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        let before = headers.clone();
        strip_h2c(&mut headers);
        assert_eq!(headers, before);
    }

    #[test]
    fn an_upgrade_value_that_is_not_text_survives_h2c_stripping() {
        // Found by fuzzing (fuzz/fuzz_targets/framing.rs): `Upgrade: h2c` plus an `Upgrade` value
        // with obs-text bytes. The guard counts the second as an upgrade; dropping it here meant
        // no answer ever reached the guard, and the connection hung.
        let odd = HeaderValue::from_bytes(b"h1\x98x").unwrap();
        let mut headers = HeaderMap::new();
        headers.append(header::UPGRADE, "h2c".parse().unwrap());
        headers.append(header::UPGRADE, odd.clone());
        strip_h2c(&mut headers);
        assert_eq!(headers.get_all(header::UPGRADE).iter().collect::<Vec<_>>(), vec![&odd]);
        assert!(framing::names_protocol_to_switch_to(
            headers[header::UPGRADE].as_bytes()
        ));
    }

    /// Pool keying by security decision: a connection made while discovery had not answered
    /// (plaintext) is never reused once discovery says the target is meshed.
    mod security {
        use std::{
            convert::Infallible,
            sync::atomic::{AtomicUsize, Ordering},
            time::Duration,
        };

        use arc_swap::ArcSwap;
        use bytes::Bytes;
        use http_body_util::Full;
        use hyper::service::service_fn;
        use prometheus_client::metrics::gauge::Gauge;
        use tokio::{io::DuplexStream, net::TcpListener};

        use super::super::super::{HttpProxy, HttpSettings};
        use super::*;
        use crate::{
            discovery::{Discovery, DiscoverySettings, Target},
            drain::Drain,
            identity::IdentityStore,
            metrics::{Direction, Metrics},
            policy::Policy,
            tls::{MeshTls, spiffe::SpiffeId, trust_anchors},
        };

        #[derive(Default)]
        struct Seen {
            plain_requests: AtomicUsize,
            tls_hellos: AtomicUsize,
        }

        /// A plaintext HTTP/1 upstream that counts requests, and connections opening with TLS.
        async fn upstream() -> (SocketAddr, Arc<Seen>) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let seen = Arc::new(Seen::default());
            let s = seen.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let s = s.clone();
                    tokio::spawn(async move {
                        let mut first = [0u8; 1];
                        if stream.peek(&mut first).await.unwrap_or(0) == 1 && first[0] == 0x16 {
                            s.tls_hellos.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let svc = service_fn(move |_req| {
                            s.plain_requests.fetch_add(1, Ordering::SeqCst);
                            async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok")))) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            (addr, seen)
        }

        fn mesh(discovery: Arc<Discovery>) -> Arc<Mesh> {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let pem = params.self_signed(&key).unwrap().pem();
            let (roots, der) = trust_anchors(pem.as_bytes(), "test").unwrap();
            let store = Arc::new(IdentityStore::new(roots, &der, "files", Gauge::default()));
            let tls = MeshTls::new(store.clone()).unwrap();
            Arc::new(Mesh {
                tls,
                store,
                discovery: Some(discovery),
            })
        }

        /// One client connection through the outbound HTTP stack to `dst`.
        async fn client(http: Arc<HttpProxy>, dst: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
            let (client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
            let peer: SocketAddr = "10.0.0.1:5555".parse().unwrap();
            tokio::spawn(async move { http.serve(server, Version::Http1, dst, peer, None, None).await });
            let (tx, conn) = http1::handshake(TokioIo::new(client)).await.unwrap();
            tokio::spawn(conn);
            tx
        }

        async fn get(tx: &mut http1::SendRequest<Full<Bytes>>) -> StatusCode {
            let req = http::Request::get("/")
                .header("host", "web")
                .body(Full::default())
                .unwrap();
            tx.send_request(req).await.unwrap().status()
        }

        /// What the control plane would say of a destination whose one endpoint is `dst`, meshed.
        fn meshed_target(dst: SocketAddr, id: SpiffeId) -> Target {
            let policy = pillion_api::policy::parse(
                &format!(
                    "destinations:\n  - destination: {dst}\n    endpoints: [{{ address: {dst}, identity: {id} }}]\n"
                ),
                "policy.yaml",
            )
            .unwrap();
            let metrics =
                crate::http::metrics::HttpMetrics::register(&mut prometheus_client::registry::Registry::default());
            let spec = policy.destinations.into_values().next().unwrap();
            Target {
                routes: Some(Arc::new(
                    crate::policy::Destination::compile(spec, &metrics, None).unwrap(),
                )),
                authorization: None,
            }
        }

        #[tokio::test]
        async fn a_plaintext_connection_is_not_reused_once_the_target_is_meshed() {
            let (dst, seen) = upstream().await;
            let discovery = Discovery::for_test(DiscoverySettings {
                first_answer_wait: Duration::from_millis(50),
                max_destinations: 16,
                idle_timeout: Duration::from_secs(60),
            });
            let metrics = Metrics::new();
            let connect = ConnectSettings {
                timeout: Duration::from_secs(3),
                keepalive: Duration::from_secs(10),
            };
            let http = Arc::new(HttpProxy {
                direction: Direction::Outbound,
                policy: Arc::new(ArcSwap::from_pointee(Policy::empty(&metrics.http))),
                pool: Arc::new(Pool::new(
                    connect,
                    Some(mesh(discovery.clone())),
                    metrics.tcp(Direction::Outbound),
                )),
                settings: HttpSettings {
                    idle_timeout: Duration::from_secs(10),
                    max_header_bytes: 16 * 1024,
                    access_log: false,
                },
                drain: Drain::new(),
                tcp: metrics.tcp(Direction::Outbound),
            });

            // Discovery has not answered within its first wait: plaintext, and the connection is held.
            let mut a = client(http.clone(), dst).await;
            assert_eq!(get(&mut a).await, StatusCode::OK);
            assert_eq!(seen.plain_requests.load(Ordering::SeqCst), 1);

            // Now the target is meshed. The same client connection, and a new one, must try mesh
            // TLS (which this plaintext upstream cannot answer) instead of the plaintext connection.
            let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
            let key = pillion_api::policy::model::Authority::from(dst);
            let meshed = meshed_target(dst, id);
            assert!(discovery.answer(&key, meshed));
            assert_ne!(get(&mut a).await, StatusCode::OK);
            let mut b = client(http.clone(), dst).await;
            assert_ne!(get(&mut b).await, StatusCode::OK);
            assert_eq!(
                seen.plain_requests.load(Ordering::SeqCst),
                1,
                "no request went in plaintext"
            );
            assert_eq!(seen.tls_hellos.load(Ordering::SeqCst), 2);

            // Meshed no more: plaintext again, on a connection made under that decision.
            assert!(discovery.answer(&key, Target::default()));
            assert_eq!(get(&mut b).await, StatusCode::OK);
            assert_eq!(seen.plain_requests.load(Ordering::SeqCst), 2);
        }
    }
}
