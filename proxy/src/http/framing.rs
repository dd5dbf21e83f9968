//! Request-framing guard for HTTP/1 clients. It sits between the socket and hyper, hands hyper
//! only bytes it has classified, and owns three decisions:
//!
//! - **Smuggling shapes.** A request with both `Content-Length` and `Transfer-Encoding` is refused
//!   with 400 and a closed connection before any of it is forwarded, and a head over the size
//!   limit with 431. hyper alone would drop the `Content-Length`, frame by `Transfer-Encoding` and
//!   close after the response: safe, but the request would still reach the app. No honest client
//!   sends one, so we refuse it outright.
//! - **Bounded waits.** Every line the guard waits for is bounded: the head by `max_head`, a
//!   chunk-size line (with its extensions) and a body's trailer section by 16 KiB each — hyper's
//!   own limits, which hyper cannot apply to bytes the guard is still holding. Past a bound the
//!   client gets 400 (`pillion-proxy-error` says which) and a close — only the close if the app's
//!   answer is already being written — so a connection holds at most one bounded line plus one
//!   read, whatever the client sends.
//! - **Upgrades.** After a request that asks to switch protocols (`CONNECT`, or an `Upgrade` other
//!   than h2c, which the proxy never switches to), the guard holds the next bytes until the
//!   service side says whether the upstream switched ([`UpgradeWatch`], settled by the tunnel in
//!   `upstream.rs`): only then does it pass everything through; if not, it reads the next head as
//!   usual, so an upgrade the app refuses cannot switch the guard off.
//!
//! Each head is read whole and checked, then its body is passed through by its framing (length,
//! or chunk by chunk) so the next head is found exactly where hyper will look for it. Input the
//! guard cannot follow (a malformed head or chunk size) is passed through untouched: hyper
//! rejects it and closes the connection, so nothing after it is read as a request.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, Waker, ready},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const AMBIGUOUS: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\npillion-proxy-error: ambiguous request framing\r\ncontent-length: 27\r\nconnection: close\r\n\r\nambiguous request framing\r\n";
const TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\npillion-proxy-error: request header too large\r\ncontent-length: 26\r\nconnection: close\r\n\r\nrequest header too large\r\n";
const EXTENSIONS_TOO_LONG: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\npillion-proxy-error: chunk extensions too long\r\ncontent-length: 27\r\nconnection: close\r\n\r\nchunk extensions too long\r\n";
const TRAILERS_TOO_LARGE: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\npillion-proxy-error: trailers too large\r\ncontent-length: 20\r\nconnection: close\r\n\r\ntrailers too large\r\n";

/// More header fields than this and the guard steps aside; hyper's own limit (100) answers 431.
const MAX_HEADERS: usize = 128;

/// hyper's limits on a chunked body (`proto/h1/decode.rs`): extension bytes over the whole body,
/// and the bytes of its trailer section.
const CHUNK_EXTENSIONS_LIMIT: usize = 16 * 1024;
const TRAILERS_LIMIT: usize = 16 * 1024;
/// A longer chunk-size line is not one an honest client sends: the size and its whitespace take
/// a few bytes, the extensions at most their limit.
const MAX_CHUNK_LINE: usize = CHUNK_EXTENSIONS_LIMIT + 64;

