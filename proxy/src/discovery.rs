//! Discovery: what the control plane says about a destination (by name or by `ip:port`): whether
//! it is known, its routes compiled into the same matcher as the route file's, its endpoints with
//! their identities, and (for this workload's own ports) inbound authorization. One
//! `Discovery.Watch` stream per destination, kept open while anyone uses it.
//!
//! Requests never touch a process-wide lock. A connection takes a [`Handle`] to its destination
//! once (that is the only time the shared map is locked) and every request reads the handle's
//! current answer, a `watch` receiver: an update applies to the next request on every open
//! connection.
//!
//! The first handle to a destination opens its stream; lookups in the first `first_answer_wait`
//! wait for the first answer, later ones read whatever is known without waiting. When the control
//! plane is unreachable the last known answer stays in force (streams reconnect with backoff).
//!
//! Streams are bounded: each costs a stream on the control plane, and the app chooses how many
//! distinct destinations it dials (a port scan would otherwise open one per port, forever). A
//! destination no connection holds and nobody asked for in `idle_timeout` is dropped; at
//! `max_destinations`, the least recently used one makes room (unused ones first). A connection
//! whose destination was made room for takes a fresh handle on its next request.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use pillion_api::{
    policy::{
        convert::{authorization_from_proto, destination_from_update},
        model::Authority,
    },
    proto::{DestinationUpdate, WatchRequest, discovery_client::DiscoveryClient},
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tonic::transport::Channel;

use crate::{authz::Authorization, http::metrics::HttpMetrics, policy, tls::spiffe::SpiffeId};

/// What the control plane says about one destination, compiled for use per request.
#[derive(Default)]
pub struct Target {
    /// Routes, retry budget and endpoints, when the control plane knows the destination:
    /// compiled exactly as the same destination in the local route file would be.
    pub routes: Option<Arc<policy::Destination>>,
    /// For this workload's own port: who may connect (`None`: the proxy's own default applies).
    pub authorization: Option<Authorization>,
}

impl Target {
    /// The identity the control plane expects at `address`.
    pub fn identity(&self, address: SocketAddr) -> Option<&SpiffeId> {
        self.routes.as_ref()?.identity(address)
    }
}

/// How long to wait for answers and how many destinations to follow.
#[derive(Clone, Copy, Debug)]
pub struct DiscoverySettings {
    pub first_answer_wait: Duration,
    pub max_destinations: usize,
    /// A destination nobody holds and nobody looked up for this long is dropped (stream closed).
    pub idle_timeout: Duration,
}

/// `None` until the control plane has answered.
pub type Answer = Option<Arc<Target>>;

pub struct Discovery {
    /// `None` only in tests, where answers are set by hand.
    client: Option<DiscoveryClient<Channel>>,
    /// Locked only to take a handle, never per request.
    watches: Mutex<HashMap<Authority, Watch>>,
    settings: DiscoverySettings,
    /// Route metrics for the routes the control plane sends.
    metrics: Arc<HttpMetrics>,
    /// Destinations currently followed (`pillion_discovery_destinations`).
    destinations: Gauge,
}

/// One followed destination.
struct Watch {
    tx: watch::Sender<Answer>,
    /// Lookups before this instant wait for the first answer; later ones don't.
    first_wait_until: Instant,
    last_used: Instant,
    follower: Option<AbortHandle>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Dropping a destination closes its stream on the control plane.
        if let Some(follower) = &self.follower {
            follower.abort();
        }
    }
}

/// A connection's view of one destination: reading it costs no shared lock.
#[derive(Clone)]
pub struct Handle {
    rx: watch::Receiver<Answer>,
    first_wait_until: Instant,
}

impl Handle {
    /// The latest answer, without waiting.
    pub fn latest(&self) -> Answer {
        self.rx.borrow().clone()
    }

    /// The answer, when one is due without waiting: `None` while the first answer is still
    /// awaited inside its window.
    pub fn settled(&self) -> Option<Answer> {
        let answer = self.latest();
        if answer.is_none() && Instant::now() < self.first_wait_until {
            return None;
        }
        Some(answer)
    }

    /// The answer, waiting for the first one until the end of its window.
    pub async fn resolve(&mut self) -> Answer {
        if self.rx.borrow().is_none() && Instant::now() < self.first_wait_until {
            let _ = tokio::time::timeout_at(self.first_wait_until, self.rx.wait_for(Option::is_some)).await;
        }
        self.latest()
    }

