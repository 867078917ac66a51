//! The data path with real processes: an application's bytes go SOCKS5 → proxy A → HBONE (mTLS, HTTP/2 CONNECT) →
//! proxy B → echo server, and back.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use rustls::AlertDescription;
use trellis_tests::outcome::{self, Outcome, Refusal};
use trellis_tests::{ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec, client, hbone, read_log, socks, wait_for};

const CLIENT_IP: &str = "127.0.10.1";
const SERVER_IP: &str = "127.0.10.2";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

/// A control plane, proxy A fronting the client workload, proxy B fronting the echo server's workload.
struct Mesh {
    cp: ControlPlane,
    a: Proxy,
    b: Proxy,
    _echo: Echo,
    echo_addr: SocketAddr,
}

fn mesh(cp_args: &[&str], a_options: ProxyOptions, b_options: ProxyOptions) -> Mesh {
    let cp = ControlPlane::start(cp_args);
    // Port 0: the echo server reports the port the kernel gave it, and the workload declares that port.
    let echo = Echo::start(format!("{SERVER_IP}:0").parse().unwrap());
    let echo_addr = echo.addr;
    let mut server = WorkloadSpec::new("api", "shop", "api", SERVER_IP);
    server.ports = vec![(echo_addr.port(), "tcp")];
    let b = Proxy::start_with(&cp, "node-b", &[server], b_options);
    let a = Proxy::start_with(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", CLIENT_IP)], a_options);
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-b's workload in node-a's registry", |d| d["workloads"].to_string().contains(SERVER_IP));
    Mesh { cp, a, b, _echo: echo, echo_addr }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[test]
fn bytes_in_equal_bytes_out_for_all_sizes_concurrently_and_across_half_close() {
    let m = mesh(&[], ProxyOptions::default(), ProxyOptions::default());
    for len in [1, 64 * 1024, 100 * 1024 * 1024] {
        let data = pattern(len);
        let back = socks::echo_round_trip(socks::connect_ok(m.a.socks5_addr, m.echo_addr), &data);
        assert_eq!(back.len(), len, "length for {len} bytes");
        assert!(back == data, "content differs for {len} bytes");
    }

    let threads: Vec<_> = (0..100)
        .map(|i| {
            let (socks5, echo) = (m.a.socks5_addr, m.echo_addr);
            std::thread::spawn(move || {
                let data = pattern(16 * 1024 + i);
                let back = socks::echo_round_trip(socks::connect_ok(socks5, echo), &data);
                assert!(back == data, "connection {i} corrupted");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("concurrent connection");
    }

    // Half-close: the client stops writing, and still reads the whole reply.
    let mut stream = socks::connect_ok(m.a.socks5_addr, m.echo_addr);
    stream.write_all(b"last words").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"last words");

    // The server proxy saw the client's identity.
    let log = read_log(&m.b.log_path());
    assert!(log.contains("source=spiffe://cluster.local/ns/shop/sa/web"), "{log}");
}

fn cert_serial(proxy: &Proxy) -> String {
    proxy.config_dump()["certificates"][0]["serial"].as_str().unwrap().to_owned()
}

#[test]
fn open_connection_survives_two_rotations_and_new_connections_use_new_certificates() {
    let m = mesh(&["--cert-ttl", "1m"], ProxyOptions::default(), ProxyOptions::default());
    let mut long_lived = socks::connect_ok(m.a.socks5_addr, m.echo_addr);
    let mut serials = vec![cert_serial(&m.a)];
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut round = 0u32;
    while serials.len() < 3 {
        assert!(Instant::now() < deadline, "fewer than two rotations in 150s: {serials:?}");
        // The long-lived connection keeps working throughout.
        let message = format!("round {round}");
        long_lived.write_all(message.as_bytes()).unwrap();
        let mut reply = vec![0u8; message.len()];
        long_lived.read_exact(&mut reply).unwrap();
        assert_eq!(reply, message.as_bytes());
        round += 1;

        let serial = cert_serial(&m.a);
        if serial != *serials.last().unwrap() {
            // A new connection after the rotation is made with the new certificate.
            let back = socks::echo_round_trip(socks::connect_ok(m.a.socks5_addr, m.echo_addr), b"fresh");
            assert_eq!(back, b"fresh");
            wait_for(&format!("node-b to see a handshake with serial {serial}"), Duration::from_secs(10), || {
                read_log(&m.b.log_path()).contains(&format!("serial={serial}")).then_some(())
            });
            serials.push(serial);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    long_lived.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    long_lived.read_to_end(&mut rest).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_with_bad_identities_are_refused() {
    let m = mesh(&[], ProxyOptions::default(), ProxyOptions::default());
    let roots = hbone::roots(&m.cp.root_pem());
    let b_hbone: SocketAddr = format!("{SERVER_IP}:{}", m.b.hbone_port).parse().unwrap();
    let target = m.echo_addr.to_string();

    // The control case, through the same client path as the refusals: a valid mesh credential gets through.
    let good = hbone::valid_credential(&m.cp.data_dir(), "spiffe://cluster.local/ns/shop/sa/tester");
    assert_eq!(hbone::tunnel(b_hbone, roots.clone(), SERVER_ID, Some(good), &target).await, Outcome::Passed);

    // Each refusal: the alert node-b sends (the client verified node-b and finished its side of the handshake, so
    // it is node-b that judged the client's certificate) and the reason node-b logs.
    let other_mesh = ControlPlane::start(&[]);
    let now = time::OffsetDateTime::now_utc();
    let refused: Vec<(&str, Option<hbone::Credential>, AlertDescription, &str)> = vec![
        (
            "certificate from another CA",
            Some(hbone::valid_credential(&other_mesh.data_dir(), "spiffe://cluster.local/ns/shop/sa/web")),
            // Both meshes' CAs carry the same name: the chain finds the name and fails on the signature.
            AlertDescription::DecryptError,
            "TLS handshake failed: invalid peer certificate: BadSignature",
        ),
        (
            "expired certificate",
            Some(hbone::sign_with_ca(
                &m.cp.data_dir(),
                "spiffe://cluster.local/ns/shop/sa/web",
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )),
            AlertDescription::CertificateExpired,
            "TLS handshake failed: invalid peer certificate: certificate expired",
        ),
        (
            "no client certificate",
            None,
            AlertDescription::CertificateRequired,
            "TLS handshake failed: peer sent no certificates",
        ),
    ];
    for (what, credential, alert, reason) in refused {
        let logged_before = read_log(&m.b.log_path()).matches(reason).count();
        let outcome = hbone::tunnel(b_hbone, roots.clone(), SERVER_ID, credential, &target).await;
        assert_eq!(outcome, Outcome::Refused(Refusal::TlsAlert(alert)), "{what}");
        wait_for(&format!("node-b to log the refusal of the {what}: {reason}"), Duration::from_secs(10), || {
            (read_log(&m.b.log_path()).matches(reason).count() > logged_before).then_some(())
        });
    }

    // A server presenting an identity other than the destination's: the client proxy refuses it. The imposter
    // holds a valid mesh certificate, and a raw node registers a workload whose tunnels lead to it.
    let imposter_id = "spiffe://cluster.local/ns/shop/sa/imposter";
    let imposter = hbone::imposter(
        "127.0.10.9:0".parse().unwrap(),
        roots.clone(),
        "cluster.local",
        hbone::valid_credential(&m.cp.data_dir(), imposter_id),
    )
    .await;
    let (token, pin) = m.cp.token("node-c", &["shop"], &[]);
    let node_c = client::join(&m.cp.addr.to_string(), &pin, &token, "node-c").await.unwrap().unwrap();
    let mut hello = client::hello(vec![client::workload("fake", "shop", "fake", "127.0.10.9")]);
    hello.hbone_address = imposter.to_string();
    let _stream = node_c.discover(hello).await.unwrap().expect("node-c registers");
    let a_dump =
        m.a.wait_config("the fake workload to reach node-a", |d| d["workloads"].to_string().contains("127.0.10.9"));
    assert!(a_dump.to_string().contains("spiffe://cluster.local/ns/shop/sa/fake"));
    let socks5 = m.a.socks5_addr;
    let result =
        tokio::task::spawn_blocking(move || socks::connect(socks5, "127.0.10.9:8080".parse().unwrap()).map(|_| ()))
            .await
            .unwrap();
    // The source proxy's handshake with the imposter fails: general SOCKS server failure (1).
    assert_eq!(result, Err(Outcome::Refused(Refusal::Socks5(1))), "tunnel to an imposter");
    let log = read_log(&m.a.log_path());
    assert!(
        log.contains(&format!("server is {imposter_id}, expected spiffe://cluster.local/ns/shop/sa/fake")),
        "{log}"
    );

    // The proxies still work after all of that.
    let (socks5, echo) = (m.a.socks5_addr, m.echo_addr);
    let back =
        tokio::task::spawn_blocking(move || socks::echo_round_trip(socks::connect_ok(socks5, echo), b"still fine"))
            .await
            .unwrap();
    assert_eq!(back, b"still fine");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_connect_requests_and_garbage_cost_one_stream_or_connection() {
    let m = mesh(&[], ProxyOptions::default(), ProxyOptions::default());
    let roots = hbone::roots(&m.cp.root_pem());
    let b_hbone: SocketAddr = format!("{SERVER_IP}:{}", m.b.hbone_port).parse().unwrap();
    let credential = hbone::valid_credential(&m.cp.data_dir(), "spiffe://cluster.local/ns/shop/sa/tester");
    let mut connection = hbone::connect(b_hbone, roots.clone(), SERVER_ID, Some(credential)).await.unwrap();

    let echo_port = m.echo_addr.port();
    let cases = [
        (Method::CONNECT, "127.0.99.99:8080".to_owned(), StatusCode::NOT_FOUND),
        (Method::CONNECT, format!("{SERVER_IP}:{}", echo_port + 1), StatusCode::NOT_FOUND),
        (Method::GET, format!("http://{SERVER_IP}:{echo_port}/"), StatusCode::METHOD_NOT_ALLOWED),
        (Method::CONNECT, "localhost:80".to_owned(), StatusCode::BAD_REQUEST),
        (Method::CONNECT, m.echo_addr.to_string(), StatusCode::OK),
    ];
    for (method, target, want) in cases {
        let got = connection.request(method.clone(), &target).await.unwrap();
        assert_eq!(got, want, "{method} {target}");
    }

    // Plaintext HTTP and a malformed TLS hello on the HBONE port: the connection is dropped, nothing else.
    for garbage in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5][..]] {
        let mut tcp = std::net::TcpStream::connect(b_hbone).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tcp.write_all(garbage).unwrap();
        // Plaintext gets a TLS alert record (content type 21) at most, then the connection closes.
        let closed = outcome::closed_without_answer(&mut tcp);
        assert!(
            matches!(&closed, Outcome::Refused(Refusal::Closed | Refusal::Reset))
                || matches!(&closed, Outcome::Broke(answer) if answer.starts_with("answered \"\\u{15}")),
            "garbage {garbage:?}: {closed:?}"
        );
    }
    let (socks5, echo) = (m.a.socks5_addr, m.echo_addr);
    let back = tokio::task::spawn_blocking(move || socks::echo_round_trip(socks::connect_ok(socks5, echo), b"alive"))
        .await
        .unwrap();
    assert_eq!(back, b"alive");
}

#[test]
fn workload_that_refuses_connections_gets_an_error_not_a_hang() {
    let m = mesh(&[], ProxyOptions::default(), ProxyOptions::default());
    // The declared port with nothing listening behind it on the server workload's address.
    drop(m._echo);
    let result = socks::connect(m.a.socks5_addr, m.echo_addr);
    assert_eq!(result.map(|_| ()), Err(Outcome::Refused(Refusal::Socks5(5))), "expected 'connection refused' (5)");
}

#[test]
fn passthrough_outside_the_mesh_follows_config() {
    let outside_echo = Echo::start("127.0.20.1:0".parse().unwrap());
    let outside = outside_echo.addr;
    let allow = ProxyOptions { passthrough: Some("allow"), ..ProxyOptions::default() };
    let deny = ProxyOptions { passthrough: Some("deny"), ..ProxyOptions::default() };
    let m = mesh(&[], allow, deny);
    let back = socks::echo_round_trip(socks::connect_ok(m.a.socks5_addr, outside), b"plain tcp");
    assert_eq!(back, b"plain tcp");
    // Node B (passthrough: deny) speaks for the api workload: its SOCKS5 refuses destinations outside the mesh.
    let refused = socks::connect(m.b.socks5_addr, outside);
    assert_eq!(refused.map(|_| ()), Err(Outcome::Refused(Refusal::Socks5(2))), "expected 'not allowed' (2)");
}

#[test]
fn sigterm_lets_a_stream_in_progress_finish_then_exits() {
    let drain = ProxyOptions {
        extra: serde_json::json!({"drainTimeout": "20s"}).as_object().unwrap().clone(),
        ..ProxyOptions::default()
    };
    let mut m = mesh(&[], ProxyOptions::default(), drain);
    let mut stream = socks::connect_ok(m.a.socks5_addr, m.echo_addr);
    stream.write_all(b"before").unwrap();
    let mut reply = [0u8; 6];
    stream.read_exact(&mut reply).unwrap();

    // SIGTERM: once node-b has begun draining (it logs so, with the open stream counted), it is still up.
    assert!(m.b.running());
    m.b.sigterm();
    let log = wait_for("node-b to begin draining", Duration::from_secs(10), || {
        let log = read_log(&m.b.log_path());
        log.contains("draining connections").then_some(log)
    });
    assert!(log.lines().any(|l| l.contains("draining connections") && l.contains("open=1")), "{log}");
    assert!(m.b.running(), "node-b exited with a stream still open");
    for i in 0..5 {
        let message = format!("during drain {i}");
        stream.write_all(message.as_bytes()).unwrap();
        let mut reply = vec![0u8; message.len()];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply, message.as_bytes());
    }
    // New tunnels are not accepted any more: node-b no longer listens, so node-a cannot reach it (4).
    let refused = socks::connect(m.a.socks5_addr, m.echo_addr).map(|_| ());
    assert_eq!(refused, Err(Outcome::Refused(Refusal::Socks5(4))), "a new stream while node-b drains");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    wait_for("node-b to exit once its last stream closed", Duration::from_secs(10), || (!m.b.running()).then_some(()));
}

/// `workerThreads: 1` (the default on two CPUs or fewer) runs the proxy on a current-thread runtime and two workers
/// on a multi-thread one, as the runtime itself reports; either carries a tunnel, in the client's and in the
/// server's role.
#[test]
fn one_worker_is_a_current_thread_runtime_and_two_are_a_multi_thread_one_and_both_carry_tunnels() {
    let workers = |n: u64| {
        let mut options = ProxyOptions::default();
        options.extra.insert("workerThreads".into(), n.into());
        options
    };
    for (a_workers, b_workers) in [(1, 2), (2, 1)] {
        let m = mesh(&[], workers(a_workers), workers(b_workers));
        let data = pattern(256 * 1024);
        let back = socks::echo_round_trip(socks::connect_ok(m.a.socks5_addr, m.echo_addr), &data);
        assert!(back == data, "the tunnel from a {a_workers}-worker to a {b_workers}-worker proxy");
        for (proxy, n) in [(&m.a, a_workers), (&m.b, b_workers)] {
            let log = read_log(&proxy.log_path());
            let line = log.lines().find(|l| l.contains("runtime started")).unwrap_or_else(|| panic!("{log}"));
            let expected = if n == 1 { "runtime=CurrentThread" } else { "runtime=MultiThread" };
            assert!(line.contains(expected) && line.contains(&format!("workers={n}")), "{n} workers: {line}");
        }
    }
}
