//! One endpoint's live statistics, all in atomics so that picks and completions from every
//! connection share them without a lock: the peak-EWMA latency estimate, requests in flight and
//! in total, and the failure-accrual state (consecutive failures, backoff, the one probe).
//!
//! Times are nanoseconds since the balancer's epoch ([`Clock`]), so they fit an `AtomicU64`.

use std::{
    sync::atomic::{
        AtomicBool, AtomicU32, AtomicU64,
        Ordering::{AcqRel, Acquire, Relaxed, Release},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::FailureAccrual;

/// A backoff is stretched by up to this fraction at random, so endpoints that failed together
/// are not all probed at the same moment.
pub const BACKOFF_JITTER: f64 = 0.5;

const NANOS_PER_MILLI: u64 = 1_000_000;

/// The balancer's time base: `tokio::time::Instant`, so tests run on paused time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

/// What a completion needs to know besides the endpoint: fixed for a balancer's lifetime.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    pub clock: Clock,
    /// The EWMA's time constant, in nanoseconds (at least 1).
    pub decay_ns: f64,
    pub accrual: FailureAccrual,
}

/// Whether an endpoint may take a request now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usable {
    Ready,
    /// Its backoff is over and no probe is in flight: the next request to it is the probe.
    Probe,
    /// In backoff until this time (ns since the epoch), or probing with a request already out.
    No {
        until: Option<u64>,
    },
}

/// The state an endpoint is in, as the gauges count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointState {
    /// In rotation.
    Ready,
    /// Out of rotation after consecutive failures, until the backoff ends.
    Backoff,
    /// Backoff over: admits one probe request at a time; its outcome decides.
    Probing,
}

pub struct Stats {
    /// The peak-EWMA estimate and when it was last updated, packed so that both change in one
    /// compare-and-swap: high 32 bits the RTT in nanoseconds as an `f32`, low 32 bits the update
    /// time in milliseconds since the epoch (wrapping: an estimate untouched for over 24 days may
    /// be read as fresh, which only affects its ranking until its next sample).
    rtt: AtomicU64,
    in_flight: AtomicU32,
    requests: AtomicU64,
    consecutive_failures: AtomicU32,
    /// 0: in rotation. Otherwise the end of the backoff (ns since the epoch, never 0); after it
    /// the endpoint is probing.
    backoff_until: AtomicU64,
    /// Backoffs in a row without a successful probe: 1 after the trip, doubling the delay each.
    backoffs: AtomicU32,
    /// A probe request is out.
    probing: AtomicBool,
}

impl Clock {
    pub fn new() -> Self {
        Clock { epoch: Instant::now() }
    }

