//! Takes revoked certificates out of the pushed revocation list when they expire (`Mesh::prune_revocations`), so
//! that the list proxies hold stays bounded by what revoked nodes were issued within one certificate lifetime even
//! when nothing else changes (a revocation or a restart would prune them too, but may never come).

use std::sync::Arc;
use std::time::Duration;

use crate::mesh::{Mesh, next_expiry, now_unix};

/// After a failed prune (a store error), when to try again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Runs for the control plane's life: sleeps until the first listed certificate expires (woken earlier by every
/// new snapshot, whose list may differ), then prunes on a blocking thread (a store write).
pub async fn run(mesh: Arc<Mesh>) {
    let mut changes = mesh.subscribe();
    loop {
        let wait = next_expiry(&mesh.current().revocations)
            .map(|at| Duration::from_secs(u64::try_from(at.saturating_sub(now_unix())).unwrap_or(0)));
        tokio::select! {
            () = sleep_or_forever(wait) => {
                let pruning = mesh.clone();
                match tokio::task::spawn_blocking(move || pruning.prune_revocations(now_unix())).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(pruned)) => tracing::info!(pruned, "expired certificates left the revocation list"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot prune expired revoked certificates");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "revocation pruning task failed"),
                }
            }
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}
