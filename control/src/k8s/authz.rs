//! Inbound authorization from the cluster: the `AuthorizationPolicy` custom resource
//! (`policy.pillion.io/v1alpha1`), the `pillion.io/default-inbound-policy` annotation, and the
//! cluster's `--default-inbound-policy`, checked once when applied and turned into the model's
//! [`Authorization`] per pod port.
//!
//! ```yaml
//! apiVersion: policy.pillion.io/v1alpha1
//! kind: AuthorizationPolicy
//! metadata: { name: api-from-web, namespace: shop }
//! spec:
//!   target: { service: api, ports: [8080] }   # or podSelector; no ports = every port
//!   allow:                                    # any entry admits; [] admits no one
//!     - serviceAccounts: [{ name: web }, { name: batch, namespace: jobs }]
//!     - namespaces: [frontend]
//! ```
//!
//! The Rust type is the schema: the CRD manifest (`deploy/crds/authorizationpolicy.yaml`) is
//! generated from it and a test keeps the two equal. The watcher, though, reads the spec as raw
//! JSON ([`AuthorizationPolicyObject`]): a watcher decodes a whole list at once, so one object the
//! typed spec could not read would stop every policy from being seen. Each object is read here
//! instead, and one that fails is refused with its reason, alone.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
};

use k8s_openapi::{
    NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{CustomResource, KubeSchema, Resource};
use pillion_api::policy::model::{Authorization, SpiffeId};
use serde::{Deserialize, Serialize};

/// On a Pod (wins) or a Namespace: the authorization of ports no policy targets.
pub const DEFAULT_INBOUND_POLICY: &str = "pillion.io/default-inbound-policy";

/// Which clients the ports of some pods admit. Several policies for the same port add up: a
/// client any of them admits is admitted.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Deserialize, Serialize)]
#[kube(
    group = "policy.pillion.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    shortname = "authzpolicy",
    doc = "Which clients (service accounts, namespaces, any authenticated or unauthenticated client) the ports of a workload admit.",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.target.service"}"#,
    printcolumn = r#"{"name":"Ports","type":"string","jsonPath":".spec.target.ports"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The pods (and ports) this policy is for, in the policy's namespace.
    pub target: PolicyTarget,
    /// A client matching any entry is admitted; an empty list admits no one.
    pub allow: Vec<AllowEntry>,
}

/// Exactly one of `service` and `podSelector`.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[x_kube(validation = Rule::new("has(self.service) != has(self.podSelector)").message("set exactly one of service and podSelector"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTarget {
    /// The pods this Service selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub service: Option<String>,
    /// The pods these labels select (`{}` = every pod of the namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Container ports; absent = every port of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "ports_schema")]
    pub ports: Option<Vec<u16>>,
}

/// One kind of client; an entry names exactly one.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct AllowEntry {
    /// These service accounts' workloads (mesh identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub service_accounts: Option<Vec<ServiceAccountRef>>,
    /// Any service account of these namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1), inner(length(min = 1)))]
    pub namespaces: Option<Vec<String>>,
    /// `true`: any client with a verified mesh identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self").message("authenticated is true or left out"))]
    pub authenticated: Option<bool>,
    /// `true`: any client, plaintext included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self").message("unauthenticated is true or left out"))]
    pub unauthenticated: Option<bool>,
}

#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountRef {
    #[schemars(length(min = 1))]
    pub name: String,
    /// Default: the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub namespace: Option<String>,
}

/// An `AuthorizationPolicy` as watched: its spec is read by [`PolicyInfo::parse`], object by object.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct AuthorizationPolicyObject {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

/// `all-unauthenticated`, `all-authenticated`, `cluster-authenticated` or `deny`: what a port no
/// policy targets admits (annotation values and the `--default-inbound-policy` flag).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DefaultInboundPolicy {
    #[default]
    AllUnauthenticated,
    AllAuthenticated,
    /// Any identity of our own trust domain.
    ClusterAuthenticated,
    Deny,
}

/// What the index keeps of one policy.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInfo {
    pub target: TargetPods,
    /// `None` = every port.
    pub ports: Option<BTreeSet<u16>>,
    pub allowed: Allowed,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TargetPods {
    /// The pods the Service of this name (in the policy's namespace) selects.
    Service(String),
    Selector(Selector),
}

