//! Load balancing end to end: a client pod calls a service that is backed by several server pods,
//! and its proxy spreads the requests over the service's endpoints, avoids a slow one, routes
//! around a dead one, fails fast when none is left, and never sends a request to an endpoint
//! whose proxy cannot prove the identity the policy gives it.
//!
//! The scene is a small node: a "node" namespace with a bridge, `pillion-control serve` on the
//! bridge's address, and four pods plugged into it — the client and three server pods, each with
//! `pillion-iptables-init` and a `pillion-proxy` running as its own UID that takes its certificate
//! from the control plane. Each endpoint is a **separate server pod** (not three ports behind one
//! proxy), so every hop to an endpoint is mesh TLS to that pod's own proxy, and an endpoint can be
//! stopped, slowed or impersonated on its own. The server pods all run as `shop/api`, like the
//! replicas of one Deployment; each runs the HTTP app on 8080 and a TCP echo on 6379.
//!
//! The test thread in the client pod plays the client app: it dials the service's ClusterIP
//! `10.96.0.10:80`, an address no pod has (the redirect takes it to the client's proxy before
//! routing would), so the proxy must choose an endpoint: the control plane's policy keys the
//! service by that `ip:port` (or by its name, matched by `Host`) and lists the three pods'
//! `ip:8080` as its endpoints, each with its expected identity. The server pods' port 8080 admits
//! authenticated clients only, so an answer from an app means the hop was mTLS.
//!
//! Which endpoint answered is read from the app (`x-app`) and cross-checked with the client
//! proxy's balancer metrics. No assertion depends on how long anything took.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pillion_tests::http_peers::app::HttpApp;
use pillion_tests::http_peers::raw::{self, RawResponse};
use pillion_tests::mesh::{ControlPlane, ControlPlaneOptions, MeshFiles, Workload, identity_env, spiffe_id};
use pillion_tests::netns::{Bridge, Netns};
use pillion_tests::pod::PodOptions;
use pillion_tests::process::LogDir;
use pillion_tests::sidecar::{AdminPort, Sidecar};
use pillion_tests::traffic::{Server, echo, opaque, roundtrip, set_timeouts};
use pillion_tests::{poll_until, require_root};

/// The server pods' HTTP app port (the endpoints' port), and where a slow endpoint's real app
/// listens behind its delaying front.
const APP_PORT: u16 = 8080;
const HIDDEN_APP_PORT: u16 = 8085;
/// The server pods' TCP echo, on a port the proxies treat as opaque by default (Redis's).
const ECHO_PORT: u16 = 6379;
const CONTROL_PORT: u16 = 8090;

/// The service's ClusterIP: no pod has it, so only the client's proxy can say where it goes.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
/// The service's name, for the scenario that keys the destination by name.
const SERVICE_NAME: &str = "api.shop.svc.cluster.local";

/// How long the slow endpoint takes to answer.
const SLOW_DELAY: Duration = Duration::from_millis(300);

/// Upper bound on each request loop, besides its count: a stuck proxy fails the test instead of
/// hanging it (every socket also has a 30 s timeout).
const LOOP_LIMIT: Duration = Duration::from_secs(120);

/// A failure backoff longer than any run here: once an endpoint trips it stays out for the rest
/// of the test, so the failures a client sees are exactly the ones before the trip (a probe after
/// a default 1 s backoff would add one more at a time that depends on the machine's speed).
const LONG_BACKOFF: &str = "failureAccrual: { consecutiveFailures: 7, minBackoff: 60s, maxBackoff: 120s }";
/// The default `consecutiveFailures`: the most failures one endpoint can cause before it trips.
const CONSECUTIVE_FAILURES: usize = 7;

/// Bounds on the warm-up of each endpoint (see [`Cluster::warm_up`]).
const WARM_UP_ATTEMPTS: usize = 5;
const WARM_UP_LIMIT: Duration = Duration::from_secs(20);

/// Third octet of the next node's subnet (`10.204.<n>.0/24`).
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// What a server pod runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// The app answers at once.
    Fast,
    /// The app answers after [`SLOW_DELAY`].
    Slow,
}

/// The addresses and identities a scene's policy is written from.
#[derive(Debug, Clone)]
struct Names {
    servers: Vec<Ipv4Addr>,
    /// The identity every server pod actually has.
    api_id: String,
}

