//! The index fed with watcher events of real k8s-openapi and gateway-api objects, as a watcher
//! would deliver them.

use std::{collections::BTreeSet, time::Duration};

use pillion_api::policy::model::{Authorization, PathMatch, RetryCode};
use serde_json::{Value, json};

use super::{super::authz::DEFAULT_INBOUND_POLICY, *};

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

// Inbound authorization: AuthorizationPolicies, annotations and the cluster default.

fn authz_policy(ns: &str, name: &str, spec: Value) -> AuthorizationPolicyObject {
    object(json!({
        "apiVersion": "policy.pillion.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": { "namespace": ns, "name": name },
        "spec": spec,
    }))
}

fn labelled_pod(ns: &str, name: &str, ips: &[&str], sa: &str, labels: Value) -> Pod {
    let mut pod = pod(ns, name, ips, sa, true);
    pod.metadata.labels = Some(object(labels));
    pod
}

fn annotated<K: kube::Resource>(mut object: K, value: &str) -> K {
    object
        .meta_mut()
        .annotations
        .get_or_insert_default()
        .insert(DEFAULT_INBOUND_POLICY.to_string(), value.to_string());
    object
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::try_from(format!("spiffe://example.org/ns/{ns}/sa/{sa}")).unwrap()
}

fn allow(identities: &[SpiffeId], namespaces: &[&str]) -> Authorization {
    Authorization::Allow {
        identities: identities.to_vec(),
        prefixes: namespaces
            .iter()
            .map(|ns| format!("spiffe://example.org/ns/{ns}/"))
            .collect(),
    }
}

/// Service `api` (selector app=api) with a dual-stack meshed pod, a second pod `api-b`, and an
/// unmeshed pod with the same labels.
fn api_cluster() -> Index {
    let mut index = index();
    let mut api = service("shop", "api", &["10.96.0.20"], json!([{ "name": "http", "port": 80 }]));
    api.spec.as_mut().unwrap().selector = Some(object(json!({ "app": "api" })));
    index.apply(Event::Apply(api));
    index.apply(Event::Apply(labelled_pod(
        "shop",
        "api-a",
        &["10.0.3.1", "fd00::3:1"],
        "api",
        json!({ "app": "api", "track": "stable" }),
    )));
    index.apply(Event::Apply(labelled_pod(
        "shop",
        "api-b",
        &["10.0.3.2"],
        "api",
        json!({ "app": "api", "track": "canary" }),
    )));
    let mut legacy = pod("shop", "api-legacy", &["10.0.3.3"], "legacy", false);
    legacy.metadata.labels = Some(object(json!({ "app": "api" })));
    index.apply(Event::Apply(legacy));
    index
}

/// The authorization of `ip:port` as the model answers it.
fn inbound(index: &Index, address: &str) -> Option<Authorization> {
    index.policy().inbound_at(&key(address)).cloned()
}

#[test]
fn a_policy_by_service_admits_its_service_accounts_on_its_ports_of_every_pod_ip() {
    let mut index = api_cluster();
    index.apply(Event::Apply(authz_policy(
        "shop",
        "api-from-web",
        json!({
            "target": { "service": "api", "ports": [8080] },
            "allow": [{ "serviceAccounts": [{ "name": "web" }, { "name": "batch", "namespace": "jobs" }] }],
        }),
    )));
    assert!(index.rejected().is_empty(), "{:?}", index.rejected());
    let web_and_batch = allow(&[id("jobs", "batch"), id("shop", "web")], &[]);
    for address in ["10.0.3.1:8080", "[fd00::3:1]:8080", "10.0.3.2:8080"] {
        assert_eq!(inbound(&index, address), Some(web_and_batch.clone()), "{address}");
    }
    // Another port of the same pods: the cluster default (all-unauthenticated unless set).
    assert_eq!(
        inbound(&index, "10.0.3.1:9090"),
        Some(Authorization::AllUnauthenticated)
    );
    let policy = index.policy();
    // Only meshed pods have a proxy to ask: the unmeshed one and the ClusterIP have no entry.
    let mut ips: Vec<String> = policy.workloads.keys().map(|ip| ip.to_string()).collect();
    ips.sort();
    assert_eq!(ips, ["10.0.3.1", "10.0.3.2", "fd00::3:1"]);
    assert_eq!(policy.workloads[&"10.0.3.1".parse().unwrap()].owner, id("shop", "api"));
    // As the proxy reads it back from the wire.
    let update = pillion_api::policy::convert::destination_update(&policy, &key("10.0.3.1:8080"));
    let read = pillion_api::policy::convert::authorization_from_proto(&update.inbound_authorization.unwrap());
    assert_eq!(read, Ok(Some(web_and_batch)));

    // The Service's selector narrowing moves the policy off a pod.
    let mut api = service("shop", "api", &["10.96.0.20"], json!([{ "name": "http", "port": 80 }]));
    api.spec.as_mut().unwrap().selector = Some(object(json!({ "app": "api", "track": "stable" })));
    index.apply(Event::Apply(api));
    assert!(matches!(
        inbound(&index, "10.0.3.1:8080"),
        Some(Authorization::Allow { .. })
    ));
    assert_eq!(
        inbound(&index, "10.0.3.2:8080"),
        Some(Authorization::AllUnauthenticated)
    );
}

