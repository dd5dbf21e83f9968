//! The `pillion-control` command line: flags and `PILLION_CONTROL_*` environment variables.
//!
//! Only flag values are checked here (exit code 2, one line naming the flag, its variable and the
//! value); file contents are checked by `main` when they are loaded (exit code 1).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{
    Args, CommandFactory, Parser, Subcommand,
    builder::BoolishValueParser,
    error::{ContextKind, ContextValue, ErrorKind},
};
use pillion_control::{
    diagnostics,
    inject::{self, InjectOptions},
    policy::model::{Authority, SpiffeId},
    server::Limits,
    spiffe::TrustDomain,
};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "pillion-control",
    version,
    about = "Pillion's control plane: workload certificates, discovery, route and authorization policy"
)]
pub struct Cli {
    /// Tracing filter in EnvFilter syntax (e.g. `info,pillion_control=debug`).
    #[arg(long, global = true, env = "PILLION_LOG", default_value = "info", value_name = "FILTER", value_parser = parse_filter)]
    pub log: String,

    /// Log lines as `plain` text or `json` objects (one per line), like the proxy's.
    #[arg(
        long,
        global = true,
        env = "PILLION_LOG_FORMAT",
        default_value = "plain",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Identity and Discovery gRPC services.
    Serve(Box<ServeArgs>),
    /// Certificate authority tools.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Add Pillion's init container and proxy to the workloads in Kubernetes YAML (stdin to stdout).
    ///
    /// Reads one or more YAML documents (separated by `---` lines, or a `kind: List`) from standard
    /// input and writes them to standard output in the same order. Pods, Deployments, StatefulSets,
    /// DaemonSets, ReplicaSets, ReplicationControllers, Jobs and CronJobs get `pillion-init` and the
    /// `pillion-proxy` native sidecar (Kubernetes 1.29 or later) at the top of their init
    /// containers, before the workload's own; every other object passes through. Injecting twice
    /// changes nothing.
    ///
    /// Per workload, annotations on the pod template: `pillion.io/inject: disabled` (leave it out),
    /// `pillion.io/inbound-ports-to-ignore`, `pillion.io/outbound-ports-to-ignore`,
    /// `pillion.io/outbound-subnets-to-ignore`, `pillion.io/proxy-log-level`, `pillion.io/ipv6`.
    ///
    /// Comments: a document that is not changed is copied byte for byte; a changed document keeps
    /// the comment lines at its top and loses its other comments. One line per workload goes to
    /// standard error. On any error nothing is written to standard output and the exit code is 1.
    ///
    /// Example: `pillion-control inject < app.yaml | kubectl apply -f -`
    Inject(InjectCommand),
    /// Show what the control plane tells proxies, without a running server.
    #[command(subcommand)]
    Diagnostics(DiagnosticsCommand),
}

#[derive(Debug, Subcommand)]
pub enum DiagnosticsCommand {
    /// Print the first update `Discovery.Watch` would send for each DESTINATION, as JSON in the
    /// policy file's words: one document per destination.
    ///
    /// The answer comes from the same code `serve` uses, for a caller with the `--caller` identity
    /// (over mTLS) or, without it, a plaintext caller (which sees every field). A destination's
    /// inbound authorization is shown only to a caller that is one of its endpoint identities.
    ///
    /// Example: `pillion-control diagnostics destination --policy policy.yaml web.shop.svc.cluster.local:80`
    Destination(DiagnosticsDestinationArgs),
}

#[derive(Debug, Args)]
pub struct DiagnosticsDestinationArgs {
    /// Discovery and policy YAML, as `serve --policy` reads it.
    #[arg(long, env = "PILLION_CONTROL_POLICY", value_name = "FILE")]
    pub policy: PathBuf,

    /// The watching proxy's SPIFFE ID (its mTLS client certificate); absent = a plaintext caller.
    #[arg(long, value_name = "SPIFFE_ID", value_parser = parse_spiffe_id)]
    pub caller: Option<SpiffeId>,

