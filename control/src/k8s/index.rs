//! The cluster's objects, as watcher events deliver them, and the model [`Policy`] they amount to.
//!
//! Pure: no I/O and no clock, so tests feed it events built from the real k8s-openapi and
//! gateway-api types. Each object is checked once when applied and kept in a small form; one that
//! fails is rejected with a reason (logged, and listed by [`Index::rejected`]) and never stops the
//! rest. A relist (`Init` … `InitDone`) replaces a kind's objects only when complete, so the last
//! known state keeps being served while a watch restarts, and objects deleted meanwhile disappear.
//!
//! [`Index::policy`] builds the whole policy from the stores. For each TCP port of each Service:
//! a destination by name (`name.ns.svc.<cluster-domain>:port`) and one per ClusterIP
//! (`ip:port`), with the ready endpoints (falling back to serving, terminating ones when none is
//! ready, as kube-proxy does), each with a SPIFFE ID only when its pod runs our proxy, and the
//! routes of the HTTPRoutes and GRPCRoutes attached to it, their Service backends resolved to
//! endpoints. An endpoint whose Pod is not known (slices and pods are watched separately, so
//! either may come first) is left out until it is: an endpoint without its identity would mean
//! plaintext.
//!
//! And for each meshed pod, under each of its IPs, who may call it ([`Policy::workloads`]): per
//! port, the union of the AuthorizationPolicies that target it (by Service or podSelector, in its
//! namespace); a port none targets gets the pod's `pillion.io/default-inbound-policy`, else its
//! Namespace's, else the cluster's `--default-inbound-policy`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{ResourceExt, runtime::watcher::Event};
use pillion_api::policy::model::{
    Authority, BackendRef, Destination, Endpoint, Policy, ProtocolHint, RetryBudget, Route, SpiffeId, WorkloadInbound,
};

use super::{
    authz::{Allowed, AuthorizationPolicyObject, DefaultInboundPolicy, PolicyInfo, Selector, TargetPods},
    route::{BackendService, HttpRouteInfo},
    status::{RouteSource, RouteSources},
};

/// The proxy container the injector adds (`pillion-control inject`): a pod running it is meshed,
/// so its endpoints carry an identity and callers use mesh TLS.
pub const PROXY_CONTAINER: &str = "pillion-proxy";
/// Ports (and ranges) forwarded without protocol detection, on a Service or a Pod.
pub const OPAQUE_PORTS: &str = "pillion.io/opaque-ports";
/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Settings the policy is built with.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// The DNS suffix of Service names (`cluster.local`).
    pub cluster_domain: String,
    /// Endpoint identities are `spiffe://<trust_domain>/ns/<ns>/sa/<service account>`.
    pub trust_domain: String,
    /// What a port admits when no AuthorizationPolicy targets it and neither its Pod nor its
    /// Namespace says (`--default-inbound-policy`).
    pub default_inbound: DefaultInboundPolicy,
}

/// `namespace/name` of an object (cluster-scoped objects have an empty namespace).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

/// The kinds the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    HttpRoute,
    GrpcRoute,
    AuthorizationPolicy,
}

/// Watched objects, each kind in its own store.
pub struct Index {
    config: IndexConfig,
    services: Store<ServiceInfo>,
    slices: Store<SliceInfo>,
    pods: Store<PodInfo>,
    namespaces: Store<NamespaceInfo>,
    routes: Store<HttpRouteInfo>,
    grpc_routes: Store<HttpRouteInfo>,
    authorization_policies: Store<PolicyInfo>,
    rejected: BTreeMap<(Kind, ObjectKey), String>,
    synced: HashSet<Kind>,
    /// Every route as written, served or refused: what its status is made of (status.rs).
    route_sources: RouteSources,
}

/// One kind's objects, and the relist being collected, if any.
pub struct Store<T> {
    current: HashMap<ObjectKey, T>,
    relist: Option<HashMap<ObjectKey, T>>,
}

