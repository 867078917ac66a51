//! The accept loop every data-path listener shares, what it does when the process is out of file descriptors, and
//! the IPv6 twin of an IPv4 listener.
//!
//! Out of descriptors (`EMFILE`/`ENFILE`), `accept` fails and the pending connection stays in the kernel's backlog:
//! retrying only would leave its client hanging until the backlog overflows. So the process keeps one descriptor in
//! reserve (`/dev/null`); on exhaustion the loop gives it up, accepts the oldest pending connection, closes it at
//! once (the client sees the connection end, not a hang), counts it (`trellis_connections_shed_total{listener}`) and
//! takes the reserve again. Both the shed connections and the accept errors are logged through a rate limit
//! ([`crate::log_limit::ACCEPT_ERRORS`]), so a flood costs a bounded number of lines.
//!
//! Every proxied connection wants `TCP_NODELAY` (requests and answers are small and must not wait for an ACK). A
//! socket `accept` returns inherits it from its listener (Linux), so it is set once on the listener here rather than
//! once per connection: one system call fewer per accepted connection.

use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::log_limit::ACCEPT_ERRORS;

/// Pause after an accept error that shedding could not clear (no reserve descriptor, or another error).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The descriptor given up to shed a connection when the process has none left; shared by every listener.
static RESERVE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Opens the reserve descriptor if it is not held (at start, and again after each shed connection).
fn take_reserve() -> bool {
    let mut reserve = RESERVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if reserve.is_none() {
        *reserve = std::fs::File::open("/dev/null").ok();
    }
    reserve.is_some()
}

/// Closes the reserve descriptor, so that one `accept` can succeed; whether there was one.
fn release_reserve() -> bool {
    let file = RESERVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    file.is_some()
}

/// Whether an accept error means the process (or the system) is out of file descriptors.
pub fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Accepts connections until the task running it is dropped, handling each in its own task. An accept error
/// never ends the listener: out of descriptors, the oldest pending connection is closed at once (see the module
/// comment); any other error is logged and retried after a pause.
pub async fn accept_each<F, Fut>(listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    take_reserve();
    if let Err(error) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
        tracing::warn!(listener = what, %error, "cannot set TCP_NODELAY on the listener: accepted connections may wait on Nagle");
    }
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tokio::spawn(handle(tcp, peer));
            }
            Err(e) if out_of_descriptors(&e) && release_reserve() => {
                // The pending connection is ready, so this completes at once; a peer that reset it meanwhile
                // leaves nothing to accept, and the loop goes on.
                let shed = tokio::time::timeout(Duration::ZERO, listener.accept()).await;
                if let Ok(Ok((tcp, peer))) = shed {
                    // Closed before the reserve is taken again: its descriptor is the one the reserve gets back.
                    drop(tcp);
                    crate::metrics::connection_shed(what);
                    if ACCEPT_ERRORS.allow(what) {
                        tracing::warn!(listener = what, %peer, error = %e,
                            "connection closed at once: out of file descriptors");
                    }
                }
                take_reserve();
            }
            Err(e) => {
                if ACCEPT_ERRORS.allow(what) {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                // Descriptors freed meanwhile: hold the reserve again, for the next shortage.
                take_reserve();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emfile_and_enfile_are_out_of_descriptors_and_other_errors_are_not() {
        assert!(out_of_descriptors(&std::io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(out_of_descriptors(&std::io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!out_of_descriptors(&std::io::Error::from_raw_os_error(libc::ECONNABORTED)));
        assert!(!out_of_descriptors(&std::io::Error::other("no errno")));
    }

    #[tokio::test]
    async fn accepted_connections_have_tcp_nodelay_from_the_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // The same socket, to see the option arrive (a connection whose handshake completed before it keeps the
        // default: the proxy's loops start before any client knows the port).
        let probe = socket2::SockRef::from(&listener).try_clone().unwrap();
        let (seen, mut nodelay) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_each(listener, "test", move |tcp, _| {
            let seen = seen.clone();
            async move {
                let _ = seen.send(tcp.nodelay().unwrap());
            }
        }));
        let set = async {
            while !probe.tcp_nodelay().unwrap() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), set).await.expect("TCP_NODELAY on the listener");
        let _client = TcpStream::connect(address).await.unwrap();
        let on = tokio::time::timeout(Duration::from_secs(10), nodelay.recv()).await.unwrap().unwrap();
        assert!(on, "the accepted socket has TCP_NODELAY (set on the listener only)");
        task.abort();

        // Control: a listener without it hands out sockets without it.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = plain.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());
    }
}
