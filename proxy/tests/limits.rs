//! The binary's bounds, end to end on loopback (no iptables, no root): the connection limit and
//! the opaque TCP idle timeout, as a client and an operator see them.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_pillion-proxy");

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// An echo server on loopback, one thread per connection.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A proxy whose inbound side forwards opaquely to `app`, killed on drop.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    inbound: SocketAddr,
}

impl Proxy {
    fn start(app: SocketAddr, env: &[(&str, &str)]) -> Proxy {
        let (admin, inbound, outbound) = (free_addr(), free_addr(), free_addr());
        let child = Command::new(BIN)
            .envs(env.iter().copied())
            .env("PILLION_ADMIN_ADDR", admin.to_string())
            .env("PILLION_INBOUND_ADDR", inbound.to_string())
            .env("PILLION_OUTBOUND_ADDR", outbound.to_string())
            .env("PILLION_INBOUND_TARGET", app.to_string())
            // Forwarded without waiting for detection: the echo app never speaks first.
            .env("PILLION_OPAQUE_PORTS", app.port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pillion-proxy");
        let proxy = Proxy { child, admin, inbound };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if proxy.admin_get("/ready").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("proxy never became ready");
    }

    fn admin_get(&self, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    fn metrics(&self) -> String {
        self.admin_get("/metrics").expect("metrics")
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.inbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echoes(conn: &mut TcpStream, text: &str) -> bool {
    let mut buf = vec![0u8; text.len()];
    conn.write_all(text.as_bytes()).is_ok() && conn.read_exact(&mut buf).is_ok() && buf == text.as_bytes()
}

/// What a client sees on a connection the proxy closed: a reset or an end of stream, no data.
fn closed(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match conn.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn connections_over_the_limit_are_closed_counted_and_served_again_once_under_it() {
    let app = echo_server();
    let proxy = Proxy::start(app, &[("PILLION_MAX_CONNECTIONS", "2")]);
    let mut a = proxy.connect();
    let mut b = proxy.connect();
    assert!(echoes(&mut a, "a") && echoes(&mut b, "b"));

    let mut c = proxy.connect();
    let _ = c.write_all(b"c");
    assert!(closed(&mut c), "the third connection is closed");
    assert!(
        proxy
            .metrics()
            .contains("pillion_tcp_connections_refused_total{direction=\"inbound\",reason=\"limit\"} 1"),
        "{}",
        proxy.metrics()
    );
    assert!(echoes(&mut a, "still served"));

    // One ends: the next connection gets its slot (once the proxy has seen the close).
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut d = proxy.connect();
        if echoes(&mut d, "d") {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came free");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_idle_opaque_connection_is_closed_after_the_idle_timeout() {
    let app = echo_server();
    let proxy = Proxy::start(app, &[("PILLION_TCP_IDLE_TIMEOUT", "1s")]);
    let mut conn = proxy.connect();
    assert!(echoes(&mut conn, "hello"));
    let quiet = Instant::now();
    assert!(closed(&mut conn), "closed once idle");
    assert!(quiet.elapsed() >= Duration::from_millis(900), "not before the timeout");
}
