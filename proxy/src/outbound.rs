//! The outbound path: connections from this pod's app to anywhere else.
//!
//! ```text
//! accept on PILLION_OUTBOUND_ADDR → original destination (where the app was connecting)
//!   → detect the protocol
//!   → HTTP: the HTTP stack (routes, timeouts, retries, metrics), in the app's protocol; its
//!     upstream connections are mesh TLS when discovery says the target is meshed
//!   → anything else: opaque bytes, in mesh TLS to a meshed target, plain otherwise
//! ```
//!
//! Our upstream connections are not redirected back to us because they leave from the proxy's
//! UID, which iptables-init exempts in the OUTPUT chain.

use std::sync::Arc;

use tracing::warn;

use crate::{
    accept::Accepted,
    detect::{DetectSettings, PrefixedIo, Protocol},
    forward,
    http::{HttpProxy, upstream::Version},
    mesh::Mesh,
    metrics::{Direction, TcpMetrics},
    transport::{self, ConnectSettings},
};

pub struct Outbound {
    pub connect: ConnectSettings,
    pub metrics: TcpMetrics,
    pub detect: DetectSettings,
    pub http: HttpProxy,
    pub mesh: Option<Arc<Mesh>>,
}

impl Outbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let Accepted { mut stream, peer, dst } = conn;
        let target = dst.0;
        let Some((protocol, prefix)) = self.detect.run(&mut stream, target.port()).await else {
            return;
        };
        self.metrics.detected(protocol).inc();
        let (connect, metrics) = (self.connect, &self.metrics);
        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                let version = Version::of(protocol);
                self.http
                    .serve(PrefixedIo::new(prefix, stream), version, target, peer, None)
                    .await
            }
            Protocol::Tls | Protocol::Opaque => {
                let server_id = match &self.mesh {
                    Some(mesh) => mesh.identity_for(target).await,
                    None => None,
                };
                metrics.mesh_connection(server_id.as_ref().map(|id| id.as_str()));
                let (Some(mesh), Some(id)) = (&self.mesh, server_id) else {
                    forward::proxy_opaque(stream, &prefix, peer, target, Direction::Outbound, connect, metrics).await;
                    return;
                };
                // Meshed target: the app's bytes travel inside mTLS to the peer proxy.
                let server = match transport::connect(target, connect).await {
                    Ok(server) => server,
                    Err(error) => {
                        metrics.connect_errors.inc();
                        warn!(%peer, %target, %error, "upstream connect failed");
                        transport::reset_on_close(&stream);
                        return;
                    }
                };
                match mesh.connect(server, &id).await {
                    Ok(mut tls) => {
                        use tokio::io::AsyncWriteExt;
                        if tls.write_all(&prefix).await.is_ok() {
                            metrics.read_bytes.inc_by(prefix.len() as u64);
                            let _ = forward::forward_io(&mut stream, &mut tls, metrics).await;
                        }
                    }
                    Err(error) => {
                        metrics.connect_errors.inc();
                        warn!(%peer, %target, %id, %error, "mesh TLS to the upstream failed");
                        transport::reset_on_close(&stream);
                    }
                }
            }
        }
    }
}
