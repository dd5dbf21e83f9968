//! The workload identity: the certificate this proxy presents, wherever it comes from.
//!
//! One [`IdentityStore`] holds the current certificate (swapped atomically on rotation) and the
//! trust anchors. Sources fill it: static files re-read on change ([`files`]), or the control
//! plane's CA through CSRs ([`control`]). Readiness waits for the first certificate.

pub mod check;
pub mod control;
pub mod files;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::gauge::Gauge;
use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};
use tokio::sync::watch;
use x509_parser::prelude::FromDer;

use crate::tls::spiffe::SpiffeId;

/// A certificate in use.
pub struct Held {
    pub key: Arc<CertifiedKey>,
    pub id: SpiffeId,
    /// The name a mesh client sends as SNI to reach us.
    pub sni: String,
    pub not_after: SystemTime,
    pub not_before: SystemTime,
}

pub struct IdentityStore {
    current: ArcSwapOption<Held>,
    roots: Arc<RootCertStore>,
    roots_pem_fingerprints: Vec<String>,
    /// Where certificates come from, for `/identity` and `/config`.
    pub source: &'static str,
    expiry: Gauge,
    ready: watch::Sender<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate chain is empty")]
    Empty,
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("workload identity: {0}")]
    Identity(#[from] crate::tls::spiffe::IdError),
    #[error("certificate does not match its private key: {0}")]
    Mismatch(String),
}

impl IdentityStore {
    pub fn new(
        roots: Arc<RootCertStore>,
        roots_der: &[CertificateDer<'_>],
        source: &'static str,
        expiry: Gauge,
    ) -> Self {
        IdentityStore {
            current: ArcSwapOption::empty(),
            roots,
            roots_pem_fingerprints: roots_der.iter().map(|c| sha256_hex(c)).collect(),
            source,
            expiry,
            ready: watch::Sender::new(false),
        }
    }

    pub fn current(&self) -> Option<Arc<Held>> {
        self.current.load_full()
    }

    pub fn trust_anchors(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    pub fn trust_anchor_fingerprints(&self) -> &[String] {
        &self.roots_pem_fingerprints
    }

    pub fn has_certificate(&self) -> bool {
        *self.ready.borrow()
    }

    /// A certificate is held and `now` is within its validity.
    pub fn has_valid_certificate(&self, now: SystemTime) -> bool {
        self.current()
            .is_some_and(|held| held.not_before <= now && now < held.not_after)
    }

    /// Resolves once the first certificate is held.
    pub async fn wait_for_certificate(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Installs a new certificate for the next handshakes.
    pub fn install(&self, held: Held) {
        let expiry = held.not_after.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        self.expiry.set(expiry as i64);
        tracing::info!(id = %held.id, expires_in = ?held.not_after.duration_since(SystemTime::now()).unwrap_or_default(), "workload certificate installed");
        self.current.store(Some(Arc::new(held)));
        self.ready.send_replace(true);
    }
}

impl fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityStore")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Held {
    /// Builds a certificate in use from a DER chain (leaf first) and its private key, checking
    /// that the leaf is an X.509-SVID and matches the key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::Empty)?;
        let id = SpiffeId::from_certificate(leaf)?;
        let sni = id.to_sni()?;
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(leaf).map_err(|e| CertError::Parse(e.to_string()))?;
        let validity = cert.validity();
        let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        let (not_before, not_after) = (at(validity.not_before.timestamp()), at(validity.not_after.timestamp()));
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::Key(e.to_string()))?;
        let key = CertifiedKey::new(chain, signing_key);
        key.keys_match().map_err(|e| CertError::Mismatch(e.to_string()))?;
        Ok(Held {
            key: Arc::new(key),
            id,
            sni,
            not_after,
            not_before,
        })
    }
}

pub fn sha256_hex(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// When to renew: at 70% of the remaining lifetime, clamped to 10 s – 24 h (as Linkerd does),
/// and never sooner than a second, so a certificate about to expire cannot make a busy loop.
pub fn renewal_delay(held: &Held, now: SystemTime) -> Duration {
    let remaining = held.not_after.duration_since(now).unwrap_or_default();
    let floor = Duration::from_secs(10).min(remaining / 2).max(Duration::from_secs(1));
    remaining
        .mul_f64(0.7)
        .clamp(floor, Duration::from_secs(24 * 3600).max(floor))
}
