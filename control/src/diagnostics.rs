//! `pillion-control diagnostics destination`: what `Discovery.Watch` would send a proxy first, for
//! operators, without a running server.
//!
//! The answer is the server's own ([`visible_update`], the function `Watch` calls), so this view
//! cannot drift from what proxies are told; it is then written in the policy YAML's words
//! ([`update_to_json`]) rather than as protobuf. Reading files and printing are `main`'s.

use serde_json::Value;

use crate::{
    discovery_service::visible_update,
    policy::{
        Policy,
        convert::update_to_json,
        model::{Authority, SpiffeId},
    },
};

/// How the documents are written: one per destination either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Indented JSON, one document after another (`jq` reads the sequence).
    Pretty,
    /// One JSON object per line (JSON Lines), for scripts.
    Json,
}

/// The first update a `Watch` of `destination` would send to `caller` (`None` = a plaintext
/// caller, which sees every field), as the policy file would say it.
pub fn destination(policy: &Policy, destination: &Authority, caller: Option<&SpiffeId>) -> Result<Value, String> {
    update_to_json(&visible_update(policy, destination, caller))
        .map_err(|e| format!("{destination}: cannot show the update: {e}"))
}

/// Every destination's document in `format`, each ending in a newline; nothing on any error, so
/// the output is never a partial list.
pub fn destinations(
    policy: &Policy,
    destinations: &[Authority],
    caller: Option<&SpiffeId>,
    format: Format,
) -> Result<String, String> {
    let mut out = String::new();
    for d in destinations {
        let shown = destination(policy, d, caller)?;
        // Serialising a `Value` cannot fail: its keys are strings.
        let text = match format {
            Format::Pretty => serde_json::to_string_pretty(&shown),
            Format::Json => serde_json::to_string(&shown),
        }
        .map_err(|e| format!("{d}: {e}"))?;
        out.push_str(&text);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::parse;

    const POLICY: &str = "
destinations:
  - destination: web.default.svc.cluster.local:80
    endpoints: [{ address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/default/sa/web }]
inbound:
  - port: 8080
    authorization: deny
";

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::try_from(format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap()
    }

    #[test]
    fn shows_what_watch_sends_to_that_caller() {
        let policy = parse(POLICY, "policy.yaml").unwrap();
        let pod: Authority = "10.0.0.7:8080".parse().unwrap();
        let own = destination(&policy, &pod, Some(&id("web"))).unwrap();
        assert_eq!(own["inboundAuthorization"], json!("deny"));
        let other = destination(&policy, &pod, Some(&id("client"))).unwrap();
        assert!(other.get("inboundAuthorization").is_none(), "{other}");
        assert_eq!(other["known"], json!(true));
        let unknown = destination(&policy, &"10.0.0.9:9090".parse().unwrap(), None).unwrap();
        assert_eq!(unknown, json!({ "destination": "10.0.0.9:9090", "known": false }));
    }

    #[test]
    fn one_document_per_destination_in_either_format() {
        let policy = parse(POLICY, "policy.yaml").unwrap();
        let asked: Vec<Authority> = ["web.default.svc.cluster.local:80", "10.0.0.9:9090"]
            .iter()
            .map(|d| d.parse().unwrap())
            .collect();
        let lines = destinations(&policy, &asked, None, Format::Json).unwrap();
        assert_eq!(lines.lines().count(), 2, "{lines}");
        for line in lines.lines() {
            serde_json::from_str::<Value>(line).unwrap();
        }
        let pretty = destinations(&policy, &asked, None, Format::Pretty).unwrap();
        let docs: Vec<Value> = serde_json::Deserializer::from_str(&pretty)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["destination"], json!("web.default.svc.cluster.local:80"));
    }
}
