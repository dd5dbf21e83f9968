//! The whole HTTP stack in process: a client on one end of an in-memory stream, [`HttpProxy`]
//! serving the other end, and a real upstream server on loopback.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    net::TcpListener,
};

use super::{HttpProxy, HttpSettings, upstream::Pool, upstream::Version};
use crate::{
    drain::Drain,
    metrics::{Direction, Metrics},
    policy::{self, Policy},
    transport::ConnectSettings,
};

type UpBody = BoxBody<Bytes, Infallible>;
type Handler = Arc<dyn Fn(Request<Incoming>, usize) -> Response<UpBody> + Send + Sync>;

/// A loopback HTTP/1+HTTP/2 server that counts requests; `handler` gets the request number.
async fn upstream(handler: Handler) -> (SocketAddr, Arc<AtomicUsize>) {
    upstream_after(handler, Duration::ZERO).await
}

/// [`upstream`], answering every request `delay` late (a slow endpoint).
async fn upstream_after(handler: Handler, delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let delay_all = delay;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (handler, seen) = (handler.clone(), seen.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    async move {
                        // `x-delay-ms` makes the upstream slow without blocking the runtime.
                        let slow = delay_all;
                        let delay = req
                            .headers()
                            .get("x-delay-ms")
                            .and_then(|v| v.to_str().ok()?.parse().ok());
                        let delay = delay.unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(delay) + slow).await;
                        Ok::<_, Infallible>(handler(req, n))
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, count)
}

fn text(status: u16, body: &'static str) -> Response<UpBody> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
    rsp
}

struct Proxy {
    metrics: Arc<Metrics>,
}

/// Starts the proxy's HTTP stack for one client connection to `dst` with `routes` (YAML).
fn proxy(routes: &str, version: Version, dst: SocketAddr) -> (DuplexStream, Proxy) {
    proxy_with_idle_timeout(routes, version, dst, Duration::from_secs(10))
}

fn proxy_with_idle_timeout(
    routes: &str,
    version: Version,
    dst: SocketAddr,
    idle_timeout: Duration,
) -> (DuplexStream, Proxy) {
    proxy_in(Direction::Outbound, routes, version, dst, idle_timeout)
}

fn proxy_in(
    direction: Direction,
    routes: &str,
    version: Version,
    dst: SocketAddr,
    idle_timeout: Duration,
) -> (DuplexStream, Proxy) {
    let metrics = Arc::new(Metrics::new());
    let policy = Policy::compile(policy::parse(routes, "routes.yaml").unwrap(), &metrics.http).unwrap();
    let http = HttpProxy {
        direction,
        policy: Arc::new(ArcSwap::from_pointee(policy)),
        pool: Arc::new(Pool::new(
            ConnectSettings {
                timeout: Duration::from_secs(1),
                keepalive: Duration::from_secs(10),
            },
            None,
            metrics.tcp(Direction::Outbound),
        )),
        settings: HttpSettings {
            idle_timeout,
            max_header_bytes: 16 * 1024,
            access_log: true,
        },
        drain: Drain::new(),
        tcp: metrics.tcp(Direction::Outbound),
    };
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer: SocketAddr = "10.0.0.1:5555".parse().unwrap();
    tokio::spawn(async move { http.serve(server, version, dst, peer, None, None).await });
    (client, Proxy { metrics })
}

impl Proxy {
    fn metric(&self, line_prefix: &str) -> u64 {
        let text = self.metrics.encode();
        text.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }
}

async fn h1_client(io: DuplexStream) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    tx
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).header("host", "web").body(Full::default()).unwrap()
}

