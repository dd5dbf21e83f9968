//! The inbound path: traffic from the cluster to the app goes through the proxy, except for
//! ignored ports; the proxy refuses connections aimed at itself, and connections whose original
//! destination is not one of the pod's own addresses (the pod is no relay).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use pillion_tests::metrics::{connect_errors, open, opened, read_bytes, refused, write_bytes};
use pillion_tests::netns::{DefaultRoutes, Netns, VethEnd, VethLink};
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

/// The refusal counter for original destinations that are not the pod's.
fn not_pod_address() -> String {
    refused("inbound", "not_pod_address")
}

/// `GET /config`'s `inbound_ips`: where the list came from and the addresses.
fn inbound_ips(pod: &Pod) -> (String, Vec<IpAddr>) {
    let response = pod.admin_get("/config").expect("GET /config");
    assert_eq!(response.status, 200, "{response:?}");
    let json: serde_json::Value = serde_json::from_str(&response.body).expect("/config is JSON");
    let ips = &json["config"]["inbound_ips"];
    let source = ips["source"].as_str().unwrap_or_default().to_owned();
    let addrs = ips["addrs"]
        .as_array()
        .unwrap_or_else(|| panic!("no inbound_ips in {}", response.body))
        .iter()
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect();
    (source, addrs)
}

#[test]
fn a_connection_routed_via_the_pod_to_another_address_is_refused() {
    if !require_root("a_connection_routed_via_the_pod_to_another_address_is_refused") {
        return;
    }
    let pod = Pod::start("relay");
    // The pod routes like a router would (a CNI may turn forwarding on), and it has a second
    // network: `far`, at 10.250.7.2, reachable from the pod but not from the client.
    pod.ns.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    let far = Netns::new("relay-far");
    let far_ip = Ipv4Addr::new(10, 250, 7, 2);
    let _link = VethLink::with_routes(
        VethEnd {
            ns: &far,
            ifname: "eth0",
            ipv4: far_ip,
            ipv6: None,
        },
        VethEnd {
            ns: &pod.ns,
            ifname: "eth1",
            ipv4: Ipv4Addr::new(10, 250, 7, 1),
            ipv6: None,
        },
        DefaultRoutes::FirstOnly,
    );
    let target = Server::start(far.listen(any_v4(9090)), echo);
    let target_addr = SocketAddr::from((far_ip, 9090));
    // The neighbour sends its packets for far via the pod: their original destination is far.
    pod.client.exec_ok(
        "ip",
        &["route", "add", &format!("{far_ip}/32"), "via", &pod.ip.to_string()],
    );
    let before = pod.metrics().value(&not_pod_address());

    assert_closed_without_data(pod.client.connect(target_addr), &opaque("relay me"));
    pod.wait_at_least(&not_pod_address(), before + 1.0);
    assert!(target.peers().is_empty(), "relayed to far: {:?}", target.peers());

    // far is reachable from the pod (the app's own connection, through the outbound path), so
    // only the inbound check stood between the neighbour and far.
    let mut conn = pod.ns.connect(target_addr).expect("the app reaches far");
    roundtrip(&mut conn, &opaque("from the app")).expect("round trip to far");
    assert_eq!(target.peers().len(), 1, "{:?}", target.peers());

    // Ordinary inbound traffic to the pod's address still flows, and /config says why.
    let app = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let mut conn = pod.client.connect(pod.addr(8080)).expect("connect to podIP:8080");
    roundtrip(&mut conn, &opaque("to the pod")).expect("inbound round trip");
    assert_eq!(app.peers().len(), 1);
    let (source, addrs) = inbound_ips(&pod);
    assert_eq!(source, "interfaces");
    assert!(addrs.contains(&IpAddr::V4(pod.ip)), "{addrs:?}");
    assert!(addrs.iter().all(|a| !a.is_loopback()), "{addrs:?}");
}

#[test]
fn a_neighbour_cannot_reach_an_app_port_bound_to_a_loopback_address() {
    if !require_root("a_neighbour_cannot_reach_an_app_port_bound_to_a_loopback_address") {
        return;
    }
    let pod = Pod::start("lo-only");
    // A private address on the pod's `lo` and an app listening only there: reachable from inside
    // the pod, never from outside. (127.0.0.1 itself cannot be routed to a neighbour's interface;
    // an address on `lo` is the same case that can.)
    let private = Ipv4Addr::new(10, 250, 8, 1);
    pod.ns
        .exec_ok("ip", &["addr", "add", &format!("{private}/32"), "dev", "lo"]);
    let app = Server::start(pod.ns.listen(SocketAddr::from((private, 8080))), echo);
    pod.client.exec_ok(
        "ip",
        &["route", "add", &format!("{private}/32"), "via", &pod.ip.to_string()],
    );
    let before = pod.metrics().value(&not_pod_address());

    assert_closed_without_data(
        pod.client.connect(SocketAddr::from((private, 8080))),
        &opaque("let me in"),
    );
    pod.wait_at_least(&not_pod_address(), before + 1.0);
    assert!(
        app.peers().is_empty(),
        "the neighbour reached the app: {:?}",
        app.peers()
    );

    // From inside the pod the app is reachable, as it was meant to be.
    let mut conn = pod
        .ns
        .connect(SocketAddr::from((private, 8080)))
        .expect("local connect");
    roundtrip(&mut conn, &opaque("local")).expect("local round trip");
    let (_, addrs) = inbound_ips(&pod);
    assert!(
        !addrs.contains(&IpAddr::V4(private)),
        "a loopback address is no pod address: {addrs:?}"
    );
}

#[test]
fn explicit_inbound_ips_replace_the_interface_addresses() {
    if !require_root("explicit_inbound_ips_replace_the_interface_addresses") {
        return;
    }
    // The injector passes status.podIPs; here the pod's "real" address is a second one.
    let pod_ip = Ipv4Addr::new(10, 250, 9, 1);
    let pod = Pod::start_with(
        "in-ips",
        PodOptions::default().proxy_env("PILLION_INBOUND_IPS", &pod_ip.to_string()),
    );
    pod.ns
        .exec_ok("ip", &["addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"]);
    pod.client.exec_ok(
        "ip",
        &["route", "add", &format!("{pod_ip}/32"), "via", &pod.ip.to_string()],
    );
    let app = Server::start(pod.ns.listen(any_v4(8080)), echo);
    let before = pod.metrics().value(&not_pod_address());

    let mut conn = pod
        .client
        .connect(SocketAddr::from((pod_ip, 8080)))
        .expect("connect to the listed address");
    roundtrip(&mut conn, &opaque("listed")).expect("round trip to the listed address");
    assert_eq!(app.peers().len(), 1, "{:?}", app.peers());

    // The veth address is an interface address, but not in the list: refused.
    assert_closed_without_data(pod.client.connect(pod.addr(8080)), &opaque("unlisted"));
    pod.wait_at_least(&not_pod_address(), before + 1.0);
    assert_eq!(app.peers().len(), 1, "{:?}", app.peers());
    assert_eq!(
        inbound_ips(&pod),
        ("PILLION_INBOUND_IPS".to_owned(), vec![IpAddr::V4(pod_ip)])
    );
}
