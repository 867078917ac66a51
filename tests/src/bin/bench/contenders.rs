//! The contenders of the suite and how a client reaches the servers through each: direct TCP, two Trellis proxies
//! (SOCKS5 → HBONE mTLS → server proxy), a stunnel4 pair and an HAProxy pair (client side → mutual TLS 1.3 →
//! server side), the last two with ECDSA P-256 certificates the suite makes with rcgen.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::TcpStream;
use trellis_tests::{ControlPlane, Proxy, ProxyOptions, WorkloadSpec, free_port};

use super::nsdial::NetnsDialer;
use crate::common::{self, step};

/// The bench servers' address: the server proxy's workload owns it.
pub const SERVER_IP: [u8; 4] = [127, 0, 20, 2];
const CLIENT_IP: [u8; 4] = [127, 0, 20, 1];
/// stunnel's client and server sides, then HAProxy's.
const STUNNEL_IPS: ([u8; 4], [u8; 4]) = ([127, 0, 30, 1], [127, 0, 30, 2]);
const HAPROXY_IPS: ([u8; 4], [u8; 4]) = ([127, 0, 40, 1], [127, 0, 40, 2]);
const SERVER_NAME: &str = "server.bench";

/// What a connection is for: the bulk sink or the HTTP/1.1 responder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Sink,
    Http,
}

/// An address per target.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub sink: SocketAddr,
    pub http: SocketAddr,
}

impl Ports {
    pub fn get(&self, target: Target) -> SocketAddr {
        match target {
            Target::Sink => self.sink,
            Target::Http => self.http,
        }
    }
}

/// How a client reaches a target.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// TCP straight to the servers.
    Direct(Ports),
    /// SOCKS5 CONNECT to `proxy` naming the server's address (Trellis' client proxy).
    Socks5 { proxy: SocketAddr, servers: Ports },
    /// TCP to a forwarder's listener, one per target (stunnel's and HAProxy's client side).
    Forward(Ports),
    /// TCP to the servers from a client host (network namespace), where a redirect rule may hand the connection to
    /// the host's proxy, as an application's would be (`trellis-bench all --ztunnel`, see `netpath.rs`).
    Netns { from: &'static NetnsDialer, servers: Ports },
}

