//! The proxy's configuration file (`trellis-proxy run --config proxy.yaml`).
//!
//! Parsed in two steps: serde reads the YAML shape strictly (unknown fields are errors), then `validate`
//! turns strings into typed values and reports every problem at once, each prefixed by the field's path so
//! an operator can find it (`workloads[1].addresses[0]: "10.0.0.300" is not an IP address`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use trellis_proto::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Yaml { path: PathBuf, source: serde_yaml_ng::Error },
    #[error("{path}: invalid configuration:\n  {}", .problems.join("\n  "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub control_plane: ControlPlane,
    pub state_dir: PathBuf,
    pub workloads: Vec<WorkloadConfig>,
    pub listen: Listen,
    /// `host:port` other proxies use to reach this one's HBONE listener; port 0 stands for the port `listen.hbone`
    /// is bound to ([`Config::advertised_hbone_address`]).
    pub hbone_address: String,
    pub log_format: LogFormat,
    pub outbound: Outbound,
    /// How long SIGTERM waits for open connections before exiting.
    pub drain_timeout: std::time::Duration,
    /// When a proxied connection that carries nothing is closed.
    pub connection: Connection,
    /// Namespace whose policies apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    pub capture: Capture,
    /// Allowed clock difference for JWT `exp`/`nbf` (RequestAuthentication).
    pub jwt_clock_skew: std::time::Duration,
    /// Threads of the async runtime that carries every connection.
    pub worker_threads: usize,
    /// Where the SPIFFE Workload API is served (`None`: not served).
    pub workload_api: Option<WorkloadApiListen>,
}

/// `connection`: timeouts of proxied connections (`None`: off, written `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// `idleTimeout`: no byte either way for this long closes the connection (HBONE stream and the connection
    /// behind it alike).
    pub idle_timeout: Option<std::time::Duration>,
    /// `writeStallTimeout`: a peer that takes no byte of what the proxy holds for it for this long (a destination
    /// that accepts and never reads) closes the connection.
    pub write_stall_timeout: Option<std::time::Duration>,
}

/// `connection.idleTimeout` when none is configured: Envoy's TCP proxy default (`idle_timeout`, 1 h, which Istio
/// keeps), long enough for connections that are quiet by design (a database pool, a push channel with hourly
/// traffic) and short enough that abandoned ones do not pile up.
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
/// `connection.writeStallTimeout` when none is configured: a reader that takes no byte for 5 minutes while bytes
/// wait for it is gone or wedged; what it pins is a 256 KiB copy buffer per direction and the stream's window.
pub const DEFAULT_WRITE_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl Default for Connection {
    fn default() -> Self {
        Self { idle_timeout: Some(DEFAULT_IDLE_TIMEOUT), write_stall_timeout: Some(DEFAULT_WRITE_STALL_TIMEOUT) }
    }
}

/// `listen.workloadApi` when none is configured (/work/shared/README.md).
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "/run/trellis/workload.sock";

/// The SPIFFE Workload API's Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadApiListen {
    pub path: PathBuf,
    /// Permission bits of the socket file (who may connect; attestation decides what they get).
    pub mode: u32,
}

/// One attestation selector of a workload (`workloads[].attest`): what a Workload API caller's Unix peer
/// credentials must show. A workload matches a caller when every one of its selectors does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The caller's user ID (SO_PEERCRED, as of connect).
    Uid(u32),
    /// The caller's primary group ID (SO_PEERCRED, as of connect).
    Gid(u32),
    /// The caller's executable (/proc/PID/exe), an absolute path.
    Path(PathBuf),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Uid(uid) => write!(f, "uid:{uid}"),
            Selector::Gid(gid) => write!(f, "gid:{gid}"),
            Selector::Path(path) => write!(f, "path:{}", path.display()),
        }
    }
}

/// `workerThreads` when none is configured: two, as ztunnel, on hosts with more than two CPUs; one on smaller hosts,
/// where a second worker has no CPU of its own. Measured on 2 vCPUs (BENCHMARKS.md): with two workers the client
/// proxy made two futex calls per request (a worker waking the other to find nothing), with one none, and one
/// worker gave more throughput and less CPU per request at 4000 requests/s. One worker is a current-thread runtime
/// (`main.rs`).
pub fn default_worker_threads() -> usize {
    match std::thread::available_parallelism().map_or(1, |n| n.get()) {
        0..=2 => 1,
        _ => 2,
    }
}

/// The most `workerThreads` may ask for.
pub const MAX_WORKER_THREADS: u64 = 64;

/// Transparent capture (`run --capture`, `capture install`): what the nftables rules leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// SO_MARK on every socket the proxy dials; packets carrying it are never redirected.
    pub mark: u32,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<trellis_policy::Cidr>,
    pub exclude_inbound_ports: Vec<u16>,
    /// Dial local workloads from the client workload's address (IP_TRANSPARENT), with the policy routing that
    /// brings their answers back to the proxy. Only with capture on.
    pub preserve_source_address: bool,
    /// The mark (on the packet, restored from the connection's conntrack mark) of a workload's answers to a
    /// preserved-source connection; `ip rule fwmark <returnMark> lookup <routeTable>` delivers them locally.
    pub return_mark: u32,
    /// The routing table holding `local default dev lo` for [`Capture::return_mark`].
    pub route_table: u32,
}

/// `capture.mark` when none is configured (ASCII "tr").
pub const DEFAULT_CAPTURE_MARK: u32 = 0x7472;
/// `capture.returnMark` when none is configured.
pub const DEFAULT_RETURN_MARK: u32 = 0x7473;
/// `capture.routeTable` when none is configured.
pub const DEFAULT_ROUTE_TABLE: u32 = 7472;

/// Outbound behaviour: what to do with destinations outside the mesh, and who the SOCKS5 listener speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub passthrough: Passthrough,
    /// Index into `workloads` of the workload SOCKS5 clients act as (a loopback client has no workload address);
    /// `None` disables the SOCKS5 listener.
    pub socks5_workload: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Passthrough {
    /// Destinations outside the mesh are reached as plain TCP.
    #[default]
    Allow,
    /// Destinations outside the mesh are refused.
    Deny,
}

#[derive(Clone)]
pub struct ControlPlane {
    /// `host:port` of each control-plane replica's gRPC endpoint, in the order they are tried (`address` or
    /// `addresses` in the file; never empty).
    pub addresses: Vec<String>,
    /// SHA-256 of the mesh root's SubjectPublicKeyInfo: the only trust before the proxy has joined.
    pub ca_pin: [u8; 32],
    /// Join token; needed only until the node credential is stored in `stateDir`.
    pub token: Option<String>,
}

// Hand-written so the join token never reaches a log line.
impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("addresses", &self.addresses)
            .field("ca_pin", &hex::encode(self.ca_pin))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadConfig {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<PortConfig>,
    /// Who may fetch this workload's SVID from the Workload API (empty: nobody).
    pub attest: Vec<Selector>,
    /// Where to write this workload's application SVID as files (`workloads[].svidFiles`).
    pub svid_files: Option<SvidFilesConfig>,
}

