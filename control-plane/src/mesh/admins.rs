//! Admin credentials: each admin name is recorded with the serial of its credential; the Admin service accepts a
//! call only from a recorded admin that is not revoked, checked on every call (so a revocation applies at once, also
//! to connections that are already open). `trellis-control init` makes the first admin; it is recorded when the
//! control plane first serves ([`Mesh::adopt_initial_admin`]).

use std::time::Duration;

use trellis_policy::check_dns1123_label;
use trellis_proto::spiffe::{SpiffeId, Subject};

use super::{Mesh, MeshError, now_unix};
use crate::ca::Issued;
use crate::records::{self, AdminRecord};
use crate::store::{Table, transact};

impl Mesh {
    /// The admin's record if it may call the Admin service (recorded, not revoked).
    pub fn active_admin(&self, name: &str) -> Result<AdminRecord, MeshError> {
        match records::load::<AdminRecord>(self.store.as_ref(), Table::Admins, name)? {
            Some(record) if !record.revoked => Ok(record),
            Some(_) => Err(MeshError::Unauthenticated(format!("admin credential {name:?} was revoked"))),
            None => Err(MeshError::Unauthenticated(format!("admin {name:?} is not a known admin credential"))),
        }
    }

    /// Signs an admin credential for a new name (the CSR's key; its names are ignored) and records it.
    pub fn create_admin(
        &self,
        name: &str,
        csr_der: &[u8],
        ttl: Duration,
        created_by: &str,
    ) -> Result<(Issued, AdminRecord), MeshError> {
        check_dns1123_label(name).map_err(|e| MeshError::InvalidArgument(format!("admin name {name:?}: {e}")))?;
        if ttl.is_zero() {
            return Err(MeshError::InvalidArgument("admin credential ttl must be positive".into()));
        }
        let exists = |txn: &dyn crate::store::Txn| -> Result<(), MeshError> {
            match records::get::<AdminRecord>(txn, Table::Admins, name)? {
                Some(r) if r.revoked => Err(MeshError::AlreadyExists(format!(
                    "admin {name:?} was revoked; a revoked name is not reused, choose another"
                ))),
                Some(_) => Err(MeshError::AlreadyExists(format!("admin {name:?} already exists"))),
                None => Ok(()),
            }
        };
        transact(self.store.as_ref(), |txn| exists(txn))?;
        let (_, issued) = self.ca().sign_admin(csr_der, name, ttl)?;
        let record = AdminRecord {
            name: name.to_owned(),
            serial: issued.serial_hex.clone(),
            created_at: now_unix(),
            created_by: created_by.to_owned(),
            not_after: issued.not_after.unix_timestamp(),
            revoked: false,
            revoked_at: 0,
        };
        transact(self.store.as_ref(), |txn| {
            exists(txn)?;
            Ok::<_, MeshError>(records::put(txn, Table::Admins, name, &record)?)
        })?;
        tracing::info!(admin = name, created_by, serial = %record.serial, "admin credential created");
        Ok((issued, record))
    }

    /// Revokes an admin credential; refused for the last admin that is not revoked (nobody could call any more).
    pub fn revoke_admin(&self, name: &str) -> Result<(), MeshError> {
        transact(self.store.as_ref(), |txn| {
            let mut record: AdminRecord = records::get(txn, Table::Admins, name)?
                .ok_or_else(|| MeshError::NotFound(format!("admin {name:?} not found")))?;
            if record.revoked {
                return Ok(());
            }
            let others_active = txn
                .list(Table::Admins)?
                .iter()
                .map(|(key, bytes)| records::decode::<AdminRecord>(Table::Admins, key, bytes))
                .filter(|r| r.as_ref().map_or(true, |r| !r.revoked && r.name != name))
                .count();
            if others_active == 0 {
                return Err(MeshError::FailedPrecondition(format!(
                    "admin {name:?} is the only admin that is not revoked: create another first"
                )));
            }
            record.revoked = true;
            record.revoked_at = now_unix();
            Ok(records::put(txn, Table::Admins, name, &record)?)
        })?;
        metrics::counter!("trellis_revocations_total", "kind" => "admin").increment(1);
        tracing::warn!(admin = name, "admin credential revoked");
        Ok(())
    }

    pub fn admins(&self) -> Result<Vec<AdminRecord>, MeshError> {
        let mut admins: Vec<AdminRecord> = records::load_all(self.store.as_ref(), Table::Admins)?;
        admins.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        Ok(admins)
    }

