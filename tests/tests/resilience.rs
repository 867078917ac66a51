//! The proxy when things go wrong, with real processes: a restart while the control plane is down (served from
//! `stateDir`), the reconnect after the control plane returns (measured and printed), a remote admin address
//! refused at start, a flood of refused HBONE connections (rate-limited log lines, counted), and peers that accept
//! TCP and then say nothing.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trellis_tests::outcome::{Outcome, Refusal};
use trellis_tests::prometheus::sum_samples;
use trellis_tests::{
    ControlPlane, Echo, Proxy, WorkloadSpec, bin, client, free_addr, free_port, http, read_log, socks, wait_for,
};

const A_IP: &str = "127.0.10.1";
const B_IP: &str = "127.0.10.2";

/// A control plane; node-a fronts `web` (an echo at A_IP), node-b fronts `api` (an echo at B_IP).
struct Mesh {
    cp: ControlPlane,
    a: Proxy,
    b: Proxy,
    _echoes: (Echo, Echo),
    a_echo: SocketAddr,
    b_echo: SocketAddr,
}

fn mesh() -> Mesh {
    let cp = ControlPlane::start(&[]);
    let a_echo = Echo::start(format!("{A_IP}:0").parse().unwrap());
    let b_echo = Echo::start(format!("{B_IP}:0").parse().unwrap());
    let mut web = WorkloadSpec::new("web", "shop", "web", A_IP);
    web.ports = vec![(a_echo.addr.port(), "tcp")];
    let mut api = WorkloadSpec::new("api", "shop", "api", B_IP);
    api.ports = vec![(b_echo.addr.port(), "tcp")];
    let a = Proxy::start(&cp, "node-a", &[web]);
    let b = Proxy::start(&cp, "node-b", &[api]);
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-b's workload at node-a", |d| d["workloads"].to_string().contains(B_IP));
    b.wait_config("node-a's workload at node-b", |d| d["workloads"].to_string().contains(A_IP));
    let (a_addr, b_addr) = (a_echo.addr, b_echo.addr);
    Mesh { cp, a, b, _echoes: (a_echo, b_echo), a_echo: a_addr, b_echo: b_addr }
}

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http::get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Both directions through the mesh: a's workload to b's echo, b's workload to a's echo.
fn both_directions(m: &Mesh, message: &[u8]) {
    let ab = socks::echo_round_trip(socks::connect_ok(m.a.socks5_addr, m.b_echo), message);
    assert_eq!(ab, message, "node-a → node-b");
    let ba = socks::echo_round_trip(socks::connect_ok(m.b.socks5_addr, m.a_echo), message);
    assert_eq!(ba, message, "node-b → node-a");
}

const ALLOW_SHOP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [shop]}}]
"#;

const ALLOW_AGAIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-after-return, namespace: shop}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
"#;

