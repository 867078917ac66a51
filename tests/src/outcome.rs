//! What a connection attempt ended in, as the client saw it. Negative checks assert the specific [`Refusal`] they
//! expect, so that a hang (a timeout) or an unrelated failure never passes for a refusal.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long a negative check waits before calling the attempt [`Outcome::Hung`].
pub const HANG_AFTER: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The exchange completed as on a working path (the echo came back whole, the tunnel was answered 200).
    Passed,
    /// The other side refused, in a way the client observed.
    Refused(Refusal),
    /// Nothing conclusive within the deadline.
    Hung,
    /// Anything else: wrong bytes back, an unexpected error.
    Broke(String),
}

/// The observable form of a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The TCP connect was answered with RST (ECONNREFUSED).
    ConnectRefused,
    /// An open connection was reset (RST).
    Reset,
    /// An open connection was closed (EOF) before any answer.
    Closed,
    /// A SOCKS5 reply with this non-zero code (RFC 1928: 2 not allowed, 5 connection refused, ...).
    Socks5(u8),
    /// An HTTP status other than success (a CONNECT answered 403, a request answered 401).
    Http(u16),
    /// A TLS alert sent by the peer.
    TlsAlert(rustls::AlertDescription),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Outcome {
    /// The outcome of an I/O error on an open connection: reset, EOF, timeout, or something else.
    pub fn from_io(e: &std::io::Error) -> Self {
        if let Some(alert) = tls_alert(e) {
            return Outcome::Refused(Refusal::TlsAlert(alert));
        }
        match e.kind() {
            ErrorKind::ConnectionRefused => Outcome::Refused(Refusal::ConnectRefused),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                Outcome::Refused(Refusal::Reset)
            }
            ErrorKind::UnexpectedEof => Outcome::Refused(Refusal::Closed),
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Outcome::Hung,
            _ => Outcome::Broke(e.to_string()),
        }
    }
}

/// The TLS alert the peer sent, if `error` (or an error it wraps) is rustls's "alert received".
pub fn tls_alert(error: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>() {
            return Some(*alert);
        }
        // `io::Error::source` skips the error it wraps: look inside explicitly.
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(rustls::Error::AlertReceived(alert)) = inner.downcast_ref::<rustls::Error>() {
                return Some(*alert);
            }
            next = inner.source();
            continue;
        }
        next = e.source();
    }
    None
}

/// Writes `message`, half-closes, and reads until EOF (at most [`HANG_AFTER`]): `Passed` when exactly `message`
/// came back, `Refused(Closed)` when the connection ended with nothing, `Refused(Reset)` on RST, `Hung` on timeout.
pub fn echo_on(mut stream: TcpStream, message: &[u8]) -> Outcome {
    if let Err(e) = stream.set_read_timeout(Some(HANG_AFTER)) {
        return Outcome::Broke(e.to_string());
    }
    // A write may fail once the peer has reset: the read below reports that.
    let _ = stream.write_all(message).and_then(|()| stream.shutdown(std::net::Shutdown::Write));
    let mut back = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) if back.is_empty() => return Outcome::from_io(&e),
            Err(e) => return Outcome::Broke(format!("{} of {} bytes back, then {e}", back.len(), message.len())),
        }
    }
    if back == message {
        Outcome::Passed
    } else if back.is_empty() {
        Outcome::Refused(Refusal::Closed)
    } else {
        Outcome::Broke(format!("{} bytes back instead of the {} sent", back.len(), message.len()))
    }
}

/// Reads until the peer closes (at most [`HANG_AFTER`]), for a connection that must be closed: `Refused(Closed)`
/// on EOF with nothing read, `Refused(Reset)` on RST, `Hung` if it stays open, `Broke` if bytes arrive.
pub fn closed_without_answer(stream: &mut TcpStream) -> Outcome {
    if let Err(e) = stream.set_read_timeout(Some(HANG_AFTER)) {
        return Outcome::Broke(e.to_string());
    }
    let mut buf = Vec::new();
    match stream.read_to_end(&mut buf) {
        Ok(_) if buf.is_empty() => Outcome::Refused(Refusal::Closed),
        Ok(_) => Outcome::Broke(format!("answered {:?}", String::from_utf8_lossy(&buf))),
        Err(e) if buf.is_empty() => Outcome::from_io(&e),
        Err(e) => Outcome::Broke(format!("answered {:?}, then {e}", String::from_utf8_lossy(&buf))),
    }
}
