//! The `pillion-control` binary: help and version, one-line usage errors with exit code 2, file
//! errors with exit code 1, `ca init`, and a real `serve` that stops cleanly on SIGTERM.

mod support;

use std::{
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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

#[test]
fn help_and_version() {
    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pillion-control "));
    let out = bin().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "PILLION_CONTROL_LISTEN",
        "PILLION_CONTROL_TRUST_DOMAIN",
        "PILLION_CONTROL_ISSUER_CERT",
        "PILLION_CONTROL_ISSUER_KEY",
        "PILLION_CONTROL_TRUST_ANCHORS",
        "PILLION_CONTROL_CERT_LIFETIME",
        "PILLION_CONTROL_TOKENS",
        "PILLION_CONTROL_TOKEN_REVIEW",
        "PILLION_CONTROL_POLICY",
        "PILLION_LOG",
    ] {
        assert!(help.contains(env), "help lacks {env}");
    }
}

#[test]
fn bad_flag_values_exit_2_with_one_line() {
    let out = bin()
        .args([
            "serve",
            "--issuer-cert=a",
            "--issuer-key=b",
            "--trust-anchors=c",
            "--tokens=t",
        ])
        .env("PILLION_CONTROL_CERT_LIFETIME", "forever")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--cert-lifetime") && err.contains("PILLION_CONTROL_CERT_LIFETIME") && err.contains("forever"),
        "{err}"
    );

    let out = bin()
        .args(["ca", "init", "--out=x", "--trust-domain=Not Valid"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn ca_init_then_serve_until_sigterm() {
    let dir = support::TempDir::new("cli");
    let out = bin().args(["ca", "init", "--out"]).arg(&dir.0).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["root.crt", "issuer.crt", "issuer.key"] {
        assert!(dir.path(f).exists(), "{f} missing");
    }
    // A second run refuses to overwrite.
    let again = bin().args(["ca", "init", "--out"]).arg(&dir.0).output().unwrap();
    assert_eq!(again.status.code(), Some(1));

    std::fs::write(
        dir.path("tokens.yaml"),
        "- {token: aaaaaaaaaaaaaaaaaaaaaaaa, namespace: default, serviceAccount: web}\n",
    )
    .unwrap();
    std::fs::write(dir.path("policy.yaml"), "destinations: []\n").unwrap();
    let (_, webhook_cert, webhook_key) = support::serving_cert();
    std::fs::write(dir.path("webhook.crt"), webhook_cert).unwrap();
    std::fs::write(dir.path("webhook.key"), webhook_key).unwrap();
    let free_port = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (port, webhook_port) = (free_port(), free_port());
    let log = std::fs::File::create(dir.path("serve.log")).unwrap();
    let mut child = bin()
        .arg("serve")
        .env("PILLION_LOG_FORMAT", "json")
        .env("PILLION_CONTROL_WEBHOOK_ADDR", format!("127.0.0.1:{webhook_port}"))
        .env("PILLION_CONTROL_WEBHOOK_CERT", dir.path("webhook.crt"))
        .env("PILLION_CONTROL_WEBHOOK_KEY", dir.path("webhook.key"))
        .env("PILLION_CONTROL_LISTEN", format!("127.0.0.1:{port}"))
        .env("PILLION_CONTROL_ISSUER_CERT", dir.path("issuer.crt"))
        .env("PILLION_CONTROL_ISSUER_KEY", dir.path("issuer.key"))
        .env("PILLION_CONTROL_TRUST_ANCHORS", dir.path("root.crt"))
        .env("PILLION_CONTROL_TOKENS", dir.path("tokens.yaml"))
        .env("PILLION_CONTROL_POLICY", dir.path("policy.yaml"))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() || TcpStream::connect(("127.0.0.1", webhook_port)).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));

    // PILLION_LOG_FORMAT=json: every line a JSON object with an RFC 3339 UTC timestamp.
    let log = std::fs::read_to_string(dir.path("serve.log")).unwrap();
    assert!(log.contains("admission webhook serving"), "{log}");
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let ts = entry["timestamp"].as_str().unwrap_or_default();
        let rfc3339 = ts.len() >= 20
            && ts.as_bytes()[4] == b'-'
            && ts.as_bytes()[10] == b'T'
            && ts.ends_with('Z')
            && time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok();
        assert!(rfc3339, "not RFC 3339: {ts} in {line}");
    }
}

#[test]
fn serve_without_required_flags_names_them_all() {
    let out = bin().arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for flag in ["--issuer-cert", "--issuer-key", "--trust-anchors", "--tokens"] {
        assert!(stderr.contains(flag), "{flag} missing: {stderr}");
    }
}

