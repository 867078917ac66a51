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
use crate::revocation::RevocationList;
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

/// Why a peer certificate names no SPIFFE identity.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    #[error("unparsable certificate: {0}")]
    Unparsable(x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("certificate has {0} URI SANs, a SPIFFE certificate has exactly one")]
    UriSans(usize),
    #[error(transparent)]
    SpiffeId(#[from] trellis_proto::spiffe::SpiffeIdError),
}

/// Why no client config can be had for a new tunnel connection (yet).
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error("no certificate for {0} yet")]
    NoCertificate(SpiffeId),
    #[error("no trust bundle yet")]
    NoTrustBundle,
    /// rustls refused the config (the text of its error: `client_config` is shared with the test harness).
    #[error("{0}")]
    Build(String),
}

/// Why the TLS set could not be rebuilt (the previous one stays).
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("{0}")]
    Root(rustls::Error),
    #[error("{id}: {reason}")]
    Server { id: SpiffeId, reason: String },
}

/// The SPIFFE ID a verified peer certificate carries (exactly one URI SAN).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(PeerIdentityError::Unparsable)?;
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
        return Err(PeerIdentityError::UriSans(uris.len()));
    }
    Ok(SpiffeId::parse(&uris.remove(0))?)
}

fn check_identity(cert: &CertificateDer<'_>, trust_domain: &str) -> Result<SpiffeId, rustls::Error> {
    let id = peer_identity(cert).map_err(|e| rustls::Error::General(e.to_string()))?;
    if id.trust_domain() != trust_domain {
        return Err(rustls::Error::General(format!("peer {id} is not in trust domain {trust_domain}")));
    }
    Ok(id)
}

/// The SPIFFE identity rules, then revocation: a certificate the current revocation list names is refused with the
/// reason (counted in `trellis_revocations_total{action="refused"}`).
fn check_peer(
    cert: &CertificateDer<'_>,
    trust_domain: &str,
    revocations: &RevocationList,
) -> Result<SpiffeId, rustls::Error> {
    let id = check_identity(cert, trust_domain)?;
    if let Err(revoked) = revocations.check_cert(cert, &id) {
        revoked.count("refused");
        return Err(rustls::Error::General(revoked.to_string()));
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
    /// The revocation list every verifier of this set reads (the same one across rebuilds).
    revocations: Arc<RevocationList>,
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
            revocations: Arc::default(),
        }
    }

    pub fn revocations(&self) -> &RevocationList {
        &self.revocations
    }

    pub fn server_for(&self, local: IpAddr) -> Option<Arc<ServerConfig>> {
        self.servers.get(&local).cloned()
    }

    /// Client config presenting `source`'s certificate and accepting only `destination` as the server.
    pub fn client_for(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, ClientConfigError> {
        let key = (source.clone(), destination.clone());
        if let Some(config) = self.clients.lock().get(&key) {
            return Ok(config.clone());
        }
        let cert = self.identities.get(source).ok_or_else(|| ClientConfigError::NoCertificate(source.clone()))?;
        if self.roots.is_empty() {
            return Err(ClientConfigError::NoTrustBundle);
        }
        let config = client_config(
            self.provider.clone(),
            self.roots.clone(),
            destination.clone(),
            cert.chain.clone(),
            cert.key(),
            self.revocations.clone(),
        )
        .map_err(ClientConfigError::Build)?;
        let config = Arc::new(config);
        self.clients.lock().insert(key, config.clone());
        Ok(config)
    }
}

/// Holder of the current [`TlsSet`], and of the revocation list its verifiers read.
pub struct MeshTls {
    current: ArcSwap<TlsSet>,
    revocations: Arc<RevocationList>,
}

impl Default for MeshTls {
    fn default() -> Self {
        let revocations = Arc::new(RevocationList::default());
        let set = TlsSet { revocations: revocations.clone(), ..TlsSet::empty() };
        Self { current: ArcSwap::from_pointee(set), revocations }
    }
}

