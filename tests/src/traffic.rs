//! Test traffic: servers that play the app (or a remote service) and checksummed byte streams.
//!
//! A [`Server`] serves a listener created inside some namespace (see [`crate::netns::Netns::listen`])
//! with one thread per connection and remembers each peer address, so a test can check who the
//! connection came from. Two behaviours cover the tests:
//!
//! - [`echo`]: writes back everything it reads; at EOF it shuts down its write side. Used for
//!   round trips and for large transfers in both directions at once.
//! - [`digest_then_reply`]: reads to EOF, then replies with the length and checksum of what it
//!   read and closes. This is the half-close case: the reply can only be sent after the client's
//!   FIN crossed the proxy, and the client only sees it if the proxy keeps the other half open.
//!
//! Short messages are made with [`opaque`] so that the proxy's protocol detection never waits on
//! them. Payloads come from [`Pattern`] (a deterministic pseudo-random stream, so lost, duplicated or
//! reordered bytes change the checksum) and are summarised by [`Digest`] (length + FNV-1a).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bound on every blocking read and write on a test socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What a [`Server`] does with each accepted connection.
pub type Handler = fn(TcpStream) -> io::Result<()>;

/// Serves a listener on background threads until dropped.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    state: Arc<Mutex<ServerState>>,
}

#[derive(Debug, Default)]
struct ServerState {
    peers: Vec<SocketAddr>,
    errors: Vec<String>,
}

/// Length and FNV-1a (64-bit) of a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub fnv: u64,
}

/// A deterministic pseudo-random byte stream (xorshift64).
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
}

impl Server {
    pub fn start(listener: TcpListener, handler: Handler) -> Server {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(ServerState::default()));
        let accept = std::thread::Builder::new()
            .name(format!("server-{addr}"))
            .spawn({
                let stop = stop.clone();
                let state = state.clone();
                move || accept_loop(&listener, handler, &stop, &state)
            })
            .expect("spawning an accept thread");
        Server {
            addr,
            stop,
            accept: Some(accept),
            state,
        }
    }

    /// The listener's local address (e.g. `0.0.0.0:8080`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peer addresses of the connections accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.lock().unwrap().peers.clone()
    }

    /// Errors returned by connection handlers so far (e.g. a reset), for assertions and messages.
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // Connection threads are left to finish on their own: their sockets have timeouts.
    }
}

fn accept_loop(listener: &TcpListener, handler: Handler, stop: &AtomicBool, state: &Arc<Mutex<ServerState>>) {
    // Non-blocking accept polled every few ms: the only way to stop a std listener from outside.
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                state.lock().unwrap().peers.push(peer);
                let state = state.clone();
                let spawned = std::thread::Builder::new().name(format!("conn-{peer}")).spawn(move || {
                    if let Err(e) = serve_connection(stream, handler) {
                        state.lock().unwrap().errors.push(format!("{peer}: {e}"));
                    }
                });
                if let Err(e) = spawned {
                    eprintln!("warning: spawning a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                state.lock().unwrap().errors.push(format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn serve_connection(stream: TcpStream, handler: Handler) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    set_timeouts(&stream)?;
    handler(stream)
}

/// Sets [`IO_TIMEOUT`] on reads and writes, so no test thread blocks forever.
pub fn set_timeouts(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))
}

/// Writes back everything it reads; at EOF shuts down its write side.
pub fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Reads to EOF, then replies `len=<n> fnv=<hex>\n` (see [`Digest`]'s `Display`) and closes.
pub fn digest_then_reply(mut stream: TcpStream) -> io::Result<()> {
    let received = Digest::read_to_end(&mut stream)?;
    stream.write_all(format!("{received}\n").as_bytes())?;
    stream.shutdown(Shutdown::Write)
}

/// A short test message that cannot be mistaken for the start of HTTP or TLS.
///
/// The proxy reads a connection's first bytes to detect its protocol, and a word such as `hello`
/// could still be the method of an HTTP request line, so it would wait (up to its detect
/// timeout) for more. A leading NUL byte makes the verdict "opaque TCP" immediate.
pub fn opaque(text: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(text.len() + 1);
    message.push(0);
    message.extend_from_slice(text.as_bytes());
    message
}

/// Client side of a round trip through an [`echo`] server: writes `msg`, reads it back.
pub fn roundtrip(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    stream.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo mismatch: sent {msg:?}, got {back:?}"),
        ));
    }
    Ok(())
}

