//! Route policy: compiling a route file, and finding a request's route in it, at 10, 100 and
//! 1,000 routes on one destination (see `pillion_benches::routes_yaml` for the mix of matches).
//!
//! - `route_compile/parse/N` and `route_compile/compile/N`: what a config reload costs, split
//!   into reading the YAML and compiling it (validation, sorting, resolving metric handles).
//! - `route_match/last_route/N`: `destination()` + `route()` for a request only the last rule
//!   tried matches, i.e. the full scan that ends in a hit.
//! - `route_match/unmatched/N`: the same for a request no rule matches (the worst case: a full
//!   scan, then the default route).

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, SamplingMode, criterion_group, criterion_main};
use pillion_benches::{
    AUTHORITY, Bench, compiled_policy, last_route_request, original_dst, routes_yaml, unmatched_request,
};
use pillion_proxy::{
    metrics::Metrics,
    policy::{self, Policy},
};

// The allocator the `pillion-proxy` binary ships with, so allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

const SIZES: [usize; 3] = [10, 100, 1_000];

fn route_compile(c: &mut Bench) {
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("route_compile");
    // Milliseconds per iteration at 1,000 routes: few flat samples fit the time budget.
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for n in SIZES {
        let yaml = routes_yaml(n);
        group.bench_with_input(BenchmarkId::new("parse", n), &yaml, |b, yaml| {
            b.iter(|| policy::parse(black_box(yaml), "routes.yaml").expect("parses"))
        });
        group.bench_with_input(BenchmarkId::new("compile", n), &yaml, |b, yaml| {
            b.iter_batched(
                || policy::parse(yaml, "routes.yaml").expect("parses"),
                |file| Policy::compile(file, &metrics.http).expect("compiles"),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn route_match(c: &mut Bench) {
    let metrics = Metrics::new();
    let dst = original_dst();
    let mut group = c.benchmark_group("route_match");
    for n in SIZES {
        let policy = compiled_policy(n, &metrics.http);
        let cases = [
            ("last_route", last_route_request(n)),
            ("unmatched", unmatched_request()),
        ];
        for (name, req) in cases {
            group.bench_with_input(BenchmarkId::new(name, n), &req, |b, req| {
                b.iter(|| {
                    let destination = policy.destination(Some(black_box(AUTHORITY)), black_box(dst));
                    black_box(destination.route(black_box(req)));
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = route_compile, route_match
}
criterion_main!(benches);
