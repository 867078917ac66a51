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
    // The port is then chosen by `connect`, for the 4-tuple: a bind to port 0 would choose it alone, among ports no
    // other socket holds, TIME_WAIT ones included, and under churn the range runs out (every connection of the last
    // minute holds one). Without the option (an old kernel) the bind chooses, as before.
    if let Err(e) = defer_port_choice(socket) {
        tracing::debug!(error = %e, "cannot set IP_BIND_ADDRESS_NO_PORT: the bind picks the port");
    }
    socket.bind(SocketAddr::new(source, 0)).inspect_err(|e| {
        tracing::debug!(%source, %destination, error = %e, "cannot bind the transparent socket to the client's address");
    })
}

/// Sets IP_BIND_ADDRESS_NO_PORT on `socket`: a later bind to port 0 takes the address only, and `connect` picks the
/// port (socket2 and tokio have no setter for it).
#[allow(unsafe_code)]
fn defer_port_choice(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: `socket` owns the descriptor for the call's duration; the value is a c_int of the length given, as
    // setsockopt(2) reads it, and the kernel copies it before returning.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A transparent socket is bound to its client's address without a port, and `connect` picks one (the
    /// address-only bind that keeps churn from running out of ports); the plain bind beside it, through the same
    /// call, takes a port at once. Needs root (IP_TRANSPARENT), as CI runs it.
    #[tokio::test]
    async fn a_transparent_dial_leaves_the_port_to_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.1".parse().unwrap();

        let socket = TcpSocket::new_v4().unwrap();
        transparent(&socket, source, server).unwrap();
        let bound = socket.local_addr().unwrap();
        assert_eq!(bound.ip(), source, "not bound to the client's address (IP_TRANSPARENT needs root)");
        assert_eq!(bound.port(), 0, "the bind chose a port");
        let stream = socket.connect(server).await.unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        assert_eq!(peer, stream.local_addr().unwrap());
        assert_ne!(peer.port(), 0);
        assert_eq!(peer.ip(), source);
        drop(accepted);

        // Control: the same bind without the option takes its port at once.
        let plain = TcpSocket::new_v4().unwrap();
        plain.bind(SocketAddr::new(source, 0)).unwrap();
        assert_ne!(plain.local_addr().unwrap().port(), 0);
    }
}
