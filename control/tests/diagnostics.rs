//! `pillion-control diagnostics destination`, the real binary: a destination by name with its
//! endpoints, identities and routes; an endpoint's `ip:port` known by that endpoint alone; inbound
//! authorization shown only to the destination's own identity; unknown destinations; bad
//! arguments (exit 2) and a bad policy file (exit 1).

mod support;

use std::process::{Command, Output};

use serde_json::{Value, json};

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

const POLICY: &str = r#"
destinations:
  - destination: web.shop.svc.cluster.local:80
    endpoints:
      - { address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/shop/sa/web, protocol: http2 }
      - { address: 10.0.0.8:8080, identity: spiffe://cluster.local/ns/shop/sa/web, weight: 3 }
    routes:
      - name: api
        matches: [{ path: { type: PathPrefix, value: /api }, method: GET }]
        timeouts: { request: 10s, backendRequest: 2s }
        retry: { codes: [503, UNAVAILABLE], attempts: 2, backoff: 50ms }
        backendRefs: [{ address: 10.0.0.7:8080, weight: 90 }, { address: 10.0.0.8:8080, weight: 10 }]
inbound:
  - port: 8080
    authorization: { allow: ["spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/ops/*"] }
"#;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pillion-control"));
    // Start from a clean environment so the developer's PILLION_* variables do not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("PILLION_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `diagnostics destination` against `policy` with `args`.
fn diagnose(policy: &str, args: &[&str]) -> Output {
    let dir = support::TempDir::new("diagnostics");
    std::fs::write(dir.path("policy.yaml"), policy).unwrap();
    bin()
        .args(["diagnostics", "destination", "--policy"])
        .arg(dir.path("policy.yaml"))
        .args(args)
        .output()
        .unwrap()
}

