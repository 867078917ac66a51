//! One HBONE stream as a side of a copy ([`CopyRead`], [`CopyWrite`]), on `h2` directly, on both sides of a tunnel:
//! the client side's stream once its CONNECT was answered 200 (`pool`), the server side's once it answered 200
//! (`h2_server`).
//!
//! Through hyper's upgraded CONNECT stream, every write was copied into a new allocation and passed over a channel
//! to a task of its own that fed the HTTP/2 stream, and every read copied the received frame's bytes into the copy
//! buffer. Here a filled copy buffer becomes the DATA frame's payload as it is (lent as `Bytes`, back in the pool
//! once rustls has encrypted it), and a received frame's payload is written to the socket from where it arrived.
//!
//! [`H2Io`] is the same stream as tokio bytes I/O, for hyper's HTTP server on the tunnel of an `http` port (`l7`),
//! which parses the bytes and copies them anyway.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::{CopyRead, CopyWrite, Held};

/// Both halves of a CONNECT stream whose answer was 200.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// END_STREAM sent (this direction half-closed).
    finished: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, finished: false }
    }

    /// The next received DATA payload (never empty), or `None` at the end of the stream. The window reopens as the
    /// bytes arrive (as hyper's tunnel did once it had copied them): what is in flight stays bounded by the window
    /// plus the one frame the reader holds.
    fn poll_received(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                None => Poll::Ready(Ok(None)),
                // An empty DATA frame (one that only ends the stream): the next poll tells the end.
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    Poll::Ready(Ok(Some(data)))
                }
                // NO_ERROR: the peer has finished and asks this side to stop sending (RFC 9113 §8.1); what it sent
                // is complete, so this direction ends.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(Ok(None)),
                // CANCEL: the peer gave the stream up before ending it (its side failed, or it dropped the stream;
                // h2 then discards the DATA it had not sent yet). Read as an end, a cut-short transfer would look
                // complete to the workload and in the access log; it is a reset.
                Some(Err(e)) if e.reason() == Some(Reason::CANCEL) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, e)))
                }
                Some(Err(e)) if e.reason() == Some(Reason::STREAM_CLOSED) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, e)))
                }
                Some(Err(e)) => Poll::Ready(Err(io_error(e))),
            };
        }
    }

    /// Room for up to `wanted` bytes (at least one) in the peer's window and h2's send buffer. Backpressure: bytes
    /// go to the stream only as there is room for them.
    fn poll_room(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(wanted);
        loop {
            let room = self.send.capacity();
            if room > 0 {
                return Poll::Ready(Ok(room));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.send.send_data(data, false).map_err(io_error)
    }

    /// Ends this direction (END_STREAM), once.
    fn finish(&mut self) -> io::Result<()> {
        if !self.finished {
            self.finished = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Ok(())
    }
}

/// An HTTP/2 error as the copy reports it: the I/O error under it when there is one.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() { e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error")) } else { io::Error::other(e) }
}

impl CopyRead for H2Stream {
    fn poll_fill(mut self: Pin<&mut Self>, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>> {
        Poll::Ready(match ready!(self.poll_received(cx))? {
            None => Ok(0),
            Some(data) => {
                let n = data.len();
                held.hand_over(data);
                Ok(n)
            }
        })
    }
}

impl CopyWrite for H2Stream {
    fn poll_drain(mut self: Pin<&mut Self>, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>> {
        let room = ready!(self.poll_room(cx, held.len()))?;
        let data = held.take_bytes(room);
        let n = data.len();
        self.send(data)?;
        Poll::Ready(Ok(n))
    }

    /// The HTTP/2 connection's task writes what the stream was given.
    fn poll_copy_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_copy_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

/// An HBONE stream as `AsyncRead` + `AsyncWrite`: received frames are copied out as they are read, written bytes
/// copied into frames as the window has room for them.
pub struct H2Io {
    stream: H2Stream,
    /// The rest of the last received frame.
    unread: Bytes,
}

impl H2Io {
    pub fn new(stream: H2Stream) -> Self {
        Self { stream, unread: Bytes::new() }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            match ready!(self.stream.poll_received(cx))? {
                None => return Poll::Ready(Ok(())),
                Some(data) => self.unread = data,
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        if n == self.unread.len() {
            // Not `advance`: an emptied `Bytes` would keep the read buffer the frame arrived in alive while the
            // stream is idle (`copy::Held::consume`).
            self.unread = Bytes::new();
        } else {
            self.unread.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = ready!(self.stream.poll_room(cx, data.len()))?;
        let n = room.min(data.len());
        self.stream.send(Bytes::copy_from_slice(&data[..n]))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.finish())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hyper::{Method, Request, Response, StatusCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::copy::{ByteCounts, Timeouts, copy_counted};

    /// A client-side stream to an in-memory HTTP/2 server whose one stream is handled by `serve` (which gets the
    /// stream's request body and its response sender after a 200).
    async fn stream_to<F, Fut>(serve: F) -> H2Stream
    where
        F: FnOnce(h2::RecvStream, SendStream<Bytes>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server_io).await.unwrap();
            let (request, mut respond) = server.accept().await.unwrap().unwrap();
            let send = respond.send_response(Response::new(()), false).unwrap();
            let serving = tokio::spawn(serve(request.into_body(), send));
            // The connection is driven until the client closes it.
            while let Some(Ok(_)) = server.accept().await {}
            serving.await.unwrap();
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = Request::builder().method(Method::CONNECT).uri("10.1.0.2:8080").body(()).unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        H2Stream::new(send, response.into_body())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_in_order_through_a_half_close() {
        let request: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = request.clone();
        let mut tunnel = stream_to(|mut body, mut send| async move {
            // The destination side: reads the whole request (to its END_STREAM), then answers and ends.
            let mut got = Vec::new();
            while let Some(data) = body.data().await {
                let data = data.unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                got.extend_from_slice(&data);
            }
            assert_eq!(got, expected, "client to server, in order, until the half-close");
            send.send_data(Bytes::from_static(b"done"), true).unwrap();
        })
        .await;
        let (mut app, mut proxy_side) = tokio::io::duplex(64 * 1024);
        let counts = Arc::new(ByteCounts::default());
        let copy = {
            let counts = counts.clone();
            tokio::spawn(async move { copy_counted(&mut proxy_side, &mut tunnel, &counts, Timeouts::NONE).await })
        };
        let (mut app_read, mut app_write) = tokio::io::split(&mut app);
        let send = async {
            app_write.write_all(&request).await.unwrap();
            app_write.shutdown().await.unwrap();
        };
        let receive = async {
            let mut answer = Vec::new();
            app_read.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let ((), answer) = tokio::join!(send, receive);
        assert_eq!(answer, b"done");
        copy.await.unwrap().expect("both directions ended cleanly");
        assert_eq!(counts.get(), (3_000_000, 4));
    }

    #[tokio::test]
    async fn a_stream_the_peer_resets_or_cancels_is_a_failed_read_and_one_it_ends_without_error_is_an_end() {
        for (reason, fails) in [(Reason::INTERNAL_ERROR, true), (Reason::CANCEL, true), (Reason::NO_ERROR, false)] {
            let mut tunnel = stream_to(move |_body, mut send| async move { send.send_reset(reason) }).await;
            let mut held = Held::default();
            let read = std::future::poll_fn(|cx| Pin::new(&mut tunnel).poll_fill(cx, &mut held)).await;
            match read {
                Err(e) => {
                    assert!(fails, "{reason:?}: {e}");
                    let name = if reason == Reason::CANCEL { "stream no longer needed" } else { "internal error" };
                    assert!(e.to_string().contains(name), "the reason is reported: {e}");
                }
                Ok(n) => {
                    assert!(!fails, "{reason:?} must fail the read");
                    assert_eq!(n, 0, "{reason:?}: the end of the stream");
                }
            }
        }
    }
}
