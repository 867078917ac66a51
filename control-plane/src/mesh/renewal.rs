//! Node credentials renewed over the authenticated discovery stream: a node that is still active (joined, not
//! revoked) gets a credential for a new key, signed by the CA that signs now; its record names the new serial.

use super::{Mesh, MeshError};
use crate::ca::Issued;
use crate::records::{self, NodeRecord};
use crate::store::{Table, transact};

impl Mesh {
    /// Signs a new node credential for `node` (the CSR gives the key only). Refused for a revoked node, checked again
    /// in the transaction that records the new serial, so a revocation racing the renewal wins.
    pub fn renew_node(&self, node: &str, csr_der: &[u8]) -> Result<Issued, MeshError> {
        self.active_node(node)?;
        let (spiffe_id, issued) = self.ca().sign_node(csr_der, node, self.config.node_cert_ttl)?;
        transact::<_, MeshError>(self.store.as_ref(), |txn| {
            let mut record: NodeRecord = records::get(txn, Table::Nodes, node)?
                .ok_or_else(|| MeshError::PermissionDenied(format!("node {node:?} has not joined")))?;
            if record.revoked {
                return Err(MeshError::PermissionDenied(format!("node {node:?} was revoked")));
            }
            record.credential_serial = issued.serial_hex.clone();
            records::put(txn, Table::Nodes, node, &record)?;
            self.log_certificate(txn, &issued, &spiffe_id, node)?;
            Ok(())
        })?;
        tracing::info!(node, serial = %issued.serial_hex, "node credential renewed");
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use crate::mesh::testing::{TestMesh, csr, refusal};

    #[test]
    fn an_active_node_renews_and_a_revoked_one_cannot() {
        let mesh = TestMesh::new();
        let joined = mesh.joined("n1", &["shop"]);
        let issued = mesh.renew_node("n1", &csr(None)).unwrap();
        assert_ne!(issued.serial_hex, joined.credential_serial, "a new certificate");
        assert_eq!(mesh.active_node("n1").unwrap().credential_serial, issued.serial_hex, "the record names it");

        mesh.revoke_node("n1").unwrap();
        let err = mesh.renew_node("n1", &csr(None)).unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", "node \"n1\" was revoked".into()));
        let err = mesh.renew_node("n9", &csr(None)).unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", "node \"n9\" has not joined".into()));
    }
}