/// `workloads[].svidFiles`: the application SVID written as `svid.pem`, `svid_key.pem` and `bundle.pem` in `dir`,
/// owned by `owner`, for programs that only read files; after each write `command` runs and `signal` is sent to the
/// pid in `pid_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidFilesConfig {
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// argv, run without a shell.
    pub command: Vec<String>,
    /// (signal number, its name) and the file holding the pid to send it to.
    pub signal: Option<(i32, String, PathBuf)>,
}

/// The signals `svidFiles.signal` may name.
const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", libc::SIGHUP),
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGTERM", libc::SIGTERM),
    ("SIGINT", libc::SIGINT),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortConfig {
    pub port: u16,
    pub protocol: Protocol,
}

/// What a workload port speaks, which decides how the destination proxy serves streams to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Opaque bytes, relayed as they come.
    Tcp,
    /// HTTP/1.1 upstream: every request checked; HTTP/2 callers are translated to HTTP/1.1.
    Http,
    /// h2c upstream (prior knowledge): every request checked; HTTP/1.1 callers are translated to HTTP/2.
    Http2,
    /// h2c upstream with gRPC semantics: refusals are trailers-only responses with a `grpc-status`.
    Grpc,
}

/// Names accepted for `ports[].protocol`: Istio's protocol names and Kubernetes `appProtocol` values (compared
/// ignoring ASCII case), with the protocol each one means here. TLS-carrying names are opaque to the proxy.
const PROTOCOL_NAMES: &[(&str, Protocol)] = &[
    ("tcp", Protocol::Tcp),
    ("tls", Protocol::Tcp),
    ("https", Protocol::Tcp),
    ("mongo", Protocol::Tcp),
    ("mysql", Protocol::Tcp),
    ("redis", Protocol::Tcp),
    ("kubernetes.io/wss", Protocol::Tcp),
    ("http", Protocol::Http),
    ("kubernetes.io/ws", Protocol::Http),
    ("http2", Protocol::Http2),
    ("kubernetes.io/h2c", Protocol::Http2),
    ("grpc", Protocol::Grpc),
    ("grpc-web", Protocol::Grpc),
];

impl Protocol {
    /// A declared protocol name (see [`PROTOCOL_NAMES`]); the error says why a name is refused.
    pub fn parse(name: &str) -> Result<Protocol, String> {
        if let Some((_, p)) = PROTOCOL_NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            return Ok(*p);
        }
        let known: Vec<&str> = PROTOCOL_NAMES.iter().map(|(n, _)| *n).collect();
        if ["udp", "http_proxy"].iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(format!("{name:?} is not supported by Trellis (supported: {})", known.join(", ")));
        }
        Err(format!("{name:?} is not a known protocol (one of: {})", known.join(", ")))
    }

    /// The canonical name (`config_dump`, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }

    /// Whether streams to the port are served as HTTP (each request checked).
    pub fn is_http(self) -> bool {
        self != Protocol::Tcp
    }

    pub fn to_proto(self) -> trellis_proto::v1::Protocol {
        use trellis_proto::v1;
        match self {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Http => v1::Protocol::Http,
            Protocol::Http2 => v1::Protocol::Http2,
            Protocol::Grpc => v1::Protocol::Grpc,
        }
    }

    /// From the wire (`None`: unspecified or unknown to this proxy).
    pub fn from_proto(p: trellis_proto::v1::Protocol) -> Option<Protocol> {
        use trellis_proto::v1;
        match p {
            v1::Protocol::Tcp => Some(Protocol::Tcp),
            v1::Protocol::Http => Some(Protocol::Http),
            v1::Protocol::Http2 => Some(Protocol::Http2),
            v1::Protocol::Grpc => Some(Protocol::Grpc),
            v1::Protocol::Unspecified => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub hbone: SocketAddr,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub socks5: SocketAddr,
    pub admin: SocketAddr,
    /// `listen.adminAllowRemote`: the operator accepts an admin address other hosts can reach (the admin endpoint
    /// has no authentication: `/config_dump`, `POST /logging`).
    pub admin_allow_remote: bool,
    pub metrics: SocketAddr,
    pub ready: SocketAddr,
}

impl Config {
    /// The HBONE address to advertise to the control plane once `listen.hbone` is bound to `bound_port`:
    /// `hboneAddress` as configured, with port 0 (which `listen.hbone` with port 0 implies when `hboneAddress` is
    /// unset) replaced by the bound port.
    pub fn advertised_hbone_address(&self, bound_port: u16) -> String {
        match self.hbone_address.rsplit_once(':') {
            Some((host, "0")) => format!("{host}:{bound_port}"),
            _ => self.hbone_address.clone(),
        }
    }
}

impl WorkloadConfig {
    /// `<namespace>/<name>`, the workload's key on the wire.
    pub fn key(&self) -> String {
        trellis_proto::workload_key(&self.namespace, &self.name)
    }

    /// The workload as declared in the Hello message (control-plane-set fields left empty).
    pub fn to_proto(&self) -> trellis_proto::v1::Workload {
        use trellis_proto::v1;
        v1::Workload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            addresses: self.addresses.iter().map(ToString::to_string).collect(),
            ports: self
                .ports
                .iter()
                .map(|p| v1::Port { port: u32::from(p.port), protocol: p.protocol.to_proto() as i32 })
                .collect(),
            node: String::new(),
            proxy_address: String::new(),
            spiffe_id: String::new(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ParseError::Yaml(source) => ConfigError::Yaml { path: path.to_owned(), source },
            ParseError::Invalid(problems) => ConfigError::Invalid { path: path.to_owned(), problems },
        })
    }

    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(ParseError::Yaml)?;
        raw.validate().map_err(ParseError::Invalid)
    }
}

#[derive(Debug)]
pub enum ParseError {
    Yaml(serde_yaml_ng::Error),
    Invalid(Vec<String>),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Yaml(e) => write!(f, "{e}"),
            ParseError::Invalid(problems) => write!(f, "{}", problems.join("\n")),
        }
    }
}

// ---------------------------------------------------------------------------
// The YAML shape, before validation.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    node: String,
    control_plane: RawControlPlane,
    state_dir: String,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    listen: RawListen,
    hbone_address: Option<String>,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default)]
    outbound: RawOutbound,
    drain_timeout: Option<String>,
    #[serde(default)]
    connection: RawConnection,
    root_namespace: Option<String>,
    #[serde(default)]
    capture: RawCapture,
    jwt_clock_skew: Option<String>,
    worker_threads: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConnection {
    idle_timeout: Option<String>,
    write_stall_timeout: Option<String>,
}

