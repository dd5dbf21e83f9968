//! Routes from the control plane, end to end: the proxy applies the routes, timeouts, retries and
//! weighted splits of `pillion-control serve --policy` exactly as it applies the same YAML in its
//! own route file (`PILLION_CONFIG`).
//!
//! The scene is the mesh of `tests/mesh.rs`: two pods (network namespaces joined by a veth), each
//! with `pillion-iptables-init` and a `pillion-proxy` running as its own UID that takes its
//! certificate from the control plane, which runs in pod B's namespace. Pod B runs three apps
//! (`server` on 8080, `blue` on 8081, `green` on 8082); the test thread in pod A plays A's app, so
//! its plaintext requests are redirected to A's outbound proxy, which originates mTLS to the ports
//! the control plane's policy lists with B's identity.
//!
//! Most scenarios run twice, once with the routes in A's route file and once with the same routes
//! in the control plane's policy ([`Source`]): the route-file run proves the scene, the app and
//! the assertions, so a failing control-plane run is about where the routes came from. Besides:
//! a destination the control plane knows only by a service name (matched by `Host`), precedence
//! (the control plane's routes win for a destination it knows, the file keeps the others), and a
//! service account with dots in its name.
//!
//! Ports: B ignores inbound 8090 (the control plane) and A ignores outbound 8090, so the proxies
//! reach the control plane directly.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use pillion_tests::http_peers::app::HttpApp;
use pillion_tests::http_peers::raw::{self, RawResponse};
use pillion_tests::http_peers::route_file::RouteFile;
use pillion_tests::mesh::{ControlPlane, ControlPlaneOptions, MeshFiles, Workload, identity_env};
use pillion_tests::netns::{Netns, VethEnd, VethLink};
use pillion_tests::pod::PodOptions;
use pillion_tests::process::LogDir;
use pillion_tests::sidecar::{AdminPort, Sidecar};
use pillion_tests::{poll_until, require_root};

/// B's apps: `server` (the destination every scenario calls), and `blue` and `green` (the
/// backends of a weighted split).
const APP_PORT: u16 = 8080;
const BLUE_PORT: u16 = 8081;
const GREEN_PORT: u16 = 8082;
const CONTROL_PORT: u16 = 8090;

/// How long a policy change may take to reach the proxies: the control plane polls its file
/// every second and pushes to the open watch streams; the proxy polls its route file every second.
const POLICY_PROPAGATION: Duration = Duration::from_secs(10);

/// The timeout of the routes under test, and how long the app's slow handler takes: far enough
/// apart that a loaded machine cannot blur which one answered.
const SHORT_TIMEOUT: &str = "200ms";
const SLOW_MS: u64 = 1500;

/// A service name that resolves (for the test) to B's app.
const SERVICE: &str = "api.shop.svc.cluster.local";

/// Third octet of the next scene's subnet (`10.203.<n>.0/24`).
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// Where a scenario's routes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A's route file (`PILLION_CONFIG`). The control plane does not know B's app, so that the
    /// file alone decides (for a destination the control plane knows, its routes win): the hop to
    /// B's app is plaintext, and B's other apps, the backends of a split, are meshed.
    RouteFile,
    /// The control plane's policy; A's route file has no destinations.
    ControlPlane,
}

/// B's address and identity: what the policies are written from.
#[derive(Debug, Clone)]
struct Names {
    b_ip: Ipv4Addr,
    server_id: String,
}

/// The two policy files of a scene.
#[derive(Debug, Clone)]
struct Policies {
    control: String,
    file: String,
}

/// Two meshed pods, the control plane in pod B, B's three apps and A's route file.
///
/// Fields drop in declaration order: proxies first, then the apps, the control plane, the link
/// and namespaces, A's route file; the log directory goes last (and stays if the test failed).
struct Scene {
    _a_proxy: Sidecar,
    _b_proxy: Sidecar,
    server: HttpApp,
    blue: HttpApp,
    green: HttpApp,
    _control: ControlPlane,
    _link: VethLink,
    a: Netns,
    b: Netns,
    files: MeshFiles,
    routes: RouteFile,
    names: Names,
    client: Workload,
    _logs: LogDir,
}

/// One HTTP/1.1 connection from A's app, kept alive across requests.
struct KeepAlive {
    conn: TcpStream,
    host: String,
}

