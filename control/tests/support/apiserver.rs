//! A test-only emulation of the Kubernetes API server's list/watch protocol over HTTP, for the
//! kinds the control plane reads (Namespaces, Pods, Services, EndpointSlices, HTTP and gRPC routes,
//! AuthorizationPolicies), and the few writes it makes (Leases, route status).
//!
//! What it does as kube-apiserver does (checked against the official Python client and kube-rs):
//! one resourceVersion counter for every object; LIST with `limit`/`continue` pages (a continue
//! token older than the last compaction is `410 Gone`); WATCH as a chunked stream of JSON lines
//! (`ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK` when asked, `timeoutSeconds`), replaying the events
//! after the requested resourceVersion; a watch from a compacted version is answered 200 and one
//! `ERROR` event carrying a `Status` with code 410, which is what makes clients relist.
//! Objects are serialized from the k8s-openapi / gateway-api types themselves.
//!
//! It serves plain HTTP, or HTTPS with a given certificate ([`ApiServer::start_tls`]).
//! Test controls: [`ApiServer::pause_watches`] ends every open watch and holds new ones (an API
//! server restart), [`ApiServer::compact`] makes every past version too old, and
//! [`ApiServer::resume_watches`] lets the held watches through. `metadata.generation` starts at 1
//! and grows when anything but metadata and status changes.
//!
//! Writes over HTTP, only where the control plane makes them: GET of one object; POST (create,
//! 409 AlreadyExists) and PUT (replace, 409 Conflict when the body's resourceVersion is not the
//! stored one) of coordination.k8s.io/v1 Leases; and PATCH of the `status` subresource of
//! HTTPRoutes and GRPCRoutes with a JSON merge patch (`application/merge-patch+json`: only
//! `status` is changed; a `metadata.resourceVersion` in the patch is a precondition, 409 when
//! stale). As for a CRD with a status subresource, [`ApiServer::apply`] of a route keeps the
//! stored status (a test writes one as another controller would with
//! [`ApiServer::write_status`]). Every HTTP write is recorded with its bearer token
//! ([`ApiServer::writes`]). Not emulated: discovery documents, label and field selectors, other
//! writes (tests write through [`ApiServer::apply`]), and the pods' status subresource (a test
//! writes a pod's status as the kubelet would).

#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

type Body = BoxBody<Bytes, Infallible>;

/// A kind the emulation serves.
struct ResourceType {
    /// `/api/v1` or `/apis/<group>/<version>`.
    prefix: &'static str,
    plural: &'static str,
    kind: &'static str,
    api_version: &'static str,
    namespaced: bool,
}

const RESOURCES: [ResourceType; 8] = [
    ResourceType {
        prefix: "/api/v1",
        plural: "namespaces",
        kind: "Namespace",
        api_version: "v1",
        namespaced: false,
    },
    ResourceType {
        prefix: "/api/v1",
        plural: "pods",
        kind: "Pod",
        api_version: "v1",
        namespaced: true,
    },
    ResourceType {
        prefix: "/api/v1",
        plural: "services",
        kind: "Service",
        api_version: "v1",
        namespaced: true,
    },
    ResourceType {
        prefix: "/apis/discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        namespaced: true,
    },
    ResourceType {
        prefix: "/apis/gateway.networking.k8s.io/v1",
        plural: "httproutes",
        kind: "HTTPRoute",
        api_version: "gateway.networking.k8s.io/v1",
        namespaced: true,
    },
    ResourceType {
        prefix: "/apis/gateway.networking.k8s.io/v1",
        plural: "grpcroutes",
        kind: "GRPCRoute",
        api_version: "gateway.networking.k8s.io/v1",
        namespaced: true,
    },
    ResourceType {
        prefix: "/apis/policy.pillion.io/v1alpha1",
        plural: "authorizationpolicies",
        kind: "AuthorizationPolicy",
        api_version: "policy.pillion.io/v1alpha1",
        namespaced: true,
    },
    ResourceType {
        prefix: "/apis/coordination.k8s.io/v1",
        plural: "leases",
        kind: "Lease",
        api_version: "coordination.k8s.io/v1",
        namespaced: true,
    },
];

/// Kinds whose status is written only through `/status` (route CRDs with a status subresource).
const STATUS_SUBRESOURCE: [&str; 2] = ["httproutes", "grpcroutes"];

/// One write made over HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub method: String,
    /// `leases`, `httproutes/status`, …
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// The bearer token it came with: which client wrote.
    pub token: String,
}

