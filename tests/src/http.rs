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

/// One HTTP/1.1 response as read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Lower-case names, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (e.g. `trellis-http-echo`'s description of the request), or panics.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self:?}"))
    }
}

/// A keep-alive HTTP/1.1 client on any stream (e.g. one opened through SOCKS5): write raw requests, read responses.
pub struct Conn {
    reader: std::io::BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
        Self { writer: stream.try_clone().expect("clone"), reader: std::io::BufReader::new(stream) }
    }

    /// Sends bytes as they are (for malformed requests).
    pub fn send_raw(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(raw)
    }

    /// `METHOD target` with `Host` and the extra header lines, no body; returns the response.
    pub fn request(&mut self, method: &str, target: &str, host: &str, headers: &[(&str, &str)]) -> Response {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        self.send_raw(raw.as_bytes()).expect("write request");
        self.read_response().unwrap_or_else(|e| panic!("{method} {target}: {e}"))
    }

    /// Reads one response (Content-Length, chunked, or until close).
    pub fn read_response(&mut self) -> std::io::Result<Response> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').ok_or_else(|| std::io::Error::other(format!("bad header {l:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v): &(String, String)| v.clone());
        let mut body = Vec::new();
        if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(len, 0);
            self.reader.read_exact(&mut body)?;
        } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if status != 204 && status != 304 {
            self.reader.read_to_end(&mut body)?;
        }
        Ok(Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
    }

    /// How the connection ends when the client sends nothing more: `Refused(Closed)` when the server closes it
    /// (EOF), `Hung` when it stays open, `Broke` when more bytes arrive.
    pub fn end(&mut self) -> crate::outcome::Outcome {
        use crate::outcome::{HANG_AFTER, Outcome, Refusal};
        let mut buf = [0u8; 1];
        self.writer.set_read_timeout(Some(HANG_AFTER)).expect("timeout");
        match self.reader.read(&mut buf) {
            Ok(0) => Outcome::Refused(Refusal::Closed),
            Ok(_) => Outcome::Broke(format!("unexpected byte {:?}", buf[0] as char)),
            Err(e) => Outcome::from_io(&e),
        }
    }
}
