//! Control-plane failover and what a proxy receives, with real processes: a proxy configured with several
//! control-plane addresses reaches the live one whatever the order; a control plane killed (SIGKILL) and started
//! again resumes its proxies' streams with a delta from the version they ACKed, not a full snapshot, while a tunnel
//! opened before carries bytes throughout; and a proxy receives only the resources that can select its workloads
//! (its namespaces' and the root namespace's), with enforcement unchanged.
//!
//! Several replicas sharing one state need the etcd backend; here the replicas are one live control plane and a
//! dead address (nothing listens there).

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trellis_tests::prometheus::sum_samples;
use trellis_tests::{
    ControlPlane, Echo, Proxy, ProxyOptions, WorkloadSpec, free_port, http, read_log, socks, wait_for,
};

const A_IP: &str = "127.0.11.1";
const B_IP: &str = "127.0.11.2";
const NOT_ALLOWED: u8 = 2;

fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http::get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until every proxy the control plane knows is connected and has ACKed the current version.
fn wait_synced(cp: &ControlPlane, proxies: usize) -> serde_json::Value {
    wait_for("every proxy connected and in sync", Duration::from_secs(60), || {
        let status = cp.proxy_status();
        let list = status["proxies"].as_array()?.clone();
        let synced = list.iter().filter(|p| p["synced"] == true).count();
        (synced == proxies).then_some(status)
    })
}

/// A port on 127.0.0.1 where nothing listens: a dead replica.
fn dead_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// `[dead, live]` and `[live, dead]`: either way the proxy joins through the live replica, opens its stream there,
/// receives the config and ACKs it; its metrics name the replica in use. The dead address is retried only on the
/// backoff (the number of attempts is printed).
#[test]
fn a_proxy_reaches_the_live_replica_whatever_its_place_in_the_list() {
    let cp = ControlPlane::start(&[]);
    let live = cp.addr.to_string();
    let dead = dead_address();
    let mut proxies = Vec::new();
    for (node, ip, order) in
        [("node-a", A_IP, vec![dead.clone(), live.clone()]), ("node-b", B_IP, vec![live.clone(), dead.clone()])]
    {
        let started = Instant::now();
        let options = ProxyOptions { control_plane_addresses: order.clone(), ..Default::default() };
        let proxy = Proxy::start_with(&cp, node, &[WorkloadSpec::new(node, "shop", node, ip)], options);
        proxy.wait_ready();
        let dump = proxy.wait_config("a config from the live replica", |d| !d["version"].is_null());
        println!("{node} with {order:?}: in sync at version {} after {:?}", dump["version"], started.elapsed());
        let metrics = scrape(proxy.metrics_addr);
        assert_eq!(
            sum_samples(&metrics, "trellis_control_plane_replica", &[&format!("address=\"{live}\"")]),
            1.0,
            "{metrics}"
        );
        assert_eq!(sum_samples(&metrics, "trellis_control_plane_replica", &[&format!("address=\"{dead}\"")]), 0.0);
        let log = read_log(&proxy.log_path());
        assert!(log.contains(&format!("discovery stream open address={live}")), "{log}");
        let failures = log.matches(&format!("address={dead}")).count();
        println!("{node}: log lines naming the dead replica: {failures}");
        proxies.push(proxy);
    }
    let status = wait_synced(&cp, 2);
    println!("{status}");
}

const ALLOW_SHOP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [shop]}}]
"#;

const ALLOW_AFTER: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-after-restart, namespace: shop}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
"#;

