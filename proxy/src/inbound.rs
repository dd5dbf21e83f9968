//! The inbound path: connections from other pods to this pod's app.
//!
//! ```text
//! accept on PILLION_INBOUND_ADDR → original destination (pod IP : app port)
//!   → detect the protocol
//!   → mesh TLS for our identity (SNI)? terminate it, verify the client's certificate,
//!     and detect again on the plaintext inside
//!   → authorize the client for this port (TCP: close if denied; HTTP: 403 per request)
//!   → HTTP: the HTTP stack, in the client's protocol; anything else: opaque bytes
//! ```
//!
//! The upstream is always the app at the original destination. Why the pod IP and not
//! 127.0.0.1: an app port bound only to localhost stays unreachable from outside the pod, as
//! without the mesh, and the app sees the address it was called on. Our own connection is not
//! redirected again: it leaves from the proxy's UID (exempt in iptables-init's OUTPUT chain) and
//! a local address is routed over `lo` (also exempt), while PREROUTING never sees locally
//! generated packets. TLS that is not for our identity passes through untouched.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::{
    accept::Accepted,
    authz::Authorization,
    detect::{DetectSettings, PrefixedIo, Protocol},
    forward,
    http::{HttpProxy, upstream::Version},
    mesh::Mesh,
    metrics::{Direction, TcpMetrics},
    tls::spiffe::SpiffeId,
    transport::ConnectSettings,
};

pub struct Inbound {
    pub connect: ConnectSettings,
    pub metrics: TcpMetrics,
    pub detect: DetectSettings,
    pub http: HttpProxy,
    pub mesh: Option<Arc<Mesh>>,
    pub default_authorization: Authorization,
}

impl Inbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let Accepted { mut stream, peer, dst } = conn;
        let app = dst.0;
        let Some((protocol, prefix)) = self.detect.run(&mut stream, app.port()).await else {
            return;
        };
        self.metrics.detected(protocol).inc();

        // Mesh TLS addressed to our identity is ours to terminate.
        if let (Protocol::Tls, Some(mesh)) = (protocol, &self.mesh) {
            if mesh.is_for_us(&prefix) {
                match mesh.accept(PrefixedIo::new(prefix, stream)).await {
                    Ok((mut tls, client_id)) => {
                        let Some((inner, prefix)) = self.detect.run(&mut tls, app.port()).await else {
                            return;
                        };
                        self.serve(tls, inner, prefix, peer, app, Some(client_id)).await;
                    }
                    Err(error) => warn!(%peer, %error, "mesh TLS handshake failed"),
                }
                return;
            }
        }
        if matches!(protocol, Protocol::Tls | Protocol::Opaque) {
            if self.authorize(app, None, peer).await {
                // Plain sockets on both sides: the cheapest forwarding path.
                let (connect, metrics) = (self.connect, &self.metrics);
                forward::proxy_opaque(stream, &prefix, peer, app, Direction::Inbound, connect, metrics).await;
            }
            return;
        }
        self.serve(stream, protocol, prefix, peer, app, None).await;
    }

    /// Serves a client whose protocol is known, plaintext (possibly inside mesh TLS).
    async fn serve<I>(
        &self,
        io: I,
        protocol: Protocol,
        prefix: BytesMut,
        peer: SocketAddr,
        app: SocketAddr,
        client_id: Option<SpiffeId>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let allowed = self.authorize(app, client_id.as_ref(), peer).await;
        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                let version = if protocol == Protocol::Http1 {
                    Version::Http1
                } else {
                    Version::Http2
                };
                self.http
                    .serve(PrefixedIo::new(prefix, io), version, app, peer, allowed)
                    .await
            }
            Protocol::Tls | Protocol::Opaque if allowed => {
                let (connect, metrics) = (self.connect, &self.metrics);
                forward::proxy_opaque_io(io, &prefix, peer, app, Direction::Inbound, connect, metrics).await
            }
            // Denied TCP: closing is the only answer TCP has.
            Protocol::Tls | Protocol::Opaque => {}
        }
    }

    /// Whether `client_id` (None = no mesh TLS) may reach `app`'s port; counts the decision.
    async fn authorize(&self, app: SocketAddr, client_id: Option<&SpiffeId>, peer: SocketAddr) -> bool {
        self.metrics.mesh_connection(client_id.map(SpiffeId::as_str));
        let from_control_plane = match self.mesh.as_ref().and_then(|m| m.discovery.as_ref()) {
            Some(discovery) => discovery.lookup(app).await,
            None => None,
        };
        let policy = self.http.policy.load();
        let decision = match from_control_plane.as_ref().and_then(|t| t.authorization.as_ref()) {
            Some(authorization) => authorization.permits(client_id),
            None => policy
                .inbound_authorization(app.port())
                .unwrap_or(&self.default_authorization)
                .permits(client_id),
        };
        if !decision {
            self.metrics.authz_denied.inc();
            let client = client_id.map_or("(no mesh identity)", SpiffeId::as_str);
            info!(%peer, port = app.port(), client, "connection denied by authorization policy");
        }
        decision
    }
}
