//! Protocol detection: decides from a connection's first bytes whether it is TLS, HTTP/2 with
//! prior knowledge, HTTP/1.x, or something else (opaque TCP).
//!
//! The bytes are read, not peeked: `peek` cannot wait for *more* data without spinning, and a
//! request line often arrives in pieces. What was read is handed on with the stream
//! ([`PrefixedIo`]) so nothing is lost. Detection ends as soon as the answer is certain; a
//! first byte that cannot start an HTTP method decides "opaque" at once. Client-speaks-first is
//! assumed: ports whose server speaks first (SMTP, MySQL...) are configured as opaque and never
//! reach this code; elsewhere a silent client is treated as opaque after the detect timeout.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::config::PortSet;

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

/// How detection is configured for a direction.
pub struct DetectSettings {
    pub timeout: Duration,
    /// Destination ports whose traffic is forwarded without looking at it.
    pub opaque_ports: PortSet,
}

/// The outcome of looking at the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Is(Protocol),
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/1 request line longer than this is treated as not HTTP (it would be refused anyway).
pub const MAX_DETECT_BYTES: usize = 8 * 1024;
/// A TLS record header and the largest record: a ClientHello is read whole (to see its SNI).
const MAX_TLS_RECORD: usize = 5 + 16 * 1024;

