//! Identity lifecycle with real processes: node credentials renewed over the discovery stream, and the root CA
//! rotated by `trellisctl ca rotate` under load, interrupted by kill -9 in each phase, and with a proxy that was away.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use trellis_tests::{ControlPlane, Echo, Proxy, WorkloadSpec, http, read_log, socks, wait_for};

/// One proxy of a test mesh, fronting one workload with an echo server behind it.
struct Node {
    proxy: Proxy,
    echo: SocketAddr,
    _server: Echo,
}

fn node(cp: &ControlPlane, name: &str, ip: &str) -> Node {
    let server = Echo::start(format!("{ip}:0").parse().unwrap());
    let mut workload = WorkloadSpec::new(name, "shop", name, ip);
    workload.ports = vec![(server.addr.port(), "tcp")];
    let proxy = Proxy::start(cp, name, &[workload]);
    Node { proxy, echo: server.addr, _server: server }
}

/// Proxies fronting 127.0.12.1, .2, ... (`count` of them), ready and knowing each other's workloads.
fn mesh(cp: &ControlPlane, count: usize) -> Vec<Node> {
    let nodes: Vec<Node> = (1..=count).map(|i| node(cp, &format!("node-{i}"), &format!("127.0.12.{i}"))).collect();
    for n in &nodes {
        n.proxy.wait_ready();
        n.proxy.wait_config("every workload in the registry", |d| {
            d["workloads"].as_array().is_some_and(|w| w.len() == count)
        });
    }
    nodes
}

fn certs(proxy: &Proxy) -> Value {
    let (status, body) = http::get(proxy.admin_addr, "/certs").expect("GET /certs");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/certs JSON")
}

fn ca_status(cp: &ControlPlane) -> Value {
    cp.ctl_json(&["ca", "status"])
}

fn wait_phase(cp: &ControlPlane, phase: &str) -> Value {
    wait_for(&format!("rotation phase {phase}"), Duration::from_secs(60), || {
        let out = cp.ctl(&["ca", "status", "-o", "json"]);
        let status: Value = serde_json::from_slice(&out.stdout).ok()?;
        (status["phase"] == phase).then_some(status)
    })
}

fn pem_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
}

fn sha256_hex(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn root_pem(cp: &ControlPlane, dir: &str) -> String {
    std::fs::read_to_string(cp.data_dir().join(dir).join("root-cert.pem")).expect("root certificate")
}

/// `openssl verify` of a chain (leaf first, as `/certs` lists it) against `root` alone.
fn openssl_verifies(root: &str, chain: &[Value]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let pems: Vec<&str> = chain.iter().map(|c| c["pem"].as_str().expect("pem in /certs")).collect();
    std::fs::write(dir.path().join("root.pem"), root).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), pems[0]).unwrap();
    std::fs::write(dir.path().join("untrusted.pem"), pems[1..].concat()).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile", "root.pem", "-untrusted", "untrusted.pem", "leaf.pem"])
        .current_dir(dir.path())
        .output()
        .expect("run openssl");
    out.status.success()
}

