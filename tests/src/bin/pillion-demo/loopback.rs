//! `--no-iptables`: the same mesh without root, namespaces or iptables, on loopback ports.
//!
//! ```text
//!   client app → client proxy outbound 127.0.0.1:<a> ──mTLS──→ server proxy inbound 127.0.0.1:<b> → app 127.0.0.1:<c>
//! ```
//!
//! With no redirect there is no original destination, so each proxy is told where its traffic
//! goes (`PILLION_OUTBOUND_TARGET`: the server proxy's inbound port; `PILLION_INBOUND_TARGET`:
//! the app), and the client app calls its proxy's port explicitly. The control plane, the
//! identities, mTLS, authorization and metrics are exactly as in the namespaces mode. Ports are
//! free ones picked at start; everything is bound to 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use pillion_tests::binaries;
use pillion_tests::http_peers::app::HttpApp;
use pillion_tests::mesh::{ControlPlane, ControlPlaneOptions, MeshFiles, Workload};
use pillion_tests::pod::{SHUTDOWN_GRACE_PERIOD, without_pillion_env};
use pillion_tests::process::{LogDir, Process};
use pillion_tests::sidecar::{AdminPort, startup_probe};

use crate::exercise::LocalMesh;
use crate::{config, say, signals};

/// One proxy's three listeners.
#[derive(Debug, Clone, Copy)]
struct ProxyPorts {
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
}

/// The running mesh; fields drop in declaration order (proxies first).
pub struct LoopbackMesh {
    client_proxy: Process,
    server_proxy: Process,
    _app: HttpApp,
    control: ControlPlane,
    client_ports: ProxyPorts,
    server_ports: ProxyPorts,
}

impl LoopbackMesh {
    pub fn start(work: &LogDir, files: &MeshFiles, client: &Workload, server: &Workload) -> Result<Self, String> {
        let [control_addr, app_addr, a_in, a_out, a_admin, b_in, b_out, b_admin] = free_ports()?;
        let client_ports = ProxyPorts {
            inbound: a_in,
            outbound: a_out,
            admin: a_admin,
        };
        let server_ports = ProxyPorts {
            inbound: b_in,
            outbound: b_out,
            admin: b_admin,
        };

        // The client proxy's target is the server proxy's inbound port: that is the meshed
        // endpoint. The server proxy's target is the app, whose port is the inbound policy's.
        files.write_policy(&config::policy(
            &[server_ports.inbound],
            &[app_addr.port()],
            &server.spiffe_id(),
            &client.spiffe_id(),
        ))?;
        let routes = work.path().join("routes.yaml");
        pillion_tests::mesh::replace(&routes, &config::routes(&[server_ports.inbound, app_addr]))?;

        let control = ControlPlane::start(
            files,
            None,
            control_addr,
            &ControlPlaneOptions {
                own_process_group: true,
                ..ControlPlaneOptions::default()
            },
            work,
        )?;
        signals::track_pid(control.process_id());
        say(&format!(
            "control    pillion-control serve on {control_addr} (CA from `pillion-control ca init`, policy {})",
            files.policy().display()
        ));

        let server_proxy = start_proxy(
            "server",
            server_ports,
            ("PILLION_INBOUND_TARGET", app_addr),
            &control,
            files,
            server,
            &routes,
            work,
        )?;
        let listener = TcpListener::bind(app_addr).map_err(|e| format!("binding the app on {app_addr}: {e}"))?;
        let app = HttpApp::start_local(listener, "server");
        say(&format!("           app: HTTP/1.1, HTTP/2 and gRPC on {app_addr}"));
        let client_proxy = start_proxy(
            "client",
            client_ports,
            ("PILLION_OUTBOUND_TARGET", server_ports.inbound),
            &control,
            files,
            client,
            &routes,
            work,
        )?;
        say(&format!(
            "           app: the demo's client, calling its proxy at {} (no iptables to redirect it)",
            client_ports.outbound
        ));
        Ok(LoopbackMesh {
            client_proxy,
            server_proxy,
            _app: app,
            control,
            client_ports,
            server_ports,
        })
    }