    /// `pretty` (indented JSON documents, one after another) or `json` (one object per line).
    #[arg(long, default_value = "pretty", value_name = "FORMAT")]
    pub output: OutputFormat,

    /// `host:port` or `ip:port`, as a proxy would watch it.
    #[arg(required = true, value_name = "DESTINATION", value_parser = parse_authority)]
    pub destinations: Vec<Authority>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Pretty,
    Json,
}

impl OutputFormat {
    pub fn format(self) -> diagnostics::Format {
        match self {
            OutputFormat::Pretty => diagnostics::Format::Pretty,
            OutputFormat::Json => diagnostics::Format::Json,
        }
    }
}

/// `pillion-control inject`: what is injected, plus the names `serve` knows as its own settings.
#[derive(Debug, Args)]
pub struct InjectCommand {
    #[command(flatten)]
    pub inject: InjectArgs,

    /// The mesh's SPIFFE trust domain: each proxy is told to expect
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<service account> for itself.
    #[arg(long, env = "PILLION_INJECT_TRUST_DOMAIN", default_value = "cluster.local", value_name = "DOMAIN", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,

    /// The control plane's SPIFFE ID, which the proxies verify; default
    /// spiffe://<trust-domain>/ns/<control-plane-namespace>/sa/pillion-control.
    #[arg(long, env = "PILLION_INJECT_CONTROL_IDENTITY", value_name = "SPIFFE_ID", value_parser = parse_spiffe_id)]
    pub control_identity: Option<SpiffeId>,
}

impl InjectCommand {
    pub fn options(&self) -> InjectOptions {
        let control_identity = match &self.control_identity {
            Some(id) => id.as_str().to_string(),
            None => inject::control_identity(&self.trust_domain.to_string(), &self.inject.control_plane_namespace),
        };
        InjectOptions {
            trust_domain: self.trust_domain.to_string(),
            control_identity,
            ..self.inject.options()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA and an issuer for local use: root.crt, issuer.crt, issuer.key in --out.
    Init(CaInitArgs),
}

#[derive(Debug, Args)]
pub struct CaInitArgs {
    /// Directory to write root.crt, issuer.crt and issuer.key into (created if missing).
    #[arg(long, env = "PILLION_CONTROL_CA_OUT", value_name = "DIR")]
    pub out: PathBuf,

    /// SPIFFE trust domain the CA is for (goes into the certificates' names).
    #[arg(long, env = "PILLION_CONTROL_TRUST_DOMAIN", default_value = "cluster.local", value_name = "DOMAIN", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,

    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Image of the proxy container.
    #[arg(long, env = "PILLION_INJECT_PROXY_IMAGE", default_value = inject::DEFAULT_PROXY_IMAGE, value_name = "IMAGE", value_parser = parse_image)]
    pub proxy_image: String,

    /// Image of the init container (pillion-iptables-init).
    #[arg(long, env = "PILLION_INJECT_INIT_IMAGE", default_value = inject::DEFAULT_INIT_IMAGE, value_name = "IMAGE", value_parser = parse_image)]
    pub init_image: String,

    /// The control plane, as the proxies reach it (their PILLION_CONTROL_ADDR): `host:port` or
    /// `http://host:port`.
    #[arg(long, env = "PILLION_INJECT_CONTROL_ADDR", default_value = inject::DEFAULT_CONTROL_ADDR, value_name = "ADDR", value_parser = parse_control_addr)]
    pub control_addr: String,

    /// The proxies' log filter (their PILLION_LOG) where the pod template has no
    /// `pillion.io/proxy-log-level` annotation. This command's own log filter is `--log`.
    #[arg(long, visible_alias = "log-level", env = "PILLION_INJECT_PROXY_LOG_LEVEL", default_value = inject::DEFAULT_PROXY_LOG_LEVEL, value_name = "FILTER", value_parser = parse_filter)]
    pub proxy_log_level: String,

    /// The control plane's namespace: its workloads are never injected (nor kube-system's).
    #[arg(long, env = "PILLION_INJECT_CONTROL_PLANE_NAMESPACE", default_value = inject::DEFAULT_CONTROL_PLANE_NAMESPACE, value_name = "NAMESPACE")]
    pub control_plane_namespace: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address (TLS 1.3, ALPN h2, unless --plaintext).
    #[arg(
        long,
        env = "PILLION_CONTROL_LISTEN",
        default_value = "0.0.0.0:8090",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// The control plane's own SPIFFE ID, in its certificate; proxies must expect exactly this
    /// (their PILLION_CONTROL_IDENTITY). Default: spiffe://<trust-domain>/ns/pillion-system/sa/pillion-control.
    #[arg(long, env = "PILLION_CONTROL_IDENTITY", value_name = "SPIFFE_ID", value_parser = parse_spiffe_id)]
    pub identity: Option<SpiffeId>,

    /// Serve gRPC without TLS: no server authentication, tokens in the clear, no caller identity.
    /// For local development only.
    #[arg(long, env = "PILLION_CONTROL_PLAINTEXT", value_parser = BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub plaintext: bool,

    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "PILLION_CONTROL_TRUST_DOMAIN", default_value = "cluster.local", value_name = "DOMAIN", value_parser = parse_trust_domain)]
    pub trust_domain: TrustDomain,

