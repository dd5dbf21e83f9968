//! Bodies for streaming tests and a digest to check them.
//!
//! [`StreamDigest`] is length plus a position-dependent 64-bit hash over 8-byte words. The
//! byte-wise FNV of [`crate::traffic::Digest`] is fine for megabytes, but a test crate is built
//! without optimisation and a GiB hashed byte by byte on both ends would dominate the test's
//! run time; a word at a time is eight times less work and still changes with any lost,
//! duplicated or reordered word.
//!
//! [`PatternBody`] generates a request body of any length on demand (so a GiB never sits in
//! memory), digesting what it hands out; [`ChannelBody`] is a body fed frame by frame from a
//! task, for streaming calls where the next message depends on the last answer.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

use crate::traffic::Pattern;

/// Length and hash of a byte stream, however it was split into pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDigest {
    pub len: u64,
    pub hash: u64,
}

/// Computes a [`StreamDigest`] incrementally.
#[derive(Debug, Clone)]
pub struct StreamHasher {
    len: u64,
    hash: u64,
    /// Bytes of a word split across two updates.
    pending: [u8; 8],
    pending_len: usize,
}

/// A generated body of `len` bytes, chunk by chunk, digested as it is sent.
pub struct PatternBody {
    block: Vec<u8>,
    next_chunk: u64,
    left: u64,
    sent: Arc<Mutex<StreamHasher>>,
}

/// A body whose frames come from an mpsc channel; it ends when every sender is dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

/// Size of the chunks [`PatternBody`] produces.
const CHUNK: usize = 256 * 1024;
const PRIME: u64 = 0x0000_0100_0000_01b3;

impl StreamHasher {
    pub fn new() -> StreamHasher {
        StreamHasher {
            len: 0,
            hash: 0xcbf2_9ce4_8422_2325,
            pending: [0; 8],
            pending_len: 0,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.pending_len > 0 {
            let take = (8 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.pending));
            self.pending_len = 0;
        }
        let mut words = data.chunks_exact(8);
        for word in &mut words {
            let word = [word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7]];
            self.mix(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The digest of everything so far (a trailing partial word is padded with zeros; the
    /// length is mixed in, so padding cannot be confused with data).
    pub fn digest(&self) -> StreamDigest {
        let mut hash = self.hash;
        if self.pending_len > 0 {
            let mut last = [0u8; 8];
            last[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
            hash = (hash ^ u64::from_le_bytes(last)).wrapping_mul(PRIME);
        }
        StreamDigest {
            len: self.len,
            hash: (hash ^ self.len).wrapping_mul(PRIME),
        }
    }

    fn mix(&mut self, word: u64) {
        self.hash = (self.hash ^ word).wrapping_mul(PRIME).rotate_left(29);
    }
}

impl Default for StreamHasher {
    fn default() -> StreamHasher {
        StreamHasher::new()
    }
}

impl StreamDigest {
    pub fn of(data: &[u8]) -> StreamDigest {
        let mut hasher = StreamHasher::new();
        hasher.update(data);
        hasher.digest()
    }
}

impl std::fmt::Display for StreamDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "len={} hash={:016x}", self.len, self.hash)
    }
}

impl PatternBody {
    /// `len` bytes: a pseudo-random block from `seed`, repeated, with each chunk's index written
    /// into its first 8 bytes so that no two chunks are alike. Returns the body and the digest of
    /// what it has produced so far (complete once the body has been sent).
    pub fn new(len: u64, seed: u64) -> (PatternBody, Arc<Mutex<StreamHasher>>) {
        let sent = Arc::new(Mutex::new(StreamHasher::new()));
        let body = PatternBody {
            block: Pattern::new(seed).bytes(CHUNK),
            next_chunk: 0,
            left: len,
            sent: sent.clone(),
        };
        (body, sent)
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(this.left).map_or(CHUNK, |left| left.min(CHUNK));
        let mut chunk = this.block[..n].to_vec();
        let index = this.next_chunk.to_le_bytes();
        let stamp = n.min(8);
        chunk[..stamp].copy_from_slice(&index[..stamp]);
        this.next_chunk += 1;
        this.left -= n as u64;
        this.sent.lock().unwrap().update(&chunk);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

impl ChannelBody {
    /// A body and the sender that feeds it (`capacity` frames in flight).
    pub fn channel(capacity: usize) -> (mpsc::Sender<Frame<Bytes>>, ChannelBody) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, ChannelBody { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_how_the_stream_is_split() {
        let data = Pattern::new(3).bytes(100_003);
        let whole = StreamDigest::of(&data);
        for split in [1, 7, 8, 9, 4096, 99_999] {
            let mut hasher = StreamHasher::new();
            for piece in data.chunks(split) {
                hasher.update(piece);
            }
            assert_eq!(hasher.digest(), whole, "pieces of {split}");
        }
    }

    #[test]
    fn digest_sees_reordered_words_and_trailing_zeros() {
        let data = Pattern::new(4).bytes(64);
        let mut swapped = data.clone();
        swapped[..8].copy_from_slice(&data[8..16]);
        swapped[8..16].copy_from_slice(&data[..8]);
        assert_ne!(StreamDigest::of(&data), StreamDigest::of(&swapped));
        assert_ne!(StreamDigest::of(b"abc"), StreamDigest::of(b"abc\0"));
    }

    #[test]
    fn pattern_body_chunks_differ_and_add_up() {
        let (mut body, sent) = PatternBody::new(CHUNK as u64 * 2 + 5, 9);
        let mut received = StreamHasher::new();
        let mut chunks = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
            let data = frame.into_data().unwrap();
            received.update(&data);
            chunks.push(data);
        }
        assert_eq!(chunks.len(), 3);
        assert_ne!(chunks[0], chunks[1]);
        assert_eq!(received.digest(), sent.lock().unwrap().digest());
        assert_eq!(received.digest().len, CHUNK as u64 * 2 + 5);
    }
}
