//! Workload certificates: the CA signs a CSR only for an identity the node may hold (a namespace its token
//! allows, a service account of a workload it fronts) and not revoked, as this replica's snapshot says; nothing is
//! written. The serial starts with the node's tag (`serial_tag.rs`), which a node's revocation lists for good, so a
//! certificate signed by a replica that has not seen the revocation yet is refused by the proxies all the same
//! (`revocations.rs`). Node credentials (joins, renewals) are logged in the transaction that writes the node's
//! record, which refuses a revoked node.

use std::collections::BTreeSet;

use trellis_proto::spiffe::{SpiffeId, Subject};

use super::{Mesh, MeshError, Snapshot, cert_log, now_unix, revocations};
use crate::ca::{CaError, Issued};
use crate::records::{CertRecord, NodeRecord};
use crate::serial_tag::NodeTag;
use crate::store::{StoreError, Table, Txn, transact};

/// Deletes per transaction when expired keys leave the log (within etcd's default 128 operations).
const SWEEP_BATCH: usize = 100;

impl Mesh {
    /// Signs a workload certificate for `node` if, in this replica's snapshot, the identity is one of the workloads
    /// it fronts (a revoked node's workloads left the registry with its revocation) and is not revoked. The serial
    /// carries the node's tag, so a revocation this snapshot has not seen yet revokes the certificate too.
    pub fn sign_workload(&self, node: &NodeRecord, csr_der: &[u8]) -> Result<(SpiffeId, Issued), MeshError> {
        let snapshot = self.current();
        let hosted = hosted(&snapshot, node);
        let mut revoked = None;
        let signed = self.ca().sign_workload(csr_der, self.config.cert_ttl, &NodeTag::of(&node.name), |id, ns, sa| {
            may_hold(node, &hosted, ns, sa)?;
            let id = id.to_string();
            if snapshot.revocations.identities.iter().any(|r| r.spiffe_id == id) {
                let reason = format!("identity {id} was revoked");
                revoked = Some(reason.clone());
                return Err(reason);
            }
            Ok(())
        });
        match (signed, revoked) {
            (Ok(signed), _) => Ok(signed),
            (Err(_), Some(reason)) => Err(MeshError::PermissionDenied(reason)),
            (Err(e), None) => {
                // A revoked node's workloads left the registry with its revocation: say that it was revoked rather
                // than what the CA found wrong (the store says; only refusals pay this read).
                self.active_node(&node.name)?;
                Err(e.into())
            }
        }
    }

    /// Deletes the certificate log's keys whose every record has expired at `now` (batches, and single records of
    /// the layout before batches), at most [`SWEEP_BATCH`] per transaction; returns how many keys went. Read outside
    /// a transaction, deleted without comparing: a key of the log is written once, never rewritten, and what has
    /// expired stays expired, so nothing a revocation needs can go. `services::certificate_log_expiry` calls it.
    pub fn forget_expired_certificates(&self, now: i64) -> Result<usize, MeshError> {
        let expired = cert_log::expired(&self.store.list(Table::Certificates)?, now)?;
        for chunk in expired.chunks(SWEEP_BATCH) {
            transact::<_, StoreError>(self.store.as_ref(), |txn| {
                chunk.iter().try_for_each(|key| txn.delete(Table::Certificates, key))
            })?;
        }
        Ok(expired.len())
    }