/// The node, its control plane, the client pod and the server pods.
///
/// Fields drop in declaration order: proxies first, then the apps, the control plane, the bridge
/// and the namespaces; the log directory goes last (and stays if the test failed).
struct Cluster {
    _client_proxy: Sidecar,
    _server_proxies: Vec<Sidecar>,
    _fronts: Vec<SlowFront>,
    /// The server pods' HTTP apps, by endpoint index; `None` once stopped.
    apps: Vec<Option<HttpApp>>,
    echoes: Vec<Server>,
    _control: ControlPlane,
    _bridge: Bridge,
    client: Netns,
    _servers: Vec<Netns>,
    _node: Netns,
    _files: MeshFiles,
    names: Names,
    _logs: LogDir,
}

/// A slow endpoint's front: listens on the app's port in the pod and relays each connection to
/// the real app on another port, holding every chunk of the app's answer for a while. The app
/// harness answers at once unless the *path* asks for a delay; the front makes one endpoint slow
/// whatever the client sends. Stops accepting on drop.
struct SlowFront {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// How one request was answered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    /// 200 from the app named here.
    App(String),
    /// An answer the client proxy (or an endpoint's proxy) made itself: status and
    /// `pillion-proxy-error`.
    Proxy(u16, String),
    /// Anything else: status, `x-app` and body.
    Other(String),
}

impl Names {
    /// Endpoint `i`'s address.
    fn endpoint(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::from((self.servers[i], port))
    }
}

impl Cluster {
    /// Starts a node with one server pod per entry of `endpoints`, all `shop/api`, and the
    /// control plane's policy that `policy` writes.
    fn start(tag: &str, endpoints: &[Endpoint], policy: impl FnOnce(&Names) -> String) -> Cluster {
        let logs = LogDir::new(tag);
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let node_ip = Ipv4Addr::new(10, 204, n, 1);
        let client_ip = Ipv4Addr::new(10, 204, n, 10);
        let server_ips: Vec<Ipv4Addr> = (0..endpoints.len())
            .map(|i| Ipv4Addr::new(10, 204, n, 21 + i as u8))
            .collect();

        let client = Workload::new("default", "client");
        let api = Workload::new("shop", "api");
        let names = Names {
            servers: server_ips.clone(),
            api_id: api.spiffe_id(),
        };
        let files = MeshFiles::create(logs.path(), &[&client, &api]).unwrap_or_else(|e| panic!("{e}"));
        files.write_policy(&policy(&names)).unwrap_or_else(|e| panic!("{e}"));

        let node = Netns::new(&format!("{tag}-node"));
        let bridge = Bridge::new(&node, "br0", node_ip).unwrap_or_else(|e| panic!("{e}"));
        let control = ControlPlane::start(
            &files,
            Some(&node),
            SocketAddr::from((node_ip, CONTROL_PORT)),
            &ControlPlaneOptions::default(),
            &logs,
        )
        .unwrap_or_else(|e| panic!("{e}"));

        let mut servers = Vec::new();
        let mut server_proxies = Vec::new();
        let mut apps = Vec::new();
        let mut fronts = Vec::new();
        let mut echoes = Vec::new();
        for (i, (kind, ip)) in endpoints.iter().zip(&server_ips).enumerate() {
            let name = format!("api-{}", i + 1);
            let ns = Netns::new(&format!("{tag}-s{}", i + 1));
            bridge
                .attach(&ns, "eth0", &format!("veth-s{}", i + 1), *ip)
                .unwrap_or_else(|e| panic!("{e}"));
            let options = identity_env(PodOptions::default(), &control, &files, &api);
            server_proxies.push(Sidecar::start(&ns, &name, &options, &logs).unwrap_or_else(|e| panic!("{e}")));
            match kind {
                Endpoint::Fast => apps.push(Some(HttpApp::start(&ns, APP_PORT, &name))),
                Endpoint::Slow => {
                    apps.push(Some(HttpApp::start(&ns, HIDDEN_APP_PORT, &name)));
                    fronts.push(SlowFront::start(&ns, APP_PORT, HIDDEN_APP_PORT, SLOW_DELAY));
                }
            }
            echoes.push(Server::start(
                ns.listen(SocketAddr::from(([0, 0, 0, 0], ECHO_PORT))),
                echo,
            ));
            servers.push(ns);
        }

        let client_ns = Netns::new(&format!("{tag}-c"));
        bridge
            .attach(&client_ns, "eth0", "veth-c", client_ip)
            .unwrap_or_else(|e| panic!("{e}"));
        let options = identity_env(PodOptions::default(), &control, &files, &client);
        let client_proxy = Sidecar::start(&client_ns, "client", &options, &logs).unwrap_or_else(|e| panic!("{e}"));

        Cluster {
            _client_proxy: client_proxy,
            _server_proxies: server_proxies,
            _fronts: fronts,
            apps,
            echoes,
            _control: control,
            _bridge: bridge,
            client: client_ns,
            _servers: servers,
            _node: node,
            _files: files,
            names,
            _logs: logs,
        }
    }

