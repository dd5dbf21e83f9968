//! Mesh TLS end to end: two pods (network namespaces joined by a veth), each with
//! `pillion-iptables-init` and a `pillion-proxy` that takes its workload certificate from
//! `pillion-control serve`, which runs in pod B's namespace like a node-local control plane.
//!
//! The apps speak plaintext: app A calls `B:8080` (HTTP/1.1, h2c, gRPC) and `B:7070` (TCP echo)
//! and never sees a certificate. The control plane's policy says both are meshed endpoints with
//! the server's SPIFFE ID, so A's proxy originates mTLS and B's terminates it. That the hop was
//! mutual TLS is read from the proxies themselves: B's inbound counts the connection with
//! `tls="true"` and the client's verified SPIFFE ID, A's outbound with the server's.
//!
//! Ports: B ignores inbound 8090 (the control plane) and A ignores outbound 8090, so the proxies
//! reach the control plane directly, as they would reach a Service outside the mesh.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pillion_tests::http_peers::app::HttpApp;
use pillion_tests::http_peers::raw::{self, RawResponse};
use pillion_tests::http_peers::{block_on_in, grpc};
use pillion_tests::mesh::{ControlPlane, ControlPlaneOptions, MeshFiles, Workload, identity_env, spiffe_id};
use pillion_tests::netns::{DefaultRoutes, Netns, VethEnd, VethLink};
use pillion_tests::pod::PodOptions;
use pillion_tests::process::LogDir;
use pillion_tests::require_root;
use pillion_tests::sidecar::{AdminPort, Sidecar};
use pillion_tests::traffic::{Server, echo, opaque, roundtrip};

const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 7070;
const CONTROL_PORT: u16 = 8090;

/// How long a policy change may take to reach the proxies: the control plane polls its file
/// every second, then pushes to the open watch streams.
const POLICY_PROPAGATION: Duration = Duration::from_secs(10);

/// Third octet of the next mesh's subnets (`10.201.<n>.0/24` between the pods, `10.202.<n>.0/24`
/// for the outsider).
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// Two meshed pods, the control plane in pod B, and an outsider namespace (no sidecar) that
/// can reach pod B directly.
///
/// Fields drop in declaration order: proxies first, then the apps, the control plane, the links
/// and namespaces; the log directory goes last (and stays if the test failed).
struct Mesh {
    _a_proxy: Sidecar,
    b_proxy: Sidecar,
    _http_app: HttpApp,
    tcp_app: Server,
    control: ControlPlane,
    _outsider_link: VethLink,
    _link: VethLink,
    outsider: Netns,
    a: Netns,
    b: Netns,
    files: MeshFiles,
    b_ip: Ipv4Addr,
    client: Workload,
    server: Workload,
    _logs: LogDir,
}

