//! The fidelity of the emulated API server (support/apiserver.rs), checked with the official
//! Python client (`kubernetes` from PyPI): paged lists with `continue`, namespaced and custom
//! resource lists, a watch replaying the events after a resourceVersion with bookmarks until
//! `timeoutSeconds`, and a watch from a compacted version failing with 410 as the client expects.
//! Required in CI (.ci/run installs the client); elsewhere a missing client is reported and the
//! check is not run.

#[path = "support/apiserver.rs"]
mod apiserver;

use std::time::Duration;

use apiserver::ApiServer;
use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use serde_json::{Value, json};

const CLIENT: &str = r#"
import json, sys
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

url, since, too_old = sys.argv[1], sys.argv[2], sys.argv[3]
config = client.Configuration()
config.host = url
config.api_key = {"authorization": "Bearer test-token"}
api = client.ApiClient(config)
core = client.CoreV1Api(api)
out = {}

names, pages, token = [], 0, None
while True:
    page = core.list_pod_for_all_namespaces(limit=2, _continue=token) if token else core.list_pod_for_all_namespaces(limit=2)
    pages += 1
    names += ["%s/%s" % (p.metadata.namespace, p.metadata.name) for p in page.items]
    token = page.metadata._continue
    if not token:
        break
out["pods"], out["pages"] = names, pages
out["shop_pods"] = [p.metadata.name for p in core.list_namespaced_pod("shop").items]
out["slices"] = [
    [s.metadata.name, s.address_type, [e.addresses[0] for e in s.endpoints]]
    for s in client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces().items
]
routes = client.CustomObjectsApi(api).list_cluster_custom_object("gateway.networking.k8s.io", "v1", "httproutes")
out["routes"] = [r["metadata"]["name"] for r in routes["items"]]

events = []
w = watch.Watch()
for e in w.stream(core.list_pod_for_all_namespaces, resource_version=since, timeout_seconds=2, allow_watch_bookmarks=True):
    meta = e["raw_object"]["metadata"]  # a BOOKMARK is left undeserialized by the client
    events.append([e["type"], meta.get("name"), meta["resourceVersion"]])
out["events"], out["resumed_from"] = events, w.resource_version

try:
    for e in watch.Watch().stream(core.list_pod_for_all_namespaces, resource_version=too_old, timeout_seconds=2):
        pass
    out["too_old"] = None
except ApiException as e:
    out["too_old"] = e.status
print(json.dumps(out))
"#;

fn pod(ns: &str, name: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "namespace": ns, "name": name },
        "spec": { "containers": [{ "name": "app", "image": "app" }] },
        "status": { "podIP": ip },
    }))
    .unwrap()
}

fn python() -> Option<String> {
    let venv = "/opt/pillion-ci/bin/python3";
    let python = if std::path::Path::new(venv).exists() {
        venv
    } else {
        "python3"
    };
    let found = std::process::Command::new(python)
        .args(["-c", "import kubernetes"])
        .output()
        .is_ok_and(|o| o.status.success());
    match found {
        true => Some(python.to_string()),
        false if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the Python kubernetes client is required in CI (pip install kubernetes)")
        }
        false => {
            eprintln!("not checking the emulation: no Python kubernetes client (pip install kubernetes)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_lists_and_watches_the_emulation() {
    let Some(python) = python() else { return };
    let api = ApiServer::start_with(Duration::from_millis(300)).await;
    for (ns, name, ip) in [
        ("shop", "web-a", "10.0.0.1"),
        ("shop", "web-b", "10.0.0.2"),
        ("prod", "db", "10.0.1.1"),
    ] {
        api.apply(&pod(ns, name, ip));
    }
    let too_old = api.resource_version() - 1;
    api.compact();
    let since = api.resource_version();
    api.apply(&pod("shop", "web-c", "10.0.0.3"));
    let mut moved = pod("shop", "web-a", "10.0.0.9");
    moved.metadata.labels = Some([("version".to_string(), "2".to_string())].into());
    let modified = api.apply(&moved);
    let deleted = api.delete::<Pod>("prod", "db").then(|| api.resource_version()).unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": { "namespace": "shop", "name": "web-1", "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv6",
        "endpoints": [{ "addresses": ["fd00::1"] }],
    }))
    .unwrap();
    api.apply(&slice);
    let route: gateway_api::experimental::httproutes::HttpRoute = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "namespace": "shop", "name": "web-split" },
        "spec": { "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }] },
    }))
    .unwrap();
    api.apply(&route);

    let out = tokio::process::Command::new(&python)
        .args(["-c", CLIENT, &api.url(), &since.to_string(), &too_old.to_string()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the Python client finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(seen["pods"], json!(["shop/web-a", "shop/web-b", "shop/web-c"]));
    assert_eq!(seen["pages"], json!(2), "limit=2 over 3 pods is two pages");
    assert_eq!(seen["shop_pods"], json!(["web-a", "web-b", "web-c"]));
    assert_eq!(seen["slices"], json!([["web-1", "IPv6", ["fd00::1"]]]));
    assert_eq!(seen["routes"], json!(["web-split"]));

    let events = seen["events"].as_array().unwrap();
    let changes: Vec<&Value> = events.iter().filter(|e| e[0] != "BOOKMARK").collect();
    assert_eq!(
        changes,
        [
            &json!(["ADDED", "web-c", (since + 1).to_string()]),
            &json!(["MODIFIED", "web-a", modified.to_string()]),
            &json!(["DELETED", "db", deleted.to_string()]),
        ]
    );
    assert!(
        events.iter().any(|e| e[0] == "BOOKMARK"),
        "bookmarks were asked for: {events:?}"
    );
    // The client keeps the latest version it saw (a bookmark's), to resume from.
    let resumed: u64 = seen["resumed_from"].as_str().unwrap().parse().unwrap();
    assert_eq!(resumed, api.resource_version());
    assert_eq!(seen["too_old"], json!(410));
}
