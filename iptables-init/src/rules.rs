//! The rules themselves: a pure function from the redirect policy and the nat table as it is now
//! to the `iptables-restore --noflush` input that makes it what it should be.
//!
//! Our chains are declared with `:CHAIN - [0:0]`, which creates or flushes them, so their
//! contents are rewritten on every run. The jumps into them from the built-in PREROUTING and
//! OUTPUT chains live outside our chains and `-A` would duplicate them, so they are reconciled
//! against what exists: one unconditional jump is kept, any other jump into a `PILLION_` chain
//! from those hooks is deleted, and chains left over from an older layout are removed. The result
//! is one transaction (one `COMMIT`) per family.

use crate::{
    config::RedirectPolicy,
    family::Family,
    ruleset::{Ruleset, SavedRule, Table, is_ours},
};

pub const INBOUND_CHAIN: &str = "PILLION_PREROUTING";
pub const OUTBOUND_CHAIN: &str = "PILLION_OUTPUT";

/// Where each of our chains is entered from, and the comment on that jump.
pub struct Hook {
    pub builtin: &'static str,
    pub chain: &'static str,
    pub comment: &'static str,
    /// Insert the jump first in the built-in chain rather than append it: for a jump that must
    /// come before any foreign verdict (a refusal that an earlier ACCEPT would defeat).
    pub first: bool,
}

const HOOKS: [Hook; 2] = [
    Hook {
        builtin: "PREROUTING",
        chain: INBOUND_CHAIN,
        comment: "send inbound traffic through PILLION_PREROUTING",
        first: false,
    },
    Hook {
        builtin: "OUTPUT",
        chain: OUTBOUND_CHAIN,
        comment: "send outbound traffic through PILLION_OUTPUT",
        first: false,
    },
];

/// The restore input that installs (or reconciles) the rules for one family.
pub fn install(policy: &RedirectPolicy, family: Family, existing: &Ruleset) -> String {
    let body: Vec<String> = inbound_rules(policy)
        .into_iter()
        .chain(outbound_rules(policy, family))
        .collect();
    render(Table::Nat, &HOOKS, existing, &body)
}

/// One transaction that makes `table` hold exactly our `hooks`' chains with `body` in them: the
/// chains declared (created or flushed), stale jumps and chains of ours removed, the body
/// appended, and each hook's jump added unless it is already there.
pub fn render(table: Table, hooks: &[Hook], existing: &Ruleset, body: &[String]) -> String {
    let mut out = format!("*{table}\n");
    for hook in hooks {
        out.push_str(&format!(":{} - [0:0]\n", hook.chain));
    }

    let (kept, stale_jumps) = reconcile_jumps(existing, hooks);
    for rule in stale_jumps {
        out.push_str(&format!("-D {} {}\n", rule.chain, rule.spec));
    }
    // Chains of ours that this version no longer uses: flush all before deleting any, since
    // they may refer to each other.
    let stale_chains: Vec<&str> = existing
        .our_chains()
        .filter(|c| !hooks.iter().any(|h| h.chain == *c))
        .collect();
    for chain in &stale_chains {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &stale_chains {
        out.push_str(&format!("-X {chain}\n"));
    }

    for rule in body {
        out.push_str(rule);
        out.push('\n');
    }
    for (hook, present) in hooks.iter().zip(kept) {
        if !present {
            // `-I CHAIN 1` reads back from iptables-save as an `-A CHAIN` line, the first one.
            let position = match hook.first {
                true => format!("-I {} 1", hook.builtin),
                false => format!("-A {}", hook.builtin),
            };
            let spec = format!("-m comment --comment \"pillion: {}\" -j {}", hook.comment, hook.chain);
            out.push_str(&format!("{position} {spec}\n"));
        }
    }
    out.push_str("COMMIT\n");
    out
}

/// Which hooks already have their jump (to keep), and which jumps into our chains must go:
/// duplicates, conditional variants and jumps to chains we no longer use.
fn reconcile_jumps<'a>(existing: &'a Ruleset, hooks: &[Hook]) -> (Vec<bool>, Vec<&'a SavedRule>) {
    let mut kept = vec![false; hooks.len()];
    let mut stale = Vec::new();
    for rule in existing.rules.iter().filter(|r| !is_ours(&r.chain)) {
        let Some(target) = rule.target().filter(|t| is_ours(t)) else {
            continue;
        };
        match hooks.iter().position(|h| h.builtin == rule.chain) {
            Some(i) if !kept[i] && target == hooks[i].chain && rule.is_unconditional() => {
                kept[i] = true;
            }
            Some(_) => stale.push(rule),
            // A foreign chain jumping into one of ours is left alone, unless that chain is
            // about to be deleted (the delete would fail while it is referenced).
            None if !hooks.iter().any(|h| h.chain == target) => stale.push(rule),
            None => {}
        }
    }
    (kept, stale)
}

/// PILLION_PREROUTING: ignored ports go straight to the app, all other TCP to the proxy.
fn inbound_rules(policy: &RedirectPolicy) -> Vec<String> {
    let mut rules: Vec<String> = policy
        .inbound_ports_to_ignore
        .iter()
        .map(|ports| {
            rule(
                INBOUND_CHAIN,
                &format!("-p tcp -m tcp --dport {}", ports.dport()),
                &format!("inbound port {ports} skips the proxy"),
                "-j RETURN",
            )
        })
        .collect();
    rules.push(rule(
        INBOUND_CHAIN,
        "-p tcp",
        &format!("inbound TCP to the proxy on port {}", policy.inbound_port),
        &format!("-j REDIRECT --to-ports {}", policy.inbound_port),
    ));
    rules
}

