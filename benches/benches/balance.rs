//! The endpoint balancer (`pillion_proxy::balance`): one balancing decision, and a discovery
//! update, at 3, 100 and 1,000 endpoints.
//!
//! - `balance/pick_complete/N`: `Balancer::pick` + `Picked::complete` for one request, all
//!   endpoints in rotation with latencies spread from 1 ms to 2 ms (the steady state: two random
//!   candidates, costs compared, counters and the latency estimate updated).
//! - `balance/pick_complete_half_in_backoff/N`: the same with every other endpoint out of
//!   rotation, so a quarter of the picks draw two unusable candidates and fall back to a scan.
//! - `balance_update/N`: `Balancer::update` with the same N endpoints (what a discovery update
//!   that changes nothing costs: the new list is built and swapped in, statistics carried over).

use std::{hint::black_box, net::SocketAddr, time::Duration};

use criterion::{BenchmarkId, criterion_group, criterion_main};
use pillion_benches::Bench;
use pillion_proxy::{
    balance::{Balancer, BalancerSettings},
    policy::Endpoint,
};

// The allocator the `pillion-proxy` binary ships with, so allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

const SIZES: [usize; 3] = [3, 100, 1_000];

fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| Endpoint {
            address: SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
            identity: None,
            weight: 1,
            protocol: Default::default(),
        })
        .collect()
}

/// An endpoint's simulated latency: 1 ms to 2 ms across the list.
fn latency(address: SocketAddr, n: usize) -> Duration {
    let SocketAddr::V4(v4) = address else {
        unreachable!("the bench's addresses are IPv4")
    };
    let [_, _, hi, lo] = v4.ip().octets();
    let i = usize::from(hi) * 250 + usize::from(lo) - 1;
    Duration::from_micros(1_000 + (1_000 * i / n) as u64)
}

/// A balancer over `n` endpoints that has seen some traffic.
fn warmed(n: usize, settings: BalancerSettings) -> Balancer {
    let balancer = Balancer::new(settings);
    balancer.update(&endpoints(n));
    for _ in 0..10 * n {
        let picked = balancer.pick().expect("an endpoint");
        let took = latency(picked.address(), n);
        picked.complete(took, false);
    }
    balancer
}

/// Takes every other endpoint out of rotation for the rest of the run (consecutive failures
/// trip it; the backoff outlasts the bench).
fn half_in_backoff(n: usize) -> Balancer {
    let mut settings = BalancerSettings::default();
    settings.failure_accrual.min_backoff = Duration::from_secs(3_600);
    settings.failure_accrual.max_backoff = Duration::from_secs(3_600);
    let balancer = warmed(n, settings);
    let trips = n / 2;
    let mut attempts = 0;
    while balancer.state_counts().backoff < trips && attempts < 1_000 * n {
        attempts += 1;
        let picked = balancer.pick().expect("an endpoint");
        let SocketAddr::V4(v4) = picked.address() else {
            unreachable!()
        };
        let even = v4.ip().octets()[3] % 2 == 0;
        picked.complete(Duration::from_millis(1), even);
    }
    assert_eq!(balancer.state_counts().backoff, trips, "half the endpoints tripped");
    balancer
}

fn balance(c: &mut Bench) {
    let mut group = c.benchmark_group("balance");
    for n in SIZES {
        let balancer = warmed(n, BalancerSettings::default());
        group.bench_with_input(BenchmarkId::new("pick_complete", n), &n, |b, &n| {
            b.iter(|| {
                let picked = balancer.pick().expect("an endpoint");
                let took = latency(black_box(picked.address()), n);
                picked.complete(took, false);
            })
        });
        if n > 3 {
            let balancer = half_in_backoff(n);
            group.bench_with_input(BenchmarkId::new("pick_complete_half_in_backoff", n), &n, |b, &n| {
                b.iter(|| {
                    let picked = balancer.pick().expect("an endpoint");
                    let took = latency(black_box(picked.address()), n);
                    picked.complete(took, false);
                })
            });
        }
    }
    group.finish();
}

fn balance_update(c: &mut Bench) {
    let mut group = c.benchmark_group("balance_update");
    for n in SIZES {
        let balancer = warmed(n, BalancerSettings::default());
        let list = endpoints(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &list, |b, list| {
            b.iter(|| balancer.update(black_box(list)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = balance, balance_update
}
criterion_main!(benches);
