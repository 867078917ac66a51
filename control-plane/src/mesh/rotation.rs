//! The root CA rotation's transitions, store first: starting one (the new CA's files in a folder of the data dir of
//! its own, then the record and the bundle with the new root in one transaction), and moving it to its next phase
//! (the record, and the bundle when it changes, in one transaction; then the CAs the mesh signs with). Each phase
//! is in the store before it takes effect, so a control plane that restarts resumes where it stopped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Mesh, MeshError, cert_log, now_unix};
use crate::ca::{self, Ca, CaError};
use crate::files::write_new;
use crate::records::{self, CertRecord, META_VERSION};
use crate::rotation::{self, Phase, RECORD_KEY, RotationRecord};
use crate::store::{Table, transact};

/// An operator CA to rotate to (PEM); without one a new root is generated.
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
    pub chain_pem: Option<String>,
}

#[derive(Default)]
pub struct RotateRequest {
    pub material: Option<CaMaterial>,
    pub overlap: Option<Duration>,
    pub force: bool,
}

/// Serializes rotation starts and transitions (a start writes files before its transaction).
static ROTATING: Mutex<()> = Mutex::new(());

impl Mesh {
    /// Whether `authority`'s trust bundle differs from the one proxies were sent last.
    fn bundle_changes(&self, authority: &crate::authority::Authority) -> bool {
        let roots: Vec<Vec<u8>> = authority.roots().iter().map(|r| r.to_vec()).collect();
        let current = self.current();
        current.trust_bundle.roots != roots || current.trust_bundle.jwks != authority.jwks()
    }

    /// The latest rotation (in progress, or done), if any.
    pub fn rotation(&self) -> Result<Option<RotationRecord>, MeshError> {
        Ok(records::load(self.store.as_ref(), Table::Meta, RECORD_KEY)?)
    }

    /// Starts a rotation, or (none of `material` given) updates and returns the one in progress.
    pub fn rotate(&self, request: RotateRequest) -> Result<RotationRecord, MeshError> {
        let _rotating = ROTATING.lock().expect("rotation lock");
        let previous = self.rotation()?;
        if let Some(mut current) = previous.clone().filter(|r| r.phase != Phase::Done) {
            if request.material.is_some() {
                return Err(MeshError::AlreadyExists(format!(
                    "rotation {} is in progress (phase {}): run `trellisctl ca rotate` without --ca-cert/--ca-key/\
                     --ca-chain to resume it",
                    current.rotation,
                    current.phase.as_str()
                )));
            }
            if request.force || (request.overlap.is_some() && current.phase < Phase::Overlap) {
                current.force |= request.force;
                if current.phase < Phase::Overlap {
                    current.overlap_secs = request.overlap.map(|d| d.as_secs()).or(current.overlap_secs);
                }
                self.put_record(previous.as_ref().expect("a rotation in progress"), &current)?;
            }
            return Ok(current);
        }

        let previous_record = previous.clone();
        let number = previous.as_ref().map_or(0, |r| r.rotation) + 1;
        let old_dir = previous.map_or_else(|| ca::CA_DIR.to_owned(), |r| r.new_dir);
        let new_dir = format!("ca-{number}");
        let new_ca = self.write_ca(&new_dir, request.material, number)?;
        if new_ca.chain()[0] == self.ca().chain()[0] {
            return Err(MeshError::InvalidArgument("--ca-cert is the CA in use already".into()));
        }
        // On a shared store the new CA goes there too (its key sealed), in the record's transaction: every replica
        // loads it from there when it sees the record (`follow.rs`), and any of them can drive the rotation on.
        let published = match &self.config.kek {
            Some(kek) => crate::shared_files::ca_dir_values(&self.config.data_dir, &new_dir, kek)
                .map_err(|e| MeshError::Ca(CaError::Material(e.to_string())))?,
            None => Vec::new(),
        };
        let authority = Arc::new(self.authority().rotating(new_ca, Phase::Prepare));
        // A new intermediate under the root in use leaves the bundle as it is: proxies get no update to ACK (a
        // stream sends only changes), so prepare has nothing to wait for (`bundle_version` 0).
        let bundle_changes = self.bundle_changes(&authority);
        let now = now_unix();
        let record = self.write(
            |txn| {
                let stored: Option<RotationRecord> = records::get(txn, Table::Meta, RECORD_KEY)?;
                if stored != previous_record {
                    return Err(MeshError::AlreadyExists(
                        "another replica started or moved a root CA rotation meanwhile: run `trellisctl ca status`"
                            .into(),
                    ));
                }
                for (key, value) in &published {
                    txn.put(Table::CaFiles, key, value)?;
                }
                let version = records::bump(txn, META_VERSION)?;
                let record = RotationRecord {
                    rotation: number,
                    old_dir: old_dir.clone(),
                    new_dir: new_dir.clone(),
                    phase: Phase::Prepare,
                    overlap_secs: request.overlap.map(|d| d.as_secs()),
                    force: request.force,
                    bundle_version: if bundle_changes { version } else { 0 },
                    retire_at: None,
                    history: vec![(Phase::Prepare, now)],
                };
                records::put(txn, Table::Meta, RECORD_KEY, &record)?;
                Ok((record, Some(version)))
            },
            |record, snapshot| {
                snapshot.trust_bundle.roots = authority.roots().iter().map(|r| r.to_vec()).collect();
                snapshot.trust_bundle.jwks = authority.jwks();
                self.set_authority(authority.clone(), record);
            },
        )?;
        tracing::warn!(
            rotation = number,
            new_dir,
            version = record.bundle_version,
            "root CA rotation started: prepare"
        );
        Ok(record)
    }

