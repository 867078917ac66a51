//! Bidirectional copy for proxied connections, with buffers lent from a shared pool only while bytes are moving.
//!
//! tokio's `copy_bidirectional` gives each connection two buffers for its whole life: with 256 KiB buffers (what
//! bulk throughput wants, see [`BUFFER_SIZE`]) an idle connection would cost 512 KiB per proxy. Here a direction takes a
//! buffer when it reads and gives it back as soon as a read would block with nothing left to write, so an idle
//! connection holds none and the memory in use follows the connections that are actually busy.
//!
//! The bytes each way are counted as they move ([`ByteCounts`]): by [`copy_counted`] for a relayed connection, by
//! [`CountingIo`] for one whose bytes hyper moves (an HTTP tunnel).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes per buffer. Measured (2 vCPU): 8 and 16 KiB gave ~180 MB/s through two proxies, 64 KiB ~280 MB/s
/// (`trellis-bench tunnel --quick`); against 64 KiB, 256 KiB took a single stream from a median of 480 to 590 MB/s
/// and eight from 450 to 545 (`trellis-bench all --only 1 --bulk-mib 1024`, alternated, 10 rounds each): fewer
/// reads and writes per byte on both sockets and HTTP/2 DATA frames of up to 256 KiB (the frame size limit).
pub const BUFFER_SIZE: usize = 256 * 1024;

/// Free buffers kept for reuse while traffic flows; beyond this a returned buffer is freed (16 MiB at most sits
/// idle), and once traffic goes quiet the pool is emptied ([`release_pooled_buffers`]).
const MAX_FREE: usize = 64;

static POOL: Mutex<Vec<Box<[u8]>>> = Mutex::new(Vec::new());

fn take_buffer() -> Box<[u8]> {
    crate::activity::note();
    let reused = POOL.lock().pop();
    reused.unwrap_or_else(|| vec![0; BUFFER_SIZE].into_boxed_slice())
}

fn give_back(buffer: Box<[u8]>) {
    let mut free = POOL.lock();
    if free.len() < MAX_FREE {
        free.push(buffer);
    }
}

/// Frees every pooled buffer (when traffic has gone quiet: see `heap`); the next burst allocates afresh.
pub fn release_pooled_buffers() {
    // Taken out under the lock, freed after it is released.
    let drained = std::mem::take(&mut *POOL.lock());
    drop(drained);
}

/// One direction of a copy.
#[derive(Default)]
struct Direction {
    buffer: Option<Box<[u8]>>,
    /// Bytes of `buffer` in `pos..end` are read and not yet written.
    pos: usize,
    end: usize,
    read_done: bool,
    needs_flush: bool,
    done: bool,
}

impl Direction {
    /// Moves bytes from `reader` to `writer` until the reader ends (then shuts the writer down) or would block.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.read_done {
                let buffer = self.buffer.get_or_insert_with(take_buffer);
                let mut read = ReadBuf::new(buffer);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Pending => {
                        // Nothing to write and nothing to read: the buffer goes back while the peer is quiet.
                        if let Some(buffer) = self.buffer.take() {
                            give_back(buffer);
                        }
                        if self.needs_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            self.read_done = true;
                            if let Some(buffer) = self.buffer.take() {
                                give_back(buffer);
                            }
                        } else {
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                            (self.pos, self.end) = (0, n);
                        }
                    }
                }
            }
            while self.pos < self.end {
                let buffer = self.buffer.as_ref().expect("a buffer holds unwritten bytes");
                let n = ready!(writer.as_mut().poll_write(cx, &buffer[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.needs_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back(buffer);
        }
    }
}

/// Copies both ways until both directions have ended (a half-close passes through as a shutdown of the other
/// side's write half); `from_a` and `from_b` count the bytes read from each side as they are read.
async fn bidirectional<A, B>(a: &mut A, b: &mut B, from_a: &AtomicU64, from_b: &AtomicU64) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    poll_fn(|cx| {
        if !a_to_b.done {
            let result = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), from_a);
            if let Poll::Ready(result) = result {
                result?;
                a_to_b.done = true;
            }
        }
        if !b_to_a.done {
            let result = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), from_b);
            if let Poll::Ready(result) = result {
                result?;
                b_to_a.done = true;
            }
        }
        if a_to_b.done && b_to_a.done { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
}

/// Bytes a proxied connection carried each way, counted as they are read so that a connection cut short (by a
/// policy change or shutdown) still reports what it carried.
#[derive(Default)]
pub struct ByteCounts {
    from_client: AtomicU64,
    to_client: AtomicU64,
}

impl ByteCounts {
    /// `(from the client, to the client)`.
    pub fn get(&self) -> (u64, u64) {
        (self.from_client.load(Ordering::Relaxed), self.to_client.load(Ordering::Relaxed))
    }
}

/// Copies both ways between `client` and `server` until both directions are closed (half-close passes through),
/// counting into `counts`.
pub async fn copy_counted<C, S>(client: &mut C, server: &mut S, counts: &ByteCounts) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    bidirectional(client, server, &counts.from_client, &counts.to_client).await
}

/// Counts the bytes read from and written to `io` into `counts` (`from_client`: read, `to_client`: written), for a
/// connection whose bytes are not moved by [`copy_counted`] (an HTTP tunnel served by hyper).
pub struct CountingIo<T> {
    io: T,
    counts: Arc<ByteCounts>,
}

impl<T> CountingIo<T> {
    pub fn new(io: T, counts: Arc<ByteCounts>) -> Self {
        Self { io, counts }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counts.from_client.fetch_add(n, Ordering::Relaxed);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &result {
            self.counts.to_client.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_in_order_through_a_half_close() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let (from_client, from_server) = (AtomicU64::new(0), AtomicU64::new(0));
        let copy = async {
            bidirectional(&mut proxy_a, &mut proxy_b, &from_client, &from_server).await.unwrap();
        };
        let peers = async {
            let request: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
            let (mut server_read, mut server_write) = tokio::io::split(&mut server);
            let (mut client_read, mut client_write) = tokio::io::split(&mut client);
            let send = async {
                client_write.write_all(&request).await.unwrap();
                client_write.shutdown().await.unwrap();
            };
            let serve = async {
                let mut got = Vec::new();
                server_read.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, request, "client to server, in order, until the half-close");
                server_write.write_all(b"done").await.unwrap();
                server_write.shutdown().await.unwrap();
            };
            let receive = async {
                let mut answer = Vec::new();
                client_read.read_to_end(&mut answer).await.unwrap();
                assert_eq!(answer, b"done");
            };
            tokio::join!(send, serve, receive);
        };
        tokio::join!(copy, peers);
        assert_eq!((from_client.load(Ordering::Relaxed), from_server.load(Ordering::Relaxed)), (300_000, 4));
    }

    #[tokio::test]
    async fn a_direction_holds_no_buffer_while_its_reader_is_idle() {
        let (mut client, mut proxy_a) = tokio::io::duplex(64);
        let (mut proxy_b, mut server) = tokio::io::duplex(64);
        let counter = AtomicU64::new(0);
        let mut direction = Direction::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll =
            |d: &mut Direction| d.poll_copy(&mut cx, Pin::new(&mut proxy_a), Pin::new(&mut proxy_b), &counter);

        assert!(poll(&mut direction).is_pending());
        assert!(direction.buffer.is_none(), "idle: nothing read, no buffer held");
        client.write_all(b"hello").await.unwrap();
        assert!(poll(&mut direction).is_pending());
        assert!(direction.buffer.is_none(), "everything written: the buffer went back");
        let mut got = [0; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(counter.load(Ordering::Relaxed), 5);
    }
}
