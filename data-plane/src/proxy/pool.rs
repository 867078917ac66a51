//! HBONE client: a pool of mTLS HTTP/2 connections to other proxies, keyed by (source identity, destination proxy,
//! destination identity), each carrying many CONNECT streams. A connection is not reused for new streams once it is
//! full, closed (GOAWAY, failure), or built from older TLS material than the current set (after a rotation new
//! streams get a fresh handshake with the new certificate); idle connections expire.
//!
//! Memory after a burst: each pooled connection holds buffers of its own (rustls's records, h2's read buffer that
//! grows to the largest frame, its stream slabs that grow to the most streams it carried at once) for as long as it
//! lives, and a burst of concurrent tunnels opens one connection per [`MAX_STREAMS_PER_CONNECTION`]. So once a
//! burst is over, the connections it opened beyond the first are closed after [`SURPLUS_IDLE_TIMEOUT`] without a
//! stream, and the one kept for the next tunnel after [`IDLE_TIMEOUT`]: the proxy (and its peer, whose side of each
//! connection ends with it) returns to about its idle size instead of keeping the burst's peak.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use hyper::{Method, Request, StatusCode};
use parking_lot::Mutex;
use rustls_pki_types::ServerName;
use trellis_proto::spiffe::SpiffeId;

use super::TUNNEL_DIAL_TIMEOUT;
use super::h2_stream::H2Stream;
use crate::connections::PeerCert;
use crate::hbone::{
    self, CLIENT_KEEP_ALIVE_TIMEOUT, CONNECTION_WINDOW, FORWARDED, MAX_FRAME_SIZE, MAX_SEND_BUFFER,
    MAX_STREAMS_PER_CONNECTION, STREAM_WINDOW,
};
use crate::metrics::Flags;
use crate::revocation::{Revocations, Revoked};
use crate::tls::{ClientConfigError, TlsSet};

/// A key's last usable connection is closed after this long without a stream.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Any other connection of the key (opened by a burst, one per [`MAX_STREAMS_PER_CONNECTION`] concurrent tunnels)
/// is closed after this long without a stream. Longer than a gap between requests of a steady load, so that a
/// load that needs several connections keeps them rather than handshaking again.
pub(crate) const SURPLUS_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`Pool::reap`] runs (`reconfigure`): an idle connection is closed within this of its timeout.
pub const REAP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to proxy {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    /// No client config for the pair of identities (yet).
    #[error("TLS with proxy {0}: {1}")]
    TlsConfig(SocketAddr, ClientConfigError),
    /// The handshake failed (the server's identity among the reasons).
    #[error("TLS with proxy {}: {}", .0, crate::error_chain(.1))]
    Tls(SocketAddr, std::io::Error),
    #[error("HTTP/2 with proxy {0}: {1}")]
    Http(SocketAddr, h2::Error),
    #[error("proxy {0} refused the tunnel: {1}")]
    Refused(SocketAddr, StatusCode),
    #[error("timed out connecting to proxy {0}")]
    Timeout(SocketAddr),
    /// The failure of a dial this stream waited for (streams queued behind one dial share its outcome).
    #[error(transparent)]
    Shared(Arc<TunnelError>),
    /// Revoked while the handshake ran (the verifier refuses it otherwise).
    #[error("TLS with proxy {0}: {1}")]
    Revoked(SocketAddr, Revoked),
}

impl TunnelError {
    /// The error itself, or the one a shared dial ended with.
    pub fn cause(&self) -> &TunnelError {
        match self {
            TunnelError::Shared(inner) => inner.cause(),
            other => other,
        }
    }
}