/// Every certificate a proxy holds (workload SVIDs and its node credential), as `/certs` chains.
fn held_chains(proxy: &Proxy) -> Vec<(String, Vec<Value>)> {
    let c = certs(proxy);
    let mut chains: Vec<(String, Vec<Value>)> = c["workload_certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["spiffe_id"].as_str().unwrap().to_owned(), w["chain"].as_array().unwrap().clone()))
        .collect();
    let n = &c["node_certificate"];
    chains.push((n["spiffe_id"].as_str().unwrap().to_owned(), n["chain"].as_array().unwrap().clone()));
    chains
}

/// At the end of a rotation: the proxy trusts only the new root, and every certificate it holds chains to the new
/// root alone (and, the control, not to the old one).
fn assert_only_new_root(proxy: &Proxy, old_root: &str, new_root: &str) {
    let (old_sha, new_sha) = (sha256_hex(&pem_der(old_root)), sha256_hex(&pem_der(new_root)));
    let bundle: Vec<String> = certs(proxy)["trust_bundle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sha256"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bundle, [new_sha], "{}: /certs trust bundle", proxy.node);
    for (id, chain) in held_chains(proxy) {
        assert!(openssl_verifies(new_root, &chain), "{}: {id} does not verify against the new root", proxy.node);
        assert!(!openssl_verifies(old_root, &chain), "{}: {id} still verifies against the old root", proxy.node);
        assert!(
            chain.iter().all(|c| c["sha256"] != old_sha.as_str()),
            "{}: {id}'s chain carries the old root",
            proxy.node
        );
    }
}

/// `trellisctl ARGS` with the control plane's admin config, started now (it follows a rotation to its end).
fn spawn_ctl(cp: &ControlPlane, args: &[&str]) -> std::process::Child {
    std::process::Command::new(trellis_tests::bin("trellisctl"))
        .arg("--config")
        .arg(cp.admin_config())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn trellisctl")
}

/// Waits for a `spawn_ctl` command to succeed within `deadline` (a rotation that never completes fails the test,
/// showing the rotation's status); returns its stdout.
fn finish_ctl(cp: &ControlPlane, mut child: std::process::Child, deadline: Duration) -> String {
    let exited = trellis_tests::poll(deadline, || child.try_wait().expect("try_wait"));
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("trellisctl output");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        exited.is_some_and(|s| s.success()),
        "trellisctl did not complete within {deadline:?}: {stdout}{stderr}\nstatus: {}",
        String::from_utf8_lossy(&cp.ctl(&["ca", "status"]).stdout)
    );
    format!("{stdout}{stderr}")
}

fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    stream.write_all(message)?;
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply)?;
    if reply != message {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

#[test]
fn node_credential_renews_twice_and_the_stream_and_tunnels_stay_up() {
    let cp = ControlPlane::start(&["--node-cert-ttl", "30s"]);
    let nodes = mesh(&cp, 2);
    let (a, b) = (&nodes[0].proxy, &nodes[1]);
    let mut tunnel = socks::connect_ok(a.socks5_addr, b.echo);
    round_trip(&mut tunnel, b"before").unwrap();
    let connected_since = |status: &Value| {
        status["proxies"].as_array().unwrap().iter().find(|p| p["node"] == "node-1").unwrap()["connectedSince"].clone()
    };
    let stream_started = connected_since(&cp.proxy_status());
    let serial = || certs(a)["node_certificate"]["serial"].as_str().unwrap().to_owned();
    let mut serials = vec![serial()];
    let started = Instant::now();
    while serials.len() < 3 {
        let next = wait_for("a node credential renewal", Duration::from_secs(60), || {
            // Meanwhile the open tunnel carries bytes.
            round_trip(&mut tunnel, b"meanwhile").expect("the open tunnel");
            std::thread::sleep(Duration::from_millis(200));
            Some(serial()).filter(|s| s != serials.last().unwrap())
        });
        println!("node credential renewed after {:.1}s: serial {next}", started.elapsed().as_secs_f64());
        serials.push(next);
        // A new tunnel works, and the renewed credential is what the state dir holds (key owner-only).
        assert_eq!(socks::echo_round_trip(socks::connect_ok(a.socks5_addr, b.echo), b"fresh"), b"fresh");
        let stored = std::fs::read_to_string(a.state_dir().join("node-chain.pem")).unwrap();
        let stored_serial = x509_parser::parse_x509_certificate(&pem_der(&stored)).unwrap().1.raw_serial_as_string();
        assert_eq!(stored_serial.replace(':', ""), *serials.last().unwrap());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(a.state_dir().join("node-key.pem")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
    round_trip(&mut tunnel, b"after").unwrap();
    // The discovery stream is the one opened at the start: never reconnected.
    assert_eq!(connected_since(&cp.proxy_status()), stream_started);
    let log = read_log(&a.log_path());
    assert!(!log.contains("discovery stream failed"), "{log}");
    assert!(log.matches("node credential renewed").count() >= 2, "{log}");
    // The next connection presents the renewed credential: restarted, the proxy reconnects with it (the join
    // token is spent) and is ready again.
    drop(tunnel);
    let mut a = nodes.into_iter().next().unwrap().proxy;
    a.restart();
    a.wait_ready();
}

/// Continuous traffic between the proxies: `churners` threads opening, using and closing tunnels, and two
/// long-lived tunnels sending every 100 ms.
struct Traffic {
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Traffic {
    fn start(nodes: &[Node], churners: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        let pairs: Vec<(SocketAddr, SocketAddr)> =
            (0..nodes.len()).map(|i| (nodes[i].proxy.socks5_addr, nodes[(i + 1) % nodes.len()].echo)).collect();
        let mut threads = Vec::new();
        for i in 0..churners {
            let (socks5, echo) = pairs[i % pairs.len()];
            let (stop, opened) = (stop.clone(), opened.clone());
            threads.push(std::thread::spawn(move || {
                let mut bytes = 0u64;
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let data: Vec<u8> = (0..(1024 + (i * 97 + n * 31) % 15000)).map(|k| (k * 7 + i) as u8).collect();
                    let stream = socks::connect(socks5, echo).map_err(|e| format!("churner {i} connect {n}: {e:?}"))?;
                    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let back = socks::echo_round_trip(stream, &data);
                    if back != data {
                        return Err(format!("churner {i} connection {n}: {} bytes back of {}", back.len(), data.len()));
                    }
                    bytes += data.len() as u64;
                    n += 1;
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                Ok(bytes)
            }));
        }
        for j in 0..2 {
            let (socks5, echo) = pairs[j % pairs.len()];
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut stream = socks::connect(socks5, echo).map_err(|e| format!("long-lived {j}: {e:?}"))?;
                stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut bytes = 0u64;
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let message = format!("long-lived {j} message {seq}\n");
                    round_trip(&mut stream, message.as_bytes()).map_err(|e| format!("long-lived {j} at {seq}: {e}"))?;
                    bytes += message.len() as u64;
                    seq += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(bytes)
            }));
        }
        Self { stop, opened, threads }
    }

    /// Waits until `more` further tunnels opened and closed (traffic goes on after whatever happened last).
    fn wait_more(&self, more: u64) {
        let target = self.opened.load(Ordering::Relaxed) + more;
        wait_for("more tunnelled connections", Duration::from_secs(60), || {
            (self.opened.load(Ordering::Relaxed) >= target).then_some(())
        });
    }

    /// Stops; returns (connections opened, bytes echoed) or every failure.
    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut bytes = 0;
        let mut failures = Vec::new();
        for t in self.threads {
            match t.join().expect("traffic thread") {
                Ok(b) => bytes += b,
                Err(e) => failures.push(e),
            }
        }
        (self.opened.load(Ordering::Relaxed), bytes, failures)
    }
}