    fn client_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.client)
    }

    fn app(&self, i: usize) -> &HttpApp {
        self.apps[i].as_ref().expect("the app is running")
    }

    /// Stops endpoint `i`'s app: its listener closes; its pod and proxy stay.
    fn stop_app(&mut self, i: usize) {
        drop(self.apps[i].take().expect("the app is running"));
    }

    /// Calls each of `endpoints` directly at `port` (a TCP round trip on the echo port, else a
    /// `GET`) from the client app until it answers, a few times at most. An app that dials an
    /// endpoint itself is not balanced, so this touches no balancer; it makes each server pod's
    /// proxy hold its inbound policy before the scenario starts. Otherwise a pod's first request
    /// depends on its proxy getting the control plane's answer for the port within the 1 s it
    /// waits (it refuses with 403 rather than fail open), which a loaded machine can miss; the
    /// scenarios here are about balancing.
    fn warm_up(&self, endpoints: &[usize], port: u16) {
        for &i in endpoints {
            let addr = self.names.endpoint(i, port);
            let mut failures = Vec::new();
            let answered = poll_until(WARM_UP_LIMIT, Duration::from_millis(100), || {
                match self.call_directly(addr, port, failures.len()) {
                    Ok(()) => Some(true),
                    Err(e) => {
                        failures.push(e);
                        (failures.len() >= WARM_UP_ATTEMPTS).then_some(false)
                    }
                }
            });
            assert_eq!(
                answered,
                Some(true),
                "endpoint {addr} did not answer the client directly: {failures:?}"
            );
            if !failures.is_empty() {
                eprintln!("warm-up: {addr} answered after {failures:?}");
            }
        }
    }

    /// One direct call of the client app to `addr` (see [`Cluster::warm_up`]).
    fn call_directly(&self, addr: SocketAddr, port: u16, attempt: usize) -> Result<(), String> {
        let mut conn = self.client.connect(addr).map_err(|e| format!("connect: {e}"))?;
        if port == ECHO_PORT {
            return roundtrip(&mut conn, &opaque("warm-up")).map_err(|e| format!("echo: {e}"));
        }
        let request = raw::get(
            &format!("/warm-up/{attempt}"),
            &addr.to_string(),
            &[("connection", "close")],
        );
        let response = raw::exchange(&mut conn, &request).map_err(|e| format!("GET: {e}"))?;
        match Answer::of(&response) {
            Answer::App(_) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    }

    /// `GET path` from the client app to the service's ClusterIP with `Host: host`, on a fresh
    /// connection.
    fn get(&self, host: &str, path: &str) -> io::Result<RawResponse> {
        let mut conn = self.client.connect(service_addr(SERVICE_PORT))?;
        raw::exchange(&mut conn, &raw::get(path, host, &[("connection", "close")]))
    }

    /// Sends `count` requests (fresh connections, `Host: host`), bounded by [`LOOP_LIMIT`];
    /// returns the answers in order.
    fn requests(&self, count: usize, host: &str, tag: &str) -> Vec<Answer> {
        let started = Instant::now();
        let mut answers = Vec::with_capacity(count);
        for i in 0..count {
            assert!(
                started.elapsed() < LOOP_LIMIT,
                "{tag}: only {i} of {count} requests within {LOOP_LIMIT:?}: {:?}",
                tally(&answers)
            );
            let response = self
                .get(host, &format!("/{tag}/{i}"))
                .unwrap_or_else(|e| panic!("{tag}: request {i}: {e}; so far {:?}", tally(&answers)));
            answers.push(Answer::of(&response));
        }
        answers
    }

    /// `pillion_balancer_endpoint_requests_total` of endpoint `i` (at `port`) of `destination`,
    /// on the client's proxy.
    fn endpoint_requests(&self, destination: &str, i: usize, port: u16) -> f64 {
        self.client_admin()
            .metrics()
            .value(&endpoint_requests(destination, self.names.endpoint(i, port)))
    }
}