impl From<&TunnelError> for Flags {
    fn from(error: &TunnelError) -> Self {
        match error.cause() {
            TunnelError::Refused(_, status) if *status == StatusCode::FORBIDDEN => Flags::Deny,
            TunnelError::TlsConfig(..) | TunnelError::Tls(..) | TunnelError::Revoked(..) => Flags::TlsFailure,
            TunnelError::Connect(..)
            | TunnelError::Http(..)
            | TunnelError::Refused(..)
            | TunnelError::Timeout(_)
            | TunnelError::Shared(_) => Flags::Connect,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: SpiffeId,
    /// Where the destination proxy's HBONE listener is reached.
    pub proxy: SocketAddr,
    pub destination: SpiffeId,
}

struct PooledConn {
    sender: SendRequest<Bytes>,
    /// The certificate the destination proxy presented.
    peer: Arc<PeerCert>,
    /// Fires when `peer` is revoked (the connection task then drops the connection and every stream on it), and
    /// when the connection has ended (a GOAWAY, a failure, an unanswered keep-alive).
    cancel: tokio_util::sync::CancellationToken,
    streams: AtomicUsize,
    tls_generation: u64,
    /// Milliseconds since the pool's epoch when the last stream ended.
    idle_since: AtomicU64,
}

impl PooledConn {
    fn usable(&self, generation: u64) -> bool {
        self.tls_generation == generation
            && !self.cancel.is_cancelled()
            && self.streams.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION as usize
    }
}

/// Keeps a pooled connection's stream count right for as long as the tunnel lives.
pub struct StreamGuard {
    conn: Arc<PooledConn>,
    epoch: Instant,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
        self.conn.idle_since.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// An established tunnel: bytes written here reach the destination workload.
pub struct Tunnel {
    pub io: H2Stream,
    pub guard: StreamGuard,
    /// The destination proxy's certificate (what revocation matches).
    pub peer: Arc<PeerCert>,
}

pub struct Pool {
    connections: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    /// One dial at a time per key, so a burst of new streams shares the first handshake; the gate keeps the last
    /// failed dial (when, why), so the streams that waited for it fail with it instead of dialling again one after
    /// the other (a peer that never answers would otherwise cost the n-th of them n dial timeouts).
    dial_gates: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<LastFailure>>>>,
    epoch: Instant,
}

type LastFailure = Option<(Instant, Arc<TunnelError>)>;

impl Default for Pool {
    fn default() -> Self {
        Self { connections: Mutex::default(), dial_gates: Mutex::default(), epoch: Instant::now() }
    }
}

impl Pool {
    /// Opens a CONNECT stream to `target` through the proxy of `key`, reusing a pooled connection when one fits.
    /// `first`: bytes the client already sent, sent on the stream right behind the CONNECT rather than after its
    /// answer (see [`connect`]); empty for none.
    pub async fn open(
        &self,
        key: &PoolKey,
        tls: &TlsSet,
        target: SocketAddr,
        original_source: SocketAddr,
        first: &Bytes,
    ) -> Result<Tunnel, TunnelError> {
        // A pooled connection may have died since its last use; one retry on a fresh connection covers that. Not
        // when the client's first bytes went with a CONNECT that the peer may have taken (see `retry_after`).
        let mut last_error = None;
        for _ in 0..2 {
            let conn = self.checkout(key, tls).await?;
            let guard = StreamGuard { conn: conn.clone(), epoch: self.epoch };
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(FORWARDED, hbone::forwarded_for(original_source))
                .body(())
                .expect("CONNECT request parts are valid");
            // A pooled connection can die silently (a partition): its CONNECTs then get no answer until the
            // HTTP/2 keep-alive gives up (up to 40 s). Waiting as long as a dial would: then this stream retries on
            // a fresh connection, and the silent one takes no new streams (its open ones keep it until they end
            // or the keep-alive closes it).
            let answer = match tokio::time::timeout(TUNNEL_DIAL_TIMEOUT, connect(conn.sender.clone(), request, first))
                .await
            {
                Ok(answer) => answer,
                Err(_) => {
                    self.forget(key, &conn);
                    if !first.is_empty() {
                        return Err(TunnelError::Timeout(key.proxy));
                    }
                    tracing::debug!(proxy = %key.proxy, "no answer to CONNECT on a pooled connection; retrying on a new one");
                    last_error = Some(TunnelError::Timeout(key.proxy));
                    continue;
                }
            };
            match answer {
                Ok((response, send)) if response.status() == StatusCode::OK => {
                    let io = H2Stream::new(send, response.into_body());
                    return Ok(Tunnel { io, guard, peer: conn.peer.clone() });
                }
                Ok((response, _)) => return Err(TunnelError::Refused(key.proxy, response.status())),
                Err(Failed { sent, error: e }) => {
                    self.forget(key, &conn);
                    if !retry_after(sent && !first.is_empty(), &e) {
                        return Err(TunnelError::Http(key.proxy, e));
                    }
                    tracing::debug!(proxy = %key.proxy, error = %e, "pooled connection failed; retrying on a new one");
                    last_error = Some(TunnelError::Http(key.proxy, e));
                }
            }
        }
        Err(last_error.expect("loop ran"))
    }

    /// A connection with room for one more stream (its count already taken), dialled if needed.
    async fn checkout(&self, key: &PoolKey, tls: &TlsSet) -> Result<Arc<PooledConn>, TunnelError> {
        if let Some(conn) = self.reserve(key, tls.generation) {
            return Ok(conn);
        }
        let arrived = Instant::now();
        let gate = self.dial_gates.lock().entry(key.clone()).or_default().clone();
        let mut last_failure = gate.lock().await;
        if let Some(conn) = self.reserve(key, tls.generation) {
            return Ok(conn);
        }
        if let Some((at, error)) = last_failure.as_ref()
            && *at >= arrived
        {
            // The dial this stream waited behind failed while it waited: that is its answer too.
            return Err(TunnelError::Shared(error.clone()));
        }
        let conn = match dial(key, tls).await {
            Ok(conn) => Arc::new(conn),
            Err(e) => {
                let e = Arc::new(e);
                *last_failure = Some((Instant::now(), e.clone()));
                return Err(TunnelError::Shared(e));
            }
        };
        *last_failure = None;
        conn.streams.fetch_add(1, Ordering::Relaxed);
        self.connections.lock().entry(key.clone()).or_default().push(conn.clone());
        // Pooled before this check, so that a revocation applied while the handshake ran is not missed: either the
        // check sees it, or `close_revoked` finds the connection.
        if let Err(revoked) = tls.revocations().load().check(&conn.peer.serial, &conn.peer.id) {
            revoked.count("refused");
            conn.cancel.cancel();
            self.forget(key, &conn);
            return Err(TunnelError::Revoked(key.proxy, revoked));
        }
        Ok(conn)
    }

    /// Closes every pooled connection to a proxy whose certificate `revocations` names (with every stream on it),
    /// and counts them in `trellis_revocations_total{action="closed"}`; returns how many.
    pub fn close_revoked(&self, revocations: &Revocations) -> usize {
        if revocations.is_empty() {
            return 0;
        }
        let mut closed = 0;
        self.connections.lock().retain(|_, list| {
            list.retain(|conn| match revocations.check(&conn.peer.serial, &conn.peer.id) {
                Ok(()) => true,
                Err(revoked) => {
                    tracing::info!(peer = %conn.peer.id, reason = %revoked, "pooled HBONE connection closed");
                    conn.cancel.cancel();
                    revoked.count("closed");
                    closed += 1;
                    false
                }
            });
            !list.is_empty()
        });
        closed
    }

    fn reserve(&self, key: &PoolKey, generation: u64) -> Option<Arc<PooledConn>> {
        let connections = self.connections.lock();
        let conn = connections.get(key)?.iter().find(|c| c.usable(generation))?;
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Some(conn.clone())
    }

    fn forget(&self, key: &PoolKey, conn: &Arc<PooledConn>) {
        if let Some(list) = self.connections.lock().get_mut(key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
        }
    }

    /// Drops closed connections, surplus idle ones after `SURPLUS_IDLE_TIMEOUT` and a key's last usable one after
    /// `IDLE_TIMEOUT` (dropping the last sender closes it: h2 sends GOAWAY once it carries no stream).
    pub fn reap(&self, generation: u64) {
        self.reap_at(Instant::now(), generation);
    }

    /// `reap` as if it ran at `now` (tests drive the idle expiry without waiting for it); `generation` is the
    /// current TLS set's, whose connections alone take new streams (so only one of them is worth keeping).
    pub(crate) fn reap_at(&self, now: Instant, generation: u64) {
        let now = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let (idle_ms, surplus_ms) = (IDLE_TIMEOUT.as_millis() as u64, SURPLUS_IDLE_TIMEOUT.as_millis() as u64);
        let mut connections = self.connections.lock();
        let before: usize = connections.values().map(Vec::len).sum();
        connections.retain(|_, list| {
            // The first usable connection is the one `reserve` fills first: the one kept warm for the next tunnel.
            let kept = list.iter().position(|c| c.usable(generation)).map(|i| Arc::as_ptr(&list[i]));
            list.retain(|c| {
                let quiet_for = match c.streams.load(Ordering::Relaxed) {
                    0 => now.saturating_sub(c.idle_since.load(Ordering::Relaxed)),
                    _ => 0,
                };
                let limit = if kept == Some(Arc::as_ptr(c)) { idle_ms } else { surplus_ms };
                !c.cancel.is_cancelled() && quiet_for <= limit
            });
            !list.is_empty()
        });
        if connections.values().map(Vec::len).sum::<usize>() < before {
            // What the closed connections held is freed: `heap` then returns it to the OS once the proxy is quiet.
            crate::activity::note();
        }
        // Gates of keys with no connection left are not needed any more, unless a dial holds one. (The one place
        // both locks are held: `connections` first; no other place takes them nested.)
        self.dial_gates.lock().retain(|k, gate| connections.contains_key(k) || Arc::strong_count(gate) > 1);
    }

    /// Number of pooled HTTP/2 connections.
    pub fn size(&self) -> usize {
        self.connections.lock().values().map(Vec::len).sum()
    }
}

async fn dial(key: &PoolKey, tls: &TlsSet) -> Result<PooledConn, TunnelError> {
    let proxy = key.proxy;
    let config = tls.client_for(&key.source, &key.destination).map_err(|e| TunnelError::TlsConfig(proxy, e))?;
    let connect = async {
        let tcp = crate::sockets::connect(proxy).await.map_err(|e| TunnelError::Connect(proxy, e))?;
        let _ = tcp.set_nodelay(true);
        let mut tls_stream = tokio_rustls::TlsConnector::from(config)
            // Read ahead: one system call per socket read, not per 4 KiB rustls asks for (`read_ahead`).
            .connect(ServerName::IpAddress(proxy.ip().into()), crate::read_ahead::ReadAhead::new(tcp))
            .await
            .map_err(|e| TunnelError::Tls(proxy, e))?;
        crate::tls::tune(tls_stream.get_mut().1);
        let peer = {
            let leaf = tls_stream.get_ref().1.peer_certificates().and_then(|c| c.first());
            let id = leaf.and_then(|l| crate::tls::peer_identity(l).ok()).unwrap_or_else(|| key.destination.clone());
            Arc::new(PeerCert { id, serial: leaf.and_then(crate::revocation::serial_hex).unwrap_or_default() })
        };
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            // Frames of the streams that had bytes in the same turn leave in one TLS record (`write_batch`).
            .handshake::<_, Bytes>(crate::write_batch::WriteBatch::new(tls_stream))
            .await
            .map_err(|e| TunnelError::Http(proxy, e))?;
        let ping = connection.ping_pong();
        let cancel = tokio_util::sync::CancellationToken::new();
        let cancelled = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => if let Err(e) = result {
                    tracing::debug!(%proxy, error = %e, "HBONE connection ended with an error");
                },
                // Dropping the connection closes it and fails every stream on it at once.
                () = cancelled.cancelled() => {}
                () = hbone::keep_alive(ping, CLIENT_KEEP_ALIVE_TIMEOUT) => tracing::debug!(%proxy, "HBONE connection closed: keep-alive PING unanswered"),
            }
            // No new streams on it (its sender would fail them).
            cancelled.cancel();
        });
        Ok(PooledConn {
            sender,
            peer,
            cancel,
            streams: AtomicUsize::new(0),
            tls_generation: tls.generation,
            idle_since: AtomicU64::new(0),
        })
    };
    tokio::time::timeout(TUNNEL_DIAL_TIMEOUT, connect).await.map_err(|_| TunnelError::Timeout(proxy))?
}

