//! A minimal SOCKS5 client (RFC 1928): no authentication, CONNECT to an IP address. Blocking and tokio variants,
//! doing the same two steps: greeting `05 01 00` → method `05 00`; CONNECT → reply `05 00 00 ATYP BND.ADDR BND.PORT`.

#![allow(dead_code)] // each user (demo, bench, tests) needs only one variant

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

const GREETING: [u8; 3] = [5, 1, 0];

fn request(dest: SocketAddr) -> Vec<u8> {
    let mut req = vec![5, 1, 0];
    match dest {
        SocketAddr::V4(a) => {
            req.push(1);
            req.extend(a.ip().octets());
        }
        SocketAddr::V6(a) => {
            req.push(4);
            req.extend(a.ip().octets());
        }
    }
    req.extend(dest.port().to_be_bytes());
    req
}

fn check_method(reply: [u8; 2]) -> io::Result<()> {
    match reply {
        [5, 0] => Ok(()),
        other => Err(io::Error::other(format!("SOCKS5 greeting: proxy answered {other:02x?}, not 05 00 (no auth)"))),
    }
}

/// Checks the reply's first 4 bytes; returns how many bytes of BND.ADDR and BND.PORT follow (None: a domain name,
/// whose length byte comes next).
fn check_reply(head: [u8; 4], dest: SocketAddr) -> io::Result<Option<usize>> {
    if head[0] != 5 {
        return Err(io::Error::other(format!("SOCKS5 CONNECT {dest}: bad reply version {:#04x}", head[0])));
    }
    if head[1] != 0 {
        let why = match head[1] {
            1 => "general failure",
            2 => "not allowed by ruleset",
            3 => "network unreachable",
            4 => "host unreachable",
            5 => "connection refused",
            6 => "TTL expired",
            7 => "command not supported",
            8 => "address type not supported",
            _ => "unknown code",
        };
        return Err(io::Error::other(format!("SOCKS5 CONNECT {dest}: reply {:#04x} ({why})", head[1])));
    }
    match head[3] {
        1 => Ok(Some(4 + 2)),
        4 => Ok(Some(16 + 2)),
        3 => Ok(None),
        t => Err(io::Error::other(format!("SOCKS5 CONNECT {dest}: bad address type {t:#04x} in reply"))),
    }
}

fn during(step: &str, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(e.kind(), format!("the proxy closed the connection during the SOCKS5 {step}"))
    } else {
        io::Error::new(e.kind(), format!("SOCKS5 {step}: {e}"))
    }
}

/// Blocking: connects to the SOCKS5 listener at `proxy` and asks it for `dest`. Read and write timeouts are left
/// at `timeout`; Nagle is off.
pub fn connect(proxy: SocketAddr, dest: SocketAddr, timeout: Duration) -> io::Result<std::net::TcpStream> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&proxy, timeout)
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to the SOCKS5 listener {proxy}: {e}")))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(&GREETING).map_err(|e| during("greeting", e))?;
    let mut method = [0; 2];
    s.read_exact(&mut method).map_err(|e| during("greeting", e))?;
    check_method(method)?;
    s.write_all(&request(dest)).map_err(|e| during("CONNECT", e))?;
    let mut head = [0; 4];
    s.read_exact(&mut head).map_err(|e| during("CONNECT", e))?;
    let rest = match check_reply(head, dest)? {
        Some(n) => n,
        None => {
            let mut len = [0; 1];
            s.read_exact(&mut len).map_err(|e| during("CONNECT", e))?;
            len[0] as usize + 2
        }
    };
    s.read_exact(&mut vec![0; rest]).map_err(|e| during("CONNECT", e))?;
    Ok(s)
}

/// Tokio: the same handshake, without timeouts (the caller wraps it). Nagle is off.
pub async fn connect_async(proxy: SocketAddr, dest: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to the SOCKS5 listener {proxy}: {e}")))?;
    s.set_nodelay(true)?;
    s.write_all(&GREETING).await.map_err(|e| during("greeting", e))?;
    let mut method = [0; 2];
    s.read_exact(&mut method).await.map_err(|e| during("greeting", e))?;
    check_method(method)?;
    s.write_all(&request(dest)).await.map_err(|e| during("CONNECT", e))?;
    let mut head = [0; 4];
    s.read_exact(&mut head).await.map_err(|e| during("CONNECT", e))?;
    let rest = match check_reply(head, dest)? {
        Some(n) => n,
        None => s.read_u8().await.map_err(|e| during("CONNECT", e))? as usize + 2,
    };
    s.read_exact(&mut vec![0; rest]).await.map_err(|e| during("CONNECT", e))?;
    Ok(s)
}