/// Client side of a half-close exchange: writes `data`, shuts down its write side, then reads the
/// peer's reply until the peer closes.
pub fn send_then_read_reply(stream: &mut TcpStream, data: &[u8]) -> io::Result<String> {
    stream.write_all(data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// Sends `len` pattern bytes through an [`echo`] server while reading the echo concurrently;
/// returns the digests of what was sent and what came back. An error says how far each
/// direction got, which tells a stall in one direction from one in the other.
pub fn transfer_through_echo(stream: &TcpStream, len: u64, seed: u64) -> io::Result<(Digest, Digest)> {
    let written = Arc::new(AtomicU64::new(0));
    let mut writer = Counting {
        inner: stream.try_clone()?,
        written: written.clone(),
    };
    let mut reader = stream.try_clone()?;
    let sender = std::thread::Builder::new()
        .name("transfer-writer".into())
        .spawn(move || -> io::Result<Digest> {
            let sent = Pattern::new(seed).write_to(&mut writer, len)?;
            writer.inner.shutdown(Shutdown::Write)?;
            Ok(sent)
        })?;
    let mut received = Digest::new();
    let read = received.read_from(&mut reader);
    let progress = |e: io::Error, side: &str| {
        io::Error::new(
            e.kind(),
            format!(
                "{side}: {e} (sent {} of {len} bytes, received {})",
                written.load(Ordering::Relaxed),
                received.len
            ),
        )
    };
    if let Err(e) = read {
        let e = progress(e, "reading");
        // Unblock the writer rather than wait out its own timeout.
        let _ = reader.shutdown(Shutdown::Both);
        let _ = sender.join();
        return Err(e);
    }
    let sent = sender
        .join()
        .map_err(|_| io::Error::other("the writer thread panicked"))?
        .map_err(|e| progress(e, "writing"))?;
    Ok((sent, received))
}

/// A writer that counts the bytes written through it, readable from another thread.
struct Counting {
    inner: TcpStream,
    written: Arc<AtomicU64>,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Asserts that the peer closed (EOF) or reset the connection without sending anything back,
/// after we send `first` (when not empty; a proxy decides nothing before a client's first bytes).
///
/// Takes the connect result because a close that beats the end of the handshake is reported by
/// the connect call itself, as a reset. A peer that stays silent fails the read's timeout.
pub fn assert_closed_without_data(connected: io::Result<TcpStream>, first: &[u8]) {
    let closed = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        )
    };
    let mut conn = match connected {
        Ok(conn) => conn,
        Err(e) if closed(&e) => return,
        Err(e) => panic!("expected a connection that is then closed, got {e}"),
    };
    // The peer may already have reset the connection: a failed write is fine, the read decides.
    let _ = conn.write_all(first);
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected the connection to be closed, got data {:?}", &buf[..n]),
        Err(e) if closed(&e) => {}
        Err(e) => panic!("expected EOF or a reset, got {e}"),
    }
}

impl Digest {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Digest {
        Digest {
            len: 0,
            fnv: Self::OFFSET,
        }
    }

    pub fn of(data: &[u8]) -> Digest {
        let mut digest = Digest::new();
        digest.update(data);
        digest
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut hash = self.fnv;
        for &byte in data {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(Self::PRIME);
        }
        self.fnv = hash;
        self.len += data.len() as u64;
    }

    /// Reads `reader` to EOF, digesting as it goes.
    pub fn read_to_end(reader: &mut impl Read) -> io::Result<Digest> {
        let mut digest = Digest::new();
        digest.read_from(reader)?;
        Ok(digest)
    }

    /// Digests `reader` to EOF into `self`; on error, `self` covers what was read before it.
    pub fn read_from(&mut self, reader: &mut impl Read) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf)? {
                0 => return Ok(()),
                n => self.update(&buf[..n]),
            }
        }
    }
}

impl Default for Digest {
    fn default() -> Digest {
        Digest::new()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "len={} fnv={:016x}", self.len, self.fnv)
    }
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        // One splitmix64 step spreads small seeds over the state; xorshift must not start at 0.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Pattern {
            state: (z ^ (z >> 31)).max(1),
        }
    }

    /// Fills `buf` with the next bytes of the stream. Each 8-byte word is one step, so a `buf`
    /// whose length is not a multiple of 8 drops the rest of its last word.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }

    /// The next `len` bytes (for small payloads).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.fill(&mut buf);
        buf
    }

    /// Writes the next `len` bytes to `writer`; returns their digest.
    pub fn write_to(&mut self, writer: &mut impl Write, len: u64) -> io::Result<Digest> {
        let mut digest = Digest::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            self.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            digest.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_values() {
        assert_eq!(Digest::of(b"").fnv, 0xcbf2_9ce4_8422_2325);
        assert_eq!(Digest::of(b"a").fnv, 0xaf63_dc4c_8601_ec8c);
        assert_eq!(Digest::of(b"foobar").fnv, 0x8594_4171_f739_67e8);
    }

    #[test]
    fn digest_is_incremental() {
        let data = Pattern::new(7).bytes(100_003);
        let mut split = Digest::new();
        split.update(&data[..12_345]);
        split.update(&data[12_345..]);
        assert_eq!(split, Digest::of(&data));
        assert_eq!(split.len, 100_003);
    }

    #[test]
    fn pattern_is_deterministic_and_chunking_independent() {
        let mut sink = Vec::new();
        let digest = Pattern::new(42).write_to(&mut sink, 200_000).unwrap();
        assert_eq!(digest, Digest::of(&sink));
        assert_eq!(sink, Pattern::new(42).bytes(200_000));
        assert_ne!(Pattern::new(42).bytes(64), Pattern::new(43).bytes(64));
    }
}
