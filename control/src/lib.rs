//! Pillion's control plane, `pillion-control`.
//!
//! The protocol, SPIFFE names and the policy model are `pillion-api`'s, shared with the proxy
//! (re-exported here as [`proto`], [`spiffe`] and [`policy`]'s model). This crate is the server
//! that `pillion-control serve` runs:
//!
//! ```text
//! auth        token → WorkloadId (token file, or Kubernetes TokenReview)
//! ca          WorkloadId + CSR → X.509-SVID, signed by the operator's issuer
//! policy      the policy YAML: model, loading with line-numbered errors, reload on change
//! identity_service / discovery_service   the gRPC services over those parts
//! tls         the listener's own SPIFFE certificate (renewed in place) and the caller's identity
//! k8s         Kubernetes mode: watched Services, EndpointSlices, Pods and HTTPRoutes as the same policy
//! server      wires the services onto one listener (TLS or --plaintext), limits, graceful shutdown
//! ```
//!
//! [`inject`] is `pillion-control inject`: it adds the init container and the proxy to
//! Kubernetes workloads in YAML; [`webhook`] does the same for each new Pod as a mutating admission
//! webhook. [`kube_api`] is the small API-server client both TokenReview and the webhook use.

pub mod auth;
pub mod ca;
pub mod diagnostics;
pub mod discovery_service;
pub mod identity_service;
pub mod inject;
#[cfg(feature = "kubernetes")]
pub mod k8s;
pub mod kube_api;
pub mod policy;
pub mod rate_limit;
pub mod server;
pub mod tls;
pub mod webhook;

// Shared with the proxy.
pub use pillion_api::{proto, spiffe};
