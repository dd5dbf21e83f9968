//! The inbound path: traffic from the cluster to the app goes through the proxy, except for
//! ignored ports, and the proxy refuses connections aimed at itself.

use std::net::SocketAddr;

use pillion_tests::metrics::{connect_errors, open, opened, read_bytes, refused, write_bytes};
use pillion_tests::pod::{INBOUND_PORT, Pod, PodOptions};
use pillion_tests::require_root;
use pillion_tests::traffic::{Pattern, Server, assert_closed_without_data, echo, opaque, roundtrip};

fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

#[test]
fn inbound_connection_reaches_the_app_through_the_proxy() {
    if !require_root("inbound_connection_reaches_the_app_through_the_proxy") {
        return;
    }
    let pod = Pod::start("inb");
    let app = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let before = pod.metrics();

    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    let request = Pattern::new(1).bytes(10_000);
    roundtrip(&mut conn, &request).expect("first round trip");
    roundtrip(&mut conn, &opaque("and again")).expect("second round trip");
    let sent = (request.len() + opaque("and again").len()) as f64;

    // The proxy forwards to the original destination from inside the pod, so the app sees the
    // pod's own address; a connection that bypassed the proxy would come from the client.
    let peers = app.peers();
    assert_eq!(peers.len(), 1, "app connections: {peers:?}");
    assert_eq!(peers[0].ip(), pod.ip, "the app should be reached by the proxy");

    pod.wait_at_least(&opened("inbound"), before.value(&opened("inbound")) + 1.0);
    assert!(
        pod.metrics().value(&open("inbound")) >= before.value(&open("inbound")) + 1.0,
        "the open-connections gauge should count the live connection"
    );

    drop(conn);
    pod.wait_at_least(&read_bytes("inbound"), before.value(&read_bytes("inbound")) + sent);
    pod.wait_at_least(&write_bytes("inbound"), before.value(&write_bytes("inbound")) + sent);
    let baseline = before.value(&open("inbound"));
    pod.wait_metric(&open("inbound"), pillion_tests::pod::METRIC_TIMEOUT, |v| v == baseline);
    assert_eq!(
        pod.metrics().value(&opened("outbound")),
        before.value(&opened("outbound")),
        "inbound traffic must not be counted as outbound"
    );
}

#[test]
fn ignored_inbound_port_bypasses_the_proxy() {
    if !require_root("ignored_inbound_port_bypasses_the_proxy") {
        return;
    }
    let pod = Pod::start_with(
        "ign",
        PodOptions::default().init_args(["--inbound-ports-to-ignore", "4191,7070"]),
    );
    let ignored = Server::start(pod.ns.listen(any_v4(7070)), echo);
    let proxied = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let before = pod.metrics().value(&opened("inbound"));

    let mut conn = pod.client.connect(pod.addr(7070)).expect("connect to podIP:7070");
    roundtrip(&mut conn, &opaque("direct")).expect("round trip on the ignored port");
    drop(conn);
    assert_eq!(
        ignored.peers().first().map(|p| p.ip()),
        Some(pod.client_ip.into()),
        "an ignored port is reached directly, from the client's address"
    );

    // Then a proxied connection: once it is counted, the count must have moved by exactly one.
    // Had the ignored-port connection gone through the proxy, it would have been counted first.
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    roundtrip(&mut conn, &opaque("proxied")).expect("round trip on a proxied port");
    drop(conn);
    assert_eq!(proxied.peers().first().map(|p| p.ip()), Some(pod.ip.into()));
    let after = pod.wait_at_least(&opened("inbound"), before + 1.0);
    assert_eq!(
        after,
        before + 1.0,
        "only the connection to port 8080 may be counted as inbound"
    );
}

#[test]
fn connection_to_the_inbound_port_is_refused_as_a_loop() {
    if !require_root("connection_to_the_inbound_port_is_refused_as_a_loop") {
        return;
    }
    let pod = Pod::start("loop");
    let app = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let before = pod.metrics().value(&refused("inbound", "loop"));

    // Connecting straight to the proxy's own port must not be relayed back to the proxy: it is
    // accepted (the counter below proves it) and closed without forwarding.
    assert_closed_without_data(pod.client.connect(pod.addr(INBOUND_PORT)), &opaque("hello?"));
    pod.wait_at_least(&refused("inbound", "loop"), before + 1.0);

    let ready = pod.admin_get("/ready").expect("GET /ready");
    assert_eq!(ready.status, 200, "the proxy should stay ready: {ready:?}");
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    roundtrip(&mut conn, &opaque("still working")).expect("round trip after the loop");
    assert_eq!(app.peers().len(), 1, "the loop must never reach the app");
}

#[test]
fn inbound_to_a_closed_app_port_is_closed_and_counted() {
    if !require_root("inbound_to_a_closed_app_port_is_closed_and_counted") {
        return;
    }
    let pod = Pod::start("noapp");
    let before = pod.metrics().value(&connect_errors("inbound"));

    // Nothing listens on 8081: the proxy accepts, fails to reach the app, and must close the
    // client's connection (EOF or reset) rather than leave it hanging.
    assert_closed_without_data(pod.client.connect(pod.addr(8081)), &opaque("anyone?"));
    pod.wait_at_least(&connect_errors("inbound"), before + 1.0);
    assert_eq!(pod.admin_get("/ready").expect("GET /ready").status, 200);
}
