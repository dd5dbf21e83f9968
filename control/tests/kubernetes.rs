//! `pillion-control serve --kubernetes` against the emulated API server (support/apiserver.rs):
//! the process finds it through a kubeconfig, lists and watches the cluster's objects, and a
//! Discovery `Watch` client sees, by service name and by ClusterIP, the Service's endpoints with
//! identities only for pods running our proxy, an HTTPRoute's weighted split, and every change:
//! a pod injected, a pod deleted, and changes made while the watches were down and the versions
//! they would resume from compacted (410 Gone, so the control plane relists). And a pod's own
//! address answered with its inbound authorization, from AuthorizationPolicies (one the control
//! plane refuses listed among them) and the namespace's default. And route status: of two
//! replicas only the Lease holder writes Accepted and ResolvedRefs, keeping another controller's
//! entry, and the other takes over once the holder is killed.

#[path = "support/apiserver.rs"]
mod apiserver;
mod support;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use apiserver::ApiServer;
use gateway_api::experimental::httproutes::HttpRoute;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use pillion_control::{
    k8s::authz::AuthorizationPolicyObject,
    proto::{DestinationUpdate, WatchRequest, authorization::Policy as Authz, discovery_client::DiscoveryClient},
};
use serde_json::{Value, json};
use tonic::Streaming;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const LEGACY_ID: &str = "spiffe://cluster.local/ns/shop/sa/legacy";

fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).unwrap()
}