    /// Whether discovery stopped following this destination (made room for another): the
    /// holder should take a fresh handle rather than keep a frozen answer.
    pub fn is_dropped(&self) -> bool {
        self.rx.has_changed().is_err()
    }
}

/// A holder's handle to one destination (a connection's, kept across its requests). If
/// discovery drops the destination to make room, the next use follows it again starting from the
/// answer last seen, so the last known state stays in force (never a fall back to plaintext).
pub struct Held {
    destination: Authority,
    handle: Option<Handle>,
}

impl Held {
    pub fn new(discovery: &Discovery, destination: Authority) -> Self {
        let handle = discovery.handle(&destination);
        Held { destination, handle }
    }

    /// A holder of `handle`, taken already (by whoever decided the connection's protocol).
    pub fn from_handle(destination: Authority, handle: Handle) -> Self {
        Held {
            destination,
            handle: Some(handle),
        }
    }

    /// The current handle, followed again if it was dropped.
    pub fn handle(&mut self, discovery: &Discovery) -> Option<&Handle> {
        if self.handle.as_ref().is_none_or(Handle::is_dropped) {
            let seed = self.handle.as_ref().and_then(Handle::latest);
            self.handle = discovery.handle_seeded(&self.destination, seed);
        }
        self.handle.as_ref()
    }
}

impl DiscoverySettings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        DiscoverySettings {
            first_answer_wait: Duration::from_secs(1),
            max_destinations: config.discovery_max_destinations,
            idle_timeout: config.discovery_idle_timeout,
        }
    }
}

impl Discovery {
    /// Follows destinations over `channel`; a background task drops the unused ones.
    pub fn new(
        channel: Channel,
        settings: DiscoverySettings,
        metrics: Arc<HttpMetrics>,
        destinations: Gauge,
    ) -> Arc<Self> {
        let discovery = Arc::new(Discovery {
            client: Some(DiscoveryClient::new(channel)),
            watches: Mutex::default(),
            settings,
            metrics,
            destinations,
        });
        tokio::spawn(evict_unused(Arc::downgrade(&discovery)));
        discovery
    }

    /// A handle to `destination`, following it if nobody does yet. Locks the shared map once.
    pub fn handle(&self, destination: &Authority) -> Option<Handle> {
        self.handle_seeded(destination, None)
    }

    /// A handle to the destination `ip:port`.
    pub fn handle_addr(&self, addr: SocketAddr) -> Option<Handle> {
        self.handle(&Authority::from(addr))
    }

    /// [`handle`](Self::handle) for a holder whose handle was dropped ([`Held`]): a destination
    /// followed anew starts from `seed`, the answer the dropped handle last saw.
    pub fn handle_seeded(&self, destination: &Authority, seed: Answer) -> Option<Handle> {
        let mut watches = lock(&self.watches);
        let now = Instant::now();
        if !watches.contains_key(destination) {
            self.make_room(&mut watches, now);
            watches.insert(destination.clone(), self.start(destination, now, seed));
            self.destinations.set(watches.len() as i64);
        }
        let watch = watches.get_mut(destination)?;
        watch.last_used = now;
        Some(Handle {
            rx: watch.tx.subscribe(),
            first_wait_until: watch.first_wait_until,
        })
    }

    /// The latest answer for `addr`, waiting for the first one at most `first_answer_wait`.
    /// For one-off decisions (an opaque connection); a connection that asks again per request
    /// holds a [`Handle`] instead.
    pub async fn lookup(&self, addr: SocketAddr) -> Answer {
        self.handle_addr(addr)?.resolve().await
    }

    /// Opens the stream for a new destination.
    fn start(&self, destination: &Authority, now: Instant, seed: Answer) -> Watch {
        let (tx, _) = watch::channel(seed);
        let follower = self.client.clone().map(|client| {
            let metrics = self.metrics.clone();
            tokio::spawn(follow(client, destination.clone(), tx.clone(), metrics)).abort_handle()
        });
        Watch {
            tx,
            first_wait_until: now + self.settings.first_answer_wait,
            last_used: now,
            follower,
        }
    }

    /// Before adding a destination at the limit: drop the unused ones, else the least recently
    /// used one nobody holds, else the least recently used.
    fn make_room(&self, watches: &mut HashMap<Authority, Watch>, now: Instant) {
        if watches.len() < self.settings.max_destinations {
            return;
        }
        self.drop_unused(watches, now);
        while watches.len() >= self.settings.max_destinations.max(1) {
            let oldest = watches
                .iter()
                .min_by_key(|(_, w)| (w.tx.receiver_count() > 0, w.last_used))
                .map(|(a, _)| a.clone());
            match oldest {
                Some(oldest) => watches.remove(&oldest),
                None => break,
            };
        }
    }