#[test]
fn root_rotation_under_load_fails_no_connection_and_ends_under_the_new_root_only() {
    let cp = ControlPlane::start(&[]);
    let nodes = mesh(&cp, 3);
    let old_root = root_pem(&cp, "ca");
    let traffic = Traffic::start(&nodes, 20);
    traffic.wait_more(50);

    let started = Instant::now();
    let out =
        finish_ctl(&cp, spawn_ctl(&cp, &["ca", "rotate", "--overlap", "3s", "-o", "json"]), Duration::from_secs(60));
    let seconds = started.elapsed().as_secs_f64();
    let phases: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(phases.last().unwrap()["event"], "done", "{out}");
    traffic.wait_more(50);
    let (opened, bytes, failures) = traffic.finish();
    println!(
        "rotation with 3 proxies under load: {seconds:.2}s; {opened} tunnels opened and closed, {bytes} bytes echoed"
    );
    println!("phases: {out}");
    assert!(failures.is_empty(), "failed connections during the rotation: {failures:#?}");

    let new_root = root_pem(&cp, "ca-1");
    for n in &nodes {
        assert_only_new_root(&n.proxy, &old_root, &new_root);
    }
    let status = ca_status(&cp);
    assert_eq!(status["phase"], "done");
    let roots: Vec<&str> = status["roots"].as_array().unwrap().iter().map(|r| r["sha256"].as_str().unwrap()).collect();
    assert_eq!(roots, [sha256_hex(&pem_der(&new_root))]);
    // The admin config follows: trellisctl still works, trusting the new root only.
    let admin: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(cp.admin_config()).unwrap()).unwrap();
    assert_eq!(pem_der(admin["caBundle"].as_str().unwrap()), pem_der(&new_root));
}

