//! `pillion-demo`, end to end: the README's "run it" command is our broadest smoke test. It
//! builds a control plane and two pods out of network namespaces, sends HTTP, gRPC and TCP
//! between the apps, and checks from the proxies that the hop was mTLS between the expected
//! identities; here we check that it says so, exits as documented, and leaves nothing behind.
//!
//! The demo runs with `--no-build` (the binaries come from `cargo build --workspace`, like every
//! other end-to-end test) and finds them next to itself in `target/<profile>/`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use pillion_tests::netns::Netns;
use pillion_tests::process::{LogDir, Process};
use pillion_tests::require_root;

const DEMO: &str = env!("CARGO_BIN_EXE_pillion-demo");
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const DEMO_NAMESPACES: [&str; 3] = ["pillion-demo-node", "pillion-demo-client", "pillion-demo-server"];
/// A whole demo run takes a few seconds; this only bounds a hung one.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The demo's environment: no `PILLION_*` of the developer's, its files under `tmp`.
fn demo_command(mut cmd: Command, tmp: &Path) -> Command {
    pillion_tests::pod::without_pillion_env(&mut cmd);
    cmd.env("TMPDIR", tmp).env_remove("CARGO");
    cmd
}

/// Waits for `process` to exit within [`RUN_LIMIT`]; panics with its output otherwise.
fn finish(process: &mut Process) -> std::process::ExitStatus {
    process
        .wait_timeout(RUN_LIMIT)
        .unwrap_or_else(|| panic!("pillion-demo still running after {RUN_LIMIT:?}:\n{}", process.log()))
}

/// No work directory left in `tmp`; with `namespaces`, none of the demo's namespaces either
/// (not for the loopback mode, which may run while the other test's namespaces exist).
fn assert_nothing_left(tmp: &Path, namespaces: bool) {
    for ns in DEMO_NAMESPACES.iter().filter(|_| namespaces) {
        assert!(!Netns::exists(ns), "namespace {ns} left behind");
    }
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|name| name.to_string_lossy().starts_with("pillion-demo-"))
        .collect();
    assert!(left.is_empty(), "work directories left behind: {left:?}");
}

#[test]
fn demo_runs_the_mesh_reports_mtls_and_cleans_up_on_ctrl_c() {
    if !require_root("demo_runs_the_mesh_reports_mtls_and_cleans_up_on_ctrl_c") {
        return;
    }
    let logs = LogDir::new("demo");
    let mut cmd = demo_command(Command::new(DEMO), logs.path());
    cmd.args(["--no-build", "--keep", "--requests", "6"]);
    let mut demo = Process::spawn("pillion-demo", cmd, &logs);

    // `--keep`: the report, then the mesh stays up until Ctrl-C.
    let kept = pillion_tests::poll_until(RUN_LIMIT, Duration::from_millis(100), || {
        if demo.try_status().is_some() {
            return Some(false);
        }
        demo.log().contains("The mesh stays up until Ctrl-C").then_some(true)
    });
    assert_eq!(kept, Some(true), "the demo did not get to its report:\n{}", demo.log());
    let report = demo.log();
    for expected in [
        "HTTP/1.1 GET /hello      ×6 → 200 ×6",
        "gRPC     pillion.test.Echo/Unary ×3 → OK ×3",
        "TCP      10.42.0.20:7070 echo ×1 → ok",
        &format!("pod/client   {CLIENT_ID}"),
        &format!("pod/server   {SERVER_ID}"),
        &format!("mTLS from {CLIENT_ID}"),
        &format!("mTLS to {SERVER_ID}"),
        "ip netns exec pillion-demo-client curl",
    ] {
        assert!(report.contains(expected), "missing {expected:?} in:\n{report}");
    }
    // Per-route rows for both proxies (counts include the gRPC route's missing-method call).
    for row in [
        "outbound  hello",
        "inbound   hello",
        "outbound  grpc-echo",
        "inbound   grpc-echo",
    ] {
        assert!(report.contains(row), "missing route row {row:?} in:\n{report}");
    }
    assert!(
        report.contains("NOT_FOUND ×1") && report.contains("OK ×3"),
        "gRPC statuses by route:\n{report}"
    );
    for ns in DEMO_NAMESPACES {
        assert!(Netns::exists(ns), "{ns} should exist while the demo is kept up");
    }

    demo.signal(libc::SIGINT);
    let status = finish(&mut demo);
    let log = demo.log();
    assert!(
        status.success(),
        "Ctrl-C after the report is a normal end: {status}\n{log}"
    );
    assert!(
        log.contains("done: everything the demo started is stopped and removed"),
        "{log}"
    );
    assert_nothing_left(logs.path(), true);
}

#[test]
fn demo_without_iptables_runs_unprivileged_and_without_root_says_how() {
    if !require_root("demo_without_iptables_runs_unprivileged_and_without_root_says_how") {
        return;
    }
    // An unprivileged user in a namespace of ours: loopback only, nothing reaches the host.
    let ns = Netns::new("demo-lo");
    let logs = LogDir::new("demo-lo");
    std::fs::set_permissions(logs.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let as_nobody = |args: &[&str]| -> Output {
        let mut cmd = ns.command("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", DEMO])
            .args(args);
        demo_command(cmd, logs.path()).output().expect("running pillion-demo")
    };
    let probe = as_nobody(&["--version"]);
    if !probe.status.success() {
        eprintln!(
            "skipping: UID 65534 cannot run {DEMO} (a private home directory?): {}",
            String::from_utf8_lossy(&probe.stderr)
        );
        return;
    }

    // Without root and without the flag: a clear refusal naming the alternative.
    let refused = as_nobody(&["--no-build"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("--no-iptables"),
        "{stderr}"
    );

    let run = as_nobody(&["--no-build", "--no-iptables", "--requests", "4"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{}\n{stdout}\n{stderr}", run.status);
    for expected in [
        "HTTP/1.1 GET /hello      ×4 → 200 ×4",
        "gRPC     pillion.test.Echo/Unary ×2 → OK ×2",
        &format!("mTLS from {CLIENT_ID}"),
        &format!("client       {CLIENT_ID}"),
        &format!("server       {SERVER_ID}"),
        "done: everything the demo started is stopped and removed",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    assert_nothing_left(logs.path(), false);
}

#[test]
fn demo_rejects_a_bad_flag_value_in_one_line() {
    // No root needed: the value is checked before anything else.
    let out = Command::new(DEMO)
        .args(["--requests", "0"])
        .env_remove("CARGO")
        .output()
        .expect("running pillion-demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--requests") && stderr.contains('0'), "{stderr}");

    let out = Command::new(DEMO)
        .env("PILLION_DEMO_REQUESTS", "many")
        .env_remove("CARGO")
        .output()
        .expect("running pillion-demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("many"), "{stderr}");
}
