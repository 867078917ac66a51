//! Bidirectional copy for proxied connections, with buffers lent from a shared pool only while bytes are moving.
//!
//! tokio's `copy_bidirectional` gives each connection two buffers for its whole life: with 256 KiB buffers (what
//! bulk throughput wants, see [`BUFFER_SIZE`]) an idle connection would cost 512 KiB per proxy. Here a direction takes a
//! buffer when it reads and gives it back as soon as a read would block with nothing left to write, so an idle
//! connection holds none and the memory in use follows the connections that are actually busy.
//!
//! A side of a copy is anything that reads or writes bytes ([`CopyRead`], [`CopyWrite`]: every tokio `AsyncRead` and
//! `AsyncWrite` through a copy into or out of the pooled buffer), or an HTTP/2 stream that hands its received bytes
//! over as they are and takes a filled pooled buffer as it is (`h2_stream`): bytes from an HBONE tunnel go to the
//! socket straight from the frame they arrived in, and bytes read from a socket go into a DATA frame without a copy.
//!
//! The bytes each way are counted as they move ([`ByteCounts`]): by [`copy_counted`] for a relayed connection, by
//! [`CountingIo`] for one whose bytes hyper moves (an HTTP tunnel).
//!
//! A copy also ends on its own [`Timeouts`]: when no byte moved either way for the idle timeout, or when one
//! direction held bytes its writer would not take for the write-stall timeout (a destination that accepts and never
//! reads). Both share one timer per connection, armed lazily: moving bytes only notes the time, and the timer, when
//! it fires early, is pushed to the next deadline, so a busy connection does not touch the timer wheel per read.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes per buffer of a direction that moves bulk. Measured (2 vCPU): 8 and 16 KiB gave ~180 MB/s through two
/// proxies, 64 KiB ~280 MB/s (`trellis-bench tunnel --quick`); against 64 KiB, 256 KiB took a single stream from a
/// median of 480 to 590 MB/s and eight from 450 to 545 (`trellis-bench all --only 1 --bulk-mib 1024`, alternated, 10
/// rounds each): fewer reads and writes per byte on both sockets and HTTP/2 DATA frames of up to 256 KiB (the frame
/// size limit).
pub const BUFFER_SIZE: usize = 256 * 1024;

/// Bytes of the first buffer a direction reads into. Most reads of a request-and-answer exchange (an HTTP request,
/// its headers, a small answer) fit in it, and a buffer taken from the allocator is written whole (zeroed), so a
/// burst of new connections costs 16 KiB per direction in flight, not 256. A read that fills it marks the direction
/// as moving bulk: from then on it reads into [`BUFFER_SIZE`] buffers (one extra read per direction, once).
pub const FIRST_BUFFER_SIZE: usize = 16 * 1024;

/// Free buffers of each size kept for reuse while traffic flows; beyond this a returned buffer is freed (17 MiB at
/// most sits idle), and once traffic goes quiet the pool is emptied ([`release_pooled_buffers`]).
const MAX_FREE: usize = 64;

/// Free buffers, by size.
struct Free {
    first: Vec<PooledBuffer>,
    bulk: Vec<PooledBuffer>,
}

impl Free {
    fn of(&mut self, size: usize) -> &mut Vec<PooledBuffer> {
        if size == BUFFER_SIZE { &mut self.bulk } else { &mut self.first }
    }
}

static POOL: Mutex<Free> = Mutex::new(Free { first: Vec::new(), bulk: Vec::new() });

/// One buffer of the pool ([`BUFFER_SIZE`] or [`FIRST_BUFFER_SIZE`] bytes).
pub(crate) type PooledBuffer = Box<[u8]>;

/// A [`BUFFER_SIZE`] buffer from the pool (allocated when the pool has none); give it back with
/// [`give_back_buffer`].
pub(crate) fn take_buffer() -> PooledBuffer {
    take_sized(BUFFER_SIZE)
}

fn take_sized(size: usize) -> PooledBuffer {
    crate::activity::note();
    let reused = POOL.lock().of(size).pop();
    reused.unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Returns a buffer the pool lent, to the free list of its size (freed when that list is full).
pub(crate) fn give_back_buffer(buffer: PooledBuffer) {
    let mut pool = POOL.lock();
    let free = pool.of(buffer.len());
    if free.len() < MAX_FREE {
        free.push(buffer);
    }
}

/// A pooled buffer lent out as [`Bytes`] (to an HTTP/2 stream, which may hold it until the frame is encrypted): it
/// goes back to the pool when the last of those bytes is dropped.
struct Lent(Option<Box<[u8]>>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            give_back_buffer(buffer);
        }
    }
}

