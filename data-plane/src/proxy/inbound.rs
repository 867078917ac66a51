//! HBONE inbound (15008): accept, identify, (authorize,) dial, copy.
//!
//! TLS 1.3 with a required client certificate checked by SPIFFE rules; the server certificate is the destination
//! workload's, chosen by the local address the connection arrived on. Then HTTP/2 (`h2_server`): every stream must
//! be `CONNECT <ip>:<port>` to an address and declared port of a workload this proxy fronts. A bad handshake, a bad
//! request or an unreachable workload costs that connection or stream only.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use hyper::{Method, Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info};
use trellis_proto::spiffe::SpiffeId;

use super::finish::{self, DialError, Ended};
use super::h2_server::{self, ServeError};
use super::h2_stream::H2Io;
use super::{DataPath, HANDSHAKE_TIMEOUT, l7};
use crate::connections::{Downstream, InboundConn, PeerCert};
use crate::hbone;
use crate::log_limit::HBONE_REFUSALS;
use crate::metrics::{Flags, PeerLabels, Reporter, TrafficKey};
use crate::read_ahead::ReadAhead;
use crate::report::{Authz, ConnectionReport};
use crate::tls::PeerIdentityError;
use crate::write_batch::WriteBatch;

/// Why an HBONE connection was refused or ended badly (logged as "HBONE connection refused").
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("{0}")]
    LocalAddress(io::Error),
    #[error("no workload certificate for local address {0}")]
    NoCertificate(IpAddr),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("no client certificate")]
    NoClientCertificate,
    #[error(transparent)]
    PeerIdentity(#[from] PeerIdentityError),
    #[error(transparent)]
    Http(ServeError),
}

/// A TLS handshake that did not complete; counted and logged against the workload it was meant for.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake timed out")]
    TimedOut,
    #[error("TLS handshake failed: {}", crate::error_chain(.0))]
    Failed(io::Error),
    /// Revoked while the handshake ran (the verifier refuses it otherwise).
    #[error("TLS handshake refused: {0}")]
    Revoked(crate::revocation::Revoked),
}

impl HboneError {
    /// The refusal's reason, as the log rate limit and `trellis_log_suppressed_total` name it.
    pub fn kind(&self) -> &'static str {
        match self {
            HboneError::LocalAddress(_) => "local_address",
            HboneError::NoCertificate(_) => "no_workload_certificate",
            HboneError::Handshake(e) => e.kind(),
            HboneError::NoClientCertificate => "no_client_certificate",
            HboneError::PeerIdentity(_) => "peer_identity",
            HboneError::Http(_) => "http2",
        }
    }
}

impl HandshakeError {
    pub fn kind(&self) -> &'static str {
        match self {
            HandshakeError::TimedOut => "tls_handshake_timeout",
            HandshakeError::Failed(_) => "tls_handshake_failed",
            HandshakeError::Revoked(_) => "revoked",
        }
    }
}

impl From<&HandshakeError> for Flags {
    fn from(_: &HandshakeError) -> Self {
        Flags::TlsFailure
    }
}

