//! A WebSocket client over HTTP/2 extended CONNECT (RFC 8441) for the tests. None of the unmodified clients the
//! tests drive speaks it (curl and Python's `websockets` open WebSockets over HTTP/1.1 only), so this one is built
//! from hyper's HTTP/2 client (the CONNECT with `:protocol`) and a minimal RFC 6455 framing (masked text frames
//! out, unmasked frames in).

use std::future::Future as _;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::ext::Protocol;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What one exchange came to.
#[derive(Debug, PartialEq, Eq)]
pub enum WsOutcome {
    /// The stream opened (200) and every message came back unchanged.
    Echoed(usize),
    /// The CONNECT stream was answered with something other than 200: its status and body.
    Refused { status: u16, body: String },
}

/// Opens `ws://authority/path` over h2c prior knowledge on a TCP connection to `addr` (with `Authorization:
/// Bearer token` when given), once the server has advertised SETTINGS_ENABLE_CONNECT_PROTOCOL; then sends `count`
/// text messages and checks each echo. Err: anything that is not one of the outcomes (no extended CONNECT
/// advertised, a broken stream, a wrong echo), described.
pub fn exchange(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    token: Option<&str>,
    count: usize,
) -> Result<WsOutcome, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let exchange = run(addr, authority, path, token, count);
        tokio::time::timeout(Duration::from_secs(60), exchange).await.map_err(|_| "timed out".to_owned())?
    })
}

async fn run(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    token: Option<&str>,
    count: usize,
) -> Result<WsOutcome, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    // The server's SETTINGS come first on the connection: drive it until they were read, then in its own task.
    // The flag can turn on after the poll that read the SETTINGS returned (h2 applies them with their ACK), and no
    // wake-up follows it: so while it is off, this future asks to be polled again (a few polls, until the SETTINGS
    // are in), instead of waiting for the next frame, which on an idle connection was the 10 s timeout.
    let mut connection = Box::pin(connection);
    let read_settings = std::future::poll_fn(|cx| match connection.as_mut().poll(cx) {
        std::task::Poll::Ready(_) => std::task::Poll::Ready(Err("the connection ended before SETTINGS".to_owned())),
        std::task::Poll::Pending if connection.is_extended_connect_protocol_enabled() => std::task::Poll::Ready(Ok(())),
        std::task::Poll::Pending => {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), read_settings).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("the server did not advertise SETTINGS_ENABLE_CONNECT_PROTOCOL".into()),
    }
    tokio::spawn(connection);
    sender.ready().await.map_err(|e| format!("h2 connection: {e}"))?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{authority}{path}"))
        .header("sec-websocket-version", "13");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    request.extensions_mut().insert(Protocol::from_static("websocket"));
    let mut response = sender.send_request(request).await.map_err(|e| format!("extended CONNECT: {e}"))?;
    if response.status() != hyper::StatusCode::OK {
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        return Ok(WsOutcome::Refused { status, body: String::from_utf8_lossy(&body).into_owned() });
    }
    let mut stream = TokioIo::new(hyper::upgrade::on(&mut response).await.map_err(|e| format!("upgrade: {e}"))?);
    for i in 0..count {
        let message = format!("message {i} {}", "x".repeat(i % 100));
        send_frame(&mut stream, 0x1, message.as_bytes()).await.map_err(|e| format!("send {i}: {e}"))?;
        let got = read_text(&mut stream).await.map_err(|e| format!("receive {i}: {e}"))?;
        if got != message {
            return Err(format!("message {i}: got {got:?}"));
        }
    }
    // Close (1000), then wait for the server's close.
    send_frame(&mut stream, 0x8, &1000u16.to_be_bytes()).await.map_err(|e| format!("close: {e}"))?;
    let _ = read_frame(&mut stream).await;
    Ok(WsOutcome::Echoed(count))
}

/// One masked client frame (RFC 6455 §5.2), FIN set.
async fn send_frame<S: AsyncWrite + Unpin>(stream: &mut S, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mut mask = [0u8; 4];
    aws_lc_rs::rand::fill(&mut mask).map_err(|_| std::io::Error::other("no randomness"))?;
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).await?;
    stream.flush().await
}

/// The next text message, skipping control frames (pings, pongs).
async fn read_text<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<String> {
    loop {
        let (opcode, payload) = read_frame(stream).await?;
        match opcode {
            0x1 => return String::from_utf8(payload).map_err(std::io::Error::other),
            0x8 => return Err(std::io::Error::other("the server closed the WebSocket")),
            0x9 => send_frame(stream, 0xA, &payload).await?,
            _ => {}
        }
    }
}

/// One frame from the server (unfragmented: the test's messages are small): its opcode and payload.
async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let len = match head[1] & 0x7f {
        126 => u64::from(stream.read_u16().await?),
        127 => stream.read_u64().await?,
        n => u64::from(n),
    };
    let mask = if head[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        stream.read_exact(&mut m).await?;
        Some(m)
    } else {
        None
    };
    let mut payload = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
    stream.read_exact(&mut payload).await?;
    if let Some(m) = mask {
        payload.iter_mut().enumerate().for_each(|(i, b)| *b ^= m[i % 4]);
    }
    Ok((head[0] & 0x0f, payload))
}
