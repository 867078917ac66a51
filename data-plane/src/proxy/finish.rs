//! How every path ends a connection it has let through, so that all end alike: dial the workload within
//! [`WORKLOAD_DIAL_TIMEOUT`] (a failure is reported as refused, its response flags derived from [`DialError`]), then
//! relay both ways until both sides are done or the proxy cancels the connection, and report its end once.
//!
//! A relay that fails because one side broke (a reset, an HTTP/2 stream reset, a connection that died) ends the
//! other side with a reset too ([`Abort`]): a workload then tells a failure from a clean close, as it would without
//! the proxies. A clean end, a timeout and a cancellation close as before (a FIN, END_STREAM).
//!
//! "Once" is kept by the types of `report`: a `ConnectionReport` is consumed either as refused or as opened, and
//! the `Open` it becomes is consumed when closed.

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use super::WORKLOAD_DIAL_TIMEOUT;
use crate::connections::Registration;
use crate::copy::{ByteCounts, CopyRead, CopyWrite, Side, Timeout, Timeouts, copy_counted};
use crate::metrics::{Flags, TrafficMetrics};
use crate::report::{Authz, ConnectionReport, Open};

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Any connect error: refused, unreachable, no route.
    #[error("workload refused the connection: {0}")]
    Refused(io::Error),
    #[error("timed out dialling the workload")]
    TimedOut,
}

impl From<&DialError> for Flags {
    /// The next hop could not be reached.
    fn from(_: &DialError) -> Self {
        Flags::Connect
    }
}

impl From<DialError> for io::Error {
    /// For callers that speak `io::Error` (hyper's connector, the passthrough's `OutboundError::Direct`): the
    /// connect error itself, or `TimedOut`.
    fn from(error: DialError) -> Self {
        match error {
            DialError::Refused(e) => e,
            DialError::TimedOut => io::ErrorKind::TimedOut.into(),
        }
    }
}

/// Dials `target` within `timeout`, through `sockets` (so the socket carries the capture mark).
pub async fn dial(target: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    dial_from(target, None, timeout).await
}

/// [`dial`] from `source` (the client's address, trusted by the caller) where preservation is on
/// (`sockets::connect_from`).
pub async fn dial_from(target: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Result<TcpStream, DialError> {
    within(timeout, crate::sockets::connect_from(target, source)).await
}

async fn within<S>(timeout: Duration, connect: impl Future<Output = io::Result<S>>) -> Result<S, DialError> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(DialError::Refused(e)),
        Err(_) => Err(DialError::TimedOut),
    }
}

/// Dials the local workload at `target` for a connection that authorization let through (`authz`), from `source`
/// (the client's address, trusted by the caller) where preservation is on (`sockets::connect_from`). Connected: the
/// connection counts as open from here. Not connected: it is reported as refused (flags and detail from the error),
/// and the error is returned for the caller's answer to its client.
pub async fn dial_workload(
    target: SocketAddr,
    source: Option<IpAddr>,
    report: ConnectionReport,
    authz: Authz,
    traffic: &TrafficMetrics,
) -> Result<(Open, TcpStream), DialError> {
    let connect = dial_from(target, source, WORKLOAD_DIAL_TIMEOUT);
    opened_or_refused(connect, report, authz, traffic).await
}

async fn opened_or_refused<S>(
    connect: impl Future<Output = Result<S, DialError>>,
    report: ConnectionReport,
    authz: Authz,
    traffic: &TrafficMetrics,
) -> Result<(Open, S), DialError> {
    match connect.await {
        Ok(stream) => Ok((report.opened(traffic, authz), stream)),
        Err(error) => {
            report.refused(traffic, Flags::from(&error), authz, &error.to_string());
            Err(error)
        }
    }
}

/// A side of a relay that can end with a reset instead of a clean close.
pub trait Abort {
    /// Makes the coming close (the drop) a reset.
    fn abort_on_close(&self);
}

impl Abort for TcpStream {
    /// SO_LINGER 0: the close sends an RST (and drops what is still unsent), the peer reads `ECONNRESET`.
    fn abort_on_close(&self) {
        if let Err(error) = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO)) {
            tracing::debug!(%error, "SO_LINGER 0 refused; the connection closes with a FIN");
        }
    }
}

