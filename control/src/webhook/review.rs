//! `AdmissionReview` (admission.k8s.io/v1) in, `AdmissionReview` with a JSONPatch out.
//!
//! The webhook never denies: Pillion is an addition to a pod, not a gate on it. A review that cannot
//! be answered at all (not JSON, no `request.uid`) is a 400, which the API server treats as a failed
//! call (our `failurePolicy: Ignore` then admits the pod unchanged); everything else is answered
//! `allowed: true`, with a patch when the pod is injected and a warning when it asked for Pillion
//! and did not get it.

use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value as Json, json};

use super::namespaces::Namespaces;
use crate::inject::{InjectOptions, Outcome, inject_pod};

/// Why a body is not an answerable review (HTTP 400).
#[derive(Debug, thiserror::Error)]
#[error("not an admission.k8s.io/v1 AdmissionReview: {0}")]
pub struct BadReview(String);

/// Answers one review; the body is the API server's request as received.
pub async fn admit(body: &[u8], namespaces: &Namespaces, options: &InjectOptions) -> Result<Json, BadReview> {
    let review: Json = serde_json::from_slice(body).map_err(|e| BadReview(e.to_string()))?;
    if review.get("apiVersion").and_then(Json::as_str) != Some("admission.k8s.io/v1")
        || review.get("kind").and_then(Json::as_str) != Some("AdmissionReview")
    {
        return Err(BadReview(
            "apiVersion and kind must be admission.k8s.io/v1 AdmissionReview".into(),
        ));
    }
    let request = review.get("request").ok_or_else(|| BadReview("no request".into()))?;
    let uid = request
        .get("uid")
        .and_then(Json::as_str)
        .ok_or_else(|| BadReview("request.uid is missing".into()))?;
    let (patch, warnings) = decide(request, namespaces, options).await;
    let mut response = json!({ "uid": uid, "allowed": true });
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(STANDARD.encode(patch));
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The patch (serialised JSON) and the warnings for one request.
async fn decide(request: &Json, namespaces: &Namespaces, options: &InjectOptions) -> (Option<Vec<u8>>, Vec<String>) {
    let str_at = |key: &str| request.get(key).and_then(Json::as_str).unwrap_or("");
    let kind = request.get("kind").and_then(|k| k.get("kind")).and_then(Json::as_str);
    let group = request.get("kind").and_then(|k| k.get("group")).and_then(Json::as_str);
    // The webhook configuration sends only Pod creations; anything else is passed through, so a
    // widened configuration cannot make us patch objects we do not understand.
    if kind != Some("Pod") || group.is_some_and(|g| !g.is_empty()) || str_at("operation") != "CREATE" {
        return (None, Vec::new());
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return (
            None,
            vec!["pillion: request.object is not a Pod; not injected".to_string()],
        );
    };
    let namespace = match str_at("namespace") {
        "" => pod
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Json::as_str)
            .unwrap_or("default"),
        ns => ns,
    };
    let namespace_inject = namespaces.inject(namespace).await;
    let result = inject_pod(pod, namespace, &namespace_inject, options);
    let object = &result.report.object;
    let mut warnings: Vec<String> = result
        .report
        .warnings
        .iter()
        .map(|w| format!("pillion: {object}: {w}"))
        .collect();
    match (&result.report.outcome, result.injected) {
        (Outcome::Injected, Some(injected)) => {
            tracing::info!(%namespace, %object, "injected");
            let patch = json_patch::diff(pod, &injected);
            match serde_json::to_vec(&patch) {
                Ok(bytes) => (Some(bytes), warnings),
                Err(e) => {
                    warnings.push(format!("pillion: {object}: not injected: {e}"));
                    (None, warnings)
                }
            }
        }
        (Outcome::Skipped(why), _) if !result.opted_in => {
            tracing::debug!(%namespace, %object, reason = %why, "not injected");
            (None, warnings)
        }
        (outcome, _) => {
            let why = match outcome {
                Outcome::Skipped(why) => why.as_str(),
                Outcome::AlreadyInjected => "already injected",
                Outcome::Injected => "nothing to change",
            };
            tracing::info!(%namespace, %object, reason = %why, "not injected");
            warnings.push(format!("pillion: {object}: not injected: {why}"));
            (None, warnings)
        }
    }
}
