//! The gRPC services: thin translations between the wire contract and [`crate::mesh::Mesh`].

pub mod admin;
pub mod certificate_log_expiry;
pub mod discovery;
pub mod history;
pub mod identity;
pub mod mesh_status;
pub mod renewal;
pub mod revocation_expiry;
pub mod rotation;
pub mod scope;
pub mod steps;

use std::sync::Arc;

use tokio::sync::watch;

use crate::holdings::Holdings;
use crate::mesh::Mesh;
use crate::status::ProxyRegistry;

/// What every service shares.
#[derive(Clone)]
pub struct Shared {
    pub mesh: Arc<Mesh>,
    pub proxies: Arc<ProxyRegistry>,
    /// Becomes true when the control plane shuts down: every discovery stream then ends (with `UNAVAILABLE`), so
    /// that the server's graceful shutdown is not held open by streams that never end on their own.
    pub shutdown: watch::Receiver<bool>,
    /// The certificates each proxy reported holding (root rotation).
    pub holdings: Arc<Holdings>,
    /// Wakes the root rotation's driver (a rotation started or resumed).
    pub rotation_wake: Arc<tokio::sync::Notify>,
    /// Recent snapshots by version, for proxies that resume (`history.rs`).
    pub history: Arc<history::History>,
    /// The recent steps from one snapshot to the next, computed once and shared by the streams (`steps.rs`).
    pub steps: Arc<steps::Steps>,
    /// SHA-256 of the root this replica's serving certificate chains to (`serving.rs` sets it at each rebuild; empty
    /// before the first): a root rotation retires the old root only once every replica's is the new one.
    pub serving_root: Arc<std::sync::Mutex<String>>,
}

impl Shared {
    /// Resolves once shutdown has begun (or its sender is gone).
    pub async fn shutting_down(&self) {
        let mut shutdown = self.shutdown.clone();
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    }
}
