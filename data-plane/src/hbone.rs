//! HBONE, the protocol between proxies, as both sides speak it: mTLS, HTTP/2, one `CONNECT <ip>:<port>` stream
//! per tunnelled connection. The HTTP/2 settings and keep-alive the client (`proxy::pool`) and the server
//! (`proxy::h2_server`) use, and the `Forwarded` header that carries the original client address from one to the
//! other.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::HeaderMap;

/// Most streams one HTTP/2 connection carries before the pool opens another (and what inbound advertises).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Flow-control windows: large enough that one stream is not throttled by round trips, bounded so that a slow
/// reader holds at most this much in flight.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// Most bytes one stream hands HTTP/2 ahead of the connection writing them, both sides: four full copy buffers, so
/// that the next one is read from the socket while earlier ones are encrypted and sent.
pub const MAX_SEND_BUFFER: usize = 4 * crate::copy::BUFFER_SIZE;
/// Largest request head the server takes (SETTINGS_MAX_HEADER_LIST_SIZE, hyper's server default, which HBONE's
/// server used until it spoke `h2` directly): a CONNECT head is a few hundred bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// HTTP/2 PINGs on an HBONE connection, both sides.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keep-alive PING may go unanswered before the connection is given up: the client side's (`pool`).
pub const CLIENT_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The server side's (hyper's server default, kept when the server moved to `h2`).
pub const SERVER_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Header carrying the original client address (RFC 7239); trusted only from an authenticated peer.
pub const FORWARDED: &str = "forwarded";

/// The `Forwarded` value the client side sends for the address the tunnelled connection came from.
pub fn forwarded_for(original_source: SocketAddr) -> String {
    format!("for=\"{original_source}\"")
}

/// The original client address of a CONNECT request, from its `Forwarded` header as [`forwarded_for`] writes it;
/// `None` if the header is absent or has another form.
pub fn original_source(headers: &HeaderMap) -> Option<SocketAddr> {
    headers
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("for=\""))
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse::<SocketAddr>().ok())
}

/// Returns once a keep-alive PING (one every [`KEEP_ALIVE_INTERVAL`]) went unanswered for `timeout`, or could not
/// be sent; never without a PING handle.
pub async fn keep_alive(ping: Option<h2::PingPong>, timeout: Duration) {
    let Some(mut ping) = ping else { return std::future::pending().await };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarded_header_carries_the_original_source_both_ways() {
        for address in ["10.1.0.7:40000", "[fd00::7]:40000"] {
            let address: SocketAddr = address.parse().unwrap();
            let mut headers = HeaderMap::new();
            headers.insert(FORWARDED, forwarded_for(address).parse().unwrap());
            assert_eq!(original_source(&headers), Some(address));
        }
        let mut headers = HeaderMap::new();
        assert_eq!(original_source(&headers), None);
        headers.insert(FORWARDED, "for=10.1.0.7:40000".parse().unwrap());
        assert_eq!(original_source(&headers), None, "unquoted: not the form the client side writes");
    }
}