/// Accepts HBONE connections until the listener task is dropped. On shutdown every connection gets a GOAWAY:
/// streams in progress finish, new ones go elsewhere.
pub async fn serve(listener: TcpListener, data: Arc<DataPath>, shutdown: watch::Receiver<bool>) {
    crate::listen::accept_each(listener, "hbone", |tcp, peer| {
        let (data, shutdown) = (data.clone(), shutdown.clone());
        async move {
            match connection(tcp, peer, data, shutdown).await {
                Ok(()) => {}
                // After the peer was accepted: the connection broke (a reset, a keepalive timeout), nothing refused.
                Err(HboneError::Http(e)) => debug!(%peer, error = %e, "HBONE connection ended with an error"),
                // Logged once already, as the refusal's access-log entry (`tls_failure`).
                Err(HboneError::Handshake(_)) => {}
                Err(reason) => {
                    // One line per refusal, rate-limited: anyone who reaches the port can cause these.
                    if HBONE_REFUSALS.allow(reason.kind()) {
                        info!(%peer, %reason, kind = reason.kind(), "HBONE connection refused");
                    }
                }
            }
        }
    })
    .await
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    data: Arc<DataPath>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), HboneError> {
    let local = tcp.local_addr().map_err(HboneError::LocalAddress)?;
    // TCP_NODELAY: inherited from the listener (`listen::accept_each`).
    let config = data.tls.load().server_for(local.ip()).ok_or(HboneError::NoCertificate(local.ip()))?;
    let started = Instant::now();
    let mut tls = match handshake(config, tcp).await {
        Ok(tls) => tls,
        Err(error) => {
            tls_failure(&data, peer, local, started, &error);
            return Err(error.into());
        }
    };
    crate::tls::tune(tls.get_mut().1);
    let (source, serial) = {
        let (_, session) = tls.get_ref();
        let leaf = session.peer_certificates().and_then(|c| c.first()).ok_or(HboneError::NoClientCertificate)?;
        (crate::tls::peer_identity(leaf)?, crate::revocation::serial_hex(leaf).unwrap_or_default())
    };
    // Registered before this check, so that a revocation applied while the handshake ran is not missed: either the
    // check sees it, or the revocation finds the session.
    let session = data.connections.register_session(Arc::new(PeerCert { id: source.clone(), serial: serial.clone() }));
    if let Err(revoked) = data.tls.revocations().load().check(&serial, &source) {
        revoked.count("refused");
        let error = HandshakeError::Revoked(revoked);
        tls_failure(&data, peer, local, started, &error);
        return Err(error.into());
    }
    // Rate-limited like the refusals (20 at once, then one a second; the rest counted): pooled connections are few,
    // so each normally gets its line, but a peer reconnecting in a loop cannot flood the log.
    if crate::log_limit::HBONE_ACCEPTS.allow("accepted") {
        info!(%peer, %source, %serial, "HBONE connection accepted");
    }
    let peer_id = Arc::new(Peer {
        principal: source.principal().into(),
        labels: PeerLabels::identity_only(&source),
        id: source,
        serial: serial.into(),
        addr: peer,
    });
    // Each stream in a task of its own; GOAWAY on shutdown, the connection ending with its last stream.
    // Frames of the streams that had bytes in the same turn leave in one TLS record (`write_batch`).
    let serving =
        h2_server::serve(WriteBatch::new(tls), crate::shutdown_requested(&mut shutdown), |request, respond| {
            stream(request, respond, peer_id.clone(), data.clone())
        });
    tokio::select! {
        result = serving => result.map_err(HboneError::Http),
        () = session.cancel.cancelled() => {
            // Dropping the connection closes it and every stream on it at once (no GOAWAY: the peer is revoked).
            info!(%peer, reason = session.reason(), "HBONE connection closed");
            Ok(())
        }
    }
}

/// The TLS handshake, over the socket read ahead (`read_ahead`: one system call per socket read, not per 4 KiB).
async fn handshake(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Result<TlsStream<ReadAhead<TcpStream>>, HandshakeError> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(ReadAhead::new(tcp));
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(result) => result.map_err(HandshakeError::Failed),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}

/// The address to dial the workload from: the tunnel's claimed original source when the registry vouches for it
/// (`Registry::vouch_source`), else none (the proxy's own address), logged. Only consulted while source
/// preservation is on.
fn trusted_source(data: &DataPath, id: &SpiffeId, claimed: Option<SocketAddr>, peer: SocketAddr) -> Option<IpAddr> {
    if !crate::sockets::preserves_source() {
        return None;
    }
    let claimed = claimed?.ip();
    match data.registry.load().vouch_source(id, claimed, peer.ip()) {
        Ok(()) => Some(claimed),
        Err(reason) => {
            if HBONE_REFUSALS.allow("untrusted_source") {
                info!(%peer, source = %id, %claimed, %reason, "original source address not trusted; dialling from the proxy's address");
            }
            None
        }
    }
}

/// The authenticated peer of an HBONE connection.
struct Peer {
    id: SpiffeId,
    principal: Arc<str>,
    serial: Arc<str>,
    /// Metric labels for a source whose workload is not known.
    labels: Arc<PeerLabels>,
    addr: SocketAddr,
}

/// Counts and logs a failed handshake against the workload whose address it arrived on.
fn tls_failure(data: &DataPath, peer: SocketAddr, local: SocketAddr, started: Instant, error: &HandshakeError) {
    let destination = data.locals.by_ip(local.ip()).map_or_else(PeerLabels::unknown, |w| w.peer.clone());
    let key = TrafficKey {
        reporter: Reporter::Destination,
        source: PeerLabels::unknown(),
        destination,
        mutual_tls: true,
        flags: Flags::None,
    };
    let report = ConnectionReport { key, source_addr: peer, destination_addr: local, started };
    // Its one log line is the access-log entry, rate-limited (anyone who reaches the port can cause these); the
    // series count every refusal.
    let logged = HBONE_REFUSALS.allow(error.kind());
    report.refused_logged(&data.traffic, Flags::from(error), Authz::NONE, &error.to_string(), logged);
}

/// What an HBONE stream asks for, read from its request head alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The `<ip>:<port>` of the CONNECT authority.
    pub target: SocketAddr,
    /// The original client address from `Forwarded`, if present in the form the client side writes (trusted
    /// because the peer authenticated with a mesh certificate).
    pub source_addr: Option<SocketAddr>,
}