impl Names {
    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.b_ip, port))
    }

    /// A destination entry for B's `port`, keyed by `ip:port`, with B's identity as its endpoint
    /// (so the hop is mesh TLS).
    fn meshed(&self, port: u16, routes: &[String]) -> String {
        let addr = self.addr(port);
        destination(&addr.to_string(), Some((addr, &self.server_id)), routes)
    }

    /// The control plane's usual policy: B's three ports meshed and open to authenticated
    /// clients only (so a request that reaches an app crossed in mTLS), with `app_routes` on B's
    /// app port.
    fn control(&self, app_routes: &[String]) -> String {
        policy(
            &[
                self.meshed(APP_PORT, app_routes),
                self.meshed(BLUE_PORT, &[]),
                self.meshed(GREEN_PORT, &[]),
            ],
            &[APP_PORT, BLUE_PORT, GREEN_PORT],
        )
    }

    /// The control plane's policy without B's app: only `blue` and `green` are meshed.
    fn control_without_app(&self) -> String {
        policy(
            &[self.meshed(BLUE_PORT, &[]), self.meshed(GREEN_PORT, &[])],
            &[BLUE_PORT, GREEN_PORT],
        )
    }

    /// `app_routes` for B's app (`b_ip:8080`), written where `source` says.
    fn with_app_routes(&self, source: Source, app_routes: &[String]) -> Policies {
        match source {
            Source::RouteFile => Policies {
                control: self.control_without_app(),
                file: policy(&[destination(&self.addr(APP_PORT).to_string(), None, app_routes)], &[]),
            },
            Source::ControlPlane => Policies {
                control: self.control(app_routes),
                file: NO_ROUTES.to_owned(),
            },
        }
    }
}

/// A's route file when the scenario's routes come from elsewhere.
const NO_ROUTES: &str = "destinations: []\n";

impl Scene {
    /// Starts the scene with `server` as B's workload and the policies `make` writes for it.
    fn start(tag: &str, server: Workload, make: impl FnOnce(&Names) -> Policies) -> Scene {
        let logs = LogDir::new(tag);
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let (a_ip, b_ip) = (Ipv4Addr::new(10, 203, n, 1), Ipv4Addr::new(10, 203, n, 2));
        let a = Netns::new(&format!("{tag}-a"));
        let b = Netns::new(&format!("{tag}-b"));
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

        let client = Workload::new("default", "client");
        let names = Names {
            b_ip,
            server_id: server.spiffe_id(),
        };
        let policies = make(&names);
        let files = MeshFiles::create(logs.path(), &[&client, &server]).unwrap_or_else(|e| panic!("{e}"));
        files.write_policy(&policies.control).unwrap_or_else(|e| panic!("{e}"));
        let routes = RouteFile::new(&policies.file);
        let control_addr = SocketAddr::from((b_ip, CONTROL_PORT));
        let control = ControlPlane::start(&files, Some(&b), control_addr, &ControlPlaneOptions::default(), &logs)
            .unwrap_or_else(|e| panic!("{e}"));

        let b_options = identity_env(PodOptions::default(), &control, &files, &server)
            .init_args(["--inbound-ports-to-ignore", &format!("4191,{CONTROL_PORT}")]);
        let b_proxy = Sidecar::start(&b, "b", &b_options, &logs).unwrap_or_else(|e| panic!("{e}"));
        let a_options = identity_env(PodOptions::default(), &control, &files, &client)
            .init_args(["--outbound-ports-to-ignore", &CONTROL_PORT.to_string()])
            .proxy_env("PILLION_CONFIG", routes.env_value());
        let a_proxy = Sidecar::start(&a, "a", &a_options, &logs).unwrap_or_else(|e| panic!("{e}"));

        Scene {
            _a_proxy: a_proxy,
            _b_proxy: b_proxy,
            server: HttpApp::start(&b, APP_PORT, "server"),
            blue: HttpApp::start(&b, BLUE_PORT, "blue"),
            green: HttpApp::start(&b, GREEN_PORT, "green"),
            _control: control,
            _link: link,
            a,
            b,
            files,
            routes,
            names,
            client,
            _logs: logs,
        }
    }

