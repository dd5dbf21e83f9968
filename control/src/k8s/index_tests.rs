//! The index fed with watcher events of real k8s-openapi and gateway-api objects, as a watcher
//! would deliver them.

use std::time::Duration;

use pillion_api::policy::model::{PathMatch, RetryCode};
use serde_json::{Value, json};

use super::*;

fn index() -> Index {
    Index::new(IndexConfig {
        cluster_domain: "cluster.local".to_string(),
        trust_domain: "example.org".to_string(),
        default_inbound: Default::default(),
    })
}

fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("test object")
}

fn service(ns: &str, name: &str, cluster_ips: &[&str], ports: Value) -> Service {
    object(json!({
        "metadata": { "namespace": ns, "name": name },
        "spec": { "clusterIP": cluster_ips[0], "clusterIPs": cluster_ips, "ports": ports },
    }))
}

/// An EndpointSlice of `service` with port `http` → `target`; endpoints are (ip, pod, ready).
fn slice(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    target: u16,
    endpoints: &[(&str, &str, bool)],
) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            json!({
                "addresses": [ip],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "targetRef": { "kind": "Pod", "namespace": ns, "name": pod },
            })
        })
        .collect();
    object(json!({
        "metadata": { "namespace": ns, "name": name, "labels": { "kubernetes.io/service-name": service } },
        "addressType": family,
        "ports": [{ "name": "http", "port": target, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
}

fn pod(ns: &str, name: &str, ips: &[&str], sa: &str, meshed: bool) -> Pod {
    let mut init = vec![json!({ "name": "pillion-init", "image": "init" })];
    if meshed {
        init.push(json!({ "name": "pillion-proxy", "image": "proxy", "restartPolicy": "Always" }));
    }
    let ips: Vec<Value> = ips.iter().map(|ip| json!({ "ip": ip })).collect();
    object(json!({
        "metadata": { "namespace": ns, "name": name },
        "spec": {
            "serviceAccountName": sa,
            "initContainers": init,
            "containers": [{ "name": "app", "image": "app" }],
        },
        "status": { "podIP": ips[0]["ip"], "podIPs": ips },
    }))
}

fn http_route(ns: &str, name: &str, spec: Value) -> HttpRoute {
    object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "namespace": ns, "name": name, "creationTimestamp": "2026-01-01T00:00:00Z" },
        "spec": spec,
    }))
}

fn web_service() -> Service {
    service(
        "shop",
        "web",
        &["10.96.0.10"],
        json!([{ "name": "http", "port": 80, "targetPort": 8080 }]),
    )
}

/// `web` with two meshed pods and one pod without our proxy.
fn web_cluster() -> Index {
    let mut index = index();
    index.apply(Event::Apply(web_service()));
    index.apply(Event::Apply(pod("shop", "web-a", &["10.0.0.1"], "web", true)));
    index.apply(Event::Apply(pod("shop", "web-b", &["10.0.0.2"], "web", true)));
    index.apply(Event::Apply(pod("shop", "legacy", &["10.0.0.3"], "legacy", false)));
    index.apply(Event::Apply(slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        8080,
        &[
            ("10.0.0.1", "web-a", true),
            ("10.0.0.2", "web-b", true),
            ("10.0.0.3", "legacy", true),
        ],
    )));
    index
}

fn key(s: &str) -> Authority {
    s.parse().unwrap()
}

fn addresses(d: &Destination) -> Vec<String> {
    d.endpoints.iter().map(|e| e.address.to_string()).collect()
}

#[test]
fn service_slice_and_pods_give_endpoints_with_identities_by_name_and_cluster_ip() {
    let policy = web_cluster().policy();
    let by_name = &policy.destinations[&key("web.shop.svc.cluster.local:80")];
    let by_ip = &policy.destinations[&key("10.96.0.10:80")];
    assert_eq!(by_name.endpoints, by_ip.endpoints);
    assert_eq!(addresses(by_name), ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]);
    let identities: Vec<Option<&str>> = by_name
        .endpoints
        .iter()
        .map(|e| e.identity.as_ref().map(|i| i.as_str()))
        .collect();
    assert_eq!(
        identities,
        [
            Some("spiffe://example.org/ns/shop/sa/web"),
            Some("spiffe://example.org/ns/shop/sa/web"),
            // Not injected: no identity, so callers do not expect mesh TLS from it.
            None,
        ]
    );
    assert_eq!(policy.destinations.len(), 2);
    assert!(policy.inbound.is_empty());
}

