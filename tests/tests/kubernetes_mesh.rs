//! Kubernetes mode end to end: `pillion-control serve --kubernetes` follows an emulated API
//! server and drives real proxies, with no policy file and no kube-proxy.
//!
//! The scene is a small node, as in `tests/balancing.rs`: a "node" namespace with a bridge, the
//! control plane on the bridge's address, a client pod and server pods plugged into it, each with
//! `pillion-iptables-init` and a `pillion-proxy` running as its own UID that takes its
//! certificate from the control plane (token file mode: the tokens stand for the pods' projected
//! service-account tokens). The server pods run as `shop/api`, each with the HTTP app on 8080.
//!
//! The cluster's objects come from the emulated Kubernetes API of the control plane's tests
//! (control/tests/support/apiserver.rs: list/watch over HTTP, resourceVersions, 410 Gone). It runs
//! inside this test process, on a thread in the node's namespace, so the control plane reaches it
//! on the node's loopback through a kubeconfig, and the test changes objects directly (and knows
//! when each watch event was made). The objects describe the pods as Kubernetes would: Namespaces,
//! each Pod with its `pillion-proxy` container, service account and `status.podIP`, the Service
//! `shop/api` (ClusterIP `10.96.0.10`, port 80 to 8080) and its EndpointSlice.
//!
//! The client app (the test thread in the client pod) dials the ClusterIP, an address no pod has:
//! only the client's proxy, through discovery, can say where it goes, and it balances over the
//! endpoints itself. Which endpoint answered is read from the app (`x-app`) and from the client
//! proxy's balancer metrics. Timings are printed, never asserted: each wait is bounded.

#[path = "../../control/tests/support/apiserver.rs"]
mod apiserver;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use apiserver::ApiServer;
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use pillion_tests::binaries;
use pillion_tests::http_peers::app::HttpApp;
use pillion_tests::http_peers::raw::{self, RawResponse};
use pillion_tests::mesh::{CONTROL_IDENTITY, MeshFiles, TRUST_DOMAIN, Workload};
use pillion_tests::netns::{Bridge, Netns};
use pillion_tests::pod::{PodOptions, without_pillion_env};
use pillion_tests::process::{LogDir, Process};
use pillion_tests::sidecar::{AdminPort, Sidecar};
use pillion_tests::{poll_until, require_root};
use serde_json::{Value, json};

const APP_PORT: u16 = 8080;
const CONTROL_PORT: u16 = 8090;

/// The Service `shop/api`: its ClusterIP (no pod has it), port and name.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const SERVICE_NAME: &str = "api.shop.svc.cluster.local";

/// The control plane binds its port only once it has listed the cluster.
const CONTROL_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a change in the cluster to reach the client's proxy.
const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on every request loop, besides its count.
const LOOP_LIMIT: Duration = Duration::from_secs(60);
/// Pause between two requests of a background load: enough requests to time a change to a few
/// milliseconds without taking a core from the processes under test.
const LOAD_PERIOD: Duration = Duration::from_millis(2);

/// The node bridge's own MAC address, fixed before any pod plugs in (see tests/balancing.rs).
const BRIDGE_MAC: &str = "02:00:0a:cd:00:01";

/// Third octet of the next node's subnet (`10.205.<n>.0/24`).
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// The emulated API server, serving from a thread in the node's namespace until dropped.
struct Emulator {
    api: Option<ApiServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Starts it on the node's loopback: the thread enters the namespace before its runtime binds
    /// the listener, so the socket (and every connection accepted on it) is the node's.
    fn start(node: &Netns) -> Emulator {
        let (started_tx, started_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = node.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building the API server's runtime");
            runtime.block_on(async move {
                let _ = started_tx.send(ApiServer::start().await);
                let _ = stopped.await;
            });
        });
        let api = started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the emulated API server did not start");
        Emulator {
            api: Some(api),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("the API server is running")
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // The server first (it ends its watches), then its runtime.
        drop(self.api.take());
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How one request was answered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    /// 200 from the app named here.
    App(String),
    /// An answer a proxy made itself: status and `pillion-proxy-error`.
    Proxy(u16, String),
    /// Anything else, or no answer.
    Other(String),
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

/// One request of a [`Load`]: when it was sent, and how it was answered.
#[derive(Debug, Clone)]
struct Sent {
    sent: Instant,
    answer: Answer,
}

/// A client app sending requests to the ClusterIP without pause, on keep-alive connections
/// (a fresh one every `per_connection` requests, and after any error), until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    /// The app of the latest answer, while the load runs.
    latest: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<Vec<Sent>>>,
}

impl Load {
    fn start(client: &Netns, host: &str, tag: &str, per_connection: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(None));
        let (host, tag) = (host.to_owned(), tag.to_owned());
        let thread = client.spawn({
            let (stop, latest) = (stop.clone(), latest.clone());
            move || {
                let started = Instant::now();
                let mut sent = Vec::new();
                let mut conn: Option<TcpStream> = None;
                let mut on_conn = 0;
                // Bounded in time and count; a stuck proxy fails the test instead of hanging it.
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LOOP_LIMIT && sent.len() < 100_000 {
                    let at = Instant::now();
                    let answer = match request_on(&mut conn, &host, &format!("/{tag}/{}", sent.len())) {
                        Ok(response) => Answer::of(&response),
                        Err(e) => {
                            conn = None;
                            Answer::Other(format!("no answer: {e}"))
                        }
                    };
                    on_conn += 1;
                    if on_conn >= per_connection {
                        conn = None;
                        on_conn = 0;
                    }
                    if let Answer::App(app) = &answer {
                        *latest.lock().expect("latest answer") = Some(app.clone());
                    }
                    sent.push(Sent { sent: at, answer });
                    std::thread::sleep(LOAD_PERIOD);
                }
                sent
            }
        });
        Load {
            stop,
            latest,
            thread: Some(thread),
        }
    }

