//! TLS for the control channel, shared by proxies and `trellisctl`: TLS 1.3 only, the aws-lc-rs provider with
//! post-quantum hybrid key exchange preferred, ALPN `h2`, and two ways to trust the control plane:
//! the mesh's trust bundle, or (before a proxy has joined) a CA pin, the SHA-256 of the root's
//! SubjectPublicKeyInfo, as kubeadm's discovery hash. No trust-on-first-use.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Channel, Endpoint};

use crate::CONTROL_PLANE_SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("CA pin {0:?} is not of the form sha256:<64 hex digits>")]
    BadPin(String),
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid control-plane address {address:?}: {source}")]
    BadAddress { address: String, source: tonic::transport::Error },
    #[error("cannot reach the control plane at {address}: {source}")]
    Connect { address: String, source: tonic::transport::Error },
}

/// The one crypto provider of Trellis: aws-lc-rs, whose default key-exchange order puts the
/// X25519MLKEM768 hybrid first.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo.
pub fn spki_sha256(cert_der: &[u8]) -> Result<[u8; 32], TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.tbs_certificate.subject_pki.raw);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// The CA pin as printed for operators: `sha256:<hex>`.
pub fn ca_pin(root_der: &[u8]) -> Result<String, TlsError> {
    Ok(format!("sha256:{}", hex::encode(spki_sha256(root_der)?)))
}

pub fn parse_pin(pin: &str) -> Result<[u8; 32], TlsError> {
    let bad = || TlsError::BadPin(pin.to_owned());
    let hex_part = pin.strip_prefix("sha256:").ok_or_else(bad)?;
    let bytes = hex::decode(hex_part).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// How a client decides to trust the control plane.
pub enum ServerTrust {
    /// The mesh trust bundle (root certificates, DER).
    Roots(Vec<CertificateDer<'static>>),
    /// Only a CA pin is known (a proxy's first join): the chain the server sends must contain a
    /// certificate whose SPKI hash is the pin, and must verify up to it.
    Pin([u8; 32]),
}

/// A client credential: certificate chain (leaf first) and its private key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// rustls client config for the control channel.
pub fn client_config(trust: ServerTrust, identity: Option<ClientIdentity>) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        ServerTrust::Roots(roots) => {
            let mut store = RootCertStore::empty();
            for root in roots {
                store.add(root)?;
            }
            WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?
        }
        ServerTrust::Pin(pin) => Arc::new(PinnedRootVerifier { pin, provider: provider.clone() }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Opens a gRPC channel to the control plane at `address` (`host:port`) over TLS with `config`.
pub async fn connect(address: &str, config: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    connect_with(address, config, |address| async move { tokio::net::TcpStream::connect(address).await }).await
}

/// [`connect`] with the caller's TCP dial (the proxy marks its sockets so that its own capture rules skip them).
pub async fn connect_with<D, F>(address: &str, config: Arc<ClientConfig>, dial: D) -> Result<Channel, TlsError>
where
    D: Fn(String) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|source| TlsError::BadAddress { address: address.to_owned(), source })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    let address = address.to_owned();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let dialled = dial.clone()(address.clone());
            async move {
                let tcp = dialled.await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(CONTROL_PLANE_SERVER_NAME).expect("static server name is valid");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|source| TlsError::Connect { address: endpoint_address(&endpoint), source })?;
    Ok(channel)
}

fn endpoint_address(endpoint: &Endpoint) -> String {
    endpoint.uri().authority().map(|a| a.to_string()).unwrap_or_default()
}

/// Verifies the server chain up to the certificate the pin names, wherever it sits in the chain.
#[derive(Debug)]
struct PinnedRootVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedRootVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor =
            intermediates.iter().find(|cert| spki_sha256(cert).is_ok_and(|hash| hash == self.pin)).ok_or_else(
                || rustls::Error::General("no certificate in the control plane's chain matches the CA pin".into()),
            )?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_parsing() {
        assert!(parse_pin(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        for bad in
            ["", "sha256:", "sha1:abcd", &format!("sha256:{}", "zz".repeat(32)), &format!("sha256:{}", "ab".repeat(31))]
        {
            assert!(parse_pin(bad).is_err(), "{bad}");
        }
    }
}
