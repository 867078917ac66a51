//! Revocation with real processes: `trellisctl nodes revoke` and `trellisctl revoke --spiffe-id` reach every proxy,
//! which closes the open connections of the revoked peer (both directions) and refuses new handshakes with it,
//! saying why; the control plane refuses the revoked node's stream, join and CSRs, and the revoked identity's CSRs.
//! Admin credentials: a revoked admin's calls are refused at once, on a connection it already had open too. Each
//! refusal is checked beside a control case through the same path. Times from the revoke command to the teardown
//! are printed, never asserted.

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use trellis_proto::tls::ClientIdentity;
use trellis_proto::v1 as pb;
use trellis_tests::outcome::{Outcome, Refusal};
use trellis_tests::prometheus::sum_samples;
use trellis_tests::{ControlPlane, Echo, HttpEcho, Proxy, WorkloadSpec, client, http, read_log, socks, wait_for};

const WAIT: Duration = Duration::from_secs(20);
const TD: &str = "cluster.local";

fn spiffe(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

fn workload(name: &str, ip: &str, echo: Option<&Echo>) -> WorkloadSpec {
    let mut spec = WorkloadSpec::new(name, "shop", name, ip);
    if let Some(echo) = echo {
        spec.ports = vec![(echo.addr.port(), "tcp")];
    }
    spec
}

/// A tunnel through `proxy`'s SOCKS5 listener to `target`, checked with one echo round trip.
fn open(proxy: &Proxy, target: SocketAddr) -> TcpStream {
    let stream = socks::connect_ok(proxy.socks5_addr, target);
    round_trip(&stream, b"ping")
}

fn round_trip(stream: &TcpStream, message: &[u8]) -> TcpStream {
    use std::io::Write;
    let mut stream = stream.try_clone().unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(message).unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).expect("the echo");
    assert_eq!(back, message);
    stream
}

/// Reads until the tunnel ends (EOF or reset) in a thread; the handle yields how long after `since` that was.
fn watch_end(stream: &TcpStream, since: Instant) -> std::thread::JoinHandle<Result<Duration, String>> {
    let mut stream = stream.try_clone().unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 1024];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => return Ok(since.elapsed()),
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(format!("still open after {WAIT:?}"));
                }
                Err(_) => return Ok(since.elapsed()),
            }
        }
    })
}

fn metrics(proxy: &Proxy) -> String {
    http::get(proxy.metrics_addr, "/metrics").expect("metrics").1
}

fn wait_log(what: &str, path: &std::path::Path, needles: &[&str]) -> String {
    wait_for(what, WAIT, || {
        let log = read_log(path);
        needles.iter().all(|n| log.contains(n)).then_some(log)
    })
}

