//! Fixtures for in-process tests of the data path: two proxies on loopback in one test process, "A" (client side,
//! fronting W_a) and "B" (server side, fronting W_b), each a real [`DataPath`] with its HBONE and SOCKS5 listeners and
//! its `reconfigure::follow_changes` task, fed the way a running proxy is fed: the mesh state through `state::apply`
//! into its `StateStore`, certificates through its `CertManager`, whose CSRs a test CA answers (first issuance and
//! renewals alike). W_b is played by four servers on 127.0.0.1 (an echo, a greeter and one that resets, on ports
//! declared `tcp`, and a minimal HTTP/1.1 server on a port declared `http`); W_a lives at 127.0.0.2.
//!
//! What each proxy recorded (access-log entries, accepted HBONE connections with the client certificate's serial,
//! authorization decisions) is read from the tracing events of the test, captured by [`Events`]. The capture is the
//! test thread's default subscriber, so tests using [`Mesh`] run on the current-thread runtime (plain
//! `#[tokio::test]`), where every task of both proxies runs on that thread.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1;

use crate::config::{Config, Connection, Outbound, Passthrough, PortConfig, Protocol, WorkloadConfig};
use crate::identity::certs::test_ca::TestCa;
use crate::identity::{CertManager, WorkloadCert, WorkloadCerts};
use crate::proxy::{DataPath, inbound, socks5};
use crate::registry::{LocalWorkload, LocalWorkloads};
use crate::state::{self, State, StateStore};

pub const TRUST_DOMAIN: &str = "td.test";
/// The bound of every wait: far above what a step takes, so reaching it means the step is not going to happen.
pub const WAIT: Duration = Duration::from_secs(10);
const CERT_LIFETIME: Duration = Duration::from_secs(3600);
pub const GREETING: &[u8] = b"hello from W_b, and goodbye";

/// Polls `done` until it holds; panics naming `what` after [`WAIT`].
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Awaits `future`, panicking naming `what` after [`WAIT`] instead of hanging the test.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future).await.unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// A mesh of two proxies and the servers standing for W_b.
pub struct Mesh {
    /// The CA that issued the current certificates (and whose root is in the bundle).
    pub ca: TestCa,
    pub a: Proxy,
    pub b: Proxy,
    /// W_b's echo port: echoes until EOF, then closes.
    pub echo: Server,
    /// W_b's greeter port: sends [`GREETING`] and closes its side at once, then reads until EOF.
    pub greeter: Server,
    /// W_b's resetting port: reads what arrives first, reports it, then resets the connection (SO_LINGER 0).
    pub resetter: Server,
    /// W_b's `http` port: answers every HTTP/1.1 request head with 200 `ok`, reporting each head as it arrives.
    pub http: Server,
    pub events: Events,
    version: u64,
    _shutdown: watch::Sender<bool>,
    // Dropped last: the proxies' tasks may log while they are dropped.
    _tracing: tracing::subscriber::DefaultGuard,
}

impl Mesh {
    /// Both proxies with certificates from one CA, the bundle of its root, and the registry of W_a and W_b; no
    /// policy. Returns once both proxies have applied it.
    pub async fn start() -> Self {
        Self::start_with(Connection::default()).await
    }