/// A checked label selector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    labels: BTreeMap<String, String>,
    expressions: Vec<Expression>,
}

#[derive(Clone, Debug, PartialEq)]
enum Expression {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// The clients some allow entries admit, before they become an [`Authorization`]; the union of
/// several policies is the union of these.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allowed {
    pub unauthenticated: bool,
    pub authenticated: bool,
    /// (namespace, service account).
    pub service_accounts: BTreeSet<(String, String)>,
    pub namespaces: BTreeSet<String>,
}

impl Resource for AuthorizationPolicyObject {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        AuthorizationPolicy::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        AuthorizationPolicy::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        AuthorizationPolicy::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        AuthorizationPolicy::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl std::str::FromStr for DefaultInboundPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all-unauthenticated" => Ok(DefaultInboundPolicy::AllUnauthenticated),
            "all-authenticated" => Ok(DefaultInboundPolicy::AllAuthenticated),
            "cluster-authenticated" => Ok(DefaultInboundPolicy::ClusterAuthenticated),
            "deny" => Ok(DefaultInboundPolicy::Deny),
            other => Err(format!(
                "`{other}` is not one of all-unauthenticated, all-authenticated, cluster-authenticated, deny"
            )),
        }
    }
}

impl std::fmt::Display for DefaultInboundPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DefaultInboundPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultInboundPolicy::AllAuthenticated => "all-authenticated",
            DefaultInboundPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultInboundPolicy::Deny => "deny",
        })
    }
}

impl DefaultInboundPolicy {
    /// The annotation on a Pod or Namespace: `Ok(None)` when absent.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        annotations
            .get(DEFAULT_INBOUND_POLICY)
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|e| format!("annotation {DEFAULT_INBOUND_POLICY}: {e}"))
            })
            .transpose()
    }

    pub fn authorization(self, trust_domain: &str) -> Authorization {
        match self {
            DefaultInboundPolicy::AllUnauthenticated => Authorization::AllUnauthenticated,
            DefaultInboundPolicy::AllAuthenticated => Authorization::AllAuthenticated,
            DefaultInboundPolicy::ClusterAuthenticated => Authorization::Allow {
                identities: Vec::new(),
                prefixes: vec![format!("spiffe://{trust_domain}/")],
            },
            DefaultInboundPolicy::Deny => Authorization::Deny,
        }
    }
}

impl PolicyInfo {
    /// Checks one watched policy; `Err` is the reason it is not served.
    pub fn parse(object: &AuthorizationPolicyObject) -> Result<PolicyInfo, String> {
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        // The typed spec refuses unknown fields and wrong types, naming the field.
        let spec: AuthorizationPolicySpec =
            serde_json::from_value(object.spec.clone()).map_err(|e| format!("spec: {e}"))?;
        let target = &spec.target;
        let target_pods = match (&target.service, &target.pod_selector) {
            (Some(service), None) => {
                check_name(service, "spec.target.service")?;
                TargetPods::Service(service.clone())
            }
            (None, Some(selector)) => {
                TargetPods::Selector(Selector::parse(selector).map_err(|e| format!("spec.target.podSelector: {e}"))?)
            }
            _ => return Err("spec.target: set exactly one of service and podSelector".to_string()),
        };
        let ports = match &target.ports {
            None => None,
            Some(ports) if ports.is_empty() => {
                return Err("spec.target.ports: an empty list names no port (leave it out for every port)".to_string());
            }
            Some(ports) => {
                if let Some(i) = ports.iter().position(|p| *p == 0) {
                    return Err(format!("spec.target.ports[{i}]: 0 is not a port number"));
                }
                Some(ports.iter().copied().collect())
            }
        };
        let mut allowed = Allowed::default();
        for (i, entry) in spec.allow.iter().enumerate() {
            allowed
                .add(entry, &namespace)
                .map_err(|e| format!("spec.allow[{i}]: {e}"))?;
        }
        Ok(PolicyInfo {
            target: target_pods,
            ports,
            allowed,
        })
    }
}