pub struct FramingGuard<I> {
    io: I,
    /// Bytes read from the client and not yet handed to hyper.
    pending: BytesMut,
    /// How many bytes at the front of `pending` are classified and may go to hyper.
    releasable: usize,
    state: State,
    max_head: usize,
    eof: bool,
    /// The message being followed asks to switch protocols: after it, wait for the answer.
    switch_after: bool,
    /// Extension bytes seen in the chunked body being followed (hyper limits the whole body).
    chunk_extensions: usize,
    /// hyper wrote to the client since the last head was classified: an answer may be under
    /// way, and a refusal written now would land inside it.
    answering: bool,
    upgrades: UpgradeWatch,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Head,
    /// Fixed-length body: bytes left.
    Body(u64),
    Chunked(Chunk),
    /// After a request that asks to switch protocols: nothing more is classified until the
    /// service side says whether the upstream switched.
    Upgrading,
    /// An accepted upgrade, or input hyper rejects (and then closes): everything passes.
    Passthrough,
    /// Writing a refusal; `usize` = bytes written so far.
    Rejecting(&'static [u8], usize),
    Rejected,
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line, with any extensions.
    Size,
    /// Chunk data: bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields, then an empty line; `usize` = bytes of the section so far.
    Trailers(usize),
}

enum Step {
    /// `n` more bytes are classified.
    Release(usize),
    NeedMore,
}

/// What one step through chunked framing found.
enum ChunkStep {
    Release(usize),
    NeedMore,
    /// The body ends after these bytes.
    End(usize),
    /// Framing hyper rejects (it then closes the connection): release these bytes, then pass all.
    Lost(usize),
    Refuse(&'static [u8]),
}

/// Where the CRLF-terminated line at the start of some input ends, read as hyper reads chunk
/// lines: at the first CR, which must be followed by LF.
enum Line {
    /// The line's length without its CRLF.
    Ends(usize),
    Partial,
    /// hyper rejects this line.
    Malformed,
}

impl<I> FramingGuard<I> {
    /// A guard whose upgrades nobody settles until [`FramingGuard::upgrades`] is handed out.
    pub fn new(io: I, max_head: usize) -> Self {
        Self::with_upgrades(io, max_head, UpgradeWatch::default())
    }

    /// A guard that learns through `upgrades` whether an upgrade request switched the connection.
    pub fn with_upgrades(io: I, max_head: usize, upgrades: UpgradeWatch) -> Self {
        FramingGuard {
            io,
            pending: BytesMut::with_capacity(4096),
            releasable: 0,
            state: State::Head,
            max_head,
            eof: false,
            switch_after: false,
            chunk_extensions: 0,
            answering: false,
            upgrades,
        }
    }

    /// The handle the service side uses to settle this connection's upgrade requests.
    pub fn upgrades(&self) -> UpgradeWatch {
        self.upgrades.clone()
    }