impl SlowFront {
    /// Relays `0.0.0.0:port` in `ns` to `127.0.0.1:app_port`, holding each chunk of the answer
    /// for `delay`.
    fn start(ns: &Netns, port: u16, app_port: u16, delay: Duration) -> SlowFront {
        let listener = ns.listen(SocketAddr::from(([0, 0, 0, 0], port)));
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        // The accept thread lives in the pod, so its connections to the app are the pod's own.
        let accept = ns.spawn({
            let stop = stop.clone();
            move || accept_slowly(&listener, SocketAddr::from(([127, 0, 0, 1], app_port)), delay, &stop)
        });
        SlowFront {
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for SlowFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // Relay threads end when either side closes; their sockets have timeouts.
    }
}

/// Accepts until `stop`, polling (a std listener cannot be woken from outside otherwise).
fn accept_slowly(listener: &TcpListener, app: SocketAddr, delay: Duration, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((downstream, _)) => {
                if let Err(e) = relay_slowly(downstream, app, delay) {
                    eprintln!("slow front: relaying to {app}: {e}");
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Connects `downstream` to the app: requests pass at once, each chunk of an answer after `delay`.
fn relay_slowly(downstream: TcpStream, app: SocketAddr, delay: Duration) -> io::Result<()> {
    downstream.set_nonblocking(false)?;
    let upstream = TcpStream::connect_timeout(&app, Duration::from_secs(5))?;
    for stream in [&downstream, &upstream] {
        set_timeouts(stream)?;
        stream.set_nodelay(true)?;
    }
    let (mut request_in, mut request_out) = (downstream.try_clone()?, upstream.try_clone()?);
    std::thread::spawn(move || {
        let _ = io::copy(&mut request_in, &mut request_out);
        let _ = request_out.shutdown(Shutdown::Write);
    });
    let (mut answer_in, mut answer_out) = (upstream, downstream);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match answer_in.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    std::thread::sleep(delay);
                    if answer_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = answer_out.shutdown(Shutdown::Write);
    });
    Ok(())
}

impl Answer {
    fn of(response: &RawResponse) -> Answer {
        match (
            response.status,
            response.header("x-app"),
            response.header("pillion-proxy-error"),
        ) {
            (200, Some(app), None) => Answer::App(app.to_owned()),
            (status, None, Some(reason)) => Answer::Proxy(status, reason.to_owned()),
            (status, app, _) => Answer::Other(format!("{status} from {app:?}: {}", response.body_text().trim())),
        }
    }

    fn is_app(&self, name: &str) -> bool {
        matches!(self, Answer::App(app) if app == name)
    }
}

/// How many times each answer came.
fn tally(answers: &[Answer]) -> BTreeMap<Answer, usize> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.clone()).or_default() += 1;
    }
    counts
}

/// The number of answers from app `name`.
fn count(answers: &[Answer], name: &str) -> usize {
    answers.iter().filter(|a| a.is_app(name)).count()
}

/// The service's ClusterIP and `port`.
fn service_addr(port: u16) -> SocketAddr {
    SocketAddr::from((SERVICE_IP, port))
}

/// The destination key (and metric label) of the service by address: `10.96.0.10:<port>`.
fn by_address(port: u16) -> String {
    service_addr(port).to_string()
}

