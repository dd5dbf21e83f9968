//! The opaque transport: how mesh TLS reaches an app port whose bytes nobody may wait for.
//!
//! A direct mesh connection (mTLS to `pod-ip:app-port`) works because the server's proxy reads
//! the client's first bytes, sees a ClientHello for its identity, and terminates it. On an
//! opaque port it reads nothing (a server-speaks-first client such as MySQL or SMTP would wait
//! for the server's banner forever), so it cannot tell mesh TLS from the app's own bytes.
//!
//! So a client proxy sends non-HTTP traffic for a meshed target to the target's *proxy*:
//!
//! ```text
//! client proxy → peer-ip:<inbound port>   mesh TLS: SNI = the target's identity, ALPN = ALPN
//!              → header (transport_header) naming the app port, then the app's bytes
//! server proxy: original destination is its own inbound port → this is a transport
//!              → TLS for our identity? ALPN the transport's? header valid, port not our own?
//!              → authorize the client's identity for that port → plaintext to pod-ip:port
//! ```
//!
//! The server knows it is mesh TLS from where the connection was addressed, before any byte.
//! Peers are assumed to listen on the same inbound port as this proxy (`PILLION_INBOUND_ADDR`'s,
//! 4143 by default), as every injected sidecar of a mesh does. docs/opaque.md has the design.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use rustls::{ClientConfig, ServerConfig};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{client, server};

use crate::{
    config::Config,
    detect::{self, PrefixedIo, Protocol},
    mesh::{Mesh, client_hello_sni},
    tls::{MeshTls, expiry::CertBound, spiffe::SpiffeId},
    transport_header::TransportHeader,
};

/// The ALPN protocol that marks a mesh TLS session as the opaque transport: a direct mesh
/// connection never offers it, and the transport's server accepts nothing else.
pub const ALPN: &[u8] = b"pillion.io/transport/1";

/// The transport's settings and TLS configurations, built once at start-up.
#[derive(Clone)]
pub struct OpaqueTransport {
    /// Where peer proxies accept the transport: our own inbound port, assumed the same in every
    /// pod. `None` with a fixed outbound target (no iptables): that target is already a proxy's
    /// port, reached by direct mesh TLS.
    peer_inbound_port: Option<u16>,
    /// Connections addressed to this port (at a pod address) are transports. `None` with a
    /// fixed inbound target, where there are no original destinations to tell them by.
    own_inbound_port: Option<u16>,
    /// Ports a header may not name: this proxy's own listeners, which would loop or expose it.
    own_ports: Arc<[u16]>,
    /// Bounds everything before the app's bytes: ClientHello, handshake and header.
    timeout: Duration,
    tls: Option<TransportTls>,
}

/// The mesh TLS configurations with the transport's ALPN; the same identity store underneath,
/// so a rotated certificate is used here too.
#[derive(Clone)]
struct TransportTls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// A transport accepted by the server side: the TLS session (positioned after the header), the
/// client's verified identity and the app port it asked for.
pub type Accepted = (CertBound<server::TlsStream<PrefixedIo<TcpStream>>>, SpiffeId, u16);

/// Why a connection to the inbound port is not forwarded. `client` is set once the client's
/// certificate was verified: then the refusal concerns a mesh workload and is worth a log line.
#[derive(Debug)]
pub struct Refusal {
    pub client: Option<SpiffeId>,
    pub reason: RefusalReason,
}

