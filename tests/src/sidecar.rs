//! A pod's init container and native sidecar, started in a namespace the caller owns, and the
//! proxy's admin port as seen from inside that namespace.
//!
//! [`crate::pod::Pod`] builds its own namespace pair. A mesh needs pods wired to each other (a
//! veth between two pods, or a node's bridge), so [`Sidecar::start`] takes a namespace whose
//! network is already set up and runs the same start-up sequence in it: the init container as
//! root, the proxy as UID/GID 2102, then the startup probe (`GET /ready`), as the kubelet would
//! before starting the app containers.
//!
//! Failures are returned, not panicked, with the init container's output and the proxy's log in
//! the message: the demo reports them and cleans up, and tests turn them into a panic.
//!
//! [`AdminPort`] reads probes, metrics and `/identity` from a proxy's admin port, from inside the
//! proxy's namespace (or from the host, for proxies run without namespaces).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::admin::{self, Response};
use crate::metrics::Metrics;
use crate::netns::Netns;
use crate::pod::{ADMIN_PORT, PodOptions, describe_output, proxy_command, run_init};
use crate::process::{LogDir, Process};

const PROBE_PERIOD: Duration = Duration::from_millis(100);
/// Longer than a pod's plain start-up: with an identity, `/ready` also waits for the first
/// certificate from the control plane.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running init container's result and a ready proxy. The proxy is killed on drop.
#[derive(Debug)]
pub struct Sidecar {
    proxy: Process,
    init_log: String,
    ready_after: Duration,
}

/// A proxy's admin port and where it is reachable from.
#[derive(Debug, Clone, Copy)]
pub struct AdminPort<'a> {
    ns: Option<&'a Netns>,
    addr: SocketAddr,
}

/// The parts of `GET /identity` the tests and the demo read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyIdentity {
    pub source: String,
    pub spiffe_id: Option<String>,
    /// notAfter of the certificate in use, unix seconds.
    pub not_after: Option<u64>,
    pub expires_in_seconds: Option<u64>,
}

impl Sidecar {
    /// Runs the init container in `ns`, starts the proxy (its log is `<name>-proxy.log` in
    /// `logs`) and waits for its startup probe.
    pub fn start(ns: &Netns, name: &str, options: &PodOptions, logs: &LogDir) -> Result<Sidecar, String> {
        let mut init_args = Vec::new();
        if options.ipv6 {
            init_args.extend(["--ipv6".to_owned(), "on".to_owned()]);
        }
        init_args.extend(options.init_args.iter().cloned());
        let init = run_init(ns, &init_args);
        let init_log = describe_output("pillion-iptables-init", &init_args, &init);
        if !init.status.success() {
            return Err(format!("{name}: init container failed:\n{init_log}"));
        }

        let mut proxy = Process::spawn(&format!("{name}-proxy"), proxy_command(ns, options), logs);
        let admin = AdminPort::of_pod(ns);
        match startup_probe(&mut proxy, || admin.get("/ready")) {
            Ok(ready_after) => Ok(Sidecar {
                proxy,
                init_log,
                ready_after,
            }),
            Err(reason) => Err(format!(
                "{name}: {reason}\n{init_log}\n----- {name} proxy log ({}) -----\n{}",
                proxy.log_path().display(),
                proxy.log()
            )),
        }
    }

    /// The proxy process, e.g. to signal it or read its log.
    pub fn proxy(&mut self) -> &mut Process {
        &mut self.proxy
    }

    /// The proxy's PID.
    pub fn pid(&self) -> u32 {
        self.proxy.pid()
    }

    /// Everything the proxy logged so far.
    pub fn proxy_log(&self) -> String {
        self.proxy.log()
    }

    /// What the init container printed.
    pub fn init_log(&self) -> &str {
        &self.init_log
    }

    /// How long the proxy took to pass its startup probe.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }
}

