//! Certificate verification for mesh TLS.
//!
//! rustls's stock server verifier checks DNS names and rejects a certificate whose only SAN is a
//! URI, which is exactly what an X.509-SVID is. So the client side checks the chain with webpki
//! (signature, validity, EKU serverAuth) and then compares the certificate's single URI SAN with
//! the SPIFFE ID named by the SNI it connected with. The server side uses rustls's client
//! verifier (chain only) and reads the peer's ID from the certificate afterwards.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::ParsedCertificate,
};

use super::spiffe::SpiffeId;

/// Told each identity a server proved (the control channel's status shows it).
pub type OnVerified = Arc<dyn Fn(&SpiffeId) + Send + Sync>;

/// Verifies a mesh server: chain to our trust anchors, then its SPIFFE ID against the one expected.
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    /// `None`: the SNI names the expected identity (mesh peers). `Some`: always this identity,
    /// whatever name was dialled (the control plane, reached by its Service's DNS name).
    expected: Option<SpiffeId>,
    /// Called after each successful verification (the control channel's status).
    on_verified: Option<OnVerified>,
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, algorithms: WebPkiSupportedAlgorithms) -> Self {
        SpiffeServerVerifier {
            roots,
            algorithms,
            expected: None,
            on_verified: None,
        }
    }

    /// A verifier that accepts only `expected`, however the server was addressed.
    pub fn for_identity(
        roots: Arc<RootCertStore>,
        algorithms: WebPkiSupportedAlgorithms,
        expected: SpiffeId,
        on_verified: Option<OnVerified>,
    ) -> Self {
        SpiffeServerVerifier {
            roots,
            algorithms,
            expected: Some(expected),
            on_verified,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algorithms.all)?;
        let expected = match (&self.expected, server_name) {
            (Some(expected), _) => expected.clone(),
            (None, ServerName::DnsName(sni)) => SpiffeId::from_sni(sni.as_ref())
                .ok_or_else(|| Error::General(format!("SNI {:?} names no identity", sni.as_ref())))?,
            (None, _) => return Err(Error::General("mesh TLS needs an identity name as SNI".into())),
        };
        let actual = SpiffeId::from_certificate(end_entity).map_err(|e| Error::General(e.to_string()))?;
        if actual != expected {
            return Err(Error::General(format!(
                "server identity is {actual}, expected {expected}"
            )));
        }
        if let Some(on_verified) = &self.on_verified {
            on_verified(&actual);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
