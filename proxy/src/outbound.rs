//! The outbound path: connections from this pod's app to anywhere else.
//!
//! accept on `PILLION_OUTBOUND_ADDR` → original destination (where the app was connecting) →
//! connect there → forward opaque bytes.
//!
//! Our upstream connection is not redirected back to us because it leaves from the proxy's UID,
//! which iptables-init exempts in the OUTPUT chain.

use std::sync::Arc;

use crate::{
    accept::Accepted,
    forward,
    metrics::{Direction, TcpMetrics},
    transport::ConnectSettings,
};

pub struct Outbound {
    pub connect: ConnectSettings,
    pub metrics: TcpMetrics,
}

impl Outbound {
    pub async fn proxy(self: Arc<Self>, conn: Accepted) {
        let target = conn.dst.0;
        forward::proxy_opaque(
            conn.stream,
            conn.peer,
            target,
            Direction::Outbound,
            self.connect,
            &self.metrics,
        )
        .await
    }
}
