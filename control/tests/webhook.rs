//! The admission webhook over real HTTPS: AdmissionReview v1 documents in, JSONPatches out, with a
//! fake API server answering Namespace lookups. The patch applied to the request's Pod must give
//! exactly what `pillion-control inject` writes for the same Pod, and pass the Kubernetes schema in
//! strict mode.

mod support;

use std::{convert::Infallible, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use pillion_control::{
    inject::{self, InjectOptions},
    kube_api::{KubeApi, KubeApiConfig},
    webhook::{self, CertificateFiles, Namespaces, Webhook},
};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "webhook-sa-token";

/// Namespaces as the API server knows them: `shop` opted in, `plain` not, `legacy` opted out.
async fn namespaces(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Value| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap())
    };
    if req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return reply(StatusCode::UNAUTHORIZED, json!({"kind": "Status", "code": 401}));
    }
    let annotations = match req.uri().path() {
        "/api/v1/namespaces/shop" => json!({"pillion.io/inject": "enabled"}),
        "/api/v1/namespaces/legacy" => json!({"pillion.io/inject": "disabled"}),
        "/api/v1/namespaces/plain" | "/api/v1/namespaces/kube-system" => json!({}),
        _ => return reply(StatusCode::NOT_FOUND, json!({"kind": "Status", "code": 404})),
    };
    let name = req.uri().path().rsplit('/').next().unwrap_or_default().to_string();
    reply(
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "annotations": annotations}}),
    )
}

