//! The per-destination endpoint balancer: which of a destination's endpoints a request (or an
//! opaque connection) goes to, with failure accrual taking failing endpoints out of rotation.
//!
//! **Choice.** Power of two choices over a peak-EWMA latency estimate (Finagle's and Linkerd's
//! balancer): two distinct endpoints are drawn uniformly at random and the cheaper one is taken,
//! where cost = peak-EWMA RTT × (requests in flight + 1) / weight. With one endpoint it is taken;
//! with two, both are compared. Weights live in the cost rather than in the draw (as Linkerd
//! does): a weight is capacity, so under concurrent load an endpoint of weight 3 carries about
//! three times the requests in flight, and so the requests, of one of weight 1 at equal latency;
//! at low concurrency latency decides. A new endpoint starts at `default_rtt` so it gets
//! traffic; an estimate decays towards zero while no response arrives, so a slow endpoint is
//! retried after a while (time constant `decay`).
//!
//! **Failure accrual** (Linkerd's consecutive-failures model): `consecutive_failures` failures in
//! a row take an endpoint out of rotation for a jittered backoff that doubles on each failed probe
//! (`min_backoff` to `max_backoff`). When it ends, the endpoint admits exactly one probe request at
//! a time: success puts it back in rotation, failure backs it off again. A success anywhere resets
//! the count. While an endpoint is out, only its probe's outcome changes its state; requests sent
//! before the trip still complete and count for latency.
//!
//! **Why not `tower::balance`.** tower's `p2c::Balance` balances over a `Discover` stream of
//! per-endpoint `Service`s and needs `&mut self` with `poll_ready` before each call, so sharing
//! one between connections means a `Buffer` task and a channel hop per request; our upstream is
//! one connection pool keyed by address and security, not a service per endpoint. tower's
//! `PeakEwma` keeps its estimate behind a mutex per endpoint, and tower has no failure accrual.
//! Here a pick is a function of shared state: the endpoint list behind an [`ArcSwap`] (replaced
//! whole on a discovery update), statistics in atomics, so picks from every connection proceed
//! without a lock and without allocating.
//!
//! **Lifecycle.** [`Balancer::pick`] returns a [`Picked`] handle; the caller reports the outcome
//! with [`Picked::complete`] (latency, and whether it counts as a failure: the caller decides,
//! e.g. a connect error or a 5xx) or drops it (cancelled: no longer in flight, no sample).
//! [`Balancer::update`] keeps the statistics of addresses that remain; a handle to a removed
//! endpoint completes harmlessly into statistics no one reads any more.

mod endpoint;
pub mod metrics;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, hash_map::Entry},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::{ArcSwap, Guard};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::time::Instant;

pub use self::endpoint::{BACKOFF_JITTER, EndpointState};
use self::endpoint::{Clock, Stats, Tuning, Usable};
use crate::policy::Endpoint;

/// Linkerd's default: what a new endpoint is assumed to answer in until it has answered.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Queue-time buckets (seconds): up to the longest queue time a destination may set.
const QUEUE_BUCKETS: [f64; 8] = [0.001, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 60.0];

/// Linkerd's default time constant of the latency estimate.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// When an endpoint leaves rotation, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureAccrual {
    /// Failures in a row that take an endpoint out of rotation; 0 turns accrual off.
    pub consecutive_failures: u32,
    /// The first backoff (before jitter).
    pub min_backoff: Duration,
    /// No backoff is longer, jitter included.
    pub max_backoff: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalancerSettings {
    /// The latency estimate of an endpoint that has not answered yet.
    pub default_rtt: Duration,
    /// Time constant of the peak-EWMA: how fast an estimate forgets a past sample.
    pub decay: Duration,
    pub failure_accrual: FailureAccrual,
}

/// Why no endpoint could be picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    /// The destination has no endpoints (or only weight-0 ones).
    #[error("the destination has no endpoints")]
    NoEndpoints,
    /// Every endpoint is out of rotation: in backoff, or probing with its one probe out.
    #[error("no healthy endpoint: {backoff} in failure backoff, {probing} probing")]
    Unavailable {
        /// When the earliest backoff ends; `None` when every endpoint is waiting for a probe's
        /// answer instead.
        next_ready: Option<Instant>,
        backoff: usize,
        probing: usize,
    },
}

