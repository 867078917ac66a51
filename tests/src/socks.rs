//! A SOCKS5 client (no auth, CONNECT by IP) for driving a proxy's SOCKS5 listener the way an application would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Connects through the SOCKS5 server at `proxy` to `target`. `Err(Ok(code))` is the server's refusal code,
/// `Err(Err(e))` an I/O failure.
pub fn connect(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream, Result<u8, std::io::Error>> {
    let io = |e: std::io::Error| Err(e);
    let mut stream = TcpStream::connect(proxy).or_else(io).map_err(Err)?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(Err)?;
    stream.set_nodelay(true).map_err(Err)?;
    stream.write_all(&[5, 1, 0]).map_err(Err)?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).map_err(Err)?;
    if choice != [5, 0] {
        return Err(Ok(0xff));
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
    stream.write_all(&request).map_err(Err)?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).map_err(Err)?;
    if reply[1] != 0 {
        return Err(Ok(reply[1]));
    }
    stream.set_read_timeout(None).map_err(Err)?;
    Ok(stream)
}

/// Connects or panics with the reason.
pub fn connect_ok(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    match connect(proxy, target) {
        Ok(stream) => stream,
        Err(Ok(code)) => panic!("SOCKS5 {proxy} refused CONNECT {target} with code {code}"),
        Err(Err(e)) => panic!("SOCKS5 {proxy} CONNECT {target}: {e}"),
    }
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
