//! SOCKS5 outbound (RFC 1928; no authentication, CONNECT by IPv4 or IPv6 address) for applications that are not
//! captured. The listener speaks for one configured workload, since a loopback client has no workload address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::outbound::{self, OutboundError};
use super::pool::TunnelError;
use super::{DataPath, HANDSHAKE_TIMEOUT};
use crate::registry::LocalWorkload;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// Reply codes (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
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
    // TCP_NODELAY: inherited from the listener (`listen::accept_each`).
    let target = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut tcp)).await {
        Ok(Ok(Ok(target))) => target,
        Ok(Ok(Err(reply))) => return reply_with(&mut tcp, reply).await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    };
    // Boxed: the dial (TLS and HTTP/2 handshakes) is a large future that would otherwise stay inline in this
    // connection's task, idle or not, for as long as the connection lives.
    match Box::pin(outbound::connect(data, Some(workload), peer, target, None)).await {
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
        OutboundError::Direct(_, e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
        OutboundError::Direct(..) => Reply::HostUnreachable,
        OutboundError::Tunnel(e) => match e.cause() {
            TunnelError::Refused(_, status) => match status.as_u16() {
                403 => Reply::NotAllowed,
                503 => Reply::ConnectionRefused,
                _ => Reply::HostUnreachable,
            },
            TunnelError::Connect(..) | TunnelError::Timeout(_) => Reply::HostUnreachable,
            _ => Reply::GeneralFailure,
        },
        // Not from SOCKS5 (its client sends nothing before the reply), but answered all the same.
        OutboundError::Client(..) => Reply::GeneralFailure,
    }
}

