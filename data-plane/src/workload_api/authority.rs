//! Makes the `:authority` that gRPC C-core clients (grpc-python, hence py-spiffe; grpc-java, grpc-ruby) send over a
//! Unix socket acceptable to the `h2` crate under tonic.
//!
//! For a target `unix:///run/trellis/workload.sock` C-core sends the percent-encoded path as the authority
//! (`%2Frun%2Ftrellis%2Fworkload.sock`; grpc since 1.57); `h2` parses every request's authority as a URI authority,
//! where `%` and `/` are not allowed in a host, and resets the stream (PROTOCOL_ERROR) before tonic sees it. Neither
//! h2, hyper nor tonic has a setting for this (h2 pull request 487 is still open), and the client's authority is not
//! ours to set. On a Unix socket the authority names nothing, so this relay, between the socket and the server,
//! decodes each request header block of the client (HPACK, with the client's dynamic table), replaces an authority
//! that `http` cannot parse by `localhost`, and re-encodes the block without the dynamic table (literals without
//! indexing: the server's table stays empty, so the two never disagree). Every other frame, and the whole server
//! to client direction, passes through byte for byte.
//!
//! Bounds: a header block (HEADERS and its CONTINUATIONs) larger than [`MAX_HEADER_BLOCK`] on the wire, or decoding
//! to more than [`MAX_DECODED_HEADERS`], ends the connection; other frames are copied in chunks, never buffered
//! whole.

use std::borrow::Cow;
use std::io;

use fluke_hpack::decoder::Decoder;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A header block's size on the wire: Workload API requests carry a handful of short headers.
pub const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// A header block's size once decoded (indexed fields can expand a small block).
pub const MAX_DECODED_HEADERS: usize = 32 * 1024;
/// The smallest SETTINGS_MAX_FRAME_SIZE a server may have: re-encoded blocks are split into frames of this size.
const MAX_FRAME: usize = 16_384;
/// The HPACK table size a client may assume before the server says otherwise (h2 keeps the default).
const HPACK_TABLE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a client's byte stream was cut off (the connection is closed; the server sees an end of stream).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("header block over {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    #[error("header block decodes to over {MAX_DECODED_HEADERS} bytes")]
    DecodedTooLarge,
    #[error("malformed HEADERS frame: {0}")]
    Malformed(&'static str),
    #[error("frame type {0:#x} inside a header block")]
    Interleaved(u8),
    #[error("HPACK: {0:?}")]
    Hpack(fluke_hpack::decoder::DecoderError),
}

/// Copies the client's bytes to the server, rewriting request header blocks as described in the module doc, until
/// either side ends; then shuts the server's side down (it sees the client's end of stream). Not a protocol
/// checker: anything the relay does not need to understand is left to h2.
pub async fn relay_client<R, W>(from: R, mut to: W) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let result = relay(from, &mut to).await;
    let _ = to.shutdown().await;
    result
}

async fn relay<R, W>(mut from: R, to: &mut W) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; PREFACE.len()];
    let got = read_up_to(&mut from, &mut preface).await?;
    to.write_all(&preface[..got]).await?;
    if got < preface.len() || &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: the server refuses it; nothing of ours to rewrite.
        tokio::io::copy(&mut from, to).await?;
        return Ok(());
    }
    let mut rewriter = Rewriter::new();
    let mut chunk = vec![0u8; 8192];
    loop {
        let mut head = [0u8; 9];
        if read_up_to(&mut from, &mut head).await? < head.len() {
            return Ok(());
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if kind == HEADERS || kind == CONTINUATION {
            if rewriter.block_len() + len > MAX_HEADER_BLOCK {
                return Err(RelayError::BlockTooLarge);
            }
            let mut payload = vec![0u8; len];
            from.read_exact(&mut payload).await?;
            if let Some(frames) = rewriter.frame(kind, flags, stream, payload)? {
                to.write_all(&frames).await?;
            }
            continue;
        }
        if rewriter.in_block() {
            return Err(RelayError::Interleaved(kind));
        }
        to.write_all(&head).await?;
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            from.read_exact(&mut chunk[..n]).await?;
            to.write_all(&chunk[..n]).await?;
            left -= n;
        }
    }
}

