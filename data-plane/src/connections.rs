//! Every open proxied connection, registered before its first byte is proxied and removed when it ends: what the
//! drain on SIGTERM waits for, and where a later policy change finds the connections it must re-check and close.
//! Also every HBONE connection accepted from another proxy (a [`Session`], not counted for the drain), so that a
//! revocation closes a revoked peer's connections even while they carry no stream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use trellis_proto::spiffe::SpiffeId;

use crate::registry::LocalWorkload;
use crate::revocation::Revocations;

/// The certificate a peer proxy presented on an HBONE connection (either side): what revocation matches.
#[derive(Debug)]
pub struct PeerCert {
    pub id: SpiffeId,
    /// Lower-case hex of the serial's magnitude.
    pub serial: String,
}

/// What the destination proxy knows about an inbound tunnelled connection.
#[derive(Debug)]
pub struct InboundConn {
    /// The peer's identity from its verified certificate.
    pub source: SpiffeId,
    /// The same, in Istio's principal form (no `spiffe://`), computed once per HBONE connection.
    pub principal: Arc<str>,
    /// The serial of the peer's certificate (revocation of its node matches it).
    pub serial: Arc<str>,
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

/// The connection an HTTP port's requests arrive on (`proxy::l7`): an HBONE tunnel from an authenticated peer, or a
/// captured plaintext connection (no principal, no namespace; `source.ip` is the client's own address).
#[derive(Debug, Clone)]
pub enum Downstream {
    Tunnel(Arc<InboundConn>),
    Plaintext(Arc<PlaintextConn>),
}

impl Downstream {
    pub fn workload(&self) -> &Arc<LocalWorkload> {
        match self {
            Downstream::Tunnel(conn) => &conn.workload,
            Downstream::Plaintext(conn) => &conn.workload,
        }
    }

    pub fn destination(&self) -> SocketAddr {
        match self {
            Downstream::Tunnel(conn) => conn.destination,
            Downstream::Plaintext(conn) => conn.destination,
        }
    }

    /// The peer's principal (Istio's form); none for plaintext.
    pub fn principal(&self) -> Option<&str> {
        match self {
            Downstream::Tunnel(conn) => Some(&conn.principal),
            Downstream::Plaintext(_) => None,
        }
    }

    /// The original client's address: reported by the sending proxy (else that proxy's own), or the plaintext
    /// connection's peer.
    pub fn client(&self) -> SocketAddr {
        match self {
            Downstream::Tunnel(conn) => conn.source_addr.unwrap_or(conn.peer),
            Downstream::Plaintext(conn) => conn.client,
        }
    }

    /// Whether the peer authenticated with mTLS (`connection_security_policy`).
    pub fn mutual_tls(&self) -> bool {
        matches!(self, Downstream::Tunnel(_))
    }
}

/// For logs: the peer's SPIFFE ID, or `plaintext <client address>`.
impl std::fmt::Display for Downstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Downstream::Tunnel(conn) => conn.source.fmt(f),
            Downstream::Plaintext(conn) => write!(f, "plaintext {}", conn.client),
        }
    }
}

/// What kind of connection is open: inbound ones are re-checked on every policy change, outbound ones only wait
/// for the drain.
enum Tracked {
    /// A local application's connection; through a tunnel to the peer proxy of this certificate, or passed through.
    Outbound(Option<Arc<PeerCert>>),
    Inbound(Arc<InboundConn>),
    Plaintext(Arc<PlaintextConn>),
}

impl Tracked {
    /// Why the proxy would cancel such a connection, for its access-log entry (unless a revocation says why).
    fn closed_by_proxy(&self) -> &'static str {
        match self {
            Tracked::Outbound(_) => "closed by the proxy: shutting down",
            Tracked::Inbound(_) | Tracked::Plaintext(_) => "closed by the proxy: policy change or shutdown",
        }
    }

    /// The peer proxy's certificate, for connections that have one.
    fn peer(&self) -> Option<(&str, &SpiffeId)> {
        match self {
            Tracked::Outbound(Some(peer)) => Some((&peer.serial, &peer.id)),
            Tracked::Inbound(conn) => Some((&conn.serial, &conn.source)),
            Tracked::Outbound(None) | Tracked::Plaintext(_) => None,
        }
    }
}

struct Entry {
    tracked: Tracked,
    cancel: CancellationToken,
    /// Set before `cancel` fires when a revocation closes it: the reason for the access log.
    reason: Arc<OnceLock<String>>,
}

struct SessionEntry {
    peer: Arc<PeerCert>,
    cancel: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: DashMap<u64, Entry>,
    emptied: Notify,
    /// HBONE connections accepted from other proxies (their streams are in `open`).
    sessions: DashMap<u64, SessionEntry>,
}

/// Keeps a connection registered while alive; `cancel` fires when the proxy wants it closed.
pub struct Registration {
    connections: Arc<Connections>,
    id: u64,
    pub cancel: CancellationToken,
    /// Why `cancel` fires, for the access log (`Tracked::closed_by_proxy`).
    closed_by_proxy: &'static str,
    reason: Arc<OnceLock<String>>,
}

