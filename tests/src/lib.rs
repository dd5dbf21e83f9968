//! End-to-end test harness for Pillion: a pod is a network namespace.
//!
//! The tests in `tests/tests/` run the real `pillion-iptables-init` and `pillion-proxy` binaries
//! inside throw-away network namespaces joined by veth pairs, and drive real TCP traffic through
//! them. This library owns the plumbing so each test reads as a scenario:
//!
//! - [`netns`]: namespace and veth guards, and running code (sockets) inside a namespace;
//! - [`process`]: child-process guards that always kill and reap, and keep logs for failures;
//! - [`binaries`]: where the workspace binaries under test live;
//! - [`pod`]: a pod (namespace + init rules + proxy as its own UID) and a client namespace;
//! - [`admin`]: a tiny HTTP/1.1 client for the proxy's admin port;
//! - [`metrics`]: reading samples out of the proxy's metrics text;
//! - [`traffic`]: echo / digest servers and a checksummed byte stream for transfers;
//! - [`http_peers`]: HTTP/1.1 + h2c app servers, gRPC, curl and raw HTTP/1 clients, route files;
//! - [`sidecar`]: init container + proxy in a namespace the caller wired up, and the admin port
//!   seen from inside it (metrics, `/identity`);
//! - [`mesh`]: the control plane of a local mesh: CA, tokens, policy, `pillion-control serve`.
//!
//! Everything here needs root (namespaces, iptables); tests call [`require_root`] first and skip
//! themselves otherwise, so `cargo test` stays green for unprivileged developers.

pub mod admin;
pub mod binaries;
pub mod http_peers;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod pod;
pub mod process;
pub mod sidecar;
pub mod traffic;

use std::time::{Duration, Instant};

/// Returns `true` when running as root. Otherwise prints why `test` is skipped and returns
/// `false`; callers return early.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    eprintln!("skipping {test}: needs root (network namespaces, iptables); euid is {euid}");
    false
}

/// Polls `check` every `period` until it returns `Some`, for at most `timeout`.
///
/// Every wait in the harness goes through here so that no loop is unbounded.
pub fn poll_until<T>(timeout: Duration, period: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(period);
    }
}
