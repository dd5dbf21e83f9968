//! The balancers' metrics: endpoints by state and requests per endpoint for every live
//! destination balancer, read at scrape time (a pick updates only the balancer's own atomics),
//! and how long requests queued for a usable endpoint.
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
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::Histogram,
    },
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

/// What the balance layer records per request.
#[derive(Clone, Debug)]
pub struct BalanceMetrics {
    /// Time from a request's first pick attempt to its endpoint (or to giving up).
    pub queue_time: Histogram,
    /// Requests answered 503 "no healthy endpoint" after the queue time.
    pub no_healthy_endpoint: Counter,
    pub balancers: Balancers,
}

impl BalanceMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = BalanceMetrics {
            // 0 (nearly every request) up to the longest queue time a destination may set.
            queue_time: Histogram::new([0.0, 0.001, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 60.0]),
            no_healthy_endpoint: Counter::default(),
            balancers: Balancers::default(),
        };
        registry.register_with_unit(
            "balancer_queue",
            "Time requests waited for a usable endpoint of a balanced destination",
            Unit::Seconds,
            metrics.queue_time.clone(),
        );
        registry.register(
            "balancer_no_healthy_endpoint",
            "Requests answered 503 because no endpoint of their destination was usable within its queue time",
            metrics.no_healthy_endpoint.clone(),
        );
        registry.register_collector(Box::new(metrics.balancers.clone()));
        metrics
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
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The list is whole whatever panicked while holding it.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