    fn drop_unused(&self, watches: &mut HashMap<Authority, Watch>, now: Instant) {
        let idle = self.settings.idle_timeout;
        watches.retain(|_, w| w.tx.receiver_count() > 0 || now.saturating_duration_since(w.last_used) < idle);
        self.destinations.set(watches.len() as i64);
    }

    /// A discovery whose answers are set by [`answer`](Self::answer) instead of a control plane.
    #[cfg(test)]
    pub fn for_test(settings: DiscoverySettings) -> Arc<Self> {
        Arc::new(Discovery {
            client: None,
            watches: Mutex::default(),
            settings,
            metrics: Arc::new(HttpMetrics::register(
                &mut prometheus_client::registry::Registry::default(),
            )),
            destinations: Gauge::default(),
        })
    }

    /// Sets the answer for `destination` as a control plane would; false if it is not followed.
    #[cfg(test)]
    pub fn answer(&self, destination: &Authority, target: Target) -> bool {
        let watches = self.watches.lock().unwrap();
        watches
            .get(destination)
            .map(|w| w.tx.send_replace(Some(Arc::new(target))))
            .is_some()
    }

    #[cfg(test)]
    fn followed(&self) -> usize {
        self.watches.lock().unwrap().len()
    }
}

/// Drops destinations nobody uses, until the discovery itself is gone.
async fn evict_unused(discovery: Weak<Discovery>) {
    let period = match discovery.upgrade() {
        Some(d) => (d.settings.idle_timeout / 4).max(Duration::from_secs(1)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(discovery) = discovery.upgrade() else {
            return;
        };
        discovery.drop_unused(&mut lock(&discovery.watches), Instant::now());
    }
}

/// Follows one destination's stream until it is dropped, reconnecting on failure.
async fn follow(
    mut client: DiscoveryClient<Channel>,
    destination: Authority,
    tx: watch::Sender<Answer>,
    metrics: Arc<HttpMetrics>,
) {
    let name = destination.to_string();
    let mut failures = 0u32;
    loop {
        let stream = client.watch(WatchRequest {
            destination: name.clone(),
        });
        match stream.await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            failures = 0;
                            let previous = tx.borrow().clone();
                            let previous = previous.as_ref().and_then(|t| t.routes.as_deref());
                            match compile(&update, &metrics, previous) {
                                Ok(target) => {
                                    tx.send_replace(Some(Arc::new(target)));
                                }
                                // The same rules as a local file: an invalid update is refused
                                // whole and the last good answer stays in force.
                                Err(error) => tracing::warn!(
                                    destination = %name,
                                    %error,
                                    "control plane sent an invalid policy; the previous one stays in force"
                                ),
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(destination = %name, %status, "discovery stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(destination = %name, %status, "discovery watch failed"),
        }
        failures = failures.saturating_add(1);
        let delay = Duration::from_millis(250)
            .saturating_mul(1 << failures.min(6))
            .min(Duration::from_secs(10));
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
    }
}

/// An update, validated by the policy model's rules and compiled into the request matcher.
/// `previous`: the destination's last compiled version (its balancer carries over).
fn compile(
    update: &DestinationUpdate,
    metrics: &HttpMetrics,
    previous: Option<&policy::Destination>,
) -> Result<Target, String> {
    let authorization = match &update.inbound_authorization {
        Some(a) => authorization_from_proto(a)?,
        None => None,
    };
    let Some(destination) = destination_from_update(update)? else {
        return Ok(Target {
            authorization,
            ..Target::default()
        });
    };
    let mut routes = policy::Destination::compile(destination, metrics, previous)?;
    // Endpoints that all went away leave a destination with none, not one without endpoints:
    // its requests get 503 at once instead of going to the original address, which (a
    // ClusterIP) could lead in plaintext to a meshed pod discovery has not told us about yet.
    if routes.balancer.is_none()
        && let Some(balancer) = previous.and_then(|p| p.balancer.clone())
    {
        balancer.update(&[]);
        routes.balancer = Some(balancer);
    }
    Ok(Target {
        routes: Some(Arc::new(routes)),
        authorization,
    })
}

/// A poisoned lock (a panic elsewhere while holding it) still guards consistent data here: every
/// critical section is a map or slot update. Treating it as "no answer" would mean plaintext.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