    /// Moves the rotation in progress to `to` (the phase after its current one; a phase already reached is a no-op,
    /// so a driver that resumes after a restart may repeat itself).
    pub fn advance_rotation(&self, to: Phase) -> Result<RotationRecord, MeshError> {
        let _rotating = ROTATING.lock().expect("rotation lock");
        let Some(mut record) = self.rotation()? else {
            return Err(MeshError::NotFound("no root CA rotation".into()));
        };
        if record.phase >= to {
            self.follow_rotation(&record)?;
            return Ok(record);
        }
        let read = record.clone();
        // The authority must be the record's (another replica may have moved the rotation, this one not yet
        // followed): the overlap's retiring certificates and the next phase's CAs derive from it.
        self.follow_rotation(&record)?;
        if record.phase.next() != to {
            return Err(MeshError::InvalidArgument(format!(
                "rotation phase {} cannot go to {}",
                record.phase.as_str(),
                to.as_str()
            )));
        }
        let now = now_unix();
        record.phase = to;
        record.history.push((to, now));
        if to == Phase::Overlap {
            let switched = record.history.iter().find(|(p, _)| *p == Phase::Switch).map_or(now, |(_, at)| *at);
            let retiring = self.authority().retiring().unwrap_or_default();
            let issued: Vec<CertRecord> = cert_log::all(&self.store.list(Table::Certificates)?)?;
            // The retiring CA's logged certificates: node credentials, and workload certificates logged before they
            // were tagged instead (records older than the issuer field: those logged before the switch).
            let logged = issued
                .iter()
                .filter(|c| c.issuer == retiring || (c.issuer.is_empty() && c.issued_at < switched))
                .map(|c| c.not_after);
            // Workload certificates are not logged: each the retiring CA signed was signed before now (every replica
            // signs with the new CA since the switch, which the switch phase's renewals waited on) and lives at most
            // the certificate TTL.
            let workloads = now.saturating_add(i64::try_from(self.config.cert_ttl.as_secs()).unwrap_or(i64::MAX));
            record.retire_at = Some(rotation::retire_at(&record, now, logged.chain([workloads])));
        }
        let authority = Arc::new(self.authority().for_phase(to));
        if to == Phase::Retire {
            // The bundle loses the retiring root: a new config version, which proxies ACK (unless the retiring CA
            // was an intermediate under the same root: the bundle stays, nothing to wait for).
            let bundle_changes = self.bundle_changes(&authority);
            record = self.write(
                |txn| {
                    unchanged(txn, &read)?;
                    let version = records::bump(txn, META_VERSION)?;
                    let mut record = record.clone();
                    record.bundle_version = if bundle_changes { version } else { 0 };
                    records::put(txn, Table::Meta, RECORD_KEY, &record)?;
                    Ok((record, Some(version)))
                },
                |record, snapshot| {
                    snapshot.trust_bundle.roots = authority.roots().iter().map(|r| r.to_vec()).collect();
                    snapshot.trust_bundle.jwks = authority.jwks();
                    self.set_authority(authority.clone(), record);
                },
            )?;
        } else {
            transact::<_, MeshError>(self.store.as_ref(), |txn| {
                unchanged(txn, &read)?;
                Ok(records::put(txn, Table::Meta, RECORD_KEY, &record)?)
            })?;
            self.set_authority(authority, &record);
        }
        tracing::warn!(rotation = record.rotation, phase = to.as_str(), retire_at = ?record.retire_at, "root CA rotation: next phase");
        Ok(record)
    }