impl Registration {
    /// The access-log detail of a connection the proxy cancelled: the revocation that closed it, else policy change
    /// or shutdown (inbound), shutdown (outbound).
    pub fn closed_by_proxy(&self) -> &str {
        self.reason.get().map_or(self.closed_by_proxy, String::as_str)
    }
}

/// Keeps an accepted HBONE connection registered while alive; `cancel` fires when its peer is revoked.
pub struct Session {
    connections: Arc<Connections>,
    id: u64,
    pub cancel: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

impl Session {
    /// Why the proxy closed it.
    pub fn reason(&self) -> &str {
        self.reason.get().map_or("closed by the proxy", String::as_str)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.connections.sessions.remove(&self.id);
    }
}

/// What [`Connections::close_revoked`] closed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClosedByRevocation {
    /// Accepted HBONE connections.
    pub sessions: usize,
    /// Tunnel streams, both directions.
    pub streams: usize,
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

    /// An outbound connection not carried by a tunnel (passthrough): closed only by the drain.
    pub fn register_outbound(self: &Arc<Self>) -> Registration {
        self.track(Tracked::Outbound(None))
    }

    /// An outbound connection through a tunnel to the proxy presenting `peer`: closed by the drain, or when `peer`
    /// is revoked.
    pub fn register_tunnel(self: &Arc<Self>, peer: Arc<PeerCert>) -> Registration {
        self.track(Tracked::Outbound(Some(peer)))
    }

    /// An HBONE connection accepted from the proxy presenting `peer`: not waited for by the drain (its streams
    /// are), closed when `peer` is revoked.
    pub fn register_session(self: &Arc<Self>, peer: Arc<PeerCert>) -> Session {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (cancel, reason) = (CancellationToken::new(), Arc::new(OnceLock::new()));
        self.sessions.insert(id, SessionEntry { peer, cancel: cancel.clone(), reason: reason.clone() });
        Session { connections: self.clone(), id, cancel, reason }
    }

    fn track(self: &Arc<Self>, tracked: Tracked) -> Registration {
        crate::activity::note();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (cancel, reason) = (CancellationToken::new(), Arc::new(OnceLock::new()));
        let closed_by_proxy = tracked.closed_by_proxy();
        self.open.insert(id, Entry { tracked, cancel: cancel.clone(), reason: reason.clone() });
        Registration { connections: self.clone(), id, cancel, closed_by_proxy, reason }
    }

    /// Closes every accepted HBONE connection and every tunnel stream (both directions) whose peer certificate
    /// `revocations` names, each with the reason for its access-log entry, and counts them in
    /// `trellis_revocations_total{action="closed"|"stream_closed"}`.
    pub fn close_revoked(&self, revocations: &Revocations) -> ClosedByRevocation {
        let mut closed = ClosedByRevocation::default();
        if revocations.is_empty() {
            return closed;
        }
        for entry in self.sessions.iter() {
            if let Err(revoked) = revocations.check(&entry.peer.serial, &entry.peer.id)
                && !entry.cancel.is_cancelled()
            {
                let _ = entry.reason.set(format!("closed by the proxy: {revoked}"));
                entry.cancel.cancel();
                revoked.count("closed");
                closed.sessions += 1;
            }
        }
        for entry in self.open.iter() {
            let Some((serial, id)) = entry.tracked.peer() else { continue };
            if let Err(revoked) = revocations.check(serial, id)
                && !entry.cancel.is_cancelled()
            {
                let _ = entry.reason.set(format!("closed by the proxy: {revoked}"));
                entry.cancel.cancel();
                revoked.count("stream_closed");
                closed.streams += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// HBONE connections accepted from other proxies and still open.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
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

    /// Gives back the room the registry grew to for a burst (a hash table keeps its largest size: 2,000 connections
    /// left about 170 KB behind, pinning pages amid the heap); called when traffic goes quiet (`heap`).
    pub fn shrink_to_fit(&self) {
        self.open.shrink_to_fit();
        self.sessions.shrink_to_fit();
    }

    /// Entries the registry has room for without growing (for the memory tests).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.open.capacity() + self.sessions.capacity()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_gives_back_what_a_burst_grew_it_to_and_keeps_what_is_open() {
        let connections = Arc::new(Connections::default());
        let idle = connections.capacity();
        let burst: Vec<Registration> = (0..2_000).map(|_| connections.register_outbound()).collect();
        let grown = connections.capacity();
        assert!(grown >= 2_000, "{grown}");
        let kept: Vec<Registration> = burst.into_iter().take(10).collect(); // the rest closed
        assert_eq!(connections.len(), 10);
        // The control: closing connections alone leaves (nearly all) the room they took.
        let after_close = connections.capacity();
        assert!(after_close > grown / 2, "a hash table does not shrink by itself: {after_close} of {grown}");
        connections.shrink_to_fit();
        let shrunk = connections.capacity();
        assert!(shrunk < grown / 10, "shrunk to {shrunk} from {grown} (idle {idle})");
        assert_eq!(connections.len(), 10, "the open ones stay registered");
        drop(kept);
        assert!(connections.is_empty());
    }
}
