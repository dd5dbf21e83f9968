//! What injection adds to a pod spec: `pillion-init`, `pillion-proxy` as a native sidecar, and
//! the three volumes they use. The same fields, with the same values, as the hand-written
//! deploy/example-app.yaml, which explains each one; change both together.
//!
//! Both containers go first in `initContainers`, before the workload's own init containers, so
//! that those already run with the redirect installed and the proxy ready: their traffic is meshed
//! too. The containers are written as YAML text here so a reader sees exactly what a pod gets;
//! every value that comes from outside is inserted as a quoted string.

use yaml_serde::{Mapping, Value};

use super::{InjectOptions, annotations::PodAnnotations, insert_before};

pub(super) const INIT_CONTAINER: &str = "pillion-init";
pub(super) const PROXY_CONTAINER: &str = "pillion-proxy";
const VOLUMES: [&str; 3] = ["pillion-init-run", "pillion-identity-token", "pillion-trust-anchors"];
/// The proxy's admin port: always reached directly, so the kubelet's probes of the proxy work
/// whatever state its inbound path is in.
const ADMIN_PORT: &str = "4191";

/// Adds the containers and volumes to `spec`, a pod spec without them.
pub(super) fn add_to_pod_spec(
    spec: &mut Mapping,
    options: &InjectOptions,
    annotations: &PodAnnotations,
) -> Result<(), String> {
    check_names_are_free(spec)?;
    let ours = [
        init_container(options, annotations),
        proxy_container(options, annotations),
    ];
    match spec.get_mut("initContainers") {
        Some(Value::Sequence(init)) => {
            init.splice(0..0, ours);
        }
        Some(Value::Null) => {
            spec.insert("initContainers".into(), Value::Sequence(ours.into()));
        }
        Some(_) => return Err("spec.initContainers is not a list".to_string()),
        None => insert_before(spec, "containers", "initContainers", Value::Sequence(ours.into())),
    }
    match spec.get_mut("volumes") {
        Some(Value::Sequence(volumes)) => volumes.extend(volumes_added()),
        Some(Value::Null) | None => {
            spec.insert("volumes".into(), Value::Sequence(volumes_added()));
        }
        Some(_) => return Err("spec.volumes is not a list".to_string()),
    }
    Ok(())
}

/// Whether any container of the pod spec (init or not) has this name.
pub(super) fn has_container(spec: &Mapping, name: &str) -> bool {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|list| spec.get(list)?.as_sequence())
        .flatten()
        .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
}

/// A half-injected or hand-edited pod would end up with two containers or volumes of one name,
/// which the API server rejects; say so now, with the name.
fn check_names_are_free(spec: &Mapping) -> Result<(), String> {
    if has_container(spec, INIT_CONTAINER) {
        return Err(format!(
            "the pod has a {INIT_CONTAINER} container but no {PROXY_CONTAINER}: remove it, then inject again"
        ));
    }
    let volumes = spec.get("volumes").and_then(Value::as_sequence);
    if let Some(taken) = volumes
        .into_iter()
        .flatten()
        .filter_map(|v| v.get("name")?.as_str())
        .find(|name| VOLUMES.contains(name))
    {
        return Err(format!(
            "the pod already has a volume named {taken}, which injection adds: rename or remove it"
        ));
    }
    Ok(())
}

