//! JWKS for RequestAuthentication `jwksUri` values: fetched here, never by proxies, so that no request waits on a
//! fetch. Every URI the stored RequestAuthentications name is fetched when it first appears and again on each
//! refresh tick; a document that cannot be fetched or holds no usable key leaves the last good one in place. The
//! set is published in the snapshot (a new config version), which discovery pushes to every proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::mesh::{Mesh, Snapshot};

/// Largest JWKS document accepted.
const MAX_JWKS: usize = 1024 * 1024;
/// Where Debian/Ubuntu and RHEL keep the system CA bundle (`SSL_CERT_FILE` overrides).
const CA_BUNDLES: [&str; 2] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// Why a JWKS document was not fetched (logged; the last good document stays in place).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// What `trellis_policy::check_jwks` says of a document that is not a JWKS.
    #[error("{0}")]
    NotJwks(String),
    #[error("the document holds no usable verification key")]
    NoUsableKey,
    #[error("not a URI: {0}")]
    NotUri(#[from] hyper::http::uri::InvalidUri),
    #[error("no host")]
    NoHost,
    #[error("http:// JWKS URIs are refused (start the control plane with --jwks-allow-http)")]
    HttpRefused,
    #[error("the scheme must be https")]
    NotHttps,
    #[error("resolving {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    /// The host is, or resolves to, a loopback, link-local or unspecified address.
    #[error("host {host} resolves to {addr}, a {kind} address: refused (start the control plane with {flag} to allow it)", flag = crate::jwks_host::ALLOW_FLAG)]
    LocalAddress { host: String, addr: std::net::IpAddr, kind: &'static str },
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("no CA bundle to verify the server")]
    NoCaBundle,
    #[error("server name: {0}")]
    ServerName(#[from] rustls_pki_types::InvalidDnsNameError),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Request(#[from] hyper::http::Error),
    #[error("HTTP status {0}")]
    Status(hyper::StatusCode),
    #[error("reading the body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    #[error("the body is not UTF-8")]
    NotUtf8,
}

/// Why there is no CA bundle to verify `https` JWKS servers with.
#[derive(Debug, thiserror::Error)]
enum CaBundleError {
    #[error("no system CA bundle found (set SSL_CERT_FILE)")]
    NotFound,
    #[error("{path}: {source}")]
    Unreadable { path: String, source: rustls_pki_types::pem::Error },
    #[error("{0}: no certificates")]
    Empty(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

#[derive(Debug, Clone)]
pub struct JwksOptions {
    /// How often every JWKS is fetched again.
    pub refresh: Duration,
    /// Accept `http://` URIs (plaintext: anyone on the path could swap the keys; for local tests).
    pub allow_http: bool,
    /// Accept hosts that are (or resolve to) loopback, link-local or unspecified addresses (for local tests).
    pub allow_local: bool,
}

/// Runs until the process ends.
pub async fn run(mesh: Arc<Mesh>, options: JwksOptions) {
    let tls = match client_tls() {
        Ok(tls) => Some(Arc::new(tls)),
        Err(e) => {
            warn!(error = %e, "no CA bundle for https jwksUri fetches; they will fail");
            None
        }
    };
    let mut changes = mesh.subscribe();
    let mut tick = tokio::time::interval(options.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cache: BTreeMap<String, String> = mesh.current().jwks.as_ref().clone();
    let mut wanted: BTreeMap<String, Duration> = BTreeMap::new();
    loop {
        // Fetch all on a tick; only the new URIs after a config change.
        let refresh_all = tokio::select! {
            _ = tick.tick() => true,
            changed = changes.changed() => {
                if changed.is_err() { return }
                false
            }
        };
        let now_wanted = jwks_uris(&mesh.current());
        let new: BTreeSet<&String> = now_wanted.keys().filter(|u| !wanted.contains_key(*u)).collect();
        if !refresh_all && new.is_empty() && now_wanted.len() == wanted.len() {
            continue;
        }
        for (uri, timeout) in &now_wanted {
            if !refresh_all && !new.contains(uri) {
                continue;
            }
            match fetch(uri, &options, tls.as_ref(), *timeout).await {
                Ok(text) => {
                    if cache.get(uri) != Some(&text) {
                        info!(%uri, "JWKS fetched");
                    }
                    cache.insert(uri.clone(), text);
                }
                Err(e) if cache.contains_key(uri) => {
                    warn!(%uri, error = %e, "JWKS refresh failed; keeping the last good one")
                }
                Err(e) => warn!(%uri, error = %e, "JWKS fetch failed; tokens of this issuer get 401 until it works"),
            }
        }
        cache.retain(|uri, _| now_wanted.contains_key(uri));
        wanted = now_wanted;
        if let Err(e) = mesh.set_jwks(cache.clone()) {
            warn!(error = %e, "cannot publish the fetched JWKS");
        }
    }
}

/// Every `jwksUri` of the stored RequestAuthentications, with the longest `timeout` any rule gives it.
fn jwks_uris(snapshot: &Snapshot) -> BTreeMap<String, Duration> {
    let mut out = BTreeMap::new();
    for resource in snapshot.resources.values() {
        if resource.key.as_ref().is_none_or(|k| k.kind != "RequestAuthentication") {
            continue;
        }
        let Ok(parsed) = trellis_policy::Resource::from_json(&resource.json) else { continue };
        let trellis_policy::Spec::RequestAuthentication(ra) = &parsed.spec else { continue };
        for rule in ra.jwt_rules.iter().filter(|r| r.jwks.is_empty() && !r.jwks_uri.is_empty()) {
            let timeout = out.entry(rule.jwks_uri.clone()).or_insert(Duration::ZERO);
            *timeout = (*timeout).max(rule.timeout_duration());
        }
    }
    out
}

async fn fetch(
    uri: &str,
    options: &JwksOptions,
    tls: Option<&Arc<ClientConfig>>,
    timeout: Duration,
) -> Result<String, FetchError> {
    let text =
        tokio::time::timeout(timeout, get(uri, options, tls)).await.map_err(|_| FetchError::Timeout(timeout))??;
    match trellis_policy::check_jwks(&text).map_err(FetchError::NotJwks)? {
        0 => Err(FetchError::NoUsableKey),
        _ => Ok(text),
    }
}

async fn get(uri: &str, options: &JwksOptions, tls: Option<&Arc<ClientConfig>>) -> Result<String, FetchError> {
    let parsed: hyper::Uri = uri.parse()?;
    let host = parsed.host().ok_or(FetchError::NoHost)?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let https = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") if options.allow_http => false,
        Some("http") => {
            return Err(FetchError::HttpRefused);
        }
        _ => return Err(FetchError::NotHttps),
    };
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    // Resolved once and checked; the connection uses exactly the checked addresses (a second resolution could
    // answer differently).
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|source| FetchError::Resolve { host: host.clone(), source })?
        .collect();
    if !options.allow_local {
        let local = addrs.iter().find_map(|a| crate::jwks_host::local_kind(a.ip()).map(|kind| (a.ip(), kind)));
        if let Some((addr, kind)) = local {
            return Err(FetchError::LocalAddress { host, addr, kind });
        }
    }
    let tcp = tokio::net::TcpStream::connect(addrs.as_slice()).await.map_err(FetchError::Connect)?;
    if !https {
        return request(tcp, &parsed).await;
    }
    let tls = tls.ok_or(FetchError::NoCaBundle)?;
    let name = ServerName::try_from(host)?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(FetchError::Tls)?;
    request(stream, &parsed).await
}

async fn request<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: T,
    uri: &hyper::Uri,
) -> Result<String, FetchError> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "trellis-control")
        .header(hyper::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS).collect().await.map_err(FetchError::Body)?.to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| FetchError::NotUtf8)
}

