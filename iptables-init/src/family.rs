//! The two address families the rules are installed for, and how each one's tools are named.
//!
//! IPv4 and IPv6 have separate netfilter tables (`iptables-*` and `ip6tables-*`), so everything
//! downstream (rule text, backend commands, the validation probe) is done once per family.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The tool prefix: `iptables` or `ip6tables`.
    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}