    /// The usual scene: B is `default/server`, and `app_routes` are on B's app in `source`.
    fn with_app_routes(tag: &str, source: Source, app_routes: &[String]) -> Scene {
        Scene::start(tag, Workload::new("default", "server"), |names| {
            names.with_app_routes(source, app_routes)
        })
    }

    fn a_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.a)
    }

    fn b_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.b)
    }

    fn app_addr(&self) -> SocketAddr {
        self.names.addr(APP_PORT)
    }

    /// Rewrites both policies (the route file and the control plane's) from `policies`.
    fn set_policies(&self, policies: &Policies) {
        self.files
            .write_policy(&policies.control)
            .unwrap_or_else(|e| panic!("{e}"));
        self.routes.replace(&policies.file);
    }

    /// `GET path` from A's app to `addr` with `Host: host`, on a fresh connection.
    fn get(&self, addr: SocketAddr, host: &str, path: &str) -> RawResponse {
        get_once(&self.a, addr, host, path).unwrap_or_else(|e| panic!("GET {path} (Host: {host}) via {addr}: {e}"))
    }

    /// `GET path` to B's app by its address.
    fn get_app(&self, path: &str) -> RawResponse {
        self.get(self.app_addr(), &self.app_addr().to_string(), path)
    }

    /// A keep-alive connection from A's app to B's app.
    fn keep_alive(&self) -> KeepAlive {
        let addr = self.app_addr();
        let conn = self
            .a
            .connect(addr)
            .unwrap_or_else(|e| panic!("connect {addr} from A: {e}"));
        KeepAlive {
            conn,
            host: addr.to_string(),
        }
    }
}

impl KeepAlive {
    /// `GET path` on this connection; the connection stays open.
    fn get(&mut self, path: &str) -> io::Result<RawResponse> {
        raw::exchange(&mut self.conn, &raw::get(path, &self.host, &[]))
    }
}

/// `GET path` on a fresh connection from `ns`, `Connection: close`.
fn get_once(ns: &Netns, addr: SocketAddr, host: &str, path: &str) -> io::Result<RawResponse> {
    let mut conn = ns.connect(addr)?;
    raw::exchange(&mut conn, &raw::get(path, host, &[("connection", "close")]))
}

/// One destination entry of a policy file; `endpoint` (address and identity) only in the
/// control plane's.
fn destination(key: &str, endpoint: Option<(SocketAddr, &str)>, routes: &[String]) -> String {
    let mut entry = format!("  - destination: {key}\n");
    if let Some((address, identity)) = endpoint {
        entry.push_str(&format!(
            "    endpoints: [{{ address: {address}, identity: {identity} }}]\n"
        ));
    }
    if !routes.is_empty() {
        entry.push_str(&format!("    routes: [{}]\n", routes.join(", ")));
    }
    entry
}

/// A policy file: `destinations`, and the ports listed open to authenticated clients only.
fn policy(destinations: &[String], authenticated_ports: &[u16]) -> String {
    let mut yaml = String::from("destinations:\n");
    for entry in destinations {
        yaml.push_str(entry);
    }
    if !authenticated_ports.is_empty() {
        yaml.push_str("inbound:\n");
        for port in authenticated_ports {
            yaml.push_str(&format!("  - port: {port}\n    authorization: all-authenticated\n"));
        }
    }
    yaml
}

/// A route for paths under `prefix`, with a request timeout.
fn timeout_route(name: &str, prefix: &str, timeout: &str) -> String {
    format!(
        "{{ name: {name}, matches: [{{ path: {{ type: PathPrefix, value: {prefix} }} }}], timeouts: {{ request: {timeout} }} }}"
    )
}

/// A route for paths under `prefix` that retries 503 twice.
fn retry_route(name: &str, prefix: &str) -> String {
    format!(
        "{{ name: {name}, matches: [{{ path: {{ type: PathPrefix, value: {prefix} }} }}], retry: {{ codes: [503], attempts: 2, backoff: 10ms }} }}"
    )
}

/// A route for paths under `prefix`, split between two backends by weight.
fn split_route(name: &str, prefix: &str, backends: [(SocketAddr, u32); 2]) -> String {
    let [(a, wa), (b, wb)] = backends;
    format!(
        "{{ name: {name}, matches: [{{ path: {{ type: PathPrefix, value: {prefix} }} }}], backendRefs: [{{ address: {a}, weight: {wa} }}, {{ address: {b}, weight: {wb} }}] }}"
    )
}

