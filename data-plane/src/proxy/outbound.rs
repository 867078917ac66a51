//! Outbound: a local application's connection to `target`, from one of this proxy's workloads. A mesh workload is
//! reached through an HBONE tunnel to the proxy that fronts it, which must present the destination's identity; a
//! destination outside the mesh is dialled as plain TCP or refused (`outbound.passthrough`).
//!
//! Two entry points feed this: SOCKS5 (`socks5`) and the capture listener (`serve_captured`, where the kernel's
//! redirect rules send workloads' traffic and SO_ORIGINAL_DST tells the real destination).
//!
//! A captured client that speaks first (an HTTP request) has usually sent its first bytes by the time its
//! connection is handled: those go to the tunnel with the CONNECT (`pool::connect`), read without waiting
//! ([`first_bytes`]); a client that has sent nothing yet is not waited for.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::finish::Abort;
use super::pool::{PoolKey, Tunnel, TunnelError};
use super::{DataPath, PASSTHROUGH_DIAL_TIMEOUT, finish};
use crate::config::Passthrough;
use crate::copy::FIRST_BUFFER_SIZE;
use crate::metrics::{Flags, PeerLabels, Reporter, TrafficKey};
use crate::registry::{LocalWorkload, MeshWorkload};
use crate::report::{Authz, ConnectionReport};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{0} is outside the mesh and outbound.passthrough is deny")]
    PassthroughDenied(SocketAddr),
    #[error("{0} is a mesh workload but the client is not one of this proxy's workloads")]
    NoSourceIdentity(SocketAddr),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("dialling {0}: {1}")]
    Direct(SocketAddr, std::io::Error),
    /// Reading what the client had sent failed (it reset its connection) before the tunnel opened.
    #[error("the client's connection failed before its tunnel to {0} opened: {1}")]
    Client(SocketAddr, std::io::Error),
}

impl From<&OutboundError> for Flags {
    fn from(error: &OutboundError) -> Self {
        match error {
            OutboundError::PassthroughDenied(_) | OutboundError::NoSourceIdentity(_) => Flags::NoRoute,
            OutboundError::Tunnel(e) => Flags::from(e),
            OutboundError::Direct(..) => Flags::Connect,
            OutboundError::Client(..) => Flags::DownstreamTerminated,
        }
    }
}

/// Where the client's bytes go.
pub enum Upstream {
    Tunnel(Tunnel),
    Direct(TcpStream),
}

/// An outbound connection ready to relay.
pub struct Connected {
    upstream: Upstream,
    report: ConnectionReport,
    /// Bytes of the client's already sent with the CONNECT (counted as received from it).
    first_sent: u64,
}

/// Resolves `target` and opens the tunnel (or direct connection) to it. A refusal is counted and logged here.
/// `client`: the captured client's socket, whose bytes already sent go with the CONNECT of a tunnel (none for
/// SOCKS5, whose client sends nothing before the reply); a refused tunnel then closes it with a reset, as a close
/// with those bytes still unread would have.
pub async fn connect(
    data: &DataPath,
    source: Option<&LocalWorkload>,
    client_addr: SocketAddr,
    target: SocketAddr,
    client: Option<&TcpStream>,
) -> Result<Connected, OutboundError> {
    let registry = data.registry.load();
    let destination = registry.lookup(target.ip());
    let key = TrafficKey {
        reporter: Reporter::Source,
        source: source.map_or_else(PeerLabels::unknown, |s| s.peer.clone()),
        destination: destination.map_or_else(PeerLabels::unknown, |d| d.peer.clone()),
        mutual_tls: destination.is_some(),
        flags: Flags::None,
    };
    let report = ConnectionReport::new(key, client_addr, target);
    let result = open(data, source, destination, client_addr, target, client).await;
    drop(registry);
    match result {
        Ok((upstream, first_sent)) => Ok(Connected { upstream, report, first_sent }),
        Err(error) => {
            report.refused(&data.traffic, Flags::from(&error), Authz::NONE, &error.to_string());
            Err(error)
        }
    }
}

