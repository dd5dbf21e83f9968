//! No mesh TLS connection outlives the certificates it was made with.
//!
//! Certificates are checked at the handshake, and sessions are never resumed, but a connection
//! itself can last for hours: a pooled upstream connection or a client's HTTP/2 connection would
//! keep carrying traffic after either side's certificate expired. [`CertBound`] ends the
//! connection (reads and writes fail) at the earlier of the two `notAfter`s; the timer is polled
//! with every read, so an idle connection is closed on time too.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use x509_parser::prelude::FromDer;

/// A stream that fails once `deadline` has passed.
pub struct CertBound<I> {
    io: I,
    deadline: Pin<Box<Sleep>>,
}

/// When a session between our certificate (valid until `own_not_after`) and the peer's ends: the
/// earlier of the two notAfters.
pub fn session_end(own_not_after: SystemTime, peer: Option<&[CertificateDer<'_>]>) -> SystemTime {
    let peer_not_after = peer.and_then(|chain| chain.first()).and_then(not_after);
    peer_not_after.map_or(own_not_after, |peer| peer.min(own_not_after))
}

impl<I> CertBound<I> {
    /// Bounds `io` by `until` (see [`session_end`]).
    pub fn new(io: I, until: SystemTime) -> Self {
        // X.509 validity includes the notAfter second: the connection may live through it.
        let left = until.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(1);
        CertBound {
            io,
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + left)),
        }
    }

    pub fn get_ref(&self) -> &I {
        &self.io
    }

    fn expired() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "a certificate of this mesh TLS connection expired",
        )
    }
}

/// The notAfter of a DER certificate.
fn not_after(der: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

impl<I: AsyncRead + Unpin> AsyncRead for CertBound<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Self::expired()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CertBound<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.deadline.is_elapsed() {
            return Poll::Ready(Err(Self::expired()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.deadline.is_elapsed() {
            return Poll::Ready(Err(Self::expired()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_when_its_certificate_does() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut bound = CertBound::new(near, session_end(SystemTime::now() + Duration::from_secs(30), None));
        far.write_all(b"ok").await.unwrap();
        let mut buf = [0u8; 2];
        bound.read_exact(&mut buf).await.unwrap();
        bound.write_all(b"ok").await.unwrap();

        // Nothing arrives; the read ends with the certificate, not never.
        let started = Instant::now();
        let err = bound.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_secs(29) && lived <= Duration::from_secs(32),
            "{lived:?}"
        );
        assert_eq!(
            bound.write(b"late").await.unwrap_err().kind(),
            io::ErrorKind::ConnectionAborted
        );
    }
}
