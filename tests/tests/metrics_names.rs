//! The metric series the README promises and no other test drives: each situation is made happen, the program that
//! counts it is scraped, and the series is asserted with its labels and a value that moved from zero (or from the
//! value before). `trellis_nacks_total{reason}` and `trellis_config_updates_total{result="nack"}` are in `nack.rs`
//! (a NACK needs the proxy's test-only fault injection); the Istio series with `-` and `DENY` are in
//! `observability.rs`.

#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use trellis_proto::v1 as pb;
use trellis_proto::v1::discovery_request::Message as Up;
use trellis_proto::v1::discovery_response::Message as Down;
use trellis_tests::client::{self, csr, hello, workload};
use trellis_tests::outcome::{Outcome, Refusal};
use trellis_tests::prometheus::sum_samples;
use trellis_tests::{ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec, http, socks, wait_for};

const CLIENT_IP: &str = "127.0.10.1";
const SERVER_IP: &str = "127.0.10.2";
const WEB: &str = r#"source_principal="cluster.local/ns/shop/sa/web""#;

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http::get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

fn metric(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    sum_samples(&scrape(addr), name, labels)
}

/// Waits until the series reaches `expected`; panics with the last scrape.
fn wait_metric(addr: SocketAddr, name: &str, labels: &[&str], expected: f64) {
    let mut last = String::new();
    let reached = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(&format!("{name}{labels:?} == {expected}"), Duration::from_secs(30), || {
            last = scrape(addr);
            (sum_samples(&last, name, labels) == expected).then_some(())
        })
    }));
    if reached.is_err() {
        panic!("{name}{labels:?}: expected {expected}, got {}; scrape:\n{last}", sum_samples(&last, name, labels));
    }
}

/// A control plane, node-b fronting `api` (an echo on one port, nothing listening on another, both declared),
/// node-a fronting `web` with passthrough denied.
struct Mesh {
    cp: ControlPlane,
    a: Proxy,
    b: Proxy,
    _echo: Echo,
    echo: SocketAddr,
    dead: SocketAddr,
}

fn mesh() -> Mesh {
    let cp = ControlPlane::start(&[]);
    let echo: SocketAddr = format!("{SERVER_IP}:{}", trellis_tests::free_port()).parse().unwrap();
    let dead: SocketAddr = format!("{SERVER_IP}:{}", trellis_tests::free_port()).parse().unwrap();
    let echo_server = Echo::start(echo);
    let mut api = WorkloadSpec::new("api", "shop", "api", SERVER_IP);
    api.ports = vec![(echo.port(), "tcp"), (dead.port(), "tcp")];
    api.labels = vec![("app".into(), "api".into())];
    let b = Proxy::start(&cp, "node-b", &[api]);
    let web = WorkloadSpec::new("web", "shop", "web", CLIENT_IP);
    let a = Proxy::start_with(&cp, "node-a", &[web], ProxyOptions { passthrough: Some("deny"), ..Default::default() });
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-b's workload in node-a's registry", |d| d["workloads"].to_string().contains(SERVER_IP));
    Mesh { cp, a, b, _echo: echo_server, echo, dead }
}

impl Mesh {
    fn apply_and_wait(&self, yaml: &str) {
        self.cp.apply(yaml);
        wait_for("both proxies to ACK the latest version", Duration::from_secs(30), || {
            let status = self.cp.proxy_status();
            let all = status["proxies"].as_array()?;
            (all.len() == 2 && all.iter().all(|p| p["synced"] == true)).then_some(())
        });
    }
}

