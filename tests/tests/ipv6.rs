//! Dual-stack pods: IPv6 through both paths with the defaults (iptables-init's `--ipv6 auto` and
//! the proxy's default listeners agree), IPv4 still working next to it, and IPv6 that is not
//! redirected refused at the pod instead of reaching the app around the proxy.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use pillion_tests::http_peers::{app::HttpApp, curl::curl};
use pillion_tests::metrics::{opened, refused};
use pillion_tests::pod::{Pod, PodOptions};
use pillion_tests::traffic::{Server, echo, opaque, roundtrip};
use pillion_tests::{poll_until, require_root};

/// Inbound HTTP requests the proxy answered with `status`, over every route.
fn inbound_requests(status: u16) -> String {
    format!("pillion_http_requests_total{{direction=\"inbound\",status_code=\"{status}\"}}")
}

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

#[test]
fn with_defaults_curl_over_ipv6_reaches_the_app_through_the_proxy() {
    if !require_root("with_defaults_curl_over_ipv6_reaches_the_app_through_the_proxy") {
        return;
    }
    // A global IPv6 address, and nothing else said: iptables-init's `--ipv6 auto` redirects IPv6,
    // and the proxy's default listeners must be there to take it.
    let pod = Pod::start_with("v6-defaults", PodOptions::default().ipv6_addresses());
    let pod_ip6 = IpAddr::V6(pod.ip6.unwrap());
    let rules = pod.nat_rules();
    assert!(
        rules.contains("ip6tables-nft-save -t nat") && rules.matches("PILLION_PREROUTING").count() >= 4,
        "auto should have installed IPv6 redirects:\n{rules}"
    );
    let listening = pod.ns.exec_ok("ss", &["-Hltn"]);
    for twin in ["0.0.0.0:4143", "[::]:4143", "127.0.0.1:4140", "[::1]:4140"] {
        assert!(listening.contains(twin), "no listener on {twin}:\n{listening}");
    }

    let app = HttpApp::start_local(pod.ns.listen(any_v6(8080)), "app6");
    let before = pod.metrics();
    let url = format!("http://[{pod_ip6}]:8080/over-v6");
    let response = curl(&pod.client, &["-6", &url]);
    assert_eq!(response.status, 200, "{response:?}");
    // Through the proxy: the request is in its metrics, and the app's peer is the proxy's own
    // connection from inside the pod, not the client.
    pod.wait_at_least(&inbound_requests(200), before.value(&inbound_requests(200)) + 1.0);
    let seen = app.only_request_to("/over-v6");
    assert_eq!(seen.peer.ip(), pod_ip6, "the app should be reached by the proxy");

    // The app's own IPv6 connection out goes through the proxy's `[::1]:4140` twin.
    let remote = Server::start(pod.client.listen(any_v6(9090)), echo);
    let mut conn = pod
        .ns
        .connect(pod.client_addr6(9090))
        .expect("connect to [clientIPv6]:9090");
    roundtrip(&mut conn, &opaque("outbound over v6")).expect("outbound v6 round trip");
    drop(conn);
    assert_eq!(remote.peers().last().map(|p| p.ip()), Some(pod_ip6));
    pod.wait_at_least(&opened("outbound"), before.value(&opened("outbound")) + 1.0);
    assert_eq!(
        pod.metrics().value(&refused("inbound", "not_pod_address")),
        0.0,
        "the pod's IPv6 address is one of its own"
    );
}

#[test]
fn ipv6_that_is_not_redirected_is_refused_before_the_app() {
    if !require_root("ipv6_that_is_not_redirected_is_refused_before_the_app") {
        return;
    }
    // The pod has IPv6, but the init container was told not to redirect it.
    let pod = Pod::start_with(
        "v6-off",
        PodOptions::default().ipv6_addresses().init_args(["--ipv6", "off"]),
    );
    let pod_ip6 = IpAddr::V6(pod.ip6.unwrap());
    let app = Server::start(pod.ns.listen(any_v6(8080)), echo);
    let before = pod.metrics();

    // Refused at once (a reset), never reaching the app without mTLS or authorization.
    match pod.client.connect(pod.addr6(8080)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("expected the IPv6 connection to be refused, got {e}"),
        Ok(conn) => panic!(
            "an IPv6 connection to the app was accepted (local {:?}); app peers {:?}",
            conn.local_addr(),
            app.peers()
        ),
    }
    assert!(app.peers().is_empty(), "{:?}", app.peers());

    // IPv4 still goes through the proxy.
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    roundtrip(&mut conn, &opaque("over v4")).expect("inbound v4 round trip");
    drop(conn);
    assert_eq!(
        app.peers().last().map(|p| p.ip().to_canonical()),
        Some(IpAddr::V4(pod.ip))
    );
    pod.wait_at_least(&opened("inbound"), before.value(&opened("inbound")) + 1.0);

    // The app's own IPv6 connections out are not redirected, and their answers are let in.
    let remote = Server::start(pod.client.listen(any_v6(9090)), echo);
    let mut conn = pod
        .ns
        .connect(pod.client_addr6(9090))
        .expect("the app's IPv6 connection out");
    roundtrip(&mut conn, &opaque("direct over v6")).expect("outbound v6 round trip");
    assert_eq!(remote.peers().last().map(|p| p.ip()), Some(pod_ip6));
    assert_eq!(
        pod.metrics().value(&opened("outbound")),
        before.value(&opened("outbound")),
        "IPv6 out is not redirected when IPv6 redirection is off"
    );
}

#[test]
fn with_defaults_and_only_link_local_ipv6_the_app_is_not_reachable_over_ipv6() {
    if !require_root("with_defaults_and_only_link_local_ipv6_the_app_is_not_reachable_over_ipv6") {
        return;
    }
    // No global IPv6 address, so `--ipv6 auto` does not redirect IPv6; but every IPv6 interface
    // has a link-local address, and a neighbour on the link can use it.
    let pod = Pod::start("v6-link");
    let app = Server::start(pod.ns.listen(any_v6(8080)), echo);
    let shown = pod
        .ns
        .exec_ok("ip", &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]);
    let pod_link_local: Ipv6Addr = shown
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no link-local address on the pod's eth0: {shown}"));
    let ifindex: u32 = pod
        .client
        .exec_ok("cat", &["/sys/class/net/eth0/ifindex"])
        .trim()
        .parse()
        .expect("the client's eth0 ifindex");
    let target = SocketAddr::V6(SocketAddrV6::new(pod_link_local, 8080, 0, ifindex));

    // Duplicate address detection may hold the addresses back for a moment: retry until the
    // answer is definite, for a bounded time.
    let attempt = || match pod.client.connect(target) {
        Ok(_) => Some(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Some(Err(e)),
        Err(_) => None,
    };
    let refused = poll_until(Duration::from_secs(5), Duration::from_millis(100), attempt);
    assert!(
        matches!(&refused, Some(Err(_))),
        "an inbound IPv6 connection to the app must be refused, got {refused:?}; app peers {:?}",
        app.peers()
    );
    assert!(app.peers().is_empty(), "{:?}", app.peers());

    // The refusal is what stood in the way: without our INPUT jump the same connection gets in.
    pod.ns.exec_ok("ip6tables-nft", &["-D", "INPUT", "1"]);
    let reached = poll_until(Duration::from_secs(5), Duration::from_millis(100), attempt);
    assert!(matches!(reached, Some(Ok(()))), "{reached:?}");
}