/// `pillion_http_requests_total` of A's outbound, for `route` and `status`.
fn outbound_requests(route: &str, status: u16) -> String {
    format!("pillion_http_requests_total{{direction=\"outbound\",route=\"{route}\",status_code=\"{status}\"}}")
}

/// `pillion_tcp_mesh_connections_total{direction,tls="true",peer_id}`.
fn mesh_tls(direction: &str, peer_id: &str) -> String {
    format!("pillion_tcp_mesh_connections_total{{direction=\"{direction}\",tls=\"true\",peer_id=\"{peer_id}\"}}")
}

const PLAINTEXT_INBOUND: &str = "pillion_tcp_mesh_connections_total{direction=\"inbound\",tls=\"false\"}";

/// The slow app path under test: `/slow/<SLOW_MS>/<tag>`.
fn slow(tag: &str) -> String {
    format!("/slow/{SLOW_MS}/{tag}")
}

/// Asserts that `response` is the proxy's request-timeout answer.
fn assert_request_timeout(response: &RawResponse, what: &str) {
    assert_eq!(
        (response.status, response.header("pillion-proxy-error")),
        (504, Some("request timeout")),
        "{what}: expected the proxy's 504 after {SHORT_TIMEOUT}, got {} {:?} {}",
        response.status,
        response.headers,
        response.body_text()
    );
}

/// Asserts that `response` is B's app answering 200.
fn assert_app_ok(response: &RawResponse, app: &str, what: &str) {
    assert_eq!(
        (response.status, response.header("x-app")),
        (200, Some(app)),
        "{what}: expected 200 from {app}, got {} {:?} {}",
        response.status,
        response.headers,
        response.body_text()
    );
    assert!(response.header("pillion-proxy-error").is_none(), "{what}: {response:?}");
}

/// A route with a request timeout on `/slow`: the app's slow answer is cut off with 504, from the
/// very first request; other paths are untouched.
fn request_timeout_answers_504(tag: &str, source: Source) {
    let scene = Scene::with_app_routes(tag, source, &[timeout_route("slow", "/slow", SHORT_TIMEOUT)]);
    // Two fresh connections: the first request to a destination must already follow its routes.
    for attempt in ["first", "second"] {
        let response = scene.get_app(&slow(attempt));
        assert_request_timeout(&response, &format!("{source:?}: the {attempt} slow request"));
    }
    assert_app_ok(&scene.get_app("/hello"), "server", "a path outside the route");
    scene.a_admin().wait_at_least(&outbound_requests("slow", 504), 2.0);
    scene.a_admin().wait_at_least(
        "pillion_http_timeouts_total{direction=\"outbound\",route=\"slow\"}",
        2.0,
    );
}

/// A retry policy on `/fail-first`: the app fails the first two attempts with 503 and answers the
/// third; the client sees only the 200.
fn retries_turn_503_into_200(tag: &str, source: Source) {
    let scene = Scene::with_app_routes(tag, source, &[retry_route("flaky", "/fail-first")]);
    let path = "/fail-first/2/once";
    let response = scene.get_app(path);
    let attempts = scene.server.requests_to(path).len();
    assert_app_ok(
        &response,
        "server",
        &format!("{source:?}: after {attempts} attempts at the app"),
    );
    assert_eq!(
        attempts,
        3,
        "{source:?}: two 503s retried, then the 200: {:#?}",
        scene.server.requests_to(path)
    );
    scene.a_admin().wait_at_least(
        "pillion_http_retries_total{direction=\"outbound\",route=\"flaky\"}",
        2.0,
    );
}

