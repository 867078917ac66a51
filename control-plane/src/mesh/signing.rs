//! Workload certificates: the CA signs a CSR only for an identity the node may hold (a namespace its token
//! allows, a service account of a workload it fronts); every issued certificate is logged in the store.
//!
//! Workload certificates are logged in batches ([`GroupCommit`](crate::group_commit::GroupCommit)): the records of
//! the signings that arrive while one batch is being committed go into the next transaction, which reads the
//! eligibility epoch and every node record and revoked-identity key the batch names in one read (`eligibility.rs`:
//! only the epoch is compared at commit), refuses (one by one) the records of revoked or unknown nodes and of
//! revoked identities, and writes the others under one key (`cert_log.rs`). A caller hands out its certificate only once that
//! transaction committed its record; when the transaction fails, every caller of the batch gets its error and hands
//! out nothing. Node credentials (joins, renewals) are logged in the transaction that writes the node's record.

use std::collections::BTreeSet;

use trellis_proto::spiffe::{SpiffeId, Subject};

use super::{Mesh, MeshError, cert_log, eligibility, now_unix, revocations};
use crate::ca::{CaError, Issued};
use crate::group_commit::Abandoned;
use crate::records::{CertRecord, NodeRecord};
use crate::store::{StoreError, Table, Txn, transact};

/// Records per certificate-log transaction at most. A batch is one etcd write and two compares (the eligibility
/// epoch, the commit's fence) whatever its size, so the bound is the wait of the callers queued behind a full batch
/// and the request's size: 512 records of about 300 bytes each are about 150 KiB.
pub(super) const LOG_BATCH: usize = 512;
/// Bytes of records per certificate-log transaction at most (as `cert_log::weight` counts them): a third of etcd's
/// default request limit (`--max-request-bytes`, 1.5 MiB), so that a batch of records with long names (a SPIFFE ID
/// may take 2 KiB) still fits with room to spare.
pub(super) const LOG_BATCH_BYTES: usize = 512 * 1024;
/// Deletes per transaction when expired keys leave the log (within etcd's default 128 operations).
const SWEEP_BATCH: usize = 100;

impl Mesh {
    /// Signs a workload certificate for `node` if the identity is one of the workloads it fronts, and hands it out
    /// once it is logged. Whether the node may still sign (joined, not revoked: the caller's record may predate a
    /// revocation) and whether the identity is revoked is decided by the transaction that logs the certificate.
    pub fn sign_workload(&self, node: &NodeRecord, csr_der: &[u8]) -> Result<(SpiffeId, Issued), MeshError> {
        let (id, issued, record) = self.sign_unlogged(node, csr_der)?;
        logged(self.cert_log.submit(record, &mut |batch: &[CertRecord]| self.log_batch(batch)))?;
        Ok((id, issued))
    }

    /// [`Mesh::sign_workload`] for a task (a discovery stream): the same checks, batches and outcomes, but waiting
    /// for the certificate's batch does not hold a thread (only the caller that commits a batch blocks one).
    pub async fn sign_workload_async(
        &self,
        node: &NodeRecord,
        csr_der: &[u8],
    ) -> Result<(SpiffeId, Issued), MeshError> {
        let (id, issued, record) = self.sign_unlogged(node, csr_der)?;
        logged(self.cert_log.submit_async(record, &mut |batch: &[CertRecord]| self.log_batch(batch)).await)?;
        Ok((id, issued))
    }

    /// The CA's certificate for the CSR if `node` may hold its identity, and the certificate log's record of it
    /// (not logged yet).
    fn sign_unlogged(&self, node: &NodeRecord, csr_der: &[u8]) -> Result<(SpiffeId, Issued, CertRecord), MeshError> {
        let hosted = self.hosted(node);
        let signed = self
            .ca()
            .sign_workload(csr_der, self.config.cert_ttl, |_, namespace, sa| may_hold(node, &hosted, namespace, sa));
        let (id, issued) = match signed {
            Ok(signed) => signed,
            Err(e) => {
                // A revoked node's workloads left the registry with its revocation: say that it was revoked rather
                // than what the CA found wrong (the store says; only refusals pay this read).
                self.active_node(&node.name)?;
                return Err(e.into());
            }
        };
        let record = certificate_record(&issued, &id, &node.name);
        Ok((id, issued, record))
    }

