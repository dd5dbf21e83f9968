//! Discovery: which destinations are meshed, with which identity, and the control plane's
//! inbound authorization, from `Discovery.Watch` streams kept open per destination.
//!
//! The first lookup of a destination opens its stream and waits briefly for the first answer;
//! every lookup in that first window waits for the same deadline, later lookups read the latest
//! state without waiting. When the control plane is unreachable the last known state stays in
//! force (and streams reconnect with backoff), so traffic keeps flowing on what was already known.
//!
//! Streams are bounded: each costs a stream on the control plane, and the app chooses how many
//! distinct `ip:port`s it dials (a port scan would otherwise open one per port, forever). A
//! destination nobody has looked at for `idle_timeout` is dropped and its stream closed; at
//! `max_destinations`, the least recently used one makes room for a new one.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use pillion_control::proto::{WatchRequest, discovery_client::DiscoveryClient};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{sync::watch, task::AbortHandle, time::Instant};
use tonic::transport::Channel;

use crate::{authz::Authorization, tls::spiffe::SpiffeId};

/// What the control plane says about one `ip:port`.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// The identity its certificate must carry; `None` = not meshed, plaintext.
    pub identity: Option<SpiffeId>,
    pub authorization: Option<Authorization>,
}

/// How long to wait for answers and how many destinations to follow.
#[derive(Clone, Copy, Debug)]
pub struct DiscoverySettings {
    pub first_answer_wait: Duration,
    pub max_destinations: usize,
    /// A destination not looked up for this long is dropped (its stream closed).
    pub idle_timeout: Duration,
}

type Answer = Option<Arc<Target>>;

pub struct Discovery {
    /// `None` only in tests, where answers are set by hand.
    client: Option<DiscoveryClient<Channel>>,
    watches: Mutex<HashMap<SocketAddr, Watch>>,
    settings: DiscoverySettings,
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
    pub fn new(channel: Channel, settings: DiscoverySettings, destinations: Gauge) -> Arc<Self> {
        let discovery = Arc::new(Discovery {
            client: Some(DiscoveryClient::new(channel)),
            watches: Mutex::default(),
            settings,
            destinations,
        });
        tokio::spawn(evict_unused(Arc::downgrade(&discovery)));
        discovery
    }

    /// The latest state for `addr`, waiting for the first answer at most `first_answer_wait`.
    pub async fn lookup(&self, addr: SocketAddr) -> Answer {
        let (mut rx, wait_until) = {
            let mut watches = self.watches.lock().ok()?;
            let now = Instant::now();
            if !watches.contains_key(&addr) {
                self.make_room(&mut watches, now);
                watches.insert(addr, self.start(addr, now));
                self.destinations.set(watches.len() as i64);
            }
            let watch = watches.get_mut(&addr)?;
            watch.last_used = now;
            (watch.tx.subscribe(), watch.first_wait_until)
        };
        if rx.borrow().is_none() && Instant::now() < wait_until {
            let _ = tokio::time::timeout_at(wait_until, rx.wait_for(Option::is_some)).await;
        }
        rx.borrow().clone()
    }

    /// The latest state for `addr` without waiting; `None` until the control plane has answered.
    /// A destination not followed (dropped while unused, or made room for) is followed again, so
    /// a caller that only ever asks this way (a long-lived connection's per-request check) gets
    /// its answer back as soon as the control plane gives it.
    pub fn latest(&self, addr: SocketAddr) -> Answer {
        let mut watches = self.watches.lock().ok()?;
        let now = Instant::now();
        if !watches.contains_key(&addr) {
            self.make_room(&mut watches, now);
            watches.insert(addr, self.start(addr, now));
            self.destinations.set(watches.len() as i64);
            return None;
        }
        let watch = watches.get_mut(&addr)?;
        watch.last_used = now;
        watch.tx.borrow().clone()
    }

    /// What [`lookup`](Self::lookup) would return, when it would return at once: `None` when a
    /// lookup is needed (`addr` is not followed, or is still in its first wait for an answer).
    pub fn settled(&self, addr: SocketAddr) -> Option<Answer> {
        let mut watches = self.watches.lock().ok()?;
        let watch = watches.get_mut(&addr)?;
        let now = Instant::now();
        watch.last_used = now;
        let answer = watch.tx.borrow().clone();
        if answer.is_none() && now < watch.first_wait_until {
            return None;
        }
        Some(answer)
    }

    /// Opens the stream for a new destination.
    fn start(&self, addr: SocketAddr, now: Instant) -> Watch {
        let (tx, _) = watch::channel(None);
        let follower = self
            .client
            .clone()
            .map(|client| tokio::spawn(follow(client, addr, tx.clone())).abort_handle());
        Watch {
            tx,
            first_wait_until: now + self.settings.first_answer_wait,
            last_used: now,
            follower,
        }
    }

    /// Before adding a destination at the limit: drop the unused ones, else the least recently used.
    fn make_room(&self, watches: &mut HashMap<SocketAddr, Watch>, now: Instant) {
        if watches.len() < self.settings.max_destinations {
            return;
        }
        self.drop_unused(watches, now);
        while watches.len() >= self.settings.max_destinations.max(1) {
            let Some(oldest) = watches.iter().min_by_key(|(_, w)| w.last_used).map(|(a, _)| *a) else {
                break;
            };
            watches.remove(&oldest);
        }
    }