/// The proxy's node credential from its state dir, as a raw client to the control plane.
fn node_credential(cp: &ControlPlane, proxy: &Proxy) -> client::Joined {
    let dir = proxy.state_dir();
    let key = std::fs::read_to_string(dir.join("node-key.pem")).expect("node key");
    let chain = std::fs::read_to_string(dir.join("node-chain.pem")).expect("node chain");
    client::Joined {
        addr: cp.addr.to_string(),
        key: rcgen::KeyPair::from_pem(&key).expect("node key parses"),
        chain: client::pem_certs(&chain),
        roots: client::pem_certs(&cp.root_pem()),
        namespaces: vec!["shop".into()],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_node_loses_its_tunnels_both_ways_and_cannot_get_certificates() {
    let cp = ControlPlane::start(&[]);
    let echo_a = Echo::start("127.0.12.1:0".parse().unwrap());
    let echo_b = Echo::start("127.0.12.2:0".parse().unwrap());
    let a = Proxy::start(&cp, "node-a", &[workload("web", "127.0.12.1", Some(&echo_a))]);
    let b = Proxy::start(&cp, "node-b", &[workload("api", "127.0.12.2", Some(&echo_b))]);
    let c = Proxy::start(&cp, "node-c", &[workload("batch", "127.0.12.3", None)]);
    for (proxy, other) in [(&a, "127.0.12.2"), (&b, "127.0.12.1"), (&c, "127.0.12.2")] {
        proxy.wait_ready();
        proxy.wait_config("the other nodes' workloads", |d| d["workloads"].to_string().contains(other));
    }
    let a_serial = a.config_dump()["certificates"][0]["serial"].as_str().unwrap().to_owned();

    // Tunnels both ways between A and B, and the control: C → B.
    let a_to_b = open(&a, echo_b.addr);
    let b_to_a = open(&b, echo_a.addr);
    let c_to_b = open(&c, echo_b.addr);

    let revoked_at = Instant::now();
    cp.ctl_ok(&["nodes", "revoke", "node-a"]);
    let (from_a, to_a) = (watch_end(&a_to_b, revoked_at), watch_end(&b_to_a, revoked_at));
    let from_a = from_a.join().unwrap().expect("A → B closed");
    let to_a = to_a.join().unwrap().expect("B → A closed");
    println!(
        "revoke command -> tunnel A→B closed at A's client: {from_a:?}; tunnel B→A closed at B's client: {to_a:?}"
    );

    // The control: C's tunnel to B, through the same proxy B, is untouched.
    round_trip(&c_to_b, b"still here");

    // Both ends: B closed the HBONE connection from A and its pooled connection to A, and says why in its log and
    // access log; A saw both streams end (its access log reports them).
    let reason = format!("peer certificate {a_serial} was issued to revoked node");
    let b_log = wait_log(
        "B's teardown in its log",
        &b.log_path(),
        &["HBONE connection closed", "pooled HBONE connection closed"],
    );
    assert!(b_log.contains(&format!("closed by the proxy: {reason}")), "{b_log}");
    let a_log =
        wait_log("A's ends of both tunnels", &a.log_path(), &["reporter=\"source\"", "reporter=\"destination\""]);
    let ended_at_a = a_log.lines().filter(|l| l.contains("connection") && l.contains("bytes_sent")).count();
    assert!(ended_at_a >= 2, "A reported both tunnels' ends: {a_log}");
    let metrics_b = metrics(&b);
    assert!(
        sum_samples(&metrics_b, "trellis_revocations_total", &["kind=\"node\"", "action=\"closed\""]) >= 2.0,
        "{metrics_b}"
    );

    // A new tunnel from A is refused by B's verifier, with the reason at B; C's new tunnel to B passes.
    match socks::connect(a.socks5_addr, echo_b.addr) {
        Err(Outcome::Refused(Refusal::Socks5(_))) => {}
        other => panic!("A's new tunnel was not refused: {:?}", other.map(|_| "connected")),
    }
    // A refused handshake is logged once, as its access-log entry (TLS_FAILURE with the reason).
    let refused_handshake = format!("TLS handshake refused: {reason}");
    let b_log = wait_log("B's refusal of A's handshake", &b.log_path(), &[&refused_handshake]);
    let refusal = b_log.lines().find(|l| l.contains(&refused_handshake)).unwrap();
    assert!(refusal.contains("response_flags=\"TLS_FAILURE\""), "{refusal}");
    assert_eq!(socks::echo(c.socks5_addr, echo_b.addr, b"control"), Outcome::Passed);
    let metrics_b = metrics(&b);
    assert!(
        sum_samples(&metrics_b, "trellis_revocations_total", &["kind=\"node\"", "action=\"refused\""]) >= 1.0,
        "{metrics_b}"
    );

    // The control plane: A's credential gets no stream (so no CSR is signed for it) and A cannot join again,
    // while C's credential, through the same calls, gets a stream and a certificate.
    let revoked = node_credential(&cp, &a);
    let status = revoked.discover(client::hello(vec![])).await.unwrap().err().expect("A's stream refused");
    assert_eq!((status.code(), status.message()), (tonic::Code::PermissionDenied, "node \"node-a\" was revoked"));
    let (token, pin) = cp.token("node-a", &["shop"], &["--reusable"]);
    let status = client::join(&cp.addr.to_string(), &pin, &token, "node-a").await.unwrap().err().expect("join refused");
    assert_eq!((status.code(), status.message()), (tonic::Code::PermissionDenied, "node \"node-a\" was revoked"));
    let control = node_credential(&cp, &c);
    let hello = client::hello(vec![client::workload("batch", "shop", "batch", "127.0.12.3")]);
    let mut stream = control.discover(hello).await.unwrap().expect("C's stream");
    let (_key, csr) = client::csr(&[&spiffe("batch")]);
    let answer = stream.certify(1, csr).await;
    assert_eq!(answer.error, "", "C's CSR is signed");
    assert!(!answer.certificate_chain.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_identity_loses_its_tunnels_and_certificates_while_another_of_its_node_keeps_them() {
    let cp = ControlPlane::start(&[]);
    let echo_api = Echo::start("127.0.13.2:0".parse().unwrap());
    let echo_other = Echo::start("127.0.13.4:0".parse().unwrap());
    let a = Proxy::start(&cp, "node-a", &[workload("web", "127.0.13.1", None)]);
    // Node B fronts two identities: api (to be revoked) and other (the control, same node, same path).
    let b = Proxy::start(
        &cp,
        "node-b",
        &[workload("api", "127.0.13.2", Some(&echo_api)), workload("other", "127.0.13.4", Some(&echo_other))],
    );
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-b's workloads", |d| {
        let text = d["workloads"].to_string();
        text.contains("127.0.13.2") && text.contains("127.0.13.4")
    });
    let to_api = open(&a, echo_api.addr);
    let to_other = open(&a, echo_other.addr);

    let revoked_at = Instant::now();
    cp.ctl_ok(&["revoke", "--spiffe-id", &spiffe("api")]);
    let took = watch_end(&to_api, revoked_at).join().unwrap().expect("the tunnel to api closed");
    println!("revoke --spiffe-id command -> tunnel to the revoked identity closed at the client: {took:?}");
    round_trip(&to_other, b"still here");

    // A (the client side) closed its pooled connection to the revoked server identity, and says why.
    let reason = format!("peer identity {} was revoked", spiffe("api"));
    let a_log = wait_log("A's teardown", &a.log_path(), &["pooled HBONE connection closed"]);
    assert!(a_log.contains(&format!("closed by the proxy: {reason}")), "{a_log}");

    // New tunnels: to api refused by A's verifier with the reason at A; to other (same node B) passes.
    match socks::connect(a.socks5_addr, echo_api.addr) {
        Err(Outcome::Refused(Refusal::Socks5(_))) => {}
        other => panic!("the new tunnel to api was not refused: {:?}", other.map(|_| "connected")),
    }
    let a_log = wait_log("A's refusal", &a.log_path(), &["TLS_FAILURE"]);
    let refusal = a_log.lines().find(|l| l.contains("TLS_FAILURE")).unwrap();
    assert!(refusal.contains(&reason), "{refusal}");
    assert_eq!(socks::echo(a.socks5_addr, echo_other.addr, b"control"), Outcome::Passed);
    let metrics_a = metrics(&a);
    assert!(sum_samples(&metrics_a, "trellis_revocations_total", &["kind=\"identity\"", "action=\"refused\""]) >= 1.0);

    // Renewal: api's CSR is refused by the control plane with the reason; other's, the same way, is signed.
    cp.ctl_ok(&["renew", "--node", "node-b", "--spiffe-id", &spiffe("api")]);
    let log = wait_log("the control plane's refusal", &cp.log_path(), &["CSR refused"]);
    let refusal = log.lines().find(|l| l.contains("CSR refused")).unwrap();
    assert!(refusal.contains(&format!("identity {} was revoked", spiffe("api"))), "{refusal}");
    // B counts the refusal as such (trellis_certificate_renewals_total{kind="workload",outcome="refused"}).
    wait_for("B's count of the refused renewal", WAIT, || {
        let m = metrics(&b);
        (sum_samples(&m, "trellis_certificate_renewals_total", &["kind=\"workload\"", "outcome=\"refused\""]) >= 1.0)
            .then_some(())
    });
    let signed_before = read_log(&cp.log_path()).matches(&spiffe("other")).count();
    cp.ctl_ok(&["renew", "--node", "node-b", "--spiffe-id", &spiffe("other")]);
    wait_for("other's renewal signed", WAIT, || {
        (read_log(&cp.log_path()).matches(&spiffe("other")).count() > signed_before).then_some(())
    });
    let (_, cp_metrics) = http::get(cp.metrics_addr, "/metrics").unwrap();
    assert!(sum_samples(&cp_metrics, "trellis_certificates_refused_total", &["reason=\"revoked\""]) >= 1.0);
    let listed = cp.ctl_json(&["revoke"]);
    assert_eq!(listed["identities"][0]["spiffeId"], spiffe("api"));
}

/// L7: an HTTP/1.1 keep-alive connection on an `http` port, which the destination proxy serves request by request
/// (no byte tunnel to close): revoking the client's identity closes it at the destination proxy, which says why,
/// and the client sees its end; the control, a keep-alive from another identity to the same port through the same
/// destination proxy, stays up and serves its next request.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_identity_loses_its_http_keep_alive_connection_while_another_identity_keeps_its_own() {
    let cp = ControlPlane::start(&[]);
    let echo = HttpEcho::start("127.0.15.2:0".parse().unwrap());
    let mut api = workload("api", "127.0.15.2", None);
    api.ports = vec![(echo.addr.port(), "http")];
    let b = Proxy::start(&cp, "node-b", &[api]);
    let a = Proxy::start(&cp, "node-a", &[workload("web", "127.0.15.1", None)]);
    let c = Proxy::start(&cp, "node-c", &[workload("batch", "127.0.15.3", None)]);
    for proxy in [&a, &b, &c] {
        proxy.wait_ready();
    }
    for proxy in [&a, &c] {
        proxy.wait_config("api in the registry", |d| d["workloads"].to_string().contains("127.0.15.2"));
    }
    let get = |conn: &mut http::Conn, path: &str| {
        let response = conn.request("GET", path, "api.shop", &[]);
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.json()["target"], path, "{response:?}");
    };
    let (from_web, from_batch) =
        (socks::connect_ok(a.socks5_addr, echo.addr), socks::connect_ok(c.socks5_addr, echo.addr));
    let (mut web, mut batch) = (http::Conn::new(from_web.try_clone().unwrap()), http::Conn::new(from_batch));
    get(&mut web, "/first");
    get(&mut batch, "/first");

    let revoked_at = Instant::now();
    cp.ctl_ok(&["revoke", "--spiffe-id", &spiffe("web")]);
    let took = watch_end(&from_web, revoked_at).join().unwrap().expect("web's keep-alive closed");
    println!("revoke --spiffe-id command -> web's HTTP keep-alive connection closed at the client: {took:?}");

    // The destination end: B closed the HBONE connection carrying it, saying why.
    let reason = format!("peer identity {} was revoked", spiffe("web"));
    let b_log = wait_log("B's teardown", &b.log_path(), &["HBONE connection closed"]);
    assert!(b_log.contains(&format!("closed by the proxy: {reason}")), "{b_log}");
    // The control: batch's keep-alive, through the same proxy B to the same port, serves its next request.
    get(&mut batch, "/second");
    // A new connection of web is refused at B's handshake; batch's new one passes.
    match socks::connect(a.socks5_addr, echo.addr) {
        Err(Outcome::Refused(Refusal::Socks5(_))) => {}
        other => panic!("web's new connection was not refused: {:?}", other.map(|_| "connected")),
    }
    get(&mut http::Conn::new(socks::connect_ok(c.socks5_addr, echo.addr)), "/third");
    let metrics_b = metrics(&b);
    assert!(
        sum_samples(&metrics_b, "trellis_revocations_total", &["kind=\"identity\"", "action=\"closed\""]) >= 1.0,
        "{metrics_b}"
    );
}