impl Mesh {
    /// Starts the mesh with `authorization` (policy YAML) for B's ports.
    fn start(tag: &str, authorization: &str, control_options: ControlPlaneOptions) -> Mesh {
        let logs = LogDir::new(tag);
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let (a_ip, b_ip) = (Ipv4Addr::new(10, 201, n, 1), Ipv4Addr::new(10, 201, n, 2));
        let (outsider_ip, b_side_ip) = (Ipv4Addr::new(10, 202, n, 1), Ipv4Addr::new(10, 202, n, 2));

        let a = Netns::new(&format!("{tag}-a"));
        let b = Netns::new(&format!("{tag}-b"));
        let outsider = Netns::new(&format!("{tag}-out"));
        let link = VethLink::new(
            VethEnd {
                ns: &a,
                ifname: "eth0",
                ipv4: a_ip,
                ipv6: None,
            },
            VethEnd {
                ns: &b,
                ifname: "eth0",
                ipv4: b_ip,
                ipv6: None,
            },
        );
        // B already routes everything via A; the outsider's subnet is on-link on B's eth1.
        let outsider_link = VethLink::with_routes(
            VethEnd {
                ns: &outsider,
                ifname: "eth0",
                ipv4: outsider_ip,
                ipv6: None,
            },
            VethEnd {
                ns: &b,
                ifname: "eth1",
                ipv4: b_side_ip,
                ipv6: None,
            },
            DefaultRoutes::FirstOnly,
        );

        let client = Workload::new("default", "client");
        let server = Workload::new("default", "server");
        let files = MeshFiles::create(logs.path(), &[&client, &server]).unwrap_or_else(|e| panic!("{e}"));
        files
            .write_policy(&policy(b_ip, &server, authorization))
            .unwrap_or_else(|e| panic!("{e}"));
        let control_addr = SocketAddr::from((b_ip, CONTROL_PORT));
        let control = ControlPlane::start(&files, Some(&b), control_addr, &control_options, &logs)
            .unwrap_or_else(|e| panic!("{e}"));

        let b_options = identity_env(PodOptions::default(), &control, &files, &server)
            .init_args(["--inbound-ports-to-ignore", &format!("4191,{CONTROL_PORT}")]);
        let b_proxy = Sidecar::start(&b, "b", &b_options, &logs).unwrap_or_else(|e| panic!("{e}"));
        let a_options = identity_env(PodOptions::default(), &control, &files, &client)
            .init_args(["--outbound-ports-to-ignore", &CONTROL_PORT.to_string()]);
        let a_proxy = Sidecar::start(&a, "a", &a_options, &logs).unwrap_or_else(|e| panic!("{e}"));

        let http_app = HttpApp::start(&b, HTTP_PORT, "server");
        let tcp_app = Server::start(b.listen(SocketAddr::from(([0, 0, 0, 0], TCP_PORT))), echo);
        Mesh {
            _a_proxy: a_proxy,
            b_proxy,
            _http_app: http_app,
            tcp_app,
            control,
            _outsider_link: outsider_link,
            _link: link,
            outsider,
            a,
            b,
            files,
            b_ip,
            client,
            server,
            _logs: logs,
        }
    }

    fn a_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.a)
    }

    fn b_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.b)
    }

    fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.b_ip, HTTP_PORT))
    }

    fn tcp_addr(&self) -> SocketAddr {
        SocketAddr::from((self.b_ip, TCP_PORT))
    }

    /// Replaces B's authorization in the control plane's policy.
    fn set_authorization(&self, authorization: &str) {
        self.files
            .write_policy(&policy(self.b_ip, &self.server, authorization))
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The control plane's policy: both of B's ports are meshed endpoints with the server's
/// identity, and both get `authorization`.
fn policy(b_ip: Ipv4Addr, server: &Workload, authorization: &str) -> String {
    let id = server.spiffe_id();
    format!(
        "destinations:
  - destination: {b_ip}:{HTTP_PORT}
    endpoints: [{{ address: {b_ip}:{HTTP_PORT}, identity: {id} }}]
  - destination: {b_ip}:{TCP_PORT}
    endpoints: [{{ address: {b_ip}:{TCP_PORT}, identity: {id} }}]
inbound:
  - port: {HTTP_PORT}
    authorization: {authorization}
  - port: {TCP_PORT}
    authorization: {authorization}
"
    )
}

fn allow(id: &str) -> String {
    format!("{{ allow: [{id}] }}")
}

/// `pillion_tcp_mesh_connections_total{direction,tls="true",peer_id}`.
fn mesh_tls(direction: &str, peer_id: &str) -> String {
    format!("pillion_tcp_mesh_connections_total{{direction=\"{direction}\",tls=\"true\",peer_id=\"{peer_id}\"}}")
}

const PLAINTEXT_INBOUND: &str = "pillion_tcp_mesh_connections_total{direction=\"inbound\",tls=\"false\"}";
const DENIED_INBOUND: &str = "pillion_authz_denied_total{direction=\"inbound\"}";
const CERT_EXPIRY: &str = "pillion_identity_cert_expiration_timestamp_seconds";

/// `GET path` on a fresh connection from `ns`, `Connection: close`.
fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> io::Result<RawResponse> {
    let mut conn = ns.connect(addr)?;
    raw::exchange(
        &mut conn,
        &raw::get(path, &addr.to_string(), &[("connection", "close")]),
    )
}

/// A `GET /hello` that must answer 200 from the app.
fn http_ok(ns: &Netns, addr: SocketAddr) -> Result<(), String> {
    let response = http_get(ns, addr, "/hello").map_err(|e| format!("GET /hello: {e}"))?;
    match (response.status, response.header("x-app")) {
        (200, Some("server")) => Ok(()),
        _ => Err(format!(
            "GET /hello: {} {:?} {}",
            response.status,
            response.headers,
            response.body_text()
        )),
    }
}

/// A round trip through B's echo app on a fresh connection.
fn tcp_ok(ns: &Netns, addr: SocketAddr, text: &str) -> Result<(), String> {
    let mut conn = ns.connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    roundtrip(&mut conn, &opaque(text)).map_err(|e| format!("echo via {addr}: {e}"))
}

/// Whether a fresh TCP connection is closed by the far side after our first bytes, without
/// an answer (`Ok(true)`), or echoed (`Ok(false)`).
fn tcp_denied(ns: &Netns, addr: SocketAddr) -> Result<bool, String> {
    let connected = ns.connect(addr);
    let mut conn = match connected {
        Ok(conn) => conn,
        Err(e) if is_closed(&e) => return Ok(true),
        Err(e) => return Err(format!("connect {addr}: {e}")),
    };
    let message = opaque("may I?");
    let _ = io::Write::write_all(&mut conn, &message);
    let mut back = vec![0u8; message.len()];
    match read_some(&mut conn, &mut back) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) if is_closed(&e) => Ok(true),
        Err(e) => Err(format!("reading from {addr}: {e}")),
    }
}