async fn body_of(rsp: Response<Incoming>) -> String {
    String::from_utf8(rsp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

const API_ROUTE: &str = r#"
destinations:
  - destination: web:80
    routes:
      - name: api
        matches: [{ path: { value: /api } }]
"#;

#[tokio::test]
async fn http1_is_proxied_and_counted_under_its_route() {
    let (addr, hits) = upstream(Arc::new(|req, _| {
        assert_eq!(req.headers()["host"], "web", "Host is kept");
        assert!(!req.headers().contains_key("x-hop"), "hop-by-hop header removed");
        text(200, "hello")
    }))
    .await;
    let (io, proxy) = proxy(API_ROUTE, Version::Http1, addr);
    let mut client = h1_client(io).await;
    for _ in 0..3 {
        let req = Request::get("/api/x")
            .header("host", "web")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .body(Full::default())
            .unwrap();
        let rsp = client.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), 200);
        assert_eq!(body_of(rsp).await, "hello");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(
        proxy.metric(r#"pillion_http_requests_total{direction="outbound",route="api",status_code="200"}"#),
        3
    );
}

async fn h2_client(io: DuplexStream) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

#[tokio::test]
async fn http2_keeps_authority_and_delivers_trailers() {
    let (addr, _) = upstream(Arc::new(|req, _| {
        assert_eq!(req.version(), http::Version::HTTP_2);
        assert_eq!(req.uri().authority().map(|a| a.as_str()), Some("web"));
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = Full::new(Bytes::from_static(b"reply"))
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        Response::new(body)
    }))
    .await;
    let (io, proxy) = proxy(API_ROUTE, Version::Http2, addr);
    let mut client = h2_client(io).await;
    // Several concurrent streams over the one client connection.
    let mut calls = Vec::new();
    for _ in 0..4 {
        let req = Request::post("http://web/api/call")
            .header("content-type", "application/grpc")
            .body(Full::default())
            .unwrap();
        calls.push(client.send_request(req));
    }
    for call in calls {
        let rsp = call.await.unwrap();
        let collected = rsp.into_body().collect().await.unwrap();
        assert_eq!(
            collected.trailers().map(|t| t["grpc-status"].clone()),
            Some("0".parse().unwrap())
        );
        assert_eq!(collected.to_bytes(), "reply");
    }
    assert_eq!(
        proxy.metric(r#"pillion_http_requests_total{direction="outbound",route="api",status_code="200"}"#),
        4
    );
    assert_eq!(
        proxy.metric(r#"pillion_grpc_requests_total{direction="outbound",route="api",grpc_status="OK"}"#),
        4
    );
}

const RETRY_ROUTE: &str = r#"
destinations:
  - destination: web:80
    routes:
      - name: retried
        retry: { codes: [503], attempts: 2, backoff: 1ms }
"#;

#[tokio::test]
async fn a_503_is_retried_and_the_body_replayed() {
    let (addr, hits) = upstream(Arc::new(|req, n| {
        if n == 0 {
            return text(503, "busy");
        }
        assert_eq!(req.headers()["content-length"], "7");
        text(200, "second")
    }))
    .await;
    let (io, proxy) = proxy(RETRY_ROUTE, Version::Http1, addr);
    let mut client = h1_client(io).await;
    let req = Request::post("/submit")
        .header("host", "web")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let rsp = client.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(body_of(rsp).await, "second");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        proxy.metric(r#"pillion_http_retries_total{direction="outbound",route="retried"}"#),
        1
    );
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    const ROUTE: &str = r#"
destinations:
  - destination: web:80
    retryBudget: { percent: 10, minRetriesPerSecond: 1, ttl: 1s }
    routes:
      - name: storm
        retry: { codes: [503], attempts: 3, backoff: 0s }
"#;
    let (addr, hits) = upstream(Arc::new(|_, _| text(503, "down"))).await;
    let (io, proxy) = proxy(ROUTE, Version::Http1, addr);
    let mut client = h1_client(io).await;
    const REQUESTS: usize = 100;
    for _ in 0..REQUESTS {
        let rsp = client.send_request(get("/")).await.unwrap();
        // Budget exhausted: the client gets the upstream's real answer, not a synthetic one.
        assert_eq!(rsp.status(), 503);
        assert!(!rsp.headers().contains_key("pillion-proxy-error"));
        body_of(rsp).await;
    }
    let attempts = hits.load(Ordering::SeqCst);
    // Without a budget: 400 attempts. With it: the requests, 10% of them, and a small reserve.
    assert!(
        (REQUESTS..=REQUESTS + 20).contains(&attempts),
        "upstream saw {attempts} attempts"
    );
    assert!(proxy.metric(r#"pillion_http_retry_budget_exhausted_total{direction="outbound",route="storm"}"#) > 0);
}

#[tokio::test]
async fn a_slow_attempt_times_out_with_504() {
    const ROUTE: &str = r#"
destinations:
  - destination: web:80
    routes:
      - name: slow
        timeouts: { backendRequest: 100ms }
"#;
    let (addr, _) = upstream(Arc::new(|_, _| text(200, "late"))).await;
    let (io, proxy) = proxy(ROUTE, Version::Http1, addr);
    let mut client = h1_client(io).await;
    let mut req = get("/");
    req.headers_mut().insert("x-delay-ms", "400".parse().unwrap());
    let rsp = client.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 504);
    assert_eq!(rsp.headers()["pillion-proxy-error"], "backend request timeout");
    assert_eq!(
        proxy.metric(r#"pillion_http_timeouts_total{direction="outbound",route="slow"}"#),
        1
    );
}

#[tokio::test]
async fn an_unreachable_upstream_is_502_or_unavailable_for_grpc() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (io, _proxy) = proxy("", Version::Http1, closed);
    let mut client = h1_client(io).await;
    let rsp = client.send_request(get("/")).await.unwrap();
    assert_eq!(rsp.status(), 502);
    assert_eq!(rsp.headers()["pillion-proxy-error"], "upstream unreachable");
    body_of(rsp).await;

    let req = Request::post("/pkg.Svc/Method")
        .header("host", "web")
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let rsp = client.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["grpc-status"], "14");
}

/// Writes raw bytes and returns everything the proxy answers until it closes.
async fn raw_exchange(mut io: DuplexStream, request: &[u8]) -> String {
    io.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn smuggling_shaped_requests_are_refused_before_forwarding() {
    let (addr, hits) = upstream(Arc::new(|_, _| text(200, "ok"))).await;
    let conflicting = b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!";
    let (io, _) = proxy("", Version::Http1, addr);
    let answer = raw_exchange(io, conflicting).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let cl_te = b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n";
    let (io, _) = proxy("", Version::Http1, addr);
    let answer = raw_exchange(io, cl_te).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("ambiguous request framing"), "{answer}");

    let bad_chunk = b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    let (io, _) = proxy("", Version::Http1, addr);
    let answer = raw_exchange(io, bad_chunk).await;
    assert!(!answer.contains(" 200 "), "{answer}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the upstream complete");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (addr, hits) = upstream(Arc::new(|_, _| text(200, "ok"))).await;
    let (io, _) = proxy("", Version::Http1, addr);
    let big = "a".repeat(20 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: web\r\nX-Big: {big}\r\n\r\n");
    let answer = raw_exchange(io, request.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_upgrade_becomes_a_byte_tunnel() {
    let (addr, _) = upstream(Arc::new(|mut req, _| {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(on_upgrade.await.unwrap());
            let mut buf = [0u8; 4];
            io.read_exact(&mut buf).await.unwrap();
            io.write_all(&buf).await.unwrap();
            io.write_all(b"!").await.unwrap();
        });
        let mut rsp = text(101, "");
        rsp.headers_mut().insert("upgrade", "echo".parse().unwrap());
        rsp.headers_mut().insert("connection", "upgrade".parse().unwrap());
        rsp
    }))
    .await;
    let (mut io, _) = proxy("", Version::Http1, addr);
    io.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    io.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping!");
}

#[tokio::test]
async fn a_large_body_streams_through_both_ways() {
    let (addr, _) = upstream(Arc::new(|req, _| {
        // Echo the request body back as a stream.
        Response::new(req.into_body().map_err(|_| unreachable!()).boxed())
    }))
    .await;
    let (io, _) = proxy("", Version::Http1, addr);
    let mut client = h1_client(io).await;
    let payload: Bytes = (0..16 * 1024 * 1024u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    let req = Request::post("/echo")
        .header("host", "web")
        .body(Full::new(payload.clone()))
        .unwrap();
    let rsp = client.send_request(req).await.unwrap();
    let got = rsp.into_body().collect().await.unwrap().to_bytes();
    assert!(got == payload, "echoed body differs ({} bytes back)", got.len());
}

#[tokio::test]
async fn http1_clients_that_stall_mid_head_or_idle_are_closed_but_slow_answers_are_not() {
    const IDLE: Duration = Duration::from_millis(200);
    const NEVER: Duration = Duration::from_secs(10);
    let (up, _) = upstream(Arc::new(|_, _| text(200, "ok"))).await;

    // Half a head, then silence: closed, and nothing forwarded.
    let (mut client, _proxy) = proxy_with_idle_timeout(API_ROUTE, Version::Http1, up, IDLE);
    client.write_all(b"GET /api HTTP/1.1\r\nhost: web\r\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(NEVER, client.read_to_end(&mut got))
        .await
        .expect("a stalled head is timed out")
        .unwrap();
    assert!(!got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));

    // An upstream slower than the idle timeout: the request in flight is not cut off, and the
    // connection, idle afterwards, is closed after the timeout (once per head, timer reused).
    let (mut client, _proxy) = proxy_with_idle_timeout(API_ROUTE, Version::Http1, up, IDLE);
    for _ in 0..2 {
        client
            .write_all(b"GET /api HTTP/1.1\r\nhost: web\r\nx-delay-ms: 500\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(NEVER, client.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        let mut rest = Vec::new();
        while !rest.ends_with(b"\r\n\r\nok") {
            let mut chunk = [0u8; 256];
            let n = tokio::time::timeout(NEVER, client.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&rest));
            rest.extend_from_slice(&chunk[..n]);
        }
    }
    let mut got = Vec::new();
    tokio::time::timeout(NEVER, client.read_to_end(&mut got))
        .await
        .expect("an idle keep-alive connection is closed")
        .unwrap();
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
}

/// A loopback app that reads requests and never answers; counts the bytes it received.
async fn silent_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    count.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn an_endless_chunk_extension_gets_400_and_a_close_long_before_it_ends() {
    const TOTAL: usize = 64 << 20;
    let (addr, received) = silent_upstream().await;
    let (io, _) = proxy("", Version::Http1, addr);
    let (mut rd, mut wr) = tokio::io::split(io);
    let writer = tokio::spawn(async move {
        let head = b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n1;";
        let mut written = 0;
        if wr.write_all(head).await.is_ok() {
            let filler = vec![b'a'; 64 * 1024];
            while written < TOTAL && wr.write_all(&filler).await.is_ok() {
                written += filler.len();
            }
        }
        written
    });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut answer))
        .await
        .expect("the connection is closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("pillion-proxy-error: chunk extensions too long\r\n"),
        "{answer}"
    );
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    let written = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the client's writes fail once the connection is gone")
        .unwrap();
    // At most the bounded line, a read, and the in-memory pipe (64 KiB) before the close.
    assert!(written < 512 * 1024, "the client wrote {written} of {TOTAL} bytes");
    // The head went upstream (hyper streams bodies); the unfinished line never did.
    assert!(received.load(Ordering::SeqCst) < 1024);
}

/// Reads one response with a `content-length` body off a raw connection.
async fn read_response(io: &mut DuplexStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut byte))
            .await
            .expect("a response")
            .unwrap();
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let length = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")?
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    io.read_exact(&mut body).await.unwrap();
    text + &String::from_utf8_lossy(&body)
}

const SMUGGLE: &[u8] = b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n";

#[tokio::test]
async fn an_upgrade_the_app_refuses_leaves_the_framing_guard_on() {
    // The app ignores Upgrade and answers as to any request.
    let (addr, hits) = upstream(Arc::new(|_, _| text(200, "plain"))).await;
    let (mut io, _) = proxy("", Version::Http1, addr);
    io.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut io).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("plain"), "{answer}");
    // Same connection: still HTTP/1, still guarded.
    let answer = raw_exchange(io, SMUGGLE).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("ambiguous request framing"), "{answer}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "only the upgrade request reached the app"
    );
}