    /// The same, with B's `connection` timeouts set (A keeps the defaults).
    pub async fn start_with(b_connection: Connection) -> Self {
        let events = Events::default();
        // The proxy's own events only (not the TLS and HTTP/2 libraries' debug output).
        let filter = Targets::new().with_target("trellis_data_plane", Level::INFO).with_target("access", Level::INFO);
        let tracing =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(filter).with(events.clone()));
        let ca = TestCa::new();
        let (shutdown, stop) = watch::channel(false);
        let echo = Server::start(Behaviour::Echo).await;
        let greeter = Server::start(Behaviour::Greet).await;
        let resetter = Server::start(Behaviour::Reset).await;
        let http = Server::start(Behaviour::Http).await;
        let w_a = workload("web", "front", [127, 0, 0, 2], vec![]);
        let ports = vec![
            (echo.addr.port(), Protocol::Tcp),
            (greeter.addr.port(), Protocol::Tcp),
            (resetter.addr.port(), Protocol::Tcp),
        ];
        let w_b = workload("api", "back", [127, 0, 0, 1], [ports, vec![(http.addr.port(), Protocol::Http)]].concat());
        let a = Proxy::start("node-a", w_a, &ca, stop.clone(), Connection::default()).await;
        let b = Proxy::start("node-b", w_b, &ca, stop, b_connection).await;
        let mut mesh = Self {
            ca,
            a,
            b,
            echo,
            greeter,
            resetter,
            http,
            events,
            version: 0,
            _shutdown: shutdown,
            _tracing: tracing,
        };
        let snapshot = v1::ConfigUpdate {
            full: true,
            trust_bundle: Some(bundle(&[mesh.ca.root.clone()])),
            workloads: vec![mesh.a.registered(), mesh.b.registered()],
            ..Default::default()
        };
        mesh.push(snapshot);
        for (proxy, other) in [(&mesh.a, &mesh.b), (&mesh.b, &mesh.a)] {
            let other_ip = other.hbone.ip();
            eventually("the first snapshot applied", || {
                let tls = proxy.data.tls.load();
                tls.server_for(proxy.hbone.ip()).is_some() && proxy.data.registry.load().lookup(other_ip).is_some()
            })
            .await;
        }
        mesh
    }

    /// Sends `update` to both proxies, as the control plane does, with the next version.
    fn push(&mut self, mut update: v1::ConfigUpdate) {
        self.version += 1;
        update.version = self.version;
        for proxy in [&self.a, &self.b] {
            let next = state::apply(&proxy.state.load(), &update).expect("the update applies");
            proxy.state.store(next);
        }
    }

    /// Applies the Istio documents in `yaml` (parsed by trellis-policy) to both proxies; returns once both follow
    /// the new policies.
    pub async fn apply_policy(&mut self, yaml: &str) {
        let resources = trellis_policy::parse_documents(yaml).expect("the policy parses");
        let resources = resources
            .iter()
            .map(|r| {
                let key = r.key();
                v1::Resource {
                    key: Some(v1::ResourceKey {
                        kind: key.kind.as_str().into(),
                        namespace: key.namespace,
                        name: key.name,
                    }),
                    revision: self.version + 1,
                    json: r.to_json(),
                }
            })
            .collect();
        let before = [self.a.data.authz.load_full(), self.b.data.authz.load_full()];
        self.push(v1::ConfigUpdate { resources, ..Default::default() });
        for (proxy, before) in [&self.a, &self.b].into_iter().zip(before) {
            eventually("the new policies installed", || !Arc::ptr_eq(&proxy.data.authz.load_full(), &before)).await;
        }
    }

    /// Sends the revocation list `list` to one proxy only, as the control plane does when the other side is the
    /// revoked one (its stream is cut, it hears nothing); returns once that proxy installed it (handshakes checked
    /// against it, open connections of revoked peers closed: one step of its change-following task).
    pub async fn revoke(&mut self, at: At, list: v1::Revocations) {
        self.version += 1;
        let update = v1::ConfigUpdate { version: self.version, revocations: Some(list), ..Default::default() };
        let proxy = match at {
            At::A => &self.a,
            At::B => &self.b,
        };
        let next = state::apply(&proxy.state.load(), &update).expect("the revocation list applies");
        let installed = next.revocations.clone();
        proxy.state.store(next);
        eventually("the revocation list installed", || Arc::ptr_eq(&proxy.data.tls.revocations().load(), &installed))
            .await;
    }

    /// Sends a trust bundle of `roots` to both proxies; returns once both rebuilt their TLS set.
    pub async fn set_roots(&mut self, roots: &[CertificateDer<'static>]) {
        let before = [self.a.tls_generation(), self.b.tls_generation()];
        self.push(v1::ConfigUpdate { trust_bundle: Some(bundle(roots)), ..Default::default() });
        for (proxy, before) in [&self.a, &self.b].into_iter().zip(before) {
            eventually("the TLS set rebuilt for the new bundle", || proxy.tls_generation() > before).await;
        }
    }

    /// Renews both proxies' certificates, `ca` signing, as on a renewal or RenewNow; returns once both rebuilt
    /// their TLS set with them. `ca` becomes the mesh's CA.
    pub async fn renew_certificates(&mut self, ca: TestCa) {
        self.a.renew(&ca).await;
        self.b.renew(&ca).await;
        self.ca = ca;
    }
}

