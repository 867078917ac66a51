//! Workload certificates: the CA signs a CSR only for an identity the node may hold (a namespace its token
//! allows, a service account of a workload it fronts); every issued certificate is logged in the store.

use std::collections::BTreeSet;

use trellis_proto::spiffe::{SpiffeId, Subject};

use super::{Mesh, MeshError, now_unix, revocations};
use crate::ca::{CaError, Issued};
use crate::records::{self, CertRecord, NodeRecord};
use crate::store::{Table, Txn, transact};

impl Mesh {
    /// Signs a workload certificate for `node` if the identity is one of the workloads it fronts.
    pub fn sign_workload(&self, node: &NodeRecord, csr_der: &[u8]) -> Result<(SpiffeId, Issued), MeshError> {
        // The caller's record may predate a revocation (a stream opened before it): the store says.
        self.active_node(&node.name)?;
        let hosted = self.hosted(node);
        let (id, issued) = self
            .ca()
            .sign_workload(csr_der, self.config.cert_ttl, |_, namespace, sa| may_hold(node, &hosted, namespace, sa))?;
        transact::<_, MeshError>(self.store.as_ref(), |txn| self.log_certificate(txn, &issued, &id, &node.name))?;
        Ok((id, issued))
    }

    /// The (namespace, service account) of every workload `node` fronts.
    fn hosted(&self, node: &NodeRecord) -> BTreeSet<(String, String)> {
        (self.current().workloads.values())
            .filter(|w| w.node == node.name)
            .map(|w| (w.namespace.clone(), w.service_account.clone()))
            .collect()
    }

    /// Signs a JWT-SVID for `spiffe_id` with `audiences`, with the key of the CA that signs now, if `node` may hold
    /// the identity (the same check as for its X.509-SVIDs) and neither is revoked. The token and its `exp`.
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
        self.active_node(&node.name)?;
        may_hold(node, &self.hosted(node), namespace, service_account).map_err(MeshError::PermissionDenied)?;
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
}