/// A policy with one destination `key` whose endpoints are `endpoints` (address and identity),
/// with an optional `loadBalancer` body, and the server pods' app and echo ports open to
/// authenticated clients only.
fn policy(key: &str, endpoints: &[(SocketAddr, String)], load_balancer: Option<&str>) -> String {
    let listed: Vec<String> = endpoints
        .iter()
        .map(|(address, identity)| format!("{{ address: {address}, identity: {identity} }}"))
        .collect();
    let mut yaml = format!(
        "destinations:\n  - destination: {key}\n    endpoints: [{}]\n",
        listed.join(", ")
    );
    if let Some(load_balancer) = load_balancer {
        yaml.push_str(&format!("    loadBalancer: {{ {load_balancer} }}\n"));
    }
    yaml.push_str("inbound:\n");
    for port in [APP_PORT, ECHO_PORT] {
        yaml.push_str(&format!("  - port: {port}\n    authorization: all-authenticated\n"));
    }
    yaml
}

/// The usual policy: the service by ClusterIP, every server pod at `port` with its true identity.
fn service_policy(names: &Names, port: u16, service_port: u16, load_balancer: Option<&str>) -> String {
    let endpoints: Vec<(SocketAddr, String)> = (0..names.servers.len())
        .map(|i| (names.endpoint(i, port), names.api_id.clone()))
        .collect();
    policy(&by_address(service_port), &endpoints, load_balancer)
}

/// `pillion_balancer_endpoint_requests_total{destination,endpoint}`.
fn endpoint_requests(destination: &str, endpoint: SocketAddr) -> String {
    format!("pillion_balancer_endpoint_requests_total{{destination=\"{destination}\",endpoint=\"{endpoint}\"}}")
}

/// `pillion_balancer_endpoints{destination,state}`.
fn endpoints_in(destination: &str, state: &str) -> String {
    format!("pillion_balancer_endpoints{{destination=\"{destination}\",state=\"{state}\"}}")
}

/// Asserts that every answer is a 200 from one of the apps.
fn assert_all_from_apps(answers: &[Answer], what: &str) {
    assert!(
        answers.iter().all(|a| matches!(a, Answer::App(_))),
        "{what}: every request answered 200 by an app: {:?}",
        tally(answers)
    );
}

/// Three endpoints, 60 requests on one kept-alive connection: every request is answered 200,
/// each endpoint answers some (the choice is per request, not per connection), and the client
/// proxy's per-endpoint counters account for all of them.
#[test]
fn requests_are_spread_over_the_endpoints() {
    if !require_root("requests_are_spread_over_the_endpoints") {
        return;
    }
    const REQUESTS: usize = 60;
    let cluster = Cluster::start("bal-spread", &[Endpoint::Fast; 3], |names| {
        service_policy(names, APP_PORT, SERVICE_PORT, None)
    });
    cluster.warm_up(&[0, 1, 2], APP_PORT);
    let destination = by_address(SERVICE_PORT);

    let mut conn = cluster
        .client
        .connect(service_addr(SERVICE_PORT))
        .unwrap_or_else(|e| panic!("connecting to {destination}: {e}"));
    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 0..REQUESTS {
        assert!(
            started.elapsed() < LOOP_LIMIT,
            "only {i} requests within {LOOP_LIMIT:?}"
        );
        let response =
            raw::exchange(&mut conn, &raw::get(&format!("/spread/{i}"), &destination, &[])).unwrap_or_else(|e| {
                panic!(
                    "request {i} on the kept-alive connection: {e}; so far {:?}",
                    tally(&answers)
                )
            });
        answers.push(Answer::of(&response));
    }
    assert_all_from_apps(&answers, "three healthy endpoints");
    for i in 0..3 {
        let name = format!("api-{}", i + 1);
        let seen = cluster.app(i).requests_to("/spread/").len();
        assert!(
            seen >= 1,
            "{name} answered none of {REQUESTS} requests: {:?}",
            tally(&answers)
        );
        assert_eq!(
            seen,
            count(&answers, &name),
            "{name}: requests it saw vs answers it gave"
        );
    }

    let metrics = cluster.client_admin().metrics();
    let per_endpoint: Vec<f64> = (0..3)
        .map(|i| metrics.value(&endpoint_requests(&destination, cluster.names.endpoint(i, APP_PORT))))
        .collect();
    let total: f64 = per_endpoint.iter().sum();
    assert!(
        total >= REQUESTS as f64,
        "the balancer counted {per_endpoint:?} requests per endpoint, {total} in all, for {REQUESTS} sent:\n{}",
        metrics.text()
    );
    assert_eq!(
        metrics.value(&endpoints_in(&destination, "ready")),
        3.0,
        "{}",
        metrics.text()
    );
    eprintln!(
        "spread over three endpoints: {:?}; balancer counters {per_endpoint:?}",
        tally(&answers)
    );
}

