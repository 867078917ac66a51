//! The mesh certificate authority: creates or imports the CA, signs X.509-SVIDs from CSRs (keys never leave
//! the proxies), node credentials, and the control plane's own serving and admin certificates.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use trellis_proto::SERIAL_TAG_BYTES;
use trellis_proto::spiffe::SpiffeId;

use crate::files;
use crate::serial_tag::NodeTag;

/// Certificates are back-dated a little so that small clock differences between hosts do not make a fresh
/// certificate "not yet valid".
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CSR is malformed: {0}")]
    MalformedCsr(String),
    #[error("CSR signature does not verify")]
    BadCsrSignature,
    #[error("CSR must hold exactly one URI SAN and no other SAN (found {uris} URI and {others} other SANs)")]
    BadSans { uris: usize, others: usize },
    #[error("CSR names {0}")]
    BadSpiffeId(String),
    #[error("CSR's trust domain {got:?} is not this mesh's ({want:?})")]
    ForeignTrustDomain { got: String, want: String },
    #[error("CSR's SPIFFE ID {0} is not a workload identity (spiffe://<td>/ns/<namespace>/sa/<service-account>)")]
    NotWorkload(String),
    #[error("{0}")]
    Refused(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("CA material: {0}")]
    Material(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A signed certificate: leaf first, then the issuing chain up to the root.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

/// The loaded CA: its signing key, its certificate and the chain up to the root.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Issuer certificate first, root last (one element when the CA is its own root).
    chain: Vec<CertificateDer<'static>>,
    /// The mesh JWT key kept with this CA (`jwt_key.rs`).
    jwt: crate::jwt_key::JwtKey,
}

/// The folder of the CA `init` creates, and the file names inside it (a rotation's CA has a folder of its own).
pub const CA_DIR: &str = "ca";
pub const CA_CERT: &str = "ca/ca-cert.pem";
pub const CA_KEY: &str = "ca/ca-key.pem";
pub const CA_CHAIN: &str = "ca/ca-chain.pem";
pub const ROOT_CERT: &str = "ca/root-cert.pem";