/// Reads until `buf` is full or the stream ends; how much was read.
async fn read_up_to<R: AsyncRead + Unpin>(from: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match from.read(&mut buf[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// The client's HPACK context and the header block being gathered.
pub struct Rewriter {
    decoder: Decoder<'static>,
    /// (stream, the HEADERS flags to keep, priority bytes, fragment so far) while a block is open.
    open: Option<OpenBlock>,
}

/// A decoded header field: name, value.
type Field = (Vec<u8>, Vec<u8>);

struct OpenBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE);
        Self { decoder, open: None }
    }

    fn in_block(&self) -> bool {
        self.open.is_some()
    }

    fn block_len(&self) -> usize {
        self.open.as_ref().map_or(0, |b| b.fragment.len())
    }

    /// Takes one HEADERS or CONTINUATION frame's payload; when the block is complete, returns the frames to send.
    pub fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: Vec<u8>) -> Result<Option<Vec<u8>>, RelayError> {
        if kind == HEADERS {
            if self.open.is_some() {
                return Err(RelayError::Interleaved(kind));
            }
            let mut body = &payload[..];
            let mut pad = 0usize;
            if flags & PADDED != 0 {
                let (&p, rest) = body.split_first().ok_or(RelayError::Malformed("no pad length"))?;
                pad = p as usize;
                body = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let p: [u8; 5] =
                    body.get(..5).and_then(|p| p.try_into().ok()).ok_or(RelayError::Malformed("short priority"))?;
                priority = Some(p);
                body = &body[5..];
            }
            let fragment = body.get(..body.len().checked_sub(pad).ok_or(RelayError::Malformed("padding too long"))?);
            let fragment = fragment.ok_or(RelayError::Malformed("padding too long"))?.to_vec();
            self.open = Some(OpenBlock { stream, flags: flags & (END_STREAM | PRIORITY), priority, fragment });
        } else {
            let open = self.open.as_mut().ok_or(RelayError::Malformed("CONTINUATION without HEADERS"))?;
            if open.stream != stream {
                return Err(RelayError::Malformed("CONTINUATION on another stream"));
            }
            open.fragment.extend_from_slice(&payload);
        }
        if flags & END_HEADERS == 0 {
            return Ok(None);
        }
        let block = self.open.take().expect("opened above");
        let headers = self.decode(&block.fragment)?;
        Ok(Some(encode_frames(&block, &headers)))
    }

    /// The block's fields, with an unparseable `:authority` replaced.
    fn decode(&mut self, fragment: &[u8]) -> Result<Vec<Field>, RelayError> {
        let mut fields = Vec::new();
        let mut size = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                size += name.len() + value.len() + 32;
                if size > MAX_DECODED_HEADERS {
                    too_large = true;
                } else if !too_large {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(RelayError::Hpack)?;
        if too_large {
            return Err(RelayError::DecodedTooLarge);
        }
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                debug!(
                    authority = %String::from_utf8_lossy(value),
                    "Workload API: unparseable :authority (a gRPC C-core Unix socket target) replaced by localhost"
                );
                *value = b"localhost".to_vec();
            }
        }
        Ok(fields)
    }
}

/// The block re-encoded (literal fields without indexing, plain strings) as HEADERS and CONTINUATION frames.
fn encode_frames(block: &OpenBlock, fields: &[Field]) -> Vec<u8> {
    let mut encoded = Vec::new();
    for (name, value) in fields {
        // Literal Header Field without Indexing, New Name (RFC 7541, 6.2.2), no Huffman.
        encoded.push(0x00);
        encode_string(name, &mut encoded);
        encode_string(value, &mut encoded);
    }
    let mut first = Vec::with_capacity(5 + encoded.len());
    if let Some(priority) = block.priority {
        first.extend_from_slice(&priority);
    }
    first.extend_from_slice(&encoded);
    let mut out = Vec::with_capacity(first.len() + 9 * (1 + first.len() / MAX_FRAME));
    let chunks: Vec<&[u8]> = if first.is_empty() { vec![&[][..]] } else { first.chunks(MAX_FRAME).collect() };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (kind, mut flags) = if i == 0 { (HEADERS, block.flags) } else { (CONTINUATION, 0) };
        if i == last {
            flags |= END_HEADERS;
        }
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&block.stream.to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// A string literal (RFC 7541, 5.2) without Huffman coding: H=0, 7-bit prefix length, the bytes.
fn encode_string(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&fluke_hpack::encoder::encode_integer(bytes.len(), 7));
    out.extend_from_slice(bytes);
}

