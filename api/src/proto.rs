//! The generated `pillion.control.v1` protobuf types, gRPC clients and gRPC servers.
//!
//! The proxy uses [`identity_client::IdentityClient`] and [`discovery_client::DiscoveryClient`].

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    tonic::include_proto!("pillion.control.v1");
}

pub use generated::*;
