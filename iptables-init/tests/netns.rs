//! End to end: the real binary, run with `ip netns exec` inside fresh network namespaces, checked
//! against what `iptables-*-save` reports afterwards.
//!
//! Each test creates its own namespace (`pillion-it-<pid>-<n>`) with `lo` up and a veth pair
//! whose both ends stay inside it: one end has the addresses and the default route, so the
//! `--validate` probe has a route, and forwarding is off, so nothing it sends goes anywhere.
//! (A dummy interface would do too, but not every kernel ships the module.) A guard deletes the
//! namespace even when an assertion fails. Every command that touches the network runs inside
//! the namespace. Needs root and the iptables tools; without them each test says so and passes,
//! except under `CI=true`, where it fails.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

const BIN: &str = env!("CARGO_BIN_EXE_pillion-iptables-init");

/// What these tests run besides the binary: `ip`, `sysctl`, and both backends' tools for both
/// families.
const REQUIRED_TOOLS: [&str; 10] = [
    "ip",
    "sysctl",
    "iptables-nft-save",
    "iptables-nft-restore",
    "ip6tables-nft-save",
    "ip6tables-nft-restore",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
];

/// Why these tests cannot run here (not root, a tool missing), if they cannot.
fn cannot_run() -> Option<String> {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    if unsafe { libc::geteuid() } != 0 {
        return Some("creating network namespaces and changing iptables needs root".to_string());
    }
    let sbin = ["/usr/sbin", "/sbin", "/usr/local/sbin"].map(std::path::PathBuf::from);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<_> = std::env::split_paths(&path).chain(sbin).collect();
    let missing: Vec<&str> = REQUIRED_TOOLS
        .into_iter()
        .filter(|tool| !dirs.iter().any(|dir| dir.join(tool).is_file()))
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!(
            "missing programs: {} (install iptables and iproute2)",
            missing.join(", ")
        ))
    }
}

