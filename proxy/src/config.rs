//! Configuration: flags and `PILLION_*` environment variables → one validated [`Config`].
//!
//! Everything an operator can get wrong is checked here, before a socket is bound, so a bad
//! value is a one-line error naming the flag and its variable, with exit code 2 (the contract).

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{
    CommandFactory, FromArgMatches, Parser, ValueEnum,
    error::{ContextKind, ContextValue, ErrorKind},
    parser::ValueSource,
};
use serde::{Serialize, Serializer};
use tracing_subscriber::EnvFilter;

use crate::{authz::Authorization, tls::spiffe::SpiffeId};

/// The proxy's settings after validation; the single source of truth passed down to the runtime.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub inbound_addr: SocketAddr,
    pub outbound_addrs: Vec<SocketAddr>,
    /// The IPv6 twins of the default listeners (`[::]:4143`, `[::1]:4140`), bound next to them
    /// when the host has IPv6, so IPv6 that iptables-init redirects finds a listener. `None`
    /// when the operator set the address: then it is exactly what was asked for.
    pub inbound_ipv6_twin: Option<SocketAddr>,
    pub outbound_ipv6_twin: Option<SocketAddr>,
    /// The only original destinations inbound forwards to: the pod's own addresses.
    pub inbound_ips: InboundIps,
    pub admin_addr: SocketAddr,
    /// Without iptables: where inbound connections go instead of their original destination.
    pub inbound_target: Option<SocketAddr>,
    /// Without iptables: where outbound connections go instead of their original destination.
    pub outbound_target: Option<SocketAddr>,
    pub log: String,
    pub log_format: LogFormat,
    #[serde(serialize_with = "human_duration")]
    pub shutdown_grace_period: Duration,
    #[serde(serialize_with = "human_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "human_duration")]
    pub tcp_keepalive: Duration,
    pub worker_threads: usize,
    /// Route file (`PILLION_CONFIG`); reloaded on change.
    pub route_file: Option<PathBuf>,
    #[serde(serialize_with = "human_duration")]
    pub detect_timeout: Duration,
    pub opaque_ports: PortSet,
    #[serde(serialize_with = "human_duration")]
    pub http_idle_timeout: Duration,
    pub http_max_header_bytes: usize,
    pub access_log: bool,
    /// Concurrent connections per listener direction; more are closed at accept.
    pub max_connections: usize,
    /// Opaque TCP: a connection with no bytes either way for this long is closed.
    #[serde(serialize_with = "human_duration")]
    pub tcp_idle_timeout: Duration,
    pub discovery_max_destinations: usize,
    #[serde(serialize_with = "human_duration")]
    pub discovery_idle_timeout: Duration,
    /// Control-plane gRPC address (`http://host:port`); `None` = standalone.
    pub control_addr: Option<String>,
    /// How the control plane is reached: TLS to this identity, or plaintext by explicit choice.
    pub control_channel: ControlChannel,
    /// The identity this proxy must be issued (`PILLION_IDENTITY_SPIFFE_ID`); any other is refused.
    #[serde(serialize_with = "display_option")]
    pub expected_identity: Option<SpiffeId>,
    pub identity: IdentitySource,
    pub trust_anchors: Option<TrustAnchors>,
    #[serde(serialize_with = "display")]
    pub inbound_default_authorization: Authorization,
}

/// How the proxy talks to the control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "security")]
pub enum ControlChannel {
    /// No control plane configured.
    None,
    /// TLS 1.3; the control plane must present this SPIFFE ID, chained to the trust anchors.
    Tls {
        #[serde(serialize_with = "display")]
        identity: SpiffeId,
    },
    /// Plaintext, because the operator said so (`PILLION_CONTROL_PLAINTEXT=true`): development only.
    Plaintext,
}