fn policy(name: &str, action: &str, dry_run: bool) -> String {
    let annotations = if dry_run { "\n  annotations: {\"istio.io/dry-run\": \"true\"}" } else { "" };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop{annotations}\n\
         spec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: {action}\n  rules:\n  - from: [{{source: {{principals: [\"cluster.local/ns/shop/sa/web\"]}}}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn control_plane_counts_pushes_and_signed_and_refused_certificates() {
    let cp = ControlPlane::start(&[]);
    let m = cp.metrics_addr;
    let signed = || metric(m, "trellis_certificates_signed_total", &[]);
    let refused = |reason: &str| metric(m, "trellis_certificates_refused_total", &[&format!(r#"reason="{reason}""#)]);
    let pushes = || metric(m, "trellis_pushes_total", &[]);
    assert_eq!((signed(), pushes()), (0.0, 0.0), "nothing signed or pushed before any proxy");

    // A node on a raw discovery stream: its first push is the full snapshot.
    let (token, pin) = cp.token("n1", &["shop"], &[]);
    let node = client::join(&cp.addr.to_string(), &pin, &token, "n1").await.expect("connect").expect("join");
    let mut stream = node.discover(hello(vec![workload("web", "shop", "web", "10.9.0.1")])).await.unwrap().unwrap();
    match stream.next().await.expect("snapshot") {
        Down::Update(u) => {
            assert!(u.full);
            stream.send(Up::Ack(pb::Ack { version: u.version, error: String::new(), reason: String::new() })).await;
        }
        other => panic!("expected the snapshot, got {other:?}"),
    }
    wait_metric(m, "trellis_pushes_total", &[], 1.0);

    // A CSR for a workload the node fronts is signed; the count moves by one, refusals stay at zero.
    let answer = stream.certify(1, csr(&["spiffe://cluster.local/ns/shop/sa/web"]).1).await;
    assert!(answer.error.is_empty(), "{}", answer.error);
    wait_metric(m, "trellis_certificates_signed_total", &[], 1.0);
    assert_eq!(metric(m, "trellis_certificates_refused_total", &[]), 0.0);

    // Refusals, counted by reason; the signed count does not move.
    let answer = stream.certify(2, csr(&["spiffe://cluster.local/ns/shop/sa/not-hosted"]).1).await;
    assert!(answer.error.contains("fronts no workload"), "{}", answer.error);
    wait_metric(m, "trellis_certificates_refused_total", &[r#"reason="not_authorized""#], 1.0);
    let answer = stream.certify(3, csr(&["spiffe://evil.example/ns/shop/sa/web"]).1).await;
    assert!(answer.error.contains("trust domain"), "{}", answer.error);
    wait_metric(m, "trellis_certificates_refused_total", &[r#"reason="foreign_trust_domain""#], 1.0);
    assert_eq!(refused("not_authorized"), 1.0);
    assert_eq!(signed(), 1.0, "refused CSRs are not counted as signed");

    // No change, no push; a policy change pushes once to the one connected proxy.
    assert_eq!(pushes(), 1.0);
    cp.apply(&policy("deny-web", "DENY", false));
    match stream.next().await.expect("update") {
        Down::Update(u) => assert!(!u.full && u.resources.len() == 1, "{u:?}"),
        other => panic!("expected the policy update, got {other:?}"),
    }
    wait_metric(m, "trellis_pushes_total", &[], 2.0);
}

/// Sends bytes that are not TLS to node-b's HBONE port on the api workload's address and waits for it to hang up.
fn not_tls(to: SocketAddr) {
    let mut tcp = TcpStream::connect(to).expect("connect to the HBONE port");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    match tcp.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("node-b did not close a connection that is not TLS: {e}"),
    }
}

#[test]
fn response_flags_tls_failure_no_route_and_connect_are_reported_where_they_happen() {
    let m = mesh();
    let opened = "istio_tcp_connections_opened_total";
    let closed = "istio_tcp_connections_closed_total";
    let at_b = [r#"reporter="destination""#, r#"destination_workload="api""#];
    let at_a = [r#"reporter="source""#, r#"source_workload="web""#];

    // Control: a connection that goes through is reported with `-` on both sides, and no flag is set yet.
    assert_eq!(socks::echo_round_trip(socks::connect_ok(m.a.socks5_addr, m.echo), b"ok"), b"ok");
    wait_metric(m.b.metrics_addr, closed, &[&at_b[..], &[WEB, r#"response_flags="-""#]].concat(), 1.0);
    wait_metric(m.a.metrics_addr, closed, &[&at_a[..], &[r#"response_flags="-""#]].concat(), 1.0);
    for flag in ["TLS_FAILURE", "NR", "CONNECT"] {
        let flag = format!(r#"response_flags="{flag}""#);
        assert_eq!(metric(m.a.metrics_addr, opened, &[&flag]) + metric(m.b.metrics_addr, opened, &[&flag]), 0.0);
    }

    // TLS_FAILURE: node-b, where the handshake fails, counts it against the workload whose address it arrived on.
    not_tls(SocketAddr::new(SERVER_IP.parse().unwrap(), m.b.hbone_port));
    let tls_failure = [&at_b[..], &[r#"response_flags="TLS_FAILURE""#, r#"source_principal="unknown""#]].concat();
    wait_metric(m.b.metrics_addr, opened, &tls_failure, 1.0);
    wait_metric(m.b.metrics_addr, closed, &tls_failure, 1.0);

    // NR: node-a (passthrough: deny) has no route to a destination outside the mesh.
    let outside: SocketAddr = format!("127.0.0.1:{}", trellis_tests::free_port()).parse().unwrap();
    let refused = socks::connect(m.a.socks5_addr, outside).map(|_| ());
    assert_eq!(refused, Err(Outcome::Refused(Refusal::Socks5(2))), "passthrough denied: 'not allowed' (2)");
    let no_route = [&at_a[..], &[r#"response_flags="NR""#]].concat();
    wait_metric(m.a.metrics_addr, opened, &no_route, 1.0);
    wait_metric(m.a.metrics_addr, closed, &no_route, 1.0);
    assert_eq!(metric(m.b.metrics_addr, opened, &[r#"response_flags="NR""#]), 0.0, "node-b never saw it");

    // CONNECT: node-b cannot reach the workload's declared port (nothing listens); it reports it, with the
    // caller's verified identity, and node-a reports the failed tunnel.
    assert!(socks::connect(m.a.socks5_addr, m.dead).is_err(), "a port nothing listens on");
    let connect_b = [&at_b[..], &[WEB, r#"response_flags="CONNECT""#]].concat();
    wait_metric(m.b.metrics_addr, opened, &connect_b, 1.0);
    wait_metric(m.b.metrics_addr, closed, &connect_b, 1.0);
    let connect_a = [&at_a[..], &[r#"destination_workload="api""#, r#"response_flags="CONNECT""#]].concat();
    wait_metric(m.a.metrics_addr, opened, &connect_a, 1.0);
}

#[test]
fn decisions_audited_dry_run_would_deny_and_closed_on_reevaluation_are_counted_by_policy() {
    let m = mesh();
    let decisions = "trellis_authz_decisions_total";
    let acks = |p: &Proxy| metric(p.metrics_addr, "trellis_config_updates_total", &[r#"result="ack""#]);
    let (acks_a, acks_b) = (acks(&m.a), acks(&m.b));
    assert!(acks_a >= 1.0 && acks_b >= 1.0, "each proxy ACKed its snapshot");

    // An AUDIT policy and a dry-run DENY policy, both matching web. Each proxy ACKs the change and counts it.
    m.apply_and_wait(&format!("{}---\n{}", policy("audit-web", "AUDIT", false), policy("would-deny", "DENY", true)));
    assert!(acks(&m.a) > acks_a && acks(&m.b) > acks_b, "trellis_config_updates_total{{result=\"ack\"}} moved");
    let audited = [r#"action="AUDIT""#, r#"policy="shop/audit-web""#, r#"result="audited""#];
    let would_deny = [r#"action="DENY""#, r#"policy="shop/would-deny""#, r#"result="dry_run_would_deny""#];
    assert_eq!(metric(m.b.metrics_addr, decisions, &audited), 0.0);
    assert_eq!(metric(m.b.metrics_addr, decisions, &would_deny), 0.0);

    // The connection goes through (neither is enforced) and both are counted, at node-b, which decides.
    assert_eq!(socks::echo_round_trip(socks::connect_ok(m.a.socks5_addr, m.echo), b"x"), b"x");
    wait_metric(m.b.metrics_addr, decisions, &audited, 1.0);
    wait_metric(m.b.metrics_addr, decisions, &would_deny, 1.0);
    assert_eq!(metric(m.b.metrics_addr, decisions, &[r#"result="denied""#]), 0.0, "nothing enforced a denial");

    // An open connection, then a DENY policy that matches it: node-b closes it and counts it under that policy.
    let mut stream = socks::connect_ok(m.a.socks5_addr, m.echo);
    stream.write_all(b"open").unwrap();
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).unwrap();
    let closed = [r#"action="DENY""#, r#"policy="shop/deny-web""#, r#"result="closed_on_reevaluation""#];
    assert_eq!(metric(m.b.metrics_addr, decisions, &closed), 0.0, "control: open and not yet closed");
    m.apply_and_wait(&policy("deny-web", "DENY", false));
    wait_metric(m.b.metrics_addr, decisions, &closed, 1.0);
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection the new policy denies was not closed: {e}"),
    }
}
