//! Whether the pod speaks IPv6, and therefore whether ip6tables rules are needed.
//!
//! `--ipv6 auto` installs IPv6 rules when the namespace has a global IPv6 address. That is read
//! from `/proc/net/if_inet6` (one line per address: hex address, ifindex, prefix length, scope,
//! flags, interface name; scope `00` is global), which needs no tools and reflects the current
//! network namespace. Link-local and loopback addresses do not count: they exist on every
//! IPv6-enabled interface and carry no pod traffic worth redirecting.

use std::io;

const IF_INET6: &str = "/proc/net/if_inet6";

/// True if any non-loopback interface has a global-scope address.
pub fn has_global_address(if_inet6: &str) -> bool {
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_addr, _index, _prefix, "00", _flags, name] if *name != "lo")
    })
}

/// True if any interface but `lo` has an IPv6 address of any scope (link-local included): then
/// a neighbour can reach the pod over IPv6, and unless IPv6 is redirected it must be refused.
pub fn has_non_loopback_address(if_inet6: &str) -> bool {
    if_inet6.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_addr, _index, _prefix, _scope, _flags, name] if *name != "lo")
    })
}

/// The current namespace's IPv6 addresses, or `None` when the kernel has IPv6 disabled
/// (the file is then absent).
pub fn read_if_inet6() -> io::Result<Option<String>> {
    match std::fs::read_to_string(IF_INET6) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO_AND_LINK_LOCAL: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
fe80000000000000b0c1d2fffee3f4a5 02 40 20 80     eth0
";

    #[test]
    fn loopback_and_link_local_are_not_enough() {
        assert!(!has_global_address(LO_AND_LINK_LOCAL));
        assert!(!has_global_address(""));
    }

    #[test]
    fn a_global_address_on_a_real_interface_counts() {
        let with_global = format!("{LO_AND_LINK_LOCAL}fd000001000000000000000000000002 02 40 00 80     eth0\n");
        assert!(has_global_address(&with_global));
        // Tentative (DAD still running) is still the pod's address.
        assert!(has_global_address(
            "20010db8000000000000000000000005 03 40 00 c0 net1\n"
        ));
    }

    #[test]
    fn a_global_scope_on_lo_does_not_count() {
        assert!(!has_global_address("20010db8000000000000000000000005 01 80 00 80 lo\n"));
    }

    #[test]
    fn a_link_local_address_makes_the_pod_reachable_over_ipv6() {
        assert!(has_non_loopback_address(LO_AND_LINK_LOCAL));
        assert!(!has_non_loopback_address(
            "00000000000000000000000000000001 01 80 10 80 lo\n"
        ));
        assert!(!has_non_loopback_address(""));
    }

    #[test]
    fn malformed_lines_are_ignored() {
        assert!(!has_global_address("not an if_inet6 line\n00 eth0\n"));
    }
}