async fn open(
    data: &DataPath,
    source: Option<&LocalWorkload>,
    destination: Option<&Arc<MeshWorkload>>,
    client_addr: SocketAddr,
    target: SocketAddr,
    client: Option<&TcpStream>,
) -> Result<(Upstream, u64), OutboundError> {
    match destination {
        Some(destination) => {
            let source = source.ok_or(OutboundError::NoSourceIdentity(target))?;
            let key = PoolKey {
                source: source.spiffe_id.clone(),
                proxy: SocketAddr::new(target.ip(), destination.hbone_port),
                destination: destination.spiffe_id.clone(),
            };
            let tls = data.tls.load();
            let first = match client {
                Some(client) => first_bytes(client).map_err(|e| OutboundError::Client(target, e))?,
                None => Bytes::new(),
            };
            let tunnel = match data.pool.open(&key, &tls, target, client_addr, &first).await {
                Ok(tunnel) => tunnel,
                Err(e) => {
                    if let Some(client) = client.filter(|_| !first.is_empty()) {
                        client.abort_on_close();
                    }
                    return Err(e.into());
                }
            };
            debug!(source = %key.source, destination = %key.destination, %target, "tunnel open");
            Ok((Upstream::Tunnel(tunnel), first.len() as u64))
        }
        None => match data.outbound.passthrough {
            Passthrough::Deny => Err(OutboundError::PassthroughDenied(target)),
            Passthrough::Allow => {
                let stream = finish::dial(target, PASSTHROUGH_DIAL_TIMEOUT)
                    .await
                    .map_err(|e| OutboundError::Direct(target, e.into()))?;
                debug!(%target, "passthrough to a destination outside the mesh");
                Ok((Upstream::Direct(stream), 0))
            }
        },
    }
}

/// Copies both ways until both directions are closed (half-close passes through), or the proxy cancels it.
pub async fn relay<C: AsyncRead + AsyncWrite + finish::Abort + Unpin>(
    data: &DataPath,
    mut client: C,
    mut connected: Connected,
) {
    let registration = match &connected.upstream {
        Upstream::Tunnel(tunnel) => data.connections.register_tunnel(tunnel.peer.clone()),
        Upstream::Direct(_) => data.connections.register_outbound(),
    };
    // This future lives inline in the connection's task for as long as the connection does: what it holds is what
    // every idle tunnel costs. So the upstream is borrowed where it is rather than moved out of `connected` (a
    // moved-out value keeps a slot of its own beside the argument's), and the rare passthrough's relay is boxed
    // rather than sized into every tunnel's task: 1,552 bytes instead of 1,816 (debug build, `size_of`).
    match &mut connected.upstream {
        Upstream::Tunnel(tunnel) => {
            let open = connected.report.opened(&data.traffic, Authz::NONE);
            finish::relay_after(open, connected.first_sent, &mut client, &mut tunnel.io, &registration, data.timeouts)
                .await
        }
        Upstream::Direct(stream) => {
            let open = connected.report.opened(&data.traffic, Authz::NONE);
            Box::pin(finish::relay(open, &mut client, stream, &registration, data.timeouts)).await
        }
    };
}