fn read_some(conn: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    io::Read::read(conn, buf)
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
    )
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[test]
fn mesh_traffic_is_mutual_tls_with_both_identities() {
    if !require_root("mesh_traffic_is_mutual_tls_with_both_identities") {
        return;
    }
    let mesh = Mesh::start(
        "mtls",
        &allow(&spiffe_id("default", "client")),
        ControlPlaneOptions::default(),
    );
    let (client_id, server_id) = (mesh.client.spiffe_id(), mesh.server.spiffe_id());

    // Each proxy holds the identity its token vouches for, from the control plane's CA.
    for (admin, id) in [(mesh.a_admin(), &client_id), (mesh.b_admin(), &server_id)] {
        let identity = admin.identity().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(identity.spiffe_id.as_ref(), Some(id), "{identity:?}");
        assert_eq!(identity.source, "control-plane");
        let not_after = identity.not_after.expect("a certificate is held");
        assert!(not_after > unix_now() + 3600, "a 24h certificate: {identity:?}");
        assert_eq!(admin.metrics().value(CERT_EXPIRY), not_after as f64);
    }

    // Opaque TCP: the app's bytes cross in mTLS, and both proxies name their peer.
    tcp_ok(&mesh.a, mesh.tcp_addr(), "over mesh TLS").unwrap();
    let peers = mesh.tcp_app.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0].ip(), mesh.b_ip, "B's app is reached by B's proxy");
    mesh.b_admin().wait_at_least(&mesh_tls("inbound", &client_id), 1.0);
    mesh.a_admin().wait_at_least(&mesh_tls("outbound", &server_id), 1.0);

    // HTTP/1.1 written by hand: plaintext from the app, mTLS between the pods.
    let inbound_before = mesh.b_admin().metrics().value(&mesh_tls("inbound", &client_id));
    let response = http_get(&mesh.a, mesh.http_addr(), "/hello").unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("x-app"), Some("server"), "{response:?}");
    assert!(response.header("pillion-proxy-error").is_none(), "{response:?}");
    mesh.b_admin()
        .wait_at_least(&mesh_tls("inbound", &client_id), inbound_before + 1.0);
    mesh.b_admin().wait_at_least(
        "pillion_http_requests_total{direction=\"inbound\",status_code=\"200\"}",
        1.0,
    );
    // Between the proxies the HTTP/1.1 request travelled as an HTTP/2 stream; B's app still got
    // HTTP/1.1 (it answered the hand-written request's way, with its own `x-app`).
    let b_metrics = mesh.b_admin().metrics();
    assert!(
        b_metrics.value("pillion_protocol_detections_total{direction=\"inbound\",protocol=\"http2\"}") >= 1.0,
        "B's proxy detected HTTP/2 from A's: {}",
        b_metrics.text()
    );
    assert_eq!(
        b_metrics.value("pillion_protocol_detections_total{direction=\"inbound\",protocol=\"http1\"}"),
        0.0,
        "no HTTP/1 connection between the proxies"
    );

    // gRPC (HTTP/2 with trailers) over the same mesh hop.
    let authority = mesh.http_addr().to_string();
    let target = mesh.http_addr();
    let reply = block_on_in(&mesh.a, Duration::from_secs(20), || async move {
        let mut client = grpc::connect(target).await?;
        grpc::unary(&mut client, &authority, "Unary", "hello").await
    })
    .unwrap_or_else(|e| panic!("gRPC call: {e}"));
    assert_eq!(reply.grpc_status(), Some("0"), "{reply:?}");
    assert_eq!(reply.messages, ["echo:hello"], "{reply:?}");

    // Nothing reached B's proxy in plaintext.
    assert_eq!(mesh.b_admin().metrics().value(PLAINTEXT_INBOUND), 0.0);
    assert_eq!(mesh.b_admin().metrics().value(DENIED_INBOUND), 0.0);
}

