//! Between the policy model and the protobuf a proxy receives: one complete [`DestinationUpdate`]
//! per destination, and back. The mapping is field for field; see `discovery.proto` for the
//! meaning of each.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::proto::{self, DestinationUpdate};

use super::model::{
    Authority, Authorization, Destination, Endpoint, LoadBalancer, PathMatch, Policy, ProtocolHint, Retry, RetryBudget,
    RetryCode, Route, RouteMatch, StringMatch, Timeouts,
};

/// The complete state for `destination`. Unknown destinations get `known = false` and nothing else
/// but the inbound authorization of their address or port, if any.
pub fn destination_update(policy: &Policy, destination: &Authority) -> DestinationUpdate {
    // The inbound entry for this address (a pod's own) or port matters when the watcher is the
    // workload serving it; the discovery service withholds it from anyone else.
    let inbound_authorization = policy.inbound_at(destination).map(authorization);
    if let Some(d) = policy.destinations.get(destination) {
        return known(d, inbound_authorization);
    }
    // An `ip:port` that no entry names but that is some destination's endpoint (the address a
    // name resolves to, a pod dialled directly) is known by that endpoint alone: its identity
    // makes the hop mesh TLS, whatever the client used to reach it.
    if let Some(endpoint) = endpoint_at(policy, destination) {
        return DestinationUpdate {
            destination: destination.to_string(),
            known: true,
            endpoints: vec![self::endpoint(endpoint)],
            retry_budget: Some(retry_budget(&RetryBudget::default())),
            load_balancer: Some(load_balancer(&LoadBalancer::default())),
            inbound_authorization,
            ..Default::default()
        };
    }
    DestinationUpdate {
        destination: destination.to_string(),
        known: false,
        inbound_authorization,
        ..Default::default()
    }
}

/// The endpoint at `address` among all destinations' (the first destination by name, when several
/// list it, so the answer does not depend on map order).
fn endpoint_at<'p>(policy: &'p Policy, address: &Authority) -> Option<&'p Endpoint> {
    let address = address.socket_addr()?;
    policy
        .destinations
        .iter()
        .filter_map(|(key, d)| Some((key, d.endpoints.iter().find(|e| e.address == address)?)))
        .min_by_key(|(key, _)| *key)
        .map(|(_, e)| e)
}

fn known(d: &Destination, inbound_authorization: Option<proto::Authorization>) -> DestinationUpdate {
    DestinationUpdate {
        destination: d.destination.to_string(),
        known: true,
        endpoints: d.endpoints.iter().map(endpoint).collect(),
        routes: d.routes.iter().map(route).collect(),
        retry_budget: Some(retry_budget(&d.retry_budget)),
        load_balancer: Some(load_balancer(&d.load_balancer)),
        inbound_authorization,
    }
}

fn endpoint(e: &Endpoint) -> proto::Endpoint {
    let protocol = match e.protocol {
        ProtocolHint::Unknown => proto::ProtocolHint::Unknown,
        ProtocolHint::Http1 => proto::ProtocolHint::Http1,
        ProtocolHint::Http2 => proto::ProtocolHint::Http2,
        ProtocolHint::Opaque => proto::ProtocolHint::Opaque,
    };
    proto::Endpoint {
        address: e.address.to_string(),
        weight: e.weight,
        identity: e
            .identity
            .as_ref()
            .map(|id| id.as_str().to_string())
            .unwrap_or_default(),
        protocol: protocol.into(),
    }
}

fn retry_budget(b: &RetryBudget) -> proto::RetryBudget {
    proto::RetryBudget {
        percent: b.percent,
        min_retries_per_second: b.min_retries_per_second,
        ttl: Some(duration(b.ttl)),
    }
}

fn load_balancer(lb: &LoadBalancer) -> proto::LoadBalancer {
    let accrual = &lb.failure_accrual;
    proto::LoadBalancer {
        failure_accrual: Some(proto::FailureAccrual {
            consecutive_failures: accrual.consecutive_failures,
            min_backoff: Some(duration(accrual.min_backoff)),
            max_backoff: Some(duration(accrual.max_backoff)),
        }),
        queue_timeout: Some(duration(lb.queue_timeout)),
    }
}