/// A channel to the control plane with the credential of a `trellisctl` config file.
async fn admin_channel(cp: &ControlPlane, config: &std::path::Path) -> tonic::transport::Channel {
    let text = std::fs::read_to_string(config).unwrap();
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
    let key = rcgen::KeyPair::from_pem(yaml["key"].as_str().unwrap()).unwrap();
    let identity =
        ClientIdentity { chain: client::pem_certs(yaml["certificate"].as_str().unwrap()), key: client::key_der(&key) };
    client::connect(&cp.addr.to_string(), client::pem_certs(&cp.root_pem()), Some(identity)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_admin_is_refused_at_once_even_on_an_open_connection_while_another_admin_works() {
    let cp = ControlPlane::start(&[]);
    let ops = cp.dir.path().join("ops.yaml");
    let out = cp.ctl_ok(&["admin", "create", "ops", "-o", ops.to_str().unwrap()]);
    assert!(out.contains("admin ops created"), "{out}");
    let as_ops = |args: &[&str]| {
        std::process::Command::new(trellis_tests::bin("trellisctl"))
            .arg("--config")
            .arg(&ops)
            .args(args)
            .output()
            .unwrap()
    };
    // Control: the new admin's calls work, with trellisctl and on a connection the test keeps open.
    assert!(as_ops(&["get", "ap", "-A"]).status.success());
    let mut open = pb::admin_client::AdminClient::new(admin_channel(&cp, &ops).await);
    open.list(pb::ListRequest::default()).await.expect("ops may list before the revocation");

    cp.ctl_ok(&["admin", "revoke", "ops"]);
    let refused = as_ops(&["get", "ap", "-A"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Unauthenticated: admin credential \"ops\" was revoked"), "{stderr}");
    // The connection opened before the revocation: its next call is refused too (checked per call).
    let status = open.list(pb::ListRequest::default()).await.expect_err("refused on the open connection");
    assert_eq!(
        (status.code(), status.message()),
        (tonic::Code::Unauthenticated, "admin credential \"ops\" was revoked")
    );
    // Control: the other admin's call, through the same command.
    cp.ctl_ok(&["get", "ap", "-A"]);

    let admins = cp.ctl_json(&["admin", "list"]);
    let names: Vec<(&str, bool)> = admins
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap(), a["revoked"].as_bool().unwrap()))
        .collect();
    assert_eq!(names, [("admin", false), ("ops", true)]);
    let last = cp.ctl_err(&["admin", "revoke", "admin"]);
    assert!(last.contains("FailedPrecondition: admin \"admin\" is the only admin that is not revoked"), "{last}");
}