#[test]
fn not_ready_endpoints_are_left_out_unless_only_terminating_ones_serve() {
    let mut index = web_cluster();
    index.apply(Event::Apply(slice(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        8080,
        &[("10.0.0.1", "web-a", false), ("10.0.0.2", "web-b", true)],
    )));
    let policy = index.policy();
    assert_eq!(
        addresses(&policy.destinations[&key("10.96.0.10:80")]),
        ["10.0.0.2:8080"]
    );

    // Rolling out: the last pod is terminating but still serving; kube-proxy keeps sending to it.
    let terminating: EndpointSlice = object(json!({
        "metadata": { "namespace": "shop", "name": "web-abc", "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080 }],
        "endpoints": [
            { "addresses": ["10.0.0.1"], "conditions": { "ready": false, "serving": true, "terminating": true } },
            { "addresses": ["10.0.0.2"], "conditions": { "ready": false, "serving": false, "terminating": true } },
        ],
    }));
    index.apply(Event::Apply(terminating));
    let policy = index.policy();
    let d = &policy.destinations[&key("10.96.0.10:80")];
    assert_eq!(addresses(d), ["10.0.0.1:8080"]);
    // Found by IP when the slice has no targetRef.
    assert_eq!(
        d.endpoints[0].identity.as_ref().map(|i| i.as_str()),
        Some("spiffe://example.org/ns/shop/sa/web")
    );
}

#[test]
fn dual_stack_keys_each_cluster_ip_with_its_family() {
    let mut index = index();
    index.apply(Event::Apply(service(
        "shop",
        "web",
        &["10.96.0.10", "fd00::10"],
        json!([{ "name": "http", "port": 80, "appProtocol": "kubernetes.io/h2c" }]),
    )));
    index.apply(Event::Apply(pod(
        "shop",
        "web-a",
        &["10.0.0.1", "fd00::1"],
        "web",
        true,
    )));
    index.apply(Event::Apply(slice(
        "shop",
        "web-v4",
        "web",
        "IPv4",
        8080,
        &[("10.0.0.1", "web-a", true)],
    )));
    index.apply(Event::Apply(slice(
        "shop",
        "web-v6",
        "web",
        "IPv6",
        8080,
        &[("fd00::1", "web-a", true)],
    )));
    let policy = index.policy();
    assert_eq!(
        addresses(&policy.destinations[&key("10.96.0.10:80")]),
        ["10.0.0.1:8080"]
    );
    assert_eq!(
        addresses(&policy.destinations[&key("[fd00::10]:80")]),
        ["[fd00::1]:8080"]
    );
    // The name is answered with the primary family, as DNS answers first.
    let by_name = &policy.destinations[&key("web.shop.svc.cluster.local:80")];
    assert_eq!(addresses(by_name), ["10.0.0.1:8080"]);
    assert_eq!(by_name.endpoints[0].protocol, ProtocolHint::Http2);
    assert!(by_name.endpoints[0].identity.is_some());
}

#[test]
fn opaque_ports_from_service_and_pod_annotations() {
    let mut index = web_cluster();
    let mut svc = web_service();
    svc.metadata.annotations = Some([(OPAQUE_PORTS.to_string(), "80".to_string())].into());
    index.apply(Event::Apply(svc));
    let policy = index.policy();
    assert!(
        policy.destinations[&key("10.96.0.10:80")]
            .endpoints
            .iter()
            .all(|e| e.protocol == ProtocolHint::Opaque)
    );

    let mut index = web_cluster();
    let mut a = pod("shop", "web-a", &["10.0.0.1"], "web", true);
    a.metadata.annotations = Some([(OPAQUE_PORTS.to_string(), "8000-8100".to_string())].into());
    index.apply(Event::Apply(a));
    let policy = index.policy();
    let protocols: Vec<ProtocolHint> = policy.destinations[&key("10.96.0.10:80")]
        .endpoints
        .iter()
        .map(|e| e.protocol)
        .collect();
    assert_eq!(
        protocols,
        [ProtocolHint::Opaque, ProtocolHint::Unknown, ProtocolHint::Unknown]
    );

    // A bad annotation rejects the pod (with the reason); its endpoint is left out.
    let mut a = pod("shop", "web-a", &["10.0.0.1"], "web", true);
    a.metadata.annotations = Some([(OPAQUE_PORTS.to_string(), "9100-9000".to_string())].into());
    index.apply(Event::Apply(a));
    let reason = &index.rejected()[&(Kind::Pod, ObjectKey::new("shop", "web-a"))];
    assert!(reason.contains(OPAQUE_PORTS), "{reason}");
    assert_eq!(
        addresses(&index.policy().destinations[&key("10.96.0.10:80")]),
        ["10.0.0.2:8080", "10.0.0.3:8080"]
    );
}

#[test]
fn deletions_remove_endpoints_identities_and_destinations() {
    let mut index = web_cluster();
    assert!(index.apply(Event::Delete(pod("shop", "web-a", &["10.0.0.1"], "web", true))));
    let policy = index.policy();
    let d = &policy.destinations[&key("10.96.0.10:80")];
    // The slice still lists it (the endpoints controller has not caught up): its identity is not
    // known any more, so it is left out rather than served as plaintext.
    assert_eq!(addresses(d), ["10.0.0.2:8080", "10.0.0.3:8080"]);

    index.apply(Event::Delete(slice("shop", "web-abc", "web", "IPv4", 8080, &[])));
    assert!(index.policy().destinations[&key("10.96.0.10:80")].endpoints.is_empty());

    index.apply(Event::Delete(web_service()));
    assert!(index.policy().destinations.is_empty());
}

#[test]
fn a_relist_replaces_a_kind_only_when_complete() {
    let mut index = web_cluster();
    let before = index.policy();
    // The watch restarts: until InitDone the last known pods keep being served.
    assert!(!index.apply(Event::<Pod>::Init));
    assert!(!index.apply(Event::InitApply(pod("shop", "web-b", &["10.0.0.2"], "web", true))));
    assert_eq!(index.policy(), before);
    assert!(index.apply(Event::<Pod>::InitDone));
    // web-a and legacy were deleted while the watch was down; the slice has not caught up.
    let policy = index.policy();
    assert_eq!(
        addresses(&policy.destinations[&key("10.96.0.10:80")]),
        ["10.0.0.2:8080"]
    );
    assert!(index.is_synced(&[Kind::Pod]));
    assert!(!index.is_synced(&[Kind::Pod, Kind::Service]));
}

/// `web` split 90/10 between `web-stable` (two pods) and `web-canary` (one pod).
fn canary_cluster() -> Index {
    let mut index = web_cluster();
    for (name, ip, pods) in [
        (
            "web-stable",
            "10.96.0.11",
            &[("10.0.1.1", "s1"), ("10.0.1.2", "s2")][..],
        ),
        ("web-canary", "10.96.0.12", &[("10.0.2.1", "c1")][..]),
    ] {
        index.apply(Event::Apply(service(
            "shop",
            name,
            &[ip],
            json!([{ "name": "http", "port": 80 }]),
        )));
        let endpoints: Vec<(&str, &str, bool)> = pods.iter().map(|(ip, pod)| (*ip, *pod, true)).collect();
        for (ip, pod_name) in pods {
            index.apply(Event::Apply(pod("shop", pod_name, &[ip], "web", true)));
        }
        index.apply(Event::Apply(slice(
            "shop",
            &format!("{name}-x"),
            name,
            "IPv4",
            8080,
            &endpoints,
        )));
    }
    index
}

fn canary_route() -> HttpRoute {
    http_route(
        "shop",
        "web-split",
        json!({
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web", "port": 80 }],
            "rules": [
                {
                    "matches": [{ "path": { "type": "PathPrefix", "value": "/api" }, "method": "GET",
                                  "headers": [{ "name": "X-Env", "value": "canary" }] }],
                    "timeouts": { "request": "2m", "backendRequest": "1m30s" },
                    "retry": { "codes": [502, 503], "attempts": 2, "backoff": "25ms" },
                    "backendRefs": [
                        { "name": "web-stable", "port": 80, "weight": 90 },
                        { "name": "web-canary", "port": 80, "weight": 10 },
                    ],
                },
                { "name": "rest" },
            ],
        }),
    )
}

#[test]
fn an_http_route_splits_by_weight_across_backend_services_endpoints() {
    let mut index = canary_cluster();
    index.apply(Event::Apply(canary_route()));
    let policy = index.policy();
    let web = &policy.destinations[&key("web.shop.svc.cluster.local:80")];
    assert_eq!(web.routes, policy.destinations[&key("10.96.0.10:80")].routes);
    assert_eq!(web.routes.len(), 2);
    let split = &web.routes[0];
    assert_eq!(split.name.0, "shop/web-split/0");
    let refs: Vec<(String, u32)> = split
        .backend_refs
        .iter()
        .map(|b| (b.address.to_string(), b.weight))
        .collect();
    // 90 over two endpoints, 10 over one: 45/45/10 of 100, exactly.
    assert_eq!(
        refs,
        [
            ("10.0.1.1:8080".to_string(), 90),
            ("10.0.1.2:8080".to_string(), 90),
            ("10.0.2.1:8080".to_string(), 20),
        ]
    );
    let m = &split.matches[0];
    assert_eq!(m.path, Some(PathMatch::Prefix("/api".to_string())));
    assert_eq!(m.method.as_ref().map(|m| m.0.as_str()), Some("GET"));
    assert_eq!(m.headers[0].name, "x-env");
    let timeouts = split.timeouts.as_ref().unwrap();
    assert_eq!(timeouts.request, Some(Duration::from_secs(120)));
    assert_eq!(timeouts.backend_request, Some(Duration::from_secs(90)));
    let retry = split.retry.as_ref().unwrap();
    assert_eq!(retry.codes, [RetryCode::Http(502), RetryCode::Http(503)]);
    assert_eq!((retry.attempts, retry.backoff), (2, Duration::from_millis(25)));
    let rest = &web.routes[1];
    assert_eq!(rest.name.0, "shop/web-split/rest");
    assert!(rest.matches.is_empty() && rest.backend_refs.is_empty());
    // Other Services are untouched.
    assert!(policy.destinations[&key("10.96.0.11:80")].routes.is_empty());

    // A canary pod becoming unready moves the split without the route being touched.
    index.apply(Event::Apply(slice(
        "shop",
        "web-canary-x",
        "web-canary",
        "IPv4",
        8080,
        &[("10.0.2.1", "c1", false)],
    )));
    let policy = index.policy();
    let split = &policy.destinations[&key("10.96.0.10:80")].routes[0];
    assert_eq!(split.backend_refs.len(), 2);

    // Deleting the route removes its rules.
    index.apply(Event::Delete(canary_route()));
    assert!(index.policy().destinations[&key("10.96.0.10:80")].routes.is_empty());
}

#[test]
fn a_malformed_http_route_is_skipped_and_the_rest_stays() {
    let mut index = canary_cluster();
    index.apply(Event::Apply(canary_route()));
    let bad_regex = http_route(
        "shop",
        "bad-regex",
        json!({
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{ "matches": [{ "path": { "type": "RegularExpression", "value": "/(" } }] }],
        }),
    );
    let redirect = http_route(
        "shop",
        "redirect",
        json!({
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{ "filters": [{ "type": "RequestRedirect", "requestRedirect": { "statusCode": 301 } }] }],
        }),
    );
    let other_namespace = http_route(
        "shop",
        "elsewhere",
        json!({
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{ "backendRefs": [{ "name": "web", "namespace": "prod", "port": 80 }] }],
        }),
    );
    let bad_timeout = http_route(
        "shop",
        "bad-timeout",
        json!({
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{ "timeouts": { "request": "ten seconds" } }],
        }),
    );
    for route in [bad_regex, redirect, other_namespace, bad_timeout] {
        index.apply(Event::Apply(route));
    }
    let rejected: Vec<(&str, &str)> = index
        .rejected()
        .iter()
        .map(|((_, key), reason)| (key.name.as_str(), reason.as_str()))
        .collect();
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    let reason = |name: &str| rejected.iter().find(|(n, _)| *n == name).unwrap().1;
    assert!(reason("bad-regex").contains("regular expression"), "{rejected:?}");
    assert!(reason("redirect").contains("RequestRedirect"), "{rejected:?}");
    assert!(reason("elsewhere").contains("ReferenceGrant"), "{rejected:?}");
    assert!(reason("bad-timeout").contains("timeouts.request"), "{rejected:?}");
    // The good route still applies, alone.
    let policy = index.policy();
    let names: Vec<&str> = policy.destinations[&key("10.96.0.10:80")]
        .routes
        .iter()
        .map(|r| r.name.0.as_str())
        .collect();
    assert_eq!(names, ["shop/web-split/0", "shop/web-split/rest"]);

    // Fixing a route clears its rejection; deleting one does too.
    index.apply(Event::Apply(http_route(
        "shop",
        "bad-timeout",
        json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "web", "port": 80 }],
                "rules": [{ "timeouts": { "request": "5s" } }] }),
    )));
    index.apply(Event::Delete(http_route("shop", "redirect", json!({}))));
    assert_eq!(index.rejected().len(), 2);
    assert_eq!(index.policy().destinations[&key("10.96.0.10:80")].routes.len(), 3);
}

