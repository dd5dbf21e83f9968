//! Reading a connection's original destination (`transport::original_dst`), once per accepted
//! connection: `getsockname` plus `getsockopt(SO_ORIGINAL_DST)`.
//!
//! A real redirect needs iptables rules in a network namespace (root), which a bench must not
//! install; here the connection is a plain loopback one. The kernel still does the work of the
//! success path (the conntrack lookup behind `SO_ORIGINAL_DST`) and answers ENOENT, or, when the
//! connection is tracked but not NATed, its unchanged address, which the proxy refuses as a loop.
//! Either way the two system calls dominate, so this is the per-connection cost to expect.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main};
use pillion_benches::Bench;
use pillion_proxy::transport::{self, NoTarget};
use tokio::net::{TcpListener, TcpStream};

// The allocator the `pillion-proxy` binary ships with, so allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

fn original_dst(c: &mut Bench) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (_client, server) = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let client = TcpStream::connect(listener.local_addr().expect("bound address"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    });
    let outcome = match transport::original_dst(&server) {
        Ok(dst) => format!("redirected to {}", dst.0),
        Err(NoTarget::Loop(addr)) => format!("tracked, not NATed (loop to {addr})"),
        Err(NoTarget::NoOriginalDst(e)) => format!("not tracked ({e})"),
        Err(e @ NoTarget::NotPodAddress(_)) => e.to_string(),
    };
    println!("original_dst/loopback_not_redirected: {outcome}");

    let mut group = c.benchmark_group("original_dst");
    group.bench_function("loopback_not_redirected", |b| {
        b.iter(|| black_box(transport::original_dst(black_box(&server)).is_err()))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = original_dst
}
criterion_main!(benches);
