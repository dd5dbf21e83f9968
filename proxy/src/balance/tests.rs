//! The balancer on tokio's paused clock: time moves only when a test advances it, and the
//! thread-local random generator is seeded, so every figure here is reproducible.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    net::SocketAddr,
    time::Duration,
};

use pillion_api::policy::model::ProtocolHint;
use tokio::time::{Instant, advance};

use super::*;

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 8080))
}

fn endpoint(n: u8, weight: u32) -> Endpoint {
    Endpoint {
        address: addr(n),
        identity: None,
        weight,
        protocol: ProtocolHint::Http1,
    }
}

fn balancer(endpoints: &[Endpoint]) -> Balancer {
    fastrand::seed(7);
    let balancer = Balancer::new(BalancerSettings::default());
    balancer.update(endpoints);
    balancer
}

fn status(balancer: &Balancer, n: u8) -> EndpointStatus {
    balancer
        .endpoints()
        .into_iter()
        .find(|e| e.address == addr(n))
        .expect("endpoint listed")
}

/// Runs `picks` requests through `balancer`, one every `every` with up to `concurrency` in flight
/// at once, each taking `latency(address)` of (paused) time; returns the picks per address.
async fn simulate(
    balancer: &Balancer,
    picks: usize,
    every: Duration,
    concurrency: usize,
    latency: impl Fn(SocketAddr) -> Duration,
) -> HashMap<SocketAddr, usize> {
    let mut counts = HashMap::new();
    let mut in_flight = BinaryHeap::new();
    let mut seq = 0u64;
    let mut guards = HashMap::new();
    for _ in 0..picks {
        while in_flight.len() >= concurrency {
            let Reverse((at, id)) = in_flight.pop().expect("in flight");
            let (picked, sent): (Picked, Instant) = guards.remove(&id).expect("guard");
            let now = Instant::now();
            if at > now {
                advance(at - now).await;
            }
            picked.complete(at - sent, false);
        }
        let picked = balancer.pick().expect("an endpoint");
        *counts.entry(picked.address()).or_insert(0) += 1;
        let sent = Instant::now();
        seq += 1;
        in_flight.push(Reverse((sent + latency(picked.address()), seq)));
        guards.insert(seq, (picked, sent));
        advance(every).await;
    }
    counts
}

/// Fails `n` requests in a row on the only endpoint that `pick` offers, at once: the paused clock
/// does not move, so backoffs start now.
fn fail(balancer: &Balancer, n: u32) {
    for _ in 0..n {
        balancer.pick().expect("in rotation").complete(Duration::ZERO, true);
    }
}