/// Bytes one direction has read and not yet written: in a pooled buffer (`pos..end`), or handed over by the reader
/// as they are (`shared`). At most one of the two holds bytes.
#[derive(Default)]
pub struct Held {
    buffer: Option<Box<[u8]>>,
    pos: usize,
    end: usize,
    shared: Bytes,
    /// A read filled a whole [`FIRST_BUFFER_SIZE`] buffer: reads go into [`BUFFER_SIZE`] ones from then on.
    bulk: bool,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.pos == self.end && self.shared.is_empty()
    }

    pub fn len(&self) -> usize {
        self.end - self.pos + self.shared.len()
    }

    /// The bytes held.
    pub fn bytes(&self) -> &[u8] {
        match &self.buffer {
            Some(buffer) if self.pos < self.end => &buffer[self.pos..self.end],
            _ => &self.shared,
        }
    }

    /// Marks the first `n` held bytes as written.
    pub fn consume(&mut self, n: usize) {
        if self.pos < self.end {
            self.pos += n;
        } else if n == self.shared.len() {
            // Not `advance`: an emptied `Bytes` still owns its share of what the bytes came in (an HTTP/2 frame's
            // payload is a slice of the connection's read buffer), so an idle tunnel would keep the read buffer its
            // last frame arrived in alive, with every other frame of it, for as long as it stays idle.
            self.shared = Bytes::new();
        } else {
            self.shared.advance(n);
        }
    }

    /// Up to `max` of the held bytes as [`Bytes`], taken out of the holding: a pooled buffer is lent, not copied.
    pub fn take_bytes(&mut self, max: usize) -> Bytes {
        if self.pos < self.end
            && let Some(buffer) = self.buffer.take()
        {
            self.shared = Bytes::from_owner(Lent(Some(buffer))).slice(self.pos..self.end);
            (self.pos, self.end) = (0, 0);
        }
        self.shared.split_to(max.min(self.shared.len()))
    }

    /// Holds `bytes` a reader handed over (when it holds nothing).
    pub fn hand_over(&mut self, bytes: Bytes) {
        debug_assert!(self.is_empty());
        self.shared = bytes;
    }

    /// A pooled buffer to read into (taken from the pool unless one of the size wanted is held; called only while
    /// nothing is held); `filled` says how much was read.
    fn read_space(&mut self) -> &mut [u8] {
        let size = if self.bulk { BUFFER_SIZE } else { FIRST_BUFFER_SIZE };
        if let Some(small) = self.buffer.take_if(|b| b.len() < size) {
            give_back_buffer(small);
        }
        self.buffer.get_or_insert_with(|| take_sized(size))
    }

    fn filled(&mut self, n: usize) {
        (self.pos, self.end) = (0, n);
        if self.buffer.as_ref().is_some_and(|b| n == b.len()) {
            self.bulk = true;
        }
    }

    /// The size of the buffer held, if one is (tests).
    #[cfg(test)]
    pub(crate) fn buffer_size(&self) -> Option<usize> {
        self.buffer.as_ref().map(|b| b.len())
    }

    /// Gives the pooled buffer back while nothing waits in it.
    fn release(&mut self) {
        if self.pos == self.end
            && let Some(buffer) = self.buffer.take()
        {
            give_back_buffer(buffer);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back_buffer(buffer);
        }
    }
}

