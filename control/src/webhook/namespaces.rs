//! The `pillion.io/inject` annotation of namespaces, read from the API server and cached briefly.
//!
//! An AdmissionReview carries the pod but not its namespace, so the webhook asks the API server.
//! Answers are cached for a few seconds: a burst of pods (a Deployment scaling up) costs one lookup,
//! and a namespace annotated a moment ago is honoured almost at once. Without an API server
//! (standalone use) only a pod's own annotation opts it in.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::StatusCode;
use serde_json::Value as Json;

use crate::{
    inject::{INJECT, NamespaceInject},
    kube_api::KubeApi,
};

/// How long a namespace's annotation is believed.
const TTL: Duration = Duration::from_secs(5);
/// Entries kept at most; a cluster has far fewer namespaces, and a full cache is simply emptied.
const MAX_ENTRIES: usize = 4096;

pub struct Namespaces {
    api: Option<Arc<KubeApi>>,
    cache: Mutex<HashMap<String, (Instant, NamespaceInject)>>,
}

impl Namespaces {
    pub fn new(api: Option<Arc<KubeApi>>) -> Self {
        Namespaces {
            api,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `namespace` asks for injection. Failures are answered, not cached.
    pub async fn inject(&self, namespace: &str) -> NamespaceInject {
        let Some(api) = &self.api else {
            return NamespaceInject::Unset;
        };
        if !is_dns_label(namespace) {
            return NamespaceInject::Unknown(format!("`{namespace}` is not a namespace name"));
        }
        if let Some((at, value)) = self.lock().get(namespace)
            && at.elapsed() < TTL
        {
            return value.clone();
        }
        let answer = match api.get(&format!("/api/v1/namespaces/{namespace}")).await {
            Ok((StatusCode::OK, body)) => from_namespace(&body),
            Ok((status, _)) => return NamespaceInject::Unknown(format!("the API server answered {status}")),
            Err(e) => return NamespaceInject::Unknown(e),
        };
        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(namespace.to_string(), (Instant::now(), answer.clone()));
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, NamespaceInject)>> {
        // A panic while holding this lock cannot leave the map inconsistent: recover it.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn from_namespace(body: &[u8]) -> NamespaceInject {
    let Ok(namespace) = serde_json::from_slice::<Json>(body) else {
        return NamespaceInject::Unknown("unreadable Namespace from the API server".to_string());
    };
    let value = namespace
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(INJECT));
    match value.map(|v| v.as_str()) {
        None => NamespaceInject::Unset,
        Some(Some("enabled")) => NamespaceInject::Enabled,
        Some(Some("disabled")) => NamespaceInject::Disabled,
        Some(other) => NamespaceInject::Unknown(format!(
            "annotation {INJECT}: {} is neither 'enabled' nor 'disabled'",
            other.unwrap_or("<not a string>")
        )),
    }
}

/// RFC 1123 label, as Kubernetes requires of namespace names (and so safe in a URL path).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_annotation_values() {
        let ns =
            |annotations: &str| from_namespace(format!(r#"{{"metadata":{{"annotations":{annotations}}}}}"#).as_bytes());
        assert_eq!(ns(r#"{"pillion.io/inject":"enabled"}"#), NamespaceInject::Enabled);
        assert_eq!(ns(r#"{"pillion.io/inject":"disabled"}"#), NamespaceInject::Disabled);
        assert_eq!(ns(r#"{"other":"x"}"#), NamespaceInject::Unset);
        assert!(matches!(ns(r#"{"pillion.io/inject":"yes"}"#), NamespaceInject::Unknown(why) if why.contains("yes")));
        assert!(matches!(from_namespace(b"nope"), NamespaceInject::Unknown(_)));
    }

    #[test]
    fn only_dns_labels_reach_the_url() {
        assert!(is_dns_label("shop-1"));
        for bad in ["", "Shop", "a/b", "..", "-a", "a-", "a?b=c", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