fn backoff_left(balancer: &Balancer) -> Duration {
    match balancer.pick() {
        Err(PickError::Unavailable {
            next_ready: Some(at), ..
        }) => at - Instant::now(),
        other => panic!("expected a backoff, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn prefers_the_faster_of_two_endpoints() {
    let balancer = balancer(&[endpoint(1, 1), endpoint(2, 1)]);
    let latency = |a: SocketAddr| Duration::from_millis(if a == addr(1) { 50 } else { 1 });
    // Warm-up: 30 s at 1,000 requests a second, for the estimates to move from the default
    // towards the real latencies (three time constants).
    let every = Duration::from_millis(1);
    simulate(&balancer, 30_000, every, 8, latency).await;
    let counts = simulate(&balancer, 10_000, every, 8, latency).await;
    let slow = counts.get(&addr(1)).copied().unwrap_or(0);
    println!(
        "50 ms endpoint: {slow} of 10,000 picks; estimates {:?}",
        balancer.endpoints()
    );
    assert!(
        slow < 1_000,
        "the 50 ms endpoint got {slow} of 10,000 picks: {counts:?}"
    );
    let rtt = status(&balancer, 2).rtt;
    assert!(rtt < Duration::from_millis(5), "fast endpoint's estimate {rtt:?}");
}

#[tokio::test(start_paused = true)]
async fn weights_share_load_at_equal_latency() {
    let balancer = balancer(&[endpoint(1, 1), endpoint(2, 2), endpoint(3, 3)]);
    let latency = |_| Duration::from_millis(10);
    // 64 requests in flight: weights are capacity, so they show under concurrent load.
    let every = Duration::from_micros(100);
    simulate(&balancer, 2_000, every, 64, latency).await;
    let counts = simulate(&balancer, 10_000, every, 64, latency).await;
    println!("picks at weights 1, 2, 3: {counts:?}");
    for (n, weight) in [(1, 1), (2, 2), (3, 3)] {
        let share = counts.get(&addr(n)).copied().unwrap_or(0) as f64 / 10_000.0;
        let want = f64::from(weight) / 6.0;
        assert!(
            (share - want).abs() <= 0.05,
            "weight {weight}: {:.1}% of picks, want {:.1}% ± 5: {counts:?}",
            share * 100.0,
            want * 100.0
        );
    }
}

#[tokio::test(start_paused = true)]
async fn requests_in_flight_raise_the_cost() {
    let balancer = balancer(&[endpoint(1, 1), endpoint(2, 1)]);
    let held = balancer.pick().expect("an endpoint");
    let busy = held.address();
    // Equal estimates: the endpoint with a request out costs twice as much.
    for _ in 0..100 {
        let picked = balancer.pick().expect("an endpoint");
        assert_ne!(picked.address(), busy);
    }
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_pick_releases_its_request_in_flight_without_a_sample() {
    let balancer = balancer(&[endpoint(1, 1)]);
    let picked = balancer.pick().expect("an endpoint");
    assert_eq!(status(&balancer, 1).in_flight, 1);
    drop(picked);
    let after = status(&balancer, 1);
    assert_eq!((after.in_flight, after.requests), (0, 1));
    assert_eq!(after.rtt, DEFAULT_RTT, "no sample taken");
}

#[tokio::test(start_paused = true)]
async fn one_endpoint_is_always_picked_and_none_is_an_error() {
    let balancer = balancer(&[]);
    assert_eq!(balancer.pick().unwrap_err(), PickError::NoEndpoints);
    // Weight 0 is out of rotation, as in the policy.
    balancer.update(&[endpoint(1, 0)]);
    assert_eq!(balancer.pick().unwrap_err(), PickError::NoEndpoints);
    balancer.update(&[endpoint(2, 5)]);
    for _ in 0..10 {
        assert_eq!(balancer.pick().expect("the endpoint").address(), addr(2));
    }
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_take_an_endpoint_out_and_a_success_resets_the_count() {
    let balancer = balancer(&[endpoint(1, 1)]);
    fail(&balancer, 6);
    balancer
        .pick()
        .expect("in rotation")
        .complete(Duration::from_millis(1), false);
    fail(&balancer, 6);
    assert_eq!(balancer.state_counts().ready, 1, "six failures since the last success");
    fail(&balancer, 1);
    assert_eq!(
        balancer.state_counts(),
        StateCounts {
            ready: 0,
            backoff: 1,
            probing: 0
        }
    );
    let left = backoff_left(&balancer);
    assert!(
        left >= Duration::from_secs(1) && left <= Duration::from_millis(1_500),
        "{left:?}"
    );
    assert_eq!(status(&balancer, 1).backoff_ends, Some(Instant::now() + left));
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_on_each_failed_probe_up_to_the_cap() {
    let balancer = balancer(&[endpoint(1, 1)]);
    fail(&balancer, 7);
    let mut base = Duration::from_secs(1);
    let max = Duration::from_secs(60);
    for round in 0..9 {
        let left = backoff_left(&balancer);
        let upper = base.mul_f64(1.0 + BACKOFF_JITTER).min(max);
        assert!(
            left >= base && left <= upper,
            "round {round}: {left:?} not in {base:?}..={upper:?}"
        );
        advance(left).await;
        assert_eq!(balancer.state_counts().probing, 1);
        let probe = balancer.pick().expect("the probe");
        assert!(probe.is_probe());
        probe.complete(Duration::ZERO, true);
        base = (base * 2).min(max);
    }
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_out_of_backoff_admits_one_probe_at_a_time() {
    let balancer = balancer(&[endpoint(1, 1)]);
    fail(&balancer, 7);
    advance(backoff_left(&balancer)).await;
    let probe = balancer.pick().expect("the probe");
    assert!(probe.is_probe());
    assert_eq!(
        balancer.pick().unwrap_err(),
        PickError::Unavailable {
            next_ready: None,
            backoff: 0,
            probing: 1
        }
    );
    // A cancelled probe frees the slot for the next request.
    drop(probe);
    let probe = balancer.pick().expect("the next probe");
    assert!(probe.is_probe());
    // Its success puts the endpoint back in rotation, with a fresh count.
    probe.complete(Duration::from_millis(1), false);
    assert_eq!(balancer.state_counts().ready, 1);
    let ordinary = balancer.pick().expect("in rotation");
    assert!(!ordinary.is_probe());
    ordinary.complete(Duration::from_millis(1), false);
    fail(&balancer, 6);
    assert_eq!(balancer.state_counts().ready, 1);
    fail(&balancer, 1);
    let left = backoff_left(&balancer);
    assert!(
        left <= Duration::from_millis(1_500),
        "back to the shortest backoff: {left:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn outcomes_of_requests_sent_before_the_trip_do_not_end_the_backoff() {
    let balancer = balancer(&[endpoint(1, 1)]);
    let early = balancer.pick().expect("in rotation");
    fail(&balancer, 7);
    early.complete(Duration::from_millis(1), false);
    assert_eq!(balancer.state_counts().backoff, 1);
}

#[tokio::test(start_paused = true)]
async fn traffic_avoids_an_endpoint_in_backoff_and_every_one_out_is_an_error() {
    // Trip endpoint 1 while it is alone (with others, the latency estimate its failures keep
    // high would already steer requests away from it), then add two more.
    let balancer = balancer(&[endpoint(1, 1)]);
    fail(&balancer, 7);
    balancer.update(&[endpoint(1, 1), endpoint(2, 1), endpoint(3, 1)]);
    assert_eq!(balancer.state_counts().backoff, 1, "kept across the update");
    for _ in 0..1_000 {
        let picked = balancer.pick().expect("an endpoint");
        assert_ne!(picked.address(), addr(1));
        picked.complete(Duration::from_millis(1), false);
    }
    // Now trip the other two.
    let mut failures = [0, 0];
    for _ in 0..1_000 {
        if failures == [7, 7] {
            break;
        }
        let picked = balancer.pick().expect("an endpoint");
        let i = usize::from(picked.address() == addr(3));
        failures[i] += 1;
        picked.complete(Duration::from_millis(1), true);
    }
    let first_ends = Instant::now() + backoff_left(&balancer);
    match balancer.pick().unwrap_err() {
        PickError::Unavailable {
            next_ready: Some(at),
            backoff: 3,
            probing: 0,
        } => assert_eq!(at, first_ends),
        other => panic!("{other:?}"),
    }
    let message = balancer.pick().unwrap_err().to_string();
    assert!(message.contains("no healthy endpoint"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn an_update_keeps_the_statistics_of_addresses_that_remain() {
    let balancer = balancer(&[endpoint(1, 1)]);
    for _ in 0..3 {
        balancer
            .pick()
            .expect("an endpoint")
            .complete(Duration::from_millis(80), true);
    }
    balancer.update(&[endpoint(1, 1), endpoint(2, 1)]);
    let before = status(&balancer, 1);
    assert_eq!((before.requests, before.consecutive_failures), (3, 3));
    // A request to endpoint 2 is in flight when 2 is removed.
    let to_removed = loop {
        let picked = balancer.pick().expect("an endpoint");
        if picked.address() == addr(2) {
            break picked;
        }
    };

    balancer.update(&[endpoint(1, 4), endpoint(3, 1), endpoint(3, 9)]);
    let kept = status(&balancer, 1);
    assert_eq!(
        (kept.requests, kept.consecutive_failures, kept.rtt, kept.weight),
        (before.requests, before.consecutive_failures, before.rtt, 4)
    );
    let added = status(&balancer, 3);
    assert_eq!((added.requests, added.rtt, added.weight), (0, DEFAULT_RTT, 1));
    assert_eq!(balancer.len(), 2, "the repeated address is left out");
    assert!(balancer.endpoints().iter().all(|e| e.address != addr(2)));

    // The removed endpoint's request finishes harmlessly.
    assert_eq!(to_removed.address(), addr(2));
    to_removed.complete(Duration::from_millis(2), false);
    assert!(balancer.endpoints().iter().all(|e| e.in_flight == 0));
}

#[test]
fn backoff_delays_double_and_stay_within_the_cap() {
    fastrand::seed(1);
    let accrual = FailureAccrual::default();
    for n in 1..=40 {
        let base = Duration::from_secs(1 << (n - 1).min(6)).min(accrual.max_backoff);
        let delay = accrual.backoff(n);
        assert!(delay >= base && delay <= accrual.max_backoff, "backoff {n}: {delay:?}");
    }
    assert_eq!(accrual.backoff(u32::MAX), accrual.max_backoff);
}
