//! What the fuzz targets share: a client stream that arrives in scripted pieces, and a poll loop
//! that runs a future without a runtime (every I/O here is in memory and always ready).

use std::{
    cell::{Cell, RefCell},
    future::Future,
    io,
    pin::{Pin, pin},
    rc::Rc,
    task::{Context, Poll, Waker},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Piece sizes drawn from a small xorshift generator, so one input byte picks a whole schedule.
#[derive(Clone)]
pub struct Pieces {
    state: u64,
    max: usize,
}

impl Pieces {
    /// Pieces of 1..=`max` bytes (`max` ≥ 1), varied by `seed`.
    pub fn new(seed: u64, max: usize) -> Self {
        Pieces {
            state: seed | 1,
            max: max.max(1),
        }
    }

    pub fn next_size(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        1 + (self.state % self.max as u64) as usize
    }
}

/// Counters a test reads after the stream was handed to the code under test.
#[derive(Clone, Default)]
pub struct Tally {
    /// Bytes handed out by reads.
    pub read: Rc<Cell<usize>>,
    /// Everything written back to the client.
    pub written: Rc<RefCell<Vec<u8>>>,
}

/// A client connection: reads return `input` in scripted pieces, then EOF; writes are kept.
pub struct ScriptedIo {
    input: Rc<[u8]>,
    pos: usize,
    pieces: Pieces,
    tally: Tally,
}

impl ScriptedIo {
    pub fn new(input: Rc<[u8]>, pieces: Pieces) -> (Self, Tally) {
        let tally = Tally::default();
        let io = ScriptedIo {
            input,
            pos: 0,
            pieces,
            tally: tally.clone(),
        };
        (io, tally)
    }
}

impl AsyncRead for ScriptedIo {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let n = this
            .pieces
            .next_size()
            .min(this.input.len() - this.pos)
            .min(buf.remaining());
        buf.put_slice(&this.input[this.pos..this.pos + n]);
        this.pos += n;
        this.tally.read.set(this.tally.read.get() + n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ScriptedIo {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.tally.written.borrow_mut().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Polls `future` to completion. Nothing here waits on the outside world, so a future that is
/// still pending after this many polls is stuck: that is a finding, not a slow input.
pub fn drive<F: Future>(future: F) -> F::Output {
    const MAX_POLLS: usize = 10_000_000;
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..MAX_POLLS {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("future still pending after {MAX_POLLS} polls with all I/O ready");
}

/// Whether `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
