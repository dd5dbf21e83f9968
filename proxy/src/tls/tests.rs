//! Mesh TLS over an in-memory stream: both proxies' configurations, real handshakes, and the
//! certificates a verifier must refuse.

use std::{sync::Arc, time::Duration};

use prometheus_client::metrics::gauge::Gauge;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{MeshTls, spiffe::SpiffeId, trust_anchors};
use crate::{
    identity::{Held, IdentityStore},
    mesh::client_hello_sni,
};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// An X.509-SVID for `uris` valid from `from` to `until` (relative to now).
    fn svid(&self, uris: &[&str], from: i64, until: i64) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

fn store(ca_pem: &str, cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)) -> Arc<IdentityStore> {
    let (roots, der) = trust_anchors(ca_pem.as_bytes(), "test").unwrap();
    let store = Arc::new(IdentityStore::new(roots, &der, "files", Gauge::default()));
    store.install(Held::new(cert.0, cert.1, &super::provider()).unwrap());
    store
}

/// Handshakes a client holding `client_cert` with a server holding `server_cert` (both trusting
/// `ca`), the client expecting `expected`. Returns the identity each side saw, or the error.
async fn handshake(
    ca: &Ca,
    client_cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    server_cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    server_trusts: &str,
    expected: &str,
) -> Result<SpiffeId, String> {
    let client = MeshTls::new(store(&ca.pem, client_cert)).unwrap();
    let server = MeshTls::new(store(server_trusts, server_cert)).unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        let mut tls = tokio_rustls::TlsAcceptor::from(server.server)
            .accept(b)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned()
            .ok_or("no client cert")?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        SpiffeId::from_certificate(&peer).map_err(|e| e.to_string())
    });
    let name = SpiffeId::parse(expected).unwrap().to_sni().unwrap();
    let connector = tokio_rustls::TlsConnector::from(client.client);
    let result = async {
        let mut tls = connector
            .connect(name.try_into().unwrap(), a)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        Ok::<_, String>(())
    }
    .await;
    let seen_by_server = tokio::time::timeout(Duration::from_secs(5), server_task).await;
    result?;
    match seen_by_server {
        Ok(Ok(seen)) => seen,
        other => Err(format!("server side: {other:?}")),
    }
}

