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
