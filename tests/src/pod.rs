//! A pod, the way Kubernetes would run it, built from a network namespace.
//!
//! [`Pod::start`] reproduces the pod's start-up order:
//!
//! 1. the pod namespace, joined by a veth pair to a client namespace that plays "the rest of the
//!    cluster" (its default routes point at each other, so no traffic reaches the host);
//! 2. the init container: `pillion-iptables-init` runs as root inside the pod namespace and must
//!    exit 0;
//! 3. the native sidecar: `pillion-proxy` runs as UID/GID 2102 (`setpriv`, like the injected
//!    `runAsUser`) — the UID the redirect rules exempt;
//! 4. the startup probe: `GET /ready` on the admin port every 100 ms, for at most 10 s.
//!
//! The app is whatever the test runs in [`Pod::ns`] as root (any UID other than the proxy's), so
//! its traffic is redirected like a real app's. Guards tear everything down in reverse order when
//! the `Pod` drops; on a failing test the proxy's and the init container's logs are printed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crate::admin::{self, Response};
use crate::binaries;
use crate::metrics::Metrics;
use crate::netns::{Netns, VethEnd, VethLink};
use crate::process::{LogDir, Process};

/// The proxy's UID and GID, as in the injected pod spec (and iptables-init's default).
pub const PROXY_UID: u32 = 2102;
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
pub const ADMIN_PORT: u16 = 4191;
/// Drain time given to every test proxy; short, so SIGTERM tests finish quickly.
pub const SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// How long tests wait for a metric to reflect traffic that already happened.
pub const METRIC_TIMEOUT: Duration = Duration::from_secs(5);

const PROBE_PERIOD: Duration = Duration::from_millis(100);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Third octet of the next pod subnet (`10.200.<n>.0/24`). Namespaces keep tests apart anyway;
/// distinct subnets only make logs of parallel tests easier to tell apart.
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// How to start a [`Pod`].
#[derive(Debug, Clone, Default)]
pub struct PodOptions {
    pub(crate) ipv6: bool,
    pub(crate) ipv6_addresses: bool,
    pub(crate) init_args: Vec<String>,
    pub(crate) proxy_env: Vec<(String, String)>,
    pub(crate) own_process_group: bool,
}

/// A running pod: namespace, redirect rules, ready proxy, and a client namespace next to it.
///
/// Fields drop in declaration order: the proxy is killed first, the log directory goes last.
#[derive(Debug)]
pub struct Pod {
    proxy: Process,
    _link: VethLink,
    /// The pod's network namespace: run the app here.
    pub ns: Netns,
    /// The client namespace at the other end of the pod's veth.
    pub client: Netns,
    pub ip: Ipv4Addr,
    pub client_ip: Ipv4Addr,
    /// Set when the pod was started with [`PodOptions::ipv6`].
    pub ip6: Option<Ipv6Addr>,
    pub client_ip6: Option<Ipv6Addr>,
    init_args: Vec<String>,
    init_log: String,
    logs: LogDir,
}

impl PodOptions {
    /// Dual stack: IPv6 addresses on the veth and `--ipv6 on` for the init container. The proxy
    /// runs with its default listeners, which include the IPv6 twins `[::]:4143` and `[::1]:4140`.
    pub fn ipv6(mut self) -> Self {
        self.ipv6 = true;
        self.ipv6_addresses = true;
        self
    }

    /// IPv6 addresses on the veth (a global ULA on each end), and the init container's `--ipv6`
    /// left to the caller: default `auto` (which then redirects IPv6), or `off` via
    /// [`PodOptions::init_args`].
    pub fn ipv6_addresses(mut self) -> Self {
        self.ipv6_addresses = true;
        self
    }

    /// Extra `pillion-iptables-init` flags, e.g. `["--inbound-ports-to-ignore", "4191,7070"]`.
    pub fn init_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.init_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets (or overrides) one of the proxy's environment variables.
    pub fn proxy_env(mut self, key: &str, value: &str) -> Self {
        self.proxy_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the proxy in a process group of its own, so a Ctrl-C in the terminal reaches only
    /// the program that started it, which then stops the proxy in order (the demo does this).
    pub fn own_process_group(mut self) -> Self {
        self.own_process_group = true;
        self
    }
}

impl Pod {
    /// Starts a pod with default options. `name` is a short tag for namespace and log names.
    pub fn start(name: &str) -> Pod {
        Pod::start_with(name, PodOptions::default())
    }

