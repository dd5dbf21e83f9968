//! The outbound path: connections from this pod's app to anywhere else.
//!
//! ```text
//! accept on PILLION_OUTBOUND_ADDR → original destination (where the app was connecting)
//!   → detect the protocol
//!   → HTTP: the HTTP stack (routes, timeouts, retries, metrics), in the app's protocol; its
//!     upstream connections are mesh TLS when discovery says the target is meshed
//!   → anything else: opaque bytes, balanced per connection over the destination's endpoints
//!     when it has some; to a meshed target in mesh TLS through the opaque transport (to the
//!     target's proxy's inbound port, the target's port in a header), plain otherwise
//! ```
//!
//! Our upstream connections are not redirected back to us because they leave from the proxy's
//! UID, which iptables-init exempts in the OUTPUT chain.

use std::{net::SocketAddr, sync::Arc};

use tokio::time::Instant;

use crate::{
    accept::Accepted,
    balance::Picked,
    detect::{DetectSettings, PrefixedIo, Protocol},
    discovery::Target,
    forward::{self, ForwardSettings, Upstream},
    http::{HttpProxy, upstream::Version},
    mesh::{Mesh, Security},
    metrics::{Direction, TcpMetrics},
    opaque_transport::OpaqueTransport,
};

pub struct Outbound {
    pub forward: ForwardSettings,
    pub metrics: TcpMetrics,
    pub detect: DetectSettings,
    pub http: HttpProxy,
    pub mesh: Option<Arc<Mesh>>,
    pub transport: OpaqueTransport,
}

impl Outbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let Accepted { mut stream, peer, dst } = conn;
        let target = dst.0;
        // Discovery's answer for the original destination, taken once for the connection: it
        // decides detection, and then the HTTP path's routing or the opaque path's endpoint and
        // security.
        let handle = self
            .mesh
            .as_ref()
            .and_then(|m| m.discovery.as_ref())
            .and_then(|d| d.handle_addr(target));
        let answer = match &handle {
            Some(handle) => handle.clone().resolve().await,
            None => None,
        };
        // A destination discovery says is opaque is not detected: its server speaks first, and
        // detection would wait for client bytes that never come (PILLION_OPAQUE_PORTS names
        // such ports locally; the hint names them for the whole mesh).
        let opaque = answer
            .as_ref()
            .and_then(|t| t.routes.as_ref())
            .is_some_and(|d| d.opaque());
        let detected = if opaque && !self.detect.opaque_ports.contains(target.port()) {
            Some((Protocol::Opaque, bytes::BytesMut::new()))
        } else {
            self.detect.run(&mut stream, target.port()).await
        };
        let Some((protocol, prefix)) = detected else {
            return;
        };
        self.metrics.detected(protocol).inc();
        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                let version = Version::of(protocol);
                self.http
                    .serve(PrefixedIo::new(prefix, stream), version, target, peer, None, handle)
                    .await
            }
            Protocol::Tls | Protocol::Opaque => {
                let mesh = self.mesh.as_deref();
                let started = Instant::now();
                let (target, picked, decided) = match self.balance(target, answer.as_deref()).await {
                    Balanced::No => (target, None, None),
                    Balanced::Picked(picked, decided) => (picked.address(), Some(picked), decided),
                    Balanced::NoHealthyEndpoint => {
                        tracing::info!(%peer, %target, "no healthy endpoint; connection reset");
                        crate::transport::reset_on_close(&stream);
                        return;
                    }
                };
                let security = match decided {
                    Some(decided) => decided,
                    // The original destination: as discovery's answer for it says.
                    None if picked.is_none() => {
                        Security::from_identity(answer.as_ref().and_then(|a| a.identity(target)).cloned())
                    }
                    // A route file's endpoint without an identity: discovery by its address.
                    None => match mesh {
                        Some(mesh) => mesh.security_for(target).await,
                        None => Security::Plain,
                    },
                };
                let id = match &security {
                    Security::Mesh(id) => Some(id.as_str()),
                    Security::Plain => None,
                };
                self.metrics.mesh_connection(id);
                let upstream = match (mesh, security) {
                    // A meshed target: the app's bytes go in mTLS to the target's proxy through
                    // the opaque transport, which tells that proxy the port without it reading
                    // a byte (the target's port may be opaque there, its server speaking first).
                    // The app's own TLS takes it too: one path for every non-HTTP mesh hop.
                    (Some(mesh), Security::Mesh(id)) if self.transport.peer_proxy(target).is_some() => {
                        Upstream::Transport(mesh, &self.transport, id)
                    }
                    // A fixed target (no iptables) is a proxy's inbound port already.
                    (Some(mesh), Security::Mesh(id)) => Upstream::Mesh(mesh, id),
                    _ => Upstream::Plain,
                };
                let (forward, metrics) = (self.forward, &self.metrics);
                let connected = forward::proxy_opaque(
                    stream,
                    &prefix,
                    peer,
                    target,
                    Direction::Outbound,
                    upstream,
                    forward,
                    metrics,
                )
                .await;
                // The endpoint held this connection until now (its load); its latency is the
                // time to reach it, and failing to reach it is a failure.
                if let Some(picked) = picked {
                    picked.complete(connected.unwrap_or_else(|| started.elapsed()), connected.is_none());
                }
            }
        }
    }

    /// Where an opaque connection to `target` goes: one of its destination's endpoints (the
    /// control plane's answer for the address, else the route file's entry), unless `target`
    /// is one of them itself or there are none.
    async fn balance(&self, target: SocketAddr, answer: Option<&Target>) -> Balanced {
        let answered = answer.and_then(|t| t.routes.clone());
        let from_control_plane = answered.is_some();
        let destination = match answered {
            Some(destination) => destination,
            None => self.http.policy.load().destination_by_addr(target).clone(),
        };
        let Some(balancer) = &destination.balancer else {
            return Balanced::No;
        };
        if destination.endpoint(target).is_some() {
            return Balanced::No;
        }
        match balancer.pick_within(destination.queue_timeout).await {
            Ok(picked) => {
                let decided = picked.endpoint().security(from_control_plane);
                Balanced::Picked(picked, decided)
            }
            Err(_) => Balanced::NoHealthyEndpoint,
        }
    }
}

/// An opaque connection's balancing decision.
enum Balanced {
    /// Not balanced: to the original destination.
    No,
    /// To this endpoint, under its security decision (`None`: discovery is asked by address).
    Picked(Picked, Option<Security>),
    NoHealthyEndpoint,
}
