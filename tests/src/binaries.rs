//! Where the binaries under test live.
//!
//! Cargo builds every workspace binary into `target/<profile>/`, and a test executable runs from
//! `target/<profile>/deps/`. The binaries are looked up relative to the running executable, so the
//! profile (debug, release, a custom one) and a custom `CARGO_TARGET_DIR` just work. Cargo only
//! exposes `CARGO_BIN_EXE_*` for a package's own binaries, hence this lookup. `pillion-demo` lives
//! in `target/<profile>/` itself and finds its siblings the same way.
//!
//! `PILLION_E2E_PROXY`, `PILLION_E2E_IPTABLES_INIT` and `PILLION_E2E_CONTROL` override the paths,
//! e.g. to run the suite against a release build or an installed package.

use std::path::PathBuf;

/// `target/<profile>/pillion-proxy`.
pub fn proxy() -> PathBuf {
    locate("PILLION_E2E_PROXY", "pillion-proxy")
}

/// `target/<profile>/pillion-iptables-init`.
pub fn iptables_init() -> PathBuf {
    locate("PILLION_E2E_IPTABLES_INIT", "pillion-iptables-init")
}

/// `target/<profile>/pillion-control`.
pub fn control() -> PathBuf {
    locate("PILLION_E2E_CONTROL", "pillion-control")
}

/// Every binary the mesh needs, with its override variable: `(variable, file name)`.
pub const MESH_BINARIES: [(&str, &str); 3] = [
    ("PILLION_E2E_PROXY", "pillion-proxy"),
    ("PILLION_E2E_IPTABLES_INIT", "pillion-iptables-init"),
    ("PILLION_E2E_CONTROL", "pillion-control"),
];

/// `target/<profile>/`: the running executable's directory, or its parent when that is `deps/`
/// (test executables).
pub fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating the running executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("unexpected executable path {}", exe.display()))?;
    match dir.file_name() {
        Some(name) if name == "deps" => dir
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| format!("unexpected test executable path {}", exe.display())),
        _ => Ok(dir.to_path_buf()),
    }
}

/// The path of `name` (honouring `override_var`), or why it is not there.
pub fn find(override_var: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(override_var) {
        let path = PathBuf::from(path);
        return match path.is_file() {
            true => Ok(path),
            false => Err(format!("{override_var}={} is not a file", path.display())),
        };
    }
    let path = profile_dir()?.join(name);
    match path.is_file() {
        true => Ok(path),
        false => Err(format!("{} not found", path.display())),
    }
}

fn locate(override_var: &str, name: &str) -> PathBuf {
    find(override_var, name).unwrap_or_else(|e| panic!("{e}: run `cargo build --workspace` first"))
}
