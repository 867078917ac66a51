//! Keys and certificate signing requests. Every key is generated here and never leaves the proxy: the
//! control plane only ever sees CSRs.

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use trellis_proto::spiffe::SpiffeId;

/// A fresh ECDSA P-256 key (one per workload and per renewal).
pub fn new_key() -> Result<KeyPair, rcgen::Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
}

/// CSR for the node credential. It names nothing: the control plane decides the node's SPIFFE ID from the
/// join token.
pub fn node_csr(key: &KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// CSR for a workload certificate: exactly one SAN, the URI of the workload's SPIFFE ID.
pub fn workload_csr(key: &KeyPair, id: &SpiffeId) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
    Ok(params.serialize_request(key)?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    fn sans(csr_der: &[u8]) -> Vec<String> {
        let (rest, csr) = X509CertificationRequest::from_der(csr_der).expect("CSR parses");
        assert!(rest.is_empty());
        csr.verify_signature().expect("CSR is self-signed by its key");
        let mut out = Vec::new();
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    out.push(match name {
                        GeneralName::URI(uri) => format!("URI:{uri}"),
                        other => format!("other:{other:?}"),
                    });
                }
            }
        }
        out
    }

    #[test]
    fn workload_csr_has_exactly_one_uri_san() {
        let key = new_key().unwrap();
        let id = SpiffeId::workload("cluster.local", "shop", "web-sa").unwrap();
        let der = workload_csr(&key, &id).unwrap();
        assert_eq!(sans(&der), ["URI:spiffe://cluster.local/ns/shop/sa/web-sa"]);
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(csr.certification_request_info.subject_pki.raw, key.subject_public_key_info().as_slice());
    }

    #[test]
    fn node_csr_has_no_san_and_fresh_keys_differ() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_ne!(a.public_key_raw(), b.public_key_raw());
        assert!(sans(&node_csr(&a).unwrap()).is_empty());
    }
}
