//! Per-route HTTP metrics: the cost of recording one response, and of a `/metrics` scrape.
//!
//! - `metrics_record/common_status`: a 200, one of the statuses whose counter and histogram the
//!   route keeps once resolved (a short scan of those statuses, then two updates).
//! - `metrics_record/rare_status`: a 429, which the route keeps no handles for: the labels are
//!   built and looked up in both families (the series already exists; creating it is a one-off).
//! - `metrics_record/grpc_status`: the extra `grpc-status` count of a gRPC response (`OK`), a
//!   label lookup in its family.
//! - `metrics_encode/routes_100`: encoding the whole registry as `GET /metrics` does, with the
//!   100-route policy compiled and every route having answered in both directions.

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, criterion_main};
use http::StatusCode;
use pillion_benches::{Bench, compiled_policy, route_name};
use pillion_proxy::metrics::Metrics;

// The allocator the `pillion-proxy` binary ships with, so allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

fn metrics_record(c: &mut Bench) {
    let metrics = Metrics::new();
    let [_, outbound] = metrics.http.route("bench");
    let elapsed = Duration::from_micros(1_250);
    // Create the series up front: the benches measure the steady state.
    outbound.record(StatusCode::OK, elapsed);
    outbound.record(StatusCode::TOO_MANY_REQUESTS, elapsed);
    outbound.record_grpc(Some(0));

    let mut group = c.benchmark_group("metrics_record");
    group.bench_function("common_status", |b| {
        b.iter(|| outbound.record(black_box(StatusCode::OK), black_box(elapsed)))
    });
    group.bench_function("rare_status", |b| {
        b.iter(|| outbound.record(black_box(StatusCode::TOO_MANY_REQUESTS), black_box(elapsed)))
    });
    group.bench_function("grpc_status", |b| b.iter(|| outbound.record_grpc(black_box(Some(0)))));
    group.finish();
}

fn metrics_encode(c: &mut Bench) {
    let metrics = Metrics::new();
    let _policy = compiled_policy(100, &metrics.http);
    for i in 0..100 {
        // Handles for a route's name reach the same series as the compiled route's own.
        for route in metrics.http.route(&route_name(i)) {
            route.record(StatusCode::OK, Duration::from_millis(2));
        }
    }
    let exposition = metrics.encode();
    println!(
        "metrics_encode/routes_100: {} bytes, {} lines per scrape",
        exposition.len(),
        exposition.lines().count()
    );

    let mut group = c.benchmark_group("metrics_encode");
    group.bench_function("routes_100", |b| b.iter(|| black_box(metrics.encode())));
    group.finish();
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = metrics_record, metrics_encode
}
criterion_main!(benches);
