//! Mesh TLS to opaque ports, end to end: the opaque transport (docs/opaque.md).
//!
//! Two pods (network namespaces joined by a veth), each with `pillion-iptables-init` and a
//! `pillion-proxy` certified by `pillion-control serve` (in pod B, as in tests/mesh.rs), and an
//! outsider namespace without a sidecar next to B. Pod B runs a real Redis on 6379 and a tiny
//! server-speaks-first server on 25, both opaque ports by default; the control plane says both
//! are meshed endpoints with B's identity. A's app (`redis-cli`, a raw socket) speaks plaintext;
//! A's proxy carries it in mTLS to B's proxy's inbound port, naming the port in the transport
//! header; B's proxy knows it is mesh TLS before any byte, which a server that speaks first
//! (its client sends nothing) needs.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Output;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use pillion_tests::mesh::{ControlPlane, ControlPlaneOptions, MeshFiles, Workload, identity_env, spiffe_id};
use pillion_tests::metrics::refused;
use pillion_tests::netns::{DefaultRoutes, Netns, VethEnd, VethLink};
use pillion_tests::pod::{INBOUND_PORT, PodOptions};
use pillion_tests::process::{LogDir, Process};
use pillion_tests::require_programs;
use pillion_tests::sidecar::{AdminPort, Sidecar};
use pillion_tests::traffic::{Server, assert_closed_without_data, echo, opaque, roundtrip};

const REDIS_PORT: u16 = 6379;
/// SMTP's port: the banner server stands in for a mail server, which speaks first.
const BANNER_PORT: u16 = 25;
const BANNER: &[u8] = b"220 ready\r\n";
/// A port in no proxy's opaque list: its server speaks first too, and only the control plane's
/// `protocol: opaque` hint on the endpoint says so.
const HINTED_PORT: u16 = 7025;
const CONTROL_PORT: u16 = 8090;
/// What these tests run besides the usual namespace tools (Debian's redis-server and redis-tools).
const PROGRAMS: [&str; 2] = ["redis-server", "redis-cli"];

/// Third octet of the next mesh's subnets (`10.203.<n>.0/24` between the pods, `10.204.<n>.0/24`
/// for the outsider).
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// Two meshed pods with Redis and the banner server in B, the control plane in B, and an
/// outsider namespace that reaches B directly.
///
/// Fields drop in declaration order: proxies first, then the apps (Redis killed by its PID), the
/// control plane, links and namespaces; the log directory last (kept if the test failed).
struct OpaqueMesh {
    _a_proxy: Sidecar,
    b_proxy: Sidecar,
    _redis: Process,
    banner: Server,
    hinted: Server,
    _control: ControlPlane,
    _outsider_link: VethLink,
    _link: VethLink,
    outsider: Netns,
    a: Netns,
    b: Netns,
    _files: MeshFiles,
    b_ip: Ipv4Addr,
    client: Workload,
    server: Workload,
    _logs: LogDir,
}