/// Why a stream's request head is refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("not a CONNECT request")]
    NotConnect,
    #[error("CONNECT target is not ip:port")]
    BadTarget,
    /// RFC 9110 §9.3.6: a CONNECT request has no content; the stream's bytes after the head are the tunnel's.
    #[error("CONNECT with a non-zero content-length")]
    HasContent,
}

impl ConnectRefusal {
    pub fn status(self) -> StatusCode {
        match self {
            ConnectRefusal::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            ConnectRefusal::BadTarget | ConnectRefusal::HasContent => StatusCode::BAD_REQUEST,
        }
    }

    /// The refusal's reason, as the log rate limit names it.
    pub fn kind(self) -> &'static str {
        match self {
            ConnectRefusal::NotConnect => "not_connect",
            ConnectRefusal::BadTarget => "bad_connect_target",
            ConnectRefusal::HasContent => "connect_with_content",
        }
    }
}

impl ConnectRequest {
    /// Reads method, authority, `content-length` and `Forwarded`; pure, so the fuzz target
    /// (`fuzz/fuzz_targets/hbone_connect.rs`) drives the same code the listener runs.
    pub fn parse<B>(request: &Request<B>) -> Result<ConnectRequest, ConnectRefusal> {
        if request.method() != Method::CONNECT {
            return Err(ConnectRefusal::NotConnect);
        }
        // Any content-length but 0 (several, or one that is not a number, included): hyper's server refused these.
        let content = request.headers().get_all(hyper::header::CONTENT_LENGTH).iter().any(|v| v.as_bytes() != b"0");
        if content {
            return Err(ConnectRefusal::HasContent);
        }
        let target = request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .ok_or(ConnectRefusal::BadTarget)?;
        Ok(ConnectRequest { target, source_addr: hbone::original_source(request.headers()) })
    }
}

