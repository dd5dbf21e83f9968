//! Opaque TCP forwarding: bytes both ways, with the semantics of a real TCP path.
//!
//! - Half-close: EOF from one side becomes a FIN (`shutdown(Write)`) towards the other, and the
//!   opposite direction keeps flowing until it ends too.
//! - Reset: if either side fails, both sockets are closed with SO_LINGER 0 so the peers see a
//!   reset rather than a clean end of stream they might mistake for a complete response.
//! - Backpressure: one bounded buffer per direction; we read again only after the previous chunk
//!   was written, so a slow reader slows the writer instead of growing memory.

use std::{io, net::SocketAddr};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::{
    metrics::{Direction, TcpMetrics},
    transport::{self, ConnectSettings},
};

/// Per-direction buffer. Large enough that a bulk transfer needs few syscalls; allocated only
/// once a side has data, so idle connections cost no buffer memory at all.
const BUFFER_SIZE: usize = 64 * 1024;

/// Connects to `target` and forwards `client` to it opaquely; logs one line if anything fails.
pub async fn proxy_opaque(
    mut client: TcpStream,
    prefix: &[u8],
    peer: SocketAddr,
    target: SocketAddr,
    direction: Direction,
    connect: ConnectSettings,
    metrics: &TcpMetrics,
) {
    let Some(mut server) = connect_with_prefix(target, prefix, peer, direction, connect, metrics).await else {
        // Without a proxy the client would have been refused; a reset is the closest match.
        transport::reset_on_close(&client);
        return;
    };
    log_end(
        forward(&mut client, &mut server, metrics).await,
        peer,
        target,
        direction,
    );
}

/// The same for a client stream that is not a plain socket (mesh TLS already terminated).
pub async fn proxy_opaque_io<I>(
    mut client: I,
    prefix: &[u8],
    peer: SocketAddr,
    target: SocketAddr,
    direction: Direction,
    connect: ConnectSettings,
    metrics: &TcpMetrics,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(mut server) = connect_with_prefix(target, prefix, peer, direction, connect, metrics).await else {
        return;
    };
    log_end(
        forward_io(&mut client, &mut server, metrics).await,
        peer,
        target,
        direction,
    );
}

/// Connects upstream and sends the bytes read during protocol detection first.
async fn connect_with_prefix(
    target: SocketAddr,
    prefix: &[u8],
    peer: SocketAddr,
    direction: Direction,
    connect: ConnectSettings,
    metrics: &TcpMetrics,
) -> Option<TcpStream> {
    let mut server = match transport::connect(target, connect).await {
        Ok(server) => server,
        Err(error) => {
            metrics.connect_errors.inc();
            tracing::warn!(direction = direction.as_str(), %peer, %target, %error, "upstream connect failed");
            return None;
        }
    };
    if !prefix.is_empty() {
        if let Err(error) = server.write_all(prefix).await {
            tracing::info!(direction = direction.as_str(), %peer, %target, %error, "connection aborted");
            return None;
        }
        metrics.read_bytes.inc_by(prefix.len() as u64);
    }
    Some(server)
}

fn log_end(result: io::Result<(u64, u64)>, peer: SocketAddr, target: SocketAddr, direction: Direction) {
    match result {
        Ok((sent, received)) => {
            tracing::debug!(direction = direction.as_str(), %peer, %target, sent, received, "connection closed");
        }
        Err(error) => {
            tracing::info!(direction = direction.as_str(), %peer, %target, %error, "connection aborted");
        }
    }
}

/// Forwards between any two streams (used when one side is TLS); bytes are counted at the end.
pub async fn forward_io<A, B>(client: &mut A, server: &mut B, metrics: &TcpMetrics) -> io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let (sent, received) = tokio::io::copy_bidirectional_with_sizes(client, server, BUFFER_SIZE, BUFFER_SIZE).await?;
    metrics.read_bytes.inc_by(sent);
    metrics.write_bytes.inc_by(received);
    Ok((sent, received))
}

/// Forwards until both directions have ended; returns (client→server, server→client) bytes.
pub async fn forward(client: &mut TcpStream, server: &mut TcpStream, metrics: &TcpMetrics) -> io::Result<(u64, u64)> {
    let result = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        tokio::try_join!(
            copy_until_eof(&mut client_read, &mut server_write, &metrics.read_bytes),
            copy_until_eof(&mut server_read, &mut client_write, &metrics.write_bytes),
        )
    };
    if result.is_err() {
        transport::reset_on_close(client);
        transport::reset_on_close(server);
    }
    result
}

/// Copies one direction to EOF, then half-closes the writer.
async fn copy_until_eof(reader: &mut ReadHalf<'_>, writer: &mut WriteHalf<'_>, counter: &Counter) -> io::Result<u64> {
    // Wait until the peer has sent something (or closed) before allocating the buffer.
    reader.as_ref().readable().await?;
    let mut buf: Vec<u8> = Vec::with_capacity(BUFFER_SIZE);
    let mut total = 0u64;
    loop {
        buf.clear();
        // `read_buf` fills the spare capacity directly: no zeroing, no copy.
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            break;
        }
        writer.write_all(&buf).await?;
        counter.inc_by(n as u64);
        total += n as u64;
    }
    writer.shutdown().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Direction, Metrics};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// client ⇄ [proxy_client | proxy_server] ⇄ upstream, forwarding in a task.
    async fn proxied() -> (
        TcpStream,
        TcpStream,
        TcpMetrics,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    ) {
        let (client, mut proxy_client) = pair().await;
        let (mut proxy_server, upstream) = pair().await;
        let metrics = Metrics::new().tcp(Direction::Outbound);
        let m = metrics.clone();
        let task = tokio::spawn(async move { forward(&mut proxy_client, &mut proxy_server, &m).await });
        (client, upstream, metrics, task)
    }

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_open() {
        let (mut client, mut upstream, metrics, task) = proxied().await;
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
        let (mut client, upstream, _metrics, task) = proxied().await;
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
        let (mut client, mut upstream, _metrics, task) = proxied().await;
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
}
