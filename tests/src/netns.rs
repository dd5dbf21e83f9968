//! Network namespaces and veth links, as guards.
//!
//! A [`Netns`] is a named namespace (`ip netns add`) that is deleted when the guard drops, also
//! while a failing test unwinds. Names carry the test process's PID and a counter, so tests
//! running in parallel threads (or parallel test binaries) never collide.
//!
//! Code that must live in a namespace — an app server, a client, a probe — runs on a dedicated
//! std thread that first joins the namespace with `setns(2)`. A network namespace is a property
//! of a thread, and a socket belongs to the namespace it was created in for its whole life, so a
//! listener or stream created by [`Netns::run`] can be handed back and used from any thread
//! without its traffic ever touching the host. External commands go through
//! `ip netns exec NAME cmd args` ([`Netns::command`]); nothing is piped through a host process.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Prefix of every namespace this harness creates; followed by `<pid>-<counter>-<name>`.
const PREFIX: &str = "pillion-e2e";

/// Bound on establishing a test connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

/// One end of a [`VethLink`]: the namespace, the interface name inside it and its addresses.
#[derive(Debug, Clone, Copy)]
pub struct VethEnd<'a> {
    pub ns: &'a Netns,
    /// Interface name inside `ns` (at most 15 bytes). Names are per namespace, so `eth0` is fine.
    pub ifname: &'a str,
    /// Address in a /24.
    pub ipv4: Ipv4Addr,
    /// Optional address in a /64 (a ULA such as `fd00::/8`); added with `nodad`.
    pub ipv6: Option<Ipv6Addr>,
}

/// A veth pair between two namespaces, each end addressed and with its default routes pointing
/// at the peer, so all traffic stays between our namespaces. Deleted on drop.
#[derive(Debug)]
pub struct VethLink {
    ns_name: String,
    ifname: String,
}

/// Which ends of a [`VethLink`] get a default route via the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultRoutes {
    Both,
    /// Only the first end (`a`): for a second link to a namespace that already has its default
    /// route, e.g. a client namespace hanging off a pod that is linked to another pod.
    FirstOnly,
}

/// A Linux bridge in a "node" namespace: pods attached to it share one L2 segment, as on a
/// Kubernetes node, and their default route points at the bridge's address. Deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    ns_name: String,
    name: String,
    ipv4: Ipv4Addr,
}

impl Netns {
    /// Creates `pillion-e2e-<pid>-<n>-<name>` with `lo` up.
    ///
    /// Panics when the namespace cannot be created: a test cannot run without it.
    pub fn new(name: &str) -> Netns {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Netns::named(&format!("{PREFIX}-{}-{id}-{name}", std::process::id())).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates the namespace `name` exactly (no prefix, no PID), with `lo` up: for set-ups whose
    /// names a person types, such as the demo's. Fails if it exists.
    pub fn named(name: &str) -> Result<Netns, String> {
        try_run(Command::new("ip").args(["netns", "add", name]))?;
        // From here on the guard owns the namespace: a failure below still deletes it.
        let ns = Netns { name: name.to_owned() };
        try_run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Whether a namespace called `name` exists (e.g. left over by a killed run).
    pub fn exists(name: &str) -> bool {
        std::path::Path::new("/var/run/netns").join(name).exists()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: add arguments, environment and stdio as usual.
    ///
    /// `ip netns exec` execs the program, so the child's PID is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args` in the namespace and returns its output (does not check the status).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running `{program}` in {}: {e}", self.name))
    }

    /// Runs `program args` in the namespace and panics with its stderr unless it succeeds: for
    /// set-up steps (`ip route add …`, `sysctl -w …`). Returns its stdout.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "`{program} {}` in {} failed ({}): {}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a new thread inside the namespace and returns its result; a panic in `f`
    /// propagates. Sockets created by `f` stay in the namespace after they are returned.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || {
                    enter(&path);
                    f()
                })
                .expect("spawning a namespace thread");
            match handle.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts `f` on a new thread inside the namespace (for servers and long-running clients).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = self.path();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                enter(&path);
                f()
            })
            .expect("spawning a namespace thread")
    }

    /// Binds a TCP listener inside the namespace (as root, i.e. not as the proxy's UID).
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.run(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", self.name))
    }

    /// Connects from inside the namespace (bounded), with read/write timeouts set.
    pub fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.run(move || {
            let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
            crate::traffic::set_timeouts(&stream)?;
            Ok(stream)
        })
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The kernel frees the namespace once the last thread and socket in it are gone; deleting
        // the name is all that is ours to do. Veth pairs vanish with it.
        match Command::new("ip").args(["netns", "delete", &self.name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns delete {}: {e}", self.name),
        }
    }
}

impl VethLink {
    /// Creates the pair, addresses both ends, brings them up and routes each side's default
    /// (IPv4, and IPv6 when both ends have an IPv6 address) via the peer.
    pub fn new(a: VethEnd<'_>, b: VethEnd<'_>) -> VethLink {
        VethLink::with_routes(a, b, DefaultRoutes::Both)
    }

