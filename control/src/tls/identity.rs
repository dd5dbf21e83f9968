//! The control plane's own certificate: issued at start-up by the same CA that signs workloads,
//! for a key that never leaves memory, and renewed at 70% of its lifetime without a restart.
//!
//! The certificate has the workload profile (one URI SAN, `CA:false`, digitalSignature, EKU
//! serverAuth + clientAuth), so a proxy verifies it exactly as it verifies a mesh peer: chain to
//! the trust anchors, then the SPIFFE ID. Handshakes read the current certificate through an
//! [`ArcSwap`], so a renewal applies to the next handshake; open connections keep theirs.

use std::{fmt, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rcgen::KeyPair;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::{ca::CertificateAuthority, policy::model::SpiffeId};

/// Share of a certificate's lifetime after which it is renewed (as Linkerd does).
const RENEW_AT: f64 = 0.7;
/// Never renew more often than this, even for a certificate the issuer's expiry cut short.
const MIN_RENEW_DELAY: Duration = Duration::from_secs(1);
/// Wait after a failed renewal; the current certificate keeps serving meanwhile.
const RETRY_DELAY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot generate the control plane's key: {0}")]
    Key(String),
    #[error("cannot issue the control plane's certificate: {0}")]
    Issue(String),
}

/// The certificate the gRPC listener presents.
pub struct ServerIdentity {
    ca: Arc<CertificateAuthority>,
    spiffe_id: SpiffeId,
    current: ArcSwap<Issued>,
}

struct Issued {
    key: Arc<CertifiedKey>,
    not_after: OffsetDateTime,
    /// How long after issuance to renew.
    renew_after: Duration,
}

impl ServerIdentity {
    /// Issues the first certificate now: a CA that cannot sign for us is a start-up error.
    pub fn new(ca: Arc<CertificateAuthority>, spiffe_id: SpiffeId) -> Result<Arc<Self>, IdentityError> {
        let first = issue(&ca, &spiffe_id)?;
        Ok(Arc::new(ServerIdentity {
            ca,
            spiffe_id,
            current: ArcSwap::from_pointee(first),
        }))
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// When the certificate now served expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.current.load().not_after
    }

    /// Renews the certificate at 70% of its lifetime until `shutdown`; a failed renewal is logged
    /// and retried after a few seconds while the previous certificate keeps serving.
    pub async fn renew(self: Arc<Self>, shutdown: CancellationToken) {
        let mut delay = self.current.load().renew_after;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match issue(&self.ca, &self.spiffe_id) {
                Ok(issued) => {
                    delay = issued.renew_after;
                    tracing::info!(
                        spiffe_id = %self.spiffe_id.as_str(),
                        valid_until = issued.not_after.unix_timestamp(),
                        "control-plane certificate renewed"
                    );
                    self.current.store(Arc::new(issued));
                }
                Err(e) => {
                    delay = RETRY_DELAY;
                    tracing::error!(
                        error = %e,
                        valid_until = self.not_after().unix_timestamp(),
                        "control-plane certificate not renewed; still serving the previous one"
                    );
                }
            }
        }
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One identity whatever the SNI: clients verify the SPIFFE ID, not a host name.
        Some(self.current.load().key.clone())
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

/// A fresh key (ECDSA P-256) and a certificate for it.
fn issue(ca: &CertificateAuthority, spiffe_id: &SpiffeId) -> Result<Issued, IdentityError> {
    let key = KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let svid = ca
        .issue(spiffe_id.as_str().to_string(), &key)
        .map_err(|e| IdentityError::Issue(e.to_string()))?;
    let now = OffsetDateTime::now_utc();
    let lifetime = Duration::try_from(svid.not_after - now).unwrap_or_default();
    if lifetime.is_zero() {
        return Err(IdentityError::Issue(format!(
            "the issuer expires at {}: renew it",
            ca.issuer_not_after()
        )));
    }
    let mut chain = Vec::with_capacity(1 + svid.chain.len());
    chain.push(svid.leaf);
    chain.extend(svid.chain);
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider).map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok(Issued {
        key: Arc::new(certified),
        not_after: svid.not_after,
        renew_after: renew_after(lifetime),
    })
}

/// 70% of the lifetime left at issuance, at least [`MIN_RENEW_DELAY`].
fn renew_after(lifetime: Duration) -> Duration {
    lifetime.mul_f64(RENEW_AT).max(MIN_RENEW_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_seventy_percent_never_in_a_loop() {
        assert_eq!(renew_after(Duration::from_secs(100)), Duration::from_secs(70));
        assert_eq!(renew_after(Duration::from_secs(24 * 3600)), Duration::from_secs(60480));
        assert_eq!(renew_after(Duration::from_millis(10)), MIN_RENEW_DELAY);
        assert_eq!(renew_after(Duration::ZERO), MIN_RENEW_DELAY);
    }
}
