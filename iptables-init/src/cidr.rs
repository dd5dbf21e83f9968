//! Subnets (`10.0.0.0/8`, `fd00::/8`) whose outbound traffic bypasses the proxy.
//!
//! Host bits are cleared on parse (`10.1.2.3/8` becomes `10.0.0.0/8`), the way iptables stores
//! them, so the rules we print are the rules `iptables-save` prints back. A bare address is a
//! single host (`/32` or `/128`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::family::Family;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn family(self) -> Family {
        match self.network {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn contains(self, addr: IpAddr) -> bool {
        match (self.network, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => mask_v4(a, self.prefix) == net,
            (IpAddr::V6(net), IpAddr::V6(a)) => mask_v6(a, self.prefix) == net,
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// One CIDR or bare address, either family.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|e: std::net::AddrParseError| e.to_string())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix length '{p}' must be a number from 0 to {max}"))?,
    };
    let network = match addr {
        IpAddr::V4(a) => IpAddr::V4(mask_v4(a, prefix)),
        IpAddr::V6(a) => IpAddr::V6(mask_v6(a, prefix)),
    };
    Ok(Cidr { network, prefix })
}

/// A comma-separated list of CIDRs of either family; empty items are ignored, duplicates dropped.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let mut cidrs: Vec<Cidr> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let cidr = parse_cidr(item).map_err(|e| format!("'{item}': {e}"))?;
        if !cidrs.contains(&cidr) {
            cidrs.push(cidr);
        }
    }
    Ok(cidrs)
}

fn mask_v4(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(u32::from(addr) & mask)
}

fn mask_v6(addr: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(u128::from(addr) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> String {
        parse_cidr(s).unwrap().to_string()
    }

    #[test]
    fn both_families_parse_and_normalise() {
        assert_eq!(cidr("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3/8"), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3"), "10.1.2.3/32");
        assert_eq!(cidr("0.0.0.0/0"), "0.0.0.0/0");
        assert_eq!(cidr("fd00:1::5/64"), "fd00:1::/64");
        assert_eq!(cidr("2001:db8::1"), "2001:db8::1/128");
        assert_eq!(cidr("::/0"), "::/0");
        assert_eq!(parse_cidr("fd00::/8").unwrap().family(), Family::V6);
        assert_eq!(parse_cidr("192.168.0.0/16").unwrap().family(), Family::V4);
    }

    #[test]
    fn lists_keep_order_and_drop_duplicates() {
        let list = parse_cidrs("10.0.0.0/8, fd00::/8,,10.9.9.9/8").unwrap();
        let text: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["10.0.0.0/8", "fd00::/8"]);
        assert!(parse_cidrs("").unwrap().is_empty());
    }

    #[test]
    fn bad_values_say_which_item_and_why() {
        assert_eq!(
            parse_cidrs("10.0.0.0/8,10.0.0.0/33").unwrap_err(),
            "'10.0.0.0/33': prefix length '33' must be a number from 0 to 32"
        );
        assert_eq!(
            parse_cidrs("fd00::/129").unwrap_err(),
            "'fd00::/129': prefix length '129' must be a number from 0 to 128"
        );
        assert_eq!(
            parse_cidrs("example.com/24").unwrap_err(),
            "'example.com/24': invalid IP address syntax"
        );
        assert!(parse_cidr("10.0.0.0/").is_err());
        assert!(parse_cidr("10.0.0.0/-1").is_err());
    }

    #[test]
    fn containment_respects_family_and_prefix() {
        let net = parse_cidr("192.0.2.0/24").unwrap();
        assert!(net.contains("192.0.2.1".parse().unwrap()));
        assert!(!net.contains("198.51.100.1".parse().unwrap()));
        assert!(!net.contains("2001:db8::1".parse().unwrap()));
        assert!(parse_cidr("::/0").unwrap().contains("2001:db8::1".parse().unwrap()));
    }
}