/// What `client` has sent and the proxy not yet read, read now without waiting: empty when nothing has arrived, or
/// when the client has already half-closed (the relay reads that end again). At most [`FIRST_BUFFER_SIZE`] bytes
/// (the relay reads the rest, as it would have).
///
/// One non-blocking `recv` straight on the socket: the runtime learns a new socket's readiness only at its next
/// poll of the kernel's events, so a read through it would find nothing this early and wait.
///
/// Read into a buffer on the stack and returned as a copy of exactly their size: the bytes wait in h2's send queue
/// while the tunnel opens (a dial, the CONNECT's turn on a pooled connection). A pooled 16 KiB copy buffer lent for
/// them stayed out of the pool that long, so a burst of new connections took one each and left the pool (emptied
/// only once the proxy is quiet) at up to 64 of them, 1 MiB, where a relay's short-lived reads need a few: about
/// 1 MB more with 2,000 idle tunnels (BENCHMARKS.md, "Memory per idle tunnel: h2's read buffers"). Copying a
/// request's bytes once costs less than a TLS record's encryption of them.
fn first_bytes(client: &TcpStream) -> std::io::Result<Bytes> {
    let mut buffer = [0; FIRST_BUFFER_SIZE];
    match (&*socket2::SockRef::from(client)).read(&mut buffer) {
        Ok(n) => Ok(Bytes::copy_from_slice(&buffer[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Bytes::new()),
        Err(e) => Err(e),
    }
}

/// The capture listener: connections redirected by the kernel, whose real destination is SO_ORIGINAL_DST.
pub async fn serve_captured(listener: TcpListener, data: Arc<DataPath>) {
    let own = listener.local_addr().ok();
    crate::listen::accept_each(listener, "outbound", |tcp, peer| {
        let data = data.clone();
        async move {
            let Some(target) = crate::sockets::original_destination(&tcp, peer).filter(|t| Some(*t) != own) else {
                debug!(%peer, "connection to the capture listener was not redirected; closing");
                return;
            };
            // TCP_NODELAY: inherited from the listener (`listen::accept_each`).
            let source = data.locals.by_ip(peer.ip()).cloned();
            // Boxed, so the dial's large future does not stay inline in the task while the connection is idle.
            match Box::pin(connect(&data, source.as_deref(), peer, target, Some(&tcp))).await {
                Ok(connected) => relay(&data, tcp, connected).await,
                Err(e) => info!(%peer, %target, error = %e, "captured connection refused"),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::io;

    use hyper::StatusCode;

    use super::*;

    #[test]
    fn refusals_derive_their_response_flags() {
        let target = SocketAddr::from(([10, 1, 0, 2], 8080));
        let proxy = SocketAddr::from(([10, 1, 0, 2], 15008));
        let cases: [(OutboundError, &str); 11] = [
            (OutboundError::PassthroughDenied(target), "NR"),
            (OutboundError::NoSourceIdentity(target), "NR"),
            (OutboundError::Direct(target, io::ErrorKind::ConnectionRefused.into()), "CONNECT"),
            (OutboundError::Direct(target, io::ErrorKind::TimedOut.into()), "CONNECT"),
            (OutboundError::Client(target, io::ErrorKind::ConnectionReset.into()), "DC"),
            (TunnelError::Refused(proxy, StatusCode::FORBIDDEN).into(), "DENY"),
            (TunnelError::Refused(proxy, StatusCode::SERVICE_UNAVAILABLE).into(), "CONNECT"),
            (TunnelError::Connect(proxy, io::ErrorKind::ConnectionRefused.into()).into(), "CONNECT"),
            (TunnelError::Timeout(proxy).into(), "CONNECT"),
            (TunnelError::Tls(proxy, io::Error::other("invalid peer certificate")).into(), "TLS_FAILURE"),
            (TunnelError::TlsConfig(proxy, crate::tls::ClientConfigError::NoTrustBundle).into(), "TLS_FAILURE"),
        ];
        for (error, flags) in cases {
            assert_eq!(Flags::from(&error).as_str(), flags, "{error}");
        }
    }

    /// A connected pair of loopback sockets: (the client's end, the proxy's accepted end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn the_first_bytes_arrive_byte_exact_in_an_allocation_of_their_own_size_and_the_rest_stays_for_the_relay() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Control: nothing sent yet is not waited for.
        let (_client, accepted) = pair().await;
        assert!(first_bytes(&accepted).unwrap().is_empty());

        for n in [1, 1_100, FIRST_BUFFER_SIZE, FIRST_BUFFER_SIZE + 5_000] {
            let (mut client, mut accepted) = pair().await;
            let sent: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            client.write_all(&sent).await.unwrap();
            // Until the kernel holds what the first read can take.
            let mut peek = vec![0; FIRST_BUFFER_SIZE];
            while accepted.peek(&mut peek).await.unwrap() < n.min(FIRST_BUFFER_SIZE) {
                tokio::task::yield_now().await;
            }
            let first = first_bytes(&accepted).unwrap();
            assert_eq!(first, sent[..n.min(FIRST_BUFFER_SIZE)], "{n} bytes sent: the first read's, byte-exact");
            // The bytes wait in h2's send queue while the tunnel opens: what they hold then is exactly their size,
            // nothing shared (a pooled 16 KiB buffer lent for them is copied out here, and its address differs).
            let at = first.as_ptr();
            let owned = Vec::from(first);
            assert_eq!((owned.as_ptr(), owned.capacity()), (at, owned.len()), "{n} bytes sent");
            // The rest is the relay's to read, in order.
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            accepted.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, sent[owned.len()..], "{n} bytes sent: the rest, byte-exact");
        }
    }

    #[test]
    fn a_passthrough_dial_that_timed_out_reads_as_before() {
        let target = SocketAddr::from(([192, 0, 2, 1], 80));
        let error = OutboundError::Direct(target, finish::DialError::TimedOut.into());
        assert_eq!(error.to_string(), "dialling 192.0.2.1:80: timed out");
    }
}
