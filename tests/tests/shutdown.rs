//! SIGTERM, the way the kubelet ends a native sidecar: stop being ready, stop accepting, let
//! in-flight connections finish within the grace period, exit 0.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pillion_tests::metrics::opened;
use pillion_tests::pod::{Pod, SHUTDOWN_GRACE_PERIOD};
use pillion_tests::poll_until;
use pillion_tests::require_root;
use pillion_tests::traffic::{Server, assert_closed_without_data, echo, opaque, roundtrip};

/// Scheduling slack on a small, noisy machine.
const SLACK: Duration = Duration::from_secs(2);

fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// What `/ready` turned into after SIGTERM.
#[derive(Debug, PartialEq)]
enum Drained {
    NotReady,
    AdminClosed,
}

#[test]
fn sigterm_drains_in_flight_connections_then_exits_zero() {
    if !require_root("sigterm_drains_in_flight_connections_then_exits_zero") {
        return;
    }
    let mut pod = Pod::start("term");
    let _app = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let before = pod.metrics().value(&opened("inbound"));
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    roundtrip(&mut conn, &opaque("before SIGTERM")).expect("round trip before SIGTERM");
    pod.wait_at_least(&opened("inbound"), before + 1.0);

    let sigterm = Instant::now();
    pod.proxy().signal(libc::SIGTERM);

    // Readiness must drop. The proxy stays up while our connection is in flight, so the admin
    // server should be there to say 503; a closed admin port also fails a kubelet probe, so it
    // is accepted, but reported.
    let drained = poll_until(SLACK, Duration::from_millis(10), || match pod.admin_get("/ready") {
        Ok(r) if r.status == 503 => Some(Drained::NotReady),
        Ok(r) => {
            assert_eq!(r.status, 200, "unexpected /ready answer {r:?}");
            None
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(Drained::AdminClosed),
        Err(_) => None,
    })
    .expect("/ready still 200 after SIGTERM");
    if drained == Drained::AdminClosed {
        eprintln!("note: the admin port closed on SIGTERM instead of answering 503");
    }

    // Stop accepting: new connections are refused once the listener is closed.
    let refused = poll_until(SLACK, Duration::from_millis(50), || {
        match pod.client.connect(pod.addr(8080)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    });
    assert!(
        refused.is_some(),
        "new inbound connections still accepted after SIGTERM"
    );

    // The in-flight connection keeps the proxy alive and still works.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        pod.proxy().try_status(),
        None,
        "the proxy exited with a connection still in flight"
    );
    roundtrip(&mut conn, &opaque("after SIGTERM")).expect("round trip on the draining connection");

    // Once the client is done, the proxy has nothing left and exits 0 — without waiting out the
    // rest of the grace period.
    drop(conn);
    let closed = Instant::now();
    let status = pod
        .proxy()
        .wait_timeout(SHUTDOWN_GRACE_PERIOD + SLACK)
        .expect("the proxy did not exit after its last connection closed");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        closed.elapsed() < SLACK + Duration::from_millis(500),
        "the proxy took {:?} to exit after the last connection closed (SIGTERM was {:?} ago)",
        closed.elapsed(),
        sigterm.elapsed()
    );
}

#[test]
fn sigterm_gives_up_on_a_stuck_connection_after_the_grace_period() {
    if !require_root("sigterm_gives_up_on_a_stuck_connection_after_the_grace_period") {
        return;
    }
    let mut pod = Pod::start("stuck");
    let _app = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    roundtrip(&mut conn, &opaque("hello")).expect("round trip");

    let sigterm = Instant::now();
    let status = pod
        .terminate_proxy(SHUTDOWN_GRACE_PERIOD + SLACK)
        .unwrap_or_else(|| panic!("the proxy did not exit within the {SHUTDOWN_GRACE_PERIOD:?} grace period"));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    eprintln!("exited {:?} after SIGTERM", sigterm.elapsed());

    // The connection the proxy abandoned is closed, not left hanging.
    assert_closed_without_data(Ok(conn), &[]);
}

#[test]
fn sigterm_without_connections_exits_zero_promptly() {
    if !require_root("sigterm_without_connections_exits_zero_promptly") {
        return;
    }
    let mut pod = Pod::start("idle");
    let status = pod
        .terminate_proxy(SLACK)
        .expect("an idle proxy should exit right after SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}