    /// Nanoseconds since the epoch.
    pub fn now(&self) -> u64 {
        // u64 nanoseconds last 584 years.
        Instant::now().saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub fn instant(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new(default_rtt: Duration, now: u64) -> Self {
        Stats {
            rtt: AtomicU64::new(pack(default_rtt.as_secs_f64() * 1e9, now)),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            backoff_until: AtomicU64::new(0),
            backoffs: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// The load-balancing cost: the latency estimate decayed to `now`, times the requests in
    /// flight plus this one, divided by the weight (a weight-2 endpoint carries twice the load
    /// for the same cost).
    pub fn cost(&self, weight: u32, now: u64, decay_ns: f64) -> f64 {
        // A floor, so an estimate decayed to nothing still ranks by requests in flight.
        let rtt = self.rtt_at(now, decay_ns).max(1.0);
        rtt * f64::from(self.in_flight.load(Relaxed).saturating_add(1)) / f64::from(weight.max(1))
    }

    /// The estimate as of `now`: it decays towards zero while no response arrives, so an
    /// endpoint that was slow is tried again after a while.
    pub fn rtt_at(&self, now: u64, decay_ns: f64) -> f64 {
        let (rtt, stamp) = unpack(self.rtt.load(Relaxed));
        rtt * (-elapsed_ns(stamp, now) / decay_ns).exp()
    }

    pub fn usable(&self, now: u64) -> Usable {
        match self.backoff_until.load(Acquire) {
            0 => Usable::Ready,
            until if now < until => Usable::No { until: Some(until) },
            _ if self.probing.load(Acquire) => Usable::No { until: None },
            _ => Usable::Probe,
        }
    }

    pub fn state(&self, now: u64) -> EndpointState {
        match self.backoff_until.load(Acquire) {
            0 => EndpointState::Ready,
            until if now < until => EndpointState::Backoff,
            _ => EndpointState::Probing,
        }
    }

    /// Claims the one probe slot of an endpoint whose backoff is over. `Some(true)`: this
    /// request is the probe; `Some(false)`: the endpoint went back into rotation meanwhile (an
    /// ordinary request); `None`: someone else probes, or a new backoff began.
    pub fn claim_probe(&self, now: u64) -> Option<bool> {
        if self.probing.compare_exchange(false, true, AcqRel, Relaxed).is_err() {
            return None;
        }
        // Re-read under the claim: the previous probe may have finished since `usable` looked.
        match self.backoff_until.load(Acquire) {
            0 => {
                self.probing.store(false, Release);
                Some(false)
            }
            until if now < until => {
                self.probing.store(false, Release);
                None
            }
            _ => Some(true),
        }
    }

    /// Counts a request sent to this endpoint.
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
    }

    /// A request ended without an outcome (cancelled): it is no longer in flight, and a probe
    /// slot it held is free for the next request.
    pub fn cancel(&self, probe: bool) {
        self.in_flight.fetch_sub(1, Relaxed);
        if probe {
            self.probing.store(false, Release);
        }
    }

    /// A request's outcome: a latency sample, then failure accrual. The request was sent at
    /// `sent` (ns since the epoch), so it ended at `sent + latency`: one clock read per request
    /// instead of two (a read costs ~40 ns, a fifth of a decision).
    pub fn complete(&self, probe: bool, sent: u64, latency: Duration, failed: bool, tuning: &Tuning) {
        let latency_ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let now = sent.saturating_add(latency_ns);
        self.sample(latency_ns as f64, failed, now, tuning.decay_ns);
        self.in_flight.fetch_sub(1, Relaxed);
        if failed {
            self.failed(probe, now, &tuning.accrual);
        } else {
            // A success anywhere ends a run of failures. Read first: most requests succeed, and
            // a store would take the cache line from every other core picking this endpoint.
            if self.consecutive_failures.load(Relaxed) != 0 {
                self.consecutive_failures.store(0, Relaxed);
            }
            if probe {
                // Back into rotation; the next run of failures starts from the shortest backoff.
                self.backoffs.store(0, Relaxed);
                self.backoff_until.store(0, Release);
                self.probing.store(false, Release);
            }
        }
    }

    /// Peak EWMA: a slower sample replaces the estimate at once, a faster one blends in by the
    /// time since the last update. A failure never lowers the estimate: a fast error (connection
    /// refused) must not make a broken endpoint look attractive.
    fn sample(&self, sample: f64, failed: bool, now: u64, decay_ns: f64) {
        let mut current = self.rtt.load(Relaxed);
        loop {
            let (rtt, stamp) = unpack(current);
            let next = if sample >= rtt || failed {
                sample.max(rtt)
            } else {
                let kept = (-elapsed_ns(stamp, now) / decay_ns).exp();
                rtt * kept + sample * (1.0 - kept)
            };
            match self
                .rtt
                .compare_exchange_weak(current, pack(next, now), Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    fn failed(&self, probe: bool, now: u64, accrual: &FailureAccrual) {
        if probe {
            // The probe failed: out again, for twice as long (up to the cap).
            let backoffs = self.backoffs.fetch_add(1, Relaxed).saturating_add(1);
            self.backoff_until
                .store(now + accrual.backoff(backoffs).as_nanos() as u64, Release);
            self.probing.store(false, Release);
            return;
        }
        let failures = self.consecutive_failures.fetch_add(1, Relaxed).saturating_add(1);
        if accrual.consecutive_failures == 0 || failures < accrual.consecutive_failures {
            return;
        }
        // The trip. Only an endpoint in rotation trips: outcomes of requests sent before an
        // earlier trip change nothing while it is out (its probe decides).
        let until = now + accrual.backoff(1).as_nanos() as u64;
        if self.backoff_until.compare_exchange(0, until, AcqRel, Relaxed).is_ok() {
            self.backoffs.store(1, Relaxed);
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Relaxed)
    }

    /// Nanoseconds since the epoch when the backoff ends; `None` in rotation.
    pub fn backoff_until(&self) -> Option<u64> {
        Some(self.backoff_until.load(Acquire)).filter(|&until| until != 0)
    }
}

impl FailureAccrual {
    /// The delay of the `n`th backoff in a row (from 1): `min_backoff` doubled `n - 1` times, capped
    /// at `max_backoff`, then stretched at random by up to [`BACKOFF_JITTER`] (still capped).
    pub fn backoff(&self, n: u32) -> Duration {
        let max = self.max_backoff.max(self.min_backoff);
        let base = self
            .min_backoff
            .checked_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX))
            .map_or(max, |d| d.min(max));
        base.mul_f64(1.0 + BACKOFF_JITTER * fastrand::f64()).min(max)
    }
}

fn pack(rtt_ns: f64, now: u64) -> u64 {
    (u64::from((rtt_ns as f32).to_bits()) << 32) | u64::from(millis(now))
}

fn unpack(packed: u64) -> (f64, u32) {
    (f64::from(f32::from_bits((packed >> 32) as u32)), packed as u32)
}

/// Milliseconds since the epoch, wrapping (see [`Stats::rtt`]).
fn millis(ns: u64) -> u32 {
    (ns / NANOS_PER_MILLI) as u32
}

/// Time since `stamp_ms`, or 0 if the stamp is ahead of `now` (a completion is stamped with its
/// send time plus the latency the caller reported, which may run a little ahead of the clock).
fn elapsed_ns(stamp_ms: u32, now: u64) -> f64 {
    let elapsed = millis(now).wrapping_sub(stamp_ms) as i32;
    f64::from(elapsed.max(0)) * NANOS_PER_MILLI as f64
}
