//! The retry budget (`tower::retry::budget::TpsBudget`) as the retry layer uses it: a deposit for
//! every request on a route with retries, a withdrawal before every retry.
//!
//! - `retry_budget/deposit`: what every request on a retrying route pays.
//! - `retry_budget/deposit_and_withdraw`: a request retried once, on a budget that keeps up
//!   (100%: each deposit pays for one retry, so every withdrawal succeeds).
//! - `retry_budget/withdraw_exhausted`: a retry refused during a retry storm.
//!
//! Both calls take the budget's internal mutex (its window rotation) and read the clock; one
//! budget is shared by every connection to a destination, so this is also the critical section
//! that concurrent requests to one destination contend on.

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, criterion_main};
use pillion_benches::Bench;
use tower::retry::budget::{Budget, TpsBudget};

// The allocator the `pillion-proxy` binary ships with, so allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

fn retry_budget(c: &mut Bench) {
    let mut group = c.benchmark_group("retry_budget");

    // The proxy's defaults: 20%, 10 retries per second, 10 s.
    let budget = TpsBudget::new(Duration::from_secs(10), 10, 0.2);
    group.bench_function("deposit", |b| b.iter(|| black_box(&budget).deposit()));

    let budget = TpsBudget::new(Duration::from_secs(10), 10, 1.0);
    group.bench_function("deposit_and_withdraw", |b| {
        b.iter(|| {
            let budget = black_box(&budget);
            budget.deposit();
            assert!(budget.withdraw(), "a 100% budget always allows one retry per request");
        })
    });

    let budget = TpsBudget::new(Duration::from_secs(10), 0, 0.0);
    group.bench_function("withdraw_exhausted", |b| {
        b.iter(|| black_box(black_box(&budget).withdraw()))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = retry_budget
}
criterion_main!(benches);
