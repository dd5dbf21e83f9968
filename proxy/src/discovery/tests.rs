use pillion_api::proto;

use super::*;

fn settings(max: usize) -> DiscoverySettings {
    DiscoverySettings {
        first_answer_wait: Duration::from_millis(100),
        max_destinations: max,
        idle_timeout: Duration::from_secs(60),
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

fn key(port: u16) -> Authority {
    Authority::from(addr(port))
}

#[tokio::test(start_paused = true)]
async fn only_the_first_window_waits_for_an_answer() {
    let d = Discovery::for_test(settings(10));
    let start = Instant::now();
    assert!(d.lookup(addr(80)).await.is_none());
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    // The control plane is still silent: later lookups don't wait again.
    let again = Instant::now();
    assert!(d.lookup(addr(80)).await.is_none());
    assert_eq!(again.elapsed(), Duration::ZERO);
    assert!(matches!(d.handle(&key(80)).unwrap().settled(), Some(None)));
    // In its first window, a new destination is not settled: a lookup would wait.
    let handle = d.handle(&key(82)).unwrap();
    assert!(handle.settled().is_none());
    assert!(d.answer(&key(82), Target::default()));
    assert!(
        matches!(handle.settled(), Some(Some(_))),
        "the held handle sees the answer"
    );
}

#[tokio::test(start_paused = true)]
async fn a_port_scan_is_bounded_and_unused_destinations_are_dropped() {
    let d = Discovery::for_test(settings(8));
    for port in 1..=100 {
        d.lookup(addr(port)).await;
    }
    assert_eq!(d.followed(), 8);
    assert_eq!(d.destinations.get(), 8);

    tokio::time::advance(Duration::from_secs(30)).await;
    let held = d.handle(&key(99)).unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    d.drop_unused(&mut d.watches.lock().unwrap(), Instant::now());
    assert_eq!(d.followed(), 1, "only the destination a connection holds stays");
    assert!(!held.is_dropped());
    drop(held);
    tokio::time::advance(Duration::from_secs(61)).await;
    d.drop_unused(&mut d.watches.lock().unwrap(), Instant::now());
    assert_eq!(d.followed(), 0);
    assert_eq!(d.destinations.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn at_the_limit_unheld_destinations_make_room_first() {
    let d = Discovery::for_test(settings(2));
    let held = d.handle(&key(443)).unwrap();
    tokio::time::advance(Duration::from_millis(1)).await;
    d.lookup(addr(1)).await;
    // 443 is the least recently used, but a connection holds it: 1 makes room.
    d.lookup(addr(2)).await;
    assert!(!held.is_dropped());
    assert_eq!(d.followed(), 2);
    assert!(d.answer(&key(443), Target::default()) && !d.answer(&key(1), Target::default()));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_destination_is_noticed_and_followed_again() {
    let d = Discovery::for_test(settings(1));
    let held = d.handle(&key(443)).unwrap();
    assert!(d.answer(&key(443), Target::default()));
    // Every destination is held and the limit is 1: the oldest held one makes room.
    let _other = d.handle(&key(1)).unwrap();
    assert!(held.is_dropped(), "the holder learns its answer is frozen");
    let fresh = d.handle(&key(443)).unwrap();
    assert!(!fresh.is_dropped());
    assert!(d.answer(&key(443), Target::default()), "followed again");
    assert!(fresh.latest().is_some());
}

#[tokio::test(start_paused = true)]
async fn the_background_task_drops_unused_destinations() {
    let d = Discovery::for_test(settings(8));
    tokio::spawn(evict_unused(Arc::downgrade(&d)));
    d.lookup(addr(1)).await;
    assert_eq!(d.followed(), 1);
    tokio::time::sleep(Duration::from_secs(80)).await;
    assert_eq!(d.followed(), 0);
}

fn update(routes: Vec<proto::Route>) -> DestinationUpdate {
    DestinationUpdate {
        load_balancer: None,
        destination: "api.shop.svc.cluster.local:8080".into(),
        known: true,
        endpoints: vec![
            proto::Endpoint {
                address: "10.0.0.7:8080".into(),
                weight: 3,
                identity: "spiffe://cluster.local/ns/shop/sa/api.v2".into(),
                protocol: proto::ProtocolHint::Http1.into(),
            },
            proto::Endpoint {
                address: "10.0.0.8:8080".into(),
                weight: 0,
                identity: String::new(),
                protocol: 0,
            },
        ],
        routes,
        retry_budget: None,
        inbound_authorization: None,
    }
}

#[test]
fn an_update_compiles_into_routes_and_endpoints() {
    let metrics = HttpMetrics::register(&mut prometheus_client::registry::Registry::default());
    let route = proto::Route {
        name: "slow".into(),
        timeouts: Some(proto::Timeouts {
            request: Some(prost_types_duration(0, 200_000_000)),
            backend_request: None,
        }),
        ..Default::default()
    };
    let target = compile(&update(vec![route]), &metrics, None).unwrap();
    let routes = target.routes.as_ref().unwrap();
    let req = http::Request::get("/x").body(()).unwrap();
    let route = routes.route(&req);
    assert_eq!(&*route.name, "slow");
    assert_eq!(route.request_timeout, Some(Duration::from_millis(200)));
    // Weight 0 is out of rotation but still listed; the dotted service account is kept.
    assert_eq!(routes.endpoints.len(), 2);
    let ep: SocketAddr = "10.0.0.7:8080".parse().unwrap();
    assert_eq!(
        target.identity(ep).map(SpiffeId::as_str),
        Some("spiffe://cluster.local/ns/shop/sa/api.v2")
    );
    let picked = routes.balancer.as_ref().and_then(|b| b.pick().ok());
    assert_eq!(picked.map(|p| p.address()), Some(ep));
}

#[test]
fn an_invalid_update_is_refused_by_the_files_rules() {
    let metrics = HttpMetrics::register(&mut prometheus_client::registry::Registry::default());
    for bad in [
        proto::Route {
            name: "has space".into(),
            ..Default::default()
        },
        proto::Route {
            name: "r".into(),
            retry: Some(proto::Retry {
                http_statuses: vec![200],
                ..Default::default()
            }),
            ..Default::default()
        },
        proto::Route {
            name: "r".into(),
            matches: vec![proto::RouteMatch {
                path: Some(proto::PathMatch {
                    kind: Some(proto::path_match::Kind::Prefix("no-slash".into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
    ] {
        let name = bad.name.clone();
        assert!(compile(&update(vec![bad]), &metrics, None).is_err(), "{name}");
    }
    let mut unknown = update(Vec::new());
    unknown.known = false;
    let target = compile(&unknown, &metrics, None).unwrap();
    assert!(target.routes.is_none());
}

fn prost_types_duration(seconds: i64, nanos: i32) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos }
}

#[tokio::test(start_paused = true)]
async fn a_destination_followed_again_starts_from_the_last_answer_seen() {
    let d = Discovery::for_test(settings(1));
    let mut held = Held::new(&d, key(443));
    assert!(d.answer(&key(443), Target::default()));
    let _other = d.handle(&key(1)).unwrap();
    assert_eq!(d.followed(), 1, "443 made room");
    // The control plane is silent now: the holder's fresh handle keeps what the dropped one
    // knew, instead of waiting and then deciding with no answer (plaintext).
    let fresh = held.handle(&d).unwrap();
    assert!(!fresh.is_dropped());
    assert!(matches!(fresh.settled(), Some(Some(_))));
}

#[test]
fn endpoints_that_all_go_away_leave_a_destination_with_none() {
    let metrics = HttpMetrics::register(&mut prometheus_client::registry::Registry::default());
    let first = compile(&update(vec![]), &metrics, None).unwrap();
    let before = first.routes.as_ref().unwrap();
    let mut gone = update(vec![]);
    gone.endpoints.clear();
    let after = compile(&gone, &metrics, Some(before)).unwrap();
    let balancer = after.routes.as_ref().unwrap().balancer.as_ref().expect("kept, empty");
    assert!(Arc::ptr_eq(balancer, before.balancer.as_ref().unwrap()));
    assert_eq!(balancer.pick().unwrap_err(), crate::balance::PickError::NoEndpoints);
    // Known from the start without endpoints: the original destination, as for a route file.
    assert!(
        compile(&gone, &metrics, None)
            .unwrap()
            .routes
            .unwrap()
            .balancer
            .is_none()
    );
}
