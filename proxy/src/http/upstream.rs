//! Upstream HTTP: connections to the target, pooled, and the requests sent on them.
//!
//! - HTTP/2: one multiplexed connection per target, shared by every client connection.
//! - HTTP/1.1: a client connection holds the upstream connection it last used, so the steady
//!   state of a keep-alive client takes no lock and no pool lookup; when the client connection
//!   ends, its upstream connection goes back to a per-target idle pool for the next client.
//! - A request that never left a pooled connection (the server closed it while idle) is sent
//!   again on a fresh connection; nothing else is resent here (that is the retry layer's job).
//! - Outbound, a target that discovery says is meshed is reached over mesh TLS (mTLS, its
//!   identity verified); the connection is otherwise the same.
//! - `Upgrade` (WebSocket) and `CONNECT` get a dedicated connection; after the upstream agrees,
//!   both sides become a raw byte tunnel.

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

use super::{ProxyRequest, ProxyResponse, body::ResponseBody, errors::ProxyError, route::RouteCtx};
use crate::{
    mesh::Mesh,
    metrics::TcpMetrics,
    transport::{self, ConnectSettings},
};

type H1 = http1::SendRequest<super::body::RequestBody>;
type H2 = http2::SendRequest<super::body::RequestBody>;

/// Idle HTTP/1 connections kept per target.
const MAX_IDLE_PER_TARGET: usize = 32;

/// Connections shared by all client connections of one direction.
pub struct Pool {
    connect: ConnectSettings,
    /// Outbound only: originate mesh TLS to targets that discovery says are meshed.
    mesh: Option<Arc<Mesh>>,
    /// Counts new upstream connections by mesh identity (when `mesh` is set).
    metrics: TcpMetrics,
    h1_idle: Mutex<HashMap<SocketAddr, Vec<H1>>>,
    h2: Mutex<HashMap<SocketAddr, H2>>,
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
}

struct Session {
    pool: Arc<Pool>,
    held: Mutex<Option<(SocketAddr, H1)>>,
}

impl Pool {
    pub fn new(connect: ConnectSettings, mesh: Option<Arc<Mesh>>, metrics: TcpMetrics) -> Self {
        Pool {
            connect,
            mesh,
            metrics,
            h1_idle: Mutex::default(),
            h2: Mutex::default(),
        }
    }

    /// Connects to `target`, in mesh TLS when discovery says it is meshed.
    async fn connect(&self, target: SocketAddr) -> Result<Connection, ProxyError> {
        let stream = transport::connect(target, self.connect)
            .await
            .map_err(ProxyError::Connect)?;
        let Some(mesh) = &self.mesh else {
            return Ok(Connection::Plain(stream));
        };
        let id = mesh.identity_for(target).await;
        self.metrics.mesh_connection(id.as_ref().map(|id| id.as_str()));
        match id {
            Some(id) => {
                let tls = mesh.connect(stream, &id).await.map_err(ProxyError::Connect)?;
                Ok(Connection::Mesh(Box::new(tls)))
            }
            None => Ok(Connection::Plain(stream)),
        }
    }

    async fn connect_h1(&self, target: SocketAddr, upgrades: bool) -> Result<H1, ProxyError> {
        match self.connect(target).await? {
            Connection::Plain(io) => handshake_h1(io, target, upgrades).await,
            Connection::Mesh(io) => handshake_h1(*io, target, upgrades).await,
        }
    }

    /// The shared HTTP/2 connection to `target`, if there is one still open.
    fn h2_ready(&self, target: SocketAddr) -> Option<H2> {
        self.h2
            .lock()
            .ok()
            .and_then(|m| m.get(&target).filter(|tx| !tx.is_closed()).cloned())
    }

    async fn h2(&self, target: SocketAddr) -> Result<H2, ProxyError> {
        if let Some(tx) = self.h2_ready(target) {
            return Ok(tx);
        }
        let tx = match self.connect(target).await? {
            Connection::Plain(io) => handshake_h2(io, target).await?,
            Connection::Mesh(io) => handshake_h2(*io, target).await?,
        };
        if let Ok(mut map) = self.h2.lock() {
            map.insert(target, tx.clone());
        }
        Ok(tx)
    }

    fn take_idle_h1(&self, target: SocketAddr) -> Option<H1> {
        let mut idle = self.h1_idle.lock().ok()?;
        let list = idle.get_mut(&target)?;
        while let Some(tx) = list.pop() {
            if tx.is_ready() {
                return Some(tx);
            }
        }
        None
    }

    fn put_idle_h1(&self, target: SocketAddr, tx: H1) {
        if tx.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.h1_idle.lock() {
            let list = idle.entry(target).or_default();
            if list.len() < MAX_IDLE_PER_TARGET {
                list.push(tx);
            }
        }
    }
}

