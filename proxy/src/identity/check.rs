//! What a certificate from the control plane must prove before it is installed.
//!
//! The control channel is authenticated, but a certificate is still checked on its own merits: a
//! compromised or buggy control plane must not be able to hand a workload a certificate its peers
//! would refuse (or, worse, accept for someone else). Installed only if it chains to our trust
//! anchors for both client and server use, is valid now, and names exactly the identity we were
//! told to expect. That it matches our key is checked when it is loaded ([`Held::new`]).

use std::sync::Arc;

use rustls::{
    RootCertStore,
    client::verify_server_cert_signed_by_trust_anchor,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, UnixTime},
    server::{ParsedCertificate, WebPkiClientVerifier},
};

use super::Held;
use crate::tls::spiffe::SpiffeId;

/// Why a certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("not vouched for by the trust anchors: {0}")]
    Untrusted(String),
    #[error("issued for {actual}, but this proxy is {expected}")]
    WrongIdentity { actual: SpiffeId, expected: SpiffeId },
}

/// Checks `held` (leaf first) at `now` against `roots` and the identity we expect, if any.
pub fn vouched_for(
    held: &Held,
    roots: &Arc<RootCertStore>,
    expected: Option<&SpiffeId>,
    provider: &Arc<CryptoProvider>,
    now: UnixTime,
) -> Result<(), Refused> {
    let untrusted = |e: &dyn std::fmt::Display| Refused::Untrusted(e.to_string());
    let (leaf, intermediates) = match held.key.cert.split_first() {
        Some((leaf, rest)) => (leaf, rest),
        None => return Err(Refused::Untrusted("empty chain".to_string())),
    };
    // As a client certificate (inbound peers check this) ...
    let as_client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| untrusted(&e))?;
    as_client
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| untrusted(&e))?;
    // ... and as a server certificate (outbound peers check this).
    let parsed = ParsedCertificate::try_from(leaf as &CertificateDer<'_>).map_err(|e| untrusted(&e))?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| untrusted(&e))?;
    match expected {
        Some(expected) if *expected != held.id => Err(Refused::WrongIdentity {
            actual: held.id.clone(),
            expected: expected.clone(),
        }),
        _ => Ok(()),
    }
}
