//! Revocation: revoked nodes (by the tag that starts the serial of every workload certificate issued to them, and
//! their logged certificates by serial) and revoked workload identities (by SPIFFE ID), recorded in the store and
//! published in the snapshot as the list every proxy enforces.
//!
//! Why a tag for nodes: a node's workload SVIDs name identities that other nodes hold too (one service account on
//! several hosts), so only what was issued *to that node* identifies it. Every workload certificate's serial starts
//! with its node's tag (`serial_tag.rs`), so revoking the node names every workload certificate it holds or will
//! ever be given, with no record of each: a replica whose snapshot has not seen the revocation yet (or never will,
//! cut off from the store) still signs with the tag, and proxies refuse that certificate as soon as they have the
//! list. The tag stays listed for good (a revoked node never gets another certificate, and no time bound on a
//! lagging replica is needed); the list grows by one entry per revoked node, as identities do.
//!
//! Node credentials (joins, renewals) are still logged, in the transaction that writes the node's record and
//! refuses a revoked node ([`refuse_revoked`]); revoking a node lists the log and revokes them by serial, with the
//! workload certificates of stores written before tags (`cert_log.rs` reads every layout). Revoked certificates
//! leave the pushed list once expired (proxies refuse them anyway).

use std::sync::Arc;

use trellis_proto::spiffe::{SpiffeId, Subject};
use trellis_proto::v1 as pb;

use super::{Mesh, MeshError, cert_log, eligibility, now_unix};
use crate::records::{self, META_VERSION, NodeRecord, RevokedCertRecord, RevokedIdentityRecord};
use crate::serial_tag::NodeTag;
use crate::store::{Store, StoreError, Table, Txn};

type Entries = Vec<(String, Vec<u8>)>;

/// The list proxies enforce, from the store: revoked certificates not expired at `now`, every revoked identity and
/// every revoked node's tag.
pub(super) fn load(store: &dyn Store, now: i64) -> Result<pb::Revocations, StoreError> {
    let (certificates, identities) = (store.list(Table::RevokedCertificates)?, store.list(Table::RevokedIdentities)?);
    build(certificates, identities, revoked_nodes(store.list(Table::Nodes)?)?, now)
}

/// The same list inside a transaction, after its writes.
pub(super) fn in_txn(txn: &dyn Txn, now: i64) -> Result<pb::Revocations, StoreError> {
    let (certificates, identities) = (txn.list(Table::RevokedCertificates)?, txn.list(Table::RevokedIdentities)?);
    build(certificates, identities, revoked_nodes(txn.list(Table::Nodes)?)?, now)
}

/// The revoked nodes among the node records `entries` (name, when revoked: 0 if not recorded). Derived from the node
/// records, not kept apart, so that a node revoked by a replica of the previous version during a rolling upgrade
/// (which marks the record and knows nothing of tags) has its tag listed too.
pub(super) fn revoked_nodes(entries: Entries) -> Result<Vec<(String, i64)>, StoreError> {
    let mut revoked = Vec::new();
    for (key, bytes) in entries {
        let record: NodeRecord = records::decode(Table::Nodes, &key, &bytes)?;
        if record.revoked {
            revoked.push((record.name, record.revoked_at.unwrap_or(0)));
        }
    }
    Ok(revoked)
}

/// The list from the revocation tables' entries and the revoked nodes.
pub(super) fn build(
    certificates: Entries,
    identities: Entries,
    nodes: Vec<(String, i64)>,
    now: i64,
) -> Result<pb::Revocations, StoreError> {
    let mut list = pb::Revocations::default();
    for (key, bytes) in certificates {
        let record: RevokedCertRecord = records::decode(Table::RevokedCertificates, &key, &bytes)?;
        if record.not_after > now {
            list.certificates.push(pb::RevokedCertificate {
                serial: record.serial,
                node: record.node,
                spiffe_id: record.identity,
                not_after_unix: record.not_after,
            });
        }
    }
    for (key, bytes) in identities {
        let record: RevokedIdentityRecord = records::decode(Table::RevokedIdentities, &key, &bytes)?;
        list.identities.push(pb::RevokedIdentity { spiffe_id: record.spiffe_id, revoked_at_unix: record.revoked_at });
    }
    for (node, revoked_at) in nodes {
        let serial_tag = NodeTag::of(&node).hex();
        list.nodes.push(pb::RevokedNode { node, serial_tag, revoked_at_unix: revoked_at });
    }
    Ok(list)
}