    /// Classifies as many of the unclassified bytes as possible. Every step either classifies
    /// bytes or changes state, so this ends.
    fn classify(&mut self) {
        while self.releasable < self.pending.len() {
            let unclassified = &self.pending[self.releasable..];
            let step = match &mut self.state {
                State::Passthrough => Step::Release(unclassified.len()),
                State::Upgrading | State::Rejecting(..) | State::Rejected => return,
                State::Body(left) => {
                    let n = (*left).min(unclassified.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        self.state = self.message_end();
                    }
                    Step::Release(n as usize)
                }
                State::Chunked(chunk) => match step_chunk(chunk, &mut self.chunk_extensions, unclassified) {
                    ChunkStep::Release(n) => Step::Release(n),
                    ChunkStep::NeedMore => Step::NeedMore,
                    ChunkStep::End(n) => {
                        self.state = self.message_end();
                        Step::Release(n)
                    }
                    ChunkStep::Lost(n) => {
                        self.state = State::Passthrough;
                        Step::Release(n)
                    }
                    ChunkStep::Refuse(response) => {
                        tracing::info!("chunked request body over the proxy's line limits refused");
                        // Mid-body, the app may already be answering (hyper writes its answer as
                        // it comes): then a close is all the client can be told.
                        let response = if self.answering { &[][..] } else { response };
                        self.reject(response)
                    }
                },
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
        // hyper sees this request only after this; whatever it writes from now on may be its answer.
        self.answering = false;
        let mut content_length = None;
        // A Content-Length that does not parse, or two that disagree: hyper would refuse it alone,
        // but next to Transfer-Encoding it drops every Content-Length and frames by the coding.
        // Either way the framing is not one clear thing, so the guard answers, never steps aside.
        let mut bad_content_length = false;
        let mut transfer_encoding = None;
        let mut upgrade_token = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let parsed = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                match (parsed, content_length) {
                    (Some(n), None) => content_length = Some(n),
                    (Some(n), Some(seen)) if n == seen => {}
                    _ => bad_content_length = true,
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade_token |= names_protocol_to_switch_to(h.value);
            }
        }
        let connect = req.method == Some("CONNECT");
        let switch = switches_protocols(connect, req.version == Some(1), upgrade_token);
        self.switch_after = switch;
        if bad_content_length {
            tracing::info!("request with an invalid or conflicting Content-Length refused");
            return self.reject(AMBIGUOUS);
        }
        self.state = match (transfer_encoding, content_length) {
            (Some(_), Some(_)) => {
                tracing::info!("request with both Content-Length and Transfer-Encoding refused");
                return self.reject(AMBIGUOUS);
            }
            (Some(te), None) => {
                let chunked = te
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if chunked {
                    self.chunk_extensions = 0;
                    State::Chunked(Chunk::Size)
                } else {
                    // hyper answers 400 to any other request transfer coding, and closes.
                    State::Passthrough
                }
            }
            (None, Some(0)) | (None, None) => self.message_end(),
            (None, Some(n)) => State::Body(n),
        };
        if switch {
            // Before hyper sees the head, so the answer cannot come before the question.
            self.upgrades.expect();
        }
        Step::Release(end)
    }

    /// Where the guard goes once a request is complete.
    fn message_end(&mut self) -> State {
        if std::mem::take(&mut self.switch_after) {
            State::Upgrading
        } else {
            State::Head
        }
    }

    fn reject(&mut self, response: &'static [u8]) -> Step {
        self.state = State::Rejecting(response, 0);
        Step::NeedMore
    }
}

/// Whether a request head asks to switch protocols, as hyper decides it (`CONNECT`, or an
/// `Upgrade` header on HTTP/1.1), except that h2c is not a protocol we switch to:
/// `upgrade_token` says whether an `Upgrade` header names any other. The guard and the service
/// side both decide with this, so they agree on which requests wait for an answer.
pub fn switches_protocols(connect: bool, http11: bool, upgrade_token: bool) -> bool {
    connect || (http11 && upgrade_token)
}

/// Whether one `Upgrade` value names a protocol other than h2c.
pub fn names_protocol_to_switch_to(value: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|token| {
        let token = token.trim_ascii();
        !token.is_empty() && !token.eq_ignore_ascii_case(b"h2c")
    })
}

/// One step through chunked framing (RFC 9112 §7.1), line ends and limits as hyper reads them.
fn step_chunk(chunk: &mut Chunk, extensions: &mut usize, input: &[u8]) -> ChunkStep {
    match chunk {
        Chunk::Size => {
            let end = match crlf_line(input, true) {
                // The line is at least this long: refuse now rather than hold more of it.
                Line::Partial if input.len() > MAX_CHUNK_LINE + 1 => return ChunkStep::Refuse(EXTENSIONS_TOO_LONG),
                Line::Partial => return ChunkStep::NeedMore,
                Line::Malformed => return ChunkStep::Lost(0),
                Line::Ends(end) if end > MAX_CHUNK_LINE => return ChunkStep::Refuse(EXTENSIONS_TOO_LONG),
                Line::Ends(end) => end,
            };
            let line = &input[..end];
            let (digits, extension) = match line.iter().position(|b| *b == b';') {
                Some(semicolon) => (&line[..semicolon], &line[semicolon + 1..]),
                None => (line, &[][..]),
            };
            *extensions += extension.len();
            if *extensions >= CHUNK_EXTENSIONS_LIMIT {
                return ChunkStep::Refuse(EXTENSIONS_TOO_LONG);
            }
            match std::str::from_utf8(digits.trim_ascii())
                .ok()
                .and_then(|d| u64::from_str_radix(d, 16).ok())
            {
                Some(0) => *chunk = Chunk::Trailers(0),
                Some(n) => *chunk = Chunk::Data(n),
                // hyper rejects a bad chunk size itself; stop following.
                None => return ChunkStep::Lost(end + 2),
            }
            ChunkStep::Release(end + 2)
        }
        Chunk::Data(left) => {
            let n = (*left).min(input.len() as u64);
            *left -= n;
            if *left == 0 {
                *chunk = Chunk::DataEnd;
            }
            if n == 0 {
                ChunkStep::NeedMore
            } else {
                ChunkStep::Release(n as usize)
            }
        }
        Chunk::DataEnd => match input {
            [b'\r', b'\n', ..] => {
                *chunk = Chunk::Size;
                ChunkStep::Release(2)
            }
            [] | [b'\r'] => ChunkStep::NeedMore,
            _ => ChunkStep::Lost(0),
        },
        // Trailer fields, then an empty line; a lone LF is part of a field for hyper.
        Chunk::Trailers(seen) => match crlf_line(input, false) {
            // With its CRLF still to come, the section is at least this long.
            Line::Partial if *seen + input.len() + 1 > TRAILERS_LIMIT => ChunkStep::Refuse(TRAILERS_TOO_LARGE),
            Line::Partial => ChunkStep::NeedMore,
            Line::Malformed => ChunkStep::Lost(0),
            Line::Ends(end) if *seen + end + 2 > TRAILERS_LIMIT => ChunkStep::Refuse(TRAILERS_TOO_LARGE),
            Line::Ends(0) => ChunkStep::End(2),
            Line::Ends(end) => {
                *seen += end + 2;
                ChunkStep::Release(end + 2)
            }
        },
    }
}

/// The line at the start of `input`, ended by CRLF; a lone CR is malformed, and so is a lone LF
/// where hyper rejects one (`lf_is_malformed`: chunk-size lines).
fn crlf_line(input: &[u8], lf_is_malformed: bool) -> Line {
    let cr = input
        .iter()
        .position(|b| *b == b'\r' || (lf_is_malformed && *b == b'\n'));
    match cr {
        None => Line::Partial,
        Some(i) if input[i] == b'\n' => Line::Malformed,
        Some(i) => match input.get(i + 1) {
            None => Line::Partial,
            Some(b'\n') => Line::Ends(i),
            Some(_) => Line::Malformed,
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
            if this.state == State::Upgrading {
                // Nothing more is read until the answer: what follows is either the tunnel's
                // first bytes or the next request, and held bytes stay bounded.
                this.state = match ready!(this.upgrades.poll_answer(cx)) {
                    Answer::Switched => State::Passthrough,
                    Answer::Refused => State::Head,
                };
                this.classify();
                continue;
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
                // The refused line is never forwarded: let its memory go with the connection's
                // other held bytes.
                this.pending = BytesMut::new();
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

/// Writes go straight to the client; the guard only notes that hyper wrote.
impl<I: AsyncWrite + Unpin> AsyncWrite for FramingGuard<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.answering |= written > 0;
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, bufs))?;
        self.answering |= written > 0;
        Poll::Ready(Ok(written))
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

/// How the guard learns whether an upgrade request switched the connection. One per client
/// connection, shared by the guard and the service side; touched only for upgrade requests.
#[derive(Clone, Default)]
pub struct UpgradeWatch(Arc<Mutex<Watch>>);

#[derive(Default)]
struct Watch {
    answer: Option<Answer>,
    /// An upgrade request is in flight and not yet answered.
    waiting: bool,
    waker: Option<Waker>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Switched,
    Refused,
}

/// Travels with one upgrade request. The tunnel calls [`PendingUpgrade::accept`] when the
/// upstream switched (101, or 2xx to `CONNECT`); dropped without that (refused, denied, timed out,
/// failed), the connection did not switch and the guard reads the next request.
#[derive(Clone)]
pub struct PendingUpgrade(Arc<Settle>);

struct Settle(UpgradeWatch);

impl UpgradeWatch {
    /// The token for an upgrade request the service side is about to handle.
    pub fn pending(&self) -> PendingUpgrade {
        PendingUpgrade(Arc::new(Settle(self.clone())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        // Nothing panics while holding it; if something did, the state is still consistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The guard released an upgrade request's head: its answer is now awaited.
    fn expect(&self) {
        let mut watch = self.lock();
        watch.waiting = true;
        watch.answer = None;
    }

    fn settle(&self, answer: Answer) {
        let waker = {
            let mut watch = self.lock();
            if !watch.waiting {
                return;
            }
            watch.waiting = false;
            watch.answer = Some(answer);
            watch.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn poll_answer(&self, cx: &mut Context<'_>) -> Poll<Answer> {
        let mut watch = self.lock();
        match watch.answer.take() {
            Some(answer) => Poll::Ready(answer),
            None => {
                if !watch.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    watch.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl PendingUpgrade {
    /// The upstream switched protocols: the connection is a byte tunnel from here on.
    pub fn accept(&self) {
        self.0.0.settle(Answer::Switched);
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.0.settle(Answer::Refused);
    }
}

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

    /// Found by the `framing` fuzz target: a second Content-Length that does not parse made the
    /// guard step aside, and hyper (which drops Content-Length next to Transfer-Encoding) passed
    /// the request on.
    #[tokio::test]
    async fn an_unreadable_or_conflicting_content_length_is_refused_not_passed() {
        for input in [
            &b"GET /up HTTP/1.1\r\nHost: x\r\nContent-Length:04\r\nContent-Length:555\xff55\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        ] {
            let (passed, back) = run(input, 3).await;
            assert!(passed.is_empty(), "{}", String::from_utf8_lossy(input));
            assert!(back.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&back));
        }
        // The same length twice is one length.
        let twice = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(run(twice, 4096).await.0, twice);
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
    async fn malformed_input_passes_through_for_hyper_to_judge() {
        let garbage = b"GET / HTTP/1.1\r\nBad Header\r\n\r\n";
        let (passed, _) = run(garbage, 4096).await;
        assert_eq!(passed, garbage);
    }

    /// `prefix`, then a line of `filler` that never ends, written in `piece`-byte writes up to
    /// `total` bytes. Returns (what hyper would read, what the client got back, how many bytes the
    /// client managed to write).
    async fn unterminated(prefix: &[u8], filler: u8, total: usize, piece: usize) -> (Vec<u8>, Vec<u8>, usize) {
        // A small pipe: what the client gets to write is what the guard read, plus this much.
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut guard = FramingGuard::new(server, 64 * 1024);
        let prefix = prefix.to_vec();
        let writer = tokio::spawn(async move {
            let mut written = 0;
            if client.write_all(&prefix).await.is_ok() {
                written += prefix.len();
                let filler = vec![filler; piece];
                while written < total {
                    if client.write_all(&filler).await.is_err() {
                        break;
                    }
                    written += piece;
                }
            }
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            (back, written)
        });
        let mut passed = Vec::new();
        guard.read_to_end(&mut passed).await.unwrap();
        // The refused line is not held once the refusal is written.
        assert_eq!(guard.pending.capacity(), 0);
        drop(guard);
        let (back, written) = writer.await.unwrap();
        (passed, back, written)
    }

    const CHUNKED_HEAD: &[u8] = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[tokio::test]
    async fn an_endless_chunk_extension_is_refused_after_a_bounded_read() {
        const TOTAL: usize = 64 << 20;
        let mut prefix = CHUNKED_HEAD.to_vec();
        prefix.extend_from_slice(b"1;");
        for piece in [7, 4096, 60 * 1024] {
            let (passed, back, written) = unterminated(&prefix, b'a', TOTAL, piece).await;
            assert_eq!(passed, CHUNKED_HEAD, "only the head reached hyper (piece {piece})");
            let back = String::from_utf8_lossy(&back);
            assert!(back.starts_with("HTTP/1.1 400"), "{back}");
            assert!(
                back.contains("pillion-proxy-error: chunk extensions too long\r\n"),
                "{back}"
            );
            assert!(back.contains("connection: close\r\n"), "{back}");
            // The guard read at most one bounded line and a read beyond it; the pipe holds the rest.
            assert!(written < 256 * 1024, "client wrote {written} bytes before the close");
        }
        // Whitespace instead of extensions: the line is bounded all the same.
        let mut prefix = CHUNKED_HEAD.to_vec();
        prefix.extend_from_slice(b"0");
        let (_, back, written) = unterminated(&prefix, b'0', TOTAL, 4096).await;
        assert!(back.starts_with(b"HTTP/1.1 400"));
        assert!(written < 256 * 1024, "client wrote {written} bytes before the close");
    }

    #[tokio::test]
    async fn an_endless_trailer_line_is_refused_after_a_bounded_read() {
        let mut prefix = CHUNKED_HEAD.to_vec();
        prefix.extend_from_slice(b"3\r\nabc\r\n0\r\nx-trailer: ");
        for piece in [5, 4096] {
            let (passed, back, written) = unterminated(&prefix, b'b', 16 << 20, piece).await;
            assert_eq!(passed, &prefix[..prefix.len() - b"x-trailer: ".len()], "piece {piece}");
            let back = String::from_utf8_lossy(&back);
            assert!(back.starts_with("HTTP/1.1 400"), "{back}");
            assert!(back.contains("pillion-proxy-error: trailers too large\r\n"), "{back}");
            assert!(written < 256 * 1024, "client wrote {written} bytes before the close");
        }
        // Many short trailer lines count together, as hyper counts them.
        let mut many = CHUNKED_HEAD.to_vec();
        many.extend_from_slice(b"0\r\n");
        for i in 0..2000 {
            many.extend_from_slice(format!("x-t{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (passed, back) = run(&many, 4096).await;
        assert!(back.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&back));
        assert!(passed.len() <= CHUNKED_HEAD.len() + 3 + TRAILERS_LIMIT);
    }

    #[tokio::test]
    async fn lines_within_hypers_limits_pass_in_any_pieces() {
        // Extensions: 16383 bytes over the body pass (hyper's limit), one more is refused.
        const LAST: &[u8] = b"1;x=y\r\nb\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n";
        let body = |ext: usize| {
            let mut input = CHUNKED_HEAD.to_vec();
            input.extend_from_slice(format!("1;{}\r\na\r\n", "e".repeat(ext - 3)).as_bytes());
            input.extend_from_slice(LAST);
            input
        };
        for piece in [5, 997, 4096, 1 << 20] {
            let input = body(CHUNK_EXTENSIONS_LIMIT - 1);
            let (passed, back) = run(&input, piece).await;
            assert_eq!(passed, input, "piece {piece}");
            assert!(back.is_empty());
            let input = body(CHUNK_EXTENSIONS_LIMIT);
            let (passed, back) = run(&input, piece).await;
            assert!(back.starts_with(b"HTTP/1.1 400"), "piece {piece}");
            // Refused at the line that went over: neither it nor anything after reached hyper.
            assert_eq!(passed, &input[..input.len() - LAST.len()], "piece {piece}");
        }
        // Trailers: a section of exactly 16 KiB passes, one byte more is refused.
        let trailers = |section: usize| {
            let mut input = CHUNKED_HEAD.to_vec();
            input.extend_from_slice(b"0\r\n");
            let field = format!("x-t: {}\r\n\r\n", "v".repeat(section - 9));
            assert_eq!(field.len(), section);
            input.extend_from_slice(field.as_bytes());
            input.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
            input
        };
        for piece in [5, 997, 4096, 1 << 20] {
            let input = trailers(TRAILERS_LIMIT);
            let (passed, back) = run(&input, piece).await;
            assert_eq!(passed, input, "piece {piece}");
            assert!(back.is_empty());
            let (_, back) = run(&trailers(TRAILERS_LIMIT + 1), piece).await;
            assert!(back.starts_with(b"HTTP/1.1 400"), "piece {piece}");
        }
    }

    #[tokio::test]
    async fn chunk_framing_hyper_rejects_is_left_to_hyper() {
        // No CRLF after the chunk data: passed on for hyper to reject (it then closes).
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX0\r\n\r\n";
        let (passed, back) = run(input, 1).await;
        assert_eq!(passed, input);
        assert!(back.is_empty());
    }

    #[tokio::test]
    async fn a_refusal_never_lands_inside_an_answer_under_way() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = FramingGuard::new(server, 64 * 1024);
        client.write_all(CHUNKED_HEAD).await.unwrap();
        let mut head = vec![0; CHUNKED_HEAD.len()];
        guard.read_exact(&mut head).await.unwrap();
        // The app answered before reading the body; hyper is writing that answer.
        const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        guard.write_all(ANSWER).await.unwrap();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(b"1;").await;
            let filler = vec![b'a'; 4096];
            for _ in 0..64 {
                if client.write_all(&filler).await.is_err() {
                    break;
                }
            }
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut rest = Vec::new();
        guard.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(guard);
        let back = writer.await.unwrap();
        assert_eq!(back, ANSWER, "closed, with no refusal inside the answer");
    }

    const CL_TE: &[u8] =
        b"POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX";

    /// The guard with an upgrade request and a smuggling-shaped one behind it in its input;
    /// returns the guard after hyper read the upgrade request, and the client end.
    async fn after_upgrade_head(upgrade: &[u8]) -> (FramingGuard<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = FramingGuard::new(server, 64 * 1024);
        client.write_all(upgrade).await.unwrap();
        client.write_all(CL_TE).await.unwrap();
        let mut head = vec![0; upgrade.len()];
        guard.read_exact(&mut head).await.unwrap();
        assert_eq!(head, upgrade);
        // Nothing more reaches hyper while the upstream's answer is unknown.
        let mut more = [0u8; 64];
        let waited = tokio::time::timeout(std::time::Duration::from_secs(1), guard.read(&mut more)).await;
        assert!(waited.is_err(), "bytes after an unanswered upgrade were released");
        (guard, client)
    }

    const WEBSOCKET: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";

    #[tokio::test(start_paused = true)]
    async fn an_upgrade_the_upstream_refuses_leaves_the_guard_on() {
        for upgrade in [WEBSOCKET, b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n"] {
            let (mut guard, mut client) = after_upgrade_head(upgrade).await;
            // The service side handled the request without switching (any non-101 answer,
            // a 403, a timeout): its token is dropped unaccepted.
            drop(guard.upgrades().pending());
            let mut rest = Vec::new();
            guard.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
            drop(guard);
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert!(back.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&back));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_accepted_upgrade_passes_everything_after_it() {
        let (mut guard, mut client) = after_upgrade_head(WEBSOCKET).await;
        let token = guard.upgrades().pending();
        token.accept();
        drop(token);
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        guard.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, CL_TE, "tunnel bytes pass untouched");
    }

    #[tokio::test]
    async fn an_upgrade_requests_body_is_followed_and_an_early_answer_kept() {
        let head = b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body = b"2\r\nhi\r\n0\r\n\r\n";
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut guard = FramingGuard::new(server, 64 * 1024);
        client.write_all(head).await.unwrap();
        let mut got = vec![0; head.len()];
        guard.read_exact(&mut got).await.unwrap();
        // Answered (a 403, say) before the body arrived: the answer waits for the guard.
        drop(guard.upgrades().pending());
        client.write_all(body).await.unwrap();
        client.write_all(CL_TE).await.unwrap();
        let mut rest = Vec::new();
        guard.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, body, "the body went to hyper, the smuggling shape did not");
        drop(guard);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&back));
    }

    #[tokio::test]
    async fn an_h2c_only_upgrade_is_an_ordinary_request() {
        let mut input = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n".to_vec();
        let first = input.len();
        input.extend_from_slice(CL_TE);
        // Nobody answers an upgrade here: the guard goes on classifying right away.
        let (passed, back) = run(&input, 4096).await;
        assert_eq!(passed, &input[..first]);
        assert!(back.starts_with(b"HTTP/1.1 400"));

        assert!(!names_protocol_to_switch_to(b" h2c "));
        assert!(!names_protocol_to_switch_to(b""));
        assert!(names_protocol_to_switch_to(b"h2c, websocket"));
        assert!(
            !switches_protocols(false, false, true),
            "HTTP/1.0 does not upgrade (hyper)"
        );
        assert!(switches_protocols(true, false, false));
    }

    #[test]
    fn refusals_are_well_formed_responses() {
        for response in [AMBIGUOUS, TOO_LARGE, EXTENSIONS_TOO_LONG, TRAILERS_TOO_LARGE] {
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut parsed = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(end)) = parsed.parse(response) else {
                panic!("{}", String::from_utf8_lossy(response));
            };
            let length = parsed.headers.iter().find(|h| h.name == "content-length").unwrap();
            let length: usize = std::str::from_utf8(length.value).unwrap().parse().unwrap();
            assert_eq!(response.len() - end, length, "{}", String::from_utf8_lossy(response));
            let reason = parsed.headers.iter().find(|h| h.name == "pillion-proxy-error").unwrap();
            assert_eq!(&response[end..response.len() - 2], reason.value);
        }
    }
}
