//! Pillion's sidecar proxy as a library: the binary (`main.rs`) is configuration → runtime →
//! [`app::run`]; benchmarks and tests reach the same modules.
//!
//! A connection's path: [`accept`] (original destination, loop refusal) → [`inbound`] or
//! [`outbound`] → [`detect`] → [`http`] (route → metrics → errors → timeouts → retry →
//! upstream) or [`forward`] (opaque TCP).

pub mod accept;
pub mod admin;
pub mod allocator;
pub mod app;
pub mod authz;
pub mod balance;
pub mod config;
pub mod conn_limit;
pub mod control;
pub mod counted_io;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod exposition;
pub mod forward;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod opaque_transport;
pub mod outbound;
pub mod policy;
#[cfg(test)]
mod stuck_file;
pub mod tls;
pub mod transport;
pub mod transport_header;