#[test]
fn unusable_files_exit_1_before_binding() {
    let dir = support::TempDir::new("cli-files");
    bin().args(["ca", "init", "--out"]).arg(&dir.0).output().unwrap();
    let other = support::TempDir::new("cli-files-other");
    bin().args(["ca", "init", "--out"]).arg(&other.0).output().unwrap();
    std::fs::write(dir.path("tokens.yaml"), "[]\n").unwrap();

    let run = |cert: &std::path::Path, key: &std::path::Path, anchors: &std::path::Path| {
        bin()
            .args(["serve", "--listen=127.0.0.1:0"])
            .arg("--issuer-cert")
            .arg(cert)
            .arg("--issuer-key")
            .arg(key)
            .arg("--trust-anchors")
            .arg(anchors)
            .arg("--tokens")
            .arg(dir.path("tokens.yaml"))
            .output()
            .unwrap()
    };
    let missing = run(&dir.path("nope.crt"), &dir.path("issuer.key"), &dir.path("root.crt"));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.crt"));

    let mismatched = run(
        &dir.path("issuer.crt"),
        &other.path("issuer.key"),
        &dir.path("root.crt"),
    );
    assert_eq!(mismatched.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&mismatched.stderr).contains("does not match"));

    let not_ca = run(&dir.path("root.crt"), &dir.path("issuer.key"), &dir.path("root.crt"));
    assert_eq!(not_ca.status.code(), Some(1));
}

/// `serve` on `port` with the CA and tokens in `dir`, plus `env`; stderr to `log`.
fn spawn_serve(dir: &support::TempDir, port: u16, env: &[(&str, &str)], log: &str) -> std::process::Child {
    let log = std::fs::File::create(dir.path(log)).unwrap();
    let mut cmd = bin();
    cmd.arg("serve")
        .env("PILLION_CONTROL_LISTEN", format!("127.0.0.1:{port}"))
        .env("PILLION_CONTROL_ISSUER_CERT", dir.path("issuer.crt"))
        .env("PILLION_CONTROL_ISSUER_KEY", dir.path("issuer.key"))
        .env("PILLION_CONTROL_TRUST_ANCHORS", dir.path("root.crt"))
        .env("PILLION_CONTROL_TOKENS", dir.path("tokens.yaml"))
        .stderr(Stdio::from(log));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// SIGTERM, then the exit status within 10 s.
async fn stop(mut child: std::process::Child) -> std::process::ExitStatus {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn serve_speaks_tls_as_its_identity_or_plaintext_when_told() {
    use pillion_control::proto::{CertifyRequest, identity_client::IdentityClient};
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    let dir = support::TempDir::new("cli-tls");
    let out = bin().args(["ca", "init", "--out"]).arg(&dir.0).output().unwrap();
    assert!(out.status.success());
    let token = "aaaaaaaaaaaaaaaaaaaaaaaa";
    std::fs::write(
        dir.path("tokens.yaml"),
        format!("- {{token: {token}, namespace: default, serviceAccount: web}}\n"),
    )
    .unwrap();
    let anchors: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.path("root.crt"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let request = || CertifyRequest {
        token: token.to_string(),
        csr_der: support::csr(),
    };
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };

    // Default: TLS, with the identity named by PILLION_CONTROL_IDENTITY.
    let id = "spiffe://cluster.local/ns/mesh/sa/control";
    let port = free_port();
    let child = spawn_serve(&dir, port, &[("PILLION_CONTROL_IDENTITY", id)], "tls.log");
    wait_for_port(port).await;
    let addr = ([127, 0, 0, 1], port).into();
    let config = support::client_config(&anchors, id, None);
    let channel = support::channel_with(addr, config).await.unwrap();
    let issued = IdentityClient::new(channel)
        .certify(request())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
    // A plaintext client gets nowhere.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    if let Ok(channel) = plain.connect().await {
        assert!(IdentityClient::new(channel).certify(request()).await.is_err());
    }
    assert_eq!(stop(child).await.code(), Some(0));
    let log = std::fs::read_to_string(dir.path("tls.log")).unwrap();
    assert!(
        log.contains("control-plane certificate issued") && log.contains(id),
        "{log}"
    );

    // PILLION_CONTROL_PLAINTEXT=true: the old plaintext server, with a warning.
    let port = free_port();
    let child = spawn_serve(&dir, port, &[("PILLION_CONTROL_PLAINTEXT", "true")], "plain.log");
    wait_for_port(port).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    IdentityClient::new(channel).certify(request()).await.unwrap();
    assert_eq!(stop(child).await.code(), Some(0));
    let log = std::fs::read_to_string(dir.path("plain.log")).unwrap();
    assert!(log.contains("for local development only"), "{log}");
}