/// A fresh upstream connection, plain or mesh TLS.
enum Connection {
    Plain(TcpStream),
    Mesh(Box<tokio_rustls::client::TlsStream<TcpStream>>),
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
    pub fn new(pool: Arc<Pool>, version: Version) -> Self {
        Upstream {
            session: Arc::new(Session {
                pool,
                held: Mutex::new(None),
            }),
            version,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some((target, tx)) = self.held.get_mut().ok().and_then(|h| h.take()) {
            self.pool.put_idle_h1(target, tx);
        }
    }
}

impl Session {
    /// A ready HTTP/1 connection to `target`, without waiting: the one this client connection
    /// holds, else an idle pooled one.
    fn ready_h1(&self, target: SocketAddr) -> Option<H1> {
        let held = self.held.lock().ok().and_then(|mut h| h.take());
        if let Some((addr, tx)) = held {
            if addr == target && tx.is_ready() {
                return Some(tx);
            }
            if addr != target {
                self.pool.put_idle_h1(addr, tx);
            }
        }
        self.pool.take_idle_h1(target)
    }

    fn hold(&self, target: SocketAddr, tx: H1) {
        if let Ok(mut held) = self.held.lock() {
            if let Some((addr, previous)) = held.replace((target, tx)) {
                self.pool.put_idle_h1(addr, previous);
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
        let Some(target) = req.extensions().get::<RouteCtx>().map(|ctx| ctx.target) else {
            let error = ProxyError::Connect(std::io::Error::other("no route target"));
            return Box::pin(std::future::ready(Err(error)));
        };
        let session = self.session.clone();
        if self.version == Version::Http1 && is_upgrade(&req) {
            // The 101 keeps its Upgrade and Connection headers: they are the answer.
            return Box::pin(async move { Ok(tunnel(&session.pool, target, req).await?.map(ResponseBody::Upstream)) });
        }
        match self.version {
            Version::Http1 => {
                strip_hop_by_hop(req.headers_mut());
                match session.ready_h1(target) {
                    // The steady state of a keep-alive client: the request is handed to a ready
                    // connection right here, and the future only waits for the answer.
                    Some(tx) => Box::pin(send_h1(session, target, tx, req)),
                    None => Box::pin(async move {
                        let tx = session.pool.connect_h1(target, false).await?;
                        send_h1(session, target, tx, req).await
                    }),
                }
            }
            // No stripping here: hyper's HTTP/2 client and server remove connection-specific
            // headers from every request and response they send.
            Version::Http2 => Box::pin(async move {
                let mut tx = match session.pool.h2_ready(target) {
                    Some(tx) => tx,
                    // Boxed: the handshake future is large and rarely needed.
                    None => Box::pin(session.pool.h2(target)).await?,
                };
                let rsp = tx.send_request(req).await.map_err(ProxyError::from_send)?;
                Ok(rsp.map(ResponseBody::Upstream))
            }),
        }
    }
}

/// Sends `req` on `tx` now; the future waits for the response.
fn send_h1(
    session: Arc<Session>,
    target: SocketAddr,
    mut tx: H1,
    req: ProxyRequest,
) -> impl Future<Output = Result<ProxyResponse, ProxyError>> {
    let sent = tx.try_send_request(req);
    async move {
        match sent.await {
            Ok(rsp) => {
                session.hold(target, tx);
                Ok(upstream_response(rsp))
            }
            // Boxed: rare, and inline it would make every request's future that much larger.
            Err(unsent) => Box::pin(resend_h1(session, target, unsent)).await,
        }
    }
}

/// A request that never left (the server had closed the pooled connection) goes again on a
/// fresh connection; one that did is not resent here (that is the retry layer's call).
async fn resend_h1(
    session: Arc<Session>,
    target: SocketAddr,
    mut unsent: hyper::client::conn::TrySendError<ProxyRequest>,
) -> Result<ProxyResponse, ProxyError> {
    let Some(req) = unsent.take_message() else {
        return Err(ProxyError::from_send(unsent.into_error()));
    };
    let mut tx = session.pool.connect_h1(target, false).await?;
    let rsp = tx.send_request(req).await.map_err(ProxyError::from_send)?;
    session.hold(target, tx);
    Ok(upstream_response(rsp))
}

/// An HTTP/1 upstream's response as the client gets it: without hop-by-hop headers.
fn upstream_response(mut rsp: http::Response<hyper::body::Incoming>) -> ProxyResponse {
    strip_hop_by_hop(rsp.headers_mut());
    rsp.map(ResponseBody::Upstream)
}

/// Sends an upgrade or CONNECT request on its own connection and, if the upstream accepts,
/// joins the two upgraded connections into a byte tunnel.
async fn tunnel(
    pool: &Pool,
    target: SocketAddr,
    mut req: ProxyRequest,
) -> Result<http::Response<hyper::body::Incoming>, ProxyError> {
    let client_side = hyper::upgrade::on(&mut req);
    let is_connect = req.method() == Method::CONNECT;
    let mut tx = pool.connect_h1(target, true).await?;
    let mut rsp = tx.send_request(req).await.map_err(ProxyError::from_send)?;
    let accepted = rsp.status() == StatusCode::SWITCHING_PROTOCOLS || (is_connect && rsp.status().is_success());
    if accepted {
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

fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE)
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
}