fn workload(name: &str, namespace: &str, ip: [u8; 4], ports: Vec<(u16, Protocol)>) -> WorkloadConfig {
    WorkloadConfig {
        name: name.into(),
        namespace: namespace.into(),
        service_account: name.into(),
        labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
        addresses: vec![IpAddr::from(ip)],
        ports: ports.into_iter().map(|(port, protocol)| PortConfig { port, protocol }).collect(),
        attest: Vec::new(),
        svid_files: None,
    }
}

fn bundle(roots: &[CertificateDer<'static>]) -> v1::TrustBundle {
    v1::TrustBundle {
        trust_domain: TRUST_DOMAIN.into(),
        roots: roots.iter().map(|r| r.to_vec()).collect(),
        jwks: String::new(),
    }
}

/// Which proxy of the [`Mesh`].
pub enum At {
    A,
    B,
}

/// A revocation list naming certificates (serial, node) and identities (SPIFFE IDs as text, so that tests can send
/// one the proxy must refuse).
pub fn revocations(certificates: &[(&str, &str)], identities: &[&str]) -> v1::Revocations {
    v1::Revocations {
        certificates: certificates
            .iter()
            .map(|(serial, node)| v1::RevokedCertificate {
                serial: serial.to_string(),
                node: node.to_string(),
                ..Default::default()
            })
            .collect(),
        identities: identities
            .iter()
            .map(|id| v1::RevokedIdentity { spiffe_id: id.to_string(), revoked_at_unix: 0 })
            .collect(),
        nodes: Vec::new(),
    }
}

/// A revocation list naming revoked nodes by serial tag (tag hex, node).
pub fn revoked_tags(tags: &[(&str, &str)]) -> v1::Revocations {
    v1::Revocations {
        nodes: tags
            .iter()
            .map(|(tag, node)| v1::RevokedNode {
                serial_tag: tag.to_string(),
                node: node.to_string(),
                revoked_at_unix: 0,
            })
            .collect(),
        ..Default::default()
    }
}

/// One proxy fronting one workload: its data path, listeners and change-following task, all in this process.
pub struct Proxy {
    pub data: Arc<DataPath>,
    pub workload: Arc<LocalWorkload>,
    /// Its HBONE listener, at its workload's address (where other proxies tunnel to).
    pub hbone: SocketAddr,
    /// Its SOCKS5 listener, speaking for its workload.
    pub socks5: SocketAddr,
    state: Arc<StateStore>,
    certs: Arc<WorkloadCerts>,
    manager: CertManager,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Binds the listeners, issues the first certificate and starts following changes; the mesh state comes later
    /// (`Mesh::push`).
    async fn start(
        node: &str,
        workload: WorkloadConfig,
        ca: &TestCa,
        shutdown: watch::Receiver<bool>,
        connection: Connection,
    ) -> Self {
        let pin = format!("sha256:{}", "0".repeat(64));
        let yaml =
            format!("node: {node}\ncontrolPlane: {{address: 127.0.0.1:1, caPin: '{pin}'}}\nstateDir: /nonexistent\n");
        let mut config = Config::parse(&yaml).expect("the minimal config parses");
        config.outbound = Outbound { passthrough: Passthrough::Deny, socks5_workload: Some(0) };
        config.connection = connection;
        let ip = workload.addresses[0];
        config.workloads = vec![workload];
        let config = Arc::new(config);

        let hbone = TcpListener::bind((ip, 0)).await.expect("bind HBONE");
        let socks5 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind SOCKS5");
        let (hbone_addr, socks5_addr) = (hbone.local_addr().unwrap(), socks5.local_addr().unwrap());
        let locals = LocalWorkloads::new(&config.workloads, TRUST_DOMAIN).expect("valid workload");
        let local = locals.get(0).expect("one workload").clone();
        let data = Arc::new(DataPath::new(locals, config.outbound.clone(), config.connection.into()));
        let certs = Arc::new(WorkloadCerts::new([local.spiffe_id.clone()]));
        let state = Arc::new(StateStore::new(State::with_root_namespace(TRUST_DOMAIN, config.root_namespace.clone())));
        let tasks = vec![
            tokio::spawn(crate::reconfigure::follow_changes(
                config.clone(),
                data.clone(),
                certs.clone(),
                state.clone(),
            )),
            tokio::spawn(inbound::serve(hbone, data.clone(), shutdown)),
            tokio::spawn(socks5::serve(socks5, data.clone(), local.clone())),
        ];
        let manager = CertManager::new(certs.clone(), Instant::now());
        let mut proxy =
            Self { data, workload: local, hbone: hbone_addr, socks5: socks5_addr, state, certs, manager, tasks };
        proxy.issue(ca);
        proxy
    }

    /// The registry entry the control plane sends for this proxy's workload.
    fn registered(&self) -> v1::Workload {
        v1::Workload {
            node: "node".into(),
            proxy_address: self.hbone.to_string(),
            spiffe_id: self.workload.spiffe_id.to_string(),
            ..self.workload.config.to_proto()
        }
    }

    /// Answers the CSR the certificate manager makes now, `ca` signing.
    fn issue(&mut self, ca: &TestCa) -> Arc<WorkloadCert> {
        let now = Instant::now();
        self.manager.renew_now(&[], now);
        let step = self.manager.step(now);
        let [request] = step.requests.as_slice() else { panic!("one CSR expected, got {}", step.requests.len()) };
        let response = v1::CertificateResponse {
            request_id: request.request_id,
            certificate_chain: ca.sign(&request.csr_der, CERT_LIFETIME).into_iter().map(|c| c.to_vec()).collect(),
            error: String::new(),
        };
        self.manager.on_response(response, now, SystemTime::now()).expect("the certificate is good").expect("awaited")
    }

    /// A new certificate from `ca`, installed as the proxy installs a renewal; returns once the TLS set has it.
    pub async fn renew(&mut self, ca: &TestCa) -> Arc<WorkloadCert> {
        let before = self.tls_generation();
        let cert = self.issue(ca);
        eventually("the TLS set rebuilt with the new certificate", || self.tls_generation() > before).await;
        cert
    }

    /// Its workload's current certificate.
    pub fn cert(&self) -> Arc<WorkloadCert> {
        self.certs.get(&self.workload.spiffe_id).expect("issued at start")
    }

    pub fn tls_generation(&self) -> u64 {
        self.data.tls.load().generation
    }

    /// A client of this proxy's SOCKS5 listener asking for `target`: the stream once the proxy answered success,
    /// or the RFC 1928 reply code it refused with.
    pub async fn connect(&self, target: SocketAddr) -> Result<TcpStream, u8> {
        socks5_connect(self.socks5, target).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The SOCKS5 client side (no authentication, CONNECT to an IPv4 address).
pub async fn socks5_connect(socks5: SocketAddr, target: SocketAddr) -> Result<TcpStream, u8> {
    within("the SOCKS5 exchange", async {
        let mut tcp = TcpStream::connect(socks5).await.expect("connect to the SOCKS5 listener");
        tcp.write_all(&[5, 1, 0]).await.unwrap();
        let mut method = [0u8; 2];
        tcp.read_exact(&mut method).await.unwrap();
        assert_eq!(method, [5, 0], "no authentication selected");
        let SocketAddr::V4(target) = target else { panic!("IPv4 targets only") };
        let request = [&[5, 1, 0, 1][..], &target.ip().octets(), &target.port().to_be_bytes()].concat();
        tcp.write_all(&request).await.unwrap();
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply).await.unwrap();
        match reply[1] {
            0 => Ok(tcp),
            code => Err(code),
        }
    })
    .await
}

/// Writes `bytes` and expects them back.
pub async fn echo_round(stream: &mut TcpStream, bytes: &[u8]) {
    within("the echo", async {
        stream.write_all(bytes).await.expect("write through the tunnel");
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back).await.expect("read the echo");
        assert_eq!(back, bytes);
    })
    .await
}

enum Behaviour {
    Echo,
    Greet,
    /// HTTP/1.1 without bodies: each request head is reported when it arrives, answered `200 ok`.
    Http,
    /// Reads once, reports it, then resets the connection.
    Reset,
}

/// A TCP server standing for W_b on one port; reports what each connection sent it until EOF.
pub struct Server {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind a W_b port");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (report, received) = mpsc::unbounded_channel();
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                count.fetch_add(1, Ordering::Relaxed);
                let report = report.clone();
                let (greet, http) = (matches!(behaviour, Behaviour::Greet), matches!(behaviour, Behaviour::Http));
                let reset = matches!(behaviour, Behaviour::Reset);
                tokio::spawn(async move {
                    if reset {
                        let mut tcp = tcp;
                        let mut buffer = [0u8; 16 * 1024];
                        let n = tcp.read(&mut buffer).await.unwrap_or(0);
                        socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
                        drop(tcp);
                        let _ = report.send(buffer[..n].to_vec());
                        return;
                    }
                    let (mut reader, mut writer) = tcp.into_split();
                    let mut seen = Vec::new();
                    if http {
                        let mut buffer = [0u8; 16 * 1024];
                        while let Ok(n @ 1..) = reader.read(&mut buffer).await {
                            seen.extend_from_slice(&buffer[..n]);
                            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                                let _ = report.send(seen.drain(..end + 4).collect());
                                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                                if writer.write_all(answer).await.is_err() {
                                    return;
                                }
                            }
                        }
                        return;
                    } else if greet {
                        let _ = writer.write_all(GREETING).await;
                        let _ = writer.shutdown().await;
                        let _ = reader.read_to_end(&mut seen).await;
                    } else {
                        let mut buffer = [0u8; 16 * 1024];
                        while let Ok(n @ 1..) = reader.read(&mut buffer).await {
                            seen.extend_from_slice(&buffer[..n]);
                            if writer.write_all(&buffer[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = writer.shutdown().await;
                    }
                    let _ = report.send(seen);
                });
            }
        });
        Self { addr, accepted, received: tokio::sync::Mutex::new(received), task }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// What the next connection to end sent before its EOF (the HTTP server: the next request head).
    pub async fn received(&self) -> Vec<u8> {
        within("a W_b connection to see EOF", async { self.received.lock().await.recv().await.expect("server alive") })
            .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One captured tracing event: its target and its fields (the message as `message`), as text.
#[derive(Debug, Clone)]
pub struct Event {
    pub target: String,
    pub fields: BTreeMap<String, String>,
}

impl Event {
    /// The field's text, or "" if absent.
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }

    pub fn message(&self) -> &str {
        self.field("message")
    }
}

/// Every tracing event of the test, in order.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<Event>>>);

impl Events {
    pub fn matching(&self, keep: impl Fn(&Event) -> bool) -> Vec<Event> {
        self.0.lock().iter().filter(|e| keep(e)).cloned().collect()
    }

    /// Access-log entries of connections, by the side that reported them (`source`: A, `destination`: B).
    pub fn access(&self, reporter: &str) -> Vec<Event> {
        self.matching(|e| e.target == "access" && e.message() == "connection" && e.field("reporter") == reporter)
    }

    /// HBONE connections a proxy accepted (TLS done) from a client presenting `source`'s certificate.
    pub fn hbone_accepts(&self, source: &SpiffeId) -> Vec<Event> {
        let source = source.to_string();
        self.matching(|e| e.message() == "HBONE connection accepted" && e.field("source") == source)
    }

    /// Events whose message is `message`.
    pub fn with_message(&self, message: &str) -> Vec<Event> {
        self.matching(|e| e.message() == message)
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0.lock().push(Event { target: event.metadata().target().to_owned(), fields: fields.0 });
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}