#[derive(Debug, thiserror::Error)]
pub enum RefusalReason {
    #[error("not TLS (looks like {0})")]
    NotTls(&'static str),
    #[error("TLS for another identity (SNI {0:?})")]
    OtherIdentity(Option<String>),
    #[error("mesh TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("ALPN {0:?} is not the opaque transport's")]
    WrongAlpn(Option<String>),
    #[error("{0}")]
    Header(io::Error),
    #[error("the header names port {0}, one of the proxy's own")]
    OwnPort(u16),
    #[error("no ClientHello, handshake and header within {0:?}")]
    Timeout(Duration),
    #[error("client went away: {0}")]
    Io(io::Error),
}

impl OpaqueTransport {
    /// From the configuration; TLS only when there is a mesh identity.
    pub fn new(config: &Config, mesh: Option<&Mesh>) -> OpaqueTransport {
        let inbound_port = config.inbound_addr.port();
        let mut own_ports = vec![inbound_port, config.admin_addr.port()];
        own_ports.extend(config.outbound_addrs.iter().map(SocketAddr::port));
        OpaqueTransport {
            peer_inbound_port: config.outbound_target.is_none().then_some(inbound_port),
            own_inbound_port: config.inbound_target.is_none().then_some(inbound_port),
            own_ports: own_ports.into(),
            timeout: config.detect_timeout,
            tls: mesh.map(|mesh| TransportTls::new(&mesh.tls)),
        }
    }

    /// Whether an inbound connection with original destination `dst` was addressed to our own
    /// inbound port, not redirected from an app port: a transport, or nothing we forward.
    pub fn is_addressed_to_us(&self, dst: SocketAddr) -> bool {
        self.own_inbound_port == Some(dst.port())
    }

    /// Where the transport to a meshed `target` goes: its proxy's inbound port, at its address.
    /// `None` when outbound connections have a fixed target instead.
    pub fn peer_proxy(&self, target: SocketAddr) -> Option<SocketAddr> {
        self.peer_inbound_port.map(|port| SocketAddr::new(target.ip(), port))
    }

    /// Client side: mesh TLS over `stream` (connected to the peer's proxy) to identity `id`,
    /// then the header naming `port`, sent at once: the app may be waiting for the server.
    pub async fn open(
        &self,
        mesh: &Mesh,
        stream: TcpStream,
        id: &SpiffeId,
        port: u16,
    ) -> io::Result<CertBound<client::TlsStream<TcpStream>>> {
        let tls = self
            .tls
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no mesh identity"))?;
        let mut session = mesh.connect_with(tls.client.clone(), stream, id).await?;
        // A peer that does not choose our protocol does not speak the transport (or is not a
        // proxy at all): better a clear error here than the app's bytes in the wrong place.
        let alpn = session.get_ref().get_ref().1.alpn_protocol();
        if alpn != Some(ALPN) {
            return Err(io::Error::other(format!(
                "the peer proxy did not accept the opaque transport (ALPN {:?})",
                alpn.map(String::from_utf8_lossy)
            )));
        }
        session.write_all(&TransportHeader { port }.encode()).await?;
        session.flush().await?;
        Ok(session)
    }

    /// Server side: everything between a connection addressed to our inbound port and the app's
    /// first byte, within the timeout. Nothing here forwards; the caller authorizes and does.
    pub async fn accept(&self, mesh: &Mesh, stream: TcpStream) -> Result<Accepted, Refusal> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.accept_now(mesh, stream)).await {
            Ok(result) => result,
            Err(_) => Err(Refusal {
                client: None,
                reason: RefusalReason::Timeout(timeout),
            }),
        }
    }

    async fn accept_now(&self, mesh: &Mesh, mut stream: TcpStream) -> Result<Accepted, Refusal> {
        let refuse = |reason| Refusal { client: None, reason };
        let Some(tls) = &self.tls else {
            return Err(refuse(RefusalReason::Handshake(io::Error::other("no mesh identity"))));
        };
        // The ClientHello, read whole so its SNI can be checked before we answer it.
        let (protocol, hello) = detect::detect_protocol(&mut stream, self.timeout)
            .await
            .map_err(|e| refuse(RefusalReason::Io(e)))?;
        if protocol != Protocol::Tls {
            return Err(refuse(RefusalReason::NotTls(protocol.as_str())));
        }
        // TLS for anyone else (the app's own TLS included) never comes to this port.
        if !mesh.is_for_us(&hello) {
            return Err(refuse(RefusalReason::OtherIdentity(client_hello_sni(&hello))));
        }
        let io = PrefixedIo::new(hello, stream);
        let (mut session, client) = mesh
            .accept_with(tls.server.clone(), io)
            .await
            .map_err(|e| refuse(RefusalReason::Handshake(e)))?;
        let refuse = |reason| Refusal {
            client: Some(client.clone()),
            reason,
        };
        let alpn = session.get_ref().get_ref().1.alpn_protocol();
        if alpn != Some(ALPN) {
            let alpn = alpn.map(|a| String::from_utf8_lossy(a).into_owned());
            return Err(refuse(RefusalReason::WrongAlpn(alpn)));
        }
        let header = TransportHeader::read(&mut session)
            .await
            .map_err(|e| refuse(RefusalReason::Header(e)))?;
        if self.own_ports.contains(&header.port) {
            return Err(refuse(RefusalReason::OwnPort(header.port)));
        }
        Ok((session, client, header.port))
    }
}

