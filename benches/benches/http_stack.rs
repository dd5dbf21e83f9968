//! One whole request through the proxy's HTTP stack, in process, against a `direct` baseline.
//!
//! - `http_stack/direct_http1`, `direct_http2`: a hyper client straight to the upstream over
//!   loopback TCP (keep-alive; HTTP/2 with prior knowledge).
//! - `http_stack/proxy_http1`, `proxy_http2`: the same client talking to `HttpProxy::serve` over
//!   an in-memory duplex stream; the proxy forwards to the same upstream over loopback TCP, on a
//!   route with neither timeouts nor retries.
//! - `http_stack/proxy_http1_retry_timeouts`: HTTP/1.1 on a route with a request timeout, a
//!   backend-request timeout and retries (body replay buffer, budget deposit, two timers).
//!
//! Client, proxy and upstream share one current-thread runtime, so each figure is the CPU time of
//! the whole exchange on one core; `proxy_*` minus `direct_*` is what the proxy adds per request.
//! The upstream answers every request with a 12-byte body.

use std::{hint::black_box, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::{BenchmarkGroup, criterion_group, criterion_main};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pillion_benches::{AUTHORITY, BODY, Bench, ThreadCpuTime, thread_cpu_time};
use pillion_proxy::{
    drain::Drain,
    http::{
        HttpProxy, HttpSettings,
        upstream::{Pool, Version},
    },
    metrics::{Direction, Metrics},
    policy::{self, Policy},
    transport::ConnectSettings,
};
use tokio::{io::DuplexStream, net::TcpStream, runtime::Runtime};

// The allocator the `pillion-proxy` binary ships with, so allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

const ROUTES: &str = "
destinations:
  - destination: web.default.svc.cluster.local:80
    routes:
      - name: plain
        matches: [{ path: { type: PathPrefix, value: /plain } }]
      - name: guarded
        matches: [{ path: { type: PathPrefix, value: /guarded } }]
        timeouts: { request: 10s, backendRequest: 2s }
        retry: { codes: [503], attempts: 2, backoff: 25ms }
";

type ReqBody = Empty<Bytes>;

/// A client connection that sends one request and reads the whole response.
trait Client {
    async fn round_trip(&mut self, req: Request<ReqBody>) -> Bytes;
}

impl Client for http1::SendRequest<ReqBody> {
    async fn round_trip(&mut self, req: Request<ReqBody>) -> Bytes {
        self.ready().await.expect("HTTP/1 connection open");
        let rsp = self.send_request(req).await.expect("HTTP/1 response");
        assert_eq!(rsp.status(), StatusCode::OK);
        rsp.into_body().collect().await.expect("HTTP/1 body").to_bytes()
    }
}

impl Client for http2::SendRequest<ReqBody> {
    async fn round_trip(&mut self, req: Request<ReqBody>) -> Bytes {
        self.ready().await.expect("HTTP/2 connection open");
        let rsp = self.send_request(req).await.expect("HTTP/2 response");
        assert_eq!(rsp.status(), StatusCode::OK);
        rsp.into_body().collect().await.expect("HTTP/2 body").to_bytes()
    }
}

fn http1_request(path: &str) -> Request<ReqBody> {
    Request::get(path)
        .header(header::HOST, AUTHORITY)
        .body(Empty::new())
        .expect("valid request")
}

fn http2_request(path: &str) -> Request<ReqBody> {
    Request::get(format!("http://{AUTHORITY}{path}"))
        .body(Empty::new())
        .expect("valid request")
}

/// Starts `HttpProxy::serve` for one client connection headed to `upstream`; returns the
/// client's end. Must run inside the runtime, which then drives the proxy.
fn proxy(version: Version, upstream: SocketAddr) -> DuplexStream {
    let metrics = Metrics::new();
    let file = policy::parse(ROUTES, "routes.yaml").expect("route file parses");
    let policy = Policy::compile(file, &metrics.http).expect("route file compiles");
    let http = HttpProxy {
        direction: Direction::Outbound,
        policy: Arc::new(ArcSwap::from_pointee(policy)),
        // No mesh identity: plaintext to the upstream.
        pool: Arc::new(Pool::new(
            ConnectSettings {
                timeout: Duration::from_secs(1),
                keepalive: Duration::from_secs(10),
            },
            None,
            metrics.tcp(Direction::Outbound),
        )),
        // Longer than the whole suite: an idle client connection must not time out between
        // criterion's phases.
        settings: HttpSettings {
            idle_timeout: Duration::from_secs(600),
            max_header_bytes: 16 * 1024,
            // Off, as by default: a log line per request is a cost of its own.
            access_log: false,
        },
        drain: Drain::new(),
        tcp: metrics.tcp(Direction::Outbound),
    };
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = SocketAddr::from(([10, 0, 0, 1], 5555));
    // `None`: no per-request authorization, as on the outbound side.
    tokio::spawn(async move { http.serve(server, version, upstream, peer, None, None).await });
    client
}

async fn http1_client<I>(io: I) -> http1::SendRequest<ReqBody>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = http1::handshake(TokioIo::new(io)).await.expect("HTTP/1 handshake");
    tokio::spawn(conn);
    tx
}

async fn http2_client<I>(io: I) -> http2::SendRequest<ReqBody>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    tx
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("connect to upstream");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// Times `iters` sequential round trips on `client`, each built by `request`.
fn bench_round_trips<C: Client>(
    group: &mut BenchmarkGroup<'_, ThreadCpuTime>,
    name: &str,
    runtime: &Runtime,
    mut client: C,
    request: impl Fn() -> Request<ReqBody>,
) {
    // Prove the path works (and open the upstream connection) before timing it.
    let body = runtime.block_on(client.round_trip(request()));
    assert_eq!(&body[..], BODY, "{name}");
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = thread_cpu_time();
                for _ in 0..iters {
                    black_box(client.round_trip(request()).await);
                }
                thread_cpu_time() - start
            })
        })
    });
}

fn http_stack(c: &mut Bench) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let upstream = runtime.block_on(pillion_benches::upstream());
    let mut group = c.benchmark_group("http_stack");

    // Each client is made right before its bench, so no connection sits idle for long.
    let client = runtime.block_on(async { http1_client(tcp(upstream).await).await });
    bench_round_trips(&mut group, "direct_http1", &runtime, client, || {
        http1_request("/plain/items")
    });

    let client = runtime.block_on(async { http1_client(proxy(Version::Http1, upstream)).await });
    bench_round_trips(&mut group, "proxy_http1", &runtime, client, || {
        http1_request("/plain/items")
    });

    let client = runtime.block_on(async { http1_client(proxy(Version::Http1, upstream)).await });
    bench_round_trips(&mut group, "proxy_http1_retry_timeouts", &runtime, client, || {
        http1_request("/guarded/items")
    });

    let client = runtime.block_on(async { http2_client(tcp(upstream).await).await });
    bench_round_trips(&mut group, "direct_http2", &runtime, client, || {
        http2_request("/plain/items")
    });

    let client = runtime.block_on(async { http2_client(proxy(Version::Http2, upstream)).await });
    bench_round_trips(&mut group, "proxy_http2", &runtime, client, || {
        http2_request("/plain/items")
    });

    group.finish();
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = http_stack
}
criterion_main!(benches);