impl Allowed {
    fn add(&mut self, entry: &AllowEntry, namespace: &str) -> Result<(), String> {
        let named = [
            entry.service_accounts.is_some(),
            entry.namespaces.is_some(),
            entry.authenticated.is_some(),
            entry.unauthenticated.is_some(),
        ];
        if named.iter().filter(|n| **n).count() != 1 {
            return Err(
                "an entry names exactly one of serviceAccounts, namespaces, authenticated, unauthenticated".to_string(),
            );
        }
        if let Some(accounts) = &entry.service_accounts {
            if accounts.is_empty() {
                return Err("serviceAccounts is empty".to_string());
            }
            for (j, account) in accounts.iter().enumerate() {
                check_name(&account.name, &format!("serviceAccounts[{j}].name"))?;
                let ns = account.namespace.as_deref().unwrap_or(namespace);
                check_name(ns, &format!("serviceAccounts[{j}].namespace"))?;
                self.service_accounts.insert((ns.to_string(), account.name.clone()));
            }
        }
        if let Some(namespaces) = &entry.namespaces {
            if namespaces.is_empty() {
                return Err("namespaces is empty".to_string());
            }
            for (j, ns) in namespaces.iter().enumerate() {
                check_name(ns, &format!("namespaces[{j}]"))?;
                self.namespaces.insert(ns.clone());
            }
        }
        match (entry.authenticated, entry.unauthenticated) {
            (Some(false), _) => return Err("authenticated: false admits no one; leave the entry out".to_string()),
            (_, Some(false)) => return Err("unauthenticated: false admits no one; leave the entry out".to_string()),
            (Some(true), _) => self.authenticated = true,
            (_, Some(true)) => self.unauthenticated = true,
            _ => {}
        }
        Ok(())
    }

    pub fn union(&mut self, other: &Allowed) {
        self.unauthenticated |= other.unauthenticated;
        self.authenticated |= other.authenticated;
        self.service_accounts.extend(other.service_accounts.iter().cloned());
        self.namespaces.extend(other.namespaces.iter().cloned());
    }

    /// The model's authorization: the widest kind of client admitted decides the mode.
    pub fn authorization(&self, trust_domain: &str) -> Authorization {
        if self.unauthenticated {
            return Authorization::AllUnauthenticated;
        }
        if self.authenticated {
            return Authorization::AllAuthenticated;
        }
        // Names were checked when the policy was applied; an ID the trust domain still makes
        // invalid is left out (it could not match any caller anyway).
        let identities: Vec<SpiffeId> = self
            .service_accounts
            .iter()
            .filter(|(ns, _)| !self.namespaces.contains(ns))
            .filter_map(|(ns, sa)| SpiffeId::try_from(format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")).ok())
            .collect();
        let prefixes: Vec<String> = self
            .namespaces
            .iter()
            .map(|ns| format!("spiffe://{trust_domain}/ns/{ns}/"))
            .collect();
        if identities.is_empty() && prefixes.is_empty() {
            Authorization::Deny
        } else {
            Authorization::Allow { identities, prefixes }
        }
    }
}

impl Selector {
    /// A Service's selector (`matchLabels` only).
    pub fn from_labels(labels: BTreeMap<String, String>) -> Selector {
        Selector {
            labels,
            expressions: Vec::new(),
        }
    }

    fn parse(selector: &LabelSelector) -> Result<Selector, String> {
        let mut expressions = Vec::new();
        for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let key = e.key.clone();
            let at = |what: &str| format!("matchExpressions[{i}]: {what}");
            let expression = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => return Err(at(&format!("{} needs values", e.operator))),
                "In" => Expression::In(key, values),
                "NotIn" => Expression::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(at(&format!("{} takes no values", e.operator)));
                }
                "Exists" => Expression::Exists(key),
                "DoesNotExist" => Expression::DoesNotExist(key),
                other => {
                    return Err(at(&format!(
                        "operator `{other}` is not In, NotIn, Exists or DoesNotExist"
                    )));
                }
            };
            expressions.push(expression);
        }
        Ok(Selector {
            labels: selector.match_labels.clone().unwrap_or_default(),
            expressions,
        })
    }

    /// Whether a pod with `labels` is selected; an empty selector selects every pod.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|e| match e {
                Expression::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
                Expression::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
                Expression::Exists(k) => labels.contains_key(k),
                Expression::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// Port numbers as Kubernetes writes them (integers 1-65535; no `uint16` format, which the API
