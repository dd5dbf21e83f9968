//! Inbound authorization: who may reach a port of this workload.
//!
//! TCP is decided once per connection, after TLS: a denied connection is closed. HTTP is decided
//! per request against the live policy, so a revocation applies to the next request even on a
//! pooled keep-alive connection; a denied request gets 403. Policies come, most specific first,
//! from the control plane (for `pod-ip:port`), the route file's `inbound` section, then the
//! default. With a control plane configured and no answer from it yet, the answer is no: an
//! unreachable control plane must not open ports it would have closed.

use std::{fmt, net::SocketAddr, sync::Arc};

use serde::Deserialize;

use crate::{discovery::Discovery, policy::reload::SharedPolicy, tls::spiffe::SpiffeId};

/// Decides authorization from the current policies.
pub struct Authorizer {
    pub discovery: Option<Arc<Discovery>>,
    pub policy: SharedPolicy,
    pub default: Authorization,
}

impl Authorizer {
    /// A connection's decision: the first one for a port waits briefly for the control plane.
    pub async fn connection(&self, app: SocketAddr, client: Option<&SpiffeId>) -> bool {
        if let Some(discovery) = &self.discovery {
            discovery.lookup(app).await;
        }
        self.decide(app, client)
    }

    /// The decision against the latest known policies, without waiting.
    pub fn decide(&self, app: SocketAddr, client: Option<&SpiffeId>) -> bool {
        if let Some(discovery) = &self.discovery {
            match discovery.latest(app) {
                None => return false,
                Some(target) => {
                    if let Some(authorization) = &target.authorization {
                        return authorization.permits(client);
                    }
                }
            }
        }
        let policy = self.policy.load();
        policy
            .inbound_authorization(app.port())
            .unwrap_or(&self.default)
            .permits(client)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    /// Anyone, with or without mesh TLS.
    AllUnauthenticated,
    /// Any client with a verified mesh identity.
    AllAuthenticated,
    Deny,
    /// Mesh clients whose SPIFFE ID is listed, or starts with a listed prefix (`.../ns/prod/*`).
    Allow {
        ids: Vec<String>,
        prefixes: Vec<String>,
    },
}

impl Authorization {
    pub fn permits(&self, peer: Option<&SpiffeId>) -> bool {
        match self {
            Authorization::AllUnauthenticated => true,
            Authorization::AllAuthenticated => peer.is_some(),
            Authorization::Deny => false,
            Authorization::Allow { ids, prefixes } => peer.is_some_and(|id| {
                let id = id.as_str();
                ids.iter().any(|allowed| allowed == id) || prefixes.iter().any(|p| id.starts_with(p.as_str()))
            }),
        }
    }

    /// `all-unauthenticated`, `all-authenticated` or `deny` (the `allow` form comes from YAML).
    pub fn parse_name(s: &str) -> Result<Self, String> {
        match s {
            "all-unauthenticated" => Ok(Authorization::AllUnauthenticated),
            "all-authenticated" => Ok(Authorization::AllAuthenticated),
            "deny" => Ok(Authorization::Deny),
            other => Err(format!(
                "unknown authorization {other:?}: use all-unauthenticated, all-authenticated, deny or {{ allow: [...] }}"
            )),
        }
    }

    fn from_allow_list(list: Vec<String>) -> Result<Self, String> {
        let (mut ids, mut prefixes) = (Vec::new(), Vec::new());
        for entry in list {
            match entry.strip_suffix('*') {
                Some(prefix) if prefix.ends_with('/') => prefixes.push(prefix.to_string()),
                Some(_) => return Err(format!("{entry:?}: a wildcard must follow a '/'")),
                None => ids.push(SpiffeId::parse(&entry).map_err(|e| e.to_string())?.as_str().to_string()),
            }
        }
        Ok(Authorization::Allow { ids, prefixes })
    }

    pub fn from_proto(policy: &pillion_control::proto::Authorization) -> Option<Self> {
        use pillion_control::proto::authorization::Policy;
        Some(match policy.policy.as_ref()? {
            Policy::AllUnauthenticated(_) => Authorization::AllUnauthenticated,
            Policy::AllAuthenticated(_) => Authorization::AllAuthenticated,
            Policy::Deny(_) => Authorization::Deny,
            Policy::Allow(allow) => Authorization::Allow {
                ids: allow.identities.clone(),
                prefixes: allow.prefixes.clone(),
            },
        })
    }
}

impl fmt::Display for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Authorization::AllUnauthenticated => f.write_str("all-unauthenticated"),
            Authorization::AllAuthenticated => f.write_str("all-authenticated"),
            Authorization::Deny => f.write_str("deny"),
            Authorization::Allow { .. } => f.write_str("allow-list"),
        }
    }
}

impl<'de> Deserialize<'de> for Authorization {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Name(String),
            Allow { allow: Vec<String> },
        }
        match Form::deserialize(d)? {
            Form::Name(name) => Authorization::parse_name(&name),
            Form::Allow { allow } => Authorization::from_allow_list(allow),
        }
        .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_decide_by_peer_identity() {
        let web = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/web").unwrap();
        let dev = SpiffeId::parse("spiffe://cluster.local/ns/dev/sa/web").unwrap();
        assert!(Authorization::AllUnauthenticated.permits(None));
        assert!(!Authorization::AllAuthenticated.permits(None));
        assert!(Authorization::AllAuthenticated.permits(Some(&web)));
        assert!(!Authorization::Deny.permits(Some(&web)));
        let allow = Authorization::from_allow_list(vec!["spiffe://cluster.local/ns/prod/*".into()]).unwrap();
        assert!(allow.permits(Some(&web)) && !allow.permits(Some(&dev)) && !allow.permits(None));
        let exact = Authorization::from_allow_list(vec![dev.as_str().into()]).unwrap();
        assert!(exact.permits(Some(&dev)) && !exact.permits(Some(&web)));
        assert!(Authorization::from_allow_list(vec!["spiffe://x/ns*".into()]).is_err());
    }
}
