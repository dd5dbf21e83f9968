//! The inbound path: connections from other pods to this pod's app.
//!
//! accept on `PILLION_INBOUND_ADDR` → original destination (pod IP : app port) → connect to the
//! app at that same address → forward opaque bytes.
//!
//! Why the pod IP and not 127.0.0.1: an app port bound only to localhost stays unreachable from
//! outside the pod, exactly as without the mesh, and the app sees the address it was called on.
//! Our own connection is not redirected again: it leaves from the proxy's UID (exempt in
//! iptables-init's OUTPUT chain) and a local address is routed over `lo` (also exempt), while
//! PREROUTING never sees locally generated packets.

use std::sync::Arc;

use crate::{
    accept::Accepted,
    forward,
    metrics::{Direction, TcpMetrics},
    transport::ConnectSettings,
};

pub struct Inbound {
    pub connect: ConnectSettings,
    pub metrics: TcpMetrics,
}

impl Inbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let app = conn.dst.0;
        forward::proxy_opaque(
            conn.stream,
            conn.peer,
            app,
            Direction::Inbound,
            self.connect,
            &self.metrics,
        )
        .await
    }
}