/// The emulated API server, serving on a loopback port until dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    https: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change, pause and resume: open watches look again.
    notify: watch::Sender<u64>,
    bookmark_interval: Duration,
    /// Resources answered 404, as by an API server without their CRD.
    missing: Vec<&'static str>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// Versions below this are gone from the "watch cache".
    compacted: u64,
    /// Open watches end, new ones wait, while set.
    paused: bool,
    /// Bumped by a pause: watches opened before it end.
    generation: u64,
    objects: HashMap<&'static str, BTreeMap<(String, String), Value>>,
    /// Every event: (version, plural, type, object).
    log: Vec<(u64, &'static str, &'static str, Value)>,
    uid: u64,
    writes: Vec<Write>,
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        Self::start_with(Duration::from_millis(500)).await
    }

    /// `bookmark_interval`: how often a watch that asked for bookmarks gets one.
    pub async fn start_with(bookmark_interval: Duration) -> ApiServer {
        Self::start_without(bookmark_interval, &[]).await
    }

    /// An API server that does not serve the `missing` resources (plural names): no CRD for them.
    pub async fn start_without(bookmark_interval: Duration, missing: &[&'static str]) -> ApiServer {
        Self::start_full(bookmark_interval, missing, None).await
    }

    /// Serving HTTPS with this certificate chain and key (PEM), as a real API server does;
    /// [`kubeconfig_with_ca`](Self::kubeconfig_with_ca) tells clients the CA.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> ApiServer {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        Self::start_full(Duration::from_millis(500), &[], Some(acceptor)).await
    }

    async fn start_full(
        bookmark_interval: Duration,
        missing: &[&'static str],
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                resource_version: 100,
                ..State::default()
            }),
            notify: watch::channel(0).0,
            bookmark_interval,
            missing: missing.to_vec(),
        });
        let serving = shared.clone();
        let https = tls.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let shared = serving.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_connection(stream, shared).await;
                            }
                        }
                        None => serve_connection(tcp, shared).await,
                    }
                });
            }
        });
        ApiServer {
            addr,
            shared,
            task,
            https,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig that points clients here.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_lines("")
    }

    /// A kubeconfig that points clients here and trusts `ca_pem` for the server's certificate.
    pub fn kubeconfig_with_ca(&self, ca_pem: &str) -> String {
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        self.kubeconfig_lines(&format!("    certificate-authority-data: {data}\n"))
    }

    fn kubeconfig_lines(&self, cluster_extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulated\n  cluster:\n    server: {}\n{cluster_extra}users:\n- name: test\n  user:\n    token: test-token\ncontexts:\n- name: emulated\n  context:\n    cluster: emulated\n    user: test\ncurrent-context: emulated\n",
            self.url()
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED), as `kubectl apply` would.
    pub fn apply<K>(&self, object: &K) -> u64
    where
        K: kube::Resource<DynamicType = ()> + serde::Serialize,
    {
        let plural = plural_of::<K>();
        let mut value = serde_json::to_value(object).unwrap();
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        let mut state = self.shared.state.lock().unwrap();
        let (rv, _) = store(&mut state, plural, value);
        drop(state);
        self.shared.notify.send_modify(|n| *n += 1);
        rv
    }

    /// The stored object, as a GET would answer it.
    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<Value>
    where
        K: kube::Resource<DynamicType = ()>,
    {
        let state = self.shared.state.lock().unwrap();
        let objects = state.objects.get(plural_of::<K>())?;
        objects.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    /// Replaces an object's `status` as another controller would through `/status` (MODIFIED).
    pub fn write_status<K>(&self, namespace: &str, name: &str, status: Value) -> bool
    where
        K: kube::Resource<DynamicType = ()>,
    {
        let plural = plural_of::<K>();
        let mut state = self.shared.state.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        let Some(mut value) = state.objects.get(plural).and_then(|o| o.get(&key)).cloned() else {
            return false;
        };
        value["status"] = status;
        write_status_locked(&mut state, plural, key, value);
        drop(state);
        self.shared.notify.send_modify(|n| *n += 1);
        true
    }

    /// The writes made over HTTP so far, oldest first.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.state.lock().unwrap().writes.clone()
    }

    /// Deletes an object (DELETED, carrying its last state at a new version).
    pub fn delete<K>(&self, namespace: &str, name: &str) -> bool
    where
        K: kube::Resource<DynamicType = ()>,
    {
        let plural = plural_of::<K>();
        let mut state = self.shared.state.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        let Some(mut value) = state.objects.entry(plural).or_default().remove(&key) else {
            return false;
        };
        state.resource_version += 1;
        let rv = state.resource_version;
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.log.push((rv, plural, "DELETED", value));
        drop(state);
        self.shared.notify.send_modify(|n| *n += 1);
        true
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().unwrap().resource_version
    }

    /// Every version before the current one becomes too old to watch from (410).
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.compacted = state.resource_version;
    }

    /// Ends every open watch and holds new ones until [`resume_watches`](Self::resume_watches).
    pub fn pause_watches(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.paused = true;
        state.generation += 1;
        drop(state);
        self.shared.notify.send_modify(|n| *n += 1);
    }

    pub fn resume_watches(&self) {
        self.shared.state.lock().unwrap().paused = false;
        self.shared.notify.send_modify(|n| *n += 1);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
        // Open watch streams end when their connection tasks see the server gone.
        self.pause_watches();
    }
}

