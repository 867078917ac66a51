//! HTTP-aware enforcement for workload ports declared `http` (`http2`, `grpc`): the bytes of a CONNECT tunnel, or of
//! a captured plaintext connection, are served as HTTP/1.1 or h2c (prior knowledge) with hyper, and every request is
//! authenticated (RequestAuthentication), authorized with the full request attributes, and forwarded to the workload
//! over pooled connections. The two differ only in their peer ([`Downstream`]): a plaintext client has no principal
//! and is reported with `connection_security_policy="none"`.
//!
//! The policies are read from the `ArcSwap` per request, so a policy change applies to the next request on an open
//! connection. A denied request gets its answer and the client's connection stays usable; only malformed requests
//! (which hyper's parser, or the checks here, refuse with 400) close an HTTP/1 connection. `framing` finds the
//! requests hyper accepts but Trellis refuses: `Content-Length` with `Transfer-Encoding`.

mod framing;
mod measure;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};
use trellis_policy::{Decision, Headers, HttpRequest, JwtOutcome, TokenSource};

use super::{DataPath, WORKLOAD_DIAL_TIMEOUT, finish};
use crate::access_log;
use crate::config::Protocol;
use crate::connections::{Downstream, Registration};
use crate::copy::{ByteCounts, CountingIo};
use crate::metrics::{Flags, PeerLabels, Reporter, TrafficKey};
use crate::registry::LocalWorkload;
use crate::report::{Authz, ConnectionReport};

/// Largest request head accepted (Envoy's default is 60 KiB); larger → 431.
const MAX_HEADERS: usize = 64 * 1024;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DENIED_BODY: &str = "RBAC: access denied";

type Body = Either<Incoming, Full<Bytes>>;
/// A request as the service passes it on: its body's bytes counted for `istio_request_bytes`.
type ReqBody = measure::Counted<Incoming>;

/// Whether a connection to `destination` of `workload` (tunnelled or plaintext) goes to a port declared `http`,
/// `http2` or `grpc`: its requests are checked one by one here.
pub fn is_http(workload: &LocalWorkload, destination: SocketAddr) -> bool {
    workload.port(destination.port()).is_some_and(Protocol::is_http)
}

/// Pooled HTTP clients to local workloads: HTTP/1.1 for `http` ports, h2c for `http2` and `grpc` ports, whatever
/// the caller speaks. The proxy's shared one dials from its own address; a tunnel whose client's address is kept
/// (`capture.preserveSourceAddress`) has its own, dialling from that address ([`Upstream::from_source`]), so that
/// its connections are reused for its requests and for no one else's.
pub struct Upstream {
    http1: Client<MarkedDial, ReqBody>,
    http2: Client<MarkedDial, ReqBody>,
}

/// Dials the workload named by the request URI (`ip:port`) with `finish::dial` (through `sockets`, so the socket
/// carries the capture mark like every other connection the proxy opens): hyper's client takes its connector as a
/// tower `Service`, which is why this adapter lives here, next to the client, and not in `sockets` or `finish`
/// (which would then depend on hyper and tower). A failed dial fails the request (`Verdict::UpstreamError`).
/// `source`: the client's address to dial from (`sockets::connect_from`), for a tunnel whose source is kept.
#[derive(Clone, Copy)]
pub struct MarkedDial {
    source: Option<std::net::IpAddr>,
}

impl tower::Service<hyper::Uri> for MarkedDial {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let source = self.source;
        Box::pin(async move {
            let address: std::net::SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "upstream URI is not ip:port"))?;
            let stream = finish::dial_from(address, source, WORKLOAD_DIAL_TIMEOUT).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Self::from_source(None)
    }
}

impl Upstream {
    /// Clients dialling from `source` (the proxy's own address when `None`). No socket is opened until a request
    /// needs one.
    pub fn from_source(source: Option<std::net::IpAddr>) -> Self {
        let connector = MarkedDial { source };
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.timer(TokioTimer::new()).pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(60));
            b
        };
        Upstream { http1: builder().build(connector), http2: builder().http2_only(true).build(connector) }
    }
}

