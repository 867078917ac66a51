//! Requests that carry both `Content-Length` and `Transfer-Encoding` (the request-smuggling shape, RFC 9112 §6.1,
//! §11.2), refused with 400 as Envoy does.
//!
//! hyper frames such a request by `Transfer-Encoding`, drops the `Content-Length` before the service sees the
//! request, and closes the connection after the response, so nothing can be smuggled behind it; but the service
//! cannot tell it from a plain chunked request. [`FramingIo`] therefore reads the same bytes hyper reads (client →
//! proxy on an HTTP/1 tunnel) and follows the framing of each request as hyper does (head, then a `Content-Length`
//! or chunked body); it counts request heads and records the number of the first one that has both headers
//! ([`Smuggling`]). The service counts the HTTP/1 requests hyper hands it and refuses the one with that number.
//!
//! The watch stops (nothing more is recorded) after such a request (hyper closes the connection after it), after a
//! request that asks for an upgrade or CONNECT (the bytes may stop being HTTP/1), on HTTP/2 (whose framing has no
//! such ambiguity) and on anything it cannot parse (which hyper refuses too, closing the connection): in every case
//! hyper's own handling above still applies.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A request head longer than this is not followed (hyper refuses it with 431 anyway).
const MAX_HEAD: usize = 80 * 1024;
/// Header lines per head that can be parsed (hyper's own limit is 100).
const MAX_HEADERS: usize = 128;
/// A chunk-size or trailer line longer than this stops the watch.
const MAX_LINE: usize = 8 * 1024;

/// Which request of the connection (counted from 1) had both `Content-Length` and `Transfer-Encoding`, if any.
#[derive(Debug, Default)]
pub struct Smuggling {
    flagged: AtomicU64,
    /// HTTP/1 requests the service has seen.
    served: AtomicU64,
}

impl Smuggling {
    /// Called once per HTTP/1 request the service receives, in order; true for the request to refuse.
    pub fn next_request_is_flagged(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        self.flagged.load(Ordering::Relaxed) == n
    }
}

#[derive(Debug)]
enum State {
    /// Reading a request head (bytes so far).
    Head(Vec<u8>),
    /// Bytes of a `Content-Length` body still to come.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Bytes of chunk data still to come, with its CRLF.
    ChunkData(u64),
    /// Reading the trailer section of a chunked body, one line at a time.
    Trailers(Vec<u8>),
    /// Not watching any more.
    Stopped,
}

/// The framing follower; [`FramingIo`] feeds it what the client sends.
#[derive(Debug)]
pub struct Follower {
    state: State,
    heads: u64,
    shared: Arc<Smuggling>,
}

impl Follower {
    pub fn new(shared: Arc<Smuggling>) -> Self {
        Self { state: State::Head(Vec::new()), heads: 0, shared }
    }

    /// Follows `data`, the next bytes from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Stopped => return,
                State::Head(buf) => {
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let mut request = httparse::Request::new(&mut headers);
                    match request.parse(buf) {
                        Ok(httparse::Status::Partial) => {
                            if buf.len() > MAX_HEAD {
                                self.state = State::Stopped;
                            }
                            return;
                        }
                        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                            self.state = State::Stopped;
                            return;
                        }
                        Ok(httparse::Status::Complete(len)) => {
                            data = &data[len.saturating_sub(before)..];
                            self.heads += 1;
                            let next = after_head(&request, self.heads, &self.shared);
                            self.state = next;
                        }
                        Err(_) => {
                            self.state = State::Stopped;
                            return;
                        }
                    }
                }
                State::Body(left) | State::ChunkData(left) => {
                    let n = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        let in_chunk = matches!(self.state, State::ChunkData(_));
                        self.state = if in_chunk { State::ChunkSize(Vec::new()) } else { State::Head(Vec::new()) };
                    }
                }
                State::ChunkSize(line) | State::Trailers(line) => {
                    let Some(end) = data.iter().position(|&b| b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > MAX_LINE {
                            self.state = State::Stopped;
                        }
                        return;
                    };
                    line.extend_from_slice(&data[..end]);
                    data = &data[end + 1..];
                    let text = line.strip_suffix(b"\r").unwrap_or(line);
                    let (size, empty) = (chunk_size(text), text.is_empty());
                    self.state = match (&self.state, size) {
                        (State::ChunkSize(_), Some(0)) => State::Trailers(Vec::new()),
                        (State::ChunkSize(_), Some(size)) => State::ChunkData(size.saturating_add(2)),
                        (State::ChunkSize(_), None) => State::Stopped,
                        // An empty line ends the trailers, and the message.
                        _ if empty => State::Head(Vec::new()),
                        _ => State::Trailers(Vec::new()),
                    };
                }
            }
        }
    }
}

