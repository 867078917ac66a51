//! Process start-up and shutdown, in order: the admin endpoint first (so readiness is observable during the join),
//! the node credential, the data path (`proxy`) with its listeners and the task following changes
//! (`reconfigure`), then the discovery stream until shutdown; then the drain: listeners stop, open connections get
//! until the drain deadline.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};
use trellis_proto::spiffe::SpiffeId;

use crate::admin::{self, Shared};
use crate::backoff::Backoff;
use crate::bound_addresses::{self, BoundAddresses};
use crate::config::Config;
use crate::discovery::{self, Discovery};
use crate::identity::certs::rfc3339;
use crate::identity::{CertManager, NodeCredential, NodeError, WorkloadCerts, files};
use crate::proxy::{DataPath, inbound, inbound_plaintext, outbound, socks5};
use crate::registry::LocalWorkloads;
use crate::state::{State, StateStore};
use crate::stored;
use crate::{reconfigure, shutdown_requested, workload_api};

/// Why the proxy could not start (every error `run` returns happens before or while it starts).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address} (listen.admin): {source}")]
    Listen { address: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot prepare stateDir {path}: {source}")]
    StateDir { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("invalid workload identity: {0}")]
    Identity(#[from] trellis_proto::spiffe::SpiffeIdError),
    #[error("cannot listen on {address} ({field}): {source}")]
    Bind { field: &'static str, address: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    AddressesFile(#[from] bound_addresses::WriteError),
    #[error(transparent)]
    WorkloadApi(#[from] workload_api::BindError),
}

/// Runs the proxy until `shutdown` turns true; the addresses its listeners are bound to are logged and, with
/// `addresses_file`, written there (`bound_addresses`).
pub async fn run(
    config: Config,
    addresses_file: Option<std::path::PathBuf>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let config = Arc::new(config);
    crate::sockets::set_mark(config.capture.mark);
    let state = Arc::new(StateStore::new(State::default()));
    let shared = Arc::new(Shared::new(config.node.clone(), state.clone()));

    let mut bound = BoundAddresses::new(addresses_file);
    let admin_address = config.listen.admin;
    if !admin_address.ip().is_loopback() {
        // Only reachable with listen.adminAllowRemote (config.rs refuses it otherwise).
        warn!(
            address = %admin_address,
            "listen.admin is not a loopback address (listen.adminAllowRemote): other hosts can read /config_dump \
             and change the log level without authentication"
        );
    }
    let listener =
        admin::bind(admin_address).await.map_err(|source| StartError::Listen { address: admin_address, source })?;
    bound.add("admin", local_address(&listener, "listen.admin", admin_address)?);
    let admin = tokio::spawn(admin::serve(listener, shared.clone(), shutdown.clone()));
    match crate::metrics::install() {
        Ok(handle) => {
            let _ = shared.metrics.set(handle);
        }
        Err(e) => warn!(error = %e, "metrics recorder not installed; /metrics will be empty"),
    }
    let metrics_address = config.listen.metrics;
    let listener = admin::bind(metrics_address).await.map_err(|source| StartError::Bind {
        field: "listen.metrics",
        address: metrics_address,
        source,
    })?;
    bound.add("metrics", local_address(&listener, "listen.metrics", metrics_address)?);
    tokio::spawn(admin::serve_metrics(listener, shared.clone(), shutdown.clone()));
    bound.publish()?;

    let Some(node) = node_credential(&config, shutdown.clone()).await? else {
        let _ = admin.await;
        return Ok(());
    };
    let node = Arc::new(node);
    info!(
        spiffe_id = %node.spiffe_id,
        namespaces = ?node.namespaces,
        not_after = %rfc3339(node.info.not_after),
        "node credential ready"
    );
    for w in &config.workloads {
        if !node.namespaces.is_empty() && !node.namespaces.contains(&w.namespace) {
            warn!(
                workload = %w.key(),
                allowed = ?node.namespaces,
                "workload namespace was not granted to this node at join; the control plane will likely refuse it"
            );
        }
    }

    // Several workloads may share a service account, hence one identity.
    let ids: BTreeSet<SpiffeId> = config
        .workloads
        .iter()
        .map(|w| SpiffeId::workload(node.trust_domain(), &w.namespace, &w.service_account))
        .collect::<Result<_, _>>()?;
    let certs = Arc::new(WorkloadCerts::new(ids));
    let mut manager = CertManager::new(certs.clone(), Instant::now());
    let base = State::with_root_namespace(node.trust_domain(), config.root_namespace.clone());
    state.store(restore(&config.state_dir, base, &mut manager));
    let _ = shared.workload_certs.set(certs.clone());
    shared.node_credential.store(Some(node.clone()));
    tokio::spawn(stored::follow(config.state_dir.clone(), state.clone(), certs.clone()));

    let locals = LocalWorkloads::new(&config.workloads, node.trust_domain())?;
    let data = Arc::new(DataPath::new(locals, config.outbound.clone(), config.connection.into()));
    tokio::spawn(reconfigure::follow_changes(config.clone(), data.clone(), certs.clone(), state.clone()));
    let registry = data.clone();
    tokio::spawn(crate::heap::release_when_quiet(move || registry.connections.shrink_to_fit()));
    tokio::spawn(crate::log_limit::report_suppressed());
    let mut listeners = start_listeners(&config, &data, shared.clone(), shutdown.clone(), &mut bound).await?;
    bound.publish()?;

    // Application SVIDs (Workload API): the attested workloads' identities again, each under a key of its own.
    let attestor = Arc::new(workload_api::attest::Attestor::new(&config.workloads, node.trust_domain())?);
    // ... and those written as files (svidFiles).
    let file_targets = (config.workloads.iter())
        .filter_map(|w| {
            let files = w.svid_files.clone()?;
            Some(
                SpiffeId::workload(node.trust_domain(), &w.namespace, &w.service_account)
                    .map(|id| crate::svid_files::Target { id, config: files }),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut app_ids = attestor.identities();
    app_ids.extend(file_targets.iter().map(|t| t.id.clone()));
    let app_manager = (!app_ids.is_empty()).then(|| {
        let app_certs = Arc::new(WorkloadCerts::new(app_ids));
        CertManager::with_first_request_id(app_certs, Instant::now(), discovery::APP_REQUEST_IDS)
    });
    if let (Some(manager), false) = (&app_manager, file_targets.is_empty()) {
        tokio::spawn(crate::svid_files::follow(file_targets, manager.certs().clone(), state.clone()));
    }
    let control = discovery::ControlChannel::default();
    if let Some(listen) = &config.workload_api {
        let listener = workload_api::bind(listen)?;
        let app_certs = app_manager.as_ref().map_or_else(|| Arc::new(WorkloadCerts::new([])), |m| m.certs().clone());
        let service = workload_api::service::Service::new(attestor, app_certs, state.clone(), control.clone());
        listeners.push(tokio::spawn(workload_api::serve(listener, listen.path.clone(), service)));
    }

    // The Hello advertises the HBONE port actually bound (listen.hbone may say port 0). Only the discovery
    // stream reads `hbone_address`.
    let hbone_port = bound.get("hbone").map_or(config.listen.hbone.port(), |a| a.port());
    let advertised =
        Arc::new(Config { hbone_address: config.advertised_hbone_address(hbone_port), ..(*config).clone() });
    Discovery::new(advertised, node, shared.node_credential.clone(), state, manager)
        .with_app_certs(app_manager)
        .with_channel_slot(control)
        .run(shutdown)
        .await;

    // Stop accepting, then give open connections until the drain deadline.
    for listener in &listeners {
        listener.abort();
    }
    let open = data.connections.len();
    if open > 0 {
        info!(open, deadline = ?config.drain_timeout, "draining connections");
        if tokio::time::timeout(config.drain_timeout, data.connections.wait_empty()).await.is_err() {
            warn!(left = data.connections.len(), "drain deadline reached; closing the rest");
        }
    }
    let _ = admin.await;
    info!("stopped");
    Ok(())
}

/// What the state directory kept from before a restart (`stored.rs`): the last ACKed config and the workload
/// certificates still valid, installed so the proxy serves before the control plane answers. Returns the state to
/// start from (`base` when nothing usable was stored); stored material that fails its checks is skipped, logged.
fn restore(dir: &std::path::Path, base: State, manager: &mut CertManager) -> State {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let ids: Vec<SpiffeId> = manager.certs().ids().cloned().collect();
    for id in ids {
        match stored::load_cert(dir, &id, wall) {
            Ok(Some(cert)) => {
                info!(spiffe_id = %id, serial = %cert.info.serial, not_after = %rfc3339(cert.info.not_after), "using the stored workload certificate");
                manager.restore(cert, now, wall);
            }
            Ok(None) => {}
            Err(e) => warn!(spiffe_id = %id, error = %e, "stored workload certificate not used"),
        }
    }
    match stored::load_config(dir, &base, wall) {
        Ok(Some(state)) => {
            info!(
                version = state.version,
                workloads = state.workloads.len(),
                resources = state.resources.len(),
                "serving the stored config until the control plane sends its own"
            );
            state
        }
        Ok(None) => base,
        Err(e) => {
            warn!(error = %e, "stored config not used; waiting for the control plane's");
            base
        }
    }
}

/// The address `listener` is bound to (the kernel's pick when `configured` has port 0).
fn local_address(
    listener: &tokio::net::TcpListener,
    field: &'static str,
    configured: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind { field, address: configured, source })
}

/// Binds the data-path listeners, recording each in `bound`; a bind failure is fatal (the operator's config names a
/// taken address).
async fn start_listeners(
    config: &Config,
    data: &Arc<DataPath>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    bound: &mut BoundAddresses,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    let mut tasks = Vec::new();
    // IPv6 workloads: each of these listeners on an IPv4 wildcard or loopback address gets an IPv6 twin at the same
    // port (`crate::listen::ipv6_twin`), where tunnels to those workloads and their captured connections arrive.
    // Recorded as `<name>Ipv6` (`hboneIpv6`, ...).
    let ipv6 = config.workloads.iter().any(|w| w.addresses.iter().any(|a| a.is_ipv6()));
    let twin =
        |listener: &tokio::net::TcpListener, name: &'static str, field: &'static str, bound: &mut BoundAddresses| {
            let twin =
                ipv6.then(|| listener.local_addr().ok()).flatten().and_then(|b| crate::listen::ipv6_twin(b, field))?;
            if let Ok(address) = twin.local_addr() {
                bound.add(name, address);
            }
            Some(twin)
        };
    let hbone = bind_listener(bound, config.listen.hbone, "hbone", "listen.hbone").await?;
    if let Some(hbone6) = twin(&hbone, "hboneIpv6", "listen.hbone", bound) {
        tasks.push(tokio::spawn(inbound::serve(hbone6, data.clone(), shutdown.clone())));
    }
    tasks.push(tokio::spawn(inbound::serve(hbone, data.clone(), shutdown.clone())));
    let captured = bind_listener(bound, config.listen.outbound, "outbound", "listen.outbound").await?;
    if let Some(captured6) = twin(&captured, "outboundIpv6", "listen.outbound", bound) {
        tasks.push(tokio::spawn(outbound::serve_captured(captured6, data.clone())));
    }
    tasks.push(tokio::spawn(outbound::serve_captured(captured, data.clone())));
    let plaintext = bind_listener(bound, config.listen.inbound, "inbound", "listen.inbound").await?;
    if let Some(plaintext6) = twin(&plaintext, "inboundIpv6", "listen.inbound", bound) {
        tasks.push(tokio::spawn(inbound_plaintext::serve(plaintext6, data.clone())));
    }
    tasks.push(tokio::spawn(inbound_plaintext::serve(plaintext, data.clone())));
    if let Some(workload) = config.outbound.socks5_workload.and_then(|i| data.locals.get(i)).cloned() {
        let socks5 = bind_listener(bound, config.listen.socks5, "socks5", "listen.socks5").await?;
        info!(workload = %workload.spiffe_id, "SOCKS5 clients speak as this workload");
        tasks.push(tokio::spawn(socks5::serve(socks5, data.clone(), workload)));
    }
    // Last: its presence in the addresses file says every listener is bound.
    let ready = bind_listener(bound, config.listen.ready, "ready", "listen.ready").await?;
    tasks.push(tokio::spawn(admin::serve_ready(ready, shared, shutdown)));
    Ok(tasks)
}

/// Binds one data-path listener at `address` (config field `field`) and records it in `bound` as `name`.
async fn bind_listener(
    bound: &mut BoundAddresses,
    address: std::net::SocketAddr,
    name: &'static str,
    field: &'static str,
) -> Result<tokio::net::TcpListener, StartError> {
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|source| StartError::Bind { field, address, source })?;
    bound.add(name, local_address(&listener, field, address)?);
    Ok(listener)
}

/// The stored credential, or a new one from a join (retried while the control plane is unreachable).
/// `None` when shutdown came first.
async fn node_credential(
    config: &Config,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<NodeCredential>, StartError> {
    let dir = &config.state_dir;
    files::ensure_private_dir(dir).map_err(|source| StartError::StateDir { path: dir.clone(), source })?;
    match NodeCredential::load(dir, &config.node)? {
        Some(stored) if !stored.expired(SystemTime::now()) => {
            info!(state_dir = %dir.display(), "using the stored node credential");
            return Ok(Some(stored));
        }
        Some(stored) if config.control_plane.token.is_none() => {
            return Err(NodeError::Expired { dir: dir.clone(), at: rfc3339(stored.info.not_after) }.into());
        }
        Some(_) => warn!("the stored node credential expired; joining again with the configured token"),
        None if config.control_plane.token.is_none() => return Err(NodeError::NoToken(dir.clone()).into()),
        None => {}
    }

    // Each round tries every replica in turn (a transient failure moves on to the next one at once); rounds are
    // spaced by the backoff, so a mesh of dead replicas is never retried in a tight loop.
    let mut backoff = Backoff::control_plane();
    loop {
        for address in &config.control_plane.addresses {
            info!(%address, node = %config.node, "joining the mesh");
            let attempt = tokio::select! {
                _ = shutdown_requested(&mut shutdown) => return Ok(None),
                attempt = NodeCredential::join(&config.control_plane, address, &config.node) => attempt,
            };
            match attempt {
                Ok(credential) => {
                    credential.save(dir)?;
                    info!(state_dir = %dir.display(), %address, "joined; node credential stored");
                    return Ok(Some(credential));
                }
                Err(e) if e.is_transient() => warn!(error = %e, %address, "join failed; trying the next replica"),
                Err(e) => return Err(e.into()),
            }
        }
        let delay = backoff.next_delay();
        warn!(retry_in = ?delay, "no control-plane replica accepted the join; retrying");
        tokio::select! {
            _ = shutdown_requested(&mut shutdown) => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
