//! The control plane's own TLS, end to end on loopback with real sockets: its certificate and
//! identity as a proxy verifies them, client certificates (optional for Certify, required for
//! Watch, refused from another CA), who learns which inbound policy, renewal of the server's
//! certificate, the certify rate limit, and the `--plaintext` mode.

mod support;

use std::time::{Duration, Instant};

use pillion_control::{
    auth::TokenFile,
    ca::{CertificateAuthority, generate},
    policy::{self, PolicyWatch},
    proto::{
        CertifyRequest, DestinationUpdate, WatchRequest, authorization::Policy as AuthzPolicy,
        discovery_client::DiscoveryClient, identity_client::IdentityClient,
    },
    server::Limits,
    spiffe::TrustDomain,
};
use support::{CONTROL_ID, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

const TOKEN: &str = "web-token-0123456789abcdef";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

const POLICY: &str = "
destinations:
  - destination: 10.0.0.7:8080
    endpoints: [{ address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/default/sa/web }]
  - destination: 10.0.0.8:9090
    endpoints: [{ address: 10.0.0.8:9090, identity: spiffe://cluster.local/ns/default/sa/db }]
inbound:
  - port: 8080
    authorization: { allow: [spiffe://cluster.local/ns/default/sa/client] }
  - port: 9090
    authorization: deny
";

fn tokens() -> TokenFile {
    TokenFile::parse(&format!(
        "- {{token: {TOKEN}, namespace: default, serviceAccount: web}}"
    ))
    .unwrap()
}

fn fixed_policy() -> PolicyWatch {
    PolicyWatch::fixed(policy::parse(POLICY, "test").unwrap())
}

fn certify_request(token: &str) -> CertifyRequest {
    CertifyRequest {
        token: token.to_string(),
        csr_der: support::csr(),
    }
}

async fn first_update(client: &mut DiscoveryClient<Channel>, destination: &str) -> DestinationUpdate {
    let mut stream = client
        .watch(WatchRequest {
            destination: destination.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an update within 5s")
        .unwrap()
        .expect("the stream's first update")
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn certify_over_tls_to_the_configured_identity() {
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let id = "spiffe://cluster.local/ns/mesh/sa/control";
    let options = Options {
        identity: id.to_string(),
        ..Options::default()
    };
    let running = support::start_with(ca, tokens(), fixed_policy(), shutdown.clone(), options).await;

    // What a proxy sees: TLS 1.3, ALPN h2, a workload-profile certificate whose only URI SAN is
    // the configured identity, with the issuer sent along so it chains to the trust anchors.
    let config = support::client_config(&running.anchors, id, None);
    let tls = support::tls_connect(running.addr, config.clone()).await.unwrap();
    let (_, session) = tls.get_ref();
    assert_eq!(session.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    let chain = session.peer_certificates().unwrap().to_vec();
    assert_eq!(chain.len(), 2, "leaf and issuer");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_eq!(uri_sans(&leaf), vec![id.to_string()]);
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    assert!(leaf.key_usage().unwrap().unwrap().value.digital_signature());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    drop(tls);

    let mut client = IdentityClient::new(support::channel_with(running.addr, config).await.unwrap());
    let issued = client.certify(certify_request(TOKEN)).await.unwrap().into_inner();
    assert_eq!(issued.spiffe_id, WEB);

    // A proxy that expects another identity, or trusts other anchors, never gets to send a token.
    let wrong_id = support::client_config(&running.anchors, CONTROL_ID, None);
    let err = support::tls_connect(running.addr, wrong_id).await.unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
    let (other_ca, _) = support::test_ca();
    let wrong_anchors = support::client_config(other_ca.trust_anchors(), id, None);
    assert!(support::tls_connect(running.addr, wrong_anchors).await.is_err());
    shutdown.cancel();
}

#[tokio::test]
async fn watch_without_a_client_certificate_is_unauthenticated() {
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let running = support::start(ca, tokens(), fixed_policy(), shutdown.clone()).await;
    let channel = support::channel(&running, None).await;
    let status = DiscoveryClient::new(channel.clone())
        .watch(WatchRequest {
            destination: "10.0.0.7:8080".to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // The same connection still certifies: that is how a proxy gets the certificate Watch needs.
    IdentityClient::new(channel)
        .certify(certify_request(TOKEN))
        .await
        .unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn a_workload_learns_its_own_inbound_policy_only() {
    let (ca, _) = support::test_ca();
    let web = support::workload_cert(&ca, "default", "web");
    let db = support::workload_cert(&ca, "default", "db");
    let shutdown = CancellationToken::new();
    let running = support::start(ca, tokens(), fixed_policy(), shutdown.clone()).await;

    let mut as_web = DiscoveryClient::new(support::channel(&running, Some(&web)).await);
    let own = first_update(&mut as_web, "10.0.0.7:8080").await;
    let Some(AuthzPolicy::Allow(allow)) = own.inbound_authorization.and_then(|a| a.policy) else {
        panic!("web's own port: its allow list")
    };
    assert_eq!(allow.identities, vec!["spiffe://cluster.local/ns/default/sa/client"]);

    // Web calling db: endpoints and identity, but not who may call db.
    let other = first_update(&mut as_web, "10.0.0.8:9090").await;
    assert!(other.known);
    assert_eq!(other.endpoints[0].identity, "spiffe://cluster.local/ns/default/sa/db");
    assert!(other.inbound_authorization.is_none());

    let mut as_db = DiscoveryClient::new(support::channel(&running, Some(&db)).await);
    let db_own = first_update(&mut as_db, "10.0.0.8:9090").await;
    let db_policy = db_own.inbound_authorization.and_then(|a| a.policy);
    assert!(matches!(db_policy, Some(AuthzPolicy::Deny(_))), "{db_policy:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_at_the_handshake() {
    let (ca, _) = support::test_ca();
    let (rogue_ca, _) = support::test_ca();
    let rogue = support::workload_cert(&rogue_ca, "default", "web");
    let shutdown = CancellationToken::new();
    let running = support::start(ca, tokens(), fixed_policy(), shutdown.clone()).await;

    // TLS 1.3: the client's side of the handshake ends before the server has judged its
    // certificate, so the refusal arrives as an alert on the first read.
    let config = support::client_config(&running.anchors, CONTROL_ID, Some(&rogue));
    let refused = match support::tls_connect(running.addr, config.clone()).await {
        Err(e) => e,
        Ok(mut tls) => {
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                Ok(Err(e)) => e,
                other => panic!("expected a TLS alert, got {other:?}"),
            }
        }
    };
    assert!(refused.to_string().contains("alert"), "{refused}");

    // Through gRPC, nothing works on such a connection either.
    if let Ok(channel) = support::channel_with(running.addr, config).await {
        let result = IdentityClient::new(channel).certify(certify_request(TOKEN)).await;
        assert!(result.is_err(), "{result:?}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn the_control_plane_certificate_is_renewed_without_a_restart() {
    // A 3 s lifetime (the library allows less than `--cert-lifetime`'s 10 s minimum): renewal
    // at 70% comes after 2.1 s.
    let td: TrustDomain = "cluster.local".parse().unwrap();
    let g = generate(&td).unwrap();
    let ca = CertificateAuthority::from_pem(
        &g.issuer_cert_pem,
        &g.issuer_key_pem,
        &g.root_cert_pem,
        td,
        Duration::from_secs(3),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = support::start(ca, tokens(), fixed_policy(), shutdown.clone()).await;
    let config = support::client_config(&running.anchors, CONTROL_ID, None);
    let leaf = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };

    let first_conn = support::tls_connect(running.addr, config.clone()).await.unwrap();
    let first = leaf(&first_conn);
    let first_not_after = running.identity.as_ref().unwrap().not_after();
    let deadline = Instant::now() + Duration::from_secs(10);
    let renewed = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Every handshake verifies (chain, validity, identity) with the certificate then served.
        let conn = support::tls_connect(running.addr, config.clone()).await.unwrap();
        let current = leaf(&conn);
        if current != first {
            break current;
        }
        assert!(Instant::now() < deadline, "certificate not renewed within 10s");
    };
    let (_, renewed) = X509Certificate::from_der(&renewed).unwrap();
    assert_eq!(uri_sans(&renewed), vec![CONTROL_ID.to_string()]);
    assert!(running.identity.as_ref().unwrap().not_after() > first_not_after);
    // The connection made with the first certificate is still usable by the server.
    drop(first_conn);
    shutdown.cancel();
}

#[tokio::test]
async fn certify_beyond_the_rate_limit_is_resource_exhausted() {
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let options = Options {
        limits: Limits {
            certify_per_second: 1,
            certify_burst: 2,
            ..Limits::default()
        },
        ..Options::default()
    };
    let running = support::start_with(ca, tokens(), fixed_policy(), shutdown.clone(), options).await;
    let mut client = IdentityClient::new(support::channel(&running, None).await);
    // Bogus requests spend the budget too: that is what keeps them from reaching the API server.
    for _ in 0..2 {
        let status = client
            .certify(certify_request("bogus-token-0123456789"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    let status = client.certify(certify_request(TOKEN)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn oversized_and_malformed_requests_get_a_status() {
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let running = support::start(ca, tokens(), fixed_policy(), shutdown.clone()).await;
    let channel = support::channel(&running, None).await;
    let mut client = IdentityClient::new(channel);
    let huge = CertifyRequest {
        token: TOKEN.to_string(),
        csr_der: vec![0x30; 256 * 1024],
    };
    let status = client.certify(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = client.certify(certify_request("")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // Still serving.
    client.certify(certify_request(TOKEN)).await.unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn plaintext_mode_serves_as_before_tls() {
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let options = Options {
        plaintext: true,
        ..Options::default()
    };
    let running = support::start_with(ca, tokens(), fixed_policy(), shutdown.clone(), options).await;
    let channel = support::plaintext_channel(&running).await;
    IdentityClient::new(channel.clone())
        .certify(certify_request(TOKEN))
        .await
        .unwrap();
    // No caller identity: Watch is open and every field is sent, as before TLS.
    let update = first_update(&mut DiscoveryClient::new(channel), "10.0.0.8:9090").await;
    assert!(update.inbound_authorization.is_some());
    shutdown.cancel();
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout_and_blocks_nobody() {
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let options = Options {
        limits: Limits {
            handshake_timeout: Duration::from_millis(500),
            ..Limits::default()
        },
        ..Options::default()
    };
    let running = support::start_with(ca, tokens(), fixed_policy(), shutdown.clone(), options).await;
    // Connects and never says a word.
    let mut silent = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    // Handshakes run in their own tasks: others are served meanwhile.
    IdentityClient::new(support::channel(&running, None).await)
        .certify(certify_request(TOKEN))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the silent connection must be closed: {closed:?}"
    );
    shutdown.cancel();
}
