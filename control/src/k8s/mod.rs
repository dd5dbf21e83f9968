//! Kubernetes mode: discovery, routes and inbound authorization from the cluster's own objects, served as the same
//! [`Policy`](crate::policy::Policy) the policy file produces, so the discovery service and the
//! proxies do not know which source they are fed from.
//!
//! ```text
//! watch   kube-rs watchers (Services, EndpointSlices, Pods, Namespaces, routes, AuthorizationPolicies) → index → publish
//! index   watcher events → per-kind stores → one model Policy (pure, no I/O)
//! route   a Gateway API HTTPRoute with a Service parentRef (GAMMA) → model routes, checked once
//! authz   the AuthorizationPolicy CRD and inbound defaults → who may call each pod's ports
//! status  each route's Accepted and ResolvedRefs conditions, written by one replica
//! lease   which replica that is: the holder of a coordination.k8s.io Lease
//! ```

pub mod authz;
pub mod index;
pub mod lease;
pub mod route;
pub mod status;
pub mod watch;

pub use authz::DefaultInboundPolicy;
pub use index::{Index, IndexConfig, Kind};
pub use watch::KubernetesSource;
