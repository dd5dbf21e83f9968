//! The app: a hyper server that speaks HTTP/1.1 and h2c on one port (hyper-util's `auto`
//! builder, as a real app framework would), on a current-thread runtime in a thread inside the
//! pod's (or the client's) namespace.
//!
//! It records every request it receives — method, target, authority, version, headers, peer and
//! what became of its body — so a test can check what the proxy forwarded and count attempts.
//! What it answers depends on the path:
//!
//! | path | answer |
//! |---|---|
//! | `/slow/<ms>/...` | waits `<ms>`, then the default answer |
//! | `/fail-first/<n>/...` | 503 to the first `<n>` requests for this exact path, then the default answer |
//! | `/always-503...` | 503 |
//! | any path with `Upgrade` | 101 with the same `Upgrade`, then `tunnel-open\n` and an echo of everything until EOF |
//! | `/pillion.test.Echo/<method>` | gRPC, see [`super::grpc`] |
//! | anything else | 200, body `<name> <METHOD> <target> len=.. hash=..` |
//!
//! Except for upgrades and gRPC, the whole request body is read (and digested) before anything
//! is answered, so "the app answered" implies "the app saw the complete body". Answers carry
//! `x-app: <name>` and the body's digest (`x-body-len`, `x-body-hash`); HTTP/1 answers also carry
//! hop-by-hop headers (`Connection: x-resp-hop`, `X-Resp-Hop`, `Keep-Alive`) that a proxy must
//! not pass on.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::body::{StreamDigest, StreamHasher};
use crate::netns::Netns;

/// Response bodies of the app.
pub type AppBody = BoxBody<Bytes, Infallible>;

/// How much of each request body is kept verbatim (the rest is only digested).
const KEEP_BODY_BYTES: usize = 4096;

/// A running app; stops (and closes its connections) on drop.
#[derive(Debug)]
pub struct HttpApp {
    name: String,
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// One request as the app received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub target: String,
    /// The URI's authority: HTTP/2 `:authority`, or an absolute-form HTTP/1 target.
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
    /// The connection's peer (for an app behind the proxy: the proxy's side of the connection).
    pub peer: SocketAddr,
    pub body: BodyOutcome,
}

/// What became of a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyOutcome {
    /// Still being read.
    Reading,
    /// Read to its end: digest and the first bytes.
    Complete { digest: StreamDigest, start: Vec<u8> },
    /// Reading failed (the peer reset, or sent something malformed).
    Failed(String),
    /// Not read as a body (an upgrade).
    Untouched,
}

/// Where a handler reports the outcome of the body of the request it serves.
pub struct BodyRecord {
    state: Arc<AppState>,
    index: usize,
}

#[derive(Debug, Default)]
struct AppState {
    name: String,
    requests: Mutex<Vec<Seen>>,
    connections: Mutex<Vec<SocketAddr>>,
    hits: Mutex<HashMap<String, u32>>,
}

impl HttpApp {
    /// Serves `0.0.0.0:port` in `ns` (as root: never the proxy's UID, so outbound answers are
    /// not redirected). `name` is returned in `x-app` and the default body.
    pub fn start(ns: &Netns, port: u16, name: &str) -> HttpApp {
        let listener = ns.listen(SocketAddr::from(([0, 0, 0, 0], port)));
        HttpApp::serve_on(listener, name, |run| ns.spawn(run))
    }

    /// Serves `listener`, wherever it was bound, from a thread in the caller's namespace: for an
    /// app run without namespaces (the demo's `--no-iptables` mode). An app only accepts, so its
    /// sockets are the listener's namespace's.
    pub fn start_local(listener: std::net::TcpListener, name: &str) -> HttpApp {
        HttpApp::serve_on(listener, name, std::thread::spawn)
    }

    fn serve_on(
        listener: std::net::TcpListener,
        name: &str,
        spawn: impl FnOnce(Box<dyn FnOnce() + Send>) -> JoinHandle<()>,
    ) -> HttpApp {
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let addr = listener.local_addr().expect("listener address");
        let state = Arc::new(AppState {
            name: name.to_owned(),
            ..AppState::default()
        });
        let (stop, stopped) = oneshot::channel();
        let thread = spawn(Box::new({
            let state = state.clone();
            move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building the app's runtime");
                runtime.block_on(serve(listener, state, stopped));
                // Dropping the runtime drops every connection task: the app's sockets close.
            }
        }));
        HttpApp {
            name: name.to_owned(),
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|seen| seen.target.starts_with(prefix))
            .collect()
    }

    /// The single request whose path starts with `prefix`; panics (listing what came) otherwise.
    pub fn only_request_to(&self, prefix: &str) -> Seen {
        let mut seen = self.requests_to(prefix);
        assert_eq!(
            seen.len(),
            1,
            "{}: expected exactly one request to {prefix}, got {:#?}",
            self.name,
            self.requests()
        );
        seen.remove(0)
    }

    /// Peers of the connections accepted so far.
    pub fn connections(&self) -> Vec<SocketAddr> {
        self.state.connections.lock().unwrap().clone()
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The runtime only waits for its own tasks, which stop with it: this returns promptly.
            let _ = thread.join();
        }
    }
}