/// Where the workload certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "source")]
pub enum IdentitySource {
    None,
    /// A CSR to the control plane, authenticated by this token.
    ControlPlane {
        token_file: PathBuf,
    },
    /// Static files, re-read on change.
    Files {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrustAnchors {
    Pem(String),
    File(PathBuf),
}

/// The pod's own addresses, and where the list came from (shown in `/config`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InboundIps {
    /// `PILLION_INBOUND_IPS`, or `interfaces` (read at start-up, loopback left out).
    pub source: &'static str,
    pub addrs: Vec<IpAddr>,
}

/// Ports and ranges, e.g. `25,587,3306,9000-9100`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Command-line surface; every flag can also come from its environment variable.
#[derive(Debug, Parser)]
#[command(name = "pillion-proxy", version, about = "Pillion's transparent sidecar proxy")]
struct Args {
    /// Listener for traffic entering the pod (iptables-init redirects it here). Left at the
    /// default, its IPv6 twin `[::]:4143` is bound too when the host has IPv6.
    #[arg(
        long,
        env = "PILLION_INBOUND_ADDR",
        default_value = "0.0.0.0:4143",
        value_name = "ADDR"
    )]
    inbound_addr: SocketAddr,

    /// The pod's own addresses, comma separated (the injector passes `status.podIPs`): inbound
    /// forwards only connections whose original destination is one of them. Default: the
    /// addresses of the pod's interfaces, loopback excluded.
    #[arg(long, env = "PILLION_INBOUND_IPS", value_name = "IP[,IP]", value_parser = parse_ips)]
    inbound_ips: Option<IpList>,

    /// Set after parsing: whether the listener addresses are clap's defaults (then the IPv6
    /// twins are bound too).
    #[arg(skip)]
    default_listeners: (bool, bool),

    /// Listener(s) for traffic leaving the app, comma separated (e.g. `127.0.0.1:4140,[::1]:4140`).
    /// Left at the default, `[::1]:4140` is bound too when the host has IPv6.
    #[arg(
        long,
        env = "PILLION_OUTBOUND_ADDR",
        default_value = "127.0.0.1:4140",
        value_delimiter = ',',
        value_name = "ADDR[,ADDR]"
    )]
    outbound_addr: Vec<SocketAddr>,

    /// Admin server: probes, metrics, log level, shutdown.
    #[arg(
        long,
        env = "PILLION_ADMIN_ADDR",
        default_value = "0.0.0.0:4191",
        value_name = "ADDR"
    )]
    admin_addr: SocketAddr,

    /// Without iptables: send every inbound connection to this address (e.g. the app on localhost).
    #[arg(long, env = "PILLION_INBOUND_TARGET", value_name = "ADDR")]
    inbound_target: Option<SocketAddr>,

    /// Without iptables: send every outbound connection to this address (e.g. a peer proxy).
    #[arg(long, env = "PILLION_OUTBOUND_TARGET", value_name = "ADDR")]
    outbound_target: Option<SocketAddr>,

    /// Tracing filter in EnvFilter syntax (e.g. `info,pillion_proxy=debug`).
    #[arg(long, env = "PILLION_LOG", default_value = "info", value_name = "FILTER", value_parser = parse_filter)]
    log: String,

    /// Log line format.
    #[arg(long, env = "PILLION_LOG_FORMAT", default_value = "plain", value_name = "FORMAT")]
    log_format: LogFormat,

    /// Longest time to let open connections finish after SIGTERM or `POST /shutdown`.
    #[arg(long, env = "PILLION_SHUTDOWN_GRACE_PERIOD", default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    shutdown_grace_period: Duration,

    /// Longest time to wait for an upstream TCP connection to be established. The default lets a
    /// dropped SYN be retransmitted (the kernel's first retransmission comes after 1 s).
    #[arg(long, env = "PILLION_CONNECT_TIMEOUT", default_value = "3s", value_name = "DURATION", value_parser = parse_nonzero_duration)]
    connect_timeout: Duration,

    /// Idle time before TCP keepalive probes start, on both sides of every connection.
    #[arg(long, env = "PILLION_TCP_KEEPALIVE", default_value = "10s", value_name = "DURATION", value_parser = parse_nonzero_duration)]
    tcp_keepalive: Duration,

    /// Route file (routes, timeouts, retries; see docs/routes.md), reloaded when it changes.
    #[arg(long = "config", env = "PILLION_CONFIG", value_name = "PATH")]
    route_file: Option<PathBuf>,

    /// Longest wait for a client's first bytes before treating the connection as opaque TCP.
    #[arg(long, env = "PILLION_DETECT_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_nonzero_duration)]
    detect_timeout: Duration,

    /// Destination ports never inspected (server-speaks-first protocols), ports and ranges.
    #[arg(long, env = "PILLION_OPAQUE_PORTS", default_value = "25,587,3306,4444,5432,6379,9300,11211", value_name = "PORTS", value_parser = parse_ports)]
    opaque_ports: PortSet,

    /// HTTP/1 connections: longest wait for the next request's headers, so also the keep-alive idle limit.
    #[arg(long, env = "PILLION_HTTP_IDLE_TIMEOUT", default_value = "60s", value_name = "DURATION", value_parser = parse_nonzero_duration)]
    http_idle_timeout: Duration,

    /// Largest request head (request line and headers) accepted; larger ones get 431.
    #[arg(long, env = "PILLION_HTTP_MAX_HEADER_BYTES", default_value = "65536", value_name = "BYTES", value_parser = clap::value_parser!(u32).range(8192..=16_777_216))]
    http_max_header_bytes: u32,

    /// Control-plane address (`host:port` or `http://host:port`): identity and discovery. Unset = standalone.
    #[arg(long, env = "PILLION_CONTROL_ADDR", value_name = "ADDR", value_parser = parse_control_addr)]
    control_addr: Option<String>,

    /// The SPIFFE ID the control plane must present (TLS on the control channel), e.g.
    /// spiffe://cluster.local/ns/pillion-system/sa/pillion-control.
    #[arg(long, env = "PILLION_CONTROL_IDENTITY", value_name = "SPIFFE_ID", value_parser = parse_spiffe_id)]
    control_identity: Option<SpiffeId>,

    /// Talk to the control plane in plaintext, unauthenticated: local development only.
    #[arg(long, env = "PILLION_CONTROL_PLAINTEXT", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    control_plaintext: bool,

    /// The SPIFFE ID this proxy expects to be issued; a certificate for any other is refused.
    #[arg(long, env = "PILLION_IDENTITY_SPIFFE_ID", value_name = "SPIFFE_ID", value_parser = parse_spiffe_id)]
    identity_spiffe_id: Option<SpiffeId>,

    /// Workload token sent with certificate requests (e.g. a projected service-account token).
    #[arg(long, env = "PILLION_IDENTITY_TOKEN_FILE", value_name = "PATH")]
    identity_token_file: Option<PathBuf>,

    /// Static workload certificate chain (PEM, leaf first), instead of the control plane; re-read on change.
    #[arg(long, env = "PILLION_IDENTITY_CERT_FILE", value_name = "PATH")]
    identity_cert_file: Option<PathBuf>,

    /// Private key for PILLION_IDENTITY_CERT_FILE (PEM); re-read on change.
    #[arg(long, env = "PILLION_IDENTITY_KEY_FILE", value_name = "PATH")]
    identity_key_file: Option<PathBuf>,

    /// Mesh trust anchors, PEM text.
    #[arg(long, env = "PILLION_TRUST_ANCHORS", value_name = "PEM", hide_env_values = true)]
    trust_anchors: Option<String>,

    /// Mesh trust anchors, PEM file.
    #[arg(
        long,
        env = "PILLION_TRUST_ANCHORS_FILE",
        value_name = "PATH",
        conflicts_with = "trust_anchors"
    )]
    trust_anchors_file: Option<PathBuf>,

    /// Authorization for inbound ports that no policy names: all-unauthenticated, all-authenticated or deny.
    #[arg(long, env = "PILLION_INBOUND_DEFAULT_AUTHORIZATION", default_value = "all-unauthenticated", value_name = "POLICY", value_parser = str::parse::<Authorization>)]
    inbound_default_authorization: Authorization,

    /// Log one line per HTTP request (target `pillion::access`; JSON lines with --log-format json).
    #[arg(long, env = "PILLION_ACCESS_LOG", default_value_t = false, value_name = "BOOL", action = clap::ArgAction::Set)]
    access_log: bool,

    /// Concurrent connections each listener direction serves; more are closed at accept.
    #[arg(long, env = "PILLION_MAX_CONNECTIONS", default_value = "10000", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,

    /// Opaque TCP: close a connection with no bytes in either direction for this long.
    #[arg(long, env = "PILLION_TCP_IDLE_TIMEOUT", default_value = "1h", value_name = "DURATION", value_parser = parse_nonzero_duration)]
    tcp_idle_timeout: Duration,

    /// Most destinations followed on the control plane at once (one stream each).
    #[arg(long, env = "PILLION_DISCOVERY_MAX_DESTINATIONS", default_value = "1000", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    discovery_max_destinations: u32,

    /// A destination not used for this long stops being followed on the control plane.
    #[arg(long, env = "PILLION_DISCOVERY_IDLE_TIMEOUT", default_value = "5m", value_name = "DURATION", value_parser = parse_nonzero_duration)]
    discovery_idle_timeout: Duration,

    /// Runtime worker threads; 1 runs everything on one thread, the usual size for a sidecar.
    #[arg(long, env = "PILLION_WORKER_THREADS", default_value = "1", value_name = "N", value_parser = clap::value_parser!(u16).range(1..=512))]
    worker_threads: u16,
}