/// TLS client trusting the system CA bundle (or `SSL_CERT_FILE`).
fn client_tls() -> Result<ClientConfig, CaBundleError> {
    let path = std::env::var("SSL_CERT_FILE")
        .ok()
        .or_else(|| CA_BUNDLES.iter().find(|p| std::path::Path::new(p).exists()).map(|p| p.to_string()))
        .ok_or(CaBundleError::NotFound)?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|source| CaBundleError::Unreadable { path: path.clone(), source })?;
    for cert in certs {
        let _ = cert.map(|c| roots.add(c));
    }
    if roots.is_empty() {
        return Err(CaBundleError::Empty(path));
    }
    let builder =
        ClientConfig::builder_with_provider(trellis_proto::tls::provider()).with_safe_default_protocol_versions()?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves one HTTP response with `body` on a local port; returns the `http://` URI of `/jwks.json`.
    async fn serve_once(body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await.unwrap();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.unwrap();
        });
        format!("http://{addr}/jwks.json")
    }

    async fn fetch_error(uri: &str, allow_http: bool) -> String {
        fetch_error_with(uri, allow_http, true).await
    }

    async fn fetch_error_with(uri: &str, allow_http: bool, allow_local: bool) -> String {
        let options = JwksOptions { refresh: Duration::from_secs(60), allow_http, allow_local };
        fetch(uri, &options, None, Duration::from_secs(5)).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn fetch_refusals_say_why() {
        assert_eq!(fetch_error("ftp://example.com/jwks.json", true).await, "the scheme must be https");
        assert!(fetch_error("http://exa mple.com/", true).await.starts_with("not a URI: "));
        let uri = serve_once(r#"{"keys":[]}"#).await;
        assert_eq!(
            fetch_error(&uri, false).await,
            "http:// JWKS URIs are refused (start the control plane with --jwks-allow-http)"
        );
        // Control: allowed, the same URI is fetched, and the document it holds is judged.
        assert_eq!(fetch_error(&uri, true).await, "the document holds no usable verification key");
        let uri = serve_once("[]").await;
        assert_eq!(fetch_error(&uri, true).await, "the JWKS has no \"keys\" array");
    }

    /// Local hosts are refused at fetch time on the resolved address, so a name resolving to loopback is refused
    /// like a literal address; with `--jwks-allow-local` the same URI is fetched.
    #[tokio::test]
    async fn local_hosts_are_refused_unless_allowed() {
        let uri = serve_once(r#"{"keys":[]}"#).await;
        let port = uri.trim_start_matches("http://127.0.0.1:").split('/').next().unwrap().to_owned();
        assert_eq!(
            fetch_error_with(&uri, true, false).await,
            "host 127.0.0.1 resolves to 127.0.0.1, a loopback address: refused (start the control plane with \
             --jwks-allow-local to allow it)"
        );
        let by_name = fetch_error_with(&format!("http://localhost:{port}/jwks.json"), true, false).await;
        assert!(by_name.starts_with("host localhost resolves to "), "{by_name}");
        assert!(
            by_name.ends_with(
                ", a loopback address: refused (start the control plane with --jwks-allow-local to allow it)"
            ),
            "{by_name}"
        );
        let metadata = fetch_error_with("http://169.254.169.254/latest/meta-data/", true, false).await;
        assert!(metadata.contains("a link-local address: refused"), "{metadata}");
        // Control: allowed, the same server is reached and its document judged.
        assert_eq!(fetch_error_with(&uri, true, true).await, "the document holds no usable verification key");
    }
}
