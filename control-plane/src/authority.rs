//! The mesh's certificate authorities as the rest of the control plane uses them: which CA signs new certificates,
//! which roots the trust bundle holds, and, during a root rotation, which CA is retiring and which extra
//! certificates the serving chain carries so that a client trusting only the retiring root still verifies the
//! control plane (a cross-certificate: the new CA signed by the retiring one).
//!
//! An [`Authority`] is immutable; a rotation's phase change makes a new one ([`Authority::for_phase`]).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;

use crate::ca::{self, Ca, CaError};
use crate::records;
use crate::rotation::{Phase, RECORD_KEY, RotationRecord};
use crate::store::{Store, Table};

pub struct Authority {
    /// The CA in use before the rotation (the only one outside a rotation).
    old: Arc<Ca>,
    /// The CA a rotation introduces, with the rotation's phase.
    new: Option<(Arc<Ca>, Phase)>,
    roots: Vec<CertificateDer<'static>>,
    serving_extra: Vec<CertificateDer<'static>>,
}

/// Why the CAs could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{dir}: {source}")]
    Ca { dir: String, source: CaError },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// SHA-256 (hex) of a certificate: how a proxy's report names the CA that signed its certificates.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

impl Authority {
    /// One CA, no rotation.
    pub fn single(ca: Ca) -> Self {
        Self::build(Arc::new(ca), None)
    }

    /// The same CAs in another phase of the rotation (`Done`: only the new CA is left).
    pub fn for_phase(&self, phase: Phase) -> Self {
        match (&self.new, phase) {
            (Some((new, _)), Phase::Done) => Self::build(new.clone(), None),
            (Some((new, _)), phase) => Self::build(self.old.clone(), Some((new.clone(), phase))),
            (None, _) => Self::build(self.old.clone(), None),
        }
    }

    /// A rotation to `new` in `phase`.
    pub fn rotating(&self, new: Ca, phase: Phase) -> Self {
        Self::build(self.old.clone(), Some((Arc::new(new), phase)))
    }

    fn build(old: Arc<Ca>, new: Option<(Arc<Ca>, Phase)>) -> Self {
        let mut roots = Vec::new();
        let mut serving_extra = Vec::new();
        match &new {
            None => roots.push(old.root().clone()),
            Some((new_ca, phase)) => {
                if phase.old_root_trusted() {
                    roots.push(old.root().clone());
                }
                if !roots.contains(new_ca.root()) {
                    roots.push(new_ca.root().clone());
                }
                // While the new CA signs and the retiring root is still trusted, a client that knows only the
                // retiring root (a proxy away during prepare) must still verify the serving chain: add the new CA
                // signed by the retiring one, and the retiring chain up to its root.
                if phase.new_ca_signs() && phase.old_root_trusted() && old.root() != new_ca.root() {
                    match old.cross_sign(&new_ca.chain()[0]) {
                        Ok(cross) => {
                            serving_extra.push(cross);
                            serving_extra.extend(old.chain().iter().cloned());
                        }
                        Err(e) => tracing::error!(
                            error = %e,
                            "cannot cross-sign the new CA: proxies that know only the retiring root cannot verify \
                             the control plane until they join again"
                        ),
                    }
                }
            }
        }
        Self { old, new, roots, serving_extra }
    }

    /// The CA that signs every new certificate.
    pub fn signer(&self) -> &Arc<Ca> {
        match &self.new {
            Some((new, phase)) if phase.new_ca_signs() => new,
            _ => &self.old,
        }
    }

    /// The trust bundle.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The CA whose certificates are being replaced (from the switch on), by [`fingerprint`] of its certificate.
    pub fn retiring(&self) -> Option<String> {
        match &self.new {
            Some((new, phase)) if phase.new_ca_signs() && new.chain()[0] != self.old.chain()[0] => {
                Some(fingerprint(&self.old.chain()[0]))
            }
            _ => None,
        }
    }

    /// The retiring CA's root, while a rotation is under way.
    pub fn retiring_root(&self) -> Option<&CertificateDer<'static>> {
        self.new.as_ref().map(|_| self.old.root())
    }

    /// Certificates appended to the serving chain after the signer's own chain.
    pub fn serving_extra(&self) -> &[CertificateDer<'static>] {
        &self.serving_extra
    }

    /// The phase of the rotation under way, if any.
    pub fn phase(&self) -> Option<Phase> {
        self.new.as_ref().map(|(_, phase)| *phase)
    }
}

/// Loads the CAs the store's rotation record names (the `init` CA when there was never a rotation).
pub fn load(data_dir: &Path, store: &dyn Store, trust_domain: &str) -> Result<Authority, AuthorityError> {
    let record: Option<RotationRecord> = records::load(store, Table::Meta, RECORD_KEY)?;
    for_record(data_dir, record.as_ref(), trust_domain)
}

