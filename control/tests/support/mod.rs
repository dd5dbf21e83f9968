//! Shared helpers for the integration tests: a CA, CSRs, temporary directories, a running server
//! (TLS with its own SPIFFE certificate, as shipped) and gRPC clients that verify it.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use pillion_control::{
    auth::{Authenticator, WorkloadId},
    ca::{CertificateAuthority, GeneratedCa, generate},
    policy::{PolicyWatch, model::SpiffeId},
    server::{ControlPlane, Limits, ServeError, Transport, serve},
    spiffe::TrustDomain,
    tls::{ServerIdentity, spiffe_id_of},
};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};
use tokio_util::sync::CancellationToken;

pub const DAY: Duration = Duration::from_secs(24 * 3600);
/// The control plane's identity when `--identity` is not given.
pub const CONTROL_ID: &str = "spiffe://cluster.local/ns/pillion-system/sa/pillion-control";

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pillion-control-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn test_ca() -> (CertificateAuthority, GeneratedCa) {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let g = generate(&td).unwrap();
    let ca = CertificateAuthority::from_pem(&g.issuer_cert_pem, &g.issuer_key_pem, &g.root_cert_pem, td, DAY).unwrap();
    (ca, g)
}

/// A DER CSR that claims an identity of its own (which must be ignored).
pub fn csr() -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin".try_into().unwrap(),
    )];
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// A control plane serving on a loopback port.
pub struct Running {
    pub addr: SocketAddr,
    /// What clients verify the server against.
    pub anchors: Vec<CertificateDer<'static>>,
    /// The server's own certificate, when it serves TLS.
    pub identity: Option<Arc<ServerIdentity>>,
    pub server: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// How a test server runs: TLS with [`CONTROL_ID`] and the default limits unless told otherwise.
pub struct Options {
    /// `--plaintext`: only for tests of the plaintext mode itself.
    pub plaintext: bool,
    pub identity: String,
    pub limits: Limits,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            plaintext: false,
            identity: CONTROL_ID.to_string(),
            limits: Limits::default(),
        }
    }
}

/// A control plane serving TLS on a loopback port until `shutdown` is cancelled.
pub async fn start<A: Authenticator>(
    ca: CertificateAuthority,
    authenticator: A,
    policy: PolicyWatch,
    shutdown: CancellationToken,
) -> Running {
    start_with(ca, authenticator, policy, shutdown, Options::default()).await
}

pub async fn start_with<A: Authenticator>(
    ca: CertificateAuthority,
    authenticator: A,
    policy: PolicyWatch,
    shutdown: CancellationToken,
    options: Options,
) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ca = Arc::new(ca);
    let anchors = ca.trust_anchors().to_vec();
    let (transport, identity) = if options.plaintext {
        (Transport::Plaintext, None)
    } else {
        let id = SpiffeId::try_from(options.identity).unwrap();
        let identity = ServerIdentity::new(ca.clone(), id).unwrap();
        (Transport::Tls(identity.clone()), Some(identity))
    };
    let plane = ControlPlane {
        ca,
        authenticator: Arc::new(authenticator),
        policy,
        transport,
        limits: options.limits,
    };
    Running {
        addr,
        anchors,
        identity,
        server: tokio::spawn(serve(listener, plane, shutdown)),
    }
}

/// A workload's certificate chain and key, for mutual TLS.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

/// A certificate for `namespace/service_account` from `ca`, as Certify would issue it.
pub fn workload_cert(ca: &CertificateAuthority, namespace: &str, service_account: &str) -> ClientCert {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default().serialize_request(&key).unwrap();
    let svid = ca
        .sign(&WorkloadId::new(namespace, service_account).unwrap(), csr.der())
        .unwrap();
    let mut chain = vec![svid.leaf];
    chain.extend(svid.chain);
    ClientCert {
        chain,
        key_der: key.serialize_der(),
    }
}

/// Verifies the server as a proxy must: chain to `anchors`, then exactly one URI SAN equal to
/// `expected`. rustls's stock verifier would refuse a URI-only certificate.
#[derive(Debug)]
pub struct ExpectIdentity {
    roots: Arc<RootCertStore>,
    expected: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let id = spiffe_id_of(end_entity, &td).map_err(rustls::Error::General)?;
        if id.as_str() != self.expected {
            return Err(rustls::Error::General(format!(
                "server is {}, expected {}",
                id, self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A client configuration that trusts `anchors`, expects the server to be `expected`, offers
/// ALPN h2 and presents `client` when given.
pub fn client_config(
    anchors: &[CertificateDer<'static>],
    expected: &str,
    client: Option<&ClientCert>,
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for a in anchors {
        roots.add(a.clone()).unwrap();
    }
    let verifier = ExpectIdentity {
        roots: Arc::new(roots),
        expected: expected.to_string(),
        algorithms: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                c.chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// One TLS connection to `addr`, handshake done.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("pillion-control.pillion-system.svc").unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
}

/// Connects gRPC clients over [`tls_connect`].
#[derive(Clone)]
struct TlsConnect {
    addr: SocketAddr,
    config: Arc<ClientConfig>,
}

impl tonic::codegen::Service<http::Uri> for TlsConnect {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, config) = (self.addr, self.config.clone());
        Box::pin(async move { tls_connect(addr, config).await.map(hyper_util::rt::TokioIo::new) })
    }
}

/// A gRPC channel to `running` over TLS, verifying it is [`CONTROL_ID`].
pub async fn channel(running: &Running, client: Option<&ClientCert>) -> tonic::transport::Channel {
    channel_with(running.addr, client_config(&running.anchors, CONTROL_ID, client))
        .await
        .unwrap()
}

pub async fn channel_with(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(TlsConnect { addr, config })
        .await
}

/// A plaintext gRPC channel, for a server started with `plaintext: true`.
pub async fn plaintext_channel(running: &Running) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", running.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A serving certificate for 127.0.0.1 and localhost from a throwaway CA: (CA PEM, cert PEM, key PEM).
pub fn serving_cert() -> (String, String, String) {
    use rcgen::{BasicConstraints, IsCa, Issuer};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    (ca_cert.pem(), server_cert.pem(), server_key.serialize_pem())
}

/// An HTTPS/1.1 server on a loopback port answering with `service` (a fake API server): its address
/// and the CA that signs its certificate.
pub async fn serve_https<S>(service: S) -> (SocketAddr, String)
where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let (ca_pem, cert_pem, key_pem) = serving_cert();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, ca_pem)
}