impl Ca {
    /// Creates a fresh self-signed ECDSA P-256 root for `trust_domain`; returns (certificate PEM, key PEM).
    pub fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
        Self::generate_root_named(trust_domain, "Trellis root CA")
    }

    /// [`Ca::generate_root`] with another common name (each rotation's root gets its own, so that names tell roots
    /// apart in paths and tools).
    pub fn generate_root_named(trust_domain: &str, common_name: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Checks operator-supplied CA material (Istio's "plug-in CA"): the certificate must be a CA whose public
    /// key matches the key, and the chain must lead to a self-signed root. Returns the chain, issuer first.
    pub fn check_imported(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let cert = single_cert(cert_pem, "--ca-cert")?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Material(format!("--ca-key: {e}")))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&cert).map_err(|e| CaError::Material(format!("--ca-cert: {e}")))?;
        if !parsed.is_ca() {
            return Err(CaError::Material(
                "--ca-cert is not a CA certificate (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        if parsed.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Material("--ca-key does not match --ca-cert's public key".into()));
        }
        let mut chain = vec![cert];
        if let Some(chain_pem) = chain_pem {
            chain.extend(parse_pem_certs(chain_pem).map_err(|e| CaError::Material(format!("--ca-chain: {e}")))?);
        }
        let root = chain.last().expect("chain has the CA certificate");
        let (_, root_parsed) =
            x509_parser::parse_x509_certificate(root).map_err(|e| CaError::Material(format!("--ca-chain: {e}")))?;
        if root_parsed.subject() != root_parsed.issuer() {
            return Err(CaError::Material(
                "the chain does not end in a self-signed root: pass the intermediates and root with --ca-chain".into(),
            ));
        }
        Ok(chain)
    }

    pub fn load(data_dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        Self::load_dir(&data_dir.join(CA_DIR), trust_domain)
    }

    /// Loads the CA whose files (`ca-cert.pem`, `ca-key.pem`, `ca-chain.pem`) are in `dir`.
    pub fn load_dir(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let file = |path: &str| dir.join(Path::new(path).file_name().expect("CA file names have a file name"));
        let read = |path: &str| {
            std::fs::read_to_string(file(path)).map_err(|e| CaError::Material(format!("{}: {e}", file(path).display())))
        };
        let cert_pem = read(CA_CERT)?;
        let key_pem = read(CA_KEY)?;
        let chain = parse_pem_certs(&read(CA_CHAIN)?)
            .map_err(|e| CaError::Material(format!("{}: {e}", file(CA_CHAIN).display())))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Material(format!("{CA_KEY}: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        let jwt = crate::jwt_key::JwtKey::load_or_create(dir).map_err(|e| CaError::Material(e.to_string()))?;
        Ok(Self { trust_domain: trust_domain.to_owned(), issuer, chain, jwt })
    }

    /// The JWT key that signs JWT-SVIDs while this CA signs.
    pub fn jwt_key(&self) -> &crate::jwt_key::JwtKey {
        &self.jwt
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle: the root this CA chains to.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.chain.last().expect("CA chain is never empty").clone()]
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        self.chain.last().expect("CA chain is never empty")
    }

    /// The CA's own certificate (the issuer of every certificate it signs), then the chain up to the root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs an X.509-SVID for a workload issued to the node whose tag is `tag` (the serial starts with it:
    /// `serial_tag.rs`). `authorize` decides whether the caller may hold the identity the CSR names (node namespaces,
    /// hosted workloads); its error is the refusal reason.
    pub fn sign_workload(
        &self,
        csr_der: &[u8],
        ttl: Duration,
        tag: &NodeTag,
        authorize: impl FnOnce(&SpiffeId, &str, &str) -> Result<(), String>,
    ) -> Result<(SpiffeId, Issued), CaError> {
        let csr = parse_csr(csr_der)?;
        let id = single_uri_san(&csr.params)?;
        let id = SpiffeId::parse(&id).map_err(|e| CaError::BadSpiffeId(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain { got: id.trust_domain().into(), want: self.trust_domain.clone() });
        }
        let trellis_proto::spiffe::Subject::Workload { namespace, service_account } = id.subject() else {
            return Err(CaError::NotWorkload(id.to_string()));
        };
        authorize(&id, namespace, service_account).map_err(CaError::Refused)?;
        let issued = self.sign_leaf_with(&csr.public_key, leaf_params(&id, ttl), tagged_serial(tag))?;
        Ok((id, issued))
    }

    /// Signs a node credential for `node`; the CSR only provides the key (its names are ignored).
    pub fn sign_node(&self, csr_der: &[u8], node: &str, ttl: Duration) -> Result<(SpiffeId, Issued), CaError> {
        let csr = parse_csr(csr_der)?;
        let id = SpiffeId::node(&self.trust_domain, node).map_err(|e| CaError::BadSpiffeId(e.to_string()))?;
        let mut params = leaf_params(&id, ttl);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok((id.clone(), self.sign_leaf(&csr.public_key, params)?))
    }

    /// Signs an admin credential for `name` (`spiffe://<td>/trellis/admin/<name>`, client auth only): a new admin's,
    /// or its renewal after a root rotation. The CSR only provides the key (its names are ignored).
    pub fn sign_admin(&self, csr_der: &[u8], name: &str, ttl: Duration) -> Result<(SpiffeId, Issued), CaError> {
        let csr = parse_csr(csr_der)?;
        let id = SpiffeId::admin(&self.trust_domain, name).map_err(|e| CaError::BadSpiffeId(e.to_string()))?;
        let mut params = leaf_params(&id, ttl);
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok((id.clone(), self.sign_leaf(&csr.public_key, params)?))
    }

    /// Issues a certificate for a key generated here: the admin credential (client) and the control plane's
    /// serving certificate. Returns (chain, key PEM).
    pub fn issue_local(&self, kind: LocalCert, ttl: Duration) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match kind {
            LocalCert::Admin(name) => {
                let id = SpiffeId::admin(&self.trust_domain, name).map_err(|e| CaError::BadSpiffeId(e.to_string()))?;
                params.distinguished_name.push(DnType::CommonName, name);
                params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            LocalCert::Server { dns_names, ips } => {
                params.distinguished_name.push(DnType::CommonName, trellis_proto::CONTROL_PLANE_SERVER_NAME);
                for name in dns_names {
                    params.subject_alt_names.push(SanType::DnsName(name.clone().try_into()?));
                }
                for ip in ips {
                    params.subject_alt_names.push(SanType::IpAddress(*ip));
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
        }
        let issued = self.sign_leaf(&key, params)?;
        Ok((issued, key.serialize_pem()))
    }

    /// A cross-certificate: `other`'s CA certificate (same subject, same key, same key identifier) signed by this
    /// CA, so that a chain ending in `other`'s root also verifies up to this CA's root. Valid as long as this CA.
    pub fn cross_sign(&self, other: &CertificateDer<'_>) -> Result<CertificateDer<'static>, CaError> {
        let material = |e: String| CaError::Material(format!("cross-signing: {e}"));
        let (_, parsed) = x509_parser::parse_x509_certificate(other).map_err(|e| material(e.to_string()))?;
        let spki = rcgen::SubjectPublicKeyInfo::from_der(parsed.tbs_certificate.subject_pki.raw)
            .map_err(|e| material(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(parsed.subject()).map_err(material)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        if let Ok(Some(ski)) =
            parsed.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
            && let x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) = ski.parsed_extension()
        {
            params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(id.0.to_vec());
        }
        let (_, own) = x509_parser::parse_x509_certificate(&self.chain[0]).map_err(|e| material(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = own.validity().not_after.to_datetime().min(parsed.validity().not_after.to_datetime());
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(&spki, &self.issuer)?.der().clone())
    }

    fn sign_leaf(&self, public_key: &impl rcgen::PublicKeyData, params: CertificateParams) -> Result<Issued, CaError> {
        self.sign_leaf_with(public_key, params, random_serial())
    }

    fn sign_leaf_with(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        mut params: CertificateParams,
        serial: SerialNumber,
    ) -> Result<Issued, CaError> {
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let not_after = params.not_after;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Issued { chain, serial_hex, not_after })
    }
}

pub enum LocalCert<'a> {
    Admin(&'a str),
    Server { dns_names: &'a [String], ips: &'a [IpAddr] },
}

/// X509-SVID leaf profile: one URI SAN, not a CA, digitalSignature, serverAuth + clientAuth.
fn leaf_params(id: &SpiffeId, ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    // Empty subject (as Istio): the identity lives only in the URI SAN, which rcgen then marks critical.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().expect("a validated SPIFFE ID is ASCII"))];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE.min(ttl);
    params.not_after = now + ttl;
    params
}

/// An X.509 name as rcgen writes it when it signs under a CA parsed from its certificate (the same attribute types,
/// string types and order), so that a cross-certificate's subject is byte for byte the name in the leaves' issuer.
fn distinguished_name(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attributes = rdn.iter();
        let (Some(attr), None) = (attributes.next(), attributes.next()) else {
            return Err("a name with several attributes in one RDN".into());
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or("an attribute type too large")?.collect();
        let data = attr.attr_value().data;
        let text = std::str::from_utf8(data).map_err(|_| "a name attribute that is not text".to_owned())?;
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => rcgen::DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => rcgen::DnValue::PrintableString(text.try_into().map_err(|e| format!("{e}"))?),
            Tag::Ia5String => rcgen::DnValue::Ia5String(text.try_into().map_err(|e| format!("{e}"))?),
            other => return Err(format!("a name attribute of type {other}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, CaError> {
    CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der)).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CaError::BadCsrSignature,
        other => CaError::MalformedCsr(other.to_string()),
    })
}

fn single_uri_san(params: &CertificateParams) -> Result<String, CaError> {
    let uris: Vec<&str> = params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    let others = params.subject_alt_names.len() - uris.len();
    match (uris.as_slice(), others) {
        ([uri], 0) => Ok((*uri).to_owned()),
        _ => Err(CaError::BadSans { uris: uris.len(), others }),
    }
}

/// 16 random bytes with the top bit clear: a positive serial of 127 bits of entropy (RFC 5280 allows 20 bytes).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).expect("system RNG");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A workload certificate's serial: the node's tag (8 bytes, a positive first byte without a leading zero), then 12
/// random bytes (96 bits of entropy): 20 bytes, RFC 5280's maximum.
fn tagged_serial(tag: &NodeTag) -> SerialNumber {
    let mut bytes = [0u8; 20];
    bytes[..SERIAL_TAG_BYTES].copy_from_slice(tag.bytes());
    aws_lc_rs::rand::fill(&mut bytes[SERIAL_TAG_BYTES..]).expect("system RNG");
    SerialNumber::from_slice(&bytes)
}

fn single_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, CaError> {
    let mut certs = parse_pem_certs(pem).map_err(|e| CaError::Material(format!("{what}: {e}")))?;
    if certs.len() != 1 {
        return Err(CaError::Material(format!("{what} must hold exactly one certificate, found {}", certs.len())));
    }
    Ok(certs.remove(0))
}

/// Why a text holds no usable PEM certificates.
#[derive(Debug, thiserror::Error)]
pub enum PemCertsError {
    #[error(transparent)]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("no PEM certificate found")]
    Empty,
}

pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PemCertsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(PemCertsError::Empty);
    }
    Ok(certs)
}

pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    certs.iter().map(|c| files::pem("CERTIFICATE", c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_certificates() {
        let (cert, _) = Ca::generate_root("test.example").unwrap();
        assert_eq!(parse_pem_certs(&format!("{cert}{cert}")).unwrap().len(), 2);
        assert_eq!(parse_pem_certs("no pem here").unwrap_err().to_string(), "no PEM certificate found");
        let broken = cert.replace("-----END CERTIFICATE-----", "");
        assert!(matches!(parse_pem_certs(&broken), Err(PemCertsError::Pem(_))));
    }
}