#[test]
fn a_rotation_killed_in_each_phase_resumes_and_completes() {
    let mut cp = ControlPlane::start(&["--rotation-hold", "prepare"]);
    let nodes = mesh(&cp, 2);
    let old_root = root_pem(&cp, "ca");
    let mut tunnel = socks::connect_ok(nodes[0].proxy.socks5_addr, nodes[1].echo);
    // One `ca rotate`, started before the first kill, follows the rotation through every restart to its end.
    let cli = spawn_ctl(&cp, &["ca", "rotate", "--overlap", "1h"]);

    // Each phase: the rotation holds there; kill -9; restart holding at the next one (the last: no hold).
    for (phase, next_hold) in [("prepare", "switch"), ("switch", "overlap"), ("overlap", "retire"), ("retire", "")] {
        let status = wait_phase(&cp, phase);
        if phase == "prepare" {
            // The proxies have the new root before the control plane dies.
            for n in &nodes {
                n.proxy.wait_config("both roots", |d| d["roots"].as_array().is_some_and(|r| r.len() == 2));
            }
        }
        if phase == "switch" {
            // Every proxy by name: the restarted control plane lists only the proxies that reconnected since,
            // and a proxy still in its reconnect backoff must renew too before the overlap is forced to an end.
            wait_for("both proxies to renew under the new CA", Duration::from_secs(30), || {
                let s = ca_status(&cp);
                let proxies = s["proxies"].as_array().unwrap();
                nodes
                    .iter()
                    .all(|n| {
                        proxies.iter().any(|p| {
                            p["node"] == n.proxy.node.as_str()
                                && p["connected"] == true
                                && p["reported"] == true
                                && p["oldCertificates"] == 0
                        })
                    })
                    .then_some(())
            });
        }
        println!("killing the control plane in phase {phase}: {}", status["waitingFor"]);
        cp.kill9();
        let hold: Vec<&str> = if next_hold.is_empty() { vec![] } else { vec!["--rotation-hold", next_hold] };
        cp.restart_with(&hold);
        if phase == "overlap" {
            // The overlap is an hour: end it now (the rotation then holds in retire).
            cp.ctl_ok(&["ca", "rotate", "--force", "--detach"]);
        }
        round_trip(&mut tunnel, phase.as_bytes()).expect("the open tunnel across the restart");
    }
    // The control plane resumed it each time; the command saw it through.
    let out = finish_ctl(&cp, cli, Duration::from_secs(60));
    assert!(out.contains("rotation 1 done"), "{out}");
    println!("trellisctl ca rotate across four kill -9s:\n{out}");
    let new_root = root_pem(&cp, "ca-1");
    for n in &nodes {
        n.proxy.wait_config("only the new root", |d| d["roots"].as_array().is_some_and(|r| r.len() == 1));
        assert_only_new_root(&n.proxy, &old_root, &new_root);
    }
    let status = ca_status(&cp);
    let history: Vec<&str> =
        status["history"].as_array().unwrap().iter().map(|e| e["phase"].as_str().unwrap()).collect();
    assert_eq!(history, ["prepare", "switch", "overlap", "retire", "done"]);
    round_trip(&mut tunnel, b"after").expect("the open tunnel after the rotation");
    assert_eq!(socks::echo_round_trip(socks::connect_ok(nodes[0].proxy.socks5_addr, nodes[1].echo), b"new"), b"new");
}

