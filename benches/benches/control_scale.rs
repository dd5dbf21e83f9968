//! The Kubernetes-mode control plane at scale, in one process: an index of 10,000 Services with
//! 100,000 endpoints (100,000 meshed Pods), its policy, and 1,000 Watch streams over loopback gRPC.
//!
//! Not a criterion bench: each figure is one large operation (a sync of 120,000 objects, a
//! rebuild of the whole policy), so it is measured as it happens and printed as a table.
//!
//! ```sh
//! cargo bench -p pillion-benches --features control-scale --bench control_scale
//! PILLION_BENCH_QUICK=1 cargo bench -p pillion-benches --features control-scale --bench control_scale
//! ```
//!
//! `PILLION_BENCH_QUICK=1` runs a tenth of the scale (1,000 Services, 100 streams, 20 changes).
//! `PILLION_SCALE_SERVICES`, `PILLION_SCALE_STREAMS`, `PILLION_SCALE_CONNECTIONS` and
//! `PILLION_SCALE_CHANGES` override the sizes.
//!
//! What runs is the control plane's own code: the objects go through `Index::apply` as watcher
//! events, the change goes through the index task the control plane runs (`k8s::watch::follow`, on
//! a thread of its own as in `KubernetesSource::start`), and the streams are the Discovery service
//! of `server::serve` over plaintext HTTP/2, each opened by a tonic client over loopback. The
//! server runs on a multi-thread runtime as `pillion-control serve` does; the clients on a
//! one-thread runtime of their own. The allocator is the system one, as in `pillion-control`,
//! wrapped to count live heap bytes.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    net::Ipv4Addr,
    os::unix::thread::JoinHandleExt,
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::runtime::watcher::Event;
use pillion_control::{
    auth::TokenFile,
    ca::{self, CertificateAuthority},
    discovery_service::visible_update,
    k8s::{Index, IndexConfig, Kind, index::Indexed, watch::follow},
    policy::{PolicyWatch, model::Authority},
    proto::{WatchRequest, discovery_client::DiscoveryClient},
    server::{self, ControlPlane, Limits, Transport},
    spiffe::TrustDomain,
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Counts live heap bytes: what the index and the policy hold, exactly, where RSS also shows
/// freed memory the allocator keeps.
struct CountingAlloc;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The index task's input, as `k8s::watch` builds it from each watcher event.
type Update = Box<dyn FnOnce(&mut Index) -> bool + Send>;

const CLUSTER_DOMAIN: &str = "cluster.local";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Objects built at once before being applied, so building them stays out of the timing and
/// never holds all 100,000 Pods in memory at once.
const CHUNK: usize = 1000;
/// After the last affected stream has its update: time for every other stream to have looked at
/// the new policy too, so a change's CPU is all counted before the next one.
const SETTLE: Duration = Duration::from_millis(300);
/// Longest wait for one change to reach every affected stream.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
struct Scale {
    services: usize,
    endpoints_per_service: usize,
    namespaces: usize,
    streams: usize,
    connections: usize,
    /// Streams watching the changed Service: half by name, half by ClusterIP.
    affected: usize,
    changes: usize,
    /// Changes measured step by step on the index alone.
    direct_changes: usize,
}

impl Scale {
    fn from_env() -> Self {
        let quick = std::env::var_os("PILLION_BENCH_QUICK").is_some_and(|v| !v.is_empty() && v != "0");
        let mut s = if quick {
            Scale {
                services: 1_000,
                endpoints_per_service: 10,
                namespaces: 10,
                streams: 100,
                connections: 100,
                affected: 10,
                changes: 20,
                direct_changes: 3,
            }
        } else {
            Scale {
                services: 10_000,
                endpoints_per_service: 10,
                namespaces: 10,
                streams: 1_000,
                connections: 1_000,
                affected: 10,
                changes: 100,
                direct_changes: 10,
            }
        };
        let var = |name: &str, into: &mut usize| {
            if let Some(n) = std::env::var(name).ok().and_then(|v| v.parse().ok()) {
                *into = n;
            }
        };
        var("PILLION_SCALE_SERVICES", &mut s.services);
        var("PILLION_SCALE_STREAMS", &mut s.streams);
        var("PILLION_SCALE_CONNECTIONS", &mut s.connections);
        var("PILLION_SCALE_CHANGES", &mut s.changes);
        s.services = s.services.max(2);
        s.affected = s.affected.min(s.streams);
        s.connections = s.connections.clamp(1, s.streams.max(1));
        s
    }

    fn pods(&self) -> usize {
        self.services * self.endpoints_per_service
    }
}

// ---- the cluster's objects, shaped as the API server serves them ----

fn namespace_name(scale: &Scale, service: usize) -> String {
    format!("ns-{}", service % scale.namespaces)
}

fn cluster_ip(service: usize) -> Ipv4Addr {
    let n = service as u32;
    Ipv4Addr::new(10, 96 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn pod_ip(scale: &Scale, service: usize, endpoint: usize) -> Ipv4Addr {
    let n = (service * scale.endpoints_per_service + endpoint + 1) as u32;
    Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// An object from its JSON, as the watcher deserialises it.
macro_rules! object {
    ($value:expr) => {
        serde_json::from_value($value).expect("the bench's objects are valid")
    };
}

fn namespace(i: usize) -> Namespace {
    object!(json!({ "metadata": { "name": format!("ns-{i}") } }))
}

fn service(scale: &Scale, s: usize) -> Service {
    object!(json!({
        "metadata": { "namespace": namespace_name(scale, s), "name": format!("svc-{s}") },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip(s).to_string(),
            "clusterIPs": [cluster_ip(s).to_string()],
            "selector": { "app": format!("svc-{s}") },
            "ports": [{ "name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP" }],
        },
    }))
}

/// A Pod as the injector leaves it: the proxy as a native sidecar, its own service account.
fn pod(scale: &Scale, s: usize, e: usize) -> Pod {
    let ip = pod_ip(scale, s, e).to_string();
    object!(json!({
        "metadata": {
            "namespace": namespace_name(scale, s),
            "name": format!("svc-{s}-{e}"),
            "labels": { "app": format!("svc-{s}") },
        },
        "spec": {
            "serviceAccountName": format!("sa-{s}"),
            "initContainers": [
                { "name": "pillion-init", "image": "pillion-init" },
                { "name": "pillion-proxy", "image": "pillion-proxy", "restartPolicy": "Always" },
            ],
            "containers": [{ "name": "app", "image": "app" }],
        },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    }))
}

/// The Service's one slice; `not_ready` names the endpoint that is not ready, if any.
fn slice(scale: &Scale, s: usize, not_ready: Option<usize>) -> EndpointSlice {
    let ns = namespace_name(scale, s);
    let endpoints: Vec<serde_json::Value> = (0..scale.endpoints_per_service)
        .map(|e| {
            let ready = not_ready != Some(e);
            json!({
                "addresses": [pod_ip(scale, s, e).to_string()],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "targetRef": { "kind": "Pod", "namespace": ns, "name": format!("svc-{s}-{e}") },
            })
        })
        .collect();
    object!(json!({
        "metadata": {
            "namespace": ns,
            "name": format!("svc-{s}-x7k2p"),
            "labels": { "kubernetes.io/service-name": format!("svc-{s}") },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": TARGET_PORT, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
}

/// What stream `i` watches: the first `affected` the changed Service (svc-0), the rest one other
/// Service each; even streams by name, odd ones by ClusterIP.
fn stream_destination(scale: &Scale, i: usize) -> String {
    let s = if i < scale.affected {
        0
    } else {
        1 + (i - scale.affected) % (scale.services - 1)
    };
    if i % 2 == 0 {
        format!(
            "svc-{s}.{}.svc.{CLUSTER_DOMAIN}:{SERVICE_PORT}",
            namespace_name(scale, s)
        )
    } else {
        format!("{}:{SERVICE_PORT}", cluster_ip(s))
    }
}

// ---- measuring ----

fn live_heap() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// `VmRSS` and `VmHWM` from /proc/self/status, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of the whole process (every thread, user + system).
fn process_cpu() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Wall and CPU time of `f` on this thread.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let out = f();
    (out, wall.elapsed(), thread_cpu() - cpu)
}

fn mib(bytes: impl TryInto<i64>) -> String {
    let b = bytes.try_into().unwrap_or(0);
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// p50 and max of a set of durations.
fn p50_max(v: &[Duration]) -> (Duration, Duration) {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    (v[(v.len() - 1) / 2], v[v.len() - 1])
}

fn p50_max_str(v: &[Duration]) -> String {
    let (p50, max) = p50_max(v);
    format!("{} / {}", ms(p50), ms(max))
}

/// Lists one kind as a watcher's first list does (`Init`, `InitApply` each, `InitDone`);
/// returns the wall and thread-CPU time spent in `Index::apply`.
fn list<K: Indexed>(index: &mut Index, count: usize, make: impl Fn(usize) -> K) -> (Duration, Duration) {
    let (mut wall, mut cpu) = (Duration::ZERO, Duration::ZERO);
    let (_, w, c) = timed(|| index.apply(Event::<K>::Init));
    (wall, cpu) = (wall + w, cpu + c);
    for start in (0..count).step_by(CHUNK) {
        let objects: Vec<K> = (start..(start + CHUNK).min(count)).map(&make).collect();
        let (_, w, c) = timed(|| {
            for o in objects {
                index.apply(Event::InitApply(o));
            }
        });
        (wall, cpu) = (wall + w, cpu + c);
    }
    let (_, w, c) = timed(|| index.apply(Event::<K>::InitDone));
    (wall + w, cpu + c)
}

fn main() {
    let scale = Scale::from_env();
    let started = Instant::now();
    println!(
        "control_scale: {} Services (1 port each, ClusterIP), {} endpoints ({} per Service, one EndpointSlice each), {} meshed Pods, {} Namespaces; {} Watch streams on {} connections, {} of them on the changed Service; {} changes",
        scale.services,
        scale.pods(),
        scale.endpoints_per_service,
        scale.pods(),
        scale.namespaces,
        scale.streams,
        scale.connections,
        scale.affected,
        scale.changes,
    );
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |name: &str, value: String| {
        println!("  {name}: {value}");
        rows.push((name.to_string(), value));
    };

    // ---- 1. the first complete list, and the first policy ----
    let (rss_start, _) = rss();
    let heap_start = live_heap();
    let mut index = Index::new(IndexConfig {
        cluster_domain: CLUSTER_DOMAIN.to_string(),
        trust_domain: CLUSTER_DOMAIN.to_string(),
        default_inbound: Default::default(),
    });
    let s = scale;
    let lists = [
        list(&mut index, s.namespaces, namespace),
        list(&mut index, s.services, |i| service(&s, i)),
        list(&mut index, s.services, |i| slice(&s, i, None)),
        list(&mut index, s.pods(), |i| {
            pod(&s, i / s.endpoints_per_service, i % s.endpoints_per_service)
        }),
    ];
    let sync_wall: Duration = lists.iter().map(|(w, _)| *w).sum();
    let sync_cpu: Duration = lists.iter().map(|(_, c)| *c).sum();
    assert!(index.is_synced(&[Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Namespace]));
    assert!(index.rejected().is_empty(), "rejected: {:?}", index.rejected());
    let heap_index = live_heap() - heap_start;
    let (rss_index, _) = rss();
    row(
        "initial sync into the index (Index::apply of every listed object)",
        format!(
            "{} wall, {} CPU (Services {} · slices {} · Pods {} CPU)",
            ms(sync_wall),
            ms(sync_cpu),
            ms(lists[1].1),
            ms(lists[2].1),
            ms(lists[3].1)
        ),
    );

    let (policy, build_wall, build_cpu) = timed(|| index.policy());
    let heap_policy = live_heap() - heap_start - heap_index;
    let (rss_policy, _) = rss();
    assert_eq!(policy.destinations.len(), 2 * s.services);
    assert_eq!(policy.workloads.len(), s.pods());
    row(
        "first policy (Index::policy)",
        format!(
            "{} wall, {} CPU: {} destinations, {} workloads",
            ms(build_wall),
            ms(build_cpu),
            policy.destinations.len(),
            policy.workloads.len()
        ),
    );
    row(
        "heap: index / policy",
        format!("{} / {}", mib(heap_index), mib(heap_policy)),
    );
    row(
        "RSS: at start / after the sync / after the first policy",
        format!("{} / {} / {}", mib(rss_start), mib(rss_index), mib(rss_policy)),
    );

    // ---- 2a. one change, step by step, on the index alone ----
    let destinations: Vec<Authority> = (0..s.streams)
        .map(|i| stream_destination(&s, i).parse().expect("valid destination"))
        .collect();
    let mut previous = policy;
    let mut steps: HashMap<&str, Vec<Duration>> = HashMap::new();
    for k in 0..s.direct_changes {
        let event = Event::Apply(slice(&s, 0, Some(k % s.endpoints_per_service)));
        let (_, _, c) = timed(|| index.apply(event));
        steps.entry("apply").or_default().push(c);
        let (next, _, c) = timed(|| index.policy());
        steps.entry("policy").or_default().push(c);
        let (equal, _, c) = timed(|| previous == next);
        assert!(!equal);
        steps.entry("compare").or_default().push(c);
        let (_, _, c) = timed(|| {
            for d in &destinations {
                std::hint::black_box(visible_update(&next, d, None));
            }
        });
        steps.entry("streams").or_default().push(c);
        let (_, _, c) = timed(|| drop(std::mem::replace(&mut previous, next)));
        steps.entry("drop").or_default().push(c);
    }
    drop(previous);
    // Every endpoint ready again: the streams open on that state, and the first change below
    // differs from it.
    index.apply(Event::Apply(slice(&s, 0, None)));
    let step = |name: &str| p50_max_str(steps.get(name).map(Vec::as_slice).unwrap_or(&[]));
    row(
        "one change on the index alone, CPU p50 / max: apply the slice",
        step("apply"),
    );
    row("  rebuild the policy (Index::policy)", step("policy"));
    row("  compare with the served policy (==)", step("compare"));
    row(
        &format!("  {} streams' updates (visible_update each)", s.streams),
        step("streams"),
    );
    row("  free the old policy", step("drop"));

    // ---- 2b. end to end: the index task, the gRPC server, the streams ----
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-clients")
        .enable_all()
        .build()
        .expect("client runtime");
    let shutdown = CancellationToken::new();
    let (updates_tx, updates_rx) = mpsc::unbounded_channel::<Update>();
    let (synced_tx, synced_rx) = oneshot::channel::<PolicyWatch>();
    let following = follow(
        index,
        vec![Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Namespace],
        tokio_stream::wrappers::UnboundedReceiverStream::new(updates_rx),
        synced_tx,
        shutdown.clone(),
    );
    // As `KubernetesSource::start` runs it: a thread of its own driving the runtime's I/O.
    let handle = server_rt.handle().clone();
    let index_thread = std::thread::Builder::new()
        .name("pillion-k8s-index".to_string())
        .spawn(move || handle.block_on(following))
        .expect("index thread");
    let mut index_clock: libc::clockid_t = 0;
    // SAFETY: the thread is alive until shutdown (it waits for updates); the id is written once.
    let got_clock = unsafe { libc::pthread_getcpuclockid(index_thread.as_pthread_t(), &mut index_clock) };
    assert_eq!(got_clock, 0, "pthread_getcpuclockid");

    // The index is synced: the next event publishes the first policy.
    let first = Instant::now();
    let republish: Update = Box::new(|index: &mut Index| index.apply(Event::Apply(namespace(0))));
    assert!(updates_tx.send(republish).is_ok(), "index task running");
    let policy_watch = server_rt.block_on(synced_rx).expect("first publication");
    row("first publication by the index task", ms(first.elapsed()));

    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    let trust_domain: TrustDomain = CLUSTER_DOMAIN.parse().expect("trust domain");
    let generated = ca::generate(&trust_domain).expect("CA");
    let ca = CertificateAuthority::from_pem(
        &generated.issuer_cert_pem,
        &generated.issuer_key_pem,
        &generated.root_cert_pem,
        trust_domain,
        Duration::from_secs(3600),
    )
    .expect("CA");
    let plane = ControlPlane {
        ca: Arc::new(ca),
        authenticator: Arc::new(TokenFile::parse("[]").expect("empty token file")),
        policy: policy_watch,
        transport: Transport::Plaintext,
        limits: Limits::default(),
    };
    server_rt.spawn(server::serve(listener, plane, shutdown.clone()));

    // Each stream reports every update it receives: (stream, when, endpoints in it).
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, Instant, usize)>();
    let opened = Instant::now();
    client_rt.block_on(async {
        let mut channels = Vec::with_capacity(s.connections);
        for _ in 0..s.connections {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .tcp_nodelay(true)
                .connect()
                .await
                .expect("connect to the control plane");
            channels.push(channel);
        }
        for i in 0..s.streams {
            let mut client = DiscoveryClient::new(channels[i % s.connections].clone());
            let destination = stream_destination(&s, i);
            let seen = seen_tx.clone();
            tokio::spawn(async move {
                let mut stream = client
                    .watch(WatchRequest { destination })
                    .await
                    .expect("watch")
                    .into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    if seen.send((i, Instant::now(), update.endpoints.len())).is_err() {
                        return;
                    }
                }
            });
        }
        // Every stream's first message: the destination's state when it opened.
        for _ in 0..s.streams {
            let (_, _, endpoints) = seen_rx.recv().await.expect("initial update");
            assert_eq!(endpoints, s.endpoints_per_service);
        }
    });
    row(
        &format!("{} streams opened, first state received", s.streams),
        ms(opened.elapsed()),
    );

    // Idle: what the process costs with nothing changing.
    let (cpu0, wall0) = (process_cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu_per_s = (process_cpu() - cpu0).as_secs_f64() / wall0.elapsed().as_secs_f64();

    let (mut to_first, mut to_all, mut cpu, mut index_cpu) = (vec![], vec![], vec![], vec![]);
    let mut unexpected = 0usize;
    let heap_before = live_heap();
    for k in 0..s.changes {
        // Built (as the watcher deserialises it) before the clock starts.
        let event = Event::Apply(slice(&s, 0, Some(k % s.endpoints_per_service)));
        let (cpu_start, index_start) = (process_cpu(), clock(index_clock));
        let sent = Instant::now();
        let update: Update = Box::new(move |index: &mut Index| index.apply(event));
        assert!(updates_tx.send(update).is_ok(), "index task running");
        let mut arrived: Vec<Instant> = Vec::with_capacity(s.affected);
        client_rt.block_on(async {
            while arrived.len() < s.affected {
                let next = tokio::time::timeout(CHANGE_TIMEOUT, seen_rx.recv()).await;
                let (i, at, endpoints) = next
                    .expect("change reached every affected stream")
                    .expect("streams open");
                if i < s.affected {
                    assert_eq!(endpoints, s.endpoints_per_service - 1, "one endpoint not ready");
                    arrived.push(at);
                } else {
                    unexpected += 1;
                }
            }
        });
        std::thread::sleep(SETTLE);
        cpu.push(process_cpu() - cpu_start);
        index_cpu.push(clock(index_clock) - index_start);
        to_first.push(arrived.iter().min().map_or(Duration::ZERO, |t| *t - sent));
        to_all.push(arrived.iter().max().map_or(Duration::ZERO, |t| *t - sent));
    }
    // Anything else a stream received, late.
    while let Ok((i, ..)) = seen_rx.try_recv() {
        if i >= s.affected {
            unexpected += 1;
        }
    }
    let (rss_end, hwm_end) = rss();
    let idle_during_settle = Duration::from_secs_f64(idle_cpu_per_s * SETTLE.as_secs_f64());
    row(
        &format!(
            "change → all {} affected streams have it, p50 / max over {}",
            s.affected, s.changes
        ),
        p50_max_str(&to_all),
    );
    row("change → first affected stream, p50 / max", p50_max_str(&to_first));
    row(
        "process CPU per change, p50 / max (index task, server, streams, clients)",
        p50_max_str(&cpu),
    );
    row("  of which the index task's thread, p50 / max", p50_max_str(&index_cpu));
    row(
        "idle process CPU in the settle time after each change (included above)",
        ms(idle_during_settle),
    );
    row(
        "updates received by streams of unchanged Services",
        unexpected.to_string(),
    );
    row(
        "heap after the changes (index + served policy + server + clients) / change in it",
        format!("{} / {}", mib(live_heap() - heap_start), mib(live_heap() - heap_before)),
    );
    row(
        "RSS at the end / peak (VmHWM)",
        format!("{} / {}", mib(rss_end), mib(hwm_end)),
    );
    row("whole run", format!("{:.0} s", started.elapsed().as_secs_f64()));

    println!();
    println!("| figure | value |");
    println!("|---|---|");
    for (name, value) in &rows {
        println!("| {} | {} |", name.trim(), value);
    }
    shutdown.cancel();
    // Tearing down 100,000 Pods' worth of index and a thousand connections measures nothing.
    std::process::exit(0);
}
