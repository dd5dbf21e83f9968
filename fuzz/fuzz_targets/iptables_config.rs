//! `pillion-iptables-init`'s port and subnet settings (`iptables-init/src/ports.rs`, `cidr.rs`,
//! read by `config.rs`), as operators write them in flags and environment variables.
//!
//! Input: the setting's text. Checks: no panic; an accepted port list has only ports 1-65535,
//! ranges in order, no duplicates, and reads back the same from its own spelling; an accepted
//! subnet list has no host bits set, contains its own network address, and reads back the same.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use pillion_iptables_init::{
    cidr::{parse_cidr, parse_cidrs},
    ports::{parse_port, parse_port_ranges},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(port) = parse_port(text) {
        assert_ne!(port, 0);
    }
    if let Ok(ranges) = parse_port_ranges(text) {
        for (i, r) in ranges.iter().enumerate() {
            assert!(r.first >= 1 && r.first <= r.last, "{r:?} from {text:?}");
            assert!(!ranges[..i].contains(r), "{r} twice from {text:?}");
            assert!(r.contains(r.first) && r.contains(r.last));
            let dport = r.dport();
            assert!(dport.bytes().all(|b| b.is_ascii_digit() || b == b':'), "{dport}");
        }
        let spelled = ranges.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        assert_eq!(
            parse_port_ranges(&spelled).as_ref(),
            Ok(&ranges),
            "{spelled:?} from {text:?}"
        );
    }
    if let Ok(cidrs) = parse_cidrs(text) {
        for (i, c) in cidrs.iter().enumerate() {
            assert!(!cidrs[..i].contains(c), "{c} twice from {text:?}");
            let spelled = c.to_string();
            let (network, prefix) = spelled.split_once('/').expect("network/prefix");
            let network: IpAddr = network.parse().expect("an address");
            let prefix: u8 = prefix.parse().expect("a prefix length");
            assert!(prefix <= if network.is_ipv4() { 32 } else { 128 });
            assert!(c.contains(network), "{c} does not contain its own network");
            assert_eq!(parse_cidr(&spelled), Ok(*c), "{spelled} from {text:?}");
        }
    }
});
