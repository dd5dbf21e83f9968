//! Which objects run pods, where their pod template is, and whether to inject it.
//!
//! Kinds are matched with their API group, so a custom resource that happens to be called `Job`
//! passes through untouched. A workload is left as it is, with the reason in its report, when it
//! is already injected, opted out, on the host network, or part of the control plane or
//! `kube-system` (whatever the input says: injecting those would gate the control plane on the
//! certificates only it can issue, and put a root init container into a restricted namespace).

use yaml_serde::{Mapping, Value};

/// The label every object of Pillion's own deployment carries (`pillion`).
const PART_OF: &str = "app.kubernetes.io/part-of";

use super::{
    InjectOptions, Outcome, Report,
    annotations::{self, INJECT, INJECTED},
    insert_before,
    sidecar::{self, PROXY_CONTAINER},
};

/// Injects `object` if it runs pods, or each item of a List; returns whether anything changed.
pub(super) fn inject_object(
    object: &mut Value,
    options: &InjectOptions,
    reports: &mut Vec<Report>,
) -> Result<bool, String> {
    let Some(map) = object.as_mapping_mut() else {
        return Ok(false);
    };
    let kind = string_at(map, "kind").to_string();
    if kind.ends_with("List")
        && let Some(Value::Sequence(items)) = map.get_mut("items")
    {
        // `kubectl get -o yaml` wraps objects in a List; typed lists (DeploymentList) too.
        let mut changed = false;
        for (i, item) in items.iter_mut().enumerate() {
            changed |= inject_object(item, options, reports).map_err(|e| format!("items[{i}]: {e}"))?;
        }
        return Ok(changed);
    }
    let Some(path) = pod_template_path(string_at(map, "apiVersion"), &kind) else {
        return Ok(false);
    };
    let mut report = Report {
        object: object_name(map, &kind),
        outcome: Outcome::Injected,
        warnings: Vec::new(),
    };
    let changed = inject_workload(map, path, options, &mut report).map_err(|e| format!("{}: {e}", report.object))?;
    reports.push(report);
    Ok(changed)
}

/// Where a kind keeps the pod it runs: the path to its pod template (a mapping with `metadata`
/// and `spec`); empty for a Pod, which is its own template.
fn pod_template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.split_once('/').map_or("", |(group, _version)| group);
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("", "ReplicationController") => Some(&["spec", "template"]),
        ("apps" | "extensions", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") => {
            Some(&["spec", "template"])
        }
        ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn inject_workload(
    object: &mut Mapping,
    path: &[&str],
    options: &InjectOptions,
    report: &mut Report,
) -> Result<bool, String> {
    let skip = |report: &mut Report, why: String| {
        report.outcome = Outcome::Skipped(why);
        Ok(false)
    };
    if !path.is_empty() && annotations::any_pillion(annotations_of(object)) {
        report.warnings.push(format!(
            "pillion.io/ annotations on the object itself are ignored: put them on {}.metadata.annotations",
            path.join(".")
        ));
    }
    let protected_object = protected(namespace_of(object), labels_of(object), options);
    let Some(template) = mapping_at(object, path) else {
        return skip(report, format!("it has no pod template ({})", path.join(".")));
    };
    let pod = annotations::read(annotations_of(template))?;
    report.warnings.extend(
        pod.unknown
            .iter()
            .map(|key| format!("unknown annotation {key} ignored")),
    );
    if let Some(why) = protected_object.or_else(|| protected(None, labels_of(template), options)) {
        return skip(report, why);
    }
    let Some(Value::Mapping(spec)) = template.get_mut("spec") else {
        return skip(report, "its pod template has no spec".to_string());
    };
    if pod.injected || sidecar::has_container(spec, PROXY_CONTAINER) {
        report.outcome = Outcome::AlreadyInjected;
        return Ok(false);
    }
    if pod.disabled {
        return skip(report, format!("{INJECT} is disabled"));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        // The pod's network namespace is the node's: the redirect would capture the node's traffic.
        return skip(
            report,
            "hostNetwork pods share the node's network namespace".to_string(),
        );
    }
    sidecar::add_to_pod_spec(spec, options, &pod)?;
    set_annotation(template, INJECTED, &options.version);
    Ok(true)
}