fn service(name: &str, ip: &str) -> Service {
    object(json!({
        "metadata": { "namespace": "shop", "name": name },
        "spec": { "clusterIP": ip, "clusterIPs": [ip], "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }))
}

fn pod(name: &str, ip: &str, sa: &str, meshed: bool) -> Pod {
    let mut init = vec![json!({ "name": "pillion-init", "image": "init" })];
    if meshed {
        init.push(json!({ "name": "pillion-proxy", "image": "proxy", "restartPolicy": "Always" }));
    }
    object(json!({
        "metadata": { "namespace": "shop", "name": name },
        "spec": { "serviceAccountName": sa, "initContainers": init, "containers": [{ "name": "app", "image": "app" }] },
        "status": { "podIP": ip, "podIPs": [{ "ip": ip }] },
    }))
}

/// The EndpointSlice of `service`: (ip, pod) pairs, all ready.
fn slice(service: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod)| {
            json!({ "addresses": [ip], "conditions": { "ready": true },
                    "targetRef": { "kind": "Pod", "namespace": "shop", "name": pod } })
        })
        .collect();
    object(json!({
        "metadata": { "namespace": "shop", "name": format!("{service}-1"),
                      "labels": { "kubernetes.io/service-name": service } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
}

fn split_route() -> HttpRoute {
    object(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "namespace": "shop", "name": "web-split" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web", "port": 80 }],
            "rules": [{
                "matches": [{ "path": { "type": "PathPrefix", "value": "/api" } }],
                "timeouts": { "request": "5s" },
                "backendRefs": [
                    { "name": "web-stable", "port": 80, "weight": 80 },
                    { "name": "web-canary", "port": 80, "weight": 20 },
                ],
            }],
        },
    }))
}

/// shop/web: web-a (meshed) and legacy (not injected); web-stable and web-canary behind a route.
fn populate(api: &ApiServer) {
    api.apply(&object::<Namespace>(json!({ "metadata": { "name": "shop" } })));
    api.apply(&service("web", "10.96.0.10"));
    api.apply(&pod("web-a", "10.0.0.1", "web", true));
    api.apply(&pod("legacy", "10.0.0.2", "legacy", false));
    api.apply(&slice("web", &[("10.0.0.1", "web-a"), ("10.0.0.2", "legacy")]));
    api.apply(&service("web-stable", "10.96.0.11"));
    api.apply(&pod("stable-1", "10.0.1.1", "web", true));
    api.apply(&slice("web-stable", &[("10.0.1.1", "stable-1")]));
    api.apply(&service("web-canary", "10.96.0.12"));
    api.apply(&pod("canary-1", "10.0.2.1", "web", true));
    api.apply(&slice("web-canary", &[("10.0.2.1", "canary-1")]));
    api.apply(&split_route());
}

/// The control-plane process, killed by its PID when the test ends.
struct ControlPlane {
    child: Child,
    addr: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `pillion-control serve --kubernetes` with `kubeconfig` (written into `dir`).
fn start_control_plane(kubeconfig: &str, dir: &support::TempDir) -> ControlPlane {
    std::fs::write(dir.path("kubeconfig"), kubeconfig).unwrap();
    std::fs::write(dir.path("tokens.yaml"), "[]\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_pillion-control");
    let ca = dir.path("ca");
    let status = Command::new(bin)
        .args(["ca", "init", "--out"])
        .arg(&ca)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars() {
        if key.starts_with("PILLION_") || key.starts_with("KUBERNETES_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .args(["serve", "--kubernetes", "--plaintext", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--issuer-cert")
        .arg(ca.join("issuer.crt"))
        .arg("--issuer-key")
        .arg(ca.join("issuer.key"))
        .arg("--trust-anchors")
        .arg(ca.join("root.crt"))
        .arg("--tokens")
        .arg(dir.path("tokens.yaml"))
        .env("KUBECONFIG", dir.path("kubeconfig"))
        .env("PILLION_LOG", "info,pillion_control=debug")
        .spawn()
        .unwrap();
    ControlPlane {
        child,
        addr: format!("http://127.0.0.1:{port}"),
    }
}

/// Connects once the control plane listens (it binds only after the cluster is listed).
async fn connect(plane: &ControlPlane) -> DiscoveryClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match DiscoveryClient::connect(plane.addr.clone()).await {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!("control plane not serving: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
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

/// Reads updates until one satisfies `want` (intermediate states may come first).
async fn until(
    stream: &mut Streaming<DestinationUpdate>,
    what: &str,
    want: impl Fn(&DestinationUpdate) -> bool,
) -> DestinationUpdate {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(update))) if want(&update) => return update,
            Ok(Ok(Some(_))) => continue,
            Ok(other) => panic!("{what}: stream ended: {other:?}"),
            Err(_) => panic!("{what}: no such update within 20s"),
        }
    }
}

fn endpoints(update: &DestinationUpdate) -> Vec<(&str, &str)> {
    update
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.identity.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_follows_the_cluster() {
    // HTTPS, as every API server: the control plane's kube client verifies it with the
    // kubeconfig's CA, over rustls with aws-lc-rs.
    let (ca_pem, cert_pem, key_pem) = support::serving_cert();
    let api = ApiServer::start_tls(&cert_pem, &key_pem).await;
    populate(&api);
    let dir = support::TempDir::new("kubernetes-mode");
    let plane = start_control_plane(&api.kubeconfig_with_ca(&ca_pem), &dir);
    let mut client = connect(&plane).await;

    let mut by_name = open(&mut client, "web.shop.svc.cluster.local:80").await;
    let mut by_ip = open(&mut client, "10.96.0.10:80").await;
    let first = until(&mut by_name, "initial state by name", |u| u.known).await;
    assert_eq!(
        endpoints(&first),
        [("10.0.0.1:8080", WEB_ID), ("10.0.0.2:8080", "")],
        "identity only for the pod running our proxy"
    );
    let route = &first.routes[0];
    assert_eq!(route.name, "shop/web-split/0");
    let split: Vec<(&str, u32)> = route
        .backend_refs
        .iter()
        .map(|b| (b.address.as_str(), b.weight))
        .collect();
    assert_eq!(split, [("10.0.1.1:8080", 80), ("10.0.2.1:8080", 20)]);
    let first_by_ip = until(&mut by_ip, "initial state by ClusterIP", |u| u.known).await;
    assert_eq!(endpoints(&first_by_ip), endpoints(&first));
    assert_eq!(first_by_ip.routes, first.routes);

    // The legacy pod is injected: its endpoint gets its identity.
    api.apply(&pod("legacy", "10.0.0.2", "legacy", true));
    let update = until(&mut by_name, "identity after injection", |u| {
        endpoints(u).contains(&("10.0.0.2:8080", LEGACY_ID))
    })
    .await;
    assert_eq!(update.endpoints.len(), 2);

    // web-a is deleted: the pod, then its endpoint, as the endpoints controller does.
    let deleted = Instant::now();
    api.delete::<Pod>("shop", "web-a");
    api.apply(&slice("web", &[("10.0.0.2", "legacy")]));
    let update = until(&mut by_ip, "endpoint removed", |u| u.endpoints.len() == 1).await;
    eprintln!("deleted pod left the ClusterIP stream after {:?}", deleted.elapsed());
    assert_eq!(endpoints(&update), [("10.0.0.2:8080", LEGACY_ID)]);

    // The watches drop; meanwhile a pod comes back and the canary goes away; the versions the
    // control plane would resume from are compacted, so it must relist to see them.
    api.pause_watches();
    api.apply(&pod("web-a", "10.0.0.1", "web", true));
    api.apply(&slice("web", &[("10.0.0.1", "web-a"), ("10.0.0.2", "legacy")]));
    api.delete::<Service>("shop", "web-canary");
    api.compact();
    api.resume_watches();
    let update = until(&mut by_name, "state after relist", |u| {
        u.routes.first().is_some_and(|r| r.backend_refs.len() == 1) && u.endpoints.len() == 2
    })
    .await;
    // Never an endpoint of a meshed pod without its identity, whichever kind relisted first.
    assert_eq!(
        endpoints(&update),
        [("10.0.0.1:8080", WEB_ID), ("10.0.0.2:8080", LEGACY_ID)]
    );
    assert_eq!(update.routes[0].backend_refs[0].address, "10.0.1.1:8080");

    // Deleting the Service makes both of its names unknown.
    api.delete::<Service>("shop", "web");
    until(&mut by_ip, "service deleted", |u| !u.known).await;
    until(&mut by_name, "service deleted", |u| !u.known).await;
    drop(plane);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_gateway_api_crds_services_are_still_served() {
    let api = ApiServer::start_without(
        Duration::from_millis(500),
        &["httproutes", "grpcroutes", "authorizationpolicies"],
    )
    .await;
    api.apply(&object::<Namespace>(json!({ "metadata": { "name": "shop" } })));
    api.apply(&service("web", "10.96.0.10"));
    api.apply(&pod("web-a", "10.0.0.1", "web", true));
    api.apply(&slice("web", &[("10.0.0.1", "web-a")]));
    let dir = support::TempDir::new("kubernetes-no-routes");
    let plane = start_control_plane(&api.kubeconfig(), &dir);
    let mut client = connect(&plane).await;
    let mut by_ip = open(&mut client, "10.96.0.10:80").await;
    let first = until(&mut by_ip, "initial state", |u| u.known).await;
    assert_eq!(endpoints(&first), [("10.0.0.1:8080", WEB_ID)]);
    assert!(first.routes.is_empty());
    // An address nothing names is unknown: the proxy forwards it to the original destination.
    let mut unknown = open(&mut client, "10.96.9.9:80").await;
    assert!(!until(&mut unknown, "unknown address", |_| true).await.known);
    // Without the AuthorizationPolicy CRD a pod's ports get the cluster default.
    let mut own = open(&mut client, "10.0.0.1:8080").await;
    let update = until(&mut own, "pod's own address", |_| true).await;
    assert!(matches!(
        update.inbound_authorization.and_then(|a| a.policy),
        Some(Authz::AllUnauthenticated(_))
    ));

    // SIGTERM: the watchers stop with the server, and the process exits 0.
    let mut plane = plane;
    let status = Command::new("kill")
        .args(["-TERM", &plane.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = plane.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "still running 20s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
}

fn authorization_policy(name: &str, spec: Value) -> AuthorizationPolicyObject {
    object(json!({ "metadata": { "namespace": "shop", "name": name }, "spec": spec }))
}

/// The authorization a pod's proxy is told for its own address (a plaintext watcher sees it).
fn inbound(update: &DestinationUpdate) -> Option<&Authz> {
    update.inbound_authorization.as_ref().and_then(|a| a.policy.as_ref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_mode_serves_each_pods_inbound_authorization() {
    let api = ApiServer::start().await;
    api.apply(&object::<Namespace>(json!({
        "metadata": { "name": "shop", "annotations": { "pillion.io/default-inbound-policy": "all-authenticated" } },
    })));
    let mut web = pod("web-a", "10.0.0.1", "web", true);
    web.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
    api.apply(&web);
    // A policy the control plane refuses is listed with the rest; it must not hide them.
    api.apply(&authorization_policy(
        "typo",
        json!({ "target": { "service": "web" }, "allow": [], "alow": [] }),
    ));
    api.apply(&authorization_policy(
        "web-from-api",
        json!({ "target": { "podSelector": { "matchLabels": { "app": "web" } }, "ports": [8080] },
                "allow": [{ "serviceAccounts": [{ "name": "api" }] }] }),
    ));
    let dir = support::TempDir::new("kubernetes-authz");
    let plane = start_control_plane(&api.kubeconfig(), &dir);
    let mut client = connect(&plane).await;

    let mut port = open(&mut client, "10.0.0.1:8080").await;
    let first = until(&mut port, "the policy's port", |u| inbound(u).is_some()).await;
    let Some(Authz::Allow(allow)) = inbound(&first) else {
        panic!("{first:?}")
    };
    assert_eq!(allow.identities, ["spiffe://cluster.local/ns/shop/sa/api"]);
    // Another port of the pod: the namespace's default.
    let mut other = open(&mut client, "10.0.0.1:9090").await;
    let update = until(&mut other, "another port", |u| inbound(u).is_some()).await;
    assert!(
        matches!(inbound(&update), Some(Authz::AllAuthenticated(_))),
        "{update:?}"
    );

    // A second policy for the port adds its clients; deleting both restores the default.
    api.apply(&authorization_policy(
        "web-open",
        json!({ "target": { "podSelector": { "matchLabels": { "app": "web" } } },
                "allow": [{ "unauthenticated": true }] }),
    ));
    until(&mut port, "union with an open policy", |u| {
        matches!(inbound(u), Some(Authz::AllUnauthenticated(_)))
    })
    .await;
    api.delete::<AuthorizationPolicyObject>("shop", "web-open");
    api.delete::<AuthorizationPolicyObject>("shop", "web-from-api");
    until(&mut port, "the default again", |u| {
        matches!(inbound(u), Some(Authz::AllAuthenticated(_)))
    })
    .await;
    drop(plane);
}

/// A replica whose API requests carry `token`, so the emulation tells who wrote what.
fn start_replica(api: &ApiServer, name: &str, token: &str) -> (ControlPlane, support::TempDir) {
    let dir = support::TempDir::new(name);
    let kubeconfig = api
        .kubeconfig()
        .replace("token: test-token", &format!("token: {token}"));
    (start_control_plane(&kubeconfig, &dir), dir)
}

/// Polls `check` every 100 ms until it gives a value, for at most `limit`.
async fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const CONTROLLER: &str = "pillion.io/mesh-controller";

/// Our entry in a route's `status.parents`, if any.
fn our_entry(route: &Value) -> Option<Value> {
    route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == CONTROLLER)
        .cloned()
}

/// An entry's conditions as `type → (status, reason)`.
fn conditions(entry: &Value) -> std::collections::BTreeMap<String, (String, String)> {
    entry["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("type"), (s("status"), s("reason")))
        })
        .collect()
}

fn condition(entry: &Value, type_: &str) -> (String, String) {
    conditions(entry).get(type_).cloned().unwrap_or_default()
}

fn pair(status: &str, reason: &str) -> (String, String) {
    (status.to_string(), reason.to_string())
}

/// Tokens of the replicas that wrote route status, in order.
fn status_writers(api: &ApiServer) -> Vec<String> {
    api.writes()
        .into_iter()
        .filter(|w| w.resource.ends_with("/status"))
        .map(|w| w.token)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_writes_route_status_and_another_takes_over() {
    use gateway_api::experimental::grpcroutes::GrpcRoute;
    use k8s_openapi::api::coordination::v1::Lease;

    let api = ApiServer::start().await;
    api.apply(&object::<Namespace>(json!({ "metadata": { "name": "shop" } })));
    api.apply(&service("web", "10.96.0.10"));
    api.apply(&service("web-stable", "10.96.0.11"));
    // web-canary, the route's other backend, does not exist yet.
    api.apply(&split_route());
    api.apply(&object::<GrpcRoute>(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": { "namespace": "shop", "name": "web-grpc" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{ "backendRefs": [{ "name": "web-stable", "port": 80 }] }],
        },
    })));
    // Another controller reports on the route too (a Gateway parent): its entry must stay.
    let foreign = json!({
        "parentRef": { "group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge" },
        "controllerName": "example.com/gateway",
        "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                         "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1 }],
    });
    assert!(api.write_status::<HttpRoute>("shop", "web-split", json!({ "parents": [foreign.clone()] })));

    let (plane_a, _dir_a) = start_replica(&api, "route-status-a", "replica-a");
    let (plane_b, _dir_b) = start_replica(&api, "route-status-b", "replica-b");
    let route = |name: &str| api.get::<HttpRoute>("shop", name).unwrap();

    let entry = eventually("the route's status", Duration::from_secs(60), || {
        our_entry(&route("web-split")).filter(|e| conditions(e).len() == 2)
    })
    .await;
    assert_eq!(condition(&entry, "Accepted"), pair("True", "Accepted"));
    assert_eq!(condition(&entry, "ResolvedRefs"), pair("False", "BackendNotFound"));
    assert_eq!(
        entry["parentRef"],
        json!({ "group": "", "kind": "Service", "name": "web", "port": 80 })
    );
    let generation = route("web-split")["metadata"]["generation"].clone();
    assert!(
        entry["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["observedGeneration"] == generation)
    );
    let parents = route("web-split")["status"]["parents"].clone();
    assert!(parents.as_array().unwrap().contains(&foreign), "{parents}");
    let grpc = eventually("the GRPCRoute's status", Duration::from_secs(20), || {
        api.get::<GrpcRoute>("shop", "web-grpc").and_then(|r| our_entry(&r))
    })
    .await;
    assert_eq!(condition(&grpc, "Accepted"), pair("True", "Accepted"));
    assert_eq!(condition(&grpc, "ResolvedRefs"), pair("True", "ResolvedRefs"));

    // The backend Service appears.
    api.apply(&service("web-canary", "10.96.0.12"));
    let entry = eventually(
        "ResolvedRefs after the backend appears",
        Duration::from_secs(20),
        || our_entry(&route("web-split")).filter(|e| condition(e, "ResolvedRefs") == pair("True", "ResolvedRefs")),
    )
    .await;
    assert_eq!(condition(&entry, "Accepted"), pair("True", "Accepted"));

    // One replica wrote it all, and it holds the Lease.
    let writers = status_writers(&api);
    let holder = writers[0].clone();
    assert!(writers.iter().all(|w| *w == holder), "{writers:?}");
    let lease = eventually("the Lease", Duration::from_secs(5), || {
        api.get::<Lease>("default", "pillion-control-status")
    })
    .await;
    let identity = lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string();
    assert!(!identity.is_empty(), "{lease}");
    // Nothing left to say: nothing more is written while both replicas run (and renew).
    let written = writers.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        status_writers(&api).len(),
        written,
        "an unchanged status is not rewritten"
    );

    // The holder dies without giving the Lease up (SIGKILL); the route changes meanwhile.
    let (survivor, survivor_token) = if holder == "replica-a" {
        drop(plane_a);
        (plane_b, "replica-b")
    } else {
        drop(plane_b);
        (plane_a, "replica-a")
    };
    let killed = Instant::now();
    let mut changed = split_route();
    changed.spec.rules.as_mut().unwrap()[0].backend_refs.as_mut().unwrap()[0].weight = Some(50);
    api.apply(&changed);
    let new_generation = route("web-split")["metadata"]["generation"].as_i64().unwrap();
    assert_eq!(Some(new_generation), generation.as_i64().map(|g| g + 1));
    // Taken over once the Lease (15 s) has not been renewed for its duration.
    let entry = eventually("the survivor's status write", Duration::from_secs(60), || {
        our_entry(&route("web-split"))
            .filter(|e| e["conditions"][0]["observedGeneration"].as_i64() == Some(new_generation))
    })
    .await;
    eprintln!(
        "the other replica wrote status {:?} after the holder was killed",
        killed.elapsed()
    );
    assert_eq!(condition(&entry, "Accepted"), pair("True", "Accepted"));
    assert_eq!(status_writers(&api).last().map(String::as_str), Some(survivor_token));
    let lease = api.get::<Lease>("default", "pillion-control-status").unwrap();
    assert_ne!(lease["spec"]["holderIdentity"].as_str().unwrap_or_default(), identity);
    assert!(
        route("web-split")["status"]["parents"]
            .as_array()
            .unwrap()
            .contains(&foreign)
    );
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_gives_the_lease_up_on_sigterm() {
    use k8s_openapi::api::coordination::v1::Lease;

    let api = ApiServer::start().await;
    api.apply(&object::<Namespace>(json!({ "metadata": { "name": "shop" } })));
    api.apply(&service("web", "10.96.0.10"));
    api.apply(&split_route());
    let (mut plane, _dir) = start_replica(&api, "lease-release", "replica-a");
    let holder = |lease: &Value| lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string();
    let lease = eventually("the Lease held", Duration::from_secs(60), || {
        api.get::<Lease>("default", "pillion-control-status")
            .filter(|l| !holder(l).is_empty())
    })
    .await;
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);

    let status = Command::new("kill")
        .args(["-TERM", &plane.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = plane.child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "still running 20s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit}");
    // Given up before exiting: another replica need not wait for it to expire.
    let lease = api.get::<Lease>("default", "pillion-control-status").unwrap();
    assert_eq!(holder(&lease), "", "{lease}");
    let puts = api.writes().into_iter().filter(|w| w.resource == "leases").count();
    assert!(puts >= 2, "created, then given up");
}
