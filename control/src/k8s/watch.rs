//! Watching the cluster: one kube-rs watcher per kind (Services, EndpointSlices, Pods,
//! Namespaces, and HTTPRoutes, GRPCRoutes and AuthorizationPolicies when the API server serves
//! them): list, then watch
//! from the list's resourceVersion, relisting with backoff after errors or `410 Gone`; all feed
//! one [`Index`], whose policy is published to the discovery service as a [`PolicyWatch`].
//!
//! One thread owns the index, so no lock is shared with the gRPC streams: they only read the
//! published `Arc<Policy>`. Events that arrive together are applied together and published once
//! (a relist of a thousand pods is one update, not a thousand). Nothing is published before every
//! kind has been listed once: a policy built from Services without their Pods would send meshed
//! endpoints without identities, i.e. plaintext. While a watch is down the last state is served.
//!
//! When routes are watched, the same thread also publishes the routes whose status should change
//! (status.rs), which the replica holding the Lease (lease.rs) writes.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures_util::{FutureExt, Stream, StreamExt, stream::select_all};
use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    authz::AuthorizationPolicyObject,
    index::{Index, IndexConfig, Indexed, Kind},
    lease::{self, LeaseConfig},
    status::{self, Pending},
};
use crate::policy::{Policy, PolicyWatch};

/// How often start-up says it is still waiting for the first complete list.
const SYNC_REMINDER: Duration = Duration::from_secs(10);

/// The cluster as a policy source.
pub struct KubernetesSource {
    pub client: Client,
    pub config: IndexConfig,
}

/// One event from any of the watchers, applied by the index.
type Update = Box<dyn FnOnce(&mut Index) -> bool + Send>;
type Updates = Pin<Box<dyn Stream<Item = Update> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("stopped before the first complete list of the cluster's objects")]
    Stopped,
    #[error("cannot start the index's thread: {0}")]
    Thread(std::io::Error),
}

impl KubernetesSource {
    /// Starts the watchers and returns once every kind has been listed, with the policy they
    /// make; it follows the cluster until `shutdown`.
    pub async fn start(self, shutdown: CancellationToken) -> Result<PolicyWatch, WatchError> {
        self.start_tracked(shutdown, &TaskTracker::new()).await
    }

    /// [`start`](Self::start), with what must finish before the process exits (giving up the
    /// route-status Lease, so another replica takes over at once) spawned on `tasks`.
    pub async fn start_tracked(
        self,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<PolicyWatch, WatchError> {
        let mut kinds = vec![Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Namespace];
        let mut streams = vec![
            updates::<Service>(&self.client),
            updates::<EndpointSlice>(&self.client),
            updates::<Pod>(&self.client),
            updates::<Namespace>(&self.client),
        ];
        // Like Linkerd, watch routes only when the API server serves them: a watcher of a
        // missing resource would fail forever and the first sync would never complete.
        if served::<HttpRoute>(&self.client).await {
            kinds.push(Kind::HttpRoute);
            streams.push(updates::<HttpRoute>(&self.client));
        }
        if served::<GrpcRoute>(&self.client).await {
            kinds.push(Kind::GrpcRoute);
            streams.push(updates::<GrpcRoute>(&self.client));
        }
        // Without the CRD no policy can exist: every port gets its default, as with none applied.
        if served::<AuthorizationPolicyObject>(&self.client).await {
            kinds.push(Kind::AuthorizationPolicy);
            streams.push(updates::<AuthorizationPolicyObject>(&self.client));
        }
        let (synced_tx, synced_rx) = oneshot::channel();
        // Route status, only when there are routes: every replica computes it, one writes it.
        let statuses = if kinds.contains(&Kind::HttpRoute) || kinds.contains(&Kind::GrpcRoute) {
            let (tx, rx) = watch::channel(Arc::new(Pending::new()));
            let config = LeaseConfig::new(self.client.default_namespace());
            let leader = lease::elect(self.client.clone(), config, shutdown.clone(), tasks);
            tokio::spawn(status::write_statuses(
                self.client.clone(),
                leader,
                rx,
                shutdown.clone(),
            ));
            Some(tx)
        } else {
            None
        };
        // The index gets a thread of its own (driving its watchers through the runtime's handle):
        // building the policy of a large cluster is CPU work (about 0.2 s for 10,000 Services
        // and 100,000 endpoints) that must not stall the gRPC streams on the runtime's workers.
        let runtime = tokio::runtime::Handle::current();
        let index = Index::new(self.config);
        let following = follow_with_status(index, kinds, select_all(streams), synced_tx, statuses, shutdown.clone());
        std::thread::Builder::new()
            .name("pillion-k8s-index".to_string())
            .spawn(move || runtime.block_on(following))
            .map_err(WatchError::Thread)?;
        let mut synced_rx = std::pin::pin!(synced_rx);
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                synced = &mut synced_rx => return synced.map_err(|_| WatchError::Stopped),
                _ = tokio::time::sleep(SYNC_REMINDER) => {
                    tracing::info!(waited = ?started.elapsed(), "waiting for the first complete list of Services, EndpointSlices, Pods, Namespaces, routes and AuthorizationPolicies");
                }
            }
        }
    }
}

