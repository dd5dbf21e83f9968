//! Wiring: binds every listener (all before serving anything, so a port conflict fails fast),
//! starts the admin server and both proxy paths, declares readiness, and runs the drain when a
//! signal or `POST /shutdown` arrives.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tracing::{info, warn};

use crate::{
    accept::{self, AcceptSettings},
    admin::{self, Admin, Readiness},
    authz::Authorizer,
    config::{Config, IdentitySource, TrustAnchors},
    conn_limit::ConnLimit,
    control::{ControlPlane, ControlStatus},
    detect::DetectSettings,
    discovery::{Discovery, DiscoverySettings},
    drain::Drain,
    forward::ForwardSettings,
    http::{HttpProxy, HttpSettings, upstream::Pool},
    identity::{self, IdentityStore},
    inbound::Inbound,
    logging::LogLevel,
    mesh::Mesh,
    metrics::{Direction, Metrics},
    opaque_transport::OpaqueTransport,
    outbound::Outbound,
    policy::reload::{self, SharedPolicy},
    tls::{self, MeshTls},
    transport::{self, ConnectSettings},
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("invalid PILLION_CONFIG {0}")]
    RouteFile(#[from] pillion_api::policy::PolicyError),
    #[error("identity: {0}")]
    Identity(String),
}

pub async fn run(config: Config, log: LogLevel) -> Result<(), AppError> {
    // The route file is checked before anything is bound: a bad file changes nothing.
    let metrics = Arc::new(Metrics::new());
    let policy: SharedPolicy = Arc::new(ArcSwap::from_pointee(reload::load(
        config.route_file.as_deref(),
        &metrics.http,
    )?));

    // So is the identity configuration: trust anchors parse, static certificates load.
    let (mesh, control) = mesh(&config, &metrics)?;

    let bind = |what, addr| transport::bind(addr).map_err(|source| AppError::Bind { what, addr, source });
    let admin_listener = bind("admin", config.admin_addr)?;
    let mut inbound_listeners = vec![bind("inbound", config.inbound_addr)?];
    let mut outbound_listeners = config
        .outbound_addrs
        .iter()
        .map(|addr| bind("outbound", *addr))
        .collect::<Result<Vec<_>, _>>()?;
    // The default listeners' IPv6 twins: iptables-init redirects IPv6 when the pod has it, and
    // a redirect to a port nobody listens on would refuse every IPv6 connection.
    inbound_listeners.extend(bind_ipv6_twin("inbound", config.inbound_ipv6_twin)?);
    outbound_listeners.extend(bind_ipv6_twin("outbound", config.outbound_ipv6_twin)?);
    if config.inbound_target.is_none() && config.inbound_ips.addrs.is_empty() {
        warn!(
            "no pod addresses (no non-loopback interface address and PILLION_INBOUND_IPS unset): every inbound connection will be refused"
        );
    }
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;

    let drain = Drain::new();
    // One connection limit per direction, shared by its listeners (IPv4 and IPv6).
    let limit = |direction| ConnLimit::new(config.max_connections, direction, metrics.tcp(direction).refused_limit);
    let (inbound_limit, outbound_limit) = (limit(Direction::Inbound), limit(Direction::Outbound));
    let listeners_bound = Readiness::default();
    let connect = ConnectSettings {
        timeout: config.connect_timeout,
        keepalive: config.tcp_keepalive,
    };

    let forward = ForwardSettings {
        connect,
        idle_timeout: config.tcp_idle_timeout,
    };
    let http_settings = HttpSettings {
        idle_timeout: config.http_idle_timeout,
        max_header_bytes: config.http_max_header_bytes,
        access_log: config.access_log,
    };
    let detect = || DetectSettings {
        timeout: config.detect_timeout,
        opaque_ports: config.opaque_ports.clone(),
    };
    let http = |direction| HttpProxy {
        direction,
        policy: policy.clone(),
        // Only the outbound side originates mesh TLS; inbound connects to the local app.
        pool: Arc::new(Pool::new(
            connect,
            if direction == Direction::Outbound {
                mesh.clone()
            } else {
                None
            },
            metrics.tcp(direction),
        )),
        settings: http_settings,
        drain: drain.clone(),
        tcp: metrics.tcp(direction),
    };
    if let Some(path) = &config.route_file {
        tokio::spawn(reload::watch(path.clone(), policy.clone(), metrics.http.clone()));
    }

    let opaque_transport = OpaqueTransport::new(&config, mesh.as_deref());
    let inbound = Arc::new(Inbound {
        forward,
        metrics: metrics.tcp(Direction::Inbound),
        detect: detect(),
        http: http(Direction::Inbound),
        mesh: mesh.clone(),
        authorizer: Arc::new(Authorizer {
            discovery: mesh.as_ref().and_then(|m| m.discovery.clone()),
            policy: policy.clone(),
            default: config.inbound_default_authorization.clone(),
        }),
        transport: opaque_transport.clone(),
    });
    let pod_ips: Arc<[IpAddr]> = config.inbound_ips.addrs.as_slice().into();
    for listener in inbound_listeners {
        let inbound = inbound.clone();
        let settings = AcceptSettings {
            direction: Direction::Inbound,
            metrics: inbound.metrics.clone(),
            keepalive: config.tcp_keepalive,
            fixed_target: config.inbound_target,
            pod_ips: Some(pod_ips.clone()),
        };
        tokio::spawn(accept::serve(
            listener,
            settings,
            drain.clone(),
            inbound_limit.clone().serve(move |conn| inbound.clone().proxy(conn)),
        ));
    }

    let outbound = Arc::new(Outbound {
        forward,
        metrics: metrics.tcp(Direction::Outbound),
        detect: detect(),
        http: http(Direction::Outbound),
        mesh: mesh.clone(),
        transport: opaque_transport,
    });
    for listener in outbound_listeners {
        let outbound = outbound.clone();
        let settings = AcceptSettings {
            direction: Direction::Outbound,
            metrics: outbound.metrics.clone(),
            keepalive: config.tcp_keepalive,
            fixed_target: config.outbound_target,
            pod_ips: None,
        };
        tokio::spawn(accept::serve(
            listener,
            settings,
            drain.clone(),
            outbound_limit.clone().serve(move |conn| outbound.clone().proxy(conn)),
        ));
    }

    let grace = config.shutdown_grace_period;
    info!(
        inbound = %config.inbound_addr,
        inbound_ipv6 = ?config.inbound_ipv6_twin,
        outbound = ?config.outbound_addrs,
        outbound_ipv6 = ?config.outbound_ipv6_twin,
        pod_ips = ?config.inbound_ips.addrs,
        admin = %config.admin_addr,
        version = env!("CARGO_PKG_VERSION"),
        "proxy listening"
    );
    let admin = Arc::new(Admin {
        identity: mesh.as_ref().map(|m| m.store.clone()),
        control,
        config,
        metrics,
        listeners_bound: listeners_bound.clone(),
        drain: drain.clone(),
        log,
    });
    tokio::spawn(admin::serve(admin_listener, admin));
    listeners_bound.set();

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM received, draining"),
        _ = sigint.recv() => info!("SIGINT received, draining"),
        () = drain.started() => info!("draining"),
    }
    drain.begin();
    let still_open = drain.wait(grace).await;
    if still_open > 0 {
        warn!(connections = still_open, grace = ?grace, "grace period over, closing remaining connections");
    } else {
        info!("drained");
    }
    Ok(())
}