#[test]
fn routes_for_gateways_and_other_ports_do_not_apply() {
    let mut index = web_cluster();
    index.apply(Event::Apply(http_route(
        "shop",
        "north-south",
        json!({ "parentRefs": [{ "name": "public-gateway" }], "rules": [{}] }),
    )));
    index.apply(Event::Apply(http_route(
        "shop",
        "admin-port",
        json!({ "parentRefs": [{ "group": "", "kind": "Service", "name": "web", "port": 9090 }], "rules": [{}] }),
    )));
    assert!(index.rejected().is_empty());
    assert!(index.policy().destinations[&key("10.96.0.10:80")].routes.is_empty());
}

#[test]
fn malformed_core_objects_are_rejected_alone() {
    let mut index = web_cluster();
    let mut no_label = slice("shop", "stray", "web", "IPv4", 8080, &[("10.0.0.9", "x", true)]);
    no_label.metadata.labels = None;
    index.apply(Event::Apply(no_label));
    let bad_ip = slice("shop", "bad-ip", "web", "IPv4", 8080, &[("10.0.0.999", "x", true)]);
    index.apply(Event::Apply(bad_ip));
    index.apply(Event::Apply(service(
        "shop",
        "broken",
        &["not-an-ip"],
        json!([{ "port": 80 }]),
    )));
    assert_eq!(index.rejected().len(), 3, "{:?}", index.rejected());
    let policy = index.policy();
    assert_eq!(policy.destinations.len(), 2);
    assert_eq!(policy.destinations[&key("10.96.0.10:80")].endpoints.len(), 3);
}

