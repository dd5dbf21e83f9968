//! A Gateway API `HTTPRoute` or `GRPCRoute` whose `parentRefs` name a Service (the GAMMA mesh
//! pattern), checked once when it is applied and kept as model routes plus the Services its
//! `backendRefs` name.
//!
//! The rules' matches, timeouts and retry are rewritten in the policy file's words and read by the
//! model's own deserializer, so a route from the cluster passes exactly the checks a route in the
//! file does. Backends stay Service references here: the index resolves them to ready endpoints
//! (`ip:port`, the only backend a proxy can send to) each time it builds the policy, so a pod
//! change moves the split without the route being re-applied.
//!
//! Refused, with the reason kept for the operator: filters (none is supported yet, and ignoring a
//! redirect or rewrite would silently change what a request does), a parentRef or backendRef in
//! another namespace (consumer routes and ReferenceGrants are not supported), backendRefs that
//! are not Services or have no port, weights outside 0..=1000000 or all 0.

use gateway_api::experimental::{
    grpcroutes::{GrpcRoute, GrpcRouteRulesMatches, GrpcRouteRulesMatchesMethodType},
    httproutes::{HttpRoute, HttpRouteRules},
};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use pillion_api::policy::model::Route;
use serde_json::{Map, Value, json};

use super::index::ObjectKey;

/// What the index keeps of one HTTPRoute.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRouteInfo {
    /// Gateway API precedence among equal matches: the oldest route first, then by name.
    pub created: Option<Timestamp>,
    /// The Services (and, when given, the one port) the route applies to.
    pub parents: Vec<ParentService>,
    pub rules: Vec<RuleInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentService {
    pub service: ObjectKey,
    /// `None` = every port of the Service.
    pub port: Option<u16>,
}

/// One rule: the model route without its backends, and the Services to resolve them from.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleInfo {
    pub route: Route,
    pub backends: Vec<BackendService>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendService {
    pub service: ObjectKey,
    /// The Service port (not the pods' target port).
    pub port: u16,
    pub weight: u32,
}

/// Gateway API's upper bound for a backendRef weight.
const MAX_WEIGHT: i32 = 1_000_000;

impl HttpRouteInfo {
    /// Checks an HTTPRoute; `Err` is the reason it is not served. A route that names no Service
    /// parent (a north-south route for some Gateway) is not ours and yields no parents.
    pub fn parse(route: &HttpRoute) -> Result<HttpRouteInfo, String> {
        Self::parse_named(route, "")
    }

    /// A GRPCRoute, as the HTTPRoute it amounts to: a method match is a match on the request
    /// path (`/<service>/<method>`), headers are headers. Its route names start `grpcroute/`, so
    /// they never collide with an HTTPRoute's (`<ns>/<name>/<rule>`, one segment fewer).
    pub fn parse_grpc(route: &GrpcRoute) -> Result<HttpRouteInfo, String> {
        let mut rules = Vec::new();
        for (i, rule) in route.spec.rules.iter().flatten().enumerate() {
            let at = |e: String| format!("rules[{i}]: {e}");
            let filtered = rule.filters.iter().flatten().next().is_some()
                || rule
                    .backend_refs
                    .iter()
                    .flatten()
                    .any(|b| b.filters.iter().flatten().next().is_some());
            if filtered {
                return Err(at("filters are not supported".to_string()));
            }
            let matches = rule
                .matches
                .iter()
                .flatten()
                .enumerate()
                .map(|(j, m)| grpc_match(m).map_err(|e| at(format!("matches[{j}]: {e}"))))
                .collect::<Result<Vec<Value>, String>>()?;
            let mut backends = to_json(&rule.backend_refs)?;
            if let Value::Array(refs) = &mut backends {
                for r in refs.iter_mut().filter_map(Value::as_object_mut) {
                    r.remove("filters");
                }
            }
            rules.push(json!({ "name": rule.name, "matches": matches, "backendRefs": backends }));
        }
        let http: HttpRoute = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": to_json(&route.metadata)?,
            "spec": { "parentRefs": to_json(&route.spec.parent_refs)?, "rules": rules },
        }))
        .map_err(|e| e.to_string())?;
        Self::parse_named(&http, "grpcroute/")
    }

    fn parse_named(route: &HttpRoute, prefix: &str) -> Result<HttpRouteInfo, String> {
        let namespace = route.namespace().unwrap_or_default();
        let name = route.name_any();
        let mut parents = Vec::new();
        for (i, parent) in route.spec.parent_refs.iter().flatten().enumerate() {
            let kind = parent.kind.as_deref().unwrap_or("Gateway");
            let group = parent.group.as_deref().unwrap_or("gateway.networking.k8s.io");
            if kind != "Service" || !matches!(group, "" | "core") {
                continue;
            }
            let parent_ns = parent.namespace.as_deref().unwrap_or(&namespace);
            if parent_ns != namespace {
                return Err(format!(
                    "parentRefs[{i}]: Service {parent_ns}/{} is in another namespace (consumer routes are not supported)",
                    parent.name
                ));
            }
            let port = parent
                .port
                .map(|p| port_number(p).map_err(|e| format!("parentRefs[{i}].port: {e}")))
                .transpose()?;
            parents.push(ParentService {
                service: ObjectKey::new(&namespace, &parent.name),
                port,
            });
        }
        let mut rules = Vec::new();
        if !parents.is_empty() {
            for (i, rule) in route.spec.rules.iter().flatten().enumerate() {
                let rule_name = rule.name.clone().unwrap_or_else(|| i.to_string());
                let info = parse_rule(rule, &namespace, &format!("{prefix}{namespace}/{name}/{rule_name}"))
                    .map_err(|e| format!("rules[{i}]: {e}"))?;
                rules.push(info);
            }
        }
        Ok(HttpRouteInfo {
            created: route.metadata.creation_timestamp.as_ref().map(|t| t.0),
            parents,
            rules,
        })
    }
}

