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

struct Tracked {
    inbound: Option<Arc<InboundConn>>,
    plaintext: Option<Arc<PlaintextConn>>,
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
        self.track(inbound, None)
    }

    pub fn register_plaintext(self: &Arc<Self>, conn: Arc<PlaintextConn>) -> Registration {
        self.track(None, Some(conn))
    }

    fn track(
        self: &Arc<Self>,
        inbound: Option<Arc<InboundConn>>,
        plaintext: Option<Arc<PlaintextConn>>,
    ) -> Registration {
        crate::activity::note();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.open.insert(id, Tracked { inbound, plaintext, cancel: cancel.clone() });
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

    /// Closes every plaintext inbound connection for which `keep` says no; returns how many.
    pub fn close_plaintext_unless(&self, mut keep: impl FnMut(&PlaintextConn) -> bool) -> usize {
        let mut closed = 0;
        for entry in self.open.iter() {
            if let Some(conn) = &entry.plaintext
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
