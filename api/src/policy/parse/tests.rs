//! Policy YAML: the documented example, defaults, and errors that point at the line.

use std::time::Duration;

use super::*;
use crate::policy::model::{
    Authorization, FailureAccrual, LoadBalancer, PathMatch, ProtocolHint, RetryCode, StringMatch,
};

const EXAMPLE: &str = r#"
destinations:
  - destination: web.default.svc.cluster.local:80
    endpoints: [{ address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/default/sa/web, protocol: http2, weight: 1 }]
    retryBudget: { percent: 20, minRetriesPerSecond: 10, ttl: 10s }
    loadBalancer:
      failureAccrual: { consecutiveFailures: 5, minBackoff: 500ms, maxBackoff: 30s }
      queueTimeout: 3s
    routes:
      - name: web-api
        matches:
          - path: { type: PathPrefix, value: /api }
            method: GET
            headers: [{ name: x-env, value: canary, type: Exact }]
            queryParams: [{ name: debug, value: "1" }]
        timeouts: { request: 10s, backendRequest: 2s }
        retry: { codes: [502, 503, UNAVAILABLE], attempts: 3, backoff: 25ms }
        backendRefs: [{ address: 10.0.0.7:8080, weight: 90 }]
inbound:
  - port: 8080
    authorization: all-authenticated
  - port: 9090
    authorization: { allow: [spiffe://cluster.local/ns/default/sa/client, "spiffe://cluster.local/ns/prod/*"] }
"#;

fn err(text: &str) -> PolicyError {
    parse(text, "policy.yaml").unwrap_err()
}

#[test]
fn documented_example_parses() {
    let policy = parse(EXAMPLE, "policy.yaml").unwrap();
    let d = &policy.destinations[&"web.default.svc.cluster.local:80".parse().unwrap()];
    assert_eq!(d.endpoints[0].address, "10.0.0.7:8080".parse().unwrap());
    assert_eq!(d.endpoints[0].protocol, ProtocolHint::Http2);
    assert_eq!(
        d.endpoints[0].identity.as_ref().unwrap().as_str(),
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(d.retry_budget.ttl, Duration::from_secs(10));
    assert_eq!(
        d.load_balancer,
        LoadBalancer {
            failure_accrual: FailureAccrual {
                consecutive_failures: 5,
                min_backoff: Duration::from_millis(500),
                max_backoff: Duration::from_secs(30),
            },
            queue_timeout: Duration::from_secs(3),
        }
    );

    let route = &d.routes[0];
    assert_eq!(route.name.0, "web-api");
    let m = &route.matches[0];
    assert_eq!(m.path, Some(PathMatch::Prefix("/api".into())));
    assert_eq!(m.method.as_ref().unwrap().0, "GET");
    assert_eq!(m.headers[0].name, "x-env");
    assert_eq!(m.headers[0].value, StringMatch::Exact("canary".into()));
    assert_eq!(m.query_params[0].value, StringMatch::Exact("1".into()));
    let t = route.timeouts.as_ref().unwrap();
    assert_eq!(
        (t.request, t.backend_request),
        (Some(Duration::from_secs(10)), Some(Duration::from_secs(2)))
    );
    let r = route.retry.as_ref().unwrap();
    assert_eq!(
        r.codes,
        vec![RetryCode::Http(502), RetryCode::Http(503), RetryCode::Grpc(14)]
    );
    assert_eq!((r.attempts, r.backoff), (3, Duration::from_millis(25)));
    assert_eq!(route.backend_refs[0].weight, 90);

    assert_eq!(policy.inbound[&8080], Authorization::AllAuthenticated);
    let Authorization::Allow { identities, prefixes } = &policy.inbound[&9090] else {
        panic!("allow list expected");
    };
    assert_eq!(identities[0].as_str(), "spiffe://cluster.local/ns/default/sa/client");
    assert_eq!(prefixes, &["spiffe://cluster.local/ns/prod/".to_string()]);
}

#[test]
fn defaults_follow_the_contract() {
    let policy = parse(
        "destinations:\n  - destination: Web.Default.:80\n    endpoints: [{address: 10.0.0.1:80}]\n    routes: [{name: all, timeouts: {request: 0s}, retry: {}}]\n",
        "p",
    )
    .unwrap();
    // Host names are case-insensitive and the trailing dot is dropped.
    let d = &policy.destinations[&"web.default:80".parse().unwrap()];
    assert_eq!(
        (d.retry_budget.percent, d.retry_budget.min_retries_per_second),
        (20, 10)
    );
    assert_eq!(d.retry_budget.ttl, Duration::from_secs(10));
    assert_eq!(d.endpoints[0].weight, 1);
    assert_eq!(d.endpoints[0].protocol, ProtocolHint::Unknown);
    assert!(d.endpoints[0].identity.is_none());
    let route = &d.routes[0];
    assert!(route.matches.is_empty());
    assert_eq!(
        route.timeouts.as_ref().unwrap().request,
        Some(Duration::ZERO),
        "0s = disabled"
    );
    assert_eq!(route.retry.as_ref().unwrap().attempts, 1);
    assert!(parse("", "p").unwrap().destinations.is_empty());
}

#[test]
fn load_balancing_defaults_are_linkerds() {
    let defaults = LoadBalancer::default();
    assert_eq!(defaults.failure_accrual.consecutive_failures, 7);
    assert_eq!(defaults.failure_accrual.min_backoff, Duration::from_secs(1));
    assert_eq!(defaults.failure_accrual.max_backoff, Duration::from_secs(60));
    assert_eq!(defaults.queue_timeout, Duration::from_secs(3));
    // Absent, empty, and partly written blocks all fill in the same defaults.
    for block in [
        "",
        "\n    loadBalancer: {}",
        "\n    loadBalancer: { failureAccrual: {} }",
    ] {
        let policy = parse(&format!("destinations:\n  - destination: web:80{block}\n"), "p").unwrap();
        assert_eq!(
            policy.destinations[&"web:80".parse().unwrap()].load_balancer,
            defaults,
            "{block:?}"
        );
    }
    let policy = parse(
        "destinations:\n  - destination: web:80\n    loadBalancer: { failureAccrual: { maxBackoff: 5m } }\n",
        "p",
    )
    .unwrap();
    let lb = &policy.destinations[&"web:80".parse().unwrap()].load_balancer;
    assert_eq!(lb.failure_accrual.max_backoff, Duration::from_secs(300));
    assert_eq!(
        (
            lb.failure_accrual.consecutive_failures,
            lb.failure_accrual.min_backoff,
            lb.queue_timeout
        ),
        (7, Duration::from_secs(1), Duration::from_secs(3)),
        "the fields not written keep their defaults"
    );
}

#[test]
fn errors_carry_file_line_and_reason() {
    let cases = [
        // (yaml, line, fragment of the message)
        (
            "destinations:\n  - destination: web:80\n    endpoints: [{address: 10.0.0.300:80}]\n",
            3,
            "socket address",
        ),
        ("destinations:\n  - destination: web\n", 2, "host:port"),
        (
            "destinations:\n  - destination: web:80\n    endpoints: [{address: 10.0.0.1:80, identity: web}]\n",
            3,
            "SPIFFE",
        ),
        (
            "destinations:\n  - destination: web:80\n    routes:\n      - name: r\n        retry: {codes: [200]}\n",
            5,
            "400-599",
        ),
        (
            "destinations:\n  - destination: web:80\n    routes:\n      - name: r\n        retry: {codes: [NOPE]}\n",
            5,
            "gRPC",
        ),
        (
            "destinations:\n  - destination: web:80\n    routes:\n      - name: r\n        timeouts: {request: 10 parsecs}\n",
            5,
            "duration",
        ),
        (
            "destinations:\n  - destination: web:80\n    routes:\n      - name: r\n        matches: [{path: {type: RegularExpression, value: '(' }}]\n",
            5,
            "regular expression",
        ),
        (
            "destinations:\n  - destination: web:80\n    routes:\n      - name: r\n        matches: [{path: {type: Prefix, value: /a}}]\n",
            5,
            "unknown variant",
        ),
        (
            "destinations:\n  - destination: web:80\n    retryBudget: {ttl: 2m}\n",
            3,
            "between 1s and 60s",
        ),
        (
            "destinations:\n  - destination: web:80\n    loadBalancer: {failureAccrual: {consecutiveFailures: 1001}}\n",
            3,
            "loadBalancer.failureAccrual.consecutiveFailures 1001 is above 1000",
        ),
        (
            "destinations:\n  - destination: web:80\n    loadBalancer:\n      failureAccrual: {minBackoff: 5s, maxBackoff: 2s}\n",
            4,
            "maxBackoff (2s) is shorter than minBackoff (5s)",
        ),
        (
            "destinations:\n  - destination: web:80\n    loadBalancer:\n      queueTimeout: 0s\n",
            4,
            "loadBalancer.queueTimeout",
        ),
        (
            "destinations:\n  - destination: web:80\n    endpionts: []\n",
            3,
            "unknown field",
        ),
        (
            "inbound:\n  - port: 80\n    authorization: all-authenticatd\n",
            3,
            "all-authenticated",
        ),
        (
            "inbound:\n  - port: 80\n    authorization: {allow: [\"spiffe://td/ns/*/sa/x\"]}\n",
            3,
            "SPIFFE",
        ),
        ("destinations: [\n", 2, ""),
    ];
    for (yaml, line, fragment) in cases {
        match err(yaml) {
            PolicyError::Syntax {
                origin,
                line: l,
                message,
                ..
            } => {
                assert_eq!(origin, "policy.yaml");
                assert_eq!(l, line, "wrong line for {yaml:?}: {message}");
                assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
            }
            other => panic!("expected a located error for {yaml:?}, got {other}"),
        }
    }
}

#[test]
fn duplicates_are_refused() {
    let dup = "destinations:\n  - destination: web:80\n  - destination: WEB:80\n";
    assert!(err(dup).to_string().contains("listed twice"));
    let dup_port = "inbound:\n  - {port: 80, authorization: deny}\n  - {port: 80, authorization: deny}\n";
    assert!(err(dup_port).to_string().contains("port 80"));
    let dup_route = "destinations:\n  - destination: web:80\n    routes: [{name: a}, {name: a}]\n";
    assert!(err(dup_route).to_string().contains("used twice"));
}

#[test]
fn display_is_one_line_with_position() {
    let e = err("destinations:\n  - destination: web:80\n    endpoints: [{address: nope}]\n");
    let text = e.to_string();
    assert!(text.starts_with("policy.yaml:3:"), "{text}");
    assert!(!text.contains('\n'), "{text}");
}