/// A setting that parsed on its own but conflicts with another.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("PILLION_IDENTITY_CERT_FILE and PILLION_IDENTITY_KEY_FILE go together: set both or neither")]
    HalfAKeyPair,
    #[error(
        "choose one identity source: PILLION_IDENTITY_TOKEN_FILE (control plane) or PILLION_IDENTITY_CERT_FILE/KEY_FILE"
    )]
    TwoIdentitySources,
    #[error("PILLION_IDENTITY_TOKEN_FILE needs PILLION_CONTROL_ADDR, the CA that signs the certificates")]
    TokenWithoutControlPlane,
    #[error("PILLION_CONTROL_ADDR needs a workload identity: PILLION_IDENTITY_TOKEN_FILE or certificate files")]
    ControlPlaneWithoutIdentity,
    #[error("a workload identity needs trust anchors: PILLION_TRUST_ANCHORS or PILLION_TRUST_ANCHORS_FILE")]
    NoTrustAnchors,
    #[error(
        "PILLION_CONTROL_ADDR needs PILLION_CONTROL_IDENTITY (the control plane's SPIFFE ID, for TLS), or PILLION_CONTROL_PLAINTEXT=true for local development"
    )]
    ControlPlaneUnauthenticated,
    #[error("PILLION_CONTROL_IDENTITY and PILLION_CONTROL_PLAINTEXT=true contradict each other: choose one")]
    ControlPlaneTlsAndPlaintext,
    #[error("cannot read the interface addresses for the PILLION_INBOUND_IPS default ({0}); set PILLION_INBOUND_IPS")]
    InterfaceAddresses(std::io::Error),
    #[error("{first} and {second} are both {addr}: every listener needs its own address")]
    ListenerClash {
        first: &'static str,
        second: &'static str,
        addr: SocketAddr,
    },
}

