//! Fixtures shared by the criterion benches (`benches/*.rs`) and the allocation test
//! (`tests/no_alloc.rs`): criterion's settings, generated route files with the requests that
//! probe them, and a tiny loopback upstream.
//!
//! Run the suite with `cargo bench -p pillion-benches` (about 1.5 minutes of benches on 2 cores once
//! built; figures and their reading are in `docs/performance.md`). For CI, `PILLION_BENCH_QUICK=1`
//! cuts every bench to a fraction of a second: the point there is that the benches keep compiling
//! and running, never a verdict on speed.
//!
//! Every bench measures the CPU time of the benchmarking thread ([`ThreadCpuTime`]), not wall
//! time: the machines we measure on are shared and stall at random, and time spent descheduled is
//! not a cost of the code under test.

use std::{convert::Infallible, fmt::Write, net::SocketAddr, time::Duration};

use bytes::Bytes;
use criterion::{
    Criterion,
    measurement::{Measurement, ValueFormatter, WallTime},
};
use http::{Request, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use pillion_proxy::{
    http::metrics::HttpMetrics,
    policy::{self, Policy},
};
use tokio::net::TcpListener;

/// The destination every generated route file configures (as a client's `Host`, no port: 80).
pub const AUTHORITY: &str = "web.default.svc.cluster.local";

/// The upstream's answer: 12 bytes, the body size of the load comparison's reference figures.
pub const BODY: &[u8; 12] = b"hello world\n";

/// Set to `1` for CI: tiny warm-up and measurement times, fewer resamples.
pub const QUICK_ENV: &str = "PILLION_BENCH_QUICK";

/// Whether the quick (CI) mode was asked for.
pub fn quick() -> bool {
    std::env::var(QUICK_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// CPU time (user + system) consumed by the calling thread, as criterion's measurement.
///
/// The benches run everything on that one thread (a current-thread runtime serves client, proxy
/// and upstream alike), so this is the whole cost of the work, kernel time for loopback sockets
/// included, and none of the time the thread spent waiting for a CPU.
pub struct ThreadCpuTime;

/// The suite's criterion, measuring [`ThreadCpuTime`].
pub type Bench = Criterion<ThreadCpuTime>;

/// The calling thread's CPU time so far (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; this clock exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Formats values as durations, exactly as for wall time.
static DURATION_FORMAT: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_time()
    }

    fn end(&self, start: Duration) -> Duration {
        thread_cpu_time().saturating_sub(start)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        DURATION_FORMAT.formatter()
    }
}

/// Criterion's settings for every bench in the suite. Command-line flags (`--quick`,
/// `--measurement-time`, a name filter...) still apply on top: `criterion_group!` reads them last.
pub fn criterion() -> Bench {
    // Plots cost seconds per bench and nobody reads them on a server; `--plotting-backend`
    // turns them back on.
    let c = Criterion::default().with_measurement(ThreadCpuTime).without_plots();
    if quick() {
        c.warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200))
            .sample_size(10)
            .nresamples(5_000)
    } else {
        c.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(50)
    }
}

/// The connection's original destination in route lookups: no route file entry names it, so
/// only the authority can select the destination.
pub fn original_dst() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 7], 80))
}

/// A route file with `n` routes on [`AUTHORITY`], cycling through the match kinds real configs
/// use: exact path, path prefix, prefix + method, prefix + header.
///
/// The last route is always a bare prefix. Rules are tried in Gateway API precedence order
/// (exact paths, then longer prefixes, then those with a method, then those with more headers,
/// then file order), so with every prefix the same length it is the very last rule tried:
/// a request for it pays for the whole scan.
pub fn routes_yaml(n: usize) -> String {
    assert!(n > 0, "a route file for benches needs at least one route");
    let mut yaml = format!("destinations:\n  - destination: {AUTHORITY}:80\n    routes:\n");
    for i in 0..n {
        let kind = if i == n - 1 { 1 } else { i % 4 };
        let name = route_name(i);
        let prefix = svc_prefix(i);
        // Writing into a String cannot fail.
        let _ = match kind {
            0 => write!(
                yaml,
                "      - name: {name}\n        matches:\n          - path: {{ type: Exact, value: {prefix}/items }}\n"
            ),
            1 => write!(
                yaml,
                "      - name: {name}\n        matches:\n          - path: {{ type: PathPrefix, value: {prefix} }}\n"
            ),
            2 => write!(
                yaml,
                "      - name: {name}\n        matches:\n          - path: {{ type: PathPrefix, value: {prefix} }}\n            method: POST\n"
            ),
            _ => write!(
                yaml,
                "      - name: {name}\n        matches:\n          - path: {{ type: PathPrefix, value: {prefix} }}\n            headers: [{{ name: x-tenant, value: tenant-{i:04} }}]\n"
            ),
        };
    }
    yaml
}

/// The name of the `i`th generated route (its `route` metric label).
pub fn route_name(i: usize) -> String {
    format!("route-{i:04}")
}

fn svc_prefix(i: usize) -> String {
    format!("/api/v1/svc-{i:04}")
}

/// Parses and compiles the generated file with `n` routes.
pub fn compiled_policy(n: usize, metrics: &HttpMetrics) -> Policy {
    let file = policy::parse(&routes_yaml(n), "routes.yaml").expect("generated route file parses");
    Policy::compile(file, metrics).expect("generated route file compiles")
}

/// A typical GET with a few ordinary headers.
fn request(path: &str) -> Request<()> {
    Request::get(path)
        .header("host", AUTHORITY)
        .header("user-agent", "curl/8.5.0")
        .header("accept", "*/*")
        .header("x-request-id", "5f0c8a3e-8c1e-4b8e-9d53-0d6c2a1b7f42")
        .body(())
        .expect("valid request")
}

/// A request that only the last rule tried (the last route of [`routes_yaml`]) matches.
pub fn last_route_request(n: usize) -> Request<()> {
    request(&format!("{}/items/42", svc_prefix(n - 1)))
}

/// A request no rule matches: it shares every prefix's first bytes, so each comparison reads
/// as far as it can before failing, then falls to the default route.
pub fn unmatched_request() -> Request<()> {
    request("/api/v1/svc-9999/items/42")
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on a loopback port, answering every request
/// with [`BODY`]. Must be called inside a Tokio runtime, which then runs the server.
pub async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_requests_land_where_the_benches_say() {
        for n in [1, 10, 100, 1_000] {
            let metrics = HttpMetrics::register(&mut Default::default());
            let policy = compiled_policy(n, &metrics);
            let dst = policy.destination(Some(AUTHORITY), original_dst());
            assert_eq!(&*dst.route(&last_route_request(n)).name, route_name(n - 1), "n = {n}");
            assert_eq!(
                &*dst.route(&unmatched_request()).name,
                pillion_proxy::policy::DEFAULT_ROUTE
            );
        }
    }

    #[test]
    fn every_match_kind_is_generated() {
        let yaml = routes_yaml(8);
        for kind in ["type: Exact", "type: PathPrefix", "method: POST", "x-tenant"] {
            assert!(yaml.contains(kind), "{kind} missing from\n{yaml}");
        }
    }
}