    fn drop_unused(&self, watches: &mut HashMap<SocketAddr, Watch>, now: Instant) {
        let idle = self.settings.idle_timeout;
        watches.retain(|_, w| now.saturating_duration_since(w.last_used) < idle);
        self.destinations.set(watches.len() as i64);
    }

    /// A discovery whose answers are set by [`answer`](Self::answer) instead of a control plane.
    #[cfg(test)]
    pub fn for_test(settings: DiscoverySettings) -> Arc<Self> {
        Arc::new(Discovery {
            client: None,
            watches: Mutex::default(),
            settings,
            destinations: Gauge::default(),
        })
    }

    /// Sets the answer for `addr` as a control plane would; false if `addr` is not followed.
    #[cfg(test)]
    pub fn answer(&self, addr: SocketAddr, target: Target) -> bool {
        let watches = self.watches.lock().unwrap();
        watches
            .get(&addr)
            .map(|w| w.tx.send_replace(Some(Arc::new(target))))
            .is_some()
    }

    #[cfg(test)]
    fn followed(&self) -> usize {
        self.watches.lock().unwrap().len()
    }
}

/// Drops destinations nobody looked up for `idle_timeout`, until the discovery itself is gone.
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
        if let Ok(mut watches) = discovery.watches.lock() {
            discovery.drop_unused(&mut watches, Instant::now());
        }
    }
}

/// Follows one destination's stream until it is dropped, reconnecting on failure.
async fn follow(mut client: DiscoveryClient<Channel>, addr: SocketAddr, tx: watch::Sender<Answer>) {
    let destination = addr.to_string();
    let mut failures = 0u32;
    loop {
        let stream = client.watch(WatchRequest {
            destination: destination.clone(),
        });
        match stream.await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            failures = 0;
                            let identity = update
                                .endpoints
                                .iter()
                                .find(|e| e.address.parse::<SocketAddr>().ok() == Some(addr))
                                .and_then(|e| SpiffeId::parse(&e.identity).ok());
                            let authorization = update
                                .inbound_authorization
                                .as_ref()
                                .and_then(Authorization::from_proto);
                            tx.send_replace(Some(Arc::new(Target {
                                identity,
                                authorization,
                            })));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%destination, %status, "discovery stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(%destination, %status, "discovery watch failed"),
        }
        failures = failures.saturating_add(1);
        let delay = Duration::from_millis(250)
            .saturating_mul(1 << failures.min(6))
            .min(Duration::from_secs(10));
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max: usize) -> DiscoverySettings {
        DiscoverySettings {
            first_answer_wait: Duration::from_millis(100),
            max_destinations: max,
            idle_timeout: Duration::from_secs(60),
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_first_window_waits_for_an_answer() {
        let d = Discovery::for_test(settings(10));
        let start = Instant::now();
        assert!(d.lookup(addr(80)).await.is_none());
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // The control plane is still silent: later lookups don't wait again.
        let again = Instant::now();
        assert!(d.lookup(addr(80)).await.is_none());
        assert_eq!(again.elapsed(), Duration::ZERO);
        assert!(matches!(d.settled(addr(80)), Some(None)));
        assert!(d.settled(addr(81)).is_none());
        // In its first window, a new destination is not settled: a lookup would wait.
        tokio::spawn({
            let d = d.clone();
            async move { d.lookup(addr(82)).await }
        });
        tokio::task::yield_now().await;
        assert!(d.settled(addr(82)).is_none());
        assert!(d.answer(addr(82), Target::default()));
        assert!(matches!(d.settled(addr(82)), Some(Some(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_scan_is_bounded_and_unused_destinations_are_dropped() {
        let d = Discovery::for_test(settings(8));
        for port in 1..=100 {
            d.lookup(addr(port)).await;
        }
        assert_eq!(d.followed(), 8);
        // The most recent ones stayed.
        assert!(d.settled(addr(100)).is_some() && d.settled(addr(1)).is_none());

        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(d.settled(addr(99)).is_some(), "used again: kept");
        tokio::time::advance(Duration::from_secs(31)).await;
        d.drop_unused(&mut d.watches.lock().unwrap(), Instant::now());
        assert_eq!(d.followed(), 1);
        assert!(d.settled(addr(99)).is_some());
        assert_eq!(d.destinations.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_destination_asked_for_again_is_followed_again() {
        let d = Discovery::for_test(settings(2));
        d.lookup(addr(443)).await;
        assert!(d.answer(addr(443), Target::default()));
        assert!(d.latest(addr(443)).is_some());
        // Later, the app dials two other destinations: 443, now the least recently used, makes
        // room and is no longer followed. (Without the pause, 443 and 1 were last used at the
        // same paused instant and which one made room depended on the map's order.)
        tokio::time::advance(Duration::from_millis(1)).await;
        d.lookup(addr(1)).await;
        d.lookup(addr(2)).await;
        assert!(d.settled(addr(443)).is_none());
        // A per-request check finds nothing yet (fail closed), but follows it again.
        assert!(d.latest(addr(443)).is_none());
        assert!(d.answer(addr(443), Target::default()), "followed again");
        assert!(d.latest(addr(443)).is_some());
        assert_eq!(d.followed(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_background_task_drops_unused_destinations() {
        let d = Discovery::for_test(settings(8));
        tokio::spawn(evict_unused(Arc::downgrade(&d)));
        d.lookup(addr(1)).await;
        assert_eq!(d.followed(), 1);
        tokio::time::sleep(Duration::from_secs(80)).await;
        assert_eq!(d.followed(), 0);
    }
}
