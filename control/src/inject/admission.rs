//! One Pod from an admission review: is it opted in, and if so, the same `workload` step as the CLI.
//!
//! The CLI injects whatever it is given (the operator chose the input); the webhook sees every pod
//! created in the cluster, so a pod is injected only when it or its namespace asks for it with
//! `pillion.io/inject: enabled`, and the pod's own value wins. The Pod arrives as JSON and goes
//! through the YAML model the CLI uses, so both ways of injecting produce the same pod.

use serde_json::Value as Json;

use super::{InjectOptions, Outcome, Report, annotations::INJECT, workload};

/// The `pillion.io/inject` annotation of the pod's namespace, as far as the webhook knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceInject {
    Enabled,
    Disabled,
    /// The namespace has no such annotation.
    Unset,
    /// The namespace could not be read, or its value is neither `enabled` nor `disabled`: why.
    Unknown(String),
}

/// The injected Pod (`None` when nothing changes) and what happened, with warnings for the user.
#[derive(Debug)]
pub struct PodInjection {
    pub injected: Option<Json>,
    pub report: Report,
    /// Whether the pod or its namespace asked for Pillion. A pod nobody opted in is none of our
    /// business: its creator gets no warning about it.
    pub opted_in: bool,
}

/// Decides and, when opted in, injects one Pod created in `namespace`.
pub fn inject_pod(
    pod: &Json,
    namespace: &str,
    namespace_inject: &NamespaceInject,
    options: &InjectOptions,
) -> PodInjection {
    let metadata = pod.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Json::as_str)
        .unwrap_or("<unnamed>");
    let mut report = Report {
        object: format!("pod/{name}"),
        outcome: Outcome::Injected,
        warnings: Vec::new(),
    };
    let skipped = |mut report: Report, why: String| {
        report.outcome = Outcome::Skipped(why);
        PodInjection {
            injected: None,
            report,
            opted_in: true,
        }
    };
    let not_opted_in = |mut report: Report, why: String| {
        report.outcome = Outcome::Skipped(why);
        PodInjection {
            injected: None,
            report,
            opted_in: false,
        }
    };

    let labels = metadata
        .and_then(|m| m.get("labels"))
        .and_then(|l| yaml_serde::to_value(l).ok());
    if let Some(why) = workload::protected(Some(namespace), labels.as_ref().and_then(|l| l.as_mapping()), options) {
        return skipped(report, why);
    }
    let pod_value = metadata.and_then(|m| m.get("annotations")).and_then(|a| a.get(INJECT));
    if pod_value.is_none() {
        match namespace_inject {
            NamespaceInject::Enabled => {}
            NamespaceInject::Disabled => {
                return not_opted_in(report, format!("namespace {namespace} has {INJECT}: disabled"));
            }
            NamespaceInject::Unset => {
                return not_opted_in(
                    report,
                    format!("neither the pod nor namespace {namespace} has {INJECT}: enabled"),
                );
            }
            NamespaceInject::Unknown(why) => {
                report.warnings.push(format!("namespace {namespace}: {why}"));
                return skipped(report, format!("namespace {namespace}'s {INJECT} is unknown"));
            }
        }
    }
    // From here on the pod is opted in, or its own annotation is `disabled` or invalid: the
    // workload step reports both, exactly as the CLI would.

    let mut object = match yaml_serde::to_value(pod) {
        Ok(object) => object,
        Err(e) => return skipped(report, format!("the pod cannot be read: {e}")),
    };
    let mut reports = Vec::new();
    match workload::inject_object(&mut object, options, &mut reports) {
        Err(e) => {
            report.warnings.push(e.clone());
            skipped(report, e)
        }
        Ok(changed) => {
            if let Some(found) = reports.pop() {
                report.outcome = found.outcome;
                report.warnings.extend(found.warnings);
            }
            let injected = if changed {
                match serde_json::to_value(&object) {
                    Ok(json) => Some(json),
                    Err(e) => return skipped(report, format!("the injected pod cannot be written: {e}")),
                }
            } else {
                None
            };
            PodInjection {
                injected,
                report,
                opted_in: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(annotations: Json) -> Json {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": "web", "annotations": annotations },
            "spec": { "containers": [{ "name": "app", "image": "app:1" }] }
        })
    }

    fn outcome(pod: &Json, namespace: &str, ns: NamespaceInject) -> (bool, Outcome) {
        let result = inject_pod(pod, namespace, &ns, &InjectOptions::default());
        (result.injected.is_some(), result.report.outcome)
    }

    #[test]
    fn pod_value_wins_over_namespace() {
        let enabled = pod(json!({ "pillion.io/inject": "enabled" }));
        let disabled = pod(json!({ "pillion.io/inject": "disabled" }));
        let none = pod(json!({}));
        assert_eq!(
            outcome(&enabled, "shop", NamespaceInject::Unset),
            (true, Outcome::Injected)
        );
        assert_eq!(
            outcome(&enabled, "shop", NamespaceInject::Disabled),
            (true, Outcome::Injected)
        );
        assert!(matches!(
            outcome(&disabled, "shop", NamespaceInject::Enabled),
            (false, Outcome::Skipped(_))
        ));
        assert_eq!(
            outcome(&none, "shop", NamespaceInject::Enabled),
            (true, Outcome::Injected)
        );
        assert!(matches!(
            outcome(&none, "shop", NamespaceInject::Unset),
            (false, Outcome::Skipped(_))
        ));
        assert!(matches!(
            outcome(&none, "shop", NamespaceInject::Unknown("API server down".into())),
            (false, Outcome::Skipped(_))
        ));
    }

    #[test]
    fn protected_namespaces_are_never_injected() {
        let enabled = pod(json!({ "pillion.io/inject": "enabled" }));
        for ns in ["kube-system", "pillion-system"] {
            let (injected, outcome) = outcome(&enabled, ns, NamespaceInject::Enabled);
            assert!(!injected, "{ns}");
            assert!(matches!(outcome, Outcome::Skipped(why) if why.contains(ns)), "{ns}");
        }
    }

    #[test]
    fn invalid_annotation_is_admitted_uninjected_with_its_name() {
        let bad = pod(json!({ "pillion.io/inject": "enabled", "pillion.io/inbound-ports-to-ignore": "70000" }));
        let result = inject_pod(&bad, "shop", &NamespaceInject::Enabled, &InjectOptions::default());
        assert!(result.injected.is_none());
        assert!(
            result
                .report
                .warnings
                .iter()
                .any(|w| w.contains("pillion.io/inbound-ports-to-ignore")),
            "{:?}",
            result.report.warnings
        );
    }
}
