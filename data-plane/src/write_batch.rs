//! An HBONE connection's writes gathered beneath HTTP/2: the frames of every stream that had bytes in the same turn
//! of the runtime leave in one TLS record and one system call.
//!
//! Without it, each DATA frame of a request-sized payload costs a TLS record and a `writev` of its own: h2 holds at
//! most one such frame ready to write (its payload is chained, not copied, above 256 bytes) and flushes it before it
//! takes the next, and tokio-rustls writes to the socket on every write. And the connection's task runs right after
//! the first stream that woke it (on a multi-thread runtime: tokio's LIFO slot), before the other streams made
//! readable by the same poll of the kernel's events had their turn, so it finds one frame each time.
//!
//! [`WriteBatch`] copies writes of up to [`BATCH`] bytes into a buffer of its own and, at the first flush of a poll
//! of the connection's task with bytes in it, defers: it asks for another poll of the task (which goes to the back
//! of the runtime's queue, behind the streams already woken) and reports the flush done. The streams run and hand
//! their frames to h2; the buffered bytes leave at the first flush of that next poll, with the frames taken by then
//! (h2 flushes before each request-sized DATA frame it takes after the first, so a burst of frames leaves in two
//! writes: the first two, then the rest with the poll after). A poll is told from the next by the read h2 starts
//! every poll of its connection with, so this fits h2's connection and nothing else. What goes out waits only for
//! the tasks already queued; a lone frame costs one more poll of the connection's task and no system call. Larger
//! writes (bulk transfers' frames) pass straight through, behind what is buffered, in the same vectored write.
//!
//! Memory: the buffer is at most [`BATCH`] bytes, taken when a write is gathered and given back once the batch is
//! written, so an idle connection holds none.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes gathered before they are written: one TLS record's worth of plaintext (16 KiB, TLS 1.3's limit),
/// so that a batch is one record.
pub const BATCH: usize = 16 * 1024;

/// `io` (an HBONE connection's TLS stream) with small writes gathered until the connection's next poll.
pub struct WriteBatch<T> {
    io: T,
    buffer: Vec<u8>,
    /// A flush was deferred with bytes in `buffer`, and the task asked to be polled again.
    deferred: bool,
    /// A read happened since the deferral: the connection's task is in a later poll, so the next flush writes.
    next_poll: bool,
    /// The peer has sent bytes: the HTTP/2 handshake is behind, every poll of the connection ends with a flush and
    /// deferring is safe. Before, writes go at their flush: a server's handshake flushes its SETTINGS and then only
    /// reads until the client's preface arrives, and a client may wait for those SETTINGS before it writes.
    armed: bool,
}

impl<T> WriteBatch<T> {
    pub fn new(io: T) -> Self {
        Self { io, buffer: Vec::new(), deferred: false, next_poll: false, armed: false }
    }

    /// Whether a buffer is held (for the memory test).
    #[cfg(test)]
    fn holds_buffer(&self) -> bool {
        self.buffer.capacity() > 0
    }
}