/// The reading side of a copy.
pub trait CopyRead {
    /// Reads into `held`, which holds nothing on entry; `Ok(0)` is the end of the stream.
    fn poll_fill(self: Pin<&mut Self>, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>>;
}

/// The writing side of a copy.
pub trait CopyWrite {
    /// Writes some of `held`'s bytes (which holds some on entry) and takes them out of it; returns how many.
    fn poll_drain(self: Pin<&mut Self>, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>>;
    fn poll_copy_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// The end of this direction (a half-close).
    fn poll_copy_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T: AsyncRead + ?Sized> CopyRead for T {
    fn poll_fill(self: Pin<&mut Self>, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::new(held.read_space());
        ready!(self.poll_read(cx, &mut read))?;
        let n = read.filled().len();
        held.filled(n);
        Poll::Ready(Ok(n))
    }
}

impl<T: AsyncWrite + ?Sized> CopyWrite for T {
    fn poll_drain(self: Pin<&mut Self>, cx: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>> {
        let n = ready!(self.poll_write(cx, held.bytes()))?;
        held.consume(n);
        Poll::Ready(Ok(n))
    }

    fn poll_copy_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }

    fn poll_copy_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_shutdown(cx)
    }
}

/// Frees every pooled buffer (when traffic has gone quiet: see `heap`); the next burst allocates afresh.
pub fn release_pooled_buffers() {
    // Taken out under the lock, freed after it is released.
    let drained = {
        let mut pool = POOL.lock();
        (std::mem::take(&mut pool.first), std::mem::take(&mut pool.bulk))
    };
    drop(drained);
}

/// Why one direction of a copy stopped early: its reader failed (that stream is gone both ways) or its writer did
/// (the peer stopped taking bytes, but may still have sent some the other way).
#[derive(Debug)]
enum Failure {
    Read(io::Error),
    Write(io::Error),
}

/// When a copy gives up on a connection that carries nothing (`None`: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// No byte read or written either way for this long.
    pub idle: Option<Duration>,
    /// One direction holding bytes its writer takes none of for this long.
    pub write_stall: Option<Duration>,
}

impl Timeouts {
    /// Neither: a copy that only its peers or the proxy end.
    pub const NONE: Timeouts = Timeouts { idle: None, write_stall: None };
}

impl From<crate::config::Connection> for Timeouts {
    fn from(c: crate::config::Connection) -> Self {
        Timeouts { idle: c.idle_timeout, write_stall: c.write_stall_timeout }
    }
}

/// Why a copy gave up, carried inside the `io::Error` (kind `TimedOut`) it returns; [`Timeout::of`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Timeout {
    #[error("idle timeout: no byte either way for {}", humantime::format_duration(*.0))]
    Idle(Duration),
    #[error("write stalled: the peer took no byte for {}", humantime::format_duration(*.0))]
    WriteStall(Duration),
}

impl Timeout {
    /// The timeout that ended a copy, if `error` is one.
    pub fn of(error: &io::Error) -> Option<Timeout> {
        error.get_ref()?.downcast_ref::<Timeout>().copied()
    }

    /// The `reason` label of `trellis_connections_timed_out_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Timeout::Idle(_) => "idle",
            Timeout::WriteStall(_) => "write_stall",
        }
    }
}

impl From<Timeout> for io::Error {
    fn from(timeout: Timeout) -> Self {
        io::Error::new(io::ErrorKind::TimedOut, timeout)
    }
}

/// One direction of a copy.
#[derive(Default)]
struct Direction {
    /// Bytes read and not yet written.
    held: Held,
    read_done: bool,
    needs_flush: bool,
    done: bool,
    /// Set by `poll_copy` whenever a byte was read or written (the caller notes the time and clears it).
    moved: bool,
    /// While bytes wait in `held`: since when the writer took none (set when they were read or last written).
    waiting_since: Option<tokio::time::Instant>,
}

