//! The channel between a proxy and its control plane, attacked from the pod network.
//!
//! A pod (network namespace with iptables-init and the proxy as UID 2102) and a control plane in
//! a namespace of its own, joined by a veth. Someone who can watch that link must not learn the
//! workload's token; a control plane the trust anchors do not vouch for must not be believed; a
//! certificate for someone else must not be installed, even from the genuine control plane.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use pillion_tests::mesh::{ControlPlane, ControlPlaneOptions, MeshFiles, Workload, identity_env};
use pillion_tests::netns::{Netns, VethEnd, VethLink};
use pillion_tests::pod::PodOptions;
use pillion_tests::process::{LogDir, Process};
use pillion_tests::require_root;
use pillion_tests::sidecar::{AdminPort, Sidecar};

const CONTROL_PORT: u16 = 8090;

/// Third octet of the next test's subnet (`10.203.<n>.0/24`).
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(1);

/// A pod and a control-plane namespace on one link. Drops the link before the namespaces.
struct Link {
    _link: VethLink,
    pod: Netns,
    control: Netns,
    control_addr: SocketAddr,
}

impl Link {
    fn new(tag: &str) -> Link {
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 250 + 1;
        let (pod_ip, control_ip) = (Ipv4Addr::new(10, 203, n, 1), Ipv4Addr::new(10, 203, n, 2));
        let pod = Netns::new(&format!("{tag}-pod"));
        let control = Netns::new(&format!("{tag}-cp"));
        let link = VethLink::new(
            VethEnd {
                ns: &pod,
                ifname: "eth0",
                ipv4: pod_ip,
                ipv6: None,
            },
            VethEnd {
                ns: &control,
                ifname: "eth0",
                ipv4: control_ip,
                ipv6: None,
            },
        );
        Link {
            _link: link,
            pod,
            control,
            control_addr: SocketAddr::from((control_ip, CONTROL_PORT)),
        }
    }

    /// `pillion-control serve` with `files`, in the control-plane namespace.
    fn start_control(&self, files: &MeshFiles, logs: &LogDir) -> ControlPlane {
        ControlPlane::start(
            files,
            Some(&self.control),
            self.control_addr,
            &ControlPlaneOptions::default(),
            logs,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The pod's sidecar options: the control plane is reached directly, not through the proxy.
    fn pod_options(&self, control: &ControlPlane, files: &MeshFiles, workload: &Workload) -> PodOptions {
        identity_env(PodOptions::default(), control, files, workload)
            .init_args(["--outbound-ports-to-ignore", &CONTROL_PORT.to_string()])
    }
}

/// Everything on the wire between the pod and the control plane, with what the proxy sent in
/// its certificate request among it.
#[test]
fn no_token_crosses_the_pod_network_in_the_clear() {
    if !require_root("no_token_crosses_the_pod_network_in_the_clear") {
        return;
    }
    let logs = LogDir::new("cp-capture");
    let link = Link::new("cpcap");
    let client = Workload::new("default", "client");
    let files = MeshFiles::create(logs.path(), &[&client]).unwrap_or_else(|e| panic!("{e}"));

    // tcpdump on the control plane's side of the link, packets written as they arrive.
    let capture_file = logs.path().join("control-channel.pcap");
    let mut tcpdump = link.control.command("tcpdump");
    tcpdump
        // Immediate mode: each packet is handed over as it arrives, not in timed blocks.
        .args(["-i", "eth0", "--immediate-mode", "-U", "-s", "0", "-w"])
        .arg(&capture_file)
        .args(["tcp", "port", &CONTROL_PORT.to_string()]);
    let mut capture = Process::spawn("tcpdump", tcpdump, &logs);
    let listening = pillion_tests::poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        capture.log().contains("listening on").then_some(())
    });
    assert!(listening.is_some(), "tcpdump did not start: {}", capture.log());

    let control = link.start_control(&files, &logs);
    // Ready means the certificate request (token included) went over the link and was answered.
    let _sidecar = Sidecar::start(&link.pod, "a", &link.pod_options(&control, &files, &client), &logs)
        .unwrap_or_else(|e| panic!("{e}"));
    // The operator sees whom the proxy verified it was talking to.
    let identity = AdminPort::of_pod(&link.pod).get("/identity").expect("GET /identity");
    let body = identity.body;
    assert!(
        body.contains(r#""verified_identity":"spiffe://cluster.local/ns/pillion-system/sa/pillion-control""#)
            && body.contains(r#""security":"tls""#),
        "{body}"
    );

    // A canary sent in the clear over the same link proves the capture sees payloads.
    const CANARY: &[u8] = b"pillion-capture-canary-7d3f";
    let mut conn = link
        .pod
        .connect(link.control_addr)
        .expect("reach the control plane's port");
    std::io::Write::write_all(&mut conn, CANARY).unwrap();
    drop(conn);
    // Until tcpdump has written the canary's packet.
    pillion_tests::poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let written = std::fs::read(&capture_file).unwrap_or_default();
        contains(&written, CANARY).then_some(())
    });