    /// Issuer (intermediate CA) certificate, PEM; may be followed by further intermediates.
    #[arg(long, env = "PILLION_CONTROL_ISSUER_CERT", value_name = "FILE")]
    pub issuer_cert: PathBuf,

    /// Issuer private key, PEM (PKCS#8, SEC1 or PKCS#1).
    #[arg(long, env = "PILLION_CONTROL_ISSUER_KEY", value_name = "FILE")]
    pub issuer_key: PathBuf,

    /// Root certificate(s), PEM: the issuer must chain to one of them.
    #[arg(long, env = "PILLION_CONTROL_TRUST_ANCHORS", value_name = "FILE")]
    pub trust_anchors: PathBuf,

    /// Lifetime of issued workload certificates.
    #[arg(long, env = "PILLION_CONTROL_CERT_LIFETIME", default_value = "24h", value_name = "DURATION", value_parser = parse_lifetime)]
    pub cert_lifetime: Duration,

    /// Token file for standalone use: YAML list of {token, namespace, serviceAccount}.
    #[arg(
        long,
        env = "PILLION_CONTROL_TOKENS",
        value_name = "FILE",
        conflicts_with = "token_review",
        required_unless_present = "token_review"
    )]
    pub tokens: Option<PathBuf>,

    /// Authenticate tokens with Kubernetes TokenReview: the API server URL, or `in-cluster`
    /// (https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT).
    #[arg(long, env = "PILLION_CONTROL_TOKEN_REVIEW", value_name = "URL|in-cluster")]
    pub token_review: Option<String>,

    /// CA bundle of the Kubernetes API server.
    #[arg(long, env = "PILLION_CONTROL_TOKEN_REVIEW_CA", default_value = concat!("/var/run/secrets/kubernetes.io/serviceaccount", "/ca.crt"), value_name = "FILE")]
    pub token_review_ca: PathBuf,

    /// The control plane's own service-account token, sent to the API server.
    #[arg(long, env = "PILLION_CONTROL_TOKEN_REVIEW_TOKEN", default_value = concat!("/var/run/secrets/kubernetes.io/serviceaccount", "/token"), value_name = "FILE")]
    pub token_review_token: PathBuf,

    /// Audiences workload tokens must be valid for, comma separated (the injector mounts a token
    /// for `pillion`); an explicit empty value means the API server's default audience.
    #[arg(
        long,
        env = "PILLION_CONTROL_TOKEN_REVIEW_AUDIENCE",
        value_delimiter = ',',
        default_value = "pillion",
        value_name = "AUD[,AUD]"
    )]
    pub token_review_audience: Vec<String>,

    /// Certify calls accepted per second, server-wide; beyond it callers get RESOURCE_EXHAUSTED.
    #[arg(long, env = "PILLION_CONTROL_CERTIFY_RATE_LIMIT", default_value = "50", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub certify_rate_limit: u32,

    /// Certify calls accepted at once after a quiet period (the token bucket's size).
    #[arg(long, env = "PILLION_CONTROL_CERTIFY_BURST", default_value = "100", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub certify_burst: u32,

    /// Concurrent HTTP/2 streams per connection. A proxy holds one Watch stream per destination
    /// it follows: keep this above the proxies' PILLION_DISCOVERY_MAX_DESTINATIONS (1000).
    #[arg(long, env = "PILLION_CONTROL_MAX_CONCURRENT_STREAMS", default_value = "1100", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Discovery and policy YAML, reloaded on change; unset = every destination is unknown.
    #[arg(long, env = "PILLION_CONTROL_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Kubernetes mode: discovery and routes from the cluster's Services, EndpointSlices, Pods and
    /// Gateway API HTTPRoutes, through the API server (in-cluster config, else KUBECONFIG).
    #[arg(long, env = "PILLION_CONTROL_KUBERNETES", value_parser = BoolishValueParser::new(), action = clap::ArgAction::SetTrue, conflicts_with = "policy")]
    pub kubernetes: bool,

    /// Kubernetes mode: the DNS suffix of Service names (`name.namespace.svc.<domain>`).
    #[arg(long, env = "PILLION_CONTROL_CLUSTER_DOMAIN", default_value = "cluster.local", value_name = "DOMAIN", value_parser = parse_cluster_domain)]
    pub cluster_domain: String,

    /// Kubernetes mode: what a pod's port admits when no AuthorizationPolicy targets it and
    /// neither the Pod nor its Namespace has a `pillion.io/default-inbound-policy` annotation:
    /// all-unauthenticated, all-authenticated, cluster-authenticated or deny.
    #[arg(
        long,
        env = "PILLION_CONTROL_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated",
        value_name = "POLICY"
    )]
    pub default_inbound_policy: pillion_control::k8s::DefaultInboundPolicy,

    /// Serve the mutating admission webhook (HTTPS, path /inject) on this address; unset = no webhook.
    #[arg(long, env = "PILLION_CONTROL_WEBHOOK_ADDR", value_name = "ADDR", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_addr: Option<SocketAddr>,

    /// The webhook's serving certificate chain, PEM (re-read when it changes).
    #[arg(long, env = "PILLION_CONTROL_WEBHOOK_CERT", value_name = "FILE")]
    pub webhook_cert: Option<PathBuf>,

    /// The webhook's private key, PEM (re-read when it changes).
    #[arg(long, env = "PILLION_CONTROL_WEBHOOK_KEY", value_name = "FILE")]
    pub webhook_key: Option<PathBuf>,

    /// What the webhook injects (the same settings as `pillion-control inject`).
    #[command(flatten)]
    pub inject: InjectArgs,

    /// Longest time to let in-flight calls finish after SIGTERM.
    #[arg(long, env = "PILLION_CONTROL_SHUTDOWN_GRACE_PERIOD", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace_period: Duration,
}

