//! The balancers' metrics, per destination: endpoints by state, requests per endpoint, how long
//! picks queued for a usable endpoint and how many gave up. All read at scrape time from the live
//! balancers (a pick touches only its balancer's own atomics).
//!
//! Labels are bounded: a destination is one the route file names or one discovery follows (at
//! most `PILLION_DISCOVERY_MAX_DESTINATIONS`), and per-endpoint series stop at
//! [`MAX_ENDPOINT_SERIES`] a destination (the state gauges still count every endpoint).

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex, Weak},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::{Balancer, StateCounts};

/// Per-endpoint request series kept for one destination.
pub const MAX_ENDPOINT_SERIES: usize = 100;

/// The balancers alive now, by destination; balancers enter when made and leave when dropped.
#[derive(Clone, Debug, Default)]
pub struct Balancers {
    live: Arc<Mutex<Vec<Listed>>>,
}

/// A destination's name and its balancer, not kept alive by being listed.
type Listed = (Arc<str>, Weak<Balancer>);

/// The registry's handle on every balancer: made where routes are compiled (so it lives in
/// [`crate::http::metrics::HttpMetrics`]), read by the scrape.
#[derive(Clone, Debug)]
pub struct BalanceMetrics {
    pub balancers: Balancers,
}

impl BalanceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let balancers = Balancers::default();
        registry.register_collector(Box::new(balancers.clone()));
        BalanceMetrics { balancers }
    }
}

impl Balancers {
    /// Lists a new balancer under its destination's name (dead entries are swept here).
    pub fn add(&self, destination: &str, balancer: &Arc<Balancer>) {
        let mut live = lock(&self.live);
        live.retain(|(_, b)| b.strong_count() > 0);
        live.push((destination.into(), Arc::downgrade(balancer)));
    }

    /// The live balancers, one per destination name (the first listed wins: a name both the
    /// route file and the control plane know shows one of the two).
    fn snapshot(&self) -> Vec<(Arc<str>, Arc<Balancer>)> {
        let live = lock(&self.live);
        let mut seen = HashSet::new();
        live.iter()
            .filter_map(|(name, b)| Some((name.clone(), b.upgrade()?)))
            .filter(|(name, _)| seen.insert(name.clone()))
            .collect()
    }
}

impl Collector for Balancers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let balancers = self.snapshot();
        if balancers.is_empty() {
            // No empty families: nothing is balanced yet.
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "balancer_endpoints",
            "Endpoints of each balanced destination by state: ready (in rotation), backoff (out after consecutive failures), probing (one request decides)",
            None,
            MetricType::Gauge,
        )?;
        for (name, balancer) in &balancers {
            let StateCounts {
                ready,
                backoff,
                probing,
            } = balancer.state_counts();
            for (state, n) in [("ready", ready), ("backoff", backoff), ("probing", probing)] {
                let labels = [("destination", &**name), ("state", state)];
                ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "balancer_endpoint_requests",
            "Requests (or opaque connections) sent to each endpoint since it joined its destination",
            None,
            MetricType::Counter,
        )?;
        for (name, balancer) in &balancers {
            for endpoint in balancer.endpoints().into_iter().take(MAX_ENDPOINT_SERIES) {
                let address = endpoint.address.to_string();
                let labels = [("destination", &**name), ("endpoint", address.as_str())];
                ConstCounter::new(endpoint.requests).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "balancer_queue",
            "How long requests (or opaque connections) that found no usable endpoint waited for one",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (name, balancer) in &balancers {
            let labels = [("destination", &**name)];
            balancer.queue_time().encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "balancer_no_healthy_endpoint",
            "Requests answered 503 (and opaque connections reset) because no endpoint was usable within the destination's queue time",
            None,
            MetricType::Counter,
        )?;
        for (name, balancer) in &balancers {
            let labels = [("destination", &**name)];
            ConstCounter::new(balancer.failed_fast()).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The list is whole whatever panicked while holding it.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
