//! Dual-stack pods: IPv6 through both paths, and IPv4 still working on the dual-stack listener.

use std::net::{IpAddr, SocketAddr};

use pillion_tests::metrics::opened;
use pillion_tests::pod::{Pod, PodOptions};
use pillion_tests::require_root;
use pillion_tests::traffic::{Server, echo, opaque, roundtrip};

fn any_v6(port: u16) -> SocketAddr {
    SocketAddr::from(([0u16; 8], port))
}

#[test]
fn ipv6_inbound_and_outbound_go_through_the_proxy() {
    if !require_root("ipv6_inbound_and_outbound_go_through_the_proxy") {
        return;
    }
    let pod = Pod::start_with("v6", PodOptions::default().ipv6());
    let pod_ip6 = IpAddr::V6(pod.ip6.unwrap());
    // `[::]` listeners are dual stack: IPv4 peers appear as `::ffff:a.b.c.d`.
    let app = Server::start(pod.ns.listen(any_v6(8080)), echo);
    let remote = Server::start(pod.client.listen(any_v6(9090)), echo);
    let before = pod.metrics();

    // Inbound over IPv6: the proxy's `[::]:4143` listener gets it and dials [podIPv6]:8080.
    let mut conn = pod.client.connect(pod.addr6(8080)).expect("connect to [podIPv6]:8080");
    roundtrip(&mut conn, &opaque("inbound over v6")).expect("inbound v6 round trip");
    drop(conn);
    assert_eq!(app.peers().last().map(|p| p.ip()), Some(pod_ip6));
    pod.wait_at_least(&opened("inbound"), before.value(&opened("inbound")) + 1.0);

    // Inbound over IPv4 to the same dual-stack proxy listener.
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    roundtrip(&mut conn, &opaque("inbound over v4")).expect("inbound v4 round trip");
    drop(conn);
    assert_eq!(
        app.peers().last().map(|p| p.ip().to_canonical()),
        Some(IpAddr::V4(pod.ip))
    );
    pod.wait_at_least(&opened("inbound"), before.value(&opened("inbound")) + 2.0);

    // Outbound over IPv6: redirected to the proxy's `[::1]:4140` listener.
    let mut conn = pod
        .ns
        .connect(pod.client_addr6(9090))
        .expect("connect to [clientIPv6]:9090");
    roundtrip(&mut conn, &opaque("outbound over v6")).expect("outbound v6 round trip");
    drop(conn);
    assert_eq!(
        remote.peers().last().map(|p| p.ip()),
        Some(pod_ip6),
        "the connection should leave from the pod's IPv6 address"
    );
    pod.wait_at_least(&opened("outbound"), before.value(&opened("outbound")) + 1.0);
}
