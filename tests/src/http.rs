//! A minimal HTTP/1.1 client for admin and metrics endpoints (plain HTTP, `Connection: close`, no body).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Returns (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    request(None, "GET", addr, path)
}

/// [`get`] from inside network namespace `netns`.
pub fn get_in(netns: Option<&str>, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    request(netns, "GET", addr, path)
}

/// A POST with an empty body; returns (status code, body).
pub fn post(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    request(None, "POST", addr, path)
}

fn request(netns: Option<&str>, method: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = match netns {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5))?,
        Some(_) => crate::netns::connect_in(netns, addr)?,
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let length = if method == "POST" { "Content-Length: 0\r\n" } else { "" };
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{length}Connection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {head}")))?;
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
