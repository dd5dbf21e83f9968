//! A local mesh's control plane: the CA, the workloads' tokens, the policy file, and
//! `pillion-control serve` as a guarded process.
//!
//! [`MeshFiles`] lays out what an operator would give the control plane in a directory: a CA made
//! by `pillion-control ca init`, a token file naming each [`Workload`], one token file per
//! workload for its proxy (readable by the proxy's UID only, like a projected service-account
//! token), and the discovery/policy file. The policy is rewritten atomically (write, then
//! rename), as a ConfigMap update is, so the control plane never reads half a file.
//!
//! [`ControlPlane`] runs `pillion-control serve` inside a namespace (or in the caller's, for the
//! demo without namespaces) and waits until its gRPC port accepts connections.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::binaries;
use crate::netns::Netns;
use crate::pod::{PROXY_UID, PodOptions, describe_output, without_pillion_env};
use crate::process::{LogDir, Process};

/// The trust domain of every identity in the local meshes.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The control plane's own identity (`pillion-control serve`'s default), which proxies verify.
pub const CONTROL_IDENTITY: &str = "spiffe://cluster.local/ns/pillion-system/sa/pillion-control";

const SERVING_TIMEOUT: Duration = Duration::from_secs(10);

/// A workload's Kubernetes identity: namespace and service account, and the token that proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    pub token: String,
}

/// The control plane's input files, in one directory.
#[derive(Debug)]
pub struct MeshFiles {
    dir: PathBuf,
}

/// A running `pillion-control serve`; killed on drop.
#[derive(Debug)]
pub struct ControlPlane {
    process: Process,
    listen: SocketAddr,
}

/// How to run the control plane.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// `--cert-lifetime` (e.g. `20s`); the control plane's default (24h) when unset.
    pub cert_lifetime: Option<String>,
    /// Start it in a process group of its own (see [`PodOptions::own_process_group`]).
    pub own_process_group: bool,
}

impl Workload {
    /// `namespace`/`service_account` with a fresh random token.
    pub fn new(namespace: &str, service_account: &str) -> Workload {
        Workload {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            token: format!("{service_account}-{namespace}-{:016x}", random_u64()),
        }
    }

    /// `spiffe://cluster.local/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self) -> String {
        spiffe_id(&self.namespace, &self.service_account)
    }
}

/// `spiffe://cluster.local/ns/<namespace>/sa/<service account>`.
pub fn spiffe_id(namespace: &str, service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}")
}

impl MeshFiles {
    /// Creates the CA (`pillion-control ca init`) and the token files in `dir` (which must exist).
    pub fn create(dir: &Path, workloads: &[&Workload]) -> Result<MeshFiles, String> {
        let files = MeshFiles { dir: dir.to_owned() };
        let mut ca_init = Command::new(binaries::control());
        ca_init.args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--out"]);
        ca_init.arg(files.dir.join("ca"));
        without_pillion_env(&mut ca_init);
        let out = ca_init
            .output()
            .map_err(|e| format!("running pillion-control ca init: {e}"))?;
        if !out.status.success() {
            let args = ["ca".to_owned(), "init".to_owned()];
            return Err(describe_output("pillion-control", &args, &out));
        }

        let mut tokens = String::new();
        for w in workloads {
            tokens.push_str(&format!(
                "- token: {}\n  namespace: {}\n  serviceAccount: {}\n",
                w.token, w.namespace, w.service_account
            ));
            let path = files.token_file(w);
            write(&path, &w.token)?;
            restrict_to_proxy(&path)?;
        }
        write(&files.dir.join("tokens.yaml"), &tokens)?;
        write(&files.policy(), "{}\n")?;
        Ok(files)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root certificate: the proxies' `PILLION_TRUST_ANCHORS_FILE`.
    pub fn trust_anchors(&self) -> PathBuf {
        self.dir.join("ca/root.crt")
    }

    /// The token file of `workload`'s proxy.
    pub fn token_file(&self, workload: &Workload) -> PathBuf {
        self.dir
            .join(format!("{}.{}.token", workload.service_account, workload.namespace))
    }

    /// The control plane's `--policy` file.
    pub fn policy(&self) -> PathBuf {
        self.dir.join("policy.yaml")
    }

    /// Replaces the policy file atomically; the control plane notices within about a second.
    pub fn write_policy(&self, yaml: &str) -> Result<(), String> {
        replace(&self.policy(), yaml)
    }
}

/// Writes `path` atomically: a temporary file in the same directory, then a rename.
pub fn replace(path: &Path, contents: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    write(&tmp, contents)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), path.display()))
}