/// The CAs a rotation record names, from the data dir's folders.
pub fn for_record(
    data_dir: &Path,
    record: Option<&RotationRecord>,
    trust_domain: &str,
) -> Result<Authority, AuthorityError> {
    let load_dir = |dir: &str| {
        Ca::load_dir(&data_dir.join(dir), trust_domain).map_err(|source| AuthorityError::Ca { dir: dir.into(), source })
    };
    Ok(match record {
        None => Authority::single(load_dir(ca::CA_DIR)?),
        Some(r) if r.phase == Phase::Done => Authority::single(load_dir(&r.new_dir)?),
        Some(r) => Authority::single(load_dir(&r.old_dir)?).rotating(load_dir(&r.new_dir)?, r.phase),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;
    use crate::ca::LocalCert;

    fn ca(dir: &Path, name: &str) -> Ca {
        let (cert, key) = Ca::generate_root_named("td.test", name).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), &cert).unwrap();
        std::fs::write(dir.join("ca-key.pem"), &key).unwrap();
        std::fs::write(dir.join("ca-chain.pem"), &cert).unwrap();
        Ca::load_dir(dir, "td.test").unwrap()
    }

    /// Verifies a serving chain the way `trellisctl` and proxies do (webpki, server name `trellis-control`).
    fn verifies(chain: &[CertificateDer<'static>], root: &CertificateDer<'static>) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), trellis_proto::tls::provider())
            .build()
            .unwrap();
        let name = ServerName::try_from(trellis_proto::CONTROL_PLANE_SERVER_NAME).unwrap();
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now()).map(|_| ())
    }

    fn serving_chain(authority: &Authority) -> Vec<CertificateDer<'static>> {
        let names = [trellis_proto::CONTROL_PLANE_SERVER_NAME.to_owned()];
        let (issued, _key): (_, String) = authority
            .signer()
            .issue_local(LocalCert::Server { dns_names: &names, ips: &[] }, Duration::from_secs(600))
            .unwrap();
        let mut chain = issued.chain;
        chain.extend(authority.serving_extra().iter().cloned());
        chain
    }

    #[test]
    fn phases_move_the_signer_the_bundle_and_the_cross_certificate() {
        let dir = tempdir();
        let old = ca(&dir.join("old"), "root one");
        let (old_root, old_cert) = (old.root().clone(), old.chain()[0].clone());
        let new = ca(&dir.join("new"), "root two");
        let new_root = new.root().clone();
        let start = Authority::single(old);
        assert_eq!(start.roots(), std::slice::from_ref(&old_root));
        assert_eq!(start.retiring(), None);

        let prepare = start.rotating(new, Phase::Prepare);
        assert_eq!(prepare.roots(), [old_root.clone(), new_root.clone()]);
        assert_eq!(prepare.signer().root(), &old_root, "the old CA still signs");
        assert!(prepare.serving_extra().is_empty());
        assert_eq!(prepare.retiring(), None);

        let switch = prepare.for_phase(Phase::Switch);
        assert_eq!(switch.signer().root(), &new_root);
        assert_eq!(switch.retiring(), Some(fingerprint(&old_cert)));
        // The new serving chain verifies against either root alone.
        let chain = serving_chain(&switch);
        verifies(&chain, &new_root).expect("new root");
        verifies(&chain, &old_root).expect("old root, through the cross-certificate");
        // Control: without the cross-certificate, the old root alone does not verify it.
        let bare = &chain[..chain.len() - switch.serving_extra().len()];
        assert!(verifies(bare, &old_root).is_err());

        let retire = switch.for_phase(Phase::Retire);
        assert_eq!(retire.roots(), std::slice::from_ref(&new_root));
        assert!(retire.serving_extra().is_empty());
        assert!(verifies(&serving_chain(&retire), &old_root).is_err());
        let done = retire.for_phase(Phase::Done);
        assert_eq!((done.roots(), done.phase(), done.retiring()), ([new_root.clone()].as_slice(), None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_same_root_under_a_new_intermediate_keeps_one_root() {
        let dir = tempdir();
        let root = ca(&dir.join("root"), "operator root");
        let intermediate = |name: &str| -> Ca {
            // An intermediate: a CA certificate under the root.
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
            let root_issuer = rcgen::Issuer::from_ca_cert_der(
                root.root(),
                rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("root/ca-key.pem")).unwrap()).unwrap(),
            )
            .unwrap();
            let cert = params.signed_by(&key, &root_issuer).unwrap();
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("ca-cert.pem"), cert.pem()).unwrap();
            std::fs::write(d.join("ca-key.pem"), key.serialize_pem()).unwrap();
            std::fs::write(d.join("ca-chain.pem"), ca::certs_to_pem(&[cert.der().clone(), root.root().clone()]))
                .unwrap();
            Ca::load_dir(&d, "td.test").unwrap()
        };
        let (one, two) = (intermediate("one"), intermediate("two"));
        let one_cert = one.chain()[0].clone();
        let switch = Authority::single(one).rotating(two, Phase::Switch);
        assert_eq!(switch.roots(), [root.root().clone()], "one root, unchanged");
        assert!(switch.serving_extra().is_empty(), "no cross-certificate needed");
        assert_eq!(switch.retiring(), Some(fingerprint(&one_cert)), "certificates of the old intermediate renew");
        verifies(&serving_chain(&switch), root.root()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "trellis-authority-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }
}
