//! Certify over real gRPC and server-authenticated TLS on loopback: the happy path and each
//! refusal with its status code.

mod support;

use pillion_control::{
    auth::TokenFile,
    policy::{Policy, PolicyWatch},
    proto::{CertifyRequest, identity_client::IdentityClient},
};
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

const TOKEN: &str = "web-token-0123456789abcdef";

async fn client() -> (IdentityClient<tonic::transport::Channel>, CancellationToken) {
    let (ca, _) = support::test_ca();
    let tokens = TokenFile::parse(&format!(
        "- {{token: {TOKEN}, namespace: default, serviceAccount: web}}"
    ))
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = support::start(ca, tokens, PolicyWatch::fixed(Policy::default()), shutdown.clone()).await;
    // No client certificate: a proxy asks for its first one over server-authenticated TLS.
    let client = IdentityClient::new(support::channel(&running, None).await);
    (client, shutdown)
}

fn request(token: &str, csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        token: token.to_string(),
        csr_der: csr,
    }
}

#[tokio::test]
async fn issues_an_svid_for_the_token_identity() {
    let (mut client, shutdown) = client().await;
    let response = client
        .certify(request(TOKEN, support::csr()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(response.chain_der.len(), 1);

    let (_, leaf) = X509Certificate::from_der(&response.leaf_der).unwrap();
    let uris: Vec<_> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["spiffe://cluster.local/ns/default/sa/web".to_string()]);
    assert_eq!(leaf.validity().not_after.timestamp(), response.valid_until);
    let (_, issuer) = X509Certificate::from_der(&response.chain_der[0]).unwrap();
    leaf.verify_signature(Some(issuer.public_key())).unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn unknown_or_missing_token_is_unauthenticated() {
    let (mut client, shutdown) = client().await;
    for token in ["not-a-known-token-at-all", ""] {
        let status = client.certify(request(token, support::csr())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn bad_csr_signature_is_invalid_argument() {
    let (mut client, shutdown) = client().await;
    let mut csr = support::csr();
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    let status = client.certify(request(TOKEN, csr)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client.certify(request(TOKEN, b"garbage".to_vec())).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn csr_for_a_ca_is_permission_denied() {
    let (mut client, shutdown) = client().await;
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut bc = CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    bc.set_criticality(true);
    params.custom_extensions.push(bc);
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let status = client.certify(request(TOKEN, csr)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    shutdown.cancel();
}