impl ControlPlane {
    /// Runs `pillion-control serve` listening on `listen`, inside `ns` (or here when `None`), with
    /// the CA, tokens and policy of `files`; waits until it accepts connections.
    pub fn start(
        files: &MeshFiles,
        ns: Option<&Netns>,
        listen: SocketAddr,
        options: &ControlPlaneOptions,
        logs: &LogDir,
    ) -> Result<ControlPlane, String> {
        let mut cmd = match ns {
            Some(ns) => ns.command(binaries::control()),
            None => Command::new(binaries::control()),
        };
        without_pillion_env(&mut cmd);
        let dir = files.dir();
        cmd.arg("serve")
            .arg("--listen")
            .arg(listen.to_string())
            .args(["--trust-domain", TRUST_DOMAIN])
            .arg("--issuer-cert")
            .arg(dir.join("ca/issuer.crt"))
            .arg("--issuer-key")
            .arg(dir.join("ca/issuer.key"))
            .arg("--trust-anchors")
            .arg(files.trust_anchors())
            .arg("--tokens")
            .arg(dir.join("tokens.yaml"))
            .arg("--policy")
            .arg(files.policy())
            .env("PILLION_LOG", "info,pillion_control=debug");
        if let Some(lifetime) = &options.cert_lifetime {
            cmd.args(["--cert-lifetime", lifetime]);
        }
        if options.own_process_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let mut process = Process::spawn("pillion-control", cmd, logs);

        let started = Instant::now();
        let connect = || match ns {
            Some(ns) => ns.run(move || TcpStream::connect_timeout(&listen, Duration::from_secs(1))),
            None => TcpStream::connect_timeout(&listen, Duration::from_secs(1)),
        };
        let serving = crate::poll_until(SERVING_TIMEOUT, Duration::from_millis(50), || {
            if let Some(status) = process.try_status() {
                return Some(Err(format!("pillion-control exited: {status}")));
            }
            connect().ok().map(|_| Ok(()))
        });
        match serving {
            Some(Ok(())) => Ok(ControlPlane { process, listen }),
            Some(Err(reason)) => Err(format!("{reason}\n{}", process.log())),
            None => Err(format!(
                "pillion-control not accepting on {listen} after {:?}\n{}",
                started.elapsed(),
                process.log()
            )),
        }
    }

    /// The proxies' `PILLION_CONTROL_ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The control plane's PID.
    pub fn process_id(&self) -> u32 {
        self.process.pid()
    }

    /// The process, e.g. to kill it or read its log.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Adds what a proxy needs to take `workload`'s identity from `control`: the control plane's
/// address and identity (TLS on the control channel), the identity the workload must be issued,
/// the workload's token file and the trust anchors.
pub fn identity_env(options: PodOptions, control: &ControlPlane, files: &MeshFiles, workload: &Workload) -> PodOptions {
    options
        .proxy_env("PILLION_CONTROL_ADDR", &control.url())
        .proxy_env("PILLION_CONTROL_IDENTITY", CONTROL_IDENTITY)
        .proxy_env("PILLION_IDENTITY_SPIFFE_ID", &workload.spiffe_id())
        .proxy_env(
            "PILLION_IDENTITY_TOKEN_FILE",
            &files.token_file(workload).to_string_lossy(),
        )
        .proxy_env("PILLION_TRUST_ANCHORS_FILE", &files.trust_anchors().to_string_lossy())
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("writing {}: {e}", path.display()))?;
    // Read by the proxy (UID 2102) and the control plane.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// A token is a secret: owner-only, and the owner is the proxy's UID when we can arrange it.
fn restrict_to_proxy(path: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// 64 random bits from the kernel, for tokens.
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes));
    if filled.is_err() {
        // Not a security boundary (local test meshes): fall back to the clock and PID.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_identity_and_token() {
        let w = Workload::new("default", "client");
        assert_eq!(w.spiffe_id(), "spiffe://cluster.local/ns/default/sa/client");
        assert!(w.token.len() >= 16, "the control plane wants tokens of 16+ characters");
        assert_ne!(w.token, Workload::new("default", "client").token);
    }

    #[test]
    fn replace_is_atomic_and_complete() {
        let dir = LogDir::new("replace");
        let path = dir.path().join("policy.yaml");
        replace(&path, "a: 1\n").unwrap();
        replace(&path, "a: 22\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a: 22\n");
        assert!(!path.with_extension("tmp").exists());
    }
}