/// One CONNECT stream: check the target, authorize, dial the workload, answer 200 and copy until both sides are
/// done (or a policy change revokes the connection). Every refusal answers the stream with its status.
async fn stream(request: Request<RecvStream>, respond: SendResponse<Bytes>, peer_id: Arc<Peer>, data: Arc<DataPath>) {
    let (source, peer) = (&peer_id.id, peer_id.addr);
    let ConnectRequest { target, source_addr } = match ConnectRequest::parse(&request) {
        Ok(connect) => connect,
        Err(refusal) => {
            // Rate-limited: any authenticated peer can send these.
            if HBONE_REFUSALS.allow(refusal.kind()) {
                info!(%peer, %source, method = %request.method(), uri = %request.uri(), %refusal, kind = refusal.kind(),
                    "CONNECT request refused");
            }
            return h2_server::refuse(respond, refusal.status());
        }
    };
    let locals = &data.locals;
    let Some(workload) = locals.by_ip(target.ip()).filter(|w| w.port(target.port()).is_some()).cloned() else {
        info!(%peer, %source, %target, "CONNECT to an address or port this proxy does not front");
        return h2_server::refuse(respond, StatusCode::NOT_FOUND);
    };
    let conn = Arc::new(InboundConn {
        source: source.clone(),
        principal: peer_id.principal.clone(),
        serial: peer_id.serial.clone(),
        peer,
        source_addr,
        destination: target,
        workload,
    });
    // The source workload: the one at the address its proxy reported if it holds this identity, else the only one
    // holding it.
    let source_labels = data
        .registry
        .load()
        .source(source, source_addr.map(|a| a.ip()))
        .map_or_else(|| peer_id.labels.clone(), |w| w.peer.clone());
    let key = TrafficKey {
        reporter: Reporter::Destination,
        source: source_labels,
        destination: conn.workload.peer.clone(),
        mutual_tls: true,
        flags: Flags::None,
    };
    let report = ConnectionReport::new(key, source_addr.unwrap_or(peer), target);
    // Registered before the check, so that a policy change between check and registration cannot be missed.
    let registration = data.connections.register_inbound(conn.clone());
    let dial_from = trusted_source(&data, source, source_addr, peer);
    if l7::is_http(&conn.workload, target) {
        // Checked per request instead (`l7`), on the stream's bytes served as HTTP.
        match h2_server::accept(respond, request.into_body()) {
            Ok(tunnel) => {
                let tunnel = H2Io::new(tunnel);
                // Boxed, as the dial below: the HTTP path's and the dial's large futures do not stay inline in the
                // task of every relayed stream for as long as it lives (what an idle tunnel costs in memory).
                Box::pin(l7::serve(tunnel, Downstream::Tunnel(conn), report, registration, data, dial_from)).await;
            }
            Err(e) => debug!(%peer, %target, error = %e, "CONNECT stream reset before its answer"),
        }
        return;
    }
    let allowed = {
        let policies = data.authz.load();
        let Some(decision) = policies.check(&conn, peer) else {
            return h2_server::refuse(respond, StatusCode::NOT_FOUND);
        };
        policies.decisions.record(&decision);
        let policy = policies.decisions.name_of(decision.deciding.as_ref());
        if !decision.allowed {
            info!(source = %conn.source, %target, %decision, "connection denied");
            report.refused(&data.traffic, Flags::Deny, Authz::denied(policy), "-");
            return h2_server::refuse(respond, StatusCode::FORBIDDEN);
        }
        if !decision.audit.is_empty() || decision.dry_run.is_some() {
            info!(source = %conn.source, %target, %decision, "connection allowed");
        }
        Authz::allowed(policy)
    };

    let dial = Box::pin(finish::dial_workload(target, dial_from, report, allowed, &data.traffic));
    let (open, mut upstream) = match dial.await {
        Ok(dialled) => dialled,
        Err(DialError::Refused(e)) => {
            info!(source = %conn.source, %target, error = %e, "workload refused the connection");
            return h2_server::refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(DialError::TimedOut) => {
            info!(source = %conn.source, %target, "timed out dialling the workload");
            return h2_server::refuse(respond, StatusCode::GATEWAY_TIMEOUT);
        }
    };
    let mut tunnel = match h2_server::accept(respond, request.into_body()) {
        Ok(tunnel) => tunnel,
        Err(e) => {
            debug!(%peer, %target, error = %e, "CONNECT stream reset before its answer");
            open.closed(0, 0, Some("CONNECT stream reset before its answer"));
            return;
        }
    };
    if let Ended::Cancelled = finish::relay(open, &mut tunnel, &mut upstream, &registration, data.timeouts).await {
        info!(source = %conn.source, target = %conn.destination, "connection closed: no longer allowed by policy, or shutting down");
    }
    drop(registration);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str, forwarded: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(value) = forwarded {
            builder = builder.header(hbone::FORWARDED, value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn a_connect_head_gives_target_and_original_source_and_anything_else_is_refused_with_its_status() {
        // Control: what the client side sends.
        let connect = ConnectRequest::parse(&request(Method::CONNECT, "10.1.0.2:8080", Some("for=\"10.1.0.7:4000\"")));
        let want = ConnectRequest {
            target: "10.1.0.2:8080".parse().unwrap(),
            source_addr: Some("10.1.0.7:4000".parse().unwrap()),
        };
        assert_eq!(connect, Ok(want));
        let v6 = ConnectRequest::parse(&request(Method::CONNECT, "[fd00::2]:443", None)).unwrap();
        assert_eq!((v6.target, v6.source_addr), ("[fd00::2]:443".parse().unwrap(), None));
        // A Forwarded value in another form is ignored, not trusted.
        let other = ConnectRequest::parse(&request(Method::CONNECT, "10.1.0.2:8080", Some("for=10.1.0.7")));
        assert_eq!(other.unwrap().source_addr, None);

        let refused = |method: Method, uri: &str| ConnectRequest::parse(&request(method, uri, None)).unwrap_err();
        assert_eq!(refused(Method::GET, "http://10.1.0.2:8080/"), ConnectRefusal::NotConnect);
        assert_eq!(ConnectRefusal::NotConnect.status(), StatusCode::METHOD_NOT_ALLOWED);
        for target in ["api.shop:8080", "10.1.0.2", "10.1.0.2:99999"] {
            assert_eq!(refused(Method::CONNECT, target), ConnectRefusal::BadTarget, "{target}");
        }
        assert_eq!(ConnectRefusal::BadTarget.status(), StatusCode::BAD_REQUEST);
        // A CONNECT with content: refused whatever the length says, unless it says 0 (the control).
        let with_length = |values: &[&str]| {
            let mut connect = request(Method::CONNECT, "10.1.0.2:8080", None);
            for value in values {
                connect.headers_mut().append(hyper::header::CONTENT_LENGTH, value.parse().unwrap());
            }
            ConnectRequest::parse(&connect)
        };
        assert_eq!(with_length(&["0"]).map(|c| c.target), Ok("10.1.0.2:8080".parse().unwrap()));
        for values in [&["5"][..], &["x"], &["0", "5"]] {
            assert_eq!(with_length(values), Err(ConnectRefusal::HasContent), "{values:?}");
        }
        assert_eq!(ConnectRefusal::HasContent.status(), StatusCode::BAD_REQUEST);
    }
}
