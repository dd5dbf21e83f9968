//! The outbound path: the app's connections to the rest of the cluster go through the proxy and
//! leave the pod from the pod's address.

use std::net::SocketAddr;

use pillion_tests::metrics::{opened, read_bytes, write_bytes};
use pillion_tests::pod::Pod;
use pillion_tests::require_root;
use pillion_tests::traffic::{Pattern, Server, echo, roundtrip};

#[test]
fn outbound_connection_leaves_through_the_proxy() {
    if !require_root("outbound_connection_leaves_through_the_proxy") {
        return;
    }
    let pod = Pod::start("outb");
    let remote = Server::start(pod.client.listen(SocketAddr::from(([0, 0, 0, 0], 9090))), echo);
    let before = pod.metrics();

    // The app (root, in the pod) dials the remote service; iptables sends it to the proxy.
    let mut conn = pod.ns.connect(pod.client_addr(9090)).expect("connect to clientIP:9090");
    let request = Pattern::new(2).bytes(20_000);
    roundtrip(&mut conn, &request).expect("round trip");

    let peers = remote.peers();
    assert_eq!(peers.len(), 1, "remote connections: {peers:?}");
    assert_eq!(
        peers[0].ip(),
        pod.ip,
        "the connection should come from the pod's address"
    );
    pod.wait_at_least(&opened("outbound"), before.value(&opened("outbound")) + 1.0);

    drop(conn);
    let sent = request.len() as f64;
    pod.wait_at_least(&read_bytes("outbound"), before.value(&read_bytes("outbound")) + sent);
    pod.wait_at_least(&write_bytes("outbound"), before.value(&write_bytes("outbound")) + sent);
    assert_eq!(
        pod.metrics().value(&opened("inbound")),
        before.value(&opened("inbound")),
        "outbound traffic must not be counted as inbound"
    );
}