impl OpaqueMesh {
    /// Starts the mesh with `authorization` (policy YAML) for B's two opaque ports.
    fn start(tag: &str, authorization: &str) -> OpaqueMesh {
        let logs = LogDir::new(tag);
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let (a_ip, b_ip) = (Ipv4Addr::new(10, 203, n, 1), Ipv4Addr::new(10, 203, n, 2));
        let (outsider_ip, b_side_ip) = (Ipv4Addr::new(10, 204, n, 1), Ipv4Addr::new(10, 204, n, 2));

        let a = Netns::new(&format!("{tag}-a"));
        let b = Netns::new(&format!("{tag}-b"));
        let outsider = Netns::new(&format!("{tag}-out"));
        let end = |ns, ifname, ipv4| VethEnd {
            ns,
            ifname,
            ipv4,
            ipv6: None,
        };
        let link = VethLink::new(end(&a, "eth0", a_ip), end(&b, "eth0", b_ip));
        // B routes everything via A; the outsider's subnet is on-link on B's eth1.
        let outsider_link = VethLink::with_routes(
            end(&outsider, "eth0", outsider_ip),
            end(&b, "eth1", b_side_ip),
            DefaultRoutes::FirstOnly,
        );

        let client = Workload::new("default", "client");
        let server = Workload::new("default", "server");
        let files = MeshFiles::create(logs.path(), &[&client, &server]).unwrap_or_else(|e| panic!("{e}"));
        files
            .write_policy(&policy(b_ip, &server, authorization))
            .unwrap_or_else(|e| panic!("{e}"));
        let control_addr = SocketAddr::from((b_ip, CONTROL_PORT));
        let control = ControlPlane::start(&files, Some(&b), control_addr, &ControlPlaneOptions::default(), &logs)
            .unwrap_or_else(|e| panic!("{e}"));

        let b_options = identity_env(PodOptions::default(), &control, &files, &server)
            .init_args(["--inbound-ports-to-ignore", &format!("4191,{CONTROL_PORT}")]);
        let b_proxy = Sidecar::start(&b, "b", &b_options, &logs).unwrap_or_else(|e| panic!("{e}"));
        let a_options = identity_env(PodOptions::default(), &control, &files, &client)
            .init_args(["--outbound-ports-to-ignore", &CONTROL_PORT.to_string()]);
        let a_proxy = Sidecar::start(&a, "a", &a_options, &logs).unwrap_or_else(|e| panic!("{e}"));

        let redis = start_redis(&b, &logs);
        let banner = Server::start(
            b.listen(SocketAddr::from(([0, 0, 0, 0], BANNER_PORT))),
            banner_then_echo,
        );
        let hinted = Server::start(
            b.listen(SocketAddr::from(([0, 0, 0, 0], HINTED_PORT))),
            banner_then_echo,
        );
        OpaqueMesh {
            _a_proxy: a_proxy,
            b_proxy,
            _redis: redis,
            banner,
            hinted,
            _control: control,
            _outsider_link: outsider_link,
            _link: link,
            outsider,
            a,
            b,
            _files: files,
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

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.b_ip, port))
    }

    /// `redis-cli SET key value; redis-cli GET key` against B's Redis, the whole command line
    /// run inside `ns`: two connections, whatever their path.
    fn redis_set_get(&self, ns: &Netns, key: &str, value: &str) -> Output {
        let cli = format!("redis-cli -h {} -p {REDIS_PORT}", self.b_ip);
        let script = format!("{cli} SET {key} {value}; {cli} GET {key}");
        // `timeout` bounds it: a connection that hangs instead of closing fails the test.
        ns.command("timeout")
            .args(["20", "sh", "-c", &script])
            .output()
            .unwrap_or_else(|e| panic!("running redis-cli in {}: {e}", ns.name()))
    }
}

/// Both of B's opaque ports are meshed endpoints with the server's identity, with `authorization`.
fn policy(b_ip: Ipv4Addr, server: &Workload, authorization: &str) -> String {
    let id = server.spiffe_id();
    format!(
        "destinations:
  - destination: {b_ip}:{REDIS_PORT}
    endpoints: [{{ address: {b_ip}:{REDIS_PORT}, identity: {id} }}]
  - destination: {b_ip}:{BANNER_PORT}
    endpoints: [{{ address: {b_ip}:{BANNER_PORT}, identity: {id} }}]
  - destination: {b_ip}:{HINTED_PORT}
    endpoints: [{{ address: {b_ip}:{HINTED_PORT}, identity: {id}, protocol: opaque }}]
inbound:
  - port: {REDIS_PORT}
    authorization: {authorization}
  - port: {BANNER_PORT}
    authorization: {authorization}
  - port: {HINTED_PORT}
    authorization: {authorization}
"
    )
}

fn allow(id: &str) -> String {
    format!("{{ allow: [{id}] }}")
}