/// A kind the index can hold: how an object is checked and where it goes.
pub trait Indexed: kube::Resource + Sized {
    const KIND: Kind;
    type Info;
    fn parse(&self) -> Result<Self::Info, String>;
    fn store(index: &mut Index) -> &mut Store<Self::Info>;
    /// What the object's status is made of, for the kinds whose status we write (routes).
    fn status_source(&self) -> Option<RouteSource> {
        None
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    /// `spec.clusterIPs`, primary family first; empty for headless and ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    /// TCP ports only: the proxy carries TCP.
    pub ports: Vec<ServicePortInfo>,
    /// `spec.selector`; `None` or empty selects no pods (endpoints managed by hand).
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePortInfo {
    /// Empty for an unnamed port, as in the EndpointSlice.
    pub name: String,
    pub port: u16,
    /// From `appProtocol` or the Service's opaque-ports annotation.
    pub protocol: ProtocolHint,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    pub service: ObjectKey,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: ProtocolHint,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    /// Serving while terminating: used only when no endpoint is ready.
    pub serving_terminating: bool,
    /// `targetRef` when it names a Pod.
    pub pod: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    /// Runs our proxy container.
    pub meshed: bool,
    pub opaque_ports: Vec<(u16, u16)>,
    pub labels: BTreeMap<String, String>,
    /// `pillion.io/default-inbound-policy` on the Pod.
    pub default_inbound: Option<DefaultInboundPolicy>,
    /// Host network, or finished (`Succeeded`/`Failed`): its IPs are not its own (the node's, or
    /// free to be given to a new pod), so no inbound authorization is served under them.
    pub ips_shared: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NamespaceInfo {
    pub annotations: BTreeMap<String, String>,
    /// `pillion.io/default-inbound-policy` on the Namespace.
    pub default_inbound: Option<DefaultInboundPolicy>,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn of<K: kube::Resource>(obj: &K) -> Self {
        ObjectKey::new(&obj.namespace().unwrap_or_default(), &obj.name_any())
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            current: HashMap::new(),
            relist: None,
        }
    }
}

impl Index {
    pub fn new(config: IndexConfig) -> Self {
        Index {
            config,
            services: Store::default(),
            slices: Store::default(),
            pods: Store::default(),
            namespaces: Store::default(),
            routes: Store::default(),
            grpc_routes: Store::default(),
            authorization_policies: Store::default(),
            rejected: BTreeMap::new(),
            synced: HashSet::new(),
            route_sources: RouteSources::default(),
        }
    }

    /// Applies one watcher event. Returns whether the served state may have changed (objects
    /// listed during a relist change nothing until the relist is complete).
    pub fn apply<K: Indexed>(&mut self, event: Event<K>) -> bool {
        self.route_sources.observe(&event);
        match event {
            Event::Apply(obj) => {
                let key = ObjectKey::of(&obj);
                match self.check(&obj, &key) {
                    Some(info) => {
                        K::store(self).current.insert(key, info);
                    }
                    // A rejected update withdraws the object: serving its stale form would hide
                    // the change its author made.
                    None => {
                        K::store(self).current.remove(&key);
                    }
                }
                true
            }
            Event::Delete(obj) => {
                let key = ObjectKey::of(&obj);
                self.rejected.remove(&(K::KIND, key.clone()));
                K::store(self).current.remove(&key).is_some()
            }
            Event::Init => {
                K::store(self).relist = Some(HashMap::new());
                self.rejected.retain(|(kind, _), _| *kind != K::KIND);
                false
            }
            Event::InitApply(obj) => {
                let key = ObjectKey::of(&obj);
                if let Some(info) = self.check(&obj, &key) {
                    K::store(self).relist.get_or_insert_default().insert(key, info);
                }
                false
            }
            Event::InitDone => {
                self.synced.insert(K::KIND);
                let store = K::store(self);
                store.current = store.relist.take().unwrap_or_default();
                true
            }
        }
    }

    /// Whether each of `kinds` has been listed completely at least once.
    pub fn is_synced(&self, kinds: &[Kind]) -> bool {
        kinds.iter().all(|k| self.synced.contains(k))
    }

    /// Objects currently refused, with the reason.
    pub fn rejected(&self) -> &BTreeMap<(Kind, ObjectKey), String> {
        &self.rejected
    }

    /// The routes whose status concerns us, as last seen.
    pub fn route_sources(&self) -> &RouteSources {
        &self.route_sources
    }

    pub fn has_service(&self, key: &ObjectKey) -> bool {
        self.services.current.contains_key(key)
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.current.get(&ObjectKey::new("", name))
    }

    fn check<K: Indexed>(&mut self, obj: &K, key: &ObjectKey) -> Option<K::Info> {
        match obj.parse() {
            Ok(info) => {
                self.rejected.remove(&(K::KIND, key.clone()));
                Some(info)
            }
            Err(reason) => {
                tracing::warn!(kind = ?K::KIND, object = %key, %reason, "object rejected; it is not served");
                self.rejected.insert((K::KIND, key.clone()), reason);
                None
            }
        }
    }

    /// The policy the current objects amount to.
    pub fn policy(&self) -> Policy {
        let mut slices: HashMap<&ObjectKey, Vec<&SliceInfo>> = HashMap::new();
        for slice in self.slices.current.values() {
            slices.entry(&slice.service).or_default().push(slice);
        }
        let resolver = Resolver {
            index: self,
            slices,
            pods_by_ip: self.pods_by_ip(),
        };
        let routes = self.routes_by_parent();
        let mut policy = Policy::default();
        for (key, service) in &self.services.current {
            let family = service.cluster_ips.first().map(IpAddr::is_ipv4);
            for port in &service.ports {
                let endpoints = resolver.endpoints(key, port);
                let routes = routes
                    .get(key)
                    .map(|attached| resolver.routes(attached, port.port))
                    .unwrap_or_default();
                let name = format!(
                    "{}.{}.svc.{}:{}",
                    key.name, key.namespace, self.config.cluster_domain, port.port
                );
                // The name stands for the primary family, as DNS answers it first.
                let by_family = |v4: Option<bool>| -> Vec<Endpoint> {
                    endpoints
                        .iter()
                        .filter(|e| v4.is_none_or(|v4| e.address.is_ipv4() == v4))
                        .cloned()
                        .collect()
                };
                let mut keys = vec![(name, by_family(family))];
                for ip in &service.cluster_ips {
                    keys.push((
                        SocketAddr::new(*ip, port.port).to_string(),
                        by_family(Some(ip.is_ipv4())),
                    ));
                }
                for (authority, endpoints) in keys {
                    let Ok(destination) = authority.parse::<Authority>() else {
                        tracing::warn!(service = %key, %authority, "not a valid destination name; skipped");
                        continue;
                    };
                    policy.destinations.insert(
                        destination.clone(),
                        Destination {
                            destination,
                            endpoints,
                            retry_budget: RetryBudget::default(),
                            load_balancer: Default::default(),
                            routes: routes.clone(),
                        },
                    );
                }
            }
        }
        policy.workloads = self.workloads();
        policy
    }

    /// Each meshed pod's inbound authorization, under every IP of the pod (dual stack).
    fn workloads(&self) -> HashMap<IpAddr, WorkloadInbound> {
        let trust_domain = &self.config.trust_domain;
        let mut targeting: HashMap<&str, Vec<(Selector, &PolicyInfo)>> = HashMap::new();
        for (key, info) in &self.authorization_policies.current {
            let selector = match &info.target {
                TargetPods::Selector(selector) => selector.clone(),
                TargetPods::Service(name) => {
                    let service = self.services.current.get(&ObjectKey::new(&key.namespace, name));
                    match service.and_then(|s| s.selector.clone()) {
                        Some(labels) if !labels.is_empty() => Selector::from_labels(labels),
                        // No such Service (yet), or one without a selector: it selects no pods.
                        _ => continue,
                    }
                }
            };
            targeting
                .entry(key.namespace.as_str())
                .or_default()
                .push((selector, info));
        }
        // In name order, so that when two pods claim one IP the same one wins every time.
        let mut pods: Vec<(&ObjectKey, &PodInfo)> = self.pods.current.iter().collect();
        pods.sort_by_key(|(key, _)| *key);
        let mut workloads = HashMap::new();
        for (key, pod) in pods {
            if !pod.meshed || pod.ips_shared {
                continue;
            }
            let owner = format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                key.namespace, pod.service_account
            );
            let Ok(owner) = SpiffeId::try_from(owner) else {
                continue;
            };
            let mut every_port: Option<Allowed> = None;
            let mut by_port: BTreeMap<u16, Allowed> = BTreeMap::new();
            for (selector, info) in targeting.get(key.namespace.as_str()).into_iter().flatten() {
                if !selector.matches(&pod.labels) {
                    continue;
                }
                match &info.ports {
                    None => every_port.get_or_insert_default().union(&info.allowed),
                    Some(ports) => {
                        for port in ports {
                            by_port.entry(*port).or_default().union(&info.allowed);
                        }
                    }
                }
            }
            // Policies for every port add to each named port's; a port none targets gets the
            // pod's default, else its namespace's, else the cluster's.
            let ports = by_port
                .into_iter()
                .map(|(port, mut allowed)| {
                    if let Some(all) = &every_port {
                        allowed.union(all);
                    }
                    (port, allowed.authorization(trust_domain))
                })
                .collect();
            let default = match every_port {
                Some(allowed) => allowed.authorization(trust_domain),
                None => pod
                    .default_inbound
                    .or_else(|| self.namespace(&key.namespace).and_then(|ns| ns.default_inbound))
                    .unwrap_or(self.config.default_inbound)
                    .authorization(trust_domain),
            };
            let workload = WorkloadInbound { owner, ports, default };
            for ip in &pod.ips {
                if workloads.contains_key(ip) {
                    tracing::debug!(pod = %key, %ip, "another pod has this IP; its inbound authorization is served");
                    continue;
                }
                workloads.insert(*ip, workload.clone());
            }
        }
        workloads
    }

    /// Routes per parent Service, in Gateway API order (oldest first, then by name).
    fn routes_by_parent(&self) -> HashMap<&ObjectKey, Vec<(&HttpRouteInfo, Option<u16>)>> {
        let mut ordered: Vec<(&ObjectKey, &HttpRouteInfo)> =
            self.routes.current.iter().chain(&self.grpc_routes.current).collect();
        ordered.sort_by(|a, b| (a.1.created, a.0).cmp(&(b.1.created, b.0)));
        let mut by_parent: HashMap<&ObjectKey, Vec<(&HttpRouteInfo, Option<u16>)>> = HashMap::new();
        for (_, route) in ordered {
            for parent in &route.parents {
                by_parent.entry(&parent.service).or_default().push((route, parent.port));
            }
        }
        by_parent
    }

    fn pods_by_ip(&self) -> HashMap<(&str, IpAddr), &PodInfo> {
        let mut by_ip = HashMap::new();
        for (key, pod) in &self.pods.current {
            for ip in &pod.ips {
                by_ip.insert((key.namespace.as_str(), *ip), pod);
            }
        }
        by_ip
    }
}

/// What building the policy looks up: slices by Service, pods by IP.
struct Resolver<'a> {
    index: &'a Index,
    slices: HashMap<&'a ObjectKey, Vec<&'a SliceInfo>>,
    pods_by_ip: HashMap<(&'a str, IpAddr), &'a PodInfo>,
}

impl Resolver<'_> {
    /// The endpoints of a Service port, sorted by address, each listed once.
    fn endpoints(&self, service: &ObjectKey, port: &ServicePortInfo) -> Vec<Endpoint> {
        let mut ready = BTreeMap::new();
        let mut terminating = BTreeMap::new();
        for slice in self.slices.get(service).into_iter().flatten() {
            let Some(slice_port) = slice.ports.iter().find(|p| p.name == port.name) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                let into = if endpoint.ready {
                    &mut ready
                } else if endpoint.serving_terminating {
                    &mut terminating
                } else {
                    continue;
                };
                for ip in &endpoint.addresses {
                    let pod = match &endpoint.pod {
                        Some(name) => match self.index.pods.current.get(&ObjectKey::new(&service.namespace, name)) {
                            Some(pod) => Some(pod),
                            // A pod not known yet (or no longer): its identity is unknown, and
                            // serving it without one would send callers in plaintext to a
                            // meshed pod. It joins once its Pod is seen.
                            None => continue,
                        },
                        // No targetRef: a pod by its IP, else an address outside the cluster's pods.
                        None => self.pods_by_ip.get(&(service.namespace.as_str(), *ip)).copied(),
                    };
                    let address = SocketAddr::new(*ip, slice_port.port);
                    into.insert(
                        address,
                        self.endpoint(address, &service.namespace, pod, port, slice_port),
                    );
                }
            }
        }
        let chosen = if ready.is_empty() { terminating } else { ready };
        chosen.into_values().collect()
    }

    fn endpoint(
        &self,
        address: SocketAddr,
        namespace: &str,
        pod: Option<&PodInfo>,
        port: &ServicePortInfo,
        slice_port: &SlicePort,
    ) -> Endpoint {
        let identity = pod.filter(|p| p.meshed).and_then(|p| {
            SpiffeId::try_from(format!(
                "spiffe://{}/ns/{namespace}/sa/{}",
                self.index.config.trust_domain, p.service_account
            ))
            .ok()
        });
        let pod_opaque = pod.is_some_and(|p| in_ranges(&p.opaque_ports, address.port()));
        let protocol = if pod_opaque {
            ProtocolHint::Opaque
        } else if port.protocol != ProtocolHint::Unknown {
            port.protocol
        } else {
            slice_port.protocol
        };
        Endpoint {
            address,
            identity,
            protocol,
            weight: 1,
        }
    }

    /// The model routes of the HTTPRoutes attached to a Service, for one of its ports.
    fn routes(&self, attached: &[(&HttpRouteInfo, Option<u16>)], port: u16) -> Vec<Route> {
        let mut routes = Vec::new();
        for (info, parent_port) in attached {
            if parent_port.is_some_and(|p| p != port) {
                continue;
            }
            for rule in &info.rules {
                let mut route = rule.route.clone();
                route.backend_refs = self.backends(&rule.backends);
                if !rule.backends.is_empty() && route.backend_refs.iter().all(|b| b.weight == 0) {
                    // No backend has a ready endpoint (or only weight-0 ones do): the model cannot
                    // say "fail", so the rule is left out and the Service's own endpoints serve.
                    tracing::debug!(route = %route.name.0, "no backend has ready endpoints; rule left out");
                    continue;
                }
                routes.push(route);
            }
        }
        routes
    }

    /// Each backend Service's weight split evenly across its ready endpoints (of the Service's
    /// primary family), so the split between Services holds whatever their sizes.
    fn backends(&self, backends: &[BackendService]) -> Vec<BackendRef> {
        let resolved: Vec<(u32, Vec<SocketAddr>)> = backends
            .iter()
            .map(|b| (b.weight, self.backend_addresses(b)))
            .filter(|(_, addresses)| !addresses.is_empty())
            .collect();
        // Scale by the least common multiple of the endpoint counts so the division is exact;
        // when that grows large, round (a weight above 0 never rounds to 0).
        let lcm = resolved
            .iter()
            .try_fold(1u64, |acc, (_, a)| {
                let l = lcm(acc, a.len() as u64);
                (l <= 1000).then_some(l)
            })
            .unwrap_or(1000);
        let mut refs = Vec::new();
        for (weight, addresses) in resolved {
            let n = addresses.len() as u64;
            let share = u64::from(weight) * lcm / n;
            let share = if weight > 0 { share.max(1) } else { 0 };
            let share = u32::try_from(share).unwrap_or(u32::MAX);
            refs.extend(
                addresses
                    .into_iter()
                    .map(|address| BackendRef { address, weight: share }),
            );
        }
        refs
    }

    fn backend_addresses(&self, backend: &BackendService) -> Vec<SocketAddr> {
        let Some(service) = self.index.services.current.get(&backend.service) else {
            return Vec::new();
        };
        let Some(port) = service.ports.iter().find(|p| p.port == backend.port) else {
            return Vec::new();
        };
        let family = service.cluster_ips.first().map(IpAddr::is_ipv4);
        self.endpoints(&backend.service, port)
            .into_iter()
            .map(|e| e.address)
            .filter(|a| family.is_none_or(|v4| a.is_ipv4() == v4))
            .collect()
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    if a == 0 || b == 0 { 0 } else { a / gcd(a, b) * b }
}