/// The balancer of one destination; shared (`Arc`) by every connection to it.
pub struct Balancer {
    list: ArcSwap<List>,
    /// How long picks that had to wait waited (those that did not are not observed: the
    /// histogram's lock stays off the fast path).
    queued: Histogram,
    /// Picks given up after the queue time: requests answered 503, connections reset.
    failed_fast: Counter,
    settings: BalancerSettings,
    tuning: Tuning,
    default_rtt: Duration,
    /// Serialises updates, so two at once cannot both create statistics for the same address.
    updating: Mutex<()>,
}

/// One request's endpoint. Report the outcome with [`Picked::complete`]; dropping it instead
/// means the request was cancelled.
pub struct Picked {
    /// The list it was picked from, kept alive so the endpoint can be read without copying.
    list: Arc<List>,
    index: usize,
    probe: bool,
    /// When it was picked (ns since the balancer's epoch).
    sent: u64,
    done: bool,
}

/// Endpoints by state, for a gauge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub ready: usize,
    pub backoff: usize,
    pub probing: usize,
}

/// One endpoint's figures, for metrics and diagnostics.
#[derive(Clone, Debug)]
pub struct EndpointStatus {
    pub address: SocketAddr,
    pub weight: u32,
    pub state: EndpointState,
    /// Requests sent to it since it was added (cumulative; gone with the endpoint).
    pub requests: u64,
    pub in_flight: u32,
    pub consecutive_failures: u32,
    /// The latency estimate as of now.
    pub rtt: Duration,
    /// When its current backoff ends (or ended, while probing); `None` in rotation.
    pub backoff_ends: Option<Instant>,
}

/// A snapshot of the endpoints; replaced whole on update.
struct List {
    slots: Vec<Slot>,
    tuning: Tuning,
}

struct Slot {
    endpoint: Endpoint,
    stats: Arc<Stats>,
}

