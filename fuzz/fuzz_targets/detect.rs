//! Protocol detection (`proxy/src/detect.rs`): a connection's first bytes, whole and in pieces.
//!
//! Input: byte 0 picks how the bytes arrive, the rest is what the client sends.
//! Checks: the verdict never changes once given (so it cannot depend on how the bytes were split);
//! a request line httparse reads as HTTP/1.x is detected as HTTP/1; `detect_protocol` returns
//! exactly a prefix of the stream, bounded, with the verdict `classify` gives that prefix.
#![no_main]

use std::{rc::Rc, time::Duration};

use libfuzzer_sys::fuzz_target;
use pillion_fuzz::{Pieces, ScriptedIo};
use pillion_proxy::detect::{MAX_DETECT_BYTES, Protocol, classify_prefix, detect_protocol};

/// A TLS record header and the largest record.
const MAX_TLS_RECORD: usize = 5 + 16 * 1024;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, stream)) = data.split_first() else {
        return;
    };
    verdict_is_stable(stream);
    http_request_lines_are_http(stream);
    detection_in_pieces(stream, how);
});

/// Once a prefix has a verdict, every longer prefix has the same one.
fn verdict_is_stable(stream: &[u8]) {
    let full = classify_prefix(stream);
    // Every short prefix, then a spread of longer ones: all of them would be quadratic.
    let lengths = (1..=stream.len().min(96)).chain((96..stream.len()).step_by(61));
    let mut first: Option<(usize, Protocol)> = None;
    for len in lengths {
        let verdict = classify_prefix(&stream[..len]);
        match (first, verdict) {
            (None, Some(p)) => first = Some((len, p)),
            (Some((at, p)), v) => assert_eq!(
                v,
                Some(p),
                "{:?} gave {p:?} after {at} bytes but {v:?} after {len}",
                String::from_utf8_lossy(stream)
            ),
            (None, None) => {}
        }
    }
    if let Some((at, p)) = first {
        assert_eq!(
            full,
            Some(p),
            "verdict {p:?} after {at} bytes, {full:?} on the whole input"
        );
    }
}

/// What httparse reads as an HTTP/1.0 or 1.1 request line (with a method of a sane length)
/// is HTTP/1 to detection too.
fn http_request_lines_are_http(stream: &[u8]) {
    let Some(line_end) = stream.iter().position(|b| *b == b'\n') else {
        return;
    };
    // httparse skips empty lines before a request; detection does not (no client sends them).
    if !stream[0].is_ascii_alphabetic() {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    // Only the request line: the headers are not detection's business.
    let mut line = stream[..=line_end].to_vec();
    line.extend_from_slice(b"\r\n");
    let parsed = req.parse(&line);
    let complete_line = match parsed {
        Ok(_) => req.version.is_some(),
        // No header slots: a line that parsed up to the headers says TooManyHeaders.
        Err(httparse::Error::TooManyHeaders) => req.version.is_some(),
        Err(_) => false,
    };
    let method_len = req.method.map_or(0, str::len);
    if complete_line && method_len < 32 {
        assert_eq!(
            classify_prefix(stream),
            Some(Protocol::Http1),
            "httparse reads an HTTP/1 request line in {:?}",
            String::from_utf8_lossy(&stream[..line_end])
        );
    }
}

/// `detect_protocol` over the stream in pieces: nothing lost or invented, reads bounded.
fn detection_in_pieces(stream: &[u8], how: u8) {
    let max_piece = [1, 2, 7, 64, 1024, 16 * 1024][usize::from(how % 6)];
    let (mut io, tally) = ScriptedIo::new(Rc::from(stream), Pieces::new(u64::from(how), max_piece));
    let (protocol, read) = RUNTIME
        .with(|rt| rt.block_on(detect_protocol(&mut io, Duration::from_secs(3600))))
        .expect("in-memory reads do not fail");
    assert_eq!(read.len(), tally.read.get(), "everything read is handed on");
    assert_eq!(&read[..], &stream[..read.len()], "handed on unchanged");
    let bound = match protocol {
        Protocol::Tls => MAX_TLS_RECORD,
        _ => MAX_DETECT_BYTES,
    };
    assert!(
        read.len() < bound + max_piece,
        "{protocol:?} after {} bytes (pieces of up to {max_piece})",
        read.len()
    );
    let verdict = classify_prefix(&read);
    match protocol {
        // Opaque also when the stream ended or went on too long without a verdict.
        Protocol::Opaque => assert!(
            matches!(verdict, None | Some(Protocol::Opaque)),
            "opaque, but the bytes read say {verdict:?}"
        ),
        p => assert_eq!(verdict, Some(p)),
    }
    if read.len() < stream.len() && protocol == Protocol::Opaque {
        // It stopped early: only a verdict or the size cap stops it.
        assert!(verdict.is_some() || read.len() >= MAX_DETECT_BYTES);
    }
}
