//! Opaque TCP forwarding, the one forwarder for every path (inbound plain, inbound inside mesh
//! TLS, outbound plain, outbound into mesh TLS): bytes both ways, with the semantics of a real
//! TCP path, the same on each.
//!
//! - Upstream: connect (within the connect timeout), then mesh TLS when the target is meshed
//!   (through the opaque transport to its proxy, or directly), then the bytes read during
//!   protocol detection. Any failure resets the client: without a proxy
//!   it would have been refused.
//! - Half-close: EOF from one side becomes a FIN (`shutdown(Write)`, after TLS's close_notify)
//!   towards the other, and the opposite direction keeps flowing until it ends too.
//! - Reset: if either side fails, both sockets are closed with SO_LINGER 0 so the peers see a
//!   reset rather than a clean end of stream they might mistake for a complete response.
//! - Idle timeout: no byte either way for `idle_timeout` resets both sides, so connections whose
//!   peers vanished, or that an app forgot, do not hold memory and a connection slot forever.
//! - Counting: every chunk counts as it is read (`pillion_tcp_{read,write}_bytes_total`), so a
//!   long-lived connection shows its traffic as it happens and a failed one still counts.
//! - Backpressure: one bounded buffer per direction; we read again only after the previous chunk
//!   was written, so a slow reader slows the writer instead of growing memory. A buffer is
//!   allocated only once its side has sent something, so an idle connection holds none.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::Instant,
};

use crate::{
    detect::PrefixedIo,
    mesh::Mesh,
    metrics::{Direction, TcpMetrics},
    opaque_transport::OpaqueTransport,
    tls::spiffe::SpiffeId,
    transport::{self, ConnectSettings},
};

/// Per-direction buffer. Large enough that a bulk transfer needs few syscalls.
const BUFFER_SIZE: usize = 64 * 1024;
/// The first read of a direction lands here, on the stack: the heap buffer comes with data.
const FIRST_READ_SIZE: usize = 4 * 1024;

/// How opaque connections are forwarded.
#[derive(Clone, Copy, Debug)]
pub struct ForwardSettings {
    pub connect: ConnectSettings,
    /// No byte either way for this long: both sides are reset.
    pub idle_timeout: Duration,
}

/// A stream the forwarder can reset: a TCP socket, or a layer (TLS, a detection prefix) over one.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
}

/// Why forwarding stopped before both directions ended.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("idle for {0:?}")]
    Idle(Duration),
}

/// How the upstream side of an opaque connection is reached.
pub enum Upstream<'a> {
    /// Plain TCP to the target: the app behind an inbound proxy, or an unmeshed destination.
    Plain,
    /// Mesh TLS to the target itself, whose proxy detects and terminates it: for a fixed
    /// outbound target (no iptables), which is that proxy's inbound port already.
    Mesh(&'a Mesh, SpiffeId),
    /// The opaque transport to the target's proxy (see [`crate::opaque_transport`]): its proxy
    /// knows the connection is mesh TLS for the target's port without reading the app's bytes.
    Transport(&'a Mesh, &'a OpaqueTransport, SpiffeId),
}

/// Forwards `client` to `target` the way `upstream` says, sending `prefix` first; logs one line
/// if anything fails. Returns how long reaching the upstream took (TCP, and mesh TLS when
/// used), or `None` when it could not be reached: a balancer's view of the endpoint.
#[allow(clippy::too_many_arguments)]
pub async fn proxy_opaque<C: Socket>(
    mut client: C,
    prefix: &[u8],
    peer: SocketAddr,
    target: SocketAddr,
    direction: Direction,
    upstream: Upstream<'_>,
    settings: ForwardSettings,
    metrics: &TcpMetrics,
) -> Option<Duration> {
    let dir = direction.as_str();
    let started = tokio::time::Instant::now();
    // The transport connects to the target's proxy, not to the target's port.
    let address = match &upstream {
        Upstream::Transport(_, transport, _) => transport.peer_proxy(target).unwrap_or(target),
        Upstream::Plain | Upstream::Mesh(..) => target,
    };
    let server = match transport::connect(address, settings.connect).await {
        Ok(server) => server,
        Err(error) => {
            metrics.connect_errors.inc();
            tracing::warn!(direction = dir, %peer, %target, %address, %error, "upstream connect failed");
            transport::reset_on_close(client.tcp());
            return None;
        }
    };
    let (tls, id) = match upstream {
        Upstream::Plain => {
            let connected = started.elapsed();
            let mut server = server;
            let result = relay(&mut client, &mut server, prefix, settings.idle_timeout, metrics).await;
            log_end(dir, peer, target, result);
            return Some(connected);
        }
        Upstream::Mesh(mesh, id) => (mesh.connect(server, &id).await, id),
        Upstream::Transport(mesh, transport, id) => (transport.open(mesh, server, &id, target.port()).await, id),
    };
    match tls {
        Ok(mut tls) => {
            let connected = started.elapsed();
            let result = relay(&mut client, &mut tls, prefix, settings.idle_timeout, metrics).await;
            log_end(dir, peer, target, result);
            Some(connected)
        }
        Err(error) => {
            metrics.connect_errors.inc();
            tracing::warn!(direction = dir, %peer, %target, %address, %id, %error, "mesh TLS to the upstream failed");
            transport::reset_on_close(client.tcp());
            None
        }
    }
}