fn init_container(options: &InjectOptions, annotations: &PodAnnotations) -> Value {
    let extra = annotations.inbound_ports_to_ignore.as_deref().unwrap_or("");
    let inbound_ignored = std::iter::once(ADMIN_PORT)
        .chain(extra.split(',').filter(|p| !p.is_empty() && *p != ADMIN_PORT))
        .collect::<Vec<_>>()
        .join(",");
    template(&format!(
        r#"
name: {INIT_CONTAINER}
image: {image}
imagePullPolicy: IfNotPresent
env:
  - name: PILLION_INIT_INBOUND_PORT
    value: "4143"
  - name: PILLION_INIT_OUTBOUND_PORT
    value: "4140"
  - name: PILLION_INIT_PROXY_UID
    value: "2102"
  - name: PILLION_INIT_INBOUND_PORTS_TO_IGNORE
    value: {inbound_ignored}
  - name: PILLION_INIT_OUTBOUND_PORTS_TO_IGNORE
    value: {outbound_ports}
  - name: PILLION_INIT_OUTBOUND_SUBNETS_TO_IGNORE
    value: {outbound_subnets}
  - name: PILLION_INIT_IPV6
    value: {ipv6}
  - name: PILLION_INIT_BACKEND
    value: "auto"
  - name: PILLION_INIT_VALIDATE
    value: "true"
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  privileged: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    add: ["NET_ADMIN", "NET_RAW"]
    drop: ["ALL"]
volumeMounts:
  - name: pillion-init-run
    mountPath: /run
resources:
  requests:
    cpu: 10m
    memory: 10Mi
  limits:
    cpu: 100m
    memory: 50Mi
"#,
        image = quote(&options.init_image),
        inbound_ignored = quote(&inbound_ignored),
        outbound_ports = quote(annotations.outbound_ports_to_ignore.as_deref().unwrap_or("")),
        outbound_subnets = quote(annotations.outbound_subnets_to_ignore.as_deref().unwrap_or("")),
        ipv6 = quote(annotations.ipv6.as_deref().unwrap_or("auto")),
    ))
}

fn proxy_container(options: &InjectOptions, annotations: &PodAnnotations) -> Value {
    let log = annotations
        .proxy_log_level
        .as_deref()
        .unwrap_or(&options.proxy_log_level);
    template(&format!(
        r#"
name: {PROXY_CONTAINER}
image: {image}
imagePullPolicy: IfNotPresent
restartPolicy: Always
env:
  # The listeners keep their defaults (0.0.0.0:4143, 127.0.0.1:4140), which also bind the IPv6
  # twins when the pod has IPv6, as pillion-iptables-init redirects it.
  - name: PILLION_INBOUND_IPS
    valueFrom:
      fieldRef:
        fieldPath: status.podIPs
  - name: PILLION_ADMIN_ADDR
    value: "0.0.0.0:4191"
  - name: PILLION_LOG
    value: {log}
  - name: PILLION_LOG_FORMAT
    value: "plain"
{opaque_ports}  - name: PILLION_CONTROL_ADDR
    value: {control_addr}
  # TLS to the control plane: the proxy sends its token only to this identity, and believes
  # only its answers.
  - name: PILLION_CONTROL_IDENTITY
    value: {control_identity}
  # The identity this pod must be issued, from its own namespace and service account; a
  # certificate for any other is refused. (The two variables exist for the $(...) expansion.)
  - name: PILLION_POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
  - name: PILLION_POD_SERVICE_ACCOUNT
    valueFrom:
      fieldRef:
        fieldPath: spec.serviceAccountName
  - name: PILLION_IDENTITY_SPIFFE_ID
    value: {spiffe_id}
  - name: PILLION_IDENTITY_TOKEN_FILE
    value: /var/run/secrets/pillion/token
  - name: PILLION_TRUST_ANCHORS_FILE
    value: /var/run/pillion/trust-anchors/root.crt
ports:
  - name: pillion-inbound
    containerPort: 4143
    protocol: TCP
  - name: pillion-admin
    containerPort: 4191
    protocol: TCP
startupProbe:
  httpGet:
    path: /ready
    port: 4191
  periodSeconds: 1
  failureThreshold: 120
readinessProbe:
  httpGet:
    path: /ready
    port: 4191
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /live
    port: 4191
  periodSeconds: 10
  failureThreshold: 3
resources:
  requests:
    cpu: 10m
    memory: 20Mi
  limits:
    cpu: "1"
    memory: 128Mi
securityContext:
  runAsUser: 2102
  runAsGroup: 2102
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
volumeMounts:
  - name: pillion-identity-token
    mountPath: /var/run/secrets/pillion
    readOnly: true
  - name: pillion-trust-anchors
    mountPath: /var/run/pillion/trust-anchors
    readOnly: true
"#,
        image = quote(&options.proxy_image),
        log = quote(log),
        opaque_ports = annotations.opaque_ports.as_deref().map_or(String::new(), |ports| format!(
            "  # pillion.io/opaque-ports: forwarded without protocol detection.\n  - name: PILLION_OPAQUE_PORTS\n    value: {}\n",
            quote(ports)
        )),
        control_addr = quote(&options.control_addr),
        control_identity = quote(&options.control_identity),
        spiffe_id = quote(&format!(
            "spiffe://{}/ns/$(PILLION_POD_NAMESPACE)/sa/$(PILLION_POD_SERVICE_ACCOUNT)",
            options.trust_domain
        )),
    ))
}

