//! TokenReview against a fake Kubernetes API server: hyper over rustls on loopback, with a serving
//! certificate from a throwaway CA, answering the way the real API server does.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use pillion_control::{
    auth::{AuthError, Authenticator, CachedAuthenticator, TokenReview, TokenReviewConfig, WorkloadId, cache},
    policy::{Policy, PolicyWatch},
    proto::{CertifyRequest, identity_client::IdentityClient},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const CONTROL_PLANE_TOKEN: &str = "control-plane-sa-token";
/// The token of the cache test, and how many reviews of it the fake API server answered.
const CACHED_TOKEN: &str = "good-cached";
static CACHED_TOKEN_REVIEWS: AtomicUsize = AtomicUsize::new(0);

struct FakeApiServer {
    addr: SocketAddr,
    ca_pem: String,
}

/// Answers TokenReviews: `good-*` tokens belong to default/web (audience `pillion`), `user-token`
/// to a human user, anything else is unauthenticated. Our own bearer token must be presented.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Value| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap())
    };
    if req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews" || req.method() != http::Method::POST {
        return reply(StatusCode::NOT_FOUND, json!({"kind": "Status", "code": 404}));
    }
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {CONTROL_PLANE_TOKEN}")) {
        return reply(StatusCode::UNAUTHORIZED, json!({"kind": "Status", "code": 401}));
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["kind"], "TokenReview");
    assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    if token == CACHED_TOKEN {
        CACHED_TOKEN_REVIEWS.fetch_add(1, Ordering::SeqCst);
    }
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    let token_audiences = vec!["pillion".to_string()];
    let status =
        if token.starts_with("good-") && (wanted.is_empty() || wanted.iter().any(|a| token_audiences.contains(a))) {
            json!({"authenticated": true, "audiences": token_audiences,
               "user": {"username": "system:serviceaccount:default:web", "uid": "1234"}})
        } else if token == "user-token" {
            json!({"authenticated": true, "user": {"username": "alice"}})
        } else {
            json!({"authenticated": false, "error": "invalid bearer token"})
        };
    reply(
        StatusCode::CREATED,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}),
    )
}

async fn fake_api_server() -> FakeApiServer {
    let (addr, ca_pem) = support::serve_https(service_fn(handle)).await;
    FakeApiServer { addr, ca_pem }
}

fn review(server: &FakeApiServer, dir: &support::TempDir, audiences: &[&str], ca_pem: &str) -> TokenReview {
    std::fs::write(dir.path("ca.crt"), ca_pem).unwrap();
    std::fs::write(dir.path("token"), format!("{CONTROL_PLANE_TOKEN}\n")).unwrap();
    TokenReview::new(TokenReviewConfig {
        api_server: format!("https://{}", server.addr).parse().unwrap(),
        ca_file: dir.path("ca.crt"),
        token_file: dir.path("token"),
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

#[tokio::test]
async fn service_account_tokens_authenticate() {
    let server = fake_api_server().await;
    let dir = support::TempDir::new("token-review");
    let auth = review(&server, &dir, &["pillion"], &server.ca_pem);
    let id = auth.authenticate("good-abc").await.unwrap();
    assert_eq!(id, WorkloadId::new("default", "web").unwrap());
}

#[tokio::test]
async fn rejected_tokens_users_and_audiences() {
    let server = fake_api_server().await;
    let dir = support::TempDir::new("token-review");
    let auth = review(&server, &dir, &[], &server.ca_pem);
    assert!(matches!(auth.authenticate("forged").await, Err(AuthError::Rejected(_))));
    let err = auth.authenticate("user-token").await.unwrap_err();
    assert!(
        matches!(&err, AuthError::Rejected(m) if m.contains("not a service account")),
        "{err}"
    );

    let wrong_audience = review(&server, &dir, &["vault"], &server.ca_pem);
    assert!(matches!(
        wrong_audience.authenticate("good-abc").await,
        Err(AuthError::Rejected(_))
    ));
}

#[tokio::test]
async fn api_server_trouble_is_unavailable_not_rejected() {
    let server = fake_api_server().await;
    let dir = support::TempDir::new("token-review");

    // Our own credentials are wrong: the API server answers 401.
    let auth = review(&server, &dir, &[], &server.ca_pem);
    std::fs::write(dir.path("token"), "stale-token").unwrap();
    assert!(matches!(
        auth.authenticate("good-abc").await,
        Err(AuthError::Unavailable(_))
    ));

    // The API server's certificate is not signed by the configured CA.
    let other = fake_api_server().await;
    let untrusting = review(&server, &dir, &[], &other.ca_pem);
    let err = untrusting.authenticate("good-abc").await.unwrap_err();
    assert!(
        matches!(&err, AuthError::Unavailable(m) if m.contains("certificate")),
        "{err}"
    );
}

#[tokio::test]
async fn certify_through_token_review() {
    let server = fake_api_server().await;
    let dir = support::TempDir::new("token-review");
    let auth = review(&server, &dir, &["pillion"], &server.ca_pem);
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let running = support::start(ca, auth, PolicyWatch::fixed(Policy::default()), shutdown.clone()).await;
    let mut client = IdentityClient::new(support::channel(&running, None).await);

    let ok = client
        .certify(CertifyRequest {
            token: "good-abc".into(),
            csr_der: support::csr(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");

    let refused = client
        .certify(CertifyRequest {
            token: "forged".into(),
            csr_der: support::csr(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    shutdown.cancel();
}

#[tokio::test]
async fn the_same_good_token_twice_is_reviewed_once() {
    let server = fake_api_server().await;
    let dir = support::TempDir::new("token-review");
    // As `pillion-control serve` wires it: TokenReview behind the cache of successes.
    let auth = CachedAuthenticator::new(
        review(&server, &dir, &["pillion"], &server.ca_pem),
        cache::DEFAULT_TTL,
        cache::DEFAULT_MAX_ENTRIES,
    );
    let (ca, _) = support::test_ca();
    let shutdown = CancellationToken::new();
    let running = support::start(ca, auth, PolicyWatch::fixed(Policy::default()), shutdown.clone()).await;
    let mut client = IdentityClient::new(support::channel(&running, None).await);
    for _ in 0..2 {
        let ok = client
            .certify(CertifyRequest {
                token: CACHED_TOKEN.into(),
                csr_der: support::csr(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
    }
    assert_eq!(CACHED_TOKEN_REVIEWS.load(Ordering::SeqCst), 1);

    // Failures are not cached: each bogus token goes to the API server again.
    for _ in 0..2 {
        let refused = client
            .certify(CertifyRequest {
                token: "forged".into(),
                csr_der: support::csr(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    shutdown.cancel();
}