/// The revocation-to-teardown figure of BENCHMARKS.md: node-b fronts one identity per trial; each trial opens a
/// tunnel from node-a to it, revokes the identity with one `Admin.RevokeIdentity` call and measures until the
/// client sees its tunnel end (the control plane's push, node-a's verifier list swap and teardown included). Prints
/// p50/p99; asserts only that every tunnel was closed. `TRELLIS_REVOCATION_TRIALS` changes the count (default 100).
#[tokio::test(flavor = "multi_thread")]
async fn revocation_to_teardown_latency() {
    let trials: usize = std::env::var("TRELLIS_REVOCATION_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(100);
    assert!((1..=250).contains(&trials), "TRELLIS_REVOCATION_TRIALS must be 1..=250");
    let cp = ControlPlane::start(&[]);
    let echo = Echo::start("0.0.0.0:0".parse().unwrap());
    let ip = |i: usize| format!("127.0.14.{}", i + 1);
    let targets: Vec<WorkloadSpec> = (0..trials)
        .map(|i| {
            let mut spec = WorkloadSpec::new(&format!("t{i}"), "shop", &format!("t{i}"), &ip(i));
            spec.ports = vec![(echo.addr.port(), "tcp")];
            spec
        })
        .collect();
    let b = Proxy::start(&cp, "node-b", &targets);
    let a = Proxy::start(&cp, "node-a", &[workload("web", "127.0.14.251", None)]);
    a.wait_ready();
    b.wait_ready();
    let last = ip(trials - 1);
    a.wait_config("every target in node-a's registry", |d| d["workloads"].to_string().contains(&format!("\"{last}\"")));
    let mut admin = pb::admin_client::AdminClient::new(admin_channel(&cp, &cp.admin_config()).await);
    let mut took = Vec::with_capacity(trials);
    for i in 0..trials {
        let target: SocketAddr = format!("{}:{}", ip(i), echo.addr.port()).parse().unwrap();
        let stream = open(&a, target);
        let started = Instant::now();
        let end = watch_end(&stream, started);
        admin.revoke_identity(pb::RevokeIdentityRequest { spiffe_id: spiffe(&format!("t{i}")) }).await.unwrap();
        took.push(end.join().unwrap().unwrap_or_else(|e| panic!("trial {i}: {e}")));
    }
    print_quantiles("workload identity revocation to teardown (client end)", took);
}

/// Prints p50, p99 and max of `took` (a nearest-rank quantile: the smallest value at or above that fraction).
fn print_quantiles(what: &str, mut took: Vec<Duration>) {
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "{what} over {} trials: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        took.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        took.last().unwrap().as_secs_f64() * 1e3
    );
}

