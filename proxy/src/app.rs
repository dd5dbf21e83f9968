//! Wiring: binds every listener (all before serving anything, so a port conflict fails fast),
//! starts the admin server and both proxy paths, declares readiness, and runs the drain when a
//! signal or `POST /shutdown` arrives.

use std::{io, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    accept,
    admin::{self, Admin, Readiness},
    config::Config,
    detect::DetectSettings,
    drain::Drain,
    http::{HttpProxy, HttpSettings, upstream::Pool},
    inbound::Inbound,
    logging::LogLevel,
    metrics::{Direction, Metrics},
    outbound::Outbound,
    policy::{
        file::FileError,
        reload::{self, SharedPolicy},
    },
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
    RouteFile(#[from] FileError),
}

pub async fn run(config: Config, log: LogLevel) -> Result<(), AppError> {
    // The route file is checked before anything is bound: a bad file changes nothing.
    let metrics = Arc::new(Metrics::new());
    let policy: SharedPolicy = Arc::new(ArcSwap::from_pointee(reload::load(
        config.route_file.as_deref(),
        &metrics.http,
    )?));

    let bind = |what, addr| transport::bind(addr).map_err(|source| AppError::Bind { what, addr, source });
    let admin_listener = bind("admin", config.admin_addr)?;
    let inbound_listener = bind("inbound", config.inbound_addr)?;
    let outbound_listeners = config
        .outbound_addrs
        .iter()
        .map(|addr| bind("outbound", *addr))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AppError::Signals)?;

    let drain = Drain::new();
    let listeners_bound = Readiness::default();
    let connect = ConnectSettings {
        timeout: config.connect_timeout,
        keepalive: config.tcp_keepalive,
    };

    let http_settings = HttpSettings {
        idle_timeout: config.http_idle_timeout,
        max_header_bytes: config.http_max_header_bytes,
    };
    let detect = || DetectSettings {
        timeout: config.detect_timeout,
        opaque_ports: config.opaque_ports.clone(),
    };
    let http = |direction| HttpProxy {
        direction,
        policy: policy.clone(),
        pool: Arc::new(Pool::new(connect)),
        settings: http_settings,
        drain: drain.clone(),
    };
    if let Some(path) = &config.route_file {
        tokio::spawn(reload::watch(path.clone(), policy.clone(), metrics.http.clone()));
    }

    let inbound = Arc::new(Inbound {
        connect,
        metrics: metrics.tcp(Direction::Inbound),
        detect: detect(),
        http: http(Direction::Inbound),
    });
    tokio::spawn(accept::serve(
        inbound_listener,
        Direction::Inbound,
        inbound.metrics.clone(),
        config.tcp_keepalive,
        drain.clone(),
        move |conn| inbound.clone().proxy(conn),
    ));

    let outbound = Arc::new(Outbound {
        connect,
        metrics: metrics.tcp(Direction::Outbound),
        detect: detect(),
        http: http(Direction::Outbound),
    });
    for listener in outbound_listeners {
        let outbound = outbound.clone();
        tokio::spawn(accept::serve(
            listener,
            Direction::Outbound,
            outbound.metrics.clone(),
            config.tcp_keepalive,
            drain.clone(),
            move |conn| outbound.clone().proxy(conn),
        ));
    }

    let grace = config.shutdown_grace_period;
    info!(
        inbound = %config.inbound_addr,
        outbound = ?config.outbound_addrs,
        admin = %config.admin_addr,
        version = env!("CARGO_PKG_VERSION"),
        "proxy listening"
    );
    let admin = Arc::new(Admin {
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