/// PILLION_OUTPUT: the proxy's own traffic, loopback, ignored ports and subnets stay direct;
/// all other TCP goes to the proxy.
fn outbound_rules(policy: &RedirectPolicy, family: Family) -> Vec<String> {
    let mut rules = vec![rule(
        OUTBOUND_CHAIN,
        &format!("-m owner --uid-owner {}", policy.proxy_uid),
        &format!("the proxy (uid {}) connects directly", policy.proxy_uid),
        "-j RETURN",
    )];
    if let Some(gid) = policy.proxy_gid {
        rules.push(rule(
            OUTBOUND_CHAIN,
            &format!("-m owner --gid-owner {gid}"),
            &format!("the proxy (gid {gid}) connects directly"),
            "-j RETURN",
        ));
    }
    // Traffic to the pod's own addresses is routed via lo too, so this also keeps app-to-self
    // traffic direct.
    rules.push(rule(
        OUTBOUND_CHAIN,
        "-o lo",
        "loopback destinations, including the pod IP, stay direct",
        "-j RETURN",
    ));
    for ports in &policy.outbound_ports_to_ignore {
        rules.push(rule(
            OUTBOUND_CHAIN,
            &format!("-p tcp -m tcp --dport {}", ports.dport()),
            &format!("outbound port {ports} skips the proxy"),
            "-j RETURN",
        ));
    }
    for subnet in policy
        .outbound_subnets_to_ignore
        .iter()
        .filter(|s| s.family() == family)
    {
        rules.push(rule(
            OUTBOUND_CHAIN,
            &format!("-d {subnet}"),
            &format!("subnet {subnet} skips the proxy"),
            "-j RETURN",
        ));
    }
    rules.push(rule(
        OUTBOUND_CHAIN,
        "-p tcp",
        &format!("outbound TCP to the proxy on port {}", policy.outbound_port),
        &format!("-j REDIRECT --to-ports {}", policy.outbound_port),
    ));
    rules
}

/// One `-A` line, written the way iptables-save prints it back (matches, comment, target), so
/// the dry-run output and the live ruleset read the same. Comments must not contain `'` or `"`.
pub fn rule(chain: &str, matches: &str, comment: &str, target: &str) -> String {
    let matches = if matches.is_empty() {
        String::new()
    } else {
        format!("{matches} ")
    };
    format!("-A {chain} {matches}-m comment --comment \"pillion: {comment}\" {target}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cidr::parse_cidrs, golden::assert_golden, ports::parse_port_ranges};

    fn defaults() -> RedirectPolicy {
        RedirectPolicy {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uid: 2102,
            proxy_gid: None,
            inbound_ports_to_ignore: parse_port_ranges("4191").unwrap(),
            outbound_ports_to_ignore: vec![],
            outbound_subnets_to_ignore: vec![],
        }
    }

    fn everything() -> RedirectPolicy {
        RedirectPolicy {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uid: 1337,
            proxy_gid: Some(1338),
            inbound_ports_to_ignore: parse_port_ranges("4190,4191,9000-9100").unwrap(),
            outbound_ports_to_ignore: parse_port_ranges("25,443,8000-8999").unwrap(),
            outbound_subnets_to_ignore: parse_cidrs("10.0.0.0/8,fd00::/8,169.254.169.254,2001:db8::/32").unwrap(),
        }
    }

    fn testdata(name: &str) -> String {
        let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn defaults_v4() {
        let out = install(&defaults(), Family::V4, &Ruleset::default());
        assert_golden("defaults_v4.rules", &out);
    }

    #[test]
    fn defaults_v6() {
        let out = install(&defaults(), Family::V6, &Ruleset::default());
        assert_golden("defaults_v6.rules", &out);
    }

    #[test]
    fn everything_set_v4_gets_only_v4_subnets() {
        let out = install(&everything(), Family::V4, &Ruleset::default());
        assert_golden("everything_v4.rules", &out);
        assert!(!out.contains("fd00::/8"));
    }

    #[test]
    fn everything_set_v6_gets_only_v6_subnets() {
        let out = install(&everything(), Family::V6, &Ruleset::default());
        assert_golden("everything_v6.rules", &out);
        assert!(!out.contains("10.0.0.0/8"));
    }

    #[test]
    fn rerun_with_jumps_present_adds_no_jumps() {
        let existing = Ruleset::parse(&testdata("installed_v4.save"));
        let out = install(&defaults(), Family::V4, &existing);
        assert_golden("rerun_v4.rules", &out);
        assert!(!out.contains("-A PREROUTING"));
        assert!(!out.contains("-A OUTPUT"));
        assert!(!out.contains("-D "));
    }

    #[test]
    fn reconcile_removes_duplicates_conditional_jumps_and_old_chains() {
        let existing = Ruleset::parse(&testdata("messy_v4.save"));
        let out = install(&defaults(), Family::V4, &existing);
        assert_golden("reconcile_v4.rules", &out);
    }

    #[test]
    fn every_rule_carries_a_pillion_comment() {
        for family in [Family::V4, Family::V6] {
            let out = install(&everything(), family, &Ruleset::default());
            for line in out.lines().filter(|l| l.starts_with("-A")) {
                assert!(line.contains("-m comment --comment \"pillion: "), "{line}");
                assert!(!line.contains('\''), "{line}");
            }
        }
    }

    #[test]
    fn installed_output_parses_back_to_itself() {
        // What we print must read back as the same chains and jumps we reconcile against.
        let out = install(&defaults(), Family::V4, &Ruleset::default());
        let parsed = Ruleset::parse(&out);
        assert_eq!(parsed.user_chains, [INBOUND_CHAIN, OUTBOUND_CHAIN]);
        let again = install(&defaults(), Family::V4, &parsed);
        assert!(!again.contains("-A PREROUTING") && !again.contains("-A OUTPUT"));
    }
}