    /// Publishes the CAs of `record`'s phase, unless a later phase is published already (a reload that read the
    /// store before this replica's own transition).
    pub(super) fn set_authority(&self, authority: Arc<crate::authority::Authority>, record: &RotationRecord) -> bool {
        let mut applied = self.applied_rotation.lock().expect("rotation lock");
        let this = (record.rotation, record.phase);
        if applied.is_some_and(|a| a > this) {
            return false;
        }
        *applied = Some(this);
        self.authority.send_replace(authority);
        true
    }

    /// Makes the authority the CAs of `record` if it is not already (another replica started or moved the
    /// rotation): on a shared store, the new CA's files are first written into the data dir from the store.
    pub fn follow_rotation(&self, record: &RotationRecord) -> Result<bool, MeshError> {
        if *self.applied_rotation.lock().expect("rotation lock") == Some((record.rotation, record.phase)) {
            return Ok(false);
        }
        if let Some(kek) = &self.config.kek {
            crate::shared_files::materialize(self.store.as_ref(), &self.config.data_dir, kek)
                .map_err(|e| MeshError::Ca(CaError::Material(e.to_string())))?;
        }
        let authority = crate::authority::for_record(&self.config.data_dir, Some(record), &self.config.trust_domain)
            .map_err(|e| MeshError::Ca(CaError::Material(e.to_string())))?;
        let changed = self.set_authority(Arc::new(authority), record);
        if changed {
            tracing::warn!(rotation = record.rotation, phase = record.phase.as_str(), "root CA rotation followed");
        }
        Ok(changed)
    }

    fn put_record(&self, read: &RotationRecord, record: &RotationRecord) -> Result<(), MeshError> {
        transact::<_, MeshError>(self.store.as_ref(), |txn| {
            unchanged(txn, read)?;
            Ok(records::put(txn, Table::Meta, RECORD_KEY, record)?)
        })
    }

    /// Writes the new CA's files into `data_dir/dir` (replacing what a start that failed before its transaction
    /// left there) and loads it.
    fn write_ca(&self, dir: &str, material: Option<CaMaterial>, number: u64) -> Result<Ca, MeshError> {
        let td = &self.config.trust_domain;
        let (cert_pem, key_pem, chain_pem) = match material {
            Some(m) => {
                let chain = Ca::check_imported(&m.cert_pem, &m.key_pem, m.chain_pem.as_deref()).map_err(|e| {
                    MeshError::InvalidArgument(match e {
                        CaError::Material(reason) => reason,
                        other => other.to_string(),
                    })
                })?;
                (m.cert_pem, m.key_pem, ca::certs_to_pem(&chain))
            }
            None => {
                let (cert, key) = Ca::generate_root_named(td, &format!("Trellis root CA {number}"))?;
                (cert.clone(), key, cert)
            }
        };
        let path = self.config.data_dir.join(dir);
        let io = |e: std::io::Error| MeshError::Ca(CaError::Material(format!("{}: {e}", path.display())));
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let chain = ca::parse_pem_certs(&chain_pem).map_err(|e| CaError::Material(e.to_string()))?;
        let root_pem = crate::files::pem("CERTIFICATE", chain.last().expect("a chain is never empty"));
        let file = |name: &str| path.join(std::path::Path::new(name).file_name().expect("a file name"));
        write_new(&file(ca::CA_CERT), cert_pem.as_bytes(), 0o644).map_err(io)?;
        write_new(&file(ca::CA_KEY), key_pem.as_bytes(), 0o600).map_err(io)?;
        write_new(&file(ca::CA_CHAIN), chain_pem.as_bytes(), 0o644).map_err(io)?;
        write_new(&file(ca::ROOT_CERT), root_pem.as_bytes(), 0o644).map_err(io)?;
        Ok(Ca::load_dir(&path, td)?)
    }
}