impl Config {
    /// Parses flags and environment, or prints a one-line error and exits with status 2.
    pub fn from_env_or_exit() -> Self {
        let args = match Args::try_parse_with_sources(std::env::args_os()) {
            Ok(args) => args,
            Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
            Err(e) => exit_usage(&one_line(&e)),
        };
        Config::try_from(args).unwrap_or_else(|e| exit_usage(&e.to_string()))
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let mut listeners = vec![
            ("PILLION_INBOUND_ADDR", args.inbound_addr),
            ("PILLION_ADMIN_ADDR", args.admin_addr),
        ];
        listeners.extend(args.outbound_addr.iter().map(|a| ("PILLION_OUTBOUND_ADDR", *a)));
        for (i, (first, a)) in listeners.iter().enumerate() {
            if let Some((second, _)) = listeners[i + 1..].iter().find(|(_, b)| a == b) {
                return Err(ConfigError::ListenerClash {
                    first,
                    second,
                    addr: *a,
                });
            }
        }
        let identity = match (
            args.identity_token_file,
            args.identity_cert_file,
            args.identity_key_file,
        ) {
            (None, None, None) => IdentitySource::None,
            (Some(token_file), None, None) => IdentitySource::ControlPlane { token_file },
            (None, Some(cert_file), Some(key_file)) => IdentitySource::Files { cert_file, key_file },
            (None, _, _) => return Err(ConfigError::HalfAKeyPair),
            (Some(_), _, _) => return Err(ConfigError::TwoIdentitySources),
        };
        if matches!(identity, IdentitySource::ControlPlane { .. }) && args.control_addr.is_none() {
            return Err(ConfigError::TokenWithoutControlPlane);
        }
        if args.control_addr.is_some() && identity == IdentitySource::None {
            return Err(ConfigError::ControlPlaneWithoutIdentity);
        }
        let trust_anchors = match (args.trust_anchors, args.trust_anchors_file) {
            (Some(pem), _) => Some(TrustAnchors::Pem(pem)),
            (None, Some(path)) => Some(TrustAnchors::File(path)),
            (None, None) => None,
        };
        if identity != IdentitySource::None && trust_anchors.is_none() {
            return Err(ConfigError::NoTrustAnchors);
        }
        let control_channel = match (&args.control_addr, args.control_identity, args.control_plaintext) {
            (None, _, _) => ControlChannel::None,
            (Some(_), Some(_), true) => return Err(ConfigError::ControlPlaneTlsAndPlaintext),
            (Some(_), Some(identity), false) => ControlChannel::Tls { identity },
            (Some(_), None, true) => ControlChannel::Plaintext,
            (Some(_), None, false) => return Err(ConfigError::ControlPlaneUnauthenticated),
        };
        let inbound_ips = match args.inbound_ips {
            Some(IpList(addrs)) => InboundIps {
                source: "PILLION_INBOUND_IPS",
                addrs,
            },
            None => InboundIps {
                source: "interfaces",
                addrs: crate::transport::interface_addresses().map_err(ConfigError::InterfaceAddresses)?,
            },
        };
        let (inbound_default, outbound_default) = args.default_listeners;
        // Same port as the IPv4 default, so iptables-init's one port number serves both families.
        let inbound_ipv6_twin =
            inbound_default.then(|| SocketAddr::from((Ipv6Addr::UNSPECIFIED, args.inbound_addr.port())));
        let outbound_ipv6_twin = match args.outbound_addr.as_slice() {
            [only] if outbound_default => Some(SocketAddr::from((Ipv6Addr::LOCALHOST, only.port()))),
            _ => None,
        };
        Ok(Config {
            control_addr: args.control_addr,
            control_channel,
            expected_identity: args.identity_spiffe_id,
            identity,
            trust_anchors,
            inbound_default_authorization: args.inbound_default_authorization,
            inbound_addr: args.inbound_addr,
            outbound_addrs: args.outbound_addr,
            inbound_ipv6_twin,
            outbound_ipv6_twin,
            inbound_ips,
            admin_addr: args.admin_addr,
            inbound_target: args.inbound_target,
            outbound_target: args.outbound_target,
            log: args.log,
            log_format: args.log_format,
            shutdown_grace_period: args.shutdown_grace_period,
            connect_timeout: args.connect_timeout,
            tcp_keepalive: args.tcp_keepalive,
            worker_threads: usize::from(args.worker_threads),
            route_file: args.route_file,
            detect_timeout: args.detect_timeout,
            opaque_ports: args.opaque_ports,
            http_idle_timeout: args.http_idle_timeout,
            http_max_header_bytes: args.http_max_header_bytes as usize,
            access_log: args.access_log,
            max_connections: args.max_connections as usize,
            tcp_idle_timeout: args.tcp_idle_timeout,
            discovery_max_destinations: args.discovery_max_destinations as usize,
            discovery_idle_timeout: args.discovery_idle_timeout,
        })
    }
}