    /// SIGTERM to the proxies and the control plane; `Err` if one does not exit 0 in time.
    pub fn stop(mut self) -> Result<(), String> {
        let grace = SHUTDOWN_GRACE_PERIOD + Duration::from_secs(5);
        let mut problems = Vec::new();
        for (name, process) in [
            ("client proxy", &mut self.client_proxy),
            ("server proxy", &mut self.server_proxy),
            ("pillion-control", self.control.process()),
        ] {
            match process.terminate(grace) {
                Some(status) if status.success() => {}
                other => problems.push(format!("{name}: SIGTERM → {other:?}")),
            }
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }
}

/// Eight distinct free loopback ports: bound all at once (so none repeats), then released.
fn free_ports() -> Result<[SocketAddr; 8], String> {
    let listeners = (0..8)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("finding free loopback ports: {e}"))?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    addrs.try_into().map_err(|_| "eight ports".to_string())
}

#[allow(clippy::too_many_arguments)]
fn start_proxy(
    name: &str,
    ports: ProxyPorts,
    target: (&str, SocketAddr),
    control: &ControlPlane,
    files: &MeshFiles,
    workload: &Workload,
    routes: &std::path::Path,
    work: &LogDir,
) -> Result<Process, String> {
    let mut cmd = Command::new(binaries::proxy());
    without_pillion_env(&mut cmd);
    cmd.env("PILLION_INBOUND_ADDR", ports.inbound.to_string())
        .env("PILLION_OUTBOUND_ADDR", ports.outbound.to_string())
        .env("PILLION_ADMIN_ADDR", ports.admin.to_string())
        .env(target.0, target.1.to_string())
        .env("PILLION_CONTROL_ADDR", control.url())
        .env("PILLION_CONTROL_IDENTITY", pillion_tests::mesh::CONTROL_IDENTITY)
        .env("PILLION_IDENTITY_SPIFFE_ID", workload.spiffe_id())
        .env("PILLION_IDENTITY_TOKEN_FILE", files.token_file(workload))
        .env("PILLION_TRUST_ANCHORS_FILE", files.trust_anchors())
        .env("PILLION_CONFIG", routes)
        .env("PILLION_LOG", "info")
        .env(
            "PILLION_SHUTDOWN_GRACE_PERIOD",
            format!("{}s", SHUTDOWN_GRACE_PERIOD.as_secs()),
        );
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    say(&format!(
        "{name:<10} pillion-proxy: inbound {}, outbound {}, admin {}, {}={}",
        ports.inbound, ports.outbound, ports.admin, target.0, target.1
    ));
    let mut proxy = Process::spawn(&format!("{name}-proxy"), cmd, work);
    signals::track_pid(proxy.pid());
    let admin = AdminPort::local(ports.admin);
    let ready_after = startup_probe(&mut proxy, || admin.get("/ready"))
        .map_err(|reason| format!("{name} proxy: {reason}\n{}", proxy.log()))?;
    say(&format!(
        "           identity {}; GET /ready → 200 after {:.2} s",
        workload.spiffe_id(),
        ready_after.as_secs_f64()
    ));
    Ok(proxy)
}

impl LocalMesh for LoopbackMesh {
    fn client_name(&self) -> &str {
        "client"
    }

    fn server_name(&self) -> &str {
        "server"
    }

    fn client_admin(&self) -> AdminPort<'_> {
        AdminPort::local(self.client_ports.admin)
    }

    fn server_admin(&self) -> AdminPort<'_> {
        AdminPort::local(self.server_ports.admin)
    }

    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        f()
    }

    fn http_target(&self) -> SocketAddr {
        self.client_ports.outbound
    }

    fn authority(&self) -> String {
        self.client_ports.outbound.to_string()
    }

    fn tcp_target(&self) -> Option<SocketAddr> {
        None
    }

    fn poke_commands(&self) -> Vec<String> {
        let (client, server) = (self.client_ports, self.server_ports);
        vec![
            format!(
                "curl -s http://{}/hello      # through both proxies, mTLS between them",
                client.outbound
            ),
            format!("curl -s http://{}/identity", client.admin),
            format!(
                "curl -s http://{}/metrics | grep -E '^pillion_(http_requests|tcp_mesh)'",
                server.admin
            ),
            format!("curl -s http://{}/config", server.admin),
        ]
    }
}
