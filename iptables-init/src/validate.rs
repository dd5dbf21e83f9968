//! `--validate`: proving, after applying, that redirection works in this namespace.
//!
//! Outbound is proved end to end: a listener on the outbound port, and a TCP connect from this
//! process (not the proxy's uid, so its traffic is subject to the rules) to a documentation
//! address (RFC 5737 / RFC 3849) that nothing answers. The probe's TTL / hop limit is 1, so if
//! the rules do not catch it the SYN dies at the first hop instead of leaving the pod. Success
//! means our listener accepted it and `SO_ORIGINAL_DST` is the address we dialled.
//!
//! Inbound cannot be proved the same way: packets generated inside the namespace never traverse
//! PREROUTING, and sending some from outside would mean changing the pod's network. So the live
//! ruleset is read back and checked instead, and the inbound port must be free for the proxy.
//!
//! A failed check leaves the rules in place (a re-run reconciles them); the non-zero exit is
//! what stops the pod from starting with broken interception.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    backend::{self, Backend},
    config::RedirectPolicy,
    error::Error,
    family::Family,
    guard::GUARD_CHAIN,
    rules::INBOUND_CHAIN,
    ruleset::{Ruleset, Table},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The handshake completed before connect returned, so the connection is already queued.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Documentation addresses: routed like any remote address, owned by nobody.
const PROBE_V4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(192, 0, 2, 1),
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(203, 0, 113, 1),
];
const PROBE_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 1),
];

/// Runs both checks for one family; returns a one-line summary of what was proved.
pub fn validate(backend: Backend, family: Family, policy: &RedirectPolicy) -> Result<String, Error> {
    let fail = |reason: String| Error::Validation { family, reason };
    check_not_exempt(policy).map_err(fail)?;

    let live = Ruleset::parse(&backend::save_nat(backend, family)?);
    check_inbound_rules(&live, policy.inbound_port).map_err(fail)?;
    bind_listener(family, policy.inbound_port)
        .map_err(|e| fail(format!("the inbound port {} cannot be bound: {e}", policy.inbound_port)))?;

    let target = probe_target(family, policy).ok_or_else(|| {
        fail("every probe address or port is in an ignore list, so outbound redirection cannot be probed".to_string())
    })?;
    probe_outbound(family, target, policy.outbound_port).map_err(fail)?;
    Ok(format!(
        "{family}: outbound TCP to {target} arrived at port {}; inbound rules redirect to port {}",
        policy.outbound_port, policy.inbound_port
    ))
}

/// IPv6 not redirected: the live filter table must refuse inbound IPv6 TCP. (Proving it with a
/// packet would need one from outside the namespace, like the inbound redirect.)
pub fn validate_refusal(backend: Backend) -> Result<String, Error> {
    let family = Family::V6;
    let live = Ruleset::parse_table(&backend::save(backend, family, Table::Filter)?, Table::Filter);
    check_refusal_rules(&live).map_err(|reason| Error::Validation { family, reason })?;
    Ok(format!(
        "{family}: not redirected, and INPUT first sends it to {GUARD_CHAIN}, which refuses inbound TCP"
    ))
}

/// INPUT must enter our chain first and unconditionally; our chain must end refusing TCP.
fn check_refusal_rules(live: &Ruleset) -> Result<(), String> {
    let first = live.rules_in("INPUT").next();
    if !first.is_some_and(|r| r.target() == Some(GUARD_CHAIN) && r.is_unconditional()) {
        return Err(format!("INPUT does not start with a jump to {GUARD_CHAIN}"));
    }
    let last = live.rules_in(GUARD_CHAIN).last();
    if !last.is_some_and(|r| r.target() == Some("REJECT") && r.option("-p") == Some("tcp")) {
        return Err(format!("{GUARD_CHAIN} does not end by refusing TCP"));
    }
    Ok(())
}

/// The probe must be subject to the rules: the proxy's own uid/gid are exempt by design.
fn check_not_exempt(policy: &RedirectPolicy) -> Result<(), String> {
    // SAFETY: geteuid and getegid cannot fail and touch no memory of ours.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == policy.proxy_uid || policy.proxy_gid == Some(gid) {
        return Err(format!(
            "running as the proxy's user (uid {uid}, gid {gid}), whose traffic is exempt; run \
             --validate as another user"
        ));
    }
    Ok(())
}