impl Args {
    /// Parses like `try_parse_from`, and notes which listener addresses were left at their
    /// defaults (a value from the flag or the variable is taken exactly as given).
    fn try_parse_with_sources<I, T>(argv: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Args::command().try_get_matches_from(argv)?;
        let mut args = Args::from_arg_matches(&matches)?;
        let defaulted = |id| matches.value_source(id) == Some(ValueSource::DefaultValue);
        args.default_listeners = (defaulted("inbound_addr"), defaulted("outbound_addr"));
        Ok(args)
    }
}

/// Newtype so clap stores the parsed list as one value rather than treating `Vec` as repeats.
#[derive(Clone, Debug)]
struct IpList(Vec<IpAddr>);

fn parse_ips(s: &str) -> Result<IpList, String> {
    let mut addrs = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let ip: IpAddr = item.parse().map_err(|_| format!("{item:?} is not an IP address"))?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("{item} cannot be a pod address"));
        }
        // An IPv4-mapped form compares as the IPv4 address it stands for, as destinations do.
        let ip = ip.to_canonical();
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    if addrs.is_empty() {
        return Err("expected one or more IP addresses, comma separated".to_string());
    }
    Ok(IpList(addrs))
}

fn exit_usage(message: &str) -> ! {
    eprintln!("pillion-proxy: {message}");
    std::process::exit(2)
}

/// Clap's first error line, plus the environment variable, since either may have set the value.
fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let env = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => env_of(arg),
        _ => None,
    };
    match env {
        Some(env) => format!("{first} (env {env})"),
        None => first.to_string(),
    }
}