/// Debian's Redis in `ns`, in memory only, as a process this test owns (killed by PID on drop);
/// returns once it accepts connections.
fn start_redis(ns: &Netns, logs: &LogDir) -> Process {
    let mut cmd = ns.command("redis-server");
    cmd.args(["--port", &REDIS_PORT.to_string()])
        .args(["--bind", "0.0.0.0", "--protected-mode", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(logs.path());
    let mut redis = Process::spawn("redis-server", cmd, logs);
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, REDIS_PORT));
    let up = pillion_tests::poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        if let Some(status) = redis.try_status() {
            panic!("redis-server exited: {status}\n{}", redis.log());
        }
        // Loopback inside the pod skips the proxy (iptables-init leaves `lo` alone).
        ns.connect(local).ok()
    });
    assert!(up.is_some(), "redis-server not accepting on {local}\n{}", redis.log());
    redis
}

/// Speaks first, as SMTP or MySQL servers do, then echoes.
fn banner_then_echo(mut stream: TcpStream) -> io::Result<()> {
    stream.write_all(BANNER)?;
    echo(stream)
}

/// `pillion_tcp_mesh_connections_total{direction,tls="true",peer_id}`.
fn mesh_tls(direction: &str, peer_id: &str) -> String {
    format!("pillion_tcp_mesh_connections_total{{direction=\"{direction}\",tls=\"true\",peer_id=\"{peer_id}\"}}")
}

const PLAINTEXT_INBOUND: &str = "pillion_tcp_mesh_connections_total{direction=\"inbound\",tls=\"false\"}";
const DENIED_INBOUND: &str = "pillion_authz_denied_total{direction=\"inbound\"}";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "{}; stdout {:?}; stderr {:?}",
        out.status,
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn redis_and_a_server_that_speaks_first_are_reached_over_mutual_tls() {
    if !require_programs(
        "redis_and_a_server_that_speaks_first_are_reached_over_mutual_tls",
        &PROGRAMS,
    ) {
        return;
    }
    let mesh = OpaqueMesh::start("opq", &allow(&spiffe_id("default", "client")));
    let (client_id, server_id) = (mesh.client.spiffe_id(), mesh.server.spiffe_id());

    // Redis, authorized by A's identity: both commands answer.
    let out = mesh.redis_set_get(&mesh.a, "k", "v");
    assert_eq!(stdout(&out), "OK\nv\n", "{}", describe(&out));
    // B's proxy took both connections as mesh TLS from A's verified identity; A's proxy
    // verified B's. Nothing reached B's proxy in plaintext.
    mesh.b_admin().wait_at_least(&mesh_tls("inbound", &client_id), 2.0);
    mesh.a_admin().wait_at_least(&mesh_tls("outbound", &server_id), 2.0);
    assert_eq!(mesh.b_admin().metrics().value(PLAINTEXT_INBOUND), 0.0);
    assert_eq!(mesh.b_admin().metrics().value(DENIED_INBOUND), 0.0);

    // The server speaks first: the banner arrives though the client has sent nothing.
    let mut conn = mesh.a.connect(mesh.addr(BANNER_PORT)).expect("connect to B:25");
    let mut banner = [0u8; BANNER.len()];
    conn.read_exact(&mut banner)
        .expect("the banner, before any byte from the client");
    assert_eq!(&banner, BANNER);
    roundtrip(&mut conn, &opaque("after the banner")).expect("echo after the banner");
    drop(conn);
    mesh.b_admin().wait_at_least(&mesh_tls("inbound", &client_id), 3.0);
    let peers = mesh.banner.peers();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(
        peers[0].ip(),
        mesh.b_ip,
        "B's app is reached by B's proxy, at the pod address"
    );

    // A port only the control plane calls opaque: A's proxy does not wait to detect a protocol
    // (it would wait for the client's first bytes while the client waits for the banner).
    let mut conn = mesh.a.connect(mesh.addr(HINTED_PORT)).expect("connect to B:7025");
    // Held for detection, the banner would come only when detection gives up
    // (PILLION_DETECT_TIMEOUT, 10 s): half of that tells the two apart on any machine.
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("read timeout");
    let mut banner = [0u8; BANNER.len()];
    conn.read_exact(&mut banner)
        .expect("the banner of a port the control plane marks opaque, before any byte from the client");
    assert_eq!(&banner, BANNER);
    roundtrip(&mut conn, &opaque("after the hinted banner")).expect("echo after the banner");
    drop(conn);
    assert_eq!(mesh.hinted.peers().len(), 1, "{:?}", mesh.hinted.peers());
    mesh.b_admin().wait_at_least(&mesh_tls("inbound", &client_id), 4.0);

    // Plaintext straight to B's inbound port is no transport: refused, counted, not forwarded.
    let not_transport = refused("inbound", "not_transport");
    let before = mesh.b_admin().metrics().value(&not_transport);
    let connected = mesh.outsider.connect(mesh.addr(INBOUND_PORT));
    assert_closed_without_data(connected, b"PLNT\x01\x00\x19hello\r\n");
    mesh.b_admin().wait_at_least(&not_transport, before + 1.0);
    assert_eq!(mesh.banner.peers().len(), 1, "the refused connection reached no app");
    assert_eq!(mesh.b_admin().metrics().value(PLAINTEXT_INBOUND), 0.0);
}