async fn serve_connection<IO>(io: IO, shared: Arc<Shared>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

fn plural_of<K: kube::Resource<DynamicType = ()>>() -> &'static str {
    let kind = K::kind(&());
    RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .map(|r| r.plural)
        .unwrap_or_else(|| panic!("the emulated API server does not serve {kind}"))
}

/// Creates or replaces an object as the API server stores it: a new resourceVersion, the uid and
/// creation time kept, the generation bumped when anything but metadata and status changed, and
/// the stored status kept for kinds with a status subresource. Returns its version and whether
/// it was created.
fn store(state: &mut State, plural: &'static str, mut value: Value) -> (u64, bool) {
    let key = key_of(&value);
    state.resource_version += 1;
    state.uid += 1;
    let rv = state.resource_version;
    let uid = state.uid;
    let objects = state.objects.entry(plural).or_default();
    let previous = objects.get(&key).cloned();
    if STATUS_SUBRESOURCE.contains(&plural) {
        match previous.as_ref().and_then(|p| p.get("status")) {
            Some(status) => value["status"] = status.clone(),
            None => {
                if let Some(obj) = value.as_object_mut() {
                    obj.remove("status");
                }
            }
        }
    }
    let meta = &mut value["metadata"];
    meta["resourceVersion"] = json!(rv.to_string());
    match &previous {
        Some(p) => {
            meta["uid"] = p["metadata"]["uid"].clone();
            meta["creationTimestamp"] = p["metadata"]["creationTimestamp"].clone();
            let generation = p["metadata"]["generation"].as_i64().unwrap_or(1);
            let changed = without_meta_and_status(p) != without_meta_and_status(&value);
            value["metadata"]["generation"] = json!(generation + i64::from(changed));
        }
        None => {
            meta["uid"] = json!(format!("00000000-0000-0000-0000-{uid:012}"));
            if meta.get("creationTimestamp").is_none_or(Value::is_null) {
                meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            meta["generation"] = json!(1);
        }
    }
    objects.insert(key, value.clone());
    let kind = if previous.is_some() { "MODIFIED" } else { "ADDED" };
    state.log.push((rv, plural, kind, value));
    (rv, previous.is_none())
}

fn without_meta_and_status(value: &Value) -> Value {
    let mut value = value.clone();
    if let Some(obj) = value.as_object_mut() {
        obj.remove("metadata");
        obj.remove("status");
    }
    value
}

/// Stores a status change: a new resourceVersion, nothing else (the generation stays).
fn write_status_locked(state: &mut State, plural: &'static str, key: (String, String), mut value: Value) -> u64 {
    state.resource_version += 1;
    let rv = state.resource_version;
    value["metadata"]["resourceVersion"] = json!(rv.to_string());
    state.objects.entry(plural).or_default().insert(key, value.clone());
    state.log.push((rv, plural, "MODIFIED", value));
    rv
}

fn key_of(value: &Value) -> (String, String) {
    let meta = &value["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().expect("metadata.name").to_string(),
    )
}

/// Which resource a path names, and the namespace it is limited to.
fn route(path: &str) -> Option<(&'static ResourceType, Option<String>)> {
    match target(path)? {
        (resource, namespace, None, None) => Some((resource, namespace)),
        _ => None,
    }
}

/// A path's resource, namespace, object name and subresource (`status`).
type Target = (&'static ResourceType, Option<String>, Option<String>, Option<String>);

fn target(path: &str) -> Option<Target> {
    for resource in &RESOURCES {
        let Some(rest) = path.strip_prefix(resource.prefix) else {
            continue;
        };
        let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
        let own = |s: &&str| s.to_string();
        match segments.as_slice() {
            [plural] if *plural == resource.plural => return Some((resource, None, None, None)),
            ["namespaces", ns, plural, item @ ..] if *plural == resource.plural && resource.namespaced => {
                let (name, sub) = match item {
                    [] => (None, None),
                    [name] => (Some(own(name)), None),
                    [name, sub] => (Some(own(name)), Some(own(sub))),
                    _ => return None,
                };
                return Some((resource, Some(ns.to_string()), name, sub));
            }
            _ => {}
        }
    }
    None
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect()
        })
        .unwrap_or_default();
    let found = target(req.uri().path()).filter(|(r, ..)| !shared.missing.contains(&r.plural));
    let Some((resource, namespace, name, sub)) = found else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} not found", req.uri().path()),
        );
    };
    if name.is_some() || req.method() != http::Method::GET {
        return write(shared, req, resource, namespace.unwrap_or_default(), name, sub).await;
    }
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if watching {
        watch_stream(shared, resource, namespace, &query).await
    } else {
        list(&shared, resource, namespace, &query)
    }
}

