//! A SOCKS5 client (no auth, CONNECT by IP) for driving a proxy's SOCKS5 listener the way an application would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use crate::outcome::{self, Outcome, Refusal};

/// Connects through the SOCKS5 server at `proxy` to `target`. The error says how the attempt ended:
/// `Refused(Socks5(code))` for the server's refusal code, `Hung` when no reply came within
/// [`outcome::HANG_AFTER`], the transport's refusal (RST, EOF) or `Broke` otherwise.
pub fn connect(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream, Outcome> {
    let io = |e: std::io::Error| Outcome::from_io(&e);
    let mut stream = TcpStream::connect(proxy).map_err(io)?;
    stream.set_read_timeout(Some(outcome::HANG_AFTER)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream.write_all(&[5, 1, 0]).map_err(io)?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).map_err(io)?;
    if choice != [5, 0] {
        return Err(Outcome::Broke(format!("SOCKS5 method choice {choice:?}")));
    }
    let mut request = vec![5, 1, 0];
    match target.ip() {
        std::net::IpAddr::V4(ip) => {
            request.push(1);
            request.extend(ip.octets());
        }
        std::net::IpAddr::V6(ip) => {
            request.push(4);
            request.extend(ip.octets());
        }
    }
    request.extend(target.port().to_be_bytes());
    stream.write_all(&request).map_err(io)?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).map_err(io)?;
    if reply[0] != 5 {
        return Err(Outcome::Broke(format!("SOCKS5 reply version {}", reply[0])));
    }
    if reply[1] != 0 {
        return Err(Outcome::Refused(Refusal::Socks5(reply[1])));
    }
    stream.set_read_timeout(None).map_err(io)?;
    Ok(stream)
}

/// How a SOCKS5 CONNECT followed by an echo round trip of `message` ends: `Passed` when the message came back.
pub fn echo(proxy: SocketAddr, target: SocketAddr, message: &[u8]) -> Outcome {
    match connect(proxy, target) {
        Ok(stream) => outcome::echo_on(stream, message),
        Err(outcome) => outcome,
    }
}

/// Ok if an echo round trip through the SOCKS5 server at `proxy` to `target` works, Err(reply code) if the server
/// refused the CONNECT with a code; panics on anything else (a hang, a reset, wrong bytes back).
pub fn reach(proxy: SocketAddr, target: SocketAddr) -> Result<(), u8> {
    match connect(proxy, target) {
        Ok(stream) => {
            assert_eq!(echo_round_trip(stream, b"ping"), b"ping");
            Ok(())
        }
        Err(Outcome::Refused(Refusal::Socks5(code))) => Err(code),
        Err(other) => panic!("SOCKS5 CONNECT {target} neither worked nor was refused with a reply code: {other:?}"),
    }
}

/// Connects or panics with the reason.
pub fn connect_ok(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    connect(proxy, target).unwrap_or_else(|outcome| panic!("SOCKS5 {proxy} CONNECT {target}: {outcome:?}"))
}

/// Writes `data`, half-closes, and reads everything back until EOF.
pub fn echo_round_trip(mut stream: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut reader = stream.try_clone().expect("clone");
    let reading = std::thread::spawn(move || {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    });
    stream.write_all(data).expect("write");
    stream.shutdown(std::net::Shutdown::Write).expect("half-close");
    reading.join().expect("reader thread").expect("read until EOF")
}

/// A plain TCP listener on loopback whose every connection is carried through the SOCKS5 server at `proxy` to
/// `target`, for unmodified clients that cannot speak SOCKS5 themselves (gRPC and WebSocket libraries). Its threads
/// live as long as the test process.
pub struct Forward {
    pub addr: SocketAddr,
}

impl Forward {
    pub fn start(proxy: SocketAddr, target: SocketAddr) -> Forward {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a forwarder");
        let addr = listener.local_addr().expect("forwarder address");
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                std::thread::spawn(move || match connect(proxy, target) {
                    Ok(upstream) => splice(client, upstream),
                    Err(outcome) => eprintln!("forwarder: SOCKS5 CONNECT {target}: {outcome:?}"),
                });
            }
        });
        Forward { addr }
    }
}

/// Copies both ways until each side has closed, passing half-closes on.
fn splice(a: TcpStream, b: TcpStream) {
    let pipe = |mut from: TcpStream, to: TcpStream| {
        std::thread::spawn(move || {
            let mut writer = &to;
            let _ = std::io::copy(&mut from, &mut writer);
            let _ = to.shutdown(std::net::Shutdown::Write);
        })
    };
    let (a2, b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
    let one = pipe(a, b2);
    let other = pipe(b, a2);
    let _ = (one.join(), other.join());
}