/// One endpoint answers after 300 ms, the other two at once: once it has shown its latency it is
/// avoided, so it answers few of 60 requests (at most 15%), and every request is answered 200.
#[test]
fn a_slow_endpoint_gets_a_small_share() {
    if !require_root("a_slow_endpoint_gets_a_small_share") {
        return;
    }
    const REQUESTS: usize = 60;
    let cluster = Cluster::start("bal-slow", &[Endpoint::Fast, Endpoint::Slow, Endpoint::Fast], |names| {
        service_policy(names, APP_PORT, SERVICE_PORT, None)
    });
    cluster.warm_up(&[0, 1, 2], APP_PORT);
    let destination = by_address(SERVICE_PORT);
    let answers = cluster.requests(REQUESTS, &destination, "slow");
    assert_all_from_apps(&answers, "two fast endpoints and a slow one");

    let slow = count(&answers, "api-2");
    assert!(
        slow >= 1,
        "the slow endpoint was never tried, so its latency was never seen: {:?}",
        tally(&answers)
    );
    assert!(
        slow * 100 <= REQUESTS * 15,
        "the slow endpoint answered {slow} of {REQUESTS} requests (more than 15%): {:?}",
        tally(&answers)
    );
    assert_eq!(
        cluster.app(1).requests_to("/slow/").len(),
        slow,
        "the slow app saw exactly the requests it answered"
    );
    let counted = cluster.endpoint_requests(&destination, 1, APP_PORT);
    assert_eq!(counted, slow as f64, "the balancer's count for the slow endpoint");
    eprintln!("one slow endpoint: {:?}", tally(&answers));
}

/// One endpoint's app is stopped mid-run (its pod and proxy stay, so attempts to it get 502 from
/// its proxy): the requests keep succeeding on the other two, apart from at most one run of
/// failures before failure accrual takes it out (latency may avoid it even sooner).
#[test]
fn a_stopped_endpoint_is_routed_around() {
    if !require_root("a_stopped_endpoint_is_routed_around") {
        return;
    }
    let mut cluster = Cluster::start("bal-stop", &[Endpoint::Fast; 3], |names| {
        service_policy(names, APP_PORT, SERVICE_PORT, Some(LONG_BACKOFF))
    });
    cluster.warm_up(&[0, 1, 2], APP_PORT);
    let destination = by_address(SERVICE_PORT);

    let before = cluster.requests(30, &destination, "before");
    assert_all_from_apps(&before, "before the stop");
    for name in ["api-1", "api-2", "api-3"] {
        assert!(
            count(&before, name) >= 1,
            "{name} answered nothing before the stop: {:?}",
            tally(&before)
        );
    }

    let answered = cluster.app(1).requests_to("/before/").len();
    assert_eq!(answered, count(&before, "api-2"));
    cluster.stop_app(1);
    let after = cluster.requests(60, &destination, "after");
    let failures: Vec<&Answer> = after.iter().filter(|a| !matches!(a, Answer::App(_))).collect();
    assert!(
        failures.len() <= CONSECUTIVE_FAILURES,
        "{} failures after api-2 stopped (at most {CONSECUTIVE_FAILURES}, one run before failure accrual): {:?}",
        failures.len(),
        tally(&after)
    );
    for failure in &failures {
        assert!(
            matches!(failure, Answer::Proxy(502, _)),
            "a request to the stopped endpoint fails fast with the proxy's 502: {:?}",
            tally(&after)
        );
    }
    assert_eq!(count(&after, "api-2"), 0, "{:?}", tally(&after));
    assert_eq!(
        count(&after, "api-1") + count(&after, "api-3") + failures.len(),
        after.len()
    );
    assert!(
        count(&after, "api-1") >= 1 && count(&after, "api-3") >= 1,
        "both remaining endpoints serve: {:?}",
        tally(&after)
    );
    // The balancer counted an attempt for every failure (each went to the stopped endpoint).
    let to_stopped = cluster.endpoint_requests(&destination, 1, APP_PORT);
    assert_eq!(
        to_stopped,
        (answered + failures.len()) as f64,
        "attempts to api-2: {answered} answered before the stop, {} failed after",
        failures.len()
    );
    eprintln!("after stopping api-2: {:?}", tally(&after));
}