    /// The server (index) that answered the latest request; waits for a first answer.
    fn latest_server(&self) -> usize {
        let app = poll_until(LOOP_LIMIT, Duration::from_millis(10), || {
            self.latest.lock().expect("latest answer").clone()
        })
        .expect("the load got no answer from an app");
        app.strip_prefix("api-")
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| n.checked_sub(1))
            .unwrap_or_else(|| panic!("unexpected app {app}"))
    }

    /// Stops the load and returns every request it sent.
    fn finish(mut self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("the load thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `GET path` to the ClusterIP on `conn` (opened if needed; kept open).
fn request_on(conn: &mut Option<TcpStream>, host: &str, path: &str) -> io::Result<RawResponse> {
    if conn.is_none() {
        *conn = Some(connect_here(service_addr())?);
    }
    let stream = conn.as_mut().expect("just connected");
    raw::exchange(stream, &raw::get(path, host, &[]))
}

/// Connects from the calling thread (already in the client's namespace), with timeouts.
fn connect_here(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    pillion_tests::traffic::set_timeouts(&stream)?;
    Ok(stream)
}

/// The node, its API server and control plane, the client pod and the server pods.
///
/// Fields drop in declaration order: proxies first, then the apps, the control plane, the API
/// server, the bridge and the namespaces; the log directory goes last (and stays on failure).
struct Cluster {
    _client_proxy: Sidecar,
    _server_proxies: Vec<Sidecar>,
    apps: Vec<HttpApp>,
    control: Process,
    emulator: Emulator,
    _bridge: Bridge,
    client: Netns,
    servers: Vec<Netns>,
    _node: Netns,
    _files: MeshFiles,
    server_ips: Vec<Ipv4Addr>,
    client_id: String,
    api_id: String,
    _logs: LogDir,
}

impl Cluster {
    /// Starts a node with `servers` server pods (`api-1`, `api-2`, …, all `shop/api`), the
    /// objects that describe them, and whatever `extra` adds to the cluster before the control
    /// plane lists it.
    fn start(tag: &str, servers: usize, extra: impl FnOnce(&ApiServer, &[Ipv4Addr])) -> Cluster {
        let logs = LogDir::new(tag);
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let node_ip = Ipv4Addr::new(10, 205, n, 1);
        let client_ip = Ipv4Addr::new(10, 205, n, 10);
        let server_ips: Vec<Ipv4Addr> = (0..servers).map(|i| Ipv4Addr::new(10, 205, n, 21 + i as u8)).collect();

        let client = Workload::new("default", "client");
        let api = Workload::new("shop", "api");
        let files = MeshFiles::create(logs.path(), &[&client, &api]).unwrap_or_else(|e| panic!("{e}"));

        let node = Netns::new(&format!("{tag}-node"));
        let bridge = Bridge::new(&node, "br0", node_ip).unwrap_or_else(|e| panic!("{e}"));
        node.exec_ok("ip", &["link", "set", "br0", "address", BRIDGE_MAC]);

        // The cluster as the API server holds it once the pods are scheduled and running.
        let emulator = Emulator::start(&node);
        let cluster = emulator.api();
        cluster.apply(&namespace("shop"));
        cluster.apply(&namespace("default"));
        cluster.apply(&pod("default", "client", client_ip, "client"));
        for (i, ip) in server_ips.iter().enumerate() {
            cluster.apply(&pod("shop", &server_name(i), *ip, "api"));
        }
        cluster.apply(&service("api", SERVICE_IP));
        let ready: Vec<(Ipv4Addr, String, bool)> = server_ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (*ip, server_name(i), true))
            .collect();
        cluster.apply(&slice("api", &ready));
        extra(cluster, &server_ips);

        let kubeconfig = logs.path().join("kubeconfig");
        std::fs::write(&kubeconfig, cluster.kubeconfig()).unwrap_or_else(|e| panic!("writing the kubeconfig: {e}"));
        let control_addr = SocketAddr::from((node_ip, CONTROL_PORT));
        let control = start_control_plane(&node, &files, &kubeconfig, control_addr, &logs);

        let mut server_namespaces = Vec::new();
        let mut server_proxies = Vec::new();
        let mut apps = Vec::new();
        for (i, ip) in server_ips.iter().enumerate() {
            let name = server_name(i);
            let ns = Netns::new(&format!("{tag}-s{}", i + 1));
            bridge
                .attach(&ns, "eth0", &format!("veth-s{}", i + 1), *ip)
                .unwrap_or_else(|e| panic!("{e}"));
            let options = identity(control_addr, &files, &api);
            server_proxies.push(Sidecar::start(&ns, &name, &options, &logs).unwrap_or_else(|e| panic!("{e}")));
            apps.push(HttpApp::start(&ns, APP_PORT, &name));
            server_namespaces.push(ns);
        }

        let client_ns = Netns::new(&format!("{tag}-c"));
        bridge
            .attach(&client_ns, "eth0", "veth-c", client_ip)
            .unwrap_or_else(|e| panic!("{e}"));
        let options = identity(control_addr, &files, &client);
        let client_proxy = Sidecar::start(&client_ns, "client", &options, &logs).unwrap_or_else(|e| panic!("{e}"));

        Cluster {
            _client_proxy: client_proxy,
            _server_proxies: server_proxies,
            apps,
            control,
            emulator,
            _bridge: bridge,
            client: client_ns,
            servers: server_namespaces,
            _node: node,
            _files: files,
            server_ips,
            client_id: client.spiffe_id(),
            api_id: api.spiffe_id(),
            _logs: logs,
        }
    }

    fn api(&self) -> &ApiServer {
        self.emulator.api()
    }

    fn client_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.client)
    }

    fn server_admin(&self, i: usize) -> AdminPort<'_> {
        AdminPort::of_pod(&self.servers[i])
    }

    /// Endpoint `i`'s address, as its EndpointSlice lists it.
    fn endpoint(&self, i: usize) -> SocketAddr {
        SocketAddr::from((self.server_ips[i], APP_PORT))
    }

    /// The EndpointSlice of `shop/api` with server `i` ready or not as `ready(i)` says; `None`
    /// leaves it out.
    fn api_slice(&self, ready: impl Fn(usize) -> Option<bool>) -> EndpointSlice {
        let endpoints: Vec<(Ipv4Addr, String, bool)> = (0..self.server_ips.len())
            .filter_map(|i| ready(i).map(|r| (self.server_ips[i], server_name(i), r)))
            .collect();
        slice("api", &endpoints)
    }

    /// `GET path` from the client app to the ClusterIP with `Host: host`, on a fresh connection.
    fn get(&self, host: &str, path: &str) -> io::Result<RawResponse> {
        let mut conn = self.client.connect(service_addr())?;
        raw::exchange(&mut conn, &raw::get(path, host, &[("connection", "close")]))
    }

    /// Calls the Service until each of `apps` has answered once (a server proxy refuses with 403
    /// until it holds its inbound policy; the scenarios are about what comes after). Bounded.
    fn warm_up(&self, apps: &[usize]) {
        let mut seen = vec![false; self.apps.len()];
        let mut other = Vec::new();
        let started = Instant::now();
        let done = poll_until(LOOP_LIMIT, Duration::from_millis(10), || {
            match self.get(&by_address(), &format!("/warm-up/{}", other.len())) {
                Ok(response) => match Answer::of(&response) {
                    Answer::App(app) => {
                        if let Some(i) = (0..self.apps.len()).find(|i| server_name(*i) == app) {
                            seen[i] = true;
                        }
                    }
                    answer => other.push(answer),
                },
                Err(e) => other.push(Answer::Other(e.to_string())),
            }
            (apps.iter().all(|i| seen[*i]) || other.len() > 200).then_some(())
        });
        assert!(
            done.is_some() && apps.iter().all(|i| seen[*i]),
            "warm-up: apps {apps:?} answered {seen:?} within {:?}; other answers: {other:?}\n{}",
            started.elapsed(),
            self.control.log()
        );
        if !other.is_empty() {
            eprintln!("warm-up: answered after {} other answers: {other:?}", other.len());
        }
    }

    /// The client proxy's count of endpoints of `destination` in `state`.
    fn endpoints_in(&self, destination: &str, state: &str) -> f64 {
        self.client_admin().metrics().value(&endpoints_in(destination, state))
    }

    /// Polls the client proxy's ready endpoints of the ClusterIP until there are `count`; returns
    /// when it first saw them. Panics after [`PROPAGATION_TIMEOUT`].
    fn wait_ready_endpoints(&self, count: f64, what: &str) -> Instant {
        let destination = by_address();
        let seen = poll_until(PROPAGATION_TIMEOUT, Duration::from_millis(2), || {
            (self.endpoints_in(&destination, "ready") == count).then(Instant::now)
        });
        seen.unwrap_or_else(|| {
            panic!(
                "{what}: the client proxy did not have {count} ready endpoints for {destination} within {PROPAGATION_TIMEOUT:?}:\n{}\n----- control plane -----\n{}",
                self.client_admin().metrics().text(),
                self.control.log()
            )
        })
    }
}