#[test]
fn every_destination_crosses_the_wire_as_the_proxy_reads_it() {
    use pillion_api::policy::convert::{destination_from_update, destination_update};
    let mut index = canary_cluster();
    index.apply(Event::Apply(canary_route()));
    let policy = index.policy();
    for (key, destination) in &policy.destinations {
        let update = destination_update(&policy, key);
        let read = destination_from_update(&update).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(read.as_ref(), Some(destination), "{key}");
    }
}

#[test]
fn a_grpc_route_matches_methods_as_paths_and_splits_like_an_http_route() {
    use gateway_api::experimental::grpcroutes::GrpcRoute;
    let mut index = canary_cluster();
    index.apply(Event::Apply(canary_route()));
    let grpc: GrpcRoute = object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": { "namespace": "shop", "name": "web-split", "creationTimestamp": "2026-01-02T00:00:00Z" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{
                "matches": [
                    { "method": { "service": "shop.Cart", "method": "Get" } },
                    { "method": { "service": "shop.Cart" }, "headers": [{ "name": "x-env", "value": "canary" }] },
                    { "method": { "method": "Get.All" } },
                    { "method": { "type": "RegularExpression", "service": "shop\\.(Cart|Order)" } },
                ],
                "backendRefs": [{ "name": "web-canary", "port": 80 }],
            }],
        },
    }));
    index.apply(Event::Apply(grpc));
    assert!(index.rejected().is_empty(), "{:?}", index.rejected());
    let policy = index.policy();
    let routes = &policy.destinations[&key("10.96.0.10:80")].routes;
    let names: Vec<&str> = routes.iter().map(|r| r.name.0.as_str()).collect();
    // The older HTTPRoute first; the same name as a GRPCRoute does not collide.
    assert_eq!(
        names,
        ["shop/web-split/0", "shop/web-split/rest", "grpcroute/shop/web-split/0"]
    );
    let grpc = &routes[2];
    let paths: Vec<&PathMatch> = grpc.matches.iter().filter_map(|m| m.path.as_ref()).collect();
    assert_eq!(
        paths,
        [
            &PathMatch::Exact("/shop.Cart/Get".to_string()),
            &PathMatch::Prefix("/shop.Cart".to_string()),
            &PathMatch::Regex("/[^/]+/Get\\.All".to_string()),
            &PathMatch::Regex("/(?:shop\\.(Cart|Order))/(?:[^/]+)".to_string()),
        ]
    );
    assert_eq!(grpc.matches[1].headers[0].name, "x-env");
    let backends: Vec<String> = grpc.backend_refs.iter().map(|b| b.address.to_string()).collect();
    assert_eq!(backends, ["10.0.2.1:8080"]);

    // A match that names nothing, and a filter, are refused.
    let bad: GrpcRoute = object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": { "namespace": "shop", "name": "bad" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{ "matches": [{ "method": { "type": "Exact" } }] }],
        },
    }));
    index.apply(Event::Apply(bad));
    let reason = &index.rejected()[&(Kind::GrpcRoute, ObjectKey::new("shop", "bad"))];
    assert!(reason.contains("neither a service nor a method"), "{reason}");
    assert_eq!(index.policy().destinations[&key("10.96.0.10:80")].routes.len(), 3);
}
