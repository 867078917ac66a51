//! Startup order and the handles the parts share: admin endpoint first (so readiness is observable
//! during the join), then the node credential, then the discovery stream until shutdown.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};
use trellis_proto::spiffe::SpiffeId;

use arc_swap::ArcSwap;

use crate::authz::LocalPolicies;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::connections::Connections;
use crate::discovery::Discovery;
use crate::identity::certs::rfc3339;
use crate::identity::{CertManager, NodeCredential, NodeError, WorkloadCerts, files};
use crate::metrics::TrafficMetrics;
use crate::pool::Pool;
use crate::registry::{LocalWorkloads, Registry};
use crate::state::{State, StateStore};
use crate::tls::MeshTls;
use crate::{admin, shutdown_requested};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
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
}

/// What the admin endpoint (and later the data path) reads. Filled in as startup progresses.
pub struct Shared {
    pub node: String,
    pub node_credential: OnceLock<Arc<NodeCredential>>,
    pub workload_certs: OnceLock<Arc<WorkloadCerts>>,
    pub state: Arc<StateStore>,
    /// Renders `/metrics` (absent where no recorder is installed, e.g. in unit tests).
    pub metrics: OnceLock<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Shared {
    pub fn new(node: String, state: Arc<StateStore>) -> Self {
        Self {
            node,
            node_credential: OnceLock::new(),
            workload_certs: OnceLock::new(),
            state,
            metrics: OnceLock::new(),
        }
    }
}

/// Runs the proxy until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), ProxyError> {
    let config = Arc::new(config);
    crate::dial::set_mark(config.capture.mark);
    let state = Arc::new(StateStore::new(State::default()));
    let shared = Arc::new(Shared::new(config.node.clone(), state.clone()));

    let admin_address = config.listen.admin;
    let listener =
        admin::bind(admin_address).await.map_err(|source| ProxyError::Listen { address: admin_address, source })?;
    let admin = tokio::spawn(admin::serve(listener, shared.clone(), shutdown.clone()));
    match crate::metrics::install() {
        Ok(handle) => {
            let _ = shared.metrics.set(handle);
        }
        Err(e) => warn!(error = %e, "metrics recorder not installed; /metrics will be empty"),
    }
    let metrics_address = config.listen.metrics;
    let listener = admin::bind(metrics_address).await.map_err(|source| ProxyError::Bind {
        field: "listen.metrics",
        address: metrics_address,
        source,
    })?;
    tokio::spawn(admin::serve_metrics(listener, shared.clone(), shutdown.clone()));

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
    state.store(State::with_root_namespace(node.trust_domain(), config.root_namespace.clone()));
    let _ = shared.workload_certs.set(certs.clone());
    let _ = shared.node_credential.set(node.clone());

    let data = Arc::new(DataPath {
        tls: MeshTls::default(),
        registry: ArcSwap::from_pointee(Registry::default()),
        authz: ArcSwap::from_pointee(LocalPolicies::default()),
        locals: LocalWorkloads::new(&config.workloads, node.trust_domain())?,
        pool: Pool::default(),
        connections: Arc::new(Connections::default()),
        outbound: config.outbound.clone(),
        traffic: TrafficMetrics::default(),
        upstream: crate::l7::Upstream::default(),
    });
    tokio::spawn(follow_changes(config.clone(), data.clone(), certs.clone(), state.clone()));
    tokio::spawn(crate::heap::release_when_quiet());
    let listeners = start_listeners(&config, &data, shared.clone(), shutdown.clone()).await?;