#[tokio::test]
async fn an_upgrade_the_proxy_answers_itself_leaves_the_framing_guard_on() {
    // Nothing listens: the upgrade request gets the proxy's 502, and the guard reads on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let (mut io, _) = proxy("", Version::Http1, closed);
    io.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut io).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    let answer = raw_exchange(io, SMUGGLE).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[tokio::test]
async fn an_accepted_upgrade_gets_the_bytes_sent_before_the_101() {
    let (addr, _) = upstream(Arc::new(|mut req, _| {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(on_upgrade.await.unwrap());
            let mut buf = [0u8; 4];
            io.read_exact(&mut buf).await.unwrap();
            io.write_all(&buf).await.unwrap();
        });
        let mut rsp = text(101, "");
        rsp.headers_mut().insert("upgrade", "echo".parse().unwrap());
        rsp.headers_mut().insert("connection", "upgrade".parse().unwrap());
        rsp
    }))
    .await;
    let (mut io, _) = proxy("", Version::Http1, addr);
    // The first tunnel bytes go with the request: the guard holds them until the 101.
    io.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nping")
        .await
        .unwrap();
    let head = read_response(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping");
}

#[tokio::test]
async fn an_h2c_upgrade_is_forwarded_as_plain_http1() {
    // An app that switches to h2c whenever it is offered; otherwise lists the headers it got.
    let (addr, hits) = upstream(Arc::new(|req, _| {
        if req.headers().get("upgrade").is_some_and(|v| v == "h2c") {
            let mut rsp = text(101, "");
            rsp.headers_mut().insert("upgrade", "h2c".parse().unwrap());
            rsp.headers_mut().insert("connection", "upgrade".parse().unwrap());
            return rsp;
        }
        let names: Vec<&str> = req.headers().keys().map(|k| k.as_str()).collect();
        let mut rsp = Response::new(Full::new(Bytes::from(names.join(","))).boxed());
        *rsp.status_mut() = StatusCode::OK;
        rsp
    }))
    .await;
    let (mut io, proxy) = proxy(API_ROUTE, Version::Http1, addr);
    io.write_all(
        b"GET /api/x HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_response(&mut io).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = answer.rsplit("\r\n\r\n").next().unwrap().to_owned();
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(!seen.split(',').any(|n| n == name), "the app got {name}: {seen}");
    }
    // The connection is still HTTP/1: the next request is routed and counted, and still guarded.
    io.write_all(b"GET /api/y HTTP/1.1\r\nHost: web\r\n\r\n").await.unwrap();
    let answer = read_response(&mut io).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = raw_exchange(io, SMUGGLE).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        proxy.metric(r#"pillion_http_requests_total{direction="outbound",route="api",status_code="200"}"#),
        2
    );
}

