//! The socket options the capture rules work with. Every TCP connection the proxy opens (tunnels to other proxies,
//! passthrough, local workloads, the control plane) is dialled here, so that each socket carries the capture mark
//! (SO_MARK) and the capture rules let it out instead of redirecting it back to the proxy; and a connection the
//! rules redirected to the proxy tells its real destination here (SO_ORIGINAL_DST). With
//! `capture.preserveSourceAddress`, [`connect_from`] dials a local workload from its client's address
//! (IP_TRANSPARENT / IPV6_TRANSPARENT and a bind to that address); the capture rules' return route brings the
//! workload's answers back.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// The mark set on every socket the proxy dials; 0 = none. Set once at startup.
static MARK: AtomicU32 = AtomicU32::new(0);
/// Cleared after the first EPERM: an unprivileged proxy (no CAP_NET_ADMIN) dials unmarked instead of failing.
static MARKING: AtomicBool = AtomicBool::new(true);

/// Whether [`connect_from`] dials from the client's address; set once capture and its return route are installed,
/// cleared after the first refusal (no CAP_NET_ADMIN, or a kernel without IP_TRANSPARENT).
static PRESERVE_SOURCE: AtomicBool = AtomicBool::new(false);

/// Turns source-address preservation on or off for later dials.
pub fn set_preserve_source(on: bool) {
    PRESERVE_SOURCE.store(on, Ordering::Relaxed);
}

/// Whether dials to local workloads currently keep their clients' addresses.
pub fn preserves_source() -> bool {
    PRESERVE_SOURCE.load(Ordering::Relaxed)
}

/// Sets the mark every later dial applies.
pub fn set_mark(mark: u32) {
    MARK.store(mark, Ordering::Relaxed);
}

/// Connects to `address` from a socket carrying the proxy's mark.
pub async fn connect(address: SocketAddr) -> std::io::Result<TcpStream> {
    connect_from(address, None).await
}

/// Connects to `address` as [`connect`] does, from `source` (any port) when given, of the same family, and
/// preservation is on. A refused IP_TRANSPARENT turns preservation off with one warning and dials from the proxy's
/// own address, as without it.
pub async fn connect_from(address: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(source) = source.filter(|s| s.is_ipv4() == address.is_ipv4() && preserves_source()) {
        transparent(&socket, source, address)?;
    }
    let mark = MARK.load(Ordering::Relaxed);
    if mark != 0
        && MARKING.load(Ordering::Relaxed)
        && let Err(e) = socket2::SockRef::from(&socket).set_mark(mark)
    {
        if e.kind() != std::io::ErrorKind::PermissionDenied {
            return Err(e);
        }
        if MARKING.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                mark,
                "cannot set SO_MARK (needs CAP_NET_ADMIN): the proxy's own connections are unmarked, so capture \
                 rules, if installed, would redirect them back to the proxy"
            );
        }
    }
    let stream = socket.connect(address).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Makes `socket` transparent and binds it to `source`; on a refusal turns preservation off (warning once) and
/// leaves the socket as it was. Other errors (the address is in use on every port) fail the dial.
fn transparent(socket: &TcpSocket, source: IpAddr, destination: SocketAddr) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    let set = if source.is_ipv4() { sock.set_ip_transparent_v4(true) } else { sock.set_ip_transparent_v6(true) };
    if let Err(e) = set {
        if PRESERVE_SOURCE.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                error = %e,
                "cannot set IP_TRANSPARENT (needs CAP_NET_ADMIN and kernel support): workloads see the proxy's \
                 address as their clients' from now on"
            );
        }
        return Ok(());
    }
    socket.bind(SocketAddr::new(source, 0)).inspect_err(|e| {
        tracing::debug!(%source, %destination, error = %e, "cannot bind the transparent socket to the client's address");
    })
}

/// Resolves `host:port` and connects to the first address that answers (the control plane's address may be a name).
pub async fn connect_host(address: String) -> std::io::Result<TcpStream> {
    let mut last = None;
    for resolved in tokio::net::lookup_host(&address).await? {
        match connect(resolved).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{address}: no address"))))
}

/// The destination of an accepted connection from `peer` before the kernel's REDIRECT/TPROXY rewrite. The address
/// family is the peer's (the one `accept` returned), so this costs one system call, not two.
pub fn original_destination(tcp: &TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(tcp);
    let original = match peer {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    original.ok()?.as_socket()
}