    /// Like [`VethLink::new`], with default routes only where `routes` says.
    pub fn with_routes(a: VethEnd<'_>, b: VethEnd<'_>, routes: DefaultRoutes) -> VethLink {
        assert!(
            a.ifname.len() <= 15 && b.ifname.len() <= 15,
            "interface names are ≤ 15 bytes"
        );
        run_checked(Command::new("ip").args([
            "-n",
            a.ns.name(),
            "link",
            "add",
            a.ifname,
            "type",
            "veth",
            "peer",
            "name",
            b.ifname,
            "netns",
            b.ns.name(),
        ]));
        let link = VethLink {
            ns_name: a.ns.name().to_owned(),
            ifname: a.ifname.to_owned(),
        };
        let ipv6 = a.ipv6.is_some() && b.ipv6.is_some();
        for (this, peer, route) in [(a, b, true), (b, a, routes == DefaultRoutes::Both)] {
            let ns = this.ns.name();
            let ip = |args: &[&str]| {
                run_checked(Command::new("ip").args(["-n", ns]).args(args));
            };
            ip(&["addr", "add", &format!("{}/24", this.ipv4), "dev", this.ifname]);
            if let (true, Some(v6)) = (ipv6, this.ipv6) {
                // nodad: the address is usable at once instead of after duplicate detection.
                ip(&["addr", "add", &format!("{v6}/64"), "dev", this.ifname, "nodad"]);
            }
            ip(&["link", "set", this.ifname, "up"]);
            if !route {
                continue;
            }
            ip(&["route", "add", "default", "via", &peer.ipv4.to_string()]);
            if let (true, Some(peer_v6)) = (ipv6, peer.ipv6) {
                ip(&["-6", "route", "add", "default", "via", &peer_v6.to_string()]);
            }
        }
        link
    }
}

impl Drop for VethLink {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. Errors are expected when the namespace went first.
        let _ = Command::new("ip")
            .args(["-n", &self.ns_name, "link", "del", &self.ifname])
            .output();
    }
}

impl Bridge {
    /// Creates bridge `name` in `node` with address `ipv4`/24 and brings it up.
    pub fn new(node: &Netns, name: &str, ipv4: Ipv4Addr) -> Result<Bridge, String> {
        try_run(Command::new("ip").args(["-n", node.name(), "link", "add", name, "type", "bridge"]))?;
        let bridge = Bridge {
            ns_name: node.name().to_owned(),
            name: name.to_owned(),
            ipv4,
        };
        let ip = |args: &[&str]| try_run(Command::new("ip").args(["-n", node.name()]).args(args));
        // A bridge takes the lowest MAC of its ports unless given one, so its MAC would change as
        // pods plug in, and a pod that learned the old one loses its next SYN to the node (a
        // proxy's first connection to the control plane, retried only after the 1 s SYN
        // timeout). A fixed MAC (locally administered, from the address) keeps it stable, as a
        // real node's is.
        let [a, b, c, d] = ipv4.octets();
        ip(&[
            "link",
            "set",
            name,
            "address",
            &format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}"),
        ])?;
        ip(&["addr", "add", &format!("{ipv4}/24"), "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(bridge)
    }

    /// The bridge's address: the pods' default gateway, and where the node's own services listen.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// Plugs `pod` in with a veth pair: `ifname` inside the pod (address `ipv4`/24, default route
    /// via the bridge), `port` on the node side, enslaved to the bridge. The pair goes away with
    /// the pod's namespace.
    pub fn attach(&self, pod: &Netns, ifname: &str, port: &str, ipv4: Ipv4Addr) -> Result<(), String> {
        let node = &self.ns_name;
        try_run(Command::new("ip").args([
            "-n",
            node,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            ifname,
            "netns",
            pod.name(),
        ]))?;
        try_run(Command::new("ip").args(["-n", node, "link", "set", port, "master", &self.name]))?;
        try_run(Command::new("ip").args(["-n", node, "link", "set", port, "up"]))?;
        let ip = |args: &[&str]| try_run(Command::new("ip").args(["-n", pod.name()]).args(args));
        ip(&["addr", "add", &format!("{ipv4}/24"), "dev", ifname])?;
        ip(&["link", "set", ifname, "up"])?;
        ip(&["route", "add", "default", "via", &self.ipv4.to_string()])
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Errors are expected when the node namespace went first.
        let _ = Command::new("ip")
            .args(["-n", &self.ns_name, "link", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the namespace mounted at `path`. Panics on failure: code that
/// runs in the wrong namespace would talk to the host.
fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: `file` keeps the descriptor open for the duration of the call, and setns only reads
    // it. CLONE_NEWNET changes the network namespace of the calling thread alone; every thread
    // that calls this was created to run in that namespace, so no other code is affected.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!("setns({path}): {}", io::Error::last_os_error());
    }
}

/// Runs a host-side setup command and panics with its stderr when it fails.
fn run_checked(cmd: &mut Command) {
    if let Err(e) = try_run(cmd) {
        panic!("{e}");
    }
}

/// Runs a host-side setup command; its stderr is the error when it fails.
fn try_run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}