#[tokio::test]
async fn the_right_identity_handshakes_and_each_side_learns_the_other() {
    let ca = Ca::new("root");
    let seen = handshake(
        &ca,
        ca.svid(&[CLIENT], -60, 3600),
        ca.svid(&[SERVER], -60, 3600),
        &ca.pem,
        SERVER,
    )
    .await;
    assert_eq!(seen.unwrap().as_str(), CLIENT);
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let ca = Ca::new("root");
    let other = "spiffe://cluster.local/ns/default/sa/impostor";
    let err = handshake(
        &ca,
        ca.svid(&[CLIENT], -60, 3600),
        ca.svid(&[other], -60, 3600),
        &ca.pem,
        SERVER,
    )
    .await
    .unwrap_err();
    assert!(err.contains("expected"), "{err}");
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused() {
    let ca = Ca::new("root");
    let err = handshake(
        &ca,
        ca.svid(&[CLIENT], -60, 3600),
        ca.svid(&[SERVER], -7200, -3600),
        &ca.pem,
        SERVER,
    )
    .await
    .unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn an_untrusted_server_is_refused() {
    let ca = Ca::new("root");
    let rogue = Ca::new("rogue");
    let err = handshake(
        &ca,
        ca.svid(&[CLIENT], -60, 3600),
        rogue.svid(&[SERVER], -60, 3600),
        &rogue.pem,
        SERVER,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("unknown issuer") || err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn an_untrusted_client_is_refused_by_the_server() {
    let ca = Ca::new("root");
    let rogue = Ca::new("rogue");
    let result = handshake(
        &rogue,
        rogue.svid(&[CLIENT], -60, 3600),
        ca.svid(&[SERVER], -60, 3600),
        &ca.pem,
        SERVER,
    )
    .await;
    assert!(result.is_err(), "a client from another trust root must not get through");
}

#[tokio::test]
async fn a_certificate_with_two_uris_is_not_an_svid() {
    let ca = Ca::new("root");
    let (chain, _) = ca.svid(&[SERVER, "spiffe://cluster.local/ns/other/sa/x"], -60, 3600);
    assert_eq!(
        SpiffeId::from_certificate(&chain[0]),
        Err(super::spiffe::IdError::ManyUris(2))
    );
    // A proxy will not even hold it...
    let (chain, key) = ca.svid(&[SERVER, "spiffe://cluster.local/ns/other/sa/x"], -60, 3600);
    assert!(Held::new(chain.clone(), key, &super::provider()).is_err());
    // ...and a client refuses it from a server even though its chain is good.
    use rustls::client::danger::ServerCertVerifier;
    let (roots, _) = trust_anchors(ca.pem.as_bytes(), "test").unwrap();
    let verifier = super::verify::SpiffeServerVerifier::new(roots, super::provider().signature_verification_algorithms);
    let name = SpiffeId::parse(SERVER).unwrap().to_sni().unwrap().try_into().unwrap();
    let verdict = verifier.verify_server_cert(&chain[0], &[], &name, &[], rustls::pki_types::UnixTime::now());
    assert!(verdict.unwrap_err().to_string().contains("URI SANs"));
}

#[test]
fn a_client_hello_reveals_its_sni() {
    let ca = Ca::new("root");
    let client = MeshTls::new(store(&ca.pem, ca.svid(&[CLIENT], -60, 3600))).unwrap();
    let name = SpiffeId::parse(SERVER).unwrap().to_sni().unwrap();
    let mut conn = rustls::ClientConnection::new(client.client, name.clone().try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(client_hello_sni(&hello).as_deref(), Some(name.as_str()));
    assert_eq!(client_hello_sni(b"\x16\x03\x01\x00\x05hello"), None);
}

/// One full exchange between a client and a server config; how the handshake went.
async fn exchange(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    name: &str,
) -> Result<rustls::HandshakeKind, String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(b)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        // Let the client read what the server sends after the handshake (tickets, if any).
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    });
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name.to_string().try_into().unwrap(), a)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    let kind = tls.get_ref().1.handshake_kind().ok_or("handshake not done")?;
    tokio::time::timeout(Duration::from_secs(5), server_task)
        .await
        .map_err(|_| "server timed out".to_string())?
        .map_err(|e| e.to_string())??;
    Ok(kind)
}

#[tokio::test]
async fn no_session_outlives_the_handshake_that_checked_the_certificate() {
    let ca = Ca::new("root");
    let client = MeshTls::new(store(&ca.pem, ca.svid(&[CLIENT], -60, 3600))).unwrap();
    let server = MeshTls::new(store(&ca.pem, ca.svid(&[SERVER], -60, 3600))).unwrap();
    let sni = SpiffeId::parse(SERVER).unwrap().to_sni().unwrap();
    for _ in 0..3 {
        // The same client and server configs: a ticket from the first would make the next resumed.
        let kind = exchange(client.client.clone(), server.server.clone(), &sni)
            .await
            .unwrap();
        assert_eq!(kind, rustls::HandshakeKind::Full);
    }
    assert_eq!(server.server.send_tls13_tickets, 0);
}

/// A control plane's server config: its certificate, client certificates optional.
fn control_server(
    trusts: &str,
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Arc<rustls::ServerConfig> {
    let (roots, _) = trust_anchors(trusts.as_bytes(), "test").unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, super::provider())
        .allow_unauthenticated()
        .build()
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.0, cert.1)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn the_control_channel_accepts_only_the_named_control_plane() {
    const CONTROL: &str = "spiffe://cluster.local/ns/pillion-system/sa/pillion-control";
    let ca = Ca::new("root");
    let proxy_store = store(&ca.pem, ca.svid(&[CLIENT], -60, 3600));
    let control_id = SpiffeId::parse(CONTROL).unwrap();
    let verified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hook = {
        let verified = verified.clone();
        Arc::new(move |_: &SpiffeId| {
            verified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }) as super::verify::OnVerified
    };
    let client = super::control_client(proxy_store.clone(), control_id, false, Some(hook)).unwrap();

    // The genuine control plane, reached by its DNS name: accepted whatever the name.
    // Certify runs before the proxy has a certificate: the control plane does not require one.
    let server = control_server(&ca.pem, ca.svid(&[CONTROL], -60, 3600));
    assert!(
        exchange(client.clone(), server, "pillion-control.pillion-system.svc")
            .await
            .is_ok()
    );
    assert_eq!(verified.load(std::sync::atomic::Ordering::Relaxed), 1);

    // A workload's genuine certificate is not the control plane's.
    let server = control_server(&ca.pem, ca.svid(&[SERVER], -60, 3600));
    let err = exchange(client.clone(), server, "pillion-control.pillion-system.svc")
        .await
        .unwrap_err();
    assert!(
        err.contains("expected spiffe://cluster.local/ns/pillion-system/sa/pillion-control"),
        "{err}"
    );

    // A rogue control plane with the right name from its own CA.
    let rogue_ca = Ca::new("rogue");
    let server = control_server(&rogue_ca.pem, rogue_ca.svid(&[CONTROL], -60, 3600));
    assert!(
        exchange(client, server, "pillion-control.pillion-system.svc")
            .await
            .is_err()
    );
    assert_eq!(
        verified.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "nothing else was verified"
    );
}

mod issued_certificates {
    use rustls::pki_types::UnixTime;

    use super::*;
    use crate::identity::check::{Refused, vouched_for};

    fn check(
        ca: &Ca,
        trusted: &str,
        cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        expected: Option<&str>,
    ) -> Result<(), Refused> {
        let (roots, _) = trust_anchors(trusted.as_bytes(), "test").unwrap();
        let _ = ca;
        let held = Held::new(cert.0, cert.1, &super::super::provider()).unwrap();
        let expected = expected.map(|e| SpiffeId::parse(e).unwrap());
        vouched_for(
            &held,
            &roots,
            expected.as_ref(),
            &super::super::provider(),
            UnixTime::now(),
        )
    }

    #[test]
    fn a_certificate_is_installed_only_when_the_anchors_vouch_for_it() {
        let ca = Ca::new("root");
        assert!(check(&ca, &ca.pem, ca.svid(&[CLIENT], -60, 3600), Some(CLIENT)).is_ok());
        assert!(check(&ca, &ca.pem, ca.svid(&[CLIENT], -60, 3600), None).is_ok());

        // Self-signed by someone else: not ours.
        let rogue = Ca::new("rogue");
        assert!(matches!(
            check(&ca, &ca.pem, rogue.svid(&[CLIENT], -60, 3600), Some(CLIENT)),
            Err(Refused::Untrusted(_))
        ));
        // Expired, and not yet valid.
        assert!(matches!(
            check(&ca, &ca.pem, ca.svid(&[CLIENT], -3600, -60), Some(CLIENT)),
            Err(Refused::Untrusted(_))
        ));
        assert!(matches!(
            check(&ca, &ca.pem, ca.svid(&[CLIENT], 600, 3600), Some(CLIENT)),
            Err(Refused::Untrusted(_))
        ));
        // Genuine, but for another workload.
        assert!(matches!(
            check(&ca, &ca.pem, ca.svid(&[SERVER], -60, 3600), Some(CLIENT)),
            Err(Refused::WrongIdentity { .. })
        ));
    }
}

#[test]
fn renewal_is_never_due_at_once() {
    use crate::identity::renewal_delay;
    let ca = Ca::new("root");
    let (chain, key) = ca.svid(&[CLIENT], -3600, 3600);
    let held = Held::new(chain, key, &super::provider()).unwrap();
    let now = std::time::SystemTime::now();
    // 70% of the hour left.
    let delay = renewal_delay(&held, now);
    assert!(
        delay > Duration::from_secs(2400) && delay < Duration::from_secs(2600),
        "{delay:?}"
    );
    // Expired, or about to: a second, not zero (the loop would spin).
    for later in [3599, 3600, 7200, 86400 * 365] {
        let delay = renewal_delay(&held, now + Duration::from_secs(later));
        assert!(delay >= Duration::from_secs(1), "{later}: {delay:?}");
    }
}

#[tokio::test]
async fn a_service_account_with_dots_is_reachable_over_mesh_tls() {
    // Legal in Kubernetes (a DNS subdomain), and issued by the control plane.
    const DOTTED: &str = "spiffe://cluster.local/ns/shop/sa/payments.v2";
    let ca = Ca::new("root");
    let seen = handshake(
        &ca,
        ca.svid(&[CLIENT], -60, 3600),
        ca.svid(&[DOTTED], -60, 3600),
        &ca.pem,
        DOTTED,
    )
    .await
    .unwrap();
    assert_eq!(seen.as_str(), CLIENT);
    // And the inbound side recognises the dotted name as its own.
    let sni = SpiffeId::parse(DOTTED).unwrap().to_sni().unwrap();
    assert_eq!(sni, "payments.v2.shop.sa.pillion.cluster.local");
}
