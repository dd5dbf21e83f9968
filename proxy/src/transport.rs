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
}

const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listener; `[::]` is dual-stack so one inbound listener serves both families.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
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