/// Sends a CONNECT on a pooled connection (once it takes another stream), then `first` (the bytes the client already
/// sent, if any) as the stream's first DATA, and waits for the answer.
///
/// Sending `first` before the answer takes a round trip between the proxies out of every new connection whose
/// client speaks first (an HTTP request): the CONNECT and the request leave in one TLS write, and the server side
/// has the request in hand when its workload connection is up. Nothing reaches the destination workload before the
/// server side has authorized the stream and dialled it: it reads the stream's bytes only once it answered 200, and
/// a refused stream's bytes are dropped there with the stream.
async fn connect(
    sender: SendRequest<Bytes>,
    request: Request<()>,
    first: &Bytes,
) -> Result<(hyper::Response<h2::RecvStream>, h2::SendStream<Bytes>), Failed> {
    let unsent = |error| Failed { sent: false, error };
    let mut sender = sender.ready().await.map_err(unsent)?;
    let (response, mut send) = sender.send_request(request, false).map_err(unsent)?;
    let sent = |error| Failed { sent: true, error };
    if !first.is_empty() {
        send.send_data(first.clone(), false).map_err(sent)?;
    }
    Ok((response.await.map_err(sent)?, send))
}

/// A CONNECT that failed, and whether it may have left (the peer may have taken it).
struct Failed {
    sent: bool,
    error: h2::Error,
}

/// Whether a CONNECT that failed with `error` is tried again on a fresh connection. Always, unless it carried the
/// client's first bytes (`carried_first`) and the peer may have acted on it: a retry would hand the destination the
/// same bytes twice (an HTTP request run twice). The peer did not act on a stream it refused or that its GOAWAY
/// left out (RFC 9113 §8.7).
fn retry_after(carried_first: bool, error: &h2::Error) -> bool {
    !carried_first || error.is_go_away() || error.reason() == Some(h2::Reason::REFUSED_STREAM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_connect_that_carried_the_clients_first_bytes_is_retried_only_when_the_peer_did_not_take_it() {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        let cancelled = h2::Error::from(h2::Reason::CANCEL);
        let broken = h2::Error::from(h2::Reason::INTERNAL_ERROR);
        // Control: without first bytes, every failure is retried.
        for error in [&refused, &cancelled, &broken] {
            assert!(retry_after(false, error), "{error}");
        }
        assert!(retry_after(true, &refused), "the peer refused the stream: it did not act on it");
        assert!(!retry_after(true, &cancelled), "the peer may have passed the bytes on");
        assert!(!retry_after(true, &broken), "the stream failed after the bytes left");
    }
}
