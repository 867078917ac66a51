//! Who is on the other end of a Workload API connection: the Unix peer credentials the kernel recorded when the
//! caller connected (SO_PEERCRED: uid, gid, pid), and, read again for every call, the executable of that pid.
//!
//! The pid is the only credential that can go stale: the process may exit and its number be reused by another
//! process while the connection (passed on or inherited) stays open. So the process's start time (/proc/PID/stat,
//! field 22) is recorded at accept, and each call reads it again before and after reading /proc/PID/exe: the path
//! counts only if all three start times agree, i.e. the executable read is that of the process that connected.
//! uid and gid come from the socket and cannot change.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::UnixStream;

/// What the kernel recorded about the caller at connect time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The pid's start time at accept (clock ticks since boot); `None` when the process was already gone.
    start_time: Option<u64>,
}

/// The caller as seen at one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The executable of the process that connected, when it is still that process (see the module doc).
    pub exe: Option<PathBuf>,
}

impl Peer {
    /// Reads the credentials of a freshly accepted connection.
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        let cred = stream.peer_cred()?;
        Ok(Self::from_parts(cred.uid(), cred.gid(), cred.pid(), Path::new("/proc")))
    }

    fn from_parts(uid: u32, gid: u32, pid: Option<i32>, proc: &Path) -> Peer {
        let start_time = pid.and_then(|pid| start_time(proc, pid));
        Peer { uid, gid, pid, start_time }
    }

    /// The caller now: uid and gid as connected, the executable only while the pid is still the connector's.
    pub fn current(&self) -> Caller {
        self.current_in(Path::new("/proc"))
    }

    fn current_in(&self, proc: &Path) -> Caller {
        let exe = match (self.pid, self.start_time) {
            (Some(pid), Some(started)) => {
                let before = start_time(proc, pid);
                let exe = std::fs::read_link(proc.join(pid.to_string()).join("exe")).ok();
                let after = start_time(proc, pid);
                (before == Some(started) && after == Some(started)).then_some(exe).flatten()
            }
            _ => None,
        };
        Caller { uid: self.uid, gid: self.gid, pid: self.pid, exe }
    }
}

/// Field 22 of /proc/PID/stat (after the command name, which may itself hold spaces and parentheses).
fn start_time(proc: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the command: field 3 (state) is the first; field 22 is the 20th.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// An accepted connection with its peer credentials, which tonic hands to every request's extensions. The bytes
/// reach the server through the authority relay (`authority.rs`): `inner` is the server's end of a pipe the relay
/// tasks feed from the socket.
pub struct PeerStream {
    inner: DuplexStream,
    peer: Arc<Peer>,
}

/// The pipe between the relay and the server, per direction: small, so a connection holds little memory.
const PIPE_BYTES: usize = 16 * 1024;

impl PeerStream {
    /// Reads the credentials, then starts the relay tasks (they end when either side closes).
    pub fn new(socket: UnixStream) -> io::Result<Self> {
        let peer = Arc::new(Peer::of(&socket)?);
        let (server_end, relay_end) = tokio::io::duplex(PIPE_BYTES);
        let (from_client, mut to_client) = socket.into_split();
        let (mut from_server, to_server) = tokio::io::split(relay_end);
        tokio::spawn(async move {
            super::authority::log_end(super::authority::relay_client(from_client, to_server).await);
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            let _ = to_client.shutdown().await;
        });
        Ok(Self { inner: server_end, peer })
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Arc<Peer>;

    fn connect_info(&self) -> Arc<Peer> {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_process(dir: &Path, pid: i32, start: u64, exe: &str) {
        let p = dir.join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        let stat = format!("{pid} (a) b) S 1 1 1 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 10\n");
        std::fs::write(p.join("stat"), stat).unwrap();
        std::os::unix::fs::symlink(exe, p.join("exe")).unwrap();
    }

    /// A directory removed on drop (the crate has no tempfile dependency).
    mod tempfile_dir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!(
                    "trellis-peer-{}-{}",
                    std::process::id(),
                    crate::backoff::random_fraction()
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "42 (we (ird) name) S 1 1 1 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 777 1000 10";
        assert_eq!(parse_start_time(stat), Some(777));
        assert_eq!(parse_start_time("42 (x) S 1"), None);
    }

    #[test]
    fn the_path_counts_only_while_the_pid_is_the_connector() {
        let proc = tempfile_dir::Dir::new();
        fake_process(&proc.0, 4242, 1000, "/usr/bin/orders");
        let peer = Peer::from_parts(1000, 100, Some(4242), &proc.0);
        assert_eq!(peer.current_in(&proc.0).exe.as_deref(), Some(Path::new("/usr/bin/orders")));

        // The connector exits and the pid is reused by a process started later, running another binary.
        std::fs::remove_dir_all(proc.0.join("4242")).unwrap();
        fake_process(&proc.0, 4242, 2000, "/usr/bin/payments");
        let caller = peer.current_in(&proc.0);
        assert_eq!(caller.exe, None, "a reused pid must not lend its executable");
        assert_eq!((caller.uid, caller.gid), (1000, 100), "socket credentials stay");

        // A connector already gone at accept has no executable at all.
        let gone = Peer::from_parts(1000, 100, Some(999_999), &proc.0);
        assert_eq!(gone.current_in(&proc.0).exe, None);
    }

    #[test]
    fn real_socket_credentials_are_ours() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (a, _b) = UnixStream::pair().unwrap();
            let peer = Peer::of(&a).unwrap();
            let caller = peer.current();
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let uid: u32 = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .unwrap()
                .split_whitespace()
                .nth(2)
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(caller.uid, uid);
            assert_eq!(caller.pid, Some(std::process::id() as i32));
            assert_eq!(caller.exe, std::fs::read_link("/proc/self/exe").ok());
        });
    }
}