/// Reads from `io` until the protocol is known, the peer stops sending, or `timeout` passes.
/// Returns the protocol and everything read, which the caller must replay.
pub async fn detect_protocol<I>(io: &mut I, timeout: Duration) -> io::Result<(Protocol, BytesMut)>
where
    I: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let reading = async {
        loop {
            if buf.len() >= MAX_DETECT_BYTES {
                return Ok(Protocol::Opaque);
            }
            if io.read_buf(&mut buf).await? == 0 {
                // EOF before a verdict: whatever was sent is forwarded as opaque bytes.
                return Ok(Protocol::Opaque);
            }
            if let Verdict::Is(protocol) = classify(&buf) {
                if protocol == Protocol::Tls {
                    read_tls_record(io, &mut buf).await?;
                }
                return Ok(protocol);
            }
        }
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok(Ok(protocol)) => Ok((protocol, buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok((Protocol::Opaque, buf)),
    }
}

impl DetectSettings {
    /// Detects the protocol of a connection to `port`; `None` if the client went away.
    pub async fn run<I>(&self, io: &mut I, port: u16) -> Option<(Protocol, BytesMut)>
    where
        I: AsyncRead + Unpin,
    {
        // Server-speaks-first protocols would wait out the whole timeout: skip them.
        if self.opaque_ports.contains(port) {
            return Some((Protocol::Opaque, BytesMut::new()));
        }
        match detect_protocol(io, self.timeout).await {
            Ok(detected) => Some(detected),
            Err(error) => {
                tracing::debug!(%error, "client failed during protocol detection");
                None
            }
        }
    }
}

/// Completes the first TLS record (the ClientHello) in `buf`, so its SNI can be read.
async fn read_tls_record<I: AsyncRead + Unpin>(io: &mut I, buf: &mut BytesMut) -> io::Result<()> {
    loop {
        let wanted = match buf.get(3..5) {
            Some(len) => 5 + usize::from(u16::from_be_bytes([len[0], len[1]])),
            None => 5,
        };
        if buf.len() >= wanted.min(MAX_TLS_RECORD) {
            return Ok(());
        }
        if io.read_buf(buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Pure classification of a connection's first bytes.
fn classify(bytes: &[u8]) -> Verdict {
    let Some(&first) = bytes.first() else {
        return Verdict::NeedMore;
    };
    // TLS record: handshake (22), major version 3. The ClientHello is all that can come first.
    if first == 0x16 {
        return match bytes.get(1) {
            None => Verdict::NeedMore,
            Some(3) => Verdict::Is(Protocol::Tls),
            Some(_) => Verdict::Is(Protocol::Opaque),
        };
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return if bytes.len() >= H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    http1_request_line(bytes)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF`, judged as early as possible.
fn http1_request_line(bytes: &[u8]) -> Verdict {
    let method_len = bytes.iter().take_while(|b| is_tchar(**b)).count();
    // The same rules whatever has arrived, so the verdict cannot depend on how the line was split.
    match bytes.get(method_len) {
        None if method_len < 32 => return Verdict::NeedMore,
        Some(b' ') if (1..32).contains(&method_len) => {}
        _ => return Verdict::Is(Protocol::Opaque),
    }
    let line_end = bytes.iter().position(|b| *b == b'\n');
    // A request-target has no spaces or control characters; anything else is not HTTP.
    let rest = &bytes[method_len + 1..line_end.unwrap_or(bytes.len())];
    let plausible = rest
        .iter()
        .all(|&b| b == b'\r' || (b' '..0x7f).contains(&b) || b >= 0x80);
    if !plausible {
        return Verdict::Is(Protocol::Opaque);
    }
    let Some(line_end) = line_end else {
        return Verdict::NeedMore;
    };
    let line = &bytes[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Verdict::Is(Protocol::Http1)
    } else {
        Verdict::Is(Protocol::Opaque)
    }
}

/// RFC 9110 token characters (an HTTP method is a token).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A stream whose first bytes were already read (during detection): reads return those first.
pub struct PrefixedIo<I> {
    prefix: BytesMut,
    io: I,
}

impl<I> PrefixedIo<I> {
    pub fn new(prefix: BytesMut, io: I) -> Self {
        PrefixedIo { prefix, io }
    }

    /// The stream under the prefix (the forwarder resets its socket on failure).
    pub fn get_ref(&self) -> &I {
        &self.io
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

crate::transport::delegate_async_write!(PrefixedIo, io);

/// [`classify`] for the fuzz targets (`fuzz/`): the protocol, or `None` while more bytes are needed.
#[doc(hidden)]
pub fn classify_prefix(bytes: &[u8]) -> Option<Protocol> {
    match classify(bytes) {
        Verdict::Is(protocol) => Some(protocol),
        Verdict::NeedMore => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        use Protocol::*;
        let cases: &[(&[u8], Verdict)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Verdict::Is(Http1)),
            (b"POST /upload?x=1 HTTP/1.0\r\n", Verdict::Is(Http1)),
            (b"GET /", Verdict::NeedMore),
            (b"GE", Verdict::NeedMore),
            (b"GET / SMTP/1.1\r\n", Verdict::Is(Opaque)),
            (H2_PREFACE, Verdict::Is(Http2)),
            (&H2_PREFACE[..10], Verdict::NeedMore),
            (b"\x16\x03\x01\x02\x00\x01", Verdict::Is(Tls)),
            (b"\x16", Verdict::NeedMore),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Verdict::Is(Opaque)), // postgres SSLRequest
            (b"*1\r\n$4\r\nPING\r\n", Verdict::Is(Opaque)),             // redis
            (b"\x03\x00\x00", Verdict::Is(Opaque)),
            (b"GET \x01", Verdict::Is(Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(&classify(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn a_verdict_does_not_change_as_more_bytes_arrive() {
        // Found by fuzzing (fuzz/fuzz_targets/detect.rs): a control character in the request
        // target, or a 32-character method, was opaque in pieces but HTTP/1 when read whole.
        let long_method = format!("{} / HTTP/1.1\r\n", "A".repeat(40));
        for line in [&b"GET /a/\x03\x00b HTTP/1.1\r\n"[..], long_method.as_bytes()] {
            for n in 1..=line.len() {
                let verdict = classify(&line[..n]);
                assert!(
                    matches!(verdict, Verdict::NeedMore | Verdict::Is(Protocol::Opaque)),
                    "{verdict:?} after {n} bytes of {:?}",
                    String::from_utf8_lossy(line)
                );
            }
            assert_eq!(classify(line), Verdict::Is(Protocol::Opaque));
        }
    }

    #[tokio::test]
    async fn a_request_line_in_pieces_is_still_http() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in [&b"GET /a"[..], b"/b HTTP/1.", b"1\r\nhost: x\r\n\r\n"] {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let (protocol, prefix) = detect_protocol(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        let _client = writer.await.unwrap();

        // Nothing is lost: the prefix is replayed before the rest of the stream.
        let mut replay = PrefixedIo::new(prefix, server);
        let mut line = vec![0u8; 18];
        replay.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET /a/b HTTP/1.1\r");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let (protocol, prefix) = detect_protocol(&mut server, Duration::from_secs(10)).await.unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(prefix.is_empty());
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn eof_before_a_verdict_is_opaque_with_the_bytes_kept() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET /").await.unwrap();
        drop(client);
        let (protocol, prefix) = detect_protocol(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!((protocol, &prefix[..]), (Protocol::Opaque, &b"GET /"[..]));
    }
}
