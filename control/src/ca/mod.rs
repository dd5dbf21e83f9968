//! The certificate authority: signs X.509-SVIDs with the operator's issuer.
//!
//! The issuer (an intermediate under the operator's root) and the trust anchors come from PEM files
//! and are checked once at start-up: the key must match the certificate, the certificate must be a
//! CA, unexpired, and chain to a trust anchor. Every leaf then gets exactly one URI SAN, the SPIFFE
//! ID of the workload the token authenticated, and nothing from the CSR but its public key.

mod bootstrap;
mod csr;

use std::{path::Path, time::Duration};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

pub use bootstrap::{GeneratedCa, generate};
pub use csr::{CsrError, VerifiedCsr, verify_csr};

use crate::spiffe::{TrustDomain, WorkloadId};

/// How far a leaf's notBefore is backdated, so peers whose clocks lag a little accept it at once.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Signs workload certificates.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// Issuer first, then any further intermediates; trust anchors excluded.
    chain: Vec<CertificateDer<'static>>,
    /// The roots every certificate we sign chains to; also what client certificates are checked against.
    trust_anchors: Vec<CertificateDer<'static>>,
    issuer_not_before: OffsetDateTime,
    issuer_not_after: OffsetDateTime,
    lifetime: Duration,
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Svid {
    pub leaf: CertificateDer<'static>,
    /// Intermediates up to, not including, the trust anchor.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: OffsetDateTime,
    pub spiffe_id: String,
}

/// A CA configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// Why a signing request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("signing failed: {0}")]
    Internal(String),
}

impl CertificateAuthority {
    /// Reads and checks the issuer certificate (PEM, issuer first, optionally followed by further
    /// intermediates), its key and the trust anchors.
    pub fn load(
        issuer_cert: &Path,
        issuer_key: &Path,
        trust_anchors: &Path,
        trust_domain: TrustDomain,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        let cert_pem = read("issuer certificate", issuer_cert)?;
        let key_pem = read("issuer key", issuer_key)?;
        let anchors_pem = read("trust anchors", trust_anchors)?;
        Self::from_pem(&cert_pem, &key_pem, &anchors_pem, trust_domain, lifetime)
    }

    pub fn from_pem(
        issuer_cert_pem: &str,
        issuer_key_pem: &str,
        trust_anchors_pem: &str,
        trust_domain: TrustDomain,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        let invalid = |what, reason: String| CaError::Invalid { what, reason };
        let certs = parse_certs(issuer_cert_pem).map_err(|r| invalid("issuer certificate", r))?;
        let anchors = parse_certs(trust_anchors_pem).map_err(|r| invalid("trust anchors", r))?;
        let key = KeyPair::from_pem(issuer_key_pem).map_err(|e| invalid("issuer key", e.to_string()))?;

        let parsed: Vec<X509Certificate<'_>> = certs
            .iter()
            .map(|c| X509Certificate::from_der(c).map(|(_, x)| x))
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("issuer certificate", e.to_string()))?;
        let parsed_anchors: Vec<X509Certificate<'_>> = anchors
            .iter()
            .map(|c| X509Certificate::from_der(c).map(|(_, x)| x))
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("trust anchors", e.to_string()))?;
        let issuer = &parsed[0];

        if issuer.public_key().subject_public_key.data.as_ref() != rcgen::PublicKeyData::der_bytes(&key) {
            return Err(invalid(
                "issuer key",
                "does not match the issuer certificate's public key".to_string(),
            ));
        }
        check_is_ca(issuer).map_err(|r| invalid("issuer certificate", r))?;
        if !issuer.validity().is_valid() {
            return Err(invalid(
                "issuer certificate",
                format!(
                    "not valid now (valid {} to {})",
                    issuer.validity().not_before,
                    issuer.validity().not_after
                ),
            ));
        }
        // Each certificate must be signed by the next, and the last by a trust anchor.
        for pair in parsed.windows(2) {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .map_err(|_| invalid("issuer certificate", "intermediates do not form a chain".to_string()))?;
        }
        let top = &parsed[parsed.len() - 1];
        let anchored = parsed_anchors
            .iter()
            .any(|a| a.subject() == top.issuer() && top.verify_signature(Some(a.public_key())).is_ok());
        if !anchored {
            return Err(invalid(
                "issuer certificate",
                format!("not signed by any of the trust anchors (issuer: {})", top.issuer()),
            ));
        }

        let issuer_not_before = issuer.validity().not_before.to_datetime();
        let issuer_not_after = issuer.validity().not_after.to_datetime();
        let signer =
            Issuer::from_ca_cert_der(&certs[0], key).map_err(|e| invalid("issuer certificate", e.to_string()))?;
        // An issuer that is itself a trust anchor is not sent: peers have it already.
        let chain = certs.iter().filter(|c| !anchors.contains(c)).cloned().collect();
        Ok(CertificateAuthority {
            trust_domain,
            issuer: signer,
            chain,
            trust_anchors: anchors,
            issuer_not_before,
            issuer_not_after,
            lifetime,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When the issuer itself expires; leaves never outlive it.
    pub fn issuer_not_after(&self) -> OffsetDateTime {
        self.issuer_not_after
    }

    /// The trust anchors (roots), DER.
    pub fn trust_anchors(&self) -> &[CertificateDer<'static>] {
        &self.trust_anchors
    }

    /// The lifetime of issued certificates (before clipping to the issuer's expiry).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Verifies `csr` and signs its public key for `workload`.
    pub fn sign(&self, workload: &WorkloadId, csr: &[u8]) -> Result<Svid, SignError> {
        let csr = verify_csr(csr)?;
        self.issue(self.trust_domain.spiffe_id(workload), &csr.public_key)
    }

    /// Signs `public_key` for `spiffe_id` with the workload profile. The caller vouches for the
    /// ID: [`sign`](Self::sign) derives it from an authenticated token, the control plane's own
    /// certificate from its configuration.
    pub fn issue(&self, spiffe_id: String, public_key: &impl rcgen::PublicKeyData) -> Result<Svid, SignError> {
        let now = OffsetDateTime::now_utc();

        let mut params = CertificateParams::default();
        // Empty subject: the identity is the URI SAN alone (rcgen then marks the SAN critical, per RFC 5280).
        params.distinguished_name = DistinguishedName::new();
        let uri = spiffe_id
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| SignError::Internal(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = (now - CLOCK_SKEW_ALLOWANCE).max(self.issuer_not_before);
        params.not_after = (now + self.lifetime).min(self.issuer_not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;

        let leaf = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| SignError::Internal(e.to_string()))?;
        Ok(Svid {
            leaf: leaf.der().clone(),
            chain: self.chain.clone(),
            not_after: params.not_after,
            spiffe_id,
        })
    }
}

/// 16 random bytes, top bit clear so the DER integer stays positive and at most 16 bytes long.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // The system RNG failing is not recoverable; aws-lc aborts on it internally anyway.
    aws_lc_rs::rand::fill(&mut bytes).expect("system random number generator failed");
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn read(what: &'static str, path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate found".to_string());
    }
    Ok(certs)
}

fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), String> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => return Err("not a CA certificate (basicConstraints CA:true missing)".to_string()),
        Err(e) => return Err(e.to_string()),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err("key usage does not allow signing certificates".to_string()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
