//! SOCKS5 outbound (RFC 1928; no authentication, CONNECT by IPv4 or IPv6 address) for applications that are not
//! captured. The listener speaks for one configured workload, since a loopback client has no workload address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::DataPath;
use super::outbound::{self, OutboundError};
use super::pool::TunnelError;
use crate::registry::LocalWorkload;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reply codes (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

pub async fn serve(listener: TcpListener, data: Arc<DataPath>, workload: Arc<LocalWorkload>) {
    crate::listen::accept_each(listener, "socks5", |tcp, peer| {
        let (data, workload) = (data.clone(), workload.clone());
        async move {
            if let Err(e) = session(tcp, peer, &data, &workload).await {
                debug!(%peer, error = %e, "SOCKS5 session ended");
            }
        }
    })
    .await
}

async fn session(
    mut tcp: TcpStream,
    peer: SocketAddr,
    data: &DataPath,
    workload: &LocalWorkload,
) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut tcp)).await {
        Ok(Ok(Ok(target))) => target,
        Ok(Ok(Err(reply))) => return reply_with(&mut tcp, reply).await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    // Boxed: the dial (TLS and HTTP/2 handshakes) is a large future that would otherwise stay inline in this
    // connection's task, idle or not, for as long as the connection lives.
    match Box::pin(outbound::connect(data, Some(workload), peer, target)).await {
        Ok(connected) => {
            reply_with(&mut tcp, Reply::Succeeded).await?;
            outbound::relay(data, tcp, connected).await;
            Ok(())
        }
        Err(e) => {
            info!(%peer, source = %workload.spiffe_id, %target, error = %e, "SOCKS5 connect failed");
            reply_with(&mut tcp, reply_for(&e)).await
        }
    }
}

fn reply_for(error: &OutboundError) -> Reply {
    match error {
        OutboundError::PassthroughDenied(_) | OutboundError::NoSourceIdentity(_) => Reply::NotAllowed,
        OutboundError::Tunnel(TunnelError::Refused(_, status)) => match status.as_u16() {
            403 => Reply::NotAllowed,
            503 => Reply::ConnectionRefused,
            _ => Reply::HostUnreachable,
        },
        OutboundError::Direct(_, e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
        OutboundError::Tunnel(TunnelError::Connect(..) | TunnelError::Timeout(_)) | OutboundError::Direct(..) => {
            Reply::HostUnreachable
        }
        OutboundError::Tunnel(_) => Reply::GeneralFailure,
    }
}

/// Reads the greeting and the request; `Ok(Err(reply))` is a protocol refusal to send back.
async fn handshake(tcp: &mut TcpStream) -> std::io::Result<Result<SocketAddr, Reply>> {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    tcp.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        tcp.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "client offers no acceptable method"));
    }
    tcp.write_all(&[VERSION, NO_AUTH]).await?;

    let mut request = [0u8; 4];
    tcp.read_exact(&mut request).await?;
    if request[0] != VERSION {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad SOCKS5 request version"));
    }
    let ip = match request[3] {
        ATYP_IPV4 => {
            let mut octets = [0u8; 4];
            tcp.read_exact(&mut octets).await?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        ATYP_IPV6 => {
            let mut octets = [0u8; 16];
            tcp.read_exact(&mut octets).await?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        ATYP_DOMAIN => return Ok(Err(Reply::AddressTypeNotSupported)),
        _ => return Ok(Err(Reply::AddressTypeNotSupported)),
    };
    let mut port = [0u8; 2];
    tcp.read_exact(&mut port).await?;
    if request[1] != CMD_CONNECT {
        return Ok(Err(Reply::CommandNotSupported));
    }
    Ok(Ok(SocketAddr::new(ip, u16::from_be_bytes(port))))
}

async fn reply_with(tcp: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
    // Bound address: unspecified, as the tunnel has no meaningful local address to report.
    tcp.write_all(&[VERSION, reply as u8, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]).await?;
    tcp.flush().await
}