/// Where the bytes after a complete head belong (`heads`: this head's number).
fn after_head(request: &httparse::Request<'_, '_>, heads: u64, shared: &Smuggling) -> State {
    let has = |name: &str| request.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    let values =
        |name: &'static str| request.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let (te, cl) = (has("transfer-encoding"), has("content-length"));
    if te && cl {
        shared.flagged.store(heads, Ordering::Relaxed);
        return State::Stopped;
    }
    if request.method == Some("CONNECT") || (has("upgrade") && request.version == Some(1)) {
        return State::Stopped;
    }
    if te {
        // hyper accepts a request body only when chunked is the final coding (else 400).
        let last = values("transfer-encoding").next_back().and_then(|v| std::str::from_utf8(v).ok());
        let chunked = last.and_then(|v| v.rsplit(',').next()).is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        return if chunked { State::ChunkSize(Vec::new()) } else { State::Stopped };
    }
    if cl {
        let lengths: Vec<Option<u64>> =
            values("content-length").map(|v| std::str::from_utf8(v).ok()?.trim().parse().ok()).collect();
        return match lengths.first() {
            Some(Some(n)) if lengths.iter().all(|l| *l == Some(*n)) => {
                if *n == 0 {
                    State::Head(Vec::new())
                } else {
                    State::Body(*n)
                }
            }
            _ => State::Stopped,
        };
    }
    State::Head(Vec::new())
}

/// The size of a chunk-size line (`1a;ext=v`), or `None` if it is not one.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let size = text.split(';').next()?.trim();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(size, 16).ok()
}

/// An HTTP tunnel's stream, with what the client sends shown to a [`Follower`].
pub struct FramingIo<T> {
    io: T,
    follower: Follower,
}

impl<T> FramingIo<T> {
    pub fn new(io: T, shared: Arc<Smuggling>) -> Self {
        Self { io, follower: Follower::new(shared) }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if !matches!(self.follower.state, State::Stopped) {
            let this = &mut *self;
            this.follower.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flagged request number after feeding `parts` one after the other.
    fn flagged(parts: &[&[u8]]) -> u64 {
        let shared = Arc::new(Smuggling::default());
        let mut f = Follower::new(shared.clone());
        for p in parts {
            f.feed(p);
        }
        shared.flagged.load(Ordering::Relaxed)
    }

    /// Every split of `all` into two reads gives the same answer as one read.
    fn flagged_any_split(all: &[u8]) -> u64 {
        let whole = flagged(&[all]);
        for i in 0..all.len() {
            assert_eq!(flagged(&[&all[..i], &all[i..]]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(flagged(&bytes), whole, "byte by byte");
        whole
    }

    const GET: &str = "GET /a HTTP/1.1\r\nHost: h\r\n\r\n";
    const SMUGGLE: &str =
        "POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn both_headers_flag_their_request_in_either_order() {
        assert_eq!(flagged_any_split(SMUGGLE.as_bytes()), 1);
        let te_first = "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n";
        assert_eq!(flagged_any_split(te_first.as_bytes()), 1);
        assert_eq!(flagged_any_split(GET.as_bytes()), 0, "control: nothing flagged");
    }

    #[test]
    fn bodies_are_skipped_so_heads_are_counted_like_hyper_counts_requests() {
        // Bodies that look like heads with both headers are bodies, not requests.
        let fake = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let with_length = format!("POST /cl HTTP/1.1\r\nContent-Length: {}\r\n\r\n{fake}", fake.len());
        let chunked = format!(
            "POST /te HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{:x};ext=1\r\n{fake}\r\n0\r\nX-Trailer: 1\r\n\r\n",
            fake.len()
        );
        let all = format!("{GET}{with_length}{chunked}\r\n{GET}{SMUGGLE}{GET}");
        assert_eq!(flagged_any_split(all.as_bytes()), 5, "the fifth request, after two bodies that look like heads");
        assert_eq!(flagged_any_split(format!("{GET}{with_length}{chunked}{GET}").as_bytes()), 0);
    }

    #[test]
    fn upgrades_http2_and_garbage_stop_the_watch() {
        for prefix in [
            "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".to_owned(),
            "CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n".to_owned(),
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned(),
            "G(T / HTTP/1.1\r\n\r\n".to_owned(),
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD)),
        ] {
            assert_eq!(flagged(&[prefix.as_bytes(), SMUGGLE.as_bytes()]), 0, "{prefix:.40}");
        }
    }

    #[test]
    fn the_service_refuses_the_flagged_request_only() {
        let shared = Arc::new(Smuggling::default());
        Follower::new(shared.clone()).feed(format!("{GET}{GET}{SMUGGLE}").as_bytes());
        let seen: Vec<bool> = (0..3).map(|_| shared.next_request_is_flagged()).collect();
        assert_eq!(seen, [false, false, true]);
    }
}