fn volumes_added() -> Vec<Value> {
    let volumes = template(
        r#"
- name: pillion-init-run
  emptyDir:
    sizeLimit: 1Mi
- name: pillion-identity-token
  projected:
    sources:
      - serviceAccountToken:
          audience: pillion
          expirationSeconds: 86400
          path: token
- name: pillion-trust-anchors
  configMap:
    name: pillion-trust-anchors
    items:
      - key: root.crt
        path: root.crt
"#,
    );
    match volumes {
        Value::Sequence(volumes) => volumes,
        _ => unreachable!("the volumes template is a list"),
    }
}

/// The templates above are constant apart from quoted strings, and a test parses them.
fn template(yaml: &str) -> Value {
    yaml_serde::from_str(yaml).expect("the sidecar templates are valid YAML")
}

/// A YAML double-quoted scalar (JSON's string syntax is a subset of it).
fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_from_outside_stay_strings() {
        let options = InjectOptions {
            proxy_image: "registry.example/proxy:1.0\"\n: x".into(),
            ..InjectOptions::default()
        };
        let annotations = PodAnnotations {
            proxy_log_level: Some("0644".into()),
            inbound_ports_to_ignore: Some("4191,9000-9100".into()),
            ..PodAnnotations::default()
        };
        let proxy = proxy_container(&options, &annotations);
        assert_eq!(proxy["image"].as_str(), Some("registry.example/proxy:1.0\"\n: x"));
        let env = proxy["env"].as_sequence().unwrap();
        assert!(env.iter().any(|e| e["name"] == "PILLION_LOG" && e["value"] == "0644"));
        assert!(
            !env.iter().any(|e| e["name"] == "PILLION_OPAQUE_PORTS"),
            "the proxy's defaults"
        );
        let opaque = PodAnnotations {
            opaque_ports: Some("4222,9000-9010".into()),
            ..PodAnnotations::default()
        };
        let proxy = proxy_container(&options, &opaque);
        let env = proxy["env"].as_sequence().unwrap();
        assert!(
            env.iter()
                .any(|e| e["name"] == "PILLION_OPAQUE_PORTS" && e["value"] == "4222,9000-9010")
        );
        let init = init_container(&options, &annotations);
        let env = init["env"].as_sequence().unwrap();
        assert!(
            env.iter()
                .any(|e| e["name"] == "PILLION_INIT_INBOUND_PORTS_TO_IGNORE" && e["value"] == "4191,9000-9100")
        );
        assert_eq!(volumes_added().len(), VOLUMES.len());
    }

    #[test]
    fn init_containers_go_above_containers() {
        let mut spec: Mapping = yaml_serde::from_str("serviceAccountName: web\ncontainers: []\n").unwrap();
        add_to_pod_spec(&mut spec, &InjectOptions::default(), &PodAnnotations::default()).unwrap();
        let keys: Vec<_> = spec.keys().filter_map(Value::as_str).collect();
        assert_eq!(keys, ["serviceAccountName", "initContainers", "containers", "volumes"]);
    }
}
