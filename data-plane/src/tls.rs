//! mTLS between proxies. The rustls configs are built once per change of a workload certificate or of the trust
//! bundle and published through an `ArcSwap`; every accept and every new tunnel connection reads the current set,
//! so a rotation never blocks the data path and never touches established connections.
//!
//! SPIFFE rules on both sides: the chain must verify up to a root of the bundle, and the leaf must carry exactly
//! one URI SAN, a SPIFFE ID of this trust domain. A client additionally requires the server to be the destination
//! workload's identity.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use trellis_proto::spiffe::SpiffeId;

use crate::config::WorkloadConfig;
use crate::identity::WorkloadCerts;
use crate::identity::workload::WorkloadCert;
use crate::state::TrustBundle;

const ALPN_H2: &[u8] = b"h2";

/// Most encrypted bytes a connection queues for its socket. rustls's default (64 KiB) is less than one HTTP/2 DATA
/// frame carrying a full copy buffer (`copy::BUFFER_SIZE` plus a 9-byte header): the frame's last bytes then became
/// a record and a `writev` of their own, every frame. Room for two full frames; a limit, not an allocation.
const SEND_BUFFER_LIMIT: usize = 2 * crate::copy::BUFFER_SIZE + 1024;

/// Applies the proxy's TLS buffer settings to an established HBONE connection (either side).
pub fn tune<S>(connection: &mut rustls::ConnectionCommon<S>) {
    connection.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
}

/// The SPIFFE ID a verified peer certificate carries (exactly one URI SAN).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparsable certificate: {e}"))?;
    let mut uris = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if uris.len() != 1 {
        return Err(format!("certificate has {} URI SANs, a SPIFFE certificate has exactly one", uris.len()));
    }
    SpiffeId::parse(&uris.remove(0)).map_err(|e| e.to_string())
}

fn check_identity(cert: &CertificateDer<'_>, trust_domain: &str) -> Result<SpiffeId, rustls::Error> {
    let id = peer_identity(cert).map_err(rustls::Error::General)?;
    if id.trust_domain() != trust_domain {
        return Err(rustls::Error::General(format!("peer {id} is not in trust domain {trust_domain}")));
    }
    Ok(id)
}

/// The current TLS material. Immutable; replaced whole on every change.
pub struct TlsSet {
    /// Server config by local address: the certificate presented is the destination workload's.
    servers: HashMap<IpAddr, Arc<ServerConfig>>,
    identities: HashMap<SpiffeId, Arc<WorkloadCert>>,
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    /// Client configs per (source, destination) identity, built when a new tunnel connection needs one.
    clients: Mutex<HashMap<(SpiffeId, SpiffeId), Arc<ClientConfig>>>,
    /// Changes with every rebuild: pooled connections from an older set are not reused for new streams.
    pub generation: u64,
}

impl TlsSet {
    fn empty() -> Self {
        Self {
            servers: HashMap::new(),
            identities: HashMap::new(),
            roots: Arc::new(RootCertStore::empty()),
            trust_domain: String::new(),
            provider: trellis_proto::tls::provider(),
            clients: Mutex::new(HashMap::new()),
            generation: 0,
        }
    }

    pub fn server_for(&self, local: IpAddr) -> Option<Arc<ServerConfig>> {
        self.servers.get(&local).cloned()
    }

    /// Client config presenting `source`'s certificate and accepting only `destination` as the server.
    pub fn client_for(&self, source: &SpiffeId, destination: &SpiffeId) -> Result<Arc<ClientConfig>, String> {
        let key = (source.clone(), destination.clone());
        if let Some(config) = self.clients.lock().get(&key) {
            return Ok(config.clone());
        }
        let cert = self.identities.get(source).ok_or_else(|| format!("no certificate for {source} yet"))?;
        if self.roots.is_empty() {
            return Err("no trust bundle yet".into());
        }
        let config = client_config(
            self.provider.clone(),
            self.roots.clone(),
            destination.clone(),
            cert.chain.clone(),
            cert.key(),
        )?;
        let config = Arc::new(config);
        self.clients.lock().insert(key, config.clone());
        Ok(config)
    }
}

/// Holder of the current [`TlsSet`].
pub struct MeshTls {
    current: ArcSwap<TlsSet>,
}

impl Default for MeshTls {
    fn default() -> Self {
        Self { current: ArcSwap::from_pointee(TlsSet::empty()) }
    }
}

impl MeshTls {
    pub fn load(&self) -> Arc<TlsSet> {
        self.current.load_full()
    }

    /// Rebuilds every config from the current certificates and bundle.
    pub fn rebuild(&self, workloads: &[WorkloadConfig], certs: &WorkloadCerts, bundle: Option<&TrustBundle>) {
        let generation = self.current.load().generation + 1;
        match build(workloads, certs, bundle, generation) {
            Ok(set) => {
                tracing::debug!(generation, servers = set.servers.len(), "TLS configs rebuilt");
                self.current.store(Arc::new(set));
            }
            Err(e) => tracing::error!(error = %e, "cannot build TLS configs; keeping the previous ones"),
        }
    }
}

fn build(
    workloads: &[WorkloadConfig],
    certs: &WorkloadCerts,
    bundle: Option<&TrustBundle>,
    generation: u64,
) -> Result<TlsSet, String> {
    let provider = trellis_proto::tls::provider();
    let mut set = TlsSet { generation, provider: provider.clone(), ..TlsSet::empty() };
    let Some(bundle) = bundle else { return Ok(set) };
    let mut roots = RootCertStore::empty();
    for root in bundle.root_ders() {
        roots.add(root).map_err(|e| e.to_string())?;
    }
    let roots = Arc::new(roots);
    set.roots = roots.clone();
    set.trust_domain = bundle.trust_domain.clone();
    for cert in certs.all() {
        set.identities.insert(cert.spiffe_id.clone(), cert);
    }
    for workload in workloads {
        let Ok(id) = SpiffeId::workload(&bundle.trust_domain, &workload.namespace, &workload.service_account) else {
            continue;
        };
        let Some(cert) = set.identities.get(&id) else { continue };
        let config =
            server_config(provider.clone(), roots.clone(), &bundle.trust_domain, cert.chain.clone(), cert.key())
                .map_err(|e| format!("{id}: {e}"))?;
        for address in &workload.addresses {
            set.servers.insert(*address, config.clone());
        }
    }
    Ok(set)
}

/// Tunnel server side: TLS 1.3, ALPN h2, a client certificate required and checked by SPIFFE rules.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let verifier = Arc::new(SpiffeClientVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| e.to_string())?,
        trust_domain: trust_domain.to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Tunnel client side: TLS 1.3, ALPN h2, presenting `chain`, accepting only a server that is `expected`.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, String> {
    let verifier = Arc::new(SpiffeServerVerifier { roots, expected, provider: provider.clone() });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Client certificates: webpki chain verification, then the SPIFFE identity rules.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.trust_domain)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server certificates: chain up to the bundle, and the SPIFFE ID must be the destination workload's (SPIFFE
/// certificates carry no DNS name, so the usual hostname check does not apply).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = check_identity(end_entity, self.expected.trust_domain())?;
        if id != self.expected {
            return Err(rustls::Error::General(format!("server is {id}, expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
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