    /// Records the admin credential `trellis-control init` wrote (`cert_der`), when no admin is recorded yet (a new
    /// data dir, or one made before admins were recorded). Returns its name when it was recorded.
    pub fn adopt_initial_admin(&self, cert_der: &[u8]) -> Result<Option<String>, MeshError> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| MeshError::InvalidArgument(format!("admin certificate: {e}")))?;
        let uri = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
            })
            .ok_or_else(|| MeshError::InvalidArgument("admin certificate has no URI SAN".into()))?;
        let id = SpiffeId::parse(&uri).map_err(|e| MeshError::InvalidArgument(format!("admin certificate: {e}")))?;
        let Subject::Admin(name) = id.subject() else {
            return Err(MeshError::InvalidArgument(format!("admin certificate names {id}, not an admin")));
        };
        let raw = cert.raw_serial();
        let serial = match raw {
            [0, rest @ ..] if rest.first().is_some_and(|b| b & 0x80 != 0) => rest,
            other => other,
        };
        let record = AdminRecord {
            name: name.to_owned(),
            serial: hex::encode(serial),
            created_at: cert.validity().not_before.timestamp(),
            created_by: String::new(),
            not_after: cert.validity().not_after.timestamp(),
            revoked: false,
            revoked_at: 0,
        };
        let adopted = transact(self.store.as_ref(), |txn| {
            if !txn.list(Table::Admins)?.is_empty() {
                return Ok::<_, MeshError>(false);
            }
            records::put(txn, Table::Admins, &record.name, &record)?;
            Ok(true)
        })?;
        Ok(adopted.then(|| record.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::ca::LocalCert;
    use crate::mesh::testing::{TestMesh, csr, refusal};

    const TTL: Duration = Duration::from_secs(3600);

    fn with_initial_admin(mesh: &TestMesh) {
        let (issued, _) = mesh.ca().issue_local(LocalCert::Admin("root-admin"), TTL).unwrap();
        assert_eq!(mesh.adopt_initial_admin(&issued.chain[0]).unwrap().as_deref(), Some("root-admin"));
        let again = mesh.ca().issue_local(LocalCert::Admin("other"), TTL).unwrap().0;
        assert_eq!(mesh.adopt_initial_admin(&again.chain[0]).unwrap(), None, "adopted only into an empty table");
    }

    #[test]
    fn a_revoked_admin_is_refused_while_another_is_accepted() {
        let mesh = TestMesh::new();
        with_initial_admin(&mesh);
        let (issued, record) = mesh.create_admin("ops", &csr(None), TTL, "root-admin").unwrap();
        assert_eq!(record.serial, issued.serial_hex);
        mesh.active_admin("ops").unwrap();
        mesh.revoke_admin("ops").unwrap();
        assert_eq!(
            refusal(&mesh.active_admin("ops").unwrap_err()),
            ("Unauthenticated", "admin credential \"ops\" was revoked".into())
        );
        // Control: the other admin is still accepted.
        mesh.active_admin("root-admin").unwrap();
        assert_eq!(
            refusal(&mesh.active_admin("ghost").unwrap_err()),
            ("Unauthenticated", "admin \"ghost\" is not a known admin credential".into())
        );
    }

    #[test]
    fn names_are_checked_and_never_reused_and_the_last_admin_stays() {
        let mesh = TestMesh::new();
        with_initial_admin(&mesh);
        assert_eq!(refusal(&mesh.create_admin("Ops!", &csr(None), TTL, "x").unwrap_err()).0, "InvalidArgument");
        assert_eq!(
            refusal(&mesh.create_admin("root-admin", &csr(None), TTL, "x").unwrap_err()),
            ("AlreadyExists", "admin \"root-admin\" already exists".into())
        );
        mesh.create_admin("ops", &csr(None), TTL, "root-admin").unwrap();
        mesh.revoke_admin("ops").unwrap();
        assert_eq!(refusal(&mesh.create_admin("ops", &csr(None), TTL, "x").unwrap_err()).0, "AlreadyExists");
        assert_eq!(
            refusal(&mesh.revoke_admin("root-admin").unwrap_err()),
            (
                "FailedPrecondition",
                "admin \"root-admin\" is the only admin that is not revoked: create another first".into()
            )
        );
        assert_eq!(refusal(&mesh.revoke_admin("nobody").unwrap_err()).0, "NotFound");
        let names: Vec<String> = mesh.admins().unwrap().into_iter().map(|a| a.name).collect();
        assert_eq!(names.len(), 2);
    }
}
