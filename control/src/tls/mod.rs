//! TLS on the control plane's gRPC listener: its own certificate ([`identity`]), who the client
//! is ([`peer`]), and the rustls configuration that joins them.
//!
//! TLS 1.3 only, ALPN `h2`. Client certificates are optional (a proxy has none before its first
//! `Certify`) and verified against the trust anchors when presented. Session resumption is off:
//! a resumed session would skip the client-certificate check, so a workload whose certificate had
//! expired could keep its identity on new connections. Control connections are few and long-lived,
//! so a full handshake each time costs nothing that matters.

pub mod identity;
pub mod peer;

use std::sync::Arc;

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};

pub use identity::{IdentityError, ServerIdentity};
pub use peer::{ControlPeer, ControlStream, PeerIdentity, SpiffeClientVerifier, spiffe_id_of};

use crate::ca::CertificateAuthority;

/// The listener's rustls configuration for `identity`, verifying clients against `ca`'s anchors.
pub fn server_config(ca: &CertificateAuthority, identity: Arc<ServerIdentity>) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for anchor in ca.trust_anchors() {
        roots
            .add(anchor.clone())
            .map_err(|e| format!("trust anchor unusable for client verification: {e}"))?;
    }
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let verifier = SpiffeClientVerifier::new(chain, ca.trust_domain().clone());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}
