//! Dialling from another network namespace: a thread that joined the namespace creates the sockets (a socket stays in
//! the namespace it was created in), and the benchmark's tasks connect them on their own runtime. This lets one
//! benchmark process be the client application of several simulated hosts, so that a proxy's capture rule (or the
//! one the suite installs for ztunnel) sees the load as it sees an application's traffic.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

enum Request {
    /// An unconnected non-blocking IPv4 socket, for the async side to connect.
    Socket(tokio::sync::oneshot::Sender<std::io::Result<tokio::net::TcpSocket>>),
    /// A blocking connect (for the load generators that run on threads of their own).
    Connect(SocketAddr, Duration, mpsc::Sender<std::io::Result<TcpStream>>),
}

/// The socket factory of one namespace; lives for the whole run (the suite leaks it, so that a `Route` stays `Copy`).
#[derive(Debug)]
pub struct NetnsDialer {
    ns: String,
    requests: mpsc::Sender<Request>,
}

impl NetnsDialer {
    /// Starts the thread in `/run/netns/<ns>`; fails if it cannot join the namespace.
    pub fn start(ns: &str) -> anyhow::Result<&'static Self> {
        let path = std::path::Path::new("/run/netns").join(ns);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (requests, incoming) = mpsc::channel::<Request>();
        let (joined, joined_rx) = mpsc::channel::<std::io::Result<()>>();
        std::thread::Builder::new().name(format!("dial-{ns}")).spawn(move || {
            // SAFETY: setns with a namespace descriptor this thread owns changes only this thread's network
            // namespace; the thread does nothing else than create sockets there.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let ok = if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            let failed = ok.is_err();
            let _ = joined.send(ok);
            if failed {
                return;
            }
            for request in incoming {
                match request {
                    Request::Socket(reply) => {
                        let _ = reply.send(tokio::net::TcpSocket::new_v4());
                    }
                    Request::Connect(addr, timeout, reply) => {
                        let _ = reply.send(TcpStream::connect_timeout(&addr, timeout));
                    }
                }
            }
        })?;
        match joined_rx.recv() {
            Ok(Ok(())) => Ok(Box::leak(Box::new(Self { ns: ns.into(), requests }))),
            Ok(Err(e)) => bail!("joining network namespace {ns}: {e}"),
            Err(_) => bail!("the dialling thread for {ns} ended before joining it"),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn gone(&self) -> std::io::Error {
        std::io::Error::other(format!("the dialling thread of namespace {} is gone", self.ns))
    }

    /// Connects to `addr` from the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let (reply, socket) = tokio::sync::oneshot::channel();
        self.requests.send(Request::Socket(reply)).map_err(|_| self.gone())?;
        let socket = socket.await.map_err(|_| self.gone())??;
        socket.connect(addr).await
    }

    /// Connects to `addr` from the namespace, blocking.
    pub fn connect_blocking(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let (reply, stream) = mpsc::channel();
        self.requests.send(Request::Connect(addr, timeout, reply)).map_err(|_| self.gone())?;
        stream.recv().map_err(|_| self.gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::process::Command;

    /// A namespace with only its loopback up, removed on drop.
    struct Namespace(String);

    impl Namespace {
        fn new(tag: &str) -> Self {
            let ns = format!("trl-{tag}-{}", std::process::id());
            let ip = |args: &[&str]| {
                let out = Command::new("ip").args(args).output().expect("run ip (root needed)");
                assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            };
            ip(&["netns", "add", &ns]);
            let created = Self(ns);
            ip(&["-n", &created.0, "link", "set", "lo", "up"]);
            created
        }
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
        }
    }

    /// A listener on the namespace's loopback that echoes one line; returns its address.
    fn echo_in(ns: &str) -> SocketAddr {
        let listener = trellis_tests::netns::in_netns(ns, || std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut buf = [0u8; 5];
                if stream.read_exact(&mut buf).is_ok() {
                    let _ = stream.write_all(&buf);
                }
            }
        });
        addr
    }

    #[test]
    fn sockets_are_made_in_the_namespace_the_dialler_joined() {
        let ns = Namespace::new("nsd");
        let addr = echo_in(&ns.0);
        // Control: the same address from this process's own namespace reaches no such listener.
        let here = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
            s.write_all(b"hello")?;
            let mut back = [0u8; 5];
            s.read_exact(&mut back).map(|_| back)
        });
        assert!(here.is_err(), "{addr} answered from the root namespace too, so the test would prove nothing");

        let dialer = NetnsDialer::start(&ns.0).expect("join the namespace");
        let mut blocking = dialer.connect_blocking(addr, Duration::from_secs(2)).expect("blocking connect");
        blocking.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        blocking.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");

        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let echoed = runtime.block_on(async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = dialer.connect(addr).await?;
            stream.write_all(b"async").await?;
            let mut back = [0u8; 5];
            stream.read_exact(&mut back).await?;
            std::io::Result::Ok(back)
        });
        assert_eq!(&echoed.expect("async connect"), b"async");
    }

    #[test]
    fn a_namespace_that_does_not_exist_is_an_error_naming_it() {
        let error = NetnsDialer::start("trl-no-such-namespace").expect_err("no such namespace");
        assert!(format!("{error:#}").contains("trl-no-such-namespace"), "{error:#}");
    }
}
