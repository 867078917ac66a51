//! The socket options the capture rules work with. Every TCP connection the proxy opens (tunnels to other proxies,
//! passthrough, local workloads, the control plane) is dialled here, so that each socket carries the capture mark
//! (SO_MARK) and the capture rules let it out instead of redirecting it back to the proxy; and a connection the
//! rules redirected to the proxy tells its real destination here (SO_ORIGINAL_DST).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::net::{TcpSocket, TcpStream};

/// The mark set on every socket the proxy dials; 0 = none. Set once at startup.
static MARK: AtomicU32 = AtomicU32::new(0);
/// Cleared after the first EPERM: an unprivileged proxy (no CAP_NET_ADMIN) dials unmarked instead of failing.
static MARKING: AtomicBool = AtomicBool::new(true);

/// Sets the mark every later dial applies.
pub fn set_mark(mark: u32) {
    MARK.store(mark, Ordering::Relaxed);
}

/// Connects to `address` from a socket carrying the proxy's mark.
pub async fn connect(address: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
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

/// The destination of an accepted connection before the kernel's REDIRECT/TPROXY rewrite.
pub fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let socket = socket2::SockRef::from(tcp);
    let original = match tcp.local_addr().ok()? {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    original.ok()?.as_socket()
}
