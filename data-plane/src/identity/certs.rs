//! What the proxy needs to know about a certificate (validity, serial, identity), and the checks applied to
//! every certificate the control plane issues before it is used.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use trellis_proto::spiffe::SpiffeId;
use x509_parser::extensions::GeneralName;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("certificate {index} of the chain cannot be parsed: {reason}")]
    ChainParse { index: usize, reason: String },
    #[error("the certificate is for another key than the one in the CSR")]
    KeyMismatch,
    #[error("the certificate names {got:?}, expected {want}")]
    WrongIdentity { got: Vec<String>, want: String },
    #[error("the certificate expired at {0}")]
    Expired(String),
    #[error("not a CA certificate (basicConstraints CA:TRUE missing): {0}")]
    NotCa(String),
}

/// Parsed facts about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    /// Hex of the serial number's magnitude (no DER sign byte).
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub uri_sans: Vec<String>,
    pub is_ca: bool,
    /// DER SubjectPublicKeyInfo, to match a certificate against the key the proxy holds.
    pub spki: Vec<u8>,
    /// SHA-256 of the whole certificate (its fingerprint).
    pub sha256: String,
    /// SHA-256 of the SubjectPublicKeyInfo, as `sha256:<hex>` (the CA-pin format).
    pub spki_sha256: String,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
        let uri_sans = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(CertError::Parse(format!("subjectAltName: {e}"))),
        };
        let raw_serial = cert.raw_serial();
        let serial = match raw_serial {
            [0, rest @ ..] if rest.first().is_some_and(|b| b & 0x80 != 0) => rest,
            other => other,
        };
        let spki = cert.tbs_certificate.subject_pki.raw;
        Ok(Self {
            subject: cert.subject().to_string(),
            serial: hex::encode(serial),
            not_before: unix_to_system(cert.validity().not_before.timestamp()),
            not_after: unix_to_system(cert.validity().not_after.timestamp()),
            uri_sans,
            is_ca: cert.is_ca(),
            spki: spki.to_vec(),
            sha256: hex::encode(sha256(der)),
            spki_sha256: format!("sha256:{}", hex::encode(sha256(spki))),
        })
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }
}

/// Checks a chain the control plane issued for our key: the leaf parses, carries our public key and exactly
/// the expected SPIFFE ID, and has not expired; the rest of the chain parses. Returns the leaf's facts.
pub fn check_issued(
    chain: &[CertificateDer<'_>],
    our_spki: &[u8],
    want: &SpiffeId,
    now: SystemTime,
) -> Result<CertInfo, CertError> {
    let leaf = chain.first().ok_or(CertError::EmptyChain)?;
    let info = CertInfo::parse(leaf)?;
    for (index, cert) in chain.iter().enumerate().skip(1) {
        x509_parser::parse_x509_certificate(cert)
            .map_err(|e| CertError::ChainParse { index, reason: e.to_string() })?;
    }
    if info.spki != our_spki {
        return Err(CertError::KeyMismatch);
    }
    if info.uri_sans != [want.to_string()] {
        return Err(CertError::WrongIdentity { got: info.uri_sans, want: want.to_string() });
    }
    if info.not_after <= now {
        return Err(CertError::Expired(rfc3339(info.not_after)));
    }
    Ok(info)
}

/// Parses a trust-bundle root: any certificate that is a CA.
pub fn check_root(der: &[u8]) -> Result<CertInfo, CertError> {
    let info = CertInfo::parse(der)?;
    if !info.is_ca {
        return Err(CertError::NotCa(info.subject));
    }
    Ok(info)
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref().try_into().expect("SHA-256 digests are 32 bytes")
}

/// Certificates as PEM text (`CERTIFICATE` blocks), for the state directory.
pub fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs.iter().map(|c| pem::Pem::new("CERTIFICATE", c.to_vec())).collect();
    pem::encode_many(&blocks)
}

pub fn from_pem(text: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let blocks = pem::parse_many(text).map_err(|e| CertError::Parse(format!("PEM: {e}")))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect())
}

#[cfg(test)]
pub(crate) mod test_ca {
    //! A throwaway CA for tests: signs CSRs the way the control plane does.
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use time::OffsetDateTime;

    pub struct TestCa {
        pub root: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub fn new() -> Self {
            Self::named("test root")
        }