impl Abort for super::h2_stream::H2Stream {
    /// Nothing to do: a stream dropped before both its ends were sent is reset (RST_STREAM CANCEL).
    fn abort_on_close(&self) {}
}

/// How a relayed connection ended.
#[derive(Debug)]
pub enum Ended {
    /// Both sides closed (each half-close passed through).
    Closed,
    /// A read or write on either side failed.
    Failed(io::Error),
    /// The proxy cancelled it (`Registration::cancel`: a policy change, or shutdown).
    Cancelled,
    /// It carried nothing for one of its [`Timeouts`]: closed by the proxy, counted in
    /// `trellis_connections_timed_out_total`.
    TimedOut(Timeout),
}

/// Relays between `client` and `upstream` until both directions are closed (half-close passes through), the
/// proxy cancels the connection, or it carries nothing for one of `timeouts`; then reports its end once: the bytes
/// each way (`received`: from the client), and why it ended early if it did (the access log's detail). When it failed
/// because one side broke (its read failed), the other side is made to close with a reset ([`Abort`]).
///
/// Not an `async fn` itself: `relay_after`'s future is returned as it is, not wrapped in one that keeps a second copy
/// of the arguments (this future lives in every relayed connection's task for as long as the connection does).
pub fn relay<'a, C, U>(
    open: Open,
    client: &'a mut C,
    upstream: &'a mut U,
    registration: &'a Registration,
    timeouts: Timeouts,
) -> impl Future<Output = Ended> + 'a
where
    C: CopyRead + CopyWrite + Abort + Unpin,
    U: CopyRead + CopyWrite + Abort + Unpin,
{
    relay_after(open, 0, client, upstream, registration, timeouts)
}

/// [`relay`] for a connection whose first `already_sent` bytes from the client went upstream before the relay
/// (with an outbound tunnel's CONNECT): they count as received from it.
pub async fn relay_after<C, U>(
    open: Open,
    already_sent: u64,
    client: &mut C,
    upstream: &mut U,
    registration: &Registration,
    timeouts: Timeouts,
) -> Ended
where
    C: CopyRead + CopyWrite + Abort + Unpin,
    U: CopyRead + CopyWrite + Abort + Unpin,
{
    let counts = ByteCounts::default();
    let ended = tokio::select! {
        // Cancellation first: when the proxy closes a connection and, with it, the HBONE connection under it (a
        // revocation), the copy fails too, and the report must say the proxy closed it, and why.
        biased;
        () = registration.cancel.cancelled() => Ended::Cancelled,
        result = copy_counted(client, upstream, &counts, timeouts) => match result {
            Ok(()) => Ended::Closed,
            Err(e) => Timeout::of(&e).map_or(Ended::Failed(e), Ended::TimedOut),
        },
    };
    match counts.broken() {
        Some(Side::Client) => upstream.abort_on_close(),
        Some(Side::Server) => client.abort_on_close(),
        None => {}
    }
    let (received, sent) = counts.get();
    let received = received + already_sent;
    let detail = match &ended {
        Ended::Closed => None,
        Ended::Failed(e) => Some(Cow::Owned(e.to_string())),
        Ended::Cancelled => Some(Cow::Borrowed(registration.closed_by_proxy())),
        Ended::TimedOut(timeout) => {
            crate::metrics::connection_timed_out(timeout.reason());
            Some(Cow::Owned(format!("closed by the proxy: {timeout}")))
        }
    };
    open.closed(received, sent, detail.as_deref());
    ended
}

#[cfg(test)]
mod tests {
    //! The shared ending against in-memory pipes, with its metrics rendered by a local Prometheus recorder (the
    //! tests run on one thread, where `set_default_local_recorder` holds across awaits).
    use std::sync::Arc;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use trellis_proto::spiffe::SpiffeId;

    use super::*;
    use crate::connections::Connections;
    use crate::metrics::{PeerLabels, Reporter, TrafficKey};

    fn report() -> ConnectionReport {
        let id = SpiffeId::workload("td", "shop", "web").unwrap();
        let key = TrafficKey {
            reporter: Reporter::Destination,
            source: PeerLabels::new(&id, "web", "shop"),
            destination: PeerLabels::new(&id, "api", "shop"),
            mutual_tls: true,
            flags: Flags::None,
        };
        ConnectionReport::new(key, "10.1.0.1:40000".parse().unwrap(), "10.1.0.2:8080".parse().unwrap())
    }

    fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        (recorder, handle)
    }

    /// The value of series `name` with `response_flags` = `flags`, if it exists.
    fn value(handle: &PrometheusHandle, name: &str, flags: Flags) -> Option<u64> {
        let needle = format!("response_flags=\"{}\"", flags.as_str());
        let text = handle.render();
        let line = text.lines().find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&needle))?;
        Some(line.rsplit(' ').next()?.parse().unwrap())
    }

    fn opened_and_closed(handle: &PrometheusHandle, flags: Flags) -> (Option<u64>, Option<u64>) {
        (
            value(handle, "istio_tcp_connections_opened_total", flags),
            value(handle, "istio_tcp_connections_closed_total", flags),
        )
    }

    fn open_gauge(handle: &PrometheusHandle) -> f64 {
        let text = handle.render();
        let line = text.lines().find(|l| l.starts_with("trellis_open_connections{direction=\"inbound\"}")).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn a_refused_dial_is_reported_once_as_connect_and_nothing_opens() {
        let (recorder, handle) = recorder();
        let _local = metrics::set_default_local_recorder(&recorder);
        let traffic = TrafficMetrics::default();
        // A port nobody listens on: bound, then closed.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();

        let result = dial_workload(closed, None, report(), Authz::allowed(Some("shop/allow".into())), &traffic).await;

        let error = result.err().expect("nothing listens there");
        assert!(matches!(&error, DialError::Refused(e) if e.kind() == io::ErrorKind::ConnectionRefused), "{error}");
        assert_eq!(opened_and_closed(&handle, Flags::Connect), (Some(1), Some(1)));
        assert_eq!(opened_and_closed(&handle, Flags::None), (None, None), "no connection was opened");
        assert_eq!(value(&handle, "istio_tcp_received_bytes_total", Flags::Connect), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_that_never_answers_times_out_after_the_workload_dial_timeout() {
        let (recorder, handle) = recorder();
        let _local = metrics::set_default_local_recorder(&recorder);
        let traffic = TrafficMetrics::default();
        let started = tokio::time::Instant::now();

        let never = within(WORKLOAD_DIAL_TIMEOUT, std::future::pending::<io::Result<DuplexStream>>());
        let result = opened_or_refused(never, report(), Authz::allowed(None), &traffic).await;

        assert!(matches!(result, Err(DialError::TimedOut)));
        assert_eq!(started.elapsed(), WORKLOAD_DIAL_TIMEOUT);
        assert_eq!(opened_and_closed(&handle, Flags::Connect), (Some(1), Some(1)));
        assert_eq!(opened_and_closed(&handle, Flags::None), (None, None));
    }

    #[tokio::test]
    async fn a_relay_until_both_sides_close_reports_the_bytes_once() {
        let (recorder, handle) = recorder();
        let _local = metrics::set_default_local_recorder(&recorder);
        let traffic = TrafficMetrics::default();
        let registration = Arc::new(Connections::default()).register_outbound();
        let (mut client, mut client_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut workload) = tokio::io::duplex(64);

        let connect = async { Ok(()) };
        let (open, ()) = opened_or_refused(connect, report(), Authz::allowed(None), &traffic).await.unwrap();
        assert_eq!(open_gauge(&handle), 1.0);
        let relay = relay(open, &mut client_side, &mut upstream_side, &registration, Timeouts::NONE);
        // More bytes than the pipes hold: each peer reads while the other writes.
        let client_peer = async {
            client.write_all(&[7; 300]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"answer!");
        };
        let workload_peer = async {
            let mut got = Vec::new();
            workload.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, [7; 300]);
            workload.write_all(b"answer!").await.unwrap();
            workload.shutdown().await.unwrap();
        };
        let (ended, (), ()) = tokio::join!(relay, client_peer, workload_peer);

        assert!(matches!(ended, Ended::Closed), "{ended:?}");
        assert_eq!(opened_and_closed(&handle, Flags::None), (Some(1), Some(1)));
        assert_eq!(value(&handle, "istio_tcp_received_bytes_total", Flags::None), Some(300));
        assert_eq!(value(&handle, "istio_tcp_sent_bytes_total", Flags::None), Some(7));
        assert_eq!(open_gauge(&handle), 0.0);
    }

    #[tokio::test]
    async fn a_cancelled_relay_reports_once_with_what_it_carried() {
        let (recorder, handle) = recorder();
        let _local = metrics::set_default_local_recorder(&recorder);
        let traffic = TrafficMetrics::default();
        let registration = Arc::new(Connections::default()).register_outbound();
        let (mut client, mut client_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut workload) = tokio::io::duplex(64);

        let (open, ()) = opened_or_refused(async { Ok(()) }, report(), Authz::NONE, &traffic).await.unwrap();
        let relay = relay(open, &mut client_side, &mut upstream_side, &registration, Timeouts::NONE);
        let proxy_cancels = async {
            client.write_all(b"hello").await.unwrap();
            let mut got = [0; 5];
            workload.read_exact(&mut got).await.unwrap();
            // Both peers stay open: only the proxy ends this one.
            registration.cancel.cancel();
        };
        let (ended, ()) = tokio::join!(relay, proxy_cancels);

        assert!(matches!(ended, Ended::Cancelled), "{ended:?}");
        assert_eq!(registration.closed_by_proxy(), "closed by the proxy: shutting down");
        assert_eq!(opened_and_closed(&handle, Flags::None), (Some(1), Some(1)));
        assert_eq!(value(&handle, "istio_tcp_received_bytes_total", Flags::None), Some(5));
        assert_eq!(open_gauge(&handle), 0.0);
    }

    /// In-memory pipes stand for sockets in the tests above; nothing to reset.
    /// The size of the future `make` would return (it is never called).
    fn size_of_future<F: Future>(_make: impl FnOnce() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    #[allow(unreachable_code)]
    fn relay_is_relay_afters_future_with_no_second_copy_of_its_arguments() {
        // What every relayed connection's task holds for as long as the connection lives (an idle tunnel's cost).
        let relay = size_of_future(|| {
            let (client, upstream): (&mut DuplexStream, &mut DuplexStream) = todo!();
            super::relay(todo!(), client, upstream, todo!(), Timeouts::NONE)
        });
        let relay_after = size_of_future(|| {
            let (client, upstream): (&mut DuplexStream, &mut DuplexStream) = todo!();
            super::relay_after(todo!(), 0, client, upstream, todo!(), Timeouts::NONE)
        });
        assert_eq!(relay, relay_after);
    }

    impl Abort for DuplexStream {
        fn abort_on_close(&self) {}
    }

    /// Both ends of a loopback TCP connection: (the workload's, the proxy's).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (workload, accepted) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        (workload.unwrap(), accepted.unwrap().0)
    }

    type Half = (h2::SendStream<bytes::Bytes>, h2::RecvStream);

    /// One HBONE stream answered 200 over an in-memory HTTP/2 connection: (the client side's half, the server's).
    async fn hbone_stream() -> (Half, Half) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond.send_response(hyper::Response::new(()), false).unwrap();
            tokio::spawn(async move { while let Some(Ok(_)) = conn.accept().await {} });
            (send, request.into_body())
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = hyper::Request::builder().method(hyper::Method::CONNECT).uri("10.1.0.2:8080").body(()).unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let server_half = server.await.unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), hyper::StatusCode::OK);
        ((send, response.into_body()), server_half)
    }

    /// How the peer of the proxy's tunnel ends its side.
    #[derive(Debug, Clone, Copy)]
    enum PeerEnd {
        /// END_STREAM, after the workload closed its side too (the control).
        Clean,
        /// RST_STREAM with this reason.
        Reset(h2::Reason),
    }

    const PEER_ENDS: [PeerEnd; 3] =
        [PeerEnd::Clean, PeerEnd::Reset(h2::Reason::CANCEL), PeerEnd::Reset(h2::Reason::INTERNAL_ERROR)];

    /// What the workload's socket reads until its end: the bytes, then EOF (`Ok`) or the error (a reset).
    async fn read_until_end(workload: &mut TcpStream) -> (Vec<u8>, io::Result<usize>) {
        let mut got = Vec::new();
        let result = crate::testing::within("the workload's end", workload.read_to_end(&mut got)).await;
        (got, result)
    }

    #[tokio::test]
    async fn a_client_side_workload_socket_is_reset_when_its_tunnel_is_reset_and_closed_when_the_tunnel_ends() {
        for end in PEER_ENDS {
            let traffic = TrafficMetrics::default();
            let registration = Arc::new(Connections::default()).register_outbound();
            let ((send, recv), (mut peer_send, _peer_recv)) = hbone_stream().await;
            let mut tunnel = super::super::h2_stream::H2Stream::new(send, recv);
            let (mut workload, mut proxy_end) = tcp_pair().await;
            let open = report().opened(&traffic, Authz::NONE);
            // The client proxy's relay; the workload's connection closes when it returns, as `outbound`'s does.
            let relay = async move {
                let ended = relay(open, &mut proxy_end, &mut tunnel, &registration, Timeouts::NONE).await;
                drop(proxy_end);
                ended
            };
            let peer = async {
                peer_send.send_data(bytes::Bytes::from_static(b"answer"), false).unwrap();
                match end {
                    PeerEnd::Clean => {
                        peer_send.send_data(bytes::Bytes::new(), true).unwrap();
                        workload.shutdown().await.unwrap();
                    }
                    PeerEnd::Reset(reason) => peer_send.send_reset(reason),
                }
                read_until_end(&mut workload).await
            };
            let (ended, (got, result)) = tokio::join!(relay, peer);
            match end {
                PeerEnd::Clean => {
                    assert!(matches!(ended, Ended::Closed), "{end:?}: {ended:?}");
                    assert_eq!(result.expect("a clean close is an EOF"), 6, "{end:?}");
                    assert_eq!(got, b"answer");
                }
                PeerEnd::Reset(_) => {
                    assert!(matches!(ended, Ended::Failed(_)), "{end:?}: {ended:?}");
                    let error = result.expect_err("a reset tunnel resets the workload's connection");
                    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{end:?}: {error}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_server_side_upstream_socket_is_reset_when_the_client_side_resets_and_closed_when_it_ends() {
        for end in PEER_ENDS {
            let traffic = TrafficMetrics::default();
            let registration = Arc::new(Connections::default()).register_outbound();
            let ((mut peer_send, _peer_recv), (send, recv)) = hbone_stream().await;
            let mut tunnel = super::super::h2_stream::H2Stream::new(send, recv);
            let (mut workload, mut proxy_end) = tcp_pair().await;
            let open = report().opened(&traffic, Authz::NONE);
            // The server proxy's relay: the tunnel is its client side, the workload's connection its upstream.
            let relay = async move {
                let ended = relay(open, &mut tunnel, &mut proxy_end, &registration, Timeouts::NONE).await;
                drop(proxy_end);
                ended
            };
            let peer = async {
                peer_send.send_data(bytes::Bytes::from_static(b"request"), false).unwrap();
                match end {
                    PeerEnd::Clean => {
                        peer_send.send_data(bytes::Bytes::new(), true).unwrap();
                        let read = read_until_end(&mut workload).await;
                        workload.shutdown().await.unwrap();
                        read
                    }
                    PeerEnd::Reset(reason) => {
                        // Once the workload has the bytes: the reset is what ends its connection, not a lost race.
                        let mut got = [0; 7];
                        workload.read_exact(&mut got).await.unwrap();
                        peer_send.send_reset(reason);
                        let (rest, result) = read_until_end(&mut workload).await;
                        ([&got[..], &rest].concat(), result)
                    }
                }
            };
            let (ended, (got, result)) = tokio::join!(relay, peer);
            assert_eq!(got, b"request", "{end:?}");
            match end {
                PeerEnd::Clean => {
                    assert!(matches!(ended, Ended::Closed), "{end:?}: {ended:?}");
                    result.expect("a clean end is an EOF");
                }
                PeerEnd::Reset(_) => {
                    assert!(matches!(ended, Ended::Failed(_)), "{end:?}: {ended:?}");
                    let error = result.expect_err("a reset stream resets the workload's connection");
                    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{end:?}: {error}");
                }
            }
        }
    }

    #[test]
    fn dial_errors_are_connect_failures() {
        assert_eq!(Flags::from(&DialError::TimedOut), Flags::Connect);
        assert_eq!(Flags::from(&DialError::Refused(io::ErrorKind::ConnectionRefused.into())), Flags::Connect);
        assert_eq!(DialError::TimedOut.to_string(), "timed out dialling the workload");
        let refused = DialError::Refused(io::Error::other("connection refused"));
        assert_eq!(refused.to_string(), "workload refused the connection: connection refused");
        assert_eq!(io::Error::from(DialError::TimedOut).kind(), io::ErrorKind::TimedOut);
    }
}