/// Serves `tunnel` (a CONNECT stream's bytes, or a plaintext TCP connection) as HTTP until it ends or `registration`
/// is cancelled; reports it as one connection (`report`, opened here), and each request under the same labels.
pub async fn serve<T>(
    tunnel: T,
    conn: Downstream,
    report: ConnectionReport,
    registration: Registration,
    data: Arc<DataPath>,
    dial_from: Option<std::net::IpAddr>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The tunnel is a TCP connection too: counted and logged as one, with its bytes, next to its requests.
    let source = report.key.source.clone();
    let open = report.opened(&data.traffic, Authz::PER_REQUEST);
    let counts = Arc::new(ByteCounts::default());
    let smuggling = Arc::new(framing::Smuggling::default());
    let tunnel = CountingIo::new(tunnel, counts.clone());
    let tunnel = TokioIo::new(framing::FramingIo::new(tunnel, smuggling.clone()));
    let protocol = conn.workload().port(conn.destination().port()).unwrap_or(Protocol::Http);
    // Every upgraded stream holds a sender; the tunnel is reported closed once the last one is done.
    let (upgrades, mut upgrades_done) = tokio::sync::mpsc::channel::<()>(1);
    let cancel = registration.cancel.clone();
    // Once per tunnel: its own clients when the workload must see the client's address (their connections serve
    // this tunnel's requests only, and close with it), else the shared ones.
    let own_upstream = dial_from.map(|ip| Upstream::from_source(Some(ip)));
    let ctx = Arc::new(Tunnel {
        conn,
        data,
        source,
        smuggling,
        protocol,
        cancel,
        upgrades: upgrades.downgrade(),
        own_upstream,
    });
    let service = hyper::service::service_fn(move |request| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(ctx.handle(request).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEADERS);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_HEADERS as u32);
    if protocol == Protocol::Http {
        // RFC 8441: h2 clients may open WebSockets with extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL).
        builder.http2().enable_connect_protocol();
    }
    let result = {
        let connection = builder.serve_connection_with_upgrades(tunnel, service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => result,
            () = registration.cancel.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    };
    if let Err(e) = &result {
        debug!(error = %e, "HTTP tunnel ended with an error");
    }
    // The connection is done; upgraded streams may go on, each holding a sender.
    drop(upgrades);
    let _ = upgrades_done.recv().await;
    let (received, sent) = counts.get();
    // Cancelled (a policy change, a revocation, shutdown): the proxy's reason, not the error it caused.
    let detail = match registration.cancel.is_cancelled() {
        true => Some(registration.closed_by_proxy().to_owned()),
        false => result.err().map(|e| e.to_string()),
    };
    open.closed(received, sent, detail.as_deref());
    drop(registration);
}

struct Tunnel {
    conn: Downstream,
    data: Arc<DataPath>,
    /// Metric labels of the source workload.
    source: Arc<PeerLabels>,
    /// Which HTTP/1 request had both Content-Length and Transfer-Encoding.
    smuggling: Arc<framing::Smuggling>,
    /// The destination port's declared protocol: which upstream client, and gRPC refusals.
    protocol: Protocol,
    /// The tunnel's cancellation (the drain): ends upgraded streams too.
    cancel: tokio_util::sync::CancellationToken,
    /// Made strong in each upgraded stream's task, so that `serve` waits for them (and only them) before it
    /// reports the tunnel closed.
    upgrades: tokio::sync::mpsc::WeakSender<()>,
    /// Clients dialling from the client's address (source preservation), used instead of `DataPath::upstream`.
    own_upstream: Option<Upstream>,
}

/// What happened to one request: the one place a request's result is reported (access logs and metrics attach
/// here).
#[derive(Debug)]
pub struct RequestOutcome {
    pub method: String,
    /// The normalized path (without query) when it could be normalized, else the path as received.
    pub path: String,
    pub status: u16,
    /// Until the last byte of the response.
    pub duration: Duration,
    /// Total sizes (header names and values, body, trailers).
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub verdict: Verdict,
    /// `namespace/name` of the deciding policy, if any.
    pub policy: Option<Arc<str>>,
    /// `iss/sub` of the verified token, if any.
    pub request_principal: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Invalid token (401) or audience not allowed (403).
    Unauthenticated,
    BadRequest,
    UpstreamError,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Unauthenticated => "unauthenticated",
            Verdict::BadRequest => "bad_request",
            Verdict::UpstreamError => "upstream_error",
        }
    }
}

