//! Mesh TLS: rustls configurations for both directions, built over the identity store so a
//! rotated certificate is used by the next handshake without rebuilding anything.
//!
//! TLS 1.3 only, aws-lc-rs, with the post-quantum hybrid key exchange (X25519MLKEM768)
//! preferred. Clients present their workload certificate; servers require one.
//!
//! No session resumption, on either side: a resumed TLS 1.3 session skips certificate
//! verification, so a ticket made with a certificate would outlive its expiry (and a revoked
//! trust anchor). Every connection is a full handshake that checks the peer's certificate now;
//! docs/performance.md has what that costs.

pub mod expiry;
pub mod spiffe;
pub mod verify;

#[cfg(test)]
mod tests;

use std::{io, path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::ResolvesClientCert,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    version::TLS13,
};

use crate::identity::IdentityStore;
use spiffe::SpiffeId;

/// The two rustls configurations a proxy needs.
#[derive(Clone)]
pub struct MeshTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust anchors {source_name}: {reason}")]
    TrustAnchors { source_name: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The process-wide crypto provider (aws-lc-rs with its default, post-quantum-first, groups).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parsed trust anchors: the store rustls verifies against, and the certificates themselves.
pub type Anchors = (Arc<RootCertStore>, Vec<CertificateDer<'static>>);

/// Parses PEM trust anchors into a root store; at least one certificate is required.
pub fn trust_anchors(pem: &[u8], source_name: &str) -> Result<Anchors, TlsError> {
    let error = |reason: String| TlsError::TrustAnchors {
        source_name: source_name.to_string(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| error(e.to_string()))?;
        roots.add(cert.clone()).map_err(|e| error(e.to_string()))?;
        certs.push(cert);
    }
    if roots.is_empty() {
        return Err(error("no certificate found".to_string()));
    }
    Ok((Arc::new(roots), certs))
}

pub fn trust_anchors_file(path: &Path) -> Result<Anchors, TlsError> {
    let pem = std::fs::read(path).map_err(|e: io::Error| TlsError::TrustAnchors {
        source_name: path.display().to_string(),
        reason: e.to_string(),
    })?;
    trust_anchors(&pem, &path.display().to_string())
}

impl MeshTls {
    pub fn new(store: Arc<IdentityStore>) -> Result<Self, TlsError> {
        let provider = provider();
        let roots = store.trust_anchors();
        let config_error = |e: rustls::Error| TlsError::Config(e.to_string());

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(StoreResolver(store.clone())));
        let mut server = server;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let server_verifier = verify::SpiffeServerVerifier::new(roots, provider.signature_verification_algorithms);
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .map_err(config_error)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(server_verifier))
            .with_client_cert_resolver(Arc::new(StoreResolver(store)));
        let mut client = client;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(MeshTls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The client configuration of the control channel: TLS 1.3 to `expected` (chained to our trust
/// anchors), ALPN h2 for gRPC. With `present_certificate`, our workload certificate is offered
/// (mutual TLS, once we hold one), so the control plane knows which workload is asking.
pub fn control_client(
    store: Arc<IdentityStore>,
    expected: SpiffeId,
    present_certificate: bool,
    on_verified: Option<verify::OnVerified>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = verify::SpiffeServerVerifier::for_identity(
        store.trust_anchors(),
        provider.signature_verification_algorithms,
        expected,
        on_verified,
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = if present_certificate {
        builder.with_client_cert_resolver(Arc::new(StoreResolver(store)))
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Hands rustls whatever certificate the store holds at handshake time.
#[derive(Debug)]
struct StoreResolver(Arc<IdentityStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|held| held.key.clone())
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|held| held.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
