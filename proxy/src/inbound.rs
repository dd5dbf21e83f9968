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
use tracing::{info, warn};

use crate::{
    accept::Accepted,
    authz::Authorizer,
    detect::{DetectSettings, PrefixedIo, Protocol},
    forward::{self, ForwardSettings, Socket},
    http::{HttpProxy, authz::ConnectionAuthz, upstream::Version},
    mesh::{Mesh, Security},
    metrics::{Direction, TcpMetrics},
    tls::spiffe::SpiffeId,
};

pub struct Inbound {
    pub forward: ForwardSettings,
    pub metrics: TcpMetrics,
    pub detect: DetectSettings,
    pub http: HttpProxy,
    pub mesh: Option<Arc<Mesh>>,
    pub authorizer: Arc<Authorizer>,
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
            self.metrics.mesh_connection(None);
            if self.authorize(app, None, peer).await {
                let (plain, metrics) = ((None, Security::Plain), &self.metrics);
                forward::proxy_opaque(
                    stream,
                    &prefix,
                    peer,
                    app,
                    Direction::Inbound,
                    plain,
                    self.forward,
                    metrics,
                )
                .await;
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
        I: Socket + 'static,
    {
        self.metrics.mesh_connection(client_id.as_ref().map(SpiffeId::as_str));
        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                // The first connection to a port waits briefly for the control plane's policy.
                self.authorizer.connection(app, client_id.as_ref()).await;
                let version = Version::of(protocol);
                // HTTP is checked again per request, against the policy of the moment.
                let authz = Arc::new(ConnectionAuthz {
                    authorizer: self.authorizer.clone(),
                    app,
                    client: client_id,
                    denied: self.metrics.authz_denied.clone(),
                });
                self.http
                    .serve(PrefixedIo::new(prefix, io), version, app, peer, Some(authz))
                    .await
            }
            Protocol::Tls | Protocol::Opaque if self.authorize(app, client_id.as_ref(), peer).await => {
                let (plain, metrics) = ((None, Security::Plain), &self.metrics);
                forward::proxy_opaque(io, &prefix, peer, app, Direction::Inbound, plain, self.forward, metrics).await
            }
            // Denied TCP: closing is the only answer TCP has.
            Protocol::Tls | Protocol::Opaque => {}
        }
    }

    /// Whether a TCP client (`None` = no mesh TLS) may reach `app`'s port; counts and logs a denial.
    async fn authorize(&self, app: SocketAddr, client_id: Option<&SpiffeId>, peer: SocketAddr) -> bool {
        let decision = self.authorizer.connection(app, client_id).await;
        if !decision {
            self.metrics.authz_denied.inc();
            let client = client_id.map_or("(no mesh identity)", SpiffeId::as_str);
            info!(%peer, port = app.port(), client, "connection denied by authorization policy");
        }
        decision
    }
}