impl Cli {
    /// Parses flags and environment, or prints a one-line error and exits with status 2.
    pub fn parse_or_exit() -> Self {
        match Cli::try_parse() {
            Ok(cli) => cli,
            Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
            Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            Err(e) => exit_usage(&one_line(&e)),
        }
    }
}

impl ServeArgs {
    /// The TokenReview API server URL, resolving `in-cluster` from the standard environment.
    pub fn token_review_url(&self) -> Option<Result<http::Uri, String>> {
        let value = self.token_review.as_deref()?;
        let url = if value == "in-cluster" {
            let host = std::env::var("KUBERNETES_SERVICE_HOST");
            let port = std::env::var("KUBERNETES_SERVICE_PORT");
            match (host, port) {
                (Ok(h), Ok(p)) if h.contains(':') => format!("https://[{h}]:{p}"),
                (Ok(h), Ok(p)) => format!("https://{h}:{p}"),
                _ => {
                    return Some(Err(
                        "--token-review in-cluster (env PILLION_CONTROL_TOKEN_REVIEW): KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set".to_string(),
                    ));
                }
            }
        } else {
            value.to_string()
        };
        Some(url.parse::<http::Uri>().map_err(|e| {
            format!(
                "invalid value '{value}' for '--token-review <URL|in-cluster>' (env PILLION_CONTROL_TOKEN_REVIEW): {e}"
            )
        }))
    }
}