impl RawConnection {
    fn validate(&self, p: &mut Problems) -> Connection {
        // `0` (any zero duration) turns a timeout off.
        let timeout = |p: &mut Problems, field: &str, text: Option<&str>, default| match text {
            None => Some(default),
            Some(text) => match humantime::parse_duration(text.trim()) {
                Ok(d) if d.is_zero() => None,
                Ok(d) => Some(d),
                Err(e) => {
                    p.add(field, format!("{text:?}: {e} (a duration such as 30s, 5m or 1h; 0 turns it off)"));
                    None
                }
            },
        };
        Connection {
            idle_timeout: timeout(p, "connection.idleTimeout", self.idle_timeout.as_deref(), DEFAULT_IDLE_TIMEOUT),
            write_stall_timeout: timeout(
                p,
                "connection.writeStallTimeout",
                self.write_stall_timeout.as_deref(),
                DEFAULT_WRITE_STALL_TIMEOUT,
            ),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCapture {
    mark: Option<u64>,
    #[serde(default)]
    exclude_outbound_ports: Vec<u64>,
    #[serde(default)]
    exclude_outbound_cidrs: Vec<String>,
    #[serde(default)]
    exclude_inbound_ports: Vec<u64>,
    preserve_source_address: Option<bool>,
    return_mark: Option<u64>,
    route_table: Option<u64>,
}

impl RawCapture {
    fn validate(&self, p: &mut Problems) -> Capture {
        let mark = match self.mark {
            None => DEFAULT_CAPTURE_MARK,
            Some(m) => u32::try_from(m).ok().filter(|m| *m != 0).unwrap_or_else(|| {
                p.add("capture.mark", format!("{m} is not in 1..4294967295"));
                DEFAULT_CAPTURE_MARK
            }),
        };
        let mut ports = |field: &str, list: &[u64]| -> Vec<u16> {
            (list.iter().enumerate())
                .filter_map(|(i, n)| match u16::try_from(*n) {
                    Ok(port) if port != 0 => Some(port),
                    _ => {
                        p.add(&format!("capture.{field}[{i}]"), format!("{n} is not in 1..65535"));
                        None
                    }
                })
                .collect()
        };
        let exclude_outbound_ports = ports("excludeOutboundPorts", &self.exclude_outbound_ports);
        let exclude_inbound_ports = ports("excludeInboundPorts", &self.exclude_inbound_ports);
        let exclude_outbound_cidrs = (self.exclude_outbound_cidrs.iter().enumerate())
            .filter_map(|(i, text)| {
                text.parse::<trellis_policy::Cidr>()
                    .map_err(|_| {
                        p.add(&format!("capture.excludeOutboundCidrs[{i}]"), format!("{text:?} is not a CIDR"))
                    })
                    .ok()
            })
            .collect();
        let return_mark = match self.return_mark {
            None => DEFAULT_RETURN_MARK,
            Some(m) => match u32::try_from(m) {
                Ok(m) if m != 0 && m != mark => m,
                _ => {
                    p.add("capture.returnMark", format!("{m} is not in 1..4294967295 or equals capture.mark"));
                    DEFAULT_RETURN_MARK
                }
            },
        };
        let route_table = match self.route_table {
            None => DEFAULT_ROUTE_TABLE,
            // 0 is unspecified, 253..255 are the kernel's default, main and local tables.
            Some(t) => match u32::try_from(t) {
                Ok(t) if t != 0 && !(253..=255).contains(&t) => t,
                _ => {
                    p.add(
                        "capture.routeTable",
                        format!("{t} is not in 1..4294967295 or is a reserved table (253-255)"),
                    );
                    DEFAULT_ROUTE_TABLE
                }
            },
        };
        Capture {
            mark,
            exclude_outbound_ports,
            exclude_outbound_cidrs,
            exclude_inbound_ports,
            preserve_source_address: self.preserve_source_address.unwrap_or(true),
            return_mark,
            route_table,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOutbound {
    #[serde(default)]
    passthrough: Passthrough,
    socks5_workload: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawControlPlane {
    address: Option<String>,
    addresses: Option<Vec<String>>,
    ca_pin: String,
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkload {
    name: String,
    namespace: String,
    service_account: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    attest: Vec<RawSelector>,
    svid_files: Option<RawSvidFiles>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSvidFiles {
    dir: String,
    owner: String,
    #[serde(default)]
    command: Vec<String>,
    signal: Option<String>,
    pid_file: Option<String>,
}

impl RawSvidFiles {
    fn validate(self, at: &str, p: &mut Problems) -> Option<SvidFilesConfig> {
        let before = p.0.len();
        if !self.dir.starts_with('/') {
            p.add(&format!("{at}.dir"), format!("{:?} is not an absolute path", self.dir));
        }
        let owner = self.owner.split_once(':').and_then(|(u, g)| {
            let id = |t: &str| t.parse::<u32>().ok().filter(|n| *n != u32::MAX);
            Some((id(u)?, id(g)?))
        });
        if owner.is_none() {
            p.add(&format!("{at}.owner"), format!("{:?} is not \"uid:gid\" (numeric IDs)", self.owner));
        }
        if self.command.first().is_some_and(|c| c.is_empty()) {
            p.add(&format!("{at}.command"), "the program (first element) must not be empty");
        }
        let signal = match (self.signal, self.pid_file) {
            (None, None) => None,
            (Some(name), Some(pid_file)) => {
                let upper = name.to_ascii_uppercase();
                let full = if upper.starts_with("SIG") { upper } else { format!("SIG{upper}") };
                let number = SIGNALS.iter().find(|(n, _)| *n == full).map(|(_, s)| *s);
                if number.is_none() {
                    let known: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
                    p.add(&format!("{at}.signal"), format!("{name:?} is not one of {}", known.join(", ")));
                }
                if !pid_file.starts_with('/') {
                    p.add(&format!("{at}.pidFile"), format!("{pid_file:?} is not an absolute path"));
                }
                number.map(|n| (n, full, PathBuf::from(pid_file)))
            }
            (Some(_), None) => {
                p.add(&format!("{at}.pidFile"), "required with signal (the process to signal)");
                None
            }
            (None, Some(_)) => {
                p.add(&format!("{at}.signal"), "required with pidFile (what to send)");
                None
            }
        };
        let (uid, gid) = owner?;
        (p.0.len() == before).then(|| SvidFilesConfig {
            dir: PathBuf::from(self.dir),
            uid,
            gid,
            command: self.command,
            signal,
        })
    }
}

/// One selector: exactly one of its fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    uid: Option<u64>,
    gid: Option<u64>,
    path: Option<String>,
}

impl RawSelector {
    fn validate(self, at: &str, p: &mut Problems) -> Option<Selector> {
        let id = |field: &str, n: u64, p: &mut Problems| {
            u32::try_from(n).ok().filter(|n| *n != u32::MAX).or_else(|| {
                p.add(&format!("{at}.{field}"), format!("{n} is not a valid ID (0..4294967294)"));
                None
            })
        };
        match (self.uid, self.gid, self.path) {
            (Some(uid), None, None) => id("uid", uid, p).map(Selector::Uid),
            (None, Some(gid), None) => id("gid", gid, p).map(Selector::Gid),
            (None, None, Some(path)) if path.starts_with('/') => Some(Selector::Path(PathBuf::from(path))),
            (None, None, Some(path)) => {
                p.add(&format!("{at}.path"), format!("{path:?} is not an absolute path"));
                None
            }
            _ => {
                p.add(at, "must set exactly one of uid, gid, path (list several selectors to require several)");
                None
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPort {
    port: u64,
    protocol: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawListen {
    hbone: Option<String>,
    outbound: Option<String>,
    inbound: Option<String>,
    socks5: Option<String>,
    admin: Option<String>,
    #[serde(default)]
    admin_allow_remote: bool,
    metrics: Option<String>,
    ready: Option<String>,
    workload_api: Option<String>,
    workload_api_mode: Option<String>,
}

/// Collects problems instead of stopping at the first, so one run shows them all.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, field: &str, message: impl fmt::Display) {
        self.0.push(format!("{field}: {message}"));
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, Vec<String>> {
        let mut p = Problems::default();

        // The node name becomes a SPIFFE path segment (spiffe://<td>/trellis/node/<name>).
        if self.node.is_empty() {
            p.add("node", "must not be empty");
        } else if !is_path_segment(&self.node) {
            p.add("node", format!("{:?} may hold only letters, digits, '.', '-' and '_'", self.node));
        }

        let cp = &self.control_plane;
        let addresses = match (&cp.address, &cp.addresses) {
            (Some(_), Some(_)) => {
                p.add("controlPlane.addresses", "give either controlPlane.address or controlPlane.addresses, not both");
                vec![]
            }
            (None, None) => {
                p.add("controlPlane.address", "missing: set controlPlane.address or controlPlane.addresses");
                vec![]
            }
            (Some(address), None) => {
                if let Err(msg) = check_host_port(address, PortZero::Refused) {
                    p.add("controlPlane.address", format!("{address:?} {msg}"));
                }
                vec![address.clone()]
            }
            (None, Some(list)) => {
                if list.is_empty() {
                    p.add("controlPlane.addresses", "must not be empty");
                }
                for (i, address) in list.iter().enumerate() {
                    if let Err(msg) = check_host_port(address, PortZero::Refused) {
                        p.add(&format!("controlPlane.addresses[{i}]"), format!("{address:?} {msg}"));
                    } else if list[..i].contains(address) {
                        p.add(&format!("controlPlane.addresses[{i}]"), format!("{address:?} is listed twice"));
                    }
                }
                list.clone()
            }
        };
        let ca_pin = trellis_proto::tls::parse_pin(&cp.ca_pin).unwrap_or_else(|_| {
            p.add("controlPlane.caPin", format!("{:?} is not of the form sha256:<64 hex digits>", cp.ca_pin));
            [0; 32]
        });
        if cp.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            p.add("controlPlane.token", "must not be empty when set");
        }

        if self.state_dir.is_empty() {
            p.add("stateDir", "must not be empty");
        }

        let workloads = validate_workloads(self.workloads, &mut p);
        let listen = self.listen.validate(&mut p);
        let workload_api = self.listen.validate_workload_api(workloads.iter().any(|w| !w.attest.is_empty()), &mut p);
        let capture = self.capture.validate(&mut p);

        let hbone_address = match self.hbone_address {
            Some(addr) => {
                // Port 0: the port listen.hbone is bound to (the kernel's pick when that port is 0 too).
                if let Err(msg) = check_host_port(&addr, PortZero::Allowed) {
                    p.add("hboneAddress", format!("{addr:?} {msg}"));
                }
                addr
            }
            None => listen.hbone.to_string(),
        };

        // With a single workload SOCKS5 speaks for it by default; with several the operator must choose.
        let socks5_workload = match &self.outbound.socks5_workload {
            Some(name) => {
                let found = workloads.iter().position(|w| &w.name == name);
                if found.is_none() {
                    p.add("outbound.socks5Workload", format!("{name:?} is not one of the workloads"));
                }
                found
            }
            None if workloads.len() == 1 => Some(0),
            None => None,
        };
        let drain_timeout = match self.drain_timeout.as_deref() {
            None => std::time::Duration::from_secs(10),
            Some(text) => humantime::parse_duration(text).unwrap_or_else(|e| {
                p.add("drainTimeout", format!("{text:?}: {e}"));
                std::time::Duration::ZERO
            }),
        };

        let connection = self.connection.validate(&mut p);

        let jwt_clock_skew = match self.jwt_clock_skew.as_deref() {
            None => trellis_policy::DEFAULT_CLOCK_SKEW,
            Some(text) => humantime::parse_duration(text).unwrap_or_else(|e| {
                p.add("jwtClockSkew", format!("{text:?}: {e}"));
                std::time::Duration::ZERO
            }),
        };

        let worker_threads = match self.worker_threads {
            None => default_worker_threads(),
            Some(n @ 1..=MAX_WORKER_THREADS) => n as usize,
            Some(n) => {
                p.add("workerThreads", format!("{n} is not in 1..={MAX_WORKER_THREADS}"));
                1
            }
        };

        let root_namespace =
            self.root_namespace.clone().unwrap_or_else(|| trellis_policy::DEFAULT_ROOT_NAMESPACE.to_owned());
        check_dns_label(&mut p, "rootNamespace", &root_namespace);

        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(Config {
            outbound: Outbound { passthrough: self.outbound.passthrough, socks5_workload },
            drain_timeout,
            connection,
            root_namespace,
            capture,
            jwt_clock_skew,
            worker_threads,
            workload_api,
            node: self.node,
            control_plane: ControlPlane {
                addresses,
                ca_pin,
                token: self.control_plane.token.map(|t| t.trim().to_owned()),
            },
            state_dir: PathBuf::from(self.state_dir),
            workloads,
            listen,
            hbone_address,
            log_format: self.log_format,
        })
    }
}

fn validate_workloads(raw: Vec<RawWorkload>, p: &mut Problems) -> Vec<WorkloadConfig> {
    let mut seen_keys: HashMap<String, usize> = HashMap::new();
    let mut seen_addresses: HashMap<IpAddr, usize> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, w) in raw.into_iter().enumerate() {
        let at = format!("workloads[{i}]");
        check_dns_label(p, &format!("{at}.name"), &w.name);
        check_dns_label(p, &format!("{at}.namespace"), &w.namespace);
        if w.service_account.is_empty() {
            p.add(&format!("{at}.serviceAccount"), "must not be empty");
        }
        // The service account becomes a SPIFFE path segment.
        if !w.service_account.is_empty() && !is_path_segment(&w.service_account) {
            p.add(
                &format!("{at}.serviceAccount"),
                format!("{:?} may hold only letters, digits, '.', '-' and '_'", w.service_account),
            );
        }
        let key = trellis_proto::workload_key(&w.namespace, &w.name);
        if let Some(first) = seen_keys.insert(key.clone(), i) {
            p.add(&format!("{at}.name"), format!("duplicate workload {key:?} (also workloads[{first}])"));
        }
        for label in w.labels.keys() {
            if label.is_empty() {
                p.add(&format!("{at}.labels"), "label names must not be empty");
            }
        }

        if w.addresses.is_empty() {
            p.add(&format!("{at}.addresses"), "must list at least one IP address");
        }
        let mut addresses = Vec::with_capacity(w.addresses.len());
        for (j, a) in w.addresses.iter().enumerate() {
            match a.parse::<IpAddr>() {
                Ok(ip) => {
                    if let Some(first) = seen_addresses.insert(ip, i) {
                        p.add(
                            &format!("{at}.addresses[{j}]"),
                            format!("{ip} is already an address of workloads[{first}]"),
                        );
                    }
                    addresses.push(ip);
                }
                Err(_) => p.add(&format!("{at}.addresses[{j}]"), format!("{a:?} is not an IP address")),
            }
        }

        let mut ports = Vec::with_capacity(w.ports.len());
        let mut seen_ports = BTreeSet::new();
        for (j, port) in w.ports.iter().enumerate() {
            let protocol = Protocol::parse(&port.protocol)
                .map_err(|e| p.add(&format!("{at}.ports[{j}].protocol"), e))
                .unwrap_or(Protocol::Tcp);
            match u16::try_from(port.port) {
                Ok(n) if n != 0 => {
                    if !seen_ports.insert(n) {
                        p.add(&format!("{at}.ports[{j}].port"), format!("duplicate port {n}"));
                    }
                    ports.push(PortConfig { port: n, protocol });
                }
                _ => p.add(&format!("{at}.ports[{j}].port"), format!("{} is not in 1..65535", port.port)),
            }
        }

        let attest = (w.attest.into_iter().enumerate())
            .filter_map(|(j, selector)| selector.validate(&format!("{at}.attest[{j}]"), p))
            .collect();
        let svid_files = w.svid_files.and_then(|f| f.validate(&format!("{at}.svidFiles"), p));

        out.push(WorkloadConfig {
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
            labels: w.labels,
            addresses,
            ports,
            attest,
            svid_files,
        });
    }
    out
}

impl RawListen {
    fn validate(&self, p: &mut Problems) -> Listen {
        let mut field = |name: &str, value: &Option<String>, default: &str| -> SocketAddr {
            let text = value.as_deref().unwrap_or(default);
            text.parse().unwrap_or_else(|_| {
                p.add(&format!("listen.{name}"), format!("{text:?} is not a socket address (ip:port)"));
                default.parse().expect("default listen addresses are valid")
            })
        };
        let listen = Listen {
            hbone: field("hbone", &self.hbone, "0.0.0.0:15008"),
            outbound: field("outbound", &self.outbound, "127.0.0.1:15001"),
            inbound: field("inbound", &self.inbound, "0.0.0.0:15006"),
            socks5: field("socks5", &self.socks5, "127.0.0.1:15080"),
            admin: field("admin", &self.admin, "127.0.0.1:15000"),
            admin_allow_remote: self.admin_allow_remote,
            metrics: field("metrics", &self.metrics, "0.0.0.0:15020"),
            ready: field("ready", &self.ready, "0.0.0.0:15021"),
        };
        // The admin endpoint has no authentication (it shows the whole config and changes the log level): other
        // hosts must not reach it unless the operator says so.
        if !listen.admin.ip().is_loopback() && !listen.admin_allow_remote {
            p.add(
                "listen.admin",
                format!(
                    "{} is not a loopback address; the admin endpoint (/config_dump, POST /logging) has no \
                     authentication, so it listens on loopback only unless listen.adminAllowRemote is true",
                    listen.admin
                ),
            );
        }
        listen
    }
}

impl RawListen {
    /// The Workload API is served at `listen.workloadApi` (a path or `unix://` URI; `none` turns it off), by
    /// default at [`DEFAULT_WORKLOAD_API_SOCKET`] when some workload lists `attest` selectors (without them it would
    /// have nothing to hand out, and existing configs stay as they were).
    fn validate_workload_api(&self, any_attested: bool, p: &mut Problems) -> Option<WorkloadApiListen> {
        let mode = match self.workload_api_mode.as_deref() {
            None => 0o666,
            Some(text) => match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 => mode,
                _ => {
                    p.add("listen.workloadApiMode", format!("{text:?} is not an octal file mode (e.g. \"0660\")"));
                    0o666
                }
            },
        };
        let text = match self.workload_api.as_deref() {
            Some("none") => return None,
            Some(text) => text,
            None if any_attested => DEFAULT_WORKLOAD_API_SOCKET,
            None => return None,
        };
        let path = text.strip_prefix("unix://").unwrap_or(text);
        if !path.starts_with('/') || path.ends_with('/') {
            p.add(
                "listen.workloadApi",
                format!("{text:?} is not an absolute socket path or unix:///path URI (\"none\" turns it off)"),
            );
            return None;
        }
        Some(WorkloadApiListen { path: PathBuf::from(path), mode })
    }
}

/// Whether port 0 is meaningful in a `host:port` field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PortZero {
    Allowed,
    Refused,
}

/// `host:port` with a non-empty host and a port in 1..65535 (or 0, where `port_zero` allows it); `[v6]:port`
/// allowed.
fn check_host_port(s: &str, port_zero: PortZero) -> Result<(), &'static str> {
    let (host, port) = s.rsplit_once(':').ok_or("is not host:port")?;
    if host.is_empty() || host == "[]" {
        return Err("has an empty host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("needs brackets around an IPv6 host ([addr]:port)");
    }
    match port.parse::<u16>() {
        Ok(0) if port_zero == PortZero::Allowed => Ok(()),
        Ok(n) if n != 0 => Ok(()),
        _ if port_zero == PortZero::Allowed => Err("has no port in 0..65535"),
        _ => Err("has no port in 1..65535"),
    }
}

/// One SPIFFE ID path segment (checked through `SpiffeId` so the rules stay in one place).
fn is_path_segment(s: &str) -> bool {
    SpiffeId::parse(&format!("spiffe://example.org/{s}")).is_ok_and(|id| id.path() == s && !s.contains('/'))
}

/// An RFC 1123 label, as Kubernetes names and namespaces (the check the control plane applies to them too).
fn check_dns_label(p: &mut Problems, field: &str, value: &str) {
    match trellis_policy::check_dns1123_label(value) {
        Ok(()) => {}
        Err(e @ trellis_policy::InvalidDnsLabel::Empty) => p.add(field, e),
        Err(e) => p.add(field, format!("{value:?} is not a DNS label: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn minimal() -> String {
        format!(
            "node: node-a\ncontrolPlane:\n  address: 127.0.0.1:15012\n  caPin: {PIN}\n  token: abc.def\nstateDir: /tmp/x\n"
        )
    }

    #[test]
    fn full_example_parses() {
        let yaml = format!(
            r#"
node: node-a
controlPlane:
  address: cp.example:15012
  caPin: {PIN}
stateDir: /var/lib/trellis
workloads:
  - name: web
    namespace: shop
    serviceAccount: web-sa
    labels: {{app: web}}
    addresses: ["10.0.0.1", "fd00::1"]
    ports: [{{port: 8080, protocol: http}}, {{port: 9000, protocol: tcp}}]
listen:
  admin: 127.0.0.1:25000
hboneAddress: 192.168.1.10:15008
logFormat: json
jwtClockSkew: 30s
workerThreads: 4
"#
        );
        let c = Config::parse(&yaml).unwrap();
        assert_eq!(c.node, "node-a");
        assert_eq!(c.jwt_clock_skew, std::time::Duration::from_secs(30));
        assert_eq!(c.worker_threads, 4);
        assert_eq!(c.control_plane.token, None);
        assert_eq!(c.control_plane.addresses, ["cp.example:15012"]);
        assert_eq!(c.workloads[0].addresses.len(), 2);
        assert_eq!(c.workloads[0].ports[0], PortConfig { port: 8080, protocol: Protocol::Http });
        assert_eq!(c.listen.admin, "127.0.0.1:25000".parse().unwrap());
        assert_eq!(c.listen.outbound, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(c.hbone_address, "192.168.1.10:15008");
        assert_eq!(c.log_format, LogFormat::Json);
        let proto = c.workloads[0].to_proto();
        assert_eq!(proto.ports[0].protocol, trellis_proto::v1::Protocol::Http as i32);
        assert_eq!(proto.addresses, ["10.0.0.1", "fd00::1"]);
    }

    /// Istio's protocol names and Kubernetes appProtocol values are aliases, compared ignoring case.
    #[test]
    fn protocol_aliases() {
        let cases = [
            ("tcp", Protocol::Tcp),
            ("TLS", Protocol::Tcp),
            ("https", Protocol::Tcp),
            ("mongo", Protocol::Tcp),
            ("HTTP", Protocol::Http),
            ("kubernetes.io/ws", Protocol::Http),
            ("http2", Protocol::Http2),
            ("kubernetes.io/h2c", Protocol::Http2),
            ("GRPC", Protocol::Grpc),
            ("grpc-web", Protocol::Grpc),
        ];
        for (name, want) in cases {
            assert_eq!(Protocol::parse(name), Ok(want), "{name}");
            assert_eq!(Protocol::from_proto(want.to_proto()), Some(want));
        }
        for name in ["udp", "HTTP_PROXY", "", "h2", "thrift"] {
            assert!(Protocol::parse(name).is_err(), "{name}");
        }
    }

    #[test]
    fn shipped_example_is_valid() {
        let c = Config::parse(include_str!("../proxy.example.yaml")).unwrap();
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.hbone_address, "10.0.0.21:15008");
    }

    #[test]
    fn port_zero_in_the_hbone_address_is_the_bound_port() {
        let advertised =
            |extra: &str| Config::parse(&format!("{}{extra}", minimal())).unwrap().advertised_hbone_address(41234);
        assert_eq!(advertised("listen: {hbone: 0.0.0.0:0}\n"), "0.0.0.0:41234", "unset: listen.hbone, bound");
        assert_eq!(advertised("listen: {hbone: 0.0.0.0:0}\nhboneAddress: 10.0.0.5:0\n"), "10.0.0.5:41234");
        assert_eq!(advertised("hboneAddress: 10.0.0.5:15008\n"), "10.0.0.5:15008", "a port given is kept");
        assert_eq!(advertised("listen: {hbone: \"[::]:0\"}\n"), "[::]:41234");
    }

    #[test]
    fn defaults() {
        let c = Config::parse(&minimal()).unwrap();
        assert_eq!(c.listen.hbone, "0.0.0.0:15008".parse().unwrap());
        assert_eq!(c.listen.inbound, "0.0.0.0:15006".parse().unwrap());
        assert_eq!(c.listen.socks5, "127.0.0.1:15080".parse().unwrap());
        assert_eq!(c.listen.admin, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.listen.metrics, "0.0.0.0:15020".parse().unwrap());
        assert_eq!(c.listen.ready, "0.0.0.0:15021".parse().unwrap());
        assert_eq!(c.hbone_address, "0.0.0.0:15008");
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(c.workloads.is_empty());
        assert!(!format!("{c:?}").contains("abc.def"), "token must not appear in Debug output");
    }

    #[test]
    fn connection_timeouts_default_parse_and_turn_off_with_zero() {
        let parse = |extra: &str| Config::parse(&format!("{}{extra}", minimal())).map(|c| c.connection);
        let defaults = Connection {
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            write_stall_timeout: Some(DEFAULT_WRITE_STALL_TIMEOUT),
        };
        assert_eq!(parse("").unwrap(), defaults);
        assert_eq!(DEFAULT_IDLE_TIMEOUT, std::time::Duration::from_secs(3600));
        let set = parse("connection: {idleTimeout: 90s, writeStallTimeout: 2m}\n").unwrap();
        assert_eq!(set.idle_timeout, Some(std::time::Duration::from_secs(90)));
        assert_eq!(set.write_stall_timeout, Some(std::time::Duration::from_secs(120)));
        let off = parse("connection: {idleTimeout: \"0\", writeStallTimeout: 0s}\n").unwrap();
        assert_eq!(off, Connection { idle_timeout: None, write_stall_timeout: None });
        let error = parse("connection: {idleTimeout: soon}\n").unwrap_err().to_string();
        assert!(error.contains("connection.idleTimeout: \"soon\""), "{error}");
        let error = parse("connection: {writeStallTimeout: 5x}\n").unwrap_err().to_string();
        assert!(error.contains("connection.writeStallTimeout: \"5x\""), "{error}");
        let error = parse("connection: {idleTimout: 5m}\n").unwrap_err().to_string();
        assert!(error.contains("idleTimout"), "an unknown field is an error: {error}");
    }

    /// Each case appends YAML to a minimal config and expects one problem containing `want`.
    #[test]
    fn reports_errors_with_field_paths() {
        let workload = |extra: &str| {
            format!(
                "workloads:\n  - {{name: a, namespace: ns, serviceAccount: sa, addresses: [\"10.0.0.1\"]}}\n  - {{name: b, namespace: ns, serviceAccount: sa, {extra}}}\n"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (workload(r#"addresses: ["10.0.0.300"]"#), r#"workloads[1].addresses[0]: "10.0.0.300" is not an IP address"#),
            (workload(r#"addresses: []"#), "workloads[1].addresses: must list at least one IP address"),
            (workload(r#"addresses: ["10.0.0.1"]"#), "workloads[1].addresses[0]: 10.0.0.1 is already an address of workloads[0]"),
            (workload(r#"addresses: ["10.0.0.2"], ports: [{port: 0, protocol: tcp}]"#), "workloads[1].ports[0].port: 0 is not in 1..65535"),
            (workload(r#"addresses: ["10.0.0.2"], ports: [{port: 70000, protocol: tcp}]"#), "workloads[1].ports[0].port: 70000 is not in 1..65535"),
            (
                workload(r#"addresses: ["10.0.0.2"], ports: [{port: 80, protocol: tcp}, {port: 80, protocol: http}]"#),
                "workloads[1].ports[1].port: duplicate port 80",
            ),
            (
                "workloads:\n  - {name: a, namespace: ns, serviceAccount: sa, addresses: [\"10.0.0.1\"]}\n  - {name: a, namespace: ns, serviceAccount: sa, addresses: [\"10.0.0.2\"]}\n".into(),
                r#"workloads[1].name: duplicate workload "ns/a" (also workloads[0])"#,
            ),
            (
                "workloads:\n  - {name: a, namespace: ns, serviceAccount: \"a/b\", addresses: [\"10.0.0.1\"]}\n".into(),
                r#"workloads[0].serviceAccount: "a/b" may hold only"#,
            ),
            ("workloads:\n  - {name: Bad_Name, namespace: ns, serviceAccount: sa, addresses: [\"10.0.0.1\"]}\n".into(), "workloads[0].name: \"Bad_Name\" is not a DNS label: must be lowercase letters"),
            ("listen:\n  admin: localhost:15000\n".into(), r#"listen.admin: "localhost:15000" is not a socket address"#),
            ("listen:\n  bogus: 1.2.3.4:5\n".into(), "unknown field `bogus`"),
            ("listen:\n  admin: 0.0.0.0:15000\n".into(), "listen.admin: 0.0.0.0:15000 is not a loopback address"),
            ("listen:\n  admin: 10.0.0.1:15000\n".into(), "unless listen.adminAllowRemote is true"),
            ("listen:\n  admin: \"[::]:15000\"\n".into(), "listen.admin: [::]:15000 is not a loopback address"),
            ("listen:\n  adminAllowRemote: yes\n".into(), "listen.adminAllowRemote"),
            ("hboneAddress: nohost\n".into(), r#"hboneAddress: "nohost" is not host:port"#),
            ("logFormat: xml\n".into(), "unknown variant `xml`"),
            ("extra: 1\n".into(), "unknown field `extra`"),
            ("capture:\n  mark: 0\n".into(), "capture.mark: 0 is not in 1..4294967295"),
            ("capture:\n  excludeOutboundPorts: [22, 70000]\n".into(), "capture.excludeOutboundPorts[1]: 70000 is not"),
            ("capture:\n  excludeInboundPorts: [0]\n".into(), "capture.excludeInboundPorts[0]: 0 is not"),
            ("capture:\n  excludeOutboundCidrs: [10.0.0.0/33]\n".into(), "capture.excludeOutboundCidrs[0]: \"10.0.0.0/33\" is not a CIDR"),
            ("capture:\n  redirect: all\n".into(), "unknown field `redirect`"),
            ("capture:\n  returnMark: 29810\n".into(), "capture.returnMark: 29810 is not in 1..4294967295 or equals capture.mark"),
            ("capture:\n  routeTable: 254\n".into(), "capture.routeTable: 254 is not in 1..4294967295 or is a reserved table"),
            ("jwtClockSkew: soon\n".into(), "jwtClockSkew: \"soon\""),
            ("workerThreads: 0\n".into(), "workerThreads: 0 is not in 1..=64"),
            ("workerThreads: 65\n".into(), "workerThreads: 65 is not in 1..=64"),
            (
                workload(r#"addresses: ["10.0.0.2"], ports: [{port: 1, protocol: udp}]"#),
                r#"workloads[1].ports[0].protocol: "udp" is not supported by Trellis (supported: tcp, tls"#,
            ),
            (
                workload(r#"addresses: ["10.0.0.2"], ports: [{port: 1, protocol: tcp}, {port: 2, protocol: htp}]"#),
                r#"workloads[1].ports[1].protocol: "htp" is not a known protocol (one of: tcp, tls, https"#,
            ),
        ];
        for (extra, want) in cases {
            let yaml = format!("{}{extra}", minimal());
            let err = Config::parse(&yaml).expect_err(&yaml).to_string();
            assert!(err.contains(want), "config:\n{yaml}\nwant error containing {want:?}\ngot: {err}");
        }
    }

    /// Names and namespaces are RFC 1123 labels (the control plane's check); an empty one is refused by field.
    #[test]
    fn names_are_dns_labels() {
        let problems = |extra: &str| match Config::parse(&format!("{}{extra}", minimal())) {
            Err(ParseError::Invalid(problems)) => problems,
            other => panic!("expected validation errors, got {other:?}"),
        };
        let chars = "must be lowercase letters, digits and '-', starting and ending with a letter or digit";
        assert_eq!(problems("rootNamespace: \"\"\n"), ["rootNamespace: must not be empty"]);
        assert_eq!(problems("rootNamespace: Mesh\n"), [format!("rootNamespace: \"Mesh\" is not a DNS label: {chars}")]);
        let long = "a".repeat(64);
        assert_eq!(
            problems(&format!("rootNamespace: {long}\n")),
            [format!("rootNamespace: {long:?} is not a DNS label: must be at most 63 characters, found 64")]
        );
        let workload = |name: &str, namespace: &str| {
            format!(
                "workloads:\n  - {{name: {name:?}, namespace: {namespace:?}, serviceAccount: sa, addresses: [\"10.0.0.1\"]}}\n"
            )
        };
        assert_eq!(
            problems(&workload("", "-ns")),
            [
                "workloads[0].name: must not be empty".to_owned(),
                format!("workloads[0].namespace: \"-ns\" is not a DNS label: {chars}")
            ]
        );
        // Control: the same fields with valid labels.
        let config = Config::parse(&format!("{}rootNamespace: {}\n{}", minimal(), "a".repeat(63), workload("a", "ns")));
        assert_eq!(config.expect("valid labels").root_namespace, "a".repeat(63));
    }

    /// A loopback admin address (v4 or v6) needs nothing; another one only with `adminAllowRemote: true`.
    #[test]
    fn remote_admin_needs_the_explicit_allowance() {
        for (listen, ok) in [
            ("admin: 127.0.0.1:15000", true),
            ("admin: 127.0.0.2:15000", true),
            ("admin: \"[::1]:15000\"", true),
            ("admin: 0.0.0.0:15000", false),
            ("admin: 0.0.0.0:15000\n  adminAllowRemote: false", false),
            ("admin: 0.0.0.0:15000\n  adminAllowRemote: true", true),
            ("admin: \"[fd00::1]:15000\"\n  adminAllowRemote: true", true),
        ] {
            let result = Config::parse(&format!("{}listen:\n  {listen}\n", minimal()));
            assert_eq!(result.is_ok(), ok, "{listen}: {result:?}");
            if let Ok(config) = result {
                assert_eq!(config.listen.admin_allow_remote, listen.contains("adminAllowRemote: true"));
            }
        }
    }

    #[test]
    fn reports_top_level_problems_together() {
        let yaml = "node: \"\"\ncontrolPlane:\n  address: \":0\"\n  caPin: sha1:ab\n  token: \"\"\nstateDir: \"\"\n";
        let Err(ParseError::Invalid(problems)) = Config::parse(yaml) else { panic!("expected validation errors") };
        let fields: Vec<&str> = problems.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(
            fields,
            ["node", "controlPlane.address", "controlPlane.caPin", "controlPlane.token", "stateDir"],
            "{problems:?}"
        );
    }

    #[test]
    fn control_plane_addresses_list_the_replicas() {
        let list = minimal().replace("  address: 127.0.0.1:15012\n", "  addresses: [a:1, 'b:2', '[::1]:3']\n");
        let c = Config::parse(&list).unwrap();
        assert_eq!(c.control_plane.addresses, ["a:1", "b:2", "[::1]:3"]);

        let both = minimal().replace("  address: 127.0.0.1:15012\n", "  address: a:1\n  addresses: [b:2]\n");
        let err = Config::parse(&both).unwrap_err().to_string();
        assert!(err.starts_with("controlPlane.addresses: give either"), "{err}");

        let neither = minimal().replace("  address: 127.0.0.1:15012\n", "");
        let err = Config::parse(&neither).unwrap_err().to_string();
        assert!(err.starts_with("controlPlane.address: missing"), "{err}");

        let empty = minimal().replace("  address: 127.0.0.1:15012\n", "  addresses: []\n");
        assert_eq!(Config::parse(&empty).unwrap_err().to_string(), "controlPlane.addresses: must not be empty");

        let bad = minimal().replace("  address: 127.0.0.1:15012\n", "  addresses: [a:1, 'b', a:1]\n");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("controlPlane.addresses[1]: \"b\""), "{err}");
        assert!(err.contains("controlPlane.addresses[2]: \"a:1\" is listed twice"), "{err}");
    }

    #[test]
    fn node_name_must_be_one_path_segment() {
        for bad in ["a/b", "a b", ".."] {
            let yaml = minimal().replace("node: node-a", &format!("node: {bad:?}"));
            let err = Config::parse(&yaml).unwrap_err().to_string();
            assert!(err.starts_with("node: "), "{bad}: {err}");
        }
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = Config::parse("node: a\nstateDir: /x\n").unwrap_err().to_string();
        assert!(err.contains("missing field `controlPlane`"), "{err}");
    }

    #[test]
    fn host_port_forms() {
        for ok in ["a:1", "10.0.0.1:15012", "[::1]:15012", "cp.example.com:65535"] {
            assert!(check_host_port(ok, PortZero::Refused).is_ok(), "{ok}");
        }
        for bad in ["a", ":1", "a:0", "a:65536", "::1:80", "[]:80", "a:b"] {
            assert!(check_host_port(bad, PortZero::Refused).is_err(), "{bad}");
        }
        assert_eq!(check_host_port("10.0.0.1:0", PortZero::Allowed), Ok(()), "hboneAddress: the bound port");
        assert_eq!(check_host_port("10.0.0.1:x", PortZero::Allowed), Err("has no port in 0..65535"));
    }

    fn with_workload(extra: &str) -> String {
        format!(
            "{}workloads:\n  - name: web\n    namespace: shop\n    serviceAccount: web\n    addresses: [10.0.0.1]\n{extra}",
            minimal()
        )
    }

    #[test]
    fn workload_api_is_off_without_attested_workloads_and_on_with_them() {
        assert_eq!(Config::parse(&with_workload("")).unwrap().workload_api, None);
        let c =
            Config::parse(&with_workload("    attest: [{uid: 1000}, {path: /usr/bin/orders}, {gid: 0}]\n")).unwrap();
        assert_eq!(
            c.workloads[0].attest,
            [Selector::Uid(1000), Selector::Path("/usr/bin/orders".into()), Selector::Gid(0)]
        );
        let api = c.workload_api.unwrap();
        assert_eq!((api.path.to_str().unwrap(), api.mode), (DEFAULT_WORKLOAD_API_SOCKET, 0o666));

        let yaml = format!("{}listen:\n  workloadApi: unix:///tmp/w.sock\n  workloadApiMode: \"0660\"\n", minimal());
        let api = Config::parse(&yaml).unwrap().workload_api.unwrap();
        assert_eq!((api.path.to_str().unwrap(), api.mode), ("/tmp/w.sock", 0o660));
        let yaml = format!("{}listen:\n  workloadApi: none\n", with_workload("    attest: [{uid: 1}]\n"));
        assert_eq!(Config::parse(&yaml).unwrap().workload_api, None);
    }

    #[test]
    fn svid_files_parse() {
        let yaml = with_workload(
            "    svidFiles: {dir: /run/web, owner: \"1000:1001\", command: [/bin/true, x], signal: hup, pidFile: /p}\n",
        );
        let files = Config::parse(&yaml).unwrap().workloads[0].svid_files.clone().unwrap();
        assert_eq!((files.dir.as_path(), files.uid, files.gid), (Path::new("/run/web"), 1000, 1001));
        assert_eq!(files.command, ["/bin/true", "x"]);
        assert_eq!(files.signal, Some((libc::SIGHUP, "SIGHUP".to_owned(), PathBuf::from("/p"))));
    }

    #[test]
    fn bad_selectors_and_sockets_are_named() {
        let cases = [
            ("    attest: [{uid: 1, gid: 2}]\n", "workloads[0].attest[0]: must set exactly one of uid, gid, path"),
            ("    attest: [{}]\n", "workloads[0].attest[0]: must set exactly one"),
            (
                "    attest: [{path: bin/orders}]\n",
                "workloads[0].attest[0].path: \"bin/orders\" is not an absolute path",
            ),
            ("    attest: [{uid: 4294967295}]\n", "workloads[0].attest[0].uid: 4294967295 is not a valid ID"),
            ("    attest: [{pid: 1}]\n", "unknown field `pid`"),
            ("listen:\n  workloadApi: relative.sock\n", "listen.workloadApi: \"relative.sock\" is not an absolute"),
            ("listen:\n  workloadApiMode: \"999\"\n", "listen.workloadApiMode: \"999\" is not an octal file mode"),
            ("    svidFiles: {dir: rel, owner: \"1:1\"}\n", "workloads[0].svidFiles.dir: \"rel\" is not an absolute"),
            ("    svidFiles: {dir: /d, owner: \"web\"}\n", "workloads[0].svidFiles.owner: \"web\" is not \"uid:gid\""),
            ("    svidFiles: {dir: /d, owner: \"1:1\", signal: HUP}\n", "svidFiles.pidFile: required with signal"),
            (
                "    svidFiles: {dir: /d, owner: \"1:1\", signal: SIGKILL, pidFile: /p}\n",
                "workloads[0].svidFiles.signal: \"SIGKILL\" is not one of SIGHUP",
            ),
            ("    svidFiles: {dir: /d, owner: \"1:1\", mode: 1}\n", "unknown field `mode`"),
        ];
        for (extra, expected) in cases {
            let err = Config::parse(&with_workload(extra)).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }
}
