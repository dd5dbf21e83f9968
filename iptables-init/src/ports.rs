//! Ports and port ranges as operators write them (`4190,4191,9000-9100`).
//!
//! Parsing is strict (port 0, a backwards range or a stray word is an error) but forgiving about
//! layout: blanks around items and empty items (`"80,"` or `""`) are ignored, and duplicates are
//! dropped so every rule is installed once.

use std::fmt;

/// An inclusive range of TCP ports; a single port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The argument of iptables' `--dport`: `4191` or `9000:9100`.
    pub fn dport(self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }
}

/// The operator's spelling, used in comments and messages: `4191` or `9000-9100`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One TCP port, 1–65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    // Parsed wider than u16 so "70000" gets the range message rather than "number too large".
    let n: u32 = s.trim().parse().map_err(|e: std::num::ParseIntError| e.to_string())?;
    match u16::try_from(n) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("port {n} is out of range (1-65535)")),
    }
}

/// A comma-separated list of ports and `first-last` ranges.
pub fn parse_port_ranges(s: &str) -> Result<Vec<PortRange>, String> {
    let mut ranges: Vec<PortRange> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let range = parse_port_range(item).map_err(|e| format!("'{item}': {e}"))?;
        if !ranges.contains(&range) {
            ranges.push(range);
        }
    }
    Ok(ranges)
}

fn parse_port_range(item: &str) -> Result<PortRange, String> {
    let Some((first, last)) = item.split_once('-') else {
        let port = parse_port(item)?;
        return Ok(PortRange {
            first: port,
            last: port,
        });
    };
    let (first, last) = (parse_port(first)?, parse_port(last)?);
    if first > last {
        return Err(format!("range starts at {first}, after its end {last}"));
    }
    Ok(PortRange { first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn single_ports_and_ranges() {
        assert_eq!(
            parse_port_ranges("4190, 4191,9000-9100").unwrap(),
            vec![range(4190, 4190), range(4191, 4191), range(9000, 9100)]
        );
    }

    #[test]
    fn empty_items_and_duplicates_are_dropped() {
        assert_eq!(parse_port_ranges("").unwrap(), vec![]);
        assert_eq!(parse_port_ranges(" , 80,,80, ").unwrap(), vec![range(80, 80)]);
    }

    #[test]
    fn a_range_of_one_port_is_a_port() {
        assert_eq!(parse_port_ranges("25-25").unwrap(), vec![range(25, 25)]);
        assert_eq!(range(25, 25).dport(), "25");
        assert_eq!(range(9000, 9100).dport(), "9000:9100");
        assert_eq!(range(9000, 9100).to_string(), "9000-9100");
    }

    #[test]
    fn bad_values_say_which_item_and_why() {
        assert_eq!(parse_port("abc").unwrap_err(), "invalid digit found in string");
        assert_eq!(parse_port("0").unwrap_err(), "port 0 is out of range (1-65535)");
        assert_eq!(parse_port("70000").unwrap_err(), "port 70000 is out of range (1-65535)");
        assert_eq!(
            parse_port_ranges("80,9100-9000").unwrap_err(),
            "'9100-9000': range starts at 9100, after its end 9000"
        );
        assert_eq!(
            parse_port_ranges("80,http").unwrap_err(),
            "'http': invalid digit found in string"
        );
        assert!(parse_port_ranges("1-2-3").is_err());
        assert!(parse_port_ranges("-5").is_err());
    }

    #[test]
    fn contains_is_inclusive() {
        assert!(range(9000, 9100).contains(9000));
        assert!(range(9000, 9100).contains(9100));
        assert!(!range(9000, 9100).contains(9101));
    }
}
