//! Request-framing guard for HTTP/1 clients: refuses, with 400 and a closed connection, a request
//! whose body length is ambiguous — `Content-Length` together with `Transfer-Encoding` — before
//! any of it is forwarded; and a request head over the size limit with 431.
//!
//! hyper alone would drop the `Content-Length`, frame by `Transfer-Encoding` and close after the
//! response: safe, but the request still reaches the app. A request like that is how request
//! smuggling starts, and no honest client sends one, so we refuse it outright.
//!
//! The guard sits between the socket and hyper and hands hyper only bytes it has classified:
//! each request head is read whole and checked, then its body is passed through by its framing
//! (length, or chunk by chunk) so the next head is found exactly where hyper will look for it.
//! Anything the guard cannot follow (a malformed head, an upgrade) is passed through untouched and
//! left to hyper, which rejects malformed input itself.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const AMBIGUOUS: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\npillion-proxy-error: ambiguous request framing\r\ncontent-length: 27\r\nconnection: close\r\n\r\nambiguous request framing\r\n";
const TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\ncontent-length: 26\r\nconnection: close\r\n\r\nrequest header too large\r\n";

/// More header fields than this and the guard steps aside; hyper's own limit (100) answers 431.
const MAX_HEADERS: usize = 128;

pub struct FramingGuard<I> {
    io: I,
    /// Bytes read from the client and not yet handed to hyper.
    pending: BytesMut,
    /// How many bytes at the front of `pending` are classified and may go to hyper.
    releasable: usize,
    state: State,
    max_head: usize,
    eof: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Head,
    /// Fixed-length body: bytes left.
    Body(u64),
    Chunked(Chunk),
    /// An upgrade, or input we do not follow: everything passes.
    Passthrough,
    /// Writing a refusal; `usize` = bytes written so far.
    Rejecting(&'static [u8], usize),
    Rejected,
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

enum Step {
    /// `n` more bytes are classified.
    Release(usize),
    NeedMore,
}

impl<I> FramingGuard<I> {
    pub fn new(io: I, max_head: usize) -> Self {
        FramingGuard {
            io,
            pending: BytesMut::with_capacity(4096),
            releasable: 0,
            state: State::Head,
            max_head,
            eof: false,
        }
    }

    /// Classifies as many of the unclassified bytes as possible. Every step either classifies
    /// bytes or changes state, so this ends.
    fn classify(&mut self) {
        while self.releasable < self.pending.len() {
            let unclassified = &self.pending[self.releasable..];
            let step = match &mut self.state {
                State::Passthrough => Step::Release(unclassified.len()),
                State::Rejecting(..) | State::Rejected => return,
                State::Body(left) => {
                    let n = (*left).min(unclassified.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                    Step::Release(n as usize)
                }
                State::Chunked(chunk) => {
                    let (step, next) = step_chunk(chunk, unclassified);
                    if let Some(next) = next {
                        self.state = next;
                    }
                    step
                }
                State::Head => self.step_head(),
            };
            match step {
                Step::Release(n) => self.releasable += n,
                Step::NeedMore => return,
            }
        }
    }

    fn step_head(&mut self) -> Step {
        let unclassified = &self.pending[self.releasable..];
        if unclassified.is_empty() {
            return Step::NeedMore;
        }
        // Uninitialised: a head is parsed on every request, and zeroing 128 slots each time
        // would cost more than the parse.
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let end = match req.parse_with_uninit_headers(unclassified, &mut headers) {
            Ok(httparse::Status::Complete(end)) if end <= self.max_head => end,
            // Refused here rather than by hyper, whose buffer limit depends on read sizes.
            Ok(httparse::Status::Complete(_)) => return self.reject(TOO_LARGE),
            Ok(httparse::Status::Partial) if unclassified.len() > self.max_head => return self.reject(TOO_LARGE),
            Ok(httparse::Status::Partial) => return Step::NeedMore,
            // Malformed or too many headers: hyper decides (400 / 431).
            Err(_) => {
                self.state = State::Passthrough;
                return Step::Release(0);
            }
        };
        let mut content_length = None;
        let mut transfer_encoding = None;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if content_length.is_none() {
                    self.state = State::Passthrough;
                    return Step::Release(0);
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        self.state = match (transfer_encoding, content_length) {
            (Some(_), Some(_)) => State::Rejecting(AMBIGUOUS, 0),
            (Some(te), None) => {
                let chunked = te
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if chunked {
                    State::Chunked(Chunk::Size)
                } else {
                    State::Passthrough
                }
            }
            _ if upgrade => State::Passthrough,
            (None, Some(0)) | (None, None) => State::Head,
            (None, Some(n)) => State::Body(n),
        };
        if matches!(self.state, State::Rejecting(..)) {
            tracing::info!("request with both Content-Length and Transfer-Encoding refused");
            return Step::NeedMore;
        }
        Step::Release(end)
    }

    fn reject(&mut self, response: &'static [u8]) -> Step {
        self.state = State::Rejecting(response, 0);
        Step::NeedMore
    }
}

/// One step through chunked framing (RFC 9112 §7.1); may name the state to move to.
fn step_chunk(chunk: &mut Chunk, input: &[u8]) -> (Step, Option<State>) {
    match chunk {
        Chunk::Size => {
            let Some(line) = input.iter().position(|b| *b == b'\n') else {
                return (Step::NeedMore, None);
            };
            let text = &input[..line];
            let digits: &[u8] = text.split(|b| *b == b';').next().unwrap_or_default();
            let digits = digits.trim_ascii();
            match std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u64::from_str_radix(d, 16).ok())
            {
                Some(0) => *chunk = Chunk::Trailers,
                Some(n) => *chunk = Chunk::Data(n),
                // hyper rejects a bad chunk size itself; stop following.
                None => return (Step::Release(line + 1), Some(State::Passthrough)),
            }
            (Step::Release(line + 1), None)
        }
        Chunk::Data(left) => {
            let n = (*left).min(input.len() as u64);
            *left -= n;
            if *left == 0 {
                *chunk = Chunk::DataEnd;
            }
            if n == 0 {
                (Step::NeedMore, None)
            } else {
                (Step::Release(n as usize), None)
            }
        }
        Chunk::DataEnd => match input.iter().position(|b| *b == b'\n') {
            Some(line) => {
                *chunk = Chunk::Size;
                (Step::Release(line + 1), None)
            }
            None => (Step::NeedMore, None),
        },
        // Trailer fields, then an empty line.
        Chunk::Trailers => match input.iter().position(|b| *b == b'\n') {
            Some(line) => {
                let next = input[..line].trim_ascii().is_empty().then_some(State::Head);
                (Step::Release(line + 1), next)
            }
            None => (Step::NeedMore, None),
        },
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for FramingGuard<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Requests classified before a refused one still go to hyper first.
            if this.releasable > 0 {
                let n = this.releasable.min(out.remaining());
                out.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.releasable -= n;
                return Poll::Ready(Ok(()));
            }
            if let State::Rejecting(response, written) = &mut this.state {
                while *written < response.len() {
                    let n = ready!(Pin::new(&mut this.io).poll_write(cx, &response[*written..]))?;
                    if n == 0 {
                        break;
                    }
                    *written += n;
                }
                ready!(Pin::new(&mut this.io).poll_flush(cx))?;
                let _ = Pin::new(&mut this.io).poll_shutdown(cx);
                this.state = State::Rejected;
            }
            if this.state == State::Rejected {
                // hyper sees a client that went away: no request, nothing forwarded.
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Whatever is left unclassified (a truncated head) goes to hyper to judge.
                let n = this.pending.len().min(out.remaining());
                out.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Passthrough && this.pending.is_empty() {
                // Nothing left to follow: read straight into hyper's buffer.
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.pending.reserve(4096);
            let before = this.pending.len();
            let mut read = ReadBuf::uninit(this.pending.spare_capacity_mut());
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
            unsafe { this.pending.set_len(before + n) };
            if n == 0 {
                this.eof = true;
            }
            this.classify();
        }
    }
}

crate::transport::delegate_async_write!(FramingGuard, io);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Feeds `input` through the guard (in `piece`-byte writes); returns (what hyper would read,
    /// what the client got back).
    async fn run(input: &[u8], piece: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = FramingGuard::new(server, 64 * 1024);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            // After a refusal the guard stops reading: later writes may fail, as on a real socket.
            for chunk in input.chunks(piece) {
                if client.write_all(chunk).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = client.shutdown().await;
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut passed = Vec::new();
        guard.read_to_end(&mut passed).await.unwrap();
        drop(guard);
        (passed, writer.await.unwrap())
    }

    #[tokio::test]
    async fn well_framed_requests_pass_unchanged_in_any_pieces() {
        let input: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        for piece in [1, 3, 7, 64, 4096] {
            let (passed, back) = run(input, piece).await;
            assert_eq!(passed, input, "piece {piece}");
            assert!(back.is_empty());
        }
    }

    #[tokio::test]
    async fn content_length_with_transfer_encoding_is_refused_before_forwarding() {
        let input = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n\
POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        for piece in [1, 5, 4096] {
            let (passed, back) = run(input, piece).await;
            assert_eq!(
                passed, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n",
                "only the honest request passes"
            );
            assert!(back.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&back));
        }
        // In either order.
        let (passed, back) = run(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            4096,
        )
        .await;
        assert!(passed.is_empty() && back.starts_with(b"HTTP/1.1 400"));
    }

    #[tokio::test]
    async fn body_bytes_that_look_like_a_head_are_not_mistaken_for_one() {
        // The body contains a "request" with CL+TE; it is body, not a head.
        let body = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        input.extend_from_slice(body);
        let (passed, back) = run(&input, 2).await;
        assert_eq!(passed, input);
        assert!(back.is_empty());
    }

    #[tokio::test]
    async fn an_oversized_head_gets_431() {
        let input = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024));
        let (passed, back) = run(input.as_bytes(), 4096).await;
        assert!(passed.is_empty());
        assert!(back.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&back));
    }

    #[tokio::test]
    async fn upgrades_and_malformed_input_pass_through_for_hyper_to_judge() {
        let input = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x00\x01raw";
        let (passed, _) = run(input, 4096).await;
        assert_eq!(passed, input);
        let garbage = b"GET / HTTP/1.1\r\nBad Header\r\n\r\n";
        let (passed, _) = run(garbage, 4096).await;
        assert_eq!(passed, garbage);
    }
}