impl ServeArgs {
    /// The control plane's SPIFFE ID: `--identity`, or the default in `--trust-domain`.
    pub fn control_identity(&self) -> Result<SpiffeId, String> {
        let id = match &self.identity {
            Some(id) => id.clone(),
            // A trust domain is valid, so this ID is too; parsing it keeps one way to make one.
            None => SpiffeId::try_from(format!(
                "spiffe://{}/ns/pillion-system/sa/pillion-control",
                self.trust_domain
            ))?,
        };
        let prefix = format!("spiffe://{}/", self.trust_domain);
        if !id.as_str().starts_with(&prefix) {
            return Err(format!(
                "invalid value '{}' for '--identity <SPIFFE_ID>' (env PILLION_CONTROL_IDENTITY): not in trust domain {}",
                id, self.trust_domain
            ));
        }
        Ok(id)
    }

    /// `--token-review-audience` without empty entries: an explicit empty value means none.
    pub fn token_review_audiences(&self) -> Vec<String> {
        self.token_review_audience
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect()
    }

    pub fn limits(&self) -> Limits {
        Limits {
            certify_per_second: self.certify_rate_limit,
            certify_burst: self.certify_burst,
            max_concurrent_streams: self.max_concurrent_streams,
            ..Limits::default()
        }
    }
}

impl InjectArgs {
    pub fn options(&self) -> InjectOptions {
        InjectOptions {
            proxy_image: self.proxy_image.clone(),
            init_image: self.init_image.clone(),
            control_addr: self.control_addr.clone(),
            proxy_log_level: self.proxy_log_level.clone(),
            control_plane_namespace: self.control_plane_namespace.clone(),
            ..InjectOptions::default()
        }
    }
}

pub fn exit_usage(message: &str) -> ! {
    eprintln!("pillion-control: {message}");
    std::process::exit(2)
}

/// Clap's first error line, plus the environment variable, since either may have set the value.
/// Missing arguments are listed on the following lines: they are joined onto the first, so the
/// one line still names every missing flag.
fn one_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    if err.kind() == ErrorKind::MissingRequiredArgument {
        let missing: Vec<String> = rendered
            .lines()
            .skip(1)
            .take_while(|line| line.starts_with("  "))
            .map(|line| {
                let flag = line.trim();
                match env_of(flag) {
                    Some(env) => format!("{flag} (env {env})"),
                    None => flag.to_string(),
                }
            })
            .collect();
        return format!("{} {}", first.trim_end_matches(':'), missing.join(", ")).replace("  ", " ");
    }
    let env = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => env_of(arg),
        _ => None,
    };
    match env {
        Some(env) => format!("{first} (env {env})"),
        None => first.to_string(),
    }
}

/// The environment variable of a flag, searched through every subcommand.
fn env_of(arg: &str) -> Option<String> {
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let mut stack = vec![Cli::command()];
    while let Some(cmd) = stack.pop() {
        if let Some(found) = cmd.get_arguments().find(|a| a.get_long() == Some(long))
            && let Some(env) = found.get_env()
        {
            return Some(env.to_string_lossy().into_owned());
        }
        stack.extend(cmd.get_subcommands().cloned());
    }
    None
}

fn parse_filter(s: &str) -> Result<String, String> {
    EnvFilter::try_new(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("expected an image reference such as registry.example/pillion/proxy:0.1.0".to_string());
    }
    Ok(s.to_string())
}