/// `pillion-control serve --kubernetes` in the node's namespace, with the kubeconfig of the
/// emulated API server and the token file for certificates; returns once it accepts connections
/// (it binds only after its first complete list of the cluster).
fn start_control_plane(
    node: &Netns,
    files: &MeshFiles,
    kubeconfig: &Path,
    listen: SocketAddr,
    logs: &LogDir,
) -> Process {
    let mut cmd = node.command(binaries::control());
    without_pillion_env(&mut cmd);
    // In-cluster settings would win over the kubeconfig.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KUBERNETES_") {
            cmd.env_remove(key);
        }
    }
    let ca = files.dir().join("ca");
    cmd.args(["serve", "--kubernetes", "--trust-domain", TRUST_DOMAIN, "--listen"])
        .arg(listen.to_string())
        .arg("--issuer-cert")
        .arg(ca.join("issuer.crt"))
        .arg("--issuer-key")
        .arg(ca.join("issuer.key"))
        .arg("--trust-anchors")
        .arg(files.trust_anchors())
        .arg("--tokens")
        .arg(files.dir().join("tokens.yaml"))
        .env("KUBECONFIG", kubeconfig)
        .env("PILLION_LOG", "info,pillion_control=debug");
    let mut process = Process::spawn("pillion-control", cmd, logs);
    let started = Instant::now();
    let serving = poll_until(CONTROL_START_TIMEOUT, Duration::from_millis(50), || {
        if let Some(status) = process.try_status() {
            return Some(Err(format!("pillion-control exited: {status}")));
        }
        node.run(move || TcpStream::connect_timeout(&listen, Duration::from_secs(1)))
            .ok()
            .map(|_| Ok(()))
    });
    match serving {
        Some(Ok(())) => {
            eprintln!(
                "control plane listed the cluster and serves after {:?}",
                started.elapsed()
            );
            process
        }
        Some(Err(reason)) => panic!("{reason}\n{}", process.log()),
        None => panic!(
            "pillion-control not accepting on {listen} after {:?}\n{}",
            started.elapsed(),
            process.log()
        ),
    }
}

