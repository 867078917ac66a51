//! The server side of an HBONE connection on `h2` directly: the HTTP/2 handshake with HBONE's settings, one task
//! per stream, keep-alive PINGs, and GOAWAY on shutdown; and the two answers a stream gets ([`refuse`], [`accept`]).
//! What a stream may do is the caller's to decide (`inbound`).
//!
//! Until this served HBONE, hyper's server did, and each CONNECT became hyper's upgraded stream: every write copied
//! into a new allocation and sent over a channel to a task of its own, every read copied out of the received frame.
//! An accepted stream here is an [`H2Stream`], whose bytes cross without those copies (`h2_stream`). hyper's
//! server settings are kept: the windows, frame size, stream limit and send buffer of `hbone`, its header list
//! limit (16 KiB), a PING every 30 s answered within 20 s.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::HANDSHAKE_TIMEOUT;
use super::h2_stream::H2Stream;
use crate::hbone::{
    self, CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE, MAX_SEND_BUFFER, MAX_STREAMS_PER_CONNECTION,
    SERVER_KEEP_ALIVE_TIMEOUT, STREAM_WINDOW,
};

/// Why an HBONE connection's HTTP/2 ended badly (after TLS).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no HTTP/2 connection preface within {}", humantime::format_duration(*.0))]
    HandshakeTimedOut(Duration),
    #[error("HTTP/2: {0}")]
    Http(#[from] h2::Error),
    #[error("keep-alive PING unanswered for {}", humantime::format_duration(*.0))]
    KeepAlive(Duration),
}

/// HBONE's server settings.
fn builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER);
    builder
}

/// Serves HTTP/2 on `io` until the connection ends: each stream's request head and responder go to `handle`,
/// whose future runs in a task of its own. Once `shutdown` resolves, a GOAWAY tells the peer to open no more
/// streams; those in progress go on, and the connection ends with the last of them. Dropping the returned future
/// closes the connection and every stream on it at once.
pub async fn serve<IO, H, F>(io: IO, shutdown: impl Future<Output = ()>, mut handle: H) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let handshake = builder().handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimedOut(HANDSHAKE_TIMEOUT))??;
    let keep_alive = hbone::keep_alive(conn.ping_pong(), SERVER_KEEP_ALIVE_TIMEOUT);
    tokio::pin!(keep_alive, shutdown);
    let mut closing = false;
    loop {
        tokio::select! {
            // `accept` also drives the connection: every stream's frames go in and out through it.
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(handle(request, respond));
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            () = &mut shutdown, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut keep_alive => return Err(ServeError::KeepAlive(SERVER_KEEP_ALIVE_TIMEOUT)),
        }
    }
}

/// Ends a stream with `status` and no body (h2 then resets the request's side with NO_ERROR).
pub fn refuse(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // Fails only if the peer reset the stream meanwhile: nobody is left to tell.
    let _ = respond.send_response(response, true);
}

/// Answers 200 and returns the stream, its request's body (`body`) as the bytes from the peer.
pub fn accept(mut respond: SendResponse<Bytes>, body: RecvStream) -> Result<H2Stream, h2::Error> {
    let send = respond.send_response(Response::new(()), false)?;
    Ok(H2Stream::new(send, body))
}

#[cfg(test)]
mod tests {
    //! The server adapter over an in-memory pipe, driven by a raw `h2` client. The handler stands for `inbound`'s:
    //! a CONNECT is answered 200 and copied to a workload that the test holds the other end of (a pipe, or a
    //! loopback TCP connection where a reset is needed); anything else is refused with 405.
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::task::{Poll, ready};

