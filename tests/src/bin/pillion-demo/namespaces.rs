//! The demo's cluster: a "node" namespace with a bridge, the control plane on the node, and two
//! pods plugged into the bridge, each started the way the kubelet starts an injected pod.
//!
//! ```text
//!   pillion-demo-node: bridge pillion0 10.42.0.1/24, pillion-control serve on 10.42.0.1:8090
//!      ├── pillion-demo-client (pod/client, 10.42.0.10): iptables-init, proxy, the client app
//!      └── pillion-demo-server (pod/server, 10.42.0.20): iptables-init, proxy, HTTP/gRPC app :8080, TCP echo :7070
//! ```
//!
//! Names are fixed so that the printed `ip netns exec` commands can be typed while the demo
//! runs; a second demo, or the leftovers of a killed one, are reported instead of touched.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use pillion_tests::http_peers::app::HttpApp;
use pillion_tests::mesh::{ControlPlane, ControlPlaneOptions, MeshFiles, Workload, identity_env};
use pillion_tests::netns::{Bridge, Netns};
use pillion_tests::pod::{INBOUND_PORT, OUTBOUND_PORT, PROXY_UID, PodOptions};
use pillion_tests::process::LogDir;
use pillion_tests::sidecar::{AdminPort, Sidecar};
use pillion_tests::traffic::{Server, echo};

use crate::exercise::LocalMesh;
use crate::{config, say, signals};

pub const NODE: &str = "pillion-demo-node";
pub const CLIENT: &str = "pillion-demo-client";
pub const SERVER: &str = "pillion-demo-server";
const BRIDGE: &str = "pillion0";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 10);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 42, 0, 20);
const CONTROL_PORT: u16 = 8090;
const HTTP_PORT: u16 = 8080;
const TCP_PORT: u16 = 7070;

/// The running cluster. Fields drop in declaration order: proxies, apps, control plane, bridge,
/// then the namespaces.
pub struct NamespaceMesh {
    client_proxy: Sidecar,
    server_proxy: Sidecar,
    _http_app: HttpApp,
    _tcp_app: Server,
    control: ControlPlane,
    _bridge: Bridge,
    client: Netns,
    server: Netns,
    _node: Netns,
}