/// A weighted split (80/20 between `blue` and `green`) of requests to B's app: over 1,000
/// requests on one keep-alive connection, each backend's share is within 5 points of its weight,
/// and B's own app sees none of them.
fn weighted_split_follows_the_weights(tag: &str, source: Source) {
    const REQUESTS: usize = 1000;
    const LIMIT: Duration = Duration::from_secs(120);
    let scene = Scene::start(tag, Workload::new("default", "server"), |names| {
        let split = split_route(
            "split",
            "/split",
            [(names.addr(BLUE_PORT), 80), (names.addr(GREEN_PORT), 20)],
        );
        names.with_app_routes(source, &[split])
    });

    let mut conn = scene.keep_alive();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for i in 0..REQUESTS {
        if started.elapsed() > LIMIT {
            break;
        }
        let response = conn.get(&format!("/split/{i}")).unwrap_or_else(|e| {
            panic!("{source:?}: request {i} on the kept-alive connection: {e}; so far {answers:?}")
        });
        let who = match (response.status, response.header("x-app")) {
            (200, Some(app)) => app.to_owned(),
            (status, app) => format!("{status} from {app:?}"),
        };
        *answers.entry(who).or_default() += 1;
    }
    let total: usize = answers.values().sum();
    assert_eq!(
        total, REQUESTS,
        "{source:?}: only {total} requests within {LIMIT:?}: {answers:?}"
    );
    let share = |app: &str| 100.0 * answers.get(app).copied().unwrap_or(0) as f64 / REQUESTS as f64;
    for (app, weight) in [("blue", 80.0), ("green", 20.0)] {
        assert!(
            (share(app) - weight).abs() <= 5.0,
            "{source:?}: {app} got {:.1}% of the requests, weight {weight}%: {answers:?}",
            share(app)
        );
    }
    assert!(
        scene.server.requests_to("/split").is_empty(),
        "{source:?}: the original destination is not a backend of the split"
    );
    let seen = scene.blue.requests_to("/split").len() + scene.green.requests_to("/split").len();
    assert_eq!(seen, REQUESTS, "{source:?}: each request reached one backend once");
}

/// A policy change applies to the next request of a connection that was open before it: adding a
/// timeout route turns the next slow request on the same connection into a 504, removing it turns
/// it back into a 200.
fn policy_change_applies_to_a_kept_alive_connection(tag: &str, source: Source) {
    let scene = Scene::with_app_routes(tag, source, &[]);
    let mut conn = scene.keep_alive();
    let before = conn.get(&slow("before")).unwrap();
    assert_app_ok(&before, "server", &format!("{source:?}: before any route"));

    let timeout = [timeout_route("slow", "/slow", SHORT_TIMEOUT)];
    scene.set_policies(&scene.names.with_app_routes(source, &timeout));
    // Fresh connections tell when the new policy is in force; then the kept-alive one must follow.
    let mut probes = 0;
    let applied = poll_until(POLICY_PROPAGATION, Duration::from_millis(100), || {
        probes += 1;
        (scene.get_app(&slow(&format!("probe-{probes}"))).status == 504).then_some(())
    });
    assert!(
        applied.is_some(),
        "{source:?}: the timeout route is not in force for new connections {POLICY_PROPAGATION:?} after it was added"
    );
    let during = conn
        .get(&slow("during"))
        .unwrap_or_else(|e| panic!("{source:?}: the kept-alive connection after the change: {e}"));
    assert_request_timeout(
        &during,
        &format!("{source:?}: the kept-alive connection's next request"),
    );

    scene.set_policies(&scene.names.with_app_routes(source, &[]));
    let removed = poll_until(POLICY_PROPAGATION, Duration::from_millis(100), || {
        probes += 1;
        (scene.get_app(&slow(&format!("probe-{probes}"))).status == 200).then_some(())
    });
    assert!(
        removed.is_some(),
        "{source:?}: the timeout route is still in force {POLICY_PROPAGATION:?} after it was removed"
    );
    let after = conn
        .get(&slow("after"))
        .unwrap_or_else(|e| panic!("{source:?}: the kept-alive connection after the removal: {e}"));
    assert_app_ok(
        &after,
        "server",
        &format!("{source:?}: the kept-alive connection's next request after the removal"),
    );
    assert_eq!(
        scene
            .server
            .requests_to("/slow/")
            .iter()
            .filter(|seen| !seen.target.contains("probe-"))
            .count(),
        3,
        "{source:?}: the kept-alive connection's three requests reached the app"
    );
}

#[test]
fn a_request_timeout_from_the_route_file_answers_504() {
    if !require_root("a_request_timeout_from_the_route_file_answers_504") {
        return;
    }
    request_timeout_answers_504("cpt-file", Source::RouteFile);
}

