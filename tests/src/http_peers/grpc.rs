//! gRPC the way it looks on the wire, over hyper's HTTP/2, without a gRPC library: a POST to
//! `/<package>.<Service>/<Method>` with `content-type: application/grpc` and `te: trailers`,
//! messages framed as a flag byte and a 4-byte big-endian length, and the outcome in the
//! `grpc-status` trailer (or in the headers of a trailers-only response). This is exactly what
//! a proxy has to carry: streaming bodies in both directions and trailers.
//!
//! The app implements `pillion.test.Echo`:
//!
//! | method | behaviour |
//! |---|---|
//! | `Unary` | replies `echo:<message>` for each message, then `grpc-status: 0` |
//! | `Slow` | waits 1 s, then as `Unary` |
//! | `Missing` | no message, trailers `grpc-status: 5` (NOT_FOUND) |
//! | `Stream` | bidirectional: answers each message as it arrives (headers first), then `grpc-status: 0` and `x-messages: <n>` |
//! | anything else | trailers-only `grpc-status: 12` (UNIMPLEMENTED) |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::app::{AppBody, BodyOutcome, BodyRecord, read_body};
use super::body::{ChannelBody, StreamHasher};

/// Paths of the test service start with this.
pub const SERVICE_PREFIX: &str = "/pillion.test.Echo/";

/// How long `Slow` waits before answering.
pub const SLOW_DELAY: Duration = Duration::from_secs(1);

/// Request bodies of the client.
pub type ClientBody = BoxBody<Bytes, Infallible>;

/// An HTTP/2 (prior knowledge) client connection.
pub type Client = http2::SendRequest<ClientBody>;

/// A call's outcome as the client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub http_status: u16,
    pub headers: HeaderMap,
    pub messages: Vec<String>,
    pub trailers: Option<HeaderMap>,
    /// From sending the request to the end of the response.
    pub elapsed: Duration,
}

/// Splits a byte stream into gRPC messages.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: BytesMut,
}

/// A gRPC message with its 5-byte prefix (uncompressed).
pub fn frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(message.len()).expect("small messages").to_be_bytes());
    framed.extend_from_slice(message);
    framed.into()
}

impl Deframer {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Option<Bytes> {
        let len = u32::from_be_bytes(self.buf.get(1..5)?.try_into().ok()?) as usize;
        if self.buf.len() < 5 + len {
            return None;
        }
        self.buf.advance(5);
        Some(self.buf.split_to(len).freeze())
    }

    /// Bytes that do not (yet) form a whole message.
    pub fn leftover(&self) -> usize {
        self.buf.len()
    }
}

impl Reply {
    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    pub fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
    }

    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A trailer as text.
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.as_ref()?.get(name)?.to_str().ok()
    }
}

// ----- client -----