/// Skips the test with a note, except under `CI=true`, where not running is a failure: a green
/// CI that skipped these tests would prove nothing.
macro_rules! require_root {
    () => {
        if let Some(reason) = cannot_run() {
            if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
                panic!("cannot run in CI: {reason}");
            }
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

/// A network namespace that is deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    /// `lo` up, `veth0` at 10.11.12.2/24 with a default route.
    fn new() -> Netns {
        let ns = Netns::bare();
        ns.ok(&["ip", "route", "add", "default", "dev", "veth0"]);
        ns
    }

    /// Like `new`, plus a global (ULA) IPv6 address and an IPv6 default route.
    fn dual_stack() -> Netns {
        let ns = Netns::new();
        ns.ok(&["ip", "-6", "addr", "add", "fd00:11:12::2/64", "dev", "veth0", "nodad"]);
        ns.ok(&["ip", "-6", "route", "add", "default", "dev", "veth0"]);
        ns
    }

    /// Addresses but no default route.
    fn bare() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "pillion-it-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(status.is_ok_and(|s| s.success()), "ip netns add {name} failed");
        // From here on the guard owns the namespace, so a failed setup still cleans up.
        let ns = Netns { name };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns.ok(&["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]);
        ns.ok(&["ip", "link", "set", "veth0", "up"]);
        ns.ok(&["ip", "link", "set", "veth1", "up"]);
        ns.ok(&["ip", "addr", "add", "10.11.12.2/24", "dev", "veth0"]);
        ns
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        // The binary must see only the variables a test sets.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PILLION_INIT_") {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("ip netns exec runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn init(&self, args: &[&str]) -> Output {
        self.init_with_env(args, &[])
    }

    fn init_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut argv = vec![BIN];
        argv.extend_from_slice(args);
        let mut cmd = self.command(&argv);
        cmd.envs(env.iter().copied());
        cmd.output().expect("the binary runs")
    }

    /// Runs the binary and insists on success; returns its stdout.
    fn init_ok(&self, args: &[&str]) -> String {
        let out = self.init(args);
        assert!(
            out.status.success(),
            "{args:?} exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `<tool> -t nat` without comment lines (timestamps, warnings) and with counters zeroed.
    fn save(&self, tool: &str) -> String {
        self.save_table(tool, "nat")
    }

    /// `<tool> -t <table>`, cleaned like [`Netns::save`].
    fn save_table(&self, tool: &str, table: &str) -> String {
        self.ok(&[tool, "-t", table])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.find('[')) {
                (true, Some(at)) => format!("{}[0:0]\n", &l[..at]),
                _ => format!("{l}\n"),
            })
            .collect()
    }

    /// Every table the binary could touch (nat, and IPv6 filter), for "nothing changed"
    /// comparisons.
    fn save_all(&self) -> String {
        [
            ("iptables-nft-save", "nat"),
            ("ip6tables-nft-save", "nat"),
            ("ip6tables-nft-save", "filter"),
            ("iptables-legacy-save", "nat"),
            ("ip6tables-legacy-save", "nat"),
            ("ip6tables-legacy-save", "filter"),
        ]
        .iter()
        .map(|(tool, table)| format!("== {tool} -t {table}\n{}", self.save_table(tool, table)))
        .collect()
    }

    fn restore(&self, tool: &str, input: &str) {
        let mut child = self
            .command(&[tool, "--noflush"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("restore runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write rules");
        assert!(
            child.wait().expect("restore exits").success(),
            "{tool} rejected {input}"
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|l| l.starts_with(needle)).count()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const PREROUTING_JUMP: &str = "-A PREROUTING -m comment --comment \"pillion: send inbound traffic through PILLION_PREROUTING\" -j PILLION_PREROUTING";
const OUTPUT_JUMP: &str =
    "-A OUTPUT -m comment --comment \"pillion: send outbound traffic through PILLION_OUTPUT\" -j PILLION_OUTPUT";
const FOREIGN_RULES: &str = "*nat\n:app-dns - [0:0]\n\
    -A OUTPUT -p udp -m udp --dport 53 -m comment --comment \"the app's DNS hook\" -j app-dns\n\
    -A app-dns -j RETURN\nCOMMIT\n";

#[test]
fn install_writes_the_rules_and_a_rerun_changes_nothing() {
    require_root!();
    let ns = Netns::new();
    ns.init_ok(&[]);
    // Backend detection must not create a legacy nat table (nft listings would then warn).
    assert!(!ns.ok(&["cat", "/proc/net/ip_tables_names"]).contains("nat"));
    let first = ns.save("iptables-nft-save");
    for expected in [
        PREROUTING_JUMP,
        OUTPUT_JUMP,
        "-A PILLION_PREROUTING -p tcp -m tcp --dport 4191 ",
        "-A PILLION_PREROUTING -p tcp -m comment --comment \"pillion: inbound TCP to the proxy on port 4143\" -j REDIRECT --to-ports 4143",
        "-A PILLION_OUTPUT -m owner --uid-owner 2102 ",
        "-A PILLION_OUTPUT -o lo ",
        "-A PILLION_OUTPUT -p tcp -m comment --comment \"pillion: outbound TCP to the proxy on port 4140\" -j REDIRECT --to-ports 4140",
    ] {
        assert_eq!(count(&first, expected), 1, "{expected}\nin\n{first}");
    }
    // auto with nothing anywhere picks nft; no global IPv6 address means no IPv6 rules.
    assert_eq!(count(&ns.save("iptables-legacy-save"), "-A "), 0);
    assert_eq!(count(&ns.save("ip6tables-nft-save"), "-A "), 0);

    ns.init_ok(&[]);
    assert_eq!(ns.save("iptables-nft-save"), first, "a re-run must change nothing");
}

#[test]
fn dry_run_prints_the_restore_input_and_changes_nothing() {
    require_root!();
    let ns = Netns::new();
    let before = ns.save_all();
    let printed = ns.init_ok(&["--dry-run"]);
    assert!(
        printed.starts_with("# IPv4 nat table: iptables-nft-restore --noflush\n*nat\n"),
        "{printed}"
    );
    assert_eq!(count(&printed, PREROUTING_JUMP), 1, "{printed}");
    assert_eq!(count(&printed, OUTPUT_JUMP), 1, "{printed}");
    assert!(printed.ends_with("COMMIT\n"), "{printed}");
    assert_eq!(ns.save_all(), before);

    // Once installed, the dry run shows a re-run adds no jumps.
    ns.init_ok(&[]);
    let installed = ns.save_all();
    let printed = ns.init_ok(&["--dry-run"]);
    assert_eq!(
        count(&printed, "-A PREROUTING") + count(&printed, "-A OUTPUT"),
        0,
        "{printed}"
    );
    assert_eq!(ns.save_all(), installed);
}

#[test]
fn cleanup_restores_the_original_ruleset_and_keeps_foreign_rules() {
    require_root!();
    let ns = Netns::new();
    ns.restore("iptables-nft-restore", FOREIGN_RULES);
    let original = ns.save("iptables-nft-save");

    ns.init_ok(&[]);
    assert_ne!(ns.save("iptables-nft-save"), original);
    ns.init_ok(&["--cleanup"]);
    assert_eq!(ns.save("iptables-nft-save"), original);

    // Nothing left to remove is still success.
    ns.init_ok(&["--cleanup"]);
    assert_eq!(ns.save("iptables-nft-save"), original);
}

/// A command line or environment the binary must reject, and what its message must say.
struct BadValue {
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    says: &'static str,
}

#[test]
fn bad_values_exit_2_with_one_line_and_touch_nothing() {
    require_root!();
    let ns = Netns::new();
    let before = ns.save_all();
    let cases = [
        BadValue {
            args: &["--inbound-port", "abc"],
            env: &[],
            says: "invalid value 'abc' for --inbound-port (PILLION_INIT_INBOUND_PORT): ",
        },
        BadValue {
            args: &[],
            env: &[("PILLION_INIT_OUTBOUND_PORT", "0")],
            says: "invalid value '0' for --outbound-port (PILLION_INIT_OUTBOUND_PORT): ",
        },
        BadValue {
            args: &["--inbound-ports-to-ignore", "9100-9000"],
            env: &[],
            says: "'9100-9000' for --inbound-ports-to-ignore (PILLION_INIT_INBOUND_PORTS_TO_IGNORE)",
        },
        BadValue {
            args: &[],
            env: &[("PILLION_INIT_OUTBOUND_SUBNETS_TO_IGNORE", "10.0.0.0/33")],
            says: "'10.0.0.0/33' for --outbound-subnets-to-ignore \
                   (PILLION_INIT_OUTBOUND_SUBNETS_TO_IGNORE)",
        },
        BadValue {
            args: &["--inbound-port", "4140"],
            env: &[],
            says: "must differ from --inbound-port",
        },
        BadValue {
            args: &["--backend", "iptables"],
            env: &[],
            says: "'iptables' for --backend (PILLION_INIT_BACKEND): expected one of auto, legacy, nft",
        },
        BadValue {
            args: &["--bogus"],
            env: &[],
            says: "'--bogus'",
        },
    ];
    for BadValue { args, env, says } in cases {
        let out = ns.init_with_env(args, env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {err}");
        assert!(
            err.starts_with("pillion-iptables-init: ") && err.contains(says),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(ns.save_all(), before);
}

#[test]
fn nat_rules_in_the_other_backend_are_refused_and_auto_joins_the_backend_in_use() {
    require_root!();
    let ns = Netns::new();
    ns.restore("iptables-legacy-restore", FOREIGN_RULES);
    let before = ns.save_all();
    let legacy_before = ns.save("iptables-legacy-save");

    // Installing into nft while legacy has nat rules would leave both evaluated.
    let nft = ns.init(&["--backend", "nft"]);
    assert_eq!(nft.status.code(), Some(1));
    let err = stderr(&nft);
    assert!(err.contains("the legacy backend already has 2 nat rule(s)"), "{err}");
    assert!(
        err.contains("use --backend legacy") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(ns.save_all(), before, "a refusal changes nothing");

    // auto goes where the rules already are; cleanup there restores the original.
    ns.init_ok(&[]);
    assert_eq!(count(&ns.save("iptables-legacy-save"), PREROUTING_JUMP), 1);
    assert_eq!(count(&ns.save("iptables-nft-save"), "-A "), 0);
    ns.init_ok(&["--cleanup"]);
    assert_eq!(ns.save("iptables-legacy-save"), legacy_before);

    // With nat rules in both backends, every choice refuses.
    ns.restore("iptables-nft-restore", FOREIGN_RULES);
    let both = ns.save_all();
    let auto = ns.init(&[]);
    assert_eq!(auto.status.code(), Some(1));
    assert!(
        stderr(&auto).contains("both iptables backends have nat rules (legacy: 2, nft: 2)"),
        "{}",
        stderr(&auto)
    );
    let legacy = ns.init(&["--backend", "legacy"]);
    assert_eq!(legacy.status.code(), Some(1));
    assert!(
        stderr(&legacy).contains("both iptables backends have nat rules"),
        "{}",
        stderr(&legacy)
    );
    assert_eq!(ns.save_all(), both);
}

#[test]
fn validate_passes_after_install() {
    require_root!();
    let ns = Netns::new();
    let out = ns.init_ok(&["--validate"]);
    assert!(
        out.contains("validated IPv4: outbound TCP to 192.0.2.1:80 arrived at port 4140"),
        "{out}"
    );
}

#[test]
fn validate_passes_with_ipv6_on() {
    require_root!();
    let ns = Netns::dual_stack();
    let out = ns.init_ok(&["--validate", "--ipv6", "on"]);
    assert!(out.contains("validated IPv4:"), "{out}");
    assert!(
        out.contains("validated IPv6: outbound TCP to [2001:db8::1]:80 arrived at port 4140"),
        "{out}"
    );
    let v6 = ns.save("ip6tables-nft-save");
    assert_eq!(count(&v6, PREROUTING_JUMP), 1, "{v6}");
    assert_eq!(count(&v6, OUTPUT_JUMP), 1, "{v6}");
}

#[test]
fn ipv6_auto_installs_ip6tables_rules_when_the_pod_has_a_global_address() {
    require_root!();
    let ns = Netns::dual_stack();
    ns.init_ok(&["--outbound-subnets-to-ignore", "10.0.0.0/8,fd00::/8"]);
    let (v4, v6) = (ns.save("iptables-nft-save"), ns.save("ip6tables-nft-save"));
    assert_eq!(count(&v6, OUTPUT_JUMP), 1, "{v6}");
    assert!(v6.contains("-d fd00::/8 ") && !v6.contains("10.0.0.0/8"), "{v6}");
    assert!(v4.contains("-d 10.0.0.0/8 ") && !v4.contains("fd00::/8"), "{v4}");

    // auto cleanup finds the IPv6 rules too.
    ns.init_ok(&["--cleanup"]);
    assert_eq!(count(&ns.save("ip6tables-nft-save"), "-A "), 0);
    assert_eq!(count(&ns.save("iptables-nft-save"), "-A "), 0);
}

#[test]
fn validate_fails_when_a_foreign_rule_bypasses_the_redirect() {
    require_root!();
    let ns = Netns::new();
    ns.restore(
        "iptables-nft-restore",
        "*nat\n-A OUTPUT -p tcp -m tcp --dport 80 -j RETURN\nCOMMIT\n",
    );
    let out = ns.init(&["--validate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("IPv4 validation failed: the probe to 192.0.2.1:80 timed out"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn validate_reports_a_missing_route_and_adds_none() {
    require_root!();
    let ns = Netns::bare();
    let out = ns.init(&["--validate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no route to 192.0.2.1"), "{}", stderr(&out));
    assert_eq!(ns.ok(&["ip", "route", "show", "default"]), "");
}

#[test]
fn a_family_that_fails_rolls_back_the_families_already_applied() {
    require_root!();
    let ns = Netns::dual_stack();
    ns.restore("iptables-nft-restore", FOREIGN_RULES);
    // A foreign chain entered from PREROUTING that jumps into PILLION_OUTPUT: the owner match
    // we put there is only valid for locally generated traffic, so the IPv6 transaction fails.
    ns.restore(
        "ip6tables-nft-restore",
        "*nat\n:PILLION_OUTPUT - [0:0]\n:odd - [0:0]\n-A PREROUTING -j odd\n\
         -A odd -j PILLION_OUTPUT\nCOMMIT\n",
    );
    let before = ns.save_all();

    let out = ns.init(&["--ipv6", "on"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ip6tables-nft-restore rejected the IPv6 rules"), "{err}");
    assert!(
        err.contains("the IPv4 (nft) nat table was restored to its previous state"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(ns.save_all(), before);
}

const INPUT_JUMP: &str = "-A INPUT -m comment --comment \"pillion: IPv6 is not redirected: inbound IPv6 TCP goes through PILLION_INPUT\" -j PILLION_INPUT";
const REFUSAL: &str = "-A PILLION_INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment \"pillion: refuse inbound IPv6 TCP, which would bypass the proxy\" -j REJECT --reject-with tcp-reset";

/// The `-A` lines of a saved table, in order.
fn rules(saved: &str) -> Vec<&str> {
    saved.lines().filter(|l| l.starts_with("-A ")).collect()
}

#[test]
fn ipv6_that_is_not_redirected_is_refused_and_a_rerun_changes_nothing() {
    require_root!();
    // Link-local IPv6 only: auto does not redirect IPv6, but a neighbour could still use it.
    let ns = Netns::new();
    ns.restore(
        "ip6tables-nft-restore",
        "*filter\n-A INPUT -p tcp -m tcp --dport 8080 -m comment --comment \"the app's own\" -j ACCEPT\nCOMMIT\n",
    );
    let out = ns.init_ok(&[]);
    assert!(
        out.contains("IPv6 is not redirected: inbound IPv6 TCP is refused with ip6tables-nft"),
        "{out}"
    );
    let filter = ns.save_table("ip6tables-nft-save", "filter");
    let installed = rules(&filter);
    // Our jump comes first, before the foreign ACCEPT that would otherwise let the SYN through.
    assert_eq!(installed.first(), Some(&INPUT_JUMP), "{filter}");
    assert!(installed[1].contains("--dport 8080"), "{filter}");
    assert_eq!(
        installed[2..].to_vec(),
        [
            "-A PILLION_INPUT -i lo -m comment --comment \"pillion: loopback stays open\" -j RETURN",
            "-A PILLION_INPUT -p tcp -m tcp --dport 4191 -m comment --comment \"pillion: inbound port 4191 skips the proxy\" -j RETURN",
            REFUSAL,
        ],
        "{filter}"
    );
    assert_eq!(count(&ns.save("ip6tables-nft-save"), "-A "), 0, "no IPv6 redirects");

    ns.init_ok(&[]);
    assert_eq!(
        ns.save_table("ip6tables-nft-save", "filter"),
        filter,
        "a re-run must change nothing"
    );
    let validated = ns.init_ok(&["--validate"]);
    assert!(
        validated.contains("validated IPv6: not redirected, and INPUT first sends it to PILLION_INPUT"),
        "{validated}"
    );

    // Cleanup removes ours and keeps the foreign rule.
    ns.init_ok(&["--cleanup"]);
    let after = ns.save_table("ip6tables-nft-save", "filter");
    assert_eq!(rules(&after).len(), 1, "{after}");
    assert!(!after.contains("PILLION_"), "{after}");
}

#[test]
fn switching_ipv6_redirection_on_and_off_reconciles_both_tables() {
    require_root!();
    let ns = Netns::dual_stack();
    let v6 = |table| ns.save_table("ip6tables-nft-save", table);

    ns.init_ok(&["--ipv6", "off"]);
    assert_eq!(count(&v6("filter"), INPUT_JUMP), 1);
    assert!(!v6("nat").contains("PILLION_"));

    // On: the IPv6 redirects arrive and the refusal goes.
    let out = ns.init_ok(&["--ipv6", "on"]);
    assert!(out.contains("removed from ip6tables-nft"), "{out}");
    assert_eq!(count(&v6("nat"), PREROUTING_JUMP), 1);
    assert!(!v6("filter").contains("PILLION_"), "{}", v6("filter"));

    // Off again: the other way round.
    let out = ns.init_ok(&["--ipv6", "off"]);
    assert!(out.contains("IPv6 redirects of an earlier run removed"), "{out}");
    assert!(!v6("nat").contains("PILLION_"), "{}", v6("nat"));
    assert_eq!(count(&v6("filter"), INPUT_JUMP), 1);
    assert_eq!(count(&v6("filter"), REFUSAL), 1);
}

#[test]
fn without_ipv6_nothing_is_refused() {
    require_root!();
    let ns = Netns::new();
    // IPv6 off on every interface: nothing can arrive over it, so nothing is installed for it.
    ns.ok(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns.ok(&["sysctl", "-qw", "net.ipv6.conf.veth0.disable_ipv6=1"]);
    ns.ok(&["sysctl", "-qw", "net.ipv6.conf.veth1.disable_ipv6=1"]);
    let out = ns.init_ok(&[]);
    assert!(!out.contains("IPv6"), "{out}");
    assert!(!ns.save_table("ip6tables-nft-save", "filter").contains("PILLION_"));
}
