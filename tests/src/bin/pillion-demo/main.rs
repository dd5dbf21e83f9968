//! `pillion-demo`: a local mesh in one command.
//!
//! As root on Linux it builds a small cluster out of network namespaces — a node with the
//! control plane, and two pods started like injected Kubernetes pods (init container, native
//! sidecar gated by its startup probe, app) — sends HTTP, gRPC and TCP from one app to the
//! other in plaintext, and shows from the proxies' admin ports that the hop was mutual TLS
//! between the two SPIFFE identities, with requests and latency per route. Without root,
//! `--no-iptables` runs the same mesh on loopback ports. Everything is removed at the end, on
//! Ctrl-C, and on failure (the logs are kept then).
//!
//! ```text
//! cargo run --release --bin pillion-demo                     # as root
//! cargo run --release --bin pillion-demo -- --keep           # stay up until Ctrl-C, to poke at it
//! cargo run --release --bin pillion-demo -- --no-iptables    # any user
//! ```

mod config;
mod exercise;
mod loopback;
mod namespaces;
mod preflight;
mod report;
mod signals;

use std::process::ExitCode;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, Parser};
use pillion_tests::mesh::{MeshFiles, Workload};
use pillion_tests::process::LogDir;

use crate::exercise::LocalMesh;

/// Runs a local Pillion mesh: control plane, two pods with iptables-init and the proxy, mTLS
/// between them, traffic, metrics. Needs root (network namespaces, iptables) unless
/// --no-iptables is given.
#[derive(Debug, Parser)]
#[command(name = "pillion-demo", version)]
struct Args {
    /// Keep the mesh running after the report, until Ctrl-C, with commands to poke at it.
    #[arg(long, env = "PILLION_DEMO_KEEP")]
    keep: bool,

    /// No root, namespaces or iptables: both proxies on loopback ports, chained proxy to proxy.
    #[arg(long, env = "PILLION_DEMO_NO_IPTABLES")]
    no_iptables: bool,

    /// Never run `cargo build`: use the binaries next to this one (or PILLION_E2E_PROXY,
    /// PILLION_E2E_IPTABLES_INIT, PILLION_E2E_CONTROL).
    #[arg(long, env = "PILLION_DEMO_NO_BUILD")]
    no_build: bool,

    /// HTTP requests per route sent by the client app (gRPC calls: half as many).
    #[arg(long, env = "PILLION_DEMO_REQUESTS", default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=10_000))]
    requests: u16,
}

/// Why the demo stopped early.
enum Stop {
    Failed(String),
    Interrupted,
}

impl From<String> for Stop {
    fn from(reason: String) -> Stop {
        // A step that failed because the user pressed Ctrl-C is an interruption, not a failure.
        match signals::interrupted() {
            true => Stop::Interrupted,
            false => Stop::Failed(reason),
        }
    }
}

fn main() -> ExitCode {
    let args = parse_args();
    if let Err(e) = signals::install() {
        eprintln!("pillion-demo: {e}");
        return ExitCode::from(1);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Interrupted) => {
            eprintln!("pillion-demo: interrupted; everything it started is stopped and removed");
            ExitCode::from(130)
        }
        Err(Stop::Failed(reason)) => {
            eprintln!("pillion-demo: {reason}");
            ExitCode::from(1)
        }
    }
}

/// Flags and environment; a bad value is one line naming it, exit code 2 (the contract of every
/// Pillion binary).
fn parse_args() -> Args {
    match Args::try_parse() {
        Ok(args) => args,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            match env_of(&e) {
                Some(env) => eprintln!("pillion-demo: {first} (env {env})"),
                None => eprintln!("pillion-demo: {first}"),
            }
            std::process::exit(2);
        }
    }
}

/// The environment variable of the flag an error is about, since either may have set it.
fn env_of(e: &clap::Error) -> Option<String> {
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let flag = arg.split(' ').next()?;
    Args::command()
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|long| flag == format!("--{long}")))
        .and_then(|a| a.get_env())
        .map(|env| env.to_string_lossy().into_owned())
}