impl<T: AsyncWrite + Unpin> WriteBatch<T> {
    /// Writes what is buffered, then `then` behind it in the same write when there is room; returns how many of
    /// `then`'s bytes went (0 when only buffered bytes did, or `then` is empty).
    fn poll_write_out(&mut self, cx: &mut Context<'_>, then: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        while !self.buffer.is_empty() {
            // The buffer and, when they are few (h2 writes a frame's head and its payload), `then`'s slices.
            let mut slices = [IoSlice::new(&[]); 4];
            slices[0] = IoSlice::new(&self.buffer);
            let count = if then.len() < slices.len() {
                slices[1..=then.len()].copy_from_slice(then);
                1 + then.len()
            } else {
                1
            };
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let buffered = self.buffer.len();
            if n >= buffered {
                // Given back once written: an idle connection holds no buffer (a batch costs one allocation).
                self.buffer = Vec::new();
                self.deferred = false;
                return Poll::Ready(Ok(if count > 1 { n - buffered } else { 0 }));
            }
            self.buffer.drain(..n);
        }
        self.deferred = false;
        if then.iter().all(|s| s.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, then)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteBatch<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.deferred {
            self.next_poll = true;
        }
        let before = out.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, out);
        if out.filled().len() > before {
            self.armed = true;
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteBatch<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len: usize = data.iter().map(|s| s.len()).sum();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.buffer.len() + len <= BATCH {
            if this.buffer.capacity() == 0 {
                this.buffer.reserve_exact(BATCH);
            }
            for slice in data {
                this.buffer.extend_from_slice(slice);
            }
            return Poll::Ready(Ok(len));
        }
        // Too much to gather: what is buffered goes first, this right behind it, in one write when it fits.
        loop {
            let n = ready!(this.poll_write_out(cx, data))?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            // Only buffered bytes went: `data` now fits, or goes on its own on the next turn.
            if len <= BATCH {
                for slice in data {
                    this.buffer.extend_from_slice(slice);
                }
                return Poll::Ready(Ok(len));
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.buffer.is_empty() {
            if this.armed && (!this.deferred || !this.next_poll) {
                // Once per poll of the connection's task: the streams already woken add their frames first. (Waking
                // again when already deferred in this poll costs nothing: the task is already notified.)
                this.deferred = true;
                this.next_poll = false;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_write_out(cx, &[]))?;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_write_out(cx, &[]))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! Real `h2` on both ends of an in-memory pipe, the client's side through a [`WriteBatch`] (or not, the control
    //! case) over a pipe end that counts the writes reaching it.
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use hyper::{Method, Request, Response};
    use tokio::io::DuplexStream;
    use tokio::sync::{Barrier, mpsc};

    use super::*;

    /// A pipe end that counts the writes that took bytes.
    struct Counted {
        io: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, out)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
            self.writes.fetch_add(usize::from(n > 0), Ordering::Relaxed);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            // A pipe takes one slice per call; a vectored write is one write (as `writev` is), so it is copied whole.
            let joined: Vec<u8> = data.iter().flat_map(|s| s.iter().copied()).collect();
            self.poll_write(cx, &joined)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    /// An HTTP/2 client (through a [`WriteBatch`] when `batched`) and a server that sends each stream's bytes back
    /// as they arrive; returns the client's request sender and its count of writes.
    async fn pair(batched: bool) -> (h2::client::SendRequest<Bytes>, Arc<AtomicUsize>) {
        let (client_io, server_io) = tokio::io::duplex(4 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let counted = Counted { io: client_io, writes: writes.clone() };
        let client_io: Box<dyn Io> = if batched { Box::new(WriteBatch::new(counted)) } else { Box::new(counted) };
        tokio::spawn(async move {
            let mut server = h2::server::handshake(WriteBatch::new(server_io)).await.unwrap();
            while let Some(Ok((request, mut respond))) = server.accept().await {
                tokio::spawn(async move {
                    let mut body = request.into_body();
                    let mut send = respond.send_response(Response::new(()), false).unwrap();
                    while let Some(data) = body.data().await {
                        let data = data.unwrap();
                        let _ = body.flow_control().release_capacity(data.len());
                        send.send_data(data, false).unwrap();
                    }
                    send.send_data(Bytes::new(), true).unwrap();
                });
            }
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        (sender.ready().await.unwrap(), writes)
    }

    fn post() -> Request<()> {
        Request::builder().method(Method::POST).uri("http://10.1.0.2:8080/").body(()).unwrap()
    }

    /// Reads a stream's answer until `len` bytes came back.
    async fn read_back(body: &mut h2::RecvStream, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < len {
            let data = body.data().await.expect("the answer goes on").unwrap();
            let _ = body.flow_control().release_capacity(data.len());
            got.extend_from_slice(&data);
        }
        got
    }

    /// A current-thread runtime, as the proxy with one worker (the default on a 2-CPU host, `main.rs`).
    #[tokio::test]
    async fn frames_of_streams_woken_together_leave_in_two_writes_and_without_the_batch_one_each() {
        frames_of_streams_woken_together().await
    }

    /// A multi-thread runtime of one worker: the connection's task runs right after the stream that woke it (tokio's
    /// LIFO slot).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn on_one_multi_thread_worker_frames_of_streams_woken_together_leave_in_two_writes_too() {
        frames_of_streams_woken_together().await
    }

    async fn frames_of_streams_woken_together() {
        const STREAMS: usize = 8;
        let payload = Bytes::from(vec![7u8; 1024]);
        for batched in [false, true] {
            let (sender, writes) = pair(batched).await;
            let mut streams = Vec::new();
            for _ in 0..STREAMS {
                let (response, send) = sender.clone().ready().await.unwrap().send_request(post(), false).unwrap();
                streams.push((response.await.unwrap().into_body(), send));
            }
            // Every stream's task waits at the barrier; the test's arrival wakes them in one go, as one poll of the
            // kernel's events wakes the relays of the connections it found readable.
            let barrier = Arc::new(Barrier::new(STREAMS + 1));
            let (done, mut finished) = mpsc::unbounded_channel();
            for (mut body, mut send) in streams {
                let (barrier, done, payload) = (barrier.clone(), done.clone(), payload.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    send.send_data(payload.clone(), false).unwrap();
                    assert_eq!(read_back(&mut body, payload.len()).await, payload, "the bytes came back whole");
                    // Kept open until the count is taken (dropping them would write a reset each).
                    done.send((body, send)).unwrap();
                });
            }
            let before = writes.load(Ordering::Relaxed);
            barrier.wait().await;
            let mut open = Vec::new();
            for _ in 0..STREAMS {
                open.push(finished.recv().await.unwrap());
            }
            let made = writes.load(Ordering::Relaxed) - before;
            if batched {
                // The first stream's frame waits for one poll of the connection's task, in which the others are
                // taken: it leaves with the next one, and the rest with the next poll.
                assert!(made <= 2, "{STREAMS} DATA frames in {made} writes, not at most 2");
            } else {
                assert_eq!(made, STREAMS, "control: without the batch, one write per DATA frame");
            }
            drop(open);
        }
    }

    /// The deferral on its own: before the peer has spoken a flush writes at once; after, a flush in the poll that
    /// gathered the bytes writes nothing (and asks for another poll), the first flush after the next poll's read
    /// writes them, and the buffer goes back once they are out.
    #[tokio::test]
    async fn once_the_peer_spoke_gathered_bytes_wait_for_the_next_poll_and_the_buffer_goes_back_once_written() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let mut batch = WriteBatch::new(ours);
        let mut got = [0u8; 64];
        let pending_read = |theirs: &mut DuplexStream, got: &mut [u8]| {
            let mut out = ReadBuf::new(got);
            let poll = Pin::new(theirs).poll_read(&mut Context::from_waker(std::task::Waker::noop()), &mut out);
            (poll.is_pending(), out.filled().len())
        };
        // Before the peer has sent anything (a server's handshake: SETTINGS, then it waits for the preface), a
        // flush writes at once.
        std::future::poll_fn(|cx| {
            let mut batch = Pin::new(&mut batch);
            assert!(matches!(batch.as_mut().poll_write(cx, b"settings"), Poll::Ready(Ok(8))));
            assert!(matches!(batch.as_mut().poll_flush(cx), Poll::Ready(Ok(()))));
            Poll::Ready(())
        })
        .await;
        let (pending, n) = pending_read(&mut theirs, &mut got);
        assert!(!pending && &got[..n] == b"settings", "written at its flush before the peer spoke");
        tokio::io::AsyncWriteExt::write_all(&mut theirs, b"preface").await.unwrap();
        let mut preface = [0u8; 7];
        tokio::io::AsyncReadExt::read_exact(&mut batch, &mut preface).await.unwrap();
        std::future::poll_fn(|cx| {
            let mut batch = Pin::new(&mut batch);
            assert!(matches!(batch.as_mut().poll_write(cx, b"frame one"), Poll::Ready(Ok(9))));
            assert!(batch.as_mut().poll_flush(cx).is_ready(), "the flush is reported done");
            assert!(matches!(batch.as_mut().poll_write(cx, b", two"), Poll::Ready(Ok(5))));
            assert!(batch.as_mut().poll_flush(cx).is_ready());
            Poll::Ready(())
        })
        .await;
        assert_eq!(pending_read(&mut theirs, &mut got), (true, 0), "nothing written in the poll that gathered them");
        assert!(batch.holds_buffer());
        // The next poll of the connection's task: h2 reads first, then flushes.
        std::future::poll_fn(|cx| {
            let mut batch = Pin::new(&mut batch);
            let mut nothing = [0u8; 16];
            assert!(batch.as_mut().poll_read(cx, &mut ReadBuf::new(&mut nothing)).is_pending());
            assert!(matches!(batch.as_mut().poll_flush(cx), Poll::Ready(Ok(()))));
            Poll::Ready(())
        })
        .await;
        let (pending, n) = pending_read(&mut theirs, &mut got);
        assert!(!pending);
        assert_eq!(&got[..n], b"frame one, two", "both writes in one, in order");
        assert!(!batch.holds_buffer(), "the buffer went back once the bytes were out");
    }

    /// A client may wait for the server's first bytes before it writes (the tests' raw HBONE client does): the
    /// server's handshake flushes its SETTINGS, then only reads until the preface comes, so they must not wait.
    #[tokio::test]
    async fn a_server_sends_its_settings_before_the_client_has_written_anything() {
        let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { h2::server::handshake(WriteBatch::new(server_io)).await.map(|_| ()) });
        let mut head = [0u8; 9];
        let read = tokio::io::AsyncReadExt::read_exact(&mut client_io, &mut head);
        crate::testing::within("the server's SETTINGS", read).await.unwrap();
        assert_eq!(head[3], 0x4, "the server's first frame is SETTINGS");
        server.abort();
    }

    /// Sizes around the batch's edges and far past it, on concurrent streams, both ways (the server's side batched
    /// too): every byte arrives, in order.
    #[tokio::test]
    async fn bytes_of_every_size_cross_whole_and_in_order_both_ways() {
        let (sender, _) = pair(true).await;
        let sizes = [1, 9, 255, 256, 1024, BATCH - 9, BATCH, BATCH + 1, 100_000, 3 << 20];
        let mut tasks = Vec::new();
        for (i, size) in sizes.into_iter().enumerate() {
            let sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let payload: Vec<u8> = (0..size).map(|j| (j * 31 + i) as u8).collect();
                let (response, mut send) = sender.ready().await.unwrap().send_request(post(), false).unwrap();
                let mut body = response.await.unwrap().into_body();
                // Written in pieces of uneven size, each small enough for the window.
                let mut rest = Bytes::from(payload.clone());
                let mut got = Vec::new();
                while !rest.is_empty() {
                    let piece = rest.split_to(rest.len().min(7 + i * 4099));
                    let len = piece.len();
                    send.send_data(piece, false).unwrap();
                    got.extend(read_back(&mut body, len).await);
                }
                send.send_data(Bytes::new(), true).unwrap();
                while let Some(data) = body.data().await {
                    assert!(data.unwrap().is_empty(), "nothing but the end follows the bytes");
                }
                assert_eq!(got.len(), size);
                assert!(got == payload, "stream of {size} bytes: the same bytes, in order");
            }));
        }
        for task in tasks {
            crate::testing::within("the streams' echo", task).await.unwrap();
        }
    }
}
