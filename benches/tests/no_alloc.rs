//! Allocation budget of the per-request hot paths, counted by a global allocator.
//!
//! Route matching must allocate nothing per request (asserted). Recording a response's metrics
//! is reported, not asserted: its cost lives in prometheus-client.
//!
//! Allocations are counted per thread, so the test harness's other threads do not disturb the
//! count: each figure is what the measured calls themselves allocated.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    hint::black_box,
    time::Duration,
};

use http::StatusCode;
use pillion_benches::{AUTHORITY, compiled_policy, last_route_request, original_dst, route_name, unmatched_request};
use pillion_proxy::{metrics::Metrics, policy::DEFAULT_ROUTE};

struct CountingAllocator;

thread_local! {
    // Const-initialised and without a destructor: safe to touch from inside the allocator.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Allocations (including reallocations) made on this thread by `f`.
fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const CALLS: u64 = 10_000;

#[test]
fn the_counter_sees_allocations() {
    // Without this, a zero below could mean a counter that counts nothing.
    assert_eq!(allocations_in(|| drop(black_box(Vec::<u8>::with_capacity(64)))), 1);
    assert_eq!(allocations_in(|| drop(black_box(String::from("route-0042")))), 1);
}

#[test]
fn route_matching_allocates_nothing_per_request() {
    for n in [10, 100, 1_000] {
        let metrics = Metrics::new();
        let policy = compiled_policy(n, &metrics.http);
        let dst = original_dst();
        let cases = [
            (last_route_request(n), route_name(n - 1)),
            (unmatched_request(), DEFAULT_ROUTE.to_string()),
        ];
        for (req, want) in &cases {
            // Warm-up, and proof that each request lands where it should.
            let route = policy.destination(Some(AUTHORITY), dst).route(req);
            assert_eq!(&*route.name, want.as_str(), "n = {n}");

            let allocated = allocations_in(|| {
                for _ in 0..CALLS {
                    let destination = policy.destination(Some(black_box(AUTHORITY)), black_box(dst));
                    black_box(destination.route(black_box(req)));
                }
            });
            assert_eq!(
                allocated,
                0,
                "{n} routes, {} {}: {allocated} allocations in {CALLS} lookups",
                req.method(),
                req.uri()
            );
        }
    }
}

#[test]
fn route_metrics_recording_allocates_nothing_in_the_steady_state() {
    let metrics = Metrics::new();
    let [_, outbound] = metrics.http.route("bench");
    let elapsed = Duration::from_micros(1_250);
    // The first response of each kind creates its series; the steady state is what a request pays.
    outbound.record(StatusCode::OK, elapsed);
    outbound.record(StatusCode::TOO_MANY_REQUESTS, elapsed);
    outbound.record_grpc(Some(0));

    for (what, status) in [
        ("common status (200)", StatusCode::OK),
        ("rare status (429)", StatusCode::TOO_MANY_REQUESTS),
    ] {
        let allocated = allocations_in(|| {
            for _ in 0..CALLS {
                outbound.record(black_box(status), black_box(elapsed));
            }
        });
        println!(
            "RouteMetrics::record, {what}: {allocated} allocations in {CALLS} calls ({:.3} per call)",
            allocated as f64 / CALLS as f64
        );
        assert_eq!(allocated, 0, "RouteMetrics::record, {what}, allocated");
    }
    let allocated = allocations_in(|| {
        for _ in 0..CALLS {
            outbound.record_grpc(black_box(Some(0)));
        }
    });
    println!(
        "RouteMetrics::record_grpc, OK: {allocated} allocations in {CALLS} calls ({:.3} per call)",
        allocated as f64 / CALLS as f64
    );
    assert_eq!(allocated, 0, "RouteMetrics::record_grpc allocated");
}

#[test]
fn balancing_allocates_nothing_per_request_in_the_steady_state() {
    use pillion_proxy::{
        balance::{Balancer, BalancerSettings},
        policy::Endpoint,
    };
    for n in [3, 100, 1_000] {
        let endpoints: Vec<Endpoint> = (0..n)
            .map(|i| Endpoint {
                address: std::net::SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
                identity: None,
                weight: 1 + (i % 3) as u32,
                protocol: Default::default(),
            })
            .collect();
        let balancer = Balancer::new(BalancerSettings::default());
        balancer.update(&endpoints);
        let latency = Duration::from_micros(1_250);
        // Warm-up: the first pick on a thread takes arc-swap's per-thread slot.
        balancer.pick().expect("an endpoint").complete(latency, false);

        let allocated = allocations_in(|| {
            for i in 0..CALLS {
                let picked = balancer.pick().expect("an endpoint");
                black_box(picked.address());
                if i % 10 == 0 {
                    // A cancelled request: the handle is dropped without an outcome.
                    drop(picked);
                } else {
                    picked.complete(black_box(latency), i % 7 == 0);
                }
            }
        });
        println!(
            "Balancer::pick + complete, {n} endpoints: {allocated} allocations in {CALLS} calls ({:.3} per call)",
            allocated as f64 / CALLS as f64
        );
        assert_eq!(allocated, 0, "{n} endpoints: {allocated} allocations in {CALLS} picks");
    }
}