fn env_of(arg: &str) -> Option<String> {
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let cmd = Args::command();
    let found = cmd.get_arguments().find(|a| a.get_long() == Some(long))?;
    Some(found.get_env()?.to_string_lossy().into_owned())
}

fn parse_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. `30s`, `500ms`, `2m`)"))
}

fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err("must be greater than zero".to_string()),
        d => Ok(d),
    }
}

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }
}

impl Serialize for PortSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = self
            .0
            .iter()
            .map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
            .collect();
        s.collect_str(&text.join(","))
    }
}

impl Serialize for TrustAnchors {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // The PEM itself is long and belongs in `/identity` as fingerprints.
            TrustAnchors::Pem(pem) => s.collect_str(&format_args!("<PEM, {} bytes>", pem.len())),
            TrustAnchors::File(path) => s.collect_str(&path.display()),
        }
    }
}

fn display<T: std::fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

fn parse_spiffe_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse(s).map_err(|e| e.to_string())
}

fn display_option<T: std::fmt::Display, S: Serializer>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

fn parse_control_addr(s: &str) -> Result<String, String> {
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    match with_scheme.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.port_u16().is_some() => Ok(with_scheme),
        Ok(_) => Err("expected host:port or http://host:port".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_ports(s: &str) -> Result<PortSet, String> {
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1-65535)")),
        Ok(n) => Ok(n),
    };
    let mut set = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let range = match item.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => (port(item)?, port(item)?),
        };
        if range.0 > range.1 {
            return Err(format!("range {item:?} ends before it starts"));
        }
        set.push(range);
    }
    Ok(PortSet(set))
}

