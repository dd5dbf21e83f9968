//! `pillion-control inject`: adds Pillion to the workloads in a stream of Kubernetes YAML.
//!
//! One pass, document by document, in input order:
//!
//! ```text
//! documents   split the stream where kubectl does (`---` lines), number them for errors
//! workload    which objects carry a pod template and where; Lists item by item; the decision
//! annotations the pod template's pillion.io/ annotations, checked
//! sidecar     what is added: pillion-init, pillion-proxy (native sidecar), their volumes
//! yaml11      write a changed document so that Kubernetes' YAML 1.1 reader reads what we meant
//! ```
//!
//! The admission webhook injects one Pod at a time through [`inject_pod`], which runs the same
//! `workload` step on the Pod as JSON, so both ways of injecting add exactly the same thing.
//!
//! A document that is not changed (another kind, an opted-out or already injected workload) is
//! copied byte for byte, comments included. That is also what makes injecting twice a no-op: the
//! second pass finds every workload injected and changes nothing. A changed document keeps the
//! comment lines at its top; its other comments are lost, because it is rewritten from the parsed
//! value. Errors stop everything before anything is written: the caller gets all or nothing.

mod admission;
mod annotations;
mod documents;
mod sidecar;
mod workload;
mod yaml11;

use std::fmt;

use yaml_serde::{Mapping, Value};

pub use admission::{NamespaceInject, inject_pod};
pub use annotations::{
    INBOUND_PORTS_TO_IGNORE, INJECT, INJECTED, IPV6, OUTBOUND_PORTS_TO_IGNORE, OUTBOUND_SUBNETS_TO_IGNORE,
    PROXY_LOG_LEVEL,
};

/// Image of the proxy container when `--proxy-image` is not given (as built in docs/kubernetes.md).
pub const DEFAULT_PROXY_IMAGE: &str = "pillion/proxy:dev";
/// Image of the init container when `--init-image` is not given.
pub const DEFAULT_INIT_IMAGE: &str = "pillion/init:dev";
/// The control plane's Service, as deployed by deploy/control-plane.yaml.
pub const DEFAULT_CONTROL_ADDR: &str = "http://pillion-control.pillion-system.svc:8090";
/// The trust domain of `pillion-control ca init` and `serve` unless told otherwise.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The namespace deploy/control-plane.yaml installs the control plane into.
pub const DEFAULT_CONTROL_PLANE_NAMESPACE: &str = "pillion-system";
/// The proxy's `PILLION_LOG` unless a workload's annotation says otherwise.
pub const DEFAULT_PROXY_LOG_LEVEL: &str = "info";

/// What the injector writes into every pod; per-workload settings come from annotations.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    pub proxy_image: String,
    pub init_image: String,
    /// The proxy's `PILLION_CONTROL_ADDR`.
    pub control_addr: String,
    /// The proxy's `PILLION_LOG` for pods without a `pillion.io/proxy-log-level` annotation.
    pub proxy_log_level: String,
    /// The value of the `pillion.io/injected` annotation.
    pub version: String,
    /// The control plane's namespace: never injected, whatever the input says.
    pub control_plane_namespace: String,
    /// The mesh's trust domain: each proxy expects `spiffe://<it>/ns/<namespace>/sa/<account>`.
    pub trust_domain: String,
    /// The control plane's SPIFFE ID, the proxies' `PILLION_CONTROL_IDENTITY`.
    pub control_identity: String,
}

/// The control plane's SPIFFE ID as deployed: service account `pillion-control` in `namespace`.
pub fn control_identity(trust_domain: &str, namespace: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/pillion-control")
}

impl Default for InjectOptions {
    fn default() -> Self {
        InjectOptions {
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            init_image: DEFAULT_INIT_IMAGE.to_string(),
            control_addr: DEFAULT_CONTROL_ADDR.to_string(),
            proxy_log_level: DEFAULT_PROXY_LOG_LEVEL.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            control_plane_namespace: DEFAULT_CONTROL_PLANE_NAMESPACE.to_string(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            control_identity: control_identity(DEFAULT_TRUST_DOMAIN, DEFAULT_CONTROL_PLANE_NAMESPACE),
        }
    }
}

/// The rewritten stream, and one report per workload found in it.
#[derive(Debug)]
pub struct Injected {
    pub output: String,
    pub reports: Vec<Report>,
}

/// What happened to one workload (`deployment/web`), for the operator's terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `kind/name`, the way kubectl names objects.
    pub object: String,
    pub outcome: Outcome,
    /// Things the operator probably did not mean, which did not stop the injection.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    /// Not injected, and why.
    Skipped(String),
}

/// A document that cannot be read or injected; nothing is written.
#[derive(Debug, thiserror::Error)]
#[error("document {document} (line {line}): {reason}")]
pub struct InjectError {
    /// 1-based, counting documents as kubectl splits them.
    pub document: usize,
    /// The document's first line in the input, 1-based.
    pub line: usize,
    pub reason: String,
}

/// Injects every workload in `input` (one or more YAML documents).
pub fn inject(input: &str, options: &InjectOptions) -> Result<Injected, InjectError> {
    let mut output = String::with_capacity(input.len() * 2);
    let mut reports = Vec::new();
    for document in documents::split(input) {
        let fail = |reason: String| InjectError {
            document: document.number,
            line: document.first_line,
            reason,
        };
        let mut value = document.parse().map_err(fail)?;
        let changed = workload::inject_object(&mut value, options, &mut reports).map_err(fail)?;
        if changed {
            output.push_str(document.separator);
            output.push_str(document.leading_comments());
            output.push_str(&yaml11::to_string(&value).map_err(fail)?);
        } else {
            output.push_str(document.text);
        }
    }
    Ok(Injected { output, reports })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Injected => write!(f, "{}: injected", self.object),
            Outcome::AlreadyInjected => write!(f, "{}: already injected, unchanged", self.object),
            Outcome::Skipped(why) => write!(f, "{}: not injected: {why}", self.object),
        }
    }
}

/// Inserts `key` just before `before` (or at the end), so that what we add sits where a reader
/// expects it: `initContainers` above `containers`, `metadata` above `spec`.
fn insert_before(map: &mut Mapping, before: &str, key: &str, value: Value) {
    let mut value = Some(value);
    for (k, v) in std::mem::take(map) {
        if k.as_str() == Some(before)
            && let Some(value) = value.take()
        {
            map.insert(key.into(), value);
        }
        map.insert(k, v);
    }
    if let Some(value) = value {
        map.insert(key.into(), value);
    }
}
