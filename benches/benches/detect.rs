//! Protocol detection on a connection's first bytes, one bench per verdict.
//!
//! Each iteration is one whole `detect_protocol` call: a fresh 1 KiB read buffer, the reads from
//! an in-memory stream that holds the bytes, the detect timeout's setup, and the verdict. The
//! runtime is current-thread, the one the proxy runs by default; `to_async` drives the whole
//! timing loop inside one `block_on`, so its own cost per iteration is a single poll.

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, criterion_main};
use pillion_benches::Bench;
use pillion_proxy::detect::{Protocol, detect_protocol};

// The allocator the `pillion-proxy` binary ships with, so allocations cost what they cost there.
#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

const HTTP1_REQUEST_HEAD: &[u8] = b"GET /api/v1/users/42 HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\n\
User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

/// The prior-knowledge preface followed by the client's (empty) SETTINGS frame.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// The first bytes of a TLS 1.3 ClientHello record (record header, handshake header, version,
/// the start of the random).
const TLS_CLIENT_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x5a\x1b\x2c\x3d\x4e\x5f\x60\x71";

/// A PostgreSQL SSLRequest: binary from the first byte.
const OPAQUE_POSTGRES: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";

const TIMEOUT: Duration = Duration::from_secs(10);

fn detect(c: &mut Bench) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("detect");
    let cases = [
        ("http1_request_head", HTTP1_REQUEST_HEAD, Protocol::Http1),
        ("http2_preface", HTTP2_PREFACE, Protocol::Http2),
        ("tls_client_hello", TLS_CLIENT_HELLO, Protocol::Tls),
        ("opaque_postgres", OPAQUE_POSTGRES, Protocol::Opaque),
    ];
    for (name, bytes, want) in cases {
        // The bench would be meaningless if the verdict were not the expected one.
        let verdict = runtime.block_on(async { detect_protocol(&mut &bytes[..], TIMEOUT).await });
        assert_eq!(verdict.expect("in-memory read").0, want, "{name}");

        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| async {
                let mut io = black_box(bytes);
                black_box(detect_protocol(&mut io, TIMEOUT).await)
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = detect
}
criterion_main!(benches);