/// Why a workload must never be injected, from its namespace and labels: the control plane's
/// namespace, `kube-system`, or anything labelled as part of Pillion.
pub(super) fn protected(namespace: Option<&str>, labels: Option<&Mapping>, options: &InjectOptions) -> Option<String> {
    match namespace {
        Some("kube-system") => return Some("kube-system is never injected".to_string()),
        Some(ns) if ns == options.control_plane_namespace => {
            return Some(format!("{ns} is the control plane's namespace"));
        }
        _ => {}
    }
    let part_of = labels.and_then(|l| l.get(PART_OF)).and_then(Value::as_str);
    (part_of == Some("pillion")).then(|| format!("it is part of Pillion ({PART_OF}: pillion)"))
}

/// `kind/name` in lower case, as kubectl prints it.
fn object_name(object: &Mapping, kind: &str) -> String {
    let metadata = object.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>");
    format!("{}/{name}", kind.to_lowercase())
}

fn string_at<'a>(map: &'a Mapping, key: &str) -> &'a str {
    map.get(key).and_then(Value::as_str).unwrap_or("")
}

fn namespace_of(object: &Mapping) -> Option<&str> {
    object.get("metadata")?.get("namespace")?.as_str()
}

fn labels_of(object: &Mapping) -> Option<&Mapping> {
    object.get("metadata")?.get("labels")?.as_mapping()
}

fn annotations_of(object: &Mapping) -> Option<&Mapping> {
    object.get("metadata")?.get("annotations")?.as_mapping()
}

fn mapping_at<'a>(mut map: &'a mut Mapping, path: &[&str]) -> Option<&'a mut Mapping> {
    for key in path {
        map = map.get_mut(*key)?.as_mapping_mut()?;
    }
    Some(map)
}

/// Sets `metadata.annotations[key]`, creating what is missing (metadata above spec).
fn set_annotation(object: &mut Mapping, key: &str, value: &str) {
    match object.get("metadata") {
        Some(Value::Mapping(_)) => {}
        Some(_) => {
            object.insert("metadata".into(), Value::Mapping(Mapping::new()));
        }
        None => insert_before(object, "spec", "metadata", Value::Mapping(Mapping::new())),
    }
    let Some(Value::Mapping(metadata)) = object.get_mut("metadata") else {
        unreachable!("metadata was just made a mapping");
    };
    if !matches!(metadata.get("annotations"), Some(Value::Mapping(_))) {
        metadata.insert("annotations".into(), Value::Mapping(Mapping::new()));
    }
    if let Some(Value::Mapping(annotations)) = metadata.get_mut("annotations") {
        annotations.insert(key.into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_matched_with_their_group() {
        assert_eq!(pod_template_path("v1", "Pod"), Some(&[][..]));
        assert_eq!(
            pod_template_path("apps/v1", "StatefulSet"),
            Some(&["spec", "template"][..])
        );
        assert_eq!(
            pod_template_path("batch/v1", "CronJob"),
            Some(&["spec", "jobTemplate", "spec", "template"][..])
        );
        assert_eq!(pod_template_path("v1", "Service"), None);
        assert_eq!(pod_template_path("example.com/v1", "Job"), None);
        assert_eq!(pod_template_path("apps/v1", "Pod"), None);
    }

    #[test]
    fn template_without_metadata_gets_it_above_spec() {
        let mut template: Mapping = yaml_serde::from_str("spec: {}\n").unwrap();
        set_annotation(&mut template, INJECTED, "1.2.3");
        assert_eq!(
            yaml_serde::to_string(&template).unwrap(),
            "metadata:\n  annotations:\n    pillion.io/injected: 1.2.3\nspec: {}\n"
        );
    }
}