struct Running {
    addr: SocketAddr,
    ca_pem: String,
    tls: CertificateFiles,
    dir: support::TempDir,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn start() -> Running {
    let dir = support::TempDir::new("webhook");
    let (api_addr, api_ca) = support::serve_https(service_fn(namespaces)).await;
    std::fs::write(dir.path("api-ca.crt"), api_ca).unwrap();
    std::fs::write(dir.path("token"), TOKEN).unwrap();
    let api = KubeApi::new(&KubeApiConfig {
        api_server: format!("https://{api_addr}").parse().unwrap(),
        ca_file: dir.path("api-ca.crt"),
        token_file: dir.path("token"),
        timeout: Duration::from_secs(5),
    })
    .unwrap();

    let (ca_pem, cert, key) = support::serving_cert();
    std::fs::write(dir.path("tls.crt"), cert).unwrap();
    std::fs::write(dir.path("tls.key"), key).unwrap();
    let tls = CertificateFiles::load(dir.path("tls.crt"), dir.path("tls.key")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let hook = Arc::new(Webhook {
        options: InjectOptions::default(),
        namespaces: Namespaces::new(Some(api)),
    });
    tokio::spawn(webhook::serve(listener, tls.clone(), hook, shutdown.clone()));
    Running {
        addr,
        ca_pem,
        tls,
        dir,
        _shutdown: shutdown.drop_guard(),
    }
}

/// One HTTPS/1.1 request, trusting only `ca_pem`.
async fn call(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/webhook").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The review's response, checked for the fields every answer must carry.
async fn review(running: &Running, review: &Value) -> Value {
    let (status, _, body) = call(
        running.addr,
        &running.ca_pem,
        "POST",
        "/inject",
        review.to_string().as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true, "the webhook never denies");
    answer["response"].clone()
}

/// The request's Pod with the response's patch applied (or unchanged without a patch).
fn patched(review: &Value, response: &Value) -> Option<Value> {
    let patch = response.get("patch")?.as_str()?;
    assert_eq!(response["patchType"], "JSONPatch");
    let patch: json_patch::Patch = serde_json::from_slice(&STANDARD.decode(patch).unwrap()).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    Some(pod)
}

/// What `pillion-control inject` writes for `pod`, read back as JSON.
fn cli_output(pod: &Value) -> Value {
    let yaml = yaml_serde::to_string(pod).unwrap();
    let injected = inject::inject(&yaml, &InjectOptions::default()).unwrap();
    yaml_serde::from_str(&injected.output).unwrap()
}

fn warnings(response: &Value) -> Vec<String> {
    response["warnings"]
        .as_array()
        .map(|w| w.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

fn with_namespace(mut review: Value, namespace: &str) -> Value {
    review["request"]["namespace"] = json!(namespace);
    review["request"]["object"]["metadata"]["namespace"] = json!(namespace);
    review
}

fn with_annotations(mut review: Value, annotations: Value) -> Value {
    review["request"]["object"]["metadata"]["annotations"] = annotations;
    review
}

/// `kubernetes-validate --strict` over `pod`: required in CI, skipped with a note elsewhere.
fn validate_strict(dir: &support::TempDir, pod: &Value) {
    // The API server names a generateName pod after admission; the validator wants a name.
    let mut pod = pod.clone();
    if pod["metadata"].get("name").is_none() {
        let name = format!("{}x7k2p", pod["metadata"]["generateName"].as_str().unwrap_or("pod-"));
        pod["metadata"]["name"] = json!(name);
    }
    let file = dir.path("injected-pod.json");
    std::fs::write(&file, pod.to_string()).unwrap();
    match std::process::Command::new("kubernetes-validate")
        .arg("--strict")
        .arg(&file)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "kubernetes-validate --strict refused the injected pod:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("kubernetes-validate is required in CI (pip install kubernetes-validate): {e}")
        }
        Err(e) => eprintln!("not validating the schema: kubernetes-validate: {e}"),
    }
}

#[tokio::test]
async fn namespace_opt_in_injects_exactly_what_the_cli_does() {
    let running = start().await;
    let request = fixture("pod-create.json");
    let response = review(&running, &request).await;
    let pod = patched(&request, &response).expect("a pod in an opted-in namespace is patched");
    assert_eq!(pod, cli_output(&request["request"]["object"]));
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["pillion-init", "pillion-proxy"]);
    assert!(warnings(&response).is_empty(), "{response}");
    validate_strict(&running.dir, &pod);

    // The injected pod comes back (a second webhook, a re-invocation): nothing more is added.
    let mut again = request.clone();
    again["request"]["object"] = pod;
    let response = review(&running, &again).await;
    assert!(response.get("patch").is_none(), "{response}");
    assert!(
        warnings(&response).iter().any(|w| w.contains("already injected")),
        "{response}"
    );
}

#[tokio::test]
async fn pod_annotation_wins_over_namespace() {
    let running = start().await;
    let base = fixture("pod-create.json");

    // Not opted in anywhere: untouched and silent.
    let plain = with_namespace(base.clone(), "plain");
    let response = review(&running, &plain).await;
    assert!(
        response.get("patch").is_none() && warnings(&response).is_empty(),
        "{response}"
    );

    // The pod opts in on its own.
    let pod_enabled = with_annotations(plain.clone(), json!({"pillion.io/inject": "enabled"}));
    let response = review(&running, &pod_enabled).await;
    let pod = patched(&pod_enabled, &response).expect("the pod's own annotation opts it in");
    assert_eq!(pod, cli_output(&pod_enabled["request"]["object"]));

    // The pod opts in inside an opted-out namespace; and opts out inside an opted-in one.
    let in_legacy = with_namespace(pod_enabled.clone(), "legacy");
    assert!(review(&running, &in_legacy).await.get("patch").is_some());
    let pod_disabled = with_annotations(base.clone(), json!({"pillion.io/inject": "disabled"}));
    let response = review(&running, &pod_disabled).await;
    assert!(response.get("patch").is_none(), "{response}");
    assert!(warnings(&response).iter().any(|w| w.contains("disabled")), "{response}");
}

#[tokio::test]
async fn skipped_pods_say_why() {
    let running = start().await;

    let host = fixture("host-network.json");
    let response = review(&running, &host).await;
    assert!(response.get("patch").is_none(), "{response}");
    assert!(
        warnings(&response).iter().any(|w| w.contains("hostNetwork")),
        "{response}"
    );

    for namespace in ["kube-system", "pillion-system"] {
        let request = with_annotations(
            with_namespace(fixture("pod-create.json"), namespace),
            json!({"pillion.io/inject": "enabled"}),
        );
        let response = review(&running, &request).await;
        assert!(response.get("patch").is_none(), "{namespace}: {response}");
        assert!(warnings(&response).iter().any(|w| w.contains(namespace)), "{response}");
    }

    let invalid = with_annotations(
        fixture("pod-create.json"),
        json!({"pillion.io/outbound-ports-to-ignore": "http"}),
    );
    let response = review(&running, &invalid).await;
    assert!(response.get("patch").is_none(), "{response}");
    assert!(
        warnings(&response)
            .iter()
            .any(|w| w.contains("pillion.io/outbound-ports-to-ignore")),
        "{response}"
    );

    // Not a Pod creation: passed through without a word.
    let mut update = fixture("pod-create.json");
    update["request"]["operation"] = json!("UPDATE");
    let response = review(&running, &update).await;
    assert!(
        response.get("patch").is_none() && warnings(&response).is_empty(),
        "{response}"
    );
}

#[tokio::test]
async fn bad_requests_get_http_errors_not_hangs() {
    let running = start().await;
    let (addr, ca) = (running.addr, running.ca_pem.as_str());

    let (status, _, _) = call(addr, ca, "POST", "/inject", b"{not json").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let mut no_uid = fixture("pod-create.json");
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    let (status, _, body) = call(addr, ca, "POST", "/inject", no_uid.to_string().as_bytes())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("uid"));

    // A well-formed review whose object is not a pod: admitted, with a warning.
    let mut odd = fixture("pod-create.json");
    odd["request"]["object"] = json!("a string");
    let (status, _, body) = call(addr, ca, "POST", "/inject", odd.to_string().as_bytes())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(!warnings(&answer["response"]).is_empty());

    let (status, headers, _) = call(addr, ca, "GET", "/inject", b"").await.unwrap();
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers.get("allow").unwrap(), "POST");
    let (status, _, _) = call(addr, ca, "POST", "/other", b"{}").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);

    let huge = vec![b' '; 5 * 1024 * 1024];
    let (status, _, _) = call(addr, ca, "POST", "/inject", &huge).await.unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn renewed_certificate_is_served_without_a_restart() {
    let running = start().await;
    assert!(call(running.addr, &running.ca_pem, "GET", "/inject", b"").await.is_ok());

    // A half-written renewal (a key without its certificate) is refused; the old pair keeps serving.
    std::fs::write(running.dir.path("tls.crt"), "garbage").unwrap();
    assert!(running.tls.reload().await.is_err());
    assert!(call(running.addr, &running.ca_pem, "GET", "/inject", b"").await.is_ok());

    let (new_ca, cert, key) = support::serving_cert();
    std::fs::write(running.dir.path("tls.crt"), cert).unwrap();
    std::fs::write(running.dir.path("tls.key"), key).unwrap();
    assert!(running.tls.reload().await.unwrap(), "a changed pair is installed");
    assert!(
        !running.tls.reload().await.unwrap(),
        "an unchanged pair is not reinstalled"
    );
    assert!(call(running.addr, &new_ca, "GET", "/inject", b"").await.is_ok());
    assert!(
        call(running.addr, &running.ca_pem, "GET", "/inject", b"")
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
}
