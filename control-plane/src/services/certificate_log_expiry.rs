//! Deletes the certificate log's keys whose every record has expired (`Mesh::forget_expired_certificates`), so
//! that the log holds about one certificate lifetime of records. Every replica sweeps (the deletes are idempotent);
//! a node's revocation also deletes them, in its own transaction, as it lists the log.

use std::sync::Arc;
use std::time::Duration;

use crate::mesh::{Mesh, now_unix};

/// How often the log is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Runs for the control plane's life: sweeps every [`SWEEP_EVERY`], on a blocking thread (store reads and writes).
pub async fn run(mesh: Arc<Mesh>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let sweeping = mesh.clone();
        match tokio::task::spawn_blocking(move || sweeping.forget_expired_certificates(now_unix())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => tracing::info!(deleted, "expired certificates left the certificate log"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete expired certificates from the log"),
            Err(e) => tracing::warn!(error = %e, "certificate log sweep task failed"),
        }
    }
}