/// The proxy's rule for PILLION_CONTROL_ADDR, so a value it would refuse is refused here.
fn parse_control_addr(s: &str) -> Result<String, String> {
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    match with_scheme.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.port_u16().is_some() => Ok(s.to_string()),
        Ok(_) => Err("expected host:port or http://host:port".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    s.parse()
        .map_err(|e: pillion_control::spiffe::InvalidName| e.to_string())
}

/// A DNS suffix: what makes `name.namespace.svc.<domain>:80` a valid destination.
fn parse_cluster_domain(s: &str) -> Result<String, String> {
    let domain = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    format!("name.namespace.svc.{domain}:80")
        .parse::<Authority>()
        .map(|_| domain)
        .map_err(|_| "expected a DNS name such as cluster.local".to_string())
}

fn parse_spiffe_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::try_from(s.to_string())
}

fn parse_authority(s: &str) -> Result<Authority, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. `24h`, `30m`, `90s`)"))
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d < Duration::from_secs(10) => Err("must be at least 10s".to_string()),
        d if d > Duration::from_secs(366 * 24 * 3600) => Err("must be at most 366 days".to_string()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn standard_service_account_paths() {
        let cli = Cli::try_parse_from([
            "pillion-control",
            "serve",
            "--issuer-cert=a",
            "--issuer-key=b",
            "--trust-anchors=c",
            "--token-review=https://10.0.0.1:443",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.token_review_ca, PathBuf::from(SA_DIR).join("ca.crt"));
        assert_eq!(args.token_review_token, PathBuf::from(SA_DIR).join("token"));
        assert_eq!(args.cert_lifetime, Duration::from_secs(24 * 3600));
        assert!(!args.plaintext);
        assert_eq!(args.token_review_audiences(), vec!["pillion".to_string()]);
        assert_eq!(
            args.control_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/pillion-system/sa/pillion-control"
        );
    }

    fn serve_args(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let base = [
            "pillion-control",
            "serve",
            "--issuer-cert=a",
            "--issuer-key=b",
            "--trust-anchors=c",
            "--tokens=t",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra))?;
        match cli.command {
            Command::Serve(args) => Ok(*args),
            _ => panic!("serve"),
        }
    }

    #[test]
    fn tls_identity_audience_and_limits() {
        let args = serve_args(&["--token-review-audience="]).unwrap();
        assert!(
            args.token_review_audiences().is_empty(),
            "explicit empty = API server default"
        );
        let args = serve_args(&["--token-review-audience=pillion,vault"]).unwrap();
        assert_eq!(args.token_review_audiences(), vec!["pillion", "vault"]);

        let args = serve_args(&["--trust-domain=example.org", "--plaintext"]).unwrap();
        assert!(args.plaintext);
        assert_eq!(
            args.control_identity().unwrap().as_str(),
            "spiffe://example.org/ns/pillion-system/sa/pillion-control"
        );
        let args = serve_args(&["--identity=spiffe://cluster.local/ns/mesh/sa/control"]).unwrap();
        assert_eq!(
            args.control_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/mesh/sa/control"
        );
        let args = serve_args(&["--identity=spiffe://other.org/ns/mesh/sa/control"]).unwrap();
        assert!(
            args.control_identity()
                .unwrap_err()
                .contains("PILLION_CONTROL_IDENTITY")
        );
        for bad in [
            "--identity=https://x/y",
            "--identity=spiffe://cluster.local",
            "--certify-rate-limit=0",
            "--max-concurrent-streams=0",
        ] {
            let err = serve_args(&[bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
        }
        let limits = serve_args(&["--certify-rate-limit=5", "--certify-burst=7"])
            .unwrap()
            .limits();
        assert_eq!((limits.certify_per_second, limits.certify_burst), (5, 7));
    }

    #[test]
    fn inject_defaults_and_checks() {
        let cli = Cli::try_parse_from(["pillion-control", "inject", "--log-level=debug"]).unwrap();
        let Command::Inject(args) = cli.command else {
            panic!("inject")
        };
        let options = args.options();
        assert_eq!(
            options.control_identity,
            "spiffe://cluster.local/ns/pillion-system/sa/pillion-control"
        );
        assert_eq!(options.trust_domain, "cluster.local");
        assert_eq!(options.proxy_image, inject::DEFAULT_PROXY_IMAGE);
        assert_eq!(options.control_addr, inject::DEFAULT_CONTROL_ADDR);
        assert_eq!(options.proxy_log_level, "debug");

        for bad in [
            "--control-addr=https://x:1",
            "--control-addr=pillion-control",
            "--proxy-image=a b",
            "--init-image=",
            "--proxy-log-level=info,[",
        ] {
            let err = Cli::try_parse_from(["pillion-control", "inject", bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
        }
        let err = Cli::try_parse_from(["pillion-control", "inject", "--control-addr=nope"]).unwrap_err();
        let line = one_line(&err);
        assert!(
            line.contains("--control-addr") && line.contains("PILLION_INJECT_CONTROL_ADDR"),
            "{line}"
        );
    }

    #[test]
    fn missing_flags_are_all_named() {
        let err = Cli::try_parse_from(["pillion-control", "serve"]).unwrap_err();
        let line = one_line(&err);
        for flag in [
            "--issuer-cert",
            "--issuer-key",
            "--trust-anchors",
            "PILLION_CONTROL_ISSUER_KEY",
        ] {
            assert!(line.contains(flag), "{flag} missing from: {line}");
        }
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn webhook_needs_its_certificate() {
        let base = [
            "pillion-control",
            "serve",
            "--issuer-cert=a",
            "--issuer-key=b",
            "--trust-anchors=c",
            "--tokens=t",
        ];
        let err = Cli::try_parse_from([&base[..], &["--webhook-addr=127.0.0.1:8443"]].concat()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        let cli = Cli::try_parse_from(
            [
                &base[..],
                &[
                    "--webhook-addr=127.0.0.1:8443",
                    "--webhook-cert=c",
                    "--webhook-key=k",
                    "--proxy-image=r/p:1",
                ],
            ]
            .concat(),
        )
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.inject.options().proxy_image, "r/p:1");
    }

    #[test]
    fn kubernetes_mode_flags() {
        let args = serve_args(&[]).unwrap();
        assert!(!args.kubernetes, "the policy file is the default");
        assert_eq!(args.cluster_domain, "cluster.local");
        let args = serve_args(&["--kubernetes", "--cluster-domain=Corp.Example."]).unwrap();
        assert!(args.kubernetes);
        assert_eq!(args.cluster_domain, "corp.example");
        let err = serve_args(&["--kubernetes", "--policy=p.yaml"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
        let err = serve_args(&["--cluster-domain=bad domain"]).unwrap_err();
        let line = one_line(&err);
        assert!(
            line.contains("PILLION_CONTROL_CLUSTER_DOMAIN") && line.contains("bad domain"),
            "{line}"
        );
    }

    #[test]
    fn default_inbound_policy_flag() {
        use pillion_control::k8s::DefaultInboundPolicy;
        let args = serve_args(&[]).unwrap();
        assert_eq!(args.default_inbound_policy, DefaultInboundPolicy::AllUnauthenticated);
        for (value, policy) in [
            ("all-authenticated", DefaultInboundPolicy::AllAuthenticated),
            ("cluster-authenticated", DefaultInboundPolicy::ClusterAuthenticated),
            ("deny", DefaultInboundPolicy::Deny),
        ] {
            let args = serve_args(&["--kubernetes", &format!("--default-inbound-policy={value}")]).unwrap();
            assert_eq!(args.default_inbound_policy, policy);
        }
        let err = serve_args(&["--default-inbound-policy=open"]).unwrap_err();
        let line = one_line(&err);
        assert!(
            line.contains("PILLION_CONTROL_DEFAULT_INBOUND_POLICY") && line.contains("cluster-authenticated"),
            "{line}"
        );
    }

    #[test]
    fn bad_values_name_flag_and_env() {
        let err = Cli::try_parse_from(["pillion-control", "serve", "--listen=nope"]).unwrap_err();
        let line = one_line(&err);
        assert!(
            line.contains("--listen") && line.contains("PILLION_CONTROL_LISTEN") && line.contains("nope"),
            "{line}"
        );
    }
}
