//! Before anything is created: are we root, are the tools there, are the binaries built.
//!
//! `cargo run --bin pillion-demo` builds only this package, so the mesh binaries may be missing
//! or older than the source. When cargo launched us (it sets `CARGO`), we run
//! `cargo build --bins` for the three mesh packages in our own profile: a no-op when they are
//! fresh, and the demo never shows a stale proxy. Started directly (`sudo
//! target/release/pillion-demo`), we build only when a binary is missing. `--no-build` never
//! builds (CI, where `cargo build --workspace` came first).

use std::path::{Path, PathBuf};
use std::process::Command;

use pillion_tests::binaries::{self, MESH_BINARIES};

/// The packages whose binaries the mesh runs.
const MESH_PACKAGES: [&str; 3] = ["pillion-proxy", "pillion-iptables-init", "pillion-control"];

/// Root and the network tools, for the namespaces mode.
pub fn check_namespaces_mode() -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Err("the demo needs Linux (network namespaces and iptables); \
             `--no-iptables` runs the proxies on loopback ports instead"
            .into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "the demo needs root to create network namespaces and install iptables rules (euid is {euid}).\n\
             Run it as root:   sudo -E env \"PATH=$PATH\" cargo run --release --bin pillion-demo\n\
             or without root:  cargo run --release --bin pillion-demo -- --no-iptables\n\
             (`--no-iptables` runs both proxies on loopback ports, chained proxy to proxy with mTLS, \
             without namespaces or iptables)"
        ));
    }
    let mut missing = Vec::new();
    for (tool, package) in [("ip", "iproute2"), ("setpriv", "util-linux")] {
        if find_tool(tool).is_none() {
            missing.push(format!("`{tool}` (package {package})"));
        }
    }
    let backend = ["nft", "legacy"].iter().any(|b| {
        find_tool(&format!("iptables-{b}-restore")).is_some() && find_tool(&format!("iptables-{b}-save")).is_some()
    });
    if !backend {
        missing.push("`iptables-nft-restore` or `iptables-legacy-restore` (package iptables)".into());
    }
    if !missing.is_empty() {
        return Err(format!(
            "missing {}; on Debian or Ubuntu: apt-get install iproute2 util-linux iptables",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// `name` on `PATH`, or in the sbin directories that a non-login root shell may lack.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes sure `pillion-proxy`, `pillion-iptables-init` and `pillion-control` are next to us.
pub fn ensure_binaries(no_build: bool) -> Result<(), String> {
    let missing: Vec<String> = MESH_BINARIES
        .iter()
        .filter_map(|(var, name)| binaries::find(var, name).err())
        .collect();
    let launched_by_cargo = std::env::var_os("CARGO").is_some();
    let overridden = MESH_BINARIES.iter().any(|(var, _)| std::env::var_os(var).is_some());
    if no_build || overridden {
        return match missing.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "{}: build them first (`cargo build --release --bins`)",
                missing.join("; ")
            )),
        };
    }
    if missing.is_empty() && !launched_by_cargo {
        return Ok(());
    }
    build()?;
    let still_missing: Vec<String> = MESH_BINARIES
        .iter()
        .filter_map(|(var, name)| binaries::find(var, name).err())
        .collect();
    match still_missing.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "{} after building (a custom --target or --target-dir? build the workspace and run \
             the demo from the same target directory)",
            still_missing.join("; ")
        )),
    }
}

/// `cargo build --bins -p ...` in our profile, from the workspace root.
fn build() -> Result<(), String> {
    let profile_dir = binaries::profile_dir()?;
    let profile_args: Vec<String> = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("release") => vec!["--release".into()],
        Some("debug") | None => Vec::new(),
        Some(other) => vec!["--profile".into(), other.into()],
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .filter(|root| root.join("Cargo.toml").is_file())
        .ok_or("the mesh binaries are missing and the workspace sources are not where this demo was built from")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args(["build", "--bins"]).args(&profile_args);
    for package in MESH_PACKAGES {
        cmd.args(["-p", package]);
    }
    println!(
        "building the mesh binaries (`cargo run` built only the demo): cargo build --bins {}{} in {}",
        profile_args.join(" "),
        MESH_PACKAGES.iter().map(|p| format!(" -p {p}")).collect::<String>(),
        root.display()
    );
    let status = cmd
        .status()
        .map_err(|e| format!("running {}: {e}", Path::new(&cargo).display()))?;
    match status.success() {
        true => Ok(()),
        false => Err(format!("cargo build failed ({status})")),
    }
}
