//! Every open proxied connection, registered before its first byte is proxied and removed when it ends: what the
//! drain on SIGTERM waits for, and where a later policy change finds the connections it must re-check and close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use trellis_proto::spiffe::SpiffeId;

use crate::registry::LocalWorkload;

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

/// A plaintext connection accepted on the captured inbound listener: no peer identity, so authorization sees no
/// principal.
#[derive(Debug)]
pub struct PlaintextConn {
    /// The client's address (not a proxy: the connection came straight from it).
    pub client: SocketAddr,
    pub destination: SocketAddr,
    pub workload: Arc<LocalWorkload>,
}

/// What kind of connection is open: inbound ones are re-checked on every policy change, outbound ones only wait
/// for the drain.
enum Tracked {
    Outbound,
    Inbound(Arc<InboundConn>),
    Plaintext(Arc<PlaintextConn>),
}

impl Tracked {
    /// Why the proxy would cancel such a connection, for its access-log entry.
    fn closed_by_proxy(&self) -> &'static str {
        match self {
            Tracked::Outbound => "closed by the proxy: shutting down",
            Tracked::Inbound(_) | Tracked::Plaintext(_) => "closed by the proxy: policy change or shutdown",
        }
    }
}

struct Entry {
    tracked: Tracked,
    cancel: CancellationToken,
}

#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: DashMap<u64, Entry>,
    emptied: Notify,
}

/// Keeps a connection registered while alive; `cancel` fires when the proxy wants it closed.
pub struct Registration {
    connections: Arc<Connections>,
    id: u64,
    pub cancel: CancellationToken,
    /// Why `cancel` fires, for the access log (`Tracked::closed_by_proxy`).
    closed_by_proxy: &'static str,
}

impl Registration {
    /// The access-log detail of a connection the proxy cancelled: policy change or shutdown (inbound), shutdown
    /// (outbound).
    pub fn closed_by_proxy(&self) -> &'static str {
        self.closed_by_proxy
    }
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
    /// An HBONE inbound stream: re-checked on every policy change.
    pub fn register_inbound(self: &Arc<Self>, conn: Arc<InboundConn>) -> Registration {
        self.track(Tracked::Inbound(conn))
    }

    /// A captured plaintext inbound connection: re-checked on every policy change.
    pub fn register_plaintext(self: &Arc<Self>, conn: Arc<PlaintextConn>) -> Registration {
        self.track(Tracked::Plaintext(conn))
    }

    /// An outbound connection: closed only by the drain.
    pub fn register_outbound(self: &Arc<Self>) -> Registration {
        self.track(Tracked::Outbound)
    }

    fn track(self: &Arc<Self>, tracked: Tracked) -> Registration {
        crate::activity::note();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let closed_by_proxy = tracked.closed_by_proxy();
        self.open.insert(id, Entry { tracked, cancel: cancel.clone() });
        Registration { connections: self.clone(), id, cancel, closed_by_proxy }
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
            if let Tracked::Inbound(conn) = &entry.tracked
                && !keep(conn)
            {
                entry.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Closes every plaintext inbound connection for which `keep` says no; returns how many.
    pub fn close_plaintext_unless(&self, mut keep: impl FnMut(&PlaintextConn) -> bool) -> usize {
        let mut closed = 0;
        for entry in self.open.iter() {
            if let Tracked::Plaintext(conn) = &entry.tracked
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
