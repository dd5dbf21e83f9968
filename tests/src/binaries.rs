//! Where the binaries under test live.
//!
//! Cargo builds every workspace binary into `target/<profile>/`, and a test executable runs from
//! `target/<profile>/deps/`. The binaries are looked up relative to the running test, so the
//! profile (debug, release, a custom one) and a custom `CARGO_TARGET_DIR` just work. Cargo only
//! exposes `CARGO_BIN_EXE_*` for a package's own binaries, hence this lookup.
//!
//! `PILLION_E2E_PROXY` and `PILLION_E2E_IPTABLES_INIT` override the paths, e.g. to run the suite
//! against a release build or an installed package.

use std::path::PathBuf;

/// `target/<profile>/pillion-proxy`.
pub fn proxy() -> PathBuf {
    locate("PILLION_E2E_PROXY", "pillion-proxy")
}

/// `target/<profile>/pillion-iptables-init`.
pub fn iptables_init() -> PathBuf {
    locate("PILLION_E2E_IPTABLES_INIT", "pillion-iptables-init")
}

fn locate(override_var: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_var) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{override_var}={} is not a file", path.display());
        return path;
    }
    let exe = std::env::current_exe().expect("locating the test executable");
    // .../target/<profile>/deps/<test> → .../target/<profile>/
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace` first",
        path.display()
    );
    path
}