/// The control plane is killed (SIGKILL) while two proxies are connected and started again on the same port: both
/// proxies resume with a delta from the version they ACKed (the control plane's `trellis_stream_resumes_total
/// {outcome="delta"}` and its push counters say so: no full snapshot, fewer bytes than the full snapshot each got
/// before), then follow a change made after the restart. A tunnel opened before the kill carries bytes throughout
/// and loses none. Control: a proxy that restarts (it holds only its stored config) asks for nothing and gets a
/// full snapshot through the same path.
#[test]
fn a_restarted_control_plane_resumes_its_proxies_with_a_delta_while_a_tunnel_carries_on() {
    let mut cp = ControlPlane::start(&[]);
    let echo = Echo::start(format!("{B_IP}:0").parse().unwrap());
    let mut web = WorkloadSpec::new("web", "shop", "web", A_IP);
    web.ports = vec![(9, "tcp")];
    let mut api = WorkloadSpec::new("api", "shop", "api", B_IP);
    api.ports = vec![(echo.addr.port(), "tcp")];
    let mut a = Proxy::start(&cp, "node-a", &[web]);
    let b = Proxy::start(&cp, "node-b", &[api]);
    a.wait_ready();
    b.wait_ready();
    a.wait_config("node-b's workload at node-a", |d| d["workloads"].to_string().contains(B_IP));
    cp.apply(ALLOW_SHOP);
    wait_synced(&cp, 2);
    let before = scrape(cp.metrics_addr);
    let full_pushes = sum_samples(&before, "trellis_push_updates_total", &["kind=\"full\""]);
    let full_bytes = sum_samples(&before, "trellis_push_bytes_total", &["kind=\"full\""]);
    assert!(full_pushes >= 2.0, "each proxy's first push was a full snapshot: {before}");
    let full_each = full_bytes / full_pushes;

    // A tunnel opened before the kill, written to and read back throughout.
    let mut tunnel = socks::connect_ok(a.socks5_addr, echo.addr);
    tunnel.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut round = |tunnel: &mut std::net::TcpStream, n: usize| {
        let chunk: Vec<u8> = (0..1024).map(|i| ((i + n) % 251) as u8).collect();
        tunnel.write_all(&chunk).expect("write through the tunnel");
        sent += chunk.len();
        let mut back = vec![0; chunk.len()];
        tunnel.read_exact(&mut back).expect("read back through the tunnel");
        assert_eq!(back, chunk, "round {n}");
        received += back.len();
    };
    round(&mut tunnel, 0);

    cp.kill9();
    for n in 1..=20 {
        round(&mut tunnel, n);
    }
    cp.resume();
    let mut n = 21;
    let status = wait_for("both proxies back and in sync", Duration::from_secs(60), || {
        round(&mut tunnel, n);
        n += 1;
        let status = cp.proxy_status();
        let list = status["proxies"].as_array()?.clone();
        (list.iter().filter(|p| p["synced"] == true).count() == 2).then_some(status)
    });
    println!("after the restart: {status}");
    let after = scrape(cp.metrics_addr);
    assert_eq!(sum_samples(&after, "trellis_stream_resumes_total", &["outcome=\"delta\""]), 2.0, "{after}");
    assert_eq!(sum_samples(&after, "trellis_push_updates_total", &["kind=\"full\""]), 0.0, "no full snapshot: {after}");
    let resumes = sum_samples(&after, "trellis_push_updates_total", &["kind=\"resume\""]);
    let resume_bytes = sum_samples(&after, "trellis_push_bytes_total", &["kind=\"resume\""]);
    assert_eq!(resumes, 2.0, "{after}");
    println!("bytes per proxy: full snapshot {full_each:.0}, resume delta {:.0}", resume_bytes / resumes);
    assert!(resume_bytes / resumes < full_each, "a resume is smaller than a full snapshot");
    let log = read_log(&cp.log_path());
    assert!(log.contains("proxy asks to resume") && log.contains("outcome=delta"), "{log}");
    assert!(read_log(&a.log_path()).contains("resumed=true"));

    // Changes after the restart reach both proxies as deltas.
    cp.apply(ALLOW_AFTER);
    wait_synced(&cp, 2);
    b.wait_config("the new policy at node-b", |d| d["resources"].to_string().contains("allow-after-restart"));
    for _ in 0..5 {
        round(&mut tunnel, n);
        n += 1;
    }
    assert_eq!(received, sent, "zero bytes lost over the tunnel");
    println!("tunnel: {sent} bytes sent, {received} echoed across the control plane's restart");

    // Control: a restarted proxy asks for nothing and gets a full snapshot.
    a.restart();
    a.wait_ready();
    wait_synced(&cp, 2);
    let last = scrape(cp.metrics_addr);
    assert_eq!(sum_samples(&last, "trellis_push_updates_total", &["kind=\"full\""]), 1.0, "{last}");
    assert_eq!(sum_samples(&last, "trellis_stream_resumes_total", &["outcome=\"not_asked\""]), 1.0, "{last}");
}