/// PREROUTING must enter our chain unconditionally, and our chain must end in the redirect.
fn check_inbound_rules(live: &Ruleset, inbound_port: u16) -> Result<(), String> {
    if !live
        .rules_in("PREROUTING")
        .any(|r| r.target() == Some(INBOUND_CHAIN) && r.is_unconditional())
    {
        return Err(format!("PREROUTING has no jump to {INBOUND_CHAIN}"));
    }
    let last = live.rules_in(INBOUND_CHAIN).last();
    let redirects = last.is_some_and(|r| {
        r.target() == Some("REDIRECT")
            && r.option("-p") == Some("tcp")
            && r.option("--to-ports") == Some(inbound_port.to_string().as_str())
    });
    if !redirects {
        return Err(format!(
            "{INBOUND_CHAIN} does not end by redirecting TCP to port {inbound_port}"
        ));
    }
    Ok(())
}

/// A destination the rules must redirect: not in an ignored subnet, not on an ignored port.
fn probe_target(family: Family, policy: &RedirectPolicy) -> Option<SocketAddr> {
    let addrs: Vec<IpAddr> = match family {
        Family::V4 => PROBE_V4.iter().copied().map(IpAddr::V4).collect(),
        Family::V6 => PROBE_V6.iter().copied().map(IpAddr::V6).collect(),
    };
    let addr = addrs
        .into_iter()
        .find(|a| !policy.outbound_subnets_to_ignore.iter().any(|s| s.contains(*a)))?;
    let port = [80, 443, 8080].into_iter().chain(1024..=u16::MAX).find(|p| {
        !policy.outbound_ports_to_ignore.iter().any(|r| r.contains(*p))
            && *p != policy.outbound_port
            && *p != policy.inbound_port
    })?;
    Some(SocketAddr::new(addr, port))
}

fn probe_outbound(family: Family, target: SocketAddr, outbound_port: u16) -> Result<(), String> {
    let listener = bind_listener(family, outbound_port)
        .map_err(|e| format!("cannot listen on the outbound port {outbound_port} for the probe: {e}"))?;
    let client = Socket::new(domain(family), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("cannot create the probe socket: {e}"))?;
    match family {
        Family::V4 => client.set_ttl_v4(1),
        Family::V6 => client.set_unicast_hops_v6(1),
    }
    .map_err(|e| format!("cannot limit the probe to one hop: {e}"))?;

    if let Err(e) = client.connect_timeout(&SockAddr::from(target), CONNECT_TIMEOUT) {
        return Err(match e.kind() {
            io::ErrorKind::NetworkUnreachable => format!(
                "no route to {} in this namespace, so outbound redirection cannot be probed \
                 (nothing was added; give the namespace a default route, or run without --validate)",
                target.ip()
            ),
            io::ErrorKind::TimedOut => {
                format!("the probe to {target} timed out: outbound TCP is not redirected to port {outbound_port}")
            }
            io::ErrorKind::ConnectionRefused => {
                format!("the probe to {target} was refused: it was not redirected to port {outbound_port}")
            }
            _ => format!("the probe to {target} failed: {e}"),
        });
    }
    let probe_local = client.local_addr().ok().and_then(|a| a.as_socket());

    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let accepted = loop {
        match listener.accept() {
            Ok((socket, peer)) if peer.as_socket() == probe_local => break socket,
            // Someone else's connection: not ours to judge, keep waiting for the probe.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(format!(
                    "the probe to {target} connected, but not through port {outbound_port}: \
                     another rule or process took it"
                ));
            }
            Err(e) => return Err(format!("accepting the probe failed: {e}")),
        }
    };
    let original = match family {
        Family::V4 => accepted.original_dst_v4(),
        Family::V6 => accepted.original_dst_v6(),
    }
    .map_err(|e| format!("reading the probe's original destination failed: {e}"))?;
    match original.as_socket() {
        Some(dst) if dst == target => Ok(()),
        other => Err(format!(
            "the probe arrived with original destination {} instead of {target}",
            other.map_or_else(|| "unknown".to_string(), |a| a.to_string())
        )),
    }
}

