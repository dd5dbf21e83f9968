//! From the policy model to the protobuf a proxy receives: one complete [`DestinationUpdate`] per
//! destination. The mapping is field for field; see `discovery.proto` for the meaning of each.

use std::time::Duration;

use crate::proto::{self, DestinationUpdate};

use super::model::{
    Authority, Authorization, Destination, Endpoint, PathMatch, Policy, ProtocolHint, Retry, RetryBudget, RetryCode,
    Route, RouteMatch, StringMatch, Timeouts,
};

/// The complete state for `destination`. Unknown destinations get `known = false` and nothing else
/// but the inbound authorization of their port, if any.
pub fn destination_update(policy: &Policy, destination: &Authority) -> DestinationUpdate {
    // The inbound entry for this port matters when the watcher is the workload serving it.
    let inbound_authorization = policy.inbound.get(&destination.port()).map(authorization);
    match policy.destinations.get(destination) {
        Some(d) => known(d, inbound_authorization),
        None => DestinationUpdate {
            destination: destination.to_string(),
            known: false,
            inbound_authorization,
            ..Default::default()
        },
    }
}

fn known(d: &Destination, inbound_authorization: Option<proto::Authorization>) -> DestinationUpdate {
    DestinationUpdate {
        destination: d.destination.to_string(),
        known: true,
        endpoints: d.endpoints.iter().map(endpoint).collect(),
        routes: d.routes.iter().map(route).collect(),
        retry_budget: Some(retry_budget(&d.retry_budget)),
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
        identity: e.identity.as_ref().map(|id| id.0.clone()).unwrap_or_default(),
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

pub(crate) fn authorization(a: &Authorization) -> proto::Authorization {
    use proto::authorization::{AllAuthenticated, AllUnauthenticated, Allow, Deny, Policy};
    let policy = match a {
        Authorization::AllUnauthenticated => Policy::AllUnauthenticated(AllUnauthenticated {}),
        Authorization::AllAuthenticated => Policy::AllAuthenticated(AllAuthenticated {}),
        Authorization::Deny => Policy::Deny(Deny {}),
        Authorization::Allow { identities, prefixes } => Policy::Allow(Allow {
            identities: identities.iter().map(|id| id.0.clone()).collect(),
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