    capture.signal(libc::SIGINT);
    assert!(
        capture.wait_timeout(Duration::from_secs(5)).is_some(),
        "tcpdump did not stop"
    );
    let packets = std::fs::read(&capture_file).expect("the capture file");
    assert!(
        contains(&packets, CANARY),
        "the capture ({} bytes) does not show cleartext payloads; it proves nothing",
        packets.len()
    );
    assert!(
        !contains(&packets, client.token.as_bytes()),
        "the workload's token crossed the pod network in the clear"
    );
    assert!(control.process_id() > 0);
}

/// A control plane with a certificate from another CA, which even knows the workload's token,
/// is never sent that token's request and never believed: the proxy does not become ready.
#[test]
fn a_control_plane_the_trust_anchors_do_not_vouch_for_is_refused() {
    if !require_root("a_control_plane_the_trust_anchors_do_not_vouch_for_is_refused") {
        return;
    }
    let logs = LogDir::new("cp-rogue");
    let link = Link::new("cprogue");
    let client = Workload::new("default", "client");
    let genuine_dir = logs.path().join("genuine");
    let rogue_dir = logs.path().join("rogue");
    for dir in [&genuine_dir, &rogue_dir] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let genuine = MeshFiles::create(&genuine_dir, &[&client]).unwrap_or_else(|e| panic!("{e}"));
    let rogue_files = MeshFiles::create(&rogue_dir, &[&client]).unwrap_or_else(|e| panic!("{e}"));
    let rogue = link.start_control(&rogue_files, &logs);

    // The proxy trusts the genuine anchors only.
    let options = link.pod_options(&rogue, &genuine, &client);
    let refused = Sidecar::start(&link.pod, "a", &options, &logs).expect_err("a proxy believed a rogue control plane");
    assert!(refused.contains("not ready"), "{refused}");
    assert!(
        refused.contains("control plane connection failed") && refused.contains("certificate"),
        "the proxy should say why: {refused}"
    );
    let mut rogue = rogue;
    let rogue_log = rogue.process().log();
    assert!(
        !rogue_log.contains("/sa/client"),
        "the rogue control plane was asked for a certificate:\n{rogue_log}"
    );
}

/// The genuine control plane signs a certificate for another workload (a mapping error, or a
/// compromised control plane): the proxy, told who it is, refuses it and never becomes ready.
#[test]
fn a_certificate_for_another_identity_is_refused() {
    if !require_root("a_certificate_for_another_identity_is_refused") {
        return;
    }
    let logs = LogDir::new("cp-wrongid");
    let link = Link::new("cpwrong");
    let client = Workload::new("default", "client");
    // The control plane believes the client's token belongs to default/admin.
    let admin = Workload {
        service_account: "admin".to_owned(),
        ..client.clone()
    };
    let files = MeshFiles::create(logs.path(), &[&admin]).unwrap_or_else(|e| panic!("{e}"));
    let control = link.start_control(&files, &logs);
    let options = link.pod_options(&control, &files, &client).proxy_env(
        "PILLION_IDENTITY_TOKEN_FILE",
        &files.token_file(&admin).to_string_lossy(),
    );
    let refused =
        Sidecar::start(&link.pod, "a", &options, &logs).expect_err("a proxy installed someone else's identity");
    assert!(
        refused.contains("issued for spiffe://cluster.local/ns/default/sa/admin")
            && refused.contains("this proxy is spiffe://cluster.local/ns/default/sa/client"),
        "{refused}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn tcpdump_is_available() {
    // The capture test needs tcpdump; say so plainly rather than failing obscurely.
    if !require_root("tcpdump_is_available") {
        return;
    }
    let found = Command::new("tcpdump").arg("--version").output().is_ok();
    if std::env::var("CI").as_deref() == Ok("true") {
        assert!(found, "tcpdump is required (apt-get install tcpdump)");
    } else if !found {
        eprintln!("tcpdump is not installed: no_token_crosses_the_pod_network_in_the_clear will fail");
    }
}
