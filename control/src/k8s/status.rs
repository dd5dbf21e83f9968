//! Route status: the `Accepted` and `ResolvedRefs` conditions of every HTTPRoute and GRPCRoute
//! whose parentRefs name a Service, in `status.parents[]` under [`CONTROLLER_NAME`], as every
//! Gateway API implementation reports them.
//!
//! ```text
//! index thread   watcher events → RouteSources (every route, served or refused) → pending()
//! writer task    while this replica holds the Lease (lease.rs): merge patch of /status
//! ```
//!
//! What a route's entries should say is pure ([`pending`]: the index's routes, its refusals and
//! its Services in, the routes whose status differs out), so it is tested with watcher events.
//! Every replica computes it; only the Lease holder writes. A write is a JSON merge patch of
//! `status.parents` carrying the `resourceVersion` it was computed from: `parents` is replaced
//! whole, so the entries of other controllers are written back as they were, and a concurrent
//! change by one of them makes ours fail with 409 instead of erasing theirs (the watch then
//! brings the new version and the write is computed again). A route whose entries already say
//! what they should is never written.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::watcher::Event,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::index::{Index, Indexed, Kind, ObjectKey};

/// Our name in `status.parents[].controllerName`.
pub const CONTROLLER_NAME: &str = "pillion.io/mesh-controller";
/// Gateway API's limit on `status.parents`.
const MAX_PARENTS: usize = 32;
/// First wait before retrying writes that failed (doubling up to [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A route of either kind.
pub type RouteRef = (Kind, ObjectKey);

/// What is kept of each route whose status concerns us (it names a Service parent, or carries
/// an entry of ours), whether or not the index serves it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSource {
    pub generation: Option<i64>,
    /// The version the status was read at: a write's precondition.
    pub resource_version: Option<String>,
    /// The parentRefs naming a Service, as written.
    pub parents: Vec<ParentRef>,
    /// Every rule's backendRefs.
    pub backends: Vec<BackendSource>,
    /// `status.parents` as read, every controller's.
    pub status: Vec<RouteParentStatus>,
}

/// `parentRef` as Gateway API spells it (the same for HTTPRoute and GRPCRoute).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// One entry of `status.parents`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: ParentRef,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A backendRef's identity, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct BackendSource {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// The routes' sources, with a relist collected apart until complete (as the index's stores).
#[derive(Default)]
pub struct RouteSources {
    current: HashMap<RouteRef, RouteSource>,
    relist: HashMap<Kind, HashMap<ObjectKey, RouteSource>>,
}

/// A route whose status should change: what it was read as, and our entries as they should be
/// (conditions without transition times, which [`merged`] fills in).
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite {
    pub resource_version: Option<String>,
    pub current: Vec<RouteParentStatus>,
    pub ours: Vec<RouteParentStatus>,
}

/// Every route whose status should change.
pub type Pending = BTreeMap<RouteRef, StatusWrite>;

