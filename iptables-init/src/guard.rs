//! Refusing inbound IPv6 when IPv6 is not redirected: a pure function from the policy and the
//! live IPv6 filter table to the restore input.
//!
//! Without IPv6 redirects, a client that reaches the pod over IPv6 (a global address, or the
//! link-local one every IPv6 interface has) would talk to the app directly: no mTLS, no
//! authorization, no metrics. Istio closes the same gap by rejecting inbound IPv6 when it does
//! not capture it; we do it for TCP, the traffic the proxy would have carried:
//!
//! - loopback stays open (the app's own `::1` traffic);
//! - the inbound ports to ignore stay open, as they bypass the proxy over IPv4 too (probes);
//! - every other new inbound TCP connection (a SYN without ACK) is answered with a reset, so a
//!   client fails at once instead of timing out.
//!
//! Only connection attempts are matched, so the replies to the app's own outgoing IPv6
//! connections (SYN-ACK and everything after) pass, with no connection tracking needed. The
//! chain is entered first from INPUT, before any foreign ACCEPT could let a SYN through.

use crate::{
    config::RedirectPolicy,
    rules::{Hook, render, rule},
    ruleset::{Ruleset, Table},
};

pub const GUARD_CHAIN: &str = "PILLION_INPUT";

const GUARD_HOOKS: [Hook; 1] = [Hook {
    builtin: "INPUT",
    chain: GUARD_CHAIN,
    comment: "IPv6 is not redirected: inbound IPv6 TCP goes through PILLION_INPUT",
    first: true,
}];

/// The `ip6tables-restore --noflush` input that installs (or reconciles) the refusal.
pub fn install(policy: &RedirectPolicy, existing: &Ruleset) -> String {
    let mut body = vec![rule(GUARD_CHAIN, "-i lo", "loopback stays open", "-j RETURN")];
    body.extend(policy.inbound_ports_to_ignore.iter().map(|ports| {
        rule(
            GUARD_CHAIN,
            &format!("-p tcp -m tcp --dport {}", ports.dport()),
            &format!("inbound port {ports} skips the proxy"),
            "-j RETURN",
        )
    }));
    // `--syn`, spelled the way iptables-save prints it back.
    body.push(rule(
        GUARD_CHAIN,
        "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN",
        "refuse inbound IPv6 TCP, which would bypass the proxy",
        "-j REJECT --reject-with tcp-reset",
    ));
    render(Table::Filter, &GUARD_HOOKS, existing, &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{golden::assert_golden, ports::parse_port_ranges};

    fn policy(ignore: &str) -> RedirectPolicy {
        RedirectPolicy {
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uid: 2102,
            proxy_gid: None,
            inbound_ports_to_ignore: parse_port_ranges(ignore).unwrap(),
            outbound_ports_to_ignore: vec![],
            outbound_subnets_to_ignore: vec![],
        }
    }

    #[test]
    fn defaults() {
        assert_golden("guard_v6.rules", &install(&policy("4191"), &Ruleset::default()));
    }

    #[test]
    fn every_ignored_inbound_port_stays_open() {
        let out = install(&policy("4190,4191,9000-9100"), &Ruleset::default());
        for port in ["4190", "4191", "9000:9100"] {
            assert!(out.contains(&format!("--dport {port} ")), "{port}: {out}");
        }
    }

    #[test]
    fn a_rerun_keeps_the_jump_and_adds_no_second_one() {
        let out = install(&policy("4191"), &Ruleset::default());
        let installed = Ruleset::parse_table(&out.replace("-I INPUT 1 ", "-A INPUT "), Table::Filter);
        let again = install(&policy("4191"), &installed);
        assert!(!again.contains("INPUT -m comment"), "{again}");
        assert!(again.contains(":PILLION_INPUT - [0:0]"), "{again}");
    }
}