        /// A root with this common name (a fresh key every time, whatever the name).
        pub fn named(common_name: &str) -> Self {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, common_name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            let root = cert.der().clone();
            Self { root, issuer: Issuer::new(params, key) }
        }

        /// Signs a CSR, keeping its SANs, valid for `lifetime` from now.
        pub fn sign(&self, csr_der: &[u8], lifetime: std::time::Duration) -> Vec<CertificateDer<'static>> {
            self.sign_as(csr_der, None, lifetime)
        }

        /// Signs a CSR as [`TestCa::sign`], with `uri` as its only SAN when given (as the control plane names a
        /// node credential, whose CSR names nothing).
        pub fn sign_as(
            &self,
            csr_der: &[u8],
            uri: Option<&str>,
            lifetime: std::time::Duration,
        ) -> Vec<CertificateDer<'static>> {
            let der = CertificateSigningRequestDer::from(csr_der.to_vec());
            let mut csr = CertificateSigningRequestParams::from_der(&der).unwrap();
            if let Some(uri) = uri {
                csr.params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
            }
            let now = time::OffsetDateTime::now_utc();
            csr.params.not_before = now - time::Duration::seconds(1);
            csr.params.not_after = now + lifetime;
            let cert = csr.signed_by(&self.issuer).unwrap();
            vec![cert.der().clone(), self.root.clone()]
        }

        /// A leaf for a fresh key in the control plane's X.509-SVID profile (empty subject, not a CA,
        /// digitalSignature, serverAuth + clientAuth) but with any SANs and validity, so that verifier tests can
        /// break one property at a time. Returns the chain (leaf, root) and the leaf's key.
        pub fn issue(
            &self,
            sans: Vec<SanType>,
            not_before: OffsetDateTime,
            not_after: OffsetDateTime,
        ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = sans;
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            params.not_before = not_before;
            params.not_after = not_after;
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (vec![cert.der().clone(), self.root.clone()], key)
        }

        /// A leaf certificate (not a CA), for negative tests.
        pub fn leaf(&self) -> CertificateDer<'static> {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let params = CertificateParams::new(vec!["leaf.example".to_owned()]).unwrap();
            params.signed_by(&key, &self.issuer).unwrap().der().clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;
    use std::time::Duration;

    #[test]
    fn root_and_leaf_classification() {
        let ca = test_ca::TestCa::new();
        let root = check_root(&ca.root).unwrap();
        assert!(root.is_ca);
        assert!(root.spki_sha256.starts_with("sha256:"));
        assert_eq!(root.sha256.len(), 64);
        assert!(matches!(check_root(&ca.leaf()), Err(CertError::NotCa(_))));
        assert!(matches!(check_root(b"garbage"), Err(CertError::Parse(_))));
    }

    #[test]
    fn pem_round_trip() {
        let ca = test_ca::TestCa::new();
        let certs = vec![ca.leaf(), ca.root.clone()];
        assert_eq!(from_pem(&to_pem(&certs)).unwrap(), certs);
    }

    #[test]
    fn issued_checks() {
        let ca = test_ca::TestCa::new();
        let id = SpiffeId::workload("td", "ns", "sa").unwrap();
        let key = super::super::csr::new_key().unwrap();
        let csr = super::super::csr::workload_csr(&key, &id).unwrap();
        let chain = ca.sign(&csr, Duration::from_secs(3600));
        let spki = key.subject_public_key_info();
        let now = SystemTime::now();

        let info = check_issued(&chain, &spki, &id, now).unwrap();
        assert_eq!(info.uri_sans, [id.to_string()]);
        assert!(info.lifetime() >= Duration::from_secs(3600));

        let other_key = super::super::csr::new_key().unwrap();
        assert_eq!(check_issued(&chain, &other_key.subject_public_key_info(), &id, now), Err(CertError::KeyMismatch));
        let other_id = SpiffeId::workload("td", "ns", "other").unwrap();
        assert!(matches!(check_issued(&chain, &spki, &other_id, now), Err(CertError::WrongIdentity { .. })));
        let later = now + Duration::from_secs(7200);
        assert!(matches!(check_issued(&chain, &spki, &id, later), Err(CertError::Expired(_))));
        assert_eq!(check_issued(&[], &spki, &id, now), Err(CertError::EmptyChain));
    }
}
