//! Outbound: a local application's connection to `target`, from one of this proxy's workloads. A mesh workload is
//! reached through an HBONE tunnel to the proxy that fronts it, which must present the destination's identity; a
//! destination outside the mesh is dialled as plain TCP or refused (`outbound.passthrough`).
//!
//! Two entry points feed this: SOCKS5 (`socks5.rs`) and the capture listener (`serve_captured`, where the kernel's
//! redirect rules send workloads' traffic and SO_ORIGINAL_DST tells the real destination).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use crate::access_log;
use crate::config::Passthrough;
use crate::connections::{ByteCounts, copy_counted};
use crate::metrics::{Flags, PeerLabels, Reporter, TrafficKey};
use crate::pool::{PoolKey, Tunnel, TunnelError};
use crate::proxy::DataPath;
use crate::registry::{LocalWorkload, MeshWorkload};

const DIRECT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// Where the client's bytes go.
pub enum Upstream {
    Tunnel(Tunnel),
    Direct(TcpStream),
}

/// An outbound connection ready to relay.
pub struct Connected {
    upstream: Upstream,
    flow: Flow,
}

/// What an outbound connection's metrics and access log need.
struct Flow {
    key: TrafficKey,
    client_addr: SocketAddr,
    target: SocketAddr,
    started: Instant,
}

impl Flow {
    fn log(&self, received: u64, sent: u64, detail: &str) {
        access_log::connection(&access_log::Entry {
            key: &self.key,
            source_addr: Some(self.client_addr),
            destination_addr: self.target,
            received,
            sent,
            duration: self.started.elapsed(),
            decision: "none",
            policy: "-",
            detail,
        });
    }
}

/// Resolves `target` and opens the tunnel (or direct connection) to it. A refusal is counted and logged here.
pub async fn connect(
    data: &DataPath,
    source: Option<&LocalWorkload>,
    client_addr: SocketAddr,
    target: SocketAddr,
) -> Result<Connected, OutboundError> {
    let started = Instant::now();
    let registry = data.registry.load();
    let destination = registry.lookup(target.ip());
    let key = TrafficKey {
        reporter: Reporter::Source,
        source: source.map_or_else(PeerLabels::unknown, |s| s.peer.clone()),
        destination: destination.map_or_else(PeerLabels::unknown, |d| d.peer.clone()),
        mutual_tls: destination.is_some(),
        flags: Flags::None,
    };
    let result = open(data, source, destination, client_addr, target).await;
    drop(registry);
    let mut flow = Flow { key, client_addr, target, started };
    match result {
        Ok(upstream) => Ok(Connected { upstream, flow }),
        Err(error) => {
            flow.key.flags = match &error {
                OutboundError::PassthroughDenied(_) | OutboundError::NoSourceIdentity(_) => Flags::NoRoute,
                OutboundError::Tunnel(TunnelError::Refused(_, status)) if *status == StatusCode::FORBIDDEN => {
                    Flags::Deny
                }
                OutboundError::Tunnel(TunnelError::Tls(..)) => Flags::TlsFailure,
                OutboundError::Tunnel(_) | OutboundError::Direct(..) => Flags::Connect,
            };
            let series = data.traffic.tcp(flow.key.clone());
            series.opened();
            series.closed(0, 0);
            flow.log(0, 0, &error.to_string());
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
) -> Result<Upstream, OutboundError> {
    match destination {
        Some(destination) => {
            let source = source.ok_or(OutboundError::NoSourceIdentity(target))?;
            let key = PoolKey {
                source: source.spiffe_id.clone(),
                proxy: SocketAddr::new(target.ip(), destination.hbone_port),
                destination: destination.spiffe_id.clone(),
            };
            let tls = data.tls.load();
            let tunnel = data.pool.open(&key, &tls, target, client_addr).await?;
            debug!(source = %key.source, destination = %key.destination, %target, "tunnel open");
            Ok(Upstream::Tunnel(tunnel))
        }
        None => match data.outbound.passthrough {
            Passthrough::Deny => Err(OutboundError::PassthroughDenied(target)),
            Passthrough::Allow => {
                let stream = tokio::time::timeout(DIRECT_DIAL_TIMEOUT, crate::dial::connect(target))
                    .await
                    .map_err(|_| OutboundError::Direct(target, std::io::ErrorKind::TimedOut.into()))?
                    .map_err(|e| OutboundError::Direct(target, e))?;
                let _ = stream.set_nodelay(true);
                debug!(%target, "passthrough to a destination outside the mesh");
                Ok(Upstream::Direct(stream))
            }
        },
    }
}

/// Copies both ways until both directions are closed (half-close passes through), or the proxy cancels it.
pub async fn relay<C: AsyncRead + AsyncWrite + Unpin>(data: &DataPath, mut client: C, mut connected: Connected) {
    let registration = data.connections.register(None);
    let series = data.traffic.tcp(connected.flow.key.clone());
    series.opened();
    let _open = data.traffic.open_connection(Reporter::Source);
    let counts = ByteCounts::default();
    let detail = match &mut connected.upstream {
        Upstream::Tunnel(tunnel) => tokio::select! {
            r = copy_counted(&mut client, &mut tunnel.io, &counts) => r.err().map(|e| e.to_string()),
            () = registration.cancel.cancelled() => Some("closed by the proxy: shutting down".to_owned()),
        },
        Upstream::Direct(stream) => tokio::select! {
            r = copy_counted(&mut client, stream, &counts) => r.err().map(|e| e.to_string()),
            () = registration.cancel.cancelled() => Some("closed by the proxy: shutting down".to_owned()),
        },
    };
    let (received, sent) = counts.get();
    series.closed(received, sent);
    connected.flow.log(received, sent, detail.as_deref().unwrap_or("-"));
}

/// The capture listener: connections redirected by the kernel, whose real destination is SO_ORIGINAL_DST.
pub async fn serve_captured(listener: TcpListener, data: Arc<DataPath>) {
    let own = listener.local_addr().ok();
    crate::listen::accept_each(listener, "outbound", |tcp, peer| {
        let data = data.clone();
        async move {
            let Some(target) = original_destination(&tcp).filter(|t| Some(*t) != own) else {
                debug!(%peer, "connection to the capture listener was not redirected; closing");
                return;
            };
            let _ = tcp.set_nodelay(true);
            let source = data.locals.by_ip(peer.ip()).cloned();
            match connect(&data, source.as_deref(), peer, target).await {
                Ok(connected) => relay(&data, tcp, connected).await,
                Err(e) => info!(%peer, %target, error = %e, "captured connection refused"),
            }
        }
    })
    .await
}

/// The destination before the kernel's REDIRECT/TPROXY rewrite.
pub(crate) fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(tcp);
    let original = match tcp.local_addr().ok()? {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    original.ok()?.as_socket()
}