impl TransportTls {
    fn new(mesh: &MeshTls) -> TransportTls {
        let mut client = (*mesh.client).clone();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let mut server = (*mesh.server).clone();
        // Only this protocol: a client offering others (or none) is not the transport.
        server.alpn_protocols = vec![ALPN.to_vec()];
        TransportTls {
            client: Arc::new(client),
            server: Arc::new(server),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use prometheus_client::metrics::gauge::Gauge;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        identity::{Held, IdentityStore},
        tls::{self, spiffe::SpiffeId},
        transport_header::HEADER_LEN,
    };

    const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
    const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";
    const INBOUND_PORT: u16 = 4143;

    /// A CA and the meshes of workloads it certified.
    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
    }

    impl Ca {
        fn new() -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let pem = params.self_signed(&key).unwrap().pem();
            Ca { params, key, pem }
        }

        /// A mesh (no discovery) holding an X.509-SVID for `id`.
        fn mesh(&self, id: &str) -> Mesh {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params
                .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
                .unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let (roots, der) = tls::trust_anchors(self.pem.as_bytes(), "test").unwrap();
            let store = Arc::new(IdentityStore::new(roots, &der, "files", Gauge::default()));
            store.install(Held::new(vec![cert.der().clone()], key, &tls::provider()).unwrap());
            let tls = MeshTls::new(store.clone()).unwrap();
            Mesh {
                tls,
                store,
                discovery: None,
            }
        }
    }

    fn transport(mesh: &Mesh, timeout: Duration) -> OpaqueTransport {
        OpaqueTransport {
            peer_inbound_port: Some(INBOUND_PORT),
            own_inbound_port: Some(INBOUND_PORT),
            own_ports: vec![INBOUND_PORT, 4191, 4140].into(),
            timeout,
            tls: Some(TransportTls::new(&mesh.tls)),
        }
    }

    /// A connected pair on loopback: (client side, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// What the server side makes of a connection the `client` function drives.
    async fn server_sees<F, Fut>(client: F) -> Result<(SpiffeId, u16), Refusal>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let ca = Ca::new();
        let server_mesh = ca.mesh(SERVER);
        let server = transport(&server_mesh, Duration::from_secs(2));
        let (client_side, server_side) = pair().await;
        let driver = tokio::spawn(client(client_side));
        let result = server.accept(&server_mesh, server_side).await;
        driver.abort();
        result.map(|(_, id, port)| (id, port))
    }

    fn client_mesh() -> (Ca, Mesh) {
        let ca = Ca::new();
        let mesh = ca.mesh(CLIENT);
        (ca, mesh)
    }

    fn server_id() -> SpiffeId {
        SpiffeId::parse(SERVER).unwrap()
    }

    /// Mesh TLS from a client certified by `ca`, with the transport's ALPN, then `header`; held
    /// open so the server's verdict is not an EOF.
    async fn tls_then(ca: &Ca, stream: TcpStream, header: &[u8]) {
        let mesh = ca.mesh(CLIENT);
        let tls = TransportTls::new(&mesh.tls);
        let Ok(mut session) = mesh.connect_with(tls.client, stream, &server_id()).await else {
            return;
        };
        let _ = session.write_all(header).await;
        let _ = session.flush().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_transport_carries_the_port_the_identity_and_bytes_both_ways_server_first() {
        let ca = Ca::new();
        let (client_mesh, server_mesh) = (ca.mesh(CLIENT), ca.mesh(SERVER));
        let (client, server) = (
            transport(&client_mesh, Duration::from_secs(5)),
            transport(&server_mesh, Duration::from_secs(5)),
        );
        let (client_side, server_side) = pair().await;
        let accepting = tokio::spawn(async move {
            let (mut session, id, port) = server
                .accept(&server_mesh, server_side)
                .await
                .map_err(|r| r.reason)
                .unwrap();
            // The server speaks first, as SMTP does: nothing from the client is needed.
            session.write_all(b"220 ready\r\n").await.unwrap();
            session.flush().await.unwrap();
            let mut got = [0u8; 4];
            session.read_exact(&mut got).await.unwrap();
            (id, port, got)
        });
        let mut session = client.open(&client_mesh, client_side, &server_id(), 25).await.unwrap();
        let mut banner = [0u8; 11];
        session.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 ready\r\n");
        session.write_all(b"EHLO").await.unwrap();
        session.flush().await.unwrap();
        let (id, port, got) = accepting.await.unwrap();
        assert_eq!((id.as_str(), port, &got), (CLIENT, 25, b"EHLO"));
    }

    #[tokio::test]
    async fn plaintext_is_refused() {
        let refusal = server_sees(|mut s| async move {
            let _ = s.write_all(b"PLNT\x01\x18\xebSET k v\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await
        .unwrap_err();
        assert!(matches!(refusal.reason, RefusalReason::NotTls("opaque")), "{refusal:?}");
        assert!(refusal.client.is_none());
    }

    #[tokio::test]
    async fn a_silent_client_is_refused_after_the_timeout() {
        let refusal = server_sees(|s| async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(s);
        })
        .await
        .unwrap_err();
        // Detection gives up at the same moment and calls the silence opaque: either way, refused.
        assert!(
            matches!(refusal.reason, RefusalReason::Timeout(_) | RefusalReason::NotTls(_)),
            "{refusal:?}"
        );
    }

    #[tokio::test]
    async fn tls_for_another_identity_is_refused_before_the_handshake() {
        let refusal = server_sees(|s| async move {
            let (_, mesh) = client_mesh();
            let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/other").unwrap();
            let tls = TransportTls::new(&mesh.tls);
            let _ = mesh.connect_with(tls.client, s, &other).await;
        })
        .await
        .unwrap_err();
        assert!(
            matches!(refusal.reason, RefusalReason::OtherIdentity(Some(_))),
            "{refusal:?}"
        );
    }

    #[tokio::test]
    async fn a_client_of_another_trust_domain_fails_the_handshake() {
        let refusal = server_sees(|s| async move {
            // Its own CA, which the server does not trust.
            let (ca, _) = client_mesh();
            tls_then(&ca, s, &TransportHeader { port: 6379 }.encode()).await;
        })
        .await
        .unwrap_err();
        assert!(matches!(refusal.reason, RefusalReason::Handshake(_)), "{refusal:?}");
    }

    /// The server's CA certifies the client too: it gets past the handshake with a verified
    /// identity, and everything after is checked.
    async fn refused_after_handshake(
        client: impl FnOnce(Arc<Ca>, TcpStream) -> BoxedFuture + Send + 'static,
    ) -> Refusal {
        let ca = Arc::new(Ca::new());
        let server_mesh = ca.mesh(SERVER);
        let server = transport(&server_mesh, Duration::from_secs(2));
        let (client_side, server_side) = pair().await;
        let driver = tokio::spawn(client(ca, client_side));
        let result = server.accept(&server_mesh, server_side).await;
        driver.abort();
        let refusal = result.map(|(_, id, port)| (id, port)).unwrap_err();
        assert_eq!(
            refusal.client.as_ref().map(SpiffeId::as_str),
            Some(CLIENT),
            "{refusal:?}"
        );
        refusal
    }

    type BoxedFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

    #[tokio::test]
    async fn direct_mesh_tls_without_the_transport_alpn_is_refused() {
        let refusal = refused_after_handshake(|ca, s| {
            Box::pin(async move {
                let mesh = ca.mesh(CLIENT);
                if let Ok(mut session) = mesh.connect(s, &server_id()).await {
                    let _ = session.write_all(&TransportHeader { port: 6379 }.encode()).await;
                    let _ = session.flush().await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            })
        })
        .await;
        assert!(matches!(refusal.reason, RefusalReason::WrongAlpn(None)), "{refusal:?}");
    }

    #[tokio::test]
    async fn bad_headers_and_own_ports_are_refused() {
        let bad: [&[u8]; 4] = [b"PLNT\x01\x00\x00", b"PLNT\x02\x18\xeb", b"GET / HTTP/1.1\r\n", b"PLN"];
        for header in bad {
            let refusal = refused_after_handshake(move |ca, s| {
                Box::pin(async move {
                    if header.len() < HEADER_LEN {
                        // Truncated: the client closes after what it sent.
                        let mesh = ca.mesh(CLIENT);
                        let tls = TransportTls::new(&mesh.tls);
                        if let Ok(mut session) = mesh.connect_with(tls.client, s, &server_id()).await {
                            let _ = session.write_all(header).await;
                            let _ = session.shutdown().await;
                        }
                    } else {
                        tls_then(&ca, s, header).await;
                    }
                })
            })
            .await;
            assert!(
                matches!(refusal.reason, RefusalReason::Header(_)),
                "{header:?}: {refusal:?}"
            );
        }
        for port in [INBOUND_PORT, 4191, 4140] {
            let refusal = refused_after_handshake(move |ca, s| {
                Box::pin(async move { tls_then(&ca, s, &TransportHeader { port }.encode()).await })
            })
            .await;
            assert!(
                matches!(refusal.reason, RefusalReason::OwnPort(p) if p == port),
                "{refusal:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_server_that_does_not_speak_the_transport_fails_the_client() {
        let ca = Ca::new();
        let (client_mesh, server_mesh) = (ca.mesh(CLIENT), ca.mesh(SERVER));
        let client = transport(&client_mesh, Duration::from_secs(5));
        let (client_side, server_side) = pair().await;
        // A proxy without the transport terminates mesh TLS without choosing an ALPN protocol.
        let server = tokio::spawn(async move {
            let accepted = server_mesh.accept(server_side).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(accepted);
        });
        let Err(error) = client.open(&client_mesh, client_side, &server_id(), 6379).await else {
            panic!("the transport opened to a server that does not speak it");
        };
        assert!(
            error.to_string().contains("did not accept the opaque transport"),
            "{error}"
        );
        server.abort();
    }

    #[test]
    fn the_peer_proxy_is_the_targets_address_at_our_inbound_port() {
        let ca = Ca::new();
        let mesh = ca.mesh(SERVER);
        let t = transport(&mesh, Duration::from_secs(1));
        let target: SocketAddr = "10.1.2.3:6379".parse().unwrap();
        assert_eq!(t.peer_proxy(target), Some("10.1.2.3:4143".parse().unwrap()));
        assert!(t.is_addressed_to_us("10.1.2.3:4143".parse().unwrap()));
        assert!(!t.is_addressed_to_us(target));
    }
}