fn run(args: &Args) -> Result<(), Stop> {
    if !args.no_iptables {
        preflight::check_namespaces_mode()?;
    }
    preflight::ensure_binaries(args.no_build)?;
    check(signals::interrupted())?;

    // A fresh directory (never one that already exists, e.g. planted in a shared /tmp): it will
    // hold the CA key and the workloads' tokens.
    let dir = std::env::temp_dir().join(format!("pillion-demo-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let work = LogDir::create(dir)?;
    signals::track_files(work.path());
    println!(
        "pillion-demo: a local mesh {}; files and logs in {}\n",
        match args.no_iptables {
            true => "on loopback ports (no namespaces, no iptables)",
            false => "of network namespaces",
        },
        work.path().display()
    );
    let outcome = if args.no_iptables {
        demo(args, &work, loopback::LoopbackMesh::start, loopback::LoopbackMesh::stop)
    } else {
        demo(
            args,
            &work,
            namespaces::NamespaceMesh::start,
            namespaces::NamespaceMesh::stop,
        )
    };
    signals::forget_all();
    // A failure's logs are kept for reading; an interruption is not a failure.
    if let Err(Stop::Failed(_)) = outcome {
        work.keep();
        eprintln!("pillion-demo: logs kept in {}", work.path().display());
    }
    outcome
}

/// Builds the mesh with `start`, exercises and reports it, then stops it with `stop`.
fn demo<M: LocalMesh>(
    args: &Args,
    work: &LogDir,
    start: impl FnOnce(&LogDir, &MeshFiles, &Workload, &Workload) -> Result<M, String>,
    stop: impl FnOnce(M) -> Result<(), String>,
) -> Result<(), Stop> {
    let client = Workload::new("default", "client");
    let server = Workload::new("default", "server");
    let files = MeshFiles::create(work.path(), &[&client, &server])?;
    let mesh = start(work, &files, &client, &server)?;
    let shown = show(args, &mesh, &client, &server, work.path());
    say("stopping: SIGTERM to the proxies (they drain and exit 0) and the control plane");
    let stopped = stop(mesh);
    shown?;
    stopped?;
    println!("done: everything the demo started is stopped and removed");
    Ok(())
}

/// Traffic, checks, report; then, with `--keep`, waits for Ctrl-C.
fn show<M: LocalMesh>(
    args: &Args,
    mesh: &M,
    client: &Workload,
    server: &Workload,
    dir: &std::path::Path,
) -> Result<(), Stop> {
    check(signals::interrupted())?;
    println!("\nTraffic from the client app (plaintext; the proxies add mTLS)");
    let traffic = exercise::send(mesh, usize::from(args.requests));
    for line in &traffic.lines {
        println!("  {line}");
    }
    check(signals::interrupted())?;
    let evidence = report::collect(mesh, &traffic, &client.spiffe_id(), &server.spiffe_id())?;
    println!("\n{}", evidence.render());

    let commands = mesh.poke_commands();
    if !args.keep {
        println!("Run with --keep to keep the mesh up and poke at it, e.g.:");
        println!("  {}", commands[0]);
        return Ok(());
    }
    println!("The mesh stays up until Ctrl-C. Try:");
    for command in &commands {
        println!("  {command}");
    }
    println!("  tail -f {0}/*-proxy.log {0}/pillion-control.log", dir.display());
    if preflight::find_tool("curl").is_none() {
        println!("  (curl is not installed here: apt-get install curl)");
    }
    while !signals::interrupted() {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn check(interrupted: bool) -> Result<(), Stop> {
    match interrupted {
        true => Err(Stop::Interrupted),
        false => Ok(()),
    }
}

/// One progress line.
pub fn say(line: &str) {
    println!("{line}");
}
