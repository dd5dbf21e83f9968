//! The HTTP/1 framing guard (`proxy/src/http/framing.rs`) in front of hyper, as the proxy runs it,
//! against hyper alone on the same bytes.
//!
//! Input: byte 0 picks how the stream arrives (piece sizes) and whether the app accepts upgrades
//! (answers 101); byte 1, when not zero, repeats the stream's last byte that many KiB (a line that
//! never ends); the rest is what the client sends, whole request streams.
//!
//! Each input is served twice by hyper, configured as the proxy configures it: once reading the
//! client directly, once through the guard. Checks:
//! - no panic, and the connection ends (all I/O is in memory);
//! - bounded buffering: what the guard holds (read from the client, not yet given to hyper) stays
//!   under the head limit plus hyper's own line limits plus one read;
//! - every request hyper gets through the guard is the request hyper gets at that place without
//!   it (same method, target, version, headers and body);
//! - none of them had both `Content-Length` and `Transfer-Encoding` (hyper would accept it);
//! - unless the guard refused (its 400 or 431), hyper gets every request it gets without the guard.
#![no_main]

use std::{
    cell::{Cell, RefCell},
    convert::Infallible,
    io,
    pin::Pin,
    rc::Rc,
    task::Context,
    task::Poll,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, Response, body::Incoming, server::conn::http1};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use pillion_fuzz::{Pieces, ScriptedIo, Tally, contains, drive};
use pillion_proxy::http::{
    framing::{FramingGuard, PendingUpgrade, UpgradeWatch, names_protocol_to_switch_to, switches_protocols},
    upstream::admit_upgrade,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The guard's head limit, and hyper's buffer limit (the proxy sets both from one setting); the
/// smallest the proxy accepts, so that the limit is reached often.
const MAX_HEAD: usize = 8192;
/// The longest line the guard may wait for besides a head: hyper's limits on chunk extensions and
/// on trailers are 16 KiB each; a little more for the chunk size and line ends.
const MAX_LINE: usize = 16 * 1024 + 128;
/// Largest read handed to the guard.
const MAX_PIECE: usize = 4096;

/// One request as the app saw it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    method: String,
    uri: String,
    version: http::Version,
    headers: Vec<(String, Vec<u8>)>,
    /// The whole body, or `None` if it ended with an error or was never read to its end.
    body: Option<Bytes>,
}

/// One run: the requests the app got.
struct Served {
    requests: Vec<Seen>,
}