    /// Signs a JWT-SVID for `spiffe_id` with `audiences`, with the key of the CA that signs now, if `node` may hold
    /// the identity (the same check as for its X.509-SVIDs) and the identity is not revoked. `node` is the record the
    /// caller has just read with [`Mesh::active_node`] (which refuses a revoked node). The token and its `exp`.
    pub fn sign_jwt_svid(
        &self,
        node: &NodeRecord,
        spiffe_id: &str,
        audiences: &[String],
    ) -> Result<(String, i64), MeshError> {
        let id = SpiffeId::parse(spiffe_id)
            .map_err(|e| MeshError::InvalidArgument(format!("spiffe_id {spiffe_id:?}: {e}")))?;
        let Subject::Workload { namespace, service_account } = id.subject() else {
            return Err(MeshError::InvalidArgument(format!("spiffe_id {spiffe_id:?} is not a workload identity")));
        };
        if id.trust_domain() != self.trust_domain() {
            return Err(MeshError::PermissionDenied(format!(
                "spiffe_id {spiffe_id:?} is not of this mesh's trust domain {:?}",
                self.trust_domain()
            )));
        }
        if audiences.is_empty() || audiences.iter().any(|a| a.is_empty()) {
            return Err(MeshError::InvalidArgument("audiences: at least one, none empty".into()));
        }
        may_hold(node, &hosted(&self.current(), node), namespace, service_account)
            .map_err(MeshError::PermissionDenied)?;
        let id_text = id.to_string();
        if self.current().revocations.identities.iter().any(|r| r.spiffe_id == id_text) {
            return Err(MeshError::PermissionDenied(format!("identity {id_text} was revoked")));
        }
        let now = now_unix();
        let exp = now + self.config.jwt_svid_ttl.as_secs() as i64;
        let issuer = format!("spiffe://{}", self.trust_domain());
        let ca = self.ca();
        let token = (ca.jwt_key().sign(&issuer, &id_text, audiences, now, exp))
            .map_err(|e| MeshError::Ca(CaError::Material(e.to_string())))?;
        tracing::info!(
            node = %node.name,
            spiffe_id = %id_text,
            audiences = ?audiences,
            kid = ca.jwt_key().kid(),
            exp,
            "JWT-SVID issued"
        );
        Ok((token, exp))
    }

    /// Records an issued node credential in the certificate log; refuses it (so it is never handed out) when the
    /// node is revoked, in the same transaction.
    pub(super) fn log_certificate(
        &self,
        txn: &mut dyn Txn,
        issued: &Issued,
        id: &SpiffeId,
        node: &str,
    ) -> Result<(), MeshError> {
        revocations::refuse_revoked(txn, node, &id.to_string())?;
        let record = certificate_record(issued, id, node);
        Ok(cert_log::append(txn, &[&record])?)
    }
}

/// The certificate log's record of `issued`.
fn certificate_record(issued: &Issued, id: &SpiffeId, node: &str) -> CertRecord {
    CertRecord {
        serial: issued.serial_hex.clone(),
        identity: id.to_string(),
        node: node.to_owned(),
        issued_at: now_unix(),
        not_after: issued.not_after.unix_timestamp(),
        issuer: issued.chain.get(1).map(|ca| crate::authority::fingerprint(ca)).unwrap_or_default(),
    }
}

/// The (namespace, service account) of every workload `node` fronts in `snapshot`.
fn hosted(snapshot: &Snapshot, node: &NodeRecord) -> BTreeSet<(String, String)> {
    (snapshot.workloads.values())
        .filter(|w| w.node == node.name)
        .map(|w| (w.namespace.clone(), w.service_account.clone()))
        .collect()
}