/// Binds a default listener's IPv6 twin; `None` when there is none or this host has no IPv6
/// (then IPv6 is not redirected either). Any other failure, e.g. the port taken, is an error.
fn bind_ipv6_twin(what: &'static str, addr: Option<SocketAddr>) -> Result<Option<TcpListener>, AppError> {
    let Some(addr) = addr else { return Ok(None) };
    match transport::bind_ipv6_only(addr) {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if transport::is_ipv6_unavailable(&e) => {
            info!(listener = what, %addr, error = %e, "no IPv6 on this host; listening on IPv4 only");
            Ok(None)
        }
        Err(source) => Err(AppError::Bind { what, addr, source }),
    }
}

/// The mesh (when an identity is configured) and the control channel's status (when there is a
/// control plane).
type MeshParts = (Option<Arc<Mesh>>, Option<Arc<ControlStatus>>);

/// Builds the identity store, its certificate source, the control channel and the mesh TLS
/// configs, or `None` when no identity is configured. Everything that can be checked before
/// binding is checked here.
fn mesh(config: &Config, metrics: &Metrics) -> Result<MeshParts, AppError> {
    let fail = |e: String| AppError::Identity(e);
    let source = match &config.identity {
        IdentitySource::None => return Ok((None, None)),
        IdentitySource::ControlPlane { .. } => "control-plane",
        IdentitySource::Files { .. } => "files",
    };
    let (roots, roots_der) = match &config.trust_anchors {
        Some(TrustAnchors::Pem(pem)) => tls::trust_anchors(pem.as_bytes(), "PILLION_TRUST_ANCHORS"),
        Some(TrustAnchors::File(path)) => tls::trust_anchors_file(path),
        None => return Err(fail("no trust anchors".into())),
    }
    .map_err(|e| fail(e.to_string()))?;
    let store = Arc::new(IdentityStore::new(
        roots,
        &roots_der,
        source,
        metrics.identity_expiry.clone(),
    ));
    let control = match &config.control_addr {
        Some(addr) => Some(ControlPlane::new(addr, &config.control_channel, &store).map_err(|e| fail(e.to_string()))?),
        None => None,
    };
    match &config.identity {
        IdentitySource::Files { cert_file, key_file } => {
            store.install(identity::files::load(cert_file, key_file).map_err(fail)?);
            tokio::spawn(identity::files::watch(
                store.clone(),
                cert_file.clone(),
                key_file.clone(),
            ));
        }
        IdentitySource::ControlPlane { token_file } => {
            if let Err(e) = std::fs::metadata(token_file) {
                return Err(fail(format!(
                    "PILLION_IDENTITY_TOKEN_FILE {}: {e}",
                    token_file.display()
                )));
            }
            if let Some(control) = &control {
                tokio::spawn(identity::control::run(
                    store.clone(),
                    control.identity.clone(),
                    token_file.clone(),
                    identity::control::Expectations {
                        identity: config.expected_identity.clone(),
                        rejected: metrics.identity_rejected.clone(),
                    },
                ));
            }
        }
        IdentitySource::None => {}
    }
    let status = control.as_ref().map(|c| c.status.clone());
    let discovery = control.map(|control| {
        let settings = DiscoverySettings::from_config(config);
        Discovery::new(
            control.discovery,
            settings,
            metrics.http.clone(),
            metrics.discovery_destinations.clone(),
        )
    });
    let tls = MeshTls::new(store.clone()).map_err(|e| fail(e.to_string()))?;
    Ok((Some(Arc::new(Mesh { tls, store, discovery })), status))
}