#[test]
fn a_proxy_away_during_prepare_and_switch_rejoins_and_converges() {
    let cp = ControlPlane::start(&[]);
    let mut nodes = mesh(&cp, 3);
    let old_root = root_pem(&cp, "ca");
    assert!(nodes[2].proxy.terminate(Duration::from_secs(30)), "node-3 stops");
    cp.ctl_ok(&["ca", "rotate", "--detach", "--overlap", "1h"]);
    // Prepare and switch complete without it.
    let status = wait_phase(&cp, "overlap");
    let away = status["proxies"].as_array().unwrap().iter().find(|p| p["node"] == "node-3").unwrap().clone();
    assert_eq!((away["connected"].clone(), away["oldCertificates"].clone()), (false.into(), 2.into()), "{status}");
    // The control plane's gauges say the same: in the overlap, one proxy (node-3; the control: the two connected
    // ones renewed) still holds certificates of the old CA.
    wait_metric(cp.metrics_addr, "trellis_rotation_phase", &["phase=\"overlap\""], 1.0);
    assert_eq!(metric(cp.metrics_addr, "trellis_rotation_phase", &[]), 1.0, "one phase at a time");
    wait_metric(cp.metrics_addr, "trellis_rotation_proxies_holding_old_ca", &[], 1.0);
    // And each connected proxy counted its renewals: the node credential and the workload SVID (issued, then
    // renewed at the switch); nothing refused or failed.
    for n in &nodes[..2] {
        let m = n.proxy.metrics_addr;
        let renewals = |labels: &[&str]| metric(m, "trellis_certificate_renewals_total", labels);
        assert!(renewals(&["kind=\"node\"", "outcome=\"renewed\""]) >= 1.0, "{}", n.proxy.node);
        assert!(renewals(&["kind=\"workload\"", "outcome=\"renewed\""]) >= 2.0, "{}", n.proxy.node);
        assert_eq!(renewals(&["outcome=\"refused\""]) + renewals(&["outcome=\"failed\""]), 0.0);
    }
    // Its state dir trusts only the old root; it comes back and verifies the control plane anyway (the serving
    // chain carries the new CA cross-signed by the old one), then renews what the old CA signed.
    let stored = std::fs::read_to_string(nodes[2].proxy.state_dir().join("trust-bundle.pem")).unwrap();
    assert_eq!(pem_der(&stored), pem_der(&old_root));
    nodes[2].proxy.restart();
    nodes[2].proxy.wait_ready();
    wait_for("node-3 to hold only certificates of the new CA", Duration::from_secs(30), || {
        let s = ca_status(&cp);
        let p = s["proxies"].as_array().unwrap().iter().find(|p| p["node"] == "node-3").cloned()?;
        (p["connected"] == true && p["reported"] == true && p["oldCertificates"] == 0).then_some(())
    });
    wait_metric(cp.metrics_addr, "trellis_rotation_proxies_holding_old_ca", &[], 0.0);
    assert_eq!(socks::echo_round_trip(socks::connect_ok(nodes[0].proxy.socks5_addr, nodes[2].echo), b"x"), b"x");
    assert_eq!(socks::echo_round_trip(socks::connect_ok(nodes[2].proxy.socks5_addr, nodes[0].echo), b"y"), b"y");
    let out = finish_ctl(&cp, spawn_ctl(&cp, &["ca", "rotate", "--force"]), Duration::from_secs(60));
    assert!(out.contains("rotation 1 done"), "{out}");
    let new_root = root_pem(&cp, "ca-1");
    for n in &nodes {
        n.proxy.wait_config("only the new root", |d| d["roots"].as_array().is_some_and(|r| r.len() == 1));
        assert_only_new_root(&n.proxy, &old_root, &new_root);
    }
    assert_eq!(socks::echo_round_trip(socks::connect_ok(nodes[2].proxy.socks5_addr, nodes[1].echo), b"z"), b"z");
    wait_metric(cp.metrics_addr, "trellis_rotation_phase", &["phase=\"done\""], 1.0);
    assert_eq!(metric(cp.metrics_addr, "trellis_rotation_phase", &[]), 1.0, "one phase at a time");
}

#[test]
fn prepare_waits_for_every_connected_proxy_to_ack_the_new_root() {
    let cp = ControlPlane::start(&[]);
    let nodes = mesh(&cp, 2);
    let frozen = nodes[1].proxy.pid().expect("node-2 runs").to_string();
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill").args([sig, &frozen]).status().expect("kill").success());
    };
    // node-2 stays connected but answers nothing.
    signal("-STOP");
    let cli = spawn_ctl(&cp, &["ca", "rotate", "--force"]);
    // node-1 ACKs; node-2, the only one missing, is waited for: the rotation stays in prepare (the new CA does not
    // sign yet).
    let status = wait_for("only node-2 missing", Duration::from_secs(30), || {
        let s = ca_status(&cp);
        let waiting = s["waitingFor"].as_str()?;
        (waiting.starts_with("1 proxies to ACK version") && waiting.ends_with(": node-2")).then_some(s)
    });
    assert_eq!(status["phase"], "prepare", "{status}");
    signal("-CONT");
    let out = finish_ctl(&cp, cli, Duration::from_secs(60));
    assert!(out.contains("rotation 1 done"), "{out}");
}

