//! Body types of the HTTP stack. Plain enums rather than boxed trait objects: the common case
//! (a body streamed straight through from hyper) costs no allocation.
//!
//! Retries need the request body again. [`RequestBody::tee`] streams the body to the first
//! attempt while keeping a copy (cheap `Bytes` clones) up to a limit; once the first attempt has
//! sent it all, [`Replay::body`] produces it again. Bodies over the limit are not retried.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::{metrics::Direction, policy::Route};

pub enum RequestBody {
    Empty,
    Incoming(Incoming),
    Tee(Incoming, Replay),
    /// Trailers boxed: this variant is rare, and every request is moved through each layer, so
    /// the enum is kept as small as the common `Incoming` case.
    Replayed(VecDeque<Bytes>, Option<Box<HeaderMap>>),
}

/// The copy kept for retries; shared by the first attempt's body and the retry layer.
#[derive(Clone)]
pub struct Replay(Arc<Mutex<Copied>>);

struct Copied {
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    bytes: usize,
    limit: usize,
    complete: bool,
    too_large: bool,
}

pub enum ResponseBody {
    Upstream(Incoming),
    /// A gRPC response whose `grpc-status` trailer is counted when it passes.
    Grpc(Incoming, Option<GrpcStatusRecorder>),
    Full(Option<Bytes>),
}

/// Records a gRPC response's status once, under its route.
pub struct GrpcStatusRecorder {
    route: Arc<Route>,
    direction: Direction,
}

impl GrpcStatusRecorder {
    fn record(self, headers: Option<&HeaderMap>) {
        let status = headers
            .and_then(|h| h.get("grpc-status"))
            .and_then(|v| v.to_str().ok()?.parse().ok());
        self.route.metrics[self.direction as usize].record_grpc(status);
    }
}

/// Counts the gRPC status of `rsp`: now if it is trailers-only, else when its trailers pass.
pub fn observe_grpc_status(rsp: &mut http::Response<ResponseBody>, route: Arc<Route>, direction: Direction) {
    let recorder = GrpcStatusRecorder { route, direction };
    if rsp.headers().contains_key("grpc-status") {
        recorder.record(Some(rsp.headers()));
        return;
    }
    let body = std::mem::replace(rsp.body_mut(), ResponseBody::empty());
    *rsp.body_mut() = match body {
        ResponseBody::Upstream(incoming) => ResponseBody::Grpc(incoming, Some(recorder)),
        other => other,
    };
}

impl RequestBody {
    /// Wraps a body so that it can be replayed for retries if it stays within `limit` bytes.
    pub fn tee(self, limit: usize) -> (RequestBody, Replay) {
        let known_too_large = self.size_hint().lower() > limit as u64;
        let replay = Replay(Arc::new(Mutex::new(Copied {
            frames: Vec::new(),
            trailers: None,
            bytes: 0,
            limit,
            complete: self.is_end_stream(),
            too_large: known_too_large,
        })));
        let body = match self {
            RequestBody::Incoming(incoming) if !known_too_large => RequestBody::Tee(incoming, replay.clone()),
            other => other,
        };
        (body, replay)
    }
}

impl Replay {
    /// The body again, if the first attempt consumed all of it and it fit the limit.
    pub fn body(&self) -> Option<RequestBody> {
        let copied = self.0.lock().ok()?;
        if !copied.complete || copied.too_large {
            return None;
        }
        if copied.frames.is_empty() && copied.trailers.is_none() {
            return Some(RequestBody::Empty);
        }
        Some(RequestBody::Replayed(
            copied.frames.iter().cloned().collect(),
            copied.trailers.clone().map(Box::new),
        ))
    }

    fn record(&self, frame: &Frame<Bytes>) {
        let Ok(mut copied) = self.0.lock() else { return };
        if copied.too_large {
            return;
        }
        if let Some(data) = frame.data_ref() {
            copied.bytes += data.len();
            if copied.bytes > copied.limit {
                copied.too_large = true;
                copied.frames = Vec::new();
                return;
            }
            copied.frames.push(data.clone());
        } else if let Some(trailers) = frame.trailers_ref() {
            copied.trailers = Some(trailers.clone());
        }
    }

    fn finish(&self) {
        if let Ok(mut copied) = self.0.lock() {
            copied.complete = true;
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Incoming(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Tee(body, replay) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => replay.record(frame),
                    Poll::Ready(None) => replay.finish(),
                    _ => {}
                }
                // hyper stops polling a body of known length once it reports its end.
                if body.is_end_stream() {
                    replay.finish();
                }
                polled
            }
            RequestBody::Replayed(frames, trailers) => match frames.pop_front() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t)))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Incoming(body) | RequestBody::Tee(body, _) => body.is_end_stream(),
            RequestBody::Replayed(frames, trailers) => frames.is_empty() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Incoming(body) | RequestBody::Tee(body, _) => body.size_hint(),
            RequestBody::Replayed(frames, _) => SizeHint::with_exact(frames.iter().map(|f| f.len() as u64).sum()),
        }
    }
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Grpc(body, recorder) => {
                let polled = Pin::new(body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                        if let Some(recorder) = recorder.take() {
                            recorder.record(frame.trailers_ref());
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(recorder) = recorder.take() {
                            recorder.record(None);
                        }
                    }
                    _ => {}
                }
                polled
            }
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) | ResponseBody::Grpc(body, _) => body.is_end_stream(),
            ResponseBody::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) | ResponseBody::Grpc(body, _) => body.size_hint(),
            ResponseBody::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