    let manager = CertManager::new(certs, Instant::now());
    Discovery::new(config.clone(), node, state, manager).run(shutdown).await;

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

/// Everything the data path reads per connection; swapped pieces are rebuilt once per change.
pub struct DataPath {
    pub tls: MeshTls,
    pub registry: ArcSwap<Registry>,
    pub authz: ArcSwap<LocalPolicies>,
    pub locals: LocalWorkloads,
    pub pool: Pool,
    pub connections: Arc<Connections>,
    pub outbound: crate::config::Outbound,
    pub traffic: TrafficMetrics,
    /// Pooled connections to local workloads for requests on `http` ports.
    pub upstream: crate::l7::Upstream,
}

/// Rebuilds the TLS configs when a certificate or the trust bundle changes, and the registry index when the
/// mesh state changes; expires idle pooled connections.
async fn follow_changes(config: Arc<Config>, data: Arc<DataPath>, certs: Arc<WorkloadCerts>, state: Arc<StateStore>) {
    let mut cert_changes = certs.subscribe();
    let mut state_changes = state.subscribe();
    let mut bundle: Option<Arc<crate::state::TrustBundle>> = None;
    let mut certs_changed = true;
    let mut reap = tokio::time::interval(std::time::Duration::from_secs(15));
    let mut upkeep = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
    let mut policies: Option<(Arc<trellis_policy::CompiledPolicies>, Arc<_>)> = None;
    loop {
        let current = state.load();
        data.registry.store(Arc::new(Registry::from_state(&current)));
        if !policies.as_ref().is_some_and(|(p, j)| Arc::ptr_eq(p, &current.policies) && Arc::ptr_eq(j, &current.jwks)) {
            let local = LocalPolicies::build(&current.policies, &data.locals, &current.jwks, config.jwt_clock_skew);
            reauthorize(&data, local);
            policies = Some((current.policies.clone(), current.jwks.clone()));
        }
        let same_bundle = match (&bundle, &current.trust_bundle) {
            (Some(old), Some(new)) => Arc::ptr_eq(old, new),
            (None, None) => true,
            _ => false,
        };
        if certs_changed || !same_bundle {
            bundle = current.trust_bundle.clone();
            data.tls.rebuild(&config.workloads, &certs, bundle.as_deref());
        }
        record_health(&certs, &state);
        loop {
            tokio::select! {
                changed = cert_changes.changed() => {
                    if changed.is_err() { return }
                    certs_changed = true;
                    break;
                }
                changed = state_changes.changed() => {
                    if changed.is_err() { return }
                    certs_changed = false;
                    break;
                }
                _ = reap.tick() => data.pool.reap(),
                _ = upkeep.tick() => metrics_upkeep(&data, &certs, &state),
            }
        }
    }
}

/// Refreshes the health gauges and keeps the series of workloads still in the mesh from expiring.
fn metrics_upkeep(data: &DataPath, certs: &WorkloadCerts, state: &StateStore) {
    let registry = data.registry.load();
    let present = registry
        .present()
        .chain(data.locals.all().iter().map(|w| &w.peer))
        .map(|p| (p.namespace.clone(), p.workload.clone()))
        .collect();
    data.traffic.upkeep(&present);
    data.authz.load().decisions.touch();
    record_health(certs, state);
}

fn record_health(certs: &WorkloadCerts, state: &StateStore) {
    let current = state.load();
    let roots = current
        .trust_bundle
        .as_ref()
        .map(|b| b.roots.iter().map(|r| (r.info.sha256.as_str(), r.info.not_after)).collect());
    crate::metrics::record_health(&crate::metrics::Health {
        certificates: certs.all().iter().map(|c| (c.spiffe_id.to_string(), c.info.not_after)).collect(),
        roots: roots.unwrap_or_default(),
        config_version: current.synced.then_some(current.version),
    });
}

/// Installs the policies for the local workloads, then closes every open inbound connection they no longer allow.
/// Tunnels to `http` ports stay: each of their requests is checked against the policies current at that time.
fn reauthorize(data: &DataPath, local: LocalPolicies) {
    let local = Arc::new(local);
    data.authz.store(local.clone());
    let mut closed = data.connections.close_inbound_unless(|conn| match local.check(conn, conn.peer) {
        _ if crate::l7::is_http(conn) => true,
        Some(decision) if decision.allowed => true,
        Some(decision) => {
            info!(source = %conn.source, target = %conn.destination, %decision, "closing connection after a policy change");
            local.decisions.record_closed(&decision);
            false
        }
        None => false,
    });
    closed += data.connections.close_plaintext_unless(|conn| crate::inbound_plaintext::still_allowed(&local, conn));
    if closed > 0 {
        info!(closed, "connections closed by re-evaluation");
    }
}

/// Binds the data-path listeners; a bind failure is fatal (the operator's config names a taken address).
async fn start_listeners(
    config: &Config,
    data: &Arc<DataPath>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ProxyError> {
    let bind = |address: std::net::SocketAddr, field: &'static str| async move {
        tokio::net::TcpListener::bind(address).await.map_err(|source| ProxyError::Bind { field, address, source })
    };
    let mut tasks = Vec::new();
    let hbone = bind(config.listen.hbone, "listen.hbone").await?;
    info!(address = %config.listen.hbone, "HBONE inbound listening");
    tasks.push(tokio::spawn(crate::inbound::serve(hbone, data.clone(), shutdown.clone())));
    let captured = bind(config.listen.outbound, "listen.outbound").await?;
    tasks.push(tokio::spawn(crate::outbound::serve_captured(captured, data.clone())));
    let plaintext = bind(config.listen.inbound, "listen.inbound").await?;
    tasks.push(tokio::spawn(crate::inbound_plaintext::serve(plaintext, data.clone())));
    if let Some(workload) = config.outbound.socks5_workload.and_then(|i| data.locals.get(i)).cloned() {
        let socks5 = bind(config.listen.socks5, "listen.socks5").await?;
        info!(address = %config.listen.socks5, workload = %workload.spiffe_id, "SOCKS5 outbound listening");
        tasks.push(tokio::spawn(crate::socks5::serve(socks5, data.clone(), workload)));
    }
    let ready = bind(config.listen.ready, "listen.ready").await?;
    tasks.push(tokio::spawn(admin::serve_ready(ready, shared, shutdown)));
    Ok(tasks)
}

/// The stored credential, or a new one from a join (retried while the control plane is unreachable).
/// `None` when shutdown came first.
async fn node_credential(
    config: &Config,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<NodeCredential>, ProxyError> {
    let dir = &config.state_dir;
    files::ensure_private_dir(dir).map_err(|source| ProxyError::StateDir { path: dir.clone(), source })?;
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

    let mut backoff = Backoff::control_plane();
    loop {
        info!(address = %config.control_plane.address, node = %config.node, "joining the mesh");
        let attempt = tokio::select! {
            _ = shutdown_requested(&mut shutdown) => return Ok(None),
            attempt = NodeCredential::join(&config.control_plane, &config.node) => attempt,
        };
        match attempt {
            Ok(credential) => {
                credential.save(dir)?;
                info!(state_dir = %dir.display(), "joined; node credential stored");
                return Ok(Some(credential));
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_in = ?delay, "join failed; retrying");
                tokio::select! {
                    _ = shutdown_requested(&mut shutdown) => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