fn resource_names(dump: &serde_json::Value) -> Vec<String> {
    dump["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
}

/// A proxy restarted while the control plane is down serves from what it stored (config, trust bundle, workload
/// certificates with keys 0600): readiness 200 saying so, tunnels both ways through it. When the control plane
/// returns, the proxy reconnects (the time is printed), takes the control plane's snapshot and follows changes.
#[test]
fn restarted_proxy_serves_from_its_state_dir_while_the_control_plane_is_down_then_resyncs() {
    let mut m = mesh();
    m.cp.apply(ALLOW_SHOP);
    let version = m.a.wait_config("the policy at node-a", |d| resource_names(d) == ["allow-shop"])["version"].clone();
    both_directions(&m, b"before");

    // What node-a stored: the config (at the version it ACKed) and its certificate with the key, owner-only.
    let state = m.a.state_dir();
    let stored = |name: &str| state.join(name);
    wait_for("node-a to store its config and certificate", Duration::from_secs(20), || {
        let svids: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("svid-"))
            .collect();
        (stored("mesh-config.pb").exists() && svids.len() == 1).then_some(())
    });
    for entry in std::fs::read_dir(&state).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if name.starts_with("svid-") || name == "mesh-config.pb" || name == "node-key.pem" {
            assert_eq!(mode, 0o600, "{name}");
            if name.starts_with("svid-") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.starts_with("-----BEGIN PRIVATE KEY-----") && text.contains("CERTIFICATE"), "{name}");
            }
        }
        if name.ends_with(".tmp") {
            continue; // a write in progress (a later update); checked below that none stays
        }
    }
    wait_for("no temporary file to stay in the state dir", Duration::from_secs(20), || {
        let tmp = std::fs::read_dir(&state)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
        (!tmp).then_some(())
    });

    m.cp.kill9();
    m.a.restart();
    let started = Instant::now();
    m.a.wait_ready();
    let ready_after = started.elapsed();
    let (status, body) = m.a.readiness().unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body,
        format!("ready: serving the config stored at version {version} (not yet confirmed by the control plane)\n")
    );
    let dump = m.a.config_dump();
    assert_eq!(dump["restored"], true);
    assert_eq!(dump["version"], version);
    assert_eq!(resource_names(&dump), ["allow-shop"]);
    let (_, certs) = http::get(m.a.admin_addr, "/certs").unwrap();
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs["trust_bundle"].as_array().unwrap().len(), 1, "{certs}");
    assert_eq!(certs["workload_certificates"].as_array().unwrap().len(), 1, "{certs}");
    let log = read_log(&m.a.log_path());
    assert!(log.contains("using the stored workload certificate"), "{log}");
    assert!(log.contains("serving the stored config until the control plane sends its own"), "{log}");

    // Traffic through the restarted proxy, both ways, with the control plane still down.
    both_directions(&m, b"while the control plane is down");
    let connected = sum_samples(&scrape(m.a.metrics_addr), "trellis_control_plane_connected", &[]);
    assert_eq!(connected, 0.0, "the control plane is still down");
    println!("restarted proxy ready from stateDir after {ready_after:?} (control plane down)");

    // Kept down long enough for the backoff to reach its cap (5 s), then back: the time to reconnect is printed.
    let down_for = Duration::from_secs(8);
    let until = started + down_for;
    while Instant::now() < until {
        both_directions(&m, b"still down");
        std::thread::sleep(Duration::from_millis(500));
    }
    m.cp.resume();
    let returned = Instant::now();
    wait_for("node-a to reconnect", Duration::from_secs(30), || {
        (sum_samples(&scrape(m.a.metrics_addr), "trellis_control_plane_connected", &[]) == 1.0).then_some(())
    });
    let reconnect = returned.elapsed();
    m.a.wait_config("the control plane's snapshot", |d| d["restored"] == false);
    println!(
        "reconnect after the control plane returned: {} ms (down {down_for:?} after the proxy restart)",
        reconnect.as_millis()
    );
    let (_, body) = m.a.readiness().unwrap();
    assert_eq!(body, "ready\n");

    // Resynced: a change made now reaches node-a, and the control plane sees it ACKed.
    m.cp.apply(ALLOW_AGAIN);
    m.a.wait_config("the new policy at node-a", |d| resource_names(d) == ["allow-after-return", "allow-shop"]);
    wait_for("node-a SYNCED", Duration::from_secs(20), || {
        let status = m.cp.proxy_status();
        let node = status["proxies"].as_array()?.iter().find(|p| p["node"] == "node-a")?.clone();
        (node["synced"] == true).then_some(())
    });
    both_directions(&m, b"after");
}

/// Stored material that fails its checks is not used: a stored certificate that is not for its identity, and
/// a stored config that does not decode, leave the proxy waiting for the control plane (503, saying what it
/// waits for), and the log says why.
#[test]
fn unusable_stored_material_is_not_served() {
    let mut m = mesh();
    let state = m.a.state_dir();
    wait_for("node-a to store its config", Duration::from_secs(20), || {
        state.join("mesh-config.pb").exists().then_some(())
    });
    m.cp.kill9();
    m.a.kill9();
    // node-b's certificate under node-a's name, and a config that is not one.
    let b_svid = std::fs::read_dir(m.b.state_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("svid-"))
        .expect("node-b's stored certificate");
    let a_svid = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("svid-"))
        .expect("node-a's stored certificate");
    std::fs::copy(&b_svid, &a_svid).unwrap();
    std::fs::write(state.join("mesh-config.pb"), b"\xff\xff\xff not a config").unwrap();
    m.a.restart();
    let (status, body) = wait_for("the readiness listener", Duration::from_secs(30), || m.a.readiness().ok());
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, "not ready: waiting for workload certificates (0/1), first config from the control plane\n");
    let log = read_log(&m.a.log_path());
    assert!(log.contains("stored workload certificate not used"), "{log}");
    assert!(log.contains("expected spiffe://cluster.local/ns/shop/sa/web"), "{log}");
    assert!(log.contains("stored config not used") && log.contains("not a stored config"), "{log}");
    assert!(
        matches!(socks::connect(m.a.socks5_addr, m.b_echo), Err(Outcome::Refused(Refusal::Socks5(_)))),
        "nothing to serve with: refused"
    );

    // The control plane returns: the proxy gets a fresh certificate and config and overwrites the bad files.
    m.cp.resume();
    m.a.wait_ready();
    both_directions(&m, b"fresh");
}

