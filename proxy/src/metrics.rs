//! Prometheus metrics: one registry for the process, and per-direction handles resolved once at
//! start-up so the data path only touches atomics, never a label map.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{detect::Protocol, http::metrics::HttpMetrics};

/// Which side of the pod a connection came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DetectLabels {
    direction: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MeshLabels {
    direction: &'static str,
    tls: &'static str,
    peer_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    direction: &'static str,
    reason: &'static str,
}

/// The process-wide registry, encoded by `GET /metrics`.
pub struct Metrics {
    registry: Registry,
    tcp: TcpFamilies,
    pub http: Arc<HttpMetrics>,
    /// The workload certificate's notAfter, unix seconds (0 until one is held).
    pub identity_expiry: Gauge,
    /// Certificates from the control plane refused before use (untrusted, wrong identity, ...).
    pub identity_rejected: Counter,
    /// Destinations discovery follows now (one control-plane stream each).
    pub discovery_destinations: Gauge,
}

struct TcpFamilies {
    opened: Family<DirectionLabels, Counter>,
    open: Family<DirectionLabels, Gauge>,
    read_bytes: Family<DirectionLabels, Counter>,
    write_bytes: Family<DirectionLabels, Counter>,
    connect_errors: Family<DirectionLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    detected: Family<DetectLabels, Counter>,
    mesh: Family<MeshLabels, Counter>,
    authz_denied: Family<DirectionLabels, Counter>,
}

/// TCP counters for one direction; cloned into every connection task (each field is an `Arc`).
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    pub opened: Counter,
    pub open: Gauge,
    /// Bytes read from the peer that opened the connection.
    pub read_bytes: Counter,
    /// Bytes written back to that peer.
    pub write_bytes: Counter,
    pub connect_errors: Counter,
    pub refused_loop: Counter,
    pub refused_no_original_dst: Counter,
    /// Inbound only: an original destination that is not one of the pod's addresses.
    pub refused_not_pod_address: Counter,
    /// Closed at accept: the listener was at its connection limit.
    pub refused_limit: Counter,
    /// Inbound only: addressed to the inbound port itself and not a valid opaque transport
    /// (plaintext, TLS for another identity or ALPN, a bad header, a port it may not name).
    pub refused_not_transport: Counter,
    /// Indexed by [`Protocol`] order: http1, http2, tls, opaque.
    detected: [Counter; 4],
    pub authz_denied: Counter,
    mesh: Family<MeshLabels, Counter>,
    direction: Direction,
}

impl TcpMetrics {
    pub fn detected(&self, protocol: Protocol) -> &Counter {
        &self.detected[protocol as usize]
    }

    /// Counts a connection by whether it is mesh TLS and by the peer's identity.
    pub fn mesh_connection(&self, peer_id: Option<&str>) {
        let labels = MeshLabels {
            direction: self.direction.as_str(),
            tls: if peer_id.is_some() { "true" } else { "false" },
            peer_id: peer_id.unwrap_or("").to_string(),
        };
        self.mesh.get_or_create(&labels).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pillion");
        let tcp = TcpFamilies {
            opened: Family::default(),
            open: Family::default(),
            read_bytes: Family::default(),
            write_bytes: Family::default(),
            connect_errors: Family::default(),
            refused: Family::default(),
            detected: Family::default(),
            mesh: Family::default(),
            authz_denied: Family::default(),
        };
        registry.register(
            "tcp_connections_opened",
            "TCP connections accepted by the proxy",
            tcp.opened.clone(),
        );
        registry.register(
            "tcp_connections_open",
            "TCP connections currently open",
            tcp.open.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from the peer that opened the connection",
            tcp.read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to the peer that opened the connection",
            tcp.write_bytes.clone(),
        );
        registry.register(
            "tcp_connect_errors",
            "Upstream connections that failed or timed out",
            tcp.connect_errors.clone(),
        );
        registry.register(
            "tcp_connections_refused",
            "Accepted connections closed without forwarding (reason: loop, no_original_dst, not_pod_address, limit, not_transport)",
            tcp.refused.clone(),
        );
        registry.register(
            "protocol_detections",
            "Accepted connections by detected protocol (http1, http2, tls, opaque)",
            tcp.detected.clone(),
        );
        registry.register(
            "tcp_mesh_connections",
            "Connections by mesh TLS (tls=true/false) and the client's verified SPIFFE ID (inbound) or the server's (outbound)",
            tcp.mesh.clone(),
        );
        registry.register(
            "authz_denied",
            "Inbound connections denied by authorization policy (TCP closed, HTTP answered 403)",
            tcp.authz_denied.clone(),
        );
        let http = Arc::new(HttpMetrics::register(&mut registry));
        let identity_expiry = Gauge::default();
        registry.register_with_unit(
            "identity_cert_expiration_timestamp",
            "When the workload certificate in use expires, as a unix timestamp",
            prometheus_client::registry::Unit::Seconds,
            identity_expiry.clone(),
        );
        let identity_rejected = Counter::default();
        registry.register(
            "identity_cert_rejected",
            "Certificates returned by the control plane and refused before use: not chained to the trust anchors, not valid now, for another identity, or not matching our key",
            identity_rejected.clone(),
        );
        let discovery_destinations = Gauge::default();
        registry.register(
            "discovery_destinations",
            "Destinations followed on the control plane (one stream each)",
            discovery_destinations.clone(),
        );
        Metrics {
            registry,
            tcp,
            http,
            identity_expiry,
            identity_rejected,
            discovery_destinations,
        }
    }

    /// Handles for one direction, label sets resolved here once.
    pub fn tcp(&self, direction: Direction) -> TcpMetrics {
        let labels = DirectionLabels {
            direction: direction.as_str(),
        };
        let refused = |reason| {
            self.tcp
                .refused
                .get_or_create(&RefusedLabels {
                    direction: direction.as_str(),
                    reason,
                })
                .clone()
        };
        TcpMetrics {
            opened: self.tcp.opened.get_or_create(&labels).clone(),
            open: self.tcp.open.get_or_create(&labels).clone(),
            read_bytes: self.tcp.read_bytes.get_or_create(&labels).clone(),
            write_bytes: self.tcp.write_bytes.get_or_create(&labels).clone(),
            connect_errors: self.tcp.connect_errors.get_or_create(&labels).clone(),
            refused_loop: refused("loop"),
            refused_no_original_dst: refused("no_original_dst"),
            refused_not_pod_address: refused("not_pod_address"),
            refused_limit: refused("limit"),
            refused_not_transport: refused("not_transport"),
            detected: [Protocol::Http1, Protocol::Http2, Protocol::Tls, Protocol::Opaque].map(|protocol| {
                self.tcp
                    .detected
                    .get_or_create(&DetectLabels {
                        direction: direction.as_str(),
                        protocol: protocol.as_str(),
                    })
                    .clone()
            }),
            authz_denied: self.tcp.authz_denied.get_or_create(&labels).clone(),
            mesh: self.tcp.mesh.clone(),
            direction,
        }
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let metrics = Metrics::new();
        let inbound = metrics.tcp(Direction::Inbound);
        inbound.opened.inc();
        inbound.read_bytes.inc_by(12);
        metrics.tcp(Direction::Outbound).refused_loop.inc();
        let text = metrics.encode();
        assert!(
            text.contains("pillion_tcp_connections_opened_total{direction=\"inbound\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pillion_tcp_read_bytes_total{direction=\"inbound\"} 12"),
            "{text}"
        );
        assert!(
            text.contains("pillion_tcp_connections_open{direction=\"outbound\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("pillion_tcp_connections_refused_total{direction=\"outbound\",reason=\"loop\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