/// The same figure for a node: each trial a new node joins (a raw client: its own token, node credential and
/// discovery stream), gets a workload SVID, and opens an HBONE connection with it to node-b's workload, carrying one
/// CONNECT; then one `Admin.RevokeNode` call, measured until node-b has closed that connection (the client sees its
/// end). The control, a connection of a node never revoked, through the same node-b, stays open and serves a
/// CONNECT at the end. Prints p50/p99; asserts only that each revoked node's connection was closed, by node-b,
/// saying why.
#[tokio::test(flavor = "multi_thread")]
async fn node_revocation_to_teardown_latency() {
    let trials: usize = std::env::var("TRELLIS_REVOCATION_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(100);
    assert!((1..=250).contains(&trials), "TRELLIS_REVOCATION_TRIALS must be 1..=250");
    let cp = ControlPlane::start(&[]);
    let echo = Echo::start("127.0.16.1:0".parse().unwrap());
    let b = Proxy::start(&cp, "node-b", &[workload("api", "127.0.16.1", Some(&echo))]);
    b.wait_ready();
    let b_hbone: SocketAddr = format!("127.0.16.1:{}", b.hbone_port).parse().unwrap();
    let roots = trellis_tests::hbone::roots(&cp.root_pem());
    let mut admin = pb::admin_client::AdminClient::new(admin_channel(&cp, &cp.admin_config()).await);
    let target = echo.addr.to_string();

    // A node as a raw client: joined, its stream open (declaring one workload of service account `sim`), an SVID
    // for it, and an HBONE connection to node-b presenting that SVID, checked with one CONNECT.
    let node = async |admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>, i: usize| {
        let name = format!("sim-{i}");
        let request = pb::CreateTokenRequest {
            node: name.clone(),
            namespaces: vec!["shop".into()],
            ttl_seconds: 600,
            reusable: false,
        };
        let token = admin.create_token(request).await.unwrap().into_inner();
        let joined = client::join(&cp.addr.to_string(), &token.ca_pin, &token.token, &name).await.unwrap().unwrap();
        let address = format!("10.201.{}.{}", i / 250, 1 + i % 250);
        let hello = client::hello(vec![client::workload(&name, "shop", "sim", &address)]);
        let mut stream = joined.discover(hello).await.unwrap().expect("the node's stream");
        let (key, csr) = client::csr(&[&spiffe("sim")]);
        let answer = stream.certify(1, csr).await;
        assert_eq!(answer.error, "", "{name}'s SVID");
        let credential = trellis_tests::hbone::Credential {
            chain: answer.certificate_chain.into_iter().map(Into::into).collect(),
            key: client::key_der(&key),
        };
        let mut connection =
            trellis_tests::hbone::connect(b_hbone, roots.clone(), &spiffe("api"), Some(credential)).await.unwrap();
        assert_eq!(connection.request(hyper::Method::CONNECT, &target).await.unwrap(), hyper::StatusCode::OK);
        (name, stream, connection)
    };
    let (_, _control_stream, mut control) = node(&mut admin, trials).await;
    let mut took = Vec::with_capacity(trials);
    for i in 0..trials {
        let (name, _stream, mut connection) = node(&mut admin, i).await;
        let started = Instant::now();
        admin.revoke_node(pb::RevokeNodeRequest { name: name.clone() }).await.unwrap();
        assert!(connection.wait_closed(WAIT).await, "trial {i}: {name}'s connection still open after {WAIT:?}");
        took.push(started.elapsed());
    }
    print_quantiles("node revocation to teardown (client end)", took);
    // Closed by node-b, because of the revocation, in every trial; the control's node never named.
    // (The reason is a quoted field of the log line: its own quotes are escaped there.)
    let named = |i: usize| format!("was issued to revoked node \\\"sim-{i}\\\"");
    wait_for("node-b's teardown of every trial's connection, with the reason", WAIT, || {
        let log = read_log(&b.log_path());
        (0..trials).all(|i| log.contains(&named(i))).then_some(())
    });
    assert!(read_log(&b.log_path()).contains("was issued to revoked node"));
    assert!(!read_log(&b.log_path()).contains(&named(trials)), "the control's node was not revoked");
    // The control: the connection of the node never revoked is open and serves another CONNECT.
    assert_eq!(control.request(hyper::Method::CONNECT, &target).await.unwrap(), hyper::StatusCode::OK);
}