#[test]
fn authorization_follows_the_control_plane_policy() {
    if !require_root("authorization_follows_the_control_plane_policy") {
        return;
    }
    let client_id = spiffe_id("default", "client");
    let mesh = Mesh::start("authz", &allow(&client_id), ControlPlaneOptions::default());

    // Listed: allowed.
    tcp_ok(&mesh.a, mesh.tcp_addr(), "listed").unwrap();
    let denied_before = mesh.b_admin().metrics().value(DENIED_INBOUND);

    // The control plane reloads its file and pushes the new policy; B's proxy applies it to
    // new connections.
    mesh.set_authorization(&allow(&spiffe_id("other", "x")));
    let propagated = pillion_tests::poll_until(POLICY_PROPAGATION, Duration::from_millis(200), || {
        tcp_denied(&mesh.a, mesh.tcp_addr()).unwrap().then_some(())
    });
    assert!(
        propagated.is_some(),
        "A is still allowed {POLICY_PROPAGATION:?} after the policy stopped listing it"
    );
    assert!(
        tcp_denied(&mesh.a, mesh.tcp_addr()).unwrap(),
        "a new TCP connection is closed"
    );

    let response = http_get(&mesh.a, mesh.http_addr(), "/hello").unwrap();
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(
        response.header("pillion-proxy-error"),
        Some("denied by authorization policy"),
        "{response:?}"
    );
    mesh.b_admin().wait_at_least(DENIED_INBOUND, denied_before + 3.0);
    let log = mesh.b_proxy.proxy_log();
    assert!(
        log.contains("connection denied by authorization policy") && log.contains(&client_id),
        "B's proxy logs each denial with the client's identity"
    );

    // Listed again: allowed again, without restarting anything.
    mesh.set_authorization(&allow("spiffe://cluster.local/ns/default/*"));
    let allowed = pillion_tests::poll_until(POLICY_PROPAGATION, Duration::from_millis(200), || {
        tcp_ok(&mesh.a, mesh.tcp_addr(), "prefix").ok()
    });
    assert!(allowed.is_some(), "a namespace prefix admits the client");
    // HTTP is not checked here: see the ignored test below.
}

