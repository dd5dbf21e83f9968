use std::net::SocketAddr;

use prometheus_client::registry::Registry;

use super::*;

fn compile(yaml: &str) -> Result<Policy, String> {
    let metrics = HttpMetrics::register(&mut Registry::default());
    Policy::compile(parse(yaml, "routes.yaml").map_err(|e| e.to_string())?, &metrics)
}

fn compile_err(yaml: &str) -> String {
    match compile(yaml) {
        Ok(_) => panic!("accepted an invalid policy:\n{yaml}"),
        Err(e) => e,
    }
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

const DST: &str = "10.0.0.9:8080";

fn route_name(policy: &Policy, authority: Option<&str>, r: &http::Request<()>) -> String {
    let dst: SocketAddr = DST.parse().unwrap();
    policy.destination(authority, dst).route(r).name.to_string()
}

const ROUTES: &str = r#"
destinations:
  - destination: web.ns.svc:80
    routes:
      - name: prefix-api
        matches: [{ path: { type: PathPrefix, value: /api } }]
      - name: prefix-api-v1
        matches: [{ path: { type: PathPrefix, value: /api/v1/ } }]
      - name: exact-health
        matches: [{ path: { type: Exact, value: /api/health } }]
      - name: post-only
        matches: [{ path: { value: /api }, method: POST }]
      - name: canary
        matches: [{ path: { value: /api }, method: POST, headers: [{ name: x-canary, value: "yes" }] }]
      - name: debug
        matches: [{ path: { type: RegularExpression, value: "/debug/[0-9]+" }, queryParams: [{ name: v, value: "2" }] }]
  - destination: "10.0.0.9:8080"
    routes:
      - name: by-address
"#;

#[test]
fn gateway_api_precedence() {
    let p = compile(ROUTES).unwrap();
    let host = Some("web.ns.svc");
    assert_eq!(route_name(&p, host, &req("GET", "/api/health", &[])), "exact-health");
    assert_eq!(route_name(&p, host, &req("GET", "/api/v1/users", &[])), "prefix-api-v1");
    assert_eq!(route_name(&p, host, &req("GET", "/api/v2", &[])), "prefix-api");
    assert_eq!(route_name(&p, host, &req("POST", "/api/v2", &[])), "post-only");
    assert_eq!(
        route_name(&p, host, &req("POST", "/api/x", &[("x-canary", "yes")])),
        "canary"
    );
    // Prefixes match whole segments only.
    assert_eq!(route_name(&p, host, &req("GET", "/apix", &[])), DEFAULT_ROUTE);
    assert_eq!(route_name(&p, host, &req("GET", "/debug/42?v=2", &[])), "debug");
    assert_eq!(route_name(&p, host, &req("GET", "/debug/42x?v=2", &[])), DEFAULT_ROUTE);
    assert_eq!(route_name(&p, host, &req("GET", "/debug/42?v=3", &[])), DEFAULT_ROUTE);
}

#[test]
fn destinations_by_authority_then_address() {
    let p = compile(ROUTES).unwrap();
    let r = req("GET", "/anything", &[]);
    // Host with explicit port, upper case, or without port (meaning 80).
    assert_eq!(
        route_name(&p, Some("WEB.ns.svc:80"), &req("GET", "/api", &[])),
        "prefix-api"
    );
    assert_eq!(
        route_name(&p, Some("WEB.ns.svc.:80"), &req("GET", "/api", &[])),
        "prefix-api",
        "a fully qualified name's trailing dot"
    );
    assert_eq!(
        route_name(&p, Some("web.ns.svc."), &req("GET", "/api", &[])),
        "prefix-api"
    );
    assert_eq!(route_name(&p, Some("other:80"), &r), "by-address");
    assert_eq!(route_name(&p, None, &r), "by-address");
    let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
    assert_eq!(&*p.destination(Some("unknown:80"), dst).route(&r).name, DEFAULT_ROUTE);
}

#[test]
fn invalid_policies_are_refused_with_their_place() {
    let e = compile_err("destinations:\n  - destination: a:80\n  - destination: a:80\n");
    assert!(e.contains("destinations[1]") && e.contains("twice"), "{e}");
    let e = compile_err(
        "destinations:\n  - destination: a:80\n    routes: [{ name: r, matches: [{ path: { type: RegularExpression, value: \"(\" } }] }]\n",
    );
    assert!(
        e.contains("routes[0].matches[0]") && e.contains("regular expression") && e.contains(":3:"),
        "{e}"
    );
    let e = compile_err(
        "destinations:\n  - destination: a:80\n    routes: [{ name: r, timeouts: { request: 1s, backendRequest: 2s } }]\n",
    );
    assert!(e.contains("backendRequest"), "{e}");
    let e = compile_err(
        "destinations:\n  - destination: a:80\n    routes: [{ name: r, matches: [{ path: { value: api } }] }]\n",
    );
    assert!(e.contains("must start with `/`"), "{e}");
}

#[test]
fn retry_codes_and_zero_timeouts() {
    let p = compile(
        "destinations:\n  - destination: a:80\n    routes: [{ name: r, timeouts: { request: 0s, backendRequest: 1s }, retry: { codes: [503, UNAVAILABLE], attempts: 3 } }]\n",
    )
    .unwrap();
    let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let route = p.destination(Some("a:80"), dst).route(&req("GET", "/", &[])).clone();
    assert_eq!(route.request_timeout, None, "0s disables");
    assert_eq!(route.attempt_timeout, Some(Duration::from_secs(1)));
    let retry = route.retry.as_ref().unwrap();
    assert!(retry.retries_status(StatusCode::SERVICE_UNAVAILABLE));
    assert!(!retry.retries_status(StatusCode::BAD_GATEWAY));
    assert!(retry.retries_grpc(14) && !retry.retries_grpc(2));
    assert_eq!(retry.max_retries, 3);
}

#[test]
fn weighted_backends_split_traffic() {
    let p = compile(
        "destinations:\n  - destination: a:80\n    routes: [{ name: r, backendRefs: [{ address: \"10.0.0.1:80\", weight: 3 }, { address: \"10.0.0.2:80\", weight: 1 }, { address: \"10.0.0.3:80\", weight: 0 }] }]\n",
    )
    .unwrap();
    let original: SocketAddr = "10.9.9.9:80".parse().unwrap();
    let route = p
        .destination(Some("a:80"), original)
        .route(&req("GET", "/", &[]))
        .clone();
    let mut counts = HashMap::new();
    for _ in 0..4000 {
        *counts.entry(route.backend().unwrap_or(original)).or_insert(0) += 1;
    }
    let first = counts[&"10.0.0.1:80".parse().unwrap()];
    assert!((2700..3300).contains(&first), "{counts:?}");
    assert!(!counts.contains_key(&"10.0.0.3:80".parse().unwrap()));
    assert!(!counts.contains_key(&original));
}

#[test]
fn endpoint_picks_follow_the_weights() {
    let p = compile(
        "destinations:\n  - destination: a:80\n    endpoints: [{ address: \"10.0.0.1:80\", weight: 1 }, { address: \"10.0.0.2:80\", weight: 3 }, { address: \"10.0.0.3:80\", weight: 0 }]\n",
    )
    .unwrap();
    let d = p.destination(Some("a:80"), "10.9.9.9:80".parse().unwrap());
    let heavy: SocketAddr = "10.0.0.2:80".parse().unwrap();
    let balancer = d.balancer.as_ref().expect("endpoints in rotation: a balancer");
    // 400 requests in flight at once: a weight is capacity, so the heavy endpoint carries more
    // of them (about three times the light one's at equal latency).
    let picks = (0..400).filter_map(|_| balancer.pick().ok()).collect::<Vec<_>>();
    let n = picks.iter().filter(|p| p.address() == heavy).count();
    assert!((270..330).contains(&n), "{n} of 400 for weight 3 of 4");
    assert!(
        picks.iter().all(|p| p.address().ip().to_string() != "10.0.0.3"),
        "weight 0 is out of rotation"
    );
    assert!(
        d.endpoint("10.0.0.3:80".parse().unwrap()).is_some(),
        "listed, out of rotation"
    );
}

#[test]
fn an_endpoint_out_of_rotation_keeps_its_identity() {
    let p = compile(
        "destinations:\n  - destination: a:80\n    endpoints: [{ address: \"10.0.0.1:80\", identity: spiffe://td/ns/a/sa/web, weight: 0 }, { address: \"10.0.0.2:80\" }]\n",
    )
    .unwrap();
    let d = p.destination(Some("a:80"), "10.9.9.9:80".parse().unwrap());
    let drained: SocketAddr = "10.0.0.1:80".parse().unwrap();
    // Never picked, but a connection dialled to it is still mesh TLS to its identity.
    let balancer = d.balancer.as_ref().expect("one endpoint in rotation");
    assert!((0..1000).all(|_| balancer.pick().map(|p| p.address()).ok() != Some(drained)));
    assert_eq!(
        d.identity(drained).map(|id| id.as_str()),
        Some("spiffe://td/ns/a/sa/web")
    );
}

#[test]
fn an_authority_with_an_unparsable_port_names_no_destination() {
    let p = compile("destinations:\n  - destination: web:80\n    routes: [{ name: r }]\n").unwrap();
    assert_eq!(route_name(&p, Some("web:99999"), &req("GET", "/", &[])), DEFAULT_ROUTE);
    assert_eq!(route_name(&p, Some("web"), &req("GET", "/", &[])), "r");
}

#[test]
fn a_reload_keeps_what_the_balancers_learnt_and_new_settings_start_afresh() {
    let metrics = HttpMetrics::register(&mut Registry::default());
    let yaml = |failures: u32| {
        format!(
            "destinations:\n  - destination: web:80\n    endpoints: [{{ address: \"10.0.0.1:80\" }}, {{ address: \"10.0.0.2:80\" }}]\n    loadBalancer: {{ failureAccrual: {{ consecutiveFailures: {failures} }} }}\n  - destination: 10.0.0.9:8080\n    endpoints: [{{ address: \"10.0.0.3:80\" }}]\n"
        )
    };
    let load = |failures, previous: Option<&Policy>| {
        Policy::compile_after(parse(&yaml(failures), "routes.yaml").unwrap(), &metrics, previous).unwrap()
    };
    let balancer = |p: &Policy, authority| {
        let dst = p.destination(Some(authority), DST.parse().unwrap());
        dst.balancer.clone().expect("balanced")
    };
    let first = load(7, None);
    let reloaded = load(7, Some(&first));
    for authority in ["web:80", "unnamed:1"] {
        assert!(
            Arc::ptr_eq(&balancer(&first, authority), &balancer(&reloaded, authority)),
            "{authority}: same settings, same balancer"
        );
    }
    // Other failure accrual: a balancer made with the new settings.
    let changed = load(3, Some(&reloaded));
    assert!(!Arc::ptr_eq(
        &balancer(&reloaded, "web:80"),
        &balancer(&changed, "web:80")
    ));
    assert_eq!(
        balancer(&changed, "web:80")
            .settings()
            .failure_accrual
            .consecutive_failures,
        3
    );
}

#[test]
fn a_destination_is_opaque_when_every_endpoint_says_so() {
    let yaml = |second: &str| {
        format!(
            "destinations:\n  - destination: db:5433\n    endpoints: [{{ address: \"10.0.0.1:5433\", protocol: opaque }}, {{ address: \"10.0.0.2:5433\"{second} }}]\n  - destination: web:80\n    routes: [{{ name: r }}]\n"
        )
    };
    let opaque = |p: &Policy, authority| p.destination(Some(authority), DST.parse().unwrap()).opaque();
    let all = compile(&yaml(", protocol: opaque")).unwrap();
    assert!(opaque(&all, "db:5433"));
    let mixed = compile(&yaml("")).unwrap();
    assert!(
        !opaque(&mixed, "db:5433"),
        "one endpoint without the hint: detected as usual"
    );
    assert!(!opaque(&all, "web:80"), "no endpoints: no hint");
}
