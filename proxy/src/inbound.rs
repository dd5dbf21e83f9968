//! The inbound path: connections from other pods to this pod's app.
//!
//! ```text
//! accept on PILLION_INBOUND_ADDR → original destination (pod IP : app port)
//!   → addressed to the inbound port itself? a peer proxy's opaque transport: mesh TLS for our
//!     identity with the transport's ALPN, a header naming the app port, authorize the client
//!     for that port, opaque bytes to the app, no detection; anything else there is refused
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
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::{
    accept::Accepted,
    authz::Authorizer,
    detect::{DetectSettings, PrefixedIo, Protocol},
    forward::{self, ForwardSettings, Socket, Upstream},
    http::{HttpProxy, authz::ConnectionAuthz, upstream::Version},
    mesh::Mesh,
    metrics::{Direction, TcpMetrics},
    opaque_transport::OpaqueTransport,
    tls::spiffe::SpiffeId,
};

pub struct Inbound {
    pub forward: ForwardSettings,
    pub metrics: TcpMetrics,
    pub detect: DetectSettings,
    pub http: HttpProxy,
    pub mesh: Option<Arc<Mesh>>,
    pub authorizer: Arc<Authorizer>,
    pub transport: OpaqueTransport,
}

impl Inbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let Accepted { mut stream, peer, dst } = conn;
        // Not redirected from an app port but addressed to our own: only a peer proxy's opaque
        // transport comes this way, and it says which app port it is for.
        if self.transport.is_addressed_to_us(dst.0) {
            return self.serve_transport(stream, peer, dst.0).await;
        }
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
                        // Counted again as what it carries: operators see how much of the mesh
                        // traffic is HTTP/2 (between proxies, HTTP/1 travels as HTTP/2), HTTP/1
                        // or opaque.
                        self.metrics.detected(inner).inc();
                        self.serve(tls, inner, prefix, peer, app, Some(client_id)).await;
                    }
                    Err(error) => warn!(%peer, %error, "mesh TLS handshake failed"),
                }
                return;
            }
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
                let authz = Arc::new(ConnectionAuthz::new(
                    self.authorizer.clone(),
                    app,
                    client_id,
                    self.metrics.authz_denied.clone(),
                ));
                self.http
                    .serve(PrefixedIo::new(prefix, io), version, app, peer, Some(authz), None)
                    .await
            }
            Protocol::Tls | Protocol::Opaque if self.authorize(app, client_id.as_ref(), peer).await => {
                let metrics = &self.metrics;
                forward::proxy_opaque(
                    io,
                    &prefix,
                    peer,
                    app,
                    Direction::Inbound,
                    Upstream::Plain,
                    self.forward,
                    metrics,
                )
                .await;
            }
            // Denied TCP: closing is the only answer TCP has.
            Protocol::Tls | Protocol::Opaque => {}
        }
    }

    /// A connection addressed to our inbound port (`dst`): a peer proxy's opaque transport,
    /// forwarded like a mesh TLS connection to the port its header names, or refused.
    async fn serve_transport(&self, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        // Without an identity nothing can be a transport: it is a connection to ourselves.
        let Some(mesh) = &self.mesh else {
            self.metrics.refused_loop.inc();
            debug!(%peer, %dst, "connection addressed to the inbound port itself; refusing a forwarding loop");
            return;
        };
        let (tls, client_id, port) = match self.transport.accept(mesh, stream).await {
            Ok(accepted) => accepted,
            Err(refusal) => {
                self.metrics.refused_not_transport.inc();
                // Before a verified certificate anyone can cause a refusal: debug, or a scan of
                // the port floods the log. After it, a mesh workload is misbehaving: say so.
                match refusal.client {
                    Some(client) => {
                        info!(%peer, client = client.as_str(), error = %refusal.reason, "opaque transport refused")
                    }
                    None => {
                        debug!(%peer, error = %refusal.reason, "connection to the inbound port refused: not an opaque transport")
                    }
                }
                return;
            }
        };
        // From here as a mesh TLS connection straight to pod-ip:port, minus detection: the
        // client proxy sends only non-HTTP traffic this way, and the app may speak first.
        let app = SocketAddr::new(dst.ip(), port);
        self.serve(tls, Protocol::Opaque, BytesMut::new(), peer, app, Some(client_id))
            .await;
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
