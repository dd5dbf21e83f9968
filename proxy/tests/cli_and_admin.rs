//! The binary as an operator meets it: flags, errors, the admin API and shutdown. Runs on
//! loopback without iptables, so no root is needed.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_pillion-proxy");

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run pillion-proxy")
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A proxy on free loopback ports, killed on drop.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
}

impl Proxy {
    fn start() -> Proxy {
        Proxy::start_with(&[])
    }

    fn start_with(env: &[(&str, String)]) -> Proxy {
        let (admin, inbound, outbound) = (free_addr(), free_addr(), free_addr());
        let child = Command::new(BIN)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("PILLION_ADMIN_ADDR", admin.to_string())
            .env("PILLION_INBOUND_ADDR", inbound.to_string())
            .env("PILLION_OUTBOUND_ADDR", outbound.to_string())
            .env("PILLION_SHUTDOWN_GRACE_PERIOD", "5s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pillion-proxy");
        let proxy = Proxy {
            child,
            admin,
            inbound,
            outbound,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok((200, _)) = proxy.try_request("GET", "/ready", "") {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("proxy never became ready");
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.try_request(method, path, body).expect("admin request")
    }

    fn try_request(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        let (status, _, body) = self.exchange(method, path, "", body)?;
        Ok((status, body))
    }

    /// One request with extra header lines (`name: value\r\n` each): status, head, body.
    fn exchange(&self, method: &str, path: &str, headers: &str, body: &str) -> std::io::Result<(u16, String, String)> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut rsp = String::new();
        s.read_to_string(&mut rsp)?;
        let status = rsp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = rsp.split_once("\r\n\r\n").unwrap_or((&rsp, ""));
        Ok((status, head.to_ascii_lowercase(), body.to_string()))
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn help_and_version() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "PILLION_INBOUND_ADDR",
        "PILLION_OUTBOUND_ADDR",
        "PILLION_ADMIN_ADDR",
        "PILLION_LOG_FORMAT",
    ] {
        assert!(help.contains(env), "--help mentions {env}");
    }
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pillion-proxy "));
}

#[test]
fn a_bad_value_is_one_line_and_exit_2_before_binding() {
    let admin = free_addr();
    let out = run(
        &[],
        &[
            ("PILLION_ADMIN_ADDR", &admin.to_string()),
            ("PILLION_SHUTDOWN_GRACE_PERIOD", "forever"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("PILLION_SHUTDOWN_GRACE_PERIOD") && err.contains("forever"),
        "{err}"
    );

    let out = run(&["--log-format", "xml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PILLION_LOG_FORMAT"));
}

#[test]
fn a_port_in_use_fails_with_the_listener_named() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &[],
        &[
            ("PILLION_ADMIN_ADDR", &free_addr().to_string()),
            ("PILLION_INBOUND_ADDR", &addr),
            ("PILLION_OUTBOUND_ADDR", &free_addr().to_string()),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inbound") && err.contains(&addr), "{err}");
}

#[test]
fn admin_endpoints() {
    let proxy = Proxy::start();
    assert_eq!(proxy.request("GET", "/live", ""), (200, "live\n".into()));
    assert_eq!(proxy.request("GET", "/ready", ""), (200, "ready\n".into()));

    // Without an OpenMetrics Accept: the classic text format, counters named with `_total`.
    let (status, head, metrics) = proxy.exchange("GET", "/metrics", "", "").unwrap();
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert!(
        metrics.contains("pillion_tcp_connections_opened_total{direction=\"inbound\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE pillion_tcp_connections_opened_total counter"),
        "{metrics}"
    );
    assert!(!metrics.contains("# EOF") && !metrics.contains("# UNIT"), "{metrics}");
    // What Prometheus sends: OpenMetrics.
    let prometheus = "accept: application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";
    let (status, head, metrics) = proxy.exchange("GET", "/metrics", prometheus, "").unwrap();
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
    assert!(metrics.trim_end().ends_with("# EOF"));

    // HEAD wherever GET works; 405 names what does.
    let (status, head, body) = proxy.exchange("HEAD", "/ready", "", "").unwrap();
    assert_eq!((status, body.as_str()), (200, ""));
    assert!(head.contains("content-length: 6"), "{head}");
    let (status, head, _) = proxy.exchange("DELETE", "/ready", "", "").unwrap();
    assert_eq!(status, 405);
    assert!(head.contains("allow: get, head"), "{head}");
    let (status, head, _) = proxy.exchange("GET", "/shutdown", "", "").unwrap();
    assert_eq!(status, 405);
    assert!(head.contains("allow: post"), "{head}");

    let (status, config) = proxy.request("GET", "/config", "");
    assert_eq!(status, 200);
    assert!(
        config.contains(&format!("\"inbound_addr\":\"{}\"", proxy.inbound)),
        "{config}"
    );
    assert!(config.contains("\"shutdown_grace_period\":\"5s\""), "{config}");
    assert!(config.contains("\"mode\":\"standalone\""), "{config}");

    assert_eq!(proxy.request("GET", "/identity", "").0, 404);
    assert_eq!(proxy.request("GET", "/nope", "").0, 404);
}

#[test]
fn log_level_can_be_read_and_replaced() {
    let proxy = Proxy::start();
    assert_eq!(proxy.request("GET", "/log-level", ""), (200, "info\n".into()));
    assert_eq!(proxy.request("PUT", "/log-level", "warn,pillion_proxy=debug").0, 204);
    // The filter is reported in its normalised form.
    assert_eq!(proxy.request("GET", "/log-level", "").1, "pillion_proxy=debug,warn\n");
    let (status, body) = proxy.request("PUT", "/log-level", "info,[[[");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        proxy.request("GET", "/log-level", "").1,
        "pillion_proxy=debug,warn\n",
        "bad filter kept the old one"
    );
}

#[test]
fn a_connection_without_redirect_is_refused_and_counted() {
    let proxy = Proxy::start();
    // Straight to the inbound port, no iptables: nothing to forward to, so it is closed.
    let mut s = TcpStream::connect(proxy.inbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "connection closed without data"
    );
    let (_, metrics) = proxy.request("GET", "/metrics", "");
    let refused = metrics
        .lines()
        .filter(|l| l.starts_with("pillion_tcp_connections_refused_total{direction=\"inbound\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum::<u64>();
    assert_eq!(refused, 1, "{metrics}");
}

#[test]
fn shutdown_endpoint_drains_and_exits_zero() {
    let mut proxy = Proxy::start();
    let (status, _) = proxy.request("POST", "/shutdown", "");
    assert_eq!(status, 200);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn sigterm_exits_zero() {
    let mut proxy = Proxy::start();
    let pid = proxy.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn fixed_targets_proxy_without_iptables() {
    // An echo server standing in for the app / the remote.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in upstream.incoming().take(2) {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 64];
            let n = stream.read(&mut buf).unwrap();
            stream.write_all(&buf[..n]).unwrap();
        }
    });
    let proxy = Proxy::start_with(&[
        ("PILLION_INBOUND_TARGET", target.to_string()),
        ("PILLION_OUTBOUND_TARGET", target.to_string()),
    ]);
    for listener in [proxy.inbound, proxy.outbound] {
        let mut s = TcpStream::connect(listener).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // A first byte no protocol starts with: forwarded as opaque TCP at once.
        s.write_all(b"\0ping").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"\0ping");
    }
    let (_, metrics) = proxy.request("GET", "/metrics", "");
    assert!(
        metrics.contains("pillion_tcp_connections_opened_total{direction=\"outbound\"} 1"),
        "{metrics}"
    );
}

/// `promtool check metrics` over a scrape taken after HTTP and opaque traffic (so histograms and
/// per-route families have samples). promtool comes with Debian's `prometheus` package; CI installs it.
#[test]
fn metrics_pass_promtool_and_count_http_bytes() {
    let promtool = std::process::Command::new("promtool").arg("--version").output();
    if promtool.is_err() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "promtool is required in CI (apt-get install prometheus)"
        );
        eprintln!("skipping: promtool not installed");
        return;
    }
    // An HTTP/1.1 app answering every request with 200.
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = app.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in app.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    let proxy = Proxy::start_with(&[("PILLION_OUTBOUND_TARGET", target.to_string())]);
    let mut s = TcpStream::connect(proxy.outbound).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /hello HTTP/1.1\r\nhost: app.local\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut rsp = String::new();
    s.read_to_string(&mut rsp).unwrap();
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");

    let (_, metrics) = proxy.request("GET", "/metrics", "");
    let counter = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{direction=\"outbound\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The request's 59 bytes were read from the client; the response went back to it.
    assert!(counter("pillion_tcp_read_bytes_total") >= 59, "{metrics}");
    assert!(counter("pillion_tcp_write_bytes_total") > 0, "{metrics}");
    assert!(
        metrics.contains("pillion_http_request_duration_seconds_bucket"),
        "{metrics}"
    );

    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
