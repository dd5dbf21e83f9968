//! The parsers of `pillion-iptables-init`'s port and subnet settings, as a library so the fuzz
//! targets (`fuzz/`) can reach them. The binary (`main.rs`) compiles the same modules itself.

pub mod cidr;
pub mod family;
pub mod ports;