/// GET of one object, and the writes the control plane makes (see the module's doc).
async fn write(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    resource: &'static ResourceType,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
) -> Response<Body> {
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let plural = resource.plural;
    let lease = plural == "leases";
    let status_patch = STATUS_SUBRESOURCE.contains(&plural) && sub.as_deref() == Some("status");
    let allowed = match (&method, &name, &sub) {
        (&http::Method::GET, Some(_), None) => true,
        (&http::Method::POST, None, None) | (&http::Method::PUT, Some(_), None) => lease,
        (&http::Method::PATCH, Some(_), Some(_)) => status_patch,
        _ => false,
    };
    if !allowed {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not emulated: list, watch, get, Lease create/replace and route status merge patch only",
        );
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "cannot read the body");
    };
    let body: Value = if method == http::Method::GET {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("not JSON: {e}")),
        }
    };
    let mut state = shared.state.lock().unwrap();
    let key = (namespace.clone(), name.clone().unwrap_or_default());
    let stored = state.objects.get(plural).and_then(|o| o.get(&key)).cloned();
    let not_found = || {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{plural} \"{}\" not found", key.1),
        )
    };
    let record = |state: &mut State, name: &str| {
        state.writes.push(Write {
            method: method.to_string(),
            resource: match &sub {
                Some(sub) => format!("{plural}/{sub}"),
                None => plural.to_string(),
            },
            namespace: namespace.clone(),
            name: name.to_string(),
            token: token.clone(),
        })
    };
    let conflict = |name: &str| {
        status(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {plural}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                resource.api_version.split('/').next().unwrap_or_default()
            ),
        )
    };
    let response = match method {
        http::Method::GET => match stored {
            Some(object) => return json_response(StatusCode::OK, &object),
            None => return not_found(),
        },
        http::Method::POST => {
            let mut object = body;
            object["apiVersion"] = json!(resource.api_version);
            object["kind"] = json!(resource.kind);
            object["metadata"]["namespace"] = json!(namespace);
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name is required");
            };
            if state
                .objects
                .get(plural)
                .is_some_and(|o| o.contains_key(&(namespace.clone(), name.clone())))
            {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{plural} \"{name}\" already exists"),
                );
            }
            record(&mut state, &name);
            store(&mut state, plural, object);
            let created = state.objects[plural][&(namespace.clone(), name)].clone();
            json_response(StatusCode::CREATED, &created)
        }
        http::Method::PUT => {
            let Some(stored) = stored else { return not_found() };
            let mut object = body;
            let wanted = object["metadata"]["resourceVersion"].as_str().map(str::to_string);
            if wanted.is_some_and(|rv| Some(rv.as_str()) != stored["metadata"]["resourceVersion"].as_str()) {
                return conflict(&key.1);
            }
            object["apiVersion"] = json!(resource.api_version);
            object["kind"] = json!(resource.kind);
            object["metadata"]["namespace"] = json!(namespace);
            object["metadata"]["name"] = json!(key.1);
            record(&mut state, &key.1);
            store(&mut state, plural, object);
            json_response(StatusCode::OK, &state.objects[plural][&key].clone())
        }
        _ => {
            // PATCH of /status.
            if content_type.split(';').next() != Some("application/merge-patch+json") {
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!("the emulation takes merge patches only, not {content_type}"),
                );
            }
            let Some(mut object) = stored else { return not_found() };
            let wanted = body["metadata"]["resourceVersion"].as_str();
            if wanted.is_some_and(|rv| Some(rv) != object["metadata"]["resourceVersion"].as_str()) {
                return conflict(&key.1);
            }
            // The status subresource changes status only, whatever else the patch says.
            if let Some(patch) = body.get("status") {
                merge_patch(&mut object["status"], patch);
            }
            record(&mut state, &key.1);
            write_status_locked(&mut state, plural, key.clone(), object);
            json_response(StatusCode::OK, &state.objects[plural][&key].clone())
        }
    };
    drop(state);
    shared.notify.send_modify(|n| *n += 1);
    response
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn list(
    shared: &Shared,
    resource: &'static ResourceType,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let state = shared.state.lock().unwrap();
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    // The continue token: the list's version and the last key returned.
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some((rv, key)) = token
                .split_once('|')
                .and_then(|(rv, key)| Some((rv.parse::<u64>().ok()?, key)))
            else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token");
            };
            if rv < state.compacted {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                );
            }
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            (rv, Some((ns.to_string(), name.to_string())))
        }
        None => (state.resource_version, None),
    };
    let empty = BTreeMap::new();
    let objects = state.objects.get(resource.plural).unwrap_or(&empty);
    let mut items: Vec<(&(String, String), &Value)> = objects
        .iter()
        .filter(|((ns, _), _)| namespace.as_ref().is_none_or(|want| want == ns))
        .filter(|(key, _)| after.as_ref().is_none_or(|after| *key > after))
        .collect();
    let mut next = String::new();
    if let Some(limit) = limit
        && items.len() > limit
    {
        items.truncate(limit);
        let (ns, name) = items[limit - 1].0;
        next = format!("{list_rv}|{ns}/{name}");
    }
    let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
    if !next.is_empty() {
        metadata["continue"] = json!(next);
        metadata["remainingItemCount"] = json!(objects.len().saturating_sub(items.len()));
    }
    let body = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version,
        "metadata": metadata,
        "items": items.into_iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
    });
    json_response(StatusCode::OK, &body)
}

