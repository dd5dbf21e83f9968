//! The inbound path: connections from other pods to this pod's app.
//!
//! accept on `PILLION_INBOUND_ADDR` → original destination (pod IP : app port) → detect the
//! protocol → HTTP: the HTTP stack, in the client's protocol; anything else: opaque bytes.
//! Either way the upstream is the app, at the connection's original destination.
//!
//! Why the pod IP and not 127.0.0.1: an app port bound only to localhost stays unreachable from
//! outside the pod, exactly as without the mesh, and the app sees the address it was called on.
//! Our own connection is not redirected again: it leaves from the proxy's UID (exempt in
//! iptables-init's OUTPUT chain) and a local address is routed over `lo` (also exempt), while
//! PREROUTING never sees locally generated packets.

use std::sync::Arc;

use crate::{
    accept::Accepted,
    detect::{DetectSettings, PrefixedIo, Protocol},
    forward,
    http::{HttpProxy, upstream::Version},
    metrics::{Direction, TcpMetrics},
    transport::ConnectSettings,
};

pub struct Inbound {
    pub connect: ConnectSettings,
    pub metrics: TcpMetrics,
    pub detect: DetectSettings,
    pub http: HttpProxy,
}

impl Inbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let Accepted { mut stream, peer, dst } = conn;
        let app = dst.0;
        let Some((protocol, prefix)) = self.detect.run(&mut stream, app.port()).await else {
            return;
        };
        self.metrics.detected(protocol).inc();
        match protocol {
            Protocol::Http1 => {
                let io = PrefixedIo::new(prefix, stream);
                self.http.serve(io, Version::Http1, app, peer).await
            }
            Protocol::Http2 => {
                let io = PrefixedIo::new(prefix, stream);
                self.http.serve(io, Version::Http2, app, peer).await
            }
            // TLS we do not terminate, and any other protocol, reach the app untouched.
            Protocol::Tls | Protocol::Opaque => {
                let (connect, metrics) = (self.connect, &self.metrics);
                forward::proxy_opaque(stream, &prefix, peer, app, Direction::Inbound, connect, metrics).await
            }
        }
    }
}