/// Three endpoints of `web:80`, the client dialling none of them (as an app dials a ClusterIP).
fn balanced_routes(endpoints: &[SocketAddr], extra: &str) -> String {
    let list = endpoints
        .iter()
        .map(|e| format!("{{ address: \"{e}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("destinations:\n  - destination: web:80\n    endpoints: [{list}]\n{extra}")
}

/// An address nothing listens on: connections to it are refused at once.
fn dead_endpoint() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

const CLUSTER_IP: &str = "10.96.0.10:80";

#[tokio::test]
async fn requests_are_balanced_away_from_a_slow_endpoint() {
    let ok: Handler = Arc::new(|_, _| text(200, "ok"));
    let (fast1, hits1) = upstream(ok.clone()).await;
    let (fast2, hits2) = upstream(ok.clone()).await;
    let (slow, slow_hits) = upstream_after(ok, Duration::from_millis(300)).await;
    let routes = balanced_routes(&[fast1, fast2, slow], "");
    let (io, _proxy) = proxy(&routes, Version::Http2, CLUSTER_IP.parse().unwrap());
    let client = h2_client(io).await;
    // 4 callers at once, 40 requests each: concurrency lets in-flight counts matter too.
    let callers = (0..4).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                let req = Request::get("http://web/x").body(Full::default()).unwrap();
                let rsp = client.send_request(req).await.unwrap();
                assert_eq!(rsp.status(), 200);
            }
        })
    });
    for caller in callers {
        caller.await.unwrap();
    }
    let (a, b, s) = (
        hits1.load(Ordering::SeqCst),
        hits2.load(Ordering::SeqCst),
        slow_hits.load(Ordering::SeqCst),
    );
    assert_eq!(a + b + s, 160, "every request reached one endpoint");
    // Before its first answer the slow endpoint looks like any new one, so it gets a few.
    assert!(
        s <= 16,
        "the slow endpoint got {s} of 160 ({a} and {b} to the fast ones)"
    );
    assert!(a >= 30 && b >= 30, "both fast endpoints share the load: {a} and {b}");
}

