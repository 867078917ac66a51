//! Hosts as network namespaces (root needed): `Net::new("cap", 11, 4)` builds `trl-cap-0` .. `trl-cap-3` with
//! addresses 10.200.11.1 .. 10.200.11.4/24, each joined by a veth to a bridge that lives in its own namespace
//! (`trl-cap-br`), so the root namespace is never touched. Each test picks its own tag and subnet, so tests run in
//! parallel. Dropping the `Net` (also while a test panics) kills every process left in its namespaces and deletes
//! them. Any setup command that fails fails the test with that command's stderr.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One simulated host: a network namespace with one address on the shared bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The host's veth end in the bridge namespace: where `tcpdump` sees what crosses the wire.
    pub wire: String,
}

pub struct Net {
    bridge_ns: String,
    hosts: Vec<Host>,
}

impl Net {
    /// `hosts` namespaces on 10.200.`subnet`.0/24 (host i gets .i+1). Leftovers of a crashed run with the same tag
    /// are removed first.
    pub fn new(tag: &str, subnet: u8, hosts: usize) -> Net {
        assert!(tag.len() <= 8 && hosts < 200, "short tags keep namespace names readable");
        let bridge_ns = format!("trl-{tag}-br");
        let hosts: Vec<Host> = (0..hosts)
            .map(|i| Host {
                ns: format!("trl-{tag}-{i}"),
                ip: Ipv4Addr::new(10, 200, subnet, i as u8 + 1),
                wire: format!("h{i}"),
            })
            .collect();
        for ns in std::iter::once(&bridge_ns).chain(hosts.iter().map(|h| &h.ns)) {
            if std::path::Path::new("/run/netns").join(ns).exists() {
                kill_all_in(ns);
                let _ = Command::new("ip").args(["netns", "delete", ns]).status();
            }
        }
        // From here on, Drop cleans up whatever was created, also when a command below fails.
        let net = Net { bridge_ns, hosts };
        let br = net.bridge_ns.as_str();
        ip(&["netns", "add", br]);
        ip(&["-n", br, "link", "set", "lo", "up"]);
        ip(&["-n", br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", br, "link", "set", "br0", "up"]);
        for h in &net.hosts {
            ip(&["netns", "add", &h.ns]);
            ip(&["-n", br, "link", "add", &h.wire, "type", "veth", "peer", "name", "eth0", "netns", &h.ns]);
            ip(&["-n", br, "link", "set", &h.wire, "master", "br0", "up"]);
            ip(&["-n", &h.ns, "addr", "add", &format!("{}/24", h.ip), "dev", "eth0"]);
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &h.ns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Gives host `i` its IPv6 address too ([`Host::ipv6`]; no duplicate address detection, so it is usable at once).
    pub fn add_ipv6(&self, i: usize) {
        let h = &self.hosts[i];
        ip(&["-n", &h.ns, "addr", "add", &format!("{}/64", h.ipv6()), "dev", "eth0", "nodad"]);
    }

    /// `tcpdump` on host `i`'s wire (in the bridge namespace), writing a pcap; returns once it captures.
    pub fn capture_wire(&self, i: usize, pcap: &std::path::Path) -> Tcpdump {
        use std::io::BufRead;
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.bridge_ns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                &self.hosts[i].wire,
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
            ])
            .arg(pcap)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcpdump");
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.wait();
                panic!("tcpdump did not start: {line}");
            }
            if line.contains("listening on") {
                break;
            }
        }
        Tcpdump { child, pcap: pcap.to_owned() }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.hosts.iter().map(|h| &h.ns).chain(std::iter::once(&self.bridge_ns)) {
            kill_all_in(ns);
            let _ = Command::new("ip").args(["netns", "delete", ns]).stderr(Stdio::null()).status();
        }
    }
}

/// Kills every process running in namespace `ns` (all of them were started by the test that owns it).
fn kill_all_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else { return };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).stderr(Stdio::null()).status();
    }
}

/// Runs `ip ARGS`, failing the test with its stderr.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