/// Reads the greeting and the request; `Ok(Err(reply))` is a protocol refusal to send back. Public for the fuzz
/// target (`fuzz/fuzz_targets/socks5_handshake.rs`).
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(tcp: &mut S) -> std::io::Result<Result<SocketAddr, Reply>> {
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

async fn reply_with<S: AsyncWrite + Unpin>(tcp: &mut S, reply: Reply) -> std::io::Result<()> {
    // Bound address: unspecified, as the tunnel has no meaningful local address to report.
    tcp.write_all(&[VERSION, reply as u8, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]).await?;
    tcp.flush().await
}

#[cfg(test)]
mod tests {
    //! The handshake over an in-memory pipe: what the client sends, what the listener writes back, and what the
    //! handshake decides. A refusal the handshake returns as a reply is written with `reply_with`, as `session`
    //! does. The client sends all its bytes and then closes its side, so a short message ends in EOF.
    use std::time::Duration;

    use super::*;

    const GREETING: [u8; 3] = [VERSION, 1, NO_AUTH];
    /// CONNECT 10.1.0.2:8080.
    const CONNECT_IPV4: [u8; 10] = [VERSION, CMD_CONNECT, 0, ATYP_IPV4, 10, 1, 0, 2, 0x1f, 0x90];
    const METHOD_SELECTED: [u8; 2] = [VERSION, NO_AUTH];

    type Outcome = std::io::Result<Result<SocketAddr, Reply>>;

    /// The handshake's result and every byte the listener wrote back.
    async fn run(client_bytes: &[u8]) -> (Outcome, Vec<u8>) {
        let (mut client, mut listener) = tokio::io::duplex(1024);
        client.write_all(client_bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), handshake(&mut listener)).await.expect("the handshake hung");
        if let Ok(Err(reply)) = outcome {
            reply_with(&mut listener, reply).await.unwrap();
        }
        drop(listener);
        let mut written = Vec::new();
        client.read_to_end(&mut written).await.unwrap();
        (outcome, written)
    }

    /// RFC 1928 section 6: VER, REP, RSV, then the bound address (IPv4 0.0.0.0:0).
    fn reply(code: u8) -> [u8; 10] {
        [VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
    }

    fn invalid_data(outcome: Outcome) -> String {
        let error = outcome.expect_err("the handshake went on");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        error.to_string()
    }

    #[tokio::test]
    async fn connect_to_an_ipv4_address() {
        let (outcome, written) = run(&[&GREETING[..], &CONNECT_IPV4].concat()).await;
        assert_eq!(outcome.unwrap(), Ok(SocketAddr::from(([10, 1, 0, 2], 8080))));
        // The success reply waits for the tunnel (`session`).
        assert_eq!(written, METHOD_SELECTED);
    }

    #[tokio::test]
    async fn connect_to_an_ipv6_address_with_no_auth_among_other_methods() {
        let ip: Ipv6Addr = "fd00::2".parse().unwrap();
        // Offers GSSAPI and username/password before "no authentication".
        let greeting = [VERSION, 3, 1, 2, NO_AUTH];
        let request = [&[VERSION, CMD_CONNECT, 0, ATYP_IPV6][..], &ip.octets(), &443u16.to_be_bytes()].concat();
        let (outcome, written) = run(&[&greeting[..], &request].concat()).await;
        assert_eq!(outcome.unwrap(), Ok(SocketAddr::new(IpAddr::V6(ip), 443)));
        assert_eq!(written, METHOD_SELECTED);
    }

    #[tokio::test]
    async fn domain_names_are_refused_with_address_type_not_supported() {
        let name = b"api.shop";
        let request = [&[VERSION, CMD_CONNECT, 0, ATYP_DOMAIN, name.len() as u8][..], name, &[0, 80]].concat();
        let (outcome, written) = run(&[&GREETING[..], &request].concat()).await;
        assert_eq!(outcome.unwrap(), Err(Reply::AddressTypeNotSupported));
        assert_eq!(written, [&METHOD_SELECTED[..], &reply(8)].concat());
    }

    #[tokio::test]
    async fn unknown_address_type_is_refused_with_address_type_not_supported() {
        let mut request = CONNECT_IPV4;
        request[3] = 9;
        let (outcome, written) = run(&[&GREETING[..], &request].concat()).await;
        assert_eq!(outcome.unwrap(), Err(Reply::AddressTypeNotSupported));
        assert_eq!(written, [&METHOD_SELECTED[..], &reply(8)].concat());
    }

    #[tokio::test]
    async fn bind_and_udp_associate_are_refused_with_command_not_supported() {
        for command in [2, 3] {
            let mut request = CONNECT_IPV4;
            request[1] = command;
            let (outcome, written) = run(&[&GREETING[..], &request].concat()).await;
            assert_eq!(outcome.unwrap(), Err(Reply::CommandNotSupported), "command {command}");
            assert_eq!(written, [&METHOD_SELECTED[..], &reply(7)].concat(), "command {command}");
        }
    }

    #[tokio::test]
    async fn socks4_is_refused_without_a_reply() {
        // A SOCKS4 CONNECT to 10.1.0.2:8080 (user ID empty).
        let (outcome, written) = run(&[4, 1, 0x1f, 0x90, 10, 1, 0, 2, 0]).await;
        assert_eq!(invalid_data(outcome), "not SOCKS5");
        assert!(written.is_empty(), "{written:?}");
    }

    #[tokio::test]
    async fn request_with_another_version_is_refused() {
        let mut request = CONNECT_IPV4;
        request[0] = 4;
        let (outcome, written) = run(&[&GREETING[..], &request].concat()).await;
        assert_eq!(invalid_data(outcome), "bad SOCKS5 request version");
        assert_eq!(written, METHOD_SELECTED);
    }

    #[tokio::test]
    async fn client_without_no_auth_gets_no_acceptable_methods() {
        // Username/password only, then no method at all.
        for greeting in [&[VERSION, 1, 2][..], &[VERSION, 0]] {
            let (outcome, written) = run(&[greeting, &CONNECT_IPV4].concat()).await;
            assert_eq!(invalid_data(outcome), "client offers no acceptable method", "{greeting:?}");
            assert_eq!(written, [VERSION, NO_ACCEPTABLE_METHOD], "{greeting:?}");
        }
    }

    #[tokio::test]
    async fn eof_anywhere_in_the_handshake_ends_it() {
        let whole = [&GREETING[..], &CONNECT_IPV4].concat();
        let (outcome, _) = run(&whole).await;
        assert!(matches!(outcome, Ok(Ok(_))), "the whole handshake is good: {outcome:?}");
        for cut in 0..whole.len() {
            let (outcome, written) = run(&whole[..cut]).await;
            let error = outcome.expect_err("a truncated handshake succeeded");
            assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "cut at {cut}");
            // The method is selected once the greeting is whole, and nothing else is written.
            let expected: &[u8] = if cut >= GREETING.len() { &METHOD_SELECTED } else { &[] };
            assert_eq!(written, expected, "cut at {cut}");
        }
    }

    #[test]
    fn connect_failures_map_to_rfc_1928_reply_codes() {
        use hyper::StatusCode;
        let target = SocketAddr::from(([10, 1, 0, 2], 8080));
        let proxy = SocketAddr::from(([10, 1, 0, 2], 15008));
        let io = std::io::Error::from;
        let cases = [
            (OutboundError::PassthroughDenied(target), 2),
            (OutboundError::NoSourceIdentity(target), 2),
            (TunnelError::Refused(proxy, StatusCode::FORBIDDEN).into(), 2),
            (TunnelError::Refused(proxy, StatusCode::SERVICE_UNAVAILABLE).into(), 5),
            (TunnelError::Refused(proxy, StatusCode::NOT_FOUND).into(), 4),
            (OutboundError::Direct(target, io(std::io::ErrorKind::ConnectionRefused)), 5),
            (OutboundError::Direct(target, io(std::io::ErrorKind::TimedOut)), 4),
            // The proxy, not the target, refused: the target is unreachable.
            (TunnelError::Connect(proxy, io(std::io::ErrorKind::ConnectionRefused)).into(), 4),
            (TunnelError::Timeout(proxy).into(), 4),
            (TunnelError::Tls(proxy, std::io::Error::other("handshake failed")).into(), 1),
            (TunnelError::TlsConfig(proxy, crate::tls::ClientConfigError::NoTrustBundle).into(), 1),
        ];
        for (error, code) in cases {
            assert_eq!(reply_for(&error) as u8, code, "{error}");
        }
    }
}