/// Every endpoint's app stopped, queue time 500 ms: within 30 requests (7 failures per endpoint
/// trip all three) the client gets the proxy's own 503 `no healthy endpoint`, and the balancer's
/// gauge shows the endpoints in backoff.
#[test]
fn no_endpoint_left_answers_503_no_healthy_endpoint() {
    if !require_root("no_endpoint_left_answers_503_no_healthy_endpoint") {
        return;
    }
    const MAX_REQUESTS: usize = 30;
    let lb = format!("queueTimeout: 500ms, {LONG_BACKOFF}");
    let mut cluster = Cluster::start("bal-none", &[Endpoint::Fast; 3], |names| {
        service_policy(names, APP_PORT, SERVICE_PORT, Some(&lb))
    });
    cluster.warm_up(&[0, 1, 2], APP_PORT);
    let destination = by_address(SERVICE_PORT);
    assert_all_from_apps(&cluster.requests(6, &destination, "warm"), "before the stop");

    for i in 0..3 {
        cluster.stop_app(i);
    }
    let started = Instant::now();
    let mut answers = Vec::new();
    let mut fail_fast = None;
    for i in 0..MAX_REQUESTS {
        assert!(
            started.elapsed() < LOOP_LIMIT,
            "only {i} requests within {LOOP_LIMIT:?}"
        );
        let response = cluster
            .get(&destination, &format!("/gone/{i}"))
            .unwrap_or_else(|e| panic!("request {i}: {e}; so far {:?}", tally(&answers)));
        let answer = Answer::of(&response);
        answers.push(answer.clone());
        if answer == Answer::Proxy(503, "no healthy endpoint".to_owned()) {
            fail_fast = Some((i, response));
            break;
        }
        assert!(
            matches!(answer, Answer::Proxy(502, _)),
            "request {i} to a destination with no app left: {answer:?}"
        );
    }
    // Scraped right away: the backoff (at least 60 s) outlasts the test.
    let metrics = cluster.client_admin().metrics();
    let Some((at, response)) = fail_fast else {
        panic!(
            "no 503 'no healthy endpoint' within {MAX_REQUESTS} requests: {:?}\n{}",
            tally(&answers),
            metrics.text()
        );
    };
    assert_eq!(
        at,
        3 * CONSECUTIVE_FAILURES,
        "7 failures trip each of the three endpoints, then the next request finds none: {:?}",
        tally(&answers)
    );
    assert_eq!(response.header("x-app"), None);
    let backoff = metrics.value(&endpoints_in(&destination, "backoff"));
    assert!(backoff > 0.0, "no endpoint in backoff:\n{}", metrics.text());
    assert_eq!(backoff, 3.0, "{}", metrics.text());
    assert!(
        metrics.value("pillion_balancer_no_healthy_endpoint_total") >= 1.0,
        "{}",
        metrics.text()
    );
    eprintln!("no endpoint left: {:?}", tally(&answers));
}

