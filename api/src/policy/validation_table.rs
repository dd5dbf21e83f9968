//! The policy model's validation rules, one row each: what is accepted and what is refused, and
//! that a policy that arrives over the wire obeys exactly the same rules as the file. Both the
//! proxy's route file and the control plane's policy are read by this code, so this table is the
//! whole of what either side accepts.

use super::{convert, parse};

/// A destination with one route whose body is `route` (YAML flow mapping entries).
fn with_route(route: &str) -> String {
    format!("destinations:\n  - destination: web.shop.svc.cluster.local:80\n    routes: [{{ name: r, {route} }}]\n")
}

fn with_destination(destination: &str) -> String {
    format!("destinations:\n  - {destination}\n")
}

/// (rule, YAML, accepted)
fn table() -> Vec<(&'static str, String, bool)> {
    vec![
        // Destinations.
        ("host:port", with_destination("destination: web.shop.svc:8080"), true),
        ("ip:port", with_destination("destination: 10.0.0.1:8080"), true),
        ("[v6]:port", with_destination("destination: \"[fd00::1]:8080\""), true),
        (
            "trailing dot and upper case are normalised",
            with_destination("destination: Web.Shop.:80"),
            true,
        ),
        ("a port is required", with_destination("destination: web.shop"), false),
        (
            "port 0 is no destination",
            with_destination("destination: web:0"),
            false,
        ),
        (
            "port 0 is no destination (ip)",
            with_destination("destination: 10.0.0.1:0"),
            false,
        ),
        (
            "a host name's labels are DNS labels",
            with_destination("destination: -web:80"),
            false,
        ),
        (
            "a host name is not empty",
            with_destination("destination: \":80\""),
            false,
        ),
        // Endpoints.
        (
            "an endpoint is ip:port",
            with_destination("destination: web:80\n    endpoints: [{ address: 10.0.0.1:80 }]"),
            true,
        ),
        (
            "an endpoint is not a name",
            with_destination("destination: web:80\n    endpoints: [{ address: web:80 }]"),
            false,
        ),
        (
            "an endpoint identity is a SPIFFE ID",
            with_destination("destination: web:80\n    endpoints: [{ address: 10.0.0.1:80, identity: web }]"),
            false,
        ),
        (
            "a service account may hold dots",
            with_destination(
                "destination: web:80\n    endpoints: [{ address: 10.0.0.1:80, identity: spiffe://cluster.local/ns/shop/sa/api.v2 }]",
            ),
            true,
        ),
        (
            "protocol hints are named",
            with_destination("destination: web:80\n    endpoints: [{ address: 10.0.0.1:80, protocol: gopher }]"),
            false,
        ),
        // Routes.
        ("a route name is a metric label", with_route(""), true),
        (
            "route names take / . - _",
            with_route("matches: []").replace("name: r", "name: shop/web-api_v1.2"),
            true,
        ),
        (
            "route names take no space",
            with_route("").replace("name: r", "name: \"a b\""),
            false,
        ),
        (
            "route names are at most 128 characters",
            with_route("").replace("name: r", &format!("name: {}", "a".repeat(129))),
            false,
        ),
        (
            "route names are unique per destination",
            "destinations:\n  - destination: web:80\n    routes: [{ name: r }, { name: r }]\n".into(),
            false,
        ),
        (
            "path prefix",
            with_route("matches: [{ path: { type: PathPrefix, value: /api } }]"),
            true,
        ),
        (
            "path type defaults to PathPrefix",
            with_route("matches: [{ path: { value: /api } }]"),
            true,
        ),
        (
            "path value defaults to /",
            with_route("matches: [{ path: { type: Exact } }]"),
            true,
        ),
        (
            "a path starts with /",
            with_route("matches: [{ path: { type: Exact, value: api } }]"),
            false,
        ),
        (
            "a path regex need not",
            with_route("matches: [{ path: { type: RegularExpression, value: \".*api\" } }]"),
            true,
        ),
        (
            "a regex compiles",
            with_route("matches: [{ path: { type: RegularExpression, value: \"(\" } }]"),
            false,
        ),
        (
            "unknown path types are refused",
            with_route("matches: [{ path: { type: Glob, value: /a } }]"),
            false,
        ),
        ("methods in any case", with_route("matches: [{ method: get }]"), true),
        (
            "a method is a token",
            with_route("matches: [{ method: \"G T\" }]"),
            false,
        ),
        (
            "a header name is a header name",
            with_route("matches: [{ headers: [{ name: \"x y\", value: a }] }]"),
            false,
        ),
        (
            "a header regex compiles",
            with_route("matches: [{ headers: [{ name: x, value: \"(\", type: RegularExpression }] }]"),
            false,
        ),
        (
            "a query parameter has a name",
            with_route("matches: [{ queryParams: [{ name: \"\", value: a }] }]"),
            false,
        ),
        // Timeouts.
        (
            "timeouts are durations",
            with_route("timeouts: { request: 10s, backendRequest: 2s }"),
            true,
        ),
        (
            "0s disables a timeout",
            with_route("timeouts: { request: 0s, backendRequest: 2s }"),
            true,
        ),
        (
            "an attempt is not longer than the request",
            with_route("timeouts: { request: 1s, backendRequest: 2s }"),
            false,
        ),
        (
            "a duration has a unit",
            with_route("timeouts: { request: \"10\" }"),
            false,
        ),
        // Retries.
        (
            "retry codes: HTTP errors and gRPC names",
            with_route("retry: { codes: [503, UNAVAILABLE, unavailable] }"),
            true,
        ),
        ("retry codes are 400-599", with_route("retry: { codes: [399] }"), false),
        (
            "retry codes are at most 599",
            with_route("retry: { codes: [600] }"),
            false,
        ),
        ("gRPC OK is never retried", with_route("retry: { codes: [OK] }"), false),
        (
            "unknown gRPC names are refused",
            with_route("retry: { codes: [UNAVAILBLE] }"),
            false,
        ),
        (
            "retry backoff is a duration",
            with_route("retry: { backoff: soon }"),
            false,
        ),
        // Budgets.
        (
            "budget percent up to 1000",
            with_destination("destination: web:80\n    retryBudget: { percent: 1000 }"),
            true,
        ),
        (
            "budget percent above 1000 is refused",
            with_destination("destination: web:80\n    retryBudget: { percent: 1001 }"),
            false,
        ),
        (
            "budget ttl is 1s to 60s",
            with_destination("destination: web:80\n    retryBudget: { ttl: 61s }"),
            false,
        ),
        // Load balancing.
        (
            "load balancing may be empty (defaults)",
            with_destination("destination: web:80\n    loadBalancer: {}"),
            true,
        ),
        (
            "load balancing settings",
            with_destination(
                "destination: web:80\n    loadBalancer: { failureAccrual: { consecutiveFailures: 3, minBackoff: 500ms, maxBackoff: 30s }, queueTimeout: 3s }",
            ),
            true,
        ),
        (
            "consecutiveFailures 0 turns accrual off",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { consecutiveFailures: 0 } }"),
            true,
        ),
        (
            "consecutiveFailures up to 1000",
            with_destination(
                "destination: web:80\n    loadBalancer: { failureAccrual: { consecutiveFailures: 1000 } }",
            ),
            true,
        ),
        (
            "consecutiveFailures above 1000 is refused",
            with_destination(
                "destination: web:80\n    loadBalancer: { failureAccrual: { consecutiveFailures: 1001 } }",
            ),
            false,
        ),
        (
            "consecutiveFailures is not negative",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { consecutiveFailures: -1 } }"),
            false,
        ),
        (
            "minBackoff is longer than 0s",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { minBackoff: 0s } }"),
            false,
        ),
        (
            "maxBackoff may equal minBackoff",
            with_destination(
                "destination: web:80\n    loadBalancer: { failureAccrual: { minBackoff: 5s, maxBackoff: 5s } }",
            ),
            true,
        ),
        (
            "maxBackoff is not shorter than minBackoff",
            with_destination(
                "destination: web:80\n    loadBalancer: { failureAccrual: { minBackoff: 5s, maxBackoff: 2s } }",
            ),
            false,
        ),
        (
            "maxBackoff's default (60s) bounds minBackoff too",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { minBackoff: 2m } }"),
            false,
        ),
        (
            "maxBackoff up to 1h",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { maxBackoff: 1h } }"),
            true,
        ),
        (
            "maxBackoff above 1h is refused",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { maxBackoff: 61m } }"),
            false,
        ),
        (
            "backoffs are durations",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { minBackoff: \"1\" } }"),
            false,
        ),
        (
            "queueTimeout up to 60s",
            with_destination("destination: web:80\n    loadBalancer: { queueTimeout: 60s }"),
            true,
        ),
        (
            "queueTimeout above 60s is refused",
            with_destination("destination: web:80\n    loadBalancer: { queueTimeout: 61s }"),
            false,
        ),
        (
            "queueTimeout is longer than 0s",
            with_destination("destination: web:80\n    loadBalancer: { queueTimeout: 0s }"),
            false,
        ),
        (
            "unknown load-balancing fields are refused",
            with_destination("destination: web:80\n    loadBalancer: { algorithm: p2c }"),
            false,
        ),
        (
            "unknown failure-accrual fields are refused",
            with_destination("destination: web:80\n    loadBalancer: { failureAccrual: { consecutiveFailure: 3 } }"),
            false,
        ),
        // Backends.
        (
            "backendRefs by ip:port with weights",
            with_route("backendRefs: [{ address: 10.0.0.1:80, weight: 9 }]"),
            true,
        ),
        (
            "backendRefs are addresses, not names",
            with_route("backendRefs: [{ address: web-v2.shop.svc.cluster.local:80 }]"),
            false,
        ),
        (
            "backendRefs need a port",
            with_route("backendRefs: [{ address: 10.0.0.1 }]"),
            false,
        ),
        (
            "backendRefs have no port 0",
            with_route("backendRefs: [{ address: 10.0.0.1:0 }]"),
            false,
        ),
        // Authorization.
        (
            "named authorization",
            "inbound: [{ port: 8080, authorization: all-authenticated }]".into(),
            true,
        ),
        (
            "unknown authorization names are refused",
            "inbound: [{ port: 8080, authorization: open }]".into(),
            false,
        ),
        (
            "allow-lists hold IDs and /* prefixes",
            "inbound: [{ port: 8080, authorization: { allow: [spiffe://td/ns/a/sa/b, \"spiffe://td/ns/p/*\"] } }]"
                .into(),
            true,
        ),
        (
            "a wildcard follows a /",
            "inbound: [{ port: 8080, authorization: { allow: [\"spiffe://td/ns*\"] } }]".into(),
            false,
        ),
        (
            "inbound ports are unique",
            "inbound: [{ port: 1, authorization: deny }, { port: 1, authorization: deny }]".into(),
            false,
        ),
        ("unknown fields are refused", "destinatons: []".into(), false),
        (
            "per-pod authorization comes only from a Kubernetes control plane",
            "workloads: []".into(),
            false,
        ),
        ("the proxy's retry buffer", "retryBufferBytes: 1024".into(), true),
    ]
}

