//! Byte-stream fidelity through the proxy: half-closed connections and large transfers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pillion_tests::metrics::{opened, read_bytes, write_bytes};
use pillion_tests::pod::Pod;
use pillion_tests::require_root;
use pillion_tests::traffic::{
    Digest, Pattern, Server, digest_then_reply, echo, send_then_read_reply, transfer_through_echo,
};

/// Bytes sent each way in the large-transfer tests.
const LARGE: u64 = 64 * 1024 * 1024;
/// Generous even for debug builds on a small, noisy machine.
const LARGE_TIMEOUT: Duration = Duration::from_secs(120);

fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// The client writes, then shuts down its write side; the server replies only after reading EOF.
/// The reply arrives only if the proxy forwarded the FIN and kept the other direction open.
#[test]
fn half_close_is_forwarded_both_ways() {
    if !require_root("half_close_is_forwarded_both_ways") {
        return;
    }
    let pod = Pod::start("half");
    let app = Server::start(pod.ns.listen(any_v4(8080)), digest_then_reply);
    let remote = Server::start(pod.client.listen(any_v4(9090)), digest_then_reply);
    let before = pod.metrics();

    for (size, seed) in [(0usize, 10u64), (1, 11), (300_000, 12)] {
        let payload = Pattern::new(seed).bytes(size);
        let expected = format!("{}\n", Digest::of(&payload));

        let mut inbound = pod.client.connect(pod.addr(8080)).expect("connect inbound");
        let reply = send_then_read_reply(&mut inbound, &payload).expect("inbound exchange");
        assert_eq!(reply, expected, "inbound, {size} bytes then FIN");

        let mut outbound = pod.ns.connect(pod.client_addr(9090)).expect("connect outbound");
        let reply = send_then_read_reply(&mut outbound, &payload).expect("outbound exchange");
        assert_eq!(reply, expected, "outbound, {size} bytes then FIN");
    }

    assert_eq!(app.errors(), Vec::<String>::new(), "app side");
    assert_eq!(remote.errors(), Vec::<String>::new(), "remote side");
    // All six went through the proxy (not around it).
    pod.wait_at_least(&opened("inbound"), before.value(&opened("inbound")) + 3.0);
    pod.wait_at_least(&opened("outbound"), before.value(&opened("outbound")) + 3.0);
}

#[test]
fn large_inbound_transfer_is_intact() {
    if !require_root("large_inbound_transfer_is_intact") {
        return;
    }
    let pod = Pod::start("bigin");
    let app = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let before = pod.metrics();

    let conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    let started = Instant::now();
    let (sent, received) = transfer_through_echo(&conn, LARGE, 0x5eed)
        .unwrap_or_else(|e| panic!("transfer: {e}\napp errors: {:?}\n{}", app.errors(), pod.sockets()));
    let elapsed = started.elapsed();
    drop(conn);

    assert_eq!(sent.len, LARGE);
    assert_eq!(received, sent, "the echoed stream differs from the one sent");
    assert!(elapsed < LARGE_TIMEOUT, "transfer took {elapsed:?}");
    eprintln!("{} MiB each way in {elapsed:?}", LARGE / (1024 * 1024));
    pod.wait_at_least(
        &read_bytes("inbound"),
        before.value(&read_bytes("inbound")) + LARGE as f64,
    );
    pod.wait_at_least(
        &write_bytes("inbound"),
        before.value(&write_bytes("inbound")) + LARGE as f64,
    );
}

#[test]
fn large_outbound_transfer_is_intact() {
    if !require_root("large_outbound_transfer_is_intact") {
        return;
    }
    let pod = Pod::start("bigout");
    let remote = Server::start(pod.client.listen(any_v4(9090)), echo);
    let before = pod.metrics();

    let conn = pod.ns.connect(pod.client_addr(9090)).expect("connect to clientIP:9090");
    let started = Instant::now();
    let (sent, received) = transfer_through_echo(&conn, LARGE, 0xfeed)
        .unwrap_or_else(|e| panic!("transfer: {e}\nremote errors: {:?}\n{}", remote.errors(), pod.sockets()));
    let elapsed = started.elapsed();
    drop(conn);

    assert_eq!(received, sent, "the echoed stream differs from the one sent");
    assert!(elapsed < LARGE_TIMEOUT, "transfer took {elapsed:?}");
    pod.wait_at_least(
        &read_bytes("outbound"),
        before.value(&read_bytes("outbound")) + LARGE as f64,
    );
    pod.wait_at_least(
        &write_bytes("outbound"),
        before.value(&write_bytes("outbound")) + LARGE as f64,
    );
}
