//! Hand-written HTTP/1 over a std socket.
//!
//! Client libraries refuse to send the requests that matter most here (duplicate conflicting
//! `Content-Length`, broken chunk sizes, heads larger than a limit), and they hide whether the
//! connection was closed. These helpers write exact bytes and read exactly one response, byte
//! by byte up to the end of its head, so nothing after it is consumed: the same socket can carry
//! the next keep-alive request or become a raw tunnel after `101 Switching Protocols`.

use std::io::{self, Read, Write};
use std::net::TcpStream;

/// A response read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// How a connection ended when read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The peer closed (FIN).
    Closed,
    /// The peer reset the connection.
    Reset,
    /// Still open when the socket's read timeout passed.
    StillOpen,
}

/// Everything a peer sent until it closed the connection (or the read timeout passed).
#[derive(Debug, Clone)]
pub struct ReadToEnd {
    pub data: Vec<u8>,
    pub ending: Ending,
}

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl ReadToEnd {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// Status codes of the responses in `data`, in order (`HTTP/1.1 NNN` at line starts).
    pub fn statuses(&self) -> Vec<u16> {
        let text = self.text();
        let mut statuses = Vec::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("HTTP/1.1 ") {
            let line_start = at == 0 || rest[..at].ends_with('\n');
            if let (true, Some(code)) = (line_start, rest.get(at + 9..at + 12)) {
                if let Ok(code) = code.parse() {
                    statuses.push(code);
                }
            }
            rest = &rest[at + 9..];
        }
        statuses
    }
}

/// Reads one response's head (status line and headers) and nothing more.
pub fn read_head(stream: &mut impl Read) -> io::Result<RawResponse> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(invalid("response head too large"));
        }
        match stream.read(&mut byte)? {
            0 if head.is_empty() => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a response"));
            }
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed inside a response head",
                ));
            }
            _ => head.push(byte[0]),
        }
    }
    parse_head(&head)
}

/// Reads one whole response: the head, then the body framed by `content-length` or chunked
/// encoding (no body for 1xx, 204 and 304). A body framed by the connection's end is read to
/// the end.
pub fn read_response(stream: &mut impl Read) -> io::Result<RawResponse> {
    let mut response = read_head(stream)?;
    if matches!(response.status, 100..=199 | 204 | 304) {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    response.body = if chunked {
        read_chunked(stream)?
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len.trim().parse().map_err(|_| invalid("bad content-length"))?;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        body
    } else {
        let mut body = Vec::new();
        stream.read_to_end(&mut body)?;
        body
    };
    Ok(response)
}

/// Reads until the peer closes or resets the connection, or the socket's read timeout passes.
pub fn read_to_end(stream: &mut TcpStream) -> ReadToEnd {
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let ending = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ending::Closed,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                break Ending::Reset;
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                break Ending::StillOpen;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break Ending::Reset,
        }
    };
    ReadToEnd { data, ending }
}

/// Writes `request` and reads one response from the same connection.
pub fn exchange(stream: &mut TcpStream, request: &[u8]) -> io::Result<RawResponse> {
    stream.write_all(request)?;
    read_response(stream)
}

/// `GET path` with `host`, keeping the connection open, plus any extra header lines.
pub fn get(path: &str, host: &str, extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in extra_headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

fn parse_head(head: &[u8]) -> io::Result<RawResponse> {
    let text = std::str::from_utf8(head).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = text.trim_end().split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| invalid(&format!("bad status line {status_line:?}")))?;
    let headers = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid(&format!("bad header line {line:?}")))?;
            Ok((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect::<io::Result<_>>()?;
    Ok(RawResponse {
        status,
        headers,
        body: Vec::new(),
    })
}

fn read_chunked(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(stream)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| invalid(&format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailer fields, up to the empty line.
            while !read_line(stream)?.is_empty() {}
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        stream.read_exact(&mut body[start..])?;
        if !read_line(stream)?.is_empty() {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

fn read_line(stream: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        stream.read_exact(&mut byte)?;
        line.push(byte[0]);
        if line.len() > MAX_HEAD {
            return Err(invalid("line too long"));
        }
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| invalid("line is not UTF-8"))
}

fn invalid(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_response_and_leaves_the_next() {
        let wire =
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nokHTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\nraw";
        let mut reader = &wire[..];
        let first = read_response(&mut reader).unwrap();
        assert_eq!((first.status, first.body_text().as_str()), (200, "ok"));
        assert_eq!(first.header("x-a"), Some("b"));
        let second = read_response(&mut reader).unwrap();
        assert_eq!(second.status, 101);
        assert_eq!(reader, b"raw");
    }

    #[test]
    fn reads_chunked_bodies_with_trailers() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n";
        let response = read_response(&mut &wire[..]).unwrap();
        assert_eq!(response.body_text(), "abcde");
    }

    #[test]
    fn lists_statuses_of_pipelined_responses() {
        let read = ReadToEnd {
            data: b"HTTP/1.1 200 OK\r\nA: HTTP/1.1 999\r\n\r\nHTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            ending: Ending::Closed,
        };
        assert_eq!(read.statuses(), vec![200, 400]);
    }
}
