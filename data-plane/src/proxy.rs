//! Startup order and the handles the parts share: admin endpoint first (so readiness is observable
//! during the join), then the node credential, then the discovery stream until shutdown.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};
use trellis_proto::spiffe::SpiffeId;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::discovery::Discovery;
use crate::identity::certs::rfc3339;
use crate::identity::{CertManager, NodeCredential, NodeError, WorkloadCerts, files};
use crate::state::{State, StateStore};
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
}

/// What the admin endpoint (and later the data path) reads. Filled in as startup progresses.
pub struct Shared {
    pub node: String,
    pub node_credential: OnceLock<Arc<NodeCredential>>,
    pub workload_certs: OnceLock<Arc<WorkloadCerts>>,
    pub state: Arc<StateStore>,
}

impl Shared {
    pub fn new(node: String, state: Arc<StateStore>) -> Self {
        Self { node, node_credential: OnceLock::new(), workload_certs: OnceLock::new(), state }
    }
}

/// Runs the proxy until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<(), ProxyError> {
    let config = Arc::new(config);
    let state = Arc::new(StateStore::new(State::default()));
    let shared = Arc::new(Shared::new(config.node.clone(), state.clone()));

    let admin_address = config.listen.admin;
    let listener =
        admin::bind(admin_address).await.map_err(|source| ProxyError::Listen { address: admin_address, source })?;
    let admin = tokio::spawn(admin::serve(listener, shared.clone(), shutdown.clone()));

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
    state.store(State::new(node.trust_domain()));
    let _ = shared.workload_certs.set(certs.clone());
    let _ = shared.node_credential.set(node.clone());

    let manager = CertManager::new(certs, Instant::now());
    Discovery::new(config.clone(), node, state, manager).run(shutdown).await;
    let _ = admin.await;
    info!("stopped");
    Ok(())
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
