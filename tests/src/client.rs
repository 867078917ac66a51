//! A raw protocol client for the control plane, speaking the real gRPC over real TLS. Tests use it to send what a
//! well-behaved proxy never would (CSRs for foreign identities, two URI SANs, duplicate address claims).

use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use trellis_proto::tls::{self, ClientIdentity, ServerTrust};
use trellis_proto::v1 as pb;

use crate::outcome::{self, Outcome};

/// A CSR (DER) for a fresh P-256 key with the given URI SANs.
pub fn csr(uris: &[&str]) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().expect("ascii"))).collect();
    let csr = params.serialize_request(&key).expect("csr");
    (key, csr.der().to_vec())
}

pub fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

pub fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().expect("PEM certificates")
}

/// Connects trusting `roots`, optionally with a client credential.
pub async fn connect(
    addr: &str,
    roots: Vec<CertificateDer<'static>>,
    identity: Option<ClientIdentity>,
) -> anyhow::Result<Channel> {
    let config = tls::client_config(ServerTrust::Roots(roots), identity)?;
    Ok(tls::connect(addr, Arc::new(config)).await?)
}

/// A TLS handshake with the control plane as `trellisctl` and the proxies make it (the same client config and
/// server name), then a read of the server's first bytes: `Passed` when the server accepted the client and started
/// HTTP/2, `Refused(TlsAlert(..))` when it judged the client's certificate and refused it. In TLS 1.3 the server
/// checks the client certificate after the client finished its handshake, so its verdict arrives on that read.
pub async fn handshake(
    addr: std::net::SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    identity: Option<ClientIdentity>,
) -> Outcome {
    use tokio::io::AsyncReadExt as _;
    let config = match tls::client_config(ServerTrust::Roots(roots), identity) {
        Ok(config) => config,
        Err(e) => return Outcome::Broke(e.to_string()),
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from(trellis_proto::CONTROL_PLANE_SERVER_NAME).expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
        let mut header = [0u8; 9];
        tls.read_exact(&mut header).await.map(|_| header)
    };
    match tokio::time::timeout(outcome::HANG_AFTER, attempt).await {
        Err(_) => Outcome::Hung,
        // An HTTP/2 frame header (length 3 bytes, type 1 byte): the server's SETTINGS (type 4).
        Ok(Ok(header)) if header[3] == 4 => Outcome::Passed,
        Ok(Ok(header)) => Outcome::Broke(format!("{header:?} is not the header of an HTTP/2 SETTINGS frame")),
        Ok(Err(e)) => Outcome::from_io(&e),
    }
}

/// Joins as `node` with `token`, trusting the server only through `pin`.
pub async fn join(addr: &str, pin: &str, token: &str, node: &str) -> anyhow::Result<Result<Joined, tonic::Status>> {
    let config = tls::client_config(ServerTrust::Pin(tls::parse_pin(pin)?), None)?;
    let channel = tls::connect(addr, Arc::new(config)).await?;
    let (key, csr_der) = csr(&[]);
    let mut client = pb::identity_client::IdentityClient::new(channel);
    let request = pb::JoinRequest { token: token.into(), node: node.into(), csr_der };
    Ok(match client.join(request).await {
        Ok(response) => {
            let response = response.into_inner();
            let bundle = response.trust_bundle.expect("trust bundle");
            Ok(Joined {
                addr: addr.into(),
                key,
                chain: response.certificate_chain.into_iter().map(CertificateDer::from).collect(),
                roots: bundle.roots.into_iter().map(CertificateDer::from).collect(),
                namespaces: response.namespaces,
            })
        }
        Err(status) => Err(status),
    })
}

/// A node that joined: its credential and the trust bundle.
pub struct Joined {
    pub addr: String,
    pub key: KeyPair,
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
    pub namespaces: Vec<String>,
}

/// An open discovery stream.
pub struct Stream {
    pub tx: mpsc::Sender<pb::DiscoveryRequest>,
    pub rx: tonic::Streaming<pb::DiscoveryResponse>,
}

impl Joined {
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let identity = ClientIdentity { chain: self.chain.clone(), key: key_der(&self.key) };
        connect(&self.addr, self.roots.clone(), Some(identity)).await
    }

    /// Opens a discovery stream and sends `hello`; Err is the status the control plane ended it with.
    pub async fn discover(&self, hello: pb::Hello) -> anyhow::Result<Result<Stream, tonic::Status>> {
        let mut client = pb::discovery_client::DiscoveryClient::new(self.channel().await?);
        let (tx, rx) = mpsc::channel(16);
        tx.send(pb::DiscoveryRequest { message: Some(pb::discovery_request::Message::Hello(hello)) }).await?;
        Ok(match client.stream(ReceiverStream::new(rx)).await {
            Ok(response) => Ok(Stream { tx, rx: response.into_inner() }),
            Err(status) => Err(status),
        })
    }
}

impl Stream {
    pub async fn next(&mut self) -> Result<pb::discovery_response::Message, tonic::Status> {
        let message = tokio::time::timeout(std::time::Duration::from_secs(20), self.rx.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("test waited 20s for a discovery message"))??;
        message.and_then(|m| m.message).ok_or_else(|| tonic::Status::cancelled("stream ended"))
    }

    pub async fn send(&self, message: pb::discovery_request::Message) {
        self.tx.send(pb::DiscoveryRequest { message: Some(message) }).await.expect("stream open");
    }

    /// Sends a CSR and waits for its answer (skipping config updates, which it ACKs).
    pub async fn certify(&mut self, request_id: u64, csr_der: Vec<u8>) -> pb::CertificateResponse {
        self.send(pb::discovery_request::Message::CertificateRequest(pb::CertificateRequest { request_id, csr_der }))
            .await;
        loop {
            match self.next().await.expect("discovery message") {
                pb::discovery_response::Message::Certificate(c) if c.request_id == request_id => return c,
                pb::discovery_response::Message::Update(u) => {
                    self.send(pb::discovery_request::Message::Ack(pb::Ack {
                        version: u.version,
                        error: String::new(),
                        reason: String::new(),
                    }))
                    .await
                }
                _ => {}
            }
        }
    }
}

/// A workload declaration for a Hello.
pub fn workload(name: &str, namespace: &str, sa: &str, address: &str) -> pb::Workload {
    pb::Workload {
        name: name.into(),
        namespace: namespace.into(),
        service_account: sa.into(),
        addresses: vec![address.into()],
        ports: vec![pb::Port { port: 8080, protocol: pb::Protocol::Tcp as i32 }],
        ..Default::default()
    }
}

pub fn hello(workloads: Vec<pb::Workload>) -> pb::Hello {
    pb::Hello { workloads, hbone_address: "127.0.0.1:15008".into(), version: "test".into(), ..Default::default() }
}
