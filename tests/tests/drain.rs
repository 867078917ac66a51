//! SIGTERM with a tunnelled connection that never ends: the proxy drains for `drainTimeout`, then cuts the
//! connection and exits with success. (`tunnel.rs` covers the other half: a stream that ends within the drain.)

#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use trellis_tests::{ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec, read_log, respawn, socks, wait_for};

const CLIENT_IP: &str = "127.0.10.1";
const SERVER_IP: &str = "127.0.10.2";
/// The server proxy's `drainTimeout`: long enough that a round trip right after the drain starts fits in it.
const DRAIN_TIMEOUT: &str = "10s";
/// Far beyond `DRAIN_TIMEOUT`: only tells "cut at the deadline" from "never cut".
const GENEROUS: Duration = Duration::from_secs(90);

fn round_trip(stream: &mut std::net::TcpStream, message: &[u8]) {
    stream.write_all(message).expect("write");
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply).expect("read the echo");
    assert_eq!(reply, message);
}

#[test]
fn sigterm_cuts_a_connection_still_open_at_drain_timeout_and_exits_with_success() {
    let cp = ControlPlane::start(&[]);
    let echo_addr: SocketAddr = format!("{SERVER_IP}:{}", trellis_tests::free_port()).parse().unwrap();
    let _echo = Echo::start(echo_addr);
    let mut api = WorkloadSpec::new("api", "shop", "api", SERVER_IP);
    api.ports = vec![(echo_addr.port(), "tcp")];
    let options = ProxyOptions {
        extra: serde_json::json!({"drainTimeout": DRAIN_TIMEOUT}).as_object().unwrap().clone(),
        ..ProxyOptions::default()
    };
    let mut b = Proxy::start_with(&cp, "node-b", &[api], options);
    b.wait_ready();
    let mut b_process = respawn(&mut b, &[]);
    let a = Proxy::start(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", CLIENT_IP)]);
    a.wait_ready();
    a.wait_config("node-b's workload in node-a's registry", |d| d["workloads"].to_string().contains(SERVER_IP));

    let mut stream = socks::connect_ok(a.socks5_addr, echo_addr);
    round_trip(&mut stream, b"before");
    // Control: without SIGTERM the idle stream stays open (a read waits, it does not see the end).
    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let idle = stream.read(&mut [0u8; 1]).expect_err("nothing to read on an open idle stream");
    assert!(matches!(idle.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "{idle}");
    stream.set_read_timeout(None).unwrap();

    let pid = b_process.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    wait_for("node-b to start draining", Duration::from_secs(30), || {
        read_log(&b.log_path()).contains("draining connections").then_some(())
    });
    assert!(b_process.0.try_wait().expect("try_wait").is_none(), "node-b exited at once with a stream open");
    // The stream is not cut when the drain starts: it still carries bytes both ways.
    round_trip(&mut stream, b"while draining");

    // The client never closes it: at drainTimeout the proxy closes it and exits, with success.
    let status: ExitStatus =
        wait_for("node-b to exit at its drain deadline", GENEROUS, || b_process.0.try_wait().expect("try_wait"));
    assert!(status.success(), "node-b exited with {status} after SIGTERM");
    let log = read_log(&b.log_path());
    assert!(log.contains("drain deadline reached; closing the rest"), "{log}");

    // The client saw its connection end (EOF or reset), rather than a stream left hanging.
    stream.set_read_timeout(Some(GENEROUS)).unwrap();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Err(e) => panic!("the client's connection was not closed: {e}"),
    }
    assert!(rest.is_empty(), "nothing more arrived: {rest:?}");
}