/// What a proxy needs to take `workload`'s identity from the control plane at `control`.
fn identity(control: SocketAddr, files: &MeshFiles, workload: &Workload) -> PodOptions {
    PodOptions::default()
        .proxy_env("PILLION_CONTROL_ADDR", &format!("http://{control}"))
        .proxy_env("PILLION_CONTROL_IDENTITY", CONTROL_IDENTITY)
        .proxy_env("PILLION_IDENTITY_SPIFFE_ID", &workload.spiffe_id())
        .proxy_env(
            "PILLION_IDENTITY_TOKEN_FILE",
            &files.token_file(workload).to_string_lossy(),
        )
        .proxy_env("PILLION_TRUST_ANCHORS_FILE", &files.trust_anchors().to_string_lossy())
}

fn server_name(i: usize) -> String {
    format!("api-{}", i + 1)
}

fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("a valid Kubernetes object")
}

fn namespace(name: &str) -> Namespace {
    object(json!({ "metadata": { "name": name } }))
}

/// A running, injected pod: `pillion-init` and the `pillion-proxy` native sidecar, as
/// `pillion-control inject` adds them, and its IP in the status, as the kubelet reports it.
fn pod(namespace: &str, name: &str, ip: Ipv4Addr, service_account: &str) -> Pod {
    object(json!({
        "metadata": { "namespace": namespace, "name": name, "labels": { "app": service_account } },
        "spec": {
            "serviceAccountName": service_account,
            "initContainers": [
                { "name": "pillion-init", "image": "pillion/init" },
                { "name": "pillion-proxy", "image": "pillion/proxy", "restartPolicy": "Always" },
            ],
            "containers": [{ "name": "app", "image": "app" }],
        },
        "status": { "phase": "Running", "podIP": ip.to_string(), "podIPs": [{ "ip": ip.to_string() }] },
    }))
}

/// A ClusterIP Service in `shop`: port 80 (`http`) to the pods' 8080.
fn service(name: &str, ip: Ipv4Addr) -> Service {
    object(json!({
        "metadata": { "namespace": "shop", "name": name },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip.to_string(),
            "clusterIPs": [ip.to_string()],
            "selector": { "app": "api" },
            "ports": [{ "name": "http", "port": SERVICE_PORT, "targetPort": APP_PORT, "protocol": "TCP" }],
        },
    }))
}

/// The EndpointSlice of `service`, as the endpoints controller writes it: (pod IP, pod, ready).
fn slice(service: &str, endpoints: &[(Ipv4Addr, String, bool)]) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            json!({
                "addresses": [ip.to_string()],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "targetRef": { "kind": "Pod", "namespace": "shop", "name": pod },
            })
        })
        .collect();
    object(json!({
        "metadata": { "namespace": "shop", "name": format!("{service}-abcde"),
                      "labels": { "kubernetes.io/service-name": service } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": APP_PORT, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
}

/// An HTTPRoute attached to the Service `shop/api` (GAMMA), sending `/split` to two Services by
/// weight.
fn split_route(backends: [(&str, u32); 2]) -> HttpRoute {
    let refs: Vec<Value> = backends
        .iter()
        .map(|(name, weight)| json!({ "name": name, "port": SERVICE_PORT, "weight": weight }))
        .collect();
    object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "namespace": "shop", "name": "api-split" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "api", "port": SERVICE_PORT }],
            "rules": [{
                "matches": [{ "path": { "type": "PathPrefix", "value": "/split" } }],
                "backendRefs": refs,
            }],
        },
    }))
}

fn service_addr() -> SocketAddr {
    SocketAddr::from((SERVICE_IP, SERVICE_PORT))
}

/// The Service's destination by address (and its metric label): `10.96.0.10:80`.
fn by_address() -> String {
    service_addr().to_string()
}

