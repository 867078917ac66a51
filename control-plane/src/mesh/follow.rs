//! A replica on a shared store follows the other replicas' writes: the store reports every committed change to the
//! tables a snapshot derives from (etcd's watch, this replica's own writes included), the change is applied key by
//! key to this replica's [`Mirror`] of those tables, and the mirror is published if its config version is newer
//! than the one this replica serves. Only a restarted watch (a reconnect, a compaction) makes the store read those
//! tables whole again ([`Change::Reset`]). The version is a counter bumped in the same transaction as each change,
//! so it is comparable across replicas; a transaction's writes arrive in one change, and everything queued is
//! applied before publishing, so an all-or-nothing apply shows up whole.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::mirror::Mirror;
use super::{Mesh, MeshError, Snapshot, load_state, store_gauges};
use crate::records;
use crate::rotation::{RECORD_KEY, RotationRecord};
use crate::store::{Change, Table};

/// Applies the store's changes to this replica's mirror and publishes it, until the store goes away. When the root CA
/// rotation's record changes (another replica moved it on), `rotation_moved` is notified, so that this replica's
/// rotation loop acts on the new phase now (e.g. refreshes its data dir's admin.yaml) rather than at its next poll.
pub async fn follow_store(
    mesh: Arc<Mesh>,
    mut changes: mpsc::UnboundedReceiver<Change>,
    rotation_moved: Arc<tokio::sync::Notify>,
) {
    mesh.followed.store(true, Ordering::Relaxed);
    let mut mirror = Mirror::default();
    let mut rotation_seen: Option<RotationRecord> = None;
    while let Some(first) = changes.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = changes.try_recv() {
            batch.push(more);
        }
        let mesh = mesh.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let mut changed = false;
            for change in batch {
                changed |= mirror.apply(change);
            }
            if changed {
                // A rotation another replica started or moved on changes this replica's CAs (signer, serving
                // chain) and the bundle it sends; cheap when already followed.
                if let Some(record) = mirror.rotation() {
                    mesh.follow_rotation_logged(&record);
                }
                mesh.publish_mirror(&mirror);
            }
            mirror
        })
        .await;
        match applied {
            Ok(m) => {
                mirror = m;
                let rotation = mirror.rotation();
                if rotation.is_some() && rotation != rotation_seen {
                    rotation_moved.notify_one();
                }
                rotation_seen = rotation;
            }
            Err(e) => {
                tracing::error!(error = %e, "applying the store's changes failed; waiting for the next full read");
                mirror = Mirror::default();
            }
        }
    }
}

impl Mesh {
    fn follow_rotation_logged(&self, record: &RotationRecord) {
        if let Err(e) = self.follow_rotation(record) {
            // The rest of the state still follows; the rotation is tried again at the next change.
            tracing::error!(error = %e, rotation = record.rotation, "cannot follow the root CA rotation");
        }
    }

    /// Reads the store's whole state and publishes it if its version is newer than the current snapshot's (what
    /// a follower's [`Change::Reset`] does, for callers without a follower).
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
        // Read after the version: at least as new as the state loaded.
        let record: Option<RotationRecord> = records::load(self.store.as_ref(), Table::Meta, RECORD_KEY)?;
        if let Some(record) = &record {
            self.follow_rotation_logged(record);
        }
        next.trust_bundle.roots = self.authority().roots().iter().map(|r| r.to_vec()).collect();
        next.trust_bundle.jwks = self.authority().jwks();
        if next.version <= current.version {
            return Ok(false);
        }
        tracing::debug!(from = current.version, to = next.version, "snapshot reloaded from the store");
        store_gauges(&next);
        self.snapshot.send_replace(Arc::new(next));
        Ok(true)
    }

    /// Publishes the mirror if it is loaded and its version is newer than the current snapshot's; returns whether
    /// it did. The bundle's roots are the authority's (a followed rotation changes them); the fetched JWKS are
    /// kept from the current snapshot.
    pub(super) fn publish_mirror(&self, mirror: &Mirror) -> bool {
        let _guard = self.writer.lock().expect("writer lock");
        let current = self.current();
        if !mirror.loaded || mirror.version <= current.version {
            return false;
        }
        let mut trust_bundle = current.trust_bundle.clone();
        trust_bundle.roots = self.authority().roots().iter().map(|r| r.to_vec()).collect();
        let next = Snapshot {
            version: mirror.version,
            trust_bundle,
            workloads: mirror.workloads.clone(),
            resources: mirror.resources.clone(),
            created: Some(std::time::Instant::now()),
            jwks: current.jwks.clone(),
            revocations: mirror.revocations.clone(),
        };
        tracing::debug!(from = current.version, to = next.version, "snapshot followed from the store");
        store_gauges(&next);
        self.snapshot.send_replace(Arc::new(next));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::META_VERSION;
    use crate::store::Table;

    /// The follower publishes a newer version only, and never goes back to an older one.
    #[test]
    fn publishes_only_newer_versions() {
        let mesh = super::super::testing::TestMesh::new();
        let start = mesh.current().version;
        let version = |v: u64| (Table::Meta, META_VERSION.to_owned(), v.to_string().into_bytes());
        let mut mirror = Mirror::default();
        mirror.apply(Change::Reset(vec![version(start)]));
        assert!(!mesh.publish_mirror(&mirror), "the same version is not published again");
        mirror.apply(Change::Delta(vec![
            (
                Table::Workloads,
                "ns/w".into(),
                Some(prost::Message::encode_to_vec(&trellis_proto::v1::Workload::default())),
            ),
            (Table::Meta, META_VERSION.into(), Some((start + 2).to_string().into_bytes())),
        ]));
        assert!(mesh.publish_mirror(&mirror));
        assert_eq!(mesh.current().version, start + 2);
        assert!(mesh.current().workloads.contains_key("ns/w"));
        mirror.apply(Change::Delta(vec![version(start + 1)].into_iter().map(|(t, k, v)| (t, k, Some(v))).collect()));
        assert!(!mesh.publish_mirror(&mirror), "an older version is never published");
        assert_eq!(mesh.current().version, start + 2);
    }
}