impl NamespaceMesh {
    /// Builds the cluster, printing each step; on failure everything built so far is removed.
    pub fn start(work: &LogDir, files: &MeshFiles, client: &Workload, server: &Workload) -> Result<Self, String> {
        let leftovers: Vec<&str> = [NODE, CLIENT, SERVER]
            .into_iter()
            .filter(|name| Netns::exists(name))
            .collect();
        if !leftovers.is_empty() {
            return Err(format!(
                "network namespace(s) {} already exist: another demo is running, or one was killed \
                 before it could clean up. To remove them: {}",
                leftovers.join(", "),
                leftovers
                    .iter()
                    .map(|ns| format!("`ip netns pids {ns} | xargs -r kill; ip netns delete {ns}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }

        let server_http = SocketAddr::from((SERVER_IP, HTTP_PORT));
        let server_tcp = SocketAddr::from((SERVER_IP, TCP_PORT));
        files.write_policy(&config::policy(
            &[server_http, server_tcp],
            &[HTTP_PORT, TCP_PORT],
            &server.spiffe_id(),
            &client.spiffe_id(),
        ))?;
        let routes = work.path().join("routes.yaml");
        pillion_tests::mesh::replace(&routes, &config::routes(&[server_http]))?;

        let node = named(NODE)?;
        let bridge = Bridge::new(&node, BRIDGE, NODE_IP)?;
        say(&format!("node       namespace {NODE}, bridge {BRIDGE} {NODE_IP}/24"));
        let control = ControlPlane::start(
            files,
            Some(&node),
            SocketAddr::from((NODE_IP, CONTROL_PORT)),
            &ControlPlaneOptions {
                own_process_group: true,
                ..ControlPlaneOptions::default()
            },
            work,
        )?;
        signals::track_pid(control.process_id());
        say(&format!(
            "control    pillion-control serve on {NODE_IP}:{CONTROL_PORT} on the node (CA from `pillion-control ca init`, policy {})",
            files.policy().display()
        ));

        let server_ns = named(SERVER)?;
        bridge.attach(&server_ns, "eth0", "veth-server", SERVER_IP)?;
        let server_proxy = start_pod("server", &server_ns, SERVER_IP, &control, files, server, &routes, work)?;
        let http_app = HttpApp::start(&server_ns, HTTP_PORT, "server");
        let tcp_app = Server::start(server_ns.listen(SocketAddr::from(([0, 0, 0, 0], TCP_PORT))), echo);
        say(&format!(
            "           app: HTTP/1.1, HTTP/2 and gRPC on :{HTTP_PORT}, TCP echo on :{TCP_PORT}"
        ));

        let client_ns = named(CLIENT)?;
        bridge.attach(&client_ns, "eth0", "veth-client", CLIENT_IP)?;
        let client_proxy = start_pod("client", &client_ns, CLIENT_IP, &control, files, client, &routes, work)?;
        say("           app: the demo's client, calling the server's pod IP in plaintext");

        Ok(NamespaceMesh {
            client_proxy,
            server_proxy,
            _http_app: http_app,
            _tcp_app: tcp_app,
            control,
            _bridge: bridge,
            client: client_ns,
            server: server_ns,
            _node: node,
        })
    }

    /// Stops the proxies and the control plane with SIGTERM, as the kubelet would; `Err` if
    /// one of them does not exit 0 in time. The namespaces go when `self` drops.
    pub fn stop(mut self) -> Result<(), String> {
        let grace = pillion_tests::pod::SHUTDOWN_GRACE_PERIOD + Duration::from_secs(5);
        let mut problems = Vec::new();
        for (name, process) in [
            ("pod/client proxy", self.client_proxy.proxy()),
            ("pod/server proxy", self.server_proxy.proxy()),
        ] {
            match process.terminate(grace) {
                Some(status) if status.success() => {}
                other => problems.push(format!("{name}: SIGTERM → {other:?}")),
            }
        }
        match self.control.process().terminate(grace) {
            Some(status) if status.success() => {}
            other => problems.push(format!("pillion-control: SIGTERM → {other:?}")),
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }
}

/// A pod: init container, proxy with the workload's identity, startup probe.
#[allow(clippy::too_many_arguments)]
fn start_pod(
    name: &str,
    ns: &Netns,
    ip: Ipv4Addr,
    control: &ControlPlane,
    files: &MeshFiles,
    workload: &Workload,
    routes: &std::path::Path,
    work: &LogDir,
) -> Result<Sidecar, String> {
    let options = identity_env(PodOptions::default(), control, files, workload)
        .proxy_env("PILLION_CONFIG", &routes.to_string_lossy())
        .proxy_env("PILLION_LOG", "info")
        .own_process_group();
    say(&format!("pod/{name:<6} namespace {}, {ip}", ns.name()));
    let sidecar = Sidecar::start(ns, name, &options, work)?;
    signals::track_pid(sidecar.pid());
    say(&format!(
        "           init container: pillion-iptables-init (inbound → :{INBOUND_PORT}, outbound → :{OUTBOUND_PORT}, UID {PROXY_UID} exempt)"
    ));
    say(&format!(
        "           native sidecar: pillion-proxy as UID {PROXY_UID}, identity {}; startup probe GET /ready → 200 after {:.2} s",
        workload.spiffe_id(),
        sidecar.ready_after().as_secs_f64()
    ));
    Ok(sidecar)
}

fn named(name: &str) -> Result<Netns, String> {
    let ns = Netns::named(name)?;
    signals::track_netns(name);
    Ok(ns)
}

impl LocalMesh for NamespaceMesh {
    fn client_name(&self) -> &str {
        "pod/client"
    }

    fn server_name(&self) -> &str {
        "pod/server"
    }

    fn client_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.client)
    }

    fn server_admin(&self) -> AdminPort<'_> {
        AdminPort::of_pod(&self.server)
    }

    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.client.run(f)
    }

    fn http_target(&self) -> SocketAddr {
        SocketAddr::from((SERVER_IP, HTTP_PORT))
    }

    fn authority(&self) -> String {
        format!("{SERVER_IP}:{HTTP_PORT}")
    }

    fn tcp_target(&self) -> Option<SocketAddr> {
        Some(SocketAddr::from((SERVER_IP, TCP_PORT)))
    }

    fn poke_commands(&self) -> Vec<String> {
        vec![
            format!("ip netns exec {CLIENT} curl -s http://{SERVER_IP}:{HTTP_PORT}/hello      # the client app's view"),
            format!("ip netns exec {CLIENT} curl -s localhost:4191/identity"),
            format!(
                "ip netns exec {SERVER} curl -s localhost:4191/metrics | grep -E '^pillion_(http_requests|tcp_mesh)'"
            ),
            format!("ip netns exec {SERVER} curl -s localhost:4191/config"),
            format!("ip netns exec {CLIENT} curl -s -X PUT --data debug localhost:4191/log-level"),
            format!("ip netns exec {CLIENT} iptables-save -t nat        # the init container's rules"),
        ]
    }
}