fn in_ranges(ranges: &[(u16, u16)], port: u16) -> bool {
    ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port))
}

/// `appProtocol` as a protocol hint: the Kubernetes names and the common bare ones.
fn app_protocol_hint(app_protocol: Option<&str>) -> ProtocolHint {
    match app_protocol.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "http1" | "kubernetes.io/ws") => ProtocolHint::Http1,
        Some("http2" | "h2c" | "grpc" | "kubernetes.io/h2c") => ProtocolHint::Http2,
        Some("tcp" | "opaque" | "pillion.io/opaque") => ProtocolHint::Opaque,
        _ => ProtocolHint::Unknown,
    }
}

/// `pillion.io/opaque-ports`: ports and ranges, comma separated (`3306,9000-9100`).
fn opaque_ports(annotations: &BTreeMap<String, String>) -> Result<Vec<(u16, u16)>, String> {
    let Some(value) = annotations.get(OPAQUE_PORTS) else {
        return Ok(Vec::new());
    };
    let bad =
        || format!("annotation {OPAQUE_PORTS}: `{value}` is not a list of ports and ranges (e.g. 3306,9000-9100)");
    let mut ranges = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
        if lo == 0 || hi < lo {
            return Err(bad());
        }
        ranges.push((lo, hi));
    }
    Ok(ranges)
}