#[test]
fn a_policy_by_pod_selector_and_the_union_of_two_policies() {
    let mut index = api_cluster();
    index.apply(Event::Apply(authz_policy(
        "shop",
        "canary-from-frontend",
        json!({
            "target": { "podSelector": { "matchLabels": { "app": "api" },
                        "matchExpressions": [{ "key": "track", "operator": "In", "values": ["canary"] }] },
                        "ports": [8080, 8081] },
            "allow": [{ "namespaces": ["frontend"] }],
        }),
    )));
    index.apply(Event::Apply(authz_policy(
        "shop",
        "all-api-from-web",
        json!({
            "target": { "podSelector": { "matchLabels": { "app": "api" } } },
            "allow": [{ "serviceAccounts": [{ "name": "web" }] }],
        }),
    )));
    // A policy of another namespace never applies here, even with a matching selector.
    index.apply(Event::Apply(authz_policy(
        "other",
        "everything",
        json!({ "target": { "podSelector": {} }, "allow": [{ "unauthenticated": true }] }),
    )));
    assert!(index.rejected().is_empty(), "{:?}", index.rejected());
    // The canary's ports 8080/8081: both policies (any one admitting the client admits it).
    let both = allow(&[id("shop", "web")], &["frontend"]);
    assert_eq!(inbound(&index, "10.0.3.2:8080"), Some(both.clone()));
    assert_eq!(inbound(&index, "10.0.3.2:8081"), Some(both));
    // Its other ports, and every port of the stable pod: the every-port policy alone.
    let web = allow(&[id("shop", "web")], &[]);
    assert_eq!(inbound(&index, "10.0.3.2:9090"), Some(web.clone()));
    assert_eq!(inbound(&index, "10.0.3.1:8080"), Some(web.clone()));
    assert_eq!(inbound(&index, "[fd00::3:1]:1"), Some(web));
    let canary = &index.policy().workloads[&"10.0.3.2".parse().unwrap()];
    assert_eq!(
        canary.ports.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([8080, 8081])
    );
}

#[test]
fn allow_entries_map_onto_the_models_authorization() {
    let cases = [
        (json!([{ "unauthenticated": true }]), Authorization::AllUnauthenticated),
        (json!([{ "authenticated": true }]), Authorization::AllAuthenticated),
        // The widest entry decides: anyone authenticated includes every service account.
        (
            json!([{ "serviceAccounts": [{ "name": "web" }] }, { "authenticated": true }]),
            Authorization::AllAuthenticated,
        ),
        (
            json!([{ "namespaces": ["frontend"] }, { "unauthenticated": true }]),
            Authorization::AllUnauthenticated,
        ),
        (json!([]), Authorization::Deny),
        (
            json!([{ "namespaces": ["frontend", "jobs"] }, { "serviceAccounts": [{ "name": "web" }, { "name": "cron", "namespace": "jobs" }] }]),
            // A service account of an admitted namespace adds nothing to its prefix.
            allow(&[id("shop", "web")], &["frontend", "jobs"]),
        ),
    ];
    for (entries, expected) in cases {
        let mut index = api_cluster();
        index.apply(Event::Apply(authz_policy(
            "shop",
            "p",
            json!({ "target": { "service": "api" }, "allow": entries }),
        )));
        assert!(index.rejected().is_empty(), "{entries}: {:?}", index.rejected());
        assert_eq!(inbound(&index, "10.0.3.1:8080"), Some(expected.clone()), "{entries}");
        // Identities as the proxy checks them.
        let permits = expected.permits(Some(&id("frontend", "x")));
        assert_eq!(
            index
                .policy()
                .inbound_at(&key("10.0.3.1:8080"))
                .unwrap()
                .permits(Some(&id("frontend", "x"))),
            permits
        );
    }
    let namespaces = allow(&[], &["frontend"]);
    assert!(namespaces.permits(Some(&id("frontend", "any"))));
    assert!(
        !namespaces.permits(Some(&id("frontends", "any"))),
        "a prefix ends at the segment"
    );
    assert!(!namespaces.permits(None));
}

