//! The accept loop every data-path listener shares, and the IPv6 twin of an IPv4 listener.

use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Accepts connections until the task running it is dropped, handling each in its own task. An accept error
/// (out of file descriptors, say) is logged and retried after a pause instead of ending the listener.
pub async fn accept_each<F, Fut>(listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tokio::spawn(handle(tcp, peer));
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The IPv6 twin of a listener bound to `bound` (the kernel's port): `[::]` for `0.0.0.0`, `[::1]` for `127.0.0.1`,
/// same port, IPV6_V6ONLY so that it does not collide with the IPv4 one. `None` for other addresses, and where IPv6
/// is unavailable or the port taken (logged: IPv6 workloads are then unreachable through this listener, as before).
pub fn ipv6_twin(bound: SocketAddr, field: &'static str) -> Option<TcpListener> {
    let ip = match bound {
        SocketAddr::V4(v4) if v4.ip().is_unspecified() => Ipv6Addr::UNSPECIFIED,
        SocketAddr::V4(v4) if v4.ip().is_loopback() => Ipv6Addr::LOCALHOST,
        _ => return None,
    };
    let address = SocketAddr::new(ip.into(), bound.port());
    let listen = || -> std::io::Result<TcpListener> {
        let socket = tokio::net::TcpSocket::new_v6()?;
        socket.set_reuseaddr(true)?;
        socket2::SockRef::from(&socket).set_only_v6(true)?;
        socket.bind(address)?;
        socket.listen(1024)
    };
    match listen() {
        Ok(listener) => {
            tracing::info!(listener = field, %address, "listening (IPv6)");
            Some(listener)
        }
        Err(error) => {
            tracing::warn!(listener = field, %address, %error, "cannot listen on IPv6: IPv6 workloads are unreachable here");
            None
        }
    }
}