impl Direction {
    /// Moves bytes from `reader` to `writer` until the reader ends (then shuts the writer down) or would block.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        counter: &AtomicU64,
    ) -> Poll<Result<(), Failure>>
    where
        R: CopyRead + ?Sized,
        W: CopyWrite + ?Sized,
    {
        loop {
            if self.held.is_empty() && !self.read_done {
                match reader.as_mut().poll_fill(cx, &mut self.held) {
                    Poll::Pending => {
                        // Nothing to write and nothing to read: the buffer goes back while the peer is quiet.
                        self.held.release();
                        if self.needs_flush {
                            ready!(writer.as_mut().poll_copy_flush(cx)).map_err(Failure::Write)?;
                            self.needs_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                    Poll::Ready(Ok(0)) => {
                        self.read_done = true;
                        self.held.release();
                    }
                    Poll::Ready(Ok(n)) => {
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        self.moved = true;
                        self.waiting_since = None;
                    }
                }
            }
            while !self.held.is_empty() {
                let n = ready!(writer.as_mut().poll_drain(cx, &mut self.held)).map_err(Failure::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(Failure::Write(io::ErrorKind::WriteZero.into())));
                }
                self.needs_flush = true;
                self.moved = true;
                self.waiting_since = None;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_copy_shutdown(cx)).map_err(Failure::Write)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// After one direction's writer failed, how long the other direction may go on delivering what its peer sent before
/// it stopped taking bytes (an HTTP 431 or 400 answered to a request still being sent) before the connection is
/// given up. Such an answer is already on its way, so it normally arrives at once; the bound only keeps a peer that
/// neither answers nor closes from holding the connection.
pub const DRAIN_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// The sides of a copy: `copy_counted`'s client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// How the two directions of a copy stand after one poll.
struct Progress {
    first_error: Option<io::Error>,
    /// Set when the other direction can no longer deliver anything: a reader failed, so the stream the other
    /// direction writes to is gone too.
    stop: bool,
    /// The side whose read failed first (it reset, or broke), if one did.
    broken: Option<Side>,
}

impl Progress {
    /// Notes what the direction that reads from `from` did.
    fn note(&mut self, direction: &mut Direction, from: Side, result: Poll<Result<(), Failure>>) {
        let Poll::Ready(result) = result else { return };
        direction.done = true;
        let error = match result {
            Ok(()) => return,
            Err(Failure::Read(e)) => {
                self.stop = true;
                self.broken.get_or_insert(from);
                e
            }
            Err(Failure::Write(e)) => e,
        };
        self.first_error.get_or_insert(error);
    }
}

/// The idle and write-stall deadlines of one copy, checked against one lazily armed timer.
struct Watch {
    timeouts: Timeouts,
    /// When a byte last moved either way.
    last_moved: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Watch {
    fn new(timeouts: Timeouts) -> Self {
        Self { timeouts, last_moved: tokio::time::Instant::now(), timer: None }
    }

    /// Notes what the directions did in this poll; then `Ready` with the timeout that has expired, if one has, or
    /// `Pending` with the timer armed at (or before) the next deadline.
    fn poll(&mut self, cx: &mut Context<'_>, directions: [&mut Direction; 2]) -> Poll<Timeout> {
        if self.timeouts == Timeouts::NONE {
            return Poll::Pending;
        }
        let mut now = None;
        let mut now = || *now.get_or_insert_with(tokio::time::Instant::now);
        for direction in directions.iter() {
            if direction.moved {
                self.last_moved = now();
            }
        }
        let mut stalled_since: Option<tokio::time::Instant> = None;
        for direction in directions {
            direction.moved = false;
            if !direction.held.is_empty() {
                let since = *direction.waiting_since.get_or_insert_with(&mut now);
                stalled_since = Some(stalled_since.map_or(since, |s| s.min(since)));
            } else {
                direction.waiting_since = None;
            }
        }
        loop {
            let idle_at = self.timeouts.idle.map(|d| (self.last_moved + d, Timeout::Idle(d)));
            let stall_at = self.timeouts.write_stall.zip(stalled_since).map(|(d, s)| (s + d, Timeout::WriteStall(d)));
            let Some((deadline, timeout)) = [idle_at, stall_at].into_iter().flatten().min_by_key(|(at, _)| *at) else {
                return Poll::Pending;
            };
            match &mut self.timer {
                // Armed at or before the deadline: it fires early when bytes moved since, and is pushed on then.
                Some(timer) if timer.deadline() <= deadline => {
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if deadline <= tokio::time::Instant::now() {
                        return Poll::Ready(timeout);
                    }
                    timer.as_mut().reset(deadline);
                }
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
    }
}

/// Copies both ways until both directions have ended (a half-close passes through as a shutdown of the other
/// side's write half); `from_a` and `from_b` count the bytes read from each side as they are read.
///
/// A direction that ends does not end the other: after an EOF the other goes on as long as it flows (half-close);
/// after a failed write (the peer stopped taking bytes) the other goes on delivering what that peer had already
/// sent, for at most [`DRAIN_AFTER_FAILURE`], so that an answer in flight (an HTTP 431 to a request head still
/// being sent) reaches the client. After a failed read the stream is gone both ways and the copy ends at once. The
/// first error is returned. A [`Timeout`] that expires ends the copy with an error of kind `TimedOut` carrying it.
#[cfg(test)]
async fn bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    from_a: &AtomicU64,
    from_b: &AtomicU64,
    timeouts: Timeouts,
) -> io::Result<()>
where
    A: CopyRead + CopyWrite + Unpin + ?Sized,
    B: CopyRead + CopyWrite + Unpin + ?Sized,
{
    copy_both_ways(a, b, [from_a, from_b], timeouts).await.map_err(|(error, _)| error)
}

/// `bidirectional` (`a` is the client side), its error with the side whose read failed, if one did.
async fn copy_both_ways<A, B>(
    a: &mut A,
    b: &mut B,
    [from_a, from_b]: [&AtomicU64; 2],
    timeouts: Timeouts,
) -> Result<(), (io::Error, Option<Side>)>
where
    A: CopyRead + CopyWrite + Unpin + ?Sized,
    B: CopyRead + CopyWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    let mut progress = Progress { first_error: None, stop: false, broken: None };
    // Armed by the first failure only: a connection that flows never creates a timer.
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut watch = Watch::new(timeouts);
    poll_fn(|cx| {
        if !a_to_b.done {
            let result = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), from_a);
            progress.note(&mut a_to_b, Side::Client, result);
        }
        if !b_to_a.done && !progress.stop {
            let result = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), from_b);
            progress.note(&mut b_to_a, Side::Server, result);
        }
        let ended = (a_to_b.done && b_to_a.done) || progress.stop;
        if !ended && let Poll::Ready(timeout) = watch.poll(cx, [&mut a_to_b, &mut b_to_a]) {
            return Poll::Ready(Err((timeout.into(), None)));
        }
        if !ended && progress.first_error.is_some() {
            let deadline = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(DRAIN_AFTER_FAILURE)));
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        } else if !ended {
            return Poll::Pending;
        }
        Poll::Ready(progress.first_error.take().map_or(Ok(()), |error| Err((error, progress.broken))))
    })
    .await
}