/// The Service's destination by name: `api.shop.svc.cluster.local:80`.
fn by_name() -> String {
    format!("{SERVICE_NAME}:{SERVICE_PORT}")
}

/// `pillion_balancer_endpoints{destination,state}`.
fn endpoints_in(destination: &str, state: &str) -> String {
    format!("pillion_balancer_endpoints{{destination=\"{destination}\",state=\"{state}\"}}")
}

/// `pillion_balancer_endpoint_requests_total{destination,endpoint}`.
fn endpoint_requests(destination: &str, endpoint: SocketAddr) -> String {
    format!("pillion_balancer_endpoint_requests_total{{destination=\"{destination}\",endpoint=\"{endpoint}\"}}")
}

/// `pillion_tcp_mesh_connections_total{direction,tls="true",peer_id}`.
fn mesh_tls(direction: &str, peer_id: &str) -> String {
    format!("pillion_tcp_mesh_connections_total{{direction=\"{direction}\",tls=\"true\",peer_id=\"{peer_id}\"}}")
}

const PLAINTEXT_INBOUND: &str = "pillion_tcp_mesh_connections_total{direction=\"inbound\",tls=\"false\"}";

/// How many times each answer came.
fn tally<'a>(answers: impl IntoIterator<Item = &'a Answer>) -> BTreeMap<Answer, usize> {
    let mut counts = BTreeMap::new();
    for answer in answers {
        *counts.entry(answer.clone()).or_default() += 1;
    }
    counts
}

/// Asserts that `response` is app `app` answering 200.
fn assert_app(response: &RawResponse, app: &str, what: &str) {
    assert_eq!(
        Answer::of(response),
        Answer::App(app.to_owned()),
        "{what}: {} {:?} {}",
        response.status,
        response.headers,
        response.body_text()
    );
}

/// Milliseconds, for the printed timings.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Whatever ended a removal: when the client proxy's view dropped the endpoint, and what the
/// requests sent meanwhile saw.
struct Removal {
    /// The server whose endpoint was removed.
    gone: usize,
    /// From the watch event to the client proxy's balancer without the endpoint.
    view: Duration,
    /// From the watch event to the last request sent to the endpoint (if any was).
    last_sent: Option<Duration>,
    answers: Vec<Sent>,
}

/// While a load runs, makes `change` (one watch event, at the instant measured from) to the
/// endpoint the load is using (the balancer favours the faster of two, so that is the one whose
/// removal shows in the traffic), and waits until the client proxy has one ready endpoint of the
/// ClusterIP left; then sends a little more load, checks that no request sent after that reached
/// the removed endpoint, and returns the timings.
fn remove_endpoint(cluster: &Cluster, tag: &str, change: impl FnOnce(&ApiServer, usize)) -> Removal {
    let load = Load::start(&cluster.client, &by_address(), tag, 50);
    // Some requests before the change: the endpoint in use is the one removed.
    std::thread::sleep(Duration::from_millis(200));
    let gone = load.latest_server();
    let event = Instant::now();
    change(cluster.api(), gone);
    let seen = cluster.wait_ready_endpoints(1.0, tag);
    // Requests after the view changed: none of them may reach the removed endpoint.
    std::thread::sleep(Duration::from_millis(300));
    let answers = load.finish();
    let name = server_name(gone);
    let last_sent = answers
        .iter()
        .filter(|s| s.answer.is_app(&name) && s.sent >= event)
        .map(|s| s.sent - event)
        .max();
    let after: Vec<&Sent> = answers.iter().filter(|s| s.sent > seen).collect();
    assert!(
        after.len() >= 10,
        "{tag}: only {} requests after the change was seen",
        after.len()
    );
    assert!(
        after
            .iter()
            .all(|s| matches!(&s.answer, Answer::App(app) if *app != name)),
        "{tag}: requests sent after the client proxy dropped {name} must be answered by the others: {:?}",
        tally(after.iter().map(|s| &s.answer))
    );
    assert!(
        answers.iter().all(|s| matches!(s.answer, Answer::App(_))),
        "{tag}: every request answered by an app: {:?}",
        tally(answers.iter().map(|s| &s.answer))
    );
    Removal {
        gone,
        view: seen - event,
        last_sent,
        answers,
    }
}