    /// Starts a pod and waits for the proxy's startup probe to pass; panics if it does not.
    pub fn start_with(name: &str, options: PodOptions) -> Pod {
        let logs = LogDir::new(name);
        let subnet = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let ip = Ipv4Addr::new(10, 200, subnet, 2);
        let client_ip = Ipv4Addr::new(10, 200, subnet, 1);
        let (ip6, client_ip6) = if options.ipv6_addresses {
            let v6 = |host| Ipv6Addr::new(0xfd00, 0x200, u16::from(subnet), 0, 0, 0, 0, host);
            (Some(v6(2)), Some(v6(1)))
        } else {
            (None, None)
        };

        let ns = Netns::new(&format!("{name}-pod"));
        let client = Netns::new(&format!("{name}-cli"));
        let link = VethLink::new(
            VethEnd {
                ns: &ns,
                ifname: "eth0",
                ipv4: ip,
                ipv6: ip6,
            },
            VethEnd {
                ns: &client,
                ifname: "eth0",
                ipv4: client_ip,
                ipv6: client_ip6,
            },
        );

        let mut init_args = Vec::new();
        if options.ipv6 {
            init_args.extend(["--ipv6".to_owned(), "on".to_owned()]);
        }
        init_args.extend(options.init_args.iter().cloned());
        let init = run_init(&ns, &init_args);
        let init_log = describe_output("pillion-iptables-init", &init_args, &init);
        assert!(init.status.success(), "init container failed:\n{init_log}");

        let proxy = Process::spawn("pillion-proxy", proxy_command(&ns, &options), &logs);
        let mut pod = Pod {
            proxy,
            _link: link,
            ns,
            client,
            ip,
            client_ip,
            ip6,
            client_ip6,
            init_args,
            init_log,
            logs,
        };
        pod.wait_ready();
        pod
    }

    /// `podIP:port` over IPv4.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// `[podIPv6]:port`; panics unless the pod has IPv6.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6.expect("pod started without IPv6")), port)
    }

    /// `clientIP:port` over IPv4.
    pub fn client_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.client_ip), port)
    }

    /// `[clientIPv6]:port`; panics unless the pod has IPv6.
    pub fn client_addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.client_ip6.expect("pod started without IPv6")), port)
    }

    /// The proxy process, e.g. to signal it or read its log.
    pub fn proxy(&mut self) -> &mut Process {
        &mut self.proxy
    }

    /// Where this pod's logs are written.
    pub fn log_dir(&self) -> &std::path::Path {
        self.logs.path()
    }

    /// `GET path` on the admin port, from inside the pod (loopback, so never redirected).
    pub fn admin_get(&self, path: &str) -> io::Result<Response> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ADMIN_PORT);
        let path = path.to_owned();
        self.ns.run(move || admin::get(addr, &path))
    }

    /// A scrape of `/metrics`; panics on anything but a parseable 200.
    pub fn metrics(&self) -> Metrics {
        let response = self
            .admin_get("/metrics")
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(response.status, 200, "GET /metrics: {}", response.body);
        Metrics::parse(&response.body).unwrap_or_else(|e| panic!("GET /metrics: {e}"))
    }

    /// Scrapes until the value of `selector` satisfies `accept` (metrics may be recorded
    /// asynchronously, e.g. byte counts when a connection ends); bounded by `timeout`.
    pub fn wait_metric(&self, selector: &str, timeout: Duration, accept: impl Fn(f64) -> bool) -> f64 {
        crate::metrics::wait_for(|| self.metrics(), selector, timeout, accept)
    }

    /// Waits (up to [`METRIC_TIMEOUT`]) until `selector` is at least `min`; returns its value.
    pub fn wait_at_least(&self, selector: &str, min: f64) -> f64 {
        self.wait_metric(selector, METRIC_TIMEOUT, |v| v >= min)
    }

    /// Runs the startup probe: `/ready` must answer 200 within the startup timeout.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        let mut last = String::from("no probe yet");
        let outcome = crate::poll_until(STARTUP_TIMEOUT, PROBE_PERIOD, || {
            if let Some(status) = self.proxy.try_status() {
                return Some(Err(format!("proxy exited during start-up: {status}")));
            }
            match self.admin_get("/ready") {
                Ok(r) if r.status == 200 => return Some(Ok(())),
                Ok(r) => last = format!("{} {:?}", r.status, r.body),
                Err(e) => last = e.to_string(),
            }
            None
        });
        match outcome {
            Some(Ok(())) => {}
            Some(Err(reason)) => panic!("{reason}"),
            None => panic!("proxy not ready after {:?}; last probe: {last}", started.elapsed()),
        }
    }

    /// The flags the init container ran with.
    pub fn init_args(&self) -> &[String] {
        &self.init_args
    }

    /// Runs the init container again with the same flags (as a restarted pod would).
    pub fn rerun_init(&self) -> Output {
        run_init(&self.ns, &self.init_args)
    }

    /// The NAT rules in the pod, IPv4 and IPv6, from whichever backend holds Pillion's chains.
    ///
    /// Comment lines (`#`, with timestamps) are dropped and packet counters zeroed, so two dumps
    /// of the same rules compare equal. The legacy backend is only listed when nft holds nothing
    /// of ours: listing a legacy table creates it, which would change what the init container
    /// sees on its next run.
    pub fn nat_rules(&self) -> String {
        let nft = self.save_table(&["iptables-nft-save", "ip6tables-nft-save"], "nat");
        if nft.contains("PILLION_") {
            return nft;
        }
        self.save_table(&["iptables-legacy-save", "ip6tables-legacy-save"], "nat")
    }

    /// The IPv6 filter table (nft backend), cleaned like [`Pod::nat_rules`]: where the init
    /// container refuses inbound IPv6 that it does not redirect.
    pub fn ipv6_filter_rules(&self) -> String {
        self.save_table(&["ip6tables-nft-save"], "filter")
    }

    fn save_table(&self, tools: &[&str], table: &str) -> String {
        let mut dump = String::new();
        for tool in tools {
            let out = self.ns.exec(tool, &["-t", table]);
            dump.push_str(&format!("== {tool} -t {table} ({}) ==\n", out.status));
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if !line.starts_with('#') {
                    dump.push_str(&zero_counters(line));
                    dump.push('\n');
                }
            }
        }
        dump
    }

    /// `ss -tanio` in the pod and in the client namespace: socket states and queues, for
    /// failure messages about stalled or stuck connections.
    pub fn sockets(&self) -> String {
        let mut report = String::new();
        for ns in [&self.ns, &self.client] {
            let out = ns.exec("ss", &["-tanio"]);
            report.push_str(&format!(
                "== ss -tanio in {} ==\n{}{}",
                ns.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        report
    }

    /// Sends SIGTERM to the proxy and waits up to `timeout` for its exit status.
    pub fn terminate_proxy(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proxy.terminate(timeout)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- pod {} (ip {}, client {}) -----\n{}",
                self.ns.name(),
                self.ip,
                self.client_ip,
                self.init_log
            );
        }
    }
}