/// Refuses a transition whose record changed since it was read (another replica moved the rotation meanwhile).
fn unchanged(txn: &dyn crate::store::Txn, read: &RotationRecord) -> Result<(), MeshError> {
    let stored: Option<RotationRecord> = records::get(txn, Table::Meta, RECORD_KEY)?;
    if stored.as_ref() != Some(read) {
        return Err(MeshError::FailedPrecondition(format!(
            "the root CA rotation moved on meanwhile (now {}); looking again",
            stored.map_or("none", |r| r.phase.as_str())
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::fingerprint;
    use crate::mesh::testing::{TestMesh, csr, refusal};

    #[test]
    fn a_rotation_goes_through_its_phases_in_the_store_and_the_snapshot() {
        let mesh = TestMesh::new();
        let old_root = mesh.ca().root().to_vec();
        let node = mesh.joined("n1", &["shop"]);
        let before = mesh.current().version;

        let record = mesh.rotate(RotateRequest::default()).unwrap();
        assert_eq!((record.rotation, record.phase, record.new_dir.as_str()), (1, Phase::Prepare, "ca-1"));
        let snapshot = mesh.current();
        assert_eq!(snapshot.version, before + 1);
        assert_eq!(record.bundle_version, snapshot.version, "the proxies' ACK of this version is waited for");
        assert_eq!(snapshot.trust_bundle.roots.len(), 2);
        assert_eq!(snapshot.trust_bundle.roots[0], old_root);
        assert_eq!(mesh.ca().root().to_vec(), old_root, "the old CA signs until the switch");

        // Resuming returns the rotation in progress; other material is refused.
        assert_eq!(mesh.rotate(RotateRequest::default()).unwrap(), record);
        let (cert, key) = Ca::generate_root("test.example").unwrap();
        let material = CaMaterial { cert_pem: cert, key_pem: key, chain_pem: None };
        let err = mesh.rotate(RotateRequest { material: Some(material), ..Default::default() }).unwrap_err();
        assert_eq!(refusal(&err).0, "AlreadyExists");
        // Phases go one at a time.
        assert_eq!(refusal(&mesh.advance_rotation(Phase::Overlap).unwrap_err()).0, "InvalidArgument");

        let switched = mesh.advance_rotation(Phase::Switch).unwrap();
        let new_root = snapshot.trust_bundle.roots[1].clone();
        assert_eq!(mesh.ca().root().to_vec(), new_root, "the new CA signs");
        let retiring = mesh.authority().retiring().unwrap();
        let renewed = mesh.renew_node(&node.name, &csr(None)).unwrap();
        assert_ne!(fingerprint(&renewed.chain[1]), retiring, "a renewal is signed by the new CA");
        assert_eq!(mesh.advance_rotation(Phase::Switch).unwrap(), switched, "repeating a phase is a no-op");

        // Restarted here, the control plane loads the same CAs in the same phase.
        let reloaded = crate::authority::load(&mesh.config.data_dir, mesh.store(), "test.example").unwrap();
        assert_eq!((reloaded.phase(), reloaded.retiring()), (Some(Phase::Switch), Some(retiring)));

        let overlap = mesh.advance_rotation(Phase::Overlap).unwrap();
        // Default overlap: until the retiring CA's last certificate expires (the join's node credential, 1h; a
        // workload certificate signed until now, 1h).
        let retire_at = overlap.retire_at.unwrap();
        assert!(retire_at >= now_unix() + 3500 && retire_at <= now_unix() + 3600, "{retire_at}");
        let forced = mesh.rotate(RotateRequest { force: true, ..Default::default() }).unwrap();
        assert!(forced.force);

        let retired = mesh.advance_rotation(Phase::Retire).unwrap();
        let snapshot = mesh.current();
        assert_eq!(snapshot.trust_bundle.roots, std::slice::from_ref(&new_root));
        assert_eq!(retired.bundle_version, snapshot.version);
        let done = mesh.advance_rotation(Phase::Done).unwrap();
        assert_eq!(
            done.history.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            [Phase::Prepare, Phase::Switch, Phase::Overlap, Phase::Retire, Phase::Done]
        );
        let reloaded = crate::authority::load(&mesh.config.data_dir, mesh.store(), "test.example").unwrap();
        assert_eq!(
            (reloaded.roots(), reloaded.phase()),
            ([rustls_pki_types::CertificateDer::from(new_root.clone())].as_slice(), None)
        );

        // A second rotation starts from the first one's CA.
        let second =
            mesh.rotate(RotateRequest { overlap: Some(Duration::from_secs(60)), ..Default::default() }).unwrap();
        assert_eq!((second.rotation, second.old_dir.as_str(), second.overlap_secs), (2, "ca-1", Some(60)));
    }

    #[test]
    fn operator_material_is_checked() {
        let mesh = TestMesh::new();
        let (cert, _) = Ca::generate_root("test.example").unwrap();
        let (_, other_key) = Ca::generate_root("test.example").unwrap();
        let bad = CaMaterial { cert_pem: cert.clone(), key_pem: other_key, chain_pem: None };
        let err = mesh.rotate(RotateRequest { material: Some(bad), ..Default::default() }).unwrap_err();
        assert_eq!(refusal(&err), ("InvalidArgument", "--ca-key does not match --ca-cert's public key".into()));
        assert!(mesh.rotation().unwrap().is_none(), "nothing recorded");
        // Control: a matching pair starts the rotation with it.
        let (cert, key) = Ca::generate_root("test.example").unwrap();
        let good = CaMaterial { cert_pem: cert, key_pem: key, chain_pem: None };
        let record = mesh.rotate(RotateRequest { material: Some(good), ..Default::default() }).unwrap();
        assert_eq!(record.phase, Phase::Prepare);
    }

    /// Two replicas on one etcd, each with its own data dir: a rotation started by one is followed by the other
    /// (the new CA from the store, key sealed; its phases; the bundle it sends); a transition made from a record
    /// another replica has moved on since is refused, and the control (the record as read) goes through.
    #[test]
    fn a_replica_on_a_shared_store_follows_a_rotation_another_started() {
        use crate::store::{EtcdStore, Store, test_etcd};
        let options = test_etcd::options();
        let (cert, key) = Ca::generate_root("test.example").unwrap();
        let replica = |n: usize| {
            let dir = std::env::temp_dir().join(format!("trellis-follow-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("ca")).unwrap();
            std::fs::write(dir.join(ca::CA_CERT), &cert).unwrap();
            std::fs::write(dir.join(ca::CA_KEY), &key).unwrap();
            std::fs::write(dir.join(ca::CA_CHAIN), &cert).unwrap();
            let authority = crate::authority::Authority::single(Ca::load(&dir, "test.example").unwrap());
            let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(&options).unwrap());
            let config = super::super::MeshConfig {
                trust_domain: "test.example".into(),
                cert_ttl: Duration::from_secs(3600),
                node_cert_ttl: Duration::from_secs(3600),
                jwt_svid_ttl: crate::jwt_key::DEFAULT_JWT_TTL,
                jwks_allow_local: false,
                data_dir: dir.clone(),
                kek: crate::kek::Kek::from_bytes(&[7; 32]),
            };
            (Mesh::open(store, authority, config).unwrap(), dir)
        };
        let ((one, dir_one), (two, dir_two)) = (replica(1), replica(2));
        // What `init --store etcd` publishes first (materializing needs it).
        transact::<_, MeshError>(one.store(), |txn| Ok(txn.put(Table::CaFiles, "control.yaml", b"x")?)).unwrap();

        one.rotate(RotateRequest::default()).unwrap();
        let sealed = one.store().get(Table::CaFiles, "ca-1/ca-key.pem").unwrap().expect("the new key in the store");
        assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"), "sealed");
        assert_eq!(two.authority().phase(), None, "not followed yet");
        assert!(two.reload().unwrap(), "a new version: the bundle with the new root");
        assert_eq!(two.authority().phase(), Some(Phase::Prepare));
        assert_eq!(two.current().trust_bundle.roots, one.current().trust_bundle.roots);
        assert_eq!(two.current().trust_bundle.roots.len(), 2);
        assert_eq!(
            std::fs::read(dir_two.join("ca-1/ca-key.pem")).unwrap(),
            std::fs::read(dir_one.join("ca-1/ca-key.pem")).unwrap(),
            "the new CA's key, opened with the KEK"
        );

        one.advance_rotation(Phase::Switch).unwrap();
        assert_ne!(two.ca().chain()[0], one.ca().chain()[0], "not followed yet: the old CA signs on two");
        two.reload().unwrap();
        assert_eq!(two.ca().chain()[0], one.ca().chain()[0], "two signs with the new CA");
        assert!(two.authority().retiring().is_some());

        // A transition from a record that moved on meanwhile is refused; the record as read goes through.
        let stale = two.rotation().unwrap().unwrap();
        one.advance_rotation(Phase::Overlap).unwrap();
        let refused = transact::<_, MeshError>(two.store(), |txn| unchanged(txn, &stale)).unwrap_err();
        assert!(refused.to_string().contains("moved on meanwhile (now overlap)"), "{refused}");
        let current = two.rotation().unwrap().unwrap();
        transact::<_, MeshError>(two.store(), |txn| unchanged(txn, &current)).unwrap();
        // Two, driving now, moves on from where one left it (it follows first).
        let retired = two.advance_rotation(Phase::Retire).unwrap();
        assert_eq!(retired.phase, Phase::Retire);
        assert_eq!(two.current().trust_bundle.roots.len(), 1);
        one.reload().unwrap();
        assert_eq!(one.current().trust_bundle.roots, two.current().trust_bundle.roots);
        for dir in [dir_one, dir_two] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