fn route(r: &Route) -> proto::Route {
    proto::Route {
        name: r.name.0.clone(),
        matches: r.matches.iter().map(route_match).collect(),
        timeouts: r.timeouts.as_ref().map(timeouts),
        retry: r.retry.as_ref().map(retry),
        backend_refs: r
            .backend_refs
            .iter()
            .map(|b| proto::BackendRef {
                address: b.address.to_string(),
                weight: b.weight,
            })
            .collect(),
    }
}

fn route_match(m: &RouteMatch) -> proto::RouteMatch {
    use proto::{header_match, path_match, query_param_match};
    proto::RouteMatch {
        path: m.path.as_ref().map(|p| proto::PathMatch {
            kind: Some(match p {
                PathMatch::Exact(v) => path_match::Kind::Exact(v.clone()),
                PathMatch::Prefix(v) => path_match::Kind::Prefix(v.clone()),
                PathMatch::Regex(v) => path_match::Kind::Regex(v.clone()),
            }),
        }),
        method: m.method.as_ref().map(|m| m.0.clone()).unwrap_or_default(),
        headers: m
            .headers
            .iter()
            .map(|h| proto::HeaderMatch {
                name: h.name.clone(),
                value: Some(match &h.value {
                    StringMatch::Exact(v) => header_match::Value::Exact(v.clone()),
                    StringMatch::Regex(v) => header_match::Value::Regex(v.clone()),
                }),
            })
            .collect(),
        query_params: m
            .query_params
            .iter()
            .map(|q| proto::QueryParamMatch {
                name: q.name.clone(),
                value: Some(match &q.value {
                    StringMatch::Exact(v) => query_param_match::Value::Exact(v.clone()),
                    StringMatch::Regex(v) => query_param_match::Value::Regex(v.clone()),
                }),
            })
            .collect(),
    }
}

fn timeouts(t: &Timeouts) -> proto::Timeouts {
    proto::Timeouts {
        request: t.request.map(duration),
        backend_request: t.backend_request.map(duration),
    }
}

fn retry(r: &Retry) -> proto::Retry {
    let mut out = proto::Retry {
        attempts: r.attempts,
        backoff: Some(duration(r.backoff)),
        ..Default::default()
    };
    for code in &r.codes {
        match *code {
            RetryCode::Http(status) => out.http_statuses.push(u32::from(status)),
            RetryCode::Grpc(code) => out.grpc_codes.push(code),
        }
    }
    out
}

