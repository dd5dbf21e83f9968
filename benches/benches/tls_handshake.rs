//! Mesh TLS handshakes, client and server in one process over an in-memory stream.
//!
//! - `tls_handshake/mesh_mtls`: one full TLS 1.3 mutual-TLS handshake between two proxies'
//!   configurations (X25519MLKEM768 key exchange, ECDSA P-256 SVIDs, the SPIFFE verifier on the
//!   client, client-certificate verification on the server), plus one byte each way so both
//!   sides have finished. Both ends run on this thread, so the figure is the CPU time of the
//!   client's and the server's halves together; one proxy accepting handshakes spends roughly
//!   half of it per handshake.
//! - `tls_handshake/mesh_mtls_resumed`: the same with TLS 1.3 session resumption switched back on
//!   (stateful server cache, client session cache), which Pillion does not do: a resumed session
//!   skips certificate verification and could outlive its certificate. The difference is what
//!   refusing resumption costs per new connection between the same two proxies.

use std::{hint::black_box, sync::Arc};

use criterion::{criterion_group, criterion_main};
use pillion_benches::{Bench, thread_cpu_time};
use pillion_proxy::{
    identity::{Held, IdentityStore},
    tls::{self, MeshTls, spiffe::SpiffeId},
};
use prometheus_client::metrics::gauge::Gauge;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static ALLOCATOR: pillion_proxy::allocator::MiMalloc = pillion_proxy::allocator::MiMalloc;

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

/// A root CA and two SVIDs signed by it, each as the store a proxy would hold.
fn stores() -> (Arc<IdentityStore>, Arc<IdentityStore>) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "bench root");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let store = |id: &str| {
        let key = KeyPair::generate().expect("leaf key");
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name = rcgen::DistinguishedName::new();
        leaf.subject_alt_names = vec![SanType::URI(id.try_into().expect("URI SAN"))];
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).expect("leaf certificate");
        let (roots, der) = tls::trust_anchors(ca_pem.as_bytes(), "bench").expect("trust anchors");
        let store = Arc::new(IdentityStore::new(roots, &der, "files", Gauge::default()));
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        store.install(Held::new(chain, private, &tls::provider()).expect("SVID"));
        store
    };
    (store(CLIENT), store(SERVER))
}

fn tls_handshake(c: &mut Bench) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (client_store, server_store) = stores();
    let client_mesh = MeshTls::new(client_store).expect("client config");
    let server_mesh = MeshTls::new(server_store).expect("server config");
    let sni = SpiffeId::parse(SERVER).expect("id").to_sni().expect("sni");
    let name = ServerName::try_from(sni).expect("server name");

    // rustls's defaults, which MeshTls turns off.
    let mut resuming_client = (*client_mesh.client).clone();
    resuming_client.resumption = rustls::client::Resumption::default();
    let mut resuming_server = (*server_mesh.server).clone();
    resuming_server.session_storage = rustls::server::ServerSessionMemoryCache::new(256);
    resuming_server.send_tls13_tickets = 2;

    let mut group = c.benchmark_group("tls_handshake");
    for (bench, client_config, server_config) in [
        ("mesh_mtls", client_mesh.client.clone(), server_mesh.server.clone()),
        (
            "mesh_mtls_resumed",
            Arc::new(resuming_client),
            Arc::new(resuming_server),
        ),
    ] {
        let client = tokio_rustls::TlsConnector::from(client_config);
        let server = tokio_rustls::TlsAcceptor::from(server_config);
        bench_handshakes(&mut group, bench, &runtime, &client, &server, &name);
    }
    group.finish();
}

fn bench_handshakes(
    group: &mut criterion::BenchmarkGroup<'_, pillion_benches::ThreadCpuTime>,
    bench: &str,
    runtime: &tokio::runtime::Runtime,
    client: &tokio_rustls::TlsConnector,
    server: &tokio_rustls::TlsAcceptor,
    name: &ServerName<'static>,
) {
    let handshake = || async {
        let (a, b) = tokio::io::duplex(16 * 1024);
        let accept = async {
            let mut tls = server.accept(b).await.expect("server handshake");
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.expect("server read");
            tls.write_all(&byte).await.expect("server write");
            tls.flush().await.expect("server flush");
            tls
        };
        let connect = async {
            let mut tls = client.connect(name.clone(), a).await.expect("client handshake");
            tls.write_all(b"x").await.expect("client write");
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.expect("client read");
            tls
        };
        black_box(tokio::join!(accept, connect));
    };
    // Warm-up; with resumption, it also leaves a session for the measured handshakes to resume.
    runtime.block_on(handshake());
    group.bench_function(bench, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = thread_cpu_time();
                for _ in 0..iters {
                    handshake().await;
                }
                thread_cpu_time() - start
            })
        })
    });
}

criterion_group! {
    name = benches;
    config = pillion_benches::criterion();
    targets = tls_handshake
}
criterion_main!(benches);
