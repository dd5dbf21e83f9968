//! Discovery `Watch` over real gRPC and mutual TLS (a workload certificate for default/web):
//! initial state, a pushed update after the policy file is rewritten, an invalid rewrite that
//! keeps the old state, unknown destinations, and shutdown.

mod support;

use std::time::Duration;

use pillion_control::{
    auth::TokenFile,
    policy::PolicyWatch,
    proto::{DestinationUpdate, ProtocolHint, WatchRequest, discovery_client::DiscoveryClient},
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Streaming};

const POLICY_V1: &str = "
destinations:
  - destination: web.default.svc.cluster.local:80
    endpoints: [{ address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/default/sa/web, protocol: http2 }]
    routes:
      - name: web-api
        matches: [{ path: { type: PathPrefix, value: /api } }]
        retry: { codes: [503, UNAVAILABLE], attempts: 2 }
inbound:
  - port: 8080
    authorization: { allow: [\"spiffe://cluster.local/ns/prod/*\"] }
";

const POLICY_V2: &str = "
destinations:
  - destination: web.default.svc.cluster.local:80
    endpoints:
      - { address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/default/sa/web, protocol: http2 }
      - { address: 10.0.0.8:8080, identity: spiffe://cluster.local/ns/default/sa/web, protocol: http2 }
";

struct Setup {
    client: DiscoveryClient<tonic::transport::Channel>,
    policy: PolicyWatch,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), pillion_control::server::ServeError>>,
    dir: support::TempDir,
}

async fn setup() -> Setup {
    let dir = support::TempDir::new("watch");
    std::fs::write(dir.path("policy.yaml"), POLICY_V1).unwrap();
    let shutdown = CancellationToken::new();
    let policy =
        PolicyWatch::load_and_watch(dir.path("policy.yaml"), Duration::from_millis(50), shutdown.clone()).unwrap();
    let (ca, _) = support::test_ca();
    let web = support::workload_cert(&ca, "default", "web");
    let tokens = TokenFile::parse("[]").unwrap();
    let running = support::start(ca, tokens, policy.clone(), shutdown.clone()).await;
    let client = DiscoveryClient::new(support::channel(&running, Some(&web)).await);
    Setup {
        client,
        policy,
        shutdown,
        server: running.server,
        dir,
    }
}

async fn open(
    client: &mut DiscoveryClient<tonic::transport::Channel>,
    destination: &str,
) -> Streaming<DestinationUpdate> {
    client
        .watch(WatchRequest {
            destination: destination.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<DestinationUpdate>, within: Duration) -> Option<DestinationUpdate> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(message) => message.unwrap(),
        Err(_) => None,
    }
}

#[tokio::test]
async fn initial_state_then_pushed_updates() {
    let mut s = setup().await;
    let mut stream = open(&mut s.client, "WEB.default.svc.cluster.local:80").await;

    let first = next(&mut stream, Duration::from_secs(5)).await.expect("initial state");
    assert!(first.known);
    assert_eq!(first.destination, "web.default.svc.cluster.local:80");
    assert_eq!(first.endpoints.len(), 1);
    assert_eq!(first.endpoints[0].address, "10.0.0.7:8080");
    assert_eq!(first.endpoints[0].identity, "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(first.endpoints[0].protocol(), ProtocolHint::Http2);
    assert_eq!(first.routes[0].name, "web-api");
    let retry = first.routes[0].retry.as_ref().unwrap();
    assert_eq!(
        (retry.http_statuses.clone(), retry.grpc_codes.clone(), retry.attempts),
        (vec![503], vec![14], 2)
    );
    let budget = first.retry_budget.as_ref().unwrap();
    assert_eq!((budget.percent, budget.min_retries_per_second), (20, 10));

    // Rewrite: the stream gets the new complete state.
    std::fs::write(s.dir.path("policy.yaml"), POLICY_V2).unwrap();
    let second = next(&mut stream, Duration::from_secs(5)).await.expect("pushed update");
    assert_eq!(second.endpoints.len(), 2);
    assert!(second.routes.is_empty());

    // An invalid rewrite is refused: no update, and the policy in force is still V2.
    std::fs::write(
        s.dir.path("policy.yaml"),
        "destinations:\n  - destination: web:80\n    endpoints: [{address: nope}]\n",
    )
    .unwrap();
    assert!(next(&mut stream, Duration::from_millis(500)).await.is_none());
    assert_eq!(
        s.policy.current().destinations.values().next().unwrap().endpoints.len(),
        2
    );

    // A valid file afterwards is picked up again.
    std::fs::write(s.dir.path("policy.yaml"), POLICY_V1).unwrap();
    let third = next(&mut stream, Duration::from_secs(5))
        .await
        .expect("update after recovery");
    assert_eq!(third.endpoints.len(), 1);

    s.shutdown.cancel();
    // Shutdown ends open streams, so the server finishes instead of waiting for watchers.
    assert!(next(&mut stream, Duration::from_secs(5)).await.is_none());
    tokio::time::timeout(Duration::from_secs(5), s.server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn unknown_destination_has_no_endpoints() {
    let mut s = setup().await;
    let mut stream = open(&mut s.client, "10.1.2.3:8080").await;
    let update = next(&mut stream, Duration::from_secs(5)).await.expect("initial state");
    assert!(!update.known);
    assert!(update.endpoints.is_empty() && update.routes.is_empty());
    // Port 8080 has an inbound policy, but no endpoint of this destination is default/web, the
    // caller: it is not the caller's business (tests/control_tls.rs has the workload's own view).
    assert!(update.inbound_authorization.is_none());

    // A rewrite that does not touch this destination sends nothing.
    std::fs::write(s.dir.path("policy.yaml"), format!("{POLICY_V1}\n# comment\n")).unwrap();
    assert!(next(&mut stream, Duration::from_millis(400)).await.is_none());
    s.shutdown.cancel();
}

#[tokio::test]
async fn malformed_destination_is_invalid_argument() {
    let mut s = setup().await;
    let status = s
        .client
        .watch(WatchRequest {
            destination: "no-port".to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    s.shutdown.cancel();
}
