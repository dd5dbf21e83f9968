//! Checking a certificate signing request before anything is signed.
//!
//! The CSR is only proof that the workload holds the private key: its signature must verify. Its
//! subject and requested extensions are ignored, with one exception: a request for a CA certificate
//! is refused outright, since it shows a caller trying for more than a workload certificate.

use rcgen::SubjectPublicKeyInfo;
use rustls_pki_types::{CertificateSigningRequestDer, pem::PemObject};
use x509_parser::{certification_request::X509CertificationRequest, extensions::ParsedExtension, prelude::FromDer};

/// Largest CSR accepted; an RSA-4096 CSR with extensions is well under 4 KiB.
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("invalid CSR: {0}")]
    Invalid(String),
    #[error("CSR signature does not verify")]
    BadSignature,
    #[error("CSR asks for a CA certificate")]
    CaRequested,
}

/// The public key of a CSR whose signature verified.
#[derive(Debug)]
pub struct VerifiedCsr {
    pub public_key: SubjectPublicKeyInfo,
}

/// Parses a DER (or PEM) CSR, verifies its self-signature and refuses CA requests.
pub fn verify_csr(bytes: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if bytes.is_empty() {
        return Err(CsrError::Invalid("empty".to_string()));
    }
    if bytes.len() > MAX_CSR_BYTES {
        return Err(CsrError::Invalid(format!("larger than {MAX_CSR_BYTES} bytes")));
    }
    let der;
    let bytes = if bytes.starts_with(b"-----BEGIN") {
        der =
            CertificateSigningRequestDer::from_pem_slice(bytes).map_err(|e| CsrError::Invalid(format!("PEM: {e}")))?;
        der.as_ref()
    } else {
        bytes
    };
    let (rest, csr) = X509CertificationRequest::from_der(bytes).map_err(|e| CsrError::Invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Invalid("trailing bytes after the CSR".to_string()));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::CaRequested),
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(CsrError::CaRequested);
            }
            _ => {}
        }
    }

    let spki = csr.certification_request_info.subject_pki.raw;
    let public_key = SubjectPublicKeyInfo::from_der(spki).map_err(|e| CsrError::Invalid(format!("public key: {e}")))?;
    Ok(VerifiedCsr { public_key })
}