    /// Logs a batch of workload certificates in one transaction: one outcome per record, in order (a refusal for a
    /// revoked node or identity; the transaction's error for each record when it fails).
    fn log_batch(&self, batch: &[CertRecord]) -> Vec<Result<(), MeshError>> {
        metrics::histogram!("trellis_certificate_log_batch_records").record(batch.len() as f64);
        let mut outcomes = Vec::new();
        let committed = transact::<_, StoreError>(self.store.as_ref(), |txn| {
            outcomes = log_records(txn, batch)?;
            Ok(())
        });
        match committed {
            Ok(()) => outcomes,
            Err(e) => {
                tracing::warn!(records = batch.len(), error = %e, "logging a batch of certificates failed: none is handed out");
                batch.iter().map(|_| Err(MeshError::Store(e.clone()))).collect()
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

    /// The (namespace, service account) of every workload `node` fronts.
    fn hosted(&self, node: &NodeRecord) -> BTreeSet<(String, String)> {
        (self.current().workloads.values())
            .filter(|w| w.node == node.name)
            .map(|w| (w.namespace.clone(), w.service_account.clone()))
            .collect()
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

/// A certificate's outcome in the log: its batch's (abandoned when the batch's commit panicked).
fn logged(outcome: Result<Result<(), MeshError>, Abandoned>) -> Result<(), MeshError> {
    outcome.map_err(|e| MeshError::Store(StoreError::Backend(format!("certificate log: {e}"))))?
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

/// In one transaction: reads the eligibility epoch, then every node record and revoked-identity key `batch` names
/// (one read; only the epoch is compared at commit, and every revocation bumps it, so a revocation committed
/// meanwhile makes the transaction run again), then writes the records of the certificates whose node is joined and
/// not revoked and whose identity is not revoked, under one key. One outcome per record.
fn log_records(txn: &mut dyn Txn, batch: &[CertRecord]) -> Result<Vec<Result<(), MeshError>>, StoreError> {
    let refusals = eligibility::refusals(txn, batch)?;
    let accepted: Vec<&CertRecord> =
        batch.iter().zip(&refusals).filter(|(_, refusal)| refusal.is_none()).map(|(record, _)| record).collect();
    if !accepted.is_empty() {
        cert_log::append(txn, &accepted)?;
    }
    Ok(refusals.into_iter().map(|refusal| refusal.map_or(Ok(()), |r| Err(MeshError::PermissionDenied(r)))).collect())
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
    use std::sync::{Arc, Mutex, mpsc};
    use std::time::{Duration, Instant};

    use crate::ca::CaError;
    use crate::mesh::testing::{ProbedStore, TRUST_DOMAIN, TestMesh, csr, hello, refusal, workload};
    use crate::mesh::{Mesh, MeshError};
    use crate::records::CertRecord;
    use crate::store::{StoreError, Table};

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

        // Control: the identity of a workload it fronts is signed, and logged.
        let (signed, issued) = mesh.sign_workload(&node, &csr(Some(&id("shop", "api-sa")))).unwrap();
        assert_eq!(signed.to_string(), id("shop", "api-sa"));
        let logged = in_log(&mesh).into_iter().find(|r| r.serial == issued.serial_hex).expect("logged");
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

    /// Serials in the certificate log for `identity`.
    fn logged(mesh: &Mesh, identity: &str) -> Vec<String> {
        in_log(mesh).into_iter().filter(|r| r.identity == identity).map(|r| r.serial).collect()
    }

    /// Waits (polling, bounded) until `n` signings wait for the certificate log.
    fn until_queued(mesh: &Mesh, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while mesh.cert_log.queued() < n {
            assert!(Instant::now() < deadline, "{} of {n} signings queued", mesh.cert_log.queued());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Transactions from now on: the `hold`th ones (counted from 0) wait until the test releases them; the `fail`th
    /// ones fail with "store unavailable: injected", writing nothing.
    fn hold_and_fail(probe: &ProbedStore, hold: &'static [usize], fail: &'static [usize]) -> mpsc::Sender<()> {
        let base = probe.updates();
        let (release, held) = mpsc::channel::<()>();
        let held = Mutex::new(held);
        *probe.hook.lock().unwrap() = Some(Arc::new(move |n| {
            let n = n - base;
            if hold.contains(&n) {
                held.lock().unwrap().recv().unwrap();
            }
            if fail.contains(&n) {
                return Err(StoreError::Unavailable("injected".into()));
            }
            Ok(())
        }));
        release
    }

    /// Many concurrent signings share a few transactions and every certificate is in the log when its caller gets
    /// it; a transaction that fails fails every signing of its batch, with its error, and none of the other batches.
    #[test]
    fn concurrent_signings_are_logged_in_few_transactions_and_a_failed_one_fails_only_its_batch() {
        let (mesh, probe) = TestMesh::probed();
        let node = mesh.joined("n1", &["shop"]);
        mesh.register(&node, &hello(vec![workload("shop", "api", "api-sa", &["10.0.0.1"])])).unwrap();
        let identity = id("shop", "api-sa");
        let request = csr(Some(&identity));
        let sign = || mesh.sign_workload(&node, &request).map(|(_, issued)| issued.serial_hex);
        // Transactions: 0 (one signing, held while 39 queue), 1 (the 39); 2 (one signing, held while 10 queue),
        // 3 (those 10: fails); 4.. (10 more, after).
        let release = hold_and_fail(&probe, &[0, 2], &[3]);
        let before = probe.updates();
        let (first, batch) = std::thread::scope(|s| {
            let first = s.spawn(sign);
            while probe.updates() == before {
                std::thread::yield_now();
            }
            let batch: Vec<_> = (0..39).map(|_| s.spawn(sign)).collect();
            until_queued(&mesh, 39);
            release.send(()).unwrap();
            (first.join().unwrap(), batch.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>())
        });
        let transactions = probe.updates() - before;
        println!("40 concurrent signings: {transactions} transactions");
        assert_eq!(transactions, 2, "the first alone, then the 39 that queued while it committed");
        let mut serials: Vec<String> = batch.into_iter().map(|r| r.expect("signed")).collect();
        serials.push(first.expect("signed"));
        let mut in_log = logged(&mesh, &identity);
        serials.sort();
        in_log.sort();
        assert_eq!(serials, in_log, "every certificate handed out is in the log, and only those");

        // The batch whose transaction fails: each of its 10 signings fails with the store's error, nothing logged.
        let before = probe.updates();
        let (held, failed) = std::thread::scope(|s| {
            let held = s.spawn(sign);
            while probe.updates() == before {
                std::thread::yield_now();
            }
            let failing: Vec<_> = (0..10).map(|_| s.spawn(sign)).collect();
            until_queued(&mesh, 10);
            release.send(()).unwrap();
            (held.join().unwrap(), failing.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>())
        });
        assert_eq!(probe.updates() - before, 2);
        let held = held.expect("the batch before the failed one is logged");
        for result in failed {
            match result {
                Err(MeshError::Store(StoreError::Unavailable(reason))) => assert_eq!(reason, "injected"),
                other => panic!("a signing of the failed batch returned {other:?}"),
            }
        }
        assert_eq!(logged(&mesh, &identity).len(), 41, "only the held batch's certificate was added");
        assert!(logged(&mesh, &identity).contains(&held));
        // Control, through the same path: the batches after succeed, and are logged.
        let after: Vec<String> = std::thread::scope(|s| {
            let signers: Vec<_> = (0..10).map(|_| s.spawn(sign)).collect();
            signers.into_iter().map(|t| t.join().unwrap().expect("signed after the failure")).collect()
        });
        let in_log = logged(&mesh, &identity);
        assert_eq!(in_log.len(), 51);
        assert!(after.iter().all(|serial| in_log.contains(serial)));
    }

    /// A revocation committed between a batch's read and its commit (another replica's, on etcd) still refuses the
    /// batch's certificate: the revocation bumped the eligibility epoch, the only key the batch compares, so its
    /// commit is refused and it runs again on fresh reads. On redb, whose transactions are serialized, the
    /// revocation waits for the batch instead, and then lists its certificate. Either way the certificate is
    /// refused or in the log the revocation read. For a node's revocation and an identity's.
    #[test]
    fn a_revocation_between_a_batchs_read_and_its_commit_refuses_or_revokes_its_certificate() {
        type Revoke = fn(&Mesh) -> Result<(), MeshError>;
        let revocations: [(&str, Revoke, String); 2] = [
            ("node", |m| m.revoke_node("n1"), "node \"n1\" was revoked".into()),
            (
                "identity",
                |m| m.revoke_identity(&id("shop", "api")).map(|_| ()),
                format!("identity {} was revoked", id("shop", "api")),
            ),
        ];
        let etcd = crate::store::test_etcd::requested();
        for (what, revoke, reason) in revocations {
            let (mesh, probe) = TestMesh::probed();
            let node = mesh.joined("n1", &["shop"]);
            mesh.register(&node, &hello(vec![workload("shop", "a", "api", &["10.0.0.1"])])).unwrap();
            let request = csr(Some(&id("shop", "api")));
            // Control, through the same path: no revocation meanwhile, one read, signed and logged.
            let reads = probe.guarded_reads.load(std::sync::atomic::Ordering::SeqCst);
            let (_, control) = mesh.sign_workload(&node, &request).unwrap();
            assert_eq!(probe.guarded_reads.load(std::sync::atomic::Ordering::SeqCst) - reads, 1, "{what}");
            assert!(logged(&mesh, &id("shop", "api")).contains(&control.serial_hex), "{what}");

            let reads = probe.guarded_reads.load(std::sync::atomic::Ordering::SeqCst);
            let (outcome, revoked) = std::thread::scope(|s| {
                let (go, went) = mpsc::channel::<()>();
                let (committed, revoker_done) = mpsc::channel::<()>();
                let mesh = &*mesh;
                let revoker = s.spawn(move || {
                    went.recv().unwrap();
                    let revoked = revoke(mesh);
                    let _ = committed.send(());
                    revoked
                });
                *probe.after_guarded_read.lock().unwrap() = Some(Box::new(move || {
                    go.send(()).unwrap();
                    if etcd {
                        // Another replica's revocation commits before this batch's commit.
                        revoker_done.recv().unwrap();
                    }
                }));
                let outcome = mesh.sign_workload(&node, &request);
                (outcome, revoker.join().unwrap())
            });
            revoked.unwrap();
            let runs = probe.guarded_reads.load(std::sync::atomic::Ordering::SeqCst) - reads;
            let listed = |serial: &str| {
                let list = mesh.revocations();
                list.certificates.iter().any(|c| c.serial == serial)
                    || list.identities.iter().any(|i| i.spiffe_id == id("shop", "api"))
            };
            if etcd {
                let err = outcome.expect_err(what);
                assert_eq!(refusal(&err), ("PermissionDenied", reason.clone()), "{what}");
                assert_eq!(runs, 2, "{what}: the first commit was refused at its compare, the second run refused");
                assert_eq!(
                    logged(&mesh, &id("shop", "api")),
                    std::slice::from_ref(&control.serial_hex),
                    "{what}: nothing logged"
                );
            } else {
                let (_, issued) = outcome.expect(what);
                assert_eq!(runs, 1, "{what}");
                assert!(logged(&mesh, &id("shop", "api")).contains(&issued.serial_hex), "{what}");
                assert!(listed(&issued.serial_hex), "{what}: the revocation, after the batch, revokes its certificate");
            }
        }
    }

    /// One batch's transaction refuses, record by record, a revoked node's, an unknown node's and a revoked
    /// identity's certificate, and logs the others of the batch.
    #[test]
    fn a_batch_refuses_revoked_records_one_by_one_and_logs_the_rest() {
        let mesh = TestMesh::new();
        let (n1, _n2) = (mesh.joined("n1", &["shop"]), mesh.joined("n2", &["shop"]));
        mesh.revoke_node("n2").unwrap();
        mesh.revoke_identity(&id("shop", "gone")).unwrap();
        let record = |serial: &str, node: &str, sa: &str| CertRecord {
            serial: serial.into(),
            identity: id("shop", sa),
            node: node.into(),
            issued_at: 0,
            not_after: i64::MAX,
            issuer: String::new(),
        };
        let batch = [
            record("01", "n1", "api"),
            record("02", "n2", "api"),
            record("03", "n1", "gone"),
            record("04", "n9", "api"),
            record("05", &n1.name, "web"),
        ];
        let outcomes: Vec<Option<(&str, String)>> =
            mesh.log_batch(&batch).iter().map(|o| o.as_ref().err().map(refusal)).collect();
        let denied = |reason: &str| Some(("PermissionDenied", reason.to_owned()));
        assert_eq!(
            outcomes,
            [
                None,
                denied("node \"n2\" was revoked"),
                denied(&format!("identity {} was revoked", id("shop", "gone"))),
                denied("node \"n9\" has not joined"),
                None,
            ]
        );
        let log = in_log(&mesh);
        let present = |serial: &str| log.iter().any(|r| r.serial == serial);
        assert_eq!(["01", "02", "03", "04", "05"].map(present), [true, false, false, false, true]);
    }
}