/// Bytes a proxied connection carried each way, counted as they are read so that a connection cut short (by a
/// policy change or shutdown) still reports what it carried.
///
/// Also what broke a copy that failed: the side whose read failed first ([`ByteCounts::broken`]), so that the
/// proxy can pass the failure on as a reset rather than a clean close.
#[derive(Default)]
pub struct ByteCounts {
    from_client: AtomicU64,
    to_client: AtomicU64,
    /// 0: none; 1: the client side; 2: the server side.
    broken: AtomicU8,
}

impl ByteCounts {
    /// `(from the client, to the client)`.
    pub fn get(&self) -> (u64, u64) {
        (self.from_client.load(Ordering::Relaxed), self.to_client.load(Ordering::Relaxed))
    }

    /// The side whose read failed (a reset, a stream reset, a connection that broke) and ended the copy, if one
    /// did; `None` after a clean end, a timeout, or when only a write failed.
    pub fn broken(&self) -> Option<Side> {
        match self.broken.load(Ordering::Relaxed) {
            1 => Some(Side::Client),
            2 => Some(Side::Server),
            _ => None,
        }
    }
}

/// Copies both ways between `client` and `server` until both directions are closed (half-close passes through) or
/// one of `timeouts` expires, counting into `counts`.
pub async fn copy_counted<C, S>(
    client: &mut C,
    server: &mut S,
    counts: &ByteCounts,
    timeouts: Timeouts,
) -> io::Result<()>
where
    C: CopyRead + CopyWrite + Unpin,
    S: CopyRead + CopyWrite + Unpin,
{
    let result = copy_both_ways(client, server, [&counts.from_client, &counts.to_client], timeouts).await;
    result.map_err(|(error, broken)| {
        let code = match broken {
            None => 0,
            Some(Side::Client) => 1,
            Some(Side::Server) => 2,
        };
        counts.broken.store(code, Ordering::Relaxed);
        error
    })
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
            bidirectional(&mut proxy_a, &mut proxy_b, &from_client, &from_server, Timeouts::NONE).await.unwrap();
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

    /// The answer a destination sends before it stops reading a request it refused (a 431 to an oversized head).
    const ANSWER: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";

    #[tokio::test]
    async fn an_answer_in_flight_reaches_the_client_after_the_write_towards_the_server_fails() {
        // Pipes smaller than the request: the copy is still writing it when the server gives up.
        let (client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let (from_client, from_server) = (AtomicU64::new(0), AtomicU64::new(0));
        let (from_client, from_server) = (&from_client, &from_server);
        // The proxy's ends close when the copy returns, as a relay's do.
        let copy =
            async move { bidirectional(&mut proxy_a, &mut proxy_b, from_client, from_server, Timeouts::NONE).await };
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let send = async {
            // Fails once the proxy's end closes; the client then only waits for the answer.
            let _ = client_write.write_all(&[b'a'; 64 * 1024]).await;
            std::future::pending::<()>().await;
        };
        let receive = async {
            let mut answer = Vec::new();
            client_read.read_to_end(&mut answer).await.expect("the answer, then EOF (not a reset)");
            answer
        };
        let refuse = async {
            let mut head = [0; 2048];
            server.read_exact(&mut head).await.unwrap();
            // Answer and close in one go (one poll): the copy's write fails before it reads the answer.
            server.write_all(ANSWER).await.unwrap();
            drop(server);
        };
        let client_peer = async {
            tokio::select! {
                answer = receive => answer,
                () = send => unreachable!("sending never ends"),
            }
        };
        let (result, answer, ()) = tokio::join!(copy, client_peer, refuse);

        assert_eq!(String::from_utf8_lossy(&answer), String::from_utf8_lossy(ANSWER));
        let error = result.expect_err("the write towards the server failed");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe, "the first error is reported: {error}");
        assert_eq!(from_server.load(Ordering::Relaxed), ANSWER.len() as u64);
    }

    /// One side of a copy whose reads and writes each fail with the given error, or wait forever (`None`).
    struct Stuck {
        read: Option<io::ErrorKind>,
        write: Option<io::ErrorKind>,
    }

    impl AsyncRead for Stuck {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            self.read.map_or(Poll::Pending, |kind| Poll::Ready(Err(kind.into())))
        }
    }

    impl AsyncWrite for Stuck {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
            self.write.map_or(Poll::Pending, |kind| Poll::Ready(Err(kind.into())))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_stops_reading_and_stays_silent_is_given_up_after_the_drain_bound() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let mut server = Stuck { read: None, write: Some(io::ErrorKind::BrokenPipe) };
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        client.write_all(b"request").await.unwrap();

        let result = bidirectional(&mut proxy_a, &mut server, &counters.0, &counters.1, Timeouts::NONE).await;

        assert_eq!(result.expect_err("the write failed").kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(started.elapsed(), DRAIN_AFTER_FAILURE, "the other direction was given the drain bound, no more");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_resets_ends_the_copy_at_once() {
        // The client's side fails on read: nothing can reach it any more, so the idle server side is not waited on.
        let mut client_side = Stuck { read: Some(io::ErrorKind::ConnectionReset), write: None };
        let (mut proxy_b, _server) = tokio::io::duplex(1024);
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        let started = tokio::time::Instant::now();

        let result = bidirectional(&mut client_side, &mut proxy_b, &counters.0, &counters.1, Timeouts::NONE).await;

        assert_eq!(result.expect_err("the read failed").kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn after_a_half_close_the_other_direction_flows_until_it_ends() {
        // The client sends its request and half-closes; the server answers afterwards, in several writes.
        let (mut client, mut proxy_a) = tokio::io::duplex(64);
        let (mut proxy_b, mut server) = tokio::io::duplex(64);
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        let copy = bidirectional(&mut proxy_a, &mut proxy_b, &counters.0, &counters.1, Timeouts::NONE);
        let serve = async {
            let mut request = Vec::new();
            server.read_to_end(&mut request).await.unwrap();
            assert_eq!(request, b"request");
            for _ in 0..10 {
                server.write_all(&[b'r'; 100]).await.unwrap();
                tokio::task::yield_now().await;
            }
            drop(server);
        };
        let ask = async {
            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer.len()
        };
        let peers = async { tokio::join!(serve, ask).1 };
        let (result, answered) = tokio::join!(copy, peers);
        result.expect("both directions closed cleanly");
        assert_eq!(answered, 1000);
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
        assert!(direction.held.buffer.is_none(), "idle: nothing read, no buffer held");
        client.write_all(b"hello").await.unwrap();
        assert!(poll(&mut direction).is_pending());
        assert!(direction.held.buffer.is_none(), "everything written: the buffer went back");
        let mut got = [0; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(counter.load(Ordering::Relaxed), 5);
    }

    /// Bytes whose storage reports when it is freed: a frame's payload sharing its connection's read buffer.
    struct Tracked(Vec<u8>, Arc<std::sync::atomic::AtomicBool>);

    impl AsRef<[u8]> for Tracked {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            self.1.store(true, Ordering::Relaxed);
        }
    }

    /// A reader that hands over what it is given as it is, as an HTTP/2 stream does (`h2_stream`).
    struct HandsOver(Option<Bytes>);

    impl CopyRead for HandsOver {
        fn poll_fill(mut self: Pin<&mut Self>, _: &mut Context<'_>, held: &mut Held) -> Poll<io::Result<usize>> {
            match self.0.take() {
                Some(bytes) => {
                    let n = bytes.len();
                    held.hand_over(bytes);
                    Poll::Ready(Ok(n))
                }
                None => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn an_idle_direction_keeps_nothing_of_the_storage_its_last_handed_over_bytes_came_in() {
        // The writer's pipe takes 64 bytes at a time: the bytes are written in several steps.
        let (mut proxy_b, mut server) = tokio::io::duplex(64);
        let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // A 4 KiB "read buffer" of which the reader hands over 200 bytes in the middle.
        let storage = Bytes::from_owner(Tracked((0..4096).map(|i| i as u8).collect(), freed.clone()));
        let mut reader = HandsOver(Some(storage.slice(1000..1200)));
        drop(storage);
        let counter = AtomicU64::new(0);
        let mut direction = Direction::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut received = Vec::new();
        let mut chunk = [0; 64];
        while received.len() < 200 {
            assert!(direction.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut proxy_b), &counter).is_pending());
            if received.len() + 64 < 200 {
                // Control: bytes still wait in the holding, so their storage is alive.
                assert!(
                    !freed.load(Ordering::Relaxed),
                    "freed while {} bytes were still to write",
                    200 - received.len()
                );
            }
            let n = server.read(&mut chunk).await.unwrap();
            received.extend_from_slice(&chunk[..n]);
        }
        assert!(direction.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut proxy_b), &counter).is_pending());
        assert_eq!(received, (1000..1200).map(|i| i as u8).collect::<Vec<_>>(), "every byte, in order");
        assert!(direction.held.is_empty());
        assert!(freed.load(Ordering::Relaxed), "idle, everything written: the storage is not kept alive");
    }

    #[tokio::test]
    async fn a_direction_gives_its_buffer_back_when_idle_takes_one_when_bytes_flow_and_grows_it_for_bulk() {
        // The writer's pipe is small: while it is full the direction holds what it read, in the buffer it took.
        let (mut client, mut proxy_a) = tokio::io::duplex(1 << 20);
        let (mut proxy_b, mut server) = tokio::io::duplex(64);
        let counter = AtomicU64::new(0);
        let mut direction = Direction::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll =
            |d: &mut Direction| d.poll_copy(&mut cx, Pin::new(&mut proxy_a), Pin::new(&mut proxy_b), &counter);
        let pattern = |from: usize, n: usize| (from..from + n).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
        let mut sent = 0;
        let mut received = Vec::new();
        let mut sizes = Vec::new();

        // Idle at first: no buffer.
        assert!(poll(&mut direction).is_pending());
        assert_eq!(direction.held.buffer_size(), None, "idle: nothing read, no buffer held");

        // Three rounds, each followed by a quiet spell: a short message, a bulk transfer, a short message again.
        for n in [100, 3 * BUFFER_SIZE + 12_345, 100] {
            client.write_all(&pattern(sent, n)).await.unwrap();
            sent += n;
            let mut chunk = [0; 64];
            while received.len() < sent {
                assert!(poll(&mut direction).is_pending());
                sizes.extend(direction.held.buffer_size());
                // The server reads what the direction wrote (a full pipe: 64 bytes at most at a time).
                while let Ok(k) = tokio::time::timeout(Duration::ZERO, server.read(&mut chunk)).await {
                    received.extend_from_slice(&chunk[..k.unwrap()]);
                }
            }
            assert!(poll(&mut direction).is_pending());
            assert_eq!(direction.held.buffer_size(), None, "quiet after {n} bytes: the buffer went back");
            assert!(
                received == pattern(0, sent),
                "every byte, in order, after {n} more ({} of {sent})",
                received.len()
            );
        }
        assert_eq!(counter.load(Ordering::Relaxed), sent as u64);
        // While bytes flowed a buffer was held: the small one first, the bulk one once a read had filled it.
        assert_eq!(sizes.first(), Some(&FIRST_BUFFER_SIZE), "{sizes:?}");
        assert!(sizes.contains(&BUFFER_SIZE), "the bulk transfer grew the buffer");
        let first_bulk = sizes.iter().position(|&s| s == BUFFER_SIZE).unwrap();
        assert!(sizes[first_bulk..].iter().all(|&s| s == BUFFER_SIZE), "and kept it for the direction's later reads");
    }

    const IDLE: Duration = Duration::from_secs(60);
    const STALL: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn a_copy_that_carries_nothing_ends_at_the_idle_timeout_with_its_reason() {
        let (_client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, _server) = tokio::io::duplex(1024);
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        let timeouts = Timeouts { idle: Some(IDLE), write_stall: Some(STALL) };

        let result = bidirectional(&mut proxy_a, &mut proxy_b, &counters.0, &counters.1, timeouts).await;

        let error = result.expect_err("closed by the idle timeout");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Timeout::of(&error), Some(Timeout::Idle(IDLE)), "{error}");
        assert_eq!(error.to_string(), "idle timeout: no byte either way for 1m");
        assert_eq!(started.elapsed(), IDLE, "no sooner, no later: nothing moved since the copy began");
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_that_keeps_moving_bytes_outlives_the_idle_timeout_and_ends_idle_after_its_last_byte() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        let timeouts = Timeouts { idle: Some(IDLE), write_stall: Some(STALL) };
        let copy = bidirectional(&mut proxy_a, &mut proxy_b, &counters.0, &counters.1, timeouts);
        // The control: one byte each way every 40 s (under the idle timeout) for 5 idle timeouts, then quiet.
        let peers = async {
            for _ in 0..(5 * IDLE.as_secs() / 40) {
                tokio::time::sleep(Duration::from_secs(40)).await;
                client.write_all(b"x").await.unwrap();
                let mut byte = [0];
                server.read_exact(&mut byte).await.unwrap();
                server.write_all(b"y").await.unwrap();
                client.read_exact(&mut byte).await.unwrap();
            }
            // Both peers stay open (returned, not dropped): only the proxy's timeout ends the copy.
            (started.elapsed(), (client, server))
        };

        let (result, (last_byte, _peers)) = tokio::join!(copy, peers);

        assert_eq!(Timeout::of(&result.expect_err("idle once quiet")), Some(Timeout::Idle(IDLE)));
        assert!(last_byte >= 5 * IDLE - Duration::from_secs(40), "the active connection outlived 4 idle timeouts");
        assert_eq!(started.elapsed(), last_byte + IDLE, "closed one idle timeout after its last byte");
        assert_eq!(counters.0.load(Ordering::Relaxed), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_that_never_reads_ends_the_copy_at_the_write_stall_timeout() {
        // The server accepts and never reads (nor writes): the bytes the client sends wait in the copy's buffer.
        let (mut client, mut proxy_a) = tokio::io::duplex(64 * 1024);
        let mut server = Stuck { read: None, write: None };
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        client.write_all(&[b'a'; 1000]).await.unwrap();
        let started = tokio::time::Instant::now();
        let timeouts = Timeouts { idle: Some(IDLE), write_stall: Some(STALL) };

        let result = bidirectional(&mut proxy_a, &mut server, &counters.0, &counters.1, timeouts).await;

        let error = result.expect_err("closed by the write-stall timeout");
        assert_eq!(Timeout::of(&error), Some(Timeout::WriteStall(STALL)), "{error}");
        assert_eq!(error.to_string(), "write stalled: the peer took no byte for 10s");
        assert_eq!(started.elapsed(), STALL, "well before the idle timeout");
        assert_eq!(counters.0.load(Ordering::Relaxed), 1000, "read and held");
    }

    /// A writer that takes `per_call` bytes once every `every`, else is pending: a slow reader, not a stalled one.
    struct Slow {
        every: Duration,
        per_call: usize,
        next: Option<Pin<Box<tokio::time::Sleep>>>,
        taken: usize,
    }

    impl AsyncRead for Slow {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Slow {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let every = self.every;
            let next = self.next.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            ready!(next.as_mut().poll(cx));
            self.next = None;
            let n = data.len().min(self.per_call);
            self.taken += n;
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_not_a_stalled_one() {
        // The control of the stall test: the same held bytes, taken 10 at a time every 5 s (under the stall
        // timeout), all delivered; only once everything is delivered and nothing moves does the idle timeout end it.
        let (mut client, mut proxy_a) = tokio::io::duplex(64 * 1024);
        let mut server = Slow { every: Duration::from_secs(5), per_call: 10, next: None, taken: 0 };
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        client.write_all(&[b'a'; 1000]).await.unwrap();
        let started = tokio::time::Instant::now();
        let timeouts = Timeouts { idle: Some(IDLE), write_stall: Some(STALL) };

        let result = bidirectional(&mut proxy_a, &mut server, &counters.0, &counters.1, timeouts).await;

        assert_eq!(Timeout::of(&result.expect_err("idle at last")), Some(Timeout::Idle(IDLE)));
        assert_eq!(server.taken, 1000, "every byte delivered, over 100 writes spanning {:?}", Duration::from_secs(500));
        assert_eq!(started.elapsed(), Duration::from_secs(500) + IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_timeouts_off_nothing_ends_a_quiet_copy() {
        let (_client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, _server) = tokio::io::duplex(1024);
        let counters = (AtomicU64::new(0), AtomicU64::new(0));
        let copy = bidirectional(&mut proxy_a, &mut proxy_b, &counters.0, &counters.1, Timeouts::NONE);
        assert!(tokio::time::timeout(Duration::from_secs(24 * 3600), copy).await.is_err(), "still copying a day later");
    }
}