/// Polls `probe` (a `GET /ready`) every 100 ms until it answers 200; fails if `proxy` exits or
/// the start-up timeout passes. Returns how long it took.
pub fn startup_probe(proxy: &mut Process, mut probe: impl FnMut() -> io::Result<Response>) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::from("no probe yet");
    let outcome = crate::poll_until(STARTUP_TIMEOUT, PROBE_PERIOD, || {
        if let Some(status) = proxy.try_status() {
            return Some(Err(format!("proxy exited during start-up: {status}")));
        }
        match probe() {
            Ok(r) if r.status == 200 => return Some(Ok(started.elapsed())),
            Ok(r) => last = format!("{} {:?}", r.status, r.body),
            Err(e) => last = e.to_string(),
        }
        None
    });
    outcome.unwrap_or_else(|| {
        Err(format!(
            "proxy not ready after {:?}; last probe: {last}",
            started.elapsed()
        ))
    })
}

impl<'a> AdminPort<'a> {
    /// `127.0.0.1:4191` inside `ns`: the pod's own view, never redirected.
    pub fn of_pod(ns: &'a Netns) -> AdminPort<'a> {
        AdminPort {
            ns: Some(ns),
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ADMIN_PORT),
        }
    }

    /// `addr` inside `ns`.
    pub fn in_ns(ns: &'a Netns, addr: SocketAddr) -> AdminPort<'a> {
        AdminPort { ns: Some(ns), addr }
    }

    /// `addr` in the calling thread's namespace (a proxy run without namespaces).
    pub fn local(addr: SocketAddr) -> AdminPort<'static> {
        AdminPort { ns: None, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> io::Result<Response> {
        let addr = self.addr;
        match self.ns {
            Some(ns) => {
                let path = path.to_owned();
                ns.run(move || admin::get(addr, &path))
            }
            None => admin::get(addr, path),
        }
    }

    /// A scrape of `/metrics`.
    pub fn scrape(&self) -> Result<Metrics, String> {
        let response = self.get("/metrics").map_err(|e| format!("GET /metrics: {e}"))?;
        if response.status != 200 {
            return Err(format!("GET /metrics: {} {}", response.status, response.body));
        }
        Metrics::parse(&response.body).map_err(|e| format!("GET /metrics: {e}"))
    }

    /// A scrape of `/metrics`; panics on anything but a parseable 200.
    pub fn metrics(&self) -> Metrics {
        self.scrape().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Scrapes until the value of `selector` satisfies `accept`, for at most `timeout`; panics
    /// with the last scrape otherwise.
    pub fn wait_metric(&self, selector: &str, timeout: Duration, accept: impl Fn(f64) -> bool) -> f64 {
        crate::metrics::wait_for(|| self.metrics(), selector, timeout, accept)
    }

    /// Waits (up to [`crate::pod::METRIC_TIMEOUT`]) until `selector` is at least `min`.
    pub fn wait_at_least(&self, selector: &str, min: f64) -> f64 {
        self.wait_metric(selector, crate::pod::METRIC_TIMEOUT, |v| v >= min)
    }

    /// `GET /identity`, parsed.
    pub fn identity(&self) -> Result<ProxyIdentity, String> {
        let response = self.get("/identity").map_err(|e| format!("GET /identity: {e}"))?;
        if response.status != 200 {
            return Err(format!("GET /identity: {} {}", response.status, response.body.trim()));
        }
        ProxyIdentity::parse(&response.body)
    }
}

impl ProxyIdentity {
    pub fn parse(json: &str) -> Result<ProxyIdentity, String> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("GET /identity: {e} in {json:?}"))?;
        let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_u64);
        Ok(ProxyIdentity {
            source: text("source").unwrap_or_default(),
            spiffe_id: text("spiffe_id"),
            not_after: number("not_after"),
            expires_in_seconds: number("expires_in_seconds"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_json_is_read() {
        let id = ProxyIdentity::parse(
            r#"{"source":"control-plane","spiffe_id":"spiffe://cluster.local/ns/default/sa/web","sni":"x","not_before":1,"not_after":1790000000,"expires_in_seconds":42,"trust_anchor_sha256":["ab"]}"#,
        )
        .unwrap();
        assert_eq!(id.source, "control-plane");
        assert_eq!(
            id.spiffe_id.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/web")
        );
        assert_eq!(id.not_after, Some(1_790_000_000));
        assert_eq!(id.expires_in_seconds, Some(42));

        let before_first =
            ProxyIdentity::parse(r#"{"source":"control-plane","spiffe_id":null,"not_after":null}"#).unwrap();
        assert_eq!(before_first.spiffe_id, None);
        assert!(ProxyIdentity::parse("not json").is_err());
    }
}