impl Seen {
    /// The first value of header `name`, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl BodyRecord {
    pub fn set(&self, outcome: BodyOutcome) {
        self.state.requests.lock().unwrap()[self.index].body = outcome;
    }

    pub fn outcome(&self) -> BodyOutcome {
        self.state.requests.lock().unwrap()[self.index].body.clone()
    }
}

impl AppState {
    fn record(self: &Arc<Self>, req: &Request<Incoming>, peer: SocketAddr) -> BodyRecord {
        let seen = Seen {
            method: req.method().clone(),
            target: req.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned(),
            authority: req.uri().authority().map(|a| a.as_str().to_owned()),
            version: req.version(),
            headers: req.headers().clone(),
            peer,
            body: BodyOutcome::Reading,
        };
        let mut requests = self.requests.lock().unwrap();
        requests.push(seen);
        BodyRecord {
            state: self.clone(),
            index: requests.len() - 1,
        }
    }

    /// Counts a request for `path`; returns how many there have been, this one included.
    fn hit(&self, path: &str) -> u32 {
        let mut hits = self.hits.lock().unwrap();
        let count = hits.entry(path.to_owned()).or_default();
        *count += 1;
        *count
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<AppState>, mut stop: oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("registering the listener");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(_) => {
                // E.g. too many open files: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        state.connections.lock().unwrap().push(peer);
        // As gRPC and HTTP servers do: without it, a response written in pieces (headers, then
        // body and trailers) waits on Nagle for the peer's delayed ACK, ~40 ms per call.
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), peer, req));
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            // A connection error (e.g. the proxy resetting a request) ends the connection; the
            // request's record says what the handler saw.
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: Arc<AppState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    let record = state.record(&req, peer);
    let path = req.uri().path().to_owned();
    if req.headers().contains_key(header::UPGRADE) {
        record.set(BodyOutcome::Untouched);
        return Ok(upgrade(req));
    }
    if let Some(method) = path.strip_prefix(super::grpc::SERVICE_PREFIX) {
        let method = method.to_owned();
        return Ok(super::grpc::serve(&method, req, record).await);
    }
    let (method, target, version) = (
        req.method().clone(),
        req.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned(),
        req.version(),
    );
    let Some(digest) = read_body(req.into_body(), &record).await else {
        return Ok(plain(
            StatusCode::BAD_REQUEST,
            version,
            &state.name,
            "request body failed\n".into(),
        ));
    };

    if let Some(ms) = segment_after(&path, "/slow/") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(failures) = segment_after(&path, "/fail-first/") {
        if u64::from(state.hit(&path)) <= failures {
            return Ok(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                version,
                &state.name,
                "unavailable\n".into(),
            ));
        }
    }
    if path.starts_with("/always-503") {
        state.hit(&path);
        return Ok(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            version,
            &state.name,
            "unavailable\n".into(),
        ));
    }
    let body = format!("{} {method} {target} {digest}\n", state.name);
    let mut rsp = plain(StatusCode::OK, version, &state.name, body);
    let headers = rsp.headers_mut();
    headers.insert("x-body-len", HeaderValue::from(digest.len));
    headers.insert("x-body-hash", format!("{:016x}", digest.hash).parse().unwrap());
    Ok(rsp)
}

/// Reads a request body to its end, digesting it; records the outcome.
pub async fn read_body(mut body: Incoming, record: &BodyRecord) -> Option<StreamDigest> {
    let mut hasher = StreamHasher::new();
    let mut start = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    let keep = KEEP_BODY_BYTES.saturating_sub(start.len()).min(data.len());
                    start.extend_from_slice(&data[..keep]);
                }
            }
            Err(error) => {
                record.set(BodyOutcome::Failed(error.to_string()));
                return None;
            }
        }
    }
    let digest = hasher.digest();
    record.set(BodyOutcome::Complete { digest, start });
    Some(digest)
}

/// A text answer with the app's headers (and hop-by-hop ones on HTTP/1).
fn plain(status: StatusCode, version: Version, name: &str, body: String) -> Response<AppBody> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)).boxed());
    *rsp.status_mut() = status;
    let headers = rsp.headers_mut();
    headers.insert("x-app", name.parse().expect("app names are header-safe"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if version != Version::HTTP_2 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-resp-hop"));
        headers.insert("x-resp-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=30"));
    }
    rsp
}

/// `101` with the request's protocol; then a banner and an echo on the raw connection.
fn upgrade(mut req: Request<Incoming>) -> Response<AppBody> {
    let protocol = req.headers()[header::UPGRADE].clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let io = TokioIo::new(upgraded);
        let (mut reader, mut writer) = tokio::io::split(io);
        // The server speaks first, so the test sees bytes flow towards the client on their own.
        if writer.write_all(b"tunnel-open\n").await.is_err() {
            return;
        }
        if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
            let _ = writer.shutdown().await;
        }
    });
    let mut rsp = Response::new(Empty::new().boxed());
    *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    rsp.headers_mut().insert(header::UPGRADE, protocol);
    rsp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    rsp
}

/// `/slow/250/x` with prefix `/slow/` → 250.
fn segment_after(path: &str, prefix: &str) -> Option<u64> {
    path.strip_prefix(prefix)?.split('/').next()?.parse().ok()
}