fn parse_ip(text: &str, field: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|_| format!("{field}: `{text}` is not an IP address"))
}

fn port_u16(port: i32, field: &str) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{field}: {port} is not a port number")),
    }
}

impl Indexed for Service {
    const KIND: Kind = Kind::Service;
    type Info = ServiceInfo;

    fn parse(&self) -> Result<ServiceInfo, String> {
        let spec = self.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            // No endpoints of its own: a DNS alias the proxy cannot resolve for the app.
            return Ok(ServiceInfo {
                cluster_ips: Vec::new(),
                ports: Vec::new(),
                selector: None,
            });
        }
        let ips = match spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips,
            _ => spec.cluster_ip.into_iter().collect(),
        };
        let cluster_ips = ips
            .iter()
            .filter(|ip| !ip.is_empty() && ip.as_str() != "None")
            .map(|ip| parse_ip(ip, "spec.clusterIPs"))
            .collect::<Result<Vec<_>, _>>()?;
        let opaque = opaque_ports(self.annotations())?;
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            let port = port_u16(p.port, &format!("spec.ports[{i}].port"))?;
            let protocol = if in_ranges(&opaque, port) {
                ProtocolHint::Opaque
            } else {
                app_protocol_hint(p.app_protocol.as_deref())
            };
            ports.push(ServicePortInfo {
                name: p.name.clone().unwrap_or_default(),
                port,
                protocol,
            });
        }
        Ok(ServiceInfo {
            cluster_ips,
            ports,
            selector: spec.selector,
        })
    }

    fn store(index: &mut Index) -> &mut Store<ServiceInfo> {
        &mut index.services
    }
}

