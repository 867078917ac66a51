//! A socket read in large gulps beneath TLS.
//!
//! rustls reads at most 4 KiB per `read_tls` (its deframer grows by that much a call), and tokio-rustls turns each
//! of those into a `recvfrom` on the socket: four or five system calls for every 16 KiB record an HBONE connection
//! receives. [`ReadAhead`] reads as much as the socket holds (up to one pooled copy buffer, `copy::BUFFER_SIZE`) in
//! one call and serves rustls's small reads from memory, at the price of one copy of the ciphertext.
//!
//! Memory: the buffer is the copy pool's (`copy::take_buffer`), held only while it holds unread bytes or the socket
//! has more; it goes back to the pool when a read finds the socket empty. An idle connection holds none; a busy one
//! one buffer.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::{PooledBuffer, give_back_buffer, take_buffer};

/// `io` with its reads served from a buffer filled in one system call each; writes pass through.
pub struct ReadAhead<T> {
    io: T,
    buffer: Option<PooledBuffer>,
    /// Unread bytes of `buffer`: `pos..end`.
    pos: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> Self {
        Self { io, buffer: None, pos: 0, end: 0 }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Bytes read from the socket and not yet handed on.
    pub fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// Whether a buffer is held (for the memory tests).
    pub fn holds_buffer(&self) -> bool {
        self.buffer.is_some()
    }

    fn release(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back_buffer(buffer);
        }
        (self.pos, self.end) = (0, 0);
    }
}

impl<T> Drop for ReadAhead<T> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.end {
            let buffer = this.buffer.get_or_insert_with(take_buffer);
            let mut read = ReadBuf::new(&mut buffer[..]);
            match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                Poll::Pending => {
                    // Nothing waiting: the buffer goes back while the peer is quiet.
                    this.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.release();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        this.release();
                        return Poll::Ready(Ok(()));
                    }
                    (this.pos, this.end) = (0, n);
                }
            }
        }
        let Some(buffer) = &this.buffer else { unreachable!("unread bytes are in a buffer") };
        let n = out.remaining().min(this.end - this.pos);
        out.put_slice(&buffer[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A reader that counts its reads and gives out at most what it was given, in the chunks it was given.
    struct Counted {
        chunks: std::collections::VecDeque<Vec<u8>>,
        reads: usize,
    }

    impl AsyncRead for Counted {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            self.reads += 1;
            if let Some(mut chunk) = self.chunks.pop_front() {
                let n = chunk.len().min(out.remaining());
                out.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.chunks.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_in_order() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut ahead = ReadAhead::new(Counted { chunks: [data.clone()].into(), reads: 0 });
        let mut got = Vec::new();
        let mut small = [0; 4096];
        loop {
            let n = ahead.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data, "byte-exact, in order");
        // The control: the same 4 KiB reads straight from the socket take one read each.
        assert_eq!(ahead.get_ref().reads, 2, "one read for 200,000 bytes, one for the end (not 49 + 1)");
        assert!(!ahead.holds_buffer(), "at the end the buffer went back");
    }

    #[tokio::test]
    async fn a_buffer_is_held_only_while_bytes_wait_in_it() {
        let (mut peer, socket) = tokio::io::duplex(64 * 1024);
        let mut ahead = ReadAhead::new(socket);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut small = [0; 10];
        let mut read = ReadBuf::new(&mut small);
        assert!(Pin::new(&mut ahead).poll_read(&mut cx, &mut read).is_pending());
        assert!(!ahead.holds_buffer(), "idle: no buffer");
        peer.write_all(&[7; 25]).await.unwrap();
        assert!(Pin::new(&mut ahead).poll_read(&mut cx, &mut read).is_ready());
        assert_eq!((read.filled(), ahead.buffered()), (&[7; 10][..], 15));
        assert!(ahead.holds_buffer(), "15 bytes wait");
        let mut rest = [0; 100];
        let mut read = ReadBuf::new(&mut rest);
        assert!(Pin::new(&mut ahead).poll_read(&mut cx, &mut read).is_ready());
        assert_eq!(read.filled().len(), 15);
        assert!(Pin::new(&mut ahead).poll_read(&mut cx, &mut read).is_pending());
        assert!(!ahead.holds_buffer(), "drained and the socket empty: the buffer went back");
    }
}
