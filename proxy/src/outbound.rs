//! The outbound path: connections from this pod's app to anywhere else.
//!
//! accept on `PILLION_OUTBOUND_ADDR` → original destination (where the app was connecting) →
//! detect the protocol → HTTP: the HTTP stack (routes, timeouts, retries, metrics), in the
//! app's protocol; TLS the app originated, and anything else: opaque bytes to the destination.
//!
//! Our upstream connections are not redirected back to us because they leave from the proxy's
//! UID, which iptables-init exempts in the OUTPUT chain.

use std::sync::Arc;

use crate::{
    accept::Accepted,
    detect::{DetectSettings, PrefixedIo, Protocol},
    forward,
    http::{HttpProxy, upstream::Version},
    metrics::{Direction, TcpMetrics},
    transport::ConnectSettings,
};

pub struct Outbound {
    pub connect: ConnectSettings,
    pub metrics: TcpMetrics,
    pub detect: DetectSettings,
    pub http: HttpProxy,
}

impl Outbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let Accepted { mut stream, peer, dst } = conn;
        let target = dst.0;
        let Some((protocol, prefix)) = self.detect.run(&mut stream, target.port()).await else {
            return;
        };
        self.metrics.detected(protocol).inc();
        match protocol {
            Protocol::Http1 => {
                let io = PrefixedIo::new(prefix, stream);
                self.http.serve(io, Version::Http1, target, peer).await
            }
            Protocol::Http2 => {
                let io = PrefixedIo::new(prefix, stream);
                self.http.serve(io, Version::Http2, target, peer).await
            }
            Protocol::Tls | Protocol::Opaque => {
                let (connect, metrics) = (self.connect, &self.metrics);
                forward::proxy_opaque(stream, &prefix, peer, target, Direction::Outbound, connect, metrics).await
            }
        }
    }
}