impl Default for FailureAccrual {
    fn default() -> Self {
        FailureAccrual {
            consecutive_failures: 7,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl Default for BalancerSettings {
    fn default() -> Self {
        BalancerSettings {
            default_rtt: DEFAULT_RTT,
            decay: DEFAULT_DECAY,
            failure_accrual: FailureAccrual::default(),
        }
    }
}

impl Balancer {
    /// A balancer over no endpoints yet; [`Balancer::update`] gives it some.
    pub fn new(settings: BalancerSettings) -> Self {
        let tuning = Tuning {
            clock: Clock::new(),
            decay_ns: (settings.decay.as_nanos() as f64).max(1.0),
            accrual: settings.failure_accrual,
        };
        Balancer {
            list: ArcSwap::from_pointee(List {
                slots: Vec::new(),
                tuning,
            }),
            queued: Histogram::new(QUEUE_BUCKETS),
            failed_fast: Counter::default(),
            settings,
            tuning,
            default_rtt: settings.default_rtt,
            updating: Mutex::new(()),
        }
    }

    /// Picks that waited for a usable endpoint, by how long (for a scrape).
    pub fn queue_time(&self) -> &Histogram {
        &self.queued
    }

    /// Picks given up after the queue time (for a scrape).
    pub fn failed_fast(&self) -> u64 {
        self.failed_fast.get()
    }

    /// What it was made with: a policy update with other settings needs a new balancer.
    pub fn settings(&self) -> &BalancerSettings {
        &self.settings
    }

    /// Replaces the endpoints: addresses that remain keep their statistics (latency, failures,
    /// backoff) and take the new weight and identity; new ones start fresh; removed ones are
    /// dropped (requests in flight to them finish normally). Weight-0 endpoints and repeats of an
    /// address are left out.
    pub fn update(&self, endpoints: &[Endpoint]) {
        // A poisoned lock only means an earlier update panicked; the list itself is whole.
        let _updating = self.updating.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.list.load();
        let mut known: HashMap<SocketAddr, &Arc<Stats>> =
            current.slots.iter().map(|s| (s.endpoint.address, &s.stats)).collect();
        let now = self.tuning.clock.now();
        let mut seen = HashMap::with_capacity(endpoints.len());
        let mut slots = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints.iter().filter(|e| e.weight > 0) {
            if let Entry::Vacant(first) = seen.entry(endpoint.address) {
                first.insert(());
                let stats = match known.remove(&endpoint.address) {
                    Some(stats) => stats.clone(),
                    None => Arc::new(Stats::new(self.default_rtt, now)),
                };
                slots.push(Slot {
                    endpoint: endpoint.clone(),
                    stats,
                });
            }
        }
        self.list.store(Arc::new(List {
            slots,
            tuning: self.tuning,
        }));
    }

    /// Picks the endpoint for one request: power of two choices among the endpoints in rotation
    /// (or whose backoff is over and whose probe slot is free). Lock-free, no allocation.
    pub fn pick(&self) -> Result<Picked, PickError> {
        let list = self.list.load();
        let n = list.slots.len();
        if n == 0 {
            return Err(PickError::NoEndpoints);
        }
        let now = self.tuning.clock.now();
        // Fast path: two random candidates; nearly always at least one of them is usable.
        let (a, b) = if n == 1 {
            (0, None)
        } else {
            let a = fastrand::usize(0..n);
            let b = fastrand::usize(0..n - 1);
            (a, Some(if b >= a { b + 1 } else { b }))
        };
        if let Some(picked) = self.choose(&list, now, a, b) {
            return Ok(picked);
        }
        self.pick_among_usable(list, now)
    }

    /// [`pick`](Self::pick), waiting while no endpoint is usable, for the earliest backoff to
    /// end (or a probe's answer), at most `limit`: a destination with no usable endpoint fails
    /// fast instead of hanging.
    pub async fn pick_within(&self, limit: Duration) -> Result<Picked, PickError> {
        /// While every endpoint is probing (no backoff end to wait for), how often to look again.
        const PROBE_POLL: Duration = Duration::from_millis(10);
        let mut error = match self.pick() {
            Ok(picked) => return Ok(picked),
            Err(error) => error,
        };
        let queued = Instant::now();
        let deadline = queued + limit;
        loop {
            let now = Instant::now();
            let wake = match error {
                _ if now >= deadline => break,
                PickError::Unavailable {
                    next_ready: Some(at), ..
                } => at,
                PickError::Unavailable { next_ready: None, .. } => now + PROBE_POLL,
                // Nothing will come back by waiting; an update would have to add endpoints.
                PickError::NoEndpoints => break,
            };
            tokio::time::sleep_until(wake.min(deadline).max(now)).await;
            match self.pick() {
                Ok(picked) => {
                    self.queued.observe(queued.elapsed().as_secs_f64());
                    return Ok(picked);
                }
                Err(again) => error = again,
            }
        }
        self.queued.observe(queued.elapsed().as_secs_f64());
        self.failed_fast.inc();
        Err(error)
    }

    /// Endpoints by state, for a gauge. No allocation.
    pub fn state_counts(&self) -> StateCounts {
        let list = self.list.load();
        let now = self.tuning.clock.now();
        let mut counts = StateCounts::default();
        for slot in &list.slots {
            match slot.stats.state(now) {
                EndpointState::Ready => counts.ready += 1,
                EndpointState::Backoff => counts.backoff += 1,
                EndpointState::Probing => counts.probing += 1,
            }
        }
        counts
    }

    /// Every endpoint's figures, in the order of the last update (for a metrics scrape).
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        let list = self.list.load();
        let now = self.tuning.clock.now();
        list.slots
            .iter()
            .map(|slot| EndpointStatus {
                address: slot.endpoint.address,
                weight: slot.endpoint.weight,
                state: slot.stats.state(now),
                requests: slot.stats.requests(),
                in_flight: slot.stats.in_flight(),
                consecutive_failures: slot.stats.consecutive_failures(),
                rtt: Duration::from_nanos(slot.stats.rtt_at(now, self.tuning.decay_ns) as u64),
                backoff_ends: slot.stats.backoff_until().map(|t| self.tuning.clock.instant(t)),
            })
            .collect()
    }

    /// The number of endpoints (in any state).
    pub fn len(&self) -> usize {
        self.list.load().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cheaper usable one of `a` and `b`; `None` if neither could be had.
    fn choose(&self, list: &Guard<Arc<List>>, now: u64, a: usize, b: Option<usize>) -> Option<Picked> {
        let decay = self.tuning.decay_ns;
        let usable_a = list.slots[a].stats.usable(now);
        let usable_b = b.map(|b| (b, list.slots[b].stats.usable(now)));
        let cost = |i: usize| {
            let slot = &list.slots[i];
            slot.stats.cost(slot.endpoint.weight, now, decay)
        };
        // Cheaper first; `a` was drawn at random, so ties go either way.
        let (first, second) = match (usable_a, usable_b) {
            (Usable::No { .. }, None | Some((_, Usable::No { .. }))) => return None,
            (Usable::No { .. }, Some((b, ub))) => ((b, ub), None),
            (ua, None | Some((_, Usable::No { .. }))) => ((a, ua), None),
            (ua, Some((b, ub))) if cost(b) < cost(a) => ((b, ub), Some((a, ua))),
            (ua, Some((b, ub))) => ((a, ua), Some((b, ub))),
        };
        self.take(list, now, first).or_else(|| self.take(list, now, second?))
    }

    /// Slow path, when both candidates were out of rotation: power of two choices among the
    /// usable endpoints found by a scan, or why there is none.
    fn pick_among_usable(&self, list: Guard<Arc<List>>, now: u64) -> Result<Picked, PickError> {
        let (mut usable, mut backoff, mut probing) = (0, 0, 0);
        let mut next_ready: Option<u64> = None;
        for slot in &list.slots {
            match slot.stats.usable(now) {
                Usable::Ready | Usable::Probe => usable += 1,
                Usable::No { until: Some(until) } => {
                    backoff += 1;
                    next_ready = Some(next_ready.map_or(until, |t| t.min(until)));
                }
                Usable::No { until: None } => probing += 1,
            }
        }
        if usable > 0 {
            let nth = |k: usize| {
                let mut seen = 0;
                list.slots.iter().position(|slot| {
                    let hit = !matches!(slot.stats.usable(now), Usable::No { .. });
                    if hit {
                        seen += 1;
                    }
                    hit && seen > k
                })
            };
            let a = nth(fastrand::usize(0..usable));
            let b = (usable > 1).then(|| nth(fastrand::usize(0..usable))).flatten();
            // States may change between scans; whatever is still usable is taken.
            if let Some(a) = a
                && let Some(picked) = self.choose(&list, now, a, b.filter(|&b| b != a))
            {
                return Ok(picked);
            }
        }
        Err(PickError::Unavailable {
            next_ready: next_ready.map(|t| self.tuning.clock.instant(t)),
            backoff,
            probing,
        })
    }

    /// Sends the request to endpoint `i` if it still may take it (a probe slot may have been
    /// claimed by another request meanwhile).
    fn take(&self, list: &Guard<Arc<List>>, now: u64, (i, usable): (usize, Usable)) -> Option<Picked> {
        let stats = &list.slots[i].stats;
        let probe = match usable {
            Usable::Ready => false,
            Usable::Probe => stats.claim_probe(now)?,
            Usable::No { .. } => return None,
        };
        stats.start();
        Some(Picked {
            list: Arc::clone(list),
            index: i,
            probe,
            sent: now,
            done: false,
        })
    }
}

impl Picked {
    /// The endpoint: address, expected identity, protocol hint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.list.slots[self.index].endpoint
    }

    pub fn address(&self) -> SocketAddr {
        self.endpoint().address
    }

    /// This request is the single probe of an endpoint coming out of backoff.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports the outcome: `latency` from the pick until the response (or the error), and
    /// whether the caller counts it as a failure (a connect error, a 5xx, as configured).
    pub fn complete(mut self, latency: Duration, failed: bool) {
        self.done = true;
        let list = &self.list;
        list.slots[self.index]
            .stats
            .complete(self.probe, self.sent, latency, failed, &list.tuning);
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        if !self.done {
            self.list.slots[self.index].stats.cancel(self.probe);
        }
    }
}

impl std::fmt::Debug for Picked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Picked")
            .field("address", &self.address())
            .field("probe", &self.probe)
            .finish()
    }
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("endpoints", &self.len())
            .field("tuning", &self.tuning)
            .finish()
    }
}
