//! Mesh TLS on the data path: originating mTLS to meshed destinations (outbound) and
//! terminating it for connections addressed to our identity (inbound).

use std::{io, net::SocketAddr, sync::Arc};

use rustls::{pki_types::ServerName, server::Acceptor};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::{
    discovery::Discovery,
    identity::IdentityStore,
    tls::{
        MeshTls,
        expiry::{CertBound, session_end},
        spiffe::SpiffeId,
    },
};

/// The security decision for a connection to one target: plaintext, or mesh TLS naming the
/// identity its certificate must carry. A pooled connection is reused only under the decision it
/// was made with, so a change of discovery's answer takes effect on the next request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Security {
    Plain,
    Mesh(SpiffeId),
}

impl Security {
    /// Mesh TLS to `identity`; plaintext when there is none.
    pub fn from_identity(identity: Option<SpiffeId>) -> Self {
        identity.map_or(Security::Plain, Security::Mesh)
    }
}

pub struct Mesh {
    pub tls: MeshTls,
    pub store: Arc<IdentityStore>,
    pub discovery: Option<Arc<Discovery>>,
}

impl Mesh {
    /// The identity expected at `target`, if the control plane says it is meshed.
    pub async fn identity_for(&self, target: SocketAddr) -> Option<SpiffeId> {
        self.discovery.as_ref()?.lookup(target).await?.identity(target).cloned()
    }

    /// The decision in force for `target`, waiting (once per destination) for discovery's answer.
    pub async fn security_for(&self, target: SocketAddr) -> Security {
        Security::from_identity(self.identity_for(target).await)
    }

    /// The decision in force for `target` without waiting, when discovery has settled it;
    /// `None` when only [`security_for`](Self::security_for) can tell.
    pub fn settled_security(&self, target: SocketAddr) -> Option<Security> {
        let Some(discovery) = &self.discovery else {
            return Some(Security::Plain);
        };
        let answer = discovery.handle_addr(target)?.settled()?;
        Some(Security::from_identity(
            answer.and_then(|t| t.identity(target).cloned()),
        ))
    }

    /// Opens mTLS over `stream`, naming (and so verifying) the expected server identity. The
    /// connection ends when either side's certificate expires.
    pub async fn connect(
        &self,
        stream: TcpStream,
        id: &SpiffeId,
    ) -> io::Result<CertBound<client::TlsStream<TcpStream>>> {
        self.connect_with(self.tls.client.clone(), stream, id).await
    }

    /// When the certificate we present expires (none held: no mesh TLS at all).
    fn own_not_after(&self) -> io::Result<std::time::SystemTime> {
        self.store
            .current()
            .map(|held| held.not_after)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no workload certificate held"))
    }

    /// Whether a buffered ClientHello asks for our identity (by SNI).
    pub fn is_for_us(&self, client_hello: &[u8]) -> bool {
        let Some(held) = self.store.current() else {
            return false;
        };
        client_hello_sni(client_hello).is_some_and(|sni| sni.eq_ignore_ascii_case(&held.sni))
    }

    /// Terminates mTLS; returns the stream (ending when either side's certificate expires) and
    /// the client's verified identity.
    pub async fn accept<I>(&self, io: I) -> io::Result<(CertBound<server::TlsStream<I>>, SpiffeId)>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        self.accept_with(self.tls.server.clone(), io).await
    }

    /// [`connect`](Self::connect) with another client configuration over the same identity
    /// store: the opaque transport's, which offers its own ALPN protocol.
    pub async fn connect_with(
        &self,
        config: Arc<rustls::ClientConfig>,
        stream: TcpStream,
        id: &SpiffeId,
    ) -> io::Result<CertBound<client::TlsStream<TcpStream>>> {
        let sni = id.to_sni().map_err(io::Error::other)?;
        let name = ServerName::try_from(sni).map_err(io::Error::other)?;
        let tls = TlsConnector::from(config).connect(name, stream).await?;
        let until = session_end(self.own_not_after()?, tls.get_ref().1.peer_certificates());
        Ok(CertBound::new(tls, until))
    }

    /// [`accept`](Self::accept) with another server configuration over the same identity store:
    /// the opaque transport's, which accepts only its own ALPN protocol.
    pub async fn accept_with<I>(
        &self,
        config: Arc<rustls::ServerConfig>,
        io: I,
    ) -> io::Result<(CertBound<server::TlsStream<I>>, SpiffeId)>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = TlsAcceptor::from(config).accept(io).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| io::Error::new(io::ErrorKind::PermissionDenied, "client sent no certificate"))?;
        let id = SpiffeId::from_certificate(peer).map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
        let until = session_end(self.own_not_after()?, tls.get_ref().1.peer_certificates());
        Ok((CertBound::new(tls, until), id))
    }
}

/// The SNI of a complete ClientHello record, parsed by rustls without answering it.
pub fn client_hello_sni(record: &[u8]) -> Option<String> {
    let mut acceptor = Acceptor::default();
    let mut input = record;
    acceptor.read_tls(&mut input).ok()?;
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted.client_hello().server_name().map(str::to_owned),
        _ => None,
    }
}