fuzz_target!(|data: &[u8]| {
    let [how, repeat, stream @ ..] = data else {
        return;
    };
    let mut stream = stream.to_vec();
    let mut max_piece = [1, 3, 16, 64, 512, MAX_PIECE, 1500, MAX_PIECE][usize::from(how & 7)];
    if *repeat > 0 {
        let Some(&last) = stream.last() else {
            return;
        };
        stream.resize(stream.len() + usize::from(*repeat) * 1024, last);
        // Long streams in one-byte reads only cost time.
        max_piece = max_piece.max(64);
    }
    let accepts_upgrades = how & 0x80 != 0;
    let stream: Rc<[u8]> = Rc::from(stream);
    let pieces = Pieces::new(u64::from(*how) << 8 | stream.len() as u64, max_piece);

    let (io, _) = ScriptedIo::new(stream.clone(), pieces.clone());
    // Nobody waits on this watch: without the guard, upgrades are hyper's business alone.
    let direct = serve(io, UpgradeWatch::default(), accepts_upgrades);

    let (io, tally) = ScriptedIo::new(stream.clone(), pieces);
    let upgrades = UpgradeWatch::default();
    let closed_early = Rc::new(Cell::new(false));
    let guarded = serve(
        Measured {
            guard: FramingGuard::with_upgrades(io, MAX_HEAD, upgrades.clone()),
            client: tally.clone(),
            released: 0,
            stream_len: stream.len(),
            closed_early: closed_early.clone(),
        },
        upgrades,
        accepts_upgrades,
    );

    // The guard writes its refusals to the client itself, past hyper; once hyper has started an
    // answer, a refusal is only a close (hyper sees the client go away before it stopped sending).
    let refused = contains(&tally.written.borrow(), b"pillion-proxy-error:") || closed_early.get();
    let heads = model_heads(&stream, accepts_upgrades);
    for (i, got) in guarded.requests.iter().enumerate() {
        let Some(want) = direct.requests.get(i) else {
            panic!("through the guard hyper got request {i} ({got:?}), which hyper alone never got");
        };
        assert_eq!(
            (&got.method, &got.uri, got.version, &got.headers),
            (&want.method, &want.uri, want.version, &want.headers),
            "request {i} differs through the guard"
        );
        // A body can be cut short by a refusal, or by hyper dropping a request in flight
        // when the client closes; where both runs read it whole, it is the same.
        if let (Some(got_body), Some(want_body)) = (&got.body, &want.body) {
            assert_eq!(got_body, want_body, "request {i}'s body differs through the guard");
        }
        // Where the model follows hyper, it knows the raw head; hyper drops Content-Length
        // when Transfer-Encoding is present, so the request alone cannot tell.
        if let Some(head) = heads.get(i).filter(|h| h.method == got.method && h.uri == got.uri) {
            assert!(
                !(head.content_length && head.transfer_encoding),
                "request {i} ({} {}) with Content-Length and Transfer-Encoding passed the guard",
                head.method,
                head.uri
            );
        }
    }
    if !refused {
        assert_eq!(
            guarded.requests.len(),
            direct.requests.len(),
            "without a refusal, the guard held back requests hyper accepts: {:?}",
            direct.requests.get(guarded.requests.len())
        );
    }
});

/// Serves one connection with hyper as `proxy/src/http/mod.rs` does, with an app that answers
/// 200 (or 101 to an upgrade it accepts).
fn serve<I>(io: I, upgrades: UpgradeWatch, accepts_upgrades: bool) -> Served
where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let seen = Rc::new(RefCell::new(Vec::new()));
    let app = {
        let seen = seen.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let seen = seen.clone();
            // As the proxy's service does: h2c offers stripped, real upgrades carry the token
            // that tells the guard whether the connection switched.
            admit_upgrade(&mut req, &upgrades);
            let (mut parts, body) = req.into_parts();
            let upgrade = parts.extensions.remove::<PendingUpgrade>();
            // Noted when hyper hands the request over: hyper may drop it in flight when the
            // client closes first (no half-close), and that is hyper's doing, not the guard's.
            let index = {
                let mut seen = seen.borrow_mut();
                seen.push(Seen {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    version: parts.version,
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                        .collect(),
                    body: None,
                });
                seen.len() - 1
            };
            async move {
                seen.borrow_mut()[index].body = body.collect().await.ok().map(|b| b.to_bytes());
                let mut response = Response::new(Empty::<Bytes>::new());
                if let Some(upgrade) = upgrade.filter(|_| accepts_upgrades) {
                    upgrade.accept();
                    if parts.method == http::Method::CONNECT {
                        // A 2xx to CONNECT is the tunnel.
                    } else {
                        *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                        response
                            .headers_mut()
                            .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
                        response
                            .headers_mut()
                            .insert(http::header::UPGRADE, "websocket".parse().unwrap());
                    }
                } else if parts.method == http::Method::CONNECT {
                    // Refused (the token, if any, drops here): hyper goes on reading requests.
                    *response.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = http1::Builder::new()
        .writev(false)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), app);
    // Errors (malformed requests, a client gone mid-body) end the connection; they are not findings.
    let _ = drive(conn);
    let requests = std::mem::take(&mut *seen.borrow_mut());
    Served { requests }
}

