//! Raw HBONE peers for tests: a client that opens CONNECT streams with any credential, an imposter server, and
//! certificates signed directly with a control plane's CA key (to make an expired one). TLS configs come from the
//! proxy's own `trellis_data_plane::tls`, so tests exercise the same verification rules.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use time::OffsetDateTime;
use trellis_proto::spiffe::SpiffeId;

/// A certificate chain and its key.
pub struct Credential {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credential {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

/// An SVID for `spiffe_id` signed with the CA key in `data_dir` (a control plane's), valid over the given window.
pub fn sign_with_ca(
    data_dir: &Path,
    spiffe_id: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Credential {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(data_dir.join("ca/ca-key.pem")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(data_dir.join("ca/ca-cert.pem")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer).unwrap();
    let root = crate::client::pem_certs(&ca_pem).remove(0);
    Credential { chain: vec![cert.der().clone(), root], key: crate::client::key_der(&key) }
}

/// A currently valid SVID signed with `data_dir`'s CA.
pub fn valid_credential(data_dir: &Path, spiffe_id: &str) -> Credential {
    let now = OffsetDateTime::now_utc();
    sign_with_ca(data_dir, spiffe_id, now - Duration::from_secs(60), now + Duration::from_secs(3600))
}

pub fn roots(pem: &str) -> Arc<RootCertStore> {
    let mut store = RootCertStore::empty();
    for cert in crate::client::pem_certs(pem) {
        store.add(cert).unwrap();
    }
    Arc::new(store)
}

/// Opens an HBONE connection to `addr` presenting `credential` (or none), expecting the server to be `expected`.
pub async fn connect(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    expected: &str,
    credential: Option<Credential>,
) -> Result<SendRequest<Empty<Bytes>>, String> {
    let provider = trellis_proto::tls::provider();
    let expected = SpiffeId::parse(expected).map_err(|e| e.to_string())?;
    let config = match credential {
        Some(c) => trellis_data_plane::tls::client_config(provider, roots, expected, c.chain, c.key)?,
        None => {
            // A client without a certificate: same verification of the server, no client auth.
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec()];
            config
        }
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one request (`CONNECT target` unless `method` says otherwise) and returns the status.
pub async fn request(
    sender: &mut SendRequest<Empty<Bytes>>,
    method: Method,
    target: &str,
) -> Result<StatusCode, String> {
    let request = Request::builder().method(method).uri(target).body(Empty::new()).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| "no answer within 10s".to_owned())?
        .map_err(|e| format!("request: {e}"))?;
    Ok(response.status())
}

/// A TLS server presenting `credential` that accepts any mesh client and speaks HTTP/2, answering 200 to
/// everything: an imposter for the client-side identity check. Returns its address.
pub async fn imposter(
    bind: SocketAddr,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    credential: Credential,
) -> SocketAddr {
    let config = trellis_data_plane::tls::server_config(
        trellis_proto::tls::provider(),
        roots,
        trust_domain,
        credential.chain,
        credential.key,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}