#[test]
fn every_rule_accepts_and_refuses_as_documented() {
    let mut wrong = Vec::new();
    for (rule, yaml, accepted) in table() {
        let result = parse(&yaml, "policy.yaml");
        if result.is_ok() != accepted {
            wrong.push(format!(
                "{rule}: expected {}, got {result:?}\n{yaml}",
                if accepted { "accepted" } else { "refused" }
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// What the control plane sends is what the proxy reads back: every accepted destination of the
/// table survives model → protocol → model unchanged, under the same validation.
#[test]
fn every_accepted_destination_survives_the_wire() {
    for (rule, yaml, accepted) in table() {
        if !accepted {
            continue;
        }
        let policy = parse(&yaml, "policy.yaml").unwrap();
        for (key, destination) in &policy.destinations {
            let update = convert::destination_update(&policy, key);
            let back = convert::destination_from_update(&update)
                .unwrap_or_else(|e| panic!("{rule}: {e}"))
                .unwrap_or_else(|| panic!("{rule}: known"));
            assert_eq!(&back, destination, "{rule}");
        }
        assert!(policy.workloads.is_empty(), "{rule}: a file names no workloads");
        for (port, authorization) in &policy.inbound {
            let sent = convert::authorization(authorization);
            let back = convert::authorization_from_proto(&sent).unwrap();
            assert_eq!(back.as_ref(), Some(authorization), "{rule}: port {port}");
        }
    }
}