/// Opens an h2c (prior knowledge) connection to `addr` from the current namespace.
pub async fn connect(addr: SocketAddr) -> Result<Client, String> {
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    // As gRPC clients do: the request's HEADERS and DATA go out in separate writes, and with
    // Nagle the DATA would wait for the peer's delayed ACK (~40 ms per call).
    let _ = stream.set_nodelay(true);
    let (client, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

fn request(authority: &str, method: &str, body: ClientBody) -> Request<ClientBody> {
    Request::post(format!("http://{authority}{SERVICE_PREFIX}{method}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(body)
        .expect("a valid request")
}

/// One request message, the whole response.
pub async fn unary(client: &mut Client, authority: &str, method: &str, message: &str) -> Result<Reply, String> {
    let started = Instant::now();
    let body = Full::new(frame(message.as_bytes())).boxed();
    let rsp = client
        .send_request(request(authority, method, body))
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    let (parts, body) = rsp.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|e| format!("{method} response body: {e}"))?;
    let trailers = collected.trailers().cloned();
    let mut deframer = Deframer::default();
    deframer.push(&collected.to_bytes());
    let mut messages = Vec::new();
    while let Some(message) = deframer.next_message() {
        messages.push(String::from_utf8_lossy(&message).into_owned());
    }
    Ok(Reply {
        http_status: parts.status.as_u16(),
        headers: parts.headers,
        messages,
        trailers,
        elapsed: started.elapsed(),
    })
}

/// A bidirectional `Stream` call that sends each message only after the echo of the previous
/// one came back — which only works if both directions really stream through the proxy.
pub async fn echo_stream(client: &mut Client, authority: &str, messages: &[&str]) -> Result<Reply, String> {
    let started = Instant::now();
    let (tx, body) = ChannelBody::channel(4);
    let rsp = client
        .send_request(request(authority, "Stream", body.boxed()))
        .await
        .map_err(|e| format!("Stream: {e}"))?;
    let (parts, mut body) = rsp.into_parts();
    let mut deframer = Deframer::default();
    let mut echoed = Vec::new();
    for message in messages {
        tx.send(Frame::data(frame(message.as_bytes())))
            .await
            .map_err(|_| "Stream: the request body was dropped".to_owned())?;
        let echo = loop {
            if let Some(echo) = deframer.next_message() {
                break echo;
            }
            match body.frame().await {
                Some(Ok(frame)) if frame.is_data() => deframer.push(&frame.into_data().unwrap_or_default()),
                Some(Ok(_)) => return Err(format!("Stream: trailers before the echo of {message:?}")),
                Some(Err(e)) => return Err(format!("Stream: waiting for the echo of {message:?}: {e}")),
                None => return Err(format!("Stream: response ended before the echo of {message:?}")),
            }
        };
        echoed.push(String::from_utf8_lossy(&echo).into_owned());
    }
    // End the request stream; the server answers with its trailers.
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("Stream: after the last echo: {e}"))?;
        match frame.into_data() {
            Ok(data) => deframer.push(&data),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    while let Some(extra) = deframer.next_message() {
        echoed.push(String::from_utf8_lossy(&extra).into_owned());
    }
    Ok(Reply {
        http_status: parts.status.as_u16(),
        headers: parts.headers,
        messages: echoed,
        trailers,
        elapsed: started.elapsed(),
    })
}

// ----- server (the app's side) -----

/// Serves one call of `pillion.test.Echo/<method>`.
pub async fn serve(method: &str, req: Request<Incoming>, record: BodyRecord) -> Response<AppBody> {
    match method {
        "Unary" | "Slow" | "Missing" => {
            if method == "Slow" {
                tokio::time::sleep(SLOW_DELAY).await;
            }
            let mut deframer = Deframer::default();
            if read_body_into(req.into_body(), &record, &mut deframer).await.is_none() {
                return trailers_only(13, "request body failed");
            }
            let mut reply = Vec::new();
            if method != "Missing" {
                while let Some(message) = deframer.next_message() {
                    let echo = [b"echo:".as_slice(), &message].concat();
                    reply.extend_from_slice(&frame(&echo));
                }
            }
            let trailers = if method == "Missing" {
                status_trailers(5, "no such thing")
            } else {
                status_trailers(0, "")
            };
            let body = Full::new(Bytes::from(reply))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed();
            grpc_response(body)
        }
        "Stream" => {
            let (tx, body) = ChannelBody::channel(4);
            tokio::spawn(async move {
                let mut incoming = req.into_body();
                let mut deframer = Deframer::default();
                let mut hasher = StreamHasher::new();
                let mut count = 0u32;
                while let Some(received) = incoming.frame().await {
                    let data = match received {
                        Ok(frame) => frame.into_data().unwrap_or_default(),
                        Err(error) => {
                            record.set(BodyOutcome::Failed(error.to_string()));
                            return;
                        }
                    };
                    hasher.update(&data);
                    deframer.push(&data);
                    while let Some(message) = deframer.next_message() {
                        count += 1;
                        let echo = [b"echo:".as_slice(), &message].concat();
                        if tx.send(Frame::data(frame(&echo))).await.is_err() {
                            return;
                        }
                    }
                }
                record.set(BodyOutcome::Complete {
                    digest: hasher.digest(),
                    start: Vec::new(),
                });
                let mut trailers = status_trailers(0, "");
                trailers.insert("x-messages", HeaderValue::from(count));
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            grpc_response(body.boxed())
        }
        _ => {
            record.set(BodyOutcome::Untouched);
            trailers_only(12, "unknown method")
        }
    }
}

async fn read_body_into(body: Incoming, record: &BodyRecord, deframer: &mut Deframer) -> Option<()> {
    read_body(body, record).await?;
    // `read_body` kept the first bytes verbatim; test messages are far smaller than that.
    if let BodyOutcome::Complete { start, .. } = record.outcome() {
        deframer.push(&start);
    }
    Some(())
}

fn grpc_response(body: AppBody) -> Response<AppBody> {
    let mut rsp = Response::new(body);
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    rsp
}

fn status_trailers(code: u8, message: &str) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if !message.is_empty() {
        trailers.insert("grpc-message", message.parse().expect("header-safe message"));
    }
    trailers
}

fn trailers_only(code: u8, message: &str) -> Response<AppBody> {
    let mut rsp = grpc_response(http_body_util::Empty::new().boxed());
    rsp.headers_mut().extend(status_trailers(code, message));
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_any_split() {
        let wire = [frame(b"one"), frame(b""), frame(b"three")].concat();
        for split in [1, 2, 5, 6, wire.len()] {
            let mut deframer = Deframer::default();
            let mut got = Vec::new();
            for piece in wire.chunks(split) {
                deframer.push(piece);
                while let Some(message) = deframer.next_message() {
                    got.push(message);
                }
            }
            assert_eq!(got, vec![&b"one"[..], b"", b"three"], "pieces of {split}");
            assert_eq!(deframer.leftover(), 0);
        }
    }
}
