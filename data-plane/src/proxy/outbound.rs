//! Outbound: a local application's connection to `target`, from one of this proxy's workloads. A mesh workload is
//! reached through an HBONE tunnel to the proxy that fronts it, which must present the destination's identity; a
//! destination outside the mesh is dialled as plain TCP or refused (`outbound.passthrough`).
//!
//! Two entry points feed this: SOCKS5 (`socks5`) and the capture listener (`serve_captured`, where the kernel's
//! redirect rules send workloads' traffic and SO_ORIGINAL_DST tells the real destination).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::DataPath;
use super::pool::{PoolKey, Tunnel, TunnelError};
use crate::config::Passthrough;
use crate::copy::{ByteCounts, copy_counted};
use crate::metrics::{Flags, PeerLabels, Reporter, TrafficKey};
use crate::registry::{LocalWorkload, MeshWorkload};
use crate::report::{Authz, ConnectionReport};

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
    report: ConnectionReport,
}

/// Resolves `target` and opens the tunnel (or direct connection) to it. A refusal is counted and logged here.
pub async fn connect(
    data: &DataPath,
    source: Option<&LocalWorkload>,
    client_addr: SocketAddr,
    target: SocketAddr,
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
    let result = open(data, source, destination, client_addr, target).await;
    drop(registry);
    match result {
        Ok(upstream) => Ok(Connected { upstream, report }),
        Err(error) => {
            let flags = match &error {
                OutboundError::PassthroughDenied(_) | OutboundError::NoSourceIdentity(_) => Flags::NoRoute,
                OutboundError::Tunnel(TunnelError::Refused(_, status)) if *status == StatusCode::FORBIDDEN => {
                    Flags::Deny
                }
                OutboundError::Tunnel(TunnelError::Tls(..)) => Flags::TlsFailure,
                OutboundError::Tunnel(_) | OutboundError::Direct(..) => Flags::Connect,
            };
            report.refused(&data.traffic, flags, Authz::NONE, &error.to_string());
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
                let stream = tokio::time::timeout(DIRECT_DIAL_TIMEOUT, crate::sockets::connect(target))
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
    let open = connected.report.opened(&data.traffic);
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
    connected.report.closed(open, received, sent, Authz::NONE, detail.as_deref());
}

/// The capture listener: connections redirected by the kernel, whose real destination is SO_ORIGINAL_DST.
pub async fn serve_captured(listener: TcpListener, data: Arc<DataPath>) {
    let own = listener.local_addr().ok();
    crate::listen::accept_each(listener, "outbound", |tcp, peer| {
        let data = data.clone();
        async move {
            let Some(target) = crate::sockets::original_destination(&tcp).filter(|t| Some(*t) != own) else {
                debug!(%peer, "connection to the capture listener was not redirected; closing");
                return;
            };
            let _ = tcp.set_nodelay(true);
            let source = data.locals.by_ip(peer.ip()).cloned();
            // Boxed, so the dial's large future does not stay inline in the task while the connection is idle.
            match Box::pin(connect(&data, source.as_deref(), peer, target)).await {
                Ok(connected) => relay(&data, tcp, connected).await,
                Err(e) => info!(%peer, %target, error = %e, "captured connection refused"),
            }
        }
    })
    .await
}
