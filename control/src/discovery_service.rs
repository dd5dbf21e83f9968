//! The `Discovery` gRPC service: one server stream per watched destination.
//!
//! Each stream sends the destination's complete state at once and again whenever a policy reload
//! changes *that destination's* state; reloads that leave it equal send nothing. Streams end when
//! the server shuts down, so graceful shutdown is not held up by watchers that never hang up.
//!
//! Over TLS a watcher must present a workload certificate (`UNAUTHENTICATED` otherwise), and a
//! destination's `inbound_authorization` is sent only to the workload it protects: for a pod's
//! address (Kubernetes mode) the pod's own identity, otherwise a watcher whose identity is one of
//! the destination's endpoint identities. A workload learns its own inbound policy, not who may
//! call others. With `--plaintext` nothing identifies the watcher and every field is sent.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    policy::{
        Policy, PolicyWatch,
        convert::destination_update,
        model::{Authority, SpiffeId},
    },
    proto::{DestinationUpdate, WatchRequest, discovery_server::Discovery},
    tls::{ControlPeer, PeerIdentity},
};

/// Serves destination watches from the current policy.
pub struct DiscoveryService {
    policy: PolicyWatch,
    shutdown: CancellationToken,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<DestinationUpdate, Status>> + Send>>;

struct StreamState {
    destination: Authority,
    /// `None` for a plaintext watcher, which gets every field.
    caller: Option<SpiffeId>,
    policy: watch::Receiver<Arc<Policy>>,
    last: Option<DestinationUpdate>,
    shutdown: CancellationToken,
}

impl DiscoveryService {
    pub fn new(policy: PolicyWatch, shutdown: CancellationToken) -> Self {
        DiscoveryService { policy, shutdown }
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = UpdateStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let peer = ControlPeer::of(&request);
        let caller = match peer.identity {
            PeerIdentity::Plaintext => None,
            PeerIdentity::Verified(id) => Some(id),
            PeerIdentity::Anonymous => {
                tracing::warn!(peer = %peer.addr(), "watch refused: no client certificate");
                return Err(Status::unauthenticated(
                    "Watch needs a workload certificate (mutual TLS); call Certify first",
                ));
            }
        };
        let requested = request.into_inner().destination;
        let destination: Authority = requested
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("destination: {e}")))?;
        tracing::debug!(%destination, caller = ?caller.as_ref().map(|c| c.as_str()), "watch opened");
        let state = StreamState {
            destination,
            caller,
            policy: self.policy.subscribe(),
            last: None,
            shutdown: self.shutdown.clone(),
        };
        let stream = futures_util::stream::unfold(state, next_update);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Waits for the destination's state to differ from what was last sent; `None` ends the stream.
async fn next_update(mut s: StreamState) -> Option<(Result<DestinationUpdate, Status>, StreamState)> {
    loop {
        let update = visible_update(&s.policy.borrow_and_update(), &s.destination, s.caller.as_ref());
        if s.last.as_ref() != Some(&update) {
            s.last = Some(update.clone());
            return Some((Ok(update), s));
        }
        tokio::select! {
            changed = s.policy.changed() => {
                if changed.is_err() {
                    // The policy can no longer change (fixed policy): keep the stream open, idle,
                    // until shutdown, so the proxy does not reconnect in a loop.
                    s.shutdown.cancelled().await;
                    return None;
                }
            }
            _ = s.shutdown.cancelled() => return None,
        }
    }
}

/// The destination's state as `caller` may see it: its inbound authorization only when the caller
/// is the pod at that address, or else one of the destination's endpoints, including the endpoint
/// an `ip:port` names (`None` = plaintext, sees everything). `pillion-control diagnostics` shows
/// operators the same answer.
pub fn visible_update(policy: &Policy, destination: &Authority, caller: Option<&SpiffeId>) -> DestinationUpdate {
    let mut update = destination_update(policy, destination);
    if let Some(caller) = caller {
        // A known pod address has one owner, whatever endpoint lists claim for it.
        let serves_it = match policy.owner_at(destination) {
            Some(owner) => owner == caller,
            None => update.endpoints.iter().any(|e| e.identity == caller.as_str()),
        };
        if !serves_it {
            update.inbound_authorization = None;
        }
    }
    update
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "
destinations:
  - destination: 10.0.0.7:8080
    endpoints: [{ address: 10.0.0.7:8080, identity: spiffe://cluster.local/ns/default/sa/web }]
inbound:
  - port: 8080
    authorization: deny
";

    #[test]
    fn inbound_authorization_only_for_the_destinations_own_workload() {
        let policy = crate::policy::parse(POLICY, "test").unwrap();
        let dest: Authority = "10.0.0.7:8080".parse().unwrap();
        let unknown: Authority = "10.0.0.9:8080".parse().unwrap();
        let web = SpiffeId::try_from("spiffe://cluster.local/ns/default/sa/web".to_string()).unwrap();
        let other = SpiffeId::try_from("spiffe://cluster.local/ns/default/sa/client".to_string()).unwrap();
        assert!(
            visible_update(&policy, &dest, Some(&web))
                .inbound_authorization
                .is_some()
        );
        assert!(
            visible_update(&policy, &dest, Some(&other))
                .inbound_authorization
                .is_none()
        );
        assert!(
            visible_update(&policy, &unknown, Some(&web))
                .inbound_authorization
                .is_none()
        );
        // Everything else is the same for every caller.
        let mut seen_by_other = visible_update(&policy, &dest, Some(&other));
        seen_by_other.inbound_authorization = visible_update(&policy, &dest, None).inbound_authorization;
        assert_eq!(seen_by_other, visible_update(&policy, &dest, None));
    }

    #[test]
    fn a_pods_authorization_only_for_the_pod_itself() {
        use crate::policy::model::{Authorization, WorkloadInbound};
        let mut policy = crate::policy::parse(POLICY, "test").unwrap();
        let id = |s: &str| SpiffeId::try_from(format!("spiffe://cluster.local/ns/shop/sa/{s}")).unwrap();
        let api = id("api");
        // A pod no Service lists (no endpoint names it): only its owner says whose it is.
        policy.workloads.insert(
            "10.0.0.8".parse().unwrap(),
            WorkloadInbound {
                owner: api.clone(),
                ports: [(9090, Authorization::AllAuthenticated)].into(),
                default: Authorization::Deny,
            },
        );
        // The same address as a Service endpoint with another identity: the owner still decides.
        policy.workloads.insert(
            "10.0.0.7".parse().unwrap(),
            WorkloadInbound {
                owner: api.clone(),
                ports: Default::default(),
                default: Authorization::Deny,
            },
        );
        let seen = |dest: &str, caller: Option<&SpiffeId>| {
            visible_update(&policy, &dest.parse().unwrap(), caller).inbound_authorization
        };
        let all_authenticated = Some(crate::policy::convert::authorization(&Authorization::AllAuthenticated));
        let deny = Some(crate::policy::convert::authorization(&Authorization::Deny));
        assert_eq!(seen("10.0.0.8:9090", Some(&api)), all_authenticated);
        assert_eq!(seen("10.0.0.8:1234", Some(&api)), deny);
        assert_eq!(seen("10.0.0.8:9090", Some(&id("web"))), None);
        assert_eq!(seen("10.0.0.7:8080", Some(&api)), deny);
        let listed = SpiffeId::try_from("spiffe://cluster.local/ns/default/sa/web".to_string()).unwrap();
        assert_eq!(
            seen("10.0.0.7:8080", Some(&listed)),
            None,
            "the endpoint's identity is not the pod's"
        );
        // Plaintext (no caller identity) sees everything, as before.
        assert_eq!(seen("10.0.0.8:9090", None), all_authenticated);
    }
}
