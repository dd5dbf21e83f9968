//! The proxy's route file (`proxy/src/policy/`): YAML → the shared policy model → compiled `Policy`, then
//! lookups on what was compiled.
//!
//! Input: the file's text. Checks: parsing and compiling never panic (errors are values), and a
//! compiled policy answers every lookup (destination, route, backend, retry codes) without
//! panicking, including for authorities and paths taken from the file itself.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use pillion_proxy::{
    http::metrics::HttpMetrics,
    policy::{self, Policy},
};
use prometheus_client::registry::Registry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = policy::parse(text, "routes.yaml") else {
        return;
    };
    // A registry per input: route metrics are keyed by route name and would pile up otherwise.
    let metrics = HttpMetrics::register(&mut Registry::default());
    let Ok(policy) = Policy::compile(file, &metrics) else {
        return;
    };
    let dst: SocketAddr = "10.0.0.9:8080".parse().unwrap();
    // Words of the file make likely authorities, paths and header values.
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | '[' | ']' | '{' | '}'))
        .filter(|w| !w.is_empty())
        .take(64)
        .collect();
    for (i, word) in words.iter().enumerate() {
        let _ = policy.inbound_authorization(word.parse().unwrap_or(80));
        let authority = Some(*word).filter(|_| i % 2 == 0);
        let destination = policy.destination(authority, word.parse().unwrap_or(dst));
        for method in ["GET", "POST", word] {
            let Ok(req) = http::Request::builder()
                .method(method)
                .uri(*word)
                .header("x-canary", *word)
                .body(())
            else {
                continue;
            };
            let route = destination.route(&req);
            let _ = route.backend();
            let _ = destination.endpoint(dst);
            if let Some(balancer) = &destination.balancer {
                // A pick and its outcome, as the balance layer reports one.
                if let Ok(picked) = balancer.pick() {
                    picked.complete(std::time::Duration::from_millis(word.len() as u64), i % 3 == 0);
                }
            }
            if let Some(retry) = &route.retry {
                for code in [0u8, 14, 31, 32, 255] {
                    let _ = retry.retries_grpc(code);
                }
                let _ = retry.retries_status(http::StatusCode::BAD_GATEWAY);
            }
        }
    }
    let _ = policy.routes_by_host();
});
