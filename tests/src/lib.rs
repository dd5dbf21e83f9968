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
//! Everything here needs root (namespaces, iptables) and a few programs; tests call
//! [`require_root`] first and skip themselves otherwise, so `cargo test` stays green for
//! unprivileged developers. Under `CI=true` they fail instead: CI must run them.

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

/// Programs every namespace test runs: `ip` (namespaces, veth), `sysctl` (forwarding, IPv6 off),
/// `setpriv` (the proxy's UID), the iptables tools the init container calls (it finds them in
/// the sbin directories too), and `curl` (the HTTP client of the L7 tests).
pub const REQUIRED_TOOLS: [&str; 8] = [
    "ip",
    "sysctl",
    "setpriv",
    "iptables-nft-restore",
    "iptables-nft-save",
    "ip6tables-nft-restore",
    "ip6tables-nft-save",
    "curl",
];

/// Returns `true` when the namespace tests can run: root, and every [`REQUIRED_TOOLS`] program
/// installed. Otherwise, under `CI=true` it panics with the reason (a green CI that skipped the
/// namespace tests proves nothing); elsewhere it prints why `test` is skipped and returns
/// `false`, and callers return early.
pub fn require_root(test: &str) -> bool {
    match can_run(cannot_run(), in_ci()) {
        Ok(None) => true,
        Ok(Some(reason)) => {
            eprintln!("skipping {test}: {reason}");
            false
        }
        Err(reason) => panic!("{test} cannot run in CI: {reason}"),
    }
}

/// [`require_root`], and also `programs` installed (e.g. `redis-server` for one test): the
/// same decision, so under `CI=true` a missing program fails the test instead of skipping it.
pub fn require_programs(test: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|program| find_program(program).is_none())
        .collect();
    let cannot = cannot_run().or_else(|| {
        (!missing.is_empty()).then(|| {
            format!(
                "missing programs: {} (see .ci/run for the packages)",
                missing.join(", ")
            )
        })
    });
    match can_run(cannot, in_ci()) {
        Ok(None) => true,
        Ok(Some(reason)) => {
            eprintln!("skipping {test}: {reason}");
            false
        }
        Err(reason) => panic!("{test} cannot run in CI: {reason}"),
    }
}

/// The decision of [`require_root`]: run (`Ok(None)`), skip for a reason (`Ok(Some)`), or fail.
fn can_run(cannot: Option<String>, ci: bool) -> Result<Option<String>, String> {
    match cannot {
        Some(reason) if ci => Err(reason),
        other => Ok(other),
    }
}

/// Why the namespace tests cannot run here, if they cannot.
fn cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("needs root (network namespaces, iptables); euid is {euid}"));
    }
    let missing: Vec<&str> = REQUIRED_TOOLS
        .into_iter()
        .filter(|tool| find_program(tool).is_none())
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing programs: {} (see .ci/run for the packages)",
            missing.join(", ")
        ));
    }
    None
}

/// `CI=true` (any case), as CI systems set it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The program's path in PATH or the usual sbin directories (which a non-login PATH may lack).
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(std::path::PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_fails_where_a_developer_skips() {
        assert_eq!(can_run(None, true), Ok(None));
        assert_eq!(can_run(None, false), Ok(None));
        assert_eq!(can_run(Some("needs root".into()), false), Ok(Some("needs root".into())));
        assert_eq!(can_run(Some("needs root".into()), true), Err("needs root".into()));
    }

    #[test]
    fn tools_are_found_in_sbin_too() {
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-pillion").is_none());
    }
}
