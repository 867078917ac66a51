//! Workload certificates: the CA signs a CSR only for an identity the node may hold (a namespace its token
//! allows, a service account of a workload it fronts); every issued certificate is logged in the store.

use std::collections::BTreeSet;

use trellis_proto::spiffe::SpiffeId;

use super::{Mesh, MeshError, now_unix, revocations};
use crate::ca::Issued;
use crate::records::{self, CertRecord, NodeRecord};
use crate::store::{Table, Txn, transact};

impl Mesh {
    /// Signs a workload certificate for `node` if the identity is one of the workloads it fronts.
    pub fn sign_workload(&self, node: &NodeRecord, csr_der: &[u8]) -> Result<(SpiffeId, Issued), MeshError> {
        // The caller's record may predate a revocation (a stream opened before it): the store says.
        self.active_node(&node.name)?;
        let hosted: BTreeSet<(String, String)> = self
            .current()
            .workloads
            .values()
            .filter(|w| w.node == node.name)
            .map(|w| (w.namespace.clone(), w.service_account.clone()))
            .collect();
        let (id, issued) = self.ca().sign_workload(csr_der, self.config.cert_ttl, |_, namespace, sa| {
            if !node.namespaces.iter().any(|n| n == namespace) {
                return Err(format!("node {:?} may not hold identities in namespace {namespace:?}", node.name));
            }
            if !hosted.contains(&(namespace.to_owned(), sa.to_owned())) {
                return Err(format!("node {:?} fronts no workload with service account {namespace}/{sa}", node.name));
            }
            Ok(())
        })?;
        transact::<_, MeshError>(self.store.as_ref(), |txn| self.log_certificate(txn, &issued, &id, &node.name))?;
        Ok((id, issued))
    }

    /// Records an issued certificate (node credential or workload SVID) in the certificate log; refuses it (so it is
    /// never handed out) when the node or the identity is revoked, in the same transaction.
    pub(super) fn log_certificate(
        &self,
        txn: &mut dyn Txn,
        issued: &Issued,
        id: &SpiffeId,
        node: &str,
    ) -> Result<(), MeshError> {
        revocations::refuse_revoked(txn, node, &id.to_string())?;
        let record = CertRecord {
            serial: issued.serial_hex.clone(),
            identity: id.to_string(),
            node: node.to_owned(),
            issued_at: now_unix(),
            not_after: issued.not_after.unix_timestamp(),
            issuer: issued.chain.get(1).map(|ca| crate::authority::fingerprint(ca)).unwrap_or_default(),
        };
        Ok(records::put(txn, Table::Certificates, &issued.serial_hex, &record)?)
    }
}

#[cfg(test)]
mod tests {
    use crate::ca::CaError;
    use crate::mesh::MeshError;
    use crate::mesh::testing::{TRUST_DOMAIN, TestMesh, csr, hello, workload};
    use crate::records::{self, CertRecord};
    use crate::store::Table;

    fn id(namespace: &str, sa: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}")
    }

    fn refused(err: MeshError) -> String {
        match err {
            MeshError::Ca(CaError::Refused(reason)) => reason,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[test]
    fn a_node_gets_only_identities_it_may_hold() {
        let mesh = TestMesh::new();
        let node = mesh.joined("n1", &["shop"]);
        mesh.register(&node, &hello(vec![workload("shop", "api", "api-sa", &["10.0.0.1"])])).unwrap();

        let err = mesh.sign_workload(&node, &csr(Some(&id("bank", "api-sa")))).unwrap_err();
        assert_eq!(refused(err), "node \"n1\" may not hold identities in namespace \"bank\"");
        let err = mesh.sign_workload(&node, &csr(Some(&id("shop", "other-sa")))).unwrap_err();
        assert_eq!(refused(err), "node \"n1\" fronts no workload with service account shop/other-sa");

        // Control: the identity of a workload it fronts is signed, and logged.
        let (signed, issued) = mesh.sign_workload(&node, &csr(Some(&id("shop", "api-sa")))).unwrap();
        assert_eq!(signed.to_string(), id("shop", "api-sa"));
        let logged: CertRecord = records::load(mesh.store(), Table::Certificates, &issued.serial_hex).unwrap().unwrap();
        assert_eq!((logged.identity.as_str(), logged.node.as_str()), (id("shop", "api-sa").as_str(), "n1"));
    }

    #[test]
    fn another_nodes_workload_is_not_signed() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "api", "api-sa", &["10.0.0.1"])])).unwrap();
        let err = mesh.sign_workload(&n2, &csr(Some(&id("shop", "api-sa")))).unwrap_err();
        assert_eq!(refused(err), "node \"n2\" fronts no workload with service account shop/api-sa");
        // Control: the node that fronts it gets it.
        mesh.sign_workload(&n1, &csr(Some(&id("shop", "api-sa")))).unwrap();
    }
}