#[tokio::test]
async fn a_dead_endpoint_costs_a_few_requests_at_most() {
    let (live, live_hits) = upstream(Arc::new(|_, _| text(200, "ok"))).await;
    let routes = balanced_routes(&[live, dead_endpoint()], "");
    let (io, _proxy) = proxy(&routes, Version::Http1, CLUSTER_IP.parse().unwrap());
    let mut client = h1_client(io).await;
    let mut statuses = Vec::new();
    for _ in 0..60 {
        let rsp = client.send_request(get("/x")).await.unwrap();
        statuses.push(rsp.status().as_u16());
        let _ = body_of(rsp).await;
    }
    let failed = statuses.iter().filter(|s| **s == 502).count();
    // A refused connection never makes the endpoint look fast (its estimate keeps the slower
    // value), the live one's answers do: the dead one loses nearly every comparison (it wins
    // one only when the live one has just had a slow answer), and its failures are all in a
    // row, so after 7 accrual takes it out whatever the latencies say.
    assert!((1..=7).contains(&failed), "{failed} requests failed: {statuses:?}");
    assert_eq!(live_hits.load(Ordering::SeqCst), 60 - failed);
}

#[tokio::test]
async fn no_healthy_endpoint_fails_fast_with_503() {
    let routes = balanced_routes(
        &[dead_endpoint(), dead_endpoint()],
        "    loadBalancer: { queueTimeout: 200ms }\n",
    );
    let (io, proxy) = proxy(&routes, Version::Http1, CLUSTER_IP.parse().unwrap());
    let mut client = h1_client(io).await;
    // 14 refused connections trip both endpoints; the next request queues for the queue time
    // (both backoffs outlast it), then gets the proxy's own answer.
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let rsp = client.send_request(get("/x")).await.unwrap();
        statuses.push(rsp.status().as_u16());
        if rsp.status() == 503 {
            assert_eq!(rsp.headers()["pillion-proxy-error"], "no healthy endpoint");
        }
        let _ = body_of(rsp).await;
    }
    assert_eq!(statuses.iter().filter(|s| **s == 502).count(), 14, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    assert_eq!(
        proxy.metric(r#"pillion_balancer_no_healthy_endpoint_total{destination="web:80"}"#),
        1
    );
    assert_eq!(
        proxy.metric(r#"pillion_balancer_queue_seconds_count{destination="web:80"}"#),
        1
    );
    assert_eq!(
        proxy.metric(r#"pillion_balancer_endpoints{destination="web:80",state="backoff"}"#),
        2
    );
    let text = proxy.metrics.encode();
    let per_endpoint = text
        .lines()
        .filter(|l| {
            l.starts_with(r#"pillion_balancer_endpoint_requests_total{destination="web:80",endpoint="127.0.0.1:"#)
        })
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(per_endpoint, ["7", "7"], "{text}");
}

/// What the app saw of one request: version, headers, body and trailers.
fn echo_request() -> Handler {
    Arc::new(|req, _| {
        let version = format!("{:?}", req.version());
        let host = req.headers().get("host").map(|h| h.to_str().unwrap().to_owned());
        let marked = req.headers().contains_key("pillion-orig-proto");
        text_owned(format!("{version} host={host:?} marked={marked}"))
    })
}

fn text_owned(body: String) -> Response<UpBody> {
    Response::new(Full::new(Bytes::from(body)).boxed())
}

#[tokio::test]
async fn a_peer_proxys_http1_request_carried_as_http2_reaches_the_app_as_http1() {
    let (app, _) = upstream(echo_request()).await;
    let (io, _proxy) = proxy_in(Direction::Inbound, "", Version::Http2, app, Duration::from_secs(10));
    let mut client = h2_client(io).await;
    let marked = Request::post("/submit")
        .header("host", "web.shop")
        .header("pillion-orig-proto", "HTTP/1.1")
        .body(Full::new(Bytes::from_static(b"form")))
        .unwrap();
    let rsp = client.send_request(marked).await.unwrap();
    assert_eq!(body_of(rsp).await, r#"HTTP/1.1 host=Some("web.shop") marked=false"#);
    // Unmarked HTTP/2 stays HTTP/2, and a mark that is not a version is dropped, not obeyed.
    let plain = Request::get("http://web.shop/").body(Full::default()).unwrap();
    let rsp = client.send_request(plain).await.unwrap();
    assert_eq!(body_of(rsp).await, "HTTP/2.0 host=None marked=false");
    let bogus = Request::get("http://web.shop/")
        .header("pillion-orig-proto", "HTTP/3")
        .body(Full::default())
        .unwrap();
    let rsp = client.send_request(bogus).await.unwrap();
    assert_eq!(body_of(rsp).await, "HTTP/2.0 host=None marked=false");
}

#[tokio::test]
async fn an_apps_mark_never_leaves_the_outbound_proxy() {
    let (app, _) = upstream(echo_request()).await;
    let (io, _proxy) = proxy(API_ROUTE, Version::Http2, app);
    let mut client = h2_client(io).await;
    let req = Request::get("http://web/api")
        .header("pillion-orig-proto", "HTTP/1.1")
        .body(Full::default())
        .unwrap();
    let rsp = client.send_request(req).await.unwrap();
    assert_eq!(body_of(rsp).await, "HTTP/2.0 host=None marked=false");
}