impl Indexed for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    type Info = SliceInfo;

    fn parse(&self) -> Result<SliceInfo, String> {
        let namespace = self.namespace().unwrap_or_default();
        let service = self
            .labels()
            .get(SERVICE_NAME_LABEL)
            .ok_or_else(|| format!("has no {SERVICE_NAME_LABEL} label"))?;
        let service = ObjectKey::new(&namespace, service);
        if !matches!(self.address_type.as_str(), "IPv4" | "IPv6") {
            // FQDN slices name hosts the proxy cannot dial by address.
            return Ok(SliceInfo {
                service,
                ports: Vec::new(),
                endpoints: Vec::new(),
            });
        }
        let mut ports = Vec::new();
        for (i, p) in self.ports.iter().flatten().enumerate() {
            // A port without a number means "any port", which names no endpoint address.
            let (Some(port), None | Some("TCP")) = (p.port, p.protocol.as_deref()) else {
                continue;
            };
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port: port_u16(port, &format!("ports[{i}].port"))?,
                protocol: app_protocol_hint(p.app_protocol.as_deref()),
            });
        }
        let mut endpoints = Vec::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let addresses = e
                .addresses
                .iter()
                .map(|a| parse_ip(a, &format!("endpoints[{i}].addresses")))
                .collect::<Result<Vec<_>, _>>()?;
            let conditions = e.conditions.clone().unwrap_or_default();
            // The API's rules: an unknown `ready` counts as ready; `serving` defaults to `ready`.
            let ready = conditions.ready.unwrap_or(true);
            let serving = conditions.serving.unwrap_or(ready);
            let terminating = conditions.terminating.unwrap_or(false);
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            endpoints.push(SliceEndpoint {
                addresses,
                ready: ready && !terminating,
                serving_terminating: serving && terminating,
                pod,
            });
        }
        Ok(SliceInfo {
            service,
            ports,
            endpoints,
        })
    }

    fn store(index: &mut Index) -> &mut Store<SliceInfo> {
        &mut index.slices
    }
}