impl RouteSources {
    /// Follows one watcher event of any kind (only routes give a source).
    pub fn observe<K: Indexed>(&mut self, event: &Event<K>) {
        // Pod and EndpointSlice churn is most of the events: not a key built for them.
        if !matches!(K::KIND, Kind::HttpRoute | Kind::GrpcRoute) {
            return;
        }
        let key = |obj: &K| ObjectKey::new(&obj.namespace().unwrap_or_default(), &obj.name_any());
        match event {
            Event::Apply(obj) => match obj.status_source() {
                Some(source) => {
                    self.current.insert((K::KIND, key(obj)), source);
                }
                None => {
                    self.current.remove(&(K::KIND, key(obj)));
                }
            },
            Event::Delete(obj) => {
                self.current.remove(&(K::KIND, key(obj)));
            }
            Event::Init => {
                self.relist.insert(K::KIND, HashMap::new());
            }
            Event::InitApply(obj) => {
                if let Some(source) = obj.status_source() {
                    self.relist.entry(K::KIND).or_default().insert(key(obj), source);
                }
            }
            Event::InitDone => {
                let listed = self.relist.remove(&K::KIND).unwrap_or_default();
                self.current.retain(|(kind, _), _| *kind != K::KIND);
                self.current
                    .extend(listed.into_iter().map(|(key, source)| ((K::KIND, key), source)));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }
}

impl RouteSource {
    pub fn of_http(route: &HttpRoute) -> Option<RouteSource> {
        let status = route.status.as_ref().map(|s| &s.parents);
        Self::from_json(
            route.metadata.generation,
            route.resource_version(),
            serde_json::to_value(&route.spec.parent_refs).ok(),
            serde_json::to_value(&route.spec.rules).ok(),
            status.and_then(|s| serde_json::to_value(s).ok()),
        )
    }

    pub fn of_grpc(route: &GrpcRoute) -> Option<RouteSource> {
        let status = route.status.as_ref().map(|s| &s.parents);
        Self::from_json(
            route.metadata.generation,
            route.resource_version(),
            serde_json::to_value(&route.spec.parent_refs).ok(),
            serde_json::to_value(&route.spec.rules).ok(),
            status.and_then(|s| serde_json::to_value(s).ok()),
        )
    }

    /// The two kinds' fields have the same JSON; `None` when the route is none of our business.
    fn from_json(
        generation: Option<i64>,
        resource_version: Option<String>,
        parent_refs: Option<Value>,
        rules: Option<Value>,
        status: Option<Value>,
    ) -> Option<RouteSource> {
        let parents: Vec<ParentRef> = parent_refs
            .and_then(|p| serde_json::from_value::<Option<Vec<ParentRef>>>(p).ok())
            .flatten()
            .unwrap_or_default()
            .into_iter()
            .filter(is_service)
            .collect();
        let status: Vec<RouteParentStatus> = status
            .and_then(|s| serde_json::from_value::<Option<Vec<RouteParentStatus>>>(s).ok())
            .flatten()
            .unwrap_or_default();
        if parents.is_empty() && !status.iter().any(|p| p.controller_name == CONTROLLER_NAME) {
            return None;
        }
        let mut backends = Vec::new();
        for rule in rules.as_ref().and_then(Value::as_array).into_iter().flatten() {
            for backend in rule["backendRefs"].as_array().into_iter().flatten() {
                if let Ok(b) = serde_json::from_value::<BackendSource>(backend.clone()) {
                    backends.push(b);
                }
            }
        }
        Some(RouteSource {
            generation,
            resource_version,
            parents,
            backends,
            status,
        })
    }
}

/// A parentRef naming a Service (route.rs's test: `kind: Service` in the core group).
fn is_service(parent: &ParentRef) -> bool {
    parent.kind.as_deref() == Some("Service") && matches!(parent.group.as_deref(), Some("" | "core"))
}

/// Every route whose entries of ours differ from what they should say.
pub fn pending(index: &Index) -> Pending {
    let mut pending = Pending::new();
    for ((kind, key), source) in &index.route_sources().current {
        let ours = desired(index, *kind, key, source);
        let current: Vec<&RouteParentStatus> = source
            .status
            .iter()
            .filter(|p| p.controller_name == CONTROLLER_NAME)
            .collect();
        let same = current.len() == ours.len() && current.iter().zip(&ours).all(|(c, o)| same_entry(c, o));
        if !same {
            pending.insert(
                (*kind, key.clone()),
                StatusWrite {
                    resource_version: source.resource_version.clone(),
                    current: source.status.clone(),
                    ours,
                },
            );
        }
    }
    pending
}

/// Our entries for one route: one per Service parentRef.
fn desired(index: &Index, kind: Kind, key: &ObjectKey, source: &RouteSource) -> Vec<RouteParentStatus> {
    let rejected = index.rejected().get(&(kind, key.clone()));
    let resolved = resolved_refs(index, key, &source.backends);
    source
        .parents
        .iter()
        .map(|parent| {
            let namespace = parent.namespace.as_deref().unwrap_or(&key.namespace);
            let service = ObjectKey::new(namespace, &parent.name);
            let accepted = match rejected {
                Some(reason) => ("False", "UnsupportedValue", format!("not served: {reason}")),
                None if !index.has_service(&service) => (
                    "False",
                    "NoMatchingParent",
                    format!("parent Service {service} does not exist"),
                ),
                None => ("True", "Accepted", "served by the mesh".to_string()),
            };
            RouteParentStatus {
                parent_ref: parent.clone(),
                controller_name: CONTROLLER_NAME.to_string(),
                conditions: vec![
                    condition("Accepted", accepted, source.generation),
                    condition("ResolvedRefs", resolved.clone(), source.generation),
                ],
            }
        })
        .collect()
}

/// `ResolvedRefs` of the whole route: the first problem found, in the order Gateway API lists
/// the reasons (a kind we cannot use, a reference not permitted, a Service that does not exist).
fn resolved_refs(index: &Index, key: &ObjectKey, backends: &[BackendSource]) -> (&'static str, &'static str, String) {
    let mut not_permitted = None;
    let mut not_found = None;
    for backend in backends {
        let kind = backend.kind.as_deref().unwrap_or("Service");
        let group = backend.group.as_deref().unwrap_or("");
        if kind != "Service" || !matches!(group, "" | "core") {
            let message = format!(
                "backendRef {}: kind {kind} in group `{group}` is not supported (only Services)",
                backend.name
            );
            return ("False", "InvalidKind", message);
        }
        let namespace = backend.namespace.as_deref().unwrap_or(&key.namespace);
        let service = ObjectKey::new(namespace, &backend.name);
        if namespace != key.namespace {
            not_permitted.get_or_insert_with(|| {
                format!("backendRef Service {service} is in another namespace (ReferenceGrants are not supported)")
            });
        } else if !index.has_service(&service) {
            not_found.get_or_insert_with(|| format!("backendRef Service {service} does not exist"));
        }
    }
    match (not_permitted, not_found) {
        (Some(message), _) => ("False", "RefNotPermitted", message),
        (None, Some(message)) => ("False", "BackendNotFound", message),
        (None, None) => ("True", "ResolvedRefs", "every backendRef resolved".to_string()),
    }
}

fn condition(type_: &str, (status, reason, message): (&str, &str, String), generation: Option<i64>) -> Condition {
    Condition {
        // Filled in by `merged`: the pure part has no clock.
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        message,
        observed_generation: generation,
        reason: reason.to_string(),
        status: status.to_string(),
        type_: type_.to_string(),
    }
}

/// Whether two entries say the same, transition times aside.
fn same_entry(a: &RouteParentStatus, b: &RouteParentStatus) -> bool {
    let same_condition = |x: &Condition, y: &Condition| {
        (&x.type_, &x.status, &x.reason, &x.message, x.observed_generation)
            == (&y.type_, &y.status, &y.reason, &y.message, y.observed_generation)
    };
    a.parent_ref == b.parent_ref
        && a.controller_name == b.controller_name
        && a.conditions.len() == b.conditions.len()
        && a.conditions
            .iter()
            .zip(&b.conditions)
            .all(|(x, y)| same_condition(x, y))
}

/// The whole `status.parents` to write: other controllers' entries as read, then ours. A
/// condition keeps its transition time while its status stays; otherwise it changed `now`.
pub fn merged(write: &StatusWrite, now: Timestamp) -> Vec<RouteParentStatus> {
    let mut parents: Vec<RouteParentStatus> = write
        .current
        .iter()
        .filter(|p| p.controller_name != CONTROLLER_NAME)
        .cloned()
        .collect();
    let room = MAX_PARENTS.saturating_sub(parents.len());
    for entry in write.ours.iter().take(room) {
        let before = write
            .current
            .iter()
            .find(|p| p.controller_name == CONTROLLER_NAME && p.parent_ref == entry.parent_ref);
        let mut entry = entry.clone();
        for c in &mut entry.conditions {
            let kept = before
                .and_then(|b| b.conditions.iter().find(|o| o.type_ == c.type_ && o.status == c.status))
                .map(|o| o.last_transition_time.clone());
            c.last_transition_time = kept.unwrap_or(Time(now));
        }
        parents.push(entry);
    }
    parents
}

/// The body of the `/status` merge patch: `parents` whole, on the version it was computed from.
pub fn patch_body(write: &StatusWrite, now: Timestamp) -> Value {
    let mut body = json!({ "status": { "parents": merged(write, now) } });
    if let Some(rv) = &write.resource_version {
        body["metadata"] = json!({ "resourceVersion": rv });
    }
    body
}

/// Writes pending statuses while `leader` says this replica holds the Lease, until `shutdown`.
pub async fn write_statuses(
    client: Client,
    mut leader: watch::Receiver<bool>,
    mut pending: watch::Receiver<Arc<Pending>>,
    shutdown: CancellationToken,
) {
    // Routes written, with the version they were read at: until the watch brings the version
    // our write made, the same write is still "pending" and must not be sent again.
    let mut written: HashMap<RouteRef, Option<String>> = HashMap::new();
    let mut retry = RETRY_MIN;
    let mut failed = false;
    loop {
        let leading = *leader.borrow_and_update();
        if leading {
            let snapshot = pending.borrow_and_update().clone();
            written.retain(|route, rv| snapshot.get(route).is_some_and(|w| &w.resource_version == rv));
            failed = false;
            for (route, write) in snapshot.iter() {
                if written.contains_key(route) {
                    continue;
                }
                if !*leader.borrow() || shutdown.is_cancelled() {
                    break;
                }
                match patch(&client, route, write).await {
                    Ok(()) => {
                        tracing::info!(kind = ?route.0, route = %route.1, "route status written");
                        written.insert(route.clone(), write.resource_version.clone());
                    }
                    // Changed meanwhile (by another controller, or us): the watch brings the
                    // new version, and the write is computed again from it.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        tracing::debug!(kind = ?route.0, route = %route.1, "route changed before its status was written; waiting for the new version");
                        written.insert(route.clone(), write.resource_version.clone());
                    }
                    // Deleted meanwhile: its Delete event removes it.
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        written.insert(route.clone(), write.resource_version.clone());
                    }
                    Err(e) => {
                        tracing::warn!(kind = ?route.0, route = %route.1, error = %e, "cannot write route status; retrying");
                        failed = true;
                    }
                }
            }
            if failed {
                retry = (retry * 2).min(RETRY_MAX);
            } else {
                retry = RETRY_MIN;
            }
        } else {
            written.clear();
        }
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { return },
            changed = pending.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(retry), if failed && leading => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn patch(client: &Client, (kind, key): &RouteRef, write: &StatusWrite) -> Result<(), kube::Error> {
    let body = patch_body(write, Timestamp::now());
    let params = PatchParams::default();
    match kind {
        Kind::GrpcRoute => {
            let api: Api<GrpcRoute> = Api::namespaced(client.clone(), &key.namespace);
            api.patch_status(&key.name, &params, &Patch::Merge(&body)).await?;
        }
        _ => {
            let api: Api<HttpRoute> = Api::namespaced(client.clone(), &key.namespace);
            api.patch_status(&key.name, &params, &Patch::Merge(&body)).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::{super::index::IndexConfig, *};

    fn object<K: serde::de::DeserializeOwned>(value: Value) -> K {
        serde_json::from_value(value).expect("test object")
    }

    fn service(name: &str) -> Service {
        object(json!({
            "metadata": { "namespace": "shop", "name": name },
            "spec": { "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] },
        }))
    }

    /// An HTTPRoute on Service `web` (port 80) splitting to `backends`, at generation 3.
    fn route(backends: Value, status: Value) -> HttpRoute {
        object(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "namespace": "shop", "name": "split", "generation": 3, "resourceVersion": "41" },
            "spec": {
                "parentRefs": [
                    { "group": "", "kind": "Service", "name": "web", "port": 80 },
                    { "name": "edge" },
                ],
                "rules": [{ "backendRefs": backends }],
            },
            "status": status,
        }))
    }

    fn index_with(services: &[&str], route: HttpRoute) -> Index {
        let mut index = Index::new(IndexConfig {
            cluster_domain: "cluster.local".to_string(),
            trust_domain: "cluster.local".to_string(),
            default_inbound: Default::default(),
        });
        for name in services {
            index.apply(Event::Apply(service(name)));
        }
        index.apply(Event::Apply(route));
        index
    }

    fn route_key() -> RouteRef {
        (Kind::HttpRoute, ObjectKey::new("shop", "split"))
    }

    /// Our one entry's conditions as (type, status, reason), and the whole entry.
    fn ours(index: &Index) -> (Vec<(String, String, String)>, RouteParentStatus) {
        let pending = pending(index);
        let write = pending.get(&route_key()).expect("a status to write");
        assert_eq!(write.ours.len(), 1, "one entry: the Service parent, not the Gateway");
        let entry = write.ours[0].clone();
        let conditions = entry
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect();
        (conditions, entry)
    }

    fn triples(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        list.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn a_served_route_is_accepted_with_its_refs_resolved() {
        let index = index_with(
            &["web", "stable"],
            route(json!([{ "name": "stable", "port": 80 }]), json!(null)),
        );
        let (conditions, entry) = ours(&index);
        assert_eq!(
            conditions,
            triples(&[
                ("Accepted", "True", "Accepted"),
                ("ResolvedRefs", "True", "ResolvedRefs")
            ])
        );
        assert_eq!(entry.controller_name, "pillion.io/mesh-controller");
        assert_eq!(
            serde_json::to_value(&entry.parent_ref).unwrap(),
            json!({ "group": "", "kind": "Service", "name": "web", "port": 80 })
        );
        assert!(entry.conditions.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn a_missing_backend_service_is_backend_not_found() {
        let backends = json!([{ "name": "stable", "port": 80 }, { "name": "canary", "port": 80 }]);
        let index = index_with(&["web", "stable"], route(backends, json!(null)));
        let (conditions, entry) = ours(&index);
        assert_eq!(
            conditions,
            triples(&[
                ("Accepted", "True", "Accepted"),
                ("ResolvedRefs", "False", "BackendNotFound")
            ])
        );
        assert!(entry.conditions[1].message.contains("shop/canary"), "{entry:?}");
    }

    #[test]
    fn a_missing_parent_service_is_not_accepted() {
        let index = index_with(
            &["stable"],
            route(json!([{ "name": "stable", "port": 80 }]), json!(null)),
        );
        let (conditions, _) = ours(&index);
        assert_eq!(
            conditions,
            triples(&[
                ("Accepted", "False", "NoMatchingParent"),
                ("ResolvedRefs", "True", "ResolvedRefs")
            ])
        );
    }

    #[test]
    fn a_route_the_index_refuses_is_not_accepted_with_the_reason() {
        let mut refused = route(json!([{ "name": "stable", "port": 80 }]), json!(null));
        refused.spec.rules.as_mut().unwrap()[0].filters = Some(vec![object(json!({
            "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [{ "name": "x", "value": "y" }] },
        }))]);
        let index = index_with(&["web", "stable"], refused);
        let (conditions, entry) = ours(&index);
        assert_eq!(
            conditions,
            triples(&[
                ("Accepted", "False", "UnsupportedValue"),
                ("ResolvedRefs", "True", "ResolvedRefs")
            ])
        );
        assert!(entry.conditions[0].message.contains("is not supported"), "{entry:?}");
    }

    #[test]
    fn a_backend_that_is_not_a_service_is_invalid_kind() {
        let backends = json!([{ "group": "example.com", "kind": "Bucket", "name": "b", "port": 80 }]);
        let index = index_with(&["web"], route(backends, json!(null)));
        let (conditions, _) = ours(&index);
        assert_eq!(
            conditions,
            triples(&[
                ("Accepted", "False", "UnsupportedValue"),
                ("ResolvedRefs", "False", "InvalidKind")
            ])
        );
    }

    #[test]
    fn other_controllers_entries_are_kept_and_ours_replaced() {
        let foreign = json!({
            "parentRef": { "name": "edge" }, "controllerName": "example.com/gateway",
            "conditions": [{ "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2 }],
        });
        let stale = json!({
            "parentRef": { "group": "", "kind": "Service", "name": "old" }, "controllerName": CONTROLLER_NAME,
            "conditions": [],
        });
        let index = index_with(
            &["web", "stable"],
            route(
                json!([{ "name": "stable", "port": 80 }]),
                json!({ "parents": [stale, foreign.clone()] }),
            ),
        );
        let pending = pending(&index);
        let write = &pending[&route_key()];
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let body = patch_body(write, now);
        assert_eq!(body["metadata"], json!({ "resourceVersion": "41" }));
        let parents = body["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2, "{parents:?}");
        assert_eq!(
            parents[0], foreign,
            "another controller's entry is written back as read"
        );
        assert_eq!(parents[1]["parentRef"]["name"], "web");
        assert_eq!(
            parents[1]["conditions"][0]["lastTransitionTime"],
            "2027-01-15T08:00:00Z"
        );
    }

    #[test]
    fn a_status_that_already_says_it_is_not_written_and_times_stay() {
        let index = index_with(
            &["web", "stable"],
            route(json!([{ "name": "stable", "port": 80 }]), json!(null)),
        );
        let write = pending(&index).remove(&route_key()).unwrap();
        let then = Timestamp::from_second(1_700_000_000).unwrap();
        let written = serde_json::to_value(merged(&write, then)).unwrap();

        // The watch brings the route back with the status written: nothing left to do.
        let index = index_with(
            &["web", "stable"],
            route(json!([{ "name": "stable", "port": 80 }]), json!({ "parents": written })),
        );
        assert!(pending(&index).is_empty());

        // The backend goes away: ResolvedRefs changes now, Accepted keeps its time.
        let mut index = index;
        index.apply(Event::Delete(service("stable")));
        let write = pending(&index).remove(&route_key()).unwrap();
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let parents = merged(&write, now);
        let times: Vec<Timestamp> = parents[0].conditions.iter().map(|c| c.last_transition_time.0).collect();
        assert_eq!(times, [then, now]);
    }

    #[test]
    fn a_new_generation_is_rewritten() {
        let index = index_with(
            &["web", "stable"],
            route(json!([{ "name": "stable", "port": 80 }]), json!(null)),
        );
        let write = pending(&index).remove(&route_key()).unwrap();
        let written = serde_json::to_value(merged(&write, Timestamp::UNIX_EPOCH)).unwrap();
        let mut next = route(json!([{ "name": "stable", "port": 80 }]), json!({ "parents": written }));
        next.metadata.generation = Some(4);
        let index = index_with(&["web", "stable"], next);
        let (_, entry) = ours(&index);
        assert!(entry.conditions.iter().all(|c| c.observed_generation == Some(4)));
    }

    #[test]
    fn routes_not_ours_are_left_alone_unless_they_carry_a_stale_entry_of_ours() {
        let mut gateway_only = route(json!([]), json!(null));
        gateway_only.spec.parent_refs = Some(vec![object(json!({ "name": "edge" }))]);
        let index = index_with(&["web"], gateway_only.clone());
        assert!(index.route_sources().is_empty());
        assert!(pending(&index).is_empty());

        gateway_only.status = Some(object(json!({ "parents": [{
            "parentRef": { "group": "", "kind": "Service", "name": "web" }, "controllerName": CONTROLLER_NAME, "conditions": [],
        }] })));
        let index = index_with(&["web"], gateway_only);
        let write = &pending(&index)[&route_key()];
        assert!(write.ours.is_empty());
        assert_eq!(merged(write, Timestamp::UNIX_EPOCH), []);
    }

    #[test]
    fn a_relist_replaces_the_routes_and_a_delete_forgets_one() {
        let served = route(json!([{ "name": "stable", "port": 80 }]), json!(null));
        let mut index = index_with(&["web", "stable"], served.clone());
        assert_eq!(index.route_sources().len(), 1);
        index.apply(Event::<HttpRoute>::Init);
        assert_eq!(
            index.route_sources().len(),
            1,
            "the last list is kept until the new one is complete"
        );
        index.apply(Event::<HttpRoute>::InitDone);
        assert!(index.route_sources().is_empty());
        index.apply(Event::Apply(served.clone()));
        index.apply(Event::Delete(served));
        assert!(pending(&index).is_empty());
    }
}