    use hyper::Method;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, watch};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::copy::{ByteCounts, Timeouts, copy_counted};
    use crate::testing::{eventually, within};

    /// Bytes a workload pipe holds before its writer waits.
    const PIPE: usize = 64 * 1024;

    type Dial<W> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = W> + Send>> + Send + Sync>;

    struct Client {
        sender: h2::client::SendRequest<Bytes>,
        stop: watch::Sender<bool>,
        server: JoinHandle<Result<(), ServeError>>,
        /// How each accepted stream's copy ended.
        copies: mpsc::UnboundedReceiver<std::io::Result<()>>,
        /// Streams the handler was given (refused or not).
        seen: Arc<AtomicUsize>,
    }

    /// A server on one end of a pipe and a client on the other; accepted streams are copied to what `dial` opens.
    async fn start<W>(dial: Dial<W>) -> Client
    where
        W: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(256 * 1024);
        let (stop, mut stopped) = watch::channel(false);
        let (copies_tx, copies) = mpsc::unbounded_channel();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let server = tokio::spawn(serve(server_io, shutdown, move |request, respond| {
            counter.fetch_add(1, Ordering::Relaxed);
            let (dial, copies_tx) = (dial.clone(), copies_tx.clone());
            async move {
                if request.method() != Method::CONNECT {
                    return refuse(respond, StatusCode::METHOD_NOT_ALLOWED);
                }
                let mut workload = dial().await;
                let mut tunnel = accept(respond, request.into_body()).unwrap();
                let counts = ByteCounts::default();
                let _ = copies_tx.send(copy_counted(&mut tunnel, &mut workload, &counts, Timeouts::NONE).await);
            }
        }));
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Client { sender, stop, server, copies, seen }
    }

    /// Workloads on pipes: the test's ends arrive on the returned receiver, one per accepted stream.
    fn pipes() -> (Dial<DuplexStream>, mpsc::UnboundedReceiver<DuplexStream>) {
        let (ends_tx, ends) = mpsc::unbounded_channel();
        let dial: Dial<DuplexStream> = Arc::new(move || -> Pin<Box<dyn Future<Output = DuplexStream> + Send>> {
            let (ours, theirs) = tokio::io::duplex(PIPE);
            ends_tx.send(theirs).unwrap();
            Box::pin(async move { ours })
        });
        (dial, ends)
    }

    fn connect_head() -> Request<()> {
        Request::builder().method(Method::CONNECT).uri("10.1.0.2:8080").body(()).unwrap()
    }

    impl Client {
        /// Sends `request` (its stream left open) and waits for the answer.
        async fn open(
            &mut self,
            request: Request<()>,
        ) -> Result<(hyper::Response<RecvStream>, h2::SendStream<Bytes>), h2::Error> {
            let mut sender = self.sender.clone().ready().await?;
            let (response, send) = sender.send_request(request, false)?;
            Ok((within("the answer", response).await?, send))
        }

        async fn copy_result(&mut self) -> std::io::Result<()> {
            within("the copy's end", self.copies.recv()).await.expect("a copy ended")
        }
    }

    /// Everything left on `body` until its end, releasing the window as it goes.
    async fn read_body(body: &mut RecvStream) -> Result<Vec<u8>, h2::Error> {
        let mut got = Vec::new();
        while let Some(data) = within("the next frame", body.data()).await {
            let data = data?;
            let _ = body.flow_control().release_capacity(data.len());
            got.extend_from_slice(&data);
        }
        Ok(got)
    }

    /// Room to send on `send` (waits for the window).
    async fn room(send: &mut h2::SendStream<Bytes>, wanted: usize) -> usize {
        send.reserve_capacity(wanted);
        std::future::poll_fn(|cx| {
            loop {
                let room = send.capacity();
                if room > 0 {
                    return Poll::Ready(room);
                }
                ready!(send.poll_capacity(cx)).expect("the stream is open").expect("no error");
            }
        })
        .await
    }

    /// Sends all of `bytes` as the window allows, then END_STREAM.
    async fn send_all(send: &mut h2::SendStream<Bytes>, bytes: &[u8]) {
        let mut rest = Bytes::copy_from_slice(bytes);
        while !rest.is_empty() {
            let n = room(send, rest.len()).await;
            send.send_data(rest.split_to(n.min(rest.len())), false).unwrap();
        }
        send.reserve_capacity(0);
        send.send_data(Bytes::new(), true).unwrap();
    }

    #[tokio::test]
    async fn a_connect_is_answered_200_and_carries_bytes_through_a_half_close_from_either_side() {
        let (dial, mut ends) = pipes();
        let mut client = start(dial).await;

        // The client half-closes first, with more bytes than every window and buffer on the way.
        let (response, mut send) = client.open(connect_head()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut workload = ends.recv().await.unwrap();
        let request: Vec<u8> = (0..6_000_000u32).map(|i| (i % 251) as u8).collect();
        let serve_it = async {
            let mut got = Vec::new();
            workload.read_to_end(&mut got).await.unwrap();
            assert!(got == request, "client to workload, in order, until the half-close ({} bytes)", got.len());
            workload.write_all(b"answer").await.unwrap();
            workload.shutdown().await.unwrap();
        };
        tokio::join!(send_all(&mut send, &request), serve_it);
        assert_eq!(read_body(&mut body).await.unwrap(), b"answer", "then END_STREAM");
        client.copy_result().await.expect("both directions ended cleanly");

        // The workload half-closes first; the client's bytes still reach it afterwards.
        let (response, mut send) = client.open(connect_head()).await.unwrap();
        let mut body = response.into_body();
        let mut workload = ends.recv().await.unwrap();
        workload.write_all(b"greeting").await.unwrap();
        workload.shutdown().await.unwrap();
        assert_eq!(read_body(&mut body).await.unwrap(), b"greeting", "the workload's FIN became END_STREAM");
        send_all(&mut send, b"after your end").await;
        let mut got = Vec::new();
        within("the client's bytes, then EOF", workload.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"after your end");
        client.copy_result().await.expect("both directions ended cleanly");
    }

    #[tokio::test]
    async fn a_refused_stream_gets_its_status_and_ends_beside_a_connect_that_is_answered_200() {
        let (dial, _ends) = pipes();
        let mut client = start(dial).await;

        let get = Request::builder().method(Method::GET).uri("http://10.1.0.2:8080/").body(()).unwrap();
        let (response, _send) = client.open(get).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let mut body = response.into_body();
        assert_eq!(read_body(&mut body).await.unwrap(), b"", "no body, and the stream ended");

        // Control: the same connection, a CONNECT.
        let (response, _send) = client.open(connect_head()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.body().is_end_stream(), "an accepted stream stays open");
        assert_eq!(client.seen.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn an_oversized_request_head_gets_431_before_any_handler_and_the_limits_are_advertised() {
        let (dial, _ends) = pipes();
        let mut client = start(dial).await;
        let with_header = |size: usize| {
            let mut head = connect_head();
            head.headers_mut().insert("x-filler", "a".repeat(size).parse().unwrap());
            head
        };

        let (response, _send) = client.open(with_header(MAX_HEADER_LIST_SIZE as usize + 1024)).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(client.seen.load(Ordering::Relaxed), 0, "refused by HTTP/2 before the handler");

        // Control: a head under the limit.
        let (response, _send) = client.open(with_header(1024)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(client.seen.load(Ordering::Relaxed), 1);
        // The server's SETTINGS, as the client applied them.
        assert_eq!(client.sender.current_max_send_streams(), MAX_STREAMS_PER_CONNECTION as usize);
    }

    #[tokio::test]
    async fn a_stream_whose_workload_resets_is_reset_and_one_whose_workload_closes_is_ended() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let dial: Dial<TcpStream> = Arc::new(move || -> Pin<Box<dyn Future<Output = TcpStream> + Send>> {
            Box::pin(async move { TcpStream::connect(address).await.unwrap() })
        });
        let mut client = start(dial).await;

        // Control: the workload answers and closes (FIN): the client gets the answer and END_STREAM.
        let (response, mut send) = client.open(connect_head()).await.unwrap();
        let mut body = response.into_body();
        let (mut workload, _) = listener.accept().await.unwrap();
        workload.write_all(b"bye").await.unwrap();
        workload.shutdown().await.unwrap();
        assert_eq!(read_body(&mut body).await.unwrap(), b"bye");
        send_all(&mut send, b"").await;
        client.copy_result().await.expect("ended cleanly");

        // The workload resets its connection: the copy fails and the client's stream is reset, not ended.
        let (response, _send) = client.open(connect_head()).await.unwrap();
        let mut body = response.into_body();
        let (workload, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&workload).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(workload);
        let error = client.copy_result().await.expect_err("the workload's reset fails the copy");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        let reset = read_body(&mut body).await.expect_err("a reset, not END_STREAM");
        assert_eq!(reset.reason(), Some(h2::Reason::CANCEL), "{reset}");
        assert!(reset.is_reset() && reset.is_remote(), "{reset}");
    }

    #[tokio::test]
    async fn a_workload_that_reads_slowly_holds_the_client_to_the_stream_window() {
        let (dial, mut ends) = pipes();
        let mut client = start(dial).await;
        let (response, mut send) = client.open(connect_head()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut workload = ends.recv().await.unwrap();

        const TOTAL: u64 = 48 << 20;
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let sender = tokio::spawn(async move {
            let chunk = Bytes::from(vec![7u8; MAX_FRAME_SIZE as usize]);
            let mut left = TOTAL;
            while left > 0 {
                let n = room(&mut send, chunk.len().min(left as usize)).await.min(left as usize);
                send.send_data(chunk.slice(..n), false).unwrap();
                counted.fetch_add(n as u64, Ordering::Relaxed);
                left -= n as u64;
            }
            send.send_data(Bytes::new(), true).unwrap();
            send
        });
        // What the server may hold for a reader that takes nothing: the stream window (in h2's receive buffer), the
        // frame the copy holds, and the pipe.
        let bound = u64::from(STREAM_WINDOW) + u64::from(MAX_FRAME_SIZE) + PIPE as u64;
        eventually("the client filled the window while nothing was read", || {
            sent.load(Ordering::Relaxed) >= u64::from(STREAM_WINDOW)
        })
        .await;
        let (mut read, mut most) = (0u64, 0u64);
        let mut buf = vec![0u8; 16 * 1024];
        while read < TOTAL {
            let in_flight = sent.load(Ordering::Relaxed).saturating_sub(read);
            most = most.max(in_flight);
            assert!(in_flight <= bound, "{in_flight} bytes sent and not read, over the bound of {bound}");
            let n = within("the next bytes", workload.read(&mut buf)).await.unwrap();
            assert!(n > 0, "EOF after {read} of {TOTAL} bytes");
            read += n as u64;
            tokio::task::yield_now().await;
        }
        println!("most bytes in flight: {most} (bound {bound}, stream window {STREAM_WINDOW})");
        assert_eq!(within("EOF", workload.read(&mut buf)).await.unwrap(), 0);
        workload.shutdown().await.unwrap();
        let _send = sender.await.unwrap();
        client.copy_result().await.expect("ended cleanly");
    }

    #[tokio::test]
    async fn on_shutdown_a_goaway_refuses_new_streams_while_one_in_progress_finishes_then_the_connection_ends() {
        let (dial, mut ends) = pipes();
        let mut client = start(dial).await;
        // Control: a stream accepted before the shutdown.
        let (response, mut send) = client.open(connect_head()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut workload = ends.recv().await.unwrap();

        client.stop.send(true).unwrap();
        // The client learns of the GOAWAY: it opens no new stream on this connection.
        let mut refused = None;
        eventually("the client to refuse new streams (GOAWAY received)", || {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(Err(e)) = client.sender.poll_ready(&mut cx) {
                refused = Some(e);
            }
            refused.is_some()
        })
        .await;
        let refused = refused.unwrap();
        assert!(refused.is_go_away() && refused.is_remote(), "{refused}");
        assert_eq!(refused.reason(), Some(h2::Reason::NO_ERROR), "{refused}");
        assert!(client.open(connect_head()).await.is_err(), "no new stream after the GOAWAY");
        assert_eq!(client.seen.load(Ordering::Relaxed), 1);

        // The stream in progress carries on both ways to its end.
        send_all(&mut send, b"during the shutdown").await;
        let mut got = Vec::new();
        within("the bytes, then EOF", workload.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"during the shutdown");
        workload.write_all(b"bye").await.unwrap();
        workload.shutdown().await.unwrap();
        assert_eq!(read_body(&mut body).await.unwrap(), b"bye");
        client.copy_result().await.expect("ended cleanly");
        // Its end was the connection's.
        within("the connection's end", &mut client.server).await.unwrap().expect("a clean end");
    }
}