impl RequestOutcome {
    /// Istio's request series and one access-log event.
    fn record(&self, tunnel: &Tunnel) {
        crate::activity::note();
        let conn = &tunnel.conn;
        let flags = match self.verdict {
            Verdict::Denied => Flags::Deny,
            Verdict::UpstreamError => Flags::Connect,
            Verdict::Allowed | Verdict::Unauthenticated | Verdict::BadRequest => Flags::None,
        };
        let key = TrafficKey {
            reporter: Reporter::Destination,
            source: tunnel.source.clone(),
            destination: conn.workload().peer.clone(),
            mutual_tls: conn.mutual_tls(),
            flags,
        };
        tunnel.data.traffic.http(key.clone(), self.status).record(
            self.duration,
            self.request_bytes,
            self.response_bytes,
        );
        access_log::request(&access_log::RequestEntry {
            key: &key,
            source_addr: Some(conn.client()),
            destination_addr: conn.destination(),
            method: &self.method,
            path: &self.path,
            status: self.status,
            duration: self.duration,
            decision: self.verdict.as_str(),
            policy: self.policy.as_deref().unwrap_or("-"),
            request_principal: self.request_principal.as_deref().unwrap_or("-"),
        });
    }
}

/// hyper's header map as the evaluator's [`Headers`].
struct HeaderView<'a>(&'a HeaderMap);

impl Headers for HeaderView<'_> {
    fn for_each_value<'s>(&'s self, name: &str, f: &mut dyn FnMut(&'s str)) {
        for value in self.0.get_all(name) {
            if let Ok(text) = value.to_str() {
                f(text);
            }
        }
    }
}

impl Tunnel {
    /// One request, reported when its response's last byte has gone (or the client went away).
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<measure::Measured<Body>> {
        let started = Instant::now();
        // The request line as Envoy's pseudo-headers count it (:method, :path), then the headers.
        let head = request.method().as_str().len()
            + request.uri().path_and_query().map_or(0, |p| p.as_str().len())
            + request.uri().authority().map_or(0, |a| a.as_str().len());
        let request_bytes = Arc::new(AtomicU64::new(head as u64 + measure::header_bytes(request.headers())));
        let request = request.map(|body| measure::Counted::new(body, request_bytes.clone()));
        let mut outcome = RequestOutcome {
            method: request.method().as_str().to_owned(),
            path: request.uri().path().to_owned(),
            status: 0,
            duration: Duration::ZERO,
            request_bytes: 0,
            response_bytes: 0,
            verdict: Verdict::Allowed,
            policy: None,
            request_principal: None,
        };
        let response = self.decide(request, &mut outcome).await;
        outcome.status = response.status().as_u16();
        let response_head = 3 + measure::header_bytes(response.headers());
        response.map(move |body| {
            measure::Measured::new(body, move |body_bytes| {
                outcome.duration = started.elapsed();
                outcome.request_bytes = request_bytes.load(Ordering::Relaxed);
                outcome.response_bytes = response_head + body_bytes;
                outcome.record(&self);
            })
        })
    }

    async fn decide(&self, mut request: Request<ReqBody>, outcome: &mut RequestOutcome) -> Response<Body> {
        let extended = extended_connect(&mut request);
        let grpc = self.protocol == Protocol::Grpc || is_grpc(request.headers());
        // Counted for every HTTP/1 request, first, so the count matches the heads `framing` saw.
        if request.version() != Version::HTTP_2 && self.smuggling.next_request_is_flagged() {
            info!(source = %self.conn, uri = %request.uri(), "request refused: both Content-Length and Transfer-Encoding");
            outcome.verdict = Verdict::BadRequest;
            return bad_request(&request);
        }
        // Istio rejects methods that are not upper case; hyper accepts them as extension methods.
        if request.method().as_str().bytes().any(|b| b.is_ascii_lowercase()) {
            outcome.verdict = Verdict::BadRequest;
            return bad_request(&request);
        }
        let path = match trellis_policy::normalize_path(request.uri().path()) {
            Ok(path) => path.into_owned(),
            Err(e) => {
                debug!(uri = %request.uri(), reason = %e, "request refused");
                outcome.verdict = Verdict::BadRequest;
                return bad_request(&request);
            }
        };
        outcome.path.clone_from(&path);
        let target = match request.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };

        let edits = match self.check(&request, &target, grpc, outcome) {
            Ok(edits) => edits,
            Err(response) => return *response,
        };
        match self.forward(request, &target, edits, extended).await {
            Ok(response) => response,
            Err(e) => {
                info!(source = %self.conn, target = %self.conn.destination(), error = %e, "upstream request failed");
                outcome.verdict = Verdict::UpstreamError;
                if grpc {
                    return grpc_status(14, "upstream connect error");
                }
                text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers")
            }
        }
    }

    /// Authentication and authorization of one request, against the policies current now (no await inside, so
    /// nothing borrowed from them lives across one). Ok: the header edits for forwarding; Err: the refusal.
    fn check(
        &self,
        request: &Request<ReqBody>,
        target: &str,
        grpc: bool,
        outcome: &mut RequestOutcome,
    ) -> Result<trellis_policy::HeaderEdits, Box<Response<Body>>> {
        let policies = self.data.authz.load();
        let Some(auth) = policies.auth(&self.conn.workload().key) else {
            outcome.verdict = Verdict::Denied;
            return Err(Box::new(deny(grpc, StatusCode::FORBIDDEN, DENIED_BODY)));
        };
        let headers = HeaderView(request.headers());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let token = TokenSource { method: request.method().as_str(), headers: &headers, query: request.uri().query() };
        let (payload, mut edits) = match auth.jwt.authenticate(token, now) {
            JwtOutcome::NoToken => (None, trellis_policy::HeaderEdits::default()),
            JwtOutcome::Verified(v) => (Some(v.payload), v.edits),
            JwtOutcome::Rejected(r) => {
                info!(source = %self.conn, reason = %r.reason, status = r.status, "JWT rejected");
                outcome.verdict = Verdict::Unauthenticated;
                let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::UNAUTHORIZED);
                return Err(Box::new(deny(grpc, status, r.body())));
            }
        };
        if let Some(p) = &payload {
            let part = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            outcome.request_principal = Some(format!("{}/{}", part("iss"), part("sub")));
        }

        let host = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()));
        let mut http = HttpRequest::new(request.method().as_str(), target).with_headers(&headers);
        http.host = host;
        http.jwt = payload.as_ref();
        let attributes = crate::authz::downstream_request(&self.conn).with_http(http);
        let decision: Decision<'_> = auth.policies.evaluate(&attributes);
        policies.decisions.record(&decision);
        outcome.policy = policies.decisions.name_of(decision.deciding.as_ref());
        if !decision.allowed {
            debug!(source = %self.conn, %decision, "request denied");
            outcome.verdict = Verdict::Denied;
            return Err(Box::new(deny(grpc, StatusCode::FORBIDDEN, DENIED_BODY)));
        }
        // Headers the rules fill from verified tokens never come from the client.
        for name in auth.jwt.output_headers() {
            if !edits.remove.contains(name) {
                edits.remove.push(name.clone());
            }
        }
        Ok(edits)
    }

    async fn forward(
        &self,
        request: Request<ReqBody>,
        target: &str,
        edits: trellis_policy::HeaderEdits,
        extended: Option<HeaderValue>,
    ) -> Result<Response<Body>, hyper_util::client::legacy::Error> {
        let (mut parts, body) = request.into_parts();
        let version = parts.version;
        let authority = parts.uri.authority().cloned();
        // An HTTP/1.1 Upgrade (WebSocket) to an `http` port, or an HTTP/2 extended CONNECT standing for one,
        // authorized like any request: passed on as an Upgrade request; if the workload switches protocols, both
        // sides become one opaque stream.
        let upgrade =
            (self.protocol == Protocol::Http).then(|| extended.clone().or_else(|| upgrade_request(&parts))).flatten();
        let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = &upgrade {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol.clone());
            // RFC 8441 §5: extended CONNECT carries no handshake nonce; the HTTP/1.1 side needs one (RFC 6455 §4.1).
            if extended.is_some() && protocol.as_bytes().eq_ignore_ascii_case(b"websocket") {
                parts.headers.insert(header::SEC_WEBSOCKET_KEY, websocket_key());
            }
        }
        for name in &edits.remove {
            parts.headers.remove(name.as_str());
        }
        for (name, value) in &edits.set {
            if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value)) {
                parts.headers.insert(name, value);
            }
        }
        let uri = format!("http://{}{target}", self.conn.destination());
        parts.uri = uri.parse().expect("an address and a normalized path form a valid URI");
        // The port's protocol decides what the workload is spoken to; the caller's version is translated.
        let upstream = self.own_upstream.as_ref().unwrap_or(&self.data.upstream);
        let client = match self.protocol {
            Protocol::Http2 | Protocol::Grpc => {
                parts.version = Version::HTTP_2;
                &upstream.http2
            }
            Protocol::Http | Protocol::Tcp => {
                // An HTTP/2 caller's :authority becomes the Host an HTTP/1.1 workload expects.
                let host = authority.filter(|_| !parts.headers.contains_key(header::HOST));
                if let Some(value) = host.and_then(|a| HeaderValue::try_from(a.as_str()).ok()) {
                    parts.headers.insert(header::HOST, value);
                }
                parts.version = Version::HTTP_11;
                &upstream.http1
            }
        };
        let mut response = client.request(Request::from_parts(parts, body)).await?;
        let switched = match client_upgrade {
            Some(client_side) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let workload_side = hyper::upgrade::on(&mut response);
                self.splice(client_side, workload_side);
                true
            }
            _ => false,
        };
        let (mut parts, body) = response.into_parts();
        let upgrade_header = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if extended.is_some() {
            // The HTTP/2 form of "switched": 200 on the CONNECT stream, without the HTTP/1.1 handshake's answer.
            // Any other 2xx would open a tunnel to a workload that did not switch: refused instead.
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
            if switched {
                parts.status = StatusCode::OK;
            } else if parts.status.is_success() {
                info!(source = %self.conn, status = %parts.status, "extended CONNECT: the workload did not switch protocols");
                return Ok(text(StatusCode::BAD_GATEWAY, "upstream did not switch protocols"));
            }
        } else if let Some(protocol) = upgrade_header.filter(|_| switched) {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        parts.version = version;
        Ok(Response::from_parts(parts, Either::Left(body)))
    }

    /// Once both sides have switched protocols, copies bytes between them until both are done or the tunnel is
    /// cancelled (the drain; HTTP tunnels are not closed on a policy change, whose next request is checked).
    fn splice(&self, client: hyper::upgrade::OnUpgrade, workload: hyper::upgrade::OnUpgrade) {
        let (cancel, done) = (self.cancel.clone(), self.upgrades.upgrade());
        let (source, timeouts) = (self.conn.clone(), self.data.timeouts);
        tokio::spawn(async move {
            let (client, workload) = match tokio::join!(client, workload) {
                (Ok(c), Ok(w)) => (c, w),
                (c, w) => {
                    debug!(client = ?c.err(), workload = ?w.err(), "upgrade failed");
                    return;
                }
            };
            let (mut client, mut workload) = (TokioIo::new(client), TokioIo::new(workload));
            let counts = ByteCounts::default();
            tokio::select! {
                result = crate::copy::copy_counted(&mut client, &mut workload, &counts, timeouts) => {
                    if let Some(timeout) = result.as_ref().err().and_then(crate::copy::Timeout::of) {
                        crate::metrics::connection_timed_out(timeout.reason());
                        debug!(%source, %timeout, "upgraded stream closed by the proxy");
                    } else if let Err(e) = result {
                        debug!(%source, error = %e, "upgraded stream ended with an error");
                    }
                }
                () = cancel.cancelled() => debug!(%source, "upgraded stream closed by the proxy"),
            }
            drop(done);
        });
    }
}