/// An impersonation attempt: the policy says endpoint 3 is `shop/other`, but the pod at that
/// address holds a genuine mesh certificate for `shop/api` (it is not the workload the policy
/// names). The client's proxy verifies each endpoint's identity, so it never sends a request
/// there: that app gets no request, the two true endpoints serve, and the attempts that picked
/// the impostor fail in the client's proxy (at most one run of failures before accrual takes it
/// out). The destination is keyed by the service's name here (matched by `Host`), so balancing
/// by name is covered too.
#[test]
fn an_endpoint_without_its_identity_never_gets_a_request() {
    if !require_root("an_endpoint_without_its_identity_never_gets_a_request") {
        return;
    }
    const REQUESTS: usize = 60;
    let key = format!("{SERVICE_NAME}:{SERVICE_PORT}");
    let cluster = Cluster::start("bal-ident", &[Endpoint::Fast; 3], |names| {
        let endpoints = [
            (names.endpoint(0, APP_PORT), names.api_id.clone()),
            (names.endpoint(1, APP_PORT), names.api_id.clone()),
            (names.endpoint(2, APP_PORT), spiffe_id("shop", "other")),
        ];
        policy(&key, &endpoints, Some(LONG_BACKOFF))
    });
    // The impostor is not warmed: the client's proxy refuses it whoever dials it.
    cluster.warm_up(&[0, 1], APP_PORT);
    let answers = cluster.requests(REQUESTS, SERVICE_NAME, "ident");

    // Its own proxy may pass the client proxy's handshake through to it as foreign TLS (the
    // ClientHello names shop/other, not the pod's identity): bytes of a refused handshake, never
    // a request.
    let impostor = cluster.app(2);
    assert!(
        impostor.requests().is_empty(),
        "the endpoint whose proxy is not shop/other got requests (connections from {:?}): {:#?}",
        impostor.connections(),
        impostor.requests()
    );
    assert_eq!(count(&answers, "api-3"), 0, "{:?}", tally(&answers));
    let failures: Vec<&Answer> = answers.iter().filter(|a| !matches!(a, Answer::App(_))).collect();
    for failure in &failures {
        assert!(
            matches!(failure, Answer::Proxy(502, _)),
            "an attempt at the impostor fails in the client's proxy: {:?}",
            tally(&answers)
        );
    }
    assert!(
        failures.len() <= CONSECUTIVE_FAILURES,
        "{} failures (at most one run of {CONSECUTIVE_FAILURES}): {:?}",
        failures.len(),
        tally(&answers)
    );
    assert!(
        count(&answers, "api-1") >= 1 && count(&answers, "api-2") >= 1,
        "the genuine endpoints serve: {:?}",
        tally(&answers)
    );
    // The impostor was tried (so the test shows a refusal, not mere avoidance), and every attempt
    // at it is one of the failures the client saw.
    let tried = cluster.endpoint_requests(&key, 2, APP_PORT);
    assert!(
        tried >= 1.0,
        "the balancer never picked the impostor:\n{}",
        cluster.client_admin().metrics().text()
    );
    assert_eq!(tried, failures.len() as f64, "{:?}", tally(&answers));
    eprintln!("one endpoint without its identity: {:?}", tally(&answers));
}

/// Opaque TCP (an opaque port, 6379): each connection to the service goes to one endpoint, and
/// 30 connections are spread over the three, each echoed intact.
#[test]
fn opaque_connections_are_balanced_per_connection() {
    if !require_root("opaque_connections_are_balanced_per_connection") {
        return;
    }
    const CONNECTIONS: usize = 30;
    let cluster = Cluster::start("bal-tcp", &[Endpoint::Fast; 3], |names| {
        service_policy(names, ECHO_PORT, ECHO_PORT, None)
    });
    cluster.warm_up(&[0, 1, 2], ECHO_PORT);
    let warm: Vec<usize> = cluster.echoes.iter().map(|echo| echo.peers().len()).collect();
    let destination = by_address(ECHO_PORT);
    let started = Instant::now();
    for i in 0..CONNECTIONS {
        assert!(
            started.elapsed() < LOOP_LIMIT,
            "only {i} connections within {LOOP_LIMIT:?}"
        );
        let mut conn = cluster
            .client
            .connect(service_addr(ECHO_PORT))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        roundtrip(&mut conn, &opaque(&format!("connection {i}")))
            .unwrap_or_else(|e| panic!("connection {i}: echo: {e}"));
    }
    let accepted: Vec<usize> = cluster
        .echoes
        .iter()
        .zip(&warm)
        .map(|(echo, warm)| echo.peers().len() - warm)
        .collect();
    assert_eq!(
        accepted.iter().sum::<usize>(),
        CONNECTIONS,
        "each connection reached one endpoint once: {accepted:?}"
    );
    assert!(
        accepted.iter().all(|&n| n >= 1),
        "every endpoint took some connections: {accepted:?}"
    );
    let counted: Vec<f64> = (0..3)
        .map(|i| cluster.endpoint_requests(&destination, i, ECHO_PORT))
        .collect();
    assert_eq!(
        counted,
        accepted.iter().map(|&n| n as f64).collect::<Vec<_>>(),
        "the balancer's per-endpoint counts"
    );
    eprintln!("opaque connections per endpoint: {accepted:?}");
}
