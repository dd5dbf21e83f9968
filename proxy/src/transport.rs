//! Sockets: binding listeners, socket options on both sides of a connection, reading the
//! original destination that iptables' REDIRECT rewrote, and connecting upstream with a deadline.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Where a redirected connection was headed before iptables sent it to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst(pub SocketAddr);

/// Why an accepted connection cannot be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum NoTarget {
    /// The destination is this very listener: forwarding would connect back to ourselves.
    #[error("connection addressed to the proxy itself ({0}); refusing a forwarding loop")]
    Loop(SocketAddr),
    /// Not NATed at all (no conntrack entry), e.g. a listener reached without iptables rules.
    #[error("no original destination: {0}")]
    NoOriginalDst(io::Error),
    /// Inbound, addressed to something other than the pod (routed via the pod, or a loopback
    /// address): forwarding it would make the pod an open relay into itself and its network.
    #[error("original destination {0} is not one of the pod's addresses (PILLION_INBOUND_IPS)")]
    NotPodAddress(SocketAddr),
}

const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listener; `[::]` is dual-stack so one inbound listener serves both families.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_socket(addr, false)
}

/// Binds the IPv6 twin of an IPv4 listener on the same port (`[::]:4143` next to
/// `0.0.0.0:4143`): IPv6 only, since a dual-stack socket would clash with the IPv4 one.
pub fn bind_ipv6_only(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_socket(addr, true)
}

/// Whether a bind failed because this host has no IPv6 (disabled, or no `::1`), as opposed to
/// a real problem such as the port being taken.
pub fn is_ipv6_unavailable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