fn log_end(dir: &str, peer: SocketAddr, target: SocketAddr, result: Result<(u64, u64), ForwardError>) {
    match result {
        Ok((sent, received)) => {
            tracing::debug!(direction = dir, %peer, %target, sent, received, "connection closed");
        }
        Err(error) => tracing::info!(direction = dir, %peer, %target, %error, "connection aborted"),
    }
}

/// Sends `prefix` upstream, then forwards.
async fn relay<C: Socket, S: Socket>(
    client: &mut C,
    server: &mut S,
    prefix: &[u8],
    idle_timeout: Duration,
    metrics: &TcpMetrics,
) -> Result<(u64, u64), ForwardError> {
    if !prefix.is_empty() {
        if let Err(error) = server.write_all(prefix).await {
            reset_both(client, server);
            return Err(error.into());
        }
        metrics.read_bytes.inc_by(prefix.len() as u64);
    }
    forward(client, server, idle_timeout, metrics).await
}

/// Forwards until both directions have ended; returns (client→server, server→client) bytes.
/// On an error or the idle timeout, both sides are reset.
pub async fn forward<C: Socket, S: Socket>(
    client: &mut C,
    server: &mut S,
    idle_timeout: Duration,
    metrics: &TcpMetrics,
) -> Result<(u64, u64), ForwardError> {
    let mut up = OneWay::new(&metrics.read_bytes);
    let mut down = OneWay::new(&metrics.write_bytes);
    let mut last_active = Instant::now();
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let result = std::future::poll_fn(|cx| {
        let before = (up.progress, down.progress);
        let up_done = up.poll(cx, &mut *client, &mut *server)?;
        let down_done = down.poll(cx, &mut *server, &mut *client)?;
        if let (Poll::Ready(sent), Poll::Ready(received)) = (up_done, down_done) {
            return Poll::Ready(Ok((sent, received)));
        }
        if before != (up.progress, down.progress) {
            last_active = Instant::now();
        }
        // The timer is moved only when it fires, not on every chunk.
        while idle.as_mut().poll(cx).is_ready() {
            let deadline = last_active + idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(Err(ForwardError::Idle(idle_timeout)));
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    if result.is_err() {
        reset_both(client, server);
    }
    result
}

fn reset_both<C: Socket, S: Socket>(client: &C, server: &S) {
    transport::reset_on_close(client.tcp());
    transport::reset_on_close(server.tcp());
}

/// One direction: read a chunk, write it all, repeat; at EOF, shut the writer down.
struct OneWay<'a> {
    buf: Option<Box<[u8]>>,
    /// `buf[start..end]` is read and not yet written.
    start: usize,
    end: usize,
    read_done: bool,
    /// EOF was passed on: this direction is over.
    shut_down: bool,
    need_flush: bool,
    moved: u64,
    /// Bytes read plus bytes written: any change is activity, for the idle timeout (a peer that
    /// reads slowly keeps a connection alive as much as one that writes).
    progress: u64,
    counter: &'a Counter,
}

impl<'a> OneWay<'a> {
    fn new(counter: &'a Counter) -> Self {
        OneWay {
            buf: None,
            start: 0,
            end: 0,
            read_done: false,
            shut_down: false,
            need_flush: false,
            moved: 0,
            progress: 0,
            counter,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.shut_down {
            return Poll::Ready(Ok(self.moved));
        }
        loop {
            if self.start < self.end {
                let Some(buf) = &self.buf else {
                    return Poll::Ready(Err(io::Error::other("forward buffer missing")));
                };
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.progress += n as u64;
                self.need_flush = true;
                continue;
            }
            if self.read_done {
                // EOF travels on as a FIN (TLS: close_notify, then FIN); `poll_shutdown` flushes.
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.shut_down = true;
                // The buffer is not needed any more; the other direction may go on for long.
                self.buf = None;
                return Poll::Ready(Ok(self.moved));
            }
            let read = match &mut self.buf {
                Some(buf) => {
                    let mut rb = ReadBuf::new(buf);
                    match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                }
                None => {
                    let mut first = [0u8; FIRST_READ_SIZE];
                    let mut rb = ReadBuf::new(&mut first);
                    match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            if n > 0 {
                                let mut buf = vec![0u8; BUFFER_SIZE].into_boxed_slice();
                                buf[..n].copy_from_slice(rb.filled());
                                self.buf = Some(buf);
                            }
                            Poll::Ready(Ok(n))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                }
            };
            match read {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(n)) => {
                    self.counter.inc_by(n as u64);
                    self.moved += n as u64;
                    self.progress += n as u64;
                    (self.start, self.end) = (0, n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read now: push out what a layered writer (TLS) buffered.
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl<I: Socket> Socket for tokio_rustls::server::TlsStream<I> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
}

impl<I: Socket> Socket for tokio_rustls::client::TlsStream<I> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.tcp()
    }
}

impl<I: Socket> Socket for crate::tls::expiry::CertBound<I> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().tcp()
    }
}

impl<I: Socket> Socket for PrefixedIo<I> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().tcp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Direction, Metrics};
    use tokio::{io::AsyncReadExt, net::TcpListener};

    const HOUR: Duration = Duration::from_secs(3600);

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// client ⇄ [proxy_client | proxy_server] ⇄ upstream, forwarding in a task.
    async fn proxied(
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        TcpMetrics,
        tokio::task::JoinHandle<Result<(u64, u64), ForwardError>>,
    ) {
        let (client, mut proxy_client) = pair().await;
        let (mut proxy_server, upstream) = pair().await;
        let metrics = Metrics::new().tcp(Direction::Outbound);
        let m = metrics.clone();
        let task = tokio::spawn(async move { forward(&mut proxy_client, &mut proxy_server, idle, &m).await });
        (client, upstream, metrics, task)
    }

    fn settings(idle_timeout: Duration) -> ForwardSettings {
        ForwardSettings {
            connect: ConnectSettings {
                timeout: Duration::from_secs(3),
                keepalive: Duration::from_secs(10),
            },
            idle_timeout,
        }
    }

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_open() {
        let (mut client, mut upstream, metrics, task) = proxied(HOUR).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();

        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");

        // The upstream answers after seeing EOF; the client still receives it.
        upstream.write_all(b"response after eof").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response after eof");

        assert_eq!(task.await.unwrap().unwrap(), (7, 18));
        assert_eq!(metrics.read_bytes.get(), 7);
        assert_eq!(metrics.write_bytes.get(), 18);
    }

    #[tokio::test]
    async fn upstream_reset_reaches_the_client_as_a_reset() {
        let (mut client, upstream, _metrics, task) = proxied(HOUR).await;
        client.write_all(b"x").await.unwrap();
        transport::reset_on_close(&upstream);
        drop(upstream);
        assert!(task.await.unwrap().is_err());
        let mut buf = [0u8; 16];
        let err = client.read(&mut buf).await.expect_err("a reset, not a clean EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn bulk_transfer_arrives_intact() {
        let (mut client, mut upstream, _metrics, task) = proxied(HOUR).await;
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "payload differs");
        drop(upstream);
        drop(writer.await.unwrap());
        let (up, _down) = task.await.unwrap().unwrap();
        assert_eq!(up, data.len() as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_reset_after_the_idle_timeout_and_not_before() {
        let idle = Duration::from_secs(60);
        let (mut client, mut upstream, _metrics, task) = proxied(idle).await;
        // Traffic every 40 s keeps it open well past one timeout.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            client.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            upstream.read_exact(&mut buf).await.unwrap();
        }
        assert!(!task.is_finished());
        let quiet = Instant::now();
        let result = task.await.unwrap();
        assert!(matches!(result, Err(ForwardError::Idle(_))), "{result:?}");
        assert!(quiet.elapsed() >= idle && quiet.elapsed() < idle + Duration::from_secs(1));
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
    }

    /// The one forwarder on a failed connect: the client is reset (on every path) and the failure
    /// counted; and a plain path counts the detection prefix and every chunk as it goes.
    #[tokio::test]
    async fn every_path_resets_the_client_when_the_upstream_is_unreachable() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = closed.local_addr().unwrap();
        drop(closed);
        let metrics = Metrics::new().tcp(Direction::Inbound);
        let (mut client, proxy_side) = pair().await;
        // The client side as the inbound TLS path has it: layered over the socket.
        let layered = PrefixedIo::new(bytes::BytesMut::from(&b"hello"[..]), proxy_side);
        let peer = client.local_addr().unwrap();
        proxy_opaque(
            layered,
            b"",
            peer,
            target,
            Direction::Inbound,
            Upstream::Plain,
            settings(HOUR),
            &metrics,
        )
        .await;
        assert_eq!(metrics.connect_errors.get(), 1);
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
    }

    #[tokio::test]
    async fn the_prefix_goes_first_and_is_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let metrics = Metrics::new().tcp(Direction::Outbound);
        let (mut client, proxy_side) = pair().await;
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            let peer = "10.0.0.1:1".parse().unwrap();
            proxy_opaque(
                proxy_side,
                b"GET",
                peer,
                target,
                Direction::Outbound,
                Upstream::Plain,
                settings(HOUR),
                &m,
            )
            .await
        });
        let (mut upstream, _) = listener.accept().await.unwrap();
        client.write_all(b" /x").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"GET /x");
        drop(upstream);
        task.await.unwrap();
        assert_eq!(metrics.read_bytes.get(), 6);
    }
}