pub fn authorization(a: &Authorization) -> proto::Authorization {
    use proto::authorization::{AllAuthenticated, AllUnauthenticated, Allow, Deny, Policy};
    let policy = match a {
        Authorization::AllUnauthenticated => Policy::AllUnauthenticated(AllUnauthenticated {}),
        Authorization::AllAuthenticated => Policy::AllAuthenticated(AllAuthenticated {}),
        Authorization::Deny => Policy::Deny(Deny {}),
        Authorization::Allow { identities, prefixes } => Policy::Allow(Allow {
            identities: identities.iter().map(|id| id.as_str().to_string()).collect(),
            prefixes: prefixes.clone(),
        }),
    };
    proto::Authorization { policy: Some(policy) }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// From the protocol back to the model, for the proxy: an update is validated by exactly the rules
/// a policy file is, because it is rebuilt as the YAML a person would have written and
/// deserialised by the same code. Errors name the field, like a file's (`routes[0].retry.codes[1]`).
/// `None` for a destination the control plane does not know.
pub fn destination_from_update(update: &DestinationUpdate) -> Result<Option<Destination>, String> {
    if !update.known {
        return Ok(None);
    }
    Destination::deserialize(destination_yaml(update)?)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// An update as the policy YAML's destination entry would say it (JSON), for operators:
/// `pillion-control diagnostics` prints what a proxy would be told in the words they write.
pub fn update_to_json(update: &DestinationUpdate) -> Result<Value, String> {
    let mut shown = json!({ "known": update.known });
    if update.known {
        shown = destination_yaml(update)?;
        shown["known"] = json!(true);
    } else {
        shown["destination"] = json!(update.destination);
    }
    if let Some(a) = &update.inbound_authorization {
        shown["inboundAuthorization"] = match authorization_from_proto(a)? {
            Some(Authorization::Allow { identities, prefixes }) => json!({
                "allow": identities
                    .iter()
                    .map(|id| id.as_str().to_string())
                    .chain(prefixes.iter().map(|p| format!("{p}*")))
                    .collect::<Vec<_>>()
            }),
            Some(named) => json!(named.to_string()),
            None => Value::Null,
        };
    }
    Ok(shown)
}

/// The YAML (as JSON) of a known update's destination, absent fields left out.
fn destination_yaml(update: &DestinationUpdate) -> Result<Value, String> {
    let yaml = json!({
        "destination": update.destination,
        "endpoints": update.endpoints.iter().map(endpoint_yaml).collect::<Vec<_>>(),
        "retryBudget": update.retry_budget.as_ref().map(|b| json!({
            "percent": b.percent,
            "minRetriesPerSecond": b.min_retries_per_second,
            "ttl": b.ttl.as_ref().map(duration_yaml),
        })),
        // Unset (a control plane that predates it) leaves the field out: the defaults.
        "loadBalancer": update.load_balancer.as_ref().map(|lb| json!({
            "failureAccrual": lb.failure_accrual.as_ref().map(|a| json!({
                "consecutiveFailures": a.consecutive_failures,
                "minBackoff": a.min_backoff.as_ref().map(duration_yaml),
                "maxBackoff": a.max_backoff.as_ref().map(duration_yaml),
            })),
            "queueTimeout": lb.queue_timeout.as_ref().map(duration_yaml),
        })),
        "routes": update.routes.iter().map(route_yaml).collect::<Result<Vec<_>, _>>()?,
    });
    Ok(without_nulls(yaml))
}

/// The inbound authorization in an update, validated as the policy file's `authorization` is.
pub fn authorization_from_proto(a: &proto::Authorization) -> Result<Option<Authorization>, String> {
    use proto::authorization::Policy;
    let yaml = match &a.policy {
        None => return Ok(None),
        Some(Policy::AllUnauthenticated(_)) => json!("all-unauthenticated"),
        Some(Policy::AllAuthenticated(_)) => json!("all-authenticated"),
        Some(Policy::Deny(_)) => json!("deny"),
        Some(Policy::Allow(allow)) => {
            let prefixes = allow.prefixes.iter().map(|p| {
                // Kept with their trailing `/`; written `.../*`.
                let p = p.strip_suffix('/').unwrap_or(p);
                format!("{p}/*")
            });
            json!({ "allow": allow.identities.iter().cloned().chain(prefixes).collect::<Vec<_>>() })
        }
    };
    Authorization::deserialize(yaml).map(Some).map_err(|e| e.to_string())
}

fn endpoint_yaml(e: &proto::Endpoint) -> Value {
    let protocol = match proto::ProtocolHint::try_from(e.protocol).unwrap_or_default() {
        proto::ProtocolHint::Unknown => "unknown",
        proto::ProtocolHint::Http1 => "http1",
        proto::ProtocolHint::Http2 => "http2",
        proto::ProtocolHint::Opaque => "opaque",
    };
    json!({
        "address": e.address,
        "identity": (!e.identity.is_empty()).then_some(&e.identity),
        "protocol": protocol,
        "weight": e.weight,
    })
}

fn route_yaml(r: &proto::Route) -> Result<Value, String> {
    use proto::{header_match, path_match, query_param_match};
    let matches: Vec<Value> = r
        .matches
        .iter()
        .map(|m| {
            let path = m.path.as_ref().and_then(|p| p.kind.as_ref()).map(|kind| match kind {
                path_match::Kind::Exact(v) => json!({ "type": "Exact", "value": v }),
                path_match::Kind::Prefix(v) => json!({ "type": "PathPrefix", "value": v }),
                path_match::Kind::Regex(v) => json!({ "type": "RegularExpression", "value": v }),
            });
            let value = |exact: Option<&String>, regex: Option<&String>| match (exact, regex) {
                (Some(v), _) => ("Exact", v.clone()),
                (_, Some(v)) => ("RegularExpression", v.clone()),
                // A match without a value matches the empty value, as in YAML `value: ""`.
                (None, None) => ("Exact", String::new()),
            };
            let headers: Vec<Value> = m
                .headers
                .iter()
                .map(|h| {
                    let (kind, v) = match &h.value {
                        Some(header_match::Value::Exact(v)) => value(Some(v), None),
                        Some(header_match::Value::Regex(v)) => value(None, Some(v)),
                        None => value(None, None),
                    };
                    json!({ "name": h.name, "type": kind, "value": v })
                })
                .collect();
            let query: Vec<Value> = m
                .query_params
                .iter()
                .map(|q| {
                    let (kind, v) = match &q.value {
                        Some(query_param_match::Value::Exact(v)) => value(Some(v), None),
                        Some(query_param_match::Value::Regex(v)) => value(None, Some(v)),
                        None => value(None, None),
                    };
                    json!({ "name": q.name, "type": kind, "value": v })
                })
                .collect();
            json!({
                "path": path,
                "method": (!m.method.is_empty()).then_some(&m.method),
                "headers": headers,
                "queryParams": query,
            })
        })
        .collect();
    let retry = match &r.retry {
        None => None,
        Some(retry) => {
            let mut codes: Vec<Value> = retry.http_statuses.iter().map(|s| json!(s)).collect();
            for code in &retry.grpc_codes {
                let name = RetryCode::grpc_name(*code).ok_or_else(|| format!("retry: gRPC code {code} is unknown"))?;
                codes.push(json!(name));
            }
            Some(json!({
                "codes": codes,
                "attempts": retry.attempts,
                "backoff": retry.backoff.as_ref().map(duration_yaml),
            }))
        }
    };
    Ok(json!({
        "name": r.name,
        "matches": matches,
        "timeouts": r.timeouts.as_ref().map(|t| json!({
            "request": t.request.as_ref().map(duration_yaml),
            "backendRequest": t.backend_request.as_ref().map(duration_yaml),
        })),
        "retry": retry,
        "backendRefs": r.backend_refs.iter().map(|b| json!({ "address": b.address, "weight": b.weight })).collect::<Vec<_>>(),
    }))
}

/// A protobuf duration as the YAML duration text (`1s 500ms`); a negative one stays negative text
/// and is refused by the parser, as in a file.
fn duration_yaml(d: &prost_types::Duration) -> String {
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(s), Ok(n)) if n < 1_000_000_000 => {
            let d = Duration::new(s, n);
            if d.is_zero() {
                "0s".to_string()
            } else {
                humantime::format_duration(d).to_string()
            }
        }
        _ => format!("-{}s", d.seconds.unsigned_abs()),
    }
}