/// The index's task: apply events, publish the policy once synced.
pub async fn follow(
    index: Index,
    kinds: Vec<Kind>,
    updates: impl Stream<Item = Update> + Unpin,
    synced: oneshot::Sender<PolicyWatch>,
    shutdown: CancellationToken,
) {
    follow_with_status(index, kinds, updates, synced, None, shutdown).await
}

/// [`follow`], also publishing the routes whose status should change to `statuses`.
pub async fn follow_with_status(
    mut index: Index,
    kinds: Vec<Kind>,
    mut updates: impl Stream<Item = Update> + Unpin,
    synced: oneshot::Sender<PolicyWatch>,
    statuses: Option<watch::Sender<Arc<Pending>>>,
    shutdown: CancellationToken,
) {
    let mut synced = Some(synced);
    let mut publisher: Option<watch::Sender<Arc<Policy>>> = None;
    loop {
        let first = tokio::select! {
            update = updates.next() => update,
            _ = shutdown.cancelled() => return,
        };
        let Some(first) = first else { return };
        let mut changed = first(&mut index);
        // Coalesce: whatever else is already waiting goes into the same publication.
        while let Some(Some(update)) = updates.next().now_or_never() {
            changed |= update(&mut index);
        }
        if !changed || !index.is_synced(&kinds) {
            continue;
        }
        if let Some(statuses) = &statuses {
            let pending = status::pending(&index);
            statuses.send_if_modified(|current| {
                if **current == pending {
                    return false;
                }
                *current = Arc::new(pending);
                true
            });
        }
        let policy = index.policy();
        match &publisher {
            Some(tx) => {
                tx.send_if_modified(|current| {
                    if **current == policy {
                        return false;
                    }
                    *current = Arc::new(policy);
                    true
                });
            }
            None => {
                tracing::info!(
                    destinations = policy.destinations.len(),
                    rejected = index.rejected().len(),
                    "cluster listed; serving its policy"
                );
                let (tx, rx) = watch::channel(Arc::new(policy));
                publisher = Some(tx);
                if let Some(synced) = synced.take() {
                    let _ = synced.send(PolicyWatch::from_receiver(rx));
                }
            }
        }
    }
}

/// One kind's watcher, as index updates; errors are logged (the watcher relists with backoff).
fn updates<K>(client: &Client) -> Updates
where
    K: Indexed + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .filter_map(|event| async move {
            match event {
                Ok(event) => Some(Box::new(move |index: &mut Index| index.apply(event)) as Update),
                Err(e) => {
                    tracing::warn!(kind = ?K::KIND, error = %e, "watch failed; retrying with backoff, the last known objects stay served");
                    None
                }
            }
        });
    Box::pin(stream)
}

/// Whether an optional kind (a CRD) can be listed: `false` only when the API server says it has
/// none (404).
async fn served<K>(client: &Client) -> bool
where
    K: Indexed + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    let listed = api.list(&ListParams::default().limit(1)).await;
    let missing = matches!(listed, Err(kube::Error::Api(status)) if status.code == 404);
    if missing {
        let dt = K::DynamicType::default();
        let (api_version, kind) = (K::api_version(&dt), K::kind(&dt));
        tracing::warn!(
            "the API server does not serve {api_version} {kind}s; they are not watched (install their CRD and restart)"
        );
    }
    !missing
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;

    fn service(name: &str, ip: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": { "namespace": "shop", "name": name },
            "spec": { "clusterIP": ip, "ports": [{ "port": 80 }] },
        }))
        .unwrap()
    }

    fn update<K: Indexed + Send + 'static>(event: Event<K>) -> Update {
        Box::new(move |index: &mut Index| index.apply(event))
    }

    #[tokio::test]
    async fn publishes_once_every_kind_is_listed_then_each_change() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (synced_tx, mut synced_rx) = oneshot::channel();
        let shutdown = CancellationToken::new();
        let config = IndexConfig {
            cluster_domain: "cluster.local".to_string(),
            trust_domain: "cluster.local".to_string(),
            default_inbound: Default::default(),
        };
        let task = tokio::spawn(follow(
            Index::new(config),
            vec![Kind::Service, Kind::Pod],
            UnboundedReceiverStream::new(rx),
            synced_tx,
            shutdown.clone(),
        ));
        for u in [
            update(Event::<Service>::Init),
            update(Event::InitApply(service("web", "10.96.0.10"))),
            update(Event::<Service>::InitDone),
        ] {
            tx.send(u).unwrap();
        }
        tokio::task::yield_now().await;
        // Services alone are not the cluster: their endpoints' identities come from Pods.
        assert!(synced_rx.try_recv().is_err());
        tx.send(update(Event::<Pod>::Init)).unwrap();
        tx.send(update(Event::<Pod>::InitDone)).unwrap();
        let policy = synced_rx.await.unwrap();
        assert_eq!(policy.current().destinations.len(), 2);

        let mut changes = policy.subscribe();
        changes.borrow_and_update();
        // Two events that arrive together are one publication.
        tx.send(update(Event::Apply(service("api", "10.96.0.11")))).unwrap();
        tx.send(update(Event::Delete(service("web", "10.96.0.10")))).unwrap();
        changes.changed().await.unwrap();
        let names: Vec<String> = changes
            .borrow_and_update()
            .destinations
            .keys()
            .map(|k| k.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(names, ["10.96.0.11:80", "api.shop.svc.cluster.local:80"]);
        shutdown.cancel();
        task.await.unwrap();
    }
}