/// With no policy at all, the Service's objects alone make the hop meshed: the client app calls
/// `shop/api` by its ClusterIP and by its name (`Host`), the client proxy resolves either through
/// discovery to the pod's endpoint with identity `spiffe://cluster.local/ns/shop/sa/api`, and the
/// hop is mutual TLS between the two proxies.
#[test]
fn a_service_is_meshed_by_cluster_ip_and_by_name_from_the_cluster_objects() {
    if !require_root("a_service_is_meshed_by_cluster_ip_and_by_name_from_the_cluster_objects") {
        return;
    }
    let cluster = Cluster::start("k8s-mesh", 1, |_, _| {});
    assert_eq!(cluster.api_id, "spiffe://cluster.local/ns/shop/sa/api");
    let started = Instant::now();
    cluster.warm_up(&[0]);
    eprintln!("first answer through the ClusterIP after {:?}", started.elapsed());

    let by_ip = cluster
        .get(&by_address(), "/by-ip")
        .unwrap_or_else(|e| panic!("GET by ClusterIP: {e}"));
    assert_app(&by_ip, "api-1", "by ClusterIP");
    let by_name_response = cluster
        .get(SERVICE_NAME, "/by-name")
        .unwrap_or_else(|e| panic!("GET by name: {e}"));
    assert_app(&by_name_response, "api-1", "by name");
    assert_eq!(
        cluster.apps[0].only_request_to("/by-name").header("host"),
        Some(SERVICE_NAME),
        "the app sees the Host its client sent"
    );

    // Each request was balanced under the destination it named: the name, then the address.
    let client = cluster.client_admin();
    client.wait_at_least(&endpoint_requests(&by_name(), cluster.endpoint(0)), 1.0);
    client.wait_at_least(&endpoint_requests(&by_address(), cluster.endpoint(0)), 1.0);
    assert_eq!(client.metrics().value(&endpoints_in(&by_name(), "ready")), 1.0);
    // Mutual TLS, each side seeing the other's identity; nothing reached the pod in plaintext.
    client.wait_at_least(&mesh_tls("outbound", &cluster.api_id), 1.0);
    let server = cluster.server_admin(0);
    server.wait_at_least(&mesh_tls("inbound", &cluster.client_id), 1.0);
    assert_eq!(
        server.metrics().value(PLAINTEXT_INBOUND),
        0.0,
        "a request reached the server pod in plaintext:\n{}",
        server.metrics().text()
    );
}

/// An endpoint leaves the client proxy's view when the cluster says so: its Pod is deleted (the
/// index drops an endpoint whose pod it does not know), or its EndpointSlice entry becomes not
/// ready. Meanwhile a load runs on the ClusterIP; the test prints how long after the watch event
/// the client proxy's balancer lost the endpoint, and checks that no request sent after that went
/// to it and every request was answered by an app.
#[test]
fn a_removed_endpoint_leaves_the_client_proxys_view() {
    if !require_root("a_removed_endpoint_leaves_the_client_proxys_view") {
        return;
    }
    let cluster = Cluster::start("k8s-remove", 2, |_, _| {});
    cluster.warm_up(&[0, 1]);
    assert_eq!(cluster.endpoints_in(&by_address(), "ready"), 2.0);

    // The Pod object is deleted (the kubelet's pod keeps running: only the view changes).
    let deleted = remove_endpoint(&cluster, "pod-deleted", |api, gone| {
        api.delete::<Pod>("shop", &server_name(gone));
    });
    // The endpoints controller follows: the slice loses the endpoint too.
    let gone = deleted.gone;
    cluster.api().apply(&cluster.api_slice(|i| (i != gone).then_some(true)));

    // The pod comes back, then its endpoint: the client proxy balances over both again.
    let back = Instant::now();
    cluster
        .api()
        .apply(&pod("shop", &server_name(gone), cluster.server_ips[gone], "api"));
    cluster.api().apply(&cluster.api_slice(|_| Some(true)));
    let added = cluster.wait_ready_endpoints(2.0, "endpoint added") - back;

    // An endpoint turns not ready in its slice.
    let not_ready = remove_endpoint(&cluster, "not-ready", |api, gone| {
        api.apply(&cluster.api_slice(|i| Some(i != gone)));
    });

    for (what, removal) in [("pod deleted", &deleted), ("endpoint not ready", &not_ready)] {
        eprintln!(
            "{what} ({}): the client proxy dropped the endpoint {} after the watch event; last request sent to it {} after the event; {} requests, {:?}",
            server_name(removal.gone),
            ms(removal.view),
            removal.last_sent.map_or("none".to_owned(), ms),
            removal.answers.len(),
            tally(removal.answers.iter().map(|s| &s.answer))
        );
    }
    eprintln!(
        "pod and endpoint re-added: in the client proxy's view after {}",
        ms(added)
    );
}

/// The Service's last endpoint goes away (its Pod deleted, its slice emptied): the destination is
/// still known, now with no endpoints, so the client proxy answers 503 `no healthy endpoint` itself
/// instead of dialling the ClusterIP in plaintext (which, without kube-proxy, nothing answers).
#[test]
fn a_service_without_endpoints_answers_503_no_healthy_endpoint() {
    if !require_root("a_service_without_endpoints_answers_503_no_healthy_endpoint") {
        return;
    }
    let cluster = Cluster::start("k8s-empty", 1, |_, _| {});
    cluster.warm_up(&[0]);
    let event = Instant::now();
    cluster.api().delete::<Pod>("shop", &server_name(0));
    cluster.api().apply(&cluster.api_slice(|_| None));
    let seen = cluster.wait_ready_endpoints(0.0, "last endpoint removed") - event;
    let asked = Instant::now();
    let response = cluster
        .get(&by_address(), "/gone")
        .unwrap_or_else(|e| panic!("GET after the last endpoint left: {e}"));
    let answered = asked.elapsed();
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(
        response.header("pillion-proxy-error"),
        Some("no healthy endpoint"),
        "{response:?}"
    );
    assert!(cluster.apps[0].requests_to("/gone").is_empty());
    eprintln!(
        "last endpoint removed: out of the client proxy's view {} after the watch event; the next request answered 503 after {}",
        ms(seen),
        ms(answered)
    );
}