/// The protocol an HTTP/1.1 request asks to switch to: an `Upgrade` header and `upgrade` among the `Connection`
/// options (RFC 9110 §7.8). HTTP/2 has no Upgrade.
fn upgrade_request(parts: &hyper::http::request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let asks = (parts.headers.get_all(header::CONNECTION).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|option| option.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| parts.headers.get(header::UPGRADE).cloned()).flatten()
}

/// An HTTP/2 extended CONNECT (RFC 8441): the protocol it opens (`websocket`), with the request rewritten into the
/// HTTP/1.1 Upgrade it stands for (`GET`, `Upgrade`, `Connection: upgrade`), as Envoy does, so that policies and the
/// workload see one form whichever HTTP version the client spoke. `None` (and the request untouched) otherwise.
fn extended_connect<B>(request: &mut Request<B>) -> Option<HeaderValue> {
    if request.method() != Method::CONNECT {
        return None;
    }
    let protocol = request.extensions().get::<hyper::ext::Protocol>()?;
    let value = HeaderValue::from_str(protocol.as_str()).ok()?;
    request.extensions_mut().remove::<hyper::ext::Protocol>();
    *request.method_mut() = Method::GET;
    let headers = request.headers_mut();
    headers.insert(header::UPGRADE, value.clone());
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    Some(value)
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64.
fn websocket_key() -> HeaderValue {
    use base64::Engine as _;
    let mut nonce = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut nonce);
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    HeaderValue::try_from(key).expect("base64 is a valid header value")
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Connection-specific headers never cross a proxy (RFC 9110 §7.6.1), and HTTP/2 forbids them.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = (headers.get_all(header::CONNECTION).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"] {
        headers.remove(name);
    }
    // gRPC needs `te: trailers`; any other TE value is hop-by-hop.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(body.as_bytes()))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// 400; an HTTP/1 connection is closed after it (the request's framing cannot be trusted).
fn bad_request<B>(request: &Request<B>) -> Response<Body> {
    let mut response = text(StatusCode::BAD_REQUEST, "Bad Request");
    if request.version() != Version::HTTP_2 {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A refusal: plain text, or for gRPC a trailers-only response with PERMISSION_DENIED (7) or UNAUTHENTICATED (16).
fn deny(grpc: bool, status: StatusCode, body: &'static str) -> Response<Body> {
    if !grpc {
        return text(status, body);
    }
    grpc_status(if status == StatusCode::UNAUTHORIZED { 16 } else { 7 }, body)
}

fn grpc_status(code: u8, message: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(protocol: Option<&'static str>) -> Request<()> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri("http://chat.example/chat")
            .body(())
            .unwrap();
        if let Some(p) = protocol {
            request.extensions_mut().insert(hyper::ext::Protocol::from_static(p));
        }
        request
    }

    #[test]
    fn an_extended_connect_becomes_the_upgrade_it_stands_for_and_nothing_else_changes() {
        let mut ws = connect(Some("websocket"));
        assert_eq!(extended_connect(&mut ws), Some(HeaderValue::from_static("websocket")));
        assert_eq!(ws.method(), Method::GET);
        assert_eq!(ws.headers()[header::UPGRADE], "websocket");
        assert_eq!(ws.headers()[header::CONNECTION], "upgrade");
        assert_eq!(ws.uri().path(), "/chat");
        assert!(ws.extensions().get::<hyper::ext::Protocol>().is_none());

        // A plain CONNECT (no :protocol) and other methods are left alone.
        let mut plain = connect(None);
        assert_eq!(extended_connect(&mut plain), None);
        assert_eq!(plain.method(), Method::CONNECT);
        assert!(plain.headers().is_empty());
        let mut get = Request::builder().uri("/chat").body(()).unwrap();
        get.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(extended_connect(&mut get), None);
        assert_eq!(get.method(), Method::GET);
        assert!(get.headers().is_empty());
    }

    #[test]
    fn websocket_keys_are_16_random_bytes_in_base64() {
        use base64::Engine as _;
        let (a, b) = (websocket_key(), websocket_key());
        let decoded = base64::engine::general_purpose::STANDARD.decode(a.as_bytes()).unwrap();
        assert_eq!(decoded.len(), 16);
        assert_ne!(a, b);
    }
}