#[test]
fn a_client_the_policy_does_not_name_is_refused() {
    if !require_programs("a_client_the_policy_does_not_name_is_refused", &PROGRAMS) {
        return;
    }
    let mesh = OpaqueMesh::start("opqdeny", &allow(&spiffe_id("other", "x")));
    let client_id = mesh.client.spiffe_id();

    let out = mesh.redis_set_get(&mesh.a, "k", "v");
    assert!(
        !stdout(&out).contains("OK") && !stdout(&out).contains('v'),
        "{}",
        describe(&out)
    );
    // The transport itself was sound (A's identity verified); the policy said no, per connection.
    mesh.b_admin().wait_at_least(DENIED_INBOUND, 2.0);
    mesh.b_admin().wait_at_least(&mesh_tls("inbound", &client_id), 2.0);
    let log = mesh.b_proxy.proxy_log();
    assert!(
        log.contains("connection denied by authorization policy") && log.contains(&client_id),
        "B's proxy logs the denial with the client's identity"
    );

    // Nor does the banner reach A.
    let connected = mesh.a.connect(mesh.addr(BANNER_PORT));
    assert_closed_without_data(connected, b"");
    assert!(mesh.banner.peers().is_empty(), "{:?}", mesh.banner.peers());
}

#[test]
fn a_client_without_a_sidecar_still_reaches_redis_when_the_policy_allows_it() {
    if !require_programs(
        "a_client_without_a_sidecar_still_reaches_redis_when_the_policy_allows_it",
        &PROGRAMS,
    ) {
        return;
    }
    let mesh = OpaqueMesh::start("opqplain", "all-unauthenticated");

    // The outsider's connections arrive at B:6379 in plaintext: forwarded as they are.
    let out = mesh.redis_set_get(&mesh.outsider, "plain", "yes");
    assert_eq!(stdout(&out), "OK\nyes\n", "{}", describe(&out));
    mesh.b_admin().wait_at_least(PLAINTEXT_INBOUND, 2.0);

    // Meanwhile A's still go in mTLS, and read what the outsider wrote.
    let out = mesh.redis_set_get(&mesh.a, "meshed", "too");
    assert_eq!(stdout(&out), "OK\ntoo\n", "{}", describe(&out));
    let cli = ["-h", &mesh.b_ip.to_string(), "-p", "6379", "GET", "plain"];
    let get = mesh
        .a
        .command("timeout")
        .args(["20", "redis-cli"])
        .args(cli)
        .output()
        .unwrap();
    assert_eq!(stdout(&get), "yes\n", "{}", describe(&get));
    mesh.b_admin()
        .wait_at_least(&mesh_tls("inbound", &mesh.client.spiffe_id()), 3.0);
    assert_eq!(mesh.b_admin().metrics().value(DENIED_INBOUND), 0.0);
}