#[test]
fn retries_from_the_route_file_turn_503_into_200() {
    if !require_root("retries_from_the_route_file_turn_503_into_200") {
        return;
    }
    retries_turn_503_into_200("cpr-file", Source::RouteFile);
}

#[test]
fn a_weighted_split_from_the_route_file_follows_the_weights() {
    if !require_root("a_weighted_split_from_the_route_file_follows_the_weights") {
        return;
    }
    weighted_split_follows_the_weights("cps-file", Source::RouteFile);
}

#[test]
fn a_route_file_change_applies_to_a_kept_alive_connection() {
    if !require_root("a_route_file_change_applies_to_a_kept_alive_connection") {
        return;
    }
    policy_change_applies_to_a_kept_alive_connection("cpk-file", Source::RouteFile);
}

/// Routes keyed by a service name in A's route file: requests to B's address with that name as
/// `Host` follow them.
#[test]
fn a_service_name_in_the_route_file_routes_by_host() {
    if !require_root("a_service_name_in_the_route_file_routes_by_host") {
        return;
    }
    let scene = Scene::start("cpn-file", Workload::new("default", "server"), |names| Policies {
        control: names.control_without_app(),
        file: policy(
            &[destination(
                &format!("{SERVICE}:{APP_PORT}"),
                None,
                &[timeout_route("api-slow", "/slow", SHORT_TIMEOUT)],
            )],
            &[],
        ),
    });
    let host = format!("{SERVICE}:{APP_PORT}");
    assert_request_timeout(&scene.get(scene.app_addr(), &host, &slow("by-name")), "by name");
    assert_app_ok(&scene.get(scene.app_addr(), &host, "/hello"), "server", "by name");
    assert_eq!(
        scene.server.only_request_to("/hello").header("host"),
        Some(host.as_str())
    );
    scene.a_admin().wait_at_least(&outbound_requests("api-slow", 504), 1.0);
}

/// A workload whose service account has a dot in its name (`shop/payments.v2`, a valid
/// Kubernetes name) is certified by the control plane and reachable over mesh TLS.
#[test]
fn a_service_account_with_dots_is_certified_and_reachable_over_mesh_tls() {
    if !require_root("a_service_account_with_dots_is_certified_and_reachable_over_mesh_tls") {
        return;
    }
    let server = Workload::new("shop", "payments.v2");
    let server_id = server.spiffe_id();
    let scene = Scene::start("cpdots", server, |names| Policies {
        control: names.control(&[]),
        file: NO_ROUTES.to_owned(),
    });
    let identity = scene.b_admin().identity().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(identity.spiffe_id.as_deref(), Some(server_id.as_str()), "{identity:?}");
    assert_eq!(identity.source, "control-plane", "{identity:?}");

    // B's port admits authenticated clients only: reaching the app means the hop was mTLS.
    assert_app_ok(&scene.get_app("/hello"), "server", "to shop/payments.v2");
    scene.a_admin().wait_at_least(&mesh_tls("outbound", &server_id), 1.0);
    scene
        .b_admin()
        .wait_at_least(&mesh_tls("inbound", &scene.client.spiffe_id()), 1.0);
    assert_eq!(scene.b_admin().metrics().value(PLAINTEXT_INBOUND), 0.0);
}

#[test]
fn a_request_timeout_from_the_control_plane_answers_504() {
    if !require_root("a_request_timeout_from_the_control_plane_answers_504") {
        return;
    }
    request_timeout_answers_504("cpt-cp", Source::ControlPlane);
}

#[test]
fn retries_from_the_control_plane_turn_503_into_200() {
    if !require_root("retries_from_the_control_plane_turn_503_into_200") {
        return;
    }
    retries_turn_503_into_200("cpr-cp", Source::ControlPlane);
}

#[test]
fn a_weighted_split_from_the_control_plane_follows_the_weights() {
    if !require_root("a_weighted_split_from_the_control_plane_follows_the_weights") {
        return;
    }
    weighted_split_follows_the_weights("cps-cp", Source::ControlPlane);
}

#[test]
fn a_control_plane_policy_change_applies_to_a_kept_alive_connection() {
    if !require_root("a_control_plane_policy_change_applies_to_a_kept_alive_connection") {
        return;
    }
    policy_change_applies_to_a_kept_alive_connection("cpk-cp", Source::ControlPlane);
}

