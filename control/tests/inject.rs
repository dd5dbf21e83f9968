//! `pillion-control inject`: golden files over real-world manifests, idempotency, the hand-written
//! reference, errors, and the real binary reading stdin.
//!
//! Each `tests/inject/NAME.in.yaml` is injected with the default options and compared with
//! `NAME.out.yaml`. After a deliberate change (or a version bump, which is in the
//! `pillion.io/injected` annotation) regenerate them, then read the diff before committing:
//!
//! ```sh
//! PILLION_UPDATE_GOLDEN=1 cargo test -p pillion-control --test inject
//! ```

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use pillion_control::inject::{InjectOptions, Outcome, inject};
use yaml_serde::Value;

/// Every golden case, with what the injector reports for it (stderr of the binary).
const CASES: &[(&str, &[&str])] = &[
    ("deployment-init-containers", &["deployment/orders-api: injected"]),
    ("statefulset", &["statefulset/redis: injected"]),
    ("daemonset", &["daemonset/fluent-bit: injected"]),
    (
        "daemonset-host-network",
        &["daemonset/node-exporter: not injected: hostNetwork pods share the node's network namespace"],
    ),
    ("cronjob", &["cronjob/nightly-report: injected"]),
    ("job", &["job/reindex-search: injected"]),
    ("pod", &["pod/debug-shell: injected"]),
    ("multi-document", &["deployment/checkout: injected"]),
    (
        "list",
        &["deployment/catalog: injected", "replicaset/catalog-legacy: injected"],
    ),
    (
        "opted-out",
        &["deployment/legacy-importer: not injected: pillion.io/inject is disabled"],
    ),
    (
        "annotations",
        &[
            "deployment/payments: injected",
            "deployment/payments: warning: pillion.io/ annotations on the object itself are ignored: put them on spec.template.metadata.annotations",
            "deployment/payments: warning: unknown annotation pillion.io/proxy-cpu-limit ignored",
        ],
    ),
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn input(name: &str) -> String {
    read(&golden_dir().join(format!("{name}.in.yaml")))
}

fn expected(name: &str) -> String {
    read(&golden_dir().join(format!("{name}.out.yaml")))
}

/// The report lines as the binary prints them.
fn report_lines(reports: &[pillion_control::inject::Report]) -> Vec<String> {
    let mut lines = Vec::new();
    for report in reports {
        lines.push(report.to_string());
        lines.extend(
            report
                .warnings
                .iter()
                .map(|w| format!("{}: warning: {w}", report.object)),
        );
    }
    lines
}

#[test]
fn golden_files() {
    let update = std::env::var_os("PILLION_UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for (name, reports) in CASES {
        let injected = inject(&input(name), &InjectOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report_lines(&injected.reports), *reports, "{name}: reports");
        let path = golden_dir().join(format!("{name}.out.yaml"));
        if update {
            // Write and rename, so the binary tests running alongside never read half a file.
            let partial = path.with_extension("partial");
            std::fs::write(&partial, &injected.output).unwrap();
            std::fs::rename(&partial, &path).unwrap();
        } else if injected.output != expected(name) {
            let first_difference = injected
                .output
                .lines()
                .zip(expected(name).lines())
                .position(|(a, b)| a != b)
                .map_or("in length".to_string(), |i| format!("at line {}", i + 1));
            mismatches.push(format!("{name}.out.yaml differs {first_difference}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{mismatches:#?}\nIf the change is intended: PILLION_UPDATE_GOLDEN=1 cargo test -p pillion-control --test inject, then review the diff"
    );
}

#[test]
fn every_input_file_is_a_case() {
    for entry in std::fs::read_dir(golden_dir()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        let name = file
            .strip_suffix(".in.yaml")
            .or_else(|| file.strip_suffix(".out.yaml"))
            .unwrap_or_else(|| panic!("unexpected file tests/inject/{file}"));
        assert!(CASES.iter().any(|(case, _)| *case == name), "{file} is not in CASES");
    }
}

#[test]
fn injecting_twice_changes_nothing() {
    for (name, _) in CASES {
        let once = inject(&input(name), &InjectOptions::default()).unwrap().output;
        let twice = inject(&once, &InjectOptions::default()).unwrap();
        assert!(twice.output == once, "{name}: the second pass changed the output");
        for report in &twice.reports {
            assert_ne!(report.outcome, Outcome::Injected, "{name}: {report}");
        }
    }
}

#[test]
fn documents_not_changed_are_copied_byte_for_byte() {
    let multi = input("multi-document");
    let output = inject(&multi, &InjectOptions::default()).unwrap().output;
    let documents: Vec<&str> = multi.split("\n---\n").collect();
    assert_eq!(documents.len(), 6);
    for (i, document) in documents.iter().enumerate() {
        if !document.contains("kind: Deployment") {
            assert!(output.contains(document), "document {} was changed", i + 1);
        }
    }
    // The changed one keeps its heading comment.
    assert!(output.contains("---\n# The checkout API itself.\napiVersion: apps/v1\nkind: Deployment\n"));
    // Workloads that are left alone are left byte for byte too.
    for name in ["opted-out", "daemonset-host-network"] {
        assert_eq!(
            inject(&input(name), &InjectOptions::default()).unwrap().output,
            input(name)
        );
    }
}

/// deploy/example-app.yaml is Pillion added by hand, the documented reference. Taking Pillion out
/// of its Deployment and injecting must give it back, field for field.
#[test]
fn reproduces_the_hand_written_example() {
    let example = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/example-app.yaml"));
    let reference: Value = example
        .split("\n---\n")
        .map(|doc| yaml_serde::from_str::<Value>(doc).unwrap())
        .find(|doc| doc["kind"] == "Deployment")
        .unwrap();

    // Already injected (it has a pillion-proxy container): unchanged, byte for byte.
    let injected = inject(&example, &InjectOptions::default()).unwrap();
    assert_eq!(injected.output, example);
    assert_eq!(
        report_lines(&injected.reports),
        ["deployment/web: already injected, unchanged"]
    );

    let mut plain = reference.clone();
    let spec = plain["spec"]["template"]["spec"].as_mapping_mut().unwrap();
    spec.remove("initContainers");
    spec.remove("volumes");
    let plain = yaml_serde::to_string(&plain).unwrap();
    let injected = inject(&plain, &InjectOptions::default()).unwrap().output;
    let mut injected: Value = yaml_serde::from_str(&injected).unwrap();
    let annotations = injected["spec"]["template"]["metadata"]
        .as_mapping_mut()
        .unwrap()
        .remove("annotations")
        .unwrap();
    assert_eq!(annotations["pillion.io/injected"], env!("CARGO_PKG_VERSION"));
    assert_eq!(injected, reference);
}

#[test]
fn options_reach_the_containers() {
    let options = InjectOptions {
        proxy_image: "registry.example/pillion/proxy:0.2.0".into(),
        init_image: "registry.example/pillion/init:0.2.0".into(),
        control_addr: "pillion-control.mesh.svc:8090".into(),
        proxy_log_level: "debug".into(),
        version: "0.2.0".into(),
        ..InjectOptions::default()
    };
    let output = inject(&input("pod"), &options).unwrap().output;
    let pod: Value = yaml_serde::from_str(&output).unwrap();
    let init = &pod["spec"]["initContainers"];
    assert_eq!(init[0]["image"], "registry.example/pillion/init:0.2.0");
    assert_eq!(init[1]["image"], "registry.example/pillion/proxy:0.2.0");
    assert_eq!(env(&init[1], "PILLION_CONTROL_ADDR"), "pillion-control.mesh.svc:8090");
    assert_eq!(env(&init[1], "PILLION_LOG"), "debug");
    assert_eq!(pod["metadata"]["annotations"]["pillion.io/injected"], "0.2.0");

    // The annotation wins over the default.
    let output = inject(&input("annotations"), &options).unwrap().output;
    let deployment: Value = yaml_serde::from_str(output.split_once("\n---\n").map_or(&output, |p| p.1)).unwrap();
    let init = &deployment["spec"]["template"]["spec"]["initContainers"];
    assert_eq!(env(&init[1], "PILLION_LOG"), "warn,pillion_proxy=debug");
    assert_eq!(
        env(&init[0], "PILLION_INIT_INBOUND_PORTS_TO_IGNORE"),
        "4191,6060,9000-9010"
    );
}

fn env<'a>(container: &'a Value, name: &str) -> &'a str {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn invalid_yaml_names_the_document_and_the_line() {
    let input = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n# broken\napiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n   labels: {}\n---\nkind: Service\n";
    let err = inject(input, &InjectOptions::default()).unwrap_err();
    assert_eq!((err.document, err.line), (2, 4));
    let message = err.to_string();
    assert!(message.starts_with("document 2 (line 4): "), "{message}");
    assert!(message.contains("line 10 column 10"), "{message}");
}

#[test]
fn bad_annotations_and_name_clashes_stop_everything() {
    let pod = |annotations: &str, volumes: &str| {
        format!(
            "kind: Service\napiVersion: v1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {annotations}\nspec:\n  containers: [{{name: app, image: app}}]\n  volumes: {volumes}\n"
        )
    };
    for (input, expected) in [
        (
            pod("{pillion.io/inject: disable}", "[]"),
            "document 2 (line 3): pod/p: annotation pillion.io/inject: 'disable' is neither 'enabled' nor 'disabled'",
        ),
        (
            pod("{pillion.io/outbound-ports-to-ignore: '5432,pg'}", "[]"),
            "document 2 (line 3): pod/p: annotation pillion.io/outbound-ports-to-ignore: 'pg' is not a port",
        ),
        (
            pod("{}", "[{name: pillion-trust-anchors, emptyDir: {}}]"),
            "document 2 (line 3): pod/p: the pod already has a volume named pillion-trust-anchors, which injection adds: rename or remove it",
        ),
    ] {
        assert_eq!(
            inject(&input, &InjectOptions::default()).unwrap_err().to_string(),
            expected
        );
    }
}

#[test]
fn other_kinds_and_groups_pass_through() {
    let input = "apiVersion: example.com/v1\nkind: Job\nspec:\n  template:\n    spec:\n      containers: []\n---\n# only a comment\n---\n- a list\n---\n";
    let injected = inject(input, &InjectOptions::default()).unwrap();
    assert_eq!(injected.output, input);
    assert!(injected.reports.is_empty());
}

// ---- the binary -------------------------------------------------------------------------------

fn run(args: &[&str], envs: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pillion-control"));
    for (key, _) in std::env::vars() {
        if key.starts_with("PILLION_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .arg("inject")
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn binary_reads_stdin_and_writes_stdout() {
    let out = run(&[], &[], input("multi-document").as_bytes());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected("multi-document"));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "deployment/checkout: injected\n"
    );

    let out = run(&[], &[], input("annotations").as_bytes());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let (_, expected_reports) = CASES.iter().find(|(name, _)| *name == "annotations").unwrap();
    assert_eq!(stderr.lines().collect::<Vec<_>>(), *expected_reports);
}

#[test]
fn binary_flags_and_environment() {
    let out = run(
        &["--proxy-image=registry.example/proxy:1", "--log-level=debug"],
        &[
            ("PILLION_INJECT_INIT_IMAGE", "registry.example/init:1"),
            ("PILLION_INJECT_CONTROL_ADDR", "control.example:8090"),
        ],
        input("pod").as_bytes(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pod: Value = yaml_serde::from_slice(&out.stdout).unwrap();
    let init = &pod["spec"]["initContainers"];
    assert_eq!(init[0]["image"], "registry.example/init:1");
    assert_eq!(init[1]["image"], "registry.example/proxy:1");
    assert_eq!(env(&init[1], "PILLION_CONTROL_ADDR"), "control.example:8090");
    assert_eq!(env(&init[1], "PILLION_LOG"), "debug");

    let out = Command::new(env!("CARGO_BIN_EXE_pillion-control"))
        .args(["inject", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for text in ["Comments", "PILLION_INJECT_PROXY_IMAGE", "pillion.io/inject: disabled"] {
        assert!(help.contains(text), "help lacks {text}");
    }
}

#[test]
fn binary_errors_write_nothing() {
    // Broken YAML in the third document: the first two are fine, but nothing is written.
    let mut input = input("multi-document");
    input.push_str("---\nkind: Pod\nspec: [\n");
    let out = run(&[], &[], input.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("pillion-control: document 7 (line 94): ") && stderr.contains("line 97 column 1"),
        "{stderr}"
    );

    let out = run(&[], &[], b"kind: Pod\nmetadata: {name: \xff}\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not UTF-8"));

    // Flags are clap's: an unknown one, or a bad value, is a usage error.
    let out = run(&["--proxy-imgae=x"], &[], b"");
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[], &[("PILLION_INJECT_CONTROL_ADDR", "https://x:1")], b"");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("PILLION_INJECT_CONTROL_ADDR") && stderr.contains("https://x:1"),
        "{stderr}"
    );

    // Empty input is an empty stream, not an error.
    let out = run(&[], &[], b"");
    assert!(out.status.success() && out.stdout.is_empty());
}

#[test]
fn the_control_plane_and_kube_system_are_never_injected() {
    // What an operator might pipe through the injector: our own deployment and the example app.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut all = String::new();
    for file in ["control-plane.yaml", "example-app.yaml"] {
        all.push_str(&read(&deploy.join(file)));
        all.push_str("\n---\n");
    }
    let injected = inject(&all, &InjectOptions::default()).unwrap();
    let control = injected
        .reports
        .iter()
        .find(|r| r.object == "deployment/pillion-control")
        .expect("the control plane's Deployment is reported");
    assert!(
        matches!(&control.outcome, Outcome::Skipped(why) if why.contains("pillion-system")),
        "{control:?}"
    );
    assert!(
        injected
            .reports
            .iter()
            .any(|r| r.object == "deployment/web" && !matches!(r.outcome, Outcome::Skipped(_))),
        "{:?}",
        injected.reports
    );

    let system = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: coredns\n  namespace: kube-system\nspec:\n  template:\n    metadata:\n      annotations:\n        pillion.io/inject: enabled\n    spec:\n      containers:\n        - name: coredns\n          image: coredns:1.11\n";
    let injected = inject(system, &InjectOptions::default()).unwrap();
    assert_eq!(injected.output, system, "kube-system passes through unchanged");
    assert!(matches!(&injected.reports[0].outcome, Outcome::Skipped(why) if why.contains("kube-system")));
}

#[test]
fn a_bare_carriage_return_in_a_top_comment_injects_twice_unchanged() {
    // Found by the inject fuzz target: the second pass failed with "duplicate entry with key".
    let input =
        "# a\rb: 1\nkind: Pod\napiVersion: v1\nmetadata: {name: p}\nspec: {containers: [{name: c, image: i}]}\n";
    let once = inject(input, &InjectOptions::default()).unwrap().output;
    let twice = inject(&once, &InjectOptions::default()).unwrap().output;
    assert_eq!(once, twice);
}