/// What an operator expects from revoking (or granting) access: the next HTTP request follows
/// the new policy. Today B's proxy decides once per mesh connection, and A's proxy pools that
/// connection for later requests, so a changed policy reaches HTTP only once the pooled
/// connection closes. Run with `--ignored` to check a fix.
#[test]
fn http_authorization_follows_policy_changes_on_pooled_connections() {
    if !require_root("http_authorization_follows_policy_changes_on_pooled_connections") {
        return;
    }
    let client_id = spiffe_id("default", "client");
    let mesh = Mesh::start("authzpool", &allow(&client_id), ControlPlaneOptions::default());
    http_ok(&mesh.a, mesh.http_addr()).unwrap();

    mesh.set_authorization(&allow(&spiffe_id("other", "x")));
    let propagated = pillion_tests::poll_until(POLICY_PROPAGATION, Duration::from_millis(200), || {
        tcp_denied(&mesh.a, mesh.tcp_addr()).unwrap().then_some(())
    });
    assert!(propagated.is_some(), "the new policy reached B's proxy (TCP is denied)");
    let response = http_get(&mesh.a, mesh.http_addr(), "/hello").unwrap();
    assert_eq!(
        response.status, 403,
        "revoked, but HTTP still reaches the app: {response:?}"
    );

    mesh.set_authorization(&allow(&client_id));
    let propagated = pillion_tests::poll_until(POLICY_PROPAGATION, Duration::from_millis(200), || {
        tcp_ok(&mesh.a, mesh.tcp_addr(), "again").ok()
    });
    assert!(
        propagated.is_some(),
        "the new policy reached B's proxy (TCP is allowed)"
    );
    http_ok(&mesh.a, mesh.http_addr()).unwrap();
}

#[test]
fn all_authenticated_refuses_plaintext_from_outside_the_mesh() {
    if !require_root("all_authenticated_refuses_plaintext_from_outside_the_mesh") {
        return;
    }
    let mesh = Mesh::start("authn", "all-authenticated", ControlPlaneOptions::default());
    let denied_before = mesh.b_admin().metrics().value(DENIED_INBOUND);

    // A meshed client is authenticated by its certificate.
    tcp_ok(&mesh.a, mesh.tcp_addr(), "meshed").unwrap();
    http_ok(&mesh.a, mesh.http_addr()).unwrap();

    // A workload without a sidecar reaches B's proxy in plaintext: closed for TCP, 403 for HTTP.
    assert!(
        tcp_denied(&mesh.outsider, mesh.tcp_addr()).unwrap(),
        "plaintext TCP must be closed"
    );
    let response = http_get(&mesh.outsider, mesh.http_addr(), "/hello").unwrap();
    assert_eq!(response.status, 403, "{response:?}");
    assert_eq!(
        response.header("pillion-proxy-error"),
        Some("denied by authorization policy"),
        "{response:?}"
    );
    mesh.b_admin().wait_at_least(DENIED_INBOUND, denied_before + 2.0);
    assert!(mesh.b_admin().metrics().value(PLAINTEXT_INBOUND) >= 2.0);
    assert_eq!(
        mesh.tcp_app.peers().len(),
        1,
        "only the meshed connection may reach the app"
    );
}

