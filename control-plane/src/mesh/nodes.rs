//! Nodes after they joined: whether one may still use its credential, and revoking one.

use std::sync::Arc;

use super::{Mesh, MeshError, claims, eligibility, now_unix, revocations};
use crate::records::{self, META_VERSION, NodeRecord};
use crate::store::Table;

impl Mesh {
    /// The node's record if it may use its credential (joined, not revoked).
    pub fn active_node(&self, node: &str) -> Result<NodeRecord, MeshError> {
        match records::load::<NodeRecord>(self.store.as_ref(), Table::Nodes, node)? {
            Some(record) if !record.revoked => Ok(record),
            Some(_) => Err(MeshError::PermissionDenied(format!("node {node:?} was revoked"))),
            None => Err(MeshError::PermissionDenied(format!("node {node:?} has not joined"))),
        }
    }

    /// Marks the node revoked (which lists its serial tag: every workload certificate issued to it), removes its
    /// workloads from the registry and revokes every unexpired certificate the log holds for it (its node credentials;
    /// workload certificates logged before tags) (`revocations`), all in one version that every proxy is pushed.
    pub fn revoke_node(&self, node: &str) -> Result<(), MeshError> {
        let now = now_unix();
        let (removed, certificates, _) = self.write(
            |txn| {
                let mut record: NodeRecord = records::get(txn, Table::Nodes, node)?
                    .ok_or_else(|| MeshError::NotFound(format!("node {node:?} not found")))?;
                record.revoked = true;
                record.revoked_at = Some(now);
                records::put(txn, Table::Nodes, node, &record)?;
                eligibility::changed(txn)?;
                let declared = claims::load_declared(txn, node)?;
                for key in declared.keys() {
                    txn.delete(Table::Workloads, key)?;
                }
                claims::reindex(txn, &declared, &Default::default())?;
                claims::set_declared_by(txn, node, &Default::default())?;
                let removed: Vec<String> = declared.into_keys().collect();
                let certificates = revocations::revoke_node_certificates(txn, node, now)?;
                let list = Arc::new(revocations::in_txn(txn, now)?);
                Ok(((removed, certificates, list), Some(records::bump(txn, META_VERSION)?)))
            },
            |(removed, _, list), snapshot| {
                for key in removed {
                    snapshot.workloads.remove(key);
                }
                snapshot.revocations = list.clone();
            },
        )?;
        metrics::counter!("trellis_revocations_total", "kind" => "node").increment(1);
        tracing::warn!(node, workloads_removed = removed.len(), certificates_revoked = certificates, "node revoked");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::mesh::testing::{TestMesh, hello, refusal, workload};

    #[test]
    fn only_joined_unrevoked_nodes_are_active() {
        let mesh = TestMesh::new();
        let err = mesh.active_node("n1").unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", "node \"n1\" has not joined".into()));

        // Control: a joined node is active.
        let node = mesh.joined("n1", &["shop"]);
        assert_eq!(node.namespaces, ["shop"]);
        mesh.revoke_node("n1").unwrap();
        assert_eq!(
            refusal(&mesh.active_node("n1").unwrap_err()),
            ("PermissionDenied", "node \"n1\" was revoked".into())
        );
        assert_eq!(refusal(&mesh.revoke_node("n9").unwrap_err()), ("NotFound", "node \"n9\" not found".into()));
    }

    #[test]
    fn revoking_a_node_removes_its_workloads() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "a", &["10.0.0.1"])])).unwrap();
        mesh.register(&n2, &hello(vec![workload("shop", "b", "b", &["10.0.0.2"])])).unwrap();
        mesh.revoke_node("n1").unwrap();
        let workloads: Vec<String> = mesh.current().workloads.keys().cloned().collect();
        assert_eq!(workloads, ["shop/b"], "n1's workload is gone, n2's stays");
    }
}
