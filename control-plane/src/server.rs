//! `trellis-control serve`: one TLS 1.3 gRPC endpoint for the Identity, Discovery and Admin services, and the
//! metrics endpoint.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::v1 as pb;

use crate::ca::{Ca, LocalCert};
use crate::mesh::{Mesh, MeshConfig};
use crate::services::{Shared, admin::AdminService, discovery::DiscoveryService, identity::IdentityService};
use crate::settings::ControlSettings;
use crate::status::ProxyRegistry;
use crate::store::{RedbStore, STORE_FILE};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const SERVING_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub cert_ttl: Duration,
    pub node_cert_ttl: Duration,
    /// Extra names (DNS or IP) for the serving certificate.
    pub sans: Vec<String>,
    pub jwks: crate::jwks::JwksOptions,
    /// Where to write the bound addresses (`bound_addresses`), if anywhere.
    pub addresses_file: Option<PathBuf>,
}

pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    // First, so that what opening the store records (its size) is kept.
    let metrics = crate::http::metrics_builder()
        .context("configuring the metrics recorder")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    crate::http::describe_metrics();
    let settings = ControlSettings::load(&opts.data_dir)?;
    let ca = Ca::load(&opts.data_dir, &settings.trust_domain).context("loading the CA")?;
    let tls = server_tls(&ca, &opts)?;
    let store = Arc::new(RedbStore::open(&opts.data_dir.join(STORE_FILE)).context("opening the store")?);
    let mesh = Mesh::open(
        store,
        ca,
        MeshConfig {
            trust_domain: settings.trust_domain.clone(),
            cert_ttl: opts.cert_ttl,
            node_cert_ttl: opts.node_cert_ttl,
            jwks_allow_local: opts.jwks.allow_local,
        },
    )?;
    adopt_initial_admin(&mesh, &opts.data_dir)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shared = Shared { mesh: Arc::new(mesh), proxies: Arc::new(ProxyRegistry::default()), shutdown: shutdown_rx };

    let metrics_listener = TcpListener::bind(opts.metrics_listen)
        .await
        .with_context(|| format!("binding metrics listener {}", opts.metrics_listen))?;
    let metrics_address =
        metrics_listener.local_addr().with_context(|| format!("binding metrics listener {}", opts.metrics_listen))?;
    tokio::spawn(crate::http::serve_metrics(metrics_listener, metrics));

    tokio::spawn(crate::jwks::run(shared.mesh.clone(), opts.jwks.clone()));

    let listener =
        TcpListener::bind(opts.listen).await.with_context(|| format!("binding gRPC listener {}", opts.listen))?;
    let address = listener.local_addr().with_context(|| format!("binding gRPC listener {}", opts.listen))?;
    if let Some(path) = &opts.addresses_file {
        crate::bound_addresses::write(path, address, metrics_address)?;
    }
    tracing::info!(
        listen = %address,
        metrics = %metrics_address,
        trust_domain = %settings.trust_domain,
        version = shared.mesh.current().version,
        "control plane serving"
    );
    let incoming = accept_tls(listener, tokio_rustls::TlsAcceptor::from(Arc::new(tls)));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(pb::identity_server::IdentityServer::new(IdentityService(shared.clone())))
        .add_service(pb::discovery_server::DiscoveryServer::new(DiscoveryService(shared.clone())))
        .add_service(pb::admin_server::AdminServer::new(AdminService::new(shared.clone())))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
    tokio::select! {
        result = &mut server => return Ok(result??),
        () = shutdown => {}
    }
    tracing::info!("shutting down");
    // Every discovery stream ends (told UNAVAILABLE), and the server stops accepting and finishes the calls in
    // flight (GOAWAY); it then returns. The grace period only bounds a call that does not finish.
    let _ = shutdown_tx.send(true);
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(result) => result??,
        Err(_) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still open after the grace period; stopping anyway");
            server.abort();
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Records the admin credential `init` made, if no admin is recorded yet (`mesh/admins.rs`).
fn adopt_initial_admin(mesh: &Mesh, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let path = data_dir.join(crate::init::ADMIN_CERT);
    let pem = match std::fs::read_to_string(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let chain = crate::ca::parse_pem_certs(&pem).with_context(|| format!("{}", path.display()))?;
    if let Some(name) = mesh.adopt_initial_admin(&chain[0]).with_context(|| format!("{}", path.display()))? {
        tracing::info!(admin = %name, "initial admin credential recorded");
    }
    Ok(())
}

fn server_tls(ca: &Ca, opts: &ServeOptions) -> anyhow::Result<ServerConfig> {
    let mut dns_names = vec![trellis_proto::CONTROL_PLANE_SERVER_NAME.to_owned(), "localhost".to_owned()];
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
    if !opts.listen.ip().is_unspecified() {
        ips.push(opts.listen.ip());
    }
    for san in &opts.sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns_names.push(san.clone()),
        }
    }
    ips.dedup();
    let (issued, key_pem) =
        ca.issue_local(LocalCert::Server { dns_names: &dns_names, ips: &ips }, SERVING_CERT_VALIDITY)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("serving key")?;
    let provider = trellis_proto::tls::provider();
    let mut roots = RootCertStore::empty();
    for root in ca.roots() {
        roots.add(root)?;
    }
    // Join is called without a certificate; the other services check the caller's identity themselves.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        // The chain includes the root, so that a joining proxy can check it against its CA pin.
        .with_single_cert(issued.chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts TCP connections and completes each TLS handshake in its own task, so that a slow or malformed client
/// costs one connection, never the accept loop.
fn accept_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> ReceiverStream<Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
