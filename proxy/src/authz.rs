//! Inbound authorization: who may reach a port of this workload.
//!
//! TCP is decided once per connection, after TLS: a denied connection is closed. HTTP is decided
//! per request against the live policy, so a revocation applies to the next request even on a
//! pooled keep-alive connection; a denied request gets 403. Policies come, most specific first,
//! from the control plane (for `pod-ip:port`), the route file's `inbound` section, then the
//! default. With a control plane configured and no answer from it yet, the answer is no: an
//! unreachable control plane must not open ports it would have closed.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

pub use pillion_api::policy::model::Authorization;

use crate::{
    discovery::{Discovery, Handle, Held, lock},
    policy::reload::SharedPolicy,
    tls::spiffe::SpiffeId,
};

/// Decides authorization from the current policies.
pub struct Authorizer {
    pub discovery: Option<Arc<Discovery>>,
    pub policy: SharedPolicy,
    pub default: Authorization,
}

/// One connection's view of the control plane's policy for its port, held so that each
/// request's decision reads it without a shared lock.
pub struct PortPolicy {
    app: SocketAddr,
    /// `None` without a control plane.
    held: Option<Mutex<Held>>,
}

impl Authorizer {
    /// The policy handle a connection to `app` holds.
    pub fn port(&self, app: SocketAddr) -> PortPolicy {
        PortPolicy {
            app,
            held: self.discovery.as_ref().map(|d| Mutex::new(Held::new(d, app.into()))),
        }
    }

    /// A connection's decision: the first one for a port waits briefly for the control plane.
    pub async fn connection(&self, app: SocketAddr, client: Option<&SpiffeId>) -> bool {
        let port = self.port(app);
        self.resolve(&port).await;
        self.decide(&port, client)
    }

    /// Waits (the first time for a port, briefly) for the control plane's answer.
    pub async fn resolve(&self, port: &PortPolicy) {
        let handle = match (&self.discovery, &port.held) {
            (Some(discovery), Some(held)) => lock(held).handle(discovery).cloned(),
            _ => None,
        };
        if let Some(mut handle) = handle {
            handle.resolve().await;
        }
    }

    /// The decision against the latest known policies, without waiting.
    pub fn decide(&self, port: &PortPolicy, client: Option<&SpiffeId>) -> bool {
        if let Some(discovery) = &self.discovery {
            let answer = port
                .held
                .as_ref()
                .and_then(|held| lock(held).handle(discovery).and_then(Handle::latest));
            match answer {
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
            .inbound_authorization(port.app.port())
            .unwrap_or(&self.default)
            .permits(client)
    }
}

impl PortPolicy {
    pub fn app(&self) -> SocketAddr {
        self.app
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
        let allow = Authorization::allow(vec!["spiffe://cluster.local/ns/prod/*".into()]).unwrap();
        assert!(allow.permits(Some(&web)) && !allow.permits(Some(&dev)) && !allow.permits(None));
        let exact = Authorization::allow(vec![dev.as_str().into()]).unwrap();
        assert!(exact.permits(Some(&dev)) && !exact.permits(Some(&web)));
        assert!(Authorization::allow(vec!["spiffe://x/ns*".into()]).is_err());
    }
}