#[test]
fn certificates_rotate_under_continuous_traffic() {
    if !require_root("certificates_rotate_under_continuous_traffic") {
        return;
    }
    // Renewal starts at 70% of the remaining lifetime: about 14 s into a 20 s certificate.
    let options = ControlPlaneOptions {
        cert_lifetime: Some("20s".into()),
        ..ControlPlaneOptions::default()
    };
    let mesh = Mesh::start("rotate", &allow(&spiffe_id("default", "client")), options);
    let admins = [mesh.a_admin(), mesh.b_admin()];
    let first: Vec<u64> = admins
        .iter()
        .map(|admin| admin.identity().unwrap().not_after.expect("a certificate"))
        .collect();
    let client_id = mesh.client.spiffe_id();
    let inbound_before = mesh.b_admin().metrics().value(&mesh_tls("inbound", &client_id));

    // A request every 100 ms on a fresh connection, alternating TCP and HTTP, until both proxies
    // have renewed and a few more seconds of traffic used the new certificates.
    let started = Instant::now();
    let mut rotated: [Option<Duration>; 2] = [None, None];
    let (mut sent, mut failures) = (0u32, Vec::new());
    while started.elapsed() < Duration::from_secs(45) {
        let tick = Instant::now();
        let result = match sent % 2 {
            0 => tcp_ok(&mesh.a, mesh.tcp_addr(), "rotating"),
            _ => http_ok(&mesh.a, mesh.http_addr()),
        };
        if let Err(e) = result {
            failures.push(format!("request {sent} at {:?}: {e}", started.elapsed()));
        }
        sent += 1;
        if sent % 5 == 0 {
            for (i, admin) in admins.iter().enumerate() {
                let now = admin.identity().unwrap().not_after;
                if rotated[i].is_none() && now != Some(first[i]) {
                    rotated[i] = Some(started.elapsed());
                }
            }
        }
        if let [Some(a), Some(b)] = rotated {
            if started.elapsed() > a.max(b) + Duration::from_secs(3) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }

    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:#?}",
        failures.len()
    );
    assert!(
        rotated.iter().all(Option::is_some),
        "both certificates should have been renewed within {:?} (renewed after {rotated:?}), {sent} requests",
        started.elapsed()
    );
    for (admin, first) in admins.iter().zip(&first) {
        let now = admin.identity().unwrap();
        let not_after = now.not_after.unwrap();
        assert!(not_after > *first, "the renewed certificate expires later: {now:?}");
        assert_eq!(
            admin.metrics().value(CERT_EXPIRY),
            not_after as f64,
            "the gauge follows"
        );
    }
    let inbound_after = mesh.b_admin().metrics().value(&mesh_tls("inbound", &client_id));
    assert!(
        inbound_after >= inbound_before + f64::from(sent / 2),
        "every TCP request was a new mTLS connection with the client's identity ({inbound_before} → {inbound_after}, {sent} requests)"
    );
}