impl Indexed for Pod {
    const KIND: Kind = Kind::Pod;
    type Info = PodInfo;

    fn parse(&self) -> Result<PodInfo, String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let ips: Vec<String> = match status.pod_ips {
            Some(ips) if !ips.is_empty() => ips.into_iter().map(|p| p.ip).collect(),
            _ => status.pod_ip.into_iter().collect(),
        };
        let ips = ips
            .iter()
            .map(|ip| parse_ip(ip, "status.podIPs"))
            .collect::<Result<Vec<_>, _>>()?;
        // A misspelt default must not open the pod: it is read as `deny` until fixed.
        let default_inbound = DefaultInboundPolicy::from_annotations(self.annotations()).unwrap_or_else(|reason| {
            tracing::warn!(pod = %ObjectKey::of(self), %reason, "inbound default read as deny");
            Some(DefaultInboundPolicy::Deny)
        });
        let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
        let meshed = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .any(|c| c.name == PROXY_CONTAINER);
        Ok(PodInfo {
            ips,
            // The API server fills in `default`; an object built elsewhere may not have.
            service_account: spec.service_account_name.unwrap_or_else(|| "default".to_string()),
            meshed,
            opaque_ports: opaque_ports(self.annotations())?,
            labels: self.labels().clone(),
            default_inbound,
            ips_shared: spec.host_network == Some(true) || finished,
        })
    }

    fn store(index: &mut Index) -> &mut Store<PodInfo> {
        &mut index.pods
    }
}