impl Route {
    pub async fn dial(self, target: Target) -> std::io::Result<TcpStream> {
        let stream = match self {
            Route::Direct(ports) | Route::Forward(ports) => TcpStream::connect(ports.get(target)).await?,
            Route::Socks5 { proxy, servers } => common::socks5::connect_async(proxy, servers.get(target)).await?,
            Route::Netns { from, servers } => from.connect(servers.get(target)).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    pub fn dial_blocking(self, target: Target) -> std::io::Result<std::net::TcpStream> {
        let timeout = Duration::from_secs(10);
        let stream = match self {
            Route::Direct(ports) | Route::Forward(ports) => {
                std::net::TcpStream::connect_timeout(&ports.get(target), timeout)?
            }
            Route::Socks5 { proxy, servers } => common::socks5::connect(proxy, servers.get(target), timeout)?,
            Route::Netns { from, servers } => from.connect_blocking(servers.get(target), timeout)?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// One contender: its name, its route, and the proxy processes whose CPU and memory it costs.
#[derive(Clone, Debug)]
pub struct Contender {
    pub name: &'static str,
    pub route: Route,
    pub pids: Vec<u32>,
    /// Descriptors one tunnelled connection holds in its busiest process (a forwarder's accepted and dialled
    /// sockets; a Trellis proxy's one socket, the tunnel being a stream of a shared HTTP/2 connection).
    pub fds_per_connection: u64,
    /// A cap the software sets itself (stunnel derives one from its open-files limit).
    pub max_connections: Option<usize>,
}

/// Installs stunnel4 and HAProxy from Debian when they are missing (as root), else fails saying how to.
pub fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [("stunnel", "stunnel4"), ("haproxy", "haproxy")]
        .into_iter()
        .filter(|(command, _)| which(command).is_none())
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "{} not installed and not running as root: install them with `sudo apt-get install -y {}`",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    eprintln!("installing {} (apt-get)", missing.join(", "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::from(std::io::stderr()))
            .status()
    };
    if !install().context("running apt-get")?.success() {
        Command::new("apt-get").args(["update", "-q"]).stdout(Stdio::from(std::io::stderr())).status()?;
        if !install()?.success() {
            bail!("apt-get install -y {} failed", missing.join(" "));
        }
    }
    Ok(())
}

fn which(command: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(command)).find(|p| p.exists())
}

/// The exact versions of the contenders' software, one line each.
pub fn versions() -> Vec<String> {
    let first_lines = |program: &str, args: &[&str], n: usize| -> String {
        match Command::new(program).args(args).output() {
            Ok(out) => {
                let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                text.lines()
                    .filter(|l| !l.trim().is_empty() && !l.contains("inetd mode"))
                    .take(n)
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join("; ")
            }
            Err(e) => format!("{program}: {e}"),
        }
    };
    vec![
        format!("stunnel: `{}`", first_lines("stunnel", &["-version"], 3)),
        format!("HAProxy: `{}`", first_lines("haproxy", &["-v"], 1)),
    ]
}

/// A CA and two leaf certificates (server, client) for the stunnel and HAProxy pairs, as PEM files in `dir`.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Certificate then key, as HAProxy's `crt` wants them.
    pub server_bundle: PathBuf,
    pub client_bundle: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let ca_key = KeyPair::generate_for(alg)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "trellis-bench CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let leaf = |name: &str| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate_for(alg)?;
            let mut params = CertificateParams::new(vec![name.to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages =
                vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            Ok((params.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
        };
        let (server_pem, server_key_pem) = leaf(SERVER_NAME)?;
        let (client_pem, client_key_pem) = leaf("client.bench")?;
        Ok(Self {
            ca: write("ca.crt", &ca_cert.pem())?,
            server_cert: write("server.crt", &server_pem)?,
            server_key: write("server.key", &server_key_pem)?,
            client_cert: write("client.crt", &client_pem)?,
            client_key: write("client.key", &client_key_pem)?,
            server_bundle: write("server.pem", &format!("{server_pem}{server_key_pem}"))?,
            client_bundle: write("client.pem", &format!("{client_pem}{client_key_pem}"))?,
        })
    }
}

/// A contender's process (stunnel or haproxy), killed on drop.
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Daemon {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name: name.into(), log, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections, failing with the log if the process exits first.
    fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited with {status}:\n{}", self.name, trellis_tests::read_log(&self.log));
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("{} is not listening on {addr} after 20s:\n{}", self.name, trellis_tests::read_log(&self.log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// Listen addresses of a forwarding pair: the client side's per target, the server side's per target.
fn pair_ports(ips: ([u8; 4], [u8; 4])) -> (Ports, Ports) {
    let client = Ports { sink: addr(ips.0, free_port()), http: addr(ips.0, free_port()) };
    let server = Ports { sink: addr(ips.1, free_port()), http: addr(ips.1, free_port()) };
    (client, server)
}

/// A stunnel pair: client stunnel (TLS client with its certificate, verifying the server's chain and name) →
/// server stunnel (requiring and verifying the client's certificate) → the servers. TLS 1.3 only.
pub fn start_stunnel(dir: &Path, certs: &Certs, servers: Ports) -> anyhow::Result<(Contender, Vec<Daemon>)> {
    let (front, back) = pair_ports(STUNNEL_IPS);
    // Logs to its stderr (a file) only: with no syslog daemon, its syslog lines would go to the console, which on
    // this machine is a serial port (measured: 17 ms of CPU per connection).
    let global = "foreground = yes\nsyslog = no\npid =\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
    let mut server_conf = global.to_owned();
    let mut client_conf = global.to_owned();
    for (name, target) in [("sink", Target::Sink), ("http", Target::Http)] {
        server_conf.push_str(&format!(
            "[{name}]\naccept = {}\nconnect = {}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
             requireCert = yes\nsslVersionMin = TLSv1.3\n",
            back.get(target),
            servers.get(target),
            certs.server_cert.display(),
            certs.server_key.display(),
            certs.ca.display(),
        ));
        client_conf.push_str(&format!(
            "[{name}]\nclient = yes\naccept = {}\nconnect = {}\ncert = {}\nkey = {}\nCAfile = {}\nverifyChain = yes\n\
             checkHost = {SERVER_NAME}\nsni = {SERVER_NAME}\nsslVersionMin = TLSv1.3\n",
            front.get(target),
            back.get(target),
            certs.client_cert.display(),
            certs.client_key.display(),
            certs.ca.display(),
        ));
    }
    let mut daemons = Vec::new();
    for (side, conf, listen) in [("server", server_conf, back), ("client", client_conf, front)] {
        let path = dir.join(format!("stunnel-{side}.conf"));
        std::fs::write(&path, conf)?;
        let mut command = Command::new("stunnel");
        command.arg(&path);
        let mut daemon = Daemon::spawn(&format!("stunnel ({side})"), command, dir.join(format!("stunnel-{side}.log")))?;
        daemon.wait_listening(listen.sink)?;
        daemon.wait_listening(listen.http)?;
        daemons.push(daemon);
    }
    let pids = daemons.iter().map(Daemon::pid).collect();
    // stunnel 5 allows itself 125/256 of its open-files limit as clients (its debug log says "Clients allowed=").
    let max_connections = daemons
        .iter()
        .filter_map(|d| super::procfs::open_files_limit(d.pid()).ok())
        .map(|limit| usize::try_from(limit.saturating_mul(125) / 256).unwrap_or(usize::MAX))
        .min();
    let contender =
        Contender { name: "stunnel", route: Route::Forward(front), pids, fds_per_connection: 2, max_connections };
    Ok((contender, daemons))
}

/// An HAProxy pair in TCP mode: the client side's backends dial the server side over TLS 1.3 with the client
/// certificate, verifying the server's chain and name; the server side requires and verifies the client's.
/// `maxconn` sizes it (HAProxy needs two descriptors per connection and refuses to start without them).
pub fn start_haproxy(
    dir: &Path,
    certs: &Certs,
    servers: Ports,
    maxconn: u64,
) -> anyhow::Result<(Contender, Vec<Daemon>)> {
    let (front, back) = pair_ports(HAPROXY_IPS);
    let global = format!(
        "global\n    maxconn {maxconn}\n\ndefaults\n    mode tcp\n    maxconn {maxconn}\n    timeout connect 5s\n    \
         timeout client 1h\n    timeout server 1h\n\n"
    );
    let mut server_conf = global.clone();
    let mut client_conf = global;
    for (name, target) in [("sink", Target::Sink), ("http", Target::Http)] {
        server_conf.push_str(&format!(
            "frontend {name}\n    bind {} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3\n    \
             default_backend {name}\n\nbackend {name}\n    server s {}\n\n",
            back.get(target),
            certs.server_bundle.display(),
            certs.ca.display(),
            servers.get(target),
        ));
        client_conf.push_str(&format!(
            "frontend {name}\n    bind {}\n    default_backend {name}\n\nbackend {name}\n    server s {} ssl crt {} \
             ca-file {} verify required verifyhost {SERVER_NAME} sni str({SERVER_NAME}) ssl-min-ver TLSv1.3\n\n",
            front.get(target),
            back.get(target),
            certs.client_bundle.display(),
            certs.ca.display(),
        ));
    }
    let mut daemons = Vec::new();
    for (side, conf, listen) in [("server", server_conf, back), ("client", client_conf, front)] {
        let path = dir.join(format!("haproxy-{side}.cfg"));
        std::fs::write(&path, conf)?;
        let check = Command::new("haproxy").arg("-c").arg("-f").arg(&path).output()?;
        if !check.status.success() {
            bail!("haproxy -c -f {}: {}", path.display(), String::from_utf8_lossy(&check.stderr));
        }
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&path);
        let mut daemon = Daemon::spawn(&format!("haproxy ({side})"), command, dir.join(format!("haproxy-{side}.log")))?;
        daemon.wait_listening(listen.sink)?;
        daemon.wait_listening(listen.http)?;
        daemons.push(daemon);
    }
    let pids = daemons.iter().map(Daemon::pid).collect();
    Ok((
        Contender { name: "HAProxy", route: Route::Forward(front), pids, fds_per_connection: 2, max_connections: None },
        daemons,
    ))
}

/// The Trellis mesh: a control plane and two proxies; the server proxy's workload owns the servers' address and
/// both ports. Passthrough is denied, so a connection that works went through the tunnel.
pub struct Mesh {
    pub client: Proxy,
    pub server: Proxy,
    _cp: ControlPlane,
}

static PROXY_WORKER_THREADS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// `--worker-threads N`: the proxies' `workerThreads` for this run (an experiment; the default is the proxy's own).
pub fn set_proxy_worker_threads(n: u64) {
    let _ = PROXY_WORKER_THREADS.set(n);
}

/// The `--worker-threads` of this run, if any.
pub fn proxy_worker_threads() -> Option<u64> {
    PROXY_WORKER_THREADS.get().copied()
}

/// A control plane and two proxies: `bench-client` fronting the client address, `bench-server` fronting the
/// servers' address with `server_ports`. Passthrough is denied, so a connection that works went through the tunnel.
/// Returns once the client proxy knows the servers' workload.
pub fn start_mesh(server_ports: &[u16]) -> anyhow::Result<(ControlPlane, Proxy, Proxy)> {
    start_mesh_with(server_ports, None)
}

/// `start_mesh`, with the proxies running `binary` instead of the workspace's `trellis-proxy` when given.
pub fn start_mesh_with(server_ports: &[u16], binary: Option<&Path>) -> anyhow::Result<(ControlPlane, Proxy, Proxy)> {
    let cp = step("starting the control plane", &[], || Ok(ControlPlane::start(&[])))?;
    let mut options =
        ProxyOptions { passthrough: Some("deny"), binary: binary.map(Path::to_path_buf), ..ProxyOptions::default() };
    if let Some(n) = proxy_worker_threads() {
        options.extra.insert("workerThreads".into(), n.into());
    }
    let client_spec = WorkloadSpec::new("client", "bench", "client", &IpAddr::from(CLIENT_IP).to_string());
    let mut server_spec = WorkloadSpec::new("servers", "bench", "servers", &IpAddr::from(SERVER_IP).to_string());
    server_spec.ports = server_ports.iter().map(|p| (*p, "tcp")).collect();
    let client = step("starting the client proxy", &[], || {
        Ok(Proxy::start_with(&cp, "bench-client", &[client_spec], options.clone()))
    })?;
    let server = step("starting the server proxy", &[], || {
        Ok(Proxy::start_with(&cp, "bench-server", &[server_spec], options.clone()))
    })?;
    step("waiting for the proxies", &mesh_logs(&client, &server), || {
        client.wait_ready();
        server.wait_ready();
        let ip = IpAddr::from(SERVER_IP).to_string();
        client.wait_config("the servers' workload in the client proxy's registry", |d| {
            d["workloads"].to_string().contains(&ip)
        });
        Ok(())
    })?;
    Ok((cp, client, server))
}

/// The proxies' logs, shown when a step fails.
pub fn mesh_logs(client: &Proxy, server: &Proxy) -> [(&'static str, std::path::PathBuf); 2] {
    [("client proxy", client.log_path()), ("server proxy", server.log_path())]
}

/// A mesh of its own as the contender `name`, its proxies running `binary` (default: the workspace's).
pub fn start_trellis(servers: Ports, name: &'static str, binary: Option<&Path>) -> anyhow::Result<(Contender, Mesh)> {
    let (cp, client, server) = start_mesh_with(&[servers.sink.port(), servers.http.port()], binary)?;
    if let (Some(c), Some(s)) = (client.pid(), server.pid()) {
        // For profilers to attach to (bench/profile-bulk.sh reads this line).
        eprintln!("{name} proxies: client pid {c}, server pid {s}");
    }
    let pids = [client.pid(), server.pid()].into_iter().flatten().collect();
    let route = Route::Socks5 { proxy: client.socks5_addr, servers };
    Ok((
        Contender { name, route, pids, fds_per_connection: 1, max_connections: None },
        Mesh { client, server, _cp: cp },
    ))
}
