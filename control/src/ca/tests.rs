//! Signing rules: identity from the token only, CA requests and bad signatures refused, the
//! certificate's shape (lifetime, key usage, EKU) and its chain to the root.

use std::time::Duration;

use rcgen::{CertificateParams, CustomExtension, DnType, KeyPair, KeyUsagePurpose, SanType};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn test_ca() -> (CertificateAuthority, GeneratedCa) {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let generated = generate(&td).unwrap();
    let ca = CertificateAuthority::from_pem(
        &generated.issuer_cert_pem,
        &generated.issuer_key_pem,
        &generated.root_cert_pem,
        td,
        DAY,
    )
    .unwrap();
    (ca, generated)
}

/// A CSR that tries to claim a different identity through its subject and SANs.
fn greedy_csr(extra: Option<CustomExtension>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.subject_alt_names = vec![
        SanType::URI("spiffe://cluster.local/ns/kube-system/sa/admin".try_into().unwrap()),
        SanType::DnsName("evil.example".try_into().unwrap()),
    ];
    params.custom_extensions.extend(extra);
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn workload() -> WorkloadId {
    WorkloadId::new("default", "web").unwrap()
}

#[test]
fn san_comes_from_the_token_not_the_csr() {
    let (ca, _) = test_ca();
    let svid = ca.sign(&workload(), &greedy_csr(None)).unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");

    let (_, cert) = X509Certificate::from_der(&svid.leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "empty subject requires a critical SAN");
    let names: Vec<_> = san.value.general_names.iter().collect();
    assert_eq!(names.len(), 1, "exactly one SAN: {names:?}");
    assert!(matches!(names[0], GeneralName::URI(u) if *u == "spiffe://cluster.local/ns/default/sa/web"));
    assert_eq!(
        cert.subject().iter_attributes().count(),
        0,
        "CSR subject must be ignored"
    );
}

#[test]
fn certificate_shape_lifetime_usages() {
    let (ca, _) = test_ca();
    let before = OffsetDateTime::now_utc();
    let svid = ca.sign(&workload(), &greedy_csr(None)).unwrap();
    let (_, cert) = X509Certificate::from_der(&svid.leaf).unwrap();

    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    let lifetime = not_after - before;
    assert!(
        (lifetime - time::Duration::seconds(24 * 3600)).abs() < time::Duration::seconds(5),
        "{lifetime}"
    );
    assert!(
        not_before < before - time::Duration::seconds(60),
        "backdated for clock skew"
    );
    assert_eq!(svid.not_after.unix_timestamp(), not_after.unix_timestamp());

    let bc = cert.basic_constraints().unwrap().expect("basicConstraints present");
    assert!(!bc.value.ca);
    let ku = cert.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.key_encipherment());
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any && !eku.value.code_signing);
}

#[test]
fn chain_verifies_to_the_root() {
    let (ca, generated) = test_ca();
    let svid = ca.sign(&workload(), &greedy_csr(None)).unwrap();
    assert_eq!(svid.chain.len(), 1, "issuer only, root excluded");

    let root_der = CertificateDer::from_pem_slice(generated.root_cert_pem.as_bytes()).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    let (_, issuer) = X509Certificate::from_der(&svid.chain[0]).unwrap();
    let (_, leaf) = X509Certificate::from_der(&svid.leaf).unwrap();
    leaf.verify_signature(Some(issuer.public_key())).unwrap();
    issuer.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(leaf.issuer(), issuer.subject());
    assert!(leaf.validity().not_after <= issuer.validity().not_after);
}

#[test]
fn csr_asking_for_a_ca_is_refused() {
    let (ca, _) = test_ca();
    // basicConstraints (2.5.29.19) = SEQUENCE { BOOLEAN TRUE }
    let mut bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    bc.set_criticality(true);
    let err = ca.sign(&workload(), &greedy_csr(Some(bc))).unwrap_err();
    assert!(matches!(err, SignError::Csr(CsrError::CaRequested)), "{err}");

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let err = ca.sign(&workload(), &csr).unwrap_err();
    assert!(matches!(err, SignError::Csr(CsrError::CaRequested)), "{err}");
}

#[test]
fn csr_with_a_bad_signature_is_refused() {
    let (ca, _) = test_ca();
    let mut csr = greedy_csr(None);
    // The signature is the CSR's last field; changing its last byte keeps the DER well formed.
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    let err = ca.sign(&workload(), &csr).unwrap_err();
    assert!(matches!(err, SignError::Csr(CsrError::BadSignature)), "{err}");
}

#[test]
fn garbage_and_pem_csrs() {
    let (ca, _) = test_ca();
    for bad in [&b""[..], b"not a csr", &[0x30, 0x82, 0xff, 0xff]] {
        let err = ca.sign(&workload(), bad).unwrap_err();
        assert!(matches!(err, SignError::Csr(CsrError::Invalid(_))), "{err}");
    }
    let key = KeyPair::generate().unwrap();
    let pem = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    assert!(ca.sign(&workload(), pem.as_bytes()).is_ok());
}

#[test]
fn unusable_issuers_are_refused_at_load() {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let a = generate(&td).unwrap();
    let b = generate(&td).unwrap();
    let load = |cert: &str, key: &str, anchors: &str| {
        CertificateAuthority::from_pem(cert, key, anchors, td.clone(), DAY).map(|_| ())
    };

    let err = load(&a.issuer_cert_pem, &b.issuer_key_pem, &a.root_cert_pem).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    let err = load(&a.issuer_cert_pem, &a.issuer_key_pem, &b.root_cert_pem).unwrap_err();
    assert!(err.to_string().contains("trust anchors"), "{err}");

    // A workload certificate is not a CA.
    let ca = CertificateAuthority::from_pem(&a.issuer_cert_pem, &a.issuer_key_pem, &a.root_cert_pem, td.clone(), DAY)
        .unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default().serialize_request(&leaf_key).unwrap();
    let leaf = ca.sign(&workload(), csr.der()).unwrap();
    let leaf_pem = pem_of(&leaf.leaf);
    let err = load(&leaf_pem, &leaf_key.serialize_pem(), &a.root_cert_pem).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");

    let err = load("", &a.issuer_key_pem, &a.root_cert_pem).unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}

#[test]
fn leaves_never_outlive_the_issuer() {
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let g = generate(&td).unwrap();
    let ca = CertificateAuthority::from_pem(
        &g.issuer_cert_pem,
        &g.issuer_key_pem,
        &g.root_cert_pem,
        td,
        Duration::from_secs(5 * 365 * 24 * 3600),
    )
    .unwrap();
    let svid = ca.sign(&workload(), &greedy_csr(None)).unwrap();
    assert_eq!(svid.not_after, ca.issuer_not_after());
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}
