//! The README's demo (`trellis-demo`) as a user runs it: once to completion, and with `--serve` as a mesh that
//! another program finds through the READY line, uses, and stops with SIGTERM.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_tests::{bin, socks};

// Workload addresses of their own, so these tests don't collide with others' on 127.0.10.x.
fn demo(client_ip: &str, server_ip: &str) -> Command {
    let mut cmd = Command::new(bin("trellis-demo"));
    cmd.args(["--no-build", "--client-ip", client_ip, "--server-ip", server_ip]);
    cmd
}

#[test]
fn demo_runs_the_mesh_end_to_end_and_exits_0() {
    let out = demo("127.0.13.1", "127.0.13.2").output().expect("run trellis-demo");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "trellis-demo failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("spiffe://cluster.local/ns/demo/sa/client"), "{stdout}");
    assert!(stdout.contains("spiffe://cluster.local/ns/demo/sa/echo"), "{stdout}");
    assert!(stdout.contains("got them back"), "{stdout}");
}

/// SIGTERMs the demo (so that it stops its own children) if the test fails half-way.
struct Running(Child);

impl Running {
    fn sigterm(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.sigterm();
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

fn addr(value: &serde_json::Value) -> SocketAddr {
    value.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HOST:PORT: {value}"))
}

#[test]
fn demo_serve_announces_a_usable_mesh_and_stops_on_sigterm() {
    let child = demo("127.0.14.1", "127.0.14.2")
        .arg("--serve")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn trellis-demo --serve");
    let mut demo = Running(child);
    let mut stdout = BufReader::new(demo.0.stdout.take().expect("stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(stdout.read_line(&mut line).map(|_| line));
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
        rest
    });
    let line = rx.recv_timeout(Duration::from_secs(120)).expect("a line on stdout within 120s").expect("read stdout");
    let json = line.trim_end().strip_prefix("READY ").unwrap_or_else(|| panic!("not a READY line: {line:?}"));
    let ready: serde_json::Value = serde_json::from_str(json).expect("READY JSON");

    let cp = addr(&ready["control_plane"]);
    addr(&ready["control_plane_metrics"]);
    let admin_config = ready["admin_config"].as_str().expect("admin_config");
    assert!(std::path::Path::new(admin_config).exists(), "{admin_config}");
    let proxies = ready["proxies"].as_array().expect("proxies");
    assert_eq!(proxies.len(), 2, "{ready}");
    for proxy in proxies {
        assert!(proxy["name"].is_string(), "{proxy}");
        for key in ["socks5", "metrics", "ready", "admin"] {
            addr(&proxy[key]);
        }
    }
    let services = ready["services"].as_array().expect("services");
    assert_eq!(services[0]["name"], "echo");
    assert_eq!(services[0]["protocol"], "tcp");
    let echo = addr(&services[0]["address"]);
    let client = proxies.iter().find(|p| p["name"] == "client-node").expect("client-node in proxies");

    // Our own round trip through the client proxy, with the harness's SOCKS5 client.
    let message = b"a round trip of our own through the demo mesh".repeat(100);
    let stream = socks::connect_ok(addr(&client["socks5"]), echo);
    assert_eq!(socks::echo_round_trip(stream, &message), message);

    demo.sigterm();
    let status = demo.wait_exit(Duration::from_secs(30)).expect("trellis-demo exits within 30s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert_eq!(reader.join().expect("reader thread"), "", "stdout carries only the READY line");
    // Its mesh went with it.
    for (what, listener) in [("control plane", cp), ("client proxy's SOCKS5", addr(&client["socks5"]))] {
        let refused = TcpStream::connect_timeout(&listener, Duration::from_secs(5)).map(|_| ()).map_err(|e| e.kind());
        assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "{what} {listener} after the demo exited");
    }
}
