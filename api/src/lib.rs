//! What Pillion's proxy and control plane share, so that both read every name and every policy
//! the same way:
//!
//! ```text
//! proto    the pillion.control.v1 gRPC protocol: messages and clients (servers with `server`)
//! spiffe   SPIFFE IDs, trust domains and workload names; how an ID travels in SNI and certificates
//! policy   the one policy YAML model (routes, retries, budgets, endpoints, authorization), its
//!          validation with line-numbered errors, and its mapping to and from the protocol
//! ```
//!
//! The proxy depends on this crate only; the control plane's server, CA, authentication and
//! injector live in `pillion-control`.

pub mod policy;
pub mod proto;
pub mod spiffe;