impl Host {
    /// `program` run inside this host's namespace.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        command(Some(&self.ns), program)
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// The IPv6 address beside `ip` (`10.200.S.N` → `fd00:7472:S::N`, in the tests' fd00:7472::/48), once
    /// [`Net::add_ipv6`] gave it.
    pub fn ipv6(&self) -> Ipv6Addr {
        let [_, _, subnet, n] = self.ip.octets();
        Ipv6Addr::new(0xfd00, 0x7472, subnet.into(), 0, 0, 0, 0, n.into())
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ipv6(), port))
    }

    /// A TCP connection made from inside this host, as any application there would make it (so capture rules
    /// apply to it).
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        connect_in(Some(&self.ns), addr)
    }

    /// `nft list ruleset` in this host.
    pub fn nft_ruleset(&self) -> String {
        let out = self.cmd("nft").args(["list", "ruleset"]).output().expect("run nft");
        assert!(out.status.success(), "nft list ruleset: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Starts a background process in this host, killed on drop.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Background {
        let child = self
            .cmd(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in {}: {e}", self.ns));
        Background(child)
    }
}

/// `program`, prefixed with `ip netns exec NS` when a namespace is given (`ip` execs it: the pid is the program's).
pub fn command(netns: Option<&str>, program: impl AsRef<OsStr>) -> Command {
    match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
    }
}

#[allow(unsafe_code)]
unsafe extern "C" {
    fn setns(fd: i32, nstype: i32) -> i32;
}
const CLONE_NEWNET: i32 = 0x4000_0000;

/// Runs `f` on a thread that joined namespace `ns` (sockets it creates stay in that namespace wherever used).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Starts `f` on a new thread that joined namespace `ns` first (every socket it creates, e.g. with a tokio runtime
/// of its own, is in that namespace) and returns at once.
#[allow(unsafe_code)]
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = std::path::Path::new("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: setns on a valid namespace fd affects only this thread, which ends after `f`.
        let rc = unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
        f()
    })
}

/// Connects to `addr` from namespace `netns` (or this one).
pub fn connect_in(netns: Option<&str>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let connect = move || TcpStream::connect_timeout(&addr, Duration::from_secs(5));
    match netns {
        None => connect(),
        Some(ns) => in_netns(ns, connect),
    }
}

/// A background process, killed on drop.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running tcpdump; `finish` stops it and returns the TCP payloads it saw.
pub struct Tcpdump {
    child: Child,
    pcap: std::path::PathBuf,
}

/// One captured TCP segment (SYNs and ACKs too: `payload` empty).
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Tcpdump {
    /// Stops the capture (SIGINT: tcpdump flushes) and parses the pcap: every TCP segment, IPv4 or IPv6.
    pub fn finish(mut self) -> Vec<Segment> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        parse_pcap(&std::fs::read(&self.pcap).expect("read pcap"))
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Classic pcap (microsecond or nanosecond, either byte order), Ethernet link type.
fn parse_pcap(bytes: &[u8]) -> Vec<Segment> {
    assert!(bytes.len() >= 24, "pcap too short");
    let little = match bytes[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let v: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        if little { u32::from_le_bytes(v) } else { u32::from_be_bytes(v) }
    };
    assert_eq!(u32_at(bytes, 20), 1, "expected Ethernet link type");
    let mut segments = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32_at(bytes, at + 8) as usize;
        let Some(frame) = bytes.get(at + 16..at + 16 + len) else { break };
        at += 16 + len;
        if let Some(segment) = segment(frame) {
            segments.push(segment);
        }
    }
    segments
}

/// The TCP segment in an Ethernet frame (IPv4, or IPv6 without extension headers), if it holds one.
fn segment(frame: &[u8]) -> Option<Segment> {
    let (ip, header, total, src, dst): (&[u8], usize, usize, std::net::IpAddr, std::net::IpAddr) =
        match frame.get(12..14)? {
            [0x08, 0x00] => {
                let ip = frame.get(14..)?;
                if ip.len() < 20 || ip[9] != 6 {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
                let (src, dst) = (<[u8; 4]>::try_from(&ip[12..16]).ok()?, <[u8; 4]>::try_from(&ip[16..20]).ok()?);
                (ip, usize::from(ip[0] & 0x0f) * 4, total, src.into(), dst.into())
            }
            [0x86, 0xdd] => {
                let ip = frame.get(14..)?;
                if ip.len() < 40 || ip[6] != 6 {
                    return None;
                }
                let total = (40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))).min(ip.len());
                let (src, dst) = (<[u8; 16]>::try_from(&ip[8..24]).ok()?, <[u8; 16]>::try_from(&ip[24..40]).ok()?);
                (ip, 40, total, src.into(), dst.into())
            }
            _ => return None,
        };
    let tcp = ip.get(header..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let offset = (usize::from(tcp[12] >> 4) * 4).min(tcp.len());
    Some(Segment {
        src: SocketAddr::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        payload: tcp[offset..].to_vec(),
    })
}