/// An operator CA made with openssl in `dir`: `root.pem`/`root.key` and intermediates `int1` and `int2` under it
/// (`intN.pem`, `intN.key`). Returns the paths, as text, by name.
fn operator_ca(dir: &std::path::Path) -> impl Fn(&str) -> String + '_ {
    let p = move |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    std::fs::write(p("ca.ext"), "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n").unwrap();
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("root.key")]);
    let root = ["req", "-x509", "-new", "-key", &p("root.key"), "-subj", "/O=corp/CN=Corp Root", "-days", "30"];
    openssl(&[&root[..], &["-out", &p("root.pem")]].concat());
    for int in ["int1", "int2"] {
        let (key, csr, pem) = (p(&format!("{int}.key")), p(&format!("{int}.csr")), p(&format!("{int}.pem")));
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key]);
        openssl(&["req", "-new", "-key", &key, "-subj", &format!("/O=corp/CN=Mesh {int}"), "-out", &csr]);
        let (root_pem, root_key, ext) = (p("root.pem"), p("root.key"), p("ca.ext"));
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &root_pem,
            "-CAkey",
            &root_key,
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }
    p
}

fn metric(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let (status, body) = http::get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    trellis_tests::prometheus::sum_samples(&body, name, labels)
}

fn wait_metric(addr: SocketAddr, name: &str, labels: &[&str], expected: f64) {
    wait_for(&format!("{name}{labels:?} == {expected}"), Duration::from_secs(30), || {
        (metric(addr, name, labels) == expected).then_some(())
    });
}

/// The same `trellisctl ca rotate` with `--ca-cert` naming a new intermediate under the operator root in use: the
/// trust bundle never changes (one root throughout), every certificate is renewed under the new intermediate, and
/// the tunnel open across it and new ones work.
#[test]
fn an_intermediate_only_rotation_under_the_same_operator_root_renews_everything_under_the_new_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    let p = operator_ca(dir.path());
    let cp = ControlPlane::start_init(
        &["--ca-cert", &p("int1.pem"), "--ca-key", &p("int1.key"), "--ca-chain", &p("root.pem")],
        &[],
    );
    let nodes = mesh(&cp, 2);
    let root = std::fs::read_to_string(p("root.pem")).unwrap();
    let (int1, int2) = (
        sha256_hex(&pem_der(&std::fs::read_to_string(p("int1.pem")).unwrap())),
        sha256_hex(&pem_der(&std::fs::read_to_string(p("int2.pem")).unwrap())),
    );
    // Before: everything under int1 (the control for the check below).
    for n in &nodes {
        for (id, chain) in held_chains(&n.proxy) {
            assert_eq!(chain[1]["sha256"], int1.as_str(), "{}: {id} before", n.proxy.node);
        }
    }
    let mut tunnel = socks::connect_ok(nodes[0].proxy.socks5_addr, nodes[1].echo);
    round_trip(&mut tunnel, b"before").unwrap();

    let args = ["ca", "rotate", "--ca-cert", &p("int2.pem"), "--ca-key", &p("int2.key"), "--ca-chain", &p("root.pem")];
    let out = finish_ctl(&cp, spawn_ctl(&cp, &[&args[..], &["--overlap", "1s"]].concat()), Duration::from_secs(60));
    assert!(out.contains("rotation 1 done"), "{out}");
    println!("intermediate-only rotation:\n{out}");

    let root_sha = sha256_hex(&pem_der(&root));
    let status = ca_status(&cp);
    let roots: Vec<&str> = status["roots"].as_array().unwrap().iter().map(|r| r["sha256"].as_str().unwrap()).collect();
    assert_eq!(roots, [root_sha.as_str()], "one root, the operator's, throughout");
    for n in &nodes {
        let bundle: Vec<String> = certs(&n.proxy)["trust_bundle"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["sha256"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(bundle, [root_sha.as_str()], "{}: /certs trust bundle", n.proxy.node);
        for (id, chain) in held_chains(&n.proxy) {
            assert_eq!(chain[1]["sha256"], int2.as_str(), "{}: {id} is not under the new intermediate", n.proxy.node);
            assert!(openssl_verifies(&root, &chain), "{}: {id} does not verify against the root", n.proxy.node);
        }
    }
    round_trip(&mut tunnel, b"after").expect("the open tunnel across the rotation");
    assert_eq!(socks::echo_round_trip(socks::connect_ok(nodes[1].proxy.socks5_addr, nodes[0].echo), b"new"), b"new");
}