#[test]
fn traffic_continues_while_the_control_plane_is_down() {
    if !require_root("traffic_continues_while_the_control_plane_is_down") {
        return;
    }
    let mut mesh = Mesh::start(
        "cpdown",
        &allow(&spiffe_id("default", "client")),
        ControlPlaneOptions::default(),
    );
    // Resolve both destinations (and B's inbound policy) while the control plane is up.
    tcp_ok(&mesh.a, mesh.tcp_addr(), "warm-up").unwrap();
    http_ok(&mesh.a, mesh.http_addr()).unwrap();

    let control = mesh.control.process();
    control.signal(libc::SIGKILL);
    assert!(
        control.wait_timeout(Duration::from_secs(5)).is_some(),
        "the control plane should be gone"
    );

    let client_id = mesh.client.spiffe_id();
    let inbound_before = mesh.b_admin().metrics().value(&mesh_tls("inbound", &client_id));
    let mut failures = Vec::new();
    let started = Instant::now();
    for i in 0..50 {
        let tick = Instant::now();
        let result = match i % 2 {
            0 => tcp_ok(&mesh.a, mesh.tcp_addr(), "control plane down"),
            _ => http_ok(&mesh.a, mesh.http_addr()),
        };
        if let Err(e) = result {
            failures.push(format!("request {i} at {:?}: {e}", started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }
    assert!(
        failures.is_empty(),
        "{} of 50 requests failed: {failures:#?}",
        failures.len()
    );

    // Still mTLS with the held certificates, still ready.
    mesh.b_admin()
        .wait_at_least(&mesh_tls("inbound", &client_id), inbound_before + 25.0);
    for admin in [mesh.a_admin(), mesh.b_admin()] {
        assert_eq!(admin.get("/ready").unwrap().status, 200);
        assert!(admin.identity().unwrap().spiffe_id.is_some());
    }
}

/// A port whose authorization the proxy has not yet fetched when the control plane becomes
/// unreachable must not fall back to admitting everyone: the policy says only the client may
/// connect. Today the lookup gives up after 1 s and `PILLION_INBOUND_DEFAULT_AUTHORIZATION`
/// (`all-unauthenticated` by default) decides: plaintext from outside the mesh gets through.
#[test]
fn unknown_port_policy_does_not_fail_open_when_the_control_plane_is_down() {
    if !require_root("unknown_port_policy_does_not_fail_open_when_the_control_plane_is_down") {
        return;
    }
    let mut mesh = Mesh::start(
        "failopen",
        &allow(&spiffe_id("default", "client")),
        ControlPlaneOptions::default(),
    );
    let control = mesh.control.process();
    control.signal(libc::SIGKILL);
    assert!(control.wait_timeout(Duration::from_secs(5)).is_some());
    assert!(
        tcp_denied(&mesh.outsider, mesh.tcp_addr()).unwrap(),
        "plaintext from outside the mesh reached the app on a port only the client may use"
    );
}

/// Certificates of 10 s and a control plane that goes away: once both have expired, no new mesh
/// connection completes (no TLS session outlives its certificate) and both proxies leave their
/// Services' endpoints (`/ready` 503). When the control plane returns, both re-certify and
/// traffic flows again, without a restart.
#[test]
fn an_expired_identity_fails_closed_and_recovers_with_the_control_plane() {
    if !require_root("an_expired_identity_fails_closed_and_recovers_with_the_control_plane") {
        return;
    }
    let options = ControlPlaneOptions {
        cert_lifetime: Some("10s".into()),
        ..ControlPlaneOptions::default()
    };
    let mut mesh = Mesh::start("expiry", &allow(&spiffe_id("default", "client")), options.clone());
    tcp_ok(&mesh.a, mesh.tcp_addr(), "before").unwrap();
    http_ok(&mesh.a, mesh.http_addr()).unwrap();

    let control = mesh.control.process();
    control.signal(libc::SIGKILL);
    assert!(control.wait_timeout(Duration::from_secs(5)).is_some());

    // Both certificates run out within 10 s of the last renewal.
    let expired = pillion_tests::poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let statuses = [mesh.a_admin(), mesh.b_admin()].map(|admin| admin.get("/ready").map(|r| r.status).unwrap_or(0));
        (statuses == [503, 503]).then_some(())
    });
    assert!(
        expired.is_some(),
        "both proxies should turn not-ready once their certificates expire"
    );
    let mut last_expiry = 0;
    for admin in [mesh.a_admin(), mesh.b_admin()] {
        let identity = admin.identity().unwrap();
        assert!(identity.not_after.unwrap() <= unix_now(), "{identity:?}");
        assert_eq!(identity.expires_in_seconds, Some(0), "{identity:?}");
        last_expiry = last_expiry.max(identity.not_after.unwrap());
    }
    // X.509 validity includes the notAfter second itself: step past it.
    while unix_now() <= last_expiry + 1 {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A new mesh connection is refused: neither side accepts the other's expired certificate.
    assert!(
        tcp_ok(&mesh.a, mesh.tcp_addr(), "after expiry").is_err(),
        "a connection completed with expired certificates"
    );
    assert!(
        http_ok(&mesh.a, mesh.http_addr()).is_err(),
        "a request completed with expired certificates"
    );

    // The control plane comes back at the same address: both proxies renew and serve again.
    let control_addr = mesh.control.listen_addr();
    mesh.control = ControlPlane::start(&mesh.files, Some(&mesh.b), control_addr, &options, &mesh._logs)
        .unwrap_or_else(|e| panic!("{e}"));
    let recovered = pillion_tests::poll_until(Duration::from_secs(60), Duration::from_millis(250), || {
        let statuses = [mesh.a_admin(), mesh.b_admin()].map(|admin| admin.get("/ready").map(|r| r.status).unwrap_or(0));
        (statuses == [200, 200]).then_some(())
    });
    assert!(
        recovered.is_some(),
        "both proxies should be ready again once the control plane is back"
    );
    tcp_ok(&mesh.a, mesh.tcp_addr(), "recovered").unwrap();
    http_ok(&mesh.a, mesh.http_addr()).unwrap();
}
