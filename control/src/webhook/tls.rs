//! The webhook's serving certificate, from files a Secret mounts (cert-manager or the operator's),
//! re-read when they change so a renewed certificate is served without a restart.
//!
//! The kubelet updates a mounted Secret by swapping a symlink, so the files are compared by content,
//! not by modification time. A pair that does not load (a half-written renewal, a key that does not
//! match) is logged and the previous certificate keeps serving.

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_util::sync::CancellationToken;

/// How often the files are compared with what is served.
const POLL_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The certificate and key files, and what they held when last read.
#[derive(Clone)]
pub struct CertificateFiles {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<ArcSwap<Loaded>>,
}

struct Loaded {
    pem: (Vec<u8>, Vec<u8>),
    key: Arc<CertifiedKey>,
}

impl CertificateFiles {
    /// Reads and checks both files now: a broken mount is a start-up error.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let pem = (read(&cert)?, read(&key)?);
        let loaded = certified(&cert, &key, pem)?;
        Ok(CertificateFiles {
            cert,
            key,
            current: Arc::new(ArcSwap::from_pointee(loaded)),
        })
    }

    /// A TLS acceptor that always presents the latest good certificate (HTTP/2 and HTTP/1.1).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the aws-lc-rs provider supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self.clone()));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// Re-reads the files every few seconds until `shutdown`, swapping in a changed, valid pair.
    pub async fn watch(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
            match self.reload().await {
                Ok(true) => tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate not reloaded; still serving the previous one")
                }
            }
        }
    }

    /// Whether a new pair was installed.
    pub async fn reload(&self) -> Result<bool, TlsError> {
        let pem = (read_async(&self.cert).await?, read_async(&self.key).await?);
        if pem == self.current.load().pem {
            return Ok(false);
        }
        let loaded = certified(&self.cert, &self.key, pem)?;
        self.current.store(Arc::new(loaded));
        Ok(true)
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

impl fmt::Debug for CertificateFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn certified(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
    pem: (Vec<u8>, Vec<u8>),
) -> Result<Loaded, TlsError> {
    let invalid = |path: &std::path::Path, reason: String| TlsError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&pem.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(invalid(cert_path, "no certificate found".to_string()));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.1).map_err(|e| invalid(key_path, e.to_string()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| invalid(key_path, format!("does not match the certificate: {e}")))?;
    Ok(Loaded {
        pem,
        key: Arc::new(certified),
    })
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

async fn read_async(path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}
