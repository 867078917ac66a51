//! A config the control plane accepts and a proxy cannot apply, end to end: the proxy NACKs it with the reason,
//! `trellisctl proxy-status` shows that reason, both programs count it, the proxy's ACKed version and its traffic
//! stay on the old policy; then a good config is ACKed and enforced.
//!
//! The unappliable config comes from the proxy's test-only fault injection (`TRELLIS_TEST_ONLY_REFUSE_RESOURCE`,
//! read by debug builds only, see `data-plane/src/state.rs`): every resource the control plane accepts is also
//! valid for a proxy (both use `trellis-policy`), so no real document is refused by one and not the other. The
//! refusal goes through the proxy's one NACK path (`discovery.rs`: keep the old state, send the reason).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use trellis_tests::{ControlPlane, Echo, Proxy, WorkloadSpec, http, respawn, socks, wait_for};

const CLIENT_IP: &str = "127.0.10.1";
const SERVER_IP: &str = "127.0.10.2";
/// SOCKS5 reply for a tunnel the destination proxy answered 403.
const NOT_ALLOWED: u8 = 2;
/// The resource node-b's fault injection refuses.
const REFUSED: &str = "shop/unappliable";

/// Sum of the samples of `name` whose labels include every one of `labels` (0 if none: an unset counter).
fn metric(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let (status, body) = http::get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    trellis_tests::prometheus::sum_samples(&body, name, labels)
}