/// Logs why a relayed connection was cut (at debug: a client's malformed stream is its own problem).
pub fn log_end(result: Result<(), RelayError>) {
    if let Err(e) = result {
        debug!(error = %e, "Workload API connection closed by the authority relay");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluke_hpack::encoder::Encoder;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Splits frames and decodes their header blocks with a fresh decoder (the server's: empty table).
    /// (frame type, flags, stream, fields) of each header block.
    type Block = (u8, u8, u32, Vec<(String, String)>);

    fn decode_frames(bytes: &[u8]) -> Vec<Block> {
        let mut out = Vec::new();
        let mut decoder = Decoder::new();
        let mut rest = bytes;
        let mut block = Vec::new();
        let mut first = None;
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
            let payload = &rest[9..9 + len];
            rest = &rest[9 + len..];
            if kind == HEADERS {
                first = Some((kind, flags, stream));
                let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                block.extend_from_slice(&payload[skip..]);
            } else {
                assert_eq!(kind, CONTINUATION);
                block.extend_from_slice(payload);
            }
            if flags & END_HEADERS != 0 {
                let (k, f, s) = first.take().unwrap();
                let fields = decoder.decode(&block).unwrap();
                let fields = fields
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect();
                out.push((k, f, s, fields));
                block.clear();
            }
        }
        out
    }

    async fn relay(input: Vec<u8>) -> (Result<(), RelayError>, Vec<u8>) {
        let mut out = Vec::new();
        let result = relay_client(&input[..], &mut out).await;
        (result, out)
    }

    fn request(encoder: &mut Encoder, authority: &[u8]) -> Vec<u8> {
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", authority),
            (b"workload.spiffe.io", b"true"),
        ];
        encoder.encode(fields)
    }

    #[tokio::test]
    async fn c_core_authority_is_replaced_and_the_rest_passes_through() {
        let mut encoder = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0x10, 0])); // SETTINGS
        // Stream 1: the percent-encoded socket path, indexed into the client's table.
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &{
            let mut p = vec![3];
            p.extend(request(&mut encoder, b"%2Frun%2Ftrellis%2Fworkload.sock"));
            p.extend([0, 0, 0]);
            p
        }));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        // Stream 3: the same fields, now sent as dynamic table references, split over a CONTINUATION.
        let second = request(&mut encoder, b"%2Frun%2Ftrellis%2Fworkload.sock");
        let (a, b) = second.split_at(2);
        input.extend(frame(HEADERS, PRIORITY, 3, &[[0, 0, 0, 1, 15].as_slice(), a].concat()));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        // Stream 5: a valid authority is left alone.
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &request(&mut encoder, b"localhost:1234")));

        let (result, out) = relay(input).await;
        result.unwrap();
        assert_eq!(&out[..24], PREFACE);
        assert_eq!(&out[24..24 + 15], &frame(0x4, 0, 0, &[0, 4, 0, 0, 0x10, 0])[..], "SETTINGS verbatim");
        let rest = &out[24 + 15..];
        // Stream 1's HEADERS, then DATA verbatim, then the others.
        let headers_len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize + 9;
        let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\0");
        assert_eq!(&rest[headers_len..headers_len + data.len()], &data[..], "DATA verbatim");
        let mut frames = rest[..headers_len].to_vec();
        frames.extend_from_slice(&rest[headers_len + data.len()..]);
        let blocks = decode_frames(&frames);
        assert_eq!(blocks.len(), 3);
        let authority = |fields: &[(String, String)]| fields.iter().find(|(n, _)| n == ":authority").unwrap().1.clone();
        assert_eq!(blocks[0].2, 1);
        assert_eq!(blocks[0].1, END_HEADERS, "padding dropped");
        assert_eq!(authority(&blocks[0].3), "localhost");
        assert_eq!(blocks[1].2, 3);
        assert_eq!(blocks[1].1, END_HEADERS | PRIORITY, "priority kept");
        assert_eq!(authority(&blocks[1].3), "localhost");
        assert!(blocks[1].3.contains(&("workload.spiffe.io".into(), "true".into())));
        assert_eq!(blocks[2].1, END_HEADERS | END_STREAM);
        assert_eq!(authority(&blocks[2].3), "localhost:1234");
    }

    #[tokio::test]
    async fn oversized_and_malformed_blocks_end_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0u8; MAX_HEADER_BLOCK]));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &[0u8; 10]));
        let (result, _) = relay(input).await;
        assert!(matches!(result, Err(RelayError::BlockTooLarge)), "{result:?}");

        // A table reference past the end of the (empty) dynamic table.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 70]));
        let (result, _) = relay(input).await;
        assert!(matches!(result, Err(RelayError::Hpack(_))), "{result:?}");

        // One small block that decodes huge: a long value in the table, referenced many times.
        let mut encoder = Encoder::new();
        let big = vec![b'a'; 3000];
        let mut block = encoder.encode([(&b"x-big"[..], &big[..])]);
        block.extend(std::iter::repeat_n(0x80 | 62, 20));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (result, _) = relay(input).await;
        assert!(matches!(result, Err(RelayError::DecodedTooLarge)), "{result:?}");

        // Control: the same block with one reference passes.
        let mut encoder = Encoder::new();
        let mut block = encoder.encode([(&b"x-big"[..], &big[..])]);
        block.push(0x80 | 62);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (result, _) = relay(input).await;
        result.unwrap();
    }

    #[tokio::test]
    async fn not_http2_passes_through_untouched() {
        let garbage = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n and more bytes than a preface".to_vec();
        let (result, out) = relay(garbage.clone()).await;
        result.unwrap();
        assert_eq!(out, garbage);
    }
}
