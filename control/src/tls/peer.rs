//! Who is on the other end of a control-plane connection, and how the gRPC handlers learn it.
//!
//! The TLS layer accepts a connection with or without a client certificate (a proxy has none until
//! its first `Certify`). A presented certificate must chain to the trust anchors and carry exactly
//! one URI SAN, a SPIFFE ID in our trust domain; otherwise the handshake fails. The verified ID is
//! attached to the stream as [`ControlPeer`], which tonic copies into every request's extensions.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::{policy::model::SpiffeId, spiffe::TrustDomain};

/// The caller of a gRPC request, as established when its connection was accepted.
#[derive(Clone, Debug)]
pub struct ControlPeer {
    pub remote_addr: Option<SocketAddr>,
    pub identity: PeerIdentity,
}

/// What the connection proves about the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// `--plaintext`: nothing is proven; the services behave as before TLS existed.
    Plaintext,
    /// TLS without a client certificate (a proxy before its first certificate).
    Anonymous,
    /// TLS with a client certificate verified against the trust anchors.
    Verified(SpiffeId),
}

impl ControlPeer {
    /// The peer of a request; a request without one (not served by [`crate::server`]) proves nothing.
    pub fn of<T>(request: &tonic::Request<T>) -> ControlPeer {
        request
            .extensions()
            .get::<ControlPeer>()
            .cloned()
            .unwrap_or(ControlPeer {
                remote_addr: None,
                identity: PeerIdentity::Anonymous,
            })
    }

    /// For logs: the address, or `unknown`.
    pub fn addr(&self) -> String {
        self.remote_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".to_string())
    }
}

/// An accepted connection, plain or TLS, with the peer it proved.
pub struct ControlStream {
    io: Io,
    peer: ControlPeer,
}

enum Io {
    Plain(TcpStream),
    // Boxed: a rustls connection is a few KiB, a TcpStream a few bytes.
    Tls(Box<TlsStream<TcpStream>>),
}

impl ControlStream {
    pub fn plain(tcp: TcpStream, remote_addr: SocketAddr) -> Self {
        ControlStream {
            io: Io::Plain(tcp),
            peer: ControlPeer {
                remote_addr: Some(remote_addr),
                identity: PeerIdentity::Plaintext,
            },
        }
    }

    /// A completed handshake; the client certificate, if any, was verified by
    /// [`SpiffeClientVerifier`] during it.
    pub fn tls(tls: TlsStream<TcpStream>, remote_addr: SocketAddr, trust_domain: &TrustDomain) -> Result<Self, String> {
        let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            None => PeerIdentity::Anonymous,
            Some(leaf) => PeerIdentity::Verified(spiffe_id_of(leaf, trust_domain)?),
        };
        Ok(ControlStream {
            io: Io::Tls(Box::new(tls)),
            peer: ControlPeer {
                remote_addr: Some(remote_addr),
                identity,
            },
        })
    }

    pub fn peer(&self) -> &ControlPeer {
        &self.peer
    }
}

impl Connected for ControlStream {
    type ConnectInfo = ControlPeer;

    fn connect_info(&self) -> ControlPeer {
        self.peer.clone()
    }
}

impl AsyncRead for ControlStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// rustls's chain check (signature, validity, EKU clientAuth, trust anchors), then the SVID rule:
/// exactly one URI SAN, a SPIFFE ID in our trust domain. A certificate that fails either is
/// refused during the handshake, so no handler ever sees it.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl SpiffeClientVerifier {
    pub fn new(chain: Arc<dyn ClientCertVerifier>, trust_domain: TrustDomain) -> Self {
        SpiffeClientVerifier { chain, trust_domain }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.chain.verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_of(end_entity, &self.trust_domain).map_err(Error::General)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The single SPIFFE ID of an X.509-SVID, which must be in `trust_domain`. Reading the URI SAN
/// is the shared `SpiffeId`'s job: the proxy reads its peers' certificates with the same code.
pub fn spiffe_id_of(cert: &CertificateDer<'_>, trust_domain: &TrustDomain) -> Result<SpiffeId, String> {
    let id = SpiffeId::from_certificate(cert).map_err(|e| e.to_string())?;
    if id.trust_domain() != trust_domain.as_str() {
        return Err(format!("{id} is not in trust domain {trust_domain}"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone()
    }

    #[test]
    fn exactly_one_spiffe_uri_in_our_trust_domain() {
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let web = "spiffe://cluster.local/ns/default/sa/web";
        assert_eq!(spiffe_id_of(&cert(&[web]), &td).unwrap().as_str(), web);
        let two = spiffe_id_of(&cert(&[web, "spiffe://cluster.local/ns/default/sa/db"]), &td);
        assert!(two.unwrap_err().contains("2 URI SANs"));
        assert!(spiffe_id_of(&cert(&[]), &td).unwrap_err().contains("no SPIFFE URI SAN"));
        assert!(spiffe_id_of(&cert(&["https://example.com/x"]), &td).is_err());
        let other = spiffe_id_of(&cert(&["spiffe://evil.example/ns/default/sa/web"]), &td);
        assert!(other.unwrap_err().contains("not in trust domain"));
        assert!(spiffe_id_of(&CertificateDer::from(vec![1, 2, 3]), &td).is_err());
    }
}