#[test]
fn defaults_come_from_the_pod_then_its_namespace_then_the_cluster() {
    let mut index = Index::new(IndexConfig {
        cluster_domain: "cluster.local".to_string(),
        trust_domain: "example.org".to_string(),
        default_inbound: DefaultInboundPolicy::ClusterAuthenticated,
    });
    index.apply(Event::Apply(pod("shop", "plain", &["10.0.4.1"], "a", true)));
    index.apply(Event::Apply(annotated(
        pod("shop", "own", &["10.0.4.2"], "b", true),
        "all-authenticated",
    )));
    // The cluster's flag: any identity of our trust domain.
    let cluster = Authorization::allow(vec!["spiffe://example.org/*".to_string()]).unwrap();
    assert_eq!(inbound(&index, "10.0.4.1:80"), Some(cluster.clone()));
    assert!(cluster.permits(Some(&id("elsewhere", "x"))));
    assert!(!cluster.permits(Some(
        &SpiffeId::try_from("spiffe://other.org/ns/a/sa/b".to_string()).unwrap()
    )));

    // The namespace's annotation; the pod's own still wins.
    let shop: Namespace = object(json!({ "metadata": { "name": "shop" } }));
    index.apply(Event::Apply(annotated(shop.clone(), "deny")));
    assert_eq!(inbound(&index, "10.0.4.1:80"), Some(Authorization::Deny));
    assert_eq!(inbound(&index, "10.0.4.2:80"), Some(Authorization::AllAuthenticated));
    // A policy targeting a port wins over every default, for that port only.
    let mut own = annotated(pod("shop", "own", &["10.0.4.2"], "b", true), "all-authenticated");
    own.metadata.labels = Some(object(json!({ "app": "own" })));
    index.apply(Event::Apply(own));
    index.apply(Event::Apply(authz_policy(
        "shop",
        "own-open",
        json!({ "target": { "podSelector": { "matchLabels": { "app": "own" } }, "ports": [80] },
                "allow": [{ "unauthenticated": true }] }),
    )));
    assert_eq!(inbound(&index, "10.0.4.2:80"), Some(Authorization::AllUnauthenticated));
    assert_eq!(inbound(&index, "10.0.4.2:81"), Some(Authorization::AllAuthenticated));

    // A misspelt default opens nothing: it reads as deny.
    index.apply(Event::Apply(annotated(shop, "all_unauthenticated")));
    index.apply(Event::Apply(annotated(
        pod("shop", "typo", &["10.0.4.3"], "c", true),
        "open",
    )));
    assert_eq!(inbound(&index, "10.0.4.1:80"), Some(Authorization::Deny));
    assert_eq!(inbound(&index, "10.0.4.3:80"), Some(Authorization::Deny));
    // Removing the namespace's annotation restores the cluster's default.
    index.apply(Event::Apply(object::<Namespace>(
        json!({ "metadata": { "name": "shop" } }),
    )));
    assert_eq!(inbound(&index, "10.0.4.1:80"), Some(cluster));
}

#[test]
fn deleting_a_policy_restores_the_default() {
    let mut index = api_cluster();
    let deny_all = authz_policy(
        "shop",
        "deny-api",
        json!({ "target": { "service": "api" }, "allow": [] }),
    );
    index.apply(Event::Apply(deny_all.clone()));
    assert_eq!(inbound(&index, "10.0.3.1:8080"), Some(Authorization::Deny));
    assert!(index.apply(Event::Delete(deny_all)));
    assert_eq!(
        inbound(&index, "10.0.3.1:8080"),
        Some(Authorization::AllUnauthenticated)
    );
}

