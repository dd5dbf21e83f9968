//! `pillion-control`: flags → load and check every file → bind → serve until SIGTERM; or one of
//! the tools (`ca init`, `inject`, `diagnostics destination`).
//!
//! Exit codes: 2 for a bad flag value (before anything is read), 1 for a file that cannot be read
//! or used (issuer, key, anchors, tokens, policy), a listener that cannot be bound, or input that
//! `inject` cannot use.

mod cli;

use std::{path::Path, process::ExitCode, sync::Arc, time::Duration};

use cli::{
    CaCommand, CaInitArgs, Cli, Command, DiagnosticsCommand, DiagnosticsDestinationArgs, InjectCommand, LogFormat,
    ServeArgs,
};
use pillion_control::{
    auth::{AnyAuthenticator, CachedAuthenticator, TokenFile, TokenReview, cache},
    ca::{self, CertificateAuthority},
    diagnostics,
    inject::{self, InjectOptions},
    k8s::{IndexConfig, KubernetesSource},
    kube_api::{KubeApi, KubeApiConfig},
    policy::{Policy, PolicyWatch},
    server::{self, ControlPlane, Transport},
    tls::ServerIdentity,
    webhook::{self, CertificateFiles, Namespaces, Webhook},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// How often the policy file is checked for changes.
const POLICY_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Limit for one TokenReview call to the API server.
const TOKEN_REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    // Times are RFC 3339 in UTC (tracing-subscriber's default timer), in both formats.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        // Colours only for a person at a terminal, never into log files.
        LogFormat::Plain => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let result = match cli.command {
        Command::Ca(CaCommand::Init(args)) => ca_init(&args),
        Command::Inject(args) => inject_stdin(&args),
        Command::Diagnostics(DiagnosticsCommand::Destination(args)) => diagnose_destinations(&args),
        Command::Serve(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
            match runtime {
                Ok(rt) => rt.block_on(serve(*args)),
                Err(e) => Err(format!("cannot start the runtime: {e}")),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pillion-control: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    // Flag-level problems first (exit 2), then files (exit 1), then the socket.
    let token_review_url = args
        .token_review_url()
        .transpose()
        .unwrap_or_else(|e| cli::exit_usage(&e));
    let control_identity = args.control_identity().unwrap_or_else(|e| cli::exit_usage(&e));

    let ca = CertificateAuthority::load(
        &args.issuer_cert,
        &args.issuer_key,
        &args.trust_anchors,
        args.trust_domain.clone(),
        args.cert_lifetime,
    )
    .map_err(|e| e.to_string())?;
    let ca = Arc::new(ca);
    // One API-server client for TokenReview and the webhook's Namespace lookups.
    let kube_api = match &token_review_url {
        Some(api_server) => Some(
            KubeApi::new(&KubeApiConfig {
                api_server: api_server.clone(),
                ca_file: args.token_review_ca.clone(),
                token_file: args.token_review_token.clone(),
                timeout: TOKEN_REVIEW_TIMEOUT,
            })
            .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let authenticator = match (&args.tokens, &kube_api) {
        (Some(path), _) => {
            let tokens = TokenFile::load(path).map_err(|e| e.to_string())?;
            tracing::info!(path = %path.display(), entries = tokens.len(), "authenticating with the token file");
            AnyAuthenticator::TokenFile(tokens)
        }
        (None, Some(api)) => {
            let audiences = args.token_review_audiences();
            tracing::info!(api_server = ?token_review_url, ?audiences, "authenticating with Kubernetes TokenReview");
            if audiences.is_empty() {
                tracing::warn!(
                    "--token-review-audience is empty: any token the API server accepts for its default audience is a workload credential"
                );
            }
            AnyAuthenticator::TokenReview(CachedAuthenticator::new(
                TokenReview::with_api(api.clone(), audiences),
                cache::DEFAULT_TTL,
                cache::DEFAULT_MAX_ENTRIES,
            ))
        }
        // clap requires one of the two.
        (None, None) => cli::exit_usage("one of --tokens or --token-review is required"),
    };
    let webhook_tls = match (&args.webhook_addr, &args.webhook_cert, &args.webhook_key) {
        (Some(_), Some(cert), Some(key)) => {
            Some(CertificateFiles::load(cert.clone(), key.clone()).map_err(|e| format!("webhook certificate: {e}"))?)
        }
        _ => None,
    };

    let shutdown = CancellationToken::new();
    // Work that must finish before exiting once shut down (Kubernetes mode: giving up the Lease).
    let tasks = TaskTracker::new();
    let policy = match &args.policy {
        None if args.kubernetes => kubernetes_policy(&args, shutdown.clone(), &tasks).await?,
        Some(path) => PolicyWatch::load_and_watch(path.clone(), POLICY_POLL_INTERVAL, shutdown.clone())
            .map_err(|e| e.to_string())?,
        None => PolicyWatch::fixed(Policy::default()),
    };
    let transport = if args.plaintext {
        tracing::warn!(
            "--plaintext: gRPC without TLS, for local development only: proxies cannot authenticate this server, tokens travel in the clear, and callers are not identified"
        );
        Transport::Plaintext
    } else {
        let identity = ServerIdentity::new(ca.clone(), control_identity).map_err(|e| e.to_string())?;
        tracing::info!(
            spiffe_id = %identity.spiffe_id(),
            valid_until = identity.not_after().unix_timestamp(),
            "control-plane certificate issued"
        );
        Transport::Tls(identity)
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (PILLION_CONTROL_LISTEN): {e}", args.listen))?;
    tracing::info!(
        listen = %args.listen,
        tls = !args.plaintext,
        trust_domain = %args.trust_domain,
        cert_lifetime = %humantime::format_duration(args.cert_lifetime),
        issuer_expires = %ca.issuer_not_after(),
        "pillion-control serving"
    );

    if let (Some(addr), Some(tls)) = (args.webhook_addr, webhook_tls) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (PILLION_CONTROL_WEBHOOK_ADDR): {e}"))?;
        if kube_api.is_none() {
            tracing::warn!(
                "webhook without an API server (--token-review): namespaces' pillion.io/inject is not read; only pods' own annotation opts them in"
            );
        }
        // The webhook tells proxies the trust domain and control-plane identity this server has.
        let control_identity = args.control_identity().unwrap_or_else(|e| cli::exit_usage(&e));
        let webhook = Arc::new(Webhook {
            options: InjectOptions {
                trust_domain: args.trust_domain.to_string(),
                control_identity: control_identity.as_str().to_string(),
                ..args.inject.options()
            },
            namespaces: Namespaces::new(kube_api.clone()),
        });
        tracing::info!(%addr, path = webhook::PATH, "admission webhook serving");
        tokio::spawn(tls.clone().watch(shutdown.clone()));
        tokio::spawn(webhook::serve(listener, tls, webhook, shutdown.clone()));
    }

    let plane = ControlPlane {
        ca,
        authenticator: Arc::new(authenticator),
        policy,
        transport,
        limits: args.limits(),
    };
    let server = tokio::spawn(server::serve(listener, plane, shutdown.clone()));
    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    tasks.close();
    let (server, _) = tokio::join!(
        tokio::time::timeout(args.shutdown_grace_period, server),
        tokio::time::timeout(args.shutdown_grace_period, tasks.wait()),
    );
    match server {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(format!("gRPC server: {e}")),
        Ok(Err(e)) => Err(format!("gRPC server task: {e}")),
        Err(_) => {
            tracing::warn!("grace period over; exiting with calls still in flight");
            Ok(())
        }
    }
}

/// Kubernetes mode: the cluster's objects as the policy, once they have all been listed.
async fn kubernetes_policy(
    args: &ServeArgs,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<PolicyWatch, String> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("--kubernetes: no in-cluster configuration and no usable kubeconfig: {e}"))?;
    tracing::info!(api_server = %config.cluster_url, cluster_domain = %args.cluster_domain, "Kubernetes mode");
    let client = kube::Client::try_from(config).map_err(|e| format!("--kubernetes: API server client: {e}"))?;
    let source = KubernetesSource {
        client,
        config: IndexConfig {
            cluster_domain: args.cluster_domain.clone(),
            trust_domain: args.trust_domain.to_string(),
            default_inbound: args.default_inbound_policy,
        },
    };
    // Serving before the first list would answer every destination "unknown" (plaintext).
    tokio::select! {
        policy = source.start_tracked(shutdown.clone(), tasks) => policy.map_err(|e| e.to_string()),
        _ = wait_for_signal() => {
            shutdown.cancel();
            Err("stopped before the cluster's objects were listed".to_string())
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn ca_init(args: &CaInitArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.out).map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let files = ["root.crt", "issuer.crt", "issuer.key"].map(|f| args.out.join(f));
    if !args.force
        && let Some(existing) = files.iter().find(|f| f.exists())
    {
        return Err(format!("{} exists; pass --force to replace it", existing.display()));
    }
    let generated = ca::generate(&args.trust_domain).map_err(|e| format!("cannot generate the CA: {e}"))?;
    write(&files[0], &generated.root_cert_pem, 0o644)?;
    write(&files[1], &generated.issuer_cert_pem, 0o644)?;
    write(&files[2], &generated.issuer_key_pem, 0o600)?;
    println!(
        "wrote {}, {}, {} for trust domain {}",
        files[0].display(),
        files[1].display(),
        files[2].display(),
        args.trust_domain
    );
    Ok(())
}

/// Reads all of stdin, then writes all of stdout, or nothing at all on an error.
fn inject_stdin(args: &InjectCommand) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    let input = String::from_utf8(input).map_err(|e| format!("standard input is not UTF-8: {e}"))?;
    let injected = inject::inject(&input, &args.options()).map_err(|e| e.to_string().replace('\n', " "))?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(injected.output.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write standard output: {e}"))?;
    for report in &injected.reports {
        eprintln!("{report}");
        for warning in &report.warnings {
            eprintln!("{}: warning: {warning}", report.object);
        }
    }
    Ok(())
}

/// Loads the policy as `serve` does and prints what each destination's watcher would be told;
/// all of stdout or nothing.
fn diagnose_destinations(args: &DiagnosticsDestinationArgs) -> Result<(), String> {
    use std::io::Write;
    let policy = pillion_control::policy::load(&args.policy).map_err(|e| e.to_string())?;
    let shown = diagnostics::destinations(&policy, &args.destinations, args.caller.as_ref(), args.output.format())?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(shown.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write standard output: {e}"))
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