/// An ALLOW policy for the api workload admitting connections to `port` only.
fn allow_port(name: &str, port: u16) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: api}}}}\n  action: ALLOW\n  rules:\n  - to: [{{operation: {{ports: [\"{port}\"]}}}}]\n"
    )
}

/// Ok if an echo round trip from `from`'s SOCKS5 listener works, Err(SOCKS5 reply code) if the tunnel is refused.
fn reach(from: &Proxy, to: SocketAddr) -> Result<(), u8> {
    socks::reach(from.socks5_addr, to)
}

/// `node`'s entry in `trellisctl proxy-status -o json`, and the control plane's current version.
fn status_of(cp: &ControlPlane, node: &str) -> (serde_json::Value, u64) {
    let status = cp.proxy_status();
    let current = status["currentVersion"].as_u64().expect("currentVersion");
    let entry = status["proxies"].as_array().expect("proxies").iter().find(|p| p["node"] == node).cloned();
    (entry.unwrap_or_else(|| panic!("{node} not in proxy-status: {status}")), current)
}

/// Waits until `node` answered the control plane's current version (ACK or NACK) and returns its entry and that
/// version.
fn wait_answered(cp: &ControlPlane, node: &str) -> (serde_json::Value, u64) {
    wait_for(&format!("{node} to answer the current version"), Duration::from_secs(30), || {
        let (p, current) = status_of(cp, node);
        (p["ackedVersion"] == current || p["nackedVersion"] == current).then_some((p, current))
    })
}

/// Two proxies: node-a (client, `web`) and node-b (`api` on two echo ports), node-b refusing [`REFUSED`].
struct Mesh {
    cp: ControlPlane,
    a: Proxy,
    b: Proxy,
    first: SocketAddr,
    second: SocketAddr,
    _b_process: trellis_tests::OwnProcess,
    _echoes: [Echo; 2],
}

fn mesh() -> Mesh {
    let cp = ControlPlane::start(&[]);
    let (first_port, second_port) = (trellis_tests::free_port(), trellis_tests::free_port());
    let first: SocketAddr = format!("{SERVER_IP}:{first_port}").parse().unwrap();
    let second: SocketAddr = format!("{SERVER_IP}:{second_port}").parse().unwrap();
    let echoes = [Echo::start(first), Echo::start(second)];
    let mut api = WorkloadSpec::new("api", "shop", "api", SERVER_IP);
    api.ports = vec![(first_port, "tcp"), (second_port, "tcp")];
    api.labels = vec![("app".into(), "api".into())];
    let mut b = Proxy::start(&cp, "node-b", &[api]);
    b.wait_ready();
    let b_process = respawn(&mut b, &[("TRELLIS_TEST_ONLY_REFUSE_RESOURCE", REFUSED)]);
    let a = Proxy::start(&cp, "node-a", &[WorkloadSpec::new("web", "shop", "web", CLIENT_IP)]);
    a.wait_ready();
    a.wait_config("node-b's workload in node-a's registry", |d| d["workloads"].to_string().contains(SERVER_IP));
    Mesh { cp, a, b, first, second, _b_process: b_process, _echoes: echoes }
}

#[test]
fn an_update_the_proxy_cannot_apply_is_nacked_with_its_reason_and_the_old_policy_stays_in_force() {
    let m = mesh();
    let (cp, a, b, first, second) = (&m.cp, &m.a, &m.b, m.first, m.second);
    let (first_port, second_port) = (first.port(), second.port());

    // The old policy: only the first port. Applied and ACKed by both proxies, and enforced.
    cp.apply(&allow_port("allow-first", first_port));
    let (b_status, old_version) = wait_answered(cp, "node-b");
    assert_eq!(b_status["ackedVersion"], old_version, "{b_status}");
    assert_eq!(b_status["lastNackError"], "", "{b_status}");
    assert_eq!(reach(a, first), Ok(()), "the old policy allows the first port");
    assert_eq!(reach(a, second), Err(NOT_ALLOWED), "the old policy denies the second port");

    let cp_nacks = || metric(cp.metrics_addr, "trellis_nacks_total", &[r#"reason="resource""#]);
    let b_updates =
        |result: &str| metric(b.metrics_addr, "trellis_config_updates_total", &[&format!(r#"result="{result}""#)]);
    let (nacks_before, b_nacks_before, b_acks_before) = (cp_nacks(), b_updates("nack"), b_updates("ack"));
    assert_eq!(nacks_before, 0.0, "no NACK yet");
    assert!(b_acks_before >= 2.0, "node-b ACKed its snapshot and the old policy: {b_acks_before}");

    // The unappliable update: valid for the control plane (it stored it), refused by node-b.
    cp.apply(&allow_port("unappliable", second_port));
    let (b_status, refused_version) = wait_answered(cp, "node-b");
    assert!(refused_version > old_version);
    assert_eq!(b_status["nackedVersion"], refused_version, "{b_status}");
    assert_eq!(b_status["ackedVersion"], old_version, "the ACKed version stays the old one: {b_status}");
    assert_eq!(b_status["synced"], false, "{b_status}");
    let error = b_status["lastNackError"].as_str().expect("lastNackError");
    assert!(
        error.contains("AuthorizationPolicy/shop/unappliable") && error.contains("refused by TRELLIS_TEST_ONLY"),
        "the NACK names the resource and the reason: {error:?}"
    );
    // The human-readable table says the same.
    let table = cp.ctl_ok(&["proxy-status"]);
    let row = table.lines().find(|l| l.starts_with("node-b")).unwrap_or_else(|| panic!("no node-b row: {table}"));
    assert!(row.contains("NACKED") && row.contains(&format!("v{refused_version}: ")), "{table}");
    // Control case, same update through the same path: node-a, without the fault injection, ACKed it.
    let (a_status, _) = wait_answered(cp, "node-a");
    assert_eq!(a_status["ackedVersion"], refused_version, "{a_status}");
    assert_eq!(a_status["lastNackError"], "", "{a_status}");

    // Counted on both sides: the control plane by reason, the proxy by result.
    assert_eq!(cp_nacks(), nacks_before + 1.0, "control plane trellis_nacks_total{{reason=\"resource\"}}");
    assert_eq!(b_updates("nack"), b_nacks_before + 1.0, "node-b trellis_config_updates_total{{result=\"nack\"}}");
    assert_eq!(b_updates("ack"), b_acks_before, "nothing ACKed by node-b meanwhile");
    // Traffic still follows the old policy: the first port is allowed, the second still denied.
    assert_eq!(reach(a, first), Ok(()), "the old policy still allows the first port");
    assert_eq!(reach(a, second), Err(NOT_ALLOWED), "the refused policy was not applied");

    // The proxy kept its old state: version and resources.
    let dump = b.config_dump();
    assert_eq!(dump["version"], old_version, "node-b's config_dump version: {dump}");
    assert!(!dump.to_string().contains("unappliable"), "the refused resource is not in node-b's state: {dump}");

    // A good config: the refused resource removed, then a policy allowing the second port. ACKed and applied.
    cp.ctl_ok(&["delete", "ap", "unappliable", "-n", "shop"]);
    cp.apply(&allow_port("allow-second", second_port));
    let (b_status, good_version) = wait_answered(cp, "node-b");
    assert!(good_version > refused_version);
    assert_eq!(b_status["ackedVersion"], good_version, "{b_status}");
    assert_eq!(b_status["synced"], true, "{b_status}");
    assert!(b_updates("ack") > b_acks_before, "node-b counted its ACKs");
    assert_eq!(cp_nacks(), nacks_before + 1.0, "no further NACK");
    assert_eq!(b.config_dump()["version"], good_version);
    assert_eq!(reach(a, second), Ok(()), "the good policy is enforced: the second port is allowed");
    assert_eq!(reach(a, first), Ok(()), "and the first still is");
}

/// A good change that came in the same update as a refused one is not lost: the proxy kept its older state, so
/// once the refused resource is gone the control plane resends everything the proxy lacks (a full snapshot), not
/// only the difference from the update the proxy rejected.
#[test]
fn a_good_change_bundled_with_a_refused_one_reaches_the_proxy_once_the_refused_one_is_gone() {
    let m = mesh();
    let (cp, a, b, first, second) = (&m.cp, &m.a, &m.b, m.first, m.second);
    cp.apply(&allow_port("allow-first", first.port()));
    let (b_status, old_version) = wait_answered(cp, "node-b");
    assert_eq!(b_status["ackedVersion"], old_version, "{b_status}");
    assert_eq!(reach(a, second), Err(NOT_ALLOWED), "the old policy denies the second port");

    // One apply, one version: the refused resource and a good policy allowing the second port.
    cp.apply(&format!("{}---\n{}", allow_port("unappliable", 1), allow_port("allow-second", second.port())));
    let (b_status, bundled_version) = wait_answered(cp, "node-b");
    assert_eq!(b_status["nackedVersion"], bundled_version, "{b_status}");
    assert_eq!(b_status["ackedVersion"], old_version, "{b_status}");
    assert_eq!(reach(a, second), Err(NOT_ALLOWED), "nothing of the refused update was applied");
    // Control case through the same path: node-a ACKed the bundled update.
    let (a_status, _) = wait_answered(cp, "node-a");
    assert_eq!(a_status["ackedVersion"], bundled_version, "{a_status}");

    // The refused resource goes; nothing else changes. node-b must end up with what the control plane holds.
    cp.ctl_ok(&["delete", "ap", "unappliable", "-n", "shop"]);
    let (b_status, fixed_version) = wait_answered(cp, "node-b");
    assert!(fixed_version > bundled_version);
    assert_eq!(b_status["ackedVersion"], fixed_version, "{b_status}");
    assert_eq!(b_status["synced"], true, "{b_status}");
    let dump = b.config_dump();
    assert_eq!(dump["version"], fixed_version, "{dump}");
    let text = dump.to_string();
    assert!(text.contains("allow-second"), "the good policy of the refused update reached node-b: {dump}");
    assert!(!text.contains("unappliable"), "{dump}");
    assert_eq!(reach(a, second), Ok(()), "node-b enforces the good policy: the second port is allowed");
    assert_eq!(reach(a, first), Ok(()), "and the first still is");
}