impl Indexed for Namespace {
    const KIND: Kind = Kind::Namespace;
    type Info = NamespaceInfo;

    fn parse(&self) -> Result<NamespaceInfo, String> {
        // A misspelt default must not open the namespace: it is read as `deny` until fixed.
        let default_inbound = DefaultInboundPolicy::from_annotations(self.annotations()).unwrap_or_else(|reason| {
            tracing::warn!(namespace = %self.name_any(), %reason, "inbound default read as deny");
            Some(DefaultInboundPolicy::Deny)
        });
        Ok(NamespaceInfo {
            annotations: self.annotations().clone(),
            default_inbound,
        })
    }

    fn store(index: &mut Index) -> &mut Store<NamespaceInfo> {
        &mut index.namespaces
    }
}

impl Indexed for HttpRoute {
    const KIND: Kind = Kind::HttpRoute;
    type Info = HttpRouteInfo;

    fn parse(&self) -> Result<HttpRouteInfo, String> {
        HttpRouteInfo::parse(self)
    }

    fn status_source(&self) -> Option<RouteSource> {
        RouteSource::of_http(self)
    }

    fn store(index: &mut Index) -> &mut Store<HttpRouteInfo> {
        &mut index.routes
    }
}

impl Indexed for GrpcRoute {
    const KIND: Kind = Kind::GrpcRoute;
    type Info = HttpRouteInfo;

    fn parse(&self) -> Result<HttpRouteInfo, String> {
        HttpRouteInfo::parse_grpc(self)
    }

    fn status_source(&self) -> Option<RouteSource> {
        RouteSource::of_grpc(self)
    }

    fn store(index: &mut Index) -> &mut Store<HttpRouteInfo> {
        &mut index.grpc_routes
    }
}

impl Indexed for AuthorizationPolicyObject {
    const KIND: Kind = Kind::AuthorizationPolicy;
    type Info = PolicyInfo;

    fn parse(&self) -> Result<PolicyInfo, String> {
        PolicyInfo::parse(self)
    }

    fn store(index: &mut Index) -> &mut Store<PolicyInfo> {
        &mut index.authorization_policies
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
