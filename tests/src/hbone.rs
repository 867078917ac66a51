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

use crate::outcome::{self, Outcome, Refusal};

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

/// A client certificate resolver that never offers one: the client answers the server's certificate request
/// with an empty Certificate message, as a client without a credential does.
#[derive(Debug)]
struct NoClientCert;

impl rustls::client::ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// The TLS stream as hyper sees it: the bytes already read to learn the server's verdict, then the stream.
struct Prefixed<S> {
    prefix: Vec<u8>,
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An open HBONE connection: the request sender, and the connection task (its error says why a request failed,
/// e.g. the TLS alert the server sent after verifying the client certificate).
pub struct Connection {
    pub sender: SendRequest<Empty<Bytes>>,
    task: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

/// Opens an HBONE connection to `addr` presenting `credential` (or none), expecting the server to be `expected`.
/// The server is verified exactly as the proxy verifies it (`trellis_data_plane::tls::client_config`: chain to
/// `roots`, SPIFFE ID `expected`) in both cases, so that a client without a credential gets as far as the server's
/// demand for one. In TLS 1.3 the server judges the client's certificate after the client finished its handshake,
/// so its refusal of the client is the alert on the first read, which this makes before handing the stream to
/// HTTP/2: `Err(Refused(TlsAlert(..)))`.
pub async fn connect(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    expected: &str,
    credential: Option<Credential>,
) -> Result<Connection, Outcome> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| Outcome::from_io(&e))?;
    connect_over(tcp, roots, expected, credential).await
}

/// [`connect`] over a TCP connection the caller opened (e.g. a marked socket that capture rules let out).
pub async fn connect_over(
    tcp: tokio::net::TcpStream,
    roots: Arc<RootCertStore>,
    expected: &str,
    credential: Option<Credential>,
) -> Result<Connection, Outcome> {
    let addr = tcp.peer_addr().map_err(|e| Outcome::from_io(&e))?;
    let provider = trellis_proto::tls::provider();
    let expected = SpiffeId::parse(expected).map_err(|e| Outcome::Broke(e.to_string()))?;
    let config = match credential {
        Some(c) => trellis_data_plane::tls::client_config(provider, roots, expected, c.chain, c.key, Arc::default()),
        None => {
            // The proxy's client config with a throwaway credential, then the credential taken away: the server
            // verification stays the proxy's own.
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
            let cert = CertificateParams::new(Vec::<String>::new()).expect("params").self_signed(&key).expect("cert");
            trellis_data_plane::tls::client_config(
                provider,
                roots,
                expected,
                vec![cert.der().clone()],
                crate::client::key_der(&key),
                Arc::default(),
            )
            .map(|mut config| {
                config.client_auth_cert_resolver = Arc::new(NoClientCert);
                config
            })
        }
    }
    .map_err(Outcome::Broke)?;
    let tls = tokio::time::timeout(
        outcome::HANG_AFTER,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await
    .map_err(|_| Outcome::Hung)?
    .map_err(|e| match Outcome::from_io(&e) {
        Outcome::Broke(_) => Outcome::Broke(format!("TLS: {e}")),
        outcome => outcome,
    })?;
    // The server's verdict on the client, before the client writes anything: its first bytes (the HTTP/2 server
    // sends SETTINGS at once) or its alert. Writing first would race the alert: a server closing with the
    // client's bytes unread sends a reset, which can overtake the alert.
    let mut tls = tls;
    let mut first = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(outcome::HANG_AFTER, tokio::io::AsyncReadExt::read(&mut tls, &mut first))
        .await
        .map_err(|_| Outcome::Hung)?
        .map_err(|e| Outcome::from_io(&e))?;
    if n == 0 {
        return Err(Outcome::Refused(Refusal::Closed));
    }
    first.truncate(n);
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(Prefixed { prefix: first, inner: tls }))
        .await
        .map_err(|e| hyper_outcome(&e))?;
    Ok(Connection { sender, task: tokio::spawn(connection) })
}

fn hyper_outcome(e: &hyper::Error) -> Outcome {
    if let Some(alert) = outcome::tls_alert(e) {
        return Outcome::Refused(Refusal::TlsAlert(alert));
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match Outcome::from_io(io) {
                Outcome::Broke(_) => Outcome::Broke(format!("HTTP/2: {e}")),
                outcome => outcome,
            };
        }
        source = s.source();
    }
    if e.is_closed() || e.is_incomplete_message() {
        Outcome::Refused(Refusal::Closed)
    } else {
        Outcome::Broke(format!("HTTP/2: {e}"))
    }
}

impl Connection {
    /// Sends one request (`CONNECT target` unless `method` says otherwise) and returns the status.
    pub async fn request(&mut self, method: Method, target: &str) -> Result<StatusCode, Outcome> {
        let request = Request::builder()
            .method(method)
            .uri(target)
            .body(Empty::new())
            .map_err(|e| Outcome::Broke(e.to_string()))?;
        match tokio::time::timeout(outcome::HANG_AFTER, self.sender.send_request(request)).await {
            Err(_) => Err(Outcome::Hung),
            Ok(Ok(response)) => Ok(response.status()),
            Ok(Err(e)) => Err(self.failure(&e).await),
        }
    }

    /// Opens a CONNECT stream to `target` with extra request headers (e.g. `Forwarded`); the stream once answered
    /// 200, else `Refused(Http(status))`.
    pub async fn open(
        &mut self,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, Outcome> {
        let mut request = Request::builder().method(Method::CONNECT).uri(target);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).map_err(|e| Outcome::Broke(e.to_string()))?;
        let response = match tokio::time::timeout(outcome::HANG_AFTER, self.sender.send_request(request)).await {
            Err(_) => return Err(Outcome::Hung),
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(self.failure(&e).await),
        };
        if response.status() != StatusCode::OK {
            return Err(Outcome::Refused(Refusal::Http(response.status().as_u16())));
        }
        hyper::upgrade::on(response).await.map(TokioIo::new).map_err(|e| Outcome::Broke(e.to_string()))
    }

    /// Waits up to `within` for the connection to end (the server closed it, or it failed); false when it is still
    /// open then. The sender stays alive meanwhile, so the client never closes an idle connection by itself.
    pub async fn wait_closed(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, &mut self.task).await.is_ok()
    }

    /// Why a request failed: the connection's own error when it ended (a TLS alert, a reset), else the request's.
    async fn failure(&mut self, request_error: &hyper::Error) -> Outcome {
        // A request fails because its connection ended: wait for the connection task to say why.
        match tokio::time::timeout(outcome::HANG_AFTER, &mut self.task).await {
            Ok(Ok(Err(e))) => hyper_outcome(&e),
            _ => hyper_outcome(request_error),
        }
    }
}

/// One CONNECT to `target` over a new HBONE connection: `Passed` when answered 200, `Refused(Http(status))` for
/// another status, `Refused(TlsAlert(..))` when the server refused the handshake.
pub async fn tunnel(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    expected: &str,
    credential: Option<Credential>,
    target: &str,
) -> Outcome {
    let mut connection = match connect(addr, roots, expected, credential).await {
        Ok(connection) => connection,
        Err(outcome) => return outcome,
    };
    match connection.request(Method::CONNECT, target).await {
        Ok(StatusCode::OK) => Outcome::Passed,
        Ok(status) => Outcome::Refused(Refusal::Http(status.as_u16())),
        Err(outcome) => outcome,
    }
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
        Arc::default(),
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
