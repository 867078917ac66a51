//! `trellis-control serve`: one TLS 1.3 gRPC endpoint for the Identity, Discovery and Admin services, and the
//! metrics endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_proto::v1 as pb;

use crate::mesh::{Mesh, MeshConfig};
use crate::services::{Shared, admin::AdminService, discovery::DiscoveryService, identity::IdentityService};
use crate::settings::ControlSettings;
use crate::status::ProxyRegistry;
use crate::store_config::{StoreArgs, StoreConfig};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub cert_ttl: Duration,
    pub node_cert_ttl: Duration,
    pub jwt_svid_ttl: Duration,
    /// Extra names (DNS or IP) for the serving certificate.
    pub sans: Vec<String>,
    pub jwks: crate::jwks::JwksOptions,
    /// Where to write the bound addresses (`bound_addresses`), if anywhere.
    pub addresses_file: Option<PathBuf>,
    /// Tests only: a root rotation never leaves this phase.
    pub rotation_hold: Option<crate::rotation::Phase>,
    /// The store backend (flags; control.yaml's `store:` section fills what they leave out).
    pub store: StoreArgs,
    /// This replica's name, as `trellisctl proxy-status` shows it.
    pub replica_name: String,
}

pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    // First, so that what opening the store records (its size) is kept.
    let metrics = crate::http::metrics_builder()
        .context("configuring the metrics recorder")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    crate::http::describe_metrics();
    let config = opts.store.resolve(ControlSettings::store_section(&opts.data_dir)?.as_ref())?;
    if matches!(config, StoreConfig::Redb) {
        // The data dir must exist (made by `init`): say so before the store is created anywhere.
        ControlSettings::load(&opts.data_dir)?;
    }
    let opened = config.open(&opts.data_dir).context("opening the store")?;
    if let Some(kek) = &opened.kek {
        // A replica on a shared store takes the CA and control.yaml from it (`shared_files.rs`).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&opts.data_dir)
            .with_context(|| format!("creating {}", opts.data_dir.display()))?;
        let written = crate::shared_files::materialize(opened.store.as_ref(), &opts.data_dir, kek)?;
        tracing::info!(files = written, kek = kek.id(), "data dir filled from the shared store");
    }
    let settings = ControlSettings::load(&opts.data_dir)?;
    let store = opened.store;
    let load = || crate::authority::load(&opts.data_dir, store.as_ref(), &settings.trust_domain);
    let mut authority = load().context("loading the CA")?;
    if let Some(kek) = &opened.kek {
        // A CA folder from before JWT-SVIDs got its JWT key when it was loaded: publish it, or take the one another
        // replica published first, so that every replica signs with (and publishes) the same key.
        crate::shared_files::publish(store.as_ref(), &opts.data_dir, kek, false, &[])?;
        if crate::shared_files::adopt(store.as_ref(), &opts.data_dir, kek, crate::jwt_key::JWT_KEY_FILE)? > 0 {
            authority = load().context("loading the CA")?;
        }
    }
    let mesh = Mesh::open(
        store,
        authority,
        MeshConfig {
            trust_domain: settings.trust_domain.clone(),
            cert_ttl: opts.cert_ttl,
            node_cert_ttl: opts.node_cert_ttl,
            jwt_svid_ttl: opts.jwt_svid_ttl,
            jwks_allow_local: opts.jwks.allow_local,
            data_dir: opts.data_dir.clone(),
            kek: opened.kek,
        },
    )?;
    adopt_initial_admin(&mesh, &opts.data_dir)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let shared = Shared {
        mesh: Arc::new(mesh),
        proxies: Arc::new(ProxyRegistry::named(&opts.replica_name)),
        shutdown: shutdown_rx,
        holdings: Default::default(),
        rotation_wake: Default::default(),
        history: Default::default(),
        steps: Default::default(),
        serving_root: Default::default(),
    };
    let tls = crate::serving::follow(
        shared.mesh.clone(),
        crate::serving::ServingNames::new(opts.listen, &opts.sans),
        shared.serving_root.clone(),
    )?;
    tokio::spawn(crate::services::rotation::drive(shared.clone(), opts.data_dir.clone(), opts.rotation_hold));

    let metrics_listener = TcpListener::bind(opts.metrics_listen)
        .await
        .with_context(|| format!("binding metrics listener {}", opts.metrics_listen))?;
    let metrics_address =
        metrics_listener.local_addr().with_context(|| format!("binding metrics listener {}", opts.metrics_listen))?;
    let ready_store = shared.mesh.clone();
    tokio::spawn(crate::http::serve_metrics(
        metrics_listener,
        metrics,
        Arc::new(move || ready_store.store().available()),
    ));
    if let Some(changes) = shared.mesh.store().follow(&crate::mesh::FOLLOWED) {
        tokio::spawn(crate::mesh::follow_store(shared.mesh.clone(), changes, shared.rotation_wake.clone()));
    }

    tokio::spawn(crate::services::mesh_status::publish(shared.clone()));
    tokio::spawn(crate::jwks::run(shared.mesh.clone(), opts.jwks.clone()));
    tokio::spawn(crate::services::revocation_expiry::run(shared.mesh.clone()));
    tokio::spawn(crate::services::certificate_log_expiry::run(shared.mesh.clone()));

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
    let incoming = accept_tls(listener, tls);

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

/// Accepts TCP connections and completes each TLS handshake in its own task, so that a slow or malformed client
/// costs one connection, never the accept loop.
fn accept_tls(
    listener: TcpListener,
    configs: tokio::sync::watch::Receiver<Arc<ServerConfig>>,
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
            // The config current now: a root rotation swaps it without touching open connections.
            let acceptor = tokio_rustls::TlsAcceptor::from(configs.borrow().clone());
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