/// Whether `node` may hold the workload identity `namespace`/`sa`: a namespace its join token allows and a service
/// account of a workload it fronts. The error is the refusal's reason.
fn may_hold(node: &NodeRecord, hosted: &BTreeSet<(String, String)>, namespace: &str, sa: &str) -> Result<(), String> {
    if !node.namespaces.iter().any(|n| n == namespace) {
        return Err(format!("node {:?} may not hold identities in namespace {namespace:?}", node.name));
    }
    if !hosted.contains(&(namespace.to_owned(), sa.to_owned())) {
        return Err(format!("node {:?} fronts no workload with service account {namespace}/{sa}", node.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::ca::CaError;
    use crate::mesh::testing::{TRUST_DOMAIN, TestMesh, csr, hello, refusal, workload};
    use crate::mesh::{Mesh, MeshError};
    use crate::records::CertRecord;
    use crate::serial_tag::NodeTag;
    use crate::store::Table;

    fn id(namespace: &str, sa: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}")
    }

    /// Every record of the certificate log.
    fn in_log(mesh: &Mesh) -> Vec<CertRecord> {
        super::cert_log::all(&mesh.store().list(Table::Certificates).unwrap()).unwrap()
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

        // Control: the identity of a workload it fronts is signed, its serial tagged with the node, and not logged.
        let (signed, issued) = mesh.sign_workload(&node, &csr(Some(&id("shop", "api-sa")))).unwrap();
        assert_eq!(signed.to_string(), id("shop", "api-sa"));
        assert!(tagged(&issued.serial_hex, "n1"), "{}", issued.serial_hex);
        assert!(in_log(&mesh).iter().all(|r| r.serial != issued.serial_hex), "workload certificates are not logged");
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

    #[test]
    fn a_jwt_svid_is_signed_only_for_identities_the_node_may_hold() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "api", "api-sa", &["10.0.0.1"])])).unwrap();
        let aud = vec!["orders".to_string()];
        let denied = |e: MeshError| match e {
            MeshError::PermissionDenied(reason) => reason,
            other => panic!("not a PermissionDenied: {other:?}"),
        };
        let err = mesh.sign_jwt_svid(&n2, &id("shop", "api-sa"), &aud).unwrap_err();
        assert_eq!(denied(err), "node \"n2\" fronts no workload with service account shop/api-sa");
        let err = mesh.sign_jwt_svid(&n1, &id("bank", "api-sa"), &aud).unwrap_err();
        assert_eq!(denied(err), "node \"n1\" may not hold identities in namespace \"bank\"");
        let err = mesh.sign_jwt_svid(&n1, &id("shop", "api-sa"), &[]).unwrap_err();
        assert!(matches!(&err, MeshError::InvalidArgument(r) if r.contains("audiences")), "{err:?}");

        // Control: the node that fronts it gets a token that verifies against the bundle's JWKS.
        let (token, exp) = mesh.sign_jwt_svid(&n1, &id("shop", "api-sa"), &aud).unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&mesh.current().trust_bundle.jwks).unwrap();
        let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&kid).expect("kid in the JWKS")).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&["orders"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).unwrap().claims;
        assert_eq!(claims["sub"], id("shop", "api-sa"));
        assert_eq!(claims["iss"], format!("spiffe://{TRUST_DOMAIN}"));
        assert_eq!(claims["exp"], exp);
        let lifetime = exp - claims["iat"].as_i64().unwrap();
        assert_eq!(lifetime, crate::jwt_key::DEFAULT_JWT_TTL.as_secs() as i64);

        // A revoked identity gets no token.
        mesh.revoke_identity(&id("shop", "api-sa")).unwrap();
        let err = mesh.sign_jwt_svid(&n1, &id("shop", "api-sa"), &aud).unwrap_err();
        assert!(denied(err).contains("was revoked"));
    }

    /// Whether `serial` (hex) starts with `node`'s tag.
    fn tagged(serial: &str, node: &str) -> bool {
        serial.starts_with(&NodeTag::of(node).hex())
    }

    /// A replica whose snapshot still sees a node active after another replica revoked it signs the node a
    /// certificate (the signing reads and writes nothing in the store); its serial carries the tag the revocation
    /// list names, so proxies refuse it. Another node's certificate, signed by the same replica at the same time,
    /// does not carry it (the control). A replica that has seen the revocation refuses, with the reason.
    #[test]
    fn a_replica_that_missed_a_revocation_signs_a_certificate_the_revocation_list_names() {
        let (mesh, probe) = TestMesh::probed();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.register(&n1, &hello(vec![workload("shop", "a", "api", &["10.0.0.1"])])).unwrap();
        mesh.register(&n2, &hello(vec![workload("shop", "b", "api", &["10.0.0.2"])])).unwrap();
        let stale = mesh.replica();
        mesh.revoke_node("n1").unwrap();
        let revoked_tags: Vec<(String, String)> =
            mesh.revocations().nodes.iter().map(|n| (n.node.clone(), n.serial_tag.clone())).collect();
        assert_eq!(revoked_tags, [("n1".to_owned(), NodeTag::of("n1").hex())]);

        let transactions = probe.updates();
        let (_, on_n1) = stale.sign_workload(&n1, &csr(Some(&id("shop", "api")))).expect("the stale replica signs");
        let (_, on_n2) = stale.sign_workload(&n2, &csr(Some(&id("shop", "api")))).expect("control: n2 signed");
        assert_eq!(probe.updates(), transactions, "signing wrote nothing");
        assert_eq!(on_n1.serial_hex.len(), 40, "20 bytes: the tag, then 12 random bytes");
        let listed = |serial: &str| revoked_tags.iter().any(|(_, tag)| serial.starts_with(tag.as_str()));
        assert!(listed(&on_n1.serial_hex), "n1's certificate carries the revoked tag: {}", on_n1.serial_hex);
        assert!(!listed(&on_n2.serial_hex), "n2's does not: {}", on_n2.serial_hex);
        assert!(tagged(&on_n2.serial_hex, "n2"));

        // The replica that saw the revocation refuses n1, saying why; n2 is still signed there.
        let err = mesh.sign_workload(&n1, &csr(Some(&id("shop", "api")))).unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", "node \"n1\" was revoked".into()));
        mesh.sign_workload(&n2, &csr(Some(&id("shop", "api")))).unwrap();
    }
}