fn human_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_with_sources(std::iter::once("pillion-proxy").chain(args.iter().copied()))
            .map_err(|e| one_line(&e))?;
        Config::try_from(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(&[]).expect("defaults are valid");
        assert_eq!(c.inbound_addr, "0.0.0.0:4143".parse().unwrap());
        assert_eq!(c.outbound_addrs, vec!["127.0.0.1:4140".parse().unwrap()]);
        assert_eq!(c.admin_addr, "0.0.0.0:4191".parse().unwrap());
        assert_eq!(c.shutdown_grace_period, Duration::from_secs(30));
        assert_eq!(c.log_format, LogFormat::Plain);
    }

    #[test]
    fn connect_timeout_allows_a_syn_retransmission() {
        // The kernel retransmits a lost SYN after 1 s (initial RTO): the default must outlast it.
        let c = parse(&[]).unwrap();
        assert!(c.connect_timeout >= Duration::from_secs(3), "{:?}", c.connect_timeout);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.tcp_idle_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn inbound_ips_are_checked_and_default_to_the_interfaces() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.inbound_ips.source, "interfaces");
        assert!(
            c.inbound_ips.addrs.iter().all(|ip| !ip.is_loopback()),
            "{:?}",
            c.inbound_ips
        );
        let c = parse(&["--inbound-ips", "10.1.2.3, fd00::3,10.1.2.3,::ffff:10.9.9.9"]).unwrap();
        assert_eq!(c.inbound_ips.source, "PILLION_INBOUND_IPS");
        let expected: Vec<IpAddr> = ["10.1.2.3", "fd00::3", "10.9.9.9"].map(|a| a.parse().unwrap()).into();
        assert_eq!(c.inbound_ips.addrs, expected);
        for bad in ["10.1.2", "10.1.2.3,pod", "", "0.0.0.0", "::"] {
            let e = parse(&["--inbound-ips", bad]).unwrap_err();
            assert!(
                e.contains("--inbound-ips") && e.contains("PILLION_INBOUND_IPS") && e.contains(bad),
                "{bad:?}: {e}"
            );
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn default_listeners_get_ipv6_twins_and_set_ones_do_not() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.inbound_ipv6_twin, Some("[::]:4143".parse().unwrap()));
        assert_eq!(c.outbound_ipv6_twin, Some("[::1]:4140".parse().unwrap()));
        let c = parse(&["--inbound-addr", "0.0.0.0:4143", "--outbound-addr", "127.0.0.1:4140"]).unwrap();
        assert_eq!((c.inbound_ipv6_twin, c.outbound_ipv6_twin), (None, None));
    }

    #[test]
    fn several_outbound_listeners() {
        let c = parse(&["--outbound-addr", "127.0.0.1:4140,[::1]:4140"]).unwrap();
        assert_eq!(c.outbound_addrs.len(), 2);
    }

    #[test]
    fn bad_values_name_flag_variable_and_value() {
        let e = parse(&["--inbound-addr", "nope"]).unwrap_err();
        assert!(
            e.contains("--inbound-addr") && e.contains("PILLION_INBOUND_ADDR") && e.contains("nope"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");

        let e = parse(&["--shutdown-grace-period", "soon"]).unwrap_err();
        assert!(e.contains("PILLION_SHUTDOWN_GRACE_PERIOD") && e.contains("soon"), "{e}");

        let e = parse(&["--log", "info,[bad"]).unwrap_err();
        assert!(e.contains("PILLION_LOG"), "{e}");

        let e = parse(&["--connect-timeout", "0s"]).unwrap_err();
        assert!(e.contains("greater than zero"), "{e}");
    }

    #[test]
    fn opaque_ports_and_ranges() {
        let c = parse(&[]).unwrap();
        assert!(c.opaque_ports.contains(3306) && !c.opaque_ports.contains(80));
        let c = parse(&["--opaque-ports", "9000-9100, 25"]).unwrap();
        assert!(c.opaque_ports.contains(9050) && c.opaque_ports.contains(25) && !c.opaque_ports.contains(9101));
        let e = parse(&["--opaque-ports", "10-5"]).unwrap_err();
        assert!(e.contains("PILLION_OPAQUE_PORTS"), "{e}");
        let e = parse(&["--opaque-ports", "0"]).unwrap_err();
        assert!(e.contains("not a port"), "{e}");
    }

    #[test]
    fn identity_settings_are_checked_together() {
        let e = parse(&["--identity-cert-file", "c.pem"]).unwrap_err();
        assert!(e.contains("go together"), "{e}");
        let e = parse(&["--identity-token-file", "t"]).unwrap_err();
        assert!(e.contains("PILLION_CONTROL_ADDR"), "{e}");
        let e = parse(&["--control-addr", "ctl:8090", "--identity-token-file", "t"]).unwrap_err();
        assert!(e.contains("trust anchors"), "{e}");
        let base = [
            "--control-addr",
            "ctl:8090",
            "--identity-token-file",
            "t",
            "--trust-anchors-file",
            "r.pem",
        ];
        // The control channel is TLS to a named identity, or plaintext only when asked for.
        let e = parse(&base).unwrap_err();
        assert!(
            e.contains("PILLION_CONTROL_IDENTITY") && e.contains("PILLION_CONTROL_PLAINTEXT"),
            "{e}"
        );
        let control_id = "--control-identity=spiffe://cluster.local/ns/pillion-system/sa/pillion-control";
        let c = parse(&[&base[..], &[control_id]].concat()).unwrap();
        assert_eq!(c.control_addr.as_deref(), Some("http://ctl:8090"));
        assert!(
            matches!(&c.control_channel, ControlChannel::Tls { identity } if identity.as_str().ends_with("/sa/pillion-control"))
        );
        let c = parse(&[&base[..], &["--control-plaintext=true"]].concat()).unwrap();
        assert_eq!(c.control_channel, ControlChannel::Plaintext);
        let e = parse(&[&base[..], &[control_id, "--control-plaintext=true"]].concat()).unwrap_err();
        assert!(e.contains("contradict"), "{e}");
        let e = parse(&[&base[..], &["--control-identity=https://evil"]].concat()).unwrap_err();
        assert!(e.contains("PILLION_CONTROL_IDENTITY"), "{e}");
        let c = parse(
            &[
                &base[..],
                &[
                    control_id,
                    "--identity-spiffe-id=spiffe://cluster.local/ns/shop/sa/web.v2",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            c.expected_identity.unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/web.v2"
        );
        let e = parse(&["--control-addr", "ftp://x:1"]).unwrap_err();
        assert!(e.contains("PILLION_CONTROL_ADDR"), "{e}");
        let e = parse(&["--inbound-default-authorization", "maybe"]).unwrap_err();
        assert!(e.contains("PILLION_INBOUND_DEFAULT_AUTHORIZATION"), "{e}");
    }

    #[test]
    fn listeners_must_not_share_an_address() {
        let e = parse(&["--admin-addr", "0.0.0.0:4143"]).unwrap_err();
        assert!(
            e.contains("PILLION_INBOUND_ADDR") && e.contains("PILLION_ADMIN_ADDR"),
            "{e}"
        );
    }
}
