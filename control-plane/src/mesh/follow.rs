//! A replica on a shared store follows the other replicas' writes: on every change the store reports (etcd's
//! watch, this replica's own writes included), the snapshot is read again from the store and published if its
//! config version is newer than the one this replica serves. The version is a counter bumped in the same
//! transaction as each change, so it is comparable across replicas.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Mesh, MeshError, Snapshot, load_state, store_gauges};
use crate::records;
use crate::rotation::{RECORD_KEY, RotationRecord};
use crate::store::Table;

/// Reloads on every change of `changes` until the store goes away. A failed reload (etcd unavailable) is retried
/// on the next change; the watch reports its own restart as a change, so recovery reloads.
pub async fn follow_store(mesh: Arc<Mesh>, mut changes: watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        let mesh = mesh.clone();
        match tokio::task::spawn_blocking(move || mesh.reload()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "reloading from the store failed; keeping the last snapshot"),
            Err(e) => tracing::error!(error = %e, "reload task failed"),
        }
    }
}

impl Mesh {
    /// Reads the store's state and publishes it if its version is newer than the current snapshot's.
    pub fn reload(&self) -> Result<bool, MeshError> {
        let _guard = self.writer.lock().expect("writer lock");
        let current = self.current();
        let mut next = Snapshot {
            trust_bundle: current.trust_bundle.clone(),
            jwks: current.jwks.clone(),
            created: Some(std::time::Instant::now()),
            ..Default::default()
        };
        load_state(self.store.as_ref(), &mut next)?;
        // Read after the version: at least as new as the state loaded. A rotation another replica started or
        // moved on changes this replica's CAs (signer, serving chain) and the bundle it sends.
        let record: Option<RotationRecord> = records::load(self.store.as_ref(), Table::Meta, RECORD_KEY)?;
        if let Some(record) = &record
            && let Err(e) = self.follow_rotation(record)
        {
            // The rest of the state still follows; the rotation is tried again at the next change.
            tracing::error!(error = %e, rotation = record.rotation, "cannot follow the root CA rotation");
        }
        next.trust_bundle.roots = self.authority().roots().iter().map(|r| r.to_vec()).collect();
        if next.version <= current.version {
            return Ok(false);
        }
        tracing::debug!(from = current.version, to = next.version, "snapshot reloaded from the store");
        store_gauges(&next);
        self.snapshot.send_replace(Arc::new(next));
        Ok(true)
    }
}