fn bind_socket(addr: SocketAddr, ipv6_only: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Explicit either way: the system default (net.ipv6.bindv6only) is not ours to trust.
        socket.set_only_v6(ipv6_only || !addr.ip().is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Options every proxied socket gets: no Nagle delay (we forward what we read at once) and
/// keepalive, so a peer that vanished without a FIN does not pin a connection forever.
pub fn set_stream_options(stream: &TcpStream, keepalive: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let ka = TcpKeepalive::new().with_time(keepalive).with_interval(keepalive);
    SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// Reads the pre-NAT destination of an accepted connection and refuses loops.
pub fn original_dst(stream: &TcpStream) -> Result<OriginalDst, NoTarget> {
    let local = stream.local_addr().map_err(NoTarget::NoOriginalDst)?;
    let local = unmap(local);
    let sock = SockRef::from(stream);
    // An IPv4 client on a dual-stack listener looks like `::ffff:a.b.c.d`, but its NAT state is
    // IPv4: only the SOL_IP call finds it (the IPv6 one returns ENOENT).
    let raw = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    }
    .map_err(NoTarget::NoOriginalDst)?;
    let dst = raw
        .as_socket()
        .map(unmap)
        .ok_or_else(|| NoTarget::NoOriginalDst(io::Error::other("not an IP socket address")))?;
    // A tracked but un-NATed connection reports its destination unchanged: it was addressed to
    // this listener directly (or redirected onto itself), and forwarding it would loop.
    if dst == local {
        return Err(NoTarget::Loop(dst));
    }
    Ok(OriginalDst(dst))
}

/// Refuses an inbound original destination that is not one of the pod's own addresses.
pub fn check_pod_address(dst: OriginalDst, pod_ips: &[IpAddr]) -> Result<OriginalDst, NoTarget> {
    match pod_ips.contains(&dst.0.ip()) {
        true => Ok(dst),
        false => Err(NoTarget::NotPodAddress(dst.0)),
    }
}

/// The addresses of this network namespace's interfaces, except loopback ones (on `lo`, or in
/// 127.0.0.0/8 and ::1): those are the app's private side, never a destination from outside.
/// One `getifaddrs(3)` call (netlink, answered from kernel memory), made at start-up.
pub fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head` and allocates the list; on success it is
    // released below with freeifaddrs, exactly once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a non-null node of the list getifaddrs returned, still allocated.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        let loopback_interface = entry.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        if entry.ifa_addr.is_null() || loopback_interface {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr whose family says its real type;
        // we read the longer types only after checking the family.
        let ip = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*entry.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*entry.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        if !ip.is_loopback() && !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once; no reference into the
    // list outlives this call (the addresses were copied out).
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}

/// How upstream connections are made.
#[derive(Clone, Copy, Debug)]
pub struct ConnectSettings {
    pub timeout: Duration,
    pub keepalive: Duration,
}

/// Connects to `addr` within the timeout, with the same socket options as accepted streams.
pub async fn connect(addr: SocketAddr, settings: ConnectSettings) -> io::Result<TcpStream> {
    let ConnectSettings { timeout, keepalive } = settings;
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect timed out after {timeout:?}")))??;
    set_stream_options(&stream, keepalive)?;
    Ok(stream)
}

/// Makes a reset of this socket's peer the consequence of closing it (SO_LINGER 0), so an abort
/// on one side of a proxied connection is seen as an abort, not a clean FIN, on the other.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// `::ffff:a.b.c.d` → `a.b.c.d`, so both families compare and log the same way.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Implements `AsyncWrite` for a read-side wrapper `$wrapper<I>` by passing every call to its
/// `$field`: the wrappers that look at what a client sends (detection's prefix, the HTTP/1
/// framing guard) leave the other direction untouched.
macro_rules! delegate_async_write {
    ($wrapper:ident, $field:ident) => {
        impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<I> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use delegate_async_write;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_compare_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.2]:4143".parse().unwrap();
        assert_eq!(unmap(mapped), "10.0.0.2:4143".parse().unwrap());
        let v6: SocketAddr = "[fd00::2]:4143".parse().unwrap();
        assert_eq!(unmap(v6), v6);
    }

    #[test]
    fn only_pod_addresses_pass() {
        let pod: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let ok = OriginalDst("10.0.0.2:8080".parse().unwrap());
        assert_eq!(check_pod_address(ok, &pod).unwrap(), ok);
        let v6 = OriginalDst("[fd00::2]:8080".parse().unwrap());
        assert_eq!(check_pod_address(v6, &pod).unwrap(), v6);
        for refused in ["127.0.0.1:8080", "10.0.0.3:8080", "[::1]:8080", "192.0.2.1:443"] {
            let dst = OriginalDst(refused.parse().unwrap());
            assert!(
                matches!(check_pod_address(dst, &pod), Err(NoTarget::NotPodAddress(a)) if a == dst.0),
                "{refused}"
            );
        }
    }

    #[test]
    fn interface_addresses_leave_out_loopback() {
        let addrs = interface_addresses().expect("getifaddrs");
        assert!(addrs.iter().all(|ip| !ip.is_loopback()), "{addrs:?}");
    }

    #[tokio::test]
    async fn a_connection_without_nat_has_no_original_destination() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Outside a NAT namespace there is no conntrack entry, or an unchanged one (a loop).
        match original_dst(&server) {
            Err(NoTarget::NoOriginalDst(_)) | Err(NoTarget::Loop(_)) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn dual_stack_listener_accepts_ipv4() {
        let Ok(listener) = bind("[::]:0".parse().unwrap()) else {
            eprintln!("skipping: no IPv6 on this host");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (_server, peer) = listener.accept().await.unwrap();
        assert_eq!(unmap(peer), client.local_addr().unwrap());
    }

    #[tokio::test]
    async fn an_ipv6_twin_binds_next_to_the_ipv4_wildcard() {
        let v4 = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        match bind_ipv6_only(SocketAddr::from(([0u16; 8], port))) {
            Ok(v6) => assert_eq!(v6.local_addr().unwrap().port(), port),
            Err(e) if is_ipv6_unavailable(&e) => eprintln!("no IPv6 on this host: {e}"),
            Err(e) => panic!("the IPv6 twin must not clash with the IPv4 listener: {e}"),
        }
    }

    #[tokio::test]
    async fn connect_reports_a_refused_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = connect(
            addr,
            ConnectSettings {
                timeout: Duration::from_secs(1),
                keepalive: Duration::from_secs(10),
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}