/// `listen.admin` on a non-loopback address: the proxy refuses to start and names the field; with
/// `listen.adminAllowRemote: true` (the control case, same config otherwise) it starts and warns.
#[test]
fn remote_admin_address_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let config = |allow: bool| {
        format!(
            "node: node-x\ncontrolPlane:\n  address: {}\n  caPin: sha256:{}\n  token: abc.def\nstateDir: {}\nlisten:\n  admin: 0.0.0.0:{admin_port}\n  adminAllowRemote: {allow}\n  metrics: {}\n  ready: {}\n",
            free_addr(),
            "0".repeat(64),
            dir.path().join("state").display(),
            free_addr(),
            free_addr(),
        )
    };
    let path = dir.path().join("proxy.yaml");
    std::fs::write(&path, config(false)).unwrap();
    let mut refused = Command::new(bin("trellis-proxy"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a proxy that accepted the address would run on.
    let status = trellis_tests::poll(Duration::from_secs(20), || refused.try_wait().ok().flatten());
    if status.is_none() {
        let _ = refused.kill();
    }
    let out = refused.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.is_some_and(|s| !s.success()), "the proxy started with a remote admin address: {stderr}");
    assert!(
        stderr.contains(&format!("listen.admin: 0.0.0.0:{admin_port} is not a loopback address"))
            && stderr.contains("unless listen.adminAllowRemote is true"),
        "{stderr}"
    );
    assert!(TcpStream::connect(("127.0.0.1", admin_port)).is_err(), "nothing listens on the refused address");

    std::fs::write(&path, config(true)).unwrap();
    let log_path = dir.path().join("allowed.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(bin("trellis-proxy"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let listening =
        trellis_tests::poll(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", admin_port)).ok().map(|_| ()));
    let _ = child.kill();
    let _ = child.wait();
    let text = read_log(&log_path);
    assert!(listening.is_some(), "the allowed admin address was not served:\n{text}");
    assert!(text.contains("listen.admin is not a loopback address (listen.adminAllowRemote)"), "{text}");
}

/// 1,000 connections to the HBONE port that are not TLS: each is refused, and refused once in the metrics, but
/// the log holds at most the burst plus the refill (one line per refusal), the rest counted in
/// `trellis_log_suppressed_total` and summarised in a "not logged" line.
#[test]
fn a_thousand_refused_hbone_connections_log_a_bounded_number_of_lines() {
    let m = mesh();
    let hbone: SocketAddr = format!("{B_IP}:{}", m.b.hbone_port).parse().unwrap();
    let reason = "TLS handshake failed";
    let lines = |log: &str| log.lines().filter(|l| l.contains(reason)).count();
    let before = lines(&read_log(&m.b.log_path()));
    let started = Instant::now();
    const N: usize = 1000;
    for _ in 0..N {
        let mut tcp = TcpStream::connect(hbone).unwrap();
        tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut rest = Vec::new();
        // The proxy closes it (a fatal alert or a reset): either way it ends.
        let _ = tcp.read_to_end(&mut rest);
    }
    let suppressed = |body: &str| {
        sum_samples(
            body,
            "trellis_log_suppressed_total",
            &[r#"log="hbone_refusal""#, r#"reason="tls_handshake_failed""#],
        )
    };
    let tls_failures =
        |body: &str| sum_samples(body, "istio_tcp_connections_closed_total", &[r#"response_flags="TLS_FAILURE""#]);
    let body = wait_for("every refusal counted", Duration::from_secs(30), || {
        let body = scrape(m.b.metrics_addr);
        (tls_failures(&body) == N as f64).then_some(body)
    });
    let elapsed = started.elapsed();
    let logged = lines(&read_log(&m.b.log_path())) - before;
    let suppressed = suppressed(&body);
    println!("{N} refused HBONE connections in {elapsed:?}: {logged} lines logged, {suppressed} suppressed");
    assert_eq!(logged as f64 + suppressed, N as f64, "every refusal is either logged or counted");
    // 20 at once, then one a second (log_limit.rs).
    let bound = 20 + elapsed.as_secs() as usize + 1;
    assert!(logged <= bound, "{logged} lines for {N} refusals in {elapsed:?} (bound {bound})");
    // The summary line comes within the summary interval.
    wait_for("the suppressed-lines summary", Duration::from_secs(15), || {
        read_log(&m.b.log_path()).contains("HBONE refusals not logged in the last").then_some(())
    });
    // The port still serves the mesh.
    both_directions(&m, b"after the flood");
}

/// A peer "proxy" that accepts TCP on its HBONE port and never answers the TLS handshake, and one that accepts
/// the handshake's bytes and stalls: the source proxy gives up within its handshake timeout (the client gets a
/// SOCKS5 failure, the time is printed), its open-connection gauge returns to 0, and other traffic is unaffected
/// meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_accepts_tcp_and_never_answers_costs_only_its_own_connections() {
    let m = mesh();
    // The silent peer: accepts, keeps every socket open, never writes.
    let silent = TcpListener::bind("127.0.10.9:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for stream in silent.incoming().flatten() {
            keep.lock().unwrap().push(stream);
        }
    });
    let (token, pin) = m.cp.token("node-c", &["shop"], &[]);
    let node_c = client::join(&m.cp.addr.to_string(), &pin, &token, "node-c").await.unwrap().unwrap();
    let mut hello = client::hello(vec![client::workload("silent", "shop", "silent", "127.0.10.9")]);
    hello.hbone_address = silent_addr.to_string();
    let _stream = node_c.discover(hello).await.unwrap().expect("node-c registers");
    m.a.wait_config("the silent workload at node-a", |d| d["workloads"].to_string().contains("127.0.10.9"));

    let socks5 = m.a.socks5_addr;
    let attempts: Vec<_> = (0..5)
        .map(|_| {
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let result = socks::connect(socks5, "127.0.10.9:8080".parse().unwrap()).map(|_| ());
                (result, started.elapsed())
            })
        })
        .collect();
    // Meanwhile the rest of the mesh works.
    let (a, b, b_echo) = (m.a.socks5_addr, m.b.socks5_addr, m.b_echo);
    let a_echo = m.a_echo;
    tokio::task::spawn_blocking(move || {
        for _ in 0..5 {
            assert_eq!(socks::echo_round_trip(socks::connect_ok(a, b_echo), b"other"), b"other");
            assert_eq!(socks::echo_round_trip(socks::connect_ok(b, a_echo), b"other"), b"other");
        }
    })
    .await
    .unwrap();
    for attempt in attempts {
        let (result, took) = attempt.await.unwrap();
        println!("SOCKS5 CONNECT to a peer that never answers TLS ended after {took:?}: {result:?}");
        // General failure (1) or host unreachable (4), depending on which timeout ended it (the tunnel dial's or
        // the TLS handshake's); never a hang.
        assert!(matches!(result, Err(Outcome::Refused(Refusal::Socks5(1 | 4)))), "after {took:?}: {result:?}");
    }
    assert!(!held.lock().unwrap().is_empty(), "the silent peer was dialled");
    let log = read_log(&m.a.log_path());
    assert!(log.contains("127.0.10.9"), "node-a names the destination it could not reach:\n{log}");
    wait_for("node-a's open outbound connections back to 0", Duration::from_secs(30), || {
        let body = scrape(m.a.metrics_addr);
        (sum_samples(&body, "trellis_open_connections", &[]) == 0.0).then_some(())
    });
}
