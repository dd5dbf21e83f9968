//! HTTP peers for the L7 end-to-end tests: what stands on either side of the proxy when the
//! traffic is HTTP rather than opaque bytes.
//!
//! - [`app`]: the app (or a remote service) as a real hyper server speaking HTTP/1.1 and h2c on
//!   one port, with a behaviour per path (echo, slow, failing, upgrade, gRPC); it records every
//!   request it sees so tests can check what crossed the proxy, and how many attempts arrived;
//! - [`grpc`]: gRPC framing, the app's gRPC methods and a small gRPC client over hyper's HTTP/2;
//! - [`raw`]: hand-written HTTP/1 bytes over a std socket, for requests no client library sends
//!   (smuggling shapes, oversized heads) and for reading exactly one response off a keep-alive
//!   connection or an upgraded one;
//! - [`curl`]: `curl` run inside a namespace, as a real-world client of both protocols;
//! - [`body`]: streaming bodies (a generated stream of any length, a channel) and a digest fast
//!   enough to check a GiB in an unoptimised build;
//! - [`route_file`]: the proxy's `PILLION_CONFIG` file, rewritten atomically like a ConfigMap.
//!
//! Async code runs on a current-thread tokio runtime owned by a thread that has joined the
//! namespace ([`block_on_in`], [`app::HttpApp`]), so every socket it opens is in that namespace and
//! no task can wander onto a thread in the host's.

pub mod app;
pub mod body;
pub mod curl;
pub mod grpc;
pub mod raw;
pub mod route_file;

use std::future::Future;
use std::time::Duration;

use crate::netns::Netns;

/// Runs the future made by `make` to completion on a fresh thread inside `ns`, with its own
/// current-thread runtime; panics if it takes longer than `limit`.
pub fn block_on_in<F, T>(ns: &Netns, limit: Duration, make: impl FnOnce() -> F + Send) -> T
where
    F: Future<Output = T>,
    T: Send,
{
    ns.run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime");
        // The timer must be created inside the runtime, hence the async block.
        runtime
            .block_on(async { tokio::time::timeout(limit, make()).await })
            .unwrap_or_else(|_| panic!("async client in {} did not finish within {limit:?}", ns.name()))
    })
}