/// The guard, measured: after every read it gives hyper, it may hold no more than the limits.
struct Measured<I> {
    guard: FramingGuard<I>,
    client: Tally,
    released: usize,
    stream_len: usize,
    /// The guard told hyper the client was gone before the client was: it refused.
    closed_early: Rc<Cell<bool>>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Measured<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.guard).poll_read(cx, buf);
        let given = buf.filled().len() - before;
        this.released += given;
        if polled.is_ready() && given == 0 && buf.remaining() > 0 && this.client.read.get() < this.stream_len {
            this.closed_early.set(true);
        }
        let held = this.client.read.get() - this.released;
        assert!(
            held <= MAX_HEAD.max(MAX_LINE) + MAX_PIECE,
            "the guard holds {held} bytes read from the client and not given to hyper"
        );
        polled
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Measured<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.guard).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.guard).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.guard).poll_shutdown(cx)
    }
}

/// A request head as written, from a simple framer that follows RFC 9112 the way hyper does.
/// It stops where it is unsure; the caller only trusts a head whose method and target match
/// the request hyper delivered at the same place.
struct Head {
    method: String,
    uri: String,
    content_length: bool,
    transfer_encoding: bool,
}

fn model_heads(stream: &[u8], accepts_upgrades: bool) -> Vec<Head> {
    let mut heads = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let mut slots = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut slots);
        let Ok(httparse::Status::Complete(end)) = req.parse(&stream[pos..]) else {
            break;
        };
        let (Some(method), Some(uri), Some(version)) = (req.method, req.path, req.version) else {
            break;
        };
        let headers: &[httparse::Header<'_>] = req.headers;
        let named = |name: &'static str| headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name));
        let content_lengths: Vec<&[u8]> = named("content-length").map(|h| h.value).collect();
        let transfer_encoding = named("transfer-encoding").last().map(|h| h.value);
        let token = named("upgrade").any(|h| names_protocol_to_switch_to(h.value));
        let upgrade = switches_protocols(method == "CONNECT", version == 1, token);
        heads.push(Head {
            method: method.to_string(),
            uri: uri.to_string(),
            content_length: !content_lengths.is_empty(),
            transfer_encoding: transfer_encoding.is_some(),
        });
        pos += end;
        let body_end = match (transfer_encoding, content_lengths.first()) {
            (Some(te), _) => {
                let chunked = te
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                if version == 0 || !chunked {
                    break;
                }
                match chunked_end(&stream[pos..]) {
                    Some(n) => pos + n,
                    None => break,
                }
            }
            (None, Some(cl)) => {
                let parse = |v: &[u8]| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok();
                let Some(n) = parse(cl) else { break };
                if content_lengths.iter().any(|v| parse(v) != Some(n)) {
                    break;
                }
                match usize::try_from(n).ok().and_then(|n| pos.checked_add(n)) {
                    Some(end) if end <= stream.len() => end,
                    _ => break,
                }
            }
            (None, None) => pos,
        };
        pos = body_end;
        if upgrade && accepts_upgrades {
            break;
        }
    }
    heads
}

/// Where a chunked body that starts `body` ends (after its trailers), if it is complete.
fn chunked_end(body: &[u8]) -> Option<usize> {
    let line = |from: usize| body[from..].iter().position(|b| *b == b'\n').map(|i| from + i);
    let mut pos = 0;
    loop {
        let end = line(pos)?;
        let digits = body[pos..end].split(|b| *b == b';').next()?.trim_ascii();
        let size = u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()?;
        pos = end + 1;
        if size == 0 {
            break;
        }
        pos = pos.checked_add(usize::try_from(size).ok()?)?;
        if pos > body.len() {
            return None;
        }
        pos = line(pos)? + 1;
    }
    loop {
        let end = line(pos)?;
        let blank = body[pos..end].trim_ascii().is_empty();
        pos = end + 1;
        if blank {
            return Some(pos);
        }
    }
}