/// A non-blocking listener on the wildcard address of the family; IPv6 only for IPv6, so the
/// two families' checks never collide on one dual-stack socket.
fn bind_listener(family: Family, port: u16) -> io::Result<Socket> {
    let socket = Socket::new(domain(family), Type::STREAM, Some(Protocol::TCP))?;
    let addr = match family {
        Family::V4 => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        Family::V6 => {
            socket.set_only_v6(true)?;
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
        }
    };
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(16)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn domain(family: Family) -> Domain {
    match family {
        Family::V4 => Domain::IPV4,
        Family::V6 => Domain::IPV6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cidr::parse_cidrs, ports::parse_port_ranges, rules};

    fn policy() -> RedirectPolicy {
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

    #[test]
    fn installed_rules_pass_the_inbound_check() {
        let text = rules::install(&policy(), Family::V4, &Ruleset::default());
        let live = Ruleset::parse(&text);
        assert_eq!(check_inbound_rules(&live, 4143), Ok(()));
        assert!(check_inbound_rules(&live, 4000).unwrap_err().contains("port 4000"));
    }

    #[test]
    fn a_missing_jump_or_redirect_fails_the_inbound_check() {
        let no_jump = "*nat\n:PILLION_PREROUTING - [0:0]\n\
                       -A PILLION_PREROUTING -p tcp -j REDIRECT --to-ports 4143\nCOMMIT\n";
        assert!(
            check_inbound_rules(&Ruleset::parse(no_jump), 4143)
                .unwrap_err()
                .contains("no jump")
        );
        let no_redirect = "*nat\n:PILLION_PREROUTING - [0:0]\n-A PREROUTING -j PILLION_PREROUTING\n\
                           -A PILLION_PREROUTING -p tcp -j RETURN\nCOMMIT\n";
        assert!(check_inbound_rules(&Ruleset::parse(no_redirect), 4143).is_err());
        assert!(check_inbound_rules(&Ruleset::default(), 4143).is_err());
    }

    #[test]
    fn the_refusal_check_reads_the_installed_guard_back() {
        let installed = crate::guard::install(&policy(), &Ruleset::default()).replace("-I INPUT 1 ", "-A INPUT ");
        assert_eq!(
            check_refusal_rules(&Ruleset::parse_table(&installed, Table::Filter)),
            Ok(())
        );
        let foreign_first = installed.replacen("-A INPUT ", "-A INPUT -p udp -j ACCEPT\n-A INPUT ", 1);
        assert!(check_refusal_rules(&Ruleset::parse_table(&foreign_first, Table::Filter)).is_err());
        assert!(check_refusal_rules(&Ruleset::default()).is_err());
    }

    #[test]
    fn the_probe_avoids_ignored_subnets_and_ports() {
        assert_eq!(
            probe_target(Family::V4, &policy()),
            Some("192.0.2.1:80".parse().unwrap())
        );
        assert_eq!(
            probe_target(Family::V6, &policy()),
            Some("[2001:db8::1]:80".parse().unwrap())
        );

        let mut p = policy();
        p.outbound_subnets_to_ignore = parse_cidrs("192.0.2.0/24,2001:db8::/32").unwrap();
        p.outbound_ports_to_ignore = parse_port_ranges("1-443").unwrap();
        assert_eq!(probe_target(Family::V4, &p), Some("198.51.100.1:8080".parse().unwrap()));
        assert_eq!(probe_target(Family::V6, &p), Some("[3fff::1]:8080".parse().unwrap()));

        p.outbound_subnets_to_ignore = parse_cidrs("0.0.0.0/0").unwrap();
        assert_eq!(probe_target(Family::V4, &p), None);
        p.outbound_subnets_to_ignore = vec![];
        p.outbound_ports_to_ignore = parse_port_ranges("1-65535").unwrap();
        assert_eq!(probe_target(Family::V4, &p), None);
    }
}