/// `ip netns exec POD pillion-iptables-init ARGS`, as root.
pub(crate) fn run_init(ns: &Netns, args: &[String]) -> Output {
    let mut cmd = ns.command(binaries::iptables_init());
    cmd.args(args);
    without_pillion_env(&mut cmd);
    cmd.output()
        .unwrap_or_else(|e| panic!("running pillion-iptables-init: {e}"))
}

/// `ip netns exec POD setpriv --reuid=2102 --regid=2102 --clear-groups pillion-proxy`.
///
/// Both `ip netns exec` and `setpriv` exec, so the child's PID is the proxy's own.
pub(crate) fn proxy_command(ns: &Netns, options: &PodOptions) -> Command {
    let mut cmd = ns.command("setpriv");
    cmd.arg(format!("--reuid={PROXY_UID}"))
        .arg(format!("--regid={PROXY_UID}"))
        .arg("--clear-groups")
        .arg(binaries::proxy());
    without_pillion_env(&mut cmd);
    // The inbound and outbound listeners are left at their defaults (0.0.0.0:4143 and
    // 127.0.0.1:4140, plus their IPv6 twins when the namespace has IPv6), as an injected pod
    // runs them: the tests prove the defaults, not a hand-picked variant.
    cmd.env("PILLION_ADMIN_ADDR", format!("0.0.0.0:{ADMIN_PORT}"))
        .env("PILLION_LOG", "debug")
        .env(
            "PILLION_SHUTDOWN_GRACE_PERIOD",
            format!("{}s", SHUTDOWN_GRACE_PERIOD.as_secs()),
        )
        .env("RUST_BACKTRACE", "1");
    for (key, value) in &options.proxy_env {
        cmd.env(key, value);
    }
    if options.own_process_group {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    cmd
}

/// Keeps a developer's own `PILLION_*` settings out of the binaries under test.
pub fn without_pillion_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PILLION_") {
            cmd.env_remove(key);
        }
    }
}

/// `:CHAIN POLICY [12:345]` → `:CHAIN POLICY [0:0]`; other lines unchanged.
fn zero_counters(line: &str) -> String {
    match (line.starts_with(':'), line.rfind(" [")) {
        (true, Some(at)) if line.ends_with(']') => format!("{} [0:0]", &line[..at]),
        _ => line.to_owned(),
    }
}

/// A readable account of a finished command, for logs and failure messages.
pub fn describe_output(program: &str, args: &[String], out: &Output) -> String {
    format!(
        "$ {program} {}\nexit: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_zeroed_on_chain_lines_only() {
        assert_eq!(zero_counters(":PREROUTING ACCEPT [12:720]"), ":PREROUTING ACCEPT [0:0]");
        assert_eq!(zero_counters(":PILLION_IN - [0:0]"), ":PILLION_IN - [0:0]");
        assert_eq!(
            zero_counters("-A PREROUTING -p tcp -j PILLION_IN"),
            "-A PREROUTING -p tcp -j PILLION_IN"
        );
    }
}
