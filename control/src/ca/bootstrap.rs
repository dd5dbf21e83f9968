//! `pillion-control ca init`: a root and an issuer for local use.
//!
//! Production meshes bring their own root (kept offline) and give the control plane only an issuer
//! signed by it. For a laptop or a test, this makes both: a root valid for 10 years and an issuer
//! valid for 1 year, ECDSA P-256. The root's key is not kept: to rotate, run it again and roll out
//! the new root as a trust anchor.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use time::OffsetDateTime;

use super::random_serial;
use crate::spiffe::TrustDomain;

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// PEM text of a freshly made root certificate, issuer certificate and issuer key.
pub struct GeneratedCa {
    pub root_cert_pem: String,
    pub issuer_cert_pem: String,
    pub issuer_key_pem: String,
}

/// Generates a root CA and an issuer (intermediate) CA for `trust_domain`.
pub fn generate(trust_domain: &TrustDomain) -> Result<GeneratedCa, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let root_key = KeyPair::generate()?;
    let root_params = ca_params(format!("Pillion root CA ({trust_domain})"), 1, now, ROOT_LIFETIME);
    let root_cert = root_params.self_signed(&root_key)?;
    let root = Issuer::new(root_params, root_key);

    let issuer_key = KeyPair::generate()?;
    let mut issuer_params = ca_params(format!("Pillion issuer ({trust_domain})"), 0, now, ISSUER_LIFETIME);
    issuer_params.use_authority_key_identifier_extension = true;
    let issuer_cert = issuer_params.signed_by(&issuer_key, &root)?;

    Ok(GeneratedCa {
        root_cert_pem: root_cert.pem(),
        issuer_cert_pem: issuer_cert.pem(),
        issuer_key_pem: issuer_key.serialize_pem(),
    })
}

fn ca_params(common_name: String, path_len: u8, now: OffsetDateTime, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pillion");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + lifetime;
    params.serial_number = Some(random_serial());
    params
}
