//! The opaque transport's header: the first bytes a client proxy sends inside the mesh TLS
//! session it opened to a peer proxy's inbound port, naming the app port the connection is for.
//!
//! ```text
//! offset  0    1    2    3    4        5    6
//!        'P'  'L'  'N'  'T'  version  port (u16, big endian)
//! ```
//!
//! Seven bytes, always: the server reads exactly that many and nothing more, so the app's bytes
//! behind the header stay in the stream untouched, and a peer cannot make the server buffer
//! anything. Parsing is strict: the magic, a known version and a non-zero port, or a refusal.
//! A later format gets a new version byte (and a new ALPN protocol, see [`crate::opaque_transport`]),
//! never a reinterpretation of this one.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Identifies the header, so bytes of any other protocol are refused rather than misread.
const MAGIC: [u8; 4] = *b"PLNT";
/// The only version this proxy speaks.
const VERSION: u8 = 1;
/// The header's whole size: magic, version, port.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 2;

/// What the client proxy asks for: the app port on the peer pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportHeader {
    pub port: u16,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("transport header too short ({0} of {HEADER_LEN} bytes)")]
    Truncated(usize),
    #[error("transport header too long ({0} bytes, expected {HEADER_LEN})")]
    Oversized(usize),
    #[error("not a transport header (wrong magic)")]
    BadMagic,
    #[error("transport header version {0} is not supported (this proxy speaks {VERSION})")]
    UnknownVersion(u8),
    #[error("transport header names port 0")]
    PortZero,
}

impl TransportHeader {
    /// The header's bytes. `port` must not be 0 (the server refuses it).
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let [hi, lo] = self.port.to_be_bytes();
        let [m0, m1, m2, m3] = MAGIC;
        [m0, m1, m2, m3, VERSION, hi, lo]
    }

    /// Parses exactly one header: anything shorter, longer or different is refused.
    pub fn decode(bytes: &[u8]) -> Result<TransportHeader, HeaderError> {
        let bytes: &[u8; HEADER_LEN] = match bytes.len() {
            n if n < HEADER_LEN => return Err(HeaderError::Truncated(n)),
            n if n > HEADER_LEN => return Err(HeaderError::Oversized(n)),
            _ => bytes.try_into().map_err(|_| HeaderError::Truncated(bytes.len()))?,
        };
        let [m0, m1, m2, m3, version, hi, lo] = *bytes;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if version != VERSION {
            return Err(HeaderError::UnknownVersion(version));
        }
        match u16::from_be_bytes([hi, lo]) {
            0 => Err(HeaderError::PortZero),
            port => Ok(TransportHeader { port }),
        }
    }

    /// Reads exactly [`HEADER_LEN`] bytes from `io` and parses them. The caller bounds the wait.
    pub async fn read<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<TransportHeader> {
        let mut buf = [0u8; HEADER_LEN];
        let mut filled = 0;
        // Not `read_exact`: a short header is reported with how much of it arrived.
        while filled < HEADER_LEN {
            match io.read(&mut buf[filled..]).await? {
                0 => {
                    let error = HeaderError::Truncated(filled);
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, error));
                }
                n => filled += n,
            }
        }
        TransportHeader::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn encodes_magic_version_and_port() {
        let bytes = TransportHeader { port: 6379 }.encode();
        assert_eq!(bytes, [b'P', b'L', b'N', b'T', 1, 0x18, 0xeb]);
        assert_eq!(TransportHeader::decode(&bytes), Ok(TransportHeader { port: 6379 }));
        for port in [1, 25, 4143, u16::MAX] {
            let header = TransportHeader { port };
            assert_eq!(TransportHeader::decode(&header.encode()), Ok(header));
        }
    }

    #[test]
    fn hostile_headers_are_refused() {
        let good = TransportHeader { port: 3306 }.encode();
        for n in 0..HEADER_LEN {
            assert_eq!(TransportHeader::decode(&good[..n]), Err(HeaderError::Truncated(n)));
        }
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(TransportHeader::decode(&long), Err(HeaderError::Oversized(8)));
        let huge = vec![0u8; 1 << 20];
        assert_eq!(TransportHeader::decode(&huge), Err(HeaderError::Oversized(1 << 20)));

        let mut magic = good;
        magic[0] = b'p';
        assert_eq!(TransportHeader::decode(&magic), Err(HeaderError::BadMagic));
        // A TLS record or an HTTP request where the header should be is not a header.
        assert_eq!(TransportHeader::decode(b"GET / H"), Err(HeaderError::BadMagic));
        assert_eq!(
            TransportHeader::decode(&[0x16, 3, 1, 0, 0xff, 1, 0]),
            Err(HeaderError::BadMagic)
        );

        for version in [0, 2, 0xff] {
            let mut v = good;
            v[4] = version;
            assert_eq!(TransportHeader::decode(&v), Err(HeaderError::UnknownVersion(version)));
        }
        let zero = TransportHeader { port: 0 }.encode();
        assert_eq!(TransportHeader::decode(&zero), Err(HeaderError::PortZero));
    }

    #[test]
    fn every_input_of_the_header_size_parses_or_is_refused_without_panicking() {
        // The magic fixed, every version and port: only version 1 with a non-zero port passes.
        for version in 0..=u8::MAX {
            for port in [0u16, 1, 0x00ff, 0xff00, u16::MAX] {
                let [hi, lo] = port.to_be_bytes();
                let bytes = [b'P', b'L', b'N', b'T', version, hi, lo];
                let parsed = TransportHeader::decode(&bytes);
                assert_eq!(parsed.is_ok(), version == 1 && port != 0, "{bytes:?}: {parsed:?}");
            }
        }
    }

    #[tokio::test]
    async fn reads_exactly_the_header_and_leaves_the_apps_bytes() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut sent = TransportHeader { port: 25 }.encode().to_vec();
        sent.extend_from_slice(b"EHLO");
        // In pieces, as TLS records may deliver it.
        for piece in sent.chunks(3) {
            client.write_all(piece).await.unwrap();
        }
        let header = TransportHeader::read(&mut server).await.unwrap();
        assert_eq!(header, TransportHeader { port: 25 });
        let mut rest = [0u8; 4];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"EHLO");
    }

    #[tokio::test]
    async fn a_short_or_bad_header_on_the_stream_is_an_error() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PLN").await.unwrap();
        drop(client);
        let error = TransportHeader::read(&mut server).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(error.to_string().contains("3 of 7"), "{error}");

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"SSH-2.0-x\r\n").await.unwrap();
        let error = TransportHeader::read(&mut server).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