/// An `AuthorizationPolicy` on the Service decides who may call its pods: one admitting only
/// another service account refuses the client (403 from the server's proxy, the app never sees
/// the request), and one admitting the client's service account lets it in again. No proxy is
/// restarted: the server's proxy follows its own inbound policy through discovery.
#[test]
fn an_authorization_policy_denies_a_workload_and_admits_another() {
    if !require_root("an_authorization_policy_denies_a_workload_and_admits_another") {
        return;
    }
    let cluster = Cluster::start("k8s-authz", 1, |_, _| {});
    cluster.warm_up(&[0]);
    let status_of = |path: &str| {
        cluster
            .get(&by_address(), path)
            .map(|r| (r.status, r.header("pillion-proxy-error").map(str::to_owned)))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    };

    // Only shop/batch may call api's port 8080.
    let started = Instant::now();
    cluster.api().apply(&authorization_policy(&[("batch", None)]));
    // Requests before the policy arrives still reach the app; from the first refusal on, none.
    poll_until(PROPAGATION_TIMEOUT, Duration::from_millis(20), || {
        (status_of("/until-denied").0 == 403).then_some(())
    })
    .unwrap_or_else(|| panic!("the client was never refused:\n{}", cluster.control.log()));
    let refused_after = started.elapsed();
    let denied = status_of("/denied");
    assert_eq!(
        denied,
        (403, Some("denied by authorization policy".to_owned())),
        "once refused, refused"
    );
    assert!(
        cluster.apps[0].requests_to("/denied").is_empty(),
        "a refused request reached the app"
    );
    cluster
        .server_admin(0)
        .wait_at_least("pillion_authz_denied_total{direction=\"inbound\"}", 1.0);

    // Now the client's own service account is admitted.
    let started = Instant::now();
    cluster
        .api()
        .apply(&authorization_policy(&[("client", Some("default"))]));
    poll_until(PROPAGATION_TIMEOUT, Duration::from_millis(20), || {
        (status_of("/admitted").0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("the client was never admitted:\n{}", cluster.control.log()));
    let admitted_after = started.elapsed();
    assert!(!cluster.apps[0].requests_to("/admitted").is_empty());
    eprintln!(
        "AuthorizationPolicy: refused {} after the deny was applied, admitted {} after the allow",
        ms(refused_after),
        ms(admitted_after)
    );
}

/// `shop/api-callers`: the pods behind Service `api`, port 8080, admit these service accounts
/// (`namespace` defaults to the policy's, `shop`).
fn authorization_policy(accounts: &[(&str, Option<&str>)]) -> pillion_control::k8s::authz::AuthorizationPolicy {
    use pillion_control::k8s::authz::{
        AllowEntry, AuthorizationPolicy, AuthorizationPolicySpec, PolicyTarget, ServiceAccountRef,
    };
    let mut policy = AuthorizationPolicy::new(
        "api-callers",
        AuthorizationPolicySpec {
            target: PolicyTarget {
                service: Some("api".into()),
                pod_selector: None,
                ports: Some(vec![APP_PORT]),
            },
            allow: vec![AllowEntry {
                service_accounts: Some(
                    accounts
                        .iter()
                        .map(|(name, namespace)| ServiceAccountRef {
                            name: (*name).into(),
                            namespace: namespace.map(Into::into),
                        })
                        .collect(),
                ),
                ..AllowEntry::default()
            }],
        },
    );
    policy.metadata.namespace = Some("shop".into());
    policy
}

/// The API server ends every watch and, while they are down, the pod set changes and the versions
/// the control plane would resume from are compacted: its watches get `410 Gone` and it relists.
/// A load on the ClusterIP runs throughout: every request is answered by an app (the last known
/// endpoints are served while the watches are down), the change made meanwhile arrives with the
/// relist, and changes after it arrive through the new watches.
#[test]
fn a_relist_after_410_gone_loses_nothing() {
    if !require_root("a_relist_after_410_gone_loses_nothing") {
        return;
    }
    let cluster = Cluster::start("k8s-relist", 2, |_, _| {});
    cluster.warm_up(&[0, 1]);
    let load = Load::start(&cluster.client, &by_address(), "relist", 20);

    std::thread::sleep(Duration::from_millis(200));
    let api = cluster.api();
    let paused = Instant::now();
    api.pause_watches();
    // While the watches are down: the endpoint in use becomes not ready, and history is compacted.
    let gone = load.latest_server();
    api.apply(&cluster.api_slice(|i| Some(i != gone)));
    api.compact();
    std::thread::sleep(Duration::from_secs(1));
    let during = cluster.endpoints_in(&by_address(), "ready");
    let resumed = Instant::now();
    api.resume_watches();
    let relisted = cluster.wait_ready_endpoints(1.0, "change made while the watches were down");

    // The new watches carry the next change.
    std::thread::sleep(Duration::from_millis(300));
    let readded = Instant::now();
    api.apply(&cluster.api_slice(|_| Some(true)));
    let watched = cluster.wait_ready_endpoints(2.0, "change after the relist") - readded;
    std::thread::sleep(Duration::from_millis(300));
    let answers = load.finish();

    let name = server_name(gone);
    let in_pause = answers.iter().filter(|s| s.sent >= paused && s.sent < resumed);
    let relisted_only: Vec<&Sent> = answers
        .iter()
        .filter(|s| s.sent > relisted && s.sent < readded)
        .collect();
    eprintln!(
        "relist: while the watches were down ({}) the client proxy kept {during} ready endpoints and answered {:?}; after resume (410, relist) it dropped {name} in {}; a change after the relist took {}; {} requests in all: {:?}",
        ms(resumed - paused),
        tally(in_pause.map(|s| &s.answer)),
        ms(relisted - resumed),
        ms(watched),
        answers.len(),
        tally(answers.iter().map(|s| &s.answer))
    );
    let log = cluster.control.log();
    for line in log.lines().filter(|l| l.contains("watch") || l.contains("410")) {
        eprintln!("control plane: {line}");
    }
    assert_eq!(
        during, 2.0,
        "the last known endpoints stay served while the watches are down"
    );
    assert!(answers.len() >= 100, "too few requests to tell: {}", answers.len());
    assert!(
        answers.iter().all(|s| matches!(s.answer, Answer::App(_))),
        "every request answered by an app, during and after the relist: {:?}",
        tally(answers.iter().map(|s| &s.answer))
    );
    assert!(
        relisted_only.len() >= 10 && relisted_only.iter().all(|s| !s.answer.is_app(&name)),
        "after the relist, until it is ready again, {name} gets no request: {:?}",
        tally(relisted_only.iter().map(|s| &s.answer))
    );
    assert!(
        log.contains("watch failed"),
        "the control plane's watches ended and were resumed with a relist:\n{log}"
    );
}

/// An HTTPRoute attached to the Service (a GAMMA parentRef) splits `/split` 80/20 between two
/// Services, each backed by one of the Service's pods; the client proxy follows the split, over
/// mutual TLS, and follows a change of the weights.
#[test]
fn an_httproute_on_the_service_splits_by_weight() {
    if !require_root("an_httproute_on_the_service_splits_by_weight") {
        return;
    }
    const REQUESTS: usize = 400;
    let cluster = Cluster::start("k8s-split", 2, |api, ips| {
        for (i, ip) in ips.iter().enumerate() {
            let name = format!("api-v{}", i + 1);
            api.apply(&service(&name, Ipv4Addr::new(10, 96, 0, 11 + i as u8)));
            api.apply(&slice(&name, &[(*ip, server_name(i), true)]));
        }
        api.apply(&split_route([("api-v1", 80), ("api-v2", 20)]));
    });
    cluster.warm_up(&[0, 1]);

    let shares = |tag: &str| -> BTreeMap<Answer, usize> {
        let mut conn: Option<TcpStream> = None;
        let started = Instant::now();
        let answers: Vec<Answer> = cluster.client.run(|| {
            let mut answers = Vec::new();
            for i in 0..REQUESTS {
                if started.elapsed() > LOOP_LIMIT {
                    break;
                }
                let answer = match request_on(&mut conn, &by_address(), &format!("/split/{tag}/{i}")) {
                    Ok(response) => Answer::of(&response),
                    Err(e) => {
                        conn = None;
                        Answer::Other(format!("no answer: {e}"))
                    }
                };
                answers.push(answer);
            }
            answers
        });
        assert_eq!(answers.len(), REQUESTS, "{tag}: requests within {LOOP_LIMIT:?}");
        tally(&answers)
    };

    let split = shares("80-20");
    let v1 = split.get(&Answer::App("api-1".to_owned())).copied().unwrap_or(0);
    let v2 = split.get(&Answer::App("api-2".to_owned())).copied().unwrap_or(0);
    eprintln!("80/20 split over {REQUESTS} requests: {split:?}");
    assert_eq!(v1 + v2, REQUESTS, "every request answered by a backend: {split:?}");
    let share = v1 as f64 / REQUESTS as f64;
    assert!(
        (0.70..=0.90).contains(&share),
        "api-v1's share {share:.2} of 0.80: {split:?}"
    );
    let client = cluster.client_admin();
    client.wait_at_least(&mesh_tls("outbound", &cluster.api_id), 1.0);
    for i in 0..2 {
        let server = cluster.server_admin(i);
        server.wait_at_least(&mesh_tls("inbound", &cluster.client_id), 1.0);
        assert_eq!(
            server.metrics().value(PLAINTEXT_INBOUND),
            0.0,
            "a backend request reached {} in plaintext",
            server_name(i)
        );
    }

    // The weights change: everything goes to api-v2 once the route reaches the client proxy.
    let changed = Instant::now();
    cluster.api().apply(&split_route([("api-v1", 0), ("api-v2", 100)]));
    let followed = poll_until(PROPAGATION_TIMEOUT, Duration::from_millis(20), || {
        let response = cluster.get(&by_address(), "/split/probe").ok()?;
        Answer::of(&response).is_app("api-2").then(Instant::now)
    });
    let followed =
        followed.unwrap_or_else(|| panic!("the new weights were not followed within {PROPAGATION_TIMEOUT:?}"));
    let after = shares("0-100");
    eprintln!(
        "0/100 split followed {} after the route changed; then {REQUESTS} requests: {after:?}",
        ms(followed - changed)
    );
    assert_eq!(
        after.get(&Answer::App("api-2".to_owned())).copied(),
        Some(REQUESTS),
        "all to api-v2: {after:?}"
    );
}