fn parse_rule(rule: &HttpRouteRules, namespace: &str, route_name: &str) -> Result<RuleInfo, String> {
    if let Some(filter) = rule.filters.iter().flatten().next() {
        return Err(format!("filter {:?} is not supported", filter.r#type));
    }
    let mut route = Map::new();
    route.insert("name".into(), json!(route_name));
    if let Some(matches) = &rule.matches {
        route.insert("matches".into(), to_json(matches)?);
    }
    if let Some(timeouts) = &rule.timeouts {
        let mut t = Map::new();
        if let Some(request) = &timeouts.request {
            t.insert("request".into(), json!(duration(request, "timeouts.request")?));
        }
        if let Some(backend) = &timeouts.backend_request {
            t.insert(
                "backendRequest".into(),
                json!(duration(backend, "timeouts.backendRequest")?),
            );
        }
        route.insert("timeouts".into(), Value::Object(t));
    }
    if let Some(retry) = &rule.retry {
        let mut r = Map::new();
        if let Some(codes) = &retry.codes {
            r.insert("codes".into(), json!(codes));
        }
        if let Some(attempts) = retry.attempts {
            r.insert("attempts".into(), json!(attempts));
        }
        if let Some(backoff) = &retry.backoff {
            r.insert("backoff".into(), json!(duration(backoff, "retry.backoff")?));
        }
        route.insert("retry".into(), Value::Object(r));
    }
    // The model's deserializer is its validator: the same checks as the policy file.
    let route: Route = serde_json::from_value(Value::Object(route)).map_err(|e| e.to_string())?;

    let mut backends = Vec::new();
    for (i, backend) in rule.backend_refs.iter().flatten().enumerate() {
        let at = |e: String| format!("backendRefs[{i}]: {e}");
        if let Some(filter) = backend.filters.iter().flatten().next() {
            return Err(at(format!("filter {:?} is not supported", filter.r#type)));
        }
        let kind = backend.kind.as_deref().unwrap_or("Service");
        let group = backend.group.as_deref().unwrap_or("");
        if kind != "Service" || !matches!(group, "" | "core") {
            return Err(at(format!(
                "kind {kind} in group `{group}` is not supported (only Services)"
            )));
        }
        let backend_ns = backend.namespace.as_deref().unwrap_or(namespace);
        if backend_ns != namespace {
            return Err(at(format!(
                "Service {backend_ns}/{} is in another namespace (ReferenceGrants are not supported)",
                backend.name
            )));
        }
        let port = backend
            .port
            .ok_or_else(|| at("a Service backendRef needs a port".to_string()))
            .and_then(|p| port_number(p).map_err(at))?;
        let weight = match backend.weight.unwrap_or(1) {
            w @ 0..=MAX_WEIGHT => w as u32,
            w => return Err(at(format!("weight {w} is outside 0..={MAX_WEIGHT}"))),
        };
        backends.push(BackendService {
            service: ObjectKey::new(namespace, &backend.name),
            port,
            weight,
        });
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        return Err("every backendRef has weight 0".to_string());
    }
    Ok(RuleInfo { route, backends })
}

/// A GRPCRoute match in HTTPRoute words. Exact names may not hold `/`, which would change which
/// path segments they name; regular expressions are grouped so an alternation stays in its segment.
fn grpc_match(m: &GrpcRouteRulesMatches) -> Result<Value, String> {
    let mut out = Map::new();
    if let Some(method) = &m.method {
        let regex = matches!(method.r#type, Some(GrpcRouteRulesMatchesMethodType::RegularExpression));
        let (service, name) = (method.service.as_deref(), method.method.as_deref());
        if !regex && [service, name].into_iter().flatten().any(|s| s.contains('/')) {
            return Err("an exact service or method name contains `/`".to_string());
        }
        let path = match (regex, service, name) {
            (_, None, None) => return Err("a method match names neither a service nor a method".to_string()),
            (false, Some(s), Some(m)) => json!({ "type": "Exact", "value": format!("/{s}/{m}") }),
            (false, Some(s), None) => json!({ "type": "PathPrefix", "value": format!("/{s}") }),
            (false, None, Some(m)) => {
                json!({ "type": "RegularExpression", "value": format!("/[^/]+/{}", regex::escape(m)) })
            }
            (true, s, m) => json!({
                "type": "RegularExpression",
                "value": format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+")),
            }),
        };
        out.insert("path".into(), path);
    }
    if let Some(headers) = &m.headers {
        out.insert("headers".into(), to_json(headers)?);
    }
    Ok(Value::Object(out))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, String> {
    serde_json::to_value(value).map_err(|e| e.to_string())
}

/// A Gateway API duration (`1h30m`, `250ms`), checked by its own grammar, as milliseconds.
fn duration(text: &str, field: &str) -> Result<String, String> {
    let d: gateway_api::Duration = text
        .parse()
        .map_err(|e| format!("{field}: `{text}` is not a Gateway API duration: {e}"))?;
    Ok(format!("{}ms", d.as_millis()))
}

fn port_number(port: i32) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{port} is not a port number")),
    }
}