#[test]
fn invalid_policies_are_rejected_alone_with_a_reason() {
    let mut index = api_cluster();
    index.apply(Event::Apply(authz_policy(
        "shop",
        "good",
        json!({ "target": { "service": "api", "ports": [8080] }, "allow": [{ "authenticated": true }] }),
    )));
    let bad = [
        (
            "both-targets",
            json!({ "target": { "service": "api", "podSelector": {} }, "allow": [] }),
            "exactly one of service and podSelector",
        ),
        (
            "no-target",
            json!({ "target": {}, "allow": [] }),
            "exactly one of service and podSelector",
        ),
        (
            "empty-service",
            json!({ "target": { "service": "" }, "allow": [] }),
            "spec.target.service",
        ),
        (
            "port-zero",
            json!({ "target": { "service": "api", "ports": [8080, 0] }, "allow": [] }),
            "ports[1]",
        ),
        (
            "port-too-big",
            json!({ "target": { "service": "api", "ports": [70000] }, "allow": [] }),
            "70000",
        ),
        (
            "no-ports",
            json!({ "target": { "service": "api", "ports": [] }, "allow": [] }),
            "names no port",
        ),
        (
            "unknown-field",
            json!({ "target": { "service": "api" }, "allow": [], "deny": [] }),
            "unknown field `deny`",
        ),
        (
            "unknown-entry-field",
            json!({ "target": { "service": "api" }, "allow": [{ "serviceAccount": "web" }] }),
            "unknown field `serviceAccount`",
        ),
        (
            "no-allow",
            json!({ "target": { "service": "api" } }),
            "missing field `allow`",
        ),
        (
            "empty-sa-name",
            json!({ "target": { "service": "api" }, "allow": [{ "serviceAccounts": [{ "name": "" }] }] }),
            "serviceAccounts[0].name",
        ),
        (
            "empty-namespace",
            json!({ "target": { "service": "api" }, "allow": [{ "namespaces": [""] }] }),
            "namespaces[0]",
        ),
        (
            "two-kinds",
            json!({ "target": { "service": "api" }, "allow": [{ "namespaces": ["a"], "authenticated": true }] }),
            "exactly one of serviceAccounts",
        ),
        (
            "false",
            json!({ "target": { "service": "api" }, "allow": [{ "authenticated": false }] }),
            "authenticated: false",
        ),
        (
            "bad-operator",
            json!({ "target": { "podSelector": { "matchExpressions": [{ "key": "a", "operator": "Near" }] } }, "allow": [] }),
            "operator `Near`",
        ),
        ("no-spec", Value::Null, "spec"),
    ];
    for (name, spec, _) in &bad {
        index.apply(Event::Apply(authz_policy("shop", name, spec.clone())));
    }
    let rejected = index.rejected();
    for (name, _, reason) in &bad {
        let got = rejected
            .get(&(Kind::AuthorizationPolicy, ObjectKey::new("shop", name)))
            .unwrap_or_else(|| panic!("{name} accepted"));
        assert!(got.contains(reason), "{name}: {got:?} lacks {reason:?}");
    }
    assert_eq!(rejected.len(), bad.len());
    // The good policy still applies, and nothing the rejected ones said does.
    assert_eq!(inbound(&index, "10.0.3.1:8080"), Some(Authorization::AllAuthenticated));
    assert_eq!(
        inbound(&index, "10.0.3.1:9090"),
        Some(Authorization::AllUnauthenticated)
    );

    // A good policy updated into a bad one is withdrawn (its stale form is not served).
    index.apply(Event::Apply(authz_policy(
        "shop",
        "good",
        json!({ "target": { "service": "api", "ports": [0] }, "allow": [] }),
    )));
    assert_eq!(
        inbound(&index, "10.0.3.1:8080"),
        Some(Authorization::AllUnauthenticated)
    );
}

#[test]
fn pods_that_do_not_own_their_ip_get_no_authorization() {
    let mut index = index();
    let mut host = pod("shop", "host", &["192.168.1.10"], "node-agent", true);
    host.spec.as_mut().unwrap().host_network = Some(true);
    index.apply(Event::Apply(host));
    let mut done = pod("shop", "job", &["10.0.5.1"], "job", true);
    done.status.as_mut().unwrap().phase = Some("Succeeded".to_string());
    index.apply(Event::Apply(done));
    index.apply(Event::Apply(pod("shop", "plain", &["10.0.5.2"], "app", false)));
    assert!(index.policy().workloads.is_empty());
    // The address is now a new pod's.
    index.apply(Event::Apply(pod("shop", "next", &["10.0.5.1"], "next", true)));
    assert_eq!(
        index.policy().workloads[&"10.0.5.1".parse().unwrap()].owner,
        id("shop", "next")
    );
}

#[test]
fn a_pods_authorization_is_visible_only_to_the_pod() {
    use crate::discovery_service::visible_update;
    let mut index = api_cluster();
    index.apply(Event::Apply(authz_policy(
        "shop",
        "api-from-web",
        json!({ "target": { "service": "api" }, "allow": [{ "serviceAccounts": [{ "name": "web" }] }] }),
    )));
    let policy = index.policy();
    let own = key("10.0.3.1:8080");
    // The pod's proxy, asking for its own podIP:port over mTLS, is told who may call it.
    let seen = visible_update(&policy, &own, Some(&id("shop", "api"))).inbound_authorization;
    assert!(seen.is_some());
    // Any other workload asking for that address is not, even one the policy admits.
    assert_eq!(
        visible_update(&policy, &own, Some(&id("shop", "web"))).inbound_authorization,
        None
    );
    assert_eq!(
        visible_update(&policy, &own, Some(&id("other", "api"))).inbound_authorization,
        None
    );
    // Nor for the Service's names: those are not the pod's own address.
    let by_ip = visible_update(&policy, &key("10.96.0.20:80"), Some(&id("shop", "api")));
    assert_eq!(by_ip.inbound_authorization, None);
}