/// The JSON documents on stdout of a successful run.
fn documents(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    serde_json::Deserializer::from_str(&stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_destination_by_name_shows_everything_a_proxy_is_told() {
    let docs = documents(&diagnose(POLICY, &["web.shop.svc.cluster.local:80"]));
    assert_eq!(docs.len(), 1);
    let web = &docs[0];
    assert_eq!(web["destination"], json!("web.shop.svc.cluster.local:80"));
    assert_eq!(web["known"], json!(true));
    assert_eq!(
        web["endpoints"],
        json!([
            { "address": "10.0.0.7:8080", "identity": WEB, "protocol": "http2", "weight": 1 },
            { "address": "10.0.0.8:8080", "identity": WEB, "protocol": "unknown", "weight": 3 },
        ])
    );
    assert_eq!(
        web["retryBudget"],
        json!({ "percent": 20, "minRetriesPerSecond": 10, "ttl": "10s" })
    );
    let route = &web["routes"][0];
    assert_eq!(route["name"], json!("api"));
    assert_eq!(
        route["matches"][0]["path"],
        json!({ "type": "PathPrefix", "value": "/api" })
    );
    assert_eq!(route["matches"][0]["method"], json!("GET"));
    assert_eq!(route["timeouts"], json!({ "request": "10s", "backendRequest": "2s" }));
    assert_eq!(
        route["retry"],
        json!({ "codes": [503, "UNAVAILABLE"], "attempts": 2, "backoff": "50ms" })
    );
    assert_eq!(
        route["backendRefs"],
        json!([{ "address": "10.0.0.7:8080", "weight": 90 }, { "address": "10.0.0.8:8080", "weight": 10 }])
    );
    // Port 80 has no inbound entry, so there is nothing to show even to a plaintext caller.
    assert!(web.get("inboundAuthorization").is_none(), "{web}");
}

#[test]
fn an_endpoint_address_is_known_by_that_endpoint_alone() {
    let docs = documents(&diagnose(POLICY, &["--caller", FRONTEND, "10.0.0.8:8080"]));
    assert_eq!(docs.len(), 1);
    let pod = &docs[0];
    assert_eq!(pod["destination"], json!("10.0.0.8:8080"));
    assert_eq!(pod["known"], json!(true));
    assert_eq!(
        pod["endpoints"],
        json!([{ "address": "10.0.0.8:8080", "identity": WEB, "protocol": "unknown", "weight": 3 }])
    );
    assert_eq!(pod["routes"], json!([]), "the name's routes are the name's");
}

#[test]
fn inbound_authorization_only_for_the_destinations_own_identity() {
    let allow = json!({ "allow": [FRONTEND, "spiffe://cluster.local/ns/ops/*"] });
    let own = documents(&diagnose(POLICY, &["--caller", WEB, "10.0.0.7:8080"]));
    assert_eq!(own[0]["inboundAuthorization"], allow);

    let other = documents(&diagnose(POLICY, &["--caller", FRONTEND, "10.0.0.7:8080"]));
    assert!(other[0].get("inboundAuthorization").is_none(), "{}", other[0]);
    // Everything else is the same for both.
    let mut seen_by_other = other[0].clone();
    seen_by_other["inboundAuthorization"] = allow.clone();
    assert_eq!(seen_by_other, own[0]);

    // A plaintext caller (no --caller) is not identified and gets every field.
    let plaintext = documents(&diagnose(POLICY, &["10.0.0.7:8080"]));
    assert_eq!(plaintext[0]["inboundAuthorization"], allow);
}

#[test]
fn unknown_destinations_and_one_line_per_document() {
    let out = diagnose(
        POLICY,
        &["--output", "json", "api.shop.svc.cluster.local:80", "10.0.0.9:8080"],
    );
    let docs = documents(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert_eq!(
        docs,
        vec![
            json!({ "destination": "api.shop.svc.cluster.local:80", "known": false }),
            // Port 8080 has an inbound entry and a plaintext caller sees it.
            json!({
                "destination": "10.0.0.9:8080",
                "known": false,
                "inboundAuthorization": { "allow": [FRONTEND, "spiffe://cluster.local/ns/ops/*"] },
            }),
        ]
    );
    // An identified caller is none of an unknown destination's endpoints.
    let docs = documents(&diagnose(POLICY, &["--caller", WEB, "10.0.0.9:8080"]));
    assert_eq!(docs, vec![json!({ "destination": "10.0.0.9:8080", "known": false })]);
}

#[test]
fn the_policy_comes_from_the_same_variable_as_serves() {
    let dir = support::TempDir::new("diagnostics-env");
    std::fs::write(dir.path("policy.yaml"), POLICY).unwrap();
    let out = bin()
        .args(["diagnostics", "destination", "web.shop.svc.cluster.local:80"])
        .env("PILLION_CONTROL_POLICY", dir.path("policy.yaml"))
        .output()
        .unwrap();
    assert_eq!(documents(&out)[0]["known"], json!(true));
}

#[test]
fn bad_arguments_exit_2_naming_the_value() {
    for (args, named) in [
        (&["web.shop.svc.cluster.local"][..], "web.shop.svc.cluster.local"),
        (&["10.0.0.7:0"][..], "10.0.0.7:0"),
        (&["--caller", "web", "10.0.0.7:8080"][..], "--caller"),
        (&["--output", "yaml", "10.0.0.7:8080"][..], "--output"),
        (&[][..], "<DESTINATION>"),
    ] {
        let out = diagnose(POLICY, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(out.stdout.is_empty());
    }
    // The arguments are checked before the file is read: a bad destination is a usage error even
    // when the policy is missing.
    let out = bin()
        .args([
            "diagnostics",
            "destination",
            "--policy",
            "/nonexistent/policy.yaml",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn a_bad_policy_file_exits_1_with_its_line() {
    let bad = "destinations:\n  - destination: a.b:1\n    endpoints: [{ address: nope }]\n";
    let out = diagnose(bad, &["a.b:1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("policy.yaml:3:") && err.contains("endpoints[0].address"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = bin()
        .args([
            "diagnostics",
            "destination",
            "--policy",
            "/nonexistent/policy.yaml",
            "a.b:1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/nonexistent/policy.yaml"), "{}", stderr(&out));
}