/// An absent optional field is left out, as in a file (where `null` would be a type error).
fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse;

    const POLICY: &str = r#"
destinations:
  - destination: api.shop.svc.cluster.local:8080
    endpoints: [{ address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/shop/sa/api.v2 }]
    routes: [{ name: slow, timeouts: { request: 200ms } }]
inbound:
  - port: 8080
    authorization: { allow: ["spiffe://cluster.local/ns/shop/*"] }
"#;

    #[test]
    fn an_endpoint_address_is_known_by_its_endpoint_alone() {
        let policy = parse(POLICY, "policy.yaml").unwrap();
        let update = destination_update(&policy, &"10.0.0.7:8080".parse().unwrap());
        assert!(update.known);
        assert_eq!(update.endpoints.len(), 1);
        assert_eq!(update.endpoints[0].identity, "spiffe://cluster.local/ns/shop/sa/api.v2");
        assert!(update.routes.is_empty(), "the name's routes are the name's");
        assert!(update.inbound_authorization.is_some());
        let other = destination_update(&policy, &"10.0.0.8:8080".parse().unwrap());
        assert!(!other.known && other.endpoints.is_empty());
    }

    #[test]
    fn a_pod_address_answers_its_own_authorization_before_the_ports() {
        use super::super::model::{SpiffeId, WorkloadInbound};
        let mut policy = parse(POLICY, "policy.yaml").unwrap();
        let owner = SpiffeId::try_from("spiffe://cluster.local/ns/shop/sa/api.v2".to_string()).unwrap();
        let only_web = Authorization::allow(vec!["spiffe://cluster.local/ns/shop/sa/web".into()]).unwrap();
        let workload = WorkloadInbound {
            owner: owner.clone(),
            ports: [(8080, only_web.clone())].into(),
            default: Authorization::Deny,
        };
        // Dual stack: the same workload under each of its IPs.
        for ip in ["10.0.0.7", "fd00::7"] {
            policy.workloads.insert(ip.parse().unwrap(), workload.clone());
        }
        let read = |key: &str| {
            let update = destination_update(&policy, &key.parse().unwrap());
            let a = update
                .inbound_authorization
                .as_ref()
                .map(|a| authorization_from_proto(a).unwrap());
            (update.known, a.flatten())
        };
        // The pod's port: its own entry wins over the file-style per-port one.
        assert_eq!(read("10.0.0.7:8080"), (true, Some(only_web.clone())));
        // An undeclared port of the pod: the pod's default, never the per-port map's.
        assert_eq!(read("10.0.0.7:9000"), (false, Some(Authorization::Deny)));
        assert_eq!(read("[fd00::7]:8080"), (false, Some(only_web)));
        // Another address on the same port keeps the per-port entry; a name does too.
        let per_port = policy.inbound.get(&8080).cloned();
        assert_eq!(read("10.0.0.8:8080"), (false, per_port.clone()));
        assert_eq!(read("api.shop.svc.cluster.local:8080"), (true, per_port));
        assert_eq!(policy.owner_at(&"[fd00::7]:1".parse().unwrap()), Some(&owner));
        assert_eq!(
            policy.owner_at(&"api.shop.svc.cluster.local:8080".parse().unwrap()),
            None
        );
    }

    #[test]
    fn load_balancing_survives_the_wire_and_is_always_sent() {
        let policy = parse(
            "destinations:\n  - destination: web:80\n    loadBalancer: { failureAccrual: { consecutiveFailures: 0, minBackoff: 250ms, maxBackoff: 1h }, queueTimeout: 1s 500ms }\n  - destination: plain:80\n",
            "policy.yaml",
        )
        .unwrap();
        for key in ["web:80", "plain:80"] {
            let key: Authority = key.parse().unwrap();
            let update = destination_update(&policy, &key);
            assert!(
                update.load_balancer.is_some(),
                "{key}: always set for a known destination"
            );
            let back = destination_from_update(&update).unwrap().unwrap();
            assert_eq!(back.load_balancer, policy.destinations[&key].load_balancer, "{key}");
        }
        let web = destination_update(&policy, &"web:80".parse().unwrap());
        let lb = web.load_balancer.as_ref().unwrap();
        assert_eq!(lb.failure_accrual.as_ref().unwrap().consecutive_failures, 0);
        assert_eq!(lb.queue_timeout, Some(duration(Duration::from_millis(1500))));
        let shown = update_to_json(&web).unwrap();
        assert_eq!(
            shown["loadBalancer"],
            json!({
                "failureAccrual": { "consecutiveFailures": 0, "minBackoff": "250ms", "maxBackoff": "1h" },
                "queueTimeout": "1s 500ms",
            })
        );
        // A proxy dialled straight to an endpoint gets the defaults too.
        let policy = parse(POLICY, "policy.yaml").unwrap();
        let endpoint = destination_update(&policy, &"10.0.0.7:8080".parse().unwrap());
        assert_eq!(endpoint.load_balancer, Some(load_balancer(&LoadBalancer::default())));
    }

    #[test]
    fn an_update_without_load_balancing_means_the_defaults() {
        let policy = parse(POLICY, "policy.yaml").unwrap();
        let mut update = destination_update(&policy, &"api.shop.svc.cluster.local:8080".parse().unwrap());
        update.load_balancer = None;
        let back = destination_from_update(&update).unwrap().unwrap();
        assert_eq!(back.load_balancer, LoadBalancer::default());
        update.load_balancer = Some(proto::LoadBalancer {
            failure_accrual: None,
            queue_timeout: Some(duration(Duration::from_secs(5))),
        });
        let back = destination_from_update(&update).unwrap().unwrap();
        assert_eq!(
            back.load_balancer.failure_accrual,
            LoadBalancer::default().failure_accrual
        );
        assert_eq!(back.load_balancer.queue_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_load_balancing_from_the_wire_is_refused_with_a_reason() {
        let policy = parse(POLICY, "policy.yaml").unwrap();
        let good = destination_update(&policy, &"api.shop.svc.cluster.local:8080".parse().unwrap());
        let accrual = |failures, min: Duration, max: Duration| proto::FailureAccrual {
            consecutive_failures: failures,
            min_backoff: Some(duration(min)),
            max_backoff: Some(duration(max)),
        };
        let secs = Duration::from_secs;
        let negative = prost_types::Duration { seconds: -1, nanos: 0 };
        let cases = [
            (
                Some(accrual(1001, secs(1), secs(60))),
                Some(duration(secs(1))),
                "consecutiveFailures 1001 is above 1000",
            ),
            (
                Some(accrual(7, Duration::ZERO, secs(60))),
                Some(duration(secs(1))),
                "minBackoff must be longer than 0s",
            ),
            (
                Some(accrual(7, secs(5), secs(2))),
                Some(duration(secs(1))),
                "shorter than minBackoff",
            ),
            (
                Some(accrual(7, secs(1), secs(3601))),
                Some(duration(secs(1))),
                "maxBackoff",
            ),
            (
                Some(accrual(7, secs(1), secs(60))),
                Some(duration(Duration::ZERO)),
                "queueTimeout",
            ),
            (
                Some(accrual(7, secs(1), secs(60))),
                Some(duration(secs(61))),
                "queueTimeout",
            ),
            (Some(accrual(7, secs(1), secs(60))), Some(negative), "not a duration"),
        ];
        for (failure_accrual, queue_timeout, reason) in cases {
            let mut update = good.clone();
            update.load_balancer = Some(proto::LoadBalancer {
                failure_accrual,
                queue_timeout,
            });
            let err = destination_from_update(&update).unwrap_err();
            assert!(err.contains(reason), "{err:?} lacks {reason:?}");
        }
    }

    #[test]
    fn operators_see_an_update_in_the_policy_files_words() {
        let policy = parse(POLICY, "policy.yaml").unwrap();
        let update = destination_update(&policy, &"api.shop.svc.cluster.local:8080".parse().unwrap());
        let shown = update_to_json(&update).unwrap();
        assert_eq!(shown["known"], json!(true));
        assert_eq!(shown["routes"][0]["timeouts"]["request"], json!("200ms"));
        assert_eq!(
            shown["inboundAuthorization"],
            json!({ "allow": ["spiffe://cluster.local/ns/shop/*"] })
        );
        let unknown = destination_update(&policy, &"web:80".parse().unwrap());
        assert_eq!(
            update_to_json(&unknown).unwrap(),
            json!({ "known": false, "destination": "web:80" })
        );
    }
}