impl MeshTls {
    pub fn load(&self) -> Arc<TlsSet> {
        self.current.load_full()
    }

    /// The revocation list every handshake is checked against; replacing its content needs no rebuild.
    pub fn revocations(&self) -> &RevocationList {
        &self.revocations
    }

    /// Rebuilds every config from the current certificates and bundle.
    pub fn rebuild(&self, workloads: &[WorkloadConfig], certs: &WorkloadCerts, bundle: Option<&TrustBundle>) {
        let generation = self.current.load().generation + 1;
        match build(workloads, certs, bundle, generation, &self.revocations) {
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
    revocations: &Arc<RevocationList>,
) -> Result<TlsSet, BuildError> {
    let provider = trellis_proto::tls::provider();
    let mut set =
        TlsSet { generation, provider: provider.clone(), revocations: revocations.clone(), ..TlsSet::empty() };
    let Some(bundle) = bundle else { return Ok(set) };
    let mut roots = RootCertStore::empty();
    for root in bundle.root_ders() {
        roots.add(root).map_err(BuildError::Root)?;
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
        let config = server_config(
            provider.clone(),
            roots.clone(),
            &bundle.trust_domain,
            cert.chain.clone(),
            cert.key(),
            revocations.clone(),
        )
        .map_err(|reason| BuildError::Server { id: id.clone(), reason })?;
        for address in &workload.addresses {
            set.servers.insert(*address, config.clone());
        }
    }
    Ok(set)
}

/// Tunnel server side: TLS 1.3, ALPN h2, a client certificate required and checked by SPIFFE rules and against
/// `revocations`. (Its error is rustls's text: the test harness, `tests/src/hbone.rs`, builds its peers with this
/// and `client_config`.)
pub fn server_config(
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    revocations: Arc<RevocationList>,
) -> Result<Arc<ServerConfig>, String> {
    let verifier = Arc::new(SpiffeClientVerifier {
        inner: WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| e.to_string())?,
        trust_domain: trust_domain.to_owned(),
        revocations,
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

/// Tunnel client side: TLS 1.3, ALPN h2, presenting `chain`, accepting only a server that is `expected` and not
/// revoked.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    revocations: Arc<RevocationList>,
) -> Result<ClientConfig, String> {
    let verifier = Arc::new(SpiffeServerVerifier { roots, expected, provider: provider.clone(), revocations });
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
    revocations: Arc<RevocationList>,
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
        check_peer(end_entity, &self.trust_domain, &self.revocations)?;
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
    revocations: Arc<RevocationList>,
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
        let id = check_peer(end_entity, self.expected.trust_domain(), &self.revocations)?;
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

#[cfg(test)]
mod tests {
    //! Real TLS 1.3 handshakes over in-memory pipes, between configs made by `client_config` and `server_config`
    //! (what `TlsSet` hands to the pool and to inbound). Each refusal test first runs the same handshake with a good
    //! certificate, then breaks one SPIFFE rule and checks the refusing side's verifier error and the alert its peer
    //! receives.
    use super::*;
    use crate::identity::certs::test_ca::TestCa;
    use rcgen::SanType;
    use rustls::{AlertDescription, CertificateError};
    use time::{Duration, OffsetDateTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const TRUST_DOMAIN: &str = "td.test";
    const CLIENT_SA: &str = "client";
    const SERVER_SA: &str = "server";

    fn workload(trust_domain: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(trust_domain, "ns", sa).unwrap()
    }

    fn uri(id: &SpiffeId) -> SanType {
        SanType::URI(id.to_string().try_into().unwrap())
    }

    struct Credential {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    }

    /// Valid from a minute ago for an hour.
    fn current(ca: &TestCa, sans: Vec<SanType>) -> Credential {
        let now = OffsetDateTime::now_utc();
        let (chain, key) = ca.issue(sans, now - Duration::minutes(1), now + Duration::hours(1));
        Credential { chain, key }
    }

    /// Expired an hour ago.
    fn expired(ca: &TestCa, sans: Vec<SanType>) -> Credential {
        let now = OffsetDateTime::now_utc();
        let (chain, key) = ca.issue(sans, now - Duration::hours(2), now - Duration::hours(1));
        Credential { chain, key }
    }

    fn good_client(ca: &TestCa) -> Credential {
        current(ca, vec![uri(&workload(TRUST_DOMAIN, CLIENT_SA))])
    }

    fn good_server(ca: &TestCa) -> Credential {
        current(ca, vec![uri(&workload(TRUST_DOMAIN, SERVER_SA))])
    }

    fn roots(bundle: &TestCa) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(bundle.root.clone()).unwrap();
        Arc::new(roots)
    }

    /// A tunnel server trusting `bundle`'s root, in this trust domain, presenting `credential`.
    fn server(bundle: &TestCa, credential: Credential) -> Arc<ServerConfig> {
        let provider = trellis_proto::tls::provider();
        server_config(provider, roots(bundle), TRUST_DOMAIN, credential.chain, credential.key, Arc::default()).unwrap()
    }

    /// A tunnel client trusting `bundle`'s root, presenting `credential`, expecting the server workload.
    fn client(bundle: &TestCa, credential: Credential) -> Arc<ClientConfig> {
        let provider = trellis_proto::tls::provider();
        let expected = workload(TRUST_DOMAIN, SERVER_SA);
        Arc::new(
            client_config(provider, roots(bundle), expected, credential.chain, credential.key, Arc::default()).unwrap(),
        )
    }

    /// What one side of a handshake ended with: the peer's SPIFFE ID, or the TLS error that stopped it.
    type Side = Result<SpiffeId, rustls::Error>;

    fn tls_error(error: std::io::Error) -> rustls::Error {
        let text = error.to_string();
        match error.into_inner().map(|inner| inner.downcast::<rustls::Error>()) {
            Some(Ok(tls)) => *tls,
            _ => panic!("not a TLS error: {text}"),
        }
    }

    /// Connects `client` to `server` over an in-memory pipe. The server sends one byte once it has accepted, and
    /// the client reads it: in TLS 1.3 the client's handshake is done before the server has checked the client
    /// certificate, so a refusal by the server reaches the client as an alert on that read.
    async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> (Side, Side) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let client_side = async {
            let name = ServerName::IpAddress(IpAddr::from([10, 1, 0, 2]).into());
            let mut tls = TlsConnector::from(client).connect(name, client_io).await.map_err(tls_error)?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(tls_error)?;
            let (_, connection) = tls.get_ref();
            let peer = connection.peer_certificates().expect("accepted without a peer certificate");
            Ok(peer_identity(&peer[0]).unwrap())
        };
        let server_side = async {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await.map_err(tls_error)?;
            tls.write_all(b"!").await.unwrap();
            tls.flush().await.unwrap();
            let (_, connection) = tls.get_ref();
            let peer = connection.peer_certificates().expect("accepted without a peer certificate");
            Ok(peer_identity(&peer[0]).unwrap())
        };
        let both = async { tokio::join!(client_side, server_side) };
        tokio::time::timeout(std::time::Duration::from_secs(10), both).await.expect("the handshake hung")
    }

    /// Both sides accept the good certificates and see each other's identity.
    async fn assert_accepted(client: Arc<ClientConfig>, server: Arc<ServerConfig>) {
        let (client_saw, server_saw) = handshake(client, server).await;
        assert_eq!(client_saw, Ok(workload(TRUST_DOMAIN, SERVER_SA)));
        assert_eq!(server_saw, Ok(workload(TRUST_DOMAIN, CLIENT_SA)));
    }

    /// The server's refusal of `bad` and the alert the client got, after the same server accepted a good client.
    /// `bad` is issued by `ca` (the bundle) unless it says otherwise.
    async fn server_refusal(ca: &TestCa, bad: Credential) -> (rustls::Error, rustls::Error) {
        let server = server(ca, good_server(ca));
        assert_accepted(client(ca, good_client(ca)), server.clone()).await;
        let (client_saw, server_saw) = handshake(client(ca, bad), server).await;
        (server_saw.expect_err("the server accepted"), client_saw.expect_err("the client saw no refusal"))
    }

    /// The client's refusal of a server presenting `bad` and the alert the server got, after the same client
    /// accepted a good server. `bad` is issued by `ca` (the bundle) unless it says otherwise.
    async fn client_refusal(ca: &TestCa, bad: Credential) -> (rustls::Error, rustls::Error) {
        let client = client(ca, good_client(ca));
        assert_accepted(client.clone(), server(ca, good_server(ca))).await;
        let (client_saw, server_saw) = handshake(client, server(ca, bad)).await;
        (client_saw.expect_err("the client accepted"), server_saw.expect_err("the server saw no refusal"))
    }

    #[tokio::test]
    async fn good_certificates_give_each_side_the_others_identity() {
        let ca = TestCa::new();
        assert_accepted(client(&ca, good_client(&ca)), server(&ca, good_server(&ca))).await;
    }

    #[tokio::test]
    async fn server_refuses_client_from_another_trust_domain() {
        let ca = TestCa::new();
        let foreign = workload("other.test", CLIENT_SA);
        let (refusal, alert) = server_refusal(&ca, current(&ca, vec![uri(&foreign)])).await;
        assert_eq!(refusal, rustls::Error::General(format!("peer {foreign} is not in trust domain {TRUST_DOMAIN}")));
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::HandshakeFailure));
    }

    #[tokio::test]
    async fn server_refuses_client_with_two_uri_sans() {
        // The first URI is a good identity: only the count can refuse it.
        let ca = TestCa::new();
        let sans = vec![uri(&workload(TRUST_DOMAIN, CLIENT_SA)), uri(&workload(TRUST_DOMAIN, "second"))];
        let (refusal, alert) = server_refusal(&ca, current(&ca, sans)).await;
        assert_eq!(
            refusal,
            rustls::Error::General("certificate has 2 URI SANs, a SPIFFE certificate has exactly one".into())
        );
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::HandshakeFailure));
    }

    #[tokio::test]
    async fn server_refuses_client_with_only_a_dns_name() {
        let ca = TestCa::new();
        let sans = vec![SanType::DnsName("client.ns.svc".try_into().unwrap())];
        let (refusal, alert) = server_refusal(&ca, current(&ca, sans)).await;
        assert_eq!(
            refusal,
            rustls::Error::General("certificate has 0 URI SANs, a SPIFFE certificate has exactly one".into())
        );
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::HandshakeFailure));
    }

    #[tokio::test]
    async fn server_refuses_expired_client_certificate() {
        let ca = TestCa::new();
        let (refusal, alert) = server_refusal(&ca, expired(&ca, vec![uri(&workload(TRUST_DOMAIN, CLIENT_SA))])).await;
        assert!(
            matches!(refusal, rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })),
            "{refusal:?}"
        );
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::CertificateExpired));
    }

    #[tokio::test]
    async fn server_refuses_client_signed_by_another_ca() {
        let (ca, other) = (TestCa::new(), TestCa::named("other root"));
        let (refusal, alert) = server_refusal(&ca, good_client(&other)).await;
        assert_eq!(refusal, rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::UnknownCA));
    }

    #[tokio::test]
    async fn server_refuses_client_without_certificate() {
        let ca = TestCa::new();
        let server = server(&ca, good_server(&ca));
        assert_accepted(client(&ca, good_client(&ca)), server.clone()).await;
        // The proxy's client config (same verifier, protocol and ALPN), minus the client certificate.
        let provider = trellis_proto::tls::provider();
        let verifier = SpiffeServerVerifier {
            roots: roots(&ca),
            expected: workload(TRUST_DOMAIN, SERVER_SA),
            provider: provider.clone(),
            revocations: Arc::default(),
        };
        let mut anonymous = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
        let (client_saw, server_saw) = handshake(Arc::new(anonymous), server).await;
        assert_eq!(server_saw, Err(rustls::Error::NoCertificatesPresented));
        assert_eq!(client_saw, Err(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)));
    }

    #[tokio::test]
    async fn client_refuses_server_that_is_not_the_destination() {
        let ca = TestCa::new();
        let impostor = workload(TRUST_DOMAIN, "impostor");
        let (refusal, alert) = client_refusal(&ca, current(&ca, vec![uri(&impostor)])).await;
        let expected = workload(TRUST_DOMAIN, SERVER_SA);
        assert_eq!(refusal, rustls::Error::General(format!("server is {impostor}, expected {expected}")));
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::HandshakeFailure));
    }

    #[tokio::test]
    async fn client_refuses_server_from_another_trust_domain() {
        // Same namespace and service account as the destination: only the trust domain differs.
        let ca = TestCa::new();
        let foreign = workload("other.test", SERVER_SA);
        let (refusal, alert) = client_refusal(&ca, current(&ca, vec![uri(&foreign)])).await;
        assert_eq!(refusal, rustls::Error::General(format!("peer {foreign} is not in trust domain {TRUST_DOMAIN}")));
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::HandshakeFailure));
    }

    #[tokio::test]
    async fn client_refuses_server_with_two_uri_sans() {
        // The first URI is the destination: only the count can refuse it.
        let ca = TestCa::new();
        let sans = vec![uri(&workload(TRUST_DOMAIN, SERVER_SA)), uri(&workload(TRUST_DOMAIN, "second"))];
        let (refusal, alert) = client_refusal(&ca, current(&ca, sans)).await;
        assert_eq!(
            refusal,
            rustls::Error::General("certificate has 2 URI SANs, a SPIFFE certificate has exactly one".into())
        );
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::HandshakeFailure));
    }

    #[tokio::test]
    async fn client_refuses_expired_server_certificate() {
        let ca = TestCa::new();
        let (refusal, alert) = client_refusal(&ca, expired(&ca, vec![uri(&workload(TRUST_DOMAIN, SERVER_SA))])).await;
        assert!(
            matches!(refusal, rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })),
            "{refusal:?}"
        );
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::CertificateExpired));
    }

    #[tokio::test]
    async fn client_refuses_server_signed_by_another_ca() {
        let (ca, other) = (TestCa::new(), TestCa::named("other root"));
        let (refusal, alert) = client_refusal(&ca, good_server(&other)).await;
        assert_eq!(refusal, rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::UnknownCA));
    }

    #[tokio::test]
    async fn client_refuses_server_signed_by_an_impostor_of_the_root() {
        // Another key under the bundle root's name: the issuer is found by name, its signature does not verify.
        let (ca, impostor) = (TestCa::new(), TestCa::new());
        let (refusal, alert) = client_refusal(&ca, good_server(&impostor)).await;
        assert_eq!(refusal, rustls::Error::InvalidCertificate(CertificateError::BadSignature));
        assert_eq!(alert, rustls::Error::AlertReceived(AlertDescription::DecryptError));
    }

    /// A revocation list naming `serials` (of node "n1") and `identities`.
    fn revoking(serials: &[&str], identities: &[&SpiffeId]) -> Arc<RevocationList> {
        revoking_also_tags(serials, identities, &[])
    }

    /// [`revoking`], and node "n1" by serial `tags` too.
    fn revoking_also_tags(serials: &[&str], identities: &[&SpiffeId], tags: &[&str]) -> Arc<RevocationList> {
        let list = trellis_proto::v1::Revocations {
            nodes: tags
                .iter()
                .map(|t| trellis_proto::v1::RevokedNode {
                    serial_tag: t.to_string(),
                    node: "n1".into(),
                    revoked_at_unix: 0,
                })
                .collect(),
            certificates: serials
                .iter()
                .map(|s| trellis_proto::v1::RevokedCertificate {
                    serial: s.to_string(),
                    node: "n1".into(),
                    ..Default::default()
                })
                .collect(),
            identities: identities
                .iter()
                .map(|id| trellis_proto::v1::RevokedIdentity { spiffe_id: id.to_string(), revoked_at_unix: 0 })
                .collect(),
        };
        let revocations = Arc::new(RevocationList::default());
        revocations.store(Arc::new(crate::revocation::Revocations::from_wire(&list).unwrap()));
        revocations
    }

    fn serial(credential: &Credential) -> String {
        crate::revocation::serial_hex(&credential.chain[0]).unwrap()
    }

    #[tokio::test]
    async fn server_refuses_a_client_certificate_of_a_revoked_node_and_accepts_another_of_the_same_identity() {
        let ca = TestCa::new();
        let (revoked, other) = (good_client(&ca), good_client(&ca));
        let list = revoking(&[&serial(&revoked)], &[]);
        let provider = trellis_proto::tls::provider();
        let good = good_server(&ca);
        let server = server_config(provider, roots(&ca), TRUST_DOMAIN, good.chain, good.key, list.clone()).unwrap();
        // Control: the same identity, another certificate (another node's), through the same server.
        assert_accepted(client(&ca, other), server.clone()).await;
        let bad_serial = serial(&revoked);
        let (client_saw, server_saw) = handshake(client(&ca, revoked), server).await;
        assert_eq!(
            server_saw,
            Err(rustls::Error::General(format!("peer certificate {bad_serial} was issued to revoked node \"n1\"")))
        );
        assert_eq!(client_saw, Err(rustls::Error::AlertReceived(AlertDescription::HandshakeFailure)));
    }

    /// A node revoked by its serial tag: the server refuses a client certificate whose serial starts with it, with
    /// the same reason as a revoked serial; another certificate of the same identity, whose serial starts with
    /// another tag, passes through the same server (the control).
    #[tokio::test]
    async fn server_refuses_a_client_certificate_whose_serial_carries_a_revoked_node_tag() {
        let ca = TestCa::new();
        let (revoked, other) = (good_client(&ca), good_client(&ca));
        let bad_serial = serial(&revoked);
        let tag = &bad_serial[..2 * trellis_proto::SERIAL_TAG_BYTES];
        assert!(!serial(&other).starts_with(tag));
        let list = revoking_also_tags(&[], &[], &[tag]);
        let provider = trellis_proto::tls::provider();
        let good = good_server(&ca);
        let server = server_config(provider, roots(&ca), TRUST_DOMAIN, good.chain, good.key, list.clone()).unwrap();
        assert_accepted(client(&ca, other), server.clone()).await;
        let (client_saw, server_saw) = handshake(client(&ca, revoked), server).await;
        assert_eq!(
            server_saw,
            Err(rustls::Error::General(format!("peer certificate {bad_serial} was issued to revoked node \"n1\"")))
        );
        assert_eq!(client_saw, Err(rustls::Error::AlertReceived(AlertDescription::HandshakeFailure)));
    }

    #[tokio::test]
    async fn client_refuses_a_server_whose_identity_was_revoked() {
        let ca = TestCa::new();
        let server_id = workload(TRUST_DOMAIN, SERVER_SA);
        let provider = trellis_proto::tls::provider();
        let make_client = |list: Arc<RevocationList>| {
            let own = good_client(&ca);
            let config =
                client_config(provider.clone(), roots(&ca), server_id.clone(), own.chain, own.key, list).unwrap();
            Arc::new(config)
        };
        // Control: another identity revoked, the same client path.
        let other = workload(TRUST_DOMAIN, "other");
        assert_accepted(make_client(revoking(&[], &[&other])), server(&ca, good_server(&ca))).await;
        let (client_saw, server_saw) =
            handshake(make_client(revoking(&[], &[&server_id])), server(&ca, good_server(&ca))).await;
        assert_eq!(client_saw, Err(rustls::Error::General(format!("peer identity {server_id} was revoked"))));
        assert_eq!(server_saw, Err(rustls::Error::AlertReceived(AlertDescription::HandshakeFailure)));
    }
}