/// Forgets revoked certificates expired at `now`; returns how many.
fn forget_expired(txn: &mut dyn Txn, now: i64) -> Result<usize, StoreError> {
    let mut forgotten = 0;
    for (key, bytes) in txn.list(Table::RevokedCertificates)? {
        let record: RevokedCertRecord = records::decode(Table::RevokedCertificates, &key, &bytes)?;
        if record.not_after <= now {
            txn.delete(Table::RevokedCertificates, &key)?;
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

/// When the first certificate of `list` expires (it then leaves the list: [`Mesh::prune_revocations`]).
pub fn next_expiry(list: &pb::Revocations) -> Option<i64> {
    list.certificates.iter().map(|c| c.not_after_unix).min()
}

/// Revokes every certificate the log holds for `node` that has not expired at `now` (both layouts of the log,
/// `cert_log.rs`), forgets revoked certificates that have, and deletes the log's keys whose every record has
/// expired; returns how many were revoked.
pub(super) fn revoke_node_certificates(txn: &mut dyn Txn, node: &str, now: i64) -> Result<usize, StoreError> {
    forget_expired(txn, now)?;
    let entries = txn.list(Table::Certificates)?;
    let mut revoked = 0;
    for cert in cert_log::all(&entries)? {
        if cert.node != node || cert.not_after <= now {
            continue;
        }
        let record = RevokedCertRecord {
            serial: cert.serial.clone(),
            identity: cert.identity,
            node: cert.node,
            not_after: cert.not_after,
            revoked_at: now,
        };
        records::put(txn, Table::RevokedCertificates, &cert.serial, &record)?;
        revoked += 1;
    }
    for key in cert_log::expired(&entries, now)? {
        txn.delete(Table::Certificates, &key)?;
    }
    Ok(revoked)
}

/// In the transaction that logs a new certificate for `identity` issued to `node`: refuses it when the node or the
/// identity is revoked.
pub(super) fn refuse_revoked(txn: &dyn Txn, node: &str, identity: &str) -> Result<(), MeshError> {
    if records::get::<NodeRecord>(txn, Table::Nodes, node)?.is_some_and(|n| n.revoked) {
        return Err(MeshError::PermissionDenied(format!("node {node:?} was revoked")));
    }
    if txn.get(Table::RevokedIdentities, identity)?.is_some() {
        return Err(MeshError::PermissionDenied(format!("identity {identity} was revoked")));
    }
    Ok(())
}

impl Mesh {
    /// Revokes a workload identity mesh-wide: proxies refuse every certificate naming it, and no new one is signed.
    /// Returns false when it was already revoked.
    pub fn revoke_identity(&self, spiffe_id: &str) -> Result<bool, MeshError> {
        let id = SpiffeId::parse(spiffe_id)
            .map_err(|e| MeshError::InvalidArgument(format!("spiffe_id {spiffe_id:?}: {e}")))?;
        if id.trust_domain() != self.trust_domain() {
            return Err(MeshError::InvalidArgument(format!(
                "spiffe_id {spiffe_id:?}: trust domain {:?} is not this mesh's ({:?})",
                id.trust_domain(),
                self.trust_domain()
            )));
        }
        if !matches!(id.subject(), Subject::Workload { .. }) {
            return Err(MeshError::InvalidArgument(format!(
                "spiffe_id {spiffe_id:?}: not a workload identity (spiffe://<td>/ns/<namespace>/sa/<service-account>); \
                 revoke nodes with `nodes revoke` and admins with `admin revoke`"
            )));
        }
        let key = id.to_string();
        let now = now_unix();
        let newly = self.write(
            |txn| {
                if txn.get(Table::RevokedIdentities, &key)?.is_some() {
                    return Ok((None, None));
                }
                let record = RevokedIdentityRecord { spiffe_id: key.clone(), revoked_at: now };
                records::put(txn, Table::RevokedIdentities, &key, &record)?;
                eligibility::changed(txn)?;
                let list = Arc::new(in_txn(txn, now)?);
                Ok((Some(list), Some(records::bump(txn, META_VERSION)?)))
            },
            |list, snapshot| {
                if let Some(list) = list {
                    snapshot.revocations = list.clone();
                }
            },
        )?;
        if newly.is_some() {
            metrics::counter!("trellis_revocations_total", "kind" => "identity").increment(1);
            tracing::warn!(spiffe_id = %key, "workload identity revoked");
        }
        Ok(newly.is_some())
    }

    /// Takes the revoked certificates expired at `now` out of the store and of the pushed list (a new config
    /// version, so proxies drop them too); does nothing when none has expired. Returns how many left the list.
    /// `services::revocation_expiry` calls it when the first listed certificate expires.
    pub fn prune_revocations(&self, now: i64) -> Result<usize, MeshError> {
        let listed = self.current().revocations.certificates.len();
        if next_expiry(&self.current().revocations).is_none_or(|first| first > now) {
            return Ok(0);
        }
        // Published whatever the store held: the pushed list then has no expired entry, so the caller, which
        // sleeps until the first listed expiry, cannot spin on one.
        let list = self.write(
            |txn| {
                forget_expired(txn, now)?;
                let list = Arc::new(in_txn(txn, now)?);
                Ok((list, Some(records::bump(txn, META_VERSION)?)))
            },
            |list, snapshot| snapshot.revocations = list.clone(),
        )?;
        Ok(listed.saturating_sub(list.certificates.len()))
    }

    /// What is revoked now, as pushed to proxies.
    pub fn revocations(&self) -> Arc<pb::Revocations> {
        self.current().revocations.clone()
    }
}

#[cfg(test)]
mod tests {
    use crate::mesh::testing::{TRUST_DOMAIN, TestMesh, csr, hello, refusal, workload};
    use crate::records::{self, CertRecord};
    use crate::serial_tag::NodeTag;
    use crate::store::{StoreError, Table, transact};

    fn id(namespace: &str, sa: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}")
    }

    /// Revoking a node lists its tag (every workload certificate it was issued starts its serial with it) and its
    /// node credential's serial; another node's certificate of the same identity is named by neither.
    #[test]
    fn revoking_a_node_lists_every_certificate_it_was_issued_and_no_other() {
        let mesh = TestMesh::new();
        let (n1, n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        // The same identity on both nodes: only n1's certificate is revoked.
        mesh.register(&n1, &hello(vec![workload("shop", "a", "api", &["10.0.0.1"])])).unwrap();
        mesh.register(&n2, &hello(vec![workload("shop", "b", "api", &["10.0.0.2"])])).unwrap();
        let (_, on_n1) = mesh.sign_workload(&n1, &csr(Some(&id("shop", "api")))).unwrap();
        let (_, on_n2) = mesh.sign_workload(&n2, &csr(Some(&id("shop", "api")))).unwrap();
        let version = mesh.current().version;
        mesh.revoke_node("n1").unwrap();
        let snapshot = mesh.current();
        assert!(snapshot.version > version, "a new version, so that proxies ACK it");
        let serials: Vec<&str> = snapshot.revocations.certificates.iter().map(|c| c.serial.as_str()).collect();
        let tags: Vec<&str> = snapshot.revocations.nodes.iter().map(|n| n.serial_tag.as_str()).collect();
        let named = |serial: &str| serials.contains(&serial) || tags.iter().any(|t| serial.starts_with(t));
        assert!(named(&on_n1.serial_hex), "n1's SVID is revoked");
        assert!(named(&n1.credential_serial), "n1's node credential is revoked");
        assert_eq!(serials, [n1.credential_serial.as_str()], "workload certificates are not listed one by one");
        assert_eq!(tags, [NodeTag::of("n1").hex()]);
        assert!(!named(&on_n2.serial_hex), "n2's certificate of the same identity is not");
        assert!(snapshot.revocations.certificates.iter().all(|c| c.node == "n1"));
        assert!(snapshot.revocations.nodes.iter().all(|c| c.node == "n1"));
    }

    /// A store written before the log had batches (one key per certificate, its serial) and before tags (workload
    /// certificates logged): revoking a node revokes its unexpired certificates logged that way as well as those
    /// logged in batches (its node credential), and deletes the log's keys whose records have expired (here the
    /// old-layout ones), leaving the others.
    #[test]
    fn certificates_logged_one_key_each_are_revoked_and_expired_ones_deleted() {
        let mesh = TestMesh::new();
        let n1 = mesh.joined("n1", &["shop"]);
        mesh.register(&n1, &hello(vec![workload("shop", "a", "api", &["10.0.0.1"])])).unwrap();
        let now = super::now_unix();
        let old = |serial: &str, node: &str, not_after: i64| CertRecord {
            serial: serial.into(),
            identity: id("shop", "api"),
            node: node.into(),
            issued_at: now - 100,
            not_after,
            issuer: String::new(),
        };
        let written = [
            old("0a", "n1", now + 600),
            old("0b", "n1", now - 1),
            old("0c", "n2", now + 600),
            old("0d", "n2", now - 1),
        ];
        transact::<_, StoreError>(mesh.store(), |txn| {
            written.iter().try_for_each(|r| records::put(txn, Table::Certificates, &r.serial, r))
        })
        .unwrap();
        mesh.revoke_node("n1").unwrap();
        let mut serials: Vec<String> = mesh.revocations().certificates.iter().map(|c| c.serial.clone()).collect();
        serials.sort();
        let mut expected = vec!["0a".to_owned(), n1.credential_serial.clone()];
        expected.sort();
        assert_eq!(serials, expected, "n1's unexpired certificates of both layouts, no other");
        let keys: Vec<String> = mesh.store().list(Table::Certificates).unwrap().into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"0a".to_owned()) && keys.contains(&"0c".to_owned()), "{keys:?}");
        assert!(!keys.contains(&"0b".to_owned()) && !keys.contains(&"0d".to_owned()), "expired, deleted: {keys:?}");
        assert_eq!(keys.iter().filter(|k| k.starts_with("batch-")).count(), 1, "the credential's");
    }

    /// The sweep deletes the log's keys whose every record has expired, of both layouts, and nothing before.
    #[test]
    fn the_sweep_deletes_only_keys_whose_records_all_expired() {
        let mesh = TestMesh::new();
        let n1 = mesh.joined("n1", &["shop"]);
        mesh.register(&n1, &hello(vec![workload("shop", "a", "api", &["10.0.0.1"])])).unwrap();
        let now = super::now_unix();
        let old = CertRecord {
            serial: "0e".into(),
            identity: id("shop", "api"),
            node: "n1".into(),
            issued_at: 0,
            not_after: now - 1,
            issuer: String::new(),
        };
        transact::<_, StoreError>(mesh.store(), |txn| records::put(txn, Table::Certificates, "0e", &old)).unwrap();
        let keys = || mesh.store().list(Table::Certificates).unwrap().len();
        assert_eq!(keys(), 2, "the node credential's batch and the old record");
        // Control: at `now` only the expired old-layout record goes.
        assert_eq!(mesh.forget_expired_certificates(now).unwrap(), 1);
        assert_eq!(keys(), 1);
        assert_eq!(mesh.forget_expired_certificates(now + 60).unwrap(), 0, "nothing else expired yet");
        // Once the node credential has expired, its batch goes too.
        assert_eq!(mesh.forget_expired_certificates(now + 7200).unwrap(), 1);
        assert_eq!(keys(), 0);
    }

    #[test]
    fn a_revoked_node_gets_no_certificate() {
        let mesh = TestMesh::new();
        let n1 = mesh.joined("n1", &["shop"]);
        mesh.register(&n1, &hello(vec![workload("shop", "a", "api", &["10.0.0.1"])])).unwrap();
        // Control: signed before the revocation.
        mesh.sign_workload(&n1, &csr(Some(&id("shop", "api")))).unwrap();
        // Revoked while a stream still holds the node's record: the signing is refused all the same.
        mesh.revoke_node("n1").unwrap();
        let err = mesh.sign_workload(&n1, &csr(Some(&id("shop", "api")))).unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", "node \"n1\" was revoked".into()));
    }

    #[test]
    fn a_revoked_identity_is_listed_and_not_signed_while_another_of_the_node_is() {
        let mesh = TestMesh::new();
        let n1 = mesh.joined("n1", &["shop"]);
        let workloads = vec![workload("shop", "a", "api", &["10.0.0.1"]), workload("shop", "b", "web", &["10.0.0.2"])];
        mesh.register(&n1, &hello(workloads)).unwrap();
        assert!(mesh.revoke_identity(&id("shop", "api")).unwrap());
        assert!(!mesh.revoke_identity(&id("shop", "api")).unwrap(), "already revoked");
        let listed: Vec<String> = mesh.revocations().identities.iter().map(|i| i.spiffe_id.clone()).collect();
        assert_eq!(listed, [id("shop", "api")]);
        let err = mesh.sign_workload(&n1, &csr(Some(&id("shop", "api")))).unwrap_err();
        assert_eq!(refusal(&err), ("PermissionDenied", format!("identity {} was revoked", id("shop", "api"))));
        // Control: the node's other identity is signed.
        mesh.sign_workload(&n1, &csr(Some(&id("shop", "web")))).unwrap();
    }

    #[test]
    fn only_workload_identities_of_this_mesh_can_be_revoked() {
        let mesh = TestMesh::new();
        let refused = |id: &str| refusal(&mesh.revoke_identity(id).unwrap_err());
        assert_eq!(refused("nope").0, "InvalidArgument");
        assert!(refused("spiffe://other.test/ns/a/sa/b").1.contains("is not this mesh's"));
        assert!(refused(&format!("spiffe://{TRUST_DOMAIN}/trellis/node/n1")).1.contains("not a workload identity"));
        assert!(mesh.current().revocations.identities.is_empty());
    }

    #[test]
    fn expired_revoked_certificates_leave_the_store_and_the_pushed_list_under_a_new_version() {
        let mesh = TestMesh::new();
        let n1 = mesh.joined("n1", &["shop"]);
        mesh.register(&n1, &hello(vec![workload("shop", "a", "api", &["10.0.0.1"])])).unwrap();
        mesh.sign_workload(&n1, &csr(Some(&id("shop", "api")))).unwrap();
        mesh.revoke_identity(&id("shop", "web")).unwrap();
        mesh.revoke_node("n1").unwrap();
        let before = mesh.current();
        assert_eq!(before.revocations.certificates.len(), 1, "the node credential (the SVID: by tag)");
        let first = super::next_expiry(&before.revocations).unwrap();
        // Control: before any expiry nothing changes, not even the version.
        assert_eq!(mesh.prune_revocations(first - 1).unwrap(), 0);
        assert_eq!(mesh.current().version, before.version);
        // At its expiry it leaves, in the store too, under a new version.
        let last = before.revocations.certificates.iter().map(|c| c.not_after_unix).max().unwrap();
        assert_eq!(mesh.prune_revocations(last).unwrap(), 1);
        let after = mesh.current();
        assert!(after.version > before.version, "a new version, so that proxies ACK it");
        assert!(after.revocations.certificates.is_empty());
        assert_eq!(after.revocations.identities.len(), 1, "identities stay revoked");
        assert_eq!(after.revocations.nodes.len(), 1, "the node's tag stays listed");
        assert!(mesh.store().list(crate::store::Table::RevokedCertificates).unwrap().is_empty());
        assert_eq!(super::next_expiry(&after.revocations), None);
        assert_eq!(mesh.prune_revocations(last + 1).unwrap(), 0, "nothing left to prune");
        assert_eq!(mesh.current().version, after.version);
    }

    /// A rolling upgrade: a replica of the previous version revokes a node by marking its record (it knows nothing of
    /// tags); this version lists the node's tag all the same, since it derives the tags from the node records. The
    /// control: an active node's record lists nothing.
    #[test]
    fn a_node_revoked_by_a_replica_of_the_previous_version_has_its_tag_listed() {
        let mesh = TestMesh::new();
        let (n1, _n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        let old_revocation = crate::records::NodeRecord { revoked: true, revoked_at: None, ..n1.clone() };
        transact::<_, StoreError>(mesh.store(), |txn| records::put(txn, Table::Nodes, "n1", &old_revocation)).unwrap();
        let loaded = super::load(mesh.store(), super::now_unix()).unwrap();
        let listed: Vec<(&str, &str, i64)> =
            loaded.nodes.iter().map(|n| (n.node.as_str(), n.serial_tag.as_str(), n.revoked_at_unix)).collect();
        assert_eq!(listed, [("n1", NodeTag::of("n1").hex().as_str(), 0)], "n2, active, is not listed");
    }

    #[test]
    fn what_a_restart_loads_is_what_was_published() {
        let mesh = TestMesh::new();
        let n1 = mesh.joined("n1", &["shop"]);
        mesh.revoke_identity(&id("shop", "api")).unwrap();
        mesh.revoke_node("n1").unwrap();
        let loaded = super::load(mesh.store(), super::now_unix()).unwrap();
        assert_eq!(loaded, *mesh.current().revocations);
        assert_eq!(loaded.certificates[0].serial, n1.credential_serial);
        // Expired certificates leave the list.
        let later = super::load(mesh.store(), loaded.certificates[0].not_after_unix).unwrap();
        assert!(later.certificates.is_empty());
        assert_eq!(later.identities.len(), 1, "identities stay revoked");
        assert_eq!(later.nodes.len(), 1, "tags stay listed");
    }
}