async fn watch_stream(
    shared: Arc<Shared>,
    resource: &'static ResourceType,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    // A paused server holds new watches, as a restarting one would not answer yet.
    let mut notify = shared.notify.subscribe();
    while shared.state.lock().unwrap().paused {
        if notify.changed().await.is_err() {
            return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "shutting down");
        }
    }
    let from = query
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && rv.as_str() != "0")
        .map(|rv| rv.parse::<u64>());
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(256);
    let line = |value: Value| {
        let mut text = serde_json::to_vec(&value).unwrap();
        text.push(b'\n');
        Ok(Frame::data(Bytes::from(text)))
    };
    let in_scope = move |obj: &Value| {
        namespace
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
    };
    let (mut last, generation, initial) = {
        let state = shared.state.lock().unwrap();
        match from {
            Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid resourceVersion"),
            Some(Ok(rv)) if rv < state.compacted => {
                // kube-apiserver's watch cache: 200, then one ERROR event, then the end.
                let gone = json!({ "type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {rv} ({})", state.compacted),
                    "reason": "Expired", "code": 410,
                }});
                let _ = tx.try_send(line(gone));
                drop(tx);
                return streaming(rx);
            }
            Some(Ok(rv)) => (rv, state.generation, Vec::new()),
            // No version: the current objects as ADDED, then what follows.
            None => {
                let objects: Vec<Value> = state
                    .objects
                    .get(resource.plural)
                    .map(|o| o.values().filter(|v| in_scope(v)).cloned().collect())
                    .unwrap_or_default();
                (state.resource_version, state.generation, objects)
            }
        }
    };
    tokio::spawn(async move {
        for object in initial {
            if tx
                .send(line(json!({ "type": "ADDED", "object": object })))
                .await
                .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval(shared.bookmark_interval);
        ticks.tick().await;
        let mut bookmark_due = false;
        loop {
            let (events, now, ended) = {
                let state = shared.state.lock().unwrap();
                let events: Vec<(&'static str, Value)> = state
                    .log
                    .iter()
                    .filter(|(rv, plural, _, obj)| *rv > last && *plural == resource.plural && in_scope(obj))
                    .map(|(_, _, kind, obj)| (*kind, obj.clone()))
                    .collect();
                (events, state.resource_version, state.generation != generation)
            };
            if ended {
                return;
            }
            for (kind, object) in events {
                if tx.send(line(json!({ "type": kind, "object": object }))).await.is_err() {
                    return;
                }
            }
            last = last.max(now);
            if bookmark_due {
                bookmark_due = false;
                let bookmark = json!({ "type": "BOOKMARK", "object": {
                    "kind": resource.kind, "apiVersion": resource.api_version,
                    "metadata": { "resourceVersion": last.to_string(),
                                  "annotations": { "k8s.io/initial-events-end": "true" } },
                }});
                if tx.send(line(bookmark)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = notify.changed() => if changed.is_err() { return },
                _ = ticks.tick(), if bookmarks => bookmark_due = true,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    streaming(rx)
}

fn streaming(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .unwrap()
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    json_response(code, &body)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
