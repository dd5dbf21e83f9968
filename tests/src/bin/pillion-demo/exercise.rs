//! The client app's traffic, and the checks that make the demo a smoke test.
//!
//! Whatever the topology ([`LocalMesh`]), the client app sends plaintext: HTTP/1.1 GETs on
//! fresh connections, gRPC calls over one HTTP/2 connection, and (where the server has an echo
//! port) a raw TCP exchange. Then the demo checks, from the proxies' own admin ports, that
//! every answer came back, that each proxy holds the identity its token vouches for, and that
//! the server's proxy saw the client's SPIFFE ID on mTLS and nothing in plaintext.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use pillion_tests::http_peers::{grpc, raw};
use pillion_tests::sidecar::AdminPort;

/// A running local mesh, whichever way it was built.
pub trait LocalMesh {
    /// How the report names the two sides, e.g. `pod/client`.
    fn client_name(&self) -> &str;
    fn server_name(&self) -> &str;
    fn client_admin(&self) -> AdminPort<'_>;
    fn server_admin(&self) -> AdminPort<'_>;
    /// Runs `f` where the client app runs: in the client pod's namespace, or right here.
    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T;
    /// Where the client app sends HTTP and gRPC.
    fn http_target(&self) -> SocketAddr;
    /// The `Host` / `:authority` it uses: the server's address as the app knows it.
    fn authority(&self) -> String;
    /// Where it sends raw TCP, if the server has an echo port.
    fn tcp_target(&self) -> Option<SocketAddr>;
    /// Shell commands to poke at the running mesh.
    fn poke_commands(&self) -> Vec<String>;
}

/// What the client app saw.
#[derive(Debug, Default)]
pub struct Traffic {
    /// One line per kind of call, for the output.
    pub lines: Vec<String>,
    pub failures: Vec<String>,
    pub http_requests: usize,
    pub grpc_calls: usize,
}

const HTTP_PATHS: [&str; 2] = ["/hello", "/api/items"];
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `requests` GETs to each of [`HTTP_PATHS`], `requests / 2` gRPC calls plus one to a
/// missing method, and one TCP echo; collects what came back.
pub fn send<M: LocalMesh>(mesh: &M, requests: usize) -> Traffic {
    let mut traffic = Traffic::default();
    let (target, authority) = (mesh.http_target(), mesh.authority());

    for path in HTTP_PATHS {
        let authority = authority.clone();
        let results = mesh.in_client(move || {
            (0..requests)
                .map(|_| http_get(target, &authority, path))
                .collect::<Vec<_>>()
        });
        let mut latencies = Vec::new();
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for result in results {
            match result {
                Ok((200, elapsed)) => {
                    latencies.push(elapsed);
                    *statuses.entry(200).or_default() += 1;
                }
                Ok((status, _)) => {
                    *statuses.entry(status).or_default() += 1;
                    traffic.failures.push(format!("GET {path}: HTTP {status}"));
                }
                Err(e) => traffic.failures.push(format!("GET {path}: {e}")),
            }
        }
        traffic.http_requests += requests;
        let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{s} ×{n}")).collect();
        traffic.lines.push(format!(
            "HTTP/1.1 GET {path:<11} ×{requests} → {}  (client app's view: {})",
            statuses.join(", "),
            latency_summary(&mut latencies)
        ));
    }

    let calls = (requests / 2).max(1);
    let grpc_result = mesh.in_client(move || grpc_calls(target, &authority, calls));
    traffic.grpc_calls = calls + 1;
    match grpc_result {
        Ok((mut latencies, missing_status)) => {
            traffic.lines.push(format!(
                "gRPC     pillion.test.Echo/Unary ×{calls} → OK ×{calls}  (client app's view: {})",
                latency_summary(&mut latencies)
            ));
            traffic.lines.push(format!(
                "gRPC     pillion.test.Echo/Missing ×1 → grpc-status {missing_status} (NOT_FOUND, from the app)"
            ));
            if missing_status != "5" {
                traffic
                    .failures
                    .push(format!("gRPC Missing: grpc-status {missing_status}, expected 5"));
            }
        }
        Err(e) => traffic.failures.push(format!("gRPC: {e}")),
    }

    if let Some(tcp) = mesh.tcp_target() {
        let started = Instant::now();
        match mesh.in_client(move || tcp_echo(tcp)) {
            Ok(()) => traffic
                .lines
                .push(format!("TCP      {tcp} echo ×1 → ok ({})", millis(started.elapsed()))),
            Err(e) => traffic.failures.push(format!("TCP echo via {tcp}: {e}")),
        }
    }
    traffic
}

/// `GET path` on a fresh connection; the status and the time to the whole response.
fn http_get(target: SocketAddr, authority: &str, path: &str) -> Result<(u16, Duration), String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT).map_err(|e| format!("connect {target}: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let request = raw::get(
        path,
        authority,
        &[("connection", "close"), ("user-agent", "pillion-demo")],
    );
    let response = raw::exchange(&mut stream, &request).map_err(|e| e.to_string())?;
    Ok((response.status, started.elapsed()))
}

/// `calls` Unary calls and one Missing call over one HTTP/2 connection; the Unary latencies and
/// the Missing call's grpc-status.
fn grpc_calls(target: SocketAddr, authority: &str, calls: usize) -> Result<(Vec<Duration>, String), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let mut client = grpc::connect(target).await?;
            let mut latencies = Vec::new();
            for i in 0..calls {
                let message = format!("hello {i}");
                let reply = grpc::unary(&mut client, authority, "Unary", &message).await?;
                if reply.grpc_status() != Some("0") || reply.messages != [format!("echo:{message}")] {
                    return Err(format!("Unary: {reply:?}"));
                }
                latencies.push(reply.elapsed);
            }
            let missing = grpc::unary(&mut client, authority, "Missing", "anyone?").await?;
            let status = missing.grpc_status().unwrap_or("none").to_owned();
            Ok((latencies, status))
        })
        .await
        .map_err(|_| "gRPC calls did not finish within 30 s".to_string())?
    })
}

fn tcp_echo(target: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    // A leading NUL byte: no protocol starts with it, so the proxy forwards at once as opaque TCP.
    let message = b"\0hello over mesh TLS";
    stream.write_all(message).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    match back == message {
        true => Ok(()),
        false => Err(format!("echo mismatch: {back:?}")),
    }
}

/// `p50 1.2 ms, max 3.4 ms`.
fn latency_summary(latencies: &mut [Duration]) -> String {
    if latencies.is_empty() {
        return "no successful requests".into();
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    format!("p50 {}, max {}", millis(p50), millis(max))
}

pub fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
