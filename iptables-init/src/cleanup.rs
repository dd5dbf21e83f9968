//! Removing what we installed: a pure function from the live nat table to the restore input
//! that deletes it, leaving every foreign rule alone.
//!
//! Ours is anything named `PILLION_*` plus the jumps into it. Jumps are deleted with `-D` and the
//! exact spec iptables-save printed, so nothing else can match; then every chain of ours is
//! flushed before any is deleted (they may refer to each other). All in one `COMMIT`.

use crate::ruleset::{Ruleset, Table, is_ours};

/// The restore input that removes our chains and jumps from `table`, or `None` when there is
/// nothing of ours.
pub fn uninstall(existing: &Ruleset, table: Table) -> Option<String> {
    let chains: Vec<&str> = existing.our_chains().collect();
    let jumps: Vec<_> = existing
        .rules
        .iter()
        .filter(|r| !is_ours(&r.chain) && r.target().is_some_and(is_ours))
        .collect();
    if chains.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut out = format!("*{table}\n");
    for rule in jumps {
        out.push_str(&format!("-D {} {}\n", rule.chain, rule.spec));
    }
    for chain in &chains {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &chains {
        out.push_str(&format!("-X {chain}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::assert_golden;

    fn testdata(name: &str) -> String {
        let path = format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn removes_our_jumps_and_chains_and_nothing_else() {
        let existing = Ruleset::parse(&testdata("cleanup_input.save"));
        let out = uninstall(&existing, Table::Nat).expect("there is something to remove");
        assert_golden("cleanup.rules", &out);
        // The foreign chain keeps its hook and itself; only its jump into our chain goes.
        assert!(!out.contains("--dport 53"));
        assert!(!out.contains("-F app-chain") && !out.contains("-X app-chain"));
        assert!(out.contains("-D app-chain -j PILLION_OUTPUT\n"));
    }

    #[test]
    fn nothing_installed_means_nothing_to_do() {
        let fresh = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                     -A OUTPUT -p udp -m udp --dport 53 -j RETURN\nCOMMIT\n";
        assert_eq!(uninstall(&Ruleset::parse(fresh), Table::Nat), None);
        assert_eq!(uninstall(&Ruleset::default(), Table::Nat), None);
    }

    #[test]
    fn a_dangling_jump_alone_is_still_removed() {
        let save = "*nat\n-A OUTPUT -j PILLION_OUTPUT\nCOMMIT\n";
        assert_eq!(
            uninstall(&Ruleset::parse(save), Table::Nat).as_deref(),
            Some("*nat\n-D OUTPUT -j PILLION_OUTPUT\nCOMMIT\n")
        );
    }

    #[test]
    fn removes_the_ipv6_refusal_from_the_filter_table() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:PILLION_INPUT - [0:0]\n\
                    -A INPUT -m comment --comment \"pillion: x\" -j PILLION_INPUT\n\
                    -A INPUT -p tcp -j ACCEPT\n\
                    -A PILLION_INPUT -p tcp -j REJECT --reject-with tcp-reset\nCOMMIT\n";
        assert_eq!(
            uninstall(&Ruleset::parse_table(save, Table::Filter), Table::Filter).as_deref(),
            Some(
                "*filter\n-D INPUT -m comment --comment \"pillion: x\" -j PILLION_INPUT\n\
                 -F PILLION_INPUT\n-X PILLION_INPUT\nCOMMIT\n"
            )
        );
    }
}