/// server does not know).
fn ports_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "items": { "type": "integer", "minimum": 1, "maximum": 65535 },
    })
}

/// A Service, service account or namespace name: a DNS subdomain, which also makes it a valid
/// segment of a SPIFFE ID.
fn check_name(name: &str, field: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: `{name}` is not a valid name (lower-case letters, digits, `-`, `.`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    const MANIFEST: &str = include_str!("../../../deploy/crds/authorizationpolicy.yaml");

    /// The manifest as `AuthorizationPolicy::crd()` makes it, with a header saying so.
    fn generated_manifest() -> String {
        let crd = yaml_serde::to_string(&AuthorizationPolicy::crd()).expect("the CRD serializes");
        format!(
            "# Generated from control/src/k8s/authz.rs (AuthorizationPolicy::crd()); a unit test keeps them equal.\n\
             # To regenerate: PILLION_WRITE_CRD=1 cargo test -p pillion-control k8s::authz\n{crd}"
        )
    }

    #[test]
    fn the_committed_crd_manifest_is_the_rust_type() {
        let generated = generated_manifest();
        if std::env::var_os("PILLION_WRITE_CRD").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/authorizationpolicy.yaml");
            std::fs::write(path, &generated).expect("write the CRD manifest");
            return;
        }
        assert!(
            MANIFEST == generated,
            "deploy/crds/authorizationpolicy.yaml differs from AuthorizationPolicy::crd(); regenerate it with PILLION_WRITE_CRD=1 cargo test -p pillion-control k8s::authz"
        );
    }

    #[test]
    fn the_schema_carries_the_checks_the_api_server_can_make() {
        let crd = serde_json::to_value(AuthorizationPolicy::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "authorizationpolicies.policy.pillion.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["allow", "target"]));
        let target = &spec["properties"]["target"];
        assert_eq!(
            target["x-kubernetes-validations"][0]["rule"],
            "has(self.service) != has(self.podSelector)"
        );
        let port = &target["properties"]["ports"]["items"];
        assert_eq!(
            (port["minimum"].as_f64(), port["maximum"].as_f64()),
            (Some(1.0), Some(65535.0))
        );
        let entry = &spec["properties"]["allow"]["items"];
        assert_eq!(
            (entry["minProperties"].as_u64(), entry["maxProperties"].as_u64()),
            (Some(1), Some(1)),
            "an entry names one kind of client"
        );
    }

    #[test]
    fn default_policies_read_and_map() {
        for (text, authorization) in [
            ("all-unauthenticated", Authorization::AllUnauthenticated),
            ("all-authenticated", Authorization::AllAuthenticated),
            (
                "cluster-authenticated",
                Authorization::allow(vec!["spiffe://example.org/*".to_string()]).unwrap(),
            ),
            ("deny", Authorization::Deny),
        ] {
            let policy: DefaultInboundPolicy = text.parse().unwrap();
            assert_eq!(policy.to_string(), text);
            assert_eq!(policy.authorization("example.org"), authorization, "{text}");
        }
        assert!("open".parse::<DefaultInboundPolicy>().is_err());
        let annotations = [(DEFAULT_INBOUND_POLICY.to_string(), "nope".to_string())].into();
        let err = DefaultInboundPolicy::from_annotations(&annotations).unwrap_err();
        assert!(err.contains(DEFAULT_INBOUND_POLICY) && err.contains("nope"), "{err}");
        assert_eq!(DefaultInboundPolicy::from_annotations(&BTreeMap::new()), Ok(None));
    }

    #[test]
    fn selectors_match_as_kubernetes_does() {
        let selector: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": { "app": "api" },
            "matchExpressions": [
                { "key": "tier", "operator": "In", "values": ["a", "b"] },
                { "key": "canary", "operator": "DoesNotExist" },
            ],
        }))
        .unwrap();
        let selector = Selector::parse(&selector).unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(selector.matches(&labels(&[("app", "api"), ("tier", "a")])));
        assert!(!selector.matches(&labels(&[("app", "api"), ("tier", "c")])));
        assert!(!selector.matches(&labels(&[("app", "api"), ("tier", "a"), ("canary", "1")])));
        assert!(!selector.matches(&labels(&[("tier", "a")])));
        assert!(Selector::default().matches(&labels(&[])));
    }
}