fn resource_keys(dump: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = dump["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}/{}", r["namespace"].as_str().unwrap(), r["name"].as_str().unwrap()))
        .collect();
    keys.sort();
    keys
}

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-from-b, namespace: a}
spec:
  rules:
  - from: [{source: {namespaces: [b]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: b}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-nothing, namespace: trellis-system}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/nowhere/sa/nobody"]}}]
"#;

const ROOT_DENY_B: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-b, namespace: trellis-system}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [b]}}]
"#;

/// node-a fronts a workload of namespace a, node-b one of namespace b. Each receives the policies of its own
/// namespace and of the root namespace, never the other's (`/config_dump`); enforcement is what the policies say:
/// b's allow-nothing policy refuses a at node-b, a's policy lets b in at node-a, and a root-namespace DENY applied
/// later reaches node-a and refuses b there.
#[test]
fn a_proxy_receives_the_policies_of_its_namespaces_and_the_root_namespace_only() {
    let cp = ControlPlane::start(&[]);
    let a_echo = Echo::start(format!("{A_IP}:0").parse().unwrap());
    let b_echo = Echo::start(format!("{B_IP}:0").parse().unwrap());
    let mut wa = WorkloadSpec::new("wa", "a", "sa", A_IP);
    wa.ports = vec![(a_echo.addr.port(), "tcp")];
    let mut wb = WorkloadSpec::new("wb", "b", "sb", B_IP);
    wb.ports = vec![(b_echo.addr.port(), "tcp")];
    let a = Proxy::start(&cp, "node-a", &[wa]);
    let b = Proxy::start(&cp, "node-b", &[wb]);
    a.wait_ready();
    b.wait_ready();
    cp.apply(POLICIES);
    wait_synced(&cp, 2);
    let a_dump = a.wait_config("a's policies", |d| d["resources"].as_array().is_some_and(|r| r.len() == 2));
    let b_dump = b.wait_config("b's policies", |d| d["resources"].as_array().is_some_and(|r| r.len() == 2));
    assert_eq!(resource_keys(&a_dump), ["a/only-from-b", "trellis-system/audit-nothing"], "{a_dump}");
    assert_eq!(resource_keys(&b_dump), ["b/deny-all", "trellis-system/audit-nothing"], "{b_dump}");
    assert_eq!(a_dump["workloads"].as_array().unwrap().len(), 2, "the registry is whole: {a_dump}");

    assert_eq!(socks::reach(a.socks5_addr, b_echo.addr), Err(NOT_ALLOWED), "b's policy, enforced at node-b");
    let b_log = read_log(&b.log_path());
    assert!(b_log.contains("denied: no ALLOW policy matched"), "the refusal's reason at node-b: {b_log}");
    assert_eq!(socks::reach(b.socks5_addr, a_echo.addr), Ok(()), "a's policy lets b in at node-a");

    cp.apply(ROOT_DENY_B);
    wait_synced(&cp, 2);
    a.wait_config("the root policy at node-a", |d| resource_keys(d).contains(&"trellis-system/deny-b".to_owned()));
    assert_eq!(socks::reach(b.socks5_addr, a_echo.addr), Err(NOT_ALLOWED), "the root namespace's DENY at node-a");
    let log = read_log(&a.log_path());
    assert!(log.contains("denied by DENY policy trellis-system/deny-b"), "{log}");
}
