//! Join tokens and joins: a token is created for one node and some namespaces, and a join consumes it (checked
//! and used in one transaction, so a single-use token joins once) in exchange for a node credential.

use std::time::Duration;

use trellis_policy::check_dns1123_label;

use super::{Mesh, MeshError, now_unix};
use crate::ca::Issued;
use crate::records::{self, NodeRecord, TokenRecord};
use crate::store::{Table, transact};
use crate::tokens::{self, TokenRefusal};

impl Mesh {
    pub fn create_token(
        &self,
        node: &str,
        namespaces: Vec<String>,
        ttl: Duration,
        reusable: bool,
    ) -> Result<(String, TokenRecord), MeshError> {
        check_dns1123_label(node).map_err(|e| MeshError::InvalidArgument(format!("node name {node:?}: {e}")))?;
        if namespaces.is_empty() {
            return Err(MeshError::InvalidArgument("a token needs at least one namespace".into()));
        }
        for ns in &namespaces {
            check_dns1123_label(ns).map_err(|e| MeshError::InvalidArgument(format!("namespace {ns:?}: {e}")))?;
        }
        if ttl.is_zero() {
            return Err(MeshError::InvalidArgument("token ttl must be positive".into()));
        }
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let new = tokens::generate(node, namespaces, ttl_secs, reusable, now_unix());
        transact::<_, MeshError>(self.store.as_ref(), |txn| {
            records::put(txn, Table::Tokens, &new.record.id, &new.record).map_err(Into::into)
        })?;
        Ok((new.token, new.record))
    }

    pub fn revoke_token(&self, id: &str) -> Result<(), MeshError> {
        transact(self.store.as_ref(), |txn| {
            let mut record: TokenRecord = records::get(txn, Table::Tokens, id)?
                .ok_or_else(|| MeshError::NotFound(format!("token {id:?} not found")))?;
            record.revoked = true;
            records::put(txn, Table::Tokens, id, &record).map_err(Into::into)
        })
    }