/// A destination the control plane knows only by its service name (its endpoint is B's app):
/// requests to B's address with that name as `Host` (in any case, with or without the trailing
/// dot) cross in mTLS with B's identity and follow the destination's routes.
#[test]
fn a_service_name_from_the_control_plane_is_meshed_and_routed_by_host() {
    if !require_root("a_service_name_from_the_control_plane_is_meshed_and_routed_by_host") {
        return;
    }
    let scene = Scene::start("cpn-cp", Workload::new("default", "server"), |names| {
        let app = names.addr(APP_PORT);
        Policies {
            control: policy(
                &[destination(
                    &format!("{SERVICE}:{APP_PORT}"),
                    Some((app, &names.server_id)),
                    &[timeout_route("api-slow", "/slow", SHORT_TIMEOUT)],
                )],
                &[],
            ),
            file: NO_ROUTES.to_owned(),
        }
    });
    let host = format!("{SERVICE}:{APP_PORT}");
    assert_app_ok(&scene.get(scene.app_addr(), &host, "/hello"), "server", "by name");
    assert_eq!(
        scene.server.only_request_to("/hello").header("host"),
        Some(host.as_str())
    );
    let client_id = scene.client.spiffe_id();
    scene.b_admin().wait_at_least(&mesh_tls("inbound", &client_id), 1.0);
    scene
        .a_admin()
        .wait_at_least(&mesh_tls("outbound", &scene.names.server_id), 1.0);
    assert_eq!(
        scene.b_admin().metrics().value(PLAINTEXT_INBOUND),
        0.0,
        "the request by name crossed in plaintext"
    );

    assert_request_timeout(&scene.get(scene.app_addr(), &host, &slow("by-name")), "by name");
    let spelled = format!("API.Shop.svc.cluster.local.:{APP_PORT}");
    assert_request_timeout(
        &scene.get(scene.app_addr(), &spelled, &slow("spelled")),
        &format!("by name spelled {spelled}"),
    );
    // By address, no destination is keyed by B's app: the name's routes do not apply.
    assert_app_ok(
        &scene.get_app(&slow("by-address")),
        "server",
        "by address, outside the name's routes",
    );
}

/// For a destination the control plane knows, its routes win over A's route file; a destination
/// only in the route file keeps the file's routes.
#[test]
fn the_control_plane_routes_win_over_the_route_file_for_destinations_it_knows() {
    if !require_root("the_control_plane_routes_win_over_the_route_file_for_destinations_it_knows") {
        return;
    }
    let scene = Scene::start("cpprec", Workload::new("default", "server"), |names| Policies {
        // B's app: 5 s in the control plane (the slow answer fits), 200 ms in the file (it would not).
        // Blue: not in the control plane's policy at all, 200 ms in the file.
        control: policy(
            &[
                names.meshed(APP_PORT, &[timeout_route("control-slow", "/slow", "5s")]),
                names.meshed(GREEN_PORT, &[]),
            ],
            &[APP_PORT, GREEN_PORT],
        ),
        file: policy(
            &[
                destination(
                    &names.addr(APP_PORT).to_string(),
                    None,
                    &[timeout_route("file-slow", "/slow", SHORT_TIMEOUT)],
                ),
                destination(
                    &names.addr(BLUE_PORT).to_string(),
                    None,
                    &[timeout_route("file-only", "/slow", SHORT_TIMEOUT)],
                ),
            ],
            &[],
        ),
    });
    let known = scene.get_app(&slow("known"));
    assert_app_ok(&known, "server", "the control plane's 5 s route, not the file's 200 ms");
    scene
        .a_admin()
        .wait_at_least(&outbound_requests("control-slow", 200), 1.0);
    assert_eq!(
        scene.a_admin().metrics().value(&outbound_requests("file-slow", 504)),
        0.0
    );

    let blue = scene.names.addr(BLUE_PORT);
    let unknown = scene.get(blue, &blue.to_string(), &slow("file-only"));
    assert_request_timeout(&unknown, "a destination only in the route file");
    scene.a_admin().wait_at_least(&outbound_requests("file-only", 504), 1.0);
}
