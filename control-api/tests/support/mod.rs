//! Shared helpers for the integration tests: a CA, CSRs, temporary directories, a running server.

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

use pillion_control_api::{
    auth::Authenticator,
    ca::{CertificateAuthority, GeneratedCa, generate},
    policy::PolicyWatch,
    server::{ControlPlane, serve},
    spiffe::TrustDomain,
};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio_util::sync::CancellationToken;

pub const DAY: Duration = Duration::from_secs(24 * 3600);

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

/// A control plane serving on a loopback port until the returned token is cancelled.
pub async fn start<A: Authenticator>(
    ca: CertificateAuthority,
    authenticator: A,
    policy: PolicyWatch,
    shutdown: CancellationToken,
) -> (SocketAddr, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let plane = ControlPlane {
        ca: Arc::new(ca),
        authenticator: Arc::new(authenticator),
        policy,
    };
    (addr, tokio::spawn(serve(listener, plane, shutdown)))
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