    /// Exchanges a join token for a node credential.
    pub fn join(&self, token: &str, node: &str, csr_der: &[u8]) -> Result<(Issued, Vec<String>), MeshError> {
        let (id, secret) = tokens::split(token)?;
        let now = now_unix();
        // Consume the token and record the node in one transaction, so a single-use token joins once.
        let record = transact(self.store.as_ref(), |txn| {
            let mut token: TokenRecord = records::get(txn, Table::Tokens, id)?.ok_or(TokenRefusal::Invalid)?;
            tokens::check(&token, secret, node, now)?;
            if let Some(existing) = records::get::<NodeRecord>(txn, Table::Nodes, node)?
                && existing.revoked
            {
                return Err(MeshError::PermissionDenied(format!("node {node:?} was revoked")));
            }
            token.uses += 1;
            records::put(txn, Table::Tokens, id, &token)?;
            Ok(token)
        })?;
        let (spiffe_id, issued) = self.ca().sign_node(csr_der, node, self.config.node_cert_ttl)?;
        transact::<_, MeshError>(self.store.as_ref(), |txn| {
            let node_record = NodeRecord {
                name: node.to_owned(),
                namespaces: record.namespaces.clone(),
                joined_at: now,
                revoked: false,
                revoked_at: None,
                credential_serial: issued.serial_hex.clone(),
            };
            // Logged first: refused if the node was revoked since the token was checked.
            self.log_certificate(txn, &issued, &spiffe_id, node)?;
            records::put(txn, Table::Nodes, node, &node_record)?;
            Ok(())
        })?;
        tracing::info!(node, "node joined");
        Ok((issued, record.namespaces))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::mesh::testing::{TestMesh, csr, refusal};
    use crate::records::{self, TokenRecord};
    use crate::store::{Table, transact};

    const TTL: Duration = Duration::from_secs(600);

    fn namespaces() -> Vec<String> {
        vec!["shop".to_owned()]
    }

    #[test]
    fn a_single_use_token_joins_once() {
        let mesh = TestMesh::new();
        let (token, _) = mesh.create_token("n1", namespaces(), TTL, false).unwrap();
        let (issued, allowed) = mesh.join(&token, "n1", &csr(None)).unwrap();
        assert_eq!(allowed, namespaces());
        assert!(!issued.chain.is_empty());
        let err = mesh.join(&token, "n1", &csr(None)).unwrap_err();
        assert_eq!(refusal(&err), ("Unauthenticated", "join token was already used".into()));

        // Control: a reusable token joins again.
        let (reusable, _) = mesh.create_token("n2", namespaces(), TTL, true).unwrap();
        mesh.join(&reusable, "n2", &csr(None)).unwrap();
        mesh.join(&reusable, "n2", &csr(None)).unwrap();
    }

    #[test]
    fn an_expired_token_is_refused() {
        let mesh = TestMesh::new();
        let (token, record) = mesh.create_token("n1", namespaces(), TTL, false).unwrap();
        let expired = TokenRecord { expires_at: super::now_unix() - 1, ..record.clone() };
        transact::<_, crate::store::StoreError>(mesh.store(), |txn| {
            records::put(txn, Table::Tokens, &expired.id, &expired)
        })
        .unwrap();
        let err = mesh.join(&token, "n1", &csr(None)).unwrap_err();
        assert_eq!(refusal(&err), ("Unauthenticated", "join token has expired".into()));
        assert!(mesh.active_node("n1").is_err(), "the node was recorded");

        // Control: the same token before its expiry joins.
        transact::<_, crate::store::StoreError>(mesh.store(), |txn| {
            records::put(txn, Table::Tokens, &record.id, &record)
        })
        .unwrap();
        mesh.join(&token, "n1", &csr(None)).unwrap();
    }

    #[test]
    fn a_token_joins_only_its_node() {
        let mesh = TestMesh::new();
        let (token, _) = mesh.create_token("n1", namespaces(), TTL, false).unwrap();
        let err = mesh.join(&token, "n2", &csr(None)).unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", "join token is for node \"n1\", not \"n2\"".into()));
        assert!(mesh.active_node("n2").is_err());
        // Control: the refused attempt did not use the token up; its node joins with it.
        mesh.join(&token, "n1", &csr(None)).unwrap();
    }

    #[test]
    fn revoked_tokens_and_nodes_do_not_join() {
        let mesh = TestMesh::new();
        let (token, record) = mesh.create_token("n1", namespaces(), TTL, true).unwrap();
        mesh.revoke_token(&record.id).unwrap();
        let err = mesh.join(&token, "n1", &csr(None)).unwrap_err();
        assert_eq!(refusal(&err), ("Unauthenticated", "join token was revoked".into()));

        let (token, _) = mesh.create_token("n2", namespaces(), TTL, true).unwrap();
        mesh.join(&token, "n2", &csr(None)).unwrap();
        mesh.revoke_node("n2").unwrap();
        let err = mesh.join(&token, "n2", &csr(None)).unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", "node \"n2\" was revoked".into()));
        assert_eq!(refusal(&mesh.join("nodot", "n2", &csr(None)).unwrap_err()).0, "Unauthenticated");
    }

    #[test]
    fn token_creation_checks_names_and_ttl() {
        let mesh = TestMesh::new();
        let refused = |node: &str, namespaces: Vec<String>, ttl: Duration| {
            refusal(&mesh.create_token(node, namespaces, ttl, false).unwrap_err())
        };
        assert_eq!(refused("", namespaces(), TTL), ("InvalidArgument", "node name \"\": must not be empty".into()));
        assert_eq!(
            refused("N1", namespaces(), TTL),
            (
                "InvalidArgument",
                "node name \"N1\": must be lowercase letters, digits and '-', starting and ending with a letter or \
                 digit"
                    .into()
            )
        );
        assert_eq!(
            refused("n1", vec!["shop-".into()], TTL),
            (
                "InvalidArgument",
                "namespace \"shop-\": must be lowercase letters, digits and '-', starting and ending with a letter \
                 or digit"
                    .into()
            )
        );
        assert_eq!(refused("n1", vec![], TTL), ("InvalidArgument", "a token needs at least one namespace".into()));
        assert_eq!(
            refused("n1", namespaces(), Duration::ZERO),
            ("InvalidArgument", "token ttl must be positive".into())
        );
        // Control: the same request with valid values.
        mesh.create_token("n1", namespaces(), TTL, false).unwrap();
    }
}
