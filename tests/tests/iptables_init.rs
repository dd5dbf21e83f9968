//! The init container in a real pod: a restarted pod re-runs it, and that must change nothing.

use std::net::SocketAddr;

use pillion_tests::metrics::opened;
use pillion_tests::pod::{Pod, describe_output};
use pillion_tests::require_root;
use pillion_tests::traffic::{Server, echo, opaque, roundtrip};

#[test]
fn rerunning_iptables_init_is_a_no_op() {
    if !require_root("rerunning_iptables_init_is_a_no_op") {
        return;
    }
    let pod = Pod::start("rerun");
    let rules_before = pod.nat_rules();
    assert!(
        rules_before.contains("PILLION_"),
        "no PILLION_ chains found after the init container ran:\n{rules_before}"
    );
    // The pod has link-local IPv6 only, so IPv6 is refused rather than redirected.
    let filter_before = pod.ipv6_filter_rules();
    assert!(
        filter_before.contains("-A INPUT -m comment --comment \"pillion: IPv6 is not redirected"),
        "no refusal of inbound IPv6 after the init container ran:\n{filter_before}"
    );

    for run in 1..=2 {
        let out = pod.rerun_init();
        assert!(
            out.status.success(),
            "re-run {run} failed:\n{}",
            describe_output("pillion-iptables-init", pod.init_args(), &out)
        );
        let rules_after = pod.nat_rules();
        assert_eq!(rules_before, rules_after, "re-run {run} changed the NAT rules");
        assert_eq!(
            filter_before,
            pod.ipv6_filter_rules(),
            "re-run {run} changed the IPv6 filter rules"
        );
    }

    // Still intercepting both ways.
    let app = Server::start(pod.ns.listen(SocketAddr::from(([0, 0, 0, 0], 8080))), echo);
    let remote = Server::start(pod.client.listen(SocketAddr::from(([0, 0, 0, 0], 9090))), echo);
    let before = pod.metrics();
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect inbound");
    roundtrip(&mut conn, &opaque("in")).expect("inbound round trip");
    let mut conn = pod.ns.connect(pod.client_addr(9090)).expect("connect outbound");
    roundtrip(&mut conn, &opaque("out")).expect("outbound round trip");
    assert_eq!(app.peers().first().map(|p| p.ip()), Some(pod.ip.into()));
    assert_eq!(remote.peers().first().map(|p| p.ip()), Some(pod.ip.into()));
    pod.wait_at_least(&opened("inbound"), before.value(&opened("inbound")) + 1.0);
    pod.wait_at_least(&opened("outbound"), before.value(&opened("outbound")) + 1.0);
}
