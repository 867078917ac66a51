//! Every open proxied connection, registered before its first byte is proxied and removed when it ends: what the
//! drain on SIGTERM waits for, and where a later policy change finds the connections it must re-check and close.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use trellis_proto::spiffe::SpiffeId;

use crate::registry::LocalWorkload;

/// Buffer per direction when copying a proxied connection. Measured (`trellis-bench tunnel --quick`, 2 vCPU):
/// 8 and 16 KiB give ~180 MB/s through two proxies, 64 KiB ~280 MB/s: fewer, larger HTTP/2 DATA frames and TLS
/// records. The cost is 128 KiB per connection per proxy even when idle; adaptive buffers are the next step.
pub const COPY_BUFFER: usize = 64 * 1024;

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
/// with [`COPY_BUFFER`] each way, counting into `counts`.
pub async fn copy_counted<C, S>(client: &mut C, server: &mut S, counts: &ByteCounts) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted { io: client, read: &counts.from_client };
    let mut server = Counted { io: server, read: &counts.to_client };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, COPY_BUFFER, COPY_BUFFER).await.map(|_| ())
}

/// Counts the bytes read from `io` (one relaxed atomic add per read).
struct Counted<'a, T> {
    io: &'a mut T,
    read: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What the destination proxy knows about an inbound tunnelled connection.
#[derive(Debug)]
pub struct InboundConn {
    /// The peer's identity from its verified certificate.
    pub source: SpiffeId,
    /// The same, in Istio's principal form (no `spiffe://`), computed once per HBONE connection.
    pub principal: Arc<str>,
    /// The peer proxy's address.
    pub peer: SocketAddr,
    /// The original client address, as the sending proxy reported it.
    pub source_addr: Option<SocketAddr>,
    pub destination: SocketAddr,
    pub workload: Arc<LocalWorkload>,
}

struct Tracked {
    inbound: Option<Arc<InboundConn>>,
    cancel: CancellationToken,
}

#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: DashMap<u64, Tracked>,
    emptied: Notify,
}

/// Keeps a connection registered while alive; `cancel` fires when the proxy wants it closed.
pub struct Registration {
    connections: Arc<Connections>,
    id: u64,
    pub cancel: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.open.remove(&self.id);
        if self.connections.open.is_empty() {
            self.connections.emptied.notify_waiters();
        }
    }
}

impl Connections {
    pub fn register(self: &Arc<Self>, inbound: Option<Arc<InboundConn>>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.open.insert(id, Tracked { inbound, cancel: cancel.clone() });
        Registration { connections: self.clone(), id, cancel }
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Closes every inbound connection for which `keep` says no; returns how many.
    pub fn close_inbound_unless(&self, mut keep: impl FnMut(&InboundConn) -> bool) -> usize {
        let mut closed = 0;
        for entry in self.open.iter() {
            if let Some(conn) = &entry.inbound
                && !keep(conn)
            {
                entry.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Resolves once no connection is open.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.open.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}
